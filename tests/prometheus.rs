//! Prometheus against the real gateway: the `/metrics` content type matches its body and a
//! scrape after a join, a renewal and a revocation passes `promtool check metrics` silently;
//! the alert rules of `examples/prometheus` pass their `promtool test rules` unit tests; and an
//! alert-noise drill with a real Prometheus server (scraping over HTTPS with the admin bearer
//! credential): a healthy fleet fires nothing, a refused policy version fires the reload alert,
//! a stopped gateway fires the renewal alert within its `for:` window.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is a failed test"
)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use omnirelay_e2e::bundles::{PolicyRepo, bundle_source, follow_repo};
use omnirelay_e2e::prometheus::{
    PROMETHEUS_ACCEPT, Prometheus, promtool, quick_rules, rules_dir, scrape,
};
use omnirelay_e2e::raw::{renew, renewed};
use omnirelay_e2e::{Gateway, NodeKey, TempDir, join_as, unix_now};

/// The value of `series` (name and labels as rendered) in an exposition.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_a_join_a_renewal_and_a_revocation_passes_promtool_check_metrics() {
    let gw = Gateway::start("promtool");
    let token = gw.issue_token("edge-eu", "relay", 2).await;
    let key = NodeKey::new("relay-1");
    let joined = join_as(&gw.node(), &token.token, "relay-1", &key).await;
    let next = NodeKey::new("relay-1");
    let renewal = renew(
        &gw,
        Some((&joined.certificate_chain, &key.key.serialize_pem())),
        &next.csr,
        None,
    )
    .await;
    let renewal = renewed(&renewal);
    gw.revoke(serde_json::json!({"serial": renewal.serial, "reason": "key-compromise"}))
        .await;

    // No Accept header (curl, promtool's users): the Prometheus text format 0.0.4.
    let text = scrape(&gw, None).await;
    assert_eq!(text.status, 200);
    assert_eq!(
        text.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let body = String::from_utf8(text.body.clone()).unwrap();
    assert!(!body.contains("# EOF"), "{body}");
    assert_eq!(
        value(&body, "bootstrap_renewals_total{result=\"issued\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "bootstrap_joins_total{result=\"issued\"}"),
        Some(1.0)
    );
    // One result per request: the families' sums are the requests (what the SLO rule divides by).
    for (family, requests) in [
        ("bootstrap_renewals_total{", 1.0),
        ("bootstrap_joins_total{", 1.0),
    ] {
        let sum: f64 = body
            .lines()
            .filter(|l| l.starts_with(family))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum();
        assert_eq!(sum, requests, "{family}: {body}");
    }
    assert!(value(&body, "bootstrap_revocations_total").unwrap() >= 1.0);
    assert!(
        value(&body, "bootstrap_crl_next_update_timestamp_seconds").unwrap() > unix_now() as f64,
        "{body}"
    );
    assert!(value(&body, "bootstrap_audit_mirror_backlog_entries").is_some());
    let checked = promtool(&["check", "metrics"], &rules_dir(), &text.body);
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics complained:\n{}{}\non\n{body}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // What Prometheus asks for: OpenMetrics, `# EOF` last, under its own content type.
    let openmetrics = scrape(&gw, Some(PROMETHEUS_ACCEPT)).await;
    assert_eq!(openmetrics.status, 200);
    assert_eq!(
        openmetrics.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let body = String::from_utf8(openmetrics.body).unwrap();
    assert!(body.ends_with("\n# EOF\n"), "{body}");
    assert!(
        body.contains("# TYPE bootstrap_renewals counter\n"),
        "{body}"
    );
    assert_eq!(
        value(&body, "bootstrap_renewals_total{result=\"issued\"}"),
        Some(1.0)
    );
}

#[test]
fn the_alert_rules_pass_their_promtool_unit_tests() {
    let checked = promtool(&["check", "rules", "alerts.yml"], &rules_dir(), b"");
    let out = String::from_utf8_lossy(&checked.stdout).into_owned()
        + &String::from_utf8_lossy(&checked.stderr);
    assert!(checked.status.success(), "{out}");
    assert!(out.contains("SUCCESS: 8 rules found"), "{out}");
    let tested = promtool(&["test", "rules", "alerts_test.yml"], &rules_dir(), b"");
    let out = String::from_utf8_lossy(&tested.stdout).into_owned()
        + &String::from_utf8_lossy(&tested.stderr);
    assert!(tested.status.success(), "{out}");
    // Every alert of the rules file has a unit test.
    let rules = std::fs::read_to_string(rules_dir().join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(rules_dir().join("alerts_test.yml")).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "{alert} has no unit test"
        );
    }
}

/// Asserts Prometheus holds no alert, firing or pending.
async fn quiet(prometheus: &Prometheus) {
    let data = prometheus.api("/api/v1/alerts").await;
    assert_eq!(
        data["alerts"],
        serde_json::json!([]),
        "a healthy fleet alerted: {data:#}"
    );
}

/// The drill's `for:` (every alert) and range windows: short, so that it runs in seconds.
const HOLD: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_noise_drill_with_a_real_prometheus() {
    let started = Instant::now();
    let repo = PolicyRepo::new("drill");
    let source = bundle_source("drill", "v1", 3600);
    repo.publish(&source.0, "1.0.0", None);
    let gw = Gateway::start_with("drill", |t| follow_repo(t, &repo.url(), ""));
    let prometheus = Prometheus::start(&gw, &quick_rules("3s", "10s")).await;

    // Prometheus reaches the gateway over HTTPS, with the reload results exported at zero.
    let deadline = Instant::now() + Duration::from_secs(30);
    while prometheus
        .query(r#"bootstrap_policy_reload_total{job="omnirelay",result="digest_mismatch"} == 0"#)
        .await
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped the gateway: {:?}",
            prometheus.query("up").await
        );
        tokio::time::sleep(omnirelay_e2e::prometheus::POLL).await;
    }

    // A healthy fleet: nodes join and renew twice each.
    const NODES: usize = 12;
    let token = gw.issue_token("edge-eu", "relay", 1000).await.token;
    let mut current = Vec::new();
    for n in 0..NODES {
        let name = format!("relay-{n}");
        let key = NodeKey::new(&name);
        let joined = join_as(&gw.node(), &token, &name, &key).await;
        current.push((joined.certificate_chain, key.key.serialize_pem(), name));
    }
    for _ in 0..2 {
        for (chain, key, name) in &mut current {
            let next = NodeKey::new(name);
            let reply = renew(&gw, Some((chain.as_str(), key.as_str())), &next.csr, None).await;
            *chain = renewed(&reply).certificate_chain;
            *key = next.key.serialize_pem();
        }
    }
    // Until Prometheus has seen every renewal and evaluated the rules for longer than any
    // `for:` since, no alert may even be pending.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = prometheus
            .query(r#"bootstrap_renewals_total{job="omnirelay",result="issued"}"#)
            .await;
        if seen.first().is_some_and(|(_, v)| *v >= (2 * NODES) as f64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "renewals never scraped: {seen:?}"
        );
        quiet(&prometheus).await;
        tokio::time::sleep(omnirelay_e2e::prometheus::POLL).await;
    }
    let evaluated = prometheus.evaluations().await;
    let quiet_until = Instant::now() + 2 * HOLD;
    while Instant::now() < quiet_until || prometheus.evaluations().await < evaluated + 5 {
        quiet(&prometheus).await;
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "rules not evaluated"
        );
        tokio::time::sleep(omnirelay_e2e::prometheus::POLL).await;
    }

    // A broken version is published: refused (the last good keeps serving), and the reload
    // alert fires; nothing else does.
    let mut files: BTreeMap<String, Vec<u8>> = repo.files();
    let mut manifest: serde_json::Value = serde_json::from_slice(&files["bundle.json"]).unwrap();
    manifest["version"] = "1.1.0".into();
    manifest["policies"][0]["sha256"] = "ab".repeat(32).into();
    files.insert(
        "bundle.json".into(),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    );
    repo.commit_files(&files, None);
    let alerts = prometheus
        .alerts_until("the reload alert", Duration::from_secs(30), |a| {
            a.iter()
                .any(|(name, state)| name == "OmniRelayPolicyReloadFailing" && state == "firing")
        })
        .await;
    assert!(
        alerts
            .iter()
            .all(|(name, _)| name == "OmniRelayPolicyReloadFailing"),
        "{alerts:?}"
    );

    // The gateway stops while nodes renew: their renewals fail, and the renewal alert goes
    // pending and then fires within its `for:` window (plus a scrape and an evaluation).
    let (chain, key, name) = current.pop().unwrap();
    let next = NodeKey::new(&name);
    renewed(&renew(&gw, Some((chain.as_str(), key.as_str())), &next.csr, None).await);
    let node_addr = gw.node_addr;
    let _state: TempDir = gw.kill();
    let stopped = Instant::now();
    assert!(
        tokio::net::TcpStream::connect(node_addr).await.is_err(),
        "the stopped gateway still takes renewals"
    );
    let fired = prometheus
        .alerts_until("the renewal alert", HOLD + Duration::from_secs(10), |a| {
            a.iter()
                .any(|(name, state)| name == "OmniRelayRenewalsBelowSLO" && state == "firing")
        })
        .await;
    let took = stopped.elapsed();
    assert!(
        took >= HOLD,
        "fired after {took:?}, before its for: of {HOLD:?}: {fired:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the drill took {:?}",
        started.elapsed()
    );
}
