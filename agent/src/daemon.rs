//! `mesh bootstrap renew --daemon`: keeps the node's SVID alive. It sleeps until the
//! [`schedule`] says so, renews ([`renew::renew`]), runs the `--on-renew` hook, refreshes the
//! trust bundle from `GET /v1/bundle` every `bundle_refresh` and after every renewal, and
//! optionally mirrors the revocation feed ([`revocations::Follower`], a task this loop owns and
//! stops). It returns only when the identity is gone or the directory is unusable; stopping it
//! on a signal is the caller's (dropping the future stops everything).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use tokio::time::Instant;

use crate::renew::{self, Current, RenewError, RenewOptions, holds_certificates};
use crate::retry::unit_sample;
use crate::schedule::{self, Clock, Plan, RenewPolicy};
use crate::{AgentError, GatewayClient, revocations};

/// Longest an `--on-renew` hook may run before it is killed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// What the daemon does besides renewing.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// How to renew.
    pub renew: RenewOptions,
    /// When to renew.
    pub policy: RenewPolicy,
    /// A shell command run (`sh -c`) after every renewal and bundle change.
    pub on_renew: Option<String>,
    /// How often to fetch the trust bundle. Default 5 min.
    pub bundle_refresh: Duration,
    /// Mirror the revocation feed into this file.
    pub follow_revocations: Option<PathBuf>,
}

/// Runs until the identity is gone (an error saying so) or the directory is unusable.
pub async fn run(options: DaemonOptions, clock: Arc<dyn Clock>) -> Result<Infallible, RenewError> {
    let dir = options.renew.dir.clone();
    let first = Current::load(&dir)?;
    // Owned: aborted when this function returns or its future is dropped.
    let _feed = options.follow_revocations.clone().map(|file| {
        let follower = revocations::Follower {
            dir: dir.clone(),
            gateway: first.record.gateway.clone(),
            ca_bundle: options.renew.ca_bundle.clone(),
            file,
        };
        AbortOnDrop(tokio::spawn(follower.run(clock.clone())))
    });
    let mut planned: Option<(String, SystemTime)> = None;
    let mut next_bundle = Instant::now() + options.bundle_refresh;
    loop {
        let current = Current::load(&dir)?;
        let now = clock.now();
        let at = scheduled(&mut planned, &current, options.policy, now);
        let validity = current.leaf.validity();
        let wait = match schedule::wait_until(at, validity, now) {
            Plan::Wait(wait) => wait,
            Plan::Expired => return Err(renew::expired(&dir, &current.leaf)),
        };
        tokio::select! {
            // The schedule, not a wait for a condition.
            () = tokio::time::sleep(wait) => {
                renew_now(&options, clock.as_ref()).await?;
                // The renewal's answer carried a bundle; the gateway's current one may be newer.
                refresh(&options, &Current::load(&dir)?).await;
            }
            () = tokio::time::sleep_until(next_bundle) => refresh(&options, &current).await,
        }
        next_bundle = Instant::now() + options.bundle_refresh;
    }
}

/// When to renew `current`: drawn once per certificate (a new draw at every wake-up would
/// drift towards the earliest), no sooner than `min_interval` after `now`, kept in `planned`
/// with the serial it was drawn for.
fn scheduled(
    planned: &mut Option<(String, SystemTime)>,
    current: &Current,
    policy: RenewPolicy,
    now: SystemTime,
) -> SystemTime {
    if let Some((serial, at)) = planned
        && *serial == current.leaf.serial
    {
        return *at;
    }
    let validity = current.leaf.validity();
    let at = schedule::renewal_time(validity, current.hint(), policy, unit_sample());
    let at = schedule::not_sooner(at, validity, now, policy.min_interval);
    tracing::info!(
        spiffe_id = current.leaf.spiffe_id.as_deref().unwrap_or_default(),
        serial = %current.leaf.serial,
        renew_at = %humantime::format_rfc3339_seconds(at),
        "renewal scheduled"
    );
    *planned = Some((current.leaf.serial.clone(), at));
    at
}

