//! Durable state: tokens and their use counts, issued identities, consumed nonces, idempotent
//! join results and the audit chain, behind one [`Store`] trait with two backends (SQLite, the
//! embedded default, and PostgreSQL, for several replicas). Promises: every multi-step change
//! is one transaction; a token use is consumed only by a conditional update (`uses < max_uses
//! AND NOT revoked`), never read-then-written; the audit entries of a change commit with it;
//! nothing is acknowledged before it is on disk.

mod chain;
mod checkpoints;
mod lineage;
pub mod postgres;
mod sqlite;
mod wal;
mod writer;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use tokio::sync::watch;

use crate::audit::{AuditEvent, PolicyRef};
use crate::identity::{Serial, SpiffeId};
use crate::token::TokenId;

pub use checkpoints::Checkpoints;
pub use postgres::{PasswordSource, PostgresConfig, PostgresStore};
pub use sqlite::SqliteStore;

#[cfg(test)]
mod checkpoint_tests;
#[cfg(test)]
mod harness;
#[cfg(test)]
mod lineage_tests;
#[cfg(test)]
mod postgres_tests;
#[cfg(test)]
mod tests;

/// The `[store]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Which database holds the state. Default SQLite.
    pub backend: Backend,
    /// The SQLite database file (created if missing; WAL mode, fsync on commit).
    pub sqlite: PathBuf,
    /// The audit log file the committed audit chain is mirrored to.
    pub audit_file: PathBuf,
    /// Most changes committed in one transaction (SQLite). Default 512.
    pub max_batch: usize,
}

/// Where the state lives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Backend {
    /// One SQLite file, one gateway (`store.sqlite`).
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by every replica (`[store.postgres]`).
    Postgres(PostgresConfig),
}

/// Opens the configured backend: migrates its schema, catches the audit file up with the
/// database and starts the store's background work.
pub async fn open(
    config: &StoreConfig,
    checkpoints: Checkpoints,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    Ok(match &config.backend {
        Backend::Sqlite => std::sync::Arc::new(SqliteStore::open(config, checkpoints)?),
        Backend::Postgres(pg) => {
            std::sync::Arc::new(PostgresStore::open(pg, &config.audit_file, checkpoints).await?)
        }
    })
}

