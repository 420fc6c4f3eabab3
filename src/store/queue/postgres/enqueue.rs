//! The enqueue writer of a fleet's queue: group commit on PostgreSQL.
//!
//! Each node runs one writer task. It takes every enqueue waiting (up to [`BATCH`]) and
//! runs them as one transaction of three statements however many messages it holds:
//! the identities' rows locked and read (in the order of their ids), each message
//! decided in the order it came (not enrolled, revoked, over its bounds, or the next
//! id), then, sent together (pipelined on the connection), one UPDATE moving each
//! identity's next id past those taken and one INSERT of every tagged row with the
//! `tally_queued` notice of each identity; then the commit. One message alone costs the
//! round trips it did before (BEGIN, the read, the UPDATE with the INSERT, COMMIT).
//! Nobody hears "queued" before the commit; if the transaction fails, every message of
//! it is refused with the error and nothing of it was stored.
//!
//! Identities' rows are locked in the order of their ids, all at once, on every node:
//! two nodes' writers wait for each other's rows but never deadlock on them. (An
//! acknowledgement or a sweep, whose count trigger takes rows in another order, may
//! still deadlock with a batch: the batch is tried again, twice.)

use std::collections::{BTreeSet, HashMap};

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Transaction;
use tracing::warn;

use super::{col, digest, PgQueue, RowFields, TxFailed};
use crate::store::postgres::channel;
use crate::store::queue::{now_ms, Bounds, NewMessage, QueueError, Refusal};

/// Enqueues one transaction takes at most.
pub(super) const BATCH: usize = 512;

/// What an enqueue is answered: the enrollment and the message id, or why not.
pub(super) type Answer = Result<Result<(u64, u64), Refusal>, QueueError>;

/// An enqueue waiting for the writer.
pub(super) struct Job {
    pub(super) msg: NewMessage,
    pub(super) bounds: Bounds,
    pub(super) done: oneshot::Sender<Answer>,
}

/// The writer: runs until every sender is gone.
pub(super) async fn writer(q: PgQueue, mut jobs: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(BATCH);
    while jobs.recv_many(&mut batch, BATCH).await > 0 {
        let answers = commit_retrying(&q, &batch).await;
        for (k, job) in batch.drain(..).enumerate() {
            let answer = match &answers {
                Ok(each) => Ok(each[k].clone()),
                Err(e) => Err(e.again()),
            };
            let _ = job.done.send(answer);
        }
    }
}

/// [`commit`], tried again (twice) if it lost a deadlock.
async fn commit_retrying(
    q: &PgQueue,
    jobs: &[Job],
) -> Result<Vec<Result<(u64, u64), Refusal>>, QueueError> {
    super::retry_deadlocks(
        || commit(q, jobs),
        || warn!(messages = jobs.len(), "queueing deadlocked; trying again"),
    )
    .await
}

/// Locks the batch's identities' rows, in the order of their ids (every node's writer
/// takes them in that order: two never deadlock on them), and reads what decides each
/// message: its enrollment, its next id, whether it is revoked, what it has queued.
const LOCK: &str = "SELECT id, generation, next_msg_id, key IS NULL, queued_messages, queued_bytes
       FROM identities WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE";

/// Moves each identity's next message id past those the batch took.
const TAKE: &str = "UPDATE identities SET next_msg_id = next_msg_id + u.n
       FROM UNNEST($1::text[], $2::bigint[]) AS u (id, n) WHERE identities.id = u.id";

/// An identity's row, as the batch moves it.
struct Identity {
    generation: i64,
    next_msg_id: i64,
    revoked: bool,
    messages: i64,
    bytes: i64,
    /// Ids this batch took.
    taken: i64,
}

