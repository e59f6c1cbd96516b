//! The audit signing key: Ed25519, separate from the CA and token keys, PKCS#8 PEM on disk. It
//! signs checkpoints of the chain; its public half (SPKI PEM) is all an auditor needs to check
//! them. Promise: no key material ever reaches a `Debug` string; only the key id does.

use std::fmt;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, ParsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};
use sha2::{Digest, Sha256};

/// The DER prefix of every Ed25519 `SubjectPublicKeyInfo` (RFC 8410 §4), before the raw key.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The length of a raw Ed25519 public key.
const RAW_LEN: usize = 32;

/// Why an audit key could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The system random generator failed while generating a key.
    #[error("cannot generate an audit key")]
    Generate,
    /// The PEM has no section of the expected kind.
    #[error("no {what} in the PEM")]
    Pem {
        /// `private key` or `public key`.
        what: &'static str,
        /// The PEM parser's complaint.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The key is not an Ed25519 key aws-lc accepts.
    #[error("not an Ed25519 key: {0}")]
    Rejected(aws_lc_rs::error::KeyRejected),
    /// A public key that is not Ed25519.
    #[error("the public key is not Ed25519")]
    NotEd25519,
}

/// The private key that signs checkpoints.
pub struct AuditKey {
    pair: Ed25519KeyPair,
    public: AuditPublicKey,
}

impl AuditKey {
    /// A fresh key, and its PKCS#8 PEM (`PRIVATE KEY`) for the caller to persist (0600).
    pub fn generate() -> Result<(AuditKey, String), KeyError> {
        let pkcs8 =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Generate)?;
        let key = Self::from_pkcs8_der(pkcs8.as_ref())?;
        Ok((key, pem_encode("PRIVATE KEY", pkcs8.as_ref())))
    }

    /// Loads the first `PRIVATE KEY` section of a PEM document; it must be Ed25519.
    pub fn from_pkcs8_pem(pem: &str) -> Result<AuditKey, KeyError> {
        let der =
            PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| KeyError::Pem {
                what: "private key",
                source,
            })?;
        Self::from_pkcs8_der(der.secret_pkcs8_der())
    }

    fn from_pkcs8_der(der: &[u8]) -> Result<AuditKey, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(der).map_err(KeyError::Rejected)?;
        let public = AuditPublicKey::from_raw(pair.public_key().as_ref())?;
        Ok(Self { pair, public })
    }

    /// The public half.
    pub fn public(&self) -> &AuditPublicKey {
        &self.public
    }

    /// The Ed25519 signature over `message`.
    pub(super) fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut signature = [0; 64];
        signature.copy_from_slice(self.pair.sign(message).as_ref());
        signature
    }
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKey")
            .field("key_id", &self.public.key_id())
            .finish_non_exhaustive()
    }
}

/// A public key checkpoints may be signed with.
#[derive(Clone)]
pub struct AuditPublicKey {
    key_id: String,
    raw: [u8; RAW_LEN],
    parsed: ParsedPublicKey,
}

impl AuditPublicKey {
    /// `ed25519-` and the first 16 hex digits of the SHA-256 of the raw public key.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Loads the first `PUBLIC KEY` (SPKI) section of a PEM document; it must be Ed25519.
    pub fn from_public_pem(pem: &str) -> Result<Self, KeyError> {
        let der = SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes()).map_err(|source| {
            KeyError::Pem {
                what: "public key",
                source,
            }
        })?;
        let raw = der
            .strip_prefix(SPKI_PREFIX.as_slice())
            .filter(|raw| raw.len() == RAW_LEN)
            .ok_or(KeyError::NotEd25519)?;
        Self::from_raw(raw)
    }

    /// The key as an SPKI `PUBLIC KEY` PEM, as [`AuditPublicKey::from_public_pem`] reads it.
    pub fn to_public_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.raw);
        pem_encode("PUBLIC KEY", &der)
    }

    fn from_raw(raw: &[u8]) -> Result<Self, KeyError> {
        let raw: [u8; RAW_LEN] = raw.try_into().map_err(|_| KeyError::NotEd25519)?;
        let parsed = ParsedPublicKey::new(&ED25519, raw).map_err(KeyError::Rejected)?;
        let digest = hex::encode(Sha256::digest(raw));
        let key_id = format!("ed25519-{}", digest.get(..16).unwrap_or(&digest));
        Ok(Self {
            key_id,
            raw,
            parsed,
        })
    }

    /// Whether `signature` is this key's Ed25519 signature over `message`.
    pub(super) fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        self.parsed.verify_sig(message, signature).is_ok()
    }
}

impl fmt::Debug for AuditPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditPublicKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// RFC 7468 PEM: base64 in 64-character lines between BEGIN and END labels.
fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    // Base64 is ASCII, so every 64-byte chunk is valid UTF-8.
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}
