//! A TCP pass-through load balancer for tests: each connection goes to the first
//! backend that accepts it, bytes copied both ways, nothing else (what docs/CLUSTER.md
//! asks of a real one: no TLS, no protocol awareness, no connection reuse).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Proxy {
    pub addr: SocketAddr,
    backends: Arc<Mutex<Vec<String>>>,
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16384];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

impl Proxy {
    /// A balancer on 127.0.0.1:0 in front of `backends`, tried in order.
    pub fn start(backends: &[&str]) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = Arc::new(Mutex::new(
            backends.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        ));
        let list = backends.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let list = list.lock().unwrap().clone();
                std::thread::spawn(move || {
                    let upstream = list.iter().find_map(|b| {
                        let b: SocketAddr = b.parse().ok()?;
                        TcpStream::connect_timeout(&b, Duration::from_millis(500)).ok()
                    });
                    // No backend: the client's connection is closed, as a balancer does.
                    let Some(upstream) = upstream else { return };
                    let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                    std::thread::spawn(move || pipe(c2, u2));
                    pipe(upstream, client);
                });
            }
        });
        Proxy { addr, backends }
    }

    /// Replaces the backends (new connections only).
    pub fn set_backends(&self, backends: &[&str]) {
        *self.backends.lock().unwrap() = backends.iter().map(|s| s.to_string()).collect();
    }
}
