//! CA rotation, staged: `prepare` publishes a new CA in the trust bundle, `activate` makes it
//! the signer (the old one stays in the bundle as `previous`), `retire` drops the old one. The
//! bundle holds at most two CAs: the active one and either the prepared next one or the
//! previous one. Every step bumps the bundle sequence.
//!
//! [`Rotation`] holds the current [`CaSet`] (what requests read, swapped whole) and the durable
//! state behind a lock that serialises changes. A change is staged in three moves so that the
//! caller can audit it in between: plan it ([`Change::prepare`], [`Change::activate`],
//! [`Change::retire`]), [`Change::commit`] it to `rotation.json`, then
//! [`Committed::install`] it in memory — or [`Committed::undo`] it when the audit entry could
//! not be written. What must hold before a step (no live leaf of a retiring CA, the serving
//! certificate) is the caller's to check: it needs the store and the listener.

mod file;

use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use self::file::{Durable, Paths, entry_for};
use super::config::IdentityConfig;
use super::error::IdentityError;
use super::trust::{CaSet, CaState, TrustedCa};
use super::{Ca, TrustDomain};
use crate::secrets::{self, SecretError};

#[cfg(test)]
mod tests;

/// A rotation step was refused, or its state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// A CA, key or state file could not be read or written, or is open to others.
    #[error(transparent)]
    Files(#[from] SecretError),
    /// `rotation.json` is not the JSON this gateway writes.
    #[error("{path}: {source}")]
    Parse {
        /// The state file.
        path: PathBuf,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// `rotation.json` contradicts itself or the files it names.
    #[error("{path}: inconsistent CA rotation state: {problem}")]
    Inconsistent {
        /// The state file.
        path: PathBuf,
        /// What does not hold.
        problem: String,
    },
    /// A CA named by the rotation state does not load.
    #[error("{path}: {source}")]
    Ca {
        /// The CA certificate file.
        path: PathBuf,
        /// Why it does not load.
        #[source]
        source: IdentityError,
    },
    /// A new CA or certificate could not be made.
    #[error("{0}")]
    Identity(#[from] IdentityError),
    /// `prepare` while a prepared CA waits for activation.
    #[error("CA {fingerprint} is already prepared; activate it first")]
    AlreadyPrepared {
        /// The prepared CA.
        fingerprint: String,
    },
    /// `prepare` while the previous CA is still in the bundle.
    #[error("the previous CA {fingerprint} is still in the bundle; retire it first")]
    PreviousNotRetired {
        /// The previous CA.
        fingerprint: String,
    },
    /// `activate` without a prepared CA.
    #[error("no CA is prepared; run `ca prepare` first")]
    NothingPrepared,
    /// `retire` without a previous CA.
    #[error("no previous CA is in the bundle; there is nothing to retire")]
    NothingToRetire,
    /// `retire` while a certificate the retiring CA issued is still live (without `force`).
    #[error(
        "CA {fingerprint} still has live certificates, the last expiring at {until} \
         (Unix seconds); retire it after that, or force it"
    )]
    LeavesAlive {
        /// The retiring CA.
        fingerprint: String,
        /// The latest notAfter among its unrevoked, unexpired certificates.
        until: u64,
    },
    /// `retire` while the gateway's serving certificate chains only to the retiring CA: nodes
    /// holding the new bundle could no longer reach the gateway.
    #[error("the gateway's serving certificate chains only to CA {fingerprint}")]
    ServingCertificate {
        /// The retiring CA.
        fingerprint: String,
    },
}

