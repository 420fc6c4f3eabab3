//! Operator commands of `tallyd` that work whether or not the daemon runs: they use the
//! state directory's keys and store directly, and the control socket to reach a
//! running daemon.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use zeroize::Zeroizing;

use crate::control::{self, ControlError, ControlRequest, ControlResponse};
use crate::proto::Id;
use crate::secrets::ServerSecrets;
use crate::store::{Store, DB_FILE};
use crate::tokens::{check_lifetime, issue_token_in, open_token_in, IssuedToken, TokenError};

/// An admin command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// Keys could not be loaded.
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The id is invalid (the message says so: "invalid identity: ...").
    #[error(transparent)]
    Id(#[from] crate::proto::FrameError),
    /// The daemon could not be reached or answered an error.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// An argument is out of range.
    #[error("{0}")]
    Invalid(String),
    /// A token could not be made.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// `init` beside a running daemon.
    #[error("a tallyd runs with state directory {0} and has its keys already: `tallyd init` would make other keys beside them, whose tokens it would refuse. Admin commands (`tallyd token`, `identities`, ...) work through the running daemon without key files")]
    Running(PathBuf),
    /// A daemon holds the state directory but does not answer on its control socket.
    #[error("a tallyd holds state directory {0} but does not answer on its control socket (starting, stopping, or its socket was removed): retry, or restart it. Identities are not changed behind a running daemon: its sessions and its key index would not see it")]
    Unreachable(PathBuf),
}

/// Loads the keys of an initialised state directory.
fn secrets(state_dir: &Path, creds: Option<&Path>) -> Result<ServerSecrets, AdminError> {
    Ok(ServerSecrets::load(state_dir, creds, false)?)
}

/// Creates the state directory, keys and store (at `store`, its password perhaps in
/// `password_file`: `store_password_file`) if missing. Returns whether keys were created.
pub fn init(
    state_dir: &Path,
    creds: Option<&Path>,
    store: &crate::store::Location,
    password_file: Option<&Path>,
) -> Result<bool, AdminError> {
    // A daemon that runs has its keys (perhaps from systemd credentials, out of this
    // shell's sight): keys made here would be others, and tokens made with them refused.
    if crate::secrets::state_dir_in_use(state_dir) {
        return Err(AdminError::Running(state_dir.to_owned()));
    }
    let s = ServerSecrets::load(state_dir, creds, true)?;
    let passwords = crate::store::pgconf::PasswordSources {
        credentials_dir: creds,
        password_file,
    };
    Store::open_at(store, s.store_key.clone(), passwords)?;
    Ok(s.created)
}

fn open_store(
    state_dir: &Path,
    creds: Option<&Path>,
) -> Result<(ServerSecrets, Store), AdminError> {
    let s = secrets(state_dir, creds)?;
    let store = Store::open(&state_dir.join(DB_FILE), s.store_key.clone())?;
    Ok((s, store))
}

fn server_static(s: &ServerSecrets) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&s.static_secret).to_bytes()
}

/// The open enrollment token (spec 9.1): the open key `EK` and the server's public key.
/// With `rotate`, a new open key replaces the old one first, and every open token
/// handed out before stops working. Through the running daemon if there is one (an
/// operator's shell need not hold the daemon's keys), else in the state directory.
pub fn open_token(
    state_dir: &Path,
    creds: Option<&Path>,
    rotate: bool,
) -> Result<OpenToken, AdminError> {
    match via_daemon(state_dir, &ControlRequest::OpenToken { rotate })? {
        Some(ControlResponse::Token { token, open, .. }) => Ok(OpenToken {
            token: Zeroizing::new(token),
            open,
        }),
        Some(other) => Err(unexpected(state_dir, other)),
        None => {
            let (s, store) = open_store(state_dir, creds)?;
            Ok(OpenToken {
                token: open_token_in(&store, server_static(&s), rotate)?,
                open: None,
            })
        }
    }
}

