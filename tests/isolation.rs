//! One runaway policy must not slow every cluster (issue #7, finding 7): the real gateway with
//! two clusters, the infinite-loop fixture deciding for one of them. While eight nodes hammer
//! the runaway cluster, every join to the healthy cluster is answered 200; the runaway policy's
//! circuit breaker opens, and the opening is in the audit log and in `/metrics`. The breaker's
//! refusals, like every refusal that says `Retry-After`, are held for that wait (at most
//! `limits.refusal_hold`) while holding nothing but their connection.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is a failed test"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use omnirelay_e2e::{Gateway, NodeKey, join_as, join_request, policy_dir, post_join, problem};

/// Two evaluation slots (one per policy), a 200 ms deadline, and a breaker that opens after
/// three failures and stays open for the rest of the test. The runaway policy decides first
/// for cluster `runaway`; `cluster-role` keeps deciding for `edge-eu`. The rate limits are
/// lifted: every node here comes from one address, and the limits are not what is tested.
fn two_clusters(toml: &mut String) {
    let spin = policy_dir().join("fixture_infinite_loop.wasm");
    let first = toml.find("[[policies]]").unwrap();
    toml.insert_str(
        first,
        &format!(
            "[limits]\nglobal = {{ per_second = 1000000, burst = 1000000 }}\n\
             per_ip = {{ per_second = 1000000, burst = 1000000 }}\n\
             per_token = {{ per_second = 1000000, burst = 1000000 }}\n\
             per_cluster = {{ per_second = 1000000, burst = 1000000 }}\n\n\
             [policy]\nmax_concurrent = 2\ndeadline = \"200ms\"\nbreaker_failures = 3\n\
             breaker_cooldown = \"10m\"\n\n\
             [[policies]]\nname = \"spin\"\nmodule = \"{}\"\nclusters = [\"runaway\"]\n\n",
            spin.display()
        ),
    );
}

/// What a hammering node saw: status, reason, Retry-After.
type Seen = (u16, String, Option<u64>);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runaway_policy_opens_its_breaker_while_another_cluster_keeps_joining() {
    let gw = Arc::new(Gateway::start_with("isolation", two_clusters));
    let runaway = gw.issue_token("runaway", "relay", 10_000).await;
    let healthy = gw.issue_token("edge-eu", "relay", 1_000).await;

    let stop = Arc::new(AtomicBool::new(false));
    // Hammering joins answered by the open breaker, so far.
    let fast_refusals = Arc::new(AtomicUsize::new(0));
    let mut hammer = tokio::task::JoinSet::new();
    for n in 0..8 {
        let (gw, stop, token) = (gw.clone(), stop.clone(), runaway.token.clone());
        let fast_refusals = fast_refusals.clone();
        hammer.spawn(async move {
            let node = gw.node();
            let key = NodeKey::new("spin");
            let mut seen: Vec<Seen> = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let name = format!("spin-{n}-{i}");
                let reply = post_join(&node, &join_request(&node, &token, &name, &key).await).await;
                let after = reply
                    .headers
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                let status = reply.status.as_u16();
                let reason = problem(&reply).reason;
                if reason == "policy-circuit-open" {
                    fast_refusals.fetch_add(1, Ordering::Relaxed);
                }
                seen.push((status, reason, after));
            }
            seen
        });
    }

    // Healthy joins, one after another, until ten have succeeded, the breaker has opened and a
    // hammering node has met it open; every one of them must be issued.
    let node = gw.node();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut joined = 0;
    let opened = loop {
        joined += 1;
        let name = format!("healthy-{joined}");
        join_as(&node, &healthy.token, &name, &NodeKey::new(&name)).await;
        let opened = gw.audit_events().into_iter().find(|e| {
            e["kind"] == "policy-circuit" && e["policy"] == "spin" && e["state"] == "open"
        });
        if let Some(opened) = opened
            && joined >= 10
            && fast_refusals.load(Ordering::Relaxed) > 0
        {
            break opened;
        }
        assert!(
            Instant::now() < deadline,
            "the runaway policy's breaker never opened ({joined} healthy joins)"
        );
    };
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    while let Some(done) = hammer.join_next().await {
        seen.extend(done.unwrap());
    }

    assert_eq!(opened["failures"], 3, "{opened}");
    assert_eq!(opened["cause"], "timeout", "{opened}");
    assert_eq!(opened["cooldown_ms"], 600_000, "{opened}");
    assert!(
        opened["module_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    // Every runaway join was refused as a policy failure; once open, the breaker answered at
    // once with the rest of its cooldown as Retry-After.
    for (status, reason, _) in &seen {
        assert_eq!(*status, 503, "{reason}");
        assert!(
            ["policy-timeout", "policy-overloaded", "policy-circuit-open"]
                .contains(&reason.as_str()),
            "{reason}"
        );
    }
    let fast: Vec<_> = seen
        .iter()
        .filter(|(_, reason, _)| reason == "policy-circuit-open")
        .collect();
    assert!(!fast.is_empty(), "no join met the open breaker: {seen:?}");
    for (_, _, after) in fast {
        let after = after.expect("Retry-After on a circuit-open refusal");
        assert!((500..=600).contains(&after), "Retry-After {after}");
    }
    let timeouts = seen.iter().filter(|s| s.1 == "policy-timeout").count();
    assert!(timeouts >= 3, "{timeouts} timeouts");

    let metrics = gw.admin().get("/metrics").await.unwrap();
    let metrics = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        metrics.contains("bootstrap_policy_circuit_open_total{policy=\"spin\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("bootstrap_policy_circuit_state{policy=\"spin\"} 1"),
        "{metrics}"
    );
    // While open, a join is refused before its CSR is even looked at: a CSR that does not
    // parse gets the breaker's answer, not the CSR stage's.
    let node = gw.node();
    let mut broken = join_request(&node, &runaway.token, "spin-late", &NodeKey::new("x")).await;
    broken.csr = "not a CSR".into();
    let reply = post_join(&node, &broken).await;
    assert_eq!(problem(&reply).reason, "policy-circuit-open");

    // Fast refusals are load shedding: audited once per token and window, not per request.
    let fast_total = fast_refusals.load(Ordering::Relaxed);
    let audited = gw
        .audit_events()
        .into_iter()
        .filter(|e| {
            e["kind"] == "join-refused"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("policy-circuit-open"))
        })
        .count();
    assert!(
        audited >= 1 && audited < fast_total.max(2),
        "{audited} audit entries for {fast_total} fast refusals"
    );
}

