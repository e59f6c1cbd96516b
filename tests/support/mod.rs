//! Shared helpers for the end-to-end tests: a real `omnirelay` process over real TLS, and a
//! node that talks to it the way a dispatcher host does (or deliberately worse).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support: a failure is a failed test"
)]

pub mod bundles;
pub mod githttp;
pub mod prometheus;
pub mod raw;
pub mod sshd;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gateway::agent::{GatewayClient, Reply};
use gateway::api::wire::{Challenge, IssueTokenRequest, IssueTokenResponse, JoinRequest};
use gateway::store::TokenRecord;
use gateway::token::{Claims, SigningKey, TokenId};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

/// The binary under test: the same `main` as `omnirelay`, built by this crate. Cargo builds
/// it before running any integration test of this crate and puts it next to `deps/`, where
/// the test executables live.
pub fn bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("omnirelay-under-test");
    assert!(
        bin.exists(),
        "{} is missing; run the tests through cargo",
        bin.display()
    );
    bin
}

/// Where the build put the compiled policies (examples and hostile fixtures).
pub fn policy_dir() -> &'static Path {
    Path::new(gateway::policy::examples::BUILT_POLICY_DIR)
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs `omnirelay` with `args` to completion and returns what it printed.
pub fn omnirelay(args: &[&str]) -> std::io::Result<Output> {
    Command::new(bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
}

/// A fresh directory under the system temp dir, removed when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new, empty directory named after the test.
    pub fn new(name: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "omnirelay-e2e-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        // Private whatever the umask: a trust anchor in a directory others can write is
        // refused (as OpenSSH refuses it).
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `omnirelay init` into a new directory, listening on OS-chosen loopback ports.
pub fn init_state(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    let out = omnirelay(&[
        "init",
        "--dir",
        dir.0.to_str().unwrap(),
        "--trust-domain",
        TRUST_DOMAIN,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ])
    .unwrap();
    assert!(
        out.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// A gateway process started with `omnirelay init` + `omnirelay serve` on loopback ports
/// chosen by the OS. Killed (SIGTERM, then waited for) when dropped.
#[derive(Debug)]
pub struct Gateway {
    /// The state directory (`gateway.toml`, keys, database, audit log).
    pub dir: TempDir,
    /// Node listener.
    pub node_addr: SocketAddr,
    /// Admin listener.
    pub admin_addr: SocketAddr,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

/// The trust domain every test gateway uses.
pub const TRUST_DOMAIN: &str = "e2e.omnirelay.example";

impl Gateway {
    /// Starts a gateway on the state `omnirelay init` creates.
    pub fn start(name: &str) -> Self {
        Self::start_with(name, |_| {})
    }

    /// Starts a gateway after `edit` changed `gateway.toml` (its text is passed in). Unless
    /// `edit` sets it, refusals of unauthenticated clients are audited every 200 ms, so tests
    /// can wait for them.
    pub fn start_with(name: &str, edit: impl FnOnce(&mut String)) -> Self {
        let dir = init_state(name);
        let config = dir.0.join("gateway.toml");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str("\n[log]\nformat = \"json\"\nfilter = \"info\"\n");
        edit(&mut text);
        if !text.contains("refusal_audit_interval") {
            const QUICK: &str = "refusal_audit_interval = \"200ms\"\n";
            match text.find("\n[limits]\n") {
                Some(at) => text.insert_str(at + "\n[limits]\n".len(), QUICK),
                None => text.push_str(&format!("\n[limits]\n{QUICK}")),
            }
        }
        std::fs::write(&config, text).unwrap();
        Self::spawn(dir)
    }

    /// A default gateway shared by the tests of one test binary that cannot interfere with each
    /// other (each uses its own tokens, nodes and nonces). It lives while any test holds it and
    /// is stopped when the last one drops it; a later test then starts a fresh one.
    pub fn shared(name: &str) -> Arc<Self> {
        static SHARED: Mutex<Weak<Gateway>> = Mutex::new(Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(gw) = slot.upgrade() {
            return gw;
        }
        let gw = Arc::new(Self::start(name));
        *slot = Arc::downgrade(&gw);
        gw
    }

    /// Starts `omnirelay serve` on an existing state directory and waits until it listens.
    pub fn spawn(dir: TempDir) -> Self {
        let mut child = Command::new(bin())
            .args([
                "serve",
                "--config",
                dir.0.join("gateway.toml").to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let kept = log.clone();
        // Reads the JSON log until the "gateway serving" line, then keeps draining it so the
        // process never blocks on a full pipe; every line is kept for `log_lines`.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                kept.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line.clone());
                if line.contains("gateway serving")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(Ok(line));
                } else if (line.contains("\"ERROR\"") || line.starts_with("error:"))
                    && let Some(tx) = tx.as_ref()
                {
                    let _ = tx.send(Err(line));
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(line)) => line,
            Ok(Err(error)) => panic!("gateway failed to start: {error}"),
            Err(_) => {
                let _ = child.kill();
                panic!("gateway did not report listening within 60 s")
            }
        };
        let serving: serde_json::Value = serde_json::from_str(&line).unwrap();
        let field = |name: &str| serving["fields"][name].as_str().unwrap().parse().unwrap();
        Self {
            node_addr: field("node_addr"),
            admin_addr: field("admin_addr"),
            dir,
            child,
            log,
        }
    }

    /// Every line the gateway wrote to stderr so far (its log).
    pub fn log_lines(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops the process (SIGTERM) and waits for it; returns its exit status.
    pub fn stop(mut self) -> (TempDir, std::process::ExitStatus) {
        let status = self.terminate();
        let dir = std::mem::replace(&mut self.dir, TempDir(PathBuf::new()));
        std::mem::forget(self);
        (dir, status)
    }

    /// Pins both listeners in `gateway.toml` to the addresses the OS chose at this start, so a
    /// restart on the same state (after [`kill`](Self::kill)) comes back where nodes already
    /// dial. The listeners set `SO_REUSEADDR`, so the ports can be bound again at once.
    pub fn pin_addresses(&self) {
        let config = self.path("gateway.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        let any = "listen = \"127.0.0.1:0\"";
        assert_eq!(text.matches(any).count(), 2, "{text}");
        // `init` writes `[server]` before `[admin]`.
        let text = text
            .replacen(any, &format!("listen = \"{}\"", self.node_addr), 1)
            .replacen(any, &format!("listen = \"{}\"", self.admin_addr), 1);
        std::fs::write(&config, text).unwrap();
    }

    /// Kills the process with SIGKILL, as a crash or the OOM killer would (no shutdown, no
    /// flush), waits for it and returns its state directory.
    pub fn kill(mut self) -> TempDir {
        // `Child::kill` sends SIGKILL on Unix.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let dir = std::mem::replace(&mut self.dir, TempDir(PathBuf::new()));
        std::mem::forget(self);
        dir
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }

    /// A path inside the state directory.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.0.join(relative)
    }

    /// The CA bundle nodes are given: the configured CA, or after a CA rotation every CA the
    /// rotation keeps in the bundle (read as the CLI reads it).
    pub fn bundle(&self) -> Vec<u8> {
        if !self.path("ca/rotation.json").exists() {
            return std::fs::read(self.path("ca/ca.pem")).unwrap();
        }
        let config = gateway::config::Config::load(&self.path("gateway.toml")).unwrap();
        gateway::identity::trust_bundle(&config.identity).unwrap()
    }

    /// A client for the node API.
    pub fn node(&self) -> GatewayClient {
        GatewayClient::new(&format!("https://{}", self.node_addr), &self.bundle()).unwrap()
    }

    /// A client for the node API that connects from `ip` (any address of 127.0.0.0/8 reaches
    /// the loopback listener on Linux), posing as another client.
    pub fn node_from(&self, ip: &str) -> GatewayClient {
        self.node().with_local_addr(ip.parse().unwrap())
    }

    /// The value of the metric series `series` (name and labels exactly as rendered), if the
    /// gateway exports it.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let reply = self.admin().get("/metrics").await.unwrap();
        assert_eq!(reply.status, 200);
        let text = String::from_utf8(reply.body.to_vec()).unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|value| value.trim().parse().unwrap())
    }

    /// The audit file's size, bytes.
    pub fn audit_bytes(&self) -> u64 {
        std::fs::metadata(self.path("audit/audit.log")).map_or(0, |m| m.len())
    }

    /// The `refusals-coalesced` entries for `client` and `reason`, and the sum of their
    /// counts.
    pub fn coalesced(&self, client: &str, reason: &str) -> (Vec<serde_json::Value>, u64) {
        coalesced_in(&self.audit_events(), client, reason)
    }

    /// Waits (polling, with a deadline) until the coalesced refusals of `client` for `reason`
    /// count at least `count`; returns the entries and their total.
    pub fn wait_for_coalesced(
        &self,
        client: &str,
        reason: &str,
        count: u64,
    ) -> (Vec<serde_json::Value>, u64) {
        let events = self.audit_until(
            &format!("{count} refusals of {client} for {reason}"),
            |events| coalesced_in(events, client, reason).1 >= count,
        );
        coalesced_in(&events, client, reason)
    }

    /// An authenticated client for the admin API.
    pub fn admin(&self) -> GatewayClient {
        let credential = std::fs::read_to_string(self.path("admin/credential")).unwrap();
        GatewayClient::new(&format!("https://{}", self.admin_addr), &self.bundle())
            .unwrap()
            .with_bearer(credential.trim().to_string())
    }

    /// The gateway listens on ports the OS chose, while `gateway.toml` still says port 0; write
    /// the admin port it got into the file, as an operator's config would name it (so the CLI's
    /// `--config` reaches it). Returns the config's path.
    pub fn config_naming_the_admin_port(&self) -> String {
        let path = self.path("gateway.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        if text.contains(&format!("listen = \"{}\"", self.admin_addr)) {
            return path.display().to_string();
        }
        let pinned = text.replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"{}\"", self.admin_addr),
        );
        assert_ne!(
            pinned, text,
            "gateway.toml has no [admin] listen line to pin"
        );
        std::fs::write(&path, pinned).unwrap();
        path.display().to_string()
    }

    /// Issues a token through the admin API.
    pub async fn issue_token(
        &self,
        cluster: &str,
        role: &str,
        max_uses: u32,
    ) -> IssueTokenResponse {
        self.issue_token_with(IssueTokenRequest {
            cluster: cluster.into(),
            role: role.into(),
            ttl_seconds: 900,
            max_uses,
            issued_by: Some("e2e".into()),
            node: None,
            supersede: false,
        })
        .await
    }

    /// Issues the token `request` describes through the admin API.
    pub async fn issue_token_with(&self, request: IssueTokenRequest) -> IssueTokenResponse {
        let reply = self
            .admin()
            .post("/admin/v1/tokens", serde_json::to_vec(&request).unwrap())
            .await
            .unwrap();
        assert_eq!(
            reply.status,
            201,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        serde_json::from_slice(&reply.body).unwrap()
    }

    /// Every registered token, through the admin API.
    pub async fn tokens(&self) -> Vec<TokenRecord> {
        let reply = self.admin().get("/admin/v1/tokens").await.unwrap();
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        serde_json::from_slice(&reply.body).unwrap()
    }

    /// The registered token with audit id `id`, if any.
    pub async fn token(&self, id: &str) -> Option<TokenRecord> {
        self.tokens()
            .await
            .into_iter()
            .find(|t| t.id.to_string() == id)
    }

    /// The serials the SQLite store recorded for `token_id` (table `identities`), read through
    /// a read-only connection of our own.
    pub fn recorded_serials(&self, token_id: &str) -> Vec<String> {
        let db = rusqlite::Connection::open_with_flags(
            self.path("state/gateway.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut query = db
            .prepare("SELECT serial FROM identities WHERE token_id = ?1 ORDER BY serial")
            .unwrap();
        query
            .query_map([token_id], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// The gateway's token-signing key (tests use it to forge tokens the gateway never issued).
    pub fn signing_key(&self) -> SigningKey {
        SigningKey::from_pkcs8_pem(
            &std::fs::read_to_string(self.path("token/signing.key")).unwrap(),
        )
        .unwrap()
    }

    /// The audit log's complete lines (a line still being appended is left for the next read).
    pub fn audit_lines(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.path("audit/audit.log")).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete.lines().map(str::to_string).collect()
    }

    /// The events of the audit log, in order.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        self.audit_lines()
            .iter()
            .map(|line| {
                let mut entry: serde_json::Value = serde_json::from_str(line).unwrap();
                entry["event"].take()
            })
            .collect()
    }

    /// Waits (polling, with a deadline) until `done` holds for the audit log's events, and
    /// returns them. `what` names the wait in the failure message.
    pub fn audit_until(
        &self,
        what: &str,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let events = self.audit_events();
            if done(&events) {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "audit log never reached: {what}; it holds {events:#?}"
            );
            std::thread::yield_now();
        }
    }

    /// Waits (polling, with a deadline) until the audit file has an entry of `kind` for
    /// which `matches` holds, and returns it. The file is mirrored right after each commit.
    pub fn wait_for_audit(
        &self,
        kind: &str,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let events = self.audit_until(&format!("a matching {kind} entry"), |events| {
            events.iter().any(|e| e["kind"] == kind && matches(e))
        });
        events
            .into_iter()
            .find(|e| e["kind"] == kind && matches(e))
            .unwrap()
    }

    /// Revokes through the admin API (`POST /admin/v1/revoke`, `target` naming one of `token`,
    /// `spiffe_id`, `serial` and a `reason`); the revocation must be accepted.
    pub async fn revoke(&self, target: serde_json::Value) {
        let reply = self
            .admin()
            .post("/admin/v1/revoke", serde_json::to_vec(&target).unwrap())
            .await
            .unwrap();
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
    }

    /// `openssl crl -verify` of the DER CRL `der` against the CA certificate `ca_pem`: must
    /// verify; returns openssl's text of it, lowercased.
    pub fn openssl_crl(&self, der: &[u8], ca_pem: &[u8]) -> String {
        let (crl, ca) = (self.path("check.crl"), self.path("check-ca.pem"));
        std::fs::write(&crl, der).unwrap();
        std::fs::write(&ca, ca_pem).unwrap();
        let out = std::process::Command::new("openssl")
            .args([
                "crl", "-inform", "DER", "-noout", "-text", "-verify", "-CAfile",
            ])
            .arg(&ca)
            .arg("-in")
            .arg(&crl)
            .output()
            .unwrap();
        let verdict = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
        assert!(
            out.status.success() && verdict.contains("verify ok"),
            "{verdict}"
        );
        String::from_utf8_lossy(&out.stdout).to_ascii_lowercase()
    }

    /// The audit events of `kind` that name `token_id`.
    pub fn audit_for(&self, kind: &str, token_id: &str) -> Vec<serde_json::Value> {
        self.audit_events()
            .into_iter()
            .filter(|e| e["kind"] == kind && e["token_id"] == token_id)
            .collect()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// The `refusals-coalesced` entries among `events` for `client` and `reason`, and the sum of
/// their counts.
pub fn coalesced_in(
    events: &[serde_json::Value],
    client: &str,
    reason: &str,
) -> (Vec<serde_json::Value>, u64) {
    let entries: Vec<serde_json::Value> = events
        .iter()
        .filter(|e| {
            e["kind"] == "refusals-coalesced" && e["client"] == client && e["reason"] == reason
        })
        .cloned()
        .collect();
    let total = entries.iter().map(|e| e["count"].as_u64().unwrap()).sum();
    (entries, total)
}

/// Claims for a token the tests sign themselves.
pub fn claims(cluster: &str, role: &str, max_uses: u32) -> Claims {
    let now = unix_now();
    Claims {
        id: TokenId::random(),
        issuer: "omnirelay".into(),
        audience: TRUST_DOMAIN.into(),
        cluster: cluster.into(),
        role: role.into(),
        issued_at: now,
        not_before: now,
        expires_at: now + 600,
        max_uses,
        node: None,
        supersede: false,
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A node's key and CSR.
#[derive(Debug)]
pub struct NodeKey {
    /// The key (stays with the test, as it would stay on the node).
    pub key: rcgen::KeyPair,
    /// The CSR, PEM.
    pub csr: String,
}

impl NodeKey {
    /// A P-256 key and a plain CSR.
    pub fn new(node: &str) -> Self {
        Self::with_params(node, |_| {})
    }

    /// A CSR whose parameters `edit` can make hostile (CA:true, extra SANs).
    pub fn with_params(node: &str, edit: impl FnOnce(&mut rcgen::CertificateParams)) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, node);
        edit(&mut params);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        Self { key, csr }
    }
}

/// Fetches a challenge nonce.
pub async fn challenge(node: &GatewayClient) -> Challenge {
    let reply = node.get("/v1/bootstrap/challenge").await.unwrap();
    assert_eq!(reply.status, 200);
    serde_json::from_slice(&reply.body).unwrap()
}

/// Token-only evidence for `nonce`, stamped now.
pub fn token_only(nonce: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "token-only",
        "nonce": nonce,
        "issued_at_ms": SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64,
    })
}

/// A complete join request with a fresh challenge and token-only evidence.
pub async fn join_request(
    node: &GatewayClient,
    token: &str,
    name: &str,
    key: &NodeKey,
) -> JoinRequest {
    let nonce = challenge(node).await.nonce;
    JoinRequest {
        token: token.to_string(),
        node_name: name.to_string(),
        csr: key.csr.clone(),
        idempotency_key: None,
        attestation: token_only(&nonce),
    }
}

/// A fresh node `name` joins with `token`; the join must succeed.
pub async fn join_ok(gw: &Gateway, token: &str, name: &str) -> gateway::api::wire::JoinResponse {
    join_as(&gw.node(), token, name, &NodeKey::new(name)).await
}

/// A join with `key` that must succeed: the response, parsed.
pub async fn join_as(
    node: &GatewayClient,
    token: &str,
    name: &str,
    key: &NodeKey,
) -> gateway::api::wire::JoinResponse {
    let reply = post_join(node, &join_request(node, token, name, key).await).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    serde_json::from_slice(&reply.body).unwrap()
}

/// Posts a join request.
pub async fn post_join(node: &GatewayClient, request: &JoinRequest) -> Reply {
    node.post("/v1/bootstrap/join", serde_json::to_vec(request).unwrap())
        .await
        .unwrap()
}

/// The problem document of a refusal, after checking its content type.
pub fn problem(reply: &Reply) -> gateway::api::wire::Problem {
    assert_eq!(
        reply.headers.get("content-type").unwrap(),
        "application/problem+json",
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    serde_json::from_slice(&reply.body).unwrap()
}

/// Verifies the leaf of `chain_pem` against the CA certificates in `bundle_pem` with
/// rustls-webpki, for both TLS roles (an SVID serves and dials).
pub fn verify_with_webpki(chain_pem: &str, bundle_pem: &[u8]) {
    let leaf = CertificateDer::from_pem_slice(chain_pem.as_bytes()).unwrap();
    let anchors: Vec<_> = CertificateDer::pem_slice_iter(bundle_pem)
        .map(|c| {
            webpki::anchor_from_trusted_cert(&c.unwrap())
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(!anchors.is_empty(), "the bundle holds no certificate");
    let cert = webpki::EndEntityCert::try_from(&leaf).unwrap();
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .unwrap();
    }
}

/// `mesh bootstrap join` as a node runs it, given only the gateway's address, the token file
/// and the CA bundle.
pub fn join_args(
    gateway: &str,
    token_file: &Path,
    ca: &Path,
    out: &Path,
    name: &str,
) -> Vec<String> {
    let path = |p: &Path| p.to_str().unwrap().to_string();
    [
        "mesh",
        "bootstrap",
        "join",
        "--gateway",
        gateway,
        "--token-file",
        &path(token_file),
        "--ca-bundle",
        &path(ca),
        "--out",
        &path(out),
        "--node-name",
        name,
    ]
    .map(String::from)
    .to_vec()
}
