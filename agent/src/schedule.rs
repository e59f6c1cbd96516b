//! When to renew, as pure functions of the certificate's validity, the gateway's hint, the time
//! and a random sample — all passed in, so every case is a unit test without a clock or a
//! sleep. The daemon reads the time through [`Clock`] and sleeps for what these return.
//!
//! The point: when `remaining_percent` of the lifetime remains, unless the gateway's
//! `renew_after` hint (which wins) says otherwise. The time: uniform over the `jitter_percent`
//! of the lifetime before the point (never before the certificate's start), drawn once per
//! certificate, so a fleet issued at once does not come back at once. Never past expiry.

use std::time::{Duration, SystemTime};

use crate::Backoff;

/// Reads the time. The daemon uses [`SystemClock`]; tests pass times directly.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now, by the node's clock.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A certificate's validity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start.
    pub not_before: SystemTime,
    /// End: from here on the certificate is worthless.
    pub not_after: SystemTime,
}

impl Validity {
    fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }
}

/// The renewal settings (flags of `mesh bootstrap renew`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewPolicy {
    /// Renew when this share of the lifetime remains, 1–99. Default 20.
    pub remaining_percent: u8,
    /// Spread renewals over this share of the lifetime before the point. Default 10.
    pub jitter_percent: u8,
    /// Never wait less than this between a renewal and the next (a gateway that answers with an
    /// already-due certificate must not make the agent spin), unless expiry comes first.
    /// Default 1 s.
    pub min_interval: Duration,
}

impl Default for RenewPolicy {
    fn default() -> Self {
        Self {
            remaining_percent: 20,
            jitter_percent: 10,
            min_interval: Duration::from_secs(1),
        }
    }
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Wait this long, then (re)try.
    Wait(Duration),
    /// The certificate ran out: only a new join helps.
    Expired,
}

/// The un-jittered renewal point: the gateway's hint when it lies within the validity (it
/// wins), else when `remaining_percent` of the lifetime remains.
pub fn renewal_point(
    validity: Validity,
    hint: Option<SystemTime>,
    policy: RenewPolicy,
) -> SystemTime {
    if let Some(hint) = hint.filter(|h| *h < validity.not_after) {
        return hint.max(validity.not_before);
    }
    let percent = u32::from(policy.remaining_percent.clamp(1, 99));
    let remaining = validity.lifetime().mul_f64(f64::from(percent) / 100.0);
    validity.not_after - remaining
}

/// The renewal time for one certificate: uniform over the `jitter_percent` of the lifetime
/// before [`renewal_point`] (clipped to the certificate's start). `unit` is a sample in
/// `[0, 1)`; draw it once per certificate.
pub fn renewal_time(
    validity: Validity,
    hint: Option<SystemTime>,
    policy: RenewPolicy,
    unit: f64,
) -> SystemTime {
    let point = renewal_point(validity, hint, policy);
    let window = validity
        .lifetime()
        .mul_f64(f64::from(policy.jitter_percent.min(100)) / 100.0);
    let earliest = point
        .checked_sub(window)
        .unwrap_or(validity.not_before)
        .max(validity.not_before);
    let spread = point.duration_since(earliest).unwrap_or_default();
    point - spread.mul_f64(unit.clamp(0.0, 1.0))
}

/// `at`, but no sooner than `floor` after `now` (see [`RenewPolicy::min_interval`]), unless
/// that would be at or past expiry. Applied once, when a certificate's time is drawn: applied
/// at every wake-up it would push a due renewal back again and again.
pub fn not_sooner(
    at: SystemTime,
    validity: Validity,
    now: SystemTime,
    floor: Duration,
) -> SystemTime {
    let floored = at.max(now + floor);
    if floored < validity.not_after {
        floored
    } else {
        at
    }
}

/// How long to wait from `now` until `at` for a certificate with `validity`. A node clock behind
/// the gateway's reads a `not_before` in the future: the certificate cannot have been issued
/// before it, so the wait counts from `not_before` instead of `now` (and never from later
/// than `at`, which a clock ahead of the gateway's has already passed: renew at once). Expiry
/// comes first.
pub fn wait_until(at: SystemTime, validity: Validity, now: SystemTime) -> Plan {
    if now >= validity.not_after {
        return Plan::Expired;
    }
    let from = now.max(validity.not_before);
    let wait = at.duration_since(from).unwrap_or_default();
    let until_expiry = validity.not_after.duration_since(from).unwrap_or_default();
    Plan::Wait(wait.min(until_expiry))
}

