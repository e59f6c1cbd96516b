//! Replay: the gateway keeps each live decision's policy input (never the token) and outcome;
//! `policy replay` re-runs them through a candidate bundle in the real host and reports the
//! flips, from the gateway or from a `decisions export` file, and `--fail-on-flip` fails CI.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use omnirelay_e2e::bundles::{PolicyRepo, bundle_source, follow_repo, policy_status_until};
use omnirelay_e2e::*;

/// The example bundle with `edit` applied to its manifest and vectors.
fn variant(
    name: &str,
    ttl: u32,
    edit: impl FnOnce(&mut serde_json::Value, &mut serde_json::Value),
) -> TempDir {
    let dir = bundle_source(name, "v1", ttl);
    let path = dir.0.join("bundle.source.json");
    let vectors_path = dir.0.join("vectors/edge-gate.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut vectors: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&vectors_path).unwrap()).unwrap();
    edit(&mut manifest, &mut vectors);
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    std::fs::write(&vectors_path, serde_json::to_vec_pretty(&vectors).unwrap()).unwrap();
    dir
}

/// Runs the CLI: exit code and stdout.
fn run(args: &[&str]) -> (i32, String) {
    let out = omnirelay(args).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = out.status.code().unwrap();
    assert!(
        code == 0 || code == 1,
        "{args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code, stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_v2_that_refuses_one_cluster_reports_exactly_its_decisions() {
    let repo = PolicyRepo::new("replay");
    repo.publish(&bundle_source("replay", "v1", 3600).0, "1.0.0", None);
    let gw = Gateway::start_with("replay", |t| follow_repo(t, &repo.url(), ""));
    policy_status_until(&gw, "v1 active", |s| s["active"]["version"] == "1.0.0").await;
    let eu = gw.issue_token("edge-eu", "dispatcher", 100).await.token;
    let us = gw.issue_token("edge-us", "dispatcher", 100).await.token;
    for i in 0..6 {
        join_ok(&gw, &eu, &format!("eu-{i}")).await;
    }
    for i in 0..4 {
        join_ok(&gw, &us, &format!("us-{i}")).await;
    }

    // Every decision is kept (off the request path, so wait for it), without the token.
    let deadline = Instant::now() + Duration::from_secs(30);
    let recorded = loop {
        let reply = gw.admin().get("/admin/v1/decisions").await.unwrap();
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&reply.body).unwrap();
        if rows.len() >= 10 {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "only {} decisions kept",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(recorded.len(), 10);
    for d in &recorded {
        let input = d["input"].as_str().unwrap();
        assert!(!input.contains(&eu) && !input.contains(&us), "{input}");
        assert_eq!(d["policy_version"], "1.0.0");
        assert!(d["outcome"].as_str().unwrap().contains("\"allow\""), "{d}");
    }

    let v2 = variant("replay-v2", 3600, |manifest, vectors| {
        manifest["policies"][0]["settings"]["clusters"] = serde_json::json!(["edge-eu"]);
        // The edge-us relay in maintenance is now refused for its cluster first.
        vectors["vectors"][1]["expect"]["deny"]["code"] = "not-an-edge-node".into();
    });
    let v2 = v2.0.to_str().unwrap();
    let config = gw.config_naming_the_admin_port();

    let (code, out) = run(&["policy", "replay", "--candidate", v2, "--config", &config]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("replayed 10 decisions"), "{out}");
    assert!(out.contains(": 4 flips"), "{out}");
    assert!(out.contains("allow→deny: 4"), "{out}");
    for i in 0..4 {
        assert!(out.contains(&format!("node us-{i} ")), "{out}");
    }
    assert!(!out.contains("node eu-"), "{out}");
    assert!(out.contains("\"not-an-edge-node\""), "{out}");
    let (code, out) = run(&[
        "policy",
        "replay",
        "--candidate",
        v2,
        "--fail-on-flip",
        "--config",
        &config,
    ]);
    assert_eq!(code, 1, "{out}");

    // The version that decided: nothing flips.
    let v1 = bundle_source("replay-same", "v1", 3600);
    let (code, out) = run(&[
        "policy",
        "replay",
        "--candidate",
        v1.0.to_str().unwrap(),
        "--fail-on-flip",
        "--config",
        &config,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(": 0 flips"), "{out}");

    // A shorter lifetime changes every grant's TTL.
    let v3 = bundle_source("replay-ttl", "v1", 1800);
    let (_, out) = run(&[
        "policy",
        "replay",
        "--candidate",
        v3.0.to_str().unwrap(),
        "--config",
        &config,
    ]);
    assert!(out.contains("changed TTL: 10"), "{out}");

    // CI's way: export, then replay the file before publishing.
    let file = gw.path("decisions.jsonl");
    let (code, out) = run(&[
        "decisions",
        "export",
        "--out",
        file.to_str().unwrap(),
        "--config",
        &config,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("exported 10 decisions"), "{out}");
    let (code, out) = run(&[
        "policy",
        "replay",
        "--candidate",
        v2,
        "--decisions",
        file.to_str().unwrap(),
        "--fail-on-flip",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("replayed 10 decisions"), "{out}");
    assert!(out.contains("allow→deny: 4"), "{out}");

    // A version already in the policy repository, by its number: from the repository the
    // gateway follows, or from the one `--repo` names.
    let commit = repo.publish(Path::new(v2), "2.0.0", None);
    let (code, out) = run(&[
        "policy",
        "replay",
        "--candidate",
        "2.0.0",
        "--config",
        &config,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("candidate: bundle edge 2.0.0 (commit {commit})")),
        "{out}"
    );
    assert!(out.contains("allow→deny: 4"), "{out}");
    let url = repo.url();
    let (code, out) = run(&[
        "policy",
        "replay",
        "--candidate",
        "v2.0.0",
        "--repo",
        &url,
        "--decisions",
        file.to_str().unwrap(),
        "--fail-on-flip",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("allow→deny: 4"), "{out}");
    let missing = omnirelay(&[
        "policy",
        "replay",
        "--candidate",
        "9.9.9",
        "--config",
        &config,
    ])
    .unwrap();
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success(), "{said}");
    assert!(
        said.contains("the policy repository has no version \"9.9.9\" (no tag v9.9.9"),
        "{said}"
    );
}
