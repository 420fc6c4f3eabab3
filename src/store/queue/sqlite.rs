//! The durable queue in the SQLite store.
//!
//! One writer thread owns a connection of its own to the identity database and applies
//! every change: it takes whatever operations are waiting, runs them in one transaction,
//! commits (`synchronous = FULL`: on disk before the commit returns) and only then
//! answers each caller. Many enqueues thus share one fsync (group commit), and nobody is
//! ever told "queued" before the message is on disk.

use std::collections::HashSet;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;

use super::{
    now_ms, Bounds, Gone, Listed, NewMessage, Next, Origin, QueueError, Queued, Refusal, Removed,
    Totals,
};
use crate::proto::{DeliveryKind, Id, Status};

/// Operations waiting for the writer, at most; beyond, callers are told to retry.
pub(crate) const BACKLOG: usize = 65_536;
/// Operations applied in one transaction, at most.
const BATCH: usize = 1024;

impl From<rusqlite::Error> for QueueError {
    fn from(e: rusqlite::Error) -> Self {
        QueueError::Db(e.to_string())
    }
}

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;

enum Op {
    Enqueue(NewMessage, Bounds, Reply<Result<(u64, u64), Refusal>>),
    /// The enrollment an id names now.
    Generation {
        id: Id,
        reply: Reply<Option<u64>>,
    },
    /// The next messages of enrollment `generation` after `after` (those past their
    /// time among them are deleted and returned instead).
    Next {
        id: Id,
        generation: u64,
        after: u64,
        limit: usize,
        now_ms: i64,
        reply: Reply<Next>,
    },
    /// Deletes an acknowledged message; its origin, if it was still there.
    Ack {
        generation: u64,
        msg_id: u64,
        reply: Reply<Option<Origin>>,
    },
    /// Deletes expired messages, except those of `live` identities (their sessions
    /// expire them as they go: a delivery on its way is not expired under it).
    Expire {
        now_ms: i64,
        live: HashSet<Id>,
        reply: Reply<Vec<Gone>>,
    },
    /// Deletes messages of enrollments that are gone (removed or revoked).
    Orphans {
        reply: Reply<Vec<Gone>>,
    },
    /// Deletes one message of an enrollment, or all of them.
    Purge {
        id: Id,
        generation: u64,
        msg_id: Option<u64>,
        reply: Reply<Vec<Gone>>,
    },
    List {
        id: Id,
        reply: Reply<Vec<Listed>>,
    },
    /// Queue depth per identity.
    Depths {
        reply: Reply<Vec<(String, u64)>>,
    },
    Totals {
        reply: Reply<Totals>,
    },
    IdsQueued {
        reply: Reply<Vec<Id>>,
    },
}

/// The handle to the queue's writer thread. Cheap to clone.
#[derive(Clone)]
pub struct SqliteQueue {
    ops: mpsc::SyncSender<Op>,
}

impl std::fmt::Debug for SqliteQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteQueue").finish_non_exhaustive()
    }
}

