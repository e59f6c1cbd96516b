//! The `[policy]` section: how much a policy may use, and what it may grant.

use std::num::NonZeroU32;
use std::time::Duration;

/// Limits on policy execution and on the decisions the host accepts.
///
/// Every default is here, in [`PolicyConfig::default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Linear-memory cap of one evaluation, bytes. Default 16 MiB.
    pub memory_limit: u64,
    /// Wall-clock deadline of one call into a policy. Default 25 ms.
    pub deadline: Duration,
    /// Evaluations running at once; also the number of pooled instance slots. Default 64.
    pub max_concurrent: NonZeroU32,
    /// Longest wait for a free evaluation slot before the caller is shed. Default 250 ms.
    pub queue_timeout: Duration,
    /// Evaluation slots one policy may hold at once, so a runaway policy queues behind
    /// itself while the others still find slots. Default half of `max_concurrent` (at least
    /// 1); never more than `max_concurrent`.
    pub per_policy_slots: NonZeroU32,
    /// Consecutive failures (timeouts, traps, memory-cap hits) that open a policy's circuit
    /// breaker. Default 5.
    pub breaker_failures: NonZeroU32,
    /// How long an open breaker fails the policy's evaluations fast before one probe call is
    /// let through. Default 30 s.
    pub breaker_cooldown: Duration,
    /// Shortest SVID lifetime a policy may grant. Default 60 s.
    pub min_ttl: Duration,
    /// Longest SVID lifetime issued; longer grants are capped. Default 24 h.
    pub max_ttl: Duration,
    /// Most DNS SANs one grant may carry. Default 16.
    pub max_dns_sans: u32,
    /// Log lines one evaluation may emit; the rest are dropped and counted. Default 32.
    pub max_log_lines: u32,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            memory_limit: 16 << 20,
            deadline: Duration::from_millis(25),
            max_concurrent: NonZeroU32::MIN.saturating_add(63),
            queue_timeout: Duration::from_millis(250),
            per_policy_slots: NonZeroU32::MIN.saturating_add(31),
            breaker_failures: NonZeroU32::MIN.saturating_add(4),
            breaker_cooldown: Duration::from_secs(30),
            min_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(24 * 3600),
            max_dns_sans: 16,
            max_log_lines: 32,
        }
    }
}

impl PolicyConfig {
    /// The default share of one policy: half the slots, at least one.
    pub fn default_share(max_concurrent: NonZeroU32) -> NonZeroU32 {
        NonZeroU32::new(max_concurrent.get() / 2).unwrap_or(NonZeroU32::MIN)
    }
}
