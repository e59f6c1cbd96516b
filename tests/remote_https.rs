//! Policy repositories on a hosted git server over HTTPS: `git http-backend` behind a rustls
//! listener that wants a bearer credential. `policy publish` pushes there and a gateway
//! follows it; a wrong credential, an untrusted server certificate and a plaintext URL are
//! each refused with their reason; the credential appears in no log line, status, audit entry
//! or CLI output.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use omnirelay_e2e::bundles::{
    bundle_source, follow_repo, policy_status, policy_status_until, signing_key,
};
use omnirelay_e2e::githttp::GitHttpServer;
use omnirelay_e2e::*;

/// The secret the server wants. It must never show up anywhere but on the wire.
const CREDENTIAL: &str = "pol1cy-ci-token-7d3f0a9be2";
/// A credential the server does not know; it must not leak either.
const WRONG: &str = "stale-token-55c1e0d84f";

struct Fixture {
    server: GitHttpServer,
    files: TempDir,
    sign_key: PathBuf,
    allowed_signers: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let server = GitHttpServer::start(name, &format!("Bearer {CREDENTIAL}"));
        let files = TempDir::new(&format!("{name}-files"));
        write(&files.0.join("ca.pem"), &server.ca_pem, 0o644);
        write(
            &files.0.join("credential"),
            &format!("{CREDENTIAL}\n"),
            0o600,
        );
        write(&files.0.join("wrong"), &format!("{WRONG}\n"), 0o600);
        let (sign_key, allowed_signers) = signing_key(&files);
        Self {
            server,
            files,
            sign_key,
            allowed_signers,
        }
    }

    fn file(&self, name: &str) -> String {
        self.files.0.join(name).display().to_string()
    }

    /// `omnirelay policy publish` of `source` as `version` to `repo`, signed, with `flags`.
    fn publish(&self, source: &Path, version: &str, repo: &str, flags: &[&str]) -> Run {
        let mut args = vec![
            "policy",
            "publish",
            "--source",
            source.to_str().unwrap(),
            "--repo",
            repo,
            "--version",
            version,
        ];
        let key = self.sign_key.display().to_string();
        args.extend(["--sign-key", &key]);
        args.extend(flags);
        Run::new(&args)
    }

    /// The `[policy.source]` settings a gateway needs for this server, with `credential` as
    /// its credential file and `ca` as its CA file.
    fn source_settings(&self, credential: &str, ca: Option<&str>) -> String {
        let mut settings = format!(
            "require_signed_commits = true\nallowed_signers = \"{}\"\ncredential_file = \"{}\"\n",
            self.allowed_signers.display(),
            self.file(credential),
        );
        if let Some(ca) = ca {
            settings.push_str(&format!("ca_file = \"{}\"\n", self.file(ca)));
        }
        settings
    }
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A finished CLI run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn new(args: &[&str]) -> Self {
        let out = omnirelay(args).unwrap();
        Self {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "{}", self.text());
        self
    }

    /// Exit 2 with `reason` in the error.
    fn refused(self, reason: &str) -> Self {
        assert_eq!(self.code, 2, "{}", self.text());
        assert!(
            self.stderr.contains(reason),
            "{reason:?} not in {}",
            self.stderr
        );
        self
    }
}

