//! TLS 1.3 with an external pre-shared key (OpenSSL), for the peer `tally bench`
//! compares Tally against: the in-process echo server `examples/bench_tls_psk.rs` and
//! stunnel (whose `PSKsecrets` file holds `PSK_IDENTITY:PSK`), both driven by the load
//! tool's TLS-PSK mode. Bench-only (feature `bench-tls`): the key is a fixed string.
//!
//! Both ends offer only TLS 1.3 with `TLS_AES_128_GCM_SHA256` (the suite OpenSSL's PSK
//! callbacks use) and OpenSSL's default PSK key exchange, `psk_dhe_ke` (an X25519
//! exchange per connection: Tally's session handshake has none). The server sends no
//! session tickets: the load tool never resumes, and tickets nobody uses would only add
//! to the peer's cost.

use std::pin::Pin;

use anyhow::Context;
use openssl::error::ErrorStack;
use openssl::ssl::{Ssl, SslContext, SslMethod, SslVerifyMode, SslVersion};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

/// The PSK identity both ends use.
pub const PSK_IDENTITY: &str = "bench";
/// The PSK: a fixed string, usable as is in stunnel's `PSKsecrets` file.
pub const PSK: &[u8] = b"tally-bench-psk-not-a-secret-0123";
const SUITE: &str = "TLS_AES_128_GCM_SHA256";

/// The server side's context.
pub fn server_context() -> Result<SslContext, ErrorStack> {
    let mut b = SslContext::builder(SslMethod::tls_server())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_ciphersuites(SUITE)?;
    b.set_num_tickets(0)?;
    b.set_psk_server_callback(|_, identity, psk| {
        if identity == Some(PSK_IDENTITY.as_bytes()) && psk.len() >= PSK.len() {
            psk[..PSK.len()].copy_from_slice(PSK);
            Ok(PSK.len())
        } else {
            Ok(0)
        }
    });
    Ok(b.build())
}

/// The client side's context.
pub fn client_context() -> Result<SslContext, ErrorStack> {
    let mut b = SslContext::builder(SslMethod::tls_client())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_ciphersuites(SUITE)?;
    b.set_verify(SslVerifyMode::NONE);
    b.set_psk_client_callback(|_, _hint, identity, psk| {
        let id = PSK_IDENTITY.as_bytes();
        if identity.len() <= id.len() || psk.len() < PSK.len() {
            return Ok(0);
        }
        identity[..id.len()].copy_from_slice(id);
        identity[id.len()] = 0;
        psk[..PSK.len()].copy_from_slice(PSK);
        Ok(PSK.len())
    });
    Ok(b.build())
}

/// Runs the client handshake over `tcp`.
pub async fn connect(ctx: &SslContext, tcp: TcpStream) -> anyhow::Result<SslStream<TcpStream>> {
    let mut s = SslStream::new(Ssl::new(ctx)?, tcp)?;
    Pin::new(&mut s)
        .connect()
        .await
        .context("TLS-PSK handshake")?;
    Ok(s)
}

/// Runs the server handshake over `tcp`.
pub async fn accept(ctx: &SslContext, tcp: TcpStream) -> anyhow::Result<SslStream<TcpStream>> {
    let mut s = SslStream::new(Ssl::new(ctx)?, tcp)?;
    Pin::new(&mut s)
        .accept()
        .await
        .context("TLS-PSK handshake")?;
    Ok(s)
}
