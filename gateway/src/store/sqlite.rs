//! The embedded backend: one SQLite file in WAL mode. Writes go through a single writer thread
//! that commits them in batches (group commit, one fsync per batch); reads use their own
//! connections and see the last committed state.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot, watch};

use super::chain::{audit_head, digest_from_hex};
use super::checkpoints::{Checkpoints, Ticker, unsigned_in};
use super::wal::WalCheckpointer;
use super::writer::{Command, Message, Writer};
use super::{
    BoxFuture, DecisionRecord, Disagreement, ExpirySummary, IdempotentResult, IdentityFilter,
    IdentityState, IssueOutcome, IssueRecord, IssuedIdentity, Lineage, MAX_LISTED, Quarantine,
    RenewOutcome, RenewRecord, RevokeOrder, RevokeSummary, Revoked, SharedPin, Store, StoreConfig,
    StoreError, TokenRecord,
};
use crate::audit::{AuditEvent, AuditFile, ChainHead};
use crate::token::TokenId;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    role TEXT NOT NULL,
    max_uses INTEGER NOT NULL,
    uses INTEGER NOT NULL DEFAULT 0,
    not_before INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    issued_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS identities (
    serial TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    token_id TEXT NOT NULL REFERENCES tokens(id),
    node TEXT NOT NULL,
    cluster TEXT NOT NULL,
    role TEXT NOT NULL,
    policy_name TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    module_digest TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    issued_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS identities_by_token ON identities(token_id);
CREATE INDEX IF NOT EXISTS identities_by_spiffe_id ON identities(spiffe_id);
CREATE TABLE IF NOT EXISTS idempotency (
    token_id TEXT NOT NULL,
    key TEXT NOT NULL,
    csr_digest TEXT NOT NULL,
    response TEXT NOT NULL,
    PRIMARY KEY (token_id, key)
);
CREATE TABLE IF NOT EXISTS used_nonces (
    nonce TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    line TEXT NOT NULL
);
";

/// Changes since the first schema, in order; `PRAGMA user_version` counts those applied (the
/// first schema, created by `SCHEMA` above, is version 1).
const MIGRATIONS: &[&str] = &[
    // 2: identities can be revoked (superseded by a later join for the same SPIFFE ID).
    "ALTER TABLE identities ADD COLUMN revoked_at INTEGER;
     ALTER TABLE identities ADD COLUMN revoked_reason TEXT;",
    // 3: lineages (renewals link to their predecessor and carry the join's attestation),
    // published revocations (the feed and the CRL), and quarantined SPIFFE IDs. Identities
    // superseded before this version are published too.
    "ALTER TABLE identities ADD COLUMN predecessor TEXT;
     ALTER TABLE identities ADD COLUMN renewals INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE identities ADD COLUMN attestation TEXT;
     CREATE INDEX identities_by_predecessor ON identities(predecessor);
     CREATE TABLE revocations (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         serial TEXT NOT NULL,
         spiffe_id TEXT NOT NULL,
         token_id TEXT NOT NULL,
         revoked_at INTEGER NOT NULL,
         reason TEXT NOT NULL,
         not_after INTEGER NOT NULL
     );
     CREATE INDEX revocations_by_expiry ON revocations(not_after);
     CREATE INDEX identities_by_expiry ON identities(not_after);
     CREATE TABLE quarantine (
         spiffe_id TEXT PRIMARY KEY,
         since INTEGER NOT NULL,
         until INTEGER NOT NULL,
         reason TEXT NOT NULL
     );
     INSERT INTO revocations (serial, spiffe_id, token_id, revoked_at, reason, not_after)
         SELECT serial, spiffe_id, token_id, revoked_at, COALESCE(revoked_reason, 'unspecified'),
                not_after
         FROM identities WHERE revoked_at IS NOT NULL ORDER BY revoked_at, serial;",
    // 4: which CA issued an identity (SHA-256 of its certificate, hex), so a CA is retired only
    // once its last leaf has expired. NULL for rows from before: the configured CA issued them.
    "ALTER TABLE identities ADD COLUMN issuer TEXT;",
    // 5: decisions on which the shadow candidate policy disagreed with the active one, bounded
    // in rows by the writer.
    "CREATE TABLE shadow_disagreements (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         at INTEGER NOT NULL,
         request_id TEXT NOT NULL,
         cluster TEXT NOT NULL,
         role TEXT NOT NULL,
         active_version TEXT NOT NULL,
         candidate_version TEXT NOT NULL,
         active TEXT NOT NULL,
         candidate TEXT NOT NULL,
         input TEXT NOT NULL
     );",
    // 6: live decisions kept for replay (the policy input and the decision), bounded in rows
    // and by age by the writer.
    "CREATE TABLE decisions (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         at INTEGER NOT NULL,
         request_id TEXT NOT NULL,
         cluster TEXT NOT NULL,
         role TEXT NOT NULL,
         policy_version TEXT NOT NULL,
         outcome TEXT NOT NULL,
         input TEXT NOT NULL
     );
     CREATE INDEX decisions_by_time ON decisions(at);",
];

