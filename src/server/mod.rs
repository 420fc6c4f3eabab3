//! The daemon: accepts TCP connections, runs enrollments and session handshakes, and
//! serves sessions, within the configured limits.
//!
//! `run(listener, state, shutdown)` takes the shutdown signal as a future so tests can
//! pass their own. On shutdown it stops accepting, lets every session finish its
//! in-flight requests (up to `drain_timeout`) and sends each an authenticated CLOSE
//! SHUTDOWN; it waits for the connection tasks at most `drain_timeout` + 3 s (those
//! still open then are dropped), writes the last handshakes' `last_seen`, leaves the
//! fleet, stops the backend and the daemon's other tasks (at most 3 s more), and
//! returns.

// The daemon's machinery: public for the daemon's other parts (control socket, admin
// commands) and the tests, not for an embedder.
pub(crate) mod admission;
mod conn;
#[doc(hidden)]
pub mod delivery;
#[doc(hidden)]
pub mod fleet;
mod marks;
#[doc(hidden)]
pub mod metrics;
#[doc(hidden)]
pub mod registry;
mod session;
#[doc(hidden)]
pub mod status;
mod tarpit;

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use crate::backend::Backend;
use crate::config::{Limits, ServerConfig, TakeoverPolicy};
use crate::proto::enroll::ServerParams;
use crate::secrets::{SecretsError, ServerSecrets};
use crate::store::{Store, StoreError};
#[doc(hidden)]
pub use registry::Registry;

/// The daemon could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A key file is missing, unreadable or malformed.
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    /// The identity store failed to open.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Binding or accepting failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The durable queue could not be opened.
    #[error("the message queue: {0}")]
    Queue(String),
}

/// Everything the connection tasks share.
pub struct ServerState {
    limits: RwLock<Limits>,
    /// Enrollment keys and policy.
    pub params: ServerParams,
    #[doc(hidden)]
    /// The identity store.
    pub store: Arc<Store>,
    #[doc(hidden)]
    /// Live sessions.
    pub registry: Arc<Registry>,
    #[doc(hidden)]
    /// The fleet this daemon is a node of, with a shared PostgreSQL store.
    pub fleet: Option<Arc<fleet::Fleet>>,
    #[doc(hidden)]
    /// Durable delivery to devices (spec 8.8): in the SQLite store, or in a fleet's
    /// PostgreSQL store.
    pub deliveries: Arc<delivery::Deliveries>,
    /// Who answers requests.
    pub backend: Arc<dyn Backend>,
    /// Takeover policy.
    pub takeover: TakeoverPolicy,
    /// Which session modes are accepted (spec 7.8).
    pub encryption: crate::config::EncryptionPolicy,
    /// The static key pair, for SEALED_HELLO (its public half computed once).
    pub server_key: crate::proto::handshake::ServerKey,
    #[doc(hidden)]
    /// What `metrics_listen` serves and `tallyd status` prints.
    pub metrics: metrics::Metrics,
    connections: Arc<Semaphore>,
    /// The pool of unauthenticated slots (eviction, per-source caps and rates).
    pub(crate) admission: Arc<admission::Admission>,
    /// Refusals of unauthenticated connections, logged in full or summarised.
    pub(crate) refusals: admission::RefusalLog,
    /// Refused strangers, parked until their answer is due.
    pub(crate) tarpit: tarpit::Tarpit,
    /// Enrollments in progress.
    enrolling: Arc<Semaphore>,
    /// Enrollments started recently.
    enroll_rate: std::sync::Mutex<admission::TokenBucket>,
    /// Successful handshakes not yet written to the store's `last_seen`.
    seen: std::sync::Mutex<std::collections::HashMap<crate::proto::Id, i64>>,
    /// The daemon's own tasks besides connections (control socket, status reports, the
    /// backend's): stopped (`stop`) and awaited after the sessions drained, so that the
    /// sessions' last requests still reach the backend.
    pub(crate) tasks: TaskTracker,
    /// Cancelled when those tasks must end.
    pub(crate) stop: CancellationToken,
    #[doc(hidden)]
    /// What the daemon is (version, start, addresses, store, backend): `tallyd status`.
    pub info: status::Info,
    /// Held while the daemon runs.
    _lock: crate::secrets::StateLock,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("sessions", &self.registry.len())
            .finish_non_exhaustive()
    }
}

/// The fleet-wide setting of open enrollment, in the fleet's log.
#[doc(hidden)]
pub const OPEN_ENROLLMENT: &str = "open_enrollment";

