//! `tally conformance server ADDR`: every rule a client can observe of a server.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::{fresh_id, open, outcome, random32, seal, Check, Conn, Outcome, Read2};
use crate::proto::credential::{Credential, EnrollmentToken};
use crate::proto::enroll::ClientAwaitReply;
use crate::proto::frame::{EnrollMode, ErrorFrame};
use crate::proto::handshake::{ClientAwaitAuth, ServerLimits};
use crate::proto::{
    Body, CloseCode, ErrorCode, FrameType, Id, Mode, SecretKey, Session, Status,
    HANDSHAKE_MAX_FRAME_LEN,
};

/// What the checks need: the server, an open enrollment token, and how long a refusal
/// may take (spec 13.10 allows a server to delay refusals up to 7.5 s).
pub struct Target {
    /// `host:port`.
    pub addr: String,
    /// An open-mode token (`tallyd token`): the checks enroll ids of their own.
    pub token: EnrollmentToken,
    /// How long to wait for each answer.
    pub timeout: Duration,
    /// The credential of an identity the operator revoked, for 7.5 (optional).
    pub revoked: Option<Credential>,
    /// The mode the checks' sessions use (spec 7.7): the server's policy must accept it.
    pub mode: Mode,
}

/// The session frame limit these checks announce in HELLO.
const OUR_LIMIT: u32 = 65536;

/// Runs every check, in order, and returns them.
pub fn run(t: &Target) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut last = std::time::Instant::now();
    let mut add = |section, rule, o: Result<Outcome, String>| {
        let now = std::time::Instant::now();
        checks.push(Check {
            section,
            rule,
            outcome: outcome(o),
            took: now - last,
        });
        last = now;
    };
    if t.token.mode != EnrollMode::Open {
        add(
            "6.1",
            "the token is an open-mode token (the checks enroll ids of their own)",
            Err("give the open token (`tallyd token`), not a per-identity one".into()),
        );
        return checks;
    }
    let enrolled = "enrollment with the open token stores the identity (ENROLL_DONE)";
    let cred = match enroll(t, &fresh_id("conformance")) {
        Ok(c) => c,
        Err(e) => {
            add("6.2", enrolled, Err(e));
            return checks;
        }
    };
    add("6.2", enrolled, Ok(Outcome::Pass));
    for r in RULES.iter().filter(|r| r.only.is_none_or(|m| m == t.mode)) {
        add(r.section, r.rule, (r.check)(t, &cred));
    }
    checks
}

/// A rule a client can observe of a server (its spec section, the rule as a sentence)
/// and the function that checks it against the server, with an identity enrolled for the
/// checks.
struct Rule {
    section: &'static str,
    rule: &'static str,
    /// The session mode the check needs (`None`: either).
    only: Option<Mode>,
    check: fn(&Target, &Credential) -> Result<Outcome, String>,
}