/// The schema version this binary writes.
const SCHEMA_VERSION: u32 = 1 + MIGRATIONS.len() as u32;

/// Creates or upgrades the schema in one transaction; refuses a database written by a newer
/// binary (it may hold rows this one would misread).
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: u32 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    let tx = conn.transaction()?;
    tx.execute_batch(SCHEMA)?;
    for migration in MIGRATIONS.iter().skip(found.saturating_sub(1) as usize) {
        tx.execute_batch(migration)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// Read connections: enough for the runtime's workers to rarely wait on each other.
const READERS: usize = 4;

/// The SQLite store.
pub struct SqliteStore {
    commands: mpsc::Sender<Message>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    revocation_head: tokio::sync::watch::Receiver<u64>,
    /// Entries the audit mirror has not written yet.
    audit_backlog: super::writer::MirrorBacklog,
    /// Resolves (its sender dropped) once the writer thread has exited, and with it released
    /// the write connection and the audit file's lock.
    writer_exited: oneshot::Receiver<()>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

fn open(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database and the audit mirror, brings the mirror up to
    /// date with the committed chain, and starts the writer thread, which signs the chain with
    /// `checkpoints`. Refuses to start when the mirror and the database disagree.
    pub fn open(config: &StoreConfig, checkpoints: Checkpoints) -> Result<Self, StoreError> {
        // Before SQLite opens it: SQLite creates the WAL and shared-memory files with the
        // database's mode, and they hold the same rows.
        make_private(&config.sqlite)?;
        let mut write = open(&config.sqlite, OpenFlags::default())?;
        // WAL with synchronous=FULL: a commit is on disk (WAL fsync'd) when it returns.
        write.pragma_update(None, "journal_mode", "WAL")?;
        write.pragma_update(None, "synchronous", "FULL")?;
        write.pragma_update(None, "foreign_keys", "ON")?;
        // Checkpoints run on their own thread (`wal`); the writer's stays as the bound.
        write.pragma_update(
            None,
            "wal_autocheckpoint",
            super::wal::WRITER_CHECKPOINT_PAGES,
        )?;
        migrate(&mut write)?;
        // A torn last line is an append a crash interrupted; the database holds that entry and
        // the catch-up below writes it again.
        let (mut mirror, cut) =
            AuditFile::open_mirror(&config.audit_file).map_err(|source| StoreError::Audit {
                path: config.audit_file.clone(),
                source,
            })?;
        if cut > 0 {
            tracing::warn!(
                bytes = cut,
                "cut the audit file's torn last line (an append interrupted by a crash)"
            );
        }
        let head = super::chain::catch_up(&write, &mut mirror, &config.audit_file)?;
        let unsigned = unsigned_in(&write)?;
        let (head_of_revocations, revocation_head) =
            tokio::sync::watch::channel(super::writer::revocation_head(&write)?);
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let reader = open(
                &config.sqlite,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            readers.push(Mutex::new(reader));
        }
        // A zero `max_batch` means batches of one (as the writer reads it), not a zero-capacity
        // channel, which tokio refuses with a panic.
        let max_batch = config.max_batch.max(1);
        let (commands, inbox) = mpsc::channel(max_batch.saturating_mul(4));
        let mirror = super::writer::Mirror::start(mirror)
            .map_err(|e| StoreError::Io(format!("cannot start the audit mirror thread: {e}")))?;
        let audit_backlog = mirror.backlog();
        let writer = commands.downgrade();
        let wake = move || {
            let Some(writer) = writer.upgrade() else {
                return false;
            };
            // A full inbox means the writer is busy and checks the time at its commit.
            let _ = writer.try_send(Message::Tick);
            true
        };
        let ticker = Ticker::start(wake, checkpoints.interval)
            .map_err(|e| StoreError::Io(format!("cannot start the audit ticker thread: {e}")))?;
        let wal = open(&config.sqlite, OpenFlags::default())?;
        wal.pragma_update(None, "synchronous", "FULL")?;
        let wal = WalCheckpointer::start(wal)
            .map_err(|e| StoreError::Io(format!("cannot start the checkpoint thread: {e}")))?;
        let writer = Writer::new(
            write,
            head,
            mirror,
            wal,
            max_batch,
            checkpoints,
            unsigned,
            ticker,
            head_of_revocations,
        );
        let (exited, writer_exited) = oneshot::channel();
        // The writer owns the write connection and the audit file, and exits once every sender
        // is gone, after committing what it has. `close` waits for that; a plain drop does not,
        // and then the same files cannot be opened again until the writer has let go of them
        // (the audit file stays locked). Nothing is lost either way: every caller awaited its
        // commit, and the audit mirror is caught up from the database at the next start.
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                writer.run(inbox);
                drop(exited);
            })
            .map_err(|e| StoreError::Io(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            commands,
            readers,
            next_reader: AtomicUsize::new(0),
            revocation_head,
            audit_backlog,
            writer_exited,
        })
    }

    /// The head of the audit chain the database at `path` holds, read through a read-only
    /// connection of its own (for `audit verify`, while the gateway may be running).
    pub fn audit_head(path: &Path) -> Result<ChainHead, StoreError> {
        audit_head(&open_read_only(path)?)
    }

    /// The hash of audit entry `seq` in the database at `path`, if it holds that entry.
    pub fn audit_hash_at(path: &Path, seq: u64) -> Result<Option<[u8; 32]>, StoreError> {
        let hash: Option<String> = open_read_only(path)?
            .query_row("SELECT hash FROM audit WHERE seq = ?1", [seq], |r| r.get(0))
            .optional()?;
        hash.map(|h| digest_from_hex(&h)).transpose()
    }

    /// Writes the whole audit chain of the database at `path`, oldest first, one line each, to
    /// `out` (`omnirelay audit export`). Returns the head it wrote.
    pub fn export_audit(
        path: &Path,
        out: &mut dyn std::io::Write,
    ) -> Result<ChainHead, StoreError> {
        let conn = open_read_only(path)?;
        let mut statement = conn.prepare("SELECT seq, hash, line FROM audit ORDER BY seq")?;
        let mut rows = statement.query([])?;
        let mut head = ChainHead::genesis();
        while let Some(row) = rows.next()? {
            let line: String = row.get(2)?;
            writeln!(out, "{line}")
                .map_err(|e| StoreError::Io(format!("writing the audit export: {e}")))?;
            head = ChainHead {
                seq: row.get(0)?,
                hash: digest_from_hex(&row.get::<_, String>(1)?)?,
            };
        }
        Ok(head)
    }

    /// Shuts the store down: the writer commits what it was sent, mirrors it, and exits. Returns
    /// once it has released the database and the audit file, so they can be opened again at once.
    pub async fn close(self) {
        let Self {
            commands,
            readers,
            writer_exited,
            ..
        } = self;
        drop(commands);
        drop(readers);
        // The only message is the sender being dropped (after `run` returned, or while
        // unwinding from a panic in it): either way the writer is gone.
        let _ = writer_exited.await;
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        let conn = self.readers[i]
            .lock()
            .map_err(|_| StoreError::Io("a reader connection is poisoned".into()))?;
        Ok(f(&conn)?)
    }

    async fn send<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Message::Change(make(reply)))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// Creates the file with mode 0600 if it is missing (SQLite takes an empty file for an empty
