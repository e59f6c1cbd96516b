//! `cluster-role`: admits the clusters and roles listed in its settings and names each node
//! `spiffe://<trust-domain>/cluster/{cluster}/role/{role}/node/{node}`.
//!
//! Settings:
//!
//! ```json
//! { "clusters": ["edge-eu"], "roles": ["dispatcher"], "ttl_seconds": 3600 }
//! ```

#![no_std]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use policy_sdk::{Allow, Decision, Deny, Policy, PolicyError, Request};
use serde::Deserialize;

/// The policy.
#[derive(Debug)]
pub struct ClusterRole;

/// What the bundle manifest configures.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Clusters whose tokens may join.
    pub clusters: Vec<String>,
    /// Roles that may join.
    pub roles: Vec<String>,
    /// Lifetime of the issued SVID.
    pub ttl_seconds: u32,
}

impl Policy for ClusterRole {
    type Settings = Settings;

    fn validate(settings: &Settings) -> Result<(), String> {
        if settings.clusters.is_empty() || settings.roles.is_empty() {
            return Err("`clusters` and `roles` must each list at least one name".into());
        }
        if settings.ttl_seconds == 0 {
            return Err("`ttl_seconds` must be positive".into());
        }
        for name in settings.clusters.iter().chain(&settings.roles) {
            if !is_path_segment(name) {
                return Err(format!(
                    "{name:?} cannot be a SPIFFE path segment (use a-z, 0-9, '-', '_', '.')"
                ));
            }
        }
        Ok(())
    }

    fn evaluate(settings: &Settings, request: &Request) -> Result<Decision, PolicyError> {
        let token = &request.token;
        if !settings.clusters.contains(&token.cluster) {
            return Ok(Decision::Deny(
                Deny::new(
                    "cluster-not-allowed",
                    format!(
                        "cluster {:?} is not in {:?}",
                        token.cluster, settings.clusters
                    ),
                )
                .node_message("this token's cluster is not admitted by the gateway's policy"),
            ));
        }
        if !settings.roles.contains(&token.role) {
            return Ok(Decision::Deny(
                Deny::new(
                    "role-not-allowed",
                    format!("role {:?} is not in {:?}", token.role, settings.roles),
                )
                .node_message("this token's role is not admitted by the gateway's policy"),
            ));
        }
        let path = format!(
            "/cluster/{}/role/{}/node/{}",
            token.cluster,
            token.role,
            request.node_identity()
        );
        Ok(Decision::Allow(
            Allow::new(path, settings.ttl_seconds).matched("cluster-role-listed"),
        ))
    }
}

policy_sdk::export_policy!(ClusterRole);

fn is_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_sdk::testing;

    const SETTINGS: &str =
        r#"{"clusters": ["edge-eu", "edge-us"], "roles": ["dispatcher"], "ttl_seconds": 3600}"#;

    #[test]
    fn listed_cluster_and_role_get_the_node_path() {
        let request = testing::request("edge-eu", "dispatcher", "node-7");
        let decision = testing::evaluate::<ClusterRole>(SETTINGS, &request).unwrap();
        assert_eq!(
            decision,
            Decision::Allow(
                Allow::new("/cluster/edge-eu/role/dispatcher/node/node-7", 3600)
                    .matched("cluster-role-listed")
            )
        );
    }

    #[test]
    fn a_token_bound_node_name_wins_over_the_chosen_one() {
        let mut request = testing::request("edge-eu", "dispatcher", "node-7");
        request.extensions.push(policy_sdk::Kv {
            key: policy_sdk::EXT_TOKEN_NODE.into(),
            value: "node-9".into(),
        });
        let Decision::Allow(allow) = testing::evaluate::<ClusterRole>(SETTINGS, &request).unwrap()
        else {
            panic!("expected an allow");
        };
        assert_eq!(
            allow.spiffe_path,
            "/cluster/edge-eu/role/dispatcher/node/node-9"
        );
    }

    #[test]
    fn unlisted_cluster_is_denied_without_leaking_the_list() {
        let request = testing::request("core", "dispatcher", "node-7");
        let Decision::Deny(deny) = testing::evaluate::<ClusterRole>(SETTINGS, &request).unwrap()
        else {
            panic!("expected a deny");
        };
        assert_eq!(deny.code, "cluster-not-allowed");
        assert!(deny.reason.contains("edge-eu"), "operator sees the list");
        assert!(
            !deny.node_message.unwrap().contains("edge-eu"),
            "node does not"
        );
    }

    #[test]
    fn unlisted_role_is_denied() {
        let request = testing::request("edge-us", "admin", "node-7");
        let decision = testing::evaluate::<ClusterRole>(SETTINGS, &request).unwrap();
        assert!(matches!(decision, Decision::Deny(d) if d.code == "role-not-allowed"));
    }

    #[test]
    fn settings_are_validated() {
        assert!(testing::validate::<ClusterRole>(SETTINGS).is_ok());
        let empty = r#"{"clusters": [], "roles": ["r"], "ttl_seconds": 60}"#;
        assert!(testing::validate::<ClusterRole>(empty).is_err());
        let bad_name = r#"{"clusters": ["Edge/EU"], "roles": ["r"], "ttl_seconds": 60}"#;
        assert!(
            testing::validate::<ClusterRole>(bad_name)
                .unwrap_err()
                .contains("Edge/EU")
        );
        let unknown = r#"{"clusters": ["a"], "roles": ["r"], "ttl_seconds": 60, "x": 1}"#;
        assert!(testing::validate::<ClusterRole>(unknown).is_err());
        let zero_ttl = r#"{"clusters": ["a"], "roles": ["r"], "ttl_seconds": 0}"#;
        assert!(testing::validate::<ClusterRole>(zero_ttl).is_err());
    }

    #[test]
    fn unparseable_settings_are_a_policy_error_not_a_deny() {
        let request = testing::request("edge-eu", "dispatcher", "n");
        let err = testing::evaluate::<ClusterRole>("{", &request).unwrap_err();
        assert!(err.message.contains("invalid settings"), "{err}");
    }
}
