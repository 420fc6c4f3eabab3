//! Admin commands where the daemon really runs (issue 14, item 1): keys from systemd
//! credentials (`LoadCredential=`), which an operator's shell does not have. Every admin
//! command works through the running daemon's control socket alone; `tallyd init` refuses
//! to make other keys beside it; on a stopped daemon, `--credentials-dir` gives the keys.

mod common;

use std::path::Path;
use std::process::Command;

const TALLYD: &str = env!("CARGO_BIN_EXE_tallyd");
const TALLY: &str = env!("CARGO_BIN_EXE_tally");

/// Runs `tallyd ARGS --state-dir STATE` as an operator's shell would: no
/// `$CREDENTIALS_DIRECTORY`.
fn admin(state: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(TALLYD)
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn key_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".key"))
        .collect();
    names.sort();
    names
}

#[test]
fn admin_commands_work_through_the_daemon_when_its_keys_come_from_systemd_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let (state, creds) = (dir.path().join("state"), dir.path().join("creds"));
    std::fs::create_dir_all(&creds).unwrap();
    for name in [tally::secrets::SERVER_KEY, tally::secrets::STORE_KEY] {
        let key: [u8; 32] = tally::secrets::random_bytes();
        tally::secrets::write_secret_file(&creds.join(name), hex::encode(key).as_bytes()).unwrap();
    }
    let mut cmd = Command::new(TALLYD);
    cmd.args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .env("CREDENTIALS_DIRECTORY", &creds);
    let (daemon, _) = common::bin::start_cmd(cmd, false);
    assert!(
        key_files(&state).is_empty(),
        "the keys are the credentials'"
    );

    // Before: "enrollment.key does not exist; run `tallyd init` first".
    let (ok, open, err) = admin(&state, &["token"]);
    assert!(ok, "{err}");
    assert!(open.starts_with("tally1-open-"), "{open}");
    let (ok, token, err) = admin(&state, &["token", "--id", "dev-1"]);
    assert!(ok, "{err}");
    assert!(err.contains("token for dev-1: single use"), "{err}");
    let (ok, listed, err) = admin(&state, &["tokens", "--json"]);
    assert!(ok, "{err}");
    assert!(listed.contains("\"id\": \"dev-1\""), "{listed}");

    // The token made through the daemon is one the daemon accepts.
    std::fs::write(dir.path().join("dev-1.token"), token.trim()).unwrap();
    let out = Command::new(TALLY)
        .args(["enroll", "--server", &daemon.addr, "--id", "dev-1"])
        .args(["--token-file", "dev-1.token", "--out", "dev-1.cred"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, table, err) = admin(&state, &["identities"]);
    assert!(ok, "{err}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("dev-1 ") && l.contains("token")),
        "{table}"
    );
    assert!(!table.contains("tallyd is not running"), "{table}");
    let (ok, _, err) = admin(&state, &["token", "--id", "dev-2"]);
    assert!(ok, "{err}");
    let (ok, _, err) = admin(&state, &["token", "--revoke", "dev-2"]);
    assert!(ok && err.contains("dev-2: token revoked"), "{err}");
    let (ok, out, err) = admin(&state, &["revoke", "dev-1"]);
    assert!(ok, "{err}");
    assert!(out.contains("dev-1: revoked"), "{out}");

    // `init` would make other keys beside the running daemon's: refused, nothing made.
    let (ok, _, err) = admin(&state, &["init"]);
    assert!(!ok);
    assert!(
        err.contains("a tallyd runs with state directory") && err.contains("has its keys already"),
        "{err}"
    );
    assert!(key_files(&state).is_empty(), "{:?}", key_files(&state));

    // Stopped: the keys are needed, and `--credentials-dir` gives them.
    drop(daemon);
    let (ok, _, err) = admin(&state, &["identities"]);
    assert!(!ok);
    assert!(err.contains("$CREDENTIALS_DIRECTORY"), "{err}");
    let creds_arg = creds.to_str().unwrap();
    let (ok, table, err) = admin(&state, &["identities", "--credentials-dir", creds_arg]);
    assert!(ok, "{err}");
    assert!(table.contains("tallyd is not running"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("dev-1 ")), "{table}");
}

