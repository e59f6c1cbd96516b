//! Attestation at fixed times: nonces, freshness, replay, and `x509pop` against real device
//! certificates made with rcgen and checked by rustls-webpki, each refusal with its exact error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SerialNumber, SigningKey,
};
use sdk::{AttestationKind, Claim, ClaimValue};

use super::*;

/// 2025-06-15T14:13:20Z, in milliseconds; tests never read the clock.
const NOW_MS: u64 = 1_750_000_000_000;
const NOW_SECS: u64 = NOW_MS / 1000;
const SECRET: &[u8] = b"replica-shared-nonce-secret";
const NODE: &str = "node-7";
const CSR_KEY: [u8; 32] = [0x5a; 32];
/// The defaults: nonces live 300 s, evidence may be 300 s old or 30 s ahead.
const TTL_MS: u64 = 300_000;
const MAX_AGE_MS: u64 = 300_000;
const SKEW_MS: u64 = 30_000;

fn attestor(roots: DeviceRoots) -> Attestor {
    Attestor::new(AttestConfig::default(), SECRET, roots)
}

fn text(value: &str) -> ClaimValue {
    ClaimValue::Text(value.into())
}

fn posture() -> BTreeMap<String, ClaimValue> {
    BTreeMap::from([
        ("secure-boot".to_string(), ClaimValue::Flag(true)),
        ("agent-version".to_string(), text("1.2.3")),
        ("tpm-version".to_string(), ClaimValue::Integer(2)),
    ])
}

fn claim(name: &str, value: ClaimValue) -> Claim {
    Claim {
        name: name.into(),
        value,
    }
}

/// The posture claims as the policy sees them: sorted by name.
fn posture_claims() -> Vec<Claim> {
    vec![
        claim("agent-version", text("1.2.3")),
        claim("secure-boot", ClaimValue::Flag(true)),
        claim("tpm-version", ClaimValue::Integer(2)),
    ]
}

fn token_only(nonce: &str, issued_at_ms: u64) -> Evidence {
    Evidence {
        kind: AttestationKind::TokenOnly,
        nonce: nonce.into(),
        issued_at_ms,
        claims: posture(),
        x509pop: None,
    }
}

// ---- nonces ----

#[test]
fn a_nonce_round_trips_until_it_expires() {
    let challenges = Challenges::new(SECRET, Duration::from_millis(TTL_MS));
    let challenge = challenges.issue(NOW_MS);
    assert_eq!(challenge.expires_at, NOW_SECS + 300);
    assert_eq!(
        challenges.verify(&challenge.nonce, NOW_MS),
        Ok(NOW_SECS + 300)
    );
    // Valid through its last millisecond, refused from `expires_at` on.
    let expiry_ms = challenge.expires_at * 1000;
    assert_eq!(
        challenges.verify(&challenge.nonce, expiry_ms - 1),
        Ok(challenge.expires_at)
    );
    assert_eq!(
        challenges.verify(&challenge.nonce, expiry_ms),
        Err(AttestError::NonceExpired)
    );
    assert_eq!(
        challenges.verify(&challenge.nonce, expiry_ms + 3_600_000),
        Err(AttestError::NonceExpired)
    );
    // Two challenges are never the same nonce.
    assert_ne!(challenges.issue(NOW_MS).nonce, challenge.nonce);
}

#[test]
fn a_nonce_with_any_character_changed_is_invalid() {
    let challenges = Challenges::new(SECRET, Duration::from_millis(TTL_MS));
    let nonce = challenges.issue(NOW_MS).nonce;
    for (i, original) in nonce.char_indices() {
        let replacement = if original == 'A' { 'B' } else { 'A' };
        let mut flipped = nonce.clone();
        flipped.replace_range(i..=i, &replacement.to_string());
        assert_eq!(
            challenges.verify(&flipped, NOW_MS),
            Err(AttestError::InvalidNonce),
            "character {i} changed: {flipped}"
        );
    }
}

