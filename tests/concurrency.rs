//! Many nodes racing for the few uses of one token: the conditional update in the final
//! transaction lets exactly `max_uses` of them through, and the HTTP answers, the token's use
//! count, the audit log and the identities table all tell the same story.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::collections::BTreeSet;
use std::sync::Arc;

use gateway::api::wire::JoinResponse;
use omnirelay_e2e::*;

const NODES: usize = 20;
const MAX_USES: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_joins_on_a_three_use_token_issue_exactly_three() {
    let gw = Gateway::start("race");
    let token = gw.issue_token("edge-eu", "dispatcher", MAX_USES).await;

    // Everything a node needs is prepared first (its own connection, key and nonce), so the
    // joins themselves leave together from the barrier.
    let barrier = Arc::new(tokio::sync::Barrier::new(NODES));
    let mut joins = Vec::new();
    for i in 0..NODES {
        let node = gw.node();
        let name = format!("racer-{i:02}");
        let key = NodeKey::new(&name);
        let request = join_request(&node, &token.token, &name, &key).await;
        let barrier = barrier.clone();
        joins.push(tokio::spawn(async move {
            barrier.wait().await;
            post_join(&node, &request).await
        }));
    }
    let mut issued = Vec::new();
    let mut exhausted = Vec::new();
    for join in joins {
        let reply = join.await.unwrap();
        match reply.status.as_u16() {
            200 => issued.push(serde_json::from_slice::<JoinResponse>(&reply.body).unwrap()),
            409 => {
                let problem = problem(&reply);
                assert_eq!(
                    (problem.stage.as_str(), problem.reason.as_str()),
                    ("token", "token-exhausted"),
                    "{problem:?}"
                );
                exhausted.push(problem);
            }
            other => panic!(
                "unexpected HTTP {other}: {}",
                String::from_utf8_lossy(&reply.body)
            ),
        }
    }
    assert_eq!(
        issued.len(),
        MAX_USES as usize,
        "joins that got a certificate"
    );
    assert_eq!(
        exhausted.len(),
        NODES - MAX_USES as usize,
        "joins refused 409"
    );
    let serials: BTreeSet<String> = issued.iter().map(|r| r.serial.clone()).collect();
    assert_eq!(
        serials.len(),
        issued.len(),
        "every certificate has its own serial"
    );

    // The store's count.
    let record = gw.token(&token.id).await.unwrap();
    assert_eq!(record.uses, MAX_USES);

    // The audit log: wait until every one of the twenty outcomes is there, then count.
    let events = gw.audit_until("an outcome for each of the twenty joins", |events| {
        events
            .iter()
            .filter(|e| {
                e["token_id"] == token.id
                    && (e["kind"] == "identity-issued" || e["kind"] == "join-refused")
            })
            .count()
            >= NODES
    });
    let audited = |kind: &str| -> Vec<&serde_json::Value> {
        events
            .iter()
            .filter(|e| e["kind"] == kind && e["token_id"] == token.id)
            .collect()
    };
    let issued_entries = audited("identity-issued");
    let audited_serials: BTreeSet<String> = issued_entries
        .iter()
        .map(|e| e["serial"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(audited_serials, serials, "audited issuances");
    let uses_after: BTreeSet<u64> = issued_entries
        .iter()
        .map(|e| e["uses_after"].as_u64().unwrap())
        .collect();
    assert_eq!(uses_after, BTreeSet::from([1, 2, 3]));
    // Every refusal is audited with what its node was told.
    let refusals = audited("join-refused");
    assert_eq!(refusals.len(), exhausted.len());
    for problem in &exhausted {
        let entry = refusals
            .iter()
            .find(|e| e["request_id"] == problem.request_id)
            .unwrap_or_else(|| panic!("no join-refused entry for {}", problem.request_id));
        assert_eq!(entry["stage"], problem.stage, "{entry}");
        assert_eq!(entry["status"], 409, "{entry}");
    }

    // The identities table, read on our own connection.
    let recorded: BTreeSet<String> = gw.recorded_serials(&token.id).into_iter().collect();
    assert_eq!(recorded, serials, "rows in identities for the token");
}
