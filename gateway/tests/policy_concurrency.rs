//! 10,000 evaluations from many tokio tasks through one host: every result is right, and the
//! process does not grow once warm (instances are pooled and dropped, nothing leaks).
//!
//! Its own test binary so that no other test's allocations move the RSS figures.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::sync::Arc;

use gateway::policy::{Metering, PolicyConfig, PolicyHost, Verdict};
use policy_sdk::testing;

const TASKS: usize = 100;
const PER_TASK: usize = 10;
const ROUNDS: usize = 10;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_evaluations_are_correct_and_do_not_grow_the_process() {
    let host = Arc::new(PolicyHost::new(PolicyConfig::default(), Metering::Off).unwrap());
    let module =
        std::fs::read(concat!(env!("OMNIRELAY_POLICY_DIR"), "/cluster_role.wasm")).unwrap();
    let settings = r#"{"clusters": ["edge-eu"], "roles": ["dispatcher"], "ttl_seconds": 600}"#;
    let policy = host.load("cluster-role", module, settings).await.unwrap();

    let mut rss_after_round = Vec::new();
    for round in 0..ROUNDS {
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..TASKS {
            let (host, policy) = (host.clone(), policy.clone());
            tasks.spawn(async move {
                for i in 0..PER_TASK {
                    // Every third request comes from a cluster the policy does not admit.
                    let n = (round * TASKS + task) * PER_TASK + i;
                    let cluster = if n.is_multiple_of(3) {
                        "core"
                    } else {
                        "edge-eu"
                    };
                    let node = format!("node-{n}");
                    let request = testing::request(cluster, "dispatcher", &node);
                    match host.evaluate(&policy, &request).await.unwrap() {
                        Verdict::Allow(g) => {
                            assert_ne!(cluster, "core");
                            let want = format!("/cluster/edge-eu/role/dispatcher/node/{node}");
                            assert_eq!(g.path.as_str(), want);
                        }
                        Verdict::Deny(r) => {
                            assert_eq!(cluster, "core");
                            assert_eq!(r.code, "cluster-not-allowed");
                        }
                    }
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.unwrap();
        }
        rss_after_round.push(rss_kib());
    }
    let warm = rss_after_round[0];
    let end = *rss_after_round.last().unwrap();
    let peak = *rss_after_round.iter().max().unwrap();
    eprintln!(
        "RSS KiB after each 1,000 evaluations: {rss_after_round:?}; after first 1,000: {warm}, \
         after 10,000: {end}, peak: {peak}"
    );
    // Allocator noise is a few hundred KiB; a leak of even one 64 KiB stack or one instance's
    // memory per evaluation would add hundreds of MiB over 9,000 evaluations.
    assert!(
        peak.saturating_sub(warm) < 4 * 1024,
        "RSS grew from {warm} KiB to {peak} KiB after the first 1,000 evaluations"
    );
}
