//! A small HTTPS client for the gateway's API: rustls trusting only the given CA bundle,
//! HTTP/1.1 over one kept-alive connection, reconnecting when the server closed it; optionally
//! presenting the node's SVID as TLS client certificate (renewal is over mTLS).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

use crate::AgentError;
use crate::verify::GatewayVerifier;

/// Connect and handshake deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Whole-request deadline once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A response: status, headers, body.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// A client for one gateway.
pub struct GatewayClient {
    url: String,
    authority: String,
    server_name: ServerName<'static>,
    provider: Arc<CryptoProvider>,
    verifier: Arc<GatewayVerifier>,
    connector: TlsConnector,
    bearer: Option<String>,
    local_addr: Option<IpAddr>,
    connection: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl std::fmt::Debug for GatewayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayClient")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl GatewayClient {
    /// A client for `url` (`https://host:port`) trusting only the CAs in `ca_bundle` (PEM).
    pub fn new(url: &str, ca_bundle: &[u8]) -> Result<Self, AgentError> {
        let authority = url
            .strip_prefix("https://")
            .ok_or_else(|| {
                AgentError::Usage(format!("{url:?}: the gateway URL must start with https://"))
            })?
            .trim_end_matches('/')
            .to_string();
        let host = match authority.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => authority.as_str(),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|_| AgentError::Usage(format!("{host:?} is not a host name or address")))?;
        let mut roots = rustls::RootCertStore::empty();
        let mut bundle = Vec::new();
        for cert in CertificateDer::pem_slice_iter(ca_bundle) {
            let cert = cert.map_err(|e| AgentError::Usage(format!("CA bundle: {e}")))?;
            roots
                .add(cert.clone())
                .map_err(|e| AgentError::Usage(format!("CA bundle: {e}")))?;
            bundle.push(cert);
        }
        if roots.is_empty() {
            return Err(AgentError::Usage(
                "the CA bundle holds no certificate".into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = GatewayVerifier::new(roots, &bundle, provider.clone())
            .map_err(|e| AgentError::Usage(format!("CA bundle: {e}")))?;
        let verifier = Arc::new(verifier);
        Ok(Self {
            url: format!("https://{authority}"),
            authority: if authority.contains(':') {
                authority
            } else {
                format!("{authority}:443")
            },
            server_name,
            connector: connector(&provider, &verifier, None)?,
            provider,
            verifier,
            bearer: None,
            local_addr: None,
            connection: Mutex::new(None),
        })
    }

    /// The gateway's URL, `https://host[:port]`, as given to [`GatewayClient::new`].
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Presents `chain_pem` (the node's SVID, leaf first) with its private key `key_pem` as
    /// TLS client certificate on every connection from now on (renewal is over mTLS). The key
    /// stays in memory only as long as the client; nothing of it is logged.
    pub fn with_client_identity(
        mut self,
        chain_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, AgentError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AgentError::Usage(format!("client certificate: {e}")))?;
        if chain.is_empty() {
            return Err(AgentError::Usage(
                "the client certificate file holds no certificate".into(),
            ));
        }
        // The error names the PEM problem only, never the key's bytes.
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| AgentError::Usage(format!("client key: {e}")))?;
        self.connector = connector(&self.provider, &self.verifier, Some((chain, key)))?;
        *self.connection.get_mut() = None;
        Ok(self)
    }

    /// Sends `Authorization: Bearer <credential>` with every request (the admin API).
    pub fn with_bearer(mut self, credential: String) -> Self {
        self.bearer = Some(credential);
        self
    }

    /// Connects from `ip` (any port) instead of the address the system picks: a host with
    /// several addresses, or a test posing as several clients (Linux routes all of 127.0.0.0/8
    /// to loopback).
    pub fn with_local_addr(mut self, ip: IpAddr) -> Self {
        self.local_addr = Some(ip);
        self
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Reply, AgentError> {
        self.send(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, json: Vec<u8>) -> Result<Reply, AgentError> {
        self.send(Method::POST, path, Some(json)).await
    }

    /// Sends a request on the kept-alive connection, opening one when there is none.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, AgentError> {
        let mut slot = self.connection.lock().await;
        let mut sender = match slot.take() {
            Some(sender) if sender.is_ready() => sender,
            _ => self.connect().await?,
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority);
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(token) = &self.bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| AgentError::Usage(e.to_string()))?;
        let exchange = async {
            let response = sender.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                AgentError::Transport(format!(
                    "no answer from {} within {REQUEST_TIMEOUT:?}",
                    self.authority
                ))
            })?
            .map_err(|e| AgentError::Transport(format!("{}: {e}", self.authority)))?;
        *slot = Some(sender);
        Ok(reply)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, AgentError> {
        let transport = |e: String| AgentError::Transport(format!("{}: {e}", self.authority));
        let connect = async {
            let tcp = match self.local_addr {
                None => TcpStream::connect(&self.authority).await,
                Some(local) => connect_from(local, &self.authority).await,
            }
            .map_err(|e| transport(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let tls = self
                .connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| transport(format!("TLS: {e}")))?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| transport(e.to_string()))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(sender)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| transport(format!("no connection within {CONNECT_TIMEOUT:?}")))?
    }
}

/// The TLS side of a client: the gateway's verifier, HTTP/1.1, and the client certificate if
/// there is one.
fn connector(
    provider: &Arc<CryptoProvider>,
    verifier: &Arc<GatewayVerifier>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<TlsConnector, AgentError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| AgentError::Usage(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone());
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| AgentError::Usage(format!("client certificate: {e}")))?,
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Connects to `authority` from `local` (port chosen by the system).
async fn connect_from(local: IpAddr, authority: &str) -> std::io::Result<TcpStream> {
    let mut last = None;
    for remote in tokio::net::lookup_host(authority).await? {
        if remote.is_ipv4() != local.is_ipv4() {
            continue;
        }
        let socket = if local.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(local, 0))?;
        match socket.connect(remote).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{authority} has no address of the family of {local}"),
        )
    }))
}

#[cfg(test)]
mod tests;
