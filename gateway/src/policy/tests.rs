//! The host against real components built from `policies/` (see `gateway/build.rs`).

use std::time::{Duration, Instant};

use policy_sdk::{self as sdk, testing};

use super::*;
use crate::identity::SpiffeError;

fn module(file: &str) -> Vec<u8> {
    let path = format!("{}/{file}.wasm", env!("OMNIRELAY_POLICY_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn host() -> PolicyHost {
    PolicyHost::new(PolicyConfig::default(), Metering::Off).unwrap()
}

const CLUSTER_ROLE: &str =
    r#"{"clusters": ["edge-eu"], "roles": ["dispatcher", "relay"], "ttl_seconds": 3600}"#;

async fn cluster_role(host: &PolicyHost) -> LoadedPolicy {
    host.load("cluster-role", module("cluster_role"), CLUSTER_ROLE)
        .await
        .unwrap()
}

fn grant(verdict: Verdict) -> Grant {
    match verdict {
        Verdict::Allow(g) => g,
        other => panic!("expected an allow, got {other:?}"),
    }
}

fn refusal(verdict: Verdict) -> Refusal {
    match verdict {
        Verdict::Deny(r) => r,
        other => panic!("expected a deny, got {other:?}"),
    }
}

#[tokio::test]
async fn cluster_role_allows_listed_pairs_with_the_exact_path() {
    let host = host();
    let policy = cluster_role(&host).await;
    let request = testing::request("edge-eu", "relay", "node-42");
    let g = grant(host.evaluate(&policy, &request).await.unwrap());
    assert_eq!(g.path.as_str(), "/cluster/edge-eu/role/relay/node/node-42");
    assert_eq!(g.ttl, Duration::from_secs(3600));
    assert_eq!(g.matched_rules, ["cluster-role-listed"]);
}

#[tokio::test]
async fn cluster_role_denies_unlisted_cluster_and_role() {
    let host = host();
    let policy = cluster_role(&host).await;
    let r = refusal(
        host.evaluate(&policy, &testing::request("core", "relay", "n"))
            .await
            .unwrap(),
    );
    assert_eq!(r.code, "cluster-not-allowed");
    assert!(r.reason.contains("\"core\""), "{}", r.reason);
    let r = refusal(
        host.evaluate(&policy, &testing::request("edge-eu", "admin", "n"))
            .await
            .unwrap(),
    );
    assert_eq!(r.code, "role-not-allowed");
}

#[tokio::test]
async fn settings_are_validated_at_load() {
    let host = host();
    let err = host
        .load(
            "cluster-role",
            module("cluster_role"),
            r#"{"clusters": [], "roles": ["r"], "ttl_seconds": 1}"#,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PolicyError::SettingsRejected(m) if m.contains("at least one")),
        "{err}"
    );
}

const POSTURE: &str = r#"{
    "require_attestation": "x509pop",
    "required_flags": ["secure-boot"],
    "min_versions": {"agent-version": "2.0.0"},
    "max_evidence_age_seconds": 120,
    "ttl_seconds": 900
}"#;

fn attested(flag_verified: bool, age_ms: u64) -> sdk::Request {
    let mut r = testing::request("edge-eu", "dispatcher", "n1");
    r.attestation.kind = sdk::AttestationKind::X509pop;
    r.attestation.issued_at_ms = r.now_ms - age_ms;
    let boot = sdk::Claim {
        name: "secure-boot".into(),
        value: sdk::ClaimValue::Flag(true),
    };
    let version = sdk::Claim {
        name: "agent-version".into(),
        value: sdk::ClaimValue::Text("2.1.0".into()),
    };
    r.attestation.verified.push(version);
    if flag_verified {
        r.attestation.verified.push(boot);
    } else {
        r.attestation.self_reported.push(boot);
    }
    r
}

#[tokio::test]
async fn posture_admits_fresh_verified_evidence_only() {
    let host = host();
    let policy = host
        .load("posture", module("posture"), POSTURE)
        .await
        .unwrap();
    let g = grant(
        host.evaluate(&policy, &attested(true, 5_000))
            .await
            .unwrap(),
    );
    assert_eq!(g.path.as_str(), "/cluster/edge-eu/role/dispatcher/node/n1");

    let stale = refusal(
        host.evaluate(&policy, &attested(true, 121_000))
            .await
            .unwrap(),
    );
    assert_eq!(stale.code, "evidence-stale");
    let unverified = refusal(
        host.evaluate(&policy, &attested(false, 5_000))
            .await
            .unwrap(),
    );
    assert_eq!(unverified.code, "posture-requirement");
    assert!(
        unverified.reason.contains("only self-reported"),
        "{}",
        unverified.reason
    );
}

#[tokio::test]
async fn deny_all_denies() {
    let host = host();
    let policy = host
        .load("deny-all", module("deny_all"), "{}")
        .await
        .unwrap();
    let r = refusal(
        host.evaluate(&policy, &testing::request("a", "b", "c"))
            .await
            .unwrap(),
    );
    assert_eq!(r.code, "issuance-disabled");
    assert_eq!(
        r.node_message.as_deref(),
        Some("issuance is disabled on this gateway")
    );
}

#[tokio::test]
async fn infinite_loop_is_stopped_at_its_deadline_and_the_host_keeps_working() {
    let config = PolicyConfig {
        deadline: Duration::from_millis(10),
        ..Default::default()
    };
    let host = PolicyHost::new(config, Metering::Off).unwrap();
    let spin = host
        .load("spin", module("fixture_infinite_loop"), "{}")
        .await
        .unwrap();
    let started = Instant::now();
    let err = host
        .evaluate(&spin, &testing::request("a", "b", "c"))
        .await
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("infinite loop with a 10 ms deadline stopped after {took:?}");
    assert!(
        matches!(err, PolicyError::Timeout { limit } if limit == Duration::from_millis(10)),
        "{err}"
    );
    assert!(took < Duration::from_secs(1), "stopped after {took:?}");

    let policy = cluster_role(&host).await;
    let g = grant(
        host.evaluate(&policy, &testing::request("edge-eu", "relay", "n"))
            .await
            .unwrap(),
    );
    assert_eq!(g.path.as_str(), "/cluster/edge-eu/role/relay/node/n");
}

#[tokio::test]
async fn memory_bomb_hits_the_cap_and_fails_closed() {
    let config = PolicyConfig {
        memory_limit: 8 << 20,
        ..Default::default()
    };
    let host = PolicyHost::new(config, Metering::Off).unwrap();
    let bomb = host
        .load("bomb", module("fixture_memory_bomb"), "{}")
        .await
        .unwrap();
    let err = host
        .evaluate(&bomb, &testing::request("a", "b", "c"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PolicyError::OutOfMemory { limit } if limit == 8 << 20),
        "{err}"
    );
    assert_eq!(err.kind(), "out-of-memory");
}

#[tokio::test]
async fn trap_fails_closed_with_the_panic_message() {
    let host = host();
    let trap = host
        .load("trap", module("fixture_trap"), "{}")
        .await
        .unwrap();
    let err = host
        .evaluate(&trap, &testing::request("a", "b", "node-9"))
        .await
        .unwrap_err();
    let PolicyError::Trap { message } = &err else {
        panic!("{err}")
    };
    assert!(message.contains("unreachable"), "{message}");
    assert!(
        message.contains("fixture panic for node node-9"),
        "{message}"
    );
}

#[tokio::test]
async fn huge_result_is_an_invalid_result() {
    // Building 50,000 strings takes a debug-build guest a while on a loaded machine; this test
    // is about the result check, so give it time.
    let config = PolicyConfig {
        deadline: Duration::from_secs(5),
        ..Default::default()
    };
    let host = PolicyHost::new(config, Metering::Off).unwrap();
    let huge = host
        .load("huge", module("fixture_huge_result"), "{}")
        .await
        .unwrap();
    let err = host
        .evaluate(&huge, &testing::request("a", "b", "c"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PolicyError::InvalidResult(InvalidResult::Path(SpiffeError::TooLong(_)))
        ),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_wit_version_is_refused_at_load_with_a_clear_error() {
    let host = host();
    let err = host
        .load("draft", module("fixture_wrong_wit"), "{}")
        .await
        .unwrap_err();
    assert!(
        matches!(err, PolicyError::UnsupportedVersion { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("omnirelay:bootstrap-policy@0.0.1"), "{text}");
    assert!(
        text.contains("supports omnirelay:bootstrap-policy@0.1.0"),
        "{text}"
    );
}

#[tokio::test]
async fn a_policy_that_imports_wasi_is_refused_at_load() {
    let err = host()
        .load("env", module("fixture_wasi_env"), "{}")
        .await
        .unwrap_err();
    let PolicyError::ForbiddenImport(import) = &err else {
        panic!("{err}")
    };
    assert!(import.starts_with("wasi:"), "{import}");
    assert!(err.to_string().contains("policies get no WASI"), "{err}");
}

#[tokio::test]
async fn garbage_module_fails_to_compile() {
    let err = host()
        .load("junk", b"\0asm but not really".to_vec(), "{}")
        .await
        .unwrap_err();
    assert!(matches!(err, PolicyError::Compile(_)), "{err}");
}

/// cluster-role builds its path from the node name; the gateway validates node names before
/// the policy runs, and the host must still refuse a malformed result if one slips through.
#[tokio::test]
async fn malformed_spiffe_paths_from_a_policy_are_rejected_by_the_host() {
    let host = host();
    let policy = cluster_role(&host).await;
    let cases: Vec<(String, SpiffeError)> = vec![
        ("../../admin".into(), SpiffeError::DotSegment("..")),
        ("a//b".into(), SpiffeError::EmptySegment),
        ("".into(), SpiffeError::TrailingSlash),
        ("/EVIL.example/admin".into(), SpiffeError::EmptySegment),
        ("x@spiffe:EVIL.EXAMPLE".into(), SpiffeError::PathChar('@')),
        ("n%2F..".into(), SpiffeError::PathChar('%')),
        (
            "a".repeat(2100),
            SpiffeError::TooLong(2100 + "/cluster/edge-eu/role/relay/node/".len()),
        ),
    ];
    for (node, want) in cases {
        let request = testing::request("edge-eu", "relay", &node);
        let err = host.evaluate(&policy, &request).await.unwrap_err();
        match err {
            PolicyError::InvalidResult(InvalidResult::Path(got)) => {
                assert_eq!(got, want, "{node:?}")
            }
            other => panic!("{node:?}: {other}"),
        }
    }
}

#[tokio::test]
async fn metered_calls_report_fuel_and_enforce_budgets() {
    let host = PolicyHost::new(PolicyConfig::default(), Metering::Fuel).unwrap();
    let policy = cluster_role(&host).await;
    let request = testing::request("edge-eu", "relay", "n");
    let run = host.evaluate_metered(&policy, &request, None).await;
    assert!(run.result.is_ok());
    assert!(run.fuel > 1_000, "fuel {}", run.fuel);
    let tight = host
        .evaluate_metered(&policy, &request, Some(run.fuel / 2))
        .await;
    assert!(
        matches!(tight.result, Err(PolicyError::FuelExhausted { .. })),
        "{:?}",
        tight.result
    );
}

/// With every slot taken by a runaway policy, the next caller is shed after the queue timeout
/// instead of waiting without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_host_sheds_instead_of_queueing_forever() {
    let config = PolicyConfig {
        max_concurrent: std::num::NonZeroU32::MIN,
        deadline: Duration::from_millis(300),
        queue_timeout: Duration::from_millis(20),
        ..Default::default()
    };
    let host = std::sync::Arc::new(PolicyHost::new(config, Metering::Off).unwrap());
    let spin = host
        .load("spin", module("fixture_infinite_loop"), "{}")
        .await
        .unwrap();
    let call = |host: std::sync::Arc<PolicyHost>, spin: LoadedPolicy| async move {
        let request = testing::request("a", "b", "c");
        host.evaluate(&spin, &request).await.unwrap_err().kind()
    };
    let first = tokio::spawn(call(host.clone(), spin.clone()));
    let second = tokio::spawn(call(host.clone(), spin.clone()));
    let kinds = [first.await.unwrap(), second.await.unwrap()];
    assert!(
        kinds.contains(&"timeout") && kinds.contains(&"overloaded"),
        "{kinds:?}"
    );
}

/// A clock the breaker tests move by hand.
#[derive(Debug)]
struct FakeClock(std::sync::Mutex<Instant>);

impl FakeClock {
    fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self(std::sync::Mutex::new(Instant::now())))
    }

    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap()
    }
}

/// The guest runs off the runtime's workers: on a current-thread runtime, a task spawned
/// beside a runaway evaluation runs while the evaluation is still going (inline, the runaway
/// held the only thread until its deadline).
#[tokio::test(flavor = "current_thread")]
async fn a_runaway_evaluation_does_not_block_the_runtime() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let config = PolicyConfig {
        deadline: Duration::from_millis(500),
        ..Default::default()
    };
    let host = Arc::new(PolicyHost::new(config, Metering::Off).unwrap());
    let spin = host
        .load("spin", module("fixture_infinite_loop"), "{}")
        .await
        .unwrap();
    let finished = Arc::new(AtomicBool::new(false));
    let (started, has_started) = tokio::sync::oneshot::channel();
    let runaway = tokio::spawn({
        let (host, finished) = (host.clone(), finished.clone());
        async move {
            started.send(()).unwrap();
            let result = host.evaluate(&spin, &testing::request("a", "b", "c")).await;
            finished.store(true, Ordering::SeqCst);
            result
        }
    });
    has_started.await.unwrap();
    let beside = tokio::spawn({
        let finished = finished.clone();
        async move { finished.load(Ordering::SeqCst) }
    });
    assert!(
        !beside.await.unwrap(),
        "the task beside ran only once the runaway evaluation had finished"
    );
    let err = runaway.await.unwrap().unwrap_err();
    assert!(matches!(err, PolicyError::Timeout { .. }), "{err}");
}

