//! `omnirelay policy test`: what a policy author and CI run, through the real binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use omnirelay_e2e::{omnirelay, policy_dir, repo_root};

fn wasm(name: &str) -> String {
    policy_dir()
        .join(format!("{name}.wasm"))
        .display()
        .to_string()
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = omnirelay(args).unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

#[test]
fn example_policies_pass_their_vectors_and_report_fuel() {
    for (policy, crate_dir, count) in [
        ("cluster_role", "cluster-role", 6),
        ("posture", "posture", 5),
        ("deny_all", "deny-all", 1),
    ] {
        let vectors = repo_root()
            .join("policies")
            .join(crate_dir)
            .join("vectors.json");
        let (code, stdout, stderr) =
            run(&["policy", "test", &wasm(policy), vectors.to_str().unwrap()]);
        assert_eq!(code, 0, "{policy}: {stdout}{stderr}");
        assert_eq!(stdout.matches("  PASS  ").count(), count, "{stdout}");
        assert!(
            stdout.contains(&format!("{count} passed, 0 failed")),
            "{stdout}"
        );
        for line in stdout.lines().filter(|l| l.contains("PASS")) {
            let fuel: u64 = line
                .split("fuel")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!(fuel > 0, "{line}");
        }
    }
}

fn write_vectors(dir: &std::path::Path, json: &str) -> String {
    let path = dir.join("vectors.json");
    std::fs::write(&path, json).unwrap();
    path.display().to_string()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("omnirelay-e2e-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const REQUEST: &str = r#"{"token": {"audit_id": "a", "cluster": "edge-eu", "role": "dispatcher",
    "trust_domain": "example.org"}, "node_name": "n1", "now_ms": 1767225600000}"#;

#[test]
fn a_mismatched_vector_fails_the_run_and_says_what_differed() {
    let dir = temp_dir("mismatch");
    let json = format!(
        r#"{{"settings": {{"clusters": ["edge-eu"], "roles": ["dispatcher"], "ttl_seconds": 600}},
            "vectors": [
              {{"name": "right", "request": {REQUEST}, "expect": {{"allow": {{"ttl_seconds": 600}}}}}},
              {{"name": "wrong", "request": {REQUEST}, "expect": {{"deny": {{"code": "nope"}}}}}}
            ]}}"#
    );
    let vectors = write_vectors(&dir, &json);
    let (code, stdout, _) = run(&["policy", "test", &wasm("cluster_role"), &vectors]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("PASS  right"), "{stdout}");
    assert!(
        stdout.contains("FAIL  wrong")
            && stdout
                .contains("expected deny nope, got allow /cluster/edge-eu/role/dispatcher/node/n1"),
        "{stdout}"
    );
    assert!(stdout.contains("1 passed, 1 failed"), "{stdout}");
}

#[test]
fn exceeding_the_fuel_budget_fails_the_vector() {
    let dir = temp_dir("budget");
    let json = format!(
        r#"{{"settings": {{"clusters": ["edge-eu"], "roles": ["dispatcher"], "ttl_seconds": 600}},
            "fuel_budget": 500,
            "vectors": [{{"name": "too costly", "request": {REQUEST}, "expect": {{"allow": {{}}}}}}]}}"#
    );
    let vectors = write_vectors(&dir, &json);
    let (code, stdout, _) = run(&["policy", "test", &wasm("cluster_role"), &vectors]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("error fuel-exhausted"), "{stdout}");
}

#[test]
fn hostile_policies_can_be_expected_to_fail_closed() {
    let dir = temp_dir("hostile");
    let json = format!(
        r#"{{"vectors": [{{"name": "spins", "request": {REQUEST}, "expect": {{"error": "timeout"}}}}]}}"#
    );
    let vectors = write_vectors(&dir, &json);
    let (code, stdout, stderr) = run(&["policy", "test", &wasm("fixture_infinite_loop"), &vectors]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[test]
fn a_policy_for_another_wit_version_is_refused_with_a_clear_error() {
    let dir = temp_dir("wrong-wit");
    let vectors = write_vectors(&dir, r#"{"vectors": []}"#);
    let (code, _, stderr) = run(&["policy", "test", &wasm("fixture_wrong_wit"), &vectors]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("built against omnirelay:bootstrap-policy@0.0.1"),
        "{stderr}"
    );
}