impl RotationError {
    /// A stable kebab-case code for API errors.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Files(_) | Self::Parse { .. } | Self::Inconsistent { .. } | Self::Ca { .. } => {
                "ca-state"
            }
            Self::Identity(e) => e.reason(),
            Self::AlreadyPrepared { .. } => "ca-already-prepared",
            Self::PreviousNotRetired { .. } => "ca-previous-not-retired",
            Self::NothingPrepared => "ca-nothing-prepared",
            Self::NothingToRetire => "ca-nothing-to-retire",
            Self::LeavesAlive { .. } => "ca-leaves-alive",
            Self::ServingCertificate { .. } => "ca-serving-certificate",
        }
    }

    /// Whether the step was refused by the rotation's rules (as opposed to failing).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::AlreadyPrepared { .. }
                | Self::PreviousNotRetired { .. }
                | Self::NothingPrepared
                | Self::NothingToRetire
                | Self::LeavesAlive { .. }
                | Self::ServingCertificate { .. }
        )
    }
}

/// The rotation as an operator sees it (`GET /admin/v1/ca`, `omnirelay ca status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaStatus {
    /// The SPIFFE bundle sequence.
    pub sequence: u64,
    /// Every CA of the rotation, retired ones included, oldest first.
    pub cas: Vec<CaStatusEntry>,
}

/// One CA in a [`CaStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaStatusEntry {
    /// SHA-256 of the CA certificate, hex.
    pub fingerprint: String,
    /// Its state.
    pub state: CaState,
    /// Its notAfter, Unix seconds.
    pub not_after: u64,
    /// Whether the gateway's serving certificate chains to it.
    pub serving: bool,
}

/// What an operator asks of a rotation step (`POST /admin/v1/ca/{prepare,activate,retire}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationRequest {
    /// Who asks (audited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// `retire` only: retire although certificates it issued are still live.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// `prepare` only: the new CA's lifetime; by default the active CA's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validity_seconds: Option<u64>,
}

/// The CA set in force and the durable rotation state behind it.
#[derive(Debug)]
pub struct Rotation {
    paths: Paths,
    refresh_hint: Duration,
    current: RwLock<Arc<CaSet>>,
    durable: tokio::sync::Mutex<Durable>,
}

impl Rotation {
    /// Loads the configured CA and, when there is one, `rotation.json` with the CAs it names.
    /// A state file that is open to others, malformed, or inconsistent with the files it
    /// names (a fingerprint that differs, a key that does not match) is refused.
    pub fn load(config: &IdentityConfig) -> Result<Self, RotationError> {
        let paths = Paths::new(config);
        let durable = Durable::load(&paths)?;
        let set = set_of(&durable, config.bundle_refresh_hint).ok_or_else(|| {
            RotationError::Inconsistent {
                path: paths.state.clone(),
                problem: "no CA to sign with".into(),
            }
        })?;
        Ok(Self {
            paths,
            refresh_hint: config.bundle_refresh_hint,
            current: RwLock::new(Arc::new(set)),
            durable: tokio::sync::Mutex::new(durable),
        })
    }

    /// The CA set in force.
    pub fn current(&self) -> Arc<CaSet> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Starts a change; changes wait for each other.
    pub async fn begin(&self) -> Change<'_> {
        Change {
            rotation: self,
            durable: self.durable.lock().await,
        }
    }
}

/// A change in progress: holds the rotation's lock until committed and installed, or dropped.
#[derive(Debug)]
pub struct Change<'a> {
    rotation: &'a Rotation,
    durable: tokio::sync::MutexGuard<'a, Durable>,
}

/// A planned step: the state and the set it leads to, and the CAs it concerns.
#[derive(Debug)]
pub struct Plan {
    durable: Durable,
    set: Arc<CaSet>,
    /// The CA the step is about: prepared, activated or retired.
    pub subject: Arc<Ca>,
    /// For `activate`, the CA that signed until now.
    pub replaced: Option<Arc<Ca>>,
    /// Whether `subject` is the CA configured under `[identity]` (which issued every
    /// identity recorded before issuers were).
    pub subject_is_configured: bool,
}

impl Plan {
    /// The set the step leads to.
    pub fn set(&self) -> &Arc<CaSet> {
        &self.set
    }
}

