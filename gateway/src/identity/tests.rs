//! Issuance tests against oracles nobody here wrote: rustls-webpki for path validation, the
//! `spiffe` crate for X.509-SVID rules, x509-parser for every extension of the result.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_SIG_ECDSA_WITH_SHA256, OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
    OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE,
    OID_X509_EXT_SUBJECT_ALT_NAME, OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
};

use super::*;

/// A fixed issuance time (2025-06-15T14:13:20Z); tests never read the clock.
const NOW_UNIX: u64 = 1_750_000_000;
const DAY: Duration = Duration::from_secs(86_400);
const LIMIT: usize = 16 * 1024;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW_UNIX)
}

fn td() -> TrustDomain {
    TrustDomain::parse("example.org").unwrap()
}

fn node_id() -> SpiffeId {
    SpiffeId::new(td(), SpiffePath::parse("/node/n1").unwrap()).unwrap()
}

fn new_ca(validity: Duration) -> Ca {
    let (cert, key) = Ca::generate(&td(), validity, now()).unwrap();
    Ca::load(&cert, &key).unwrap()
}

fn csr(key: &KeyPair, edit: impl FnOnce(&mut CertificateParams)) -> VerifiedCsr {
    let mut params = CertificateParams::default();
    edit(&mut params);
    let pem = params.serialize_request(key).unwrap().pem().unwrap();
    verify_csr(&pem, LIMIT).unwrap()
}

fn mint(ca: &Ca, csr: &VerifiedCsr, dns: &[String], ttl: Duration) -> Svid {
    ca.mint(&MintRequest {
        csr,
        spiffe_id: &node_id(),
        dns_sans: dns,
        ttl,
        now: now(),
    })
    .unwrap()
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    assert!(rest.is_empty());
    cert
}

fn webpki_verify(
    ca: &Ca,
    leaf: &[u8],
    usage: webpki::KeyUsage,
    at: SystemTime,
) -> Result<(), webpki::Error> {
    let ca_der = CertificateDer::from(ca.cert_der());
    let anchors = [webpki::anchor_from_trusted_cert(&ca_der)?];
    let leaf = CertificateDer::from(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf)?;
    let time = UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).unwrap());
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &[],
        time,
        usage,
        None,
        None,
    )
    .map(|_| ())
}

#[test]
fn minted_svid_verifies_with_webpki_and_the_spiffe_parser_sees_the_granted_id() {
    let ca = new_ca(DAY);
    let key = KeyPair::generate().unwrap();
    let dns = vec!["n1.nodes.example.org".to_string()];
    let svid = mint(&ca, &csr(&key, |_| {}), &dns, Duration::from_secs(3600));

    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        webpki_verify(&ca, &svid.cert_der, usage, now()).unwrap();
    }
    let leaf = CertificateDer::from(svid.cert_der.as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    let name = ServerName::try_from("n1.nodes.example.org").unwrap();
    ee.verify_is_valid_for_subject_name(&name).unwrap();

    let parsed = ::spiffe::X509Svid::parse_from_der(&svid.cert_der, key.serialized_der()).unwrap();
    assert_eq!(
        parsed.spiffe_id().to_string(),
        "spiffe://example.org/node/n1"
    );
    assert_eq!(svid.spiffe_id, node_id());
    assert_eq!(
        CertificateDer::from_pem_slice(svid.cert_pem.as_bytes())
            .unwrap()
            .as_ref(),
        svid.cert_der
    );
}

