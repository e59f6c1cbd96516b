//! Startup and shutdown: builds every part from a [`Config`], binds both listeners, runs the
//! background tasks, and stops them in order. `anyhow` is used here because a human reads a
//! startup error and the process exits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;

use crate::api::{AdminApi, NodeApi, flush_refusals};
use crate::audit::AuditEvent;
use crate::config::Config;
use crate::policy::{BreakerState, BreakerTransition};
use crate::server::{Bounds, serve, server_tls};
pub use crate::state::Gateway;

/// How long connections get to finish after shutdown starts.
const GRACE: Duration = Duration::from_secs(10);

/// A running gateway: both listeners and the background tasks.
#[derive(Debug)]
pub struct Running {
    /// Where nodes connect.
    pub node_addr: SocketAddr,
    /// Where operators connect.
    pub admin_addr: SocketAddr,
    /// The shared state.
    pub gateway: Arc<Gateway>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Running {
    /// Stops accepting, lets requests in flight finish (up to the grace period), stops the
    /// background tasks, writes the coalesced refusals, signs the audit chain's head (a
    /// checkpoint) and returns once everything has stopped and the audit file holds every
    /// committed entry.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
        // Every connection is closed: the refusals counted since the last write are final.
        flush_refusals(&self.gateway).await;
        if let Err(e) = self.gateway.store.flush_audit().await {
            tracing::error!(error = %e, "could not sign and flush the audit log at shutdown");
        }
    }

    /// Waits until a shutdown signal (SIGINT/SIGTERM) arrives, then stops.
    pub async fn run_until_signal(self, mut signals: Signals) -> anyhow::Result<()> {
        tokio::select! {
            _ = signals.interrupt.recv() => {}
            _ = signals.terminate.recv() => {}
        }
        tracing::info!("shutting down");
        self.stop().await;
        Ok(())
    }
}

/// SIGINT and SIGTERM, taken over before the gateway starts: a signal that arrives while it
/// starts then stops it gracefully instead of killing it with the default action.
#[derive(Debug)]
pub struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers.
    pub fn register() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }
}

/// Builds the gateway and starts serving.
pub async fn start(config: &Config) -> anyhow::Result<Running> {
    let gateway = Arc::new(Gateway::build(config).await?);
    let tls = server_tls(gateway.serving.clone())?;
    gateway.metrics.trust(&gateway.trust());
    let node = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("binding {}", config.server.listen))?;
    let admin = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("binding {}", config.admin.listen))?;
    let (node_addr, admin_addr) = (node.local_addr()?, admin.local_addr()?);
    let (shutdown, stop) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let bounds = Bounds::from(&config.server);
    let metrics = gateway.metrics.clone();
    tasks.spawn(serve(
        node,
        tls.clone(),
        bounds.clone(),
        Arc::new(NodeApi::new(gateway.clone())),
        metrics.clone(),
        stop.clone(),
        GRACE,
    ));
    tasks.spawn(serve(
        admin,
        tls,
        bounds,
        Arc::new(AdminApi::new(gateway.clone())),
        metrics,
        stop.clone(),
        GRACE,
    ));
    if let Some(reloader) = &gateway.reloader {
        let polling = reloader.spawn_polling(stop.clone());
        tasks.spawn(async move {
            let _ = polling.await;
        });
    }
    tasks.spawn(record_breaker_transitions(
        gateway.clone(),
        gateway.host.breaker_transitions(),
        stop.clone(),
    ));
    tasks.spawn(audit_refusals(gateway.clone(), stop.clone()));
    tasks.spawn(publish_revocations(gateway.clone(), stop.clone()));
    tasks.spawn(housekeeping(gateway.clone(), stop));
    tracing::info!(%node_addr, %admin_addr, trust_domain = %config.trust_domain, "gateway serving");
    Ok(Running {
        node_addr,
        admin_addr,
        gateway,
        shutdown,
        tasks,
    })
}

/// Periodic upkeep: forget idle rate-limit keys.
async fn housekeeping(gateway: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = every.tick() => gateway.limits.forget_idle(),
            _ = stop.changed() => return,
        }
    }
}

/// Keeps the CRL current: signed again after each revocation this replica's store reports and
/// at half of its validity.
async fn publish_revocations(gateway: Arc<Gateway>, stop: watch::Receiver<bool>) {
    gateway
        .revocations
        .run(
            gateway.store.clone(),
            || gateway.trust(),
            |n| {
                gateway.metrics.revocations.inc_by(n);
            },
            stop,
        )
        .await;
}

/// Writes the coalesced refusals of unauthenticated clients every interval; the last ones are
/// written by [`Running::stop`] once the listeners have drained.
async fn audit_refusals(gateway: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(gateway.refusal_audit_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => flush_refusals(&gateway).await,
            _ = stop.changed() => return,
        }
    }
}

/// Puts every policy circuit-breaker transition into the metrics and the audit log (the host
/// owns neither). An audit write that fails is logged; the breaker itself is unaffected.
async fn record_breaker_transitions(
    gateway: Arc<Gateway>,
    mut transitions: broadcast::Receiver<BreakerTransition>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let transition = tokio::select! {
            next = transitions.recv() => next,
            _ = stop.changed() => return,
        };
        let t = match transition {
            Ok(t) => t,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::error!(missed, "policy breaker transitions were not recorded");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        gateway
            .metrics
            .policy_circuit(&t.policy, t.state.gauge(), t.state == BreakerState::Open);
        let event = AuditEvent::PolicyCircuit {
            policy: t.policy.to_string(),
            module_digest: t.digest.to_string(),
            state: t.state.label().into(),
            failures: t.failures,
            cause: t.cause.map(Into::into),
            cooldown_ms: u64::try_from(t.cooldown.as_millis()).unwrap_or(u64::MAX),
        };
        if let Err(error) = gateway.store.audit(vec![event]).await {
            tracing::error!(%error, policy = %t.policy, "cannot audit a policy breaker transition");
        }
    }
}
