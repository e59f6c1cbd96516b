//! Paced refusals: a node-API answer that tells the client to wait (it carries `Retry-After`:
//! a rate limit, a full in-flight cap, a policy whose breaker is open, the store unavailable)
//! is held for that wait, at most `limits.refusal_hold`, before it goes out, and its
//! `Retry-After` then says what is left. A client that honours `Retry-After` loses nothing: it
//! would have waited anyway, now part of the wait is spent before the answer instead of after
//! it. A client that does not (a closed loop retrying at once) is paced to one refusal per
//! hold on each of its connections, instead of as many as the gateway can answer: measured,
//! eight such clients on kept-alive connections were refused ~20,000 times a second and took
//! the CPU other clusters' joins needed. HAProxy's `tarpit` and Postfix's
//! `smtpd_error_sleep_time` answer abusive clients the same way.
//!
//! What a held answer holds is its connection and nothing else: the envelope gave its
//! in-flight slots back when the refusal was decided, so held refusals never shed or delay
//! anyone else's request. HTTP/1.1 has at most one request in flight per connection, so at
//! most one answer is held per connection: the connection caps (`server.max_connections_per_ip`,
//! `server.max_connections`) bound how many are held at once, and with them the memory (a
//! rendered refusal of a few hundred bytes and a timer each). Nor does holding give a client a
//! way to keep a connection that it did not have: an idle connection keeps its slot for the
//! header-read deadline (5 s by default), longer than the default hold. The request-latency
//! histogram is recorded before the hold: it measures the gateway's work, not the pacing.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, header};
use http_body_util::Full;
use hyper::Response;

use crate::metrics::Metrics;

/// Holds `response` for the wait its `Retry-After` names, at most `max_hold`, then rewrites
/// the header to what is left of the wait. Answers without `Retry-After` (successes, and
/// refusals a wait would not change) go out at once.
pub(super) async fn pace(
    mut response: Response<Full<Bytes>>,
    max_hold: Duration,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    let Some(hold) = plan(&response, max_hold) else {
        return response;
    };
    metrics.refusals_held.inc();
    let _holding = Holding::start(metrics);
    // The hold itself (the point of pacing), not a wait for something to happen.
    tokio::time::sleep(hold.hold).await;
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(hold.left_secs));
    response
}

/// How long one answer is held, and the `Retry-After` it goes out with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hold {
    hold: Duration,
    /// Whole seconds still to wait after the hold, at least one: `Retry-After: 0` would
    /// invite an immediate retry.
    left_secs: u64,
}

/// The hold for an answer, if it carries a `Retry-After` (in seconds, as `rescue` writes it)
/// and holding is on.
fn plan(response: &Response<Full<Bytes>>, max_hold: Duration) -> Option<Hold> {
    let after = response
        .headers()
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .parse::<u64>()
        .ok()?;
    let after = Duration::from_secs(after);
    let hold = after.min(max_hold);
    if hold.is_zero() {
        return None;
    }
    let left = after - hold;
    let left_secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    Some(Hold {
        hold,
        left_secs: left_secs.max(1),
    })
}

/// One answer being held, in the `bootstrap_refusals_holding` gauge until it is sent (or the
/// client went away and the request was dropped).
#[derive(Debug)]
struct Holding<'m>(&'m Metrics);

impl<'m> Holding<'m> {
    fn start(metrics: &'m Metrics) -> Self {
        metrics.refusals_holding.inc();
        Self(metrics)
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.refusals_holding.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn answer(retry_after: Option<&str>) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        if let Some(after) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_str(after).unwrap());
        }
        response
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn an_answer_is_held_for_its_retry_after_at_most_the_cap() {
        // A breaker open for 600 s more: held one second, 599 left.
        assert_eq!(
            plan(&answer(Some("600")), SECOND),
            Some(Hold {
                hold: SECOND,
                left_secs: 599
            })
        );
        // A rate limit's one second: held the whole second; a retry could pass at once, but
        // the header never says 0.
        assert_eq!(
            plan(&answer(Some("1")), SECOND),
            Some(Hold {
                hold: SECOND,
                left_secs: 1
            })
        );
        // A cap longer than the wait: held the wait.
        assert_eq!(
            plan(&answer(Some("3")), Duration::from_secs(10)),
            Some(Hold {
                hold: Duration::from_secs(3),
                left_secs: 1
            })
        );
        // Sub-second caps leave a fraction, rounded up.
        assert_eq!(
            plan(&answer(Some("2")), Duration::from_millis(500)),
            Some(Hold {
                hold: Duration::from_millis(500),
                left_secs: 2
            })
        );
    }

    #[test]
    fn answers_without_a_wait_or_with_holding_off_go_out_at_once() {
        assert_eq!(plan(&answer(None), SECOND), None);
        assert_eq!(plan(&answer(Some("0")), SECOND), None);
        assert_eq!(plan(&answer(Some("30")), Duration::ZERO), None);
        // An HTTP date is not what `rescue` writes; left alone.
        assert_eq!(
            plan(&answer(Some("Wed, 21 Oct 2026 07:28:00 GMT")), SECOND),
            None
        );
    }

    #[tokio::test]
    async fn a_held_answer_goes_out_with_what_is_left_and_is_counted() {
        let metrics = Metrics::new();
        let sent = pace(answer(Some("2")), Duration::from_millis(1), &metrics).await;
        assert_eq!(sent.headers()[header::RETRY_AFTER], "2");
        assert_eq!(metrics.refusals_held.get(), 1);
        assert_eq!(metrics.refusals_holding.get(), 0);
        let at_once = pace(answer(None), SECOND, &metrics).await;
        assert!(at_once.headers().get(header::RETRY_AFTER).is_none());
        assert_eq!(metrics.refusals_held.get(), 1);
    }
}