#[test]
fn hostile_csr_requests_never_reach_the_certificate() {
    let ca = new_ca(DAY);
    let key = KeyPair::generate().unwrap();
    let hostile = csr(&key, |p| {
        p.distinguished_name.push(DnType::CommonName, "admin");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        p.subject_alt_names = vec![
            SanType::DnsName("evil.example".try_into().unwrap()),
            SanType::URI("spiffe://evil.example/admin".try_into().unwrap()),
        ];
    });
    // The policy still sees what was asked for.
    assert_eq!(
        hostile.facts().requested_uris,
        ["spiffe://evil.example/admin"]
    );
    let dns = vec!["n1.nodes.example.org".to_string()];
    let svid = mint(&ca, &hostile, &dns, Duration::from_secs(3600));
    let cert = parse(&svid.cert_der);
    let ca_cert = parse(ca.cert_der());

    assert_eq!(cert.version(), x509_parser::x509::X509Version::V3);
    assert_eq!(cert.subject().iter().count(), 0, "subject must be empty");
    assert_eq!(cert.issuer().as_raw(), ca_cert.subject().as_raw());
    assert_eq!(
        cert.signature_algorithm.algorithm,
        OID_SIG_ECDSA_WITH_SHA256
    );
    let oids: Vec<String> = cert
        .extensions()
        .iter()
        .map(|e| e.oid.to_id_string())
        .collect();
    let mut want = [
        &OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
        &OID_X509_EXT_SUBJECT_ALT_NAME,
        &OID_X509_EXT_KEY_USAGE,
        &OID_X509_EXT_EXTENDED_KEY_USAGE,
        &OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
        &OID_X509_EXT_BASIC_CONSTRAINTS,
    ]
    .map(|o| o.to_id_string());
    let mut got = oids.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "exactly these extensions, each once");

    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                assert!(ext.critical, "SAN is critical with an empty subject");
                assert_eq!(
                    san.general_names,
                    [
                        GeneralName::URI("spiffe://example.org/node/n1"),
                        GeneralName::DNSName("n1.nodes.example.org"),
                    ]
                );
            }
            ParsedExtension::BasicConstraints(bc) => {
                assert!(ext.critical);
                assert!(!bc.ca);
                assert_eq!(bc.path_len_constraint, None);
            }
            ParsedExtension::KeyUsage(ku) => {
                assert!(ext.critical);
                assert!(ku.digital_signature());
                assert!(!ku.key_cert_sign() && !ku.crl_sign() && !ku.key_encipherment());
                assert_eq!(ku.flags, 1, "digitalSignature only");
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                assert!(eku.server_auth && eku.client_auth);
                assert!(!eku.code_signing && !eku.any && !eku.email_protection);
                assert!(!eku.time_stamping && !eku.ocsp_signing && eku.other.is_empty());
            }
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                let ca_ski = ca_cert
                    .extensions()
                    .iter()
                    .find_map(|e| match e.parsed_extension() {
                        ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0),
                        _ => None,
                    })
                    .unwrap();
                assert_eq!(aki.key_identifier.as_ref().unwrap().0, ca_ski);
            }
            ParsedExtension::SubjectKeyIdentifier(_) => {}
            other => panic!("unexpected extension {other:?}"),
        }
    }
    webpki_verify(&ca, &svid.cert_der, webpki::KeyUsage::client_auth(), now()).unwrap();
    ::spiffe::X509Svid::parse_from_der(&svid.cert_der, key.serialized_der()).unwrap();
}

#[test]
fn every_leaf_gets_a_fresh_16_byte_positive_serial() {
    let ca = new_ca(DAY);
    let key = KeyPair::generate().unwrap();
    let request = csr(&key, |_| {});
    let a = mint(&ca, &request, &[], Duration::from_secs(60));
    let b = mint(&ca, &request, &[], Duration::from_secs(60));
    assert_ne!(a.serial, b.serial);
    for svid in [&a, &b] {
        let cert = parse(&svid.cert_der);
        assert_eq!(cert.raw_serial(), svid.serial.as_bytes());
        assert_eq!(cert.raw_serial().len(), 16);
        assert!((0x01..=0x7f).contains(&cert.raw_serial()[0]));
    }
}

