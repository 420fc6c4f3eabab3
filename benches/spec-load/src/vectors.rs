//! `spec-load vectors DIR`: recomputes the vectors of spec/vectors (spec section 12).

use std::path::Path;

use serde_json::Value;

use crate::cred::{EnrollMode, Token};
use crate::crypto::*;
use crate::enroll::{self, EnrollClient};
use crate::handshake::{self, ClientHello, Mode};
use crate::session::{Received, Role, Session};
use crate::wire::*;

struct Check {
    quiet: bool,
    matched: usize,
    mismatched: usize,
    skipped: Vec<String>,
    section: String,
    section_matched: usize,
}

impl Check {
    fn ok(&mut self, what: &str, good: bool, detail: impl FnOnce() -> String) {
        if good {
            self.matched += 1;
            self.section_matched += 1;
        } else {
            self.mismatched += 1;
            if self.quiet {
                return;
            }
            println!("MISMATCH {}: {what}: {}", self.section, detail());
        }
    }
    fn hex(&mut self, what: &str, got: &[u8], want: &str) {
        let g = hex(got);
        let w = want.to_ascii_lowercase();
        self.ok(what, g == w, || format!("computed {g}, vector {w}"));
    }
    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, got: T, want: T) {
        let good = got == want;
        self.ok(what, good, || format!("computed {got:?}, vector {want:?}"));
    }
    fn begin(&mut self, s: &str) {
        self.section = s.to_string();
        self.section_matched = 0;
    }
    fn end(&mut self) {
        println!("{:<28} {:>4} values matched", self.section, self.section_matched);
    }
}

fn load(dir: &Path, name: &str) -> Result<Value, String> {
    let p = dir.join(name);
    let t = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&t).map_err(|e| format!("{}: {e}", p.display()))
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("vector field {k} missing or not a string"))
}
fn b(v: &Value, k: &str) -> Vec<u8> {
    unhex(s(v, k)).unwrap_or_else(|| panic!("vector field {k} is not hex"))
}
fn k32(v: &Value, k: &str) -> Key {
    b(v, k).try_into().unwrap_or_else(|_| panic!("vector field {k} is not 32 bytes"))
}
fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("vector field {k} missing or not an integer"))
}

/// One of the two session vector files, parsed.
struct SessionVec {
    mode: Mode,
    id: Vec<u8>,
    k: Key,
    client_limit: u32,
    server_limit: u32,
    keepalive: u32,
    nc: Key,
    ns: Key,
    s: Key,
    e: Key,
    f: Key,
    handshake: Vec<Vec<u8>>,
    frames: Vec<Value>,
    v: Value,
}

impl SessionVec {
    fn parse(v: Value, mode: Mode) -> SessionVec {
        let i = &v["inputs"];
        let z = [0u8; 32];
        let opt = |k: &str| if i[k].is_string() { k32(i, k) } else { z };
        SessionVec {
            mode,
            id: s(i, "id").as_bytes().to_vec(),
            k: k32(i, "identity_key"),
            client_limit: n(i, "client_max_frame_len") as u32,
            server_limit: n(i, "server_max_frame_len") as u32,
            keepalive: n(i, "server_keepalive_ms") as u32,
            nc: opt("client_nonce"),
            ns: opt("server_nonce"),
            s: opt("server_static_secret"),
            e: opt("client_ephemeral_secret"),
            f: opt("server_ephemeral_secret"),
            handshake: v["handshake"].as_array().unwrap().iter().map(|h| b(h, "hex")).collect(),
            frames: v["frames"].as_array().unwrap().clone(),
            v,
        }
    }

    fn client_hello(&self) -> ClientHello {
        match self.mode {
            Mode::Authenticated => ClientHello::authenticated(&self.id, self.k, self.nc, self.client_limit),
            Mode::Encrypted => {
                ClientHello::encrypted(&self.id, self.k, x25519_base(&self.s), self.e, self.client_limit)
                    .expect("the vector's dh_es is not zero")
            }
        }
    }

    /// Both ends of the session, established from the vector's SERVER_AUTH / SEALED_AUTH.
    fn pair(&self) -> (Session, Session) {
        let est = self.client_hello().on_auth(&self.handshake[1]).expect("the vector's handshake verifies");
        (
            Session::new(Role::Client, self.mode, &est.keys, self.client_limit, est.server_limit),
            Session::new(Role::Server, self.mode, &est.keys, self.server_limit, self.client_limit),
        )
    }
}

