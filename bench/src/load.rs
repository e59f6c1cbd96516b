//! The load generator's side of a join, shared by the binaries that drive the real gateway:
//! the gateway as a child process, TLS clients, prepared nodes, and the join loop.

use std::error::Error;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use gateway::api::wire::{
    Challenge, IssueTokenRequest, IssueTokenResponse, JoinRequest, JoinResponse, RenewRequest,
};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Errors of a benchmark run: printed, then the run stops.
pub type BoxResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// One prepared node: everything but the challenge exists before the clock starts.
#[derive(Debug)]
pub struct Prepared {
    /// The node name.
    pub name: String,
    /// Its one-use token.
    pub token: String,
    /// Its CSR, PEM.
    pub csr: String,
}

/// What one scenario measured.
#[derive(Debug)]
pub struct Outcome {
    /// Joins that succeeded.
    pub ok: usize,
    /// Joins that failed.
    pub errors: usize,
    /// Wall time of the whole scenario.
    pub elapsed: Duration,
    /// Latency of each successful join (challenge + join), sorted.
    pub latencies: Vec<Duration>,
}

/// Joins every prepared node, `concurrency` at a time, at the node listeners `gateways`
/// (replicas of one fleet): worker `w` joins through `gateways[w % len]`, so the load is
/// spread evenly over them, as behind a round-robin load balancer.
pub async fn drive(
    gateways: &[SocketAddr],
    tls: &Arc<rustls::ClientConfig>,
    nodes: Vec<Prepared>,
    fresh: bool,
    concurrency: usize,
) -> BoxResult<Outcome> {
    if gateways.is_empty() {
        return Err("no gateway address to join through".into());
    }
    let nodes = Arc::new(nodes);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let addr = gateways[worker % gateways.len()];
        let (nodes, next, tls) = (nodes.clone(), next.clone(), tls.clone());
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
    gather(workers, started).await
}

/// Waits for every worker's latencies and error count; the scenario's outcome.
async fn gather(
    mut workers: tokio::task::JoinSet<(Vec<Duration>, usize)>,
    started: Instant,
) -> BoxResult<Outcome> {
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

/// One join as a node does it: a challenge, then the join; anything but 200 is an error.
pub async fn join_once(sender: &mut SendRequest<Full<Bytes>>, node: &Prepared) -> BoxResult<()> {
    join_for(sender, node).await.map(drop)
}

/// [`join_once`], returning the gateway's answer (the body is parsed only here, outside the
/// timed join loop).
pub async fn join_answer(
    sender: &mut SendRequest<Full<Bytes>>,
    node: &Prepared,
) -> BoxResult<JoinResponse> {
    Ok(serde_json::from_slice(&join_for(sender, node).await?)?)
}

async fn join_for(sender: &mut SendRequest<Full<Bytes>>, node: &Prepared) -> BoxResult<Bytes> {
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
    Ok(body)
}

/// A node that joined before the clock started: its SVID, its key, and the CSRs (new keys)
/// of the renewals it will make.
#[derive(Debug)]
pub struct Renewing {
    /// The SVID chain, PEM.
    pub chain_pem: String,
    /// Its key, PKCS#8 PEM.
    pub key_pem: String,
    /// One CSR per renewal, PEM.
    pub csrs: Vec<String>,
}

/// Joins `nodes` nodes and prepares `renewals` CSRs for each, before the clock starts.
pub async fn prepare_renewals(
    gateway: &GatewayProcess,
    tls: &Arc<rustls::ClientConfig>,
    nodes: usize,
    renewals: usize,
) -> BoxResult<Vec<Renewing>> {
    let joining = prepare(gateway, tls, "edge-eu", nodes, nodes).await?;
    let mut sender = connect(tls, gateway.node).await?;
    let mut out = Vec::with_capacity(nodes);
    for node in joining {
        // The node's own key this time (`prepare` keeps only the CSR).
        let key = rcgen::KeyPair::generate()?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)?
            .pem()?;
        let joined = join_answer(&mut sender, &Prepared { csr, ..node }).await?;
        let csrs = (0..renewals)
            .map(|_| {
                let key = rcgen::KeyPair::generate()?;
                Ok(rcgen::CertificateParams::default()
                    .serialize_request(&key)?
                    .pem()?)
            })
            .collect::<BoxResult<Vec<_>>>()?;
        out.push(Renewing {
            chain_pem: joined.certificate_chain,
            key_pem: key.serialize_pem(),
            csrs,
        });
    }
    Ok(out)
}

