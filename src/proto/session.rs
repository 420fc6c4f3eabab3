//! The session (spec section 8): sealing and opening authenticated frames.
//!
//! Each direction has its own key and its own counter. A sender numbers its frames
//! 1, 2, 3, ...; a receiver accepts a frame only if its sequence number is exactly one
//! more than the last one it accepted, and its tag verifies. The order of checks is the
//! spec's (8.3): sequence number first (cheap), then the tag in constant time, then the
//! fields; the counter moves only after all of them passed. Any failure poisons the
//! receiving side: the session accepts nothing more and must be closed.

use bytes::{Bytes, BytesMut};

use super::error::{CloseCode, FrameError, ProtocolError, TagKind};
use super::frame::{self, Body, ErrorFrame, FrameType, SessionFrame};
use super::schedule::{FrameMac, SessionKeys};
use super::{LEN_PREFIX, MAX_FRAME_LEN_CEILING, TAG_LEN};

/// Which end of the session this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The device: sends with the c2s key.
    Client,
    /// The server: sends with the s2c key.
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Receiving {
    Open,
    PeerClosed(CloseCode),
    Failed,
}

/// An established session. Only a completed handshake can create one.
#[derive(Debug)]
pub struct Session {
    role: Role,
    send_mac: FrameMac,
    recv_mac: FrameMac,
    /// Sequence number the next sealed frame gets (spec 8.1: starts at 1).
    next_send: u64,
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
            send_mac: FrameMac::new(send),
            recv_mac: FrameMac::new(recv),
            next_send: 1,
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

    /// Sequence number of the last frame sealed (0 if none).
    pub fn last_sent(&self) -> u64 {
        self.next_send - 1
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
        (self.max_frame_len as usize).saturating_sub(Body::overhead(ty))
    }

    /// Appends `body` as the next authenticated frame to `out` and returns its
    /// sequence number.
    ///
    /// Spec 8.1: the value 2^64-1 is reserved for CLOSE; once it is reached every
    /// other frame is refused with [`ProtocolError::SequenceExhausted`], and the
    /// caller should send `Body::Close` with [`CloseCode::SEQUENCE_EXHAUSTED`].
    pub fn seal(&mut self, body: &Body, out: &mut BytesMut) -> Result<u64, ProtocolError> {
        if self.sent_close {
            return Err(ProtocolError::Closed);
        }
        let is_close = matches!(body, Body::Close { .. });
        if self.next_send == u64::MAX && !is_close {
            return Err(ProtocolError::SequenceExhausted);
        }
        if body.wire_len() - LEN_PREFIX > self.max_frame_len as usize {
            let ty = body.frame_type();
            return Err(ProtocolError::PayloadTooLarge {
                len: body.wire_len() - LEN_PREFIX - Body::overhead(ty),
                max: self.max_payload(ty),
            });
        }
        if let Body::Close { reason, .. } = body {
            if reason.len() > frame::MAX_REASON_LEN {
                return Err(ProtocolError::Frame(FrameError::BadReason));
            }
        }
        let seq = self.next_send;
        let start = out.len();
        body.encode_unsigned(seq, out);
        let tag = self.send_mac.tag(&out[start..]);
        out.extend_from_slice(&tag);
        // Saturates at u64::MAX: only a CLOSE can have been sent with that value.
        self.next_send = self.next_send.saturating_add(1);
        self.sent_close = is_close;
        Ok(seq)
    }

