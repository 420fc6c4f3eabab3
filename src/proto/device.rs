//! A device's side of a connection, from HELLO through the session, sans-IO.
//!
//! [`Device`] is the one state machine every client of this crate runs (the Rust client
//! in `tally::client`, the C library in `c/`): it sends HELLO, verifies SERVER_AUTH
//! (spec 7), sends CLIENT_FINISH, adopts what the server announced (its frame limit and
//! keepalive, spec 4.3 and 8.5) and then runs the session as a [`Connection`] (spec 8).
//!
//! ```text
//!                 new()            SERVER_AUTH verified
//!  (HELLO queued) ─────▶ AwaitAuth ────────────────────▶ Open(Connection) ──▶ Closed
//!                            │  ERROR, bad tag, bad frame,
//!                            │  EOF, deadline, close()
//!                            └──────────────────────────▶ Failed
//! ```
//!
//! Like [`Connection`] it does no I/O, reads no clock and draws no random number: the
//! caller gives it the client nonce, the bytes it read ([`Device::handle_input`],
//! [`Device::handle_eof`]), the time ([`Device::handle_timeout`], a [`Duration`] since
//! an origin of the caller's choosing), and its application's commands
//! ([`Device::request`], [`Device::message`], [`Device::respond`], [`Device::ping`],
//! [`Device::close`]); it gives back the bytes to write ([`Device::poll_transmit`]),
//! what happened ([`Device::poll_event`]) and when to call again
//! ([`Device::poll_timeout`]).

use alloc::collections::VecDeque;
use core::time::Duration;

use bytes::{Bytes, BytesMut};

use super::connection::{self, Connection};
use super::frame::Mode;
use super::handshake::{ClientAwaitAuth, ServerLimits};
use super::{
    decode_frame, CloseCode, Id, Misuse, ProtocolError, SecretKey, Status, HANDSHAKE_MAX_FRAME_LEN,
    KEY_LEN, NONCE_LEN,
};

/// How long a client waits for the server's answer to HELLO by default: at least 10 s,
/// because a server may delay a refusal that long (spec 13.10).
pub const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);

/// A device's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// The largest session frame this device accepts, announced in HELLO (clamped to
    /// 256 bytes..16 MiB there); the server sends nothing longer.
    pub max_frame_len: u32,
    /// The device's own keepalive interval: `None` adopts the server's (spec 8.5); a
    /// value longer than the server's is shortened to it.
    pub keepalive: Option<Duration>,
    /// How long to wait for SERVER_AUTH after HELLO ([`HANDSHAKE_WAIT`] by default).
    pub handshake_timeout: Duration,
    /// After sending CLOSE, how long to wait for the server's CLOSE (or EOF).
    pub close_timeout: Duration,
    /// The mode: [`Mode::Encrypted`] (SEALED_HELLO) unless the device's user chose the
    /// authenticated mode. Never changed on a refusal (spec 7.8).
    pub mode: Mode,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame_len: super::DEFAULT_MAX_FRAME_LEN,
            keepalive: None,
            handshake_timeout: HANDSHAKE_WAIT,
            close_timeout: connection::Config::client().close_timeout,
            mode: Mode::Encrypted,
        }
    }
}

impl Config {
    /// The session rules for what the server announced (spec 8.5): a PING after the
    /// server's keepalive interval of silence (or the device's own, if shorter), the
    /// session given up after two such intervals without a byte from the server.
    pub fn session(&self, limits: ServerLimits) -> connection::Config {
        let keepalive = self
            .keepalive
            .map_or(limits.keepalive, |own| own.min(limits.keepalive));
        let mut c = connection::Config::client();
        c.keepalive = Some(keepalive);
        c.idle_timeout = Some(keepalive * 2);
        c.close_timeout = self.close_timeout;
        c.max_frame_len = self.max_frame_len;
        c
    }
}