/// With eight runaway evaluations queued, a runaway policy holds only its share of the slots
/// (the rest queue behind it and are shed), and a healthy policy still gets a slot at once.
#[tokio::test(flavor = "current_thread")]
async fn a_runaway_policy_holds_only_its_share_and_others_still_get_slots() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let config = PolicyConfig {
        max_concurrent: std::num::NonZeroU32::new(4).unwrap(),
        per_policy_slots: std::num::NonZeroU32::new(2).unwrap(),
        deadline: Duration::from_secs(1),
        queue_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let host = Arc::new(PolicyHost::new(config, Metering::Off).unwrap());
    let spin = host
        .load("spin", module("fixture_infinite_loop"), "{}")
        .await
        .unwrap();
    let healthy = cluster_role(&host).await;
    let timed_out = Arc::new(AtomicUsize::new(0));
    let mut runaways = Vec::new();
    let mut started = Vec::new();
    for _ in 0..8 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        started.push(rx);
        let (host, spin, timed_out) = (host.clone(), spin.clone(), timed_out.clone());
        runaways.push(tokio::spawn(async move {
            tx.send(()).unwrap();
            let err = host
                .evaluate(&spin, &testing::request("a", "b", "c"))
                .await
                .unwrap_err();
            if matches!(err, PolicyError::Timeout { .. }) {
                timed_out.fetch_add(1, Ordering::SeqCst);
            }
            err.kind()
        }));
    }
    // Each runaway task ran up to its first wait inside `evaluate` before this one resumed.
    for rx in started {
        rx.await.unwrap();
    }
    let verdict = host
        .evaluate(&healthy, &testing::request("edge-eu", "relay", "n"))
        .await;
    assert_eq!(
        timed_out.load(Ordering::SeqCst),
        0,
        "the healthy policy was served only after the runaway ones had timed out"
    );
    let g = grant(verdict.unwrap());
    assert_eq!(g.path.as_str(), "/cluster/edge-eu/role/relay/node/n");

    let mut kinds = Vec::new();
    for r in runaways {
        kinds.push(r.await.unwrap());
    }
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "overloaded",
            "overloaded",
            "overloaded",
            "overloaded",
            "overloaded",
            "overloaded",
            "timeout",
            "timeout"
        ]
    );
}

