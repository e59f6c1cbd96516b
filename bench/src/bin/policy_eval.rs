//! Cost of one policy decision: `cluster-role` through the real host (fresh instance per
//! evaluation, as the gateway runs it) against the same logic called natively. Each `--module
//! FILE` adds a policy built elsewhere whose rule is cluster-role's (a standalone repository
//! from `omnirelay policy new`), run with the same settings and request; their samples are
//! taken in alternating blocks with cluster-role's, so a busy machine slows all of them alike.
//!
//! `cargo run --release -p omnirelay-bench --bin policy_eval [-- --seconds S] [--module FILE]...`
//! Prints a Markdown table; `bench/README.md` holds the figures.

#![allow(clippy::print_stdout, reason = "a benchmark prints its results")]

use std::error::Error;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_role::ClusterRole;
use gateway::policy::{LoadedPolicy, Metering, PolicyConfig, PolicyHost, Verdict, examples};
use omnirelay_bench::percentile;
use policy_sdk::testing;

const SETTINGS: &str =
    r#"{"clusters": ["edge-eu", "edge-us"], "roles": ["dispatcher"], "ttl_seconds": 3600}"#;
const SAMPLES: usize = 50_000;
const WARMUP: usize = 2_000;

type BoxResult<T> = Result<T, Box<dyn Error>>;

fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds = args
        .iter()
        .skip_while(|a| *a != "--seconds")
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3u64);
    let modules: Vec<&String> = args
        .windows(2)
        .filter(|w| w[0] == "--module")
        .map(|w| &w[1])
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let host = Arc::new(PolicyHost::new(PolicyConfig::default(), Metering::Off)?);
    let policy =
        rt.block_on(host.load("cluster-role", examples::CLUSTER_ROLE.to_vec(), SETTINGS))?;
    let request = testing::request("edge-eu", "dispatcher", "dispatcher-07");

    // Correctness first: every path must reach the same decision.
    let hosted = rt.block_on(host.evaluate(&policy, &request))?;
    let native = policy_sdk::run_evaluate::<ClusterRole>(SETTINGS, &request)?;
    match (&hosted, &native) {
        (Verdict::Allow(g), policy_sdk::Decision::Allow(a)) if g.path.as_str() == a.spiffe_path => {
        }
        _ => return Err(format!("decisions differ: {hosted:?} vs {native:?}").into()),
    }
    let mut policies = vec![("wasm, cluster-role (this workspace)".to_string(), policy)];
    for file in modules {
        let loaded = rt.block_on(host.load("module", std::fs::read(file)?, SETTINGS))?;
        match (rt.block_on(host.evaluate(&loaded, &request))?, &hosted) {
            (Verdict::Allow(a), Verdict::Allow(b)) if a.path == b.path => {}
            (theirs, ours) => {
                return Err(format!("{file} decides otherwise: {theirs:?} vs {ours:?}").into());
            }
        }
        policies.push((format!("wasm, {file}"), loaded));
    }

    let loaded: Vec<LoadedPolicy> = policies.iter().map(|(_, p)| p.clone()).collect();
    let wasm = rt.block_on(latencies(&host, &loaded, &request))?;
    let native = native_latencies(&request)?;
    let (wasm_median, wasm_p99) = (percentile(&wasm[0], 50.0), percentile(&wasm[0], 99.0));
    let (native_median, native_p99) = (percentile(&native, 50.0), percentile(&native, 99.0));

    println!("| path | median | p99 | mean |");
    println!("| --- | ---: | ---: | ---: |");
    for ((name, _), samples) in policies.iter().zip(&wasm) {
        row(name, samples);
    }
    row("native (same logic, same settings parse)", &native);
    println!();
    println!(
        "ratio wasm/native: median {:.1}x, p99 {:.1}x",
        ratio(wasm_median, native_median),
        ratio(wasm_p99, native_p99)
    );
    println!();
    println!("| policy | threads | evaluations/s | per evaluation |");
    println!("| --- | ---: | ---: | ---: |");
    for threads in [1, 2] {
        for (name, policy) in &policies {
            let rate = throughput(&host, policy, threads, Duration::from_secs(seconds))?;
            println!(
                "| {name} | {threads} | {rate:.0} | {:.1} µs per thread |",
                threads as f64 * 1e6 / rate
            );
        }
    }
    Ok(())
}

/// `SAMPLES` fresh-instance evaluations of each policy, in `ROUNDS` blocks taken in turn
/// (policy A's block, then B's, then A's again, …), so a busy machine slows all of them
/// alike. Not one evaluation of each in turn: the pooling allocator would then hand each
/// policy a slot another module just dirtied, which measures the switch, not the policy.
/// Each policy's latencies, sorted.
async fn latencies(
    host: &PolicyHost,
    policies: &[LoadedPolicy],
    request: &policy_sdk::Request,
) -> BoxResult<Vec<Vec<Duration>>> {
    const ROUNDS: usize = 10;
    let mut samples = vec![Vec::with_capacity(SAMPLES); policies.len()];
    for _ in 0..ROUNDS {
        for (policy, samples) in policies.iter().zip(&mut samples) {
            for _ in 0..WARMUP / ROUNDS {
                host.evaluate(policy, request).await?;
            }
            for _ in 0..SAMPLES / ROUNDS {
                let start = Instant::now();
                black_box(host.evaluate(policy, request).await?);
                samples.push(start.elapsed());
            }
        }
    }
    for s in &mut samples {
        s.sort();
    }
    Ok(samples)
}

fn native_latencies(request: &policy_sdk::Request) -> BoxResult<Vec<Duration>> {
    for _ in 0..WARMUP {
        policy_sdk::run_evaluate::<ClusterRole>(SETTINGS, request)?;
    }
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let start = Instant::now();
        black_box(policy_sdk::run_evaluate::<ClusterRole>(
            black_box(SETTINGS),
            black_box(request),
        )?);
        samples.push(start.elapsed());
    }
    samples.sort();
    Ok(samples)
}

/// Evaluations per second with `threads` OS threads evaluating back to back.
fn throughput(
    host: &Arc<PolicyHost>,
    policy: &LoadedPolicy,
    threads: usize,
    length: Duration,
) -> BoxResult<f64> {
    let start = Instant::now();
    let deadline = start + length;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (host, policy) = (host.clone(), policy.clone());
            std::thread::spawn(move || -> Result<u64, String> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let request = testing::request("edge-eu", "dispatcher", &format!("node-{t}"));
                let mut done = 0u64;
                while Instant::now() < deadline {
                    for _ in 0..100 {
                        rt.block_on(host.evaluate(&policy, &request))
                            .map_err(|e| e.to_string())?;
                    }
                    done += 100;
                }
                Ok(done)
            })
        })
        .collect();
    let mut total = 0;
    for worker in workers {
        total += worker.join().map_err(|_| "bench thread panicked")??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-12)
}

fn row(name: &str, sorted: &[Duration]) {
    let mean = sorted.iter().sum::<Duration>() / sorted.len() as u32;
    println!(
        "| {name} | {:.2} µs | {:.2} µs | {:.2} µs |",
        micros(percentile(sorted, 50.0)),
        micros(percentile(sorted, 99.0)),
        micros(mean)
    );
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