#[test]
fn a_nonce_from_another_secret_is_invalid() {
    let ours = Challenges::new(SECRET, Duration::from_millis(TTL_MS));
    let theirs = Challenges::new(b"another-gateway-secret", Duration::from_millis(TTL_MS));
    let nonce = theirs.issue(NOW_MS).nonce;
    assert_eq!(ours.verify(&nonce, NOW_MS), Err(AttestError::InvalidNonce));
    // And through the attestor, before anything else is looked at.
    let evidence = token_only(&nonce, NOW_MS);
    assert_eq!(
        attestor(DeviceRoots::none())
            .check(&evidence, NODE, &CSR_KEY, NOW_MS)
            .unwrap_err(),
        AttestError::InvalidNonce
    );
}

#[test]
fn garbage_and_wrong_length_nonces_are_invalid() {
    let challenges = Challenges::new(SECRET, Duration::from_millis(TTL_MS));
    let nonce = challenges.issue(NOW_MS).nonce;
    let raw = URL_SAFE_NO_PAD.decode(&nonce).unwrap();
    assert_eq!(raw.len(), 40);
    let shorter = URL_SAFE_NO_PAD.encode(&raw[..39]);
    let longer = URL_SAFE_NO_PAD.encode([&raw[..], &[0]].concat());
    let padded = format!("{nonce}==");
    let standard = STANDARD.encode(&raw);
    for bad in [
        "",
        "not a nonce",
        "!!!!",
        &shorter,
        &longer,
        &padded,
        &standard,
        &nonce[..nonce.len() - 1],
    ] {
        assert_eq!(
            challenges.verify(bad, NOW_MS),
            Err(AttestError::InvalidNonce),
            "{bad:?}"
        );
    }
}

#[test]
fn the_attestor_refuses_an_expired_nonce() {
    let attestor = attestor(DeviceRoots::none());
    let challenge = attestor.challenge(NOW_MS);
    let later = challenge.expires_at * 1000;
    // Fresh evidence, stale nonce.
    let evidence = token_only(&challenge.nonce, later);
    assert_eq!(
        attestor
            .check(&evidence, NODE, &CSR_KEY, later)
            .unwrap_err(),
        AttestError::NonceExpired
    );
}

// ---- freshness and replay ----

#[test]
fn evidence_is_fresh_up_to_the_age_limit_and_the_skew() {
    let attestor = attestor(DeviceRoots::none());
    let check = |issued_at_ms: u64| {
        let nonce = attestor.challenge(NOW_MS).nonce;
        attestor
            .check(&token_only(&nonce, issued_at_ms), NODE, &CSR_KEY, NOW_MS)
            .map(|checked| checked.attestation.issued_at_ms)
    };
    assert_eq!(check(NOW_MS - MAX_AGE_MS), Ok(NOW_MS - MAX_AGE_MS));
    assert_eq!(
        check(NOW_MS - MAX_AGE_MS - 1),
        Err(AttestError::Stale {
            age_secs: 300,
            max_secs: 300
        })
    );
    assert_eq!(check(NOW_MS + SKEW_MS), Ok(NOW_MS + SKEW_MS));
    assert_eq!(
        check(NOW_MS + SKEW_MS + 1),
        Err(AttestError::FromFuture {
            ahead_ms: SKEW_MS + 1
        })
    );
}

#[test]
fn a_nonce_is_good_for_one_join() {
    let attestor = attestor(DeviceRoots::none());
    let nonce = attestor.challenge(NOW_MS).nonce;
    let evidence = token_only(&nonce, NOW_MS);
    let checked = attestor.check(&evidence, NODE, &CSR_KEY, NOW_MS).unwrap();
    assert_eq!(checked.nonce, nonce);
    assert_eq!(checked.nonce_expires_at, NOW_SECS + 300);
    assert_eq!(
        attestor
            .check(&evidence, NODE, &CSR_KEY, NOW_MS + 1)
            .unwrap_err(),
        AttestError::Replayed
    );
}

