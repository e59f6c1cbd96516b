//! The gateway's shared state: every part a request needs (keys, CA set, store, limits, policy host,
//! metrics), built once from a [`Config`] and shared by both listeners and the background tasks.
//! It sits below `api` and `app`: both import it, it imports neither.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::Semaphore;

use crate::attest::{Attestor, DeviceRoots};
use crate::audit::{AuditKey, RefusalCoalescer};
use crate::config::Config;
use crate::identity::{CaSet, IdentityConfig, Rotation, TrustDomain};
use crate::limits::{KeyedSlots, Limits};
use crate::metrics::Metrics;
use crate::policy::{ActivePolicies, Metering, PolicyHost, PolicySet};
use crate::reload::Reloader;
use crate::revocation::Publisher;
use crate::secrets;
use crate::server::{ServerConfig, ServingCert};
use crate::store::{Backend, Checkpoints, Store};
use crate::token::{SigningKey, TokenConfig, Verifier, VerifyingKey};

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
    /// The decision tap: keeps live decisions for replay and runs the candidate policy
    /// version in shadow (when `candidate_branch` is configured).
    pub shadow: Option<Arc<crate::shadow::Shadow>>,
    /// The CA set in force (the signer and the trust bundle) and the CA rotation behind it;
    /// [`Gateway::trust`] is the set.
    pub rotation: Rotation,
    /// The certificate both listeners serve; a CA activation re-issues and swaps it.
    pub serving: Arc<ServingCert>,
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Joins being processed; beyond the cap requests are shed.
    pub in_flight: Semaphore,
    /// Joins being processed per client; beyond its cap a client gets 429.
    pub in_flight_per_ip: Arc<KeyedSlots>,
    /// Refusals before the token verified, counted until the next coalesced audit write.
    pub refusals: RefusalCoalescer,
    /// How often `refusals` is written to the audit.
    pub refusal_audit_interval: Duration,
    /// Longest a refusal that says `Retry-After` is held before it is sent (`api::pacing`).
    pub refusal_hold: Duration,
    /// The admin bearer credential.
    pub admin_credential: String,
    /// The CRL in force, and the signing of the next.
    pub revocations: Publisher,
    /// The gateway's own DNS names (from its serving certificate): no policy may grant them.
    pub reserved_dns: Vec<String>,
    /// Rate-limit refusals already audited recently (one entry per key per window).
    pub audited_limits: moka::sync::Cache<String, ()>,
    /// Client certificate chains that verified as our SVIDs, by digest (with the bundle
    /// sequence they verified under): a node renewing again on its connection skips the
    /// signature check.
    pub verified_clients: moka::sync::Cache<[u8; 32], crate::identity::ClientSvid>,
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
        let rotation = Rotation::load(&config.identity).with_context(|| {
            format!("loading the CA from {}", config.identity.ca_cert.display())
        })?;
        let serving = ServingCert::load(&config.server.tls_cert, &config.server.tls_key)?;
        let signer = SigningKey::from_pkcs8_pem(&secrets::read(&config.token.signing_key)?)
            .with_context(|| format!("loading {}", config.token.signing_key.display()))?;
        let mut keys = vec![signer.verifying_key()];
        for path in &config.token.verification_keys {
            keys.push(
                VerifyingKey::from_public_pem(&secrets::read_trust_anchor(path)?)
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
        let audit_key = AuditKey::from_pkcs8_pem(&secrets::read(&config.audit.signing_key)?)
            .with_context(|| format!("loading {}", config.audit.signing_key.display()))?;
        let checkpoints = Checkpoints::new(Arc::new(audit_key), &config.audit);
        let store: Arc<dyn Store> = crate::store::open(&config.store, checkpoints)
            .await
            .with_context(|| match &config.store.backend {
                Backend::Sqlite => format!("opening {}", config.store.sqlite.display()),
                // The URL carries no password (the config refuses one).
                Backend::Postgres(pg) => format!("opening the PostgreSQL store at {}", pg.url),
            })?;
        let metrics = Arc::new(Metrics::new());
        let policies = Arc::new(ActivePolicies::default());
        let reserved_dns = own_dns_names(&read(&config.server.tls_cert)?)?;
        // The decision tap: live decisions kept for replay, and a shadow candidate's
        // comparisons.
        let candidate = config
            .policy_source
            .as_ref()
            .filter(|s| s.candidate_branch.is_some());
        let shadow = (config.decisions.keep > 0 || candidate.is_some()).then(|| {
            crate::shadow::Shadow::start(
                candidate.map(|s| s.shadow).unwrap_or_default(),
                config.decisions,
                host.clone(),
                store.clone(),
                metrics.clone(),
                reserved_dns.clone(),
            )
        });
        let mut reloader = None;
        if let Some(source) = &config.policy_source {
            let started = Reloader::start(
                source.clone(),
                host.clone(),
                policies.clone(),
                metrics.clone(),
                store.clone(),
                shadow.clone(),
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
        let revocations = Publisher::start(
            store.as_ref(),
            &rotation.current(),
            config.identity.crl_validity,
        )
        .await
        .context("signing the first CRL")?;
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
            shadow,
            rotation,
            serving: Arc::new(serving),
            store,
            metrics,
            in_flight: Semaphore::new(config.server.max_in_flight.get() as usize),
            in_flight_per_ip: KeyedSlots::new(config.server.max_in_flight_per_ip.get()),
            refusals: RefusalCoalescer::new(config.limits.refusal_audit_max_keys.get() as usize),
            refusal_audit_interval: config.limits.refusal_audit_interval,
            refusal_hold: config.limits.refusal_hold,
            admin_credential,
            reserved_dns,
            revocations,
            verified_clients: moka::sync::Cache::builder()
                .max_capacity(65_536)
                .time_to_live(Duration::from_secs(300))
                .build(),
            audited_limits: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(10))
                .build(),
        })
    }

    /// The CA set in force: the signer, the trust bundle (PEM, SPIFFE JWKS with its sequence)
    /// and its roots. Take it once per request; a rotation swaps it whole.
    pub fn trust(&self) -> Arc<CaSet> {
        self.rotation.current()
    }

    /// Wall-clock time as Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// The DNS names of the gateway's serving certificate, lowercased, plus `localhost`: a node
/// certificate carrying one of them could pass for the gateway.
fn own_dns_names(cert_pem: &str) -> anyhow::Result<Vec<String>> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .context("the serving certificate is not PEM")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("the serving certificate does not parse: {e}"))?;
    let mut names = vec!["localhost".to_string()];
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

fn read(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}