/// database), and sets 0600 on one that exists.
fn make_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", path.display()));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)
}

fn token_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    token_from_columns(row, 0)
}

/// A token from [`TOKEN_COLUMNS`] starting at column `at`.
fn token_from_columns(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<TokenRecord> {
    let id: String = row.get(at)?;
    let id = TokenId::parse(&id).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(at, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(TokenRecord {
        id,
        cluster: row.get(at + 1)?,
        role: row.get(at + 2)?,
        max_uses: row.get(at + 3)?,
        uses: row.get(at + 4)?,
        not_before: row.get(at + 5)?,
        expires_at: row.get(at + 6)?,
        issued_at: row.get(at + 7)?,
        revoked_at: row.get(at + 8)?,
    })
}

const REVOKED_COLUMNS: &str = "seq, serial, spiffe_id, token_id, revoked_at, reason, not_after";

fn revoked_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Revoked> {
    Ok(Revoked {
        seq: row.get(0)?,
        serial: row.get(1)?,
        spiffe_id: row.get(2)?,
        token_id: row.get(3)?,
        revoked_at: row.get(4)?,
        reason: row.get(5)?,
        not_after: row.get(6)?,
    })
}

const TOKEN_COLUMNS: &str =
    "id, cluster, role, max_uses, uses, not_before, expires_at, issued_at, revoked_at";

/// The inventory's order, newest first. Within one second (the resolution of `issued_at`), a
/// live identity before a revoked one and a deeper renewal before its predecessors, so that the
/// first is the lineage's current leaf (what an operator's manual issuance continues), not
/// whichever serial sorts first.
const NEWEST_FIRST: &str = "issued_at DESC, revoked_at IS NULL DESC, renewals DESC, serial";

/// The inventory query for `filter`: its SQL and its parameters, in order.
fn identities_query(filter: &IdentityFilter, now: u64) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut sql = String::from(
        "SELECT serial, spiffe_id, token_id, node, cluster, role, policy_name, policy_version,
                not_before, not_after, issued_at, revoked_at, revoked_reason, predecessor,
                renewals
         FROM identities WHERE 1 = 1",
    );
    let mut args: Vec<Value> = Vec::new();
    let mut eq = |column: &str, value: &Option<String>| {
        if let Some(v) = value {
            args.push(Value::Text(v.clone()));
            sql.push_str(&format!(" AND {column} = ?{}", args.len()));
        }
    };
    eq("token_id", &filter.token_id.map(|t| t.to_string()));
    eq("spiffe_id", &filter.spiffe_id);
    eq("cluster", &filter.cluster);
    eq("role", &filter.role);
    eq("policy_version", &filter.policy_version);
    eq("serial", &filter.serial);
    let clamp = |t: u64| Value::Integer(i64::try_from(t).unwrap_or(i64::MAX));
    if let Some(state) = filter.state {
        args.push(clamp(now));
        let n = args.len();
        sql.push_str(&match state {
            IdentityState::Live => format!(" AND revoked_at IS NULL AND not_after > ?{n}"),
            IdentityState::Expired => format!(" AND revoked_at IS NULL AND not_after <= ?{n}"),
            IdentityState::Revoked => " AND revoked_at IS NOT NULL".to_string(),
        });
    }
    if let Some(after) = filter.expires_after {
        args.push(clamp(after));
        sql.push_str(&format!(" AND not_after >= ?{}", args.len()));
    }
    if let Some(before) = filter.expires_before {
        args.push(clamp(before));
        sql.push_str(&format!(" AND not_after < ?{}", args.len()));
    }
    let limit = filter.limit.unwrap_or(MAX_LISTED).min(MAX_LISTED);
    args.push(Value::Integer(limit.into()));
    sql.push_str(&format!(" ORDER BY {NEWEST_FIRST} LIMIT ?{}", args.len()));
    (sql, args)
}

fn identity_from_row(row: &rusqlite::Row<'_>, now: u64) -> rusqlite::Result<IssuedIdentity> {
    let not_after: u64 = row.get(9)?;
    let revoked_at: Option<u64> = row.get(11)?;
    let state = match revoked_at {
        Some(_) => IdentityState::Revoked,
        None if not_after <= now => IdentityState::Expired,
        None => IdentityState::Live,
    };
    Ok(IssuedIdentity {
        serial: row.get(0)?,
        spiffe_id: row.get(1)?,
        token_id: row.get(2)?,
        node: row.get(3)?,
        cluster: row.get(4)?,
        role: row.get(5)?,
        policy_name: row.get(6)?,
        policy_version: row.get(7)?,
        not_before: row.get(8)?,
        not_after,
        issued_at: row.get(10)?,
        revoked_at,
        revoked_reason: row.get(12)?,
        predecessor: row.get(13)?,
        renewals: row.get(14)?,
        state,
    })
}

impl Store for SqliteStore {
    fn register_token(
        &self,
        token: TokenRecord,
        event: AuditEvent,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.send(move |reply| Command::RegisterToken(Box::new((token, event)), reply)))
    }

    fn identities(
        &self,
        filter: IdentityFilter,
        now: u64,
    ) -> BoxFuture<'_, Result<Vec<IssuedIdentity>, StoreError>> {
        Box::pin(async move {
            let (sql, args) = identities_query(&filter, now);
            self.read(|c| {
                let mut stmt = c.prepare(&sql)?;
                let rows = stmt.query_map(rusqlite::params_from_iter(args), |row| {
                    identity_from_row(row, now)
                })?;
                rows.collect()
            })
        })
    }

    fn list_tokens(&self) -> BoxFuture<'_, Result<Vec<TokenRecord>, StoreError>> {
        Box::pin(async move {
            self.read(|c| {
                let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY issued_at DESC, id");
                let mut stmt = c.prepare_cached(&sql)?;
                let rows = stmt.query_map([], token_from_row)?;
                rows.collect()
            })
        })
    }

    fn token(&self, id: TokenId) -> BoxFuture<'_, Result<Option<TokenRecord>, StoreError>> {
        Box::pin(async move {
            self.read(|c| {
                let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?1");
                c.prepare_cached(&sql)?
                    .query_row([id.to_string()], token_from_row)
                    .optional()
            })
        })
    }

    fn revoke(&self, order: RevokeOrder) -> BoxFuture<'_, Result<RevokeSummary, StoreError>> {
        Box::pin(self.send(move |reply| Command::Revoke(Box::new(order), reply)))
    }

    fn lineage(
        &self,
        serial: &str,
        now: u64,
    ) -> BoxFuture<'_, Result<Option<Lineage>, StoreError>> {
        let serial = serial.to_string();
        Box::pin(async move {
            self.read(|c| {
                let found = c
                    .prepare_cached(
                        "SELECT i.serial, i.spiffe_id, i.token_id, i.node, i.cluster, i.role,
                                i.policy_name, i.policy_version, i.not_before, i.not_after,
                                i.issued_at, i.revoked_at, i.revoked_reason, i.predecessor,
                                i.renewals, COALESCE(i.attestation, '{}'),
                                EXISTS (SELECT 1 FROM identities s WHERE s.predecessor = i.serial),
                                q.until,
                                t.id, t.cluster, t.role, t.max_uses, t.uses, t.not_before,
                                t.expires_at, t.issued_at, t.revoked_at
                         FROM identities i
                         JOIN tokens t ON t.id = i.token_id
                         LEFT JOIN quarantine q ON q.spiffe_id = i.spiffe_id AND q.until > ?2
                         WHERE i.serial = ?1",
                    )?
                    .query_row(params![serial, now], |row| {
                        Ok((
                            identity_from_row(row, now)?,
                            row.get::<_, u32>(14)?,
                            row.get::<_, String>(15)?,
                            row.get::<_, bool>(16)?,
                            row.get::<_, Option<u64>>(17)?,
                            token_from_columns(row, 18)?,
                        ))
                    })
                    .optional()?;
                let Some((identity, renewals, attestation, renewed, quarantined_until, token)) =
                    found
                else {
                    return Ok(None);
                };
                Ok(Some(Lineage {
                    identity,
                    renewals,
                    attestation,
                    renewed,
                    token,
                    quarantined_until,
                }))
            })
        })
    }

    fn renew(&self, record: RenewRecord) -> BoxFuture<'_, Result<RenewOutcome, StoreError>> {
        Box::pin(self.send(move |reply| Command::Renew(Box::new(record), reply)))
    }

    fn quarantined(&self, now: u64) -> BoxFuture<'_, Result<Vec<Quarantine>, StoreError>> {
        Box::pin(async move {
            self.read(|c| {
                let mut stmt = c.prepare_cached(
                    "SELECT spiffe_id, since, until, reason FROM quarantine WHERE until > ?1
                     ORDER BY until, spiffe_id",
                )?;
                let rows = stmt.query_map([now], |row| {
                    Ok(Quarantine {
                        spiffe_id: row.get(0)?,
                        since: row.get(1)?,
                        until: row.get(2)?,
                        reason: row.get(3)?,
                    })
                })?;
                rows.collect()
            })
        })
    }

    fn lift_quarantine(
        &self,
        spiffe_id: String,
        lifted_by: String,
        now: u64,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(self.send(move |reply| Command::LiftQuarantine(spiffe_id, lifted_by, now, reply)))
    }

    fn revocations_since(
        &self,
        since: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<Revoked>, StoreError>> {
        Box::pin(async move {
            self.read(|c| {
                let sql = format!(
                    "SELECT {REVOKED_COLUMNS} FROM revocations WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                );
                let mut stmt = c.prepare_cached(&sql)?;
                let rows = stmt.query_map(params![since, limit], revoked_from_row)?;
                rows.collect()
            })
        })
    }

    fn unexpired_revocations(
        &self,
        now: u64,
    ) -> BoxFuture<'_, Result<(Vec<Revoked>, u64), StoreError>> {
        Box::pin(async move {
            self.read(|c| {
                // One read transaction: the list and the head agree.
                let sql = format!(
                    "SELECT {REVOKED_COLUMNS} FROM revocations WHERE not_after > ?1 ORDER BY seq"
                );
                let tx = c.unchecked_transaction()?;
                let listed = {
                    let mut stmt = tx.prepare_cached(&sql)?;
                    let rows = stmt.query_map([now], revoked_from_row)?;
                    rows.collect::<rusqlite::Result<Vec<_>>>()?
                };
                let head = tx
                    .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM revocations")?
                    .query_row([], |row| row.get(0))?;
                tx.finish()?;
                Ok((listed, head))
            })
        })
    }

    fn revocation_head(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revocation_head.clone()
    }

    fn audit_backlog(&self) -> u64 {
        self.audit_backlog.entries()
    }

    fn expiry_summary(
        &self,
        now: u64,
        renew_remaining_percent: u8,
    ) -> BoxFuture<'_, Result<ExpirySummary, StoreError>> {
        Box::pin(async move {
            self.read(|c| {
                c.prepare_cached(
                    "SELECT MIN(i.not_after),
                            COALESCE(SUM(?1 >= i.not_after - (i.not_after - i.issued_at) * ?2 / 100), 0)
                     FROM identities i
                     WHERE i.revoked_at IS NULL AND i.not_after > ?1
                       AND NOT EXISTS (SELECT 1 FROM identities s WHERE s.predecessor = i.serial)",
                )?
                .query_row(params![now, renew_remaining_percent], |row| {
                    Ok(ExpirySummary {
                        soonest: row.get(0)?,
                        past_renewal: row.get(1)?,
                    })
                })
            })
        })
    }

    fn idempotent(
        &self,
        token: TokenId,
        key: &str,
    ) -> BoxFuture<'_, Result<Option<IdempotentResult>, StoreError>> {
        let key = key.to_string();
        Box::pin(async move {
            let row: Option<(String, String)> =
                self.read(|c| {
                    c.prepare_cached(
                    "SELECT csr_digest, response FROM idempotency WHERE token_id = ?1 AND key = ?2",
                )?
                .query_row(params![token.to_string(), key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                })?;
            row.map(|(digest, response)| Ok((digest_from_hex(&digest)?, response)))
                .transpose()
        })
    }

    fn nonce_used(&self, nonce: &str) -> BoxFuture<'_, Result<bool, StoreError>> {
        let nonce = nonce.to_string();
        Box::pin(async move {
            self.read(|c| {
                c.prepare_cached("SELECT 1 FROM used_nonces WHERE nonce = ?1")?
                    .exists([nonce])
            })
        })
    }

    fn precheck(
        &self,
        token: TokenId,
        nonce: &str,
    ) -> BoxFuture<'_, Result<(Option<TokenRecord>, bool), StoreError>> {
        let nonce = nonce.to_string();
        Box::pin(async move {
            self.read(|c| {
                let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?1");
                let record = c
                    .prepare_cached(&sql)?
                    .query_row([token.to_string()], token_from_row)
                    .optional()?;
                let used = c
                    .prepare_cached("SELECT 1 FROM used_nonces WHERE nonce = ?1")?
                    .exists([nonce])?;
                Ok((record, used))
            })
        })
    }

    fn issue(&self, record: IssueRecord) -> BoxFuture<'_, Result<IssueOutcome, StoreError>> {
        Box::pin(self.send(move |reply| Command::Issue(Box::new(record), reply)))
    }

    fn audit(&self, events: Vec<AuditEvent>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.send(move |reply| Command::Audit(events, reply)))
    }

    fn flush_audit(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            self.commands
                .send(Message::Flush(reply))
                .await
                .map_err(|_| StoreError::Closed)?;
            answer.await.map_err(|_| StoreError::Closed)?
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
            self.read(|c| {
                c.prepare_cached(
                    "SELECT MAX(not_after) FROM identities
                     WHERE (issuer = ?1 OR (?2 AND issuer IS NULL))
                       AND revoked_at IS NULL AND not_after > ?3",
                )?
                .query_row(params![issuer, with_unattributed, now], |r| r.get(0))
            })
        })
    }

    fn identities_of(&self, token: TokenId) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            self.read(|c| {
                let mut stmt = c.prepare_cached(
                    "SELECT serial FROM identities WHERE token_id = ?1 ORDER BY issued_at, serial",
                )?;
                let rows = stmt.query_map([token.to_string()], |r| r.get(0))?;
                rows.collect()
            })
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            if self.commands.is_closed() {
                return Err(StoreError::Closed);
            }
            self.read(|c| c.query_row("SELECT 1", [], |_| Ok(())))
        })
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn record_disagreement(
        &self,
        disagreement: Disagreement,
        keep: u32,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.send(move |reply| Command::Disagreement(Box::new(disagreement), keep, reply)))
    }

    fn disagreements(&self, limit: u32) -> BoxFuture<'_, Result<Vec<Disagreement>, StoreError>> {
        Box::pin(async move {
            self.read(|c| {
                let mut stmt = c.prepare_cached(
                    "SELECT seq, at, request_id, cluster, role, active_version, candidate_version,
                            active, candidate, input
                     FROM shadow_disagreements ORDER BY seq DESC LIMIT ?1",
                )?;
                let rows = stmt.query_map([limit], |r| {
                    Ok(Disagreement {
                        seq: r.get(0)?,
                        at: r.get(1)?,
                        request_id: r.get(2)?,
                        cluster: r.get(3)?,
                        role: r.get(4)?,
                        active_version: r.get(5)?,
                        candidate_version: r.get(6)?,
                        active: r.get(7)?,
                        candidate: r.get(8)?,
                        input: r.get(9)?,
                    })
                })?;
                rows.collect()
            })
        })
    }

    fn record_decisions(
        &self,
        decisions: Vec<DecisionRecord>,
        keep: u32,
        older_than: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.send(move |reply| Command::Decisions(decisions, keep, older_than, reply)))
    }

    fn decisions(
        &self,
        since: u64,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<DecisionRecord>, StoreError>> {
        Box::pin(async move {
            self.read(|c| {
                let mut stmt = c.prepare_cached(
                    "SELECT seq, at, request_id, cluster, role, policy_version, outcome, input
                     FROM decisions WHERE at >= ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                )?;
                let rows = stmt.query_map(params![since, after, limit], |r| {
                    Ok(DecisionRecord {
                        seq: r.get(0)?,
                        at: r.get(1)?,
                        request_id: r.get(2)?,
                        cluster: r.get(3)?,
                        role: r.get(4)?,
                        policy_version: r.get(5)?,
                        outcome: r.get(6)?,
                        input: r.get(7)?,
                    })
                })?;
                rows.collect()
            })
        })
    }

    fn share_policy_pin(
        &self,
        _target: Option<String>,
        _commit: Option<String>,
        _by: String,
    ) -> BoxFuture<'_, Result<Option<SharedPin>, StoreError>> {
        // One gateway: its pin is its own, kept in `active.json` by the reloader.
        Box::pin(async { Ok(None) })
    }

    fn shared_policy_pin(&self) -> Option<watch::Receiver<SharedPin>> {
        None
    }
}

/// A read-only connection to an existing database (never creates one).
fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    if !path.exists() {
        return Err(StoreError::Io(format!(
            "{}: no such database",
            path.display()
        )));
    }
    open(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
}
