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
        if rd.read_buf(buf).await? == 0 {
            return Err(if buf.is_empty() {
                ReadError::Eof
            } else {
                ReadError::Truncated
            });
        }
    }
}
