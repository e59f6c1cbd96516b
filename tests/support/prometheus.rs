//! Prometheus as an oracle: `promtool` (check metrics, test rules) and a real Prometheus server
//! (Debian's `prometheus` package, `.ci/run` installs it) scraping a test gateway's `/metrics`
//! over HTTPS, asked through its HTTP API.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support: a failure is a failed test"
)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::raw::{RawResponse, exchange};
use super::{Gateway, TempDir, repo_root};

/// The Accept header Prometheus 2.x sends with every scrape.
pub const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// Where the alert rules and their unit tests live.
pub fn rules_dir() -> PathBuf {
    repo_root().join("examples/prometheus")
}

/// Runs `promtool` with `args` in `dir`, feeding it `stdin`.
pub fn promtool(args: &[&str], dir: &Path, stdin: &[u8]) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool: {e} (`.ci/run` installs Debian's prometheus)"));
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// `GET /metrics` from the gateway's admin listener over TLS (trusting only its CA), with the
/// admin bearer credential and `accept` as the Accept header.
pub async fn scrape(gw: &Gateway, accept: Option<&str>) -> RawResponse {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&gw.bundle()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(gw.admin_addr).await.unwrap();
    let mut stream = TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(gw.admin_addr.ip().into()), tcp)
        .await
        .unwrap();
    let credential = std::fs::read_to_string(gw.path("admin/credential")).unwrap();
    let bearer = format!("Bearer {}", credential.trim());
    let mut headers = vec![("authorization", bearer.as_str())];
    if let Some(accept) = accept {
        headers.push(("accept", accept));
    }
    exchange(&mut stream, "GET", "/metrics", &headers, b"").await
}

/// The alert rules with every `for:` set to `hold` and every range selector `[…m]`/`[…h]` to
/// `window`: the drill's copy, so that it runs in seconds. Expressions and thresholds are
/// those of `alerts.yml`.
pub fn quick_rules(hold: &str, window: &str) -> String {
    let rules = std::fs::read_to_string(rules_dir().join("alerts.yml")).unwrap();
    let mut out = String::new();
    for line in rules.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("for: ") {
            let indent = &line[..line.len() - trimmed.len()];
            out.push_str(&format!("{indent}for: {hold}\n"));
            continue;
        }
        let mut rest = line;
        while let Some(open) = rest.find('[') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            match after.find(']') {
                Some(close)
                    if after[..close].len() > 1
                        && after[..close - 1].chars().all(|c| c.is_ascii_digit())
                        && matches!(after.as_bytes()[close - 1], b'm' | b'h') =>
                {
                    out.push_str(&format!("[{window}]"));
                    rest = &after[close + 1..];
                }
                _ => {
                    out.push('[');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out.push('\n');
    }
    out
}

/// A Prometheus server scraping one gateway every second and evaluating `rules` every second.
/// Killed when dropped.
#[derive(Debug)]
pub struct Prometheus {
    /// Its HTTP listener.
    pub addr: SocketAddr,
    child: Child,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts `prometheus` on a free loopback port, scraping `gw`'s admin listener over HTTPS
    /// with the admin bearer credential and its CA, and waits until it is ready.
    pub async fn start(gw: &Gateway, rules: &str) -> Self {
        let dir = TempDir::new("prometheus");
        std::fs::write(dir.0.join("alerts.yml"), rules).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - alerts.yml\n\
             scrape_configs:\n  - job_name: omnirelay\n    scheme: https\n\
             \x20   authorization:\n      credentials_file: {credential}\n\
             \x20   tls_config:\n      ca_file: {ca}\n\
             \x20   static_configs:\n      - targets: ['{target}']\n",
            credential = gw.path("admin/credential").display(),
            ca = gw.path("ca/ca.pem").display(),
            target = gw.admin_addr,
        );
        std::fs::write(dir.0.join("prometheus.yml"), config).unwrap();
        let check = Command::new("promtool")
            .args(["check", "config", "prometheus.yml"])
            .current_dir(&dir.0)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        // A port the OS hands out now; Prometheus binds it a moment later.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = std::fs::File::create(dir.0.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.0.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("prometheus: {e} (`.ci/run` installs Debian's prometheus)"));
        let mut server = Self {
            addr,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!(
                    "prometheus exited ({status}): {}",
                    std::fs::read_to_string(server._dir.0.join("prometheus.log"))
                        .unwrap_or_default()
                );
            }
            if let Ok((200, _)) = server.get("/-/ready").await {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 60 s"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// `GET path` over plain HTTP: the status and body.
    pub async fn get(&self, path: &str) -> std::io::Result<(u16, bytes::Bytes)> {
        let failed = |e: hyper::Error| std::io::Error::other(e.to_string());
        let tcp = TcpStream::connect(self.addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(failed)?;
        tokio::spawn(connection);
        let request = http::Request::get(path)
            .header(http::header::HOST, self.addr.to_string())
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.map_err(failed)?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(failed)?;
        Ok((status, body.to_bytes()))
    }

    /// The `data` of a successful API answer to `GET path`.
    pub async fn api(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path).await.unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (status, answer["status"].as_str()),
            (200, Some("success")),
            "{answer}"
        );
        answer["data"].clone()
    }

    /// The instant vector of `query`, as (labels, value) pairs.
    pub async fn query(&self, query: &str) -> Vec<(serde_json::Value, f64)> {
        let data = self
            .api(&format!("/api/v1/query?query={}", percent_encode(query)))
            .await;
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let value = r["value"][1].as_str().unwrap().parse().unwrap();
                (r["metric"].clone(), value)
            })
            .collect()
    }

    /// Every alert Prometheus holds (pending or firing): (name, state) pairs.
    pub async fn alerts(&self) -> Vec<(String, String)> {
        let data = self.api("/api/v1/alerts").await;
        data["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap().to_string(),
                    a["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// How many times Prometheus has evaluated the `omnirelay` rule group, from its own
    /// `prometheus_rule_group_iterations_total`.
    pub async fn evaluations(&self) -> u64 {
        let (status, body) = self.get("/metrics").await.unwrap();
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body);
        text.lines()
            .filter(|l| l.starts_with("prometheus_rule_group_iterations_total{"))
            .find(|l| l.contains(";omnirelay\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    }

    /// Polls, every [`POLL`] until `deadline`, until `done` holds for the alerts; returns them.
    pub async fn alerts_until(
        &self,
        what: &str,
        deadline: Duration,
        done: impl Fn(&[(String, String)]) -> bool,
    ) -> Vec<(String, String)> {
        let until = Instant::now() + deadline;
        loop {
            let alerts = self.alerts().await;
            if done(&alerts) {
                return alerts;
            }
            assert!(
                Instant::now() < until,
                "{what}: not within {deadline:?}; alerts {alerts:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pace of polling Prometheus' API: a scrape and an evaluation each take a second, so
/// asking more often only adds load to a two-core machine.
pub const POLL: Duration = Duration::from_millis(200);

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
