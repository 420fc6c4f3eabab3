//! The daemon's configuration: a TOML file (`--config`), overridden by flags, validated
//! once into a [`ServerConfig`]. Every field has a default; the defaults run a daemon
//! on 127.0.0.1:7420 with its state in `./tally-state`.
//!
//! ```toml
//! listen = "127.0.0.1:7420"
//! state_dir = "/var/lib/tally"
//! open_enrollment = true      # accept the fleet-wide enrollment token (spec 6.1)
//! takeover = "replace"        # or "reject" (spec 7.3)
//! encryption = "required"     # or "allowed", "off" (spec 7.8)
//! backend = "echo"
//! log_level = "info"
//! log_format = "text"         # or "json"
//!
//! [limits]
//! max_connections = 10000     # all TCP connections
//! max_unauthenticated = 1024  # connections still in enrollment or handshake
//! max_unauthenticated_per_source = 64   # of those, from one IPv4 address or IPv6 /64
//! new_connections_per_source = 500      # per second, from one source (bursts of 2x)
//! max_enrollments_in_progress = 32
//! enrollments_per_second = 50 # all sources together (bursts of 2x)
//! first_frame_timeout = 2.0   # seconds for a new connection's first frame
//! handshake_timeout = 10.0    # seconds to finish enrollment or handshake after it
//! refusal_delay = 1.0         # seconds a refused stranger waits for its answer (0: none)
//! max_delayed_refusals = 10000  # refused strangers waiting at once (0: none wait)
//! keepalive = 30.0            # seconds; an idle session is closed after 1.5x this
//! max_frame_len = 65536       # bytes, the session frame limit (spec 3.2)
//! max_in_flight = 32          # requests per session before reading stops
//! server_requests_in_flight = 32  # requests to one device awaiting its answer
//! drain_timeout = 10.0        # seconds for in-flight requests at shutdown
//! backend_timeout = 30.0      # seconds before a request gets status TIMEOUT
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How the daemon logs (`log_format`).
pub use crate::logging::LogFormat;

use serde::Deserialize;

use crate::proto::MAX_FRAME_LEN_CEILING;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file holds the database password and every user may read it.
    #[error("{path}: mode {mode:o} lets every user on this machine read the database password in `store`: run `chmod 640 {path}` (readable by its owner and group only; the package's is root:tally), or move the password out of it (store_password_file, the systemd credential db-password, PGPASSWORD or .pgpass: README, \"Running several daemons\")")]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The file is not valid TOML or has an unknown key or a wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, from the TOML parser.
        message: String,
    },
    /// A value is out of its range.
    #[error("invalid setting {field}: {reason}")]
    Invalid {
        /// The setting, as written in the file.
        field: &'static str,
        /// The allowed range.
        reason: String,
    },
}

/// Which session modes the daemon accepts (spec 7.8): the policy is applied to each
/// connection's first frame, before any other work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum EncryptionPolicy {
    /// SEALED_HELLO only: every session is encrypted (the default).
    #[default]
    Required,
    /// Both modes; each device's configuration decides.
    Allowed,
    /// HELLO only: every session is authenticated, in the clear.
    Off,
}

impl EncryptionPolicy {
    /// Whether a session in `mode` is accepted.
    pub fn accepts(self, mode: crate::proto::Mode) -> bool {
        use crate::proto::Mode;
        match self {
            EncryptionPolicy::Required => mode == Mode::Encrypted,
            EncryptionPolicy::Allowed => true,
            EncryptionPolicy::Off => mode == Mode::Authenticated,
        }
    }

    /// The name in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            EncryptionPolicy::Required => "required",
            EncryptionPolicy::Allowed => "allowed",
            EncryptionPolicy::Off => "off",
        }
    }
}

/// What happens when an identity that has a live session authenticates again (spec 7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum TakeoverPolicy {
    /// The new session replaces the old one (the old one gets CLOSE TAKEN_OVER).
    #[default]
    Replace,
    /// The new session is refused (ERROR TAKEOVER_REFUSED); the old one stays.
    Reject,
}

