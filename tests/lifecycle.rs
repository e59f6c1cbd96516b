//! After the first certificate, against the real binary over TLS: renewal over mTLS with the
//! current SVID, the refusals of certificates that are not one (each with its own reason), and
//! the revocation drill — a token revoked with its whole lineage, its SPIFFE ID quarantined,
//! both serials in a CRL that openssl verifies, the feed delivering the event to a client
//! already waiting, and the quarantine lifted.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is a failed test"
)]

use std::time::{Duration, Instant, SystemTime};

use gateway::api::wire::RevocationPage;
use omnirelay_e2e::raw::{raw_problem, renew, renewed};
use omnirelay_e2e::{
    Gateway, NodeKey, TRUST_DOMAIN, join_as, join_request, omnirelay, post_join, problem,
    verify_with_webpki,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_renews_over_mtls_and_the_audit_links_both_serials_to_its_token() {
    let gw = Gateway::start("renew");
    let token = gw.issue_token("edge-eu", "relay", 1).await;
    let key = NodeKey::new("relay-1");
    let joined = join_as(&gw.node(), &token.token, "relay-1", &key).await;
    let current = (joined.certificate_chain.as_str(), key.key.serialize_pem());

    let next_key = NodeKey::new("relay-1");
    let first = renew(
        &gw,
        Some((current.0, &current.1)),
        &next_key.csr,
        Some("renew-1"),
    )
    .await;
    let first = renewed(&first);
    assert_eq!(first.spiffe_id, joined.spiffe_id);
    assert_ne!(first.serial, joined.serial);
    assert!(first.not_after >= joined.not_after);
    verify_with_webpki(&first.certificate_chain, &gw.bundle());
    let leaf = CertificateDer::from_pem_slice(first.certificate_chain.as_bytes()).unwrap();
    let svid = spiffe::X509Svid::parse_from_der(&leaf, next_key.key.serialized_der()).unwrap();
    assert_eq!(svid.spiffe_id().to_string(), joined.spiffe_id);

    // A retry after a lost response gets the same certificate; a renewal of the old
    // certificate with another key (an agent that crashed before writing its new files) gets
    // another one, linked to the same predecessor.
    let retry = renew(
        &gw,
        Some((current.0, &current.1)),
        &next_key.csr,
        Some("renew-1"),
    )
    .await;
    assert_eq!(renewed(&retry).serial, first.serial);
    let fork = renew(
        &gw,
        Some((current.0, &current.1)),
        &NodeKey::new("relay-1").csr,
        Some("renew-2"),
    )
    .await;
    let fork = renewed(&fork);
    assert_ne!(fork.serial, first.serial);
    let branch = gw.wait_for_audit("identity-renewed", |e| e["serial"] == fork.serial);
    assert_eq!(branch["predecessor"], joined.serial);

    // Keeping the key needs the policy's permission, which cluster-role does not give.
    let next_pem = next_key.key.serialize_pem();
    let same_key = renew(
        &gw,
        Some((&first.certificate_chain, &next_pem)),
        &next_key.csr,
        None,
    )
    .await;
    assert_eq!(same_key.status, 403);
    assert_eq!(raw_problem(&same_key).reason, "key-reuse");

    // The renewed certificate renews in turn (the one-use token is not consumed again).
    let third_key = NodeKey::new("relay-1");
    let second = renewed(
        &renew(
            &gw,
            Some((&first.certificate_chain, &next_pem)),
            &third_key.csr,
            None,
        )
        .await,
    );
    assert_eq!(second.spiffe_id, joined.spiffe_id);

    let links = gw.wait_for_audit("identity-renewed", |e| e["serial"] == second.serial);
    assert_eq!(links["predecessor"], first.serial);
    assert_eq!(links["token_id"], token.id);
    assert_eq!(links["renewals"], 2);
    let first_link = gw.wait_for_audit("identity-renewed", |e| e["serial"] == first.serial);
    assert_eq!(first_link["predecessor"], joined.serial);
    assert_eq!(first_link["token_id"], token.id);
    assert_eq!(
        gw.token(&token.id).await.unwrap().uses,
        1,
        "renewals consume no token use"
    );
    // The inventory shows the lineage: the join's certificate and three renewals.
    let listed = gw
        .admin()
        .get(&format!("/admin/v1/identities?token={}", token.id))
        .await
        .unwrap();
    let listed: Vec<gateway::store::IssuedIdentity> = serde_json::from_slice(&listed.body).unwrap();
    let mut lineage: Vec<(String, Option<String>, u32)> = listed
        .into_iter()
        .map(|i| (i.serial, i.predecessor, i.renewals))
        .collect();
    lineage.sort();
    let mut want = vec![
        (joined.serial.clone(), None, 0),
        (first.serial.clone(), Some(joined.serial.clone()), 1),
        (fork.serial.clone(), Some(joined.serial.clone()), 1),
        (second.serial.clone(), Some(first.serial.clone()), 2),
    ];
    want.sort();
    assert_eq!(lineage, want);
    // Live identities: the soonest expires in about an hour, none is past its renewal point
    // unrenewed (the join's certificate was renewed; so was `first`).
    let soonest = gw.metric("bootstrap_soonest_expiry_seconds").await.unwrap();
    assert!(
        (3000.0..=3600.0).contains(&soonest),
        "soonest expiry {soonest}"
    );
    assert_eq!(
        gw.metric("bootstrap_identities_past_renewal_point").await,
        Some(0.0)
    );
    // Four answered with a certificate: three renewals and the replay.
    assert_eq!(
        gw.metric("bootstrap_renewals_total{result=\"issued\"}")
            .await,
        Some(4.0)
    );
}

/// A certificate for `spiffe_id` signed by `issuer` (PEM certificate and key), valid from
/// `not_before` to `not_after`. Returns (chain PEM, key PEM).
fn leaf_signed_by(
    issuer_cert: &str,
    issuer_key: &str,
    spiffe_id: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> (String, String) {
    let ca_key = rcgen::KeyPair::from_pem(issuer_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(issuer_cert, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        spiffe_id.to_string().try_into().unwrap(),
    )];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[
        0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
    ]));
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_without_a_valid_unrevoked_svid_are_refused_each_with_its_own_reason() {
    let gw = Gateway::start("renew-refused");
    let csr = NodeKey::new("relay-2").csr;
    let spiffe_id = format!("spiffe://{TRUST_DOMAIN}/cluster/edge-eu/role/relay/node/relay-2");

    // No client certificate at all.
    let none = renew(&gw, None, &csr, None).await;
    assert_eq!(none.status, 401);
    let problem = raw_problem(&none);
    assert_eq!(
        (problem.stage.as_str(), problem.reason.as_str()),
        ("client-certificate", "client-certificate-required")
    );

    // Signed by this gateway's CA, but expired an hour ago.
    let ca_cert = std::fs::read_to_string(gw.path("ca/ca.pem")).unwrap();
    let ca_key = std::fs::read_to_string(gw.path("ca/ca.key")).unwrap();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let (expired, expired_key) =
        leaf_signed_by(&ca_cert, &ca_key, &spiffe_id, now - 2 * hour, now - hour);
    let response = renew(&gw, Some((&expired, &expired_key)), &csr, None).await;
    assert_eq!(response.status, 401);
    assert_eq!(raw_problem(&response).reason, "certificate-expired");

    // Valid, but from a CA this gateway does not know.
    let td = gateway::identity::TrustDomain::parse(TRUST_DOMAIN).unwrap();
    let (other_ca, other_key) = gateway::identity::Ca::generate(&td, 24 * hour, now).unwrap();
    let (foreign, foreign_key) =
        leaf_signed_by(&other_ca, &other_key, &spiffe_id, now - hour, now + hour);
    let response = renew(&gw, Some((&foreign, &foreign_key)), &csr, None).await;
    assert_eq!(response.status, 401);
    assert_eq!(raw_problem(&response).reason, "unknown-issuer");

    // Issued here, then revoked by serial.
    let token = gw.issue_token("edge-eu", "relay", 1).await;
    let key = NodeKey::new("relay-2");
    let joined = join_as(&gw.node(), &token.token, "relay-2", &key).await;
    gw.revoke(serde_json::json!({ "serial": joined.serial, "reason": "key compromised" }))
        .await;
    let key_pem = key.key.serialize_pem();
    let response = renew(&gw, Some((&joined.certificate_chain, &key_pem)), &csr, None).await;
    assert_eq!(response.status, 403);
    let problem = raw_problem(&response);
    assert_eq!(
        (problem.stage.as_str(), problem.reason.as_str()),
        ("identity", "identity-revoked")
    );
    let refused = gw.wait_for_audit("renew-refused", |e| e["serial"] == joined.serial);
    assert_eq!(refused["token_id"], token.id);

    // Still healthy.
    assert_eq!(gw.node().get("/healthz").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revocation_drill() {
    let gw = Gateway::start("revocation-drill");
    let config = gw.config_naming_the_admin_port();
    let node = gw.node();
    let token = gw.issue_token("edge-eu", "relay", 1).await;
    let key = NodeKey::new("relay-a");
    let joined = join_as(&node, &token.token, "relay-a", &key).await;
    let key_pem = key.key.serialize_pem();
    let next_key = NodeKey::new("relay-a");
    let renewal = renewed(
        &renew(
            &gw,
            Some((&joined.certificate_chain, &key_pem)),
            &next_key.csr,
            None,
        )
        .await,
    );

    // A relying party already waiting on the feed: nothing is revoked yet, so it waits. (Were
    // its request to arrive after the revocation, it would be answered at once: the
    // assertions below hold either way.)
    let open = || async {
        gw.metric("bootstrap_open_connections")
            .await
            .unwrap_or_default()
    };
    let before = open().await;
    let feed = gw.node();
    let waiting = tokio::spawn(async move {
        let reply = feed.get("/v1/revocations?since=0&wait=25").await.unwrap();
        (Instant::now(), reply)
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while open().await < before + 1.0 {
        assert!(Instant::now() < deadline, "the feed client never connected");
        tokio::task::yield_now().await;
    }

    let out = omnirelay(&[
        "revoke",
        "--token",
        &token.id,
        "--reason",
        "node stolen",
        "--config",
        &config,
    ])
    .unwrap();
    let revoked_at = Instant::now();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("2 identities revoked"), "{printed}");

    let (arrived, reply) = waiting.await.unwrap();
    assert_eq!(reply.status, 200);
    let page: RevocationPage = serde_json::from_slice(&reply.body).unwrap();
    let mut serials: Vec<_> = page.revocations.iter().map(|r| r.serial.clone()).collect();
    serials.sort();
    let mut want = vec![joined.serial.clone(), renewal.serial.clone()];
    want.sort();
    assert_eq!(serials, want);
    assert!(
        arrived <= revoked_at + Duration::from_secs(1),
        "the feed answered {:?} after the revocation returned",
        arrived.saturating_duration_since(revoked_at)
    );

    // The renewed certificate can no longer renew.
    let next_pem = next_key.key.serialize_pem();
    let refused = renew(
        &gw,
        Some((&renewal.certificate_chain, &next_pem)),
        &NodeKey::new("relay-a").csr,
        None,
    )
    .await;
    assert_eq!(refused.status, 403);
    assert_eq!(raw_problem(&refused).reason, "identity-revoked");

    // A fresh token for the same node: refused while the SPIFFE ID is quarantined.
    let fresh = gw.issue_token("edge-eu", "relay", 1).await;
    let request = join_request(&node, &fresh.token, "relay-a", &NodeKey::new("relay-a")).await;
    let reply = post_join(&node, &request).await;
    assert_eq!(reply.status, 403);
    assert_eq!(problem(&reply).reason, "quarantined");
    let wait: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((3000..=3600).contains(&wait), "Retry-After {wait}");

    // Counted: both revocations, the quarantine refusal.
    // (The publisher counts them when it sees the store's head move: poll briefly.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metric("bootstrap_revocations_total").await != Some(2.0) {
        assert!(
            Instant::now() < deadline,
            "bootstrap_revocations_total never reached 2"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(
        gw.metric("bootstrap_quarantine_refusals_total").await,
        Some(1.0)
    );
    let age = gw.metric("bootstrap_crl_age_seconds").await.unwrap();
    assert!((0.0..60.0).contains(&age), "CRL age {age}");

    // Both serials in a CRL signed by the CA, as openssl sees it.
    let crl = node.get("/v1/crl").await.unwrap();
    assert_eq!(crl.status, 200);
    assert_eq!(crl.headers["content-type"], "application/pkix-crl");
    let ca_pem = std::fs::read(gw.path("ca/ca.pem")).unwrap();
    let text = gw.openssl_crl(&crl.body, &ca_pem);
    for serial in &want {
        assert!(text.contains(serial.as_str()), "{serial} not in\n{text}");
    }
    assert!(text.contains("next update"), "{text}");

    // The audit holds the whole lineage under the token.
    let of_token = |e: &&serde_json::Value| e["token_id"] == token.id.as_str();
    let events = gw.audit_until("both revocations of the lineage", |events| {
        events
            .iter()
            .filter(of_token)
            .filter(|e| e["kind"] == "identity-revoked")
            .count()
            == 2
    });
    let kinds: Vec<String> = events
        .iter()
        .filter(of_token)
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    for kind in [
        "token-issued",
        "identity-issued",
        "identity-renewed",
        "token-revoked",
        "identity-revoked",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} missing: {kinds:?}");
    }

    // The operator lifts the quarantine; the node joins again.
    let listed = omnirelay(&["quarantine", "list", "--config", &config]).unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&joined.spiffe_id));
    let lift = omnirelay(&["quarantine", "lift", &joined.spiffe_id, "--config", &config]).unwrap();
    assert!(
        lift.status.success(),
        "{}",
        String::from_utf8_lossy(&lift.stderr)
    );
    let again = gw.issue_token("edge-eu", "relay", 1).await;
    let rejoined = join_as(&node, &again.token, "relay-a", &NodeKey::new("relay-a")).await;
    assert_eq!(rejoined.spiffe_id, joined.spiffe_id);
    gw.wait_for_audit("quarantine-lifted", |e| {
        e["spiffe_id"] == joined.spiffe_id.as_str()
    });
}
