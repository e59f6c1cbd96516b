//! `posture`: admits a node only when the gateway *verified* the device posture its settings
//! require, and the evidence is fresh.
//!
//! Settings:
//!
//! ```json
//! {
//!   "require_attestation": "x509pop",
//!   "required_flags": ["secure-boot"],
//!   "min_versions": { "agent-version": "1.4.0" },
//!   "max_evidence_age_seconds": 300,
//!   "ttl_seconds": 3600
//! }
//! ```
//!
//! A claim the node only self-reported never satisfies a requirement. Admitted nodes get
//! `/cluster/{cluster}/role/{role}/node/{node}`.

#![no_std]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use policy_sdk::{
    Allow, AttestationKind, ClaimValue, Decision, Deny, Policy, PolicyError, Request,
};
use serde::Deserialize;

/// The policy.
#[derive(Debug)]
pub struct Posture;

/// What the bundle manifest configures.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Attestation method the node must have used (`token-only` or `x509pop`); any when absent.
    #[serde(default)]
    pub require_attestation: Option<AttestationKind>,
    /// Verified claims that must be `true`.
    #[serde(default)]
    pub required_flags: Vec<String>,
    /// Verified text claims holding dotted versions, and the minimum each must reach.
    #[serde(default)]
    pub min_versions: BTreeMap<String, String>,
    /// Oldest evidence accepted, in seconds.
    pub max_evidence_age_seconds: u32,
    /// Lifetime of the issued SVID.
    pub ttl_seconds: u32,
}

/// Evidence stamped this far in the gateway's future is still accepted (clock skew).
const MAX_FUTURE_SKEW_MS: u64 = 30_000;

impl Policy for Posture {
    type Settings = Settings;

    fn validate(settings: &Settings) -> Result<(), String> {
        if settings.max_evidence_age_seconds == 0 || settings.ttl_seconds == 0 {
            return Err("`max_evidence_age_seconds` and `ttl_seconds` must be positive".into());
        }
        for (claim, minimum) in &settings.min_versions {
            if parse_version(minimum).is_none() {
                return Err(format!(
                    "min_versions.{claim}: {minimum:?} is not a dotted version"
                ));
            }
        }
        Ok(())
    }

    fn evaluate(settings: &Settings, request: &Request) -> Result<Decision, PolicyError> {
        match check(settings, request) {
            Err(deny) => Ok(Decision::Deny(deny)),
            Ok(()) => {
                let t = &request.token;
                let path = format!(
                    "/cluster/{}/role/{}/node/{}",
                    t.cluster,
                    t.role,
                    request.node_identity()
                );
                Ok(Decision::Allow(
                    Allow::new(path, settings.ttl_seconds).matched("posture-verified"),
                ))
            }
        }
    }
}

policy_sdk::export_policy!(Posture);

fn check(settings: &Settings, request: &Request) -> Result<(), Deny> {
    let evidence = &request.attestation;
    if let Some(kind) = settings.require_attestation
        && evidence.kind != kind
    {
        return Err(Deny::new(
            "attestation-kind",
            format!("attestation {:?} used, {:?} required", evidence.kind, kind),
        )
        .node_message("this gateway requires device attestation"));
    }
    if evidence.issued_at_ms > request.now_ms.saturating_add(MAX_FUTURE_SKEW_MS) {
        return Err(Deny::new(
            "evidence-from-future",
            format!(
                "evidence stamped {} ms ahead",
                evidence.issued_at_ms - request.now_ms
            ),
        )
        .node_message("attestation evidence is timestamped in the future; check the clock"));
    }
    let age_ms = request.now_ms.saturating_sub(evidence.issued_at_ms);
    if age_ms > u64::from(settings.max_evidence_age_seconds) * 1000 {
        return Err(Deny::new(
            "evidence-stale",
            format!(
                "evidence is {} s old, limit {} s",
                age_ms / 1000,
                settings.max_evidence_age_seconds
            ),
        )
        .node_message("attestation evidence is too old; collect it again")
        .retry_after(1));
    }
    for flag in &settings.required_flags {
        match evidence.verified_claim(flag) {
            Some(ClaimValue::Flag(true)) => {}
            Some(other) => return Err(requirement(flag, format!("verified as {other:?}"))),
            None if evidence.self_reported_claim(flag).is_some() => {
                return Err(requirement(flag, "only self-reported".into()));
            }
            None => return Err(requirement(flag, "absent".into())),
        }
    }
    for (claim, minimum) in &settings.min_versions {
        let found = match evidence.verified_claim(claim) {
            Some(ClaimValue::Text(v)) => v,
            Some(other) => return Err(requirement(claim, format!("verified as {other:?}"))),
            None => return Err(requirement(claim, "not verified".into())),
        };
        let (Some(have), Some(need)) = (parse_version(found), parse_version(minimum)) else {
            return Err(requirement(
                claim,
                format!("{found:?} is not a dotted version"),
            ));
        };
        if have < need {
            return Err(requirement(
                claim,
                format!("{found} is older than {minimum}"),
            ));
        }
    }
    Ok(())
}

