//! Framing (spec section 3): a `u32` big-endian length, then that many bytes.
//!
//! [`decode_frame`] follows the `tokio_util::codec::Decoder` contract: `Ok(None)`
//! means more bytes are needed, `Err` means the stream is corrupt and the connection
//! ends. The length is checked against the receiver's limit *before* any buffer grows
//! for the body, so a lying prefix costs nothing. [`Reader`] reads the fields of one
//! complete frame; short input and trailing bytes are both errors.

use bytes::{Buf, Bytes, BytesMut};

use super::codes::{CloseCode, ErrorCode};
use super::LEN_PREFIX;

/// The most [`decode_frame`] reserves ahead of the bytes received.
pub const RESERVE_STEP: usize = 16 * 1024;

/// Takes one whole frame (length prefix included) off the front of `buf`.
///
/// Returns `Ok(None)` if `buf` does not yet hold a whole frame; in that case room for
/// at most [`RESERVE_STEP`] more bytes of it is reserved in `buf`, and only once its
/// length passed the limit: the buffer grows with the bytes that arrive, not with what
/// the prefix announces (a peer that announces a large frame and then drips it holds
/// no more memory than it sent).
pub fn decode_frame(buf: &mut BytesMut, limit: u32) -> Result<Option<Bytes>, FrameError> {
    Ok(decode_frame_owned(buf, limit)?.map(BytesMut::freeze))
}

/// [`decode_frame`], the frame handed out as a buffer of its own (split off `buf`
/// without a copy), which a session can decrypt in place
/// ([`super::Session::open_owned`]).
pub fn decode_frame_owned(buf: &mut BytesMut, limit: u32) -> Result<Option<BytesMut>, FrameError> {
    let Some(len) = peek_len(buf, limit)? else {
        return Ok(None);
    };
    let total = LEN_PREFIX + len as usize;
    if buf.len() < total {
        buf.reserve((total - buf.len()).min(RESERVE_STEP));
        return Ok(None);
    }
    Ok(Some(buf.split_to(total)))
}

/// Reads and checks the length prefix without consuming anything.
///
/// Spec 3: a length of zero is an error; a length above `limit` is an error.
pub fn peek_len(buf: &[u8], limit: u32) -> Result<Option<u32>, FrameError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes"));
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    Ok(Some(len))
}

/// Writes a frame header: the length prefix for `body_len` bytes after it, then `ty`.
/// `body_len` counts the type byte.
pub(crate) fn put_header(out: &mut BytesMut, body_len: usize, ty: u8) {
    let len = u32::try_from(body_len).expect("frame length checked by the caller");
    out.reserve(LEN_PREFIX + body_len);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[ty]);
}

/// Reads the fields of one complete frame (its bytes after the length prefix).
pub struct Reader<'a> {
    buf: &'a [u8],
    ty: u8,
}

impl<'a> Reader<'a> {
    /// Starts reading `frame` (length prefix included) and consumes its type byte.
    pub fn new(frame: &'a [u8]) -> Result<Self, FrameError> {
        match frame.get(LEN_PREFIX..) {
            Some([ty, rest @ ..]) => Ok(Reader { buf: rest, ty: *ty }),
            _ => Err(FrameError::Empty),
        }
    }

    /// The frame's type byte.
    pub fn ty(&self) -> u8 {
        self.ty
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn truncated(&self) -> FrameError {
        FrameError::Truncated { ty: self.ty }
    }

    /// Reads exactly `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(self.truncated());
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Reads a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }

    /// Reads a `u8`.
    pub fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }

    /// Reads a big-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(self.take(2)?.get_u16())
    }

    /// Reads a big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(self.take(4)?.get_u32())
    }

    /// Reads a big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(self.take(8)?.get_u64())
    }

    /// Splits off everything but the last `n` bytes (for "payload, then tag").
    pub fn all_but(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let keep = self
            .buf
            .len()
            .checked_sub(n)
            .ok_or_else(|| self.truncated())?;
        self.take(keep)
    }

    /// Ends reading: any byte left over is an error.
    pub fn finish(self) -> Result<(), FrameError> {
        match self.buf.len() {
            0 => Ok(()),
            extra => Err(FrameError::Trailing { ty: self.ty, extra }),
        }
    }
}