/// Every rule checked once an identity is enrolled (6.1 and 6.2 come first: without
/// them nothing else can run), in the order they run. A spec reader finds a rule's
/// check by its section here, then the function named.
const RULES: &[Rule] = &[
    Rule {
        section: "6.3",
        rule: "enrolling an id that is taken is refused with ID_TAKEN",
        only: None,
        check: id_taken,
    },
    Rule {
        section: "6.3",
        rule: "an ENROLL_INIT with a wrong credential tag is refused with ENROLL_REFUSED",
        only: None,
        check: wrong_enroll_tag,
    },
    Rule {
        section: "11",
        rule: "an ENROLL_INIT of another version is answered UNSUPPORTED_VERSION naming version 1",
        only: None,
        check: enroll_version,
    },
    Rule {
        section: "7.1",
        rule: "the handshake completes and a REQUEST gets exactly one RESPONSE",
        only: None,
        check: request_response,
    },
    Rule {
        section: "8.5",
        rule: "a PING is answered with a PONG naming it",
        only: None,
        check: ping_pong,
    },
    Rule {
        section: "8.6",
        rule: "CLOSE NORMAL is answered with CLOSE, then the connection closes",
        only: None,
        check: close_normal,
    },
    Rule {
        section: "7.5",
        rule: "unknown id and wrong key: the same SERVER_AUTH size, the same ERROR, then close",
        only: None,
        check: unknown_like_wrong_key,
    },
    Rule {
        section: "7.5",
        rule: "HELLO then EOF: the server sends nothing more, whatever the id",
        only: None,
        check: hello_then_eof,
    },
    Rule {
        section: "7.5",
        rule: "a SEALED_HELLO sealed to another server key is answered like an unknown id",
        only: Some(Mode::Encrypted),
        check: sealed_to_another_key,
    },
    Rule {
        section: "7.2",
        rule: "a SEALED_HELLO whose ephemeral key is of low order is refused with MALFORMED",
        only: Some(Mode::Encrypted),
        check: low_order_ephemeral,
    },
    Rule {
        section: "7.7",
        rule: "a recorded SEALED_HELLO and CLIENT_FINISH replayed get a new SEALED_AUTH, then AUTH_FAILED",
        only: Some(Mode::Encrypted),
        check: replayed_sealed_hello,
    },
    Rule {
        section: "8.7",
        rule: "after the client's KEY_UPDATE the server opens frames sealed with the next key",
        only: Some(Mode::Encrypted),
        check: key_update_opens,
    },
    Rule {
        section: "8.7",
        rule: "a frame sealed with the key before the client's KEY_UPDATE is refused; CLOSE PROTOCOL_ERROR",
        only: Some(Mode::Encrypted),
        check: stale_key_refused,
    },
    Rule {
        section: "8.2",
        rule: "a frame sealed under the server's nonce (direction 1) is refused; CLOSE PROTOCOL_ERROR",
        only: Some(Mode::Encrypted),
        check: wrong_direction_nonce,
    },
    Rule {
        section: "11",
        rule: "a HELLO of another version is answered UNSUPPORTED_VERSION naming version 1",
        only: None,
        check: hello_version,
    },
    Rule {
        section: "4.3",
        rule: "a HELLO announcing a frame limit below 256 is refused with MALFORMED",
        only: None,
        check: small_frame_limit,
    },
    Rule {
        section: "3.2",
        rule: "a length prefix of 4 GiB before the handshake is refused with MALFORMED",
        only: None,
        check: huge_length_prefix,
    },
    Rule {
        section: "3.2",
        rule: "a handshake frame of 257 bytes (over 256) is refused with MALFORMED",
        only: None,
        check: oversize_handshake_frame,
    },
    Rule {
        section: "3.2",
        rule: "a zero-length frame is refused with MALFORMED",
        only: None,
        check: zero_length_frame,
    },
    Rule {
        section: "4.1",
        rule: "an unknown frame type is refused with MALFORMED",
        only: None,
        check: unknown_frame_type,
    },
    Rule {
        section: "8.3",
        rule: "a REQUEST with a bad tag is not answered; CLOSE PROTOCOL_ERROR, closed",
        only: None,
        check: bad_tag,
    },
    Rule {
        section: "8.3",
        rule: "a duplicated frame is refused (one RESPONSE only); CLOSE PROTOCOL_ERROR",
        only: None,
        check: duplicated_frame,
    },
    Rule {
        section: "8.3",
        rule: "a gap in sequence numbers is refused; CLOSE PROTOCOL_ERROR",
        only: None,
        check: sequence_gap,
    },
    Rule {
        section: "8.3",
        rule: "a RESPONSE to a request the server never sent is refused; CLOSE PROTOCOL_ERROR",
        only: None,
        check: unsolicited_response,
    },
    Rule {
        section: "8.3",
        rule: "a frame above the server's announced limit is refused; CLOSE FRAME_TOO_LARGE",
        only: None,
        check: frame_over_limit,
    },
    Rule {
        section: "8.3",
        rule: "an ERROR frame injected into a session is a cut: closed, and no CLOSE sent",
        only: None,
        check: injected_error,
    },
    Rule {
        section: "7.3",
        rule: "a HELLO for the id with a CLIENT_FINISH that does not verify leaves its live session alone",
        only: None,
        check: forged_finish_leaves_live_session,
    },
    Rule {
        section: "6.3",
        rule: "an ENROLL_CONFIRM with a bad tag is refused and stores nothing (the id stays free)",
        only: None,
        check: bad_enroll_confirm,
    },
    Rule {
        section: "7.3",
        rule: "a second session of the id takes over (CLOSE TAKEN_OVER) or is refused (TAKEOVER_REFUSED)",
        only: None,
        check: second_session,
    },
];

/// 6.3: enrolling an id that is taken is refused with ID_TAKEN.
fn id_taken(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    match enroll(t, &cred.id) {
        Ok(_) => Err("the id was enrolled a second time".into()),
        Err(e) if e.contains(&ErrorCode::ID_TAKEN.to_string()) => Ok(Outcome::Pass),
        Err(e) => Err(format!("expected ERROR id taken, got: {e}")),
    }
}

