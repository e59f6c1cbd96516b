//! Fleet simulator: hundreds of nodes against the real gateway binary, each a task with its own
//! key and its own loopback address (Linux routes all of 127.0.0.0/8 to `lo`), not a process.
//!
//! Every node zero-touch joins with its own one-use token (the fleet powers on at once, or
//! spread over `--ramp`), then renews on the agent's own schedule ([`schedule`]: the gateway's
//! `renew_after` hint, jittered over a tenth of the lifetime, a fresh key each time, capped
//! exponential backoff with full jitter on 429/5xx/transport errors) with short SVIDs, over mTLS
//! with its current SVID, through the agent's own client. Some watchers long-poll the revocation
//! feed. Half-way, one token that `--group` nodes joined with is revoked: the run measures how
//! long until every watcher holds every revoked serial, and checks that exactly those nodes are
//! refused from then on.
//!
//! It reports joins/s, renewals/s, the renewal success ratio against `--slo` (a renewal fails
//! when its certificate runs out first, or when the gateway refuses a node nobody revoked), the
//! spread of renewal times (per-second counts against their mean; where in the lifetime each
//! renewal was sent) and the revocation fan-out p50/p99/max, with CPU per operation of the
//! gateway and of the simulator.
//!
//! `cargo build --release -p gateway -p omnirelay-bench && target/release/fleet
//!  [--nodes 500] [--seconds 60] [--ttl 20] [--watchers 50] [--group 20] [--ramp 0] [--slo 99.9]`

#![allow(clippy::print_stdout, reason = "a benchmark prints its results")]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gateway::agent::schedule::{self, Plan, RenewPolicy, Validity};
use gateway::agent::wire::{
    Challenge, IssueTokenRequest, IssueTokenResponse, JoinRequest, JoinResponse, RenewRequest,
    RevocationPage,
};
use gateway::agent::{Backoff, GatewayClient, Reply, unit_sample};
use omnirelay_bench::load::{BoxResult, GatewayProcess, arg, cores, ms, sibling};
use omnirelay_bench::{cpu_seconds, percentile};

/// The simulated fleet's cluster: its own policy entry issues `--ttl`-second SVIDs.
const CLUSTER: &str = "fleet";

#[derive(Debug, Clone)]
struct Settings {
    nodes: usize,
    seconds: u64,
    ttl: u64,
    watchers: usize,
    group: usize,
    ramp: f64,
    slo: f64,
}

