//! Spec 9.2 written out a second time, independently of the readers under test: the
//! form of a credential file that every reader MUST accept ("one `name = value` per
//! line, `#` comments, blank lines", values basic strings without escapes, the version
//! an integer), and what such a file holds. Shared by the `credential` and
//! `c_credential` targets (each includes it with `#[path]`).
#![allow(dead_code)]

use std::collections::BTreeMap;

/// A value of the minimal form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// A TOML comment or basic-string character: no control character but tab, no DEL.
fn plain(c: char) -> bool {
    c == '\t' || !(c.is_control() && (c as u32) < 0x80)
}

fn blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// The entries of `text` if it is of the minimal form (LF or CRLF line ends, bare keys
/// at the start of a line, unique names), else `None`.
pub fn minimal(text: &str) -> Option<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    let lines: Vec<&str> = text.split('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        // CRLF ends a line; a CR not followed by LF is no line end (and no TOML).
        let line = match line.strip_suffix('\r') {
            Some(l) if i + 1 < lines.len() => l,
            _ => line,
        };
        let t = line.trim_start_matches(blank);
        if t.is_empty() {
            continue;
        }
        if let Some(comment) = t.strip_prefix('#') {
            if !comment.chars().all(plain) {
                return None;
            }
            continue;
        }
        let name_len = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(line.len());
        if name_len == 0 {
            return None;
        }
        let (name, rest) = line.split_at(name_len);
        let rest = rest.trim_start_matches(blank).strip_prefix('=')?;
        let rest = rest.trim_start_matches(blank);
        let (value, tail) = if let Some(s) = rest.strip_prefix('"') {
            let end = s.find('"')?;
            let v = &s[..end];
            if v.contains('\\') || !v.chars().all(plain) {
                return None;
            }
            (Value::Str(v.to_owned()), &s[end + 1..])
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '-'))
                .unwrap_or(rest.len());
            let digits = &rest[..end];
            let body = digits.strip_prefix('-').unwrap_or(digits);
            if body.is_empty()
                || body.len() > 18
                || !body.bytes().all(|b| b.is_ascii_digit())
                || (body.len() > 1 && body.starts_with('0'))
            {
                return None;
            }
            (Value::Int(digits.parse().ok()?), &rest[end..])
        };
        let tail = tail.trim_start_matches(blank);
        if !tail.is_empty() && !(tail.starts_with('#') && tail[1..].chars().all(plain)) {
            return None;
        }
        if out.insert(name.to_owned(), value).is_some() {
            return None;
        }
    }
    Some(out)
}

/// Whether the readers under test require the entry `server-key` (64 hex digits), which
/// spec 9.2 is gaining: whether the Rust writer writes it.
pub fn server_key_required() -> bool {
    static REQUIRED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REQUIRED.get_or_init(|| {
        let k = "07".repeat(32);
        let text = format!(
            "tally-credential = 1\nid = \"a\"\nkey = \"{k}\"\nserver = \"h:1\"\nserver-key = \"{k}\"\n"
        );
        let c = tally::proto::credential::Credential::from_file(&text).expect("a valid credential");
        c.to_file().contains("\nserver-key = ")
    })
}

/// What a reader must make of a file of the minimal form: the id, key and server of a
/// valid credential, or `None` (it must be refused: version not 1, an id that breaks
/// 4.1, a key that is not 64 hex digits, a server key that is not 64 hex digits in
/// canonical form (9.1), a missing or mistyped entry).
pub fn expected(entries: &BTreeMap<String, Value>) -> Option<(String, [u8; 32], String)> {
    if entries.get("tally-credential") != Some(&Value::Int(1)) {
        return None;
    }
    if server_key_required() {
        match entries.get("server-key") {
            // 64 hex digits, in canonical form (9.1: the last byte's top bit clear).
            Some(Value::Str(k))
                if k.len() == 64
                    && k.bytes().all(|b| b.is_ascii_hexdigit())
                    && u8::from_str_radix(&k[62..], 16).is_ok_and(|last| last < 0x80) => {}
            _ => return None,
        }
    }
    let string = |name: &str| match entries.get(name) {
        Some(Value::Str(s)) => Some(s.clone()),
        _ => None,
    };
    let (id, key, server) = (string("id")?, string("key")?, string("server")?);
    let id_ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:@".contains(&b));
    if !id_ok || key.len() != 64 {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, pair) in key.as_bytes().chunks(2).enumerate() {
        let digit = |b: u8| (b as char).to_digit(16);
        k[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some((id, k, server))
}

/// The spec 9.1 token, read by the model: whitespace (space, tab, LF, CR) around it,
/// `tally1-`, the mode word, two times 64 hex digits of either case, `S` (the second) in
/// canonical form (its last byte below 0x80).
pub fn token(s: &str) -> Option<(bool, [u8; 32], [u8; 32])> {
    let t = s.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
    let rest = t.strip_prefix("tally1-")?;
    let (open, rest) = match (rest.strip_prefix("open-"), rest.strip_prefix("token-")) {
        (Some(r), _) => (true, r),
        (_, Some(r)) => (false, r),
        _ => return None,
    };
    let b = rest.as_bytes();
    if b.len() != 129 || b[64] != b'-' {
        return None;
    }
    let hex = |h: &[u8]| -> Option<[u8; 32]> {
        let mut o = [0u8; 32];
        for i in 0..32 {
            let digit = |b: u8| (b as char).to_digit(16);
            o[i] = (digit(h[2 * i])? * 16 + digit(h[2 * i + 1])?) as u8;
        }
        Some(o)
    };
    let server = hex(&b[65..])?;
    // S in canonical form: the top bit of its last byte clear.
    if server[31] & 0x80 != 0 {
        return None;
    }
    Some((open, hex(&b[..64])?, server))
}
