//! Challenge nonces without server-side state: 16 random bytes, the expiry, and an HMAC over
//! both under a key every replica derives from the same secret. Issuing one costs no write;
//! using one is recorded (in memory here, in the store for every replica) by the join.

use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use std::time::Duration;

use super::AttestError;

const RANDOM: usize = 16;
const TAG: usize = 16;
const LEN: usize = RANDOM + 8 + TAG;

/// A challenge handed to a node (a wire type).
pub use crate::wire::Challenge;

/// Issues and checks nonces.
pub struct Challenges {
    key: hmac::Key,
    ttl: Duration,
    rng: SystemRandom,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Challenges {
    /// Nonces valid for `ttl`, authenticated under `secret`.
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        let key = hmac::Key::new(
            hmac::HMAC_SHA256,
            &[b"omnirelay-nonce-v1:", secret].concat(),
        );
        Self {
            key,
            ttl,
            rng: SystemRandom::new(),
        }
    }

    /// A new nonce.
    pub fn issue(&self, now_ms: u64) -> Challenge {
        let expires_at = now_ms / 1000 + self.ttl.as_secs();
        let mut raw = [0u8; LEN];
        // The system RNG failing is unrecoverable everywhere else too; a zero prefix would only
        // make this nonce guessable, and its HMAC still binds it to us.
        let _ = self.rng.fill(&mut raw[..RANDOM]);
        raw[RANDOM..RANDOM + 8].copy_from_slice(&expires_at.to_be_bytes());
        let tag = hmac::sign(&self.key, &raw[..RANDOM + 8]);
        raw[RANDOM + 8..].copy_from_slice(&tag.as_ref()[..TAG]);
        Challenge {
            nonce: URL_SAFE_NO_PAD.encode(raw),
            expires_at,
        }
    }

    /// Checks authenticity and expiry; returns the expiry (Unix seconds).
    pub fn verify(&self, nonce: &str, now_ms: u64) -> Result<u64, AttestError> {
        let raw = URL_SAFE_NO_PAD
            .decode(nonce)
            .ok()
            .filter(|raw| raw.len() == LEN)
            .ok_or(AttestError::InvalidNonce)?;
        let expected = hmac::sign(&self.key, &raw[..RANDOM + 8]);
        aws_lc_rs::constant_time::verify_slices_are_equal(
            &expected.as_ref()[..TAG],
            &raw[RANDOM + 8..],
        )
        .map_err(|_| AttestError::InvalidNonce)?;
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&raw[RANDOM..RANDOM + 8]);
        let expires_at = u64::from_be_bytes(expiry);
        if now_ms / 1000 >= expires_at {
            return Err(AttestError::NonceExpired);
        }
        Ok(expires_at)
    }
}
