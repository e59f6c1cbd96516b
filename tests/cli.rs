//! The operator and node command lines, run as the real binary against a real gateway: token
//! issue/list/revoke, `mesh bootstrap join`, `audit verify|query`, `check-config`, `demo`; and
//! the idempotent retry a node's agent relies on.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use gateway::api::wire::{IssueTokenResponse, JoinResponse};
use gateway::store::TokenRecord;
use gateway::token::TokenId;
use omnirelay_e2e::*;
use rcgen::PublicKeyData;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};

/// Runs the CLI; returns exit code, stdout, stderr.
fn run(args: &[&str]) -> (i32, String, String) {
    let out = omnirelay(args).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn token_list(config: &str) -> Vec<TokenRecord> {
    let (code, stdout, stderr) = run(&["token", "list", "--json", "--config", config]);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_issues_a_token_node_joins_with_it_and_is_refused_once_it_is_revoked() {
    let gw = Gateway::start("cli-tokens");
    let config = gw.config_naming_the_admin_port();

    let issued_at = unix_now();
    let (code, stdout, stderr) = run(&[
        "token",
        "issue",
        "--cluster",
        "edge-eu",
        "--role",
        "dispatcher",
        "--ttl",
        "15m",
        "--max-uses",
        "2",
        "--output",
        "json",
        "--config",
        &config,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let issued: IssueTokenResponse = serde_json::from_str(&stdout).unwrap();
    TokenId::parse(&issued.id).unwrap();
    assert_eq!(issued.token.split('.').count(), 3, "a compact JWS");
    assert!(
        (issued_at + 900..=unix_now() + 900).contains(&issued.expires_at),
        "15 minutes: {}",
        issued.expires_at
    );

    let listed = token_list(&config);
    let record = listed
        .iter()
        .find(|t| t.id.to_string() == issued.id)
        .unwrap();
    assert_eq!(
        (
            record.cluster.as_str(),
            record.role.as_str(),
            record.max_uses,
            record.uses
        ),
        ("edge-eu", "dispatcher", 2, 0)
    );

    // The node side, given only the token file, the CA bundle and the gateway's address.
    let token_file = gw.path("node-token");
    std::fs::write(&token_file, format!("{}\n", issued.token)).unwrap();
    let gateway_url = format!("https://{}", gw.node_addr);
    let ca = gw.path("ca/ca.pem");
    let out = gw.path("node-n1");
    let join = |out: &Path, name: &str| {
        let args = join_args(&gateway_url, &token_file, &ca, out, name);
        run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (code, stdout, stderr) = join(&out, "n1");
    assert_eq!(code, 0, "{stdout}{stderr}");
    let want = format!("spiffe://{TRUST_DOMAIN}/cluster/edge-eu/role/dispatcher/node/n1");
    assert!(
        stdout.lines().any(|l| l == format!("joined as {want}")),
        "{stdout}"
    );
    let key_mode = std::fs::metadata(out.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "key.pem is private");
    let cert = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    let bundle = std::fs::read(out.join("bundle.pem")).unwrap();
    verify_with_webpki(&cert, &bundle);
    // The certificate is for the key the node kept.
    let key = std::fs::read(out.join("key.pem")).unwrap();
    let key_der = PrivatePkcs8KeyDer::from_pem_slice(&key).unwrap();
    let leaf = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let key_pair = rcgen::KeyPair::try_from(key_der.secret_pkcs8_der()).unwrap();
    assert_eq!(parsed.public_key().raw, key_pair.subject_public_key_info());
    let svid = spiffe::X509Svid::parse_from_der(&leaf, key_der.secret_pkcs8_der()).unwrap();
    assert_eq!(svid.spiffe_id().to_string(), want);
    assert_renewable(&out, &gateway_url, &want);
    assert_eq!(
        token_list(&config)
            .iter()
            .find(|t| t.id.to_string() == issued.id)
            .unwrap()
            .uses,
        1
    );

    // Revoked: the second use is refused, clearly, and nothing is written.
    let (code, stdout, stderr) = run(&["token", "revoke", &issued.id, "--config", &config]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), format!("revoked {}: true", issued.id));
    assert!(
        token_list(&config)
            .iter()
            .any(|t| t.id.to_string() == issued.id && t.revoked_at.is_some())
    );
    let refused_out = gw.path("node-n2");
    let (code, stdout, stderr) = join(&refused_out, "n2");
    assert_ne!(code, 0, "{stdout}");
    assert!(
        stderr.contains("stage token") && stderr.contains("token-revoked"),
        "{stderr}"
    );
    assert!(!refused_out.join("cert.pem").exists());
    assert!(!refused_out.join("key.pem").exists());
}

/// What a join leaves for renewal: the SVID in a version directory that `..data` names, the
/// stable names as links into it, and `agent.json` naming the gateway and this SVID.
fn assert_renewable(out: &Path, gateway_url: &str, spiffe_id: &str) {
    let version = std::fs::read_link(out.join("..data")).unwrap();
    assert!(
        version.to_string_lossy().starts_with("..svid-"),
        "{version:?}"
    );
    for file in ["key.pem", "cert.pem", "bundle.pem"] {
        assert_eq!(
            std::fs::read_link(out.join(file)).unwrap(),
            Path::new("..data").join(file)
        );
        assert_eq!(
            std::fs::read(out.join(file)).unwrap(),
            std::fs::read(out.join(&version).join(file)).unwrap()
        );
    }
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("agent.json")).unwrap()).unwrap();
    assert_eq!(record["gateway"], gateway_url);
    assert_eq!(record["spiffe_id"], spiffe_id);
    let serial = record["serial"].as_str().unwrap().trim_start_matches("00");
    assert!(
        version.to_string_lossy().ends_with(serial),
        "{version:?} vs {serial}"
    );
    let mode = std::fs::metadata(out.join("agent.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
}

/// The node agent's own binary joins exactly as `omnirelay mesh bootstrap join` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_agent_binary_joins_and_leaves_what_renewal_needs() {
    let gw = Gateway::shared("cli-agent-binary");
    let token = gw.issue_token("edge-eu", "dispatcher", 1).await;
    let token_file = gw.path("agent-binary-token");
    std::fs::write(&token_file, &token.token).unwrap();
    let out = gw.path("agent-binary-node");
    let gateway_url = format!("https://{}", gw.node_addr);
    let ca = gw.path("ca/ca.pem");
    let agent = std::process::Command::new(env!("CARGO_BIN_EXE_omnirelay-agent-under-test"))
        .args(join_args(&gateway_url, &token_file, &ca, &out, "agent-n1"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8(agent.stdout).unwrap(),
        String::from_utf8(agent.stderr).unwrap(),
    );
    assert_eq!(agent.status.code(), Some(0), "{stdout}{stderr}");
    let want = format!("spiffe://{TRUST_DOMAIN}/cluster/edge-eu/role/dispatcher/node/agent-n1");
    assert!(
        stdout.lines().any(|l| l == format!("joined as {want}")),
        "{stdout}"
    );
    let cert = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    verify_with_webpki(&cert, &std::fs::read(out.join("bundle.pem")).unwrap());
    let key_mode = std::fs::metadata(out.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    assert_renewable(&out, &gateway_url, &want);
}

/// Changes the first digit inside the event of `line` (1-based) of the file at `path`.
fn edit_one_digit(path: &Path, line: usize) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let target = &mut lines[line - 1];
    let event = target.find("\"event\":").unwrap();
    let at = event
        + target[event..]
            .find(|c: char| c.is_ascii_digit())
            .expect("a digit in the event");
    let digit = target.as_bytes()[at] - b'0';
    let replacement = char::from(b'0' + (digit + 1) % 10).to_string();
    target.replace_range(at..=at, &replacement);
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_passes_then_names_the_edited_line_and_query_finds_a_tokens_lines() {
    let gw = Gateway::start("cli-audit");
    let mine = gw.issue_token("edge-eu", "dispatcher", 1).await;
    let other = gw.issue_token("edge-us", "relay", 1).await;
    let node = gw.node();
    for (token, name, status) in [
        (&mine, "audited-1", 200),
        (&mine, "audited-2", 409),
        (&other, "audited-3", 200),
    ] {
        let request = join_request(&node, &token.token, name, &NodeKey::new(name)).await;
        assert_eq!(post_join(&node, &request).await.status, status);
    }
    // Stopped, so the log is complete and nothing appends while we read and edit it.
    let (dir, status) = gw.stop();
    assert!(status.success(), "graceful stop: {status}");
    let log = dir.0.join("audit/audit.log");
    let log_arg = log.to_str().unwrap();
    let public = dir.0.join("audit-key/audit.pub");
    let public = public.to_str().unwrap();
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();

    let (code, stdout, stderr) =
        run(&["audit", "verify", "--file", log_arg, "--public-key", public]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(": ok, {} entries", lines.len())),
        "{stdout}"
    );

    let (code, stdout, stderr) = run(&["audit", "query", "--id", &mine.id, "--file", log_arg]);
    assert_eq!(code, 0, "{stderr}");
    let expected: Vec<&str> = lines
        .iter()
        .filter(|l| l.contains(&mine.id))
        .map(String::as_str)
        .collect();
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected);
    for kind in ["token-issued", "identity-issued", "join-refused"] {
        assert!(
            expected
                .iter()
                .any(|l| l.contains(&format!("\"kind\":\"{kind}\""))),
            "the query answers {kind} for the token: {stdout}"
        );
    }

    edit_one_digit(&log, 2);
    let (code, stdout, stderr) =
        run(&["audit", "verify", "--file", log_arg, "--public-key", public]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("BROKEN at line 2:"), "{stdout}");
    // No answers from a log that does not verify.
    let (code, stdout, _) = run(&["audit", "query", "--id", &mine.id, "--file", log_arg]);
    assert_ne!(code, 0, "{stdout}");
    assert!(!stdout.contains(&mine.id), "{stdout}");
}

#[test]
fn check_config_lists_every_problem_of_a_broken_config() {
    let dir = TempDir::new("check-config");
    let config = dir.0.join("gateway.toml");
    std::fs::write(
        &config,
        r#"trust_domain = "Not a trust domain!"

[server]
listen = "not-an-address"
handshake_timeout = "forever"
max_body_bytes = 100

[limits]
per_ip = { per_second = 0, burst = 5 }

[identity]
renew_remaining_percent = 95

[log]
format = "xml"
"#,
    )
    .unwrap();
    let (code, stdout, stderr) = run(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    let keys = [
        "trust_domain",
        "server.listen",
        "server.handshake_timeout",
        "server.max_body_bytes",
        "limits.per_ip.per_second",
        "identity.renew_remaining_percent",
        "log.format",
    ];
    let listed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("  - "))
        .collect();
    assert_eq!(listed.len(), keys.len(), "{stdout}");
    for key in keys {
        assert!(
            listed.iter().any(|p| p.starts_with(&format!("{key}: "))),
            "{key} is not reported: {stdout}"
        );
    }
    assert!(
        stdout.contains(&format!("{} problem(s)", keys.len())),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_join_with_the_same_idempotency_key_gets_the_same_answer_for_one_use() {
    let gw = Gateway::start("idempotent");
    // Two uses, so a retry that wrongly burned a second one would succeed and show it.
    let token = gw.issue_token("edge-eu", "dispatcher", 2).await;
    let node = gw.node();
    let key = NodeKey::new("retry-1");
    let mut request = join_request(&node, &token.token, "retry-1", &key).await;
    request.idempotency_key = Some("boot-7f3a9c".into());
    let body = serde_json::to_vec(&request).unwrap();

    let first = node.post("/v1/bootstrap/join", body.clone()).await.unwrap();
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let retry = node.post("/v1/bootstrap/join", body).await.unwrap();
    assert_eq!(
        retry.status,
        200,
        "{}",
        String::from_utf8_lossy(&retry.body)
    );
    assert_eq!(first.body, retry.body, "byte-identical answers");
    let joined: JoinResponse = serde_json::from_slice(&first.body).unwrap();

    assert_eq!(gw.token(&token.id).await.unwrap().uses, 1);
    assert_eq!(gw.recorded_serials(&token.id), [joined.serial.as_str()]);
    let replayed = gw.wait_for_audit("identity-replayed", |e| e["token_id"] == token.id);
    assert_eq!(replayed["serial"], joined.serial);
    assert_eq!(replayed["idempotency_key"], "boot-7f3a9c");
    assert_eq!(gw.audit_for("identity-issued", &token.id).len(), 1);

    // The same key with another key pair is not a retry: refused, and still one use.
    let mut other = join_request(&node, &token.token, "retry-1", &NodeKey::new("retry-1")).await;
    other.idempotency_key = Some("boot-7f3a9c".into());
    let conflict = post_join(&node, &other).await;
    assert_eq!(conflict.status, 409);
    let problem = problem(&conflict);
    assert_eq!(
        (problem.stage.as_str(), problem.reason.as_str()),
        ("record", "idempotency-conflict")
    );
    assert_eq!(gw.token(&token.id).await.unwrap().uses, 1);
}

#[test]
fn demo_runs_the_whole_flow_and_prints_the_spiffe_id() {
    let dir = TempDir::new("demo");
    let state = dir.0.join("state");
    let (code, stdout, stderr) = run(&["demo", "--dir", state.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.lines().any(|l| l.trim()
            == "SPIFFE ID: spiffe://demo.omnirelay.example/cluster/demo/role/dispatcher/node/demo-node-1"),
        "{stdout}"
    );
    // What it printed is what the node got.
    let cert = std::fs::read_to_string(state.join("node/cert.pem")).unwrap();
    verify_with_webpki(
        &cert,
        &std::fs::read(state.join("node/bundle.pem")).unwrap(),
    );
}
