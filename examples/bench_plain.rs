//! The limit for `tally bench`: a minimal plain TCP echo server. One tokio task per
//! connection (as tallyd has), which reads what arrived, writes back every whole
//! length-prefixed frame in it with one write, and reads again: no per-request task,
//! timer or channel, no authentication. Frames are `u32 length | u64 id | payload`.
//! Whatever tallyd does beyond this costs it something; the bench reports Tally as a
//! fraction of this server's throughput and a multiple of its CPU per request.
//!
//!     cargo run --release --features cli --example bench_plain -- 127.0.0.1:7421

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Frames longer than this end the connection (as tallyd's limit does).
const MAX_FRAME: usize = 16 << 20;

async fn serve(mut tcp: TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if tcp.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        // The whole frames at the front of `buf`, echoed in one write.
        let mut whole = 0;
        while buf.len() - whole >= 4 {
            let len = u32::from_be_bytes(buf[whole..whole + 4].try_into().unwrap()) as usize;
            if len > MAX_FRAME {
                return Ok(());
            }
            if buf.len() - whole < 4 + len {
                buf.reserve(4 + len);
                break;
            }
            whole += 4 + len;
        }
        if whole > 0 {
            tcp.write_all(&buf[..whole]).await?;
            buf.advance(whole);
        }
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7421".into());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("bench_plain listening on {}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(serve(tcp));
    }
}
