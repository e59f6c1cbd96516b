//! Ed25519 token keys: the issuer's signing key (PKCS#8 PEM on disk) and the verifying keys a
//! gateway trusts (SPKI PEM), each named by a `kid` derived from the public key itself.
//!
//! Promise: no key material ever reaches a `Debug` string; only the `kid` does.

use std::fmt;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, ParsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{Claims, TokenError};

/// The DER prefix of every Ed25519 `SubjectPublicKeyInfo` (RFC 8410 §4): SEQUENCE, algorithm
/// `1.3.101.112` with no parameters, BIT STRING of 33 bytes (no unused bits), then the raw key.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The length of a raw Ed25519 public key.
const RAW_LEN: usize = 32;

/// The issuer's key. Signs tokens; never leaves the process except as the PEM it was loaded from.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    public: VerifyingKey,
}

impl SigningKey {
    /// A fresh key, and its PKCS#8 PEM (`PRIVATE KEY`) for the caller to persist.
    pub fn generate() -> Result<(SigningKey, String), TokenError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(TokenError::KeyGeneration)?;
        let key = Self::from_pkcs8_der(pkcs8.as_ref())?;
        Ok((key, pem_encode("PRIVATE KEY", pkcs8.as_ref())))
    }

    /// Loads the first `PRIVATE KEY` section of a PEM document; it must be Ed25519.
    pub fn from_pkcs8_pem(pem: &str) -> Result<SigningKey, TokenError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| {
            TokenError::KeyPem {
                what: "private key",
                source,
            }
        })?;
        Self::from_pkcs8_der(der.secret_pkcs8_der())
    }

    fn from_pkcs8_der(der: &[u8]) -> Result<SigningKey, TokenError> {
        let pair = Ed25519KeyPair::from_pkcs8(der).map_err(TokenError::KeyRejected)?;
        let public = VerifyingKey::from_raw(pair.public_key().as_ref())?;
        Ok(Self { pair, public })
    }

    /// The key id tokens signed by this key carry in their header.
    pub fn kid(&self) -> &str {
        self.public.kid()
    }

    /// The public half, for a [`Verifier`](super::Verifier) or for publishing.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.public.clone()
    }

    /// Signs `claims` as a compact JWS: header `{"alg":"EdDSA","typ":"JWT","kid":…}`, segments
    /// base64url without padding. The claims are signed as given; call [`Claims::validate`]
    /// first to refuse claims a verifier would reject.
    pub fn sign(&self, claims: &Claims) -> String {
        let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid()});
        self.sign_parts(&header.to_string(), &claims.to_json().to_string())
    }

    /// The plain Ed25519 signature over `message`, for the audit key, which is the same kind
    /// of key put to another use (never called with a token key).
    pub(crate) fn sign_raw(&self, message: &[u8]) -> [u8; 64] {
        let mut signature = [0; 64];
        signature.copy_from_slice(self.pair.sign(message).as_ref());
        signature
    }

    /// Signs arbitrary header and payload text. Only [`SigningKey::sign`] and the tests (which
    /// forge hostile headers and payloads with it) call this.
    pub(super) fn sign_parts(&self, header: &str, payload: &str) -> String {
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(payload, &mut token);
        let signature = self.pair.sign(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut token);
        token
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid())
            .finish_non_exhaustive()
    }
}

/// A public key tokens may be signed with, prepared once for verification.
#[derive(Clone)]
pub struct VerifyingKey {
    kid: String,
    raw: [u8; RAW_LEN],
    parsed: ParsedPublicKey,
}

impl VerifyingKey {
    /// `ed25519-` and the first 16 hex digits of the SHA-256 of the raw public key.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Loads the first `PUBLIC KEY` (SPKI) section of a PEM document; it must be Ed25519.
    pub fn from_public_pem(pem: &str) -> Result<Self, TokenError> {
        let der = SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes()).map_err(|source| {
            TokenError::KeyPem {
                what: "public key",
                source,
            }
        })?;
        let raw = der
            .strip_prefix(SPKI_PREFIX.as_slice())
            .filter(|raw| raw.len() == RAW_LEN)
            .ok_or(TokenError::NotEd25519)?;
        Self::from_raw(raw)
    }

    /// The key as an SPKI `PUBLIC KEY` PEM, as [`VerifyingKey::from_public_pem`] reads it.
    pub fn to_public_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.raw);
        pem_encode("PUBLIC KEY", &der)
    }

    fn from_raw(raw: &[u8]) -> Result<Self, TokenError> {
        let raw: [u8; RAW_LEN] = raw.try_into().map_err(|_| TokenError::NotEd25519)?;
        let parsed = ParsedPublicKey::new(&ED25519, raw).map_err(TokenError::KeyRejected)?;
        let digest = hex::encode(Sha256::digest(raw));
        let kid = format!("ed25519-{}", digest.get(..16).unwrap_or(&digest));
        Ok(Self { kid, raw, parsed })
    }

    /// Whether `signature` is this key's Ed25519 signature over `message` (constant time in
    /// the key and signature, inside aws-lc).
    pub(crate) fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        self.parsed.verify_sig(message, signature).is_ok()
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
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
