//! What load balancers, scrapers and operators see: health and readiness on the node listener,
//! metrics on the admin listener without a credential, and the token endpoints refusing anyone
//! without one. The tests share one gateway; only one of them joins, so the counts it reads
//! are its own.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use gateway::agent::GatewayClient;
use gateway::api::wire::IssueTokenRequest;
use omnirelay_e2e::*;

/// An admin client that presents no credential.
fn anonymous_admin(gw: &Gateway) -> GatewayClient {
    GatewayClient::new(&format!("https://{}", gw.admin_addr), &gw.bundle()).unwrap()
}

/// The value of the sample `series` (name and labels, exactly) in a Prometheus text exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_listener_reports_healthy_and_ready() {
    let gw = Gateway::shared("health");
    let node = gw.node();
    let health = node.get("/healthz").await.unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(&health.body[..], b"ok\n");
    let ready = node.get("/readyz").await.unwrap();
    assert_eq!(ready.status, 200);
    let report: serde_json::Value = serde_json::from_slice(&ready.body).unwrap();
    assert_eq!(report["ready"], true, "{report}");
    assert_eq!(report["checks"]["policy"]["ok"], true, "{report}");
    assert!(
        report["checks"]["policy"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("policy "),
        "{report}"
    );
    assert_eq!(report["checks"]["store"]["ok"], true, "{report}");
    assert_eq!(report["checks"]["store"]["backend"], "sqlite", "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_no_credential_and_count_an_issued_join() {
    let gw = Gateway::shared("health");
    let scraper = anonymous_admin(&gw);
    let issued = r#"bootstrap_joins_total{result="issued"}"#;
    let before = scraper.get("/metrics").await.unwrap();
    assert_eq!(before.status, 200);
    let before = String::from_utf8(before.body.to_vec()).unwrap();
    assert_eq!(sample(&before, issued).unwrap_or(0.0), 0.0, "{before}");

    let token = gw.issue_token("edge-us", "relay", 1).await;
    join_ok(&gw, &token.token, "counted-1").await;

    let after = scraper.get("/metrics").await.unwrap();
    assert_eq!(after.status, 200);
    let after = String::from_utf8(after.body.to_vec()).unwrap();
    assert_eq!(sample(&after, issued), Some(1.0), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoints_refuse_401_without_the_credential() {
    let gw = Gateway::shared("health");
    let request = serde_json::to_vec(&IssueTokenRequest {
        cluster: "edge-eu".into(),
        role: "dispatcher".into(),
        ttl_seconds: 900,
        max_uses: 1,
        issued_by: Some("intruder".into()),
        node: None,
        supersede: false,
    })
    .unwrap();
    let existing = gw.issue_token("edge-eu", "dispatcher", 1).await;
    let wrong = std::fs::read_to_string(gw.path("admin/credential"))
        .unwrap()
        .trim()
        .chars()
        .rev()
        .collect::<String>();
    for client in [
        anonymous_admin(&gw),
        anonymous_admin(&gw).with_bearer(wrong),
    ] {
        let revoke = format!("/admin/v1/tokens/{}/revoke", existing.id);
        for reply in [
            client.get("/admin/v1/tokens").await.unwrap(),
            client
                .post("/admin/v1/tokens", request.clone())
                .await
                .unwrap(),
            client.post(&revoke, Vec::new()).await.unwrap(),
        ] {
            assert_eq!(
                reply.status,
                401,
                "{}",
                String::from_utf8_lossy(&reply.body)
            );
            let problem = problem(&reply);
            assert_eq!(
                (problem.stage.as_str(), problem.reason.as_str()),
                ("admin", "unauthorized")
            );
            // The refusal names nothing it guards.
            let body = String::from_utf8_lossy(&reply.body);
            assert!(!body.contains(&existing.id), "{body}");
        }
    }
    // Nothing happened: the one token there is, unrevoked; no token issued by the intruder.
    let tokens = gw.tokens().await;
    let ours = tokens
        .iter()
        .find(|t| t.id.to_string() == existing.id)
        .unwrap();
    assert_eq!(ours.revoked_at, None);
    assert!(
        gw.audit_events()
            .iter()
            .all(|e| e["issued_by"] != "intruder" && e["kind"] != "token-revoked"),
        "the audit log records no issue or revocation by the intruder"
    );
}
