//! Blocking TCP client: connect, handshake (7), frames in a session (8), polite close (8.6),
//! and enrollment (6) for preparing identities.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::cred::{Credential, Token};
use crate::crypto::*;
use crate::enroll::EnrollClient;
use crate::handshake::{ClientHello, Mode};
use crate::session::{Received, Role, Session};
use crate::wire::*;

/// 7.4: a client waits at least 10 s for each answer before the session.
pub const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// 8.6: our close timeout, as the side that sends CLOSE first (1 to 10 s).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

pub fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))
}

/// Connects, from `source` if given (a loopback address, to spread connections over
/// several sources for a server's per-source limits).
pub fn connect(addr: &SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, Fail> {
    let err = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset => {
            Fail::Truncated(format!("connect to {addr}: {e} before the server's answer"))
        }
        _ => Fail::Local(format!("connect to {addr}: {e}")),
    };
    let s = match source {
        None => TcpStream::connect_timeout(addr, ANSWER_WAIT).map_err(err)?,
        Some(ip) => {
            let sock = socket2::Socket::new(socket2::Domain::for_address(*addr), socket2::Type::STREAM, None)
                .map_err(|e| Fail::Local(format!("socket: {e}")))?;
            sock.bind(&SocketAddr::new(ip, 0).into())
                .map_err(|e| Fail::Local(format!("bind {ip}: {e}")))?;
            sock.connect_timeout(&(*addr).into(), ANSWER_WAIT).map_err(err)?;
            sock.into()
        }
    };
    s.set_nodelay(true).map_err(|e| Fail::Local(format!("TCP_NODELAY: {e}")))?;
    Ok(s)
}

fn write_all(s: &mut TcpStream, b: &[u8]) -> Result<(), Fail> {
    s.write_all(b).map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
            Fail::Truncated(format!("write: {e}"))
        }
        _ => Fail::Local(format!("write: {e}")),
    })
}

/// Reads the server's answer before a session (limit 256), waiting at most 10 s.
fn read_answer(rd: &mut FrameReader<TcpStream>) -> Result<(usize, usize), Fail> {
    rd.inner.set_read_timeout(Some(ANSWER_WAIT)).ok();
    rd.frame(HANDSHAKE_LIMIT).map_err(|e| match e {
        Fail::Local(w) if w == "timeout" => {
            Fail::Truncated("no answer within 10 s (7.4) before the server's answer".into())
        }
        Fail::Truncated(w) => Fail::Truncated(format!("{w} before the server's answer")),
        e => e,
    })
}

/// What a load client needs of a received frame, owned (the payload is not kept).
#[derive(Debug)]
pub enum Event {
    Response { req_seq: u64, status: u16 },
    Request { seq: u64 },
    Ping { seq: u64 },
    Deliver { msg_id: u64, kind: u8 },
    Close { code: u16, reason: String },
    KeyUpdate,
    Other,
}

impl From<&Received<'_>> for Event {
    fn from(r: &Received<'_>) -> Event {
        match *r {
            Received::Response { req_seq, status, .. } => Event::Response { req_seq, status },
            Received::Request { seq, .. } => Event::Request { seq },
            Received::Ping { seq } => Event::Ping { seq },
            Received::Deliver { msg_id, kind, .. } => Event::Deliver { msg_id, kind },
            Received::Close { code, reason } => Event::Close { code, reason: reason.to_string() },
            Received::KeyUpdate => Event::KeyUpdate,
            _ => Event::Other,
        }
    }
}

/// 13.10: BUSY, and a connection refused, reset or ended before the server's first frame,
/// mean "try again later".
pub fn retry_later(e: &Fail) -> bool {
    match e {
        Fail::Refused(6) => true,
        Fail::Truncated(w) => w.ends_with("before the server's answer"),
        _ => false,
    }
}

/// Connects and runs the handshake, retrying what 13.10 says to retry with exponential
/// backoff and jitter (d/2 to d, d = 0.2 s doubling to 5 s) until `give_up`. Returns the
/// client, how many attempts were retried, and when the attempt that succeeded began.
pub fn open_session(
    addr: &SocketAddr,
    source: Option<IpAddr>,
    cred: &Credential,
    mode: Mode,
    limit: u32,
    give_up: Instant,
) -> Result<(Client, u64, Instant), Fail> {
    let mut d = 0.2f64;
    let mut retries = 0;
    loop {
        let t0 = Instant::now();
        let r = connect(addr, source).and_then(|s| handshake(s, cred, mode, limit));
        match r {
            Ok(c) => return Ok((c, retries, t0)),
            Err(e) if retry_later(&e) => {
                let mut b = [0u8; 1];
                random(&mut b);
                let wait = Duration::from_secs_f64(d / 2.0 + d / 2.0 * (b[0] as f64 / 255.0));
                if Instant::now() + wait >= give_up {
                    return Err(e);
                }
                retries += 1;
                std::thread::sleep(wait);
                d = (d * 2.0).min(5.0);
            }
            Err(e) => return Err(e),
        }
    }
}

