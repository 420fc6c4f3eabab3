//! One established session, all of spec section 8 in one place, sans-IO.
//!
//! A [`Connection`] owns everything a session's two ends must agree on: the sequence
//! numbers and tags ([`Session`]), the requests and pings awaiting an answer and the
//! strict matching of answers to them (8.4), the requests of the peer this side still
//! has to answer, the keepalive and idle deadlines (8.5), the close handshake and
//! truncation (8.6), and the 2^64 − 1 rule (8.1). The same type serves the client and
//! the server role.
//!
//! It does no I/O and reads no clock (after quinn-proto): the driver feeds it the bytes
//! it read ([`Connection::handle_input`], [`Connection::handle_eof`]) and the time
//! ([`Connection::handle_timeout`]), and takes from it the bytes to write
//! ([`Connection::poll_transmit`]), what happened ([`Connection::poll_event`]) and when
//! to call again ([`Connection::poll_timeout`]). Time is a [`Duration`] since an origin
//! of the driver's choosing (a monotonic clock), so the same code runs on a
//! microcontroller's tick counter.

use alloc::collections::{BTreeSet, VecDeque};
use alloc::string::{String, ToString};
use core::time::Duration;

use bytes::{Bytes, BytesMut};

use super::error::{CloseCode, Misuse, ProtocolError};
use super::frame::{Body, DeliveryKind, SessionFrame, Status};
use super::session::{Role, Session};

/// The timers and limits of one end of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Send a PING after this long without sending anything, or without receiving
    /// anything (at most one such PING per interval: spec 8.5); `None`: never.
    pub keepalive: Option<Duration>,
    /// Close with `IDLE_TIMEOUT` after this long without receiving a byte; `None`: never.
    /// (A frame that is still arriving counts as receiving.)
    pub idle_timeout: Option<Duration>,
    /// After sending CLOSE, how long to wait for the peer's CLOSE (or EOF).
    pub close_timeout: Duration,
    /// Largest length field accepted from the peer (spec 3.2).
    pub max_frame_len: u32,
    /// When this side replaces its sending key (spec 8.7); `None`: never.
    pub key_update: Option<KeyUpdate>,
}

/// When a side sends KEY_UPDATE (spec 8.7): right before the next frame, once its
/// sending key has sealed `frames` frames or was first used `after` ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUpdate {
    /// Age of the sending key, from the first frame it sealed.
    pub after: Duration,
    /// Frames sealed with one key.
    pub frames: u64,
}

impl KeyUpdate {
    /// The spec's bound (8.7): 10 minutes or 2^20 frames.
    pub const SPEC: KeyUpdate = KeyUpdate {
        after: Duration::from_secs(600),
        frames: 1 << 20,
    };
}

impl Config {
    /// A client's defaults: a PING after 30 s of silence, closed after 45 s of hearing
    /// nothing, 5 s for the close handshake, 64 KiB frames.
    pub fn client() -> Self {
        Config {
            keepalive: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(45)),
            close_timeout: Duration::from_secs(5),
            max_frame_len: super::DEFAULT_MAX_FRAME_LEN,
            key_update: Some(KeyUpdate::SPEC),
        }
    }

    /// A server's defaults: no PINGs of its own, closed after 45 s of hearing nothing
    /// (1.5 × the client's keepalive), 5 s for the close handshake, 64 KiB frames.
    pub fn server() -> Self {
        Config {
            keepalive: None,
            ..Config::client()
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum End {
    /// The peer sent CLOSE; this side answered with its own.
    PeerClosed {
        /// The peer's code.
        code: CloseCode,
        /// The peer's reason.
        reason: String,
    },
    /// This side sent CLOSE (asked to, or because of a deadline or its sequence
    /// numbers running out); then `answer` says what came back.
    Closed {
        /// This side's code.
        code: CloseCode,
        /// This side's reason.
        reason: String,
        /// How the peer answered.
        answer: CloseAnswer,
    },
    /// The connection ended (EOF or reset) before the peer's CLOSE: not an orderly end
    /// (spec 8.6); every pending request failed.
    Truncated,
    /// The peer broke a rule of 8.3 or 8.4; this side sent CLOSE with the error's code.
    Failed(ProtocolError),
}

/// What came back after this side's CLOSE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseAnswer {
    /// The peer's CLOSE: an orderly end.
    Close,
    /// EOF or a reset without the peer's CLOSE (a cut cannot look like a close).
    Eof,
    /// Nothing within the close deadline.
    Nothing,
}

/// Something the application must know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The peer's REQUEST: answer it with [`Connection::respond`] and `seq`.
    Request {
        /// Its sequence number, to answer with.
        seq: u64,
        /// Its payload.
        payload: Bytes,
    },
    /// The answer to this side's REQUEST `req_seq`.
    Response {
        /// The request it answers.
        req_seq: u64,
        /// Its status.
        status: Status,
        /// Its payload.
        payload: Bytes,
    },
    /// A MESSAGE from the peer.
    Message {
        /// Its payload.
        payload: Bytes,
    },
    /// A queued message or request from the server (client only, spec 8.8): handle it,
    /// then acknowledge it with [`Connection::ack`] and `msg_id`. A `msg_id` at or
    /// below one this device already handled (before a reboot, or in an earlier
    /// session) is a redelivery: acknowledge it again without handling it twice.
    Delivery {
        /// The message id (per identity, increasing in the order they were queued).
        msg_id: u64,
        /// A request (the ACK carries the answer) or a message.
        kind: DeliveryKind,
        /// Its payload.
        payload: Bytes,
    },
    /// The device's acknowledgement of DELIVER `msg_id` (server only, spec 8.8): the
    /// message may now be deleted.
    Ack {
        /// The message acknowledged.
        msg_id: u64,
        /// The device's status.
        status: Status,
        /// The device's answer (a queued request's).
        payload: Bytes,
    },
    /// The answer to this side's PING `ping_seq`.
    Pong {
        /// The PING it answers.
        ping_seq: u64,
    },
    /// The session is over: nothing more will be accepted or sent, and every request
    /// still pending has failed ([`Connection::pending_requests`] names them). The
    /// driver writes what [`Connection::poll_transmit`] still returns, then closes.
    Closed(End),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Open,
    /// This side sent CLOSE; waiting for the peer's, until `deadline`. `receiving` is
    /// false after a receive failure (nothing more is read).
    Closing {
        end: End,
        deadline: Duration,
        receiving: bool,
    },
    Closed,
}

