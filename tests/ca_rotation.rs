//! CA rotation against the real binary over TLS, driven with `omnirelay ca ...` as an operator
//! drives it: prepare publishes the next CA (sequence bumped), activate makes it the signer and
//! re-issues the gateway's serving certificate under it (served without a restart), leaves of
//! either CA verify against the served bundle during the overlap (rustls-webpki and the
//! `spiffe` crate as oracles), and retire is refused while a leaf of the old CA is live and
//! succeeds once none is (or when forced, audited as forced).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use gateway::agent::GatewayClient;
use gateway::api::wire::{IssueTokenRequest, JoinResponse};
use gateway::identity::{CaState, CaStatus};
use omnirelay_e2e::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use sha2::{Digest, Sha256};

/// A gateway whose `short` cluster gets 5-second SVIDs and whose `long` cluster gets
/// 10-minute ones (the fixture policy grants what its settings say).
fn rotating_gateway(name: &str) -> Gateway {
    let module = policy_dir().join("fixture_grant.wasm");
    let binding = |cluster: &str, ttl: u32| {
        format!(
            "[[policies]]\nname = \"{cluster}\"\nmodule = \"{}\"\nclusters = [\"{cluster}\"]\n\
             settings = {{ path = \"/node/{{node}}\", ttl_seconds = {ttl} }}\n\n",
            module.display()
        )
    };
    Gateway::start_with(name, |toml| {
        let at = toml.find("[[policies]]").unwrap();
        toml.insert_str(at, &(binding("short", 5) + &binding("long", 600)));
        toml.push_str("\n[policy]\nmin_ttl = \"1s\"\n");
    })
}

/// `omnirelay ca <args> --config <config>`: exit code, stdout, stderr.
fn ca(config: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["ca"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", config]);
    let out = omnirelay(&all).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A rotation step that must succeed; the status it prints.
fn ca_ok(config: &str, step: &str) -> CaStatus {
    let (code, stdout, stderr) = ca(config, &[step, "--json"]);
    assert_eq!(code, 0, "ca {step}: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// A rotation step that must be refused with `reason`; its message.
fn ca_refused(config: &str, args: &[&str], reason: &str) -> String {
    let (code, stdout, stderr) = ca(config, args);
    assert_ne!(code, 0, "ca {args:?} was not refused: {stdout}");
    assert!(
        stderr.contains(&format!("409 at stage ca-rotation, {reason}")),
        "{stderr}"
    );
    stderr
}

fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn states(status: &CaStatus) -> Vec<(String, CaState, bool)> {
    status
        .cas
        .iter()
        .map(|c| (c.fingerprint.clone(), c.state, c.serving))
        .collect()
}

/// The served bundles: the PEM bundle's certificates (DER) and the SPIFFE bundle's sequence,
/// after checking that the SPIFFE bundle's `x5c` are the same CAs (parsed by the `spiffe`
/// crate).
async fn served(node: &GatewayClient) -> (Vec<Vec<u8>>, u64, Vec<u8>) {
    let pem = node.get("/v1/bundle").await.unwrap();
    assert_eq!(pem.status, 200);
    let jwks = node.get("/v1/bundle/spiffe").await.unwrap();
    assert_eq!(jwks.status, 200);
    let jwks: serde_json::Value = serde_json::from_slice(&jwks.body).unwrap();
    let ders: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(&pem.body)
        .map(|c| c.unwrap().to_vec())
        .collect();
    use base64::Engine as _;
    let x5c: Vec<Vec<u8>> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k["x5c"][0].as_str().unwrap())
                .unwrap()
        })
        .collect();
    let refs: Vec<&[u8]> = x5c.iter().map(Vec::as_slice).collect();
    let bundle = spiffe::X509Bundle::from_x509_authorities(
        spiffe::TrustDomain::new(TRUST_DOMAIN).unwrap(),
        &refs,
    )
    .unwrap();
    let authorities: Vec<Vec<u8>> = bundle
        .authorities()
        .iter()
        .map(|a| a.as_bytes().to_vec())
        .collect();
    assert_eq!(
        authorities, ders,
        "the SPIFFE bundle and the PEM bundle differ"
    );
    (
        ders,
        jwks["spiffe_sequence"].as_u64().unwrap(),
        pem.body.to_vec(),
    )
}

/// rustls-webpki verification of the chain's leaf against the CAs in `bundle_pem` at `at`
/// (Unix seconds), for both TLS roles.
fn verify_at(chain_pem: &str, bundle_pem: &[u8], at: u64) -> Result<(), webpki::Error> {
    let leaf = CertificateDer::from_pem_slice(chain_pem.as_bytes()).unwrap();
    let cas: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(bundle_pem)
        .map(Result::unwrap)
        .collect();
    let anchors: Vec<_> = cas
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).unwrap())
        .collect();
    let cert = webpki::EndEntityCert::try_from(&leaf).unwrap();
    let at = UnixTime::since_unix_epoch(Duration::from_secs(at));
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            at,
            usage,
            None,
            None,
        )?;
    }
    Ok(())
}

