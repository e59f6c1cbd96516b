//! The node side: generate a key (it never leaves the node), build a CSR, fetch a challenge,
//! attest (token-only or `x509pop`), join, retry with capped exponential backoff and full
//! jitter honouring `Retry-After`, and write key, certificate and bundle atomically.

mod client;
mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::StatusCode;
use policy_sdk as sdk;
use rcgen::PublicKeyData;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

pub use client::{GatewayClient, Reply};

use crate::attest::{Evidence, X509Pop, pop_payload};
use crate::secrets;
use crate::wire::{Challenge, JoinRequest, JoinResponse, Problem};

/// A join could not complete.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad arguments or local files.
    #[error("{0}")]
    Usage(String),
    /// The gateway could not be reached or answered garbage.
    #[error("cannot reach the gateway: {0}")]
    Transport(String),
    /// The gateway refused, for a reason retrying will not fix. Boxed: the problem document
    /// is large, and every `Result` carrying this error would pay for it.
    #[error("the gateway refused at stage {} ({}, HTTP {}): {}", .0.stage, .0.reason, .0.status, .0.detail)]
    Refused(Box<Problem>),
    /// Retries ran out.
    #[error("gave up after {attempts} attempts; last error: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// Writing the files failed.
    #[error("writing {path}: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A device certificate and key for `x509pop`.
#[derive(Debug, Clone)]
pub struct Device {
    /// PEM chain, device certificate first.
    pub chain_pem: String,
    /// PKCS#8 PEM key (ECDSA P-256 or Ed25519).
    pub key_pem: String,
}

/// What `mesh bootstrap join` does.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The node's name.
    pub node_name: String,
    /// The bootstrap token.
    pub token: String,
    /// Posture claims to send.
    pub claims: BTreeMap<String, sdk::ClaimValue>,
    /// Device credentials for `x509pop`; token-only without.
    pub device: Option<Device>,
    /// Where to write `key.pem`, `cert.pem` and `bundle.pem`.
    pub out: PathBuf,
    /// Attempts before giving up on retryable failures.
    pub max_attempts: u32,
    /// Backoff bounds.
    pub backoff: Backoff,
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay bound.
    pub base: Duration,
    /// Largest delay.
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay before retry `attempt` (1-based): uniform in `[0, min(cap, base·2^(attempt-1))]`,
    /// or the server's `Retry-After` when it asked for longer. `unit` is a uniform sample in
    /// `[0, 1)`, injected so the schedule is testable.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(
                1u32.checked_shl(attempt.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(self.cap);
        let jittered = ceiling.mul_f64(unit.clamp(0.0, 1.0));
        match retry_after {
            Some(wait) => wait.min(self.cap).max(jittered),
            None => jittered,
        }
    }
}

/// The files a join wrote.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The gateway's answer.
    pub response: JoinResponse,
    /// `key.pem`.
    pub key: PathBuf,
    /// `cert.pem`.
    pub cert: PathBuf,
    /// `bundle.pem`.
    pub bundle: PathBuf,
}

/// Joins the mesh through `client`.
pub async fn join(client: &GatewayClient, options: &JoinOptions) -> Result<Joined, AgentError> {
    let key = rcgen::KeyPair::generate()
        .map_err(|e| AgentError::Usage(format!("generating a key: {e}")))?;
    let csr = csr(&key, &options.node_name)?;
    let csr_key = Sha256::digest(key.subject_public_key_info()).into();
    let idempotency_key = uuid::Uuid::new_v4().simple().to_string();
    let mut last = String::new();
    for attempt in 1..=options.max_attempts.max(1) {
        let outcome = attempt_join(client, options, &csr, &csr_key, &idempotency_key).await;
        let retry_after = match outcome {
            Ok(response) => return write_files(&options.out, &key, response),
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(why, after)) => {
                last = why;
                after
            }
        };
        if attempt < options.max_attempts {
            let delay = options.backoff.delay(attempt, retry_after, unit_sample());
            tracing::info!(attempt, ?delay, reason = %last, "join failed; retrying");
            // A deliberate backoff delay between attempts, not a wait for a condition.
            tokio::time::sleep(delay).await;
        }
    }
    Err(AgentError::GaveUp {
        attempts: options.max_attempts.max(1),
        last,
    })
}

enum Attempt {
    Retry(String, Option<Duration>),
    Fatal(AgentError),
}

async fn attempt_join(
    client: &GatewayClient,
    options: &JoinOptions,
    csr: &str,
    csr_key: &[u8; 32],
    idempotency_key: &str,
) -> Result<JoinResponse, Attempt> {
    let reply = client
        .get("/v1/bootstrap/challenge")
        .await
        .map_err(transient)?;
    if reply.status != StatusCode::OK {
        return Err(classify(&reply));
    }
    let challenge: Challenge = serde_json::from_slice(&reply.body)
        .map_err(|e| transient(AgentError::Transport(format!("challenge: {e}"))))?;
    let evidence = evidence(options, &challenge.nonce, csr_key).map_err(Attempt::Fatal)?;
    let request = JoinRequest {
        token: options.token.clone(),
        node_name: options.node_name.clone(),
        csr: csr.to_string(),
        idempotency_key: Some(idempotency_key.to_string()),
        attestation: serde_json::to_value(&evidence)
            .map_err(|e| Attempt::Fatal(AgentError::Usage(e.to_string())))?,
    };
    let body = serde_json::to_vec(&request)
        .map_err(|e| Attempt::Fatal(AgentError::Usage(e.to_string())))?;
    let reply = client
        .post("/v1/bootstrap/join", body)
        .await
        .map_err(transient)?;
    if reply.status != StatusCode::OK {
        return Err(classify(&reply));
    }
    serde_json::from_slice(&reply.body)
        .map_err(|e| transient(AgentError::Transport(format!("join response: {e}"))))
}

