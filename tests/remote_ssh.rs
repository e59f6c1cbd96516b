//! Policy repositories over SSH: a private `sshd` on a free loopback port with a host key and a
//! user key generated for the test. `policy publish` pushes there and a gateway follows it;
//! a host key that `known_hosts` does not hold (unknown, or another key for the same address)
//! is refused, never learnt.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::path::Path;

use omnirelay_e2e::bundles::{bundle_source, follow_repo, policy_status_until, signing_key};
use omnirelay_e2e::sshd::{Sshd, keygen};
use omnirelay_e2e::*;

/// `policy publish` of `source` as `version` to `url` with `key` and `known_hosts`.
fn publish(
    source: &Path,
    version: &str,
    url: &str,
    sign_key: &Path,
    ssh_key: &Path,
    known_hosts: &Path,
) -> (i32, String) {
    let out = omnirelay(&[
        "policy",
        "publish",
        "--source",
        source.to_str().unwrap(),
        "--repo",
        url,
        "--version",
        version,
        "--sign-key",
        sign_key.to_str().unwrap(),
        "--ssh-key",
        ssh_key.to_str().unwrap(),
        "--known-hosts",
        known_hosts.to_str().unwrap(),
    ])
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_follow_over_ssh_with_a_strictly_checked_host_key() {
    let sshd = Sshd::start("ssh-follow");
    let (repo, url) = sshd.repo("policy.git");
    let files = TempDir::new("ssh-follow-files");
    let (sign_key, allowed_signers) = signing_key(&files);
    let known_hosts = files.0.join("known_hosts");
    std::fs::write(&known_hosts, sshd.known_hosts_line()).unwrap();

    let v1 = bundle_source("ssh-follow", "v1", 3600);
    let (code, text) = publish(
        &v1.0,
        "1.0.0",
        &url,
        &sign_key,
        &sshd.user_key(),
        &known_hosts,
    );
    assert_eq!(code, 0, "{text}");
    let tagged = git2::Repository::open_bare(&repo)
        .unwrap()
        .refname_to_id("refs/tags/v1.0.0")
        .unwrap();

    let settings = format!(
        "require_signed_commits = true\nallowed_signers = \"{}\"\nssh_key = \"{}\"\nknown_hosts = \"{}\"\n",
        allowed_signers.display(),
        sshd.user_key().display(),
        known_hosts.display()
    );
    let gw = Gateway::start_with("ssh-follow", |t| follow_repo(t, &url, &settings));
    let status = policy_status_until(&gw, "v1 active", |s| s["active"]["version"] == "1.0.0").await;
    assert_eq!(status["active"]["commit"], tagged.to_string());
    let token = gw.issue_token("edge-eu", "dispatcher", 1).await.token;
    assert_eq!(
        join_ok(&gw, &token, "ssh-node-1").await.policy.version,
        "1.0.0"
    );

    let v2 = bundle_source("ssh-follow", "v2", 1800);
    let (code, text) = publish(
        &v2.0,
        "1.1.0",
        &url,
        &sign_key,
        &sshd.user_key(),
        &known_hosts,
    );
    assert_eq!(code, 0, "{text}");
    policy_status_until(&gw, "v2 active", |s| s["active"]["version"] == "1.1.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_or_changed_host_key_is_refused() {
    let sshd = Sshd::start("ssh-hostkey");
    let (repo, url) = sshd.repo("policy.git");
    let files = TempDir::new("ssh-hostkey-files");
    let (sign_key, allowed_signers) = signing_key(&files);
    let v1 = bundle_source("ssh-hostkey", "v1", 3600);

    // Nothing known about the server: strict checking refuses, and learns nothing.
    let unknown = files.0.join("known_hosts_empty");
    std::fs::write(&unknown, "").unwrap();
    let (code, text) = publish(&v1.0, "1.0.0", &url, &sign_key, &sshd.user_key(), &unknown);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains(&format!(
            "ssh failed (exit status: 255): No ED25519 host key is known for [127.0.0.1]:{}",
            sshd.port
        )) && text.contains("Host key verification failed"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(&unknown).unwrap(),
        "",
        "ssh learnt a host key"
    );

    // Another key for the same address: a server in the middle.
    let impostor = files.0.join("impostor");
    keygen(&impostor);
    let other = std::fs::read_to_string(impostor.with_extension("pub")).unwrap();
    let mut fields = other.split_whitespace();
    let changed = files.0.join("known_hosts_changed");
    std::fs::write(
        &changed,
        format!(
            "[127.0.0.1]:{} {} {}\n",
            sshd.port,
            fields.next().unwrap(),
            fields.next().unwrap()
        ),
    )
    .unwrap();
    let (code, text) = publish(&v1.0, "1.0.0", &url, &sign_key, &sshd.user_key(), &changed);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            && text.contains("Host key verification failed"),
        "{text}"
    );
    let pushed = git2::Repository::open_bare(&repo)
        .unwrap()
        .references()
        .unwrap()
        .count();
    assert_eq!(pushed, 0, "a refused publish reached the repository");

    // A gateway with the wrong host key fetches nothing and says why.
    let settings = format!(
        "require_signed_commits = true\nallowed_signers = \"{}\"\nssh_key = \"{}\"\nknown_hosts = \"{}\"\n",
        allowed_signers.display(),
        sshd.user_key().display(),
        changed.display()
    );
    let gw = Gateway::start_with("ssh-hostkey", |t| follow_repo(t, &url, &settings));
    let status = policy_status_until(&gw, "a refused host key", |s| {
        s["last_poll"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ssh failed") && r.contains("Host key verification failed"))
    })
    .await;
    assert!(status["active"].is_null(), "{status:#}");
}
