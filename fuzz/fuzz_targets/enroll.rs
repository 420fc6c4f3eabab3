//! Enrollment state machines, server and client, fed arbitrary frames (spec section 6).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tally::proto::enroll::{ClientAwaitReply, ClientParams, ServerAwaitConfirm, ServerParams};
use tally::proto::frame::{EnrollMode, Id};
use tally::proto::{decode_frame, SecretKey, HANDSHAKE_MAX_FRAME_LEN};
use x25519_dalek::{PublicKey, StaticSecret};

fn frames(data: &[u8]) -> Vec<bytes::Bytes> {
    let mut buf = BytesMut::from(data);
    let mut out = Vec::new();
    while let Ok(Some(f)) = decode_frame(&mut buf, HANDSHAKE_MAX_FRAME_LEN) {
        out.push(f);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let fs = frames(data);
    let server = ServerParams {
        static_secret: StaticSecret::from([2; 32]),
        allow_open: data.first().is_some_and(|b| b & 1 == 0),
    };
    // Server: ENROLL_INIT, then ENROLL_CONFIRM.
    if let Some(init) = fs.first() {
        if let Ok(wait) = ServerAwaitConfirm::handle_init(&server, init, |_, _| SecretKey::from_bytes([1; 32]), [3; 32], &mut BytesMut::new()) {
            if let Some(confirm) = fs.get(1) {
                if let Ok(pending) = wait.handle_confirm(confirm) {
                    pending.committed(&mut BytesMut::new());
                }
            }
        }
    }
    // Client: ENROLL_REPLY, then ENROLL_DONE.
    let params = ClientParams {
        id: Id::new("fuzz").unwrap(),
        mode: EnrollMode::Open,
        credential: SecretKey::from_bytes([1; 32]),
        server_static: PublicKey::from(&StaticSecret::from([2; 32])).to_bytes(),
    };
    let client = ClientAwaitReply::start(params, [4; 32], &mut BytesMut::new());
    if let Some(reply) = fs.first() {
        if let Ok(wait) = client.handle_reply(reply, &mut BytesMut::new()) {
            if let Some(done) = fs.get(1) {
                let _ = wait.handle_done(done);
            }
        }
    }
});