fn breaker_host(config: PolicyConfig, clock: &std::sync::Arc<FakeClock>) -> PolicyHost {
    PolicyHost::with_clock(config, Metering::Off, clock.clone()).unwrap()
}

fn drain(rx: &mut tokio::sync::broadcast::Receiver<BreakerTransition>) -> Vec<BreakerState> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .map(|t| t.state)
        .collect()
}

/// K timeouts open the breaker: the next call fails fast with the cooldown left; after the
/// cooldown one probe runs, and a probe that times out again opens it again.
#[tokio::test]
async fn consecutive_timeouts_open_the_breaker_and_a_failed_probe_reopens_it() {
    let clock = FakeClock::new();
    let config = PolicyConfig {
        deadline: Duration::from_millis(10),
        breaker_failures: std::num::NonZeroU32::new(3).unwrap(),
        breaker_cooldown: Duration::from_secs(30),
        ..Default::default()
    };
    let host = breaker_host(config, &clock);
    let mut transitions = host.breaker_transitions();
    let spin = host
        .load("spin", module("fixture_infinite_loop"), "{}")
        .await
        .unwrap();
    let request = testing::request("a", "b", "c");
    for _ in 0..3 {
        let err = host.evaluate(&spin, &request).await.unwrap_err();
        assert!(matches!(err, PolicyError::Timeout { .. }), "{err}");
    }
    assert_eq!(spin.breaker_state(), BreakerState::Open);
    let opened = transitions.try_recv().unwrap();
    assert_eq!(
        (opened.state, opened.failures, opened.cause, &*opened.policy),
        (BreakerState::Open, 3, Some("timeout"), "spin")
    );
    assert_eq!(opened.digest, spin.digest());
    assert_eq!(opened.cooldown, Duration::from_secs(30));

    let err = host.evaluate(&spin, &request).await.unwrap_err();
    assert!(
        matches!(err, PolicyError::CircuitOpen { retry_after } if retry_after == Duration::from_secs(30)),
        "{err}"
    );
    assert_eq!(err.kind(), "circuit-open");
    clock.advance(Duration::from_secs(12));
    let err = host.evaluate(&spin, &request).await.unwrap_err();
    assert!(
        matches!(err, PolicyError::CircuitOpen { retry_after } if retry_after == Duration::from_secs(18)),
        "{err}"
    );

    clock.advance(Duration::from_secs(18));
    let err = host.evaluate(&spin, &request).await.unwrap_err();
    assert!(matches!(err, PolicyError::Timeout { .. }), "{err}");
    assert_eq!(
        drain(&mut transitions),
        [BreakerState::HalfOpen, BreakerState::Open]
    );
    let err = host.evaluate(&spin, &request).await.unwrap_err();
    assert!(matches!(err, PolicyError::CircuitOpen { .. }), "{err}");
}

