//! The audit trail: typed events sealed into an append-only, hash-chained sequence of JSON lines.
//! Audit is not logging: every entry is data with a fixed shape, and the chain makes any edited
//! byte, removed line or reordering detectable.
//!
//! Owns the event types ([`AuditEvent`]), sealing ([`seal`]), the file mirror ([`AuditFile`]),
//! verification ([`verify`]) and lookups ([`query`]). It does no database work: the store keeps
//! sealed entries in its database, in the same transaction as the change they record, and
//! mirrors them to the file.
//!
//! Each line is `{"seq":N,"ts":"…","prev":"<hex>","event":{…},"hash":"<hex>"}`, where `hash` is
//! the SHA-256 of the line's own bytes up to, not including, `,"hash":"…"}`, and `prev` is the
//! previous line's hash (for seq 1, the hash of `omnirelay-audit-v1`). Hashing the raw bytes, not
//! a re-serialization, means even a whitespace edit breaks verification.
//!
//! What the chain cannot show on its own: a log cut short at a line boundary, or rewritten from
//! scratch with recomputed hashes, verifies. Signed [`checkpoint`]s (entries carrying the audit
//! key's Ed25519 signature over the head they follow, [`verify_signed`]) catch the rewrite; the
//! store's head, or a signed head kept elsewhere, catches the cut.

mod chain;
mod checkpoint;
mod coalesce;
mod event;
mod file;
mod key;

pub use chain::{
    ChainHead, Problem, SealedEntry, VerifyError, VerifySummary, query, seal, seal_in, verify,
};
pub use checkpoint::{
    Anchor, AuditConfig, SignedHead, SignedSummary, checkpoint, checkpoint_in, verify_chains,
    verify_signed,
};
pub use coalesce::{Counted, RefusalCoalescer, Refused};
pub use event::{AuditEvent, BoundHead, ManualIssuance, PolicyRef};
pub use file::{AuditError, AuditFile};
pub use key::{AuditKey, AuditPublicKey, KeyError};

#[cfg(test)]
mod tests;
