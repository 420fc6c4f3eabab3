//! `tally conformance`: the rules of `spec/PROTOCOL.md` that one end can observe of the
//! other, checked against a running implementation. `server` plays a (sometimes
//! misbehaving) client against someone's server; `client` plays a misbehaving server
//! to someone's client and reports what it accepted. One line per check, with the spec
//! section; the exit status says whether all passed.
//!
//! Blocking sockets with deadlines: every check is one or two connections, in order.

pub mod client;
pub mod server;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::proto::{decode_frame, Body, Session, SessionFrame};

/// How a check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The rule held.
    Pass,
    /// The rule was broken: what was seen.
    Fail(String),
    /// Not checked, and why (a precondition failed, or an option was not given).
    Skip(String),
}

/// One rule, checked.
#[derive(Debug, Clone)]
pub struct Check {
    /// The spec section that states the rule.
    pub section: &'static str,
    /// The rule, as a sentence.
    pub rule: &'static str,
    /// What happened.
    pub outcome: Outcome,
    /// How long it took.
    pub took: Duration,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (word, detail) = match &self.outcome {
            Outcome::Pass => ("ok  ", String::new()),
            Outcome::Fail(why) => ("FAIL", format!(": {why}")),
            Outcome::Skip(why) => ("skip", format!(": {why}")),
        };
        write!(f, "{word}  §{:<5} {}{detail}", self.section, self.rule)?;
        if self.took >= Duration::from_millis(500) {
            write!(f, " ({:.1} s)", self.took.as_secs_f64())?;
        }
        Ok(())
    }
}

/// Prints the checks and a summary; returns whether none failed.
pub fn report(checks: &[Check], out: &mut impl Write) -> std::io::Result<bool> {
    for c in checks {
        writeln!(out, "{c}")?;
    }
    let failed = checks
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Fail(_)))
        .count();
    let skipped = checks
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Skip(_)))
        .count();
    let passed = checks.len() - failed - skipped;
    writeln!(out, "{passed} passed, {failed} failed, {skipped} skipped")?;
    Ok(failed == 0)
}

/// Turns a check's body into an outcome: `Err` is a failure, with its message.
fn outcome(r: Result<Outcome, String>) -> Outcome {
    r.unwrap_or_else(Outcome::Fail)
}

/// What a connection read.
#[derive(Debug)]
pub(crate) enum Read2 {
    Frame(Bytes),
    Eof,
    Timeout,
}

/// A TCP connection that reads whole frames, with a deadline per read.
pub(crate) struct Conn {
    pub tcp: TcpStream,
    buf: BytesMut,
}

impl Conn {
    pub fn new(tcp: TcpStream) -> Conn {
        let _ = tcp.set_nodelay(true);
        Conn {
            tcp,
            buf: BytesMut::new(),
        }
    }

    pub fn connect(addr: &str) -> Result<Conn, String> {
        let tcp = TcpStream::connect(addr).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        Ok(Conn::new(tcp))
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.tcp
            .write_all(bytes)
            .map_err(|e| format!("sending: {e}"))
    }

    /// The next frame of at most `limit` bytes (length field), or EOF, or nothing
    /// before `timeout`. A length above `limit` is an error naming it.
    pub fn read(&mut self, limit: u32, timeout: Duration) -> Result<Read2, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match decode_frame(&mut self.buf, limit) {
                Ok(Some(frame)) => return Ok(Read2::Frame(frame)),
                Ok(None) => {}
                Err(e) => return Err(format!("a frame the peer should not send: {e}")),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Read2::Timeout);
            }
            let _ = self.tcp.set_read_timeout(Some(left));
            let mut chunk = [0u8; 4096];
            match self.tcp.read(&mut chunk) {
                Ok(0) => return Ok(Read2::Eof),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(Read2::Timeout)
                }
                Err(e) if crate::wire::is_cut(&e) => return Ok(Read2::Eof),
                Err(e) => return Err(format!("reading: {e}")),
            }
        }
    }

    /// A frame, or an error saying what came instead.
    pub fn frame(&mut self, limit: u32, timeout: Duration, what: &str) -> Result<Bytes, String> {
        match self.read(limit, timeout)? {
            Read2::Frame(f) => Ok(f),
            Read2::Eof => Err(format!("the connection ended where {what} was due")),
            Read2::Timeout => Err(format!("no {what} within {} s", timeout.as_secs_f64())),
        }
    }
}

/// Seals `body` with `session` (for frames the other side must accept).
pub(crate) fn seal(session: &mut Session, body: &Body) -> Vec<u8> {
    let mut out = BytesMut::new();
    session
        .seal(body, &mut out)
        .expect("a frame within the limits");
    out.to_vec()
}

/// A session frame with any sequence number and fields, tagged with `session`'s send
/// key: what a peer that breaks the sequence rules would send.
pub(crate) fn forge(session: &Session, ty: u8, seq: u64, fields: &[u8]) -> Vec<u8> {
    session.forge_for_testing(ty, seq, fields)
}

/// RESPONSE fields: `req_seq`, `status`, payload.
pub(crate) fn response_fields(req_seq: u64, status: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = req_seq.to_be_bytes().to_vec();
    f.extend_from_slice(&status.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Opens a session frame, naming what went wrong.
pub(crate) fn open(session: &mut Session, frame: Bytes) -> Result<SessionFrame, String> {
    session
        .open(frame)
        .map_err(|e| format!("a frame that does not verify: {e}"))
}

/// 32 bytes from the system's random source.
pub(crate) fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).expect("the system's random source");
    b
}

/// A fresh id no server has seen: `conformance-<16 hex>`.
pub fn fresh_id(prefix: &str) -> crate::proto::Id {
    let r = random32();
    crate::proto::Id::new(&format!("{prefix}-{}", hex::encode(&r[..8]))).expect("a valid id")
}
