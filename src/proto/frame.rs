//! Frame types and their byte layouts (spec section 4).
//!
//! Every frame is `length (u32) | type (u8) | fields`. Handshake frames have fixed
//! layouts; session frames are `type | seq | fields | payload | tag`, where the only
//! variable-length field (the payload or close reason) is delimited by the frame's
//! length prefix, which the tag covers. Tags are always the last 32 bytes.

use alloc::{borrow::ToOwned, string::String, vec::Vec};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use core::fmt;
use core::ops::Range;

use super::codec::{put_header, FrameError, Reader};
use super::codes::{CloseCode, ErrorCode};
pub use super::mode::Mode;
use super::{Tag, AEAD_TAG_LEN, KEY_LEN, LEN_PREFIX, NONCE_LEN, SESSION_HEADER_LEN, TAG_LEN};

#[doc(hidden)]
/// The frame type byte (spec 4, table 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum FrameType {
    EnrollInit = 0x01,
    EnrollReply = 0x02,
    EnrollConfirm = 0x03,
    EnrollDone = 0x04,
    Hello = 0x10,
    ServerAuth = 0x11,
    ClientFinish = 0x12,
    SealedHello = 0x13,
    SealedAuth = 0x14,
    Error = 0x1f,
    Request = 0x20,
    Response = 0x21,
    Message = 0x22,
    Ping = 0x23,
    Pong = 0x24,
    Close = 0x25,
    KeyUpdate = 0x26,
    Deliver = 0x27,
    Ack = 0x28,
}

impl FrameType {
    /// Maps a type byte to a frame type.
    pub fn from_u8(b: u8) -> Result<FrameType, FrameError> {
        use FrameType::*;
        Ok(match b {
            0x01 => EnrollInit,
            0x02 => EnrollReply,
            0x03 => EnrollConfirm,
            0x04 => EnrollDone,
            0x10 => Hello,
            0x11 => ServerAuth,
            0x12 => ClientFinish,
            0x13 => SealedHello,
            0x14 => SealedAuth,
            0x1f => Error,
            0x20 => Request,
            0x21 => Response,
            0x22 => Message,
            0x23 => Ping,
            0x24 => Pong,
            0x25 => Close,
            0x26 => KeyUpdate,
            0x27 => Deliver,
            0x28 => Ack,
            other => return Err(FrameError::UnknownType(other)),
        })
    }

    /// The type of a whole frame (length prefix included).
    pub fn of(frame: &[u8]) -> Result<FrameType, FrameError> {
        FrameType::from_u8(Reader::new(frame)?.ty())
    }
}

impl Mode {
    /// The mode a connection's first frame starts, after its type and version were
    /// checked (spec 7.2 rows 2 to 4): what a server's policy decides on (row 4a),
    /// before any other work.
    pub fn of_hello(frame: &[u8]) -> Result<Mode, FrameError> {
        let mut r = Reader::new(frame)?;
        let mode = match FrameType::from_u8(r.ty())? {
            FrameType::Hello => Mode::Authenticated,
            FrameType::SealedHello => Mode::Encrypted,
            _ => {
                return Err(FrameError::UnexpectedType {
                    got: r.ty(),
                    what: "HELLO or SEALED_HELLO",
                })
            }
        };
        read_version(&mut r)?;
        Ok(mode)
    }
}

/// Largest identity length in bytes (spec 4.1).
pub const ID_MAX_LEN: usize = 64;

/// A device identity: 1 to 64 bytes of `A-Z a-z 0-9 . _ - : @` (spec 4.1).
/// Shared, so a clone (one per request handed to a backend) does not allocate.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(alloc::sync::Arc<str>);

impl Id {
    /// Checks `s` against spec 4.1.
    pub fn new(s: &str) -> Result<Id, FrameError> {
        Id::from_bytes(s.as_bytes())
    }

    fn from_bytes(b: &[u8]) -> Result<Id, FrameError> {
        if b.is_empty() {
            return Err(FrameError::BadId("empty"));
        }
        if b.len() > ID_MAX_LEN {
            return Err(FrameError::BadId("longer than 64 bytes"));
        }
        let ok = |c: &u8| c.is_ascii_alphanumeric() || b"._-:@".contains(c);
        if !b.iter().all(ok) {
            return Err(FrameError::BadId("allowed bytes are A-Z a-z 0-9 . _ - : @"));
        }
        Ok(Id(core::str::from_utf8(b).expect("ASCII").into()))
    }

