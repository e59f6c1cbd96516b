//! Real gateway processes on one PostgreSQL database (`[store] backend = "postgres"`), as
//! replicas behind a load balancer, and the drills of issue #9: a join through one, the
//! token's last use refused through the other, renewals, a token revocation through one
//! reaching the other's feed within a second and refusing its renewal; 50 joins split over two
//! replicas on a five-use token; one nonce through both; one replica SIGKILLed mid-load; the
//! database stopped mid-load and started again. The server is the one in
//! `OMNIRELAY_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`), or a private
//! one started from `initdb`/`pg_ctl` when none answers; the drill that stops the database
//! always starts a private server of its own. Each test works in a database of its own,
//! dropped afterwards.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is a failed test"
)]

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gateway::agent::GatewayClient;
use gateway::api::wire::{Challenge, JoinRequest, JoinResponse};
use omnirelay_e2e::bundles::{
    PolicyRepo, bundle_source, follow_repo, policy_status, policy_status_until,
};
use omnirelay_e2e::raw::{raw_problem, renew, renewed};
use omnirelay_e2e::{
    Gateway, NodeKey, TempDir, join_as, join_request, omnirelay, post_join, problem, token_only,
};

/// Generous bound for what must happen on its own (a replica noticing its database is gone
/// or back, load making progress).
const DEADLINE: Duration = Duration::from_secs(30);

