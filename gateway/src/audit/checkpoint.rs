//! Signed checkpoints: entries of the chain that carry the audit key's signature over the head
//! they follow. Promises: a chain recomputed from an edited entry onwards by someone without the
//! key fails at the first checkpoint after the edit; a checkpoint signed by any other key is
//! refused; verification reports where the last signature is and how many unsigned entries
//! trail it, so that what no signature covers is never mistaken for what one does.
//!
//! What signatures cannot show on their own: a log cut short at a line boundary (in the file
//! and in the database alike) still verifies, as does an unsigned tail rewritten consistently
//! in both. The first is caught by comparing with the database's head when only one copy was
//! cut; the second, and a cut of both copies, only by a head kept elsewhere: `omnirelay audit
//! verify` prints the last signed head for that, and `--anchor` checks one.

use std::io::BufRead;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::chain::{ChainHead, Problem, VerifyError, walk};
use super::event::AuditEvent;
use super::key::{AuditKey, AuditPublicKey};

/// What a checkpoint signature covers, before the fields: names the format, so that a
/// signature over anything else (a token, another version's checkpoint) never verifies here.
const DOMAIN: &str = "omnirelay-audit-checkpoint-v1";

/// The `[audit]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The Ed25519 key that signs checkpoints (PKCS#8 PEM, 0600), separate from the CA and
    /// token keys. Default `audit-key/audit.key`.
    pub signing_key: PathBuf,
    /// A checkpoint after this many entries at most. Default 1000.
    pub checkpoint_every: NonZeroU64,
    /// A checkpoint at most this long after an entry was appended. Default 60 s.
    pub checkpoint_interval: Duration,
}

impl AuditConfig {
    /// The defaults, with relative paths as written in the config.
    pub fn defaults() -> Self {
        Self {
            signing_key: PathBuf::from("audit-key/audit.key"),
            checkpoint_every: NonZeroU64::MIN.saturating_add(999),
            checkpoint_interval: Duration::from_secs(60),
        }
    }
}

/// The exact bytes a checkpoint's signature covers.
fn message(seq: u64, head: &str, signed_at: u64, key_id: &str) -> Vec<u8> {
    format!("{DOMAIN}\n{seq}\n{head}\n{signed_at}\n{key_id}").into_bytes()
}

/// The checkpoint event that signs `head` with `key` at `at`; sealed right after `head`.
pub fn checkpoint(key: &AuditKey, head: &ChainHead, at: SystemTime) -> AuditEvent {
    let signed_at = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let head_hex = hex::encode(head.hash);
    let key_id = key.public().key_id().to_string();
    let signature = key.sign(&message(head.seq, &head_hex, signed_at, &key_id));
    AuditEvent::Checkpoint {
        seq: head.seq,
        head: head_hex,
        signed_at,
        key_id,
        signature: hex::encode(signature),
    }
}

/// The last checkpoint of a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHead {
    /// The checkpoint entry itself: its seq and hash (what to keep elsewhere as an anchor).
    pub entry: ChainHead,
    /// When it was signed, Unix milliseconds.
    pub signed_at: u64,
    /// The key that signed it.
    pub key_id: String,
}

/// A log whose chain and every checkpoint verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedSummary {
    /// Number of entries (lines).
    pub entries: u64,
    /// The last entry's seq and hash.
    pub head: ChainHead,
    /// The last checkpoint, if there is one.
    pub last_checkpoint: Option<SignedHead>,
    /// How many entries follow the last checkpoint (all of them when there is none): entries
    /// no signature covers yet.
    pub unsigned: u64,
}

/// Checks a log as [`verify`](super::verify) does, and every checkpoint in it: it signs the
/// seq and hash of the entry right before it, under one of `keys`. The log must also hold every
/// entry of `anchors` (seq and hash), as a log that was not cut short or rewritten before them
/// does: a signed head kept elsewhere, or the database's head.
pub fn verify_signed(
    reader: impl BufRead,
    keys: &[AuditPublicKey],
    anchors: &[ChainHead],
) -> Result<SignedSummary, VerifyError> {
    let mut last_checkpoint = None;
    let summary = walk(reader, |before, line| {
        if let Some(anchor) = anchors.iter().find(|a| a.seq == line.seq)
            && anchor.hash != line.hash
        {
            return Err(Problem::Anchor {
                seq: anchor.seq,
                expected: hex::encode(anchor.hash),
                found: hex::encode(line.hash),
            });
        }
        if let AuditEvent::Checkpoint {
            seq,
            head,
            signed_at,
            key_id,
            signature,
        } = &line.event
        {
            check(before, keys, *seq, head, *signed_at, key_id, signature)?;
            last_checkpoint = Some(SignedHead {
                entry: ChainHead {
                    seq: line.seq,
                    hash: line.hash,
                },
                signed_at: *signed_at,
                key_id: key_id.clone(),
            });
        }
        Ok(())
    })?;
    if let Some(anchor) = anchors
        .iter()
        .filter(|a| a.seq > summary.head.seq)
        .min_by_key(|a| a.seq)
    {
        return Err(VerifyError {
            line: summary.entries.saturating_add(1),
            problem: Problem::Truncated {
                expected_seq: anchor.seq,
                expected: hex::encode(anchor.hash),
                ends_at: summary.head.seq,
            },
        });
    }
    let signed_up_to = last_checkpoint.as_ref().map_or(0, |c| c.entry.seq);
    Ok(SignedSummary {
        entries: summary.entries,
        head: summary.head,
        last_checkpoint,
        unsigned: summary.head.seq - signed_up_to,
    })
}

/// Checks one checkpoint that follows `before`.
fn check(
    before: &ChainHead,
    keys: &[AuditPublicKey],
    seq: u64,
    head: &str,
    signed_at: u64,
    key_id: &str,
    signature: &str,
) -> Result<(), Problem> {
    let before_hex = hex::encode(before.hash);
    if seq != before.seq || head != before_hex {
        return Err(Problem::CheckpointHead {
            signed_seq: seq,
            signed_head: head.to_string(),
            seq: before.seq,
            head: before_hex,
        });
    }
    let Some(key) = keys.iter().find(|k| k.key_id() == key_id) else {
        return Err(Problem::UntrustedKey {
            key_id: key_id.to_string(),
        });
    };
    let signature = hex::decode(signature).unwrap_or_default();
    if !key.verifies(&message(seq, head, signed_at, key_id), &signature) {
        return Err(Problem::BadSignature {
            key_id: key_id.to_string(),
        });
    }
    Ok(())
}
