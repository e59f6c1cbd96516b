//! Two real gateway processes on one PostgreSQL database (`[store] backend = "postgres"`), as
//! replicas behind a load balancer: a join through one, the token's last use refused through
//! the other, a renewal, a token revocation through one reaching the other's feed within a
//! second and refusing its renewal, and both audit files holding the database's one chain. The server is the one in
//! `OMNIRELAY_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`), or a private
//! one started from `initdb`/`pg_ctl` when none answers; the test works in a database of its
//! own, dropped afterwards.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is a failed test"
)]

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use omnirelay_e2e::raw::{raw_problem, renew, renewed};
use omnirelay_e2e::{
    Gateway, NodeKey, TempDir, join_as, join_request, omnirelay, post_join, problem,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_tokens_lineages_revocations_and_one_audit_chain() {
    let db = Database::create().await;
    let url = db.url();
    let a = Gateway::start_with("pg-a", |text| use_postgres(text, &url));
    let b = Gateway::spawn(replica_of(&a));

    // One use, taken through B; the same token through A finds it gone.
    let token = a.issue_token("edge-eu", "relay", 1).await;
    let key = NodeKey::new("relay-1");
    let joined = join_as(&b.node(), &token.token, "relay-1", &key).await;
    let second = join_request(&a.node(), &token.token, "relay-2", &NodeKey::new("relay-2")).await;
    let refused = post_join(&a.node(), &second).await;
    assert_eq!(refused.status, 409, "{:?}", problem(&refused));

    // Renewed through A, in the lineage B recorded.
    let next = NodeKey::new("relay-1");
    let key_pem = key.key.serialize_pem();
    let renewal = renewed(
        &renew(
            &a,
            Some((&joined.certificate_chain, &key_pem)),
            &next.csr,
            Some("renew-1"),
        )
        .await,
    );
    assert_eq!(renewal.spiffe_id, joined.spiffe_id);

    // A relying party waiting on B's feed hears of a revocation made through A within a second.
    let open = || async {
        b.metric("bootstrap_open_connections")
            .await
            .unwrap_or_default()
    };
    let before = open().await;
    let feed = b.node();
    let waiting = tokio::spawn(async move {
        let reply = feed.get("/v1/revocations?since=0&wait=25").await.unwrap();
        (Instant::now(), reply)
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while open().await < before + 1.0 {
        assert!(Instant::now() < deadline, "the feed client never connected");
        tokio::task::yield_now().await;
    }

    // Revoked through A: B refuses the renewal, from the database.
    let reply = a
        .admin()
        .post(
            "/admin/v1/revoke",
            serde_json::to_vec(&serde_json::json!({
                "token": token.id,
                "reason": "node stolen",
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let revoked_at = Instant::now();
    let (arrived, page) = waiting.await.unwrap();
    assert_eq!(page.status, 200);
    let page: gateway::api::wire::RevocationPage = serde_json::from_slice(&page.body).unwrap();
    let mut fed: Vec<_> = page.revocations.iter().map(|r| r.serial.clone()).collect();
    fed.sort();
    let mut lineage = vec![joined.serial.clone(), renewal.serial.clone()];
    lineage.sort();
    assert_eq!(fed, lineage);
    assert!(
        arrived <= revoked_at + Duration::from_secs(1),
        "B's feed answered {:?} after A's revocation returned",
        arrived.saturating_duration_since(revoked_at)
    );
    let next_pem = next.key.serialize_pem();
    let refused = renew(
        &b,
        Some((&renewal.certificate_chain, &next_pem)),
        &NodeKey::new("relay-1").csr,
        None,
    )
    .await;
    assert_eq!(refused.status, 403);
    assert!(
        ["identity-revoked", "token-revoked"].contains(&raw_problem(&refused).reason.as_str()),
        "{:?}",
        raw_problem(&refused)
    );

    // What the database holds.
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT serial, revoked_at IS NOT NULL FROM identities WHERE token_id = $1
             ORDER BY issued_at, serial",
            &[&token.id],
        )
        .await
        .unwrap();
    let recorded: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut want = vec![
        (joined.serial.clone(), true),
        (renewal.serial.clone(), true),
    ];
    want.sort();
    let mut got = recorded.clone();
    got.sort();
    assert_eq!(got, want);
    let uses: i64 = client
        .query_one("SELECT uses FROM tokens WHERE id = $1", &[&token.id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(uses, 1);

    // Stopped cleanly, each replica's audit file holds the database's whole chain, signed.
    let (a_dir, a_status) = a.stop();
    let (b_dir, b_status) = b.stop();
    assert!(a_status.success() && b_status.success());
    let entries: i64 = client
        .query_one("SELECT COUNT(*) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    for dir in [&a_dir, &b_dir] {
        let log = dir.0.join("audit/audit.log");
        let public = dir.0.join("audit-key/audit.pub");
        let out = omnirelay(&[
            "audit",
            "verify",
            "--file",
            log.to_str().unwrap(),
            "--public-key",
            public.to_str().unwrap(),
        ])
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("ok, {entries} entries")),
            "{stdout}"
        );
        assert!(stdout.contains("0 unsigned entries"), "{stdout}");
    }
    let text = std::fs::read_to_string(a_dir.0.join("audit/audit.log")).unwrap();
    for kind in [
        "identity-issued",
        "identity-renewed",
        "token-revoked",
        "identity-revoked",
    ] {
        assert!(
            text.contains(&format!("\"kind\":\"{kind}\"")),
            "{kind} missing"
        );
    }
}

/// `gateway.toml` switched to the PostgreSQL store at `url`.
fn use_postgres(text: &mut String, url: &str) {
    *text = text.replacen("[store]\n", "[store]\nbackend = \"postgres\"\n", 1);
    text.push_str(&format!(
        "\n[store.postgres]\nurl = \"{url}\"\npool_size = 4\n"
    ));
}

/// A copy of `a`'s state (same CA, token and audit keys, same database) without its audit
/// file: a second replica.
fn replica_of(a: &Gateway) -> TempDir {
    let dir = TempDir::new("pg-b");
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", a.path("").display()))
        .arg(&dir.0)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::remove_file(dir.0.join("audit/audit.log")).unwrap();
    let _ = std::fs::remove_dir_all(dir.0.join("state"));
    std::fs::create_dir_all(dir.0.join("state")).unwrap();
    dir
}

/// The server's `key=value` parameters, without a database name.
fn server() -> &'static String {
    type Watchdog = (std::process::Child, std::process::ChildStdin);
    static SERVER: OnceLock<(String, Option<Watchdog>)> = OnceLock::new();
    &SERVER
        .get_or_init(|| {
            let url = std::env::var("OMNIRELAY_TEST_POSTGRES")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
            let config: tokio_postgres::Config = url.parse().unwrap();
            let host = match config.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                _ => "127.0.0.1".into(),
            };
            let port = config.get_ports().first().copied().unwrap_or(5432);
            let user = config.get_user().unwrap_or("postgres");
            let answers = format!("{host}:{port}")
                .parse()
                .ok()
                .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok())
                .is_some();
            if answers {
                (format!("host={host} port={port} user={user}"), None)
            } else {
                let (port, stop) = private_server(&url);
                (
                    format!("host=127.0.0.1 port={port} user=postgres"),
                    Some(stop),
                )
            }
        })
        .0
}

/// A private server from `initdb`/`pg_ctl` on a free port, stopped (through the pipe's close)
/// when this process exits. Fails saying how to get PostgreSQL when it is not installed.
fn private_server(url: &str) -> (u16, (std::process::Child, std::process::ChildStdin)) {
    let bin = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).find(|d| d.join("initdb").is_file()))
        .or_else(|| {
            let mut dirs: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|b| b.join("initdb").is_file())
                .collect();
            dirs.sort();
            dirs.pop()
        })
        .unwrap_or_else(|| {
            panic!(
                "no PostgreSQL answers at {url} and no initdb/pg_ctl is installed: install \
                 PostgreSQL (`apt-get install -y postgresql`) or set OMNIRELAY_TEST_POSTGRES"
            )
        });
    let dir = std::env::temp_dir().join(format!("omnirelay-e2e-pg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    if root {
        assert!(
            Command::new("chown")
                .arg("postgres:")
                .arg(&dir)
                .status()
                .unwrap()
                .success()
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (bin, dir) = (bin.display().to_string(), dir.display().to_string());
    let start = format!(
        "set -e; '{bin}/initdb' -D '{dir}/data' -U postgres --auth=trust --no-sync >/dev/null; \
         '{bin}/pg_ctl' -D '{dir}/data' -l '{dir}/log' -w -o \"-p {port} -k '{dir}' \
         -c listen_addresses=127.0.0.1\" start >/dev/null"
    );
    assert!(
        shell(root, &start).status().unwrap().success(),
        "private PostgreSQL in {dir}"
    );
    let stop = format!("read _x; '{bin}/pg_ctl' -D '{dir}/data' -m fast stop; rm -rf '{dir}'");
    let mut watchdog = shell(root, &stop).stdin(Stdio::piped()).spawn().unwrap();
    let pipe = watchdog.stdin.take().unwrap();
    (port, (watchdog, pipe))
}

fn shell(as_postgres: bool, script: &str) -> Command {
    let mut c = Command::new(if as_postgres { "runuser" } else { "sh" });
    if as_postgres {
        c.args(["-u", "postgres", "--", "sh"]);
    }
    c.args(["-c", script]);
    c
}

/// A database of this test's own, dropped when the test ends.
struct Database(String);

impl Database {
    async fn create() -> Self {
        let name = format!("omnirelay_e2e_{}", std::process::id());
        let admin = connect(&format!("{} dbname=postgres", server())).await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Self(name)
    }

    /// The URL the gateways use (no password: trust authentication).
    fn url(&self) -> String {
        format!("{} dbname={}", server(), self.0)
    }

    async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url()).await
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.0.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                connect(&format!("{} dbname=postgres", server()))
                    .await
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
        })
        .join();
    }
}

async fn connect(params: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(params, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test PostgreSQL: {e}"));
    tokio::spawn(connection);
    client
}
