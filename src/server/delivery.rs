//! Durable delivery in the daemon (spec 8.8; README "Queued delivery"): messages queued
//! for a device wait in the store ([`crate::store::queue`]) until it holds a session,
//! are delivered in message-id order, and are deleted only once its ACK is accepted.
//!
//! Three parts:
//! - [`Cursor`], sans-IO: one session's place in its identity's queue (what was fetched,
//!   how many deliveries are unacknowledged, whether there may be more), the rule of when
//!   to fetch next, unit-tested without a clock or a database;
//! - [`Deliveries`]: the queue, the outcomes (acknowledged with the device's answer,
//!   expired, purged, undeliverable) for whoever waits for them, the counters;
//! - [`sweep`]: the task that expires what waits too long for a device that is offline.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::registry::Registry;
use crate::proto::{DeliveryKind, Id, Status};
use crate::store::queue::{self, Bounds, Gone, NewMessage, Origin, Queue, QueueError, Refusal};

/// How a queued message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The device acknowledged it: its status and (for a queued request) its answer.
    Acknowledged {
        /// The ACK's status.
        status: Status,
        /// The ACK's payload.
        payload: Bytes,
    },
    /// Its TTL passed before it was delivered.
    Expired,
    /// Its TTL passed after it was delivered, without an acknowledgement: the device
    /// may or may not have handled it (it lost the session before acknowledging, and
    /// did not come back in time).
    Unconfirmed,
    /// An operator withdrew it (`tallyd queue --purge`), or the identity was revoked or
    /// removed.
    Purged,
    /// It cannot be delivered: larger than the frame limit the device announced.
    Undeliverable(String),
}

impl Outcome {
    /// Its code, status and payload, as the backend's REPORT and a fleet's forwarded
    /// outcomes carry them (spec/BACKEND.md).
    pub fn wire(&self) -> (u8, Status, Bytes) {
        match self {
            Outcome::Acknowledged { status, payload } => (0, *status, payload.clone()),
            Outcome::Expired => (1, Status::OK, Bytes::new()),
            Outcome::Purged => (2, Status::OK, Bytes::new()),
            Outcome::Undeliverable(why) => (3, Status::OK, Bytes::from(why.clone())),
            Outcome::Unconfirmed => (4, Status::OK, Bytes::new()),
        }
    }

    /// The outcome of [`Outcome::wire`]'s code (`None`: no tallyd sends that code).
    pub fn from_wire(code: u8, status: Status, payload: Bytes) -> Option<Outcome> {
        Some(match code {
            0 => Outcome::Acknowledged { status, payload },
            1 => Outcome::Expired,
            2 => Outcome::Purged,
            3 => Outcome::Undeliverable(String::from_utf8_lossy(&payload).into_owned()),
            4 => Outcome::Unconfirmed,
            _ => return None,
        })
    }

    /// The word `tallyd send --queue --wait` and the control socket use.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Acknowledged { .. } => "acknowledged",
            Outcome::Expired => "expired",
            Outcome::Unconfirmed => "unconfirmed",
            Outcome::Purged => "purged",
            Outcome::Undeliverable(_) => "undeliverable",
        }
    }
}

/// Why a message was not queued.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// Refused: nothing was stored.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The queue failed: nothing was stored.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Larger than any frame could carry.
    #[error("payload of {len} bytes is larger than a queued message may be ({max} bytes: limits.max_frame_len less the DELIVER frame's own bytes)")]
    TooLarge {
        /// The payload's length.
        len: usize,
        /// The most allowed.
        max: usize,
    },
}

/// Outcomes nobody waited for yet, kept for a late waiter (one that registers after the
/// device was already quick to acknowledge): at most this many...
const RECENT: usize = 4096;
/// ...and this many payload bytes (a device chooses its answers' sizes).
const RECENT_BYTES: usize = 1 << 20;