    /// The identity as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn put(&self, out: &mut BytesMut) {
        out.put_u8(self.0.len() as u8);
        out.put_slice(self.0.as_bytes());
    }

    fn read(r: &mut Reader<'_>) -> Result<Id, FrameError> {
        let n = r.u8()? as usize;
        Id::from_bytes(r.take(n)?)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl core::str::FromStr for Id {
    type Err = FrameError;
    fn from_str(s: &str) -> Result<Id, FrameError> {
        Id::new(s)
    }
}

/// Which credential authorises an enrollment (spec 6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollMode {
    /// The fleet-wide enrollment key `EK` (a group key).
    Open = 0,
    /// A per-identity token `T(id)`: random, issued by the operator for one id.
    Token = 1,
}

impl EnrollMode {
    fn from_u8(b: u8) -> Result<EnrollMode, FrameError> {
        match b {
            0 => Ok(EnrollMode::Open),
            1 => Ok(EnrollMode::Token),
            other => Err(FrameError::BadMode(other)),
        }
    }

    /// The name used in tokens, logs and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            EnrollMode::Open => "open",
            EnrollMode::Token => "token",
        }
    }
}

#[doc(hidden)]
/// The bytes of a tagged frame that its tag covers: everything but the last 32.
pub fn signed_part(frame: &[u8]) -> &[u8] {
    &frame[..frame.len().saturating_sub(TAG_LEN)]
}

/// Checks that `frame` is of type `want`, for handshake frames.
fn expect(r: &Reader<'_>, want: FrameType, what: &'static str) -> Result<(), FrameError> {
    match FrameType::from_u8(r.ty())? {
        t if t == want => Ok(()),
        _ => Err(FrameError::UnexpectedType { got: r.ty(), what }),
    }
}

/// Reads the version byte that follows the type in HELLO and ENROLL_INIT. It is checked
/// before any other field, so a later version may change everything after it (spec 11).
fn read_version(r: &mut Reader<'_>) -> Result<u8, FrameError> {
    match r.u8()? {
        super::VERSION => Ok(super::VERSION),
        other => Err(FrameError::UnsupportedVersion(other)),
    }
}

#[doc(hidden)]
/// ENROLL_INIT, client to server (spec 4.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollInit {
    /// Which credential keys `tag`.
    pub mode: EnrollMode,
    /// The identity to enroll.
    pub id: Id,
    /// Client ephemeral X25519 public key `X`.
    pub ephemeral: [u8; KEY_LEN],
    /// Tag under the enrollment credential.
    pub tag: Tag,
}

impl EnrollInit {
    /// Appends the frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let len = 4 + self.id.0.len() + KEY_LEN + TAG_LEN;
        put_header(out, len, FrameType::EnrollInit as u8);
        out.put_u8(super::VERSION);
        out.put_u8(self.mode as u8);
        self.id.put(out);
        out.put_slice(&self.ephemeral);
        out.put_slice(&self.tag);
    }

    /// Parses a whole frame.
    pub fn decode(frame: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(frame)?;
        expect(&r, FrameType::EnrollInit, "ENROLL_INIT")?;
        read_version(&mut r)?;
        let mode = EnrollMode::from_u8(r.u8()?)?;
        let id = Id::read(&mut r)?;
        let msg = EnrollInit {
            mode,
            id,
            ephemeral: r.array()?,
            tag: r.array()?,
        };
        r.finish()?;
        Ok(msg)
    }
}

#[doc(hidden)]
/// A frame whose only field is a 32-byte key followed by a tag: ENROLL_REPLY (`Y`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueAndTag {
    /// `Y` in ENROLL_REPLY.
    pub value: [u8; 32],
    /// The frame's tag.
    pub tag: Tag,
}

impl ValueAndTag {
    /// Appends the frame, of type `ty`, to `out`.
    pub fn encode(&self, ty: FrameType, out: &mut BytesMut) {
        put_header(out, 1 + 32 + TAG_LEN, ty as u8);
        out.put_slice(&self.value);
        out.put_slice(&self.tag);
    }

    /// Parses a whole frame that must be of type `ty`.
    pub fn decode(frame: &[u8], ty: FrameType, what: &'static str) -> Result<Self, FrameError> {
        let mut r = Reader::new(frame)?;
        expect(&r, ty, what)?;
        let msg = ValueAndTag {
            value: r.array()?,
            tag: r.array()?,
        };
        r.finish()?;
        Ok(msg)
    }
}

#[doc(hidden)]
/// A frame that is only a tag: ENROLL_CONFIRM, ENROLL_DONE, CLIENT_FINISH (spec 4.2, 4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagOnly(pub Tag);

