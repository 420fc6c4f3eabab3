//! The daemon's metrics: what `metrics_listen` serves to Prometheus (OpenMetrics text)
//! and `tallyd status` prints. The names are documented in the README; a test checks that
//! each one moves.
//!
//! Counters on the per-frame path are not touched per frame: sessions keep their own
//! counts (in their mailbox, as `tallyd sessions` lists them) and the totals are summed
//! when scraped, from the live sessions and those that ended.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::registry::TOTALS;
use super::ServerState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Direction {
    direction: &'static str,
}

/// How a backend request ended, for `tally_backend_requests_total{outcome}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BackendOutcome {
    /// Answered with status OK.
    Ok,
    /// Answered with another status.
    Error,
    /// Not answered within `limits.backend_timeout`.
    Timeout,
    /// The backend's future panicked.
    Panic,
}

/// Every metric of the daemon.
pub struct Metrics {
    registry: Registry,
    sessions: Gauge,
    unauthenticated: Gauge,
    handshakes_ok: Counter,
    enrollments_ok: Counter,
    refusals: Family<Reason, Counter>,
    /// The reasons `refusals` has a counter for (a family lists none of its own): added
    /// to at a reason's first refusal only.
    refusal_reasons: std::sync::Mutex<Vec<&'static str>>,
    evictions: Counter,
    /// Frames in, out, bytes in, out.
    traffic: [Counter; 4],
    backend: [Counter; 4],
    backend_latency: Histogram,
    /// What the sessions that ended counted ([`Mailbox::totals`](super::registry::Mailbox::totals)):
    /// frames in, out, bytes in, out, requests answered at once OK and not.
    ended: [AtomicU64; TOTALS],
    /// What those counters were last moved to.
    reported: std::sync::Mutex<[u64; TOTALS]>,
    /// Statements sent to a PostgreSQL store (its engine counts them).
    store_queries: Counter,
    /// What `store_queries` was last moved to.
    reported_queries: std::sync::Mutex<u64>,
    /// Queued messages (spec 8.8), by what happened to them: enqueued, refused,
    /// delivered, acknowledged, expired, purged, undeliverable.
    queue: [Counter; QUEUE_COUNTS],
    /// What those were last moved to.
    reported_queue: std::sync::Mutex<[u64; QUEUE_COUNTS]>,
    /// Messages and bytes queued, and the age of the oldest (seconds).
    queue_depth: [Gauge; 3],
}

/// How many counters `tally_queue_messages_total` has.
const QUEUE_COUNTS: usize = 8;

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics(..)")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tally");
        let sessions = Gauge::default();
        registry.register(
            "sessions",
            "Live (authenticated) sessions",
            sessions.clone(),
        );
        let unauthenticated = Gauge::default();
        registry.register(
            "unauthenticated_connections",
            "Connections not yet authenticated (in a handshake or enrollment)",
            unauthenticated.clone(),
        );
        let handshakes = Family::<Outcome, Counter>::default();
        registry.register(
            "handshakes",
            "Session handshakes completed (refused ones are in tally_refusals_total)",
            handshakes.clone(),
        );
        let enrollments = Family::<Outcome, Counter>::default();
        registry.register(
            "enrollments",
            "Enrollments stored (refused ones are in tally_refusals_total)",
            enrollments.clone(),
        );
        let refusals = Family::<Reason, Counter>::default();
        registry.register(
            "refusals",
            "Connections refused, by reason or limit",
            refusals.clone(),
        );
        let evictions = Counter::default();
        registry.register(
            "evictions",
            "Unauthenticated connections closed to make room for newer ones",
            evictions.clone(),
        );
        let frames = Family::<Direction, Counter>::default();
        registry.register("frames", "Session frames, in and out", frames.clone());
        let bytes = Family::<Direction, Counter>::default();
        registry.register("bytes", "Session bytes, in and out", bytes.clone());
        let backend_requests = Family::<Outcome, Counter>::default();
        registry.register(
            "backend_requests",
            "Requests handed to the backend, by outcome",
            backend_requests.clone(),
        );
        // 50 µs .. ~6.5 s.
        let backend_latency = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 4.0, 9),
        );
        registry.register(
            "backend_request_duration_seconds",
            "Time from a REQUEST read to its answer, for requests the backend did not answer at once",
            backend_latency.clone(),
        );
        let store_queries = Counter::default();
        registry.register(
            "store_queries",
            "Statements sent to the PostgreSQL store of a fleet (BEGIN and COMMIT not counted; none with SQLite)",
            store_queries.clone(),
        );
        let queued = Family::<Outcome, Counter>::default();
        registry.register(
            "queue_messages",
            "Queued messages (tallyd send --queue), by what happened: enqueued, refused (full, not enrolled, too large), delivered (DELIVER sent; a redelivery counts again), acknowledged, expired (before delivery), unconfirmed (expired after delivery, unacknowledged), purged, undeliverable",
            queued.clone(),
        );
        let queue = [
            "enqueued",
            "refused",
            "delivered",
            "acknowledged",
            "expired",
            "unconfirmed",
            "purged",
            "undeliverable",
        ]
        .map(|o| counter_of(&queued, o));
        let queue_depth = [Gauge::default(), Gauge::default(), Gauge::default()];
        for (name, help, g) in [
            (
                "queue_depth",
                "Messages queued for devices, not yet acknowledged",
                &queue_depth[0],
            ),
            (
                "queue_bytes",
                "Payload bytes queued for devices",
                &queue_depth[1],
            ),
            (
                "queue_oldest_age_seconds",
                "Age of the oldest queued message (0 when none)",
                &queue_depth[2],
            ),
        ] {
            registry.register(name, help, g.clone());
        }
        let outcome = |o| counter_of(&backend_requests, o);
        let backend = [
            outcome("ok"),
            outcome("error"),
            outcome("timeout"),
            outcome("panic"),
        ];
        // Each made alone: a family's guard held while another is made would deadlock.
        let way = |family: &Family<Direction, Counter>, direction| {
            family.get_or_create(&Direction { direction }).clone()
        };
        let traffic = [
            way(&frames, "in"),
            way(&frames, "out"),
            way(&bytes, "in"),
            way(&bytes, "out"),
        ];
        Metrics {
            handshakes_ok: counter_of(&handshakes, "ok"),
            enrollments_ok: counter_of(&enrollments, "ok"),
            registry,
            sessions,
            unauthenticated,
            refusals,
            refusal_reasons: Default::default(),
            evictions,
            traffic,
            backend,
            backend_latency,
            ended: Default::default(),
            reported: Default::default(),
            store_queries,
            reported_queries: Default::default(),
            queue,
            reported_queue: Default::default(),
            queue_depth,
        }
    }
}