/// Renews (retrying until expiry) and runs the hook.
async fn renew_now(options: &DaemonOptions, clock: &dyn Clock) -> Result<(), RenewError> {
    let renewed = renew::renew(&options.renew, clock).await?;
    tracing::info!(
        spiffe_id = %renewed.spiffe_id,
        serial = %renewed.serial,
        expires = %crate::cli::rfc3339(renewed.not_after),
        "renewed"
    );
    hook(options, &renewed.spiffe_id, &renewed.serial, "renewed").await;
    Ok(())
}

/// Refreshes the bundle; a failure is logged and tried again at the next refresh.
async fn refresh(options: &DaemonOptions, current: &Current) {
    match refresh_bundle(&options.renew, current).await {
        Ok(true) => {
            tracing::info!("the trust bundle changed");
            let id = current.leaf.spiffe_id.as_deref().unwrap_or_default();
            hook(options, id, &current.leaf.serial, "bundle").await;
        }
        Ok(false) => tracing::debug!("the trust bundle is unchanged"),
        Err(e) => tracing::warn!(error = %e, "cannot refresh the trust bundle"),
    }
}

/// Fetches `GET /v1/bundle` and installs it if it changed.
async fn refresh_bundle(options: &RenewOptions, current: &Current) -> Result<bool, AgentError> {
    let trust = options
        .ca_bundle
        .as_deref()
        .unwrap_or(current.files.bundle_pem.as_bytes());
    let client = GatewayClient::new(&current.record.gateway, trust)?;
    let reply = client.get("/v1/bundle").await?;
    if reply.status != StatusCode::OK {
        return Err(AgentError::Transport(format!(
            "GET /v1/bundle answered HTTP {}",
            reply.status
        )));
    }
    let pem = String::from_utf8(reply.body.to_vec())
        .ok()
        .filter(|pem| holds_certificates(pem))
        .ok_or_else(|| AgentError::Transport("GET /v1/bundle: not a PEM bundle".into()))?;
    Ok(options.dir.replace_bundle(&pem)?)
}

async fn hook(options: &DaemonOptions, spiffe_id: &str, serial: &str, event: &str) {
    if let Some(command) = &options.on_renew {
        let env = HookEnv {
            dir: options.renew.dir.root(),
            spiffe_id,
            serial,
            event,
        };
        run_hook(command, &env, HOOK_TIMEOUT).await;
    }
}

/// What a hook is told, as environment variables.
#[derive(Debug, Clone, Copy)]
pub struct HookEnv<'a> {
    /// `OMNIRELAY_SVID_DIR`: the identity directory.
    pub dir: &'a Path,
    /// `OMNIRELAY_SPIFFE_ID`.
    pub spiffe_id: &'a str,
    /// `OMNIRELAY_SERIAL`.
    pub serial: &'a str,
    /// `OMNIRELAY_EVENT`: `renewed` or `bundle`.
    pub event: &'a str,
}

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookOutcome {
    /// Exit status 0.
    Succeeded,
    /// Another status, or killed by a signal.
    Failed(String),
    /// It ran past the timeout and was killed.
    TimedOut,
    /// `sh` could not be started.
    NotStarted(String),
}

/// Runs `sh -c command` with the [`HookEnv`] variables, stdin closed, output inherited. A
/// failing hook is logged, never fatal: the SVID is installed either way.
pub async fn run_hook(command: &str, env: &HookEnv<'_>, timeout: Duration) -> HookOutcome {
    let spawned = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("OMNIRELAY_SVID_DIR", env.dir)
        .env("OMNIRELAY_SPIFFE_ID", env.spiffe_id)
        .env("OMNIRELAY_SERIAL", env.serial)
        .env("OMNIRELAY_EVENT", env.event)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the --on-renew hook");
            return HookOutcome::NotStarted(e.to_string());
        }
    };
    let outcome = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => HookOutcome::Succeeded,
        Ok(Ok(status)) => HookOutcome::Failed(status.to_string()),
        Ok(Err(e)) => HookOutcome::Failed(e.to_string()),
        Err(_) => {
            let _ = child.kill().await;
            HookOutcome::TimedOut
        }
    };
    match &outcome {
        HookOutcome::Succeeded => tracing::info!(event = env.event, "--on-renew hook ran"),
        other => tracing::warn!(event = env.event, outcome = ?other, "--on-renew hook failed"),
    }
    outcome
}

/// A task that stops with its owner.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<Infallible>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests;
