//! The fleet's statements on its PostgreSQL database (docs/CLUSTER.md): what
//! `super::Fleet`'s task runs for the actions of its state machine (`super::node`).
//! Rows are read with `try_get`: a column a database writer changed is an error that
//! says so, never a panic.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::node::{Batch, ClaimKind, ClaimRow};
use crate::store::postgres::Postgres;
use crate::store::StoreError;

/// The fleet's handle on its database: the same pool as the identity store's engine,
/// for the fleet's own tables (`nodes`, `sessions`, `sends`) and channels.
#[derive(Debug, Clone)]
pub struct FleetDb(Postgres);

/// What a heartbeat found.
#[derive(Debug)]
pub struct Heartbeat {
    /// This node's row was there (else another node declared it dead).
    pub alive: bool,
    /// The nodes this heartbeat declared dead (their heartbeat was stale).
    pub dead: Vec<DeadNode>,
    /// The other live nodes' acknowledgements of the fleet's log (unverified).
    pub peers: Vec<(String, LogAck)>,
}

/// A node's acknowledgement of the fleet's log, as its heartbeat writes it.
#[derive(Debug, Clone)]
pub struct LogAck {
    /// Entries verified.
    pub seen: i64,
    /// The last one's tag.
    pub head: Vec<u8>,
    /// The fleet key's tag over the node's name, `seen` and `head`.
    pub tag: Vec<u8>,
}

/// A node declared dead.
#[derive(Debug)]
pub struct DeadNode {
    /// Its name.
    pub node: String,
    /// Its listening address.
    pub addr: String,
    /// How long since its last heartbeat.
    pub silent: Duration,
    /// The claims (sessions) it held, freed with it.
    pub claims: u64,
}

/// A session of the fleet, as `tallyd sessions` lists it.
#[derive(Debug, Clone)]
pub struct FleetSession {
    /// Identity.
    pub id: String,
    /// Node holding it.
    pub node: String,
    /// That node's listening address.
    pub addr: String,
    /// Device address as that node sees it.
    pub peer: String,
    /// Since (seconds since the Unix epoch).
    pub since: i64,
}

/// A send waiting in `sends` for the node holding the session.
#[derive(Debug)]
pub struct PendingSend {
    /// Its number: random, chosen by the origin.
    pub call: i64,
    /// The node it is for.
    pub node: String,
    /// The node that asked.
    pub origin: String,
    /// The device.
    pub id: String,
    /// The claim epoch of the session it is for.
    pub epoch: u64,
    /// REQUEST (else MESSAGE).
    pub request: bool,
    /// Payload.
    pub payload: Vec<u8>,
    /// How long the origin waits.
    pub timeout: Duration,
    /// When the origin sent it (its clock, milliseconds since the Unix epoch).
    pub stamp: i64,
    /// The origin's tag under the fleet key.
    pub tag: Vec<u8>,
}

/// The outcome of a send, as the holding node writes it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The device answered (REQUEST) with this status and payload.
    Answer(u16, Vec<u8>),
    /// The MESSAGE was written.
    Sent,
    /// It failed: how, and why (in words, for the sender).
    Failed(SendFailure, String),
}

/// How a send handed to another node failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailure {
    /// The device had no session there (any more).
    Offline,
    /// Its session ended before it answered.
    Ended,
    /// It did not answer within the send's timeout.
    Timeout,
    /// The serving node refused it.
    Refused,
}

impl SendFailure {
    /// Its word in `sends.error` (and under the answer's tag).
    pub fn word(self) -> &'static str {
        match self {
            SendFailure::Offline => "offline",
            SendFailure::Ended => "ended",
            SendFailure::Timeout => "timeout",
            SendFailure::Refused => "refused",
        }
    }

    /// The failure a word names (`None`: no node writes it).
    pub fn parse(word: &str) -> Option<SendFailure> {
        [
            SendFailure::Offline,
            SendFailure::Ended,
            SendFailure::Timeout,
            SendFailure::Refused,
        ]
        .into_iter()
        .find(|f| f.word() == word)
    }
}