/// The open token, and whether the running daemon accepts it (`None`: no daemon
/// answered, its configuration decides).
#[derive(Debug)]
pub struct OpenToken {
    /// The token text (a secret).
    pub token: Zeroizing<String>,
    /// Whether open enrollment is on in the running daemon (or its fleet).
    pub open: Option<bool>,
}

/// Issues a single-use token that can enroll only `id`, valid for `lifetime`; a token
/// issued for `id` before stops working. Through the running daemon if there is one.
pub fn issue_token(
    state_dir: &Path,
    creds: Option<&Path>,
    id: &str,
    lifetime: Duration,
) -> Result<IssuedToken, AdminError> {
    check_lifetime(lifetime)?;
    let req = ControlRequest::IssueToken {
        id: Id::new(id)?.to_string(),
        lifetime_secs: lifetime.as_secs(),
    };
    match via_daemon(state_dir, &req)? {
        Some(ControlResponse::Token {
            token,
            expires: Some(expires),
            replaced,
            ..
        }) => Ok(IssuedToken {
            token: Zeroizing::new(token),
            expires,
            replaced,
        }),
        Some(other) => Err(unexpected(state_dir, other)),
        None => {
            let (s, store) = open_store(state_dir, creds)?;
            Ok(issue_token_in(&store, server_static(&s), id, lifetime)?)
        }
    }
}

/// Revokes the outstanding token of `id`. Returns whether there was one. Through the
/// running daemon if there is one.
pub fn revoke_token(state_dir: &Path, creds: Option<&Path>, id: &str) -> Result<bool, AdminError> {
    let id = Id::new(id)?;
    let req = ControlRequest::RevokeToken { id: id.to_string() };
    match via_daemon(state_dir, &req)? {
        Some(ControlResponse::TokenRevoked { existed }) => Ok(existed),
        Some(other) => Err(unexpected(state_dir, other)),
        None => Ok(open_store(state_dir, creds)?.1.revoke_token(id.as_str())?),
    }
}

/// The outstanding per-identity tokens. Through the running daemon if there is one.
pub fn token_rows(
    state_dir: &Path,
    creds: Option<&Path>,
) -> Result<Vec<crate::store::TokenRow>, AdminError> {
    match via_daemon(state_dir, &ControlRequest::Tokens)? {
        Some(ControlResponse::Tokens { tokens }) => Ok(tokens),
        Some(other) => Err(unexpected(state_dir, other)),
        None => Ok(open_store(state_dir, creds)?.1.tokens()?),
    }
}

/// How a listing is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Aligned columns for a person.
    #[default]
    Table,
    /// One JSON array of objects, for scripts: the keys are stable (documented in the
    /// README) and times are seconds since the Unix epoch (`null` for never).
    Json,
}

fn to_json<T: serde::Serialize>(rows: &[T]) -> String {
    let mut out = serde_json::to_string_pretty(rows).expect("rows serialize");
    out.push('\n');
    out
}

/// A token in `tallyd tokens --json`.
#[derive(serde::Serialize)]
struct TokenJson<'a> {
    id: &'a str,
    issued: i64,
    expires: i64,
    /// `valid` or `expired`.
    state: &'a str,
}

/// The outstanding tokens: id, issued, expires, state.
pub fn tokens(
    state_dir: &Path,
    creds: Option<&Path>,
    format: Format,
) -> Result<String, AdminError> {
    let rows = token_rows(state_dir, creds)?;
    let now = crate::store::now();
    let state = |r: &crate::store::TokenRow| if r.expires <= now { "expired" } else { "valid" };
    if format == Format::Json {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| TokenJson {
                id: &r.id,
                issued: r.issued,
                expires: r.expires,
                state: state(r),
            })
            .collect();
        return Ok(to_json(&rows));
    }
    let mut out = String::new();
    let _ = writeln!(out, "{:<24} {:<20} {:<20} STATE", "ID", "ISSUED", "EXPIRES");
    for r in &rows {
        let _ = writeln!(
            out,
            "{:<24} {:<20} {:<20} {}",
            r.id,
            time(Some(r.issued)),
            time(Some(r.expires)),
            state(r)
        );
    }
    Ok(out)
}