/// The daemon's durable delivery: the queue and what waits on it.
pub struct Deliveries {
    queue: Queue,
    /// Told the outcome of what it queued.
    backend: Arc<dyn crate::backend::Backend>,
    /// The daemon's tasks: an outcome on its way to another node is waited for at
    /// shutdown.
    tasks: tokio_util::task::TaskTracker,
    waiters: Mutex<Waiters>,
    /// What the queue held at the last sweep (metrics, `tallyd status`).
    totals: Mutex<queue::Totals>,
    /// Messages queued (stored), refused, delivered (DELIVER sent), acknowledged,
    /// expired, purged or undeliverable.
    pub counts: Counts,
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries")
            .field("queue", &self.queue)
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

/// The counters of [`Deliveries`] (metrics).
#[derive(Debug, Default)]
pub struct Counts {
    /// Stored.
    pub enqueued: AtomicU64,
    /// Refused at the bound, or for an identity that is not enrolled.
    pub refused: AtomicU64,
    /// DELIVER frames sent (a redelivery counts again).
    pub delivered: AtomicU64,
    /// Acknowledged and deleted.
    pub acknowledged: AtomicU64,
    /// Expired before delivery.
    pub expired: AtomicU64,
    /// Expired after delivery, unacknowledged.
    pub unconfirmed: AtomicU64,
    /// Purged.
    pub purged: AtomicU64,
    /// Too large for the device.
    pub undeliverable: AtomicU64,
}

/// A message everywhere: its enrollment and its id (an id is reused by a new enrollment
/// of the same identity, never within one).
type Key = (u64, u64);

#[derive(Debug, Default)]
struct Waiters {
    waiting: HashMap<Key, Vec<oneshot::Sender<Outcome>>>,
    recent: HashMap<Key, Outcome>,
    order: VecDeque<Key>,
    /// Payload bytes held in `recent`.
    recent_bytes: usize,
}

fn payload_len(o: &Outcome) -> usize {
    match o {
        Outcome::Acknowledged { payload, .. } => payload.len(),
        Outcome::Undeliverable(why) => why.len(),
        _ => 0,
    }
}

/// A queued message's id, and where its outcome will arrive (if the sender waits).
#[derive(Debug)]
pub struct Enqueued {
    /// The enrollment it is for.
    pub generation: u64,
    /// Its message id (spec 8.8).
    pub msg_id: u64,
    /// Its outcome, once it has one.
    pub outcome: oneshot::Receiver<Outcome>,
}

impl Deliveries {
    /// Durable delivery over `queue`; outcomes of what `backend` queued go to it; work
    /// that outlives a call runs on `tasks`.
    pub fn new(
        queue: Queue,
        backend: Arc<dyn crate::backend::Backend>,
        tasks: tokio_util::task::TaskTracker,
    ) -> Deliveries {
        Deliveries {
            queue,
            backend,
            tasks,
            waiters: Mutex::default(),
            totals: Mutex::default(),
            counts: Counts::default(),
        }
    }

