//! The OmniRelay bootstrap gateway: nodes present a bootstrap token, attestation evidence and a
//! CSR; a sandboxed WebAssembly policy decides; the gateway mints a SPIFFE X.509-SVID.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of modules and their invariants.

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
pub mod server;
pub mod shadow;
pub mod state;
pub mod store;
pub mod token;

// The node side is its own crate (`omnirelay-agent`), so that a node builds without wasmtime,
// git2 or SQLite. These paths are where the gateway, its tests and the bench always found it.
pub use omnirelay_agent as agent;
pub use omnirelay_agent::secrets;
pub use omnirelay_agent::wire;
