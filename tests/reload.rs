//! Policy bundles published to a git repository and taken live by a running gateway: the swap
//! under load, broken candidates, signatures, restarts without the remote, pin and unpin.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway::api::wire::JoinResponse;
use omnirelay_e2e::bundles::{PolicyRepo, bundle_source, follow_repo};
use omnirelay_e2e::*;

/// One join of the load: when it started and ended, and what decided it.
#[derive(Debug, Clone)]
struct Done {
    started: Instant,
    finished: Instant,
    status: u16,
    version: Option<String>,
    serial: Option<String>,
}

async fn join_once(gw_node: &gateway::agent::GatewayClient, token: &str, node: &str) -> Done {
    let key = NodeKey::new(node);
    let request = join_request(gw_node, token, node, &key).await;
    let started = Instant::now();
    let reply = post_join(gw_node, &request).await;
    let finished = Instant::now();
    let parsed: Option<JoinResponse> = serde_json::from_slice(&reply.body).ok();
    Done {
        started,
        finished,
        status: reply.status.as_u16(),
        version: parsed.as_ref().map(|r| r.policy.version.clone()),
        serial: parsed.map(|r| r.serial),
    }
}

/// The policy status from the admin API.
async fn status(gw: &Gateway) -> serde_json::Value {
    let reply = gw.admin().get("/admin/v1/policy/status").await.unwrap();
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    serde_json::from_slice(&reply.body).unwrap()
}

/// Polls the status (with a deadline) until `done` holds for it.
async fn status_until(
    gw: &Gateway,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(gw).await;
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never happened; last status {s:#}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_v2_under_load_takes_effect_without_a_failed_request() {
    let repo = PolicyRepo::new("swap");
    let (v1, v2) = (
        bundle_source("swap", "v1", 3600),
        bundle_source("swap", "v2", 1800),
    );
    repo.publish(&v1.0, "1.0.0", None);
    let gw = Gateway::start_with("swap", |t| follow_repo(t, &repo.url(), ""));
    status_until(&gw, "v1 active", |s| s["active"]["version"] == "1.0.0").await;
    let token = gw
        .issue_token("edge-eu", "dispatcher", 1_000_000)
        .await
        .token;

    let done: Arc<Mutex<Vec<Done>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (count_tx, mut count) = tokio::sync::watch::channel(0usize);
    let count_tx = Arc::new(count_tx);
    let mut workers = tokio::task::JoinSet::new();
    const WORKERS: usize = 2;
    for w in 0..WORKERS {
        let (client, token, done, stop, count_tx) = (
            gw.node(),
            token.clone(),
            done.clone(),
            stop.clone(),
            count_tx.clone(),
        );
        workers.spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let outcome = join_once(&client, &token, &format!("load-{w}-{i}")).await;
                done.lock().unwrap().push(outcome);
                count_tx.send_modify(|c| *c += 1);
                i += 1;
            }
        });
    }
    count.wait_for(|c| *c >= 50).await.unwrap();

    let v2_source = v2.0.clone();
    let repo_url = repo.dir.0.clone();
    let published = tokio::task::spawn_blocking(move || {
        let repo = PolicyRepo {
            dir: TempDir(repo_url),
        };
        let commit = repo.publish(&v2_source, "1.1.0", None);
        std::mem::forget(repo); // the outer `repo` owns (and removes) the directory
        (commit, Instant::now())
    });
    let (v2_commit, published_at) = published.await.unwrap();
    let switched = status_until(&gw, "v2 active", |s| s["active"]["version"] == "1.1.0").await;
    assert_eq!(switched["active"]["commit"], v2_commit);
    // Up to one join per worker was decided by v1 before the swap and counted after the status
    // showed v2: wait for those beyond the 100 that v2 must decide.
    let after_switch = *count.borrow();
    count
        .wait_for(|c| *c >= after_switch + 100 + WORKERS)
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    while workers.join_next().await.is_some() {}

    let done = done.lock().unwrap().clone();
    assert!(done.len() >= 150, "only {} joins", done.len());
    let failed: Vec<_> = done.iter().filter(|d| d.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} joins failed: {:?}",
        failed.len(),
        done.len(),
        &failed[..failed.len().min(3)]
    );
    let versions: Vec<&str> = done.iter().map(|d| d.version.as_deref().unwrap()).collect();
    assert!(versions.iter().all(|v| *v == "1.0.0" || *v == "1.1.0"));
    let first_v2 = done
        .iter()
        .filter(|d| d.version.as_deref() == Some("1.1.0"))
        .map(|d| d.finished)
        .min()
        .unwrap();
    let late_v1 = done
        .iter()
        .filter(|d| d.started > first_v2 && d.version.as_deref() == Some("1.0.0"))
        .count();
    assert_eq!(
        late_v1, 0,
        "joins that started after the first v2 decision were decided by v1"
    );
    let (n1, n2) = (
        versions.iter().filter(|v| **v == "1.0.0").count(),
        versions.iter().filter(|v| **v == "1.1.0").count(),
    );
    assert!(n1 >= 50 && n2 >= 100, "v1 {n1}, v2 {n2}");
    eprintln!(
        "{} joins, {n1} decided by v1 and {n2} by v2, none failed; first v2 decision {:?} after `policy publish` returned",
        done.len(),
        first_v2.saturating_duration_since(published_at)
    );

    // The audit log says the same, join by join (the file mirror trails the commits a little).
    let deadline = Instant::now() + Duration::from_secs(30);
    let audited = loop {
        let audited: BTreeMap<String, String> = gw
            .audit_lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["event"]["kind"] == "identity-issued")
            .map(|e| {
                (
                    e["event"]["serial"].as_str().unwrap().to_string(),
                    e["event"]["policy"]["version"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                )
            })
            .collect();
        if audited.len() >= done.len() || Instant::now() > deadline {
            break audited;
        }
        std::thread::yield_now();
    };
    for d in &done {
        assert_eq!(audited.get(d.serial.as_ref().unwrap()), d.version.as_ref());
    }
    let activated = gw.wait_for_audit("policy-activated", |e| e["version"] == "1.1.0");
    assert_eq!(activated["commit"], v2_commit);
    assert_eq!(activated["trigger"], "poll");
}

