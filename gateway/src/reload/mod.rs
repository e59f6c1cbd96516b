//! Policy bundles from git, taken live without a restart. Off the request path: fetch →
//! manifest schema → digests → commit signature → ancestry (no rollback unless pinned) →
//! compile → `validate-settings` → vectors → atomic swap of the whole set. A failed version
//! never serves; the last good one keeps serving and is remembered on disk (the mirror holds
//! its objects), so a restart without the remote comes up on it.

mod git;
pub mod manifest;
pub mod remote;
pub mod sshsig;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use git2::Oid;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use git::{GitError, Track};
pub use manifest::{Manifest, ManifestError, ManifestPolicy};
pub use remote::{RemoteError, RemoteUrl, TransportConfig};

use crate::audit::AuditEvent;
use crate::metrics::Metrics;
use crate::policy::vectors::{self, VectorFile};
use crate::policy::{
    ActivePolicies, ModuleSource, PolicyBinding, PolicyError, PolicyHost, PolicySet, SetError,
};
use crate::store::Store;

/// The `[policy.source]` section: where bundles come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    /// A local path, `file://` URL or network URL (`https://`, `ssh://`) of the policy
    /// repository. Shown redacted.
    pub url: RemoteUrl,
    /// How to reach a network remote: CA file, credential, SSH key and `known_hosts`,
    /// whether plaintext is allowed.
    pub transport: TransportConfig,
    /// Which commit to follow. Default: the `main` branch.
    pub track: Track,
    /// A branch whose head is followed as a shadow candidate: it passes the same pipeline,
    /// then decides beside the active version without changing any answer. Default: none.
    pub candidate_branch: Option<String>,
    /// How shadow evaluation is bounded.
    pub shadow: crate::shadow::ShadowConfig,
    /// How often to fetch. Default 30 s.
    pub poll_interval: Duration,
    /// Where the mirror and the record of the active version live. Default `state/policy`.
    pub cache_dir: PathBuf,
    /// Refuse commits without a valid SSH signature by an allowed signer. Default false.
    pub require_signed_commits: bool,
    /// OpenSSH `allowed_signers` file, required when signatures are.
    pub allowed_signers: Option<PathBuf>,
    /// Follow a network remote without requiring signed commits (whoever can push, or sits
    /// on the path to the server, then chooses the code that decides). Default false.
    pub allow_unsigned_remote: bool,
}

/// Why a candidate version was refused. Each is a label of `bootstrap_policy_reload_total`.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The remote could not be fetched (the mirror keeps what it had). Boxed: the URL and the
    /// transport's reason would make every `Result` carrying this error large.
    #[error("fetch failed: {0}")]
    Fetch(#[source] Box<RemoteError>),
    /// The local mirror could not be read.
    #[error("policy mirror: {0}")]
    Mirror(#[source] GitError),
    /// The thread running git failed (a panic in libgit2's callbacks, a poisoned lock).
    #[error("policy mirror: {0}")]
    Worker(&'static str),
    /// `bundle.json` (or a schema or vector file it names) does not parse or match its schema.
    #[error("{0}")]
    Schema(String),
    /// A module's sha256 differs from the manifest's.
    #[error("policy {policy}: {path} has sha256 {actual}, the manifest says {expected}")]
    Digest {
        /// The policy.
        policy: String,
        /// The module file.
        path: String,
        /// What the manifest says.
        expected: String,
        /// What the file has.
        actual: String,
    },
    /// Unsigned, or not signed by an allowed signer, while signatures are required.
    #[error("commit signature: {0}")]
    Signature(String),
    /// A module does not compile or link, or targets another WIT version.
    #[error("policy {policy}: {source}")]
    Compile {
        /// The policy.
        policy: String,
        /// Why.
        #[source]
        source: PolicyError,
    },
    /// A policy's `validate-settings` refused its settings.
    #[error("policy {policy}: {reason}")]
    Settings {
        /// The policy.
        policy: String,
        /// Its reason.
        reason: String,
    },
    /// A test vector did not reach its expected decision.
    #[error("policy {policy}, vector {vector:?}: {detail}")]
    Vector {
        /// The policy.
        policy: String,
        /// The vector's name.
        vector: String,
        /// What differed.
        detail: String,
    },
    /// The candidate is older than (or unrelated to) the active version and nothing pins it.
    #[error("commit {candidate} does not come after the active {active}; pin it to roll back")]
    Rollback {
        /// The refused commit.
        candidate: String,
        /// The active one.
        active: String,
    },
    /// Nothing to load: the remote has no such branch or tag, or a pin names no commit.
    #[error("{0}")]
    NotFound(String),
}

impl ReloadError {
    /// Every label [`label`](Self::label) returns, and `ok`: the reloader exports each at zero
    /// from its start, so that a first failure is an increase a `rate()` or `increase()` rule
    /// sees (a series born at 1 has none).
    pub const RESULTS: [&str; 9] = [
        "ok",
        "fetch_error",
        "schema_error",
        "digest_mismatch",
        "signature_error",
        "compile_error",
        "settings_error",
        "vector_failure",
        "rollback_refused",
    ];

    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Fetch(_) | Self::Mirror(_) | Self::Worker(_) | Self::NotFound(_) => "fetch_error",
            Self::Schema(_) => "schema_error",
            Self::Digest { .. } => "digest_mismatch",
            Self::Signature(_) => "signature_error",
            Self::Compile { .. } => "compile_error",
            Self::Settings { .. } => "settings_error",
            Self::Vector { .. } => "vector_failure",
            Self::Rollback { .. } => "rollback_refused",
        }
    }
}

