//! What only PostgreSQL has: several replicas on one database (token uses, nonces and
//! idempotency keys settled across them, each replica writing its own audit chain that the
//! others' checkpoints bind), migrations under the advisory lock, connections dropped under a replica, and a password
//! that never shows.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::harness::{Harness, Kind, TestStore};
use super::tests::{TempDir, checkpoints, issue_record, open_with_token, read_audit};
use super::*;
use crate::store::postgres::export_audit;

/// A second replica: the same database, its own audit file.
async fn replica(h: &Harness, dir: &TempDir) -> PostgresStore {
    let Backend::Postgres(pg) = h.config().backend else {
        unreachable!("a PostgreSQL harness")
    };
    PostgresStore::open(&pg, &dir.config().audit_file, checkpoints())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_twenty_joins_issue_exactly_the_three_uses() {
    let h = Harness::new(Kind::Postgres, "pg-race").await;
    let (a, token) = open_with_token(&h, 3).await;
    let other_dir = TempDir::new("pg-race-b");
    let b = replica(&h, &other_dir).await;
    let (a, b): (Arc<TestStore>, Arc<PostgresStore>) = (Arc::new(a), Arc::new(b));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let record = issue_record(token.id, &format!("req-{i}"), &format!("nonce-{i}"));
        let (a, b) = (a.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                a.issue(record).await.unwrap()
            } else {
                b.issue(record).await.unwrap()
            }
        }));
    }
    let mut issued = 0;
    for task in tasks {
        match task.await.unwrap() {
            IssueOutcome::Issued { .. } => issued += 1,
            IssueOutcome::Exhausted => {}
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(issued, 3);
    assert_eq!(b.token(token.id).await.unwrap().unwrap().uses, 3);
    assert_eq!(a.identities_of(token.id).await.unwrap().len(), 3);

    // The same nonce on A, then on B: the second is a replay, its use given back.
    let fresh = super::tests::token_record(2);
    a.register_token(fresh.clone(), super::tests::token_issued(&fresh))
        .await
        .unwrap();
    let first = issue_record(fresh.id, "n-a", "shared");
    assert!(matches!(
        a.issue(first).await.unwrap(),
        IssueOutcome::Issued { .. }
    ));
    let again = issue_record(fresh.id, "n-b", "shared");
    assert_eq!(b.issue(again).await.unwrap(), IssueOutcome::NonceReplayed);
    assert_eq!(b.token(fresh.id).await.unwrap().unwrap().uses, 1);

    // Each replica wrote its own chain, and its audit file holds that chain: together the
    // two files hold every issuance once, as the database does. (Which replica won the three
    // uses varies; a token registered through B gives its chain an entry either way, and A
    // signs after it, so A's checkpoint binds B's head.)
    let on_b = super::tests::token_record(1);
    b.register_token(on_b.clone(), super::tests::token_issued(&on_b))
        .await
        .unwrap();
    b.flush_audit().await.unwrap();
    a.flush_audit().await.unwrap();
    let chains = h
        .texts("SELECT CAST(COUNT(DISTINCT chain) AS TEXT) FROM audit")
        .await;
    assert_eq!(chains[0].as_deref(), Some("2"));
    let mut issued = 0;
    for file in [h.audit_file(), other_dir.config().audit_file] {
        let events = read_audit(&file);
        issued += events
            .iter()
            .filter(|e| e.kind() == "identity-issued")
            .count();
    }
    assert_eq!(issued, 4);
    let b = Arc::into_inner(b).unwrap();
    b.close().await;
    Arc::into_inner(a).unwrap().close().await;

    // The database's audit, every chain, verifies; each checkpoint binds the other chain.
    let Backend::Postgres(pg) = h.config().backend else {
        unreachable!("a PostgreSQL harness")
    };
    let mut out = Vec::new();
    let (entries, heads) = export_audit(&pg, checkpoints(), &mut out).await.unwrap();
    assert_eq!(heads.len(), 2);
    let key = checkpoints().key.public().clone();
    let summary = crate::audit::verify_chains(&out[..], &[key], &[]).unwrap();
    assert_eq!(summary.entries, entries);
    assert!(summary.absent_bound.is_empty());
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains(r#""bound":[{"chain":"#),
        "no checkpoint binds a chain"
    );
}

/// A checkpoint binds the other chains' heads: an entry of another replica's chain that a
/// checkpoint saw cannot be cut off or rewritten in the database without `verify` naming it,
/// nor can that whole chain be removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_binds_every_other_replicas_chain() {
    let h = Harness::new(Kind::Postgres, "pg-bind").await;
    let (a, token) = open_with_token(&h, 10).await;
    let other_dir = TempDir::new("pg-bind-b");
    let b = replica(&h, &other_dir).await;
    for i in 0..3 {
        let record = issue_record(token.id, &format!("b-{i}"), &format!("b-n{i}"));
        assert!(matches!(
            b.issue(record).await.unwrap(),
            IssueOutcome::Issued { .. }
        ));
    }
    b.flush_audit().await.unwrap();
    // A signs after B's entries are committed: its checkpoint binds B's head.
    a.flush_audit().await.unwrap();
    b.close().await;
    a.close().await;
    let Backend::Postgres(pg) = h.config().backend else {
        unreachable!("a PostgreSQL harness")
    };
    let key = checkpoints().key.public().clone();
    let verify = || async {
        let mut out = Vec::new();
        export_audit(&pg, checkpoints(), &mut out).await.unwrap();
        crate::audit::verify_chains(&out[..], std::slice::from_ref(&key), &[])
    };
    let summary = verify().await.unwrap();
    assert_eq!(summary.chains.len(), 2);
    // B's chain is the later one. Cut its tail (a whole chain still verifies on its own).
    let b_chain: u64 = h.texts("SELECT CAST(MAX(chain) AS TEXT) FROM audit").await[0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    h.execute(&format!(
        "DELETE FROM audit WHERE chain = {b_chain} \
         AND seq > (SELECT MAX(seq) - 3 FROM audit WHERE chain = {b_chain})"
    ))
    .await;
    let err = verify().await.unwrap_err();
    assert!(
        matches!(err.problem, crate::audit::Problem::Truncated { .. }),
        "{err}"
    );
    // The whole chain gone: named as missing, though every line left verifies.
    h.execute(&format!("DELETE FROM audit WHERE chain = {b_chain}"))
        .await;
    let summary = verify().await.unwrap();
    assert_eq!(
        summary.absent_bound.iter().copied().collect::<Vec<_>>(),
        vec![b_chain]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_racing_on_two_replicas_issues_once() {
    let h = Harness::new(Kind::Postgres, "pg-idem").await;
    let (a, token) = open_with_token(&h, 5).await;
    let other_dir = TempDir::new("pg-idem-b");
    let b = replica(&h, &other_dir).await;
    let mut first = issue_record(token.id, "r1", "n1");
    first.idempotency = Some(("key-1".into(), [3; 32]));
    // The retry comes with its own request and nonce, as after a lost response.
    let mut retry = issue_record(token.id, "r2", "n2");
    retry.idempotency = Some(("key-1".into(), [3; 32]));
    retry.response = first.response.clone();
    let (x, y) = tokio::join!(a.issue(first.clone()), b.issue(retry));
    let outcomes = [x.unwrap(), y.unwrap()];
    let issued = outcomes
        .iter()
        .filter(|o| matches!(o, IssueOutcome::Issued { .. }))
        .count();
    assert_eq!(issued, 1, "{outcomes:?}");
    assert!(
        outcomes.contains(&IssueOutcome::Replayed(first.response.clone())),
        "{outcomes:?}"
    );
    assert_eq!(a.token(token.id).await.unwrap().unwrap().uses, 1);
    assert_eq!(b.identities_of(token.id).await.unwrap().len(), 1);
    b.close().await;
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_once_and_a_newer_schema_is_refused() {
    let h = Harness::new(Kind::Postgres, "pg-migrate").await;
    let other_dir = TempDir::new("pg-migrate-b");
    let (a, b) = tokio::join!(h.open(checkpoints()), replica(&h, &other_dir));
    a.unwrap().close().await;
    b.close().await;
    let versions = h
        .texts("SELECT CAST(version AS TEXT) FROM schema_version ORDER BY version")
        .await;
    let expected: Vec<Option<String>> = (1..=postgres::SCHEMA_VERSION)
        .map(|v| Some(v.to_string()))
        .collect();
    assert_eq!(versions, expected);

    let newer = postgres::SCHEMA_VERSION + 1;
    h.execute(&format!(
        "INSERT INTO schema_version (version) VALUES ({newer})"
    ))
    .await;
    let err = h.open(checkpoints()).await.err().unwrap();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found, known }
            if found == newer && known == postgres::SCHEMA_VERSION),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_under_a_replica_are_retried_not_failed() {
    let h = Harness::new(Kind::Postgres, "pg-killed").await;
    let (store, token) = open_with_token(&h, 10).await;
    let database = match h.config().backend {
        Backend::Postgres(pg) => pg.url.rsplit("dbname=").next().unwrap().to_string(),
        Backend::Sqlite => unreachable!(),
    };
    for round in 0..3 {
        // Every connection of the store's pool, ended by the server (as by a failover).
        h.execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = '{database}' AND pid <> pg_backend_pid()"
        ))
        .await;
        let record = issue_record(token.id, &format!("r{round}"), &format!("n{round}"));
        assert!(matches!(
            store.issue(record).await.unwrap(),
            IssueOutcome::Issued { .. }
        ));
    }
    let serials: BTreeSet<String> = store
        .identities_of(token.id)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(serials.len(), 3);
    assert_eq!(store.token(token.id).await.unwrap().unwrap().uses, 3);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_never_shows_in_errors_or_debug_output() {
    const SECRET: &str = "correct-horse-battery-staple-71";
    let dir = TempDir::new("pg-secret");
    let file = dir.0.join("db.password");
    crate::secrets::write(&file, format!("{SECRET}\n").as_bytes()).unwrap();
    // Nothing listens there: the connection fails after the password was loaded.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = PostgresConfig::new(format!("postgres://gateway@127.0.0.1:{port}/omnirelay"));
    config.password = PasswordSource::File(file.clone());
    config.connect_timeout = Duration::from_millis(500);
    let mut store_config = dir.config();
    store_config.backend = Backend::Postgres(config.clone());
    let err = PostgresStore::open(&config, &dir.config().audit_file, checkpoints())
        .await
        .err()
        .unwrap();
    let mut shown = vec![format!("{err}"), format!("{err:?}"), format!("{config:?}")];
    shown.push(format!("{store_config:?}"));
    let mut source: Option<&dyn std::error::Error> = Some(&err);
    while let Some(e) = source {
        shown.push(format!("{e} / {e:?}"));
        source = e.source();
    }
    for text in &shown {
        assert!(!text.contains(SECRET), "the password shows in: {text}");
    }
    assert!(
        matches!(err, StoreError::Unavailable(_) | StoreError::Postgres(_)),
        "{err:?}"
    );

    // From the environment: a variable that is not set is a typed error naming it (setting
    // one would need `unsafe` in this edition).
    let var = format!("OMNIRELAY_TEST_DB_PASSWORD_{}", std::process::id());
    config.password = PasswordSource::Env(var.clone());
    let err = PostgresStore::open(&config, &dir.config().audit_file, checkpoints())
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, StoreError::PasswordEnv(v) if *v == var),
        "{err:?}"
    );
}