/// The fields of a vector frame, as its sender passes them to `seal`.
fn fields_of(fr: &Value) -> (u8, Vec<u8>) {
    let ty = type_from_name(s(fr, "type")).expect("known frame type");
    let payload = || b(fr, "payload");
    let mut f = Vec::new();
    match ty {
        REQUEST | MESSAGE => f = payload(),
        RESPONSE => {
            f.extend_from_slice(&n(fr, "req_seq").to_be_bytes());
            f.extend_from_slice(&(n(fr, "status") as u16).to_be_bytes());
            f.extend_from_slice(&payload());
        }
        PONG => f.extend_from_slice(&n(fr, "ping_seq").to_be_bytes()),
        CLOSE => {
            f.extend_from_slice(&(n(fr, "code") as u16).to_be_bytes());
            f.extend_from_slice(s(fr, "reason").as_bytes());
        }
        DELIVER => {
            f.extend_from_slice(&n(fr, "msg_id").to_be_bytes());
            f.push(n(fr, "kind") as u8);
            f.extend_from_slice(&payload());
        }
        ACK => {
            f.extend_from_slice(&n(fr, "msg_id").to_be_bytes());
            f.extend_from_slice(&(n(fr, "status") as u16).to_be_bytes());
            f.extend_from_slice(&payload());
        }
        _ => {}
    }
    (ty, f)
}

/// What the receiver must deliver for a vector frame.
fn expected_received(fr: &Value, payload: &[u8]) -> String {
    let ty = type_from_name(s(fr, "type")).unwrap();
    let r = match ty {
        REQUEST => Received::Request { seq: n(fr, "seq"), payload },
        RESPONSE => Received::Response {
            req_seq: n(fr, "req_seq"),
            status: n(fr, "status") as u16,
            payload,
        },
        MESSAGE => Received::Message { payload },
        PING => Received::Ping { seq: n(fr, "seq") },
        PONG => Received::Pong { ping_seq: n(fr, "ping_seq") },
        CLOSE => Received::Close { code: n(fr, "code") as u16, reason: s(fr, "reason") },
        KEY_UPDATE => Received::KeyUpdate,
        DELIVER => Received::Deliver { msg_id: n(fr, "msg_id"), kind: n(fr, "kind") as u8, payload },
        ACK => Received::Ack { msg_id: n(fr, "msg_id"), status: n(fr, "status") as u16, payload },
        _ => unreachable!(),
    };
    format!("{r:?}")
}

/// Replays frames in send order: the sender seals each (compared with the vector's bytes),
/// the receiver opens the vector's bytes (compared with the vector's fields).
fn replay(c: &mut Session, srv: &mut Session, frames: &[Value], sv: &SessionVec, chk: Option<&mut Check>) {
    let mut dummy = Check { quiet: true, matched: 0, mismatched: 0, skipped: vec![], section: String::new(), section_matched: 0 };
    let chk = match chk {
        Some(c) => c,
        None => &mut dummy,
    };
    for (i, fr) in frames.iter().enumerate() {
        let c2s = s(fr, "direction") == "c2s";
        let (sender, receiver) = if c2s { (&mut *c, &mut *srv) } else { (&mut *srv, &mut *c) };
        let (ty, fields) = fields_of(fr);
        let what = format!("frame {i} ({} {})", s(fr, "direction"), type_name(ty));
        let mut out = Vec::new();
        match sender.seal(ty, &[&fields], &mut out) {
            Ok(seq) => chk.eq(&format!("{what} seq"), seq, n(fr, "seq")),
            Err(e) => chk.ok(&what, false, || format!("seal failed: {e}")),
        }
        chk.hex(&format!("{what} hex"), &out, s(fr, "hex"));
        if sv.mode == Mode::Encrypted {
            let role = if c2s { Role::Client } else { Role::Server };
            chk.hex(&format!("{what} nonce"), &Session::nonce(role, n(fr, "seq")), s(fr, "nonce"));
        }
        let mut bytes = b(fr, "hex");
        let payload = if fr["payload"].is_string() { b(fr, "payload") } else { vec![] };
        let want = expected_received(fr, &payload);
        match receiver.open(&mut bytes) {
            Ok(r) => {
                let got = format!("{r:?}");
                chk.ok(&format!("{what} received"), got == want, || format!("received {got}, vector {want}"));
            }
            Err(e) => chk.ok(&format!("{what} received"), false, || format!("refused: {e}")),
        }
        if ty == KEY_UPDATE && sv.mode == Mode::Encrypted {
            let d = &sv.v["derived"];
            let k = if c2s { "key_c2s_updated" } else { "key_s2c_updated" };
            chk.hex(&format!("{k} (sender)"), sender_key(c, srv, c2s), s(d, k));
            chk.hex(&format!("{k} (receiver)"), receiver_key(c, srv, c2s), s(d, k));
        }
    }
}

