//! Every way a join is refused before anything is issued: the exact status, the problem's
//! `stage` and `reason`, an audited `join-refused` entry saying the same (or, for a token that
//! did not verify, the refusal counted in the client's coalesced `refusals-coalesced` entry),
//! and no identity and no consumed use for the token. The tests share one gateway: each uses
//! its own tokens, nodes and nonces, so none can see another's effects.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use gateway::api::wire::{JoinRequest, Problem};
use gateway::token::SigningKey;
use omnirelay_e2e::*;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;

/// Posts `request` and checks the refusal: status, problem+json with `stage` and `reason`, and
/// a `join-refused` audit entry for this very request saying the same. Returns both.
async fn refused(
    gw: &Gateway,
    request: &JoinRequest,
    status: u16,
    stage: &str,
    reason: &str,
) -> (Problem, serde_json::Value) {
    let reply = post_join(&gw.node(), request).await;
    assert_eq!(
        reply.status.as_u16(),
        status,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let problem = problem(&reply);
    assert_eq!(
        (
            problem.status,
            problem.stage.as_str(),
            problem.reason.as_str()
        ),
        (status, stage, reason),
        "{problem:?}"
    );
    let entry = gw.wait_for_audit("join-refused", |e| e["request_id"] == problem.request_id);
    assert_eq!(entry["stage"], stage, "{entry}");
    assert_eq!(entry["status"], status, "{entry}");
    assert_eq!(entry["node"], request.node_name, "{entry}");
    (problem, entry)
}

/// Posts `request`, whose token does not verify, and checks the refusal: status, problem+json
/// with `stage` and `reason`, no audit entry of its own (an unauthenticated client must not
/// grow the audit per request) but a count in the client's coalesced entry for the reason.
/// Returns the coalesced entries.
async fn refused_unauthenticated(
    gw: &Gateway,
    request: &JoinRequest,
    status: u16,
    reason: &str,
) -> Vec<serde_json::Value> {
    let reply = post_join(&gw.node(), request).await;
    assert_eq!(
        reply.status.as_u16(),
        status,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let problem = problem(&reply);
    assert_eq!(
        (
            problem.status,
            problem.stage.as_str(),
            problem.reason.as_str()
        ),
        (status, "token", reason),
        "{problem:?}"
    );
    let (entries, _) = gw.wait_for_coalesced("127.0.0.1", reason, 1);
    for entry in &entries {
        assert_eq!(
            (entry["stage"].as_str(), entry["status"].as_u64()),
            (Some("token"), Some(u64::from(status))),
            "{entry}"
        );
    }
    assert!(
        gw.audit_events()
            .iter()
            .all(|e| e["request_id"] != problem.request_id),
        "a refusal before the token verified was audited on its own"
    );
    entries
}

/// Nothing was issued for `token_id`: no audited issuance, no row in `identities`.
fn nothing_issued(gw: &Gateway, token_id: &str) {
    assert_eq!(
        gw.audit_for("identity-issued", token_id),
        Vec::<serde_json::Value>::new()
    );
    assert_eq!(gw.recorded_serials(token_id), Vec::<String>::new());
}

/// A registered token is still unused (and nothing was issued for it).
async fn unused(gw: &Gateway, token_id: &str) {
    assert_eq!(gw.token(token_id).await.unwrap().uses, 0);
    nothing_issued(gw, token_id);
}

/// A join request for a token the test signed itself.
async fn forged(gw: &Gateway, token: &str, node: &str) -> JoinRequest {
    join_request(&gw.node(), token, node, &NodeKey::new(node)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_401() {
    let gw = Gateway::shared("refusals");
    let mut claims = claims("edge-eu", "dispatcher", 1);
    // Well past the 60 s leeway.
    claims.issued_at -= 7200;
    claims.not_before -= 7200;
    claims.expires_at = unix_now() - 3600;
    let request = forged(&gw, &gw.signing_key().sign(&claims), "expired-1").await;
    refused_unauthenticated(&gw, &request, 401, "expired").await;
    nothing_issued(&gw, &claims.id.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_not_yet_valid_is_refused_401() {
    let gw = Gateway::shared("refusals");
    let mut claims = claims("edge-eu", "dispatcher", 1);
    claims.not_before = unix_now() + 3600;
    claims.expires_at = unix_now() + 7200;
    let request = forged(&gw, &gw.signing_key().sign(&claims), "early-1").await;
    refused_unauthenticated(&gw, &request, 401, "not-yet-valid").await;
    nothing_issued(&gw, &claims.id.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_trust_domain_is_refused_401() {
    let gw = Gateway::shared("refusals");
    let mut claims = claims("edge-eu", "dispatcher", 1);
    claims.audience = "other.omnirelay.example".into();
    let request = forged(&gw, &gw.signing_key().sign(&claims), "elsewhere-1").await;
    refused_unauthenticated(&gw, &request, 401, "wrong-audience").await;
    nothing_issued(&gw, &claims.id.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_signed_by_another_key_is_refused_401_and_its_claims_are_not_trusted() {
    let gw = Gateway::shared("refusals");
    let (stranger, _) = SigningKey::generate().unwrap();
    let claims = claims("edge-eu", "dispatcher", 1);
    let request = forged(&gw, &stranger.sign(&claims), "stranger-1").await;
    let entries = refused_unauthenticated(&gw, &request, 401, "unknown-key").await;
    // Claims whose signature did not verify are not facts: the audit does not repeat them.
    for entry in entries {
        assert!(entry.get("token_id").is_none(), "{entry}");
        assert!(entry.get("cluster").is_none(), "{entry}");
    }
    nothing_issued(&gw, &claims.id.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_an_edited_claim_is_refused_401_bad_signature() {
    let gw = Gateway::shared("refusals");
    let issued = gw.issue_token("edge-eu", "dispatcher", 1).await;
    // More uses, same signature.
    let parts: Vec<&str> = issued.token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let mut payload: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(payload["max_uses"], 1);
    payload["max_uses"] = 1000.into();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&payload).unwrap()),
        parts[2]
    );
    let request = forged(&gw, &tampered, "tampered-1").await;
    for entry in refused_unauthenticated(&gw, &request, 401, "bad-signature").await {
        assert!(entry.get("token_id").is_none(), "{entry}");
    }
    unused(&gw, &issued.id).await;
    assert_eq!(gw.token(&issued.id).await.unwrap().max_uses, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_403() {
    let gw = Gateway::shared("refusals");
    let issued = gw.issue_token("edge-eu", "dispatcher", 2).await;
    let reply = gw
        .admin()
        .post(
            &format!("/admin/v1/tokens/{}/revoke", issued.id),
            br#"{"reason": "e2e: the laptop it was on was lost"}"#.to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&reply.body).unwrap(),
        serde_json::json!({"revoked": true})
    );
    let request = forged(&gw, &issued.token, "revoked-1").await;
    let (_, entry) = refused(&gw, &request, 403, "token", "token-revoked").await;
    assert_eq!(entry["token_id"], issued.id);
    unused(&gw, &issued.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validly_signed_token_never_issued_here_is_refused_401_unknown() {
    let gw = Gateway::shared("refusals");
    let claims = claims("edge-eu", "dispatcher", 5);
    let id = claims.id.to_string();
    let request = forged(&gw, &gw.signing_key().sign(&claims), "unregistered-1").await;
    let (_, entry) = refused(&gw, &request, 401, "token", "unknown-token").await;
    assert_eq!(entry["token_id"], id);
    assert!(
        gw.token(&id).await.is_none(),
        "a refusal must not register it"
    );
    nothing_issued(&gw, &id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_used_by_one_join_is_refused_for_the_next_401() {
    let gw = Gateway::shared("refusals");
    let node = gw.node();
    let first = gw.issue_token("edge-eu", "dispatcher", 1).await;
    let key = NodeKey::new("replay-1");
    let request = join_request(&node, &first.token, "replay-1", &key).await;
    let reply = post_join(&node, &request).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );

    // Another token, another key and node, the same nonce.
    let second = gw.issue_token("edge-eu", "dispatcher", 1).await;
    let replay = JoinRequest {
        token: second.token.clone(),
        node_name: "replay-2".into(),
        csr: NodeKey::new("replay-2").csr,
        idempotency_key: None,
        attestation: request.attestation.clone(),
    };
    let (_, entry) = refused(&gw, &replay, 401, "attestation", "nonce-replayed").await;
    assert_eq!(entry["token_id"], second.id);
    unused(&gw, &second.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_ten_minutes_old_is_refused_400_stale() {
    let gw = Gateway::shared("refusals");
    let issued = gw.issue_token("edge-eu", "dispatcher", 1).await;
    let mut request = forged(&gw, &issued.token, "stale-1").await;
    let now_ms = request.attestation["issued_at_ms"].as_u64().unwrap();
    request.attestation["issued_at_ms"] = (now_ms - 10 * 60 * 1000).into();
    let (_, entry) = refused(&gw, &request, 400, "attestation", "evidence-stale").await;
    assert_eq!(entry["token_id"], issued.id);
    unused(&gw, &issued.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_whose_signature_does_not_verify_is_refused_400() {
    let gw = Gateway::shared("refusals");
    let issued = gw.issue_token("edge-eu", "dispatcher", 1).await;
    let mut request = forged(&gw, &issued.token, "badsig-1").await;
    // The last byte of the DER is the last byte of the ECDSA signature's `s`: flipping it
    // keeps the structure (and the PEM) valid and breaks only the proof of possession.
    let mut der = CertificateSigningRequestDer::from_pem_slice(request.csr.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    *der.last_mut().unwrap() ^= 0x01;
    request.csr = pem("CERTIFICATE REQUEST", &der);
    assert!(CertificateSigningRequestDer::from_pem_slice(request.csr.as_bytes()).is_ok());
    let (_, entry) = refused(&gw, &request, 400, "csr", "csr-bad-signature").await;
    assert_eq!(entry["token_id"], issued.id);
    unused(&gw, &issued.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_denial_tells_the_node_the_safe_message_and_the_audit_the_reason() {
    let gw = Gateway::shared("refusals");
    // `core` is not among the clusters `omnirelay init` configures for cluster-role.
    let issued = gw.issue_token("core", "dispatcher", 1).await;
    let request = forged(&gw, &issued.token, "core-1").await;
    let (problem, entry) = refused(&gw, &request, 403, "policy", "cluster-not-allowed").await;

    assert_eq!(
        problem.detail,
        "this token's cluster is not admitted by the gateway's policy"
    );
    let decision = gw.wait_for_audit("policy-decision", |e| e["request_id"] == problem.request_id);
    assert_eq!(decision["outcome"], "deny", "{decision}");
    assert_eq!(decision["code"], "cluster-not-allowed", "{decision}");
    assert_eq!(decision["policy"]["name"], "cluster-role", "{decision}");
    let operator_reason = decision["operator_reason"].as_str().unwrap();
    assert!(operator_reason.contains("\"core\""), "{operator_reason}");
    assert!(
        entry["reason"].as_str().unwrap().contains(operator_reason),
        "{entry}"
    );
    // Nothing of the operator's reason (nor the admitted clusters) reaches the node.
    let body = serde_json::to_string(&problem).unwrap();
    for secret in [operator_reason, "edge-eu", "core"] {
        assert!(
            !body.contains(secret),
            "{secret:?} leaked to the node: {body}"
        );
    }
    unused(&gw, &issued.id).await;
}

/// PEM-encodes `der` under `label`, 64 columns as RFC 7468 writes it.
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
