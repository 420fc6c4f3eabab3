//! Issue 14, item 10: a device on a persistent connection survives a daemon restart. The
//! library's `Link` reconnects with jittered backoff, backs off after TAKEN_OVER as spec
//! 7.3 says, stops for a revocation, and tells the application when the session goes up
//! and down; `tally listen` runs on it.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::bin::{admin, await_session, enroll, expect_line, listen, text};
use common::TestServer;
use tally::client::{Backoff, ClientError, ClientOptions, Link, LinkEvent};
use tally::proto::CloseCode;
use tokio::sync::mpsc::Receiver;

/// The next event that is not a server request or message, within 20 s.
async fn next(events: &mut Receiver<LinkEvent>) -> LinkEvent {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), events.recv()).await {
            Ok(Some(LinkEvent::Incoming(_))) => continue,
            Ok(Some(e)) => return e,
            Ok(None) => panic!("the link's events ended"),
            Err(_) => panic!("no link event within 20 s"),
        }
    }
}

fn is_closed(e: &ClientError, want: CloseCode) -> bool {
    matches!(e, ClientError::Closed { code, .. } if *code == want)
}

#[tokio::test]
async fn a_link_comes_back_after_the_daemon_restarts() {
    let srv = TestServer::start(|_| {}).await;
    let cred = srv.enroll("persistent").await;
    let reconnect = Backoff::link()
        .with_delays(Duration::from_millis(40), Duration::from_millis(160))
        .with_stable_after(Duration::from_secs(3600));
    let (link, mut events) = Link::start(cred, ClientOptions::default(), reconnect);
    assert!(matches!(next(&mut events).await, LinkEvent::Up(_)));
    assert_eq!(link.request("before").await.unwrap(), "before");

    let (dir, addr) = (srv.dir.clone(), srv.addr);
    srv.shutdown().await;
    match next(&mut events).await {
        LinkEvent::Down {
            error,
            retry_in,
            was_up: true,
        } => {
            assert!(is_closed(&error, CloseCode::SHUTDOWN), "{error:?}");
            assert!(
                (Duration::from_millis(20)..=Duration::from_millis(40)).contains(&retry_in),
                "the first delay, jittered between half and all of it: {retry_in:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(link.client().is_none(), "no session while it is down");
    // While the daemon is away, attempts fail and the delays grow up to the maximum.
    let mut delays = Vec::new();
    while delays.len() < 4 {
        match next(&mut events).await {
            LinkEvent::Down {
                error,
                retry_in,
                was_up: false,
            } => {
                assert!(matches!(error, ClientError::Connect { .. }), "{error:?}");
                delays.push(retry_in);
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(delays[0] >= Duration::from_millis(40), "{delays:?}");
    assert!(
        delays.iter().all(|d| *d <= Duration::from_millis(160)),
        "{delays:?}"
    );
    assert!(delays[3] >= Duration::from_millis(80), "{delays:?}");

    let srv =
        TestServer::start_with(dir, Arc::new(tally::backend::Echo), |c| c.listen = addr).await;
    loop {
        match next(&mut events).await {
            LinkEvent::Up(client) => {
                assert_eq!(client.request("after").await.unwrap(), "after");
                break;
            }
            LinkEvent::Down { was_up: false, .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        link.request("again").await.unwrap(),
        Bytes::from_static(b"again")
    );
    link.close().await;
    assert!(matches!(
        next(&mut events).await,
        LinkEvent::Stopped(ClientError::SessionClosed)
    ));
    common::eventually(5, "the closed link's session gone", || {
        srv.state.registry.is_empty()
    })
    .await;
}

/// Spec 7.3: a client that receives CLOSE TAKEN_OVER does not reconnect at once; it
/// backs off, longer each time in a row, and reports it.
#[tokio::test]
async fn a_taken_over_link_backs_off_and_longer_the_second_time() {
    let srv = TestServer::start(|_| {}).await;
    let cred = srv.enroll("shared").await;
    let base = Duration::from_millis(300);
    let reconnect = Backoff::link()
        .with_refused_delays(base, Duration::from_secs(20))
        .with_stable_after(Duration::from_secs(3600));
    let (link, mut events) = Link::start(cred.clone(), ClientOptions::default(), reconnect);
    assert!(matches!(next(&mut events).await, LinkEvent::Up(_)));

    let mut expected = base;
    for round in 0..2 {
        // Another connection of the same identity takes the session over.
        let (intruder, _incoming) = srv.connect(&cred).await;
        let retry_in = match next(&mut events).await {
            LinkEvent::Down {
                error, retry_in, ..
            } => {
                assert!(is_closed(&error, CloseCode::TAKEN_OVER), "{error:?}");
                retry_in
            }
            other => panic!("{other:?}"),
        };
        assert!(
            retry_in >= expected && retry_in <= expected.mul_f64(1.5),
            "round {round}: {retry_in:?}, expected {expected:?} to 1.5x"
        );
        // Not at once: the intruder keeps the session for at least half the delay.
        tokio::time::sleep(expected / 2).await;
        assert_eq!(intruder.request("mine").await.unwrap(), "mine");
        // Then the link takes it back.
        assert!(matches!(next(&mut events).await, LinkEvent::Up(_)));
        let end = tokio::time::timeout(Duration::from_secs(5), intruder.closed())
            .await
            .unwrap();
        assert!(is_closed(&end, CloseCode::TAKEN_OVER), "{end:?}");
        expected *= 2;
    }
    link.close().await;
}

#[tokio::test]
async fn a_revocation_stops_the_link_for_good() {
    let srv = TestServer::start(|_| {}).await;
    let cred = srv.enroll("doomed").await;
    let reconnect =
        Backoff::link().with_delays(Duration::from_millis(10), Duration::from_millis(20));
    let (link, mut events) = Link::start(cred, ClientOptions::default(), reconnect);
    assert!(matches!(next(&mut events).await, LinkEvent::Up(_)));
    let dir = srv.dir.path().to_owned();
    tokio::task::spawn_blocking(move || tally::admin::revoke(&dir, None, "doomed"))
        .await
        .unwrap()
        .unwrap();
    match next(&mut events).await {
        LinkEvent::Stopped(e) => assert!(is_closed(&e, CloseCode::REVOKED), "{e:?}"),
        other => panic!("{other:?}"),
    }
    let err = link.session().await.unwrap_err();
    assert!(is_closed(&err, CloseCode::REVOKED), "{err:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), events.recv())
            .await
            .is_ok_and(|e| e.is_none()),
        "nothing after Stopped, and no new attempt"
    );
}

/// The real binaries: `tally listen --echo` keeps answering the server's requests across
/// a restart of `tallyd` (SIGTERM, then a new daemon on the same address and state).
#[test]
fn tally_listen_survives_a_daemon_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (daemon, _) = common::bin::start(&state, true);
    let addr = daemon.addr.clone();
    let tallyd = |args: &[&str]| {
        let out = admin(&state, args);
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let cred = enroll(&daemon, &state, "dev", dir.path());
    let (mut listen, lines) = listen(&["--echo"], &cred);
    let expect = |part: &str| expect_line(&lines, part);
    expect("connected as dev");
    await_session(&state, "dev");
    let (ok, answer, err) = tallyd(&["send", "dev", "--request", "first"]);
    assert!(ok && answer == "first", "{answer:?} {err}");

    let mut daemon = daemon;
    let pid = daemon.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(daemon.child.wait().unwrap().success());
    let lost = expect("session lost");
    assert!(
        lost.contains("server shutdown") && lost.contains("reconnecting in"),
        "{lost}"
    );

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tallyd"));
    cmd.args(["--listen", &addr, "--state-dir"]).arg(&state);
    let (_daemon, _) = common::bin::start_cmd(cmd, false);
    expect("reconnected as dev");
    await_session(&state, "dev");
    let (ok, answer, err) = tallyd(&["send", "dev", "--request", "second"]);
    assert!(ok && answer == "second", "{answer:?} {err}");
    assert!(
        listen.try_wait().unwrap().is_none(),
        "tally listen still runs"
    );
}

/// Review finding: `tally listen` exited for good when its first attempt failed in a way
/// someone on the path can forge (a SERVER_AUTH that does not verify, an ERROR). It
/// keeps trying, slowly (at least the 10 s refusal delay), and says why.
#[test]
fn tally_listen_does_not_give_up_on_an_unauthenticated_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, _) = common::bin::start(&dir.path().join("state"), true);
    let cred = tally::proto::credential::Credential {
        id: tally::proto::Id::new("never-enrolled").unwrap(),
        key: tally::proto::SecretKey::from_bytes([9; 32]),
        server: daemon.addr.clone(),
        server_key: [9; 32],
    };
    let path = dir.path().join("x.cred");
    std::fs::write(&path, cred.to_file().as_bytes()).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (mut listen, lines) = listen(&[], &path);
    let line = expect_line(&lines, "");
    assert!(
        line.contains("cannot connect") && line.contains("did not authenticate"),
        "{line}"
    );
    assert!(
        !line.contains('\x1b'),
        "no colour codes into a pipe: {line:?}"
    );
    let secs: f64 = line
        .split("reconnecting in ")
        .nth(1)
        .and_then(|r| r.trim_end().strip_suffix(" s"))
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();
    assert!((10.0..=15.0).contains(&secs), "{line}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(listen.try_wait().unwrap().is_none(), "still running");
}

/// Review finding: `tally listen` ran each `--exec` handler inline, so one slow request
/// held up every other (and Ctrl-C). A fast request is answered while a slow one waits.
#[test]
fn tally_listen_answers_requests_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (daemon, _) = common::bin::start(&state, true);
    let tallyd = |args: &[&str]| admin(&state, args);
    let cred = enroll(&daemon, &state, "dev", dir.path());
    let (go, started) = (dir.path().join("go"), dir.path().join("started"));
    let handler = format!(
        "read p; if [ \"$p\" = slow ]; then touch {}; while [ ! -f {} ]; do sleep 0.05; done; fi; printf %s \"$p\"",
        started.display(),
        go.display()
    );
    let (_listen, lines) = listen(&["--exec", &handler], &cred);
    expect_line(&lines, "connected as dev");
    await_session(&state, "dev");
    let state2 = state.clone();
    let slow = std::thread::spawn(move || {
        admin(
            &state2,
            &["send", "dev", "--request", "--timeout", "60", "slow\n"],
        )
    });
    // The slow one's handler runs, waiting for `go`; the fast one must not wait behind it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !started.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow handler never ran"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let fast = tallyd(&["send", "dev", "--request", "--timeout", "30", "fast\n"]);
    assert!(fast.status.success(), "{fast:?}");
    assert_eq!(String::from_utf8_lossy(&fast.stdout), "fast");
    assert!(!slow.is_finished(), "the slow request is still waiting");
    // Longer than the control socket's 5 s for quick answers: `tallyd send --request`
    // waited 5 s whatever its --timeout, then failed with EAGAIN (found by this test).
    std::thread::sleep(Duration::from_secs(6));
    std::fs::write(&go, b"").unwrap();
    let slow = slow.join().unwrap();
    assert!(slow.status.success(), "{slow:?}");
    assert_eq!(String::from_utf8_lossy(&slow.stdout), "slow");
}