#[test]
fn lifetime_is_ttl_from_skewed_now_and_capped_at_the_ca() {
    let ca = new_ca(Duration::from_secs(7200));
    assert_eq!(ca.not_after(), now() + Duration::from_secs(7200));
    let request = csr(&KeyPair::generate().unwrap(), |_| {});
    let at = |svid: &Svid| {
        let cert = parse(&svid.cert_der);
        let v = cert.validity();
        (v.not_before.timestamp(), v.not_after.timestamp())
    };
    let now_s = i64::try_from(NOW_UNIX).unwrap();

    let short = mint(&ca, &request, &[], Duration::from_secs(600));
    assert_eq!(at(&short), (now_s - 30, now_s + 600));
    assert_eq!(short.not_before, now() - LEAF_CLOCK_SKEW);
    assert_eq!(short.not_after, now() + Duration::from_secs(600));

    let long = mint(&ca, &request, &[], DAY);
    assert_eq!(at(&long), (now_s - 30, now_s + 7200));
    assert_eq!(long.not_after, ca.not_after());

    // Sub-second parts are dropped, and the Svid says exactly what the certificate says.
    let svid = ca
        .mint(&MintRequest {
            csr: &request,
            spiffe_id: &node_id(),
            dns_sans: &[],
            ttl: Duration::from_millis(90_900),
            now: now() + Duration::from_millis(700),
        })
        .unwrap();
    assert_eq!(at(&svid), (now_s - 30, now_s + 90));

    let refuse = |ttl: Duration, at: SystemTime| {
        ca.mint(&MintRequest {
            csr: &request,
            spiffe_id: &node_id(),
            dns_sans: &[],
            ttl,
            now: at,
        })
        .unwrap_err()
    };
    assert!(matches!(
        refuse(Duration::ZERO, now()),
        IdentityError::ZeroTtl
    ));
    let late = refuse(Duration::from_secs(60), ca.not_after());
    assert!(matches!(late, IdentityError::CaExpired { .. }), "{late:?}");
    assert_eq!(late.reason(), "ca-expired");
}

#[test]
fn rsa_leaf_gets_key_encipherment_and_ec_leaf_does_not() {
    let ca = new_ca(DAY);
    let rsa = verify_csr(include_str!("testdata/rsa2048.csr"), LIMIT).unwrap();
    let ec = csr(&KeyPair::generate().unwrap(), |_| {});
    for (request, encipher) in [(&rsa, true), (&ec, false)] {
        let svid = mint(&ca, request, &[], Duration::from_secs(600));
        let cert = parse(&svid.cert_der);
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature());
        assert_eq!(ku.key_encipherment(), encipher);
        assert_eq!(ku.flags, if encipher { 0b101 } else { 0b1 });
        webpki_verify(&ca, &svid.cert_der, webpki::KeyUsage::client_auth(), now()).unwrap();
    }
}

#[test]
fn the_certificate_carries_the_csr_public_key_unchanged() {
    let ca = new_ca(DAY);
    let mut requests = vec![verify_csr(include_str!("testdata/rsa2048.csr"), LIMIT).unwrap()];
    for alg in [
        &PKCS_ECDSA_P256_SHA256,
        &PKCS_ECDSA_P384_SHA384,
        &PKCS_ED25519,
    ] {
        requests.push(csr(&KeyPair::generate_for(alg).unwrap(), |_| {}));
    }
    for request in &requests {
        let svid = mint(&ca, request, &[], Duration::from_secs(600));
        let cert = parse(&svid.cert_der);
        let spki: [u8; 32] = Sha256::digest(cert.public_key().raw).into();
        assert_eq!(spki, request.public_key_sha256(), "{request:?}");
    }
}

#[test]
fn invalid_granted_dns_names_are_refused() {
    let ca = new_ca(DAY);
    let request = csr(&KeyPair::generate().unwrap(), |_| {});
    for bad in ["bad name.example", "", "a..b", "évil.example"] {
        let err = ca
            .mint(&MintRequest {
                csr: &request,
                spiffe_id: &node_id(),
                dns_sans: &[bad.to_string()],
                ttl: Duration::from_secs(60),
                now: now(),
            })
            .unwrap_err();
        assert!(
            matches!(&err, IdentityError::InvalidDnsName(n) if n == bad),
            "{err:?}"
        );
        assert_eq!(err.reason(), "invalid-dns-name");
    }
}

