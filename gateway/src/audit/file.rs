//! The append-only file mirror of the audit chain. Promises: only entries that continue the
//! chain are written, a batch lands in one write followed by `fdatasync`, one writer at a time,
//! a write that fails is cut back off, and a torn or edited tail is reported when the file is
//! opened, never written past (only a mirror, whose entries live elsewhere too, cuts a torn one).

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::chain::{ChainHead, Problem, SealedEntry, VerifyError, parse_line};

/// How much to read at a time when looking for the last line or counting lines.
const CHUNK: usize = 64 * 1024;

/// Why the audit file could not be opened or appended to.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Reading, writing or syncing the file failed.
    #[error("audit file I/O failed")]
    Io(#[source] std::io::Error),
    /// The file's last line is torn (no trailing newline) or is not a valid entry.
    #[error("audit file is corrupt")]
    Corrupt(#[source] VerifyError),
    /// An entry's seq does not come right after the head; nothing was written.
    #[error("entry seq {found} does not continue the chain, which expects seq {expected_seq}")]
    OutOfOrder {
        /// The seq the next entry must have.
        expected_seq: u64,
        /// The seq it has.
        found: u64,
    },
    /// An entry has the right seq but does not continue the chain (its `prev` is not the head's
    /// hash), or its line does not match its own hash or fields; nothing was written.
    #[error("entry seq {seq} does not continue the chain")]
    Rejected {
        /// The entry's seq.
        seq: u64,
        /// What is wrong with it.
        #[source]
        problem: Problem,
    },
    /// Another handle (in this process or another) has the file open for appending; two writers
    /// would fork the chain.
    #[error("the audit file is already open for appending elsewhere")]
    Locked,
    /// An earlier sync failed, or a failed append could not be cut back off, so the file's
    /// tail is unknown; reopen the file, which reports a torn tail or learns the head from what
    /// was actually written.
    #[error("an earlier append or sync failed; reopen the audit file")]
    Poisoned,
}

/// The audit chain's file mirror, open for appending.
#[derive(Debug)]
pub struct AuditFile {
    /// Opened read + append, exclusively locked for as long as this handle lives.
    file: File,
    /// The head after the file's last line.
    head: ChainHead,
    /// The chain of the last line (a mirror of a shared database moves on to a new chain each
    /// time its replica starts).
    chain: u64,
    /// The file's length after its last line: where a failed append is cut back to.
    len: u64,
    /// Set when a sync failed, or a failed write could not be cut back: the file may hold part
    /// of a batch.
    poisoned: bool,
}

impl AuditFile {
    /// Opens `path` for appending, creating it with mode 0600 (its directory must exist), and
    /// learns the head from its last line (genesis for an empty file). Only that line is checked;
    /// [`verify`](super::verify) checks the whole file. A torn last line (no trailing newline,
    /// as a crash mid-append leaves) is [`AuditError::Corrupt`], never silently dropped.
    pub fn open(path: &Path) -> Result<AuditFile, AuditError> {
        Self::open_with(path, false).map(|(file, _)| file)
    }

    /// [`open`](Self::open) for a mirror whose durable copy lives elsewhere and re-appends
    /// what the file lacks: a torn last line (no trailing newline: a crash or a kill landed in
    /// the middle of an append) is cut off instead of refused, and the number of bytes cut is
    /// returned. A whole last line that does not parse is still [`AuditError::Corrupt`].
    pub fn open_mirror(path: &Path) -> Result<(AuditFile, u64), AuditError> {
        Self::open_with(path, true)
    }

    fn open_with(path: &Path, cut_torn_tail: bool) -> Result<(AuditFile, u64), AuditError> {
        let mut options = OpenOptions::new();
        options.read(true).append(true).mode(0o600);
        let file = match options.clone().create_new(true).open(path) {
            Ok(file) => {
                sync_parent(path).map_err(AuditError::Io)?;
                file
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                options.open(path).map_err(AuditError::Io)?
            }
            Err(e) => return Err(AuditError::Io(e)),
        };
        file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => AuditError::Locked,
            std::fs::TryLockError::Error(e) => AuditError::Io(e),
        })?;
        let cut = if cut_torn_tail {
            cut_torn_tail_of(&file).map_err(AuditError::Io)?
        } else {
            0
        };
        let (chain, head) = read_head(&file)?;
        let len = file.metadata().map_err(AuditError::Io)?.len();
        let file = AuditFile {
            file,
            head,
            chain,
            len,
            poisoned: false,
        };
        Ok((file, cut))
    }

    /// The head after the last line written.
    pub fn head(&self) -> ChainHead {
        self.head
    }

    /// The chain of the last line written (0 for a single writer's log and an empty file).
    pub fn chain(&self) -> u64 {
        self.chain
    }

    /// Appends `entries`, which must continue the chain from [`head`](Self::head) in order.
    /// Every entry is checked before anything is written, so a refused batch writes nothing;
    /// an accepted one is written in one write, then `fdatasync`ed.
    pub fn append(&mut self, entries: &[SealedEntry]) -> Result<(), AuditError> {
        self.append_unsynced(entries)?;
        self.sync()
    }

    /// Flushes what was appended to disk (`fdatasync`).
    pub fn sync(&mut self) -> Result<(), AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned);
        }
        self.file.sync_data().map_err(|e| {
            self.poisoned = true;
            AuditError::Io(e)
        })
    }

    /// [`append`](Self::append) without the `fdatasync`: for a mirror whose durable copy lives
    /// elsewhere and that syncs on its own schedule. A write that fails (a full disk) is cut
    /// back off, so the file ends at its last whole line and the same entries can be appended
    /// again later.
    pub fn append_unsynced(&mut self, entries: &[SealedEntry]) -> Result<(), AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned);
        }
        let (mut chain, mut head) = (self.chain, self.head);
        let mut batch = Vec::new();
        for entry in entries {
            if entry.chain != chain {
                // Only onto a later chain, from its start: a chain is never re-entered.
                if entry.chain < chain {
                    return Err(AuditError::OutOfOrder {
                        expected_seq: head.seq.saturating_add(1),
                        found: entry.seq,
                    });
                }
                (chain, head) = (entry.chain, ChainHead::genesis_of(entry.chain));
            }
            head = follow(&head, entry)?;
            batch.extend_from_slice(entry.line.as_bytes());
            batch.push(b'\n');
        }
        if batch.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.file.write_all(&batch) {
            // A short write leaves a torn line: cut it off (shrinking needs no space). Only if
            // that fails too is the tail unknown.
            if self.file.set_len(self.len).is_err() {
                self.poisoned = true;
            }
            return Err(AuditError::Io(e));
        }
        self.len += batch.len() as u64;
        self.head = head;
        self.chain = chain;
        Ok(())
    }
}

