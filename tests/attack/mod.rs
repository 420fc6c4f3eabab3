//! The attacker's tools: raw sockets, a frame-aware man in the middle, captured logs.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tally::backend::{Backend, BoxFuture, Reply, Request};
use tally::proto::credential::Credential;
use tally::proto::handshake::ClientAwaitAuth;
use tally::proto::{decode_frame, Mode, Session, HANDSHAKE_MAX_FRAME_LEN, MAX_FRAME_LEN_CEILING};
use tally::store::IdentityRow;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

// ---- captured logs ---------------------------------------------------------------

static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the log capture (once per test binary).
pub fn capture_logs() {
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = buf.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || LogWriter(w.clone()))
            .init();
        buf
    });
}

/// Whether a captured log line contains every one of `parts` now.
pub fn has_log_line(parts: &[&str]) -> bool {
    let text = String::from_utf8_lossy(&LOG.get().expect("capture_logs() first").lock().unwrap())
        .into_owned();
    text.lines().any(|l| parts.iter().all(|p| l.contains(p)))
}

/// Waits until a captured log line contains every one of `parts`; returns it.
pub async fn log_line(parts: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text =
            String::from_utf8_lossy(&LOG.get().expect("capture_logs() first").lock().unwrap())
                .into_owned();
        if let Some(line) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log line contains {parts:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- a backend that records what it was asked -------------------------------------

#[derive(Default)]
pub struct Recorder {
    pub payloads: Mutex<Vec<(String, Bytes)>>,
    pub count: AtomicUsize,
}

pub struct RecordingEcho(pub Arc<Recorder>);

impl Backend for RecordingEcho {
    fn name(&self) -> &str {
        "recording-echo"
    }
    fn request(&self, req: Request) -> BoxFuture<Reply> {
        self.0
            .payloads
            .lock()
            .unwrap()
            .push((req.id.to_string(), req.payload.clone()));
        self.0.count.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { Reply::ok(req.payload) })
    }
}

impl Recorder {
    /// Payloads the backend received for `id`.
    pub fn of(&self, id: &str) -> Vec<Bytes> {
        self.payloads
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _)| i == id)
            .map(|(_, p)| p.clone())
            .collect()
    }
}

/// The store without volatile columns: what an attack must not change.
pub fn snapshot(rows: Vec<IdentityRow>) -> Vec<(String, i64, Option<i64>, String)> {
    rows.into_iter()
        .map(|r| (r.id, r.created, r.revoked, r.mode))
        .collect()
}

// ---- raw bytes ------------------------------------------------------------------

/// Reads until EOF (or `secs`), returning every byte.
pub async fn read_to_eof(s: &mut TcpStream, secs: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(secs), s.read_to_end(&mut out)).await;
    out
}

/// Reads one whole frame (any size up to the protocol ceiling).
pub async fn read_one(s: &mut TcpStream, buf: &mut BytesMut) -> Option<Bytes> {
    loop {
        if let Ok(Some(f)) = decode_frame(buf, MAX_FRAME_LEN_CEILING) {
            return Some(f);
        }
        match tokio::time::timeout(Duration::from_secs(5), s.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
}

/// The first frame of a handshake for `cred` in `mode`, with `random` as its nonce or
/// ephemeral secret.
pub fn hello(
    cred: &Credential,
    mode: Mode,
    random: [u8; 32],
    out: &mut BytesMut,
) -> ClientAwaitAuth {
    match mode {
        Mode::Authenticated => ClientAwaitAuth::start(
            &cred.id,
            cred.key.clone(),
            random,
            MAX_FRAME_LEN_CEILING,
            out,
        ),
        Mode::Encrypted => ClientAwaitAuth::start_sealed(
            &cred.id,
            cred.key.clone(),
            &cred.server_key,
            &mut random.clone(),
            MAX_FRAME_LEN_CEILING,
            out,
        )
        .unwrap(),
    }
}

/// An attacker who holds the identity key: a session driven by hand over a raw socket.
pub struct RawSession {
    pub tcp: TcpStream,
    pub session: Session,
    pub buf: BytesMut,
}

impl RawSession {
    /// A session in the encrypted mode (the daemon's default policy).
    pub async fn open(addr: SocketAddr, cred: &Credential) -> RawSession {
        Self::open_in(addr, cred, Mode::Encrypted).await
    }

    /// A session in `mode`.
    pub async fn open_in(addr: SocketAddr, cred: &Credential, mode: Mode) -> RawSession {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut out = BytesMut::new();
        let wait = hello(cred, mode, [7; 32], &mut out);
        tcp.write_all(&out).await.unwrap();
        let mut buf = BytesMut::new();
        let auth = read_one(&mut tcp, &mut buf).await.unwrap();
        let mut finish = BytesMut::new();
        let (session, _) = wait.handle_server_auth(&auth, &mut finish).unwrap();
        tcp.write_all(&finish).await.unwrap();
        RawSession { tcp, session, buf }
    }

    /// Seals `body` and returns the frame without sending it.
    pub fn seal(&mut self, body: &tally::proto::Body) -> Bytes {
        let mut out = BytesMut::new();
        self.session.seal(body, &mut out).unwrap();
        out.freeze()
    }

    /// Reads the next frame and opens it (the server's frames must verify).
    pub async fn recv(&mut self) -> Option<tally::proto::SessionFrame> {
        let f = read_one(&mut self.tcp, &mut self.buf).await?;
        Some(self.session.open(f).unwrap())
    }
}

// ---- the man in the middle ------------------------------------------------------

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Device to server.
    C2s,
    /// Server to device.
    S2c,
}

/// What the proxy does with one frame.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Frames to send on, in the same direction.
    pub forward: Vec<Bytes>,
    /// Frames to send back where this one came from.
    pub back: Vec<Bytes>,
    /// Cut both directions after this.
    pub cut: bool,
}

