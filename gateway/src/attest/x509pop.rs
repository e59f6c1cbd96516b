//! `x509pop`: the node proves it holds the key of a device certificate that chains to a
//! configured device CA, by signing a payload that binds the gateway's nonce, the evidence
//! time, the node name, the CSR's public key and the posture claims. Claims covered by that
//! signature count as verified.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use sha2::{Digest, Sha256};

use super::{AttestError, X509Pop};
use policy_sdk as sdk;

/// The verified claims taken from the device certificate, which no signed claim may name.
pub(super) const DEVICE_CLAIMS: [&str; 2] = ["device-id", "device-serial"];
/// Most certificates in a device chain.
const MAX_CHAIN: usize = 4;
/// Largest certificate accepted, bytes of DER.
const MAX_CERT: usize = 8 << 10;

/// The device CAs trusted for `x509pop`.
#[derive(Debug, Default)]
pub struct DeviceRoots {
    anchors: Vec<TrustAnchor<'static>>,
}

impl DeviceRoots {
    /// No device CA: `x509pop` is refused.
    pub fn none() -> Self {
        Self::default()
    }

    /// Loads every certificate in the given PEM files as a trust anchor.
    pub fn load(paths: &[impl AsRef<Path>]) -> Result<Self, String> {
        let mut anchors = Vec::new();
        for path in paths {
            let path = path.as_ref();
            // A trust anchor: refused when others can write it or its directory.
            let pem = crate::secrets::read_trust_anchor(path).map_err(|e| e.to_string())?;
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                let anchor = webpki::anchor_from_trusted_cert(&cert)
                    .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
                anchors.push(anchor.to_owned());
            }
        }
        Ok(Self { anchors })
    }

    /// Verifies the chain at `now` (Unix seconds) and the signature over `payload`; returns
    /// the device identity as verified claims (`device-id`: the subject common name,
    /// `device-serial`: the certificate serial in hex).
    pub(super) fn verify(
        &self,
        pop: &X509Pop,
        payload: &[u8],
        now: u64,
    ) -> Result<Vec<sdk::Claim>, AttestError> {
        if self.anchors.is_empty() {
            return Err(AttestError::NoDeviceCa);
        }
        if pop.chain.is_empty() || pop.chain.len() > MAX_CHAIN {
            return Err(AttestError::UntrustedDevice(format!(
                "the chain must hold 1 to {MAX_CHAIN} certificates"
            )));
        }
        let chain = pop
            .chain
            .iter()
            .map(|b64| {
                STANDARD
                    .decode(b64)
                    .ok()
                    .filter(|der| der.len() <= MAX_CERT)
                    .map(CertificateDer::from)
                    .ok_or_else(|| {
                        AttestError::UntrustedDevice("a certificate is not base64 DER".into())
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let signature = STANDARD
            .decode(&pop.signature)
            .map_err(|_| AttestError::BadSignature)?;
        let leaf = webpki::EndEntityCert::try_from(&chain[0])
            .map_err(|e| AttestError::UntrustedDevice(e.to_string()))?;
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.anchors,
            &chain[1..],
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(now)),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| AttestError::UntrustedDevice(e.to_string()))?;
        let algorithms = [
            webpki::aws_lc_rs::ECDSA_P256_SHA256,
            webpki::aws_lc_rs::ECDSA_P384_SHA384,
            webpki::aws_lc_rs::ED25519,
        ];
        if !algorithms
            .iter()
            .any(|alg| leaf.verify_signature(*alg, payload, &signature).is_ok())
        {
            return Err(AttestError::BadSignature);
        }
        Ok(device_claims(&chain[0]))
    }
}

fn device_claims(der: &[u8]) -> Vec<sdk::Claim> {
    let text = |name: &str, value: String| sdk::Claim {
        name: name.into(),
        value: sdk::ClaimValue::Text(value),
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        // webpki just parsed it; fall back to the certificate's digest as its identity.
        return vec![text("device-id", hex::encode(Sha256::digest(der)))];
    };
    let id = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| hex::encode(Sha256::digest(der)));
    vec![
        text("device-id", id),
        text(
            "device-serial",
            cert.raw_serial_as_string().replace(':', ""),
        ),
    ]
}
