//! The session state machine fed arbitrary frames (spec section 8), in both modes. A bit
//! mask gives some frames a valid tag (the authenticated mode) or a valid seal (the
//! encrypted mode) from the peer's key, so the fuzzer reaches the field parser and the
//! sequence, answer, KEY_UPDATE and CLOSE rules behind the tag check.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tally::proto::{decode_frame, Body, Mode};

fuzz_target!(|data: &[u8]| {
    let Some((&mask, rest)) = data.split_first() else { return };
    let Some((&which, rest)) = rest.split_first() else { return };
    let mode = if which & 1 == 1 { Mode::Encrypted } else { Mode::Authenticated };
    let (mut client, mut server) = tally::proto::testing::session_pair_in(mode, 4096);
    // Let the server have sent something, so RESPONSE and PONG can name it.
    let mut out = BytesMut::new();
    server.seal(&Body::Ping, &mut out).unwrap();
    client.open(out.split().freeze()).unwrap();
    let tag_len = mode.tag_len();
    let mut buf = BytesMut::from(rest);
    let mut i = 0u32;
    while let Ok(Some(frame)) = decode_frame(&mut buf, 4096) {
        let before = server.last_received();
        // Sealed anew by the client's current key: type byte, sequence number and fields
        // taken from the fuzzer's frame.
        let frame = if (mask >> (i % 8)) & 1 == 1 && frame.len() >= 4 + 1 + 8 + tag_len {
            let fields = &frame[13..frame.len() - tag_len];
            let seq = u64::from_be_bytes(frame[5..13].try_into().unwrap());
            bytes::Bytes::from(client.forge_for_testing(frame[4], seq, fields))
        } else {
            frame
        };
        i += 1;
        match server.open(frame) {
            // The counter moves by exactly one, and only on success (spec 8.3 step 6).
            // (After a KEY_UPDATE it accepted, the server opens with the next key: the
            // client's later forged seals, made with the first, stop verifying.)
            Ok(f) => {
                assert_eq!(f.seq, before + 1);
                assert_eq!(server.last_received(), before + 1);
            }
            Err(_) => {
                assert_eq!(server.last_received(), before);
                break;
            }
        }
    }
});