impl Verdict {
    pub fn pass(f: Bytes) -> Verdict {
        Verdict {
            forward: vec![f],
            ..Verdict::default()
        }
    }
}

/// `policy(direction, index of the frame in that direction on this connection, frame)`.
pub type Policy = Arc<dyn Fn(Dir, usize, Bytes) -> Verdict + Send + Sync>;

/// Starts a proxy in front of `server`; every connection goes through `policy`.
pub async fn proxy(server: SocketAddr, policy: Policy) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = TcpStream::connect(server).await else {
                continue;
            };
            tokio::spawn(relay(client, upstream, policy.clone()));
        }
    });
    addr
}

async fn relay(client: TcpStream, server: TcpStream, policy: Policy) {
    let (c_rd, c_wr) = client.into_split();
    let (s_rd, s_wr) = server.into_split();
    // Writers are tasks fed by channels, so either pump can write either way.
    let (to_client, c_rx) = mpsc::unbounded_channel::<Option<Bytes>>();
    let (to_server, s_rx) = mpsc::unbounded_channel::<Option<Bytes>>();
    tokio::spawn(writer(c_wr, c_rx));
    tokio::spawn(writer(s_wr, s_rx));
    let a = pump(
        c_rd,
        Dir::C2s,
        policy.clone(),
        to_server.clone(),
        to_client.clone(),
    );
    let b = pump(s_rd, Dir::S2c, policy, to_client, to_server);
    tokio::join!(a, b);
}

async fn writer(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Option<Bytes>>,
) {
    while let Some(item) = rx.recv().await {
        match item {
            Some(bytes) => {
                if wr.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            None => {
                let _ = wr.shutdown().await;
                return;
            }
        }
    }
    let _ = wr.shutdown().await;
}

async fn pump(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    dir: Dir,
    policy: Policy,
    on: mpsc::UnboundedSender<Option<Bytes>>,
    back: mpsc::UnboundedSender<Option<Bytes>>,
) {
    let mut buf = BytesMut::new();
    let mut index = 0;
    loop {
        // Frames are cut on their length prefix only; lying lengths pass through raw.
        while let Ok(Some(frame)) = decode_frame(&mut buf, MAX_FRAME_LEN_CEILING) {
            let v = policy(dir, index, frame);
            index += 1;
            v.forward.into_iter().for_each(|f| drop(on.send(Some(f))));
            v.back.into_iter().for_each(|f| drop(back.send(Some(f))));
            if v.cut {
                let _ = on.send(None);
                let _ = back.send(None);
                return;
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => {
                let _ = on.send(Some(buf.split().freeze()));
                let _ = on.send(None);
                return;
            }
        }
    }
}

/// A policy that records every frame and passes it on.
pub fn recorder(log: Arc<Mutex<Vec<(Dir, usize, Bytes)>>>) -> Policy {
    Arc::new(move |d, i, f| {
        log.lock().unwrap().push((d, i, f.clone()));
        Verdict::pass(f)
    })
}

/// The handshake frame limit, for building attacks that target it.
pub const HS_LIMIT: u32 = HANDSHAKE_MAX_FRAME_LEN;
