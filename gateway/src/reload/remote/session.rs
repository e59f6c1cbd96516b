//! What one remote operation needs, loaded from the files the settings name: the TLS roots,
//! the `Authorization` header, the SSH key and `known_hosts`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use http::HeaderValue;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::{CredentialKind, Remote, RemoteUrl, Scheme, TransportError};
use crate::secrets;

/// The loaded settings of one operation. Its `Debug` shows no credential.
pub(super) struct Session {
    /// The remote.
    pub url: RemoteUrl,
    /// `Authorization` for HTTP(S), marked sensitive.
    pub authorization: Option<HeaderValue>,
    /// The TLS client configuration for `https://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Where the roots came from, for a failed handshake's message.
    pub roots: String,
    /// The SSH key.
    pub ssh_key: Option<PathBuf>,
    /// The SSH `known_hosts`.
    pub known_hosts: Option<PathBuf>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("url", &self.url)
            .field("authorization", &self.authorization.as_ref().map(|_| "***"))
            .field("roots", &self.roots)
            .field("ssh_key", &self.ssh_key)
            .field("known_hosts", &self.known_hosts)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Reads what `remote` needs; nothing is contacted yet.
    pub fn open(remote: &Remote) -> Result<Self, TransportError> {
        let config = &remote.transport;
        let scheme = remote.url.scheme();
        let mut session = Self {
            url: remote.url.clone(),
            authorization: None,
            tls: None,
            roots: String::new(),
            ssh_key: None,
            known_hosts: None,
        };
        if matches!(scheme, Scheme::Https | Scheme::Http)
            && let Some(path) = &config.credential_file
        {
            session.authorization = Some(authorization(path, config.credential_kind)?);
        }
        if scheme == Scheme::Https {
            let (roots, from) = match &config.ca_file {
                Some(path) => (ca_file(path)?, format!("ca_file {}", path.display())),
                None => (system_roots()?, "the system's roots".to_string()),
            };
            session.tls = Some(tls_config(roots)?);
            session.roots = from;
        }
        if scheme == Scheme::Ssh {
            if let Some(key) = &config.ssh_key {
                // Private to its owner, as ssh itself insists; read here to say so clearly.
                secrets::read(key)?;
                session.ssh_key = Some(key.clone());
            }
            if let Some(known) = &config.known_hosts {
                secrets::read_trust_anchor(known)?;
                session.known_hosts = Some(known.clone());
            }
        }
        Ok(session)
    }
}

/// The header for a credential file (mode 0600): `Bearer <token>` or `Basic <user:password>`.
fn authorization(path: &Path, kind: CredentialKind) -> Result<HeaderValue, TransportError> {
    let bad = |reason| TransportError::Credential {
        path: path.to_path_buf(),
        reason,
    };
    let text = secrets::read(path)?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(bad("the credential file is empty"));
    }
    let value = match kind {
        CredentialKind::Bearer => format!("Bearer {secret}"),
        CredentialKind::Basic => {
            if !secret.contains(':') {
                return Err(bad("a basic credential is `user:password` on one line"));
            }
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(secret)
            )
        }
    };
    let mut header = HeaderValue::from_str(&value)
        .map_err(|_| bad("the credential holds characters a header cannot carry"))?;
    header.set_sensitive(true);
    Ok(header)
}

/// The CAs of a PEM file, a trust anchor (refused when others can write it).
fn ca_file(path: &Path) -> Result<rustls::RootCertStore, TransportError> {
    let pem = secrets::read_trust_anchor(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| TransportError::NoRoots(format!("{}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| TransportError::NoRoots(format!("{}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(TransportError::NoRoots(format!(
            "{} holds no certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// The operating system's roots (`SSL_CERT_FILE`, or the distribution's bundle).
fn system_roots() -> Result<rustls::RootCertStore, TransportError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_string(), ToString::to_string);
        return Err(TransportError::NoRoots(format!(
            "the system's roots: {why}; set ca_file"
        )));
    }
    Ok(roots)
}

fn tls_config(roots: rustls::RootCertStore) -> Result<Arc<rustls::ClientConfig>, TransportError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Tls {
            host: String::new(),
            detail: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