/// What the status endpoint shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// The version serving now.
    pub active: Option<Version>,
    /// What a pin holds the gateway to, if anything.
    pub pinned: Option<String>,
    /// The last version tried, and how it went.
    pub last_candidate: Option<Attempt>,
    /// The last poll of the remote.
    pub last_poll: Option<Attempt>,
    /// The candidate version deciding in shadow (`candidate_branch`), if any.
    #[serde(default)]
    pub candidate: Option<Version>,
    /// The last candidate-branch commit tried for shadow, and how it went.
    #[serde(default)]
    pub last_shadow_candidate: Option<Attempt>,
}

/// A bundle version (a wire type: the admin API reports it).
pub use crate::wire::Version;

/// One attempt: when, what, and the outcome label (`ok`, `unchanged` or a failure label).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    /// Unix seconds.
    pub at: u64,
    /// The commit, when one was involved.
    pub commit: Option<String>,
    /// The version, when the manifest was read.
    pub version: Option<String>,
    /// `ok`, `unchanged`, or a failure label.
    pub result: String,
    /// Why it failed.
    pub reason: Option<String>,
}

/// What is remembered on disk between runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
struct Persisted {
    commit: Option<String>,
    pinned: Option<String>,
    /// The candidate last promoted: the followed branch, still behind it, is not a rollback
    /// to refuse but simply nothing new.
    promoted: Option<String>,
}

/// Follows the policy repository. One per gateway; its poll task stops with the gateway.
pub struct Reloader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("source", &self.inner.config.url)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: SourceConfig,
    host: Arc<PolicyHost>,
    policies: Arc<ActivePolicies>,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    shadow: Option<Arc<crate::shadow::Shadow>>,
    mirror: Mutex<git::Mirror>,
    signers: Option<sshsig::AllowedSigners>,
    state: Mutex<(Status, Persisted)>,
    /// One reload at a time.
    busy: tokio::sync::Mutex<()>,
    /// One pin change at a time, whether an operator's here or another replica's followed:
    /// a pin is applied here and recorded for the fleet under it, so the follower never
    /// applies an older fleet pin over one this replica is recording.
    fleet: tokio::sync::Mutex<()>,
}

mod pipeline;

