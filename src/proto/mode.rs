//! The session's two modes (spec 2.3, 7.7): authenticated, or encrypted.

use core::fmt;

use super::{AEAD_TAG_LEN, TAG_LEN};

/// How a session's frames are protected, fixed by the client's first frame (spec 7.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// HELLO, SERVER_AUTH: fields in the clear, each frame with an HMAC-SHA256 tag.
    Authenticated,
    /// SEALED_HELLO, SEALED_AUTH: an ephemeral X25519 exchange, the id sealed to the
    /// server's key, fields sealed with ChaCha20-Poly1305.
    Encrypted,
}

impl Mode {
    /// Length of a session frame's tag in this mode (spec 4.5).
    pub const fn tag_len(self) -> usize {
        match self {
            Mode::Authenticated => TAG_LEN,
            Mode::Encrypted => AEAD_TAG_LEN,
        }
    }

    /// The name operators and configuration files use.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Authenticated => "authenticated",
            Mode::Encrypted => "encrypted",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
