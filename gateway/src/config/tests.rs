use std::path::Path;
use std::time::Duration;

use super::*;

fn parse(text: &str) -> Result<Config, Parse> {
    Config::parse(text, Path::new("/etc/omnirelay"))
}

#[test]
fn minimal_config_takes_every_default() {
    let c = parse(r#"trust_domain = "omnirelay.example""#).unwrap();
    assert_eq!(c.trust_domain.as_str(), "omnirelay.example");
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8443");
    assert_eq!(
        c.server.tls_key,
        Path::new("/etc/omnirelay/tls/gateway.key")
    );
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:8444");
    assert_eq!(c.identity.max_ttl, Duration::from_secs(86_400));
    assert_eq!(c.policy.max_ttl, c.identity.max_ttl);
    assert_eq!(c.store.sqlite, Path::new("/etc/omnirelay/state/gateway.db"));
    assert!(c.policies.is_empty());
}

#[test]
fn every_problem_is_reported_at_once() {
    let err = parse(
        r#"
        trust_domain = "Bad.Domain"
        [server]
        listen = "nowhere"
        handshake_timeout = "soon"
        max_connections = 0
        [limits]
        per_ip = { per_second = 0, burst = 5 }
        [log]
        format = "xml"
        "#,
    )
    .unwrap_err();
    let Parse::Invalid(problems) = err else {
        panic!("{err:?}")
    };
    let keys: Vec<&str> = problems
        .iter()
        .map(|p| p.split(':').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "trust_domain",
            "server.listen",
            "server.max_connections",
            "server.handshake_timeout",
            "limits.per_ip.per_second",
            "log.format"
        ],
        "{problems:#?}"
    );
}

#[test]
fn unknown_keys_are_syntax_errors() {
    let err = parse("trust_domain = \"a.example\"\n[server]\nlisten_addr = \"x\"").unwrap_err();
    assert!(
        matches!(&err, Parse::Syntax(m) if m.contains("listen_addr")),
        "{err:?}"
    );
}

#[test]
fn policies_resolve_modules_and_default_to_any_cluster() {
    let c = parse(
        r#"
        trust_domain = "a.example"
        [[policies]]
        name = "edge"
        module = "builtin:cluster-role"
        settings = { clusters = ["edge"], roles = ["r"], ttl_seconds = 600 }
        [[policies]]
        name = "custom"
        module = "policies/custom.wasm"
        clusters = ["core"]
        "#,
    )
    .unwrap();
    assert_eq!(
        c.policies[0].module,
        ModuleSource::Builtin("cluster-role".into())
    );
    assert_eq!(c.policies[0].clusters, ["*"]);
    assert_eq!(c.policies[0].settings["ttl_seconds"], 600);
    assert_eq!(
        c.policies[1].module,
        ModuleSource::File("/etc/omnirelay/policies/custom.wasm".into())
    );
    assert_eq!(c.policies[1].clusters, ["core"]);
}

/// `examples/gateway.toml` documents every key with its default: it must parse, and every
/// section must equal what an otherwise empty file gets.
#[test]
fn the_documented_defaults_are_the_real_defaults() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/gateway.toml"
    ))
    .unwrap();
    let base = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"));
    let documented = match Config::parse(&text, base) {
        Ok(c) => c,
        Err(e) => panic!("{e:?}"),
    };
    let defaults = Config::parse(r#"trust_domain = "omnirelay.example""#, base).unwrap();
    assert_eq!(documented.server, defaults.server);
    assert_eq!(documented.admin, defaults.admin);
    assert_eq!(documented.identity, defaults.identity);
    assert_eq!(documented.token, defaults.token);
    assert_eq!(documented.attestation, defaults.attestation);
    assert_eq!(documented.limits, defaults.limits);
    assert_eq!(documented.store, defaults.store);
    assert_eq!(documented.audit, defaults.audit);
    assert_eq!(documented.policy, defaults.policy);
    assert_eq!(documented.log, defaults.log);
    assert_eq!(documented.policies.len(), 2);
    assert!(documented.policies[0].evidence_schema.is_some());
}

#[test]
fn the_audit_section_resolves_its_key_and_refuses_a_zero_schedule() {
    let c = parse(
        r#"
        trust_domain = "a.example"
        [audit]
        signing_key = "keys/audit.key"
        checkpoint_every = 50
        checkpoint_interval = "5s"
        "#,
    )
    .unwrap();
    assert_eq!(
        c.audit.signing_key,
        std::path::PathBuf::from("/etc/omnirelay/keys/audit.key")
    );
    assert_eq!(c.audit.checkpoint_every.get(), 50);
    assert_eq!(c.audit.checkpoint_interval, Duration::from_secs(5));
    let err = parse(
        "trust_domain = \"a.example\"\n[audit]\ncheckpoint_every = 0\ncheckpoint_interval = \"0s\"",
    )
    .unwrap_err();
    let Parse::Invalid(problems) = err else {
        panic!("{err:?}")
    };
    let keys: Vec<&str> = problems
        .iter()
        .filter_map(|p| p.split(':').next())
        .collect();
    assert_eq!(
        keys,
        ["audit.checkpoint_every", "audit.checkpoint_interval"],
        "{problems:?}"
    );
}

