//! The durable queue in a fleet's PostgreSQL store (docs/CLUSTER.md, "Queued delivery").
//!
//! Every node reads and writes the one queue: a message is queued on any node, delivered
//! by the node that holds the identity's session (the claim says which: a node delivers
//! only in a session it registered), and its outcome goes back to the node it was queued
//! on. The database is storage, never an authority: each row is tagged under the fleet
//! key by the node that queued it, over everything a device would receive and where the
//! outcome goes (`generation, msg_id, id, kind, payload, expires, origin, node`), and a
//! node delivers only a row whose tag verifies; a row that does not (no node of the
//! fleet wrote it) is deleted and logged. Outcomes travel tagged too. What a database
//! writer can do is what it can do to any row: delete a message (its sender is then
//! never told), or put an old, genuine one back (the device drops it by its id, spec
//! 8.8).
//!
//! The statements run on the store's runtime ([`Postgres::spawn`]), whichever runtime
//! asks. A commit in PostgreSQL is durable before it returns (the server's own WAL
//! flush, group-committed across connections).

mod enqueue;

use std::collections::HashSet;

use bytes::Bytes;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tracing::warn;

use super::{
    Bounds, Gone, Listed, NewMessage, Next, Origin, QueueError, Queued, Refusal, Removed, Report,
    Totals,
};
use crate::proto::{DeliveryKind, Id, Status};
use crate::store::fleet_key::{FleetKey, Statement};
use crate::store::postgres::{channel, Postgres};

/// Messages expired, or dropped with their enrollment, per sweep at most.
const SWEEP_BATCH: i64 = 1000;
/// Forwarded outcomes read at once, at most (more are read right after).
pub const COLLECT_BATCH: i64 = 1000;

/// The queue of a fleet, as one node uses it. Cheap to clone.
#[derive(Clone)]
pub struct PgQueue {
    pg: Postgres,
    key: FleetKey,
    /// This node's name in the fleet (`nodes.node`).
    node: String,
    /// The node's enqueue writer ([`enqueue`]): ends when every clone that holds this
    /// is gone (the writer's own copy holds none).
    enqueues: Option<tokio::sync::mpsc::Sender<enqueue::Job>>,
}

impl std::fmt::Debug for PgQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgQueue")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// The fields a queued row's tag covers, in order: the payload by its SHA-256 (the
/// `digest` column), so that a row is verified without reading its payload back.
struct RowFields<'a> {
    generation: i64,
    msg_id: i64,
    id: &'a str,
    kind: i16,
    digest: [u8; 32],
    expires: i64,
    origin: i16,
    node: &'a str,
}

impl RowFields<'_> {
    fn tag(&self, key: &FleetKey) -> [u8; 32] {
        self.with(|f| key.tag(Statement::Queued, f))
    }

    fn verify(&self, key: &FleetKey, tag: &[u8]) -> bool {
        self.with(|f| key.verify(Statement::Queued, f, tag))
    }

    fn with<T>(&self, f: impl FnOnce(&[&[u8]]) -> T) -> T {
        f(&[
            &self.generation.to_be_bytes(),
            &self.msg_id.to_be_bytes(),
            self.id.as_bytes(),
            &self.kind.to_be_bytes(),
            &self.digest,
            &self.expires.to_be_bytes(),
            &self.origin.to_be_bytes(),
            self.node.as_bytes(),
        ])
    }
}

/// A payload's SHA-256.
fn digest(payload: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(payload).into()
}

/// A stored digest as 32 bytes (another length never verifies).
fn digest_col(r: &tokio_postgres::Row, i: usize) -> Result<[u8; 32], QueueError> {
    Ok(<[u8; 32]>::try_from(col::<&[u8]>(r, i)?).unwrap_or([0; 32]))
}

/// The fields of a forwarded outcome's tag, in order.
fn outcome_fields(node: &str, r: &Report, with: impl FnOnce(&[&[u8]]) -> bool) -> bool {
    with(&[
        node.as_bytes(),
        r.id.as_str().as_bytes(),
        &r.generation.to_be_bytes(),
        &r.msg_id.to_be_bytes(),
        &[r.origin as u8],
        &[r.code],
        &r.status.0.to_be_bytes(),
        &r.payload,
    ])
}