/// One transaction for `jobs`: each one's answer, in order. Three statements however
/// many messages: the rows locked and read, then (sent together) the ids moved on and
/// every message inserted.
async fn commit(q: &PgQueue, jobs: &[Job]) -> Result<Vec<Result<(u64, u64), Refusal>>, TxFailed> {
    let names: Vec<&str> = {
        let set: BTreeSet<&str> = jobs.iter().map(|j| j.msg.id.as_str()).collect();
        set.into_iter().collect()
    };
    let mut c = q.client().await?;
    let tx = c.transaction().await?;
    q.pg.count_queries(1);
    let lock = tx.prepare_cached(LOCK).await?;
    let mut rows = HashMap::with_capacity(names.len());
    for r in tx.query(&lock, &[&names]).await? {
        let identity = Identity {
            generation: col(&r, 1)?,
            next_msg_id: col(&r, 2)?,
            revoked: col(&r, 3)?,
            messages: col(&r, 4)?,
            bytes: col(&r, 5)?,
            taken: 0,
        };
        rows.insert(col::<String>(&r, 0)?, identity);
    }
    // Each message in the order it came, against its identity's row as the messages
    // before it in the batch left it (the count trigger moves the stored counts only
    // at the INSERT).
    let answers: Vec<Result<(i64, i64), Refusal>> = jobs
        .iter()
        .map(|job| {
            let id = job.msg.id.as_str();
            let Some(row) = rows.get_mut(id) else {
                return Err(Refusal::NotEnrolled(id.into()));
            };
            if row.revoked {
                return Err(Refusal::Revoked(id.into()));
            }
            let len = job.msg.payload.len() as i64;
            let max_bytes = i64::try_from(job.bounds.max_bytes).unwrap_or(i64::MAX);
            if row.messages >= i64::from(job.bounds.max_messages)
                || row.bytes.saturating_add(len) > max_bytes
            {
                return Err(Refusal::Full {
                    id: id.into(),
                    messages: row.messages.max(0) as u64,
                    bytes: row.bytes.max(0) as u64,
                });
            }
            let msg_id = row.next_msg_id + row.taken;
            row.taken += 1;
            row.messages += 1;
            row.bytes += len;
            Ok((row.generation, msg_id))
        })
        .collect();
    let (ids, counts): (Vec<&str>, Vec<i64>) = rows
        .iter()
        .filter(|(_, r)| r.taken > 0)
        .map(|(id, r)| (id.as_str(), r.taken))
        .unzip();
    if !ids.is_empty() {
        q.pg.count_queries(1);
        let take = tx.prepare_cached(TAKE).await?;
        // Sent together: the connection pipelines them.
        futures_util::future::try_join(
            async {
                tx.execute(&take, &[&ids, &counts])
                    .await
                    .map_err(TxFailed::Db)
            },
            insert(q, &tx, jobs, &answers),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(answers
        .into_iter()
        .map(|a| a.map(|(g, m)| (g as u64, m as u64)))
        .collect())
}

/// One INSERT of every message that took an id, each row tagged under the fleet key,
/// and a `tally_queued` notice for each of their identities (sent on commit).
async fn insert(
    q: &PgQueue,
    tx: &Transaction<'_>,
    jobs: &[Job],
    answers: &[Result<(i64, i64), Refusal>],
) -> Result<(), TxFailed> {
    let mut generations = Vec::new();
    let mut msg_ids = Vec::new();
    let mut ids = Vec::new();
    let mut kinds = Vec::new();
    let mut payloads: Vec<&[u8]> = Vec::new();
    let mut digests = Vec::new();
    let mut expires = Vec::new();
    let mut origins = Vec::new();
    let mut tags = Vec::new();
    for (job, answer) in jobs.iter().zip(answers) {
        let Ok((generation, msg_id)) = *answer else {
            continue;
        };
        let msg = &job.msg;
        let fields = RowFields {
            generation,
            msg_id,
            id: msg.id.as_str(),
            kind: msg.kind as i16,
            digest: digest(&msg.payload),
            expires: msg.expires_ms,
            origin: msg.origin as i16,
            node: &q.node,
        };
        tags.push(fields.tag(&q.key).to_vec());
        generations.push(generation);
        msg_ids.push(msg_id);
        ids.push(fields.id);
        kinds.push(fields.kind);
        payloads.push(&msg.payload[..]);
        digests.push(fields.digest.to_vec());
        expires.push(fields.expires);
        origins.push(fields.origin);
    }
    if ids.is_empty() {
        return Ok(());
    }
    q.pg.count_queries(1);
    tx.execute(
        "WITH ins AS (
             INSERT INTO queue (generation, msg_id, id, kind, payload, digest, expires, origin,
                                tag, queued, node)
             SELECT g, m, i, k, p, d, e, o, t, $10, $11
               FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::smallint[],
                           $5::bytea[], $6::bytea[], $7::bigint[], $8::smallint[],
                           $9::bytea[]) AS u (g, m, i, k, p, d, e, o, t)
             RETURNING id)
         SELECT pg_notify($12, id) FROM (SELECT DISTINCT id FROM ins) AS queued",
        &[
            &generations,
            &msg_ids,
            &ids,
            &kinds,
            &payloads,
            &digests,
            &expires,
            &origins,
            &tags,
            &now_ms(),
            &q.node,
            &channel::QUEUED,
        ],
    )
    .await?;
    Ok(())
}
