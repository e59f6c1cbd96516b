//! The audit signing key: Ed25519, separate from the CA and token keys, PKCS#8 PEM on disk. It
//! signs checkpoints of the chain; its public half (SPKI PEM) is all an auditor needs to check
//! them. The key handling (PEM, key ids, verification) is the token module's Ed25519 key; only
//! the use differs. Promise: no key material ever reaches a `Debug` string; only the key id does.

use crate::token::{SigningKey, TokenError, VerifyingKey};

/// Why an audit key could not be made or loaded.
#[derive(Debug, thiserror::Error)]
#[error("audit key: {0}")]
pub struct KeyError(#[from] TokenError);

/// The private key that signs checkpoints.
#[derive(Debug)]
pub struct AuditKey {
    key: SigningKey,
    public: AuditPublicKey,
}

impl AuditKey {
    /// A fresh key, and its PKCS#8 PEM (`PRIVATE KEY`) for the caller to persist (0600).
    pub fn generate() -> Result<(AuditKey, String), KeyError> {
        let (key, pem) = SigningKey::generate()?;
        Ok((Self::from(key), pem))
    }

    /// Loads the first `PRIVATE KEY` section of a PEM document; it must be Ed25519.
    pub fn from_pkcs8_pem(pem: &str) -> Result<AuditKey, KeyError> {
        Ok(Self::from(SigningKey::from_pkcs8_pem(pem)?))
    }

    /// The public half.
    pub fn public(&self) -> &AuditPublicKey {
        &self.public
    }

    /// The Ed25519 signature over `message`.
    pub(super) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign_raw(message)
    }
}

impl From<SigningKey> for AuditKey {
    fn from(key: SigningKey) -> Self {
        let public = AuditPublicKey(key.verifying_key());
        Self { key, public }
    }
}

/// A public key checkpoints may be signed with.
#[derive(Debug, Clone)]
pub struct AuditPublicKey(VerifyingKey);

impl AuditPublicKey {
    /// `ed25519-` and the first 16 hex digits of the SHA-256 of the raw public key.
    pub fn key_id(&self) -> &str {
        self.0.kid()
    }

    /// Loads the first `PUBLIC KEY` (SPKI) section of a PEM document; it must be Ed25519.
    pub fn from_public_pem(pem: &str) -> Result<Self, KeyError> {
        Ok(Self(VerifyingKey::from_public_pem(pem)?))
    }

    /// The key as an SPKI `PUBLIC KEY` PEM, as [`AuditPublicKey::from_public_pem`] reads it.
    pub fn to_public_pem(&self) -> String {
        self.0.to_public_pem()
    }

    /// Whether `signature` is this key's Ed25519 signature over `message`.
    pub(super) fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        self.0.verifies(message, signature)
    }
}
