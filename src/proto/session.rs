//! The session (spec section 8): sealing and opening authenticated frames.
//!
//! Each direction has its own key and its own counter. A sender numbers its frames
//! 1, 2, 3, ...; a receiver accepts a frame only if its sequence number is exactly one
//! more than the last one it accepted, and its tag verifies. The order of checks is the
//! spec's (8.3): sequence number first (cheap), then the tag in constant time, then the
//! fields; the counter moves only after all of them passed. Any failure poisons the
//! receiving side: the session accepts nothing more and must be closed.

use bytes::{Bytes, BytesMut};

use super::error::{CloseCode, FrameError, Misuse, ProtocolError, TagKind};
use super::frame::{self, Body, ErrorFrame, FrameType, Mode, SessionFrame};
use super::schedule::{AeadNonce, FrameKey, SessionKeys};
use super::{LEN_PREFIX, MAX_FRAME_LEN_CEILING};

/// Which end of the session this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The device: sends with the c2s key.
    Client,
    /// The server: sends with the s2c key.
    Server,
}

impl Role {
    /// The `direction` of the frames this role sends, in the encrypted mode's nonce
    /// (spec 8.2): 0 client to server, 1 server to client.
    fn direction(self) -> u32 {
        match self {
            Role::Client => 0,
            Role::Server => 1,
        }
    }

    fn peer(self) -> Role {
        match self {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        }
    }
}

/// The encrypted mode's nonce of the frame numbered `seq` sent by `sender` (spec 8.2).
fn nonce(sender: Role, seq: u64) -> AeadNonce {
    let mut n = [0; 12];
    n[..4].copy_from_slice(&sender.direction().to_be_bytes());
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Receiving {
    Open,
    PeerClosed(CloseCode),
    Failed,
}

/// A received frame, as the caller holds it.
enum Incoming {
    /// Shared with other buffers (a `Bytes`): checked in place, copied only to decrypt.
    Shared(Bytes),
    /// This side's alone: decrypted where it lies.
    Owned(BytesMut),
}

impl core::ops::Deref for Incoming {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Incoming::Shared(b) => b,
            Incoming::Owned(b) => b,
        }
    }
}

/// An established session. Only a completed handshake can create one.
#[derive(Debug)]
pub struct Session {
    role: Role,
    mode: Mode,
    send_key: FrameKey,
    recv_key: FrameKey,
    /// Sequence number the next sealed frame gets (spec 8.1: starts at 1).
    next_send: u64,
    /// Frames sealed with the current sending key (spec 8.7).
    sealed_on_key: u64,
    /// Last sequence number accepted (0: none yet).
    last_recv: u64,
    /// Largest length field this side will send.
    max_frame_len: u32,
    sent_close: bool,
    receiving: Receiving,
}