    /// Checks and accepts one whole frame (as [`super::decode_frame`] returns it).
    ///
    /// On error the frame is not accepted, no counter moves, and the session is
    /// poisoned: every later call fails with [`ProtocolError::Poisoned`].
    pub fn open(&mut self, frame: Bytes) -> Result<SessionFrame, ProtocolError> {
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

    fn check(&mut self, frame: Bytes) -> Result<SessionFrame, ProtocolError> {
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
        let (ty, seq) = frame::session_header(&frame)?;
        let expected = self.last_recv + 1;
        if seq != expected {
            return Err(ProtocolError::Sequence { expected, got: seq });
        }
        if seq == u64::MAX && ty != FrameType::Close {
            return Err(ProtocolError::SequenceExhausted);
        }
        // Step 2: the tag over every byte before it, in constant time.
        let split = frame.len() - TAG_LEN;
        if !self.recv_mac.verify(&frame[..split], &frame[split..]) {
            return Err(ProtocolError::BadTag(TagKind::SessionFrame));
        }
        // Step 3: the fields, and what they refer to.
        let body = Body::decode_fields(ty, frame)?;
        match body {
            Body::Response { req_seq, .. } => self.check_answer("RESPONSE", req_seq)?,
            Body::Pong { ping_seq } => self.check_answer("PONG", ping_seq)?,
            _ => {}
        }
        // Step 4: only now does the counter move.
        self.last_recv = seq;
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

    /// The tag this side's sending key gives `data`: lets fuzzers and attack tests build
    /// frames with valid tags around arbitrary fields. The holder of a session can seal
    /// anything anyway; this only skips the encoder.
    #[doc(hidden)]
    pub fn tag_for_testing(&self, data: &[u8]) -> super::Tag {
        self.send_mac.tag(data)
    }

    /// Moves both counters, to test behaviour near 2^64-1 without sending 2^64 frames.
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
        let keys = SessionKeys::derive(
            &SecretKey::from_bytes([5; 32]),
            &[1; 32],
            &[2; 32],
            &[3; 32],
        );
        (
            Session::new(Role::Client, &keys, 1024),
            Session::new(Role::Server, &keys, 1024),
        )
    }

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

    #[test]
    fn request_response_round_trip() {
        let (mut c, mut s) = pair();
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

    #[test]
    fn replay_is_refused_and_poisons() {
        let (mut c, mut s) = pair();
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

    #[test]
    fn gap_and_reorder_are_refused() {
        let (mut c, mut s) = pair();
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

    #[test]
    fn counter_moves_only_after_tag_verifies() {
        let (mut c, mut s) = pair();
        let f = seal(&mut c, req(b"x"));
        let mut bad = f.to_vec();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            s.open(Bytes::from(bad)),
            Err(ProtocolError::BadTag(TagKind::SessionFrame))
        );
        assert_eq!(s.last_received(), 0);
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let (mut c, mut s) = pair();
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
            send_mac: s.send_mac.clone(),
            recv_mac: s.recv_mac.clone(),
            next_send: s.next_send,
            last_recv: s.last_recv,
            max_frame_len: s.max_frame_len,
            sent_close: s.sent_close,
            receiving: s.receiving,
        }
    }

    #[test]
    fn reflected_frame_is_refused() {
        // A client's own request sent back to it as if from the server.
        let (mut c, _s) = pair();
        let f = seal(&mut c, req(b"reflect me"));
        assert_eq!(c.open(f), Err(ProtocolError::BadTag(TagKind::SessionFrame)));
    }

    #[test]
    fn unsolicited_response_is_refused() {
        let (mut c, mut s) = pair();
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

    #[test]
    fn pong_must_answer_a_sent_ping() {
        let (mut c, mut s) = pair();
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

    #[test]
    fn close_ends_both_directions() {
        let (mut c, mut s) = pair();
        let close = Body::Close {
            code: CloseCode::NORMAL,
            reason: "bye".into(),
        };
        let f = seal(&mut c, close.clone());
        assert_eq!(
            c.seal(&req(b"late"), &mut BytesMut::new()),
            Err(ProtocolError::Closed)
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

    #[test]
    fn last_sequence_number_is_reserved_for_close() {
        let (mut c, mut s) = pair();
        c.set_counters_for_testing(u64::MAX - 1, 0);
        s.set_counters_for_testing(1, u64::MAX - 2);
        let f = seal(&mut c, req(b"last request"));
        assert_eq!(s.open(f).unwrap().seq, u64::MAX - 1);
        assert_eq!(
            c.seal(&req(b"one more"), &mut BytesMut::new()),
            Err(ProtocolError::SequenceExhausted)
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
            Err(ProtocolError::Closed)
        );
    }

    #[test]
    fn receiver_refuses_non_close_at_last_sequence_number() {
        // A peer that ignores the rule: its frame at 2^64-1 is refused even with a valid tag.
        let (mut c, mut s) = pair();
        c.set_counters_for_testing(u64::MAX, 0);
        s.set_counters_for_testing(1, u64::MAX - 1);
        let mut out = BytesMut::new();
        req(b"x").encode_unsigned(u64::MAX, &mut out);
        let tag = c.send_mac.tag(&out);
        out.extend_from_slice(&tag);
        assert_eq!(s.open(out.freeze()), Err(ProtocolError::SequenceExhausted));
    }

    #[test]
    fn payload_limit_is_enforced_when_sealing() {
        let (mut c, _) = pair();
        let max = c.max_payload(FrameType::Request);
        assert_eq!(max, 1024 - 41);
        let ok = Body::Request {
            payload: Bytes::from(vec![0; max]),
        };
        c.seal(&ok, &mut BytesMut::new()).unwrap();
        let big = Body::Request {
            payload: Bytes::from(vec![0; max + 1]),
        };
        assert_eq!(
            c.seal(&big, &mut BytesMut::new()),
            Err(ProtocolError::PayloadTooLarge { len: max + 1, max })
        );
        assert_eq!(c.last_sent(), 1);
    }

    #[test]
    fn close_reason_is_bounded_and_utf8() {
        let (mut c, mut s) = pair();
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
            let mut out = BytesMut::new();
            Body::Close {
                code: CloseCode::NORMAL,
                reason: String::new(),
            }
            .encode_unsigned(1, &mut out);
            out.extend_from_slice(&reason);
            let len = (out.len() - LEN_PREFIX + TAG_LEN) as u32;
            out[..4].copy_from_slice(&len.to_be_bytes());
            let tag = c.send_mac.tag(&out);
            out.extend_from_slice(&tag);
            let mut s2 = clone_session(&s);
            assert_eq!(
                s2.open(out.freeze()),
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

    #[test]
    fn error_frame_is_reported_as_refusal() {
        let (mut c, _) = pair();
        let mut out = BytesMut::new();
        ErrorFrame::new(crate::proto::ErrorCode::AUTH_FAILED).encode(&mut out);
        assert_eq!(
            c.open(out.freeze()),
            Err(ProtocolError::Refused(crate::proto::ErrorCode::AUTH_FAILED))
        );
    }
}
