//! One renewal: a fresh P-256 key and CSR, `POST /v1/bootstrap/renew` over mTLS presenting the
//! SVID currently on disk, and the new SVID installed atomically. Transport failures, 429 and
//! 5xx are retried with backoff (honouring `Retry-After`) until the certificate runs out; an
//! expired certificate is never presented, and a final refusal (revoked, expired, unknown CA,
//! quarantined) ends with "re-join needed". Every attempt reads the files afresh and opens a
//! new connection, so it presents the newest certificate and rides out a gateway restart.

use std::path::PathBuf;
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::leaf::{Leaf, LeafError};
use crate::record::{AgentRecord, RecordError};
use crate::retry::{Attempt, Backoff, post_for_svid, unit_sample};
use crate::schedule::{self, Clock, Plan};
use crate::svid_dir::{SvidDir, SvidDirError, SvidFiles};
use crate::wire::{JoinResponse, Problem, RenewRequest};
use crate::{AgentError, GatewayClient};

/// How to renew.
#[derive(Debug, Clone)]
pub struct RenewOptions {
    /// The identity directory a join wrote.
    pub dir: SvidDir,
    /// Trust these CAs (PEM) for the gateway's TLS certificate instead of the current trust
    /// bundle (a gateway behind a certificate from another CA).
    pub ca_bundle: Option<Vec<u8>>,
    /// Backoff between attempts.
    pub backoff: Backoff,
    /// Attempts before giving up; `None`: until the certificate runs out.
    pub max_attempts: Option<u32>,
}

