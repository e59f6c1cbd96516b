//! `gateway.toml`: parsed into [`raw::RawConfig`] (serde, unknown keys refused), then validated
//! into a typed [`Config`] that reports every problem at once. Relative paths resolve against
//! the directory of the config file. Every default lives in the section types' constructors.

mod files;
mod raw;
mod source;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::attest::AttestConfig;
use crate::audit::AuditConfig;
use crate::identity::{IdentityConfig, TrustDomain};
use crate::limits::{LimitsConfig, MAX_REFUSAL_HOLD, Rate};
use crate::policy::{ModuleSource, PolicyBinding, PolicyConfig};
use crate::reload::SourceConfig;
use crate::server::{AdminConfig, ServerConfig};
use crate::store::{Backend, PasswordSource, PostgresConfig, StoreConfig};
use crate::token::TokenConfig;

pub use raw::RawConfig;

/// Log output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// `json` or `human`. Default `human`.
    pub json: bool,
    /// A `tracing` filter, e.g. `info,omnirelay::policy=debug`. Default `info`.
    pub filter: String,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The SPIFFE trust domain this gateway issues in.
    pub trust_domain: TrustDomain,
    /// The node-facing listener.
    pub server: ServerConfig,
    /// The operator listener.
    pub admin: AdminConfig,
    /// The CA.
    pub identity: IdentityConfig,
    /// Bootstrap tokens.
    pub token: TokenConfig,
    /// Attestation.
    pub attestation: AttestConfig,
    /// Rate limits.
    pub limits: LimitsConfig,
    /// Durable state.
    pub store: StoreConfig,
    /// Audit checkpoints.
    pub audit: AuditConfig,
    /// Policy execution limits.
    pub policy: PolicyConfig,
    /// How long and how many live decisions are kept for replay (`[policy] decisions_*`).
    pub decisions: crate::shadow::RecordConfig,
    /// Which policy decides for which cluster and role (when they are configured here).
    pub policies: Vec<PolicyBinding>,
    /// The git repository policy bundles come from (instead of `[[policies]]`).
    pub policy_source: Option<SourceConfig>,
    /// Logging.
    pub log: LogConfig,
}

/// The configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// Values are out of range or inconsistent; every problem is listed.
    #[error("{} problem(s) in {}:\n  - {}", problems.len(), path.display(), problems.join("\n  - "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Each problem, prefixed with its key.
        problems: Vec<String>,
    },
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| match e {
            Parse::Syntax(message) => ConfigError::Syntax {
                path: path.to_path_buf(),
                message,
            },
            Parse::Invalid(problems) => ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            },
        })
    }

    /// Parses TOML text, resolving relative paths against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, Parse> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| Parse::Syntax(e.to_string()))?;
        let mut v = Validator {
            base,
            problems: Vec::new(),
        };
        let config = v.config(raw);
        match (config, v.problems.is_empty()) {
            (Some(config), true) => Ok(config),
            _ => Err(Parse::Invalid(v.problems)),
        }
    }

    /// Problems with the files the configuration names: missing, unreadable, private keys or
    /// state files that others can read, trust anchors that others can write, an
    /// `allowed_signers` that does not parse. `serve` refuses to start on any of them;
    /// `check-config` reports them all.
    pub fn check_files(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let public = [
            ("server.tls_cert", &self.server.tls_cert),
            ("identity.ca_cert", &self.identity.ca_cert),
        ];
        for (key, path) in public {
            if let Err(e) = std::fs::metadata(path) {
                problems.push(format!("{key}: {}: {e}", path.display()));
            }
        }
        let secret = [
            ("server.tls_key", &self.server.tls_key),
            ("identity.ca_key", &self.identity.ca_key),
            ("token.signing_key", &self.token.signing_key),
            ("admin.credential", &self.admin.credential),
            ("audit.signing_key", &self.audit.signing_key),
        ];
        for (key, path) in secret {
            if key == "audit.signing_key" && !path.exists() {
                // States made before audit checkpoints existed have no audit key.
                problems.push(format!(
                    "{key}: {} does not exist; create it with `omnirelay audit keygen --config <this file>`",
                    path.display()
                ));
            } else if let Err(e) = crate::secrets::read(path) {
                problems.push(format!("{key}: {e}"));
            }
        }
        for (i, binding) in self.policies.iter().enumerate() {
            if let ModuleSource::File(path) = &binding.module
                && let Err(e) = std::fs::metadata(path)
            {
                problems.push(format!("policies[{i}].module: {}: {e}", path.display()));
            }
        }
        problems.extend(self.check_trust_anchors());
        problems.extend(self.check_source_secrets());
        problems.extend(self.check_state_files());
        problems
    }
}

