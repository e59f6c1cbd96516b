//! The gateway's own serving certificate, issued again under another CA when a rotation makes
//! that CA the signer: same SPIFFE ID, DNS names and IP addresses, same lifetime, a fresh key.
//! Nothing else of the old certificate is carried over.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use x509_parser::extensions::GeneralName;

use super::ca::{Ca, LEAF_CLOCK_SKEW};
use super::error::IdentityError;
use super::spiffe::SpiffeId;

/// Issues the certificate `current` (DER) describes again under `ca`, valid from `now` for the
/// lifetime `current` had (capped by `ca`). Returns (certificate PEM, PKCS#8 key PEM).
pub fn reissue_server_cert(
    ca: &Ca,
    current: &[u8],
    now: SystemTime,
) -> Result<(String, String), IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(current)
        .map_err(|_| IdentityError::ServingCertificate("it does not parse"))?;
    let validity = cert.validity();
    let lifetime = validity
        .not_after
        .timestamp()
        .saturating_sub(validity.not_before.timestamp());
    // Issuance backdates notBefore by the clock skew; without it the lifetime grows by that
    // much at every re-issue.
    let lifetime =
        Duration::from_secs(u64::try_from(lifetime).unwrap_or(0)).saturating_sub(LEAF_CLOCK_SKEW);
    let (mut uris, mut dns, mut ips) = (Vec::new(), Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => uris.push(uri.to_string()),
                GeneralName::DNSName(name) => dns.push(name.to_string()),
                GeneralName::IPAddress(bytes) => ips.extend(ip(bytes)),
                _ => {}
            }
        }
    }
    let [uri] = uris.as_slice() else {
        return Err(IdentityError::ServingCertificate(
            "it does not carry exactly one URI SAN",
        ));
    };
    let spiffe_id = SpiffeId::parse(uri)
        .map_err(|_| IdentityError::ServingCertificate("its URI SAN is not a SPIFFE ID"))?;
    ca.issue_server_cert(&spiffe_id, &dns, &ips, lifetime, now)
}

fn ip(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

    use super::*;
    use crate::identity::{SpiffePath, TrustDomain};

    fn ca(name: &str) -> Ca {
        let td = TrustDomain::parse("serving.example").unwrap();
        let (cert, key) =
            Ca::generate_named(&td, name, Duration::from_secs(86_400), SystemTime::now()).unwrap();
        Ca::load(&cert, &key).unwrap()
    }

    fn sans(der: &[u8]) -> Vec<String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect()
    }

    #[test]
    fn the_reissued_certificate_carries_the_same_names_under_the_new_ca_with_a_new_key() {
        let (old, new) = (ca("CA 1"), ca("CA 2"));
        let id = SpiffeId::new(
            TrustDomain::parse("serving.example").unwrap(),
            SpiffePath::parse("/omnirelay/gateway").unwrap(),
        )
        .unwrap();
        let ips = [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        let lifetime = Duration::from_secs(3600);
        let (pem, key) = old
            .issue_server_cert(
                &id,
                &["localhost".into()],
                &ips,
                lifetime,
                SystemTime::now(),
            )
            .unwrap();
        let current = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (new_pem, new_key) = reissue_server_cert(&new, &current, SystemTime::now()).unwrap();
        let reissued = CertificateDer::from_pem_slice(new_pem.as_bytes()).unwrap();
        assert_eq!(sans(&reissued), sans(&current));
        assert_ne!(new_key, key);
        let (_, cert) = x509_parser::parse_x509_certificate(&reissued).unwrap();
        let validity = cert.validity();
        assert_eq!(
            validity.not_after.timestamp() - validity.not_before.timestamp(),
            3600 + 30,
            "the same lifetime and backdating as the certificate it replaces"
        );
        assert!(crate::identity::issued_by(
            &new,
            &reissued,
            SystemTime::now()
        ));
        assert!(!crate::identity::issued_by(
            &old,
            &reissued,
            SystemTime::now()
        ));
        // It serves for the names it had, verified by rustls-webpki under the new CA alone.
        let root = CertificateDer::from(new.cert_der());
        let anchors = [webpki::anchor_from_trusted_cert(&root).unwrap()];
        let leaf = webpki::EndEntityCert::try_from(&reissued).unwrap();
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .unwrap();
        for name in ["localhost", "127.0.0.1", "::1"] {
            let name = ServerName::try_from(name).unwrap();
            leaf.verify_is_valid_for_subject_name(&name).unwrap();
        }
    }

    #[test]
    fn a_certificate_without_one_spiffe_id_is_not_reissued() {
        let (old, new) = (ca("CA 1"), ca("CA 2"));
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert!(matches!(
            reissue_server_cert(&new, cert.der(), SystemTime::now()),
            Err(IdentityError::ServingCertificate(_))
        ));
        assert!(matches!(
            reissue_server_cert(&old, b"not a certificate", SystemTime::now()),
            Err(IdentityError::ServingCertificate(_))
        ));
    }
}
