//! Everything that can go wrong loading the CA or issuing a certificate. Every variant is a
//! refusal to issue: no error path produces a partial or unchecked certificate.

use std::time::SystemTime;

use super::serial::SerialError;

/// The CA could not be made or loaded, or a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A PEM input has no well-formed section of the expected kind.
    #[error("{what} is not valid PEM")]
    Pem {
        /// Which input: "CA certificate" or "CA private key".
        what: &'static str,
        /// The PEM decoder's complaint.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The CA certificate's DER is not an X.509 certificate (or has trailing bytes).
    #[error("CA certificate is not a well-formed X.509 certificate")]
    Certificate(#[source] x509_parser::error::X509Error),
    /// The certificate is not allowed to issue certificates.
    #[error("certificate is not a CA: {0}")]
    NotACa(&'static str),
    /// The private key could not be parsed.
    #[error("CA private key cannot be read")]
    Key(#[source] rcgen::Error),
    /// The CA key is not ECDSA P-256 or P-384 (the only kinds the JWKS bundle describes).
    #[error("CA key algorithm {0} is not supported (ECDSA P-256 or P-384)")]
    UnsupportedCaKey(String),
    /// The private key does not belong to the certificate.
    #[error("CA private key does not match the CA certificate's public key")]
    KeyMismatch,
    /// The CA subject cannot be re-encoded byte for byte, so issued certificates would not chain
    /// to it (multi-valued RDNs, repeated attribute types, unusual string types).
    #[error("CA subject name cannot be reproduced exactly in issued certificates")]
    SubjectNotReproducible,
    /// The CA has expired (or expires this second): nothing it signs would be valid.
    #[error("CA expired at {not_after:?}")]
    CaExpired {
        /// The CA's notAfter.
        not_after: SystemTime,
    },
    /// A lifetime of zero seconds was asked for.
    #[error("certificate lifetime must be at least one second")]
    ZeroTtl,
    /// A time is before 1970 or beyond what a certificate can encode.
    #[error("time is outside the range a certificate can encode")]
    TimeOutOfRange,
    /// A DNS name to be written into a certificate is not a valid DNS name.
    #[error("{0:?} is not a valid DNS name")]
    InvalidDnsName(String),
    /// No random serial could be drawn.
    #[error("cannot draw a certificate serial")]
    Serial(#[source] SerialError),
    /// A new key pair could not be generated.
    #[error("key generation failed")]
    KeyGeneration(#[source] rcgen::Error),
    /// rcgen refused to encode or sign the certificate.
    #[error("certificate signing failed")]
    Signing(#[source] rcgen::Error),
    /// The gateway's serving certificate cannot be issued again under another CA (it does not
    /// parse, or lacks the one SPIFFE ID it must carry).
    #[error("the serving certificate cannot be re-issued: {0}")]
    ServingCertificate(&'static str),
    /// The signed certificate does not carry the CSR's public key byte for byte (a re-encoding
    /// bug; refusing keeps the attestation-to-key binding intact).
    #[error("issued certificate does not carry the requested public key unchanged")]
    KeyNotPreserved,
}

impl IdentityError {
    /// A stable kebab-case code for metrics, audit entries and API errors.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Pem { .. } => "pem",
            Self::Certificate(_) => "ca-certificate-malformed",
            Self::NotACa(_) => "not-a-ca",
            Self::Key(_) => "ca-key-invalid",
            Self::UnsupportedCaKey(_) => "ca-key-unsupported",
            Self::KeyMismatch => "ca-key-mismatch",
            Self::SubjectNotReproducible => "ca-subject-not-reproducible",
            Self::CaExpired { .. } => "ca-expired",
            Self::ZeroTtl => "zero-ttl",
            Self::TimeOutOfRange => "time-out-of-range",
            Self::InvalidDnsName(_) => "invalid-dns-name",
            Self::Serial(e) => e.reason(),
            Self::KeyGeneration(_) => "key-generation",
            Self::Signing(_) => "signing",
            Self::KeyNotPreserved => "key-not-preserved",
            Self::ServingCertificate(_) => "serving-certificate",
        }
    }
}

impl From<SerialError> for IdentityError {
    fn from(e: SerialError) -> Self {
        Self::Serial(e)
    }
}
