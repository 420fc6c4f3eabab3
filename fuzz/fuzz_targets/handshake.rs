//! Session handshake state machines, server and client, fed arbitrary frames (spec 7).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tally::proto::frame::Id;
use tally::proto::handshake::{ClientAwaitAuth, HelloReceived, ServerLimits};
use tally::proto::{decode_frame, SecretKey, HANDSHAKE_MAX_FRAME_LEN};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut fs = Vec::new();
    while let Ok(Some(f)) = decode_frame(&mut buf, HANDSHAKE_MAX_FRAME_LEN) {
        fs.push(f);
    }
    // Server: HELLO, then CLIENT_FINISH; known and unknown identities.
    if let Some(hello) = fs.first() {
        for key in [Some(SecretKey::from_bytes([9; 32])), None] {
            if let Ok(h) = HelloReceived::parse(hello) {
                let limits = ServerLimits {
                    max_frame_len: 65536,
                    keepalive: std::time::Duration::from_secs(30),
                };
                let wait = h.respond(key, SecretKey::from_bytes([8; 32]), [7; 32], limits, &mut BytesMut::new());
                if let Some(fin) = fs.get(1) {
                    let _ = wait.handle_finish(fin);
                }
            }
        }
    }
    // Client: SERVER_AUTH.
    let id = Id::new("fuzz").unwrap();
    let c = ClientAwaitAuth::start(&id, SecretKey::from_bytes([9; 32]), [1; 32], 4096, &mut BytesMut::new());
    if let Some(auth) = fs.first() {
        let _ = c.handle_server_auth(auth, &mut BytesMut::new());
    }
});
