//! The limit for `tally bench`: a minimal plain TCP echo server. One tokio task per
//! connection (as tallyd has), which reads what arrived, writes back every whole
//! length-prefixed frame in it with one write, and reads again: no per-request task,
//! timer or channel, no authentication (`tally::bench::echo_frames`). Frames are
//! `u32 length | u64 id | payload`. Whatever tallyd does beyond this costs it something;
//! the bench reports Tally as a fraction of this server's throughput and a multiple of
//! its CPU per request.
//!
//!     cargo run --release --features cli --example bench_plain -- 127.0.0.1:7421

use tokio::net::{TcpListener, TcpStream};

async fn serve(mut tcp: TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    tally::bench::echo_frames(&mut tcp).await
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
