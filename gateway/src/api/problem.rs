//! Every way a request can be refused, and [`rescue`]: the one place errors become HTTP
//! responses (`application/problem+json` naming the stage and the reason). Every text a
//! refusal shows or audits goes through [`bounded`]: at most [`MAX_REASON_BYTES`] bytes, no
//! control characters, whatever the client or a policy put in it.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::Full;
use hyper::Response;

use crate::attest::AttestError;
use crate::identity::{ClientSvidError, CsrError, IdentityError, RotationError};
use crate::limits::Limited;
use crate::policy::{PolicyError, Refusal};
use crate::server::TlsError;
use crate::store::StoreError;
use crate::token::TokenError;
use crate::wire::Problem;

/// Longest `reason` or `detail` a refusal shows a client or writes to the audit, bytes.
pub const MAX_REASON_BYTES: usize = 256;

/// `text` without control characters (a terminal or a log viewer would act on them), cut to
/// at most [`MAX_REASON_BYTES`] bytes on a character boundary, ending in `…` when cut.
pub fn bounded(text: &str) -> String {
    const ELLIPSIS: char = '…';
    let kept = || text.chars().filter(|c| !c.is_control());
    if kept().map(char::len_utf8).sum::<usize>() <= MAX_REASON_BYTES {
        return kept().collect();
    }
    let mut out = String::with_capacity(MAX_REASON_BYTES);
    for c in kept() {
        if out.len() + c.len_utf8() + ELLIPSIS.len_utf8() > MAX_REASON_BYTES {
            break;
        }
        out.push(c);
    }
    out.push(ELLIPSIS);
    out
}

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
    /// Reading the body took longer than the body-read deadline.
    #[error("request body not received within {0:?}")]
    SlowBody(Duration),
    /// Too many requests are in flight; retry shortly.
    #[error("the gateway is busy")]
    Shed,
    /// This client already has as many joins in flight as one client may.
    #[error("this client already has {0} joins in flight")]
    ClientInFlight(u32),
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
    /// The token admits one named node and the request named another.
    #[error("this token admits only node {bound:?}")]
    NodeMismatch {
        /// The node the token is bound to.
        bound: String,
    },
    /// The SPIFFE ID the policy granted has a live identity from another join, and the token
    /// may not supersede it.
    #[error(
        "{spiffe_id} already has a live identity; a token issued with --supersede can replace it"
    )]
    IdentityInUse {
        /// The contested SPIFFE ID.
        spiffe_id: String,
    },
    /// The idempotency key was used before with a different CSR.
    #[error("idempotency key already used with a different CSR")]
    IdempotencyConflict,
    /// A renewal came without a client certificate.
    #[error("a renewal needs the current SVID as the TLS client certificate")]
    ClientCertificateRequired,
    /// The client certificate is not a valid SVID of ours.
    #[error(transparent)]
    ClientSvid(#[from] ClientSvidError),
    /// The client certificate verified but no identity with its serial is on record here.
    #[error("no identity with serial {0} is on record; join again")]
    IdentityUnknown(String),
    /// The identity (or its lineage) was revoked.
    #[error("this identity was revoked; join again with a new token")]
    IdentityRevoked,
    /// The SPIFFE ID is quarantined after a revocation.
    #[error("{spiffe_id} is quarantined after a revocation until {until} (Unix seconds)")]
    Quarantined {
        /// The SPIFFE ID.
        spiffe_id: String,
        /// When the quarantine ends, Unix seconds.
        until: u64,
        /// How long from now.
        retry_after: Duration,
    },
    /// The renewal's CSR reuses the current key and the policy did not permit it.
    #[error("the CSR reuses the key of the certificate being renewed; renew with a new key")]
    KeyReuse,
    /// A manual issuance for a SPIFFE ID under the gateway's reserved path.
    #[error("{0} is under the gateway's reserved path; it is never issued")]
    ReservedSpiffeId(String),
    /// A manual issuance for a SPIFFE ID that has no identity on record to continue.
    #[error("no identity with SPIFFE ID {0} is on record; the node must join with a token")]
    NoIdentityOnRecord(String),
    /// The policy allowed a manual issuance, but for another path than the one asked for.
    #[error("the policy would issue {granted}, not the SPIFFE ID asked for ({requested})")]
    ManualPathMismatch {
        /// The SPIFFE ID the operator asked for.
        requested: String,
        /// The path the policy granted.
        granted: String,
    },
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
    /// A CA rotation step was refused by the rotation's rules, or failed.
    #[error("CA rotation: {0}")]
    Rotation(#[from] RotationError),
    /// The serving certificate re-issued under a new CA could not be loaded.
    #[error("serving certificate: {0}")]
    ServingCert(#[from] TlsError),
}

impl From<crate::reload::PinError> for ApiError {
    fn from(e: crate::reload::PinError) -> Self {
        match e {
            crate::reload::PinError::Reload(e) => Self::Reload(e),
            crate::reload::PinError::NotShared(e) => Self::Store(e),
        }
    }
}

impl ApiError {
    /// The pipeline stage that refused.
    pub fn stage(&self) -> &'static str {
        match self {
            Self::Malformed(_) | Self::NotFound | Self::MethodNotAllowed => "request",
            Self::TooLarge(_) | Self::SlowRequest(_) | Self::SlowBody(_) | Self::Shed => {
                "transport"
            }
            Self::RateLimited(_) | Self::ClientInFlight(_) => "limits",
            Self::Token(_)
            | Self::TokenUnknown
            | Self::TokenRevoked
            | Self::TokenExhausted
            | Self::NodeMismatch { .. } => "token",
            Self::Csr(_) => "csr",
            Self::Attest(_) => "attestation",
            Self::EvidenceSchema(_) => "evidence-schema",
            Self::NoPolicy | Self::NoPolicyBinding | Self::Denied(_) | Self::PolicyFailed(_) => {
                "policy"
            }
            Self::Mint(_) => "mint",
            Self::Store(_) => "store",
            Self::IdempotencyConflict | Self::IdentityInUse { .. } => "record",
            Self::ClientCertificateRequired | Self::ClientSvid(_) => "client-certificate",
            Self::IdentityUnknown(_) | Self::IdentityRevoked | Self::Quarantined { .. } => {
                "identity"
            }
            Self::KeyReuse => "csr",
            Self::ReservedSpiffeId(_) => "request",
            Self::NoIdentityOnRecord(_) => "identity",
            Self::ManualPathMismatch { .. } => "policy",
            Self::Unauthorized => "admin",
            Self::NoPolicySource | Self::Reload(_) => "policy-reload",
            Self::Rotation(_) | Self::ServingCert(_) => "ca-rotation",
        }
    }

    /// A stable reason code.
    pub fn reason(&self) -> String {
        match self {
            Self::Malformed(_) => "malformed".into(),
            Self::TooLarge(_) => "too-large".into(),
            Self::SlowRequest(_) => "slow-request".into(),
            Self::SlowBody(_) => "slow-body".into(),
            Self::Shed => "overloaded".into(),
            Self::ClientInFlight(_) => "too-many-in-flight".into(),
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
            Self::NodeMismatch { .. } => "node-mismatch".into(),
            Self::IdentityInUse { .. } => "identity-in-use".into(),
            Self::ClientCertificateRequired => "client-certificate-required".into(),
            Self::ClientSvid(e) => e.reason().into(),
            Self::IdentityUnknown(_) => "unknown-identity".into(),
            Self::IdentityRevoked => "identity-revoked".into(),
            Self::Quarantined { .. } => "quarantined".into(),
            Self::KeyReuse => "key-reuse".into(),
            Self::ReservedSpiffeId(_) => "reserved-spiffe-id".into(),
            Self::NoIdentityOnRecord(_) => "no-identity-on-record".into(),
            Self::ManualPathMismatch { .. } => "policy-path-mismatch".into(),
            Self::NotFound => "not-found".into(),
            Self::MethodNotAllowed => "method-not-allowed".into(),
            Self::Unauthorized => "unauthorized".into(),
            Self::NoPolicySource => "no-policy-source".into(),
            Self::Reload(e) => e.label().into(),
            Self::Rotation(e) => e.reason().into(),
            Self::ServingCert(_) => "serving-certificate".into(),
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
            Self::Attest(A::NotThisDevice { .. }) => StatusCode::FORBIDDEN,
            Self::Attest(_) => StatusCode::UNAUTHORIZED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::SlowRequest(_) | Self::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
            // The client's own share is used up (429); 503 (`Shed`) means the gateway is.
            Self::RateLimited(_) | Self::ClientInFlight(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Token(_)
            | Self::TokenUnknown
            | Self::Unauthorized
            | Self::ClientCertificateRequired => StatusCode::UNAUTHORIZED,
            Self::ClientSvid(ClientSvidError::ForeignTrustDomain(_)) => StatusCode::FORBIDDEN,
            Self::ClientSvid(_) => StatusCode::UNAUTHORIZED,
            Self::IdentityUnknown(_)
            | Self::IdentityRevoked
            | Self::Quarantined { .. }
            | Self::KeyReuse
            | Self::ReservedSpiffeId(_)
            | Self::ManualPathMismatch { .. } => StatusCode::FORBIDDEN,
            Self::NoIdentityOnRecord(_) => StatusCode::NOT_FOUND,
            Self::TokenRevoked
            | Self::NoPolicyBinding
            | Self::Denied(_)
            | Self::NodeMismatch { .. } => StatusCode::FORBIDDEN,
            Self::TokenExhausted | Self::IdempotencyConflict | Self::IdentityInUse { .. } => {
                StatusCode::CONFLICT
            }
            Self::Shed | Self::NoPolicy | Self::PolicyFailed(_) | Self::Store(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Mint(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::NotFound | Self::NoPolicySource => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Reload(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Rotation(e) if e.is_refusal() => StatusCode::CONFLICT,
            Self::Rotation(_) | Self::ServingCert(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
            Self::Shed
            | Self::ClientInFlight(_)
            | Self::Store(_)
            | Self::PolicyFailed(PolicyError::Overloaded(_)) => Some(Duration::from_secs(1)),
            // Whole seconds, rounded up: a retry before the cooldown ends is refused again.
            Self::PolicyFailed(PolicyError::CircuitOpen { retry_after }) => {
                Some(Duration::from_secs(
                    retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0),
                ))
            }
            Self::Denied(r) => r.retry_after,
            Self::Quarantined { retry_after, .. } => Some(Duration::from_secs(
                retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0),
            )),
            _ => None,
        }
    }
}

/// The response for a refusal: the only place an error becomes HTTP. The reason and the detail
/// are [`bounded`].
pub fn rescue(error: &ApiError, request_id: &str) -> Response<Full<Bytes>> {
    let status = error.status();
    let reason = bounded(&error.reason());
    let problem = Problem {
        kind: format!("https://omnirelay.dev/problems/{reason}"),
        title: status.canonical_reason().unwrap_or("Error").to_string(),
        status: status.as_u16(),
        stage: error.stage().to_string(),
        reason,
        detail: bounded(&error.detail()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use proptest::prelude::*;

    #[test]
    fn bounded_strips_control_characters_and_cuts_on_a_character_boundary() {
        assert_eq!(
            bounded("unknown field `\u{1b}[31mred\u{7}\r\n`"),
            "unknown field `[31mred`"
        );
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(1000);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_REASON_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(cut.starts_with("éé"));
        // Exactly at the limit: nothing is cut.
        let exact = "a".repeat(MAX_REASON_BYTES);
        assert_eq!(bounded(&exact), exact);
        let over = "a".repeat(MAX_REASON_BYTES + 1);
        let cut = bounded(&over);
        assert_eq!(cut.len(), MAX_REASON_BYTES);
        assert!(cut.ends_with("a…"));
    }

    fn errors(text: String, more: Vec<String>, secs: u64) -> Vec<ApiError> {
        vec![
            ApiError::Malformed(text.clone()),
            ApiError::EvidenceSchema(more.clone()),
            ApiError::Denied(Refusal {
                code: text.clone(),
                reason: more.join(" "),
                node_message: Some(text.clone()),
                retry_after: Some(Duration::from_secs(secs)),
            }),
            ApiError::Denied(Refusal {
                code: text,
                reason: String::new(),
                node_message: None,
                retry_after: None,
            }),
            ApiError::TooLarge(secs as usize),
            ApiError::SlowBody(Duration::from_secs(secs)),
            ApiError::ClientInFlight(secs as u32),
            ApiError::RateLimited(Limited {
                scope: crate::limits::Scope::Ip,
                retry_after: Duration::from_secs(secs),
            }),
        ]
    }

    fn body_of(response: Response<Full<Bytes>>) -> Bytes {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let collected = runtime.block_on(response.into_body().collect());
        collected.unwrap().to_bytes()
    }

    proptest! {
        #[test]
        fn rescue_renders_valid_bounded_problem_json_for_any_text(
            text in any::<String>(),
            more in proptest::collection::vec(any::<String>(), 0..4),
            huge in 0usize..70_000,
            secs in any::<u32>(),
        ) {
            let text = format!("{text}{}", "\u{1}x".repeat(huge / 2));
            for error in errors(text, more.clone(), u64::from(secs)) {
                let response = rescue(&error, "req-1");
                let status = response.status();
                prop_assert_eq!(status, error.status());
                prop_assert_eq!(
                    response.headers().get(header::CONTENT_TYPE).unwrap(),
                    "application/problem+json"
                );
                if let Some(after) = response.headers().get(header::RETRY_AFTER) {
                    prop_assert!(after.to_str().unwrap().parse::<u64>().unwrap() >= 1);
                }
                let problem: Problem = serde_json::from_slice(&body_of(response)).unwrap();
                prop_assert_eq!(problem.status, status.as_u16());
                prop_assert_eq!(problem.request_id.as_str(), "req-1");
                for shown in [&problem.detail, &problem.reason] {
                    prop_assert!(shown.len() <= MAX_REASON_BYTES, "{} bytes", shown.len());
                    prop_assert!(!shown.chars().any(char::is_control), "{shown:?}");
                }
            }
        }
    }
}
