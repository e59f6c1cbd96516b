//! Signing and verification end to end, each refusal asserted by its exact variant. Hostile
//! tokens are forged with `SigningKey::sign_parts`, which signs any header and payload text.

use std::time::Duration;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::*;

const AUDIENCE: &str = "omnirelay.example";
const LEEWAY: Duration = Duration::from_secs(30);
const NOW: u64 = 1_500;

fn claims() -> Claims {
    Claims {
        id: TokenId::random(),
        issuer: "omnirelay".to_string(),
        audience: AUDIENCE.to_string(),
        cluster: "edge-eu".to_string(),
        role: "relay".to_string(),
        issued_at: 1_000,
        not_before: 1_000,
        expires_at: 2_000,
        max_uses: 3,
        node: None,
        supersede: false,
    }
}

fn key() -> SigningKey {
    SigningKey::generate().unwrap().0
}

fn verifier(keys: &[&SigningKey]) -> Verifier {
    Verifier::new(AUDIENCE, keys.iter().map(|k| k.verifying_key()), LEEWAY)
}

/// Signs `claims` after applying `edit` to their JSON, bypassing `Claims`' types.
fn sign_edited(key: &SigningKey, edit: impl FnOnce(&mut Value)) -> String {
    let mut payload = claims().to_json();
    edit(&mut payload);
    let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": key.kid()});
    key.sign_parts(&header.to_string(), &payload.to_string())
}

/// Signs the usual claims under a hand-written header.
fn sign_header(key: &SigningKey, header: Value) -> String {
    key.sign_parts(&header.to_string(), &claims().to_json().to_string())
}

fn b64(text: &str) -> String {
    URL_SAFE_NO_PAD.encode(text)
}

fn pem(label: &str, der: &[u8]) -> String {
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        STANDARD.encode(der)
    )
}

#[test]
fn round_trip_returns_identical_claims() {
    let key = key();
    let want = claims();
    let got = verifier(&[&key]).verify(&key.sign(&want), NOW).unwrap();
    assert_eq!(got, want);
}

#[test]
fn tampered_payload_is_a_bad_signature() {
    let key = key();
    let token = key.sign(&claims());
    let [header, _, signature] = token.split('.').collect::<Vec<_>>()[..] else {
        panic!("not three parts: {token}");
    };
    let mut greedy = claims();
    greedy.max_uses = 1_000_000;
    let payload = b64(&greedy.to_json().to_string());
    let forged = format!("{header}.{payload}.{signature}");
    let err = verifier(&[&key]).verify(&forged, NOW).unwrap_err();
    assert!(matches!(err, TokenError::BadSignature), "{err:?}");
}

#[test]
fn tampered_signature_is_a_bad_signature() {
    let key = key();
    let token = key.sign(&claims());
    let (signed, signature) = token.rsplit_once('.').unwrap();
    // The first character carries six whole bits, so the result is still canonical base64url.
    let flipped = if signature.starts_with('A') { 'B' } else { 'A' };
    let forged = format!("{signed}.{flipped}{}", &signature[1..]);
    let err = verifier(&[&key]).verify(&forged, NOW).unwrap_err();
    assert!(matches!(err, TokenError::BadSignature), "{err:?}");
}

#[test]
fn another_key_claiming_our_kid_is_a_bad_signature() {
    let (ours, impostor) = (key(), key());
    let forged = sign_header(
        &impostor,
        json!({"alg": "EdDSA", "typ": "JWT", "kid": ours.kid()}),
    );
    let err = verifier(&[&ours]).verify(&forged, NOW).unwrap_err();
    assert!(matches!(err, TokenError::BadSignature), "{err:?}");
}

#[test]
fn unknown_kid_is_an_unknown_key() {
    let (ours, theirs) = (key(), key());
    let err = verifier(&[&ours])
        .verify(&theirs.sign(&claims()), NOW)
        .unwrap_err();
    assert!(
        matches!(&err, TokenError::UnknownKey(kid) if kid == theirs.kid()),
        "{err:?}"
    );
    assert_eq!(err.reason(), "unknown-key");
}

