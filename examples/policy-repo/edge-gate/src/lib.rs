//! `edge-gate`, the example of `examples/policy-repo`: admits the listed clusters and roles as
//! `spiffe://<trust-domain>/edge/{cluster}/{role}/{node}`, but never a node that reports itself
//! in maintenance, and notes the release that decided in the audit log.
//!
//! Settings:
//!
//! ```json
//! { "clusters": ["edge-eu"], "roles": ["dispatcher"], "ttl_seconds": 3600, "release": "2026.11" }
//! ```

#![no_std]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use policy_sdk::{Allow, ClaimValue, Decision, Deny, Obligation, Policy, PolicyError, Request};
use serde::Deserialize;

/// The policy.
#[derive(Debug)]
pub struct EdgeGate;

/// What the bundle configures.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Clusters admitted.
    pub clusters: Vec<String>,
    /// Roles admitted.
    pub roles: Vec<String>,
    /// SVID lifetime.
    pub ttl_seconds: u32,
    /// A label recorded with every issuance (audit note).
    pub release: String,
}

impl Policy for EdgeGate {
    type Settings = Settings;

    fn validate(settings: &Settings) -> Result<(), String> {
        if settings.clusters.is_empty() || settings.roles.is_empty() || settings.ttl_seconds < 60 {
            return Err("clusters and roles must be listed and ttl_seconds at least 60".into());
        }
        Ok(())
    }

    fn evaluate(settings: &Settings, request: &Request) -> Result<Decision, PolicyError> {
        let t = &request.token;
        if !settings.clusters.contains(&t.cluster) || !settings.roles.contains(&t.role) {
            return Ok(Decision::Deny(
                Deny::new(
                    "not-an-edge-node",
                    format!("{}/{} is not admitted", t.cluster, t.role),
                )
                .node_message("this token does not admit an edge node"),
            ));
        }
        // Self-reported, so it can only make the answer stricter, never looser.
        if request.attestation.self_reported_claim("maintenance") == Some(&ClaimValue::Flag(true)) {
            return Ok(Decision::Deny(
                Deny::new("node-in-maintenance", "the node reports maintenance mode")
                    .node_message("leave maintenance mode before joining")
                    .retry_after(300),
            ));
        }
        let path = format!("/edge/{}/{}/{}", t.cluster, t.role, request.node_identity());
        Ok(Decision::Allow(
            Allow::new(path, settings.ttl_seconds)
                .obligation(Obligation::AuditNote(format!(
                    "edge-gate release {}",
                    settings.release
                )))
                .matched("edge-listed"),
        ))
    }
}

policy_sdk::export_policy!(EdgeGate);

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use policy_sdk::{Claim, testing};

    const SETTINGS: &str = r#"{"clusters": ["edge-eu"], "roles": ["dispatcher"], "ttl_seconds": 900, "release": "r1"}"#;

    #[test]
    fn edge_nodes_get_their_path_and_the_release_is_noted() {
        let decision = testing::evaluate::<EdgeGate>(
            SETTINGS,
            &testing::request("edge-eu", "dispatcher", "n1"),
        );
        let Ok(Decision::Allow(allow)) = decision else {
            panic!("{decision:?}")
        };
        assert_eq!(allow.spiffe_path, "/edge/edge-eu/dispatcher/n1");
        assert_eq!(
            allow.obligations,
            [Obligation::AuditNote("edge-gate release r1".to_string())]
        );
    }

    #[test]
    fn a_node_in_maintenance_is_refused() {
        let mut request = testing::request("edge-eu", "dispatcher", "n1");
        request.attestation.self_reported = alloc::vec![Claim {
            name: "maintenance".to_string(),
            value: ClaimValue::Flag(true)
        }];
        let decision = testing::evaluate::<EdgeGate>(SETTINGS, &request).unwrap();
        assert!(matches!(decision, Decision::Deny(d) if d.code == "node-in-maintenance"));
    }

    #[test]
    fn other_clusters_are_refused_and_bad_settings_rejected() {
        let decision =
            testing::evaluate::<EdgeGate>(SETTINGS, &testing::request("core", "dispatcher", "n1"));
        assert!(matches!(decision, Ok(Decision::Deny(d)) if d.code == "not-an-edge-node"));
        assert!(
            testing::validate::<EdgeGate>(
                r#"{"clusters": [], "roles": ["r"], "ttl_seconds": 900, "release": "x"}"#
            )
            .is_err()
        );
    }
}