#[test]
fn refused_evidence_does_not_burn_its_nonce() {
    let attestor = attestor(DeviceRoots::none());
    let nonce = attestor.challenge(NOW_MS).nonce;
    let stale = token_only(&nonce, NOW_MS - MAX_AGE_MS - 1);
    assert!(matches!(
        attestor.check(&stale, NODE, &CSR_KEY, NOW_MS),
        Err(AttestError::Stale { .. })
    ));
    let mut too_many = token_only(&nonce, NOW_MS);
    too_many.x509pop = Some(X509Pop {
        chain: vec![],
        signature: String::new(),
    });
    assert!(matches!(
        attestor.check(&too_many, NODE, &CSR_KEY, NOW_MS),
        Err(AttestError::ProofMismatch(_))
    ));
    let corrected = token_only(&nonce, NOW_MS);
    attestor.check(&corrected, NODE, &CSR_KEY, NOW_MS).unwrap();
    assert_eq!(
        attestor
            .check(&corrected, NODE, &CSR_KEY, NOW_MS)
            .unwrap_err(),
        AttestError::Replayed
    );
}

// ---- kinds and claims ----

#[test]
fn token_only_claims_are_all_self_reported() {
    let attestor = attestor(DeviceRoots::none());
    let nonce = attestor.challenge(NOW_MS).nonce;
    let checked = attestor
        .check(&token_only(&nonce, NOW_MS - 5), NODE, &CSR_KEY, NOW_MS)
        .unwrap();
    let attestation = checked.attestation;
    assert_eq!(attestation.kind, AttestationKind::TokenOnly);
    assert!(attestation.verified.is_empty());
    assert_eq!(attestation.self_reported, posture_claims());
    assert_eq!(attestation.issued_at_ms, NOW_MS - 5);
}

#[test]
fn a_proof_must_come_with_its_kind() {
    let attestor = attestor(DeviceRoots::none());
    let mut with_proof = token_only(&attestor.challenge(NOW_MS).nonce, NOW_MS);
    with_proof.x509pop = Some(X509Pop {
        chain: vec![],
        signature: String::new(),
    });
    assert_eq!(
        attestor
            .check(&with_proof, NODE, &CSR_KEY, NOW_MS)
            .unwrap_err(),
        AttestError::ProofMismatch("given with kind token-only")
    );
    let mut without_proof = token_only(&attestor.challenge(NOW_MS).nonce, NOW_MS);
    without_proof.kind = AttestationKind::X509pop;
    assert_eq!(
        attestor
            .check(&without_proof, NODE, &CSR_KEY, NOW_MS)
            .unwrap_err(),
        AttestError::ProofMismatch("missing")
    );
}

#[test]
fn claims_are_bounded_in_number_and_size() {
    let attestor = attestor(DeviceRoots::none());
    let check = |claims: BTreeMap<String, ClaimValue>| {
        let mut evidence = token_only(&attestor.challenge(NOW_MS).nonce, NOW_MS);
        evidence.claims = claims;
        attestor
            .check(&evidence, NODE, &CSR_KEY, NOW_MS)
            .map(|c| c.attestation.self_reported.len())
    };
    let many = |n: usize| {
        (0..n)
            .map(|i| (format!("claim-{i:02}"), ClaimValue::Integer(i as i64)))
            .collect::<BTreeMap<_, _>>()
    };
    let one = |name: String, value: ClaimValue| BTreeMap::from([(name, value)]);
    assert_eq!(check(many(32)), Ok(32));
    assert_eq!(
        check(many(33)),
        Err(AttestError::Claims("more than 32 claims"))
    );
    assert_eq!(check(one("v".into(), text(&"x".repeat(256)))), Ok(1));
    assert_eq!(
        check(one("v".into(), text(&"x".repeat(257)))),
        Err(AttestError::Claims(
            "a claim value is longer than 256 bytes"
        ))
    );
    let bad_name = Err(AttestError::Claims(
        "a claim name is empty or longer than 64 bytes",
    ));
    assert_eq!(check(one("n".repeat(64), ClaimValue::Flag(true))), Ok(1));
    assert_eq!(check(one("n".repeat(65), ClaimValue::Flag(true))), bad_name);
    assert_eq!(check(one(String::new(), ClaimValue::Flag(true))), bad_name);
}

// ---- x509pop ----

/// A CA or leaf validity around `NOW_SECS`.
fn validity(params: &mut CertificateParams, from: u64, until: u64) {
    let at = |secs: u64| time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap();
    params.not_before = at(from);
    params.not_after = at(until);
}

