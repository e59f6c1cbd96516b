//! Connections and transactions: the pool (TLS with rustls when asked for), the password read
//! from its file or variable (never logged: `tokio_postgres::Config` redacts it and nothing
//! here prints it), and [`Db::write`], which runs one change as one transaction and retries
//! it, a bounded number of times, only when it provably did not commit.

use std::sync::{Arc, OnceLock, PoisonError};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, watch};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::super::{BoxFuture, Checkpoints, SharedPin, StoreError};
use super::PasswordSource;
use super::PostgresConfig;
use super::chain::{self, OwnChain, Sealed};
use super::mirror::FeedMessage;
use crate::audit::AuditEvent;

/// The SPIFFE ID's transaction-scoped advisory lock.
pub(super) const LOCK_SPIFFE_ID: &str = "SELECT pg_advisory_xact_lock(7, hashtext($1))";

/// Attempts of one change before its error is returned.
const MAX_ATTEMPTS: u32 = 4;
/// The first retry's pause; each next one doubles, with full jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);

/// The pool, and what every change needs to seal its audit entries and report its effects.
pub(in crate::store) struct Db {
    pool: Pool,
    pub(super) checkpoints: Checkpoints,
    revocations: OnceLock<watch::Sender<u64>>,
    pins: OnceLock<watch::Sender<SharedPin>>,
    feeder: OnceLock<mpsc::UnboundedSender<FeedMessage>>,
    /// The audit chain this replica writes (none for a reader such as `audit export`), held
    /// from each seal through its commit.
    own: tokio::sync::Mutex<Option<OwnChain>>,
    /// How the revocation listener connects (outside the pool: it holds its connection).
    pub(super) listen_config: tokio_postgres::Config,
    pub(super) listen_tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

/// What a change decided inside its transaction.
pub(super) enum Applied<T> {
    /// Commit it (with the audit entries and revocations it queued), then answer.
    Commit(T),
    /// Write nothing: roll back, then answer.
    Refuse(T),
    /// A concurrent transaction committed what this one needed first (an idempotency key):
    /// roll back and run it again, when it will see that commit.
    Again,
}

/// One change: what it does inside its transaction. It may run more than once (a retry after
/// a serialisation failure or a dropped connection), each time in a fresh transaction.
pub(super) trait Change: Sync {
    /// The answer.
    type Output: Send;
    /// Its statements, and the audit events and revocations it queues on `tx`.
    fn apply<'a>(
        &'a self,
        tx: &'a mut Tx,
    ) -> BoxFuture<'a, Result<Applied<Self::Output>, StoreError>>;
}

/// A revoked certificate queued for the feed: its position is given under the chain lock, so
/// positions become visible in order (a reader never skips one committed late).
#[derive(Debug, Clone)]
pub(super) struct NewRevocation {
    pub serial: String,
    pub spiffe_id: String,
    pub token_id: String,
    pub reason: String,
    pub not_after: u64,
    pub now: u64,
}

/// When the transaction's commit signs the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Signing {
    /// After `every` unsigned entries, or when the oldest unsigned one is `interval` old.
    Scheduled,
    /// Whenever entries are unsigned (a flush, a close).
    Now,
}

/// An open transaction on a pooled connection, with what it queued for the commit.
pub(super) struct Tx {
    client: Option<Object>,
    pub(super) events: Vec<AuditEvent>,
    pub(super) revocations: Vec<NewRevocation>,
    pub(super) signing: Signing,
    /// Whether to take the chain lock even with nothing queued (the ticker's check).
    pub(super) check_chain: bool,
    /// Statements without parameters (`BEGIN`, `SAVEPOINT`) sent in the same round trip as
    /// the next statement, ahead of it.
    ahead: std::sync::Mutex<String>,
}

impl Tx {
    fn client(&self) -> Result<&Object, StoreError> {
        self.client.as_ref().ok_or(StoreError::Closed)
    }

