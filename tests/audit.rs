//! `audit verify` against what an attacker does to a stopped gateway's audit trail: cut the
//! file short, cut the file and the database alike, recompute the chain after an edit (in the
//! file and in the database), or sign with a key of their own. The real binary, the real state
//! `init` made, the real SQLite database.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::path::Path;

use omnirelay_e2e::*;
use sha2::{Digest, Sha256};

/// Runs the CLI; returns exit code, stdout, stderr.
fn run(args: &[&str]) -> (i32, String, String) {
    let out = omnirelay(args).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A gateway that signs a checkpoint every `every` entries, after `joins` nodes joined with
/// one token each, stopped cleanly.
async fn history(name: &str, every: u32, joins: usize) -> TempDir {
    let gw = Gateway::start_with(name, |text| {
        let line = "signing_key = \"audit-key/audit.key\"\n";
        assert!(text.contains(line), "init writes an [audit] section");
        *text = text.replace(line, &format!("{line}checkpoint_every = {every}\n"));
    });
    for i in 0..joins {
        let token = gw.issue_token("edge-eu", "dispatcher", 1).await;
        join_ok(&gw, &token.token, &format!("audited-{i}")).await;
    }
    let (dir, status) = gw.stop();
    assert!(status.success(), "graceful stop: {status}");
    dir
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn event(line: &str) -> serde_json::Value {
    let mut entry: serde_json::Value = serde_json::from_str(line).unwrap();
    entry["event"].take()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

fn db(dir: &TempDir) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.0.join("state/gateway.db")).unwrap()
}

/// The `SEQ:HASH` after "signed head " in a verify report.
fn signed_head(stdout: &str) -> String {
    let rest = stdout
        .split("signed head ")
        .nth(1)
        .unwrap_or_else(|| panic!("{stdout}"));
    rest.split_whitespace().next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_catches_a_cut_file_against_the_database_and_a_cut_of_both_against_an_anchor() {
    let dir = history("audit-cut", 1000, 3).await;
    let config = dir.0.join("gateway.toml");
    let config = config.to_str().unwrap();
    let log = dir.0.join("audit/audit.log");
    let full = lines(&log);
    // The clean stop signed the head: the last line is a checkpoint of the line before it.
    let last = event(full.last().unwrap());
    assert_eq!(last["kind"], "checkpoint", "{last}");
    assert_eq!(last["seq"], full.len() as u64 - 1);

    let (code, stdout, stderr) = run(&["audit", "verify", "--config", config]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("ok, {} entries", full.len())),
        "{stdout}"
    );
    assert!(stdout.contains("0 unsigned entries"), "{stdout}");
    let anchor = signed_head(&stdout);
    assert!(anchor.starts_with(&format!("{}:", full.len())), "{anchor}");
    // The auditor's copy of the public key is the one `audit pubkey` prints.
    let (code, pubkey, _) = run(&["audit", "pubkey", "--config", config]);
    assert_eq!(code, 0);
    assert_eq!(
        pubkey,
        std::fs::read_to_string(dir.0.join("audit-key/audit.pub")).unwrap()
    );

    // `audit export` writes the database's chain: the lines of the file, and never over an
    // existing file.
    let exported = dir.0.join("exported.log");
    let exported = exported.to_str().unwrap();
    let (code, _, stderr) = run(&["audit", "export", "--config", config, "--out", exported]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(lines(Path::new(exported)), full);
    let (code, _, _) = run(&["audit", "export", "--config", config, "--out", exported]);
    assert_ne!(code, 0, "an existing file was overwritten");

    // The file cut by two lines: it still verifies on its own, but not against the database.
    write_lines(&log, &full[..full.len() - 2]);
    let (code, stdout, stderr) = run(&["audit", "verify", "--config", config]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("BROKEN at line {}:", full.len() - 1)),
        "{stdout}"
    );
    assert!(stdout.contains("truncated"), "{stdout}");
    let public = dir.0.join("audit-key/audit.pub");
    let public = public.to_str().unwrap();
    let file = log.to_str().unwrap();
    let (code, stdout, _) = run(&["audit", "verify", "--file", file, "--public-key", public]);
    assert_eq!(code, 0, "{stdout}");
    // Alone, the file shows only that its tail is unsigned.
    assert!(stdout.contains("no signed checkpoint"), "{stdout}");
    assert!(
        stdout.contains(&format!("{} unsigned entries", full.len() - 2)),
        "{stdout}"
    );

    // The database cut instead (an attacker with the database only): the file goes on past it.
    write_lines(&log, &full);
    let cut_at = full.len() as u64 - 2;
    db(&dir)
        .execute("DELETE FROM audit WHERE seq > ?1", [cut_at])
        .unwrap();
    let (code, stdout, stderr) = run(&["audit", "verify", "--config", config]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "BROKEN at line {}: the file goes on past",
            cut_at + 1
        )),
        "{stdout}"
    );

    // Both cut the same way (an attacker with both, but not the key): consistent, so only the
    // signed head kept elsewhere shows the cut.
    write_lines(&log, &full[..full.len() - 2]);
    let (code, stdout, stderr) = run(&["audit", "verify", "--config", config]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(!stdout.contains(&anchor), "{stdout}");
    let (code, stdout, stderr) = run(&["audit", "verify", "--config", config, "--anchor", &anchor]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("BROKEN at line {}:", cut_at + 1)) && stdout.contains("truncated"),
        "{stdout}"
    );
}