/// A device CA (CA:true) and its PEM file.
struct DeviceCa {
    issuer: Issuer<'static, KeyPair>,
    cert: Certificate,
}

impl DeviceCa {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.remove(DnType::CommonName);
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, NOW_SECS - 86_400, NOW_SECS + 10 * 365 * 86_400);
        let cert = params.self_signed(&key).unwrap();
        Self {
            issuer: Issuer::new(params, key),
            cert,
        }
    }

    /// `DeviceRoots` loaded from a PEM file holding this CA.
    fn roots(&self) -> DeviceRoots {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path: PathBuf = std::env::temp_dir().join(format!(
            "omnirelay-attest-{}-{}.pem",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, self.cert.pem()).unwrap();
        let roots = DeviceRoots::load(&[&path]);
        std::fs::remove_file(&path).unwrap();
        roots.unwrap()
    }

    /// A device certificate for [`NODE`] (serial 42:00:42), valid until `until`.
    fn device(&self, until: u64) -> Device {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.remove(DnType::CommonName);
        params.distinguished_name.push(DnType::CommonName, NODE);
        params.serial_number = Some(SerialNumber::from(vec![0x42, 0x00, 0x42]));
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, NOW_SECS - 3600, until);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Device { cert, key }
    }
}

struct Device {
    cert: Certificate,
    key: KeyPair,
}

impl Device {
    /// `x509pop` evidence with `claims`, signed by `signer` over the payload for `node` and
    /// `csr_key`.
    fn evidence(
        &self,
        nonce: &str,
        issued_at_ms: u64,
        signed_for: (&str, &[u8; 32]),
        signer: &KeyPair,
    ) -> Evidence {
        let mut evidence = Evidence {
            kind: AttestationKind::X509pop,
            nonce: nonce.into(),
            issued_at_ms,
            claims: posture(),
            x509pop: None,
        };
        let payload = pop_payload(&evidence, signed_for.0, signed_for.1);
        evidence.x509pop = Some(X509Pop {
            chain: vec![STANDARD.encode(self.cert.der())],
            signature: STANDARD.encode(signer.sign(&payload).unwrap()),
        });
        evidence
    }

    /// Correct evidence: signed by the device key for `NODE` and `CSR_KEY`.
    fn good(&self, nonce: &str, issued_at_ms: u64) -> Evidence {
        self.evidence(nonce, issued_at_ms, (NODE, &CSR_KEY), &self.key)
    }
}

const CERT_UNTIL: u64 = NOW_SECS + 365 * 86_400;

#[test]
fn a_device_joins_only_under_its_own_name() {
    let ca = DeviceCa::new("Device CA");
    let device = ca.device(CERT_UNTIL);
    let attestor = attestor(ca.roots());
    let nonce = attestor.challenge(NOW_MS).nonce;
    // The device signs a proof for another node's name: the signature is good, the name is
    // not the device's.
    let evidence = device.evidence(&nonce, NOW_MS, ("node-8", &CSR_KEY), &device.key);
    assert_eq!(
        attestor
            .check(&evidence, "node-8", &CSR_KEY, NOW_MS)
            .unwrap_err(),
        AttestError::NotThisDevice {
            device: NODE.into()
        }
    );
    // The nonce was not burnt by the refusal: the device's own join still works.
    attestor
        .check(&device.good(&nonce, NOW_MS), NODE, &CSR_KEY, NOW_MS)
        .unwrap();
}

#[test]
fn a_device_proves_possession_and_its_signed_claims_are_verified() {
    let ca = DeviceCa::new("Device CA");
    let device = ca.device(CERT_UNTIL);
    let attestor = attestor(ca.roots());
    let nonce = attestor.challenge(NOW_MS).nonce;
    let checked = attestor
        .check(&device.good(&nonce, NOW_MS), NODE, &CSR_KEY, NOW_MS)
        .unwrap();
    let attestation = checked.attestation;
    assert_eq!(attestation.kind, AttestationKind::X509pop);
    let mut expected = vec![
        claim("device-id", text(NODE)),
        claim("device-serial", text("420042")),
    ];
    expected.extend(posture_claims());
    assert_eq!(attestation.verified, expected);
    assert!(attestation.self_reported.is_empty());
    assert_eq!(checked.nonce, nonce);
}

