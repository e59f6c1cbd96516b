//! The file mirror against real files in a scratch directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::*;

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("omnirelay-audit-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self) -> PathBuf {
        self.0.join("audit.log")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open_err(path: &Path) -> AuditError {
    match AuditFile::open(path) {
        Ok(file) => panic!("expected open to fail, got head {:?}", file.head()),
        Err(e) => e,
    }
}

/// A file holding the first `n` of `entries`.
fn written(path: &Path, entries: &[SealedEntry], n: usize) {
    std::fs::write(path, log(&entries[..n])).unwrap();
}

#[test]
fn a_new_file_is_created_0600_and_starts_at_genesis() {
    let scratch = Scratch::new("create");
    let file = AuditFile::open(&scratch.file()).unwrap();
    assert_eq!(file.head(), ChainHead::genesis());
    let meta = std::fs::metadata(scratch.file()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 0);
}

#[test]
fn the_parent_directory_must_exist() {
    let scratch = Scratch::new("no-parent");
    let err = open_err(&scratch.0.join("missing").join("audit.log"));
    assert!(
        matches!(&err, AuditError::Io(e) if e.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
}

#[test]
fn appended_batches_are_the_sealed_lines_and_verify() {
    let scratch = Scratch::new("append");
    let entries = sealed(&mixed(50));
    let mut file = AuditFile::open(&scratch.file()).unwrap();
    file.append(&entries[..20]).unwrap();
    file.append(&[]).unwrap();
    file.append(&entries[20..]).unwrap();
    assert_eq!(file.head(), head_of(&entries[49]));
    let bytes = std::fs::read(scratch.file()).unwrap();
    assert_eq!(bytes, log(&entries));
    let summary = verify(bytes.as_slice()).unwrap();
    assert_eq!(summary.entries, 50);
    assert_eq!(summary.head, file.head());
}

#[test]
fn reopening_recovers_the_head_and_continues_the_chain() {
    let scratch = Scratch::new("reopen");
    let entries = sealed(&mixed(20));
    AuditFile::open(&scratch.file())
        .unwrap()
        .append(&entries)
        .unwrap();

    let mut file = AuditFile::open(&scratch.file()).unwrap();
    assert_eq!(file.head(), head_of(&entries[19]));
    let next = seal(&file.head(), at(20), &one_of_each()[4]);
    file.append(std::slice::from_ref(&next)).unwrap();
    assert_eq!(file.head(), head_of(&next));
    drop(file);

    let bytes = std::fs::read(scratch.file()).unwrap();
    let summary = verify(bytes.as_slice()).unwrap();
    assert_eq!(summary.entries, 21);
    assert_eq!(summary.head, head_of(&next));
    // Mode 0600 is set at creation and not disturbed by reopening.
    let mode = std::fs::metadata(scratch.file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn append_refuses_entries_that_do_not_continue_the_chain() {
    let scratch = Scratch::new("refuse");
    let entries = sealed(&mixed(6));
    let mut file = AuditFile::open(&scratch.file()).unwrap();
    file.append(&entries[..3]).unwrap();
    let before = std::fs::read(scratch.file()).unwrap();

    let gap = file.append(&entries[4..5]).unwrap_err();
    assert!(
        matches!(
            gap,
            AuditError::OutOfOrder {
                expected_seq: 4,
                found: 5
            }
        ),
        "{gap:?}"
    );
    let replay = file.append(&entries[2..3]).unwrap_err();
    assert!(
        matches!(
            replay,
            AuditError::OutOfOrder {
                expected_seq: 4,
                found: 3
            }
        ),
        "{replay:?}"
    );
    // The right seq, sealed after some other head.
    let elsewhere = ChainHead {
        seq: 3,
        hash: [0; 32],
    };
    let forked = seal(&elsewhere, at(3), &one_of_each()[3]);
    let err = file.append(&[forked]).unwrap_err();
    assert!(
        matches!(
            err,
            AuditError::Rejected {
                seq: 4,
                problem: Problem::BrokenLink
            }
        ),
        "{err:?}"
    );
    let mut edited = entries[3].clone();
    edited.line = edited.line.replacen("req-", "reQ-", 1);
    let err = file.append(&[edited]).unwrap_err();
    assert!(
        matches!(
            err,
            AuditError::Rejected {
                seq: 4,
                problem: Problem::HashMismatch
            }
        ),
        "{err:?}"
    );
    let mut mislabelled = entries[3].clone();
    mislabelled.hash = [1; 32];
    let err = file.append(&[mislabelled]).unwrap_err();
    assert!(
        matches!(
            err,
            AuditError::Rejected {
                seq: 4,
                problem: Problem::Malformed(_)
            }
        ),
        "{err:?}"
    );
    // A batch whose second entry skips one writes nothing, not even the good first entry.
    let err = file
        .append(&[entries[3].clone(), entries[5].clone()])
        .unwrap_err();
    assert!(
        matches!(
            err,
            AuditError::OutOfOrder {
                expected_seq: 5,
                found: 6
            }
        ),
        "{err:?}"
    );

    assert_eq!(std::fs::read(scratch.file()).unwrap(), before);
    assert_eq!(file.head(), head_of(&entries[2]));
    file.append(&entries[3..]).unwrap();
    assert_eq!(
        verify(std::fs::read(scratch.file()).unwrap().as_slice())
            .unwrap()
            .entries,
        6
    );
}

#[test]
fn a_torn_last_line_is_reported_on_open() {
    let scratch = Scratch::new("torn");
    let entries = sealed(&mixed(4));
    let whole = log(&entries);
    // Cut inside the fourth line, and just before its newline.
    for cut in [whole.len() - 50, whole.len() - 1] {
        std::fs::write(scratch.file(), &whole[..cut]).unwrap();
        let err = open_err(&scratch.file());
        let AuditError::Corrupt(VerifyError { line, problem }) = &err else {
            panic!("expected a corrupt file, got {err:?}");
        };
        assert_eq!(*line, 4);
        assert!(
            matches!(problem, Problem::Malformed(m) if m.contains("torn")),
            "{problem}"
        );
    }
}

#[test]
fn an_edited_last_line_is_reported_on_open() {
    let scratch = Scratch::new("edited");
    let entries = sealed(&mixed(3));
    let mut all = lines(&log(&entries));
    all[2][20] ^= 0x01;
    std::fs::write(scratch.file(), join(&all)).unwrap();
    let err = open_err(&scratch.file());
    assert!(
        matches!(
            &err,
            AuditError::Corrupt(VerifyError {
                line: 3,
                problem: Problem::HashMismatch
            })
        ),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "audit file is corrupt");
    let source = std::error::Error::source(&err).unwrap();
    assert_eq!(
        source.to_string(),
        "line 3: hash mismatch (the line was edited)"
    );
}

#[test]
fn lines_longer_than_the_read_chunk_are_read_whole() {
    // The tail is read backwards 64 KiB at a time; these lines span several reads.
    let scratch = Scratch::new("long");
    let long = |i: usize| AuditEvent::TokenRevoked {
        token_id: TOKEN.into(),
        reason: "x".repeat(150_000 + i),
        revoked_by: "bob@ops".into(),
    };
    let entries = sealed(&[long(0), long(1), one_of_each()[6].clone(), long(2)]);
    written(&scratch.file(), &entries, 4);
    assert_eq!(
        AuditFile::open(&scratch.file()).unwrap().head(),
        head_of(&entries[3])
    );
    written(&scratch.file(), &entries, 3);
    assert_eq!(
        AuditFile::open(&scratch.file()).unwrap().head(),
        head_of(&entries[2])
    );
    // A torn long line is still named by its line number.
    let whole = log(&entries);
    std::fs::write(scratch.file(), &whole[..whole.len() - 100_000]).unwrap();
    let err = open_err(&scratch.file());
    assert!(
        matches!(&err, AuditError::Corrupt(VerifyError { line: 4, .. })),
        "{err:?}"
    );
}

#[test]
fn a_second_writer_is_refused_while_the_first_is_open() {
    let scratch = Scratch::new("lock");
    let first = AuditFile::open(&scratch.file()).unwrap();
    let err = open_err(&scratch.file());
    assert!(matches!(err, AuditError::Locked), "{err:?}");
    drop(first);
    AuditFile::open(&scratch.file()).unwrap();
}

#[test]
fn a_failed_write_poisons_the_handle() {
    // Every write to /dev/full fails with ENOSPC, as a full disk would.
    let mut file = AuditFile::open(Path::new("/dev/full")).unwrap();
    let entries = sealed(&mixed(2));
    let err = file.append(&entries[..1]).unwrap_err();
    assert!(
        matches!(&err, AuditError::Io(e) if e.kind() == std::io::ErrorKind::StorageFull),
        "{err:?}"
    );
    assert_eq!(file.head(), ChainHead::genesis());
    let err = file.append(&entries[..1]).unwrap_err();
    assert!(matches!(err, AuditError::Poisoned), "{err:?}");
}
