//! `tally conformance client --listen ADDR --exec CMD`: plays a server that misbehaves
//! in each way a client must refuse, runs the client under test once per scenario, and
//! reports which misbehaviour it accepted.
//!
//! The command is run with `sh -c`, `{cred}` replaced by a credential file (spec 9.2)
//! for this tool's address and `{payload}` by the request payload (also in
//! `$TALLY_CRED` and `$TALLY_PAYLOAD`). It must send that one REQUEST and print the
//! RESPONSE's payload on stdout, exiting 0 only if it got one: `tally request --retries
//! 0 --cred {cred} {payload}`, `target/c/request {cred} {payload}`. A client that
//! accepted a forged answer prints it (every forged payload starts with `forged`) or
//! exits 0. The enrollment command (`--enroll-exec`) gets `{server}`, `{id}` and `{out}`,
//! and the token on stdin.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use x25519_dalek::StaticSecret;

use super::{
    forge, fresh_id, open, outcome, random32, response_fields, seal, Check, Conn, Outcome, Read2,
};
use crate::proto::credential::{Credential, EnrollmentToken};
use crate::proto::enroll::{ServerAwaitConfirm, ServerParams};
use crate::proto::frame::{EnrollMode, ErrorFrame, Mode};
use crate::proto::handshake::{HelloReceived, ServerLimits};
use crate::proto::{
    Body, CloseCode, ErrorCode, FrameType, SecretKey, Session, Status, HANDSHAKE_MAX_FRAME_LEN,
};

/// The client under test and where this tool listens for it.
pub struct Target {
    /// Bound by the caller (`--listen`).
    pub listener: TcpListener,
    /// The request command (see the module docs).
    pub exec: String,
    /// The enrollment command, if the client enrolls too.
    pub enroll_exec: Option<String>,
    /// A directory for the credential files.
    pub dir: PathBuf,
    /// How long one scenario may take.
    pub timeout: Duration,
}

/// What the tool does with one connection, as the server.
type Behaviour = fn(&mut Conn, &Ctx) -> Result<(), String>;

/// What a behaviour knows.
struct Ctx {
    cred: Credential,
    /// The static secret `s` of the server this tool plays: `S` is in the client's
    /// credential, and opens its SEALED_HELLO.
    server_static: x25519_dalek::StaticSecret,
    /// The tool's listener, for the client's next connection.
    listener: std::net::TcpListener,
    payload: String,
    timeout: Duration,
    /// Frames recorded from the honest scenario, to replay later.
    recorded: std::cell::RefCell<Recorded>,
}

impl Ctx {
    /// The payload of every forged answer: a client that prints it accepted one.
    fn forged(&self) -> String {
        format!("forged-{}", self.payload)
    }
}

#[derive(Default)]
struct Recorded {
    server_auth: Option<Vec<u8>>,
    response: Option<Vec<u8>>,
}

/// A rule a client must keep that a server can observe (its spec section, the rule as a
/// sentence), and how this tool behaves to see whether the client under test keeps it.
struct Scenario {
    section: &'static str,
    rule: &'static str,
    /// Whether the client must accept (print the answer): the two controls, where the
    /// server is honest; every other scenario must be refused.
    accept: bool,
    behaviour: Behaviour,
}