mod secs {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = f64::deserialize(d)?;
        Duration::try_from_secs_f64(s).map_err(serde::de::Error::custom)
    }
}

/// Limits on everything a peer can make the daemon hold (see the module docs).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// All TCP connections at once.
    pub max_connections: usize,
    /// Connections not yet authenticated (enrolling or in the handshake). When full, the
    /// oldest that has not sent a whole frame is closed to make room.
    pub max_unauthenticated: usize,
    /// Unauthenticated connections from one source (IPv4 address, IPv6 /64).
    pub max_unauthenticated_per_source: usize,
    /// New connections per second from one source (bursts of twice this).
    pub new_connections_per_source: u32,
    /// Enrollments in progress at once (each costs two X25519 and a durable write).
    pub max_enrollments_in_progress: usize,
    /// Enrollments started per second, all sources together (bursts of twice this).
    pub enrollments_per_second: u32,
    /// Time for a new connection's first frame (at most 132 bytes).
    #[serde(with = "secs")]
    pub first_frame_timeout: Duration,
    /// Time to complete an enrollment or a handshake after the first frame.
    #[serde(with = "secs")]
    pub handshake_timeout: Duration,
    /// Time a stranger the daemon drops (evicted, over its source's limits, or refused
    /// before authenticating) waits, its socket parked, before its ERROR and close (up to
    /// 1.5x this): a flood that reconnects whenever dropped turns this slowly. 0: at once;
    /// at most 5 s, so that the answer comes within a client's 10 s timeout.
    #[serde(with = "secs")]
    pub refusal_delay: Duration,
    /// Refused strangers parked at once (a socket each, no task); when full, the one due
    /// first is closed at once. Fitted into the open-file limit beside `max_connections`.
    pub max_delayed_refusals: usize,
    /// Keepalive interval; sessions silent for 1.5x this are closed.
    #[serde(with = "secs")]
    pub keepalive: Duration,
    /// Largest session frame length field accepted and sent.
    pub max_frame_len: u32,
    /// Requests in flight per session; at this number the daemon stops reading.
    pub max_in_flight: usize,
    /// Server-initiated REQUESTs (`tallyd send --request`, a backend's SEND, a send from
    /// another node of a fleet) in flight to one device: sent and not answered yet. One
    /// counts until the device answers it or the session ends, even after its sender
    /// stopped waiting. Beyond this a sender is refused at once, and told so.
    pub server_requests_in_flight: usize,
    /// Time given to in-flight requests at shutdown.
    #[serde(with = "secs")]
    pub drain_timeout: Duration,
    /// Time a backend has to answer a request.
    #[serde(with = "secs")]
    pub backend_timeout: Duration,
    /// Queued messages (`tallyd send --queue`, spec 8.8) one identity may have, at most.
    pub queue_max_messages: u32,
    /// Payload bytes one identity may have queued, at most.
    pub queue_max_bytes: u64,
    /// How long a queued message waits for its device when the sender gives no TTL.
    #[serde(with = "secs")]
    pub queue_ttl: Duration,
    /// The longest TTL a queued message gets (a longer one asked for, or a longer
    /// `queue_ttl`, is cut to it).
    #[serde(with = "secs")]
    pub queue_max_ttl: Duration,
    /// Queued messages delivered to one session and not acknowledged yet, at most.
    pub deliveries_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_unauthenticated: 1024,
            max_unauthenticated_per_source: 64,
            new_connections_per_source: 500,
            max_enrollments_in_progress: 32,
            enrollments_per_second: 50,
            first_frame_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(10),
            refusal_delay: Duration::from_secs(1),
            max_delayed_refusals: 10_000,
            keepalive: Duration::from_secs(30),
            max_frame_len: crate::proto::DEFAULT_MAX_FRAME_LEN,
            max_in_flight: 32,
            server_requests_in_flight: 32,
            drain_timeout: Duration::from_secs(10),
            backend_timeout: Duration::from_secs(30),
            queue_max_messages: 1000,
            queue_max_bytes: 1 << 20,
            queue_ttl: Duration::from_secs(24 * 3600),
            queue_max_ttl: Duration::from_secs(30 * 24 * 3600),
            deliveries_in_flight: 16,
        }
    }
}

