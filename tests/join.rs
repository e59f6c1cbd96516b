//! Joining over HTTPS against the real binary: what a node gets, and that nothing a node asks
//! for beyond its public key reaches the certificate.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use omnirelay_e2e::*;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_and_its_svid_verifies_against_the_served_bundle() {
    let gw = Gateway::start("join");
    let token = gw.issue_token("edge-eu", "dispatcher", 1).await;
    let node = gw.node();
    let key = NodeKey::new("dispatcher-07");
    let joined = join_as(&node, &token.token, "dispatcher-07", &key).await;

    let want =
        format!("spiffe://{TRUST_DOMAIN}/cluster/edge-eu/role/dispatcher/node/dispatcher-07");
    assert_eq!(joined.spiffe_id, want);
    let bundle = node.get("/v1/bundle").await.unwrap();
    assert_eq!(bundle.status, 200);
    verify_with_webpki(&joined.certificate_chain, &bundle.body);

    // The spiffe crate's X.509-SVID parser: an oracle nobody here wrote.
    let leaf = CertificateDer::from_pem_slice(joined.certificate_chain.as_bytes()).unwrap();
    let svid = spiffe::X509Svid::parse_from_der(&leaf, key.key.serialized_der()).unwrap();
    assert_eq!(svid.spiffe_id().to_string(), want);
    assert!(joined.renew_after > joined.not_before && joined.renew_after < joined.not_after);

    // Recorded and audited.
    let issued = gw.wait_for_audit("identity-issued", |e| e["serial"] == joined.serial);
    assert_eq!(issued["spiffe_id"], want);
    assert_eq!(issued["token_id"], token.id);
    assert_eq!(issued["uses_after"], 1);
    assert_eq!(issued["policy"]["name"], "cluster-role");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_asking_for_ca_and_extra_names_still_gets_a_plain_leaf_with_only_the_granted_name() {
    let gw = Gateway::start("hostile-csr");
    let token = gw.issue_token("edge-us", "relay", 1).await;
    let node = gw.node();
    let key = NodeKey::with_params("relay-1", |p| {
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        p.subject_alt_names = vec![
            rcgen::SanType::DnsName("evil.example".try_into().unwrap()),
            rcgen::SanType::URI(format!("spiffe://{TRUST_DOMAIN}/admin").try_into().unwrap()),
            rcgen::SanType::URI("spiffe://evil.example/admin".try_into().unwrap()),
        ];
    });
    let joined = join_as(&node, &token.token, "relay-1", &key).await;

    let der = CertificateDer::from_pem_slice(joined.certificate_chain.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let basic = cert.basic_constraints().unwrap().unwrap().value;
    assert!(!basic.ca, "leaf must not be a CA");
    let usage = cert.key_usage().unwrap().unwrap().value;
    assert!(usage.digital_signature() && !usage.key_cert_sign() && !usage.crl_sign());
    let sans = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    let names: Vec<String> = sans.iter().map(|n| format!("{n}")).collect();
    assert_eq!(
        names,
        [format!(
            "URI(spiffe://{TRUST_DOMAIN}/cluster/edge-us/role/relay/node/relay-1)"
        )],
        "only the granted SPIFFE ID"
    );
    verify_with_webpki(&joined.certificate_chain, &gw.bundle());
}

/// The case idempotency keys exist for: a one-use token whose answer was lost. The retry must
/// get the same certificate, not a 409 for the use its own first attempt consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_use_token_retried_after_a_lost_answer_gets_the_same_certificate() {
    let gw = Gateway::start("one-use-retry");
    let token = gw.issue_token("edge-eu", "dispatcher", 1).await;
    let node = gw.node();
    let key = NodeKey::new("n1");
    let mut request = join_request(&node, &token.token, "n1", &key).await;
    request.idempotency_key = Some("3b1f9a0c-retry".into());
    let first = post_join(&node, &request).await;
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let retry = post_join(&node, &request).await;
    assert_eq!(
        retry.status,
        200,
        "{}",
        String::from_utf8_lossy(&retry.body)
    );
    assert_eq!(retry.body, first.body);
    // Without the key, the token is spent.
    let mut again = join_request(&node, &token.token, "n1", &key).await;
    again.idempotency_key = None;
    let refused = post_join(&node, &again).await;
    assert_eq!(refused.status, 409);
    assert_eq!(problem(&refused).reason, "token-exhausted");
}