/// The scenarios, in the order they run; the first is the control (the others are
/// judged only if the client passed it). A spec reader finds a rule's check by its
/// section here, then the function named.
const SCENARIOS: &[Scenario] = &[
    Scenario {
        section: "7.1",
        rule: "an honest server: the client gets its answer (control)",
        accept: true,
        behaviour: honest,
    },
    Scenario {
        section: "7.2",
        rule: "SERVER_AUTH with a bad tag is refused",
        accept: false,
        behaviour: bad_server_auth_tag,
    },
    Scenario {
        section: "7.6",
        rule: "a SERVER_AUTH replayed from an earlier connection is refused",
        accept: false,
        behaviour: replayed_server_auth,
    },
    Scenario {
        section: "7.2",
        rule: "an ERROR in place of SERVER_AUTH is a refusal, not a session",
        accept: false,
        behaviour: error_for_server_auth,
    },
    Scenario {
        section: "8.3",
        rule: "a RESPONSE with a bad tag is refused",
        accept: false,
        behaviour: bad_response_tag,
    },
    Scenario {
        section: "8.3",
        rule: "a duplicated sequence number is refused",
        accept: false,
        behaviour: duplicated_sequence,
    },
    Scenario {
        section: "8.3",
        rule: "a gap in sequence numbers is refused",
        accept: false,
        behaviour: sequence_gap,
    },
    Scenario {
        section: "8.3",
        rule: "a RESPONSE to a request never sent (unsolicited) is refused",
        accept: false,
        behaviour: unsolicited_response,
    },
    Scenario {
        section: "8.3",
        rule: "a RESPONSE replayed from an earlier session is refused",
        accept: false,
        behaviour: replayed_response,
    },
    Scenario {
        section: "8.3",
        rule: "an ERROR injected after a session frame ends the session (truncated)",
        accept: false,
        behaviour: injected_error,
    },
    Scenario {
        section: "8.6",
        rule: "EOF before the answer is a truncation, not an answer",
        accept: false,
        behaviour: eof_before_answer,
    },
    Scenario {
        section: "3.2",
        rule: "a frame above the limit the client announced is refused",
        accept: false,
        behaviour: frame_over_client_limit,
    },
    Scenario {
        section: "7.8",
        rule: "SEALED_HELLO answered with a validly tagged SERVER_AUTH (the other mode's type) is refused",
        accept: false,
        behaviour: other_modes_server_auth,
    },
    Scenario {
        section: "7.8",
        rule: "after ERROR MODE_REFUSED the client does not come back with HELLO (no fallback)",
        accept: false,
        behaviour: no_fallback_after_mode_refused,
    },
    Scenario {
        section: "8.2",
        rule: "a RESPONSE sealed under the client's nonce direction (0) is refused",
        accept: false,
        behaviour: wrong_direction_nonce,
    },
    Scenario {
        section: "8.7",
        rule: "a RESPONSE sealed with the key before the server's KEY_UPDATE is refused",
        accept: false,
        behaviour: stale_key_response,
    },
    Scenario {
        section: "8.5",
        rule: "a server that announced a 1 s keepalive and then says nothing gets a PING within 2 s",
        accept: false,
        behaviour: keepalive_ping,
    },
    Scenario {
        section: "8.7",
        rule: "an honest server that sends KEY_UPDATE before its answer: the client gets it (control)",
        accept: true,
        behaviour: honest_key_update,
    },
];

/// Runs every scenario, in order.
pub fn run(t: &Target) -> Vec<Check> {
    let addr = t.listener.local_addr().expect("bound").to_string();
    let server_static = x25519_dalek::StaticSecret::from(random32());
    let cred = Credential {
        id: fresh_id("conformance-client"),
        key: SecretKey::from_bytes(random32()),
        server: addr.clone(),
        server_key: x25519_dalek::PublicKey::from(&server_static).to_bytes(),
    };
    let path = t.dir.join("conformance.cred");
    let written = crate::secrets::write_secret_file(&path, cred.to_file().as_bytes());
    let mut checks = Vec::new();
    if let Err(e) = written {
        checks.push(Check {
            section: "9.2",
            rule: "the credential file for the client",
            outcome: Outcome::Fail(e.to_string()),
            took: Duration::ZERO,
        });
        return checks;
    }
    let listener = match t.listener.try_clone() {
        Ok(l) => l,
        Err(e) => {
            checks.push(Check {
                section: "7.1",
                rule: "the listener",
                outcome: Outcome::Fail(e.to_string()),
                took: Duration::ZERO,
            });
            return checks;
        }
    };
    let ctx = Ctx {
        cred,
        server_static,
        listener,
        payload: format!("conformance-{}", hex::encode(&random32()[..4])),
        timeout: t.timeout,
        recorded: Default::default(),
    };
    let mut control_ok = true;
    for (i, sc) in SCENARIOS.iter().enumerate() {
        let start = Instant::now();
        let o = if i > 0 && !control_ok {
            // A client that cannot talk to an honest server refuses everything.
            Ok(Outcome::Skip(
                "the control failed: fix --exec first (the client must get an honest answer)"
                    .into(),
            ))
        } else {
            scenario(t, &ctx, &path, sc.accept, sc.behaviour)
        };
        // The first scenario is the control: the others are judged only if it passed.
        if i == 0 {
            control_ok = matches!(o, Ok(Outcome::Pass));
        }
        checks.push(Check {
            section: sc.section,
            rule: sc.rule,
            outcome: outcome(o),
            took: start.elapsed(),
        });
    }
    if let Some(cmd) = &t.enroll_exec {
        for (section, rule, how) in [
            (
                "6.2",
                "an honest enrollment: the client stores the key the server derived (control)",
                Enroll::Honest,
            ),
            (
                "6.4",
                "an ENROLL_REPLY from a server without the pinned key is refused",
                Enroll::WrongKey,
            ),
            (
                "6.4",
                "an ENROLL_DONE with a bad tag is refused (nothing stored)",
                Enroll::BadDone,
            ),
        ] {
            let start = Instant::now();
            let o = outcome(enrollment(t, cmd, how));
            checks.push(Check {
                section,
                rule,
                outcome: o,
                took: start.elapsed(),
            });
        }
    }
    checks
}

