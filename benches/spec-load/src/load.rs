//! `spec-load run` and `spec-load reconnect`.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::cred::Credential;
use crate::handshake::Mode;
use crate::net::{self, Client, Event};
use crate::wire::*;

/// Log-linear histogram of microseconds: exact below 256, then 128 sub-buckets per power of
/// two (relative error under 0.8%).
#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    pub n: u64,
}

impl Hist {
    pub fn new() -> Self {
        Hist { counts: vec![0; 256 + 56 * 128], n: 0 }
    }
    fn index(v: u64) -> usize {
        if v < 256 {
            return v as usize;
        }
        let b = 63 - v.leading_zeros() as usize; // >= 8
        256 + (b - 8) * 128 + ((v >> (b - 7)) & 127) as usize
    }
    fn value(i: usize) -> f64 {
        if i < 256 {
            return i as f64;
        }
        let b = (i - 256) / 128 + 8;
        let sub = ((i - 256) % 128) as u64 + 128;
        let lo = sub << (b - 7);
        let width = 1u64 << (b - 7);
        lo as f64 + (width as f64 - 1.0) / 2.0
    }
    pub fn add(&mut self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        self.counts[Self::index(us)] += 1;
        self.n += 1;
    }
    pub fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.n += o.n;
    }
    pub fn median(&self) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let rank = self.n.div_ceil(2);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::value(i));
            }
        }
        None
    }
}

pub struct Opts {
    pub addr: SocketAddr,
    pub creds: Vec<Credential>,
    pub mode: Mode,
    pub limit: u32,
    pub seconds: f64,
    pub conns: usize,
    pub depth: usize,
    pub size: usize,
    /// Spread connections over this many loopback source addresses (0: the system's).
    pub sources: usize,
    /// The server's processes, whose CPU time per operation is reported
    /// (`--server-pid`, comma-separated).
    pub server_pids: Vec<u32>,
    /// `--key-update-frames`: 0 for the default of 8.7.
    pub key_update_frames: u64,
}

impl Opts {
    fn source(&self, i: usize) -> Option<IpAddr> {
        (self.sources > 0).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % self.sources) as u8)))
    }
}

pub fn fatal(ctx: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("spec-load: {ctx}: {e}");
    std::process::exit(1)
}

fn hint(e: &Fail) -> &'static str {
    match e {
        Fail::Refused(3) => " (wrong key, unknown or revoked id, or a credential of another server)",
        Fail::BadTag => " (wrong key, unknown or revoked id, or not this credential's server: 7.2 row 5)",
        Fail::Refused(7) => " (the identity already has a live session: give each connection its own identity)",
        Fail::Refused(10) => " (the server's encryption policy does not accept this mode: try --mode)",
        Fail::Refused(6) => " (the server is at a connection limit)",
        Fail::Truncated(_) => " (the server closed or reset the connection: a per-source connection limit?)",
        _ => "",
    }
}

struct Shared {
    ready: AtomicUsize,
    go: AtomicBool,
    start: OnceLock<Instant>,
}

#[derive(Default)]
struct Tally {
    statuses: [u64; 6],
    server_requests: u64,
    deliveries: u64,
    retries: u64,
    key_updates: u64,
}

impl Tally {
    fn status(&mut self, s: u16) {
        self.statuses[(s as usize).min(5)] += 1;
    }
    fn merge(&mut self, o: &Tally) {
        for i in 0..6 {
            self.statuses[i] += o.statuses[i];
        }
        self.server_requests += o.server_requests;
        self.deliveries += o.deliveries;
        self.retries += o.retries;
        self.key_updates += o.key_updates;
    }
    fn report(&self) {
        let s = &self.statuses;
        if s[1..].iter().any(|&x| x > 0) {
            eprintln!(
                "spec-load: note: RESPONSE statuses: OK {}, UNAVAILABLE {}, BACKEND_ERROR {}, TIMEOUT {}, REFUSED {}, other {}",
                s[0], s[1], s[2], s[3], s[4], s[5]
            );
        }
        if self.key_updates > 0 {
            eprintln!("spec-load: note: the server updated its sending key {} times (8.7)", self.key_updates);
        }
        if self.retries > 0 {
            eprintln!(
                "spec-load: note: {} connection attempts were refused (BUSY, or reset or closed before the server's \
                 first frame: a connection limit, e.g. per source) and retried after a backoff (13.10); \
                 lift the server's limits or use --sources N for figures without them",
                self.retries
            );
        }
        if self.server_requests + self.deliveries > 0 {
            eprintln!(
                "spec-load: note: the server sent {} REQUESTs (answered UNAVAILABLE) and {} DELIVERs (declined: session ended)",
                self.server_requests, self.deliveries
            );
        }
    }
}

