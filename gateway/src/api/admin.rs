//! The operator API, on its own listener (loopback by default): issue, list and revoke tokens,
//! list identities, follow policy versions and rotate the CA (`ca.rs`) with a bearer credential; `/metrics`, `/healthz` and `/readyz` without one (read-only, for
//! scrapers and load balancers).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use tracing::Instrument;

use super::{ApiError, body, json, parse_json, readyz, rescue};
use crate::audit::AuditEvent;
use crate::server::{Handler, Peer};
use crate::state::Gateway;
use crate::store::{
    IdentityFilter, IdentityState, MAX_LISTED, RevokeOrder, RevokeSummary, RevokeTarget,
    TokenRecord,
};
use crate::token::{Claims, TokenId};
use crate::wire::{
    IssueTokenRequest, IssueTokenResponse, LiftQuarantineRequest, LiftQuarantineResponse,
    PinRequest, ReloadResponse, RevokeIdentityRequest, RevokeRequest, RevokeResponse, UnpinRequest,
};

/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 16 << 10;

/// The operator API.
#[derive(Debug)]
pub struct AdminApi {
    gateway: Arc<Gateway>,
}

impl AdminApi {
    /// Serves `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

impl Handler for AdminApi {
    async fn handle(&self, request: Request<Incoming>, peer: Peer) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let request_id = uuid::Uuid::new_v4().simple().to_string();
        let gw = &self.gateway;
        let path = request.uri().path().to_string();
        let span = tracing::info_span!("admin", id = %request_id, method = %request.method(), %path, peer = %peer.addr);
        let result = async {
            match (request.method().clone(), path.as_str()) {
                (Method::GET, "/metrics") => {
                    refresh_gauges(gw).await;
                    let format = crate::metrics::Format::negotiate(
                        request
                            .headers()
                            .get(header::ACCEPT)
                            .and_then(|v| v.to_str().ok()),
                    );
                    Ok(body(
                        StatusCode::OK,
                        format.content_type(),
                        Bytes::from(gw.metrics.render(format)),
                    ))
                }
                (Method::GET, "/healthz") => Ok(body(
                    StatusCode::OK,
                    "text/plain",
                    Bytes::from_static(b"ok\n"),
                )),
                (Method::GET, "/readyz") => Ok(readyz(gw).await),
                (method, path) => {
                    authorize(gw, &request)?;
                    route(gw, method, path, request, &request_id, &peer).await
                }
            }
        }
        .instrument(span)
        .await;
        gw.metrics.request("admin", started.elapsed());
        result.unwrap_or_else(|e| rescue(&e, &request_id))
    }
}