impl Reloader {
    /// Opens the mirror and comes up on the remembered version (without the remote), then on
    /// whatever the remote has now if it is reachable.
    pub async fn start(
        config: SourceConfig,
        host: Arc<PolicyHost>,
        policies: Arc<ActivePolicies>,
        metrics: Arc<Metrics>,
        store: Arc<dyn Store>,
        shadow: Option<Arc<crate::shadow::Shadow>>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.cache_dir)?;
        let remote = remote::Remote {
            url: config.url.clone(),
            transport: config.transport.clone(),
        };
        let mirror = git::Mirror::open(&config.cache_dir.join("mirror.git"), remote)?;
        let signers = match &config.allowed_signers {
            Some(path) => Some(load_signers(path)?),
            None => None,
        };
        anyhow::ensure!(
            !config.require_signed_commits || signers.is_some(),
            "policy.source.require_signed_commits needs policy.source.allowed_signers"
        );
        // Written 0600; one that others could have rewritten is not trusted to pick the code
        // that decides who gets an identity.
        let persisted: Persisted = crate::secrets::read_state(&active_file(&config))?
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for result in ReloadError::RESULTS {
            metrics.policy_reload_seen(result);
        }
        let inner = Arc::new(Inner {
            config,
            host,
            policies,
            metrics,
            store,
            shadow,
            mirror: Mutex::new(mirror),
            signers,
            state: Mutex::new((
                Status {
                    pinned: persisted.pinned.clone(),
                    ..Status::default()
                },
                persisted.clone(),
            )),
            busy: tokio::sync::Mutex::new(()),
            fleet: tokio::sync::Mutex::new(()),
        });
        let reloader = Self { inner };
        if let Some(commit) = persisted
            .commit
            .as_deref()
            .and_then(|c| Oid::from_str(c).ok())
        {
            match reloader.inner.load(commit, true, "startup").await {
                Ok(()) => tracing::info!(%commit, "policy bundle restored from the local mirror"),
                Err(e) => {
                    tracing::error!(%commit, error = %e, "the remembered policy bundle does not load")
                }
            }
        }
        // On a shared store, the fleet's pin before anything else: a replica starting while
        // the fleet is pinned never serves the remote's newest version first.
        if let Some(mut pins) = reloader.inner.store.shared_policy_pin() {
            follow_pin(&reloader.inner, &mut pins).await;
        }
        if let Err(e) = reloader.poll().await {
            tracing::warn!(error = %e, "policy source not reachable at startup; serving what is loaded");
        }
        Ok(reloader)
    }

    /// Fetches and takes the tracked commit live if it is new and passes every check.
    /// A pinned gateway fetches but does not move.
    pub async fn poll(&self) -> Result<Option<Version>, ReloadError> {
        self.inner.poll().await
    }

    /// Holds the gateway to a version (`1.2.0`, a tag or a commit id), even an older one. On a
    /// shared store the pin is then recorded for every replica, which each apply it through
    /// their own pipeline; if recording fails, the pin holds on this replica only and the
    /// error says so.
    pub async fn pin(&self, target: &str, by: &str) -> Result<Version, PinError> {
        let _fleet = self.inner.fleet.lock().await;
        let version = self.inner.pin(target, by).await?;
        self.inner
            .store
            .share_policy_pin(
                Some(target.to_string()),
                Some(version.commit.clone()),
                by.to_string(),
            )
            .await
            .map_err(PinError::NotShared)?;
        Ok(version)
    }

    /// Lets the gateway follow the remote again (rollback protection resumes from the pinned
    /// version); on a shared store, every replica.
    pub async fn unpin(&self, by: &str) -> Result<Option<Version>, PinError> {
        {
            let _fleet = self.inner.fleet.lock().await;
            self.inner.clear_pin(by).await;
            self.inner
                .store
                .share_policy_pin(None, None, by.to_string())
                .await
                .map_err(PinError::NotShared)?;
        }
        Ok(self.inner.poll().await?)
    }

    /// Makes the shadow candidate the active version, through the same pipeline (its checks
    /// run again against the active version), audited.
    pub async fn promote(&self, by: &str) -> Result<Version, ReloadError> {
        self.inner.promote(by).await
    }

    /// The candidate in shadow and the newest `limit` disagreements the store kept.
    pub async fn shadow_report(
        &self,
        limit: u32,
    ) -> Result<crate::shadow::Report, crate::store::StoreError> {
        Ok(crate::shadow::Report {
            candidate: self.status().candidate,
            disagreements: self.inner.store.disagreements(limit).await?,
        })
    }

    /// The active version, the pin, the last candidate and the last poll.
    pub fn status(&self) -> Status {
        self.inner
            .state
            .lock()
            .map(|s| s.0.clone())
            .unwrap_or_default()
    }

    /// Polls every `poll_interval` until `stop` turns true; on a shared store, also follows
    /// the fleet's pin.
    pub fn spawn_polling(
        &self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        if let Some(pins) = inner.store.shared_policy_pin() {
            tokio::spawn(follow_pins(inner.clone(), pins, stop.clone()));
        }
        tokio::spawn(async move {
            let mut every = tokio::time::interval(inner.config.poll_interval);
            every.tick().await;
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        if let Err(e) = inner.poll().await {
                            tracing::warn!(result = e.label(), error = %e, "policy poll");
                        }
                    }
                    _ = stop.changed() => return,
                }
            }
        })
    }
}

