//! The load tool behind `tally bench`: drives a running tallyd (echo backend) and, in
//! the same run, an unauthenticated baseline echo server (`examples/bench_echo.rs`)
//! through the same client loop, so the ratio between them is the cost of the protocol.
//!
//! Modes:
//! - `throughput`: N connections, each keeping `depth` requests of `payload` bytes in
//!   flight for `duration`; requests/s and latency percentiles (HdrHistogram).
//! - `reconnect`: N workers each connecting, doing one request, and closing, in a loop;
//!   handshakes/s (baseline: TCP connect plus one round trip).
//! - `idle`: open N sessions and hold them; the daemon's resident memory per session.
//! - `flood`: N devices reconnecting, without and then with attackers ([`flood`]).
//!
//! The baseline speaks `u32 length | u64 id | payload` and echoes it; the Tally side is a
//! real session (HELLO, SERVER_AUTH, CLIENT_FINISH, then sealed REQUESTs). Each Tally
//! connection needs its own identity: they are enrolled once with `--token` and kept in
//! `--cred-dir`.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::proto::credential::{Credential, EnrollmentToken};
use crate::proto::handshake::ClientAwaitAuth;
use crate::proto::{decode_frame, Body, CloseCode, Id, Session, MAX_FRAME_LEN_CEILING};
use crate::secrets::random_bytes;
use crate::wire::read_frame;

pub mod flood;
pub mod report;
#[cfg(feature = "bench-tls")]
pub mod tls;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Requests per second and latency.
    Throughput,
    /// Handshakes per second.
    Reconnect,
    /// Daemon memory per idle session.
    Idle,
    /// Devices reconnecting while attackers hold the port ([`flood`]).
    Flood,
}

/// The load's shape.
#[derive(Debug, Clone)]
pub struct Load {
    /// What to measure.
    pub mode: Mode,
    /// Connections (throughput, idle) or workers (reconnect).
    pub connections: usize,
    /// Request payload size in bytes.
    pub payload: usize,
    /// Requests in flight per connection.
    pub depth: usize,
    /// How long each measurement runs (idle: how long sessions are held).
    pub duration: Duration,
    /// Idle mode: loopback source addresses (127.0.0.2 ...); 1 = the default address.
    pub sources: u8,
    /// Print a progress line to stderr.
    pub progress: bool,
}

/// One measurement against one server.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// The target's name (`tally`, `plain`, `tls-psk`, a peer's).
    pub target: String,
    /// Completed requests (throughput) or handshakes (reconnect).
    pub count: u64,
    /// Per second.
    pub per_sec: f64,
    /// Latency percentiles in microseconds: p50, p99, p99.9.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// The server's CPU time (user + system, every process of the target) per request
    /// or reconnect, in microseconds; `None` when no process is known.
    pub server_cpu_us: Option<f64>,
    /// Idle mode: resident memory the daemon gained per session, in bytes.
    pub rss_per_session: Option<u64>,
}

/// How the load tool talks to a target.
#[derive(Clone)]
pub enum Kind {
    /// tallyd, with one credential per connection, in a session mode (spec 7.7).
    Tally(Arc<Vec<Credential>>, crate::proto::Mode),
    /// An echo of `u32 length | u64 id | payload` frames over plain TCP (`bench_plain`,
    /// `bench_echo`, or a tunnel in front of one, such as spiped's client end).
    Plain(String),
    /// The same echo inside TLS 1.3 with a PSK ([`tls`]: `bench_tls_psk`, stunnel).
    #[cfg(feature = "bench-tls")]
    TlsPsk(String, openssl::ssl::SslContext),
}

/// A server to measure, and the processes whose CPU time it costs.
#[derive(Clone)]
pub struct Target {
    /// Its name in the table.
    pub name: String,
    /// How to talk to it.
    pub kind: Kind,
    /// The server-side processes (a tunnel's: both its server end and the echo behind
    /// it); their CPU time is summed.
    pub pids: Vec<u32>,
}

impl Target {
    /// The address the load tool connects to.
    fn addr(&self, i: usize) -> &str {
        match &self.kind {
            Kind::Tally(creds, _) => &creds[i % creds.len()].server,
            Kind::Plain(addr) => addr,
            #[cfg(feature = "bench-tls")]
            Kind::TlsPsk(addr, _) => addr,
        }
    }