/// 6.3: an ENROLL_INIT with a wrong credential tag is refused with ENROLL_REFUSED.
fn wrong_enroll_tag(t: &Target, _cred: &Credential) -> Result<Outcome, String> {
    let wrong = EnrollmentToken {
        credential: SecretKey::from_bytes(random32()),
        ..t.token.clone()
    };
    let t2 = Target {
        token: wrong,
        addr: t.addr.clone(),
        timeout: t.timeout,
        revoked: None,
        mode: t.mode,
    };
    match enroll(&t2, &fresh_id("conformance")) {
        Ok(_) => Err("a wrong credential enrolled an identity".into()),
        Err(e) if e.contains(&ErrorCode::ENROLL_REFUSED.to_string()) => Ok(Outcome::Pass),
        Err(e) => Err(format!("expected ERROR enrollment refused, got: {e}")),
    }
}

/// 11: an ENROLL_INIT of another version is answered UNSUPPORTED_VERSION naming version 1.
fn enroll_version(t: &Target, _cred: &Credential) -> Result<Outcome, String> {
    let mut out = BytesMut::new();
    let _ = ClientAwaitReply::start(
        t.token.client_params(fresh_id("conformance")),
        random32(),
        &mut out,
    );
    out[5] = 2; // the version byte
    expect_error(t, &out, ErrorCode::UNSUPPORTED_VERSION)
}

/// 7.1: the handshake completes and a REQUEST gets exactly one RESPONSE.
fn request_response(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    session(t, cred).and_then(|(mut conn, mut s, _)| {
        // (SERVER_AUTH's limits were checked against 4.3 by the decoder.)
        conn.send(&seal(
            &mut s,
            &Body::Request {
                payload: Bytes::from_static(b"conformance"),
            },
        ))?;
        match open(&mut s, conn.frame(OUR_LIMIT, t.timeout, "the RESPONSE")?)?.body {
            Body::Response { req_seq: 1, .. } => {}
            other => return Err(format!("expected RESPONSE to 1, got {other:?}")),
        }
        close_politely(&mut conn, &mut s, t.timeout)
    })
}

/// 8.5: a PING is answered with a PONG naming it.
fn ping_pong(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    session(t, cred).and_then(|(mut conn, mut s, _)| {
        conn.send(&seal(&mut s, &Body::Ping))?;
        match open(&mut s, conn.frame(OUR_LIMIT, t.timeout, "the PONG")?)?.body {
            Body::Pong { ping_seq: 1 } => close_politely(&mut conn, &mut s, t.timeout),
            other => Err(format!("expected PONG to 1, got {other:?}")),
        }
    })
}

/// 8.6: CLOSE NORMAL is answered with CLOSE, then the connection closes.
fn close_normal(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    session(t, cred).and_then(|(mut conn, mut s, _)| close_politely(&mut conn, &mut s, t.timeout))
}

/// 7.5: unknown id and wrong key: the same SERVER_AUTH size, the same ERROR, then close.
fn unknown_like_wrong_key(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    let unknown = Credential {
        id: fresh_id("conformance-unknown"),
        key: SecretKey::from_bytes(random32()),
        server: t.addr.clone(),
        server_key: t.token.server_static,
    };
    let wrong = Credential {
        key: SecretKey::from_bytes(random32()),
        ..cred.clone()
    };
    let a = refused_handshake(t, &unknown);
    let b = refused_handshake(t, &wrong);
    match (a, b) {
        (Ok(a), Ok(b)) if a == b => match &t.revoked {
            Some(r) => match refused_handshake(t, r) {
                Ok(c) if c == a => Ok(Outcome::Pass),
                Ok(c) => Err(format!("revoked {c:?} differs from unknown {a:?}")),
                Err(e) => Err(format!("the revoked identity: {e}")),
            },
            None => Ok(Outcome::Pass),
        },
        (Ok(a), Ok(b)) => Err(format!("unknown {a:?} differs from wrong key {b:?}")),
        (Err(e), _) => Err(format!("unknown id: {e}")),
        (_, Err(e)) => Err(format!("wrong key: {e}")),
    }
}

/// 7.5: HELLO then EOF: the server sends nothing more, whatever the id.
fn hello_then_eof(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    let unknown = fresh_id("conformance-unknown");
    for id in [&cred.id, &unknown] {
        let mut conn = Conn::connect(&t.addr)?;
        conn.send(&hello_bytes(t, id, OUR_LIMIT))?;
        let auth = conn.frame(HANDSHAKE_MAX_FRAME_LEN, t.timeout, "SERVER_AUTH")?;
        let answer = crate::proto::frame::ServerAuth::frame_type(t.mode);
        if FrameType::of(&auth) != Ok(answer) {
            return Err(format!("{id}: expected {answer:?}, got {auth:02x?}"));
        }
        let _ = conn.tcp.shutdown(std::net::Shutdown::Write);
        match conn.read(HANDSHAKE_MAX_FRAME_LEN, t.timeout)? {
            Read2::Eof => {}
            Read2::Frame(f) => return Err(format!("{id}: it sent {} more bytes", f.len())),
            Read2::Timeout => return Err(format!("{id}: the connection stayed open")),
        }
    }
    Ok(Outcome::Pass)
}

