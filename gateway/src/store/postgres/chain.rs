//! The audit chains in PostgreSQL: one per replica process. A replica claims a chain when its
//! store opens (`audit_chains`, its id from the database's sequence) and is that chain's only
//! writer, so it keeps the chain's head in memory and appends to it without a database lock:
//! each change's entries are sealed onto the chain inside its transaction, and the replica's
//! chain is held (a mutex, not a row) from the seal through the commit, so its entries commit
//! in chain order and a failed commit leaves no gap. Replicas no longer wait for each other.
//! Revocations still take the feed's lock row (`audit_chain`), so feed positions become
//! visible in order; only revoking transactions do.
//!
//! Checkpoints are sealed in the same transaction once `every` entries of the chain are
//! unsigned or the oldest unsigned one is `interval` old (a ticker checks the latter when
//! nothing is written); each binds the heads of every other chain in the database, so an
//! entry another replica committed and a checkpoint saw cannot later go missing unnoticed.

use std::sync::Weak;
use std::time::{Duration, SystemTime};

use super::super::{BoxFuture, Checkpoints, StoreError};
use super::connect::{Applied, Change, Db, Signing, Tx};
use super::{int, uint};
use crate::audit::{AuditEvent, BoundHead, ChainHead, SealedEntry, checkpoint_in, seal_in};
use crate::store::chain::digest_from_hex;

/// The chain this replica writes, as far as it has committed.
#[derive(Debug)]
pub(super) struct OwnChain {
    /// Its id in `audit_chains`.
    pub id: u64,
    /// Its state after the last commit; `None` when not known (a commit whose outcome was
    /// lost): read again from the database before the next seal.
    state: Option<ChainState>,
}

/// A chain's head, its last checkpoint's seq, and when its oldest unsigned entry was appended
/// (Unix milliseconds).
#[derive(Debug, Clone, Copy)]
pub(super) struct ChainState {
    head: ChainHead,
    signed_seq: u64,
    oldest_unsigned: Option<i64>,
}

impl OwnChain {
    /// Claims a new chain for this replica (`replica` names it for people reading
    /// `audit_chains`).
    pub(super) async fn claim(db: &Db, replica: &str) -> Result<Self, StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Through `read`'s retry: an attempt whose answer was lost may leave a chain claimed
        // and never written, which verifies as an empty chain.
        let rows = db
            .read(
                "INSERT INTO audit_chains (replica, opened_at) VALUES ($1, $2) RETURNING id",
                &[&replica, &int(now)],
            )
            .await?;
        let id = match rows.first() {
            Some(row) => uint(row, 0)?,
            None => return Err(StoreError::Corrupt("no chain id returned".into())),
        };
        tracing::info!(chain = id, "store: audit chain claimed");
        Ok(Self {
            id,
            state: Some(ChainState {
                head: ChainHead::genesis_of(id),
                signed_seq: 0,
                oldest_unsigned: None,
            }),
        })
    }

    /// Forgets the state: the last commit's outcome is unknown.
    pub(super) fn forget(&mut self) {
        self.state = None;
    }

    /// The state after a commit that succeeded.
    pub(super) fn committed(&mut self, state: ChainState) {
        self.state = Some(state);
    }
}

/// What a commit adds: its chain entries (not inserted yet: [`insert`] goes with the commit,
/// in the same round trip), the newest feed position it published, and the chain's state once
/// it commits.
#[derive(Debug)]
pub(super) struct Sealed {
    pub chain: u64,
    pub entries: Vec<SealedEntry>,
    is_checkpoint: Vec<bool>,
    appended_at: i64,
    pub revocation_head: Option<u64>,
    pub state: ChainState,
}

/// Chain `$1`'s head, last checkpoint and the time of its oldest unsigned entry, in one
/// statement.
const CHAIN_STATE: &str = "
    SELECT h.seq, h.hash, COALESCE(c.seq, 0),
           (SELECT appended_at FROM audit WHERE chain = $1 AND seq = COALESCE(c.seq, 0) + 1)
    FROM (SELECT seq, hash FROM audit WHERE chain = $1 ORDER BY seq DESC LIMIT 1) h
    LEFT JOIN (SELECT MAX(seq) AS seq FROM audit WHERE chain = $1 AND checkpoint) c ON TRUE";

/// Every other chain's committed head, for a checkpoint to bind.
const OTHER_HEADS: &str = "
    SELECT c.id, a.seq, a.hash FROM audit_chains c
    CROSS JOIN LATERAL
        (SELECT seq, hash FROM audit WHERE chain = c.id ORDER BY seq DESC LIMIT 1) a
    WHERE c.id <> $1
    ORDER BY c.id";

