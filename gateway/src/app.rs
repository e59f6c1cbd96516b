//! Startup and shutdown: builds every part from a [`Config`], binds both listeners, runs the
//! background tasks, and stops them in order. `anyhow` is used here because a human reads a
//! startup error and the process exits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, broadcast, watch};
use tokio::task::JoinSet;

use crate::api::{AdminApi, NodeApi};
use crate::attest::{Attestor, DeviceRoots};
use crate::audit::AuditEvent;
use crate::config::Config;
use crate::identity::{Ca, IdentityConfig, TrustDomain, bundle_pem, spiffe_bundle};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::policy::{
    ActivePolicies, BreakerState, BreakerTransition, Metering, PolicyHost, PolicySet,
};
use crate::reload::Reloader;
use crate::secrets;
use crate::server::{Bounds, ServerConfig, serve, server_tls};
use crate::store::{SqliteStore, Store};
use crate::token::{SigningKey, TokenConfig, Verifier, VerifyingKey};

/// How long connections get to finish after shutdown starts.
const GRACE: Duration = Duration::from_secs(10);

/// Everything a request needs, shared by both listeners.
pub struct Gateway {
    /// Our trust domain.
    pub trust_domain: TrustDomain,
    /// Node listener settings (body size, request timeout).
    pub server: ServerConfig,
    /// CA settings (TTL bound, renewal point).
    pub identity: IdentityConfig,
    /// Token settings (issuer, lifetime bound).
    pub token: TokenConfig,
    /// Rate limiters.
    pub limits: Limits,
    /// Verifies bootstrap tokens.
    pub verifier: Verifier,
    /// Signs bootstrap tokens (admin API).
    pub signer: SigningKey,
    /// Checks attestation evidence.
    pub attestor: Attestor,
    /// Runs policies.
    pub host: Arc<PolicyHost>,
    /// The policy set in force.
    pub policies: Arc<ActivePolicies>,
    /// Follows the policy repository, when one is configured.
    pub reloader: Option<Reloader>,
    /// The issuing CA.
    pub ca: Ca,
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Joins being processed; beyond the cap requests are shed.
    pub in_flight: Semaphore,
    /// The admin bearer credential.
    pub admin_credential: String,
    /// The trust bundle, PEM.
    pub bundle_pem: Bytes,
    /// The trust bundle, SPIFFE JWKS.
    pub spiffe_bundle: Bytes,
    /// Rate-limit refusals already audited recently (one entry per key per window).
    pub audited_limits: moka::sync::Cache<String, ()>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Builds every part. Fails on the first unusable file, naming it.
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let ca = Ca::load(
            &read(&config.identity.ca_cert)?,
            &secrets::read(&config.identity.ca_key)?,
        )
        .with_context(|| format!("loading the CA from {}", config.identity.ca_cert.display()))?;
        let signer = SigningKey::from_pkcs8_pem(&secrets::read(&config.token.signing_key)?)
            .with_context(|| format!("loading {}", config.token.signing_key.display()))?;
        let mut keys = vec![signer.verifying_key()];
        for path in &config.token.verification_keys {
            keys.push(
                VerifyingKey::from_public_pem(&read(path)?)
                    .with_context(|| format!("loading {}", path.display()))?,
            );
        }
        let verifier = Verifier::new(config.trust_domain.as_str(), keys, config.token.leeway);
        let roots =
            DeviceRoots::load(&config.attestation.device_cas).map_err(anyhow::Error::msg)?;
        // Every replica that shares the signing key accepts the others' nonces.
        let nonce_secret = secrets::read(&config.token.signing_key)?;
        let attestor = Attestor::new(config.attestation.clone(), nonce_secret.as_bytes(), roots);
        let host = Arc::new(PolicyHost::new(config.policy.clone(), Metering::Off)?);
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&config.store)
                .with_context(|| format!("opening {}", config.store.sqlite.display()))?,
        );
        let metrics = Arc::new(Metrics::new());
        let policies = Arc::new(ActivePolicies::default());
        let mut reloader = None;
        if let Some(source) = &config.policy_source {
            let started = Reloader::start(
                source.clone(),
                host.clone(),
                policies.clone(),
                metrics.clone(),
                store.clone(),
            )
            .await
            .with_context(|| format!("policy source {}", source.url))?;
            reloader = Some(started);
        } else if !config.policies.is_empty() {
            let set = PolicySet::load(&host, &config.policies, "local", None, None).await?;
            tracing::info!(
                bundle = set.bundle(),
                version = set.version(),
                "policy set loaded"
            );
            policies.swap(set);
        }
        if policies.current().is_none() {
            tracing::warn!("no policy loaded: every join is refused with 503 until one is");
        }
        let admin_credential = secrets::read(&config.admin.credential)?.trim().to_string();
        anyhow::ensure!(
            admin_credential.len() >= 32,
            "{}: the admin credential must be at least 32 characters",
            config.admin.credential.display()
        );
        let bundle = bundle_pem(&[&ca]);
        let jwks = spiffe_bundle(&[&ca], 1, config.identity.bundle_refresh_hint);
        Ok(Self {
            trust_domain: config.trust_domain.clone(),
            server: config.server.clone(),
            identity: config.identity.clone(),
            token: config.token.clone(),
            limits: Limits::new(&config.limits),
            verifier,
            signer,
            attestor,
            host,
            policies,
            reloader,
            ca,
            store,
            metrics,
            in_flight: Semaphore::new(config.server.max_in_flight.get() as usize),
            admin_credential,
            bundle_pem: Bytes::from(bundle),
            spiffe_bundle: Bytes::from(jwks.to_string()),
            audited_limits: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(10))
                .build(),
        })
    }

    /// Wall-clock time as Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

fn read(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

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
    /// background tasks, and returns once everything has stopped.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }

    /// Waits until a shutdown signal (SIGINT/SIGTERM) arrives, then stops.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        shutdown_signal().await?;
        tracing::info!("shutting down");
        self.stop().await;
        Ok(())
    }
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// Builds the gateway and starts serving.
pub async fn start(config: &Config) -> anyhow::Result<Running> {
    let gateway = Arc::new(Gateway::build(config).await?);
    let tls = server_tls(&config.server.tls_cert, &config.server.tls_key)?;
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