/// Parses a duration such as `90s`, `30m`, `12h`, `3d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (examples: 90s, 30m, 12h, 3d)"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use s, m, h or d)"
            ))
        }
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// A time (seconds since the Unix epoch) as `YYYY-MM-DD HH:MM:SS` in UTC.
pub fn format_time(t: i64) -> String {
    time(Some(t))
}

fn time(t: Option<i64>) -> String {
    match t {
        None => "-".into(),
        Some(secs) => {
            let days = secs.div_euclid(86_400);
            let rem = secs.rem_euclid(86_400);
            let (y, m, d) = civil_from_days(days);
            format!(
                "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
                rem / 3600,
                rem % 3600 / 60,
                rem % 60
            )
        }
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The identity table: id, mode, created, last seen, revoked, online (UTC times).
pub fn identities(
    state_dir: &Path,
    creds: Option<&Path>,
    format: Format,
) -> Result<String, AdminError> {
    // Through the running daemon if there is one (with who is online), else the store.
    let (rows, online): (_, Option<HashMap<String, String>>) =
        match via_daemon(state_dir, &ControlRequest::Identities)? {
            Some(ControlResponse::Identities {
                identities,
                sessions,
            }) => (
                identities,
                Some(sessions.into_iter().map(|s| (s.id, s.peer)).collect()),
            ),
            Some(other) => return Err(unexpected(state_dir, other)),
            None => (open_store(state_dir, creds)?.1.list()?, None),
        };
    if format == Format::Json {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                let peer = online.as_ref().and_then(|m| m.get(&r.id));
                IdentityJson {
                    id: &r.id,
                    mode: &r.mode,
                    created: r.created,
                    last_seen: r.last_seen,
                    revoked: r.revoked,
                    online: online.as_ref().map(|_| peer.is_some()),
                    peer: peer.map(String::as_str),
                    queued: r.queued,
                }
            })
            .collect();
        return Ok(to_json(&rows));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<6} {:<20} {:<20} {:<20} {:<7} ONLINE",
        "ID", "MODE", "CREATED", "LAST SEEN", "REVOKED", "QUEUED"
    );
    for r in &rows {
        let on = match &online {
            None => "?".to_owned(),
            Some(map) => map
                .get(&r.id)
                .map_or("no".to_owned(), |peer| format!("yes ({peer})")),
        };
        let _ = writeln!(
            out,
            "{:<24} {:<6} {:<20} {:<20} {:<20} {:<7} {on}",
            r.id,
            r.mode,
            time(Some(r.created)),
            time(r.last_seen),
            time(r.revoked),
            r.queued
        );
    }
    if online.is_none() {
        out.push_str("(ONLINE is ? because tallyd is not running)\n");
    }
    Ok(out)
}

/// An identity in `tallyd identities --json`.
#[derive(serde::Serialize)]
struct IdentityJson<'a> {
    id: &'a str,
    /// `open` or `token`: how it enrolled.
    mode: &'a str,
    created: i64,
    last_seen: Option<i64>,
    revoked: Option<i64>,
    /// `null` when tallyd is not running (not known).
    online: Option<bool>,
    /// The live session's address, if online.
    peer: Option<&'a str>,
    /// Messages queued for it.
    queued: u64,
}