/// A frame that cannot be parsed. Any of these ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announced an empty frame (spec 3: length >= 1).
    #[error("frame length is zero")]
    Empty,
    /// The length prefix is above the receiver's limit; nothing was buffered.
    #[error("frame length {len} exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The announced length.
        len: u32,
        /// The receiver's limit.
        limit: u32,
    },
    /// The frame ended before all its fields were read.
    #[error("frame of type {ty:#04x} is truncated")]
    Truncated {
        /// Frame type byte.
        ty: u8,
    },
    /// Bytes were left after the last field of a fixed-size frame.
    #[error("frame of type {ty:#04x} has {extra} trailing bytes")]
    Trailing {
        /// Frame type byte.
        ty: u8,
        /// Number of unexpected bytes.
        extra: usize,
    },
    /// The type byte is not one spec section 4 defines.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// A known frame type that is not allowed at this point of the exchange.
    #[error("unexpected frame type {got:#04x} ({what})")]
    UnexpectedType {
        /// The type received.
        got: u8,
        /// What was expected instead.
        what: &'static str,
    },
    /// HELLO or ENROLL_INIT carried a version this implementation does not speak.
    #[error("unsupported protocol version {0} (this peer speaks version {v})", v = crate::proto::VERSION)]
    UnsupportedVersion(u8),
    /// The identity is empty, too long or has a byte outside the alphabet (spec 4.1).
    #[error("invalid identity: {0}")]
    BadId(&'static str),
    /// The enrollment mode byte is neither 0 (open) nor 1 (token).
    #[error("unknown enrollment mode {0}")]
    BadMode(u8),
    /// SEALED_HELLO's opened id has non-zero bytes after the id (spec 4.3).
    #[error("the sealed id's padding is not zero")]
    BadPadding,
    /// A CLOSE reason that is not UTF-8 or longer than 255 bytes.
    #[error("invalid close reason")]
    BadReason,
    /// A DELIVER whose message id is 0 or whose kind is neither 1 nor 2 (spec 4.5).
    #[error("DELIVER with message id {msg_id} and kind {kind}: ids start at 1, kinds are 1 and 2")]
    BadDelivery {
        /// The message id.
        msg_id: u64,
        /// The kind byte.
        kind: u8,
    },
    /// A limit announced in HELLO or SERVER_AUTH is outside its range (spec 4.3).
    #[error("announced {what} of {value} is outside {min}..={max}")]
    BadLimit {
        /// Which limit.
        what: &'static str,
        /// The announced value.
        value: u32,
        /// The smallest value allowed.
        min: u32,
        /// The largest value allowed.
        max: u32,
    },
}

impl FrameError {
    /// The code of an ERROR frame that refuses a handshake for this frame (spec 10.1).
    pub fn error_code(&self) -> ErrorCode {
        match self {
            FrameError::UnsupportedVersion(_) => ErrorCode::UNSUPPORTED_VERSION,
            FrameError::Empty
            | FrameError::TooLarge { .. }
            | FrameError::Truncated { .. }
            | FrameError::Trailing { .. }
            | FrameError::UnknownType(_)
            | FrameError::UnexpectedType { .. }
            | FrameError::BadId(_)
            | FrameError::BadMode(_)
            | FrameError::BadPadding
            | FrameError::BadReason
            | FrameError::BadDelivery { .. }
            | FrameError::BadLimit { .. } => ErrorCode::MALFORMED,
        }
    }

