//! The spec's test vectors (`spec/vectors/*.json`, spec section 12), checked byte for byte.
//!
//! Every vector is rebuilt here from its fixed inputs: frames by the state machines of
//! `tally::proto`, intermediate values (transcript hashes, DH outputs, keys, tags) by
//! the formulas of the spec written out again with `sha2`, `hmac`, `hkdf` and
//! `x25519-dalek` directly, and the frames' tags are checked against those formulas.
//! The result must equal the JSON files exactly. Then every negative case in
//! `negative.json` is fed to the receiver it names and must fail with the error it names.
//!
//! To rewrite the files after a deliberate change of the wire format:
//! `TALLY_WRITE_VECTORS=1 cargo test --test vectors` (and bump the version if peers break).

use bytes::{Bytes, BytesMut};
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::time::Duration;
use tally::proto::connection::{Config, Connection, End, Event};
use tally::proto::enroll::{ClientAwaitReply, ServerAwaitConfirm, ServerParams};
use tally::proto::frame::{DeliveryKind, EnrollMode, Id};
use tally::proto::handshake::{ClientAwaitAuth, HelloReceived, ServerLimits};
use tally::proto::{
    credential::EnrollmentToken, decode_frame, Body, CloseCode, Mode, ProtocolError, SecretKey,
    Session, Status,
};
use x25519_dalek::{PublicKey, StaticSecret};

const MAX: u32 = tally::proto::DEFAULT_MAX_FRAME_LEN;
/// The session limits of session.json: the server announces 65,536 bytes and a 30 s
/// keepalive in SERVER_AUTH; the client (a small device) announces 4,096 in HELLO.
const SERVER_LIMITS: ServerLimits = ServerLimits {
    max_frame_len: MAX,
    keepalive: std::time::Duration::from_secs(30),
};
const CLIENT_MAX: u32 = 4096;

fn pattern(start: u8) -> [u8; 32] {
    std::array::from_fn(|i| start.wrapping_add(i as u8))
}

fn h(parts: &[&[u8]]) -> [u8; 32] {
    let mut d = Sha256::new();
    parts.iter().for_each(|p| d.update(p));
    d.finalize().into()
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    parts.iter().for_each(|p| m.update(p));
    m.finalize().into_bytes().into()
}

fn hkdf(salt: &[u8], ikm: &[u8], info: &[&[u8]]) -> [u8; 32] {
    let mut okm = [0; 32];
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(&info.concat(), &mut okm)
        .unwrap();
    okm
}

fn x(b: &[u8]) -> String {
    hex::encode(b)
}

fn tag_of(frame: &[u8]) -> &[u8] {
    &frame[frame.len() - 32..]
}

fn unsigned(frame: &[u8]) -> &[u8] {
    &frame[..frame.len() - 32]
}

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("spec/vectors")
}

const ID: &str = "sensor-42";

struct Enrollment {
    json: Value,
    frames: [Vec<u8>; 4],
    identity_key: [u8; 32],
}

fn server_params() -> ServerParams {
    ServerParams {
        static_secret: StaticSecret::from(pattern(0x20)),
        allow_open: true,
    }
}

/// The open enrollment key `EK` of the vectors.
const EK: u8 = 0x00;
/// The per-identity token credential issued for `sensor-42`.
const TOKEN: u8 = 0xc0;

/// What the vectors' server holds (spec 12): `EK`, and one token, for `sensor-42`. For
/// any other id in token mode it has none and checks the tag against a filler.
fn server_credential(mode: EnrollMode, id: &Id) -> SecretKey {
    SecretKey::from_bytes(match mode {
        EnrollMode::Open => pattern(EK),
        EnrollMode::Token if id.as_str() == ID => pattern(TOKEN),
        EnrollMode::Token => pattern(0xe0),
    })
}

/// An enrollment with fixed keys, in `mode`.
fn enrollment(mode: EnrollMode) -> Enrollment {
    let (x_secret, y_secret) = (pattern(0x40), pattern(0x60));
    let srv = server_params();
    let id = Id::new(ID).unwrap();
    let token = EnrollmentToken {
        mode,
        credential: server_credential(mode, &id),
        server_static: srv.static_public(),
    };
    let token_text = token.encode().to_string();

    // The state machines produce the frames.
    let mut init = BytesMut::new();
    let client = ClientAwaitReply::start(
        EnrollmentToken::parse(&token_text)
            .unwrap()
            .client_params(id.clone()),
        x_secret,
        &mut init,
    );
    let mut reply = BytesMut::new();
    let server =
        ServerAwaitConfirm::handle_init(&srv, &init, server_credential, y_secret, &mut reply)
            .unwrap();
    let mut confirm = BytesMut::new();
    let client = client.handle_reply(&reply, &mut confirm).unwrap();
    let pending = server.handle_confirm(&confirm).unwrap();
    let mut done = BytesMut::new();
    let server_k = *pending.identity_key().expose();
    pending.committed(&mut done);
    let (_, client_k) = client.handle_done(&done).unwrap();
    assert_eq!(client_k.expose(), &server_k);

    // The spec's formulas, written out again (spec 5.3, 6).
    let c = match mode {
        EnrollMode::Open => pattern(EK),
        EnrollMode::Token => pattern(TOKEN),
    };
    let xs = StaticSecret::from(x_secret);
    let ys = StaticSecret::from(y_secret);
    let big_s = PublicKey::from(&StaticSecret::from(pattern(0x20)));
    let big_x = PublicKey::from(&xs);
    let big_y = PublicKey::from(&ys);
    let th1 = h(&[unsigned(&init)]);
    let init_tag = mac(&c, &[b"tally/1 enroll init", &th1]);
    assert_eq!(tag_of(&init), init_tag);
    let dh_ee = *xs.diffie_hellman(&big_y).as_bytes();
    let dh_es = *xs.diffie_hellman(&big_s).as_bytes();
    let th2 = h(&[&init, unsigned(&reply)]);
    let ikm = [dh_ee, dh_es].concat();
    let key = |label: &[u8]| hkdf(&c, &ikm, &[label, &th2]);
    let (k_server, k_client, k_done, k_id) = (
        key(b"tally/1 enroll key server"),
        key(b"tally/1 enroll key client"),
        key(b"tally/1 enroll key done"),
        key(b"tally/1 enroll key identity"),
    );
    assert_eq!(tag_of(&reply), mac(&k_server, &[&th2]));
    let th3 = h(&[&init, &reply, unsigned(&confirm)]);
    assert_eq!(tag_of(&confirm), mac(&k_client, &[&th3]));
    let th4 = h(&[&init, &reply, &confirm, unsigned(&done)]);
    assert_eq!(tag_of(&done), mac(&k_done, &[&th4]));
    assert_eq!(k_id, server_k);

    let json = json!({
        "description": format!("Enrollment of {ID:?} in {} mode (spec section 6).", mode.as_str()),
        "protocol_version": 1,
        "inputs": {
            "credential": x(&c),
            "server_static_secret": x(&pattern(0x20)),
            "client_ephemeral_secret": x(&x_secret),
            "server_ephemeral_secret": x(&y_secret),
            "id": ID,
            "mode": mode.as_str(),
        },
        "derived": {
            "server_static_public": x(big_s.as_bytes()),
            "token": token_text,
            "client_ephemeral_public": x(big_x.as_bytes()),
            "server_ephemeral_public": x(big_y.as_bytes()),
            "th1": x(&th1),
            "init_tag": x(&init_tag),
            "dh_ee": x(&dh_ee),
            "dh_es": x(&dh_es),
            "th2": x(&th2),
            "key_server": x(&k_server),
            "key_client": x(&k_client),
            "key_done": x(&k_done),
            "identity_key": x(&k_id),
            "th3": x(&th3),
            "th4": x(&th4),
        },
        "frames": [
            {"name": "ENROLL_INIT", "direction": "c2s", "hex": x(&init)},
            {"name": "ENROLL_REPLY", "direction": "s2c", "hex": x(&reply)},
            {"name": "ENROLL_CONFIRM", "direction": "c2s", "hex": x(&confirm)},
            {"name": "ENROLL_DONE", "direction": "s2c", "hex": x(&done)},
        ],
    });
    Enrollment {
        json,
        frames: [
            init.to_vec(),
            reply.to_vec(),
            confirm.to_vec(),
            done.to_vec(),
        ],
        identity_key: k_id,
    }
}

