//! Durable joins per second against the real gateway binary on this machine.
//!
//! Starts `omnirelay init` + `omnirelay serve` (release build) on loopback, prepares every node
//! before the clock starts (P-256 key, CSR, its own one-use token issued through the admin
//! API), then runs each scenario — fresh TLS connection per join or a kept-alive connection per
//! node, with 1 and 16 nodes joining at once — and reports joins/s and latency percentiles of a
//! whole join (challenge + join). Also measures the crypto-only ceiling in-process: token
//! verify + CSR verify + CA sign, on every core.
//!
//! `cargo build --release -p gateway -p omnirelay-bench && target/release/join_load [--joins N]`

#![allow(clippy::print_stdout, reason = "a benchmark prints its results")]

use std::error::Error;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use gateway::api::wire::{Challenge, IssueTokenRequest, IssueTokenResponse, JoinRequest};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use omnirelay_bench::{cpu_seconds, percentile};

type BoxResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// One prepared node: everything but the challenge exists before the clock starts.
struct Prepared {
    name: String,
    token: String,
    csr: String,
}

fn main() -> BoxResult<()> {
    let joins: usize = arg("--joins").unwrap_or(4000);
    let bin = arg::<PathBuf>("--bin").unwrap_or_else(|| sibling("omnirelay"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(joins, &bin))
}

async fn run(joins: usize, bin: &Path) -> BoxResult<()> {
    // `--only keep16` (fresh1, fresh16, keep1, keep16) runs one scenario, e.g. for profiling.
    let only: Option<String> = arg("--only");
    let dir = std::env::temp_dir().join(format!("omnirelay-bench-{}", std::process::id()));
    let gateway = GatewayProcess::start(bin, &dir)?;
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
        let nodes = prepare(&gateway, &tls, count, concurrency).await?;
        let (server_before, loader_before) = (
            cpu_seconds(gateway.child.id()),
            cpu_seconds(std::process::id()),
        );
        let result = drive(&gateway, &tls, nodes, fresh, concurrency).await?;
        let server_cpu = cpu_seconds(gateway.child.id()) - server_before;
        let loader_cpu = cpu_seconds(std::process::id()) - loader_before;
        cpu_notes.push(format!(
            "{label}: CPU per join: gateway {:.0} µs, load generator {:.0} µs; machine busy {:.0}% of {} cores",
            server_cpu * 1e6 / result.ok.max(1) as f64,
            loader_cpu * 1e6 / result.ok.max(1) as f64,
            100.0 * (server_cpu + loader_cpu) / (result.elapsed.as_secs_f64() * cores() as f64),
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
    println!();
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
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

struct Outcome {
    ok: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// Joins every prepared node, `concurrency` at a time.
async fn drive(
    gateway: &GatewayProcess,
    tls: &Arc<rustls::ClientConfig>,
    nodes: Vec<Prepared>,
    fresh: bool,
    concurrency: usize,
) -> BoxResult<Outcome> {
    let nodes = Arc::new(nodes);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (nodes, next, tls, addr) = (nodes.clone(), next.clone(), tls.clone(), gateway.node);
        workers.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            let mut connection: Option<SendRequest<Full<Bytes>>> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(node) = nodes.get(i) else { break };
                let begin = Instant::now();
                if fresh || !connection.as_ref().is_some_and(|c| c.is_ready()) {
                    connection = connect(&tls, addr).await.ok();
                }
                let Some(sender) = connection.as_mut() else {
                    errors += 1;
                    continue;
                };
                match join_once(sender, node).await {
                    Ok(()) => latencies.push(begin.elapsed()),
                    Err(e) => {
                        if errors == 0 {
                            eprintln!("first error of a worker: {e}");
                        }
                        errors += 1;
                        connection = None;
                    }
                }
            }
            (latencies, errors)
        });
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    while let Some(done) = workers.join_next().await {
        let (l, e) = done?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Ok(Outcome {
        ok: latencies.len(),
        errors,
        elapsed,
        latencies,
    })
}

async fn join_once(sender: &mut SendRequest<Full<Bytes>>, node: &Prepared) -> BoxResult<()> {
    let (status, body) = send(sender, "GET", "/v1/bootstrap/challenge", Bytes::new()).await?;
    if status != 200 {
        return Err(format!("challenge: HTTP {status}").into());
    }
    let challenge: Challenge = serde_json::from_slice(&body)?;
    let request = JoinRequest {
        token: node.token.clone(),
        node_name: node.name.clone(),
        csr: node.csr.clone(),
        idempotency_key: None,
        attestation: serde_json::json!({
            "kind": "token-only",
            "nonce": challenge.nonce,
            "issued_at_ms": now_ms(),
        }),
    };
    let (status, body) = send(
        sender,
        "POST",
        "/v1/bootstrap/join",
        Bytes::from(serde_json::to_vec(&request)?),
    )
    .await?;
    if status != 200 {
        return Err(format!("join: HTTP {status}: {}", String::from_utf8_lossy(&body)).into());
    }
    Ok(())
}

async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: Bytes,
) -> BoxResult<(u16, Bytes)> {
    sender.ready().await?;
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(body))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

async fn connect(
    tls: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> BoxResult<SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = TlsConnector::from(tls.clone())
        .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp)
        .await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Trusts only the gateway's CA; no session resumption, so "fresh" means a full handshake as
/// a node that never connected before would do.
fn tls_config(bundle: &[u8]) -> BoxResult<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Keys, CSRs and one-use tokens (issued through the admin API), before the clock starts.
async fn prepare(
    gateway: &GatewayProcess,
    tls: &Arc<rustls::ClientConfig>,
    count: usize,
    concurrency: usize,
) -> BoxResult<Vec<Prepared>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(8) {
        let (next, tls, addr, credential) = (
            next.clone(),
            tls.clone(),
            gateway.admin,
            gateway.credential.clone(),
        );
        workers.spawn(async move {
            let mut sender = connect(&tls, addr).await?;
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let issue = IssueTokenRequest {
                    cluster: "edge-eu".into(),
                    role: "dispatcher".into(),
                    ttl_seconds: 3600,
                    max_uses: 1,
                    issued_by: Some("bench".into()),
                    node: None,
                    supersede: false,
                };
                sender.ready().await?;
                let request = hyper::Request::post("/admin/v1/tokens")
                    .header("host", "127.0.0.1")
                    .header("authorization", format!("Bearer {credential}"))
                    .body(Full::new(Bytes::from(serde_json::to_vec(&issue)?)))?;
                let response = sender.send_request(request).await?;
                let body = response.into_body().collect().await?.to_bytes();
                let issued: IssueTokenResponse = serde_json::from_slice(&body)?;
                let key = rcgen::KeyPair::generate()?;
                let csr = rcgen::CertificateParams::default()
                    .serialize_request(&key)?
                    .pem()?;
                out.push(Prepared {
                    name: format!("node-{}", issued.id),
                    token: issued.token,
                    csr,
                });
            }
            Ok::<_, Box<dyn Error + Send + Sync>>(out)
        });
    }
    let mut nodes = Vec::with_capacity(count);
    while let Some(done) = workers.join_next().await {
        nodes.extend(done??);
    }
    Ok(nodes)
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

/// The gateway under load, as a separate process.
struct GatewayProcess {
    child: Child,
    node: SocketAddr,
    admin: SocketAddr,
    credential: String,
}

impl GatewayProcess {
    fn start(bin: &Path, dir: &Path) -> BoxResult<Self> {
        let init = Command::new(bin)
            .args([
                "init",
                "--force",
                "--trust-domain",
                "bench.omnirelay.example",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--dir",
            ])
            .arg(dir)
            .output()?;
        if !init.status.success() {
            return Err(format!("init: {}", String::from_utf8_lossy(&init.stderr)).into());
        }
        let config = dir.join("gateway.toml");
        let mut text = std::fs::read_to_string(&config)?;
        // The load comes from one address with one role: lift the abuse limits, which are not
        // what is measured here; keep everything else at its default.
        text.push_str(
            "\n[limits]\nglobal = { per_second = 1000000, burst = 1000000 }\n\
             per_ip = { per_second = 1000000, burst = 1000000 }\n\
             per_cluster = { per_second = 1000000, burst = 1000000 }\n\
             [log]\nformat = \"json\"\nfilter = \"warn,gateway::app=info\"\n",
        );
        std::fs::write(&config, text)?;
        let mut child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&config)
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
        let line = loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("gateway serving") => break line,
                Some(Ok(_)) => continue,
                _ => return Err("the gateway exited before listening".into()),
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let log: serde_json::Value = serde_json::from_str(&line)?;
        let addr = |k: &str| -> BoxResult<SocketAddr> {
            Ok(log["fields"][k].as_str().ok_or("no address")?.parse()?)
        };
        let credential = std::fs::read_to_string(dir.join("admin/credential"))?
            .trim()
            .to_string();
        Ok(Self {
            node: addr("node_addr")?,
            admin: addr("admin_addr")?,
            child,
            credential,
        })
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn arg<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