/// Runs the client once against `behaviour`; judges what it did.
fn scenario(
    t: &Target,
    ctx: &Ctx,
    cred: &Path,
    accept: bool,
    behaviour: Behaviour,
) -> Result<Outcome, String> {
    let cmd = t
        .exec
        .replace("{cred}", &shell_quote(&cred.display().to_string()))
        .replace("{payload}", &shell_quote(&ctx.payload));
    let mut child = spawn(
        &cmd,
        &[
            ("TALLY_CRED", &cred.display().to_string()),
            ("TALLY_PAYLOAD", &ctx.payload),
        ],
        None,
    )?;
    let served = match accept_one(&t.listener, &mut child, t.timeout) {
        Ok(tcp) => {
            let mut conn = Conn::new(tcp);
            let r = behaviour(&mut conn, ctx);
            drop(conn);
            r
        }
        Err(e) => Err(e),
    };
    let (code, stdout, stderr) = finish(child, t.timeout);
    let said = || {
        format!(
            "exit {code:?}, stdout {stdout:?}, stderr {:?}",
            last_line(&stderr)
        )
    };
    if accept {
        served.map_err(|e| {
            format!(
                "this tool, as the honest server: {e}; the client: {}",
                said()
            )
        })?;
        return if code == Some(0) && stdout == ctx.payload {
            Ok(Outcome::Pass)
        } else {
            Err(format!(
                "the client did not get its answer from an honest server: {}",
                said()
            ))
        };
    }
    // A forged answer printed, the honest one that followed the violation printed (the
    // client kept the session), or success claimed.
    if code == Some(0) || stdout.contains("forged") || stdout.contains(&ctx.payload) {
        return Err(format!("accepted: {}", said()));
    }
    if let Err(e) = served {
        // What this tool saw the client do against the rule.
        if let Some(seen) = e.strip_prefix("violation: ") {
            return Err(seen.to_owned());
        }
        return Ok(Outcome::Skip(format!(
            "the scenario could not be played: {e}"
        )));
    }
    if code.is_none() {
        return Err(format!(
            "the client hung (killed after {} s)",
            t.timeout.as_secs()
        ));
    }
    Ok(Outcome::Pass)
}

/// 7.2: SERVER_AUTH with a bad tag is refused.
fn bad_server_auth_tag(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    let (mut auth, _) = server_auth(c, x)?;
    let last = auth.len() - 1;
    auth[last] ^= 1;
    c.send(&auth)?;
    // An impostor has no session keys, but a client that goes on without the
    // server's proof takes whatever comes: a RESPONSE with any tag.
    let went_on = matches!(c.read(HANDSHAKE_MAX_FRAME_LEN, HOLD), Ok(Read2::Frame(_)));
    if went_on && matches!(c.read(65536, HOLD), Ok(Read2::Frame(_))) {
        let payload = x.forged();
        let mut f = ((1 + 8 + 10 + payload.len() + 32) as u32)
            .to_be_bytes()
            .to_vec();
        f.push(FrameType::Response as u8);
        f.extend_from_slice(&1u64.to_be_bytes());
        f.extend_from_slice(&response_fields(1, 0, payload.as_bytes()));
        f.extend_from_slice(&[0; 32]);
        let _ = c.send(&f);
    }
    hold(c, x)
}

/// 7.6: a SERVER_AUTH replayed from an earlier connection is refused.
fn replayed_server_auth(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    let hello = c.frame(HANDSHAKE_MAX_FRAME_LEN, x.timeout, "HELLO")?;
    HelloReceived::parse(
        &hello,
        &crate::proto::handshake::ServerKey::from(&x.server_static),
    )
    .map_err(|e| e.to_string())?;
    let old = x
        .recorded
        .borrow()
        .server_auth
        .clone()
        .ok_or("no recorded SERVER_AUTH")?;
    c.send(&old)?;
    hold(c, x)
}