impl SendOutcome {
    /// Its bytes, as its tag covers them: `0 ‖ u16 status ‖ payload`, `1`, or
    /// `2 ‖ kind ‖ 0 ‖ why`.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            SendOutcome::Answer(status, payload) => {
                let mut out = vec![0];
                out.extend_from_slice(&status.to_be_bytes());
                out.extend_from_slice(payload);
                out
            }
            SendOutcome::Sent => vec![1],
            SendOutcome::Failed(kind, why) => {
                let mut out = vec![2];
                out.extend_from_slice(kind.word().as_bytes());
                out.push(0);
                out.extend_from_slice(why.as_bytes());
                out
            }
        }
    }
}

impl FleetDb {
    /// The fleet's statements on `pg`.
    pub fn new(pg: Postgres) -> FleetDb {
        FleetDb(pg)
    }

    /// The database underneath (its runtime, its connection settings).
    pub fn pg(&self) -> &Postgres {
        &self.0
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.0.client().await
    }

    fn error(&self, e: impl std::fmt::Display) -> StoreError {
        self.0.error(e)
    }

    fn count_queries(&self, n: u64) {
        self.0.count_queries(n)
    }

    /// One statement on a pooled connection, counted: its rows.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.count_queries(1);
        let client = self.client().await?;
        client.query(sql, params).await.map_err(|e| self.error(e))
    }

    /// [`FleetDb::query`] of at most one row.
    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        self.count_queries(1);
        let client = self.client().await?;
        client
            .query_opt(sql, params)
            .await
            .map_err(|e| self.error(e))
    }

    /// [`FleetDb::query`] without rows.
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<(), StoreError> {
        self.count_queries(1);
        let client = self.client().await?;
        client
            .execute(sql, params)
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Registers this daemon as `node`, listening on `addr`.
    pub async fn join(&self, node: &str, addr: &str) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO nodes (node, addr) VALUES ($1, $2) ON CONFLICT (node) \
                 DO UPDATE SET addr = excluded.addr, heartbeat = clock_timestamp()",
            &[&node, &addr],
        )
        .await
    }

    /// Renews `node`'s heartbeat and deletes the nodes (and so their claims) whose
    /// heartbeat is older than `stale`, and sends nobody picked up. Returns false if
    /// `node` itself was gone (declared dead by another node: its claims are gone).
    pub async fn heartbeat(
        &self,
        node: &str,
        stale: Duration,
        ack: &LogAck,
    ) -> Result<Heartbeat, StoreError> {
        let c = self.client().await?;
        let e = |e| self.error(e);
        self.count_queries(4);
        let n = c
            .execute(
                "UPDATE nodes SET heartbeat = clock_timestamp(), log_seen = $2, log_head = $3, \
                 log_tag = $4 WHERE node = $1",
                &[&node, &ack.seen, &ack.head, &ack.tag],
            )
            .await
            .map_err(e)?;
        let ms = stale.as_millis() as i64;
        let peers = c
            .query(
                "SELECT node, log_seen, log_head, log_tag FROM nodes WHERE node <> $1 \
                 AND heartbeat > clock_timestamp() - $2::bigint * interval '1 millisecond'",
                &[&node, &ms],
            )
            .await
            .map_err(e)?
            .iter()
            .filter_map(|r| {
                Some((
                    r.try_get::<_, String>(0).ok()?,
                    LogAck {
                        seen: r.try_get(1).ok()?,
                        head: r.try_get::<_, Option<Vec<u8>>>(2).ok()??,
                        tag: r.try_get::<_, Option<Vec<u8>>>(3).ok()??,
                    },
                ))
            })
            .collect();
        // The claims are counted before they go with their node (the cascade runs at
        // the end of the statement).
        let dead = c
            .query(
                "DELETE FROM nodes n WHERE heartbeat < clock_timestamp() - $1::bigint * interval '1 millisecond' \
                 RETURNING node, addr, \
                   (extract(epoch FROM clock_timestamp() - heartbeat) * 1000)::bigint, \
                   (SELECT count(*) FROM sessions s WHERE s.node = n.node)",
                &[&ms],
            )
            .await
            .map_err(e)?
            .iter()
            // Read without a panic whatever a writer made of the table's columns: the
            // heartbeat's task holds the fence.
            .map(|r| DeadNode {
                node: r.try_get(0).unwrap_or_default(),
                addr: r.try_get(1).unwrap_or_default(),
                silent: Duration::from_millis(r.try_get::<_, i64>(2).unwrap_or(0).max(0) as u64),
                claims: r.try_get::<_, i64>(3).unwrap_or(0).max(0) as u64,
            })
            .collect();
        c.execute(
            "DELETE FROM sends WHERE created < clock_timestamp() - interval '1 millisecond' * \
             (timeout_ms + 60000)",
            &[],
        )
        .await
        .map_err(e)?;
        Ok(Heartbeat {
            alive: n == 1,
            dead,
            peers,
        })
    }

    /// The other live nodes and their acknowledgements of the fleet's log (unverified;
    /// `None`: the node wrote none yet).
    pub async fn log_acks(
        &self,
        node: &str,
        stale: Duration,
    ) -> Result<Vec<(String, String, Option<LogAck>)>, StoreError> {
        let ms = stale.as_millis() as i64;
        let rows = self
            .query(
                "SELECT node, addr, log_seen, log_head, log_tag FROM nodes WHERE node <> $1 \
                 AND heartbeat > clock_timestamp() - $2::bigint * interval '1 millisecond' \
                 ORDER BY node",
                &[&node, &ms],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let ack = (|| {
                    Some(LogAck {
                        seen: r.try_get(2).ok()?,
                        head: r.try_get::<_, Option<Vec<u8>>>(3).ok()??,
                        tag: r.try_get::<_, Option<Vec<u8>>>(4).ok()??,
                    })
                })();
                Some((r.try_get(0).ok()?, r.try_get(1).ok()?, ack))
            })
            .collect())
    }

    /// Deletes `node` and its claims (a daemon shutting down).
    pub async fn leave(&self, node: &str) -> Result<(), StoreError> {
        self.execute("DELETE FROM nodes WHERE node = $1", &[&node])
            .await
    }

    /// The claims `node` holds: id and epoch.
    pub async fn claims_of(&self, node: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = self
            .query("SELECT id, epoch FROM sessions WHERE node = $1", &[&node])
            .await?;
        rows.iter()
            .map(|r| Ok((col(self, r, 0)?, col::<i64>(self, r, 1)? as u64)))
            .collect()
    }

    /// The live node holding `id`'s session, if any, and its claim's epoch.
    pub async fn holder(
        &self,
        id: &str,
        stale: Duration,
    ) -> Result<Option<(String, u64)>, StoreError> {
        let ms = stale.as_millis() as i64;
        let row = self.query_opt(
                "SELECT s.node, s.epoch FROM sessions s JOIN nodes n ON n.node = s.node WHERE s.id = $1 \
                 AND n.heartbeat > clock_timestamp() - $2::bigint * interval '1 millisecond'",
                &[&id, &ms],
            ).await?;
        row.map(|r| Ok((col(self, &r, 0)?, col::<i64>(self, &r, 1)? as u64)))
            .transpose()
    }

    /// Every claim of a live node, ordered by id.
    pub async fn fleet_sessions(&self, stale: Duration) -> Result<Vec<FleetSession>, StoreError> {
        let ms = stale.as_millis() as i64;
        let rows = self
            .query(
                "SELECT s.id, s.node, n.addr, s.peer, extract(epoch FROM s.since)::bigint \
                 FROM sessions s JOIN nodes n ON n.node = s.node \
                 WHERE n.heartbeat > clock_timestamp() - $1::bigint * interval '1 millisecond' \
                 ORDER BY s.id",
                &[&ms],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(FleetSession {
                    id: col(self, r, 0)?,
                    node: col(self, r, 1)?,
                    addr: col(self, r, 2)?,
                    peer: col(self, r, 3)?,
                    since: col(self, r, 4)?,
                })
            })
            .collect()
    }

    /// Hands a send to its node (it is told on tally_send).
    pub async fn put_send(&self, send: &PendingSend) -> Result<(), StoreError> {
        let ms = send.timeout.as_millis().min(i64::MAX as u128) as i64;
        let epoch = send.epoch as i64;
        self.execute(
            "WITH ins AS (INSERT INTO sends (call, node, origin, id, epoch, request, \
                 payload, timeout_ms, stamp, tag) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING call) \
                 SELECT pg_notify('tally_send', $2 || ' ' || call) FROM ins",
            &[
                &send.call,
                &send.node,
                &send.origin,
                &send.id,
                &epoch,
                &send.request,
                &send.payload,
                &ms,
                &send.stamp,
                &send.tag,
            ],
        )
        .await
    }

    /// The send `call`, for the node that holds its device's session (which verifies
    /// it before anything else).
    pub async fn take_send(&self, call: i64) -> Result<Option<PendingSend>, StoreError> {
        let row = self
            .query_opt(
                "SELECT call, node, origin, id, epoch, request, payload, timeout_ms, stamp, tag \
                 FROM sends WHERE call = $1 AND NOT done",
                &[&call],
            )
            .await?;
        row.map(|r| {
            Ok(PendingSend {
                call: col(self, &r, 0)?,
                node: col(self, &r, 1)?,
                origin: col(self, &r, 2)?,
                id: col(self, &r, 3)?,
                epoch: col::<i64>(self, &r, 4)? as u64,
                request: col(self, &r, 5)?,
                payload: col(self, &r, 6)?,
                timeout: Duration::from_millis(col::<i64>(self, &r, 7)?.max(0) as u64),
                stamp: col(self, &r, 8)?,
                tag: col(self, &r, 9)?,
            })
        })
        .transpose()
    }

    /// Writes the outcome of `call`, with its tag, and tells `origin` (tally_result).
    pub async fn answer_send(
        &self,
        call: i64,
        origin: &str,
        outcome: &SendOutcome,
        tag: &[u8],
    ) -> Result<(), StoreError> {
        let (status, answer, error): (Option<i32>, Option<&[u8]>, Option<String>) = match outcome {
            SendOutcome::Answer(s, p) => (Some(i32::from(*s)), Some(p), None),
            SendOutcome::Sent => (None, None, None),
            SendOutcome::Failed(kind, why) => (None, None, Some(format!("{} {why}", kind.word()))),
        };
        self.execute(
            "WITH up AS (UPDATE sends SET done = true, status = $2, answer = $3, error = $4, \
                 answer_tag = $6 WHERE call = $1 RETURNING call) \
                 SELECT pg_notify('tally_result', $5 || ' ' || call) FROM up",
            &[&call, &status, &answer, &error, &origin, &tag],
        )
        .await
    }

    /// The outcome of `call` and its tag, if it was answered (`delete`: and the row is
    /// deleted, answered or not).
    pub async fn send_outcome(
        &self,
        call: i64,
        delete: bool,
    ) -> Result<Option<(SendOutcome, Vec<u8>)>, StoreError> {
        let sql = if delete {
            "DELETE FROM sends WHERE call = $1 RETURNING done, status, answer, error, answer_tag"
        } else {
            "SELECT done, status, answer, error, answer_tag FROM sends WHERE call = $1"
        };
        let Some(r) = self.query_opt(sql, &[&call]).await? else {
            return Ok(None);
        };
        if !col::<bool>(self, &r, 0)? {
            return Ok(None);
        }
        let status: Option<i32> = col(self, &r, 1)?;
        let answer: Option<Vec<u8>> = col(self, &r, 2)?;
        let error: Option<String> = col(self, &r, 3)?;
        let tag: Option<Vec<u8>> = col(self, &r, 4)?;
        let outcome = match (status, error) {
            (_, Some(e)) => {
                let (kind, why) = e.split_once(' ').unwrap_or((&e, ""));
                // A word no node writes: no answer this node can use (its tag, made over
                // a node's word, could not verify either).
                let Some(kind) = SendFailure::parse(kind) else {
                    return Ok(None);
                };
                SendOutcome::Failed(kind, why.to_owned())
            }
            (Some(s), None) => SendOutcome::Answer(
                u16::try_from(s).unwrap_or(u16::MAX),
                answer.unwrap_or_default(),
            ),
            (None, None) => SendOutcome::Sent,
        };
        Ok(Some((outcome, tag.unwrap_or_default())))
    }
}