/// Why a pin or unpin did not fully happen.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// This replica refused or could not load the version (nothing was recorded).
    #[error(transparent)]
    Reload(#[from] ReloadError),
    /// This replica holds the change, but the shared store could not record it for the
    /// other replicas: repeat it once the database answers.
    #[error("the pin holds on this replica but could not be recorded for the others")]
    NotShared(#[source] crate::store::StoreError),
}

/// Applies the fleet's pin whenever another replica changes it (and once at start, if the
/// database holds one that differs from this replica's), each through this replica's own
/// pipeline and audit.
async fn follow_pins(
    inner: Arc<Inner>,
    mut pins: tokio::sync::watch::Receiver<crate::store::SharedPin>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        follow_pin(&inner, &mut pins).await;
        tokio::select! {
            changed = pins.changed() => if changed.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

/// Brings this replica to the fleet's newest pin, if it differs.
async fn follow_pin(
    inner: &Arc<Inner>,
    pins: &mut tokio::sync::watch::Receiver<crate::store::SharedPin>,
) {
    let _fleet = inner.fleet.lock().await;
    // Read under the lock: a pin this replica recorded meanwhile has moved the watch already.
    let pin = pins.borrow_and_update().clone();
    if pin.generation == 0 {
        // No replica ever pinned through the database: this one's own record stands.
        return;
    }
    let (pinned, active) = inner.pin_and_active();
    let by = format!("{} (through another replica)", pin.by);
    match (pin.target, pin.commit) {
        (Some(target), Some(commit)) => {
            if pinned.as_deref() == Some(target.as_str())
                && active.map(|c| c.to_string()).as_deref() == Some(commit.as_str())
            {
                return;
            }
            match inner.pin_shared(&target, &commit, &by).await {
                Ok(v) => {
                    tracing::info!(%target, commit = %v.commit, "policy pin taken from the fleet")
                }
                Err(e) => {
                    tracing::error!(%target, %commit, error = %e, "the fleet's policy pin does not load here")
                }
            }
        }
        _ => {
            if pinned.is_none() {
                return;
            }
            inner.clear_pin(&by).await;
            tracing::info!("policy unpinned by the fleet");
            if let Err(e) = inner.poll().await {
                tracing::warn!(result = e.label(), error = %e, "policy poll after the fleet's unpin");
            }
        }
    }
}

/// Where the active version is remembered.
pub fn active_file(config: &SourceConfig) -> PathBuf {
    config.cache_dir.join("active.json")
}

/// Reads and parses `allowed_signers`, a trust anchor (refused when others can write it).
pub fn load_signers(path: &std::path::Path) -> anyhow::Result<sshsig::AllowedSigners> {
    let text = crate::secrets::read_trust_anchor(path)?;
    sshsig::AllowedSigners::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A bundle as it stands at `spec` in the repository `remote`, fetched into a scratch mirror
/// at `scratch` (for `policy replay --candidate VERSION`, so the gateway's own mirror is never
/// written by another process): a version (`1.2.0`, read as its release tag `v1.2.0`) or any
/// tag, branch or commit. Blocking (git).
pub fn fetch_bundle(
    remote: remote::Remote,
    scratch: &std::path::Path,
    spec: &str,
) -> Result<FetchedBundle, ReloadError> {
    let mirror = git::Mirror::open(scratch, remote).map_err(ReloadError::Mirror)?;
    mirror
        .fetch()
        .map_err(|e| ReloadError::Fetch(Box::new(e)))?;
    let release = format!("refs/tags/v{}", spec.trim_start_matches('v'));
    let commit = mirror
        .resolve(&release)
        .or_else(|_| mirror.resolve(spec))
        .map_err(|_| {
            ReloadError::NotFound(format!(
                "the policy repository has no version {spec:?} (no tag {}, nor a tag, branch or \
                 commit by that name)",
                release.trim_start_matches("refs/tags/")
            ))
        })?;
    let read = |path: &str| {
        mirror
            .read(commit, path)
            .map_err(|e| ReloadError::Schema(format!("{path} at {commit}: {e}")))
    };
    let manifest =
        Manifest::parse(&read(manifest::FILE)?).map_err(|e| ReloadError::Schema(e.to_string()))?;
    let mut files = std::collections::BTreeMap::new();
    for p in &manifest.policies {
        for path in std::iter::once(&p.module)
            .chain(&p.evidence_schema)
            .chain(&p.vectors)
        {
            files.insert(path.clone(), read(path)?);
        }
    }
    Ok(FetchedBundle {
        commit: commit.to_string(),
        manifest,
        files,
    })
}

/// What [`fetch_bundle`] took from the repository.
#[derive(Debug)]
pub struct FetchedBundle {
    /// The commit the version resolved to.
    pub commit: String,
    /// Its `bundle.json`.
    pub manifest: Manifest,
    /// Every file the manifest names, by path.
    pub files: std::collections::BTreeMap<String, Vec<u8>>,
}

/// The bindings a manifest describes, with modules and schemas read from `read`, each module
/// checked against its digest.
pub fn bindings(
    manifest: &Manifest,
    read: &mut dyn FnMut(&str) -> Result<Vec<u8>, ReloadError>,
) -> Result<Vec<(PolicyBinding, Option<VectorFile>)>, ReloadError> {
    let mut out = Vec::with_capacity(manifest.policies.len());
    for p in &manifest.policies {
        let module = read(&p.module)?;
        let actual = sha256_hex(&module);
        if actual != p.sha256 {
            return Err(ReloadError::Digest {
                policy: p.name.clone(),
                path: p.module.clone(),
                expected: p.sha256.clone(),
                actual,
            });
        }
        let json = |path: &str, bytes: Vec<u8>| {
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .map_err(|e| ReloadError::Schema(format!("policy {}: {path}: {e}", p.name)))
        };
        let evidence_schema = match &p.evidence_schema {
            Some(path) => Some(json(path, read(path)?)?),
            None => None,
        };
        let vectors = match &p.vectors {
            Some(path) => Some(
                serde_json::from_value::<VectorFile>(json(path, read(path)?)?)
                    .map_err(|e| ReloadError::Schema(format!("policy {}: {path}: {e}", p.name)))?,
            ),
            None => None,
        };
        let or_any = |list: &Vec<String>| {
            if list.is_empty() {
                vec!["*".to_string()]
            } else {
                list.clone()
            }
        };
        out.push((
            PolicyBinding {
                name: p.name.clone(),
                module: ModuleSource::Bytes(Arc::from(module)),
                clusters: or_any(&p.clusters),
                roles: or_any(&p.roles),
                settings: p.settings.clone(),
                evidence_schema,
                dns_suffixes: p.dns_suffixes.clone(),
            },
            vectors,
        ));
    }
    Ok(out)
}

/// Maps a policy-set failure to the stage that refused.
fn set_error(e: SetError) -> ReloadError {
    match e {
        SetError::Policy {
            name,
            source: PolicyError::SettingsRejected(reason),
        } => ReloadError::Settings {
            policy: name,
            reason,
        },
        SetError::Policy { name, source } => ReloadError::Compile {
            policy: name,
            source,
        },
        SetError::Schema { name, reason } => {
            ReloadError::Schema(format!("policy {name}: evidence schema: {reason}"))
        }
        other => ReloadError::Schema(other.to_string()),
    }
}

/// Runs every vector of every policy in `set`; the first failure refuses the version.
async fn run_vectors(
    host: &PolicyHost,
    set: &PolicySet,
    files: &[(String, Option<VectorFile>)],
) -> Result<(), ReloadError> {
    for (name, file) in files {
        let (Some(file), Some(bound)) = (file, set.by_name(name)) else {
            continue;
        };
        for result in vectors::run(host, &bound.policy, file).await {
            if let Some(detail) = result.failure {
                return Err(ReloadError::Vector {
                    policy: name.clone(),
                    vector: result.name,
                    detail,
                });
            }
        }
    }
    Ok(())
}

fn audit_event(
    result: &Result<Version, ReloadError>,
    commit: Oid,
    trigger: &str,
    version: Option<&str>,
) -> AuditEvent {
    match result {
        Ok(v) => AuditEvent::PolicyActivated {
            bundle: v.bundle.clone(),
            version: v.version.clone(),
            commit: v.commit.clone(),
            trigger: trigger.to_string(),
        },
        Err(e) => AuditEvent::PolicyRejected {
            commit: commit.to_string(),
            version: version.map(str::to_string),
            result: e.label().to_string(),
            reason: e.to_string(),
        },
    }
}
