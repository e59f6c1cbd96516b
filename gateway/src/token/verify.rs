//! Verification of a presented token: bounded, structural, header, key, signature, and only
//! then the claims. Pure: no clock of its own, no I/O, no database.

use std::collections::HashMap;
use std::time::Duration;

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
}

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
