//! The attestation evidence a node sends with a join, as it travels on the wire: the kind, the
//! gateway's nonce, the time, posture claims and, for `x509pop`, the device chain and its
//! signature over [`pop_payload`]. The node builds it here; the gateway's `attest` module
//! checks it against the same definitions, so both sides sign and verify the same bytes.

use std::collections::BTreeMap;

use policy_sdk as sdk;
use serde::{Deserialize, Serialize};

/// The `attestation` object of a join request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    /// `token-only` or `x509pop`.
    pub kind: sdk::AttestationKind,
    /// From `GET /v1/bootstrap/challenge`.
    pub nonce: String,
    /// When the node produced the evidence, Unix milliseconds.
    pub issued_at_ms: u64,
    /// Posture claims. Signed by the device key under `x509pop` (then verified), self-reported
    /// otherwise.
    #[serde(default)]
    pub claims: BTreeMap<String, sdk::ClaimValue>,
    /// The device certificate chain and signature, for `x509pop`.
    #[serde(default)]
    pub x509pop: Option<X509Pop>,
}

/// Proof of possession of a device key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509Pop {
    /// Base64 DER certificates, the device's first, then intermediates.
    pub chain: Vec<String>,
    /// Base64 signature by the device key over [`pop_payload`].
    pub signature: String,
}

/// The exact bytes a device signs: every line is `name=value`, claims as canonical (sorted)
/// JSON. Changing any of them — a replayed nonce, another node, another CSR key — breaks the
/// signature.
pub fn pop_payload(evidence: &Evidence, node: &str, csr_key_sha256: &[u8; 32]) -> Vec<u8> {
    // BTreeMap serialises in key order: the encoding is canonical. It cannot fail.
    let claims = serde_json::to_string(&evidence.claims).unwrap_or_default();
    format!(
        "omnirelay-x509pop-v1\nnonce={}\nissued_at_ms={}\nnode={}\ncsr_key_sha256={}\nclaims={}\n",
        evidence.nonce,
        evidence.issued_at_ms,
        node,
        hex::encode(csr_key_sha256),
        claims
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_binds_every_field_and_the_claims_in_canonical_order() {
        let mut claims = BTreeMap::new();
        claims.insert("z".to_string(), sdk::ClaimValue::Integer(1));
        claims.insert("a".to_string(), sdk::ClaimValue::Flag(true));
        let evidence = Evidence {
            kind: sdk::AttestationKind::X509pop,
            nonce: "n0nce".into(),
            issued_at_ms: 1_700_000_000_123,
            claims,
            x509pop: None,
        };
        let payload = String::from_utf8(pop_payload(&evidence, "edge-17", &[0xab; 32])).unwrap();
        let expected = format!(
            "omnirelay-x509pop-v1\nnonce=n0nce\nissued_at_ms=1700000000123\nnode=edge-17\n\
             csr_key_sha256={}\nclaims={{\"a\":true,\"z\":1}}\n",
            "ab".repeat(32)
        );
        assert_eq!(payload, expected);
        assert_ne!(
            pop_payload(&evidence, "edge-18", &[0xab; 32]),
            payload.as_bytes()
        );
    }
}