/// 7.2: an ERROR in place of SERVER_AUTH is a refusal, not a session.
fn error_for_server_auth(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    c.frame(HANDSHAKE_MAX_FRAME_LEN, x.timeout, "HELLO")?;
    c.send(&ErrorFrame::new(ErrorCode::BUSY).encoded())?;
    Ok(())
}

/// 8.3: a RESPONSE with a bad tag is refused.
fn bad_response_tag(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    in_session(c, x, |c, mut s, req| {
        let mut f = seal(&mut s, &forged_response(req, x));
        let last = f.len() - 1;
        f[last] ^= 1;
        c.send(&f)?;
        // The honest answer where a client that dropped the bad frame expects it.
        s.set_counters_for_testing(1, 1);
        Ok(s)
    })
}

/// 8.3: a duplicated sequence number is refused.
fn duplicated_sequence(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    in_session(c, x, |c, mut s, req| {
        c.send(&seal(&mut s, &Body::Ping))?;
        let fields = response_fields(req, 0, x.forged().as_bytes());
        c.send(&forge(&s, FrameType::Response as u8, 1, &fields))?;
        Ok(s)
    })
}

/// 8.3: a gap in sequence numbers is refused.
fn sequence_gap(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    in_session(c, x, |c, s, req| {
        let fields = response_fields(req, 0, x.forged().as_bytes());
        c.send(&forge(&s, FrameType::Response as u8, 2, &fields))?;
        Ok(s)
    })
}

/// 8.3: a RESPONSE to a request never sent (unsolicited) is refused.
fn unsolicited_response(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    in_session(c, x, |c, mut s, req| {
        c.send(&seal(&mut s, &forged_response(req + 6, x)))?;
        Ok(s)
    })
}

/// 8.3: a RESPONSE replayed from an earlier session is refused.
fn replayed_response(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    in_session(c, x, |c, s, _| {
        let old = x.recorded.borrow().response.clone();
        c.send(&old.ok_or("no recorded RESPONSE")?)?;
        Ok(s)
    })
}

/// 8.3: an ERROR injected after a session frame ends the session (truncated).
fn injected_error(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    in_session(c, x, |c, mut s, _| {
        // A frame the client accepts first: then an ERROR is a cut, not a refusal.
        c.send(&seal(&mut s, &Body::Ping))?;
        c.send(&ErrorFrame::new(ErrorCode::INTERNAL).encoded())?;
        Ok(s)
    })
}

/// 8.6: EOF before the answer is a truncation, not an answer.
fn eof_before_answer(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    let (_s, _req) = established(c, x)?;
    let _ = c.tcp.shutdown(std::net::Shutdown::Both);
    Ok(())
}

/// 3.2: a frame above the limit the client announced is refused.
fn frame_over_client_limit(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    let hello = c.frame(HANDSHAKE_MAX_FRAME_LEN, x.timeout, "HELLO")?;
    let received = HelloReceived::parse(
        &hello,
        &crate::proto::handshake::ServerKey::from(&x.server_static),
    )
    .map_err(|e| e.to_string())?;
    let (limit, mode) = (received.client_max_frame_len(), received.mode());
    let (s, req) = finish_handshake(c, x, hello)?;
    // A whole, validly tagged RESPONSE one byte over the limit: a client that
    // does not check the length reads and accepts it.
    let overhead = crate::proto::Body::overhead(crate::proto::FrameType::Response, mode) as u32;
    let mut payload = x.forged().into_bytes();
    payload.resize((limit + 1 - overhead) as usize, b'.');
    let fields = response_fields(req, 0, &payload);
    let _ = c.send(&forge(&s, FrameType::Response as u8, 1, &fields));
    hold(c, x)
}

/// 7.8: SEALED_HELLO answered with a validly tagged SERVER_AUTH (the other mode's type) is refused.
fn other_modes_server_auth(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    let hello = sealed_hello(c, x)?;
    let wait = HelloReceived::parse(
        &hello,
        &crate::proto::handshake::ServerKey::from(&x.server_static),
    )
    .map_err(|e| e.to_string())?;
    let mut auth = BytesMut::new();
    let wait = wait.respond_with_type_for_testing(
        Some(x.cred.key.clone()),
        SecretKey::from_bytes(random32()),
        &mut random32(),
        limits(),
        FrameType::ServerAuth,
        &mut auth,
    );
    c.send(&auth)?;
    // A client that took it goes on: its finish verifies, and its request gets
    // the honest answer.
    let Ok(Read2::Frame(finish)) = c.read(HANDSHAKE_MAX_FRAME_LEN, HOLD) else {
        return hold(c, x);
    };
    let Ok(est) = wait.handle_finish(&finish) else {
        return hold(c, x);
    };
    let mut s = est.session;
    if let Ok(Read2::Frame(f)) = c.read(65536, HOLD) {
        if open(&mut s, f).is_ok() {
            let req = s.last_received();
            answer(c, &mut s, req, x);
        }
    }
    hold(c, x)
}

