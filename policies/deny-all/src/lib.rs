//! `deny-all`: refuses every request. Publish it to stop all issuance without stopping the
//! gateway (renewals included). Takes no settings (`{}`).

#![no_std]

extern crate alloc;

use policy_sdk::{Decision, Deny, Policy, PolicyError, Request};
use serde::Deserialize;

/// The policy.
#[derive(Debug)]
pub struct DenyAll;

/// No settings are accepted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {}

impl Policy for DenyAll {
    type Settings = Settings;

    fn evaluate(_: &Settings, _: &Request) -> Result<Decision, PolicyError> {
        Ok(Decision::Deny(
            Deny::new(
                "issuance-disabled",
                "the active bundle denies every request",
            )
            .node_message("issuance is disabled on this gateway"),
        ))
    }
}

policy_sdk::export_policy!(DenyAll);

#[cfg(test)]
mod tests {
    use super::*;
    use policy_sdk::testing;

    #[test]
    fn denies_everything() {
        let request = testing::request("edge-eu", "dispatcher", "node-1");
        let decision = testing::evaluate::<DenyAll>("{}", &request).unwrap();
        assert!(matches!(decision, Decision::Deny(d) if d.code == "issuance-disabled"));
    }

    #[test]
    fn rejects_settings_it_does_not_know() {
        assert!(testing::validate::<DenyAll>("{}").is_ok());
        assert!(testing::validate::<DenyAll>(r#"{"allow": true}"#).is_err());
    }
}
