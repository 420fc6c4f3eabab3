//! Framing (spec 3.2), frame types (4.1), error names (12.2) and codes (10).

use std::fmt;
use std::io::Read;

pub const ENROLL_INIT: u8 = 0x01;
pub const ENROLL_REPLY: u8 = 0x02;
pub const ENROLL_CONFIRM: u8 = 0x03;
pub const ENROLL_DONE: u8 = 0x04;
pub const HELLO: u8 = 0x10;
pub const SERVER_AUTH: u8 = 0x11;
pub const CLIENT_FINISH: u8 = 0x12;
pub const SEALED_HELLO: u8 = 0x13;
pub const SEALED_AUTH: u8 = 0x14;
pub const ERROR: u8 = 0x1f;
pub const REQUEST: u8 = 0x20;
pub const RESPONSE: u8 = 0x21;
pub const MESSAGE: u8 = 0x22;
pub const PING: u8 = 0x23;
pub const PONG: u8 = 0x24;
pub const CLOSE: u8 = 0x25;
pub const KEY_UPDATE: u8 = 0x26;
pub const DELIVER: u8 = 0x27;
pub const ACK: u8 = 0x28;

/// Limit on `length` before a session (3.2).
pub const HANDSHAKE_LIMIT: u32 = 256;
pub const MIN_FRAME_LIMIT: u32 = 256;
pub const MAX_FRAME_LIMIT: u32 = 16_777_216;
pub const MIN_KEEPALIVE: u32 = 100;
pub const MAX_KEEPALIVE: u32 = 86_400_000;

/// ERROR codes (10.1).
pub const E_MALFORMED: u16 = 0x0002;

/// CLOSE codes (10.2).
pub const C_NORMAL: u16 = 0;
pub const C_IDLE_TIMEOUT: u16 = 4;
pub const C_PROTOCOL_ERROR: u16 = 6;
pub const C_FRAME_TOO_LARGE: u16 = 7;

pub fn type_name(t: u8) -> &'static str {
    match t {
        ENROLL_INIT => "ENROLL_INIT",
        ENROLL_REPLY => "ENROLL_REPLY",
        ENROLL_CONFIRM => "ENROLL_CONFIRM",
        ENROLL_DONE => "ENROLL_DONE",
        HELLO => "HELLO",
        SERVER_AUTH => "SERVER_AUTH",
        CLIENT_FINISH => "CLIENT_FINISH",
        SEALED_HELLO => "SEALED_HELLO",
        SEALED_AUTH => "SEALED_AUTH",
        ERROR => "ERROR",
        REQUEST => "REQUEST",
        RESPONSE => "RESPONSE",
        MESSAGE => "MESSAGE",
        PING => "PING",
        PONG => "PONG",
        CLOSE => "CLOSE",
        KEY_UPDATE => "KEY_UPDATE",
        DELIVER => "DELIVER",
        ACK => "ACK",
        _ => "unknown",
    }
}

pub fn type_from_name(n: &str) -> Option<u8> {
    (0u8..=0x28).find(|&t| type_name(t) == n)
}

pub fn error_code_name(c: u16) -> &'static str {
    match c {
        1 => "UNSUPPORTED_VERSION",
        2 => "MALFORMED",
        3 => "AUTH_FAILED",
        4 => "ENROLL_REFUSED",
        5 => "ID_TAKEN",
        6 => "BUSY",
        7 => "TAKEOVER_REFUSED",
        8 => "TIMEOUT",
        9 => "INTERNAL",
        10 => "MODE_REFUSED",
        _ => "MALFORMED (unknown code)",
    }
}

pub fn close_code_name(c: u16) -> &'static str {
    match c {
        0 => "NORMAL",
        1 => "SHUTDOWN",
        2 => "TAKEN_OVER",
        3 => "REVOKED",
        4 => "IDLE_TIMEOUT",
        5 => "SEQUENCE_EXHAUSTED",
        6 => "PROTOCOL_ERROR",
        7 => "FRAME_TOO_LARGE",
        8 => "REMOVED",
        _ => "unknown (closed)",
    }
}

/// Why a receiver refused something, named as in spec 12.2.
#[derive(Debug, Clone, PartialEq)]
pub enum Fail {
    EmptyFrame,
    FrameTooLarge(u32),
    Malformed(String),
    BadTag,
    BadSequence { expected: u64, got: u64 },
    UnsolicitedAnswer(u64),
    DeliveryOrder(u64),
    SequenceExhausted,
    WeakKey,
    /// An ERROR frame, with its code (10.1; other lengths read as MALFORMED).
    Refused(u16),
    /// EOF, reset or an injected ERROR inside a session.
    Truncated(String),
    /// Local errors (I/O other than EOF, timeouts).
    Local(String),
}

