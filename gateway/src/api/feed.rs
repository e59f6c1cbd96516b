//! What relying parties read to stop trusting revoked certificates before they expire: the CRLs
//! (`GET /v1/crl`: the active CA's, DER; `?ca=<fingerprint>` another CA's of the bundle; with
//! `Accept: application/x-pem-file` every CA's, PEM, one after the other) and the revocation feed
//! (`GET /v1/revocations?since=SEQ&wait=SECS`, long-polled: answered at once when entries
//! after `since` exist, else when one arrives or `wait` seconds pass). Both are public, like
//! the bundle, and under the per-client and global limits of their own door.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};

use super::{ApiError, body, json, rescue};
use crate::limits::Door;
use crate::revocation::{MAX_FEED_PAGE, MAX_FEED_WAIT};
use crate::state::Gateway;
use crate::wire::{Revocation, RevocationPage};

/// `GET /v1/crl[?ca=FINGERPRINT]`. The CRLs are signed again first when they are out of date
/// (a revocation on another path, a CA rotation, half their validity gone).
pub(super) async fn crl(
    gw: &Gateway,
    request: &Request<Incoming>,
    client_ip: IpAddr,
    request_id: &str,
) -> Response<Full<Bytes>> {
    match crl_response(gw, request, client_ip).await {
        Ok(response) => response,
        Err(error) => rescue(&error, request_id),
    }
}

async fn crl_response(
    gw: &Gateway,
    request: &Request<Incoming>,
    client_ip: IpAddr,
) -> Result<Response<Full<Bytes>>, ApiError> {
    gw.limits
        .check_client(Door::Feed, client_ip)
        .map_err(|l| super::join::limited(gw, l))?;
    let crls = gw
        .revocations
        .refresh(gw.store.as_ref(), &gw.trust())
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot sign the CRLs; serving the last ones");
            gw.revocations.current()
        });
    let wanted =
        match request.uri().query().unwrap_or("") {
            "" => None,
            query => Some(query.strip_prefix("ca=").ok_or_else(|| {
                ApiError::Malformed("the only parameter is ca=<fingerprint>".into())
            })?),
        };
    let wants_pem = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("pem"));
    let crl = match wanted {
        Some(ca) => crls.of(ca).ok_or(ApiError::NotFound)?,
        None => crls.active().ok_or(ApiError::NotFound)?,
    };
    let mut response = match (wants_pem, wanted) {
        (true, None) => body(StatusCode::OK, "application/x-pem-file", crls.pem()),
        (true, Some(_)) => body(StatusCode::OK, "application/x-pem-file", crl.pem.clone()),
        (false, _) => body(StatusCode::OK, "application/pkix-crl", crl.der.clone()),
    };
    // Caches may keep it a minute at most, and never past its next update.
    let max_age = crl.next_update.saturating_sub(gw.now_ms() / 1000);
    if let Ok(value) = header::HeaderValue::from_str(&format!("max-age={}", max_age.min(60))) {
        response.headers_mut().insert(header::CACHE_CONTROL, value);
    }
    Ok(response)
}

/// `GET /v1/revocations?since=SEQ&wait=SECS`.
pub(super) async fn revocations(
    gw: &Gateway,
    request: &Request<Incoming>,
    client_ip: IpAddr,
    request_id: &str,
) -> Response<Full<Bytes>> {
    match page(gw, request.uri().query().unwrap_or(""), client_ip).await {
        Ok(page) => json(StatusCode::OK, &page),
        Err(error) => rescue(&error, request_id),
    }
}

async fn page(gw: &Gateway, query: &str, client_ip: IpAddr) -> Result<RevocationPage, ApiError> {
    gw.limits
        .check_client(Door::Feed, client_ip)
        .map_err(|l| super::join::limited(gw, l))?;
    let (since, wait) = feed_query(query)?;
    let mut heads = gw.store.revocation_head();
    if wait > Duration::ZERO && *heads.borrow_and_update() <= since {
        // Nothing new yet: wait for the store to report a revocation past `since`, or time out
        // and answer an empty page (the client asks again).
        let _ = tokio::time::timeout(wait, heads.wait_for(|head| *head > since)).await;
    }
    let listed = gw.store.revocations_since(since, MAX_FEED_PAGE).await?;
    let next = listed.last().map_or(since, |r| r.seq);
    Ok(RevocationPage {
        revocations: listed
            .into_iter()
            .map(|r| Revocation {
                seq: r.seq,
                serial: r.serial,
                spiffe_id: r.spiffe_id,
                token_id: r.token_id,
                revoked_at: r.revoked_at,
                reason: r.reason,
                not_after: r.not_after,
            })
            .collect(),
        next,
    })
}

/// `since` (default 0) and `wait` (seconds, default 0, at most [`MAX_FEED_WAIT`]).
fn feed_query(query: &str) -> Result<(u64, Duration), ApiError> {
    let (mut since, mut wait) = (0, Duration::ZERO);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = || {
            value.parse::<u64>().map_err(|_| {
                ApiError::Malformed(format!("{key} must be a whole number, got {value:?}"))
            })
        };
        match key {
            "since" => since = number()?,
            "wait" => wait = Duration::from_secs(number()?).min(MAX_FEED_WAIT),
            other => {
                return Err(ApiError::Malformed(format!(
                    "unknown parameter {other:?} (since, wait)"
                )));
            }
        }
    }
    Ok((since, wait))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feed_query_reads_since_and_caps_wait() {
        assert_eq!(feed_query("").unwrap(), (0, Duration::ZERO));
        assert_eq!(
            feed_query("since=42&wait=5").unwrap(),
            (42, Duration::from_secs(5))
        );
        assert_eq!(feed_query("wait=3600").unwrap().1, MAX_FEED_WAIT);
        assert!(feed_query("since=-1").is_err());
        assert!(feed_query("since=1&limit=5").is_err());
    }
}
