//! The operator runbook (`examples/runbook.md`) cannot drift from the CLI: every ` ```sh `
//! block is run, in order, against a real gateway (following a real policy repository) with
//! the real `omnirelay` and `omnirelay-agent` binaries on the `PATH`, and each must exit 0.
//! The blocks form one shell session: variables a block sets (with `set -a`, every assignment
//! is exported) and the umask reach the blocks after it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is a failed test"
)]

use std::path::Path;
use std::process::Command;

use omnirelay_e2e::bundles::{PolicyRepo, bundle_source, follow_repo};
use omnirelay_e2e::{Gateway, TempDir, bin, repo_root};

const AGENT: &str = env!("CARGO_BIN_EXE_omnirelay-agent-under-test");

/// The ` ```sh ` blocks of a Markdown text, each with the heading it sits under.
fn sh_blocks(markdown: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut heading = String::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            Some(block) if line.trim_start().starts_with("```") => {
                blocks.push((heading.clone(), std::mem::take(block)));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None if line.trim() == "```sh" => current = Some(String::new()),
            None if line.starts_with('#') => heading = line.trim_start_matches('#').trim().into(),
            None => {}
        }
    }
    assert!(current.is_none(), "an unterminated code block");
    blocks
}

#[test]
fn the_parser_finds_sh_blocks_and_only_those() {
    let text = "# A\n```sh\necho one\n```\n```text\nnot run\n```\n## B\n```sh\necho two\necho three\n```\n";
    assert_eq!(
        sh_blocks(text),
        vec![
            ("A".to_string(), "echo one\n".to_string()),
            ("B".to_string(), "echo two\necho three\n".to_string()),
        ]
    );
}

/// Runs `block` as the next step of the session kept in `state`; returns its output.
fn run_block(
    block: &str,
    work: &Path,
    state: &Path,
    env: &[(&str, String)],
) -> std::process::Output {
    let script = format!(
        "set -a -e -o pipefail\n\
         if [ -f '{state}' ]; then . '{state}'; fi\n\
         cd \"$WORK\"\n\
         {block}\n\
         {{ export -p | grep -Ev '^declare -x (PWD|OLDPWD|SHLVL|_)='; echo \"umask $(umask)\"; }} > '{state}.next'\n\
         mv '{state}.next' '{state}'\n",
        state = state.display(),
    );
    let path = work.join("step.sh");
    std::fs::write(&path, script).unwrap();
    let mut command = Command::new("timeout");
    command.args(["600", "bash", path.to_str().unwrap()]);
    for (key, value) in env {
        command.env(key, value);
    }
    command.env("RUST_LOG", "warn").output().unwrap()
}

#[test]
fn every_command_block_of_the_runbook_succeeds_against_a_real_gateway() {
    let runbook = std::fs::read_to_string(repo_root().join("examples/runbook.md")).unwrap();
    let blocks = sh_blocks(&runbook);
    for procedure in [
        "1. Enroll",
        "2. Renew",
        "3. Revoke",
        "4. Policy update",
        "5. Safe mode: manual issuance during a renewal outage",
    ] {
        assert!(
            blocks.iter().any(|(heading, _)| heading == procedure),
            "no command block under {procedure:?}"
        );
    }

    // The gateway follows a policy repository that has 1.0.0; the operator's checkout has the
    // next version.
    let repo = PolicyRepo::new("runbook");
    repo.publish(&bundle_source("runbook", "v1", 3600).0, "1.0.0", None);
    let source = bundle_source("runbook", "v2", 1800);
    let url = repo.url();
    let gw = Gateway::start_with("runbook", |toml| follow_repo(toml, &url, ""));
    let config = gw.config_naming_the_admin_port();

    let work = TempDir::new("runbook-work");
    let bins = work.0.join("bin");
    std::fs::create_dir(&bins).unwrap();
    std::os::unix::fs::symlink(bin(), bins.join("omnirelay")).unwrap();
    std::os::unix::fs::symlink(AGENT, bins.join("omnirelay-agent")).unwrap();
    let path = format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env = [
        ("PATH", path),
        ("OMNIRELAY_CONFIG", config),
        ("GATEWAY", format!("https://{}", gw.node_addr)),
        ("ADMIN", format!("https://{}", gw.admin_addr)),
        ("CA_BUNDLE", gw.path("ca/ca.pem").display().to_string()),
        ("WORK", work.0.display().to_string()),
        ("POLICY_SOURCE", source.0.display().to_string()),
        ("POLICY_REPO", repo.url()),
    ];
    let state = work.0.join("session.env");
    for (i, (heading, block)) in blocks.iter().enumerate() {
        let out = run_block(block, &work.0, &state, &env);
        assert!(
            out.status.success(),
            "runbook block {} (under {heading:?}) exited {:?}:\n{block}\n--- stdout\n{}\n--- stderr\n{}",
            i + 1,
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // What the blocks claim happened, seen from the gateway: nodes enrolled and renewed, one
    // evicted and quarantined, the CA rotated, 1.1.0 taken live, pinned back and unpinned, a
    // manual issuance undone by a revocation and its quarantine lifted.
    let events = gw.audit_events();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    for kind in [
        "token-issued",
        "identity-issued",
        "identity-renewed",
        "identity-revoked",
        "spiffe-id-quarantined",
        "quarantine-lifted",
        "ca-prepared",
        "ca-activated",
        "ca-retired",
        "policy-pinned",
        "policy-unpinned",
    ] {
        assert!(kinds.contains(&kind), "no {kind} in the audit log");
    }
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "policy-activated" && e["version"] == "1.1.0"),
        "the published 1.1.0 never went live"
    );
    let manual = events
        .iter()
        .find(|e| e["kind"] == "identity-renewed" && !e["manual"].is_null())
        .expect("a manual issuance in the audit log");
    assert_eq!(manual["manual"]["reason"], "renewal outage INC-1002");
    let serial = manual["serial"].as_str().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "identity-revoked" && e["serial"] == serial),
        "the manual identity was not revoked"
    );
}
