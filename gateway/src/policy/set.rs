//! The active policy set: which loaded policy decides for which cluster and role, the JSON
//! Schema its evidence must satisfy, and the provenance every decision records. Swapped whole
//! and atomically; a request keeps the set it started with.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

use super::{Grant, InvalidResult, LoadedPolicy, PolicyError, PolicyHost, examples};
use crate::audit::PolicyRef;

/// Where a policy module comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// One of the example policies compiled into this binary (`builtin:cluster-role`).
    Builtin(String),
    /// A `.wasm` component on disk.
    File(PathBuf),
    /// Module bytes already read (from a bundle's git commit).
    Bytes(Arc<[u8]>),
}

impl std::fmt::Debug for ModuleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Builtin(name) => write!(f, "builtin:{name}"),
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Bytes(bytes) => write!(f, "<{} bytes>", bytes.len()),
        }
    }
}

impl ModuleSource {
    /// Parses `builtin:<name>` or a path.
    pub fn parse(text: &str) -> Self {
        match text.strip_prefix("builtin:") {
            Some(name) => Self::Builtin(name.to_string()),
            None => Self::File(PathBuf::from(text)),
        }
    }

    fn bytes(&self) -> Result<Vec<u8>, SetError> {
        match self {
            Self::Builtin(name) => match name.as_str() {
                "cluster-role" => Ok(examples::CLUSTER_ROLE.to_vec()),
                "posture" => Ok(examples::POSTURE.to_vec()),
                "deny-all" => Ok(examples::DENY_ALL.to_vec()),
                other => Err(SetError::UnknownBuiltin(other.to_string())),
            },
            Self::File(path) => std::fs::read(path).map_err(|e| SetError::Read {
                path: path.clone(),
                source: e,
            }),
            Self::Bytes(bytes) => Ok(bytes.to_vec()),
        }
    }
}

/// One `[[policies]]` entry: a policy and what it decides for.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyBinding {
    /// Name, for logs and the audit trail.
    pub name: String,
    /// The module.
    pub module: ModuleSource,
    /// Clusters it decides for; `*` matches any.
    pub clusters: Vec<String>,
    /// Roles it decides for; `*` matches any.
    pub roles: Vec<String>,
    /// Its settings (checked by its `validate-settings`).
    pub settings: serde_json::Value,
    /// The JSON Schema the `attestation` object must satisfy, if any.
    pub evidence_schema: Option<serde_json::Value>,
    /// DNS names it may grant: each one of these or a name under one. Empty: none at all.
    pub dns_suffixes: Vec<String>,
}

/// A policy set could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    /// `builtin:` names a policy this binary does not carry.
    #[error("no built-in policy named {0:?} (built in: cluster-role, posture, deny-all)")]
    UnknownBuiltin(String),
    /// A module file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A policy failed to load.
    #[error("policy {name}: {source}")]
    Policy {
        /// The binding.
        name: String,
        /// Why.
        #[source]
        source: PolicyError,
    },
    /// An evidence schema is not a valid JSON Schema.
    #[error("policy {name}: evidence schema: {reason}")]
    Schema {
        /// The binding.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Up to `max` violations of `schema` by `value`, each prefixed with where it is.
pub fn schema_errors(
    schema: &jsonschema::Validator,
    value: &serde_json::Value,
    max: usize,
) -> Vec<String> {
    schema
        .iter_errors(value)
        .take(max)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("{at}: {e}")
            }
        })
        .collect()
}

/// A loaded binding.
pub struct BoundPolicy {
    /// The policy, ready to evaluate.
    pub policy: LoadedPolicy,
    /// What it decides for.
    clusters: Vec<String>,
    roles: Vec<String>,
    schema: Option<jsonschema::Validator>,
    dns_suffixes: Vec<String>,
    /// Provenance recorded with every decision.
    pub provenance: PolicyRef,
}

impl std::fmt::Debug for BoundPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundPolicy")
            .field("provenance", &self.provenance)
            .finish_non_exhaustive()
    }
}

