//! The join's final step on PostgreSQL, one transaction: the SPIFFE ID's advisory lock (one
//! live lineage per SPIFFE ID across replicas), the idempotency key, the quarantine, the live
//! identities, the use (`UPDATE … WHERE uses < max_uses … RETURNING`), the nonce (`INSERT …
//! ON CONFLICT DO NOTHING`), the identity row, the supersession and its audit entry: three
//! statements (the lock; the quarantine with the live identities; the use, the nonce and the
//! identity row as one statement of data-modifying CTEs), pipelined in one round trip. Fewer
//! statements is what the database's CPU per join follows (each costs its bind, execution
//! and answer on both ends). A refusal rolls everything back; a key another replica committed meanwhile runs the join again, which
//! then answers with that earlier response. Also token registration and audit-only appends.

use super::super::{BoxFuture, IssueOutcome, IssueRecord, StoreError, TokenRecord};
use super::connect::{Applied, Change, NewRevocation, Tx};
use super::{int, uint};
use crate::audit::AuditEvent;

/// The issuance's statements, prepared together before they are pipelined.
const LOCK_SPIFFE_ID: &str = super::connect::LOCK_SPIFFE_ID;
const EARLIER: &str =
    "SELECT csr_digest, response FROM idempotency WHERE token_id = $1 AND key = $2";
const REMEMBER: &str = "INSERT INTO idempotency (token_id, key, csr_digest, response)
     VALUES ($1, $2, $3, $4) ON CONFLICT (token_id, key) DO NOTHING";
const QUARANTINED: &str = "SELECT until FROM quarantine WHERE spiffe_id = $1 AND until > $2";
/// The SPIFFE ID's quarantine (repeated on every row) and its live identities: one row with
/// no serial when it has none.
const STANDING: &str = "SELECT (SELECT until FROM quarantine WHERE spiffe_id = $1 AND until > $2),
         i.serial, i.token_id, i.not_after
     FROM (SELECT 1) one
     LEFT JOIN identities i ON i.spiffe_id = $1 AND i.revoked_at IS NULL AND i.not_after > $2
     ORDER BY i.issued_at, i.serial";
/// The use, the nonce and the identity row in one statement (each part runs once, whatever
/// the others found; a refusal rolls all three back): the uses after and the maximum (none
/// when no use was left), and whether the nonce was fresh.
const TAKE: &str = "WITH used AS (
         UPDATE tokens SET uses = uses + 1
         WHERE id = $1 AND uses < max_uses AND revoked_at IS NULL AND expires_at > $2
         RETURNING uses, max_uses),
     nonce AS (
         INSERT INTO used_nonces (nonce, expires_at) VALUES ($3, $4)
         ON CONFLICT (nonce) DO NOTHING RETURNING 1),
     identity AS (
         INSERT INTO identities (serial, spiffe_id, token_id, node, cluster, role, policy_name,
             policy_version, module_digest, not_before, not_after, issued_at, attestation,
             issuer)
         VALUES ($5, $6, $1, $7, $8, $9, $10, $11, $12, $13, $14, $2, $15, $16))
     SELECT (SELECT uses FROM used), (SELECT max_uses FROM used), EXISTS (SELECT 1 FROM nonce)";

/// A new token and its audit entry.
pub(super) struct Register(pub TokenRecord, pub AuditEvent);

impl Change for Register {
    type Output = ();

    fn apply<'a>(&'a self, tx: &'a mut Tx) -> BoxFuture<'a, Result<Applied<()>, StoreError>> {
        Box::pin(async move {
            let t = &self.0;
            tx.execute(
                "INSERT INTO tokens (id, cluster, role, max_uses, uses, not_before, expires_at,
                     issued_at)
                 VALUES ($1, $2, $3, $4, 0, $5, $6, $7)",
                &[
                    &t.id.to_string(),
                    &t.cluster,
                    &t.role,
                    &i64::from(t.max_uses),
                    &int(t.not_before),
                    &int(t.expires_at),
                    &int(t.issued_at),
                ],
            )
            .await?;
            tx.events.push(self.1.clone());
            Ok(Applied::Commit(()))
        })
    }
}

/// Audit entries on their own.
pub(super) struct AuditOnly(pub Vec<AuditEvent>);

impl Change for AuditOnly {
    type Output = ();

    fn apply<'a>(&'a self, tx: &'a mut Tx) -> BoxFuture<'a, Result<Applied<()>, StoreError>> {
        tx.events.extend(self.0.iter().cloned());
        Box::pin(async { Ok(Applied::Commit(())) })
    }
}

