//! The issuing CA. Owns the signing key and promises that every certificate it signs is built
//! from fresh parameters: exactly the SPIFFE ID and DNS names it is handed, an empty subject,
//! CA:false, a random serial, and a lifetime inside the CA's own; the only thing taken from a CSR
//! is its public key, and the signed certificate is checked to carry that key unchanged.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384};
use x509_parser::prelude::FromDer;

use super::csr::VerifiedCsr;
use super::error::IdentityError;
use super::leaf::{
    checked_add, checked_sub, datetime, ia5, leaf_params, pem_encode, subject_alt_names,
    to_system_time, unix_secs,
};
use super::serial::Serial;
use super::spiffe::{SpiffeId, TrustDomain};

/// Backdating of a leaf's notBefore, for clocks that run slightly behind ours.
pub const LEAF_CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Backdating of a new CA's notBefore.
pub const CA_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The curve of the CA key; the JWKS bundle names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Curve {
    /// NIST P-256.
    P256,
    /// NIST P-384.
    P384,
}

/// An issuing CA: certificate and signing key, checked to belong together.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
    fingerprint: String,
    not_before: i64,
    not_after: i64,
    curve: Curve,
}

/// What to mint: the key comes from the CSR, every name from the caller's grant.
#[derive(Debug, Clone, Copy)]
pub struct MintRequest<'a> {
    /// The verified CSR; only its public key is used.
    pub csr: &'a VerifiedCsr,
    /// The one URI SAN the certificate will carry.
    pub spiffe_id: &'a SpiffeId,
    /// DNS SANs granted (not requested) for the certificate.
    pub dns_sans: &'a [String],
    /// Requested lifetime; capped at the CA's notAfter.
    pub ttl: Duration,
    /// The issuance time.
    pub now: SystemTime,
}

/// A revoked certificate as a CRL lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrlEntry {
    /// Its serial.
    pub serial: Serial,
    /// When it was revoked.
    pub revoked_at: SystemTime,
    /// Replaced by a later certificate for the same SPIFFE ID (reason `superseded`), rather
    /// than taken back (reason `unspecified`).
    pub superseded: bool,
}

/// A minted X.509-SVID.
#[derive(Debug, Clone)]
pub struct Svid {
    /// The certificate serial.
    pub serial: Serial,
    /// The SPIFFE ID in the URI SAN.
    pub spiffe_id: SpiffeId,
    /// notBefore, exactly as encoded (whole seconds).
    pub not_before: SystemTime,
    /// notAfter, exactly as encoded (whole seconds).
    pub not_after: SystemTime,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The issuing CA's [`Ca::fingerprint`].
    pub issuer: String,
}

impl Ca {
    /// Makes a new self-signed P-256 CA for `trust_domain` (CA:true, pathlen 0; keyCertSign,
    /// cRLSign, digitalSignature; URI SAN `spiffe://<trust_domain>`), valid from `now` - 60 s for
    /// `validity`. Returns (certificate PEM, PKCS#8 private key PEM).
    pub fn generate(
        trust_domain: &TrustDomain,
        validity: Duration,
        now: SystemTime,
    ) -> Result<(String, String), IdentityError> {
        Self::generate_named(trust_domain, "OmniRelay bootstrap CA", validity, now)
    }

