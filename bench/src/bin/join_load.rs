//! Durable joins per second against the real gateway binary on this machine.
//!
//! Starts `omnirelay init` + `omnirelay serve` (release build) on loopback, prepares every node
//! before the clock starts (P-256 key, CSR, its own one-use token issued through the admin
//! API), then runs each scenario — fresh TLS connection per join or a kept-alive connection per
//! node, with 1 and 16 nodes joining at once — and reports joins/s and latency percentiles of a
//! whole join (challenge + join). Then renewals: nodes that joined before the clock renew back
//! to back over a kept-alive mTLS connection each (their SVID as client certificate, a new key
//! per renewal), 1 and 16 nodes at once. Also measures the crypto-only ceiling in-process:
//! token verify + CSR verify + CA sign, on every core.
//!
//! With `--postgres URL` (an empty database, no password) the gateway runs on PostgreSQL;
//! with `--replicas N` as well, N gateway processes share that database and every scenario's
//! nodes are spread over their node listeners (worker `w` through replica `w % N`, as behind
//! a round-robin load balancer). The CPU per join is reported for the gateways together and,
//! on PostgreSQL, for the `postgres` processes.
//!
//! `cargo build --release -p gateway -p omnirelay-bench && target/release/join_load [--joins N]
//! [--postgres URL [--replicas N]]`
//!
//! `--shadow [--rounds R]` instead compares shadow evaluation off and on: two gateways follow
//! the same policy repository (`examples/policy-repo` as release and as candidate), one of them
//! with `candidate_branch`, and `keep16` alternates between them R times (default 3).

#![allow(clippy::print_stdout, reason = "a benchmark prints its results")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use omnirelay_bench::load::{
    BoxResult, GatewayProcess, arg, cores, drive, drive_renewals, ms, policy_repository, prepare,
    prepare_renewals, sibling, tls_config,
};
use omnirelay_bench::{cpu_seconds, cpu_seconds_of, percentile};