async fn route(
    gw: &Gateway,
    method: Method,
    path: &str,
    request: Request<Incoming>,
    request_id: &str,
    peer: &Peer,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let token_revoke = path
        .strip_prefix("/admin/v1/tokens/")
        .and_then(|rest| rest.strip_suffix("/revoke"));
    match (method, path, token_revoke) {
        (Method::POST, "/admin/v1/tokens", _) => {
            let req: IssueTokenRequest = parse_json(&read(request).await?)?;
            Ok(json(StatusCode::CREATED, &issue(gw, req).await?))
        }
        (Method::GET, "/admin/v1/tokens", _) => {
            Ok(json(StatusCode::OK, &gw.store.list_tokens().await?))
        }
        (Method::GET, "/admin/v1/identities", _) => {
            let filter = identity_filter(request.uri().query().unwrap_or(""), now())?;
            Ok(json(
                StatusCode::OK,
                &gw.store.identities(filter, now()).await?,
            ))
        }
        (Method::POST, "/admin/v1/identities/issue", _) => {
            manual_issue(gw, request, request_id, peer).await
        }
        (Method::POST, _, Some(id)) => {
            let id = TokenId::parse(id)
                .map_err(|_| ApiError::Malformed(format!("{id:?} is not a token id")))?;
            let bytes = read(request).await?;
            let req: RevokeRequest = if bytes.is_empty() {
                RevokeRequest::default()
            } else {
                parse_json(&bytes)?
            };
            let summary = revoke(
                gw,
                request_id,
                RevokeTarget::Token(id),
                req.reason.unwrap_or_else(|| "unspecified".into()),
                req.revoked_by,
            )
            .await?;
            let status = if summary.found {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            };
            Ok(json(
                status,
                &RevokeResponse {
                    revoked: summary.found,
                },
            ))
        }
        (Method::POST, "/admin/v1/revoke", _) => {
            let req: RevokeIdentityRequest = parse_json(&read(request).await?)?;
            let target = match (req.token, req.spiffe_id, req.serial) {
                (Some(token), None, None) => RevokeTarget::Token(
                    TokenId::parse(&token)
                        .map_err(|_| ApiError::Malformed(format!("{token:?} is not a token id")))?,
                ),
                (None, Some(spiffe_id), None) => RevokeTarget::SpiffeId(
                    crate::identity::SpiffeId::parse(&spiffe_id)
                        .map_err(|e| ApiError::Malformed(format!("spiffe_id: {e}")))?
                        .to_string(),
                ),
                (None, None, Some(serial)) => RevokeTarget::Serial(
                    crate::identity::Serial::parse_hex(&serial)
                        .map_err(|e| ApiError::Malformed(format!("serial: {e}")))?
                        .to_string(),
                ),
                _ => {
                    return Err(ApiError::Malformed(
                        "name exactly one of token, spiffe_id, serial".into(),
                    ));
                }
            };
            if req.reason.trim().is_empty() {
                return Err(ApiError::Malformed("a reason is required".into()));
            }
            let summary = revoke(gw, request_id, target, req.reason, req.revoked_by).await?;
            let status = if summary.found {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            };
            Ok(json(status, &summary))
        }
        (Method::GET, "/admin/v1/quarantine", _) => {
            Ok(json(StatusCode::OK, &gw.store.quarantined(now()).await?))
        }
        (Method::POST, "/admin/v1/quarantine/lift", _) => {
            let req: LiftQuarantineRequest = parse_json(&read(request).await?)?;
            let by = req.by.unwrap_or_else(|| "admin-api".into());
            let lifted = gw.store.lift_quarantine(req.spiffe_id, by, now()).await?;
            let status = if lifted {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            };
            Ok(json(status, &LiftQuarantineResponse { lifted }))
        }
        (Method::GET, "/admin/v1/policy/status", _) => {
            Ok(json(StatusCode::OK, &reloader(gw)?.status()))
        }
        (Method::POST, "/admin/v1/policy/reload", _) => {
            let changed = reloader(gw)?.poll().await?;
            Ok(json(
                StatusCode::OK,
                &reload_response(gw, changed.is_some()),
            ))
        }
        (Method::POST, "/admin/v1/policy/pin", _) => {
            let req: PinRequest = parse_json(&read(request).await?)?;
            let by = req.by.unwrap_or_else(|| "admin-api".into());
            reloader(gw)?.pin(&req.target, &by).await?;
            Ok(json(StatusCode::OK, &reload_response(gw, true)))
        }
        (Method::GET, "/admin/v1/policy/shadow", _) => {
            let limit = shadow_limit(request.uri().query().unwrap_or(""))?;
            Ok(json(
                StatusCode::OK,
                &reloader(gw)?.shadow_report(limit).await?,
            ))
        }
        (Method::GET, "/admin/v1/decisions", _) => {
            let (since, after, limit) = decisions_query(request.uri().query().unwrap_or(""))?;
            Ok(json(
                StatusCode::OK,
                &gw.store.decisions(since, after, limit).await?,
            ))
        }
        (Method::POST, "/admin/v1/policy/promote", _) => {
            let bytes = read(request).await?;
            let req: UnpinRequest = if bytes.is_empty() {
                UnpinRequest::default()
            } else {
                parse_json(&bytes)?
            };
            let by = req.by.unwrap_or_else(|| "admin-api".into());
            reloader(gw)?.promote(&by).await?;
            Ok(json(StatusCode::OK, &reload_response(gw, true)))
        }
        (Method::POST, "/admin/v1/policy/unpin", _) => {
            let bytes = read(request).await?;
            let req: UnpinRequest = if bytes.is_empty() {
                UnpinRequest::default()
            } else {
                parse_json(&bytes)?
            };
            let by = req.by.unwrap_or_else(|| "admin-api".into());
            let changed = reloader(gw)?.unpin(&by).await?;
            Ok(json(
                StatusCode::OK,
                &reload_response(gw, changed.is_some()),
            ))
        }
        (method, path, _) if path == "/admin/v1/ca" || path.starts_with("/admin/v1/ca/") => {
            super::ca::route(gw, method, path, request).await
        }
        (_, "/admin/v1/tokens", _) | (_, _, Some(_)) => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound),
    }
}

