//! Sealing events into the hash chain, and checking a chain line by line. Owns the line format
//! and promises that any edited byte, removed line or reordering inside a log is found and named
//! by the first line where it shows.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::event::AuditEvent;

/// What the genesis hash is the SHA-256 of: names the format, so a v2 chain cannot continue a v1.
const GENESIS_TAG: &[u8] = b"omnirelay-audit-v1";
/// What ends every line, before the 64 hex digits of the hash and the closing `"}`.
const HASH_KEY: &[u8] = b",\"hash\":\"";
/// Bytes from the start of [`HASH_KEY`] to the end of the line.
const SUFFIX_LEN: usize = HASH_KEY.len() + 64 + 2;
/// The last instant RFC 3339 can write with millisecond precision (9999-12-31T23:59:59.999Z).
const LATEST: Duration = Duration::from_millis(253_402_300_799_999);

/// The chain's head: the last sequence number and hash. Genesis is seq 0 with the hash of the
/// format tag; the first entry is seq 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    /// The last entry's sequence number (0 before any entry).
    pub seq: u64,
    /// The last entry's hash.
    pub hash: [u8; 32],
}

impl ChainHead {
    /// The head of an empty chain.
    pub fn genesis() -> Self {
        Self::genesis_of(0)
    }

    /// The head of chain `chain` before its first entry. Chain 0 is the one chain of a store
    /// with one writer (SQLite; PostgreSQL before schema 5); every other chain starts from a
    /// hash that names it, so an entry of one chain can never pass for one of another.
    pub fn genesis_of(chain: u64) -> Self {
        let hash = if chain == 0 {
            Sha256::digest(GENESIS_TAG).into()
        } else {
            Sha256::digest(format!("omnirelay-audit-v1/chain/{chain}")).into()
        };
        Self { seq: 0, hash }
    }
}

/// One sealed entry. `line` is the exact JSON line, without a trailing newline; after it the
/// chain's head is `(seq, hash)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedEntry {
    /// The chain it belongs to (0: the one chain of a single writer).
    pub chain: u64,
    /// The entry's sequence number.
    pub seq: u64,
    /// SHA-256 of the line up to, not including, its `,"hash":"…"}` suffix.
    pub hash: [u8; 32],
    /// The line: `{"seq":N,"ts":"…","prev":"…","event":{…},"hash":"…"}`, with `"chain":C,`
    /// first on a chain other than 0.
    pub line: String,
}

/// Seals `event` after `head` at time `at`. The new head is `(entry.seq, entry.hash)`.
///
/// `at` is written as RFC 3339 UTC with milliseconds; a time RFC 3339 cannot represent (before
/// 1970, after 9999) is clamped to the nearest one it can, so that sealing never fails.
pub fn seal(head: &ChainHead, at: SystemTime, event: &AuditEvent) -> SealedEntry {
    seal_in(0, head, at, event)
}

/// [`seal`] on chain `chain` (one of several writers' chains, each with its own sequence).
pub fn seal_in(chain: u64, head: &ChainHead, at: SystemTime, event: &AuditEvent) -> SealedEntry {
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let ts = humantime::format_rfc3339_millis(UNIX_EPOCH + since_epoch.min(LATEST));
    // Saturating: 2^64 entries are out of reach, and a repeated seq would fail verification.
    let seq = head.seq.saturating_add(1);
    let chain_field = if chain == 0 {
        String::new()
    } else {
        format!(r#""chain":{chain},"#)
    };
    let body = format!(
        r#"{{{chain_field}"seq":{seq},"ts":"{ts}","prev":"{}","event":{}"#,
        hex::encode(head.hash),
        event_json(event),
    );
    let hash: [u8; 32] = Sha256::digest(body.as_bytes()).into();
    let line = format!(r#"{body},"hash":"{}"}}"#, hex::encode(hash));
    SealedEntry {
        chain,
        seq,
        hash,
        line,
    }
}

/// The event as compact JSON.
#[allow(
    clippy::expect_used,
    reason = "infallible: see the invariant in the body; `seal` has no error to return"
)]
fn event_json(event: &AuditEvent) -> String {
    // Invariant: serde_json fails only on a map with non-string keys or a `Serialize` impl that
    // reports an error. `AuditEvent` is derived over strings, integers, options and vectors of
    // strings, so neither can happen; the serde shape tests serialize every kind.
    serde_json::to_string(event).expect("an AuditEvent always serializes")
}

