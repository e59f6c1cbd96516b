//! `--follow-revocations FILE`: mirrors the gateway's revocation feed (`GET
//! /v1/revocations?since=SEQ&wait=25`, a long poll) into a file that relying parties on the
//! node read: `{ "next": N, "revocations": [...] }`, written atomically (0644), holding the
//! entries whose certificate has not expired yet (after its `not_after` nobody accepts it
//! anyway). The follower resumes from the file's `next`, rides out gateway restarts with
//! backoff, and never ends on its own.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::json_file::{self, JsonFileError};
use crate::retry::{Attempt, Backoff, classify, unit_sample};
use crate::schedule::Clock;
use crate::svid_dir::SvidDir;
use crate::wire::{Revocation, RevocationPage};
use crate::{AgentError, GatewayClient};

/// How long the gateway may hold a poll open, seconds (it caps this at 30; the client's
/// request deadline is 30 s).
pub const LONG_POLL_SECS: u64 = 25;
/// The least time between two polls, so that a gateway answering at once with nothing does not
/// make the follower spin.
const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The contents of the revocation file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationFile {
    /// Where the feed continues: the `since` of the next poll.
    pub next: u64,
    /// Revoked certificates that have not expired, by feed position.
    pub revocations: Vec<Revocation>,
}

impl RevocationFile {
    /// Reads the file; an absent one is empty (start of the feed).
    pub fn load(path: &Path) -> Result<Self, JsonFileError> {
        Ok(json_file::read(path)?.unwrap_or_default())
    }

    /// Writes the file atomically, 0644.
    pub fn store(&self, path: &Path) -> Result<(), JsonFileError> {
        json_file::write(path, self)
    }

    /// This file with `page` taken in at `now` (Unix seconds): entries not held yet (by feed
    /// position and serial) added, entries whose certificate expired by `now` dropped, sorted
    /// by position, and `next` from the page (the gateway's word, even if lower: its feed
    /// restarted).
    pub fn merge(&self, page: &RevocationPage, now: u64) -> Self {
        let held: BTreeSet<(u64, &str)> = self
            .revocations
            .iter()
            .map(|r| (r.seq, r.serial.as_str()))
            .collect();
        let fresh = page
            .revocations
            .iter()
            .filter(|r| !held.contains(&(r.seq, r.serial.as_str())));
        let mut revocations: Vec<Revocation> = self
            .revocations
            .iter()
            .chain(fresh)
            .filter(|r| r.not_after > now)
            .cloned()
            .collect();
        revocations.sort_by(|a, b| (a.seq, &a.serial).cmp(&(b.seq, &b.serial)));
        revocations.dedup_by(|a, b| (a.seq, &a.serial) == (b.seq, &b.serial));
        Self {
            next: page.next,
            revocations,
        }
    }
}

/// Follows the feed of the gateway that issued the SVID in `dir`.
#[derive(Debug, Clone)]
pub struct Follower {
    /// The identity directory (its bundle is the trust for the gateway's certificate).
    pub dir: SvidDir,
    /// The gateway, `https://host:port`.
    pub gateway: String,
    /// Trust these CAs instead of the bundle.
    pub ca_bundle: Option<Vec<u8>>,
    /// The revocation file.
    pub file: PathBuf,
}

impl Follower {
    /// Polls forever: merges each page into the file, backs off on failures (honouring
    /// `Retry-After`), reconnects with the newest bundle after each.
    pub async fn run(self, clock: Arc<dyn Clock>) -> Infallible {
        let mut state = RevocationFile::load(&self.file).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the revocation file; following from the start");
            RevocationFile::default()
        });
        let backoff = Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        };
        let mut client = None;
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            match self.poll(&mut client, state.next).await {
                Ok(page) => {
                    failures = 0;
                    let now = clock
                        .now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    state = self.take_in(state, &page, now);
                    // A rate limit between polls, not a wait for a condition.
                    tokio::time::sleep_until(started + MIN_POLL_INTERVAL).await;
                }
                Err((why, retry_after)) => {
                    failures = failures.saturating_add(1);
                    client = None;
                    let delay = backoff.delay(failures, retry_after, unit_sample());
                    tracing::warn!(reason = %why, ?delay, "revocation feed unavailable; retrying");
                    // A deliberate backoff delay, not a wait for a condition.
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Merges a page and writes the file if anything changed (if writing fails, the old state
    /// stays, and the next poll asks for the same entries again).
    fn take_in(&self, state: RevocationFile, page: &RevocationPage, now: u64) -> RevocationFile {
        let merged = state.merge(page, now);
        if merged == state {
            return state;
        }
        match merged.store(&self.file) {
            Ok(()) => {
                tracing::info!(
                    next = merged.next,
                    held = merged.revocations.len(),
                    "revocation file updated"
                );
                merged
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot write the revocation file");
                state
            }
        }
    }

    async fn poll(
        &self,
        client: &mut Option<GatewayClient>,
        since: u64,
    ) -> Result<RevocationPage, (String, Option<Duration>)> {
        let client = match client {
            Some(client) => client,
            None => client.insert(self.client().map_err(|e| (e.to_string(), None))?),
        };
        let path = format!("/v1/revocations?since={since}&wait={LONG_POLL_SECS}");
        let reply = client.get(&path).await.map_err(|e| (e.to_string(), None))?;
        if reply.status != StatusCode::OK {
            return Err(match classify(&reply) {
                Attempt::Retry(why, after) => (why, after),
                Attempt::Fatal(e) => (e.to_string(), None),
            });
        }
        serde_json::from_slice(&reply.body).map_err(|e| (format!("revocation page: {e}"), None))
    }

    fn client(&self) -> Result<GatewayClient, AgentError> {
        let trust = match &self.ca_bundle {
            Some(pem) => pem.clone(),
            None => self.dir.current()?.bundle_pem.into_bytes(),
        };
        GatewayClient::new(&self.gateway, &trust)
    }
}

#[cfg(test)]
mod tests;
