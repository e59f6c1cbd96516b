//! One runaway policy against another cluster's joins (issue #7, finding 7), in one run.
//!
//! Starts the real gateway (release build, default configuration except the lifted abuse
//! limits) with the infinite-loop fixture deciding for cluster `runaway` and `cluster-role`
//! for `edge-eu`. Measures `edge-eu` joins (kept-alive, `--healthy` nodes at once) while the
//! gateway is quiet, then the same number while eight nodes hammer the `runaway` cluster back to
//! back on kept-alive connections without honouring `Retry-After` (the worst case), and reports
//! p50/p99 of both phases and what the hammering nodes were answered. (The gateway holds each
//! refusal that says `Retry-After` for that wait, at most `limits.refusal_hold`: the eight
//! keep their closed loop, and the gateway paces it.)
//!
//! `--module builtin:deny-all` binds another policy to `runaway` instead: a control run with a
//! policy that answers at once, to tell the cost of the refusals themselves from the runaway's.
//!
//! `cargo build --release -p gateway -p omnirelay-bench && target/release/runaway_load
//! [--joins N] [--healthy C] [--hammer H] [--module M] [--bin GATEWAY]`

#![allow(clippy::print_stdout, reason = "a benchmark prints its results")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use gateway::api::wire::{Challenge, JoinRequest};
use http_body_util::Full;
use omnirelay_bench::load::{
    BoxResult, GatewayProcess, Outcome, arg, connect, drive, issue_token, ms, now_ms, prepare,
    send, sibling, tls_config,
};
use omnirelay_bench::percentile;