/// Why the handshake ended without a session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// The server's answer: an ERROR frame (`ProtocolError::Refused`), a SERVER_AUTH
    /// whose tag did not verify (`BadTag(ServerAuth)`: unknown or revoked identity,
    /// wrong key, wrong server), or bytes that are not a valid handshake frame.
    Failed(ProtocolError),
    /// The connection ended (EOF or reset) before the server's answer.
    Truncated,
    /// No answer within [`Config::handshake_timeout`].
    TimedOut,
    /// The application closed (with this code) before the session was established.
    Abandoned(CloseCode),
}

/// What the application must know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// SERVER_AUTH verified and CLIENT_FINISH is queued: requests, messages and pings
    /// may be sent. The server's limits, as announced.
    Established(ServerLimits),
    /// The handshake failed: the last event. Nothing more is sent or accepted.
    HandshakeFailed(HandshakeFailure),
    /// What the session reports ([`connection::Event`]); its
    /// [`connection::Event::Closed`] is the last event.
    Session(connection::Event),
}

// The connection inline: one allocation for a C client.
#[allow(clippy::large_enum_variant)]
enum State {
    /// HELLO is queued; waiting for SERVER_AUTH until `deadline`.
    AwaitAuth {
        wait: ClientAwaitAuth,
        deadline: Duration,
    },
    Open(Connection),
    /// The handshake failed.
    Failed,
}

/// One device's connection: handshake, then session. See the module docs.
pub struct Device {
    state: State,
    config: Config,
    /// Received bytes not yet a whole handshake frame.
    input: BytesMut,
    /// Handshake bytes to send (HELLO, CLIENT_FINISH), before the session's.
    send: BytesMut,
    /// Handshake events, before the session's.
    events: VecDeque<Event>,
}

impl core::fmt::Debug for Device {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let state = match &self.state {
            State::AwaitAuth { .. } => "AwaitAuth",
            State::Open(_) => "Open",
            State::Failed => "Failed",
        };
        f.debug_struct("Device")
            .field("state", &state)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Starts a connection for `id` with its `key` at `now`, to the server whose static
    /// key is `server` (the credential's `server-key`): SEALED_HELLO (or HELLO, in the
    /// authenticated mode) is queued to send. `random` is 32 random bytes, new for every
    /// connection: the ephemeral secret `e` (or the nonce `nc`), taken and wiped where
    /// they were.
    pub fn new(
        id: &Id,
        key: SecretKey,
        server: &[u8; KEY_LEN],
        random: &mut [u8; NONCE_LEN],
        config: Config,
        now: Duration,
    ) -> Self {
        let mut send = BytesMut::new();
        let wait = match config.mode {
            Mode::Authenticated => Ok(ClientAwaitAuth::start(
                id,
                key,
                *random,
                config.max_frame_len,
                &mut send,
            )),
            Mode::Encrypted => ClientAwaitAuth::start_sealed(
                id,
                key,
                server,
                &mut random.clone(),
                config.max_frame_len,
                &mut send,
            ),
        };
        let mut device = Device {
            state: State::Failed,
            config,
            input: BytesMut::new(),
            send,
            events: VecDeque::new(),
        };
        match wait {
            Ok(wait) => {
                device.state = State::AwaitAuth {
                    wait,
                    deadline: now + config.handshake_timeout,
                }
            }
            // A server key of low order: nothing is sent.
            Err(e) => device.fail(HandshakeFailure::Failed(e)),
        }
        device
    }

    /// This device's settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether the handshake completed and the session is not over: requests, messages
    /// and pings may be sent (unless this side is closing).
    pub fn is_established(&self) -> bool {
        matches!(&self.state, State::Open(conn) if !conn.is_closed())
    }

    /// Whether it is over: the handshake failed, or the session ended (the last event
    /// was queued). What [`Device::poll_transmit`] still gives must still be sent.
    pub fn is_over(&self) -> bool {
        match &self.state {
            State::AwaitAuth { .. } => false,
            State::Open(conn) => conn.is_closed(),
            State::Failed => true,
        }
    }

