//! Write OmniRelay issuance policies in plain Rust.
//!
//! A policy decides whether a node that presented a bootstrap token (or a valid SVID, on
//! renewal) gets a SPIFFE identity, and which one. You implement [`Policy`] on a type, export it
//! with [`export_policy!`], and build the crate for `wasm32-wasip2`: the result is a WebAssembly
//! component that the gateway runs in a fresh sandbox for every request. The same logic is an
//! ordinary Rust function on the host, so `cargo test` exercises it without any WebAssembly.
//!
//! # Example
//!
//! ```
//! // In the policy crate: #![no_std]
//! extern crate alloc;
//! use alloc::{format, string::String, vec::Vec};
//! use policy_sdk::{Allow, Decision, Deny, Policy, PolicyError, Request};
//!
//! /// Lets in the clusters named in the settings, one SPIFFE ID per node.
//! pub struct Clusters;
//!
//! #[derive(serde::Deserialize)]
//! pub struct Settings {
//!     clusters: Vec<String>,
//!     ttl_seconds: u32,
//! }
//!
//! impl Policy for Clusters {
//!     type Settings = Settings;
//!
//!     fn validate(settings: &Settings) -> Result<(), String> {
//!         if settings.clusters.is_empty() {
//!             return Err("`clusters` must name at least one cluster".into());
//!         }
//!         Ok(())
//!     }
//!
//!     fn evaluate(settings: &Settings, request: &Request) -> Result<Decision, PolicyError> {
//!         let token = &request.token;
//!         if !settings.clusters.contains(&token.cluster) {
//!             return Ok(Decision::Deny(
//!                 Deny::new("cluster-not-allowed", format!("cluster {} is not listed", token.cluster))
//!                     .node_message("this token's cluster may not join here"),
//!             ));
//!         }
//!         let path = format!("/cluster/{}/node/{}", token.cluster, request.node_name);
//!         Ok(Decision::Allow(Allow::new(path, settings.ttl_seconds).matched("cluster-listed")))
//!     }
//! }
//!
//! policy_sdk::export_policy!(Clusters);
//!
//! // Natively, with plain `cargo test`:
//! let settings = r#"{"clusters": ["edge"], "ttl_seconds": 3600}"#;
//! let request = policy_sdk::testing::request("edge", "dispatcher", "node-1");
//! let decision = policy_sdk::testing::evaluate::<Clusters>(settings, &request).unwrap();
//! assert_eq!(
//!     decision,
//!     Decision::Allow(Allow::new("/cluster/edge/node/node-1", 3600).matched("cluster-listed"))
//! );
//! ```
//!
//! # Rules of the sandbox
//!
//! - Policy crates are `#![no_std]` (with `alloc`): the component then imports nothing but the
//!   gateway's `log` function. Depending on `std` fails the wasm build with a duplicate
//!   `panic_impl` error.
//! - There is no clock: use [`Request::now_ms`]. There is no state between requests: every
//!   evaluation runs in a new instance.
//! - A panic traps the instance; the gateway fails closed and reports it apart from a deny.
//!   The panic message is sent to the gateway log first.
//! - Memory and time are capped by the gateway; exceeding either fails closed. The heap is a
//!   bump allocator: freeing returns memory only for the most recent block, and everything is
//!   reclaimed when the call ends. Allocate what one decision needs, not more.
//! - Only claims in [`Attestation::verified`] were checked by the gateway.
//!
//! # Building
//!
//! ```text
//! cargo build --target wasm32-wasip2 --profile policy -p my-policy
//! ```
//!
//! with `crate-type = ["cdylib", "rlib"]` in the policy's `Cargo.toml`. Nothing else is
//! needed: this crate's build script links every policy that depends on it with a 64 KiB
//! shadow stack and 256 KiB of heap in the initial memory, so a fresh instance starts small and
//! never has to grow its memory (it halves the per-decision cost; see the repository's
//! `bench/README.md`). `omnirelay policy new` scaffolds a complete policy repository, and
//! `omnirelay policy build`, `publish` and `test` of a bundle source refuse a module linked
//! otherwise.