/// Something went wrong below the store's API.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused an operation.
    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused an operation, or the connection to it failed (after the bounded
    /// retries of what provably did not commit).
    #[error("database error")]
    Postgres(#[from] tokio_postgres::Error),
    /// The database password file could not be read (or others can read it).
    #[error("store.postgres.password_file")]
    PasswordFile(#[source] crate::secrets::SecretError),
    /// The environment variable named for the database password is not set (or not UTF-8).
    #[error("store.postgres.password_env: ${0} is not set")]
    PasswordEnv(String),
    /// The database's CA certificate file (`store.postgres.ca_file`) could not be used.
    #[error("store.postgres.ca_file {path}: {why}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// No connection to PostgreSQL could be had from the pool in time.
    #[error("no database connection: {0}")]
    Unavailable(#[source] deadpool_postgres::PoolError),
    /// The connection was lost while a commit was under way: the change may or may not be
    /// recorded. Never retried (a retry could issue twice); the caller answers 503 and the
    /// client's idempotency key finds the outcome.
    #[error("the database connection was lost during a commit; the outcome is unknown")]
    CommitUnknown(#[source] tokio_postgres::Error),
    /// The database or audit file could not be opened or written.
    #[error("{0}")]
    Io(String),
    /// The audit file could not be opened or appended to (it is corrupt, locked, or the disk
    /// failed).
    #[error("audit file {path}")]
    Audit {
        /// The file.
        path: PathBuf,
        /// What went wrong with it.
        #[source]
        source: crate::audit::AuditError,
    },
    /// The audit file and the database disagree: someone edited one of them.
    #[error("audit log and database disagree: {0}")]
    AuditMismatch(String),
    /// The writer thread is gone (shutting down or crashed).
    #[error("the store is shut down")]
    Closed,
    /// The group commit this change was part of failed (the cause, logged once, is the same
    /// for every change of the group).
    #[error("{0}")]
    Group(#[source] std::sync::Arc<StoreError>),
    /// The database was written by a newer version of the gateway.
    #[error("the database schema is version {found}; this gateway knows up to {known}: upgrade it")]
    SchemaTooNew {
        /// The database's schema version (`user_version` in SQLite).
        found: u32,
        /// The newest this binary writes.
        known: u32,
    },
    /// A stored value did not parse back.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// A token as registered when it was issued.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenRecord {
    /// The audit GUID.
    pub id: TokenId,
    /// Cluster it admits to.
    pub cluster: String,
    /// Role it grants.
    pub role: String,
    /// Joins it allows.
    pub max_uses: u32,
    /// Joins consumed.
    pub uses: u32,
    /// Not valid before, Unix seconds.
    pub not_before: u64,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// When it was issued, Unix seconds.
    pub issued_at: u64,
    /// When it was revoked, if it was.
    pub revoked_at: Option<u64>,
}

/// Whether a token can still be used, at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStatus {
    /// Usable, with this many joins left.
    Usable {
        /// Joins left, this one included.
        uses_left: u32,
    },
    /// Never registered here.
    Unknown,
    /// Revoked by an operator.
    Revoked,
    /// Every use consumed.
    Exhausted,
    /// Past its expiry.
    Expired,
}

impl TokenRecord {
    /// The token's status at `now` (Unix seconds).
    pub fn status(&self, now: u64) -> TokenStatus {
        if self.revoked_at.is_some() {
            TokenStatus::Revoked
        } else if now >= self.expires_at {
            TokenStatus::Expired
        } else if self.uses >= self.max_uses {
            TokenStatus::Exhausted
        } else {
            TokenStatus::Usable {
                uses_left: self.max_uses - self.uses,
            }
        }
    }
}

/// Where an issued identity stands at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityState {
    /// Unrevoked and not yet expired.
    Live,
    /// Past its not-after, never revoked.
    Expired,
    /// Revoked (superseded, or by an operator).
    Revoked,
}

impl IdentityState {
    /// Parses `live`, `expired` or `revoked`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "live" => Some(Self::Live),
            "expired" => Some(Self::Expired),
            "revoked" => Some(Self::Revoked),
            _ => None,
        }
    }
}

/// An issued identity as the inventory lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IssuedIdentity {
    /// Certificate serial, hex.
    pub serial: String,
    /// The SPIFFE ID in it.
    pub spiffe_id: String,
    /// The token it was issued through.
    pub token_id: String,
    /// The node's name.
    pub node: String,
    /// Cluster, from the token.
    pub cluster: String,
    /// Role, from the token.
    pub role: String,
    /// The policy that allowed it.
    pub policy_name: String,
    /// That policy's bundle version.
    pub policy_version: String,
    /// Validity start, Unix seconds.
    pub not_before: u64,
    /// Expiry, Unix seconds.
    pub not_after: u64,
    /// When it was issued, Unix seconds.
    pub issued_at: u64,
    /// When it was revoked, if it was.
    pub revoked_at: Option<u64>,
    /// Why it was revoked (`superseded`, or an operator's reason).
    pub revoked_reason: Option<String>,
    /// The serial it renewed, for a renewal (absent for a join's certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predecessor: Option<String>,
    /// Renewals in its lineage up to it (0 for a join's certificate).
    #[serde(default)]
    pub renewals: u32,
    /// Its state at the time of the query.
    pub state: IdentityState,
}

/// Which identities to list: every field given narrows the result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityFilter {
    /// Issued through this token.
    pub token_id: Option<TokenId>,
    /// With this SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// In this cluster.
    pub cluster: Option<String>,
    /// With this role.
    pub role: Option<String>,
    /// Allowed by this policy bundle version.
    pub policy_version: Option<String>,
    /// With this serial (hex).
    pub serial: Option<String>,
    /// In this state at `now`.
    pub state: Option<IdentityState>,
    /// Expiring at or after this time, Unix seconds.
    pub expires_after: Option<u64>,
    /// Expiring before this time, Unix seconds.
    pub expires_before: Option<u64>,
    /// At most this many, newest first ([`MAX_LISTED`] at most).
    pub limit: Option<u32>,
}

/// Most identities one listing returns.
pub const MAX_LISTED: u32 = 10_000;