/// The live sessions: id, peer, since, frames in and out.
pub fn sessions(state_dir: &Path, format: Format) -> Result<String, AdminError> {
    let sessions = match control::call(state_dir, &ControlRequest::Sessions)? {
        ControlResponse::Sessions { sessions } => sessions,
        other => return Err(unexpected(state_dir, other)),
    };
    if format == Format::Json {
        return Ok(to_json(&sessions));
    }
    let mut out = String::new();
    // In a fleet, the node holding each session; frames are counted by that node (shown
    // for this one's sessions only).
    let fleet = sessions.iter().any(|s| s.node.is_some());
    let _ = write!(
        out,
        "{:<24} {:<22} {:<20} {:>10} {:>10}",
        "ID", "PEER", "SINCE", "FRAMES IN", "FRAMES OUT"
    );
    out.push_str(if fleet { "  NODE\n" } else { "\n" });
    for s in sessions {
        let since = time(Some(s.since as i64));
        let (fin, fout) = if s.elsewhere {
            ("-".to_owned(), "-".to_owned())
        } else {
            (s.frames_in.to_string(), s.frames_out.to_string())
        };
        let _ = write!(
            out,
            "{:<24} {:<22} {:<20} {:>10} {:>10}",
            s.id, s.peer, since, fin, fout
        );
        match &s.node {
            Some(node) => {
                let _ = writeln!(out, "  {node}");
            }
            None => out.push('\n'),
        }
    }
    Ok(out)
}

fn unexpected(state_dir: &Path, got: ControlResponse) -> AdminError {
    let message = match got {
        ControlResponse::Error { message } => message,
        other => format!("unexpected answer {other:?}"),
    };
    ControlError::Failed {
        path: state_dir.join(control::SOCKET),
        message,
    }
    .into()
}

/// The running daemon's status (`tallyd status`): for a person, aligned `key: value`
/// lines; with `Json`, one object of typed fields ([`crate::server::status::Status`],
/// documented in the README). The raw metrics are `metrics_listen`'s.
pub fn status(state_dir: &Path, format: Format) -> Result<String, AdminError> {
    let status = match control::call(state_dir, &ControlRequest::Status)? {
        ControlResponse::Status { status } => status,
        other => return Err(unexpected(state_dir, other)),
    };
    if format == Format::Json {
        let mut out = serde_json::to_string_pretty(&status).expect("status serializes");
        out.push('\n');
        return Ok(out);
    }
    Ok(status_lines(&status))
}

/// A duration in seconds as `3d 4h 5m 6s` (leading zero units left out).
fn span(secs: u64) -> String {
    let units = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let mut out = Vec::new();
    let mut rest = secs;
    for (size, unit) in units {
        let n = rest / size;
        rest %= size;
        if n > 0 || !out.is_empty() || size == 1 {
            out.push(format!("{n}{unit}"));
        }
    }
    out.join(" ")
}