#[test]
fn generated_ca_round_trips_through_load_with_the_promised_shape() {
    let (cert_pem, key_pem) = Ca::generate(&td(), DAY, now()).unwrap();
    let ca = Ca::load(&cert_pem, &key_pem).unwrap();
    assert_eq!(ca.cert_pem(), cert_pem);
    assert_eq!(
        ca.cert_der(),
        CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .unwrap()
            .as_ref()
    );
    assert_eq!(ca.not_after(), now() + DAY);

    let cert = parse(ca.cert_der());
    let subject: Vec<String> = cert
        .subject()
        .iter_attributes()
        .map(|a| format!("{}={}", a.attr_type().to_id_string(), a.as_str().unwrap()))
        .collect();
    assert_eq!(
        subject,
        ["2.5.4.10=OmniRelay", "2.5.4.3=OmniRelay bootstrap CA"]
    );
    assert_eq!(
        cert.validity().not_before.timestamp(),
        i64::try_from(NOW_UNIX).unwrap() - 60
    );
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && bc.value.ca);
    assert_eq!(bc.value.path_len_constraint, Some(0));
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && ku.digital_signature());
    assert_eq!(ku.flags, 0b110_0001);
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(
        san.general_names,
        [GeneralName::URI("spiffe://example.org")]
    );
    assert_eq!(cert.raw_serial().len(), 16);
    assert!((0x01..=0x7f).contains(&cert.raw_serial()[0]));

    // Debug names the CA without its key.
    let debug = format!("{ca:?}");
    let key_b64: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(debug.starts_with("Ca { cert_sha256: "), "{debug}");
    assert!(!debug.contains(&key_b64[..16]) && !debug.contains("PRIVATE"));
}

#[test]
fn load_refuses_non_ca_certificates_and_foreign_keys() {
    let ca = new_ca(DAY);
    let (leaf_pem, leaf_key) = ca
        .issue_server_cert(&node_id(), &[], &[], Duration::from_secs(600), now())
        .unwrap();
    let err = Ca::load(&leaf_pem, &leaf_key).unwrap_err();
    assert!(
        matches!(err, IdentityError::NotACa("basicConstraints has CA:false")),
        "{err:?}"
    );
    assert_eq!(err.reason(), "not-a-ca");

    let key = KeyPair::generate().unwrap();
    let plain = CertificateParams::default().self_signed(&key).unwrap();
    let err = Ca::load(&plain.pem(), &key.serialize_pem()).unwrap_err();
    assert!(
        matches!(err, IdentityError::NotACa("no basicConstraints extension")),
        "{err:?}"
    );

    let mut no_sign = CertificateParams::default();
    no_sign.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    no_sign.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let no_sign = no_sign.self_signed(&key).unwrap();
    let err = Ca::load(&no_sign.pem(), &key.serialize_pem()).unwrap_err();
    assert!(
        matches!(err, IdentityError::NotACa("keyUsage lacks keyCertSign")),
        "{err:?}"
    );

    let (a_cert, _) = Ca::generate(&td(), DAY, now()).unwrap();
    let (_, b_key) = Ca::generate(&td(), DAY, now()).unwrap();
    let err = Ca::load(&a_cert, &b_key).unwrap_err();
    assert!(matches!(err, IdentityError::KeyMismatch), "{err:?}");
    assert_eq!(err.reason(), "ca-key-mismatch");

    let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let err = Ca::load(&a_cert, &ed.serialize_pem()).unwrap_err();
    assert!(matches!(err, IdentityError::UnsupportedCaKey(_)), "{err:?}");

    let err = Ca::load("not pem", &b_key).unwrap_err();
    assert!(
        matches!(
            err,
            IdentityError::Pem {
                what: "CA certificate",
                ..
            }
        ),
        "{err:?}"
    );
    let err = Ca::load(&a_cert, "not pem").unwrap_err();
    assert!(matches!(err, IdentityError::Key(_)), "{err:?}");
}

