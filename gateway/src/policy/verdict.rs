//! What the host makes of a policy's answer: an allow becomes a [`Grant`] only after every
//! field is checked against the SPIFFE spec and the configured bounds.

use std::time::Duration;

use policy_sdk as sdk;

use super::PolicyConfig;
use crate::identity::{SpiffeError, SpiffePath};

/// A checked allow: safe to hand to the certificate builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The SPIFFE path (the trust domain is the gateway's own).
    pub path: SpiffePath,
    /// The lifetime to issue: the policy's request, capped at the configured maximum.
    pub ttl: Duration,
    /// What the policy asked for, for the audit trail.
    pub requested_ttl: Duration,
    /// Validated, lowercased DNS SANs.
    pub dns_sans: Vec<String>,
    /// When the node should renew, if the policy said.
    pub renew_after: Option<Duration>,
    /// Notes to record with the issuance.
    pub audit_notes: Vec<String>,
    /// The rules that matched.
    pub matched_rules: Vec<String>,
}

/// A checked deny.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Machine-readable code.
    pub code: String,
    /// Operator-only reason.
    pub reason: String,
    /// What the node may be told.
    pub node_message: Option<String>,
    /// Suggested retry delay.
    pub retry_after: Option<Duration>,
}

/// A policy's decision after the host checked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Issue, as granted.
    Allow(Grant),
    /// Refuse.
    Deny(Refusal),
}

