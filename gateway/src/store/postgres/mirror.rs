//! The audit file of a replica on PostgreSQL mirrors the chains that replica wrote: the chain
//! it writes now and, before it, those of its earlier runs (each run claims a new chain), or
//! the shared chain of a database from before per-replica chains. The entries this replica
//! commits are handed over at once, in chain order; a gap (a commit whose answer was lost) is
//! read from the database. At start the file's last chain is checked against the database and
//! caught up with it. The file is written by the same mirror thread as SQLite's
//! (`writer::Mirror`). The database holds every replica's chains; `audit export` writes them
//! all.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::super::StoreError;
use super::super::writer::{Mirror, MirrorBacklog};
use super::connect::Db;
use super::{int, uint};
use crate::audit::{AuditFile, SealedEntry};
use crate::store::chain::digest_from_hex;

/// Most entries read from the database at once.
const PAGE: i64 = 1000;

/// What the feeder is sent.
pub(super) enum FeedMessage {
    /// Entries this replica committed.
    Committed(Vec<SealedEntry>),
    /// Answer once the file holds (synced) every entry committed before this.
    Flush(oneshot::Sender<Result<(), StoreError>>),
    /// Release the file (after what was sent before is written).
    Stop,
}

/// The task that feeds the mirror thread, and its inbox.
pub(super) struct Feeder {
    inbox: mpsc::UnboundedSender<FeedMessage>,
    task: tokio::task::JoinHandle<()>,
    backlog: MirrorBacklog,
}