/// Handles one received frame in a load loop. Returns the answered request's seq.
fn on_event(cl: &mut Client, ev: &Event, now: Instant, t: &mut Tally, who: &str) -> Option<u64> {
    match *ev {
        Event::Response { req_seq, status } => {
            t.status(status);
            return Some(req_seq);
        }
        Event::Request { .. } => t.server_requests += 1,
        Event::Deliver { .. } => t.deliveries += 1,
        Event::KeyUpdate => t.key_updates += 1,
        _ => {}
    }
    match cl.answer_server(ev, now) {
        Ok(Some(code)) => {
            let reason = match ev {
                Event::Close { reason, .. } => reason.as_str(),
                _ => "",
            };
            let _ = cl.flush();
            fatal(who, format!("the server closed the session: CLOSE {} ({code}) {reason:?}", close_code_name(code)))
        }
        Ok(None) => None,
        Err(e) => fatal(who, e),
    }
}

/// Reads once from the socket; a timeout means the server is gone (8.5 item 3).
fn read_more(cl: &mut Client, who: &str, now: Instant) -> Instant {
    match cl.rd.fill() {
        Ok(0) => fatal(who, "truncated: the server ended the connection without CLOSE (8.6)"),
        Ok(_) => Instant::now(),
        Err(Fail::Local(w)) if w == "timeout" => {
            let _ = cl.queue(CLOSE, &[&C_IDLE_TIMEOUT.to_be_bytes()], now);
            let _ = cl.flush();
            fatal(who, "the server sent nothing for 2 keepalive intervals (8.5): closed IDLE_TIMEOUT")
        }
        Err(e) => fatal(who, e),
    }
}

fn run_conn(i: usize, o: Arc<Opts>, sh: Arc<Shared>) -> (u64, Hist, Tally) {
    let cred = &o.creds[i];
    let who = format!("connection {i} ({})", cred.id);
    let give_up = Instant::now() + Duration::from_secs(120);
    let (mut cl, retries, _) = net::open_session(&o.addr, o.source(i), cred, o.mode, o.limit, give_up)
        .unwrap_or_else(|e| fatal(&who, format!("handshake: {e}{}", hint(&e))));
    let len = cl.sess.frame_length(o.size);
    if len > cl.sess.send_limit as usize {
        fatal(
            &who,
            format!(
                "a {}-byte payload makes a REQUEST of length {len}, above the server's limit {}",
                o.size, cl.sess.send_limit
            ),
        );
    }
    if o.key_update_frames > 0 {
        cl.sess.key_update_frames = o.key_update_frames;
        cl.sess.key_update_always = true;
    }
    cl.flush().unwrap_or_else(|e| fatal(&who, e)); // CLIENT_FINISH
    // 8.5: I = K; the server is gone after 2 I without a byte.
    let interval = cl.keepalive;
    cl.rd.inner.set_read_timeout(Some(interval * 2)).ok();
    sh.ready.fetch_add(1, Ordering::SeqCst);
    let mut last_send = Instant::now();
    while !sh.go.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
        if last_send.elapsed() >= interval / 2 && cl.sess.pending_pings() == 0 {
            let now = Instant::now();
            cl.queue(PING, &[], now).and_then(|_| cl.flush()).unwrap_or_else(|e| fatal(&who, e));
            last_send = now;
        }
    }
    let deadline = *sh.start.get().unwrap() + Duration::from_secs_f64(o.seconds);
    let payload = vec![0x5au8; o.size];
    let mut hist = Hist::new();
    let mut tally = Tally { retries, ..Tally::default() };
    let mut count = 0u64;
    // Requests written, with their write times, in seq order.
    let mut inflight: VecDeque<(u64, Instant)> = VecDeque::with_capacity(o.depth + 1);
    let mut fresh: Vec<u64> = Vec::with_capacity(o.depth);
    let mut now = Instant::now();
    for _ in 0..o.depth {
        fresh.push(cl.queue(REQUEST, &[&payload], now).unwrap_or_else(|e| fatal(&who, e)));
    }
    loop {
        if !cl.out.is_empty() {
            let t = Instant::now();
            cl.flush().unwrap_or_else(|e| fatal(&who, format!("{e}{}", hint(&e))));
            inflight.extend(fresh.drain(..).map(|s| (s, t)));
        }
        if inflight.is_empty() && now >= deadline {
            break;
        }
        // Every whole frame already read, then one more read.
        loop {
            let ev = match cl.next_buffered() {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(e) => {
                    cl.abort(&e);
                    fatal(&who, format!("{e}{}", hint(&e)))
                }
            };
            if let Some(seq) = on_event(&mut cl, &ev, now, &mut tally, &who) {
                let pos = inflight.iter().position(|&(s, _)| s == seq).unwrap_or_else(|| {
                    fatal(&who, format!("internal: RESPONSE to {seq} accepted but not in flight"))
                });
                let (_, sent) = inflight.remove(pos).unwrap();
                if now < deadline {
                    count += 1;
                    hist.add(now.saturating_duration_since(sent));
                    fresh.push(cl.queue(REQUEST, &[&payload], now).unwrap_or_else(|e| fatal(&who, e)));
                }
            }
        }
        if !cl.out.is_empty() {
            continue;
        }
        if inflight.is_empty() && now >= deadline {
            break;
        }
        now = read_more(&mut cl, &who, now);
    }
    match cl.close() {
        Ok(C_NORMAL) => {}
        Ok(code) => eprintln!("spec-load: {who}: the server answered our CLOSE with CLOSE {} ({code})", close_code_name(code)),
        Err(e) => eprintln!("spec-load: {who}: the session did not end in order: {e}"),
    }
    (count, hist, tally)
}

