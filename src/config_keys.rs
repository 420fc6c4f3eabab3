//! Every key of the daemon's configuration file ([`crate::config::ServerConfig`]), with
//! its type, default, range and meaning: the table the tallyd.toml(5) man page is made
//! from (`tallyd generate man`). Its tests hold it to the parser: every key serde reads
//! is in it and nothing else, each default is what `ServerConfig::default()` holds, each
//! range is the one `ServerConfig::validate` enforces, and each example parses.

/// What a key holds, as the man page names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// `"host:port"`, an IPv4 or IPv6 socket address (`"[::1]:7420"`).
    Address,
    /// A file system path, as a string.
    Path,
    /// `true` or `false`.
    Bool,
    /// A string.
    Text,
    /// One of these strings.
    Choice(&'static [&'static str]),
    /// A whole number.
    Integer,
    /// A number of seconds; fractions allowed (`0.25`).
    Seconds,
}

impl Type {
    /// The type as the man page writes it.
    pub fn describe(self) -> String {
        match self {
            Type::Address => "address (\"host:port\")".into(),
            Type::Path => "path (string)".into(),
            Type::Bool => "boolean".into(),
            Type::Text => "string".into(),
            Type::Choice(words) => {
                let quoted: Vec<String> = words.iter().map(|w| format!("\"{w}\"")).collect();
                format!("one of {}", quoted.join(", "))
            }
            Type::Integer => "integer".into(),
            Type::Seconds => "seconds (a number; fractions allowed)".into(),
        }
    }
}

/// When a changed value takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies {
    /// At the next start (SIGHUP logs that a restart is needed for it, or ignores it).
    Restart,
    /// On SIGHUP (`systemctl reload tallyd`), for new connections and sessions.
    Reload,
}

/// One configuration key.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// As written in the file: `limits.keepalive` is `keepalive` under `[limits]`.
    pub name: &'static str,
    /// What it holds.
    pub ty: Type,
    /// The default as a TOML value (`"127.0.0.1:7420"`, `30.0`), or `None`: unset.
    pub default: Option<&'static str>,
    /// An environment variable that gives the default instead, when set.
    pub default_env: Option<&'static str>,
    /// The smallest and largest values accepted, as TOML values.
    pub range: Option<(&'static str, &'static str)>,
    /// A value to show, as a TOML value: it parses.
    pub example: &'static str,
    /// When a change takes effect.
    pub applies: Applies,
    /// What it means.
    pub meaning: &'static str,
}

impl Key {
    /// The section (`limits`) and the key within it, or `None` and the key at the top.
    pub fn split(&self) -> (Option<&'static str>, &'static str) {
        match self.name.split_once('.') {
            Some((section, key)) => (Some(section), key),
            None => (None, self.name),
        }
    }

    /// A TOML document setting this key alone to `value` (a TOML value).
    pub fn toml(&self, value: &str) -> String {
        match self.split() {
            (Some(section), key) => format!("[{section}]\n{key} = {value}\n"),
            (None, key) => format!("{key} = {value}\n"),
        }
    }
}

use Applies::{Reload, Restart};

