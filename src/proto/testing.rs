//! Helpers for tests, benchmarks and fuzz targets outside the crate. Not API.

use core::time::Duration;

use bytes::BytesMut;

use super::frame::{Id, Mode};
use super::handshake::{ClientAwaitAuth, Established, HelloReceived, ServerLimits};
use super::{SecretKey, Session};

/// A client and a server session that completed a real handshake in memory, with a
/// fixed key and nonces, each sending frames up to `max_frame_len` (256..=16 MiB), in
/// the authenticated mode.
pub fn session_pair(max_frame_len: u32) -> (Session, Session) {
    session_pair_in(Mode::Authenticated, max_frame_len)
}

/// [`session_pair`] in `mode`.
pub fn session_pair_in(mode: Mode, max_frame_len: u32) -> (Session, Session) {
    let (client, server) = established_in(mode, max_frame_len);
    (client, server.session)
}

/// A client session and what the server has once the client's CLIENT_FINISH verified
/// (the proof a registry asks for), after a real handshake in memory as
/// [`session_pair_in`].
pub fn established_in(mode: Mode, max_frame_len: u32) -> (Session, Established) {
    let id = Id::new("test").expect("valid id");
    let server_static = x25519_dalek::StaticSecret::from([3; 32]);
    let server_public = x25519_dalek::PublicKey::from(&server_static).to_bytes();
    let mut hello = BytesMut::new();
    let key = SecretKey::from_bytes([9; 32]);
    let client = match mode {
        Mode::Authenticated => ClientAwaitAuth::start(&id, key, [1; 32], max_frame_len, &mut hello),
        Mode::Encrypted => ClientAwaitAuth::start_sealed(
            &id,
            key,
            &server_public,
            &mut [1; 32],
            max_frame_len,
            &mut hello,
        )
        .expect("a valid server key"),
    };
    let limits = ServerLimits {
        max_frame_len,
        keepalive: Duration::from_secs(30),
    };
    let mut auth = BytesMut::new();
    let server = HelloReceived::parse(
        &hello,
        &crate::proto::handshake::ServerKey::from(&server_static),
    )
    .expect("valid HELLO")
    .respond(
        Some(SecretKey::from_bytes([9; 32])),
        SecretKey::from_bytes([0; 32]),
        &mut [2; 32],
        limits,
        &mut auth,
    );
    let mut finish = BytesMut::new();
    let (client, _) = client
        .handle_server_auth(&auth, &mut finish)
        .expect("same key");
    let server = server.handle_finish(&finish).expect("same key");
    (client, server)
}
