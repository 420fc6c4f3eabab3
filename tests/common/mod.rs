//! A daemon on 127.0.0.1:0 with its own state directory, for integration tests.
#![allow(dead_code)]

pub mod bin;
pub mod netns;
pub mod postgres;
pub mod proxy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tally::backend::{Backend, Echo};
use tally::client::{self, Client, ClientOptions, Incoming};
use tally::config::ServerConfig;
use tally::control;
use tally::proto::credential::{Credential, EnrollmentToken};
use tally::proto::Id;
use tally::server::{self, ServerState};
use tempfile::TempDir;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<ServerState>,
    pub config: ServerConfig,
    pub dir: Arc<TempDir>,
    stop: Option<oneshot::Sender<()>>,
    control_stop: CancellationToken,
    control_task: Option<JoinHandle<()>>,
    pub task: Option<JoinHandle<Result<(), server::ServerError>>>,
}

pub fn config(dir: &TempDir) -> ServerConfig {
    ServerConfig {
        state_dir: dir.path().to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    }
}

impl TestServer {
    /// Starts a daemon with the echo backend; `tune` adjusts the configuration.
    pub async fn start(tune: impl FnOnce(&mut ServerConfig)) -> TestServer {
        Self::start_with(Arc::new(TempDir::new().unwrap()), Arc::new(Echo), tune).await
    }

    /// Starts a daemon on an existing state directory with a given backend.
    pub async fn start_with(
        dir: Arc<TempDir>,
        backend: Arc<dyn Backend>,
        tune: impl FnOnce(&mut ServerConfig),
    ) -> TestServer {
        let mut cfg = config(&dir);
        tune(&mut cfg);
        let (state, _) = ServerState::open(&cfg, None, backend).unwrap();
        let listener = tokio::net::TcpListener::bind(cfg.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let control_stop = CancellationToken::new();
        let ctl = control::bind(&cfg.state_dir).unwrap();
        let control_task = Some(tokio::spawn(control::serve(
            ctl,
            state.clone(),
            control_stop.clone(),
        )));
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            state,
            config: cfg,
            dir,
            stop: Some(stop),
            control_stop,
            control_task,
            task: Some(task),
        }
    }

    /// The open token, as the daemon makes it when `tallyd token` asks (directly on its
    /// store: a blocking control-socket call from this runtime's only thread would wait
    /// for the control server that thread runs).
    pub fn open_token(&self) -> EnrollmentToken {
        let (store, key) = (&self.state.store, self.state.params.static_public());
        EnrollmentToken::parse(&tally::tokens::open_token_in(store, key, false).unwrap()).unwrap()
    }

    /// Issues a per-identity token (valid for a day), as `tallyd token --id` does.
    pub fn id_token(&self, id: &str) -> EnrollmentToken {
        let (store, key) = (&self.state.store, self.state.params.static_public());
        let day = Duration::from_secs(86_400);
        let issued = tally::tokens::issue_token_in(store, key, id, day).unwrap();
        EnrollmentToken::parse(&issued.token).unwrap()
    }

    pub async fn enroll(&self, id: &str) -> Credential {
        client::enroll(
            &self.addr.to_string(),
            &self.open_token(),
            Id::new(id).unwrap(),
            &client::ClientOptions::default().with_connect_timeout(Duration::from_secs(5)),
        )
        .await
        .unwrap()
    }

    pub async fn connect(&self, cred: &Credential) -> (Client, mpsc::Receiver<Incoming>) {
        Client::connect(cred, ClientOptions::default())
            .await
            .unwrap()
    }

    /// Triggers shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.task.take().unwrap())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        self.control_stop.cancel();
        self.control_task.take().unwrap().await.unwrap();
    }

    /// Triggers shutdown without waiting.
    pub fn begin_shutdown(&mut self) -> JoinHandle<Result<(), server::ServerError>> {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.take().unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.control_stop.cancel();
    }
}

/// Waits until `f` is true, polling, or panics after `secs`.
pub async fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether `python3` can run. Without it, tests that need it are skipped with a message,
/// except under CI (`CI` set), where `.ci/run` installs it and they must run.
pub fn python3_or_skip(test: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: python3 is required under CI"
        );
        eprintln!("SKIPPED {test}: python3 not found (install it to run this test)");
    }
    ok
}
