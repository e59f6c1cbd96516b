//! `POST /admin/v1/identities/issue`: an operator's manual issuance, the fallback while nodes
//! cannot renew (a renewal outage), top to bottom: parse → the SPIFFE ID (ours, not under the
//! reserved path) → its newest identity on record, the lineage this continues → that lineage's
//! standing (revoked, token revoked, quarantined) → CSR → the lineage's policy, asked with kind
//! `manual` → the grant must name the SPIFFE ID asked for → mint (the operator's TTL, capped by
//! the grant) → the renewal's transaction (successor linked to its predecessor, audited with
//! who and why) → the join's response shape.
//!
//! Manual issuance never creates a second lineage, so the one-live-identity-per-SPIFFE-ID rule
//! (`identity-in-use`) cannot be bypassed with it: like a renewal, the new certificate succeeds
//! the newest one on record and the earlier one stays valid until it expires (revoke it by
//! serial to end it sooner). A revoked lineage or a quarantined SPIFFE ID is refused: such a
//! node joins again with a new token. Revoking the manual identity (by serial, SPIFFE ID or
//! the lineage's token) works as for any renewal.

use std::net::IpAddr;
use std::time::SystemTime;

use bytes::Bytes;
use policy_sdk as sdk;

use super::join::{decide, decision_event, respond, unix};
use super::renew::{kv, lineage_request, quarantined};
use super::{ApiError, JoinContext, parse_json};
use crate::audit::{AuditEvent, ManualIssuance};
use crate::identity::{self, MintRequest, SpiffeId};
use crate::policy::is_reserved_path;
use crate::state::Gateway;
use crate::store::{IdentityFilter, IdentityRecord, Lineage, RenewOutcome, RenewRecord};
use crate::wire::ManualIssueRequest;

/// Largest CSR accepted, bytes of PEM.
const MAX_CSR: usize = 16 << 10;
/// Longest operator reason accepted.
const MAX_REASON: usize = 512;

/// What is known about a manual issuance so far; its refusal's audit entry is built from it.
#[derive(Debug, Default)]
pub(super) struct ManualContext {
    /// The join-shaped context the policy steps share (request id, token, policy, decision).
    pub cx: JoinContext,
    /// The SPIFFE ID asked for, as sent.
    pub spiffe_id: String,
    /// The identity continued, once found.
    pub predecessor: Option<String>,
    /// Who and why, once parsed.
    pub manual: Option<ManualIssuance>,
}

/// The manual issuance pipeline; each step refuses with a typed error that the admin API
/// audits ([`audit_refusal`]) and `problem::rescue` renders.
pub(super) async fn issue(
    gw: &Gateway,
    mx: &mut ManualContext,
    body: &[u8],
    client_ip: IpAddr,
) -> Result<Bytes, ApiError> {
    let req: ManualIssueRequest = parse_json(body)?;
    mx.spiffe_id = crate::api::bounded(&req.spiffe_id);
    let reason = req.reason.trim();
    if reason.is_empty() || reason.len() > MAX_REASON {
        return Err(ApiError::Malformed(format!(
            "reason must be 1-{MAX_REASON} bytes"
        )));
    }
    let manual = ManualIssuance {
        by: req.issued_by.clone().unwrap_or_else(|| "admin-api".into()),
        reason: reason.to_string(),
    };
    mx.manual = Some(manual.clone());
    let spiffe_id = SpiffeId::parse(&req.spiffe_id)
        .map_err(|e| ApiError::Malformed(format!("spiffe_id: {e}")))?;
    if *spiffe_id.trust_domain() != gw.trust_domain {
        return Err(ApiError::Malformed(format!(
            "spiffe_id is not in this gateway's trust domain {}",
            gw.trust_domain
        )));
    }
    if is_reserved_path(spiffe_id.path().as_str()) {
        return Err(ApiError::ReservedSpiffeId(spiffe_id.to_string()));
    }
    if req.ttl_seconds == 0 {
        return Err(ApiError::Malformed("ttl_seconds must be positive".into()));
    }
    let now_ms = gw.now_ms();
    let lineage = newest(gw, mx, &spiffe_id, now_ms).await?;
    standing(&lineage, &spiffe_id, now_ms)?;
    let csr = identity::verify_csr(&req.csr, MAX_CSR)?;
    let set = gw.policies.current().ok_or(ApiError::NoPolicy)?;
    let bound = set
        .select(&lineage.identity.cluster, &lineage.identity.role)
        .ok_or(ApiError::NoPolicyBinding)?;
    mx.cx.policy = Some(bound.provenance.clone());
    bound
        .policy
        .check_circuit()
        .map_err(ApiError::PolicyFailed)?;
    let request = policy_request(gw, &lineage, &manual, &csr, client_ip, now_ms);
    let grant = decide(gw, &mut mx.cx, bound, &request).await?;
    if grant.path.as_str() != spiffe_id.path().as_str() {
        return Err(ApiError::ManualPathMismatch {
            requested: spiffe_id.to_string(),
            granted: grant.path.as_str().to_string(),
        });
    }
    let ttl = grant
        .ttl
        .min(std::time::Duration::from_secs(req.ttl_seconds));
    let svid = gw.trust().active().mint(&MintRequest {
        csr: &csr,
        spiffe_id: &spiffe_id,
        dns_sans: &grant.dns_sans,
        ttl,
        now: SystemTime::now(),
    })?;
    let cx = &mut mx.cx;
    let body = serde_json::to_string(&respond(gw, bound, &svid, &grant)).unwrap_or_default();
    let decision = cx
        .pending
        .pop()
        .unwrap_or_else(|| decision_event(cx, "allow", None, None, &[]));
    let matched_rules = match &decision {
        AuditEvent::PolicyDecision { matched_rules, .. } => matched_rules.clone(),
        _ => Vec::new(),
    };
    let outcome = gw
        .store
        .renew(RenewRecord {
            request_id: cx.request_id.clone(),
            predecessor: lineage.identity.serial.clone(),
            token: lineage.token.id,
            idempotency: None,
            identity: IdentityRecord {
                serial: svid.serial,
                spiffe_id: svid.spiffe_id.clone(),
                node: lineage.identity.node.clone(),
                cluster: lineage.identity.cluster.clone(),
                role: lineage.identity.role.clone(),
                not_before: unix(svid.not_before),
                not_after: unix(svid.not_after),
                attestation: lineage.attestation.clone(),
                issuer: svid.issuer.clone(),
            },
            response: body.clone(),
            policy: bound.provenance.clone(),
            audit_notes: grant.audit_notes.clone(),
            matched_rules,
            now: now_ms / 1000,
            manual: Some(manual),
        })
        .await?;
    let refusal = match outcome {
        RenewOutcome::Renewed { .. } | RenewOutcome::Replayed(_) => {
            cx.audited = true;
            gw.metrics.manual_issuances.inc();
            return Ok(Bytes::from(body));
        }
        RenewOutcome::Revoked => ApiError::IdentityRevoked,
        RenewOutcome::TokenRevoked => ApiError::TokenRevoked,
        RenewOutcome::Quarantined { until } => quarantined(&spiffe_id.to_string(), until, now_ms),
        RenewOutcome::IdempotencyConflict | RenewOutcome::Unknown => {
            ApiError::NoIdentityOnRecord(spiffe_id.to_string())
        }
    };
    cx.pending.push(decision);
    Err(refusal)
}

