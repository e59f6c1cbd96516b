//! Trust files and state against the real binary: trust anchors others can write stop the
//! start, the record of the active policy is private and a loosened one stops the start, and
//! logs written to a file carry no terminal colour codes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use omnirelay_e2e::bundles::{PolicyRepo, bundle_source, follow_repo};
use omnirelay_e2e::*;

/// How long a refused start may take before the test calls it a start.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(60);

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Runs `serve` on `dir` and expects it to refuse to start: returns its exit code and stderr.
/// A gateway that starts instead is stopped and the test fails.
fn serve_refused(dir: &TempDir) -> (i32, String) {
    let child = Command::new(bin())
        .args([
            "serve",
            "--config",
            dir.0.join("gateway.toml").to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(REFUSAL_DEADLINE) {
        Ok(out) => {
            let out = out.unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => {
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let out = rx.recv().unwrap().unwrap();
            panic!(
                "the gateway started instead of refusing: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        }
    }
}

/// A state whose config names a token verification key, a device CA and `allowed_signers`
/// (following `repo`), all in `trust/`, all 0644 in a 0700 directory.
fn state_with_trust_anchors(repo: &PolicyRepo) -> TempDir {
    let dir = init_state("anchors");
    let trust = dir.0.join("trust");
    std::fs::create_dir(&trust).unwrap();
    chmod(&trust, 0o700);
    std::fs::copy(dir.0.join("token/signing.pub"), trust.join("verify.pub")).unwrap();
    std::fs::copy(dir.0.join("ca/ca.pem"), trust.join("device-ca.pem")).unwrap();
    std::fs::write(
        trust.join("allowed_signers"),
        "ci@omnirelay namespaces=\"git\" ssh-ed25519 \
         AAAAC3NzaC1lZDI1NTE5AAAAIOVoZEKbPfYWGjNvHhmyqMVj6QVMY9a8sqzN4PXI3DnQ\n",
    )
    .unwrap();
    for file in ["verify.pub", "device-ca.pem", "allowed_signers"] {
        chmod(&trust.join(file), 0o644);
    }
    let config = dir.0.join("gateway.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replace(
        "[token]\nsigning_key = \"token/signing.key\"\n",
        "[token]\nsigning_key = \"token/signing.key\"\n\
         verification_keys = [\"trust/verify.pub\"]\n\n\
         [attestation]\ndevice_cas = [\"trust/device-ca.pem\"]\n",
    );
    text.push_str("\n[log]\nformat = \"json\"\nfilter = \"info\"\n");
    follow_repo(
        &mut text,
        &repo.url(),
        "require_signed_commits = true\nallowed_signers = \"trust/allowed_signers\"",
    );
    std::fs::write(&config, text).unwrap();
    dir
}

#[test]
fn trust_anchors_that_others_can_write_stop_the_start_each_named() {
    let repo = PolicyRepo::new("anchors");
    let dir = state_with_trust_anchors(&repo);
    let trust = dir.0.join("trust");
    let files = [
        ("token.verification_keys", "verify.pub", 0o664),
        ("attestation.device_cas", "device-ca.pem", 0o646),
        ("policy.source.allowed_signers", "allowed_signers", 0o666),
    ];
    for (_, file, loose) in files {
        chmod(&trust.join(file), loose);
    }
    let (code, stderr) = serve_refused(&dir);
    assert_ne!(code, 0, "{stderr}");
    for (_, file, _) in files {
        let path = trust.join(file).display().to_string();
        assert!(stderr.contains(&path), "{path} is not named: {stderr}");
    }
    assert!(stderr.contains("chmod go-w"), "{stderr}");

    // check-config reports all three at once, each under its key.
    let out = omnirelay(&[
        "check-config",
        "--config",
        dir.0.join("gateway.toml").to_str().unwrap(),
    ])
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    for (key, file, _) in files {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("  - {key}: ")) && l.contains(file)),
            "{key} is not reported: {stdout}"
        );
    }

    // Private files in a directory others can write are refused too.
    for (_, file, _) in files {
        chmod(&trust.join(file), 0o644);
    }
    chmod(&trust, 0o777);
    let (code, stderr) = serve_refused(&dir);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&format!("{}, which holds trust anchor", trust.display())),
        "{stderr}"
    );

    // The same files, nobody else can write them: the gateway starts.
    chmod(&trust, 0o700);
    let gw = Gateway::spawn(dir);
    let (_, status) = gw.stop();
    assert!(status.success(), "{status:?}");
}

