//! The peer a Rust developer would write instead of Tally: a TLS 1.3 PSK echo server of
//! the same build as tallyd (tokio's multi-threaded runtime, one task per connection,
//! OpenSSL in process; see `tally::bench::tls` for the key and settings). Inside TLS it
//! runs the same echo as `bench_plain` (`tally::bench::echo_frames`).
//!
//!     cargo run --release --features bench-tls --example bench_tls_psk -- 127.0.0.1:7422

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

async fn serve(ctx: Arc<openssl::ssl::SslContext>, tcp: TcpStream) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let mut tls = tally::bench::tls::accept(&ctx, tcp).await?;
    Ok(tally::bench::echo_frames(&mut tls).await?)
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
