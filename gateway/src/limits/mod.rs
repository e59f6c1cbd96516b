//! Rate limits (governor): per client and then a global cap, checked before any parsing or
//! crypto; per token and per cluster, checked right after the token's signature verified (so an
//! attacker cannot spend another cluster's budget with forged claims), still before any
//! database work. A refusal says how long to wait.
//!
//! A client is a [`ClientKey`] (an IPv4 address or an IPv6 /64). Its own budget is charged
//! before the global one, so a client over its limit is refused without draining what everyone
//! shares. The join and the challenge endpoints have buckets of their own with the same
//! quotas: a challenge flood cannot starve joins, and a node's challenge + join is not charged
//! twice. [`KeyedSlots`] caps what one client holds open (connections, joins in flight).

mod key;
mod slots;

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

pub use key::ClientKey;
pub use slots::{AtCapacity, KeyedSlots, SlotPermit};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// One limit: a sustained rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per second, sustained.
    pub per_second: NonZeroU32,
    /// Requests allowed at once after a quiet period.
    pub burst: NonZeroU32,
}

impl Rate {
    fn quota(self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }
}

/// The `[limits]` section. Defaults (in [`LimitsConfig::default`]): global 5,000/s burst
/// 10,000; per IP 100/s burst 200; per token 10/s burst 50; per cluster 2,000/s burst 4,000;
/// refusals before authentication audited every 10 s for at most 1,024 clients; refusals
/// that say `Retry-After` held for it, at most 1 s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Every join and renewal on this replica (challenges have a bucket of their own).
    pub global: Rate,
    /// Per client (IPv4 address or IPv6 /64).
    pub per_ip: Rate,
    /// Per bootstrap token (its audit GUID).
    pub per_token: Rate,
    /// Per cluster named in the token.
    pub per_cluster: Rate,
    /// How often the refusals of unauthenticated clients are written to the audit, one entry
    /// per client, stage and reason with a count.
    pub refusal_audit_interval: Duration,
    /// Distinct (client, reason) pairs remembered per interval; the rest are counted in one
    /// overflow entry.
    pub refusal_audit_max_keys: NonZeroU32,
    /// Longest a refusal that says `Retry-After` is held before it is sent (the wait it names,
    /// at most this; zero sends refusals at once). Paces clients that retry without waiting:
    /// see `api::pacing`.
    pub refusal_hold: Duration,
}

/// The longest `refusal_hold` accepted: a held refusal keeps its connection open that long,
/// and a node's own request deadline (the agent's is 30 s) must outlast it.
pub const MAX_REFUSAL_HOLD: Duration = Duration::from_secs(10);

fn rate(per_second: u32, burst: u32) -> Rate {
    Rate {
        per_second: NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN),
        burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            global: rate(5_000, 10_000),
            per_ip: rate(100, 200),
            per_token: rate(10, 50),
            per_cluster: rate(2_000, 4_000),
            refusal_audit_interval: Duration::from_secs(10),
            refusal_audit_max_keys: NonZeroU32::new(1024).unwrap_or(NonZeroU32::MIN),
            refusal_hold: Duration::from_secs(1),
        }
    }
}

/// Where a client knocked: each has its own per-client and global buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// `POST /v1/bootstrap/join`.
    Join,
    /// `GET /v1/bootstrap/challenge`.
    Challenge,
    /// `GET /v1/crl` and `GET /v1/revocations`.
    Feed,
}

/// Which limit refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The replica-wide cap.
    Global,
    /// The client's IP address.
    Ip,
    /// The token.
    Token,
    /// The token's cluster.
    Cluster,
}

impl Scope {
    /// Metric and audit label.
    pub fn label(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Ip => "ip",
            Scope::Token => "token",
            Scope::Cluster => "cluster",
        }
    }
}

/// A refusal: which limit, and when a retry can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limit ({}) exceeded; retry after {retry_after:?}", scope.label())]
pub struct Limited {
    /// The limit that refused.
    pub scope: Scope,
    /// Earliest time a retry can pass, rounded up to whole seconds (the `Retry-After` header).
    pub retry_after: Duration,
}

type Keyed<K, C> =
    RateLimiter<K, DefaultKeyedStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;
type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// A door's buckets: one per client, one for everyone.
#[derive(Debug)]
struct ClientBuckets<C: Clock> {
    global: Direct<C>,
    per_client: Keyed<ClientKey, C>,
}