#[test]
fn a_proof_signed_by_another_key_or_for_another_join_is_a_bad_signature() {
    let ca = DeviceCa::new("Device CA");
    let device = ca.device(CERT_UNTIL);
    let attestor = attestor(ca.roots());
    let nonce = attestor.challenge(NOW_MS).nonce;
    let other_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let other_csr = [0xa5; 32];
    let bad = [
        device.evidence(&nonce, NOW_MS, (NODE, &CSR_KEY), &other_key),
        device.evidence(&nonce, NOW_MS, ("node-8", &CSR_KEY), &device.key),
        device.evidence(&nonce, NOW_MS, (NODE, &other_csr), &device.key),
        {
            let mut altered = device.good(&nonce, NOW_MS);
            altered
                .claims
                .insert("secure-boot".into(), ClaimValue::Flag(false));
            altered
        },
        {
            let mut added = device.good(&nonce, NOW_MS);
            added.claims.insert("jailbroken".into(), text("no"));
            added
        },
        {
            let mut restamped = device.good(&nonce, NOW_MS);
            restamped.issued_at_ms += 1;
            restamped
        },
        {
            let mut garbled = device.good(&nonce, NOW_MS);
            garbled.x509pop.as_mut().unwrap().signature = "not base64!".into();
            garbled
        },
    ];
    for (i, evidence) in bad.iter().enumerate() {
        assert_eq!(
            attestor
                .check(evidence, NODE, &CSR_KEY, NOW_MS)
                .unwrap_err(),
            AttestError::BadSignature,
            "case {i}"
        );
    }
    // None of them burned the nonce.
    attestor
        .check(&device.good(&nonce, NOW_MS), NODE, &CSR_KEY, NOW_MS)
        .unwrap();
}

fn untrusted(result: Result<Checked, AttestError>) -> String {
    match result {
        Err(AttestError::UntrustedDevice(why)) => why,
        other => panic!("expected UntrustedDevice, got {other:?}"),
    }
}

#[test]
fn a_device_from_an_untrusted_ca_is_refused() {
    let trusted = DeviceCa::new("Device CA");
    let attestor = attestor(trusted.roots());
    let nonce = attestor.challenge(NOW_MS).nonce;
    let check = |device: Device| {
        untrusted(attestor.check(&device.good(&nonce, NOW_MS), NODE, &CSR_KEY, NOW_MS))
    };
    let why = check(DeviceCa::new("Other CA").device(CERT_UNTIL));
    assert!(why.contains("UnknownIssuer"), "{why}");
    // Same name, another key: only the signature on the device certificate tells them apart.
    let why = check(DeviceCa::new("Device CA").device(CERT_UNTIL));
    assert!(why.contains("InvalidSignatureForPublicKey"), "{why}");
}

#[test]
fn an_expired_device_certificate_is_refused() {
    let ca = DeviceCa::new("Device CA");
    let device = ca.device(NOW_SECS + 100);
    let attestor = attestor(ca.roots());
    let nonce = attestor.challenge(NOW_MS).nonce;
    // Still valid at its last second; refused one second past it, with the nonce still good.
    let at_end = (NOW_SECS + 100) * 1000;
    let past = at_end + 1000;
    let why = untrusted(attestor.check(&device.good(&nonce, past), NODE, &CSR_KEY, past));
    assert!(why.contains("CertExpired"), "{why}");
    attestor
        .check(&device.good(&nonce, at_end), NODE, &CSR_KEY, at_end)
        .unwrap();
}

