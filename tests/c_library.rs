//! Issue 15, item 2: the C library's examples (`c/examples/`, built by `.ci/run` with
//! `make -C c` into `target/c/`) against a real tallyd: enrollment in both modes, a
//! request, credentials that the C and Rust clients share, a revoked identity, a wrong
//! token. The session modes (spec 7.7, 7.8): the examples' default, encrypted, against
//! tallyd's default policy ("required"), which refuses the authenticated mode with
//! MODE_REFUSED; the authenticated mode against a daemon started with `--encryption
//! allowed`. Skipped with a message when the examples are not built, except under CI.

mod common;

use common::bin::{admin, text};

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn example(name: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/c")
        .join(name);
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing: .ci/run builds it (cargo build -p tally-c; make -C c)",
        path.display()
    );
    eprintln!(
        "SKIPPED: {} not built (run `cargo build -p tally-c && make -C c`)",
        path.display()
    );
    None
}

fn run(cmd: &Path, args: &[&str], cwd: &Path, stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .current_dir(cwd)
        .env_remove("TALLY_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command may exit before it reads its input (enroll.c refusing an existing
    // file does): a broken pipe here is not the test's concern, its exit status is.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

#[test]
fn the_c_examples_enroll_and_request_against_tallyd() {
    let (Some(enroll), Some(request)) = (example("enroll"), example("request")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let state = cwd.join("state");
    let (daemon, _) = common::bin::start(&state, true);
    let tallyd = |args: &[&str]| {
        let out = admin(&state, args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let tally = Path::new(env!("CARGO_BIN_EXE_tally"));

    // Open mode.
    let open = tallyd(&["token"]);
    let out = run(&enroll, &[&daemon.addr, "c-dev", "c-dev.cred"], cwd, &open);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("enrolled c-dev"));
    let mode = std::fs::metadata(cwd.join("c-dev.cred")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    // The credential holds the server's key (spec 9.2), the one the token pinned.
    let cred = std::fs::read_to_string(cwd.join("c-dev.cred")).unwrap();
    let server_key = open.trim().rsplit('-').next().unwrap();
    assert!(
        cred.contains(&format!("server-key = \"{server_key}\"\n")),
        "{cred}"
    );
    // The encrypted mode, the default of both.
    let out = run(&request, &["c-dev.cred", "hello from C"], cwd, "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello from C");
    // The authenticated mode is refused by the default policy ("required"), with its
    // code, and the example does not try the encrypted mode instead (spec 7.8): one
    // refusal, no handshake.
    let handshakes = |state: &Path| -> (u64, u64) {
        let out = admin(state, &["status", "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            v["handshakes"].as_u64().unwrap(),
            v["refusals"]["mode_refused"].as_u64().unwrap_or(0),
        )
    };
    assert_eq!(handshakes(&state), (1, 0));
    let out = run(
        &request,
        &["--authenticate-only", "c-dev.cred", "x"],
        cwd,
        "",
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("MODE_REFUSED") && err.contains("(code 0x000a)"),
        "{err}"
    );
    assert!(err.contains("not retried in the other one"), "{err}");
    assert!(out.stdout.is_empty());
    assert_eq!(handshakes(&state), (1, 1), "no second attempt");
    // Issue 27: one every user may read is refused, as the Rust CLI refuses it.
    let set_mode = |mode| {
        std::fs::set_permissions(
            cwd.join("c-dev.cred"),
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .unwrap()
    };
    set_mode(0o644);
    let out = run(&request, &["c-dev.cred", "x"], cwd, "");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("chmod 600 c-dev.cred"),
        "{}",
        text(&out.stderr)
    );
    set_mode(0o600);

    // The Rust client reads the credential C wrote, and the other way round.
    let out = run(tally, &["request", "--cred", "c-dev.cred", "rust"], cwd, "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "rust");
    let token = tallyd(&["token", "--id", "rust-dev"]);
    let out = run(
        tally,
        &[
            "enroll",
            "--id",
            "rust-dev",
            "--server",
            &daemon.addr,
            "--out",
            "rust-dev.cred",
        ],
        cwd,
        &token,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(
        &request,
        &["rust-dev.cred", "C with a Rust credential"],
        cwd,
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "C with a Rust credential");

    // Per-identity token, used once; used again it is refused, with the code.
    let token = tallyd(&["token", "--id", "c-two"]);
    let out = run(&enroll, &[&daemon.addr, "c-two", "c-two.cred"], cwd, &token);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&enroll, &[&daemon.addr, "c-two", "again.cred"], cwd, &token);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("refused by the server (ERROR)"),
        "{}",
        text(&out.stderr)
    );
    assert!(!cwd.join("again.cred").exists(), "nothing written");

    // A credential file of another version is refused (spec 9.2), not half-read.
    let original = std::fs::read_to_string(cwd.join("c-two.cred")).unwrap();
    let v10 = original.replace("tally-credential = 1", "tally-credential = 10");
    std::fs::write(cwd.join("v10.cred"), v10).unwrap();
    std::fs::set_permissions(
        cwd.join("v10.cred"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let out = run(&request, &["v10.cred", "x"], cwd, "");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not a Tally credential"),
        "{}",
        text(&out.stderr)
    );
    // An existing credential file is not overwritten, and nothing is enrolled for it.
    let token = tallyd(&["token", "--id", "c-three"]);
    let out = run(
        &enroll,
        &[&daemon.addr, "c-three", "c-two.cred"],
        cwd,
        &token,
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("exists"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(cwd.join("c-two.cred")).unwrap(),
        original
    );

    // Revoked: the handshake fails like a wrong key (spec 7.5).
    tallyd(&["revoke", "c-dev"]);
    let out = run(&request, &["c-dev.cred", "x"], cwd, "");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("the server did not authenticate"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());
}

/// A daemon started with `--encryption allowed` accepts both modes: the C example in the
/// authenticated mode (HELLO), and in the encrypted mode.
#[test]
fn the_c_example_in_the_authenticated_mode_against_a_daemon_that_allows_it() {
    let (Some(enroll), Some(request)) = (example("enroll"), example("request")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let state = cwd.join("state");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tallyd"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--encryption",
        "allowed",
        "--state-dir",
    ])
    .arg(&state);
    let (daemon, _) = common::bin::start_cmd(cmd, true);
    let out = admin(&state, &["token", "--id", "c-auth"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout);
    let out = run(
        &enroll,
        &[&daemon.addr, "c-auth", "c-auth.cred"],
        cwd,
        &token,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(
        &request,
        &["--authenticate-only", "c-auth.cred", "in the clear, tagged"],
        cwd,
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "in the clear, tagged");
    let out = run(&request, &["c-auth.cred", "sealed"], cwd, "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "sealed");
}