/// Why the host refused to act on a policy's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidResult {
    /// The SPIFFE path is malformed.
    #[error("spiffe-path: {0}")]
    Path(#[from] SpiffeError),
    /// The lifetime is below the configured minimum.
    #[error("ttl of {got:?} is below the minimum of {min:?}")]
    TtlTooShort {
        /// What the policy asked for.
        got: Duration,
        /// The configured minimum.
        min: Duration,
    },
    /// Too many DNS SANs.
    #[error("{got} DNS SANs, at most {max} allowed")]
    TooManyDnsSans {
        /// How many were asked for.
        got: usize,
        /// The limit.
        max: u32,
    },
    /// A DNS SAN is not a valid host name.
    #[error("DNS SAN {name:?}: {why}")]
    DnsName {
        /// The offending name (truncated).
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `renew-after` is not inside the certificate's lifetime.
    #[error("renew-after of {0:?} is not within the certificate lifetime")]
    RenewAfter(Duration),
    /// A deny code is not a short kebab-case token.
    #[error("deny code {0:?} is not 1-64 characters of a-z, 0-9, '-'")]
    DenyCode(String),
    /// The SPIFFE path is under `/omnirelay/`, which names the gateway's own identities.
    #[error("spiffe-path {0:?} is reserved for the gateway")]
    ReservedPath(String),
    /// A DNS name is one of the gateway's own.
    #[error("DNS SAN {0:?} is one of the gateway's own names")]
    DnsReserved(String),
    /// A DNS name is outside the policy binding's allowed suffixes.
    #[error("DNS SAN {0:?} is not under one of the policy's dns_suffixes")]
    DnsNotAllowed(String),
    /// A renewal's grant names another SPIFFE ID than the certificate it renews (a renewal
    /// keeps its identity; a different one takes a join).
    #[error("a renewal of {current} granted {granted}")]
    IdentityChanged {
        /// The SPIFFE ID being renewed.
        current: String,
        /// The one granted.
        granted: String,
    },
    /// A text field is longer than the host accepts.
    #[error("{field} is {len} bytes, at most {max} allowed")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

const MAX_REASON: usize = 1024;
const MAX_NODE_MESSAGE: usize = 256;
const MAX_NOTE: usize = 256;
const MAX_RULES: usize = 16;
const MAX_RULE_NAME: usize = 64;
const MAX_OBLIGATIONS: usize = 8;

impl Verdict {
    /// Checks a policy's decision against the SPIFFE spec and `limits`.
    pub fn check(decision: sdk::Decision, limits: &PolicyConfig) -> Result<Self, InvalidResult> {
        match decision {
            sdk::Decision::Allow(allow) => Grant::check(allow, limits).map(Verdict::Allow),
            sdk::Decision::Deny(deny) => Refusal::check(deny).map(Verdict::Deny),
        }
    }
}

impl Grant {
    fn check(allow: sdk::Allow, limits: &PolicyConfig) -> Result<Self, InvalidResult> {
        let path = SpiffePath::parse(&allow.spiffe_path)?;
        if is_reserved_path(path.as_str()) {
            return Err(InvalidResult::ReservedPath(truncate(path.as_str())));
        }
        let requested_ttl = Duration::from_secs(allow.ttl_seconds.into());
        if requested_ttl < limits.min_ttl {
            return Err(InvalidResult::TtlTooShort {
                got: requested_ttl,
                min: limits.min_ttl,
            });
        }
        let ttl = requested_ttl.min(limits.max_ttl);
        if allow.dns_sans.len() > limits.max_dns_sans as usize {
            return Err(InvalidResult::TooManyDnsSans {
                got: allow.dns_sans.len(),
                max: limits.max_dns_sans,
            });
        }
        let dns_sans = allow
            .dns_sans
            .iter()
            .map(|name| dns_name(name))
            .collect::<Result<_, _>>()?;
        check_len("obligations", allow.obligations.len(), MAX_OBLIGATIONS)?;
        let mut renew_after = None;
        let mut audit_notes = Vec::new();
        for obligation in allow.obligations {
            match obligation {
                sdk::Obligation::RenewAfterSeconds(s) => {
                    let after = Duration::from_secs(s.into());
                    if after.is_zero() || after >= ttl {
                        return Err(InvalidResult::RenewAfter(after));
                    }
                    renew_after = Some(after);
                }
                sdk::Obligation::AuditNote(note) => {
                    check_len("audit-note", note.len(), MAX_NOTE)?;
                    audit_notes.push(note);
                }
            }
        }
        check_len("matched-rules", allow.matched_rules.len(), MAX_RULES)?;
        for rule in &allow.matched_rules {
            check_len("matched-rule name", rule.len(), MAX_RULE_NAME)?;
        }
        Ok(Self {
            path,
            ttl,
            requested_ttl,
            dns_sans,
            renew_after,
            audit_notes,
            matched_rules: allow.matched_rules,
        })
    }
}

impl Refusal {
    fn check(deny: sdk::Deny) -> Result<Self, InvalidResult> {
        let code_ok = (1..=64).contains(&deny.code.len())
            && deny
                .code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !code_ok {
            return Err(InvalidResult::DenyCode(truncate(&deny.code)));
        }
        check_len("reason", deny.reason.len(), MAX_REASON)?;
        if let Some(message) = &deny.node_message {
            check_len("node-message", message.len(), MAX_NODE_MESSAGE)?;
        }
        Ok(Self {
            code: deny.code,
            reason: deny.reason,
            node_message: deny.node_message,
            retry_after: deny
                .retry_after_seconds
                .map(|s| Duration::from_secs(s.min(3600).into())),
        })
    }
}

fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), InvalidResult> {
    if len > max {
        return Err(InvalidResult::TooLong { field, len, max });
    }
    Ok(())
}

/// SPIFFE paths at or under this one name the gateway's own identities (its serving
/// certificate is `/omnirelay/gateway`); no policy can grant them.
pub const RESERVED_PATH: &str = "/omnirelay";

/// Whether `path` is [`RESERVED_PATH`] or below it: never issued to a node, whether a policy
/// grants it or an operator asks for it by hand.
pub fn is_reserved_path(path: &str) -> bool {
    path == RESERVED_PATH
        || path
            .strip_prefix(RESERVED_PATH)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Checks an operator's DNS suffix (a `dns_suffixes` entry): a host name, lowercase.
pub fn check_dns_suffix(suffix: &str) -> Result<(), &'static str> {
    match dns_name(suffix) {
        Ok(lower) if lower == suffix => Ok(()),
        Ok(_) => Err("must be lowercase"),
        Err(InvalidResult::DnsName { why, .. }) => Err(why),
        Err(_) => Err("is not a host name"),
    }
}

/// A host name per RFC 1123: LDH labels of 1–63 bytes, 253 bytes in all, no leading or
/// trailing hyphen, not all-numeric at the top (so it cannot be an IP address). Lowercased.
fn dns_name(name: &str) -> Result<String, InvalidResult> {
    let bad = |why| InvalidResult::DnsName {
        name: truncate(name),
        why,
    };
    if name.is_empty() || name.len() > 253 {
        return Err(bad("must be 1-253 bytes"));
    }
    let lower = name.to_ascii_lowercase();
    for label in lower.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each label must be 1-63 bytes"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad("only letters, digits, '-' and '.' are allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label may not start or end with '-'"));
        }
    }
    if lower
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad("the last label may not be numeric"));
    }
    Ok(lower)
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(path: &str) -> sdk::Decision {
        sdk::Decision::Allow(sdk::Allow::new(path, 3600))
    }

    fn check(decision: sdk::Decision) -> Result<Verdict, InvalidResult> {
        Verdict::check(decision, &PolicyConfig::default())
    }

    #[test]
    fn good_allow_becomes_a_grant() {
        let d = sdk::Decision::Allow(
            sdk::Allow::new("/node/n1", 7200)
                .dns_san("Node-1.Example.org")
                .obligation(sdk::Obligation::RenewAfterSeconds(3600))
                .matched("r1"),
        );
        let Verdict::Allow(g) = check(d).unwrap() else {
            panic!()
        };
        assert_eq!(g.path.as_str(), "/node/n1");
        assert_eq!(g.ttl, Duration::from_secs(7200));
        assert_eq!(g.dns_sans, ["node-1.example.org"]);
        assert_eq!(g.renew_after, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn ttl_is_capped_and_floored() {
        let Verdict::Allow(g) =
            check(sdk::Decision::Allow(sdk::Allow::new("/a", u32::MAX))).unwrap()
        else {
            panic!()
        };
        assert_eq!(g.ttl, PolicyConfig::default().max_ttl);
        assert_eq!(g.requested_ttl, Duration::from_secs(u32::MAX.into()));
        assert!(matches!(
            check(sdk::Decision::Allow(sdk::Allow::new("/a", 59))),
            Err(InvalidResult::TtlTooShort { .. })
        ));
    }

    #[test]
    fn malformed_paths_are_invalid_results() {
        for p in [
            "/a/../b",
            "/a//b",
            "",
            "/",
            "spiffe://evil.example/x",
            "/a%2e%2e",
        ] {
            assert!(
                matches!(check(allow(p)), Err(InvalidResult::Path(_))),
                "{p:?}"
            );
        }
        let long = format!("/{}", "a".repeat(1 << 20));
        assert_eq!(
            check(allow(&long)).unwrap_err(),
            InvalidResult::Path(SpiffeError::TooLong((1 << 20) + 1))
        );
    }

    #[test]
    fn bad_dns_sans_are_refused() {
        for name in [
            "",
            "-a.example",
            "a_b.example",
            "a..b",
            "10.0.0.1",
            "*.example.org",
        ] {
            let d = sdk::Decision::Allow(sdk::Allow::new("/a", 3600).dns_san(name));
            assert!(
                matches!(check(d), Err(InvalidResult::DnsName { .. })),
                "{name:?}"
            );
        }
        let mut many = sdk::Allow::new("/a", 3600);
        many.dns_sans = vec!["a.example".into(); 17];
        assert!(matches!(
            check(sdk::Decision::Allow(many)),
            Err(InvalidResult::TooManyDnsSans { got: 17, max: 16 })
        ));
    }

    #[test]
    fn the_gateways_own_paths_are_reserved() {
        for p in ["/omnirelay", "/omnirelay/gateway", "/omnirelay/x/y"] {
            assert!(
                matches!(check(allow(p)), Err(InvalidResult::ReservedPath(_))),
                "{p:?}"
            );
        }
        // A segment that merely starts with the word is a node's to have.
        for p in ["/omnirelay-edge/n1", "/cluster/omnirelay/node/n1"] {
            assert!(matches!(check(allow(p)), Ok(Verdict::Allow(_))), "{p:?}");
        }
    }

    #[test]
    fn dns_suffixes_are_host_names() {
        assert_eq!(check_dns_suffix("nodes.example.org"), Ok(()));
        assert!(check_dns_suffix("Nodes.example.org").is_err());
        assert!(check_dns_suffix("*.example.org").is_err());
        assert!(check_dns_suffix("").is_err());
    }

    #[test]
    fn renew_after_must_fall_inside_the_lifetime() {
        let d = sdk::Decision::Allow(
            sdk::Allow::new("/a", 600).obligation(sdk::Obligation::RenewAfterSeconds(600)),
        );
        assert!(matches!(check(d), Err(InvalidResult::RenewAfter(_))));
    }

    #[test]
    fn deny_fields_are_bounded() {
        let ok = sdk::Deny::new("cluster-not-allowed", "why").node_message("no");
        assert!(matches!(
            check(sdk::Decision::Deny(ok)),
            Ok(Verdict::Deny(_))
        ));
        for code in ["", "Has Space", "UPPER", &"x".repeat(65)] {
            let d = sdk::Decision::Deny(sdk::Deny::new(code, "r"));
            assert!(
                matches!(check(d), Err(InvalidResult::DenyCode(_))),
                "{code:?}"
            );
        }
        let d = sdk::Decision::Deny(sdk::Deny::new("c", "r").node_message("m".repeat(257)));
        assert!(matches!(check(d), Err(InvalidResult::TooLong { .. })));
    }
}