#[test]
fn x509pop_needs_a_device_ca_and_a_sane_chain() {
    let ca = DeviceCa::new("Device CA");
    let device = ca.device(CERT_UNTIL);
    let without = attestor(DeviceRoots::none());
    let nonce = without.challenge(NOW_MS).nonce;
    assert_eq!(
        without
            .check(&device.good(&nonce, NOW_MS), NODE, &CSR_KEY, NOW_MS)
            .unwrap_err(),
        AttestError::NoDeviceCa
    );

    let with = attestor(ca.roots());
    let nonce = with.challenge(NOW_MS).nonce;
    let chain = |edit: &dyn Fn(&mut Vec<String>)| {
        let mut evidence = device.good(&nonce, NOW_MS);
        edit(&mut evidence.x509pop.as_mut().unwrap().chain);
        untrusted(with.check(&evidence, NODE, &CSR_KEY, NOW_MS))
    };
    chain(&|c| c.clear());
    chain(&|c| *c = vec![c[0].clone(); 5]);
    chain(&|c| c[0] = "%%%".into());
    chain(&|c| c[0] = STANDARD.encode(b"not a certificate"));
}

#[test]
fn a_signed_claim_cannot_pose_as_the_device_identity() {
    let ca = DeviceCa::new("Device CA");
    let device = ca.device(CERT_UNTIL);
    let attestor = attestor(ca.roots());
    let nonce = attestor.challenge(NOW_MS).nonce;
    for name in ["device-id", "device-serial"] {
        let mut evidence = Evidence {
            kind: AttestationKind::X509pop,
            nonce: nonce.clone(),
            issued_at_ms: NOW_MS,
            claims: BTreeMap::from([(name.to_string(), text("device-9999"))]),
            x509pop: None,
        };
        let payload = pop_payload(&evidence, NODE, &CSR_KEY);
        evidence.x509pop = Some(X509Pop {
            chain: vec![STANDARD.encode(device.cert.der())],
            signature: STANDARD.encode(device.key.sign(&payload).unwrap()),
        });
        assert_eq!(
            attestor
                .check(&evidence, NODE, &CSR_KEY, NOW_MS)
                .unwrap_err(),
            AttestError::Claims("device-id and device-serial come from the device certificate"),
            "{name}"
        );
    }
}

/// Generated evidence: whatever a network client sends as `attestation`, parsing and checking
/// return a typed answer and never panic; nothing without a nonce this gateway issued passes.
mod properties {
    use proptest::prelude::*;
    use serde::Deserialize;

    use super::*;

    fn claim_value() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            ".{0,300}".prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_evidence_is_refused_without_panicking(
            kind in prop_oneof![
                Just("token-only".to_string()),
                Just("x509pop".to_string()),
                ".{0,12}",
            ],
            nonce in ".{0,120}",
            issued_at_ms in any::<u64>(),
            claims in proptest::collection::btree_map(".{0,80}", claim_value(), 0..40),
            chain in proptest::collection::vec(".{0,200}", 0..6),
            signature in ".{0,120}",
        ) {
            let raw = serde_json::json!({
                "kind": kind,
                "nonce": nonce,
                "issued_at_ms": issued_at_ms,
                "claims": claims,
                "x509pop": { "chain": chain, "signature": signature },
            });
            let attestor = attestor(DeviceRoots::default());
            if let Ok(evidence) = Evidence::deserialize(&raw) {
                prop_assert!(attestor.check(&evidence, NODE, &CSR_KEY, NOW_MS).is_err());
            }
        }

        /// A real nonce with arbitrary claims: accepted only within the claim bounds.
        #[test]
        fn claims_are_bounded(
            claims in proptest::collection::btree_map("[a-z-]{0,80}", ".{0,300}", 0..40),
        ) {
            let attestor = attestor(DeviceRoots::default());
            let nonce = attestor.challenge(NOW_MS).nonce;
            let raw = serde_json::json!({
                "kind": "token-only",
                "nonce": nonce,
                "issued_at_ms": NOW_MS,
                "claims": claims,
            });
            let evidence = Evidence::deserialize(&raw).unwrap();
            match attestor.check(&evidence, NODE, &CSR_KEY, NOW_MS) {
                Ok(checked) => {
                    prop_assert!(checked.attestation.self_reported.len() <= 32);
                    for c in &checked.attestation.self_reported {
                        prop_assert!(!c.name.is_empty() && c.name.len() <= 64);
                    }
                }
                Err(e) => prop_assert!(matches!(e, AttestError::Claims(_)), "{e:?}"),
            }
        }
    }
}