/// What ends every line: `,"hash":"` and 64 hex digits and `"}`.
const SUFFIX_LEN: usize = 9 + 64 + 2;

/// Replaces `from` with `to` in line `edit` (1-based) and recomputes every hash from there on,
/// in the file and in the database, as an attacker with write access to both (but without the
/// audit key) would: each line's `prev` set to the line before's new hash, its own hash the
/// SHA-256 of its bytes before `,"hash":`. Returns the new lines.
fn edit_and_recompute(dir: &TempDir, edit: usize, from: &str, to: &str) -> Vec<String> {
    let log = dir.0.join("audit/audit.log");
    let mut lines = lines(&log);
    let conn = db(dir);
    let mut prev: Option<String> = None;
    for (i, line) in lines.iter_mut().enumerate() {
        if i + 1 < edit {
            continue;
        }
        let mut body = line[..line.len() - SUFFIX_LEN].to_string();
        if i + 1 == edit {
            assert!(body.contains(from), "{body}");
            body = body.replacen(from, to, 1);
        }
        if let Some(prev) = &prev {
            let at = body.find("\"prev\":\"").unwrap() + "\"prev\":\"".len();
            body.replace_range(at..at + 64, prev);
        }
        let hash = hex_of(&Sha256::digest(body.as_bytes()));
        *line = format!("{body},\"hash\":\"{hash}\"}}");
        conn.execute(
            "UPDATE audit SET hash = ?2, line = ?3 WHERE seq = ?1",
            rusqlite::params![i as u64 + 1, hash, *line],
        )
        .unwrap();
        prev = Some(hash);
    }
    write_lines(&log, &lines);
    lines
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_recomputed_after_an_edit_fails_at_the_next_checkpoint_and_a_foreign_key_is_refused()
 {
    // A checkpoint after every fourth entry.
    let dir = history("audit-recompute", 4, 4).await;
    let config = dir.0.join("gateway.toml");
    let config = config.to_str().unwrap();
    let log = dir.0.join("audit/audit.log");
    let before = lines(&log);
    let kinds: Vec<String> = before
        .iter()
        .map(|l| event(l)["kind"].as_str().unwrap().to_string())
        .collect();
    let checkpoints: Vec<usize> = (0..kinds.len())
        .filter(|&i| kinds[i] == "checkpoint")
        .map(|i| i + 1)
        .collect();
    assert!(checkpoints.len() >= 2, "{kinds:?}");
    assert_eq!(checkpoints[0], 5, "{kinds:?}");
    let (code, stdout, stderr) = run(&["audit", "verify", "--config", config]);
    assert_eq!(code, 0, "{stdout}{stderr}");

    // An identity-issued entry between the first and second checkpoint: its node name
    // rewritten, every later hash recomputed, in the file and the database alike.
    let edited = (checkpoints[0] + 1..checkpoints[1])
        .find(|&line| kinds[line - 1] == "identity-issued")
        .unwrap();
    let after = edit_and_recompute(&dir, edited, "\"node\":\"audited-", "\"node\":\"mallory-");
    assert_ne!(after, before);
    // The plain chain is well formed again (a query verifies it, and finds nothing)...
    let (code, stdout, stderr) = run(&["audit", "query", "--id", "nothing", "--config", config]);
    assert_eq!(
        code, 1,
        "the recomputed chain is well formed: {stdout}{stderr}"
    );
    // ...but the next checkpoint signed the old head.
    let (code, stdout, stderr) = run(&["audit", "verify", "--config", config]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("BROKEN at line {}: checkpoint", checkpoints[1])),
        "{stdout}"
    );

    // A checkpoint is only as good as its key: checked against another state's public key,
    // the log fails at its first checkpoint.
    let other_state = init_state("audit-other-key");
    let other_pub = other_state.0.join("audit-key/audit.pub");
    let file = log.to_str().unwrap();
    let (code, stdout, stderr) = run(&[
        "audit",
        "verify",
        "--file",
        file,
        "--public-key",
        other_pub.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("BROKEN at line {}:", checkpoints[0]))
            && stdout.contains("not a trusted audit key"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_without_an_audit_key_is_refused_until_keygen_and_a_running_gateway_verifies() {
    let state = init_state("audit-keygen");
    let config = state.0.join("gateway.toml");
    let key = state.0.join("audit-key/audit.key");
    // As a state made before audit checkpoints: no key (the config names the default path).
    std::fs::remove_file(&key).unwrap();
    let mut serve = std::process::Command::new(bin())
        .args(["serve", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            serve.kill().unwrap();
            panic!("serve started without an audit key");
        }
        std::thread::yield_now();
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("audit.signing_key") && stderr.contains("omnirelay audit keygen"),
        "{stderr}"
    );

    let (code, stdout, stderr) = run(&["audit", "keygen", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("-----BEGIN PUBLIC KEY-----"), "{stdout}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Never over an existing key.
    let (code, _, stderr) = run(&["audit", "keygen", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");

    // Now it starts; verify passes while it runs and appends.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[log]\nformat = \"json\"\n");
    std::fs::write(&config, text).unwrap();
    let gw = Gateway::spawn(state);
    let token = gw.issue_token("edge-eu", "dispatcher", 1).await;
    join_ok(&gw, &token.token, "while-running").await;
    let (code, stdout, stderr) = run(&["audit", "verify", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("(the database's head)"), "{stdout}");
}
