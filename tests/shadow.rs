//! Shadow evaluation: a candidate published with `policy publish --candidate` passes the reload
//! pipeline, decides beside the active version on live joins without changing any answer,
//! its disagreements are kept and reported, and `policy promote` makes it active.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway::api::wire::JoinResponse;
use omnirelay_e2e::bundles::{PolicyRepo, bundle_source, follow_repo, policy_status_until};
use omnirelay_e2e::*;

/// One join of the load.
#[derive(Debug, Clone)]
struct Done {
    started: Instant,
    node: String,
    role: &'static str,
    status: u16,
    spiffe_id: Option<String>,
}

/// A candidate source: the example bundle admitting only dispatchers (relays are denied with
/// `not-an-edge-node`), its vectors in step.
fn dispatchers_only(name: &str) -> TempDir {
    let dir = bundle_source(name, "v2", 3600);
    let path = dir.0.join("bundle.source.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["policies"][0]["settings"]["roles"] = serde_json::json!(["dispatcher"]);
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    let vectors_path = dir.0.join("vectors/edge-gate.json");
    let mut vectors: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&vectors_path).unwrap()).unwrap();
    // Every relay (the one in maintenance, the operator's manual issuance) is now refused for
    // its role first.
    for vector in vectors["vectors"].as_array_mut().unwrap() {
        if vector["request"]["token"]["role"] == "relay" {
            vector["expect"] = serde_json::json!({ "deny": { "code": "not-an-edge-node" } });
        }
    }
    std::fs::write(&vectors_path, serde_json::to_vec_pretty(&vectors).unwrap()).unwrap();
    dir
}

