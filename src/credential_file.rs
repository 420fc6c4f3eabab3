//! The credential file (spec 9.2): a small TOML file. Outside the protocol core, which
//! needs no TOML parser (a device that stores its credential its own way never reads one).

use zeroize::Zeroizing;

use crate::proto::credential::{parse_hex32, parse_server_key, Credential, CredentialError};
use crate::proto::{Id, SecretKey};

/// What a credential file holds, for error messages.
const SHAPE: &str = "a credential file has the lines `tally-credential = 1`, \
                     `id = \"...\"`, `key = \"<64 hex digits>\"`, `server = \"HOST:PORT\"` \
                     and `server-key = \"<64 hex digits>\"`";

impl Credential {
    /// The credential file's text. It is a secret: the result is zeroized on drop.
    pub fn to_file(&self) -> Zeroizing<String> {
        let server = toml::Value::String(self.server.clone());
        Zeroizing::new(format!(
            "# Tally device credential (spec/PROTOCOL.md section 9.2). Secret: keep it mode 0600.\n\
             tally-credential = 1\nid = \"{}\"\nkey = \"{}\"\nserver = {}\nserver-key = \"{}\"\n",
            self.id,
            hex::encode(self.key.expose()),
            server,
            hex::encode(self.server_key),
        ))
    }

    /// Parses a credential file.
    pub fn from_file(text: &str) -> Result<Self, CredentialError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            // What people hand over instead: the token the credential was enrolled with
            // (not TOML; a file whose first entry is named `tally1-...` is).
            if text.trim_start().starts_with("tally1-") {
                return CredentialError::File(
                    "this is an enrollment token, not a device credential: enroll with it \
                     (`tally enroll --token-file FILE --id ID`), which writes the credential file"
                        .into(),
                );
            }
            let before = e.span().and_then(|span| text.get(..span.start));
            let line = before.map_or(1, |b| b.matches('\n').count() + 1);
            CredentialError::File(format!(
                "line {line}: {}; it does not look like a Tally credential ({SHAPE})",
                e.message()
            ))
        })?;
        let field = |name: &str| {
            table.get(name).ok_or_else(|| {
                CredentialError::File(format!(
                    "missing field `{name}` (a truncated file? {SHAPE})"
                ))
            })
        };
        let string = |name: &'static str| {
            field(name)?
                .as_str()
                .ok_or_else(|| CredentialError::File(format!("field `{name}` must be a string")))
        };
        match field("tally-credential")?.as_integer() {
            Some(1) => {}
            Some(v) => return Err(CredentialError::Version(v)),
            None => {
                return Err(CredentialError::File(
                    "field `tally-credential` must be an integer".into(),
                ))
            }
        }
        let key = Zeroizing::new(parse_hex32(string("key")?, "the key")?);
        Ok(Credential {
            id: Id::new(string("id")?)?,
            key: SecretKey::from_bytes(*key),
            server: string("server")?.to_owned(),
            server_key: parse_server_key(string("server-key")?)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server key in canonical form (its top bit clear).
    fn s_key() -> [u8; 32] {
        let mut s = [0xa5; 32];
        s[31] = 0x25;
        s
    }

    #[test]
    fn credential_round_trip_and_errors() {
        let c = Credential {
            id: Id::new("dev-1").unwrap(),
            key: SecretKey::from_bytes([7; 32]),
            server: "127.0.0.1:7420".into(),
            server_key: s_key(),
        };
        let text = c.to_file();
        let s_hex = hex::encode(s_key());
        assert!(
            text.contains(&format!("server-key = \"{s_hex}\"")),
            "{}",
            *text
        );
        let back = Credential::from_file(&text).unwrap();
        assert_eq!(back.id, c.id);
        assert!(back.key.ct_eq(&c.key));
        assert_eq!(back.server, c.server);
        assert_eq!(back.server_key, c.server_key);
        assert!(!format!("{back:?}").contains("0707"));
        // Spec 9.2: upper-case hex digits read; the server key is required, 64 digits,
        // in canonical form (top bit clear).
        let upper = text.replace(&s_hex, &s_hex.to_uppercase());
        assert_eq!(Credential::from_file(&upper).unwrap().server_key, s_key());
        let without: String = text
            .lines()
            .filter(|l| !l.starts_with("server-key"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(matches!(
            Credential::from_file(&without),
            Err(CredentialError::File(e)) if e.contains("server-key")
        ));
        assert_eq!(
            Credential::from_file(&text.replace(&s_hex, &s_hex[2..])).err(),
            Some(CredentialError::Hex("the server key"))
        );
        let high = text.replace(&s_hex, &format!("{}a5", &s_hex[..62]));
        assert_eq!(
            Credential::from_file(&high).err(),
            Some(CredentialError::ServerKeyNotCanonical)
        );
        assert_eq!(
            Credential::from_file(&text.replace("= 1", "= 2")).err(),
            Some(CredentialError::Version(2))
        );
        assert!(matches!(
            Credential::from_file("id = \"x\""),
            Err(CredentialError::File(_))
        ));
        assert!(matches!(
            Credential::from_file(&text.replace("dev-1", "dev 1")),
            Err(CredentialError::Id(_))
        ));
    }

    #[test]
    fn an_entry_named_like_a_token_is_an_entry() {
        // Found with the `credential` fuzz target's model: unknown entries are ignored
        // (spec 9.2), `tally1-note` first in the file too; only what is not TOML is taken
        // for a token.
        let k = "07".repeat(32);
        let text = format!(
            "tally1-note = \"x\"\ntally-credential = 1\nid = \"dev-1\"\nkey = \"{k}\"\n\
             server = \"h:1\"\nserver-key = \"{k}\"\n"
        );
        assert_eq!(Credential::from_file(&text).unwrap().id.as_str(), "dev-1");
        let token = format!("tally1-open-{}-{}\n", "00".repeat(32), "11".repeat(32));
        assert!(matches!(
            Credential::from_file(&token),
            Err(CredentialError::File(e)) if e.contains("enrollment token")
        ));
    }
}
