//! `bundle.json`: what one policy bundle version holds. Checked against the project's JSON
//! Schema (`bundle.schema.json`) before anything else reads it.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// The manifest's JSON Schema, as shipped with the gateway.
pub const SCHEMA: &str = include_str!("bundle.schema.json");

/// The manifest file name at the root of a bundle.
pub const FILE: &str = "bundle.json";

/// A bundle manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The bundle's name.
    pub bundle: String,
    /// Its version, `X.Y.Z`.
    pub version: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The policies, in the order they are matched.
    pub policies: Vec<ManifestPolicy>,
}

/// One policy of a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestPolicy {
    /// Its name.
    pub name: String,
    /// Path of the `.wasm` component in the bundle.
    pub module: String,
    /// Lowercase hex sha256 of the module file.
    pub sha256: String,
    /// Clusters it decides for (`*` for any). Default any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
    /// Roles it decides for (`*` for any). Default any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Settings for its `validate-settings`.
    #[serde(default = "empty_object")]
    pub settings: serde_json::Value,
    /// Path of the JSON Schema its evidence must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence_schema: Option<String>,
    /// Path of its vector file (request → expected decision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vectors: Option<String>,
    /// Most fuel one evaluation may use (enforced by `policy test` and `policy publish`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel_budget: Option<u64>,
    /// DNS names the policy may grant: each must be one of these or under one of them. Empty
    /// (the default): the policy may grant no DNS name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_suffixes: Vec<String>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON.
    #[error("bundle.json is not JSON: {0}")]
    NotJson(String),
    /// Valid JSON that the schema refuses; every violation, with where it is.
    #[error("bundle.json does not match the bundle schema: {}", .0.join("; "))]
    Schema(Vec<String>),
    /// Two policies share a name.
    #[error("two policies are named {0:?}")]
    DuplicateName(String),
}

fn validator() -> Option<&'static jsonschema::Validator> {
    static VALIDATOR: OnceLock<Option<jsonschema::Validator>> = OnceLock::new();
    VALIDATOR
        .get_or_init(|| {
            let schema: serde_json::Value = serde_json::from_str(SCHEMA).ok()?;
            jsonschema::validator_for(&schema).ok()
        })
        .as_ref()
}

impl Manifest {
    /// Parses and validates manifest bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::NotJson(e.to_string()))?;
        let Some(validator) = validator() else {
            // The schema is part of the binary and checked by a test; refuse rather than skip.
            return Err(ManifestError::Schema(vec![
                "the bundle schema failed to load".into(),
            ]));
        };
        let errors = crate::policy::schema_errors(validator, &value, 16);
        if !errors.is_empty() {
            return Err(ManifestError::Schema(errors));
        }
        let manifest: Manifest = serde_json::from_value(value)
            .map_err(|e| ManifestError::Schema(vec![e.to_string()]))?;
        let mut names = std::collections::BTreeSet::new();
        for p in &manifest.policies {
            if !names.insert(p.name.as_str()) {
                return Err(ManifestError::DuplicateName(p.name.clone()));
            }
        }
        Ok(manifest)
    }

    /// Pretty JSON, as `policy publish` writes it.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}

/// `1.2.3` (and `1.2.3-rc.1`, ordered below `1.2.3`) for comparing bundle versions.
pub fn version_key(version: &str) -> Option<(u64, u64, u64, bool)> {
    let (core, pre) = match version.split_once('-') {
        Some((core, _)) => (core, true),
        None => (version, false),
    };
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let key = (parts.next()??, parts.next()??, parts.next()??, !pre);
    parts.next().is_none().then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
        "bundle": "edge",
        "version": "1.2.0",
        "policies": [{
            "name": "cluster-role",
            "module": "modules/cluster-role.wasm",
            "sha256": "0000000000000000000000000000000000000000000000000000000000000000",
            "clusters": ["edge-eu"],
            "settings": {"clusters": ["edge-eu"], "roles": ["dispatcher"], "ttl_seconds": 600},
            "vectors": "vectors/cluster-role.json",
            "fuel_budget": 50000
        }]
    }"#;

    #[test]
    fn a_good_manifest_parses_and_round_trips() {
        let m = Manifest::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(m.version, "1.2.0");
        assert_eq!(m.policies[0].roles, Vec::<String>::new());
        assert_eq!(Manifest::parse(m.to_json().as_bytes()).unwrap(), m);
    }

    #[test]
    fn schema_violations_are_all_named_with_their_place() {
        let bad = GOOD
            .replace("\"1.2.0\"", "\"1.2\"")
            .replace(
                "0000000000000000000000000000000000000000000000000000000000000000",
                "xyz",
            )
            .replace(
                "\"fuel_budget\": 50000",
                "\"fuel_budget\": 50000, \"shell\": \"rm -rf /\"",
            );
        let Err(ManifestError::Schema(errors)) = Manifest::parse(bad.as_bytes()) else {
            panic!("expected schema errors")
        };
        let text = errors.join("\n");
        assert!(text.contains("/version"), "{text}");
        assert!(text.contains("/policies/0/sha256"), "{text}");
        assert!(text.contains("shell"), "{text}");
    }

    #[test]
    fn paths_cannot_start_at_the_root_and_names_are_unique() {
        let rooted = GOOD.replace("modules/cluster-role.wasm", "/etc/passwd");
        assert!(matches!(
            Manifest::parse(rooted.as_bytes()),
            Err(ManifestError::Schema(_))
        ));
        let twice: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        let mut twice = twice;
        let p = twice["policies"][0].clone();
        twice["policies"].as_array_mut().unwrap().push(p);
        assert_eq!(
            Manifest::parse(twice.to_string().as_bytes()),
            Err(ManifestError::DuplicateName("cluster-role".into()))
        );
        assert!(matches!(
            Manifest::parse(b"{"),
            Err(ManifestError::NotJson(_))
        ));
    }

    /// Any JSON value, nested a few levels, with keys a manifest uses.
    fn json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let key = prop_oneof![
            Just("bundle".to_string()),
            Just("version".to_string()),
            Just("policies".to_string()),
            Just("name".to_string()),
            Just("module".to_string()),
            Just("sha256".to_string()),
            "[a-z_]{0,8}",
        ];
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            "\\PC{0,12}".prop_map(serde_json::Value::from),
            "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(key.clone(), inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_are_refused_typed(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)
        ) {
            if let Err(e) = Manifest::parse(&bytes) {
                proptest::prop_assert!(!e.to_string().is_empty());
            }
        }

        #[test]
        fn arbitrary_json_never_panics(value in json()) {
            let _ = Manifest::parse(value.to_string().as_bytes());
        }

        #[test]
        fn a_good_manifest_with_one_byte_changed_never_panics(
            at in 0..GOOD.len(),
            byte in proptest::prelude::any::<u8>(),
        ) {
            let mut bytes = GOOD.as_bytes().to_vec();
            bytes[at] = byte;
            match Manifest::parse(&bytes) {
                // A change inside a string or to whitespace can still be a good manifest.
                Ok(m) => proptest::prop_assert_eq!(Manifest::parse(m.to_json().as_bytes()), Ok(m)),
                Err(e) => proptest::prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn version_keys_never_panic(text in "\\PC{0,24}") {
            let _ = version_key(&text);
        }
    }

    #[test]
    fn versions_order_numerically_with_prereleases_first() {
        assert!(version_key("1.10.0") > version_key("1.9.3"));
        assert!(version_key("2.0.0-rc.1") < version_key("2.0.0"));
        assert_eq!(version_key("1.2"), None);
    }
}
