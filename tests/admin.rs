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
        value(&after, "tally_bytes_total{direction=\"in\"}") > 64.0,
        "{after}"
    );
    assert!(
        value(
            &after,
            "tally_refusals_total{reason=\"enrollment refused\"}"
        ) >= 1.0,
        "{after}"
    );

    let (ok, status, err) = admin(&state, &["status"]);
    assert!(ok, "{err}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("handshakes_total{outcome=\"ok\"}") && l.ends_with(" 1")),
        "{status}"
    );
}
