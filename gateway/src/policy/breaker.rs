//! The circuit breaker of one loaded policy: `breaker_failures` consecutive timeouts, traps or
//! memory-cap hits open it for `breaker_cooldown`, during which its evaluations fail fast with
//! [`PolicyError::CircuitOpen`] without running the guest; after the cooldown one probe call
//! runs, and its outcome closes the breaker or opens it again.
//!
//! Every transition is published as a [`BreakerTransition`] on the host's broadcast channel
//! ([`super::PolicyHost::breaker_transitions`]): the host owns neither the metrics nor the
//! store, so the application drains the channel into both. Time comes from an injected
//! [`Clock`], so tests move it without sleeping.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::{ModuleDigest, PolicyError};

/// Where the breaker reads time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Monotonic now.
    fn now(&self) -> Instant;
}

/// The process's monotonic clock: what the server uses.
#[derive(Debug, Default, Clone, Copy)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Where a policy's breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Evaluations run.
    Closed,
    /// Evaluations fail fast until the cooldown ends.
    Open,
    /// The cooldown ended; one probe evaluation decides.
    HalfOpen,
}

impl BreakerState {
    /// The label used in metrics and audit entries.
    pub fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }

    /// The value of the state gauge: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

/// A change of one policy's breaker, for metrics and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerTransition {
    /// The policy's configured name.
    pub policy: Arc<str>,
    /// The module of the loaded version whose breaker changed.
    pub digest: ModuleDigest,
    /// The new state.
    pub state: BreakerState,
    /// Consecutive failures that opened it (0 for other transitions).
    pub failures: u32,
    /// The failure kind that opened it (`timeout`, `trap`, ...), when it opened.
    pub cause: Option<&'static str>,
    /// How long it stays open (zero for other transitions).
    pub cooldown: Duration,
}

/// How one call went, as far as the breaker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The guest answered (allow, deny, its own error, or a result the host refused).
    Answered,
    /// The guest misbehaved in a way that costs the host: timeout, trap, memory cap.
    Failed(&'static str),
    /// The guest never ran to an answer for reasons of the host's (shed, lost thread).
    NotRun,
}

