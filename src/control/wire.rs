//! The control socket's protocol: one JSON object per line in each direction, one
//! request per connection; and the admin side's call.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::server::registry::SessionInfo;

/// File name of the control socket in the state directory.
pub const SOCKET: &str = "tallyd.sock";
/// Longest request or response line.
pub(super) const MAX_LINE: u64 = 1 << 20;

/// A request to the daemon.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// List live sessions.
    Sessions,
    /// Revoke an identity in the store, refuse its handshakes in flight, close its session.
    Revoke {
        /// The identity.
        id: String,
    },
    /// Delete an identity from the store, refuse its handshakes in flight, close its session.
    Remove {
        /// The identity.
        id: String,
    },
    /// Close an identity's live session with a code.
    Close {
        /// The identity.
        id: String,
        /// The CLOSE code.
        code: u16,
    },
    /// The open enrollment token; with `rotate`, a new open key first.
    OpenToken {
        /// Replace the open key (every open token handed out before stops working).
        rotate: bool,
    },
    /// Issue a single-use token for one identity.
    IssueToken {
        /// The identity it may enroll.
        id: String,
        /// How long it is valid, in seconds.
        lifetime_secs: u64,
    },
    /// Withdraw an identity's outstanding token.
    RevokeToken {
        /// The identity.
        id: String,
    },
    /// List the outstanding per-identity tokens.
    Tokens,
    /// List the identities, and the live sessions.
    Identities,
    /// What the daemon is and what it counted (`tallyd status`).
    Status,
    /// Whether open enrollment is on; with `set`, turn it on or off for the whole fleet
    /// first (a fleet-wide setting, in the fleet's log).
    OpenEnrollment {
        /// On or off, for the fleet.
        set: Option<bool>,
    },
    /// Send a REQUEST (and wait for the device's RESPONSE) or a MESSAGE to a device.
    Send {
        /// The identity.
        id: String,
        /// `true`: REQUEST; `false`: MESSAGE.
        request: bool,
        /// The payload, hex-encoded.
        payload_hex: String,
        /// How long to wait for the device, in seconds.
        timeout_secs: f64,
    },
    /// Queue a REQUEST or MESSAGE for a device, durably (spec 8.8): delivered whenever
    /// it holds a session, until it acknowledges or the message expires.
    Enqueue {
        /// The identity.
        id: String,
        /// `true`: a queued request (the device's answer is the outcome); `false`: a
        /// queued message.
        request: bool,
        /// The payload, hex-encoded.
        payload_hex: String,
        /// How long it may wait for the device, in seconds (default
        /// `limits.queue_ttl`, at most `limits.queue_max_ttl`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_secs: Option<f64>,
        /// Wait this long for the outcome before answering (default: answer once it
        /// is stored).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait_secs: Option<f64>,
    },
    /// The messages queued for a device.
    Queue {
        /// The identity.
        id: String,
    },
    /// Withdraw a queued message, or all of a device's.
    Purge {
        /// The identity.
        id: String,
        /// One message; all if absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        msg_id: Option<u64>,
    },
}

/// The daemon's answer.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlResponse {
    /// Live sessions.
    Sessions {
        /// One per identity.
        sessions: Vec<SessionInfo>,
    },
    /// The identity was revoked.
    Revoked {
        /// False if it was revoked already.
        newly: bool,
        /// Whether a live session was asked to close.
        was_live: bool,
        /// In a fleet: its nodes, and those that have not confirmed the entry yet.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fleet: Option<FleetConfirmation>,
    },
    /// The identity was removed.
    Removed {
        /// Whether there was one.
        existed: bool,
        /// Whether a live session was asked to close.
        was_live: bool,
        /// In a fleet: its nodes, and those that have not confirmed the entry yet.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fleet: Option<FleetConfirmation>,
    },
    /// Whether a live session was asked to close.
    Closed {
        /// There was one.
        was_live: bool,
    },
    /// The device answered a REQUEST.
    Answer {
        /// RESPONSE status.
        status: u16,
        /// RESPONSE payload, hex-encoded.
        payload_hex: String,
    },
    /// A MESSAGE was written to the device's session.
    Sent,
    /// A message was queued (on disk); with a wait, it had no outcome within it.
    Queued {
        /// Its message id.
        msg_id: u64,
    },
    /// A queued message's outcome.
    Delivered {
        /// Its message id.
        msg_id: u64,
        /// `acknowledged`, `expired`, `purged` or `undeliverable`.
        outcome: String,
        /// The device's ACK status (acknowledged).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
        /// The device's answer, hex-encoded (acknowledged).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payload_hex: Option<String>,
        /// Why (undeliverable).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A device's queued messages, oldest first.
    QueueList {
        /// The messages.
        messages: Vec<crate::store::queue::Listed>,
    },
    /// Queued messages withdrawn.
    Purged {
        /// How many.
        count: usize,
    },
    /// An enrollment token (a secret: the socket is only the daemon's user's and root's).
    Token {
        /// The token text.
        token: String,
        /// When it expires (seconds since the Unix epoch); `None` for the open token.
        expires: Option<i64>,
        /// A per-identity token: it replaced one issued for the id before.
        #[serde(default)]
        replaced: bool,
        /// The open token: whether open enrollment is on (the token enrolls).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        open: Option<bool>,
    },
    /// Whether an outstanding token was withdrawn.
    TokenRevoked {
        /// There was one.
        existed: bool,
    },
    /// The outstanding per-identity tokens.
    Tokens {
        /// One per identity.
        tokens: Vec<crate::store::TokenRow>,
    },
    /// What the daemon is and what it counted (the raw metrics are `metrics_listen`'s).
    Status {
        /// Its fields (boxed: the other answers are small).
        status: Box<crate::server::status::Status>,
    },
    /// The identities, and the live sessions.
    Identities {
        /// One per identity.
        identities: Vec<crate::store::IdentityRow>,
        /// The live sessions.
        sessions: Vec<SessionInfo>,
    },
    /// Whether open enrollment is on.
    OpenEnrollment {
        /// On.
        open: bool,
        /// Decided by the fleet (else by this daemon's configuration).
        fleet: bool,
    },
    /// The request could not be served.
    Error {
        /// Why.
        message: String,
    },
}

