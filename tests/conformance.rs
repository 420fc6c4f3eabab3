//! Issue 15, item 4: `tally conformance` against the implementations of this
//! repository: tallyd as the server; `tally` and the C library's examples as clients.
//! And against implementations that break the rules, to show the checks can fail.

mod common;

use common::bin::{admin, text};

use std::path::Path;
use std::process::{Command, Output};

const TALLY: &str = env!("CARGO_BIN_EXE_tally");

fn conformance(args: &[&str], token: Option<&str>) -> Output {
    let mut cmd = Command::new(TALLY);
    cmd.arg("conformance").args(args);
    if let Some(t) = token {
        cmd.env("TALLY_TOKEN", t);
    }
    cmd.output().unwrap()
}

/// Every line of a passing run, and the summary: nothing failed or skipped.
fn assert_all_passed(out: &Output, at_least: usize) {
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let summary = stdout.lines().last().unwrap();
    assert!(
        summary.ends_with(" passed, 0 failed, 0 skipped"),
        "{stdout}"
    );
    let passed: usize = summary.split(' ').next().unwrap().parse().unwrap();
    assert!(passed >= at_least, "{stdout}");
    assert!(stdout.lines().filter(|l| l.starts_with("ok  ")).count() == passed);
}

#[test]
fn tallyd_passes_every_server_check() {
    server_checks("");
}

/// The takeover check accepts either policy of spec 7.3 (review finding: with
/// `takeover = "reject"` it timed out waiting on the wrong connection).
#[test]
fn tallyd_with_the_reject_policy_passes_every_server_check() {
    server_checks("takeover = \"reject\"\n");
}

fn server_checks(config: &str) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // Refusals answered at once (spec 13.10 lets a server delay them up to 7.5 s).
    std::fs::write(
        dir.path().join("t.toml"),
        format!("{config}[limits]\nrefusal_delay = 0\n"),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tallyd"));
    cmd.args(["--listen", "127.0.0.1:0", "--config"])
        .arg(dir.path().join("t.toml"))
        .arg("--state-dir")
        .arg(&state);
    let (daemon, _) = common::bin::start_cmd(cmd, true);
    let token = text(&admin(&state, &["token"]).stdout);
    let out = conformance(
        &["server", &daemon.addr, "--timeout", "5"],
        Some(token.trim()),
    );
    assert_all_passed(&out, 24);
    // The ids it enrolled are real ones in the store.
    let ids = admin(&state, &["identities"]);
    assert!(text(&ids.stdout).contains("conformance-"));

    // A per-identity token cannot drive the checks: said, and a failure.
    let id_token = admin(&state, &["token", "--id", "x"]);
    let out = conformance(
        &["server", &daemon.addr],
        Some(text(&id_token.stdout).trim()),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("give the open token"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn tally_passes_every_client_check() {
    let out = conformance(
        &[
            "client",
            "--exec",
            &format!("{TALLY} request --retries 0 --cred {{cred}} {{payload}}"),
            "--enroll-exec",
            &format!("{TALLY} enroll --token-file - --server {{server}} --id {{id}} --out {{out}}"),
        ],
        None,
    );
    assert_all_passed(&out, 15);
}

#[test]
fn the_c_library_passes_every_client_check() {
    let c = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/c");
    if !c.join("request").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "target/c/request is missing: .ci/run builds it"
        );
        eprintln!("SKIPPED: the C examples are not built (cargo build -p tally-c && make -C c)");
        return;
    }
    let out = conformance(
        &[
            "client",
            "--exec",
            &format!("{}/request {{cred}} {{payload}}", c.display()),
            "--enroll-exec",
            &format!("{}/enroll {{server}} {{id}} {{out}}", c.display()),
        ],
        None,
    );
    assert_all_passed(&out, 15);
}

/// `examples/lax_client.rs` speaks the protocol but checks nothing it receives: every
/// scenario it should refuse, where a broken client is observable, must fail.
#[test]
fn a_client_that_checks_nothing_fails_the_checks() {
    let exe = std::env::current_exe().unwrap();
    let lax = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/lax_client");
    if !lax.exists() {
        // `cargo test` builds the examples; `cargo test --test conformance` does not.
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing under CI",
            lax.display()
        );
        eprintln!(
            "SKIPPED: {} not built (run the whole `cargo test`)",
            lax.display()
        );
        return;
    }
    let out = conformance(
        &[
            "client",
            "--exec",
            &format!("{} {{cred}} {{payload}}", lax.display()),
            "--timeout",
            "5",
        ],
        None,
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let line = |rule: &str| {
        stdout
            .lines()
            .find(|l| l.contains(rule))
            .unwrap_or_else(|| panic!("no line for {rule:?}:\n{stdout}"))
            .to_owned()
    };
    assert!(line("honest server").starts_with("ok"), "{stdout}");
    for rule in [
        "SERVER_AUTH with a bad tag",
        "a RESPONSE with a bad tag",
        "a duplicated sequence number",
        "a gap in sequence numbers",
        "unsolicited",
        "replayed from an earlier session",
        "an ERROR injected after a session frame",
        "above the limit the client announced",
    ] {
        let l = line(rule);
        assert!(l.starts_with("FAIL") && l.contains("accepted"), "{l}");
    }
}

/// A "client" that does not even get its answer from an honest server: the control
/// fails and nothing else is judged on top of it.
#[test]
fn a_client_that_fails_the_control_is_not_judged_further() {
    let out = conformance(&["client", "--exec", "exit 0", "--timeout", "2"], None);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let mut lines = stdout.lines();
    assert!(lines.next().unwrap().starts_with("FAIL  §7.1"), "{stdout}");
    assert!(
        stdout
            .lines()
            .last()
            .unwrap()
            .starts_with("0 passed, 1 failed, 17 skipped"),
        "{stdout}"
    );
}

/// A "server" that is not Tally (it closes every connection): the first check fails,
/// and the rest are not run on top of it.
#[test]
fn a_server_that_is_not_tally_fails_the_checks() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    let token = format!("tally1-open-{}-{}", "00".repeat(32), "11".repeat(32));
    let out = conformance(&["server", &addr, "--timeout", "2"], Some(&token));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.starts_with("FAIL  §6.2"), "{stdout}");
}

/// Review finding: a client that hangs, with a child of its own holding the pipes, kept
/// the tool waiting after it killed the shell. The whole process group goes now.
#[test]
fn a_hanging_client_and_its_children_are_killed() {
    let mut child = Command::new(TALLY)
        .args([
            "conformance",
            "client",
            "--exec",
            "sleep 300 & sleep 300",
            "--timeout",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("tally conformance client hung on a client's child process");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("FAIL  §7.1"), "{stdout}");
    assert!(stdout.contains("did not connect"), "{stdout}");
}
