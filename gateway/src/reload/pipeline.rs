//! The reload pipeline itself, stage by stage, and the pin/unpin controls.

use std::sync::Arc;

use git2::Oid;

use super::{
    Attempt, Inner, Manifest, Persisted, ReloadError, Version, audit_event, bindings, now,
    run_vectors, set_error,
};
use crate::policy::PolicySet;
use crate::reload::manifest::FILE;

/// What the blocking git stage hands to the async stages.
struct Candidate {
    manifest: Manifest,
    bindings: Vec<(
        crate::policy::PolicyBinding,
        Option<crate::policy::vectors::VectorFile>,
    )>,
}

impl Inner {
    /// Fetches, takes the followed commit live if it is new and passes, then brings the shadow
    /// candidate up to the candidate branch.
    pub(super) async fn poll(self: &Arc<Self>) -> Result<Option<Version>, ReloadError> {
        let _one = self.busy.lock().await;
        let result = self.poll_release().await;
        self.poll_candidate().await;
        result
    }

    async fn poll_release(self: &Arc<Self>) -> Result<Option<Version>, ReloadError> {
        let fetched = self
            .with_mirror(|this, mirror| {
                mirror
                    .fetch()
                    .map_err(|e| ReloadError::Fetch(Box::new(e)))?;
                mirror
                    .candidate(&this.config.track)
                    .map_err(ReloadError::Mirror)
            })
            .await;
        let candidate = match fetched {
            Ok(Some(oid)) => oid,
            Ok(None) => {
                let e = ReloadError::NotFound(format!(
                    "{:?} not found in {}",
                    self.config.track, self.config.url
                ));
                self.record_poll(None, &Err(&e));
                return Err(e);
            }
            Err(e) => {
                self.metrics.policy_reload(e.label());
                self.record_poll(None, &Err(&e));
                return Err(e);
            }
        };
        let (pinned, active) = self.pin_and_active();
        if pinned.is_some()
            || active == Some(candidate)
            || self.refused_before(candidate)
            || self.behind_promoted(candidate).await
        {
            // A refused commit is not tried again at every poll: it cannot have changed, and
            // its reason stays in the status until a new commit arrives.
            self.record_poll(Some(candidate), &Ok("unchanged"));
            return Ok(None);
        }
        let result = self.activate(candidate, false, "poll").await;
        self.record_poll(Some(candidate), &result.as_ref().map(|_| "ok"));
        result.map(Some)
    }

    /// Whether the active version is a promoted candidate that `commit` (the followed
    /// branch) has not caught up with: nothing new, rather than a rollback to refuse.
    async fn behind_promoted(self: &Arc<Self>, commit: Oid) -> bool {
        let promoted = self
            .state
            .lock()
            .ok()
            .and_then(|s| {
                s.1.promoted
                    .clone()
                    .filter(|p| s.1.commit.as_ref() == Some(p))
            })
            .and_then(|p| Oid::from_str(&p).ok());
        let Some(promoted) = promoted else {
            return false;
        };
        self.with_mirror(move |_, mirror| {
            mirror
                .is_at_or_after(promoted, commit)
                .map_err(ReloadError::Mirror)
        })
        .await
        .unwrap_or(false)
    }

