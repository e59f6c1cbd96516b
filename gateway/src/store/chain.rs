//! The audit chain as the database holds it: events sealed onto the chain inside the caller's
//! transaction, the chain's head, and the file mirror caught up from the database at start.
//! The writer, the checkpoints and the startup code all build on it; it depends on none of them.

use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, params};

use super::StoreError;
use crate::audit::{AuditEvent, AuditFile, ChainHead, SealedEntry, seal};

pub(super) fn append_audit(
    tx: &Connection,
    head: &mut ChainHead,
    sealed: &mut Vec<SealedEntry>,
    events: &[AuditEvent],
) -> Result<(), StoreError> {
    let now = SystemTime::now();
    let mut insert =
        tx.prepare_cached("INSERT INTO audit (seq, hash, line) VALUES (?1, ?2, ?3)")?;
    for event in events {
        let entry = seal(head, now, event);
        insert.execute(params![entry.seq, hex::encode(entry.hash), entry.line])?;
        *head = ChainHead {
            seq: entry.seq,
            hash: entry.hash,
        };
        sealed.push(entry);
    }
    Ok(())
}

/// Brings the file mirror up to the database's chain and returns the chain head. A mirror that
/// is ahead of the database, or disagrees with it at its last line, was edited: refuse.
pub(super) fn catch_up(
    conn: &Connection,
    mirror: &mut AuditFile,
    path: &std::path::Path,
) -> Result<ChainHead, StoreError> {
    let db_head = audit_head(conn)?;
    let file_head = mirror.head();
    if file_head.seq > db_head.seq {
        return Err(StoreError::AuditMismatch(format!(
            "the audit file has {} entries, the database {}",
            file_head.seq, db_head.seq
        )));
    }
    if file_head.seq > 0 {
        let hash_at: String = conn.query_row(
            "SELECT hash FROM audit WHERE seq = ?1",
            [file_head.seq],
            |r| r.get(0),
        )?;
        if hash_at != hex::encode(file_head.hash) {
            return Err(StoreError::AuditMismatch(format!(
                "entry {} differs between the audit file and the database",
                file_head.seq
            )));
        }
    }
    let mut stmt = conn.prepare("SELECT seq, hash, line FROM audit WHERE seq > ?1 ORDER BY seq")?;
    let missing = stmt
        .query_map([file_head.seq], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?
        .map(|row| {
            let (seq, hash, line) = row?;
            Ok(SealedEntry {
                chain: 0,
                seq,
                hash: digest_from_hex(&hash)?,
                line,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    if !missing.is_empty() {
        tracing::info!(
            entries = missing.len(),
            "catching the audit file up with the database"
        );
        mirror
            .append(&missing)
            .map_err(|source| StoreError::Audit {
                path: path.to_path_buf(),
                source,
            })?;
    }
    Ok(db_head)
}

/// The head of the chain in the `audit` table.
pub(super) fn audit_head(conn: &Connection) -> Result<ChainHead, StoreError> {
    let head: Option<(u64, String)> = conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(match head {
        Some((seq, hash)) => ChainHead {
            seq,
            hash: digest_from_hex(&hash)?,
        },
        None => ChainHead::genesis(),
    })
}

pub(super) fn digest_from_hex(text: &str) -> Result<[u8; 32], StoreError> {
    let bytes = hex::decode(text).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("digest is not 32 bytes".into()))
}