/// An operator's manual issuance (`manual.rs`), audited whatever the outcome: the refusal's
/// entry is written before the error goes out through the one mapping.
async fn manual_issue(
    gw: &Gateway,
    request: Request<Incoming>,
    request_id: &str,
    peer: &Peer,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let mut mx = super::manual::ManualContext {
        cx: super::JoinContext {
            request_id: request_id.to_string(),
            client_ip: peer.addr.ip().to_string(),
            ..Default::default()
        },
        ..Default::default()
    };
    let outcome = match read(request).await {
        Ok(body) => super::manual::issue(gw, &mut mx, &body, peer.addr.ip()).await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(body) => {
            tracing::info!(spiffe_id = %mx.spiffe_id, "manual issuance");
            Ok(super::body(StatusCode::OK, "application/json", body))
        }
        Err(error) => {
            tracing::info!(stage = error.stage(), reason = %super::bounded(&error.reason()), "manual issuance refused");
            super::manual::audit_refusal(gw, mx, &error).await;
            Err(error)
        }
    }
}

/// Revokes, audited in the same transaction, then signs the CRL before answering: when the
/// operator's command returns, `/v1/crl` and the feed already carry what it revoked.
async fn revoke(
    gw: &Gateway,
    request_id: &str,
    target: RevokeTarget,
    reason: String,
    revoked_by: Option<String>,
) -> Result<RevokeSummary, ApiError> {
    let summary = gw
        .store
        .revoke(RevokeOrder {
            request_id: request_id.to_string(),
            target,
            reason: crate::api::bounded(&reason),
            revoked_by: revoked_by.unwrap_or_else(|| "admin-api".into()),
            quarantine: gw.identity.quarantine,
            now: now(),
        })
        .await?;
    if !summary.serials.is_empty()
        && let Err(e) = gw.revocations.refresh(gw.store.as_ref(), &gw.trust()).await
    {
        // The background publisher tries again; the revocation itself is durable.
        tracing::error!(error = %e, "cannot sign the CRL after a revocation");
    }
    Ok(summary)
}

/// The gauges that describe the present: the CRL's age and where live identities stand.
async fn refresh_gauges(gw: &Gateway) {
    let now = now();
    let m = &gw.metrics;
    let crls = gw.revocations.current();
    let (signed, next_update) = crls
        .active()
        .map_or((0, 0), |crl| (crl.this_update, crl.next_update));
    m.crl_age_seconds
        .set(i64::try_from(now.saturating_sub(signed)).unwrap_or(i64::MAX));
    m.crl_next_update
        .set(i64::try_from(next_update).unwrap_or(i64::MAX));
    match gw
        .store
        .expiry_summary(now, gw.identity.renew_remaining_percent)
        .await
    {
        Ok(summary) => {
            let soonest = summary.soonest.map_or(0, |t| t.saturating_sub(now));
            m.soonest_expiry_seconds
                .set(i64::try_from(soonest).unwrap_or(i64::MAX));
            m.identities_past_renewal
                .set(i64::try_from(summary.past_renewal).unwrap_or(i64::MAX));
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the identities for the metrics"),
    }
    m.audit_mirror_backlog
        .set(i64::try_from(gw.store.audit_backlog()).unwrap_or(i64::MAX));
}

/// The inventory filter from a query string: `token`, `spiffe_id`, `cluster`, `role`,
/// `policy_version`, `serial`, `state` (`live|expired|revoked`), `expires_within` (seconds from
/// now), `expires_after`/`expires_before` (Unix seconds), `limit`. Unknown keys are refused.
fn identity_filter(query: &str, now: u64) -> Result<IdentityFilter, ApiError> {
    let bad = |key: &str, why: &str| ApiError::Malformed(format!("query {key}: {why}"));
    let number = |key: &str, value: &str| {
        value
            .parse::<u64>()
            .map_err(|_| bad(key, "must be a non-negative integer"))
    };
    let mut filter = IdentityFilter::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(raw).ok_or_else(|| bad(key, "bad percent-encoding"))?;
        match key {
            "token" => {
                filter.token_id =
                    Some(TokenId::parse(&value).map_err(|_| bad(key, "not a token id"))?)
            }
            "spiffe_id" => filter.spiffe_id = Some(value),
            "cluster" => filter.cluster = Some(value),
            "role" => filter.role = Some(value),
            "policy_version" => filter.policy_version = Some(value),
            "serial" => filter.serial = Some(value.to_ascii_lowercase()),
            "state" => {
                filter.state = Some(
                    IdentityState::parse(&value)
                        .ok_or_else(|| bad(key, "must be live, expired or revoked"))?,
                )
            }
            "expires_within" => {
                filter.expires_before = Some(now.saturating_add(number(key, &value)?))
            }
            "expires_after" => filter.expires_after = Some(number(key, &value)?),
            "expires_before" => filter.expires_before = Some(number(key, &value)?),
            "limit" => {
                filter.limit = Some(
                    u32::try_from(number(key, &value)?)
                        .map_err(|_| bad(key, "too large"))?
                        .min(MAX_LISTED),
                )
            }
            other => return Err(bad(other, "unknown parameter")),
        }
    }
    Ok(filter)
}