/// The counter of `outcome` in `family`, made now (listed from the start, at 0) and kept:
/// no lookup when it moves.
fn counter_of(family: &Family<Outcome, Counter>, outcome: &'static str) -> Counter {
    family.get_or_create(&Outcome { outcome }).clone()
}

impl Metrics {
    pub(crate) fn handshake(&self) {
        self.handshakes_ok.inc();
    }

    pub(crate) fn enrollment(&self) {
        self.enrollments_ok.inc();
    }

    pub(crate) fn refusal(&self, reason: &'static str) {
        let label = Reason { reason };
        if let Some(counter) = self.refusals.get(&label) {
            counter.inc();
            return;
        }
        // A reason's first refusal (or one of the first, racing): noted for `snapshot`.
        let mut reasons = self
            .refusal_reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !reasons.contains(&reason) {
            reasons.push(reason);
        }
        drop(reasons);
        self.refusals.get_or_create(&label).inc();
    }

    pub(crate) fn eviction(&self) {
        self.evictions.inc();
    }

    /// A request the backend answered late (or not at all): counted and timed.
    pub(crate) fn backend(&self, outcome: BackendOutcome, took: Duration) {
        self.backend[outcome as usize].inc();
        self.backend_latency.observe(took.as_secs_f64());
    }

    /// A request whose backend panicked at once: counted, not timed. (Answers ready at
    /// once are counted by their session: `Mailbox::answered_ok`.)
    pub(crate) fn backend_panicked_at_once(&self) {
        self.backend[BackendOutcome::Panic as usize].inc();
    }