/// Why text did not parse into a configuration.
#[derive(Debug)]
pub enum Parse {
    /// Malformed TOML or unknown keys.
    Syntax(String),
    /// Every validation problem.
    Invalid(Vec<String>),
}

/// Collects problems while converting the raw sections.
struct Validator<'a> {
    base: &'a Path,
    problems: Vec<String>,
}

impl Validator<'_> {
    fn problem(&mut self, key: &str, message: impl std::fmt::Display) {
        self.problems.push(format!("{key}: {message}"));
    }

    fn path(&self, p: Option<String>, default: &Path) -> PathBuf {
        let p = p
            .map(PathBuf::from)
            .unwrap_or_else(|| default.to_path_buf());
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }

    fn duration(&mut self, key: &str, text: Option<String>, default: Duration) -> Duration {
        match text {
            None => default,
            Some(t) => match humantime::parse_duration(&t) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    self.problem(key, "must be longer than zero");
                    default
                }
                Err(e) => {
                    self.problem(
                        key,
                        format!("{t:?} is not a duration like \"30s\" or \"15m\" ({e})"),
                    );
                    default
                }
            },
        }
    }

    fn addr(&mut self, key: &str, text: Option<String>, default: SocketAddr) -> SocketAddr {
        match text {
            None => default,
            Some(t) => t.parse().unwrap_or_else(|_| {
                self.problem(
                    key,
                    format!("{t:?} is not an address like \"127.0.0.1:8443\""),
                );
                default
            }),
        }
    }

    fn nonzero(&mut self, key: &str, value: Option<u32>, default: NonZeroU32) -> NonZeroU32 {
        match value.map(NonZeroU32::new) {
            None => default,
            Some(Some(n)) => n,
            Some(None) => {
                self.problem(key, "must be at least 1");
                default
            }
        }
    }

    fn rate(&mut self, key: &str, raw: Option<raw::RawRate>, default: Rate) -> Rate {
        let Some(raw) = raw else { return default };
        let per_second = self.nonzero(
            &format!("{key}.per_second"),
            Some(raw.per_second),
            default.per_second,
        );
        let burst = self.nonzero(&format!("{key}.burst"), Some(raw.burst), default.burst);
        Rate { per_second, burst }
    }

    fn config(&mut self, mut raw: RawConfig) -> Option<Config> {
        let trust_domain = TrustDomain::parse(&raw.trust_domain)
            .map_err(|e| self.problem("trust_domain", e))
            .ok();
        let server = self.server(raw.server);
        let admin = AdminConfig {
            listen: self.addr(
                "admin.listen",
                raw.admin.listen,
                SocketAddr::from(([127, 0, 0, 1], 8444)),
            ),
            credential: self.path(raw.admin.credential, Path::new("admin/credential")),
        };
        let identity = self.identity(raw.identity);
        let token = self.token(raw.token);
        let attestation = self.attestation(raw.attestation);
        let limits = self.limits(raw.limits);
        let store = self.store(raw.store);
        let audit = self.audit(raw.audit);
        let has_source = raw.policy.source.is_some();
        let policy_source = raw.policy.source.take().and_then(|s| self.source(s));
        if has_source && !raw.policies.is_empty() {
            self.problem(
                "policies",
                "give either [[policies]] or [policy.source], not both",
            );
        }
        let decisions = crate::shadow::RecordConfig {
            retention: self.duration(
                "policy.decisions_retention",
                raw.policy.decisions_retention.take(),
                crate::shadow::RecordConfig::default().retention,
            ),
            keep: raw
                .policy
                .decisions_keep
                .unwrap_or(crate::shadow::RecordConfig::default().keep),
        };
        let mut policy = self.policy(raw.policy);
        policy.max_ttl = identity.max_ttl;
        let policies = raw
            .policies
            .into_iter()
            .enumerate()
            .filter_map(|(i, p)| self.binding(i, p))
            .collect();
        let log = self.log(raw.log);
        Some(Config {
            trust_domain: trust_domain?,
            server,
            admin,
            identity,
            token,
            attestation,
            limits,
            store,
            audit,
            policy,
            decisions,
            policies,
            policy_source,
            log,
        })
    }

    fn server(&mut self, raw: raw::RawServer) -> ServerConfig {
        let d = ServerConfig::defaults(
            self.path(raw.tls_cert, Path::new("tls/gateway.pem")),
            self.path(raw.tls_key, Path::new("tls/gateway.key")),
        );
        let max_body_bytes = raw.max_body_bytes.unwrap_or(d.max_body_bytes);
        if max_body_bytes < 4096 {
            self.problem(
                "server.max_body_bytes",
                "must be at least 4096 (a CSR and a token)",
            );
        }
        ServerConfig {
            listen: self.addr("server.listen", raw.listen, d.listen),
            max_connections: self.nonzero(
                "server.max_connections",
                raw.max_connections,
                d.max_connections,
            ),
            max_connections_per_ip: self.nonzero(
                "server.max_connections_per_ip",
                raw.max_connections_per_ip,
                d.max_connections_per_ip,
            ),
            max_in_flight: self.nonzero("server.max_in_flight", raw.max_in_flight, d.max_in_flight),
            max_in_flight_per_ip: self.nonzero(
                "server.max_in_flight_per_ip",
                raw.max_in_flight_per_ip,
                d.max_in_flight_per_ip,
            ),
            body_read_timeout: self.duration(
                "server.body_read_timeout",
                raw.body_read_timeout,
                d.body_read_timeout,
            ),
            handshake_timeout: self.duration(
                "server.handshake_timeout",
                raw.handshake_timeout,
                d.handshake_timeout,
            ),
            header_read_timeout: self.duration(
                "server.header_read_timeout",
                raw.header_read_timeout,
                d.header_read_timeout,
            ),
            request_timeout: self.duration(
                "server.request_timeout",
                raw.request_timeout,
                d.request_timeout,
            ),
            max_body_bytes,
            max_header_bytes: raw.max_header_bytes.unwrap_or(d.max_header_bytes),
            ..d
        }
    }

    fn identity(&mut self, raw: raw::RawIdentity) -> IdentityConfig {
        let d = IdentityConfig::defaults();
        let percent = raw
            .renew_remaining_percent
            .unwrap_or(d.renew_remaining_percent);
        if !(1..=90).contains(&percent) {
            self.problem(
                "identity.renew_remaining_percent",
                "must be between 1 and 90",
            );
        }
        IdentityConfig {
            ca_cert: self.path(raw.ca_cert, &d.ca_cert),
            ca_key: self.path(raw.ca_key, &d.ca_key),
            rotation_dir: self.path(raw.rotation_dir, &d.rotation_dir),
            max_ttl: self.duration("identity.max_ttl", raw.max_ttl, d.max_ttl),
            renew_remaining_percent: percent,
            bundle_refresh_hint: self.duration(
                "identity.bundle_refresh_hint",
                raw.bundle_refresh_hint,
                d.bundle_refresh_hint,
            ),
            // Zero is allowed here: no quarantine at all.
            quarantine: match raw.quarantine {
                Some(t) if humantime::parse_duration(&t).is_ok_and(|d| d.is_zero()) => {
                    std::time::Duration::ZERO
                }
                other => self.duration("identity.quarantine", other, d.quarantine),
            },
            crl_validity: {
                let validity =
                    self.duration("identity.crl_validity", raw.crl_validity, d.crl_validity);
                if validity < std::time::Duration::from_secs(60) {
                    self.problem("identity.crl_validity", "must be at least 1m");
                }
                validity
            },
        }
    }

    fn token(&mut self, raw: raw::RawToken) -> TokenConfig {
        let d = TokenConfig::defaults();
        TokenConfig {
            signing_key: self.path(raw.signing_key, &d.signing_key),
            verification_keys: raw
                .verification_keys
                .into_iter()
                .map(|p| self.path(Some(p), Path::new("")))
                .collect(),
            issuer: raw.issuer.unwrap_or(d.issuer),
            max_ttl: self.duration("token.max_ttl", raw.max_ttl, d.max_ttl),
            leeway: raw
                .leeway
                .map(|l| self.duration("token.leeway", Some(l), d.leeway))
                .unwrap_or(d.leeway),
        }
    }

    fn attestation(&mut self, raw: raw::RawAttestation) -> AttestConfig {
        let d = AttestConfig::default();
        AttestConfig {
            nonce_ttl: self.duration("attestation.nonce_ttl", raw.nonce_ttl, d.nonce_ttl),
            max_evidence_age: self.duration(
                "attestation.max_evidence_age",
                raw.max_evidence_age,
                d.max_evidence_age,
            ),
            max_clock_skew: self.duration(
                "attestation.max_clock_skew",
                raw.max_clock_skew,
                d.max_clock_skew,
            ),
            device_cas: raw
                .device_cas
                .into_iter()
                .map(|p| self.path(Some(p), Path::new("")))
                .collect(),
        }
    }

    fn limits(&mut self, raw: raw::RawLimits) -> LimitsConfig {
        let d = LimitsConfig::default();
        LimitsConfig {
            global: self.rate("limits.global", raw.global, d.global),
            per_ip: self.rate("limits.per_ip", raw.per_ip, d.per_ip),
            per_token: self.rate("limits.per_token", raw.per_token, d.per_token),
            per_cluster: self.rate("limits.per_cluster", raw.per_cluster, d.per_cluster),
            refusal_audit_interval: self.duration(
                "limits.refusal_audit_interval",
                raw.refusal_audit_interval,
                d.refusal_audit_interval,
            ),
            refusal_audit_max_keys: self.nonzero(
                "limits.refusal_audit_max_keys",
                raw.refusal_audit_max_keys,
                d.refusal_audit_max_keys,
            ),
            refusal_hold: self.refusal_hold(raw.refusal_hold, d.refusal_hold),
        }
    }

    /// `limits.refusal_hold`: zero turns holding off; at most [`MAX_REFUSAL_HOLD`].
    fn refusal_hold(&mut self, text: Option<String>, default: Duration) -> Duration {
        const KEY: &str = "limits.refusal_hold";
        let Some(text) = text else { return default };
        match humantime::parse_duration(&text) {
            Ok(d) if d <= MAX_REFUSAL_HOLD => d,
            Ok(_) => {
                self.problem(
                    KEY,
                    format!(
                        "must be at most {} (a held refusal keeps its connection open)",
                        humantime::format_duration(MAX_REFUSAL_HOLD)
                    ),
                );
                default
            }
            Err(e) => {
                self.problem(
                    KEY,
                    format!("{text:?} is not a duration like \"1s\" or \"0s\" ({e})"),
                );
                default
            }
        }
    }

    fn store(&mut self, raw: raw::RawStore) -> StoreConfig {
        let max_batch = raw.max_batch.unwrap_or(512);
        if max_batch == 0 {
            self.problem("store.max_batch", "must be at least 1");
        }
        let backend = match raw.backend.as_deref() {
            None | Some("sqlite") => {
                if raw.postgres.is_some() {
                    self.problem(
                        "store.postgres",
                        "is set but store.backend is not \"postgres\"",
                    );
                }
                Backend::Sqlite
            }
            Some("postgres") => match raw.postgres {
                Some(pg) => Backend::Postgres(self.postgres(pg)),
                None => {
                    self.problem(
                        "store.postgres",
                        "store.backend = \"postgres\" needs it (url)",
                    );
                    Backend::Sqlite
                }
            },
            Some(other) => {
                self.problem(
                    "store.backend",
                    format!("{other:?} is not \"sqlite\" or \"postgres\""),
                );
                Backend::Sqlite
            }
        };
        StoreConfig {
            backend,
            sqlite: self.path(raw.sqlite, Path::new("state/gateway.db")),
            audit_file: self.path(raw.audit_file, Path::new("audit/audit.log")),
            max_batch: max_batch.max(1),
        }
    }

    /// The `[store.postgres]` section. The URL must parse and carry no password (a config
    /// file is copied and shown around; the password comes from a file or the environment),
    /// and TLS is asked for only with a CA to check the server against. Problems never quote
    /// the URL, which might hold the very password they refuse.
    fn postgres(&mut self, raw: raw::RawPostgres) -> PostgresConfig {
        let url = raw.url.unwrap_or_default();
        let parsed = url.parse::<tokio_postgres::Config>();
        match &parsed {
            _ if url.is_empty() => self.problem("store.postgres.url", "is required"),
            Err(_) => self.problem(
                "store.postgres.url",
                "is not a PostgreSQL URL like \"postgres://gateway@db.example:5432/omnirelay\"",
            ),
            Ok(pg) if pg.get_password().is_some() => self.problem(
                "store.postgres.url",
                "carries a password: put it in password_file or password_env instead",
            ),
            Ok(_) => {}
        }
        let mut config = PostgresConfig::new(url);
        let ca_file = raw.ca_file.map(|p| self.path(Some(p), Path::new("")));
        if let Ok(pg) = &parsed
            && pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require
            && ca_file.is_none()
        {
            self.problem(
                "store.postgres.url",
                "asks for TLS (sslmode=require): set store.postgres.ca_file to the database's CA",
            );
        }
        config.ca_file = ca_file;
        config.password = match (raw.password_file, raw.password_env) {
            (Some(_), Some(_)) => {
                self.problem(
                    "store.postgres",
                    "password_file and password_env exclude each other",
                );
                PasswordSource::None
            }
            (Some(file), None) => PasswordSource::File(self.path(Some(file), Path::new(""))),
            (None, Some(var)) if var.is_empty() => {
                self.problem("store.postgres.password_env", "must name a variable");
                PasswordSource::None
            }
            (None, Some(var)) => PasswordSource::Env(var),
            (None, None) => PasswordSource::None,
        };
        match raw.pool_size.map(std::num::NonZeroUsize::new) {
            None => {}
            Some(Some(n)) => config.pool_size = n,
            Some(None) => self.problem("store.postgres.pool_size", "must be at least 1"),
        }
        config.statement_timeout = self.duration(
            "store.postgres.statement_timeout",
            raw.statement_timeout,
            config.statement_timeout,
        );
        config.connect_timeout = self.duration(
            "store.postgres.connect_timeout",
            raw.connect_timeout,
            config.connect_timeout,
        );
        config
    }

    fn audit(&mut self, raw: raw::RawAudit) -> AuditConfig {
        let d = AuditConfig::defaults();
        let checkpoint_every = match raw.checkpoint_every.map(std::num::NonZeroU64::new) {
            None => d.checkpoint_every,
            Some(Some(n)) => n,
            Some(None) => {
                self.problem("audit.checkpoint_every", "must be at least 1");
                d.checkpoint_every
            }
        };
        AuditConfig {
            signing_key: self.path(raw.signing_key, &d.signing_key),
            checkpoint_every,
            checkpoint_interval: self.duration(
                "audit.checkpoint_interval",
                raw.checkpoint_interval,
                d.checkpoint_interval,
            ),
        }
    }

    fn policy(&mut self, raw: raw::RawPolicy) -> PolicyConfig {
        let d = PolicyConfig::default();
        let max_concurrent = self.nonzero(
            "policy.max_concurrent",
            raw.max_concurrent,
            d.max_concurrent,
        );
        let per_policy_slots = self.nonzero(
            "policy.per_policy_slots",
            raw.per_policy_slots,
            PolicyConfig::default_share(max_concurrent),
        );
        if per_policy_slots > max_concurrent {
            self.problem(
                "policy.per_policy_slots",
                format!("must be at most max_concurrent ({max_concurrent})"),
            );
        }
        PolicyConfig {
            memory_limit: raw.memory_limit_bytes.unwrap_or(d.memory_limit),
            deadline: self.duration("policy.deadline", raw.deadline, d.deadline),
            max_concurrent,
            queue_timeout: self.duration(
                "policy.queue_timeout",
                raw.queue_timeout,
                d.queue_timeout,
            ),
            per_policy_slots: per_policy_slots.min(max_concurrent),
            breaker_failures: self.nonzero(
                "policy.breaker_failures",
                raw.breaker_failures,
                d.breaker_failures,
            ),
            breaker_cooldown: self.duration(
                "policy.breaker_cooldown",
                raw.breaker_cooldown,
                d.breaker_cooldown,
            ),
            min_ttl: self.duration("policy.min_ttl", raw.min_ttl, d.min_ttl),
            max_ttl: d.max_ttl,
            max_dns_sans: raw.max_dns_sans.unwrap_or(d.max_dns_sans),
            max_log_lines: raw.max_log_lines.unwrap_or(d.max_log_lines),
        }
    }

    fn binding(&mut self, i: usize, raw: raw::RawBinding) -> Option<PolicyBinding> {
        let key = format!("policies[{i}]");
        if raw.name.is_empty() {
            self.problem(&format!("{key}.name"), "must not be empty");
        }
        let module = match ModuleSource::parse(&raw.module) {
            ModuleSource::File(p) if p.is_relative() => ModuleSource::File(self.base.join(p)),
            other => other,
        };
        let settings = serde_json::to_value(raw.settings.unwrap_or_default())
            .map_err(|e| self.problem(&format!("{key}.settings"), e))
            .ok()?;
        let evidence_schema = match raw.evidence_schema {
            None => None,
            Some(path) => {
                let path = self.path(Some(path), Path::new(""));
                let parsed = std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| {
                        serde_json::from_str::<serde_json::Value>(&t).map_err(|e| e.to_string())
                    });
                match parsed {
                    Ok(schema) => Some(schema),
                    Err(e) => {
                        self.problem(
                            &format!("{key}.evidence_schema"),
                            format!("{}: {e}", path.display()),
                        );
                        None
                    }
                }
            }
        };
        for suffix in &raw.dns_suffixes {
            if let Err(why) = crate::policy::check_dns_suffix(suffix) {
                self.problem(&format!("{key}.dns_suffixes"), format!("{suffix:?}: {why}"));
            }
        }
        let or_any = |list: Vec<String>| {
            if list.is_empty() {
                vec!["*".to_string()]
            } else {
                list
            }
        };
        Some(PolicyBinding {
            name: raw.name,
            module,
            clusters: or_any(raw.clusters),
            roles: or_any(raw.roles),
            settings,
            evidence_schema,
            dns_suffixes: raw.dns_suffixes,
        })
    }

    fn log(&mut self, raw: raw::RawLog) -> LogConfig {
        let json = match raw.format.as_deref() {
            None | Some("human") => false,
            Some("json") => true,
            Some(other) => {
                self.problem(
                    "log.format",
                    format!("{other:?} is neither \"human\" nor \"json\""),
                );
                false
            }
        };
        LogConfig {
            json,
            filter: raw.filter.unwrap_or_else(|| "info".into()),
        }
    }
}

#[cfg(test)]
mod tests;