/// The commented-out `[policy.source]` of `examples/gateway.toml` lists every key with its
/// default (`git` aside, which has none): uncommented, those lines give what a section naming
/// only `git` gets, and every key the section accepts is documented there.
#[test]
fn the_documented_policy_source_defaults_are_the_real_defaults() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/gateway.toml"
    ))
    .unwrap();
    let base = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"));
    let block: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "# [policy.source]")
        .skip(1)
        .take_while(|l| l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| {
            l.split_once(" = ").is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            })
        })
        .collect();
    let section = |lines: &str| {
        let toml = format!("trust_domain = \"a.example\"\n[policy.source]\n{lines}");
        match Config::parse(&toml, base) {
            Ok(c) => c.policy_source.unwrap(),
            Err(e) => panic!("{e:?}\n{toml}"),
        }
    };
    let git = block.iter().find(|l| l.starts_with("git = ")).unwrap();
    assert_eq!(section(&block.join("\n")), section(git));
    for key in [
        "git",
        "branch",
        "tags",
        "candidate_branch",
        "shadow_queue",
        "shadow_keep",
        "poll_interval",
        "cache_dir",
        "require_signed_commits",
        "allowed_signers",
        "allow_unsigned_remote",
        "ca_file",
        "credential_file",
        "credential_kind",
        "ssh_key",
        "known_hosts",
        "allow_insecure_transport",
    ] {
        assert!(
            text.contains(&format!("\n# {key} = ")) || text.contains(&format!("\n#   {key} = ")),
            "{key} is not documented"
        );
    }
}

fn source_problems(section: &str) -> Vec<String> {
    match parse(&format!(
        "trust_domain = \"a.example\"\n[policy.source]\n{section}"
    )) {
        Ok(_) => Vec::new(),
        Err(Parse::Invalid(problems)) => problems,
        Err(e) => panic!("{e:?}"),
    }
}

fn keys(problems: &[String]) -> Vec<&str> {
    problems
        .iter()
        .map(|p| p.split(':').next().unwrap())
        .collect()
}

