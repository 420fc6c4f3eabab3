//! What an operator hands to a device, and what a device keeps (spec section 9).
//!
//! The *enrollment token* is one copy-pasteable line holding the enrollment credential
//! and the server's static public key, which the device pins:
//!
//! ```text
//! tally1-open-<64 hex: EK>-<64 hex: S>          open mode (fleet-wide key)
//! tally1-token-<64 hex: T(id)>-<64 hex: S>      per-identity token (random, single-use)
//! ```
//!
//! The *credential* is the device's identity after enrollment; its file format (a small
//! TOML file, spec 9.2) is read and written by the client (`Credential::from_file`).

use alloc::{format, string::String};
use core::fmt;
use zeroize::Zeroizing;

use super::enroll::ClientParams;
use super::frame::{EnrollMode, Id};
use super::schedule::SecretKey;
use super::KEY_LEN;

/// A token or credential that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// The token does not have the `tally1-MODE-HEX-HEX` shape.
    #[error("not an enrollment token: expected tally1-open-<64 hex>-<64 hex> or tally1-token-<64 hex>-<64 hex>")]
    TokenShape,
    /// A field is not 64 hexadecimal digits.
    #[error("{0} is not 64 hexadecimal digits")]
    Hex(&'static str),
    /// The credential file is not valid TOML or misses a field.
    #[error("invalid credential file: {0}")]
    File(String),
    /// The credential's format version is not 1.
    #[error("credential format version {0} is not supported (expected 1)")]
    Version(i64),
    /// The id in the credential breaks spec 4.1.
    #[error("invalid id in credential: {0}")]
    Id(#[from] super::FrameError),
    /// A server key whose top bit is set: not the canonical form of a key (spec 9.1).
    #[error("the server key is not in canonical form (its last byte is 0x80 or more): a copy error? Take it from the enrollment token")]
    ServerKeyNotCanonical,
}

/// The server's static public key `S` from a token or a credential (spec 9.1, 9.2): 64
/// hex digits, its top bit clear. A key with the bit set would make the same `dh_es` but
/// another `K_id` salt than the server's own `S`: every sealed id would fail to open,
/// silently, as an unknown id would.
pub(crate) fn parse_server_key(s: &str) -> Result<[u8; KEY_LEN], CredentialError> {
    let key = parse_hex32(s, "the server key")?;
    if key[KEY_LEN - 1] & 0x80 != 0 {
        return Err(CredentialError::ServerKeyNotCanonical);
    }
    Ok(key)
}

pub(crate) fn parse_hex32(s: &str, what: &'static str) -> Result<[u8; KEY_LEN], CredentialError> {
    let mut out = [0u8; KEY_LEN];
    hex::decode_to_slice(s, &mut out).map_err(|_| CredentialError::Hex(what))?;
    Ok(out)
}

/// An enrollment token (spec 9.1).
#[derive(Clone)]
pub struct EnrollmentToken {
    /// Open (the credential is EK) or per-identity token.
    pub mode: EnrollMode,
    /// The enrollment credential.
    pub credential: SecretKey,
    /// The server's static public key.
    pub server_static: [u8; KEY_LEN],
}

impl EnrollmentToken {
    /// The token as text. It is a secret: the result is zeroized on drop.
    pub fn encode(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "tally1-{}-{}-{}",
            self.mode.as_str(),
            hex::encode(self.credential.expose()),
            hex::encode(self.server_static)
        ))
    }

    /// Parses a token; surrounding whitespace (spec 9.1: space, tab, LF and CR, nothing
    /// else) is ignored.
    pub fn parse(s: &str) -> Result<Self, CredentialError> {
        let mut parts = s
            .trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'))
            .split('-');
        let (Some("tally1"), Some(mode), Some(cred), Some(key), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(CredentialError::TokenShape);
        };
        let mode = match mode {
            "open" => EnrollMode::Open,
            "token" => EnrollMode::Token,
            _ => return Err(CredentialError::TokenShape),
        };
        let mut secret = Zeroizing::new(parse_hex32(cred, "the credential")?);
        let credential = SecretKey::from_bytes(*secret);
        secret.iter_mut().for_each(|b| *b = 0);
        Ok(EnrollmentToken {
            mode,
            credential,
            server_static: parse_server_key(key)?,
        })
    }

    /// The parameters to enroll `id` with this token.
    pub fn client_params(&self, id: Id) -> ClientParams {
        ClientParams {
            id,
            mode: self.mode,
            credential: self.credential.clone(),
            server_static: self.server_static,
        }
    }
}

