//! `omnirelay ca status|prepare|activate|retire`: staged CA rotation, through the admin API.
//! Prepare publishes a new CA in the trust bundle; once nodes have refreshed their bundle,
//! activate makes it the signer; once the old CA's last certificate has expired, retire drops
//! it from the bundle.

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use http::StatusCode;

use super::token::{AdminArgs, expect, rfc3339, whoami};
use crate::identity::{CaStatus, RotationRequest};

#[derive(Debug, Subcommand)]
pub(super) enum CaCommand {
    /// List the CAs of the rotation with their state, fingerprint and expiry, and the bundle
    /// sequence.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Generate the next CA and publish it in the trust bundle (it does not sign yet).
    Prepare {
        /// Its lifetime, e.g. `8760h`; by default the active CA's.
        #[arg(long)]
        validity: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make the prepared CA the signer; the current one stays in the bundle until retired.
    /// Run it once nodes have picked up the bundle with the prepared CA.
    Activate {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Drop the previous CA from the trust bundle. Refused while a certificate it issued is
    /// still live, unless forced.
    Retire {
        /// Retire it although certificates it issued are still live (they stop verifying for
        /// every node that refreshes its bundle). Audited as forced.
        #[arg(long)]
        force: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

pub(super) async fn run(cmd: CaCommand) -> anyhow::Result<ExitCode> {
    let (step, request, json, admin) = match cmd {
        CaCommand::Status { json, admin } => {
            let status: CaStatus =
                expect(admin.client()?.get("/admin/v1/ca").await?, StatusCode::OK)?;
            print(&status, json)?;
            return Ok(ExitCode::SUCCESS);
        }
        CaCommand::Prepare {
            validity,
            json,
            admin,
        } => {
            let validity = validity
                .map(|v| humantime::parse_duration(&v).with_context(|| format!("--validity {v:?}")))
                .transpose()?;
            let request = RotationRequest {
                validity_seconds: validity.map(|v| v.as_secs()),
                ..RotationRequest::default()
            };
            ("prepare", request, json, admin)
        }
        CaCommand::Activate { json, admin } => {
            ("activate", RotationRequest::default(), json, admin)
        }
        CaCommand::Retire { force, json, admin } => {
            let request = RotationRequest {
                force,
                ..RotationRequest::default()
            };
            ("retire", request, json, admin)
        }
    };
    let request = RotationRequest {
        by: Some(format!("cli:{}", whoami())),
        ..request
    };
    let reply = admin
        .client()?
        .post(
            &format!("/admin/v1/ca/{step}"),
            serde_json::to_vec(&request)?,
        )
        .await?;
    let status: CaStatus = expect(reply, StatusCode::OK).with_context(|| format!("ca {step}"))?;
    print(&status, json)?;
    Ok(ExitCode::SUCCESS)
}

fn print(status: &CaStatus, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(status)?);
        return Ok(());
    }
    println!("bundle sequence {}", status.sequence);
    println!(
        "{:<9} {:<64}  {:<20}  serving",
        "state", "fingerprint (sha256)", "not after"
    );
    for ca in &status.cas {
        println!(
            "{:<9} {:<64}  {:<20}  {}",
            ca.state.label(),
            ca.fingerprint,
            rfc3339(ca.not_after),
            if ca.serving { "yes" } else { "" }
        );
    }
    Ok(())
}