impl SqliteQueue {
    /// Opens the queue in the SQLite database at `path` (the identity store's, already
    /// migrated) and starts its writer thread, which ends when every handle is dropped.
    pub fn open(path: &Path) -> Result<SqliteQueue, QueueError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let (ops, rx) = mpsc::sync_channel(BACKLOG);
        thread::Builder::new()
            .name("tally-queue".into())
            .spawn(move || Writer { conn }.run(rx))
            .map_err(|e| QueueError::Db(format!("cannot start the queue's writer: {e}")))?;
        Ok(SqliteQueue { ops })
    }

    async fn ask<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, QueueError> {
        let (tx, rx) = oneshot::channel();
        self.ops.try_send(op(tx)).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => QueueError::Busy,
            mpsc::TrySendError::Disconnected(_) => QueueError::Closed,
        })?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    /// Stores `msg` and returns its enrollment and message id once it is on disk; or why
    /// it was refused (nothing stored), e.g. at `bounds`.
    pub async fn enqueue(
        &self,
        msg: NewMessage,
        bounds: Bounds,
    ) -> Result<Result<(u64, u64), Refusal>, QueueError> {
        self.ask(|reply| Op::Enqueue(msg, bounds, reply)).await
    }

    /// The enrollment `id` names now (revoked or not), if any.
    pub async fn generation(&self, id: &Id) -> Result<Option<u64>, QueueError> {
        let id = id.clone();
        self.ask(|reply| Op::Generation { id, reply }).await
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
        let id = id.clone();
        self.ask(|reply| Op::Next {
            id,
            generation,
            after,
            limit,
            now_ms,
            reply,
        })
        .await
    }

    /// Deletes acknowledged message `msg_id` of enrollment `generation`: its origin if
    /// it was queued.
    pub async fn ack(
        &self,
        generation: u64,
        msg_id: u64,
        _status: Status,
        _answer: Bytes,
    ) -> Result<Option<Removed>, QueueError> {
        let origin = self
            .ask(|reply| Op::Ack {
                generation,
                msg_id,
                reply,
            })
            .await?;
        Ok(origin.map(|origin| Removed { origin, node: None }))
    }

    /// Deletes the messages of enrollments that were removed or revoked.
    pub async fn orphans(&self) -> Result<Vec<Gone>, QueueError> {
        self.ask(|reply| Op::Orphans { reply }).await
    }

    /// Deletes the messages past their time at `now_ms`, except those of `live`
    /// identities.
    pub async fn expire(&self, now_ms: i64, live: HashSet<Id>) -> Result<Vec<Gone>, QueueError> {
        self.ask(|reply| Op::Expire {
            now_ms,
            live,
            reply,
        })
        .await
    }

    /// Deletes message `msg_id` of enrollment `generation` (of `id`), or all of them.
    pub async fn purge(
        &self,
        id: &Id,
        generation: u64,
        msg_id: Option<u64>,
    ) -> Result<Vec<Gone>, QueueError> {
        let id = id.clone();
        self.ask(|reply| Op::Purge {
            id,
            generation,
            msg_id,
            reply,
        })
        .await
    }

    /// The messages queued for `id`, oldest first.
    pub async fn list(&self, id: &Id) -> Result<Vec<Listed>, QueueError> {
        let id = id.clone();
        self.ask(|reply| Op::List { id, reply }).await
    }

    /// How many messages each identity with any has queued.
    pub async fn depths(&self) -> Result<Vec<(String, u64)>, QueueError> {
        self.ask(|reply| Op::Depths { reply }).await
    }

    /// See [`super::Queue::ids_queued`].
    pub async fn ids_queued(&self) -> Result<Vec<Id>, QueueError> {
        self.ask(|reply| Op::IdsQueued { reply }).await
    }

    /// What the whole queue holds.
    pub async fn totals(&self) -> Result<Totals, QueueError> {
        self.ask(|reply| Op::Totals { reply }).await
    }
}

/// An answer computed inside the transaction, sent once it committed.
type Answer = Box<dyn FnOnce(Result<(), &QueueError>) + Send>;

fn answer<T: Send + 'static>(reply: Reply<T>, value: Result<T, QueueError>) -> Answer {
    Box::new(move |committed| {
        let _ = reply.send(match committed {
            Ok(()) => value,
            Err(e) => Err(QueueError::Db(e.to_string())),
        });
    })
}

struct Writer {
    conn: Connection,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        while let Ok(first) = rx.recv() {
            let mut ops = vec![first];
            while ops.len() < BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            self.batch(ops);
        }
    }

    /// Applies `ops` in one transaction; answers each after the commit (or with the
    /// error that stopped it: then nothing of the batch happened).
    fn batch(&mut self, ops: Vec<Op>) {
        let tx = match self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(e) => {
                let e = QueueError::from(e);
                for op in ops {
                    fail(op, &e);
                }
                return;
            }
        };
        // Each operation in a savepoint of its own: one that fails leaves nothing
        // behind, and the others commit. If SQLite rolled the whole transaction back (a
        // full disk, an I/O error), the rest are not run (they would commit one by one
        // outside it) and every one fails.
        let mut answers: Vec<Answer> = Vec::with_capacity(ops.len());
        let mut broken: Option<QueueError> = None;
        for op in ops {
            if let Some(e) = &broken {
                fail(op, e);
                continue;
            }
            if let Err(e) = tx.execute_batch("SAVEPOINT op") {
                let e = QueueError::from(e);
                fail(op, &e);
                broken = Some(e);
                continue;
            }
            let (answer, ok) = apply(&tx, op);
            let end = if ok {
                tx.execute_batch("RELEASE op")
            } else {
                tx.execute_batch("ROLLBACK TO op; RELEASE op")
            };
            answers.push(answer);
            if let Err(e) = end {
                broken = Some(e.into());
            } else if tx.is_autocommit() {
                broken = Some(QueueError::Db("the transaction was rolled back".into()));
            }
        }
        let committed = match broken {
            Some(e) => {
                drop(tx);
                Err(e)
            }
            None => tx.commit().map_err(QueueError::from),
        };
        for a in answers {
            a(committed.as_ref().map(|_| ()));
        }
    }
}

