//! `omnirelay token issue|list|revoke`, through the admin API.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use http::StatusCode;

use crate::agent::GatewayClient;
use crate::config::Config;
use crate::store::TokenRecord;
use crate::wire::{IssueTokenRequest, IssueTokenResponse, RevokeRequest, RevokeResponse};

/// Where the admin API is and how to authenticate.
#[derive(Debug, Args)]
pub(super) struct AdminArgs {
    /// Take the admin address, credential and CA from this gateway config.
    #[arg(long, default_value = "gateway.toml", conflicts_with = "admin")]
    config: PathBuf,
    /// The admin API, e.g. `https://127.0.0.1:8444` (instead of --config).
    #[arg(long, requires_all = ["credential", "ca_bundle"])]
    admin: Option<String>,
    /// File with the admin credential.
    #[arg(long)]
    credential: Option<PathBuf>,
    /// PEM bundle that signed the gateway's TLS certificate.
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
}

impl AdminArgs {
    /// The gateway config these arguments name (`--config`, default `gateway.toml`).
    pub(super) fn config_path(&self) -> &std::path::Path {
        &self.config
    }

    pub(super) fn client(&self) -> anyhow::Result<GatewayClient> {
        let (url, credential, bundle) = match (&self.admin, &self.credential, &self.ca_bundle) {
            (Some(url), Some(cred), Some(ca)) => {
                let bundle =
                    std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
                (url.clone(), cred.clone(), bundle)
            }
            _ => {
                let config = Config::load(&self.config)?;
                let mut addr = config.admin.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                // Every CA of the bundle: after a CA rotation the gateway serves a certificate
                // from a CA other than the configured one.
                let bundle = crate::identity::trust_bundle(&config.identity)
                    .context("reading the gateway's trust bundle")?;
                (format!("https://{addr}"), config.admin.credential, bundle)
            }
        };
        let credential = crate::secrets::read(&credential)?.trim().to_string();
        Ok(GatewayClient::new(&url, &bundle)?.with_bearer(credential))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Output {
    /// Readable text.
    Human,
    /// The API's JSON.
    Json,
    /// Only the token (for scripts).
    Token,
}

#[derive(Debug, Subcommand)]
pub(super) enum TokenCommand {
    /// Issue a bootstrap token; prints it (a secret, shown once) and its audit GUID.
    Issue {
        /// Cluster it admits to.
        #[arg(long)]
        cluster: String,
        /// Role it grants.
        #[arg(long)]
        role: String,
        /// Lifetime, e.g. `15m`.
        #[arg(long, default_value = "15m")]
        ttl: String,
        /// Joins it allows.
        #[arg(long, default_value_t = 1)]
        max_uses: u32,
        /// Admit only the node of this name: a join naming another node is refused.
        #[arg(long)]
        node: Option<String>,
        /// Let a join with this token replace a live identity of the same SPIFFE ID, revoking
        /// the old one (re-provisioning a node whose key was lost). Without it such a join is
        /// refused with 409 `identity-in-use`.
        #[arg(long)]
        supersede: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List tokens with their use counts.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke a token by its audit GUID.
    Revoke {
        /// The token's audit GUID.
        id: String,
        /// Why (audited).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

pub(super) async fn run(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Issue {
            cluster,
            role,
            ttl,
            max_uses,
            node,
            supersede,
            output,
            admin,
        } => {
            let ttl = humantime::parse_duration(&ttl).with_context(|| format!("--ttl {ttl:?}"))?;
            let request = IssueTokenRequest {
                cluster,
                role,
                ttl_seconds: ttl.as_secs(),
                max_uses,
                issued_by: Some(format!("cli:{}", whoami())),
                node,
                supersede,
            };
            let reply = admin
                .client()?
                .post("/admin/v1/tokens", serde_json::to_vec(&request)?)
                .await?;
            let issued: IssueTokenResponse = expect(reply, StatusCode::CREATED)?;
            match output {
                Output::Token => println!("{}", issued.token),
                Output::Json => println!("{}", serde_json::to_string_pretty(&issued)?),
                Output::Human => {
                    println!("token:   {}", issued.token);
                    println!("id:      {}", issued.id);
                    println!("expires: {}", rfc3339(issued.expires_at));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::List { json, admin } => {
            let tokens: Vec<TokenRecord> = expect(
                admin.client()?.get("/admin/v1/tokens").await?,
                StatusCode::OK,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<36}  {:<14} {:<12} {:>9}  {:<20}  state",
                "id", "cluster", "role", "uses", "expires"
            );
            for t in tokens {
                let state = if t.revoked_at.is_some() {
                    "revoked"
                } else if t.uses >= t.max_uses {
                    "exhausted"
                } else {
                    "usable"
                };
                println!(
                    "{:<36}  {:<14} {:<12} {:>4}/{:<4}  {:<20}  {state}",
                    t.id.to_string(),
                    t.cluster,
                    t.role,
                    t.uses,
                    t.max_uses,
                    rfc3339(t.expires_at)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Revoke { id, reason, admin } => {
            let body = serde_json::to_vec(&RevokeRequest {
                reason,
                revoked_by: Some(format!("cli:{}", whoami())),
            })?;
            let reply = admin
                .client()?
                .post(&format!("/admin/v1/tokens/{id}/revoke"), body)
                .await?;
            if reply.status == StatusCode::NOT_FOUND {
                bail!("no token with id {id}");
            }
            let answer: RevokeResponse = expect(reply, StatusCode::OK)?;
            println!("revoked {id}: {}", answer.revoked);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Parses a successful answer, or turns a problem into a readable error.
pub(super) fn expect<T: serde::de::DeserializeOwned>(
    reply: crate::agent::Reply,
    want: StatusCode,
) -> anyhow::Result<T> {
    if reply.status != want {
        let text = String::from_utf8_lossy(&reply.body);
        match serde_json::from_slice::<crate::wire::Problem>(&reply.body) {
            Ok(p) => bail!(
                "refused ({} at stage {}, {}): {}",
                p.status,
                p.stage,
                p.reason,
                p.detail
            ),
            Err(_) => bail!("HTTP {}: {text}", reply.status),
        }
    }
    Ok(serde_json::from_slice(&reply.body)?)
}

pub(super) fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "unknown".into())
}

pub(super) use omnirelay_agent::cli::rfc3339;