fn main() -> BoxResult<()> {
    let joins: usize = arg("--joins").unwrap_or(2000);
    let healthy: usize = arg("--healthy").unwrap_or(1);
    let hammer: usize = arg("--hammer").unwrap_or(8);
    let bin = arg::<PathBuf>("--bin").unwrap_or_else(|| sibling("omnirelay"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(joins, healthy, hammer, &bin))
}

async fn run(joins: usize, healthy: usize, hammer: usize, bin: &Path) -> BoxResult<()> {
    let dir = std::env::temp_dir().join(format!("omnirelay-runaway-{}", std::process::id()));
    let module = arg::<String>("--module").unwrap_or_else(|| {
        Path::new(gateway::policy::examples::BUILT_POLICY_DIR)
            .join("fixture_infinite_loop.wasm")
            .display()
            .to_string()
    });
    let policies = format!(
        "[[policies]]\nname = \"spin\"\nmodule = \"{module}\"\nclusters = [\"runaway\"]\n\n"
    );
    let gateway = GatewayProcess::start(bin, &dir, &policies)?;
    let tls = tls_config(&std::fs::read(dir.join("ca/ca.pem"))?)?;

    let quiet_nodes = prepare(&gateway, &tls, "edge-eu", joins, healthy).await?;
    let noisy_nodes = prepare(&gateway, &tls, "edge-eu", joins, healthy).await?;
    let token = runaway_token(&gateway, &tls).await?;

    let quiet = drive_apart(gateway.node, &tls, quiet_nodes, healthy).await?;
    let stop = Arc::new(AtomicBool::new(false));
    // Each hammering node says so once it has had its first answer.
    let (started, mut answered) = tokio::sync::mpsc::channel::<()>(hammer.max(1));
    let mut hammering = tokio::task::JoinSet::new();
    for n in 0..hammer {
        let (tls, addr, token, stop) = (tls.clone(), gateway.node, token.clone(), stop.clone());
        let started = started.clone();
        hammering.spawn(async move {
            let mut answers: BTreeMap<String, usize> = BTreeMap::new();
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&rcgen::KeyPair::generate()?)?
                .pem()?;
            let mut sender = connect(&tls, addr).await?;
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let name = format!("spin-{n}-{i}");
                let answer = match hammer_once(&mut sender, &token, &name, &csr).await {
                    Ok(answer) => answer,
                    Err(e) => {
                        sender = connect(&tls, addr).await?;
                        format!("error: {e}")
                    }
                };
                if answers.is_empty() {
                    let _ = started.try_send(());
                }
                *answers.entry(answer).or_default() += 1;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(answers)
        });
    }
    // The noisy phase starts once every hammering node has been answered at least once.
    let first_answers = async {
        for _ in 0..hammer {
            answered.recv().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), first_answers)
        .await
        .map_err(|_| "the hammering nodes got no answer within 30 s")?;
    let noisy = drive_apart(gateway.node, &tls, noisy_nodes, healthy).await?;
    stop.store(true, Ordering::Relaxed);
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(done) = hammering.join_next().await {
        for (answer, count) in done?? {
            *answers.entry(answer).or_default() += count;
        }
    }

    println!("| phase | edge-eu nodes at once | joins | errors | joins/s | p50 | p99 |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    row("quiet", healthy, &quiet);
    row(
        &format!("{hammer} nodes hammering `runaway`"),
        healthy,
        &noisy,
    );
    let ratio = |p| {
        percentile(&noisy.latencies, p).as_secs_f64()
            / percentile(&quiet.latencies, p).as_secs_f64().max(1e-9)
    };
    println!();
    println!(
        "noisy/quiet: p50 {:.2}x, p99 {:.2}x",
        ratio(50.0),
        ratio(99.0)
    );
    let seconds = noisy.elapsed.as_secs_f64();
    for (answer, count) in answers {
        println!(
            "runaway cluster answered {answer}: {count} ({:.0}/s)",
            count as f64 / seconds
        );
    }
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The healthy cluster's joins, from a thread and runtime of their own: the healthy nodes are
/// other machines than the hammering ones, so their requests must not queue behind the
/// hammering clients' tasks inside this process (measured: in one shared runtime the hammering
/// clients' own scheduling dominated the healthy node's p99).
async fn drive_apart(
    node: std::net::SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    nodes: Vec<omnirelay_bench::load::Prepared>,
    healthy: usize,
) -> BoxResult<Outcome> {
    let (done, outcome) = tokio::sync::oneshot::channel();
    let tls = tls.clone();
    std::thread::Builder::new()
        .name("healthy-nodes".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(Into::into)
                .and_then(|runtime| runtime.block_on(drive(&[node], &tls, nodes, false, healthy)));
            let _ = done.send(result);
        })?;
    outcome.await?
}

fn row(phase: &str, healthy: usize, o: &Outcome) {
    println!(
        "| {phase} | {healthy} | {} | {} | {:.0} | {:.2} ms | {:.2} ms |",
        o.ok,
        o.errors,
        o.ok as f64 / o.elapsed.as_secs_f64(),
        ms(percentile(&o.latencies, 50.0)),
        ms(percentile(&o.latencies, 99.0)),
    );
}

/// A token the hammering nodes share: as many uses as they could want (a runaway policy never
/// lets one be consumed).
async fn runaway_token(
    gateway: &GatewayProcess,
    tls: &Arc<rustls::ClientConfig>,
) -> BoxResult<String> {
    let mut admin = connect(tls, gateway.admin).await?;
    let issued = issue_token(&mut admin, &gateway.credential, "runaway", 1_000_000).await?;
    Ok(issued.token)
}

/// One join to the runaway cluster: `<status> <reason>` of the answer.
async fn hammer_once(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    token: &str,
    name: &str,
    csr: &str,
) -> BoxResult<String> {
    let (status, body) = send(sender, "GET", "/v1/bootstrap/challenge", Bytes::new()).await?;
    if status != 200 {
        return Ok(format!("challenge {status}"));
    }
    let challenge: Challenge = serde_json::from_slice(&body)?;
    let request = JoinRequest {
        token: token.to_string(),
        node_name: name.to_string(),
        csr: csr.to_string(),
        idempotency_key: None,
        attestation: serde_json::json!({
            "kind": "token-only",
            "nonce": challenge.nonce,
            "issued_at_ms": now_ms(),
        }),
    };
    let body = Bytes::from(serde_json::to_vec(&request)?);
    let (status, body) = send(sender, "POST", "/v1/bootstrap/join", body).await?;
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    Ok(format!(
        "{status} {}",
        problem["reason"].as_str().unwrap_or("(no reason)")
    ))
}