/// A client in a session.
pub struct Client {
    pub rd: FrameReader<TcpStream>,
    pub wr: TcpStream,
    pub sess: Session,
    /// Bytes sealed and not yet written.
    pub out: Vec<u8>,
    pub keepalive: Duration,
}

/// Runs the handshake (7.1 or 7.7). CLIENT_FINISH is left in `out`, so that the caller may
/// write it together with its first frames (7.1 step 3).
pub fn handshake(stream: TcpStream, cred: &Credential, mode: Mode, limit: u32) -> Result<Client, Fail> {
    let mut wr = stream.try_clone().map_err(|e| Fail::Local(format!("socket: {e}")))?;
    let mut rd = FrameReader::new(stream);
    let ch = match mode {
        Mode::Authenticated => ClientHello::authenticated(cred.id.as_bytes(), cred.key, random32(), limit),
        Mode::Encrypted => ClientHello::encrypted(cred.id.as_bytes(), cred.key, cred.s_pub, random32(), limit)?,
    };
    write_all(&mut wr, ch.hello()).map_err(|e| match e {
        Fail::Truncated(w) => Fail::Truncated(format!("{w} before the server's answer")),
        e => e,
    })?;
    let r = read_answer(&mut rd)?;
    let est = ch.on_auth(rd.bytes(r))?;
    let sess = Session::new(Role::Client, mode, &est.keys, limit, est.server_limit);
    Ok(Client {
        rd,
        wr,
        sess,
        out: est.client_finish.clone(),
        keepalive: Duration::from_millis(est.keepalive_ms as u64),
    })
}

impl Client {
    /// Seals a frame into `out`, preceded by a KEY_UPDATE when 8.7 requires one.
    pub fn queue(&mut self, ty: u8, fields: &[&[u8]], now: Instant) -> Result<u64, Fail> {
        if ty != CLOSE && self.sess.key_update_due(now) {
            self.sess.seal(KEY_UPDATE, &[], &mut self.out)?;
        }
        self.sess.seal(ty, fields, &mut self.out)
    }

    pub fn flush(&mut self) -> Result<(), Fail> {
        if !self.out.is_empty() {
            let r = write_all(&mut self.wr, &self.out);
            self.out.clear();
            r?;
        }
        Ok(())
    }

    /// The next whole frame already buffered, opened (8.3), if there is one.
    pub fn next_buffered(&mut self) -> Result<Option<Event>, Fail> {
        match self.rd.try_frame(self.sess.recv_limit)? {
            None => Ok(None),
            Some(r) => Ok(Some(Event::from(&self.sess.open(self.rd.bytes_mut(r))?))),
        }
    }

    /// The next frame, reading as needed (the socket's read timeout applies).
    pub fn next(&mut self) -> Result<Event, Fail> {
        let r = self.rd.frame(self.sess.recv_limit)?;
        Ok(Event::from(&self.sess.open(self.rd.bytes_mut(r))?))
    }

    /// The server's part of the session that a load client must still honour: answers
    /// PING, a server REQUEST (UNAVAILABLE: this client has no handler, 8.4), a CLOSE
    /// (8.6 item 1); a DELIVER ends the session (8.8: declined, it stays queued). Returns
    /// the CLOSE code if the server closed.
    pub fn answer_server(&mut self, r: &Event, now: Instant) -> Result<Option<u16>, Fail> {
        match *r {
            Event::Ping { seq } => {
                self.queue(PONG, &[&seq.to_be_bytes()], now)?;
            }
            Event::Request { seq } => {
                let mut f = [0u8; 10];
                f[..8].copy_from_slice(&seq.to_be_bytes());
                f[8..].copy_from_slice(&1u16.to_be_bytes());
                self.queue(RESPONSE, &[&f], now)?;
            }
            Event::Deliver { msg_id, kind } => {
                // Every ACK is final (8.8): a load client that does not handle queued
                // messages must not consume them. It declines the only way 8.8 allows,
                // by ending the session: the message stays queued.
                self.queue(CLOSE, &[&C_NORMAL.to_be_bytes()], now)?;
                self.flush().ok();
                return Err(Fail::Local(format!(
                    "the server delivered queued {} {msg_id} (spec 8.8): this identity has messages \
                     queued for it, which a load client must not acknowledge; session ended, they stay queued \
                     (use identities with empty queues)",
                    if kind == 1 { "request" } else { "message" }
                )));
            }
            Event::Close { code, .. } => {
                if !self.sess.sent_close {
                    self.queue(CLOSE, &[&C_NORMAL.to_be_bytes()], now)?;
                    self.flush().ok();
                }
                return Ok(Some(code));
            }
            _ => {}
        }
        Ok(None)
    }

