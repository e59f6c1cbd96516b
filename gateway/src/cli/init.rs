//! `omnirelay init`: a complete development state in one directory — a self-signed P-256 CA,
//! an Ed25519 token-signing key (separate from the CA key), an Ed25519 audit key that signs the
//! audit log's checkpoints (separate from both), the gateway's TLS certificate (itself an SVID),
//! an admin credential, and a `gateway.toml` that uses the built-in example policies. Private
//! files are 0600 in 0700 directories.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::audit::AuditKey;
use crate::identity::{Ca, SpiffeId, SpiffePath, TrustDomain};
use crate::secrets;
use crate::token::SigningKey;

/// What to create.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The directory (created if missing).
    pub dir: PathBuf,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Node listener address.
    pub listen: SocketAddr,
    /// Admin listener address.
    pub admin_listen: SocketAddr,
    /// Overwrite an existing state.
    pub force: bool,
}

const CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
const TLS_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// Creates the state; returns the path of `gateway.toml`.
pub fn init(options: &InitOptions) -> anyhow::Result<PathBuf> {
    let dir = &options.dir;
    let config_path = dir.join("gateway.toml");
    if config_path.exists() && !options.force {
        bail!(
            "{} exists; pass --force to replace this state",
            config_path.display()
        );
    }
    for sub in [
        "",
        "ca",
        "tls",
        "token",
        "admin",
        "state",
        "audit",
        "audit-key",
    ] {
        let path = dir.join(sub);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
    }
    // A rotation of the state being replaced names CAs this one does not have.
    match std::fs::remove_file(dir.join("ca/rotation.json")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).context("removing the old CA rotation state");
        }
        _ => {}
    }
    let now = SystemTime::now();
    let (ca_pem, ca_key) = Ca::generate(&options.trust_domain, CA_VALIDITY, now)?;
    write_public(&dir.join("ca/ca.pem"), &ca_pem)?;
    secrets::write(&dir.join("ca/ca.key"), ca_key.as_bytes())?;

    let (signer, signer_pem) = SigningKey::generate()?;
    secrets::write(&dir.join("token/signing.key"), signer_pem.as_bytes())?;
    write_public(
        &dir.join("token/signing.pub"),
        &signer.verifying_key().to_public_pem(),
    )?;

    write_audit_key(&dir.join("audit-key/audit.key"))?;

    let ca = Ca::load(&ca_pem, &ca_key)?;
    let gateway_id = SpiffeId::new(
        options.trust_domain.clone(),
        SpiffePath::parse("/omnirelay/gateway")?,
    )?;
    let ips = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        options.listen.ip(),
    ];
    let (tls_pem, tls_key) = ca.issue_server_cert(
        &gateway_id,
        &["localhost".to_string()],
        &ips,
        TLS_VALIDITY,
        now,
    )?;
    write_public(&dir.join("tls/gateway.pem"), &tls_pem)?;
    secrets::write(&dir.join("tls/gateway.key"), tls_key.as_bytes())?;

    let mut credential = [0u8; 32];
    SystemRandom::new()
        .fill(&mut credential)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    secrets::write(
        &dir.join("admin/credential"),
        URL_SAFE_NO_PAD.encode(credential).as_bytes(),
    )?;

    secrets::write_file(&config_path, config_text(options).as_bytes(), 0o644)?;
    Ok(config_path)
}

/// Creates an audit key at `path` (0600) and its public half beside it (`.pub`, 0644), which
/// is all an auditor needs to check the log's checkpoints. Returns the public half.
pub fn write_audit_key(path: &Path) -> anyhow::Result<String> {
    let (key, pem) = AuditKey::generate()?;
    secrets::write(path, pem.as_bytes())?;
    let public = key.public().to_public_pem();
    write_public(&path.with_extension("pub"), &public)?;
    Ok(public)
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    Ok(secrets::write_file(path, text.as_bytes(), 0o644)?)
}

fn config_text(o: &InitOptions) -> String {
    format!(
        r#"# OmniRelay bootstrap gateway — created by `omnirelay init`.
# Paths are relative to this file. Every setting not written here has the default documented
# in ARCHITECTURE.md; `omnirelay check-config --config gateway.toml` reports every problem.

trust_domain = "{td}"

[server]
listen = "{listen}"
tls_cert = "tls/gateway.pem"
tls_key = "tls/gateway.key"

[admin]
listen = "{admin}"
credential = "admin/credential"

[identity]
ca_cert = "ca/ca.pem"
ca_key = "ca/ca.key"
max_ttl = "24h"

[token]
signing_key = "token/signing.key"

[store]
sqlite = "state/gateway.db"
audit_file = "audit/audit.log"

# Signs a checkpoint of the audit chain every 1000 entries or 60 s; the public half is
# audit-key/audit.pub (`omnirelay audit verify --file LOG --public-key audit-key/audit.pub`).
[audit]
signing_key = "audit-key/audit.key"

# Nodes of the `secure` cluster must prove a device certificate (x509pop) with secure boot.
# Configure device CAs under [attestation] device_cas = ["devices/ca.pem"] to use it.
[[policies]]
name = "posture"
module = "builtin:posture"
clusters = ["secure"]
settings = {{ require_attestation = "x509pop", required_flags = ["secure-boot"], max_evidence_age_seconds = 300, ttl_seconds = 3600 }}

# Everyone else: the listed clusters and roles, one SPIFFE ID per node.
[[policies]]
name = "cluster-role"
module = "builtin:cluster-role"
settings = {{ clusters = ["demo", "edge-eu", "edge-us"], roles = ["dispatcher", "relay"], ttl_seconds = 3600 }}
"#,
        td = o.trust_domain,
        listen = o.listen,
        admin = o.admin_listen,
    )
}