/// How long a replica may take to apply a pin made through another: under the listener's 5 s
/// resync, so only the notification can meet it (the new version is compiled and its vectors
/// run on arrival, which a debug build takes a while over).
const PIN_DEADLINE: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_tokens_lineages_revocations_and_one_audit() {
    let db = Database::create("").await;
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

    // Stopped cleanly, each replica wrote its own chain and its audit file holds that chain,
    // signed; the two files together hold every entry of the database.
    let (a_dir, a_status) = a.stop();
    let (b_dir, b_status) = b.stop();
    assert!(a_status.success() && b_status.success());
    let entries: i64 = client
        .query_one("SELECT COUNT(*) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    let chains: i64 = client
        .query_one("SELECT COUNT(DISTINCT chain) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(chains, 2);
    let mut in_files = 0;
    let mut text = String::new();
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
        assert!(stdout.contains("0 unsigned entries"), "{stdout}");
        let lines = std::fs::read_to_string(&log).unwrap();
        in_files += lines.lines().count();
        text.push_str(&lines);
    }
    assert_eq!(in_files as i64, entries);
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

    // `audit verify --config` checks the database's audit itself (both chains, and the heads
    // each checkpoint binds), then the file against it.
    let config = a_dir.0.join("gateway.toml");
    let config = config.to_str().unwrap();
    let out = omnirelay(&["audit", "verify", "--config", config]).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines.iter().any(|l| l.starts_with("the database's audit")
            && l.contains(&format!("ok, {entries} entries in 2 chains"))),
        "{stdout}"
    );
    assert!(stdout.contains("(the database's head)"), "{stdout}");

    // `audit export` writes the database's audit to a file: every chain, verifiable without
    // the database, each replica's lines exactly as its mirror holds them.
    let exported = a_dir.0.join("exported.log");
    let out = omnirelay(&[
        "audit",
        "export",
        "--config",
        config,
        "--out",
        exported.to_str().unwrap(),
    ])
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let export = std::fs::read_to_string(&exported).unwrap();
    assert_eq!(export.lines().count() as i64, entries);
    for dir in [&a_dir, &b_dir] {
        let own = std::fs::read_to_string(dir.0.join("audit/audit.log")).unwrap();
        assert!(
            export.contains(&own),
            "a replica's chain is not in the export whole"
        );
    }
    let public = a_dir.0.join("audit-key/audit.pub");
    let out = omnirelay(&[
        "audit",
        "verify",
        "--file",
        exported.to_str().unwrap(),
        "--public-key",
        public.to_str().unwrap(),
    ])
    .unwrap();
    assert!(out.status.success());
    // An entry edited in the database: `verify --config` names it.
    client
        .batch_execute(
            "UPDATE audit SET line = replace(line, 'relay-1', 'relay-9') \
             WHERE line LIKE '%relay-1%'",
        )
        .await
        .unwrap();
    let out = omnirelay(&["audit", "verify", "--config", config]).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.starts_with("the database's audit") && stdout.contains("BROKEN"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_joins_over_two_replicas_on_a_five_use_token_issue_exactly_five() {
    const NODES: usize = 50;
    const MAX_USES: u32 = 5;
    let db = Database::create("_race").await;
    let url = db.url();
    let a = Gateway::start_with("pg-race-a", |text| use_postgres_unlimited(text, &url));
    let b = Gateway::spawn(replica_of(&a));
    let token = a.issue_token("edge-eu", "relay", MAX_USES).await;

    // Every node prepared first (connection, key, nonce), half through each replica; the
    // joins leave together from the barrier.
    let barrier = Arc::new(tokio::sync::Barrier::new(NODES));
    let mut joins = Vec::new();
    for i in 0..NODES {
        let node = if i % 2 == 0 { a.node() } else { b.node() };
        let name = format!("racer-{i:02}");
        let request = join_request(&node, &token.token, &name, &NodeKey::new(&name)).await;
        let barrier = barrier.clone();
        joins.push(tokio::spawn(async move {
            barrier.wait().await;
            post_join(&node, &request).await
        }));
    }
    let mut issued = BTreeSet::new();
    for join in joins {
        let reply = join.await.unwrap();
        match reply.status.as_u16() {
            200 => {
                let joined: JoinResponse = serde_json::from_slice(&reply.body).unwrap();
                issued.insert(joined.serial);
            }
            409 => {
                let problem = problem(&reply);
                assert_eq!(
                    (problem.stage.as_str(), problem.reason.as_str()),
                    ("token", "token-exhausted"),
                    "{problem:?}"
                );
            }
            other => panic!(
                "unexpected HTTP {other}: {}",
                String::from_utf8_lossy(&reply.body)
            ),
        }
    }
    assert_eq!(issued.len(), MAX_USES as usize, "{issued:?}");

    // The database, its audit chain and both replicas' token lists tell the same story.
    let client = db.client().await;
    assert_eq!(recorded_serials(&client, &token.id).await, issued);
    assert_eq!(audited_serials(&client, &token.id).await, issued);
    let uses: i64 = client
        .query_one("SELECT uses FROM tokens WHERE id = $1", &[&token.id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(uses, i64::from(MAX_USES));
    for gw in [&a, &b] {
        let reply = gw.admin().get("/admin/v1/tokens").await.unwrap();
        assert_eq!(reply.status, 200);
        let tokens: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        let listed = tokens
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == token.id.as_str())
            .unwrap_or_else(|| panic!("token missing from {tokens}"));
        assert_eq!(listed["uses"], MAX_USES, "{listed}");
        assert_eq!(listed["max_uses"], MAX_USES, "{listed}");
    }

    // One nonce, presented to A and then to B: the second is a replay.
    let spare = a.issue_token("edge-eu", "relay", 2).await;
    let node_a = a.node();
    let first = join_request(&node_a, &spare.token, "nonce-1", &NodeKey::new("nonce-1")).await;
    let reply = post_join(&node_a, &first).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let replay = JoinRequest {
        node_name: "nonce-2".into(),
        csr: NodeKey::new("nonce-2").csr,
        ..first
    };
    let refused = post_join(&b.node(), &replay).await;
    assert_eq!(refused.status, 401, "{:?}", problem(&refused));
    let refused = problem(&refused);
    assert_eq!(
        (refused.stage.as_str(), refused.reason.as_str()),
        ("attestation", "nonce-replayed")
    );

    // A token revoked through A: B refuses it (the revocation is in the database B reads;
    // polled with the issue's one-second bound as the deadline). B verified this token's
    // signature for the replay above, so its token cache holds it: that cache proves only the
    // signature, and whether the token is revoked is read from the database every time.
    a.revoke(serde_json::json!({ "token": spare.id, "reason": "leaked" }))
        .await;
    let revoked_at = Instant::now();
    let node_b = b.node();
    loop {
        let request =
            join_request(&node_b, &spare.token, "nonce-3", &NodeKey::new("nonce-3")).await;
        let reply = post_join(&node_b, &request).await;
        if reply.status == 403 && problem(&reply).reason == "token-revoked" {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "B still answers {} a second after A revoked the token: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
    }
    let uses: i64 = client
        .query_one("SELECT uses FROM tokens WHERE id = $1", &[&spare.id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(uses, 1, "a refused join took a use");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_pin_through_one_replica_reaches_the_other_and_so_does_the_unpin() {
    let repo = PolicyRepo::new("pg-pin");
    let v1 = repo.publish(&bundle_source("pg-pin", "v1", 3600).0, "1.0.0", None);
    let v2 = repo.publish(&bundle_source("pg-pin", "v2", 1800).0, "1.1.0", None);
    let db = Database::create("_pin").await;
    let url = db.url();
    let a = Gateway::start_with("pg-pin-a", |text| {
        follow_repo(text, &repo.url(), "");
        use_postgres(text, &url);
    });
    let b = Gateway::spawn(replica_of(&a));
    for gw in [&a, &b] {
        policy_status_until(gw, "v2 active", |s| s["active"]["commit"] == v2.as_str()).await;
    }
    let token = a.issue_token("edge-eu", "dispatcher", 10).await.token;

    // Pinned through A's admin API, as an operator would: B follows through its own pipeline.
    let out = admin_cli(&a, &["policy", "pin", "1.0.0"]);
    assert!(out.contains("active edge 1.0.0"), "{out}");
    let pinned_at = Instant::now();
    let s = pin_status_until(&b, "B pinned to 1.0.0", |s| {
        s["pinned"] == "1.0.0" && s["active"]["commit"] == v1.as_str()
    })
    .await;
    let took = pinned_at.elapsed();
    eprintln!("B took the pin {took:?} after A's pin returned");
    assert_eq!(s["last_candidate"]["result"], "ok", "{s:#}");
    let status = admin_cli(&b, &["policy", "status"]);
    assert!(status.contains("\"pinned\": \"1.0.0\""), "{status}");
    let joined = join_as(&b.node(), &token, "pin-b-1", &NodeKey::new("pin-b-1")).await;
    assert_eq!(joined.policy.version, "1.0.0");
    // B's polls do not move it off the pin.
    pin_status_until(&b, "a poll on B while pinned", |s| {
        s["last_poll"]["result"] == "unchanged" && s["active"]["commit"] == v1.as_str()
    })
    .await;
    // Audited by B itself (A's entries say only who pinned).
    let entry = b.wait_for_audit("policy-pinned", |e| {
        e["pinned_by"]
            .as_str()
            .is_some_and(|by| by.contains("through another replica"))
    });
    assert_eq!(entry["commit"], v1);
    b.wait_for_audit("policy-activated", |e| {
        e["commit"] == v1.as_str() && e["trigger"] == "shared-pin"
    });

    // Unpinned through A: B follows the remote again.
    let out = admin_cli(&a, &["policy", "unpin"]);
    assert!(out.contains("active edge 1.1.0"), "{out}");
    let unpinned_at = Instant::now();
    pin_status_until(&b, "B unpinned on 1.1.0", |s| {
        s["pinned"].is_null() && s["active"]["commit"] == v2.as_str()
    })
    .await;
    eprintln!(
        "B took the unpin {:?} after A's unpin returned",
        unpinned_at.elapsed()
    );
    let joined = join_as(&b.node(), &token, "pin-b-2", &NodeKey::new("pin-b-2")).await;
    assert_eq!(joined.policy.version, "1.1.0");
    b.wait_for_audit("policy-unpinned", |e| {
        e["unpinned_by"]
            .as_str()
            .is_some_and(|by| by.contains("through another replica"))
    });

    // The database holds the fleet's pin: one generation per change, unpinned now.
    let client = db.client().await;
    let row = client
        .query_one("SELECT generation, target FROM policy_pin", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);
    assert_eq!(row.get::<_, Option<String>>(1), None);

    admin_cli(&b, &["policy", "pin", "1.0.0"]);
    pin_status_until(&a, "A pinned through B", |s| {
        s["pinned"] == "1.0.0" && s["active"]["commit"] == v1.as_str()
    })
    .await;
    // A replica started while the fleet is pinned serves the pin from its first request.
    let c = Gateway::spawn(replica_of(&a));
    let s = policy_status(&c).await;
    assert_eq!(
        (s["pinned"].as_str(), s["active"]["commit"].as_str()),
        (Some("1.0.0"), Some(v1.as_str())),
        "{s:#}"
    );
}

/// [`policy_status_until`] with a deadline well below the listener's 5 s resync, so a pin
/// that arrives proves the notification carried it.
async fn pin_status_until(
    gw: &Gateway,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + PIN_DEADLINE;
    loop {
        let status = policy_status(gw).await;
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never happened within {PIN_DEADLINE:?}; last status {status:#}"
        );
        tokio::task::yield_now().await;
    }
}

/// `omnirelay ARGS --admin …` against `gw`'s admin listener; its stdout.
fn admin_cli(gw: &Gateway, args: &[&str]) -> String {
    let admin = format!("https://{}", gw.admin_addr);
    let credential = gw.path("admin/credential");
    let ca = gw.path("ca/ca.pem");
    let mut all = args.to_vec();
    all.extend([
        "--admin",
        &admin,
        "--credential",
        credential.to_str().unwrap(),
        "--ca-bundle",
        ca.to_str().unwrap(),
    ]);
    let out = omnirelay(&all).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_load_leaves_the_other_serving_and_every_certificate_recorded() {
    const MAX_USES: u32 = 40;
    let db = Database::create("_kill").await;
    let url = db.url();
    let a = Gateway::start_with("pg-kill-a", |text| use_postgres_unlimited(text, &url));
    let b = Gateway::spawn(replica_of(&a));
    let token = a.issue_token("edge-eu", "relay", MAX_USES).await;
    let seen: Seen = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let loads = [
        load(a.node(), &token.token, "kill-a", &stop, &seen),
        load(b.node(), &token.token, "kill-b", &stop, &seen),
    ];
    wait_for(&seen, "six issued before the kill", |o| {
        issued_in(o).len() >= 6
    })
    .await;
    let b_dir = b.kill();
    let at_kill = issued_in(&seen.list.lock().unwrap()).len();

    // A keeps serving: the load through it uses the token up.
    wait_for(&seen, "the token used up through A after the kill", |o| {
        o.iter().any(|o| {
            matches!(o, Outcome::Refused { status: 409, reason, .. } if reason == "token-exhausted")
        })
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for load in loads {
        load.await.unwrap();
    }
    let outcomes = std::mem::take(&mut *seen.list.lock().unwrap());
    let issued = issued_in(&outcomes);
    assert!(issued.len() > at_kill, "nothing issued after the kill");
    for outcome in &outcomes {
        match outcome {
            Outcome::Issued(_) | Outcome::Lost => {}
            Outcome::Refused {
                status: 409,
                reason,
                ..
            } if reason == "token-exhausted" => {}
            other => panic!("unexpected outcome {other:?}"),
        }
    }

    // Every certificate a node received is recorded and audited; the token is not over-used
    // (a join B committed as it died may be recorded without its node having the answer).
    let client = db.client().await;
    let recorded = recorded_serials(&client, &token.id).await;
    assert!(
        issued.is_subset(&recorded),
        "{issued:?} not all in {recorded:?}"
    );
    assert_eq!(audited_serials(&client, &token.id).await, recorded);
    let uses: i64 = client
        .query_one("SELECT uses FROM tokens WHERE id = $1", &[&token.id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(uses, i64::from(MAX_USES));
    assert_eq!(recorded.len(), MAX_USES as usize);

    // The database's audit verifies (B's chain too, cut by the kill at a commit boundary), and
    // A's file, stopped cleanly, against it.
    let (a_dir, status) = a.stop();
    assert!(status.success());
    verify_audit_file(&client, &a_dir).await;
    drop(b_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_get_503_while_the_database_is_stopped_and_succeed_after_without_a_restart() {
    // A server of this test's own: the drill stops it.
    let pg = PrivateServer::start("drill");
    let db = Database::create_on(pg.params(), "_down").await;
    let url = db.url();
    let a = Gateway::start_with("pg-down-a", |text| use_postgres_unlimited(text, &url));
    let b = Gateway::spawn(replica_of(&a));
    let token = a.issue_token("edge-eu", "relay", 100_000).await;
    for gw in [&a, &b] {
        let (status, report) = readiness(gw).await;
        assert_eq!(status, 200, "{report}");
        assert_eq!(report["checks"]["store"]["ok"], true, "{report}");
        assert_eq!(report["checks"]["store"]["backend"], "postgres", "{report}");
    }

    let seen: Seen = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let loads = [
        load(a.node(), &token.token, "down-a", &stop, &seen),
        load(b.node(), &token.token, "down-b", &stop, &seen),
    ];
    wait_for(&seen, "four issued before the stop", |o| {
        issued_in(o).len() >= 4
    })
    .await;
    pg.stop_fast();

    // Both replicas say so on /readyz, and refuse joins with 503 + Retry-After.
    for gw in [&a, &b] {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let (status, report) = readiness(gw).await;
            if status == 503 {
                assert_eq!(report["ready"], false, "{report}");
                assert_eq!(report["checks"]["store"]["ok"], false, "{report}");
                assert_eq!(report["checks"]["policy"]["ok"], true, "{report}");
                break;
            }
            assert!(Instant::now() < deadline, "still ready: {report}");
        }
        let node = gw.node();
        for i in 0..2 {
            let name = format!("while-down-{}-{i}", gw.node_addr.port());
            let request = join_request(&node, &token.token, &name, &NodeKey::new(&name)).await;
            let reply = post_join(&node, &request).await;
            assert_eq!(
                reply.status,
                503,
                "{}",
                String::from_utf8_lossy(&reply.body)
            );
            let after: u64 = reply.headers["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(after >= 1);
            let refused = problem(&reply);
            assert_eq!(
                (refused.stage.as_str(), refused.reason.as_str()),
                ("store", "store-unavailable")
            );
        }
    }

    // The database returns: both replicas become ready and issue again, as they are.
    pg.resume();
    for gw in [&a, &b] {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let (status, report) = readiness(gw).await;
            if status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "not ready again: {report}");
        }
        let name = format!("after-{}", gw.node_addr.port());
        join_as(&gw.node(), &token.token, &name, &NodeKey::new(&name)).await;
    }
    let before = issued_in(&seen.list.lock().unwrap()).len();
    wait_for(&seen, "the load issuing again", |o| {
        issued_in(o).len() >= before + 4
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for load in loads {
        load.await.unwrap();
    }
    let outcomes = std::mem::take(&mut *seen.list.lock().unwrap());
    let mut refused = 0;
    for outcome in &outcomes {
        match outcome {
            Outcome::Issued(_) => {}
            Outcome::Refused {
                status: 503,
                stage,
                reason,
                retry_after: true,
            } if stage == "store" && reason == "store-unavailable" => refused += 1,
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert!(refused > 0, "the load never met the outage");

    // None issued without its record and its audit entry; the uses match the identities.
    let client = db.client().await;
    let issued = issued_in(&outcomes);
    let recorded = recorded_serials(&client, &token.id).await;
    assert!(
        issued.is_subset(&recorded),
        "{issued:?} not all in {recorded:?}"
    );
    assert_eq!(audited_serials(&client, &token.id).await, recorded);
    let uses: i64 = client
        .query_one("SELECT uses FROM tokens WHERE id = $1", &[&token.id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(usize::try_from(uses).unwrap(), recorded.len());

    // The audit files caught up with the database after the outage.
    let (a_dir, a_status) = a.stop();
    let (b_dir, b_status) = b.stop();
    assert!(a_status.success() && b_status.success());
    for dir in [&a_dir, &b_dir] {
        verify_audit_file(&client, dir).await;
    }
}

/// What one join of a load got.
#[derive(Debug)]
enum Outcome {
    /// A certificate, by serial.
    Issued(String),
    /// A refusal.
    Refused {
        status: u16,
        stage: String,
        reason: String,
        retry_after: bool,
    },
    /// No answer: the replica went away.
    Lost,
}

/// What the loads saw, and a wake-up for whoever waits on it.
#[derive(Default)]
struct Outcomes {
    list: Mutex<Vec<Outcome>>,
    changed: tokio::sync::Notify,
}

type Seen = Arc<Outcomes>;

/// Fresh nodes joining through `node` with `token`, one after another, until `stop` or until
/// the replica stops answering; every outcome is pushed to `seen`.
fn load(
    node: GatewayClient,
    token: &str,
    tag: &str,
    stop: &Arc<AtomicBool>,
    seen: &Seen,
) -> tokio::task::JoinHandle<()> {
    let (token, tag, stop, seen) = (
        token.to_string(),
        tag.to_string(),
        stop.clone(),
        seen.clone(),
    );
    tokio::spawn(async move {
        for i in 0.. {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let name = format!("{tag}-{i}");
            let outcome = join_once(&node, &token, &name).await;
            let lost = matches!(outcome, Outcome::Lost);
            seen.list.lock().unwrap().push(outcome);
            seen.changed.notify_waiters();
            if lost {
                return;
            }
        }
    })
}

async fn join_once(node: &GatewayClient, token: &str, name: &str) -> Outcome {
    let Ok(challenge) = node.get("/v1/bootstrap/challenge").await else {
        return Outcome::Lost;
    };
    assert_eq!(challenge.status, 200);
    let challenge: Challenge = serde_json::from_slice(&challenge.body).unwrap();
    let request = JoinRequest {
        token: token.to_string(),
        node_name: name.to_string(),
        csr: NodeKey::new(name).csr,
        idempotency_key: None,
        attestation: token_only(&challenge.nonce),
    };
    let Ok(reply) = node
        .post("/v1/bootstrap/join", serde_json::to_vec(&request).unwrap())
        .await
    else {
        return Outcome::Lost;
    };
    if reply.status == 200 {
        let joined: JoinResponse = serde_json::from_slice(&reply.body).unwrap();
        return Outcome::Issued(joined.serial);
    }
    let refused = problem(&reply);
    Outcome::Refused {
        status: reply.status.as_u16(),
        stage: refused.stage,
        reason: refused.reason,
        retry_after: reply.headers.contains_key("retry-after"),
    }
}

fn issued_in(outcomes: &[Outcome]) -> BTreeSet<String> {
    outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Issued(serial) => Some(serial.clone()),
            _ => None,
        })
        .collect()
}

/// Waits (at most [`DEADLINE`]) until `done` holds for what the loads saw, checking at each
/// outcome they add.
async fn wait_for(seen: &Seen, what: &str, done: impl Fn(&[Outcome]) -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let changed = seen.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if done(&seen.list.lock().unwrap()) {
            return;
        }
        assert!(
            tokio::time::timeout_at(deadline, changed).await.is_ok(),
            "{what}: not within {DEADLINE:?}"
        );
    }
}

/// `/readyz` of the node listener: status and report.
async fn readiness(gw: &Gateway) -> (u16, serde_json::Value) {
    let reply = gw.node().get("/readyz").await.unwrap();
    let report = serde_json::from_slice(&reply.body).unwrap();
    (reply.status.as_u16(), report)
}

/// Serials the database records for `token`.
async fn recorded_serials(client: &tokio_postgres::Client, token: &str) -> BTreeSet<String> {
    client
        .query(
            "SELECT serial FROM identities WHERE token_id = $1",
            &[&token],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Serials of the `identity-issued` entries of the database's audit (every chain) for `token`.
async fn audited_serials(client: &tokio_postgres::Client, token: &str) -> BTreeSet<String> {
    client
        .query(
            "SELECT line FROM audit WHERE line LIKE '%\"kind\":\"identity-issued\"%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .filter_map(|r| {
            let entry: serde_json::Value = serde_json::from_str(r.get(0)).unwrap();
            let event = &entry["event"];
            (event["token_id"] == token).then(|| event["serial"].as_str().unwrap().to_string())
        })
        .collect()
}

/// `omnirelay audit verify --config` passes for a stopped replica: the database's audit (every
/// replica's chain, each checkpoint's signature and the other chains' heads it binds, no gap),
/// then the replica's own audit file against it.
async fn verify_audit_file(client: &tokio_postgres::Client, dir: &TempDir) {
    let entries: i64 = client
        .query_one("SELECT COUNT(*) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    let config = dir.0.join("gateway.toml");
    let out = omnirelay(&["audit", "verify", "--config", config.to_str().unwrap()]).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("the database's audit")
            && l.contains(&format!("ok, {entries} entries in"))),
        "{stdout}"
    );
    assert!(stdout.contains("(the database's head)"), "{stdout}");
}

/// `gateway.toml` switched to the PostgreSQL store at `url`.
fn use_postgres(text: &mut String, url: &str) {
    *text = text.replacen("[store]\n", "[store]\nbackend = \"postgres\"\n", 1);
    text.push_str(&format!(
        "\n[store.postgres]\nurl = \"{url}\"\npool_size = 4\n"
    ));
}

/// [`use_postgres`] with the rate limits lifted: every node of these drills comes from one
/// address with one token, and the limits are not what is tested.
fn use_postgres_unlimited(text: &mut String, url: &str) {
    use_postgres(text, url);
    let first = text.find("[[policies]]").unwrap();
    text.insert_str(
        first,
        "[limits]\nglobal = { per_second = 1000000, burst = 1000000 }\n\
         per_ip = { per_second = 1000000, burst = 1000000 }\n\
         per_token = { per_second = 1000000, burst = 1000000 }\n\
         per_cluster = { per_second = 1000000, burst = 1000000 }\n\n",
    );
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
    static SERVER: OnceLock<(String, Option<PrivateServer>)> = OnceLock::new();
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
                let private = PrivateServer::start("shared");
                (private.params(), Some(private))
            }
        })
        .0
}

/// A PostgreSQL server of this test process's own, from `initdb`/`pg_ctl` on a free port in a
/// temporary directory: the shared one when none answers, and the one a test stops and starts
/// again (a drill must never stop a server others use). Stopped and removed when dropped, and
/// in any case when this process exits (a watchdog shell waits on a pipe that closes then).
/// Fails saying how to get PostgreSQL when it is not installed.
struct PrivateServer {
    bin: String,
    dir: String,
    port: u16,
    root: bool,
    watchdog: Option<(std::process::Child, std::process::ChildStdin)>,
}

impl PrivateServer {
    fn start(tag: &str) -> Self {
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
                    "the PostgreSQL drills need initdb/pg_ctl, and none is installed: install \
                     PostgreSQL (`apt-get install -y postgresql`; `.ci/run` does)"
                )
            });
        let dir =
            std::env::temp_dir().join(format!("omnirelay-e2e-pg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
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
        let init = format!(
            "set -e; '{bin}/initdb' -D '{dir}/data' -U postgres --auth=trust --no-sync >/dev/null"
        );
        assert!(
            shell(root, &init).status().unwrap().success(),
            "initdb in {dir}"
        );
        let stop = format!(
            "read _x; '{bin}/pg_ctl' -D '{dir}/data' -m fast stop >/dev/null 2>&1; rm -rf '{dir}'"
        );
        let mut watchdog = shell(root, &stop).stdin(Stdio::piped()).spawn().unwrap();
        let pipe = watchdog.stdin.take().unwrap();
        let server = Self {
            bin,
            dir,
            port,
            root,
            watchdog: Some((watchdog, pipe)),
        };
        server.resume();
        server
    }

    /// `key=value` parameters without a database name.
    fn params(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres", self.port)
    }

    /// `pg_ctl stop -m fast`: every session is ended at once, as when a database host goes.
    fn stop_fast(&self) {
        let (bin, dir) = (&self.bin, &self.dir);
        let stop = format!("'{bin}/pg_ctl' -D '{dir}/data' -m fast -w stop >/dev/null");
        assert!(shell(self.root, &stop).status().unwrap().success());
    }

    /// `pg_ctl start` on the same port and data, returning once it accepts connections.
    fn resume(&self) {
        let (bin, dir, port) = (&self.bin, &self.dir, self.port);
        let start = format!(
            "'{bin}/pg_ctl' -D '{dir}/data' -l '{dir}/log' -w -o \"-p {port} -k '{dir}' \
             -c listen_addresses=127.0.0.1\" start >/dev/null"
        );
        assert!(
            shell(self.root, &start).status().unwrap().success(),
            "private PostgreSQL in {dir}"
        );
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        if let Some((mut watchdog, pipe)) = self.watchdog.take() {
            drop(pipe);
            let _ = watchdog.wait();
        }
    }
}

fn shell(as_postgres: bool, script: &str) -> Command {
    let mut c = Command::new(if as_postgres { "runuser" } else { "sh" });
    if as_postgres {
        c.args(["-u", "postgres", "--", "sh"]);
    }
    c.args(["-c", script]);
    c
}

/// A database of this test's own on a server (`key=value` parameters), dropped when the test
/// ends.
struct Database {
    name: String,
    server: String,
}

impl Database {
    /// On the shared test server; `tag` tells apart the databases of one process's tests.
    async fn create(tag: &str) -> Self {
        Self::create_on(server().clone(), tag).await
    }

    /// On `server`; `tag` tells apart the databases of one process's tests.
    async fn create_on(server: String, tag: &str) -> Self {
        let name = format!("omnirelay_e2e_{}{tag}", std::process::id());
        let admin = connect(&format!("{server} dbname=postgres")).await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Self { name, server }
    }

    /// The URL the gateways use (no password: trust authentication).
    fn url(&self) -> String {
        format!("{} dbname={}", self.server, self.name)
    }

    async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url()).await
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (name, server) = (self.name.clone(), self.server.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                connect(&format!("{server} dbname=postgres"))
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
