//! The configuration file as written: every key optional except `trust_domain`, unknown keys
//! refused so that a typo is an error rather than a silently ignored setting.

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawConfig {
    pub trust_domain: String,
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub identity: RawIdentity,
    #[serde(default)]
    pub token: RawToken,
    #[serde(default)]
    pub attestation: RawAttestation,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub policy: RawPolicy,
    #[serde(default)]
    pub policies: Vec<RawBinding>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub audit: RawAudit,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub max_connections: Option<u32>,
    pub max_connections_per_ip: Option<u32>,
    pub max_in_flight: Option<u32>,
    pub max_in_flight_per_ip: Option<u32>,
    pub handshake_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub body_read_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub max_header_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub credential: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub ca_cert: Option<String>,
    pub ca_key: Option<String>,
    pub rotation_dir: Option<String>,
    pub max_ttl: Option<String>,
    pub renew_remaining_percent: Option<u8>,
    pub bundle_refresh_hint: Option<String>,
    pub quarantine: Option<String>,
    pub crl_validity: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawToken {
    pub signing_key: Option<String>,
    #[serde(default)]
    pub verification_keys: Vec<String>,
    pub issuer: Option<String>,
    pub max_ttl: Option<String>,
    pub leeway: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAttestation {
    pub nonce_ttl: Option<String>,
    pub max_evidence_age: Option<String>,
    pub max_clock_skew: Option<String>,
    #[serde(default)]
    pub device_cas: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRate {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub global: Option<RawRate>,
    pub per_ip: Option<RawRate>,
    pub per_token: Option<RawRate>,
    pub per_cluster: Option<RawRate>,
    pub refusal_audit_interval: Option<String>,
    pub refusal_audit_max_keys: Option<u32>,
    pub refusal_hold: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub backend: Option<String>,
    pub sqlite: Option<String>,
    pub audit_file: Option<String>,
    pub max_batch: Option<usize>,
    pub postgres: Option<RawPostgres>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    pub url: Option<String>,
    pub password_file: Option<String>,
    pub password_env: Option<String>,
    pub pool_size: Option<usize>,
    pub statement_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub memory_limit_bytes: Option<u64>,
    pub deadline: Option<String>,
    pub max_concurrent: Option<u32>,
    pub queue_timeout: Option<String>,
    pub per_policy_slots: Option<u32>,
    pub breaker_failures: Option<u32>,
    pub breaker_cooldown: Option<String>,
    pub min_ttl: Option<String>,
    pub max_dns_sans: Option<u32>,
    pub max_log_lines: Option<u32>,
    pub decisions_retention: Option<String>,
    pub decisions_keep: Option<u32>,
    pub source: Option<RawSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub git: String,
    pub branch: Option<String>,
    pub tags: Option<String>,
    pub candidate_branch: Option<String>,
    pub shadow_queue: Option<u32>,
    pub shadow_keep: Option<u32>,
    pub poll_interval: Option<String>,
    pub cache_dir: Option<String>,
    #[serde(default)]
    pub require_signed_commits: bool,
    pub allowed_signers: Option<String>,
    #[serde(default)]
    pub allow_unsigned_remote: bool,
    pub ca_file: Option<String>,
    pub credential_file: Option<String>,
    pub credential_kind: Option<String>,
    pub ssh_key: Option<String>,
    pub known_hosts: Option<String>,
    #[serde(default)]
    pub allow_insecure_transport: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBinding {
    pub name: String,
    pub module: String,
    #[serde(default)]
    pub clusters: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    pub settings: Option<toml::Table>,
    pub evidence_schema: Option<String>,
    #[serde(default)]
    pub dns_suffixes: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub signing_key: Option<String>,
    pub checkpoint_every: Option<u64>,
    pub checkpoint_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub filter: Option<String>,
}