/// A log that verified: how many entries, and the head it ends at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    /// Number of entries (lines).
    pub entries: u64,
    /// The head of the last line's chain; genesis for an empty log.
    pub head: ChainHead,
    /// The head of every chain in the log (one, chain 0, for a single writer's log).
    pub chains: BTreeMap<u64, ChainHead>,
}

/// The first bad line of a log (1-based) and what is wrong with it.
#[derive(Debug)]
pub struct VerifyError {
    /// The line, counting from 1.
    pub line: u64,
    /// What is wrong with it.
    pub problem: Problem,
}

impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.problem)
    }
}

impl std::error::Error for VerifyError {
    // The problem is already in the message; its own cause, if any, comes next in the chain.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.problem)
    }
}

/// What is wrong with a line.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// The line is not an audit entry: not `{"seq":…,"ts":…,"prev":…,"event":{…},"hash":…}`,
    /// an unknown event kind, a bad timestamp, or no trailing newline (a torn write).
    #[error("malformed: {0}")]
    Malformed(String),
    /// The hash does not match the line's bytes.
    #[error("hash mismatch (the line was edited)")]
    HashMismatch,
    /// `prev` is not the previous line's hash: a line before it was removed, edited (and its
    /// hash recomputed) or reordered.
    #[error(
        "broken link: prev is not the previous line's hash (a line before it was removed, edited or reordered)"
    )]
    BrokenLink,
    /// The seq is not one more than the previous line's.
    #[error("sequence gap: expected seq {expected}, found {found}")]
    SequenceGap {
        /// The seq this line should have.
        expected: u64,
        /// The seq it has.
        found: u64,
    },
    /// A checkpoint signs another seq or hash than the entry right before it: an entry before
    /// it was edited and the chain recomputed by someone without the audit key.
    #[error(
        "checkpoint signs seq {signed_seq} {signed_head}, but follows seq {seq} {head} (an earlier entry was edited and the chain recomputed)"
    )]
    CheckpointHead {
        /// The seq the checkpoint signs.
        signed_seq: u64,
        /// The hash it signs, hex as written.
        signed_head: String,
        /// The seq it follows.
        seq: u64,
        /// The hash it follows, hex.
        head: String,
    },
    /// A checkpoint names a key that is not one of the trusted audit keys.
    #[error("checkpoint signed by {key_id}, which is not a trusted audit key")]
    UntrustedKey {
        /// The key id the checkpoint names.
        key_id: String,
    },
    /// A checkpoint's signature does not verify under the key it names.
    #[error("checkpoint signature does not verify under {key_id}")]
    BadSignature {
        /// The key id the checkpoint names.
        key_id: String,
    },
    /// The log has another entry where it must hold a known one (an anchor kept elsewhere, or
    /// the database's head): it was rewritten.
    #[error("expected seq {seq} with hash {expected}, found hash {found}")]
    Anchor {
        /// The entry's seq.
        seq: u64,
        /// The hash it must have, hex.
        expected: String,
        /// The hash the log has there, hex.
        found: String,
    },
    /// The log ends before an entry it must hold (an anchor kept elsewhere, or the database's
    /// head): it was cut short.
    #[error("the log ends at seq {ends_at}, before seq {expected_seq} {expected} (truncated)")]
    Truncated {
        /// The seq of the entry it must hold.
        expected_seq: u64,
        /// That entry's hash, hex.
        expected: String,
        /// The seq the log ends at.
        ends_at: u64,
    },
    /// The log could not be read.
    #[error("cannot read the log")]
    Io(#[source] std::io::Error),
}

/// Checks a whole log: every line ends in a newline and parses, seq starts at 1 and increases by
/// exactly 1, each `prev` is the previous line's hash (the first's is genesis), and each hash
/// matches its line's bytes. A log of several chains (several writers') holds each chain's
/// lines in order, the chains in any interleaving; each is checked on its own.
///
/// A log cut short at a line boundary still verifies: only the returned head, compared with
/// the head the store holds, shows that entries are missing from the end. The same comparison
/// is what catches a log rewritten from scratch with recomputed hashes.
pub fn verify(reader: impl BufRead) -> Result<VerifySummary, VerifyError> {
    walk(reader, |_, _| Ok(()))
}

/// The lines whose event mentions `id`, exactly, as one of [`AuditEvent::ids`]. Verifies the
/// whole log as [`verify`] does, so answers never come from a log that fails verification.
pub fn query(reader: impl BufRead, id: &str) -> Result<Vec<String>, VerifyError> {
    let mut found = Vec::new();
    walk(reader, |_, line| {
        if line.event.ids().contains(&id) {
            found.push(line.text.to_string());
        }
        Ok(())
    })?;
    Ok(found)
}