fn transient(e: AgentError) -> Attempt {
    Attempt::Retry(e.to_string(), None)
}

/// 429 and 5xx are worth retrying (honouring Retry-After); other refusals are final.
fn classify(reply: &Reply) -> Attempt {
    let problem: Problem = serde_json::from_slice(&reply.body).unwrap_or_else(|_| Problem {
        kind: String::new(),
        title: String::new(),
        status: reply.status.as_u16(),
        stage: "unknown".into(),
        reason: "unexpected-response".into(),
        detail: String::from_utf8_lossy(&reply.body)
            .chars()
            .take(200)
            .collect(),
        request_id: String::new(),
    });
    let retry_after = reply
        .headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs);
    if reply.status == StatusCode::TOO_MANY_REQUESTS || reply.status.is_server_error() {
        Attempt::Retry(
            format!("HTTP {}: {}", problem.status, problem.detail),
            retry_after,
        )
    } else {
        Attempt::Fatal(AgentError::Refused(Box::new(problem)))
    }
}

fn csr(key: &rcgen::KeyPair, node: &str) -> Result<String, AgentError> {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, node);
    params
        .serialize_request(key)
        .and_then(|r| r.pem())
        .map_err(|e| AgentError::Usage(format!("building the CSR: {e}")))
}

fn evidence(
    options: &JoinOptions,
    nonce: &str,
    csr_key: &[u8; 32],
) -> Result<Evidence, AgentError> {
    let issued_at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut evidence = Evidence {
        kind: sdk::AttestationKind::TokenOnly,
        nonce: nonce.to_string(),
        issued_at_ms,
        claims: options.claims.clone(),
        x509pop: None,
    };
    if let Some(device) = &options.device {
        evidence.kind = sdk::AttestationKind::X509pop;
        let payload = pop_payload(&evidence, &options.node_name, csr_key);
        let chain = CertificateDer::pem_slice_iter(device.chain_pem.as_bytes())
            .map(|c| c.map(|c| STANDARD.encode(c)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AgentError::Usage(format!("device certificate: {e}")))?;
        let signature = sign_with_device(&device.key_pem, &payload)?;
        evidence.x509pop = Some(X509Pop {
            chain,
            signature: STANDARD.encode(signature),
        });
    }
    Ok(evidence)
}

/// Signs with an ECDSA P-256 (ASN.1 signature) or Ed25519 PKCS#8 key.
pub fn sign_with_device(key_pem: &str, payload: &[u8]) -> Result<Vec<u8>, AgentError> {
    let der = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| AgentError::Usage(format!("device key: {e}")))?;
    let rng = SystemRandom::new();
    if let Ok(pair) = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        der.secret_pkcs8_der(),
    ) {
        return pair
            .sign(&rng, payload)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| AgentError::Usage("signing with the device key failed".into()));
    }
    let pair =
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der()).map_err(|_| {
            AgentError::Usage("the device key is neither ECDSA P-256 nor Ed25519".into())
        })?;
    Ok(pair.sign(payload).as_ref().to_vec())
}

fn write_files(
    out: &Path,
    key: &rcgen::KeyPair,
    response: JoinResponse,
) -> Result<Joined, AgentError> {
    let fail = |path: &Path, e: &dyn std::fmt::Display| AgentError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(out).map_err(|e| fail(out, &e))?;
    let (key_path, cert, bundle) = (
        out.join("key.pem"),
        out.join("cert.pem"),
        out.join("bundle.pem"),
    );
    // Key first: a cert on disk always has its key beside it.
    secrets::write(&key_path, key.serialize_pem().as_bytes()).map_err(|e| fail(&key_path, &e))?;
    secrets::write_file(&cert, response.certificate_chain.as_bytes(), 0o644)
        .map_err(|e| fail(&cert, &e))?;
    secrets::write_file(&bundle, response.bundle.as_bytes(), 0o644)
        .map_err(|e| fail(&bundle, &e))?;
    Ok(Joined {
        response,
        key: key_path,
        cert,
        bundle,
    })
}

fn unit_sample() -> f64 {
    let mut bytes = [0u8; 8];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_exponential_with_full_jitter() {
        let b = Backoff {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
        };
        assert_eq!(
            b.delay(1, None, 0.999_999),
            Duration::from_millis(500).mul_f64(0.999_999)
        );
        assert_eq!(b.delay(3, None, 1.0), Duration::from_secs(2));
        assert_eq!(b.delay(3, None, 0.0), Duration::ZERO);
        assert_eq!(b.delay(20, None, 1.0), Duration::from_secs(30));
        assert_eq!(b.delay(200, None, 1.0), Duration::from_secs(30));
    }

    #[test]
    fn retry_after_is_honoured_but_capped() {
        let b = Backoff::default();
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(7)), 0.1),
            Duration::from_secs(7)
        );
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(3600)), 0.1),
            Duration::from_secs(30)
        );
    }
}
