//! When the writer signs the audit chain: a checkpoint entry after every `every` entries, at
//! most about `interval` after an entry was appended (a ticker thread wakes the writer), and
//! when the store is flushed or closed. The checkpoint commits in the same transaction as the
//! batch it follows, so its cost is one Ed25519 signature and one row per `every` entries.

use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rusqlite::Connection;

use super::StoreError;
use super::chain::append_audit;
use crate::audit::{AuditConfig, AuditEvent, AuditKey, ChainHead, SealedEntry, checkpoint};

/// The audit key and how often it signs.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    /// The key that signs.
    pub key: Arc<AuditKey>,
    /// A checkpoint after this many entries at most.
    pub every: NonZeroU64,
    /// A checkpoint at most about this long after an entry was appended.
    pub interval: Duration,
}

impl Checkpoints {
    /// From the `[audit]` section and the key it names, loaded by the caller.
    pub fn new(key: Arc<AuditKey>, config: &AuditConfig) -> Self {
        Self {
            key,
            every: config.checkpoint_every,
            interval: config.checkpoint_interval,
        }
    }
}

/// The entries no checkpoint covers yet, as the writer tracks them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Unsigned {
    /// How many entries follow the last checkpoint.
    pub count: u64,
    /// When the last checkpoint was written (or the store opened).
    pub since: Instant,
}

impl Checkpoints {
    /// Whether a checkpoint is due after `unsigned` (`force`: flush or close).
    pub(super) fn due(&self, unsigned: &Unsigned, force: bool) -> bool {
        unsigned.count > 0
            && (force
                || unsigned.count >= self.every.get()
                || unsigned.since.elapsed() >= self.interval)
    }

    /// Seals a checkpoint of `head` into the open transaction, in its own savepoint: a failure
    /// leaves the batch as it was (and the entries unsigned until the next try).
    pub(super) fn append(
        &self,
        tx: &Connection,
        head: &mut ChainHead,
        sealed: &mut Vec<SealedEntry>,
    ) -> Result<(), StoreError> {
        let event = checkpoint(&self.key, head, SystemTime::now());
        let before = (*head, sealed.len());
        tx.prepare_cached("SAVEPOINT checkpoint")?.execute([])?;
        let result = append_audit(tx, head, sealed, &[event]);
        if result.is_err() {
            tx.prepare_cached("ROLLBACK TO checkpoint")?.execute([])?;
            *head = before.0;
            sealed.truncate(before.1);
        }
        tx.prepare_cached("RELEASE checkpoint")?.execute([])?;
        result
    }
}

/// How many entries of the database's chain follow its last checkpoint, reading back from the
/// head only as far as that checkpoint.
pub(super) fn unsigned_in(conn: &Connection) -> Result<u64, StoreError> {
    let mut stmt = conn.prepare("SELECT line FROM audit ORDER BY seq DESC")?;
    let mut rows = stmt.query([])?;
    let mut count = 0;
    while let Some(row) = rows.next()? {
        let line: String = row.get(0)?;
        if is_checkpoint(&line) {
            break;
        }
        count += 1;
    }
    Ok(count)
}

/// Whether a sealed line is a checkpoint (its event is the only part that can say so).
fn is_checkpoint(line: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Envelope {
        event: AuditEvent,
    }
    serde_json::from_str::<Envelope>(line)
        .is_ok_and(|e| matches!(e.event, AuditEvent::Checkpoint { .. }))
}

/// Wakes the writer every `interval`, so that a checkpoint falls due even when nothing else is
/// written. `wake` holds only a weak handle on the writer's inbox (it never keeps the store
/// open) and answers false once the writer is gone.
pub(super) struct Ticker {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Ticker {
    pub(super) fn start(
        wake: impl Fn() -> bool + Send + 'static,
        interval: Duration,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("audit-ticker".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(interval)
                {
                    if !wake() {
                        return;
                    }
                }
            })?;
        Ok(Self { stop, thread })
    }

    /// Stops the thread and waits for it.
    pub(super) fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}