/// The PEM of one CA certificate.
fn pem_of(der: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem.into_bytes()
}

/// A node joins with a fresh key and a token of `cluster`; checks the SVID with the `spiffe`
/// crate's parser against the key it was issued for.
async fn join(gw: &Gateway, node: &GatewayClient, cluster: &str, name: &str) -> JoinResponse {
    join_with(gw, node, cluster, name, false).await
}

async fn join_with(
    gw: &Gateway,
    node: &GatewayClient,
    cluster: &str,
    name: &str,
    supersede: bool,
) -> JoinResponse {
    let token = gw
        .issue_token_with(IssueTokenRequest {
            cluster: cluster.into(),
            role: "dispatcher".into(),
            ttl_seconds: 900,
            max_uses: 1,
            issued_by: Some("e2e".into()),
            node: None,
            supersede,
        })
        .await;
    let key = NodeKey::new(name);
    let joined = join_as(node, &token.token, name, &key).await;
    let leaf = CertificateDer::from_pem_slice(joined.certificate_chain.as_bytes()).unwrap();
    let svid = spiffe::X509Svid::parse_from_der(&leaf, key.key.serialized_der()).unwrap();
    assert_eq!(svid.spiffe_id().to_string(), joined.spiffe_id);
    joined
}

/// The issuer the store recorded for `serial`.
fn recorded_issuer(gw: &Gateway, serial: &str) -> Option<String> {
    let db = rusqlite::Connection::open_with_flags(
        gw.path("state/gateway.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    db.query_row(
        "SELECT issuer FROM identities WHERE serial = ?1",
        [serial],
        |r| r.get(0),
    )
    .unwrap()
}

/// Waits (polling the inventory, with a deadline) until the identity `serial` has expired.
async fn wait_until_expired(gw: &Gateway, serial: &str, not_after: u64) {
    let deadline = Instant::now() + Duration::from_secs(not_after.saturating_sub(unix_now()) + 30);
    let admin = gw.admin();
    loop {
        let reply = admin
            .get(&format!(
                "/admin/v1/identities?serial={serial}&state=expired"
            ))
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
        let listed: Vec<serde_json::Value> = serde_json::from_slice(&reply.body).unwrap();
        if listed.len() == 1 {
            return;
        }
        assert!(Instant::now() < deadline, "{serial} never expired");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rotation_drill_prepare_activate_join_again_and_retire_once_the_old_leaves_expired() {
    let gw = rotating_gateway("ca-drill");
    let config = gw.config_naming_the_admin_port();
    let node_url = format!("https://{}", gw.node_addr);
    let ca1_pem = std::fs::read(gw.path("ca/ca.pem")).unwrap();
    let ca1 = fingerprint(&CertificateDer::from_pem_slice(&ca1_pem).unwrap());

    // Under CA1: a 5-second leaf and a 10-minute one.
    let node = gw.node();
    let (ders, sequence, _) = served(&node).await;
    assert_eq!((ders.len(), sequence), (1, 1));
    let short = join(&gw, &node, "short", "short-1").await;
    let long = join(&gw, &node, "long", "long-1").await;
    assert_eq!(
        short.not_after - short.not_before,
        5 + 30,
        "5 s, backdated 30 s"
    );

    // A CA1 leaf whose node will renew after the rotation (the test keeps its key).
    let renewer_key = NodeKey::new("renewer-1");
    let renewer_token = gw.issue_token("long", "dispatcher", 1).await;
    let renewer = join_as(&node, &renewer_token.token, "renewer-1", &renewer_key).await;

    // prepare: CA2 is published (sequence bumped), CA1 still signs and serves.
    let status = ca_ok(&config, "prepare");
    assert_eq!(status.sequence, 2);
    let ca2 = status.cas[1].fingerprint.clone();
    assert_eq!(
        states(&status),
        [
            (ca1.clone(), CaState::Active, true),
            (ca2.clone(), CaState::Prepared, false)
        ]
    );
    let (ders, sequence, bundle) = served(&node).await;
    assert_eq!(sequence, 2);
    assert_eq!(
        ders.iter()
            .map(Vec::as_slice)
            .map(fingerprint)
            .collect::<Vec<_>>(),
        [ca1.clone(), ca2.clone()]
    );
    let ca2_pem = pem_of(&ders[1]);
    let key = gw.path(&format!("ca/ca-{}.key", &ca2[..16]));
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A node that refreshed its bundle keeps trusting the leaves it has.
    verify_at(&long.certificate_chain, &bundle, unix_now()).unwrap();

    // activate: CA2 signs; the serving certificate is re-issued under CA2 and served without
    // a restart, so a client trusting CA1 alone can no longer connect.
    let status = ca_ok(&config, "activate");
    assert_eq!(status.sequence, 3);
    assert_eq!(
        states(&status),
        [
            (ca1.clone(), CaState::Previous, false),
            (ca2.clone(), CaState::Active, true)
        ]
    );
    let only_ca2 = GatewayClient::new(&node_url, &ca2_pem).unwrap();
    assert_eq!(only_ca2.get("/healthz").await.unwrap().status, 200);
    let only_ca1 = GatewayClient::new(&node_url, &ca1_pem).unwrap();
    assert!(only_ca1.get("/healthz").await.is_err());
    let serving = std::fs::read_to_string(gw.path("tls/gateway.pem")).unwrap();
    verify_at(&serving, &ca2_pem, unix_now()).unwrap();
    assert_eq!(
        std::fs::metadata(gw.path("tls/gateway.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // Join again: the new leaf is CA2's; leaves of both CAs verify against the served bundle.
    let node = GatewayClient::new(&node_url, &bundle).unwrap();
    let fresh = join(&gw, &node, "long", "fresh-2").await;
    let (_, sequence, bundle) = served(&node).await;
    assert_eq!(sequence, 3);
    assert_eq!(fresh.bundle.as_bytes(), bundle.as_slice());
    verify_at(&fresh.certificate_chain, &bundle, unix_now()).unwrap();
    verify_at(&long.certificate_chain, &bundle, unix_now()).unwrap();
    verify_at(&short.certificate_chain, &bundle, short.not_after - 1).unwrap();

    // Renewing the CA1 leaf over mTLS yields a CA2 leaf (the node presents its CA1 SVID,
    // which the bundle of the overlap still trusts).
    let renewer_pem = renewer_key.key.serialize_pem();
    let next_key = NodeKey::new("renewer-1");
    let renewed_leaf = raw::renewed(
        &raw::renew(
            &gw,
            Some((&renewer.certificate_chain, &renewer_pem)),
            &next_key.csr,
            None,
        )
        .await,
    );
    assert_eq!(renewed_leaf.spiffe_id, renewer.spiffe_id);
    verify_at(&renewed_leaf.certificate_chain, &ca2_pem, unix_now()).unwrap();
    assert!(verify_at(&renewed_leaf.certificate_chain, &ca1_pem, unix_now()).is_err());
    assert_eq!(
        recorded_issuer(&gw, &renewed_leaf.serial).as_deref(),
        Some(ca2.as_str())
    );

    // Revoking the CA1 leaf (and so its CA2 renewal): each CA of the bundle signs a CRL
    // listing it, and openssl verifies each against its own CA.
    let reply = gw
        .admin()
        .post(
            "/admin/v1/revoke",
            serde_json::to_vec(&serde_json::json!({
                "serial": renewer.serial,
                "reason": "rotation drill",
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
    for (ca, ca_pem) in [(&ca1, &ca1_pem), (&ca2, &ca2_pem)] {
        let crl = node.get(&format!("/v1/crl?ca={ca}")).await.unwrap();
        assert_eq!(crl.status, 200, "{}", String::from_utf8_lossy(&crl.body));
        let text = gw.openssl_crl(&crl.body, ca_pem);
        for serial in [&renewer.serial, &renewed_leaf.serial] {
            assert!(
                text.contains(serial.as_str()),
                "{serial} not in the CRL of {ca}"
            );
        }
    }
    verify_at(&fresh.certificate_chain, &ca2_pem, unix_now()).unwrap();
    assert_eq!(
        verify_at(&fresh.certificate_chain, &ca1_pem, unix_now()),
        Err(webpki::Error::UnknownIssuer)
    );
    assert_eq!(
        verify_at(&long.certificate_chain, &ca2_pem, unix_now()),
        Err(webpki::Error::UnknownIssuer)
    );
    assert_eq!(recorded_issuer(&gw, &short.serial), Some(ca1.clone()));
    assert_eq!(recorded_issuer(&gw, &fresh.serial), Some(ca2.clone()));

    // retire is refused while the 10-minute CA1 leaf is live.
    let refused = ca_refused(&config, &["retire"], "ca-leaves-alive");
    assert!(refused.contains(&ca1), "{refused}");
    assert!(refused.contains(&long.not_after.to_string()), "{refused}");

    // Replacing that node's identity under CA2 revokes its CA1 leaf (a superseding join).
    let replaced = join_with(&gw, &node, "long", "long-1", true).await;
    assert_eq!(replaced.spiffe_id, long.spiffe_id);
    assert_eq!(recorded_issuer(&gw, &replaced.serial), Some(ca2.clone()));

    // Now only the 5-second CA1 leaf holds retire back, until it expires.
    let asked_at = unix_now();
    let (code, stdout, stderr) = ca(&config, &["retire", "--json"]);
    let status: CaStatus = if code == 0 {
        assert!(
            unix_now() >= short.not_after,
            "retired while {} was live",
            short.serial
        );
        serde_json::from_str(&stdout).unwrap()
    } else {
        assert!(
            stderr.contains("ca-leaves-alive") && stderr.contains(&short.not_after.to_string()),
            "{stderr}"
        );
        assert!(asked_at < short.not_after, "{stderr}");
        wait_until_expired(&gw, &short.serial, short.not_after).await;
        ca_ok(&config, "retire")
    };
    assert_eq!(status.sequence, 4);
    assert_eq!(
        states(&status),
        [
            (ca1.clone(), CaState::Retired, false),
            (ca2.clone(), CaState::Active, true)
        ]
    );

    // CA1 is out of the bundle: its leaves no longer verify, CA2's do.
    let (ders, sequence, bundle) = served(&node).await;
    assert_eq!(sequence, 4);
    assert_eq!(
        ders.iter()
            .map(Vec::as_slice)
            .map(fingerprint)
            .collect::<Vec<_>>(),
        std::slice::from_ref(&ca2)
    );
    verify_at(&fresh.certificate_chain, &bundle, unix_now()).unwrap();
    verify_at(&replaced.certificate_chain, &bundle, unix_now()).unwrap();
    assert_eq!(
        verify_at(&short.certificate_chain, &bundle, short.not_after - 1),
        Err(webpki::Error::UnknownIssuer)
    );

    // Each step is audited with the fingerprints and the operator.
    let prepared = gw.wait_for_audit("ca-prepared", |e| e["fingerprint"] == ca2);
    assert_eq!(prepared["sequence"], 2);
    assert!(
        prepared["prepared_by"]
            .as_str()
            .unwrap()
            .starts_with("cli:")
    );
    let activated = gw.wait_for_audit("ca-activated", |e| e["fingerprint"] == ca2);
    assert_eq!(activated["previous"], ca1);
    assert_eq!(activated["serving_reissued"], true);
    let retired = gw.wait_for_audit("ca-retired", |e| e["fingerprint"] == ca1);
    assert_eq!(retired["sequence"], 4);
    assert!(retired.get("forced").is_none(), "{retired}");

    // Metrics: the sequence, and CA2's expiry as the active CA's.
    assert_eq!(
        gw.metric("bootstrap_trust_bundle_sequence").await,
        Some(4.0)
    );
    let ca2_not_after = status.cas[1].not_after as f64;
    assert_eq!(
        gw.metric(&format!(
            "bootstrap_ca_not_after_seconds{{ca=\"{ca2}\",state=\"active\"}}"
        ))
        .await,
        Some(ca2_not_after)
    );
    assert_eq!(
        gw.metric(&format!(
            "bootstrap_ca_not_after_seconds{{ca=\"{ca1}\",state=\"previous\"}}"
        ))
        .await,
        None
    );
}

/// Runs `serve` on `dir` and expects it to refuse to start: returns its stderr.
fn serve_refused(dir: &TempDir) -> String {
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
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => {
            let out = out.unwrap();
            assert!(!out.status.success());
            String::from_utf8_lossy(&out.stderr).into_owned()
        }
        Err(_) => {
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            panic!("the gateway started instead of refusing")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_survives_a_restart_and_an_inconsistent_state_stops_the_start() {
    let gw = Gateway::start("ca-restart");
    let config = gw.config_naming_the_admin_port();
    ca_ok(&config, "prepare");
    let status = ca_ok(&config, "activate");
    let (before, sequence, _) = served(&gw.node()).await;
    assert_eq!(sequence, 3);

    let (dir, _) = gw.stop();
    let gw = Gateway::spawn(dir);
    let node = gw.node();
    let (after, sequence, bundle) = served(&node).await;
    assert_eq!((after, sequence), (before, 3));
    let (code, stdout, stderr) = ca(&config, &["status", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(serde_json::from_str::<CaStatus>(&stdout).unwrap(), status);
    let token = gw.issue_token("demo", "dispatcher", 1).await;
    let joined = join_as(&node, &token.token, "after-restart", &NodeKey::new("x")).await;
    let ca2_pem = pem_of(
        &CertificateDer::pem_slice_iter(&bundle)
            .nth(1)
            .unwrap()
            .unwrap(),
    );
    verify_at(&joined.certificate_chain, &ca2_pem, unix_now()).unwrap();

    // Two active CAs: the state no longer says which one signs.
    let (dir, _) = gw.stop();
    let state = dir.0.join("ca/rotation.json");
    let text = std::fs::read_to_string(&state).unwrap();
    std::fs::write(&state, text.replace("\"previous\"", "\"active\"")).unwrap();
    let stderr = serve_refused(&dir);
    assert!(
        stderr.contains("inconsistent CA rotation state") && stderr.contains("2 active CAs"),
        "{stderr}"
    );
    assert!(stderr.contains(&state.display().to_string()), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_out_of_order_are_refused_and_a_forced_retire_is_audited_as_forced() {
    let gw = Gateway::start("ca-force");
    let config = gw.config_naming_the_admin_port();
    ca_refused(&config, &["activate"], "ca-nothing-prepared");
    ca_refused(&config, &["retire"], "ca-nothing-to-retire");
    let token = gw.issue_token("demo", "dispatcher", 1).await;
    let node = gw.node();
    let old = join_as(&node, &token.token, "old-1", &NodeKey::new("old-1")).await;
    let ca1 = ca_ok(&config, "prepare").cas[0].fingerprint.clone();
    ca_refused(&config, &["prepare"], "ca-already-prepared");
    ca_ok(&config, "activate");
    ca_refused(&config, &["prepare"], "ca-previous-not-retired");
    ca_refused(&config, &["retire"], "ca-leaves-alive");

    // A serving certificate that chains only to CA1 (an operator put it back) holds retire
    // back even when forced: nodes with the new bundle could not reach the gateway.
    let (dir, _) = gw.stop();
    let saved = (
        std::fs::read(dir.0.join("tls/gateway.pem")).unwrap(),
        std::fs::read(dir.0.join("tls/gateway.key")).unwrap(),
    );
    let ca1_signer = gateway::identity::Ca::load(
        &std::fs::read_to_string(dir.0.join("ca/ca.pem")).unwrap(),
        &std::fs::read_to_string(dir.0.join("ca/ca.key")).unwrap(),
    )
    .unwrap();
    let id =
        gateway::identity::SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/omnirelay/gateway"))
            .unwrap();
    let (cert, key) = ca1_signer
        .issue_server_cert(
            &id,
            &["localhost".into()],
            &["127.0.0.1".parse().unwrap()],
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .unwrap();
    std::fs::write(dir.0.join("tls/gateway.pem"), cert).unwrap();
    gateway::secrets::write(&dir.0.join("tls/gateway.key"), key.as_bytes()).unwrap();
    let gw = Gateway::spawn(dir);
    let status = ca_ok(&config, "status");
    assert_eq!(
        states(&status)
            .into_iter()
            .map(|(_, state, serving)| (state, serving))
            .collect::<Vec<_>>(),
        [(CaState::Previous, true), (CaState::Active, false)]
    );
    ca_refused(&config, &["retire", "--force"], "ca-serving-certificate");

    let (dir, _) = gw.stop();
    std::fs::write(dir.0.join("tls/gateway.pem"), &saved.0).unwrap();
    gateway::secrets::write(&dir.0.join("tls/gateway.key"), &saved.1).unwrap();
    let gw = Gateway::spawn(dir);
    let (code, stdout, stderr) = ca(&config, &["retire", "--force", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let status: CaStatus = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status.cas[0].state, CaState::Retired);
    let retired = gw.wait_for_audit("ca-retired", |e| e["fingerprint"] == ca1);
    assert_eq!(retired["forced"], true);
    assert_eq!(retired["live_until"], old.not_after);
    let (_, sequence, bundle) = served(&gw.node()).await;
    assert_eq!(sequence, 4);
    assert_eq!(
        verify_at(&old.certificate_chain, &bundle, unix_now()),
        Err(webpki::Error::UnknownIssuer)
    );
}
