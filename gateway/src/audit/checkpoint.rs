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

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::chain::{ChainHead, Problem, VerifyError, walk};
use super::event::{AuditEvent, BoundHead};
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

/// What a checkpoint signs besides its key: its chain, the head it follows, when, and the other
/// chains' heads it binds.
struct Signed<'a> {
    chain: u64,
    seq: u64,
    head: &'a str,
    signed_at: u64,
    bound: &'a [BoundHead],
}

/// The exact bytes a checkpoint's signature covers. A single writer's checkpoint (chain 0,
/// nothing bound) covers what it always did; one of several writers' also names its chain and
/// each head it binds.
fn message(signed: &Signed<'_>, key_id: &str) -> Vec<u8> {
    let Signed {
        chain,
        seq,
        head,
        signed_at,
        bound,
    } = signed;
    let mut text = format!("{DOMAIN}\n{seq}\n{head}\n{signed_at}\n{key_id}");
    if *chain != 0 || !bound.is_empty() {
        text.push_str(&format!("\nchain {chain}"));
        for b in *bound {
            text.push_str(&format!("\nbinds {} {} {}", b.chain, b.seq, b.head));
        }
    }
    text.into_bytes()
}

/// The checkpoint event that signs `head` with `key` at `at`; sealed right after `head`.
pub fn checkpoint(key: &AuditKey, head: &ChainHead, at: SystemTime) -> AuditEvent {
    checkpoint_in(key, 0, head, Vec::new(), at)
}

/// The checkpoint of chain `chain` that signs `head` and binds the other chains' heads
/// `bound`; sealed right after `head` on that chain.
pub fn checkpoint_in(
    key: &AuditKey,
    chain: u64,
    head: &ChainHead,
    bound: Vec<BoundHead>,
    at: SystemTime,
) -> AuditEvent {
    let signed_at = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let head_hex = hex::encode(head.hash);
    let key_id = key.public().key_id().to_string();
    let signed = Signed {
        chain,
        seq: head.seq,
        head: &head_hex,
        signed_at,
        bound: &bound,
    };
    let signature = key.sign(&message(&signed, &key_id));
    AuditEvent::Checkpoint {
        chain,
        seq: head.seq,
        head: head_hex,
        signed_at,
        key_id,
        signature: hex::encode(signature),
        bound,
    }
}

/// The last checkpoint of a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHead {
    /// The checkpoint entry itself: its seq and hash (what to keep elsewhere as an anchor).
    pub entry: ChainHead,
    /// Its chain.
    pub chain: u64,
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
    /// How many entries follow the last checkpoint of their chain (all of them when there is
    /// none): entries no signature covers yet.
    pub unsigned: u64,
    /// The head of every chain in the log.
    pub chains: BTreeMap<u64, ChainHead>,
    /// Chains a checkpoint binds that the log does not hold (another replica's chains, in the
    /// audit file of one replica): not checked here.
    pub absent_bound: BTreeSet<u64>,
}

/// An entry a log must hold: a signed head kept elsewhere, or the database's head of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// Its chain.
    pub chain: u64,
    /// Its seq and hash.
    pub head: ChainHead,
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
    let anchors: Vec<Anchor> = anchors
        .iter()
        .map(|&head| Anchor { chain: 0, head })
        .collect();
    verify_chains(reader, keys, &anchors)
}

