//! `tallyd status`: what the running daemon is (version, uptime, addresses, store,
//! backend) and what it holds and has counted, as typed fields. The control socket
//! sends a [`Status`]; `crate::admin::status` prints it for a person (aligned
//! `key: value` lines) or as JSON (these fields, documented in the README). The raw
//! metrics, every histogram bucket, stay at `metrics_listen`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::ServerState;
use crate::config::{BackendSpec, ServerConfig, TakeoverPolicy};

/// What the daemon is, fixed at start ([`ServerState::info`]).
#[derive(Debug)]
pub struct Info {
    started: Instant,
    started_unix: i64,
    state_dir: PathBuf,
    store: Store,
    backend: String,
    takeover: TakeoverPolicy,
    /// The address `server::run` accepts on (bound, or passed by systemd).
    pub(crate) listen: OnceLock<SocketAddr>,
    /// The address the metrics endpoint was bound to.
    pub(crate) metrics: OnceLock<SocketAddr>,
}

impl Info {
    /// From the configuration the daemon starts with.
    pub(crate) fn new(config: &ServerConfig, location: &crate::store::Location) -> Info {
        let store = match location {
            crate::store::Location::Sqlite(path) => Store {
                kind: "sqlite".into(),
                location: path.display().to_string(),
            },
            crate::store::Location::Postgres(url) => Store {
                kind: "postgres".into(),
                location: crate::store::redacted(url),
            },
        };
        Info {
            started: Instant::now(),
            started_unix: crate::store::now(),
            state_dir: config.state_dir.clone(),
            store,
            backend: backend_name(&config.backend),
            takeover: config.takeover,
            listen: OnceLock::new(),
            metrics: OnceLock::new(),
        }
    }
}

/// The backend as the configuration names it, without a password an HTTP URL may hold.
fn backend_name(spec: &BackendSpec) -> String {
    match spec {
        BackendSpec::Echo => "echo".into(),
        BackendSpec::Unix(path) => format!("unix:{}", path.display()),
        BackendSpec::Http(url) => {
            let mut url = url.clone();
            if url.password().is_some() {
                let _ = url.set_password(Some("(not shown)"));
            }
            url.to_string()
        }
    }
}

/// Where the identities are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Store {
    /// `sqlite` or `postgres`.
    pub kind: String,
    /// The SQLite file, or the PostgreSQL URL without its password.
    pub location: String,
}

/// This daemon as a node of a fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fleet {
    /// Its node name (new at every start).
    pub node: String,
    /// Whether it has fenced itself (its heartbeat could not be renewed): it serves no
    /// handshake until it can again.
    pub fenced: bool,
}

/// Whether open enrollment is on, and who decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenEnrollment {
    /// On.
    pub on: bool,
    /// `configuration` (this daemon's `open_enrollment`) or `fleet` (the fleet's log,
    /// `tallyd open-enrollment`).
    pub decided_by: String,
}

/// Connections and what waits now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connections {
    /// TCP connections open (authenticated or not).
    pub open: u64,
    /// `limits.max_connections` in force (after fitting the open-file limit).
    pub max: u64,
    /// Of those, still in enrollment or handshake.
    pub unauthenticated: u64,
    /// Enrollments in progress.
    pub enrollments_in_progress: u64,
    /// Refused strangers parked until their answer is due (`limits.refusal_delay`).
    pub delayed_refusals: u64,
}

/// The backend's requests, by outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requests {
    /// Answered with status OK.
    pub ok: u64,
    /// Answered with another status.
    pub error: u64,
    /// Not answered within `limits.backend_timeout`.
    pub timeout: u64,
    /// The backend failed (panicked) on it.
    pub panic: u64,
}

/// Server-initiated requests and messages to this daemon's sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRequests {
    /// REQUESTs handed to a session.
    pub sent: u64,
    /// Of those, answered by the device in time.
    pub answered: u64,
    /// Senders waiting for a device's answer now.
    pub waiting: u64,
    /// MESSAGEs written to a session.
    pub messages: u64,
}

/// In and out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InOut {
    /// Received from devices.
    #[serde(rename = "in")]
    pub received: u64,
    /// Sent to devices.
    #[serde(rename = "out")]
    pub sent: u64,
}