    /// The queue underneath.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// What the queue held at the last sweep (at most [`SWEEP_EVERY`] ago).
    pub fn totals(&self) -> queue::Totals {
        *self.totals.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a message for `id` (on disk before this returns), then tells its live
    /// session, if any, to deliver it. `ttl` is cut to `limits.queue_max_ttl`.
    #[allow(clippy::too_many_arguments)]
    pub async fn enqueue(
        &self,
        registry: &Registry,
        limits: &crate::config::Limits,
        id: Id,
        kind: DeliveryKind,
        payload: Bytes,
        ttl: Option<Duration>,
        origin: Origin,
    ) -> Result<Enqueued, EnqueueError> {
        let max = max_payload(limits.max_frame_len);
        if payload.len() > max {
            self.counts.refused.fetch_add(1, Ordering::Relaxed);
            return Err(EnqueueError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        let ttl = ttl.unwrap_or(limits.queue_ttl).min(limits.queue_max_ttl);
        let bounds = Bounds {
            max_messages: limits.queue_max_messages,
            max_bytes: limits.queue_max_bytes,
        };
        let msg = NewMessage {
            id: id.clone(),
            kind,
            payload,
            expires_ms: queue::now_ms().saturating_add(ttl.as_millis() as i64),
            origin,
        };
        let (generation, msg_id) = match self.queue.enqueue(msg, bounds).await? {
            Ok(ids) => ids,
            Err(refusal) => {
                self.counts.refused.fetch_add(1, Ordering::Relaxed);
                return Err(refusal.into());
            }
        };
        self.counts.enqueued.fetch_add(1, Ordering::Relaxed);
        // Before the session hears of it: its outcome cannot come first.
        let outcome = self.wait(generation, msg_id);
        registry.queued(&id);
        Ok(Enqueued {
            generation,
            msg_id,
            outcome,
        })
    }

    /// Where the outcome of message `msg_id` of enrollment `generation` arrives.
    pub fn wait(&self, generation: u64, msg_id: u64) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        let key = (generation, msg_id);
        let mut w = self.waiters();
        match w.recent.remove(&key) {
            Some(outcome) => {
                w.recent_bytes -= payload_len(&outcome);
                let _ = tx.send(outcome);
            }
            None => w.waiting.entry(key).or_default().push(tx),
        }
        rx
    }

    /// Message `msg_id` of `id`'s enrollment `generation` ended: counted, logged, and
    /// told to its waiters (or kept a while for a late one) and to its origin, here or,
    /// in a fleet, on the `node` it was queued on.
    #[allow(clippy::too_many_arguments)]
    pub fn report(
        &self,
        id: &Id,
        generation: u64,
        msg_id: u64,
        origin: Origin,
        node: Option<String>,
        outcome: Outcome,
    ) {
        self.counted(id, msg_id, origin, &outcome);
        let Some(node) = node else {
            return self.dispatch(id, generation, msg_id, origin, outcome);
        };
        let (code, status, payload) = outcome.wire();
        let report = queue::Report {
            id: id.clone(),
            generation,
            msg_id,
            origin,
            code,
            status,
            payload,
        };
        let queue = self.queue.clone();
        self.tasks.spawn(async move {
            if let Err(e) = queue.forward(&node, &report).await {
                warn!(id = %report.id, msg_id, node, "the outcome of a queued message could not be handed to the node it was queued on; its sender is not told: {e}");
            }
        });
    }

    /// Message `msg_id` of `id` ended with `outcome`: counted and logged (here, where
    /// it left the queue), not told.
    pub fn counted(&self, id: &Id, msg_id: u64, origin: Origin, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Acknowledged { .. } => &self.counts.acknowledged,
            Outcome::Expired => &self.counts.expired,
            Outcome::Unconfirmed => &self.counts.unconfirmed,
            Outcome::Purged => &self.counts.purged,
            Outcome::Undeliverable(_) => &self.counts.undeliverable,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        debug!(%id, msg_id, ?origin, outcome = outcome.as_str(), "queued message done");
    }

    /// In a fleet: tells this node's waiters and backend the outcomes other nodes saw
    /// of messages queued here (each verified). Returns how many.
    pub async fn collect(&self) -> Result<usize, QueueError> {
        let mut n = 0;
        loop {
            let (reports, taken) = self.queue.collect().await?;
            n += reports.len();
            for r in reports {
                if let Some(outcome) = Outcome::from_wire(r.code, r.status, r.payload) {
                    self.dispatch(&r.id, r.generation, r.msg_id, r.origin, outcome);
                }
            }
            if (taken as i64) < queue::postgres::COLLECT_BATCH {
                return Ok(n);
            }
        }
    }

    /// Tells an outcome to the backend (if it queued the message) and the waiters.
    fn dispatch(&self, id: &Id, generation: u64, msg_id: u64, origin: Origin, outcome: Outcome) {
        if origin == Origin::Backend {
            let (code, status, payload) = outcome.wire();
            self.backend.report(crate::backend::DeliveryReport {
                id: id.clone(),
                msg_id,
                outcome: code,
                status,
                payload,
            });
        }
        let key = (generation, msg_id);
        let mut w = self.waiters();
        match w.waiting.remove(&key) {
            Some(waiting) => {
                for tx in waiting {
                    let _ = tx.send(outcome.clone());
                }
            }
            None => {
                w.recent_bytes += payload_len(&outcome);
                if let Some(old) = w.recent.insert(key, outcome) {
                    w.recent_bytes -= payload_len(&old);
                } else {
                    w.order.push_back(key);
                }
                while w.order.len() > RECENT || w.recent_bytes > RECENT_BYTES {
                    let Some(old) = w.order.pop_front() else {
                        break;
                    };
                    if let Some(o) = w.recent.remove(&old) {
                        w.recent_bytes -= payload_len(&o);
                    }
                }
            }
        }
    }

    /// Reports messages that left the queue without an ACK: `expired` ones delivered
    /// before are `unconfirmed`.
    pub fn report_gone(&self, gone: Vec<Gone>, outcome: &Outcome) {
        for g in gone {
            let outcome = match outcome {
                Outcome::Expired if g.delivered => Outcome::Unconfirmed,
                o => o.clone(),
            };
            self.report(&g.id, g.generation, g.msg_id, g.origin, g.node, outcome);
        }
    }

    /// Purges the queue of `id`'s enrollment `generation` (or one message of it),
    /// telling the senders.
    pub async fn purge_generation(
        &self,
        id: &Id,
        generation: u64,
        msg_id: Option<u64>,
    ) -> Result<usize, QueueError> {
        let gone = self.queue.purge(id, generation, msg_id).await?;
        let n = gone.len();
        self.report_gone(gone, &Outcome::Purged);
        Ok(n)
    }

    /// Purges `id`'s queue (or one message), telling the senders.
    pub async fn purge(&self, id: &Id, msg_id: Option<u64>) -> Result<usize, QueueError> {
        match self.queue.generation(id).await? {
            Some(generation) => self.purge_generation(id, generation, msg_id).await,
            None => Ok(0),
        }
    }
}

/// Marks every identity with messages in `queue` in `registry` (at the start, and in a
/// fleet after notices may have been lost: a session fetches from the queue only for a
/// marked identity). Returns how many.
pub async fn mark_queued(queue: &Queue, registry: &Registry) -> Result<usize, QueueError> {
    let ids = queue.ids_queued().await?;
    for id in &ids {
        registry.queued(id);
    }
    Ok(ids.len())
}

/// The largest payload a queued message may have: one that fits in a DELIVER under the
/// server's own frame limit, in either mode (the authenticated mode's tag is longer).
pub fn max_payload(max_frame_len: u32) -> usize {
    (max_frame_len as usize).saturating_sub(crate::proto::Body::overhead(
        crate::proto::FrameType::Deliver,
        crate::proto::Mode::Authenticated,
    ))
}

/// One session's place in its identity's queue (sans-IO).
///
/// The session fetches the next messages after the last one it fetched, at most as many
/// as its window has room for, delivers them, and fetches again when acknowledgements
/// make room, or when a new message was queued. A notice that arrives while a fetch is
/// on its way is not lost: the fetch that answers did not see that message, so another
/// follows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cursor {
    /// The last message id fetched (and delivered) in this session.
    after: u64,
    /// Delivered and not acknowledged.
    outstanding: usize,
    /// A fetch is on its way.
    fetching: bool,
    /// There may be messages after `after` (at the start, after a notice, or when the
    /// last fetch filled its window).
    more: bool,
    /// Notices of new messages, and how many the fetch on its way has seen.
    notices: u64,
    seen: u64,
}

impl Default for Cursor {
    fn default() -> Self {
        Cursor::new()
    }
}

impl Cursor {
    /// A session of an identity that has nothing queued (as far as this daemon knows):
    /// it fetches once told of a message.
    pub fn nothing_queued() -> Cursor {
        Cursor {
            more: false,
            ..Cursor::new()
        }
    }