/// Every node renews its CSRs back to back on one kept-alive mTLS connection presenting its
/// SVID, all nodes at once. Each answer is durable before it is sent.
pub async fn drive_renewals(
    gateway: &GatewayProcess,
    bundle: &[u8],
    nodes: Vec<Renewing>,
) -> BoxResult<Outcome> {
    let mut configs = Vec::with_capacity(nodes.len());
    for node in &nodes {
        configs.push(mtls_config(bundle, &node.chain_pem, &node.key_pem)?);
    }
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for (node, tls) in nodes.into_iter().zip(configs) {
        let addr = gateway.node;
        workers.spawn(async move {
            let mut latencies = Vec::with_capacity(node.csrs.len());
            let mut errors = 0usize;
            let mut connection: Option<SendRequest<Full<Bytes>>> = None;
            for csr in node.csrs {
                let begin = Instant::now();
                if !connection.as_ref().is_some_and(|c| c.is_ready()) {
                    connection = connect(&tls, addr).await.ok();
                }
                let Some(sender) = connection.as_mut() else {
                    errors += 1;
                    continue;
                };
                let body = serde_json::to_vec(&RenewRequest {
                    csr,
                    idempotency_key: None,
                })
                .map(Bytes::from);
                let outcome = match body {
                    Ok(body) => send(sender, "POST", "/v1/bootstrap/renew", body).await,
                    Err(e) => Err(e.into()),
                };
                match outcome {
                    Ok((200, _)) => latencies.push(begin.elapsed()),
                    other => {
                        if errors == 0 {
                            eprintln!("first renewal error of a node: {other:?}");
                        }
                        errors += 1;
                        connection = None;
                    }
                }
            }
            (latencies, errors)
        });
    }
    gather(workers, started).await
}