/// The running daemon, as `tallyd status` shows it (`--json`: these fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// tallyd's version.
    pub version: String,
    /// Its process id.
    pub pid: u32,
    /// When it started, in seconds since the Unix epoch.
    pub started: i64,
    /// Seconds since it started.
    pub uptime_seconds: u64,
    /// The addresses devices connect to.
    pub listen: Vec<String>,
    /// The metrics endpoint's address, if `metrics_listen` is set.
    pub metrics_listen: Option<String>,
    /// The state directory.
    pub state_dir: String,
    /// Where the identities are kept.
    pub store: Store,
    /// This node, if the daemon is one of a fleet.
    pub fleet: Option<Fleet>,
    /// Whether the open enrollment token enrolls.
    pub open_enrollment: OpenEnrollment,
    /// The backend (`echo`, `unix:PATH`, an HTTP URL).
    pub backend: String,
    /// `replace` or `reject`.
    pub takeover: String,
    /// Identities in the store (revoked ones too); `null` if the store did not answer.
    pub identities: Option<u64>,
    /// Live sessions on this daemon.
    pub sessions: u64,
    /// Connections and what waits now.
    pub connections: Connections,
    /// Enrollments stored since start.
    pub enrollments: u64,
    /// Session handshakes completed since start.
    pub handshakes: u64,
    /// Connections refused since start, by reason (`wrong_key`, `enrollment_refused`,
    /// `handshake_deadline`, ...): only the reasons that occurred.
    pub refusals: BTreeMap<String, u64>,
    /// Unauthenticated connections closed to make room for newer ones.
    pub evictions: u64,
    /// Devices' requests handed to the backend, by outcome.
    pub requests: Requests,
    /// Requests and messages sent to devices.
    pub server_requests: ServerRequests,
    /// Session frames.
    pub frames: InOut,
    /// Session bytes.
    pub bytes: InOut,
    /// Statements sent to a PostgreSQL store (0 with SQLite).
    pub store_queries: u64,
}

/// A refusal reason of the metrics (`enrollment refused`) as a JSON key
/// (`enrollment_refused`).
pub fn reason_key(reason: &str) -> String {
    let mut key = String::with_capacity(reason.len());
    for c in reason.chars() {
        if c.is_ascii_alphanumeric() {
            key.push(c.to_ascii_lowercase());
        } else if !key.ends_with('_') {
            key.push('_');
        }
    }
    key.trim_matches('_').to_owned()
}

/// The daemon's status now.
pub async fn status(state: &ServerState) -> Status {
    let info = &state.info;
    let m = state.metrics.snapshot(state);
    let store = state.store.clone();
    let identities = tokio::task::spawn_blocking(move || store.count().ok())
        .await
        .ok()
        .flatten();
    let limits = state.limits();
    let max = limits.max_connections;
    let open = max.saturating_sub(state.connections.available_permits());
    let in_progress = limits
        .max_enrollments_in_progress
        .saturating_sub(state.enrolling.available_permits());
    let fleet = state.fleet.as_ref().map(|f| Fleet {
        node: f.node().to_owned(),
        fenced: f.fenced(),
    });
    let sends = &state.registry.sends;
    let load = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
    let mut refusals = BTreeMap::new();
    for (reason, n) in m.refusals {
        *refusals.entry(reason_key(reason)).or_insert(0) += n;
    }
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        started: info.started_unix,
        uptime_seconds: info.started.elapsed().as_secs(),
        listen: info
            .listen
            .get()
            .map(|a| a.to_string())
            .into_iter()
            .collect(),
        metrics_listen: info.metrics.get().map(|a| a.to_string()),
        state_dir: info.state_dir.display().to_string(),
        store: info.store.clone(),
        open_enrollment: OpenEnrollment {
            on: state.open_enrollment(),
            decided_by: if fleet.is_some() {
                "fleet"
            } else {
                "configuration"
            }
            .into(),
        },
        fleet,
        backend: info.backend.clone(),
        takeover: match info.takeover {
            TakeoverPolicy::Replace => "replace",
            TakeoverPolicy::Reject => "reject",
        }
        .into(),
        identities,
        sessions: state.registry.len() as u64,
        connections: Connections {
            open: open as u64,
            max: max as u64,
            unauthenticated: state.admission.len() as u64,
            enrollments_in_progress: in_progress as u64,
            delayed_refusals: state.tarpit.len() as u64,
        },
        enrollments: m.enrollments,
        handshakes: m.handshakes,
        refusals,
        evictions: m.evictions,
        requests: Requests {
            ok: m.requests[0],
            error: m.requests[1],
            timeout: m.requests[2],
            panic: m.requests[3],
        },
        server_requests: ServerRequests {
            sent: load(&sends.requests),
            answered: load(&sends.answered),
            waiting: load(&sends.waiting),
            messages: load(&sends.messages),
        },
        frames: InOut {
            received: m.frames[0],
            sent: m.frames[1],
        },
        bytes: InOut {
            received: m.bytes[0],
            sent: m.bytes[1],
        },
        store_queries: m.store_queries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_become_keys() {
        assert_eq!(reason_key("enrollment refused"), "enrollment_refused");
        assert_eq!(reason_key("first-frame deadline"), "first_frame_deadline");
        assert_eq!(reason_key("closed by the peer"), "closed_by_the_peer");
        assert_eq!(reason_key("wrong key"), "wrong_key");
    }

    #[test]
    fn an_http_backend_is_shown_without_its_password() {
        let spec: BackendSpec = "http://app:s3cret@127.0.0.1:8080/tally".parse().unwrap();
        let shown = backend_name(&spec);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("127.0.0.1:8080/tally"), "{shown}");
        let unix: BackendSpec = "unix:/run/app.sock".parse().unwrap();
        assert_eq!(backend_name(&unix), "unix:/run/app.sock");
    }
}
