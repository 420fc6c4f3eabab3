//! The sans-IO protocol core: everything `spec/PROTOCOL.md` defines, and nothing else.
//!
//! No sockets, no async runtime, no store, no clock and no randomness: every random
//! value (ephemeral keys, nonces) is passed in by the caller, and every output is
//! written into a caller's buffer. That makes every exchange deterministic, which is
//! how `spec/vectors/` are produced and checked.
//!
//! One file per section of the spec (`src/proto/`):
//!
//! | spec section | file |
//! |---|---|
//! | 3 Framing | `codec.rs` (internal) |
//! | 4 Frames | [`frame`] (the raw frames: internal) |
//! | 5 Key schedule | `schedule.rs` (internal) |
//! | 6 Enrollment | [`enroll`] |
//! | 7 Session handshake | [`handshake`] |
//! | 8 Session: frames | `session.rs` (internal) |
//! | 8 Session: requests, keepalive, closing | [`connection`] |
//! | 7 and 8, a device's side: HELLO through the session | [`device`] |
//! | 9 Token and credential formats | [`credential`] |
//! | 10 Error and close codes | [`codes`]; the errors: [`error`] (a malformed frame: `FrameError`, beside the codec) |
//! | 2.3, 7.7 The two modes | [`mode`] |
//!
//! What these pages document is what a driver needs: a device's [`device::Device`] (or a
//! server's [`handshake`] and [`enroll`] states, then a [`connection::Connection`]),
//! the credential types, ids, statuses and codes, and the errors. The framing, the key
//! schedule, the raw frames and the bare session are public for the test vectors, the
//! fuzz targets and the conformance tool, and hidden here: their rules are the spec's,
//! and the types above apply them.

#[doc(hidden)]
pub mod codec;
pub mod codes;
pub mod connection;
pub mod credential;
pub mod device;
pub mod enroll;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod mode;
#[doc(hidden)]
pub mod schedule;
#[doc(hidden)]
pub mod session;

// Test and tooling helpers: they build frames outside the rules (nonces reused, any
// sequence number), so a device's build does not have them (feature `testing`, which
// the daemon's `server` feature turns on for the conformance tool).
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;

#[doc(hidden)]
pub use codec::decode_frame;
pub use codec::FrameError;
pub use codes::{CloseCode, ErrorCode};
pub use error::{Misuse, ProtocolError};
#[doc(hidden)]
pub use frame::{Body, FrameType, SessionFrame};
pub use frame::{DeliveryKind, Id, Status};
pub use mode::Mode;
pub use schedule::SecretKey;
#[doc(hidden)]
pub use session::{Role, Session};

#[doc(hidden)]
/// Length of the ChaCha20-Poly1305 tag of an encrypted session frame (spec 3.1).
pub const AEAD_TAG_LEN: usize = 16;
#[doc(hidden)]
/// Bytes of a session frame before its variable part: length, type, sequence number.
pub const SESSION_HEADER_LEN: usize = LEN_PREFIX + 1 + 8;
/// A tag: a full HMAC-SHA256 output.
#[doc(hidden)]
pub type Tag = [u8; TAG_LEN];
/// The protocol version this implementation speaks (spec section 2).
pub const VERSION: u8 = 1;
/// Length of every tag: full HMAC-SHA256 output, never truncated (spec section 5).
#[doc(hidden)]
pub const TAG_LEN: usize = 32;
/// Length of the handshake nonces `nc` and `ns` (spec section 7).
#[doc(hidden)]
pub const NONCE_LEN: usize = 32;
/// Length of every secret key and of X25519 public keys.
#[doc(hidden)]
pub const KEY_LEN: usize = 32;
/// Size of the length prefix in front of every frame (spec section 3).
#[doc(hidden)]
pub const LEN_PREFIX: usize = 4;
/// Largest length field any v1 peer may accept (16 MiB). Receivers pick a lower limit.
pub const MAX_FRAME_LEN_CEILING: u32 = 1 << 24;
/// Default limit on a session frame's length field (64 KiB).
pub const DEFAULT_MAX_FRAME_LEN: u32 = 64 * 1024;
/// Smallest session frame limit a peer may announce (spec 4.3).
pub const MIN_SESSION_FRAME_LEN: u32 = 256;
/// Range of the keepalive interval SERVER_AUTH announces, in milliseconds (spec 4.3).
pub const MIN_KEEPALIVE_MS: u32 = 100;
/// Largest keepalive interval SERVER_AUTH may announce: 24 hours.
pub const MAX_KEEPALIVE_MS: u32 = 24 * 60 * 60 * 1000;
/// Limit on the length field of any frame before a session is established. The
/// largest handshake frame (ENROLL_INIT with a 64-byte id) is 132 bytes.
pub const HANDSHAKE_MAX_FRAME_LEN: u32 = 256;