/// 7.8: after ERROR MODE_REFUSED the client does not come back with HELLO (no fallback).
fn no_fallback_after_mode_refused(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    sealed_hello(c, x)?;
    c.send(&ErrorFrame::new(ErrorCode::MODE_REFUSED).encoded())?;
    let _ = c.tcp.shutdown(std::net::Shutdown::Both);
    // Any connection the client opens next, within the hold: its first frame.
    let until = Instant::now() + HOLD;
    x.listener
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let seen = loop {
        match x.listener.accept() {
            Ok((tcp, _)) => {
                tcp.set_nonblocking(false).map_err(|e| e.to_string())?;
                let mut again = Conn::new(tcp);
                break again
                    .frame(HANDSHAKE_MAX_FRAME_LEN, HOLD, "a first frame")
                    .ok();
            }
            Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    x.listener
        .set_nonblocking(false)
        .map_err(|e| e.to_string())?;
    match seen {
        Some(f) if FrameType::of(&f) == Ok(FrameType::Hello) => Err(
            "violation: after MODE_REFUSED the client came back with HELLO: a forged ERROR switches its encryption off".into(),
        ),
        _ => Ok(()),
    }
}

/// 8.2: a RESPONSE sealed under the client's nonce direction (0) is refused.
fn wrong_direction_nonce(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    in_session(c, x, |c, s, req| {
        if s.mode() != Mode::Encrypted {
            return Err("the client runs the authenticated mode: no nonce".into());
        }
        let fields = response_fields(req, 0, x.forged().as_bytes());
        let next = s.last_sent() + 1;
        c.send(&s.forge_with_nonce_for_testing(FrameType::Response as u8, next, 0, &fields))?;
        Ok(s)
    })
}

/// 8.7: a RESPONSE sealed with the key before the server's KEY_UPDATE is refused.
fn stale_key_response(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    in_session(c, x, |c, mut s, req| {
        let fields = response_fields(req, 0, x.forged().as_bytes());
        // Sealed with the current key, numbered as the frame after the update.
        let stale = s.forge_for_testing(FrameType::Response as u8, s.last_sent() + 2, &fields);
        c.send(&seal(&mut s, &Body::KeyUpdate))?;
        c.send(&stale)?;
        Ok(s)
    })
}

/// 8.5: a server that announced a 1 s keepalive and then says nothing gets a PING within 2 s.
fn keepalive_ping(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    let hello = c.frame(HANDSHAKE_MAX_FRAME_LEN, x.timeout, "HELLO")?;
    let wait = HelloReceived::parse(
        &hello,
        &crate::proto::handshake::ServerKey::from(&x.server_static),
    )
    .map_err(|e| e.to_string())?;
    let mut auth = BytesMut::new();
    let quick = ServerLimits {
        keepalive: Duration::from_secs(1),
        ..limits()
    };
    let wait = wait.respond(
        Some(x.cred.key.clone()),
        SecretKey::from_bytes(random32()),
        &mut random32(),
        quick,
        &mut auth,
    );
    c.send(&auth)?;
    let finish = c.frame(HANDSHAKE_MAX_FRAME_LEN, x.timeout, "CLIENT_FINISH")?;
    let mut s = wait
        .handle_finish(&finish)
        .map_err(|e| e.to_string())?
        .session;
    // The REQUEST (and anything else) is read and never answered.
    let until = Instant::now() + Duration::from_secs(2) + Duration::from_millis(300);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("violation: no PING within 2 s of silence from a server whose keepalive is 1 s (8.5: the client pings when it has sent or received nothing for its interval, at most the server's)".into());
        }
        match c.read(65536, left)? {
            Read2::Frame(f) => match open(&mut s, f)?.body {
                Body::Ping => return Ok(()),
                _ => continue,
            },
            Read2::Eof => return Err("violation: the client hung up instead of pinging".into()),
            Read2::Timeout => continue,
        }
    }
}