    /// Sends `sql` (statements without parameters) ahead of the next statement, in its round
    /// trip, instead of in one of its own.
    pub(super) fn send_ahead(&self, sql: &str) {
        let mut ahead = self.ahead.lock().unwrap_or_else(PoisonError::into_inner);
        if !ahead.is_empty() {
            ahead.push_str("; ");
        }
        ahead.push_str(sql);
    }

    /// Sends what is still waiting to go ahead, on its own.
    pub(super) async fn flush_ahead(&mut self) -> Result<(), StoreError> {
        match self.take_ahead() {
            Some(sql) => self.end(&sql).await,
            None => Ok(()),
        }
    }

    fn take_ahead(&self) -> Option<String> {
        let mut ahead = self.ahead.lock().unwrap_or_else(PoisonError::into_inner);
        (!ahead.is_empty()).then(|| std::mem::take(&mut *ahead))
    }

    /// Runs `statement` (not sent yet), preceded in the pipeline by what waits to go ahead.
    async fn after_ahead<T>(
        &self,
        client: &Object,
        statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        match self.take_ahead() {
            None => Ok(statement.await?),
            Some(ahead) => {
                let (sent, result) = tokio::join!(biased; client.batch_execute(&ahead), statement);
                sent?;
                Ok(result?)
            }
        }
    }

