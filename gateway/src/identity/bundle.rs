//! Trust bundles: the CA certificates as PEM, and as a SPIFFE bundle (a JWK Set per the SPIFFE
//! Trust Domain and Bundle specification, §4). Promises that both describe exactly the CAs given,
//! in order, and that each JWK's key is the one in its `x5c` certificate.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

use super::ca::{Ca, Curve};

/// The concatenated PEM certificates of `cas` (the trust bundle served at `GET /v1/bundle`).
pub fn bundle_pem(cas: &[&Ca]) -> String {
    cas.iter().map(|ca| ca.cert_pem()).collect()
}

/// The SPIFFE bundle of `cas`: one `x509-svid` JWK per CA, with `spiffe_sequence` and
/// `spiffe_refresh_hint` (whole seconds).
pub fn spiffe_bundle(cas: &[&Ca], sequence: u64, refresh_hint: Duration) -> Value {
    let keys: Vec<Value> = cas.iter().map(|ca| jwk(ca)).collect();
    json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint.as_secs(),
    })
}

/// An EC JWK (RFC 7518 §6.2) for the CA key, with the CA certificate as `x5c`.
fn jwk(ca: &Ca) -> Value {
    let (curve, point) = ca.public_point();
    let (crv, len) = match curve {
        Curve::P256 => ("P-256", 32),
        Curve::P384 => ("P-384", 48),
    };
    // `Ca::load` only accepts P-256/P-384 keys, whose rcgen public key is the uncompressed SEC1
    // point `04 || X || Y`; `get` keeps this total anyway.
    let x = point.get(1..1 + len).unwrap_or_default();
    let y = point.get(1 + len..1 + 2 * len).unwrap_or_default();
    json!({
        "kty": "EC",
        "crv": crv,
        "x": URL_SAFE_NO_PAD.encode(x),
        "y": URL_SAFE_NO_PAD.encode(y),
        "use": "x509-svid",
        "x5c": [STANDARD.encode(ca.cert_der())],
    })
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use rustls_pki_types::pem::PemObject;

    use super::*;
    use crate::identity::TrustDomain;

    fn ca() -> Ca {
        let td = TrustDomain::parse("example.org").unwrap();
        let (cert, key) =
            Ca::generate(&td, Duration::from_secs(86_400), SystemTime::now()).unwrap();
        Ca::load(&cert, &key).unwrap()
    }

    #[test]
    fn jwk_carries_the_ca_public_point_and_certificate() {
        let (a, b) = (ca(), ca());
        let bundle = spiffe_bundle(&[&a, &b], 7, Duration::from_millis(300_900));
        assert_eq!(bundle["spiffe_sequence"], 7);
        assert_eq!(bundle["spiffe_refresh_hint"], 300);
        let keys = bundle["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        for (jwk, ca) in keys.iter().zip([&a, &b]) {
            // The point as the certificate states it, parsed independently of `Ca`.
            let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
            let point = cert.public_key().subject_public_key.data.to_vec();
            assert_eq!(point.len(), 65);
            assert_eq!(point[0], 4);
            assert_eq!(jwk["kty"], "EC");
            assert_eq!(jwk["crv"], "P-256");
            assert_eq!(jwk["use"], "x509-svid");
            let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
            let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
            assert_eq!(x, point[1..33]);
            assert_eq!(y, point[33..65]);
            let x5c = jwk["x5c"].as_array().unwrap();
            assert_eq!(x5c.len(), 1);
            assert_eq!(
                STANDARD.decode(x5c[0].as_str().unwrap()).unwrap(),
                ca.cert_der()
            );
            let members: Vec<&str> = jwk
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.as_str())
                .collect();
            assert_eq!(members.len(), 6, "{members:?}");
        }
    }

    #[test]
    fn pem_bundle_is_the_certificates_in_order() {
        let (a, b) = (ca(), ca());
        let pem = bundle_pem(&[&a, &b]);
        let ders: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ders.len(), 2);
        assert_eq!(ders[0].as_ref(), a.cert_der());
        assert_eq!(ders[1].as_ref(), b.cert_der());
        assert_eq!(bundle_pem(&[]), "");
    }
}
