//! Errors of the protocol core, and the codes that go on the wire (spec section 10).
//!
//! Three enums: [`FrameError`] says a frame's bytes are malformed; [`ProtocolError`]
//! says a well-formed frame broke a rule of a state machine; [`Misuse`] (inside
//! `ProtocolError::Misuse`) says the caller asked for what the protocol does not allow
//! now: nothing was sent, nothing was received, and the peer did nothing wrong. The
//! peer's errors map to the terse code sent to it ([`ErrorCode`] before a session
//! exists, [`CloseCode`] after); the precise text of the error is for the local log
//! only.

use core::fmt;

pub use super::codec::FrameError;
pub use super::codes::{CloseCode, ErrorCode};
use super::mode::Mode;

/// A rule of a state machine was broken: by the peer, or (`Misuse`) by the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The caller asked for what the protocol does not allow now; nothing was sent and
    /// the session goes on (unless it had ended already).
    #[error(transparent)]
    Misuse(#[from] Misuse),
    /// The frame itself was malformed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A tag did not verify. The frame was not sent by the peer in this session.
    #[error("{0} tag did not verify")]
    BadTag(TagKind),
    /// ENROLL_INIT asked for open mode and this server accepts only per-identity tokens.
    #[error("open enrollment is disabled on this server")]
    OpenModeDisabled,
    /// A session frame's sequence number is not the next one (replay, reorder, gap).
    #[error("sequence number {got} where {expected} was expected")]
    Sequence {
        /// The only sequence number that would have been accepted.
        expected: u64,
        /// The one that was received.
        got: u64,
    },
    /// A RESPONSE or PONG names a sequence number this side never sent.
    #[error("{what} answers sequence number {got}, but the last frame sent was {last_sent}")]
    UnsolicitedAnswer {
        /// "RESPONSE" or "PONG".
        what: &'static str,
        /// The sequence number it claims to answer.
        got: u64,
        /// Our last sent sequence number.
        last_sent: u64,
    },
    /// The peer's frame numbered 2^64-1 is not CLOSE: only CLOSE may use that last
    /// value (spec 8.1).
    #[error("the peer's sequence numbers are exhausted and its last frame is not CLOSE")]
    SequenceExhausted,
    /// The peer sent an ERROR frame (unauthenticated) and the exchange is over.
    #[error("peer refused: {0}")]
    Refused(ErrorCode),
    /// An ERROR frame inside a session, after a session frame was accepted (or sent to
    /// a server at all). ERROR is never part of a session (spec 4.4): the connection
    /// was tampered with, and is treated as cut (spec 8.3 step 2).
    #[error("an unauthenticated ERROR frame ({0}) arrived inside the session: treated as a cut connection")]
    InjectedError(ErrorCode),
    /// The peer sent CLOSE: nothing more will be received in this session.
    #[error("session already closed by peer ({0})")]
    PeerClosed(CloseCode),
    /// An X25519 result was all zeros (peer sent a low-order point, spec 6).
    #[error("peer's public key is of low order")]
    WeakKey,
    /// SEALED_HELLO's ephemeral key is of low order (spec 7.2 row 5a): refused like a
    /// malformed HELLO, not like a refused enrollment.
    #[error("the client's ephemeral key is of low order")]
    WeakHelloKey,
    /// The server's policy does not accept the mode the first frame starts (spec 7.8).
    #[error("the {0} mode is refused by this server's policy")]
    ModeRefused(Mode),
    /// An earlier frame failed; the session accepts nothing more (spec 8.3).
    #[error("session failed earlier and accepts no more frames")]
    Poisoned,
    /// An ACK names a message id that no DELIVER of this session awaits (never
    /// delivered in it, or acknowledged already: spec 8.8 allows exactly one ACK).
    #[error("ACK names message {0}, which no delivery of this session awaits")]
    UnsolicitedAck(u64),
    /// A DELIVER whose message id is not above the last one delivered in this session
    /// (spec 8.8: in one session, ids only increase).
    #[error("DELIVER of message {msg_id} after message {last} in the same session")]
    DeliveryOrder {
        /// The id delivered now.
        msg_id: u64,
        /// The last one delivered before it.
        last: u64,
    },
}

/// A call that the protocol does not allow at this point: the caller's mistake, or a
/// session that ended under it. Nothing was sent; the peer is not at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Misuse {
    /// The session is not open: this side sent CLOSE (or the session is not
    /// established yet, or it ended): nothing more may be sent.
    #[error("session already closed by this side")]
    Closed,
    /// This side's sending counter reached 2^64-1: only CLOSE may use that last value,
    /// and the session must end (spec 8.1).
    #[error("sequence numbers are exhausted; the session must end")]
    Exhausted,
    /// The payload does not fit in one frame under the negotiated limit.
    #[error("payload of {len} bytes exceeds the maximum of {max} bytes")]
    PayloadTooLarge {
        /// Payload length asked for.
        len: usize,
        /// Largest payload that fits.
        max: usize,
    },
    /// A RESPONSE for a sequence number that is not a REQUEST of the peer awaiting an
    /// answer (never received, or answered already: spec 8.4 allows exactly one).
    #[error("no request {0} of the peer awaits an answer")]
    NotPending(u64),
    /// An ACK for a message id this side received no DELIVER for, or acknowledged
    /// already.
    #[error("no delivery {0} awaits an acknowledgement")]
    NotDelivered(u64),
    /// A delivery or an acknowledgement asked of the side that does not send it
    /// (DELIVER is the server's, ACK the client's: spec 8.8).
    #[error("a {0} is not sent by this side")]
    WrongSide(&'static str),
}

