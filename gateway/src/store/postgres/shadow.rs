//! Shadow disagreements and recorded decisions on PostgreSQL: the inserts and the trim (to the
//! newest rows, and by age) in one transaction.

use super::super::{BoxFuture, DecisionRecord, Disagreement, StoreError};
use super::connect::{Applied, Change, Db, Tx};
use super::{int, uint};

/// Records one disagreement and keeps the newest `keep`.
pub(super) struct Record(pub Disagreement, pub u32);

impl Change for Record {
    type Output = ();

    fn apply<'a>(&'a self, tx: &'a mut Tx) -> BoxFuture<'a, Result<Applied<()>, StoreError>> {
        Box::pin(async move {
            let d = &self.0;
            let row = tx
                .query_one(
                    "INSERT INTO shadow_disagreements (at, request_id, cluster, role,
                         active_version, candidate_version, active, candidate, input)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING seq",
                    &[
                        &int(d.at),
                        &d.request_id,
                        &d.cluster,
                        &d.role,
                        &d.active_version,
                        &d.candidate_version,
                        &d.active,
                        &d.candidate,
                        &d.input,
                    ],
                )
                .await?;
            let newest: i64 = row.try_get(0)?;
            tx.execute(
                "DELETE FROM shadow_disagreements WHERE seq <= $1",
                &[&(newest - i64::from(self.1))],
            )
            .await?;
            Ok(Applied::Commit(()))
        })
    }
}

/// The newest `limit` rows, newest first.
pub(super) async fn newest(db: &Db, limit: u32) -> Result<Vec<Disagreement>, StoreError> {
    let client = db.client().await?;
    let statement = client
        .prepare_cached(
            "SELECT seq, at, request_id, cluster, role, active_version, candidate_version,
                    active, candidate, input
             FROM shadow_disagreements ORDER BY seq DESC LIMIT $1",
        )
        .await?;
    client
        .query(&statement, &[&i64::from(limit)])
        .await?
        .iter()
        .map(|r| {
            Ok(Disagreement {
                seq: uint(r, 0)?,
                at: uint(r, 1)?,
                request_id: r.try_get(2)?,
                cluster: r.try_get(3)?,
                role: r.try_get(4)?,
                active_version: r.try_get(5)?,
                candidate_version: r.try_get(6)?,
                active: r.try_get(7)?,
                candidate: r.try_get(8)?,
                input: r.try_get(9)?,
            })
        })
        .collect()
}

/// Records decisions, drops those older than `.2` and all but the newest `.1`: two
/// statements whatever the number of decisions (queued with the joins they decided, in their
/// group's transaction).
pub(super) struct Decisions(pub Vec<DecisionRecord>, pub u32, pub u64);

impl Change for Decisions {
    type Output = ();

    fn apply<'a>(&'a self, tx: &'a mut Tx) -> BoxFuture<'a, Result<Applied<()>, StoreError>> {
        Box::pin(async move {
            if self.0.is_empty() {
                return Ok(Applied::Commit(()));
            }
            let column =
                |f: fn(&DecisionRecord) -> &str| -> Vec<&str> { self.0.iter().map(f).collect() };
            let at: Vec<i64> = self.0.iter().map(|d| int(d.at)).collect();
            let row = tx
                .query_one(
                    "WITH added AS (
                         INSERT INTO decisions (at, request_id, cluster, role, policy_version,
                             outcome, input)
                         SELECT a, r, c, o, v, d, i
                         FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[],
                             $5::TEXT[], $6::TEXT[], $7::TEXT[])
                             WITH ORDINALITY AS t(a, r, c, o, v, d, i, n)
                         ORDER BY n
                         RETURNING seq)
                     SELECT MAX(seq) FROM added",
                    &[
                        &at,
                        &column(|d| &d.request_id),
                        &column(|d| &d.cluster),
                        &column(|d| &d.role),
                        &column(|d| &d.policy_version),
                        &column(|d| &d.outcome),
                        &column(|d| &d.input),
                    ],
                )
                .await?;
            let newest: i64 = row.try_get(0)?;
            // Each condition walks its own index from the oldest row and stops at the first
            // it keeps. (`seq <= $1 OR at < $2` as one condition was planned generically as a
            // sequential scan of the whole table: 1.3 ms per call at 8,000 rows, measured.)
            // The limits bound one call's work; every call trims again.
            tx.execute(
                "DELETE FROM decisions WHERE seq IN (
                     (SELECT seq FROM decisions WHERE seq <= $1 ORDER BY seq LIMIT 10000)
                     UNION ALL
                     (SELECT seq FROM decisions WHERE at < $2 ORDER BY at LIMIT 10000))",
                &[&(newest - i64::from(self.1)), &int(self.2)],
            )
            .await?;
            Ok(Applied::Commit(()))
        })
    }
}

/// Up to `limit` decisions after `after` made at or after `since`, oldest first.
pub(super) async fn decisions(
    db: &Db,
    since: u64,
    after: u64,
    limit: u32,
) -> Result<Vec<DecisionRecord>, StoreError> {
    let client = db.client().await?;
    let statement = client
        .prepare_cached(
            "SELECT seq, at, request_id, cluster, role, policy_version, outcome, input
             FROM decisions WHERE at >= $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .await?;
    client
        .query(&statement, &[&int(since), &int(after), &i64::from(limit)])
        .await?
        .iter()
        .map(|r| {
            Ok(DecisionRecord {
                seq: uint(r, 0)?,
                at: uint(r, 1)?,
                request_id: r.try_get(2)?,
                cluster: r.try_get(3)?,
                role: r.try_get(4)?,
                policy_version: r.try_get(5)?,
                outcome: r.try_get(6)?,
                input: r.try_get(7)?,
            })
        })
        .collect()
}