/// 7.5: a SEALED_HELLO sealed to another server key is answered like an unknown id.
fn sealed_to_another_key(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    let unknown = Credential {
        id: fresh_id("conformance-unknown"),
        key: SecretKey::from_bytes(random32()),
        ..cred.clone()
    };
    let other = x25519_dalek::StaticSecret::from(random32());
    let unopened = Credential {
        server_key: x25519_dalek::PublicKey::from(&other).to_bytes(),
        ..cred.clone()
    };
    let a = refused_handshake(t, &unknown)?;
    let b = refused_handshake(t, &unopened)?;
    if a == b {
        Ok(Outcome::Pass)
    } else {
        Err(format!(
            "unknown {a:?} differs from a sealed id that does not open {b:?}"
        ))
    }
}

/// 7.2: a SEALED_HELLO whose ephemeral key is of low order is refused with MALFORMED.
fn low_order_ephemeral(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    let mut h = hello_bytes(t, &cred.id, OUR_LIMIT);
    h[6..38].fill(0);
    expect_error(t, &h, ErrorCode::MALFORMED)
}

/// 7.7: a recorded SEALED_HELLO and CLIENT_FINISH replayed get a new SEALED_AUTH, then AUTH_FAILED.
fn replayed_sealed_hello(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    let mut conn = Conn::connect(&t.addr)?;
    let mut hello = BytesMut::new();
    let wait = start(cred, Mode::Encrypted, &mut hello)?;
    conn.send(&hello)?;
    let auth = conn.frame(HANDSHAKE_MAX_FRAME_LEN, t.timeout, "SEALED_AUTH")?;
    let mut finish = BytesMut::new();
    let (mut s, _) = wait
        .handle_server_auth(&auth, &mut finish)
        .map_err(|e| e.to_string())?;
    conn.send(&finish)?;
    close_politely(&mut conn, &mut s, t.timeout)?;
    let mut again = Conn::connect(&t.addr)?;
    again.send(&hello)?;
    let auth2 = again.frame(HANDSHAKE_MAX_FRAME_LEN, t.timeout, "SEALED_AUTH")?;
    if auth2 == auth {
        return Err("the same SEALED_AUTH twice: the server's key is not fresh".into());
    }
    again.send(&finish)?;
    let f = again.frame(
        HANDSHAKE_MAX_FRAME_LEN,
        t.timeout,
        "ERROR authentication failed",
    )?;
    match ErrorFrame::code_if_error(&f) {
        Some(code) if code == ErrorCode::AUTH_FAILED => Ok(Outcome::Pass),
        other => Err(format!(
            "expected ERROR authentication failed, got {other:?}"
        )),
    }
}

/// 8.7: after the client's KEY_UPDATE the server opens frames sealed with the next key.
fn key_update_opens(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    session(t, cred).and_then(|(mut conn, mut s, _)| {
        conn.send(&seal(&mut s, &Body::KeyUpdate))?;
        conn.send(&seal(
            &mut s,
            &Body::Request {
                payload: Bytes::from_static(b"after the update"),
            },
        ))?;
        match open(&mut s, conn.frame(OUR_LIMIT, t.timeout, "the RESPONSE")?)?.body {
            Body::Response { req_seq: 2, .. } => close_politely(&mut conn, &mut s, t.timeout),
            other => Err(format!("expected the RESPONSE to 2, got {other:?}")),
        }
    })
}

/// 8.7: a frame sealed with the key before the client's KEY_UPDATE is refused; CLOSE PROTOCOL_ERROR.
fn stale_key_refused(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    violation(t, cred, 0, |s| {
        let stale = s.forge_for_testing(FrameType::Request as u8, 2, b"old key");
        vec![seal(s, &Body::KeyUpdate), stale]
    })
}

/// 8.2: a frame sealed under the server's nonce (direction 1) is refused; CLOSE PROTOCOL_ERROR.
fn wrong_direction_nonce(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    violation(t, cred, 0, |s| {
        vec![s.forge_with_nonce_for_testing(FrameType::Request as u8, 1, 1, b"wrong nonce")]
    })
}

/// 11: a HELLO of another version is answered UNSUPPORTED_VERSION naming version 1.
fn hello_version(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    let mut hello = hello_bytes(t, &cred.id, OUR_LIMIT);
    hello[5] = 2;
    expect_error(t, &hello, ErrorCode::UNSUPPORTED_VERSION)
}

