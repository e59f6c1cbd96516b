//! `POST /v1/bootstrap/join`, top to bottom (after the envelope in `api` checked the global
//! and per-IP rate limits and read the body): parse → token → rate limits → the policy's
//! breaker → token and nonce pre-check → CSR proof of possession → idempotent retry → use
//! count → policy selection and evidence schema → attestation → policy decision → mint → one
//! transaction that consumes the use, records the identity and audits → response.
//!
//! The CSR is parsed (and its signature checked) before attestation because `x509pop` binds
//! the device's signature to the CSR's key, and the policy sees the CSR's facts.

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use policy_sdk as sdk;

use super::{ApiError, JoinContext, parse_json};
use crate::attest::{Checked, Evidence};
use crate::audit::AuditEvent;
use crate::identity::{self, MintRequest, SpiffeId, Svid, VerifiedCsr};
use crate::policy::{BoundPolicy, Grant, PolicyError, PolicySet, Verdict};
use crate::state::Gateway;
use crate::store::{IdentityRecord, IssueOutcome, IssueRecord, TokenRecord, TokenStatus};
use crate::token::{Claims, NODE_NAME_RULE, TokenId, is_node_name};
use crate::wire::{JoinRequest, JoinResponse, PolicyVersion};
use serde::Deserialize;

/// Largest CSR accepted, bytes of PEM.
const MAX_CSR: usize = 16 << 10;
/// Longest idempotency key.
const MAX_IDEMPOTENCY_KEY: usize = 128;

/// The join pipeline. Each step is a named function below; each refuses with a typed error
/// that `problem::rescue` turns into the response and the envelope audits.
pub(super) async fn join(
    gw: &Gateway,
    cx: &mut JoinContext,
    body: &[u8],
    client_ip: IpAddr,
) -> Result<Bytes, ApiError> {
    let (req, evidence) = parse_request(cx, body)?;
    let now_ms = gw.now_ms();
    let claims = authenticate(gw, cx, &req, now_ms)?;
    // The policy set this join is decided by (a reload after this point does not change it).
    let set = gw.policies.current();
    refuse_if_circuit_open(gw, cx, set.as_deref(), &claims)?;
    let (token, nonce_used) = registered(gw, &claims, &evidence).await?;
    // A retry after a lost response comes before the use count: a one-use token's only use
    // went to the request being retried, and the retry must get that answer, not a 409.
    let csr = identity::verify_csr(&req.csr, MAX_CSR)?;
    let key = req.idempotency_key.as_deref();
    if let Some(earlier) = idempotent_replay(gw, cx, claims.id, key, &csr).await? {
        return Ok(earlier);
    }
    let uses_left = usable(token, now_ms / 1000)?;
    let set = set.ok_or(ApiError::NoPolicy)?;
    let bound = select_policy(cx, &set, &claims, &req)?;
    let checked = attest(gw, &req, &evidence, &csr, nonce_used, now_ms)?;
    let request = policy_request(&claims, uses_left, &checked, &csr, &req, client_ip, now_ms);
    let grant = decide(gw, cx, bound, &request).await?;
    let svid = mint(gw, &csr, &grant)?;
    record(
        gw, cx, bound, &claims, req, &csr, checked, &svid, &grant, now_ms,
    )
    .await
}

/// The body: JSON of the expected shape, a valid node name and idempotency key, evidence of a
/// known kind.
fn parse_request(cx: &mut JoinContext, body: &[u8]) -> Result<(JoinRequest, Evidence), ApiError> {
    let req: JoinRequest = parse_json(body)?;
    if !is_node_name(&req.node_name) {
        return Err(ApiError::Malformed(format!("node_name {NODE_NAME_RULE}")));
    }
    check_idempotency_key(req.idempotency_key.as_deref())?;
    cx.node = Some(req.node_name.clone());
    let evidence = Evidence::deserialize(&req.attestation)
        .map_err(|e| ApiError::Malformed(format!("attestation: {e}")))?;
    Ok((req, evidence))
}

/// The token: signature, time window and audience (no database), the per-token and
/// per-cluster limits, the node it is bound to.
fn authenticate(
    gw: &Gateway,
    cx: &mut JoinContext,
    req: &JoinRequest,
    now_ms: u64,
) -> Result<Claims, ApiError> {
    let claims = gw.verifier.verify(&req.token, now_ms / 1000)?;
    tracing::Span::current().record("token", tracing::field::display(claims.id));
    cx.token_id = Some(claims.id.to_string());
    cx.cluster = Some(claims.cluster.clone());
    cx.role = Some(claims.role.clone());
    gw.limits
        .check_token(&claims.id.to_string(), &claims.cluster)
        .map_err(|l| limited(gw, l))?;
    if let Some(bound) = &claims.node
        && *bound != req.node_name
    {
        return Err(ApiError::NodeMismatch {
            bound: bound.clone(),
        });
    }
    Ok(claims)
}