    /// The code of a CLOSE frame that ends a session for this frame (spec 10.2).
    pub fn close_code(&self) -> CloseCode {
        match self {
            FrameError::TooLarge { .. } => CloseCode::FRAME_TOO_LARGE,
            FrameError::Empty
            | FrameError::Truncated { .. }
            | FrameError::Trailing { .. }
            | FrameError::UnknownType(_)
            | FrameError::UnexpectedType { .. }
            | FrameError::UnsupportedVersion(_)
            | FrameError::BadId(_)
            | FrameError::BadMode(_)
            | FrameError::BadPadding
            | FrameError::BadReason
            | FrameError::BadDelivery { .. }
            | FrameError::BadLimit { .. } => CloseCode::PROTOCOL_ERROR,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn needs_prefix_then_body() {
        let mut buf = BytesMut::from(&[0u8, 0][..]);
        assert_eq!(decode_frame(&mut buf, 16), Ok(None));
        buf.extend_from_slice(&[0, 3, 0x23, 1]);
        assert_eq!(decode_frame(&mut buf, 16), Ok(None));
        buf.extend_from_slice(&[2, 0xff]);
        let frame = decode_frame(&mut buf, 16).unwrap().unwrap();
        assert_eq!(&frame[..], &[0, 0, 0, 3, 0x23, 1, 2]);
        assert_eq!(&buf[..], &[0xff]);
    }

    #[test]
    fn an_announced_frame_is_reserved_as_it_arrives_not_all_at_once() {
        // 16 MiB announced, within the limit: the buffer grows with what arrives.
        let mut buf = BytesMut::from(&[0x01u8, 0, 0, 0][..]);
        assert_eq!(decode_frame(&mut buf, 1 << 24), Ok(None));
        assert!(buf.capacity() <= 4 + RESERVE_STEP, "{}", buf.capacity());
        for _ in 0..4 {
            buf.extend_from_slice(&[7; 1000]);
            assert_eq!(decode_frame(&mut buf, 1 << 24), Ok(None));
        }
        assert!(
            buf.capacity() <= 4 + 4000 + 2 * RESERVE_STEP,
            "{}",
            buf.capacity()
        );
    }

    #[test]
    fn zero_length_is_refused() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(decode_frame(&mut buf, 16), Err(FrameError::Empty));
    }

    #[test]
    fn lying_length_is_refused_before_allocation() {
        let mut buf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        let before = buf.capacity();
        assert_eq!(
            decode_frame(&mut buf, 1024),
            Err(FrameError::TooLarge {
                len: u32::MAX,
                limit: 1024
            })
        );
        assert_eq!(buf.capacity(), before);
    }

    #[test]
    fn limit_is_inclusive() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&4u32.to_be_bytes());
        buf.extend_from_slice(&[1, 2, 3, 4]);
        assert!(decode_frame(&mut buf.clone(), 4).unwrap().is_some());
        assert_eq!(
            decode_frame(&mut buf, 3),
            Err(FrameError::TooLarge { len: 4, limit: 3 })
        );
    }

    #[test]
    fn reader_rejects_short_and_trailing() {
        let frame = [0, 0, 0, 3, 0x20, 1, 2];
        let mut r = Reader::new(&frame).unwrap();
        assert_eq!(r.ty(), 0x20);
        assert_eq!(r.u16(), Ok(0x0102));
        assert_eq!(r.u8(), Err(FrameError::Truncated { ty: 0x20 }));
        let mut r = Reader::new(&frame).unwrap();
        assert_eq!(r.u8().unwrap(), 1);
        assert_eq!(r.finish(), Err(FrameError::Trailing { ty: 0x20, extra: 1 }));
        let mut r = Reader::new(&frame).unwrap();
        assert_eq!(r.u64(), Err(FrameError::Truncated { ty: 0x20 }));
    }

    proptest! {
        /// Arbitrary bytes, fed in arbitrary chunks, never panic, never yield a frame
        /// above the limit, and never grow the buffer beyond twice a maximal frame.
        #[test]
        fn arbitrary_stream_is_bounded(data in proptest::collection::vec(any::<u8>(), 0..2048),
                                       chunk in 1usize..300, limit in 1u32..512) {
            let mut buf = BytesMut::new();
            let max_cap = 2 * (LEN_PREFIX + limit as usize) + chunk;
            for piece in data.chunks(chunk) {
                buf.extend_from_slice(piece);
                loop {
                    match decode_frame(&mut buf, limit) {
                        Ok(Some(frame)) => prop_assert!(frame.len() <= LEN_PREFIX + limit as usize),
                        Ok(None) => break,
                        Err(_) => return Ok(()),
                    }
                }
                prop_assert!(buf.capacity() <= max_cap, "capacity {} > {}", buf.capacity(), max_cap);
            }
        }
    }
}