/// 4.3: a HELLO announcing a frame limit below 256 is refused with MALFORMED.
fn small_frame_limit(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    expect_error(t, &hello_bytes(t, &cred.id, 255), ErrorCode::MALFORMED)
}

/// 3.2: a length prefix of 4 GiB before the handshake is refused with MALFORMED.
fn huge_length_prefix(t: &Target, _cred: &Credential) -> Result<Outcome, String> {
    expect_error(t, &[0xff, 0xff, 0xff, 0xff, 0x10], ErrorCode::MALFORMED)
}

/// 3.2: a handshake frame of 257 bytes (over 256) is refused with MALFORMED.
fn oversize_handshake_frame(t: &Target, _cred: &Credential) -> Result<Outcome, String> {
    let mut f = 257u32.to_be_bytes().to_vec();
    f.push(FrameType::Hello as u8);
    expect_error(t, &f, ErrorCode::MALFORMED)
}

/// 3.2: a zero-length frame is refused with MALFORMED.
fn zero_length_frame(t: &Target, _cred: &Credential) -> Result<Outcome, String> {
    expect_error(t, &[0, 0, 0, 0], ErrorCode::MALFORMED)
}

/// 4.1: an unknown frame type is refused with MALFORMED.
fn unknown_frame_type(t: &Target, _cred: &Credential) -> Result<Outcome, String> {
    expect_error(t, &[0, 0, 0, 2, 0x7e, 0], ErrorCode::MALFORMED)
}

/// 8.3: a REQUEST with a bad tag is not answered; CLOSE PROTOCOL_ERROR, closed.
fn bad_tag(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    violation(t, cred, 0, |s| {
        let mut f = seal(
            s,
            &Body::Request {
                payload: Bytes::from_static(b"x"),
            },
        );
        let last = f.len() - 1;
        f[last] ^= 1;
        vec![f]
    })
}

/// 8.3: a duplicated frame is refused (one RESPONSE only); CLOSE PROTOCOL_ERROR.
fn duplicated_frame(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    violation(t, cred, 1, |s| {
        let f = seal(
            s,
            &Body::Request {
                payload: Bytes::from_static(b"once"),
            },
        );
        vec![f.clone(), f]
    })
}

/// 8.3: a gap in sequence numbers is refused; CLOSE PROTOCOL_ERROR.
fn sequence_gap(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    violation(t, cred, 0, |s| {
        vec![super::forge(s, FrameType::Request as u8, 2, b"skipped one")]
    })
}

/// 8.3: a RESPONSE to a request the server never sent is refused; CLOSE PROTOCOL_ERROR.
fn unsolicited_response(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    violation(t, cred, 0, |s| {
        vec![seal(
            s,
            &Body::Response {
                req_seq: 5,
                status: Status::OK,
                payload: Bytes::new(),
            },
        )]
    })
}

/// 8.3: a frame above the server's announced limit is refused; CLOSE FRAME_TOO_LARGE.
fn frame_over_limit(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    session(t, cred).and_then(|(mut conn, mut s, limits)| {
        let len = limits.max_frame_len + 1;
        let mut f = len.to_be_bytes().to_vec();
        f.push(FrameType::Message as u8);
        conn.send(&f)?;
        expect_close(
            &mut conn,
            &mut s,
            t.timeout,
            &[CloseCode::FRAME_TOO_LARGE],
            0,
        )
    })
}

/// 8.3: an ERROR frame injected into a session is a cut: closed, and no CLOSE sent.
fn injected_error(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    session(t, cred).and_then(|(mut conn, mut s, _)| {
        conn.send(&ErrorFrame::new(ErrorCode::BUSY).encoded())?;
        match conn.read(OUR_LIMIT, t.timeout)? {
            Read2::Eof => Ok(Outcome::Pass),
            Read2::Frame(f) => match open(&mut s, f)?.body {
                Body::Close { code, .. } => Err(format!("it sent CLOSE {code} (8.3: no CLOSE)")),
                other => Err(format!("it went on: {other:?}")),
            },
            Read2::Timeout => Err("the connection stayed open".into()),
        }
    })
}

/// 7.3: a HELLO for the id with a CLIENT_FINISH that does not verify leaves its live session alone.
fn forged_finish_leaves_live_session(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    session(t, cred).and_then(|(mut live, mut s, _)| {
        let forged = Credential {
            key: SecretKey::from_bytes(random32()),
            ..cred.clone()
        };
        refused_handshake(t, &forged)?;
        live.send(&seal(&mut s, &Body::Ping))?;
        match open(&mut s, live.frame(OUR_LIMIT, t.timeout, "the PONG")?)?.body {
            Body::Pong { .. } => close_politely(&mut live, &mut s, t.timeout),
            other => Err(format!("the live session got {other:?}")),
        }
    })
}

