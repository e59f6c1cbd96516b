//! The store's reads on PostgreSQL: each one statement (or one read-only transaction where two
//! must agree) on a pooled connection, seeing what every replica committed.

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::super::{
    ExpirySummary, IdempotentResult, IdentityFilter, IdentityState, IssuedIdentity, Lineage,
    MAX_LISTED, Quarantine, Revoked, StoreError, TokenRecord,
};
use super::connect::Db;
use super::{count, int, uint, uint_opt};
use crate::store::chain::digest_from_hex;
use crate::token::TokenId;

const TOKEN_COLUMNS: &str =
    "id, cluster, role, max_uses, uses, not_before, expires_at, issued_at, revoked_at";

const REVOKED_COLUMNS: &str = "seq, serial, spiffe_id, token_id, revoked_at, reason, not_after";

const IDENTITY_COLUMNS: &str = "i.serial, i.spiffe_id, i.token_id, i.node, i.cluster, i.role,
    i.policy_name, i.policy_version, i.not_before, i.not_after, i.issued_at, i.revoked_at,
    i.revoked_reason, i.predecessor, i.renewals";

async fn rows(db: &Db, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
    let client = db.client().await?;
    let statement = client.prepare_cached(sql).await?;
    Ok(client.query(&statement, params).await?)
}

async fn row(
    db: &Db,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>, StoreError> {
    let client = db.client().await?;
    let statement = client.prepare_cached(sql).await?;
    Ok(client.query_opt(&statement, params).await?)
}

fn token_from_row(row: &Row) -> Result<TokenRecord, StoreError> {
    let id: String = row.try_get(0)?;
    Ok(TokenRecord {
        id: TokenId::parse(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        cluster: row.try_get(1)?,
        role: row.try_get(2)?,
        max_uses: count(row, 3)?,
        uses: count(row, 4)?,
        not_before: uint(row, 5)?,
        expires_at: uint(row, 6)?,
        issued_at: uint(row, 7)?,
        revoked_at: uint_opt(row, 8)?,
    })
}

fn revoked_from_row(row: &Row) -> Result<Revoked, StoreError> {
    Ok(Revoked {
        seq: uint(row, 0)?,
        serial: row.try_get(1)?,
        spiffe_id: row.try_get(2)?,
        token_id: row.try_get(3)?,
        revoked_at: uint(row, 4)?,
        reason: row.try_get(5)?,
        not_after: uint(row, 6)?,
    })
}

fn identity_from_row(row: &Row, now: u64) -> Result<IssuedIdentity, StoreError> {
    let not_after = uint(row, 9)?;
    let revoked_at = uint_opt(row, 11)?;
    let state = match revoked_at {
        Some(_) => IdentityState::Revoked,
        None if not_after <= now => IdentityState::Expired,
        None => IdentityState::Live,
    };
    Ok(IssuedIdentity {
        serial: row.try_get(0)?,
        spiffe_id: row.try_get(1)?,
        token_id: row.try_get(2)?,
        node: row.try_get(3)?,
        cluster: row.try_get(4)?,
        role: row.try_get(5)?,
        policy_name: row.try_get(6)?,
        policy_version: row.try_get(7)?,
        not_before: uint(row, 8)?,
        not_after,
        issued_at: uint(row, 10)?,
        revoked_at,
        revoked_reason: row.try_get(12)?,
        predecessor: row.try_get(13)?,
        renewals: count(row, 14)?,
        state,
    })
}

pub(super) async fn list_tokens(db: &Db) -> Result<Vec<TokenRecord>, StoreError> {
    let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY issued_at DESC, id");
    rows(db, &sql, &[])
        .await?
        .iter()
        .map(token_from_row)
        .collect()
}

pub(super) async fn token(db: &Db, id: TokenId) -> Result<Option<TokenRecord>, StoreError> {
    let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1");
    row(db, &sql, &[&id.to_string()])
        .await?
        .as_ref()
        .map(token_from_row)
        .transpose()
}

pub(super) async fn precheck(
    db: &Db,
    token: TokenId,
    nonce: &str,
) -> Result<(Option<TokenRecord>, bool), StoreError> {
    // One round trip: the token's row (if any) beside whether the nonce was used.
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM used_nonces WHERE nonce = $2), t.*
         FROM (SELECT 1) one LEFT JOIN (SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1) t
         ON TRUE"
    );
    let found = row(db, &sql, &[&token.to_string(), &nonce])
        .await?
        .ok_or_else(|| StoreError::Corrupt("precheck returned no row".into()))?;
    let used: bool = found.try_get(0)?;
    let id: Option<String> = found.try_get(1)?;
    let record = match id {
        None => None,
        Some(_) => Some(TokenRecord {
            id: token,
            cluster: found.try_get(2)?,
            role: found.try_get(3)?,
            max_uses: count(&found, 4)?,
            uses: count(&found, 5)?,
            not_before: uint(&found, 6)?,
            expires_at: uint(&found, 7)?,
            issued_at: uint(&found, 8)?,
            revoked_at: uint_opt(&found, 9)?,
        }),
    };
    Ok((record, used))
}