impl TagOnly {
    /// Appends the frame, of type `ty`, to `out`.
    pub fn encode(&self, ty: FrameType, out: &mut BytesMut) {
        put_header(out, 1 + TAG_LEN, ty as u8);
        out.put_slice(&self.0);
    }

    /// Parses a whole frame that must be of type `ty`.
    pub fn decode(frame: &[u8], ty: FrameType, what: &'static str) -> Result<Self, FrameError> {
        let mut r = Reader::new(frame)?;
        expect(&r, ty, what)?;
        let tag = TagOnly(r.array()?);
        r.finish()?;
        Ok(tag)
    }
}

#[doc(hidden)]
/// HELLO, client to server, opening a session handshake (spec 4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The identity the client claims.
    pub id: Id,
    /// Client nonce `nc`.
    pub nonce: [u8; NONCE_LEN],
    /// The largest session frame `length` the client accepts (spec 3.2).
    pub max_frame_len: u32,
}

impl Hello {
    /// Appends the frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        put_header(
            out,
            3 + self.id.0.len() + NONCE_LEN + 4,
            FrameType::Hello as u8,
        );
        out.put_u8(super::VERSION);
        self.id.put(out);
        out.put_slice(&self.nonce);
        out.put_u32(self.max_frame_len);
    }

    /// Parses a whole frame.
    pub fn decode(frame: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(frame)?;
        expect(&r, FrameType::Hello, "HELLO")?;
        read_version(&mut r)?;
        let msg = Hello {
            id: Id::read(&mut r)?,
            nonce: r.array()?,
            max_frame_len: read_frame_limit(&mut r)?,
        };
        r.finish()?;
        Ok(msg)
    }
}

#[doc(hidden)]
/// SEALED_HELLO, client to server: the encrypted mode's first frame (spec 4.3, 7.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedHello {
    /// `E`, the client's ephemeral X25519 public key.
    pub ephemeral: [u8; KEY_LEN],
    /// The id, its length and padding, and the client's frame limit, sealed to the
    /// server's key (spec 5.6).
    pub sealed: [u8; SealedHello::SEALED_LEN],
}

impl SealedHello {
    /// `length` of every SEALED_HELLO.
    pub const LEN: usize = 1 + 1 + KEY_LEN + Self::SEALED_LEN;
    /// Bytes of the frame before the sealed part (its associated data), prefix included.
    pub const AD_LEN: usize = LEN_PREFIX + 1 + 1 + KEY_LEN;
    /// The sealed part's plaintext: `u8 n ‖ id ‖ zeros to 64 bytes ‖ u32 max_frame_len`
    /// (spec 4.3).
    pub const PLAINTEXT_LEN: usize = 1 + ID_MAX_LEN + 4;
    /// The sealed part: the plaintext and the AEAD's tag.
    pub const SEALED_LEN: usize = Self::PLAINTEXT_LEN + AEAD_TAG_LEN;

    /// Appends the frame up to the sealed part (its associated data).
    pub(crate) fn encode_head(ephemeral: &[u8; KEY_LEN], out: &mut BytesMut) {
        put_header(out, Self::LEN, FrameType::SealedHello as u8);
        out.put_u8(super::VERSION);
        out.put_slice(ephemeral);
    }

    /// Parses a whole frame: version and length (spec 7.2 rows 3 to 5). The sealed part
    /// is opened by the handshake.
    pub fn decode(frame: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(frame)?;
        expect(&r, FrameType::SealedHello, "SEALED_HELLO")?;
        read_version(&mut r)?;
        let msg = SealedHello {
            ephemeral: r.array()?,
            sealed: r.array()?,
        };
        r.finish()?;
        Ok(msg)
    }

    /// The sealed part's plaintext for `id` and the limit `max_frame_len` (spec 4.3).
    pub(crate) fn plaintext(id: &Id, max_frame_len: u32) -> [u8; Self::PLAINTEXT_LEN] {
        let mut plain = [0; Self::PLAINTEXT_LEN];
        plain[0] = id.0.len() as u8;
        plain[1..1 + id.0.len()].copy_from_slice(id.0.as_bytes());
        plain[1 + ID_MAX_LEN..].copy_from_slice(&max_frame_len.to_be_bytes());
        plain
    }