fn check_identities(o: &Opts, n: usize, what: &str) {
    if o.creds.len() < n {
        fatal(
            "identities",
            format!(
                "{n} {what} need {n} distinct identities (one session per identity, spec 7.3), got {} credential(s)",
                o.creds.len()
            ),
        );
    }
    let mut ids: Vec<&str> = o.creds[..n].iter().map(|c| c.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    if ids.len() < n {
        fatal("identities", "the credentials given name the same id more than once (spec 7.3)");
    }
}

/// A JSON number (finite; integers without a fraction).
fn num(x: f64) -> String {
    serde_json::Value::from(x).to_string()
}

fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// `n` threads named `name-i` with small stacks, thread `i` running what `make(i)` gives.
fn spawn_each<T, F>(n: usize, name: &str, mut make: impl FnMut(usize) -> F) -> Vec<std::thread::JoinHandle<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    (0..n)
        .map(|i| {
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .stack_size(256 * 1024)
                .spawn(make(i))
                .unwrap_or_else(|e| fatal("spawn", e))
        })
        .collect()
}

pub fn run(o: Opts) {
    check_identities(&o, o.conns, "connections");
    let o = Arc::new(o);
    let sh = Arc::new(Shared { ready: AtomicUsize::new(0), go: AtomicBool::new(false), start: OnceLock::new() });
    let handles = spawn_each(o.conns, "conn", |i| {
        let (o, sh) = (o.clone(), sh.clone());
        move || run_conn(i, o, sh)
    });
    let t0 = Instant::now();
    while sh.ready.load(Ordering::SeqCst) < o.conns {
        std::thread::sleep(Duration::from_millis(1));
        if t0.elapsed() > Duration::from_secs(120) {
            fatal("run", "not every connection finished its handshake within 120 s");
        }
    }
    eprintln!("spec-load: {} sessions up in {:.0} ms; measuring for {} s", o.conns, t0.elapsed().as_secs_f64() * 1e3, o.seconds);
    let cpu = ServerCpu::start(&o.server_pids);
    sh.start.set(Instant::now()).unwrap();
    sh.go.store(true, Ordering::Release);
    std::thread::sleep(Duration::from_secs_f64(o.seconds));
    let cpu = cpu.map(ServerCpu::end);
    let mut hist = Hist::new();
    let mut tally = Tally::default();
    let mut total = 0;
    for h in handles {
        let (c, hh, t) = h.join().unwrap_or_else(|_| fatal("run", "a connection thread panicked"));
        total += c;
        hist.merge(&hh);
        tally.merge(&t);
    }
    tally.report();
    println!(
        "{{\"mode\":\"{}\",\"conns\":{},\"depth\":{},\"size\":{},\"seconds\":{},\"requests\":{},\"rate\":{},\"latency_us_median\":{}{}}}",
        o.mode.name(),
        o.conns,
        o.depth,
        o.size,
        num(o.seconds),
        total,
        num(r1(total as f64 / o.seconds)),
        hist.median().map_or("null".into(), |m| num(r1(m))),
        ServerCpu::field(&cpu, total)
    );
}

