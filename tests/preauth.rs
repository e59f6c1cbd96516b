//! Issue #7, finding 2: what a client sends before it is authenticated must not grow durable
//! state by more than a bounded amount. A join with a 60 KB unknown field name used to be
//! answered with the field name in its detail and stored verbatim, one fsync'd 57 KB audit
//! entry per request. Now every refusal shows a bounded detail without control characters, and
//! refusals before the token verified are counted in a metric and coalesced in the audit: one
//! entry per client and reason per interval, carrying the count.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use gateway::agent::GatewayClient;
use omnirelay_e2e::*;

const REQUESTS: u64 = 200;

/// A join body whose only oddity is an unknown field named `name`, with a real token.
fn with_unknown_field(name: &str, token: &str) -> Vec<u8> {
    let mut body = serde_json::json!({
        "token": token,
        "node_name": "flood-1",
        "csr": "",
        "attestation": {"kind": "token-only", "nonce": "", "issued_at_ms": 0},
    });
    body[name] = 1.into();
    serde_json::to_vec(&body).unwrap()
}

/// Posts `body` `REQUESTS` times; each answer must be 400 problem+json with a bounded detail
/// free of control characters, naming the unknown field (cut short).
async fn flood(node: &GatewayClient, body: &[u8]) {
    for _ in 0..REQUESTS {
        let reply = node
            .post("/v1/bootstrap/join", body.to_vec())
            .await
            .unwrap();
        assert_eq!(reply.status, 400);
        let problem = problem(&reply);
        assert_eq!(
            (problem.stage.as_str(), problem.reason.as_str()),
            ("request", "malformed")
        );
        assert!(
            problem.detail.len() <= 256,
            "{} bytes of detail",
            problem.detail.len()
        );
        assert!(
            !problem.detail.chars().any(char::is_control),
            "{:?}",
            problem.detail
        );
        assert!(
            problem.detail.contains("unknown field"),
            "{}",
            problem.detail
        );
    }
}

/// A gateway whose per-client rate limit lets the whole flood through to the parser.
fn roomy(name: &str, interval: &str) -> Gateway {
    let interval = interval.to_string();
    Gateway::start_with(name, move |toml| {
        toml.push_str(&format!(
            "\n[limits]\nper_ip = {{ per_second = 1000, burst = 1000 }}\n\
             refusal_audit_interval = \"{interval}\"\n"
        ));
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_joins_with_a_60_kb_unknown_field_grow_the_audit_by_one_counted_entry() {
    let gw = roomy("unknown-field-flood", "200ms");
    let token = gw.issue_token("edge-eu", "dispatcher", 1).await;
    // The token's issuance is audited at once; the flood starts from there.
    gw.wait_for_audit("token-issued", |e| e["token_id"] == token.id);
    let before = (gw.audit_bytes(), gw.audit_lines().len());

    let body = with_unknown_field(&"a".repeat(60_000), &token.token);
    assert!(body.len() > 60_000);
    let started = std::time::Instant::now();
    flood(&gw.node(), &body).await;
    let intervals = (started.elapsed().as_millis() / 200) as usize;

    let (entries, total) = gw.wait_for_coalesced("127.0.0.1", "malformed", REQUESTS);
    assert_eq!(total, REQUESTS, "{entries:#?}");
    // At most one entry per 200 ms interval the flood spanned (plus the partial ones at either
    // end), however slow this machine is: never one per request.
    let bound = (intervals + 2).min(REQUESTS as usize / 4);
    assert!(
        entries.len() <= bound,
        "one entry per interval: {entries:#?}"
    );
    for entry in &entries {
        assert_eq!(entry["stage"], "request", "{entry}");
        assert_eq!(entry["status"], 400, "{entry}");
        assert!(entry["sample"].as_str().unwrap().len() <= 256, "{entry}");
    }
    // 200 verbatim entries were 12 MB; a few counted ones are a few hundred bytes each.
    let grown = gw.audit_bytes() - before.0;
    // (One more line may be a signed checkpoint, if its interval passed meanwhile.)
    assert!(
        grown <= 1024 * (entries.len() as u64 + 1),
        "the audit grew by {grown} bytes"
    );
    assert!(
        gw.audit_lines().len() - before.1 <= entries.len() + 1,
        "{:#?}",
        gw.audit_events()
    );
    // Nothing per request: no join-refused entry for any of them.
    assert!(
        gw.audit_events()
            .iter()
            .all(|e| e["kind"] != "join-refused"),
        "{:#?}",
        gw.audit_events()
    );
    assert_eq!(
        gw.metric(
            "bootstrap_unauthenticated_refusals_total{stage=\"request\",reason=\"malformed\"}"
        )
        .await,
        Some(REQUESTS as f64)
    );
    assert_eq!(
        gw.metric("bootstrap_joins_total{result=\"request\"}").await,
        Some(REQUESTS as f64)
    );
    // And the gateway still serves, the token unspent.
    join_ok(&gw, &token.token, "after-flood-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_never_reach_the_node_and_the_count_is_written_at_shutdown() {
    // An interval far beyond the test: only the flush at shutdown can write the count.
    let gw = roomy("control-flood", "1h");
    let token = gw.issue_token("edge-eu", "dispatcher", 1).await;
    gw.wait_for_audit("token-issued", |e| e["token_id"] == token.id);
    let before = gw.audit_bytes();

    // About 57 KB of JSON once the control characters are escaped.
    let name = "\u{1b}[2J\u{1b}[31mowned\u{7}\r\n\u{0}\u{85}".repeat(1400);
    flood(&gw.node(), &with_unknown_field(&name, &token.token)).await;
    assert_eq!(
        gw.metric(
            "bootstrap_unauthenticated_refusals_total{stage=\"request\",reason=\"malformed\"}"
        )
        .await,
        Some(REQUESTS as f64)
    );
    let (dir, status) = gw.stop();
    assert!(status.success(), "{status:?}");

    let text = std::fs::read_to_string(dir.0.join("audit/audit.log")).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].clone())
        .collect();
    let (entries, total) = coalesced_in(&events, "127.0.0.1", "malformed");
    assert_eq!(total, REQUESTS, "{events:#?}");
    assert_eq!(entries.len(), 1, "{entries:#?}");
    let sample = entries[0]["sample"].as_str().unwrap();
    assert!(
        sample.len() <= 256 && !sample.chars().any(char::is_control),
        "{sample:?}"
    );
    let grown = text.len() as u64 - before;
    assert!(grown <= 4096, "the audit grew by {grown} bytes");
}