/// One end of an established session. See the module docs.
#[derive(Debug)]
pub struct Connection {
    session: Session,
    config: Config,
    state: State,
    /// Bytes received and not yet a whole frame.
    recv: BytesMut,
    /// Bytes sealed and not yet taken by the driver.
    send: BytesMut,
    events: VecDeque<Event>,
    /// This side's REQUESTs awaiting a RESPONSE.
    requests: BTreeSet<u64>,
    /// This side's PINGs awaiting a PONG.
    pings: BTreeSet<u64>,
    /// The peer's REQUESTs this side has not answered yet.
    unanswered: BTreeSet<u64>,
    /// Spec 8.8: the server's DELIVERs not acknowledged yet; the client's received
    /// DELIVERs it has not acknowledged yet.
    deliveries: BTreeSet<u64>,
    /// The last message id delivered in this session (sent or received), 0 before.
    last_delivery: u64,
    last_received: Duration,
    last_sent: Duration,
    /// When this side last sent a PING (spec 8.5: one PING per interval while nothing
    /// comes back).
    last_ping: Duration,
    /// When the current sending key sealed its first frame (spec 8.7); `None` before.
    key_since: Option<Duration>,
    /// Bytes handed in ([`Connection::handle_read`]) and out ([`Connection::transmit_into`]).
    bytes_in: u64,
    bytes_out: u64,
}

impl Connection {
    /// Wraps a session that a handshake established at `now`.
    pub fn new(session: Session, config: Config, now: Duration) -> Self {
        Connection {
            session,
            config,
            state: State::Open,
            recv: BytesMut::new(),
            send: BytesMut::new(),
            events: VecDeque::new(),
            requests: BTreeSet::new(),
            pings: BTreeSet::new(),
            unanswered: BTreeSet::new(),
            deliveries: BTreeSet::new(),
            last_delivery: 0,
            last_received: now,
            last_sent: now,
            last_ping: now,
            key_since: None,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.session.role()
    }

    /// Whether requests, messages and pings may still be sent.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Whether the session is over ([`Event::Closed`] was queued).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// This side's REQUESTs still awaiting a RESPONSE (after [`Event::Closed`]: those
    /// that failed).
    pub fn pending_requests(&self) -> impl Iterator<Item = u64> + '_ {
        self.requests.iter().copied()
    }

    /// The peer's REQUESTs not answered yet.
    pub fn unanswered_requests(&self) -> usize {
        self.unanswered.len()
    }