/// Verifies every line, handing each good one to `visit` with the head it follows; a problem
/// `visit` returns fails the walk at that line.
pub(super) fn walk(
    mut reader: impl BufRead,
    mut visit: impl FnMut(&ChainHead, &ParsedLine<'_>) -> Result<(), Problem>,
) -> Result<VerifySummary, VerifyError> {
    let mut heads: BTreeMap<u64, ChainHead> = BTreeMap::new();
    let mut head = ChainHead::genesis();
    let mut entries = 0;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let line = entries + 1;
        let fail = |problem| VerifyError { line, problem };
        let read = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| fail(Problem::Io(e)))?;
        if read == 0 {
            if heads.is_empty() {
                heads.insert(0, head);
            }
            return Ok(VerifySummary {
                entries,
                head,
                chains: heads,
            });
        }
        let Some(bytes) = buf.strip_suffix(b"\n") else {
            return Err(fail(Problem::Malformed(
                "no trailing newline: the last line is torn".into(),
            )));
        };
        let parsed = parse_line(bytes).map_err(fail)?;
        let before = heads
            .get(&parsed.chain)
            .copied()
            .unwrap_or_else(|| ChainHead::genesis_of(parsed.chain));
        let next = parsed.follow(&before).map_err(fail)?;
        visit(&before, &parsed).map_err(fail)?;
        heads.insert(parsed.chain, next);
        head = next;
        entries = line;
    }
}

/// A line whose hash matches its bytes and whose JSON has the entry's shape.
#[derive(Debug)]
pub(super) struct ParsedLine<'a> {
    /// The line itself.
    pub text: &'a str,
    /// Its chain.
    pub chain: u64,
    /// Its seq.
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
    /// Its `prev`, as written.
    prev: String,
    /// Its event.
    pub event: AuditEvent,
}

impl ParsedLine<'_> {
    /// Checks that this line comes right after `head`, returning the new head.
    pub fn follow(&self, head: &ChainHead) -> Result<ChainHead, Problem> {
        // The number first: when a line is missing, the line that moved up is intact and its
        // number is the first thing wrong with it.
        let expected = head.seq.saturating_add(1);
        if self.seq != expected {
            return Err(Problem::SequenceGap {
                expected,
                found: self.seq,
            });
        }
        if self.prev != hex::encode(head.hash) {
            return Err(Problem::BrokenLink);
        }
        Ok(ChainHead {
            seq: self.seq,
            hash: self.hash,
        })
    }
}

/// The fields of a line, as JSON.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    #[serde(default)]
    chain: u64,
    seq: u64,
    ts: String,
    prev: String,
    event: AuditEvent,
    /// Required so that the JSON is a whole entry; its bytes were compared before parsing.
    #[serde(rename = "hash")]
    _hash: String,
}

/// Checks one line (without its newline) on its own: the hash against the raw bytes first, so
/// that any edit inside the hashed part is a hash mismatch, then the JSON shape.
pub(super) fn parse_line(line: &[u8]) -> Result<ParsedLine<'_>, Problem> {
    let malformed = |what: &str| Problem::Malformed(what.to_string());
    if line.contains(&b'\n') {
        return Err(malformed("a newline inside the line"));
    }
    let Some(split) = line.len().checked_sub(SUFFIX_LEN) else {
        return Err(malformed("too short to be an entry"));
    };
    let (body, suffix) = line.split_at(split);
    let Some(written) = suffix
        .strip_prefix(HASH_KEY)
        .and_then(|rest| rest.strip_suffix(b"\"}"))
    else {
        return Err(malformed(r#"does not end with ,"hash":"<64 hex digits>"}"#));
    };
    let hash: [u8; 32] = Sha256::digest(body).into();
    if written != hex::encode(hash).as_bytes() {
        return Err(Problem::HashMismatch);
    }
    let text = std::str::from_utf8(line).map_err(|_| malformed("not UTF-8"))?;
    let envelope: Envelope =
        serde_json::from_str(text).map_err(|e| Problem::Malformed(e.to_string()))?;
    humantime::parse_rfc3339(&envelope.ts)
        .map_err(|e| Problem::Malformed(format!("ts {:?}: {e}", envelope.ts)))?;
    Ok(ParsedLine {
        text,
        chain: envelope.chain,
        seq: envelope.seq,
        hash,
        prev: envelope.prev,
        event: envelope.event,
    })
}