fn reconnect_worker(i: usize, o: Arc<Opts>, start: Instant) -> (u64, Hist, Tally) {
    let cred = &o.creds[i];
    let who = format!("worker {i} ({})", cred.id);
    let deadline = start + Duration::from_secs_f64(o.seconds);
    let payload = [0x5au8; 64];
    let mut hist = Hist::new();
    let mut tally = Tally::default();
    let mut count = 0;
    while Instant::now() < deadline {
        let t0;
        let mut cl = match net::open_session(&o.addr, o.source(i), cred, o.mode, o.limit, deadline) {
            Ok((cl, retries, t)) => {
                tally.retries += retries;
                t0 = t;
                cl
            }
            Err(e) if net::retry_later(&e) => {
                tally.retries += 1;
                break; // the window ended while backing off
            }
            Err(e) => fatal(&who, format!("handshake: {e}{}", hint(&e))),
        };
        // The request goes right behind CLIENT_FINISH (7.1 step 3), in the same write.
        let seq = cl.queue(REQUEST, &[&payload], t0).unwrap_or_else(|e| fatal(&who, e));
        cl.flush().unwrap_or_else(|e| fatal(&who, format!("{e}{}", hint(&e))));
        cl.rd.inner.set_read_timeout(Some(net::ANSWER_WAIT.max(cl.keepalive * 2))).ok();
        loop {
            let ev = match cl.next() {
                Ok(ev) => ev,
                Err(e) => {
                    cl.abort(&e);
                    fatal(&who, format!("{e}{}", hint(&e)))
                }
            };
            let now = Instant::now();
            if let Some(s) = on_event(&mut cl, &ev, now, &mut tally, &who) {
                if s != seq {
                    fatal(&who, format!("internal: answer to {s}, expected {seq}"));
                }
                if now < deadline {
                    count += 1;
                    hist.add(now - t0);
                }
                break;
            }
            cl.flush().unwrap_or_else(|e| fatal(&who, e));
        }
        match cl.close() {
            Ok(C_NORMAL) => {}
            Ok(code) => fatal(&who, format!("the server answered our CLOSE with CLOSE {} ({code})", close_code_name(code))),
            Err(e) => fatal(&who, format!("the session did not end in order: {e}")),
        }
    }
    (count, hist, tally)
}

pub fn reconnect(o: Opts) {
    check_identities(&o, o.conns, "workers");
    let o = Arc::new(o);
    let cpu = ServerCpu::start(&o.server_pids);
    let start = Instant::now();
    let handles = spawn_each(o.conns, "worker", |i| {
        let o = o.clone();
        move || reconnect_worker(i, o, start)
    });
    std::thread::sleep(Duration::from_secs_f64(o.seconds));
    let cpu = cpu.map(ServerCpu::end);
    let mut hist = Hist::new();
    let mut tally = Tally::default();
    let mut total = 0;
    for h in handles {
        let (c, hh, t) = h.join().unwrap_or_else(|_| fatal("reconnect", "a worker thread panicked"));
        total += c;
        hist.merge(&hh);
        tally.merge(&t);
    }
    tally.report();
    println!(
        "{{\"mode\":\"{}\",\"workers\":{},\"seconds\":{},\"reconnects\":{},\"rate\":{},\"latency_us_median\":{}{}}}",
        o.mode.name(),
        o.conns,
        num(o.seconds),
        total,
        num(r1(total as f64 / o.seconds)),
        hist.median().map_or("null".into(), |m| num(r1(m))),
        ServerCpu::field(&cpu, total)
    );
}

/// CPU time (user + system) of the processes `pids` so far, in seconds (Linux
/// `/proc/PID/stat`, fields 14 and 15, in clock ticks of 1/100 s).
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_else(|e| fatal("--server-pid", format!("process {pid}: {e}")));
            // The command name may hold spaces: the fields follow its closing parenthesis.
            let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // utime and stime are fields 14 and 15 of the line: 11 and 12 after the name.
            (ticks(11) + ticks(12)) / 100.0
        })
        .sum()
}

/// The server's CPU over the measured window, sampled by the main thread at its start
/// and at its end (`--server-pid`).
pub struct ServerCpu {
    pids: Vec<u32>,
    start: f64,
}