fn kind_of(n: i16) -> DeliveryKind {
    if n == DeliveryKind::Request as i16 {
        DeliveryKind::Request
    } else {
        DeliveryKind::Message
    }
}

/// A column of a row, or an error that says the row is not what this tallyd wrote.
fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    r: &'a tokio_postgres::Row,
    i: usize,
) -> Result<T, QueueError> {
    r.try_get(i).map_err(|e| {
        QueueError::Db(format!(
            "a queue row this tallyd cannot read (column {i}: {e}): the schema was changed in the database?"
        ))
    })
}

/// The columns of a deleted row that [`PgQueue::gone`] reads, in its order: every
/// statement that deletes rows returns these.
macro_rules! gone_columns {
    () => {
        "id, generation, msg_id, origin, delivered, node, kind, digest, expires, tag"
    };
}

fn db(e: impl std::fmt::Display) -> QueueError {
    QueueError::Db(e.to_string())
}

/// Why a transaction failed (an acknowledgement's, or a batch of enqueues'): the
/// database (a deadlock is tried again), or the queue's own check of what it returned.
enum TxFailed {
    Db(tokio_postgres::Error),
    Queue(QueueError),
}

/// Runs the transaction `attempt` makes, again (twice at most, each time after
/// `retrying`) if PostgreSQL aborted it to break a deadlock: nothing of an aborted one
/// was committed.
async fn retry_deadlocks<T, F, Fut>(mut attempt: F, retrying: impl Fn()) -> Result<T, QueueError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, TxFailed>>,
{
    let mut tries = 0;
    loop {
        match attempt().await {
            Ok(done) => return Ok(done),
            Err(TxFailed::Db(e))
                if tries < 2 && e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) =>
            {
                tries += 1;
                retrying();
            }
            Err(TxFailed::Db(e)) => return Err(db(e)),
            Err(TxFailed::Queue(e)) => return Err(e),
        }
    }
}

impl From<tokio_postgres::Error> for TxFailed {
    fn from(e: tokio_postgres::Error) -> Self {
        TxFailed::Db(e)
    }
}

impl From<QueueError> for TxFailed {
    fn from(e: QueueError) -> Self {
        TxFailed::Queue(e)
    }
}

