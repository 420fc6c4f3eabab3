//! Errors a person can act on (issue 14, item 9): each message a new user's run found
//! unhelpful, as the binaries print it now.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use tally::proto::credential::Credential;
use tally::proto::{Id, SecretKey};

const TALLYD: &str = env!("CARGO_BIN_EXE_tallyd");
const TALLY: &str = env!("CARGO_BIN_EXE_tally");

/// Runs `cmd` in `cwd` with `RUST_BACKTRACE=1` (errors must not print one anyway).
fn run(cmd: &str, args: &[&str], cwd: &Path) -> (i32, String) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(cwd)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.to_lowercase().contains("backtrace"),
        "an error a user caused is not a crash: {stderr}"
    );
    (out.status.code().unwrap_or(-1), stderr)
}

/// A credential file for `server`, with `mode`.
fn credential(dir: &Path, name: &str, server: &str, mode: u32) {
    let cred = Credential {
        id: Id::new("dev-1").unwrap(),
        key: SecretKey::from_bytes([7; 32]),
        server: server.into(),
        server_key: [9; 32],
    };
    let path = dir.join(name);
    std::fs::write(&path, cred.to_file().as_bytes()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// An address where nothing listens.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[test]
fn a_credential_that_is_not_one_says_what_it_is_and_where() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let write = |name: &str, text: &str| {
        std::fs::write(cwd.join(name), text).unwrap();
        std::fs::set_permissions(cwd.join(name), std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    // Cut in the middle of the key's line.
    write(
        "cut.cred",
        "tally-credential = 1\nid = \"dev-1\"\nkey = \"ab",
    );
    let (code, err) = run(TALLY, &["request", "--cred", "cut.cred", "x"], cwd);
    assert_eq!(code, 1);
    assert!(
        err.contains("cut.cred: invalid credential file: line 3:"),
        "{err}"
    );
    assert!(
        err.contains("it does not look like a Tally credential"),
        "{err}"
    );
    assert!(err.contains("`tally-credential = 1`"), "{err}");
    // Lines missing at the end.
    write("short.cred", "tally-credential = 1\nid = \"dev-1\"\n");
    let (_, err) = run(TALLY, &["request", "--cred", "short.cred", "x"], cwd);
    assert!(
        err.contains("short.cred: invalid credential file: missing field `key` (a truncated file?"),
        "{err}"
    );
    // The token given where the credential goes.
    let token = format!("tally1-open-{}-{}\n", "a".repeat(64), "b".repeat(64));
    write("dev.token", &token);
    let (_, err) = run(TALLY, &["request", "--cred", "dev.token", "x"], cwd);
    assert!(
        err.contains("dev.token: invalid credential file: this is an enrollment token, not a device credential"),
        "{err}"
    );
    assert!(err.contains("tally enroll --token-file"), "{err}");
}

#[test]
fn a_credential_other_users_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let nowhere = closed_port();
    credential(cwd, "open.cred", &nowhere, 0o644);
    let (code, err) = run(TALLY, &["request", "--cred", "open.cred", "x"], cwd);
    assert_eq!(code, 1);
    assert!(
        err.contains("open.cred is accessible to every user of this machine (mode 0644)"),
        "{err}"
    );
    assert!(err.contains("`chmod 600 open.cred`"), "{err}");
    assert!(
        !err.contains("cannot connect"),
        "refused before connecting: {err}"
    );
    // Group access is a warning: a deployment may mean it.
    credential(cwd, "group.cred", &nowhere, 0o640);
    let (_, err) = run(
        TALLY,
        &["request", "--cred", "group.cred", "--retries", "0", "x"],
        cwd,
    );
    assert!(
        err.contains("group.cred is accessible to its group (mode 0640)"),
        "{err}"
    );
    assert!(err.contains("cannot connect"), "and used: {err}");
}

#[test]
fn each_cause_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    credential(cwd, "dev.cred", &closed_port(), 0o600);
    let (code, err) = run(
        TALLY,
        &["request", "--cred", "dev.cred", "--retries", "0", "x"],
        cwd,
    );
    assert_eq!(code, 1);
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
    // The daemon's errors too (and no backtrace: `run` checks).
    let (code, err) = run(TALLYD, &["identities", "--state-dir", "no/such/dir"], cwd);
    assert_ne!(code, 0);
    assert!(err.starts_with("tallyd: "), "{err}");
    // Issue 14, item 2: it said "no/such/dir/server.key does not exist; run `tallyd init`
    // first", and following that advice made keys the running daemon does not use.
    assert!(
        err.contains("no state directory at no/such/dir: give the --state-dir the daemon uses"),
        "{err}"
    );
    assert!(!err.contains("tallyd init"), "{err}");
}

/// Issue 14, item 2: a key file that exists but that this user cannot read was reported
/// as missing, with the advice to create one.
#[test]
fn a_key_this_user_cannot_read_is_not_called_missing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = Command::new(TALLYD)
        .args(["init", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success());
    let root = rustix::process::getuid().is_root();
    let mut cmd = if root {
        // Root reads anything: run the admin command as nobody.
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", TALLYD]);
        c
    } else {
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o000)).unwrap();
        Command::new(TALLYD)
    };
    let out = cmd
        .args(["identities", "--state-dir"])
        .arg(&state)
        .env("RUST_BACKTRACE", "1")
        .output();
    let Ok(out) = out else {
        eprintln!("skipped: setpriv is not installed (util-linux)");
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    if root && err.contains("setpriv") {
        eprintln!("skipped: nobody cannot run {TALLYD} here: {err}");
        return;
    }
    assert!(!out.status.success());
    assert!(err.contains("permission denied for user"), "{err}");
    assert!(
        err.contains("run this as the daemon's user or as root"),
        "{err}"
    );
    assert!(
        !err.contains("does not exist") && !err.contains("tallyd init"),
        "{err}"
    );
    if !root {
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
}

#[test]
fn a_server_that_is_not_tally_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = http.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut s, _) = http.accept().unwrap();
        let mut hello = [0u8; 64];
        let _ = s.read(&mut hello);
        s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
    });
    credential(cwd, "dev.cred", &addr, 0o600);
    let (code, err) = run(
        TALLY,
        &["request", "--cred", "dev.cred", "--retries", "0", "x"],
        cwd,
    );
    server.join().unwrap();
    assert_eq!(code, 1);
    assert!(
        err.contains("this does not look like a Tally server (it answered with HTTP)"),
        "{err}"
    );
    assert!(!err.contains("frame length"), "{err}");
}