    /// A new session: its queue may hold anything.
    pub fn new() -> Cursor {
        Cursor {
            after: 0,
            outstanding: 0,
            fetching: false,
            more: true,
            notices: 0,
            seen: 0,
        }
    }

    /// The last message id fetched.
    pub fn after(&self) -> u64 {
        self.after
    }

    /// Deliveries not acknowledged yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Whether to fetch now, and how many at most: only one fetch at a time, only while
    /// there may be more, and only as many as the window (`in_flight`) has room for.
    pub fn poll_fetch(&mut self, in_flight: usize) -> Option<usize> {
        let room = in_flight.saturating_sub(self.outstanding);
        if self.fetching || !self.more || room == 0 {
            return None;
        }
        self.fetching = true;
        self.seen = self.notices;
        Some(room)
    }

    /// A fetch answered with `ids` (in order), all delivered now; `more`: the store
    /// says more may follow them (its answer was full, or rows remain after the last).
    pub fn fetched(&mut self, ids: &[u64], more: bool) {
        self.fetching = false;
        if let Some(&last) = ids.last() {
            self.after = self.after.max(last);
        }
        self.outstanding += ids.len();
        // A notice since the fetch left may name a message it did not see.
        self.more = more || self.notices != self.seen;
    }

    /// A fetch failed: it is tried again (`more` stays).
    pub fn failed(&mut self) {
        self.fetching = false;
        self.more = true;
    }