fn fail(op: Op, e: &QueueError) {
    let e = || QueueError::Db(e.to_string());
    match op {
        Op::Enqueue(_, _, r) => drop(r.send(Err(e()))),
        Op::Generation { reply, .. } => drop(reply.send(Err(e()))),
        Op::Next { reply, .. } => drop(reply.send(Err(e()))),
        Op::Ack { reply, .. } => drop(reply.send(Err(e()))),
        Op::Expire { reply, .. } | Op::Purge { reply, .. } | Op::Orphans { reply } => {
            drop(reply.send(Err(e())))
        }
        Op::List { reply, .. } => drop(reply.send(Err(e()))),
        Op::Depths { reply } => drop(reply.send(Err(e()))),
        Op::Totals { reply } => drop(reply.send(Err(e()))),
        Op::IdsQueued { reply } => drop(reply.send(Err(e()))),
    }
}

/// Runs `op`: its answer (sent after the commit), and whether it succeeded (else its
/// savepoint is rolled back).
fn apply(conn: &Connection, op: Op) -> (Answer, bool) {
    fn done<T: Send + 'static>(reply: Reply<T>, value: Result<T, QueueError>) -> (Answer, bool) {
        let ok = value.is_ok();
        (answer(reply, value), ok)
    }
    match op {
        Op::Enqueue(msg, bounds, reply) => done(reply, enqueue(conn, bounds, &msg)),
        Op::Generation { id, reply } => done(
            reply,
            generation(conn, id.as_str()).map(|g| g.map(|(g, _)| g as u64)),
        ),
        Op::Next {
            id,
            generation,
            after,
            limit,
            now_ms,
            reply,
        } => done(reply, next(conn, &id, generation, after, limit, now_ms)),
        Op::Ack {
            generation,
            msg_id,
            reply,
        } => done(reply, ack(conn, generation, msg_id)),
        Op::Expire {
            now_ms,
            live,
            reply,
        } => done(reply, expire(conn, now_ms, &live)),
        Op::Orphans { reply } => done(reply, orphans(conn)),
        Op::Purge {
            id,
            generation,
            msg_id,
            reply,
        } => done(reply, purge(conn, &id, generation, msg_id)),
        Op::List { id, reply } => done(reply, list(conn, &id)),
        Op::Depths { reply } => done(reply, depths(conn)),
        Op::Totals { reply } => done(reply, totals(conn)),
        Op::IdsQueued { reply } => done(reply, ids_queued(conn)),
    }
}

fn kind_of(n: i64) -> DeliveryKind {
    if n == DeliveryKind::Request as i64 {
        DeliveryKind::Request
    } else {
        DeliveryKind::Message
    }
}