/// Issue 14, item 5: the metrics endpoint and `tallyd status` show the same figures, and
/// each moves with what it counts.
#[test]
fn metrics_move_with_handshakes_enrollments_refusals_and_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut cmd = Command::new(TALLYD);
    cmd.args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(&state);
    let (daemon, _) = common::bin::start_cmd(cmd, false);
    let metrics_addr = common::bin::metrics_addr(&daemon);
    let scrape = || common::bin::scrape(&metrics_addr);
    let value = common::bin::metric;
    let before = scrape();
    assert_eq!(
        value(&before, "tally_enrollments_total{outcome=\"ok\"}"),
        0.0
    );

    let (ok, token, err) = admin(&state, &["token"]);
    assert!(ok, "{err}");
    std::fs::write(dir.path().join("open.token"), token.trim()).unwrap();
    let tally = |args: &[&str]| {
        Command::new(TALLY)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let enroll = [
        "enroll",
        "--server",
        &daemon.addr,
        "--token-file",
        "open.token",
    ];
    assert!(tally(&[&enroll[..], &["--id", "m-1"]].concat())
        .status
        .success());
    let out = tally(&["request", "--cred", "tally.cred", "ping"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ping");
    // A second enrollment of the same id is refused.
    let again = [&enroll[..], &["--id", "m-1", "--out", "again.cred"]].concat();
    assert!(!tally(&again).status.success());

    let after = scrape();
    assert_eq!(
        value(&after, "tally_enrollments_total{outcome=\"ok\"}"),
        1.0
    );
    assert_eq!(value(&after, "tally_handshakes_total{outcome=\"ok\"}"), 1.0);
    // The embedded SQLite store sends no statement anywhere.
    assert_eq!(value(&after, "tally_store_queries_total"), 0.0);
    assert_eq!(
        value(&after, "tally_backend_requests_total{outcome=\"ok\"}"),
        1.0
    );
    // The echo backend answers at once: counted above (by the session, summed at
    // scrape), not timed (no clock read on that path); the histogram holds late answers.
    assert_eq!(
        value(&after, "tally_backend_request_duration_seconds_count"),
        0.0
    );
    assert!(
        value(&after, "tally_frames_total{direction=\"in\"}") >= 2.0,
        "{after}"
    );
    assert!(
        value(&after, "tally_frames_total{direction=\"out\"}") >= 2.0,
        "{after}"
    );
    assert!(
        // At least the REQUEST: 29 bytes around its 4-byte payload (encrypted mode).
        value(&after, "tally_bytes_total{direction=\"in\"}") >= 33.0,
        "{after}"
    );
    assert!(
        value(
            &after,
            "tally_refusals_total{reason=\"enrollment refused\"}"
        ) >= 1.0,
        "{after}"
    );

    // Issue 27, item 5: `tallyd status` is a summary of the same figures, for a person.
    let (ok, status, err) = admin(&state, &["status"]);
    assert!(ok, "{err}");
    let line = |key: &str| -> String {
        let prefix = format!("{key}:");
        let l = status
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {key}: line in\n{status}"));
        l[prefix.len()..].trim().to_owned()
    };
    assert_eq!(line("handshakes"), "1", "{status}");
    assert_eq!(line("enrollments"), "1", "{status}");
    assert_eq!(line("listen"), daemon.addr, "{status}");
    assert_eq!(line("metrics"), format!("http://{metrics_addr}/metrics"));
    assert_eq!(line("backend"), "echo");
    assert_eq!(line("identities"), "1");
    assert!(
        line("version").starts_with(env!("CARGO_PKG_VERSION")),
        "{status}"
    );
    assert!(line("store").starts_with("sqlite ") && line("store").ends_with("identities.db"));
    assert!(
        line("refusals").contains("enrollment_refused 1"),
        "{status}"
    );
    assert!(line("requests").starts_with("1 (ok 1,"), "{status}");
    // Aligned: every value starts in the same column.
    let columns: std::collections::BTreeSet<usize> = status
        .lines()
        .map(|l| {
            let colon = l
                .find(": ")
                .unwrap_or_else(|| panic!("not key: value: {l}"));
            colon + 1 + l[colon + 1..].find(|c| c != ' ').unwrap()
        })
        .collect();
    assert_eq!(columns.len(), 1, "{status}");
    // No histogram bucket, no metric name: those are the metrics endpoint's.
    assert!(
        !status.contains("bucket") && !status.contains("_total"),
        "{status}"
    );

    let (ok, json, err) = admin(&state, &["status", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    check_status_schema(&v);
    assert_eq!(v["handshakes"], 1);
    assert_eq!(v["enrollments"], 1);
    assert_eq!(v["identities"], 1);
    assert_eq!(v["listen"][0], daemon.addr.as_str());
    assert_eq!(v["metrics_listen"], metrics_addr.as_str());
    assert_eq!(v["store"]["kind"], "sqlite");
    assert_eq!(v["fleet"], serde_json::Value::Null);
    assert_eq!(v["open_enrollment"]["on"], true);
    assert_eq!(v["open_enrollment"]["decided_by"], "configuration");
    assert_eq!(v["requests"]["ok"], 1);
    assert_eq!(v["refusals"]["enrollment_refused"], 1, "{json}");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["frames"]["in"].as_u64().unwrap() >= 2, "{json}");
}

/// What `tallyd status --json` must be: every key (no more, no fewer) with its type, as
/// the README's table documents it. `refusals` maps reasons to numbers.
fn check_status_schema(v: &serde_json::Value) {
    use serde_json::Value;
    #[derive(Clone, Copy)]
    enum T {
        Str,
        Num,
        Bool,
        StrList,
        OptStr,
        OptNum,
        Counts,
        Obj(&'static [(&'static str, T)]),
        OptObj(&'static [(&'static str, T)]),
    }
    const IN_OUT: &[(&str, T)] = &[("in", T::Num), ("out", T::Num)];
    const SCHEMA: &[(&str, T)] = &[
        ("version", T::Str),
        ("pid", T::Num),
        ("started", T::Num),
        ("uptime_seconds", T::Num),
        ("listen", T::StrList),
        ("metrics_listen", T::OptStr),
        ("state_dir", T::Str),
        ("store", T::Obj(&[("kind", T::Str), ("location", T::Str)])),
        ("fleet", T::OptObj(&[("node", T::Str), ("fenced", T::Bool)])),
        (
            "open_enrollment",
            T::Obj(&[("on", T::Bool), ("decided_by", T::Str)]),
        ),
        ("backend", T::Str),
        ("takeover", T::Str),
        ("identities", T::OptNum),
        ("sessions", T::Num),
        (
            "connections",
            T::Obj(&[
                ("open", T::Num),
                ("max", T::Num),
                ("unauthenticated", T::Num),
                ("enrollments_in_progress", T::Num),
                ("delayed_refusals", T::Num),
            ]),
        ),
        ("enrollments", T::Num),
        ("handshakes", T::Num),
        ("refusals", T::Counts),
        ("evictions", T::Num),
        (
            "requests",
            T::Obj(&[
                ("ok", T::Num),
                ("error", T::Num),
                ("timeout", T::Num),
                ("panic", T::Num),
            ]),
        ),
        (
            "server_requests",
            T::Obj(&[
                ("sent", T::Num),
                ("answered", T::Num),
                ("waiting", T::Num),
                ("messages", T::Num),
            ]),
        ),
        ("frames", T::Obj(IN_OUT)),
        ("bytes", T::Obj(IN_OUT)),
        ("store_queries", T::Num),
    ];
    fn check(path: &str, v: &Value, t: T) {
        let whole = |v: &Value| v.as_u64().is_some() || v.as_i64().is_some();
        let ok = match t {
            T::Str => v.is_string(),
            // Counters and times are whole numbers, never floats.
            T::Num => whole(v),
            T::Bool => v.is_boolean(),
            T::StrList => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
            T::OptStr => v.is_null() || v.is_string(),
            T::OptNum => v.is_null() || whole(v),
            T::Counts => v.as_object().is_some_and(|o| {
                o.iter().all(|(k, n)| {
                    n.as_u64().is_some()
                        && !k.is_empty()
                        && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                })
            }),
            T::Obj(fields) => {
                object(path, v, fields);
                true
            }
            T::OptObj(fields) => {
                if !v.is_null() {
                    object(path, v, fields);
                }
                true
            }
        };
        assert!(ok, "{path} has the wrong type: {v}");
    }
    fn object(path: &str, v: &Value, fields: &[(&str, T)]) {
        let o = v
            .as_object()
            .unwrap_or_else(|| panic!("{path} is not an object: {v}"));
        let mut got: Vec<&str> = o.keys().map(String::as_str).collect();
        let mut want: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "the keys of {path}");
        for (k, t) in fields {
            check(&format!("{path}.{k}"), &o[*k], *t);
        }
    }
    object("status", v, SCHEMA);
}
