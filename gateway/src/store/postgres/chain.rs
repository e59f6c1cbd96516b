//! The audit chain in PostgreSQL: one chain for every replica, appended inside each change's
//! transaction while it holds the chain's row lock (`SELECT … FOR UPDATE` on `audit_chain`),
//! so sequence numbers and hashes follow commit order. The lock is taken last, just before the
//! commit, and held through it: it is the known bottleneck of several replicas (every
//! issuance's commit waits for the one before), which per-replica chains are to remove.
//! Checkpoints are sealed in the same transaction once `every` entries are unsigned or the
//! oldest unsigned one is `interval` old; a ticker checks the latter when nothing is written.

use std::sync::Weak;
use std::time::{Duration, SystemTime};

use super::super::{BoxFuture, Checkpoints, StoreError};
use super::connect::{Applied, Change, Db, Signing, Tx};
use super::{int, uint};
use crate::audit::{AuditEvent, ChainHead, SealedEntry, checkpoint, seal as seal_event};
use crate::store::chain::digest_from_hex;

/// What a commit added: its chain entries, and the newest feed position it published.
#[derive(Debug, Default)]
pub(super) struct Sealed {
    pub entries: Vec<SealedEntry>,
    pub revocation_head: Option<u64>,
}

/// The chain's head, the last checkpoint's position and when the oldest unsigned entry was
/// appended (Unix milliseconds), read in one statement.
const CHAIN_STATE: &str = "
    SELECT h.seq, h.hash, COALESCE(c.seq, 0),
           (SELECT appended_at FROM audit WHERE seq = COALESCE(c.seq, 0) + 1)
    FROM (SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1) h
    LEFT JOIN (SELECT MAX(seq) AS seq FROM audit WHERE checkpoint) c ON TRUE";

/// Appends what `tx` queued (revocations, then audit entries, then a checkpoint when one is
/// due) under the chain lock. Nothing queued and no check asked for: no lock at all.
pub(super) async fn seal(tx: &mut Tx, checkpoints: &Checkpoints) -> Result<Sealed, StoreError> {
    let mut sealed = Sealed::default();
    let forced = tx.signing == Signing::Now;
    if tx.events.is_empty() && tx.revocations.is_empty() && !forced && !tx.check_chain {
        return Ok(sealed);
    }
    tx.query("SELECT 1 FROM audit_chain WHERE id = 1 FOR UPDATE", &[])
        .await?;
    for r in std::mem::take(&mut tx.revocations) {
        let row = tx
            .query_one(
                "INSERT INTO revocations (seq, serial, spiffe_id, token_id, revoked_at, reason,
                     not_after)
                 SELECT COALESCE(MAX(seq), 0) + 1, $1, $2, $3, $4, $5, $6 FROM revocations
                 RETURNING seq",
                &[
                    &r.serial,
                    &r.spiffe_id,
                    &r.token_id,
                    &int(r.now),
                    &r.reason,
                    &int(r.not_after),
                ],
            )
            .await?;
        sealed.revocation_head = Some(uint(&row, 0)?);
    }
    if let Some(seq) = sealed.revocation_head {
        // Delivered to every listening replica when (and only if) this commits.
        tx.query(
            "SELECT pg_notify($1, $2)",
            &[&super::notify::CHANNEL, &seq.to_string()],
        )
        .await?;
    }
    let state = tx.query_opt(CHAIN_STATE, &[]).await?;
    let (mut head, last_checkpoint, oldest_unsigned) = match state {
        Some(row) => (
            ChainHead {
                seq: uint(&row, 0)?,
                hash: digest_from_hex(row.try_get(1)?)?,
            },
            uint(&row, 2)?,
            row.try_get::<_, Option<i64>>(3)?,
        ),
        None => (ChainHead::genesis(), 0, None),
    };
    let now = SystemTime::now();
    let events = std::mem::take(&mut tx.events);
    append(tx, &mut head, &mut sealed.entries, &events, now).await?;
    let unsigned = head.seq - last_checkpoint;
    let oldest = oldest_unsigned.unwrap_or_else(|| millis(now));
    let old_enough = millis(now).saturating_sub(oldest) >= int_millis(checkpoints.interval);
    if unsigned > 0 && (forced || unsigned >= checkpoints.every.get() || old_enough) {
        let signed = checkpoint(&checkpoints.key, &head, now);
        append(tx, &mut head, &mut sealed.entries, &[signed], now).await?;
    }
    Ok(sealed)
}

async fn append(
    tx: &Tx,
    head: &mut ChainHead,
    sealed: &mut Vec<SealedEntry>,
    events: &[AuditEvent],
    now: SystemTime,
) -> Result<(), StoreError> {
    for event in events {
        let entry = seal_event(head, now, event);
        let is_checkpoint = matches!(event, AuditEvent::Checkpoint { .. });
        tx.execute(
            "INSERT INTO audit (seq, hash, line, checkpoint, appended_at)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &int(entry.seq),
                &hex::encode(entry.hash),
                &entry.line,
                &is_checkpoint,
                &millis(now),
            ],
        )
        .await?;
        *head = ChainHead {
            seq: entry.seq,
            hash: entry.hash,
        };
        sealed.push(entry);
    }
    Ok(())
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn int_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Signs the chain's unsigned tail: always (`force`, a flush or a close) or when it is due by
/// time (the ticker).
pub(super) struct Checkpoint {
    pub force: bool,
}

impl Change for Checkpoint {
    type Output = ();

    fn apply<'a>(&'a self, tx: &'a mut Tx) -> BoxFuture<'a, Result<Applied<()>, StoreError>> {
        if self.force {
            tx.signing = Signing::Now;
        }
        tx.check_chain = true;
        Box::pin(async { Ok(Applied::Commit(())) })
    }
}

/// Every `interval`, lets a checkpoint fall due by time though nothing else is written; stops
/// once the store is gone.
pub(super) async fn tick(db: Weak<Db>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(db) = db.upgrade() else { return };
        if let Err(e) = db.write(&Checkpoint { force: false }).await {
            tracing::warn!(error = %e, "store: audit checkpoint check failed");
        }
    }
}

/// The head of the chain in the `audit` table.
pub(super) async fn head_of(db: &Db) -> Result<ChainHead, StoreError> {
    let rows = db
        .read("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])
        .await?;
    Ok(match rows.first() {
        Some(row) => ChainHead {
            seq: uint(row, 0)?,
            hash: digest_from_hex(row.try_get(1)?)?,
        },
        None => ChainHead::genesis(),
    })
}
