//! `POST /v1/bootstrap/renew`, top to bottom (after the envelope in `api` checked the per-IP
//! and global limits and the in-flight caps and read the body): the client certificate (our
//! SVID, verified against the current bundle) → parse → the lineage on record → idempotent
//! retry → the lineage's standing (revoked, token revoked, quarantined) →
//! per-cluster limit → CSR (a new key unless the policy permits the same) → policy (kind
//! `renew`, the join's token claims and attestation, the current identity in extensions) →
//! mint under the same SPIFFE ID → one transaction that links the new identity to its
//! predecessor and audits → response.
//!
//! No token and no attestation: the certificate is the credential, and the transaction checks
//! again, atomically, everything the read-only steps checked.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use policy_sdk as sdk;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use super::join::{
    check_idempotency_key, decide, decision_event, idempotent_replay, limited, respond, unix,
};
use super::{ApiError, JoinContext, parse_json};
use crate::audit::AuditEvent;
use crate::identity::{self, ClientSvid, MintRequest, VerifiedCsr};
use crate::policy::{BoundPolicy, Grant, InvalidResult};
use crate::state::Gateway;
use crate::store::{IdentityRecord, Lineage, RenewOutcome, RenewRecord};
use crate::wire::RenewRequest;

/// Largest CSR accepted, bytes of PEM.
const MAX_CSR: usize = 16 << 10;