    /// Follows `candidate_branch`: a new head passes every stage of the pipeline (against the
    /// active version's ancestry too) and then decides in shadow; a refused one withdraws the
    /// candidate before it. A head that is the active version is no candidate.
    async fn poll_candidate(self: &Arc<Self>) {
        let (Some(branch), Some(shadow)) =
            (self.config.candidate_branch.clone(), self.shadow.clone())
        else {
            return;
        };
        let found = self
            .with_mirror(move |_, mirror| {
                mirror
                    .candidate(&super::Track::Branch(branch))
                    .map_err(ReloadError::Mirror)
            })
            .await;
        let commit = match found {
            Ok(Some(commit)) => commit,
            Ok(None) => {
                self.withdraw_candidate(&shadow);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "policy candidate branch");
                return;
            }
        };
        let text = commit.to_string();
        let (current, refused) = self
            .state
            .lock()
            .map(|s| {
                let current = s.0.candidate.as_ref().map(|c| c.commit.clone());
                let refused = s.0.last_shadow_candidate.as_ref().is_some_and(|a| {
                    a.result != "ok" && a.commit.as_deref() == Some(text.as_str())
                });
                (current, refused)
            })
            .unwrap_or((None, false));
        if self.pin_and_active().1 == Some(commit) {
            self.withdraw_candidate(&shadow);
            return;
        }
        if current.as_deref() == Some(text.as_str()) || refused {
            return;
        }
        let mut read_version = None;
        let result = self.check_and_build(commit, false, &mut read_version).await;
        let attempt = |result: &str, reason: Option<String>| Attempt {
            at: now(),
            commit: Some(text.clone()),
            version: read_version.clone(),
            result: result.to_string(),
            reason,
        };
        match result {
            Ok(set) => {
                let version = Version {
                    bundle: set.bundle().to_string(),
                    version: set.version().to_string(),
                    commit: text.clone(),
                    since: now(),
                };
                shadow.set_candidate(Some(set));
                tracing::info!(bundle = %version.bundle, version = %version.version, %commit, "policy candidate in shadow");
                let done = attempt("ok", None);
                self.update(|status, _| {
                    status.candidate = Some(version.clone());
                    status.last_shadow_candidate = Some(done);
                });
                self.audit(crate::audit::AuditEvent::PolicyCandidate {
                    bundle: version.bundle,
                    version: version.version,
                    commit: text.clone(),
                })
                .await;
            }
            Err(e) => {
                tracing::warn!(%commit, result = e.label(), error = %e, "policy candidate refused");
                shadow.set_candidate(None);
                let done = attempt(e.label(), Some(e.to_string()));
                self.update(|status, _| {
                    status.candidate = None;
                    status.last_shadow_candidate = Some(done);
                });
                self.audit(audit_event(
                    &Err(e),
                    commit,
                    "candidate",
                    read_version.as_deref(),
                ))
                .await;
            }
        }
    }

    fn withdraw_candidate(&self, shadow: &crate::shadow::Shadow) {
        if shadow.candidate().is_some() {
            shadow.set_candidate(None);
        }
        self.update(|status, _| status.candidate = None);
    }

    pub(super) async fn promote(self: &Arc<Self>, by: &str) -> Result<Version, ReloadError> {
        let _one = self.busy.lock().await;
        let candidate = self
            .state
            .lock()
            .ok()
            .and_then(|s| s.0.candidate.clone())
            .ok_or_else(|| ReloadError::NotFound("no candidate is in shadow".into()))?;
        let commit = Oid::from_str(&candidate.commit)
            .map_err(|_| ReloadError::NotFound(format!("bad commit {}", candidate.commit)))?;
        let version = self.activate(commit, false, "promote").await?;
        if let Some(shadow) = &self.shadow {
            self.withdraw_candidate(shadow);
        }
        self.update(|_, persisted| persisted.promoted = Some(candidate.commit.clone()));
        self.audit(crate::audit::AuditEvent::PolicyPromoted {
            version: version.version.clone(),
            commit: version.commit.clone(),
            promoted_by: by.to_string(),
        })
        .await;
        Ok(version)
    }

    /// Loads `commit` at startup or on a pin (no rollback check when `any_age`).
    pub(super) async fn load(
        self: &Arc<Self>,
        commit: Oid,
        any_age: bool,
        trigger: &str,
    ) -> Result<(), ReloadError> {
        let _one = self.busy.lock().await;
        self.activate(commit, any_age, trigger).await.map(|_| ())
    }

    /// Pins to `target` (`1.2.0`, a tag, a branch or a commit id) as this mirror resolves it.
    pub(super) async fn pin(
        self: &Arc<Self>,
        target: &str,
        by: &str,
    ) -> Result<Version, ReloadError> {
        let _one = self.busy.lock().await;
        let spec = target.to_string();
        let commit = self
            .with_mirror(move |_, mirror| {
                // A version number names its tag; anything else is a tag, branch or commit id.
                [
                    format!("refs/tags/v{spec}"),
                    format!("refs/tags/{spec}"),
                    spec.clone(),
                ]
                .iter()
                .find_map(|s| mirror.resolve(s).ok())
                .ok_or_else(|| {
                    ReloadError::NotFound(format!("nothing named {spec:?} in the policy mirror"))
                })
            })
            .await?;
        self.pin_at(target, commit, by, "pin").await
    }

    /// Pins to the commit another replica pinned `target` to, fetching first when this
    /// mirror does not hold it yet.
    pub(super) async fn pin_shared(
        self: &Arc<Self>,
        target: &str,
        commit: &str,
        by: &str,
    ) -> Result<Version, ReloadError> {
        let _one = self.busy.lock().await;
        let spec = commit.to_string();
        let commit = self
            .with_mirror(move |_, mirror| {
                if let Ok(oid) = mirror.resolve(&spec) {
                    return Ok(oid);
                }
                mirror
                    .fetch()
                    .map_err(|e| ReloadError::Fetch(Box::new(e)))?;
                mirror.resolve(&spec).map_err(|_| {
                    ReloadError::NotFound(format!("commit {spec} is not in the policy mirror"))
                })
            })
            .await?;
        self.pin_at(target, commit, by, "shared-pin").await
    }

    /// Activates `commit` whatever its age and holds the gateway to it. Callers hold `busy`.
    async fn pin_at(
        self: &Arc<Self>,
        target: &str,
        commit: Oid,
        by: &str,
        trigger: &str,
    ) -> Result<Version, ReloadError> {
        let version = self.activate(commit, true, trigger).await?;
        self.update(|status, persisted| {
            status.pinned = Some(target.to_string());
            persisted.pinned = Some(target.to_string());
        });
        self.audit(crate::audit::AuditEvent::PolicyPinned {
            target: target.to_string(),
            commit: commit.to_string(),
            pinned_by: by.to_string(),
        })
        .await;
        Ok(version)
    }

    /// Lets go of the pin (audited); the caller polls to follow the remote again.
    pub(super) async fn clear_pin(self: &Arc<Self>, by: &str) {
        {
            let _one = self.busy.lock().await;
            self.update(|status, persisted| {
                status.pinned = None;
                persisted.pinned = None;
            });
        }
        self.audit(crate::audit::AuditEvent::PolicyUnpinned {
            unpinned_by: by.to_string(),
        })
        .await;
    }

    /// Every stage for one commit; swaps the set only when all pass. Callers hold `busy`.
    async fn activate(
        self: &Arc<Self>,
        commit: Oid,
        any_age: bool,
        trigger: &str,
    ) -> Result<Version, ReloadError> {
        let started = std::time::Instant::now();
        let mut read_version = None;
        let result = self
            .check_and_build(commit, any_age, &mut read_version)
            .await;
        let version = match result {
            Ok(set) => {
                let version = Version {
                    bundle: set.bundle().to_string(),
                    version: set.version().to_string(),
                    commit: commit.to_string(),
                    since: now(),
                };
                let previous = self.policies.current().map(|s| s.version().to_string());
                self.policies.swap(set);
                self.metrics
                    .policy_active(&version.bundle, &version.version, &version.commit);
                tracing::info!(
                    bundle = %version.bundle, version = %version.version, %commit, ?previous, trigger,
                    took_ms = started.elapsed().as_millis() as u64,
                    "policy bundle active"
                );
                self.update(|status, persisted| {
                    status.active = Some(version.clone());
                    persisted.commit = Some(commit.to_string());
                });
                Ok(version)
            }
            Err(e) => {
                tracing::warn!(%commit, version = ?read_version, result = e.label(), error = %e, trigger, "policy bundle refused");
                Err(e)
            }
        };
        let label = version.as_ref().map(|_| "ok").unwrap_or_else(|e| e.label());
        self.metrics.policy_reload(label);
        self.update(|status, _| {
            status.last_candidate = Some(Attempt {
                at: now(),
                commit: Some(commit.to_string()),
                version: read_version.clone(),
                result: label.to_string(),
                reason: version.as_ref().err().map(ToString::to_string),
            });
        });
        self.audit(audit_event(
            &version,
            commit,
            trigger,
            read_version.as_deref(),
        ))
        .await;
        version
    }

    async fn check_and_build(
        self: &Arc<Self>,
        commit: Oid,
        any_age: bool,
        read_version: &mut Option<String>,
    ) -> Result<PolicySet, ReloadError> {
        let candidate = self
            .with_mirror(move |this, mirror| this.read_candidate(mirror, commit, any_age))
            .await?;
        *read_version = Some(candidate.manifest.version.clone());
        let bindings: Vec<_> = candidate.bindings.iter().map(|(b, _)| b.clone()).collect();
        let commit_text = commit.to_string();
        let set = PolicySet::load(
            &self.host,
            &bindings,
            &candidate.manifest.bundle,
            Some(&candidate.manifest.version),
            Some(&commit_text),
        )
        .await
        .map_err(set_error)?;
        let vectors: Vec<_> = candidate
            .bindings
            .into_iter()
            .map(|(b, v)| (b.name, v))
            .collect();
        run_vectors(&self.host, &set, &vectors).await?;
        Ok(set)
    }

    /// The git stages: ancestry, signature, manifest schema, digests.
    fn read_candidate(
        &self,
        mirror: &super::git::Mirror,
        commit: Oid,
        any_age: bool,
    ) -> Result<Candidate, ReloadError> {
        let git = |e: super::GitError| ReloadError::NotFound(e.to_string());
        if !any_age
            && let Some(active) = self.pin_and_active().1
            && !mirror.is_at_or_after(commit, active).map_err(git)?
        {
            return Err(ReloadError::Rollback {
                candidate: commit.to_string(),
                active: active.to_string(),
            });
        }
        if self.config.require_signed_commits {
            let signers = self
                .signers
                .as_ref()
                .ok_or_else(|| ReloadError::Signature("no allowed signers".into()))?;
            let (signature, signed) = mirror
                .signature(commit)
                .map_err(git)?
                .ok_or_else(|| ReloadError::Signature("the commit is not signed".into()))?;
            // git checks the signer's validity window at the committer time. That time is
            // whatever the signer wrote, so a commit newly taken from the remote is checked
            // now as well: a retired key cannot bring in a backdated commit, while a version
            // it signed in its time still restores at start (or on an operator's pin).
            let committed = mirror.commit_time(commit).map_err(git)?;
            let now = i64::try_from(now()).unwrap_or(i64::MAX);
            let times = if any_age {
                vec![committed]
            } else {
                vec![committed, now]
            };
            let signer = signers
                .verify(&signature, &signed, &times)
                .map_err(|e| ReloadError::Signature(e.to_string()))?;
            tracing::info!(%commit, signer, "policy commit signature verified");
        }
        let manifest = Manifest::parse(
            &mirror
                .read(commit, FILE)
                .map_err(|e| ReloadError::Schema(e.to_string()))?,
        )
        .map_err(|e| ReloadError::Schema(e.to_string()))?;
        let bindings = bindings(&manifest, &mut |path| {
            mirror
                .read(commit, path)
                .map_err(|e| ReloadError::Schema(format!("{path}: {e}")))
        })?;
        Ok(Candidate { manifest, bindings })
    }

    fn refused_before(&self, commit: Oid) -> bool {
        let commit = commit.to_string();
        self.state
            .lock()
            .map(|s| {
                s.0.last_candidate.as_ref().is_some_and(|c| {
                    c.result != "ok" && c.commit.as_deref() == Some(commit.as_str())
                })
            })
            .unwrap_or(false)
    }

    pub(super) fn pin_and_active(&self) -> (Option<String>, Option<Oid>) {
        self.state
            .lock()
            .map(|s| {
                let active = s.1.commit.as_deref().and_then(|c| Oid::from_str(c).ok());
                (s.1.pinned.clone(), active)
            })
            .unwrap_or((None, None))
    }

    /// Runs `f` on the mirror on a blocking thread: git2 blocks, and its repository is not
    /// `Sync`, so every use goes through the mirror's lock.
    async fn with_mirror<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Inner, &super::git::Mirror) -> Result<T, ReloadError> + Send + 'static,
    ) -> Result<T, ReloadError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mirror = this
                .mirror
                .lock()
                .map_err(|_| ReloadError::Worker("its lock is poisoned"))?;
            f(&this, &mirror)
        })
        .await
        .map_err(|_| ReloadError::Worker("the git thread failed"))?
    }

    /// Changes the status and the persisted record together; the record is rewritten
    /// (atomically) only when it changed, not at every poll.
    fn update(&self, change: impl FnOnce(&mut super::Status, &mut Persisted)) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let (status, persisted) = &mut *state;
        let before = persisted.clone();
        change(status, persisted);
        if *persisted == before {
            return;
        }
        let path = super::active_file(&self.config);
        if let Ok(json) = serde_json::to_vec_pretty(persisted)
            && let Err(e) = crate::secrets::write(&path, &json)
        {
            tracing::error!(error = %e, "cannot record the active policy version");
        }
    }

    fn record_poll(&self, commit: Option<Oid>, result: &Result<&str, &ReloadError>) {
        self.update(|status, _| {
            status.last_poll = Some(Attempt {
                at: now(),
                commit: commit.map(|c| c.to_string()),
                version: None,
                result: match result {
                    Ok(label) => label.to_string(),
                    Err(e) => e.label().to_string(),
                },
                reason: result.as_ref().err().map(ToString::to_string),
            });
        });
    }

    async fn audit(&self, event: crate::audit::AuditEvent) {
        if let Err(e) = self.store.audit(vec![event]).await {
            tracing::error!(error = %e, "cannot audit a policy change");
        }
    }
}