impl Session {
    pub(crate) fn new(role: Role, keys: &SessionKeys, max_frame_len: u32) -> Session {
        let (send, recv) = match role {
            Role::Client => (&keys.c2s, &keys.s2c),
            Role::Server => (&keys.s2c, &keys.c2s),
        };
        Session {
            role,
            mode: keys.mode,
            send_key: FrameKey::new(send, keys.mode),
            recv_key: FrameKey::new(recv, keys.mode),
            next_send: 1,
            sealed_on_key: 0,
            last_recv: 0,
            max_frame_len: max_frame_len.min(MAX_FRAME_LEN_CEILING),
            sent_close: false,
            receiving: Receiving::Open,
        }
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// How this session's frames are protected (spec 7.7).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Sequence number of the last frame sealed (0 if none).
    pub fn last_sent(&self) -> u64 {
        self.next_send - 1
    }

    /// Frames sealed with the current sending key, since the session began or the last
    /// KEY_UPDATE this side sent (spec 8.7).
    pub fn sealed_on_key(&self) -> u64 {
        self.sealed_on_key
    }

    /// Sequence number of the last frame accepted (0 if none).
    pub fn last_received(&self) -> u64 {
        self.last_recv
    }

    /// Whether this side may still send (it has not sent CLOSE).
    pub fn can_send(&self) -> bool {
        !self.sent_close
    }

    /// The largest frame `length` this side sends: the limit its peer announced.
    pub fn max_frame_len(&self) -> u32 {
        self.max_frame_len
    }

    /// The largest payload a frame of type `ty` can carry under the peer's limit.
    pub fn max_payload(&self, ty: FrameType) -> usize {
        (self.max_frame_len as usize).saturating_sub(Body::overhead(ty, self.mode))
    }

    /// Appends `body` as the next authenticated frame to `out` and returns its
    /// sequence number.
    ///
    /// Spec 8.1: the value 2^64-1 is reserved for CLOSE; once it is reached every
    /// other frame is refused with [`Misuse::Exhausted`], and the
    /// caller should send `Body::Close` with [`CloseCode::SEQUENCE_EXHAUSTED`].
    pub fn seal(&mut self, body: &Body, out: &mut BytesMut) -> Result<u64, ProtocolError> {
        if self.sent_close {
            return Err(ProtocolError::Misuse(Misuse::Closed));
        }
        let is_close = matches!(body, Body::Close { .. });
        if self.next_send == u64::MAX && !is_close {
            return Err(ProtocolError::Misuse(Misuse::Exhausted));
        }
        let wire_len = body.wire_len(self.mode);
        if wire_len - LEN_PREFIX > self.max_frame_len as usize {
            let ty = body.frame_type();
            return Err(ProtocolError::Misuse(Misuse::PayloadTooLarge {
                len: wire_len - LEN_PREFIX - Body::overhead(ty, self.mode),
                max: self.max_payload(ty),
            }));
        }
        if let Body::Close { reason, .. } = body {
            if reason.len() > frame::MAX_REASON_LEN {
                return Err(ProtocolError::Frame(FrameError::BadReason));
            }
        }
        let seq = self.next_send;
        // Written at the end of `out`, then tagged, or its fields encrypted where they are.
        let start = out.len();
        out.reserve(wire_len);
        body.encode_unsigned(seq, self.mode, out);
        self.send_key.seal_from(&nonce(self.role, seq), out, start);
        // Saturates at u64::MAX: only a CLOSE can have been sent with that value.
        self.next_send = self.next_send.saturating_add(1);
        self.sent_close = is_close;
        self.sealed_on_key += 1;
        if matches!(body, Body::KeyUpdate) {
            // Spec 8.7: every later frame is sealed with the next key.
            self.send_key.update();
            self.sealed_on_key = 0;
        }
        Ok(seq)
    }

    /// Checks and accepts one whole frame (as [`super::decode_frame`] returns it).
    ///
    /// On error the frame is not accepted, no counter moves, and the session is
    /// poisoned: every later call fails with [`ProtocolError::Poisoned`].
    ///
    /// In the encrypted mode a frame is decrypted in place: one whose buffer is shared
    /// is copied first, after the checks that cost nothing (8.3 steps 1 to 3). A receive
    /// loop hands [`Session::open_owned`] what [`super::codec::decode_frame_owned`]
    /// returns instead, and nothing is copied in either mode.
    pub fn open(&mut self, frame: Bytes) -> Result<SessionFrame, ProtocolError> {
        self.open_frame(Incoming::Shared(frame))
    }

    /// [`Session::open`] for a frame this side owns alone: checked, and in the encrypted
    /// mode decrypted, where it lies.
    pub fn open_owned(&mut self, frame: BytesMut) -> Result<SessionFrame, ProtocolError> {
        self.open_frame(Incoming::Owned(frame))
    }

    fn open_frame(&mut self, frame: Incoming) -> Result<SessionFrame, ProtocolError> {
        match self.receiving {
            Receiving::Open => {}
            Receiving::PeerClosed(code) => return Err(ProtocolError::PeerClosed(code)),
            Receiving::Failed => return Err(ProtocolError::Poisoned),
        }
        let result = self.check(frame);
        match &result {
            Ok(SessionFrame {
                body: Body::Close { code, .. },
                ..
            }) => self.receiving = Receiving::PeerClosed(*code),
            Ok(_) => {}
            Err(_) => self.receiving = Receiving::Failed,
        }
        result
    }

    fn check(&mut self, frame: Incoming) -> Result<SessionFrame, ProtocolError> {
        // Spec 8.3 step 2: ERROR ends the connection. Before the first session frame it
        // is the server refusing the client's finish (spec 7.2); anywhere else it cannot
        // have come from the peer (ERROR is never part of a session), so it is reported
        // as a cut, never as something the server said.
        if let Some(code) = ErrorFrame::code_if_error(&frame) {
            return Err(if self.role == Role::Client && self.last_recv == 0 {
                ProtocolError::Refused(code)
            } else {
                ProtocolError::InjectedError(code)
            });
        }
        // Spec 8.3 step 1: type and sequence number, the cheap checks.
        let (ty, seq) = frame::session_header(&frame, self.mode)?;
        // DELIVER goes only to a client, ACK only to a server (4.1, 8.8): the wrong
        // direction is malformed like an unknown type.
        let to = match ty {
            FrameType::Deliver => Some(Role::Client),
            FrameType::Ack => Some(Role::Server),
            _ => None,
        };
        if to.is_some_and(|to| to != self.role) {
            return Err(FrameError::UnexpectedType {
                got: ty as u8,
                what: "a session frame of the other direction",
            }
            .into());
        }
        let expected = self.last_recv + 1;
        if seq != expected {
            return Err(ProtocolError::Sequence { expected, got: seq });
        }
        if seq == u64::MAX && ty != FrameType::Close {
            return Err(ProtocolError::SequenceExhausted);
        }
        // Step 2: the tag over every byte before it, in constant time; in the encrypted
        // mode the fields are decrypted in place once it verified.
        let nonce = nonce(self.role.peer(), seq);
        let frame = match (frame, self.mode) {
            (Incoming::Shared(frame), Mode::Authenticated) => self
                .recv_key
                .verify(&frame)
                .then_some(frame)
                .ok_or(ProtocolError::BadTag(TagKind::SessionFrame))?,
            (frame, _) => {
                let mut frame = match frame {
                    Incoming::Owned(f) => f,
                    Incoming::Shared(f) => f
                        .try_into_mut()
                        .unwrap_or_else(|shared| BytesMut::from(&shared[..])),
                };
                if !self.recv_key.open(&nonce, &mut frame) {
                    return Err(ProtocolError::BadTag(TagKind::SessionFrame));
                }
                frame.freeze()
            }
        };
        // Step 3: the fields, and what they refer to.
        let body = Body::decode_fields(ty, frame, self.mode)?;
        match body {
            Body::Response { req_seq, .. } => self.check_answer("RESPONSE", req_seq)?,
            Body::Pong { ping_seq } => self.check_answer("PONG", ping_seq)?,
            _ => {}
        }
        // Step 4: only now does the counter move.
        self.last_recv = seq;
        if body == Body::KeyUpdate {
            // Spec 8.7: the peer seals every later frame with its next key.
            self.recv_key.update();
        }
        Ok(SessionFrame { seq, body })
    }

    /// Spec 8.3: an answer must name a sequence number this side has already sent.
    fn check_answer(&self, what: &'static str, got: u64) -> Result<(), ProtocolError> {
        let last_sent = self.last_sent();
        if got == 0 || got > last_sent {
            return Err(ProtocolError::UnsolicitedAnswer {
                what,
                got,
                last_sent,
            });
        }
        Ok(())
    }

    /// A frame of any type byte, sequence number and fields, protected with this side's
    /// current sending key and the nonce of `seq` (spec 8.2), without moving any
    /// counter: lets fuzzers and attack tests build frames with valid tags around
    /// arbitrary fields. The holder of a session can seal anything anyway; this only
    /// skips the encoder and its rules.
    #[cfg(any(test, feature = "testing"))]
    #[doc(hidden)]
    pub fn forge_for_testing(&self, ty: u8, seq: u64, fields: &[u8]) -> alloc::vec::Vec<u8> {
        self.forge_with_nonce_for_testing(ty, seq, self.role.direction(), fields)
    }

    /// [`Session::forge_for_testing`] with the encrypted mode's nonce naming `direction`
    /// (spec 8.2): a sender that reuses the other direction's nonces.
    #[cfg(any(test, feature = "testing"))]
    #[doc(hidden)]
    pub fn forge_with_nonce_for_testing(
        &self,
        ty: u8,
        seq: u64,
        direction: u32,
        fields: &[u8],
    ) -> alloc::vec::Vec<u8> {
        let len = 1 + 8 + fields.len() + self.mode.tag_len();
        let mut out = BytesMut::with_capacity(LEN_PREFIX + len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&[ty]);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(fields);
        let mut n = nonce(self.role, seq);
        n[..4].copy_from_slice(&direction.to_be_bytes());
        self.send_key.seal(&n, &mut out);
        out.to_vec()
    }

    /// Moves both counters, to test behaviour near 2^64-1 without sending 2^64 frames.
    #[cfg(any(test, feature = "testing"))]
    #[doc(hidden)]
    pub fn set_counters_for_testing(&mut self, next_send: u64, last_recv: u64) {
        self.next_send = next_send;
        self.last_recv = last_recv;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::proto::schedule::SecretKey;
    use crate::proto::Status;

    pub(crate) fn pair() -> (Session, Session) {
        pair_in(Mode::Authenticated)
    }

    /// A client and a server session of one handshake's keys, in `mode`.
    pub(crate) fn pair_in(mode: Mode) -> (Session, Session) {
        let k = SecretKey::from_bytes([5; 32]);
        let keys = match mode {
            Mode::Authenticated => SessionKeys::derive(&k, &[1; 32], &[2; 32], &[3; 32]),
            Mode::Encrypted => SessionKeys::derive_sealed(
                &k,
                &[1; 32],
                &[2; 32],
                &SecretKey::from_bytes([6; 32]),
                &SecretKey::from_bytes([7; 32]),
                &[3; 32],
            ),
        };
        (
            Session::new(Role::Client, &keys, 1024),
            Session::new(Role::Server, &keys, 1024),
        )
    }

    /// Every rule of 8.3 holds alike in both modes: each test below runs in each.
    macro_rules! in_both_modes {
        ($($name:ident),* $(,)?) => {
            mod authenticated {
                $(#[test] fn $name() { super::$name(super::Mode::Authenticated) })*
            }
            mod encrypted {
                $(#[test] fn $name() { super::$name(super::Mode::Encrypted) })*
            }
        };
    }

    in_both_modes!(
        request_response_round_trip,
        replay_is_refused_and_poisons,
        gap_and_reorder_are_refused,
        counter_moves_only_after_tag_verifies,
        every_flipped_bit_is_refused,
        reflected_frame_is_refused,
        unsolicited_response_is_refused,
        pong_must_answer_a_sent_ping,
        close_ends_both_directions,
        last_sequence_number_is_reserved_for_close,
        receiver_refuses_non_close_at_last_sequence_number,
        payload_limit_is_enforced_when_sealing,
        close_reason_is_bounded_and_utf8,
        error_frame_is_reported_as_refusal,
        key_update_moves_each_direction_forward,
    );

    fn seal(s: &mut Session, body: Body) -> Bytes {
        let mut out = BytesMut::new();
        s.seal(&body, &mut out).unwrap();
        out.freeze()
    }

    fn req(p: &'static [u8]) -> Body {
        Body::Request {
            payload: Bytes::from_static(p),
        }
    }

    fn request_response_round_trip(mode: Mode) {
        let (mut c, mut s) = pair_in(mode);
        let f = seal(&mut c, req(b"hi"));
        let got = s.open(f).unwrap();
        assert_eq!(
            got,
            SessionFrame {
                seq: 1,
                body: req(b"hi")
            }
        );
        let resp = Body::Response {
            req_seq: 1,
            status: Status::OK,
            payload: Bytes::from_static(b"yo"),
        };
        let got = c.open(seal(&mut s, resp.clone())).unwrap();
        assert_eq!(got, SessionFrame { seq: 1, body: resp });
        assert_eq!((c.last_sent(), c.last_received()), (1, 1));
    }

    fn replay_is_refused_and_poisons(mode: Mode) {
        let (mut c, mut s) = pair_in(mode);
        let f = seal(&mut c, req(b"a"));
        s.open(f.clone()).unwrap();
        assert_eq!(
            s.open(f),
            Err(ProtocolError::Sequence {
                expected: 2,
                got: 1
            })
        );
        let next = seal(&mut c, req(b"b"));
        assert_eq!(s.open(next), Err(ProtocolError::Poisoned));
    }

    fn gap_and_reorder_are_refused(mode: Mode) {
        let (mut c, mut s) = pair_in(mode);
        let _dropped = seal(&mut c, req(b"1"));
        let second = seal(&mut c, req(b"2"));
        assert_eq!(
            s.open(second),
            Err(ProtocolError::Sequence {
                expected: 1,
                got: 2
            })
        );
    }

    fn counter_moves_only_after_tag_verifies(mode: Mode) {
        let (mut c, mut s) = pair_in(mode);
        let f = seal(&mut c, req(b"x"));
        let mut bad = f.to_vec();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            s.open(Bytes::from(bad)),
            Err(ProtocolError::BadTag(TagKind::SessionFrame))
        );
        assert_eq!(s.last_received(), 0);
    }

    fn every_flipped_bit_is_refused(mode: Mode) {
        let (mut c, mut s) = pair_in(mode);
        seal(&mut c, req(b"ask"));
        let resp = Body::Response {
            req_seq: 1,
            status: Status::OK,
            payload: Bytes::from_static(b"pay"),
        };
        let f = seal(&mut s, resp);
        for i in 0..f.len() * 8 {
            let mut bad = f.to_vec();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                clone_session(&c).open(Bytes::from(bad)).is_err(),
                "bit {i} accepted"
            );
        }
        assert!(
            clone_session(&c).open(f).is_ok(),
            "the unmodified frame must pass"
        );
    }

    fn clone_session(s: &Session) -> Session {
        Session {
            role: s.role,
            mode: s.mode,
            send_key: s.send_key.clone(),
            recv_key: s.recv_key.clone(),
            next_send: s.next_send,
            sealed_on_key: s.sealed_on_key,
            last_recv: s.last_recv,
            max_frame_len: s.max_frame_len,
            sent_close: s.sent_close,
            receiving: s.receiving,
        }
    }

    fn reflected_frame_is_refused(mode: Mode) {
        // A client's own request sent back to it as if from the server.
        let (mut c, _s) = pair_in(mode);
        let f = seal(&mut c, req(b"reflect me"));
        assert_eq!(c.open(f), Err(ProtocolError::BadTag(TagKind::SessionFrame)));
    }

    fn unsolicited_response_is_refused(mode: Mode) {
        let (mut c, mut s) = pair_in(mode);
        let resp = Body::Response {
            req_seq: 1,
            status: Status::OK,
            payload: Bytes::new(),
        };
        let f = seal(&mut s, resp);
        assert!(matches!(
            c.open(f),
            Err(ProtocolError::UnsolicitedAnswer {
                got: 1,
                last_sent: 0,
                ..
            })
        ));
    }

    fn pong_must_answer_a_sent_ping(mode: Mode) {
        let (mut c, mut s) = pair_in(mode);
        let ping = seal(&mut c, Body::Ping);
        assert_eq!(s.open(ping).unwrap().body, Body::Ping);
        assert_eq!(
            c.open(seal(&mut s, Body::Pong { ping_seq: 1 }))
                .unwrap()
                .body,
            Body::Pong { ping_seq: 1 }
        );
        assert!(matches!(
            c.open(seal(&mut s, Body::Pong { ping_seq: 2 })),
            Err(ProtocolError::UnsolicitedAnswer { .. })
        ));
    }

    fn close_ends_both_directions(mode: Mode) {
        let (mut c, mut s) = pair_in(mode);
        let close = Body::Close {
            code: CloseCode::NORMAL,
            reason: "bye".into(),
        };
        let f = seal(&mut c, close.clone());
        assert_eq!(
            c.seal(&req(b"late"), &mut BytesMut::new()),
            Err(ProtocolError::Misuse(Misuse::Closed))
        );
        assert_eq!(s.open(f).unwrap().body, close);
        let mut out = BytesMut::new();
        // The client can no longer send; the server may still answer.
        s.seal(&req(b"still"), &mut out).unwrap();
        assert_eq!(
            s.open(Bytes::new()),
            Err(ProtocolError::PeerClosed(CloseCode::NORMAL))
        );
    }

    fn last_sequence_number_is_reserved_for_close(mode: Mode) {
        let (mut c, mut s) = pair_in(mode);
        c.set_counters_for_testing(u64::MAX - 1, 0);
        s.set_counters_for_testing(1, u64::MAX - 2);
        let f = seal(&mut c, req(b"last request"));
        assert_eq!(s.open(f).unwrap().seq, u64::MAX - 1);
        assert_eq!(
            c.seal(&req(b"one more"), &mut BytesMut::new()),
            Err(ProtocolError::Misuse(Misuse::Exhausted))
        );
        let close = Body::Close {
            code: CloseCode::SEQUENCE_EXHAUSTED,
            reason: String::new(),
        };
        let f = seal(&mut c, close.clone());
        assert_eq!(
            s.open(f).unwrap(),
            SessionFrame {
                seq: u64::MAX,
                body: close
            }
        );
        assert_eq!(
            c.seal(&Body::Ping, &mut BytesMut::new()),
            Err(ProtocolError::Misuse(Misuse::Closed))
        );
    }

    fn receiver_refuses_non_close_at_last_sequence_number(mode: Mode) {
        // A peer that ignores the rule: its frame at 2^64-1 is refused even with a valid tag.
        let (mut c, mut s) = pair_in(mode);
        c.set_counters_for_testing(u64::MAX, 0);
        s.set_counters_for_testing(1, u64::MAX - 1);
        let forged = c.forge_for_testing(FrameType::Request as u8, u64::MAX, b"x");
        assert_eq!(
            s.open(Bytes::from(forged)),
            Err(ProtocolError::SequenceExhausted)
        );
    }

    fn payload_limit_is_enforced_when_sealing(mode: Mode) {
        let (mut c, _) = pair_in(mode);
        let max = c.max_payload(FrameType::Request);
        assert_eq!(max, 1024 - 9 - mode.tag_len());
        let ok = Body::Request {
            payload: Bytes::from(vec![0; max]),
        };
        c.seal(&ok, &mut BytesMut::new()).unwrap();
        let big = Body::Request {
            payload: Bytes::from(vec![0; max + 1]),
        };
        assert_eq!(
            c.seal(&big, &mut BytesMut::new()),
            Err(ProtocolError::Misuse(Misuse::PayloadTooLarge {
                len: max + 1,
                max
            }))
        );
        assert_eq!(c.last_sent(), 1);
    }

    fn close_reason_is_bounded_and_utf8(mode: Mode) {
        let (mut c, mut s) = pair_in(mode);
        let long = Body::Close {
            code: CloseCode::NORMAL,
            reason: "x".repeat(256),
        };
        assert_eq!(
            c.seal(&long, &mut BytesMut::new()),
            Err(ProtocolError::Frame(FrameError::BadReason))
        );
        // A peer that ignores the rule: a valid tag over a 256-byte or non-UTF-8 reason.
        for reason in [vec![b'x'; 256], vec![0xff, 0xfe]] {
            let mut fields = CloseCode::NORMAL.0.to_be_bytes().to_vec();
            fields.extend_from_slice(&reason);
            let forged = c.forge_for_testing(FrameType::Close as u8, 1, &fields);
            let mut s2 = clone_session(&s);
            assert_eq!(
                s2.open(Bytes::from(forged)),
                Err(ProtocolError::Frame(FrameError::BadReason))
            );
        }
        let ok = seal(
            &mut c,
            Body::Close {
                code: CloseCode::NORMAL,
                reason: "é".repeat(127),
            },
        );
        assert!(s.open(ok).is_ok());
    }

    fn error_frame_is_reported_as_refusal(mode: Mode) {
        let (mut c, _) = pair_in(mode);
        let mut out = BytesMut::new();
        ErrorFrame::new(crate::proto::ErrorCode::AUTH_FAILED).encode(&mut out);
        assert_eq!(
            c.open(out.freeze()),
            Err(ProtocolError::Refused(crate::proto::ErrorCode::AUTH_FAILED))
        );
    }

    fn key_update_moves_each_direction_forward(mode: Mode) {
        let (mut c, mut s) = pair_in(mode);
        let before = seal(&mut c, req(b"a"));
        let update = seal(&mut c, Body::KeyUpdate);
        let after = seal(&mut c, req(b"b"));
        assert_eq!(
            c.sealed_on_key(),
            1,
            "the count starts again after KEY_UPDATE"
        );
        // A frame sealed with the old key at the next number: what a receiver that
        // missed the update, or an attacker holding the old key, would send.
        let stale = c_before_update(&c, mode).forge_for_testing(FrameType::Request as u8, 3, b"b");
        let mut s_stale = clone_session(&s);
        s_stale.open(before.clone()).unwrap();
        s_stale.open(update.clone()).unwrap();
        assert_eq!(
            s_stale.open(Bytes::from(stale)),
            Err(ProtocolError::BadTag(TagKind::SessionFrame))
        );
        // In order, the receiver follows.
        assert_eq!(s.open(before).unwrap().seq, 1);
        assert_eq!(s.open(update).unwrap().body, Body::KeyUpdate);
        assert_eq!(s.open(after).unwrap().body, req(b"b"));
        // The other direction is untouched until its own KEY_UPDATE.
        let pong = seal(&mut s, Body::Ping);
        assert_eq!(c.open(pong).unwrap().body, Body::Ping);
    }

    /// The client of `pair_in(mode)` before any KEY_UPDATE (same keys, fresh counters).
    fn c_before_update(c: &Session, mode: Mode) -> Session {
        let (fresh, _) = pair_in(mode);
        assert_eq!(fresh.role(), c.role());
        fresh
    }

    #[test]
    fn encrypted_fields_are_not_in_the_clear() {
        let (mut c, mut s) = pair_in(Mode::Encrypted);
        let secret = b"wifi-password=hunter2";
        let f = seal(&mut c, req(secret));
        assert_eq!(
            f.len(),
            4 + 1 + 8 + secret.len() + 16,
            "29 bytes of overhead"
        );
        assert!(!f.windows(secret.len()).any(|w| w == secret));
        assert_eq!(s.open(f).unwrap().body, req(secret));
    }

    #[test]
    fn encrypted_nonce_names_the_direction() {
        // A frame sealed with the right key but the other direction's nonce (a sender
        // that reused the peer's nonce space) does not open.
        let (c, mut s) = pair_in(Mode::Encrypted);
        let mut f = BytesMut::new();
        Body::Ping.encode_unsigned(1, Mode::Encrypted, &mut f);
        c.send_key.seal(&nonce(Role::Server, 1), &mut f);
        assert_eq!(
            s.open(f.freeze()),
            Err(ProtocolError::BadTag(TagKind::SessionFrame))
        );
    }

    #[test]
    fn encrypted_frame_too_short_for_its_tag_is_malformed() {
        let (_, mut s) = pair_in(Mode::Encrypted);
        let mut f = BytesMut::new();
        Body::Ping.encode_unsigned(1, Mode::Encrypted, &mut f);
        f.extend_from_slice(&[0; 15]);
        f[..4].copy_from_slice(&(24u32).to_be_bytes());
        assert!(matches!(
            s.open(f.freeze()),
            Err(ProtocolError::Frame(FrameError::Truncated { .. }))
        ));
    }
}