/// An identity about to be recorded.
#[derive(Debug, Clone)]
pub struct IdentityRecord {
    /// Certificate serial.
    pub serial: Serial,
    /// The SPIFFE ID in it.
    pub spiffe_id: SpiffeId,
    /// The node's name.
    pub node: String,
    /// Cluster and role from the token.
    pub cluster: String,
    /// Role from the token.
    pub role: String,
    /// Validity, Unix seconds.
    pub not_before: u64,
    /// Expiry, Unix seconds.
    pub not_after: u64,
    /// The attestation the lineage began with (`policy_sdk::Attestation` as JSON), shown to the
    /// policy again at every renewal.
    pub attestation: String,
    /// The issuing CA: SHA-256 of its certificate, hex ([`crate::identity::Ca::fingerprint`]).
    pub issuer: String,
}

/// The final step of a join: consume a use, record the identity, remember the nonce and the
/// idempotency key, and audit — all or nothing.
#[derive(Debug, Clone)]
pub struct IssueRecord {
    /// The request, for the audit trail.
    pub request_id: String,
    /// The token whose use is consumed.
    pub token: TokenId,
    /// The attestation nonce, consumed for good.
    pub nonce: String,
    /// When the nonce would have expired anyway, Unix seconds.
    pub nonce_expires_at: u64,
    /// The client's idempotency key and the digest of the CSR it came with.
    pub idempotency: Option<(String, [u8; 32])>,
    /// What was minted.
    pub identity: IdentityRecord,
    /// The response body, replayed verbatim to an idempotent retry.
    pub response: String,
    /// The policy that allowed it.
    pub policy: PolicyRef,
    /// Notes the policy asked to record.
    pub audit_notes: Vec<String>,
    /// The policy-decision audit event, committed with the issuance.
    pub decision: AuditEvent,
    /// Whether the token may replace a live identity of the same SPIFFE ID (revoking it in
    /// this transaction). Without it, a live identity refuses the issuance.
    pub supersede: bool,
    /// Issuance time, Unix seconds.
    pub now: u64,
}

/// How the final step ended. Refusals are outcomes, not errors: nothing was written, and the
/// caller decides what the node is told and audits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueOutcome {
    /// Recorded; the token has this many uses left.
    Issued {
        /// Uses left after this one.
        uses_left: u32,
    },
    /// The idempotency key was already used with the same CSR: here is the earlier response.
    /// Nothing was consumed.
    Replayed(String),
    /// The idempotency key was already used with a different CSR.
    IdempotencyConflict,
    /// Lost the race for the last use (or it was already gone).
    Exhausted,
    /// The token was revoked meanwhile.
    Revoked,
    /// The token expired meanwhile.
    Expired,
    /// The nonce was consumed by another join.
    NonceReplayed,
    /// The SPIFFE ID already has a live (unrevoked, unexpired) identity and the token may not
    /// supersede it.
    IdentityInUse,
    /// The SPIFFE ID is quarantined after a revocation until this time (Unix seconds).
    Quarantined {
        /// When the quarantine ends.
        until: u64,
    },
}

/// An identity as a renewal sees it: the certificate presented, where it stands, the token its
/// lineage began with, and whether its SPIFFE ID is quarantined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    /// The presented certificate's record.
    pub identity: IssuedIdentity,
    /// Renewals between the join and this certificate (0 for the join's own).
    pub renewals: u32,
    /// The attestation the lineage began with, JSON.
    pub attestation: String,
    /// Whether this certificate was renewed already (it may renew again).
    pub renewed: bool,
    /// The token the lineage began with.
    pub token: TokenRecord,
    /// When the SPIFFE ID's quarantine ends, if it is quarantined now.
    pub quarantined_until: Option<u64>,
}

