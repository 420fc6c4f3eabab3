//! The durable queue of messages for devices (spec 8.8; README "Queued delivery").
//!
//! Messages belong to one enrollment (the identity's `generation`): a removal and a new
//! enrollment of the same id start a new queue and new message ids, as spec 8.8 says.
//! The ids come from the identity's row (`next_msg_id`), in the same transaction as the
//! insert, so they increase in commit order. Nobody is told "queued" before the message
//! is durable: on disk in the SQLite store ([`sqlite`], one writer thread with group
//! commit), committed in a fleet's PostgreSQL store ([`postgres`], where every row is
//! tagged under the fleet key and verified before it is delivered).

pub mod postgres;
pub mod sqlite;

use std::collections::HashSet;

use bytes::Bytes;

use crate::proto::{DeliveryKind, Id, Status};

/// Who queued a message: where its outcome is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The control socket (`tallyd send --queue`): reported to a waiting caller.
    Control = 0,
    /// The backend application: reported to it (spec/BACKEND.md REPORT).
    Backend = 1,
}

impl Origin {
    pub(crate) fn from_i64(n: i64) -> Origin {
        if n == 1 {
            Origin::Backend
        } else {
            Origin::Control
        }
    }
}

/// The per-identity bounds (config `[queue]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Messages queued for one identity, at most.
    pub max_messages: u32,
    /// Payload bytes queued for one identity, at most.
    pub max_bytes: u64,
}

/// A message to queue.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// For whom.
    pub id: Id,
    /// A request (the device's answer comes back) or a message.
    pub kind: DeliveryKind,
    /// The payload.
    pub payload: Bytes,
    /// When it expires, in milliseconds since the Unix epoch.
    pub expires_ms: i64,
    /// Who queued it.
    pub origin: Origin,
}

/// Why a message was not queued. Nothing was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No such identity.
    #[error("identity {0} is not enrolled")]
    NotEnrolled(String),
    /// The identity was revoked.
    #[error("identity {0} is revoked")]
    Revoked(String),
    /// The identity's queue is at its bound.
    #[error("the queue of {id} is full ({messages} messages, {bytes} bytes queued; bounds: queue.max_messages, queue.max_bytes): try again once the device has taken some")]
    Full {
        /// The identity.
        id: String,
        /// Messages queued.
        messages: u64,
        /// Bytes queued.
        bytes: u64,
    },
}

/// A queue operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The database failed; the operation did not happen (nothing was committed).
    #[error("queue database: {0}")]
    Db(String),
    /// More operations wait for the writer than it holds: try again.
    #[error(
        "the queue is busy ({} operations waiting): try again",
        sqlite::BACKLOG
    )]
    Busy,
    /// The writer stopped (the daemon is shutting down).
    #[error("the queue is closed")]
    Closed,
}

impl QueueError {
    /// The same error, for another caller of the operation that failed (a batch's
    /// senders each get one).
    pub(crate) fn again(&self) -> QueueError {
        match self {
            QueueError::Db(e) => QueueError::Db(e.clone()),
            QueueError::Busy => QueueError::Busy,
            QueueError::Closed => QueueError::Closed,
        }
    }
}

/// A message in the queue, as delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Its id (spec 8.8).
    pub msg_id: u64,
    /// Request or message.
    pub kind: DeliveryKind,
    /// The payload.
    pub payload: Bytes,
    /// Who queued it.
    pub origin: Origin,
}

/// A message that left the queue without an acknowledgement (expired or purged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gone {
    /// Whose it was.
    pub id: Id,
    /// The enrollment it was for.
    pub generation: u64,
    /// Its id.
    pub msg_id: u64,
    /// Who queued it.
    pub origin: Origin,
    /// Whether it was delivered (and not acknowledged) before it went: the device may
    /// have handled it.
    pub delivered: bool,
    /// In a fleet, the node it was queued on when that is another one: its outcome is
    /// reported there ([`Queue::forward`]).
    pub node: Option<String>,
}

/// One queued message, as `tallyd queue` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Listed {
    /// Its id.
    pub msg_id: u64,
    /// `"request"` or `"message"`.
    pub kind: String,
    /// Payload bytes.
    pub bytes: u64,
    /// When it was queued (Unix seconds).
    pub queued: i64,
    /// When it expires (Unix seconds).
    pub expires: i64,
    /// Who queued it.
    pub origin: Origin,
}

/// What the whole queue holds (metrics, `tallyd status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Messages queued.
    pub messages: u64,
    /// Payload bytes queued.
    pub bytes: u64,
    /// When the oldest was queued (Unix milliseconds), if any.
    pub oldest_ms: Option<i64>,
}

/// What a fetch of the next messages found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Next {
    /// The messages to deliver, in id order.
    pub messages: Vec<Queued>,
    /// Those it found past their time, deleted.
    pub expired: Vec<Gone>,
    /// Whether more may follow the last message (the answer was full, or rows after it
    /// are still there).
    pub more: bool,
}

/// A message acknowledged and deleted: where its outcome goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Who queued it.
    pub origin: Origin,
    /// In a fleet, the node it was queued on when that is another one: the outcome was
    /// handed to it (committed with the deletion).
    pub node: Option<String>,
}

