//! `POST /v1/bootstrap/join`, top to bottom (after the envelope in `api` checked the global
//! and per-IP rate limits and read the body): parse → token → rate limits → token and nonce
//! pre-check → CSR proof of possession → idempotent retry → use count → policy selection and
//! evidence schema →
//! attestation → policy decision → mint → one transaction that consumes the use, records the
//! identity and audits → response.
//!
//! The CSR is parsed (and its signature checked) before attestation because `x509pop` binds
//! the device's signature to the CSR's key, and the policy sees the CSR's facts.

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use policy_sdk as sdk;

use super::wire::{JoinRequest, JoinResponse, PolicyVersion};
use super::{ApiError, JoinContext, parse_json};
use crate::app::Gateway;
use crate::attest::{Checked, Evidence};
use crate::audit::AuditEvent;
use crate::identity::{self, MintRequest, SpiffeId, Svid, VerifiedCsr};
use crate::policy::{BoundPolicy, Grant, PolicyError, Verdict};
use crate::store::{IdentityRecord, IssueOutcome, IssueRecord, TokenRecord, TokenStatus};
use crate::token::Claims;
use serde::Deserialize;

/// Largest CSR accepted, bytes of PEM.
const MAX_CSR: usize = 16 << 10;
/// Longest idempotency key.
const MAX_IDEMPOTENCY_KEY: usize = 128;

pub(super) async fn join(
    gw: &Gateway,
    cx: &mut JoinContext,
    body: &[u8],
    client_ip: IpAddr,
) -> Result<Bytes, ApiError> {
    let req: JoinRequest = parse_json(body)?;
    check_node_name(&req.node_name)?;
    check_idempotency_key(req.idempotency_key.as_deref())?;
    cx.node = Some(req.node_name.clone());
    let evidence = Evidence::deserialize(&req.attestation)
        .map_err(|e| ApiError::Malformed(format!("attestation: {e}")))?;

    let now_ms = gw.now_ms();
    let claims = gw.verifier.verify(&req.token, now_ms / 1000)?;
    tracing::Span::current().record("token", tracing::field::display(claims.id));
    cx.token_id = Some(claims.id.to_string());
    cx.cluster = Some(claims.cluster.clone());
    cx.role = Some(claims.role.clone());
    gw.limits
        .check_token(&claims.id.to_string(), &claims.cluster)
        .map_err(|l| limited(gw, l))?;
    let (record, nonce_used) = gw.store.precheck(claims.id, &evidence.nonce).await?;
    let record = record.ok_or(ApiError::TokenUnknown)?;
    if record.revoked_at.is_some() {
        return Err(ApiError::TokenRevoked);
    }

    // A retry after a lost response comes before the use count: a one-use token's only use
    // went to the request being retried, and the retry must get that answer, not a 409.
    let csr = identity::verify_csr(&req.csr, MAX_CSR)?;
    if let Some(replayed) =
        idempotent_replay(gw, cx, &claims, req.idempotency_key.as_deref(), &csr).await?
    {
        return Ok(replayed);
    }
    let uses_left = usable(record, now_ms / 1000)?;

    let set = gw.policies.current().ok_or(ApiError::NoPolicy)?;
    let bound = set
        .select(&claims.cluster, &claims.role)
        .ok_or(ApiError::NoPolicyBinding)?;
    cx.policy = Some(bound.provenance.clone());
    bound
        .check_evidence(&req.attestation)
        .map_err(ApiError::EvidenceSchema)?;
    if nonce_used {
        return Err(crate::attest::AttestError::Replayed.into());
    }
    let checked = gw
        .attestor
        .check(&evidence, &req.node_name, &csr.public_key_sha256(), now_ms)?;

    let request = policy_request(
        &claims,
        uses_left,
        &checked,
        &csr,
        &req.node_name,
        client_ip,
        now_ms,
    );
    let grant = decide(gw, cx, bound, &request).await?;

    let spiffe_id = SpiffeId::new(gw.trust_domain.clone(), grant.path.clone())
        .map_err(|e| ApiError::PolicyFailed(crate::policy::InvalidResult::Path(e).into()))?;
    let svid = gw.ca.mint(&MintRequest {
        csr: &csr,
        spiffe_id: &spiffe_id,
        dns_sans: &grant.dns_sans,
        ttl: grant.ttl,
        now: SystemTime::now(),
    })?;

    let response = respond(gw, bound, &svid, &grant);
    // Serialising strings and integers cannot fail.
    let body = serde_json::to_string(&response).unwrap_or_default();
    let outcome = gw
        .store
        .issue(IssueRecord {
            request_id: cx.request_id.clone(),
            token: claims.id,
            nonce: checked.nonce,
            nonce_expires_at: checked.nonce_expires_at,
            idempotency: req.idempotency_key.map(|k| (k, csr.digest())),
            identity: IdentityRecord {
                serial: svid.serial,
                spiffe_id: svid.spiffe_id.clone(),
                node: req.node_name,
                cluster: claims.cluster.clone(),
                role: claims.role.clone(),
                not_before: unix(svid.not_before),
                not_after: unix(svid.not_after),
            },
            response: body.clone(),
            policy: bound.provenance.clone(),
            audit_notes: grant.audit_notes.clone(),
            decision: std::mem::take(&mut cx.pending)
                .pop()
                .unwrap_or_else(|| decision_event(cx, "allow", None, None, &[])),
            client_ip: cx.client_ip.clone(),
            now: now_ms / 1000,
        })
        .await?;
    // Past this point the store has audited the outcome, whatever it is.
    cx.audited = true;
    match outcome {
        IssueOutcome::Issued { .. } => {
            gw.metrics.token_uses.inc();
            Ok(Bytes::from(body))
        }
        IssueOutcome::Replayed(earlier) => Ok(Bytes::from(earlier)),
        IssueOutcome::IdempotencyConflict => Err(ApiError::IdempotencyConflict),
        IssueOutcome::Exhausted => Err(ApiError::TokenExhausted),
        IssueOutcome::Revoked => Err(ApiError::TokenRevoked),
        IssueOutcome::Expired => Err(ApiError::Token(crate::token::TokenError::Expired {
            expires_at: claims.expires_at,
        })),
        IssueOutcome::NonceReplayed => Err(crate::attest::AttestError::Replayed.into()),
    }
}

