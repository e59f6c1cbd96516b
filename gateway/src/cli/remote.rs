//! How `policy publish` reaches a network policy repository: the flags that mirror
//! `[policy.source]`'s transport settings, checked together before anything is built.

use std::path::PathBuf;

use anyhow::bail;

use crate::reload::remote::{CredentialKind, Remote, RemoteUrl, TransportConfig};

/// How `policy publish` reaches a network repository: the settings of `[policy.source]`.
#[derive(Debug, Clone, clap::Args)]
pub(super) struct TransportArgs {
    /// HTTPS: PEM file of the CAs the server's certificate must chain to (default: the
    /// system's roots).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// HTTPS: file holding the credential (mode 0600).
    #[arg(long)]
    credential_file: Option<PathBuf>,
    /// How the credential is sent: `bearer` (the file is a token) or `basic` (the file is
    /// `user:password`).
    #[arg(long, default_value = "bearer", value_parser = ["bearer", "basic"])]
    credential_kind: String,
    /// SSH: the private key (mode 0600).
    #[arg(long)]
    ssh_key: Option<PathBuf>,
    /// SSH: OpenSSH `known_hosts` with the server's host key (checked strictly: an unknown
    /// or changed key is refused).
    #[arg(long)]
    known_hosts: Option<PathBuf>,
    /// Accept plaintext `http://` and `git://` repositories.
    #[arg(long)]
    allow_insecure_transport: bool,
}

impl TransportArgs {
    /// The repository and how to reach it; every problem of the flags at once.
    pub(super) fn remote(&self, repo: &str) -> anyhow::Result<Remote> {
        let url = RemoteUrl::parse(repo).map_err(|e| anyhow::anyhow!("--repo: {e}"))?;
        let transport = TransportConfig {
            ca_file: self.ca_file.clone(),
            credential_file: self.credential_file.clone(),
            credential_kind: CredentialKind::parse(&self.credential_kind).unwrap_or_default(),
            ssh_key: self.ssh_key.clone(),
            known_hosts: self.known_hosts.clone(),
            allow_insecure_transport: self.allow_insecure_transport,
        };
        let problems: Vec<String> = transport
            .check(&url)
            .into_iter()
            .map(|p| {
                let flag = match p.key {
                    "git" => "--repo".to_string(),
                    key => format!("--{}", key.replace('_', "-")),
                };
                let message = p.message.replace(
                    "allow_insecure_transport = true",
                    "--allow-insecure-transport",
                );
                format!("{flag}: {message}")
            })
            .collect();
        if !problems.is_empty() {
            bail!("{}", problems.join("\n  "));
        }
        Ok(Remote { url, transport })
    }
}