/// Decodes `%XX` escapes and `+` (a space) of a query value; `None` on a broken escape or
/// bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hi = char::from(bytes.next()?).to_digit(16)?;
                let lo = char::from(bytes.next()?).to_digit(16)?;
                out.push(u8::try_from(hi * 16 + lo).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

fn reloader(gw: &Gateway) -> Result<&crate::reload::Reloader, ApiError> {
    gw.reloader.as_ref().ok_or(ApiError::NoPolicySource)
}

/// Most recorded decisions one page holds.
const MAX_DECISIONS_PAGE: u32 = 1000;

/// `since=UNIX_SECS&after=SEQ&limit=N` (defaults 0, 0, 1000; `limit` at most 1000).
fn decisions_query(query: &str) -> Result<(u64, u64, u32), ApiError> {
    let (mut since, mut after, mut limit) = (0, 0, MAX_DECISIONS_PAGE);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| ApiError::Malformed(format!("{key} must be a non-negative integer")))
        };
        match key {
            "since" => since = number()?,
            "after" => after = number()?,
            "limit" => {
                limit = u32::try_from(number()?)
                    .ok()
                    .filter(|n| (1..=MAX_DECISIONS_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::Malformed(format!("limit must be 1-{MAX_DECISIONS_PAGE}"))
                    })?;
            }
            other => return Err(ApiError::Malformed(format!("unknown parameter {other:?}"))),
        }
    }
    Ok((since, after, limit))
}

/// Most disagreements one report lists.
const MAX_SHADOW_REPORT: u32 = 1000;

/// `limit=N` (default 100, at most 1000).
fn shadow_limit(query: &str) -> Result<u32, ApiError> {
    let mut limit = 100;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "limit" => {
                limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_SHADOW_REPORT).contains(n))
                    .ok_or_else(|| {
                        ApiError::Malformed(format!("limit must be 1-{MAX_SHADOW_REPORT}"))
                    })?;
            }
            other => return Err(ApiError::Malformed(format!("unknown parameter {other:?}"))),
        }
    }
    Ok(limit)
}

fn reload_response(gw: &Gateway, changed: bool) -> ReloadResponse {
    ReloadResponse {
        result: if changed { "ok" } else { "unchanged" }.into(),
        active: gw.reloader.as_ref().and_then(|r| r.status().active),
    }
}