/// Checks that `entry` comes right after `head`, returning the new head.
fn follow(head: &ChainHead, entry: &SealedEntry) -> Result<ChainHead, AuditError> {
    let expected_seq = head.seq.saturating_add(1);
    if entry.seq != expected_seq {
        return Err(AuditError::OutOfOrder {
            expected_seq,
            found: entry.seq,
        });
    }
    let rejected = |problem| AuditError::Rejected {
        seq: entry.seq,
        problem,
    };
    let parsed = parse_line(entry.line.as_bytes()).map_err(rejected)?;
    if parsed.chain != entry.chain || parsed.seq != entry.seq || parsed.hash != entry.hash {
        return Err(rejected(Problem::Malformed(
            "the entry's chain, seq or hash differs from its line's".into(),
        )));
    }
    parsed.follow(head).map_err(rejected)
}

/// Cuts everything after the last newline of `file` (durably) and returns how many bytes that
/// was.
fn cut_torn_tail_of(file: &File) -> std::io::Result<u64> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    let mut last = [0u8];
    file.read_exact_at(&mut last, len - 1)?;
    if last == *b"\n" {
        return Ok(0);
    }
    let (start, _) = last_line(file, len)?;
    file.set_len(start)?;
    file.sync_all()?;
    Ok(len - start)
}

/// Reads the last line of `file` and returns the chain and head it records.
fn read_head(file: &File) -> Result<(u64, ChainHead), AuditError> {
    let len = file.metadata().map_err(AuditError::Io)?.len();
    if len == 0 {
        return Ok((0, ChainHead::genesis()));
    }
    let mut last = [0u8];
    file.read_exact_at(&mut last, len - 1)
        .map_err(AuditError::Io)?;
    let torn = last != *b"\n";
    let end = if torn { len } else { len - 1 };
    let (start, line) = last_line(file, end).map_err(AuditError::Io)?;
    let problem = if torn {
        Problem::Malformed(
            "no trailing newline: the last line is torn (an append was interrupted)".into(),
        )
    } else {
        match parse_line(&line) {
            Ok(parsed) => {
                let head = ChainHead {
                    seq: parsed.seq,
                    hash: parsed.hash,
                };
                return Ok((parsed.chain, head));
            }
            Err(problem) => problem,
        }
    };
    let line = count_newlines(file, start).map_err(AuditError::Io)? + 1;
    Err(AuditError::Corrupt(VerifyError { line, problem }))
}

/// The bytes of `file` from just after the last newline before `end` up to `end`, and where
/// they start.
fn last_line(file: &File, end: u64) -> std::io::Result<(u64, Vec<u8>)> {
    let mut start = end;
    let mut chunks = Vec::new();
    while start > 0 {
        // At most CHUNK, so the cast back to usize is lossless.
        let size = start.min(CHUNK as u64);
        let mut chunk = vec![0; size as usize];
        file.read_exact_at(&mut chunk, start - size)?;
        if let Some(newline) = chunk.iter().rposition(|&b| b == b'\n') {
            chunks.push(chunk.split_off(newline + 1));
            start = start - size + newline as u64 + 1;
            break;
        }
        start -= size;
        chunks.push(chunk);
    }
    Ok((start, chunks.into_iter().rev().flatten().collect()))
}

/// How many newlines `file` has before offset `end`: the line number of the line at `end`, less
/// one. Only used to name the line in an error.
fn count_newlines(file: &File, end: u64) -> std::io::Result<u64> {
    let mut count = 0;
    let mut offset = 0;
    let mut chunk = vec![0; CHUNK];
    while offset < end {
        // At most CHUNK, so the cast back to usize is lossless.
        let size = (end - offset).min(CHUNK as u64);
        let buf = &mut chunk[..size as usize];
        file.read_exact_at(buf, offset)?;
        count += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        offset += size;
    }
    Ok(count)
}

/// Makes a newly created file's directory entry durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}