fn main() -> BoxResult<()> {
    let settings = Settings {
        nodes: arg("--nodes").unwrap_or(500),
        seconds: arg("--seconds").unwrap_or(60),
        ttl: arg("--ttl").unwrap_or(20),
        watchers: arg("--watchers").unwrap_or(50),
        group: arg("--group").unwrap_or(20),
        ramp: arg("--ramp").unwrap_or(0.0),
        slo: arg("--slo").unwrap_or(99.9),
    };
    if settings.group == 0 || settings.group >= settings.nodes {
        return Err("--group must be at least 1 and less than --nodes".into());
    }
    let bin = arg::<PathBuf>("--bin").unwrap_or_else(|| sibling("omnirelay"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(settings, &bin))
}

/// What happened to one node.
#[derive(Debug, Default)]
struct NodeLog {
    /// Seconds from the start when the join succeeded, and its latency.
    joined: Option<(f64, Duration)>,
    /// Join attempts that failed and were retried.
    join_retries: u32,
    /// Every successful renewal: seconds from the start, latency, and when it was sent as a
    /// share of the old certificate's life on the node (from receipt to notAfter; notBefore is
    /// backdated for clock skew).
    renewals: Vec<(f64, Duration, f64)>,
    /// Renewal attempts that failed and were retried.
    renew_retries: u32,
    /// Renewals lost: the certificate ran out, or the gateway refused for good.
    lost: Vec<String>,
    /// Refused because its identity was revoked (expected only for the revoked group): when.
    revoked_at: Option<f64>,
    /// Joined with the token that is revoked half-way.
    in_group: bool,
}

async fn run(settings: Settings, bin: &Path) -> BoxResult<()> {
    let dir = std::env::temp_dir().join(format!("omnirelay-fleet-{}", std::process::id()));
    let gateway = GatewayProcess::start(bin, &dir, &fleet_policy(settings.ttl))?;
    let bundle = std::fs::read(dir.join("ca/ca.pem"))?;
    let url = format!("https://{}", gateway.node);
    let admin = GatewayClient::new(&format!("https://{}", gateway.admin), &bundle)?
        .with_bearer(gateway.credential.clone());

    // Before the clock: one one-use token per node, and one token the group shares.
    let group = issue_token(&admin, settings.group as u32).await?;
    let mut tokens = Vec::with_capacity(settings.nodes);
    for _ in 0..settings.nodes - settings.group {
        tokens.push(issue_token(&admin, 1).await?.token);
    }
    tokens.extend(std::iter::repeat_n(group.token.clone(), settings.group));

    // Watchers first, positioned at the feed's head.
    let seen: Arc<Mutex<Vec<HashMap<String, Instant>>>> =
        Arc::new(Mutex::new(vec![HashMap::new(); settings.watchers]));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut watchers = tokio::task::JoinSet::new();
    for w in 0..settings.watchers {
        let client = GatewayClient::new(&url, &bundle)?.with_local_addr(address(1, w));
        let (seen, group_id, stop) = (seen.clone(), group.id.clone(), stop.clone());
        let head = feed_page(&client, 0, 0).await?;
        watchers.spawn(async move {
            tokio::select! {
                () = stop.notified() => Ok(()),
                r = watch(&client, head.next, &group_id, w, &seen) => r,
            }
        });
    }

    let started = Instant::now();
    let deadline = started + Duration::from_secs(settings.seconds);
    let (gateway_cpu, own_cpu) = (
        cpu_seconds(gateway.child.id()),
        cpu_seconds(std::process::id()),
    );
    let nodes_outside = settings.nodes - settings.group;
    let mut nodes = tokio::task::JoinSet::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let client = GatewayClient::new(&url, &bundle)?.with_local_addr(address(2, i));
        let delay = Duration::from_secs_f64(settings.ramp * unit_sample());
        let (url, bundle) = (url.clone(), bundle.clone());
        nodes.spawn(async move {
            tokio::time::sleep(delay).await;
            let mut log = NodeLog {
                in_group: i >= nodes_outside,
                ..NodeLog::default()
            };
            node(
                &client,
                &url,
                &bundle,
                address(2, i),
                &format!("fleet-{i:04}"),
                &token,
                started,
                deadline,
                &mut log,
            )
            .await;
            log
        });
    }

    // Half-way: revoke the group's token.
    tokio::time::sleep_until((started + Duration::from_secs(settings.seconds / 2)).into()).await;
    let revoke_sent = Instant::now();
    let order = serde_json::json!({ "token": group.id, "reason": "fleet drill" });
    let reply = admin
        .post("/admin/v1/revoke", serde_json::to_vec(&order)?)
        .await?;
    let revoke_answered = revoke_sent.elapsed();
    if reply.status != 200 {
        return Err(format!("revoke: HTTP {}", reply.status).into());
    }
    let summary: serde_json::Value = serde_json::from_slice(&reply.body)?;
    let serials: Vec<String> = summary["serials"]
        .as_array()
        .ok_or("no serials in the revocation summary")?
        .iter()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();

    let mut logs = Vec::with_capacity(settings.nodes);
    while let Some(log) = nodes.join_next().await {
        logs.push(log?);
    }
    let elapsed = started.elapsed();
    let gateway_cpu = cpu_seconds(gateway.child.id()) - gateway_cpu;
    let own_cpu = cpu_seconds(std::process::id()) - own_cpu;
    stop.notify_waiters();
    while let Some(done) = watchers.join_next().await {
        done??;
    }
    let seen = std::mem::take(&mut *seen.lock().map_err(|_| "a watcher panicked")?);
    let healthy = admin.get("/healthz").await?.status == 200;
    report(
        &settings,
        &logs,
        &seen,
        &serials,
        revoke_sent,
        revoke_answered,
        elapsed,
        (gateway_cpu, own_cpu),
        healthy,
    )
}

