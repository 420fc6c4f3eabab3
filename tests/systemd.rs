//! tallyd under (simulated) systemd: a socket passed as fd 3 with LISTEN_FDS=1, a
//! NOTIFY_SOCKET this test listens on, keys from a credentials directory; READY=1,
//! STATUS=, SIGHUP reload without dropping sessions, STOPPING=1 and exit 0 on SIGTERM.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tally::client::{self, Client, ClientError, ClientOptions};
use tally::proto::credential::EnrollmentToken;
use tally::proto::{CloseCode, Id};
use tokio::io::AsyncReadExt;

struct Notifications(UnixDatagram);

impl Notifications {
    /// Waits for a datagram containing `what`; returns it.
    fn expect(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no notification containing {what:?}");
            self.0.set_read_timeout(Some(left)).unwrap();
            if let Ok(n) = self.0.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.contains(what) {
                    return msg;
                }
            }
        }
    }
}

fn kill(child: &Child, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_notify_credentials_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let creds = dir.path().join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    let store_key = [0x5e; 32];
    tally::secrets::write_secret_file(
        &creds.join(tally::secrets::STORE_KEY),
        hex::encode(store_key).as_bytes(),
    )
    .unwrap();
    let config = dir.path().join("tallyd.toml");
    std::fs::write(&config, "[limits]\nmax_connections = 100\n").unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notes = Notifications(UnixDatagram::bind(&notify_path).unwrap());

    // The "socket unit": bound here, handed to tallyd as fd 3.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd: OwnedFd = listener.into();
    // sh puts the socket (its stdin) at fd 3 and execs tallyd, keeping its pid for LISTEN_PID.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 WATCHDOG_PID=$$ exec \"$0\" \"$@\" 3<&0 0</dev/null")
        .arg(env!("CARGO_BIN_EXE_tallyd"))
        .args(["serve", "--listen", "127.0.0.1:1", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .env("JOURNAL_STREAM", "8:1234")
        .env("WATCHDOG_USEC", "400000")
        .env_remove("RUST_LOG")
        .stdin(Stdio::from(fd))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).unwrap();
        s
    });

    notes.expect("READY=1");
    notes.expect("WATCHDOG=1");
    // The store key came from the credentials directory, not the state directory.
    assert!(!state.join(tally::secrets::STORE_KEY).exists());
    let out = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["token", "--state-dir"])
        .arg(&state)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    // The token printed by an admin command with the same credentials enrolls below.
    let token = EnrollmentToken::parse(&String::from_utf8(out.stdout).unwrap()).unwrap();

    // The passed socket serves enrollment and sessions (tallyd was told to listen on port 1).
    let cred = client::enroll(
        &addr.to_string(),
        &token,
        Id::new("unit-dev").unwrap(),
        &client::ClientOptions::default().with_connect_timeout(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    let (c, _) = Client::connect(&cred, ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(
        c.request("via fd 3").await.unwrap(),
        Bytes::from_static(b"via fd 3")
    );
    notes.expect("STATUS=1 live session");

    // SIGHUP: a lower connection limit applies to new connections; the session stays.
    std::fs::write(&config, "[limits]\nmax_connections = 1\n").unwrap();
    kill(&child, "-HUP");
    notes.expect("RELOADING=1");
    notes.expect("READY=1");
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut got)).await;
    assert_eq!(
        got,
        [0, 0, 0, 4, 0x1f, 0, 6, 1],
        "BUSY under the reloaded limit"
    );
    assert_eq!(
        c.request("still here").await.unwrap(),
        Bytes::from_static(b"still here")
    );

    // SIGHUP with an invalid configuration: the reload ends (READY=1, or systemd would
    // wait), but STATUS= says it did not take, and the running configuration stays.
    std::fs::write(&config, "log_level = \"verbose\"\n").unwrap();
    kill(&child, "-HUP");
    notes.expect("RELOADING=1");
    let status = notes.expect("READY=1");
    assert!(
        status.contains("STATUS=1 live session; configuration NOT reloaded")
            && status.contains("\"verbose\" is not a log level"),
        "{status}"
    );
    assert_eq!(
        c.request("still served").await.unwrap(),
        Bytes::from_static(b"still served")
    );

    // SIGTERM: STOPPING=1, the session gets CLOSE SHUTDOWN, exit 0.
    kill(&child, "-TERM");
    notes.expect("STOPPING=1");
    let end = tokio::time::timeout(Duration::from_secs(10), c.closed())
        .await
        .unwrap();
    assert!(
        matches!(
            end,
            ClientError::Closed {
                code: CloseCode::SHUTDOWN,
                ..
            }
        ),
        "{end:?}"
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let log = log.join().unwrap();
    assert!(
        log.contains("<6>tally::server: listening"),
        "journald priority prefix, no timestamp:\n{log}"
    );
    assert!(log.contains("using the socket passed by systemd"), "{log}");
    assert!(
        log.contains("listen is ignored: systemd passed the socket") && log.contains("127.0.0.1:1"),
        "{log}"
    );
    assert!(
        log.contains("configuration not reloaded, keeping the running one"),
        "{log}"
    );
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(
        log.contains("<4>tally::server: refused: connection limit reached"),
        "{log}"
    );
    assert!(
        !state.join(tally::control::SOCKET).exists(),
        "control socket removed on exit"
    );
}
