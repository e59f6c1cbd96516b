//! The `[token]` section: the key that signs bootstrap tokens and the keys still trusted.

use std::path::PathBuf;
use std::time::Duration;

/// Token signing and verification. Defaults in [`TokenConfig::defaults`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    /// Ed25519 PKCS#8 PEM signing key, mode 0600, separate from the CA key. Default
    /// `token/signing.key`.
    pub signing_key: PathBuf,
    /// Public keys (PEM) of earlier signing keys whose tokens are still accepted (rotation).
    pub verification_keys: Vec<PathBuf>,
    /// The `iss` of issued tokens. Default `omnirelay`.
    pub issuer: String,
    /// Longest token lifetime `token issue` accepts. Default 7 days.
    pub max_ttl: Duration,
    /// Clock skew tolerated on `nbf`/`exp`. Default 60 s.
    pub leeway: Duration,
}

impl TokenConfig {
    /// The defaults, with paths relative to the state directory.
    pub fn defaults() -> Self {
        Self {
            signing_key: PathBuf::from("token/signing.key"),
            verification_keys: Vec::new(),
            issuer: "omnirelay".into(),
            max_ttl: Duration::from_secs(7 * 24 * 3600),
            leeway: Duration::from_secs(60),
        }
    }
}