/// One node: join, then renew until the run ends (or its identity is revoked).
#[allow(clippy::too_many_arguments, reason = "a node's whole context, once")]
async fn node(
    client: &GatewayClient,
    url: &str,
    bundle: &[u8],
    ip: IpAddr,
    name: &str,
    token: &str,
    started: Instant,
    deadline: Instant,
    log: &mut NodeLog,
) {
    let policy = RenewPolicy::default();
    let backoff = Backoff::default();
    let since = |at: Instant| at.duration_since(started).as_secs_f64();

    // Zero-touch join, retried as the agent retries.
    let key = match rcgen::KeyPair::generate() {
        Ok(key) => key,
        Err(e) => return log.lost.push(format!("key: {e}")),
    };
    let mut attempt = 0;
    let mut current = loop {
        let begin = Instant::now();
        match join(client, name, token, &key).await {
            Ok(joined) => {
                log.joined = Some((since(Instant::now()), begin.elapsed()));
                break (joined, key.serialize_pem());
            }
            Err(Failure::Retry(why, retry_after)) => {
                attempt += 1;
                log.join_retries += 1;
                if attempt > 8 || Instant::now() >= deadline {
                    return log.lost.push(format!("join gave up: {why}"));
                }
                tokio::time::sleep(backoff.delay(attempt, retry_after, unit_sample())).await;
            }
            Err(Failure::Final(why)) => return log.lost.push(format!("join refused: {why}")),
        }
    };

    // Renew on the agent's schedule until the run ends.
    let mut received = SystemTime::now();
    loop {
        let (svid, key_pem) = &current;
        let validity = Validity {
            not_before: UNIX_EPOCH + Duration::from_secs(svid.not_before),
            not_after: UNIX_EPOCH + Duration::from_secs(svid.not_after),
        };
        let hint = Some(UNIX_EPOCH + Duration::from_secs(svid.renew_after));
        let now = SystemTime::now();
        let at = schedule::not_sooner(
            schedule::renewal_time(validity, hint, policy, unit_sample()),
            validity,
            now,
            policy.min_interval,
        );
        let Plan::Wait(wait) = schedule::wait_until(at, validity, now) else {
            return log.lost.push("expired before its renewal was due".into());
        };
        if Instant::now() + wait >= deadline {
            return;
        }
        tokio::time::sleep(wait).await;
        let mut attempt = 0;
        current = loop {
            let begin = Instant::now();
            let sent = SystemTime::now();
            match renew(url, bundle, ip, svid, key_pem).await {
                Ok(next) => {
                    let lived = sent.duration_since(received).unwrap_or_default();
                    let life = validity
                        .not_after
                        .duration_since(received)
                        .unwrap_or_default();
                    let share = lived.as_secs_f64() / life.as_secs_f64().max(1e-3);
                    log.renewals
                        .push((since(Instant::now()), begin.elapsed(), share));
                    received = SystemTime::now();
                    break next;
                }
                Err(Failure::Final(why)) if why.contains("revoked") => {
                    log.revoked_at = Some(since(Instant::now()));
                    return;
                }
                Err(Failure::Final(why)) => {
                    return log.lost.push(format!("renewal refused: {why}"));
                }
                Err(Failure::Retry(why, retry_after)) => {
                    attempt += 1;
                    log.renew_retries += 1;
                    let plan = schedule::retry(
                        backoff,
                        attempt,
                        retry_after,
                        unit_sample(),
                        validity,
                        SystemTime::now(),
                    );
                    match plan {
                        Plan::Wait(wait) if Instant::now() + wait < deadline => {
                            tokio::time::sleep(wait).await;
                        }
                        Plan::Wait(_) => return,
                        Plan::Expired => {
                            return log.lost.push(format!("expired while retrying: {why}"));
                        }
                    }
                }
            }
        };
    }
}

/// How an exchange failed: worth another try (transport, 429, 5xx; with `Retry-After`), or not.
enum Failure {
    Retry(String, Option<Duration>),
    Final(String),
}

