//! The peer a Rust developer would write instead of Tally: a TLS 1.3 PSK echo server of
//! the same build as tallyd (tokio's multi-threaded runtime, one task per connection,
//! OpenSSL in process; see `tally::bench::tls` for the key and settings). Inside TLS it
//! echoes `u32 length | u64 id | payload` frames as `bench_plain` does: each read's
//! whole frames in one write.
//!
//!     cargo run --release --features bench-tls --example bench_tls_psk -- 127.0.0.1:7422

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_FRAME: usize = 16 << 20;

async fn serve(ctx: Arc<openssl::ssl::SslContext>, tcp: TcpStream) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let mut tls = tally::bench::tls::accept(&ctx, tcp).await?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if tls.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        let mut whole = 0;
        while buf.len() - whole >= 4 {
            let len = u32::from_be_bytes(buf[whole..whole + 4].try_into()?) as usize;
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
            tls.write_all(&buf[..whole]).await?;
            buf.advance(whole);
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7422".into());
    let ctx = Arc::new(tally::bench::tls::server_context()?);
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("bench_tls_psk listening on {}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(serve(ctx.clone(), tcp));
    }
}
