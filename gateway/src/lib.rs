//! The OmniRelay bootstrap gateway: nodes present a bootstrap token, attestation evidence and a
//! CSR; a sandboxed WebAssembly policy decides; the gateway mints a SPIFFE X.509-SVID.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of modules and their invariants.

pub mod agent;
pub mod api;
pub mod app;
pub mod attest;
pub mod audit;
pub mod cli;
pub mod config;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod reload;
pub mod revocation;
pub mod secrets;
pub mod server;
pub mod state;
pub mod store;
pub mod token;
pub mod wire;