/// Every key of the configuration file, in the order of the file (`limits.*` last).
pub const KEYS: &[Key] = &[
    Key {
        name: "listen",
        ty: Type::Address,
        default: Some("\"127.0.0.1:7420\""),
        default_env: Some("TALLYD_LISTEN"),
        range: None,
        example: "\"0.0.0.0:7420\"",
        applies: Restart,
        meaning: "The TCP address devices connect to. Ignored when systemd passes the listening socket (socket activation: the address is tallyd.socket's ListenStream=). The --listen flag overrides it.",
    },
    Key {
        name: "state_dir",
        ty: Type::Path,
        default: Some("\"tally-state\""),
        default_env: Some("STATE_DIRECTORY"),
        range: None,
        example: "\"/var/lib/tally\"",
        applies: Restart,
        meaning: "The directory of the daemon's keys (server.key, store.key), its SQLite store (identities.db), its lock (tallyd.lock) and control socket (tallyd.sock). Made with mode 0700 if missing; refused if other users may write to it. A relative path is relative to the working directory. The --state-dir flag overrides it.",
    },
    Key {
        name: "open_enrollment",
        ty: Type::Bool,
        default: Some("true"),
        default_env: None,
        range: None,
        example: "false",
        applies: Restart,
        meaning: "Whether the open enrollment token (tallyd token) enrolls devices; per-identity tokens (tallyd token --id ID) always do. The package's /etc/tally/tallyd.toml sets it to false. In a fleet it is the fleet's setting, kept in the fleet's log and changed with tallyd open-enrollment on|off: the first node's open_enrollment seeds it, and a node whose key disagrees logs a warning and follows the fleet. The --no-open-enrollment flag turns it off.",
    },
    Key {
        name: "takeover",
        ty: Type::Choice(&["replace", "reject"]),
        default: Some("\"replace\""),
        default_env: None,
        range: None,
        example: "\"reject\"",
        applies: Restart,
        meaning: "When an identity that has a live session authenticates again: \"replace\" closes the old session (CLOSE TAKEN_OVER), \"reject\" refuses the new one (ERROR TAKEOVER_REFUSED). The --takeover flag overrides it.",
    },
    Key {
        name: "encryption",
        ty: Type::Choice(&["required", "allowed", "off"]),
        default: Some("\"required\""),
        default_env: None,
        range: None,
        example: "\"allowed\"",
        applies: Restart,
        meaning: "Which session modes devices may use (spec 7.8): \"required\" accepts only the encrypted mode (SEALED_HELLO: payloads and ids hidden, forward secrecy), \"off\" only the authenticated mode (HELLO: payloads in the clear, each frame tagged), \"allowed\" both, each device's own setting deciding. A device whose mode is refused gets ERROR MODE_REFUSED and does not fall back on its own. Choose \"off\" or \"allowed\" only where something on the path must read the payloads. The --encryption flag overrides it.",
    },
    Key {
        name: "backend",
        ty: Type::Text,
        default: Some("\"echo\""),
        default_env: None,
        range: None,
        example: "\"unix:/run/app/tally.sock\"",
        applies: Restart,
        meaning: "Who answers the devices' requests: \"echo\" (answers each with its payload), \"unix:PATH\" (an application on a Unix socket, spec/BACKEND.md) or \"http://HOST:PORT/PATH\" (each request and message a POST).",
    },
    Key {
        name: "log_level",
        ty: Type::Text,
        default: Some("\"info\""),
        default_env: None,
        range: None,
        example: "\"debug\"",
        applies: Reload,
        meaning: "The log filter: error, warn, info, debug, trace, or a tracing filter (\"info,tally=debug\"). RUST_LOG, if set, overrides it; so does the --log-level flag.",
    },
    Key {
        name: "log_format",
        ty: Type::Choice(&["text", "json"]),
        default: Some("\"text\""),
        default_env: None,
        range: None,
        example: "\"json\"",
        applies: Restart,
        meaning: "The log lines on standard error: \"text\" (journald style under systemd) or \"json\" (one object per line). The --log-format flag overrides it.",
    },
    Key {
        name: "metrics_listen",
        ty: Type::Address,
        default: None,
        default_env: None,
        range: None,
        example: "\"127.0.0.1:9420\"",
        applies: Restart,
        meaning: "Where to serve GET /metrics (Prometheus, OpenMetrics text) over plain HTTP: give it a loopback or otherwise trusted address. Off when unset. The --metrics-listen flag sets it.",
    },
    Key {
        name: "store",
        ty: Type::Text,
        default: None,
        default_env: None,
        range: None,
        example: "\"postgres://tally@db.example/tally?sslmode=verify-full&sslrootcert=/etc/tally/db-ca.pem\"",
        applies: Restart,
        meaning: "Where the identities are kept. Unset: SQLite, identities.db in the state directory (one daemon). A postgres:// URL: a PostgreSQL database shared by the daemons of a fleet (README, \"Running several daemons\"; docs/CLUSTER.md). A password in the URL makes tallyd refuse a configuration file that every user may read: prefer store_password_file or the systemd credential db-password.",
    },
    Key {
        name: "store_password_file",
        ty: Type::Path,
        default: None,
        default_env: None,
        range: None,
        example: "\"/etc/tally/db-password\"",
        applies: Restart,
        meaning: "A file holding the password of the store database (mode 0600), when the URL has none and no systemd credential db-password is given.",
    },
    Key {
        name: "limits.max_connections",
        ty: Type::Integer,
        default: Some("10000"),
        default_env: None,
        range: Some(("1", "1000000")),
        example: "50000",
        applies: Reload,
        meaning: "TCP connections at once, authenticated or not; beyond it a new connection gets ERROR BUSY. Clamped to what the open-file limit (RLIMIT_NOFILE, LimitNOFILE=) allows, with a warning.",
    },
    Key {
        name: "limits.max_unauthenticated",
        ty: Type::Integer,
        default: Some("1024"),
        default_env: None,
        range: Some(("1", "1000000")),
        example: "4096",
        applies: Reload,
        meaning: "Connections still in enrollment or handshake. When full, the oldest that has not sent a whole frame is closed to make room.",
    },
    Key {
        name: "limits.max_unauthenticated_per_source",
        ty: Type::Integer,
        default: Some("64"),
        default_env: None,
        range: Some(("1", "1000000")),
        example: "256",
        applies: Reload,
        meaning: "Of those, from one source: an IPv4 address or an IPv6 /64.",
    },
    Key {
        name: "limits.new_connections_per_source",
        ty: Type::Integer,
        default: Some("500"),
        default_env: None,
        range: Some(("1", "1000000")),
        example: "100",
        applies: Reload,
        meaning: "New connections per second from one source (bursts of twice this).",
    },
    Key {
        name: "limits.max_enrollments_in_progress",
        ty: Type::Integer,
        default: Some("32"),
        default_env: None,
        range: Some(("1", "1000000")),
        example: "8",
        applies: Reload,
        meaning: "Enrollments in progress at once (each costs two X25519 operations and a durable write); beyond it an enrollment gets ERROR BUSY.",
    },
    Key {
        name: "limits.enrollments_per_second",
        ty: Type::Integer,
        default: Some("50"),
        default_env: None,
        range: Some(("1", "1000000")),
        example: "10",
        applies: Reload,
        meaning: "Enrollments started per second, all sources together (bursts of twice this).",
    },
    Key {
        name: "limits.first_frame_timeout",
        ty: Type::Seconds,
        default: Some("2.0"),
        default_env: None,
        range: Some(("0.001", "300")),
        example: "5.0",
        applies: Reload,
        meaning: "Time a new connection has to send its first frame.",
    },
    Key {
        name: "limits.handshake_timeout",
        ty: Type::Seconds,
        default: Some("10.0"),
        default_env: None,
        range: Some(("0.001", "300")),
        example: "20.0",
        applies: Reload,
        meaning: "Time to finish an enrollment or a handshake after the first frame.",
    },
    Key {
        name: "limits.refusal_delay",
        ty: Type::Seconds,
        default: Some("1.0"),
        default_env: None,
        range: Some(("0", "5")),
        example: "0",
        applies: Reload,
        meaning: "Time a refused stranger (over its source's limits, evicted, or refused before authenticating) waits for its answer, its socket parked (up to 1.5 times this); 0 answers at once. A flood that reconnects whenever refused turns this slowly.",
    },
    Key {
        name: "limits.max_delayed_refusals",
        ty: Type::Integer,
        default: Some("10000"),
        default_env: None,
        range: Some(("0", "1000000")),
        example: "1000",
        applies: Reload,
        meaning: "Refused strangers parked at once (a socket each); when full, the one due first is answered at once. Fitted into the open-file limit beside limits.max_connections, with a warning when clamped.",
    },
    Key {
        name: "limits.keepalive",
        ty: Type::Seconds,
        default: Some("30.0"),
        default_env: None,
        range: Some(("0.1", "86400")),
        example: "60.0",
        applies: Reload,
        meaning: "Keepalive interval of a session; a session that received nothing for 1.5 times this is closed.",
    },
    Key {
        name: "limits.max_frame_len",
        ty: Type::Integer,
        default: Some("65536"),
        default_env: None,
        range: Some(("1024", "16777216")),
        example: "1048576",
        applies: Reload,
        meaning: "Largest session frame accepted and sent, in bytes (spec 3.2).",
    },
    Key {
        name: "limits.max_in_flight",
        ty: Type::Integer,
        default: Some("32"),
        default_env: None,
        range: Some(("1", "65536")),
        example: "8",
        applies: Reload,
        meaning: "Requests in flight per session; at this number the daemon stops reading from that device until one is answered.",
    },
    Key {
        name: "limits.server_requests_in_flight",
        ty: Type::Integer,
        default: Some("32"),
        default_env: None,
        range: Some(("1", "65536")),
        example: "4",
        applies: Reload,
        meaning: "Server-initiated REQUESTs (tallyd send --request, a backend's SEND, a send from another node) to one device not answered yet; beyond it a sender is refused at once, and told so.",
    },
    Key {
        name: "limits.drain_timeout",
        ty: Type::Seconds,
        default: Some("10.0"),
        default_env: None,
        range: Some(("0.001", "3600")),
        example: "30.0",
        applies: Reload,
        meaning: "Time given to requests in flight at shutdown (SIGTERM) before the sessions are closed.",
    },
    Key {
        name: "limits.backend_timeout",
        ty: Type::Seconds,
        default: Some("30.0"),
        default_env: None,
        range: Some(("0.001", "3600")),
        example: "5.0",
        applies: Reload,
        meaning: "Time the backend has to answer a request; then the device gets status TIMEOUT.",
    },
    Key {
        name: "limits.queue_max_messages",
        ty: Type::Integer,
        default: Some("1000"),
        default_env: None,
        range: Some(("1", "1000000")),
        example: "50",
        applies: Reload,
        meaning: "Queued messages (tallyd send --queue, a backend's queued SEND) one identity may have waiting; a message beyond it is refused, and its sender told the queue is full.",
    },
    Key {
        name: "limits.queue_max_bytes",
        ty: Type::Integer,
        default: Some("1048576"),
        default_env: None,
        range: Some(("1", "17179869184")),
        example: "65536",
        applies: Reload,
        meaning: "Payload bytes one identity may have queued; a message that would go beyond is refused, and its sender told the queue is full.",
    },
    Key {
        name: "limits.queue_ttl",
        ty: Type::Seconds,
        default: Some("86400.0"),
        default_env: None,
        range: Some(("1", "31536000")),
        example: "3600.0",
        applies: Reload,
        meaning: "How long a queued message waits for its device when the sender gives no TTL; then it expires (its sender is told) unless it is on its way to a connected device. Cut to limits.queue_max_ttl.",
    },
    Key {
        name: "limits.queue_max_ttl",
        ty: Type::Seconds,
        default: Some("2592000.0"),
        default_env: None,
        range: Some(("1", "31536000")),
        example: "604800.0",
        applies: Reload,
        meaning: "The longest a queued message waits: a longer TTL asked for by a sender is cut to it.",
    },
    Key {
        name: "limits.deliveries_in_flight",
        ty: Type::Integer,
        default: Some("16"),
        default_env: None,
        range: Some(("1", "1024")),
        example: "1",
        applies: Reload,
        meaning: "Queued messages delivered to one session and not acknowledged yet, at most (spec 8.8); 1 delivers one at a time.",
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Limits, ServerConfig};
    use serde::de::{self, Deserialize, Visitor};

    /// The field names a derived `Deserialize` asks for: it calls `deserialize_struct`
    /// with them, and this deserializer notes them and stops.
    fn serde_fields<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
        struct Grab<'a>(&'a mut Vec<&'static str>);
        impl<'de> de::Deserializer<'de> for Grab<'_> {
            type Error = de::value::Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(de::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                self.0.extend_from_slice(fields);
                Err(de::Error::custom("fields noted"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
                bytes byte_buf option unit unit_struct newtype_struct seq tuple
                tuple_struct map enum identifier ignored_any
            }
        }
        let mut fields = Vec::new();
        let _ = T::deserialize(Grab(&mut fields));
        assert!(
            !fields.is_empty(),
            "{} has no fields",
            std::any::type_name::<T>()
        );
        fields
    }

    #[test]
    fn the_table_has_every_key_the_parser_reads_and_no_other() {
        let mut parsed: Vec<String> = serde_fields::<ServerConfig>()
            .into_iter()
            .filter(|f| *f != "limits")
            .map(str::to_owned)
            .chain(
                serde_fields::<Limits>()
                    .into_iter()
                    .map(|f| format!("limits.{f}")),
            )
            .collect();
        assert!(parsed.len() > 20, "{parsed:?}");
        let mut table: Vec<String> = KEYS.iter().map(|k| k.name.to_owned()).collect();
        parsed.sort();
        table.sort();
        assert_eq!(
            table, parsed,
            "config_keys::KEYS and the serde fields differ"
        );
    }

    /// The default configuration, for keys whose default does not come from the
    /// environment right now.
    fn env_free(key: &Key) -> bool {
        key.default_env
            .is_none_or(|var| std::env::var_os(var).is_none_or(|v| v.is_empty()))
    }

    #[test]
    fn every_default_is_the_parsers() {
        let defaults = ServerConfig::default();
        for key in KEYS.iter().filter(|k| env_free(k)) {
            let Some(value) = key.default else { continue };
            let text = key.toml(value);
            let parsed = ServerConfig::from_toml(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                parsed, defaults,
                "{}: the table's default {value} is not ServerConfig::default()'s",
                key.name
            );
        }
        // The keys the table says are unset are unset.
        let unset: Vec<&str> = KEYS
            .iter()
            .filter(|k| k.default.is_none())
            .map(|k| k.name)
            .collect();
        assert_eq!(unset, ["metrics_listen", "store", "store_password_file"]);
        assert!(defaults.metrics_listen.is_none());
        assert!(defaults.store.is_none());
        assert!(defaults.store_password_file.is_none());
    }

    #[test]
    fn every_example_parses_and_changes_the_configuration() {
        for key in KEYS {
            let text = key.toml(key.example);
            let parsed = ServerConfig::from_toml(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_ne!(parsed, ServerConfig::default(), "{text}");
        }
    }

    #[test]
    fn every_range_is_the_one_enforced() {
        for key in KEYS {
            let Some((min, max)) = key.range else {
                assert!(
                    !matches!(key.ty, Type::Integer | Type::Seconds),
                    "{}: a number without a range",
                    key.name
                );
                continue;
            };
            for ok in [min, max] {
                let text = key.toml(ok);
                ServerConfig::from_toml(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            }
            let (lo, hi): (f64, f64) = (min.parse().unwrap(), max.parse().unwrap());
            let below = match (key.ty, lo > 0.0) {
                (Type::Seconds, true) => format!("{}", lo / 2.0),
                (Type::Integer, true) => format!("{}", lo as u64 - 1),
                _ => "-1".to_owned(),
            };
            let above = match key.ty {
                Type::Seconds => format!("{}", hi + 1.0),
                _ => format!("{}", hi as u64 + 1),
            };
            for bad in [below, above] {
                let text = key.toml(&bad);
                let e = ServerConfig::from_toml(&text)
                    .err()
                    .unwrap_or_else(|| panic!("{text} was accepted"));
                let (_, short) = key.split();
                assert!(e.to_string().contains(short), "{text}: {e}");
            }
        }
    }
}