/// Signs a token and registers it (audited) before handing it out.
async fn issue(gw: &Gateway, req: IssueTokenRequest) -> Result<IssueTokenResponse, ApiError> {
    let max_ttl = gw.token.max_ttl.as_secs();
    if req.ttl_seconds == 0 || req.ttl_seconds > max_ttl {
        return Err(ApiError::Malformed(format!(
            "ttl_seconds must be between 1 and {max_ttl}"
        )));
    }
    let now = now();
    let claims = Claims {
        id: TokenId::random(),
        issuer: gw.token.issuer.clone(),
        audience: gw.trust_domain.to_string(),
        cluster: req.cluster,
        role: req.role,
        issued_at: now,
        not_before: now,
        expires_at: now + req.ttl_seconds,
        max_uses: req.max_uses,
        node: req.node,
        supersede: req.supersede,
    };
    claims
        .validate()
        .map_err(|e| ApiError::Malformed(e.to_string()))?;
    let token = gw.signer.sign(&claims);
    let event = AuditEvent::TokenIssued {
        token_id: claims.id.to_string(),
        cluster: claims.cluster.clone(),
        role: claims.role.clone(),
        max_uses: claims.max_uses,
        not_before: claims.not_before,
        expires_at: claims.expires_at,
        issued_by: req.issued_by.unwrap_or_else(|| "admin-api".into()),
        node: claims.node.clone(),
        supersede: claims.supersede,
    };
    let record = TokenRecord {
        id: claims.id,
        cluster: claims.cluster,
        role: claims.role,
        max_uses: claims.max_uses,
        uses: 0,
        not_before: claims.not_before,
        expires_at: claims.expires_at,
        issued_at: claims.issued_at,
        revoked_at: None,
    };
    gw.store.register_token(record, event).await?;
    Ok(IssueTokenResponse {
        token,
        id: claims.id.to_string(),
        expires_at: claims.expires_at,
    })
}

/// Bearer credential, compared in constant time.
fn authorize(gw: &Gateway, request: &Request<Incoming>) -> Result<(), ApiError> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    aws_lc_rs::constant_time::verify_slices_are_equal(
        presented.trim().as_bytes(),
        gw.admin_credential.as_bytes(),
    )
    .map_err(|_| ApiError::Unauthorized)
}

pub(super) async fn read(request: Request<Incoming>) -> Result<Bytes, ApiError> {
    Limited::new(request.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|_| ApiError::TooLarge(MAX_ADMIN_BODY))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inventory_query_is_parsed_and_checked() {
        let id = TokenId::random();
        let filter = identity_filter(
            &format!(
                "token={id}&spiffe_id=spiffe%3A%2F%2Fexample.org%2Fnode%2Fn1&state=live\
                 &serial=ABCD&expires_within=3600&limit=99999&cluster=edge+eu"
            ),
            1_000,
        )
        .unwrap();
        assert_eq!(filter.token_id, Some(id));
        assert_eq!(
            filter.spiffe_id.as_deref(),
            Some("spiffe://example.org/node/n1")
        );
        assert_eq!(filter.state, Some(IdentityState::Live));
        assert_eq!(filter.serial.as_deref(), Some("abcd"));
        assert_eq!(filter.expires_before, Some(4_600));
        assert_eq!(filter.limit, Some(MAX_LISTED));
        assert_eq!(filter.cluster.as_deref(), Some("edge eu"));
        assert_eq!(identity_filter("", 0).unwrap(), IdentityFilter::default());
        for bad in [
            "colour=red",
            "state=dead",
            "token=nope",
            "limit=-1",
            "expires_within=soon",
            "cluster=%zz",
            "cluster=%ff",
        ] {
            assert!(
                matches!(identity_filter(bad, 0), Err(ApiError::Malformed(_))),
                "{bad}"
            );
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            /// Any query string gets a filter or a 400, never a panic.
            #[test]
            fn arbitrary_queries_never_panic(query in ".{0,300}") {
                if let Err(e) = identity_filter(&query, u64::MAX) {
                    prop_assert!(matches!(e, ApiError::Malformed(_)));
                }
            }

            /// Percent-encoding every byte decodes back to the text.
            #[test]
            fn percent_decoding_inverts_encoding(text in ".{0,100}") {
                let encoded: String = text.bytes().map(|b| format!("%{b:02X}")).collect();
                prop_assert_eq!(percent_decode(&encoded), Some(text));
            }
        }
    }
}
