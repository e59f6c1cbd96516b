//! The operator's CA rotation on the admin listener: `GET /admin/v1/ca` (status) and
//! `POST /admin/v1/ca/{prepare,activate,retire}`. Each step plans the change, checks what
//! must hold first, writes the new state, audits it, and only then puts it in force; when the
//! audit entry cannot be written the state file is put back and nothing changed.
//!
//! What must hold: `activate` re-issues the gateway's serving certificate under the new CA
//! when the CA it replaces issued it (so that retiring that CA later cannot cut nodes off the
//! gateway); `retire` refuses while a certificate the retiring CA issued is unrevoked and
//! unexpired (unless forced, which is audited) and, forced or not, while the serving
//! certificate chains only to the retiring CA.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper::Response;
use hyper::body::Incoming;

use super::{ApiError, json, parse_json};
use crate::audit::AuditEvent;
use crate::identity::{
    CaStatus, Change, Plan, RotationError, RotationRequest, issued_by, reissue_server_cert,
};
use crate::secrets;
use crate::server::certified_key;
use crate::state::Gateway;

/// Routes `/admin/v1/ca` and below.
pub(super) async fn route(
    gw: &Gateway,
    method: Method,
    path: &str,
    request: hyper::Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let step = match (method, path) {
        (Method::GET, "/admin/v1/ca") => return Ok(json(StatusCode::OK, &status(gw).await)),
        (Method::POST, "/admin/v1/ca/prepare") => Step::Prepare,
        (Method::POST, "/admin/v1/ca/activate") => Step::Activate,
        (Method::POST, "/admin/v1/ca/retire") => Step::Retire,
        (
            _,
            "/admin/v1/ca"
            | "/admin/v1/ca/prepare"
            | "/admin/v1/ca/activate"
            | "/admin/v1/ca/retire",
        ) => return Err(ApiError::MethodNotAllowed),
        _ => return Err(ApiError::NotFound),
    };
    let bytes = super::admin::read(request).await?;
    let req: RotationRequest = if bytes.is_empty() {
        RotationRequest::default()
    } else {
        parse_json(&bytes)?
    };
    match step {
        Step::Prepare => prepare(gw, req).await?,
        Step::Activate => activate(gw, req).await?,
        Step::Retire => retire(gw, req).await?,
    }
    Ok(json(StatusCode::OK, &status(gw).await))
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Prepare,
    Activate,
    Retire,
}

/// Every CA of the rotation, with the one the serving certificate chains to marked.
async fn status(gw: &Gateway) -> CaStatus {
    gw.rotation.begin().await.status(&gw.serving.leaf())
}

/// Generates the next CA and publishes it in the bundle.
async fn prepare(gw: &Gateway, req: RotationRequest) -> Result<(), ApiError> {
    let validity = match req.validity_seconds {
        Some(0) => {
            return Err(ApiError::Malformed(
                "validity_seconds must be at least 1".into(),
            ));
        }
        other => other.map(Duration::from_secs),
    };
    let change = gw.rotation.begin().await;
    let plan = change.prepare(&gw.trust_domain, validity, SystemTime::now())?;
    let event = AuditEvent::CaPrepared {
        fingerprint: plan.subject.fingerprint().to_string(),
        not_after: unix(plan.subject.not_after()),
        sequence: plan.set().sequence(),
        prepared_by: operator(req),
    };
    commit_audited(gw, change, plan, event).await?;
    Ok(())
}

/// Makes the prepared CA the signer; re-issues the serving certificate under it when the CA
/// it replaces issued the current one. The new certificate's files are written before the
/// state (it chains to a CA already in the bundle, so it is valid whatever happens next) and
/// served once the change is audited.
async fn activate(gw: &Gateway, req: RotationRequest) -> Result<(), ApiError> {
    let change = gw.rotation.begin().await;
    let plan = change.activate()?;
    let now = SystemTime::now();
    let leaf = gw.serving.leaf();
    let replaced = plan.replaced.clone();
    let mut serving = None;
    if let Some(old) = &replaced
        && issued_by(old, &leaf, now)
    {
        let (cert_pem, key_pem) =
            reissue_server_cert(&plan.subject, &leaf, now).map_err(RotationError::Identity)?;
        secrets::write(&gw.server.tls_key, key_pem.as_bytes()).map_err(RotationError::from)?;
        secrets::write_file(&gw.server.tls_cert, cert_pem.as_bytes(), 0o644)
            .map_err(RotationError::from)?;
        serving = Some(certified_key(&gw.server.tls_cert, &gw.server.tls_key)?);
    }
    let event = AuditEvent::CaActivated {
        fingerprint: plan.subject.fingerprint().to_string(),
        previous: replaced
            .as_ref()
            .map(|ca| ca.fingerprint().to_string())
            .unwrap_or_default(),
        sequence: plan.set().sequence(),
        serving_reissued: serving.is_some(),
        activated_by: operator(req),
    };
    commit_audited(gw, change, plan, event).await?;
    if let Some(pair) = serving {
        gw.serving.replace(pair);
        tracing::info!(cert = %gw.server.tls_cert.display(), "serving certificate re-issued under the new CA");
    }
    Ok(())
}

/// Drops the previous CA from the bundle once nothing it issued is live (or when forced) and
/// the serving certificate chains to a CA that stays.
async fn retire(gw: &Gateway, req: RotationRequest) -> Result<(), ApiError> {
    let change = gw.rotation.begin().await;
    let plan = change.retire()?;
    let fingerprint = plan.subject.fingerprint().to_string();
    let now = SystemTime::now();
    let live_until = gw
        .store
        .latest_live_expiry(&fingerprint, plan.subject_is_configured, unix(now))
        .await?;
    if let Some(until) = live_until
        && !req.force
    {
        return Err(RotationError::LeavesAlive { fingerprint, until }.into());
    }
    let leaf = gw.serving.leaf();
    if issued_by(&plan.subject, &leaf, now) && plan.set().issuer_of(&leaf).is_none() {
        return Err(RotationError::ServingCertificate { fingerprint }.into());
    }
    let event = AuditEvent::CaRetired {
        fingerprint,
        sequence: plan.set().sequence(),
        forced: live_until.is_some(),
        live_until,
        retired_by: operator(req),
    };
    commit_audited(gw, change, plan, event).await?;
    Ok(())
}

/// Writes the planned state, audits it (putting the old state back if the entry cannot be
/// written), then puts the new set in force and publishes it in the metrics.
async fn commit_audited(
    gw: &Gateway,
    change: Change<'_>,
    plan: Plan,
    event: AuditEvent,
) -> Result<(), ApiError> {
    let kind = event.kind();
    let committed = change.commit(plan)?;
    if let Err(error) = gw.store.audit(vec![event]).await {
        if let Err(undo) = committed.undo() {
            tracing::error!(%undo, "CA rotation: the audit failed and the old state could not be put back; the new one applies at the next start");
        }
        return Err(error.into());
    }
    let set = committed.install();
    gw.metrics.trust(&set);
    tracing::info!(
        step = kind,
        sequence = set.sequence(),
        active = set.active().fingerprint(),
        "CA rotation"
    );
    Ok(())
}

fn operator(req: RotationRequest) -> String {
    req.by.unwrap_or_else(|| "admin-api".into())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
