//! Fault drills against the real binary: the gateway killed with SIGKILL while nodes join
//! through the real CLI, and the disk under its database and audit log running full. After
//! each, every certificate a node holds is recorded (store and audit), no token is over-used,
//! and the audit log verifies and agrees with the database.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway::api::wire::JoinResponse;
use omnirelay_e2e::*;

/// Tokens shared by several nodes, fewer uses than nodes: an over-used token would show.
const SHARED_TOKENS: usize = 4;
const SHARED_USES: u32 = 3;
const NODES_PER_SHARED_TOKEN: usize = 5;
/// Tokens of one use, one node each.
const SINGLE_TOKENS: usize = 12;
/// Identities issued before the crash, at least.
const ISSUED_BEFORE_KILL: u64 = 3;
/// The page size of the drills' tmpfs: a full one still takes up to a page less one byte into
/// a file's last page.
const PAGE: u64 = 4096;
/// Longest a drill waits for anything (gateway restart, CLIs, the audit mirror).
const DEADLINE: Duration = Duration::from_secs(240);

/// One `omnirelay mesh bootstrap join` process and where it writes.
struct NodeRun {
    name: String,
    token: String,
    out: PathBuf,
    child: Child,
}

impl Drop for NodeRun {
    /// A failed test leaves no node retrying in the background.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the real node CLI for `name` with the token in `token_file`.
fn spawn_node(gw: &Gateway, nodes: &Path, name: &str, token: &str, token_file: &Path) -> NodeRun {
    let out = nodes.join(name);
    let child = Command::new(bin())
        .args(["mesh", "bootstrap", "join", "--gateway"])
        .arg(format!("https://{}", gw.node_addr))
        .arg("--token-file")
        .arg(token_file)
        .arg("--ca-bundle")
        .arg(gw.path("ca/ca.pem"))
        .arg("--out")
        .arg(&out)
        .args(["--node-name", name, "--attempts", "10"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    NodeRun {
        name: name.to_string(),
        token: token.to_string(),
        out,
        child,
    }
}

/// A read-only connection to the gateway's database (WAL: reads while it runs are fine).
fn database(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
}

fn count(db: &Path, sql: &str) -> u64 {
    database(db).query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Serial → token of every recorded identity.
fn recorded_identities(db: &Path) -> BTreeMap<String, String> {
    let db = database(db);
    let mut query = db
        .prepare("SELECT serial, token_id FROM identities")
        .unwrap();
    query
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Token id → (uses, max_uses).
fn token_uses(db: &Path) -> BTreeMap<String, (u32, u32)> {
    let db = database(db);
    let mut query = db.prepare("SELECT id, uses, max_uses FROM tokens").unwrap();
    query
        .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The serial of the certificate in `cert.pem`, in the gateway's notation (hex, no leading
/// zero octets).
fn cert_serial(cert_pem: &Path) -> String {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(cert_pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    normal_serial(&hex_string(cert.raw_serial()))
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn normal_serial(hex: &str) -> String {
    let mut s = hex.to_ascii_lowercase();
    while s.len() > 2 && s.starts_with("00") {
        s.drain(..2);
    }
    s
}

/// The events of an audit file.
fn audit_events_in(audit_file: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(audit_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].take())
        .collect()
}

/// The serials of the `IdentityIssued` entries in the audit file.
fn audited_serials(audit: &[serde_json::Value]) -> BTreeSet<String> {
    audit
        .iter()
        .filter(|e| e["kind"] == "identity-issued")
        .map(|e| normal_serial(e["serial"].as_str().unwrap()))
        .collect()
}

/// `omnirelay audit verify` on the state in `dir` (its audit file against its database and
/// the audit key's signed checkpoints) must exit 0.
fn assert_audit_verifies(dir: &Path) {
    let config = dir.join("gateway.toml");
    let out = omnirelay(&["audit", "verify", "--config", config.to_str().unwrap()]).unwrap();
    assert!(
        out.status.success(),
        "audit verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The complete lines of an audit file.
fn audit_line_count(audit_file: &Path) -> u64 {
    let text = std::fs::read_to_string(audit_file).unwrap_or_default();
    text.matches('\n').count() as u64
}

/// Polls `done` until it holds or [`DEADLINE`] passes; `what` names the wait.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::yield_now();
    }
}

/// Waits until the audit file mirrors every entry the database committed, for `db`.
fn wait_for_mirror(db: &Path, audit_file: &Path) {
    wait_until("the audit file mirrors every committed entry", || {
        audit_line_count(audit_file) == count(db, "SELECT count(*) FROM audit")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_loses_no_certificate_and_overuses_no_token() {
    let gw = Gateway::start("crash-drill");
    gw.pin_addresses();
    let db = gw.path("state/gateway.db");
    let nodes = TempDir::new("crash-drill-nodes");

    // (name, token) for every node, shared and single-use tokens interleaved so both kinds
    // are in flight at the kill.
    let mut shared = Vec::new();
    for t in 0..SHARED_TOKENS {
        let token = gw.issue_token("edge-eu", "dispatcher", SHARED_USES).await;
        for n in 0..NODES_PER_SHARED_TOKEN {
            shared.push((format!("shared-{t}-{n}"), token.clone()));
        }
    }
    let mut single = Vec::new();
    for t in 0..SINGLE_TOKENS {
        let token = gw.issue_token("edge-eu", "dispatcher", 1).await;
        single.push((format!("single-{t}"), token));
    }
    let mut plan = Vec::new();
    let (mut shared, mut single) = (shared.into_iter(), single.into_iter());
    loop {
        let next: Vec<_> = shared.next().into_iter().chain(single.next()).collect();
        if next.is_empty() {
            break;
        }
        plan.extend(next);
    }
    let spawn = |(name, token): &(String, gateway::api::wire::IssueTokenResponse)| {
        let file = nodes.0.join(format!("{name}.token"));
        std::fs::write(&file, &token.token).unwrap();
        spawn_node(&gw, &nodes.0, name, &token.id, &file)
    };

    // Half the nodes start; once some have their certificate, the rest start and the gateway
    // is killed while they run.
    let (first, second) = plan.split_at(plan.len() / 2);
    let mut runs: Vec<NodeRun> = first.iter().map(spawn).collect();
    wait_until("the first identities are issued", || {
        count(&db, "SELECT count(*) FROM identities") >= ISSUED_BEFORE_KILL
    });
    runs.extend(second.iter().map(spawn));
    let issued_before = count(&db, "SELECT count(*) FROM identities");
    let dir = gw.kill();
    let running = runs
        .iter_mut()
        .map(|r| r.child.try_wait().unwrap().is_none())
        .filter(|&running| running)
        .count();
    assert!(running > 0, "every node finished before the kill");

    // Back on the same state and addresses; the nodes' retries find it.
    let gw = Gateway::spawn(dir);

    let deadline = Instant::now() + DEADLINE;
    let mut delivered = BTreeMap::new();
    let mut refused = 0;
    for run in &mut runs {
        let status = loop {
            if let Some(status) = run.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = run.child.kill();
                panic!("node {} never finished", run.name);
            }
            std::thread::yield_now();
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut run.child.stderr.take().unwrap(), &mut stderr).unwrap();
        if status.success() {
            let serial = cert_serial(&run.out.join("cert.pem"));
            delivered.insert(serial, run.token.clone());
        } else {
            // The only acceptable failure: the shared token's uses went to other nodes.
            assert!(
                stderr.contains("token-exhausted") && run.name.starts_with("shared-"),
                "node {} failed: {stderr}",
                run.name
            );
            refused += 1;
        }
    }

    // Every certificate a node holds is recorded, with the token it was issued through, and
    // every recorded identity reached its node (the retry after the crash replays an answer
    // the kill swallowed).
    let recorded = recorded_identities(&db);
    let recorded: BTreeMap<String, String> = recorded
        .into_iter()
        .map(|(serial, token)| (normal_serial(&serial), token))
        .collect();
    assert_eq!(
        delivered, recorded,
        "certificates held vs identities recorded"
    );
    assert!(
        recorded.len() as u64 > issued_before,
        "nothing was issued after the restart"
    );

    // No token over-used; each token's uses are exactly its recorded identities, and every
    // use the nodes asked for was granted.
    let uses = token_uses(&db);
    for (token, &(used, max)) in &uses {
        let identities = recorded.values().filter(|t| *t == token).count() as u32;
        assert!(used <= max, "token {token} used {used} of {max}");
        assert_eq!(identities, used, "token {token}: identities vs uses");
        assert_eq!(
            used, max,
            "token {token}: a node that wanted a use did not get it"
        );
    }
    let expected_refusals =
        SHARED_TOKENS * NODES_PER_SHARED_TOKEN - SHARED_TOKENS * SHARED_USES as usize;
    assert_eq!(refused, expected_refusals, "refused nodes");

    // The audit log names every certificate, agrees with the database and verifies.
    let audit_file = gw.path("audit/audit.log");
    wait_for_mirror(&db, &audit_file);
    let (dir, _) = gw.stop();
    let delivered: BTreeSet<String> = delivered.into_keys().collect();
    assert_eq!(
        audited_serials(&audit_events_in(&audit_file)),
        delivered,
        "audited vs delivered"
    );
    assert_audit_verifies(&dir.0);
}

/// A tmpfs of a given size mounted for one test (the drills run as root), unmounted on drop.
struct SmallDisk {
    dir: TempDir,
}

impl SmallDisk {
    fn mount(name: &str, size: &str) -> Self {
        let dir = TempDir::new(name);
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs failed (the drill needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// Writes a filler file until the disk refuses with ENOSPC.
    fn fill(&self) {
        use std::io::Write;
        let mut filler = std::fs::File::create(self.path("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        let error = loop {
            if let Err(e) = filler.write_all(&chunk) {
                break e;
            }
        };
        assert_eq!(error.raw_os_error(), Some(28), "expected ENOSPC: {error}");
    }

    /// Space returns.
    fn free(&self) {
        std::fs::remove_file(self.path("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir.0).status();
    }
}

/// A join by a fresh node: the reply, and the serial if it was issued.
async fn try_join(
    gw: &Gateway,
    token: &str,
    name: &str,
) -> (gateway::agent::Reply, Option<String>) {
    let node = gw.node();
    let key = NodeKey::new(name);
    let reply = post_join(&node, &join_request(&node, token, name, &key).await).await;
    let serial = (reply.status == 200).then(|| {
        let response: JoinResponse = serde_json::from_slice(&reply.body).unwrap();
        normal_serial(&response.serial)
    });
    (reply, serial)
}

/// Fails with the reply's body unless it has `status`.
fn assert_status(reply: &gateway::agent::Reply, status: u16) {
    assert_eq!(
        reply.status,
        status,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
}

/// Joins refused at the record stage (the store), from the gateway's metrics.
async fn refused_at_store(gw: &Gateway) -> u64 {
    let metrics = gw.admin().get("/metrics").await.unwrap();
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("bootstrap_joins_total{result=\"store\"} "))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_joins_with_503_and_the_gateway_recovers_by_itself() {
    // The database and the audit log each on a small disk of their own, so each can run full
    // alone.
    let db_disk = SmallDisk::mount("disk-full-db", "4m");
    let audit_disk = SmallDisk::mount("disk-full-audit", "1m");
    let db = db_disk.path("gateway.db");
    let audit_file = audit_disk.path("audit.log");
    let gw = Gateway::start_with("disk-full", |text| {
        *text = text
            .replace(
                "sqlite = \"state/gateway.db\"",
                &format!("sqlite = \"{}\"", db.display()),
            )
            .replace(
                "audit_file = \"audit/audit.log\"",
                &format!("audit_file = \"{}\"", audit_file.display()),
            );
    });
    let token = gw.issue_token("edge-eu", "dispatcher", 200).await;
    let token_id = token.id.to_string();
    let mut issued = BTreeSet::new();
    let mut record = |serial: Option<String>| {
        if let Some(serial) = serial {
            // Recorded before the node got it: never a certificate without its record.
            let recorded: BTreeSet<String> = recorded_identities(&db)
                .into_keys()
                .map(|s| normal_serial(&s))
                .collect();
            assert!(
                recorded.contains(&serial),
                "{serial} issued but not recorded"
            );
            issued.insert(serial);
        }
    };
    for i in 0..3 {
        let (reply, serial) = try_join(&gw, &token.token, &format!("before-{i}")).await;
        assert_status(&reply, 200);
        record(serial);
    }

    // The audit log's disk runs full: the database still takes joins (it is the durable copy),
    // and the file mirror must catch up once space returns, without a gap or a torn line.
    // Joins go on until the entries committed since the disk filled up are more than the
    // file's last, partly used page can still hold.
    audit_disk.fill();
    let filled_at = count(&db, "SELECT max(seq) FROM audit");
    let since_full =
        format!("SELECT coalesce(sum(length(line) + 1), 0) FROM audit WHERE seq > {filled_at}");
    for i in 0.. {
        assert!(i < 20, "20 joins did not outgrow a page");
        let (reply, serial) = try_join(&gw, &token.token, &format!("audit-full-{i}")).await;
        assert_status(&reply, 200);
        record(serial);
        if count(&db, &since_full) > PAGE {
            break;
        }
    }
    let behind = count(&db, "SELECT count(*) FROM audit") - audit_line_count(&audit_file);
    assert!(behind > 0);
    // The metric the audit-writer alert watches shows the file behind (by at least what it
    // misses; entries of a torn append count until they are written whole).
    let backlog = gw
        .metric("bootstrap_audit_mirror_backlog_entries")
        .await
        .unwrap();
    assert!(
        backlog >= behind as f64,
        "backlog {backlog}, behind {behind}"
    );
    audit_disk.free();
    wait_for_mirror(&db, &audit_file);
    let deadline = Instant::now() + DEADLINE;
    while gw.metric("bootstrap_audit_mirror_backlog_entries").await != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the audit backlog never went back to 0"
        );
        tokio::task::yield_now().await;
    }

    // The database's disk runs full: once SQLite can no longer write its log, joins are
    // refused with 503 + Retry-After, nothing is issued, and the gateway stays up. Until then
    // commits may still go into log space the file already holds (its checkpoints, on their
    // own thread, let it be reused): each of those joins is durable and recorded like any.
    db_disk.fill();
    let mut first_refusal = None;
    for i in 0..50 {
        let (reply, serial) = try_join(&gw, &token.token, &format!("db-filling-{i}")).await;
        if reply.status == 503 {
            first_refusal = Some(reply);
            break;
        }
        assert_status(&reply, 200);
        record(serial);
    }
    let first_refusal = first_refusal.expect("50 joins on a full disk were all issued");
    assert_eq!(problem(&first_refusal).reason, "store-unavailable");
    // A node CLI joining meanwhile is refused like the others and keeps retrying.
    let nodes = TempDir::new("disk-full-nodes");
    let token_file = nodes.0.join("token");
    std::fs::write(&token_file, &token.token).unwrap();
    let mut cli = spawn_node(&gw, &nodes.0, "cli-node", &token_id, &token_file);
    for i in 0..4 {
        let (reply, serial) = try_join(&gw, &token.token, &format!("db-full-{i}")).await;
        assert_status(&reply, 503);
        assert!(
            reply.headers.contains_key("retry-after"),
            "{:?}",
            reply.headers
        );
        let retry_after = reply.headers["retry-after"].to_str().unwrap();
        assert!(retry_after.parse::<u64>().unwrap() > 0, "{retry_after}");
        assert_eq!(problem(&reply).reason, "store-unavailable");
        assert_eq!(problem(&reply).stage, "store");
        assert_eq!(serial, None);
    }
    let deadline = Instant::now() + DEADLINE;
    while refused_at_store(&gw).await < 5 {
        assert!(Instant::now() < deadline, "the node CLI was never refused");
        tokio::task::yield_now().await;
    }
    let health = gw.node().get("/healthz").await.unwrap();
    assert_eq!(health.status, 200);

    // Space returns: joins succeed again, without a restart.
    db_disk.free();
    for i in 0..3 {
        let (reply, serial) = try_join(&gw, &token.token, &format!("after-{i}")).await;
        assert_status(&reply, 200);
        record(serial);
    }

    let status = loop {
        if let Some(status) = cli.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the node CLI never finished");
        tokio::task::yield_now().await;
    };
    assert!(status.success(), "the node CLI failed: {status}");
    record(Some(cert_serial(&cli.out.join("cert.pem"))));

    // Every certificate handed out is recorded and audited, the token's uses are exactly its
    // identities, and the log verifies, agrees with the database, and lets the gateway start.
    let recorded: BTreeSet<String> = recorded_identities(&db)
        .into_iter()
        .filter(|(_, token)| *token == token_id)
        .map(|(serial, _)| normal_serial(&serial))
        .collect();
    assert_eq!(recorded, issued);
    let uses = gw.token(&token_id).await.unwrap().uses;
    assert_eq!(uses as usize, issued.len());
    wait_for_mirror(&db, &audit_file);
    assert_eq!(audited_serials(&audit_events_in(&audit_file)), issued);
    let (dir, _) = gw.stop();
    assert_audit_verifies(&dir.0);
    let gw = Gateway::spawn(dir);
    let (reply, _) = try_join(&gw, &token.token, "after-restart").await;
    assert_status(&reply, 200);
}