impl Fail {
    pub fn name(&self) -> &'static str {
        match self {
            Fail::EmptyFrame => "empty_frame",
            Fail::FrameTooLarge(_) => "frame_too_large",
            Fail::Malformed(_) => "malformed",
            Fail::BadTag => "bad_tag",
            Fail::BadSequence { .. } => "bad_sequence",
            Fail::UnsolicitedAnswer(_) => "unsolicited_answer",
            Fail::DeliveryOrder(_) => "delivery_order",
            Fail::SequenceExhausted => "sequence_exhausted",
            Fail::WeakKey => "weak_key",
            Fail::Refused(_) => "refused",
            Fail::Truncated(_) => "truncated",
            Fail::Local(_) => "local",
        }
    }

    /// The CLOSE code a session receiver sends after this failure (8.3), or `None` when it
    /// sends nothing (ERROR, a cut connection).
    pub fn session_close_code(&self) -> Option<u16> {
        match self {
            Fail::Refused(_) | Fail::Truncated(_) | Fail::Local(_) => None,
            Fail::FrameTooLarge(_) => Some(C_FRAME_TOO_LARGE),
            _ => Some(C_PROTOCOL_ERROR),
        }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::EmptyFrame => write!(f, "empty_frame: a frame of length 0"),
            Fail::FrameTooLarge(l) => write!(f, "frame_too_large: length {l} above the limit"),
            Fail::Malformed(why) => write!(f, "malformed: {why}"),
            Fail::BadTag => write!(f, "bad_tag: a tag did not verify"),
            Fail::BadSequence { expected, got } => {
                write!(f, "bad_sequence: expected seq {expected}, got {got}")
            }
            Fail::UnsolicitedAnswer(s) => {
                write!(f, "unsolicited_answer: answer to {s}, which is not pending")
            }
            Fail::DeliveryOrder(id) => write!(f, "delivery_order: DELIVER msg_id {id} not increasing"),
            Fail::SequenceExhausted => write!(f, "sequence_exhausted"),
            Fail::WeakKey => write!(f, "weak_key: an X25519 output was all zero"),
            Fail::Refused(c) => write!(f, "refused: ERROR {} ({c:#06x})", error_code_name(*c)),
            Fail::Truncated(why) => write!(f, "truncated: {why}"),
            Fail::Local(why) => write!(f, "{why}"),
        }
    }
}

pub fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}
pub fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes(b[i..i + 4].try_into().unwrap())
}
pub fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i..i + 8].try_into().unwrap())
}

/// The code of an ERROR frame (4.4): the `u16` at offset 5 if `length` is 4, else MALFORMED.
pub fn error_code(frame: &[u8]) -> u16 {
    if frame.len() == 8 {
        u16_at(frame, 5)
    } else {
        E_MALFORMED
    }
}

/// An id as 4.1 allows it.
pub fn valid_id(id: &[u8]) -> bool {
    (1..=64).contains(&id.len())
        && id
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b':' | b'@'))
}

/// Reads whole frames from a byte stream, checking `length` against a limit before any
/// buffer grows for it (3.2). `frame()` returns the frame with its length prefix.
pub struct FrameReader<R> {
    pub inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner, buf: vec![0; 64 * 1024], start: 0, end: 0 }
    }

    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// A whole frame already in the buffer, if there is one. Checks of 3.2 steps 1 and 2.
    pub fn try_frame(&mut self, limit: u32) -> Result<Option<(usize, usize)>, Fail> {
        let avail = self.end - self.start;
        if avail < 4 {
            return Ok(None);
        }
        let len = u32_at(&self.buf, self.start);
        if len == 0 {
            return Err(Fail::EmptyFrame);
        }
        if len > limit {
            return Err(Fail::FrameTooLarge(len));
        }
        let total = 4 + len as usize;
        if avail >= total {
            let r = (self.start, self.start + total);
            self.start += total;
            return Ok(Some(r));
        }
        // Make room for the whole frame (at most 4 + limit bytes).
        if self.buf.len() - self.start < total {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() < total {
                self.buf.resize(total, 0);
            }
        }
        Ok(None)
    }

    /// One read from the stream into the buffer. Returns the number of bytes read (0: EOF).
    pub fn fill(&mut self) -> Result<usize, Fail> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Fail::Local("timeout".into()))
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Err(Fail::Truncated(format!("connection reset ({e})")))
                }
                Err(e) => return Err(Fail::Local(format!("read: {e}"))),
            }
        }
    }

    /// The next whole frame, reading as needed; EOF in or before a frame is `truncated`.
    pub fn frame(&mut self, limit: u32) -> Result<(usize, usize), Fail> {
        loop {
            if let Some(r) = self.try_frame(limit)? {
                return Ok(r);
            }
            if self.fill()? == 0 {
                return Err(Fail::Truncated(if self.buffered() == 0 {
                    "EOF".into()
                } else {
                    "EOF inside a frame".into()
                }));
            }
        }
    }

    pub fn bytes(&self, r: (usize, usize)) -> &[u8] {
        &self.buf[r.0..r.1]
    }
    pub fn bytes_mut(&mut self, r: (usize, usize)) -> &mut [u8] {
        &mut self.buf[r.0..r.1]
    }
}
