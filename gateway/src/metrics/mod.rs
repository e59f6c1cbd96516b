//! Prometheus metrics: one registry per process, typed handles for every series, rendered at
//! `/metrics` in OpenMetrics text (to a scraper that asks for it, as Prometheus does) or in the
//! Prometheus text format 0.0.4 (to everything else). Series names start with `bootstrap_`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label: an outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `issued`, or the stage that refused.
    pub result: String,
}

/// Label: an HTTP route.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// The route template, e.g. `/v1/bootstrap/join`.
    pub route: &'static str,
}

/// Label: a rate-limit scope.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabel {
    /// `global`, `ip`, `token`, `cluster` or `in-flight-ip` for rate limits; `global` or
    /// `per-ip` for connection caps.
    pub scope: &'static str,
}

/// Label: why a request was refused before its token verified.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabel {
    /// The refusing stage (`transport`, `request`, `limits`, `token`).
    pub stage: &'static str,
    /// The problem's reason code (a fixed set: none of these come from a client or a policy).
    pub reason: String,
}

/// Label: a policy outcome or failure kind.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `allow`, `deny`, or a `PolicyError::kind` for failures.
    pub outcome: String,
}

/// Label: a policy, by its configured name.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    /// The policy's name.
    pub policy: String,
}

/// Label: the active policy bundle version.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BundleLabel {
    /// Bundle name.
    pub bundle: String,
    /// Version.
    pub version: String,
    /// Git commit.
    pub commit: String,
}

/// Label: a CA of the trust bundle.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaLabel {
    /// SHA-256 of the CA certificate, hex.
    pub ca: String,
    /// `active`, `prepared` or `previous`.
    pub state: &'static str,
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Joins by outcome.
    pub joins: Family<ResultLabel, Counter>,
    /// Request latency by route, seconds.
    pub request_seconds: Family<RouteLabel, Histogram>,
    /// Policy evaluation latency, seconds.
    pub policy_seconds: Histogram,
    /// Policy decisions by outcome; failures (fail-closed) are labelled by kind.
    pub policy_outcomes: Family<OutcomeLabel, Counter>,
    /// Requests refused by a rate limit, by scope.
    pub rate_limited: Family<ScopeLabel, Counter>,
    /// Token uses consumed.
    pub token_uses: Counter,
    /// Requests shed because too many were in flight.
    pub shed: Counter,
    /// Refusals held for their `Retry-After` before they were sent (`api::pacing`).
    pub refusals_held: Counter,
    /// Refusals being held now.
    pub refusals_holding: Gauge,
    /// Connections currently open.
    pub connections: Gauge,
    /// Connections closed at accept because a cap was reached, by scope (`per-ip`, `global`).
    pub connections_refused: Family<ScopeLabel, Counter>,
    /// Join and challenge refusals before the token verified, by stage and reason (audited
    /// coalesced, so this is where each one is counted).
    pub unauthenticated_refusals: Family<RefusalLabel, Counter>,
    /// Unauthenticated refusals counted in the audit's overflow entry because too many
    /// distinct clients were refused within one interval.
    pub refusal_audit_overflow: Counter,
    /// Policy reload attempts by result.
    pub policy_reloads: Family<ResultLabel, Counter>,
    /// Shadow evaluations of the candidate policy version: `agree`, `disagree`, `error`.
    pub policy_shadow: Family<ResultLabel, Counter>,
    /// Shadow evaluations not run because the shadow queue was full.
    pub policy_shadow_dropped: Counter,
    /// 1 for the active policy bundle version, 0 for those it replaced.
    pub policy_active: Family<BundleLabel, Gauge>,
    /// Times a policy's circuit breaker opened, by policy.
    pub policy_circuit_opened: Family<PolicyLabel, Counter>,
    /// A policy's breaker state after its last transition: 0 closed, 1 open, 2 half-open.
    pub policy_circuit_state: Family<PolicyLabel, Gauge>,
    /// Renewals by outcome.
    pub renewals: Family<ResultLabel, Counter>,
    /// Identities revoked (by an operator, or superseded by a join).
    pub revocations: Counter,
    /// Joins and renewals refused because their SPIFFE ID is quarantined.
    pub quarantine_refusals: Counter,
    /// Identities an operator issued by hand (`omnirelay identities issue`).
    pub manual_issuances: Counter,
    /// Seconds since the CRL in force was signed (set at each scrape).
    pub crl_age_seconds: Gauge,
    /// nextUpdate (Unix seconds) of the active CA's CRL, 0 when none is signed (set at each
    /// scrape).
    pub crl_next_update: Gauge,
    /// Seconds until the soonest expiry among live identities (set at each scrape; absent
    /// series value 0 when there is none).
    pub soonest_expiry_seconds: Gauge,
    /// Live identities past their renewal point and not renewed (set at each scrape).
    pub identities_past_renewal: Gauge,
    /// The SPIFFE bundle sequence served (`spiffe_sequence`).
    pub trust_bundle_sequence: Gauge,
    /// notAfter (Unix seconds) of each CA in the trust bundle, by CA and state.
    pub ca_not_after: Family<CaLabel, Gauge>,
    /// Committed audit entries not yet in the audit file (set at each scrape).
    pub audit_mirror_backlog: Gauge,
    last_active: std::sync::Mutex<Option<BundleLabel>>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 50 µs … ~3.3 s
    exponential_buckets(50e-6, 2.0, 17)
}