/// The outcome of a message, as it travels to the node that queued it (a fleet) and to
/// the backend (spec/BACKEND.md REPORT: the same codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Whose it was.
    pub id: Id,
    /// Its enrollment.
    pub generation: u64,
    /// Its id.
    pub msg_id: u64,
    /// Who queued it.
    pub origin: Origin,
    /// 0 acknowledged, 1 expired, 2 purged, 3 undeliverable, 4 unconfirmed.
    pub code: u8,
    /// The ACK's status (acknowledged).
    pub status: Status,
    /// The ACK's payload (acknowledged), or why it is undeliverable.
    pub payload: Bytes,
}

impl Report {
    /// The code of an acknowledged message.
    pub const ACKNOWLEDGED: u8 = 0;
}

/// The durable queue: the SQLite store's, or a fleet's in PostgreSQL. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Queue {
    /// In the SQLite store.
    Sqlite(sqlite::SqliteQueue),
    /// In a fleet's PostgreSQL store.
    Postgres(postgres::PgQueue),
}

/// Runs the same call on whichever store the queue is in.
macro_rules! either {
    ($q:expr, $call:ident ( $($arg:expr),* )) => {
        match $q {
            Queue::Sqlite(q) => q.$call($($arg),*).await,
            Queue::Postgres(q) => q.$call($($arg),*).await,
        }
    };
}

impl Queue {
    /// Stores `msg` and returns its enrollment and message id once it is durable; or
    /// why it was refused (nothing stored), e.g. at `bounds`.
    pub async fn enqueue(
        &self,
        msg: NewMessage,
        bounds: Bounds,
    ) -> Result<Result<(u64, u64), Refusal>, QueueError> {
        either!(self, enqueue(msg, bounds))
    }

    /// The enrollment `id` names now (revoked or not), if any.
    pub async fn generation(&self, id: &Id) -> Result<Option<u64>, QueueError> {
        either!(self, generation(id))
    }

    /// The next (at most `limit`) messages of enrollment `generation` (of `id`) after
    /// message `after`, in id order, not expired at `now_ms`, each counted as delivered;
    /// the expired ones among them are deleted and returned.
    pub async fn next(
        &self,
        id: &Id,
        generation: u64,
        after: u64,
        limit: usize,
        now_ms: i64,
    ) -> Result<Next, QueueError> {
        either!(self, next(id, generation, after, limit, now_ms))
    }

    /// Deletes acknowledged message `msg_id` of enrollment `generation`, which the
    /// device answered with `status` and `answer`: where its outcome goes, if it was
    /// queued. In a fleet, the outcome of a message queued on another node is handed to
    /// that node in the same transaction ([`Removed::node`]).
    pub async fn ack(
        &self,
        generation: u64,
        msg_id: u64,
        status: Status,
        answer: Bytes,
    ) -> Result<Option<Removed>, QueueError> {
        either!(self, ack(generation, msg_id, status, answer))
    }

    /// Deletes the messages of enrollments that were removed or revoked.
    pub async fn orphans(&self) -> Result<Vec<Gone>, QueueError> {
        either!(self, orphans())
    }

    /// Deletes the messages past their time at `now_ms`, except those of identities
    /// with a live session (`live` here; in a fleet, on any node).
    pub async fn expire(&self, now_ms: i64, live: HashSet<Id>) -> Result<Vec<Gone>, QueueError> {
        either!(self, expire(now_ms, live))
    }

    /// Deletes message `msg_id` of enrollment `generation` (of `id`), or all of them.
    pub async fn purge(
        &self,
        id: &Id,
        generation: u64,
        msg_id: Option<u64>,
    ) -> Result<Vec<Gone>, QueueError> {
        either!(self, purge(id, generation, msg_id))
    }

    /// The messages queued for `id`, oldest first.
    pub async fn list(&self, id: &Id) -> Result<Vec<Listed>, QueueError> {
        either!(self, list(id))
    }

    /// How many messages each identity with any has queued.
    pub async fn depths(&self) -> Result<Vec<(String, u64)>, QueueError> {
        either!(self, depths())
    }

    /// The identities with messages queued.
    pub async fn ids_queued(&self) -> Result<Vec<Id>, QueueError> {
        either!(self, ids_queued())
    }

    /// What the whole queue holds.
    pub async fn totals(&self) -> Result<Totals, QueueError> {
        either!(self, totals())
    }

    /// In a fleet: hands `report` to `node`, where its message was queued (tagged under
    /// the fleet key; that node collects it when told). Without a fleet every outcome is
    /// this daemon's own, and nothing is forwarded.
    pub async fn forward(&self, node: &str, report: &Report) -> Result<(), QueueError> {
        match self {
            Queue::Sqlite(_) => Ok(()),
            Queue::Postgres(q) => q.forward(node, report).await,
        }
    }

    /// In a fleet: the outcomes other nodes forwarded to this one (only those whose tag
    /// verifies), taken out of the store at most [`postgres::COLLECT_BATCH`] at a time,
    /// and how many rows were taken (those that did not verify too).
    pub async fn collect(&self) -> Result<(Vec<Report>, usize), QueueError> {
        match self {
            Queue::Sqlite(_) => Ok((Vec::new(), 0)),
            Queue::Postgres(q) => q.collect().await,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
