//! The `[identity]` section: the issuing CA and what it may issue.

use std::path::PathBuf;
use std::time::Duration;

/// Where the CA lives and the bounds on what it issues. Defaults in
/// [`IdentityConfig::defaults`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    /// CA certificate, PEM. Default `ca/ca.pem`.
    pub ca_cert: PathBuf,
    /// CA private key, PEM, mode 0600. Default `ca/ca.key`.
    pub ca_key: PathBuf,
    /// Where CA rotation keeps its state (`rotation.json`) and the CAs it generates. The CA
    /// above stays the initial one; without `rotation.json` it is the only one. Default `ca`.
    pub rotation_dir: PathBuf,
    /// Longest SVID lifetime; longer policy grants are capped. Default 24 h.
    pub max_ttl: Duration,
    /// Percentage of the lifetime left when nodes are told to renew. Default 20.
    pub renew_remaining_percent: u8,
    /// How often SPIFFE bundle consumers should refresh. Default 5 min.
    pub bundle_refresh_hint: Duration,
    /// How long a revoked SPIFFE ID may not join or renew again (`omnirelay quarantine lift`
    /// ends it early); zero for no quarantine. Default 1 h.
    pub quarantine: Duration,
    /// How long a CRL is valid (its nextUpdate); a new one is signed at every revocation and
    /// when half of this has passed. Default 24 h.
    pub crl_validity: Duration,
}

impl IdentityConfig {
    /// The defaults, with paths relative to the state directory.
    pub fn defaults() -> Self {
        Self {
            ca_cert: PathBuf::from("ca/ca.pem"),
            ca_key: PathBuf::from("ca/ca.key"),
            rotation_dir: PathBuf::from("ca"),
            max_ttl: Duration::from_secs(24 * 3600),
            renew_remaining_percent: 20,
            bundle_refresh_hint: Duration::from_secs(300),
            quarantine: Duration::from_secs(3600),
            crl_validity: Duration::from_secs(24 * 3600),
        }
    }
}
