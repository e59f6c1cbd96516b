//! CSR intake. Owns the promise that a [`VerifiedCsr`] exists only for a size-bounded PEM request
//! whose self-signature verified under an accepted key (proof of possession), and that nothing but
//! its public key can ever reach a certificate: the names it asks for are kept as facts for the
//! policy to see, never as certificate parameters.

use std::fmt;

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use policy_sdk::{CsrFacts, KeyAlgorithm};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_DSA, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA,
    OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED448,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: u32 = 2048;
/// Largest RSA modulus accepted, in bits (the verifier's upper bound).
pub const MAX_RSA_BITS: u32 = 8192;

/// Why a CSR was refused.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// The input is longer than the caller's limit; it was not parsed.
    #[error("CSR is {len} bytes, the limit is {limit}")]
    TooLarge {
        /// Input length, bytes.
        len: usize,
        /// The limit, bytes.
        limit: usize,
    },
    /// No well-formed `CERTIFICATE REQUEST` PEM section.
    #[error("CSR is not a PEM `CERTIFICATE REQUEST`")]
    NotPem(#[source] rustls_pki_types::pem::Error),
    /// The DER inside the PEM is not a PKCS#10 request.
    #[error("CSR is not a well-formed PKCS#10 request")]
    Malformed(#[source] X509Error),
    /// Bytes follow the PKCS#10 structure inside the PEM section.
    #[error("CSR has {0} bytes after the request")]
    TrailingData(usize),
    /// The public key is of an algorithm or size the gateway does not issue for.
    #[error("CSR key {algorithm} is not supported (ECDSA P-256/P-384, Ed25519, RSA 2048-8192)")]
    UnsupportedKey {
        /// The key's algorithm, named.
        algorithm: String,
    },
    /// An RSA key below [`MIN_RSA_BITS`].
    #[error("CSR RSA key has {bits} bits, at least {MIN_RSA_BITS} are required")]
    WeakRsaKey {
        /// The modulus size.
        bits: u32,
    },
    /// The request is signed with an algorithm the gateway does not verify (SHA-1, PSS, or one
    /// that does not fit the key).
    #[error("CSR signature algorithm {algorithm} is not supported for this key")]
    UnsupportedSignature {
        /// The signature algorithm OID.
        algorithm: String,
    },
    /// The self-signature does not verify: no proof that the requester holds the private key.
    #[error("CSR signature does not verify")]
    BadSignature,
}

impl CsrError {
    /// A stable kebab-case code for metrics, audit entries and API errors.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "csr-too-large",
            Self::NotPem(_) => "csr-not-pem",
            Self::Malformed(_) | Self::TrailingData(_) => "csr-malformed",
            Self::UnsupportedKey { .. } => "csr-unsupported-key",
            Self::WeakRsaKey { .. } => "csr-weak-key",
            Self::UnsupportedSignature { .. } => "csr-unsupported-signature",
            Self::BadSignature => "csr-bad-signature",
        }
    }
}

/// A CSR whose self-signature verified. Only its public key is ever used to issue.
#[derive(Clone)]
pub struct VerifiedCsr {
    facts: CsrFacts,
    digest: [u8; 32],
    spki_der: Vec<u8>,
    public_key: rcgen::SubjectPublicKeyInfo,
}

impl VerifiedCsr {
    /// Key algorithm and size, and the names the node asked for (for the policy to see; never
    /// copied into a certificate).
    pub fn facts(&self) -> &CsrFacts {
        &self.facts
    }

    /// SHA-256 of the CSR DER, for idempotency.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// SHA-256 of the SubjectPublicKeyInfo DER, which binds attestation evidence to the key.
    pub fn public_key_sha256(&self) -> [u8; 32] {
        Sha256::digest(&self.spki_der).into()
    }

    /// The SubjectPublicKeyInfo DER, exactly as the node sent it.
    pub(crate) fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The public key in the form rcgen signs for.
    pub(crate) fn public_key(&self) -> &rcgen::SubjectPublicKeyInfo {
        &self.public_key
    }
}

impl fmt::Debug for VerifiedCsr {
    /// Facts and digest only: a CSR body never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedCsr")
            .field("digest", &hex::encode(self.digest))
            .field("key_algorithm", &self.facts.key_algorithm)
            .field("key_bits", &self.facts.key_bits)
            .finish_non_exhaustive()
    }
}