/// The newest identity on record with this SPIFFE ID and its lineage: what the manual
/// issuance continues.
async fn newest(
    gw: &Gateway,
    mx: &mut ManualContext,
    spiffe_id: &SpiffeId,
    now_ms: u64,
) -> Result<Lineage, ApiError> {
    let now = now_ms / 1000;
    let filter = IdentityFilter {
        spiffe_id: Some(spiffe_id.to_string()),
        limit: Some(1),
        ..IdentityFilter::default()
    };
    let newest = gw
        .store
        .identities(filter, now)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::NoIdentityOnRecord(spiffe_id.to_string()))?;
    let lineage = gw
        .store
        .lineage(&newest.serial, now)
        .await?
        .ok_or_else(|| ApiError::NoIdentityOnRecord(spiffe_id.to_string()))?;
    mx.predecessor = Some(lineage.identity.serial.clone());
    mx.cx.token_id = Some(lineage.token.id.to_string());
    mx.cx.cluster = Some(lineage.identity.cluster.clone());
    mx.cx.role = Some(lineage.identity.role.clone());
    mx.cx.node = Some(lineage.identity.node.clone());
    Ok(lineage)
}

/// Revoked, the token revoked, quarantined: each its own refusal, as for a renewal (the
/// transaction checks them again).
fn standing(lineage: &Lineage, spiffe_id: &SpiffeId, now_ms: u64) -> Result<(), ApiError> {
    if lineage.identity.revoked_at.is_some() {
        return Err(ApiError::IdentityRevoked);
    }
    if lineage.token.revoked_at.is_some() {
        return Err(ApiError::TokenRevoked);
    }
    if let Some(until) = lineage.quarantined_until {
        return Err(quarantined(&spiffe_id.to_string(), until, now_ms));
    }
    Ok(())
}

/// What the policy sees: kind `manual`, the lineage's token claims, attestation and node, the
/// CSR's facts, and who asked and why in the `omnirelay.manual.*` extensions.
fn policy_request(
    gw: &Gateway,
    lineage: &Lineage,
    manual: &ManualIssuance,
    csr: &identity::VerifiedCsr,
    client_ip: IpAddr,
    now_ms: u64,
) -> sdk::Request {
    lineage_request(
        gw,
        lineage,
        sdk::RequestKind::Manual,
        csr,
        client_ip,
        now_ms,
        vec![
            kv(sdk::EXT_NODE_BINDING, "operator".into()),
            kv(sdk::EXT_REQUEST_KIND, "manual".into()),
            kv(sdk::EXT_MANUAL_REASON, manual.reason.clone()),
            kv(sdk::EXT_MANUAL_BY, manual.by.clone()),
            kv(sdk::EXT_RENEW_SPIFFE_ID, lineage.identity.spiffe_id.clone()),
            kv(sdk::EXT_RENEW_SERIAL, lineage.identity.serial.clone()),
            kv(
                sdk::EXT_RENEW_NOT_AFTER,
                lineage.identity.not_after.to_string(),
            ),
            kv(sdk::EXT_RENEW_COUNT, lineage.renewals.to_string()),
        ],
    )
}

/// The refusal's audit entry (with the policy's decision, if it got that far), written before
/// the response: every manual issuance is an authenticated operator action, audited whatever
/// the outcome.
pub(super) async fn audit_refusal(gw: &Gateway, mx: ManualContext, error: &ApiError) {
    if mx.cx.audited {
        return;
    }
    let mut events = mx.cx.pending;
    events.push(AuditEvent::ManualIssueRefused {
        request_id: mx.cx.request_id,
        stage: error.stage().into(),
        status: error.status().as_u16(),
        reason: super::refusals::refusal_reason(error),
        spiffe_id: mx.spiffe_id,
        predecessor: mx.predecessor,
        token_id: mx.cx.token_id,
        manual: mx.manual.unwrap_or(ManualIssuance {
            by: "admin-api".into(),
            reason: String::new(),
        }),
        policy: mx.cx.policy,
    });
    if let Err(e) = gw.store.audit(events).await {
        tracing::error!(error = %e, "cannot audit a refused manual issuance");
    }
}
