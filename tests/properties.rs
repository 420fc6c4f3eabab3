//! Property tests for the codec and the state machines (spec sections 3, 4 and 8).

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tally::proto::enroll::{ClientAwaitReply, ClientParams, ServerAwaitConfirm, ServerParams};
use tally::proto::frame::{
    DeliveryKind, EnrollInit, EnrollMode, ErrorFrame, FrameType, Hello, Id, ServerAuth, TagOnly,
    ValueAndTag,
};
use tally::proto::handshake::{ClientAwaitAuth, HelloReceived, ServerLimits};
use tally::proto::{decode_frame, Body, CloseCode, ErrorCode, Mode, SecretKey, Session, Status};
use tally::proto::{HANDSHAKE_MAX_FRAME_LEN, LEN_PREFIX};
use x25519_dalek::StaticSecret;

fn id() -> impl Strategy<Value = Id> {
    "[A-Za-z0-9._:@-]{1,64}".prop_map(|s| Id::new(&s).unwrap())
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        bytes(2048).prop_map(|payload| Body::Request { payload }),
        (any::<u16>(), bytes(2048)).prop_map(|(s, payload)| Body::Response {
            req_seq: 1,
            status: Status(s),
            payload
        }),
        bytes(2048).prop_map(|payload| Body::Message { payload }),
        Just(Body::Ping),
        Just(Body::KeyUpdate),
        Just(Body::Pong { ping_seq: 1 }),
        // Spec 8.8: DELIVER goes to the client, ACK to the server (the test sends each
        // the way it travels).
        (1..=u64::MAX, any::<bool>(), bytes(2048)).prop_map(|(msg_id, req, payload)| {
            Body::Deliver {
                msg_id,
                kind: if req {
                    DeliveryKind::Request
                } else {
                    DeliveryKind::Message
                },
                payload,
            }
        }),
        (any::<u64>(), any::<u16>(), bytes(2048)).prop_map(|(msg_id, s, payload)| Body::Ack {
            msg_id,
            status: Status(s),
            payload
        }),
        (any::<u16>(), "\\PC{0,60}").prop_filter_map("reason fits", |(c, r)| {
            (r.len() <= 255).then(|| Body::Close {
                code: CloseCode(c),
                reason: r,
            })
        }),
    ]
}

/// A fresh client/server session pair, through the real handshake, in `mode`.
fn pair_in(mode: Mode, max: u32) -> (Session, Session) {
    tally::proto::testing::session_pair_in(mode, max)
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Authenticated), Just(Mode::Encrypted)]
}

