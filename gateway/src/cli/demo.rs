//! `omnirelay demo`: the whole flow on embedded defaults, in one process — init a state, start
//! the gateway on loopback, issue a token through the admin API, join as a node over HTTPS,
//! print what the node got, verify the audit chain, stop.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use http::StatusCode;

use super::init::{InitOptions, init};
use super::token::{expect, rfc3339};
use crate::agent::{self, Backoff, GatewayClient, JoinOptions};
use crate::config::Config;
use crate::identity::TrustDomain;
use crate::wire::{IssueTokenRequest, IssueTokenResponse};

pub(super) async fn demo(dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let dir = dir.unwrap_or_else(|| {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        std::env::temp_dir().join(format!("omnirelay-demo-{stamp}-{}", std::process::id()))
    });
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let config_path = init(&InitOptions {
        dir: dir.clone(),
        trust_domain: TrustDomain::parse("demo.omnirelay.example")?,
        listen: loopback,
        admin_listen: loopback,
        force: true,
    })?;
    println!(
        "1. created a development state (CA, token key, TLS certificate) in {}",
        dir.display()
    );

    let config = Config::load(&config_path)?;
    let running = crate::app::start(&config).await?;
    println!(
        "2. gateway serving nodes on https://{} and operators on https://{}",
        running.node_addr, running.admin_addr
    );

    let bundle = std::fs::read(&config.identity.ca_cert)?;
    let credential = crate::secrets::read(&config.admin.credential)?
        .trim()
        .to_string();
    let admin = GatewayClient::new(&format!("https://{}", running.admin_addr), &bundle)?
        .with_bearer(credential);
    let request = IssueTokenRequest {
        cluster: "demo".into(),
        role: "dispatcher".into(),
        ttl_seconds: 900,
        max_uses: 1,
        issued_by: Some("demo".into()),
        node: None,
        supersede: false,
    };
    let issued: IssueTokenResponse = expect(
        admin
            .post("/admin/v1/tokens", serde_json::to_vec(&request)?)
            .await?,
        StatusCode::CREATED,
    )?;
    println!(
        "3. issued a one-use token for cluster demo, role dispatcher (audit id {})",
        issued.id
    );

    let node = GatewayClient::new(&format!("https://{}", running.node_addr), &bundle)?;
    let options = JoinOptions {
        node_name: "demo-node-1".into(),
        token: issued.token,
        claims: Default::default(),
        device: None,
        out: dir.join("node"),
        max_attempts: 3,
        backoff: Backoff::default(),
    };
    let joined = agent::join(&node, &options)
        .await
        .context("joining as demo-node-1")?;
    let r = &joined.response;
    println!("4. node demo-node-1 joined:");
    println!("     SPIFFE ID: {}", r.spiffe_id);
    println!("     serial:    {}", r.serial);
    println!(
        "     expires:   {} (renew after {})",
        rfc3339(r.not_after),
        rfc3339(r.renew_after)
    );
    println!("     policy:    {} {}", r.policy.name, r.policy.version);
    println!(
        "     files:     {}, {}, {}",
        joined.key.display(),
        joined.cert.display(),
        joined.bundle.display()
    );

    running.stop().await;
    let audit = std::fs::File::open(&config.store.audit_file)?;
    let key =
        crate::audit::AuditKey::from_pkcs8_pem(&crate::secrets::read(&config.audit.signing_key)?)?;
    let summary = crate::audit::verify_signed(
        std::io::BufReader::new(audit),
        std::slice::from_ref(key.public()),
        &[],
    )?;
    println!(
        "5. stopped; audit log {} verifies ({} entries, {} after the last signed checkpoint)",
        config.store.audit_file.display(),
        summary.entries,
        summary.unsigned
    );
    println!(
        "state kept in {} (config: {})",
        dir.display(),
        config_path.display()
    );
    Ok(ExitCode::SUCCESS)
}