/// `tallyd status` for a person.
fn status_lines(s: &crate::server::status::Status) -> String {
    let mut lines: Vec<(&str, String)> = vec![
        ("version", format!("{} (pid {})", s.version, s.pid)),
        (
            "uptime",
            format!(
                "{} (since {} UTC)",
                span(s.uptime_seconds),
                time(Some(s.started))
            ),
        ),
        (
            "listen",
            if s.listen.is_empty() {
                "-".to_owned()
            } else {
                s.listen.join(", ")
            },
        ),
        (
            "metrics",
            s.metrics_listen
                .as_ref()
                .map_or("off (metrics_listen)".to_owned(), |a| {
                    format!("http://{a}/metrics")
                }),
        ),
        ("state directory", s.state_dir.clone()),
        ("store", format!("{} {}", s.store.kind, s.store.location)),
    ];
    if let Some(fleet) = &s.fleet {
        let fenced = if fleet.fenced {
            " (FENCED: it cannot renew its heartbeat, and serves no handshake)"
        } else {
            ""
        };
        lines.push(("fleet node", format!("{}{fenced}", fleet.node)));
    }
    let on = if s.open_enrollment.on { "on" } else { "off" };
    let by = if s.open_enrollment.decided_by == "fleet" {
        "the fleet's setting: tallyd open-enrollment"
    } else {
        "open_enrollment in the configuration"
    };
    lines.extend([
        ("open enrollment", format!("{on} ({by})")),
        ("backend", s.backend.clone()),
        ("takeover", s.takeover.clone()),
        (
            "identities",
            s.identities
                .map_or("? (the store did not answer)".to_owned(), |n| n.to_string()),
        ),
        ("sessions", s.sessions.to_string()),
        (
            "connections",
            format!(
                "{} (of limits.max_connections {})",
                s.connections.open, s.connections.max
            ),
        ),
        ("unauthenticated", s.connections.unauthenticated.to_string()),
        (
            "enrolling now",
            s.connections.enrollments_in_progress.to_string(),
        ),
        (
            "delayed refusals",
            s.connections.delayed_refusals.to_string(),
        ),
        ("enrollments", s.enrollments.to_string()),
        ("handshakes", s.handshakes.to_string()),
    ]);
    let total: u64 = s.refusals.values().sum();
    let by_kind: Vec<String> = s.refusals.iter().map(|(k, n)| format!("{k} {n}")).collect();
    lines.push((
        "refusals",
        if by_kind.is_empty() {
            "0".to_owned()
        } else {
            format!("{total} ({})", by_kind.join(", "))
        },
    ));
    let r = &s.requests;
    let sr = &s.server_requests;
    lines.extend([
        ("evictions", s.evictions.to_string()),
        (
            "requests",
            format!(
                "{} (ok {}, error {}, timeout {}, panic {})",
                r.ok + r.error + r.timeout + r.panic,
                r.ok,
                r.error,
                r.timeout,
                r.panic
            ),
        ),
        (
            "server requests",
            format!(
                "{} sent, {} answered, {} waiting; {} messages",
                sr.sent, sr.answered, sr.waiting, sr.messages
            ),
        ),
        (
            "frames",
            format!("{} in, {} out", s.frames.received, s.frames.sent),
        ),
        (
            "bytes",
            format!("{} in, {} out", s.bytes.received, s.bytes.sent),
        ),
    ]);
    if s.store.kind == "postgres" {
        lines.push(("store queries", s.store_queries.to_string()));
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (key, value) in lines {
        let _ = writeln!(out, "{:<width$} {value}", format!("{key}:"));
    }
    out
}

/// Sends a REQUEST (returning the device's status and payload) or a MESSAGE to a
/// connected device through the running daemon.
pub fn send(
    state_dir: &Path,
    id: &str,
    request: bool,
    payload: &[u8],
    timeout: std::time::Duration,
) -> Result<Option<(crate::proto::Status, Vec<u8>)>, AdminError> {
    let id = Id::new(id)?;
    let req = ControlRequest::Send {
        id: id.to_string(),
        request,
        payload_hex: hex::encode(payload),
        timeout_secs: timeout.as_secs_f64(),
    };
    match control::call(state_dir, &req)? {
        ControlResponse::Answer {
            status,
            payload_hex,
        } => {
            let payload = hex::decode(payload_hex).map_err(|e| {
                unexpected(
                    state_dir,
                    ControlResponse::Error {
                        message: e.to_string(),
                    },
                )
            })?;
            Ok(Some((crate::proto::Status(status), payload)))
        }
        ControlResponse::Sent => Ok(None),
        other => Err(unexpected(state_dir, other)),
    }
}

/// A queued message's fate, as `tallyd send --queue` reports it.
#[derive(Debug, PartialEq, Eq)]
pub enum QueuedSend {
    /// Stored; no outcome yet (none asked for, or none within the wait).
    Queued(u64),
    /// The device acknowledged it: its status and answer.
    Acknowledged(u64, crate::proto::Status, Vec<u8>),
    /// It ended without the device: `expired`, `purged` or `undeliverable`, and why.
    Failed(u64, String, Option<String>),
}

/// Queues a REQUEST or MESSAGE for a device through the running daemon (spec 8.8);
/// with `wait`, waits that long for its outcome.
pub fn enqueue(
    state_dir: &Path,
    id: &str,
    request: bool,
    payload: &[u8],
    ttl: Option<std::time::Duration>,
    wait: Option<std::time::Duration>,
) -> Result<QueuedSend, AdminError> {
    let id = Id::new(id)?;
    let req = ControlRequest::Enqueue {
        id: id.to_string(),
        request,
        payload_hex: hex::encode(payload),
        ttl_secs: ttl.map(|t| t.as_secs_f64()),
        wait_secs: wait.map(|w| w.as_secs_f64()),
    };
    match control::call(state_dir, &req)? {
        ControlResponse::Queued { msg_id } => Ok(QueuedSend::Queued(msg_id)),
        ControlResponse::Delivered {
            msg_id,
            outcome,
            status,
            payload_hex,
            reason,
        } => match (outcome.as_str(), status) {
            ("acknowledged", Some(status)) => {
                let payload = hex::decode(payload_hex.unwrap_or_default()).map_err(|e| {
                    unexpected(
                        state_dir,
                        ControlResponse::Error {
                            message: e.to_string(),
                        },
                    )
                })?;
                Ok(QueuedSend::Acknowledged(
                    msg_id,
                    crate::proto::Status(status),
                    payload,
                ))
            }
            _ => Ok(QueuedSend::Failed(msg_id, outcome, reason)),
        },
        other => Err(unexpected(state_dir, other)),
    }
}

/// The messages queued for `id` (`tallyd queue ID`), as a table or JSON.
pub fn queue(state_dir: &Path, id: &str, format: Format) -> Result<String, AdminError> {
    let id = Id::new(id)?;
    let messages = match control::call(state_dir, &ControlRequest::Queue { id: id.to_string() })? {
        ControlResponse::QueueList { messages } => messages,
        other => return Err(unexpected(state_dir, other)),
    };
    if format == Format::Json {
        return Ok(to_json(&messages));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:<8} {:<9} {:<20} {:<20} FROM",
        "MSG", "KIND", "BYTES", "QUEUED", "EXPIRES"
    );
    for m in &messages {
        let from = match m.origin {
            crate::store::queue::Origin::Control => "control",
            crate::store::queue::Origin::Backend => "backend",
        };
        let _ = writeln!(
            out,
            "{:<10} {:<8} {:<9} {:<20} {:<20} {from}",
            m.msg_id,
            m.kind,
            m.bytes,
            time(Some(m.queued)),
            time(Some(m.expires))
        );
    }
    Ok(out)
}

