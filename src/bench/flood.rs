//! `tally bench --mode flood`: legitimate devices reconnecting while attackers hold the
//! port (issue 11, spec 13.10), against a tallyd on this machine.
//!
//! Each run has three phases, each `duration` long, against the same daemon:
//! 1. **calm**: the devices alone (connect, handshake, one request, close, in a loop);
//! 2. **attack only**: `attackers` connections of one kind, each re-opened as soon as the
//!    server drops it, from `sources` loopback addresses (127.0.1.1, 127.0.1.2, ...); the
//!    daemon's CPU time (`/proc/PID/stat`, with `--daemon-pid`) per attacker connection;
//! 3. **flood**: the same attack, and the devices again.
//!
//! Then the attack stops and the time until the next device handshake succeeds is the
//! recovery. Devices do not retry: every failed attempt counts. Device `i` connects from
//! 127.0.0.(2 + i mod 200), so that, as in a fleet, devices do not share one source's
//! limits with each other or with the attackers.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{histogram, reconnect_once, Kind, Target};
use crate::proto::credential::EnrollmentToken;
use crate::proto::enroll::ClientAwaitReply;
use crate::proto::handshake::ClientAwaitAuth;
use crate::proto::{Id, SecretKey};
use crate::secrets::random_bytes;

/// What the attackers do with each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attack {
    /// Connect and send nothing.
    Idle,
    /// Send a HELLO one byte per second.
    Slowloris,
    /// Send 64 bytes that are not a frame.
    Garbage,
    /// Send a HELLO for an unknown id, read SERVER_AUTH, then hold the connection.
    HelloUnknown,
    /// Replay a captured, valid ENROLL_INIT of an enrolled id (needs --token).
    EnrollReplay,
    /// Enroll new ids with the open token, as fast as allowed (needs --token; creates
    /// identities named `flood-…`).
    EnrollFlood,
}

/// The flood's shape.
#[derive(Debug, Clone)]
pub struct Flood {
    /// The attack.
    pub attack: Attack,
    /// Attacker connections held at once.
    pub attackers: usize,
    /// Loopback addresses the attackers come from (127.0.1.1 ...).
    pub sources: u8,
    /// Length of each phase.
    pub duration: Duration,
    /// The open token, for the enrollment attacks.
    pub token: Option<EnrollmentToken>,
    /// The daemon, for its CPU time.
    pub daemon_pid: Option<u32>,
}

/// How the devices fared in one phase.
#[derive(Debug, Clone, Serialize)]
pub struct Devices {
    /// Handshakes tried.
    pub attempts: u64,
    /// Of which completed with their request answered.
    pub succeeded: u64,
    /// Success rate, percent.
    pub success_pct: f64,
    /// Handshake + request latency of the successes, microseconds.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
}

/// One flood run.
#[derive(Debug, Clone, Serialize)]
pub struct FloodReport {
    /// The attack.
    pub attack: Attack,
    /// Attacker connections held at once.
    pub attackers: usize,
    /// Loopback addresses the attackers came from.
    pub sources: u8,
    /// Attacker connections opened per second (attack-only phase).
    pub attack_conns_per_sec: f64,
    /// The daemon's CPU time per attacker connection, microseconds (attack-only phase).
    pub server_cpu_us_per_attack_conn: Option<f64>,
    /// Devices with no attack.
    pub calm: Devices,
    /// Devices under attack.
    pub flood: Devices,
    /// p99 under attack over p99 without.
    pub p99_ratio: f64,
    /// From the end of the attack to the next device success, milliseconds.
    pub recovery_ms: u64,
}

/// CPU time (user + system) of `pid` so far, in seconds (Linux `/proc`).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid}"))?;
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = stat.rsplit_once(") ").context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Ok(ticks as f64 / hz)
}

/// The address of the `n`th device connection: 127.0.0.2 ... 127.0.0.201 in turn, as
/// a fleet's connections come from many addresses (the attackers use 127.0.1.x).
fn device_address(n: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (n % 200) as u8))
}