    /// The id and the limit of an opened plaintext, checked in the order of spec 4.3:
    /// `1 ≤ n ≤ 64` and an id that keeps 4.1 (`bad_id`), zeros after the id, and a limit
    /// in range (`malformed`).
    pub(crate) fn from_plaintext(
        plain: &[u8; Self::PLAINTEXT_LEN],
    ) -> Result<(Id, u32), FrameError> {
        let n = plain[0] as usize;
        if n == 0 || n > ID_MAX_LEN {
            return Err(FrameError::BadId("sealed id length is not 1..=64"));
        }
        let id = Id::from_bytes(&plain[1..1 + n])?;
        if plain[1 + n..1 + ID_MAX_LEN].iter().any(|&b| b != 0) {
            return Err(FrameError::BadPadding);
        }
        let mut limit = [0; 4];
        limit.copy_from_slice(&plain[1 + ID_MAX_LEN..]);
        let limit = in_range(
            "frame limit",
            u32::from_be_bytes(limit),
            super::MIN_SESSION_FRAME_LEN,
            super::MAX_FRAME_LEN_CEILING,
        )?;
        Ok((id, limit))
    }
}

/// Reads an announced session frame limit and checks its range (spec 4.3).
fn read_frame_limit(r: &mut Reader<'_>) -> Result<u32, FrameError> {
    in_range(
        "frame limit",
        r.u32()?,
        super::MIN_SESSION_FRAME_LEN,
        super::MAX_FRAME_LEN_CEILING,
    )
}

fn in_range(what: &'static str, value: u32, min: u32, max: u32) -> Result<u32, FrameError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(FrameError::BadLimit {
            what,
            value,
            min,
            max,
        })
    }
}

#[doc(hidden)]
/// SERVER_AUTH, server to client: the server's nonce, the limits the client must
/// respect, and the tag proving the server holds the identity's key (spec 4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAuth {
    /// Server nonce `ns`.
    pub nonce: [u8; NONCE_LEN],
    /// The largest session frame `length` the server accepts (spec 3.2).
    pub max_frame_len: u32,
    /// The server's keepalive interval in milliseconds (spec 8.5).
    pub keepalive_ms: u32,
    /// `HMAC(K_sf, th2)`.
    pub tag: Tag,
}

impl ServerAuth {
    /// `length` of every SERVER_AUTH.
    pub const LEN: usize = 1 + NONCE_LEN + 4 + 4 + TAG_LEN;

    /// Appends the frame without its tag (what `th2` covers), as SERVER_AUTH or, in the
    /// encrypted mode, SEALED_AUTH (`nonce` is then `F`, the server's ephemeral key).
    pub(crate) fn encode_unsigned_as(&self, mode: Mode, out: &mut BytesMut) {
        put_header(out, Self::LEN, Self::frame_type(mode) as u8);
        out.put_slice(&self.nonce);
        out.put_u32(self.max_frame_len);
        out.put_u32(self.keepalive_ms);
    }

    /// Appends the whole frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_as(Mode::Authenticated, out)
    }

    /// Appends the whole frame to `out` as the answer of `mode`'s handshake.
    pub fn encode_as(&self, mode: Mode, out: &mut BytesMut) {
        self.encode_unsigned_as(mode, out);
        out.put_slice(&self.tag);
    }

    /// SERVER_AUTH in the authenticated mode, SEALED_AUTH in the encrypted mode.
    pub fn frame_type(mode: Mode) -> FrameType {
        match mode {
            Mode::Authenticated => FrameType::ServerAuth,
            Mode::Encrypted => FrameType::SealedAuth,
        }
    }

    /// Parses a whole SERVER_AUTH; the limits must be in range (spec 4.3).
    pub fn decode(frame: &[u8]) -> Result<Self, FrameError> {
        Self::decode_as(Mode::Authenticated, frame)
    }

    /// Parses the answer of `mode`'s handshake: SERVER_AUTH, or SEALED_AUTH (the
    /// other type is `malformed`, spec 7.2 client row 4).
    pub fn decode_as(mode: Mode, frame: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(frame)?;
        match mode {
            Mode::Authenticated => expect(&r, FrameType::ServerAuth, "SERVER_AUTH")?,
            Mode::Encrypted => expect(&r, FrameType::SealedAuth, "SEALED_AUTH")?,
        }
        let msg = ServerAuth {
            nonce: r.array()?,
            max_frame_len: read_frame_limit(&mut r)?,
            keepalive_ms: in_range(
                "keepalive (ms)",
                r.u32()?,
                super::MIN_KEEPALIVE_MS,
                super::MAX_KEEPALIVE_MS,
            )?,
            tag: r.array()?,
        };
        r.finish()?;
        Ok(msg)
    }
}