impl<C: Clock + Clone> ClientBuckets<C> {
    fn new(config: &LimitsConfig, clock: &C) -> Self {
        Self {
            global: RateLimiter::direct_with_clock(config.global.quota(), clock.clone()),
            per_client: RateLimiter::new(config.per_ip.quota(), Default::default(), clock.clone()),
        }
    }
}

/// All the limiters of one replica. Generic over the clock so tests can drive time.
#[derive(Debug)]
pub struct Limits<C: Clock = DefaultClock> {
    clock: C,
    join: ClientBuckets<C>,
    challenge: ClientBuckets<C>,
    feed: ClientBuckets<C>,
    per_token: Keyed<String, C>,
    per_cluster: Keyed<String, C>,
}

impl Limits {
    /// Limiters on the real clock.
    pub fn new(config: &LimitsConfig) -> Self {
        Self::with_clock(config, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Limits<C> {
    /// Limiters on `clock`.
    pub fn with_clock(config: &LimitsConfig, clock: C) -> Self {
        Self {
            join: ClientBuckets::new(config, &clock),
            challenge: ClientBuckets::new(config, &clock),
            feed: ClientBuckets::new(config, &clock),
            per_token: RateLimiter::new(
                config.per_token.quota(),
                Default::default(),
                clock.clone(),
            ),
            per_cluster: RateLimiter::new(
                config.per_cluster.quota(),
                Default::default(),
                clock.clone(),
            ),
            clock,
        }
    }

    /// Before anything else: the client's own budget at `door`, then the global one. A client
    /// over its own limit is refused without touching the global bucket.
    pub fn check_client(&self, door: Door, ip: IpAddr) -> Result<(), Limited> {
        let buckets = match door {
            Door::Join => &self.join,
            Door::Challenge => &self.challenge,
            Door::Feed => &self.feed,
        };
        buckets
            .per_client
            .check_key(&ClientKey::of(ip))
            .map_err(|n| self.limited(Scope::Ip, &n))?;
        buckets
            .global
            .check()
            .map_err(|n| self.limited(Scope::Global, &n))
    }

    /// After the token's signature verified: its own budget and its cluster's.
    pub fn check_token(&self, token_id: &str, cluster: &str) -> Result<(), Limited> {
        self.per_token
            .check_key(&token_id.to_string())
            .map_err(|n| self.limited(Scope::Token, &n))?;
        self.per_cluster
            .check_key(&cluster.to_string())
            .map_err(|n| self.limited(Scope::Cluster, &n))
    }

    /// A renewal (no token: the certificate is the credential): its cluster's budget, shared
    /// with the cluster's joins.
    pub fn check_cluster(&self, cluster: &str) -> Result<(), Limited> {
        self.per_cluster
            .check_key(&cluster.to_string())
            .map_err(|n| self.limited(Scope::Cluster, &n))
    }

    /// Forgets keys whose buckets are full again, so the maps do not grow without bound.
    /// The server calls this periodically.
    pub fn forget_idle(&self) {
        forget(&self.join.per_client);
        forget(&self.challenge.per_client);
        forget(&self.feed.per_client);
        forget(&self.per_token);
        forget(&self.per_cluster);
    }

    fn limited(&self, scope: Scope, not_until: &governor::NotUntil<C::Instant>) -> Limited {
        let wait = not_until.wait_time_from(self.clock.now());
        // Whole seconds, at least one: a Retry-After of 0 invites an immediate retry storm.
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Limited {
            scope,
            retry_after: Duration::from_secs(secs.max(1)),
        }
    }
}

fn forget<K: Hash + Eq + Clone, C: Clock>(limiter: &Keyed<K, C>) {
    limiter.retain_recent();
    limiter.shrink_to_fit();
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limits(clock: &FakeRelativeClock) -> Limits<FakeRelativeClock> {
        let config = LimitsConfig {
            global: rate(100, 100),
            per_ip: rate(2, 3),
            per_token: rate(1, 2),
            per_cluster: rate(10, 10),
            ..LimitsConfig::default()
        };
        Limits::with_clock(&config, clock.clone())
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    fn v6(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn per_ip_burst_then_refusal_with_retry_after_then_refill() {
        let clock = FakeRelativeClock::default();
        let limits = limits(&clock);
        for _ in 0..3 {
            limits.check_client(Door::Join, A).unwrap();
        }
        let refused = limits.check_client(Door::Join, A).unwrap_err();
        assert_eq!(refused.scope, Scope::Ip);
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        // Another client is unaffected.
        limits.check_client(Door::Join, B).unwrap();
        // 2/s: after half a second one more request fits.
        clock.advance(Duration::from_millis(500));
        limits.check_client(Door::Join, A).unwrap();
        assert!(limits.check_client(Door::Join, A).is_err());
    }

    #[test]
    fn token_and_cluster_budgets_are_separate() {
        let clock = FakeRelativeClock::default();
        let limits = limits(&clock);
        limits.check_token("t1", "edge").unwrap();
        limits.check_token("t1", "edge").unwrap();
        let refused = limits.check_token("t1", "edge").unwrap_err();
        assert_eq!(refused.scope, Scope::Token);
        // The cluster's burst of 10: two from t1, eight more from other tokens.
        for i in 0..8 {
            limits.check_token(&format!("other-{i}"), "edge").unwrap();
        }
        let refused = limits.check_token("fresh", "edge").unwrap_err();
        assert_eq!(refused.scope, Scope::Cluster);
        limits.check_token("fresh", "core").unwrap();
    }

    #[test]
    fn global_cap_applies_across_clients() {
        let clock = FakeRelativeClock::default();
        let config = LimitsConfig {
            global: rate(1, 2),
            ..LimitsConfig::default()
        };
        let limits = Limits::with_clock(&config, clock.clone());
        limits.check_client(Door::Join, A).unwrap();
        limits.check_client(Door::Join, B).unwrap();
        assert_eq!(
            limits.check_client(Door::Join, A).unwrap_err().scope,
            Scope::Global
        );
    }

    #[test]
    fn a_client_over_its_own_limit_does_not_drain_the_global_budget() {
        let clock = FakeRelativeClock::default();
        let config = LimitsConfig {
            global: rate(1, 5),
            per_ip: rate(1, 2),
            ..LimitsConfig::default()
        };
        let limits = Limits::with_clock(&config, clock.clone());
        let refusals = (0..1000)
            .filter_map(|_| limits.check_client(Door::Join, A).err())
            .collect::<Vec<_>>();
        assert_eq!(refusals.len(), 998);
        assert!(refusals.iter().all(|r| r.scope == Scope::Ip));
        // A spent two of the five global cells; B gets two of its own and the third left.
        for _ in 0..2 {
            limits.check_client(Door::Join, B).unwrap();
        }
        let c: IpAddr = "192.0.2.3".parse().unwrap();
        limits.check_client(Door::Join, c).unwrap();
        assert_eq!(
            limits.check_client(Door::Join, c).unwrap_err().scope,
            Scope::Global
        );
    }

    #[test]
    fn an_ipv6_64_shares_one_budget_and_mapped_ipv4_is_the_ipv4_client() {
        let clock = FakeRelativeClock::default();
        let limits = limits(&clock);
        for low in 1..=3 {
            limits
                .check_client(Door::Join, v6(&format!("2001:db8:0:7::{low}")))
                .unwrap();
        }
        let refused = limits
            .check_client(Door::Join, v6("2001:db8:0:7:ffff::1"))
            .unwrap_err();
        assert_eq!(refused.scope, Scope::Ip);
        limits
            .check_client(Door::Join, v6("2001:db8:0:8::1"))
            .unwrap();
        for _ in 0..3 {
            limits.check_client(Door::Join, A).unwrap();
        }
        let mapped = v6("::ffff:192.0.2.1");
        assert_eq!(
            limits.check_client(Door::Join, mapped).unwrap_err().scope,
            Scope::Ip
        );
    }

    #[test]
    fn challenges_have_buckets_of_their_own() {
        let clock = FakeRelativeClock::default();
        let limits = limits(&clock);
        for _ in 0..3 {
            limits.check_client(Door::Challenge, A).unwrap();
        }
        let refused = limits.check_client(Door::Challenge, A).unwrap_err();
        assert_eq!(refused.scope, Scope::Ip);
        // The same client's joins are untouched by its challenge flood.
        limits.check_client(Door::Join, A).unwrap();
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let clock = FakeRelativeClock::default();
        let limits = limits(&clock);
        limits.check_client(Door::Join, A).unwrap();
        limits.check_client(Door::Challenge, B).unwrap();
        assert_eq!(limits.join.per_client.len(), 1);
        assert_eq!(limits.challenge.per_client.len(), 1);
        clock.advance(Duration::from_secs(10));
        limits.forget_idle();
        assert_eq!(limits.join.per_client.len(), 0);
        assert_eq!(limits.challenge.per_client.len(), 0);
    }
}
