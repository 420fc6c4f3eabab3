//! The codes that go on the wire (spec section 10): an ERROR frame's, refusing a
//! handshake or an enrollment ([`ErrorCode`]), and a CLOSE frame's, ending a session
//! ([`CloseCode`]).

use core::fmt;

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
