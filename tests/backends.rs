//! Backends and server-initiated traffic: the Python example application over the Unix
//! socket backend, an HTTP backend, sends from the operator and the application to
//! devices, and every backend failure turned into an error status for that request only.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{eventually, TestServer};
use tally::backend;
use tally::client::{ClientError, Incoming};
use tally::config::BackendSpec;
use tally::proto::Status;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Answers every server request with "ack:" + payload; forwards messages to `messages`.
fn answer_requests(
    mut incoming: tokio::sync::mpsc::Receiver<Incoming>,
    messages: Arc<Mutex<Vec<Bytes>>>,
) {
    tokio::spawn(async move {
        while let Some(item) = incoming.recv().await {
            match item {
                Incoming::Request(req) => {
                    let body = [b"ack:".as_slice(), &req.payload].concat();
                    let _ = req.respond(Status::OK, Bytes::from(body)).await;
                }
                Incoming::Message(m) => messages.lock().unwrap().push(m),
                other => panic!("unexpected {other:?}"),
            }
        }
    });
}

struct PythonApp(Child);

impl PythonApp {
    fn start(sock: &Path) -> PythonApp {
        let _ = std::fs::remove_file(sock);
        let child = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/backend.py"))
            .arg(sock)
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs examples/backend.py");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "the example app did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        PythonApp(child)
    }
}

