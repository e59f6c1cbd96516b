//! Everything that can go wrong loading or running a policy. Every variant is a fail-closed
//! outcome that callers can tell apart from a policy's deny.

use std::time::Duration;

use super::verdict::InvalidResult;

/// A policy could not be loaded, or could not decide.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The wasmtime engine could not be configured.
    #[error("cannot configure the WebAssembly engine")]
    Engine(#[source] wasmtime::Error),
    /// The epoch thread that enforces deadlines could not start; no policy may run without it.
    #[error("cannot start the policy deadline thread")]
    Ticker(#[source] std::io::Error),
    /// The module is not a valid WebAssembly component for this engine.
    #[error("policy module does not compile")]
    Compile(#[source] wasmtime::Error),
    /// The component targets a WIT package version this gateway does not support.
    #[error(
        "policy was built against {found}, but this gateway supports omnirelay:bootstrap-policy@{supported}; rebuild it with a matching policy-sdk"
    )]
    UnsupportedVersion {
        /// The export the component has instead.
        found: String,
        /// The version the gateway supports.
        supported: &'static str,
    },
    /// The component exports no policy interface at all.
    #[error("not an OmniRelay policy: no `omnirelay:bootstrap-policy/evaluator` export")]
    NotAPolicy,
    /// The component imports something the host does not provide (WASI, for example).
    #[error("policy imports `{0}`, which this gateway does not provide (policies get no WASI)")]
    ForbiddenImport(String),
    /// The component's imports and the host's exports do not line up.
    #[error("policy does not link against the host")]
    Link(#[source] wasmtime::Error),
    /// `validate-settings` refused the settings.
    #[error("policy rejected its settings: {0}")]
    SettingsRejected(String),
    /// The call ran past its deadline and was interrupted.
    #[error("policy exceeded its {limit:?} deadline")]
    Timeout {
        /// The deadline that was exceeded.
        limit: Duration,
    },
    /// The guest tried to grow its memory past the cap.
    #[error("policy exceeded its memory cap of {limit} bytes")]
    OutOfMemory {
        /// The cap, bytes.
        limit: u64,
    },
    /// The guest used up its fuel (only with metering, as in `policy test`).
    #[error("policy exceeded its budget of {budget} fuel")]
    FuelExhausted {
        /// The budget that was exceeded.
        budget: u64,
    },
    /// The guest trapped: a panic, an out-of-bounds access, a stack overflow.
    #[error("policy trapped: {message}")]
    Trap {
        /// The trap, and the policy's panic message when it logged one.
        message: String,
    },
    /// The policy answered with something the host will not act on.
    #[error("policy returned an invalid result: {0}")]
    InvalidResult(#[from] InvalidResult),
    /// The policy returned its own `policy-error`.
    #[error("policy reported an error: {0}")]
    Reported(String),
    /// No evaluation slot became free in time; the caller should shed the request.
    #[error("no policy evaluation slot free within {0:?}")]
    Overloaded(Duration),
    /// Creating the instance failed for a reason other than the above.
    #[error("policy instantiation failed")]
    Instantiate(#[source] wasmtime::Error),
    /// The policy kept failing (timeouts, traps, memory-cap hits) and its circuit breaker is
    /// open: the call was refused without running the guest.
    #[error(
        "policy is failing repeatedly; its evaluations are refused for another {retry_after:?}"
    )]
    CircuitOpen {
        /// How long until the breaker lets a probe call through.
        retry_after: Duration,
    },
    /// The thread running the evaluation stopped before answering (a panic in the host).
    #[error("the policy evaluation thread stopped before answering")]
    ThreadLost,
    /// No evaluation thread could be started.
    #[error("cannot start a policy evaluation thread")]
    Thread(#[source] std::io::Error),
}

impl PolicyError {
    /// A stable label for metrics and audit entries.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Engine(_) | Self::Ticker(_) | Self::ThreadLost | Self::Thread(_) => "host",
            Self::Compile(_) => "compile",
            Self::UnsupportedVersion { .. } => "unsupported-version",
            Self::NotAPolicy => "not-a-policy",
            Self::ForbiddenImport(_) => "forbidden-import",
            Self::Link(_) => "link",
            Self::SettingsRejected(_) => "settings-rejected",
            Self::Timeout { .. } => "timeout",
            Self::OutOfMemory { .. } => "out-of-memory",
            Self::FuelExhausted { .. } => "fuel-exhausted",
            Self::Trap { .. } => "trap",
            Self::InvalidResult(_) => "invalid-result",
            Self::Reported(_) => "policy-error",
            Self::Overloaded(_) => "overloaded",
            Self::Instantiate(_) => "instantiate",
            Self::CircuitOpen { .. } => "circuit-open",
        }
    }

    /// Whether this failure counts towards opening the policy's circuit breaker: the guest ran
    /// and misbehaved in a way that costs the host (its whole deadline, or a trap). A deny, a
    /// bad result or the policy's own error are answers, and a shed call never ran.
    pub fn trips_breaker(&self) -> bool {
        matches!(
            self,
            Self::Timeout { .. }
                | Self::OutOfMemory { .. }
                | Self::FuelExhausted { .. }
                | Self::Trap { .. }
        )
    }
}