impl Change for IssueRecord {
    type Output = IssueOutcome;

    fn apply<'a>(
        &'a self,
        tx: &'a mut Tx,
    ) -> BoxFuture<'a, Result<Applied<IssueOutcome>, StoreError>> {
        Box::pin(issue(tx, self))
    }
}

async fn issue(tx: &mut Tx, r: &IssueRecord) -> Result<Applied<IssueOutcome>, StoreError> {
    let token = r.token.to_string();
    let spiffe_id = r.identity.spiffe_id.to_string();
    let idempotency = r.idempotency.as_ref();
    // Every statement an issuance needs, pipelined: sent at once (each prepared beforehand,
    // so each is sent when first polled, and polled in this order) and run by the server one
    // after the other in this order, the SPIFFE ID's lock first so that what follows waits
    // for a concurrent lineage change; their answers are read in the same order. When an
    // answer says refuse, the rollback undoes what the statements after it did, so running
    // them anyway never changes an outcome: it saves a round trip per statement.
    tx.prepare(&[LOCK_SPIFFE_ID, EARLIER, REMEMBER, STANDING, TAKE])
        .await?;
    let t: &Tx = tx;
    let (_, earlier, claimed, (quarantine, live), (used, fresh_nonce)) = tokio::try_join!(
        biased;
        t.lock_spiffe_id(&spiffe_id),
        earlier_answer(t, &token, idempotency),
        // Claimed before anything else is written: a concurrent retry with the same key waits
        // here for this outcome.
        remember(t, &token, idempotency, &r.response),
        standing(t, &spiffe_id, r.now),
        take(t, r, &token),
    )?;
    if let Some(earlier) = earlier {
        return Ok(Applied::Refuse(earlier));
    }
    if !claimed {
        return Ok(Applied::Again);
    }
    if let Some(until) = quarantine {
        return Ok(Applied::Refuse(IssueOutcome::Quarantined { until }));
    }
    if !live.is_empty() && !r.supersede {
        return Ok(Applied::Refuse(IssueOutcome::IdentityInUse));
    }
    let Some((uses, max_uses)) = used else {
        return Ok(Applied::Refuse(why_not_usable(tx, &token, r.now).await?));
    };
    if !fresh_nonce {
        // The rollback gives the use back.
        return Ok(Applied::Refuse(IssueOutcome::NonceReplayed));
    }
    supersede(tx, r, &live).await?;
    let matched_rules = match &r.decision {
        AuditEvent::PolicyDecision { matched_rules, .. } => matched_rules.clone(),
        _ => Vec::new(),
    };
    let id = &r.identity;
    tx.events.push(AuditEvent::IdentityIssued {
        request_id: r.request_id.clone(),
        token_id: token,
        spiffe_id,
        serial: id.serial.to_string(),
        node: id.node.clone(),
        not_after: id.not_after,
        uses_after: uses,
        audit_notes: r.audit_notes.clone(),
        matched_rules,
        policy: r.policy.clone(),
    });
    Ok(Applied::Commit(IssueOutcome::Issued {
        uses_left: max_uses - uses,
    }))
}

/// The earlier answer for an idempotency key: the response for the same CSR, a conflict for
/// another one.
async fn earlier_answer(
    tx: &Tx,
    token: &str,
    idempotency: Option<&(String, [u8; 32])>,
) -> Result<Option<IssueOutcome>, StoreError> {
    Ok(earlier(tx, token, idempotency)
        .await?
        .map(|(same, response)| {
            if same {
                IssueOutcome::Replayed(response)
            } else {
                IssueOutcome::IdempotencyConflict
            }
        }))
}

/// Whether an idempotency key was used before, with the same CSR, and its response.
pub(super) async fn earlier(
    tx: &Tx,
    token: &str,
    idempotency: Option<&(String, [u8; 32])>,
) -> Result<Option<(bool, String)>, StoreError> {
    let Some((key, digest)) = idempotency else {
        return Ok(None);
    };
    let row = tx.query_opt(EARLIER, &[&token, key]).await?;
    row.map(|row| {
        let earlier: String = row.try_get(0)?;
        Ok((earlier == hex::encode(digest), row.try_get(1)?))
    })
    .transpose()
}