impl Limits {
    /// A session that received nothing for this long is closed (1.5x keepalive, as MQTT).
    pub fn idle_timeout(&self) -> Duration {
        self.keepalive * 3 / 2
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.into(),
            })
        };
        // Every value has an upper bound too: a huge duration would overflow the
        // deadline arithmetic of every session (1.5 x keepalive) and panic it.
        for (field, value, max) in [
            ("limits.max_connections", self.max_connections, 1_000_000),
            (
                "limits.max_unauthenticated",
                self.max_unauthenticated,
                1_000_000,
            ),
            ("limits.max_in_flight", self.max_in_flight, 65_536),
            (
                "limits.server_requests_in_flight",
                self.server_requests_in_flight,
                65_536,
            ),
            (
                "limits.max_unauthenticated_per_source",
                self.max_unauthenticated_per_source,
                1_000_000,
            ),
            (
                "limits.new_connections_per_source",
                self.new_connections_per_source as usize,
                1_000_000,
            ),
            (
                "limits.max_enrollments_in_progress",
                self.max_enrollments_in_progress,
                1_000_000,
            ),
            (
                "limits.enrollments_per_second",
                self.enrollments_per_second as usize,
                1_000_000,
            ),
            (
                "limits.queue_max_messages",
                self.queue_max_messages as usize,
                1_000_000,
            ),
            (
                "limits.deliveries_in_flight",
                self.deliveries_in_flight,
                1024,
            ),
        ] {
            if !(1..=max).contains(&value) {
                return invalid(field, &format!("must be between 1 and {max}"));
            }
        }
        if self.max_delayed_refusals > 1_000_000 {
            return invalid(
                "limits.max_delayed_refusals",
                "must be between 0 and 1000000",
            );
        }
        // Answers come up to 1.5x this late; clients wait 10 s for them (spec 13.10).
        if self.refusal_delay > Duration::from_secs(5) {
            return invalid("limits.refusal_delay", "must be between 0 and 5 seconds");
        }
        if !(1..=1 << 34).contains(&self.queue_max_bytes) {
            return invalid(
                "limits.queue_max_bytes",
                "must be between 1 and 17179869184",
            );
        }
        if !(1024..=MAX_FRAME_LEN_CEILING).contains(&self.max_frame_len) {
            return invalid("limits.max_frame_len", "must be between 1024 and 16777216");
        }
        const HOUR: u64 = 3600;
        for (field, d, min_ms, max_secs) in [
            (
                "limits.first_frame_timeout",
                self.first_frame_timeout,
                1,
                300,
            ),
            ("limits.handshake_timeout", self.handshake_timeout, 1, 300),
            ("limits.keepalive", self.keepalive, 100, 24 * HOUR),
            ("limits.drain_timeout", self.drain_timeout, 1, HOUR),
            ("limits.backend_timeout", self.backend_timeout, 1, HOUR),
            ("limits.queue_ttl", self.queue_ttl, 1000, 365 * 24 * HOUR),
            (
                "limits.queue_max_ttl",
                self.queue_max_ttl,
                1000,
                365 * 24 * HOUR,
            ),
        ] {
            if d < Duration::from_millis(min_ms) || d > Duration::from_secs(max_secs) {
                return invalid(
                    field,
                    &format!(
                        "must be between {} and {max_secs} seconds",
                        min_ms as f64 / 1000.0
                    ),
                );
            }
        }
        Ok(())
    }
}

/// Which backend answers requests (`backend = "..."`), checked when it is read:
/// `echo`, `unix:/path/to/app.sock` or `http://host:port/path`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum BackendSpec {
    /// Answers every request with its payload.
    Echo,
    /// An application on a Unix socket (`spec/BACKEND.md`).
    Unix(PathBuf),
    /// An HTTP endpoint: each request and message is a POST.
    Http(reqwest::Url),
}