/// 8.7: an honest server that sends KEY_UPDATE before its answer: the client gets it (control).
fn honest_key_update(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    let (mut s, req) = established(c, x)?;
    c.send(&seal(&mut s, &Body::KeyUpdate))?;
    answer(c, &mut s, req, x);
    hold(c, x)
}

/// The honest server: answers the request with its payload, records frames to replay.
fn honest(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    let hello = c.frame(HANDSHAKE_MAX_FRAME_LEN, x.timeout, "HELLO")?;
    let wait = HelloReceived::parse(
        &hello,
        &crate::proto::handshake::ServerKey::from(&x.server_static),
    )
    .map_err(|e| e.to_string())?;
    let mut auth = BytesMut::new();
    let wait = wait.respond(
        Some(x.cred.key.clone()),
        SecretKey::from_bytes(random32()),
        &mut random32(),
        limits(),
        &mut auth,
    );
    x.recorded.borrow_mut().server_auth = Some(auth.to_vec());
    c.send(&auth)?;
    let finish = c.frame(HANDSHAKE_MAX_FRAME_LEN, x.timeout, "CLIENT_FINISH")?;
    let mut s = wait
        .handle_finish(&finish)
        .map_err(|e| e.to_string())?
        .session;
    let mut answered = false;
    loop {
        let f = match c.read(65536, x.timeout)? {
            Read2::Frame(f) => f,
            // Spec 8.6 asks for a CLOSE; the control only asks that the answer arrived.
            Read2::Eof if answered => return Ok(()),
            Read2::Eof => return Err("the connection ended before the client's REQUEST".into()),
            Read2::Timeout => return Err("no REQUEST (or CLOSE) from the client".into()),
        };
        match open(&mut s, f)?.body {
            Body::Request { payload } => {
                answered = true;
                let seq = s.last_received();
                let answer = seal(
                    &mut s,
                    &Body::Response {
                        req_seq: seq,
                        status: Status::OK,
                        payload,
                    },
                );
                x.recorded.borrow_mut().response = Some(answer.clone());
                c.send(&answer)?;
            }
            Body::Ping => {
                let seq = s.last_received();
                c.send(&seal(&mut s, &Body::Pong { ping_seq: seq }))?;
            }
            Body::Close { .. } => {
                c.send(&seal(
                    &mut s,
                    &Body::Close {
                        code: CloseCode::NORMAL,
                        reason: String::new(),
                    },
                ))?;
                return Ok(());
            }
            _ => {}
        }
    }
}

fn limits() -> ServerLimits {
    ServerLimits {
        max_frame_len: 65536,
        keepalive: Duration::from_secs(30),
    }
}

/// Reads the client's first frame: it must be SEALED_HELLO (the scenario is skipped for
/// a client in the authenticated mode).
fn sealed_hello(c: &mut Conn, x: &Ctx) -> Result<Bytes, String> {
    let hello = c.frame(HANDSHAKE_MAX_FRAME_LEN, x.timeout, "SEALED_HELLO")?;
    if FrameType::of(&hello) != Ok(FrameType::SealedHello) {
        return Err("the client runs the authenticated mode (it sent HELLO)".into());
    }
    Ok(hello)
}

/// Reads HELLO and builds a valid SERVER_AUTH (not sent); returns it and what follows.
fn server_auth(
    c: &mut Conn,
    x: &Ctx,
) -> Result<(Vec<u8>, crate::proto::handshake::ServerAwaitFinish), String> {
    let hello = c.frame(HANDSHAKE_MAX_FRAME_LEN, x.timeout, "HELLO")?;
    let wait = HelloReceived::parse(
        &hello,
        &crate::proto::handshake::ServerKey::from(&x.server_static),
    )
    .map_err(|e| e.to_string())?;
    let mut auth = BytesMut::new();
    let wait = wait.respond(
        Some(x.cred.key.clone()),
        SecretKey::from_bytes(random32()),
        &mut random32(),
        limits(),
        &mut auth,
    );
    Ok((auth.to_vec(), wait))
}