/// 6.3: an ENROLL_CONFIRM with a bad tag is refused and stores nothing (the id stays free).
fn bad_enroll_confirm(t: &Target, _cred: &Credential) -> Result<Outcome, String> {
    let id = fresh_id("conformance");
    let mut conn = Conn::connect(&t.addr)?;
    let mut out = BytesMut::new();
    let wait = ClientAwaitReply::start(t.token.client_params(id.clone()), random32(), &mut out);
    conn.send(&out)?;
    let reply = conn.frame(HANDSHAKE_MAX_FRAME_LEN, t.timeout, "ENROLL_REPLY")?;
    out.clear();
    wait.handle_reply(&reply, &mut out)
        .map_err(|e| e.to_string())?;
    let last = out.len() - 1;
    out[last] ^= 1;
    conn.send(&out)?;
    let f = conn.frame(
        HANDSHAKE_MAX_FRAME_LEN,
        t.timeout,
        "ERROR enrollment refused",
    )?;
    match ErrorFrame::code_if_error(&f) {
        Some(code) if code == ErrorCode::ENROLL_REFUSED => {}
        other => return Err(format!("expected ERROR enrollment refused, got {other:?}")),
    }
    enroll(t, &id).map_err(|e| format!("the id was not left free: {e}"))?;
    Ok(Outcome::Pass)
}

/// 7.3: a second session of the id takes over (CLOSE TAKEN_OVER) or is refused (TAKEOVER_REFUSED).
fn second_session(t: &Target, cred: &Credential) -> Result<Outcome, String> {
    session(t, cred).and_then(|(mut first, mut s1, _)| {
        // The first session established on the server (its PONG) before the second:
        // else the second may be registered first and the roles swap.
        first.send(&seal(&mut s1, &Body::Ping))?;
        match open(&mut s1, first.frame(OUR_LIMIT, t.timeout, "the PONG")?)?.body {
            Body::Pong { .. } => {}
            other => return Err(format!("the first session answered {other:?}")),
        }
        let mut conn = Conn::connect(&t.addr)?;
        let (mut s2, _) = handshake(&mut conn, cred, t.mode, t.timeout)?;
        // The handshake gives no answer to CLIENT_FINISH: a PING tells which way it went.
        conn.send(&seal(&mut s2, &Body::Ping))?;
        let f = conn.frame(OUR_LIMIT, t.timeout, "a PONG, or ERROR TAKEOVER_REFUSED")?;
        if let Some(code) = ErrorFrame::code_if_error(&f) {
            if code != ErrorCode::TAKEOVER_REFUSED {
                return Err(format!("the second session was refused with {code}"));
            }
            // Reject policy: the first session goes on.
            first.send(&seal(&mut s1, &Body::Ping))?;
            return match open(&mut s1, first.frame(OUR_LIMIT, t.timeout, "the PONG")?)?.body {
                Body::Pong { .. } => close_politely(&mut first, &mut s1, t.timeout),
                other => Err(format!("the first session, after the refusal: {other:?}")),
            };
        }
        match open(&mut s2, f)?.body {
            Body::Pong { ping_seq: 1 } => {}
            other => return Err(format!("the second session answered {other:?}")),
        }
        let f = first.frame(
            OUR_LIMIT,
            t.timeout,
            "CLOSE TAKEN_OVER on the first session",
        )?;
        match open(&mut s1, f)?.body {
            Body::Close { code, .. } if code == CloseCode::TAKEN_OVER => {
                close_politely(&mut conn, &mut s2, t.timeout)
            }
            other => Err(format!("the first session got {other:?}")),
        }
    })
}

/// The first frame of the target's mode (spec 4.3) for `id`, with a fresh nonce (or
/// ephemeral key) and any `limit`, even one out of range: HELLO, or SEALED_HELLO sealed
/// to the token's `S` (its limit is not in the sealed part: it is set afterwards).
fn hello_bytes(t: &Target, id: &Id, limit: u32) -> Vec<u8> {
    match t.mode {
        Mode::Authenticated => {
            let n = id.as_str().len();
            let mut h = ((39 + n) as u32).to_be_bytes().to_vec();
            h.extend_from_slice(&[FrameType::Hello as u8, 1, n as u8]);
            h.extend_from_slice(id.as_str().as_bytes());
            h.extend_from_slice(&random32());
            h.extend_from_slice(&limit.to_be_bytes());
            h
        }
        Mode::Encrypted => {
            // The limit is sealed with the id: a frame with any limit is sealed anew.
            ClientAwaitAuth::sealed_hello_for_testing(
                id,
                &t.token.server_static,
                &mut random32(),
                limit,
            )
            .map_or_else(Vec::new, |h| h.to_vec())
        }
    }
}

