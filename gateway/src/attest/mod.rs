//! Attestation: challenge nonces, evidence freshness and replay, and `x509pop` proof of
//! possession of a device certificate. Promises: a nonce is authentic (issued by a gateway
//! holding the same key), unexpired and used by one join only; the policy sees claims the
//! gateway verified apart from those the node merely reported.

mod nonce;
mod x509pop;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use policy_sdk as sdk;

pub use nonce::{Challenge, Challenges};
/// The evidence's wire format is the node's: the agent builds it, this module checks it.
pub use omnirelay_agent::evidence::{Evidence, X509Pop, pop_payload};
use x509pop::DEVICE_CLAIMS;
pub use x509pop::DeviceRoots;

#[cfg(test)]
mod tests;

/// The `[attestation]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestConfig {
    /// How long a challenge nonce stays valid. Default 5 min.
    pub nonce_ttl: Duration,
    /// Oldest evidence accepted. Default 5 min.
    pub max_evidence_age: Duration,
    /// Evidence stamped this far in our future is still accepted. Default 30 s.
    pub max_clock_skew: Duration,
    /// PEM files of the CAs that issue device certificates (for `x509pop`).
    pub device_cas: Vec<PathBuf>,
}

impl Default for AttestConfig {
    fn default() -> Self {
        Self {
            nonce_ttl: Duration::from_secs(300),
            max_evidence_age: Duration::from_secs(300),
            max_clock_skew: Duration::from_secs(30),
            device_cas: Vec::new(),
        }
    }
}

/// Evidence that passed every check, shaped for the policy.
#[derive(Debug, Clone)]
pub struct Checked {
    /// What the policy sees.
    pub attestation: sdk::Attestation,
    /// The nonce, to be consumed for good in the final transaction.
    pub nonce: String,
    /// When the nonce expires, Unix seconds.
    pub nonce_expires_at: u64,
}

/// Why evidence was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    /// The nonce was not issued by this gateway (or was altered).
    #[error("the nonce was not issued by this gateway")]
    InvalidNonce,
    /// The nonce's validity ended.
    #[error("the nonce expired; request a new challenge")]
    NonceExpired,
    /// The nonce was already used by a join.
    #[error("the nonce was already used")]
    Replayed,
    /// The evidence is older than the freshness window.
    #[error("evidence is {age_secs} s old; at most {max_secs} s accepted")]
    Stale {
        /// Its age.
        age_secs: u64,
        /// The window.
        max_secs: u64,
    },
    /// The evidence is stamped in the future.
    #[error("evidence is stamped {ahead_ms} ms in the future")]
    FromFuture {
        /// How far ahead.
        ahead_ms: u64,
    },
    /// Too many or too large claims.
    #[error("claims: {0}")]
    Claims(&'static str),
    /// `x509pop` without its proof, or a proof with another kind.
    #[error("x509pop proof {0}")]
    ProofMismatch(&'static str),
    /// No device CA is configured, so `x509pop` cannot be checked.
    #[error("this gateway has no device CA configured for x509pop")]
    NoDeviceCa,
    /// The device certificate chain is malformed or does not chain to a device CA.
    #[error("device certificate not trusted: {0}")]
    UntrustedDevice(String),
    /// The proof's signature does not verify under the device certificate's key.
    #[error("x509pop signature does not verify")]
    BadSignature,
    /// Under x509pop the node's name is its device certificate's: the request named another.
    #[error("the node name must be the device certificate's common name, {device:?}")]
    NotThisDevice {
        /// The verified device identity (the certificate's common name, bounded).
        device: String,
    },
}

impl AttestError {
    /// A stable reason code for problem responses, audit and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidNonce => "invalid-nonce",
            Self::NonceExpired => "nonce-expired",
            Self::Replayed => "nonce-replayed",
            Self::Stale { .. } => "evidence-stale",
            Self::FromFuture { .. } => "evidence-from-future",
            Self::Claims(_) => "bad-claims",
            Self::ProofMismatch(_) => "proof-mismatch",
            Self::NoDeviceCa => "no-device-ca",
            Self::UntrustedDevice(_) => "untrusted-device",
            Self::BadSignature => "bad-signature",
            Self::NotThisDevice { .. } => "node-not-device",
        }
    }
}

/// A device proves one identity: the node name it joins under must be its certificate's common
/// name (the verified `device-id`), so one device key cannot mint identities for other nodes.
fn bind_node_to_device(node: &str, device: &[sdk::Claim]) -> Result<(), AttestError> {
    let id = device.iter().find_map(|c| match (&*c.name, &c.value) {
        ("device-id", sdk::ClaimValue::Text(id)) => Some(id.as_str()),
        _ => None,
    });
    match id {
        Some(id) if id == node => Ok(()),
        other => Err(AttestError::NotThisDevice {
            device: other.unwrap_or_default().chars().take(64).collect(),
        }),
    }
}

const MAX_CLAIMS: usize = 32;
const MAX_CLAIM_NAME: usize = 64;
const MAX_CLAIM_TEXT: usize = 256;