/// Takes a good version's files, lets `change` break them, and commits the result on `main`.
fn commit_broken(
    repo: &PolicyRepo,
    good: &BTreeMap<String, Vec<u8>>,
    change: impl FnOnce(&mut BTreeMap<String, Vec<u8>>),
) -> String {
    let mut files = good.clone();
    let mut manifest: serde_json::Value = serde_json::from_slice(&files["bundle.json"]).unwrap();
    manifest["version"] = "1.2.0".into();
    files.insert(
        "bundle.json".into(),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    );
    change(&mut files);
    repo.commit_files(&files, None)
}

fn edit_manifest(files: &mut BTreeMap<String, Vec<u8>>, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut manifest: serde_json::Value = serde_json::from_slice(&files["bundle.json"]).unwrap();
    edit(&mut manifest);
    files.insert(
        "bundle.json".into(),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_candidates_are_refused_each_with_its_reason_while_the_last_good_keeps_serving() {
    let repo = PolicyRepo::new("broken");
    let v1_commit = repo.publish(&bundle_source("broken", "v1", 3600).0, "1.0.0", None);
    let v2_commit = repo.publish(&bundle_source("broken", "v2", 1800).0, "1.1.0", None);
    let good = repo.files();
    let gw = Gateway::start_with("broken", |t| follow_repo(t, &repo.url(), ""));
    status_until(&gw, "v2 active", |s| s["active"]["version"] == "1.1.0").await;
    let token = gw.issue_token("edge-us", "relay", 1000).await.token;

    type Breaker = Box<dyn FnOnce(&mut BTreeMap<String, Vec<u8>>)>;
    let cases: Vec<(&str, Breaker)> = vec![
        (
            "digest_mismatch",
            Box::new(|f| {
                edit_manifest(f, |m| m["policies"][0]["sha256"] = "ab".repeat(32).into());
            }),
        ),
        (
            "schema_error",
            Box::new(|f| edit_manifest(f, |m| m["version"] = "2".into())),
        ),
        (
            "vector_failure",
            Box::new(|f| {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&f["vectors/edge-gate.json"]).unwrap();
                v["vectors"][0]["expect"] =
                    serde_json::json!({"deny": {"code": "not-an-edge-node"}});
                f.insert(
                    "vectors/edge-gate.json".into(),
                    serde_json::to_vec(&v).unwrap(),
                );
            }),
        ),
        (
            "settings_error",
            Box::new(|f| {
                edit_manifest(f, |m| {
                    m["policies"][0]["settings"]["clusters"] = serde_json::json!([])
                });
            }),
        ),
        (
            "compile_error",
            Box::new(|f| {
                let junk = b"\0asm\x01\0\0\0 this is not a component".to_vec();
                let digest = format!("{:x}", sha2_digest(&junk));
                f.insert("modules/edge-gate.wasm".into(), junk);
                edit_manifest(f, |m| m["policies"][0]["sha256"] = digest.into());
            }),
        ),
    ];
    for (label, breaker) in cases {
        let commit = commit_broken(&repo, &good, breaker);
        let s = status_until(&gw, label, |s| {
            s["last_candidate"]["commit"] == commit.as_str()
        })
        .await;
        assert_eq!(s["last_candidate"]["result"], label, "{s:#}");
        assert!(
            s["last_candidate"]["reason"]
                .as_str()
                .is_some_and(|r| !r.is_empty())
        );
        assert_eq!(
            s["active"]["commit"], v2_commit,
            "a refused version must not serve"
        );
        let node = gw.node();
        let d = join_once(&node, &token, &format!("after-{}", label.replace('_', "-"))).await;
        assert_eq!(
            (d.status, d.version.as_deref()),
            (200, Some("1.1.0")),
            "{label}"
        );
        let rejected = gw.wait_for_audit("policy-rejected", |e| e["commit"] == commit.as_str());
        assert_eq!(rejected["result"], label);
    }

    // An older commit: main forced back to v1.
    repo.reset_main(&v1_commit);
    let s = status_until(&gw, "rollback refused", |s| {
        s["last_candidate"]["commit"] == v1_commit.as_str()
    })
    .await;
    assert_eq!(s["last_candidate"]["result"], "rollback_refused", "{s:#}");
    assert_eq!(s["active"]["commit"], v2_commit);

    let metrics =
        String::from_utf8(gw.admin().get("/metrics").await.unwrap().body.to_vec()).unwrap();
    for label in [
        "ok",
        "digest_mismatch",
        "schema_error",
        "vector_failure",
        "settings_error",
        "compile_error",
        "rollback_refused",
    ] {
        assert!(
            metrics.contains(&format!(
                "bootstrap_policy_reload_total{{result=\"{label}\"}}"
            )),
            "no {label} in\n{metrics}"
        );
    }
    assert!(metrics.contains(&format!(
        "bootstrap_policy_active{{bundle=\"edge\",version=\"1.1.0\",commit=\"{v2_commit}\"}} 1"
    )));
}

fn sha2_digest(bytes: &[u8]) -> impl std::fmt::LowerHex {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    Hex(digest.to_vec())
}

struct Hex(Vec<u8>);

impl std::fmt::LowerHex for Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_signatures_required_only_commits_signed_by_an_allowed_signer_serve() {
    let keys = TempDir::new("signers");
    let keygen = |name: &str| {
        let path = keys.0.join(name);
        let out = omnirelay(&[
            "policy",
            "keygen",
            "--out",
            path.to_str().unwrap(),
            "--principal",
            name,
        ])
        .unwrap();
        assert!(out.status.success());
        (path, String::from_utf8(out.stdout).unwrap())
    };
    let (ci_key, ci_line) = keygen("ci");
    let (rogue_key, _) = keygen("rogue");
    let signers = keys.0.join("allowed_signers");
    std::fs::write(&signers, format!("# who may publish policy\n{ci_line}")).unwrap();

    let repo = PolicyRepo::new("signed");
    repo.publish(
        &bundle_source("signed", "v1", 3600).0,
        "1.0.0",
        Some(&ci_key),
    );
    let extra = format!(
        "require_signed_commits = true\nallowed_signers = \"{}\"",
        signers.display()
    );
    let gw = Gateway::start_with("signed", |t| follow_repo(t, &repo.url(), &extra));
    let active = status_until(&gw, "signed v1 active", |s| {
        s["active"]["version"] == "1.0.0"
    })
    .await;

    let unsigned = commit_broken(&repo, &repo.files(), |_| {});
    let s = status_until(&gw, "unsigned refused", |s| {
        s["last_candidate"]["commit"] == unsigned.as_str()
    })
    .await;
    assert_eq!(s["last_candidate"]["result"], "signature_error", "{s:#}");
    assert!(
        s["last_candidate"]["reason"]
            .as_str()
            .unwrap()
            .contains("not signed")
    );

    let rogue = gateway_key(&rogue_key);
    let forged = repo.commit_files(
        &repo.files(),
        Some(&|content: &str| gateway::reload::sshsig::sign(&rogue, content.as_bytes())),
    );
    let s = status_until(&gw, "rogue refused", |s| {
        s["last_candidate"]["commit"] == forged.as_str()
    })
    .await;
    assert_eq!(s["last_candidate"]["result"], "signature_error", "{s:#}");
    assert!(
        s["last_candidate"]["reason"]
            .as_str()
            .unwrap()
            .contains("allowed_signers")
    );
    assert_eq!(s["active"], active["active"]);

    // The hand-made candidates claimed 1.2.0; a real release comes after them.
    let v2 = repo.publish(
        &bundle_source("signed", "v2", 1800).0,
        "1.3.0",
        Some(&ci_key),
    );
    let s = status_until(&gw, "signed v2 active", |s| {
        s["active"]["version"] == "1.3.0"
    })
    .await;
    assert_eq!(s["active"]["commit"], v2);
}

fn gateway_key(path: &std::path::Path) -> aws_lc_rs::signature::Ed25519KeyPair {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(path).unwrap();
    aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_the_remote_serves_the_last_good_version() {
    let repo = PolicyRepo::new("cold");
    repo.publish(&bundle_source("cold", "v1", 3600).0, "1.0.0", None);
    let v2 = repo.publish(&bundle_source("cold", "v2", 1800).0, "1.1.0", None);
    let gw = Gateway::start_with("cold", |t| follow_repo(t, &repo.url(), ""));
    status_until(&gw, "v2 active", |s| s["active"]["commit"] == v2.as_str()).await;
    let (dir, exit) = gw.stop();
    assert!(exit.success(), "{exit:?}");

    drop(repo); // the remote is gone
    let gw = Gateway::spawn(dir);
    let s = status(&gw).await;
    assert_eq!(s["active"]["commit"], v2, "{s:#}");
    assert_eq!(s["active"]["version"], "1.1.0");
    let token = gw.issue_token("edge-eu", "relay", 1).await.token;
    let d = join_once(&gw.node(), &token, "cold-1").await;
    assert_eq!((d.status, d.version.as_deref()), (200, Some("1.1.0")));
    let s = status_until(&gw, "a failed poll", |s| {
        s["last_poll"]["result"] == "fetch_error"
    })
    .await;
    assert_eq!(s["active"]["commit"], v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinning_v1_and_unpinning_switch_versions_and_are_audited() {
    let repo = PolicyRepo::new("pin");
    let v1 = repo.publish(&bundle_source("pin", "v1", 3600).0, "1.0.0", None);
    let v2 = repo.publish(&bundle_source("pin", "v2", 1800).0, "1.1.0", None);
    let gw = Gateway::start_with("pin", |t| follow_repo(t, &repo.url(), ""));
    status_until(&gw, "v2 active", |s| s["active"]["commit"] == v2.as_str()).await;
    let token = gw.issue_token("edge-eu", "dispatcher", 10).await.token;

    // Pin through the CLI, as an operator would.
    let admin = format!("https://{}", gw.admin_addr);
    let credential = gw.path("admin/credential");
    let ca = gw.path("ca/ca.pem");
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend([
            "--admin",
            &admin,
            "--credential",
            credential.to_str().unwrap(),
            "--ca-bundle",
            ca.to_str().unwrap(),
        ]);
        let out = omnirelay(&all).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let out = cli(&["policy", "pin", "1.0.0"]);
    assert!(out.contains("active edge 1.0.0"), "{out}");
    let s = status(&gw).await;
    assert_eq!(
        (s["active"]["commit"].as_str(), s["pinned"].as_str()),
        (Some(v1.as_str()), Some("1.0.0"))
    );
    let d = join_once(&gw.node(), &token, "pinned-1").await;
    assert_eq!(d.version.as_deref(), Some("1.0.0"));
    // Polls do not move a pinned gateway.
    status_until(&gw, "a poll while pinned", |s| {
        s["last_poll"]["result"] == "unchanged" && s["active"]["commit"] == v1.as_str()
    })
    .await;

    let out = cli(&["policy", "unpin"]);
    assert!(out.contains("active edge 1.1.0"), "{out}");
    let d = join_once(&gw.node(), &token, "unpinned-1").await;
    assert_eq!(d.version.as_deref(), Some("1.1.0"));
    let status_out = cli(&["policy", "status"]);
    assert!(status_out.contains("\"pinned\": null"), "{status_out}");

    let pinned = gw.wait_for_audit("policy-pinned", |e| e["target"] == "1.0.0");
    assert_eq!(pinned["commit"], v1);
    gw.wait_for_audit("policy-activated", |e| {
        e["commit"] == v1.as_str() && e["trigger"] == "pin"
    });
    gw.wait_for_audit("policy-unpinned", |_| true);
    gw.wait_for_audit("policy-activated", |e| {
        e["commit"] == v2.as_str() && e["trigger"] == "poll"
    });
}

#[test]
fn a_version_that_fails_its_own_tests_is_not_published() {
    let repo = PolicyRepo::new("refuse");
    let good = repo.publish(&bundle_source("refuse", "v1", 3600).0, "1.0.0", None);
    let source = bundle_source("refuse", "v2", 1800);
    // The settings say 1800 s; make the vector expect something else.
    let path = source.0.join("vectors/edge-gate.json");
    let mut vectors: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    vectors["vectors"][0]["expect"]["allow"]["ttl_seconds"] = 60.into();
    std::fs::write(&path, serde_json::to_vec(&vectors).unwrap()).unwrap();
    let out = omnirelay(&[
        "policy",
        "publish",
        "--source",
        source.0.to_str().unwrap(),
        "--repo",
        &repo.url(),
        "--version",
        "1.1.0",
    ])
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stdout.contains("FAIL  an edge dispatcher is admitted")
            && stdout.contains("ttl_seconds: expected 60, got 1800"),
        "{stdout}"
    );
    assert!(
        stderr.contains("not publishing 1.1.0: its own tests fail"),
        "{stderr}"
    );
    assert_eq!(repo.head(), good, "nothing was pushed");
}