/// A renewal did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// The certificate ran out: only a new join can get an identity. Nothing was sent.
    #[error(
        "re-join needed: the certificate in {} expired at {}",
        .dir.display(),
        crate::cli::rfc3339(*.not_after)
    )]
    Expired {
        /// The identity directory.
        dir: PathBuf,
        /// When it expired, Unix seconds.
        not_after: u64,
    },
    /// The gateway refused for good (the identity is revoked, expired, quarantined, or its CA
    /// is no longer trusted).
    #[error(
        "re-join needed: the gateway refused the renewal at stage {} ({}, HTTP {}): {}",
        .0.stage, .0.reason, .0.status, .0.detail
    )]
    Refused(Box<Problem>),
    /// The identity directory cannot be read or written.
    #[error(transparent)]
    Files(#[from] SvidDirError),
    /// `agent.json` cannot be read or written.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The SVID on disk is unusable (unreadable, or not for the key beside it).
    #[error("the SVID in {}: {source}", .dir.display())]
    Current {
        /// The identity directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: LeafError,
    },
    /// The gateway's answer holds no certificate for the key sent.
    #[error("the gateway's certificate is unusable: {0}")]
    BadCertificate(#[source] LeafError),
    /// A key, CSR or client could not be built.
    #[error(transparent)]
    Setup(AgentError),
    /// Retries ran out.
    #[error("gave up after {attempts} attempts; last error: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
}

impl RenewError {
    /// Whether only a new join helps (the CLI exits with [`crate::cli::EXIT_REJOIN`]).
    pub fn needs_rejoin(&self) -> bool {
        matches!(self, Self::Expired { .. } | Self::Refused(_))
    }
}

/// The SVID on disk and its record.
#[derive(Debug, Clone)]
pub struct Current {
    /// Key, chain and bundle, from one version.
    pub files: SvidFiles,
    /// The certificate's facts.
    pub leaf: Leaf,
    /// `agent.json`.
    pub record: AgentRecord,
}

impl Current {
    /// Reads the current version of `dir`, checking that the certificate is for its key.
    pub fn load(dir: &SvidDir) -> Result<Self, RenewError> {
        let record = AgentRecord::load(dir.root())?;
        let files = dir.current()?;
        let leaf = Leaf::for_key(&files.chain_pem, &files.key_pem).map_err(|source| {
            RenewError::Current {
                dir: dir.root().to_path_buf(),
                source,
            }
        })?;
        Ok(Self {
            files,
            leaf,
            record,
        })
    }

    /// The gateway's `renew_after` for this certificate, if `agent.json` describes it.
    pub fn hint(&self) -> Option<SystemTime> {
        self.record.hint_for(&self.leaf)
    }

    fn expired(&self, dir: &SvidDir, now: SystemTime) -> Result<(), RenewError> {
        match self.leaf.expired(now) {
            true => Err(expired(dir, &self.leaf)),
            false => Ok(()),
        }
    }
}

/// The error for an SVID that ran out.
pub(crate) fn expired(dir: &SvidDir, leaf: &Leaf) -> RenewError {
    RenewError::Expired {
        dir: dir.root().to_path_buf(),
        not_after: leaf.not_after,
    }
}

/// Renews now: one key and CSR for the whole round (a retry after a lost answer gets the same
/// certificate back through the idempotency key), attempts until one succeeds, a refusal is
/// final, the attempts run out or the certificate expires.
pub async fn renew(options: &RenewOptions, clock: &dyn Clock) -> Result<JoinResponse, RenewError> {
    let dir = &options.dir;
    let first = Current::load(dir)?;
    first.expired(dir, clock.now())?;
    let (key, body) = request(&first.record.node_name).map_err(RenewError::Setup)?;
    let mut current = first;
    let mut last = String::new();
    let limit = options.max_attempts.unwrap_or(u32::MAX).max(1);
    for attempt in 1..=limit {
        let retry_after = match attempt_renew(&current, options, body.clone()).await {
            Ok(response) => return install(options, &current, &key, response),
            Err(Attempt::Fatal(AgentError::Refused(problem))) => {
                return Err(RenewError::Refused(problem));
            }
            Err(Attempt::Fatal(e)) => return Err(RenewError::Setup(e)),
            Err(Attempt::Retry(why, after)) => {
                last = why;
                after
            }
        };
        if attempt == limit {
            break;
        }
        let (validity, unit) = (current.leaf.validity(), unit_sample());
        let now = clock.now();
        match schedule::retry(options.backoff, attempt, retry_after, unit, validity, now) {
            Plan::Expired => return Err(expired(dir, &current.leaf)),
            Plan::Wait(delay) => {
                tracing::warn!(attempt, ?delay, reason = %last, "renewal failed; retrying");
                // A deliberate backoff delay between attempts, not a wait for a condition.
                tokio::time::sleep(delay).await;
            }
        }
        // The newest files: a re-join or a bundle refresh may have happened meanwhile.
        current = Current::load(dir)?;
        current.expired(dir, clock.now())?;
    }
    Err(RenewError::GaveUp {
        attempts: limit,
        last,
    })
}

/// A fresh P-256 key (it never leaves the node) and the renewal request for it, with the
/// idempotency key every attempt of this round sends.
fn request(node_name: &str) -> Result<(rcgen::KeyPair, Vec<u8>), AgentError> {
    let key = rcgen::KeyPair::generate()
        .map_err(|e| AgentError::Usage(format!("generating a key: {e}")))?;
    let request = RenewRequest {
        csr: crate::join::csr(&key, node_name)?,
        idempotency_key: Some(uuid::Uuid::new_v4().simple().to_string()),
    };
    let body = serde_json::to_vec(&request).map_err(|e| AgentError::Usage(e.to_string()))?;
    Ok((key, body))
}

/// One attempt over a fresh connection presenting the current SVID.
async fn attempt_renew(
    current: &Current,
    options: &RenewOptions,
    body: Vec<u8>,
) -> Result<JoinResponse, Attempt> {
    let trust = options
        .ca_bundle
        .as_deref()
        .unwrap_or(current.files.bundle_pem.as_bytes());
    let client = GatewayClient::new(&current.record.gateway, trust)
        .and_then(|client| {
            client.with_client_identity(
                current.files.chain_pem.as_bytes(),
                current.files.key_pem.as_bytes(),
            )
        })
        .map_err(Attempt::Fatal)?;
    post_for_svid(&client, "/v1/bootstrap/renew", body).await
}

/// Installs the new SVID (after checking it is for `key`) and its record.
fn install(
    options: &RenewOptions,
    current: &Current,
    key: &rcgen::KeyPair,
    response: JoinResponse,
) -> Result<JoinResponse, RenewError> {
    let key_pem = key.serialize_pem();
    let leaf =
        Leaf::for_key(&response.certificate_chain, &key_pem).map_err(RenewError::BadCertificate)?;
    // An answer without a bundle keeps the one we have rather than leave us trusting nothing.
    let bundle_pem = if holds_certificates(&response.bundle) {
        response.bundle.clone()
    } else {
        current.files.bundle_pem.clone()
    };
    options.dir.install(
        &leaf.serial,
        &SvidFiles {
            key_pem,
            chain_pem: response.certificate_chain.clone(),
            bundle_pem,
        },
    )?;
    let record = &current.record;
    AgentRecord::new(&record.gateway, &record.node_name, &response).store(options.dir.root())?;
    if response.spiffe_id != record.spiffe_id {
        tracing::warn!(
            was = %record.spiffe_id,
            now = %response.spiffe_id,
            "the renewed SVID carries another SPIFFE ID"
        );
    }
    Ok(response)
}

/// Whether `pem` holds at least one certificate and nothing malformed.
pub(crate) fn holds_certificates(pem: &str) -> bool {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    certs.is_ok_and(|certs| !certs.is_empty())
}

#[cfg(test)]
pub(crate) mod tests;
