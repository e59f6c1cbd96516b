//! The PostgreSQL schema and its versions. Migrations run at start in one transaction under a
//! transaction-scoped advisory lock, so replicas starting together migrate once (the others
//! wait, then find the schema current); `schema_version` records each version applied, and a
//! database at a newer version than this binary knows is refused.

use super::super::StoreError;
use super::connect::Db;

/// The advisory lock key the migration holds (in the one-`bigint` key space; the SPIFFE ID
/// locks use the two-`int` one, so they never collide).
const MIGRATION_LOCK: i64 = 0x6f6d_6e69_7265_6c61; // "omnirela"

/// Each version's statements, in order: version `n` is `MIGRATIONS[n - 1]`.
const MIGRATIONS: &[&str] = &[
    // 1: the state the SQLite schema reached at its version 4, with an explicit position for
    // each revocation and each audit entry (given under the chain lock), and the chain's lock
    // row. Times are Unix seconds; counts and times are BIGINT.
    "CREATE TABLE tokens (
         id TEXT PRIMARY KEY,
         cluster TEXT NOT NULL,
         role TEXT NOT NULL,
         max_uses BIGINT NOT NULL,
         uses BIGINT NOT NULL DEFAULT 0,
         not_before BIGINT NOT NULL,
         expires_at BIGINT NOT NULL,
         issued_at BIGINT NOT NULL,
         revoked_at BIGINT
     );
     CREATE TABLE identities (
         serial TEXT PRIMARY KEY,
         spiffe_id TEXT NOT NULL,
         token_id TEXT NOT NULL REFERENCES tokens(id),
         node TEXT NOT NULL,
         cluster TEXT NOT NULL,
         role TEXT NOT NULL,
         policy_name TEXT NOT NULL,
         policy_version TEXT NOT NULL,
         module_digest TEXT NOT NULL,
         not_before BIGINT NOT NULL,
         not_after BIGINT NOT NULL,
         issued_at BIGINT NOT NULL,
         revoked_at BIGINT,
         revoked_reason TEXT,
         predecessor TEXT,
         renewals BIGINT NOT NULL DEFAULT 0,
         attestation TEXT,
         issuer TEXT
     );
     CREATE INDEX identities_by_token ON identities(token_id);
     CREATE INDEX identities_by_spiffe_id ON identities(spiffe_id);
     CREATE INDEX identities_by_predecessor ON identities(predecessor);
     CREATE INDEX identities_by_expiry ON identities(not_after);
     CREATE TABLE idempotency (
         token_id TEXT NOT NULL,
         key TEXT NOT NULL,
         csr_digest TEXT NOT NULL,
         response TEXT NOT NULL,
         PRIMARY KEY (token_id, key)
     );
     CREATE TABLE used_nonces (
         nonce TEXT PRIMARY KEY,
         expires_at BIGINT NOT NULL
     );
     CREATE TABLE revocations (
         seq BIGINT PRIMARY KEY,
         serial TEXT NOT NULL,
         spiffe_id TEXT NOT NULL,
         token_id TEXT NOT NULL,
         revoked_at BIGINT NOT NULL,
         reason TEXT NOT NULL,
         not_after BIGINT NOT NULL
     );
     CREATE INDEX revocations_by_expiry ON revocations(not_after);
     CREATE TABLE quarantine (
         spiffe_id TEXT PRIMARY KEY,
         since BIGINT NOT NULL,
         until BIGINT NOT NULL,
         reason TEXT NOT NULL
     );
     CREATE TABLE audit (
         seq BIGINT PRIMARY KEY,
         hash TEXT NOT NULL,
         line TEXT NOT NULL,
         checkpoint BOOLEAN NOT NULL DEFAULT FALSE,
         appended_at BIGINT NOT NULL
     );
     CREATE INDEX audit_checkpoints ON audit(seq) WHERE checkpoint;
     CREATE TABLE audit_chain (id INTEGER PRIMARY KEY CHECK (id = 1));
     INSERT INTO audit_chain (id) VALUES (1);",
    // 2: decisions on which the shadow candidate policy disagreed with the active one, bounded
    // in rows by each insert's transaction.
    "CREATE TABLE shadow_disagreements (
         seq BIGSERIAL PRIMARY KEY,
         at BIGINT NOT NULL,
         request_id TEXT NOT NULL,
         cluster TEXT NOT NULL,
         role TEXT NOT NULL,
         active_version TEXT NOT NULL,
         candidate_version TEXT NOT NULL,
         active TEXT NOT NULL,
         candidate TEXT NOT NULL,
         input TEXT NOT NULL
     );",
    // 3: live decisions kept for replay, bounded in rows and by age by each insert's
    // transaction.
    "CREATE TABLE decisions (
         seq BIGSERIAL PRIMARY KEY,
         at BIGINT NOT NULL,
         request_id TEXT NOT NULL,
         cluster TEXT NOT NULL,
         role TEXT NOT NULL,
         policy_version TEXT NOT NULL,
         outcome TEXT NOT NULL,
         input TEXT NOT NULL
     );
     CREATE INDEX decisions_by_time ON decisions(at);",
    // 4: the policy pin every replica follows; `generation` grows with every pin and unpin.
    "CREATE TABLE policy_pin (
         id INTEGER PRIMARY KEY CHECK (id = 1),
         generation BIGINT NOT NULL,
         target TEXT,
         commit_id TEXT,
         set_by TEXT NOT NULL,
         set_at BIGINT NOT NULL
     );
     INSERT INTO policy_pin VALUES (1, 0, NULL, NULL, '', 0);",
    // 5: one audit chain per replica process instead of one for all under one row lock. The
    // entries written before become chain 0; `audit_chain`'s row now only orders revocation
    // feed positions.
    "CREATE TABLE audit_chains (
         id BIGSERIAL PRIMARY KEY,
         replica TEXT NOT NULL,
         opened_at BIGINT NOT NULL
     );
     INSERT INTO audit_chains (id, replica, opened_at)
         SELECT 0, 'the shared chain of schema 1 to 4', 0 WHERE EXISTS (SELECT 1 FROM audit);
     ALTER TABLE audit ADD COLUMN chain BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE audit DROP CONSTRAINT audit_pkey;
     ALTER TABLE audit ADD PRIMARY KEY (chain, seq);
     DROP INDEX audit_checkpoints;
     CREATE INDEX audit_checkpoints ON audit(chain, seq) WHERE checkpoint;",
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings the schema to [`SCHEMA_VERSION`], once, whichever replica gets the lock first.
pub(super) async fn migrate(db: &Db) -> Result<(), StoreError> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let found: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
        .await?
        .try_get(0)?;
    let found = u32::try_from(found).unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (version, migration) in (1..).zip(MIGRATIONS).skip(found as usize) {
        tx.batch_execute(migration).await?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&version],
        )
        .await?;
        tracing::info!(version, "store: PostgreSQL schema migrated");
    }
    tx.commit().await?;
    Ok(())
}