impl From<gateway::agent::AgentError> for Failure {
    fn from(e: gateway::agent::AgentError) -> Self {
        Self::Retry(e.to_string(), None)
    }
}

/// 200 → the SVID; anything else is a [`refusal`].
fn svid_of(reply: &Reply) -> Result<JoinResponse, Failure> {
    if reply.status != 200 {
        return Err(refusal(reply));
    }
    serde_json::from_slice(&reply.body).map_err(|e| Failure::Retry(e.to_string(), None))
}

/// 429 and 5xx are retried, honouring `Retry-After`; other refusals are final (their problem's
/// reason is kept), as the agent decides.
fn refusal(reply: &Reply) -> Failure {
    let problem: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
    let why = format!(
        "HTTP {} {}",
        reply.status,
        problem["reason"]
            .as_str()
            .unwrap_or("(no problem document)")
    );
    if reply.status == 429 || reply.status.is_server_error() {
        let retry_after = reply
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
            .map(Duration::from_secs);
        Failure::Retry(why, retry_after)
    } else {
        Failure::Final(why)
    }
}

async fn join(
    client: &GatewayClient,
    name: &str,
    token: &str,
    key: &rcgen::KeyPair,
) -> Result<JoinResponse, Failure> {
    let reply = client.get("/v1/bootstrap/challenge").await?;
    if reply.status != 200 {
        return Err(refusal(&reply));
    }
    let challenge: Challenge =
        serde_json::from_slice(&reply.body).map_err(|e| Failure::Retry(e.to_string(), None))?;
    let request = JoinRequest {
        token: token.to_string(),
        node_name: name.to_string(),
        csr: csr(key).map_err(Failure::Final)?,
        idempotency_key: None,
        attestation: serde_json::json!({
            "kind": "token-only",
            "nonce": challenge.nonce,
            "issued_at_ms": SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64,
        }),
    };
    let body = serde_json::to_vec(&request).map_err(|e| Failure::Final(e.to_string()))?;
    svid_of(&client.post("/v1/bootstrap/join", body).await?)
}

/// One renewal: a fresh key, a new mTLS connection presenting the current SVID.
async fn renew(
    url: &str,
    bundle: &[u8],
    ip: IpAddr,
    svid: &JoinResponse,
    key_pem: &str,
) -> Result<(JoinResponse, String), Failure> {
    let key = rcgen::KeyPair::generate().map_err(|e| Failure::Final(e.to_string()))?;
    let client = GatewayClient::new(url, bundle)
        .and_then(|c| c.with_client_identity(svid.certificate_chain.as_bytes(), key_pem.as_bytes()))
        .map_err(|e| Failure::Final(e.to_string()))?
        .with_local_addr(ip);
    let request = RenewRequest {
        csr: csr(&key).map_err(Failure::Final)?,
        idempotency_key: None,
    };
    let body = serde_json::to_vec(&request).map_err(|e| Failure::Final(e.to_string()))?;
    let next = svid_of(&client.post("/v1/bootstrap/renew", body).await?)?;
    Ok((next, key.serialize_pem()))
}

fn csr(key: &rcgen::KeyPair) -> Result<String, String> {
    rcgen::CertificateParams::default()
        .serialize_request(key)
        .and_then(|r| r.pem())
        .map_err(|e| e.to_string())
}

/// A watcher: long-polls the feed and notes when each serial of the group's token arrived.
async fn watch(
    client: &GatewayClient,
    mut since: u64,
    group: &str,
    me: usize,
    seen: &Mutex<Vec<HashMap<String, Instant>>>,
) -> BoxResult<()> {
    loop {
        let page = feed_page(client, since, 20).await?;
        let arrived = Instant::now();
        since = page.next;
        let mut seen = seen.lock().map_err(|_| "poisoned")?;
        for r in page.revocations.iter().filter(|r| r.token_id == group) {
            seen[me].entry(r.serial.clone()).or_insert(arrived);
        }
    }
}

