//! What to do after an exchange with the gateway failed: try again (transport failures, 429 and
//! 5xx, honouring `Retry-After`) or stop (every other refusal is final), and how long to wait
//! (capped exponential backoff with full jitter, the random sample injected so it is testable).

use std::time::Duration;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use http::StatusCode;

use crate::client::Reply;
use crate::wire::{JoinResponse, Problem};
use crate::{AgentError, GatewayClient};

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay bound.
    pub base: Duration,
    /// Largest delay.
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay before retry `attempt` (1-based): uniform in `[0, min(cap, base·2^(attempt-1))]`,
    /// or the server's `Retry-After` when it asked for longer. `unit` is a uniform sample in
    /// `[0, 1)`, injected so the schedule is testable.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(
                1u32.checked_shl(attempt.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(self.cap);
        let jittered = ceiling.mul_f64(unit.clamp(0.0, 1.0));
        match retry_after {
            Some(wait) => wait.min(self.cap).max(jittered),
            None => jittered,
        }
    }
}

/// How one attempt failed.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// Worth another try: why, and how long the gateway asked us to wait.
    Retry(String, Option<Duration>),
    /// Final.
    Fatal(AgentError),
}

/// A transport failure: worth another try.
pub(crate) fn transient(e: AgentError) -> Attempt {
    Attempt::Retry(e.to_string(), None)
}

/// 429 and 5xx are worth retrying (honouring Retry-After); other refusals are final.
pub(crate) fn classify(reply: &Reply) -> Attempt {
    let problem: Problem = serde_json::from_slice(&reply.body).unwrap_or_else(|_| Problem {
        kind: String::new(),
        title: String::new(),
        status: reply.status.as_u16(),
        stage: "unknown".into(),
        reason: "unexpected-response".into(),
        detail: String::from_utf8_lossy(&reply.body)
            .chars()
            .take(200)
            .collect(),
        request_id: String::new(),
    });
    let retry_after = reply
        .headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .map(Duration::from_secs);
    if reply.status == StatusCode::TOO_MANY_REQUESTS || reply.status.is_server_error() {
        Attempt::Retry(
            format!("HTTP {}: {}", problem.status, problem.detail),
            retry_after,
        )
    } else {
        Attempt::Fatal(AgentError::Refused(Box::new(problem)))
    }
}

/// One `POST` whose answer is an SVID (join, renew): transport failures and an unreadable
/// answer are worth another try, refusals are [`classify`]'d.
pub(crate) async fn post_for_svid(
    client: &GatewayClient,
    path: &str,
    body: Vec<u8>,
) -> Result<JoinResponse, Attempt> {
    let reply = client.post(path, body).await.map_err(transient)?;
    if reply.status != StatusCode::OK {
        return Err(classify(&reply));
    }
    serde_json::from_slice(&reply.body)
        .map_err(|e| transient(AgentError::Transport(format!("answer to {path}: {e}"))))
}

/// A uniform sample in `[0, 1)` from the system's random source (0.5 if it fails, which
/// only loses the jitter).
pub fn unit_sample() -> f64 {
    let mut bytes = [0u8; 8];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderMap;

    #[test]
    fn backoff_is_capped_exponential_with_full_jitter() {
        let b = Backoff {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
        };
        assert_eq!(
            b.delay(1, None, 0.999_999),
            Duration::from_millis(500).mul_f64(0.999_999)
        );
        assert_eq!(b.delay(2, None, 1.0), Duration::from_secs(1));
        assert_eq!(b.delay(3, None, 1.0), Duration::from_secs(2));
        assert_eq!(b.delay(3, None, 0.0), Duration::ZERO);
        assert_eq!(b.delay(3, None, 0.5), Duration::from_secs(1));
        assert_eq!(b.delay(20, None, 1.0), Duration::from_secs(30));
        assert_eq!(b.delay(200, None, 1.0), Duration::from_secs(30));
        // Growth: each ceiling doubles until the cap.
        let ceilings: Vec<_> = (1..=8).map(|a| b.delay(a, None, 1.0).as_millis()).collect();
        assert_eq!(ceilings, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
    }

    #[test]
    fn retry_after_is_honoured_but_capped() {
        let b = Backoff::default();
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(7)), 0.1),
            Duration::from_secs(7)
        );
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(3600)), 0.1),
            Duration::from_secs(30)
        );
        // A shorter Retry-After than the backoff's own draw does not shorten the wait.
        assert_eq!(
            b.delay(7, Some(Duration::from_secs(1)), 1.0),
            Duration::from_secs(30)
        );
    }

    fn reply(status: u16, headers: &[(&'static str, &str)], body: &str) -> Reply {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, value.parse().unwrap());
        }
        Reply {
            status: StatusCode::from_u16(status).unwrap(),
            headers: map,
            body: Bytes::from(body.to_string()),
        }
    }

    fn problem(status: u16, reason: &str) -> String {
        serde_json::json!({
            "type": "about:blank", "title": "x", "status": status, "stage": "renew",
            "reason": reason, "detail": "d", "request_id": "r1"
        })
        .to_string()
    }

    #[test]
    fn too_many_requests_and_server_errors_are_retried_with_their_retry_after() {
        let limited = reply(429, &[("retry-after", "7")], &problem(429, "rate-limited"));
        assert!(matches!(
            classify(&limited),
            Attempt::Retry(_, Some(d)) if d == Duration::from_secs(7)
        ));
        let busy = reply(503, &[("retry-after", " 2 ")], &problem(503, "busy"));
        assert!(matches!(
            classify(&busy),
            Attempt::Retry(_, Some(d)) if d == Duration::from_secs(2)
        ));
        let broken = reply(502, &[], "<html>bad gateway</html>");
        assert!(matches!(classify(&broken), Attempt::Retry(_, None)));
    }

    #[test]
    fn other_refusals_are_final_and_keep_the_gateways_reason() {
        let revoked = reply(403, &[], &problem(403, "identity-revoked"));
        match classify(&revoked) {
            Attempt::Fatal(AgentError::Refused(p)) => {
                assert_eq!((p.status, p.reason.as_str()), (403, "identity-revoked"))
            }
            other => panic!("{other:?}"),
        }
        let not_found = reply(404, &[], "no such route");
        match classify(&not_found) {
            Attempt::Fatal(AgentError::Refused(p)) => {
                assert_eq!(p.reason, "unexpected-response");
                assert_eq!(p.detail, "no such route");
            }
            other => panic!("{other:?}"),
        }
    }
}