fn requirement(claim: &str, what: String) -> Deny {
    Deny::new("posture-requirement", format!("claim {claim:?}: {what}"))
        .node_message(format!("device posture requirement {claim:?} not met"))
}

/// `1.4.10` → `[1, 4, 10]`; missing trailing parts compare as zero.
fn parse_version(text: &str) -> Option<[u64; 4]> {
    let mut out = [0u64; 4];
    let mut parts = text.split('.');
    for slot in &mut out {
        match parts.next() {
            Some(p) => *slot = p.parse().ok()?,
            None => break,
        }
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use policy_sdk::{Claim, testing};

    const SETTINGS: &str = r#"{
        "require_attestation": "x509pop",
        "required_flags": ["secure-boot"],
        "min_versions": {"agent-version": "1.4.0"},
        "max_evidence_age_seconds": 300,
        "ttl_seconds": 900
    }"#;

    fn claim(name: &str, value: ClaimValue) -> Claim {
        Claim {
            name: name.to_string(),
            value,
        }
    }

    fn healthy() -> Request {
        let mut r = testing::request("edge-eu", "dispatcher", "node-1");
        r.attestation.kind = AttestationKind::X509pop;
        r.attestation.verified = alloc::vec![
            claim("secure-boot", ClaimValue::Flag(true)),
            claim("agent-version", ClaimValue::Text("1.10.2".to_string())),
        ];
        r.attestation.issued_at_ms = r.now_ms - 10_000;
        r
    }

    fn deny_reason(request: &Request) -> String {
        match testing::evaluate::<Posture>(SETTINGS, request).unwrap() {
            Decision::Deny(d) => d.reason,
            other => panic!("expected a deny, got {other:?}"),
        }
    }

    #[test]
    fn healthy_fresh_device_is_admitted() {
        let decision = testing::evaluate::<Posture>(SETTINGS, &healthy()).unwrap();
        let Decision::Allow(allow) = decision else {
            panic!("{decision:?}")
        };
        assert_eq!(
            allow.spiffe_path,
            "/cluster/edge-eu/role/dispatcher/node/node-1"
        );
        assert_eq!(allow.ttl_seconds, 900);
    }

    #[test]
    fn the_path_names_the_verified_device_not_the_chosen_name() {
        let mut r = healthy();
        r.attestation
            .verified
            .push(claim("device-id", ClaimValue::Text("edge-17".to_string())));
        r.node_name = "someone-else".to_string();
        let Decision::Allow(allow) = testing::evaluate::<Posture>(SETTINGS, &r).unwrap() else {
            panic!("expected an allow")
        };
        assert_eq!(
            allow.spiffe_path,
            "/cluster/edge-eu/role/dispatcher/node/edge-17"
        );
    }

    #[test]
    fn stale_evidence_is_denied() {
        let mut r = healthy();
        r.attestation.issued_at_ms = r.now_ms - 301_000;
        assert!(deny_reason(&r).contains("301 s old"));
    }

    #[test]
    fn evidence_from_the_future_is_denied() {
        let mut r = healthy();
        r.attestation.issued_at_ms = r.now_ms + 60_000;
        assert!(deny_reason(&r).contains("ahead"));
    }

    #[test]
    fn self_reported_flag_does_not_count() {
        let mut r = healthy();
        r.attestation.verified.retain(|c| c.name != "secure-boot");
        r.attestation.self_reported = alloc::vec![claim("secure-boot", ClaimValue::Flag(true))];
        assert!(deny_reason(&r).contains("only self-reported"));
    }

    #[test]
    fn secure_boot_off_is_denied() {
        let mut r = healthy();
        r.attestation.verified[0].value = ClaimValue::Flag(false);
        assert!(deny_reason(&r).contains("secure-boot"));
    }

    #[test]
    fn versions_compare_numerically() {
        let mut r = healthy();
        r.attestation.verified[1].value = ClaimValue::Text("1.3.99".to_string());
        assert!(deny_reason(&r).contains("older than 1.4.0"));
        r.attestation.verified[1].value = ClaimValue::Text("1.4".to_string());
        assert!(matches!(
            testing::evaluate::<Posture>(SETTINGS, &r).unwrap(),
            Decision::Allow(_)
        ));
        r.attestation.verified[1].value = ClaimValue::Text("1.4-beta".to_string());
        assert!(deny_reason(&r).contains("not a dotted version"));
    }

    #[test]
    fn token_only_attestation_is_denied_when_x509pop_is_required() {
        let mut r = healthy();
        r.attestation.kind = AttestationKind::TokenOnly;
        assert!(deny_reason(&r).contains("required"));
    }

    #[test]
    fn settings_with_a_bad_minimum_are_rejected() {
        let bad =
            r#"{"min_versions": {"v": "x"}, "max_evidence_age_seconds": 1, "ttl_seconds": 1}"#;
        assert!(
            testing::validate::<Posture>(bad)
                .unwrap_err()
                .contains("min_versions.v")
        );
        assert!(testing::validate::<Posture>(SETTINGS).is_ok());
    }
}