impl ServerCpu {
    pub fn start(pids: &[u32]) -> Option<ServerCpu> {
        (!pids.is_empty()).then(|| ServerCpu { pids: pids.to_vec(), start: cpu_seconds(pids) })
    }
    /// Microseconds of server CPU per operation, as a JSON field (with its comma).
    pub fn field(this: &Option<(ServerCpu, f64)>, ops: u64) -> String {
        match this {
            Some((c, end)) if ops > 0 => {
                let us = (end - c.start) * 1e6 / ops as f64;
                format!(",\"server_cpu_us_per_op\":{}", num((us * 100.0).round() / 100.0))
            }
            _ => String::new(),
        }
    }
    pub fn end(self) -> (ServerCpu, f64) {
        let end = cpu_seconds(&self.pids);
        (self, end)
    }
}

/// Requests answered within a window that closes at `deadline`, in one connection to
/// a plain echo (`u32 length | u64 id | payload`, the benchmark's limit: no protocol).
fn plain_conn(i: usize, o: Arc<Opts>, sh: Arc<Shared>) -> (u64, Hist) {
    use std::io::{Read, Write};
    let who = format!("plain connection {i}");
    let mut s = net::connect(&o.addr, o.source(i)).unwrap_or_else(|e| fatal(&who, e));
    s.set_nodelay(true).ok();
    sh.ready.fetch_add(1, Ordering::SeqCst);
    while !sh.go.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let deadline = *sh.start.get().unwrap() + Duration::from_secs_f64(o.seconds);
    let frame_len = 4 + 8 + o.size;
    let frame = |id: u64| {
        let mut f = Vec::with_capacity(frame_len);
        f.extend_from_slice(&((8 + o.size) as u32).to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        f.resize(frame_len, 0x5a);
        f
    };
    let mut hist = Hist::new();
    let mut count = 0u64;
    let mut next_id = 0u64;
    let mut inflight: VecDeque<(u64, Instant)> = VecDeque::with_capacity(o.depth);
    let mut out = Vec::new();
    let t = Instant::now();
    for _ in 0..o.depth {
        out.extend_from_slice(&frame(next_id));
        inflight.push_back((next_id, t));
        next_id += 1;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0usize;
    loop {
        if !out.is_empty() {
            s.write_all(&out).unwrap_or_else(|e| fatal(&who, e));
            out.clear();
        }
        if inflight.is_empty() {
            break;
        }
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = s.read(&mut buf[have..]).unwrap_or_else(|e| fatal(&who, e));
        if n == 0 {
            fatal(&who, "the echo closed the connection");
        }
        have += n;
        let now = Instant::now();
        let mut at = 0;
        while have - at >= frame_len {
            let id = u64::from_be_bytes(buf[at + 4..at + 12].try_into().unwrap());
            at += frame_len;
            let (want, sent) = inflight.pop_front().unwrap_or_else(|| fatal(&who, "an echo of nothing sent"));
            if id != want {
                fatal(&who, format!("echo of frame {id}, expected {want}"));
            }
            if now < deadline {
                count += 1;
                hist.add(now - sent);
                out.extend_from_slice(&frame(next_id));
                inflight.push_back((next_id, now));
                next_id += 1;
            }
        }
        buf.copy_within(at..have, 0);
        have -= at;
    }
    (count, hist)
}

/// `spec-load plain`: the same load as `run` against a plain echo, for the ratio.
pub fn plain(o: Opts) {
    let o = Arc::new(o);
    let sh = Arc::new(Shared { ready: AtomicUsize::new(0), go: AtomicBool::new(false), start: OnceLock::new() });
    let handles = spawn_each(o.conns, "plain", |i| {
        let (o, sh) = (o.clone(), sh.clone());
        move || plain_conn(i, o, sh)
    });
    while sh.ready.load(Ordering::SeqCst) < o.conns {
        std::thread::sleep(Duration::from_millis(1));
    }
    let cpu = ServerCpu::start(&o.server_pids);
    sh.start.set(Instant::now()).unwrap();
    sh.go.store(true, Ordering::Release);
    std::thread::sleep(Duration::from_secs_f64(o.seconds));
    let cpu = cpu.map(ServerCpu::end);
    let mut hist = Hist::new();
    let mut total = 0;
    for h in handles {
        let (c, hh) = h.join().unwrap_or_else(|_| fatal("plain", "a connection thread panicked"));
        total += c;
        hist.merge(&hh);
    }
    println!(
        "{{\"mode\":\"plain\",\"conns\":{},\"depth\":{},\"size\":{},\"seconds\":{},\"requests\":{},\"rate\":{},\"latency_us_median\":{}{}}}",
        o.conns,
        o.depth,
        o.size,
        num(o.seconds),
        total,
        num(r1(total as f64 / o.seconds)),
        hist.median().map_or("null".into(), |m| num(r1(m))),
        ServerCpu::field(&cpu, total)
    );
}
