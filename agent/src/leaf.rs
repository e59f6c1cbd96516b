//! What the node reads from its own certificate: serial, SPIFFE ID, validity and public key.
//! The certificate is the authority on its validity (`agent.json` only repeats it), and a
//! certificate the gateway sends is installed only when it is for the key the node holds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::PublicKeyData;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::schedule::Validity;

/// A certificate could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LeafError {
    /// The PEM holds no certificate.
    #[error("no certificate in the PEM")]
    Empty,
    /// The PEM is malformed.
    #[error("malformed PEM: {0}")]
    Pem(#[source] rustls_pki_types::pem::Error),
    /// The leaf is not an X.509 certificate we can read.
    #[error("cannot parse the certificate: {0}")]
    Parse(String),
    /// The private key is malformed (its bytes are never shown).
    #[error("cannot read the private key: {0}")]
    Key(#[source] rcgen::Error),
    /// The certificate is for another key than the one beside it.
    #[error("the certificate (serial {serial}) is not for the private key beside it")]
    KeyMismatch {
        /// The certificate's serial.
        serial: String,
    },
}

/// The facts of a leaf certificate the agent acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// Serial, lowercase hex without leading zero octets (the gateway's notation).
    pub serial: String,
    /// The `spiffe://` URI SAN, if any.
    pub spiffe_id: Option<String>,
    /// Validity start, Unix seconds.
    pub not_before: u64,
    /// Validity end, Unix seconds.
    pub not_after: u64,
    /// The SubjectPublicKeyInfo, DER.
    pub public_key: Vec<u8>,
}

impl Leaf {
    /// Reads the first certificate of a PEM chain.
    pub fn parse(chain_pem: &[u8]) -> Result<Self, LeafError> {
        let der = CertificateDer::pem_slice_iter(chain_pem)
            .next()
            .ok_or(LeafError::Empty)?
            .map_err(LeafError::Pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| LeafError::Parse(e.to_string()))?;
        let spiffe_id = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|name| match name {
                    x509_parser::extensions::GeneralName::URI(uri)
                        if uri.starts_with("spiffe://") =>
                    {
                        Some(uri.to_string())
                    }
                    _ => None,
                })
            });
        let validity = cert.validity();
        let unix = |t: i64| u64::try_from(t).unwrap_or(0);
        Ok(Self {
            serial: normal_serial(cert.raw_serial()),
            spiffe_id,
            not_before: unix(validity.not_before.timestamp()),
            not_after: unix(validity.not_after.timestamp()),
            public_key: cert.public_key().raw.to_vec(),
        })
    }

    /// Reads the first certificate of `chain_pem` and checks that it is for `key_pem`.
    pub fn for_key(chain_pem: &str, key_pem: &str) -> Result<Self, LeafError> {
        let leaf = Self::parse(chain_pem.as_bytes())?;
        leaf.check_key(key_pem)?;
        Ok(leaf)
    }

    /// Checks that `key_pem` (PKCS#8) is the private half of this certificate's key.
    pub fn check_key(&self, key_pem: &str) -> Result<(), LeafError> {
        let key = rcgen::KeyPair::from_pem(key_pem).map_err(LeafError::Key)?;
        if key.subject_public_key_info() != self.public_key {
            return Err(LeafError::KeyMismatch {
                serial: self.serial.clone(),
            });
        }
        Ok(())
    }

    /// The validity as times.
    pub fn validity(&self) -> Validity {
        Validity {
            not_before: UNIX_EPOCH + Duration::from_secs(self.not_before),
            not_after: UNIX_EPOCH + Duration::from_secs(self.not_after),
        }
    }

    /// Whether the certificate has run out at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.validity().not_after
    }
}

/// A serial as the gateway writes it: lowercase hex, leading zero octets dropped (DER adds one
/// when the high bit is set; the gateway's 16 random bytes may start with one).
pub fn normal_serial(raw: &[u8]) -> String {
    let first = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex::encode(&raw[first..])
}

/// [`normal_serial`] of a hex serial, for comparing the gateway's notation with ours.
pub fn normal_serial_hex(serial: &str) -> String {
    match hex::decode(serial.trim()) {
        Ok(raw) => normal_serial(&raw),
        Err(_) => serial.trim().to_ascii_lowercase(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed SVID-shaped certificate valid from `not_before` to `not_after` (Unix
    /// seconds), and its key, PEM.
    pub(crate) fn certificate(id: &str, not_before: i64, not_after: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = signed(&key, Some(id), &[0x00, 0x8a, 0x01], not_before, not_after);
        (cert, key.serialize_pem())
    }

    /// A self-signed certificate for `key` (PEM) with this serial and validity.
    pub(crate) fn signed(
        key: &rcgen::KeyPair,
        id: Option<&str>,
        serial: &[u8],
        not_before: i64,
        not_after: i64,
    ) -> String {
        let mut params = rcgen::CertificateParams::default();
        if let Some(id) = id {
            params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        }
        params.not_before = time_at(not_before);
        params.not_after = time_at(not_after);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        params.self_signed(key).unwrap().pem()
    }

    fn time_at(unix: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap()
    }

    #[test]
    fn reads_serial_id_validity_and_checks_the_key() {
        let (cert, key) = certificate("spiffe://td.example/node/n1", 1_700_000_000, 1_700_003_600);
        let leaf = Leaf::parse(cert.as_bytes()).unwrap();
        assert_eq!(leaf.serial, "8a01");
        assert_eq!(
            leaf.spiffe_id.as_deref(),
            Some("spiffe://td.example/node/n1")
        );
        assert_eq!(
            (leaf.not_before, leaf.not_after),
            (1_700_000_000, 1_700_003_600)
        );
        leaf.check_key(&key).unwrap();
        let (_, other) = certificate("spiffe://td.example/node/n1", 1_700_000_000, 1_700_003_600);
        assert!(matches!(
            leaf.check_key(&other),
            Err(LeafError::KeyMismatch { .. })
        ));
        assert!(!leaf.expired(UNIX_EPOCH + Duration::from_secs(1_700_003_599)));
        assert!(leaf.expired(UNIX_EPOCH + Duration::from_secs(1_700_003_600)));
        assert!(matches!(Leaf::parse(b"no pem here"), Err(LeafError::Empty)));
    }

    #[test]
    fn serials_compare_in_the_gateways_notation() {
        assert_eq!(normal_serial(&[0, 0, 0x8a]), "8a");
        assert_eq!(normal_serial(&[0]), "00");
        assert_eq!(normal_serial_hex("008A01"), "8a01");
        assert_eq!(normal_serial_hex("8a01"), "8a01");
    }
}