/// Nothing in `haystacks` holds either credential.
fn assert_no_credential(haystacks: &[String]) {
    for text in haystacks {
        for secret in [CREDENTIAL, WRONG] {
            assert!(!text.contains(secret), "the credential leaked into: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_pushes_over_https_and_a_gateway_follows_without_leaking_the_credential() {
    let fx = Fixture::new("https-follow");
    let url = fx.server.url();
    let credential = format!("--credential-file={}", fx.file("credential"));
    let ca = format!("--ca-file={}", fx.file("ca.pem"));
    let v1 = bundle_source("https-follow", "v1", 3600);
    let first = fx.publish(&v1.0, "1.0.0", &url, &[&credential, &ca]).ok();
    let pushed = fx.server.requests();
    assert!(
        pushed.iter().any(|(m, path, status)| m == "POST"
            && path.ends_with("/git-receive-pack")
            && *status == 200),
        "{pushed:?}"
    );
    let server_head = git2::Repository::open_bare(fx.server.repo_dir())
        .unwrap()
        .refname_to_id("refs/tags/v1.0.0")
        .unwrap();

    let settings = fx.source_settings("credential", Some("ca.pem"));
    let gw = Gateway::start_with("https-follow", |t| follow_repo(t, &url, &settings));
    let active = policy_status_until(&gw, "v1 active", |s| s["active"]["version"] == "1.0.0").await;
    assert_eq!(active["active"]["commit"], server_head.to_string());
    let token = gw.issue_token("edge-eu", "dispatcher", 1).await.token;
    let joined = join_ok(&gw, &token, "https-node-1").await;
    assert_eq!(joined.policy.version, "1.0.0");

    let v2 = bundle_source("https-follow", "v2", 1800);
    let second = fx.publish(&v2.0, "1.1.0", &url, &[&credential, &ca]).ok();
    policy_status_until(&gw, "v2 active", |s| s["active"]["version"] == "1.1.0").await;
    gw.wait_for_audit("policy-activated", |e| e["version"] == "1.1.0");

    let mut haystacks = gw.log_lines();
    assert!(
        haystacks.iter().any(|l| l.contains("policy bundle active")),
        "the gateway logged no activation: {haystacks:#?}"
    );
    haystacks.extend(gw.audit_lines());
    haystacks.push(policy_status(&gw).await.to_string());
    haystacks.extend([first.text(), second.text()]);
    assert_no_credential(&haystacks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_credential_an_untrusted_certificate_and_plaintext_are_refused_with_their_reason() {
    let fx = Fixture::new("https-refusals");
    let url = fx.server.url();
    let ca = format!("--ca-file={}", fx.file("ca.pem"));
    let right = format!("--credential-file={}", fx.file("credential"));
    let wrong = format!("--credential-file={}", fx.file("wrong"));
    let v1 = bundle_source("https-refusals", "v1", 3600);
    let mut outputs = Vec::new();

    let run = fx.publish(&v1.0, "1.0.0", &url, &[&wrong, &ca]);
    outputs.push(
        run.refused("the server refused the credential (HTTP 401)")
            .text(),
    );
    let run = fx.publish(&v1.0, "1.0.0", &url, &[&ca]);
    outputs.push(
        run.refused("the server requires a credential (HTTP 401)")
            .text(),
    );
    let run = fx.publish(&v1.0, "1.0.0", &url, &[&right]);
    outputs.push(
        run.refused("the server's certificate does not chain to the system's roots")
            .text(),
    );
    let before = fx.server.requests().len();
    let plaintext = url.replacen("https://", "http://", 1);
    let run = fx.publish(&v1.0, "1.0.0", &plaintext, &[]);
    let run = run.refused("--repo: http:// is plaintext");
    assert!(
        run.stderr.contains("--allow-insecure-transport"),
        "{}",
        run.stderr
    );
    outputs.push(run.text());
    assert_eq!(
        fx.server.requests().len(),
        before,
        "a plaintext URL was contacted"
    );
    let pushed = |(method, path, status): &(String, String, u16)| {
        method == "POST" && path.ends_with("/git-receive-pack") && *status == 200
    };
    assert!(
        !fx.server.requests().iter().any(pushed),
        "a refused publish pushed: {:?}",
        fx.server.requests()
    );
    outputs.push(fx.publish(&v1.0, "1.0.0", &url, &[&right, &ca]).ok().text());

    // A gateway with a stale credential keeps polling and says why it has nothing.
    let settings = fx.source_settings("wrong", Some("ca.pem"));
    let stale = Gateway::start_with("https-stale", |t| follow_repo(t, &url, &settings));
    let status = policy_status_until(&stale, "a refused poll", |s| {
        s["last_poll"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("the server refused the credential (HTTP 401)"))
    })
    .await;
    assert!(status["active"].is_null(), "{status:#}");
    assert_eq!(status["last_poll"]["result"], "fetch_error");
    // One that trusts only the system's roots does not trust this server.
    let settings = fx.source_settings("credential", None);
    let untrusting = Gateway::start_with("https-untrusting", |t| follow_repo(t, &url, &settings));
    let status = policy_status_until(&untrusting, "an untrusted server", |s| {
        s["last_poll"]["reason"].as_str().is_some_and(|r| {
            r.contains("TLS with 127.0.0.1 failed") && r.contains("unknown issuer")
        })
    })
    .await;
    assert!(status["active"].is_null(), "{status:#}");

    for gw in [&stale, &untrusting] {
        let mut haystacks = gw.log_lines();
        assert!(
            haystacks
                .iter()
                .any(|l| l.contains("policy source not reachable") || l.contains("policy poll")),
            "no log line names the failed poll: {haystacks:#?}"
        );
        haystacks.extend(gw.audit_lines());
        haystacks.push(policy_status(gw).await.to_string());
        assert_no_credential(&haystacks);
    }
    assert_no_credential(&outputs);
}

#[test]
fn check_config_refuses_plaintext_and_unsigned_network_remotes() {
    let state = init_state("https-check");
    let config = state.0.join("gateway.toml");
    let original = std::fs::read_to_string(&config).unwrap() + "\n[log]\nformat = \"json\"\n";
    let check = |git: &str, extra: &str| {
        let mut text = original.clone();
        follow_repo(&mut text, git, extra);
        std::fs::write(&config, text).unwrap();
        Run::new(&["check-config", "--config", config.to_str().unwrap()])
    };
    let plaintext = check(
        "http://git.example/policy.git",
        "allow_unsigned_remote = true",
    );
    assert_eq!(plaintext.code, 1, "{}", plaintext.text());
    assert!(
        plaintext
            .stdout
            .contains("policy.source.git: http:// is plaintext")
            && plaintext.stdout.contains("allow_insecure_transport = true"),
        "{}",
        plaintext.stdout
    );
    let unsigned = check("https://git.example/policy.git", "");
    assert_eq!(unsigned.code, 1, "{}", unsigned.text());
    assert!(
        unsigned
            .stdout
            .contains("policy.source.require_signed_commits: a network remote (https://)"),
        "{}",
        unsigned.stdout
    );
    let allowed = check(
        "https://git.example/policy.git",
        "allow_unsigned_remote = true",
    );
    assert_eq!(allowed.code, 0, "{}", allowed.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_http_works_only_when_explicitly_allowed() {
    let server = GitHttpServer::start_plaintext("http-plain");
    let url = server.url();
    assert!(url.starts_with("http://"), "{url}");
    let files = TempDir::new("http-plain-files");
    let (sign_key, allowed_signers) = signing_key(&files);
    let key = sign_key.display().to_string();
    let v1 = bundle_source("http-plain", "v1", 3600);
    let publish = |flags: &[&str]| {
        let mut args = vec![
            "policy",
            "publish",
            "--source",
            v1.0.to_str().unwrap(),
            "--repo",
            &url,
            "--version",
            "1.0.0",
            "--sign-key",
            &key,
        ];
        args.extend(flags);
        Run::new(&args)
    };
    publish(&[]).refused("--repo: http:// is plaintext");
    assert!(server.requests().is_empty(), "{:?}", server.requests());
    publish(&["--allow-insecure-transport"]).ok();

    let settings = format!(
        "allow_insecure_transport = true\nrequire_signed_commits = true\nallowed_signers = \"{}\"\n",
        allowed_signers.display()
    );
    let gw = Gateway::start_with("http-plain", |t| follow_repo(t, &url, &settings));
    policy_status_until(&gw, "v1 active over http", |s| {
        s["active"]["version"] == "1.0.0"
    })
    .await;
}
