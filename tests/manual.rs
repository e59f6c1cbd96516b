//! Manual issuance (`omnirelay identities issue`, the fallback during a renewal outage) against
//! the real binary over TLS: the leaf verifies against the bundle, continues the node's
//! lineage in the inventory and is audited with the operator's reason; revoking it works as for
//! any identity; the gateway's reserved path, SPIFFE IDs with nothing on record and another
//! trust domain are refused as problem+json and audited; the policy is told the kind
//! (`manual`) and can deny it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is a failed test"
)]

use gateway::api::wire::{JoinResponse, ManualIssueRequest, RevocationPage};
use gateway::store::IssuedIdentity;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use omnirelay_e2e::{
    Gateway, NodeKey, TRUST_DOMAIN, join_as, omnirelay, policy_dir, problem, verify_with_webpki,
};

/// `POST /admin/v1/identities/issue` for `spiffe_id` with a fresh CSR.
async fn manual(gw: &Gateway, spiffe_id: &str, reason: &str) -> gateway::agent::Reply {
    let request = ManualIssueRequest {
        csr: NodeKey::new("any").csr,
        spiffe_id: spiffe_id.into(),
        ttl_seconds: 600,
        reason: reason.into(),
        issued_by: Some("e2e-operator".into()),
    };
    gw.admin()
        .post(
            "/admin/v1/identities/issue",
            serde_json::to_vec(&request).unwrap(),
        )
        .await
        .unwrap()
}