/// Enrolls `id` with the target's token (spec 6.2).
fn enroll(t: &Target, id: &Id) -> Result<Credential, String> {
    let mut conn = Conn::connect(&t.addr)?;
    let mut out = BytesMut::new();
    let wait = ClientAwaitReply::start(t.token.client_params(id.clone()), random32(), &mut out);
    conn.send(&out)?;
    let reply = conn.frame(HANDSHAKE_MAX_FRAME_LEN, t.timeout, "ENROLL_REPLY")?;
    out.clear();
    let done = wait
        .handle_reply(&reply, &mut out)
        .map_err(|e| e.to_string())?;
    conn.send(&out)?;
    let frame = conn.frame(HANDSHAKE_MAX_FRAME_LEN, t.timeout, "ENROLL_DONE")?;
    let (id, key) = done.handle_done(&frame).map_err(|e| e.to_string())?;
    Ok(Credential {
        id,
        key,
        server: t.addr.clone(),
        server_key: t.token.server_static,
    })
}

/// The client's first frame in `mode`: HELLO, or SEALED_HELLO (spec 7.7).
fn start(cred: &Credential, mode: Mode, out: &mut BytesMut) -> Result<ClientAwaitAuth, String> {
    match mode {
        Mode::Authenticated => Ok(ClientAwaitAuth::start(
            &cred.id,
            cred.key.clone(),
            random32(),
            OUR_LIMIT,
            out,
        )),
        Mode::Encrypted => ClientAwaitAuth::start_sealed(
            &cred.id,
            cred.key.clone(),
            &cred.server_key,
            &mut random32(),
            OUR_LIMIT,
            out,
        )
        .map_err(|e| format!("the server key in the token: {e}")),
    }
}

/// The handshake (spec 7.1) on `conn`.
fn handshake(
    conn: &mut Conn,
    cred: &Credential,
    mode: Mode,
    timeout: Duration,
) -> Result<(Session, ServerLimits), String> {
    let mut out = BytesMut::new();
    let wait = start(cred, mode, &mut out)?;
    conn.send(&out)?;
    let auth = conn.frame(HANDSHAKE_MAX_FRAME_LEN, timeout, "SERVER_AUTH")?;
    out.clear();
    let (session, limits) = wait
        .handle_server_auth(&auth, &mut out)
        .map_err(|e| e.to_string())?;
    conn.send(&out)?;
    Ok((session, limits))
}

fn session(t: &Target, cred: &Credential) -> Result<(Conn, Session, ServerLimits), String> {
    let mut conn = Conn::connect(&t.addr)?;
    let (s, l) = handshake(&mut conn, cred, t.mode, t.timeout)?;
    Ok((conn, s, l))
}

/// Sends CLOSE NORMAL; the server must answer CLOSE and close.
fn close_politely(conn: &mut Conn, s: &mut Session, timeout: Duration) -> Result<Outcome, String> {
    conn.send(&seal(
        s,
        &Body::Close {
            code: CloseCode::NORMAL,
            reason: String::new(),
        },
    ))?;
    loop {
        match conn.read(OUR_LIMIT, timeout)? {
            Read2::Frame(f) => match open(s, f)?.body {
                Body::Close { .. } => break,
                // Every request of ours was answered before we close: an answer now is
                // a second one (8.4: exactly one), or one to nothing asked.
                Body::Response { req_seq, .. } => {
                    return Err(format!(
                        "a RESPONSE to {req_seq} nobody was waiting for (a second answer?)"
                    ))
                }
                // Sent before the server saw our CLOSE (8.6).
                _ => continue,
            },
            Read2::Eof => return Err("EOF without the server's CLOSE".into()),
            Read2::Timeout => return Err("no CLOSE in answer to ours".into()),
        }
    }
    match conn.read(OUR_LIMIT, timeout)? {
        Read2::Eof => Ok(Outcome::Pass),
        Read2::Frame(_) => Err("a frame after the server's CLOSE".into()),
        Read2::Timeout => Err("the connection stayed open after CLOSE".into()),
    }
}