/// Session inputs: the identity key from the open-mode enrollment.
fn session_inputs() -> (Id, [u8; 32], [u8; 32], [u8; 32]) {
    (
        Id::new(ID).unwrap(),
        enrollment(EnrollMode::Open).identity_key,
        pattern(0x80),
        pattern(0xa0),
    )
}

/// Runs the handshake; returns the three frames and both sessions.
fn handshake() -> ([Vec<u8>; 3], Session, Session) {
    let (id, k, nc, ns) = session_inputs();
    let mut hello = BytesMut::new();
    let client = ClientAwaitAuth::start(&id, SecretKey::from_bytes(k), nc, CLIENT_MAX, &mut hello);
    let received = HelloReceived::parse(
        &hello,
        &tally::proto::handshake::ServerKey::from(&server_static()),
    )
    .unwrap();
    assert_eq!(received.client_max_frame_len(), CLIENT_MAX);
    let mut auth = BytesMut::new();
    let server = received.respond(
        Some(SecretKey::from_bytes(k)),
        SecretKey::from_bytes([0; 32]),
        &mut ns.clone(),
        SERVER_LIMITS,
        &mut auth,
    );
    let mut finish = BytesMut::new();
    let (client_session, limits) = client.handle_server_auth(&auth, &mut finish).unwrap();
    assert_eq!(limits, SERVER_LIMITS);
    assert_eq!(client_session.max_frame_len(), MAX);
    let est = server.handle_finish(&finish).unwrap();
    assert_eq!(est.session.max_frame_len(), CLIENT_MAX);
    (
        [hello.to_vec(), auth.to_vec(), finish.to_vec()],
        client_session,
        est.session,
    )
}

/// The session frames of `session.json`, in the order they are sent: (sender, body).
fn script() -> Vec<(&'static str, Body)> {
    let b = |s: &'static [u8]| Bytes::from_static(s);
    vec![
        (
            "c2s",
            Body::Request {
                payload: b(b"temperature?"),
            },
        ),
        (
            "s2c",
            Body::Response {
                req_seq: 1,
                status: Status::OK,
                payload: b(b"21.5"),
            },
        ),
        (
            "s2c",
            Body::Request {
                payload: b(b"{\"interval\":60}"),
            },
        ),
        (
            "c2s",
            Body::Response {
                req_seq: 2,
                status: Status(256),
                payload: b(b""),
            },
        ),
        (
            "c2s",
            Body::Message {
                payload: b(b"boot ok"),
            },
        ),
        ("s2c", Body::Message { payload: b(b"") }),
        ("c2s", Body::Ping),
        ("s2c", Body::Pong { ping_seq: 4 }),
        ("s2c", Body::Ping),
        ("c2s", Body::Pong { ping_seq: 5 }),
        // Spec 8.8: a queued request and a queued message, acknowledged out of order.
        (
            "s2c",
            Body::Deliver {
                msg_id: 41,
                kind: DeliveryKind::Request,
                payload: b(b"firmware?"),
            },
        ),
        (
            "s2c",
            Body::Deliver {
                msg_id: 42,
                kind: DeliveryKind::Message,
                payload: b(b"reboot at 02:00"),
            },
        ),
        (
            "c2s",
            Body::Ack {
                msg_id: 42,
                status: Status::OK,
                payload: b(b""),
            },
        ),
        (
            "c2s",
            Body::Ack {
                msg_id: 41,
                status: Status::OK,
                payload: b(b"1.4.2"),
            },
        ),
        (
            "c2s",
            Body::Close {
                code: CloseCode::NORMAL,
                reason: "bye".into(),
            },
        ),
        (
            "s2c",
            Body::Close {
                code: CloseCode::SHUTDOWN,
                reason: "maintenance".into(),
            },
        ),
    ]
}

fn type_name(body: &Body) -> &'static str {
    match body {
        Body::Request { .. } => "REQUEST",
        Body::Response { .. } => "RESPONSE",
        Body::Message { .. } => "MESSAGE",
        Body::Ping => "PING",
        Body::Pong { .. } => "PONG",
        Body::Close { .. } => "CLOSE",
        Body::KeyUpdate => "KEY_UPDATE",
        Body::Deliver { .. } => "DELIVER",
        Body::Ack { .. } => "ACK",
    }
}

fn body_fields(body: &Body) -> Value {
    match body {
        Body::Request { payload } | Body::Message { payload } => json!({"payload": x(payload)}),
        Body::Response {
            req_seq,
            status,
            payload,
        } => json!({"req_seq": req_seq, "status": status.0, "payload": x(payload)}),
        Body::Ping | Body::KeyUpdate => json!({}),
        Body::Pong { ping_seq } => json!({"ping_seq": ping_seq}),
        Body::Close { code, reason } => json!({"code": code.0, "reason": reason}),
        Body::Deliver {
            msg_id,
            kind,
            payload,
        } => json!({"msg_id": msg_id, "kind": *kind as u8, "payload": x(payload)}),
        Body::Ack {
            msg_id,
            status,
            payload,
        } => json!({"msg_id": msg_id, "status": status.0, "payload": x(payload)}),
    }
}

/// Seals the script's frames with the two sessions, checking each is accepted.
fn sealed_script(
    client: &mut Session,
    server: &mut Session,
) -> Vec<(&'static str, Body, u64, Vec<u8>)> {
    run_script(script(), client, server)
}

fn session() -> Value {
    let (id, k, nc, ns) = session_inputs();
    let ([hello, auth, finish], mut client, mut server) = handshake();
    let th2 = h(&[&hello, unsigned(&auth)]);
    let salt = [nc, ns].concat();
    let key = |label: &[u8]| hkdf(&salt, &k, &[label, &th2]);
    let (c2s, s2c, sf, cf) = (
        key(b"tally/1 session key c2s"),
        key(b"tally/1 session key s2c"),
        key(b"tally/1 session key server finish"),
        key(b"tally/1 session key client finish"),
    );
    assert_eq!(tag_of(&auth), mac(&sf, &[&th2]));
    let th3 = h(&[&hello, &auth, unsigned(&finish)]);
    assert_eq!(tag_of(&finish), mac(&cf, &[&th3]));
    let frames: Vec<Value> = sealed_script(&mut client, &mut server)
        .into_iter()
        .map(|(dir, body, seq, frame)| {
            let key = if dir == "c2s" { &c2s } else { &s2c };
            assert_eq!(tag_of(&frame), mac(key, &[unsigned(&frame)]));
            let mut v =
                json!({"direction": dir, "type": type_name(&body), "seq": seq, "hex": x(&frame)});
            v.as_object_mut()
                .unwrap()
                .extend(body_fields(&body).as_object().unwrap().clone());
            v
        })
        .collect();
    json!({
        "description": "A session handshake with the identity key of enroll-open.json (the client announces a 4,096-byte frame limit; the server 65,536 bytes and a 30 s keepalive), then frames of every type in both directions (spec sections 7 and 8).",
        "protocol_version": 1,
        "inputs": {"id": id.as_str(), "identity_key": x(&k), "client_nonce": x(&nc), "server_nonce": x(&ns),
                   "client_max_frame_len": CLIENT_MAX, "server_max_frame_len": SERVER_LIMITS.max_frame_len,
                   "server_keepalive_ms": SERVER_LIMITS.keepalive.as_millis() as u64},
        "derived": {
            "th2": x(&th2),
            "key_c2s": x(&c2s),
            "key_s2c": x(&s2c),
            "key_server_finish": x(&sf),
            "key_client_finish": x(&cf),
            "th3": x(&th3),
        },
        "handshake": [
            {"name": "HELLO", "direction": "c2s", "hex": x(&hello)},
            {"name": "SERVER_AUTH", "direction": "s2c", "hex": x(&auth)},
            {"name": "CLIENT_FINISH", "direction": "c2s", "hex": x(&finish)},
        ],
        "frames": frames,
    })
}