fn enroll_server() -> ServerParams {
    ServerParams {
        static_secret: StaticSecret::from([2; 32]),
        allow_open: true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn session_frames_round_trip_both_ways(mode in mode(), bodies in proptest::collection::vec(body(), 1..8)) {
        let (mut client, mut server) = pair_in(mode, 4096);
        // An answer must name a frame already sent (spec 8.3): each side first sends
        // one frame, so RESPONSE and PONG with sequence number 1 are valid both ways.
        let mut out = BytesMut::new();
        client.seal(&Body::Request { payload: Bytes::new() }, &mut out).unwrap();
        server.open(out.split().freeze()).unwrap();
        server.seal(&Body::Ping, &mut out).unwrap();
        client.open(out.freeze()).unwrap();
        for (i, body) in bodies.iter().enumerate() {
            let to_server = match body {
                Body::Deliver { .. } => false,
                Body::Ack { .. } => true,
                _ => i % 2 == 0,
            };
            let (tx, rx) = if to_server { (&mut client, &mut server) } else { (&mut server, &mut client) };
            let mut out = BytesMut::new();
            let seq = tx.seal(body, &mut out).unwrap();
            prop_assert_eq!(out.len(), body.wire_len(mode));
            // Spec 4.5: 45 bytes around the fields when authenticated, 29 when encrypted.
            let overhead = match mode { Mode::Authenticated => 45, Mode::Encrypted => 29 };
            let fields = match body {
                Body::Request { payload } | Body::Message { payload } => payload.len(),
                Body::Response { payload, .. } | Body::Ack { payload, .. } => 10 + payload.len(),
                Body::Deliver { payload, .. } => 9 + payload.len(),
                Body::Pong { .. } => 8,
                Body::Close { reason, .. } => 2 + reason.len(),
                _ => 0,
            };
            prop_assert_eq!(out.len(), overhead + fields);
            let mut stream = out.clone();
            let frame = decode_frame(&mut stream, 4096).unwrap().unwrap();
            prop_assert!(stream.is_empty());
            let got = rx.open(frame).unwrap();
            prop_assert_eq!(got.seq, seq);
            prop_assert_eq!(&got.body, body);
            if matches!(body, Body::Close { .. }) { break; }
        }
    }

    #[test]
    fn handshake_frames_round_trip(id in id(), a in any::<[u8; 32]>(), b in any::<[u8; 32]>(), open in any::<bool>(), code in any::<u16>(),
                                   limit in 256u32..=1 << 24, keepalive_ms in 100u32..=86_400_000) {
        let mode = if open { EnrollMode::Open } else { EnrollMode::Token };
        let init = EnrollInit { mode, id: id.clone(), ephemeral: a, tag: b };
        let mut out = BytesMut::new();
        init.encode(&mut out);
        prop_assert_eq!(EnrollInit::decode(&out).unwrap(), init);
        let hello = Hello { id, nonce: a, max_frame_len: limit };
        let mut out = BytesMut::new();
        hello.encode(&mut out);
        prop_assert_eq!(Hello::decode(&out).unwrap(), hello);
        let auth = ServerAuth { nonce: a, max_frame_len: limit, keepalive_ms, tag: b };
        let mut out = BytesMut::new();
        auth.encode(&mut out);
        prop_assert_eq!(ServerAuth::decode(&out).unwrap(), auth);
        let v = ValueAndTag { value: a, tag: b };
        let mut out = BytesMut::new();
        v.encode(FrameType::EnrollReply, &mut out);
        prop_assert_eq!(ValueAndTag::decode(&out, FrameType::EnrollReply, "x").unwrap(), v);
        for ty in [FrameType::EnrollConfirm, FrameType::EnrollDone, FrameType::ClientFinish] {
            let mut out = BytesMut::new();
            TagOnly(b).encode(ty, &mut out);
            prop_assert_eq!(TagOnly::decode(&out, ty, "x").unwrap(), TagOnly(b));
        }
        let e = ErrorFrame { code: ErrorCode(code), version: a[0] };
        let mut out = BytesMut::new();
        e.encode(&mut out);
        prop_assert_eq!(ErrorFrame::decode(&out).unwrap(), e);
    }

    /// Arbitrary bytes reach every parser and state machine as whole frames: nothing
    /// panics, and nothing is accepted.
    #[test]
    fn arbitrary_frames_never_panic_and_are_refused(body in proptest::collection::vec(any::<u8>(), 1..300)) {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        let _ = EnrollInit::decode(&frame);
        let _ = Hello::decode(&frame);
        let _ = ErrorFrame::decode(&frame);
        let _ = ValueAndTag::decode(&frame, FrameType::EnrollReply, "x");
        let _ = ServerAuth::decode(&frame);
        let _ = TagOnly::decode(&frame, FrameType::ClientFinish, "x");
        let _ = FrameType::of(&frame);

        let srv = enroll_server();
        prop_assert!(ServerAwaitConfirm::handle_init(&srv, &frame, |_, _| SecretKey::from_bytes([1; 32]), [3; 32], &mut BytesMut::new()).is_err());
        if let Ok(hello) = HelloReceived::parse(&frame, &tally::proto::handshake::ServerKey::from(&x25519_dalek::StaticSecret::from([0x20; 32]))) {
            let limits = ServerLimits { max_frame_len: 4096, keepalive: std::time::Duration::from_secs(30) };
            let wait = hello.respond(None, SecretKey::from_bytes([4; 32]), &mut [5; 32], limits, &mut BytesMut::new());
            prop_assert!(wait.handle_finish(&frame).is_err());
        }
        let id = Id::new("dev").unwrap();
        let c = ClientAwaitAuth::start(&id, SecretKey::from_bytes([9; 32]), [1; 32], 4096, &mut BytesMut::new());
        prop_assert!(c.handle_server_auth(&frame, &mut BytesMut::new()).is_err());
        let params = ClientParams { id, mode: EnrollMode::Open, credential: SecretKey::from_bytes([1; 32]), server_static: [7; 32] };
        let c = ClientAwaitReply::start(params, [3; 32], &mut BytesMut::new());
        prop_assert!(c.handle_reply(&frame, &mut BytesMut::new()).is_err());
        for mode in [Mode::Authenticated, Mode::Encrypted] {
            let (mut client, mut server) = pair_in(mode, 4096);
            prop_assert!(server.open(Bytes::from(frame.clone())).is_err());
            prop_assert!(client.open(Bytes::from(frame.clone())).is_err());
        }
    }

    /// Arbitrary byte streams through the framing into a session: no panic, and the
    /// buffer never holds more than a maximal frame (plus the chunk just read).
    #[test]
    fn arbitrary_streams_into_a_session(mode in mode(), data in proptest::collection::vec(any::<u8>(), 0..4096), chunk in 1usize..512) {
        let limit = 1024u32;
        let (_, mut server) = pair_in(mode, limit);
        let mut buf = BytesMut::new();
        'outer: for piece in data.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match decode_frame(&mut buf, limit) {
                    Ok(Some(frame)) => {
                        prop_assert!(frame.len() <= LEN_PREFIX + limit as usize);
                        if server.open(frame).is_err() { break 'outer; }
                    }
                    Ok(None) => break,
                    Err(_) => break 'outer,
                }
            }
            prop_assert!(buf.capacity() <= 2 * (LEN_PREFIX + limit as usize) + chunk);
        }
        prop_assert_eq!(server.last_received(), 0);
    }

    /// A handshake-phase reader never buffers more than the handshake limit.
    #[test]
    fn handshake_limit_bounds_lying_prefixes(len in (HANDSHAKE_MAX_FRAME_LEN + 1)..=u32::MAX) {
        let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
        prop_assert!(decode_frame(&mut buf, HANDSHAKE_MAX_FRAME_LEN).is_err());
        prop_assert!(buf.capacity() < 64);
    }

    /// Spec 8.3 step 4 in the encrypted mode: any change to a sealed frame (header,
    /// ciphertext or tag) is refused, and the counter does not move.
    #[test]
    fn any_flipped_bit_of_an_encrypted_frame_is_refused(body in body(), bit in any::<prop::sample::Index>()) {
        let (mut client, server) = pair_in(Mode::Encrypted, 4096);
        let mut out = BytesMut::new();
        client.seal(&body, &mut out).unwrap();
        let i = bit.index(out.len() * 8);
        prop_assume!(i >= 32); // the length prefix is framing, checked by decode_frame
        let mut bad = out.to_vec();
        bad[i / 8] ^= 1 << (i % 8);
        let mut server = server;
        prop_assert!(server.open(Bytes::from(bad)).is_err());
        prop_assert_eq!(server.last_received(), 0);
    }

    /// KEY_UPDATE anywhere in a stream keeps both sides in step, in both modes.
    #[test]
    fn key_updates_anywhere_keep_sides_in_step(mode in mode(), updates in proptest::collection::vec(any::<bool>(), 1..40)) {
        let (mut client, mut server) = pair_in(mode, 4096);
        for (i, update) in updates.iter().enumerate() {
            let body = if *update { Body::KeyUpdate } else { Body::Message { payload: Bytes::from(vec![i as u8; i]) } };
            let mut out = BytesMut::new();
            client.seal(&body, &mut out).unwrap();
            prop_assert_eq!(server.open(out.freeze()).unwrap().body, body);
        }
    }
}