/// After a violation: maybe answers to frames before it, then CLOSE with one of
/// `codes` (SHOULD) or just EOF, and nothing answered after it.
fn expect_close(
    conn: &mut Conn,
    s: &mut Session,
    timeout: Duration,
    codes: &[CloseCode],
    mut answers: u64,
) -> Result<Outcome, String> {
    loop {
        match conn.read(OUR_LIMIT, timeout)? {
            Read2::Frame(f) => match open(s, f)?.body {
                Body::Close { code, .. } if codes.contains(&code) => {}
                Body::Close { code, .. } => {
                    return Err(format!("closed with {code}, expected {}", codes[0]))
                }
                // The answer to a valid REQUEST before the violation.
                Body::Response { .. } if answers > 0 => {
                    answers -= 1;
                    continue;
                }
                other => return Err(format!("it answered the offending frame: {other:?}")),
            },
            Read2::Eof => return Ok(Outcome::Pass),
            Read2::Timeout => return Err("the connection stayed open".into()),
        }
        // Its CLOSE came: we end our side too (the server may linger for it).
        let _ = conn.tcp.shutdown(std::net::Shutdown::Write);
        return match conn.read(OUR_LIMIT, timeout)? {
            Read2::Eof => Ok(Outcome::Pass),
            Read2::Frame(_) => Err("a frame after its CLOSE".into()),
            Read2::Timeout => Err("the connection stayed open after its CLOSE".into()),
        };
    }
}

/// A session in which `frames` (built with the session) break a rule of 8.3.
/// `answers`: RESPONSEs allowed first, to valid REQUESTs before the violation.
fn violation(
    t: &Target,
    cred: &Credential,
    answers: u64,
    frames: impl FnOnce(&mut Session) -> Vec<Vec<u8>>,
) -> Result<Outcome, String> {
    let (mut conn, mut s, _) = session(t, cred)?;
    for f in frames(&mut s) {
        conn.send(&f)?;
    }
    expect_close(
        &mut conn,
        &mut s,
        t.timeout,
        &[CloseCode::PROTOCOL_ERROR],
        answers,
    )
}

/// Sends `bytes` on a new connection and expects ERROR `code`, then the close.
fn expect_error(t: &Target, bytes: &[u8], code: ErrorCode) -> Result<Outcome, String> {
    let mut conn = Conn::connect(&t.addr)?;
    conn.send(bytes)?;
    let f = conn.frame(HANDSHAKE_MAX_FRAME_LEN, t.timeout, &format!("ERROR {code}"))?;
    let e = ErrorFrame::decode(&f).map_err(|e| format!("expected ERROR {code}: {e}"))?;
    if e.code != code {
        return Err(format!("ERROR {} instead of {code}", e.code));
    }
    if e.version != 1 {
        return Err(format!("the ERROR names version {}, not 1", e.version));
    }
    match conn.read(HANDSHAKE_MAX_FRAME_LEN, t.timeout)? {
        Read2::Eof => Ok(Outcome::Pass),
        _ => Err("the connection stayed open after ERROR".into()),
    }
}

/// A handshake that must fail: what the server sent (SERVER_AUTH length, then the
/// ERROR's bytes after our CLIENT_FINISH), to compare between cases.
fn refused_handshake(t: &Target, cred: &Credential) -> Result<(usize, Vec<u8>), String> {
    let mut conn = Conn::connect(&t.addr)?;
    let mut out = BytesMut::new();
    let wait = start(cred, t.mode, &mut out)?;
    conn.send(&out)?;
    let auth = conn.frame(HANDSHAKE_MAX_FRAME_LEN, t.timeout, "SERVER_AUTH")?;
    let answer = crate::proto::frame::ServerAuth::frame_type(t.mode);
    if FrameType::of(&auth) != Ok(answer) {
        return Err(format!("expected {answer:?}, got {auth:02x?}"));
    }
    if wait.handle_server_auth(&auth, &mut BytesMut::new()).is_ok() {
        return Err("SERVER_AUTH verified with a key the server should not have".into());
    }
    // CLIENT_FINISH anyway (7.5): any 32 bytes.
    let mut finish = vec![0, 0, 0, 33, FrameType::ClientFinish as u8];
    finish.extend_from_slice(&random32());
    conn.send(&finish)?;
    let err = conn.frame(
        HANDSHAKE_MAX_FRAME_LEN,
        t.timeout,
        "ERROR authentication failed",
    )?;
    if ErrorFrame::code_if_error(&err) != Some(ErrorCode::AUTH_FAILED) {
        return Err(format!(
            "expected ERROR authentication failed, got {err:02x?}"
        ));
    }
    match conn.read(HANDSHAKE_MAX_FRAME_LEN, t.timeout)? {
        Read2::Eof => Ok((auth.len(), err.to_vec())),
        _ => Err("the connection stayed open after ERROR".into()),
    }
}