/// The enrollment an id names now: its generation, and whether it is revoked.
fn generation(conn: &Connection, id: &str) -> Result<Option<(i64, bool)>, QueueError> {
    Ok(conn
        .prepare_cached("SELECT generation, key IS NULL FROM identities WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

fn enqueue(
    conn: &Connection,
    bounds: Bounds,
    msg: &NewMessage,
) -> Result<Result<(u64, u64), Refusal>, QueueError> {
    let id = msg.id.as_str();
    let generation = match generation(conn, id)? {
        None => return Ok(Err(Refusal::NotEnrolled(id.into()))),
        Some((_, true)) => return Ok(Err(Refusal::Revoked(id.into()))),
        Some((g, false)) => g,
    };
    let (messages, bytes): (i64, i64) = conn
        .prepare_cached(
            "SELECT queued_messages, queued_bytes FROM identities WHERE generation = ?1",
        )?
        .query_row([generation], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let (messages, bytes) = (messages as u64, bytes as u64);
    if messages >= u64::from(bounds.max_messages)
        || bytes + msg.payload.len() as u64 > bounds.max_bytes
    {
        return Ok(Err(Refusal::Full {
            id: id.into(),
            messages,
            bytes,
        }));
    }
    let msg_id: i64 = conn
        .prepare_cached(
            "UPDATE identities SET next_msg_id = next_msg_id + 1 WHERE generation = ?1
             RETURNING next_msg_id - 1",
        )?
        .query_row([generation], |r| r.get(0))?;
    conn.prepare_cached(
        "INSERT INTO queue (generation, msg_id, kind, payload, queued, expires, origin)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        generation,
        msg_id,
        msg.kind as i64,
        &msg.payload[..],
        now_ms(),
        msg.expires_ms,
        msg.origin as i64
    ])?;
    Ok(Ok((generation as u64, msg_id as u64)))
}

fn next(
    conn: &Connection,
    id: &Id,
    generation: u64,
    after: u64,
    limit: usize,
    now_ms: i64,
) -> Result<Next, QueueError> {
    let generation = generation as i64;
    let expired = conn
        .prepare_cached(
            "DELETE FROM queue WHERE generation = ?1 AND msg_id > ?2 AND expires <= ?3
             RETURNING generation, msg_id, origin, delivered",
        )?
        .query_map(params![generation, after as i64, now_ms], |r| {
            gone_of(id, r)
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let queued = conn
        .prepare_cached(
            "UPDATE queue SET delivered = delivered + 1
             WHERE generation = ?1 AND msg_id IN (
                 SELECT msg_id FROM queue WHERE generation = ?1 AND msg_id > ?2
                 ORDER BY msg_id LIMIT ?3)
             RETURNING msg_id, kind, payload, origin",
        )?
        .query_map(params![generation, after as i64, limit as i64], |r| {
            Ok(Queued {
                msg_id: r.get::<_, i64>(0)? as u64,
                kind: kind_of(r.get(1)?),
                payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                origin: Origin::from_i64(r.get(3)?),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    // RETURNING gives no order: the session delivers in id order.
    let mut queued = queued;
    queued.sort_unstable_by_key(|q| q.msg_id);
    // One writer: a short answer is the end of the queue.
    let more = queued.len() >= limit;
    Ok(Next {
        messages: queued,
        expired,
        more,
    })
}

/// A deleted row of `id` as [`Gone`]: `(generation, msg_id, origin, delivered)` columns.
fn gone_of(id: &Id, r: &rusqlite::Row<'_>) -> rusqlite::Result<Gone> {
    Ok(Gone {
        id: id.clone(),
        generation: r.get::<_, i64>(0)? as u64,
        msg_id: r.get::<_, i64>(1)? as u64,
        origin: Origin::from_i64(r.get(2)?),
        delivered: r.get::<_, i64>(3)? > 0,
        node: None,
    })
}

fn ack(conn: &Connection, generation: u64, msg_id: u64) -> Result<Option<Origin>, QueueError> {
    Ok(conn
        .prepare_cached("DELETE FROM queue WHERE generation = ?1 AND msg_id = ?2 RETURNING origin")?
        .query_row(params![generation as i64, msg_id as i64], |r| r.get(0))
        .optional()?
        .map(Origin::from_i64))
}

/// Expired messages, the oldest first, at most this many per sweep.
const EXPIRE_BATCH: i64 = 1000;

fn expire(conn: &Connection, now_ms: i64, live: &HashSet<Id>) -> Result<Vec<Gone>, QueueError> {
    // The live identities' messages are left to their sessions, in SQL: however many
    // they are, they never crowd out the others (the index on expires is used, and the
    // live ones are skipped there, not after the LIMIT).
    let live: Vec<&str> = live.iter().map(Id::as_str).collect();
    let live = serde_json::to_string(&live).map_err(|e| QueueError::Db(e.to_string()))?;
    take(
        conn,
        "SELECT i.id, q.generation, q.msg_id, q.origin, q.delivered
           FROM queue q JOIN identities i ON i.generation = q.generation
         WHERE q.expires <= ?1 AND i.id NOT IN (SELECT value FROM json_each(?2))
         ORDER BY q.expires LIMIT ?3",
        params![now_ms, live, EXPIRE_BATCH],
    )
}

fn orphans(conn: &Connection) -> Result<Vec<Gone>, QueueError> {
    // A revoked identity keeps its row (its id is known); a removed one has none: its
    // messages are reported as the placeholder id `removed` (their waiters are found
    // by enrollment).
    take(
        conn,
        "SELECT COALESCE(i.id, 'removed'), q.generation, q.msg_id, q.origin, q.delivered
           FROM queue q LEFT JOIN identities i ON i.generation = q.generation
         WHERE i.generation IS NULL OR i.key IS NULL LIMIT ?1",
        params![EXPIRE_BATCH],
    )
}

/// Deletes the rows `select` names (`id, generation, msg_id, origin, delivered`).
fn take(
    conn: &Connection,
    select: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Gone>, QueueError> {
    let rows = conn
        .prepare_cached(select)?
        .query_map(params, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut delete =
        conn.prepare_cached("DELETE FROM queue WHERE generation = ?1 AND msg_id = ?2")?;
    let mut out = Vec::with_capacity(rows.len());
    for (id, generation, msg_id, origin, delivered) in rows {
        delete.execute(params![generation, msg_id])?;
        if let Ok(id) = Id::new(&id) {
            out.push(Gone {
                id,
                generation: generation as u64,
                msg_id: msg_id as u64,
                origin: Origin::from_i64(origin),
                delivered: delivered > 0,
                node: None,
            });
        }
    }
    Ok(out)
}

fn purge(
    conn: &Connection,
    id: &Id,
    generation: u64,
    msg_id: Option<u64>,
) -> Result<Vec<Gone>, QueueError> {
    let rows = conn
        .prepare_cached(
            "DELETE FROM queue WHERE generation = ?1 AND (?2 IS NULL OR msg_id = ?2)
             RETURNING generation, msg_id, origin, delivered",
        )?
        .query_map(params![generation as i64, msg_id.map(|m| m as i64)], |r| {
            gone_of(id, r)
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

fn list(conn: &Connection, id: &Id) -> Result<Vec<Listed>, QueueError> {
    Ok(conn
        .prepare_cached(
            "SELECT q.msg_id, q.kind, LENGTH(q.payload), q.queued, q.expires, q.origin
               FROM queue q JOIN identities i ON i.generation = q.generation
             WHERE i.id = ?1 ORDER BY q.msg_id",
        )?
        .query_map([id.as_str()], |r| {
            Ok(Listed {
                msg_id: r.get::<_, i64>(0)? as u64,
                kind: kind_of(r.get(1)?).as_str().into(),
                bytes: r.get::<_, i64>(2)? as u64,
                queued: r.get::<_, i64>(3)? / 1000,
                expires: r.get::<_, i64>(4)? / 1000,
                origin: Origin::from_i64(r.get(5)?),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?)
}

fn depths(conn: &Connection) -> Result<Vec<(String, u64)>, QueueError> {
    Ok(conn
        .prepare_cached(
            "SELECT i.id, COUNT(*) FROM queue q JOIN identities i ON i.generation = q.generation
             GROUP BY i.id",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
        .collect::<Result<Vec<_>, _>>()?)
}

fn ids_queued(conn: &Connection) -> Result<Vec<Id>, QueueError> {
    let names = conn
        .prepare_cached("SELECT id FROM identities WHERE queued_messages > 0")?
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(names.iter().filter_map(|n| Id::new(n).ok()).collect())
}

fn totals(conn: &Connection) -> Result<Totals, QueueError> {
    Ok(conn
        .prepare_cached(
            "SELECT COALESCE(SUM(queued_messages), 0), COALESCE(SUM(queued_bytes), 0),
                    (SELECT MIN(queued) FROM queue)
             FROM identities",
        )?
        .query_row([], |r| {
            Ok(Totals {
                messages: r.get::<_, i64>(0)? as u64,
                bytes: r.get::<_, i64>(1)? as u64,
                oldest_ms: r.get(2)?,
            })
        })?)
}
