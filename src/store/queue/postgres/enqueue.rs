//! The enqueue writer of a fleet's queue: group commit on PostgreSQL.
//!
//! Each node runs one writer task. It takes every enqueue waiting (up to [`BATCH`]) and
//! runs them as one transaction: one UPDATE per identity takes as many message ids as
//! the batch has messages for it (under its bounds), all those UPDATEs sent at once
//! (pipelined on the connection), then one INSERT of every tagged row, with the
//! `tally_queued` notice of each identity, then the commit. A batch costs a few round
//! trips and one commit however many messages it holds; one message alone costs what
//! it did before (BEGIN, UPDATE, INSERT, COMMIT). Nobody hears "queued" before the
//! commit; if the transaction fails, every message of it is refused with the error and
//! nothing of it was stored.
//!
//! Identities' rows are taken in the order of their ids, on every node: two nodes'
//! writers wait for each other's rows but never deadlock on them. (An acknowledgement
//! or a sweep may still deadlock with a batch: the batch is tried again.) An identity
//! whose messages do not all fit under its bounds, or that is not enrolled or revoked,
//! has its messages taken one at a time in the same transaction: those that fit are
//! queued, in order, and each of the others is refused with the reason.

use std::collections::BTreeMap;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
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
                Err(e) => Err(QueueError::Db(e.clone())),
            };
            let _ = job.done.send(answer);
        }
    }
}

/// [`commit`], tried again (twice) if it lost a deadlock.
async fn commit_retrying(
    q: &PgQueue,
    jobs: &[Job],
) -> Result<Vec<Result<(u64, u64), Refusal>>, String> {
    let mut tries = 0;
    loop {
        match commit(q, jobs).await {
            Ok(answers) => return Ok(answers),
            Err(TxFailed::Db(e))
                if tries < 2 && e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) =>
            {
                tries += 1;
                warn!(messages = jobs.len(), "queueing deadlocked; trying again");
            }
            Err(TxFailed::Db(e)) => return Err(e.to_string()),
            Err(TxFailed::Queue(e)) => return Err(e.to_string()),
        }
    }
}

/// The statement that takes `$2` message ids of identity `$1` if `$3` messages and `$5`
/// bytes more fit under its bounds (`$4`, `$6`): its generation and the first id
/// taken. (The count trigger moves the identity's counts only when the rows are
/// inserted, at the end of the transaction: what this batch took before is in `$3` and
/// `$5`.)
const TAKE: &str = "UPDATE identities SET next_msg_id = next_msg_id + $2
     WHERE id = $1 AND key IS NOT NULL
       AND queued_messages + $3 <= $4 AND queued_bytes + $5 <= $6
     RETURNING generation, next_msg_id - $2";

/// One transaction for `jobs`: each one's answer, in order.
async fn commit(q: &PgQueue, jobs: &[Job]) -> Result<Vec<Result<(u64, u64), Refusal>>, TxFailed> {
    // Each identity's messages, in the order they came; identities in the order of
    // their ids (every node takes their rows in that order).
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (k, job) in jobs.iter().enumerate() {
        groups.entry(job.msg.id.as_str()).or_default().push(k);
    }
    let mut c = q.client().await?;
    let tx = c.transaction().await?;
    let take = tx.prepare_cached(TAKE).await?;
    // What each group asks: its count and bytes against the tightest bounds among its
    // messages (the configuration may have been reloaded between them).
    let asks: Vec<(&str, [i64; 4])> = groups
        .iter()
        .map(|(id, ks)| {
            let max_messages = ks.iter().map(|k| jobs[*k].bounds.max_messages).min();
            let max_bytes = ks.iter().map(|k| jobs[*k].bounds.max_bytes).min();
            let bytes: usize = ks.iter().map(|k| jobs[*k].msg.payload.len()).sum();
            (
                *id,
                [
                    ks.len() as i64,
                    i64::from(max_messages.unwrap_or(0)),
                    bytes as i64,
                    max_bytes.map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)),
                ],
            )
        })
        .collect();
    q.pg.count_queries(asks.len() as u64);
    // Sent at once: the connection pipelines them.
    let (txr, take) = (&tx, &take);
    let took =
        futures_util::future::try_join_all(asks.iter().map(|(id, [n, mm, b, mb])| async move {
            txr.query_opt(take, &[id, n, n, mm, b, mb]).await
        }))
        .await?;
    let mut answers: Vec<Option<Result<(i64, i64), Refusal>>> = vec![None; jobs.len()];
    for ((_, ks), row) in groups.iter().zip(&took) {
        if let Some(row) = row {
            let (generation, first): (i64, i64) = (col(row, 0)?, col(row, 1)?);
            for (n, k) in ks.iter().enumerate() {
                answers[*k] = Some(Ok((generation, first + n as i64)));
            }
            continue;
        }
        // Not all of them fit, or none can: one at a time, in order.
        let mut before = (0, 0);
        for k in ks {
            let answer = take_one(q, &tx, take, &jobs[*k], before).await?;
            if answer.is_ok() {
                before = (before.0 + 1, before.1 + jobs[*k].msg.payload.len() as i64);
            }
            answers[*k] = Some(answer);
        }
    }
    let answers: Vec<Result<(i64, i64), Refusal>> = answers
        .into_iter()
        .map(|a| a.expect("every job answered"))
        .collect();
    insert(q, &tx, jobs, &answers).await?;
    tx.commit().await?;
    Ok(answers
        .into_iter()
        .map(|a| a.map(|(g, m)| (g as u64, m as u64)))
        .collect())
}

/// Takes one message id for `job`'s identity, which this batch took `before` (messages,
/// bytes) of already, or says why not (nothing changed).
async fn take_one(
    q: &PgQueue,
    tx: &Transaction<'_>,
    take: &tokio_postgres::Statement,
    job: &Job,
    before: (i64, i64),
) -> Result<Result<(i64, i64), Refusal>, TxFailed> {
    let id = job.msg.id.as_str();
    let (max_messages, max_bytes) = (
        i64::from(job.bounds.max_messages),
        i64::try_from(job.bounds.max_bytes).unwrap_or(i64::MAX),
    );
    q.pg.count_queries(1);
    let (count, bytes) = (before.0 + 1, before.1 + job.msg.payload.len() as i64);
    if let Some(row) = tx
        .query_opt(
            take,
            &[&id, &1i64, &count, &max_messages, &bytes, &max_bytes],
        )
        .await?
    {
        return Ok(Ok((col(&row, 0)?, col(&row, 1)?)));
    }
    q.pg.count_queries(1);
    let why = tx
        .query_opt(
            "SELECT key IS NULL, queued_messages, queued_bytes FROM identities WHERE id = $1",
            &[&id],
        )
        .await?;
    Ok(Err(match why {
        None => Refusal::NotEnrolled(id.into()),
        Some(r) if col::<bool>(&r, 0)? => Refusal::Revoked(id.into()),
        Some(r) => Refusal::Full {
            id: id.into(),
            messages: (col::<i64>(&r, 1)? + before.0).max(0) as u64,
            bytes: (col::<i64>(&r, 2)? + before.1).max(0) as u64,
        },
    }))
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