    /// The CPU seconds its processes used so far.
    fn cpu(&self) -> Option<f64> {
        if self.pids.is_empty() {
            return None;
        }
        self.pids.iter().map(|&p| flood::cpu_seconds(p).ok()).sum()
    }
}

/// The byte stream under a connection: TCP, or TLS over TCP.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// What is spoken over it.
enum Framing {
    /// `u32 length | u64 id | payload`, echoed.
    Plain { next: u64 },
    /// A Tally session.
    Tally { session: Box<Session> },
}

/// A connection that sends requests and matches responses to them.
struct Conn {
    io: Box<dyn Io>,
    framing: Framing,
}

impl Conn {
    async fn open(target: &Target, i: usize) -> anyhow::Result<Conn> {
        Self::open_from(target, i, None).await
    }

    /// [`Self::open`] from a chosen local address (a loopback alias, to look like many
    /// devices to the server's per-source limits, or to have more than one address's
    /// worth of ports).
    async fn open_from(target: &Target, i: usize, source: Option<IpAddr>) -> anyhow::Result<Conn> {
        let addr = target.addr(i);
        let mut tcp = match source {
            None => TcpStream::connect(addr).await?,
            Some(ip) => {
                let server = tokio::net::lookup_host(addr)
                    .await?
                    .next()
                    .context("server address")?;
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(std::net::SocketAddr::new(ip, 0))?;
                socket.connect(server).await?
            }
        };
        tcp.set_nodelay(true)?;
        match &target.kind {
            Kind::Plain(_) => Ok(Conn {
                io: Box::new(tcp),
                framing: Framing::Plain { next: 1 },
            }),
            #[cfg(feature = "bench-tls")]
            Kind::TlsPsk(_, ctx) => Ok(Conn {
                io: Box::new(tls::connect(ctx, tcp).await?),
                framing: Framing::Plain { next: 1 },
            }),
            Kind::Tally(creds, mode) => {
                let cred = &creds[i % creds.len()];
                let mut out = BytesMut::new();
                let wait = match mode {
                    crate::proto::Mode::Authenticated => ClientAwaitAuth::start(
                        &cred.id,
                        cred.key.clone(),
                        random_bytes(),
                        MAX_FRAME_LEN_CEILING,
                        &mut out,
                    ),
                    crate::proto::Mode::Encrypted => ClientAwaitAuth::start_sealed(
                        &cred.id,
                        cred.key.clone(),
                        &cred.server_key,
                        &mut random_bytes(),
                        MAX_FRAME_LEN_CEILING,
                        &mut out,
                    )?,
                };
                tcp.write_all(&out).await?;
                let mut buf = BytesMut::new();
                let auth = read_frame(&mut tcp, &mut buf, 256).await?;
                out.clear();
                let (session, _) = wait.handle_server_auth(&auth, &mut out)?;
                tcp.write_all(&out).await?;
                Ok(Conn {
                    io: Box::new(tcp),
                    framing: Framing::Tally {
                        session: Box::new(session),
                    },
                })
            }
        }
    }

    /// Appends one request to `out`; returns the key its response will carry.
    fn request(&mut self, payload: &Bytes, out: &mut BytesMut) -> anyhow::Result<u64> {
        match &mut self.framing {
            Framing::Plain { next } => {
                let id = *next;
                *next += 1;
                out.put_u32(8 + payload.len() as u32);
                out.put_u64(id);
                out.put_slice(payload);
                Ok(id)
            }
            Framing::Tally { session } => Ok(session.seal(
                &Body::Request {
                    payload: payload.clone(),
                },
                out,
            )?),
        }
    }

    /// The key of a response frame (a plain frame's id, a RESPONSE's `req_seq`).
    fn response(&mut self, frame: Bytes) -> anyhow::Result<Option<u64>> {
        match &mut self.framing {
            Framing::Plain { .. } => Ok(Some(u64::from_be_bytes(
                frame.get(4..12).context("short echo frame")?.try_into()?,
            ))),
            Framing::Tally { session } => match session.open(frame)?.body {
                Body::Response { req_seq, .. } => Ok(Some(req_seq)),
                Body::Close { code, reason } => bail!("server closed the session: {code} {reason}"),
                _ => Ok(None),
            },
        }
    }