    /// Rows of one statement (prepared once per connection).
    pub(super) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client()?;
        let statement = client.prepare_cached(sql).await?;
        self.after_ahead(client, client.query(&statement, params))
            .await
    }

    /// The row of a statement that returns at most one.
    pub(super) async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let client = self.client()?;
        let statement = client.prepare_cached(sql).await?;
        self.after_ahead(client, client.query_opt(&statement, params))
            .await
    }

    /// The row of a statement that returns exactly one.
    pub(super) async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, StoreError> {
        let client = self.client()?;
        let statement = client.prepare_cached(sql).await?;
        self.after_ahead(client, client.query_one(&statement, params))
            .await
    }

    /// Rows changed by one statement.
    pub(super) async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let client = self.client()?;
        let statement = client.prepare_cached(sql).await?;
        self.after_ahead(client, client.execute(&statement, params))
            .await
    }

    /// Serialises the transactions that create or revoke identities of `spiffe_id` (one live
    /// lineage per SPIFFE ID holds across replicas); released at commit or rollback.
    pub(super) async fn lock_spiffe_id(&self, spiffe_id: &str) -> Result<(), StoreError> {
        self.query(LOCK_SPIFFE_ID, &[&spiffe_id]).await?;
        Ok(())
    }

    /// Prepares `statements` on this connection (only the first time it sees each), so that
    /// each is sent the moment its query is first polled: what pipelining statements in a
    /// given order needs.
    pub(super) async fn prepare(&self, statements: &[&str]) -> Result<(), StoreError> {
        let client = self.client()?;
        for sql in statements {
            client.prepare_cached(sql).await?;
        }
        Ok(())
    }

    /// Whether nothing is queued to seal: no audit entry, no revocation, no checkpoint asked
    /// for. Such a transaction commits without taking the replica's chain.
    pub(super) fn quiet(&self) -> bool {
        self.events.is_empty()
            && self.revocations.is_empty()
            && self.signing == Signing::Scheduled
            && !self.check_chain
    }

    /// Runs `sql` (statements without parameters) as one simple query.
    pub(super) async fn end(&mut self, sql: &str) -> Result<(), StoreError> {
        self.client()?.batch_execute(sql).await?;
        Ok(())
    }

    /// Drops the connection instead of returning it to the pool (its state is unknown).
    pub(super) fn discard(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

impl Db {
    /// Builds the pool (connections are made on demand; the schema migration makes the first).
    pub(super) async fn connect(
        config: &PostgresConfig,
        checkpoints: Checkpoints,
    ) -> Result<Self, StoreError> {
        let mut pg: tokio_postgres::Config = config.url.parse().map_err(StoreError::Postgres)?;
        match &config.password {
            PasswordSource::None => {}
            PasswordSource::File(path) => {
                let password = crate::secrets::read(path).map_err(StoreError::PasswordFile)?;
                pg.password(password.trim());
            }
            PasswordSource::Env(name) => {
                let password =
                    std::env::var(name).map_err(|_| StoreError::PasswordEnv(name.clone()))?;
                pg.password(password);
            }
        }
        pg.connect_timeout(config.connect_timeout);
        pg.application_name("omnirelay-gateway");
        pg.options(format!(
            "-c statement_timeout={}",
            config.statement_timeout.as_millis().max(1)
        ));
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mut listen_config = pg.clone();
        listen_config.application_name("omnirelay-gateway-listen");
        let (manager, listen_tls) = match (&config.ca_file, pg.get_ssl_mode()) {
            (Some(ca), mode) if mode != SslMode::Disable => {
                pg.ssl_mode(SslMode::Require);
                listen_config.ssl_mode(SslMode::Require);
                let tls = tls(ca)?;
                (
                    Manager::from_config(pg, tls.clone(), manager_config),
                    Some(tls),
                )
            }
            _ => (Manager::from_config(pg, NoTls, manager_config), None),
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.get())
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.connect_timeout))
            .create_timeout(Some(config.connect_timeout))
            .build()
            .map_err(|e| StoreError::Io(format!("cannot build the connection pool: {e}")))?;
        Ok(Self {
            pool,
            checkpoints,
            revocations: OnceLock::new(),
            pins: OnceLock::new(),
            feeder: OnceLock::new(),
            own: tokio::sync::Mutex::new(None),
            listen_config,
            listen_tls,
        })
    }

    pub(super) fn set_revocation_watch(&self, head: watch::Sender<u64>) {
        let _ = self.revocations.set(head);
    }

    pub(super) fn set_pin_watch(&self, pins: watch::Sender<SharedPin>) {
        let _ = self.pins.set(pins);
    }

    /// Moves the pin watch to `pin` if it is a later generation than the one it holds (a pin
    /// recorded here, a notification or a resync: whichever arrives last, the newest wins).
    pub(super) fn advance_pin(&self, pin: SharedPin) {
        if let Some(pins) = self.pins.get() {
            pins.send_if_modified(|current| {
                let moved = pin.generation > current.generation;
                if moved {
                    *current = pin;
                }
                moved
            });
        }
    }

    pub(super) fn set_feeder(&self, feeder: mpsc::UnboundedSender<FeedMessage>) {
        let _ = self.feeder.set(feeder);
    }

    /// A pooled connection.
    pub(super) async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(StoreError::Unavailable)
    }

    /// The rows of one read-only statement (prepared once per connection), on a fresh
    /// connection again when the one it had was lost (a read is safe to repeat).
    pub(super) async fn read(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let mut retries = Retries::of("read");
        loop {
            let result = async {
                let client = self.client().await?;
                let statement = client.prepare_cached(sql).await?;
                let rows = client.query(&statement, params).await;
                if rows.is_err() {
                    // Its state is unknown: not back to the pool.
                    drop(Object::take(client));
                }
                Ok::<_, StoreError>(rows?)
            }
            .await;
            match result {
                Err(e) if retries.again_after(&e).await => {}
                other => return other,
            }
        }
    }

    /// One round trip on a pooled connection, not retried; a connection that fails it is
    /// dropped rather than pooled again.
    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        if let Err(e) = client.simple_query("SELECT 1").await {
            drop(Object::take(client));
            return Err(e.into());
        }
        Ok(())
    }

    pub(super) fn close(&self) {
        self.pool.close();
    }

    /// Runs `change` as one transaction: retried after a serialisation failure, a deadlock or
    /// a connection lost before the commit (none of which committed anything), at most
    /// [`MAX_ATTEMPTS`] times; never after a commit whose outcome is unknown.
    pub(super) async fn write<C: Change>(&self, change: &C) -> Result<C::Output, StoreError> {
        let mut retries = Retries::of("transaction");
        loop {
            match self.attempt(change).await {
                Ok(Some(output)) => return Ok(output),
                // A concurrent change it needed committed first: run it again.
                Ok(None) => retries.pause().await,
                Err(e) if retries.again_after(&e).await => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// A pooled connection for a transaction (not begun yet).
    pub(super) async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(Tx {
            client: Some(self.client().await?),
            events: Vec::new(),
            revocations: Vec::new(),
            signing: Signing::Scheduled,
            check_chain: false,
            ahead: std::sync::Mutex::default(),
        })
    }

    async fn attempt<C: Change>(&self, change: &C) -> Result<Option<C::Output>, StoreError> {
        let mut tx = self.begin().await?;
        let result = match tx.end("BEGIN").await {
            Ok(()) => change.apply(&mut tx).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(Applied::Commit(output)) => {
                self.commit(&mut tx).await?;
                Ok(Some(output))
            }
            Ok(Applied::Refuse(output)) => {
                if tx.end("ROLLBACK").await.is_err() {
                    tx.discard();
                }
                Ok(Some(output))
            }
            Ok(Applied::Again) => {
                if tx.end("ROLLBACK").await.is_err() {
                    tx.discard();
                }
                Ok(None)
            }
            Err(e) => {
                tx.discard();
                Err(e)
            }
        }
    }

    /// Makes `chain` the one this replica's changes are sealed onto.
    pub(super) async fn set_own_chain(&self, chain: OwnChain) {
        *self.own.lock().await = Some(chain);
    }

    /// The id of this replica's chain, if it writes one.
    pub(super) async fn own_chain(&self) -> Option<u64> {
        self.own.lock().await.as_ref().map(|c| c.id)
    }

    /// Seals the queued audit entries and revocations onto this replica's chain, commits, then
    /// publishes what the commit did, all while holding the chain (so its entries commit and
    /// reach the audit file in order). A commit whose answer was lost is `CommitUnknown`.
    pub(super) async fn commit(&self, tx: &mut Tx) -> Result<(), StoreError> {
        if tx.quiet() {
            // Nothing to seal: no need to wait for the chain.
            return match tx.client() {
                Ok(client) => match client.batch_execute("COMMIT").await {
                    Ok(()) => Ok(()),
                    Err(e) => Err(self.failed_commit(tx, e)),
                },
                Err(e) => Err(e),
            };
        }
        let mut own = self.own.lock().await;
        let Some(chain) = own.as_mut() else {
            tx.discard();
            return Err(StoreError::Io("this store writes no audit chain".into()));
        };
        let sealed = match chain::seal(tx, chain, &self.checkpoints).await {
            Ok(sealed) => sealed,
            Err(e) => {
                tx.discard();
                return Err(e);
            }
        };
        // The entries and the commit in one round trip: should the insert fail, the server
        // answers the commit of the failed transaction with a rollback.
        let client = tx.client()?;
        let (inserted, committed) = tokio::join!(
            biased;
            chain::insert(tx, &sealed),
            client.batch_execute("COMMIT"),
        );
        if let Err(e) = committed {
            // Whether the entries are in the database is not known: read the head again.
            chain.forget();
            return Err(self.failed_commit(tx, e));
        }
        if let Err(e) = inserted {
            // Rolled back: nothing of this change committed.
            tx.discard();
            return Err(e);
        }
        chain.committed(sealed.state);
        self.published(sealed);
        Ok(())
    }

    /// Drops the connection of a commit that failed: the server answered with an error (it
    /// rolled back), or it did not answer (the outcome is unknown).
    fn failed_commit(&self, tx: &mut Tx, e: tokio_postgres::Error) -> StoreError {
        tx.discard();
        if e.as_db_error().is_some() {
            StoreError::Postgres(e)
        } else {
            StoreError::CommitUnknown(e)
        }
    }

    /// Tells the feed's watchers and the audit mirror what a commit added.
    fn published(&self, sealed: Sealed) {
        if let Some(seq) = sealed.revocation_head {
            self.advance_revocation_head(seq);
        }
        if let Some(feeder) = self.feeder.get()
            && !sealed.entries.is_empty()
        {
            let _ = feeder.send(FeedMessage::Committed(sealed.entries));
        }
    }

    /// Moves the revocation head to `seq` if that is further (a commit here, a notification
    /// or a resync from another replica's commit).
    pub(super) fn advance_revocation_head(&self, seq: u64) {
        if let Some(head) = self.revocations.get() {
            head.send_if_modified(|current| {
                let moved = seq > *current;
                if moved {
                    *current = seq;
                }
                moved
            });
        }
    }

    /// The feed position of the newest revocation (0 when there is none).
    pub(super) async fn revocation_head(&self) -> Result<u64, StoreError> {
        let rows = self
            .read("SELECT COALESCE(MAX(seq), 0) FROM revocations", &[])
            .await?;
        match rows.first() {
            Some(row) => super::uint(row, 0),
            None => Ok(0),
        }
    }

    /// The head of chain `chain` as the database holds it.
    pub(super) async fn audit_head(
        &self,
        chain: u64,
    ) -> Result<crate::audit::ChainHead, StoreError> {
        chain::head_of(self, chain).await
    }
}

/// The attempts of one operation: at most [`MAX_ATTEMPTS`] after errors, each retry after a
/// [`backoff`]. `what` names the operation in the debug log.
pub(super) struct Retries {
    what: &'static str,
    tries: u32,
}

impl Retries {
    pub(super) fn of(what: &'static str) -> Self {
        Self { what, tries: 1 }
    }

    /// Whether to try again after `error` (it proves nothing committed, and the bound is not
    /// reached); if so, after the backoff.
    pub(super) async fn again_after(&mut self, error: &StoreError) -> bool {
        if self.tries >= MAX_ATTEMPTS || !retryable(error) {
            return false;
        }
        tracing::debug!(error = %error, attempt = self.tries, "store: {} retried", self.what);
        self.pause().await;
        true
    }

    /// Waits the backoff before the next attempt.
    pub(super) async fn pause(&mut self) {
        backoff(self.tries).await;
        self.tries += 1;
    }
}

/// Whether an error proves that nothing committed and a fresh attempt may succeed.
pub(super) fn retryable(error: &StoreError) -> bool {
    match error {
        StoreError::Postgres(e) => match e.code() {
            Some(code) => [
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::T_R_DEADLOCK_DETECTED,
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
            ]
            .contains(code),
            // No SQLSTATE: the connection failed (closed, reset, I/O) before the commit.
            None => true,
        },
        StoreError::Unavailable(_) => true,
        _ => false,
    }
}

/// Sleeps before attempt `attempt + 1`: exponential from [`FIRST_BACKOFF`] up to 64 times it,
/// with full jitter so that replicas that collided do not collide again in step. (The agent's
/// [`Backoff`](crate::agent::Backoff): a deliberate delay between retries, not a wait for a
/// condition.)
async fn backoff(attempt: u32) {
    let backoff = crate::agent::Backoff {
        base: FIRST_BACKOFF,
        cap: FIRST_BACKOFF.saturating_mul(64),
    };
    let delay = backoff.delay(attempt.saturating_add(1), None, crate::agent::unit_sample());
    tokio::time::sleep(delay).await;
}

/// The rustls connector for TLS to the database: the CAs of `ca`, aws-lc-rs, the server's name
/// checked against the URL's host.
fn tls(ca: &std::path::Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let problem = |why: String| StoreError::CaFile {
        path: ca.to_path_buf(),
        why,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| problem(e.to_string()))?;
    for cert in certs {
        let cert = cert.map_err(|e| problem(e.to_string()))?;
        roots.add(cert).map_err(|e| problem(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(problem("no certificate in it".into()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| problem(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}
