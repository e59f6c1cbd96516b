//! Test vectors: request → expected decision, run through the real host with fuel metering.
//! `omnirelay policy test` runs them; so does every bundle before it may serve.
//!
//! A vector file:
//!
//! ```json
//! {
//!   "settings": { "clusters": ["edge-eu"], "roles": ["dispatcher"], "ttl_seconds": 3600 },
//!   "fuel_budget": 5000000,
//!   "vectors": [
//!     { "name": "listed pair is admitted",
//!       "request": { "token": { "audit_id": "…", "cluster": "edge-eu", "role": "dispatcher",
//!                               "trust_domain": "example.org" },
//!                    "node_name": "n1", "now_ms": 1767225600000 },
//!       "expect": { "allow": { "spiffe_path": "/cluster/edge-eu/role/dispatcher/node/n1" } } },
//!     { "name": "other cluster is refused", "request": { … },
//!       "expect": { "deny": { "code": "cluster-not-allowed" } } }
//!   ]
//! }
//! ```
//!
//! `expect` is one of `allow` (fields given must match), `deny` (the code, if given, must match)
//! or `error` with a [`PolicyError::kind`] label such as `"trap"` or `"timeout"`.

use policy_sdk as sdk;
use serde::Deserialize;

use super::{LoadedPolicy, PolicyError, PolicyHost, Verdict};

/// A parsed vector file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorFile {
    /// Settings the policy is loaded with.
    #[serde(default = "empty_object")]
    pub settings: serde_json::Value,
    /// Most fuel one evaluation may use; a vector that needs more fails.
    #[serde(default)]
    pub fuel_budget: Option<u64>,
    /// The cases.
    pub vectors: Vec<Vector>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// One case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vector {
    /// What the case shows.
    pub name: String,
    /// The request the policy sees.
    pub request: sdk::Request,
    /// The decision it must reach.
    pub expect: Expect,
}

/// An expected outcome. Fields left out are not compared.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Expect {
    /// An allow.
    Allow {
        /// The exact SPIFFE path.
        #[serde(default)]
        spiffe_path: Option<String>,
        /// The lifetime the policy asks for.
        #[serde(default)]
        ttl_seconds: Option<u32>,
        /// The DNS SANs, lowercased, in order.
        #[serde(default)]
        dns_sans: Option<Vec<String>>,
    },
    /// A deny.
    Deny {
        /// The deny code.
        #[serde(default)]
        code: Option<String>,
    },
    /// A fail-closed error of this kind.
    Error(String),
}

/// The outcome of one vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VectorResult {
    /// The vector's name.
    pub name: String,
    /// `None` when it passed, else what differed.
    pub failure: Option<String>,
    /// Fuel the evaluation used.
    pub fuel: u64,
}

/// Runs every vector of `file` against `policy` (which must have been loaded with
/// `file.settings`). The host should meter fuel for the figures to mean anything.
pub async fn run(host: &PolicyHost, policy: &LoadedPolicy, file: &VectorFile) -> Vec<VectorResult> {
    let mut results = Vec::with_capacity(file.vectors.len());
    for vector in &file.vectors {
        let metered = host
            .evaluate_metered(policy, &vector.request, file.fuel_budget)
            .await;
        results.push(VectorResult {
            name: vector.name.clone(),
            failure: compare(&vector.expect, &metered.result),
            fuel: metered.fuel,
        });
    }
    results
}

/// `None` when `got` satisfies `expect`, else a one-line description of the difference.
fn compare(expect: &Expect, got: &Result<Verdict, PolicyError>) -> Option<String> {
    match (expect, got) {
        (Expect::Error(kind), Err(e)) if e.kind() == kind => None,
        (
            Expect::Allow {
                spiffe_path,
                ttl_seconds,
                dns_sans,
            },
            Ok(Verdict::Allow(g)),
        ) => {
            let mut diffs = Vec::new();
            if let Some(p) = spiffe_path.as_deref().filter(|p| *p != g.path.as_str()) {
                diffs.push(format!("spiffe_path: expected {p}, got {}", g.path));
            }
            let ttl = g.requested_ttl.as_secs();
            if let Some(t) = ttl_seconds.filter(|t| u64::from(*t) != ttl) {
                diffs.push(format!("ttl_seconds: expected {t}, got {ttl}"));
            }
            if let Some(d) = dns_sans.as_ref().filter(|d| **d != g.dns_sans) {
                diffs.push(format!("dns_sans: expected {d:?}, got {:?}", g.dns_sans));
            }
            (!diffs.is_empty()).then(|| diffs.join("; "))
        }
        (Expect::Deny { code }, Ok(Verdict::Deny(r))) => code
            .as_deref()
            .filter(|c| *c != r.code)
            .map(|c| format!("deny code: expected {c}, got {}", r.code)),
        (expect, got) => Some(format!(
            "expected {}, got {}",
            describe_expect(expect),
            describe(got)
        )),
    }
}

fn describe_expect(expect: &Expect) -> String {
    match expect {
        Expect::Allow { .. } => "allow".into(),
        Expect::Deny { code: Some(c) } => format!("deny {c}"),
        Expect::Deny { code: None } => "deny".into(),
        Expect::Error(kind) => format!("error {kind}"),
    }
}

fn describe(got: &Result<Verdict, PolicyError>) -> String {
    match got {
        Ok(Verdict::Allow(g)) => format!("allow {}", g.path),
        Ok(Verdict::Deny(r)) => format!("deny {}", r.code),
        Err(e) => format!("error {} ({e})", e.kind()),
    }
}