fn sender_key<'a>(c: &'a Session, srv: &'a Session, c2s: bool) -> &'a [u8] {
    if c2s { c.send_key() } else { srv.send_key() }
}
fn receiver_key<'a>(c: &'a Session, srv: &'a Session, c2s: bool) -> &'a [u8] {
    if c2s { srv.recv_key() } else { c.recv_key() }
}

fn check_session(sv: &SessionVec, chk: &mut Check) {
    let d = &sv.v["derived"];
    let ch = sv.client_hello();
    let hello = ch.hello().to_vec();
    let (hname, aname) = match sv.mode {
        Mode::Authenticated => ("HELLO", "SERVER_AUTH"),
        Mode::Encrypted => ("SEALED_HELLO", "SEALED_AUTH"),
    };
    chk.hex(hname, &hello, s(&sv.v["handshake"][0], "hex"));
    // The server's answer, rebuilt.
    let auth = match sv.mode {
        Mode::Authenticated => handshake::server_auth(&sv.handshake[0], &sv.k, &sv.ns, sv.server_limit, sv.keepalive),
        Mode::Encrypted => {
            chk.hex("server_static_public", &x25519_base(&sv.s), s(d, "server_static_public"));
            chk.hex("client_ephemeral_public", &hello[6..38], s(d, "client_ephemeral_public"));
            chk.hex("server_ephemeral_public", &x25519_base(&sv.f), s(d, "server_ephemeral_public"));
            chk.hex("dh_es (client)", &ch.dh_es().unwrap(), s(d, "dh_es"));
            chk.hex("key_id", &ch.key_id.unwrap(), s(d, "key_id"));
            chk.hex("sealed_plaintext", &ch.sealed_plaintext.unwrap(), s(d, "sealed_plaintext"));
            match handshake::sealed_auth(&sv.handshake[0], &sv.s, &sv.k, &sv.f, sv.server_limit, sv.keepalive) {
                Some((pt, dh_es, auth)) => {
                    chk.hex("sealed_plaintext (opened by the server)", &pt, s(d, "sealed_plaintext"));
                    chk.hex("dh_es (server)", &dh_es, s(d, "dh_es"));
                    auth
                }
                None => {
                    chk.ok("sealed_id opens", false, || "the server could not open it".into());
                    vec![]
                }
            }
        }
    };
    chk.hex(aname, &auth, s(&sv.v["handshake"][1], "hex"));
    match ch.on_auth(&sv.handshake[1]) {
        Ok(est) => {
            chk.hex("th2", &est.th2, s(d, "th2"));
            chk.hex("key_c2s", &est.keys.c2s, s(d, "key_c2s"));
            chk.hex("key_s2c", &est.keys.s2c, s(d, "key_s2c"));
            chk.hex("key_server_finish", &est.keys.sf, s(d, "key_server_finish"));
            chk.hex("key_client_finish", &est.keys.cf, s(d, "key_client_finish"));
            chk.hex("th3", &est.th3, s(d, "th3"));
            if let Some(dh_ee) = est.dh_ee {
                chk.hex("dh_ee", &dh_ee, s(d, "dh_ee"));
            }
            chk.hex("CLIENT_FINISH", &est.client_finish, s(&sv.v["handshake"][2], "hex"));
            chk.eq("server max_frame_len adopted", est.server_limit, sv.server_limit);
            chk.eq("server keepalive adopted", est.keepalive_ms, sv.keepalive);
            let before = [&sv.handshake[0][..], &sv.handshake[1][..]].concat();
            chk.ok("CLIENT_FINISH verifies (server side)", handshake::verify_client_finish(&before, &sv.handshake[2], &est.keys.cf), String::new);
        }
        Err(e) => chk.ok("SERVER_AUTH accepted", false, || format!("refused: {e}")),
    }
    let (mut c, mut srv) = sv.pair();
    replay(&mut c, &mut srv, &sv.frames, sv, Some(chk));
}