impl Outcome {
    fn of<T>(result: &Result<T, PolicyError>) -> Self {
        match result {
            Ok(_) => Self::Answered,
            Err(e) if e.trips_breaker() => Self::Failed(e.kind()),
            Err(
                PolicyError::Overloaded(_)
                | PolicyError::CircuitOpen { .. }
                | PolicyError::ThreadLost
                | PolicyError::Thread(_)
                | PolicyError::Instantiate(_)
                | PolicyError::Engine(_)
                | PolicyError::Ticker(_),
            ) => Self::NotRun,
            Err(_) => Self::Answered,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// One loaded policy's breaker.
#[derive(Debug)]
pub(super) struct Breaker {
    policy: Arc<str>,
    digest: ModuleDigest,
    threshold: u32,
    cooldown: Duration,
    clock: Arc<dyn Clock>,
    events: broadcast::Sender<BreakerTransition>,
    phase: Mutex<Phase>,
}

/// Permission to run one call. Report its result with [`Ticket::finish`]; a ticket dropped
/// unfinished (the call was shed or cancelled before the guest ran) frees a half-open probe.
#[derive(Debug)]
pub(super) struct Ticket {
    breaker: Arc<Breaker>,
    probe: bool,
    finished: bool,
}

impl Breaker {
    pub(super) fn new(
        policy: Arc<str>,
        digest: ModuleDigest,
        threshold: u32,
        cooldown: Duration,
        clock: Arc<dyn Clock>,
        events: broadcast::Sender<BreakerTransition>,
    ) -> Self {
        Self {
            policy,
            digest,
            threshold,
            cooldown,
            clock,
            events,
            phase: Mutex::new(Phase::Closed { failures: 0 }),
        }
    }

    /// The current state (what a caller would meet now, cooldown included).
    pub(super) fn state(&self) -> BreakerState {
        match *self.lock() {
            Phase::Closed { .. } => BreakerState::Closed,
            Phase::Open { until } if self.clock.now() < until => BreakerState::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a call now would be refused, without taking the probe: the refusal `admit`
    /// would give, for callers that want to skip their own work before asking.
    pub(super) fn refusal(&self) -> Option<PolicyError> {
        let now = self.clock.now();
        match *self.lock() {
            Phase::Open { until } if now < until => Some(PolicyError::CircuitOpen {
                retry_after: until - now,
            }),
            Phase::HalfOpen { probing: true } => Some(PolicyError::CircuitOpen {
                retry_after: Duration::ZERO,
            }),
            _ => None,
        }
    }

    /// Lets a call run, or refuses it at once while the breaker is open (or while the
    /// half-open probe is still running).
    pub(super) fn admit(self: &Arc<Self>) -> Result<Ticket, PolicyError> {
        let now = self.clock.now();
        let mut phase = self.lock();
        let probe = match *phase {
            Phase::Closed { .. } => false,
            Phase::Open { until } if now < until => {
                return Err(PolicyError::CircuitOpen {
                    retry_after: until - now,
                });
            }
            Phase::HalfOpen { probing: true } => {
                return Err(PolicyError::CircuitOpen {
                    retry_after: Duration::ZERO,
                });
            }
            Phase::Open { .. } => {
                *phase = Phase::HalfOpen { probing: true };
                drop(phase);
                self.publish(BreakerState::HalfOpen, 0, None);
                true
            }
            Phase::HalfOpen { probing: false } => {
                *phase = Phase::HalfOpen { probing: true };
                true
            }
        };
        Ok(Ticket {
            breaker: self.clone(),
            probe,
            finished: false,
        })
    }

    fn record(&self, probe: bool, outcome: Outcome) {
        let now = self.clock.now();
        let mut phase = self.lock();
        let opened = |failures| {
            (
                Phase::Open {
                    until: now + self.cooldown,
                },
                failures,
            )
        };
        let (next, published) = match (*phase, outcome) {
            (Phase::Closed { .. }, Outcome::Answered) => (Phase::Closed { failures: 0 }, None),
            (Phase::Closed { failures }, Outcome::Failed(kind)) => {
                let failures = failures.saturating_add(1);
                if failures >= self.threshold {
                    let (next, failures) = opened(failures);
                    (next, Some((BreakerState::Open, failures, Some(kind))))
                } else {
                    (Phase::Closed { failures }, None)
                }
            }
            (Phase::HalfOpen { .. }, Outcome::Answered) if probe => (
                Phase::Closed { failures: 0 },
                Some((BreakerState::Closed, 0, None)),
            ),
            (Phase::HalfOpen { .. }, Outcome::Failed(kind)) if probe => {
                let (next, failures) = opened(1);
                (next, Some((BreakerState::Open, failures, Some(kind))))
            }
            (Phase::HalfOpen { .. }, Outcome::NotRun) if probe => {
                (Phase::HalfOpen { probing: false }, None)
            }
            // Calls admitted before the breaker opened, finishing late, change nothing.
            (current, _) => (current, None),
        };
        *phase = next;
        drop(phase);
        if let Some((state, failures, cause)) = published {
            self.publish(state, failures, cause);
        }
    }

    fn publish(&self, state: BreakerState, failures: u32, cause: Option<&'static str>) {
        let transition = BreakerTransition {
            policy: self.policy.clone(),
            digest: self.digest,
            state,
            failures,
            cause,
            cooldown: match state {
                BreakerState::Open => self.cooldown,
                _ => Duration::ZERO,
            },
        };
        match state {
            BreakerState::Open => {
                tracing::warn!(policy = %self.policy, failures, cause, cooldown = ?self.cooldown, "policy circuit breaker opened: its evaluations fail fast")
            }
            _ => {
                tracing::info!(policy = %self.policy, state = state.label(), "policy circuit breaker changed state")
            }
        }
        // No receiver (a host without an application around it) is fine: the log line stays.
        let _ = self.events.send(transition);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Phase> {
        // The phase is a plain value written whole; a panic elsewhere cannot leave it torn.
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Ticket {
    /// Reports how the call went.
    pub(super) fn finish<T>(mut self, result: &Result<T, PolicyError>) {
        self.finished = true;
        self.breaker.record(self.probe, Outcome::of(result));
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.finished {
            self.breaker.record(self.probe, Outcome::NotRun);
        }
    }
}