/// Withdraws message `msg_id` queued for `id`, or all of them; how many went.
pub fn purge(state_dir: &Path, id: &str, msg_id: Option<u64>) -> Result<usize, AdminError> {
    let id = Id::new(id)?;
    let req = ControlRequest::Purge {
        id: id.to_string(),
        msg_id,
    };
    match control::call(state_dir, &req)? {
        ControlResponse::Purged { count } => Ok(count),
        other => Err(unexpected(state_dir, other)),
    }
}

/// What `revoke` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Revoked {
    /// False if the identity was already revoked.
    pub newly: bool,
    /// Whether a live session was closed; `None` if the daemon is not running.
    pub session_closed: Option<bool>,
    /// In a fleet: which nodes confirmed the revocation.
    pub fleet: Option<control::FleetConfirmation>,
}

/// Asks the running daemon to do `req` (it changes the store, refuses handshakes in
/// flight for the id, and closes its live session). `None` if no daemon runs.
fn via_daemon(
    state_dir: &Path,
    req: &ControlRequest,
) -> Result<Option<ControlResponse>, AdminError> {
    match control::call(state_dir, req) {
        Ok(r @ ControlResponse::Error { .. }) => Err(unexpected(state_dir, r)),
        Ok(r) => Ok(Some(r)),
        Err(ControlError::NotRunning(_)) if crate::secrets::state_dir_in_use(state_dir) => {
            Err(AdminError::Unreachable(state_dir.to_owned()))
        }
        Err(ControlError::NotRunning(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether open enrollment is on (and whether a fleet decides it); with `set`, turns it
/// on or off for the whole fleet first. Through the running daemon only.
pub fn open_enrollment(state_dir: &Path, set: Option<bool>) -> Result<(bool, bool), AdminError> {
    match control::call(state_dir, &ControlRequest::OpenEnrollment { set })? {
        ControlResponse::OpenEnrollment { open, fleet } => Ok((open, fleet)),
        other => Err(unexpected(state_dir, other)),
    }
}

/// Deletes `id` from the store, so that its id can be enrolled again. Through the
/// running daemon if there is one (which also closes its live session and refuses its
/// handshakes in flight). Returns (whether it existed, whether a session was closed;
/// `None` if the daemon is not running; in a fleet, which nodes confirmed it).
pub fn remove(
    state_dir: &Path,
    creds: Option<&Path>,
    id: &str,
) -> Result<(bool, Option<bool>, Option<control::FleetConfirmation>), AdminError> {
    let id = Id::new(id)?;
    let req = ControlRequest::Remove { id: id.to_string() };
    match via_daemon(state_dir, &req)? {
        Some(ControlResponse::Removed {
            existed,
            was_live,
            fleet,
        }) => Ok((existed, Some(was_live), fleet)),
        Some(other) => Err(unexpected(state_dir, other)),
        None => {
            let (_, store) = open_store(state_dir, creds)?;
            Ok((store.remove(id.as_str())?, None, None))
        }
    }
}

/// Revokes `id`: refused from now on, its key erased, its live session closed. Through
/// the running daemon if there is one.
pub fn revoke(state_dir: &Path, creds: Option<&Path>, id: &str) -> Result<Revoked, AdminError> {
    let id = Id::new(id)?;
    let req = ControlRequest::Revoke { id: id.to_string() };
    match via_daemon(state_dir, &req)? {
        Some(ControlResponse::Revoked {
            newly,
            was_live,
            fleet,
        }) => Ok(Revoked {
            newly,
            session_closed: Some(was_live),
            fleet,
        }),
        Some(other) => Err(unexpected(state_dir, other)),
        None => {
            let (_, store) = open_store(state_dir, creds)?;
            Ok(Revoked {
                newly: store.revoke(id.as_str())?,
                session_closed: None,
                fleet: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::credential::EnrollmentToken;
    use crate::proto::frame::EnrollMode;

    #[test]
    fn dates_format_as_utc() {
        assert_eq!(time(Some(0)), "1970-01-01 00:00:00");
        assert_eq!(time(Some(951_782_400)), "2000-02-29 00:00:00");
        assert_eq!(time(Some(1_795_000_000)), "2026-11-18 11:06:40");
        assert_eq!(time(None), "-");
    }

    #[test]
    fn tokens_from_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Location::Sqlite(dir.path().join(DB_FILE));
        assert!(init(dir.path(), None, &store, None).unwrap());
        assert!(!init(dir.path(), None, &store, None).unwrap());
        let open =
            EnrollmentToken::parse(&open_token(dir.path(), None, false).unwrap().token).unwrap();
        let day = Duration::from_secs(86_400);
        let per = issue_token(dir.path(), None, "dev-1", day).unwrap();
        let per = EnrollmentToken::parse(&per.token).unwrap();
        assert_eq!(open.mode, EnrollMode::Open);
        assert_eq!(per.mode, EnrollMode::Token);
        assert_eq!(open.server_static, per.server_static);
        assert!(!open.credential.ct_eq(&per.credential));
        assert!(issue_token(dir.path(), None, "bad id", day).is_err());
        assert!(issue_token(dir.path(), None, "dev-2", Duration::ZERO).is_err());
        let rotated =
            EnrollmentToken::parse(&open_token(dir.path(), None, true).unwrap().token).unwrap();
        assert!(!rotated.credential.ct_eq(&open.credential));
        let again =
            EnrollmentToken::parse(&open_token(dir.path(), None, false).unwrap().token).unwrap();
        assert!(again.credential.ct_eq(&rotated.credential));
        assert_eq!(token_rows(dir.path(), None).unwrap().len(), 1);
        assert!(tokens(dir.path(), None, Format::Table)
            .unwrap()
            .contains("dev-1"));
        assert!(revoke_token(dir.path(), None, "dev-1").unwrap());
        assert!(token_rows(dir.path(), None).unwrap().is_empty());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("12h").unwrap(), Duration::from_secs(43_200));
        assert_eq!(parse_duration("3d").unwrap(), Duration::from_secs(259_200));
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