/// Checks evidence. One per process.
#[derive(Debug)]
pub struct Attestor {
    challenges: Challenges,
    roots: DeviceRoots,
    /// Nonces consumed on this replica (the store knows those of every replica).
    seen: moka::sync::Cache<String, ()>,
    config: AttestConfig,
}

impl Attestor {
    /// An attestor issuing nonces under `nonce_key` and trusting `roots` for `x509pop`.
    pub fn new(config: AttestConfig, nonce_key: &[u8], roots: DeviceRoots) -> Self {
        Self {
            challenges: Challenges::new(nonce_key, config.nonce_ttl),
            roots,
            seen: moka::sync::Cache::builder()
                .max_capacity(4_000_000)
                .time_to_live(config.nonce_ttl + config.max_clock_skew)
                .build(),
            config,
        }
    }

    /// A fresh challenge.
    pub fn challenge(&self, now_ms: u64) -> Challenge {
        self.challenges.issue(now_ms)
    }

    /// Checks evidence for `node`, whose CSR key hashes to `csr_key`. Marks the nonce used on
    /// this replica; the final transaction marks it for every replica.
    pub fn check(
        &self,
        evidence: &Evidence,
        node: &str,
        csr_key: &[u8; 32],
        now_ms: u64,
    ) -> Result<Checked, AttestError> {
        let nonce_expires_at = self.challenges.verify(&evidence.nonce, now_ms)?;
        if self.seen.contains_key(&evidence.nonce) {
            return Err(AttestError::Replayed);
        }
        self.fresh(evidence.issued_at_ms, now_ms)?;
        check_claims(&evidence.claims)?;
        let claims = to_claims(&evidence.claims);
        let (verified, self_reported) = match (evidence.kind, &evidence.x509pop) {
            (sdk::AttestationKind::TokenOnly, None) => (Vec::new(), claims),
            (sdk::AttestationKind::TokenOnly, Some(_)) => {
                return Err(AttestError::ProofMismatch("given with kind token-only"));
            }
            (sdk::AttestationKind::X509pop, None) => {
                return Err(AttestError::ProofMismatch("missing"));
            }
            (sdk::AttestationKind::X509pop, Some(pop)) => {
                // These names are the certificate's to fill. The node's signed claims go into
                // `verified` beside them, so a claim of the same name would let a device choose
                // the identity a policy reads (whichever of the two it looks at).
                if evidence
                    .claims
                    .keys()
                    .any(|name| DEVICE_CLAIMS.contains(&name.as_str()))
                {
                    return Err(AttestError::Claims(
                        "device-id and device-serial come from the device certificate",
                    ));
                }
                let payload = pop_payload(evidence, node, csr_key);
                let mut device = self.roots.verify(pop, &payload, now_ms / 1000)?;
                bind_node_to_device(node, &device)?;
                device.extend(claims);
                (device, Vec::new())
            }
        };
        // Marked last, so that refused evidence does not burn its nonce; the entry API settles
        // a race between two joins presenting the same nonce at once.
        if !self
            .seen
            .entry(evidence.nonce.clone())
            .or_insert(())
            .is_fresh()
        {
            return Err(AttestError::Replayed);
        }
        Ok(Checked {
            attestation: sdk::Attestation {
                kind: evidence.kind,
                verified,
                self_reported,
                issued_at_ms: evidence.issued_at_ms,
            },
            nonce: evidence.nonce.clone(),
            nonce_expires_at,
        })
    }

    fn fresh(&self, issued_at_ms: u64, now_ms: u64) -> Result<(), AttestError> {
        let skew = self.config.max_clock_skew.as_millis() as u64;
        if issued_at_ms > now_ms.saturating_add(skew) {
            return Err(AttestError::FromFuture {
                ahead_ms: issued_at_ms - now_ms,
            });
        }
        let age_ms = now_ms.saturating_sub(issued_at_ms);
        let max = self.config.max_evidence_age;
        if u128::from(age_ms) > max.as_millis() {
            return Err(AttestError::Stale {
                age_secs: age_ms / 1000,
                max_secs: max.as_secs(),
            });
        }
        Ok(())
    }
}

fn check_claims(claims: &BTreeMap<String, sdk::ClaimValue>) -> Result<(), AttestError> {
    if claims.len() > MAX_CLAIMS {
        return Err(AttestError::Claims("more than 32 claims"));
    }
    for (name, value) in claims {
        if name.is_empty() || name.len() > MAX_CLAIM_NAME {
            return Err(AttestError::Claims(
                "a claim name is empty or longer than 64 bytes",
            ));
        }
        if matches!(value, sdk::ClaimValue::Text(t) if t.len() > MAX_CLAIM_TEXT) {
            return Err(AttestError::Claims(
                "a claim value is longer than 256 bytes",
            ));
        }
    }
    Ok(())
}

fn to_claims(claims: &BTreeMap<String, sdk::ClaimValue>) -> Vec<sdk::Claim> {
    claims
        .iter()
        .map(|(name, value)| sdk::Claim {
            name: name.clone(),
            value: value.clone(),
        })
        .collect()
}