/// `GET /v1/revocations?since=SEQ&wait=SECS`.
async fn feed_page(client: &GatewayClient, since: u64, wait: u64) -> BoxResult<RevocationPage> {
    let reply = client
        .get(&format!("/v1/revocations?since={since}&wait={wait}"))
        .await?;
    if reply.status != 200 {
        return Err(format!("revocation feed: HTTP {}", reply.status).into());
    }
    Ok(serde_json::from_slice(&reply.body)?)
}

async fn issue_token(admin: &GatewayClient, max_uses: u32) -> BoxResult<IssueTokenResponse> {
    let request = IssueTokenRequest {
        cluster: CLUSTER.into(),
        role: "dispatcher".into(),
        ttl_seconds: 3600,
        max_uses,
        issued_by: Some("fleet".into()),
        node: None,
        supersede: false,
    };
    let reply = admin
        .post("/admin/v1/tokens", serde_json::to_vec(&request)?)
        .await?;
    if !reply.status.is_success() {
        return Err(format!("token issue: HTTP {}", reply.status).into());
    }
    Ok(serde_json::from_slice(&reply.body)?)
}

/// `127.<block>.<hi>.<lo>`: node `i`'s own source address (block 2 nodes, block 1 watchers).
fn address(block: u8, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        block,
        (i / 250) as u8,
        (i % 250 + 1) as u8,
    ))
}

/// The fleet's cluster: `ttl`-second SVIDs (the policy floor lowered to allow them).
fn fleet_policy(ttl: u64) -> String {
    format!(
        "[policy]\nmin_ttl = \"1s\"\n\n[[policies]]\nname = \"fleet\"\n\
         module = \"builtin:cluster-role\"\nclusters = [\"{CLUSTER}\"]\n\
         settings = {{ clusters = [\"{CLUSTER}\"], roles = [\"dispatcher\"], ttl_seconds = {ttl} }}\n\n"
    )
}

