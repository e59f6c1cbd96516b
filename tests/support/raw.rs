//! Raw TLS connections to the node listener, with no HTTP client on top: for clients that
//! misbehave on purpose (slow bodies, oversized bodies, connection floods) and read the answer
//! byte by byte.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support: a failure is a failed test"
)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::Gateway;

/// Generous bound for things the server must do on its own (close a connection, answer).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A TLS connection to the node listener, trusting only the gateway's CA.
pub async fn tls(gw: &Gateway) -> TlsStream<TcpStream> {
    try_tls_from(gw, None).await.unwrap()
}

/// A TLS connection to the node listener from `local` (when given), or why there is none.
pub async fn try_tls_from(
    gw: &Gateway,
    local: Option<IpAddr>,
) -> std::io::Result<TlsStream<TcpStream>> {
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
    let tcp = match local {
        None => TcpStream::connect(gw.node_addr).await?,
        Some(local) => {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(local, 0))?;
            socket.connect(gw.node_addr).await?
        }
    };
    let handshake = TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(gw.node_addr.ip().into()), tcp);
    tokio::time::timeout(DEADLINE, handshake)
        .await
        .unwrap_or_else(|_| panic!("no TLS handshake within {DEADLINE:?}"))
}

/// A raw HTTP/1.1 response.
#[derive(Debug)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// The headers, as sent.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first header called `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response (head, then a Content-Length body). A server that closes or resets the
/// connection right after answering is fine, as long as the whole answer arrived first.
pub async fn read_response(reader: &mut (impl AsyncRead + Unpin)) -> RawResponse {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let complete = |buf: &[u8]| -> Option<RawResponse> {
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = std::str::from_utf8(&buf[..end]).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().unwrap());
        let body = buf.get(end + 4..end + 4 + length)?.to_vec();
        Some(RawResponse {
            status,
            headers,
            body,
        })
    };
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(response) = complete(&buf) {
            return response;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, reader.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            outcome => panic!(
                "no complete response ({outcome:?}); got {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
}

/// The problem document of a raw response, after checking its content type.
pub fn raw_problem(response: &RawResponse) -> gateway::api::wire::Problem {
    assert_eq!(
        response.header("content-type"),
        Some("application/problem+json"),
        "{response:?}"
    );
    serde_json::from_slice(&response.body).unwrap()
}

/// A TLS connection to the node listener presenting `identity` (a PEM chain and its PKCS#8 PEM
/// key) as the client certificate, or none.
pub async fn mtls(gw: &Gateway, identity: Option<(&str, &str)>) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&gw.bundle()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(chain.as_bytes())
                    .map(Result::unwrap)
                    .collect();
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    let tcp = TcpStream::connect(gw.node_addr).await.unwrap();
    let handshake = TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(gw.node_addr.ip().into()), tcp);
    tokio::time::timeout(DEADLINE, handshake)
        .await
        .unwrap_or_else(|_| panic!("no TLS handshake within {DEADLINE:?}"))
        .unwrap()
}

/// Sends one request on `stream` and reads the answer.
pub async fn exchange(
    stream: &mut TlsStream<TcpStream>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    use tokio::io::AsyncWriteExt;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: gateway\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    stream.flush().await.unwrap();
    read_response(stream).await
}

/// Posts a renewal (`POST /v1/bootstrap/renew`) with `identity` (a PEM chain and its PKCS#8
/// PEM key) as the client certificate, or none.
pub async fn renew(
    gw: &Gateway,
    identity: Option<(&str, &str)>,
    csr: &str,
    idempotency_key: Option<&str>,
) -> RawResponse {
    let body = serde_json::to_vec(&gateway::api::wire::RenewRequest {
        csr: csr.to_string(),
        idempotency_key: idempotency_key.map(str::to_string),
    })
    .unwrap();
    let mut stream = mtls(gw, identity).await;
    exchange(
        &mut stream,
        "POST",
        "/v1/bootstrap/renew",
        &[("content-type", "application/json")],
        &body,
    )
    .await
}

/// The answer of a renewal that must have succeeded.
pub fn renewed(response: &RawResponse) -> gateway::api::wire::JoinResponse {
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    serde_json::from_slice(&response.body).unwrap()
}
