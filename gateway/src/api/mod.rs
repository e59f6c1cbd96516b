//! The HTTP API: routing, the per-request envelope (request id, tracing span, rate limits,
//! load shedding, body limit and deadlines, latency metric, refusal audit, paced refusals),
//! and the handlers.
//! The join pipeline itself reads top to bottom in `join::join`.
//!
//! A refusal before the token verified is counted (metric) and coalesced into one audit entry
//! per client, stage and reason per interval ([`flush_refusals`]); a refusal after it gets an
//! audit entry of its own, written before the response.

mod admin;
mod ca;
mod feed;
mod join;
mod manual;
mod pacing;
mod problem;
mod refusals;
mod renew;

/// The JSON bodies, re-exported where clients have always found them.
pub use crate::wire;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use tracing::Instrument;

pub use admin::AdminApi;
pub use problem::{ApiError, MAX_REASON_BYTES, bounded, rescue};
pub use refusals::flush_refusals;

use refusals::{audit_refusal, count_unauthenticated};

use crate::audit::AuditEvent;
use crate::limits::{ClientKey, Door};
use crate::server::{Handler, Peer};
use crate::state::Gateway;

/// Deepest JSON nesting accepted in a request body.
const MAX_JSON_DEPTH: usize = 16;

/// What is known about a join so far; the refusal audit entry is built from it.
#[derive(Debug, Default)]
pub(crate) struct JoinContext {
    pub request_id: String,
    pub client_ip: String,
    pub token_id: Option<String>,
    pub cluster: Option<String>,
    pub role: Option<String>,
    pub node: Option<String>,
    pub policy: Option<crate::audit::PolicyRef>,
    /// Events to commit with the refusal (the policy's decision).
    pub pending: Vec<AuditEvent>,
    /// The store already audited this outcome (refused inside the final transaction).
    pub audited: bool,
    /// For a renewal: the presented certificate's serial and SPIFFE ID, once it verified.
    pub renewal: Option<(String, String)>,
}

/// The node-facing API.
#[derive(Debug)]
pub struct NodeApi {
    gateway: Arc<Gateway>,
}

impl NodeApi {
    /// Serves `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

impl Handler for NodeApi {
    async fn handle(&self, request: Request<Incoming>, peer: Peer) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let request_id = uuid::Uuid::new_v4().simple().to_string();
        let route = node_route(request.method(), request.uri().path());
        let span = tracing::info_span!("request", id = %request_id, route = route.name(), token = tracing::field::Empty);
        let gw = &self.gateway;
        let response = async {
            match route {
                NodeRoute::Join => {
                    issue_endpoint(gw, Issuance::Join, request, &peer, &request_id).await
                }
                NodeRoute::Renew => {
                    issue_endpoint(gw, Issuance::Renew, request, &peer, &request_id).await
                }
                NodeRoute::Crl => feed::crl(gw, &request, peer.addr.ip(), &request_id).await,
                NodeRoute::Revocations => {
                    feed::revocations(gw, &request, peer.addr.ip(), &request_id).await
                }
                NodeRoute::Challenge => challenge_endpoint(gw, peer.addr.ip(), &request_id),
                NodeRoute::BundlePem => body(
                    StatusCode::OK,
                    "application/x-pem-file",
                    gw.trust().bundle_pem().clone(),
                ),
                NodeRoute::BundleSpiffe => body(
                    StatusCode::OK,
                    "application/json",
                    gw.trust().spiffe_bundle().clone(),
                ),
                NodeRoute::Healthz => {
                    body(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"))
                }
                NodeRoute::Readyz => readyz(gw).await,
                NodeRoute::WrongMethod => rescue(&ApiError::MethodNotAllowed, &request_id),
                NodeRoute::NotFound => rescue(&ApiError::NotFound, &request_id),
            }
        }
        .instrument(span)
        .await;
        gw.metrics.request(route.name(), started.elapsed());
        // Last layer: a refusal that says Retry-After waits here (its in-flight slots already
        // given back) for that long, at most `limits.refusal_hold`, so a client that retries
        // without waiting is paced instead of answered as fast as the gateway can refuse.
        pacing::pace(response, gw.refusal_hold, &gw.metrics).await
    }
}

#[derive(Debug, Clone, Copy)]
enum NodeRoute {
    Join,
    Renew,
    Crl,
    Revocations,
    Challenge,
    BundlePem,
    BundleSpiffe,
    Healthz,
    Readyz,
    WrongMethod,
    NotFound,
}

impl NodeRoute {
    fn name(self) -> &'static str {
        match self {
            Self::Join => "/v1/bootstrap/join",
            Self::Renew => "/v1/bootstrap/renew",
            Self::Crl => "/v1/crl",
            Self::Revocations => "/v1/revocations",
            Self::Challenge => "/v1/bootstrap/challenge",
            Self::BundlePem => "/v1/bundle",
            Self::BundleSpiffe => "/v1/bundle/spiffe",
            Self::Healthz => "/healthz",
            Self::Readyz => "/readyz",
            Self::WrongMethod | Self::NotFound => "other",
        }
    }
}