/// Devices reconnecting in a loop on `workers` tasks until `until`.
async fn devices(target: &Target, workers: usize, until: Instant) -> Devices {
    let payload = Bytes::from_static(b"ping");
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..workers)
        .map(|i| {
            let (target, payload, next) = (target.clone(), payload.clone(), next.clone());
            tokio::spawn(async move {
                let mut hist = histogram();
                let mut attempts = 0u64;
                while Instant::now() < until {
                    attempts += 1;
                    let t0 = Instant::now();
                    let once = tokio::time::timeout(
                        Duration::from_secs(10),
                        reconnect_once(
                            &target,
                            i,
                            Some(device_address(next.fetch_add(1, Ordering::Relaxed))),
                            &payload,
                        ),
                    );
                    match once.await {
                        Ok(Ok(())) => {
                            let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                        }
                        _ => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                (attempts, hist)
            })
        })
        .collect();
    let (mut attempts, mut hist) = (0, histogram());
    for t in tasks {
        if let Ok((a, h)) = t.await {
            attempts += a;
            let _ = hist.add(h);
        }
    }
    let succeeded = hist.len();
    Devices {
        attempts,
        succeeded,
        success_pct: 100.0 * succeeded as f64 / attempts.max(1) as f64,
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
    }
}

/// What every attacker connection needs, prepared once.
struct Arsenal {
    attack: Attack,
    server: SocketAddr,
    /// A valid ENROLL_INIT of an enrolled id (EnrollReplay).
    replay: Bytes,
    /// The mode of the strangers' HELLOs: a SEALED_HELLO costs the server two X25519.
    mode: crate::proto::Mode,
    /// `S`, which a stranger's SEALED_HELLO seals its made-up id to.
    server_key: [u8; 32],
    token: Option<EnrollmentToken>,
}

impl Arsenal {
    async fn new(
        flood: &Flood,
        server: SocketAddr,
        mode: crate::proto::Mode,
        server_key: [u8; 32],
    ) -> anyhow::Result<Arsenal> {
        let mut replay = Bytes::new();
        if matches!(flood.attack, Attack::EnrollReplay | Attack::EnrollFlood) {
            let token = flood
                .token
                .as_ref()
                .context("the enrollment attacks need the open token (--token)")?;
            if flood.attack == Attack::EnrollReplay {
                let id = Id::new("flood-replayed")?;
                // Enrolled once (or already, from an earlier run): the replay gets ID_TAKEN.
                let _ = crate::client::enroll(
                    &server.to_string(),
                    token,
                    id.clone(),
                    &crate::client::ClientOptions::default(),
                )
                .await;
                let mut out = BytesMut::new();
                ClientAwaitReply::start(token.client_params(id), random_bytes(), &mut out);
                replay = out.freeze();
            }
        }
        Ok(Arsenal {
            attack: flood.attack,
            server,
            mode,
            server_key,
            replay,
            token: flood.token.clone(),
        })
    }

    /// One attacker connection from `source`, until the server drops it or `stop`.
    async fn strike(&self, source: IpAddr, stop: &CancellationToken) -> anyhow::Result<()> {
        if self.attack == Attack::EnrollFlood {
            // The client library connects (from the default address) and enrolls.
            let token = self.token.as_ref().context("token")?;
            let id = Id::new(&format!("flood-{}", hex::encode(&random_bytes()[..8])))?;
            let server = self.server.to_string();
            let once =
                crate::client::ClientOptions::default().with_retry(crate::client::Backoff::never());
            let enroll = crate::client::enroll(&server, token, id, &once);
            tokio::select! {
                _ = stop.cancelled() => {}
                r = enroll => { r?; }
            }
            return Ok(());
        }
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let mut tcp = socket.connect(self.server).await?;
        let mut sink = [0u8; 512];
        let run = async {
            match self.attack {
                Attack::Idle => hold(&mut tcp).await,
                Attack::Slowloris => {
                    for b in self.stranger_hello("slow")?.iter() {
                        if tcp.write_all(&[*b]).await.is_err() {
                            break;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            r = tcp.read(&mut sink) => if !matches!(r, Ok(n) if n > 0) { break },
                        }
                    }
                }
                Attack::Garbage => {
                    let mut junk = [0u8; 64];
                    junk[..8].copy_from_slice(&[0, 0, 0, 40, 0xee, 1, 2, 3]);
                    tcp.write_all(&junk).await?;
                    hold(&mut tcp).await;
                }
                Attack::HelloUnknown => {
                    tcp.write_all(&self.stranger_hello("nobody")?).await?;
                    hold(&mut tcp).await;
                }
                Attack::EnrollReplay => {
                    tcp.write_all(&self.replay).await?;
                    hold(&mut tcp).await;
                }
                Attack::EnrollFlood => unreachable!("enrolls through the client library"),
            }
            Ok::<_, anyhow::Error>(())
        };
        tokio::select! {
            _ = stop.cancelled() => Ok(()),
            r = run => r,
        }
    }
}

impl Arsenal {
    /// A HELLO (or, in the encrypted mode, a SEALED_HELLO: what costs the server its two
    /// X25519) for a random id that is not enrolled (`prefix-` and 12 hex digits).
    fn stranger_hello(&self, prefix: &str) -> anyhow::Result<BytesMut> {
        let id = Id::new(&format!("{prefix}-{}", hex::encode(&random_bytes()[..6])))?;
        let mut hello = BytesMut::new();
        let key = SecretKey::from_bytes([1; 32]);
        let limit = crate::proto::DEFAULT_MAX_FRAME_LEN;
        match self.mode {
            crate::proto::Mode::Authenticated => {
                ClientAwaitAuth::start(&id, key, random_bytes(), limit, &mut hello);
            }
            crate::proto::Mode::Encrypted => {
                ClientAwaitAuth::start_sealed(
                    &id,
                    key,
                    &self.server_key,
                    &mut random_bytes(),
                    limit,
                    &mut hello,
                )?;
            }
        }
        Ok(hello)
    }
}

/// Reads (and drops) until the server closes the connection.
async fn hold(tcp: &mut TcpStream) {
    let mut sink = [0u8; 512];
    while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
}

/// Holds `n` attacker connections until `stop`, on `rt`; counts those opened.
fn attack(
    rt: &tokio::runtime::Handle,
    arsenal: Arc<Arsenal>,
    n: usize,
    sources: u8,
    stop: CancellationToken,
    opened: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let (arsenal, stop, opened) = (arsenal.clone(), stop.clone(), opened.clone());
            let source = IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                1,
                1 + (i % sources.max(1) as usize) as u8,
            ));
            rt.spawn(async move {
                while !stop.is_cancelled() {
                    opened.fetch_add(1, Ordering::Relaxed);
                    if arsenal.strike(source, &stop).await.is_err() {
                        // Out of ports or descriptors, or refused: do not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect()
}

/// A runtime shut down without waiting when dropped (dropping one inside another
/// runtime's task would panic).
struct Background(Option<tokio::runtime::Runtime>);

impl Background {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("until dropped").handle()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs the three phases of a flood against `target` with `workers` devices.
pub async fn run(target: &Target, workers: usize, flood: &Flood) -> anyhow::Result<FloodReport> {
    let Kind::Tally(creds, mode) = &target.kind else {
        anyhow::bail!("flood mode measures tallyd only");
    };
    let server: SocketAddr = tokio::net::lookup_host(&creds[0].server)
        .await?
        .next()
        .context("server address")?;
    crate::daemon::raise_fd_limit();
    let arsenal = Arc::new(Arsenal::new(flood, server, *mode, creds[0].server_key).await?);
    eprintln!("calm: {workers} devices for {:?}", flood.duration);
    let calm = devices(target, workers, Instant::now() + flood.duration).await;

    eprintln!(
        "attack: {} {:?} connections from {} addresses",
        flood.attackers, flood.attack, flood.sources
    );
    let stop = CancellationToken::new();
    let opened = Arc::new(AtomicU64::new(0));
    let cpu0 = flood.daemon_pid.map(cpu_seconds).transpose()?;
    let t0 = Instant::now();
    // The attackers run on a runtime of their own (one thread), so that the devices'
    // tasks do not queue behind ten thousand of theirs in this process.
    let attackers = Background(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?,
    ));
    let tasks = attack(
        attackers.handle(),
        arsenal,
        flood.attackers,
        flood.sources,
        stop.clone(),
        opened.clone(),
    );
    // A second to ramp up, then the attack alone; the daemon's CPU and the attacker
    // connections are counted from the first connection.
    tokio::time::sleep(Duration::from_secs(1) + flood.duration).await;
    let conns = opened.load(Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let cpu = match (cpu0, flood.daemon_pid) {
        (Some(before), Some(pid)) if conns > 0 => {
            Some((cpu_seconds(pid)? - before) * 1e6 / conns as f64)
        }
        _ => None,
    };
    eprintln!(
        "flood: the attack and {workers} devices for {:?}",
        flood.duration
    );
    let under = devices(target, workers, Instant::now() + flood.duration).await;
    stop.cancel();
    let stopped = Instant::now();
    let payload = Bytes::from_static(b"ping");
    while reconnect_once(target, 0, Some(device_address(u64::MAX)), &payload)
        .await
        .is_err()
    {
        if stopped.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("no device got in within 60 s of the attack's end");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let recovery_ms = stopped.elapsed().as_millis() as u64;
    for t in tasks {
        let _ = t.await;
    }
    drop(attackers);
    Ok(FloodReport {
        attack: flood.attack,
        attackers: flood.attackers,
        sources: flood.sources,
        attack_conns_per_sec: conns as f64 / secs,
        server_cpu_us_per_attack_conn: cpu,
        p99_ratio: under.p99_us as f64 / calm.p99_us.max(1) as f64,
        calm,
        flood: under,
        recovery_ms,
    })
}