impl std::str::FromStr for BackendSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        if spec == "echo" {
            Ok(BackendSpec::Echo)
        } else if let Some(path) = spec.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("backend: unix: needs a socket path, e.g. unix:/run/app.sock".into());
            }
            Ok(BackendSpec::Unix(path.into()))
        } else if spec.starts_with("http://") {
            reqwest::Url::parse(spec)
                .map(BackendSpec::Http)
                .map_err(|e| format!("backend: invalid URL {spec:?}: {e}"))
        } else {
            Err(format!(
                "unknown backend {spec:?} (use echo, unix:/path/to/socket, or http://host:port/path)"
            ))
        }
    }
}

impl TryFrom<String> for BackendSpec {
    type Error = String;

    fn try_from(spec: String) -> Result<Self, String> {
        spec.parse()
    }
}

/// The daemon's validated configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// TCP address to listen on.
    pub listen: SocketAddr,
    /// Directory of the keys and the identity store.
    pub state_dir: PathBuf,
    /// Whether the fleet-wide enrollment token is accepted (per-identity tokens always are).
    pub open_enrollment: bool,
    /// Policy when an identity with a live session authenticates again.
    pub takeover: TakeoverPolicy,
    /// Which session modes are accepted (spec 7.8).
    pub encryption: EncryptionPolicy,
    /// Which backend answers requests.
    pub backend: BackendSpec,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing filter).
    pub log_level: String,
    /// `text` (journald style under systemd) or `json`.
    pub log_format: LogFormat,
    /// Where to serve `GET /metrics` (Prometheus / OpenMetrics text); off if unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the identities are kept: unset for SQLite in the state directory (one
    /// daemon), a `postgres://` URL for a database shared by several daemons (a fleet,
    /// docs/CLUSTER.md).
    pub store: Option<String>,
    /// A file holding the password of the `store` database (mode 0600), when the URL has
    /// none and no systemd credential `db-password` is given.
    pub store_password_file: Option<PathBuf>,
    /// Limits.
    pub limits: Limits,
}

/// The default state directory: `$STATE_DIRECTORY` (set by systemd's `StateDirectory=`),
/// else `./tally-state`.
pub fn default_state_dir() -> PathBuf {
    match std::env::var_os("STATE_DIRECTORY") {
        // systemd may pass several, separated by ':'; the first is ours.
        Some(v) if !v.is_empty() => {
            PathBuf::from(v.to_string_lossy().split(':').next().unwrap_or(""))
        }
        _ => PathBuf::from("tally-state"),
    }
}

/// The address to listen on when neither the configuration file nor `--listen` says:
/// `$TALLYD_LISTEN` if set (containers, and running two daemons side by side), else
/// [`DEFAULT_LISTEN`]. A value that is not an address is refused by
/// [`ServerConfig::validate`].
pub fn default_listen() -> SocketAddr {
    std::env::var("TALLYD_LISTEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid address"))
}

/// The default TCP address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            state_dir: default_state_dir(),
            open_enrollment: true,
            takeover: TakeoverPolicy::Replace,
            encryption: EncryptionPolicy::Required,
            backend: BackendSpec::Echo,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            metrics_listen: None,
            store: None,
            store_password_file: None,
            limits: Limits::default(),
        }
    }
}

