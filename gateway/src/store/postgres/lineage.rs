//! Renewal, revocation and quarantine on PostgreSQL, each one transaction. Locks are taken in
//! one order everywhere (the SPIFFE ID's advisory lock, then the token's row, then identity
//! rows, then the chain's row at commit), so replicas wait for each other instead of
//! deadlocking. A renewal holds its token's and its predecessor's rows shared: a revocation
//! racing it either runs first (and the renewal is refused) or waits for it and then takes the
//! successor too, since a revocation repeats its search until it finds nothing left.

use super::super::{
    BoxFuture, Quarantine, RenewOutcome, RenewRecord, RevokeOrder, RevokeSummary, RevokeTarget,
    StoreError,
};
use super::connect::{Applied, Change, NewRevocation, Tx};
use super::issue::{earlier, quarantined_until, remember};
use super::{count, int, uint, uint_opt};
use crate::audit::AuditEvent;

impl Change for RenewRecord {
    type Output = RenewOutcome;

    fn apply<'a>(
        &'a self,
        tx: &'a mut Tx,
    ) -> BoxFuture<'a, Result<Applied<RenewOutcome>, StoreError>> {
        Box::pin(renew(tx, self))
    }
}

async fn renew(tx: &mut Tx, r: &RenewRecord) -> Result<Applied<RenewOutcome>, StoreError> {
    let token = r.token.to_string();
    let spiffe_id = r.identity.spiffe_id.to_string();
    tx.lock_spiffe_id(&spiffe_id).await?;
    if let Some((same, response)) = earlier(tx, &token, r.idempotency.as_ref()).await? {
        return Ok(Applied::Refuse(if same {
            RenewOutcome::Replayed(response)
        } else {
            RenewOutcome::IdempotencyConflict
        }));
    }
    if !remember(tx, &token, r.idempotency.as_ref(), &r.response).await? {
        return Ok(Applied::Again);
    }
    let token_row = tx
        .query_opt(
            "SELECT revoked_at FROM tokens WHERE id = $1 FOR SHARE",
            &[&token],
        )
        .await?;
    let current = tx
        .query_opt(
            "SELECT revoked_at, renewals, COALESCE(attestation, '{}') FROM identities
             WHERE serial = $1 AND token_id = $2 FOR SHARE",
            &[&r.predecessor, &token],
        )
        .await?;
    let (Some(token_row), Some(current)) = (token_row, current) else {
        return Ok(Applied::Refuse(RenewOutcome::Unknown));
    };
    if uint_opt(&token_row, 0)?.is_some() {
        return Ok(Applied::Refuse(RenewOutcome::TokenRevoked));
    }
    if uint_opt(&current, 0)?.is_some() {
        return Ok(Applied::Refuse(RenewOutcome::Revoked));
    }
    if let Some(until) = quarantined_until(tx, &spiffe_id, r.now).await? {
        return Ok(Applied::Refuse(RenewOutcome::Quarantined { until }));
    }
    let renewals = count(&current, 1)?.saturating_add(1);
    let attestation: String = current.try_get(2)?;
    let id = &r.identity;
    tx.execute(
        "INSERT INTO identities (serial, spiffe_id, token_id, node, cluster, role, policy_name,
             policy_version, module_digest, not_before, not_after, issued_at, predecessor,
             renewals, attestation, issuer)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        &[
            &id.serial.to_string(),
            &spiffe_id,
            &token,
            &id.node,
            &id.cluster,
            &id.role,
            &r.policy.name,
            &r.policy.version,
            &r.policy.module_digest,
            &int(id.not_before),
            &int(id.not_after),
            &int(r.now),
            &r.predecessor,
            &i64::from(renewals),
            &attestation,
            &id.issuer,
        ],
    )
    .await?;
    tx.events.push(AuditEvent::IdentityRenewed {
        request_id: r.request_id.clone(),
        token_id: token,
        spiffe_id,
        serial: id.serial.to_string(),
        predecessor: r.predecessor.clone(),
        renewals,
        node: id.node.clone(),
        not_after: id.not_after,
        audit_notes: r.audit_notes.clone(),
        matched_rules: r.matched_rules.clone(),
        policy: r.policy.clone(),
        manual: r.manual.clone(),
    });
    Ok(Applied::Commit(RenewOutcome::Renewed { renewals }))
}

