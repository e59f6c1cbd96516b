//! git's smart HTTP protocol (the stateless `info/refs` + `git-upload-pack`/`git-receive-pack`
//! exchange) over hyper's HTTP/1.1 client and rustls. libgit2 drives the protocol through
//! blocking `Read`/`Write` streams; each operation gets a small current-thread runtime of its
//! own that those calls block on, so a fetch never ties up a runtime worker and needs none.
//! One connection per request: a poll makes one or two requests, and nothing has to track
//! whether libgit2 read an answer to its end before the next.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream};
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::session::Session;
use super::{TransportError, fail, fail_io};

/// TCP connect plus TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The answer's head, and then each piece of its body.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// What a push may send in one request (policy bundles are kilobytes).
const MAX_REQUEST_BYTES: usize = 128 << 20;

/// The smart-HTTP subtransport of one operation.
pub(super) struct Subtransport {
    shared: Arc<Shared>,
}

struct Shared {
    runtime: tokio::runtime::Runtime,
    session: Arc<Session>,
    host: String,
    authority: String,
    base_path: String,
}

impl Subtransport {
    pub fn new(session: Arc<Session>) -> Result<Self, git2::Error> {
        let parts = session
            .url
            .parts()
            .ok_or(TransportError::Protocol("an HTTP remote without a host"))
            .map_err(fail)?;
        let tls = session.tls.is_some();
        let port = parts.port.unwrap_or(if tls { 443 } else { 80 });
        let host = parts.host.clone();
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| fail(TransportError::Runtime(e)))?;
        Ok(Self {
            shared: Arc::new(Shared {
                runtime,
                base_path: parts.path.trim_end_matches('/').to_string(),
                session,
                host,
                authority,
            }),
        })
    }
}

impl SmartSubtransport for Subtransport {
    fn action(
        &self,
        _url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        let (service, listing) = match action {
            Service::UploadPackLs => ("git-upload-pack", true),
            Service::UploadPack => ("git-upload-pack", false),
            Service::ReceivePackLs => ("git-receive-pack", true),
            Service::ReceivePack => ("git-receive-pack", false),
        };
        let mut stream = Stream {
            shared: self.shared.clone(),
            service,
            request: None,
            body: None,
            chunk: Bytes::new(),
        };
        if listing {
            let path = format!("{}/info/refs?service={service}", self.shared.base_path);
            let expect = format!("application/x-{service}-advertisement");
            stream.body = Some(
                self.shared
                    .exchange(Method::GET, &path, None, &expect)
                    .map_err(fail)?,
            );
        } else {
            stream.request = Some(Vec::new());
        }
        Ok(Box::new(stream))
    }

    fn close(&self) -> Result<(), git2::Error> {
        Ok(())
    }
}

impl Shared {
    /// One request on a new connection; the answer's body when its status and type are right.
    fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, String)>,
        expect: &str,
    ) -> Result<Incoming, TransportError> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority)
            .header(header::USER_AGENT, "git/2.0 (omnirelay)")
            .header(header::ACCEPT, expect);
        let body = match body {
            Some((bytes, content_type)) => {
                request = request.header(header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Vec::new(),
        };
        if let Some(credential) = &self.session.authorization {
            request = request.header(header::AUTHORIZATION, credential.clone());
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| TransportError::Protocol("the request cannot be built"))?;
        let had_credential = self.session.authorization.is_some();
        self.runtime.block_on(async {
            let mut sender = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
                .await
                .map_err(|_| TransportError::Timeout {
                    what: "connecting",
                    seconds: CONNECT_TIMEOUT.as_secs(),
                })??;
            let response = tokio::time::timeout(ANSWER_TIMEOUT, sender.send_request(request))
                .await
                .map_err(|_| TransportError::Timeout {
                    what: "the server's answer",
                    seconds: ANSWER_TIMEOUT.as_secs(),
                })?
                .map_err(TransportError::Http)?;
            let status = response.status();
            if !status.is_success() {
                return Err(TransportError::Status {
                    status: status.as_u16(),
                    had_credential,
                });
            }
            let content_type = response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            if content_type != expect {
                return Err(TransportError::NotSmart(content_type));
            }
            Ok(response.into_body())
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, TransportError> {
        let tcp = TcpStream::connect(&self.authority)
            .await
            .map_err(|source| TransportError::Connect {
                authority: self.authority.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let http = |e| TransportError::Http(e);
        match &self.session.tls {
            Some(config) => {
                let name =
                    ServerName::try_from(self.host.clone()).map_err(|_| TransportError::Tls {
                        host: self.host.clone(),
                        detail: "not a host name or address".into(),
                    })?;
                let tls = TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| self.tls_error(&e))?;
                let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .map_err(http)?;
                tokio::spawn(connection);
                Ok(sender)
            }
            None => {
                let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .map_err(http)?;
                tokio::spawn(connection);
                Ok(sender)
            }
        }
    }

    /// Names rustls's reason, and where the roots came from when the issuer is unknown.
    fn tls_error(&self, e: &std::io::Error) -> TransportError {
        let detail = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
                format!(
                    "the server's certificate does not chain to {} (unknown issuer)",
                    self.session.roots
                )
            }
            Some(other) => other.to_string(),
            None => e.to_string(),
        };
        TransportError::Tls {
            host: self.host.clone(),
            detail,
        }
    }
}

/// One request of the protocol: written first (a POST, buffered), then read.
struct Stream {
    shared: Arc<Shared>,
    service: &'static str,
    /// The POST body while libgit2 writes it; sent at the first read.
    request: Option<Vec<u8>>,
    body: Option<Incoming>,
    chunk: Bytes,
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(request) = self.request.take() {
            let service = self.service;
            let path = format!("{}/{service}", self.shared.base_path);
            let expect = format!("application/x-{service}-result");
            self.body = Some(
                self.shared
                    .exchange(
                        Method::POST,
                        &path,
                        Some((request, format!("application/x-{service}-request"))),
                        &expect,
                    )
                    .map_err(fail_io)?,
            );
        }
        while self.chunk.is_empty() {
            let Some(body) = self.body.as_mut() else {
                return Ok(0);
            };
            // The timer must be made inside the runtime, hence the async block.
            let frame = self
                .shared
                .runtime
                .block_on(async { tokio::time::timeout(ANSWER_TIMEOUT, body.frame()).await });
            match frame {
                Err(_) => {
                    return Err(fail_io(TransportError::Timeout {
                        what: "the server's answer",
                        seconds: ANSWER_TIMEOUT.as_secs(),
                    }));
                }
                Ok(None) => {
                    self.body = None;
                    return Ok(0);
                }
                Ok(Some(Err(e))) => return Err(fail_io(TransportError::Http(e))),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.chunk = data;
                    }
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk.advance(n);
        Ok(n)
    }
}

impl Write for Stream {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let Some(request) = self.request.as_mut() else {
            return Err(fail_io(TransportError::Protocol(
                "a write after the server's answer began",
            )));
        };
        if request.len() + data.len() > MAX_REQUEST_BYTES {
            return Err(fail_io(TransportError::TooLarge(MAX_REQUEST_BYTES)));
        }
        request.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