async fn inventory(gw: &Gateway, serial: &str) -> IssuedIdentity {
    let reply = gw
        .admin()
        .get(&format!("/admin/v1/identities?serial={serial}"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let mut listed: Vec<IssuedIdentity> = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    listed.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_issues_by_hand_and_revokes_it_like_any_identity() {
    let gw = Gateway::start("manual-issue");
    let config = gw.config_naming_the_admin_port();
    let token = gw.issue_token("edge-eu", "relay", 1).await;
    let joined = join_as(
        &gw.node(),
        &token.token,
        "relay-1",
        &NodeKey::new("relay-1"),
    )
    .await;

    let key = NodeKey::new("relay-1");
    let csr = gw.path("node.csr");
    std::fs::write(&csr, &key.csr).unwrap();
    let chain = gw.path("manual.pem");
    let out = omnirelay(&[
        "identities",
        "issue",
        "--csr",
        csr.to_str().unwrap(),
        "--spiffe-id",
        &joined.spiffe_id,
        "--ttl",
        "20m",
        "--reason",
        "renewal outage INC-42",
        "--out",
        chain.to_str().unwrap(),
        "--output",
        "json",
        "--config",
        &config,
    ])
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let issued: JoinResponse = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(issued.spiffe_id, joined.spiffe_id);
    assert_ne!(issued.serial, joined.serial);
    // The operator's TTL caps the policy's hour (plus the backdating of notBefore).
    assert!(
        issued.not_after - issued.not_before <= 20 * 60 + 120,
        "{issued:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&chain).unwrap(),
        issued.certificate_chain
    );
    verify_with_webpki(&issued.certificate_chain, &gw.bundle());
    let leaf = CertificateDer::from_pem_slice(issued.certificate_chain.as_bytes()).unwrap();
    let svid = spiffe::X509Svid::parse_from_der(&leaf, key.key.serialized_der()).unwrap();
    assert_eq!(svid.spiffe_id().to_string(), joined.spiffe_id);

    // In the inventory, in the node's lineage; the join's identity is still live.
    let record = inventory(&gw, &issued.serial).await;
    assert_eq!(record.token_id, token.id);
    assert_eq!(record.predecessor.as_deref(), Some(joined.serial.as_str()));
    assert_eq!(
        serde_json::to_value(record.state).unwrap(),
        serde_json::json!("live")
    );
    assert!(inventory(&gw, &joined.serial).await.revoked_at.is_none());
    // Audited in the issuing transaction, with who and why; the policy's decision was manual.
    let event = gw.wait_for_audit("identity-renewed", |e| e["serial"] == issued.serial);
    assert_eq!(event["manual"]["reason"], "renewal outage INC-42");
    assert!(!event["manual"]["by"].as_str().unwrap().is_empty());
    assert_eq!(event["predecessor"], joined.serial);
    assert_eq!(
        gw.metric("bootstrap_manual_issuances_total").await,
        Some(1.0)
    );

    // Undo: revoke the manual identity by serial; the join's stays live.
    let out = omnirelay(&[
        "revoke",
        "--serial",
        &issued.serial,
        "--reason",
        "outage over",
        "--config",
        &config,
    ])
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(inventory(&gw, &issued.serial).await.revoked_at.is_some());
    assert!(inventory(&gw, &joined.serial).await.revoked_at.is_none());
    let reply = gw.node().get("/v1/revocations?since=0").await.unwrap();
    assert_eq!(reply.status, 200);
    let page: RevocationPage = serde_json::from_slice(&reply.body).unwrap();
    assert!(
        page.revocations.iter().any(|r| r.serial == issued.serial),
        "{page:?}"
    );

    // Revoking by SPIFFE ID takes the whole lineage; a manual issuance for it is then refused.
    gw.revoke(serde_json::json!({"spiffe_id": joined.spiffe_id, "reason": "node retired"}))
        .await;
    assert!(inventory(&gw, &joined.serial).await.revoked_at.is_some());
    let reply = manual(&gw, &joined.spiffe_id, "again").await;
    assert_eq!(reply.status, 403);
    assert_eq!(problem(&reply).reason, "identity-revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_unknown_and_foreign_spiffe_ids_are_refused_and_audited() {
    let gw = Gateway::start("manual-refused");
    for (spiffe_id, status, reason) in [
        (
            format!("spiffe://{TRUST_DOMAIN}/omnirelay/gateway"),
            403,
            "reserved-spiffe-id",
        ),
        (
            format!("spiffe://{TRUST_DOMAIN}/omnirelay"),
            403,
            "reserved-spiffe-id",
        ),
        (
            format!("spiffe://{TRUST_DOMAIN}/cluster/edge-eu/role/relay/node/ghost"),
            404,
            "no-identity-on-record",
        ),
        (
            "spiffe://other.example/cluster/edge-eu/role/relay/node/n1".to_string(),
            400,
            "malformed",
        ),
    ] {
        let reply = manual(&gw, &spiffe_id, "drill").await;
        assert_eq!(reply.status, status, "{spiffe_id}");
        assert_eq!(problem(&reply).reason, reason, "{spiffe_id}");
        let event = gw.wait_for_audit("manual-issue-refused", |e| e["spiffe_id"] == *spiffe_id);
        assert_eq!(event["status"], status);
        assert_eq!(event["manual"]["reason"], "drill");
    }
    assert!(
        gw.audit_events()
            .iter()
            .all(|e| e["kind"] != "identity-renewed")
    );
    // The CLI says why and exits 2; the gateway stays healthy.
    let csr = gw.path("node.csr");
    std::fs::write(&csr, NodeKey::new("n").csr).unwrap();
    let config = gw.config_naming_the_admin_port();
    let out = omnirelay(&[
        "identities",
        "issue",
        "--csr",
        csr.to_str().unwrap(),
        "--spiffe-id",
        &format!("spiffe://{TRUST_DOMAIN}/omnirelay/gateway"),
        "--ttl",
        "1h",
        "--reason",
        "drill",
        "--config",
        &config,
    ])
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("reserved-spiffe-id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(gw.admin().get("/healthz").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_is_told_the_kind_and_can_deny_manual_issuance() {
    let module = policy_dir().join("fixture_grant.wasm");
    let module = module.to_str().unwrap();
    let binding = |cluster: &str, deny_manual: bool| {
        format!(
            "[[policies]]\nname = \"{cluster}\"\nmodule = \"{module}\"\nclusters = [\"{cluster}\"]\n\
             settings = {{ path = \"/node/{{node}}\", ttl_seconds = 600, deny_manual = {deny_manual} }}\n\n"
        )
    };
    let fixtures = [binding("no-manual", true), binding("manual-ok", false)].concat();
    let gw = Gateway::start_with("manual-kind", |toml| {
        let at = toml.find("[[policies]]").unwrap();
        toml.insert_str(at, &fixtures);
    });
    let denied_token = gw.issue_token("no-manual", "relay", 1).await;
    let denied = join_as(&gw.node(), &denied_token.token, "n1", &NodeKey::new("n1")).await;
    let allowed_token = gw.issue_token("manual-ok", "relay", 1).await;
    let allowed = join_as(&gw.node(), &allowed_token.token, "n2", &NodeKey::new("n2")).await;

    let reply = manual(&gw, &denied.spiffe_id, "outage").await;
    assert_eq!(reply.status, 403);
    assert_eq!(problem(&reply).reason, "manual-denied");
    let decision = gw.wait_for_audit("policy-decision", |e| {
        e["token_id"] == denied_token.id && e["outcome"] == "deny"
    });
    assert_eq!(decision["code"], "manual-denied");
    let refused = gw.wait_for_audit("manual-issue-refused", |e| {
        e["spiffe_id"] == denied.spiffe_id
    });
    assert_eq!(refused["predecessor"], denied.serial);
    assert_eq!(refused["token_id"], denied_token.id);

    // The same fixture without `deny_manual` issues: the difference is the kind it was told.
    let reply = manual(&gw, &allowed.spiffe_id, "outage").await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let issued: JoinResponse = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(issued.spiffe_id, allowed.spiffe_id);
}