/// After failed attempt `attempt` (1-based): the backoff's delay (honouring `retry_after`), but
/// at most half the time left (at least a second, or what is left), so that tries keep coming
/// until the certificate runs out; [`Plan::Expired`] once it has.
pub fn retry(
    backoff: Backoff,
    attempt: u32,
    retry_after: Option<Duration>,
    unit: f64,
    validity: Validity,
    now: SystemTime,
) -> Plan {
    let Ok(left) = validity.not_after.duration_since(now) else {
        return Plan::Expired;
    };
    if left.is_zero() {
        return Plan::Expired;
    }
    let most = (left / 2).max(left.min(Duration::from_secs(1)));
    Plan::Wait(backoff.delay(attempt, retry_after, unit).min(most))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const T0: u64 = 1_700_000_000;

    /// `secs` (negative: before) from T0.
    fn at(secs: f64) -> SystemTime {
        let t0 = UNIX_EPOCH + Duration::from_secs(T0);
        match secs < 0.0 {
            true => t0 - Duration::from_secs_f64(-secs),
            false => t0 + Duration::from_secs_f64(secs),
        }
    }

    /// A certificate valid from T0 for `lifetime` seconds.
    fn valid_for(lifetime: f64) -> Validity {
        Validity {
            not_before: at(0.0),
            not_after: at(lifetime),
        }
    }

    fn secs(t: SystemTime) -> f64 {
        t.duration_since(at(0.0)).unwrap().as_secs_f64()
    }

    #[test]
    fn renews_when_the_remaining_share_is_left_jittered_over_the_tenth_before() {
        let hour = valid_for(3600.0);
        let policy = RenewPolicy::default();
        assert_eq!(secs(renewal_point(hour, None, policy)), 2880.0);
        // unit 0 → the point itself; unit → 1 → 10 % of the lifetime before it.
        assert_eq!(secs(renewal_time(hour, None, policy, 0.0)), 2880.0);
        assert_eq!(secs(renewal_time(hour, None, policy, 0.5)), 2700.0);
        assert!((secs(renewal_time(hour, None, policy, 0.999_999)) - 2520.0).abs() < 0.01);
        for i in 0..100 {
            let t = secs(renewal_time(hour, None, policy, f64::from(i) / 100.0));
            assert!((2520.0..=2880.0).contains(&t), "{t}");
        }
        let half = RenewPolicy {
            remaining_percent: 50,
            ..policy
        };
        assert_eq!(secs(renewal_point(hour, None, half)), 1800.0);
        // Out-of-range settings are clamped, never past expiry.
        let zero = RenewPolicy {
            remaining_percent: 0,
            ..policy
        };
        assert_eq!(secs(renewal_point(hour, None, zero)), 3564.0);
    }

    #[test]
    fn the_gateways_hint_wins_when_it_lies_within_the_validity() {
        let hour = valid_for(3600.0);
        let policy = RenewPolicy::default();
        assert_eq!(secs(renewal_point(hour, Some(at(1200.0)), policy)), 1200.0);
        assert_eq!(secs(renewal_point(hour, Some(at(3500.0)), policy)), 3500.0);
        // Jitter still spreads it, never before the certificate's start.
        assert_eq!(
            secs(renewal_time(hour, Some(at(1200.0)), policy, 0.5)),
            1020.0
        );
        assert_eq!(secs(renewal_time(hour, Some(at(100.0)), policy, 0.5)), 50.0);
        assert_eq!(secs(renewal_time(hour, Some(at(-50.0)), policy, 0.9)), 0.0);
        // A hint at or past expiry is not one: the share applies.
        assert_eq!(secs(renewal_point(hour, Some(at(3600.0)), policy)), 2880.0);
        assert_eq!(secs(renewal_point(hour, Some(at(9999.0)), policy)), 2880.0);
    }

    #[test]
    fn very_short_lifetimes_keep_sub_second_precision_and_the_bounds() {
        let five = valid_for(5.0);
        let policy = RenewPolicy::default();
        assert_eq!(secs(renewal_point(five, None, policy)), 4.0);
        for i in 0..100 {
            let t = secs(renewal_time(five, None, policy, f64::from(i) / 100.0));
            assert!((3.5..=4.0).contains(&t), "{t}");
        }
        // Just issued: wait about 4 s, never 0 and never past expiry.
        let plan = wait_until(at(4.0), five, at(0.2));
        assert_eq!(plan, Plan::Wait(Duration::from_secs_f64(3.8)));
        // Drawn when already due (a gateway answering with a certificate due at once): the
        // floor puts a second between renewals, unless that reaches expiry.
        let floor = policy.min_interval;
        assert_eq!(secs(not_sooner(at(1.0), five, at(2.0), floor)), 3.0);
        assert_eq!(secs(not_sooner(at(4.0), five, at(4.5), floor)), 4.0);
        assert_eq!(secs(not_sooner(at(3.5), five, at(0.0), floor)), 3.5);
        // Woken again after the time was drawn (a bundle refresh in between): no new floor.
        assert_eq!(
            wait_until(at(3.0), five, at(2.9)),
            Plan::Wait(Duration::from_millis(100))
        );
        assert_eq!(
            wait_until(at(4.0), five, at(4.5)),
            Plan::Wait(Duration::ZERO)
        );
        assert_eq!(wait_until(at(4.0), five, at(5.0)), Plan::Expired);
    }

    #[test]
    fn a_node_clock_behind_the_gateway_counts_from_not_before() {
        let hour = valid_for(3600.0);
        // The node's clock reads 90 s before the certificate's start.
        let plan = wait_until(at(2880.0), hour, at(-90.0));
        assert_eq!(plan, Plan::Wait(Duration::from_secs(2880)));
        // Not expired, and a retry still has the whole lifetime.
        assert_eq!(
            retry(Backoff::default(), 1, None, 1.0, hour, at(-90.0)),
            Plan::Wait(Duration::from_millis(500))
        );
    }

    #[test]
    fn a_node_clock_ahead_past_the_point_renews_at_once() {
        let hour = valid_for(3600.0);
        assert_eq!(
            wait_until(at(2880.0), hour, at(3000.0)),
            Plan::Wait(Duration::ZERO)
        );
        assert_eq!(wait_until(at(2880.0), hour, at(3600.0)), Plan::Expired);
    }

    #[test]
    fn an_expired_certificate_plans_no_attempt() {
        let hour = valid_for(3600.0);
        assert_eq!(wait_until(at(2880.0), hour, at(7200.0)), Plan::Expired);
        assert_eq!(
            retry(Backoff::default(), 1, None, 0.5, hour, at(3600.0)),
            Plan::Expired
        );
    }

    #[test]
    fn retries_back_off_honour_retry_after_and_stop_at_expiry() {
        let day = valid_for(86_400.0);
        let backoff = Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        };
        let now = at(70_000.0);
        let waits: Vec<_> = (1..=8)
            .map(|a| match retry(backoff, a, None, 1.0, day, now) {
                Plan::Wait(d) => d.as_secs(),
                Plan::Expired => u64::MAX,
            })
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(
            retry(backoff, 1, Some(Duration::from_secs(45)), 0.0, day, now),
            Plan::Wait(Duration::from_secs(45))
        );
        // Near expiry the wait shrinks so that a last try still comes before it.
        let near = at(86_390.0);
        assert_eq!(
            retry(backoff, 1, Some(Duration::from_secs(45)), 0.0, day, near),
            Plan::Wait(Duration::from_secs(5))
        );
        // The last second is not cut into ever smaller waits.
        assert_eq!(
            retry(backoff, 9, None, 1.0, day, at(86_399.5)),
            Plan::Wait(Duration::from_millis(500))
        );
        assert_eq!(
            retry(backoff, 9, None, 1.0, day, at(86_398.5)),
            Plan::Wait(Duration::from_secs(1))
        );
    }
}
