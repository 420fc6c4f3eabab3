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

/// A frame that cannot be parsed. Any of these ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announced an empty frame (spec 3: length >= 1).
    #[error("frame length is zero")]
    Empty,
    /// The length prefix is above the receiver's limit; nothing was buffered.
    #[error("frame length {len} exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The announced length.
        len: u32,
        /// The receiver's limit.
        limit: u32,
    },
    /// The frame ended before all its fields were read.
    #[error("frame of type {ty:#04x} is truncated")]
    Truncated {
        /// Frame type byte.
        ty: u8,
    },
    /// Bytes were left after the last field of a fixed-size frame.
    #[error("frame of type {ty:#04x} has {extra} trailing bytes")]
    Trailing {
        /// Frame type byte.
        ty: u8,
        /// Number of unexpected bytes.
        extra: usize,
    },
    /// The type byte is not one spec section 4 defines.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// A known frame type that is not allowed at this point of the exchange.
    #[error("unexpected frame type {got:#04x} ({what})")]
    UnexpectedType {
        /// The type received.
        got: u8,
        /// What was expected instead.
        what: &'static str,
    },
    /// HELLO or ENROLL_INIT carried a version this implementation does not speak.
    #[error("unsupported protocol version {0} (this peer speaks version {v})", v = crate::proto::VERSION)]
    UnsupportedVersion(u8),
    /// The identity is empty, too long or has a byte outside the alphabet (spec 4.1).
    #[error("invalid identity: {0}")]
    BadId(&'static str),
    /// The enrollment mode byte is neither 0 (open) nor 1 (token).
    #[error("unknown enrollment mode {0}")]
    BadMode(u8),
    /// SEALED_HELLO's opened id has non-zero bytes after the id (spec 4.3).
    #[error("the sealed id's padding is not zero")]
    BadPadding,
    /// A CLOSE reason that is not UTF-8 or longer than 255 bytes.
    #[error("invalid close reason")]
    BadReason,
    /// A DELIVER whose message id is 0 or whose kind is neither 1 nor 2 (spec 4.5).
    #[error("DELIVER with message id {msg_id} and kind {kind}: ids start at 1, kinds are 1 and 2")]
    BadDelivery {
        /// The message id.
        msg_id: u64,
        /// The kind byte.
        kind: u8,
    },
    /// A limit announced in HELLO or SERVER_AUTH is outside its range (spec 4.3).
    #[error("announced {what} of {value} is outside {min}..={max}")]
    BadLimit {
        /// Which limit.
        what: &'static str,
        /// The announced value.
        value: u32,
        /// The smallest value allowed.
        min: u32,
        /// The largest value allowed.
        max: u32,
    },
}

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
    ModeRefused(super::frame::Mode),
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

impl FrameError {
    /// The code of an ERROR frame that refuses a handshake for this frame (spec 10.1).
    pub fn error_code(&self) -> ErrorCode {
        match self {
            FrameError::UnsupportedVersion(_) => ErrorCode::UNSUPPORTED_VERSION,
            FrameError::Empty
            | FrameError::TooLarge { .. }
            | FrameError::Truncated { .. }
            | FrameError::Trailing { .. }
            | FrameError::UnknownType(_)
            | FrameError::UnexpectedType { .. }
            | FrameError::BadId(_)
            | FrameError::BadMode(_)
            | FrameError::BadPadding
            | FrameError::BadReason
            | FrameError::BadDelivery { .. }
            | FrameError::BadLimit { .. } => ErrorCode::MALFORMED,
        }
    }

    /// The code of a CLOSE frame that ends a session for this frame (spec 10.2).
    pub fn close_code(&self) -> CloseCode {
        match self {
            FrameError::TooLarge { .. } => CloseCode::FRAME_TOO_LARGE,
            FrameError::Empty
            | FrameError::Truncated { .. }
            | FrameError::Trailing { .. }
            | FrameError::UnknownType(_)
            | FrameError::UnexpectedType { .. }
            | FrameError::UnsupportedVersion(_)
            | FrameError::BadId(_)
            | FrameError::BadMode(_)
            | FrameError::BadPadding
            | FrameError::BadReason
            | FrameError::BadDelivery { .. }
            | FrameError::BadLimit { .. } => CloseCode::PROTOCOL_ERROR,
        }
    }
}

macro_rules! wire_codes {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $konst:ident = $val:expr, $text:expr;)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub u16);
        impl $name {
            $($(#[$vmeta])* pub const $konst: $name = $name($val);)*
            /// The name the spec gives this code, if it defines one.
            pub fn name(self) -> Option<&'static str> {
                match self.0 { $($val => Some($text),)* _ => None }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => write!(f, "{n} ({:#06x})", self.0),
                    None => write!(f, "code {:#06x}", self.0),
                }
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { fmt::Display::fmt(self, f) }
        }
    };
}

wire_codes! {
    /// Code of an ERROR frame: why a handshake or enrollment was refused (spec 10.1).
    ErrorCode {
        /// The HELLO or ENROLL_INIT version is not spoken here.
        UNSUPPORTED_VERSION = 0x0001, "unsupported version";
        /// A frame was malformed or not allowed at this point.
        MALFORMED = 0x0002, "malformed";
        /// Session handshake failed: unknown identity, revoked identity or wrong key,
        /// deliberately indistinguishable.
        AUTH_FAILED = 0x0003, "authentication failed";
        /// Enrollment refused: the credential tag did not verify.
        ENROLL_REFUSED = 0x0004, "enrollment refused";
        /// Enrollment refused: the identity is already enrolled.
        ID_TAKEN = 0x0005, "identity taken";
        /// The server is at a connection limit; try again later.
        BUSY = 0x0006, "busy";
        /// The identity has a live session and the server keeps the first one.
        TAKEOVER_REFUSED = 0x0007, "session takeover refused";
        /// The handshake did not complete within the server's deadline.
        TIMEOUT = 0x0008, "handshake timeout";
        /// The server failed internally (for example, its store); try again later.
        INTERNAL = 0x0009, "internal error";
        /// The server's policy does not accept this mode (HELLO where encryption is
        /// required, SEALED_HELLO where it is off): the client must not fall back.
        MODE_REFUSED = 0x000a, "mode refused";
    }
}

wire_codes! {
    /// Code of a CLOSE frame: why a session ended (spec 10.2).
    CloseCode {
        /// Orderly end requested by the application.
        NORMAL = 0x0000, "normal";
        /// The server is shutting down.
        SHUTDOWN = 0x0001, "server shutdown";
        /// A newer session for the same identity replaced this one.
        TAKEN_OVER = 0x0002, "taken over";
        /// The identity was revoked.
        REVOKED = 0x0003, "revoked";
        /// Nothing was received within the idle deadline.
        IDLE_TIMEOUT = 0x0004, "idle timeout";
        /// The sending counter reached 2^64-1.
        SEQUENCE_EXHAUSTED = 0x0005, "sequence exhausted";
        /// The peer sent a frame that broke a rule (bad tag, sequence, format).
        PROTOCOL_ERROR = 0x0006, "protocol error";
        /// The peer announced a frame above the receiver's limit.
        FRAME_TOO_LARGE = 0x0007, "frame too large";
        /// The identity was removed from the server (it may be enrolled again, with a
        /// new token).
        REMOVED = 0x0008, "removed";
    }
}
