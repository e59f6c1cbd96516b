//! Verification of a presented token: bounded, structural, header, key, signature, and only
//! then the claims. Pure: no clock of its own, no I/O, no database. A token whose signature and
//! claims verified is remembered (by the SHA-256 of its exact bytes, bounded, for a few
//! minutes), so a node or an attacker presenting it again costs a hash and the time-window
//! check instead of an Ed25519 verification; failures are never remembered.

use std::collections::HashMap;
use std::time::Duration;

use sha2::{Digest, Sha256};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Deserializer};

use super::error::clip;
use super::{Claims, MAX_TOKEN_LEN, TokenError, VerifyingKey};

/// Checks tokens against a set of trusted keys (more than one during a key rotation) and the
/// gateway's trust domain.
#[derive(Debug, Clone)]
pub struct Verifier {
    audience: String,
    keys: HashMap<String, VerifyingKey>,
    leeway: u64,
    /// Tokens that verified, by digest: their claims (the time window is checked every time).
    verified: moka::sync::Cache<[u8; 32], Claims>,
}

/// Verified tokens remembered at most.
const VERIFIED_CAPACITY: u64 = 65_536;
/// How long a verified token is remembered.
const VERIFIED_TTL: Duration = Duration::from_secs(300);

impl Verifier {
    /// `audience` is the trust domain tokens must name; `leeway` tolerates clock skew on
    /// nbf/exp (whole seconds; a fraction is dropped).
    pub fn new(
        audience: &str,
        keys: impl IntoIterator<Item = VerifyingKey>,
        leeway: Duration,
    ) -> Self {
        Self {
            audience: audience.to_string(),
            keys: keys
                .into_iter()
                .map(|key| (key.kid().to_string(), key))
                .collect(),
            leeway: leeway.as_secs(),
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .time_to_live(VERIFIED_TTL)
                .build(),
        }
    }

    /// Full check: size, structure, header, kid lookup, signature, then claims (time window
    /// with leeway, audience, claim syntax). Never touches a database: whether the token was
    /// revoked or used up is the caller's question, keyed by [`Claims::id`].
    ///
    /// No claim value is read before the signature verifies.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong(token.len()));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(claims) = self.verified.get(&digest) {
            self.check_time(&claims, now_unix)?;
            return Ok(claims);
        }
        let claims = self.verify_signed(token, now_unix)?;
        self.verified.insert(digest, claims.clone());
        Ok(claims)
    }

    /// [`Verifier::verify`] without the memory of earlier verifications.
    fn verify_signed(&self, token: &str, now_unix: u64) -> Result<Claims, TokenError> {
        // The signing input is the first two segments exactly as received (RFC 7515 §5.2).
        let structure = || TokenError::Malformed("structure");
        let (signed, signature) = token.rsplit_once('.').ok_or_else(structure)?;
        let (header, payload) = signed.split_once('.').ok_or_else(structure)?;
        if payload.contains('.') {
            return Err(structure());
        }
        let key = self.key_for(&Header::decode(header)?)?;
        let signature = decode(signature, "signature")?;
        if !key.verifies(signed.as_bytes(), &signature) {
            return Err(TokenError::BadSignature);
        }
        let claims = Claims::from_json(&decode(payload, "payload")?)?;
        self.check_time(&claims, now_unix)?;
        if claims.audience != self.audience {
            return Err(TokenError::WrongAudience(clip(&claims.audience)));
        }
        claims.validate()?;
        Ok(claims)
    }

    /// Picks the key the header names, after refusing every header we will not honour.
    fn key_for(&self, header: &Header) -> Result<&VerifyingKey, TokenError> {
        if header.alg != "EdDSA" {
            return Err(TokenError::UnsupportedAlgorithm(clip(&header.alg)));
        }
        if header.crit {
            return Err(TokenError::CriticalHeader);
        }
        if let Some(typ) = header.typ.as_deref().filter(|&typ| typ != "JWT") {
            return Err(TokenError::UnsupportedType(clip(typ)));
        }
        let kid = header.kid.as_deref().ok_or(TokenError::MissingKeyId)?;
        self.keys
            .get(kid)
            .ok_or_else(|| TokenError::UnknownKey(clip(kid)))
    }

    /// Valid when `nbf - leeway <= now < exp + leeway`.
    fn check_time(&self, claims: &Claims, now: u64) -> Result<(), TokenError> {
        if now < claims.not_before.saturating_sub(self.leeway) {
            return Err(TokenError::NotYetValid {
                not_before: claims.not_before,
            });
        }
        if now >= claims.expires_at.saturating_add(self.leeway) {
            return Err(TokenError::Expired {
                expires_at: claims.expires_at,
            });
        }
        Ok(())
    }
}

/// The JOSE header parameters we read. Others (`jku`, `jwk`, `x5u`, `x5c`, …) are ignored: keys
/// come only from the verifier's own set, never from the token. A repeated parameter is refused.
#[derive(Deserialize)]
struct Header {
    alg: String,
    typ: Option<String>,
    kid: Option<String>,
    /// Whether `crit` is present at all, whatever its value (even `null`).
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

impl Header {
    fn decode(segment: &str) -> Result<Self, TokenError> {
        serde_json::from_slice(&decode(segment, "header")?)
            .map_err(|_| TokenError::Malformed("header"))
    }
}

fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(deserializer).map(|_| true)
}

/// Strict base64url: no padding, no stray trailing bits, so each byte string has one encoding.
fn decode(segment: &str, part: &'static str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| TokenError::Malformed(part))
}