// Natively the SDK uses std (the test harness captures logs); in the guest it must not.
#![cfg_attr(target_arch = "wasm32", no_std)]
#![deny(missing_docs)]

extern crate alloc;
// Lets the generated bindings name this crate by the path policies use.
extern crate self as policy_sdk;

use alloc::format;
use alloc::string::{String, ToString};

mod types;

pub use types::*;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __private;

pub mod testing;

/// Version of the WIT package (`omnirelay:bootstrap-policy`) this SDK targets.
pub const WIT_VERSION: &str = "0.1.0";

/// An issuance policy.
///
/// Implement it on a unit type and export that type with [`export_policy!`].
pub trait Policy {
    /// The policy's settings, deserialized from the JSON the bundle manifest gives it.
    type Settings: serde::de::DeserializeOwned;

    /// Checks settings beyond what deserialization already checked. Runs once when the gateway
    /// loads the policy; a bundle whose settings fail here never serves.
    fn validate(settings: &Self::Settings) -> Result<(), String> {
        let _ = settings;
        Ok(())
    }

    /// Decides one request.
    ///
    /// Return `Ok(Decision::Deny(..))` to refuse, and `Err(PolicyError)` only when the policy
    /// cannot decide (the gateway alerts on those).
    fn evaluate(settings: &Self::Settings, request: &Request) -> Result<Decision, PolicyError>;
}

/// Parses `settings` and runs [`Policy::validate`]: what the component's `validate-settings`
/// export does.
pub fn run_validate<P: Policy>(settings: &str) -> Result<(), String> {
    let parsed = parse_settings::<P>(settings)?;
    P::validate(&parsed)
}

/// Parses `settings` and runs [`Policy::evaluate`]: what the component's `evaluate` export does.
pub fn run_evaluate<P: Policy>(settings: &str, request: &Request) -> Result<Decision, PolicyError> {
    let parsed = parse_settings::<P>(settings).map_err(PolicyError::new)?;
    P::evaluate(&parsed, request)
}

fn parse_settings<P: Policy>(settings: &str) -> Result<P::Settings, String> {
    serde_json::from_str(settings).map_err(|e| format!("invalid settings: {e}"))
}

/// Severity of a policy log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something looks wrong.
    Warn,
    /// Something is wrong.
    Error,
}

/// Sends a structured log line to the gateway's log, attributed to this policy.
///
/// The gateway caps how many lines and how many bytes one evaluation may log. Natively (in
/// `cargo test`) lines are kept for [`testing::take_logs`].
pub fn log(level: LogLevel, message: &str, fields: &[(&str, &str)]) {
    let fields: alloc::vec::Vec<(String, String)> = fields
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    #[cfg(target_arch = "wasm32")]
    __private::log(level, message, &fields);
    #[cfg(not(target_arch = "wasm32"))]
    testing::record_log(level, message, fields);
}

/// Exports a [`Policy`] implementation as the component's `evaluator` interface.
///
/// Use it once per policy crate. On non-wasm targets it expands to nothing, so the crate still
/// builds and tests natively.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code)] // canonical-ABI glue generated by wit-bindgen
        const _: () = {
            struct __OmniRelayExport;

            impl $crate::__private::Guest for __OmniRelayExport {
                fn validate_settings(
                    settings: $crate::__private::String,
                ) -> ::core::result::Result<(), $crate::__private::String> {
                    $crate::run_validate::<$policy>(&settings)
                }

                fn evaluate(
                    settings: $crate::__private::String,
                    request: $crate::__private::WitRequest,
                ) -> ::core::result::Result<
                    $crate::__private::WitDecision,
                    $crate::__private::WitPolicyError,
                > {
                    $crate::__private::evaluate::<$policy>(&settings, request)
                }
            }

            $crate::__private::export!(__OmniRelayExport);
        };
    };
}