impl fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollmentToken")
            .field("mode", &self.mode)
            .field("server_static", &hex::encode(self.server_static))
            .finish_non_exhaustive()
    }
}

/// A device's credential after enrollment (spec 9.2).
#[derive(Clone)]
pub struct Credential {
    /// The enrolled identity.
    pub id: Id,
    /// The identity key `k`.
    pub key: SecretKey,
    /// Where the server listens (`host:port`), as given at enrollment.
    pub server: String,
    /// The server's static public key `S`, from the enrollment token: the encrypted
    /// mode seals the id to it (spec 7.7, 9.2).
    pub server_key: [u8; 32],
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("id", &self.id)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip() {
        let t = EnrollmentToken {
            mode: EnrollMode::Token,
            credential: SecretKey::from_bytes([0xab; 32]),
            server_static: [0x4d; 32],
        };
        let text = t.encode();
        assert_eq!(&text[..13], "tally1-token-");
        let back = EnrollmentToken::parse(&format!("  {}\n", *text)).unwrap();
        assert_eq!(back.mode, EnrollMode::Token);
        assert!(back.credential.ct_eq(&t.credential));
        assert_eq!(back.server_static, [0x4d; 32]);
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let good = format!("tally1-open-{}-{}", "00".repeat(32), "11".repeat(32));
        assert!(EnrollmentToken::parse(&good).is_ok());
        let upper = format!("tally1-open-{}-{}", "AB".repeat(32), "4D".repeat(32));
        assert_eq!(
            EnrollmentToken::parse(&upper).unwrap().server_static,
            [0x4d; 32]
        );
        // Spec 9.1: S with its top bit set is not a key in canonical form.
        let high = format!("tally1-open-{}-{}", "00".repeat(32), "cd".repeat(32));
        assert_eq!(
            EnrollmentToken::parse(&high).err(),
            Some(CredentialError::ServerKeyNotCanonical)
        );
        assert_eq!(
            EnrollmentToken::parse("tally1-open-00").err(),
            Some(CredentialError::TokenShape)
        );
        assert_eq!(
            EnrollmentToken::parse(&good.replace("open", "shut")).err(),
            Some(CredentialError::TokenShape)
        );
        assert_eq!(
            EnrollmentToken::parse(&format!("{good}-00")).err(),
            Some(CredentialError::TokenShape)
        );
        // Whitespace is space, tab, LF and CR only (spec 9.1).
        assert!(EnrollmentToken::parse(&format!(" \t\r\n{good}\r\n\t ")).is_ok());
        for odd in ["\u{a0}", "\u{2003}", "\u{b}", "\u{c}", "\u{feff}"] {
            assert!(
                EnrollmentToken::parse(&format!("{odd}{good}")).is_err(),
                "{odd:?}"
            );
            assert!(
                EnrollmentToken::parse(&format!("{good}{odd}")).is_err(),
                "{odd:?}"
            );
        }
        let short = format!("tally1-open-{}-{}", "00".repeat(31), "11".repeat(32));
        assert_eq!(
            EnrollmentToken::parse(&short).err(),
            Some(CredentialError::Hex("the credential"))
        );
    }

    #[test]
    fn token_debug_hides_the_credential() {
        let t = EnrollmentToken {
            mode: EnrollMode::Open,
            credential: SecretKey::from_bytes([0xab; 32]),
            server_static: [0; 32],
        };
        assert!(!format!("{t:?}").contains("abab"));
    }
}
