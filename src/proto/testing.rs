//! Helpers for tests, benchmarks and fuzz targets outside the crate. Not API.

use bytes::BytesMut;

use super::frame::Id;
use super::handshake::{ClientAwaitAuth, HelloReceived};
use super::{SecretKey, Session};

/// A client and a server session that completed a real handshake in memory, with a
/// fixed key and nonces, each sending frames up to `max_frame_len`.
pub fn session_pair(max_frame_len: u32) -> (Session, Session) {
    let id = Id::new("test").expect("valid id");
    let mut hello = BytesMut::new();
    let client = ClientAwaitAuth::start(&id, SecretKey::from_bytes([9; 32]), [1; 32], &mut hello);
    let mut auth = BytesMut::new();
    let server = HelloReceived::parse(&hello).expect("valid HELLO").respond(
        Some(SecretKey::from_bytes([9; 32])),
        SecretKey::from_bytes([0; 32]),
        [2; 32],
        &mut auth,
    );
    let mut finish = BytesMut::new();
    let client = client
        .handle_server_auth(&auth, &mut finish, max_frame_len)
        .expect("same key");
    let server = server
        .handle_finish(&finish, max_frame_len)
        .expect("same key")
        .session;
    (client, server)
}
