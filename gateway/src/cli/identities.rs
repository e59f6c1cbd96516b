//! `omnirelay identities list|issue`: the inventory of issued identities, and an operator's
//! manual issuance (the fallback during a renewal outage), through the admin API.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use http::StatusCode;

use super::token::{AdminArgs, expect, rfc3339, whoami};
use crate::store::IssuedIdentity;
use crate::wire::{JoinResponse, ManualIssueRequest};

/// How to print the inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Output {
    /// A table for people.
    Human,
    /// JSON for scripts.
    Json,
}

/// The identity state to filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum State {
    /// Unrevoked and unexpired.
    Live,
    /// Past its expiry.
    Expired,
    /// Revoked.
    Revoked,
}

#[derive(Debug, Subcommand)]
pub(super) enum IdentitiesCommand {
    /// List issued identities, newest first; every filter given narrows the list.
    List {
        /// Issued through this token (audit GUID).
        #[arg(long)]
        token: Option<String>,
        /// With this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// In this cluster.
        #[arg(long)]
        cluster: Option<String>,
        /// With this role.
        #[arg(long)]
        role: Option<String>,
        /// Allowed by this policy bundle version.
        #[arg(long)]
        policy_version: Option<String>,
        /// With this certificate serial (hex).
        #[arg(long)]
        serial: Option<String>,
        /// In this state now.
        #[arg(long, value_enum)]
        state: Option<State>,
        /// Expiring within this long from now, e.g. `1h`.
        #[arg(long)]
        expires_within: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<u32>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Issue by hand for a SPIFFE ID with an identity on record, from the node's CSR (the
    /// fallback while nodes cannot renew): decided by the lineage's policy (kind `manual`),
    /// audited with the reason, continuing that identity's lineage (revoke it like any other).
    Issue {
        /// The node's CSR (PEM), made with a new key on the node.
        #[arg(long)]
        csr: PathBuf,
        /// The SPIFFE ID to issue; it must have an identity on record.
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime, e.g. `4h`; the policy's grant caps it.
        #[arg(long)]
        ttl: String,
        /// Why (audited, and shown to the policy).
        #[arg(long)]
        reason: String,
        /// Write the certificate chain (PEM) here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Output format (`json`: the API's answer, as a join's).
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

pub(super) async fn run(cmd: IdentitiesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        IdentitiesCommand::Issue {
            csr,
            spiffe_id,
            ttl,
            reason,
            out,
            output,
            admin,
        } => issue(csr, spiffe_id, &ttl, reason, out, output, admin).await,
        list @ IdentitiesCommand::List { .. } => run_list(list).await,
    }
}

/// `identities issue`.
async fn issue(
    csr: PathBuf,
    spiffe_id: String,
    ttl: &str,
    reason: String,
    out: Option<PathBuf>,
    output: Output,
    admin: AdminArgs,
) -> anyhow::Result<ExitCode> {
    let ttl = humantime::parse_duration(ttl).with_context(|| format!("--ttl {ttl:?}"))?;
    let request = ManualIssueRequest {
        csr: std::fs::read_to_string(&csr).with_context(|| format!("reading {}", csr.display()))?,
        spiffe_id,
        ttl_seconds: ttl.as_secs(),
        reason,
        issued_by: Some(whoami()),
    };
    let issued: JoinResponse = expect(
        admin
            .client()?
            .post("/admin/v1/identities/issue", serde_json::to_vec(&request)?)
            .await?,
        StatusCode::OK,
    )?;
    if let Some(path) = &out {
        std::fs::write(path, &issued.certificate_chain)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&issued)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("issued {}", issued.spiffe_id);
    println!("  serial:    {}", issued.serial);
    println!("  expires:   {}", rfc3339(issued.not_after));
    println!(
        "  policy:    {} {}",
        issued.policy.name, issued.policy.version
    );
    match &out {
        Some(path) => println!("  chain:     {}", path.display()),
        None => print!("{}", issued.certificate_chain),
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_list(cmd: IdentitiesCommand) -> anyhow::Result<ExitCode> {
    let IdentitiesCommand::List {
        token,
        spiffe_id,
        cluster,
        role,
        policy_version,
        serial,
        state,
        expires_within,
        limit,
        output,
        admin,
    } = cmd
    else {
        return Ok(ExitCode::from(2));
    };
    let within = expires_within
        .map(|w| humantime::parse_duration(&w).with_context(|| format!("--expires-within {w:?}")))
        .transpose()?;
    let state = state.map(|s| match s {
        State::Live => "live",
        State::Expired => "expired",
        State::Revoked => "revoked",
    });
    let mut query = String::new();
    let params = [
        ("token", token),
        ("spiffe_id", spiffe_id),
        ("cluster", cluster),
        ("role", role),
        ("policy_version", policy_version),
        ("serial", serial),
        ("state", state.map(str::to_string)),
        ("expires_within", within.map(|d| d.as_secs().to_string())),
        ("limit", limit.map(|l| l.to_string())),
    ];
    for (key, value) in params {
        if let Some(value) = value {
            let sep = if query.is_empty() { '?' } else { '&' };
            let _ = write!(query, "{sep}{key}={}", percent_encode(&value));
        }
    }
    let listed: Vec<IssuedIdentity> = expect(
        admin
            .client()?
            .get(&format!("/admin/v1/identities{query}"))
            .await?,
        StatusCode::OK,
    )?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<32}  {:<8} {:<20}  {:<36}  {:<7}  spiffe id",
        "serial", "state", "expires", "token", "renewal"
    );
    for i in listed {
        let state = serde_json::to_value(i.state)?;
        println!(
            "{:<32}  {:<8} {:<20}  {:<36}  {:<7}  {}",
            i.serial,
            state.as_str().unwrap_or_default(),
            rfc3339(i.not_after),
            i.token_id,
            i.renewals,
            i.spiffe_id
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