impl Change for RevokeOrder {
    type Output = RevokeSummary;

    fn apply<'a>(
        &'a self,
        tx: &'a mut Tx,
    ) -> BoxFuture<'a, Result<Applied<RevokeSummary>, StoreError>> {
        Box::pin(revoke(tx, self))
    }
}

/// The unrevoked identities of the target (with their SPIFFE ID, token and expiry).
const BY_TOKEN: &str = "SELECT serial, spiffe_id, token_id, not_after FROM identities
     WHERE token_id = $1 AND revoked_at IS NULL ORDER BY issued_at, serial FOR UPDATE";
const BY_SPIFFE_ID: &str = "SELECT serial, spiffe_id, token_id, not_after FROM identities
     WHERE spiffe_id = $1 AND revoked_at IS NULL ORDER BY issued_at, serial FOR UPDATE";
/// The certificate and every renewal descending from it.
const BY_SERIAL: &str = "WITH RECURSIVE descent(serial) AS (
         SELECT serial FROM identities WHERE serial = $1
         UNION ALL
         SELECT i.serial FROM identities i JOIN descent d ON i.predecessor = d.serial
     )
     SELECT i.serial, i.spiffe_id, i.token_id, i.not_after
     FROM identities i JOIN descent d ON i.serial = d.serial
     WHERE i.revoked_at IS NULL ORDER BY i.issued_at, i.serial FOR UPDATE OF i";

async fn revoke(tx: &mut Tx, order: &RevokeOrder) -> Result<Applied<RevokeSummary>, StoreError> {
    let mut summary = RevokeSummary::default();
    let mut spiffe_ids: Vec<String> = Vec::new();
    let (select, key, target) = match &order.target {
        RevokeTarget::Token(id) => {
            let id = id.to_string();
            summary.found = tx
                .query_opt("SELECT 1 FROM tokens WHERE id = $1", &[&id])
                .await?
                .is_some();
            // Before the search: a join or renewal through the token either committed (and is
            // found) or waits for this and then sees the token revoked.
            summary.token_revoked = tx
                .execute(
                    "UPDATE tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                    &[&id, &int(order.now)],
                )
                .await?
                == 1;
            if summary.token_revoked {
                tx.events.push(AuditEvent::TokenRevoked {
                    token_id: id.clone(),
                    reason: order.reason.clone(),
                    revoked_by: order.revoked_by.clone(),
                });
            }
            (BY_TOKEN, id.clone(), format!("token:{id}"))
        }
        RevokeTarget::SpiffeId(spiffe_id) => {
            tx.lock_spiffe_id(spiffe_id).await?;
            summary.found = tx
                .query_opt(
                    "SELECT 1 FROM identities WHERE spiffe_id = $1 LIMIT 1",
                    &[spiffe_id],
                )
                .await?
                .is_some();
            spiffe_ids.push(spiffe_id.clone());
            (
                BY_SPIFFE_ID,
                spiffe_id.clone(),
                format!("spiffe-id:{spiffe_id}"),
            )
        }
        RevokeTarget::Serial(serial) => {
            summary.found = tx
                .query_opt("SELECT 1 FROM identities WHERE serial = $1", &[serial])
                .await?
                .is_some();
            (BY_SERIAL, serial.clone(), format!("serial:{serial}"))
        }
    };
    // Until nothing is left: a renewal that held a victim's row committed its successor while
    // this waited for that row.
    loop {
        let victims = tx.query(select, &[&key]).await?;
        if victims.is_empty() {
            break;
        }
        for row in &victims {
            let serial: String = row.try_get(0)?;
            let spiffe_id: String = row.try_get(1)?;
            let token_id: String = row.try_get(2)?;
            revoke_one(
                tx,
                order,
                &target,
                &serial,
                &spiffe_id,
                &token_id,
                uint(row, 3)?,
            )
            .await?;
            summary.serials.push(serial);
            if !spiffe_ids.contains(&spiffe_id) {
                spiffe_ids.push(spiffe_id);
            }
        }
    }
    quarantine(tx, order, spiffe_ids, &mut summary).await?;
    Ok(Applied::Commit(summary))
}