/// The final step of a renewal: record the new identity as the successor of the presented one,
/// in the same lineage (same token), and audit it — all or nothing.
#[derive(Debug, Clone)]
pub struct RenewRecord {
    /// The request, for the audit trail.
    pub request_id: String,
    /// Serial (hex) of the certificate presented.
    pub predecessor: String,
    /// The token the lineage began with.
    pub token: TokenId,
    /// The client's idempotency key and the digest of the CSR it came with.
    pub idempotency: Option<(String, [u8; 32])>,
    /// What was minted.
    pub identity: IdentityRecord,
    /// The response body, replayed verbatim to an idempotent retry.
    pub response: String,
    /// The policy that allowed it.
    pub policy: PolicyRef,
    /// Notes the policy asked to record.
    pub audit_notes: Vec<String>,
    /// The rules the policy reports as matched.
    pub matched_rules: Vec<String>,
    /// Renewal time, Unix seconds.
    pub now: u64,
    /// An operator's manual issuance in the lineage (not the node renewing): who and why,
    /// audited with the successor.
    pub manual: Option<crate::audit::ManualIssuance>,
}

/// How the final step of a renewal ended. Refusals write nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewOutcome {
    /// Recorded; this is the lineage's n-th renewal.
    Renewed {
        /// Renewals in the lineage, this one included.
        renewals: u32,
    },
    /// The idempotency key was already used with the same CSR: the earlier response.
    Replayed(String),
    /// The idempotency key was already used with a different CSR.
    IdempotencyConflict,
    /// The presented certificate was revoked meanwhile.
    Revoked,
    /// The token the lineage began with was revoked.
    TokenRevoked,
    /// The SPIFFE ID is quarantined until this time.
    Quarantined {
        /// When the quarantine ends, Unix seconds.
        until: u64,
    },
    /// No identity with the presented serial is on record.
    Unknown,
}

/// What to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeTarget {
    /// The token (no further joins) and every identity its lineages hold, joins and renewals.
    Token(TokenId),
    /// Every identity carrying this SPIFFE ID, whatever token it came through.
    SpiffeId(String),
    /// One certificate (hex serial) and every renewal descending from it.
    Serial(String),
}

/// An operator's revocation.
#[derive(Debug, Clone)]
pub struct RevokeOrder {
    /// The request, for the audit trail.
    pub request_id: String,
    /// What to revoke.
    pub target: RevokeTarget,
    /// Why (audited, published in the feed).
    pub reason: String,
    /// Who asked.
    pub revoked_by: String,
    /// How long the revoked SPIFFE IDs stay quarantined (no join or renewal for them); zero for
    /// none.
    pub quarantine: std::time::Duration,
    /// Unix seconds.
    pub now: u64,
}

/// What a revocation did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RevokeSummary {
    /// Whether the target exists at all (a token, serial or SPIFFE ID on record).
    pub found: bool,
    /// Whether a token was revoked by this order (false when it already was).
    pub token_revoked: bool,
    /// Serials revoked by this order (ones revoked before are not repeated).
    pub serials: Vec<String>,
    /// SPIFFE IDs quarantined, with the time their quarantine ends.
    pub quarantined: Vec<Quarantine>,
}

/// Where the live identities stand, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpirySummary {
    /// The soonest notAfter among live, unrenewed identities, Unix seconds.
    pub soonest: Option<u64>,
    /// How many of them are past their renewal point.
    pub past_renewal: u64,
}

/// A SPIFFE ID that may not join or renew until a time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Quarantine {
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// Since when, Unix seconds.
    pub since: u64,
    /// Until when, Unix seconds.
    pub until: u64,
    /// The revocation's reason.
    pub reason: String,
}

/// One revoked certificate, as the CRL and the revocation feed publish it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Feed position.
    pub seq: u64,
    /// Certificate serial, hex.
    pub serial: String,
    /// The SPIFFE ID it carried.
    pub spiffe_id: String,
    /// The token its lineage began with.
    pub token_id: String,
    /// When it was revoked, Unix seconds.
    pub revoked_at: u64,
    /// Why: `superseded`, or the operator's reason.
    pub reason: String,
    /// Its expiry, Unix seconds.
    pub not_after: u64,
}

/// A decision on which the shadow candidate disagreed with the active policy version: both
/// answers and the policy input (the typed request, which never holds the token itself). The
/// store keeps the newest `keep` of them and drops older rows as new ones arrive.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Disagreement {
    /// Position (assigned by the store; 0 when recording).
    pub seq: u64,
    /// When, Unix seconds.
    pub at: u64,
    /// The request it shadowed.
    pub request_id: String,
    /// The token's cluster.
    pub cluster: String,
    /// The token's role.
    pub role: String,
    /// The active version that answered.
    pub active_version: String,
    /// The candidate version that was compared.
    pub candidate_version: String,
    /// The active version's decision (JSON of the decision summary).
    pub active: String,
    /// The candidate's decision (JSON of the decision summary).
    pub candidate: String,
    /// The policy input (JSON of the request the policies saw).
    pub input: String,
}