impl Metrics {
    /// A registry with every series registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let joins = Family::<ResultLabel, Counter>::default();
        registry.register("bootstrap_joins", "Join requests by result", joins.clone());
        let request_seconds = Family::<RouteLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "bootstrap_request_duration_seconds",
            "Request latency by route",
            request_seconds.clone(),
        );
        let policy_seconds = Histogram::new(exponential_buckets(2e-6, 2.0, 16));
        registry.register(
            "bootstrap_policy_evaluation_duration_seconds",
            "Policy evaluation latency, fresh instance included",
            policy_seconds.clone(),
        );
        let policy_outcomes = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "bootstrap_policy_outcomes",
            "Policy decisions (allow, deny) and fail-closed errors by kind",
            policy_outcomes.clone(),
        );
        let rate_limited = Family::<ScopeLabel, Counter>::default();
        registry.register(
            "bootstrap_rate_limited",
            "Requests refused by a rate limit",
            rate_limited.clone(),
        );
        let token_uses = Counter::default();
        registry.register(
            "bootstrap_token_uses",
            "Token uses consumed",
            token_uses.clone(),
        );
        let shed = Counter::default();
        registry.register(
            "bootstrap_requests_shed",
            "Requests refused with 503 because too many were in flight",
            shed.clone(),
        );
        let refusals_held = Counter::default();
        registry.register(
            "bootstrap_refusals_held",
            "Refusals held for their Retry-After (at most limits.refusal_hold) before they were sent",
            refusals_held.clone(),
        );
        let refusals_holding = Gauge::default();
        registry.register(
            "bootstrap_refusals_holding",
            "Refusals being held now (at most one per open connection)",
            refusals_holding.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "bootstrap_open_connections",
            "TLS connections currently open",
            connections.clone(),
        );
        let connections_refused = Family::<ScopeLabel, Counter>::default();
        registry.register(
            "bootstrap_connections_refused",
            "Connections closed at accept because a cap was reached, by scope",
            connections_refused.clone(),
        );
        let unauthenticated_refusals = Family::<RefusalLabel, Counter>::default();
        registry.register(
            "bootstrap_unauthenticated_refusals",
            "Requests refused before their token verified, by stage and reason",
            unauthenticated_refusals.clone(),
        );
        let refusal_audit_overflow = Counter::default();
        registry.register(
            "bootstrap_refusal_audit_overflow",
            "Unauthenticated refusals audited in the overflow entry (too many distinct clients)",
            refusal_audit_overflow.clone(),
        );
        let policy_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "bootstrap_policy_reload",
            "Policy bundle reload attempts by result",
            policy_reloads.clone(),
        );
        let policy_shadow = Family::<ResultLabel, Counter>::default();
        registry.register(
            "bootstrap_policy_shadow",
            "Shadow evaluations of the candidate policy version against the active one's answer",
            policy_shadow.clone(),
        );
        let policy_shadow_dropped = Counter::default();
        registry.register(
            "bootstrap_policy_shadow_dropped",
            "Shadow evaluations dropped because the shadow queue was full",
            policy_shadow_dropped.clone(),
        );
        let policy_active = Family::<BundleLabel, Gauge>::default();
        registry.register(
            "bootstrap_policy_active",
            "The active policy bundle version (1) and the ones it replaced (0)",
            policy_active.clone(),
        );
        let policy_circuit_opened = Family::<PolicyLabel, Counter>::default();
        registry.register(
            "bootstrap_policy_circuit_open",
            "Times a policy's circuit breaker opened (its evaluations then fail fast)",
            policy_circuit_opened.clone(),
        );
        let policy_circuit_state = Family::<PolicyLabel, Gauge>::default();
        registry.register(
            "bootstrap_policy_circuit_state",
            "Policy circuit breaker state after its last transition: 0 closed, 1 open, 2 half-open",
            policy_circuit_state.clone(),
        );
        let renewals = Family::<ResultLabel, Counter>::default();
        registry.register(
            "bootstrap_renewals",
            "Renewal requests by result (`issued`, or the stage that refused), one per request",
            renewals.clone(),
        );
        let revocations = Counter::default();
        registry.register(
            "bootstrap_revocations",
            "Identities revoked (by an operator, or superseded by a join)",
            revocations.clone(),
        );
        let quarantine_refusals = Counter::default();
        registry.register(
            "bootstrap_quarantine_refusals",
            "Joins and renewals refused because their SPIFFE ID is quarantined",
            quarantine_refusals.clone(),
        );
        let manual_issuances = Counter::default();
        registry.register(
            "bootstrap_manual_issuances",
            "Identities an operator issued by hand (omnirelay identities issue)",
            manual_issuances.clone(),
        );
        let crl_age_seconds = Gauge::default();
        registry.register(
            "bootstrap_crl_age_seconds",
            "Seconds since the CRL in force was signed",
            crl_age_seconds.clone(),
        );
        let crl_next_update = Gauge::default();
        registry.register(
            "bootstrap_crl_next_update_timestamp_seconds",
            "nextUpdate of the active CA's CRL, Unix seconds (0 when none is signed)",
            crl_next_update.clone(),
        );
        let soonest_expiry_seconds = Gauge::default();
        registry.register(
            "bootstrap_soonest_expiry_seconds",
            "Seconds until the soonest expiry among live identities (0 when none is live)",
            soonest_expiry_seconds.clone(),
        );
        let identities_past_renewal = Gauge::default();
        registry.register(
            "bootstrap_identities_past_renewal_point",
            "Live identities past their renewal point that were not renewed",
            identities_past_renewal.clone(),
        );
        let trust_bundle_sequence = Gauge::default();
        registry.register(
            "bootstrap_trust_bundle_sequence",
            "The SPIFFE bundle sequence served; it increases with every CA rotation step",
            trust_bundle_sequence.clone(),
        );
        let ca_not_after = Family::<CaLabel, Gauge>::default();
        registry.register(
            "bootstrap_ca_not_after_seconds",
            "notAfter of each CA in the trust bundle, Unix seconds, by CA and rotation state",
            ca_not_after.clone(),
        );
        let audit_mirror_backlog = Gauge::default();
        registry.register(
            "bootstrap_audit_mirror_backlog_entries",
            "Committed audit entries not yet written to the audit file",
            audit_mirror_backlog.clone(),
        );
        Self {
            audit_mirror_backlog,
            crl_next_update,
            renewals,
            revocations,
            quarantine_refusals,
            manual_issuances,
            crl_age_seconds,
            soonest_expiry_seconds,
            identities_past_renewal,
            trust_bundle_sequence,
            ca_not_after,
            policy_circuit_opened,
            policy_circuit_state,
            policy_reloads,
            policy_shadow,
            policy_shadow_dropped,
            policy_active,
            last_active: std::sync::Mutex::new(None),
            registry,
            joins,
            request_seconds,
            policy_seconds,
            policy_outcomes,
            rate_limited,
            token_uses,
            shed,
            refusals_held,
            refusals_holding,
            connections,
            connections_refused,
            unauthenticated_refusals,
            refusal_audit_overflow,
        }
    }

    /// Counts a connection closed at accept by the cap of `scope`.
    pub fn connections_refused(&self, scope: &'static str) {
        self.connections_refused
            .get_or_create(&ScopeLabel { scope })
            .inc();
    }

    /// Counts a refusal before the token verified.
    pub fn unauthenticated_refusal(&self, stage: &'static str, reason: &str) {
        self.unauthenticated_refusals
            .get_or_create(&RefusalLabel {
                stage,
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts a join outcome.
    pub fn join(&self, result: &str) {
        self.joins
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Counts a renewal outcome.
    pub fn renewal(&self, result: &str) {
        self.renewals
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Records a request's latency.
    pub fn request(&self, route: &'static str, took: Duration) {
        self.request_seconds
            .get_or_create(&RouteLabel { route })
            .observe(took.as_secs_f64());
    }

    /// Records a policy decision or failure.
    pub fn policy(&self, outcome: &str, took: Duration) {
        self.policy_seconds.observe(took.as_secs_f64());
        self.policy_outcomes
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts a rate-limit refusal.
    pub fn rate_limited(&self, scope: &'static str) {
        self.rate_limited.get_or_create(&ScopeLabel { scope }).inc();
    }

    /// Counts a policy reload attempt (`ok` or a failure label).
    pub fn policy_reload(&self, result: &str) {
        self.policy_reloads
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Exports the reload result `result` (at zero until one happens).
    pub fn policy_reload_seen(&self, result: &str) {
        let _ = self.policy_reloads.get_or_create(&ResultLabel {
            result: result.to_string(),
        });
    }

    /// Marks `bundle`/`version`/`commit` as the active policy version.
    pub fn policy_active(&self, bundle: &str, version: &str, commit: &str) {
        let active = BundleLabel {
            bundle: bundle.into(),
            version: version.into(),
            commit: commit.into(),
        };
        // The replaced version drops to 0; the family keeps one series per version this
        // process has loaded.
        let mut last = self.last_active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(previous) = last.take()
            && previous != active
        {
            self.policy_active.get_or_create(&previous).set(0);
        }
        self.policy_active.get_or_create(&active).set(1);
        *last = Some(active);
    }

    /// Records a circuit-breaker transition of `policy` into `state` (the gauge value); an
    /// opening also counts.
    pub fn policy_circuit(&self, policy: &str, state: i64, opened: bool) {
        let label = PolicyLabel {
            policy: policy.to_string(),
        };
        if opened {
            self.policy_circuit_opened.get_or_create(&label).inc();
        }
        self.policy_circuit_state.get_or_create(&label).set(state);
    }

    /// Describes the CA set in force: its sequence, and one series per CA in the bundle (a
    /// retired CA's series goes away).
    pub fn trust(&self, set: &crate::identity::CaSet) {
        self.trust_bundle_sequence
            .set(i64::try_from(set.sequence()).unwrap_or(i64::MAX));
        self.ca_not_after.clear();
        for member in set.cas() {
            let not_after = member
                .ca
                .not_after()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            let label = CaLabel {
                ca: member.ca.fingerprint().to_string(),
                state: member.state.label(),
            };
            self.ca_not_after.get_or_create(&label).set(not_after);
        }
    }

    /// Every series in `format`.
    pub fn render(&self, format: Format) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        match format {
            Format::OpenMetrics => out,
            Format::Text => openmetrics_to_text(&out),
        }
    }
}

/// The exposition formats `/metrics` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0 text: counters described without their `_total`, units, `# EOF`.
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (what `promtool check metrics` and most tools read).
    Text,
}

impl Format {
    /// The format a scraper's `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text` with a quality at least that of `text/plain`, the
    /// Prometheus text format otherwise (no header, `*/*`, `text/plain`).
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Format::Text;
        };
        let mut openmetrics: Option<f32> = None;
        let mut text: f32 = 0.0;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let quality = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
            match media.as_str() {
                "application/openmetrics-text" => {
                    openmetrics = Some(openmetrics.map_or(quality, |q| q.max(quality)));
                }
                "text/plain" | "text/*" | "*/*" => text = text.max(quality),
                _ => {}
            }
        }
        match openmetrics {
            Some(q) if q > 0.0 && q >= text => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Rewrites the OpenMetrics text the registry renders into the Prometheus text format 0.0.4: a
/// counter's `HELP` and `TYPE` name its `_total` series, `unknown` becomes `untyped`, and the
/// `UNIT` lines and the `# EOF` marker (which 0.0.4 does not have) go. Samples, label escaping
/// and histogram series are the same in both formats.
fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let suffix = if counters.contains(name) {
                "_total"
            } else {
                ""
            };
            out.push_str(&format!("# HELP {name}{suffix} {help}\n"));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            match kind {
                "counter" => out.push_str(&format!("# TYPE {name}_total counter\n")),
                "unknown" => out.push_str(&format!("# TYPE {name} untyped\n")),
                _ => out.push_str(&format!("# TYPE {name} {kind}\n")),
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_recorded_series() {
        let m = Metrics::new();
        m.join("issued");
        m.join("issued");
        m.join("token");
        m.rate_limited("ip");
        m.policy("allow", Duration::from_micros(12));
        m.connections_refused("per-ip");
        m.unauthenticated_refusal("request", "malformed");
        m.unauthenticated_refusal("request", "malformed");
        m.policy_circuit("spin", 1, true);
        let td = crate::identity::TrustDomain::parse("example.org").unwrap();
        let (cert, key) = crate::identity::Ca::generate(
            &td,
            Duration::from_secs(3600),
            std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        )
        .unwrap();
        let ca = crate::identity::Ca::load(&cert, &key).unwrap();
        let fingerprint = ca.fingerprint().to_string();
        m.trust(&crate::identity::CaSet::single(
            ca,
            Duration::from_secs(300),
        ));
        let text = m.render(Format::OpenMetrics);
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("bootstrap_trust_bundle_sequence 1"), "{text}");
        assert!(
            text.contains(&format!(
                "bootstrap_ca_not_after_seconds{{ca=\"{fingerprint}\",state=\"active\"}} 1700003600"
            )),
            "{text}"
        );
        assert!(
            text.contains("bootstrap_connections_refused_total{scope=\"per-ip\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "bootstrap_unauthenticated_refusals_total{stage=\"request\",reason=\"malformed\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("bootstrap_policy_circuit_open_total{policy=\"spin\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("bootstrap_policy_circuit_state{policy=\"spin\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("bootstrap_joins_total{result=\"issued\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("bootstrap_joins_total{result=\"token\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("bootstrap_rate_limited_total{scope=\"ip\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("bootstrap_policy_outcomes_total{outcome=\"allow\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("bootstrap_policy_evaluation_duration_seconds_count 1"),
            "{text}"
        );
    }

    #[test]
    fn the_text_format_names_counters_by_their_total_series_and_has_no_eof() {
        let m = Metrics::new();
        m.join("issued");
        m.request("join", Duration::from_millis(3));
        let text = m.render(Format::Text);
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("# UNIT"), "{text}");
        assert!(
            text.contains("# HELP bootstrap_joins_total Join requests by result.\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE bootstrap_joins_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("bootstrap_joins_total{result=\"issued\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE bootstrap_request_duration_seconds histogram\n"),
            "{text}"
        );
        assert!(
            text.contains("bootstrap_request_duration_seconds_count{route=\"join\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE bootstrap_open_connections gauge\n"),
            "{text}"
        );
    }

    #[test]
    fn the_format_follows_the_accept_header() {
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5")),
            Format::Text
        );
        assert_eq!(
            Format::OpenMetrics.content_type(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert_eq!(
            Format::Text.content_type(),
            "text/plain; version=0.0.4; charset=utf-8"
        );
    }
}