/// Runs `batch` for `node` in one statement (`tally_claims`): its releases, then its
/// claims in order (one row each), then its takeover notices (`notices`, the payloads
/// of `tally_close`, tagged by the caller). `reject`: `takeover = "reject"`.
pub async fn run_batch(
    db: &FleetDb,
    node: &str,
    reject: bool,
    stale_ms: i64,
    batch: &Batch,
    notices: &[String],
) -> Result<Vec<ClaimRow>, StoreError> {
    let pg = db.pg();
    pg.count_queries(1);
    let e = |e| pg.error(e);
    let rel_ids: Vec<&str> = batch.releases.iter().map(|(id, _)| id.as_str()).collect();
    let rel_epochs: Vec<i64> = batch.releases.iter().map(|(_, e)| *e as i64).collect();
    let all_ids: Vec<&str> = batch.release_all.iter().map(|id| id.as_str()).collect();
    let ids: Vec<&str> = batch.claims.iter().map(|c| c.id.as_str()).collect();
    let peers: Vec<&str> = batch.claims.iter().map(|c| c.peer.as_str()).collect();
    let live: Vec<bool> = batch.claims.iter().map(|c| c.self_live).collect();
    // Prepared once per pooled connection: one round trip per batch.
    let client = pg.client().await?;
    let statement = client
        .prepare_cached("SELECT * FROM tally_claims($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)")
        .await
        .map_err(e)?;
    let no = batch.no as i64;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 11] = [
        &node,
        &reject,
        &stale_ms,
        &no,
        &rel_ids,
        &rel_epochs,
        &all_ids,
        &ids,
        &peers,
        &live,
        &notices,
    ];
    // A deadlock with another node's batch (the database aborts one of them, and
    // nothing of it commits) is tried again at once.
    let mut tries = 0;
    let rows = loop {
        match client.query(&statement, &params).await {
            Err(err) if tries < 2 && err.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) => {
                tries += 1;
                pg.count_queries(1);
            }
            other => break other.map_err(e)?,
        }
    };
    rows.iter().map(|r| claim_row(pg, r)).collect()
}