impl BoundPolicy {
    /// Checks the evidence against the policy's schema; the messages name what failed.
    pub fn check_evidence(&self, evidence: &serde_json::Value) -> Result<(), Vec<String>> {
        let Some(schema) = &self.schema else {
            return Ok(());
        };
        let errors = schema_errors(schema, evidence, 8);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Checks what the host cannot know from the policy alone: every DNS name granted is under
    /// one of this binding's allowed suffixes and is none of the gateway's own names
    /// (`reserved`), so no node certificate can pass for the gateway.
    pub fn admit(&self, grant: &Grant, reserved: &[String]) -> Result<(), InvalidResult> {
        for name in &grant.dns_sans {
            if reserved.iter().any(|r| r == name) {
                return Err(InvalidResult::DnsReserved(name.clone()));
            }
            let allowed = self.dns_suffixes.iter().any(|suffix| {
                name == suffix
                    || name
                        .strip_suffix(suffix.as_str())
                        .is_some_and(|rest| rest.ends_with('.'))
            });
            if !allowed {
                return Err(InvalidResult::DnsNotAllowed(name.clone()));
            }
        }
        Ok(())
    }

    fn matches(&self, cluster: &str, role: &str) -> bool {
        let any = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        any(&self.clusters, cluster) && any(&self.roles, role)
    }
}

/// Every policy of one version, in binding order.
#[derive(Debug)]
pub struct PolicySet {
    bundle: String,
    version: String,
    policies: Vec<BoundPolicy>,
}

impl PolicySet {
    /// Loads every binding (compiling, linking, validating settings and schemas). The version
    /// is given by the source (a bundle version) or derived from the content.
    pub async fn load(
        host: &PolicyHost,
        bindings: &[PolicyBinding],
        bundle: &str,
        version: Option<&str>,
        commit: Option<&str>,
    ) -> Result<Self, SetError> {
        let mut loaded = Vec::with_capacity(bindings.len());
        let mut content = Sha256::new();
        for binding in bindings {
            let module = binding.module.bytes()?;
            let settings = binding.settings.to_string();
            let policy = host
                .load(&binding.name, module, &settings)
                .await
                .map_err(|source| SetError::Policy {
                    name: binding.name.clone(),
                    source,
                })?;
            let schema = binding
                .evidence_schema
                .as_ref()
                .map(jsonschema::validator_for)
                .transpose()
                .map_err(|e| SetError::Schema {
                    name: binding.name.clone(),
                    reason: e.to_string(),
                })?;
            let settings_digest = format!("sha256:{}", hex::encode(Sha256::digest(&settings)));
            content.update(policy.digest().to_string());
            content.update(&settings_digest);
            loaded.push((binding, policy, schema, settings_digest));
        }
        let version = version
            .map(str::to_string)
            .unwrap_or_else(|| hex::encode(&content.finalize()[..6]));
        let policies = loaded
            .into_iter()
            .map(|(binding, policy, schema, settings_digest)| BoundPolicy {
                provenance: PolicyRef {
                    name: binding.name.clone(),
                    bundle: bundle.to_string(),
                    version: version.clone(),
                    commit: commit.map(str::to_string),
                    module_digest: policy.digest().to_string(),
                    settings_digest,
                },
                policy,
                clusters: binding.clusters.clone(),
                roles: binding.roles.clone(),
                schema,
                dns_suffixes: binding.dns_suffixes.clone(),
            })
            .collect();
        Ok(Self {
            bundle: bundle.to_string(),
            version,
            policies,
        })
    }

    /// The first binding that covers `cluster` and `role`.
    pub fn select(&self, cluster: &str, role: &str) -> Option<&BoundPolicy> {
        self.policies.iter().find(|p| p.matches(cluster, role))
    }

    /// The policy of that name.
    pub fn by_name(&self, name: &str) -> Option<&BoundPolicy> {
        self.policies.iter().find(|p| p.provenance.name == name)
    }

    /// The bundle name.
    pub fn bundle(&self) -> &str {
        &self.bundle
    }

    /// The version.
    pub fn version(&self) -> &str {
        &self.version
    }
}

/// The set in force. Readers take an `Arc` and keep it for the whole request, so a swap never
/// changes the policy under a request in flight.
#[derive(Debug, Default)]
pub struct ActivePolicies {
    current: RwLock<Option<Arc<PolicySet>>>,
}

impl ActivePolicies {
    /// The set in force, if any is loaded.
    pub fn current(&self) -> Option<Arc<PolicySet>> {
        self.current.read().ok().and_then(|g| g.clone())
    }

    /// Puts `set` in force.
    pub fn swap(&self, set: PolicySet) {
        if let Ok(mut guard) = self.current.write() {
            *guard = Some(Arc::new(set));
        }
    }
}