    /// [`Ca::generate`] with another common name: CAs that share a bundle get distinct subjects
    /// (a rotation's next CA), so a verifier never has to tell them apart by key alone.
    pub fn generate_named(
        trust_domain: &TrustDomain,
        common_name: &str,
        validity: Duration,
        now: SystemTime,
    ) -> Result<(String, String), IdentityError> {
        if validity.as_secs() == 0 {
            return Err(IdentityError::ZeroTtl);
        }
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IdentityError::KeyGeneration)?;
        let now = unix_secs(now)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "OmniRelay");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names = vec![SanType::URI(ia5(format!("spiffe://{trust_domain}"))?)];
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(SerialNumber::from_slice(Serial::random()?.as_bytes()));
        params.not_before = datetime(checked_sub(now, CA_CLOCK_SKEW)?)?;
        params.not_after = datetime(checked_add(now, validity)?)?;
        let cert = params.self_signed(&key).map_err(IdentityError::Signing)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Loads a CA from PEM, refusing a certificate that may not issue (no CA:true, or a keyUsage
    /// without keyCertSign), a key that is not ECDSA P-256/P-384, a key that does not match the
    /// certificate, and a subject that issued certificates could not reproduce exactly.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, IdentityError> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|source| {
            IdentityError::Pem {
                what: "CA certificate",
                source,
            }
        })?;
        let cert = parse_cert(&der)?;
        check_is_ca(&cert)?;
        let key = KeyPair::from_pem(key_pem).map_err(IdentityError::Key)?;
        let curve = if key.algorithm() == &PKCS_ECDSA_P256_SHA256 {
            Curve::P256
        } else if key.algorithm() == &PKCS_ECDSA_P384_SHA384 {
            Curve::P384
        } else {
            return Err(IdentityError::UnsupportedCaKey(format!(
                "{:?}",
                key.algorithm()
            )));
        };
        check_key_matches(&cert, &key, curve)?;
        // rcgen panics on an empty RDN and cannot write multi-valued ones: refuse both first.
        if !cert.subject().iter().all(|rdn| rdn.iter().count() == 1) {
            return Err(IdentityError::SubjectNotReproducible);
        }
        let not_before = cert.validity().not_before.timestamp();
        let not_after = cert.validity().not_after.timestamp();
        let ca_subject = cert.subject().as_raw().to_vec();
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|_| IdentityError::SubjectNotReproducible)?;
        let ca = Ca {
            issuer,
            cert_pem: pem_encode("CERTIFICATE", &der),
            cert_der: der.to_vec(),
            fingerprint: hex::encode(Sha256::digest(&der)),
            not_before,
            not_after,
            curve,
        };
        ca.check_issuer_name(&ca_subject)?;
        Ok(ca)
    }

    /// The CA certificate, PEM (normalised: one section, LF line endings).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate's DER, lowercase hex: how the rotation state, the audit
    /// log and the store's `issuer` column name this CA.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The CA's notBefore.
    pub fn not_before(&self) -> SystemTime {
        to_system_time(self.not_before)
    }

    /// The CA's notAfter.
    pub fn not_after(&self) -> SystemTime {
        to_system_time(self.not_after)
    }

    /// Mints an X.509-SVID for the CSR's public key, carrying exactly `spiffe_id` and `dns_sans`.
    pub fn mint(&self, req: &MintRequest<'_>) -> Result<Svid, IdentityError> {
        let (not_before, not_after) = self.validity(req.now, req.ttl)?;
        let serial = Serial::random()?;
        let mut key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if req.csr.facts().key_algorithm == policy_sdk::KeyAlgorithm::Rsa {
            key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        let sans = subject_alt_names(req.spiffe_id, req.dns_sans, &[])?;
        let params = leaf_params(sans, key_usages, serial, not_before, not_after)?;
        let cert = params
            .signed_by(req.csr.public_key(), &self.issuer)
            .map_err(IdentityError::Signing)?;
        if parse_cert(cert.der())?.public_key().raw != req.csr.spki_der() {
            return Err(IdentityError::KeyNotPreserved);
        }
        Ok(Svid {
            serial,
            spiffe_id: req.spiffe_id.clone(),
            not_before: to_system_time(not_before),
            not_after: to_system_time(not_after),
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: self.fingerprint.clone(),
        })
    }

    /// The gateway's own TLS serving certificate (also an SVID): a fresh P-256 key, URI SAN
    /// `spiffe_id`, the given DNS and IP SANs, EKU serverAuth + clientAuth. Returns (certificate
    /// PEM, PKCS#8 private key PEM).
    pub fn issue_server_cert(
        &self,
        spiffe_id: &SpiffeId,
        dns: &[String],
        ips: &[IpAddr],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(String, String), IdentityError> {
        let (not_before, not_after) = self.validity(now, ttl)?;
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IdentityError::KeyGeneration)?;
        let sans = subject_alt_names(spiffe_id, dns, ips)?;
        let ku = vec![KeyUsagePurpose::DigitalSignature];
        let params = leaf_params(sans, ku, Serial::random()?, not_before, not_after)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(IdentityError::Signing)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A CRL signed by this CA listing `revoked`, numbered `number`, valid from `this_update`
    /// until `next_update`. Returns the DER.
    pub fn crl(
        &self,
        revoked: &[CrlEntry],
        number: u64,
        this_update: SystemTime,
        next_update: SystemTime,
    ) -> Result<Vec<u8>, IdentityError> {
        let revoked_certs = revoked
            .iter()
            .map(|entry| {
                Ok(rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from_slice(entry.serial.as_bytes()),
                    revocation_time: datetime(unix_secs(entry.revoked_at)?)?,
                    reason_code: Some(if entry.superseded {
                        rcgen::RevocationReason::Superseded
                    } else {
                        rcgen::RevocationReason::Unspecified
                    }),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, IdentityError>>()?;
        let params = rcgen::CertificateRevocationListParams {
            this_update: datetime(unix_secs(this_update)?)?,
            next_update: datetime(unix_secs(next_update)?)?,
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(IdentityError::Signing)?;
        Ok(crl.der().to_vec())
    }

    /// The curve and the uncompressed public point (`04 || X || Y`) of the CA key.
    pub(crate) fn public_point(&self) -> (Curve, &[u8]) {
        (self.curve, self.issuer.key().public_key_raw())
    }

    /// (notBefore, notAfter) in Unix seconds: `now` - skew to `now` + ttl, capped at the CA's
    /// notAfter.
    fn validity(&self, now: SystemTime, ttl: Duration) -> Result<(i64, i64), IdentityError> {
        if ttl.as_secs() == 0 {
            return Err(IdentityError::ZeroTtl);
        }
        let now = unix_secs(now)?;
        if self.not_after <= now {
            return Err(IdentityError::CaExpired {
                not_after: self.not_after(),
            });
        }
        let not_after = checked_add(now, ttl).map_or(self.not_after, |t| t.min(self.not_after));
        Ok((checked_sub(now, LEAF_CLOCK_SKEW)?, not_after))
    }

    /// Signs a throwaway certificate and checks that its issuer name is the CA subject byte for
    /// byte; otherwise nothing this CA issues would chain to it.
    fn check_issuer_name(&self, ca_subject: &[u8]) -> Result<(), IdentityError> {
        let probe = CertificateParams::default()
            .signed_by(self.issuer.key(), &self.issuer)
            .map_err(IdentityError::Signing)?;
        if parse_cert(probe.der())?.issuer().as_raw() != ca_subject {
            return Err(IdentityError::SubjectNotReproducible);
        }
        Ok(())
    }
}

impl fmt::Debug for Ca {
    /// Identifies the CA by certificate digest; the key never appears.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("cert_sha256", &self.fingerprint)
            .field("curve", &self.curve)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn check_is_ca(cert: &X509Certificate<'_>) -> Result<(), IdentityError> {
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(Some(_)) => return Err(IdentityError::NotACa("basicConstraints has CA:false")),
        Ok(None) => return Err(IdentityError::NotACa("no basicConstraints extension")),
        Err(e) => return Err(IdentityError::Certificate(e)),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            Err(IdentityError::NotACa("keyUsage lacks keyCertSign"))
        }
        Ok(_) => Ok(()),
        Err(e) => Err(IdentityError::Certificate(e)),
    }
}

fn check_key_matches(
    cert: &X509Certificate<'_>,
    key: &KeyPair,
    curve: Curve,
) -> Result<(), IdentityError> {
    let spki = cert.public_key();
    let curve_oid = match curve {
        Curve::P256 => OID_EC_P256,
        Curve::P384 => OID_NIST_EC_P384,
    };
    let same_curve = spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|oid| oid == curve_oid);
    if !same_curve || spki.subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(IdentityError::KeyMismatch);
    }
    Ok(())
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, IdentityError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(IdentityError::Certificate(X509Error::InvalidCertificate)),
        Err(x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e)) => {
            Err(IdentityError::Certificate(e))
        }
        Err(x509_parser::nom::Err::Incomplete(_)) => {
            Err(IdentityError::Certificate(X509Error::InvalidCertificate))
        }
    }
}
