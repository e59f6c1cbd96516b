//! The CA set in force: the CA that signs, and every CA the trust bundle carries while a
//! rotation is under way (the prepared next one, or the previous one until it is retired).
//! A [`CaSet`] is an immutable snapshot built once per change; requests take the current one
//! and keep it for as long as they need it, so a rotation never changes a request half-way.
//! Promises: the bundle PEM, the SPIFFE JWKS and the DER roots describe exactly the same CAs,
//! the signer among them.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rustls_pki_types::{CertificateDer, UnixTime};

use super::bundle::{bundle_pem, spiffe_bundle};
use super::ca::Ca;

/// Where a CA stands in a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaState {
    /// Published in the bundle, not signing yet (`ca prepare`).
    Prepared,
    /// The signer.
    Active,
    /// The signer before the last activation: still in the bundle until `ca retire`.
    Previous,
    /// Out of the bundle for good (kept in the rotation state as history).
    Retired,
}

impl CaState {
    /// The state's name, as the rotation state file, the API and the metrics spell it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Previous => "previous",
            Self::Retired => "retired",
        }
    }
}

/// A CA of the set, with its state.
#[derive(Debug, Clone)]
pub struct TrustedCa {
    /// The CA.
    pub ca: Arc<Ca>,
    /// Its state; never [`CaState::Retired`] inside a [`CaSet`].
    pub state: CaState,
}

/// The CAs in the trust bundle, one of them active, and their encodings.
pub struct CaSet {
    cas: Vec<TrustedCa>,
    active: usize,
    sequence: u64,
    bundle_pem: Bytes,
    spiffe_bundle: Bytes,
    roots: Vec<CertificateDer<'static>>,
}

impl CaSet {
    /// The set of `cas` (bundle order), whose one [`CaState::Active`] member signs. `None`
    /// when there is not exactly one active CA or a retired one is among them (the rotation
    /// state checks both before it gets here).
    pub fn new(cas: Vec<TrustedCa>, sequence: u64, refresh_hint: Duration) -> Option<Self> {
        let mut active = cas
            .iter()
            .enumerate()
            .filter(|(_, c)| c.state == CaState::Active)
            .map(|(i, _)| i);
        let (Some(index), None) = (active.next(), active.next()) else {
            return None;
        };
        if cas.iter().any(|c| c.state == CaState::Retired) {
            return None;
        }
        Some(Self::build(cas, index, sequence, refresh_hint))
    }

    /// A set of one CA, active, at sequence 1 (a gateway that never rotated).
    pub fn single(ca: Ca, refresh_hint: Duration) -> Self {
        let only = TrustedCa {
            ca: Arc::new(ca),
            state: CaState::Active,
        };
        Self::build(vec![only], 0, 1, refresh_hint)
    }

    fn build(cas: Vec<TrustedCa>, active: usize, sequence: u64, refresh_hint: Duration) -> Self {
        let refs: Vec<&Ca> = cas.iter().map(|c| c.ca.as_ref()).collect();
        let pem = bundle_pem(&refs);
        let jwks = spiffe_bundle(&refs, sequence, refresh_hint).to_string();
        let roots = cas
            .iter()
            .map(|c| CertificateDer::from(c.ca.cert_der().to_vec()))
            .collect();
        Self {
            cas,
            active,
            sequence,
            bundle_pem: Bytes::from(pem),
            spiffe_bundle: Bytes::from(jwks),
            roots,
        }
    }

    /// The CA that signs new certificates.
    pub fn active(&self) -> &Arc<Ca> {
        // `active` indexes `cas`: both are set together in `build` and never change.
        &self.cas[self.active].ca
    }

    /// Every CA in the bundle with its state, in bundle order.
    pub fn cas(&self) -> &[TrustedCa] {
        &self.cas
    }

    /// The SPIFFE bundle sequence: it increases with every change of the set.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The trust bundle, concatenated PEM certificates (`GET /v1/bundle`).
    pub fn bundle_pem(&self) -> &Bytes {
        &self.bundle_pem
    }

    /// The SPIFFE bundle, JWKS JSON with `spiffe_sequence` (`GET /v1/bundle/spiffe`).
    pub fn spiffe_bundle(&self) -> &Bytes {
        &self.spiffe_bundle
    }

    /// The CA certificates, DER, in bundle order: the roots a client certificate must chain
    /// to.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The CA of this set that signed `cert` (an end-entity certificate, DER) and under which
    /// it verifies now, if any.
    pub fn issuer_of(&self, cert: &[u8]) -> Option<&TrustedCa> {
        self.cas
            .iter()
            .find(|c| issued_by(&c.ca, cert, SystemTime::now()))
    }
}

impl fmt::Debug for CaSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaSet")
            .field("sequence", &self.sequence)
            .field("active", self.active())
            .field("cas", &self.cas.len())
            .finish_non_exhaustive()
    }
}

/// Whether `cert` (an end-entity certificate, DER) chains to `ca` and verifies at `at`
/// (rustls-webpki, as a TLS peer would check it).
pub fn issued_by(ca: &Ca, cert: &[u8], at: SystemTime) -> bool {
    let root = CertificateDer::from(ca.cert_der());
    let Ok(anchor) = webpki::anchor_from_trusted_cert(&root) else {
        return false;
    };
    let leaf = CertificateDer::from(cert);
    let Ok(leaf) = webpki::EndEntityCert::try_from(&leaf) else {
        return false;
    };
    let at = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(UnixTime::since_unix_epoch)
        .unwrap_or(UnixTime::since_unix_epoch(Duration::ZERO));
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        at,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .is_ok()
}