#[test]
fn an_allowed_signers_option_the_gateway_cannot_honour_stops_the_start() {
    let repo = PolicyRepo::new("ca-signers");
    let dir = state_with_trust_anchors(&repo);
    let signers = dir.0.join("trust/allowed_signers");
    let text = std::fs::read_to_string(&signers).unwrap();
    std::fs::write(
        &signers,
        format!(
            "# CI\n{}",
            text.replace("namespaces=\"git\"", "cert-authority")
        ),
    )
    .unwrap();
    let (code, stderr) = serve_refused(&dir);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains("allowed_signers line 2") && stderr.contains("cert-authority"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_policy_record_is_private_and_a_loosened_one_stops_the_start() {
    let repo = PolicyRepo::new("active");
    let v1 = repo.publish(&bundle_source("active", "v1", 3600).0, "1.0.0", None);
    let gw = Gateway::start_with("active", |t| follow_repo(t, &repo.url(), ""));
    let active = gw.path("state/policy/active.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&active).is_ok_and(|t| t.contains(&v1)) {
        assert!(Instant::now() < deadline, "v1 never became active");
        tokio::task::yield_now().await;
    }
    assert_eq!(mode(&active), 0o600);
    let (dir, status) = gw.stop();
    assert!(status.success(), "{status:?}");

    chmod(&active, 0o644);
    let (code, stderr) = serve_refused(&dir);
    assert_ne!(code, 0, "{stderr}");
    let named = format!("chmod 600 {}", active.display());
    assert!(stderr.contains(&named), "{stderr}");

    chmod(&active, 0o600);
    let gw = Gateway::spawn(dir);
    let token = gw.issue_token("edge-eu", "relay", 1).await.token;
    let joined = join_ok(&gw, &token, "active-1").await;
    assert_eq!(joined.policy.version, "1.0.0");
}

#[test]
fn logs_written_to_a_file_carry_no_colour_codes() {
    let dir = init_state("plain-logs");
    let log = dir.0.join("serve.log");
    let mut child = Command::new(bin())
        .args([
            "serve",
            "--config",
            dir.0.join("gateway.toml").to_str().unwrap(),
        ])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("gateway serving") {
            break text;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("the gateway did not report serving: {text}");
        }
        std::thread::yield_now();
    };
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
    assert!(text.contains("INFO"), "{text}");
    assert!(!text.contains("\x1b["), "{text:?}");
}

/// `omnirelay policy keygen`: the key's path and its `allowed_signers` key part
/// (`ssh-ed25519 AAAA…`, without the principal).
fn keygen(dir: &TempDir, name: &str) -> (std::path::PathBuf, String) {
    let path = dir.0.join(name);
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
    let line = String::from_utf8(out.stdout).unwrap();
    let key = line.trim().split_once(' ').unwrap().1.to_string();
    (path, key)
}

/// Polls the policy status (with a deadline) until `done` holds for it.
async fn policy_status_until(
    gw: &Gateway,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = gw.admin().get("/admin/v1/policy/status").await.unwrap();
        let s: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what} never happened: {s:#}");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_signed_by_a_retired_key_is_refused_and_a_key_in_its_window_serves() {
    let keys = TempDir::new("windows");
    let (retired, retired_key) = keygen(&keys, "retired");
    let (current, current_key) = keygen(&keys, "current");
    let signers = keys.0.join("allowed_signers");
    std::fs::write(
        &signers,
        format!(
            "retired valid-before=\"20200101Z\" {retired_key}\n\
             current namespaces=\"git\",valid-after=\"20200101Z\",valid-before=\"29991231Z\" \
             {current_key}\n"
        ),
    )
    .unwrap();
    let repo = PolicyRepo::new("windows");
    let old = repo.publish(
        &bundle_source("windows", "v1", 3600).0,
        "1.0.0",
        Some(&retired),
    );
    let extra = format!(
        "require_signed_commits = true\nallowed_signers = \"{}\"",
        signers.display()
    );
    let gw = Gateway::start_with("windows", |t| follow_repo(t, &repo.url(), &extra));
    let s = policy_status_until(&gw, "the retired key's commit refused", |s| {
        s["last_candidate"]["commit"] == old.as_str()
    })
    .await;
    assert_eq!(s["last_candidate"]["result"], "signature_error", "{s:#}");
    let reason = s["last_candidate"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("retired") && reason.contains("valid only before"),
        "{reason}"
    );
    assert!(s["active"].is_null(), "{s:#}");

    let new = repo.publish(
        &bundle_source("windows", "v2", 1800).0,
        "1.1.0",
        Some(&current),
    );
    let s = policy_status_until(&gw, "the current key's commit active", |s| {
        s["active"]["commit"] == new.as_str()
    })
    .await;
    assert_eq!(s["active"]["version"], "1.1.0");
}