impl PgQueue {
    /// The queue in `pg`, for node `node` of the fleet whose key is `key`.
    pub fn new(pg: Postgres, key: FleetKey, node: String) -> PgQueue {
        let q = PgQueue {
            pg,
            key,
            node,
            enqueues: None,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(super::sqlite::BACKLOG);
        q.pg.spawn(enqueue::writer(q.clone(), rx));
        PgQueue {
            enqueues: Some(tx),
            ..q
        }
    }

    /// Runs `f` with a pooled connection on the store's runtime.
    async fn run<T, F>(
        &self,
        f: impl FnOnce(PgQueue) -> F + Send + 'static,
    ) -> Result<T, QueueError>
    where
        F: std::future::Future<Output = Result<T, QueueError>> + Send + 'static,
        T: Send + 'static,
    {
        let this = self.clone();
        self.pg
            .spawn(f(this))
            .await
            .map_err(|_| QueueError::Closed)?
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, QueueError> {
        self.pg.client().await.map_err(db)
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, QueueError> {
        self.pg.count_queries(1);
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(db)?;
        c.query(&stmt, params).await.map_err(db)
    }

    /// See [`super::Queue::enqueue`]. Handed to the node's writer ([`enqueue`]), which
    /// runs every enqueue waiting as one transaction: the identity's row takes the next
    /// message id (if it is enrolled, not revoked, and below its bounds), the tagged row
    /// is inserted, and the nodes are told (`tally_queued`, sent on commit). Answered
    /// once committed. More than [`super::sqlite::BACKLOG`] waiting: [`QueueError::Busy`].
    pub async fn enqueue(
        &self,
        msg: NewMessage,
        bounds: Bounds,
    ) -> Result<Result<(u64, u64), Refusal>, QueueError> {
        let writer = self.enqueues.as_ref().ok_or(QueueError::Closed)?;
        let (done, answer) = tokio::sync::oneshot::channel();
        writer
            .try_send(enqueue::Job { msg, bounds, done })
            .map_err(|e| match e {
                tokio::sync::mpsc::error::TrySendError::Full(_) => QueueError::Busy,
                tokio::sync::mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
            })?;
        answer.await.map_err(|_| QueueError::Closed)?
    }

    /// See [`super::Queue::generation`].
    async fn generation_here(&self, id: &Id) -> Result<Option<u64>, QueueError> {
        let rows = self
            .query(
                "SELECT generation FROM identities WHERE id = $1",
                &[&id.as_str()],
            )
            .await?;
        rows.first()
            .map(|r| col::<i64>(r, 0).map(|g| g as u64))
            .transpose()
    }

    /// The node a row's outcome goes to: `None` when it is this one.
    fn elsewhere(&self, node: String) -> Option<String> {
        (node != self.node).then_some(node)
    }

    /// See [`super::Queue::next`]. Rows whose tag does not verify are deleted, not
    /// delivered, and those found expired are reported only if theirs does.
    pub async fn next(
        &self,
        id: &Id,
        generation: u64,
        after: u64,
        limit: usize,
        now_ms: i64,
    ) -> Result<Next, QueueError> {
        let id = id.clone();
        self.run(move |q| async move {
            q.pg.count_queries(2);
            let mut c = q.client().await?;
            let tx = c.transaction().await.map_err(db)?;
            let (g, after) = (generation as i64, after as i64);
            let expired = tx
                .query(
                    concat!(
                        "DELETE FROM queue WHERE generation = $1 AND msg_id > $2 AND expires <= $3
                         RETURNING ",
                        gone_columns!()
                    ),
                    &[&g, &after, &now_ms],
                )
                .await
                .map_err(db)?;
            let expired = q.gone(&expired)?;
            let rows = tx
                .query(
                    "UPDATE queue SET delivered = delivered + 1
                     WHERE generation = $1 AND msg_id IN (
                         SELECT msg_id FROM queue WHERE generation = $1 AND msg_id > $2
                         ORDER BY msg_id LIMIT $3)
                     RETURNING msg_id, kind, payload, origin, expires, node, tag, digest",
                    &[&g, &after, &(limit as i64)],
                )
                .await
                .map_err(db)?;
            let mut messages = Vec::with_capacity(rows.len());
            let mut forged: Vec<i64> = Vec::new();
            let mut last = after;
            for r in &rows {
                let payload: &[u8] = col(r, 2)?;
                let fields = RowFields {
                    generation: g,
                    msg_id: col(r, 0)?,
                    id: id.as_str(),
                    kind: col(r, 1)?,
                    digest: digest(payload),
                    expires: col(r, 4)?,
                    origin: col(r, 3)?,
                    node: col(r, 5)?,
                };
                last = last.max(fields.msg_id);
                // The payload's own digest is what the tag covers; the stored one must
                // be it too, or the ACK's and the sweeps' checks (which read the
                // column, not the payload) would fail for a message delivered.
                if digest_col(r, 7)? != fields.digest || !fields.verify(&q.key, col(r, 6)?) {
                    forged.push(fields.msg_id);
                    continue;
                }
                messages.push(Queued {
                    msg_id: fields.msg_id as u64,
                    kind: kind_of(fields.kind),
                    payload: Bytes::copy_from_slice(payload),
                    origin: Origin::from_i64(fields.origin.into()),
                });
            }
            if !forged.is_empty() {
                warn!(
                    %id,
                    msg_ids = ?forged,
                    "queued messages whose tag does not verify or whose digest column is not their payload's (no node of this fleet queued them so: written into the database by someone else?) deleted, not delivered"
                );
                q.pg.count_queries(1);
                tx.execute(
                    "DELETE FROM queue WHERE generation = $1 AND msg_id = ANY($2)",
                    &[&g, &forged],
                )
                .await
                .map_err(db)?;
            }
            // A short answer is not the end of the queue when rows it chose were deleted
            // under it (an ACK of the session taken over, a purge, a sweep): whether any
            // are left after the last one is asked.
            let more = rows.len() >= limit || {
                q.pg.count_queries(1);
                tx.query_one(
                    "SELECT EXISTS (SELECT 1 FROM queue WHERE generation = $1 AND msg_id > $2)",
                    &[&g, &last],
                )
                .await
                .map_err(db)
                .and_then(|r| col::<bool>(&r, 0))?
            };
            tx.commit().await.map_err(db)?;
            messages.sort_unstable_by_key(|m| m.msg_id);
            Ok(Next {
                messages,
                expired,
                more,
            })
        })
        .await
    }

    /// See [`super::Queue::ack`]. Where the outcome goes is read from the deleted row
    /// and verified: a row whose tag does not verify has no outcome to report. An
    /// outcome for another node is handed to it in the transaction that deletes the row:
    /// a node that dies before the commit leaves the message queued (delivered again),
    /// never deleted with its outcome lost. (One for this node is told by the caller
    /// after the deletion committed: a node that dies between the two takes the sender
    /// waiting on it along.)
    async fn ack_here(
        &self,
        generation: u64,
        msg_id: u64,
        status: Status,
        answer: Bytes,
    ) -> Result<Option<Removed>, QueueError> {
        // A deadlock with a sweep or a first fetch of the same identity (they take its
        // row and the messages' in other orders) aborts one of them: tried again, since
        // an ACK not recorded leaves the message for the device's next session only.
        retry_deadlocks(
            || self.ack_once(generation, msg_id, status, answer.clone()),
            || {
                warn!(
                    msg_id,
                    "recording an acknowledgement deadlocked; trying again"
                )
            },
        )
        .await
    }

    /// One try of [`PgQueue::ack_here`]. A message queued on this node (every message of
    /// a node alone, and most in a fleet behind a balancer that keeps a device on one
    /// node) has its outcome told here: the deletion alone, one autocommitted statement
    /// (one round trip). One queued on another node: the deletion and the outcome
    /// handed to that node in one transaction.
    async fn ack_once(
        &self,
        generation: u64,
        msg_id: u64,
        status: Status,
        answer: Bytes,
    ) -> Result<Option<Removed>, TxFailed> {
        let (g, m) = (generation as i64, msg_id as i64);
        self.pg.count_queries(1);
        let mut c = self.client().await?;
        let here = c
            .prepare_cached(concat!(
                "DELETE FROM queue WHERE generation = $1 AND msg_id = $2 AND node = $3 RETURNING ",
                gone_columns!()
            ))
            .await?;
        let rows = c.query(&here, &[&g, &m, &self.node]).await?;
        if !rows.is_empty() {
            // Deleted (committed): its tag verified, or it was a forgery with no outcome
            // to tell (logged), or it cannot be read (no outcome either: the deletion
            // stands, and is not reported as failed).
            return Ok(match self.gone(&rows) {
                Ok(mut gone) => gone.pop().map(|gone| Removed {
                    origin: gone.origin,
                    node: gone.node,
                }),
                Err(e) => {
                    warn!(msg_id, "an acknowledged message was deleted, but its row could not be read: its sender is not told ({e})");
                    None
                }
            });
        }
        self.pg.count_queries(1);
        let tx = c.transaction().await?;
        let stmt = tx
            .prepare_cached(concat!(
                "DELETE FROM queue WHERE generation = $1 AND msg_id = $2 RETURNING ",
                gone_columns!()
            ))
            .await?;
        let rows = tx.query(&stmt, &[&g, &m]).await?;
        let Some(gone) = self.gone(&rows)?.pop() else {
            tx.commit().await?;
            return Ok(None);
        };
        if let Some(node) = &gone.node {
            let report = Report {
                id: gone.id,
                generation,
                msg_id,
                origin: gone.origin,
                code: Report::ACKNOWLEDGED,
                status,
                payload: answer,
            };
            self.pg.count_queries(1);
            self.insert_outcome(&tx, node, &report).await?;
        }
        tx.commit().await?;
        Ok(Some(Removed {
            origin: gone.origin,
            node: gone.node,
        }))
    }

    /// Deleted rows ([`gone_columns`]) as [`Gone`]: only those whose tag verifies (where
    /// an outcome goes is the row's word only when a node wrote it; the others are
    /// logged).
    fn gone(&self, rows: &[tokio_postgres::Row]) -> Result<Vec<Gone>, QueueError> {
        let mut out = Vec::with_capacity(rows.len());
        let mut forged = 0usize;
        for r in rows {
            let fields = RowFields {
                generation: col(r, 1)?,
                msg_id: col(r, 2)?,
                id: col(r, 0)?,
                kind: col(r, 6)?,
                digest: digest_col(r, 7)?,
                expires: col(r, 8)?,
                origin: col(r, 3)?,
                node: col(r, 5)?,
            };
            let (true, Ok(id)) = (fields.verify(&self.key, col(r, 9)?), Id::new(fields.id)) else {
                forged += 1;
                continue;
            };
            out.push(Gone {
                id,
                generation: fields.generation as u64,
                msg_id: fields.msg_id as u64,
                origin: Origin::from_i64(fields.origin.into()),
                delivered: col::<i32>(r, 4)? > 0,
                node: self.elsewhere(fields.node.to_owned()),
            });
        }
        if forged > 0 {
            warn!(
                forged,
                "queued messages whose tag does not verify deleted, without an outcome to report"
            );
        }
        Ok(out)
    }

    /// Runs a sweep's `sql` if no other node sweeps now (their deletions would take the
    /// identities' rows, in the trigger, in different orders, and deadlock): the rows it
    /// deleted, as [`Gone`].
    async fn sweep(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Gone>, QueueError> {
        self.pg.count_queries(2);
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let mine = tx
            .query_one("SELECT pg_try_advisory_xact_lock(7421)", &[])
            .await
            .map_err(db)
            .and_then(|r| col::<bool>(&r, 0))?;
        if !mine {
            return Ok(Vec::new());
        }
        let rows = tx.query(sql, params).await.map_err(db)?;
        tx.commit().await.map_err(db)?;
        self.gone(&rows)
    }

    /// See [`super::Queue::orphans`]. Also drops the outcomes forwarded to nodes gone
    /// from the fleet for ten minutes (nobody waits for them any more).
    async fn orphans_here(&self) -> Result<Vec<Gone>, QueueError> {
        self.query(
            "DELETE FROM queue_outcomes o
              WHERE o.created < clock_timestamp() - interval '10 minutes'
                AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.node = o.node)",
            &[],
        )
        .await?;
        self.sweep(
            concat!(
                "DELETE FROM queue q USING (
                     SELECT q2.generation AS g, q2.msg_id AS m FROM queue q2
                       LEFT JOIN identities i ON i.generation = q2.generation
                      WHERE i.generation IS NULL OR i.key IS NULL
                      LIMIT $1) doomed
                  WHERE q.generation = doomed.g AND q.msg_id = doomed.m
                 RETURNING ",
                gone_columns!()
            ),
            &[&SWEEP_BATCH],
        )
        .await
    }

    /// See [`super::Queue::expire`]: an identity with a session on any node of the
    /// fleet keeps its messages (that node's session expires them as it fetches).
    async fn expire_here(&self, now_ms: i64, live: HashSet<Id>) -> Result<Vec<Gone>, QueueError> {
        let live: Vec<&str> = live.iter().map(Id::as_str).collect();
        self.sweep(
            concat!(
                "DELETE FROM queue q USING (
                     SELECT q2.generation AS g, q2.msg_id AS m FROM queue q2
                      WHERE q2.expires <= $1 AND NOT (q2.id = ANY($2))
                        AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = q2.id)
                      ORDER BY q2.expires LIMIT $3) doomed
                  WHERE q.generation = doomed.g AND q.msg_id = doomed.m
                 RETURNING ",
                gone_columns!()
            ),
            &[&now_ms, &live, &SWEEP_BATCH],
        )
        .await
    }

