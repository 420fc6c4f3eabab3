//! How the two binaries show a payload: as the bytes it is on standard output (for
//! scripts and pipes), ended with a newline only on a terminal (a person's prompt does
//! not land behind it); and within a line of text (`message: ...`) as its text, with
//! only control characters escaped (no quotes doubled, no backslashes added).

use std::io::{IsTerminal, Write};

/// Writes `payload` to standard output, and a newline after it if standard output is a
/// terminal and the payload does not end with one.
pub fn payload_to_stdout(payload: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(payload)?;
    if std::io::stdout().is_terminal() && !payload.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// `payload` as one line of text: UTF-8 (invalid bytes replaced), control characters
/// escaped (`\n`, `\t`, `\u{1b}`), everything else as it is.
pub fn one_line(payload: &[u8]) -> String {
    let mut out = String::with_capacity(payload.len());
    for c in String::from_utf8_lossy(payload).chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_payload_on_one_line_keeps_its_quotes_and_escapes_only_controls() {
        assert_eq!(one_line(br#"{"interval":60}"#), r#"{"interval":60}"#);
        assert_eq!(one_line(b"a\nb\tc\x1b"), "a\\nb\\tc\\u{1b}");
        assert_eq!(one_line(b"caf\xc3\xa9 \\ ok"), "café \\ ok");
        assert_eq!(one_line(b"\xff"), "\u{fffd}");
    }
}
