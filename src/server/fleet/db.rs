//! The fleet's statements on its PostgreSQL database (docs/CLUSTER.md): what
//! `super::Fleet`'s task runs for the actions of its state machine (`super::node`).
//! Rows are read with `try_get`: a column a database writer changed is an error that
//! says so, never a panic.

use tokio_postgres::Row;

use super::node::{Batch, ClaimKind, ClaimRow};
use crate::store::postgres::Postgres;
use crate::store::StoreError;

/// Runs `batch` for `node` in one statement (`tally_claims`): its releases, then its
/// claims in order (one row each), then its takeover notices (`notices`, the payloads
/// of `tally_close`, tagged by the caller). `reject`: `takeover = "reject"`.
pub async fn run_batch(
    pg: &Postgres,
    node: &str,
    reject: bool,
    stale_ms: i64,
    batch: &Batch,
    notices: &[String],
) -> Result<Vec<ClaimRow>, StoreError> {
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
        .prepare_cached("SELECT * FROM tally_claims($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
        .await
        .map_err(e)?;
    let rows = client
        .query(
            &statement,
            &[
                &node,
                &reject,
                &stale_ms,
                &rel_ids,
                &rel_epochs,
                &all_ids,
                &ids,
                &peers,
                &live,
                &notices,
            ],
        )
        .await
        .map_err(e)?;
    rows.iter().map(|r| claim_row(pg, r)).collect()
}

/// One row of `tally_claim`.
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