#[test]
fn server_cert_verifies_for_localhost_and_loopback() {
    let ca = new_ca(DAY);
    let gateway = SpiffeId::new(td(), SpiffePath::parse("/omnirelay/gateway").unwrap()).unwrap();
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (cert_pem, key_pem) = ca
        .issue_server_cert(
            &gateway,
            &["localhost".to_string()],
            &[loopback],
            2 * DAY,
            now(),
        )
        .unwrap();
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    webpki_verify(&ca, &der, webpki::KeyUsage::server_auth(), now()).unwrap();
    webpki_verify(&ca, &der, webpki::KeyUsage::client_auth(), now()).unwrap();
    let ee = webpki::EndEntityCert::try_from(&der).unwrap();
    for name in ["localhost", "127.0.0.1"] {
        ee.verify_is_valid_for_subject_name(&ServerName::try_from(name).unwrap())
            .unwrap();
    }
    assert!(
        ee.verify_is_valid_for_subject_name(&ServerName::try_from("example.com").unwrap())
            .is_err()
    );

    // The key is a fresh P-256 key that belongs to the certificate.
    let key = KeyPair::from_pem(&key_pem).unwrap();
    assert_eq!(key.algorithm(), &PKCS_ECDSA_P256_SHA256);
    let cert = parse(&der);
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    assert_ne!(key.public_key_raw(), ca.public_point().1);
    let parsed = ::spiffe::X509Svid::parse_from_der(&der, key.serialized_der()).unwrap();
    assert_eq!(
        parsed.spiffe_id().to_string(),
        "spiffe://example.org/omnirelay/gateway"
    );
    // Capped at the CA like any leaf.
    assert_eq!(
        cert.validity().not_after.timestamp(),
        i64::try_from(NOW_UNIX + 86_400).unwrap()
    );
}

#[test]
fn an_openssl_made_ca_issues_leaves_that_chain_to_it() {
    // `openssl req -x509 -newkey ec` (P-256, SHA-1 subject key identifier, UTF8String names).
    let ca = Ca::load(
        include_str!("testdata/openssl-ca.crt"),
        include_str!("testdata/openssl-ca.key"),
    )
    .unwrap();
    let ca_cert = parse(ca.cert_der());
    let not_before = u64::try_from(ca_cert.validity().not_before.timestamp()).unwrap();
    let at = UNIX_EPOCH + Duration::from_secs(not_before) + DAY;
    let key = KeyPair::generate().unwrap();
    let request = csr(&key, |_| {});
    let svid = ca
        .mint(&MintRequest {
            csr: &request,
            spiffe_id: &node_id(),
            dns_sans: &[],
            ttl: Duration::from_secs(600),
            now: at,
        })
        .unwrap();
    webpki_verify(&ca, &svid.cert_der, webpki::KeyUsage::client_auth(), at).unwrap();
    let cert = parse(&svid.cert_der);
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.clone(),
            _ => None,
        })
        .unwrap();
    let ski = ca_cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0),
            _ => None,
        })
        .unwrap();
    assert_eq!(aki.0, ski);
    assert_eq!(ski.len(), 20);
}

#[test]
fn ca_subjects_that_cannot_be_reproduced_are_refused() {
    // OU=a, OU=b: rcgen keeps one OU, so the issuer name would differ.
    // O=a+CN=...: a multi-valued RDN, which rcgen cannot write.
    for (cert, key) in [
        (
            include_str!("testdata/dup-ou-ca.crt"),
            include_str!("testdata/dup-ou-ca.key"),
        ),
        (
            include_str!("testdata/multi-rdn-ca.crt"),
            include_str!("testdata/multi-rdn-ca.key"),
        ),
    ] {
        let err = Ca::load(cert, key).unwrap_err();
        assert!(
            matches!(err, IdentityError::SubjectNotReproducible),
            "{err:?}"
        );
        assert_eq!(err.reason(), "ca-subject-not-reproducible");
    }
}