/// A CA (PEM) and a certificate for `localhost` it signed, with its key (PEM).
fn database_tls() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_is_checked_against_the_configured_ca() {
    let (ca, cert, key) = database_tls();
    let server = super::harness::start_private_server("(a TLS test server)", Some((&cert, &key)));
    let dir = TempDir::new("pg-tls");
    let ca_file = dir.0.join("db-ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let url = |mode: &str| {
        format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode={mode}",
            server.port
        )
    };

    // With the CA: TLS, and the store works over it.
    let mut config = PostgresConfig::new(url("require"));
    config.ca_file = Some(ca_file.clone());
    let store = PostgresStore::open(&config, &dir.config().audit_file, checkpoints())
        .await
        .unwrap();
    let (token, event) = {
        let t = super::tests::token_record(1);
        let e = super::tests::token_issued(&t);
        (t, e)
    };
    store.register_token(token.clone(), event).await.unwrap();
    assert_eq!(store.token(token.id).await.unwrap(), Some(token));
    store.close().await;

    // The server as seen by the database: this very connection is encrypted.
    let (client, connection) = tokio_postgres::connect(
        &url("require"),
        tokio_postgres_rustls::MakeRustlsConnect::new(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates({
                use rustls_pki_types::pem::PemObject;
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(rustls_pki_types::CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
                    .unwrap();
                roots
            })
            .with_no_client_auth(),
        ),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);

    // A certificate from another CA is refused: no connection, no store.
    let (other_ca, _, _) = database_tls();
    std::fs::write(&ca_file, other_ca).unwrap();
    let err = PostgresStore::open(&config, &dir.config().audit_file, checkpoints())
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, StoreError::Unavailable(_) | StoreError::Postgres(_)),
        "{err:?}"
    );
    // A file with no certificate in it is its own error.
    std::fs::write(&ca_file, "not a certificate").unwrap();
    let err = PostgresStore::open(&config, &dir.config().audit_file, checkpoints())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::CaFile { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_failing_inside_a_group_commit_leaves_the_others_of_its_group_committed() {
    let h = Harness::new(Kind::Postgres, "pg-group").await;
    let (store, token) = open_with_token(&h, 100).await;
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for i in 0..24 {
        // PostgreSQL refuses a NUL in text: this one change's statement fails in the
        // database, inside whichever group it lands in.
        let nonce = if i == 7 {
            "bad\0nonce".to_string()
        } else {
            format!("nonce-{i}")
        };
        let mut record = issue_record(token.id, &format!("req-{i}"), &nonce);
        // Two with one idempotency key (the second a retry of the first, after a lost
        // response), in one group or in two at once: one issues, the other replays it.
        if i == 3 || i == 4 {
            record.idempotency = Some(("key-1".into(), [3; 32]));
            record.response = "the first answer".into();
        }
        let store = store.clone();
        tasks.push(tokio::spawn(async move { store.issue(record).await }));
    }
    let mut issued = 0;
    let mut replayed = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(IssueOutcome::Issued { .. }) if i != 7 => issued += 1,
            Ok(IssueOutcome::Replayed(answer)) if i == 3 || i == 4 => {
                assert_eq!(answer, "the first answer");
                replayed += 1;
            }
            Err(StoreError::Postgres(e)) if i == 7 => assert!(e.as_db_error().is_some(), "{e}"),
            other => panic!("join {i}: {other:?}"),
        }
    }
    assert_eq!((issued, replayed), (22, 1));
    assert_eq!(store.token(token.id).await.unwrap().unwrap().uses, 22);
    assert_eq!(store.identities_of(token.id).await.unwrap().len(), 22);
    store.flush_audit().await.unwrap();
    let events = read_audit(&h.audit_file());
    let audited: BTreeSet<String> = events
        .iter()
        .filter_map(|e| match e {
            AuditEvent::IdentityIssued { request_id, .. } => Some(request_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(audited.len(), 22);
    assert!(!audited.contains("req-7"));
    Arc::into_inner(store).unwrap().close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_past_the_timeout_is_cancelled_and_reported_not_retried_forever() {
    let h = Harness::new(Kind::Postgres, "pg-timeout").await;
    let Backend::Postgres(mut pg) = h.config().backend else {
        unreachable!("a PostgreSQL harness")
    };
    pg.statement_timeout = Duration::from_millis(300);
    let dir = TempDir::new("pg-timeout-store");
    let store = PostgresStore::open(&pg, &dir.config().audit_file, checkpoints())
        .await
        .unwrap();
    let token = super::tests::token_record(2);
    store
        .register_token(token.clone(), super::tests::token_issued(&token))
        .await
        .unwrap();
    // Another session holds the token's row: the join's use waits on it past the timeout.
    let (client, connection) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM tokens WHERE id = '{}' FOR UPDATE",
            token.id
        ))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = store
        .issue(issue_record(token.id, "r1", "n1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Postgres(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    client.batch_execute("ROLLBACK").await.unwrap();
    // Nothing of the cancelled join stayed; the next one goes through.
    assert!(!store.nonce_used("n1").await.unwrap());
    assert_eq!(
        store
            .issue(issue_record(token.id, "r2", "n2"))
            .await
            .unwrap(),
        IssueOutcome::Issued { uses_left: 1 }
    );
    store.close().await;
}

/// Waits (at most `within`) until `head` reaches `seq`.
async fn reaches(head: &mut tokio::sync::watch::Receiver<u64>, seq: u64, within: Duration) {
    let reached = tokio::time::timeout(within, async {
        while *head.borrow_and_update() < seq {
            head.changed().await.unwrap();
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "the head stayed at {} instead of reaching {seq} within {within:?}",
        *head.borrow()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_replica_moves_the_others_feed_within_a_second() {
    let h = Harness::new(Kind::Postgres, "pg-notify").await;
    let (a, token) = open_with_token(&h, 5).await;
    let other_dir = TempDir::new("pg-notify-b");
    let b = replica(&h, &other_dir).await;
    let first = issue_record(token.id, "r1", "n1");
    let serial = first.identity.serial.to_string();
    a.issue(first).await.unwrap();
    let mut b_head = b.revocation_head();
    let revoke = |target| RevokeOrder {
        request_id: "revoke".into(),
        target,
        reason: "test".into(),
        revoked_by: "bob@ops".into(),
        quarantine: Duration::ZERO,
        now: super::tests::NOW,
    };
    a.revoke(revoke(RevokeTarget::Serial(serial.clone())))
        .await
        .unwrap();
    let head = *a.revocation_head().borrow();
    reaches(&mut b_head, head, Duration::from_secs(1)).await;
    let fed = b.revocations_since(0, 10).await.unwrap();
    assert_eq!(fed.len(), 1);
    assert_eq!(fed[0].serial, serial);

    // B's listening connection ended by the server: B listens again and reads what it missed.
    let database = match h.config().backend {
        Backend::Postgres(pg) => pg.url.rsplit("dbname=").next().unwrap().to_string(),
        Backend::Sqlite => unreachable!(),
    };
    h.execute(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = '{database}' AND application_name = 'omnirelay-gateway-listen'"
    ))
    .await;
    let second = issue_record(token.id, "r2", "n2");
    let serial = second.identity.serial.to_string();
    a.issue(second).await.unwrap();
    a.revoke(revoke(RevokeTarget::Serial(serial)))
        .await
        .unwrap();
    let head = *a.revocation_head().borrow();
    reaches(&mut b_head, head, Duration::from_secs(10)).await;
    b.close().await;
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_recorded_through_one_replica_reaches_the_others_by_notification_and_by_resync() {
    let h = Harness::new(Kind::Postgres, "pg-pin").await;
    let a = h.open(checkpoints()).await.unwrap();
    let other_dir = TempDir::new("pg-pin-b");
    let b = replica(&h, &other_dir).await;
    let mut pins = b.shared_policy_pin().unwrap();
    assert_eq!(pins.borrow_and_update().generation, 0);

    // Through the notification: well before the 5 s resync could have found it.
    a.share_policy_pin(Some("1.0.0".into()), Some("c0ffee".into()), "ops".into())
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(3), pins.wait_for(|p| p.generation == 1))
        .await
        .expect("B's pin watch never moved on A's notification")
        .unwrap()
        .clone();
    assert_eq!(
        (
            seen.target.as_deref(),
            seen.commit.as_deref(),
            seen.by.as_str()
        ),
        (Some("1.0.0"), Some("c0ffee"), "ops")
    );

    // A change whose notification was lost (written here without one, as while a listener's
    // connection was down): the periodic resync finds it.
    h.execute(
        "UPDATE policy_pin SET generation = 2, target = NULL, commit_id = NULL, set_by = 'lost'",
    )
    .await;
    let seen = tokio::time::timeout(
        Duration::from_secs(15),
        pins.wait_for(|p| p.generation == 2),
    )
    .await
    .expect("B's resync never read the pin")
    .unwrap()
    .clone();
    assert_eq!((seen.target, seen.by.as_str()), (None, "lost"));

    // The listener's connection killed under it: it listens again, and the next pin arrives.
    h.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = 'omnirelay-gateway-listen' AND datname = current_database()",
    )
    .await;
    a.share_policy_pin(Some("1.1.0".into()), Some("beef".into()), "ops".into())
        .await
        .unwrap();
    let seen = tokio::time::timeout(
        Duration::from_secs(15),
        pins.wait_for(|p| p.generation == 3),
    )
    .await
    .expect("B never heard of the pin after its listener was cut")
    .unwrap()
    .clone();
    assert_eq!(seen.target.as_deref(), Some("1.1.0"));
    b.close().await;
    a.close().await;
}
