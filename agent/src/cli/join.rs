//! `mesh bootstrap join`: what a node runs to get its identity.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use policy_sdk as sdk;

use crate::svid_dir::SvidDir;
use crate::{Backoff, Device, GatewayClient, JoinOptions};

/// The flags of `mesh bootstrap join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The gateway, e.g. `https://gateway.example:8443`.
    #[arg(long)]
    gateway: String,
    /// The bootstrap token. Prefer --token-file: arguments are visible to other users.
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// A file holding the bootstrap token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// PEM bundle that signed the gateway's TLS certificate.
    #[arg(long)]
    ca_bundle: PathBuf,
    /// Directory for the key, certificate and bundle (and `agent.json`, what `renew --dir`
    /// needs).
    #[arg(long)]
    out: PathBuf,
    /// This node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// A posture claim, `name=value` (true/false, integers and text). Repeatable.
    #[arg(long = "claim")]
    claims: Vec<String>,
    /// Device certificate chain (PEM) for x509pop attestation.
    #[arg(long, requires = "device_key")]
    device_cert: Option<PathBuf>,
    /// Device private key (PKCS#8 PEM) for x509pop attestation.
    #[arg(long, requires = "device_cert")]
    device_key: Option<PathBuf>,
    /// Attempts before giving up on retryable failures.
    #[arg(long, default_value_t = 5)]
    attempts: u32,
}

pub(super) async fn run(args: JoinArgs) -> anyhow::Result<ExitCode> {
    let token = match (args.token, args.token_file) {
        (Some(t), _) => t,
        (None, Some(file)) => std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?
            .trim()
            .to_string(),
        (None, None) => bail!("give the bootstrap token with --token-file or --token"),
    };
    let device = match (args.device_cert, args.device_key) {
        (Some(cert), Some(key)) => Some(Device {
            chain_pem: std::fs::read_to_string(&cert)
                .with_context(|| format!("reading {}", cert.display()))?,
            key_pem: crate::secrets::read(&key)?,
        }),
        _ => None,
    };
    let ca_bundle = &args.ca_bundle;
    let bundle =
        std::fs::read(ca_bundle).with_context(|| format!("reading {}", ca_bundle.display()))?;
    let client = GatewayClient::new(&args.gateway, &bundle)?;
    let options = JoinOptions {
        node_name: args.node_name.unwrap_or_else(default_node_name),
        token,
        claims: parse_claims(&args.claims)?,
        device,
        out: args.out,
        max_attempts: args.attempts,
        backoff: Backoff::default(),
    };
    let joined = crate::join(&client, &options).await?;
    println!("joined as {}", joined.response.spiffe_id);
    super::print_svid(&joined.response, &SvidDir::new(&options.out));
    Ok(ExitCode::SUCCESS)
}

fn parse_claims(args: &[String]) -> anyhow::Result<BTreeMap<String, sdk::ClaimValue>> {
    args.iter()
        .map(|arg| {
            let (name, value) = arg
                .split_once('=')
                .with_context(|| format!("--claim {arg:?}: expected name=value"))?;
            let value = match value {
                "true" => sdk::ClaimValue::Flag(true),
                "false" => sdk::ClaimValue::Flag(false),
                v => v
                    .parse::<i64>()
                    .map(sdk::ClaimValue::Integer)
                    .unwrap_or_else(|_| sdk::ClaimValue::Text(v.to_string())),
            };
            Ok((name.to_string(), value))
        })
        .collect()
}

fn default_node_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let name: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let name = name.trim_matches('-').to_string();
    if name.is_empty() { "node".into() } else { name }
}