impl<'a> Change<'a> {
    /// Every CA of the rotation with its state; `serving` is the gateway's serving
    /// certificate (DER), to mark the CA it chains to.
    pub fn status(&self, serving: &[u8]) -> CaStatus {
        let now = SystemTime::now();
        let cas = self
            .durable
            .file
            .cas
            .iter()
            .zip(&self.durable.loaded)
            .map(|(entry, ca)| CaStatusEntry {
                fingerprint: entry.fingerprint.clone(),
                state: entry.state,
                not_after: entry.not_after,
                serving: ca
                    .as_ref()
                    .is_some_and(|ca| super::trust::issued_by(ca, serving, now)),
            })
            .collect();
        CaStatus {
            sequence: self.durable.file.sequence,
            cas,
        }
    }

    /// Plans `prepare`: generates the next CA (for `validity`, by default the active CA's
    /// lifetime) and writes its files (key 0600); it joins the bundle once committed.
    pub fn prepare(
        &self,
        trust_domain: &TrustDomain,
        validity: Option<Duration>,
        now: SystemTime,
    ) -> Result<Plan, RotationError> {
        let d = &*self.durable;
        if let Some(entry) = d.file.cas.iter().find(|e| e.state == CaState::Prepared) {
            return Err(RotationError::AlreadyPrepared {
                fingerprint: entry.fingerprint.clone(),
            });
        }
        if let Some(entry) = d.file.cas.iter().find(|e| e.state == CaState::Previous) {
            return Err(RotationError::PreviousNotRetired {
                fingerprint: entry.fingerprint.clone(),
            });
        }
        let active = self.rotation.current().active().clone();
        let lifetime = active
            .not_after()
            .duration_since(active.not_before())
            .unwrap_or(Duration::ZERO);
        let name = format!("OmniRelay bootstrap CA {}", d.file.cas.len() + 1);
        let (cert_pem, key_pem) =
            Ca::generate_named(trust_domain, &name, validity.unwrap_or(lifetime), now)?;
        let ca = Ca::load(&cert_pem, &key_pem)?;
        let stem = format!("ca-{}", &ca.fingerprint()[..16]);
        let files = (format!("{stem}.pem"), format!("{stem}.key"));
        file::create_dir(&self.rotation.paths.dir)?;
        secrets::write(&self.rotation.paths.dir.join(&files.1), key_pem.as_bytes())?;
        secrets::write_file(
            &self.rotation.paths.dir.join(&files.0),
            cert_pem.as_bytes(),
            0o644,
        )?;
        let ca = Arc::new(ca);
        let mut next = d.clone();
        next.file
            .cas
            .push(entry_for(&ca, CaState::Prepared, Some(files)));
        next.loaded.push(Some(ca.clone()));
        self.plan(next, ca, None)
    }

    /// Plans `activate`: the prepared CA signs, the active one becomes the previous one.
    pub fn activate(&self) -> Result<Plan, RotationError> {
        let mut next = self.durable.clone();
        let prepared = index(&next, CaState::Prepared).ok_or(RotationError::NothingPrepared)?;
        let active = index(&next, CaState::Active).ok_or(RotationError::NothingPrepared)?;
        next.file.cas[active].state = CaState::Previous;
        next.file.cas[prepared].state = CaState::Active;
        let subject = self.loaded(&next, prepared)?;
        let replaced = self.loaded(&next, active)?;
        self.plan(next, subject, Some(replaced))
    }

    /// Plans `retire`: the previous CA leaves the bundle.
    pub fn retire(&self) -> Result<Plan, RotationError> {
        let mut next = self.durable.clone();
        let previous = index(&next, CaState::Previous).ok_or(RotationError::NothingToRetire)?;
        let subject = self.loaded(&next, previous)?;
        next.file.cas[previous].state = CaState::Retired;
        next.loaded[previous] = None;
        self.plan(next, subject, None)
    }

    /// The loaded CA of entry `i` of `durable` (every CA in the bundle is loaded).
    fn loaded(&self, durable: &Durable, i: usize) -> Result<Arc<Ca>, RotationError> {
        durable
            .loaded
            .get(i)
            .cloned()
            .flatten()
            .ok_or_else(|| RotationError::Inconsistent {
                path: self.rotation.paths.state.clone(),
                problem: format!("CA {i} of the bundle is not loaded"),
            })
    }