#[doc(hidden)]
/// ERROR: the unauthenticated refusal that ends a handshake (spec 4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorFrame {
    /// Why.
    pub code: ErrorCode,
    /// The highest protocol version the sender speaks.
    pub version: u8,
}

impl ErrorFrame {
    /// An ERROR frame from this implementation.
    pub fn new(code: ErrorCode) -> Self {
        ErrorFrame {
            code,
            version: super::VERSION,
        }
    }

    /// Appends the frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        put_header(out, 4, FrameType::Error as u8);
        out.put_u16(self.code.0);
        out.put_u8(self.version);
    }

    /// The frame's bytes.
    pub fn encoded(&self) -> Vec<u8> {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.to_vec()
    }

    /// Parses a whole frame.
    pub fn decode(frame: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(frame)?;
        expect(&r, FrameType::Error, "ERROR")?;
        let msg = ErrorFrame {
            code: ErrorCode(r.u16()?),
            version: r.u8()?,
        };
        r.finish()?;
        Ok(msg)
    }

    /// If `frame` is an ERROR frame, the code it carries (a malformed one reads as
    /// MALFORMED: the connection ends either way).
    pub fn code_if_error(frame: &[u8]) -> Option<ErrorCode> {
        match FrameType::of(frame) {
            Ok(FrameType::Error) => {
                Some(Self::decode(frame).map_or(ErrorCode::MALFORMED, |e| e.code))
            }
            _ => None,
        }
    }
}

/// Status of a RESPONSE (spec 4.5): 0 is success, 1-255 are defined by Tally,
/// 256-65535 are the application's.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Status(pub u16);

impl Status {
    /// The request succeeded.
    pub const OK: Status = Status(0);
    /// No backend could take the request (down, not configured, or overloaded).
    pub const UNAVAILABLE: Status = Status(1);
    /// The backend failed or answered with something invalid.
    pub const BACKEND_ERROR: Status = Status(2);
    /// The backend did not answer in time.
    pub const TIMEOUT: Status = Status(3);
    /// The request was refused by the receiving side's policy.
    pub const REFUSED: Status = Status(4);
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            Status::OK => "ok",
            Status::UNAVAILABLE => "unavailable",
            Status::BACKEND_ERROR => "backend error",
            Status::TIMEOUT => "timeout",
            Status::REFUSED => "refused",
            // After "status" in every message that shows one ("with status 404
            // (application-defined)").
            Status(n) if n >= 256 => return write!(f, "{n} (application-defined)"),
            Status(n) => return write!(f, "{n} (reserved)"),
        };
        f.write_str(name)
    }
}

/// Longest CLOSE reason in bytes (spec 4.5).
pub const MAX_REASON_LEN: usize = 255;

#[doc(hidden)]
/// The content of an authenticated session frame (spec 4.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Expects a RESPONSE.
    Request {
        /// Opaque application bytes.
        payload: Bytes,
    },
    /// Answers the REQUEST whose sequence number is `req_seq`.
    Response {
        /// Sequence number of the REQUEST this answers.
        req_seq: u64,
        /// Outcome.
        status: Status,
        /// Opaque application bytes.
        payload: Bytes,
    },
    /// One-way.
    Message {
        /// Opaque application bytes.
        payload: Bytes,
    },
    /// Expects a PONG.
    Ping,
    /// Answers the PING whose sequence number is `ping_seq`.
    Pong {
        /// Sequence number of the PING this answers.
        ping_seq: u64,
    },
    /// Ends the session; nothing follows it in this direction.
    Close {
        /// Why.
        code: CloseCode,
        /// Human-readable detail, UTF-8, at most 255 bytes.
        reason: String,
    },
    /// The sender's next frames use its next key (spec 8.7).
    KeyUpdate,
    /// A queued message or request, server to client (spec 8.8).
    Deliver {
        /// The message id: per identity, increasing in the order they were queued.
        msg_id: u64,
        /// Whether the ACK carries an answer.
        kind: DeliveryKind,
        /// Opaque application bytes.
        payload: Bytes,
    },
    /// Acknowledges (and for a request answers) DELIVER `msg_id`, client to server
    /// (spec 8.8).
    Ack {
        /// The DELIVER this acknowledges.
        msg_id: u64,
        /// Outcome (for a message, OK unless the device refused it).
        status: Status,
        /// The answer to a queued request; empty for a message.
        payload: Bytes,
    },
}

