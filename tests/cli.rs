//! The binaries as a user runs them, following the README: start tallyd, take the token,
//! enroll with `tally`, send requests, list, revoke, stop with SIGTERM.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::bin::start;

const TALLYD: &str = env!("CARGO_BIN_EXE_tallyd");
const TALLY: &str = env!("CARGO_BIN_EXE_tally");

fn run(
    cmd: &str,
    args: &[&str],
    cwd: &std::path::Path,
    stdin: Option<&str>,
) -> (i32, String, String) {
    let mut child = Command::new(cmd)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn readme_walkthrough_with_the_real_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("tally-state");
    let state_arg = state.to_str().unwrap();
    let (mut daemon, first_start) = start(&state, true);
    assert!(
        first_start.contains("First start: created keys"),
        "{first_start}"
    );

    let (code, token, _) = run(
        TALLYD,
        &["token", "--state-dir", state_arg],
        dir.path(),
        None,
    );
    assert_eq!(code, 0);
    let token = token.trim().to_owned();
    assert!(token.starts_with("tally1-open-"), "{token}");
    // A token is a secret: never printed at start (stdout is the journal under systemd),
    // only how to get one.
    assert!(!first_start.contains("tally1-"), "{first_start}");
    assert!(
        first_start.contains(&format!("tallyd --state-dir {state_arg} token")),
        "{first_start}"
    );
    std::fs::write(dir.path().join("enroll.token"), &token).unwrap();
    // The token is read from a file, from $TALLY_TOKEN or from stdin, never from argv.
    let (code, help, _) = run(TALLY, &["enroll", "--help"], dir.path(), None);
    assert_eq!(code, 0);
    assert!(
        help.contains("--token-file") && !help.contains("--token <"),
        "{help}"
    );

    let enroll = [
        "enroll",
        "--token-file",
        "enroll.token",
        "--id",
        "sensor-42",
        "--server",
        &daemon.addr,
        "--out",
        "sensor-42.cred",
    ];
    let (code, _, err) = run(TALLY, &enroll, dir.path(), None);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("enrolled sensor-42"), "{err}");
    let mode = std::fs::metadata(dir.path().join("sensor-42.cred")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let (code, _, err) = run(TALLY, &enroll, dir.path(), None);
    assert_eq!(code, 1);
    assert!(
        err.contains("exists; use --force"),
        "refuses to overwrite: {err}"
    );

    let (code, out, err) = run(
        TALLY,
        &["request", "--cred", "sensor-42.cred", "hello"],
        dir.path(),
        None,
    );
    assert_eq!((code, out.as_str()), (0, "hello"), "{err}");
    let (code, out, _) = run(
        TALLY,
        &["request", "--cred", "sensor-42.cred"],
        dir.path(),
        Some("{\"temp\":21.5}\n"),
    );
    assert_eq!((code, out.as_str()), (0, "{\"temp\":21.5}\n"));

    let (code, table, _) = run(
        TALLYD,
        &["identities", "--state-dir", state_arg],
        dir.path(),
        None,
    );
    assert_eq!(code, 0);
    assert!(table.lines().next().unwrap().starts_with("ID"), "{table}");
    assert!(
        table.lines().nth(1).unwrap().starts_with("sensor-42"),
        "{table}"
    );
    // The same for scripts (issue 14, item 4): stable keys, times in Unix seconds.
    let (code, json, err) = run(
        TALLYD,
        &["identities", "--json", "--state-dir", state_arg],
        dir.path(),
        None,
    );
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    let row = &rows[0];
    assert_eq!(row["id"], "sensor-42", "{json}");
    assert_eq!(row["mode"], "open", "{json}");
    assert!(row["created"].as_i64().unwrap() > 1_700_000_000, "{json}");
    // last_seen is written in batches: present, a time or null.
    let keys: Vec<&str> = row
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys, // sorted
        [
            "created",
            "id",
            "last_seen",
            "mode",
            "online",
            "peer",
            "revoked"
        ],
        "{json}"
    );
    assert!(row["revoked"].is_null(), "{json}");
    assert_eq!(
        row["online"], false,
        "tallyd runs, the device is not connected: {json}"
    );
    let (code, json, err) = run(
        TALLYD,
        &["sessions", "--json", "--state-dir", state_arg],
        dir.path(),
        None,
    );
    assert_eq!((code, json.trim()), (0, "[]"), "{err}");
    let (code, json, err) = run(
        TALLYD,
        &["tokens", "--json", "--state-dir", state_arg],
        dir.path(),
        None,
    );
    assert_eq!((code, json.trim()), (0, "[]"), "{err}");

    let (code, out, _) = run(
        TALLYD,
        &["revoke", "sensor-42", "--state-dir", state_arg],
        dir.path(),
        None,
    );
    assert_eq!(
        (code, out.trim()),
        (0, "sensor-42: revoked; it had no live session")
    );
    let (code, out, err) = run(
        TALLY,
        &["request", "--cred", "sensor-42.cred", "hello"],
        dir.path(),
        None,
    );
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.contains("the server did not authenticate"), "{err}");

    // A per-identity token enrolls its own id only.
    let (_, t43, _) = run(
        TALLYD,
        &["token", "--id", "sensor-43", "--state-dir", state_arg],
        dir.path(),
        None,
    );
    let t43 = t43.trim();
    let wrong = [
        "enroll",
        "--id",
        "sensor-44",
        "--server",
        &daemon.addr,
        "--out",
        "x.cred",
    ];
    // The token on stdin.
    let (code, _, err) = run(TALLY, &wrong, dir.path(), Some(t43));
    assert_eq!(code, 1);
    assert!(err.contains("enrollment refused"), "{err}");
    let right = [
        "enroll",
        "--token-file",
        "-",
        "--id",
        "sensor-43",
        "--server",
        &daemon.addr,
        "--out",
        "x.cred",
    ];
    assert_eq!(run(TALLY, &right, dir.path(), Some(t43)).0, 0);
    // The token was consumed: it enrolls nothing a second time.
    let again = [
        "enroll",
        "--id",
        "sensor-43",
        "--server",
        &daemon.addr,
        "--out",
        "y.cred",
    ];
    let (code, _, err) = run(TALLY, &again, dir.path(), Some(t43));
    assert_eq!(code, 1);
    assert!(err.contains("refused"), "{err}");

    // SIGTERM: exit 0.
    let pid = daemon.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            assert!(status.success(), "tallyd exits 0 on SIGTERM: {status}");
            break;
        }
        assert!(Instant::now() < deadline, "tallyd did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 14, item 3: a log level that is no level (`warning`, `verbose`) turned logging
/// off silently (tracing took it for a target's name); daemon-only flags given to an admin
/// command were accepted and ignored. Both are refused now, with what to do instead.
#[test]
fn bad_log_levels_and_daemon_flags_on_admin_commands_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let (code, _, err) = run(
        TALLYD,
        &["--log-level", "warning", "--listen", "127.0.0.1:0"],
        cwd,
        None,
    );
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("\"warning\" is not a log level"), "{err}");
    assert!(
        err.contains("off, error, warn, info, debug, trace"),
        "{err}"
    );
    assert!(
        !cwd.join("tally-state").exists(),
        "nothing created before refusing"
    );

    std::fs::write(cwd.join("t.toml"), "log_level = \"verbose\"\n").unwrap();
    let (code, _, err) = run(
        TALLYD,
        &["--config", "t.toml", "--listen", "127.0.0.1:0"],
        cwd,
        None,
    );
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("log_level") && err.contains("\"verbose\" is not a log level"),
        "{err}"
    );

    let (code, _, err) = run(
        TALLYD,
        &[
            "identities",
            "--listen",
            "127.0.0.1:9",
            "--takeover",
            "reject",
        ],
        cwd,
        None,
    );
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("--listen, --takeover applies to the daemon (`tallyd serve`), not to `tallyd identities`"),
        "{err}"
    );
}