impl Misuse {
    /// The short name of this error ([`ProtocolError::kind`]).
    pub fn kind(&self) -> &'static str {
        match self {
            Misuse::Closed => "closed",
            Misuse::Exhausted => "sequence_exhausted",
            Misuse::PayloadTooLarge { .. } => "payload_too_large",
            Misuse::NotPending(_) | Misuse::NotDelivered(_) => "not_pending",
            Misuse::WrongSide(_) => "wrong_side",
        }
    }
}

/// Which tag failed to verify: each is computed under its own key or label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum TagKind {
    EnrollInit,
    EnrollReply,
    EnrollConfirm,
    EnrollDone,
    ServerAuth,
    ClientFinish,
    SessionFrame,
}

impl fmt::Display for TagKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TagKind::EnrollInit => "ENROLL_INIT",
            TagKind::EnrollReply => "ENROLL_REPLY",
            TagKind::EnrollConfirm => "ENROLL_CONFIRM",
            TagKind::EnrollDone => "ENROLL_DONE",
            TagKind::ServerAuth => "SERVER_AUTH",
            TagKind::ClientFinish => "CLIENT_FINISH",
            TagKind::SessionFrame => "session frame",
        })
    }
}

impl ProtocolError {
    /// The code to send in an ERROR frame when this error ends a handshake
    /// (spec 10.1). Only a server sends ERROR.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ProtocolError::Frame(e) => e.error_code(),
            ProtocolError::BadTag(TagKind::EnrollInit | TagKind::EnrollConfirm)
            | ProtocolError::OpenModeDisabled
            | ProtocolError::WeakKey => ErrorCode::ENROLL_REFUSED,
            ProtocolError::BadTag(
                TagKind::EnrollReply
                | TagKind::EnrollDone
                | TagKind::ServerAuth
                | TagKind::ClientFinish
                | TagKind::SessionFrame,
            ) => ErrorCode::AUTH_FAILED,
            ProtocolError::ModeRefused(_) => ErrorCode::MODE_REFUSED,
            ProtocolError::WeakHelloKey
            | ProtocolError::Sequence { .. }
            | ProtocolError::UnsolicitedAnswer { .. }
            | ProtocolError::SequenceExhausted
            | ProtocolError::Refused(_)
            | ProtocolError::InjectedError(_)
            | ProtocolError::PeerClosed(_)
            | ProtocolError::Poisoned
            | ProtocolError::UnsolicitedAck(_)
            | ProtocolError::DeliveryOrder { .. }
            | ProtocolError::Misuse(_) => ErrorCode::MALFORMED,
        }
    }

    /// The short, language-neutral name of this error that `spec/vectors/` use
    /// (spec 12.2).
    pub fn kind(&self) -> &'static str {
        match self {
            ProtocolError::Frame(FrameError::Empty) => "empty_frame",
            ProtocolError::Frame(FrameError::TooLarge { .. }) => "frame_too_large",
            ProtocolError::Frame(FrameError::UnsupportedVersion(_)) => "unsupported_version",
            ProtocolError::Frame(FrameError::BadId(_)) => "bad_id",
            ProtocolError::Frame(_) => "malformed",
            ProtocolError::BadTag(_) => "bad_tag",
            ProtocolError::OpenModeDisabled => "open_mode_disabled",
            ProtocolError::InjectedError(_) => "truncated",
            ProtocolError::Sequence { .. } => "bad_sequence",
            ProtocolError::UnsolicitedAnswer { .. } => "unsolicited_answer",
            ProtocolError::SequenceExhausted => "sequence_exhausted",
            ProtocolError::Refused(_) => "refused",
            ProtocolError::PeerClosed(_) => "peer_closed",
            ProtocolError::WeakKey | ProtocolError::WeakHelloKey => "weak_key",
            ProtocolError::ModeRefused(_) => "mode_refused",
            ProtocolError::Poisoned => "poisoned",
            ProtocolError::UnsolicitedAck(_) => "unsolicited_answer",
            ProtocolError::DeliveryOrder { .. } => "delivery_order",
            ProtocolError::Misuse(m) => m.kind(),
        }
    }

    /// The code to send in a CLOSE frame when this error ends a session.
    pub fn close_code(&self) -> CloseCode {
        // A peer's frame numbered 2^64 - 1 that is not CLOSE is a protocol error (8.3);
        // this side's own exhaustion sends SEQUENCE_EXHAUSTED (proto::connection).
        match self {
            ProtocolError::Frame(e) => e.close_code(),
            ProtocolError::BadTag(_)
            | ProtocolError::OpenModeDisabled
            | ProtocolError::Sequence { .. }
            | ProtocolError::UnsolicitedAnswer { .. }
            | ProtocolError::SequenceExhausted
            | ProtocolError::Refused(_)
            | ProtocolError::InjectedError(_)
            | ProtocolError::PeerClosed(_)
            | ProtocolError::WeakKey
            | ProtocolError::WeakHelloKey
            | ProtocolError::ModeRefused(_)
            | ProtocolError::Poisoned
            | ProtocolError::UnsolicitedAck(_)
            | ProtocolError::DeliveryOrder { .. }
            | ProtocolError::Misuse(_) => CloseCode::PROTOCOL_ERROR,
        }
    }
}