fn node_route(method: &Method, path: &str) -> NodeRoute {
    let (want, route) = match path {
        "/v1/bootstrap/join" => (Method::POST, NodeRoute::Join),
        "/v1/bootstrap/renew" => (Method::POST, NodeRoute::Renew),
        "/v1/crl" => (Method::GET, NodeRoute::Crl),
        "/v1/revocations" => (Method::GET, NodeRoute::Revocations),
        "/v1/bootstrap/challenge" => (Method::GET, NodeRoute::Challenge),
        "/v1/bundle" => (Method::GET, NodeRoute::BundlePem),
        "/v1/bundle/spiffe" => (Method::GET, NodeRoute::BundleSpiffe),
        "/healthz" => (Method::GET, NodeRoute::Healthz),
        "/readyz" => (Method::GET, NodeRoute::Readyz),
        _ => return NodeRoute::NotFound,
    };
    if *method == want {
        route
    } else {
        NodeRoute::WrongMethod
    }
}

/// Longest `/readyz` waits for the database to answer before reporting it unready.
const READY_STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What `/readyz` answers: ready when every check passes (a policy set is loaded, without
/// which every join is refused; the database answers, without which every join and renewal
/// is refused with 503).
#[derive(Debug, serde::Serialize)]
struct Readiness {
    ready: bool,
    checks: ReadyChecks,
}

#[derive(Debug, serde::Serialize)]
struct ReadyChecks {
    policy: ReadyCheck,
    store: ReadyCheck,
}

/// One check: whether it passes and, in words, what was found (the store's error itself goes
/// to the log only: `/readyz` needs no credential).
#[derive(Debug, serde::Serialize)]
struct ReadyCheck {
    ok: bool,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<&'static str>,
}

/// `/readyz`: 200 when ready, 503 otherwise, with a JSON body naming each check.
async fn readyz(gw: &Gateway) -> Response<Full<Bytes>> {
    let policy = match gw.policies.current() {
        Some(set) => ReadyCheck {
            ok: true,
            detail: format!("policy {} {}", set.bundle(), set.version()),
            backend: None,
        },
        None => ReadyCheck {
            ok: false,
            detail: "no policy loaded".into(),
            backend: None,
        },
    };
    let store = match tokio::time::timeout(READY_STORE_TIMEOUT, gw.store.ping()).await {
        Ok(Ok(())) => ReadyCheck {
            ok: true,
            detail: "the database answers".into(),
            backend: Some(gw.store.backend()),
        },
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readyz: the database does not answer");
            ReadyCheck {
                ok: false,
                detail: "the database does not answer".into(),
                backend: Some(gw.store.backend()),
            }
        }
        Err(_) => ReadyCheck {
            ok: false,
            detail: format!(
                "the database did not answer within {} s",
                READY_STORE_TIMEOUT.as_secs()
            ),
            backend: Some(gw.store.backend()),
        },
    };
    let ready = policy.ok && store.ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        &Readiness {
            ready,
            checks: ReadyChecks { policy, store },
        },
    )
}

/// A challenge nonce, under the same per-client and global limits as joins (buckets of its
/// own: a challenge flood cannot starve joins).
fn challenge_endpoint(gw: &Gateway, client_ip: IpAddr, request_id: &str) -> Response<Full<Bytes>> {
    match gw.limits.check_client(Door::Challenge, client_ip) {
        Ok(()) => json(StatusCode::OK, &gw.attestor.challenge(gw.now_ms())),
        Err(limited) => {
            let error = join::limited(gw, limited);
            count_unauthenticated(gw, client_ip, &error);
            rescue(&error, request_id)
        }
    }
}