impl ServerState {
    /// Whether open enrollment is on: in a fleet the fleet's setting (its log: one
    /// decision for every node, `tallyd open-enrollment`), else this daemon's
    /// configuration (`open_enrollment`).
    pub fn open_enrollment(&self) -> bool {
        match &self.fleet {
            // Off until `tallyd open-enrollment on` (a verified entry of the log).
            Some(_) => self
                .store
                .fleet_setting(OPEN_ENROLLMENT)
                .is_some_and(|v| v != 0),
            None => self.params.allow_open,
        }
    }

    /// Opens the state directory (creating keys on first start) and the store.
    pub fn open(
        config: &ServerConfig,
        credentials_dir: Option<&Path>,
        backend: Arc<dyn Backend>,
    ) -> Result<(Arc<ServerState>, ServerSecrets), ServerError> {
        config.validate()?;
        let secrets = ServerSecrets::load(&config.state_dir, credentials_dir, true)?;
        crate::secrets::check_state_dir(&config.state_dir)?;
        // Before the store and its key index: from here on, identities change only
        // through this daemon (admin commands go through its control socket).
        let lock = crate::secrets::lock_state_dir(&config.state_dir)?;
        let location = config.store_location()?;
        let (store, shared) = Store::open_shared(
            &location,
            secrets.store_key.clone(),
            config.store_passwords(credentials_dir),
        )?;
        let store = Arc::new(store);
        let registry = Arc::new(Registry::default());
        registry.set_handshake_deadline(config.limits.handshake_timeout);
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        // A shared store: this daemon is a node of a fleet. It listens for the others'
        // changes before it loads the key index, so that it misses none.
        let fleet = if let Some(pg) = shared {
            let (fleet, tasks) = fleet::Fleet::join(
                store.clone(),
                fleet::db::FleetDb::new(pg),
                registry.clone(),
                config.listen,
                &config.state_dir,
                config.takeover,
            )?;
            Some((fleet, tasks))
        } else {
            None
        };
        // Handshakes look keys up in memory (`Store::cached_key`), never on a blocking pool.
        let keys = store.load_key_index()?;
        tracing::debug!(keys, "identity keys indexed");
        if let Some((fleet, _)) = &fleet {
            fleet.check_revocations()?;
            fleet.settle_open_enrollment(config.open_enrollment)?;
        }
        let fleet = fleet.map(|(fleet, tasks)| {
            // Stopped once the sessions drained (`run`), with the daemon's other tasks.
            tasks.run(stop.clone());
            fleet
        });
        // The backend may send to devices (server-initiated traffic) through the registry.
        let daemon = Arc::new(std::sync::OnceLock::new());
        backend.attach(crate::backend::Attachment {
            devices: Arc::new(registry::Sessions(registry.clone(), daemon.clone())),
            tasks: tasks.clone(),
            stop: stop.clone(),
        });
        let queue = match (&location, &fleet) {
            (_, Some(fleet)) => crate::store::queue::Queue::Postgres(fleet.queue()),
            (crate::store::Location::Sqlite(path), None) => crate::store::queue::Queue::Sqlite(
                crate::store::queue::sqlite::SqliteQueue::open(path)
                    .map_err(|e| ServerError::Queue(e.to_string()))?,
            ),
            (crate::store::Location::Postgres(_), None) => {
                return Err(ServerError::Queue(
                    "a PostgreSQL store without a fleet".into(),
                ))
            }
        };
        let deliveries = Arc::new(delivery::Deliveries::new(
            queue,
            backend.clone(),
            tasks.clone(),
        ));
        let state = ServerState {
            limits: RwLock::new(config.limits.clone()),
            deliveries,
            server_key: crate::proto::handshake::ServerKey::from(&secrets.static_secret),
            params: secrets.enroll_params(config.open_enrollment),
            store,
            registry,
            fleet,
            backend,
            takeover: config.takeover,
            encryption: config.encryption,
            metrics: metrics::Metrics::default(),
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            admission: Arc::new(admission::Admission::new(admission::AdmissionLimits::from(
                &config.limits,
            ))),
            refusals: admission::RefusalLog::new(),
            tarpit: tarpit::Tarpit::new(
                config.limits.max_delayed_refusals,
                config.limits.refusal_delay,
            ),
            enrolling: Arc::new(Semaphore::new(config.limits.max_enrollments_in_progress)),
            enroll_rate: std::sync::Mutex::new(admission::TokenBucket::full(
                f64::from(config.limits.enrollments_per_second),
                Instant::now(),
            )),
            seen: Default::default(),
            tasks,
            stop,
            info: status::Info::new(config, &location),
            _lock: lock,
        };
        let state = Arc::new(state);
        let _ = daemon.set(Arc::downgrade(&state));
        Ok((state, secrets))
    }