/// One live decision kept for replay: the policy input (the typed request, which never holds
/// the token itself) and what the active version decided. Kept for the retention window and
/// bounded in rows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DecisionRecord {
    /// Position (assigned by the store; 0 when recording).
    pub seq: u64,
    /// When, Unix seconds.
    pub at: u64,
    /// The request it decided.
    pub request_id: String,
    /// The token's cluster.
    pub cluster: String,
    /// The token's role.
    pub role: String,
    /// The version that decided.
    pub policy_version: String,
    /// Its decision (JSON of the decision summary).
    pub outcome: String,
    /// The policy input (JSON of the request the policy saw).
    pub input: String,
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What an idempotency key was first used for: the CSR digest and the response sent.
pub type IdempotentResult = ([u8; 32], String);

/// What the gateway needs from durable state. SQLite is the embedded backend, PostgreSQL the
/// shared one; every method's contract is what the shared tests check, against both.
pub trait Store: Send + Sync + 'static {
    /// Registers a newly issued token and audits it.
    fn register_token(
        &self,
        token: TokenRecord,
        event: AuditEvent,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Every token, newest first.
    fn list_tokens(&self) -> BoxFuture<'_, Result<Vec<TokenRecord>, StoreError>>;

    /// One token.
    fn token(&self, id: TokenId) -> BoxFuture<'_, Result<Option<TokenRecord>, StoreError>>;

    /// Revokes a token, a SPIFFE ID or a certificate with every identity descending from it,
    /// quarantines the SPIFFE IDs involved, publishes the revocations (CRL and feed source) and
    /// audits each step, in one transaction. Idempotent: what was revoked before is neither
    /// revoked nor audited again.
    fn revoke(&self, order: RevokeOrder) -> BoxFuture<'_, Result<RevokeSummary, StoreError>>;

    /// The identity behind a presented certificate, with its lineage's token and quarantine.
    fn lineage(&self, serial: &str, now: u64)
    -> BoxFuture<'_, Result<Option<Lineage>, StoreError>>;

    /// The final, atomic step of a renewal.
    fn renew(&self, record: RenewRecord) -> BoxFuture<'_, Result<RenewOutcome, StoreError>>;

    /// SPIFFE IDs quarantined at `now`.
    fn quarantined(&self, now: u64) -> BoxFuture<'_, Result<Vec<Quarantine>, StoreError>>;

    /// Ends a SPIFFE ID's quarantine now and audits who did it; false when it was not
    /// quarantined.
    fn lift_quarantine(
        &self,
        spiffe_id: String,
        lifted_by: String,
        now: u64,
    ) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Revocations after feed position `since`, oldest first, at most `limit`.
    fn revocations_since(
        &self,
        since: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<Revoked>, StoreError>>;

    /// Every revoked certificate not expired at `now` (what a CRL lists), with the feed's
    /// position at the time of reading.
    fn unexpired_revocations(
        &self,
        now: u64,
    ) -> BoxFuture<'_, Result<(Vec<Revoked>, u64), StoreError>>;

    /// The feed position of the newest revocation, updated after every commit that revoked
    /// something: this replica's before it answers; on PostgreSQL, other replicas' too, through
    /// a notification (and a periodic read of the database when notifications were lost).
    fn revocation_head(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Committed audit entries not yet written to the audit file (the mirror's backlog): near
    /// zero while the file keeps up; growing when its disk is slow, full or failing.
    fn audit_backlog(&self) -> u64;

    /// Among identities live at `now` and not renewed yet: the soonest expiry, and how many are
    /// past their renewal point (when `renew_remaining_percent` of their lifetime remains).
    fn expiry_summary(
        &self,
        now: u64,
        renew_remaining_percent: u8,
    ) -> BoxFuture<'_, Result<ExpirySummary, StoreError>>;

    /// The earlier response for an idempotency key, with the CSR digest it was made for.
    fn idempotent(
        &self,
        token: TokenId,
        key: &str,
    ) -> BoxFuture<'_, Result<Option<IdempotentResult>, StoreError>>;

    /// Whether a join already consumed this nonce (on any replica).
    fn nonce_used(&self, nonce: &str) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// The read-only checks of a join in one round trip: the token's record and whether the
    /// nonce was already consumed.
    fn precheck(
        &self,
        token: TokenId,
        nonce: &str,
    ) -> BoxFuture<'_, Result<(Option<TokenRecord>, bool), StoreError>>;

    /// The final, atomic step of a join.
    fn issue(&self, record: IssueRecord) -> BoxFuture<'_, Result<IssueOutcome, StoreError>>;

    /// Appends audit events on their own (refusals, replays), durably.
    fn audit(&self, events: Vec<AuditEvent>) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Issued identities matching `filter`, newest first, with their state at `now`.
    fn identities(
        &self,
        filter: IdentityFilter,
        now: u64,
    ) -> BoxFuture<'_, Result<Vec<IssuedIdentity>, StoreError>>;

    /// Signs the audit chain's head now (a checkpoint) if unsigned entries trail the last
    /// checkpoint, and returns once the audit file holds and has synced every committed entry.
    /// A clean shutdown calls it last.
    fn flush_audit(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The latest notAfter among the unrevoked identities issued by the CA whose certificate
    /// has SHA-256 `issuer` (hex) that are still valid at `now`; `None` when there is none.
    /// With `with_unattributed`, identities recorded before issuers were (all issued by the
    /// configured CA) count as issued by it.
    fn latest_live_expiry(
        &self,
        issuer: &str,
        with_unattributed: bool,
        now: u64,
    ) -> BoxFuture<'_, Result<Option<u64>, StoreError>>;

    /// Serial numbers of identities issued through a token.
    fn identities_of(&self, token: TokenId) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;

    /// Whether the database answers now: one trivial statement, not retried (`/readyz` asks,
    /// and a load balancer wants the present state, not the outcome of a retry loop).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The backend's name as readiness reports show it (`sqlite`, `postgres`).
    fn backend(&self) -> &'static str;
    /// Records a shadow disagreement and drops the oldest rows beyond the newest `keep`, in
    /// one transaction (unaudited: the audit trail records the active decision).
    fn record_disagreement(
        &self,
        disagreement: Disagreement,
        keep: u32,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The newest `limit` shadow disagreements, newest first.
    fn disagreements(&self, limit: u32) -> BoxFuture<'_, Result<Vec<Disagreement>, StoreError>>;

    /// Records live decisions for replay and, in the same transaction, drops those recorded
    /// before `older_than` (Unix seconds) and all but the newest `keep` (unaudited).
    fn record_decisions(
        &self,
        decisions: Vec<DecisionRecord>,
        keep: u32,
        older_than: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Up to `limit` recorded decisions after position `after` made at or after `since`
    /// (Unix seconds), oldest first.
    fn decisions(
        &self,
        since: u64,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<DecisionRecord>, StoreError>>;

    /// Records a policy pin (`target` Some) or unpin (None) for every replica sharing the
    /// database, and tells them. Answers the fleet's pin as recorded, or `None` when the
    /// backend is one gateway's own (SQLite: the pin stays in that gateway's `active.json`).
    fn share_policy_pin(
        &self,
        target: Option<String>,
        commit: Option<String>,
        by: String,
    ) -> BoxFuture<'_, Result<Option<SharedPin>, StoreError>>;

    /// The fleet's policy pin as other replicas change it (a notification, or the periodic
    /// resync after one was lost), when the backend is shared; `None` on SQLite.
    fn shared_policy_pin(&self) -> Option<watch::Receiver<SharedPin>>;
}

/// The policy pin every replica on a shared database follows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedPin {
    /// Bumped by every pin and unpin through any replica; 0 until the first one.
    pub generation: u64,
    /// What the fleet is pinned to, as the operator named it; `None`: follow the remote.
    pub target: Option<String>,
    /// The commit `target` resolved to on the replica that pinned it.
    pub commit: Option<String>,
    /// Who pinned or unpinned.
    pub by: String,
}
