//! The shared backend: a PostgreSQL database that several gateway replicas use at once. Each
//! change is one transaction on a pooled connection (the hot path's, joins, renewals,
//! audited refusals and recorded decisions, many to a transaction: `group`), retried (a bounded number of times) only
//! when it provably did not commit; races between replicas are settled by the database (a
//! conditional update for token uses, `ON CONFLICT` for nonces and idempotency keys, row and
//! advisory locks for lineages), never by reading then writing.

mod chain;
mod connect;
mod group;
mod issue;
mod lineage;
mod mirror;
mod notify;
mod pin;
mod reads;
mod schema;
mod shadow;

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use self::connect::Db;
use self::mirror::Feeder;
use super::{
    BoxFuture, DecisionRecord, Disagreement, ExpirySummary, IdempotentResult, IdentityFilter,
    IssueOutcome, IssueRecord, IssuedIdentity, Lineage, Quarantine, RenewOutcome, RenewRecord,
    RevokeOrder, RevokeSummary, Revoked, SharedPin, Store, StoreError, TokenRecord,
};
use crate::audit::{AuditEvent, ChainHead};
use crate::store::Checkpoints;
use crate::token::TokenId;

pub use schema::SCHEMA_VERSION;

/// The `[store.postgres]` section. It holds no secret: the password is read, when the store
/// opens, from where [`PasswordSource`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// The connection URL (`postgres://user@host:port/database?sslmode=...`), without a
    /// password.
    pub url: String,
    /// Where the password comes from.
    pub password: PasswordSource,
    /// Most connections this replica holds. Default 16.
    pub pool_size: NonZeroUsize,
    /// Longest one statement may run before the database cancels it. Default 5 s.
    pub statement_timeout: Duration,
    /// Longest connecting (TCP, TLS, authentication) or waiting for a pooled connection may
    /// take. Default 5 s.
    pub connect_timeout: Duration,
    /// CA certificates (PEM) the database's TLS certificate must chain to. With it, TLS is
    /// required (unless the URL says `sslmode=disable`) and the server's name is checked
    /// against the URL's host; without it, the URL must not ask for TLS.
    pub ca_file: Option<PathBuf>,
}

/// Where the database password is read from; never from the URL or the config file itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PasswordSource {
    /// No password (trust, peer or certificate authentication).
    #[default]
    None,
    /// A file only its owner can read; surrounding whitespace is ignored.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

impl PostgresConfig {
    /// The defaults for `url`: pool of 16, 5 s statement and connect timeouts, no TLS CA.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password: PasswordSource::None,
            pool_size: NonZeroUsize::new(16).unwrap_or(NonZeroUsize::MIN),
            statement_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            ca_file: None,
        }
    }
}

/// The PostgreSQL store.
pub struct PostgresStore {
    db: Arc<Db>,
    /// The hot path's changes (joins, renewals, audited refusals, recorded decisions),
    /// committed in groups.
    grouper: group::Grouper,
    feeder: Feeder,
    revocation_head: watch::Receiver<u64>,
    pins: watch::Receiver<SharedPin>,
    ticker: tokio::task::JoinHandle<()>,
    listener: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects, migrates the schema (once, under an advisory lock, whatever the number of
    /// replicas starting together; a newer schema than this binary knows is refused), claims
    /// this replica's audit chain, catches the audit file up with the database, and starts the checkpoint ticker and the
    /// listener that moves the revocation head on other replicas' revocations.
    pub async fn open(
        config: &PostgresConfig,
        audit_file: &Path,
        checkpoints: Checkpoints,
    ) -> Result<Self, StoreError> {
        let interval = checkpoints.interval;
        let db = Arc::new(Db::connect(config, checkpoints).await?);
        schema::migrate(&db).await?;
        let own = chain::OwnChain::claim(&db, &replica_name()).await?;
        let own_id = own.id;
        db.set_own_chain(own).await;
        let feeder = Feeder::start(db.clone(), audit_file, own_id).await?;
        let revocation_head = db.revocation_head().await?;
        let (publish, revocation_head) = watch::channel(revocation_head);
        db.set_revocation_watch(publish);
        let (publish_pin, pins) = watch::channel(pin::read(&db).await?);
        db.set_pin_watch(publish_pin);
        db.set_feeder(feeder.sender());
        let ticker = tokio::spawn(chain::tick(Arc::downgrade(&db), interval));
        let listener = tokio::spawn(notify::follow(Arc::downgrade(&db)));
        let grouper = group::Grouper::start(db.clone());
        Ok(Self {
            db,
            grouper,
            feeder,
            revocation_head,
            pins,
            ticker,
            listener,
        })
    }

    /// Signs the unsigned tail of this replica's chain, brings the audit file up to its head,
    /// and closes the pool. Returns once the audit file is released.
    pub async fn close(self) {
        self.ticker.abort();
        self.listener.abort();
        self.grouper.finish().await;
        if let Err(e) = self.db.write(&chain::Checkpoint { force: true }).await {
            tracing::error!(error = %e, "store: cannot sign the audit chain at close");
        }
        self.feeder.finish().await;
        self.db.close();
    }

    /// This replica's audit chain and its head as the database holds it.
    pub async fn audit_head(&self) -> Result<(u64, ChainHead), StoreError> {
        let chain = self.db.own_chain().await.unwrap_or(0);
        Ok((chain, self.db.audit_head(chain).await?))
    }
}

/// How `audit_chains` names this replica: the host and the process.
fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!("{host} pid {}", std::process::id())
}