impl Drop for PythonApp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Repeats a request until its status is `want` (the backend connects asynchronously).
async fn until_status(c: &tally::client::Client, payload: &'static str, want: Status) -> Bytes {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = tokio::time::timeout(Duration::from_secs(3), c.request_with_status(payload)).await;
        match r {
            Ok(Ok((s, body))) if s == want => return body,
            other => assert!(
                Instant::now() < deadline,
                "never got status {want} for {payload:?}: last {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sock_path(dir: &TempDir) -> PathBuf {
    dir.path().join("app.sock")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_app_answers_requests_pushes_config_and_survives_restarts() {
    if !common::python3_or_skip(
        "python_example_app_answers_requests_pushes_config_and_survives_restarts",
    ) {
        return;
    }
    let dir = Arc::new(TempDir::new().unwrap());
    let sock = sock_path(&dir);
    let app = PythonApp::start(&sock);
    let spec: BackendSpec = format!("unix:{}", sock.display()).parse().unwrap();
    let srv = TestServer::start_with(dir.clone(), backend::from_spec(&spec).unwrap(), |c| {
        c.backend = spec.clone()
    })
    .await;
    let (c, incoming) = srv.connect(&srv.enroll("dev-py").await).await;
    answer_requests(incoming, Arc::default());
    let (other, _) = srv.connect(&srv.enroll("other").await).await;

    let hello = until_status(&c, "hi", Status::OK).await;
    assert_eq!(hello, Bytes::from_static(b"hello dev-py, you said: hi"));
    // The application pushes a configuration to the device (a server-initiated REQUEST)
    // and reports the device's answer.
    assert_eq!(
        c.request("push-config").await.unwrap(),
        Bytes::from_static(b"dev-py answered: ack:{\"interval\":60}")
    );
    // Or to another device, which answers.
    assert_eq!(
        other.request("push-config dev-py").await.unwrap(),
        Bytes::from_static(b"dev-py answered: ack:{\"interval\":60}")
    );
    // A device that does not answer server requests (`other` drops them: UNAVAILABLE).
    assert_eq!(
        c.request("push-config other").await.unwrap(),
        Bytes::from_static(b"other answered with status 1: no handler answered")
    );

    // The application goes down: requests get UNAVAILABLE at once; the session stays.
    drop(app);
    until_status(&c, "while down", Status::UNAVAILABLE).await;
    until_status(&other, "other, while down", Status::UNAVAILABLE).await;
    // It comes back: tallyd reconnects by itself.
    let _app = PythonApp::start(&sock);
    assert_eq!(
        until_status(&c, "back", Status::OK).await,
        Bytes::from_static(b"hello dev-py, you said: back")
    );
    assert_eq!(
        c.request("same session").await.unwrap(),
        Bytes::from_static(b"hello dev-py, you said: same session")
    );
}

/// A minimal HTTP/1.1 server: records requests, answers "fail" with 503.
/// Requests the test HTTP server saw: header lines and body.
type Seen = Arc<Mutex<Vec<(Vec<String>, Vec<u8>)>>>;

async fn http_server(seen: Seen) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut rd = BufReader::new(rd);
                loop {
                    let mut headers = Vec::new();
                    loop {
                        let mut line = String::new();
                        if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        headers.push(line.trim_end().to_owned());
                    }
                    let len = headers
                        .iter()
                        .find_map(|h| {
                            h.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(|v| v.parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    let mut body = vec![0; len];
                    rd.read_exact(&mut body).await.unwrap();
                    let header = |name: &str| {
                        headers
                            .iter()
                            .find_map(|h| h.strip_prefix(&format!("{name}: ")).map(str::to_owned))
                            .unwrap_or_default()
                    };
                    let (code, answer) = if body == b"fail" {
                        ("503 Service Unavailable", b"down for maintenance".to_vec())
                    } else {
                        let a = format!(
                            "http:{}:{}:",
                            header("tally-identity"),
                            header("tally-sequence")
                        );
                        ("200 OK", [a.as_bytes(), &body].concat())
                    };
                    seen.lock().unwrap().push((headers, body));
                    let head = format!(
                        "HTTP/1.1 {code}\r\ncontent-length: {}\r\n\r\n",
                        answer.len()
                    );
                    wr.write_all(head.as_bytes()).await.unwrap();
                    wr.write_all(&answer).await.unwrap();
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn http_backend_maps_requests_and_statuses() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let addr = http_server(seen.clone()).await;
    let spec: BackendSpec = format!("http://{addr}/tally").parse().unwrap();
    let srv = TestServer::start_with(
        Arc::new(TempDir::new().unwrap()),
        backend::from_spec(&spec).unwrap(),
        |_| {},
    )
    .await;
    let (c, _) = srv.connect(&srv.enroll("dev-h").await).await;
    assert_eq!(
        c.request("x").await.unwrap(),
        Bytes::from_static(b"http:dev-h:1:x")
    );
    assert_eq!(
        c.request("y").await.unwrap(),
        Bytes::from_static(b"http:dev-h:2:y")
    );
    let err = c.request("fail").await.unwrap_err();
    match err {
        ClientError::Status { status, payload } => {
            assert_eq!(status, Status(503));
            assert_eq!(payload, Bytes::from_static(b"down for maintenance"));
        }
        other => panic!("{other:?}"),
    }
    c.message("note").await.unwrap();
    eventually(5, "the message reached the HTTP backend", || {
        seen.lock().unwrap().len() == 4
    })
    .await;
    let all = seen.lock().unwrap().clone();
    assert!(
        all[0].0.iter().any(|h| h == "POST /tally HTTP/1.1"),
        "{:?}",
        all[0].0
    );
    assert!(all[0]
        .0
        .iter()
        .any(|h| h.eq_ignore_ascii_case("tally-kind: request")));
    assert!(
        all[3]
            .0
            .iter()
            .any(|h| h.eq_ignore_ascii_case("tally-kind: message"))
            && all[3].1 == b"note"
    );
    assert_eq!(
        c.request("still").await.unwrap(),
        Bytes::from_static(b"http:dev-h:5:still"),
        "the session goes on"
    );
}

#[tokio::test]
async fn http_backend_down_is_unavailable_not_a_hang() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec: BackendSpec = format!("http://127.0.0.1:{port}/nothing-here")
        .parse()
        .unwrap();
    let srv = TestServer::start_with(
        Arc::new(TempDir::new().unwrap()),
        backend::from_spec(&spec).unwrap(),
        |_| {},
    )
    .await;
    let (c, _) = srv.connect(&srv.enroll("dev").await).await;
    let (status, _) = tokio::time::timeout(Duration::from_secs(5), c.request_with_status("x"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, Status::UNAVAILABLE);
}

#[tokio::test]
async fn operator_sends_requests_and_messages_to_a_connected_device() {
    let srv = TestServer::start(|_| {}).await;
    let (c, incoming) = srv.connect(&srv.enroll("field-unit").await).await;
    let messages = Arc::new(Mutex::new(Vec::new()));
    answer_requests(incoming, messages.clone());
    c.request("online").await.unwrap();
    let dir = srv.dir.path().to_owned();
    let (d2, d3, d4) = (dir.clone(), dir.clone(), dir.clone());
    let answer = tokio::task::spawn_blocking(move || {
        tally::admin::send(&d2, "field-unit", true, b"reboot?", Duration::from_secs(5))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(answer, Some((Status::OK, b"ack:reboot?".to_vec())));
    let sent = tokio::task::spawn_blocking(move || {
        tally::admin::send(&d3, "field-unit", false, b"fyi", Duration::from_secs(5))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(sent, None);
    eventually(5, "the message arrived", || {
        messages.lock().unwrap().as_slice() == [Bytes::from_static(b"fyi")]
    })
    .await;
    let offline = tokio::task::spawn_blocking(move || {
        tally::admin::send(&d4, "nobody", true, b"x", Duration::from_secs(5))
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        offline
            .to_string()
            .contains("identity nobody is not connected"),
        "{offline}"
    );
    let table = tokio::task::spawn_blocking(move || {
        tally::admin::sessions(&dir, tally::admin::Format::Table)
    })
    .await
    .unwrap()
    .unwrap();
    let row = table
        .lines()
        .find(|l| l.starts_with("field-unit"))
        .expect("listed");
    assert!(row.contains("127.0.0.1:"), "{table}");
    assert_eq!(
        c.request("after").await.unwrap(),
        Bytes::from_static(b"after")
    );
}

/// A fake backend application that misbehaves in a given way.
async fn fake_app(sock: PathBuf, behaviour: &'static str) {
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    if behaviour == "garbage" {
                        let _ = s.write_all(&[0, 0, 0, 1, 0x77]).await;
                    } // "slow": read and never answer
                }
            });
        }
    });
}

#[tokio::test]
async fn backend_failures_become_error_statuses_and_sessions_go_on() {
    for (behaviour, want) in [
        ("slow", Status::TIMEOUT),
        ("garbage", Status::UNAVAILABLE),
        ("down", Status::UNAVAILABLE),
    ] {
        let dir = Arc::new(TempDir::new().unwrap());
        let sock = sock_path(&dir);
        if behaviour != "down" {
            fake_app(sock.clone(), behaviour).await;
        }
        let spec: BackendSpec = format!("unix:{}", sock.display()).parse().unwrap();
        let srv = TestServer::start_with(dir.clone(), backend::from_spec(&spec).unwrap(), |c| {
            c.limits.backend_timeout = Duration::from_millis(300)
        })
        .await;
        let (a, _) = srv.connect(&srv.enroll("a").await).await;
        let (b, _) = srv.connect(&srv.enroll("b").await).await;
        // Wait for the daemon to connect (not for "down": it never will).
        tokio::time::sleep(Duration::from_millis(300)).await;
        for c in [&a, &b, &a] {
            let r = tokio::time::timeout(Duration::from_secs(5), c.request_with_status("q")).await;
            let (status, _) = r
                .unwrap_or_else(|_| panic!("{behaviour}: request hung"))
                .unwrap();
            assert_eq!(status, want, "{behaviour}");
        }
        assert_eq!(
            srv.state.registry.len(),
            2,
            "{behaviour}: both sessions are still live"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_listen_exec_answers_tallyd_send() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (daemon, _) = common::bin::start(&state, true);
    let token = tally::admin::open_token(&state, None, false).unwrap().token;
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .env("TALLY_TOKEN", &*token)
        .args([
            "enroll",
            "--id",
            "cli-dev",
            "--server",
            &daemon.addr,
            "--out",
        ])
        .arg(dir.path().join("cli-dev.cred"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut listen = Command::new(env!("CARGO_BIN_EXE_tally"))
        .env("XDG_RUNTIME_DIR", dir.path())
        .args(["listen", "--exec", "tr a-z A-Z", "--cred"])
        .arg(dir.path().join("cli-dev.cred"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(listen.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    assert!(line.contains("connected as cli-dev"), "{line}");
    common::bin::await_session(&state, "cli-dev");
    let tallyd = |args: &[&str]| common::bin::admin(&state, args);
    let sent = tallyd(&["send", "cli-dev", "--request", "hello device"]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&sent.stdout), "HELLO DEVICE");
    let sessions = tallyd(&["sessions"]);
    assert!(String::from_utf8_lossy(&sessions.stdout)
        .lines()
        .any(|l| l.starts_with("cli-dev")));
    let offline = tallyd(&["send", "ghost", "x"]);
    assert!(!offline.status.success());
    assert!(String::from_utf8_lossy(&offline.stderr).contains("identity ghost is not connected"));
    let _ = listen.kill();
    let mut printed = String::new();
    let _ = listen.wait();
    std::io::Read::read_to_string(&mut listen.stdout.take().unwrap(), &mut printed).unwrap();
    assert!(
        printed.contains("request: hello device") && printed.contains("answered: ok"),
        "{printed}"
    );
}

/// Issue 12: the backend's reconnect loop and its SEND tasks run under the daemon's
/// tracker. Shutdown stops them after the sessions drained, and `run` returns only when
/// they ended: nothing of the daemon is left running behind it.
#[tokio::test]
async fn shutdown_ends_the_backends_tasks_too() {
    let dir = Arc::new(TempDir::new().unwrap());
    // Nothing listens there: the backend keeps retrying until the daemon stops.
    let spec: BackendSpec = format!("unix:{}", sock_path(&dir).display())
        .parse()
        .unwrap();
    let mut srv = TestServer::start_with(dir.clone(), backend::from_spec(&spec).unwrap(), |c| {
        c.backend = spec.clone()
    })
    .await;
    let (c, _) = srv.connect(&srv.enroll("dev").await).await;
    let err = c.request_with_status("anyone?").await.unwrap();
    assert_eq!(err.0, Status::UNAVAILABLE, "{err:?}");
    assert!(srv.state.daemon_tasks() >= 1, "the reconnect loop runs");
    let state = srv.state.clone();
    tokio::time::timeout(Duration::from_secs(10), srv.begin_shutdown())
        .await
        .expect("shutdown completes")
        .unwrap()
        .unwrap();
    assert_eq!(state.daemon_tasks(), 0, "every daemon task ended");
}

/// A backend whose answer panics: at once ("now"), or after it waited ("later").
struct Panicking;

impl backend::Backend for Panicking {
    fn name(&self) -> &str {
        "panicking"
    }

    fn request(&self, req: backend::Request) -> backend::BoxFuture<backend::Reply> {
        Box::pin(async move {
            match &req.payload[..] {
                b"now" => panic!("backend bug, at once"),
                b"later" => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    panic!("backend bug, after a wait")
                }
                b"slow" => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    backend::Reply::ok(req.payload)
                }
                _ => backend::Reply::ok(req.payload),
            }
        })
    }
}

/// Backend futures run on the session's own task (issue 13: no task per request): one
/// that panics, whether on its first poll or later, answers that request
/// BACKEND_ERROR, and the session and the daemon go on; answers that are ready at once
/// and answers that wait both arrive.
#[tokio::test]
async fn a_panicking_backend_fails_one_request_not_the_session() {
    let srv = TestServer::start_with(
        Arc::new(TempDir::new().unwrap()),
        Arc::new(Panicking),
        |_| {},
    )
    .await;
    let (c, _) = srv.connect(&srv.enroll("p").await).await;
    for (payload, want) in [
        ("now", Status::BACKEND_ERROR),
        ("fine", Status::OK),
        ("later", Status::BACKEND_ERROR),
        ("slow", Status::OK),
        ("now", Status::BACKEND_ERROR),
    ] {
        let (status, body) =
            tokio::time::timeout(Duration::from_secs(5), c.request_with_status(payload))
                .await
                .unwrap_or_else(|_| panic!("{payload}: request hung"))
                .unwrap();
        assert_eq!(status, want, "{payload}");
        if want == Status::OK {
            assert_eq!(&body[..], payload.as_bytes());
        }
    }
    assert_eq!(srv.state.registry.len(), 1, "the session is still live");
    // Metrics: every request counted by outcome, whether answered at once (counted by
    // the session, summed at scrape) or late; only the late ones timed.
    let text = srv.state.metrics.encode(&srv.state);
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert_eq!(
        value("tally_backend_requests_total{outcome=\"ok\"}"),
        2.0,
        "{text}"
    );
    assert_eq!(
        value("tally_backend_requests_total{outcome=\"panic\"}"),
        3.0,
        "{text}"
    );
    assert_eq!(
        value("tally_backend_request_duration_seconds_count"),
        2.0,
        "{text}"
    );
}
