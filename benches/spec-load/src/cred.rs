//! The enrollment token (spec 9.1) and the device credential (9.2).

use std::path::Path;

use crate::crypto::*;
use crate::wire::valid_id;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnrollMode {
    Open = 0,
    Token = 1,
}

#[derive(Clone, Debug)]
pub struct Token {
    pub mode: EnrollMode,
    pub c: Key,
    pub s_pub: Key,
}

fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// 9.2 / 9.1: `S` must have the top bit of its last byte clear.
fn canonical(s: &Key) -> bool {
    s[31] & 0x80 == 0
}

fn hex64(s: &str) -> Option<Key> {
    if s.len() != 64 {
        return None;
    }
    unhex32(s)
}

impl Token {
    pub fn parse(text: &str) -> Result<Token, String> {
        let t = text.trim_matches(is_ws);
        let (mode, rest) = if let Some(r) = t.strip_prefix("tally1-open-") {
            (EnrollMode::Open, r)
        } else if let Some(r) = t.strip_prefix("tally1-token-") {
            (EnrollMode::Token, r)
        } else {
            return Err("an enrollment token starts with tally1-open- or tally1-token- (9.1)".into());
        };
        let (c, s) = rest.split_once('-').ok_or("token: expected <c>-<S>")?;
        let c = hex64(c).ok_or("token: the credential is not 64 hex digits")?;
        let s_pub = hex64(s).ok_or("token: the server key is not 64 hex digits")?;
        if !canonical(&s_pub) {
            return Err("token: the server key is not in canonical form (9.1)".into());
        }
        Ok(Token { mode, c, s_pub })
    }

    pub fn format(&self) -> String {
        let m = match self.mode {
            EnrollMode::Open => "open",
            EnrollMode::Token => "token",
        };
        format!("tally1-{m}-{}-{}", hex(&self.c), hex(&self.s_pub))
    }
}

#[derive(Clone, Debug)]
pub struct Credential {
    pub id: String,
    pub key: Key,
    pub server: String,
    pub s_pub: Key,
}

impl Credential {
    /// Reads the subset of TOML that 9.2 requires every reader to accept: one
    /// `name = value` per line, `#` comments, blank lines; values are basic strings
    /// without escapes, or the integer version.
    pub fn parse(text: &str) -> Result<Credential, String> {
        let (mut ver, mut id, mut key, mut server, mut skey) = (None, None, None, None, None);
        for (i, line) in text.lines().enumerate() {
            let l = line.trim_matches(|c| c == ' ' || c == '\t' || c == '\r');
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let (name, value) = l.split_once('=').ok_or(format!("line {}: not name = value", i + 1))?;
            let name = name.trim_matches(|c| c == ' ' || c == '\t');
            let value = value.trim_matches(|c| c == ' ' || c == '\t');
            // A basic string, or a bare value (the version), either followed by a comment.
            let (value, quoted) = if let Some(v) = value.strip_prefix('"') {
                let end = v.find('"').ok_or(format!("line {}: unterminated string", i + 1))?;
                let after = v[end + 1..].trim_start_matches([' ', '\t']);
                if !after.is_empty() && !after.starts_with('#') {
                    return Err(format!("line {}: unexpected text after the value", i + 1));
                }
                (&v[..end], true)
            } else {
                (value.split('#').next().unwrap().trim_end_matches([' ', '\t']), false)
            };
            let string = || -> Result<String, String> {
                if !quoted {
                    return Err(format!("line {}: {name} is not a basic string", i + 1));
                }
                if value.contains('\\') {
                    return Err(format!("line {}: escapes are not supported", i + 1));
                }
                Ok(value.to_string())
            };
            match name {
                "tally-credential" if !quoted => ver = Some(value.to_string()),
                "tally-credential" => return Err("tally-credential must be the integer 1".into()),
                "id" => id = Some(string()?),
                "key" => key = Some(string()?),
                "server" => server = Some(string()?),
                "server-key" => skey = Some(string()?),
                _ => {} // 9.2: unknown entries are ignored.
            }
        }
        let ver = ver.ok_or("missing tally-credential")?;
        if ver != "1" {
            return Err(format!("credential format version {ver}, not 1"));
        }
        let id = id.ok_or("missing id")?;
        if !valid_id(id.as_bytes()) {
            return Err(format!("id {id:?} breaks spec 4.1"));
        }
        let key = hex64(&key.ok_or("missing key")?).ok_or("key is not 64 hex digits")?;
        let server = server.ok_or("missing server")?;
        let s_pub = hex64(&skey.ok_or("missing server-key (write the file again from the token, 9.2)")?)
            .ok_or("server-key is not 64 hex digits")?;
        if !canonical(&s_pub) {
            return Err("server-key is not in canonical form (9.1)".into());
        }
        Ok(Credential { id, key, server, s_pub })
    }

    pub fn load(path: &Path) -> Result<Credential, String> {
        let t = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Credential::parse(&t).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn to_toml(&self) -> String {
        format!(
            "# Tally device credential (spec/PROTOCOL.md section 9.2). Secret: keep it mode 0600.\n\
             tally-credential = 1\nid = \"{}\"\nkey = \"{}\"\nserver = \"{}\"\nserver-key = \"{}\"\n",
            self.id,
            hex(&self.key),
            self.server,
            hex(&self.s_pub)
        )
    }

    /// Writes the file with mode 0600, refusing to overwrite one.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        f.write_all(self.to_toml().as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
    }
}
