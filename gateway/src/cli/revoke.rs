//! `omnirelay revoke` and `omnirelay quarantine list|lift`: taking identities back before they
//! expire, and ending the quarantine that keeps a revoked SPIFFE ID out, through the admin API.

use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};
use http::StatusCode;

use super::token::{AdminArgs, expect, rfc3339, whoami};
use crate::store::{Quarantine, RevokeSummary};
use crate::wire::{LiftQuarantineRequest, LiftQuarantineResponse, RevokeIdentityRequest};

/// What `omnirelay revoke` takes back: exactly one of the three.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub(super) struct Target {
    /// A token's audit GUID: the token, and every identity issued through it, by join or by
    /// renewal.
    #[arg(long)]
    token: Option<String>,
    /// A SPIFFE ID: every identity carrying it.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// A certificate serial (hex): it and every renewal descending from it.
    #[arg(long)]
    serial: Option<String>,
}

/// `omnirelay revoke`.
#[derive(Debug, Args)]
pub(super) struct RevokeArgs {
    #[command(flatten)]
    target: Target,
    /// Why (audited, and published in the revocation feed).
    #[arg(long)]
    reason: String,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Debug, Subcommand)]
pub(super) enum QuarantineCommand {
    /// SPIFFE IDs that may not join or renew now, and until when.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Lets a quarantined SPIFFE ID join again now.
    Lift {
        /// The SPIFFE ID.
        spiffe_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

pub(super) async fn revoke(args: RevokeArgs) -> anyhow::Result<ExitCode> {
    let RevokeArgs {
        target,
        reason,
        admin,
    } = args;
    let request = RevokeIdentityRequest {
        token: target.token,
        spiffe_id: target.spiffe_id,
        serial: target.serial,
        reason,
        revoked_by: Some(whoami()),
    };
    let reply = admin
        .client()?
        .post("/admin/v1/revoke", serde_json::to_vec(&request)?)
        .await?;
    if reply.status == StatusCode::NOT_FOUND {
        bail!("nothing on record matches; nothing was revoked");
    }
    let summary: RevokeSummary = expect(reply, StatusCode::OK)?;
    if summary.token_revoked {
        println!("token revoked");
    }
    println!("{} identities revoked", summary.serials.len());
    for serial in &summary.serials {
        println!("  {serial}");
    }
    for q in &summary.quarantined {
        println!("quarantined {} until {}", q.spiffe_id, rfc3339(q.until));
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn quarantine(cmd: QuarantineCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        QuarantineCommand::List { admin } => {
            let listed: Vec<Quarantine> = expect(
                admin.client()?.get("/admin/v1/quarantine").await?,
                StatusCode::OK,
            )?;
            if listed.is_empty() {
                println!("no SPIFFE ID is quarantined");
            }
            for q in listed {
                println!(
                    "{}  until {}  ({})",
                    q.spiffe_id,
                    rfc3339(q.until),
                    q.reason
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        QuarantineCommand::Lift { spiffe_id, admin } => {
            let request = LiftQuarantineRequest {
                spiffe_id: spiffe_id.clone(),
                by: Some(whoami()),
            };
            let reply = admin
                .client()?
                .post("/admin/v1/quarantine/lift", serde_json::to_vec(&request)?)
                .await?;
            if reply.status == StatusCode::NOT_FOUND {
                bail!("{spiffe_id} is not quarantined");
            }
            let _: LiftQuarantineResponse = expect(reply, StatusCode::OK)?;
            println!("quarantine of {spiffe_id} lifted");
            Ok(ExitCode::SUCCESS)
        }
    }
}