/// Seals what `tx` queued (revocations, then audit entries on `own`, then a checkpoint when
/// one is due); the entries are inserted by [`insert`], sent with the commit. Called only when
/// the transaction has something to seal ([`Tx::quiet`] is false).
pub(super) async fn seal(
    tx: &mut Tx,
    own: &mut OwnChain,
    checkpoints: &Checkpoints,
) -> Result<Sealed, StoreError> {
    let forced = tx.signing == Signing::Now;
    let mut revocation_head = None;
    let revocations = std::mem::take(&mut tx.revocations);
    if !revocations.is_empty() {
        // Feed positions in commit order across replicas: one revoking transaction at a time.
        tx.query("SELECT 1 FROM audit_chain WHERE id = 1 FOR UPDATE", &[])
            .await?;
    }
    for r in revocations {
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
        revocation_head = Some(uint(&row, 0)?);
    }
    if let Some(seq) = revocation_head {
        // Delivered to every listening replica when (and only if) this commits.
        tx.query(
            "SELECT pg_notify($1, $2)",
            &[&super::notify::CHANNEL, &seq.to_string()],
        )
        .await?;
    }
    let mut state = match own.state {
        Some(state) => state,
        None => read_state(tx, own.id).await?,
    };
    let now = SystemTime::now();
    let events = std::mem::take(&mut tx.events);
    let mut entries = Vec::with_capacity(events.len() + 1);
    for event in &events {
        push(&mut entries, own.id, &mut state, event, now);
    }
    let mut is_checkpoint = vec![false; entries.len()];
    let unsigned = state.head.seq - state.signed_seq;
    let oldest = state.oldest_unsigned.unwrap_or_else(|| millis(now));
    let old_enough = millis(now).saturating_sub(oldest) >= int_millis(checkpoints.interval);
    if unsigned > 0 && (forced || unsigned >= checkpoints.every.get() || old_enough) {
        let bound = other_heads(tx, own.id).await?;
        let signed = checkpoint_in(&checkpoints.key, own.id, &state.head, bound, now);
        push(&mut entries, own.id, &mut state, &signed, now);
        is_checkpoint.push(true);
        state.signed_seq = state.head.seq;
        state.oldest_unsigned = None;
    }
    tx.prepare(&[INSERT]).await?;
    Ok(Sealed {
        chain: own.id,
        entries,
        is_checkpoint,
        appended_at: millis(now),
        revocation_head,
        state,
    })
}

/// Seals `event` after `state`'s head.
fn push(
    entries: &mut Vec<SealedEntry>,
    chain: u64,
    state: &mut ChainState,
    event: &AuditEvent,
    now: SystemTime,
) {
    let entry = seal_in(chain, &state.head, now, event);
    state.head = ChainHead {
        seq: entry.seq,
        hash: entry.hash,
    };
    if state.oldest_unsigned.is_none() && !matches!(event, AuditEvent::Checkpoint { .. }) {
        state.oldest_unsigned = Some(millis(now));
    }
    entries.push(entry);
}

const INSERT: &str = "INSERT INTO audit (chain, seq, hash, line, checkpoint, appended_at)
     SELECT $1, s, h, l, c, $6
     FROM UNNEST($2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::BOOLEAN[]) AS t(s, h, l, c)";

/// Inserts the sealed entries, in one statement (prepared by [`seal`], so it is sent when
/// first polled).
pub(super) async fn insert(tx: &Tx, sealed: &Sealed) -> Result<(), StoreError> {
    if sealed.entries.is_empty() {
        return Ok(());
    }
    let entries = &sealed.entries;
    let seqs: Vec<i64> = entries.iter().map(|e| int(e.seq)).collect();
    let hashes: Vec<String> = entries.iter().map(|e| hex::encode(e.hash)).collect();
    let lines: Vec<&str> = entries.iter().map(|e| e.line.as_str()).collect();
    tx.execute(
        INSERT,
        &[
            &int(sealed.chain),
            &seqs,
            &hashes,
            &lines,
            &sealed.is_checkpoint,
            &sealed.appended_at,
        ],
    )
    .await?;
    Ok(())
}

/// The chain's state as the database holds it.
async fn read_state(tx: &Tx, chain: u64) -> Result<ChainState, StoreError> {
    let row = tx.query_opt(CHAIN_STATE, &[&int(chain)]).await?;
    Ok(match row {
        Some(row) => ChainState {
            head: ChainHead {
                seq: uint(&row, 0)?,
                hash: digest_from_hex(row.try_get(1)?)?,
            },
            signed_seq: uint(&row, 2)?,
            oldest_unsigned: row.try_get::<_, Option<i64>>(3)?,
        },
        None => ChainState {
            head: ChainHead::genesis_of(chain),
            signed_seq: 0,
            oldest_unsigned: None,
        },
    })
}

/// The committed heads of every chain but `chain`.
async fn other_heads(tx: &Tx, chain: u64) -> Result<Vec<BoundHead>, StoreError> {
    let rows = tx.query(OTHER_HEADS, &[&int(chain)]).await?;
    rows.iter()
        .map(|row| {
            let head: String = row.try_get(2)?;
            digest_from_hex(&head)?;
            Ok(BoundHead {
                chain: uint(row, 0)?,
                seq: uint(row, 1)?,
                head,
            })
        })
        .collect()
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

/// The head of chain `chain` in the `audit` table.
pub(super) async fn head_of(db: &Db, chain: u64) -> Result<ChainHead, StoreError> {
    let rows = db
        .read(
            "SELECT seq, hash FROM audit WHERE chain = $1 ORDER BY seq DESC LIMIT 1",
            &[&int(chain)],
        )
        .await?;
    Ok(match rows.first() {
        Some(row) => ChainHead {
            seq: uint(row, 0)?,
            hash: digest_from_hex(row.try_get(1)?)?,
        },
        None => ChainHead::genesis_of(chain),
    })
}
