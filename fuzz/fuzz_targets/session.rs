//! The session state machine fed arbitrary frames (spec section 8). Half of the frames
//! get a valid tag from the peer's key, so the fuzzer reaches the field parser and the
//! sequence, answer and CLOSE rules behind the tag check.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tally::proto::frame::Id;
use tally::proto::handshake::{ClientAwaitAuth, HelloReceived};
use tally::proto::{decode_frame, Body, SecretKey, Session, TAG_LEN};

fn pair() -> (Session, Session) {
    tally::proto::testing::session_pair(4096)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (mut client, mut server) = pair();
    // Let the server have sent something, so RESPONSE and PONG can name it.
    let mut out = BytesMut::new();
    server.seal(&Body::Ping, &mut out).unwrap();
    client.open(out.split().freeze()).unwrap();
    let mut buf = BytesMut::from(rest);
    let mut i = 0u32;
    while let Ok(Some(frame)) = decode_frame(&mut buf, 4096) {
        let frame = if (mode >> (i % 8)) & 1 == 1 && frame.len() >= 4 + TAG_LEN {
            let mut v = frame.to_vec();
            let n = v.len() - TAG_LEN;
            let tag = client.tag_for_testing(&v[..n]);
            v[n..].copy_from_slice(&tag);
            Bytes::from(v)
        } else {
            frame
        };
        i += 1;
        if server.open(frame).is_err() {
            break;
        }
    }
});