#[allow(clippy::too_many_arguments, reason = "everything the report prints")]
fn report(
    s: &Settings,
    logs: &[NodeLog],
    seen: &[HashMap<String, Instant>],
    serials: &[String],
    revoke_sent: Instant,
    revoke_answered: Duration,
    elapsed: Duration,
    (gateway_cpu, own_cpu): (f64, f64),
    healthy: bool,
) -> BoxResult<()> {
    let joined: Vec<_> = logs.iter().filter_map(|l| l.joined).collect();
    let join_span = joined.iter().map(|(at, _)| *at).fold(0.0, f64::max);
    let mut join_latency: Vec<_> = joined.iter().map(|(_, d)| *d).collect();
    join_latency.sort();
    let renewals: Vec<_> = logs.iter().flat_map(|l| l.renewals.iter()).collect();
    let mut renew_latency: Vec<_> = renewals.iter().map(|(_, d, _)| *d).collect();
    renew_latency.sort();
    let lost: Vec<_> = logs.iter().flat_map(|l| l.lost.iter()).collect();
    let revoked = logs.iter().filter(|l| l.revoked_at.is_some()).count();
    let due = renewals.len() + lost.len();
    let success = 100.0 * renewals.len() as f64 / due.max(1) as f64;

    println!(
        "fleet: {} nodes ({} under one shared token, revoked at {} s), {} watchers, {} s SVIDs, \
         {:.0} s run, starts spread over {} s",
        s.nodes,
        s.group,
        s.seconds / 2,
        s.watchers,
        s.ttl,
        elapsed.as_secs_f64(),
        s.ramp
    );
    println!();
    println!("| measure | value |");
    println!("| --- | ---: |");
    println!(
        "| joins | {} of {} in {join_span:.2} s ({:.0}/s), {} retried attempts |",
        joined.len(),
        s.nodes,
        joined.len() as f64 / join_span.max(1e-3),
        logs.iter().map(|l| l.join_retries).sum::<u32>()
    );
    println!(
        "| join latency p50 / p99 | {:.1} / {:.1} ms |",
        ms(percentile(&join_latency, 50.0)),
        ms(percentile(&join_latency, 99.0))
    );
    println!(
        "| renewals | {} ({:.1}/s over the run), {} retried attempts |",
        renewals.len(),
        renewals.len() as f64 / elapsed.as_secs_f64(),
        logs.iter().map(|l| l.renew_retries).sum::<u32>()
    );
    println!(
        "| renewal latency p50 / p99 | {:.1} / {:.1} ms |",
        ms(percentile(&renew_latency, 50.0)),
        ms(percentile(&renew_latency, 99.0))
    );
    println!(
        "| renewal success (SLO {}%) | {success:.3}% ({} lost) — {} |",
        s.slo,
        lost.len(),
        if success >= s.slo { "met" } else { "MISSED" }
    );

    // Spread: per-second renewal counts once the first generation has come round.
    let first = s.ttl as f64 * 0.5;
    let mut per_second = vec![0usize; elapsed.as_secs() as usize + 1];
    for (at, _, _) in &renewals {
        if *at >= first {
            per_second[*at as usize] += 1;
        }
    }
    let end = per_second.len().saturating_sub(1);
    let window = &per_second[(first.ceil() as usize).min(end)..end];
    let mean = window.iter().sum::<usize>() as f64 / window.len().max(1) as f64;
    let peak = window.iter().copied().max().unwrap_or(0);
    println!(
        "| renewals per second after {first:.0} s: mean / peak | {mean:.1} / {peak} (peak {:.2}× mean) |",
        peak as f64 / mean.max(1e-9)
    );
    let mut position: Vec<f64> = renewals.iter().map(|(_, _, p)| *p).collect();
    position.sort_by(f64::total_cmp);
    let at = |p: f64| position.get(((position.len().max(1) - 1) as f64 * p) as usize);
    println!(
        "| renewal sent at share of lifetime p1 / p50 / p99 | {:.2} / {:.2} / {:.2} |",
        at(0.01).copied().unwrap_or(0.0),
        at(0.50).copied().unwrap_or(0.0),
        at(0.99).copied().unwrap_or(0.0)
    );

    // Fan-out: when each watcher held every serial the revocation named.
    let mut fanout = Vec::new();
    let mut incomplete = 0;
    for watcher in seen {
        let last = serials
            .iter()
            .map(|serial| watcher.get(serial))
            .collect::<Option<Vec<_>>>();
        match last.and_then(|times| times.into_iter().max().copied()) {
            Some(t) => fanout.push(t.saturating_duration_since(revoke_sent)),
            None => incomplete += 1,
        }
    }
    fanout.sort();
    println!(
        "| revocation: serials revoked / nodes refused afterwards | {} / {} of {} |",
        serials.len(),
        revoked,
        s.group
    );
    println!(
        "| revocation fan-out to {} watchers p50 / p99 / max | {:.0} / {:.0} / {:.0} ms ({} incomplete; admin answered in {:.0} ms) |",
        s.watchers,
        ms(percentile(&fanout, 50.0)),
        ms(percentile(&fanout, 99.0)),
        ms(fanout.last().copied().unwrap_or_default()),
        incomplete,
        ms(revoke_answered)
    );
    let operations = (joined.len() + renewals.len()).max(1) as f64;
    println!(
        "| CPU over the run: gateway / simulator | {gateway_cpu:.1} / {own_cpu:.1} s ({:.0} % / {:.0} % of one core; {:.0} / {:.0} µs per join or renewal; {} cores) |",
        100.0 * gateway_cpu / elapsed.as_secs_f64(),
        100.0 * own_cpu / elapsed.as_secs_f64(),
        gateway_cpu * 1e6 / operations,
        own_cpu * 1e6 / operations,
        cores()
    );
    println!("| gateway healthy at the end | {healthy} |");
    for why in lost.iter().take(5) {
        println!("lost: {why}");
    }
    let wrong_refusals = logs
        .iter()
        .filter(|l| !l.in_group && l.revoked_at.is_some())
        .count();
    if wrong_refusals > 0 || incomplete > 0 || !healthy {
        return Err(format!(
            "{wrong_refusals} nodes outside the group were refused as revoked; {incomplete} watchers missed serials"
        )
        .into());
    }
    Ok(())
}
