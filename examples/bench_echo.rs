//! The baseline for `tally bench`: an unauthenticated echo server with the same tokio
//! structure as tallyd's session loop (read frames with the same length-limited codec,
//! hand each request to a task, write answers in batches), minus the protocol.
//! Frames are `u32 length | u64 id | payload`, echoed back unchanged.
//!
//!     cargo run --release --example bench_echo -- 127.0.0.1:7421

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

const MAX_FRAME: u32 = 65_536;
const MAX_IN_FLIGHT: usize = 32;

async fn serve(tcp: TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let (mut rd, mut wr) = tcp.into_split();
    let mut buf = BytesMut::with_capacity(256);
    let mut out = BytesMut::new();
    let mut inflight: JoinSet<Bytes> = JoinSet::new();
    loop {
        while inflight.len() < MAX_IN_FLIGHT {
            match tally::proto::decode_frame(&mut buf, MAX_FRAME) {
                Ok(Some(frame)) => {
                    // The "backend": an echo, on its own task as tallyd's backends are.
                    inflight.spawn(async move { frame });
                }
                Ok(None) => break,
                Err(_) => return Ok(()),
            }
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            out.clear();
        }
        tokio::select! {
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                if let Ok(frame) = done {
                    out.extend_from_slice(&frame);
                }
            }
            r = rd.read_buf(&mut buf), if inflight.len() < MAX_IN_FLIGHT => {
                if r? == 0 {
                    return Ok(());
                }
            }
        }
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7421".into());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("bench_echo listening on {}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(serve(tcp));
    }
}