/// The renewal pipeline; each step refuses with a typed error the envelope audits and
/// `problem::rescue` renders.
pub(super) async fn renew(
    gw: &Gateway,
    cx: &mut JoinContext,
    body: &[u8],
    chain: Option<&[CertificateDer<'static>]>,
    client_ip: IpAddr,
) -> Result<Bytes, ApiError> {
    let presented = authenticate(gw, chain)?;
    cx.renewal = Some((
        presented.serial.to_string(),
        presented.spiffe_id.to_string(),
    ));
    let req: RenewRequest = parse_json(body)?;
    check_idempotency_key(req.idempotency_key.as_deref())?;
    let now_ms = gw.now_ms();
    let lineage = lineage(gw, cx, &presented, now_ms).await?;
    let csr = identity::verify_csr(&req.csr, MAX_CSR)?;
    let key = req.idempotency_key.as_deref();
    if let Some(earlier) = idempotent_replay(gw, cx, lineage.token.id, key, &csr).await? {
        return Ok(earlier);
    }
    standing(&lineage, &presented, now_ms)?;
    gw.limits
        .check_cluster(&lineage.identity.cluster)
        .map_err(|l| limited(gw, l))?;
    let set = gw.policies.current().ok_or(ApiError::NoPolicy)?;
    let bound = set
        .select(&lineage.identity.cluster, &lineage.identity.role)
        .ok_or(ApiError::NoPolicyBinding)?;
    cx.policy = Some(bound.provenance.clone());
    bound
        .policy
        .check_circuit()
        .map_err(ApiError::PolicyFailed)?;
    let same_key = csr.spki_der() == presented.spki_der.as_slice();
    let request = policy_request(gw, &lineage, &presented, &csr, same_key, client_ip, now_ms);
    let grant = decide(gw, cx, bound, &request).await?;
    if grant.path.as_str() != presented.spiffe_id.path().as_str() {
        let changed = InvalidResult::IdentityChanged {
            current: presented.spiffe_id.to_string(),
            granted: grant.path.as_str().to_string(),
        };
        return Err(ApiError::PolicyFailed(changed.into()));
    }
    if same_key
        && !grant
            .audit_notes
            .iter()
            .any(|note| note == sdk::KEY_REUSE_PERMITTED)
    {
        return Err(ApiError::KeyReuse);
    }
    let svid = gw.trust().active().mint(&MintRequest {
        csr: &csr,
        spiffe_id: &presented.spiffe_id,
        dns_sans: &grant.dns_sans,
        ttl: grant.ttl,
        now: SystemTime::now(),
    })?;
    record(
        gw, cx, bound, &lineage, &presented, req, &csr, &svid, &grant, now_ms,
    )
    .await
}

/// The client certificate: present, and one of our SVIDs by the bundle of this moment. A chain
/// that verified under the same bundle (sequence) is remembered by its digest, so a node
/// renewing again on its kept-alive connection skips the signature check; its validity period
/// is checked every time, and whether it was revoked is the lineage's question, asked at every
/// renewal.
fn authenticate(
    gw: &Gateway,
    chain: Option<&[CertificateDer<'static>]>,
) -> Result<ClientSvid, ApiError> {
    let chain = chain.ok_or(ApiError::ClientCertificateRequired)?;
    let trust = gw.trust();
    let mut digest = Sha256::new();
    digest.update(trust.sequence().to_be_bytes());
    for cert in chain {
        digest.update((cert.len() as u64).to_be_bytes());
        digest.update(cert.as_ref());
    }
    let key: [u8; 32] = digest.finalize().into();
    let now = SystemTime::now();
    if let Some(known) = gw.verified_clients.get(&key) {
        let now_unix = unix(now);
        if now_unix < known.not_before || now_unix >= known.not_after {
            // Outside its window now: verify afresh for the precise reason.
            gw.verified_clients.invalidate(&key);
        } else {
            return Ok(known);
        }
    }
    let verified = identity::verify_client_svid(chain, trust.roots(), &gw.trust_domain, now)?;
    gw.verified_clients.insert(key, verified.clone());
    Ok(verified)
}

/// The identity on record for the presented serial. From here on the request is tied to a
/// token, and its refusals are audited one by one.
async fn lineage(
    gw: &Gateway,
    cx: &mut JoinContext,
    presented: &ClientSvid,
    now_ms: u64,
) -> Result<Lineage, ApiError> {
    let serial = presented.serial.to_string();
    let lineage = gw
        .store
        .lineage(&serial, now_ms / 1000)
        .await?
        .ok_or(ApiError::IdentityUnknown(serial))?;
    tracing::Span::current().record("token", tracing::field::display(&lineage.token.id));
    cx.token_id = Some(lineage.token.id.to_string());
    cx.cluster = Some(lineage.identity.cluster.clone());
    cx.role = Some(lineage.identity.role.clone());
    cx.node = Some(lineage.identity.node.clone());
    Ok(lineage)
}

/// Revoked, the token revoked, quarantined: each its own refusal. (The final transaction checks
/// all of them again.) A certificate already renewed may renew again, as in SPIRE and step-ca:
/// an agent that crashed before writing its new files must not be locked out; each renewal is
/// audited with its predecessor, and revoking any certificate takes every branch below it.
fn standing(lineage: &Lineage, presented: &ClientSvid, now_ms: u64) -> Result<(), ApiError> {
    if lineage.identity.spiffe_id != presented.spiffe_id.to_string() {
        // Our CA signed a certificate whose record names another SPIFFE ID: the record wins.
        return Err(ApiError::IdentityUnknown(presented.serial.to_string()));
    }
    if lineage.identity.revoked_at.is_some() {
        return Err(ApiError::IdentityRevoked);
    }
    if lineage.token.revoked_at.is_some() {
        return Err(ApiError::TokenRevoked);
    }
    if let Some(until) = lineage.quarantined_until {
        return Err(quarantined(&presented.spiffe_id.to_string(), until, now_ms));
    }
    Ok(())
}

pub(super) fn quarantined(spiffe_id: &str, until: u64, now_ms: u64) -> ApiError {
    ApiError::Quarantined {
        spiffe_id: spiffe_id.to_string(),
        until,
        retry_after: Duration::from_millis((until * 1000).saturating_sub(now_ms)),
    }
}

/// The policy input for an issuance that continues `lineage` (a renewal, an operator's manual
/// issuance): the join's token claims, attestation and node again, the new CSR's facts, and
/// what is particular to this kind in `extensions`.
pub(super) fn lineage_request(
    gw: &Gateway,
    lineage: &Lineage,
    kind: sdk::RequestKind,
    csr: &VerifiedCsr,
    client_ip: IpAddr,
    now_ms: u64,
    extensions: Vec<sdk::Kv>,
) -> sdk::Request {
    let token = &lineage.token;
    sdk::Request {
        kind,
        token: sdk::TokenClaims {
            audit_id: token.id.to_string(),
            cluster: token.cluster.clone(),
            role: token.role.clone(),
            trust_domain: gw.trust_domain.to_string(),
            not_before: token.not_before,
            expires_at: token.expires_at,
            max_uses: token.max_uses,
            uses_left: token.max_uses.saturating_sub(token.uses),
        },
        attestation: serde_json::from_str(&lineage.attestation).unwrap_or_default(),
        csr: csr.facts().clone(),
        node_name: lineage.identity.node.clone(),
        client_address: client_ip.to_string(),
        now_ms,
        extensions,
    }
}

/// One `omnirelay.*` extension.
pub(super) fn kv(key: &str, value: String) -> sdk::Kv {
    sdk::Kv {
        key: key.into(),
        value,
    }
}

/// What the policy sees: the join's token claims and attestation, the CSR's facts, and the
/// identity being renewed in the `omnirelay.renew.*` extensions.
fn policy_request(
    gw: &Gateway,
    lineage: &Lineage,
    presented: &ClientSvid,
    csr: &VerifiedCsr,
    same_key: bool,
    client_ip: IpAddr,
    now_ms: u64,
) -> sdk::Request {
    lineage_request(
        gw,
        lineage,
        sdk::RequestKind::Renew,
        csr,
        client_ip,
        now_ms,
        vec![
            kv(sdk::EXT_NODE_BINDING, "certificate".into()),
            kv(sdk::EXT_RENEW_SPIFFE_ID, presented.spiffe_id.to_string()),
            kv(sdk::EXT_RENEW_SERIAL, presented.serial.to_string()),
            kv(sdk::EXT_RENEW_NOT_AFTER, presented.not_after.to_string()),
            kv(sdk::EXT_RENEW_COUNT, lineage.renewals.to_string()),
            kv(sdk::EXT_RENEW_SAME_KEY, same_key.to_string()),
        ],
    )
}

/// The final transaction: the successor recorded and audited, or a typed refusal with nothing
/// written (the envelope audits it with the policy's decision).
#[allow(clippy::too_many_arguments)] // The pipeline's products, each used once.
async fn record(
    gw: &Gateway,
    cx: &mut JoinContext,
    bound: &BoundPolicy,
    lineage: &Lineage,
    presented: &ClientSvid,
    req: RenewRequest,
    csr: &VerifiedCsr,
    svid: &identity::Svid,
    grant: &Grant,
    now_ms: u64,
) -> Result<Bytes, ApiError> {
    let body = serde_json::to_string(&respond(gw, bound, svid, grant)).unwrap_or_default();
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
            predecessor: presented.serial.to_string(),
            token: lineage.token.id,
            idempotency: req.idempotency_key.map(|k| (k, csr.digest())),
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
            manual: None,
        })
        .await?;
    let refusal = match outcome {
        RenewOutcome::Renewed { .. } => {
            // Counted `issued` with every answered renewal (replays too) by the caller: one
            // result per request, so the family's sum is the requests.
            cx.audited = true;
            return Ok(Bytes::from(body));
        }
        RenewOutcome::Replayed(earlier) => {
            cx.audited = true;
            return Ok(Bytes::from(earlier));
        }
        RenewOutcome::IdempotencyConflict => ApiError::IdempotencyConflict,
        RenewOutcome::Revoked => ApiError::IdentityRevoked,
        RenewOutcome::TokenRevoked => ApiError::TokenRevoked,
        RenewOutcome::Quarantined { until } => {
            quarantined(&presented.spiffe_id.to_string(), until, now_ms)
        }
        RenewOutcome::Unknown => ApiError::IdentityUnknown(presented.serial.to_string()),
    };
    cx.pending.push(decision);
    Err(refusal)
}