#[test]
fn rotation_accepts_tokens_from_every_trusted_key() {
    let (old, new) = (key(), key());
    let verifier = verifier(&[&old, &new]);
    for key in [&old, &new] {
        let want = claims();
        assert_eq!(verifier.verify(&key.sign(&want), NOW).unwrap(), want);
    }
}

#[test]
fn expired_and_not_yet_valid_carry_their_bound() {
    let key = key();
    let token = key.sign(&claims());
    let verifier = verifier(&[&key]);
    let err = verifier.verify(&token, 5_000).unwrap_err();
    assert!(
        matches!(err, TokenError::Expired { expires_at: 2_000 }),
        "{err:?}"
    );
    assert_eq!(err.reason(), "expired");
    let err = verifier.verify(&token, 10).unwrap_err();
    assert!(
        matches!(err, TokenError::NotYetValid { not_before: 1_000 }),
        "{err:?}"
    );
    assert_eq!(err.reason(), "not-yet-valid");
}

#[test]
fn leeway_boundaries_are_inclusive_at_nbf_and_exclusive_at_exp() {
    let key = key();
    let token = key.sign(&claims());
    let verifier = verifier(&[&key]);
    // nbf 1000 and exp 2000 with 30 s of leeway: valid for 970 <= now < 2030.
    for now in [970, 971, 2_028, 2_029] {
        assert!(verifier.verify(&token, now).is_ok(), "now = {now}");
    }
    let err = verifier.verify(&token, 969).unwrap_err();
    assert!(matches!(err, TokenError::NotYetValid { .. }), "{err:?}");
    let err = verifier.verify(&token, 2_030).unwrap_err();
    assert!(matches!(err, TokenError::Expired { .. }), "{err:?}");
    let strict = Verifier::new(AUDIENCE, [key.verifying_key()], Duration::ZERO);
    assert!(strict.verify(&token, 1_000).is_ok());
    let err = strict.verify(&token, 2_000).unwrap_err();
    assert!(matches!(err, TokenError::Expired { .. }), "{err:?}");
}

#[test]
fn wrong_audience_says_which_audience() {
    let key = key();
    let token = key.sign(&Claims {
        audience: "other.example".to_string(),
        ..claims()
    });
    let err = verifier(&[&key]).verify(&token, NOW).unwrap_err();
    assert!(
        matches!(&err, TokenError::WrongAudience(aud) if aud == "other.example"),
        "{err:?}"
    );
}

