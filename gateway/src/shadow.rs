//! The decision tap: every live decision that reached the policy is kept for replay (its input
//! and outcome, for a retention window, bounded in rows) and, when a candidate version is in
//! shadow, decided again by the candidate, which never changes the answer.
//!
//! Promises: the request path only clones the policy input and offers it to a bounded queue
//! (`try_send`; a full queue drops the job and counts it); a worker task records the decisions
//! in batches, evaluates the candidate in the same host (its own breaker and share of the
//! slots), compares, counts `bootstrap_policy_shadow_total{result}` and keeps each
//! disagreement (both decisions and the input, which holds the token's claims but never the
//! token) in the store, bounded in rows.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use policy_sdk as sdk;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::policy::{PolicyError, PolicyHost, PolicySet, Verdict};
use crate::store::{DecisionRecord, Disagreement, Store};

/// How shadow evaluation is bounded (in `[policy.source]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowConfig {
    /// Decisions waiting for the shadow worker; beyond it they are dropped and counted.
    /// Default 1024.
    pub queue: usize,
    /// Disagreements kept in the store (the newest). Default 10000.
    pub keep: u32,
}

/// How long and how many live decisions are kept for replay (`[policy] decisions_retention`,
/// `decisions_keep`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordConfig {
    /// Decisions older than this are dropped. Default 7 days.
    pub retention: std::time::Duration,
    /// At most this many (the newest) are kept; 0 records none. Default 100000.
    pub keep: u32,
}

impl Default for RecordConfig {
    fn default() -> Self {
        Self {
            retention: std::time::Duration::from_secs(7 * 24 * 3600),
            keep: 100_000,
        }
    }
}

/// Most decisions the worker records in one store call.
const RECORD_BATCH: usize = 256;

impl Default for ShadowConfig {
    fn default() -> Self {
        Self {
            queue: 1024,
            keep: 10_000,
        }
    }
}

/// A decision as the comparison sees it: what a node would have got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Issue this SPIFFE path, lifetime and DNS names.
    Allow {
        /// The SPIFFE path granted.
        spiffe_path: String,
        /// The lifetime granted, seconds.
        ttl_seconds: u64,
        /// The DNS names granted.
        dns_sans: Vec<String>,
    },
    /// Refuse with this code.
    Deny {
        /// The policy's code.
        code: String,
    },
    /// The policy failed (a refusal too, for another reason).
    Error {
        /// The failure's kind.
        kind: String,
    },
}

impl Outcome {
    /// The outcome of a checked evaluation.
    pub fn of(result: &Result<Verdict, PolicyError>) -> Self {
        match result {
            Ok(Verdict::Allow(grant)) => Self::Allow {
                spiffe_path: grant.path.as_str().to_string(),
                ttl_seconds: grant.ttl.as_secs(),
                dns_sans: grant.dns_sans.clone(),
            },
            Ok(Verdict::Deny(refusal)) => Self::Deny {
                code: refusal.code.clone(),
            },
            Err(e) => Self::Error {
                kind: e.kind().to_string(),
            },
        }
    }
}

/// How a replayed decision differs from the recorded one (the kinds `policy replay` counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Flip {
    /// Issued before, refused (denied or failed) now.
    AllowToDeny,
    /// Refused before, issued now.
    DenyToAllow,
    /// Issued both times, under another SPIFFE ID.
    SpiffeId,
    /// Issued both times, with another lifetime.
    Ttl,
    /// Issued both times, with other DNS names.
    DnsNames,
}

impl Flip {
    /// The flip from `before` to `after`, if the answer a node would get changed (a refusal
    /// for another reason is still a refusal).
    pub fn between(before: &Outcome, after: &Outcome) -> Option<Self> {
        match (before, after) {
            (
                Outcome::Allow {
                    spiffe_path: p1,
                    ttl_seconds: t1,
                    dns_sans: d1,
                },
                Outcome::Allow {
                    spiffe_path: p2,
                    ttl_seconds: t2,
                    dns_sans: d2,
                },
            ) => {
                if p1 != p2 {
                    Some(Self::SpiffeId)
                } else if t1 != t2 {
                    Some(Self::Ttl)
                } else if d1 != d2 {
                    Some(Self::DnsNames)
                } else {
                    None
                }
            }
            (Outcome::Allow { .. }, _) => Some(Self::AllowToDeny),
            (_, Outcome::Allow { .. }) => Some(Self::DenyToAllow),
            _ => None,
        }
    }
}

impl std::fmt::Display for Flip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AllowToDeny => "allow→deny",
            Self::DenyToAllow => "deny→allow",
            Self::SpiffeId => "changed SPIFFE ID",
            Self::Ttl => "changed TTL",
            Self::DnsNames => "changed DNS names",
        })
    }
}

/// What the shadow report shows (`GET /admin/v1/policy/shadow`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// The candidate version in shadow, if any.
    pub candidate: Option<crate::wire::Version>,
    /// The newest disagreements, newest first.
    pub disagreements: Vec<Disagreement>,
}

/// One live decision waiting for the worker.
struct Job {
    request_id: String,
    request: sdk::Request,
    active: Outcome,
    active_version: String,
}