/// A policy that ran out of memory twice is refused without running, even for a request it
/// would have allowed; after the cooldown the probe answers and the breaker closes.
#[tokio::test]
async fn an_open_breaker_skips_the_guest_and_a_good_probe_closes_it() {
    let clock = FakeClock::new();
    let config = PolicyConfig {
        memory_limit: 1 << 20,
        breaker_failures: std::num::NonZeroU32::new(2).unwrap(),
        breaker_cooldown: Duration::from_secs(30),
        ..Default::default()
    };
    let host = breaker_host(config, &clock);
    let mut transitions = host.breaker_transitions();
    let policy = cluster_role(&host).await;
    let good = testing::request("edge-eu", "relay", "n");
    // Lowering a 2 MiB node name grows the guest's memory past its 1 MiB cap.
    let bloated = testing::request("edge-eu", "relay", &"n".repeat(2 << 20));
    grant(host.evaluate(&policy, &good).await.unwrap());
    for _ in 0..2 {
        let err = host.evaluate(&policy, &bloated).await.unwrap_err();
        assert!(matches!(err, PolicyError::OutOfMemory { .. }), "{err}");
    }
    let err = host.evaluate(&policy, &good).await.unwrap_err();
    assert!(matches!(err, PolicyError::CircuitOpen { .. }), "{err}");
    assert_eq!(drain(&mut transitions), [BreakerState::Open]);

    clock.advance(Duration::from_secs(30));
    assert_eq!(policy.breaker_state(), BreakerState::HalfOpen);
    grant(host.evaluate(&policy, &good).await.unwrap());
    assert_eq!(
        drain(&mut transitions),
        [BreakerState::HalfOpen, BreakerState::Closed]
    );
    assert_eq!(policy.breaker_state(), BreakerState::Closed);
    grant(host.evaluate(&policy, &good).await.unwrap());
}

/// Answers, even denials and invalid results, reset the count: only consecutive failures open
/// the breaker.
#[tokio::test]
async fn answers_in_between_keep_the_breaker_closed() {
    let clock = FakeClock::new();
    let config = PolicyConfig {
        memory_limit: 1 << 20,
        breaker_failures: std::num::NonZeroU32::new(2).unwrap(),
        ..Default::default()
    };
    let host = breaker_host(config, &clock);
    let policy = cluster_role(&host).await;
    let bloated = testing::request("edge-eu", "relay", &"n".repeat(2 << 20));
    for _ in 0..3 {
        let err = host.evaluate(&policy, &bloated).await.unwrap_err();
        assert!(matches!(err, PolicyError::OutOfMemory { .. }), "{err}");
        let denied = host
            .evaluate(&policy, &testing::request("core", "relay", "n"))
            .await
            .unwrap();
        refusal(denied);
    }
    assert_eq!(policy.breaker_state(), BreakerState::Closed);
}