    /// Counts the refusal of an unauthenticated connection from `peer`; true if it is to
    /// be logged in full (the rest are summarised every `admission::RefusalLog::INTERVAL`).
    pub fn note_refusal(&self, kind: &'static str, peer: &std::net::SocketAddr) -> bool {
        self.metrics.refusal(kind);
        self.refusals.note(kind, admission::Source::of(peer))
    }

    /// Which enrollment limit leaves no room now, if one does; nothing is taken. Checked
    /// before an ENROLL_INIT costs a store read and an HMAC: in a flood, an attempt that
    /// would get BUSY after its proof gets it before. (The budget itself is spent only by
    /// a proven credential, [`Self::try_enroll`], so strangers cannot exhaust it.)
    pub(crate) fn enroll_budget_spent(&self) -> Option<&'static str> {
        if self.enrolling.available_permits() == 0 {
            return Some("limits.max_enrollments_in_progress");
        }
        let rate = f64::from(self.limits().enrollments_per_second);
        let mut bucket = self.enroll_rate.lock().unwrap_or_else(|e| e.into_inner());
        (!bucket.has_token(rate, Instant::now())).then_some("limits.enrollments_per_second")
    }

    /// A permit for one enrollment, if the enrollment rate and the number in progress
    /// allow one; else which limit does not.
    pub(crate) fn try_enroll(&self) -> Result<tokio::sync::OwnedSemaphorePermit, &'static str> {
        let permit = self
            .enrolling
            .clone()
            .try_acquire_owned()
            .map_err(|_| "limits.max_enrollments_in_progress")?;
        let rate = f64::from(self.limits().enrollments_per_second);
        let mut bucket = self.enroll_rate.lock().unwrap_or_else(|e| e.into_inner());
        if !bucket.take(rate, Instant::now()) {
            return Err("limits.enrollments_per_second");
        }
        Ok(permit)
    }

    /// Notes a successful handshake; [`Self::flush_seen`] writes it to the store.
    pub fn note_seen(&self, id: &crate::proto::Id) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), crate::store::now());
    }

    /// Writes the noted handshakes to the store's `last_seen`, in one transaction.
    pub async fn flush_seen(&self) {
        let batch: Vec<_> = self
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        if batch.is_empty() {
            return;
        }
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.touch_many(&batch)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "could not record last_seen"),
            Err(e) => warn!(error = %e, "could not record last_seen"),
        }
    }

    /// Unauthenticated connections holding a slot now.
    #[doc(hidden)]
    pub fn unauthenticated(&self) -> usize {
        self.admission.len()
    }

    /// Refused connections parked until their answer is due (spec 13.10).
    #[doc(hidden)]
    pub fn parked_refusals(&self) -> usize {
        self.tarpit.len()
    }

    /// The daemon's own tasks still running (control socket, status reports, the
    /// backend's connection and SENDs): none once `run` returned.
    #[doc(hidden)]
    pub fn daemon_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the limits (configuration reload). Connection counts apply to new
    /// connections; existing sessions keep running.
    pub fn set_limits(&self, new: Limits) {
        self.registry.set_handshake_deadline(new.handshake_timeout);
        let mut cur = self.limits.write().unwrap_or_else(|e| e.into_inner());
        resize(&self.connections, cur.max_connections, new.max_connections);
        resize(
            &self.enrolling,
            cur.max_enrollments_in_progress,
            new.max_enrollments_in_progress,
        );
        self.admission
            .set_limits(admission::AdmissionLimits::from(&new));
        self.tarpit
            .set_limits(new.max_delayed_refusals, new.refusal_delay);
        *cur = new;
    }
}

fn resize(sem: &Semaphore, old: usize, new: usize) {
    if new > old {
        sem.add_permits(new - old);
    } else {
        // Permits held now are returned later and then stay removed.
        let mut missing = old - new;
        missing -= sem.forget_permits(missing);
        for _ in 0..missing {
            if let Ok(p) = sem.try_acquire() {
                p.forget();
            }
        }
    }
}

/// How often handshakes are written to the store's `last_seen`.
#[doc(hidden)]
pub const SEEN_FLUSH: Duration = Duration::from_secs(1);

