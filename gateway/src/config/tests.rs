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