/// Parses a PEM CSR, refusing inputs over `max_bytes` before parsing, verifies its self-signature
/// and accepts ECDSA P-256/P-384, Ed25519 and RSA 2048-8192 bits.
pub fn verify_csr(pem: &str, max_bytes: usize) -> Result<VerifiedCsr, CsrError> {
    if pem.len() > max_bytes {
        return Err(CsrError::TooLarge {
            len: pem.len(),
            limit: max_bytes,
        });
    }
    let der =
        CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).map_err(CsrError::NotPem)?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref()).map_err(|e| {
        CsrError::Malformed(match e {
            x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
            x509_parser::nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
        })
    })?;
    if !rest.is_empty() {
        return Err(CsrError::TrailingData(rest.len()));
    }
    let info = &csr.certification_request_info;
    let (key_algorithm, key_bits) = classify_key(&info.subject_pki)?;
    let sig_oid = &csr.signature_algorithm.algorithm;
    let algorithm = verification_algorithm(key_algorithm, sig_oid).ok_or_else(|| {
        CsrError::UnsupportedSignature {
            algorithm: sig_oid.to_id_string(),
        }
    })?;
    UnparsedPublicKey::new(algorithm, &info.subject_pki.subject_public_key.data)
        .verify(info.raw, &csr.signature_value.data)
        .map_err(|_| CsrError::BadSignature)?;

    // rcgen re-encodes the key from (algorithm, bits); it only knows canonical parameters.
    let public_key = rcgen::SubjectPublicKeyInfo::from_der(info.subject_pki.raw).map_err(|_| {
        CsrError::UnsupportedKey {
            algorithm: format!("{key_algorithm:?} with non-canonical parameters"),
        }
    })?;
    let (requested_dns_names, requested_uris) = requested_names(&csr);
    Ok(VerifiedCsr {
        facts: CsrFacts {
            key_algorithm,
            key_bits,
            requested_dns_names,
            requested_uris,
        },
        digest: Sha256::digest(der.as_ref()).into(),
        spki_der: info.subject_pki.raw.to_vec(),
        public_key,
    })
}

/// Names the key, refusing what the gateway does not issue for.
fn classify_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<(KeyAlgorithm, u32), CsrError> {
    let oid = &spki.algorithm.algorithm;
    let unsupported = |name: &str| CsrError::UnsupportedKey {
        algorithm: name.to_string(),
    };
    if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => Ok((KeyAlgorithm::EcdsaP256, 256)),
            Some(c) if c == OID_NIST_EC_P384 => Ok((KeyAlgorithm::EcdsaP384, 384)),
            Some(c) if c == OID_NIST_EC_P521 => Err(unsupported("ECDSA P-521")),
            Some(c) => Err(unsupported(&format!("ECDSA curve {}", c.to_id_string()))),
            None => Err(unsupported("ECDSA without a named curve")),
        };
    }
    if *oid == OID_SIG_ED25519 {
        return Ok((KeyAlgorithm::Ed25519, 256));
    }
    if *oid == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(key)) => modulus_bits(key.modulus),
            Ok(_) => 0,
            Err(e) => return Err(CsrError::Malformed(e)),
        };
        if bits < MIN_RSA_BITS {
            return Err(CsrError::WeakRsaKey { bits });
        }
        if bits > MAX_RSA_BITS {
            return Err(unsupported(&format!("RSA-{bits}")));
        }
        return Ok((KeyAlgorithm::Rsa, bits));
    }
    let name = if *oid == OID_KEY_TYPE_DSA {
        "DSA".to_string()
    } else if *oid == OID_SIG_ED448 {
        "Ed448".to_string()
    } else if *oid == OID_PKCS1_RSASSAPSS {
        "RSASSA-PSS".to_string()
    } else {
        oid.to_id_string()
    };
    Err(unsupported(&name))
}

/// Significant bits of a big-endian modulus (leading zero bytes and bits ignored).
fn modulus_bits(modulus: &[u8]) -> u32 {
    let Some(start) = modulus.iter().position(|&b| b != 0) else {
        return 0;
    };
    let significant = &modulus[start..];
    let bytes = u32::try_from(significant.len()).unwrap_or(u32::MAX / 8);
    bytes * 8 - significant[0].leading_zeros()
}