#[test]
fn a_p384_ca_issues_and_is_described_as_p384() {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params.not_before = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let ca = Ca::load(&cert.pem(), &key.serialize_pem()).unwrap();

    let svid = mint(&ca, &csr(&KeyPair::generate().unwrap(), |_| {}), &[], DAY);
    webpki_verify(&ca, &svid.cert_der, webpki::KeyUsage::server_auth(), now()).unwrap();

    let bundle = spiffe_bundle(&[&ca], 1, Duration::from_secs(60));
    let jwk = &bundle["keys"][0];
    assert_eq!(jwk["crv"], "P-384");
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let point = key.public_key_raw();
    assert_eq!(
        b64.decode(jwk["x"].as_str().unwrap()).unwrap(),
        point[1..49]
    );
    assert_eq!(
        b64.decode(jwk["y"].as_str().unwrap()).unwrap(),
        point[49..97]
    );
}

/// Generated input for the parsers a network client or a policy reaches: CSR intake and SPIFFE
/// IDs and paths. No input panics; every refusal is a typed error; what is accepted satisfies
/// the SPIFFE rules, checked independently of the parser.
mod properties {
    use base64::Engine;
    use proptest::prelude::*;

    use super::*;

    /// The SPIFFE path rules, written out again without the parser.
    fn is_spiffe_path(p: &str) -> bool {
        p.len() <= MAX_SPIFFE_ID_LEN
            && p.len() > 1
            && p.starts_with('/')
            && p[1..].split('/').all(|s| {
                !s.is_empty()
                    && s != "."
                    && s != ".."
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_text_as_a_csr_is_refused(text in ".{0,2000}") {
            prop_assert!(verify_csr(&text, LIMIT).is_err());
        }

        /// PEM armour around noise: the shape of a CSR, the content of garbage.
        #[test]
        fn pem_wrapped_noise_is_refused(der in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
            let pem = format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n"
            );
            prop_assert!(verify_csr(&pem, LIMIT).is_err());
        }

        /// A real CSR with one byte flipped anywhere in its DER: refused (the signature or the
        /// structure breaks) or, when the flip lands in an ignored spot, still the same key.
        #[test]
        fn a_flipped_byte_in_a_real_csr_never_panics(at in 0usize..4096, bit in 0u8..8) {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let csr = CertificateParams::default().serialize_request(&key).unwrap();
            let mut der = csr.der().to_vec();
            let i = at % der.len();
            der[i] ^= 1 << bit;
            let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
            let pem = format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n"
            );
            if let Ok(verified) = verify_csr(&pem, LIMIT) {
                prop_assert_eq!(verified.public_key_sha256(), {
                    let good = verify_csr(&csr.pem().unwrap(), LIMIT).unwrap();
                    good.public_key_sha256()
                });
            }
        }

        #[test]
        fn spiffe_paths_are_accepted_exactly_when_the_rules_allow(path in "(/[a-zA-Z0-9._%@ -]{0,12}){0,6}/?") {
            match SpiffePath::parse(&path) {
                Ok(parsed) => {
                    prop_assert!(is_spiffe_path(&path), "{path:?} accepted");
                    prop_assert_eq!(parsed.as_str(), path.as_str());
                }
                Err(_) => prop_assert!(!is_spiffe_path(&path), "{path:?} refused"),
            }
        }

        #[test]
        fn arbitrary_spiffe_ids_never_panic(text in ".{0,300}") {
            if let Ok(id) = SpiffeId::parse(&text) {
                prop_assert!(text.starts_with("spiffe://"));
                prop_assert_eq!(id.to_string(), text);
            }
        }
    }
}