fn main() -> BoxResult<()> {
    let joins: usize = arg("--joins").unwrap_or(4000);
    let bin = arg::<PathBuf>("--bin").unwrap_or_else(|| sibling("omnirelay"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if std::env::args().any(|a| a == "--shadow") {
        let rounds: usize = arg("--rounds").unwrap_or(3);
        return runtime.block_on(shadow(joins, rounds, &bin));
    }
    runtime.block_on(run(joins, &bin))
}

/// Kept-alive joins/s at 16 nodes with shadow evaluation off and on, alternating.
async fn shadow(joins: usize, rounds: usize, bin: &Path) -> BoxResult<()> {
    let dir = std::env::temp_dir().join(format!("omnirelay-bench-shadow-{}", std::process::id()));
    let repo = policy_repository(bin, &dir)?;
    let gateways = [
        (
            "off",
            GatewayProcess::start_following(bin, &dir.join("off"), &repo, false)?,
        ),
        (
            "on",
            GatewayProcess::start_following(bin, &dir.join("on"), &repo, true)?,
        ),
    ];
    println!("| shadow | round | joins | errors | joins/s | p50 | p99 |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut totals = [0.0f64; 2];
    for round in 1..=rounds {
        for (i, (label, gateway)) in gateways.iter().enumerate() {
            let tls = tls_config(&std::fs::read(dir.join(label).join("ca/ca.pem"))?)?;
            let nodes = prepare(gateway, &tls, "edge-eu", joins, 16).await?;
            let result = drive(&[gateway.node], &tls, nodes, false, 16).await?;
            let rate = result.ok as f64 / result.elapsed.as_secs_f64();
            totals[i] += rate;
            println!(
                "| {label} | {round} | {} | {} | {rate:.0} | {:.2} ms | {:.2} ms |",
                result.ok,
                result.errors,
                ms(percentile(&result.latencies, 50.0)),
                ms(percentile(&result.latencies, 99.0)),
            );
        }
    }
    println!();
    println!(
        "shadow on / off, kept-alive joins/s at 16 nodes (mean of {rounds} rounds): {:.3}",
        totals[1] / totals[0].max(f64::MIN_POSITIVE)
    );
    drop(gateways);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn run(joins: usize, bin: &Path) -> BoxResult<()> {
    // `--only keep16` (fresh1, fresh16, keep1, keep16, renew1, renew16) runs one scenario, e.g.
    // for profiling.
    let only: Option<String> = arg("--only");
    let postgres: Option<String> = arg("--postgres");
    let replicas: usize = arg("--replicas").unwrap_or(1).max(1);
    if replicas > 1 && postgres.is_none() {
        return Err("--replicas needs --postgres: replicas share one PostgreSQL database".into());
    }
    let dir = std::env::temp_dir().join(format!("omnirelay-bench-{}", std::process::id()));
    // `--set TOML`: settings (whole tables, e.g. `[policy] decisions_keep = 0`) for the
    // gateways under load, to compare a setting's cost.
    let settings = arg::<String>("--set").map_or_else(String::new, |t| format!("{t}\n\n"));
    let gateway = GatewayProcess::start_on(bin, &dir, &settings, postgres.as_deref())?;
    let mut others = Vec::new();
    for i in 1..replicas {
        let replica_dir = dir.with_file_name(format!(
            "omnirelay-bench-{}-replica-{i}",
            std::process::id()
        ));
        others.push((
            GatewayProcess::replica(bin, &dir, &replica_dir)?,
            replica_dir,
        ));
    }
    let node_addrs: Vec<_> = std::iter::once(gateway.node)
        .chain(others.iter().map(|(g, _)| g.node))
        .collect();
    let gateway_cpu = || {
        cpu_seconds(gateway.child.id())
            + others
                .iter()
                .map(|(g, _)| cpu_seconds(g.child.id()))
                .sum::<f64>()
    };
    let database_cpu = || {
        if postgres.is_some() {
            cpu_seconds_of("postgres")
        } else {
            0.0
        }
    };
    println!(
        "store: {}, {} gateway replica(s)\n",
        if postgres.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        node_addrs.len()
    );
    let bundle = std::fs::read(dir.join("ca/ca.pem"))?;
    let tls = tls_config(&bundle)?;
    let ceiling = crypto_ceiling(&dir, 4000)?;

    println!("| scenario | nodes at once | joins | errors | joins/s | p50 | p99 |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut keepalive_16 = 0.0;
    let mut cpu_notes = Vec::new();
    for (fresh, concurrency, count) in [
        (true, 1, joins / 4),
        (true, 16, joins / 2),
        (false, 1, joins / 4),
        (false, 16, joins),
    ] {
        let label = format!("{}{concurrency}", if fresh { "fresh" } else { "keep" });
        if only.as_ref().is_some_and(|o| *o != label) {
            continue;
        }
        let nodes = prepare(&gateway, &tls, "edge-eu", count, concurrency).await?;
        let (server_before, database_before, loader_before) = (
            gateway_cpu(),
            database_cpu(),
            cpu_seconds(std::process::id()),
        );
        let result = drive(&node_addrs, &tls, nodes, fresh, concurrency).await?;
        let server_cpu = gateway_cpu() - server_before;
        let database = database_cpu() - database_before;
        let loader_cpu = cpu_seconds(std::process::id()) - loader_before;
        let per_join = |cpu: f64| cpu * 1e6 / result.ok.max(1) as f64;
        cpu_notes.push(format!(
            "{label}: CPU per join: gateways {:.0} µs, PostgreSQL {:.0} µs, load generator {:.0} µs; machine busy {:.0}% of {} cores",
            per_join(server_cpu),
            per_join(database),
            per_join(loader_cpu),
            100.0 * (server_cpu + database + loader_cpu)
                / (result.elapsed.as_secs_f64() * cores() as f64),
            cores()
        ));
        let rate = result.ok as f64 / result.elapsed.as_secs_f64();
        if !fresh && concurrency == 16 {
            keepalive_16 = rate;
        }
        println!(
            "| {} | {concurrency} | {} | {} | {rate:.0} | {:.2} ms | {:.2} ms |",
            if fresh {
                "fresh TLS connection per join"
            } else {
                "kept-alive connection per node"
            },
            result.ok,
            result.errors,
            ms(percentile(&result.latencies, 50.0)),
            ms(percentile(&result.latencies, 99.0)),
        );
    }
    // Renewals: nodes that joined before the clock renew back to back, each on one kept-alive
    // mTLS connection presenting its SVID, with a new key per renewal.
    let mut renewals_16 = 0.0;
    for (concurrency, count) in [(1, joins / 4), (16, joins)] {
        let label = format!("renew{concurrency}");
        if only.as_ref().is_some_and(|o| *o != label) {
            continue;
        }
        let nodes = prepare_renewals(&gateway, &tls, concurrency, count / concurrency).await?;
        let (server_before, loader_before) = (
            cpu_seconds(gateway.child.id()),
            cpu_seconds(std::process::id()),
        );
        let result = drive_renewals(&gateway, &bundle, nodes).await?;
        let server_cpu = cpu_seconds(gateway.child.id()) - server_before;
        let loader_cpu = cpu_seconds(std::process::id()) - loader_before;
        cpu_notes.push(format!(
            "{label}: CPU per renewal: gateway {:.0} µs, load generator {:.0} µs; machine busy {:.0}% of {} cores",
            server_cpu * 1e6 / result.ok.max(1) as f64,
            loader_cpu * 1e6 / result.ok.max(1) as f64,
            100.0 * (server_cpu + loader_cpu) / (result.elapsed.as_secs_f64() * cores() as f64),
            cores()
        ));
        let rate = result.ok as f64 / result.elapsed.as_secs_f64();
        if concurrency == 16 {
            renewals_16 = rate;
        }
        println!(
            "| renewal, kept-alive mTLS connection per node | {concurrency} | {} | {} | {rate:.0} | {:.2} ms | {:.2} ms |",
            result.ok,
            result.errors,
            ms(percentile(&result.latencies, 50.0)),
            ms(percentile(&result.latencies, 99.0)),
        );
    }
    println!();
    if keepalive_16 > 0.0 && renewals_16 > 0.0 {
        println!(
            "renewals/s at 16 nodes / joins/s at 16 nodes (kept-alive): {:.2}",
            renewals_16 / keepalive_16
        );
    }
    for note in cpu_notes {
        println!("{note}");
    }
    println!(
        "crypto-only ceiling (token verify + CSR verify + CA sign, {} threads): {ceiling:.0}/s",
        cores()
    );
    println!(
        "kept-alive, 16 nodes: {:.0}% of the ceiling",
        100.0 * keepalive_16 / ceiling
    );
    for (replica, replica_dir) in others {
        drop(replica);
        let _ = std::fs::remove_dir_all(replica_dir);
    }
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The server-side cryptography of one join, on every core: verify the token (Ed25519),
/// verify the CSR's signature (ECDSA P-256), sign the leaf (ECDSA P-256).
fn crypto_ceiling(dir: &Path, per_thread: usize) -> BoxResult<f64> {
    use gateway::identity::{Ca, MintRequest, SpiffeId, verify_csr};
    use gateway::token::{Claims, SigningKey, TokenId, Verifier};
    let ca = Arc::new(Ca::load(
        &std::fs::read_to_string(dir.join("ca/ca.pem"))?,
        &std::fs::read_to_string(dir.join("ca/ca.key"))?,
    )?);
    let signer =
        SigningKey::from_pkcs8_pem(&std::fs::read_to_string(dir.join("token/signing.key"))?)?;
    let verifier = Arc::new(Verifier::new(
        "bench.omnirelay.example",
        [signer.verifying_key()],
        Duration::from_secs(60),
    ));
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let work: Vec<(String, String)> = (0..per_thread)
        .map(|_| {
            let claims = Claims {
                id: TokenId::random(),
                issuer: "omnirelay".into(),
                audience: "bench.omnirelay.example".into(),
                cluster: "edge-eu".into(),
                role: "dispatcher".into(),
                issued_at: now,
                not_before: now,
                expires_at: now + 3600,
                max_uses: 1,
                node: None,
                supersede: false,
            };
            let key = rcgen::KeyPair::generate()?;
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&key)?
                .pem()?;
            Ok((signer.sign(&claims), csr))
        })
        .collect::<BoxResult<_>>()?;
    let work = Arc::new(work);
    let id =
        SpiffeId::parse("spiffe://bench.omnirelay.example/cluster/edge-eu/role/dispatcher/node/n")?;
    let started = Instant::now();
    let threads: Vec<_> = (0..cores())
        .map(|_| {
            let (work, verifier, ca, id) = (work.clone(), verifier.clone(), ca.clone(), id.clone());
            std::thread::spawn(move || -> Result<(), String> {
                for (token, csr) in work.iter() {
                    verifier.verify(token, now).map_err(|e| e.to_string())?;
                    let csr = verify_csr(csr, 16 << 10).map_err(|e| e.to_string())?;
                    ca.mint(&MintRequest {
                        csr: &csr,
                        spiffe_id: &id,
                        dns_sans: &[],
                        ttl: Duration::from_secs(3600),
                        now: SystemTime::now(),
                    })
                    .map_err(|e| e.to_string())?;
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "ceiling thread panicked")??;
    }
    Ok((per_thread * cores()) as f64 / started.elapsed().as_secs_f64())
}