/// The verifier for a signature algorithm under this key, if the pair is accepted.
fn verification_algorithm(
    key: KeyAlgorithm,
    sig: &x509_parser::der_parser::oid::Oid<'_>,
) -> Option<&'static dyn VerificationAlgorithm> {
    let (sha256, sha384) = (
        *sig == OID_SIG_ECDSA_WITH_SHA256,
        *sig == OID_SIG_ECDSA_WITH_SHA384,
    );
    Some(match key {
        KeyAlgorithm::EcdsaP256 if sha256 => &signature::ECDSA_P256_SHA256_ASN1,
        KeyAlgorithm::EcdsaP256 if sha384 => &signature::ECDSA_P256_SHA384_ASN1,
        KeyAlgorithm::EcdsaP384 if sha256 => &signature::ECDSA_P384_SHA256_ASN1,
        KeyAlgorithm::EcdsaP384 if sha384 => &signature::ECDSA_P384_SHA384_ASN1,
        KeyAlgorithm::Ed25519 if *sig == OID_SIG_ED25519 => &signature::ED25519,
        KeyAlgorithm::Rsa if *sig == OID_PKCS1_SHA256WITHRSA => {
            &signature::RSA_PKCS1_2048_8192_SHA256
        }
        KeyAlgorithm::Rsa if *sig == OID_PKCS1_SHA384WITHRSA => {
            &signature::RSA_PKCS1_2048_8192_SHA384
        }
        KeyAlgorithm::Rsa if *sig == OID_PKCS1_SHA512WITHRSA => {
            &signature::RSA_PKCS1_2048_8192_SHA512
        }
        _ => return None,
    })
}

/// The DNS names and URIs in the request's subjectAltName extension, as asked.
fn requested_names(csr: &X509CertificationRequest<'_>) -> (Vec<String>, Vec<String>) {
    let (mut dns, mut uris) = (Vec::new(), Vec::new());
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                match name {
                    GeneralName::DNSName(n) => dns.push((*n).to_string()),
                    GeneralName::URI(u) => uris.push((*u).to_string()),
                    _ => {}
                }
            }
        }
    }
    (dns, uris)
}

#[cfg(test)]
mod tests {
    use rcgen::{
        CertificateParams, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
        PKCS_ECDSA_P384_SHA384, PKCS_ECDSA_P521_SHA512, PKCS_ED25519, PublicKeyData, SanType,
        SignatureAlgorithm,
    };

    use super::*;

    const LIMIT: usize = 16 * 1024;
    /// `openssl req -newkey rsa:2048`, asking for DNS:evil.example and a foreign SPIFFE ID.
    const RSA_2048: &str = include_str!("testdata/rsa2048.csr");
    /// The same key, signed with SHA-1.
    const RSA_2048_SHA1: &str = include_str!("testdata/rsa2048-sha1.csr");
    /// `openssl req -newkey rsa:1024`.
    const RSA_1024: &str = include_str!("testdata/rsa1024.csr");
    /// `openssl req -newkey param:dsa.param` (DSA 1024).
    const DSA: &str = include_str!("testdata/dsa.csr");