#[allow(
    clippy::too_many_arguments,
    reason = "one victim's columns, read from one row by the caller"
)]
async fn revoke_one(
    tx: &mut Tx,
    order: &RevokeOrder,
    target: &str,
    serial: &str,
    spiffe_id: &str,
    token_id: &str,
    not_after: u64,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE identities SET revoked_at = $2, revoked_reason = $3
         WHERE serial = $1 AND revoked_at IS NULL",
        &[&serial, &int(order.now), &order.reason],
    )
    .await?;
    tx.revocations.push(NewRevocation {
        serial: serial.to_string(),
        spiffe_id: spiffe_id.to_string(),
        token_id: token_id.to_string(),
        reason: order.reason.clone(),
        not_after,
        now: order.now,
    });
    tx.events.push(AuditEvent::IdentityRevoked {
        request_id: order.request_id.clone(),
        serial: serial.to_string(),
        spiffe_id: spiffe_id.to_string(),
        token_id: token_id.to_string(),
        target: target.to_string(),
        reason: order.reason.clone(),
        revoked_by: order.revoked_by.clone(),
    });
    Ok(())
}

/// Quarantines the revoked SPIFFE IDs; a second revocation extends a quarantine, never
/// shortens it.
async fn quarantine(
    tx: &mut Tx,
    order: &RevokeOrder,
    spiffe_ids: Vec<String>,
    summary: &mut RevokeSummary,
) -> Result<(), StoreError> {
    let quarantine = order.quarantine.as_secs();
    if quarantine == 0 {
        return Ok(());
    }
    let until = order.now.saturating_add(quarantine);
    for spiffe_id in spiffe_ids {
        let row = tx
            .query_one(
                "INSERT INTO quarantine (spiffe_id, since, until, reason) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (spiffe_id) DO UPDATE SET
                     since = CASE WHEN quarantine.until > excluded.since
                                  THEN quarantine.since ELSE excluded.since END,
                     until = GREATEST(quarantine.until, excluded.until),
                     reason = excluded.reason
                 RETURNING until",
                &[&spiffe_id, &int(order.now), &int(until), &order.reason],
            )
            .await?;
        let until = uint(&row, 0)?;
        tx.events.push(AuditEvent::SpiffeIdQuarantined {
            spiffe_id: spiffe_id.clone(),
            until,
            reason: order.reason.clone(),
            by: order.revoked_by.clone(),
        });
        summary.quarantined.push(Quarantine {
            spiffe_id,
            since: order.now,
            until,
            reason: order.reason.clone(),
        });
    }
    Ok(())
}

/// Ends a SPIFFE ID's quarantine now.
pub(super) struct Lift {
    pub spiffe_id: String,
    pub lifted_by: String,
    pub now: u64,
}

impl Change for Lift {
    type Output = bool;

    fn apply<'a>(&'a self, tx: &'a mut Tx) -> BoxFuture<'a, Result<Applied<bool>, StoreError>> {
        Box::pin(async move {
            tx.lock_spiffe_id(&self.spiffe_id).await?;
            let lifted = tx
                .execute(
                    "DELETE FROM quarantine WHERE spiffe_id = $1 AND until > $2",
                    &[&self.spiffe_id, &int(self.now)],
                )
                .await?
                == 1;
            if !lifted {
                return Ok(Applied::Refuse(false));
            }
            tx.events.push(AuditEvent::QuarantineLifted {
                spiffe_id: self.spiffe_id.clone(),
                lifted_by: self.lifted_by.clone(),
            });
            Ok(Applied::Commit(true))
        })
    }
}