/// Writes every chain of the database's audit (every replica's, each oldest first, the chains
/// in order of their ids), one line each, to `out`, a page at a time on a connection of its
/// own (nothing is migrated or started: `omnirelay audit export` and `audit verify --config`
/// read what the replicas wrote). Returns how many entries it wrote and each chain's head.
pub async fn export_audit(
    config: &PostgresConfig,
    checkpoints: Checkpoints,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(u64, BTreeMap<u64, ChainHead>), StoreError> {
    let db = Db::connect(config, checkpoints).await?;
    let mut heads = BTreeMap::new();
    let mut entries = 0u64;
    let written = async {
        let (mut chain, mut seq) = (0, 0);
        loop {
            let page = mirror::all_after(&db, chain, seq).await?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            (chain, seq) = (last.chain, last.seq);
            for entry in &page {
                writeln!(out, "{}", entry.line)
                    .map_err(|e| StoreError::Io(format!("writing the audit export: {e}")))?;
                heads.insert(
                    entry.chain,
                    ChainHead {
                        seq: entry.seq,
                        hash: entry.hash,
                    },
                );
                entries += 1;
            }
        }
    }
    .await;
    db.close();
    written.map(|()| (entries, heads))
}

/// The hash of audit entry `seq` of chain `chain` in the database, if it holds that entry.
pub async fn audit_hash_at(
    config: &PostgresConfig,
    checkpoints: Checkpoints,
    chain: u64,
    seq: u64,
) -> Result<Option<[u8; 32]>, StoreError> {
    let db = Db::connect(config, checkpoints).await?;
    let hash = mirror::hash_at(&db, chain, seq).await;
    db.close();
    hash
}

impl Store for PostgresStore {
    fn register_token(
        &self,
        token: TokenRecord,
        event: AuditEvent,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.db.write(&issue::Register(token, event)).await })
    }

    fn list_tokens(&self) -> BoxFuture<'_, Result<Vec<TokenRecord>, StoreError>> {
        Box::pin(reads::list_tokens(&self.db))
    }

    fn token(&self, id: TokenId) -> BoxFuture<'_, Result<Option<TokenRecord>, StoreError>> {
        Box::pin(reads::token(&self.db, id))
    }

    fn revoke(&self, order: RevokeOrder) -> BoxFuture<'_, Result<RevokeSummary, StoreError>> {
        Box::pin(async move { self.db.write(&order).await })
    }

    fn lineage(
        &self,
        serial: &str,
        now: u64,
    ) -> BoxFuture<'_, Result<Option<Lineage>, StoreError>> {
        let serial = serial.to_string();
        Box::pin(async move { reads::lineage(&self.db, &serial, now).await })
    }

    fn renew(&self, record: RenewRecord) -> BoxFuture<'_, Result<RenewOutcome, StoreError>> {
        Box::pin(self.grouper.write(record))
    }

    fn quarantined(&self, now: u64) -> BoxFuture<'_, Result<Vec<Quarantine>, StoreError>> {
        Box::pin(reads::quarantined(&self.db, now))
    }

    fn lift_quarantine(
        &self,
        spiffe_id: String,
        lifted_by: String,
        now: u64,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        let lift = lineage::Lift {
            spiffe_id,
            lifted_by,
            now,
        };
        Box::pin(async move { self.db.write(&lift).await })
    }

    fn revocations_since(
        &self,
        since: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<Revoked>, StoreError>> {
        Box::pin(reads::revocations_since(&self.db, since, limit))
    }

    fn unexpired_revocations(
        &self,
        now: u64,
    ) -> BoxFuture<'_, Result<(Vec<Revoked>, u64), StoreError>> {
        Box::pin(reads::unexpired_revocations(&self.db, now))
    }

    fn revocation_head(&self) -> watch::Receiver<u64> {
        self.revocation_head.clone()
    }

    fn audit_backlog(&self) -> u64 {
        self.feeder.backlog()
    }

    fn expiry_summary(
        &self,
        now: u64,
        renew_remaining_percent: u8,
    ) -> BoxFuture<'_, Result<ExpirySummary, StoreError>> {
        Box::pin(reads::expiry_summary(
            &self.db,
            now,
            renew_remaining_percent,
        ))
    }

    fn idempotent(
        &self,
        token: TokenId,
        key: &str,
    ) -> BoxFuture<'_, Result<Option<IdempotentResult>, StoreError>> {
        let key = key.to_string();
        Box::pin(async move { reads::idempotent(&self.db, token, &key).await })
    }

    fn nonce_used(&self, nonce: &str) -> BoxFuture<'_, Result<bool, StoreError>> {
        let nonce = nonce.to_string();
        Box::pin(async move { reads::nonce_used(&self.db, &nonce).await })
    }

    fn precheck(
        &self,
        token: TokenId,
        nonce: &str,
    ) -> BoxFuture<'_, Result<(Option<TokenRecord>, bool), StoreError>> {
        let nonce = nonce.to_string();
        Box::pin(async move { reads::precheck(&self.db, token, &nonce).await })
    }

    fn issue(&self, record: IssueRecord) -> BoxFuture<'_, Result<IssueOutcome, StoreError>> {
        Box::pin(self.grouper.write(record))
    }

    fn audit(&self, events: Vec<AuditEvent>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.grouper.write(issue::AuditOnly(events)))
    }

    fn identities(
        &self,
        filter: IdentityFilter,
        now: u64,
    ) -> BoxFuture<'_, Result<Vec<IssuedIdentity>, StoreError>> {
        Box::pin(async move { reads::identities(&self.db, &filter, now).await })
    }

    fn flush_audit(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.db.write(&chain::Checkpoint { force: true }).await?;
            self.feeder.flush().await
        })
    }

    fn latest_live_expiry(
        &self,
        issuer: &str,
        with_unattributed: bool,
        now: u64,
    ) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        let issuer = issuer.to_string();
        Box::pin(async move {
            reads::latest_live_expiry(&self.db, &issuer, with_unattributed, now).await
        })
    }

    fn identities_of(&self, token: TokenId) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(reads::identities_of(&self.db, token))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.db.ping())
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn record_disagreement(
        &self,
        disagreement: Disagreement,
        keep: u32,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.db.write(&shadow::Record(disagreement, keep)).await })
    }

    fn disagreements(&self, limit: u32) -> BoxFuture<'_, Result<Vec<Disagreement>, StoreError>> {
        Box::pin(shadow::newest(&self.db, limit))
    }

    fn record_decisions(
        &self,
        decisions: Vec<DecisionRecord>,
        keep: u32,
        older_than: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(
            self.grouper
                .write(shadow::Decisions(decisions, keep, older_than)),
        )
    }

    fn decisions(
        &self,
        since: u64,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<DecisionRecord>, StoreError>> {
        Box::pin(shadow::decisions(&self.db, since, after, limit))
    }

    fn share_policy_pin(
        &self,
        target: Option<String>,
        commit: Option<String>,
        by: String,
    ) -> BoxFuture<'_, Result<Option<SharedPin>, StoreError>> {
        Box::pin(async move {
            let share = pin::Share {
                target,
                commit,
                by,
                now: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            };
            let shared = self.db.write(&share).await?;
            // This replica's own follower sees its pin at once, before the notification.
            self.db.advance_pin(shared.clone());
            Ok(Some(shared))
        })
    }

    fn shared_policy_pin(&self) -> Option<watch::Receiver<SharedPin>> {
        Some(self.pins.clone())
    }
}

/// A Unix time or count as PostgreSQL's `BIGINT` holds it (every value the gateway writes is
/// far below `i64::MAX`; a larger one is kept at the maximum rather than wrapped).
pub(super) fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A `BIGINT` column read back as the unsigned value it was written from.
pub(super) fn uint(row: &tokio_postgres::Row, column: usize) -> Result<u64, StoreError> {
    let value: i64 = row.try_get(column)?;
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative value {value}")))
}

/// A nullable `BIGINT` column read back as an unsigned value.
pub(super) fn uint_opt(
    row: &tokio_postgres::Row,
    column: usize,
) -> Result<Option<u64>, StoreError> {
    let value: Option<i64> = row.try_get(column)?;
    value
        .map(|v| u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative value {v}"))))
        .transpose()
}

/// A `BIGINT` column read back as a `u32` count.
pub(super) fn count(row: &tokio_postgres::Row, column: usize) -> Result<u32, StoreError> {
    let value: i64 = row.try_get(column)?;
    u32::try_from(value).map_err(|_| StoreError::Corrupt(format!("count out of range: {value}")))
}