pub(super) fn limited(gw: &Gateway, limited: crate::limits::Limited) -> ApiError {
    gw.metrics.rate_limited(limited.scope.label());
    ApiError::RateLimited(limited)
}

/// The token's registered state: revoked and exhausted tokens stop here, before any policy or
/// crypto work. (The final transaction checks again, atomically.)
fn usable(record: TokenRecord, now: u64) -> Result<u32, ApiError> {
    match record.status(now) {
        TokenStatus::Usable { uses_left } => Ok(uses_left),
        TokenStatus::Revoked => Err(ApiError::TokenRevoked),
        TokenStatus::Exhausted => Err(ApiError::TokenExhausted),
        TokenStatus::Unknown => Err(ApiError::TokenUnknown),
        TokenStatus::Expired => Err(ApiError::Token(crate::token::TokenError::Expired {
            expires_at: record.expires_at,
        })),
    }
}

/// A retry with a key we have seen: the same CSR gets the earlier answer (no second use), a
/// different CSR is a conflict.
async fn idempotent_replay(
    gw: &Gateway,
    cx: &mut JoinContext,
    claims: &Claims,
    key: Option<&str>,
    csr: &VerifiedCsr,
) -> Result<Option<Bytes>, ApiError> {
    let Some(key) = key else { return Ok(None) };
    let Some((digest, earlier)) = gw.store.idempotent(claims.id, key).await? else {
        return Ok(None);
    };
    if digest != csr.digest() {
        return Err(ApiError::IdempotencyConflict);
    }
    let serial = serde_json::from_str::<JoinResponse>(&earlier)
        .map(|r| r.serial)
        .unwrap_or_default();
    gw.store
        .audit(vec![AuditEvent::IdentityReplayed {
            request_id: cx.request_id.clone(),
            token_id: claims.id.to_string(),
            serial,
            idempotency_key: key.to_string(),
        }])
        .await?;
    Ok(Some(Bytes::from(earlier)))
}

