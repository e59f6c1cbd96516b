//! The writes of an identity's life after its join, each run inside the writer's transaction:
//! a renewal appends a successor to a lineage (same token, same SPIFFE ID); a revocation takes
//! back a token's, a SPIFFE ID's or a certificate's whole lineage, publishes each certificate
//! to the revocation feed (the CRL's source) and quarantines the SPIFFE IDs; a quarantine can be
//! lifted. A lineage is the set of identities sharing a token: renewals keep the token of the
//! join they descend from, and `predecessor` links each to the certificate it replaced.

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    IdentityRecord, Quarantine, RenewOutcome, RenewRecord, RevokeOrder, RevokeSummary,
    RevokeTarget, StoreError,
};
use crate::audit::{AuditEvent, PolicyRef};

/// When `spiffe_id`'s quarantine ends, if it is quarantined at `now`.
pub(super) fn quarantined_until(
    tx: &Connection,
    spiffe_id: &str,
    now: u64,
) -> Result<Option<u64>, StoreError> {
    Ok(tx
        .prepare_cached("SELECT until FROM quarantine WHERE spiffe_id = ?1 AND until > ?2")?
        .query_row(params![spiffe_id, now], |row| row.get(0))
        .optional()?)
}

/// Publishes a revoked certificate to the feed (and so to the CRL).
pub(super) fn publish(
    tx: &Connection,
    serial: &str,
    spiffe_id: &str,
    token_id: &str,
    reason: &str,
    not_after: u64,
    now: u64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO revocations (serial, spiffe_id, token_id, revoked_at, reason, not_after)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![serial, spiffe_id, token_id, now, reason, not_after])?;
    Ok(())
}

