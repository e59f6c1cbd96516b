//! Host bindings for the `omnirelay:bootstrap-policy@0.1.0` world, and conversions between its
//! generated types and the SDK's plain types (which the rest of the gateway uses).

#![allow(missing_docs, missing_debug_implementations)] // generated code

use policy_sdk as sdk;

wasmtime::component::bindgen!({
    path: "../wit",
    world: "policy",
});

pub use omnirelay::bootstrap_policy::host::{Host, LogLevel};
use omnirelay::bootstrap_policy::types as wit;

/// The request record as the generated bindings spell it.
pub type WitRequest = wit::Request;

/// The WIT package version these bindings implement.
pub const WORLD_VERSION: &str = "0.1.0";

impl From<&sdk::Request> for wit::Request {
    fn from(r: &sdk::Request) -> Self {
        Self {
            // WIT 0.1.0 has no `manual` case (a new enum case is a new package version, which
            // every deployed policy would have to be rebuilt for): a manual issuance travels as
            // `join` with `omnirelay.request-kind = manual`, which the SDK turns back.
            kind: match r.kind {
                sdk::RequestKind::Join | sdk::RequestKind::Manual => wit::RequestKind::Join,
                sdk::RequestKind::Renew => wit::RequestKind::Renew,
            },
            token: wit::TokenClaims {
                audit_id: r.token.audit_id.clone(),
                cluster: r.token.cluster.clone(),
                role: r.token.role.clone(),
                trust_domain: r.token.trust_domain.clone(),
                not_before: r.token.not_before,
                expires_at: r.token.expires_at,
                max_uses: r.token.max_uses,
                uses_left: r.token.uses_left,
            },
            attestation: wit::Attestation {
                kind: match r.attestation.kind {
                    sdk::AttestationKind::TokenOnly => wit::AttestationKind::TokenOnly,
                    sdk::AttestationKind::X509pop => wit::AttestationKind::X509pop,
                },
                verified: claims(&r.attestation.verified),
                self_reported: claims(&r.attestation.self_reported),
                issued_at_ms: r.attestation.issued_at_ms,
            },
            csr: wit::CsrFacts {
                key_algorithm: match r.csr.key_algorithm {
                    sdk::KeyAlgorithm::EcdsaP256 => wit::KeyAlgorithm::EcdsaP256,
                    sdk::KeyAlgorithm::EcdsaP384 => wit::KeyAlgorithm::EcdsaP384,
                    sdk::KeyAlgorithm::Ed25519 => wit::KeyAlgorithm::Ed25519,
                    sdk::KeyAlgorithm::Rsa => wit::KeyAlgorithm::Rsa,
                    sdk::KeyAlgorithm::Other => wit::KeyAlgorithm::Other,
                },
                key_bits: r.csr.key_bits,
                requested_dns_names: r.csr.requested_dns_names.clone(),
                requested_uris: r.csr.requested_uris.clone(),
            },
            node_name: r.node_name.clone(),
            client_address: r.client_address.clone(),
            now_ms: r.now_ms,
            extensions: r
                .extensions
                .iter()
                .filter(|kv| kv.key != sdk::EXT_REQUEST_KIND)
                .map(|kv| wit::Kv {
                    key: kv.key.clone(),
                    value: kv.value.clone(),
                })
                .chain((r.kind == sdk::RequestKind::Manual).then(|| wit::Kv {
                    key: sdk::EXT_REQUEST_KIND.into(),
                    value: "manual".into(),
                }))
                .collect(),
        }
    }
}

fn claims(list: &[sdk::Claim]) -> Vec<wit::Claim> {
    list.iter()
        .map(|c| wit::Claim {
            name: c.name.clone(),
            value: match &c.value {
                sdk::ClaimValue::Flag(b) => wit::ClaimValue::Flag(*b),
                sdk::ClaimValue::Integer(i) => wit::ClaimValue::Integer(*i),
                sdk::ClaimValue::Text(t) => wit::ClaimValue::Text(t.clone()),
            },
        })
        .collect()
}

impl From<wit::Decision> for sdk::Decision {
    fn from(d: wit::Decision) -> Self {
        match d {
            wit::Decision::Allow(a) => sdk::Decision::Allow(sdk::Allow {
                spiffe_path: a.spiffe_path,
                ttl_seconds: a.ttl_seconds,
                dns_sans: a.dns_sans,
                obligations: a
                    .obligations
                    .into_iter()
                    .map(|o| match o {
                        wit::Obligation::RenewAfterSeconds(s) => {
                            sdk::Obligation::RenewAfterSeconds(s)
                        }
                        wit::Obligation::AuditNote(n) => sdk::Obligation::AuditNote(n),
                    })
                    .collect(),
                matched_rules: a.matched_rules,
            }),
            wit::Decision::Deny(d) => sdk::Decision::Deny(sdk::Deny {
                code: d.code,
                reason: d.reason,
                node_message: d.node_message,
                retry_after_seconds: d.retry_after_seconds,
            }),
        }
    }
}