    /// See [`super::Queue::purge`].
    async fn purge_here(
        &self,
        _id: &Id,
        generation: u64,
        msg_id: Option<u64>,
    ) -> Result<Vec<Gone>, QueueError> {
        let rows = self
            .query(
                concat!(
                    "DELETE FROM queue WHERE generation = $1 AND ($2::bigint IS NULL OR msg_id = $2)
                     RETURNING ",
                    gone_columns!()
                ),
                &[&(generation as i64), &msg_id.map(|m| m as i64)],
            )
            .await?;
        self.gone(&rows)
    }

    /// See [`super::Queue::list`].
    async fn list_here(&self, id: &Id) -> Result<Vec<Listed>, QueueError> {
        let rows = self
            .query(
                "SELECT q.msg_id, q.kind, octet_length(q.payload)::bigint, q.queued, q.expires,
                        q.origin
                   FROM queue q JOIN identities i ON i.generation = q.generation
                  WHERE i.id = $1 ORDER BY q.msg_id",
                &[&id.as_str()],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Listed {
                    msg_id: col::<i64>(r, 0)? as u64,
                    kind: kind_of(col(r, 1)?).as_str().into(),
                    bytes: col::<i64>(r, 2)? as u64,
                    queued: col::<i64>(r, 3)? / 1000,
                    expires: col::<i64>(r, 4)? / 1000,
                    origin: Origin::from_i64(col::<i16>(r, 5)?.into()),
                })
            })
            .collect()
    }

    /// See [`super::Queue::depths`].
    async fn depths_here(&self) -> Result<Vec<(String, u64)>, QueueError> {
        let rows = self
            .query(
                "SELECT id, queued_messages FROM identities WHERE queued_messages > 0",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((col(r, 0)?, col::<i64>(r, 1)?.max(0) as u64)))
            .collect()
    }

    /// See [`super::Queue::ids_queued`].
    async fn ids_queued_here(&self) -> Result<Vec<Id>, QueueError> {
        let rows = self
            .query("SELECT id FROM identities WHERE queued_messages > 0", &[])
            .await?;
        let mut ids = Vec::with_capacity(rows.len());
        for r in &rows {
            if let Ok(id) = Id::new(col::<&str>(r, 0)?) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// See [`super::Queue::totals`].
    async fn totals_here(&self) -> Result<Totals, QueueError> {
        let rows = self
            .query(
                "SELECT COALESCE(SUM(queued_messages), 0)::bigint,
                        COALESCE(SUM(queued_bytes), 0)::bigint,
                        (SELECT MIN(queued) FROM queue)
                   FROM identities",
                &[],
            )
            .await?;
        let r = rows
            .first()
            .ok_or_else(|| QueueError::Db("a query of one row answered none".into()))?;
        Ok(Totals {
            messages: col::<i64>(r, 0)?.max(0) as u64,
            bytes: col::<i64>(r, 1)?.max(0) as u64,
            oldest_ms: col(r, 2)?,
        })
    }

    /// See [`super::Queue::forward`]: the outcome, tagged, for `node`, which is told
    /// (`tally_outcome`, sent on commit).
    async fn forward_here(&self, node: &str, report: &Report) -> Result<(), QueueError> {
        self.pg.count_queries(1);
        let c = self.client().await?;
        self.insert_outcome(&c, node, report).await
    }

    /// Writes `report`, tagged, for `node` to collect, and tells it (`tally_outcome`, on
    /// commit), on `c` (a pooled connection or a transaction).
    async fn insert_outcome(
        &self,
        c: &impl deadpool_postgres::GenericClient,
        node: &str,
        report: &Report,
    ) -> Result<(), QueueError> {
        let tag = {
            let mut tag = [0u8; 32];
            outcome_fields(node, report, |f| {
                tag = self.key.tag(Statement::Outcome, f);
                true
            });
            tag
        };
        let stmt = c
            .prepare_cached(
                "WITH ins AS (
                 INSERT INTO queue_outcomes (node, generation, msg_id, id, origin, code,
                                             status, payload, tag)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT DO NOTHING RETURNING node)
             SELECT pg_notify($10, node) FROM ins",
            )
            .await
            .map_err(db)?;
        c.query(
            &stmt,
            &[
                &node,
                &(report.generation as i64),
                &(report.msg_id as i64),
                &report.id.as_str(),
                &(report.origin as i16),
                &i16::from(report.code),
                &i32::from(report.status.0),
                &&report.payload[..],
                &&tag[..],
                &channel::OUTCOME,
            ],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    /// See [`super::Queue::collect`]. Outcomes forwarded to nodes that are gone from
    /// the fleet are dropped on the way (nobody waits for them any more).
    async fn collect_here(&self) -> Result<(Vec<Report>, usize), QueueError> {
        let rows = self
            .query(
                "DELETE FROM queue_outcomes WHERE ctid IN (
                     SELECT ctid FROM queue_outcomes WHERE node = $1 LIMIT $2)
                 RETURNING node, id, generation, msg_id, origin, code, status, payload, tag",
                &[&self.node, &COLLECT_BATCH],
            )
            .await?;
        let mut out = Vec::new();
        let mut forged = 0usize;
        for r in &rows {
            let node: &str = col(r, 0)?;
            if node != self.node {
                continue;
            }
            let Ok(id) = Id::new(col::<&str>(r, 1)?) else {
                forged += 1;
                continue;
            };
            let (Ok(code), Ok(status)) = (
                u8::try_from(col::<i16>(r, 5)?),
                u16::try_from(col::<i32>(r, 6)?),
            ) else {
                forged += 1;
                continue;
            };
            let report = Report {
                id,
                generation: col::<i64>(r, 2)? as u64,
                msg_id: col::<i64>(r, 3)? as u64,
                origin: Origin::from_i64(col::<i16>(r, 4)?.into()),
                code,
                status: Status(status),
                payload: Bytes::copy_from_slice(col::<&[u8]>(r, 7)?),
            };
            let tag: &[u8] = col(r, 8)?;
            if outcome_fields(&self.node, &report, |f| {
                self.key.verify(Statement::Outcome, f, tag)
            }) {
                out.push(report);
            } else {
                forged += 1;
            }
        }
        if forged > 0 {
            warn!(
                forged,
                "outcomes of queued messages whose tag does not verify (written into the database by someone else?) dropped"
            );
        }
        Ok((out, rows.len()))
    }
}

/// The calls from any runtime: each runs on the store's (whose pool's connections it
/// drives).
impl PgQueue {
    /// See [`super::Queue::generation`].
    pub async fn generation(&self, id: &Id) -> Result<Option<u64>, QueueError> {
        let id = id.clone();
        self.run(move |q| async move { q.generation_here(&id).await })
            .await
    }

    /// See [`super::Queue::ack`].
    pub async fn ack(
        &self,
        generation: u64,
        msg_id: u64,
        status: Status,
        answer: Bytes,
    ) -> Result<Option<Removed>, QueueError> {
        self.run(move |q| async move { q.ack_here(generation, msg_id, status, answer).await })
            .await
    }

    /// See [`super::Queue::orphans`].
    pub async fn orphans(&self) -> Result<Vec<Gone>, QueueError> {
        self.run(move |q| async move { q.orphans_here().await })
            .await
    }

    /// See [`super::Queue::expire`].
    pub async fn expire(&self, now_ms: i64, live: HashSet<Id>) -> Result<Vec<Gone>, QueueError> {
        self.run(move |q| async move { q.expire_here(now_ms, live).await })
            .await
    }

    /// See [`super::Queue::purge`].
    pub async fn purge(
        &self,
        id: &Id,
        generation: u64,
        msg_id: Option<u64>,
    ) -> Result<Vec<Gone>, QueueError> {
        let id = id.clone();
        self.run(move |q| async move { q.purge_here(&id, generation, msg_id).await })
            .await
    }

    /// See [`super::Queue::list`].
    pub async fn list(&self, id: &Id) -> Result<Vec<Listed>, QueueError> {
        let id = id.clone();
        self.run(move |q| async move { q.list_here(&id).await })
            .await
    }

    /// See [`super::Queue::depths`].
    pub async fn depths(&self) -> Result<Vec<(String, u64)>, QueueError> {
        self.run(move |q| async move { q.depths_here().await })
            .await
    }

    /// See [`super::Queue::ids_queued`].
    pub async fn ids_queued(&self) -> Result<Vec<Id>, QueueError> {
        self.run(move |q| async move { q.ids_queued_here().await })
            .await
    }

    /// See [`super::Queue::totals`].
    pub async fn totals(&self) -> Result<Totals, QueueError> {
        self.run(move |q| async move { q.totals_here().await })
            .await
    }

    /// See [`super::Queue::forward`].
    pub async fn forward(&self, node: &str, report: &Report) -> Result<(), QueueError> {
        let (node, report) = (node.to_owned(), report.clone());
        self.run(move |q| async move { q.forward_here(&node, &report).await })
            .await
    }

    /// See [`super::Queue::collect`].
    pub async fn collect(&self) -> Result<(Vec<Report>, usize), QueueError> {
        self.run(move |q| async move { q.collect_here().await })
            .await
    }
}