/// What a DELIVER carries (spec 4.5, 8.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DeliveryKind {
    /// A queued REQUEST: its ACK carries the answer.
    Request = 1,
    /// A queued MESSAGE: its ACK only says it was handled.
    Message = 2,
}

impl DeliveryKind {
    /// The kind byte's meaning, or `None` for a byte that is neither.
    pub fn from_u8(b: u8) -> Option<DeliveryKind> {
        match b {
            1 => Some(DeliveryKind::Request),
            2 => Some(DeliveryKind::Message),
            _ => None,
        }
    }

    /// `"request"` or `"message"`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryKind::Request => "request",
            DeliveryKind::Message => "message",
        }
    }
}

impl Body {
    /// The frame type of this body.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Body::Request { .. } => FrameType::Request,
            Body::Response { .. } => FrameType::Response,
            Body::Message { .. } => FrameType::Message,
            Body::Ping => FrameType::Ping,
            Body::Pong { .. } => FrameType::Pong,
            Body::Close { .. } => FrameType::Close,
            Body::KeyUpdate => FrameType::KeyUpdate,
            Body::Deliver { .. } => FrameType::Deliver,
            Body::Ack { .. } => FrameType::Ack,
        }
    }

    /// Bytes of the fields after the sequence number and before the tag.
    fn fields_len(&self) -> usize {
        match self {
            Body::Request { payload } | Body::Message { payload } => payload.len(),
            Body::Response { payload, .. } => 8 + 2 + payload.len(),
            Body::Ping | Body::KeyUpdate => 0,
            Body::Pong { .. } => 8,
            Body::Close { reason, .. } => 2 + reason.len(),
            Body::Deliver { payload, .. } => 8 + 1 + payload.len(),
            Body::Ack { payload, .. } => 8 + 2 + payload.len(),
        }
    }

    /// Size of the whole frame on the wire in `mode`, length prefix and tag included.
    pub fn wire_len(&self, mode: Mode) -> usize {
        SESSION_HEADER_LEN + self.fields_len() + mode.tag_len()
    }

    /// Overhead of a frame type around its payload in `mode`: the largest payload that
    /// fits in a frame whose length field is at most `limit` is `limit - overhead`.
    pub fn overhead(ty: FrameType, mode: Mode) -> usize {
        let fixed = match ty {
            FrameType::Response | FrameType::Ack => 10,
            FrameType::Deliver => 9,
            FrameType::Close => 2,
            _ => 0,
        };
        SESSION_HEADER_LEN - LEN_PREFIX + fixed + mode.tag_len()
    }

    /// Appends everything but the tag: length (counting `mode`'s tag), type, `seq`,
    /// fields in the clear.
    pub(crate) fn encode_unsigned(&self, seq: u64, mode: Mode, out: &mut BytesMut) {
        put_header(
            out,
            self.wire_len(mode) - LEN_PREFIX,
            self.frame_type() as u8,
        );
        out.put_u64(seq);
        match self {
            Body::Request { payload } | Body::Message { payload } => out.put_slice(payload),
            Body::Response {
                req_seq,
                status,
                payload,
            } => {
                out.put_u64(*req_seq);
                out.put_u16(status.0);
                out.put_slice(payload);
            }
            Body::Ping | Body::KeyUpdate => {}
            Body::Pong { ping_seq } => out.put_u64(*ping_seq),
            Body::Close { code, reason } => {
                out.put_u16(code.0);
                out.put_slice(reason.as_bytes());
            }
            Body::Deliver {
                msg_id,
                kind,
                payload,
            } => {
                out.put_u64(*msg_id);
                out.put_u8(*kind as u8);
                out.put_slice(payload);
            }
            Body::Ack {
                msg_id,
                status,
                payload,
            } => {
                out.put_u64(*msg_id);
                out.put_u16(status.0);
                out.put_slice(payload);
            }
        }
    }

    /// Parses the fields of a session frame whose header and tag were already checked
    /// (and which was decrypted in place, in the encrypted mode). `frame` is the whole
    /// frame; payloads are zero-copy slices of it.
    pub(crate) fn decode_fields(
        ty: FrameType,
        frame: Bytes,
        mode: Mode,
    ) -> Result<Body, FrameError> {
        let tag_len = mode.tag_len();
        /// What the fields say; a payload as where it lies in the frame.
        enum Fields {
            Request(Range<usize>),
            Message(Range<usize>),
            Response(u64, Status, Range<usize>),
            Deliver(u64, DeliveryKind, Range<usize>),
            Ack(u64, Status, Range<usize>),
            Other(Body),
        }
        let mut r = Reader::new(&frame)?;
        r.take(8)?; // sequence number, read by the caller
        let len = frame.len();
        let rest = |r: &mut Reader<'_>| -> Result<Range<usize>, FrameError> {
            let rest = r.all_but(tag_len)?.len();
            let from = len - r.remaining() - rest;
            Ok(from..from + rest)
        };
        let fields = match ty {
            FrameType::Request => Fields::Request(rest(&mut r)?),
            FrameType::Message => Fields::Message(rest(&mut r)?),
            FrameType::Response => {
                let req_seq = r.u64()?;
                let status = Status(r.u16()?);
                Fields::Response(req_seq, status, rest(&mut r)?)
            }
            FrameType::Deliver => {
                let msg_id = r.u64()?;
                let kind = r.u8()?;
                // Message ids start at 1 (spec 8.8); the kind is one of two.
                let kind = DeliveryKind::from_u8(kind)
                    .filter(|_| msg_id != 0)
                    .ok_or(FrameError::BadDelivery { msg_id, kind })?;
                Fields::Deliver(msg_id, kind, rest(&mut r)?)
            }
            FrameType::Ack => {
                let msg_id = r.u64()?;
                let status = Status(r.u16()?);
                Fields::Ack(msg_id, status, rest(&mut r)?)
            }
            FrameType::Ping => Fields::Other(Body::Ping),
            FrameType::KeyUpdate => Fields::Other(Body::KeyUpdate),
            FrameType::Pong => Fields::Other(Body::Pong { ping_seq: r.u64()? }),
            FrameType::Close => {
                let code = CloseCode(r.u16()?);
                let reason = r.all_but(tag_len)?;
                if reason.len() > MAX_REASON_LEN {
                    return Err(FrameError::BadReason);
                }
                let reason = core::str::from_utf8(reason).map_err(|_| FrameError::BadReason)?;
                Fields::Other(Body::Close {
                    code,
                    reason: reason.to_owned(),
                })
            }
            _ => {
                return Err(FrameError::UnexpectedType {
                    got: ty as u8,
                    what: "a session frame",
                })
            }
        };
        r.take(tag_len)?;
        r.finish()?;
        // The payload is the frame itself, cut down to it: no reference taken or dropped.
        let payload = |range: Range<usize>| {
            let mut payload = frame;
            payload.truncate(range.end);
            payload.advance(range.start);
            payload
        };
        Ok(match fields {
            Fields::Request(range) => Body::Request {
                payload: payload(range),
            },
            Fields::Message(range) => Body::Message {
                payload: payload(range),
            },
            Fields::Response(req_seq, status, range) => Body::Response {
                req_seq,
                status,
                payload: payload(range),
            },
            Fields::Deliver(msg_id, kind, range) => Body::Deliver {
                msg_id,
                kind,
                payload: payload(range),
            },
            Fields::Ack(msg_id, status, range) => Body::Ack {
                msg_id,
                status,
                payload: payload(range),
            },
            Fields::Other(body) => body,
        })
    }
}