    /// After a failure of 8.3 detected here: CLOSE with its code, unless the failure was an
    /// ERROR or a cut (then nothing), then close.
    pub fn abort(&mut self, e: &Fail) {
        if let Some(code) = e.session_close_code() {
            if !self.sess.sent_close {
                let mut out = Vec::new();
                let mut f = code.to_be_bytes().to_vec();
                f.extend_from_slice(e.name().as_bytes());
                if self.sess.seal(CLOSE, &[&f], &mut out).is_ok() {
                    let _ = self.wr.write_all(&out);
                    let _ = self.wr.shutdown(Shutdown::Write);
                }
            }
        }
    }

    /// 8.6: CLOSE (unless sent), then frames until the server's CLOSE or EOF, at most the
    /// close timeout; frames meanwhile are still checked (RESPONSEs answer pending requests,
    /// KEY_UPDATE applies). Then shut down our direction, read to EOF (bounded), close.
    /// Returns the server's CLOSE code, or why the end was not orderly.
    pub fn close(mut self) -> Result<u16, Fail> {
        let now = Instant::now();
        if !self.sess.sent_close {
            self.queue(CLOSE, &[&C_NORMAL.to_be_bytes()], now)?;
        }
        self.flush()?;
        let deadline = now + CLOSE_TIMEOUT;
        let mut result = Err(Fail::Truncated("close timeout passed without the server's CLOSE".into()));
        if self.sess.received_close {
            result = Ok(C_NORMAL);
        } else {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                self.rd.inner.set_read_timeout(Some(left)).ok();
                let r = match self.rd.frame(self.sess.recv_limit) {
                    Ok(r) => r,
                    Err(Fail::Local(w)) if w == "timeout" => break,
                    Err(e) => {
                        result = Err(match e {
                            Fail::Truncated(w) => Fail::Truncated(format!("{w} before the server's CLOSE")),
                            e => e,
                        });
                        break;
                    }
                };
                match self.sess.open(self.rd.bytes_mut(r)) {
                    Ok(Received::Close { code, .. }) => {
                        result = Ok(code);
                        break;
                    }
                    Ok(_) => {} // answers are matched; anything else is dropped (8.6 item 2)
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        // 8.6 item 3.
        let _ = self.wr.shutdown(Shutdown::Write);
        let end = Instant::now() + CLOSE_TIMEOUT;
        let mut sink = [0u8; 4096];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.rd.inner.set_read_timeout(Some(left)).ok();
            match self.rd.inner.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        result
    }
}

/// Enrolls `id` with `token` (6.2, 6.4). BUSY, and a connection that ends before the
/// server's answer to ENROLL_INIT, are retried with backoff (13.10); nothing is retried
/// after ENROLL_CONFIRM was sent.
pub fn enroll(addr: &SocketAddr, server: &str, token: &Token, id: &str) -> Result<Credential, String> {
    let mut delay = 0.2f64;
    for attempt in 0.. {
        match enroll_once(addr, token, id) {
            Ok(k) => return Ok(Credential { id: id.to_string(), key: k, server: server.to_string(), s_pub: token.s_pub }),
            Err((e, false)) if attempt < 8 && retry_later(&e) => {
                let mut r = [0u8; 1];
                random(&mut r);
                let wait = delay / 2.0 + delay / 2.0 * (r[0] as f64 / 255.0);
                std::thread::sleep(Duration::from_secs_f64(wait));
                delay = (delay * 2.0).min(5.0);
            }
            Err((e, confirmed)) => {
                return Err(if confirmed {
                    format!("enrollment of {id} is UNCERTAIN (6.4): {e}; the server may have stored it")
                } else {
                    format!("enrollment of {id} failed: {e}")
                })
            }
        }
    }
    unreachable!()
}

fn enroll_once(addr: &SocketAddr, token: &Token, id: &str) -> Result<Key, (Fail, bool)> {
    let s = connect(addr, None).map_err(|e| (e, false))?;
    let mut wr = s.try_clone().map_err(|e| (Fail::Local(e.to_string()), false))?;
    let mut rd = FrameReader::new(s);
    let ec = EnrollClient::new(id.as_bytes(), token, random32());
    write_all(&mut wr, &ec.init).map_err(|e| (e, false))?;
    let r = read_answer(&mut rd).map_err(|e| (e, false))?;
    let conf = ec.on_reply(rd.bytes(r)).map_err(|e| (e, false))?;
    write_all(&mut wr, &conf.confirm).map_err(|e| (e, true))?;
    let r = read_answer(&mut rd).map_err(|e| (e, true))?;
    let (k, _) = conf.on_done(rd.bytes(r)).map_err(|e| (e, true))?;
    let _ = wr.shutdown(Shutdown::Write);
    rd.inner.set_read_timeout(Some(Duration::from_secs(1))).ok();
    let mut sink = [0u8; 256];
    while let Ok(n) = rd.inner.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
    Ok(k)
}
