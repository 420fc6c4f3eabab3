//! Reading and writing whole frames on a byte stream (spec 3.2), shared by the server
//! and the client. The limit is checked by [`crate::proto::decode_frame`] before the
//! buffer grows for a frame's body.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::proto::{decode_frame, FrameError};

/// Reading a frame failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The stream ended between frames.
    #[error("connection closed by peer")]
    Eof,
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The framing is corrupt (zero or excessive length).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Whether an I/O error means the peer cut the connection (reset, abort). Before the
/// peer's CLOSE, such a cut is truncation (spec 8.6), not an orderly end.
pub fn is_cut(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | UnexpectedEof | BrokenPipe
    )
}

/// Reads the next whole frame, using `buf` for bytes already read.
pub async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    limit: u32,
) -> Result<Bytes, ReadError> {
    loop {
        if let Some(frame) = decode_frame(buf, limit)? {
            return Ok(frame);
        }
        match rd.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Err(ReadError::Eof),
            Ok(0) => return Err(ReadError::Truncated),
            Ok(_) => {}
            Err(e) if is_cut(&e) => return Err(ReadError::Truncated),
            Err(e) => return Err(e.into()),
        }
    }
}