fn cli(args: &[&str]) -> String {
    let out = omnirelay(args).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_denying_one_role_disagrees_on_exactly_those_joins_and_promote_makes_it_active()
{
    let repo = PolicyRepo::new("shadow");
    repo.publish(&bundle_source("shadow", "v1", 3600).0, "1.0.0", None);
    let gw = Gateway::start_with("shadow", |t| {
        follow_repo(t, &repo.url(), "candidate_branch = \"candidate\"")
    });
    policy_status_until(&gw, "v1 active", |s| s["active"]["version"] == "1.0.0").await;
    let tokens = [
        (
            "dispatcher",
            gw.issue_token("edge-eu", "dispatcher", 1_000_000)
                .await
                .token,
        ),
        (
            "relay",
            gw.issue_token("edge-eu", "relay", 1_000_000).await.token,
        ),
    ];

    // Continuous joins, both roles, from before the candidate exists until well after.
    let done: Arc<Mutex<Vec<Done>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (count_tx, mut count) = tokio::sync::watch::channel(0usize);
    let count_tx = Arc::new(count_tx);
    let mut workers = tokio::task::JoinSet::new();
    for (w, (role, token)) in tokens.iter().cloned().enumerate() {
        let (client, done, stop, count_tx) =
            (gw.node(), done.clone(), stop.clone(), count_tx.clone());
        workers.spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let node = format!("{role}-{w}-{i}");
                let key = NodeKey::new(&node);
                let request = join_request(&client, &token, &node, &key).await;
                let started = Instant::now();
                let reply = post_join(&client, &request).await;
                let parsed: Option<JoinResponse> = serde_json::from_slice(&reply.body).ok();
                done.lock().unwrap().push(Done {
                    started,
                    node,
                    role,
                    status: reply.status.as_u16(),
                    spiffe_id: parsed.map(|r| r.spiffe_id),
                });
                count_tx.send_modify(|c| *c += 1);
                i += 1;
            }
        });
    }
    count.wait_for(|c| *c >= 20).await.unwrap();

    let candidate = dispatchers_only("shadow");
    let (source, url) = (candidate.0.clone(), repo.url());
    let published = tokio::task::spawn_blocking(move || {
        cli(&[
            "policy",
            "publish",
            "--source",
            source.to_str().unwrap(),
            "--repo",
            &url,
            "--version",
            "1.1.0",
            "--candidate",
        ])
    })
    .await
    .unwrap();
    assert!(published.contains("candidate-v1.1.0"), "{published}");
    let status = policy_status_until(&gw, "candidate in shadow", |s| {
        s["candidate"]["version"] == "1.1.0"
    })
    .await;
    let shadowed_from = Instant::now();
    assert_eq!(status["active"]["version"], "1.0.0", "{status:#}");
    let seen = *count.borrow();
    count.wait_for(|c| *c >= seen + 60).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    while workers.join_next().await.is_some() {}

    // No answer changed: every join of either role got its v1 identity.
    let done = done.lock().unwrap().clone();
    for d in &done {
        assert_eq!(d.status, 200, "{d:?}");
        let id = d.spiffe_id.as_deref().unwrap();
        assert!(
            id.ends_with(&format!("/edge/edge-eu/{}/{}", d.role, d.node)),
            "{d:?}"
        );
    }
    let after = |role: &str| -> BTreeSet<String> {
        done.iter()
            .filter(|d| d.role == role && d.started > shadowed_from)
            .map(|d| d.node.clone())
            .collect()
    };
    let (relays, dispatchers) = (after("relay"), after("dispatcher"));
    assert!(
        relays.len() >= 10 && dispatchers.len() >= 10,
        "{relays:?} {dispatchers:?}"
    );

    // Every relay decision taken under the candidate is a disagreement, and nothing else is.
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        let reply = gw
            .admin()
            .get("/admin/v1/policy/shadow?limit=1000")
            .await
            .unwrap();
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let report: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        let nodes: BTreeSet<String> = report["disagreements"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let input: serde_json::Value =
                    serde_json::from_str(d["input"].as_str().unwrap()).unwrap();
                input["node_name"].as_str().unwrap().to_string()
            })
            .collect();
        if relays.is_subset(&nodes) {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "relay joins missing from the disagreements: {:?}",
            relays.difference(&nodes).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let rows = report["disagreements"].as_array().unwrap();
    for d in rows {
        assert_eq!(d["role"], "relay", "{d:#}");
        assert_eq!(d["cluster"], "edge-eu");
        assert_eq!(d["active_version"], "1.0.0");
        assert_eq!(d["candidate_version"], "1.1.0");
        let active: serde_json::Value =
            serde_json::from_str(d["active"].as_str().unwrap()).unwrap();
        let candidate: serde_json::Value =
            serde_json::from_str(d["candidate"].as_str().unwrap()).unwrap();
        assert!(
            active["allow"]["spiffe_path"]
                .as_str()
                .unwrap()
                .starts_with("/edge/edge-eu/relay/")
        );
        assert_eq!(
            candidate,
            serde_json::json!({"deny": {"code": "not-an-edge-node"}})
        );
        // The policy input, never the token.
        let input = d["input"].as_str().unwrap();
        assert!(input.contains("\"role\":\"relay\""), "{input}");
        assert!(
            !input.contains(tokens[1].1.as_str()),
            "the token leaked: {input}"
        );
    }
    let disagree = gw
        .metric("bootstrap_policy_shadow_total{result=\"disagree\"}")
        .await
        .unwrap();
    assert_eq!(disagree as usize, rows.len(), "every disagreement is kept");
    let agree = gw
        .metric("bootstrap_policy_shadow_total{result=\"agree\"}")
        .await
        .unwrap();
    assert!(agree as usize >= dispatchers.len(), "{agree}");
    assert_eq!(
        gw.metric("bootstrap_policy_shadow_total{result=\"error\"}")
            .await,
        None
    );
    assert_eq!(
        gw.metric("bootstrap_policy_shadow_dropped_total").await,
        Some(0.0)
    );

    // The CLI's report names them.
    let config = gw.config_naming_the_admin_port();
    let printed = cli(&[
        "policy", "shadow", "report", "--limit", "1000", "--config", &config,
    ]);
    assert!(
        printed.contains("candidate in shadow: edge 1.1.0"),
        "{printed}"
    );
    for node in &relays {
        assert!(
            printed.contains(&format!("node {node}:")),
            "{node}: {printed}"
        );
    }

    // Promote: the candidate becomes the active version, audited, and relays are refused.
    let promoted = cli(&["policy", "promote", "--config", &config]);
    assert!(promoted.contains("active edge 1.1.0"), "{promoted}");
    let status = policy_status_until(&gw, "1.1.0 active", |s| {
        s["active"]["version"] == "1.1.0" && s["candidate"].is_null()
    })
    .await;
    assert_eq!(status["last_candidate"]["result"], "ok", "{status:#}");
    gw.wait_for_audit("policy-promoted", |e| e["version"] == "1.1.0");
    gw.wait_for_audit("policy-activated", |e| e["trigger"] == "promote");
    let key = NodeKey::new("relay-after");
    let node = gw.node();
    let reply = post_join(
        &node,
        &join_request(&node, &tokens[1].1, "relay-after", &key).await,
    )
    .await;
    assert_eq!(
        reply.status,
        403,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let joined = join_ok(&gw, &tokens[0].1, "dispatcher-after").await;
    assert_eq!(joined.policy.version, "1.1.0");
    // `main`, behind the promoted commit, is nothing new rather than a rollback to refuse.
    let reload = gw
        .admin()
        .post("/admin/v1/policy/reload", Vec::new())
        .await
        .unwrap();
    assert_eq!(
        reload.status,
        200,
        "{}",
        String::from_utf8_lossy(&reload.body)
    );
    let reload: serde_json::Value = serde_json::from_slice(&reload.body).unwrap();
    assert_eq!(reload["result"], "unchanged");
    assert_eq!(reload["active"]["version"], "1.1.0");
}