/// The rest of an honest handshake after `hello`, and the client's REQUEST.
fn finish_handshake(c: &mut Conn, x: &Ctx, hello: Bytes) -> Result<(Session, u64), String> {
    let wait = HelloReceived::parse(
        &hello,
        &crate::proto::handshake::ServerKey::from(&x.server_static),
    )
    .map_err(|e| e.to_string())?;
    let mut auth = BytesMut::new();
    let wait = wait.respond(
        Some(x.cred.key.clone()),
        SecretKey::from_bytes(random32()),
        &mut random32(),
        limits(),
        &mut auth,
    );
    c.send(&auth)?;
    let finish = c.frame(HANDSHAKE_MAX_FRAME_LEN, x.timeout, "CLIENT_FINISH")?;
    let mut s = wait
        .handle_finish(&finish)
        .map_err(|e| e.to_string())?
        .session;
    let f = c.frame(65536, x.timeout, "the client's REQUEST")?;
    match open(&mut s, f)?.body {
        Body::Request { .. } => {
            let seq = s.last_received();
            Ok((s, seq))
        }
        other => Err(format!("expected the client's REQUEST, got {other:?}")),
    }
}

/// An honest handshake, then the client's REQUEST: returns the session and its seq.
fn established(c: &mut Conn, x: &Ctx) -> Result<(Session, u64), String> {
    let hello = c.frame(HANDSHAKE_MAX_FRAME_LEN, x.timeout, "HELLO")?;
    finish_handshake(c, x, hello)
}

fn forged_response(req_seq: u64, x: &Ctx) -> Body {
    Body::Response {
        req_seq,
        status: Status::OK,
        payload: Bytes::from(x.forged()),
    }
}

/// An honest session up to the client's REQUEST; then `violate` sends what breaks the
/// rule and returns the session to seal the honest answer with, which follows (a client
/// that kept the session despite the violation prints it); then a moment's wait.
fn in_session(
    c: &mut Conn,
    x: &Ctx,
    violate: impl FnOnce(&mut Conn, Session, u64) -> Result<Session, String>,
) -> Result<(), String> {
    let (s, req) = established(c, x)?;
    let mut s = violate(c, s, req)?;
    answer(c, &mut s, req, x);
    hold(c, x)
}

/// How long a misbehaving server waits for what a lax client would send.
const HOLD: Duration = Duration::from_secs(2);

/// After a violation, the answer an honest server would give: a client that kept the
/// session despite the violation prints it (and fails the check). Send errors are
/// expected (a conformant client has closed) and ignored.
fn answer(c: &mut Conn, s: &mut Session, req: u64, x: &Ctx) {
    let body = Body::Response {
        req_seq: req,
        status: Status::OK,
        payload: Bytes::from(x.payload.clone()),
    };
    let mut out = BytesMut::new();
    if s.seal(&body, &mut out).is_ok() {
        let _ = c.send(&out);
    }
}

/// Keeps the connection open a moment (a client that accepted would answer or exit),
/// then closes it.
fn hold(c: &mut Conn, x: &Ctx) -> Result<(), String> {
    let _ = c.read(65536, x.timeout.min(Duration::from_secs(2)))?;
    Ok(())
}

#[derive(Clone, Copy)]
enum Enroll {
    Honest,
    WrongKey,
    BadDone,
}

