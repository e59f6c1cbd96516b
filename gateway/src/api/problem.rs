//! Every way a request can be refused, and [`rescue`]: the one place errors become HTTP
//! responses (`application/problem+json` naming the stage and the reason).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::Full;
use hyper::Response;

use super::wire::Problem;
use crate::attest::AttestError;
use crate::identity::{CsrError, IdentityError};
use crate::limits::Limited;
use crate::policy::{PolicyError, Refusal};
use crate::store::StoreError;
use crate::token::TokenError;

/// A refused request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not the JSON we expect.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The body exceeds the configured limit.
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// Reading the request took too long.
    #[error("request not received within {0:?}")]
    SlowRequest(Duration),
    /// Too many requests are in flight; retry shortly.
    #[error("the gateway is busy")]
    Shed,
    /// A rate limit refused.
    #[error(transparent)]
    RateLimited(Limited),
    /// The token did not verify.
    #[error("token: {0}")]
    Token(#[from] TokenError),
    /// The token verified but was never registered here.
    #[error("token is not registered with this gateway")]
    TokenUnknown,
    /// The token was revoked.
    #[error("token has been revoked")]
    TokenRevoked,
    /// Every use of the token has been consumed.
    #[error("token has no uses left")]
    TokenExhausted,
    /// The CSR is malformed or its signature does not verify.
    #[error("csr: {0}")]
    Csr(#[from] CsrError),
    /// The attestation evidence is refused.
    #[error("attestation: {0}")]
    Attest(#[from] AttestError),
    /// The evidence does not satisfy the policy's JSON Schema.
    #[error("evidence does not match the policy's schema: {}", .0.join("; "))]
    EvidenceSchema(Vec<String>),
    /// No policy is loaded at all.
    #[error("no policy is loaded")]
    NoPolicy,
    /// No loaded policy covers the token's cluster and role.
    #[error("no policy covers this cluster and role")]
    NoPolicyBinding,
    /// The policy denied the request.
    #[error("denied by policy: {}", .0.code)]
    Denied(Refusal),
    /// The policy could not decide (fail closed).
    #[error("policy failed: {0}")]
    PolicyFailed(#[from] PolicyError),
    /// Minting the certificate failed.
    #[error("minting failed: {0}")]
    Mint(#[from] IdentityError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The idempotency key was used before with a different CSR.
    #[error("idempotency key already used with a different CSR")]
    IdempotencyConflict,
    /// No such route.
    #[error("not found")]
    NotFound,
    /// The route exists for another method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Missing or wrong admin credential.
    #[error("missing or invalid admin credential")]
    Unauthorized,
    /// Policy reload endpoints on a gateway configured with `[[policies]]`.
    #[error("this gateway has no policy source configured")]
    NoPolicySource,
    /// A policy reload, pin or unpin refused the candidate version.
    #[error("policy version refused: {0}")]
    Reload(#[from] crate::reload::ReloadError),
}

impl ApiError {
    /// The pipeline stage that refused.
    pub fn stage(&self) -> &'static str {
        match self {
            Self::Malformed(_) | Self::NotFound | Self::MethodNotAllowed => "request",
            Self::TooLarge(_) | Self::SlowRequest(_) | Self::Shed => "transport",
            Self::RateLimited(_) => "limits",
            Self::Token(_) | Self::TokenUnknown | Self::TokenRevoked | Self::TokenExhausted => {
                "token"
            }
            Self::Csr(_) => "csr",
            Self::Attest(_) => "attestation",
            Self::EvidenceSchema(_) => "evidence-schema",
            Self::NoPolicy | Self::NoPolicyBinding | Self::Denied(_) | Self::PolicyFailed(_) => {
                "policy"
            }
            Self::Mint(_) => "mint",
            Self::Store(_) | Self::IdempotencyConflict => "record",
            Self::Unauthorized => "admin",
            Self::NoPolicySource | Self::Reload(_) => "policy-reload",
        }
    }

    /// A stable reason code.
    pub fn reason(&self) -> String {
        match self {
            Self::Malformed(_) => "malformed".into(),
            Self::TooLarge(_) => "too-large".into(),
            Self::SlowRequest(_) => "slow-request".into(),
            Self::Shed => "overloaded".into(),
            Self::RateLimited(l) => format!("rate-limited-{}", l.scope.label()),
            Self::Token(e) => e.reason().into(),
            Self::TokenUnknown => "unknown-token".into(),
            Self::TokenRevoked => "token-revoked".into(),
            Self::TokenExhausted => "token-exhausted".into(),
            Self::Csr(e) => e.reason().into(),
            Self::Attest(e) => e.reason().into(),
            Self::EvidenceSchema(_) => "schema-mismatch".into(),
            Self::NoPolicy => "no-policy-loaded".into(),
            Self::NoPolicyBinding => "no-policy-for-cluster-role".into(),
            Self::Denied(r) => r.code.clone(),
            Self::PolicyFailed(e) => format!("policy-{}", e.kind()),
            Self::Mint(e) => e.reason().into(),
            Self::Store(_) => "store-unavailable".into(),
            Self::IdempotencyConflict => "idempotency-conflict".into(),
            Self::NotFound => "not-found".into(),
            Self::MethodNotAllowed => "method-not-allowed".into(),
            Self::Unauthorized => "unauthorized".into(),
            Self::NoPolicySource => "no-policy-source".into(),
            Self::Reload(e) => e.label().into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        use AttestError as A;
        match self {
            Self::Malformed(_) | Self::Csr(_) | Self::EvidenceSchema(_) => StatusCode::BAD_REQUEST,
            Self::Attest(
                A::Stale { .. } | A::FromFuture { .. } | A::Claims(_) | A::ProofMismatch(_),
            ) => StatusCode::BAD_REQUEST,
            Self::Attest(_) => StatusCode::UNAUTHORIZED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::SlowRequest(_) => StatusCode::REQUEST_TIMEOUT,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Token(_) | Self::TokenUnknown | Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::TokenRevoked | Self::NoPolicyBinding | Self::Denied(_) => StatusCode::FORBIDDEN,
            Self::TokenExhausted | Self::IdempotencyConflict => StatusCode::CONFLICT,
            Self::Shed | Self::NoPolicy | Self::PolicyFailed(_) | Self::Store(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Mint(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::NotFound | Self::NoPolicySource => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Reload(_) => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }

    /// What the client may be told. Operator-only detail (a policy's reason, store errors,
    /// internal failures) never goes here.
    pub fn detail(&self) -> String {
        match self {
            Self::Denied(r) => r
                .node_message
                .clone()
                .unwrap_or_else(|| format!("denied by policy ({})", r.code)),
            Self::PolicyFailed(PolicyError::Overloaded(_)) => {
                "policy evaluation is busy; retry shortly".into()
            }
            Self::PolicyFailed(PolicyError::CircuitOpen { .. }) => {
                "the policy for this cluster is failing and paused; retry later".into()
            }
            Self::PolicyFailed(_) => "the policy could not decide; the request is refused".into(),
            Self::Store(_) => "the gateway's store is unavailable; retry shortly".into(),
            Self::Mint(_) => "internal error while issuing".into(),
            other => other.to_string(),
        }
    }

    /// The `Retry-After` to send, if a retry can succeed after waiting.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited(l) => Some(l.retry_after),
            Self::Shed | Self::Store(_) | Self::PolicyFailed(PolicyError::Overloaded(_)) => {
                Some(Duration::from_secs(1))
            }
            // Whole seconds, rounded up: a retry before the cooldown ends is refused again.
            Self::PolicyFailed(PolicyError::CircuitOpen { retry_after }) => {
                Some(Duration::from_secs(
                    retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0),
                ))
            }
            Self::Denied(r) => r.retry_after,
            _ => None,
        }
    }
}

/// The response for a refusal: the only place an error becomes HTTP.
pub fn rescue(error: &ApiError, request_id: &str) -> Response<Full<Bytes>> {
    let status = error.status();
    let reason = error.reason();
    let problem = Problem {
        kind: format!("https://omnirelay.dev/problems/{reason}"),
        title: status.canonical_reason().unwrap_or("Error").to_string(),
        status: status.as_u16(),
        stage: error.stage().to_string(),
        reason,
        detail: error.detail(),
        request_id: request_id.to_string(),
    };
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"omnirelay\""),
        );
    }
    if let Some(after) = error.retry_after() {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(after.as_secs().max(1)),
        );
    }
    response
}