/// Serves `listener` until `shutdown` completes, then drains and returns.
pub async fn run(
    listener: TcpListener,
    state: Arc<ServerState>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let addr = listener.local_addr()?;
    // Before the first session: the identities with queued messages (a session of any
    // other fetches nothing from the queue until a message is queued for it).
    let marked = delivery::mark_queued(state.deliveries.queue(), &state.registry)
        .await
        .map_err(|e| ServerError::Queue(e.to_string()))?;
    tracing::debug!(marked, "identities with queued messages");
    let _ = state.info.listen.set(addr);
    info!(addr = %addr, backend = state.backend.name(), "listening");
    tokio::pin!(shutdown);
    // `last_seen` is written once a second for all sessions, not once per handshake.
    let flusher = {
        let (state, token) = (state.clone(), token.clone());
        tokio::spawn(async move {
            let mut summaries = tokio::time::interval(admission::RefusalLog::INTERVAL);
            summaries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(SEEN_FLUSH) => state.flush_seen().await,
                    _ = summaries.tick() => {
                        if let Some(s) = state.refusals.summary() {
                            warn!(
                                total = s.total,
                                unlogged = s.unlogged,
                                "in the last {:?}: {s}",
                                admission::RefusalLog::INTERVAL
                            );
                        }
                    }
                }
            }
        })
    };
    let reaper = {
        let (state, token) = (state.clone(), token.clone());
        tokio::spawn(async move { state.tarpit.run(token).await })
    };
    state.tasks.spawn(delivery::sweep(
        state.deliveries.clone(),
        state.registry.clone(),
        state.stop.clone(),
    ));
    if let Some(fleet) = &state.fleet {
        state.tasks.spawn(delivery::collect(
            state.deliveries.clone(),
            fleet.outcomes(),
            state.stop.clone(),
        ));
    }
    let mut backoff = Duration::from_millis(10);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(10); x }
                Err(e) => {
                    // EMFILE and friends: wait instead of spinning (mini-redis does the same).
                    error!(error = %e, "accept failed; retrying in {:?}", backoff);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        admit(&state, &tracker, &token, stream, peer);
    }
    let limits = state.limits();
    info!(
        sessions = state.registry.len(),
        "shutting down: no longer accepting; draining sessions"
    );
    drop(listener);
    token.cancel();
    tracker.close();
    let grace = limits.drain_timeout + Duration::from_secs(3);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            remaining = tracker.len(),
            "connections still open after the drain deadline; dropping them"
        );
    }
    let _ = flusher.await;
    let _ = reaper.await;
    state.flush_seen().await;
    if let Some(fleet) = &state.fleet {
        fleet.leave().await;
    }
    // Only now: the backend served the sessions' last requests.
    state.stop.cancel();
    state.tasks.close();
    if tokio::time::timeout(Duration::from_secs(3), state.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = state.tasks.len(),
            "daemon tasks (control socket, backend) still running after 3 s; leaving them"
        );
    }
    info!("shut down");
    Ok(())
}

/// Applies the connection limits to a new connection and starts its task.
fn admit(
    state: &Arc<ServerState>,
    tracker: &TaskTracker,
    token: &CancellationToken,
    stream: TcpStream,
    peer: std::net::SocketAddr,
) {
    let Ok(conn_permit) = state.connections.clone().try_acquire_owned() else {
        let limit = state.limits().max_connections;
        if state.note_refusal("connection limit", &peer) {
            warn!(peer = %peer, limit, "refused: connection limit reached (limits.max_connections)");
        } else {
            debug!(peer = %peer, limit, "refused: connection limit reached (limits.max_connections)");
        }
        conn::refuse_busy(stream);
        return;
    };
    let ticket = match state.admission.admit(&peer, Instant::now()) {
        Ok((ticket, evicted)) => {
            if let Some(source) = evicted {
                state.metrics.eviction();
                const WHY: &str = "closed an unauthenticated connection to make room for a newer one (limits.max_unauthenticated or limits.max_unauthenticated_per_source)";
                if state
                    .refusals
                    .note("evicted for a newer connection", source)
                {
                    info!(source = %source, "{WHY}");
                } else {
                    debug!(source = %source, "{WHY}");
                }
            }
            ticket
        }
        Err(why) => {
            if state.note_refusal(why.kind(), &peer) {
                warn!(peer = %peer, "refused: {}", why.reason());
            } else {
                debug!(peer = %peer, "refused: {}", why.reason());
            }
            // Reset without a word (an answer costs a write, and a FIN handshake and
            // TIME_WAIT cost more, for a peer over its limits), late: see `tarpit`.
            state
                .tarpit
                .park(stream, tarpit::Farewell::Reset, Instant::now());
            return;
        }
    };
    let state = state.clone();
    let token = token.clone();
    // One span per connection: every line it logs names the peer, and the identity
    // once authenticated (recorded by `conn`).
    let span = tracing::info_span!("conn", %peer, id = tracing::field::Empty);
    tracker.spawn(
        async move {
            // The handshake's future is dropped before the session runs: the task then
            // holds only the session's own (see `conn::serve`).
            let session = Box::pin(conn::serve(state, stream, peer, ticket, token)).await;
            if let Some(session) = session {
                session.await;
            }
            drop(conn_permit);
        }
        .instrument(span),
    );
}