pub(super) async fn nonce_used(db: &Db, nonce: &str) -> Result<bool, StoreError> {
    Ok(
        row(db, "SELECT 1 FROM used_nonces WHERE nonce = $1", &[&nonce])
            .await?
            .is_some(),
    )
}

pub(super) async fn idempotent(
    db: &Db,
    token: TokenId,
    key: &str,
) -> Result<Option<IdempotentResult>, StoreError> {
    let found = row(
        db,
        "SELECT csr_digest, response FROM idempotency WHERE token_id = $1 AND key = $2",
        &[&token.to_string(), &key],
    )
    .await?;
    found
        .map(|r| Ok((digest_from_hex(r.try_get(0)?)?, r.try_get(1)?)))
        .transpose()
}

pub(super) async fn lineage(
    db: &Db,
    serial: &str,
    now: u64,
) -> Result<Option<Lineage>, StoreError> {
    let sql = format!(
        "SELECT {IDENTITY_COLUMNS}, COALESCE(i.attestation, '{{}}'),
                EXISTS (SELECT 1 FROM identities s WHERE s.predecessor = i.serial), q.until,
                {TOKEN}
         FROM identities i
         JOIN tokens t ON t.id = i.token_id
         LEFT JOIN quarantine q ON q.spiffe_id = i.spiffe_id AND q.until > $2
         WHERE i.serial = $1",
        TOKEN = "t.id, t.cluster, t.role, t.max_uses, t.uses, t.not_before, t.expires_at,
                 t.issued_at, t.revoked_at"
    );
    let Some(found) = row(db, &sql, &[&serial, &int(now)]).await? else {
        return Ok(None);
    };
    let identity = identity_from_row(&found, now)?;
    let token_id: String = found.try_get(18)?;
    let token = TokenRecord {
        id: TokenId::parse(&token_id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        cluster: found.try_get(19)?,
        role: found.try_get(20)?,
        max_uses: count(&found, 21)?,
        uses: count(&found, 22)?,
        not_before: uint(&found, 23)?,
        expires_at: uint(&found, 24)?,
        issued_at: uint(&found, 25)?,
        revoked_at: uint_opt(&found, 26)?,
    };
    Ok(Some(Lineage {
        renewals: identity.renewals,
        attestation: found.try_get(15)?,
        renewed: found.try_get(16)?,
        quarantined_until: uint_opt(&found, 17)?,
        identity,
        token,
    }))
}

pub(super) async fn quarantined(db: &Db, now: u64) -> Result<Vec<Quarantine>, StoreError> {
    rows(
        db,
        "SELECT spiffe_id, since, until, reason FROM quarantine WHERE until > $1
         ORDER BY until, spiffe_id",
        &[&int(now)],
    )
    .await?
    .iter()
    .map(|row| {
        Ok(Quarantine {
            spiffe_id: row.try_get(0)?,
            since: uint(row, 1)?,
            until: uint(row, 2)?,
            reason: row.try_get(3)?,
        })
    })
    .collect()
}

pub(super) async fn revocations_since(
    db: &Db,
    since: u64,
    limit: u32,
) -> Result<Vec<Revoked>, StoreError> {
    let sql =
        format!("SELECT {REVOKED_COLUMNS} FROM revocations WHERE seq > $1 ORDER BY seq LIMIT $2");
    rows(db, &sql, &[&int(since), &i64::from(limit)])
        .await?
        .iter()
        .map(revoked_from_row)
        .collect()
}

pub(super) async fn unexpired_revocations(
    db: &Db,
    now: u64,
) -> Result<(Vec<Revoked>, u64), StoreError> {
    // One statement, one snapshot: the list and the head agree.
    let sql = format!(
        "SELECT {REVOKED_COLUMNS}, (SELECT COALESCE(MAX(seq), 0) FROM revocations)
         FROM revocations WHERE not_after > $1
         UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                          (SELECT COALESCE(MAX(seq), 0) FROM revocations)
         ORDER BY 1 NULLS LAST"
    );
    let found = rows(db, &sql, &[&int(now)]).await?;
    let mut listed = Vec::with_capacity(found.len());
    let mut head = 0;
    for row in &found {
        head = uint(row, 7)?;
        if row.try_get::<_, Option<i64>>(0)?.is_some() {
            listed.push(revoked_from_row(row)?);
        }
    }
    Ok((listed, head))
}

pub(super) async fn expiry_summary(
    db: &Db,
    now: u64,
    renew_remaining_percent: u8,
) -> Result<ExpirySummary, StoreError> {
    let found = row(
        db,
        "SELECT MIN(i.not_after),
                COUNT(*) FILTER (WHERE $1 >= i.not_after - (i.not_after - i.issued_at) * $2 / 100)
         FROM identities i
         WHERE i.revoked_at IS NULL AND i.not_after > $1
           AND NOT EXISTS (SELECT 1 FROM identities s WHERE s.predecessor = i.serial)",
        &[&int(now), &i64::from(renew_remaining_percent)],
    )
    .await?
    .ok_or_else(|| StoreError::Corrupt("expiry summary returned no row".into()))?;
    Ok(ExpirySummary {
        soonest: uint_opt(&found, 0)?,
        past_renewal: uint(&found, 1)?,
    })
}

pub(super) async fn latest_live_expiry(
    db: &Db,
    issuer: &str,
    with_unattributed: bool,
    now: u64,
) -> Result<Option<u64>, StoreError> {
    let found = row(
        db,
        "SELECT MAX(not_after) FROM identities
         WHERE (issuer = $1 OR ($2 AND issuer IS NULL))
           AND revoked_at IS NULL AND not_after > $3",
        &[&issuer, &with_unattributed, &int(now)],
    )
    .await?;
    match found {
        Some(r) => uint_opt(&r, 0),
        None => Ok(None),
    }
}

pub(super) async fn identities_of(db: &Db, token: TokenId) -> Result<Vec<String>, StoreError> {
    rows(
        db,
        "SELECT serial FROM identities WHERE token_id = $1 ORDER BY issued_at, serial",
        &[&token.to_string()],
    )
    .await?
    .iter()
    .map(|r| Ok(r.try_get(0)?))
    .collect()
}

pub(super) async fn identities(
    db: &Db,
    filter: &IdentityFilter,
    now: u64,
) -> Result<Vec<IssuedIdentity>, StoreError> {
    let mut sql = format!("SELECT {IDENTITY_COLUMNS} FROM identities i WHERE TRUE");
    let mut texts: Vec<(&str, String)> = Vec::new();
    let eq = [
        ("token_id", filter.token_id.map(|t| t.to_string())),
        ("spiffe_id", filter.spiffe_id.clone()),
        ("cluster", filter.cluster.clone()),
        ("role", filter.role.clone()),
        ("policy_version", filter.policy_version.clone()),
        ("serial", filter.serial.clone()),
    ];
    for (column, value) in eq {
        if let Some(value) = value {
            texts.push((column, value));
        }
    }
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    for (column, value) in texts {
        params.push(Box::new(value));
        sql.push_str(&format!(" AND i.{column} = ${}", params.len()));
    }
    match filter.state {
        Some(IdentityState::Revoked) => sql.push_str(" AND i.revoked_at IS NOT NULL"),
        Some(state) => {
            params.push(Box::new(int(now)));
            let cmp = if state == IdentityState::Live {
                ">"
            } else {
                "<="
            };
            sql.push_str(&format!(
                " AND i.revoked_at IS NULL AND i.not_after {cmp} ${}",
                params.len()
            ));
        }
        None => {}
    }
    if let Some(after) = filter.expires_after {
        params.push(Box::new(int(after)));
        sql.push_str(&format!(" AND i.not_after >= ${}", params.len()));
    }
    if let Some(before) = filter.expires_before {
        params.push(Box::new(int(before)));
        sql.push_str(&format!(" AND i.not_after < ${}", params.len()));
    }
    let limit = filter.limit.unwrap_or(MAX_LISTED).min(MAX_LISTED);
    params.push(Box::new(i64::from(limit)));
    sql.push_str(&format!(
        " ORDER BY i.issued_at DESC, i.revoked_at IS NULL DESC, i.renewals DESC, i.serial \
          LIMIT ${}",
        params.len()
    ));
    let refs: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    // Prepared once per connection and filter shape (a few dozen shapes at most).
    let found = db.read(&sql, &refs).await?;
    found.iter().map(|r| identity_from_row(r, now)).collect()
}
