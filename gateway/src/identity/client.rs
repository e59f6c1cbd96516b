//! Client SVIDs: a certificate chain a node presented (and proved it holds the key of) checked
//! as one of our X.509-SVIDs — it chains to a CA of the current bundle, is valid now, may be
//! used for client authentication, and carries exactly one SPIFFE ID, in our trust domain.
//! Each way to fail has its own reason, so a node learns whether to re-join or to fix its
//! clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::extensions::GeneralName;

use super::serial::Serial;
use super::spiffe::{SpiffeId, TrustDomain};

/// A presented certificate that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSvid {
    /// Its serial.
    pub serial: Serial,
    /// The SPIFFE ID it carries.
    pub spiffe_id: SpiffeId,
    /// Its notBefore, Unix seconds.
    pub not_before: u64,
    /// Its notAfter, Unix seconds.
    pub not_after: u64,
    /// Its SubjectPublicKeyInfo, DER.
    pub spki_der: Vec<u8>,
}

/// Why a presented certificate is not a valid SVID of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientSvidError {
    /// Past its notAfter.
    #[error("the client certificate expired at {not_after} (Unix seconds); join again")]
    Expired {
        /// When it expired, Unix seconds.
        not_after: u64,
    },
    /// Before its notBefore (the node's or our clock is off).
    #[error("the client certificate is not valid yet; check the clocks")]
    NotYetValid,
    /// It does not chain to any CA of the current bundle.
    #[error("the client certificate was not issued by a CA of this gateway's bundle")]
    UnknownIssuer,
    /// It chains but is unusable otherwise (signature, extensions, usage).
    #[error("the client certificate is invalid: {0}")]
    Invalid(String),
    /// It is not an X.509-SVID: not exactly one `spiffe://` URI SAN.
    #[error("the client certificate is not an X.509-SVID: {0}")]
    NotAnSvid(String),
    /// Its SPIFFE ID is in another trust domain.
    #[error("the client certificate's SPIFFE ID {0} is not in this gateway's trust domain")]
    ForeignTrustDomain(String),
}

impl ClientSvidError {
    /// A stable reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Expired { .. } => "certificate-expired",
            Self::NotYetValid => "certificate-not-yet-valid",
            Self::UnknownIssuer => "unknown-issuer",
            Self::Invalid(_) => "certificate-invalid",
            Self::NotAnSvid(_) => "not-an-svid",
            Self::ForeignTrustDomain(_) => "foreign-trust-domain",
        }
    }
}

/// Verifies `chain` (leaf first) against `roots` at `now` for client authentication, and reads
/// the SVID's facts.
pub fn verify_client_svid(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    trust_domain: &TrustDomain,
    now: SystemTime,
) -> Result<ClientSvid, ClientSvidError> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| ClientSvidError::Invalid("no certificate".into()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| ClientSvidError::Invalid(format!("does not parse: {e}")))?;
    let not_before = u64::try_from(parsed.validity().not_before.timestamp()).unwrap_or(0);
    let not_after = u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0);
    let anchors: Vec<_> = roots
        .iter()
        .filter_map(|root| webpki::anchor_from_trusted_cert(root).ok())
        .collect();
    let end_entity = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| ClientSvidError::Invalid(e.to_string()))?;
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            UnixTime::since_unix_epoch(since_epoch),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } => ClientSvidError::Expired { not_after },
            webpki::Error::CertNotValidYet { .. } => ClientSvidError::NotYetValid,
            // A CA of another deployment may carry the same name as ours: its signature
            // then fails against our key.
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                ClientSvidError::UnknownIssuer
            }
            other => ClientSvidError::Invalid(other.to_string()),
        })?;
    let uris: Vec<&str> = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let [uri] = uris.as_slice() else {
        return Err(ClientSvidError::NotAnSvid(format!(
            "{} URI SANs, an SVID has exactly one",
            uris.len()
        )));
    };
    let spiffe_id =
        SpiffeId::parse(uri).map_err(|e| ClientSvidError::NotAnSvid(format!("{uri}: {e}")))?;
    if spiffe_id.trust_domain() != trust_domain {
        return Err(ClientSvidError::ForeignTrustDomain(spiffe_id.to_string()));
    }
    let serial = Serial::parse_hex(&hex::encode(parsed.raw_serial()))
        .map_err(|e| ClientSvidError::Invalid(format!("serial: {e}")))?;
    Ok(ClientSvid {
        serial,
        spiffe_id,
        not_before,
        not_after,
        spki_der: parsed.public_key().raw.to_vec(),
    })
}