    /// The session, once established.
    pub fn connection(&self) -> Option<&Connection> {
        match &self.state {
            State::Open(conn) => Some(conn),
            _ => None,
        }
    }

    /// The session, once established: for a driver that runs the session on its own
    /// (what was still to send and every queued event must be taken first, as
    /// [`Device::poll_transmit`] and [`Device::poll_event`] give them).
    pub fn into_connection(self) -> Option<Connection> {
        match self.state {
            State::Open(conn) if self.send.is_empty() && self.events.is_empty() => Some(conn),
            _ => None,
        }
    }

    /// Takes bytes read from the connection at `now`.
    pub fn handle_input(&mut self, bytes: &[u8], now: Duration) {
        match &mut self.state {
            State::Open(conn) => conn.handle_input(bytes, now),
            State::Failed => {}
            State::AwaitAuth { .. } => {
                self.input.extend_from_slice(bytes);
                let frame = match decode_frame(&mut self.input, HANDSHAKE_MAX_FRAME_LEN) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => return,
                    Err(e) => return self.fail(HandshakeFailure::Failed(e.into())),
                };
                let State::AwaitAuth { wait, .. } =
                    core::mem::replace(&mut self.state, State::Failed)
                else {
                    unreachable!("matched above")
                };
                match wait.handle_server_auth(&frame, &mut self.send) {
                    Err(e) => self.fail(HandshakeFailure::Failed(e)),
                    Ok((session, limits)) => {
                        let mut conn = Connection::new(session, self.config.session(limits), now);
                        self.events.push_back(Event::Established(limits));
                        // What came with SERVER_AUTH belongs to the session.
                        let rest = core::mem::take(&mut self.input);
                        if !rest.is_empty() {
                            conn.handle_input(&rest, now);
                        }
                        self.state = State::Open(conn);
                    }
                }
            }
        }
    }

    /// The connection's read side ended (EOF or reset).
    pub fn handle_eof(&mut self, now: Duration) {
        match &mut self.state {
            State::AwaitAuth { .. } => self.fail(HandshakeFailure::Truncated),
            State::Open(conn) => conn.handle_eof(now),
            State::Failed => {}
        }
    }

    /// When [`Device::handle_timeout`] must be called next, if ever: the handshake
    /// deadline, then the session's (keepalive, idle, close).
    pub fn poll_timeout(&self) -> Option<Duration> {
        match &self.state {
            State::AwaitAuth { deadline, .. } => Some(*deadline),
            State::Open(conn) => conn.poll_timeout(),
            State::Failed => None,
        }
    }

    /// Applies the deadlines due at `now`: the handshake's, the keepalive (a PING), the
    /// server's silence (CLOSE `IDLE_TIMEOUT`), the close handshake's.
    pub fn handle_timeout(&mut self, now: Duration) {
        match &mut self.state {
            State::AwaitAuth { deadline, .. } if now >= *deadline => {
                self.fail(HandshakeFailure::TimedOut)
            }
            State::Open(conn) => conn.handle_timeout(now),
            _ => {}
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        match &mut self.state {
            State::Open(conn) => conn.poll_event().map(Event::Session),
            _ => None,
        }
    }

    /// The bytes to write next, if any (all of them, in order, in one buffer).
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.send.is_empty() {
            return match &mut self.state {
                State::Open(conn) => conn.poll_transmit(),
                _ => None,
            };
        }
        if let State::Open(conn) = &mut self.state {
            if let Some(more) = conn.poll_transmit() {
                self.send.extend_from_slice(&more);
            }
        }
        Some(self.send.split().freeze())
    }

    /// [`Device::poll_transmit`] into `buf`, which must be empty, without an allocation
    /// per call once the session runs. Returns whether there were any bytes.
    pub fn transmit_into(&mut self, buf: &mut BytesMut) -> bool {
        debug_assert!(buf.is_empty());
        if self.send.is_empty() {
            return match &mut self.state {
                State::Open(conn) => conn.transmit_into(buf),
                _ => false,
            };
        }
        if let State::Open(conn) = &mut self.state {
            if let Some(more) = conn.poll_transmit() {
                self.send.extend_from_slice(&more);
            }
        }
        core::mem::swap(&mut self.send, buf);
        true
    }

    /// How many bytes wait to be sent.
    pub fn pending_transmit(&self) -> usize {
        self.send.len() + self.connection().map_or(0, Connection::pending_transmit)
    }

    /// Sends a REQUEST; returns its sequence number, which its response event names.
    /// `ProtocolError::Misuse(Misuse::Closed)` before the session is established or after it ended.
    pub fn request(&mut self, payload: Bytes, now: Duration) -> Result<u64, ProtocolError> {
        self.open()?.request(payload, now)
    }

    /// Sends a one-way MESSAGE.
    pub fn message(&mut self, payload: Bytes, now: Duration) -> Result<(), ProtocolError> {
        self.open()?.message(payload, now)
    }

    /// Answers the server's REQUEST `req_seq` (once: spec 8.4).
    pub fn respond(
        &mut self,
        req_seq: u64,
        status: Status,
        payload: Bytes,
        now: Duration,
    ) -> Result<(), ProtocolError> {
        self.open()?.respond(req_seq, status, payload, now)
    }

    /// Acknowledges the server's DELIVER `msg_id` (once: spec 8.8), with the answer to
    /// a queued request (a message: OK and no payload).
    pub fn ack(
        &mut self,
        msg_id: u64,
        status: Status,
        payload: Bytes,
        now: Duration,
    ) -> Result<(), ProtocolError> {
        self.open()?.ack(msg_id, status, payload, now)
    }

    /// Sends a PING; returns its sequence number.
    pub fn ping(&mut self, now: Duration) -> Result<u64, ProtocolError> {
        self.open()?.ping(now)
    }

    /// Ends the session with CLOSE `code` (the server's CLOSE, its EOF or the close
    /// deadline then ends it); before the session is established, ends the handshake
    /// ([`HandshakeFailure::Abandoned`]).
    pub fn close(&mut self, code: CloseCode, reason: &str, now: Duration) {
        match &mut self.state {
            State::Open(conn) => conn.close(code, reason, now),
            State::AwaitAuth { .. } => self.fail(HandshakeFailure::Abandoned(code)),
            State::Failed => {}
        }
    }

    /// The server's REQUESTs not answered yet.
    pub fn unanswered_requests(&self) -> usize {
        self.connection().map_or(0, Connection::unanswered_requests)
    }

    /// Frees the buffers and queues that hold nothing (see
    /// [`Connection::release_buffers`]): an idle session then costs no buffer memory.
    pub fn release_buffers(&mut self) {
        if self.input.is_empty() {
            self.input = BytesMut::new();
        }
        if self.send.is_empty() {
            self.send = BytesMut::new();
        }
        if self.events.is_empty() {
            self.events = VecDeque::new();
        }
        if let State::Open(conn) = &mut self.state {
            conn.release_buffers();
        }
    }

    fn open(&mut self) -> Result<&mut Connection, ProtocolError> {
        match &mut self.state {
            State::Open(conn) => Ok(conn),
            _ => Err(ProtocolError::Misuse(Misuse::Closed)),
        }
    }

    fn fail(&mut self, why: HandshakeFailure) {
        self.state = State::Failed;
        self.input = BytesMut::new();
        self.events.push_back(Event::HandshakeFailed(why));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::connection::{CloseAnswer, End, Event as SessionEvent};
    use crate::proto::error::TagKind;
    use crate::proto::frame::ErrorFrame;
    use crate::proto::handshake::{HelloReceived, ServerAwaitFinish};
    use crate::proto::{ErrorCode, FrameError};
    use alloc::vec::Vec;

    const S: Duration = Duration::from_secs(1);

    const LIMITS: ServerLimits = ServerLimits {
        max_frame_len: 65536,
        keepalive: Duration::from_secs(30),
    };

    fn id() -> Id {
        Id::new("dev-1").unwrap()
    }

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes([b; 32])
    }

    fn events(d: &mut Device) -> Vec<Event> {
        core::iter::from_fn(|| d.poll_event()).collect()
    }

    /// A device at time 0, and the server's side after its HELLO: SERVER_AUTH (with
    /// `limits`, for key `server_key`) and the server waiting for the finish.
    fn start(
        config: Config,
        server_key: u8,
        limits: ServerLimits,
    ) -> (Device, Bytes, ServerAwaitFinish) {
        let server_static = x25519_dalek::StaticSecret::from([0x20; 32]);
        let server_public = x25519_dalek::PublicKey::from(&server_static).to_bytes();
        let mut d = Device::new(
            &id(),
            key(7),
            &server_public,
            &mut [1; 32],
            config,
            Duration::ZERO,
        );
        let hello = d.poll_transmit().expect("HELLO");
        assert!(d.poll_transmit().is_none());
        let received = HelloReceived::parse(
            &hello,
            &crate::proto::handshake::ServerKey::from(&server_static),
        )
        .unwrap();
        assert_eq!(received.id(), Some(&id()));
        assert_eq!(received.mode(), config.mode);
        let mut auth = BytesMut::new();
        let server = received.respond(
            Some(key(server_key)),
            key(0),
            &mut [2; 32],
            limits,
            &mut auth,
        );
        (d, auth.freeze(), server)
    }

    /// A device and the server's session after a successful handshake at time 0.
    fn established(config: Config, limits: ServerLimits) -> (Device, Connection) {
        let (mut d, auth, server) = start(config, 7, limits);
        d.handle_input(&auth, Duration::ZERO);
        assert_eq!(events(&mut d), [Event::Established(limits)]);
        let finish = d.poll_transmit().expect("CLIENT_FINISH");
        let server = server.handle_finish(&finish).expect("finish verifies");
        let server = Connection::new(server.session, connection::Config::server(), Duration::ZERO);
        (d, server)
    }

    /// Moves bytes both ways until neither side has any.
    fn drive(d: &mut Device, s: &mut Connection, now: Duration) {
        loop {
            let mut moved = false;
            if let Some(b) = d.poll_transmit() {
                s.handle_input(&b, now);
                moved = true;
            }
            if let Some(b) = s.poll_transmit() {
                d.handle_input(&b, now);
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    fn failed(d: &mut Device) -> HandshakeFailure {
        match events(d).pop() {
            Some(Event::HandshakeFailed(f)) => f,
            other => panic!("expected HandshakeFailed, got {other:?}"),
        }
    }

    #[test]
    fn handshake_then_requests_both_ways() {
        let (mut d, mut s) = established(Config::default(), LIMITS);
        assert!(d.is_established());
        let now = S;
        let r = d.request(Bytes::from_static(b"q"), now).unwrap();
        drive(&mut d, &mut s, now);
        let got: Vec<_> = core::iter::from_fn(|| s.poll_event()).collect();
        assert!(matches!(&got[..], [SessionEvent::Request { seq, .. }] if *seq == r));
        s.respond(r, Status::OK, Bytes::from_static(b"a"), now)
            .unwrap();
        let q = s.request(Bytes::from_static(b"config?"), now).unwrap();
        drive(&mut d, &mut s, now);
        assert_eq!(
            events(&mut d),
            [
                Event::Session(SessionEvent::Response {
                    req_seq: r,
                    status: Status::OK,
                    payload: Bytes::from_static(b"a")
                }),
                Event::Session(SessionEvent::Request {
                    seq: q,
                    payload: Bytes::from_static(b"config?")
                }),
            ]
        );
        assert_eq!(d.unanswered_requests(), 1);
        d.respond(q, Status::OK, Bytes::new(), now).unwrap();
        d.close(CloseCode::NORMAL, "", now);
        drive(&mut d, &mut s, now);
        assert!(d.is_over());
        assert_eq!(
            events(&mut d).pop(),
            Some(Event::Session(SessionEvent::Closed(End::Closed {
                code: CloseCode::NORMAL,
                reason: "".into(),
                answer: CloseAnswer::Close
            })))
        );
    }

    #[test]
    fn each_mode_sends_its_hello_and_runs_the_same_session() {
        for mode in [Mode::Encrypted, Mode::Authenticated] {
            let config = Config {
                mode,
                ..Config::default()
            };
            let (d, _, _) = start(config, 7, LIMITS);
            assert!(matches!(d.state, State::AwaitAuth { .. }));
            let (mut d, mut s) = established(config, LIMITS);
            assert_eq!(d.connection().unwrap().session().mode(), mode);
            let r = d.request(Bytes::from_static(b"q"), S).unwrap();
            drive(&mut d, &mut s, S);
            let got: Vec<_> = core::iter::from_fn(|| s.poll_event()).collect();
            assert!(matches!(&got[..], [SessionEvent::Request { seq, .. }] if *seq == r));
        }
    }

    #[test]
    fn a_server_key_of_low_order_fails_before_anything_is_sent() {
        let mut d = Device::new(
            &id(),
            key(7),
            &[0; 32],
            &mut [1; 32],
            Config::default(),
            Duration::ZERO,
        );
        assert!(d.poll_transmit().is_none());
        assert_eq!(
            events(&mut d),
            [Event::HandshakeFailed(HandshakeFailure::Failed(
                ProtocolError::WeakKey
            ))]
        );
        assert!(d.is_over());
    }

    #[test]
    fn nothing_may_be_sent_before_the_session_is_established() {
        let (mut d, _, _) = start(Config::default(), 7, LIMITS);
        assert!(!d.is_established() && !d.is_over());
        let b = Bytes::from_static(b"early");
        assert_eq!(
            d.request(b.clone(), S),
            Err(ProtocolError::Misuse(Misuse::Closed))
        );
        assert_eq!(
            d.message(b.clone(), S),
            Err(ProtocolError::Misuse(Misuse::Closed))
        );
        assert_eq!(
            d.respond(1, Status::OK, b, S),
            Err(ProtocolError::Misuse(Misuse::Closed))
        );
        assert_eq!(d.ping(S), Err(ProtocolError::Misuse(Misuse::Closed)));
        assert!(d.poll_transmit().is_none(), "nothing after HELLO");
    }

    #[test]
    fn session_frames_that_come_with_server_auth_are_the_session_s() {
        let (mut d, auth, server) = start(Config::default(), 7, LIMITS);
        // SERVER_AUTH and the first byte of a later frame in one read, byte by byte.
        let mut bytes = auth.to_vec();
        bytes.push(0);
        for b in bytes {
            d.handle_input(&[b], Duration::ZERO);
        }
        assert_eq!(events(&mut d), [Event::Established(LIMITS)]);
        let finish = d.poll_transmit().unwrap();
        assert!(server.handle_finish(&finish).is_ok());
        assert_eq!(d.connection().unwrap().bytes_received(), 1);
    }

    #[test]
    fn a_wrong_key_fails_at_server_auth_and_sends_nothing() {
        let (mut d, auth, _) = start(Config::default(), 8, LIMITS);
        d.handle_input(&auth, S);
        assert_eq!(
            failed(&mut d),
            HandshakeFailure::Failed(ProtocolError::BadTag(TagKind::ServerAuth))
        );
        assert!(d.is_over() && !d.is_established());
        assert!(d.poll_transmit().is_none(), "no CLIENT_FINISH");
        assert_eq!(d.poll_timeout(), None);
        // Nothing after the failure changes it.
        d.handle_input(&auth, S);
        d.handle_eof(S);
        d.handle_timeout(60 * S);
        assert!(events(&mut d).is_empty());
    }

    #[test]
    fn every_refusal_before_server_auth_is_reported_with_its_code() {
        for code in [
            ErrorCode::AUTH_FAILED,
            ErrorCode::BUSY,
            ErrorCode::UNSUPPORTED_VERSION,
            ErrorCode::MALFORMED,
            ErrorCode::TIMEOUT,
            ErrorCode::INTERNAL,
        ] {
            let (mut d, _, _) = start(Config::default(), 7, LIMITS);
            let mut err = BytesMut::new();
            ErrorFrame::new(code).encode(&mut err);
            d.handle_input(&err, S);
            assert_eq!(
                failed(&mut d),
                HandshakeFailure::Failed(ProtocolError::Refused(code))
            );
            assert!(d.poll_transmit().is_none());
        }
    }

    #[test]
    fn a_refused_finish_ends_the_session_without_close() {
        // Spec 7.2: the server may refuse a CLIENT_FINISH that verified (the identity
        // taken over, revoked meanwhile) with ERROR, after ESTABLISHED.
        let (mut d, _s) = established(Config::default(), LIMITS);
        let mut err = BytesMut::new();
        ErrorFrame::new(ErrorCode::TAKEOVER_REFUSED).encode(&mut err);
        d.handle_input(&err, S);
        assert_eq!(
            events(&mut d),
            [Event::Session(SessionEvent::Closed(End::Failed(
                ProtocolError::Refused(ErrorCode::TAKEOVER_REFUSED)
            )))]
        );
        assert!(d.is_over());
        assert!(d.poll_transmit().is_none(), "no CLOSE");
    }

    #[test]
    fn bytes_that_are_not_a_handshake_frame_fail_it() {
        let (mut d, _, _) = start(Config::default(), 7, LIMITS);
        d.handle_input(b"HTTP/1.1 400 Bad Request\r\n", S);
        assert!(matches!(
            failed(&mut d),
            HandshakeFailure::Failed(ProtocolError::Frame(FrameError::TooLarge { .. }))
        ));
        let (mut d, _, _) = start(Config::default(), 7, LIMITS);
        d.handle_input(&[0, 0, 0, 0], S);
        assert_eq!(
            failed(&mut d),
            HandshakeFailure::Failed(ProtocolError::Frame(FrameError::Empty))
        );
    }

    #[test]
    fn eof_before_server_auth_is_truncation() {
        let (mut d, auth, _) = start(Config::default(), 7, LIMITS);
        d.handle_input(&auth[..10], S);
        d.handle_eof(S);
        assert_eq!(failed(&mut d), HandshakeFailure::Truncated);
    }

    #[test]
    fn the_handshake_waits_ten_seconds_for_an_answer_by_default() {
        // Spec 13.10: a server may delay a refusal; the client waits at least 10 s.
        let (mut d, _, _) = start(Config::default(), 7, LIMITS);
        assert_eq!(d.poll_timeout(), Some(10 * S));
        d.handle_timeout(10 * S - Duration::from_millis(1));
        assert!(events(&mut d).is_empty());
        // A refusal that comes late is still a refusal.
        let mut err = BytesMut::new();
        ErrorFrame::new(ErrorCode::BUSY).encode(&mut err);
        d.handle_input(&err, 9 * S);
        assert_eq!(
            failed(&mut d),
            HandshakeFailure::Failed(ProtocolError::Refused(ErrorCode::BUSY))
        );
        // And silence ends it at the deadline.
        let (mut d, _, _) = start(Config::default(), 7, LIMITS);
        d.handle_timeout(10 * S);
        assert_eq!(failed(&mut d), HandshakeFailure::TimedOut);
        // A caller may choose another deadline.
        let config = Config {
            handshake_timeout: 3 * S,
            ..Config::default()
        };
        let (d, _, _) = start(config, 7, LIMITS);
        assert_eq!(d.poll_timeout(), Some(3 * S));
    }

    #[test]
    fn closing_during_the_handshake_abandons_it() {
        let (mut d, auth, _) = start(Config::default(), 7, LIMITS);
        d.close(CloseCode(0x200), "", S);
        assert_eq!(
            failed(&mut d),
            HandshakeFailure::Abandoned(CloseCode(0x200))
        );
        d.handle_input(&auth, S);
        assert!(events(&mut d).is_empty() && !d.is_established());
    }

    #[test]
    fn keepalive_follows_the_server_or_the_device_if_shorter() {
        let short = ServerLimits {
            keepalive: 20 * S,
            ..LIMITS
        };
        for (own, server, expect) in [
            (None, LIMITS, 30 * S),
            (Some(10 * S), LIMITS, 10 * S),
            (Some(60 * S), short, 20 * S),
        ] {
            let config = Config {
                keepalive: own,
                ..Config::default()
            };
            let c = config.session(server);
            assert_eq!(
                (c.keepalive, c.idle_timeout),
                (Some(expect), Some(2 * expect))
            );
            let (mut d, mut s) = established(config, server);
            // The session's deadline is the keepalive: a PING then, answered.
            assert_eq!(d.poll_timeout(), Some(expect));
            d.handle_timeout(expect);
            drive(&mut d, &mut s, expect);
            assert!(matches!(
                events(&mut d)[..],
                [Event::Session(SessionEvent::Pong { .. })]
            ));
        }
    }

    #[test]
    fn a_silent_server_is_given_up_after_two_keepalive_intervals() {
        let (mut d, mut s) = established(Config::default(), LIMITS);
        // The device pings at 30 s; the server's PONG never comes.
        d.handle_timeout(30 * S);
        let ping = d.poll_transmit().expect("PING");
        s.handle_input(&ping, 30 * S);
        let _lost_pong = s.poll_transmit();
        assert!(events(&mut d).is_empty());
        assert_eq!(d.poll_timeout(), Some(60 * S));
        d.handle_timeout(60 * S - Duration::from_millis(1));
        assert!(d.is_established());
        d.handle_timeout(60 * S);
        let close = d.poll_transmit().expect("CLOSE IDLE_TIMEOUT");
        s.handle_input(&close, 60 * S);
        assert!(matches!(
            core::iter::from_fn(|| s.poll_event()).last(),
            Some(SessionEvent::Closed(End::PeerClosed {
                code: CloseCode::IDLE_TIMEOUT,
                ..
            }))
        ));
        // The close deadline (5 s) ends it if the server's CLOSE never arrives.
        d.handle_timeout(65 * S);
        assert!(matches!(
            events(&mut d).pop(),
            Some(Event::Session(SessionEvent::Closed(End::Closed {
                code: CloseCode::IDLE_TIMEOUT,
                answer: CloseAnswer::Nothing,
                ..
            })))
        ));
        assert_eq!(d.poll_timeout(), None);
    }

    #[test]
    fn the_connection_can_be_driven_on_its_own_once_established() {
        let (mut d, auth, _) = start(Config::default(), 7, LIMITS);
        d.handle_input(&auth, S);
        assert!(d.poll_event().is_some());
        // CLIENT_FINISH not taken yet: the device is not ready to hand its session over.
        let mut buf = BytesMut::new();
        assert!(d.transmit_into(&mut buf));
        let conn = d.into_connection().expect("established, all taken");
        assert!(conn.is_open());
        assert_eq!(conn.config().keepalive, Some(30 * S));
    }
}