/// A refusal that says `Retry-After` is held for it, at most `limits.refusal_hold` (10 s here),
/// and holds nothing but its connection: while the open breaker's refusal of a runaway join is
/// held, a join to the healthy cluster from the same address gets the one join slot of the
/// gateway and of the address. The held refusal then goes out as it was decided, its
/// Retry-After less the hold: a client that does not wait is paced, not answered differently.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_refusal_holds_its_connection_and_no_join_slot() {
    let gw = Gateway::start_with("held-refusal", |toml| {
        two_clusters(toml);
        *toml = toml.replace("[limits]\n", "[limits]\nrefusal_hold = \"10s\"\n");
        *toml = toml.replace(
            "[server]\n",
            "[server]\nmax_in_flight = 1\nmax_in_flight_per_ip = 1\n",
        );
    });
    let runaway = gw.issue_token("runaway", "relay", 100).await;
    let healthy = gw.issue_token("edge-eu", "relay", 1).await;
    let node = gw.node();
    // Three timeouts, one after another, open the breaker. A timeout says no Retry-After: it
    // is answered at once.
    for i in 0..3 {
        let name = format!("spin-{i}");
        let request = join_request(&node, &runaway.token, &name, &NodeKey::new(&name)).await;
        let reply = post_join(&node, &request).await;
        assert_eq!(problem(&reply).reason, "policy-timeout");
    }
    assert_eq!(gw.metric("bootstrap_refusals_held_total").await, Some(0.0));

    let held = {
        let node = gw.node();
        let request = join_request(&node, &runaway.token, "spin-held", &NodeKey::new("x")).await;
        tokio::spawn(async move { post_join(&node, &request).await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while gw.metric("bootstrap_refusals_holding").await != Some(1.0) {
        assert!(!held.is_finished(), "the circuit-open refusal was not held");
        assert!(Instant::now() < deadline, "no refusal was ever held");
    }
    // The only join slot (of the gateway, and of 127.0.0.1) is free while it is held.
    join_as(
        &gw.node(),
        &healthy.token,
        "healthy-while-held",
        &NodeKey::new("healthy-while-held"),
    )
    .await;
    // (The hold is 10 s; the healthy join took a few milliseconds of it.)
    assert_eq!(
        gw.metric("bootstrap_refusals_holding").await,
        Some(1.0),
        "the refusal went out before the healthy join was answered"
    );

    let reply = held.await.unwrap();
    assert_eq!(reply.status, 503);
    assert_eq!(problem(&reply).reason, "policy-circuit-open");
    let after: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The breaker's 600 s cooldown, less the 10 s the answer was held.
    assert!((500..=590).contains(&after), "Retry-After {after}");
    assert_eq!(gw.metric("bootstrap_refusals_held_total").await, Some(1.0));
    assert_eq!(gw.metric("bootstrap_refusals_holding").await, Some(0.0));
}