/// [`tls_config`] presenting `chain_pem` and its key as the client certificate.
pub fn mtls_config(
    bundle: &[u8],
    chain_pem: &str,
    key_pem: &str,
) -> BoxResult<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle) {
        roots.add(cert?)?;
    }
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// One request on a kept-alive connection: the status and the body.
pub async fn send(
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

/// A TLS connection to `addr`, ready for HTTP/1.1 requests.
pub async fn connect(
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
pub fn tls_config(bundle: &[u8]) -> BoxResult<Arc<rustls::ClientConfig>> {
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

/// Issues a token for `cluster` (role `dispatcher`, an hour) through the admin API.
pub async fn issue_token(
    admin: &mut SendRequest<Full<Bytes>>,
    credential: &str,
    cluster: &str,
    max_uses: u32,
) -> BoxResult<IssueTokenResponse> {
    let issue = IssueTokenRequest {
        cluster: cluster.into(),
        role: "dispatcher".into(),
        ttl_seconds: 3600,
        max_uses,
        issued_by: Some("bench".into()),
        node: None,
        supersede: false,
    };
    admin.ready().await?;
    let request = hyper::Request::post("/admin/v1/tokens")
        .header("host", "127.0.0.1")
        .header("authorization", format!("Bearer {credential}"))
        .body(Full::new(Bytes::from(serde_json::to_vec(&issue)?)))?;
    let response = admin.send_request(request).await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

/// Keys, CSRs and one-use tokens for `cluster` (role `dispatcher`, issued through the admin
/// API), before the clock starts.
pub async fn prepare(
    gateway: &GatewayProcess,
    tls: &Arc<rustls::ClientConfig>,
    cluster: &str,
    count: usize,
    concurrency: usize,
) -> BoxResult<Vec<Prepared>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(8) {
        let (next, tls, addr, credential, cluster) = (
            next.clone(),
            tls.clone(),
            gateway.admin,
            gateway.credential.clone(),
            cluster.to_string(),
        );
        workers.spawn(async move {
            let mut sender = connect(&tls, addr).await?;
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let issued = issue_token(&mut sender, &credential, &cluster, 1).await?;
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

/// The gateway under load, as a separate process.
#[derive(Debug)]
pub struct GatewayProcess {
    /// The `omnirelay serve` process.
    pub child: Child,
    /// The node listener.
    pub node: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The admin credential.
    pub credential: String,
}

impl GatewayProcess {
    /// `omnirelay init` into `dir`, then `omnirelay serve` on loopback ports, with the
    /// abuse limits lifted. `policies` (TOML `[[policies]]` entries) go before the ones `init`
    /// wrote, so they decide first for the clusters they name.
    pub fn start(bin: &Path, dir: &Path, policies: &str) -> BoxResult<Self> {
        Self::start_on(bin, dir, policies, None)
    }

    /// [`start`](Self::start), on the PostgreSQL database at `postgres` (a `key=value` or
    /// `postgres://` URL without a password; an empty database) when given, else on SQLite.
    pub fn start_on(
        bin: &Path,
        dir: &Path,
        policies: &str,
        postgres: Option<&str>,
    ) -> BoxResult<Self> {
        Self::start_edited(bin, dir, |text| {
            if let Some(first) = text.find("[[policies]]") {
                text.insert_str(first, policies);
            }
            if let Some(url) = postgres {
                *text = text.replacen("[store]\n", "[store]\nbackend = \"postgres\"\n", 1);
                text.push_str(&format!("\n[store.postgres]\nurl = {url:?}\n"));
            }
        })
    }

    /// `omnirelay init` into `dir`, then `omnirelay serve` following the policy repository at
    /// `repo` (see [`policy_repository`]) instead of the `[[policies]]` `init` wrote; with
    /// `shadow`, its `candidate` branch decides in shadow beside the release.
    pub fn start_following(bin: &Path, dir: &Path, repo: &Path, shadow: bool) -> BoxResult<Self> {
        let mut failed = None;
        let gateway = Self::start_edited(bin, dir, |text| {
            // `init` writes the `[[policies]]` last.
            let Some(start) = text.find("[[policies]]") else {
                failed = Some("gateway.toml has no [[policies]] to replace");
                return;
            };
            let end = text.len();
            let candidate = if shadow {
                "candidate_branch = \"candidate\"\n"
            } else {
                ""
            };
            text.replace_range(
                start..end,
                &format!(
                    "[policy.source]\ngit = \"{}\"\npoll_interval = \"1h\"\n{candidate}\n",
                    repo.display()
                ),
            );
        });
        match failed {
            Some(why) => Err(why.into()),
            None => gateway,
        }
    }

    /// `omnirelay init` into `dir`, `edit` applied to its `gateway.toml`, the abuse limits
    /// lifted, then `omnirelay serve`.
    fn start_edited(bin: &Path, dir: &Path, edit: impl FnOnce(&mut String)) -> BoxResult<Self> {
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
        edit(&mut text);
        // The load comes from one address with one role: lift the abuse limits, which are not
        // what is measured here; keep everything else at its default.
        text.push_str(
            "\n[limits]\nglobal = { per_second = 1000000, burst = 1000000 }\n\
             per_ip = { per_second = 1000000, burst = 1000000 }\n\
             per_cluster = { per_second = 1000000, burst = 1000000 }\n\
             per_token = { per_second = 1000000, burst = 1000000 }\n\
             [log]\nformat = \"json\"\nfilter = \"warn,gateway::app=info\"\n",
        );
        std::fs::write(&config, text)?;
        Self::serve(bin, dir)
    }

    /// Another replica of the gateway started in `from` (same CA, keys and database), its
    /// state copied into `dir` without the audit file (each replica keeps its own mirror).
    pub fn replica(bin: &Path, from: &Path, dir: &Path) -> BoxResult<Self> {
        let _ = std::fs::remove_dir_all(dir);
        let copied = Command::new("cp").arg("-a").arg(from).arg(dir).status()?;
        if !copied.success() {
            return Err(format!("copying {} to {}", from.display(), dir.display()).into());
        }
        let _ = std::fs::remove_file(dir.join("audit/audit.log"));
        // Its own policy activation state (the paths in `gateway.toml` are relative to it).
        let _ = std::fs::remove_dir_all(dir.join("state"));
        std::fs::create_dir_all(dir.join("state"))?;
        Self::serve(bin, dir)
    }

    /// `omnirelay serve` on the state in `dir`, once it listens.
    fn serve(bin: &Path, dir: &Path) -> BoxResult<Self> {
        let config = dir.join("gateway.toml");
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

/// A bare policy repository in `dir` holding `examples/policy-repo` (edge-gate, which admits
/// `edge-eu` dispatchers) published by `omnirelay policy publish` as release 1.0.0 and, the
/// same bundle again, as candidate 1.1.0 on `candidate`: in shadow it agrees on every join, so
/// what is measured is the cost of shadowing, not of disagreements.
pub fn policy_repository(bin: &Path, dir: &Path) -> BoxResult<PathBuf> {
    let repo = dir.join("policy.git");
    std::fs::create_dir_all(&repo)?;
    let init = Command::new("git")
        .args(["init", "--bare", "--quiet"])
        .arg(&repo)
        .status()?;
    if !init.success() {
        return Err("git init --bare failed".into());
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy-repo");
    for extra in [
        &["--version", "1.0.0"][..],
        &["--version", "1.1.0", "--candidate"],
    ] {
        let out = Command::new(bin)
            .args(["policy", "publish", "--source"])
            .arg(&source)
            .arg("--repo")
            .arg(&repo)
            .args(extra)
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "policy publish {extra:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
    }
    Ok(repo)
}

/// The value after `name` on the command line, parsed.
pub fn arg<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
}

/// `name` in the directory of this executable (where cargo puts the gateway binary).
pub fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Wall-clock time as Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