/// Which nodes of a fleet confirmed an entry of its log (a revocation, a removal).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FleetConfirmation {
    /// The nodes of the fleet, the one that answered included.
    pub nodes: usize,
    /// The addresses of those that did not confirm it (yet).
    pub missing: Vec<String>,
}

/// Talking to the daemon failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No daemon listens on the socket.
    #[error("tallyd is not running (nothing listens on {0})")]
    NotRunning(PathBuf),
    /// The process answering on the socket runs as a user this one must not trust.
    #[error("the tallyd answering on {path} runs as uid {uid}, not as root, a system user or you: refusing to send it an admin command (is this the state directory you meant?)")]
    Untrusted {
        /// The socket.
        path: PathBuf,
        /// Its daemon's user.
        uid: u32,
    },
    /// The exchange failed.
    #[error("control socket {path}: {message}")]
    Failed {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Reads one request line (JSON, the newline included or not); what cannot be read gets
/// the answer `Error` (for the `control` fuzz target too).
pub fn parse_request(line: &str) -> Result<ControlRequest, ControlResponse> {
    serde_json::from_str(line).map_err(|e| ControlResponse::Error {
        message: format!("bad request: {e}"),
    })
}

/// Sends one request to the daemon of `state_dir` (blocking; for admin commands).
pub fn call(state_dir: &Path, req: &ControlRequest) -> Result<ControlResponse, ControlError> {
    let path = state_dir.join(SOCKET);
    let failed = |message: String| ControlError::Failed {
        path: path.clone(),
        message,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(&path)
        .map_err(|_| ControlError::NotRunning(path.clone()))?;
    // Who answers there: our own daemon, or, for root, root's or a system or systemd
    // dynamic user's. Root must not hand its admin commands (a token it would print, a
    // revocation it would believe done) to a daemon another user runs in a directory of
    // theirs.
    let daemon = rustix::net::sockopt::socket_peercred(&stream)
        .map_err(|e| failed(format!("cannot read the daemon's credentials: {e}")))?
        .uid
        .as_raw();
    let me = rustix::process::geteuid().as_raw();
    if daemon != 0 && !crate::secrets::trusted_owner(daemon, me) {
        return Err(ControlError::Untrusted {
            path: path.clone(),
            uid: daemon,
        });
    }
    // The daemon answers at once, except a REQUEST sent to a device: that waits for the
    // device up to its own timeout (the daemon's answer comes then, at the latest).
    let wait = match req {
        ControlRequest::Send {
            request: true,
            timeout_secs,
            ..
        } => Duration::try_from_secs_f64(*timeout_secs).unwrap_or(Duration::ZERO),
        ControlRequest::Enqueue {
            wait_secs: Some(wait),
            ..
        } => Duration::try_from_secs_f64(*wait).unwrap_or(Duration::ZERO),
        _ => Duration::ZERO,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(5).saturating_add(wait)))
        .map_err(|e| failed(e.to_string()))?;
    let mut text = serde_json::to_string(req).expect("serializable");
    text.push('\n');
    stream
        .write_all(text.as_bytes())
        .map_err(|e| failed(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(stream, MAX_LINE))
        .read_line(&mut line)
        .map_err(|e| failed(e.to_string()))?;
    serde_json::from_str(&line).map_err(|e| failed(format!("bad response: {e}")))
}