#[test]
fn a_network_source_needs_signatures_and_a_transport_that_fits() {
    let unsigned = source_problems(r#"git = "https://git.example/policy.git""#);
    assert_eq!(keys(&unsigned), ["policy.source.require_signed_commits"]);
    assert!(
        unsigned[0].contains("allow_unsigned_remote = true"),
        "{unsigned:?}"
    );
    assert!(
        source_problems("git = \"https://git.example/p.git\"\nallow_unsigned_remote = true")
            .is_empty()
    );
    let plaintext =
        source_problems("git = \"http://git.example/p.git\"\nallow_unsigned_remote = true");
    assert_eq!(keys(&plaintext), ["policy.source.git"]);
    assert!(
        plaintext[0].contains("allow_insecure_transport = true"),
        "{plaintext:?}"
    );
    assert!(
        source_problems(
            "git = \"git://git.example/p.git\"\nallow_unsigned_remote = true\nallow_insecure_transport = true"
        )
        .is_empty()
    );
    assert_eq!(
        keys(&source_problems(
            "git = \"git@git.example:p.git\"\nrequire_signed_commits = true\nallowed_signers = \"s\""
        )),
        ["policy.source.ssh_key", "policy.source.known_hosts"]
    );
    assert_eq!(
        keys(&source_problems(
            "git = \"/srv/p.git\"\nca_file = \"ca.pem\"\ncredential_kind = \"digest\""
        )),
        ["policy.source.credential_kind", "policy.source.ca_file"]
    );
    let password = source_problems(r#"git = "https://ci:hunter2@git.example/p.git""#);
    assert_eq!(keys(&password), ["policy.source.git"]);
    assert!(!password[0].contains("hunter2"), "{password:?}");
}

#[test]
fn transport_files_resolve_against_the_config_directory() {
    let c = parse(
        r#"
        trust_domain = "a.example"
        [policy.source]
        git = "https://git.example/policy.git"
        require_signed_commits = true
        allowed_signers = "policy/allowed_signers"
        ca_file = "policy/ca.pem"
        credential_file = "/run/secrets/policy-token"
        credential_kind = "basic"
        "#,
    )
    .unwrap();
    let source = c.policy_source.unwrap();
    assert_eq!(source.url.as_str(), "https://git.example/policy.git");
    assert_eq!(
        source.transport.ca_file.as_deref(),
        Some(Path::new("/etc/omnirelay/policy/ca.pem"))
    );
    assert_eq!(
        source.transport.credential_file.as_deref(),
        Some(Path::new("/run/secrets/policy-token"))
    );
    assert_eq!(
        source.transport.credential_kind,
        crate::reload::remote::CredentialKind::Basic
    );
    let local = parse("trust_domain = \"a.example\"\n[policy.source]\ngit = \"repo.git\"").unwrap();
    assert_eq!(
        local.policy_source.unwrap().url.as_str(),
        "/etc/omnirelay/repo.git"
    );
}

#[test]
fn a_postgres_store_takes_its_section_with_defaults() {
    let c = parse(
        r#"
        trust_domain = "omnirelay.example"
        [store]
        backend = "postgres"
        [store.postgres]
        url = "postgres://gateway@db.example:5432/omnirelay?sslmode=require"
        password_file = "secrets/db.password"
        ca_file = "tls/db-ca.pem"
        pool_size = 32
        "#,
    )
    .unwrap();
    let Backend::Postgres(pg) = &c.store.backend else {
        panic!("{:?}", c.store.backend)
    };
    assert_eq!(
        pg.url,
        "postgres://gateway@db.example:5432/omnirelay?sslmode=require"
    );
    assert_eq!(
        pg.password,
        PasswordSource::File("/etc/omnirelay/secrets/db.password".into())
    );
    assert_eq!(
        pg.ca_file.as_deref(),
        Some(Path::new("/etc/omnirelay/tls/db-ca.pem"))
    );
    assert_eq!(pg.pool_size.get(), 32);
    assert_eq!(pg.statement_timeout, Duration::from_secs(5));
    assert_eq!(pg.connect_timeout, Duration::from_secs(5));
    // SQLite stays the default.
    let plain = parse(r#"trust_domain = "omnirelay.example""#).unwrap();
    assert_eq!(plain.store.backend, Backend::Sqlite);
}

#[test]
fn a_password_in_the_url_is_refused_without_being_repeated() {
    const SECRET: &str = "hunter2-in-the-url";
    for url in [
        format!("postgres://gateway:{SECRET}@db.example/omnirelay"),
        format!("postgres://gateway@db.example/omnirelay?password={SECRET}"),
        format!("host=db.example user=gateway password={SECRET}"),
    ] {
        let text = format!(
            "trust_domain = \"omnirelay.example\"\n[store]\nbackend = \"postgres\"\n\
             [store.postgres]\nurl = \"{url}\"\n"
        );
        let err = parse(&text).unwrap_err();
        let Parse::Invalid(problems) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("carries a password"), "{problems:?}");
        assert!(!format!("{err:?}").contains(SECRET), "{err:?}");
    }
}

#[test]
fn postgres_settings_are_checked_together() {
    let err = parse(
        r#"
        trust_domain = "omnirelay.example"
        [store]
        backend = "postgres"
        [store.postgres]
        url = "postgres://gateway@db.example/omnirelay?sslmode=require"
        password_file = "a"
        password_env = "B"
        pool_size = 0
        statement_timeout = "soon"
        "#,
    )
    .unwrap_err();
    let Parse::Invalid(problems) = err else {
        panic!("{err:?}")
    };
    let keys: Vec<&str> = problems
        .iter()
        .map(|p| p.split(':').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "store.postgres.url",
            "store.postgres",
            "store.postgres.pool_size",
            "store.postgres.statement_timeout"
        ],
        "{problems:#?}"
    );
    for (text, key) in [
        ("[store]\nbackend = \"mysql\"", "store.backend"),
        ("[store]\nbackend = \"postgres\"", "store.postgres"),
        (
            "[store.postgres]\nurl = \"postgres://db/x\"",
            "store.postgres",
        ),
    ] {
        let err = parse(&format!("trust_domain = \"omnirelay.example\"\n{text}")).unwrap_err();
        assert!(
            matches!(&err, Parse::Invalid(p) if p.len() == 1 && p[0].starts_with(&format!("{key}:"))),
            "{text}: {err:?}"
        );
    }
}

#[test]
fn refusal_hold_may_be_zero_and_at_most_ten_seconds() {
    let off = parse("trust_domain = \"a.example\"\n[limits]\nrefusal_hold = \"0s\"").unwrap();
    assert_eq!(off.limits.refusal_hold, Duration::ZERO);
    let longest = parse("trust_domain = \"a.example\"\n[limits]\nrefusal_hold = \"10s\"").unwrap();
    assert_eq!(longest.limits.refusal_hold, Duration::from_secs(10));
    for bad in ["11s", "soon"] {
        let err = parse(&format!(
            "trust_domain = \"a.example\"\n[limits]\nrefusal_hold = \"{bad}\""
        ))
        .unwrap_err();
        let Parse::Invalid(problems) = err else {
            panic!("{err:?}")
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("limits.refusal_hold"),
            "{problems:?}"
        );
    }
}
