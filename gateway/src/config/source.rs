//! `[policy.source]`: where policy bundles come from and how to reach that repository. A
//! network remote must fit its transport's settings, never travels in plaintext unless
//! allowed, and is followed only with signed commits unless the operator accepts otherwise.

use std::path::Path;
use std::time::Duration;

use super::{Validator, raw};
use crate::reload::remote::{CredentialKind, Scheme};
use crate::reload::{RemoteUrl, SourceConfig, Track, TransportConfig};

impl Validator<'_> {
    /// The validated section, or `None` when its URL is unusable (the problem is recorded).
    pub(super) fn source(&mut self, mut raw: raw::RawSource) -> Option<SourceConfig> {
        let track = match (raw.branch.take(), raw.tags.take()) {
            (Some(_), Some(_)) => {
                self.problem("policy.source", "give either branch or tags, not both");
                Track::Branch("main".into())
            }
            (_, Some(pattern)) => match pattern.strip_suffix('*') {
                Some(prefix) if !prefix.contains('*') => Track::Tags(prefix.to_string()),
                _ => {
                    self.problem(
                        "policy.source.tags",
                        format!("{pattern:?} must be a prefix followed by '*', like \"v*\""),
                    );
                    Track::Tags("v".into())
                }
            },
            (branch, None) => Track::Branch(branch.unwrap_or_else(|| "main".into())),
        };
        let candidate_branch = raw.candidate_branch.take();
        if let (Some(candidate), Track::Branch(branch)) = (&candidate_branch, &track)
            && candidate == branch
        {
            self.problem(
                "policy.source.candidate_branch",
                "must differ from the branch the gateway follows",
            );
        }
        let mut shadow = crate::shadow::ShadowConfig::default();
        match raw.shadow_queue {
            Some(0) => self.problem("policy.source.shadow_queue", "must be at least 1"),
            Some(n) => shadow.queue = n as usize,
            None => {}
        }
        match raw.shadow_keep {
            Some(0) => self.problem("policy.source.shadow_keep", "must be at least 1"),
            Some(n) => shadow.keep = n,
            None => {}
        }
        let url = self.remote_url(&raw.git);
        let allowed_signers = raw
            .allowed_signers
            .take()
            .map(|p| self.path(Some(p), Path::new("")));
        if raw.require_signed_commits && allowed_signers.is_none() {
            self.problem(
                "policy.source.allowed_signers",
                "required when require_signed_commits is true",
            );
        }
        let transport = self.transport(&mut raw);
        if let Some(url) = &url {
            self.check_remote(url, &transport, &raw);
        }
        Some(SourceConfig {
            url: url?,
            track,
            candidate_branch,
            shadow,
            poll_interval: self.duration(
                "policy.source.poll_interval",
                raw.poll_interval,
                Duration::from_secs(30),
            ),
            cache_dir: self.path(raw.cache_dir, Path::new("state/policy")),
            require_signed_commits: raw.require_signed_commits,
            allowed_signers,
            allow_unsigned_remote: raw.allow_unsigned_remote,
            transport,
        })
    }

    /// How to reach a network remote (`ca_file`, `credential_*`, `ssh_key`, `known_hosts`,
    /// `allow_insecure_transport`).
    fn transport(&mut self, raw: &mut raw::RawSource) -> TransportConfig {
        let credential_kind = match raw.credential_kind.as_deref() {
            None => CredentialKind::default(),
            Some(text) => CredentialKind::parse(text).unwrap_or_else(|| {
                self.problem(
                    "policy.source.credential_kind",
                    format!("{text:?} is neither \"bearer\" nor \"basic\""),
                );
                CredentialKind::default()
            }),
        };
        let file = |p: &mut Option<String>| p.take().map(|p| self.path(Some(p), Path::new("")));
        TransportConfig {
            ca_file: file(&mut raw.ca_file),
            credential_file: file(&mut raw.credential_file),
            credential_kind,
            ssh_key: file(&mut raw.ssh_key),
            known_hosts: file(&mut raw.known_hosts),
            allow_insecure_transport: raw.allow_insecure_transport,
        }
    }

    /// The transport settings must fit the URL, and a network remote needs signed commits
    /// unless the operator explicitly accepts unsigned ones.
    fn check_remote(&mut self, url: &RemoteUrl, transport: &TransportConfig, raw: &raw::RawSource) {
        for p in transport.check(url) {
            self.problem(&format!("policy.source.{}", p.key), p.message);
        }
        if url.scheme().is_network() && !raw.require_signed_commits && !raw.allow_unsigned_remote {
            self.problem(
                "policy.source.require_signed_commits",
                format!(
                    "a network remote ({}) is followed only with require_signed_commits = true \
                     (and allowed_signers), or with allow_unsigned_remote = true",
                    url.scheme().prefix()
                ),
            );
        }
    }

    /// `git`: a plain path is relative to this file; URLs are taken as they are.
    fn remote_url(&mut self, git: &str) -> Option<RemoteUrl> {
        let parsed = RemoteUrl::parse(git).map_err(|e| self.problem("policy.source.git", e));
        match parsed {
            Ok(url) if url.scheme() == Scheme::Path => {
                let resolved = self
                    .path(Some(git.to_string()), Path::new(""))
                    .display()
                    .to_string();
                RemoteUrl::parse(&resolved)
                    .map_err(|e| self.problem("policy.source.git", e))
                    .ok()
            }
            other => other.ok(),
        }
    }
}