    /// A session ended with these totals ([`Mailbox::totals`](super::registry::Mailbox::totals)).
    pub(crate) fn session_ended(&self, totals: [u64; TOTALS]) {
        for (sum, n) in self.ended.iter().zip(totals) {
            sum.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Every metric, in the OpenMetrics text format.
    pub fn encode(&self, state: &ServerState) -> String {
        self.catch_up(state);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// The counters as numbers, for `tallyd status`: the figures [`Self::encode`] shows.
    pub fn snapshot(&self, state: &ServerState) -> Snapshot {
        self.catch_up(state);
        let reasons = self
            .refusal_reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let refusals = reasons
            .into_iter()
            .map(|reason| {
                let n = self.refusals.get(&Reason { reason }).map_or(0, |c| c.get());
                (reason, n)
            })
            .collect();
        let [frames_in, frames_out, bytes_in, bytes_out] =
            self.traffic.each_ref().map(Counter::get);
        Snapshot {
            handshakes: self.handshakes_ok.get(),
            enrollments: self.enrollments_ok.get(),
            refusals,
            evictions: self.evictions.get(),
            frames: [frames_in, frames_out],
            bytes: [bytes_in, bytes_out],
            requests: self.backend.each_ref().map(Counter::get),
            store_queries: self.store_queries.get(),
        }
    }

    /// Brings the gauges and the counters summed from the sessions (and the store's
    /// statement count) up to now.
    fn catch_up(&self, state: &ServerState) {
        self.sessions.set(state.registry.len() as i64);
        self.unauthenticated.set(state.admission.len() as i64);
        // Ended sessions are added after they leave the registry: a sum taken between the
        // two is low, never high, and the counters only move up.
        let mut now: [u64; TOTALS] = std::array::from_fn(|i| self.ended[i].load(Ordering::Relaxed));
        for live in state.registry.totals() {
            for (sum, n) in now.iter_mut().zip(live) {
                *sum += n;
            }
        }
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        let counters = self.traffic.iter().chain([
            &self.backend[BackendOutcome::Ok as usize],
            &self.backend[BackendOutcome::Error as usize],
        ]);
        for ((counter, last), n) in counters.zip(reported.iter_mut()).zip(now) {
            if n > *last {
                counter.inc_by(n - *last);
                *last = n;
            }
        }
        drop(reported);
        {
            let d = &state.deliveries;
            let c = &d.counts;
            let now = [
                &c.enqueued,
                &c.refused,
                &c.delivered,
                &c.acknowledged,
                &c.expired,
                &c.unconfirmed,
                &c.purged,
                &c.undeliverable,
            ]
            .map(|n| n.load(Ordering::Relaxed));
            let mut last = self
                .reported_queue
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for ((counter, last), n) in self.queue.iter().zip(last.iter_mut()).zip(now) {
                if n > *last {
                    counter.inc_by(n - *last);
                    *last = n;
                }
            }
            let t = d.totals();
            self.queue_depth[0].set(t.messages as i64);
            self.queue_depth[1].set(t.bytes as i64);
            let age = t
                .oldest_ms
                .map_or(0, |o| (crate::store::queue::now_ms() - o).max(0) / 1000);
            self.queue_depth[2].set(age);
        }
        if let Some(fleet) = &state.fleet {
            let mut last = self
                .reported_queries
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let n = fleet.queries();
            if n > *last {
                self.store_queries.inc_by(n - *last);
                *last = n;
            }
        }
    }
}

/// The counters of [`Metrics`] at one moment ([`Metrics::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Session handshakes completed.
    pub handshakes: u64,
    /// Enrollments stored.
    pub enrollments: u64,
    /// Connections refused, by reason (`tally_refusals_total{reason}`), in the order the
    /// reasons first occurred.
    pub refusals: Vec<(&'static str, u64)>,
    /// Unauthenticated connections closed to make room for newer ones.
    pub evictions: u64,
    /// Session frames in, out.
    pub frames: [u64; 2],
    /// Session bytes in, out.
    pub bytes: [u64; 2],
    /// Requests handed to the backend: answered OK, with another status, not in time,
    /// panicked (`BackendOutcome`'s order).
    pub requests: [u64; 4],
    /// Statements sent to a PostgreSQL store.
    pub store_queries: u64,
}

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections to `metrics_listen` served at once. Each holds a file descriptor: the
/// daemon counts them in its open-file budget (`daemon::fit_fd_limit`), so that idle
/// connections to this port can never take the descriptors devices need. Beyond it a
/// connection is answered `503 Service Unavailable` and closed at once.
pub const MAX_METRICS_CONNECTIONS: usize = 16;

/// Time a metrics connection has to send its request head; then it is closed.
pub const METRICS_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What a connection beyond [`MAX_METRICS_CONNECTIONS`] gets, written without waiting.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 41\r\nConnection: close\r\n\r\ntoo many connections to the metrics port\n";

/// Serves `GET /metrics` on `listener` until `stop`. A minimal HTTP/1.1 responder, one
/// request per connection: the scraper is the operator's Prometheus on a trusted
/// address (`metrics_listen` is off by default, and 127.0.0.1 in the example). At most
/// [`MAX_METRICS_CONNECTIONS`] at once, each closed after [`METRICS_READ_TIMEOUT`]
/// without a whole request head.
pub(crate) async fn serve(listener: TcpListener, state: Arc<ServerState>, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        let _ = state.info.metrics.set(addr);
        info!(metrics_addr = %addr, "metrics on http://{addr}/metrics");
    }
    let room = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    // When a refusal for want of room was last logged (at most once a minute).
    let mut refused_logged: Option<std::time::Instant> = None;
    loop {
        let (mut stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = room.clone().try_acquire_owned() else {
            // Answered without waiting (a full socket buffer loses the answer, not the
            // daemon's time) and closed: its descriptor is given back at once. What
            // already came is read first, so that the close is not a reset that could
            // discard the answer.
            let mut sink = [0u8; 1024];
            for _ in 0..8 {
                if !matches!(stream.try_read(&mut sink), Ok(n) if n > 0) {
                    break;
                }
            }
            let _ = stream.try_write(BUSY);
            drop(stream);
            if refused_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                refused_logged = Some(std::time::Instant::now());
                warn!(%peer, limit = MAX_METRICS_CONNECTIONS, "metrics connections at their limit: refusing more (503) for now; is something holding connections to metrics_listen open?");
            }
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // The request head, up to 8 KiB, within the read timeout.
            let mut head = Vec::with_capacity(1024);
            let read = tokio::time::timeout(METRICS_READ_TIMEOUT, async {
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
            let (status, content_type, body) =
                if line.starts_with(b"GET /metrics ") || line == b"GET /metrics" {
                    ("200 OK", CONTENT_TYPE, state.metrics.encode(&state))
                } else {
                    (
                        "404 Not Found",
                        "text/plain; charset=utf-8",
                        "only GET /metrics here\n".to_owned(),
                    )
                };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
