//! Issue 27, item 3: `tally request` and `tally message` beside a running `tally listen`
//! of the same identity go through its session (a Unix socket in the runtime directory)
//! instead of taking it over; `--direct` and `--no-share` keep the old way; a socket left
//! by a killed listener changes nothing; a second listener of the identity is refused.
//! Real binaries over TCP on 127.0.0.1; `XDG_RUNTIME_DIR` is a temporary directory.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc::Receiver;

use common::bin::{self, admin, await_session, enroll, expect_line, text};

/// A fresh `XDG_RUNTIME_DIR` (0700) in `dir`.
fn runtime(dir: &Path) -> PathBuf {
    let run = dir.join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    run
}

/// `tally ARGS` with `XDG_RUNTIME_DIR=RUN`, run to its end.
fn tally(args: &[&str], run: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .env("XDG_RUNTIME_DIR", run)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `id`'s live session as `tallyd sessions --json` shows it: (peer, since). A takeover
/// makes a new session, from another port, since another time. Waits until the daemon
/// lists one: a listener says "connected" once its CLIENT_FINISH is on its way.
fn session(state: &Path, id: &str) -> (String, String) {
    await_session(state, id);
    let out = admin(state, &["sessions", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let row = rows
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no session of {id}: {rows:?}"));
    (row["peer"].to_string(), row["since"].to_string())
}

/// The files in RUN/tally, by name.
fn files(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run.join("tally"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The one socket in RUN/tally.
fn socket(run: &Path) -> PathBuf {
    let socks: Vec<String> = files(run)
        .into_iter()
        .filter(|n| n.ends_with(".sock"))
        .collect();
    assert_eq!(socks.len(), 1, "{socks:?}");
    run.join("tally").join(&socks[0])
}

/// What the listener printed so far, none of it "session lost".
fn not_lost(lines: &Receiver<String>) {
    for line in lines.try_iter() {
        assert!(!line.contains("session lost"), "{line}");
    }
}

#[test]
fn request_and_message_go_through_a_running_listener() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let run = runtime(dir.path());
    let (daemon, _) = bin::start(&state, true);
    let cred = enroll(&daemon, &state, "dev", dir.path());
    let cred_arg = cred.to_str().unwrap();
    let (_listener, lines) = bin::listen_in(&["--echo"], &cred, &run);
    expect_line(&lines, "connected as dev");
    let before = session(&state, "dev");

    // Its socket: 0600, in a directory of 0700.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&run.join("tally")), 0o700);
    assert_eq!(mode(&socket(&run)), 0o600);

    let out = tally(&["request", "--cred", cred_arg, "hello"], &run);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello");
    assert_eq!(text(&out.stderr), "");
    let out = tally(&["message", "--cred", cred_arg, "note"], &run);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        (text(&out.stdout), text(&out.stderr)),
        (String::new(), String::new())
    );
    // Several at once, each with its own answer.
    let many: Vec<_> = (0..4)
        .map(|n| {
            let (cred, run) = (cred.clone(), run.clone());
            std::thread::spawn(move || {
                let payload = format!("many {n}");
                let out = tally(
                    &["request", "--cred", cred.to_str().unwrap(), &payload],
                    &run,
                );
                assert!(out.status.success(), "{}", text(&out.stderr));
                assert_eq!(text(&out.stdout), payload);
            })
        })
        .collect();
    for t in many {
        t.join().unwrap();
    }

    // The listener's session is the one it had, and still serves the server.
    assert_eq!(session(&state, "dev"), before, "the session was replaced");
    let out = admin(&state, &["send", "dev", "--request", "still there"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "still there");
    not_lost(&lines);

    // --direct: a session of its own, which takes the listener's over (the old way).
    let out = tally(&["request", "--direct", "--cred", cred_arg, "direct"], &run);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "direct");
    let lost = expect_line(&lines, "session lost");
    assert!(lost.contains("another connection"), "{lost}");
}

/// `kill -9` leaves the socket file; the next `tally request` makes its own session, and
/// the next `tally listen` replaces the stale socket.
#[test]
fn a_killed_listeners_socket_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let run = runtime(dir.path());
    let (daemon, _) = bin::start(&state, true);
    let cred = enroll(&daemon, &state, "dev", dir.path());
    let cred_arg = cred.to_str().unwrap();
    let (mut listener, lines) = bin::listen_in(&["--echo"], &cred, &run);
    expect_line(&lines, "connected as dev");
    let sock = socket(&run);
    listener.kill().unwrap();
    listener.wait().unwrap();
    assert!(sock.exists(), "the killed listener's socket is left");

    let out = tally(&["request", "--cred", cred_arg, "alone"], &run);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "alone");
    assert_eq!(text(&out.stderr), "");
    let out = tally(&["message", "--cred", cred_arg, "alone"], &run);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let (_listener, lines) = bin::listen_in(&["--echo"], &cred, &run);
    expect_line(&lines, "connected as dev");
    let before = session(&state, "dev");
    let out = tally(&["request", "--cred", cred_arg, "shared again"], &run);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "shared again");
    assert_eq!(session(&state, "dev"), before, "the session was replaced");
    not_lost(&lines);
}