#[doc(hidden)]
/// A session frame as received: its sequence number and content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionFrame {
    /// The sender's sequence number for this frame.
    pub seq: u64,
    /// What it carries.
    pub body: Body,
}

/// Reads the type and sequence number of a session frame, checking it is long enough to
/// hold them and `mode`'s tag. Nothing else is looked at: this is the cheap check before
/// the tag.
pub(crate) fn session_header(frame: &[u8], mode: Mode) -> Result<(FrameType, u64), FrameError> {
    let mut r = Reader::new(frame)?;
    let ty = FrameType::from_u8(r.ty())?;
    if (ty as u8) < FrameType::Request as u8 {
        return Err(FrameError::UnexpectedType {
            got: ty as u8,
            what: "a session frame",
        });
    }
    let seq = r.u64()?;
    if r.remaining() < mode.tag_len() {
        return Err(FrameError::Truncated { ty: ty as u8 });
    }
    Ok((ty, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_alphabet_and_length() {
        assert!(Id::new("sensor-42").is_ok());
        assert!(Id::new("a.b_c-d:e@f").is_ok());
        assert!(Id::new(&"x".repeat(64)).is_ok());
        assert_eq!(Id::new(""), Err(FrameError::BadId("empty")));
        assert!(matches!(
            Id::new(&"x".repeat(65)),
            Err(FrameError::BadId(_))
        ));
        for bad in ["a b", "a/b", "é", "a\0", "a\n"] {
            assert!(matches!(Id::new(bad), Err(FrameError::BadId(_))), "{bad:?}");
        }
    }

    #[test]
    fn handshake_frames_round_trip() {
        let id = Id::new("dev").unwrap();
        let init = EnrollInit {
            mode: EnrollMode::Token,
            id: id.clone(),
            ephemeral: [7; 32],
            tag: [9; 32],
        };
        let mut out = BytesMut::new();
        init.encode(&mut out);
        assert_eq!(out.len(), 4 + 4 + 3 + 32 + 32);
        assert_eq!(EnrollInit::decode(&out).unwrap(), init);

        let hello = Hello {
            id,
            nonce: [1; 32],
            max_frame_len: 4096,
        };
        let mut out = BytesMut::new();
        hello.encode(&mut out);
        assert_eq!(out.len(), 4 + 39 + 3);
        assert_eq!(Hello::decode(&out).unwrap(), hello);

        let auth = ServerAuth {
            nonce: [2; 32],
            max_frame_len: 65536,
            keepalive_ms: 30_000,
            tag: [3; 32],
        };
        let mut out = BytesMut::new();
        auth.encode(&mut out);
        assert_eq!(out.len(), 4 + 73);
        assert_eq!(ServerAuth::decode(&out).unwrap(), auth);
    }

    #[test]
    fn announced_limits_out_of_range_are_malformed() {
        let hello = |max_frame_len| {
            let mut out = BytesMut::new();
            Hello {
                id: Id::new("dev").unwrap(),
                nonce: [1; 32],
                max_frame_len,
            }
            .encode(&mut out);
            Hello::decode(&out)
        };
        assert!(hello(256).is_ok());
        assert!(hello(1 << 24).is_ok());
        for bad in [0, 255, (1 << 24) + 1, u32::MAX] {
            assert!(
                matches!(hello(bad), Err(FrameError::BadLimit { .. })),
                "{bad}"
            );
        }
        let auth = |keepalive_ms| {
            let mut out = BytesMut::new();
            ServerAuth {
                nonce: [2; 32],
                max_frame_len: 65536,
                keepalive_ms,
                tag: [3; 32],
            }
            .encode(&mut out);
            ServerAuth::decode(&out)
        };
        assert!(auth(100).is_ok());
        assert!(auth(86_400_000).is_ok());
        for bad in [0, 99, 86_400_001] {
            assert!(
                matches!(auth(bad), Err(FrameError::BadLimit { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn version_is_checked_before_the_rest() {
        // version 2 followed by garbage: the version is the error, not the garbage.
        let frame = [0, 0, 0, 3, FrameType::Hello as u8, 2, 0xff];
        assert_eq!(
            Hello::decode(&frame),
            Err(FrameError::UnsupportedVersion(2))
        );
        let frame = [0, 0, 0, 2, FrameType::EnrollInit as u8, 0];
        assert_eq!(
            EnrollInit::decode(&frame),
            Err(FrameError::UnsupportedVersion(0))
        );
    }

    #[test]
    fn wrong_type_is_refused() {
        let mut out = BytesMut::new();
        TagOnly([0; 32]).encode(FrameType::EnrollConfirm, &mut out);
        assert!(matches!(
            TagOnly::decode(&out, FrameType::ClientFinish, "CLIENT_FINISH"),
            Err(FrameError::UnexpectedType { got: 0x03, .. })
        ));
    }

    #[test]
    fn bad_mode_and_trailing_bytes() {
        let init = EnrollInit {
            mode: EnrollMode::Open,
            id: Id::new("d").unwrap(),
            ephemeral: [0; 32],
            tag: [0; 32],
        };
        let mut out = BytesMut::new();
        init.encode(&mut out);
        let mut bad = out.to_vec();
        bad[6] = 7;
        assert_eq!(EnrollInit::decode(&bad), Err(FrameError::BadMode(7)));
        let mut long = out.to_vec();
        long.push(0);
        long[3] += 1;
        assert!(matches!(
            EnrollInit::decode(&long),
            Err(FrameError::Trailing { extra: 1, .. })
        ));
    }

    #[test]
    fn error_frame_layout() {
        let mut out = BytesMut::new();
        ErrorFrame::new(ErrorCode::AUTH_FAILED).encode(&mut out);
        assert_eq!(&out[..], &[0, 0, 0, 4, 0x1f, 0, 3, 1]);
        assert_eq!(
            ErrorFrame::code_if_error(&out),
            Some(ErrorCode::AUTH_FAILED)
        );
    }
}