fn check_enroll(v: &Value, chk: &mut Check) {
    let i = &v["inputs"];
    let d = &v["derived"];
    let fr: Vec<Vec<u8>> = v["frames"].as_array().unwrap().iter().map(|f| b(f, "hex")).collect();
    let fhex = |k: usize| s(&v["frames"][k], "hex").to_string();
    let sk = k32(i, "server_static_secret");
    let mode = if s(i, "mode") == "open" { EnrollMode::Open } else { EnrollMode::Token };
    let token = Token { mode, c: k32(i, "credential"), s_pub: x25519_base(&sk) };
    chk.eq("token (9.1)", token.format(), s(d, "token").to_string());
    match Token::parse(s(d, "token")) {
        Ok(t) => chk.eq("token parsed", (t.mode, t.c, t.s_pub), (token.mode, token.c, token.s_pub)),
        Err(e) => chk.ok("token parsed", false, || e),
    }
    chk.hex("server_static_public", &token.s_pub, s(d, "server_static_public"));
    let ec = EnrollClient::new(s(i, "id").as_bytes(), &token, k32(i, "client_ephemeral_secret"));
    chk.hex("client_ephemeral_public", &ec.x_pub, s(d, "client_ephemeral_public"));
    chk.hex("th1", &ec.th1, s(d, "th1"));
    chk.hex("init_tag", &ec.init_tag, s(d, "init_tag"));
    chk.hex("ENROLL_INIT", &ec.init, &fhex(0));
    let y = k32(i, "server_ephemeral_secret");
    chk.hex("server_ephemeral_public", &x25519_base(&y), s(d, "server_ephemeral_public"));
    match enroll::server_reply(&fr[0], &token.c, &sk, &y) {
        Some((reply, _)) => chk.hex("ENROLL_REPLY (server side)", &reply, &fhex(1)),
        None => chk.ok("ENROLL_REPLY (server side)", false, || "weak key".into()),
    }
    let conf = match ec.on_reply(&fr[1]) {
        Ok(c) => c,
        Err(e) => return chk.ok("ENROLL_REPLY accepted", false, || format!("refused: {e}")),
    };
    chk.hex("dh_ee", &conf.keys.dh_ee, s(d, "dh_ee"));
    chk.hex("dh_es", &conf.keys.dh_es, s(d, "dh_es"));
    chk.hex("th2", &conf.keys.th2, s(d, "th2"));
    chk.hex("key_server", &conf.keys.server, s(d, "key_server"));
    chk.hex("key_client", &conf.keys.client, s(d, "key_client"));
    chk.hex("key_done", &conf.keys.done, s(d, "key_done"));
    chk.hex("th3", &conf.th3, s(d, "th3"));
    chk.hex("ENROLL_CONFIRM", &conf.confirm, &fhex(2));
    let (done, th4) = enroll::server_done(&[&fr[0][..], &fr[1], &fr[2]].concat(), &conf.keys.done);
    chk.hex("ENROLL_DONE (server side)", &done, &fhex(3));
    chk.hex("th4 (server side)", &th4, s(d, "th4"));
    match conf.on_done(&fr[3]) {
        Ok((k, th4)) => {
            chk.hex("identity_key", &k, s(d, "identity_key"));
            chk.hex("th4", &th4, s(d, "th4"));
        }
        Err(e) => chk.ok("ENROLL_DONE accepted", false, || format!("refused: {e}")),
    }
}

/// Feeds bytes to a session receiver until it refuses something.
fn feed_session(sess: &mut Session, input: &[u8]) -> Fail {
    let mut rd = FrameReader::new(input);
    loop {
        let r = match rd.frame(sess.recv_limit) {
            Ok(r) => r,
            Err(e) => return e,
        };
        let mut bytes = rd.bytes(r).to_vec();
        if let Err(e) = sess.open(&mut bytes) {
            return e;
        }
    }
}

/// Feeds bytes to a pre-session client (limit 256) and applies `f` to the first frame.
fn feed_handshake<T>(input: &[u8], f: impl FnOnce(&[u8]) -> Result<T, Fail>) -> Fail {
    let mut rd = FrameReader::new(input);
    match rd.frame(HANDSHAKE_LIMIT) {
        Ok(r) => match f(rd.bytes(r)) {
            Ok(_) => Fail::Local("accepted".into()),
            Err(e) => e,
        },
        Err(e) => e,
    }
}

