//! The real `tallyd` binary on an ephemeral port, for tests that need a separate process.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Every subcommand of `tallyd`: `serve` (the daemon) and its admin commands.
#[allow(dead_code)]
pub const TALLYD_SUBCOMMANDS: &[&str] = &[
    "serve",
    "init",
    "token",
    "tokens",
    "identities",
    "revoke",
    "remove",
    "status",
    "sessions",
    "send",
    "queue",
    "open-enrollment",
];

pub struct Daemon {
    pub child: Child,
    pub addr: String,
    /// What it logged up to the line with its address.
    pub startup_log: Vec<String>,
    /// What it logs after that, line by line.
    pub log: std::sync::mpsc::Receiver<String>,
}

impl Daemon {
    /// Waits (up to 20 s) for a log line containing every one of `parts`; returns it.
    #[allow(dead_code)]
    pub fn expect_log(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if parts.iter().all(|p| line.contains(p)) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line with {parts:?}"),
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tallyd` on an ephemeral port with `state` as its state directory. Returns it
/// and, if `first_start`, the banner it prints on stdout when it creates its keys.
pub fn start(state: &std::path::Path, first_start: bool) -> (Daemon, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tallyd"));
    cmd.args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state);
    start_cmd(cmd, first_start)
}

/// Starts `cmd`, a command line that runs `tallyd` (possibly through a wrapper), as
/// [`start`] does.
pub fn start_cmd(mut cmd: Command, first_start: bool) -> (Daemon, String) {
    let mut child = cmd
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut startup_log = Vec::new();
    let addr = loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            // It exited (its stderr ended) or hangs: what it said is the reason.
            let status = child.try_wait();
            let _ = child.kill();
            panic!(
                "tallyd did not log its address within 20 s (exit: {status:?}); its stderr:\n{}",
                startup_log.join("\n")
            );
        };
        assert!(
            !line.contains('\x1b'),
            "no colour codes when stderr is not a terminal: {line:?}"
        );
        startup_log.push(line.clone());
        // " addr=": not the metrics line's "metrics_addr=".
        if let Some(rest) = line.split(" addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let mut out = String::new();
    if first_start {
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        while !out.contains("token --id") {
            assert!(
                stdout.read_line(&mut out).unwrap() > 0,
                "stdout ended: {out}"
            );
        }
    }
    (
        Daemon {
            child,
            addr,
            startup_log,
            log: rx,
        },
        out,
    )
}

/// The lines `r` gives (a child's stdout or stderr), read on a thread of their own.
pub fn lines(r: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// `tallyd ARGS --state-dir STATE` (an admin command), run to its end.
#[allow(dead_code)]
pub fn admin(state: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap()
}

/// A command's output as text.
#[allow(dead_code)]
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Enrolls `id` with the real binaries, as a user does: the open token from `tallyd
/// token`, then `tally enroll` (the token in `$TALLY_TOKEN`). Returns the credential
/// file, `ID.cred` in `dir`.
#[allow(dead_code)]
pub fn enroll(
    daemon: &Daemon,
    state: &std::path::Path,
    id: &str,
    dir: &std::path::Path,
) -> std::path::PathBuf {
    let token = admin(state, &["token"]);
    assert!(token.status.success(), "{}", text(&token.stderr));
    let cred = dir.join(format!("{id}.cred"));
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .env("TALLY_TOKEN", text(&token.stdout).trim())
        .args(["enroll", "--id", id, "--server", &daemon.addr, "--out"])
        .arg(&cred)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    cred
}

/// A child process killed when dropped: a test that fails leaves nothing running.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tally listen ARGS --cred CRED`, its stdout discarded; its stderr, line by line. Its
/// shared-session socket is in CRED's directory (`$XDG_RUNTIME_DIR` there), never in
/// this user's runtime directory.
#[allow(dead_code)]
pub fn listen(
    args: &[&str],
    cred: &std::path::Path,
) -> (KillOnDrop, std::sync::mpsc::Receiver<String>) {
    let run = std::path::absolute(cred.parent().unwrap()).unwrap();
    listen_in(args, cred, &run)
}

/// [`listen`] with `$XDG_RUNTIME_DIR` = `run` (where its shared-session socket goes).
#[allow(dead_code)]
pub fn listen_in(
    args: &[&str],
    cred: &std::path::Path,
    run: &std::path::Path,
) -> (KillOnDrop, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .env("XDG_RUNTIME_DIR", run)
        .arg("listen")
        .args(args)
        .arg("--cred")
        .arg(cred)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(child.stderr.take().unwrap());
    (KillOnDrop(child), rx)
}

/// The next line of `lines` containing `part` (within 20 s); panics naming it.
#[allow(dead_code)]
pub fn expect_line(lines: &std::sync::mpsc::Receiver<String>, part: &str) -> String {
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no line with {part:?}"));
        if line.contains(part) {
            return line;
        }
    }
}

/// The address a daemon started with `metrics_listen` serves its metrics on.
#[allow(dead_code)]
pub fn metrics_addr(daemon: &Daemon) -> String {
    let line = match daemon
        .startup_log
        .iter()
        .find(|l| l.contains("metrics_addr="))
    {
        Some(l) => l.clone(),
        None => daemon.expect_log(&["metrics_addr="]),
    };
    line.split("metrics_addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// `GET /metrics` at `addr`: the whole answer, checked to be OpenMetrics.
#[allow(dead_code)]
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("application/openmetrics-text"), "{text}");
    text
}

/// The value of `metric` (with its labels, as written) in a scrape.
#[allow(dead_code)]
pub fn metric(text: &str, metric: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(metric)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {metric} in\n{text}"))
}

/// `tally listen` says "connected" once its CLIENT_FINISH is on its way; the daemon
/// registers the session when it has verified it. A `tallyd send` in between finds no
/// session (seen on a loaded machine): wait until the daemon lists it.
#[allow(dead_code)]
pub fn await_session(state: &std::path::Path, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = admin(state, &["sessions", "--json"]);
        let sessions: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let listed = sessions
            .as_array()
            .is_some_and(|all| all.iter().any(|s| s["id"] == id));
        if listed {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no session of {id}: {}",
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