    async fn close(mut self) {
        if let Framing::Tally { session } = &mut self.framing {
            let mut out = BytesMut::new();
            let _ = session.seal(
                &Body::Close {
                    code: CloseCode::NORMAL,
                    reason: String::new(),
                },
                &mut out,
            );
            let _ = self.io.write_all(&out).await;
        }
        let _ = self.io.shutdown().await;
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Keeps `depth` requests in flight on one connection until `until`.
async fn pipeline(
    mut conn: Conn,
    payload: Bytes,
    depth: usize,
    until: Instant,
    done: Arc<AtomicU64>,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = histogram();
    let mut sent: HashMap<u64, Instant> = HashMap::with_capacity(depth * 2);
    let (mut buf, mut out) = (BytesMut::with_capacity(8192), BytesMut::with_capacity(8192));
    for _ in 0..depth {
        let key = conn.request(&payload, &mut out)?;
        sent.insert(key, Instant::now());
    }
    while Instant::now() < until {
        if !out.is_empty() {
            conn.io.write_all(&out).await?;
            out.clear();
        }
        if conn.io.read_buf(&mut buf).await? == 0 {
            bail!("server closed the connection");
        }
        while let Some(frame) = decode_frame(&mut buf, MAX_FRAME_LEN_CEILING)? {
            if let Some(key) = conn.response(frame)? {
                let t0 = sent.remove(&key).context("response to nothing")?;
                hist.record(t0.elapsed().as_micros().max(1) as u64)?;
                done.fetch_add(1, Ordering::Relaxed);
                let key = conn.request(&payload, &mut out)?;
                sent.insert(key, Instant::now());
            }
        }
    }
    // Requests sealed after the last read go out before the CLOSE that follows them (a
    // CLOSE alone would skip their sequence numbers: the server refuses the gap).
    if !out.is_empty() {
        conn.io.write_all(&out).await?;
    }
    conn.close().await;
    Ok(hist)
}

/// Connects, sends one request, reads its response and closes.
pub(crate) async fn reconnect_once(
    target: &Target,
    i: usize,
    source: Option<IpAddr>,
    payload: &Bytes,
) -> anyhow::Result<()> {
    let mut conn = Conn::open_from(target, i, source).await?;
    let mut out = BytesMut::new();
    let key = conn.request(payload, &mut out)?;
    conn.io.write_all(&out).await?;
    let mut buf = BytesMut::new();
    loop {
        let frame = read_frame(&mut conn.io, &mut buf, MAX_FRAME_LEN_CEILING).await?;
        if conn.response(frame)? == Some(key) {
            break;
        }
    }
    conn.close().await;
    Ok(())
}

/// Connect, one request, close, in a loop until `until`.
async fn reconnects(
    target: Target,
    i: usize,
    payload: Bytes,
    until: Instant,
    done: Arc<AtomicU64>,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = histogram();
    while Instant::now() < until {
        let t0 = Instant::now();
        reconnect_once(&target, i, None, &payload).await?;
        hist.record(t0.elapsed().as_micros().max(1) as u64)?;
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(hist)
}

/// Prints `label: n done (n/s)` to stderr every second until dropped.
fn progress(label: String, done: Arc<AtomicU64>, on: bool) -> Option<tokio::task::JoinHandle<()>> {
    on.then(|| {
        tokio::spawn(async move {
            let t0 = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = done.load(Ordering::Relaxed);
                let s = t0.elapsed().as_secs_f64();
                eprint!("\r{label}: {s:5.1} s, {n} done ({:.0}/s)    ", n as f64 / s);
                let _ = std::io::stderr().flush();
            }
        })
    })
}

/// Runs one measurement of `load` against `target`.
pub async fn measure(target: &Target, load: &Load) -> anyhow::Result<Measurement> {
    let payload = Bytes::from(vec![0x5a; load.payload]);
    let done = Arc::new(AtomicU64::new(0));
    let ticker = progress(
        format!("{:?} {}", load.mode, target.name),
        done.clone(),
        load.progress,
    );
    let result = match load.mode {
        Mode::Throughput | Mode::Reconnect => {
            // Connections are opened first (at most 128 handshakes at a time), then timed.
            let gate = Arc::new(Semaphore::new(128));
            let mut conns = Vec::new();
            if load.mode == Mode::Throughput {
                let opens = (0..load.connections).map(|i| {
                    let (target, gate) = (target.clone(), gate.clone());
                    tokio::spawn(async move {
                        let _p = gate.acquire().await;
                        Conn::open(&target, i).await
                    })
                });
                for h in opens.collect::<Vec<_>>() {
                    conns.push(h.await??);
                }
            }
            let cpu0 = target.cpu();
            let t0 = Instant::now();
            let until = t0 + load.duration;
            let tasks: Vec<_> = if load.mode == Mode::Throughput {
                conns
                    .into_iter()
                    .map(|c| {
                        tokio::spawn(pipeline(
                            c,
                            payload.clone(),
                            load.depth,
                            until,
                            done.clone(),
                        ))
                    })
                    .collect()
            } else {
                (0..load.connections)
                    .map(|i| {
                        tokio::spawn(reconnects(
                            target.clone(),
                            i,
                            payload.clone(),
                            until,
                            done.clone(),
                        ))
                    })
                    .collect()
            };
            let mut hist = histogram();
            for t in tasks {
                hist.add(t.await??)?;
            }
            let secs = t0.elapsed().as_secs_f64();
            let server_cpu_us = match (cpu0, target.cpu()) {
                (Some(a), Some(b)) if !hist.is_empty() => Some((b - a) * 1e6 / hist.len() as f64),
                _ => None,
            };
            Measurement {
                target: target.name.clone(),
                server_cpu_us,
                count: hist.len(),
                per_sec: hist.len() as f64 / secs,
                p50_us: hist.value_at_quantile(0.5),
                p99_us: hist.value_at_quantile(0.99),
                p999_us: hist.value_at_quantile(0.999),
                rss_per_session: None,
            }
        }
        Mode::Idle => idle(target, load, done.clone()).await?,
        Mode::Flood => bail!("flood mode runs through flood::run"),
    };
    if let Some(t) = ticker {
        t.abort();
        eprintln!();
    }
    Ok(result)
}

/// Resident memory of `pid` in bytes (Linux `/proc`).
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid}"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kb * 1024)
}