/// The candidate in shadow and the queue to its worker. One per gateway.
pub struct Shadow {
    candidate: RwLock<Option<Arc<PolicySet>>>,
    /// Whether a candidate is set: without one (and without recording), the request path
    /// reads only this.
    armed: AtomicBool,
    /// Whether decisions are kept for replay.
    recording: bool,
    queue: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow")
            .field("armed", &self.armed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Shadow {
    /// Starts the worker on the current runtime. `reserved_dns` are the gateway's own names,
    /// which no grant may carry (checked for the candidate as for the active version).
    pub fn start(
        config: ShadowConfig,
        record: RecordConfig,
        host: Arc<PolicyHost>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        reserved_dns: Vec<String>,
    ) -> Arc<Self> {
        let (queue, jobs) = mpsc::channel(config.queue.max(1));
        let shadow = Arc::new(Self {
            candidate: RwLock::new(None),
            armed: AtomicBool::new(false),
            recording: record.keep > 0,
            queue,
            metrics,
        });
        let worker = Worker {
            shadow: Arc::downgrade(&shadow),
            host,
            store,
            reserved_dns,
            keep: config.keep,
            record,
        };
        tokio::spawn(worker.run(jobs));
        shadow
    }

    /// Puts a candidate in shadow, or withdraws it (`None`).
    pub fn set_candidate(&self, set: Option<PolicySet>) {
        let armed = set.is_some();
        if let Ok(mut guard) = self.candidate.write() {
            *guard = set.map(Arc::new);
        }
        self.armed.store(armed, Ordering::Release);
    }

    /// The candidate in shadow.
    pub fn candidate(&self) -> Option<Arc<PolicySet>> {
        self.candidate.read().ok().and_then(|g| g.clone())
    }

    /// Offers a live decision to the candidate: a clone of the input and a `try_send`,
    /// nothing more on the request path. A full queue drops it (counted).
    pub fn offer(
        &self,
        request_id: &str,
        request: &sdk::Request,
        active: &Result<Verdict, PolicyError>,
        active_version: &str,
    ) {
        if !self.recording && !self.armed.load(Ordering::Acquire) {
            return;
        }
        let job = Job {
            request_id: request_id.to_string(),
            request: request.clone(),
            active: Outcome::of(active),
            active_version: active_version.to_string(),
        };
        if self.queue.try_send(job).is_err() {
            self.metrics.policy_shadow_dropped.inc();
        }
    }
}

/// Evaluates queued decisions under the candidate, one at a time.
struct Worker {
    shadow: std::sync::Weak<Shadow>,
    host: Arc<PolicyHost>,
    store: Arc<dyn Store>,
    reserved_dns: Vec<String>,
    keep: u32,
    record: RecordConfig,
}

impl Worker {
    async fn run(self, mut jobs: mpsc::Receiver<Job>) {
        let mut batch = Vec::with_capacity(RECORD_BATCH);
        while jobs.recv_many(&mut batch, RECORD_BATCH).await > 0 {
            let Some(shadow) = self.shadow.upgrade() else {
                return;
            };
            if shadow.recording {
                self.record(&batch).await;
            }
            for job in batch.drain(..) {
                // Withdrawn (promoted, or replaced) since the decision was queued, or never
                // set (recording only): nothing to compare with.
                if let Some(set) = shadow.candidate() {
                    self.compare(&shadow, &set, job).await;
                }
            }
        }
    }

    /// Keeps the batch for replay, trimming by age and rows in the same transaction.
    async fn record(&self, batch: &[Job]) {
        let at = now();
        let decisions = batch
            .iter()
            .map(|job| DecisionRecord {
                seq: 0,
                at,
                request_id: job.request_id.clone(),
                cluster: job.request.token.cluster.clone(),
                role: job.request.token.role.clone(),
                policy_version: job.active_version.clone(),
                outcome: json(&job.active),
                input: json(&job.request),
            })
            .collect();
        let older_than = at.saturating_sub(self.record.retention.as_secs());
        if let Err(e) = self
            .store
            .record_decisions(decisions, self.record.keep, older_than)
            .await
        {
            tracing::warn!(error = %e, "cannot record decisions for replay");
        }
    }

    async fn compare(&self, shadow: &Shadow, set: &PolicySet, job: Job) {
        let token = &job.request.token;
        let candidate = match set.select(&token.cluster, &token.role) {
            Some(bound) => {
                let result = self
                    .host
                    .evaluate(&bound.policy, &job.request)
                    .await
                    .and_then(|v| match v {
                        Verdict::Allow(grant) => match bound.admit(&grant, &self.reserved_dns) {
                            Ok(()) => Ok(Verdict::Allow(grant)),
                            Err(invalid) => Err(invalid.into()),
                        },
                        deny => Ok(deny),
                    });
                Outcome::of(&result)
            }
            None => Outcome::Error {
                kind: "no-policy-binding".into(),
            },
        };
        let label = match &candidate {
            Outcome::Error { .. } => "error",
            same if *same == job.active => "agree",
            _ => "disagree",
        };
        shadow
            .metrics
            .policy_shadow
            .get_or_create(&crate::metrics::ResultLabel {
                result: label.to_string(),
            })
            .inc();
        if candidate == job.active {
            return;
        }
        let disagreement = Disagreement {
            seq: 0,
            at: now(),
            request_id: job.request_id,
            cluster: token.cluster.clone(),
            role: token.role.clone(),
            active_version: job.active_version,
            candidate_version: set.version().to_string(),
            active: json(&job.active),
            candidate: json(&candidate),
            input: json(&job.request),
        };
        if let Err(e) = self
            .store
            .record_disagreement(disagreement, self.keep)
            .await
        {
            tracing::warn!(error = %e, "cannot record a shadow disagreement");
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// JSON of a decision or an input (strings, integers and enums: serialising cannot fail).
fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
