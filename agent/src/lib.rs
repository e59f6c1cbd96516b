//! The OmniRelay node agent: everything a node runs to get and keep its SPIFFE identity, built
//! without the gateway's wasmtime, git2 or SQLite (`omnirelay-agent`, a few MB, see the README).
//!
//! - **join** ([`join()`]): generate a key (it never leaves the node), build a CSR, fetch a
//!   challenge, attest (token-only or `x509pop`), join with an idempotency key, retry 429/5xx
//!   with capped exponential backoff and full jitter honouring `Retry-After`.
//! - **renew** ([`renew::renew`], [`daemon::run`]): before the SVID runs out, a fresh key and
//!   CSR go to `POST /v1/bootstrap/renew` over mTLS, the current SVID as client certificate;
//!   [`schedule`] decides when, as pure functions of the certificate and an injected time.
//! - **bundle and revocations** ([`daemon`], [`revocations`]): the trust bundle is refreshed
//!   from `GET /v1/bundle`, and the revocation feed can be mirrored into a file.
//!
//! # The identity directory
//!
//! Join and renewal write the SVID the way Kubernetes writes projected volumes (its
//! `AtomicWriter`), so that a reader never pairs a key from one SVID with a certificate from
//! another ([`svid_dir`]):
//!
//! ```text
//! DIR/..svid-<serial>/{key.pem (0600), cert.pem, bundle.pem}   one directory per version
//! DIR/..data -> ..svid-<serial>                                 swapped atomically (rename)
//! DIR/key.pem -> ..data/key.pem                                 stable names for existing users
//! DIR/cert.pem -> ..data/cert.pem
//! DIR/bundle.pem -> ..data/bundle.pem
//! DIR/agent.json                                                the gateway's URL and the SVID's
//!                                                               times (0644)
//! ```
//!
//! A reader that needs a consistent key and certificate resolves `DIR/..data` **once** (for
//! example `d=$(realpath DIR/..data)`) and reads both files from that directory. Opening
//! `DIR/key.pem` and then `DIR/cert.pem` resolves the link twice and can straddle a renewal. The
//! previous version is removed right after the swap, so a reader that resolved `..data` just
//! before it and then finds a file missing resolves it again.
//!
//! The gateway (`omnirelay`) re-exports this crate as `gateway::agent`, and its `wire`,
//! `secrets` and the evidence format are the ones both sides use.

pub mod cli;
mod client;
pub mod daemon;
pub mod evidence;
mod join;
pub mod json_file;
pub mod leaf;
pub mod record;
pub mod renew;
mod retry;
pub mod revocations;
pub mod schedule;
pub mod secrets;
pub mod svid_dir;
#[cfg(test)]
mod testutil;
mod verify;
pub mod wire;

pub use client::{GatewayClient, Reply};
pub use join::{Device, JoinOptions, Joined, join, sign_with_device};
pub use retry::{Backoff, unit_sample};

use wire::Problem;

/// A join, or a request to the gateway, could not complete.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad arguments or local files.
    #[error("{0}")]
    Usage(String),
    /// The gateway could not be reached or answered garbage.
    #[error("cannot reach the gateway: {0}")]
    Transport(String),
    /// The gateway refused, for a reason retrying will not fix. Boxed: the problem document
    /// is large, and every `Result` carrying this error would pay for it.
    #[error("the gateway refused at stage {} ({}, HTTP {}): {}", .0.stage, .0.reason, .0.status, .0.detail)]
    Refused(Box<Problem>),
    /// Retries ran out.
    #[error("gave up after {attempts} attempts; last error: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The gateway answered with a certificate this node cannot use (not for the key it sent,
    /// or not a certificate at all).
    #[error("the gateway's certificate is unusable: {0}")]
    BadCertificate(#[source] leaf::LeafError),
    /// Writing the identity directory failed.
    #[error(transparent)]
    Files(#[from] svid_dir::SvidDirError),
    /// Writing `agent.json` failed.
    #[error(transparent)]
    Record(#[from] record::RecordError),
}