/// The token's registered state and whether the nonce was consumed, in one read.
async fn registered(
    gw: &Gateway,
    claims: &Claims,
    evidence: &Evidence,
) -> Result<(TokenRecord, bool), ApiError> {
    let (record, nonce_used) = gw.store.precheck(claims.id, &evidence.nonce).await?;
    let record = record.ok_or(ApiError::TokenUnknown)?;
    if record.revoked_at.is_some() {
        return Err(ApiError::TokenRevoked);
    }
    Ok((record, nonce_used))
}

/// A join whose policy's circuit breaker is open is refused before the database read, the
/// CSR check and the attestation: they would be wasted on a decision that fails fast anyway
/// (measured: callers hammering a broken policy otherwise cost the other clusters a CSR
/// verification each).
fn refuse_if_circuit_open(
    gw: &Gateway,
    cx: &mut JoinContext,
    set: Option<&PolicySet>,
    claims: &Claims,
) -> Result<(), ApiError> {
    let Some(set) = set else {
        return Ok(());
    };
    let Some(bound) = set.select(&claims.cluster, &claims.role) else {
        return Ok(());
    };
    bound.policy.check_circuit().map_err(|open| {
        gw.metrics.policy(open.kind(), Duration::ZERO);
        cx.policy = Some(bound.provenance.clone());
        ApiError::PolicyFailed(open)
    })
}

/// The policy that decides for the token's cluster and role, and its evidence schema.
fn select_policy<'s>(
    cx: &mut JoinContext,
    set: &'s PolicySet,
    claims: &Claims,
    req: &JoinRequest,
) -> Result<&'s BoundPolicy, ApiError> {
    let bound = set
        .select(&claims.cluster, &claims.role)
        .ok_or(ApiError::NoPolicyBinding)?;
    cx.policy = Some(bound.provenance.clone());
    bound
        .check_evidence(&req.attestation)
        .map_err(ApiError::EvidenceSchema)?;
    Ok(bound)
}

/// The evidence: nonce (not consumed by any join), freshness, and under `x509pop` the device
/// signature, which also binds the node name to the device.
fn attest(
    gw: &Gateway,
    req: &JoinRequest,
    evidence: &Evidence,
    csr: &VerifiedCsr,
    nonce_used: bool,
    now_ms: u64,
) -> Result<Checked, ApiError> {
    if nonce_used {
        return Err(crate::attest::AttestError::Replayed.into());
    }
    Ok(gw
        .attestor
        .check(evidence, &req.node_name, &csr.public_key_sha256(), now_ms)?)
}

/// The certificate for the grant: our trust domain plus the checked path, the CSR's key.
fn mint(gw: &Gateway, csr: &VerifiedCsr, grant: &Grant) -> Result<Svid, ApiError> {
    let spiffe_id = SpiffeId::new(gw.trust_domain.clone(), grant.path.clone())
        .map_err(|e| ApiError::PolicyFailed(crate::policy::InvalidResult::Path(e).into()))?;
    Ok(gw.trust().active().mint(&MintRequest {
        csr,
        spiffe_id: &spiffe_id,
        dns_sans: &grant.dns_sans,
        ttl: grant.ttl,
        now: SystemTime::now(),
    })?)
}

/// The final transaction: consume the use, record the identity (superseding a live one only
/// when the token allows), audit, then answer. A refusal here keeps the policy's decision
/// pending so the envelope audits it with the refusal.
#[allow(clippy::too_many_arguments)] // The pipeline's products, each used once.
async fn record(
    gw: &Gateway,
    cx: &mut JoinContext,
    bound: &BoundPolicy,
    claims: &Claims,
    req: JoinRequest,
    csr: &VerifiedCsr,
    checked: Checked,
    svid: &Svid,
    grant: &Grant,
    now_ms: u64,
) -> Result<Bytes, ApiError> {
    let response = respond(gw, bound, svid, grant);
    // Serialising strings and integers cannot fail.
    let body = serde_json::to_string(&response).unwrap_or_default();
    let decision = cx
        .pending
        .pop()
        .unwrap_or_else(|| decision_event(cx, "allow", None, None, &[]));
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
                // Serialising strings, integers and enums cannot fail.
                attestation: serde_json::to_string(&checked.attestation).unwrap_or_default(),
                issuer: svid.issuer.clone(),
            },
            response: body.clone(),
            policy: bound.provenance.clone(),
            audit_notes: grant.audit_notes.clone(),
            decision: decision.clone(),
            supersede: claims.supersede,
            now: now_ms / 1000,
        })
        .await?;
    let refusal = match outcome {
        IssueOutcome::Issued { .. } => {
            // The store audited the issuance with the decision.
            cx.audited = true;
            gw.metrics.token_uses.inc();
            return Ok(Bytes::from(body));
        }
        IssueOutcome::Replayed(earlier) => {
            cx.audited = true;
            return Ok(Bytes::from(earlier));
        }
        IssueOutcome::IdempotencyConflict => ApiError::IdempotencyConflict,
        IssueOutcome::Exhausted => ApiError::TokenExhausted,
        IssueOutcome::Revoked => ApiError::TokenRevoked,
        IssueOutcome::Expired => ApiError::Token(crate::token::TokenError::Expired {
            expires_at: claims.expires_at,
        }),
        IssueOutcome::NonceReplayed => crate::attest::AttestError::Replayed.into(),
        IssueOutcome::IdentityInUse => ApiError::IdentityInUse {
            spiffe_id: svid.spiffe_id.to_string(),
        },
        IssueOutcome::Quarantined { until } => {
            super::renew::quarantined(&svid.spiffe_id.to_string(), until, now_ms)
        }
    };
    // Nothing was written: the certificate is discarded, and the refusal audited with the
    // policy's decision by the envelope.
    cx.pending.push(decision);
    Err(refusal)
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

