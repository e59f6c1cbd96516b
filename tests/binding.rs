//! Identities are bound to what a node proved (issue #7, findings 1 and 5): a token holder
//! cannot take another node's live SPIFFE ID, a node-bound token admits only its node, a
//! superseding token replaces a live identity and revokes it, and no policy can grant a
//! certificate that passes for the gateway — while the agent checks the gateway's SPIFFE ID,
//! not only the CA.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::sync::Arc;

use gateway::agent::GatewayClient;
use gateway::api::wire::IssueTokenRequest;
use omnirelay_e2e::*;
use rustls_pki_types::pem::PemObject;

fn bound_token(
    cluster: &str,
    node: Option<&str>,
    supersede: bool,
    max_uses: u32,
) -> IssueTokenRequest {
    IssueTokenRequest {
        cluster: cluster.into(),
        role: "dispatcher".into(),
        ttl_seconds: 900,
        max_uses,
        issued_by: Some("e2e".into()),
        node: node.map(str::to_string),
        supersede,
    }
}

/// Whether the identity with `serial` is marked revoked in the store.
fn revoked(gw: &Gateway, serial: &str) -> Option<String> {
    let db = rusqlite::Connection::open_with_flags(
        gw.path("state/gateway.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    db.query_row(
        "SELECT revoked_reason FROM identities WHERE serial = ?1",
        [serial],
        |row| row.get(0),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_token_cannot_take_another_nodes_live_identity() {
    let gw = Gateway::shared("binding");
    let fleet = gw.issue_token("edge-eu", "dispatcher", 5).await;
    let victim = join_ok(&gw, &fleet.token, "victim-1").await;

    // Another holder of the same fleet token asks for the victim's name with its own key.
    let node = gw.node();
    let thief = join_request(&node, &fleet.token, "victim-1", &NodeKey::new("victim-1")).await;
    let reply = post_join(&node, &thief).await;
    assert_eq!(
        reply.status,
        409,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let refusal = problem(&reply);
    assert_eq!(
        (refusal.stage.as_str(), refusal.reason.as_str()),
        ("record", "identity-in-use")
    );

    // Nothing was taken or recorded: one use, one identity, the victim's still live.
    assert_eq!(gw.token(&fleet.id).await.unwrap().uses, 1);
    assert_eq!(
        gw.recorded_serials(&fleet.id),
        std::slice::from_ref(&victim.serial)
    );
    assert_eq!(revoked(&gw, &victim.serial), None);
    let audited = gw.wait_for_audit("join-refused", |e| e["request_id"] == refusal.request_id);
    assert_eq!(
        audited["reason"].as_str().unwrap().split(':').next(),
        Some("identity-in-use")
    );

    // A different name under the same token is fine.
    join_ok(&gw, &fleet.token, "victim-2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_bound_token_admits_only_its_node_and_the_policy_sees_the_binding() {
    let gw = Gateway::shared("binding");
    let token = gw
        .issue_token_with(bound_token("edge-eu", Some("edge-bound-1"), false, 2))
        .await;
    let node = gw.node();
    let other = join_request(&node, &token.token, "edge-bound-2", &NodeKey::new("x")).await;
    let reply = post_join(&node, &other).await;
    assert_eq!(
        reply.status,
        403,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let refusal = problem(&reply);
    assert_eq!(
        (refusal.stage.as_str(), refusal.reason.as_str()),
        ("token", "node-mismatch")
    );
    assert!(
        refusal.detail.contains("edge-bound-1"),
        "{}",
        refusal.detail
    );
    assert_eq!(gw.token(&token.id).await.unwrap().uses, 0);

    let joined = join_ok(&gw, &token.token, "edge-bound-1").await;
    assert_eq!(
        joined.spiffe_id,
        format!("spiffe://{TRUST_DOMAIN}/cluster/edge-eu/role/dispatcher/node/edge-bound-1")
    );
    let issued = gw.wait_for_audit("token-issued", |e| e["token_id"] == token.id);
    assert_eq!(issued["node"], "edge-bound-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseding_token_replaces_the_live_identity_and_revokes_it() {
    let gw = Gateway::shared("binding");
    let first = gw.issue_token("edge-eu", "dispatcher", 1).await;
    let old = join_ok(&gw, &first.token, "lost-key-1").await;

    // The node lost its key; an operator issues a superseding token bound to it.
    let rescue = gw
        .issue_token_with(bound_token("edge-eu", Some("lost-key-1"), true, 1))
        .await;
    let new = join_ok(&gw, &rescue.token, "lost-key-1").await;
    assert_eq!(new.spiffe_id, old.spiffe_id);
    assert_ne!(new.serial, old.serial);
    assert_eq!(revoked(&gw, &old.serial).as_deref(), Some("superseded"));
    assert_eq!(revoked(&gw, &new.serial), None);
    let event = gw.wait_for_audit("identity-superseded", |e| e["serial"] == old.serial);
    assert_eq!(event["superseded_by"], new.serial);
    assert_eq!(event["token_id"], first.id);
    assert_eq!(event["superseding_token_id"], rescue.id);
}

/// A gateway whose `grant-*` clusters are decided by the fixture that grants what its settings
/// say; `grant-ok` may grant names under `nodes.e2e.example`.
fn granting_gateway(name: &str) -> Gateway {
    let module = policy_dir().join("fixture_grant.wasm");
    let module = module.to_str().unwrap();
    let binding = |cluster: &str, path: &str, dns: &str, suffixes: &str| {
        format!(
            "[[policies]]\nname = \"{cluster}\"\nmodule = \"{module}\"\nclusters = [\"{cluster}\"]\n\
             dns_suffixes = [{suffixes}]\n\
             settings = {{ path = \"{path}\", dns_sans = [{dns}], ttl_seconds = 600 }}\n\n"
        )
    };
    let fixtures = [
        binding("grant-own-path", "/omnirelay/gateway", "", ""),
        binding(
            "grant-own-dns",
            "/node/{node}",
            "\"localhost\"",
            "\"localhost\"",
        ),
        binding(
            "grant-outside",
            "/node/{node}",
            "\"evil.example\"",
            "\"nodes.e2e.example\"",
        ),
        binding(
            "grant-ok",
            "/node/{node}",
            "\"n1.nodes.e2e.example\"",
            "\"nodes.e2e.example\"",
        ),
    ]
    .concat();
    Gateway::start_with(name, |toml| {
        let at = toml.find("[[policies]]").unwrap();
        toml.insert_str(at, &fixtures);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_policy_can_grant_a_certificate_that_passes_for_the_gateway() {
    let gw = granting_gateway("reserved");
    for (cluster, why) in [
        ("grant-own-path", "reserved for the gateway"),
        ("grant-own-dns", "the gateway's own names"),
        ("grant-outside", "dns_suffixes"),
    ] {
        let token = gw.issue_token(cluster, "dispatcher", 1).await;
        let node = gw.node();
        let request = join_request(&node, &token.token, "n1", &NodeKey::new("n1")).await;
        let reply = post_join(&node, &request).await;
        assert_eq!(
            reply.status,
            503,
            "{cluster}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let refusal = problem(&reply);
        assert_eq!(refusal.reason, "policy-invalid-result", "{cluster}");
        assert!(gw.recorded_serials(&token.id).is_empty(), "{cluster}");
        let audited = gw.wait_for_audit("policy-decision", |e| e["token_id"] == token.id);
        assert_eq!(audited["outcome"], "error", "{cluster}");
        assert!(
            audited["operator_reason"].as_str().unwrap().contains(why),
            "{cluster}: {audited}"
        );
    }
    // Inside the binding's suffixes the name is granted.
    let token = gw.issue_token("grant-ok", "dispatcher", 1).await;
    let joined = join_ok(&gw, &token.token, "n1").await;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(joined.certificate_chain.as_bytes())
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let dns: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(dns, ["n1.nodes.e2e.example"]);
}

/// A TLS server on loopback presenting `cert_pem`/`key_pem`; answers nothing useful, the
/// handshake is what is tested.
async fn impostor(cert_pem: &str, key_pem: &str) -> std::net::SocketAddr {
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_a_server_with_a_node_identity_from_the_same_ca() {
    let gw = Gateway::shared("binding");
    // A certificate from the gateway's own CA for `localhost` — what a node would need to pass
    // for the gateway — but with a node's SPIFFE ID (minted with the CA key directly, as an
    // attacker holding such a certificate would present it).
    let ca = gateway::identity::Ca::load(
        &std::fs::read_to_string(gw.path("ca/ca.pem")).unwrap(),
        &std::fs::read_to_string(gw.path("ca/ca.key")).unwrap(),
    )
    .unwrap();
    let node_id = gateway::identity::SpiffeId::parse(&format!(
        "spiffe://{TRUST_DOMAIN}/cluster/edge-eu/role/dispatcher/node/evil"
    ))
    .unwrap();
    let (cert, key) = ca
        .issue_server_cert(
            &node_id,
            &["localhost".to_string()],
            &[std::net::IpAddr::from([127, 0, 0, 1])],
            std::time::Duration::from_secs(600),
            std::time::SystemTime::now(),
        )
        .unwrap();
    let addr = impostor(&cert, &key).await;
    let client =
        GatewayClient::new(&format!("https://localhost:{}", addr.port()), &gw.bundle()).unwrap();
    let err = client.get("/v1/bundle").await.unwrap_err().to_string();
    assert!(err.contains("not the gateway's"), "{err}");
    assert!(err.contains("/node/evil"), "{err}");

    // The real gateway, by name and by address, passes the same check.
    for url in [
        format!("https://localhost:{}", gw.node_addr.port()),
        format!("https://{}", gw.node_addr),
    ] {
        let client = GatewayClient::new(&url, &gw.bundle()).unwrap();
        assert_eq!(client.get("/v1/bundle").await.unwrap().status, 200, "{url}");
    }
}
