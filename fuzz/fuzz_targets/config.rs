//! The daemon's configuration file, tallyd.toml (`ServerConfig::from_toml`): what it
//! accepts is within every range the key table (`config_keys::KEYS`, the man page's
//! source) states, validates again, and written back as TOML reads as the same
//! configuration; what it refuses names a key of the table.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tally::config::{BackendSpec, ConfigError, ServerConfig, TakeoverPolicy};
use tally::config_keys::KEYS;
use tally::logging::LogFormat;

/// A key's number in `c`, for the keys with a range.
fn number(c: &ServerConfig, key: &str) -> f64 {
    let l = &c.limits;
    let secs = Duration::as_secs_f64;
    match key {
        "limits.max_connections" => l.max_connections as f64,
        "limits.max_unauthenticated" => l.max_unauthenticated as f64,
        "limits.max_unauthenticated_per_source" => l.max_unauthenticated_per_source as f64,
        "limits.new_connections_per_source" => l.new_connections_per_source as f64,
        "limits.max_enrollments_in_progress" => l.max_enrollments_in_progress as f64,
        "limits.enrollments_per_second" => l.enrollments_per_second as f64,
        "limits.first_frame_timeout" => secs(&l.first_frame_timeout),
        "limits.handshake_timeout" => secs(&l.handshake_timeout),
        "limits.refusal_delay" => secs(&l.refusal_delay),
        "limits.max_delayed_refusals" => l.max_delayed_refusals as f64,
        "limits.keepalive" => secs(&l.keepalive),
        "limits.max_frame_len" => l.max_frame_len as f64,
        "limits.max_in_flight" => l.max_in_flight as f64,
        "limits.server_requests_in_flight" => l.server_requests_in_flight as f64,
        "limits.drain_timeout" => secs(&l.drain_timeout),
        "limits.backend_timeout" => secs(&l.backend_timeout),
        other => panic!("{other} has a range: add it to this target"),
    }
}

fn string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn path(p: &std::path::Path) -> String {
    string(p.to_str().expect("a path read from TOML is UTF-8"))
}

/// Seconds, exactly: the nanoseconds as a decimal fraction.
fn seconds(d: Duration) -> String {
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

/// The configuration as tallyd.toml text.
fn write(c: &ServerConfig) -> String {
    let mut t = String::new();
    t += &format!("listen = {}\n", string(&c.listen.to_string()));
    t += &format!("state_dir = {}\n", path(&c.state_dir));
    t += &format!("open_enrollment = {}\n", c.open_enrollment);
    let takeover = match c.takeover {
        TakeoverPolicy::Replace => "replace",
        TakeoverPolicy::Reject => "reject",
    };
    t += &format!("takeover = \"{takeover}\"\n");
    t += &format!("encryption = \"{}\"\n", c.encryption.as_str());
    let backend = match &c.backend {
        BackendSpec::Echo => "echo".to_owned(),
        BackendSpec::Unix(p) => format!("unix:{}", p.to_str().expect("UTF-8")),
        BackendSpec::Http(u) => u.to_string(),
    };
    t += &format!("backend = {}\n", string(&backend));
    t += &format!("log_level = {}\n", string(&c.log_level));
    let format = match c.log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    t += &format!("log_format = \"{format}\"\n");
    if let Some(m) = c.metrics_listen {
        t += &format!("metrics_listen = {}\n", string(&m.to_string()));
    }
    if let Some(s) = &c.store {
        t += &format!("store = {}\n", string(s));
    }
    if let Some(p) = &c.store_password_file {
        t += &format!("store_password_file = {}\n", path(p));
    }
    let l = &c.limits;
    t += "[limits]\n";
    for (k, v) in [
        ("max_connections", l.max_connections.to_string()),
        ("max_unauthenticated", l.max_unauthenticated.to_string()),
        (
            "max_unauthenticated_per_source",
            l.max_unauthenticated_per_source.to_string(),
        ),
        (
            "new_connections_per_source",
            l.new_connections_per_source.to_string(),
        ),
        (
            "max_enrollments_in_progress",
            l.max_enrollments_in_progress.to_string(),
        ),
        (
            "enrollments_per_second",
            l.enrollments_per_second.to_string(),
        ),
        ("first_frame_timeout", seconds(l.first_frame_timeout)),
        ("handshake_timeout", seconds(l.handshake_timeout)),
        ("refusal_delay", seconds(l.refusal_delay)),
        ("max_delayed_refusals", l.max_delayed_refusals.to_string()),
        ("keepalive", seconds(l.keepalive)),
        ("max_frame_len", l.max_frame_len.to_string()),
        ("max_in_flight", l.max_in_flight.to_string()),
        (
            "server_requests_in_flight",
            l.server_requests_in_flight.to_string(),
        ),
        ("drain_timeout", seconds(l.drain_timeout)),
        ("backend_timeout", seconds(l.backend_timeout)),
    ] {
        t += &format!("{k} = {v}\n");
    }
    t
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ServerConfig::from_toml(text) {
        Ok(c) => {
            c.validate()
                .expect("an accepted configuration validates again");
            for key in KEYS {
                let Some((min, max)) = key.range else {
                    continue;
                };
                let (min, max): (f64, f64) = (min.parse().unwrap(), max.parse().unwrap());
                let v = number(&c, key.name);
                assert!(
                    min <= v && v <= max,
                    "{} = {v}, outside {min}..={max}",
                    key.name
                );
            }
            let _ = c.limits.idle_timeout();
            let _ = c.store_has_password();
            // Written back, it reads as the same configuration.
            let again = write(&c);
            match ServerConfig::from_toml(&again) {
                Ok(back) => assert_eq!(back, c, "{again}"),
                Err(e) => panic!("{again}: {e}"),
            }
        }
        Err(ConfigError::Invalid { field, reason }) => {
            // A refused value is named by its key (spec: tallyd.toml(5)).
            assert!(
                KEYS.iter().any(|k| k.name == field) || field == "TALLYD_LISTEN",
                "{field}: {reason}"
            );
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