/// Column `i` of a row of the fleet's tables: a column a database writer changed is an
/// error that says so, never a panic.
fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    db: &FleetDb,
    r: &'a Row,
    i: usize,
) -> Result<T, StoreError> {
    r.try_get(i).map_err(|e| {
        db.error(format!(
            "a row of the fleet's tables this tallyd cannot read (column {i}: {e}): changed in the database?"
        ))
    })
}

/// One row of `tally_claims`: one claim's answer.
fn claim_row(pg: &Postgres, r: &Row) -> Result<ClaimRow, StoreError> {
    let bad = |what: &str| {
        pg.error(format!(
            "the claims' statement answered a row whose {what} this tallyd cannot read (the function tally_claims or tally_claim was changed in the database?)"
        ))
    };
    let kind = match r.try_get::<_, &str>(0).map_err(|_| bad("outcome"))? {
        "claimed" => ClaimKind::Claimed,
        "took_over" => ClaimKind::TookOver,
        "refused" => ClaimKind::Refused,
        _ => return Err(bad("outcome")),
    };
    let epoch = r.try_get::<_, i64>(1).map_err(|_| bad("epoch"))?;
    Ok(ClaimRow {
        kind,
        epoch: u64::try_from(epoch).map_err(|_| bad("epoch"))?,
        in_a_row: r
            .try_get::<_, i32>(2)
            .map_err(|_| bad("count of takeovers"))?
            .max(0) as u32,
        old_node: r.try_get(3).map_err(|_| bad("old node"))?,
        old_peer: r.try_get(4).map_err(|_| bad("old peer"))?,
        old_epoch: r
            .try_get::<_, Option<i64>>(5)
            .map_err(|_| bad("old epoch"))?
            .map(|e| e.max(0) as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_failure_is_read_back_as_written_and_an_unknown_word_is_none() {
        for f in [
            SendFailure::Offline,
            SendFailure::Ended,
            SendFailure::Timeout,
            SendFailure::Refused,
        ] {
            assert_eq!(SendFailure::parse(f.word()), Some(f));
        }
        assert_eq!(SendFailure::parse("exploded"), None);
        assert_eq!(SendFailure::parse(""), None);
        // The tag covers the word: the encoding is the word's bytes.
        let out = SendOutcome::Failed(SendFailure::Ended, "why".into()).encode();
        assert_eq!(out, b"\x02ended\x00why");
    }
}