#[test]
fn an_open_enrollment_refused_because_open_mode_is_off_names_the_id() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut cmd = Command::new(TALLYD);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--no-open-enrollment",
        "--state-dir",
    ])
    .arg(&state);
    let (daemon, _) = common::bin::start_cmd(cmd, true);
    let tallyd = |args: &[&str]| {
        let out = Command::new(TALLYD)
            .args(args)
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    // Issue 27: the open token is printed (it is asked for), with a warning that the
    // running daemon refuses it.
    let (token, warning) = tallyd(&["token"]);
    assert!(
        warning.contains("open enrollment is off in the running tallyd")
            && warning.contains("tallyd token --id"),
        "{warning}"
    );
    std::fs::write(dir.path().join("open.token"), token.trim()).unwrap();
    let (code, err) = run(
        TALLY,
        &[
            "enroll",
            "--server",
            &daemon.addr,
            "--token-file",
            "open.token",
            "--id",
            "dev-9",
        ],
        dir.path(),
    );
    assert_ne!(code, 0, "{err}");
    // The device is told which server refused, and what that can mean for an open
    // token (the server does not say which cause: spec 7.5).
    assert!(
        err.contains(&format!("enrollment of dev-9 at {}", daemon.addr))
            && err.contains("enrollment refused")
            && err.contains("this server does not accept open enrollment"),
        "{err}"
    );
    daemon.expect_log(&[
        "enrollment of dev-9 (open mode) refused",
        "open enrollment is off (open_enrollment = false)",
        "tallyd token --id",
    ]);
    // A per-identity token: the first says nothing of one before, the second does.
    let (_, first) = tallyd(&["token", "--id", "dev-10"]);
    assert!(!first.contains("before"), "{first}");
    let (token, second) = tallyd(&["token", "--id", "dev-10"]);
    assert!(
        second.contains("the token issued for dev-10 before no longer works"),
        "{second}"
    );
    std::fs::write(dir.path().join("dev-10.token"), token.trim()).unwrap();
    let enroll = |id: &str, out: &str| {
        run(
            TALLY,
            &[
                "enroll",
                "--server",
                &daemon.addr,
                "--token-file",
                "dev-10.token",
                "--id",
                id,
                "--out",
                out,
            ],
            dir.path(),
        )
    };
    // For another id: its causes (single use, its own id), not the open token's.
    let (code, err) = enroll("dev-11", "dev-11.cred");
    assert_ne!(code, 0);
    assert!(
        err.contains("enrolls only the id it was issued for (check --id)")
            && err.contains("single use"),
        "{err}"
    );
    let (code, err) = enroll("dev-10", "dev-10.cred");
    assert_eq!(code, 0, "{err}");
    // Used: the same words.
    let (code, err) = enroll("dev-10", "dev-10b.cred");
    assert_ne!(code, 0);
    assert!(err.contains("single use (already used?)"), "{err}");
}