/// A retry with a key we have seen (under the token of the join or of the renewal's lineage):
/// the same CSR gets the earlier answer (nothing consumed or issued again), a different CSR is
/// a conflict.
pub(super) async fn idempotent_replay(
    gw: &Gateway,
    cx: &JoinContext,
    token: TokenId,
    key: Option<&str>,
    csr: &VerifiedCsr,
) -> Result<Option<Bytes>, ApiError> {
    let Some(key) = key else {
        return Ok(None);
    };
    let Some((digest, earlier)) = gw.store.idempotent(token, key).await? else {
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
            token_id: token.to_string(),
            serial,
            idempotency_key: key.to_string(),
        }])
        .await?;
    Ok(Some(Bytes::from(earlier)))
}

/// Runs the policy and records its decision (committed with the issuance or the refusal). A
/// grant of a DNS name outside the binding's suffixes or of one of the gateway's own names is
/// the policy's error, like any invalid result.
pub(super) async fn decide(
    gw: &Gateway,
    cx: &mut JoinContext,
    bound: &BoundPolicy,
    request: &sdk::Request,
) -> Result<Grant, ApiError> {
    let started = Instant::now();
    let verdict = gw
        .host
        .evaluate(&bound.policy, request)
        .await
        .and_then(|v| match v {
            Verdict::Allow(grant) => match bound.admit(&grant, &gw.reserved_dns) {
                Ok(()) => Ok(Verdict::Allow(grant)),
                Err(invalid) => Err(invalid.into()),
            },
            deny => Ok(deny),
        });
    let took = started.elapsed();
    if let Some(shadow) = &gw.shadow {
        shadow.offer(&cx.request_id, request, &verdict, &bound.provenance.version);
    }
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

pub(super) fn decision_event(
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

/// What the policy sees. The node-binding facts travel as extensions (see
/// `policy_sdk::EXT_NODE_BINDING`): how `node-name` was bound, and the token's bound node.
fn policy_request(
    claims: &Claims,
    uses_left: u32,
    checked: &Checked,
    csr: &VerifiedCsr,
    req: &JoinRequest,
    client_ip: IpAddr,
    now_ms: u64,
) -> sdk::Request {
    let binding = if checked.attestation.kind == sdk::AttestationKind::X509pop {
        "device"
    } else if claims.node.is_some() {
        "token"
    } else {
        "none"
    };
    let kv = |key: &str, value: &str| sdk::Kv {
        key: key.into(),
        value: value.into(),
    };
    let mut extensions = vec![kv(sdk::EXT_NODE_BINDING, binding)];
    if let Some(node) = &claims.node {
        extensions.push(kv(sdk::EXT_TOKEN_NODE, node));
    }
    if claims.supersede {
        extensions.push(kv(sdk::EXT_SUPERSEDE, "true"));
    }
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
        node_name: req.node_name.clone(),
        client_address: client_ip.to_string(),
        now_ms,
        extensions,
    }
}

pub(super) fn respond(
    gw: &Gateway,
    bound: &BoundPolicy,
    svid: &Svid,
    grant: &Grant,
) -> JoinResponse {
    let not_before = unix(svid.not_before);
    let not_after = unix(svid.not_after);
    // Counted from the issuance, not from the backdated notBefore: with short lifetimes the
    // backdating would otherwise put the renewal point in the past.
    let issued = not_before + crate::identity::LEAF_CLOCK_SKEW.as_secs();
    let lifetime = not_after.saturating_sub(issued);
    let remaining = lifetime * u64::from(gw.identity.renew_remaining_percent) / 100;
    let renew_after = match grant.renew_after {
        Some(after) => (issued + after.as_secs()).min(not_after),
        None => not_after - remaining,
    };
    JoinResponse {
        spiffe_id: svid.spiffe_id.to_string(),
        serial: svid.serial.to_string(),
        not_before,
        not_after,
        renew_after,
        certificate_chain: svid.cert_pem.clone(),
        bundle: String::from_utf8_lossy(gw.trust().bundle_pem()).into_owned(),
        policy: PolicyVersion {
            name: bound.provenance.name.clone(),
            version: bound.provenance.version.clone(),
        },
    }
}

pub(super) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

pub(super) fn check_idempotency_key(key: Option<&str>) -> Result<(), ApiError> {
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