/// The negative cases: each names a receiver state, an input and the required error.
fn negative() -> Value {
    let ([hello, auth, _], mut client, mut server) = handshake();
    let frames = sealed_script(&mut client, &mut server);
    let enroll = enrollment(EnrollMode::Open);
    let token = enrollment(EnrollMode::Token);
    let (_, k, nc, ns) = session_inputs();
    let first = frames[0].3.clone();
    let flip = |f: &[u8], byte: usize, bit: u8| {
        let mut v = f.to_vec();
        v[byte] ^= bit;
        x(&v)
    };
    // A REQUEST sealed with the wrong direction's key: a server frame key used by the client.
    let th2 = h(&[&hello, unsigned(&auth)]);
    let salt = [nc, ns].concat();
    let s2c = hkdf(&salt, &k, &[b"tally/1 session key s2c", &th2]);
    let cf = hkdf(&salt, &k, &[b"tally/1 session key client finish", &th2]);
    let wrong_dir = [unsigned(&first), &mac(&s2c, &[unsigned(&first)])].concat();
    // SERVER_AUTH whose tag uses the client-finish label instead of the server-finish label.
    let wrong_label_auth = [unsigned(&auth), &mac(&cf, &[&th2])].concat();
    // ENROLL_INIT tagged with a label other than "tally/1 enroll init".
    let init = &enroll.frames[0];
    let bad_label_init = [
        unsigned(init),
        &mac(
            &pattern(0x00),
            &[b"tally/1 enroll hello", &h(&[unsigned(init)])],
        ),
    ]
    .concat();
    // A token-mode ENROLL_INIT whose id was changed: the token is for "sensor-42" only.
    let mut other_id = token.frames[0].clone();
    let pos = other_id
        .windows(ID.len())
        .position(|w| w == ID.as_bytes())
        .unwrap();
    other_id[pos + ID.len() - 1] = b'3';
    // HELLO with version 2.
    let mut v2 = hello.clone();
    v2[5] = 2;
    let mut lying = first.clone();
    lying[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    // Frame 1 with an unknown type byte: refused before its sequence number or tag.
    let mut unknown_type = first.clone();
    unknown_type[4] = 0x7f;
    // HELLO whose id holds a space (spec 4.1: A-Z a-z 0-9 . _ - : @).
    let mut bad_id = hello.clone();
    let at = bad_id
        .windows(ID.len())
        .position(|w| w == ID.as_bytes())
        .unwrap();
    bad_id[at + 6] = b' ';
    // A REQUEST numbered 2^64 - 1, tagged with key_c2s: only CLOSE may use that number.
    let c2s = hkdf(&salt, &k, &[b"tally/1 session key c2s", &th2]);
    let mut last = vec![0u8; 4];
    last.push(0x20);
    last.extend_from_slice(&u64::MAX.to_be_bytes());
    last.extend_from_slice(b"one too many");
    let len = (last.len() - 4 + 32) as u32;
    last[..4].copy_from_slice(&len.to_be_bytes());
    let tag = mac(&c2s, &[&last]);
    last.extend_from_slice(&tag);
    // ENROLL_REPLY whose Y is the all-zero (low-order) point.
    let mut zero_y = enroll.frames[1].clone();
    zero_y[5..37].fill(0);
    // HELLO announcing a frame limit of 255, below the smallest allowed (256).
    let mut small_limit = hello.clone();
    let at = small_limit.len() - 4;
    small_limit[at..].copy_from_slice(&255u32.to_be_bytes());
    // SERVER_AUTH announcing a keepalive of 0 ms (its tag is left as it was: the range
    // is checked when the fields are parsed, before the tag).
    let mut zero_keepalive = auth.clone();
    zero_keepalive[41..45].fill(0);
    // A frame to the client one byte longer than the 4,096 it announced (its prefix
    // and first header bytes: refused from the prefix alone).
    let mut over_client_limit = (CLIENT_MAX + 1).to_be_bytes().to_vec();
    over_client_limit.extend_from_slice(&[0x22, 0, 0, 0, 0, 0, 0, 0, 3]);
    let mut short_len = first.clone();
    let n = u32::from_be_bytes(short_len[..4].try_into().unwrap()) - 1;
    short_len[..4].copy_from_slice(&n.to_be_bytes());
    short_len.pop();
    let case = |name: &str,
                description: &str,
                receiver: Value,
                input: String,
                error: &str,
                reply: Value| {
        json!({"name": name, "description": description, "receiver": receiver, "input": input, "error": error, "reply": reply})
    };
    let session_rx =
        |who: &str, after: usize| json!({"state": format!("{who}_session"), "after_frames": after});
    let close = json!({"close_code": CloseCode::PROTOCOL_ERROR.0});
    let encrypted = encrypted_negative_cases(&hello, &auth);
    // Session frames made by hand (spec 8.2, authenticated mode): length, type, seq,
    // fields, tag under the direction's key.
    let tagged = |key: &[u8; 32], ty: u8, seq: u64, fields: &[u8]| {
        let mut f = ((1 + 8 + fields.len() + 32) as u32).to_be_bytes().to_vec();
        f.push(ty);
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(fields);
        let tag = mac(key, &[&f]);
        f.extend_from_slice(&tag);
        x(&f)
    };
    let deliver = |msg_id: u64, kind: u8| [&msg_id.to_be_bytes()[..], &[kind], b"x"].concat();
    let ack = |msg_id: u64| [&msg_id.to_be_bytes()[..], &[0, 0]].concat();
    let delivery = delivery_frames();
    let mut all = json!({
        "description": "Inputs every receiver must refuse, with the error (spec 12.2) and what it sends back (spec 10).",
        "protocol_version": 1,
        "cases": [
            case("flipped_tag_bit", "session.json frame 1 with the last bit of its tag flipped", session_rx("server", 0),
                 flip(&first, first.len() - 1, 1), "bad_tag", close.clone()),
            case("flipped_payload_bit", "session.json frame 1 with one payload bit flipped", session_rx("server", 0),
                 flip(&first, 14, 0x80), "bad_tag", close.clone()),
            case("shortened_length", "session.json frame 1 with its length prefix one less and the last byte cut: the tag covers the prefix", session_rx("server", 0),
                 x(&short_len), "bad_tag", close.clone()),
            case("replayed_frame", "session.json frame 1 again after it was accepted", session_rx("server", 1),
                 x(&first), "bad_sequence", close.clone()),
            case("skipped_frame", "session.json frame 5 (c2s seq 3) where seq 1 is expected", session_rx("server", 0),
                 x(&frames[4].3), "bad_sequence", close.clone()),
            case("reordered_frame", "session.json frame 5 (c2s seq 3) after frame 1 only (seq 2 expected)", session_rx("server", 1),
                 x(&frames[4].3), "bad_sequence", close.clone()),
            case("reflected_frame", "session.json frame 1, a client REQUEST, sent back to the client as if from the server", session_rx("client", 0),
                 x(&first), "bad_tag", close.clone()),
            case("wrong_direction_key", "frame 1 tagged with key_s2c instead of key_c2s", session_rx("server", 0),
                 x(&wrong_dir), "bad_tag", close.clone()),
            case("unsolicited_response", "session.json frame 2 (RESPONSE to seq 1) before the client sent anything", session_rx("client", 0),
                 x(&frames[1].3), "unsolicited_answer", close.clone()),
            case("ack_never_delivered", format!("session.json frame {} (ACK of message 42, c2s seq 6) before the server delivered anything", delivery.first_ack + 1).as_str(), session_rx("server", delivery.first_deliver),
                 x(&frames[delivery.first_ack].3), "unsolicited_answer", close.clone()),
            case("ack_twice", "a second ACK of message 42 (c2s seq 7, tagged with key_c2s) after the server accepted the first", session_rx("server", delivery.first_ack + 1),
                 tagged(&c2s, 0x28, 7, &ack(42)), "unsolicited_answer", close.clone()),
            case("delivery_out_of_order", "a DELIVER of message 40 (s2c seq 7, tagged with key_s2c) after the client accepted message 41 in the same session", session_rx("client", delivery.first_deliver + 1),
                 tagged(&s2c, 0x27, 7, &deliver(40, 2)), "delivery_order", close.clone()),
            case("deliver_to_server", "a DELIVER sent by the client (c2s seq 1, tagged with key_c2s): DELIVER goes only to a client", session_rx("server", 0),
                 tagged(&c2s, 0x27, 1, &deliver(1, 2)), "malformed", close.clone()),
            case("ack_to_client", "an ACK sent by the server (s2c seq 1, tagged with key_s2c): ACK goes only to a server", session_rx("client", 0),
                 tagged(&s2c, 0x28, 1, &ack(1)), "malformed", close.clone()),
            case("deliver_id_zero", "a DELIVER of message id 0 (s2c seq 1): ids start at 1", session_rx("client", 0),
                 tagged(&s2c, 0x27, 1, &deliver(0, 2)), "malformed", close.clone()),
            case("deliver_bad_kind", "a DELIVER of kind 3 (s2c seq 1): kinds are 1 and 2", session_rx("client", 0),
                 tagged(&s2c, 0x27, 1, &deliver(1, 3)), "malformed", close.clone()),
            case("lying_length", "frame 1 with length prefix 0xffffffff: refused from the 4 prefix bytes alone", session_rx("server", 0),
                 x(&lying), "frame_too_large", json!({"close_code": CloseCode::FRAME_TOO_LARGE.0})),
            case("zero_length", "a length prefix of 0", session_rx("server", 0),
                 "00000000".into(), "empty_frame", close.clone()),
            case("wrong_label_server_auth", "SERVER_AUTH tagged with key_client_finish instead of key_server_finish", json!({"state": "client_await_server_auth"}),
                 x(&wrong_label_auth), "bad_tag", json!({"close": true})),
            case("flipped_server_auth_bit", "session.json SERVER_AUTH with the first nonce bit flipped", json!({"state": "client_await_server_auth"}),
                 flip(&auth, 5, 0x80), "bad_tag", json!({"close": true})),
            case("unsupported_version", "session.json HELLO with version 2", json!({"state": "server_await_hello"}),
                 x(&v2), "unsupported_version", json!({"error_frame": "000000041f000101"})),
            case("wrong_label_enroll_init", "enroll-open.json ENROLL_INIT tagged with label \"tally/1 enroll hello\"", json!({"state": "server_await_enroll_init"}),
                 x(&bad_label_init), "bad_tag", json!({"error_frame": "000000041f000401"})),
            case("token_for_other_id", "enroll-token.json ENROLL_INIT with the id changed to \"sensor-43\"", json!({"state": "server_await_enroll_init"}),
                 x(&other_id), "bad_tag", json!({"error_frame": "000000041f000401"})),
            case("finish_refused", "an ERROR frame (AUTH_FAILED) before any session frame: the server refused CLIENT_FINISH", session_rx("client", 0),
                 "000000041f000301".into(), "refused", json!({"close": true})),
            case("error_in_session", "an ERROR frame after session.json frames 1 and 2 were exchanged: ERROR is never part of a session, so it was injected; the session is cut", session_rx("client", 2),
                 "000000041f000301".into(), "truncated", json!({"close": true})),
            case("error_to_server", "an ERROR frame sent to the server in a session: servers never receive ERROR", session_rx("server", 0),
                 "000000041f000301".into(), "truncated", json!({"close": true})),
            case("enroll_reply_bit_flipped", "enroll-open.json ENROLL_REPLY with one bit of Y flipped", json!({"state": "client_await_enroll_reply"}),
                 flip(&enroll.frames[1], 5, 1), "bad_tag", json!({"close": true})),
            case("unknown_type", "session.json frame 1 with type 0x7f: refused before its sequence number and tag (8.3 step 2)", session_rx("server", 0),
                 x(&unknown_type), "malformed", close.clone()),
            case("bad_id", "session.json HELLO with a space in its id", json!({"state": "server_await_hello"}),
                 x(&bad_id), "bad_id", json!({"error_frame": "000000041f000201"})),
            case("sequence_exhausted", "a REQUEST numbered 2^64 - 1 (tagged with key_c2s) after the server accepted 2^64 - 2 frames: only CLOSE may use that number (8.1)",
                 json!({"state": "server_session", "after_frames": 0, "last_received": (u64::MAX - 1).to_string()}),
                 x(&last), "sequence_exhausted", close.clone()),
            case("weak_key", "enroll-open.json ENROLL_REPLY with Y replaced by the all-zero point: the X25519 result is all zeros (6.2)", json!({"state": "client_await_enroll_reply"}),
                 x(&zero_y), "weak_key", json!({"close": true})),
            case("frame_limit_too_small", "session.json HELLO announcing a frame limit of 255 bytes (the least is 256)", json!({"state": "server_await_hello"}),
                 x(&small_limit), "malformed", json!({"error_frame": "000000041f000201"})),
            case("keepalive_zero", "session.json SERVER_AUTH announcing a keepalive of 0 ms (the least is 100), its tag unchanged: the fields are refused before the tag is checked", json!({"state": "client_await_server_auth"}),
                 x(&zero_keepalive), "malformed", json!({"close": true})),
            case("above_announced_limit", "a frame to the client whose length (4,097) is one above the limit the client announced in HELLO", session_rx("client", 0),
                 x(&over_client_limit), "frame_too_large", json!({"close_code": CloseCode::FRAME_TOO_LARGE.0})),
            case("open_mode_disabled", "enroll-open.json ENROLL_INIT sent to a server that accepts only per-identity tokens", json!({"state": "server_await_enroll_init", "open_enrollment": false}),
                 x(init), "open_mode_disabled", json!({"error_frame": "000000041f000401"})),
        ],
    });
    all["cases"].as_array_mut().unwrap().extend(encrypted);
    all
}

/// Feeds a negative case to the receiver it names; returns the error.
fn run_negative(case: &Value) -> ProtocolError {
    let input = hex::decode(case["input"].as_str().unwrap()).unwrap();
    let state = case["receiver"]["state"].as_str().unwrap();
    let fresh = || handshake();
    match state {
        "server_session"
        | "client_session"
        | "server_session_encrypted"
        | "client_session_encrypted" => {
            let encrypted = state.ends_with("_encrypted");
            let (_, mut client, mut server) = if encrypted {
                sealed_handshake()
            } else {
                fresh()
            };
            let script = if encrypted {
                encrypted_script()
            } else {
                script()
            };
            let after = case["receiver"]["after_frames"].as_u64().unwrap() as usize;
            replay(&script[..after], &mut client, &mut server);
            let rx = if state.starts_with("server") {
                &mut server
            } else {
                &mut client
            };
            if let Some(last) = case["receiver"].get("last_received") {
                // A decimal string: 2^64 - 2 is beyond what a JSON number holds exactly in
                // many languages.
                rx.set_counters_for_testing(1, last.as_str().unwrap().parse().unwrap());
            }
            // Each side's limit is the one it announced.
            let limit = if state.starts_with("server") {
                MAX
            } else {
                CLIENT_MAX
            };
            let mut buf = BytesMut::from(&input[..]);
            match decode_frame(&mut buf, limit) {
                Ok(Some(frame)) => match rx.open(frame) {
                    Err(e) => e,
                    // Accepted by the session's checks: refused by the rules of
                    // requests and deliveries (8.4, 8.8), which the connection keeps.
                    Ok(_) => refused_by_connection(case, &input),
                },
                Ok(None) => panic!("{}: input is not a whole frame", case["name"]),
                Err(e) => e.into(),
            }
        }
        "client_await_server_auth" => {
            let (id, k, nc, _) = session_inputs();
            let c = ClientAwaitAuth::start(
                &id,
                SecretKey::from_bytes(k),
                nc,
                CLIENT_MAX,
                &mut BytesMut::new(),
            );
            c.handle_server_auth(&input, &mut BytesMut::new())
                .unwrap_err()
        }
        "server_await_hello" => {
            // Spec 7.8: the policy decides on the first frame before anything else.
            let policy = case["receiver"]["policy"].as_str().unwrap_or("allowed");
            let accepts = |mode: Mode| match policy {
                "required" => mode == Mode::Encrypted,
                "off" => mode == Mode::Authenticated,
                "allowed" => true,
                other => panic!("unknown policy {other}"),
            };
            HelloReceived::check_mode(&input, accepts)
                .and_then(|_| {
                    HelloReceived::parse(
                        &input,
                        &tally::proto::handshake::ServerKey::from(&server_static()),
                    )
                })
                .err()
                .unwrap()
        }
        "client_await_sealed_auth" => {
            let (id, k, _, _) = session_inputs();
            let c = ClientAwaitAuth::start_sealed(
                &id,
                SecretKey::from_bytes(k),
                &public_of(pattern(SERVER_STATIC)),
                &mut pattern(CLIENT_EPHEMERAL),
                CLIENT_MAX,
                &mut BytesMut::new(),
            )
            .unwrap();
            c.handle_server_auth(&input, &mut BytesMut::new())
                .unwrap_err()
        }
        "server_await_enroll_init" => ServerAwaitConfirm::handle_init(
            &ServerParams {
                allow_open: case["receiver"]["open_enrollment"] != json!(false),
                ..server_params()
            },
            &input,
            server_credential,
            pattern(0x60),
            &mut BytesMut::new(),
        )
        .err()
        .unwrap(),
        "client_await_enroll_reply" => {
            let srv = server_params();
            let id = Id::new(ID).unwrap();
            let token = EnrollmentToken {
                mode: EnrollMode::Open,
                credential: server_credential(EnrollMode::Open, &id),
                server_static: srv.static_public(),
            };
            let c = ClientAwaitReply::start(
                token.client_params(id),
                pattern(0x40),
                &mut BytesMut::new(),
            );
            c.handle_reply(&input, &mut BytesMut::new()).err().unwrap()
        }
        other => panic!("unknown receiver state {other}"),
    }
}

/// Sends `script`'s frames between the two sessions, each accepted.
fn replay(script: &[(&str, Body)], client: &mut Session, server: &mut Session) {
    for (dir, body) in script {
        let (tx, rx) = if *dir == "c2s" {
            (&mut *client, &mut *server)
        } else {
            (&mut *server, &mut *client)
        };
        let mut out = BytesMut::new();
        tx.seal(body, &mut out).unwrap();
        rx.open(out.freeze()).unwrap();
    }
}

/// Where the deliveries of `session.json` are among its frames.
struct DeliveryFrames {
    /// Index of the first DELIVER.
    first_deliver: usize,
    /// Index of the first ACK.
    first_ack: usize,
}

fn delivery_frames() -> DeliveryFrames {
    let s = script();
    let at = |f: fn(&Body) -> bool| s.iter().position(|(_, b)| f(b)).unwrap();
    DeliveryFrames {
        first_deliver: at(|b| matches!(b, Body::Deliver { .. })),
        first_ack: at(|b| matches!(b, Body::Ack { .. })),
    }
}

/// A session case whose input the bare session accepts: replays the case's first frames,
/// hands the receiver's session to a [`Connection`] that knows the deliveries so far
/// (spec 8.8), and returns the error the input makes it close with.
fn refused_by_connection(case: &Value, input: &[u8]) -> ProtocolError {
    let state = case["receiver"]["state"].as_str().unwrap();
    assert!(!state.ends_with("_encrypted"), "{}", case["name"]);
    let server_side = state.starts_with("server");
    let (_, mut client, mut server) = handshake();
    let after = case["receiver"]["after_frames"].as_u64().unwrap() as usize;
    let script = &script()[..after];
    replay(script, &mut client, &mut server);
    let (mut last, mut outstanding) = (0, Vec::new());
    for (_, body) in script {
        match body {
            Body::Deliver { msg_id, .. } => {
                last = *msg_id;
                outstanding.push(*msg_id);
            }
            Body::Ack { msg_id, .. } => outstanding.retain(|m| m != msg_id),
            _ => {}
        }
    }
    let (session, config) = if server_side {
        (server, Config::server())
    } else {
        (client, Config::client())
    };
    let mut conn = Connection::new(session, config, Duration::ZERO);
    conn.set_deliveries_for_testing(last, &outstanding);
    conn.handle_input(input, Duration::ZERO);
    conn.handle_timeout(Duration::from_secs(3600));
    let events: Vec<Event> = std::iter::from_fn(|| conn.poll_event()).collect();
    match events.last() {
        Some(Event::Closed(End::Failed(e))) => e.clone(),
        other => panic!("{}: accepted ({other:?})", case["name"]),
    }
}

fn all_vectors() -> Vec<(&'static str, Value)> {
    vec![
        ("enroll-open.json", enrollment(EnrollMode::Open).json),
        ("enroll-token.json", enrollment(EnrollMode::Token).json),
        ("session.json", session()),
        ("session-encrypted.json", session_encrypted()),
        ("negative.json", negative()),
    ]
}

#[test]
fn vectors_match_the_spec_files_byte_for_byte() {
    let write = std::env::var_os("TALLY_WRITE_VECTORS").is_some();
    for (name, built) in all_vectors() {
        let path = vectors_dir().join(name);
        let text = serde_json::to_string_pretty(&built).unwrap() + "\n";
        if write {
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        let on_disk =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let on_disk: Value = serde_json::from_str(&on_disk).unwrap();
        assert_eq!(
            on_disk, built,
            "{name} differs from what the implementation produces"
        );
    }
}

#[test]
fn every_negative_case_fails_as_specified() {
    let text = std::fs::read_to_string(vectors_dir().join("negative.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for case in cases {
        let err = run_negative(case);
        assert_eq!(
            err.kind(),
            case["error"].as_str().unwrap(),
            "case {}: got {err}",
            case["name"]
        );
        let reply = &case["reply"];
        if let Some(code) = reply.get("close_code") {
            assert_eq!(
                err.close_code().0 as u64,
                code.as_u64().unwrap(),
                "case {}",
                case["name"]
            );
        }
        if let Some(frame) = reply.get("error_frame") {
            let mut out = BytesMut::new();
            tally::proto::frame::ErrorFrame::new(err.error_code()).encode(&mut out);
            assert_eq!(x(&out), frame.as_str().unwrap(), "case {}", case["name"]);
        }
    }
}

fn body_from_json(f: &Value) -> Body {
    let payload = || Bytes::from(hex::decode(f["payload"].as_str().unwrap()).unwrap());
    let num = |k: &str| f[k].as_u64().unwrap();
    match f["type"].as_str().unwrap() {
        "REQUEST" => Body::Request { payload: payload() },
        "MESSAGE" => Body::Message { payload: payload() },
        "RESPONSE" => Body::Response {
            req_seq: num("req_seq"),
            status: Status(num("status") as u16),
            payload: payload(),
        },
        "PING" => Body::Ping,
        "PONG" => Body::Pong {
            ping_seq: num("ping_seq"),
        },
        "CLOSE" => Body::Close {
            code: CloseCode(num("code") as u16),
            reason: f["reason"].as_str().unwrap().into(),
        },
        "DELIVER" => Body::Deliver {
            msg_id: num("msg_id"),
            kind: DeliveryKind::from_u8(num("kind") as u8).unwrap(),
            payload: payload(),
        },
        "ACK" => Body::Ack {
            msg_id: num("msg_id"),
            status: Status(num("status") as u16),
            payload: payload(),
        },
        other => panic!("unknown type {other}"),
    }
}

#[test]
fn session_frames_encode_from_and_decode_to_their_listed_fields() {
    // Reads session.json as a client in another language would: build each frame from
    // its fields, compare the bytes, and have the other side accept it.
    let text = std::fs::read_to_string(vectors_dir().join("session.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let (_, mut client, mut server) = handshake();
    for f in v["frames"].as_array().unwrap() {
        let (tx, rx) = if f["direction"] == "c2s" {
            (&mut client, &mut server)
        } else {
            (&mut server, &mut client)
        };
        let mut out = BytesMut::new();
        let seq = tx.seal(&body_from_json(f), &mut out).unwrap();
        assert_eq!(x(&out), f["hex"].as_str().unwrap(), "{f}");
        let got = rx.open(out.freeze()).unwrap();
        assert_eq!(got.seq, seq);
        assert_eq!(seq, f["seq"].as_u64().unwrap());
        assert_eq!(type_name(&got.body), f["type"].as_str().unwrap());
        for (k, want) in body_fields(&got.body).as_object().unwrap() {
            assert_eq!(&f[k], want, "field {k} of {f}");
        }
    }
}

// --- The encrypted mode (spec 4.3, 5.6, 5.7, 7.7, 8.2, 8.7) -------------------------

/// The encrypted session's fixed inputs: `s`, `e`, `f` (spec 12).
const SERVER_STATIC: u8 = 0x20;
const CLIENT_EPHEMERAL: u8 = 0x90;
const SERVER_EPHEMERAL: u8 = 0xb0;

fn x25519(secret: [u8; 32], public: [u8; 32]) -> [u8; 32] {
    StaticSecret::from(secret)
        .diffie_hellman(&PublicKey::from(public))
        .to_bytes()
}

fn public_of(secret: [u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(secret)).to_bytes()
}

fn server_static() -> StaticSecret {
    StaticSecret::from(pattern(SERVER_STATIC))
}

/// ChaCha20-Poly1305 (RFC 8439) of the `chacha20poly1305` crate, for checking.
fn aead_seal(key: &[u8; 32], nonce: &[u8; 12], ad: &[u8], plain: &[u8]) -> Vec<u8> {
    use chacha20poly1305::aead::AeadInOut;
    use chacha20poly1305::{ChaCha20Poly1305, KeyInit as _};
    let mut out = plain.to_vec();
    let tag = ChaCha20Poly1305::new(key.into())
        .encrypt_inout_detached(nonce.into(), ad, (&mut out[..]).into())
        .unwrap();
    out.extend_from_slice(&tag);
    out
}

fn frame_nonce(dir: &str, seq: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[3] = if dir == "c2s" { 0 } else { 1 };
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

/// A body's fields as they are in the clear (spec 4.5).
fn fields_bytes(body: &Body) -> Vec<u8> {
    match body {
        Body::Request { payload } | Body::Message { payload } => payload.to_vec(),
        Body::Response {
            req_seq,
            status,
            payload,
        } => [&req_seq.to_be_bytes()[..], &status.0.to_be_bytes(), payload].concat(),
        Body::Pong { ping_seq } => ping_seq.to_be_bytes().to_vec(),
        Body::Close { code, reason } => [&code.0.to_be_bytes()[..], reason.as_bytes()].concat(),
        Body::Deliver {
            msg_id,
            kind,
            payload,
        } => [&msg_id.to_be_bytes()[..], &[*kind as u8], payload].concat(),
        Body::Ack {
            msg_id,
            status,
            payload,
        } => [&msg_id.to_be_bytes()[..], &status.0.to_be_bytes(), payload].concat(),
        _ => Vec::new(),
    }
}

/// The encrypted handshake with the fixed inputs: frames and both sessions.
fn sealed_handshake() -> ([Vec<u8>; 3], Session, Session) {
    let (id, k, _, _) = session_inputs();
    let mut hello = BytesMut::new();
    let client = ClientAwaitAuth::start_sealed(
        &id,
        SecretKey::from_bytes(k),
        &public_of(pattern(SERVER_STATIC)),
        &mut pattern(CLIENT_EPHEMERAL),
        CLIENT_MAX,
        &mut hello,
    )
    .unwrap();
    let received = HelloReceived::parse(
        &hello,
        &tally::proto::handshake::ServerKey::from(&server_static()),
    )
    .unwrap();
    assert_eq!(received.id(), Some(&id));
    let mut auth = BytesMut::new();
    let server = received.respond(
        Some(SecretKey::from_bytes(k)),
        SecretKey::from_bytes([0; 32]),
        &mut pattern(SERVER_EPHEMERAL),
        SERVER_LIMITS,
        &mut auth,
    );
    let mut finish = BytesMut::new();
    let (client_session, limits) = client.handle_server_auth(&auth, &mut finish).unwrap();
    assert_eq!(limits, SERVER_LIMITS);
    assert_eq!(client_session.mode(), Mode::Encrypted);
    let est = server.handle_finish(&finish).unwrap();
    assert_eq!(est.session.max_frame_len(), CLIENT_MAX);
    (
        [hello.to_vec(), auth.to_vec(), finish.to_vec()],
        client_session,
        est.session,
    )
}

/// The frames of `session-encrypted.json`: `session.json`'s, with a KEY_UPDATE in each
/// direction after the MESSAGEs (the PONGs name the PINGs' new numbers).
fn encrypted_script() -> Vec<(&'static str, Body)> {
    let mut s = script();
    s.insert(5, ("c2s", Body::KeyUpdate));
    s.insert(7, ("s2c", Body::KeyUpdate));
    for (_, body) in s.iter_mut() {
        if let Body::Pong { ping_seq } = body {
            *ping_seq += 1;
        }
    }
    s
}

/// Seals `script`'s frames with the two sessions, checking each is accepted.
fn run_script(
    script: Vec<(&'static str, Body)>,
    client: &mut Session,
    server: &mut Session,
) -> Vec<(&'static str, Body, u64, Vec<u8>)> {
    script
        .into_iter()
        .map(|(dir, body)| {
            let (tx, rx) = if dir == "c2s" {
                (&mut *client, &mut *server)
            } else {
                (&mut *server, &mut *client)
            };
            let mut out = BytesMut::new();
            let seq = tx.seal(&body, &mut out).unwrap();
            let got = rx.open(out.clone().freeze()).unwrap();
            assert_eq!((got.seq, &got.body), (seq, &body));
            (dir, body, seq, out.to_vec())
        })
        .collect()
}

/// Every value of the encrypted session, computed from the formulas of the spec.
struct SealedValues {
    e_pub: [u8; 32],
    f_pub: [u8; 32],
    s_pub: [u8; 32],
    dh_es: [u8; 32],
    key_id: [u8; 32],
    id_plain: Vec<u8>,
    dh_ee: [u8; 32],
    th2: [u8; 32],
    th3: [u8; 32],
    c2s: [u8; 32],
    s2c: [u8; 32],
    sf: [u8; 32],
    cf: [u8; 32],
}

fn sealed_values(frames: &[Vec<u8>; 3]) -> SealedValues {
    let (id, k, _, _) = session_inputs();
    let [hello, auth, finish] = frames;
    let (e, f) = (pattern(CLIENT_EPHEMERAL), pattern(SERVER_EPHEMERAL));
    let s_pub = public_of(pattern(SERVER_STATIC));
    let (e_pub, f_pub) = (public_of(e), public_of(f));
    assert_eq!(&hello[6..38], &e_pub);
    assert_eq!(&auth[5..37], &f_pub);
    let dh_es = x25519(e, s_pub);
    assert_eq!(dh_es, x25519(pattern(SERVER_STATIC), e_pub));
    let key_id = hkdf(
        &[e_pub, s_pub].concat(),
        &dh_es,
        &[b"tally/1 sealed hello id"],
    );
    let mut id_plain = vec![id.as_str().len() as u8];
    id_plain.extend_from_slice(id.as_str().as_bytes());
    id_plain.resize(65, 0);
    id_plain.extend_from_slice(&CLIENT_MAX.to_be_bytes());
    assert_eq!(
        &hello[38..],
        &aead_seal(&key_id, &[0; 12], &hello[..38], &id_plain)[..],
        "sealed_id"
    );
    let dh_ee = x25519(e, f_pub);
    assert_eq!(dh_ee, x25519(f, e_pub));
    let th2 = h(&[hello, unsigned(auth)]);
    let salt = [e_pub, f_pub].concat();
    let ikm = [&k[..], &dh_ee, &dh_es].concat();
    let key = |label: &[u8]| hkdf(&salt, &ikm, &[label, &th2]);
    let v = SealedValues {
        c2s: key(b"tally/1 sealed key c2s"),
        s2c: key(b"tally/1 sealed key s2c"),
        sf: key(b"tally/1 sealed key server finish"),
        cf: key(b"tally/1 sealed key client finish"),
        th3: h(&[hello, auth, unsigned(finish)]),
        e_pub,
        f_pub,
        s_pub,
        dh_es,
        key_id,
        id_plain,
        dh_ee,
        th2,
    };
    assert_eq!(tag_of(auth), mac(&v.sf, &[&th2]));
    assert_eq!(tag_of(finish), mac(&v.cf, &[&v.th3]));
    v
}

fn next_key(key: &[u8; 32]) -> [u8; 32] {
    hkdf(&[], key, &[b"tally/1 key update"])
}

fn session_encrypted() -> Value {
    let (id, k, _, _) = session_inputs();
    let (hs, mut client, mut server) = sealed_handshake();
    let v = sealed_values(&hs);
    let [hello, auth, finish] = &hs;
    let (mut c2s, mut s2c) = (v.c2s, v.s2c);
    let frames: Vec<Value> = run_script(encrypted_script(), &mut client, &mut server)
        .into_iter()
        .map(|(dir, body, seq, frame)| {
            // Spec 8.2: header ‖ AEAD(K_send, direction ‖ seq, header, fields).
            let key = if dir == "c2s" { &mut c2s } else { &mut s2c };
            let nonce = frame_nonce(dir, seq);
            let sealed = aead_seal(key, &nonce, &frame[..13], &fields_bytes(&body));
            assert_eq!(&frame[13..], &sealed[..], "{dir} {seq}");
            assert_eq!(frame.len(), 29 + fields_bytes(&body).len());
            if body == Body::KeyUpdate {
                *key = next_key(key);
            }
            let mut j = json!({"direction": dir, "type": type_name(&body), "seq": seq,
                               "nonce": x(&nonce), "hex": x(&frame)});
            j.as_object_mut()
                .unwrap()
                .extend(body_fields(&body).as_object().unwrap().clone());
            j
        })
        .collect();
    assert_eq!(c2s, next_key(&v.c2s));
    assert_eq!(s2c, next_key(&v.s2c));
    json!({
        "description": "The session of session.json in the encrypted mode: SEALED_HELLO (the id sealed to S), SEALED_AUTH (the server's ephemeral key), CLIENT_FINISH, then frames sealed with ChaCha20-Poly1305, with a KEY_UPDATE in each direction (spec sections 4.3, 5.6 to 5.8, 7.7, 8.2, 8.7).",
        "protocol_version": 1,
        "inputs": {"id": id.as_str(), "identity_key": x(&k),
                   "server_static_secret": x(&pattern(SERVER_STATIC)),
                   "client_ephemeral_secret": x(&pattern(CLIENT_EPHEMERAL)),
                   "server_ephemeral_secret": x(&pattern(SERVER_EPHEMERAL)),
                   "client_max_frame_len": CLIENT_MAX, "server_max_frame_len": SERVER_LIMITS.max_frame_len,
                   "server_keepalive_ms": SERVER_LIMITS.keepalive.as_millis() as u64},
        "derived": {
            "server_static_public": x(&v.s_pub),
            "client_ephemeral_public": x(&v.e_pub),
            "server_ephemeral_public": x(&v.f_pub),
            "dh_es": x(&v.dh_es),
            "key_id": x(&v.key_id),
            "sealed_plaintext": x(&v.id_plain),
            "dh_ee": x(&v.dh_ee),
            "th2": x(&v.th2),
            "key_c2s": x(&v.c2s),
            "key_s2c": x(&v.s2c),
            "key_server_finish": x(&v.sf),
            "key_client_finish": x(&v.cf),
            "th3": x(&v.th3),
            "key_c2s_updated": x(&next_key(&v.c2s)),
            "key_s2c_updated": x(&next_key(&v.s2c)),
        },
        "handshake": [
            {"name": "SEALED_HELLO", "direction": "c2s", "hex": x(hello)},
            {"name": "SEALED_AUTH", "direction": "s2c", "hex": x(auth)},
            {"name": "CLIENT_FINISH", "direction": "c2s", "hex": x(finish)},
        ],
        "frames": frames,
    })
}

/// The encrypted mode's negative cases (spec 12.2).
fn encrypted_negative_cases(plain_hello: &[u8], plain_auth: &[u8]) -> Vec<Value> {
    let (hs, mut client, mut server) = sealed_handshake();
    let v = sealed_values(&hs);
    let [hello, auth, _] = &hs;
    let frames = run_script(encrypted_script(), &mut client, &mut server);
    let first = &frames[0].3;
    let flip = |f: &[u8], byte: usize, bit: u8| {
        let mut w = f.to_vec();
        w[byte] ^= bit;
        x(&w)
    };
    let case = |name: &str,
                description: &str,
                receiver: Value,
                input: String,
                error: &str,
                reply: Value| {
        json!({"name": name, "description": description, "receiver": receiver, "input": input, "error": error, "reply": reply})
    };
    let rx = |who: &str, after: usize| json!({"state": format!("{who}_session_encrypted"), "after_frames": after});
    let close = json!({"close_code": CloseCode::PROTOCOL_ERROR.0});
    let malformed = json!({"error_frame": "000000041f000201"});
    // SEALED_HELLO one byte short (its length prefix says 118).
    let mut short = hello[..hello.len() - 1].to_vec();
    short[..4].copy_from_slice(&118u32.to_be_bytes());
    // SEALED_HELLO with E the all-zero (low-order) point.
    let mut zero_e = hello.clone();
    zero_e[6..38].fill(0);
    // SEALED_HELLO whose sealed id opens, with a non-zero byte after the id.
    let mut padded = v.id_plain.clone();
    padded[64] = 1;
    // The same with a space in the id (4.1), and a non-zero padding byte too: the id is
    // checked first (4.3), so the error is bad_id.
    let mut spaced = v.id_plain.clone();
    spaced[3] = b' ';
    spaced[64] = 1;
    let bad_id = [
        &hello[..38],
        &aead_seal(&v.key_id, &[0; 12], &hello[..38], &spaced)[..],
    ]
    .concat();
    // The same, with a limit of 255 sealed in it (the least is 256).
    let mut small = v.id_plain.clone();
    small[65..].copy_from_slice(&255u32.to_be_bytes());
    let small_limit = [
        &hello[..38],
        &aead_seal(&v.key_id, &[0; 12], &hello[..38], &small)[..],
    ]
    .concat();
    let bad_padding = [
        &hello[..38],
        &aead_seal(&v.key_id, &[0; 12], &hello[..38], &padded)[..],
    ]
    .concat();
    // SEALED_AUTH with F the all-zero point.
    let mut zero_f = auth.clone();
    zero_f[5..37].fill(0);
    // The server's RESPONSE (s2c seq 1) sealed with the right key but direction 0.
    let (_, response, seq, _) = &frames[1];
    let head = &frames[1].3[..13];
    let wrong_nonce = [
        head,
        &aead_seal(
            &v.s2c,
            &frame_nonce("c2s", *seq),
            head,
            &fields_bytes(response),
        )[..],
    ]
    .concat();
    // After the client's KEY_UPDATE (frame 6), its PING sealed with the old key.
    let (_, ping, ping_seq, ping_frame) = &frames[8];
    assert_eq!((ping, *ping_seq), (&Body::Ping, 5));
    let stale = [
        &ping_frame[..13],
        &aead_seal(&v.c2s, &frame_nonce("c2s", 5), &ping_frame[..13], &[])[..],
    ]
    .concat();
    // A REQUEST too short to hold its 16-byte tag (length 24).
    let mut too_short = first[..28].to_vec();
    too_short[..4].copy_from_slice(&24u32.to_be_bytes());
    let mode_refused = json!({"error_frame": "000000041f000a01"});
    vec![
        case("hello_mode_refused", "session.json HELLO at a server whose policy requires the encrypted mode (7.8)", json!({"state": "server_await_hello", "policy": "required"}),
             x(plain_hello), "mode_refused", mode_refused.clone()),
        case("sealed_hello_mode_refused", "session-encrypted.json SEALED_HELLO at a server whose policy is off (7.8)", json!({"state": "server_await_hello", "policy": "off"}),
             x(hello), "mode_refused", mode_refused),
        case("sealed_hello_short", "session-encrypted.json SEALED_HELLO without its last byte (length 118)", json!({"state": "server_await_hello"}),
             x(&short), "malformed", malformed.clone()),
        case("sealed_hello_weak_key", "session-encrypted.json SEALED_HELLO with E replaced by the all-zero point: dh_es is all zeros (7.2 row 5a)", json!({"state": "server_await_hello"}),
             x(&zero_e), "weak_key", malformed.clone()),
        case("sealed_hello_bad_padding", "a SEALED_HELLO whose sealed part verifies but has a non-zero byte after the id (7.2 row 5b)", json!({"state": "server_await_hello"}),
             x(&bad_padding), "malformed", malformed.clone()),
        case("sealed_hello_bad_id", "a SEALED_HELLO whose sealed part verifies but whose id has a space, and whose padding is not zero: the id is checked first (4.3)", json!({"state": "server_await_hello"}),
             x(&bad_id), "bad_id", json!({"error_frame": "000000041f000201"})),
        case("sealed_hello_limit_too_small", "a SEALED_HELLO whose sealed part verifies but announces a frame limit of 255 (7.2 row 5b)", json!({"state": "server_await_hello"}),
             x(&small_limit), "malformed", malformed),
        case("downgraded_server_auth", "session.json SERVER_AUTH in answer to session-encrypted.json SEALED_HELLO: the other mode's answer (7.2 client row 4)", json!({"state": "client_await_sealed_auth"}),
             x(plain_auth), "malformed", json!({"close": true})),
        case("sealed_auth_to_hello", "session-encrypted.json SEALED_AUTH in answer to session.json HELLO", json!({"state": "client_await_server_auth"}),
             x(auth), "malformed", json!({"close": true})),
        case("sealed_auth_weak_key", "session-encrypted.json SEALED_AUTH with F replaced by the all-zero point (7.2 client row 4a)", json!({"state": "client_await_sealed_auth"}),
             x(&zero_f), "weak_key", json!({"close": true})),
        case("sealed_auth_flipped_bit", "session-encrypted.json SEALED_AUTH with one bit of F flipped", json!({"state": "client_await_sealed_auth"}),
             flip(auth, 5, 0x02), "bad_tag", json!({"close": true})),
        case("encrypted_flipped_ciphertext_bit", "session-encrypted.json frame 1 with one ciphertext bit flipped", rx("server", 0),
             flip(first, 14, 0x80), "bad_tag", close.clone()),
        case("encrypted_flipped_header_bit", "session-encrypted.json frame 1 with its type changed to MESSAGE: the header is the associated data", rx("server", 0),
             flip(first, 4, 0x02), "bad_tag", close.clone()),
        case("encrypted_reflected_frame", "session-encrypted.json frame 1, a client REQUEST, sent back to the client", rx("client", 0),
             x(first), "bad_tag", close.clone()),
        case("encrypted_wrong_direction_nonce", "session-encrypted.json frame 2 (s2c seq 1) sealed with key_s2c under the c2s nonce (direction 0)", rx("client", 1),
             x(&wrong_nonce), "bad_tag", close.clone()),
        case("encrypted_replayed_frame", "session-encrypted.json frame 1 again after it was accepted", rx("server", 1),
             x(first), "bad_sequence", close.clone()),
        case("stale_key_after_update", "after the client's KEY_UPDATE (frame 6), its PING (seq 5) sealed with key_c2s instead of key_c2s_updated", rx("server", 8),
             x(&stale), "bad_tag", close.clone()),
        case("encrypted_too_short", "a REQUEST of length 24: too short for seq and a 16-byte tag", rx("server", 0),
             x(&too_short), "malformed", close),
    ]
}