fn check_negative(v: &Value, auth: &SessionVec, enc: &SessionVec, enroll_open: &Value, chk: &mut Check) {
    for case in v["cases"].as_array().unwrap() {
        let name = s(case, "name");
        let rc = &case["receiver"];
        let state = s(rc, "state");
        let input = b(case, "input");
        let want_err = s(case, "error");
        let reply = &case["reply"];
        let (err, session_state) = match state {
            "client_session" | "server_session" | "client_session_encrypted" | "server_session_encrypted" => {
                let sv = if state.ends_with("encrypted") { enc } else { auth };
                let (mut c, mut srv) = sv.pair();
                let after = rc["after_frames"].as_u64().unwrap_or(0) as usize;
                replay(&mut c, &mut srv, &sv.frames[..after], sv, None);
                let me = if state.starts_with("client") { &mut c } else { &mut srv };
                if let Some(l) = rc["last_received"].as_str() {
                    me.last_recv = l.parse().expect("last_received is a decimal u64");
                }
                (feed_session(me, &input), true)
            }
            "client_await_server_auth" => (feed_handshake(&input, |f| auth.client_hello().on_auth(f)), false),
            "client_await_sealed_auth" => (feed_handshake(&input, |f| enc.client_hello().on_auth(f)), false),
            "client_await_enroll_reply" => {
                let i = &enroll_open["inputs"];
                let token = Token {
                    mode: EnrollMode::Open,
                    c: k32(i, "credential"),
                    s_pub: x25519_base(&k32(i, "server_static_secret")),
                };
                let ec = EnrollClient::new(s(i, "id").as_bytes(), &token, k32(i, "client_ephemeral_secret"));
                (feed_handshake(&input, |f| ec.on_reply(f)), false)
            }
            other => {
                chk.skipped.push(format!("{name} ({other})"));
                continue;
            }
        };
        let what = format!("negative {name}");
        chk.ok(&format!("{what} error"), err.name() == want_err, || {
            format!("got {} ({err}), vector {want_err}", err.name())
        });
        // What the receiver sends before closing.
        let sends = if session_state { err.session_close_code() } else { None };
        let want_reply = if let Some(c) = reply["close_code"].as_u64() {
            Some(c as u16)
        } else if reply["close"].as_bool() == Some(true) {
            None
        } else {
            chk.ok(&format!("{what} reply"), false, || format!("unexpected reply {reply} for a client state"));
            continue;
        };
        chk.eq(&format!("{what} reply (CLOSE code, or nothing)"), sends, want_reply);
        if let Fail::Refused(code) = err {
            // The code of the ERROR is reported (finish_refused: AUTH_FAILED).
            chk.eq(&format!("{what} code"), code, u16_at(&input, 5));
        }
    }
}

pub fn run(dir: &Path) -> Result<bool, String> {
    let mut chk = Check { quiet: false, matched: 0, mismatched: 0, skipped: vec![], section: String::new(), section_matched: 0 };
    let eo = load(dir, "enroll-open.json")?;
    let et = load(dir, "enroll-token.json")?;
    let auth = SessionVec::parse(load(dir, "session.json")?, Mode::Authenticated);
    let enc = SessionVec::parse(load(dir, "session-encrypted.json")?, Mode::Encrypted);
    let neg = load(dir, "negative.json")?;
    for v in [&eo, &et, &auth.v, &enc.v, &neg] {
        if v["protocol_version"].as_u64() != Some(1) {
            return Err("a vector file is not for protocol version 1".into());
        }
    }
    chk.begin("enroll-open.json");
    check_enroll(&eo, &mut chk);
    chk.end();
    chk.begin("enroll-token.json");
    check_enroll(&et, &mut chk);
    chk.end();
    chk.begin("session.json");
    chk.hex("identity_key = enroll-open's (12.1)", &auth.k, s(&eo["derived"], "identity_key"));
    check_session(&auth, &mut chk);
    chk.end();
    chk.begin("session-encrypted.json");
    check_session(&enc, &mut chk);
    chk.end();
    chk.begin("negative.json");
    check_negative(&neg, &auth, &enc, &eo, &mut chk);
    chk.end();
    let total = neg["cases"].as_array().map_or(0, |c| c.len());
    println!(
        "negative cases: {} of {total} run (client and session receivers); {} skipped, server-side handshake or enrollment receivers: {}",
        total - chk.skipped.len(),
        chk.skipped.len(),
        chk.skipped.join(", ")
    );
    println!("total: {} values matched, {} mismatched", chk.matched, chk.mismatched);
    Ok(chk.mismatched == 0)
}