/// One listener per identity; it removes its files on SIGTERM; `--no-share` offers
/// nothing (and is taken over, as before).
#[test]
fn a_second_listener_is_refused_and_the_first_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let run = runtime(dir.path());
    let (daemon, _) = bin::start(&state, true);
    let cred = enroll(&daemon, &state, "dev", dir.path());
    let cred_arg = cred.to_str().unwrap();
    // Another identity's listener has a socket of its own.
    let other = enroll(&daemon, &state, "other", dir.path());
    let (_other, other_lines) = bin::listen_in(&["--echo"], &other, &run);
    expect_line(&other_lines, "connected as other");
    let (mut first, lines) = bin::listen_in(&["--echo"], &cred, &run);
    expect_line(&lines, "connected as dev");
    let before = session(&state, "dev");

    let (mut second, second_lines) = bin::listen_in(&["--echo"], &cred, &run);
    let err = expect_line(&second_lines, "another `tally listen` runs for dev");
    assert!(err.contains("stop that one first"), "{err}");
    assert!(!second.wait().unwrap().success());
    assert_eq!(session(&state, "dev"), before, "the session was replaced");

    // SIGTERM: the session closed, the socket and the lock removed.
    let pid = first.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(first.wait().unwrap().success());
    assert_eq!(
        files(&run).len(),
        2,
        "only the other listener's: {:?}",
        files(&run)
    );

    // --no-share: no socket; a one-shot request takes the session over.
    let (_third, lines) = bin::listen_in(&["--echo", "--no-share"], &cred, &run);
    expect_line(&lines, "connected as dev");
    assert_eq!(files(&run).len(), 2, "{:?}", files(&run));
    let out = tally(&["request", "--cred", cred_arg, "mine"], &run);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lost = expect_line(&lines, "session lost");
    assert!(lost.contains("another connection"), "{lost}");
    not_lost(&other_lines);
}

/// Local peers that do not speak the protocol (garbage, a huge length, a half frame,
/// silence) are dropped; the listener serves on.
#[test]
fn a_listener_survives_bad_local_peers() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let run = runtime(dir.path());
    let (daemon, _) = bin::start(&state, true);
    let cred = enroll(&daemon, &state, "dev", dir.path());
    let cred_arg = cred.to_str().unwrap();
    let (mut listener, lines) = bin::listen_in(&["--echo"], &cred, &run);
    expect_line(&lines, "connected as dev");
    let before = session(&state, "dev");
    let sock = socket(&run);
    let connect = || std::os::unix::net::UnixStream::connect(&sock).unwrap();

    // Held open, saying nothing, while the others are served.
    let _silent = connect();
    // A length over the limit, and an HTTP request (its first bytes are a huge length):
    // the connection is closed, nothing answered.
    for garbage in [&[0xff, 0xff, 0xff, 0xff][..], b"GET / HTTP/1.1\r\n\r\n"] {
        let mut s = connect();
        s.write_all(garbage).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(answer.is_empty(), "{answer:?}");
    }
    // A whole frame of another version: declined (0x02, a reason).
    let mut s = connect();
    s.write_all(&[0, 0, 0, 5, b'T', b'S', b'H', b'9', 1])
        .unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    assert_eq!(answer.get(4), Some(&2), "{answer:?}");
    // Half a frame, then gone.
    let mut s = connect();
    s.write_all(&[0, 0, 1, 0, b'T', b'S']).unwrap();
    drop(s);

    let out = tally(&["request", "--cred", cred_arg, "still served"], &run);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "still served");
    assert_eq!(session(&state, "dev"), before, "the session was replaced");
    assert!(listener.try_wait().unwrap().is_none(), "the listener runs");
    not_lost(&lines);
}
