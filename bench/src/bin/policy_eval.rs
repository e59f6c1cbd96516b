//! Cost of one policy decision: `cluster-role` through the real host (fresh instance per
//! evaluation, as the gateway runs it) against the same logic called natively.
//!
//! `cargo run --release -p omnirelay-bench --bin policy_eval [-- --seconds S]`
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
    let seconds = std::env::args()
        .skip_while(|a| a != "--seconds")
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3u64);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let host = Arc::new(PolicyHost::new(PolicyConfig::default(), Metering::Off)?);
    let policy =
        rt.block_on(host.load("cluster-role", examples::CLUSTER_ROLE.to_vec(), SETTINGS))?;
    let request = testing::request("edge-eu", "dispatcher", "dispatcher-07");

    // Correctness first: both paths must reach the same decision.
    let hosted = rt.block_on(host.evaluate(&policy, &request))?;
    let native = policy_sdk::run_evaluate::<ClusterRole>(SETTINGS, &request)?;
    match (&hosted, &native) {
        (Verdict::Allow(g), policy_sdk::Decision::Allow(a)) if g.path.as_str() == a.spiffe_path => {
        }
        _ => return Err(format!("decisions differ: {hosted:?} vs {native:?}").into()),
    }

    let wasm = rt.block_on(latencies(&host, &policy, &request))?;
    let native = native_latencies(&request)?;
    let (wasm_median, wasm_p99) = (percentile(&wasm, 50.0), percentile(&wasm, 99.0));
    let (native_median, native_p99) = (percentile(&native, 50.0), percentile(&native, 99.0));

    println!("| path | median | p99 | mean |");
    println!("| --- | ---: | ---: | ---: |");
    row("wasm, fresh instance per evaluation", &wasm);
    row("native (same logic, same settings parse)", &native);
    println!();
    println!(
        "ratio wasm/native: median {:.1}x, p99 {:.1}x",
        ratio(wasm_median, native_median),
        ratio(wasm_p99, native_p99)
    );
    println!();
    println!("| threads | evaluations/s | per evaluation |");
    println!("| ---: | ---: | ---: |");
    for threads in [1, 2] {
        let rate = throughput(&host, &policy, threads, Duration::from_secs(seconds))?;
        println!(
            "| {threads} | {rate:.0} | {:.1} µs per thread |",
            threads as f64 * 1e6 / rate
        );
    }
    Ok(())
}

async fn latencies(
    host: &PolicyHost,
    policy: &LoadedPolicy,
    request: &policy_sdk::Request,
) -> BoxResult<Vec<Duration>> {
    for _ in 0..WARMUP {
        host.evaluate(policy, request).await?;
    }
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let start = Instant::now();
        black_box(host.evaluate(policy, request).await?);
        samples.push(start.elapsed());
    }
    samples.sort();
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
