//! The policy host: loads issuance policies (WebAssembly components built against `wit/`) and
//! runs each decision in a fresh, sandboxed instance with capped memory and time.
//!
//! Promises: a policy never sees a signing key, a clock, a file or the network; every way a
//! policy can fail (trap, timeout, memory, bad result, wrong WIT version) is a [`PolicyError`]
//! that callers treat as a refusal, distinct from a deny; an allow reaches the caller only as a
//! [`Grant`] whose SPIFFE path, lifetime and DNS names the host checked; guests run off the
//! runtime's workers, each policy within its share of the slots and behind its own circuit
//! breaker, so one runaway policy cannot slow the others.

mod bindings;
mod breaker;
mod config;
mod epoch;
mod error;
pub mod examples;
mod host;
mod pool;
mod set;
pub mod vectors;
mod verdict;

pub use bindings::WORLD_VERSION;
pub use breaker::{BreakerState, BreakerTransition, Clock, MonotonicClock};
pub use config::PolicyConfig;
pub use error::PolicyError;
pub use host::{LoadedPolicy, Metered, Metering, ModuleDigest, PolicyHost};
pub use set::{
    ActivePolicies, BoundPolicy, ModuleSource, PolicyBinding, PolicySet, SetError, schema_errors,
};
pub use verdict::{
    Grant, InvalidResult, RESERVED_PATH, Refusal, Verdict, check_dns_suffix, is_reserved_path,
};

#[cfg(test)]
mod tests;