    fn csr_pem(key: &KeyPair, edit: impl FnOnce(&mut CertificateParams)) -> String {
        let mut params = CertificateParams::default();
        edit(&mut params);
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    fn der_to_pem(der: &[u8]) -> String {
        crate::identity::leaf::pem_encode("CERTIFICATE REQUEST", der)
    }

    #[test]
    fn accepts_each_supported_key_and_reports_facts_and_digests() {
        let cases: [(&'static SignatureAlgorithm, KeyAlgorithm, u32); 3] = [
            (&PKCS_ECDSA_P256_SHA256, KeyAlgorithm::EcdsaP256, 256),
            (&PKCS_ECDSA_P384_SHA384, KeyAlgorithm::EcdsaP384, 384),
            (&PKCS_ED25519, KeyAlgorithm::Ed25519, 256),
        ];
        for (alg, want_alg, want_bits) in cases {
            let key = KeyPair::generate_for(alg).unwrap();
            let pem = csr_pem(&key, |_| {});
            let csr = verify_csr(&pem, LIMIT).unwrap();
            assert_eq!(csr.facts().key_algorithm, want_alg);
            assert_eq!(csr.facts().key_bits, want_bits);
            let digest: [u8; 32] = Sha256::digest(pem_to_der(&pem)).into();
            assert_eq!(csr.digest(), digest);
            let spki: [u8; 32] = Sha256::digest(key.subject_public_key_info()).into();
            assert_eq!(csr.public_key_sha256(), spki);
        }
    }

    #[test]
    fn requested_names_become_facts_only() {
        let key = KeyPair::generate().unwrap();
        let pem = csr_pem(&key, |p| {
            p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            p.subject_alt_names = vec![
                SanType::DnsName("evil.example".try_into().unwrap()),
                SanType::URI("spiffe://evil.example/admin".try_into().unwrap()),
            ];
        });
        let csr = verify_csr(&pem, LIMIT).unwrap();
        assert_eq!(csr.facts().requested_dns_names, ["evil.example"]);
        assert_eq!(csr.facts().requested_uris, ["spiffe://evil.example/admin"]);
    }

    #[test]
    fn openssl_rsa_2048_is_accepted_with_its_size() {
        let csr = verify_csr(RSA_2048, LIMIT).unwrap();
        assert_eq!(csr.facts().key_algorithm, KeyAlgorithm::Rsa);
        assert_eq!(csr.facts().key_bits, 2048);
        assert_eq!(csr.facts().requested_dns_names, ["evil.example"]);
        assert_eq!(csr.facts().requested_uris, ["spiffe://evil.example/admin"]);
    }

    #[test]
    fn flipped_signature_byte_is_a_bad_signature() {
        for alg in [&PKCS_ECDSA_P256_SHA256, &PKCS_ED25519] {
            let key = KeyPair::generate_for(alg).unwrap();
            let mut der = pem_to_der(&csr_pem(&key, |_| {}));
            let last = der.len() - 1;
            der[last] ^= 0x01;
            let err = verify_csr(&der_to_pem(&der), LIMIT).unwrap_err();
            assert!(matches!(err, CsrError::BadSignature), "{err:?}");
            assert_eq!(err.reason(), "csr-bad-signature");
        }
        let mut der = pem_to_der(RSA_2048);
        let last = der.len() - 1;
        der[last] ^= 0x80;
        let err = verify_csr(&der_to_pem(&der), LIMIT).unwrap_err();
        assert!(matches!(err, CsrError::BadSignature), "{err:?}");
    }

    #[test]
    fn oversize_input_is_refused_before_parsing() {
        // Not even PEM: a parse attempt would say `NotPem`.
        let junk = "x".repeat(LIMIT + 1);
        let err = verify_csr(&junk, LIMIT).unwrap_err();
        assert!(
            matches!(err, CsrError::TooLarge { len, limit } if len == LIMIT + 1 && limit == LIMIT),
            "{err:?}"
        );
        assert_eq!(err.reason(), "csr-too-large");
        let good = csr_pem(&KeyPair::generate().unwrap(), |_| {});
        assert!(verify_csr(&good, good.len()).is_ok());
        assert!(matches!(
            verify_csr(&good, good.len() - 1),
            Err(CsrError::TooLarge { .. })
        ));
    }

    #[test]
    fn unsupported_keys_are_named() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P521_SHA512).unwrap();
        let err = verify_csr(&csr_pem(&key, |_| {}), LIMIT).unwrap_err();
        assert!(
            matches!(&err, CsrError::UnsupportedKey { algorithm } if algorithm == "ECDSA P-521"),
            "{err:?}"
        );
        assert_eq!(err.reason(), "csr-unsupported-key");
        let err = verify_csr(DSA, LIMIT).unwrap_err();
        assert!(
            matches!(&err, CsrError::UnsupportedKey { algorithm } if algorithm == "DSA"),
            "{err:?}"
        );
    }

    #[test]
    fn weak_rsa_and_sha1_signatures_are_refused() {
        let err = verify_csr(RSA_1024, LIMIT).unwrap_err();
        assert!(
            matches!(err, CsrError::WeakRsaKey { bits: 1024 }),
            "{err:?}"
        );
        assert_eq!(err.reason(), "csr-weak-key");
        let err = verify_csr(RSA_2048_SHA1, LIMIT).unwrap_err();
        assert!(
            matches!(&err, CsrError::UnsupportedSignature { algorithm } if algorithm == "1.2.840.113549.1.1.5"),
            "{err:?}"
        );
        assert_eq!(err.reason(), "csr-unsupported-signature");
    }

    #[test]
    fn non_pem_malformed_and_trailing_input_are_told_apart() {
        let err = verify_csr("hello", LIMIT).unwrap_err();
        assert!(matches!(err, CsrError::NotPem(_)), "{err:?}");
        assert_eq!(err.reason(), "csr-not-pem");
        let cert_label = crate::identity::leaf::pem_encode("CERTIFICATE", &[0x30, 0x00]);
        assert!(matches!(
            verify_csr(&cert_label, LIMIT),
            Err(CsrError::NotPem(_))
        ));
        let err = verify_csr(&der_to_pem(&[0x30, 0x03, 0x02, 0x01, 0x00]), LIMIT).unwrap_err();
        assert!(matches!(err, CsrError::Malformed(_)), "{err:?}");
        assert_eq!(err.reason(), "csr-malformed");
        let mut der = pem_to_der(&csr_pem(&KeyPair::generate().unwrap(), |_| {}));
        der.extend_from_slice(&[0, 0]);
        let err = verify_csr(&der_to_pem(&der), LIMIT).unwrap_err();
        assert!(matches!(err, CsrError::TrailingData(2)), "{err:?}");
    }

    #[test]
    fn modulus_bits_ignores_leading_zeros() {
        assert_eq!(modulus_bits(&[]), 0);
        assert_eq!(modulus_bits(&[0, 0]), 0);
        assert_eq!(modulus_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(modulus_bits(&[0x01, 0xff]), 9);
    }
}
