//! The file checks `serve` runs before starting and `check-config` prints: trust anchors that
//! others could rewrite, secrets and state files that others could read or rewrite.

use std::path::{Path, PathBuf};

use super::Config;
use crate::secrets;

impl Config {
    /// Trust anchors (token verification keys, device CAs, `allowed_signers`): each must be
    /// readable and not writable by group or others, nor sit in a directory they can write;
    /// `allowed_signers` must also parse (options included).
    pub(super) fn check_trust_anchors(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let keys = self
            .token
            .verification_keys
            .iter()
            .map(|p| ("token.verification_keys", p));
        let cas = self
            .attestation
            .device_cas
            .iter()
            .map(|p| ("attestation.device_cas", p));
        for (key, path) in keys.chain(cas) {
            if let Err(e) = secrets::read_trust_anchor(path) {
                problems.push(format!("{key}: {e}"));
            }
        }
        if let Some(path) = self
            .policy_source
            .as_ref()
            .and_then(|s| s.allowed_signers.as_ref())
            && let Err(e) = crate::reload::load_signers(path)
        {
            problems.push(format!("policy.source.allowed_signers: {e:#}"));
        }
        if let Some(transport) = self.policy_source.as_ref().map(|s| &s.transport) {
            let anchors = [
                ("policy.source.ca_file", &transport.ca_file),
                ("policy.source.known_hosts", &transport.known_hosts),
            ];
            for (key, path) in anchors {
                if let Some(path) = path
                    && let Err(e) = secrets::read_trust_anchor(path)
                {
                    problems.push(format!("{key}: {e}"));
                }
            }
        }
        problems
    }

    /// The policy source's credential and SSH key: secrets, private to their owner. Their
    /// content is read to check it exists, never shown.
    pub(super) fn check_source_secrets(&self) -> Vec<String> {
        let Some(transport) = self.policy_source.as_ref().map(|s| &s.transport) else {
            return Vec::new();
        };
        [
            ("policy.source.credential_file", &transport.credential_file),
            ("policy.source.ssh_key", &transport.ssh_key),
        ]
        .into_iter()
        .filter_map(|(key, path)| {
            let path = path.as_ref()?;
            match secrets::read(path) {
                Ok(text) if text.trim().is_empty() => {
                    Some(format!("{key}: {} is empty", path.display()))
                }
                Ok(_) => None,
                Err(e) => Some(format!("{key}: {e}")),
            }
        })
        .collect()
    }

    /// State files the gateway writes 0600 (the database and its side files, the audit file,
    /// the record of the active policy version, the CA rotation state) and the database
    /// password file: one that group or others may access is
    /// refused, since its content can no longer be trusted.
    pub(super) fn check_state_files(&self) -> Vec<String> {
        let sqlite = &self.store.sqlite;
        let mut files = vec![
            ("store.sqlite", sqlite.clone()),
            ("store.sqlite", side_file(sqlite, "-wal")),
            ("store.sqlite", side_file(sqlite, "-shm")),
            ("store.audit_file", self.store.audit_file.clone()),
        ];
        if let crate::store::Backend::Postgres(pg) = &self.store.backend
            && let crate::store::PasswordSource::File(path) = &pg.password
        {
            files.push(("store.postgres.password_file", path.clone()));
        }
        files.push((
            "identity.rotation_dir",
            crate::identity::rotation_state_file(&self.identity),
        ));
        if let Some(source) = &self.policy_source {
            files.push((
                "policy.source.cache_dir",
                crate::reload::active_file(source),
            ));
        }
        files
            .into_iter()
            .filter_map(|(key, path)| {
                secrets::check_state(&path)
                    .err()
                    .map(|e| format!("{key}: {e}"))
            })
            .collect()
    }
}

/// SQLite's `-wal` and `-shm` files beside the database.
fn side_file(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}