/// Which issuing route a request came by: a join (token + attestation) or a renewal (the
/// current SVID as client certificate). Both share the envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Issuance {
    Join,
    Renew,
}

/// The envelope of a join or a renewal: run it under the request deadline, and audit and count
/// whatever the outcome.
async fn issue_endpoint(
    gw: &Gateway,
    issuance: Issuance,
    request: Request<Incoming>,
    peer: &Peer,
    request_id: &str,
) -> Response<Full<Bytes>> {
    let client_ip = peer.addr.ip();
    let mut cx = JoinContext {
        request_id: request_id.to_string(),
        client_ip: client_ip.to_string(),
        ..Default::default()
    };
    let deadline = gw.server.request_timeout;
    let outcome = tokio::time::timeout(
        deadline,
        admit_and_run(gw, &mut cx, issuance, request, peer),
    )
    .await
    .unwrap_or(Err(ApiError::SlowRequest(deadline)));
    let count = |label: &str| match issuance {
        Issuance::Join => gw.metrics.join(label),
        Issuance::Renew => gw.metrics.renewal(label),
    };
    match outcome {
        Ok(response) => {
            count("issued");
            body(StatusCode::OK, "application/json", response)
        }
        Err(error) => {
            count(error.stage());
            if let ApiError::Quarantined { .. } = error {
                gw.metrics.quarantine_refusals.inc();
            }
            tracing::info!(?issuance, stage = error.stage(), reason = %bounded(&error.reason()), status = error.status().as_u16(), "refused");
            audit_refusal(gw, cx, client_ip, &error).await;
            rescue(&error, request_id)
        }
    }
}

/// Admission, cheapest refusal first and the client's own share before the shared one: the
/// client's rate, then the global rate, the client's requests in flight, the gateway's; then the
/// body under its own deadline (so a slow body holds its slots that long only), then the
/// pipeline.
async fn admit_and_run(
    gw: &Gateway,
    cx: &mut JoinContext,
    issuance: Issuance,
    request: Request<Incoming>,
    peer: &Peer,
) -> Result<Bytes, ApiError> {
    let client_ip = peer.addr.ip();
    gw.limits
        .check_client(Door::Join, client_ip)
        .map_err(|l| join::limited(gw, l))?;
    let _client_slot = gw
        .in_flight_per_ip
        .try_acquire(ClientKey::of(client_ip))
        .map_err(|full| {
            gw.metrics.rate_limited("in-flight-ip");
            ApiError::ClientInFlight(full.cap)
        })?;
    let _slot = gw.in_flight.try_acquire().map_err(|_| {
        gw.metrics.shed.inc();
        ApiError::Shed
    })?;
    let body_deadline = gw.server.body_read_timeout;
    let body = tokio::time::timeout(body_deadline, read_body(request, gw.server.max_body_bytes))
        .await
        .map_err(|_| ApiError::SlowBody(body_deadline))??;
    match issuance {
        Issuance::Join => join::join(gw, cx, &body, client_ip).await,
        Issuance::Renew => {
            renew::renew(gw, cx, &body, peer.client_chain.as_deref(), client_ip).await
        }
    }
}

/// Reads a body of at most `max` bytes (refusing early on a larger Content-Length).
async fn read_body(request: Request<Incoming>, max: usize) -> Result<Bytes, ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(ApiError::TooLarge(max));
    }
    match Limited::new(request.into_body(), max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::TooLarge(max))
        }
        Err(e) => Err(ApiError::Malformed(format!("reading the body: {e}"))),
    }
}

/// Parses a JSON body after checking its nesting depth (serde's own limit is far deeper).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if json_depth(body) > MAX_JSON_DEPTH {
        return Err(ApiError::Malformed(format!(
            "JSON nested deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::Malformed(e.to_string()))
}

/// The deepest nesting of `[`/`{` outside strings.
fn json_depth(body: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

pub(crate) fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    body(
        status,
        "application/json",
        Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
    )
}

pub(crate) fn body(
    status: StatusCode,
    content_type: &'static str,
    bytes: Bytes,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::json_depth;

    #[test]
    fn json_depth_ignores_brackets_inside_strings() {
        assert_eq!(json_depth(br#"{"a": [1, {"b": 2}]}"#), 3);
        assert_eq!(json_depth(br#"{"a": "[[[[{{{{", "b": "\"]"}"#), 1);
        assert_eq!(json_depth(&[b'['; 100]), 100);
        assert_eq!(json_depth(b"42"), 0);
    }
}
