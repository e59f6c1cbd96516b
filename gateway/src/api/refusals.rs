//! The audit side of refusals. A refusal before the token verified is only counted (a metric,
//! and the coalescer's next `refusals-coalesced` entry, written every interval by
//! [`flush_refusals`]); a refusal after it gets an entry of its own, written before the
//! response. Every reason either way is [`bounded`].

use std::net::IpAddr;

use super::{ApiError, JoinContext, bounded};
use crate::audit::{AuditEvent, Counted, Refused};
use crate::limits::ClientKey;
use crate::state::Gateway;

/// Counts a refusal that came before the token verified, for the next coalesced audit entry.
pub(super) fn count_unauthenticated(gw: &Gateway, client_ip: IpAddr, error: &ApiError) {
    let reason = bounded(&error.reason());
    gw.metrics.unauthenticated_refusal(error.stage(), &reason);
    let counted = gw.refusals.record(
        Refused {
            client: &ClientKey::of(client_ip).to_string(),
            stage: error.stage(),
            reason: &reason,
            status: error.status().as_u16(),
            now: gw.now_ms() / 1000,
        },
        || bounded(&error.detail()),
    );
    if counted == Counted::Overflow {
        gw.metrics.refusal_audit_overflow.inc();
    }
}

/// Writes the coalesced refusals counted so far to the audit. On failure they are kept for
/// the next attempt.
pub async fn flush_refusals(gw: &Gateway) {
    let events = gw.refusals.drain();
    if events.is_empty() {
        return;
    }
    if let Err(e) = gw.store.audit(events.clone()).await {
        tracing::error!(error = %e, "cannot audit coalesced refusals; keeping them for the next interval");
        gw.refusals.restore(events);
    }
}

/// Writes the refusal's audit entry (with any pending decision) before the response goes out.
/// Before the token verified, the refusal is only counted ([`count_unauthenticated`]): what an
/// unauthenticated client sends never makes a durable entry per request. Rate-limit refusals
/// of a token or cluster are audited once per key per window.
pub(super) async fn audit_refusal(
    gw: &Gateway,
    cx: JoinContext,
    client_ip: IpAddr,
    error: &ApiError,
) {
    if cx.audited {
        return;
    }
    if cx.token_id.is_none() {
        count_unauthenticated(gw, client_ip, error);
        return;
    }
    let mut events = cx.pending;
    // Refusals of a policy whose breaker is open are load shedding, like rate limits: the
    // opening itself is audited (`policy-circuit`), and then one refusal per token and window,
    // not one durable entry per fast-failed request.
    if let ApiError::PolicyFailed(crate::policy::PolicyError::CircuitOpen { .. }) = error {
        let key = cx.token_id.clone().unwrap_or_else(|| cx.client_ip.clone());
        if !gw
            .audited_limits
            .entry(format!("circuit-open:{key}"))
            .or_insert(())
            .is_fresh()
        {
            return;
        }
    }
    if let ApiError::RateLimited(limited) = error {
        let key = cx.token_id.clone().unwrap_or_else(|| cx.client_ip.clone());
        let marker = format!("{}:{key}", limited.scope.label());
        if !gw.audited_limits.entry(marker).or_insert(()).is_fresh() {
            return;
        }
        events.push(AuditEvent::RateLimited {
            scope: limited.scope.label().into(),
            key,
            client_ip: cx.client_ip,
        });
    } else if let Some((serial, spiffe_id)) = cx.renewal {
        events.push(AuditEvent::RenewRefused {
            request_id: cx.request_id,
            stage: error.stage().into(),
            status: error.status().as_u16(),
            reason: refusal_reason(error),
            serial,
            spiffe_id,
            token_id: cx.token_id,
            client_ip: cx.client_ip,
            policy: cx.policy,
        });
    } else {
        events.push(AuditEvent::JoinRefused {
            request_id: cx.request_id,
            stage: error.stage().into(),
            status: error.status().as_u16(),
            reason: refusal_reason(error),
            token_id: cx.token_id,
            cluster: cx.cluster,
            role: cx.role,
            node: cx.node,
            client_ip: cx.client_ip,
            policy: cx.policy,
        });
    }
    if let Err(e) = gw.store.audit(events).await {
        tracing::error!(error = %e, "cannot audit a refusal");
    }
}

/// Always "<reason code>: <explanation>", the code being the problem's `reason`. The operator's
/// reason goes to the audit log, never to the node.
pub(super) fn refusal_reason(error: &ApiError) -> String {
    bounded(&match error {
        ApiError::Denied(r) => format!("{}: {}", r.code, r.reason),
        other => format!("{}: {other}", other.reason()),
    })
}