/// The final step of a renewal: the presented certificate must still be unrevoked, its
/// lineage's token unrevoked and its SPIFFE ID not quarantined; then the successor is recorded
/// and audited. A refusal writes nothing.
pub(super) fn renew(
    tx: &Connection,
    r: &RenewRecord,
    events: &mut Vec<AuditEvent>,
) -> Result<RenewOutcome, StoreError> {
    let token = r.token.to_string();
    if let Some((key, digest)) = &r.idempotency {
        let earlier: Option<(String, String)> = tx
            .prepare_cached(
                "SELECT csr_digest, response FROM idempotency WHERE token_id = ?1 AND key = ?2",
            )?
            .query_row(params![token, key], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        if let Some((earlier_digest, response)) = earlier {
            return Ok(if earlier_digest == hex::encode(digest) {
                RenewOutcome::Replayed(response)
            } else {
                RenewOutcome::IdempotencyConflict
            });
        }
    }
    // The predecessor, its token and its SPIFFE ID's quarantine in one statement.
    let current = tx
        .prepare_cached(
            "SELECT i.revoked_at, i.renewals, COALESCE(i.attestation, '{}'), t.revoked_at,
                    q.until
             FROM identities i JOIN tokens t ON t.id = i.token_id
             LEFT JOIN quarantine q ON q.spiffe_id = i.spiffe_id AND q.until > ?3
             WHERE i.serial = ?1 AND i.token_id = ?2",
        )?
        .query_row(params![r.predecessor, token, r.now], |row| {
            Ok(Predecessor {
                revoked_at: row.get(0)?,
                renewals: row.get(1)?,
                attestation: row.get(2)?,
                token_revoked_at: row.get(3)?,
                quarantined_until: row.get(4)?,
            })
        })
        .optional()?;
    let Some(Predecessor {
        revoked_at,
        renewals,
        attestation,
        token_revoked_at,
        quarantined_until: quarantined,
    }) = current
    else {
        return Ok(RenewOutcome::Unknown);
    };
    if token_revoked_at.is_some() {
        return Ok(RenewOutcome::TokenRevoked);
    }
    if revoked_at.is_some() {
        return Ok(RenewOutcome::Revoked);
    }
    if let Some(until) = quarantined {
        return Ok(RenewOutcome::Quarantined { until });
    }
    let spiffe_id = r.identity.spiffe_id.to_string();
    let renewals = renewals.saturating_add(1);
    let id = &r.identity;
    insert_identity(
        tx,
        &NewIdentity {
            identity: id,
            token: &token,
            policy: &r.policy,
            now: r.now,
            predecessor: Some(&r.predecessor),
            renewals,
            attestation: &attestation,
            idempotency: r.idempotency.as_ref(),
            response: &r.response,
        },
    )?;
    events.push(AuditEvent::IdentityRenewed {
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
    Ok(RenewOutcome::Renewed { renewals })
}

/// What a renewal's transaction reads about the certificate it renews.
struct Predecessor {
    revoked_at: Option<u64>,
    renewals: u32,
    attestation: String,
    token_revoked_at: Option<u64>,
    quarantined_until: Option<u64>,
}

/// An identity row about to be written: a join's (no predecessor) or a renewal's.
pub(super) struct NewIdentity<'a> {
    pub identity: &'a IdentityRecord,
    pub token: &'a str,
    pub policy: &'a PolicyRef,
    pub now: u64,
    pub predecessor: Option<&'a str>,
    pub renewals: u32,
    pub attestation: &'a str,
    /// The client's idempotency key and CSR digest, remembered with `response`.
    pub idempotency: Option<&'a (String, [u8; 32])>,
    pub response: &'a str,
}

/// Writes the identity row, and the response an idempotent retry gets back.
pub(super) fn insert_identity(tx: &Connection, row: &NewIdentity<'_>) -> Result<(), StoreError> {
    let id = row.identity;
    tx.prepare_cached(
        "INSERT INTO identities (serial, spiffe_id, token_id, node, cluster, role, policy_name,
             policy_version, module_digest, not_before, not_after, issued_at, predecessor,
             renewals, attestation, issuer)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
    )?
    .execute(params![
        id.serial.to_string(),
        id.spiffe_id.to_string(),
        row.token,
        id.node,
        id.cluster,
        id.role,
        row.policy.name,
        row.policy.version,
        row.policy.module_digest,
        id.not_before,
        id.not_after,
        row.now,
        row.predecessor,
        row.renewals,
        row.attestation,
        id.issuer,
    ])?;
    if let Some((key, digest)) = row.idempotency {
        tx.prepare_cached(
            "INSERT INTO idempotency (token_id, key, csr_digest, response) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![row.token, key, hex::encode(digest), row.response])?;
    }
    Ok(())
}

/// An operator's revocation, all of it in the caller's savepoint: the token (when the target is
/// one), every unrevoked identity of the target's lineage, their feed entries, the quarantines,
/// and an audit entry for each.
pub(super) fn revoke(
    tx: &Connection,
    order: &RevokeOrder,
    events: &mut Vec<AuditEvent>,
) -> Result<RevokeSummary, StoreError> {
    let mut summary = RevokeSummary::default();
    let (select, key, target) = match &order.target {
        RevokeTarget::Token(id) => {
            let id = id.to_string();
            summary.found = tx
                .prepare_cached("SELECT 1 FROM tokens WHERE id = ?1")?
                .exists([&id])?;
            summary.token_revoked = tx
                .prepare_cached(
                    "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                )?
                .execute(params![id, order.now])?
                == 1;
            if summary.token_revoked {
                events.push(AuditEvent::TokenRevoked {
                    token_id: id.clone(),
                    reason: order.reason.clone(),
                    revoked_by: order.revoked_by.clone(),
                });
            }
            (
                "SELECT serial, spiffe_id, token_id, not_after FROM identities
                 WHERE token_id = ?1 AND revoked_at IS NULL ORDER BY issued_at, serial",
                id.clone(),
                format!("token:{id}"),
            )
        }
        RevokeTarget::SpiffeId(spiffe_id) => (
            "SELECT serial, spiffe_id, token_id, not_after FROM identities
             WHERE spiffe_id = ?1 AND revoked_at IS NULL ORDER BY issued_at, serial",
            spiffe_id.clone(),
            format!("spiffe-id:{spiffe_id}"),
        ),
        RevokeTarget::Serial(serial) => (
            // The certificate and every renewal descending from it.
            "WITH RECURSIVE descent(serial) AS (
                 SELECT serial FROM identities WHERE serial = ?1
                 UNION ALL
                 SELECT i.serial FROM identities i JOIN descent d ON i.predecessor = d.serial
             )
             SELECT i.serial, i.spiffe_id, i.token_id, i.not_after
             FROM identities i JOIN descent d ON i.serial = d.serial
             WHERE i.revoked_at IS NULL ORDER BY i.issued_at, i.serial",
            serial.clone(),
            format!("serial:{serial}"),
        ),
    };
    let victims: Vec<(String, String, String, u64)> = {
        let mut stmt = tx.prepare_cached(select)?;
        let rows = stmt.query_map([&key], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })?;
        rows.collect::<Result<_, _>>()?
    };
    let mut spiffe_ids: Vec<String> = Vec::new();
    if let RevokeTarget::SpiffeId(spiffe_id) = &order.target {
        summary.found = tx
            .prepare_cached("SELECT 1 FROM identities WHERE spiffe_id = ?1")?
            .exists([spiffe_id])?;
        spiffe_ids.push(spiffe_id.clone());
    }
    if let RevokeTarget::Serial(serial) = &order.target {
        summary.found = tx
            .prepare_cached("SELECT 1 FROM identities WHERE serial = ?1")?
            .exists([serial])?;
    }
    for (serial, spiffe_id, token_id, not_after) in victims {
        tx.prepare_cached(
            "UPDATE identities SET revoked_at = ?2, revoked_reason = ?3
             WHERE serial = ?1 AND revoked_at IS NULL",
        )?
        .execute(params![serial, order.now, order.reason])?;
        publish(
            tx,
            &serial,
            &spiffe_id,
            &token_id,
            &order.reason,
            not_after,
            order.now,
        )?;
        events.push(AuditEvent::IdentityRevoked {
            request_id: order.request_id.clone(),
            serial: serial.clone(),
            spiffe_id: spiffe_id.clone(),
            token_id,
            target: target.clone(),
            reason: order.reason.clone(),
            revoked_by: order.revoked_by.clone(),
        });
        summary.serials.push(serial);
        if !spiffe_ids.contains(&spiffe_id) {
            spiffe_ids.push(spiffe_id);
        }
    }
    let quarantine = order.quarantine.as_secs();
    if quarantine > 0 {
        let until = order.now.saturating_add(quarantine);
        for spiffe_id in spiffe_ids {
            // A second revocation extends a quarantine, never shortens it.
            let until: u64 = tx
                .prepare_cached(
                    "INSERT INTO quarantine (spiffe_id, since, until, reason) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (spiffe_id) DO UPDATE SET
                         since = CASE WHEN until > excluded.since THEN since ELSE excluded.since END,
                         until = MAX(until, excluded.until),
                         reason = excluded.reason
                     RETURNING until",
                )?
                .query_row(params![spiffe_id, order.now, until, order.reason], |row| {
                    row.get(0)
                })?;
            events.push(AuditEvent::SpiffeIdQuarantined {
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
    }
    Ok(summary)
}

/// Ends a quarantine now; false when `spiffe_id` was not quarantined.
pub(super) fn lift(
    tx: &Connection,
    spiffe_id: &str,
    lifted_by: &str,
    now: u64,
    events: &mut Vec<AuditEvent>,
) -> Result<bool, StoreError> {
    let lifted = tx
        .prepare_cached("DELETE FROM quarantine WHERE spiffe_id = ?1 AND until > ?2")?
        .execute(params![spiffe_id, now])?
        == 1;
    if lifted {
        events.push(AuditEvent::QuarantineLifted {
            spiffe_id: spiffe_id.to_string(),
            lifted_by: lifted_by.to_string(),
        });
    }
    Ok(lifted)
}