/// Runs the policy and records its decision (committed with the issuance or the refusal).
async fn decide(
    gw: &Gateway,
    cx: &mut JoinContext,
    bound: &BoundPolicy,
    request: &sdk::Request,
) -> Result<Grant, ApiError> {
    let started = Instant::now();
    let verdict = gw.host.evaluate(&bound.policy, request).await;
    let took = started.elapsed();
    match verdict {
        Ok(Verdict::Allow(grant)) => {
            gw.metrics.policy("allow", took);
            cx.pending.push(decision_event(
                cx,
                "allow",
                None,
                None,
                &grant.matched_rules,
            ));
            Ok(grant)
        }
        Ok(Verdict::Deny(refusal)) => {
            gw.metrics.policy("deny", took);
            let event = decision_event(
                cx,
                "deny",
                Some(refusal.code.clone()),
                Some(refusal.reason.clone()),
                &[],
            );
            cx.pending.push(event);
            Err(ApiError::Denied(refusal))
        }
        Err(error) => {
            gw.metrics.policy(error.kind(), took);
            if matches!(error, PolicyError::CircuitOpen { .. }) {
                // The opening was logged and audited once; each refusal after it is routine.
                tracing::debug!(policy = %bound.provenance.name, "policy circuit open; refusing");
            } else {
                tracing::warn!(policy = %bound.provenance.name, kind = error.kind(), %error, "policy failed; refusing");
            }
            let event = decision_event(
                cx,
                "error",
                Some(error.kind().into()),
                Some(error.to_string()),
                &[],
            );
            cx.pending.push(event);
            Err(ApiError::PolicyFailed(error))
        }
    }
}

fn decision_event(
    cx: &JoinContext,
    outcome: &str,
    code: Option<String>,
    operator_reason: Option<String>,
    matched_rules: &[String],
) -> AuditEvent {
    AuditEvent::PolicyDecision {
        request_id: cx.request_id.clone(),
        token_id: cx.token_id.clone().unwrap_or_default(),
        node: cx.node.clone().unwrap_or_default(),
        outcome: outcome.into(),
        code,
        operator_reason,
        matched_rules: matched_rules.to_vec(),
        policy: cx
            .policy
            .clone()
            .unwrap_or_else(|| crate::audit::PolicyRef {
                name: String::new(),
                bundle: String::new(),
                version: String::new(),
                commit: None,
                module_digest: String::new(),
                settings_digest: String::new(),
            }),
    }
}

fn policy_request(
    claims: &Claims,
    uses_left: u32,
    checked: &Checked,
    csr: &VerifiedCsr,
    node: &str,
    client_ip: IpAddr,
    now_ms: u64,
) -> sdk::Request {
    sdk::Request {
        kind: sdk::RequestKind::Join,
        token: sdk::TokenClaims {
            audit_id: claims.id.to_string(),
            cluster: claims.cluster.clone(),
            role: claims.role.clone(),
            trust_domain: claims.audience.clone(),
            not_before: claims.not_before,
            expires_at: claims.expires_at,
            max_uses: claims.max_uses,
            uses_left,
        },
        attestation: checked.attestation.clone(),
        csr: csr.facts().clone(),
        node_name: node.to_string(),
        client_address: client_ip.to_string(),
        now_ms,
        extensions: Vec::new(),
    }
}

fn respond(gw: &Gateway, bound: &BoundPolicy, svid: &Svid, grant: &Grant) -> JoinResponse {
    let not_before = unix(svid.not_before);
    let not_after = unix(svid.not_after);
    let lifetime = not_after.saturating_sub(not_before);
    let remaining = lifetime * u64::from(gw.identity.renew_remaining_percent) / 100;
    let renew_after = match grant.renew_after {
        Some(after) => not_before + after.as_secs(),
        None => not_after - remaining,
    };
    JoinResponse {
        spiffe_id: svid.spiffe_id.to_string(),
        serial: svid.serial.to_string(),
        not_before,
        not_after,
        renew_after,
        certificate_chain: svid.cert_pem.clone(),
        bundle: String::from_utf8_lossy(&gw.bundle_pem).into_owned(),
        policy: PolicyVersion {
            name: bound.provenance.name.clone(),
            version: bound.provenance.version.clone(),
        },
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// Node names become SPIFFE path segments and log fields: DNS-label characters only.
fn check_node_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::Malformed(
            "node_name must be 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'".into(),
        ))
    }
}

fn check_idempotency_key(key: Option<&str>) -> Result<(), ApiError> {
    match key {
        Some(k)
            if k.is_empty()
                || k.len() > MAX_IDEMPOTENCY_KEY
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            Err(ApiError::Malformed(
                "idempotency_key must be 1-128 characters of A-Z, a-z, 0-9, '-', '_'".into(),
            ))
        }
        _ => Ok(()),
    }
}