/// Runs the enrollment command once against this tool's enrollment server.
fn enrollment(t: &Target, cmd: &str, how: Enroll) -> Result<Outcome, String> {
    let pinned = ServerParams {
        static_secret: StaticSecret::from(random32()),
        allow_open: true,
    };
    let other = ServerParams {
        static_secret: StaticSecret::from(random32()),
        allow_open: true,
    };
    let ek = SecretKey::from_bytes(random32());
    let token = EnrollmentToken {
        mode: EnrollMode::Open,
        credential: ek.clone(),
        server_static: pinned.static_public(),
    };
    let id = fresh_id("conformance-enroll");
    let out = t.dir.join(format!("{id}.cred"));
    let addr = t.listener.local_addr().expect("bound").to_string();
    let cmd = cmd
        .replace("{server}", &shell_quote(&addr))
        .replace("{id}", &shell_quote(id.as_str()))
        .replace("{out}", &shell_quote(&out.display().to_string()));
    let mut child = spawn(&cmd, &[], Some(&token.encode()))?;
    let served = accept_one(&t.listener, &mut child, t.timeout).and_then(|tcp| {
        let mut c = Conn::new(tcp);
        let init = c.frame(HANDSHAKE_MAX_FRAME_LEN, t.timeout, "ENROLL_INIT")?;
        let params = if matches!(how, Enroll::WrongKey) {
            &other
        } else {
            &pinned
        };
        let mut reply = BytesMut::new();
        let wait = ServerAwaitConfirm::handle_init(
            params,
            &init,
            |_, _| ek.clone(),
            random32(),
            &mut reply,
        )
        .map_err(|e| format!("ENROLL_INIT: {e}"))?;
        c.send(&reply)?;
        if matches!(how, Enroll::WrongKey) {
            // The client must stop: an ENROLL_CONFIRM means it went on without the
            // server proving it holds the pinned key.
            return match c.read(HANDSHAKE_MAX_FRAME_LEN, HOLD) {
                Ok(Read2::Frame(_)) => Ok(Some(None)),
                _ => Ok(None),
            };
        }
        let confirm = c.frame(HANDSHAKE_MAX_FRAME_LEN, t.timeout, "ENROLL_CONFIRM")?;
        let pending = wait
            .handle_confirm(&confirm)
            .map_err(|e| format!("ENROLL_CONFIRM: {e}"))?;
        let key = pending.identity_key().clone();
        let mut done = BytesMut::new();
        pending.committed(&mut done);
        if matches!(how, Enroll::BadDone) {
            let last = done.len() - 1;
            done[last] ^= 1;
        }
        c.send(&done)?;
        let _ = c.read(HANDSHAKE_MAX_FRAME_LEN, HOLD);
        Ok(Some(Some(key)))
    });
    let (code, _stdout, stderr) = finish(child, t.timeout);
    let stored = std::fs::read_to_string(&out).ok();
    let said = || format!("exit {code:?}, stderr {:?}", last_line(&stderr));
    match how {
        Enroll::Honest => {
            let key = served.map_err(|e| {
                format!(
                    "this tool, as the honest server: {e}; the client: {}",
                    said()
                )
            })?;
            let text = stored
                .ok_or_else(|| format!("no credential written to {}: {}", out.display(), said()))?;
            let cred =
                Credential::from_file(&text).map_err(|e| format!("the credential written: {e}"))?;
            let key = key.flatten().expect("the honest enrollment derives a key");
            if code != Some(0) {
                Err(format!("the client failed: {}", said()))
            } else if cred.id != id || !cred.key.ct_eq(&key) {
                Err("the credential's id or key is not the one the server derived".into())
            } else {
                Ok(Outcome::Pass)
            }
        }
        Enroll::WrongKey | Enroll::BadDone => {
            let went_on = matches!(served, Ok(Some(None)));
            if let Err(e) = served {
                return Ok(Outcome::Skip(format!(
                    "the scenario could not be played: {e}"
                )));
            }
            if went_on {
                Err("accepted: the client sent ENROLL_CONFIRM after an ENROLL_REPLY that does not verify".into())
            } else if code.is_none() {
                Err("the client hung".into())
            } else if code == Some(0) || stored.is_some() {
                Err(format!(
                    "accepted: a credential was stored or the client succeeded ({})",
                    said()
                ))
            } else {
                Ok(Outcome::Pass)
            }
        }
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn last_line(s: &str) -> &str {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

fn spawn(cmd: &str, env: &[(&str, &str)], stdin: Option<&str>) -> Result<Child, String> {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new("sh");
    // Its own process group: a client killed for hanging takes its children with it
    // (a grandchild holding the pipes would keep `wait_with_output` waiting).
    c.args(["-c", cmd])
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().map_err(|e| format!("cannot run `{cmd}`: {e}"))?;
    let mut input = child.stdin.take().expect("piped");
    if let Some(text) = stdin {
        let _ = input.write_all(text.as_bytes());
    }
    drop(input);
    Ok(child)
}

/// The client's connection, unless it exits first or `timeout` passes.
fn accept_one(
    listener: &TcpListener,
    child: &mut Child,
    timeout: Duration,
) -> Result<std::net::TcpStream, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((tcp, _)) => {
                tcp.set_nonblocking(false).map_err(|e| e.to_string())?;
                return Ok(tcp);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.to_string()),
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the client exited ({status}) without connecting"));
        }
        if Instant::now() > deadline {
            return Err("the client did not connect".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for the client (killing it after `timeout`): exit code (None if killed),
/// stdout, stderr.
fn finish(mut child: Child, timeout: Duration) -> (Option<i32>, String, String) {
    let deadline = Instant::now() + timeout;
    let mut killed = false;
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.kill();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output();
    match out {
        Ok(o) => (
            if killed { None } else { o.status.code() },
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (None, String::new(), e.to_string()),
    }
}
