//! Joining the mesh: generate a key (it never leaves the node), build a CSR, fetch a
//! challenge, attest (token-only or `x509pop`), join with an idempotency key, retry with capped
//! exponential backoff and full jitter honouring `Retry-After`, and install key, certificate and
//! bundle atomically in the identity directory beside `agent.json` (what renewal needs).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::StatusCode;
use policy_sdk as sdk;
use rcgen::PublicKeyData;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use crate::evidence::{Evidence, X509Pop, pop_payload};
use crate::leaf::Leaf;
use crate::record::AgentRecord;
use crate::retry::{Attempt, Backoff, classify, post_for_svid, transient, unit_sample};
use crate::svid_dir::{BUNDLE, CERT, KEY, SvidDir, SvidFiles};
use crate::wire::{Challenge, JoinRequest, JoinResponse};
use crate::{AgentError, GatewayClient};

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
    /// The identity directory: `key.pem`, `cert.pem`, `bundle.pem` (see [`crate::svid_dir`])
    /// and `agent.json`.
    pub out: PathBuf,
    /// Attempts before giving up on retryable failures.
    pub max_attempts: u32,
    /// Backoff bounds.
    pub backoff: Backoff,
}

/// The files a join wrote (the stable links).
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
            Ok(response) => return install(client, options, &key, response),
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
    post_for_svid(client, "/v1/bootstrap/join", body).await
}

pub(crate) fn csr(key: &rcgen::KeyPair, node: &str) -> Result<String, AgentError> {
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

/// Installs the SVID (after checking it is for `key`) and records what renewal needs.
fn install(
    client: &GatewayClient,
    options: &JoinOptions,
    key: &rcgen::KeyPair,
    response: JoinResponse,
) -> Result<Joined, AgentError> {
    let key_pem = key.serialize_pem();
    let leaf =
        Leaf::for_key(&response.certificate_chain, &key_pem).map_err(AgentError::BadCertificate)?;
    let dir = SvidDir::new(&options.out);
    dir.install(
        &leaf.serial,
        &SvidFiles {
            key_pem,
            chain_pem: response.certificate_chain.clone(),
            bundle_pem: response.bundle.clone(),
        },
    )?;
    AgentRecord::new(client.url(), &options.node_name, &response).store(&options.out)?;
    Ok(Joined {
        response,
        key: dir.link(KEY),
        cert: dir.link(CERT),
        bundle: dir.link(BUNDLE),
    })
}