impl ServerConfig {
    /// Reads a TOML file; fields it does not set keep their defaults. A file holding a
    /// database password (in `store`) that every user may read is refused.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let read = |source| ConfigError::Read {
            path: path.into(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(read)?;
        let mode = file.metadata().map_err(read)?.permissions().mode() & 0o7777;
        let mut text = zeroize::Zeroizing::new(String::new());
        file.read_to_string(&mut text).map_err(read)?;
        let config = Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.into(),
                message,
            },
            other => other,
        })?;
        if mode & 0o004 != 0 && config.store_has_password() {
            return Err(ConfigError::Exposed {
                path: path.into(),
                mode,
            });
        }
        Ok(config)
    }

    /// Whether the `store` URL holds a password.
    pub fn store_has_password(&self) -> bool {
        self.store
            .as_deref()
            .and_then(|url| crate::store::pgconf::Settings::parse(url).ok())
            .is_some_and(|s| s.has_password())
    }

    /// Where a fleet's database password may come from besides the URL ([`crate::store::pgconf`]).
    pub fn store_passwords<'a>(
        &'a self,
        credentials_dir: Option<&'a Path>,
    ) -> crate::store::pgconf::PasswordSources<'a> {
        crate::store::pgconf::PasswordSources {
            credentials_dir,
            password_file: self.store_password_file.as_deref(),
        }
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: ServerConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value's range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Ok(v) = std::env::var("TALLYD_LISTEN") {
            if v.parse::<SocketAddr>().is_err() {
                return Err(ConfigError::Invalid {
                    field: "TALLYD_LISTEN",
                    reason: format!("{v:?} is not an address to listen on (e.g. 127.0.0.1:7420)"),
                });
            }
        }
        crate::logging::check_level(&self.log_level).map_err(|reason| ConfigError::Invalid {
            field: "log_level",
            reason,
        })?;
        self.store_location()?;
        self.limits.validate()
    }

    /// Where the identities are kept ([`ServerConfig::store`]).
    pub fn store_location(&self) -> Result<crate::store::Location, ConfigError> {
        crate::store::Location::from_setting(self.store.as_deref(), &self.state_dir).map_err(|e| {
            ConfigError::Invalid {
                field: "store",
                reason: e.to_string(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_a_file_every_user_reads_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tallyd.toml");
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let with_pw = "store = \"postgres://tally:s3cret@db.example/tally\"\n";
        write(with_pw, 0o644);
        let e = ServerConfig::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("tallyd.toml") && e.contains("mode 644"), "{e}");
        assert!(e.contains("chmod 640"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        // In the query string too.
        write(
            "store = \"postgres://tally@db/tally?password=s3cret\"\n",
            0o604,
        );
        let e = ServerConfig::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("mode 604") && !e.contains("s3cret"), "{e}");
        // Its owner and group only, or no password in it: fine.
        write(with_pw, 0o640);
        assert!(ServerConfig::from_file(&path).unwrap().store_has_password());
        write("store = \"postgres://tally@db.example/tally\"\n", 0o644);
        assert!(!ServerConfig::from_file(&path).unwrap().store_has_password());
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = ServerConfig::from_toml("").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7420");
        assert_eq!(c.limits.idle_timeout(), Duration::from_secs(45));
    }

    #[test]
    fn fields_and_fractional_seconds_parse() {
        let c = ServerConfig::from_toml(
            "listen = \"0.0.0.0:9000\"\ntakeover = \"reject\"\n[limits]\nhandshake_timeout = 0.25\nmax_in_flight = 4\n",
        )
        .unwrap();
        assert_eq!(c.takeover, TakeoverPolicy::Reject);
        assert_eq!(c.limits.handshake_timeout, Duration::from_millis(250));
        assert_eq!(c.limits.max_in_flight, 4);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_the_field_name() {
        let e = ServerConfig::from_toml("listen_addr = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen_addr"), "{e}");
        let e = ServerConfig::from_toml("[limits]\nmax_frame_len = 10")
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.max_frame_len"), "{e}");
        let e = ServerConfig::from_toml("[limits]\nkeepalive = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.keepalive"), "{e}");
        for huge in [
            "keepalive = 7e18",
            "handshake_timeout = 301",
            "drain_timeout = 1e300",
            "max_connections = 18446744073709551615",
            "max_in_flight = 100000",
            "server_requests_in_flight = 0",
            "server_requests_in_flight = 65537",
            "refusal_delay = 6",
            "max_delayed_refusals = 1000001",
        ] {
            let e = ServerConfig::from_toml(&format!("[limits]\n{huge}"))
                .unwrap_err()
                .to_string();
            let key = huge.split(' ').next().unwrap();
            assert!(e.contains(key), "{huge}: {e}");
        }
        let e = ServerConfig::from_toml("backend = \"carrier-pigeon\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("backend"), "{e}");
    }
}