    /// A message was queued for this identity.
    pub fn noticed(&mut self) {
        self.notices += 1;
        self.more = true;
    }

    /// A delivery was acknowledged (or will never be: not delivered after all).
    pub fn settled(&mut self) {
        self.outstanding = self.outstanding.saturating_sub(1);
    }
}

/// How often [`sweep`] looks for expired messages.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Expires, every [`SWEEP_EVERY`], what waited too long for a device that has no
/// session (a live session's deliveries are not expired under it: it expires what it
/// has not delivered yet when it fetches), and drops the queues of identities revoked or
/// removed behind the daemon's back. Ends when `stop` is cancelled.
pub async fn sweep(
    deliveries: Arc<Deliveries>,
    registry: Arc<Registry>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let live: HashSet<Id> = registry.ids().into_iter().collect();
        match deliveries.queue.expire(queue::now_ms(), live).await {
            Ok(gone) => deliveries.report_gone(gone, &Outcome::Expired),
            Err(e) => warn!("queue expiry failed (tried again in a second): {e}"),
        }
        // Less often, the scans of the whole queue: what it holds (metrics), and the
        // queues of enrollments removed or revoked behind the daemon's back (or in a
        // crash between a removal and its purge).
        if n % 10 == 0 {
            if let Ok(t) = deliveries.queue.totals().await {
                *deliveries.totals.lock().unwrap_or_else(|e| e.into_inner()) = t;
            }
        }
        if n % 60 == 0 {
            match deliveries.queue.orphans().await {
                Ok(gone) => deliveries.report_gone(gone, &Outcome::Purged),
                Err(e) => warn!("dropping the queues of removed identities failed: {e}"),
            }
            // The marks of identities whose queues emptied without a session seeing it
            // (expired, purged, removed) go: the record stays as small as the queue.
            let before = registry.marks_last();
            if let Ok(ids) = deliveries.queue.ids_queued().await {
                registry.prune_marks(&ids.into_iter().collect(), before);
            }
        }
    }
}

/// How often a node of a fleet reads the outcomes forwarded to it even when no notice
/// said so (one may have been lost with the notification connection).
pub const COLLECT_EVERY: Duration = Duration::from_secs(10);

/// In a fleet: hands the outcomes other nodes forwarded to this one to its waiters and
/// its backend, when `woken` (a `tally_outcome` notice) and every [`COLLECT_EVERY`].
/// Ends when `stop` is cancelled.
pub async fn collect(
    deliveries: Arc<Deliveries>,
    woken: Arc<tokio::sync::Notify>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        if let Err(e) = deliveries.collect().await {
            warn!("reading the outcomes of queued messages failed (tried again): {e}");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = woken.notified() => {}
            _ = tokio::time::sleep(COLLECT_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod model;

#[cfg(test)]
mod tests {
    use super::*;

    /// The store writes an acknowledgement's outcome for another node itself (in the
    /// transaction that deletes the row): its code is the one `Outcome::wire` gives.
    #[test]
    fn the_stores_acknowledged_code_is_the_outcomes() {
        let acked = Outcome::Acknowledged {
            status: Status::OK,
            payload: Bytes::from_static(b"done"),
        };
        assert_eq!(acked.wire().0, queue::Report::ACKNOWLEDGED);
        assert_eq!(
            Outcome::from_wire(
                queue::Report::ACKNOWLEDGED,
                Status::OK,
                Bytes::from_static(b"done")
            ),
            Some(acked)
        );
    }

    #[test]
    fn a_session_fetches_what_its_window_holds_then_waits_for_acks() {
        let mut c = Cursor::new();
        assert_eq!(c.poll_fetch(4), Some(4));
        // One fetch at a time.
        assert_eq!(c.poll_fetch(4), None);
        c.fetched(&[3, 5, 8, 9], true);
        assert_eq!((c.after(), c.outstanding()), (9, 4));
        // Full window: nothing until an ACK.
        assert_eq!(c.poll_fetch(4), None);
        c.settled();
        c.settled();
        assert_eq!(c.poll_fetch(4), Some(2));
        c.fetched(&[10], false);
        // Fewer than asked: the queue is empty, until a notice.
        assert_eq!(c.poll_fetch(4), None);
        c.noticed();
        assert_eq!(c.poll_fetch(4), Some(1));
    }

    #[test]
    fn a_notice_during_a_fetch_is_not_lost() {
        let mut c = Cursor::new();
        assert_eq!(c.poll_fetch(16), Some(16));
        // Queued after the fetch read the queue: its answer does not hold it.
        c.noticed();
        c.fetched(&[], false);
        assert_eq!(
            c.poll_fetch(16),
            Some(16),
            "the notice asks for another fetch"
        );
        c.fetched(&[], false);
        assert_eq!(c.poll_fetch(16), None);
    }

    #[test]
    fn a_failed_fetch_is_tried_again() {
        let mut c = Cursor::new();
        assert!(c.poll_fetch(1).is_some());
        c.failed();
        assert_eq!(c.poll_fetch(1), Some(1));
    }

    #[test]
    fn outcomes_reach_early_and_late_waiters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::store::DB_FILE);
        drop(
            crate::store::Store::open(&path, crate::proto::SecretKey::from_bytes([1; 32])).unwrap(),
        );
        let queue = Queue::Sqlite(queue::sqlite::SqliteQueue::open(&path).unwrap());
        let d = Deliveries::new(
            queue,
            Arc::new(crate::backend::Echo),
            tokio_util::task::TaskTracker::new(),
        );
        let id = Id::new("a").unwrap();
        let mut early = d.wait(7, 1);
        d.report(&id, 7, 1, Origin::Control, None, Outcome::Expired);
        assert_eq!(early.try_recv().unwrap(), Outcome::Expired);
        // Reported before anyone waited: kept for the first who asks, of that
        // enrollment only.
        d.report(&id, 7, 2, Origin::Control, None, Outcome::Purged);
        let mut other = d.wait(8, 2);
        assert!(other.try_recv().is_err(), "another enrollment's message 2");
        let mut late = d.wait(7, 2);
        assert_eq!(late.try_recv().unwrap(), Outcome::Purged);
        assert_eq!(d.counts.expired.load(Ordering::Relaxed), 1);
        assert_eq!(d.counts.purged.load(Ordering::Relaxed), 1);
        // Kept within their bytes: large answers nobody waits for push out the oldest.
        for m in 10..20 {
            let payload = Bytes::from(vec![0u8; RECENT_BYTES / 4]);
            d.report(
                &id,
                7,
                m,
                Origin::Control,
                None,
                Outcome::Acknowledged {
                    status: Status::OK,
                    payload,
                },
            );
        }
        let w = d.waiters();
        assert!(
            w.recent_bytes <= RECENT_BYTES && w.recent.len() <= 4,
            "{}",
            w.recent_bytes
        );
    }
}