/// Sessions the idle mode opens at once.
const OPEN_AT_ONCE: usize = 128;

async fn idle(target: &Target, load: &Load, done: Arc<AtomicU64>) -> anyhow::Result<Measurement> {
    let pid = *target.pids.first().context(
        "idle mode needs the daemon's pid (--daemon-pid, or a daemon listening on --server here)",
    )?;
    crate::daemon::raise_fd_limit();
    // A warm-up burst first, as many sessions as are opened at once below, opened and
    // closed: what the daemon keeps after any burst (blocking-pool threads for store
    // lookups, their allocator arenas) is then in `before`, and the figure is what each
    // session costs, the same at 1,000 sessions as at 19,000. (Without it, about 1.2 MB
    // of fixed cost was spread over the sessions: +1.2 KiB each at 1,000, measured.)
    let warm = OPEN_AT_ONCE.min(load.connections);
    let warmup: Vec<_> = (0..warm)
        .map(|i| {
            let target = target.clone();
            tokio::spawn(async move { Conn::open_from(&target, i, None).await })
        })
        .collect();
    for h in warmup {
        h.await??.close().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss(pid)?;
    let gate = Arc::new(Semaphore::new(OPEN_AT_ONCE));
    let sources = load.sources;
    let opens: Vec<_> = (0..load.connections)
        .map(|i| {
            let (target, gate, done) = (target.clone(), gate.clone(), done.clone());
            // More than one source address: 127.0.0.2, 127.0.0.3, ... in turn (each
            // address has about 28,000 ephemeral ports towards one server port).
            let source = (sources > 1).then(|| {
                IpAddr::V4(std::net::Ipv4Addr::new(
                    127,
                    0,
                    0,
                    2 + (i % sources as usize) as u8,
                ))
            });
            tokio::spawn(async move {
                let _p = gate.acquire().await;
                let c = Conn::open_from(&target, i, source).await;
                done.fetch_add(1, Ordering::Relaxed);
                c
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(load.connections);
    for h in opens {
        conns.push(h.await??);
    }
    // Let the server finish registering every session, then hold them.
    tokio::time::sleep(load.duration.max(Duration::from_secs(2))).await;
    let after = rss(pid)?;
    for c in conns {
        c.close().await;
    }
    Ok(Measurement {
        target: target.name.clone(),
        count: load.connections as u64,
        per_sec: 0.0,
        p50_us: 0,
        p99_us: 0,
        p999_us: 0,
        server_cpu_us: None,
        rss_per_session: Some(after.saturating_sub(before) / load.connections.max(1) as u64),
    })
}

/// The pid of the process listening on `addr`'s TCP port on this machine (Linux
/// `/proc`: the listening socket's inode, then the process holding it), if any.
pub fn listener_pid(addr: &str) -> Option<u32> {
    let port: u16 = addr.rsplit_once(':')?.1.parse().ok()?;
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 the inode.
            let listening = f.get(3) == Some(&"0A");
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if listening && local_port == Some(port) {
                inodes.extend(f.get(9).map(|i| format!("socket:[{i}]")));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| link.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// Frames longer than this end an echo connection (as tallyd's largest limit does).
const ECHO_MAX_FRAME: usize = MAX_FRAME_LEN_CEILING as usize;

/// The echo the load tool's plain and TLS-PSK targets serve (`bench_plain`,
/// `bench_tls_psk`): reads what arrived, writes back every whole `u32 length | u64 id |
/// payload` frame in it with one write, and reads again. No per-request task, timer or
/// channel: the least a server can do per request. Returns when the peer closes, or at
/// an oversized length.
pub async fn echo_frames<S>(io: &mut S) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        // The whole frames at the front of `buf`, echoed in one write.
        let mut whole = 0;
        while let Some(head) = buf.get(whole..whole + 4) {
            let len = u32::from_be_bytes(head.try_into().expect("4 bytes")) as usize;
            if len > ECHO_MAX_FRAME {
                return Ok(());
            }
            if buf.len() - whole < 4 + len {
                buf.reserve(4 + len);
                break;
            }
            whole += 4 + len;
        }
        if whole > 0 {
            io.write_all(&buf[..whole]).await?;
            bytes::Buf::advance(&mut buf, whole);
        }
    }
}

/// Loads `bench-0 .. bench-(n-1)` from `dir`, enrolling (with `token`) those missing.
pub async fn credentials(
    dir: &Path,
    n: usize,
    server: &str,
    token: Option<&EnrollmentToken>,
) -> anyhow::Result<Vec<Credential>> {
    std::fs::create_dir_all(dir)?;
    let gate = Arc::new(Semaphore::new(32));
    let enrolled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..n {
        let path: PathBuf = dir.join(format!("bench-{i}.cred"));
        let (server, token, gate) = (server.to_owned(), token.cloned(), gate.clone());
        let enrolled = enrolled.clone();
        tasks.push(tokio::spawn(async move {
            if let Ok(text) = std::fs::read_to_string(&path) {
                let mut cred = Credential::from_file(&text)?;
                cred.server = server;
                return Ok(cred);
            }
            let token =
                token.context("credentials missing in --cred-dir; give --token to enroll them")?;
            let _p = gate.acquire().await;
            let id = Id::new(&format!("bench-{i}"))?;
            let cred = crate::client::enroll(
                &server,
                &token,
                id,
                &crate::client::ClientOptions::default()
                    .with_connect_timeout(Duration::from_secs(30)),
            )
            .await?;
            crate::secrets::write_secret_file(&path, cred.to_file().as_bytes())?;
            enrolled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok::<_, anyhow::Error>(cred)
        }));
    }
    let started = std::time::Instant::now();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    let enrolled = enrolled.load(std::sync::atomic::Ordering::Relaxed);
    if enrolled > 0 {
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "enrolled {enrolled} identities in {secs:.2} s ({:.0}/s, 32 at a time)",
            enrolled as f64 / secs
        );
    }
    Ok(out)
}

/// The median of `xs` (upper median for an even count).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}
