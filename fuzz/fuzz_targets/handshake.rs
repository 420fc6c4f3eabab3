//! Session handshake state machines, server and client, fed arbitrary frames (spec 7), in
//! both modes: HELLO / SERVER_AUTH and SEALED_HELLO / SEALED_AUTH (7.7).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tally::proto::frame::Id;
use tally::proto::handshake::{ClientAwaitAuth, HelloReceived, ServerKey, ServerLimits};
use tally::proto::{decode_frame, Mode, SecretKey, HANDSHAKE_MAX_FRAME_LEN};
use x25519_dalek::{PublicKey, StaticSecret};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut fs = Vec::new();
    while let Ok(Some(f)) = decode_frame(&mut buf, HANDSHAKE_MAX_FRAME_LEN) {
        fs.push(f);
    }
    let server = ServerKey::new(StaticSecret::from([0x20; 32]));
    let limits = ServerLimits {
        max_frame_len: 65536,
        keepalive: std::time::Duration::from_secs(30),
    };
    // Server: HELLO or SEALED_HELLO, then CLIENT_FINISH; known and unknown identities.
    if let Some(hello) = fs.first() {
        for key in [Some(SecretKey::from_bytes([9; 32])), None] {
            if let Ok(h) = HelloReceived::parse(hello, &server) {
                // A parsed first frame is one of the two modes, and says which.
                assert_eq!(
                    h.mode(),
                    if hello[4] == 0x13 { Mode::Encrypted } else { Mode::Authenticated }
                );
                let mut out = BytesMut::new();
                let wait = h.respond(key, SecretKey::from_bytes([8; 32]), &mut [7; 32], limits, &mut out);
                // SERVER_AUTH and SEALED_AUTH are 77 bytes, whatever the id (spec 7.5).
                assert_eq!(out.len(), 77);
                if let Some(fin) = fs.get(1) {
                    let _ = wait.handle_finish(fin);
                }
            }
        }
    }
    // Client: SERVER_AUTH, or SEALED_AUTH, for a client of each mode.
    let id = Id::new("fuzz").unwrap();
    let s_pub = PublicKey::from(&StaticSecret::from([0x20; 32])).to_bytes();
    if let Some(auth) = fs.first() {
        let plain =
            ClientAwaitAuth::start(&id, SecretKey::from_bytes([9; 32]), [1; 32], 4096, &mut BytesMut::new());
        let _ = plain.handle_server_auth(auth, &mut BytesMut::new());
        let sealed = ClientAwaitAuth::start_sealed(
            &id,
            SecretKey::from_bytes([9; 32]),
            &s_pub,
            &mut [1; 32],
            4096,
            &mut BytesMut::new(),
        )
        .unwrap();
        let _ = sealed.handle_server_auth(auth, &mut BytesMut::new());
    }
});
