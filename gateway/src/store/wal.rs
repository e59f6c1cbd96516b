//! SQLite's write-ahead log copied back into the database file on a thread of its own, so that
//! no commit waits behind that copy. A checkpoint writes every page the log changed since the
//! last one and syncs both files; run by the writer (SQLite's automatic checkpoint, every 1,000
//! log pages), it held up the next batch for that long, several fsyncs on this kind of disk. The
//! writer's own automatic checkpoint stays, at [`WRITER_CHECKPOINT_PAGES`], as the bound on the
//! log's length when the background checkpoints cannot catch up (sustained load, a long read).

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// Least time between two background checkpoints: each syncs the database file, and one per
/// commit would double the disk's flushes, which the commits wait for.
const SPACING: Duration = Duration::from_millis(100);

/// Log pages past which the writer checkpoints by itself after a commit (SQLite's default is
/// 1,000): with the background checkpoints keeping up it is not reached; under sustained load
/// it bounds the log at about 40 MiB (4 KiB pages).
pub(super) const WRITER_CHECKPOINT_PAGES: i64 = 10_000;

/// The checkpoint thread, woken after commits, at most once per [`SPACING`]. It ends when the
/// handle is dropped; [`finish`](Self::finish) also waits for it.
pub(super) struct WalCheckpointer {
    nudge: SyncSender<()>,
    thread: JoinHandle<()>,
}

impl WalCheckpointer {
    /// Starts the thread on `conn`, a read-write connection of its own to the database.
    pub(super) fn start(conn: Connection) -> std::io::Result<Self> {
        // One pending nudge is enough: a checkpoint copies everything committed before it.
        let (nudge, inbox) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || run(&conn, &inbox))?;
        Ok(Self { nudge, thread })
    }

    /// Something was committed: checkpoint soon. Never blocks.
    pub(super) fn nudge(&self) {
        let _ = self.nudge.try_send(());
    }

    /// Stops the thread and waits for it, releasing its connection.
    pub(super) fn finish(self) {
        let Self { nudge, thread } = self;
        drop(nudge);
        let _ = thread.join();
    }
}

fn run(conn: &Connection, inbox: &Receiver<()>) {
    let mut last: Option<Instant> = None;
    while inbox.recv().is_ok() {
        if let Some(last) = last
            && !wait_until(inbox, last + SPACING)
        {
            return;
        }
        checkpoint(conn);
        last = Some(Instant::now());
    }
}

/// Waits until `deadline` (a nudge meanwhile is served by the checkpoint after it); false when
/// the writer is gone.
fn wait_until(inbox: &Receiver<()>, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        match inbox.recv_timeout(left) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
}

/// A passive checkpoint: copies what no reader still needs, and never waits for the writer or
/// a reader (what it leaves, the next one copies).
fn checkpoint(conn: &Connection) {
    let copied = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, i64>(2)?,
        ))
    });
    match copied {
        Ok((busy, log, done)) => tracing::trace!(busy, log, done, "store: background checkpoint"),
        Err(e) => tracing::warn!(error = %e, "store: background checkpoint failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::TempDir;

    /// Committed pages reach the database file while the writing connection's automatic
    /// checkpoint is off: only the thread can have copied them.
    #[test]
    fn the_thread_copies_the_log_into_the_database() {
        let dir = TempDir::new("wal-checkpoint");
        let path = dir.0.join("db.sqlite");
        let write = Connection::open(&path).unwrap();
        write.pragma_update(None, "journal_mode", "WAL").unwrap();
        write.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        write
            .execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")
            .unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        let checkpointer = WalCheckpointer::start(Connection::open(&path).unwrap()).unwrap();
        checkpointer.nudge();
        checkpointer.finish();
        let after = std::fs::metadata(&path).unwrap().len();
        assert!(
            after > before,
            "the table's pages reached the database file ({before} -> {after} bytes)"
        );
    }
}
