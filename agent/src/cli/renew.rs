//! `mesh bootstrap renew --dir DIR [--daemon] [--on-renew CMD]`: renew the SVID a join wrote,
//! once or for as long as the identity lives.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::Backoff;
use crate::daemon::{self, DaemonOptions, HOOK_TIMEOUT, HookEnv};
use crate::renew::{self, RenewError, RenewOptions};
use crate::schedule::{RenewPolicy, SystemClock};
use crate::svid_dir::SvidDir;

/// The flags of `mesh bootstrap renew`.
#[derive(Debug, Args)]
pub struct RenewArgs {
    /// The directory a join wrote (its --out).
    #[arg(long)]
    pub(super) dir: PathBuf,
    /// Keep renewing before every expiry instead of renewing once.
    #[arg(long)]
    pub(super) daemon: bool,
    /// A shell command (`sh -c`) run after each renewal (and, with --daemon, each change of the
    /// trust bundle), with OMNIRELAY_SVID_DIR, OMNIRELAY_SPIFFE_ID, OMNIRELAY_SERIAL and
    /// OMNIRELAY_EVENT (`renewed`, `bundle`) set. A failing hook is logged, not fatal.
    #[arg(long)]
    pub(super) on_renew: Option<String>,
    /// Renew when this share of the lifetime remains (unless the gateway's renew_after hint
    /// says otherwise), jittered over the tenth of the lifetime before it.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(1..=99), requires = "daemon")]
    pub(super) renew_remaining_percent: u8,
    /// How often to fetch the trust bundle (`GET /v1/bundle`), e.g. `5m`.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, requires = "daemon")]
    pub(super) bundle_refresh: Duration,
    /// Mirror the revocation feed into this file (JSON, 0644).
    #[arg(long, requires = "daemon")]
    pub(super) follow_revocations: Option<PathBuf>,
    /// PEM bundle that signed the gateway's TLS certificate (default: the trust bundle in
    /// --dir, kept current from the gateway).
    #[arg(long)]
    pub(super) ca_bundle: Option<PathBuf>,
    /// Without --daemon: attempts before giving up on retryable failures (with --daemon the
    /// agent retries until the certificate expires).
    #[arg(long, default_value_t = 5, conflicts_with = "daemon")]
    pub(super) attempts: u32,
}

pub(super) async fn run(args: RenewArgs) -> anyhow::Result<ExitCode> {
    let ca_bundle = match &args.ca_bundle {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    let dir = SvidDir::new(&args.dir);
    let mut options = RenewOptions {
        dir: dir.clone(),
        ca_bundle,
        backoff: Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        },
        max_attempts: Some(args.attempts),
    };
    let clock = Arc::new(SystemClock);
    if !args.daemon {
        let renewed = match renew::renew(&options, clock.as_ref()).await {
            Ok(renewed) => renewed,
            Err(e) => return failed(e),
        };
        println!("renewed as {}", renewed.spiffe_id);
        super::print_svid(&renewed, &dir);
        if let Some(command) = &args.on_renew {
            let env = HookEnv {
                dir: dir.root(),
                spiffe_id: &renewed.spiffe_id,
                serial: &renewed.serial,
                event: "renewed",
            };
            daemon::run_hook(command, &env, HOOK_TIMEOUT).await;
        }
        return Ok(ExitCode::SUCCESS);
    }
    options.max_attempts = None;
    let options = DaemonOptions {
        renew: options,
        policy: RenewPolicy {
            remaining_percent: args.renew_remaining_percent,
            ..RenewPolicy::default()
        },
        on_renew: args.on_renew,
        bundle_refresh: args.bundle_refresh,
        follow_revocations: args.follow_revocations,
    };
    tokio::select! {
        outcome = daemon::run(options, clock) => match outcome {
            Err(e) => failed(e),
            Ok(never) => match never {},
        },
        signal = shutdown() => {
            signal?;
            tracing::info!("stopping");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A renewal that did not happen: "re-join needed" exits with [`super::EXIT_REJOIN`], the rest
/// are errors worth a restart.
fn failed(e: RenewError) -> anyhow::Result<ExitCode> {
    if e.needs_rejoin() {
        eprintln!("error: {e}");
        return Ok(ExitCode::from(super::EXIT_REJOIN));
    }
    Err(e.into())
}

/// SIGTERM (systemd's stop) or SIGINT.
async fn shutdown() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