#[test]
fn alg_none_with_an_empty_signature_is_unsupported() {
    let key = key();
    let header = b64(r#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64(&claims().to_json().to_string());
    let token = format!("{header}.{payload}.");
    let err = verifier(&[&key]).verify(&token, NOW).unwrap_err();
    assert!(
        matches!(&err, TokenError::UnsupportedAlgorithm(alg) if alg == "none"),
        "{err:?}"
    );
}

#[test]
fn alg_hs256_keyed_with_our_public_key_is_unsupported() {
    use aws_lc_rs::hmac;
    let key = key();
    let header = b64(&json!({"alg": "HS256", "typ": "JWT", "kid": key.kid()}).to_string());
    let signed = format!("{header}.{}", b64(&claims().to_json().to_string()));
    // The classic confusion attack: HMAC keyed with the verifier's public key.
    let secret = hmac::Key::new(
        hmac::HMAC_SHA256,
        key.verifying_key().to_public_pem().as_bytes(),
    );
    let tag = hmac::sign(&secret, signed.as_bytes());
    let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
    let err = verifier(&[&key]).verify(&token, NOW).unwrap_err();
    assert!(
        matches!(&err, TokenError::UnsupportedAlgorithm(alg) if alg == "HS256"),
        "{err:?}"
    );
}

#[test]
fn header_without_kid_is_refused() {
    let key = key();
    let token = sign_header(&key, json!({"alg": "EdDSA", "typ": "JWT"}));
    let err = verifier(&[&key]).verify(&token, NOW).unwrap_err();
    assert!(matches!(err, TokenError::MissingKeyId), "{err:?}");
}

#[test]
fn crit_header_is_refused_whatever_its_value() {
    let key = key();
    let verifier = verifier(&[&key]);
    for crit in [json!(["exp"]), json!([]), Value::Null] {
        let token = sign_header(
            &key,
            json!({"alg": "EdDSA", "typ": "JWT", "kid": key.kid(), "crit": crit}),
        );
        let err = verifier.verify(&token, NOW).unwrap_err();
        assert!(matches!(err, TokenError::CriticalHeader), "{crit}: {err:?}");
    }
}

#[test]
fn typ_other_than_jwt_is_refused_and_absent_typ_is_fine() {
    let key = key();
    let verifier = verifier(&[&key]);
    let token = sign_header(
        &key,
        json!({"alg": "EdDSA", "typ": "at+jwt", "kid": key.kid()}),
    );
    let err = verifier.verify(&token, NOW).unwrap_err();
    assert!(
        matches!(&err, TokenError::UnsupportedType(typ) if typ == "at+jwt"),
        "{err:?}"
    );
    let token = sign_header(&key, json!({"alg": "EdDSA", "kid": key.kid()}));
    assert!(verifier.verify(&token, NOW).is_ok());
}

#[test]
fn oversized_token_is_refused_before_any_parsing() {
    let key = key();
    let verifier = verifier(&[&key]);
    let err = verifier.verify(&"!".repeat(4_097), NOW).unwrap_err();
    assert!(matches!(err, TokenError::TooLong(4_097)), "{err:?}");
    // At the limit, the same garbage gets as far as the structure check.
    let err = verifier.verify(&"!".repeat(4_096), NOW).unwrap_err();
    assert!(matches!(err, TokenError::Malformed("structure")), "{err:?}");
    // A validly signed token that is simply too big is refused all the same.
    let token = sign_edited(&key, |p| p["pad"] = json!("x".repeat(4_000)));
    let err = verifier.verify(&token, NOW).unwrap_err();
    assert!(
        matches!(err, TokenError::TooLong(n) if n == token.len()),
        "{err:?}"
    );
}

#[test]
fn malformed_tokens_name_the_bad_part() {
    let key = key();
    let verifier = verifier(&[&key]);
    let token = key.sign(&claims());
    let (header, rest) = token.split_once('.').unwrap();
    let (payload, signature) = rest.split_once('.').unwrap();
    let cases = [
        ("%%%.%%%.%%%".to_string(), "header"),
        (format!("{header}={header}.{payload}.{signature}"), "header"),
        (
            format!("{}.{payload}.{signature}", b64("{not json")),
            "header",
        ),
        (format!("{header}.{payload}.{signature}=="), "signature"),
        (format!("{header}.{payload}"), "structure"),
        (format!("{header}.{payload}.{signature}.x"), "structure"),
        ("no dots at all".to_string(), "structure"),
    ];
    for (token, part) in cases {
        let err = verifier.verify(&token, NOW).unwrap_err();
        assert!(
            matches!(err, TokenError::Malformed(p) if p == part),
            "{token}: {err:?}"
        );
    }
    // A validly signed payload that is not JSON.
    let header = json!({"alg": "EdDSA", "kid": key.kid()}).to_string();
    let err = verifier
        .verify(&key.sign_parts(&header, "not json"), NOW)
        .unwrap_err();
    assert!(matches!(err, TokenError::Malformed("payload")), "{err:?}");
}

fn assert_invalid_claim(token: &str, verifier: &Verifier, want: &str) {
    let err = verifier.verify(token, NOW).unwrap_err();
    assert!(
        matches!(&err, TokenError::InvalidClaim { claim, .. } if *claim == want),
        "{err:?}"
    );
    assert_eq!(err.reason(), "invalid-claim");
}

#[test]
fn cluster_and_role_must_be_safe_path_segments() {
    let key = key();
    let verifier = verifier(&[&key]);
    for bad in ["Edge/EU", "", ".", "..", "edge eu", "ÉDGE", &"a".repeat(64)] {
        let token = key.sign(&Claims {
            cluster: bad.to_string(),
            ..claims()
        });
        assert_invalid_claim(&token, &verifier, "cluster");
        let token = key.sign(&Claims {
            role: bad.to_string(),
            ..claims()
        });
        assert_invalid_claim(&token, &verifier, "role");
    }
    let token = key.sign(&Claims {
        cluster: "a.b-c_9".to_string(),
        role: "r".repeat(63),
        ..claims()
    });
    assert!(verifier.verify(&token, NOW).is_ok());
}

#[test]
fn max_uses_must_be_between_one_and_a_million() {
    let key = key();
    let verifier = verifier(&[&key]);
    for bad in [
        json!(0),
        json!(1_000_001),
        json!(u64::MAX),
        json!(-1),
        json!(1.5),
    ] {
        let token = sign_edited(&key, |p| p["max_uses"] = bad);
        assert_invalid_claim(&token, &verifier, "max_uses");
    }
    let token = key.sign(&Claims {
        max_uses: MAX_USES_LIMIT,
        ..claims()
    });
    assert!(verifier.verify(&token, NOW).is_ok());
}

#[test]
fn other_claim_rules() {
    let key = key();
    let verifier = verifier(&[&key]);
    type Edit = fn(&mut Value);
    let edits: [(&str, Edit); 7] = [
        ("jti", |p| p["jti"] = json!("not-a-uuid")),
        ("jti", |p| {
            p["jti"] = json!("67E55044-10B1-426F-9247-BB680E5FE0C8");
        }),
        // Inside the leeway window, so only the ordering rule can refuse them.
        ("exp", |p| {
            (p["nbf"], p["exp"]) = (json!(NOW), json!(NOW));
        }),
        ("exp", |p| {
            (p["nbf"], p["exp"]) = (json!(NOW + 10), json!(NOW - 10));
        }),
        ("exp", |p| p["exp"] = json!("2000")),
        ("iss", |p| {
            p.as_object_mut().unwrap().remove("iss");
        }),
        ("aud", |p| p["aud"] = json!([AUDIENCE])),
    ];
    for (claim, edit) in edits {
        assert_invalid_claim(&sign_edited(&key, edit), &verifier, claim);
    }
    // Unknown claims are ignored.
    let token = sign_edited(&key, |p| p["node_hint"] = json!({"rack": 7}));
    assert!(verifier.verify(&token, NOW).is_ok());
}

#[test]
fn repeated_claim_or_header_parameter_is_malformed() {
    let key = key();
    let verifier = verifier(&[&key]);
    let payload = claims().to_json().to_string();
    let twice = format!(r#"{{"aud":"other.example",{}"#, &payload[1..]);
    let header = json!({"alg": "EdDSA", "kid": key.kid()}).to_string();
    let err = verifier
        .verify(&key.sign_parts(&header, &twice), NOW)
        .unwrap_err();
    assert!(matches!(err, TokenError::Malformed("payload")), "{err:?}");
    let header = format!(r#"{{"alg":"none","alg":"EdDSA","kid":"{}"}}"#, key.kid());
    let err = verifier
        .verify(&key.sign_parts(&header, &payload), NOW)
        .unwrap_err();
    assert!(matches!(err, TokenError::Malformed("header")), "{err:?}");
}

#[test]
fn signing_key_pem_round_trips() {
    let (key, pem) = SigningKey::generate().unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
    let loaded = SigningKey::from_pkcs8_pem(&pem).unwrap();
    assert_eq!(loaded.kid(), key.kid());
    let want = claims();
    let token = loaded.sign(&want);
    assert_eq!(verifier(&[&key]).verify(&token, NOW).unwrap(), want);
}

#[test]
fn public_key_pem_round_trips_and_matches_aws_lc() {
    let (key, pem) = SigningKey::generate().unwrap();
    let public_pem = key.verifying_key().to_public_pem();
    let loaded = VerifyingKey::from_public_pem(&public_pem).unwrap();
    assert_eq!(loaded.kid(), key.kid());
    assert_eq!(loaded.to_public_pem(), public_pem);
    // Oracle: aws-lc's own SPKI encoding of the same key, and the kid recomputed by hand.
    let der = aws_lc_spki(&pem);
    let from_aws_lc = VerifyingKey::from_public_pem(&self::pem("PUBLIC KEY", &der)).unwrap();
    assert_eq!(from_aws_lc.kid(), key.kid());
    let raw = &der[der.len() - 32..];
    let want = format!("ed25519-{}", &hex::encode(Sha256::digest(raw))[..16]);
    assert_eq!(key.kid(), want);
}

/// The SPKI DER aws-lc derives from a PKCS#8 PEM, independent of our encoding.
fn aws_lc_spki(pem: &str) -> Vec<u8> {
    let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap();
    pair.public_key().as_der().unwrap().as_ref().to_vec()
}

#[test]
fn keys_of_other_kinds_are_refused() {
    let p256 = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    let spki = p256.public_key().as_der().unwrap();
    let err = VerifyingKey::from_public_pem(&pem("PUBLIC KEY", spki.as_ref())).unwrap_err();
    assert!(matches!(err, TokenError::NotEd25519), "{err:?}");
    let pkcs8 = p256.to_pkcs8v1().unwrap();
    let err = SigningKey::from_pkcs8_pem(&pem("PRIVATE KEY", pkcs8.as_ref())).unwrap_err();
    assert!(matches!(err, TokenError::KeyRejected(_)), "{err:?}");
    let err = SigningKey::from_pkcs8_pem("not a pem").unwrap_err();
    assert!(matches!(err, TokenError::KeyPem { .. }), "{err:?}");
    let err = VerifyingKey::from_public_pem("").unwrap_err();
    assert!(matches!(err, TokenError::KeyPem { .. }), "{err:?}");
}

#[test]
fn debug_never_prints_keys_or_tokens() {
    let (key, pem) = SigningKey::generate().unwrap();
    let debug = format!("{key:?}");
    assert_eq!(debug, format!("SigningKey {{ kid: {:?}, .. }}", key.kid()));
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!debug.contains(&body), "{debug}");
    let debug = format!("{:?}", key.verifying_key());
    assert_eq!(
        debug,
        format!("VerifyingKey {{ kid: {:?}, .. }}", key.kid())
    );
    let token = key.sign(&claims());
    let secret = TokenString::new(token.clone());
    assert_eq!(secret.as_str(), token);
    let debug = format!("{secret:?}");
    for segment in token.split('.') {
        assert!(!debug.contains(&segment[..8]), "{debug}");
    }
    assert_eq!(
        debug,
        format!("TokenString(<redacted, {} bytes>)", token.len())
    );
}

#[test]
fn token_ids_have_one_spelling() {
    let id = TokenId::random();
    let text = id.to_string();
    assert_eq!(TokenId::parse(&text).unwrap(), id);
    assert_eq!(serde_json::to_value(id).unwrap(), json!(text));
    assert_eq!(serde_json::from_value::<TokenId>(json!(text)).unwrap(), id);
    assert!(serde_json::from_value::<TokenId>(json!(text.to_uppercase())).is_err());
    let simple = text.replace('-', "");
    for bad in [
        text.to_uppercase(),
        simple,
        format!("{{{text}}}"),
        String::new(),
    ] {
        let err = TokenId::parse(&bad).unwrap_err();
        assert!(
            matches!(err, TokenError::InvalidClaim { claim: "jti", .. }),
            "{bad}: {err:?}"
        );
    }
}

#[test]
fn node_binding_and_supersede_round_trip_and_are_checked() {
    let key = key();
    let verifier = verifier(&[&key]);
    let bound = Claims {
        node: Some("edge-17".into()),
        supersede: true,
        ..claims()
    };
    let verified = verifier.verify(&key.sign(&bound), NOW).unwrap();
    assert_eq!(verified.node.as_deref(), Some("edge-17"));
    assert!(verified.supersede);
    // Absent claims mean unbound and no supersede.
    let plain = verifier.verify(&key.sign(&claims()), NOW).unwrap();
    assert_eq!((plain.node, plain.supersede), (None, false));
    for bad in ["Edge-17", "-a", "a/b", "", &"a".repeat(64)] {
        let token = key.sign(&Claims {
            node: Some(bad.to_string()),
            ..claims()
        });
        assert_invalid_claim(&token, &verifier, "node");
    }
    for bad in [json!("yes"), json!(1)] {
        let token = sign_edited(&key, |p| p["supersede"] = bad);
        assert_invalid_claim(&token, &verifier, "supersede");
    }
    let token = sign_edited(&key, |p| p["node"] = json!(7));
    assert_invalid_claim(&token, &verifier, "node");
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever a network client sends as a token, verification returns a typed answer and
        /// never panics; nothing but a token our key signed verifies.
        #[test]
        fn arbitrary_tokens_never_panic_and_never_verify(text in ".{0,400}") {
            let key = key();
            prop_assert!(verifier(&[&key]).verify(&text, NOW).is_err());
        }

        /// Three base64url segments of arbitrary bytes: the shape of a JWS, the content of noise.
        #[test]
        fn jws_shaped_noise_is_refused(
            header in proptest::collection::vec(any::<u8>(), 0..200),
            payload in proptest::collection::vec(any::<u8>(), 0..400),
            signature in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            use base64::Engine;
            let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            let token = format!("{}.{}.{}", b64(&header), b64(&payload), b64(&signature));
            let key = key();
            prop_assert!(verifier(&[&key]).verify(&token, NOW).is_err());
        }

        /// Any edit of a valid token's payload is refused (the signature covers every byte).
        #[test]
        fn edited_payloads_are_refused(flip in 0usize..4096, bit in 0u8..8) {
            let key = key();
            let token = key.sign(&claims());
            let (head, rest) = token.split_once('.').unwrap();
            let (payload, sig) = rest.split_once('.').unwrap();
            let mut bytes = payload.as_bytes().to_vec();
            let i = flip % bytes.len();
            bytes[i] ^= 1 << bit;
            let edited = format!("{head}.{}.{sig}", String::from_utf8_lossy(&bytes));
            prop_assume!(edited != token);
            prop_assert!(verifier(&[&key]).verify(&edited, NOW).is_err());
        }
    }
}

#[test]
fn a_remembered_token_is_still_checked_against_the_clock_and_a_tampered_one_never_passes() {
    let key = key();
    let v = verifier(&[&key]);
    let token = key.sign(&claims());
    assert!(v.verify(&token, NOW).is_ok());
    // Remembered now; the time window still applies on every presentation.
    assert!(v.verify(&token, NOW + 1).is_ok());
    assert!(matches!(
        v.verify(&token, 2_000 + LEEWAY.as_secs()),
        Err(TokenError::Expired { expires_at: 2_000 })
    ));
    assert!(matches!(
        v.verify(&token, 1_000 - LEEWAY.as_secs() - 1),
        Err(TokenError::NotYetValid { not_before: 1_000 })
    ));
    // One flipped byte is another token: verified from scratch, and refused.
    let mut tampered = token.into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert!(v.verify(&tampered, NOW).is_err());
    assert!(
        v.verify(&tampered, NOW).is_err(),
        "a failure is not remembered"
    );
}
