//! A native test harness: run a policy's logic with plain `cargo test`, no WebAssembly needed.
//!
//! [`evaluate`] and [`validate`] go through the same settings parsing as the exported
//! component, so a test here exercises exactly the code the gateway will run.

use crate::{Decision, LogLevel, Policy, PolicyError, Request, TokenClaims};
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// Runs `P`'s `validate-settings` on a JSON settings document.
pub fn validate<P: Policy>(settings: &str) -> Result<(), String> {
    crate::run_validate::<P>(settings)
}

/// Runs `P`'s `evaluate` on a JSON settings document and a request.
pub fn evaluate<P: Policy>(settings: &str, request: &Request) -> Result<Decision, PolicyError> {
    crate::run_evaluate::<P>(settings, request)
}

/// A join request for `cluster`/`role` from `node`, with a one-use token-only attestation, a
/// P-256 CSR and the clock at 2026-01-01T00:00:00Z. Change fields as a test needs.
pub fn request(cluster: &str, role: &str, node: &str) -> Request {
    let now_ms = 1_767_225_600_000;
    Request {
        kind: crate::RequestKind::Join,
        token: TokenClaims {
            audit_id: "00000000-0000-4000-8000-000000000001".to_string(),
            cluster: cluster.to_string(),
            role: role.to_string(),
            trust_domain: "example.org".to_string(),
            not_before: now_ms / 1000 - 60,
            expires_at: now_ms / 1000 + 900,
            max_uses: 1,
            uses_left: 1,
        },
        attestation: crate::Attestation {
            issued_at_ms: now_ms,
            ..Default::default()
        },
        csr: crate::CsrFacts::default(),
        node_name: node.to_string(),
        client_address: "192.0.2.10".to_string(),
        now_ms,
        extensions: Vec::new(),
    }
}

/// A log line a policy emitted natively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Severity.
    pub level: LogLevel,
    /// Message.
    pub message: String,
    /// Structured fields.
    pub fields: Vec<(String, String)>,
}

#[cfg(not(target_arch = "wasm32"))]
std::thread_local! {
    static LOGS: core::cell::RefCell<Vec<LogLine>> = const { core::cell::RefCell::new(Vec::new()) };
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn record_log(level: LogLevel, message: &str, fields: Vec<(String, String)>) {
    LOGS.with(|logs| {
        logs.borrow_mut().push(LogLine {
            level,
            message: message.to_string(),
            fields,
        })
    });
}

/// Returns and clears the lines this thread's policy code logged.
#[cfg(not(target_arch = "wasm32"))]
pub fn take_logs() -> Vec<LogLine> {
    LOGS.with(|logs| core::mem::take(&mut *logs.borrow_mut()))
}
