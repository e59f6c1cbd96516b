//! `omnirelay policy new`: a policy repository scaffolded outside this tree builds and tests
//! on its own (`cargo test`, `omnirelay policy test`), publishes from there (`policy publish`,
//! and its own `ci/publish.sh`), and a real gateway serves what it published. The example
//! repository, copied out of the tree, works the same way.
//!
//! Cargo runs offline here (no network beyond loopback) with a target directory under this
//! build's own, so the dependencies are compiled once; the scaffold itself needs neither.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use omnirelay_e2e::bundles::{PolicyRepo, follow_repo, policy_status_until};
use omnirelay_e2e::*;

/// Where the scaffolds build: beside this build's own artifacts, kept between runs.
fn scaffold_target() -> PathBuf {
    bin()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("scaffold")
}

/// `program args` in `dir`, offline, building into [`scaffold_target`]; exit code and output.
fn run_in(dir: &Path, program: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", scaffold_target())
        .env("CARGO_NET_OFFLINE", "true")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn cargo() -> PathBuf {
    PathBuf::from(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// `cargo test` in `dir`, warnings denied (the scaffold's code is what authors start from).
fn cargo_test(dir: &Path) -> String {
    let (code, text) = run_in(dir, &cargo(), &["test"], &[("RUSTFLAGS", "-D warnings")]);
    assert_eq!(code, 0, "cargo test in {}: {text}", dir.display());
    text
}

/// `omnirelay policy test .` in `dir`.
fn policy_test(dir: &Path) -> String {
    let (code, text) = run_in(dir, &bin(), &["policy", "test", "."], &[]);
    assert_eq!(code, 0, "policy test in {}: {text}", dir.display());
    assert!(text.contains("all vectors passed"), "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaffolded_repository_builds_tests_and_publishes_outside_the_tree() {
    let outside = TempDir::new("scaffold");
    assert!(!outside.0.starts_with(repo_root()));
    let dir = outside.0.join("edge-policy");
    let sdk = repo_root().join("policy-sdk");
    let (code, text) = run_in(
        &outside.0,
        &bin(),
        &[
            "policy",
            "new",
            dir.to_str().unwrap(),
            "--name",
            "edge-policy",
            "--sdk-path",
            sdk.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{text}");
    for file in [
        "Cargo.toml",
        "rust-toolchain.toml",
        "README.md",
        "bundle.source.json",
        "edge-policy/Cargo.toml",
        "edge-policy/src/lib.rs",
        "vectors/edge-policy.json",
        "schemas/edge-policy-evidence.json",
        ".github/workflows/policy.yml",
        "ci/publish.sh",
    ] {
        assert!(dir.join(file).is_file(), "{file} was not written: {text}");
    }
    let toolchain = std::fs::read_to_string(dir.join("rust-toolchain.toml")).unwrap();
    assert!(toolchain.contains("wasm32-wasip2"), "{toolchain}");
    let workflow = std::fs::read_to_string(dir.join(".github/workflows/policy.yml")).unwrap();
    assert!(
        workflow.contains("ci/publish.sh") && workflow.contains("tags: [\"v*\"]"),
        "{workflow}"
    );
    let script = std::fs::metadata(dir.join("ci/publish.sh")).unwrap();
    assert_eq!(script.permissions().mode() & 0o111, 0o111);

    let tested = cargo_test(&dir);
    assert!(tested.contains("test result: ok. 3 passed"), "{tested}");
    // What authors start from is formatted as rustfmt would.
    let (code, text) = run_in(&dir, &cargo(), &["fmt", "--check"], &[]);
    assert_eq!(code, 0, "{text}");
    let vectors = policy_test(&dir);
    assert_eq!(vectors.matches("PASS").count(), 3, "{vectors}");

    let repo = PolicyRepo::new("scaffold");
    let (code, text) = run_in(
        &dir,
        &bin(),
        &[
            "policy",
            "publish",
            "--source",
            ".",
            "--repo",
            &repo.url(),
            "--version",
            "1.0.0",
        ],
        &[],
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("published edge-policy 1.0.0"), "{text}");

    let gw = Gateway::start_with("scaffold", |t| follow_repo(t, &repo.url(), ""));
    let status =
        policy_status_until(&gw, "1.0.0 active", |s| s["active"]["version"] == "1.0.0").await;
    assert_eq!(status["active"]["bundle"], "edge-policy");
    let token = gw.issue_token("edge-eu", "dispatcher", 1).await.token;
    let joined = join_ok(&gw, &token, "scaffolded-1").await;
    assert_eq!(joined.policy.version, "1.0.0");
    assert!(
        joined
            .spiffe_id
            .ends_with("/cluster/edge-eu/role/dispatcher/node/scaffolded-1"),
        "{}",
        joined.spiffe_id
    );
    let relay = gw.issue_token("edge-eu", "relay", 1).await.token;
    let node = gw.node();
    let refused = post_join(
        &node,
        &join_request(&node, &relay, "scaffolded-2", &NodeKey::new("scaffolded-2")).await,
    )
    .await;
    assert_eq!(refused.status, 403);
    assert_eq!(problem(&refused).reason, "not-admitted");

    // The repository's own CI script: tests only without a tag, publishes with one.
    let script = dir.join("ci/publish.sh");
    let omnirelay = bin().display().to_string();
    let env = [
        ("OMNIRELAY", omnirelay.as_str()),
        ("POLICY_REPO", &repo.url()),
    ];
    let (code, text) = run_in(&dir, &script, &[], &env);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("tested, not published"), "{text}");
    let (code, text) = run_in(&dir, &script, &["v1.1.0"], &env);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("published edge-policy 1.1.0"), "{text}");
    policy_status_until(&gw, "1.1.0 active", |s| s["active"]["version"] == "1.1.0").await;
}

#[test]
fn the_example_repository_works_when_copied_out_of_the_tree() {
    let outside = TempDir::new("example-copy");
    let copy = outside.0.join("policy-repo");
    copy_tree(&repo_root().join("examples/policy-repo"), &copy);
    // What its README tells an author to do with a copy: point the one SDK line elsewhere.
    let manifest = copy.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let sdk = repo_root().join("policy-sdk");
    let pointed = text.replace(
        "policy-sdk = { path = \"../../policy-sdk\" }",
        &format!("policy-sdk = {{ path = \"{}\" }}", sdk.display()),
    );
    assert_ne!(pointed, text, "the example's SDK line moved: {text}");
    std::fs::write(&manifest, pointed).unwrap();

    let tested = cargo_test(&copy);
    assert!(tested.contains("test result: ok. 3 passed"), "{tested}");
    let vectors = policy_test(&copy);
    assert!(vectors.contains("bundle edge "), "{vectors}");
    let listed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(copy.join("vectors/edge-gate.json")).unwrap())
            .unwrap();
    let listed = listed["vectors"].as_array().unwrap().len();
    assert!(listed >= 3, "{listed}");
    assert_eq!(vectors.matches("PASS").count(), listed, "{vectors}");
}

/// Copies a directory tree (without build output).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "target" {
            continue;
        }
        let (source, dest) = (entry.path(), to.join(&name));
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&source, &dest);
        } else {
            std::fs::copy(&source, &dest).unwrap();
        }
    }
}