    fn plan(
        &self,
        mut next: Durable,
        subject: Arc<Ca>,
        replaced: Option<Arc<Ca>>,
    ) -> Result<Plan, RotationError> {
        next.file.sequence = self.durable.file.sequence.saturating_add(1);
        next.on_disk = true;
        let subject_is_configured = next
            .file
            .cas
            .iter()
            .any(|e| e.is_configured() && e.fingerprint == subject.fingerprint());
        let set = set_of(&next, self.rotation.refresh_hint).ok_or_else(|| {
            RotationError::Inconsistent {
                path: self.rotation.paths.state.clone(),
                problem: "the step would leave no CA to sign with".into(),
            }
        })?;
        Ok(Plan {
            durable: next,
            set: Arc::new(set),
            subject,
            replaced,
            subject_is_configured,
        })
    }

    /// Writes `plan`'s state to `rotation.json`; the set in force is unchanged until
    /// [`Committed::install`].
    pub fn commit(self, plan: Plan) -> Result<Committed<'a>, RotationError> {
        plan.durable.save(&self.rotation.paths)?;
        Ok(Committed { change: self, plan })
    }
}

/// A change written to disk but not yet in force.
#[derive(Debug)]
pub struct Committed<'a> {
    change: Change<'a>,
    plan: Plan,
}

impl Committed<'_> {
    /// Puts the new set in force and returns it.
    pub fn install(mut self) -> Arc<CaSet> {
        let rotation = self.change.rotation;
        *rotation
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = self.plan.set.clone();
        *self.change.durable = self.plan.durable;
        self.plan.set
    }

    /// Writes the state from before the change back (a gateway that never rotated gets its
    /// state file removed again); the set in force never changed.
    pub fn undo(self) -> Result<(), RotationError> {
        let before = &*self.change.durable;
        let paths = &self.change.rotation.paths;
        if before.on_disk {
            return before.save(paths);
        }
        std::fs::remove_file(&paths.state).map_err(|source| {
            RotationError::Files(SecretError::Io {
                path: paths.state.clone(),
                source,
            })
        })
    }
}

/// The trust bundle (PEM) a client of this gateway should hold, read without any private key:
/// every CA the rotation keeps in the bundle, or the configured CA when it never rotated.
pub fn trust_bundle(config: &IdentityConfig) -> Result<Vec<u8>, RotationError> {
    let paths = Paths::new(config);
    let read = |path: PathBuf| {
        std::fs::read(&path)
            .map_err(|source| RotationError::Files(SecretError::Io { path, source }))
    };
    let Some(bytes) = secrets::read_state(&paths.state)? else {
        return read(paths.configured_cert.clone());
    };
    let state: file::StateFile =
        serde_json::from_slice(&bytes).map_err(|source| RotationError::Parse {
            path: paths.state.clone(),
            source,
        })?;
    let mut bundle = Vec::new();
    for entry in state.cas.iter().filter(|e| e.state != CaState::Retired) {
        bundle.extend(read(paths.of(entry).0)?);
    }
    Ok(bundle)
}

/// Where the rotation state file of `config` is (it need not exist).
pub fn rotation_state_file(config: &IdentityConfig) -> PathBuf {
    Paths::new(config).state
}

/// The CA set of a state: its CAs in the bundle, in order.
fn set_of(durable: &Durable, refresh_hint: Duration) -> Option<CaSet> {
    let cas = durable
        .file
        .cas
        .iter()
        .zip(&durable.loaded)
        .filter(|(entry, _)| entry.state != CaState::Retired)
        .map(|(entry, ca)| {
            ca.clone().map(|ca| TrustedCa {
                ca,
                state: entry.state,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    CaSet::new(cas, durable.file.sequence, refresh_hint)
}

fn index(durable: &Durable, state: CaState) -> Option<usize> {
    durable.file.cas.iter().position(|e| e.state == state)
}