/// Issue 14, item 2: an admin command given a state directory that is not the running
/// daemon's (the default `./tally-state` in root's shell, while the unit's daemon uses
/// /var/lib/tally) said only that there is none; it now names the one the daemon uses.
#[test]
fn an_admin_command_in_the_wrong_state_directory_names_the_running_daemons() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("daemon-state");
    let (daemon, _) = common::bin::start(&state, true);
    let pid = daemon.child.id();
    let cwd = dir.path();
    // No --state-dir: ./tally-state, which does not exist here.
    let (code, err) = run(TALLYD, &["identities"], cwd);
    assert_ne!(code, 0);
    let want = format!(
        "the running tallyd (pid {pid}) uses {}: add `--state-dir {0}`",
        state.display()
    );
    assert!(err.contains("no state directory at tally-state"), "{err}");
    assert!(err.contains(&want), "{err}");
    // A directory that exists but has no keys: the same advice.
    std::fs::create_dir(cwd.join("empty")).unwrap();
    std::fs::set_permissions(cwd.join("empty"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let (code, err) = run(TALLYD, &["revoke", "x", "--state-dir", "empty"], cwd);
    assert_ne!(code, 0);
    assert!(err.contains("has no keys yet"), "{err}");
    assert!(err.contains(&want), "{err}");
    // With the daemon's directory it works.
    let (code, err) = run(
        TALLYD,
        &["identities", "--state-dir", state.to_str().unwrap()],
        cwd,
    );
    assert_eq!(code, 0, "{err}");
    drop(daemon);
    let (_, err) = run(TALLYD, &["identities"], cwd);
    assert!(!err.contains(&format!("pid {pid}")), "stopped: {err}");
}

/// Review finding (a local attack on root): another user runs a process answering on a
/// `tallyd.sock` in a directory of theirs; root, sent there (by a hint, or by mistake),
/// handed it its admin commands: a token it would print, a revocation it would believe
/// done. Admin commands now check who answers (`SO_PEERCRED`) and refuse, sending
/// nothing. Needs root (to act as the other user); skipped otherwise.
#[test]
fn root_does_not_send_admin_commands_to_another_users_daemon() {
    // The other user needs a python3 it can run (not one under root's home).
    let python = std::path::Path::new("/usr/bin/python3");
    if !rustix::process::getuid().is_root() || !python.exists() {
        eprintln!("skipped: needs root and /usr/bin/python3");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let state = dir.path().join("mallory-state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    rustix::fs::chown(
        &state,
        Some(rustix::process::Uid::from_raw(12345)),
        Some(rustix::process::Gid::from_raw(12345)),
    )
    .unwrap();
    // The impostor: answers every request with a token of its own, and records it.
    let sock = state.join("tallyd.sock");
    let got = state.join("received");
    let script = format!(
        r#"
import os, socket
s = socket.socket(socket.AF_UNIX); s.bind({sock:?}); os.chmod({sock:?}, 0o666); s.listen(1)
c, _ = s.accept(); data = c.recv(65536)
open({got:?}, "wb").write(data)
c.sendall(b'{{"type":"Token","token":"tally1-open-{zeros}-{ones}"}}\n')
"#,
        sock = sock.display().to_string(),
        got = got.display().to_string(),
        zeros = "00".repeat(32),
        ones = "11".repeat(32),
    );
    let mut impostor = Command::new("setpriv")
        .args(["--reuid=12345", "--regid=12345", "--clear-groups"])
        .arg(python)
        .args(["-c", &script])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the impostor did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (code, err) = run(
        TALLYD,
        &["token", "--state-dir", state.to_str().unwrap()],
        dir.path(),
    );
    let _ = impostor.kill();
    let _ = impostor.wait();
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("runs as uid 12345"), "{err}");
    assert!(
        err.contains("refusing to send it an admin command"),
        "{err}"
    );
    assert!(
        std::fs::read(&got).map_or(true, |d| d.is_empty()),
        "nothing was sent to the impostor"
    );
}