impl Feeder {
    /// Opens the audit file, checks its last chain against the database (a file ahead of the
    /// database or differing at its last line was edited: refused), catches that chain up, and
    /// starts feeding it the entries of chain `own`.
    pub(super) async fn start(db: Arc<Db>, path: &Path, own: u64) -> Result<Self, StoreError> {
        let (mut file, cut) = AuditFile::open_mirror(path).map_err(|source| StoreError::Audit {
            path: path.to_path_buf(),
            source,
        })?;
        if cut > 0 {
            tracing::warn!(
                bytes = cut,
                "cut the audit file's torn last line (an append interrupted by a crash)"
            );
        }
        let (chain, file_head) = (file.chain(), file.head());
        if file_head.seq > 0 {
            let db_head = db.audit_head(chain).await?;
            if file_head.seq > db_head.seq {
                return Err(StoreError::AuditMismatch(format!(
                    "the audit file has {} entries, the database {} (chain {chain})",
                    file_head.seq, db_head.seq
                )));
            }
            if hash_at(&db, chain, file_head.seq).await? != Some(file_head.hash) {
                return Err(StoreError::AuditMismatch(format!(
                    "entry {} differs between the audit file and the database (chain {chain})",
                    file_head.seq
                )));
            }
            let mut mirrored = file_head.seq;
            while mirrored < db_head.seq {
                let missing = entries_after(&db, chain, mirrored).await?;
                let Some(last) = missing.last() else { break };
                mirrored = last.seq;
                tracing::info!(
                    entries = missing.len(),
                    chain,
                    "catching the audit file up with the database"
                );
                file.append(&missing).map_err(|source| StoreError::Audit {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
        }
        let mirror = Mirror::start(file)
            .map_err(|e| StoreError::Io(format!("cannot start the audit mirror thread: {e}")))?;
        let backlog = mirror.backlog();
        let (inbox, messages) = mpsc::unbounded_channel();
        let feeding = Feeding {
            db: Arc::downgrade(&db),
            mirror,
            chain: own,
            mirrored: 0,
        };
        let task = tokio::spawn(feeding.run(messages));
        Ok(Self {
            inbox,
            task,
            backlog,
        })
    }

    /// Entries handed to the mirror thread and not in the file yet.
    pub(super) fn backlog(&self) -> u64 {
        self.backlog.entries()
    }

    pub(super) fn sender(&self) -> mpsc::UnboundedSender<FeedMessage> {
        self.inbox.clone()
    }

    /// Returns once the file holds and has synced every entry of this replica's chain the
    /// database held when called.
    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.inbox
            .send(FeedMessage::Flush(reply))
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Mirrors the database's head, then releases the file.
    pub(super) async fn finish(self) {
        if let Err(e) = self.flush().await {
            tracing::error!(error = %e, "store: the audit file could not be brought up to date");
        }
        let _ = self.inbox.send(FeedMessage::Stop);
        let _ = self.task.await;
    }
}

/// The feeder's state: the mirror thread, the chain it mirrors and the last entry handed over.
struct Feeding {
    db: std::sync::Weak<Db>,
    mirror: Mirror,
    chain: u64,
    mirrored: u64,
}

impl Feeding {
    async fn run(mut self, mut messages: mpsc::UnboundedReceiver<FeedMessage>) {
        while let Some(message) = messages.recv().await {
            match message {
                FeedMessage::Committed(entries) => self.committed(entries).await,
                FeedMessage::Flush(reply) => self.flush(reply).await,
                FeedMessage::Stop => break,
            }
        }
        let mirror = self.mirror;
        let _ = tokio::task::spawn_blocking(move || mirror.finish()).await;
    }

    /// Hands over `entries`, after reading any gap before them from the database.
    async fn committed(&mut self, entries: Vec<SealedEntry>) {
        let Some(first) = entries.first().map(|e| e.seq) else {
            return;
        };
        if first > self.mirrored + 1 {
            self.catch_up_to(first - 1).await;
            if self.mirrored + 1 != first {
                return;
            }
        }
        let fresh: Vec<SealedEntry> = entries
            .into_iter()
            .filter(|e| e.seq > self.mirrored)
            .collect();
        if let Some(last) = fresh.last() {
            self.mirrored = last.seq;
            self.mirror.send(fresh);
        }
    }

    async fn flush(&mut self, reply: oneshot::Sender<Result<(), StoreError>>) {
        let head = match self.db.upgrade() {
            Some(db) => db.audit_head(self.chain).await.map(|h| h.seq),
            None => Err(StoreError::Closed),
        };
        match head {
            Ok(seq) => {
                self.catch_up_to(seq).await;
                if self.mirrored < seq {
                    let _ = reply.send(Err(StoreError::Io(
                        "audit mirror: cannot read the chain from the database".into(),
                    )));
                    return;
                }
                let (synced, answer) = oneshot::channel();
                self.mirror.flush(vec![synced]);
                let _ = reply.send(answer.await.unwrap_or(Err(StoreError::Closed)));
            }
            Err(e) => drop(reply.send(Err(e))),
        }
    }

    /// Reads and hands over the database's entries of the chain after the mirrored one, up to
    /// `seq`.
    async fn catch_up_to(&mut self, seq: u64) {
        let Some(db) = self.db.upgrade() else { return };
        while self.mirrored < seq {
            match entries_after(&db, self.chain, self.mirrored).await {
                Ok(entries) => {
                    let entries: Vec<SealedEntry> =
                        entries.into_iter().take_while(|e| e.seq <= seq).collect();
                    let Some(last) = entries.last() else { return };
                    self.mirrored = last.seq;
                    self.mirror.send(entries);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "store: cannot read the audit chain to mirror it");
                    return;
                }
            }
        }
    }
}

/// Up to [`PAGE`] entries of `chain` after `seq`, in order.
pub(super) async fn entries_after(
    db: &Db,
    chain: u64,
    seq: u64,
) -> Result<Vec<SealedEntry>, StoreError> {
    let rows = db
        .read(
            "SELECT chain, seq, hash, line FROM audit WHERE chain = $1 AND seq > $2
             ORDER BY seq LIMIT $3",
            &[&int(chain), &int(seq), &PAGE],
        )
        .await?;
    rows.iter().map(sealed_entry).collect()
}

/// Up to [`PAGE`] entries of any chain after entry `seq` of `chain`, in chain then seq order.
pub(super) async fn all_after(
    db: &Db,
    chain: u64,
    seq: u64,
) -> Result<Vec<SealedEntry>, StoreError> {
    let rows = db
        .read(
            "SELECT chain, seq, hash, line FROM audit WHERE (chain, seq) > ($1, $2)
             ORDER BY chain, seq LIMIT $3",
            &[&int(chain), &int(seq), &PAGE],
        )
        .await?;
    rows.iter().map(sealed_entry).collect()
}

/// An `audit` row read as `chain, seq, hash, line`.
fn sealed_entry(row: &tokio_postgres::Row) -> Result<SealedEntry, StoreError> {
    Ok(SealedEntry {
        chain: uint(row, 0)?,
        seq: uint(row, 1)?,
        hash: digest_from_hex(row.try_get(2)?)?,
        line: row.try_get(3)?,
    })
}

/// The hash of entry `seq` of `chain`, if the database holds that entry.
pub(super) async fn hash_at(db: &Db, chain: u64, seq: u64) -> Result<Option<[u8; 32]>, StoreError> {
    let rows = db
        .read(
            "SELECT hash FROM audit WHERE chain = $1 AND seq = $2",
            &[&int(chain), &int(seq)],
        )
        .await?;
    rows.first()
        .map(|r| digest_from_hex(r.try_get(0)?))
        .transpose()
}