/// [`verify_signed`] for a log of several chains (a shared database's writers): each chain is
/// checked on its own, `anchors` name their chain, and every other chain's head a checkpoint
/// binds must be an entry of that chain, unless the log holds none of that chain
/// ([`SignedSummary::absent_bound`]).
pub fn verify_chains(
    reader: impl BufRead,
    keys: &[AuditPublicKey],
    anchors: &[Anchor],
) -> Result<SignedSummary, VerifyError> {
    let mut last_checkpoint = None;
    let mut signed_up_to: BTreeMap<u64, u64> = BTreeMap::new();
    // Every entry's hash by chain (32 bytes an entry), for the heads checkpoints bind, which
    // may come before or after the entries they name; and those heads, with their line.
    let mut hashes: BTreeMap<u64, Vec<[u8; 32]>> = BTreeMap::new();
    let mut bindings: Vec<(u64, BoundHead)> = Vec::new();
    let mut line_no = 0u64;
    let summary = walk(reader, |before, line| {
        line_no += 1;
        hashes.entry(line.chain).or_default().push(line.hash);
        if let Some(anchor) = anchors
            .iter()
            .find(|a| a.chain == line.chain && a.head.seq == line.seq)
            && anchor.head.hash != line.hash
        {
            return Err(Problem::Anchor {
                seq: anchor.head.seq,
                expected: hex::encode(anchor.head.hash),
                found: hex::encode(line.hash),
            });
        }
        if let AuditEvent::Checkpoint {
            chain,
            seq,
            head,
            signed_at,
            key_id,
            signature,
            bound,
        } = &line.event
        {
            if *chain != line.chain {
                return Err(Problem::Malformed(format!(
                    "a checkpoint of chain {chain} on chain {}",
                    line.chain
                )));
            }
            let signed = Signed {
                chain: *chain,
                seq: *seq,
                head,
                signed_at: *signed_at,
                bound,
            };
            check(before, keys, &signed, key_id, signature)?;
            bindings.extend(bound.iter().map(|b| (line_no, b.clone())));
            signed_up_to.insert(line.chain, line.seq);
            last_checkpoint = Some(SignedHead {
                entry: ChainHead {
                    seq: line.seq,
                    hash: line.hash,
                },
                chain: line.chain,
                signed_at: *signed_at,
                key_id: key_id.clone(),
            });
        }
        Ok(())
    })?;
    let mut absent_bound = BTreeSet::new();
    for (line, bound) in bindings {
        let Some(chain) = hashes.get(&bound.chain) else {
            absent_bound.insert(bound.chain);
            continue;
        };
        let index = usize::try_from(bound.seq.saturating_sub(1)).unwrap_or(usize::MAX);
        let problem = match chain.get(index) {
            _ if bound.seq == 0 => None,
            Some(hash) if hex::encode(hash) == bound.head => None,
            Some(hash) => Some(Problem::Anchor {
                seq: bound.seq,
                expected: bound.head.clone(),
                found: hex::encode(hash),
            }),
            None => Some(Problem::Truncated {
                expected_seq: bound.seq,
                expected: bound.head.clone(),
                ends_at: chain.len() as u64,
            }),
        };
        if let Some(problem) = problem {
            return Err(VerifyError { line, problem });
        }
    }
    for anchor in anchors {
        let ends_at = summary.chains.get(&anchor.chain).map_or(0, |h| h.seq);
        if anchor.head.seq > ends_at {
            return Err(VerifyError {
                line: summary.entries.saturating_add(1),
                problem: Problem::Truncated {
                    expected_seq: anchor.head.seq,
                    expected: hex::encode(anchor.head.hash),
                    ends_at,
                },
            });
        }
    }
    let unsigned = summary
        .chains
        .iter()
        .map(|(chain, head)| head.seq - signed_up_to.get(chain).copied().unwrap_or(0))
        .sum();
    Ok(SignedSummary {
        entries: summary.entries,
        head: summary.head,
        last_checkpoint,
        unsigned,
        chains: summary.chains,
        absent_bound,
    })
}

/// Checks one checkpoint that follows `before`.
fn check(
    before: &ChainHead,
    keys: &[AuditPublicKey],
    signed: &Signed<'_>,
    key_id: &str,
    signature: &str,
) -> Result<(), Problem> {
    let before_hex = hex::encode(before.hash);
    if signed.seq != before.seq || signed.head != before_hex {
        return Err(Problem::CheckpointHead {
            signed_seq: signed.seq,
            signed_head: signed.head.to_string(),
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
    if !key.verifies(&message(signed, key_id), &signature) {
        return Err(Problem::BadSignature {
            key_id: key_id.to_string(),
        });
    }
    Ok(())
}