/// Records the response under its idempotency key; false when another transaction committed
/// the same key first (this one must run again and answer with that response).
pub(super) async fn remember(
    tx: &Tx,
    token: &str,
    idempotency: Option<&(String, [u8; 32])>,
    response: &str,
) -> Result<bool, StoreError> {
    let Some((key, digest)) = idempotency else {
        return Ok(true);
    };
    Ok(tx
        .execute(REMEMBER, &[&token, key, &hex::encode(digest), &response])
        .await?
        == 1)
}

/// When `spiffe_id`'s quarantine ends, if it is quarantined at `now`.
pub(super) async fn quarantined_until(
    tx: &Tx,
    spiffe_id: &str,
    now: u64,
) -> Result<Option<u64>, StoreError> {
    let row = tx.query_opt(QUARANTINED, &[&spiffe_id, &int(now)]).await?;
    row.map(|row| uint(&row, 0)).transpose()
}

/// The SPIFFE ID's quarantine end, if it is quarantined at `now`, and the serials (with their
/// tokens and expiry) of its unrevoked, unexpired identities.
async fn standing(
    tx: &Tx,
    spiffe_id: &str,
    now: u64,
) -> Result<(Option<u64>, Vec<(String, String, u64)>), StoreError> {
    let rows = tx.query(STANDING, &[&spiffe_id, &int(now)]).await?;
    let quarantine = match rows.first() {
        Some(row) => super::uint_opt(row, 0)?,
        None => None,
    };
    let mut live = Vec::with_capacity(rows.len());
    for row in &rows {
        if let Some(serial) = row.try_get::<_, Option<String>>(1)? {
            live.push((serial, row.try_get(2)?, uint(row, 3)?));
        }
    }
    Ok((quarantine, live))
}

/// Takes one use if one is left and the token is neither revoked nor expired (a concurrent
/// join for the same token waits behind the update and then re-checks), marks the nonce used
/// and records the identity: the uses after and the maximum, and whether the nonce was fresh.
async fn take(
    tx: &Tx,
    r: &IssueRecord,
    token: &str,
) -> Result<(Option<(u32, u32)>, bool), StoreError> {
    let id = &r.identity;
    let row = tx
        .query_one(
            TAKE,
            &[
                &token,
                &int(r.now),
                &r.nonce,
                &int(r.nonce_expires_at),
                &id.serial.to_string(),
                &id.spiffe_id.to_string(),
                &id.node,
                &id.cluster,
                &id.role,
                &r.policy.name,
                &r.policy.version,
                &r.policy.module_digest,
                &int(id.not_before),
                &int(id.not_after),
                &id.attestation,
                &id.issuer,
            ],
        )
        .await?;
    // No row came back from `used`: no use was left.
    let used = if super::uint_opt(&row, 0)?.is_some() {
        Some((super::count(&row, 0)?, super::count(&row, 1)?))
    } else {
        None
    };
    Ok((used, row.try_get(2)?))
}

async fn why_not_usable(tx: &Tx, token: &str, now: u64) -> Result<IssueOutcome, StoreError> {
    let row = tx
        .query_opt(
            "SELECT revoked_at, expires_at FROM tokens WHERE id = $1",
            &[&token],
        )
        .await?;
    Ok(match row {
        Some(row) if super::uint_opt(&row, 0)?.is_some() => IssueOutcome::Revoked,
        Some(row) if now >= uint(&row, 1)? => IssueOutcome::Expired,
        _ => IssueOutcome::Exhausted,
    })
}

/// Revokes the live identities a superseding join replaces, each published and audited.
async fn supersede(
    tx: &mut Tx,
    r: &IssueRecord,
    live: &[(String, String, u64)],
) -> Result<(), StoreError> {
    let spiffe_id = r.identity.spiffe_id.to_string();
    for (serial, token_id, not_after) in live {
        tx.execute(
            "UPDATE identities SET revoked_at = $2, revoked_reason = 'superseded'
             WHERE serial = $1 AND revoked_at IS NULL",
            &[serial, &int(r.now)],
        )
        .await?;
        tx.revocations.push(NewRevocation {
            serial: serial.clone(),
            spiffe_id: spiffe_id.clone(),
            token_id: token_id.clone(),
            reason: "superseded".into(),
            not_after: *not_after,
            now: r.now,
        });
        tx.events.push(AuditEvent::IdentitySuperseded {
            request_id: r.request_id.clone(),
            spiffe_id: spiffe_id.clone(),
            serial: serial.clone(),
            token_id: token_id.clone(),
            superseded_by: r.identity.serial.to_string(),
            superseding_token_id: r.token.to_string(),
        });
    }
    Ok(())
}