    /// Server: the DELIVERs not acknowledged yet (after [`Event::Closed`]: those that
    /// stay queued for the next session). Client: those received and not acknowledged.
    pub fn outstanding_deliveries(&self) -> impl Iterator<Item = u64> + '_ {
        self.deliveries.iter().copied()
    }

    /// Bytes sealed and not yet taken by [`Connection::poll_transmit`].
    pub fn pending_transmit(&self) -> usize {
        self.send.len()
    }

    /// The bytes to write next, if any (all of them, in one buffer).
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.send.is_empty()).then(|| self.send.split().freeze())
    }

    /// [`Connection::poll_transmit`] without an allocation per call: swaps the bytes to
    /// write into `buf`, which must be empty, and keeps `buf`'s buffer for the next
    /// ones. Returns whether there were any.
    pub fn transmit_into(&mut self, buf: &mut BytesMut) -> bool {
        debug_assert!(buf.is_empty());
        if self.send.is_empty() {
            return false;
        }
        core::mem::swap(&mut self.send, buf);
        self.bytes_out += buf.len() as u64;
        true
    }

    /// Bytes received so far (as given to [`Connection::handle_read`]).
    pub fn bytes_received(&self) -> u64 {
        self.bytes_in
    }

    /// Bytes handed out to send so far ([`Connection::transmit_into`]).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_out
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Connection::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match &self.state {
            State::Open => [
                self.config.idle_timeout.map(|t| self.last_received + t),
                self.ping_due(),
                self.key_update_at(),
            ]
            .into_iter()
            .flatten()
            .min(),
            State::Closing { deadline, .. } => Some(*deadline),
            State::Closed => None,
        }
    }

    /// When the keepalive PING is due (spec 8.5): after an interval without sending
    /// anything (the peer's idle deadline), or after an interval without receiving
    /// anything and without a PING (the peer may be gone: a side that only sends
    /// MESSAGEs gets nothing back otherwise).
    fn ping_due(&self) -> Option<Duration> {
        self.config.keepalive.map(|t| {
            let quiet_peer = self.last_received.max(self.last_ping) + t;
            (self.last_sent + t).min(quiet_peer)
        })
    }

    /// Applies the deadlines due at `now`: the idle deadline closes the session with
    /// `IDLE_TIMEOUT`, the keepalive sends a PING, the close deadline ends it.
    pub fn handle_timeout(&mut self, now: Duration) {
        match &self.state {
            State::Open => {
                if self
                    .config
                    .idle_timeout
                    .is_some_and(|t| now >= self.last_received + t)
                {
                    self.close(
                        CloseCode::IDLE_TIMEOUT,
                        "nothing received within the idle deadline",
                        now,
                    );
                } else if self.ping_due().is_some_and(|due| now >= due) {
                    let _ = self.ping(now);
                } else if self.key_update_at().is_some_and(|due| now >= due) {
                    // Spec 8.7: a key is replaced when due even if nothing else is to be
                    // sent, so that it never outlives its bound on a quiet session.
                    self.update_key_now(now);
                }
            }
            State::Closing { deadline, end, .. } if now >= *deadline => {
                let end = end.clone();
                self.finish(end);
            }
            _ => {}
        }
    }

    /// Takes bytes read from the connection at `now`, and handles every whole frame in
    /// them.
    pub fn handle_input(&mut self, bytes: &[u8], now: Duration) {
        self.recv.extend_from_slice(bytes);
        self.handle_read(bytes.len(), now);
    }

    /// Where a driver may read into directly (no copy): then it calls
    /// [`Connection::handle_read`] with the number of bytes it appended.
    pub fn input_buffer(&mut self) -> &mut BytesMut {
        &mut self.recv
    }

    /// Frees the receive and send buffers if they hold nothing (a driver calls this when
    /// the session has been quiet: an idle session then costs no buffer memory).
    pub fn release_buffers(&mut self) {
        if self.recv.is_empty() {
            self.recv = BytesMut::new();
        }
        if self.send.is_empty() {
            self.send = BytesMut::new();
        }
    }

    /// `n` bytes were appended to [`Connection::input_buffer`] at `now`: handles every
    /// whole frame there.
    pub fn handle_read(&mut self, n: usize, now: Duration) {
        self.bytes_in += n as u64;
        let receiving = match &self.state {
            State::Open => true,
            State::Closing { receiving, .. } => *receiving,
            State::Closed => false,
        };
        if !receiving {
            self.recv.clear();
            return;
        }
        if n == 0 {
            return;
        }
        self.last_received = now;
        loop {
            let frame =
                match super::codec::decode_frame_owned(&mut self.recv, self.config.max_frame_len) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => return,
                    Err(e) => return self.fail(e.into(), now),
                };
            let frame = match self.session.open_owned(frame) {
                Ok(frame) => frame,
                Err(e) => return self.fail(e, now),
            };
            if let Err(e) = self.accept(frame, now) {
                return self.fail(e, now);
            }
            if !matches!(
                self.state,
                State::Open
                    | State::Closing {
                        receiving: true,
                        ..
                    }
            ) {
                return;
            }
        }
    }

    /// The connection's read side ended (EOF or reset).
    pub fn handle_eof(&mut self, _now: Duration) {
        match &self.state {
            State::Open => self.finish(End::Truncated),
            State::Closing { .. } => self.finish_closing(CloseAnswer::Eof),
            State::Closed => {}
        }
    }

    /// The peer answered this side's CLOSE (with its own, or by closing).
    fn finish_closing(&mut self, how: CloseAnswer) {
        if let State::Closing { end, .. } = &self.state {
            let mut end = end.clone();
            if let End::Closed { answer, .. } = &mut end {
                *answer = how;
            }
            self.finish(end);
        }
    }

    /// Counts the time until `now` as activity: a driver that holds the peer back (it
    /// does not read) must not blame the peer's silence on it (spec 8.5).
    pub fn hold_idle(&mut self, now: Duration) {
        self.last_received = self.last_received.max(now);
    }

    /// Sends a REQUEST; returns its sequence number, which its [`Event::Response`] names.
    pub fn request(&mut self, payload: Bytes, now: Duration) -> Result<u64, ProtocolError> {
        let seq = self.send_body(&Body::Request { payload }, now)?;
        self.requests.insert(seq);
        Ok(seq)
    }

    /// Answers the peer's REQUEST `req_seq` (once: spec 8.4).
    pub fn respond(
        &mut self,
        req_seq: u64,
        status: Status,
        payload: Bytes,
        now: Duration,
    ) -> Result<(), ProtocolError> {
        if !self.unanswered.contains(&req_seq) {
            return Err(ProtocolError::Misuse(Misuse::NotPending(req_seq)));
        }
        let answer = |status, payload| Body::Response {
            req_seq,
            status,
            payload,
        };
        let sent = self.send_answer(
            answer,
            (status, payload),
            b"response too large for one frame",
            now,
        );
        if matches!(
            sent,
            Ok(()) | Err(ProtocolError::Misuse(Misuse::PayloadTooLarge { .. }))
        ) {
            self.unanswered.remove(&req_seq);
        }
        sent
    }

    /// Sends a MESSAGE.
    pub fn message(&mut self, payload: Bytes, now: Duration) -> Result<(), ProtocolError> {
        self.send_body(&Body::Message { payload }, now).map(drop)
    }

    /// Server: delivers queued message `msg_id` (spec 8.8). Ids must increase within
    /// the session; the device answers with an [`Event::Ack`].
    pub fn deliver(
        &mut self,
        msg_id: u64,
        kind: DeliveryKind,
        payload: Bytes,
        now: Duration,
    ) -> Result<(), ProtocolError> {
        if self.role() != Role::Server {
            return Err(ProtocolError::Misuse(Misuse::WrongSide("DELIVER")));
        }
        if msg_id <= self.last_delivery {
            return Err(ProtocolError::DeliveryOrder {
                msg_id,
                last: self.last_delivery,
            });
        }
        let body = Body::Deliver {
            msg_id,
            kind,
            payload,
        };
        self.send_body(&body, now)?;
        self.last_delivery = msg_id;
        self.deliveries.insert(msg_id);
        Ok(())
    }

    /// Client: acknowledges delivery `msg_id` (once: spec 8.8), with the answer to a
    /// queued request (for a message: [`Status::OK`] and an empty payload). An answer
    /// too large for one frame is replaced by status BACKEND_ERROR, as a RESPONSE's is
    /// (8.4), and the error returned.
    pub fn ack(
        &mut self,
        msg_id: u64,
        status: Status,
        payload: Bytes,
        now: Duration,
    ) -> Result<(), ProtocolError> {
        if self.role() != Role::Client {
            return Err(ProtocolError::Misuse(Misuse::WrongSide("ACK")));
        }
        if !self.deliveries.contains(&msg_id) {
            return Err(ProtocolError::Misuse(Misuse::NotDelivered(msg_id)));
        }
        let answer = |status, payload| Body::Ack {
            msg_id,
            status,
            payload,
        };
        let sent = self.send_answer(
            answer,
            (status, payload),
            b"answer too large for one frame",
            now,
        );
        if matches!(
            sent,
            Ok(()) | Err(ProtocolError::Misuse(Misuse::PayloadTooLarge { .. }))
        ) {
            self.deliveries.remove(&msg_id);
        }
        sent
    }

    /// Sends an answer, a RESPONSE (8.4) or an ACK (8.8), that `answer` makes of a status
    /// and a payload. One too large for a frame is replaced by status BACKEND_ERROR and
    /// `too_large`, so that it is still answered exactly once, and the error returned:
    /// `Ok` or [`Misuse::PayloadTooLarge`] mean an answer went out.
    fn send_answer(
        &mut self,
        answer: impl Fn(Status, Bytes) -> Body,
        (status, payload): (Status, Bytes),
        too_large: &'static [u8],
        now: Duration,
    ) -> Result<(), ProtocolError> {
        let sent = self.send_body(&answer(status, payload), now);
        if let Err(e @ ProtocolError::Misuse(Misuse::PayloadTooLarge { .. })) = sent {
            let replaced = answer(Status::BACKEND_ERROR, Bytes::from_static(too_large));
            self.send_body(&replaced, now)?;
            return Err(e);
        }
        sent.map(drop)
    }

    /// Sends a PING; returns its sequence number, which its [`Event::Pong`] names.
    pub fn ping(&mut self, now: Duration) -> Result<u64, ProtocolError> {
        let seq = self.send_body(&Body::Ping, now)?;
        self.pings.insert(seq);
        self.last_ping = now;
        Ok(seq)
    }

    /// Ends the session: sends CLOSE `code` (once) and waits for the peer's CLOSE, its
    /// EOF, or the close deadline. Requests still pending fail.
    pub fn close(&mut self, code: CloseCode, reason: &str, now: Duration) {
        if self.state != State::Open {
            return;
        }
        self.send_close(code, reason);
        self.state = State::Closing {
            end: End::Closed {
                code,
                reason: reason.to_string(),
                answer: CloseAnswer::Nothing,
            },
            deadline: now + self.config.close_timeout,
            receiving: true,
        };
    }

    /// Seals `body` (spec 8.1: a sender whose next number would be 2^64 − 1 sends CLOSE
    /// `SEQUENCE_EXHAUSTED` instead, and the session ends).
    fn send_body(&mut self, body: &Body, now: Duration) -> Result<u64, ProtocolError> {
        if self.state != State::Open {
            return Err(ProtocolError::Misuse(Misuse::Closed));
        }
        if self.key_update_due(now) {
            self.update_key_now(now);
        }
        match self.session.seal(body, &mut self.send) {
            Ok(seq) => {
                self.last_sent = now;
                self.key_since.get_or_insert(now);
                Ok(seq)
            }
            Err(ProtocolError::Misuse(Misuse::Exhausted)) => {
                self.close(
                    CloseCode::SEQUENCE_EXHAUSTED,
                    "sequence numbers exhausted",
                    now,
                );
                Err(ProtocolError::Misuse(Misuse::Exhausted))
            }
            Err(e) => Err(e),
        }
    }

    /// When the sending key reaches its age limit (spec 8.7): `None` before it sealed
    /// anything, or without a rule.
    fn key_update_at(&self) -> Option<Duration> {
        let rule = self.config.key_update?;
        self.key_since.map(|since| since + rule.after)
    }

    /// Seals KEY_UPDATE (the session moves to its next sending key), unless the
    /// sequence numbers left are the frame's own and CLOSE's.
    fn update_key_now(&mut self, now: Duration) {
        if self.session.last_sent() < u64::MAX - 2
            && self.session.seal(&Body::KeyUpdate, &mut self.send).is_ok()
        {
            self.key_since = None;
            self.last_sent = now;
        }
    }

    /// Spec 8.7: whether the sending key has sealed enough frames, or lived long enough,
    /// to be replaced before the next frame.
    fn key_update_due(&self, now: Duration) -> bool {
        // The last two numbers are the frame's own and CLOSE's (spec 8.7, 8.1): a
        // KEY_UPDATE may take 2^64 - 3 at the latest.
        self.session.last_sent() < u64::MAX - 2
            && self.config.key_update.is_some_and(|rule| {
                self.session.sealed_on_key() >= rule.frames
                    || self
                        .key_since
                        .is_some_and(|since| now >= since + rule.after)
            })
    }

    fn send_close(&mut self, code: CloseCode, reason: &str) {
        // At most 255 bytes (spec 4.5), cut at a character boundary.
        let mut end = reason.len().min(super::frame::MAX_REASON_LEN);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let close = Body::Close {
            code,
            reason: reason[..end].to_string(),
        };
        // Cannot fail: one CLOSE per session, 2^64 − 1 is CLOSE's, the reason is ours.
        let _ = self.session.seal(&close, &mut self.send);
    }

    /// Spec 8.4 and 8.5: what an accepted frame means.
    fn accept(&mut self, frame: SessionFrame, now: Duration) -> Result<(), ProtocolError> {
        let closing = self.state != State::Open;
        match frame.body {
            Body::Close { code, reason } => {
                if closing {
                    self.finish_closing(CloseAnswer::Close);
                } else {
                    self.send_close(CloseCode::NORMAL, "closed");
                    self.finish(End::PeerClosed { code, reason });
                }
            }
            // After this side's CLOSE the peer may still send what it sent before seeing
            // it: checked (8.3 ran); answers to this side's pending requests and pings are
            // delivered, the rest dropped (spec 8.6).
            Body::Response {
                req_seq,
                status,
                payload,
            } if closing => {
                if self.requests.remove(&req_seq) {
                    self.events.push_back(Event::Response {
                        req_seq,
                        status,
                        payload,
                    });
                }
            }
            Body::Pong { ping_seq } if closing => {
                if self.pings.remove(&ping_seq) {
                    self.events.push_back(Event::Pong { ping_seq });
                }
            }
            // An acknowledgement is an answer too: the message it names is done.
            Body::Ack {
                msg_id,
                status,
                payload,
            } if closing => {
                if self.deliveries.remove(&msg_id) {
                    self.events.push_back(Event::Ack {
                        msg_id,
                        status,
                        payload,
                    });
                }
            }
            _ if closing => {}
            Body::Request { payload } => {
                self.unanswered.insert(frame.seq);
                self.events.push_back(Event::Request {
                    seq: frame.seq,
                    payload,
                });
            }
            Body::Response {
                req_seq,
                status,
                payload,
            } => {
                if !self.requests.remove(&req_seq) {
                    return Err(ProtocolError::UnsolicitedAnswer {
                        what: "RESPONSE",
                        got: req_seq,
                        last_sent: self.session.last_sent(),
                    });
                }
                self.events.push_back(Event::Response {
                    req_seq,
                    status,
                    payload,
                });
            }
            Body::Message { payload } => self.events.push_back(Event::Message { payload }),
            Body::Deliver {
                msg_id,
                kind,
                payload,
            } => {
                if msg_id <= self.last_delivery {
                    return Err(ProtocolError::DeliveryOrder {
                        msg_id,
                        last: self.last_delivery,
                    });
                }
                self.last_delivery = msg_id;
                self.deliveries.insert(msg_id);
                self.events.push_back(Event::Delivery {
                    msg_id,
                    kind,
                    payload,
                });
            }
            Body::Ack {
                msg_id,
                status,
                payload,
            } => {
                if !self.deliveries.remove(&msg_id) {
                    return Err(ProtocolError::UnsolicitedAck(msg_id));
                }
                self.events.push_back(Event::Ack {
                    msg_id,
                    status,
                    payload,
                });
            }
            // The session already moved to the peer's next key (spec 8.7).
            Body::KeyUpdate => {}
            Body::Ping => {
                // Answered at once; a PONG that cannot be sent (sequence numbers
                // exhausted) has closed the session instead.
                let _ = self.send_body(
                    &Body::Pong {
                        ping_seq: frame.seq,
                    },
                    now,
                );
            }
            Body::Pong { ping_seq } => {
                if !self.pings.remove(&ping_seq) {
                    return Err(ProtocolError::UnsolicitedAnswer {
                        what: "PONG",
                        got: ping_seq,
                        last_sent: self.session.last_sent(),
                    });
                }
                self.events.push_back(Event::Pong { ping_seq });
            }
        }
        Ok(())
    }

    /// A receive failure (spec 8.3): nothing more is accepted; CLOSE with the error's
    /// code if this side may still send, then wait for the peer to go.
    fn fail(&mut self, e: ProtocolError, now: Duration) {
        self.recv.clear();
        match self.state {
            State::Open => {
                // ERROR in a session, or the peer's refusal of the finish: no CLOSE (8.3
                // step 2), the connection just ends; an injected one is a cut.
                match e {
                    ProtocolError::Refused(_) => return self.finish(End::Failed(e)),
                    ProtocolError::InjectedError(_) => return self.finish(End::Truncated),
                    _ => {}
                }
                self.send_close(e.close_code(), &e.to_string());
                self.state = State::Closing {
                    end: End::Failed(e),
                    deadline: now + self.config.close_timeout,
                    receiving: false,
                };
            }
            State::Closing {
                ref mut receiving, ..
            } => *receiving = false,
            State::Closed => {}
        }
    }

    fn finish(&mut self, end: End) {
        self.state = State::Closed;
        self.recv.clear();
        self.pings.clear();
        self.unanswered.clear();
        self.events.push_back(Event::Closed(end));
    }

    /// The largest payload a frame of type `ty` can carry under this side's limit.
    pub fn max_payload(&self, ty: super::FrameType) -> usize {
        self.session.max_payload(ty)
    }

    /// This end's timers and limits.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The session underneath (counters), for tests and diagnostics.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Sets what spec 8.8 keeps of the deliveries so far: the last message id
    /// delivered in this session and those not acknowledged yet (the test vectors'
    /// receivers, whose earlier frames were replayed on the bare [`Session`]).
    #[cfg(any(test, feature = "testing"))]
    #[doc(hidden)]
    pub fn set_deliveries_for_testing(&mut self, last: u64, outstanding: &[u64]) {
        self.last_delivery = last;
        self.deliveries = outstanding.iter().copied().collect();
    }

    /// Moves both counters (see [`Session::set_counters_for_testing`]).
    #[cfg(any(test, feature = "testing"))]
    #[doc(hidden)]
    pub fn set_counters_for_testing(&mut self, next_send: u64, last_recv: u64) {
        self.session.set_counters_for_testing(next_send, last_recv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::session::tests::pair as sessions;

    const S: Duration = Duration::from_secs(1);

    /// A client and a server joined in memory, with a fake clock: bytes move when
    /// [`Pair::drive`] runs, time when [`Pair::advance`] does (quinn-proto's `Pair`).
    struct Pair {
        client: Connection,
        server: Connection,
        now: Duration,
        /// Whether each side's EOF was delivered to the other.
        client_gone: bool,
        server_gone: bool,
        /// Drops what the server writes, and its EOF (a peer that stopped answering).
        server_mute: bool,
    }

    impl Pair {
        fn new() -> Pair {
            Self::with(Config::client(), Config::server())
        }

        fn with(client: Config, server: Config) -> Pair {
            let (c, s) = sessions();
            Pair {
                client: Connection::new(c, client, Duration::ZERO),
                server: Connection::new(s, server, Duration::ZERO),
                now: Duration::ZERO,
                client_gone: false,
                server_gone: false,
                server_mute: false,
            }
        }

        /// Moves bytes both ways until neither side has any to send; a side that is
        /// closed and has written everything closes its socket (the other sees EOF).
        fn drive(&mut self) {
            loop {
                let mut moved = false;
                if let Some(b) = self.client.poll_transmit() {
                    self.server.handle_input(&b, self.now);
                    moved = true;
                }
                if let Some(b) = self.server.poll_transmit() {
                    if !self.server_mute {
                        self.client.handle_input(&b, self.now);
                    }
                    moved = true;
                }
                // EOF only after everything written before it.
                if self.client.is_closed()
                    && !self.client_gone
                    && self.client.pending_transmit() == 0
                {
                    self.client_gone = true;
                    self.server.handle_eof(self.now);
                    moved = true;
                }
                if self.server.is_closed()
                    && !self.server_gone
                    && !self.server_mute
                    && self.server.pending_transmit() == 0
                {
                    self.server_gone = true;
                    self.client.handle_eof(self.now);
                    moved = true;
                }
                if !moved {
                    return;
                }
            }
        }

        /// Lets `d` pass, firing every deadline on its way, in order.
        fn advance(&mut self, d: Duration) {
            let until = self.now + d;
            loop {
                let next = [self.client.poll_timeout(), self.server.poll_timeout()]
                    .into_iter()
                    .flatten()
                    .filter(|&t| t <= until)
                    .min();
                let Some(t) = next else { break };
                self.now = t.max(self.now);
                self.client.handle_timeout(self.now);
                self.server.handle_timeout(self.now);
                self.drive();
            }
            self.now = until;
        }
    }

    fn events(c: &mut Connection) -> Vec<Event> {
        core::iter::from_fn(|| c.poll_event()).collect()
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn closed(c: &mut Connection) -> End {
        match events(c).pop() {
            Some(Event::Closed(end)) => end,
            other => panic!("expected Closed last, got {other:?}"),
        }
    }

    #[test]
    fn requests_both_ways_answered_out_of_order() {
        let mut p = Pair::new();
        let now = p.now;
        let r: Vec<u64> = ["a", "b", "c"]
            .iter()
            .map(|x| p.client.request(b(x), now).unwrap())
            .collect();
        p.drive();
        let got = events(&mut p.server);
        assert_eq!(got.len(), 3);
        assert_eq!(p.server.unanswered_requests(), 3);
        for (seq, answer) in [(r[2], "C"), (r[0], "A"), (r[1], "B")] {
            p.server.respond(seq, Status::OK, b(answer), now).unwrap();
        }
        // The server asks too, in the same session.
        let s1 = p.server.request(b("config?"), now).unwrap();
        p.drive();
        assert_eq!(
            events(&mut p.client),
            vec![
                Event::Response {
                    req_seq: r[2],
                    status: Status::OK,
                    payload: b("C")
                },
                Event::Response {
                    req_seq: r[0],
                    status: Status::OK,
                    payload: b("A")
                },
                Event::Response {
                    req_seq: r[1],
                    status: Status::OK,
                    payload: b("B")
                },
                Event::Request {
                    seq: s1,
                    payload: b("config?")
                },
            ]
        );
        assert_eq!(p.client.pending_requests().count(), 0);
        p.client.respond(s1, Status(300), b("v2"), now).unwrap();
        // Exactly one answer per request (8.4), and only to a request received.
        assert_eq!(
            p.client.respond(s1, Status::OK, b("again"), now),
            Err(ProtocolError::Misuse(Misuse::NotPending(s1)))
        );
        assert_eq!(
            p.server.respond(99, Status::OK, b("?"), now),
            Err(ProtocolError::Misuse(Misuse::NotPending(99)))
        );
        p.drive();
        assert_eq!(
            events(&mut p.server),
            vec![Event::Response {
                req_seq: s1,
                status: Status(300),
                payload: b("v2")
            }]
        );
    }

    #[test]
    fn an_answer_too_large_for_a_frame_becomes_backend_error() {
        let mut p = Pair::new();
        let now = p.now;
        let r = p.client.request(b("big answer, please"), now).unwrap();
        p.drive();
        events(&mut p.server);
        // The pair's sessions send frames of at most 1024 bytes.
        let big = Bytes::from(vec![7u8; 2000]);
        assert!(matches!(
            p.server.respond(r, Status::OK, big, now),
            Err(ProtocolError::Misuse(Misuse::PayloadTooLarge { .. }))
        ));
        assert_eq!(p.server.unanswered_requests(), 0, "answered once");
        p.drive();
        assert_eq!(
            events(&mut p.client),
            vec![Event::Response {
                req_seq: r,
                status: Status::BACKEND_ERROR,
                payload: b("response too large for one frame"),
            }]
        );
    }

    #[test]
    fn keepalive_keeps_a_quiet_session_and_silence_closes_it() {
        let mut p = Pair::new();
        // Ten minutes without traffic: the client pings every 30 s, the server answers.
        p.advance(600 * S);
        assert!(p.client.is_open() && p.server.is_open());
        let pongs = events(&mut p.client)
            .into_iter()
            .filter(|e| matches!(e, Event::Pong { .. }))
            .count();
        assert_eq!(pongs, 20);
        // A client that does not ping is closed by the server after 45 s.
        let mut quiet = Config::client();
        quiet.keepalive = None;
        quiet.idle_timeout = None;
        let mut p = Pair::with(quiet, Config::server());
        p.advance(44 * S);
        assert!(p.server.is_open());
        p.advance(2 * S);
        assert_eq!(
            closed(&mut p.client),
            End::PeerClosed {
                code: CloseCode::IDLE_TIMEOUT,
                reason: "nothing received within the idle deadline".into()
            }
        );
        assert!(matches!(
            closed(&mut p.server),
            End::Closed {
                code: CloseCode::IDLE_TIMEOUT,
                ..
            }
        ));
    }

    /// Spec 8.5: a client that only sends (MESSAGEs) hears nothing back unless it pings;
    /// it pings when it has received nothing for an interval, so a live server is not
    /// taken for gone, and a dead one still is.
    #[test]
    fn a_client_that_only_sends_still_pings_and_keeps_a_live_server() {
        let mut p = Pair::new();
        for _ in 0..36 {
            p.advance(5 * S);
            let now = p.now;
            p.client.message(b("reading"), now).unwrap();
            p.drive();
        }
        assert!(
            p.client.is_open() && p.server.is_open(),
            "{:?}",
            events(&mut p.client)
        );
        let pongs = events(&mut p.client)
            .into_iter()
            .filter(|e| matches!(e, Event::Pong { .. }))
            .count();
        assert!((5..=7).contains(&pongs), "{pongs} PONGs in 180 s");
        // A server that stopped answering: one PING per interval, then gone.
        p.server_mute = true;
        for _ in 0..12 {
            p.advance(5 * S);
            let now = p.now;
            if p.client.is_open() {
                p.client.message(b("reading"), now).unwrap();
            }
            p.drive();
        }
        assert!(!p.client.is_open());
        let pings = p.client.session().last_sent();
        assert!(pings < 36 + 7 + 12 + 3, "a PING storm: {pings} frames sent");
    }

    #[test]
    fn a_frame_still_arriving_is_not_silence() {
        let mut quiet = Config::client();
        quiet.keepalive = None;
        quiet.idle_timeout = None;
        // This test hands the frame's bytes over one by one itself: no other frame may
        // be queued behind it meanwhile (a KEY_UPDATE after 10 minutes would be).
        quiet.key_update = None;
        let mut p = Pair::with(quiet, Config::server());
        let now = p.now;
        p.client.message(b("slow"), now).unwrap();
        let frame = p.client.poll_transmit().unwrap();
        // One byte every 40 s, under the 45 s idle deadline, for longer than it.
        for byte in frame.iter() {
            p.advance(40 * S);
            p.server.handle_input(&[*byte], p.now);
        }
        assert!(p.server.is_open());
        assert_eq!(
            events(&mut p.server),
            vec![Event::Message { payload: b("slow") }]
        );
    }

    #[test]
    fn close_handshake_fails_pending_requests() {
        let mut p = Pair::new();
        let now = p.now;
        let pending = p.client.request(b("never answered"), now).unwrap();
        p.drive();
        p.server.close(CloseCode::SHUTDOWN, "bye", now);
        assert!(p
            .server
            .respond(pending, Status::OK, b("late"), now)
            .is_err());
        p.drive();
        assert_eq!(
            closed(&mut p.client),
            End::PeerClosed {
                code: CloseCode::SHUTDOWN,
                reason: "bye".into()
            }
        );
        assert_eq!(
            p.client.pending_requests().collect::<Vec<_>>(),
            vec![pending]
        );
        assert_eq!(
            closed(&mut p.server),
            End::Closed {
                code: CloseCode::SHUTDOWN,
                reason: "bye".into(),
                answer: CloseAnswer::Close,
            }
        );
        assert_eq!(
            p.client.request(b("x"), now),
            Err(ProtocolError::Misuse(Misuse::Closed))
        );
    }

    #[test]
    fn frames_sent_before_the_peer_saw_our_close_are_checked_and_dropped() {
        let mut p = Pair::new();
        let now = p.now;
        p.server.close(CloseCode::NORMAL, "done", now);
        let close = p.server.poll_transmit().unwrap();
        // The client's request crosses the server's CLOSE on the wire.
        p.client.request(b("crossing"), now).unwrap();
        p.drive();
        assert!(events(&mut p.server)
            .iter()
            .all(|e| !matches!(e, Event::Request { .. })));
        p.client.handle_input(&close, now);
        p.drive();
        assert!(matches!(closed(&mut p.client), End::PeerClosed { .. }));
        assert!(p.server.is_closed());
    }

    #[test]
    fn answers_that_cross_our_close_are_still_delivered() {
        let mut p = Pair::new();
        let now = p.now;
        let r = p.client.request(b("question"), now).unwrap();
        p.drive();
        events(&mut p.server);
        // The server answers while the client's CLOSE is on its way.
        p.server.respond(r, Status::OK, b("answer"), now).unwrap();
        let answer = p.server.poll_transmit().unwrap();
        p.client.close(CloseCode::NORMAL, "done", now);
        p.client.handle_input(&answer, now);
        assert_eq!(
            events(&mut p.client),
            vec![Event::Response {
                req_seq: r,
                status: Status::OK,
                payload: b("answer")
            }]
        );
        p.drive();
        assert!(matches!(
            closed(&mut p.client),
            End::Closed {
                answer: CloseAnswer::Close,
                ..
            }
        ));
    }

    #[test]
    fn an_error_frame_in_a_session_is_a_cut() {
        let mut p = Pair::new();
        let now = p.now;
        p.client.request(b("x"), now).unwrap();
        p.drive();
        // ERROR is never part of a session (8.3 step 2): injected, so the session is cut,
        // and no CLOSE is sent.
        p.server.handle_input(&[0, 0, 0, 4, 0x1f, 0, 3, 1], now);
        assert_eq!(closed(&mut p.server), End::Truncated);
        assert_eq!(p.server.pending_transmit(), 0);
    }

    #[test]
    fn an_unanswered_close_ends_at_its_deadline() {
        let mut p = Pair::new();
        p.server_mute = true;
        let now = p.now;
        p.client.close(CloseCode::NORMAL, "bye", now);
        p.drive();
        p.advance(4 * S);
        assert!(!p.client.is_closed());
        p.advance(2 * S);
        assert!(matches!(
            closed(&mut p.client),
            End::Closed {
                code: CloseCode::NORMAL,
                answer: CloseAnswer::Nothing,
                ..
            }
        ));
    }

    #[test]
    fn eof_before_close_is_truncation() {
        let mut p = Pair::new();
        let now = p.now;
        let r = p.client.request(b("lost"), now).unwrap();
        p.drive();
        p.client.handle_eof(now);
        assert_eq!(closed(&mut p.client), End::Truncated);
        assert_eq!(p.client.pending_requests().collect::<Vec<_>>(), vec![r]);
        // After an orderly CLOSE, EOF is the expected end.
        let mut p = Pair::new();
        p.client.close(CloseCode::NORMAL, "bye", now);
        p.client.poll_transmit();
        p.client.handle_eof(now);
        assert!(matches!(closed(&mut p.client), End::Closed { .. }));
    }

    #[test]
    fn deliveries_are_acknowledged_once_each_in_any_order() {
        let mut p = Pair::new();
        let now = p.now;
        p.server
            .deliver(3, DeliveryKind::Message, b("reboot at 2"), now)
            .unwrap();
        p.server
            .deliver(7, DeliveryKind::Request, b("config?"), now)
            .unwrap();
        // Within a session, ids only increase (8.8).
        assert_eq!(
            p.server.deliver(7, DeliveryKind::Message, b("x"), now),
            Err(ProtocolError::DeliveryOrder { msg_id: 7, last: 7 })
        );
        // Only the server delivers, only the client acknowledges.
        assert_eq!(
            p.client.deliver(9, DeliveryKind::Message, b("x"), now),
            Err(ProtocolError::Misuse(Misuse::WrongSide("DELIVER")))
        );
        assert_eq!(
            p.server.ack(3, Status::OK, Bytes::new(), now),
            Err(ProtocolError::Misuse(Misuse::WrongSide("ACK")))
        );
        p.drive();
        assert_eq!(
            events(&mut p.client),
            vec![
                Event::Delivery {
                    msg_id: 3,
                    kind: DeliveryKind::Message,
                    payload: b("reboot at 2")
                },
                Event::Delivery {
                    msg_id: 7,
                    kind: DeliveryKind::Request,
                    payload: b("config?")
                },
            ]
        );
        assert_eq!(
            p.client.outstanding_deliveries().collect::<Vec<_>>(),
            [3, 7]
        );
        p.client.ack(7, Status(300), b("v2"), now).unwrap();
        p.client.ack(3, Status::OK, Bytes::new(), now).unwrap();
        assert_eq!(
            p.client.ack(3, Status::OK, Bytes::new(), now),
            Err(ProtocolError::Misuse(Misuse::NotDelivered(3)))
        );
        assert_eq!(
            p.client.ack(4, Status::OK, Bytes::new(), now),
            Err(ProtocolError::Misuse(Misuse::NotDelivered(4)))
        );
        p.drive();
        assert_eq!(
            events(&mut p.server),
            vec![
                Event::Ack {
                    msg_id: 7,
                    status: Status(300),
                    payload: b("v2")
                },
                Event::Ack {
                    msg_id: 3,
                    status: Status::OK,
                    payload: Bytes::new()
                },
            ]
        );
        assert_eq!(p.server.outstanding_deliveries().count(), 0);
        assert!(p.server.is_open() && p.client.is_open());
    }

    #[test]
    fn an_ack_for_no_outstanding_delivery_ends_the_session() {
        // An ACK for an id never delivered, and a second ACK of one id.
        for (case, msg_id) in [("never delivered", 5), ("acknowledged twice", 1)] {
            let mut p = Pair::new();
            let now = p.now;
            p.server
                .deliver(1, DeliveryKind::Message, b("m"), now)
                .unwrap();
            p.drive();
            events(&mut p.client);
            p.client.ack(1, Status::OK, Bytes::new(), now).unwrap();
            let forged = Body::Ack {
                msg_id,
                status: Status::OK,
                payload: Bytes::new(),
            };
            p.client.session.seal(&forged, &mut p.client.send).unwrap();
            p.drive();
            let end = closed(&mut p.server);
            assert_eq!(
                end,
                End::Failed(ProtocolError::UnsolicitedAck(msg_id)),
                "{case}"
            );
            assert_eq!(end_kind(&end), "unsolicited_answer");
        }
    }

    #[test]
    fn a_delivery_out_of_order_or_the_wrong_way_ends_the_session() {
        // The client refuses a DELIVER whose id does not increase.
        let mut p = Pair::new();
        let now = p.now;
        p.server
            .deliver(4, DeliveryKind::Message, b("a"), now)
            .unwrap();
        let again = Body::Deliver {
            msg_id: 4,
            kind: DeliveryKind::Message,
            payload: b("a"),
        };
        p.server.session.seal(&again, &mut p.server.send).unwrap();
        p.drive();
        let end = closed(&mut p.client);
        assert_eq!(
            end,
            End::Failed(ProtocolError::DeliveryOrder { msg_id: 4, last: 4 })
        );
        assert!(matches!(
            closed(&mut p.server),
            End::PeerClosed {
                code: CloseCode::PROTOCOL_ERROR,
                ..
            }
        ));
        // A DELIVER sent to the server, and an ACK to the client: malformed (4.1).
        for to_server in [true, false] {
            let mut p = Pair::new();
            let body = if to_server {
                Body::Deliver {
                    msg_id: 1,
                    kind: DeliveryKind::Request,
                    payload: b("x"),
                }
            } else {
                Body::Ack {
                    msg_id: 1,
                    status: Status::OK,
                    payload: Bytes::new(),
                }
            };
            let from = if to_server {
                &mut p.client
            } else {
                &mut p.server
            };
            from.session.seal(&body, &mut from.send).unwrap();
            p.drive();
            let end = closed(if to_server {
                &mut p.server
            } else {
                &mut p.client
            });
            assert_eq!(end_kind(&end), "malformed", "{end:?}");
        }
    }

    #[test]
    fn acks_that_cross_our_close_still_count_and_deliveries_after_it_do_not() {
        let mut p = Pair::new();
        let now = p.now;
        p.server
            .deliver(1, DeliveryKind::Request, b("q"), now)
            .unwrap();
        p.drive();
        events(&mut p.client);
        // The device answers while the server closes: the answer still arrives.
        p.client.ack(1, Status::OK, b("a"), now).unwrap();
        p.server.close(CloseCode::NORMAL, "bye", now);
        p.drive();
        let got = events(&mut p.server);
        assert_eq!(
            got[0],
            Event::Ack {
                msg_id: 1,
                status: Status::OK,
                payload: b("a")
            }
        );
        // A delivery after the client's CLOSE is dropped, not handed up.
        let mut p = Pair::new();
        p.client.close(CloseCode::NORMAL, "bye", now);
        p.server
            .deliver(2, DeliveryKind::Message, b("late"), now)
            .unwrap();
        p.drive();
        assert!(!events(&mut p.client)
            .iter()
            .any(|e| matches!(e, Event::Delivery { .. })));
        // The server keeps what was not acknowledged: it stays queued.
        assert_eq!(p.server.outstanding_deliveries().collect::<Vec<_>>(), [2]);
    }

    fn end_kind(end: &End) -> &'static str {
        match end {
            End::Failed(e) => e.kind(),
            _ => "not a failure",
        }
    }

    #[test]
    fn answers_must_name_a_pending_request_or_ping() {
        // A PONG although no PING was sent, and a second RESPONSE to one request.
        for case in ["pong", "response twice"] {
            let mut p = Pair::new();
            let now = p.now;
            let r = p.client.request(b("once"), now).unwrap();
            p.drive();
            events(&mut p.server);
            p.server.respond(r, Status::OK, b("1"), now).unwrap();
            let forged = match case {
                "pong" => Body::Pong { ping_seq: r },
                _ => Body::Response {
                    req_seq: r,
                    status: Status::OK,
                    payload: b("2"),
                },
            };
            p.server.session.seal(&forged, &mut p.server.send).unwrap();
            p.drive();
            let end = closed(&mut p.client);
            assert!(
                matches!(end, End::Failed(ProtocolError::UnsolicitedAnswer { .. })),
                "{case}: {end:?}"
            );
            assert!(matches!(
                closed(&mut p.server),
                End::PeerClosed {
                    code: CloseCode::PROTOCOL_ERROR,
                    ..
                }
            ));
        }
    }

    #[test]
    fn a_bad_frame_after_an_accepted_request_ends_the_session() {
        let mut p = Pair::new();
        let now = p.now;
        p.client.request(b("fine"), now).unwrap();
        let mut bytes = p.client.poll_transmit().unwrap().to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 41, 0x12]);
        bytes.extend_from_slice(&[0; 40]);
        p.server.handle_input(&bytes, now);
        let got = events(&mut p.server);
        assert!(matches!(got[..], [Event::Request { .. }]), "{got:?}");
        // The accepted request can no longer be answered: the session is over (the
        // server sent CLOSE PROTOCOL_ERROR, so the client fails its request).
        assert_eq!(
            p.server.respond(1, Status::OK, b("x"), now),
            Err(ProtocolError::Misuse(Misuse::Closed))
        );
        p.drive();
        assert!(matches!(closed(&mut p.server), End::Failed(_)));
        assert!(matches!(
            closed(&mut p.client),
            End::PeerClosed {
                code: CloseCode::PROTOCOL_ERROR,
                ..
            }
        ));
        assert_eq!(p.client.pending_requests().count(), 1);
    }

    #[test]
    fn the_last_sequence_number_is_for_close() {
        let mut p = Pair::new();
        let now = p.now;
        p.client.set_counters_for_testing(u64::MAX - 1, 0);
        p.server.set_counters_for_testing(1, u64::MAX - 2);
        assert_eq!(p.client.request(b("last"), now), Ok(u64::MAX - 1));
        assert_eq!(
            p.client.request(b("one more"), now),
            Err(ProtocolError::Misuse(Misuse::Exhausted))
        );
        p.drive();
        let got = events(&mut p.server);
        assert!(matches!(got[0], Event::Request { seq, .. } if seq == u64::MAX - 1));
        assert!(matches!(
            got[1],
            Event::Closed(End::PeerClosed {
                code: CloseCode::SEQUENCE_EXHAUSTED,
                ..
            })
        ));
        assert!(matches!(
            closed(&mut p.client),
            End::Closed {
                code: CloseCode::SEQUENCE_EXHAUSTED,
                ..
            }
        ));
        // A side that must answer a PING with its last number closes instead.
        let mut p = Pair::new();
        p.server.set_counters_for_testing(u64::MAX, 0);
        p.client.set_counters_for_testing(1, u64::MAX - 1);
        p.client.ping(now).unwrap();
        p.drive();
        assert!(matches!(
            closed(&mut p.client),
            End::PeerClosed {
                code: CloseCode::SEQUENCE_EXHAUSTED,
                ..
            }
        ));
    }

    /// Spec 8.7: a side replaces its sending key after `frames` frames, before the next
    /// one; the peer follows, and the session goes on in both directions.
    #[test]
    fn key_update_after_a_number_of_frames() {
        let mut rule = Config::client();
        rule.key_update = Some(KeyUpdate {
            after: Duration::from_secs(3600),
            frames: 2,
        });
        let mut p = Pair::with(rule, Config::server());
        for i in 0..5u8 {
            p.client.message(Bytes::from(vec![i]), p.now).unwrap();
            p.drive();
        }
        // Frames 1, 2, KEY_UPDATE (3), 4, 5, KEY_UPDATE (6), 7: five messages.
        assert_eq!(p.client.session().last_sent(), 7);
        assert_eq!(p.server.session().last_received(), 7);
        let got = core::iter::from_fn(|| p.server.poll_event())
            .filter(|e| matches!(e, Event::Message { .. }))
            .count();
        assert_eq!(got, 5, "KEY_UPDATE is not delivered as a message");
        let r = p
            .server
            .request(Bytes::from_static(b"still?"), p.now)
            .unwrap();
        p.drive();
        assert!(
            p.client.poll_event().is_some(),
            "the other direction works: {r}"
        );
    }

    /// Spec 8.7: a key that sealed a frame is replaced once it is `after` old, by a timer,
    /// even if nothing else is to be sent (a quiet session keeps no old key).
    #[test]
    fn key_update_by_age_on_a_quiet_session() {
        let mut rule = Config::server();
        rule.key_update = Some(KeyUpdate {
            after: Duration::from_secs(600),
            frames: 1 << 20,
        });
        rule.idle_timeout = None;
        let mut client = Config::client();
        client.keepalive = None;
        client.idle_timeout = None;
        let mut p = Pair::with(client, rule);
        p.server.message(Bytes::from_static(b"one"), p.now).unwrap();
        p.drive();
        assert_eq!(p.server.poll_timeout(), Some(Duration::from_secs(600)));
        p.advance(Duration::from_secs(599));
        assert_eq!(p.server.session().last_sent(), 1);
        p.advance(Duration::from_secs(1));
        assert_eq!(
            p.server.session().last_sent(),
            2,
            "KEY_UPDATE sent by the timer"
        );
        assert_eq!(p.client.session().last_received(), 2);
        // The new key has sealed nothing: it does not age, and no timer is set for it.
        assert_eq!(p.server.poll_timeout(), None);
        p.server.message(Bytes::from_static(b"two"), p.now).unwrap();
        p.drive();
        assert_eq!(p.client.session().last_received(), 3);
    }

    /// Spec 8.7, 8.1: no KEY_UPDATE where its number is needed by the frame itself and
    /// CLOSE; 2^64 - 3 is the last number one may take.
    #[test]
    fn no_key_update_at_the_end_of_the_sequence_numbers() {
        let mut rule = Config::client();
        rule.key_update = Some(KeyUpdate {
            after: Duration::from_secs(3600),
            frames: 1,
        });
        let mut p = Pair::with(rule, Config::server());
        p.client.set_counters_for_testing(u64::MAX - 3, 0);
        p.server.set_counters_for_testing(1, u64::MAX - 4);
        p.client.message(b("a"), p.now).unwrap();
        assert_eq!(p.client.session().last_sent(), u64::MAX - 3);
        // Due after one frame: KEY_UPDATE takes 2^64 - 3, the last number it may take.
        p.client.message(b("b"), p.now).unwrap();
        assert_eq!(p.client.session().last_sent(), u64::MAX - 1);
        // Due again, but only CLOSE's number is left: no KEY_UPDATE, and the message is
        // refused for CLOSE SEQUENCE_EXHAUSTED (spec 8.1).
        assert_eq!(
            p.client.message(b("c"), p.now),
            Err(ProtocolError::Misuse(Misuse::Exhausted))
        );
        p.drive();
        assert_eq!(p.server.session().last_received(), u64::MAX);
        let got = events(&mut p.server);
        assert!(
            got.iter().any(|e| matches!(e, Event::Closed(End::PeerClosed { code, .. }) if *code == CloseCode::SEQUENCE_EXHAUSTED)),
            "{got:?}"
        );
    }
}
