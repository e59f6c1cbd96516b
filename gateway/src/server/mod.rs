//! The HTTPS listeners (hyper + rustls): accept, TLS handshake, HTTP/1.1, and the bounds that
//! keep one client from starving the rest — a connection cap, a per-client connection cap
//! (IPv4 address or IPv6 /64), a handshake deadline, a header read deadline and a header size
//! cap. Only `server` and `api` know HTTP types.

mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

pub use tls::{ServingCert, TlsError, certified_key, server_tls};

use crate::limits::{ClientKey, KeyedSlots};
use crate::metrics::Metrics;

/// The `[server]` section: the node-facing listener. Defaults in [`ServerConfig::defaults`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:8443`.
    pub listen: SocketAddr,
    /// PEM certificate chain the gateway serves.
    pub tls_cert: PathBuf,
    /// PEM private key for it (must be mode 0600).
    pub tls_key: PathBuf,
    /// Open connections at most; more are closed at once. Default 4,096.
    pub max_connections: NonZeroU32,
    /// Open connections from one client (IPv4 address or IPv6 /64) at most; more are closed
    /// at once. Default 64.
    pub max_connections_per_ip: NonZeroU32,
    /// Joins being processed at once; more get 503 + Retry-After. Default 1,024.
    pub max_in_flight: NonZeroU32,
    /// Joins in flight from one client at most; more get 429 + Retry-After. Default 32.
    pub max_in_flight_per_ip: NonZeroU32,
    /// Longest TLS handshake. Default 5 s.
    pub handshake_timeout: Duration,
    /// Longest wait for a request's headers (slow-loris). Default 5 s.
    pub header_read_timeout: Duration,
    /// Longest time to read a request body (a slow body holds an in-flight slot only this
    /// long; 408 after). Default 5 s.
    pub body_read_timeout: Duration,
    /// Longest time to read a body and answer. Default 10 s.
    pub request_timeout: Duration,
    /// Largest request body, bytes. Default 64 KiB.
    pub max_body_bytes: usize,
    /// Largest request head, bytes. Default 16 KiB.
    pub max_header_bytes: usize,
}

impl ServerConfig {
    /// The defaults, for the given certificate and key.
    pub fn defaults(tls_cert: PathBuf, tls_key: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            tls_cert,
            tls_key,
            max_connections: NonZeroU32::new(4096).unwrap_or(NonZeroU32::MIN),
            max_connections_per_ip: NonZeroU32::new(64).unwrap_or(NonZeroU32::MIN),
            max_in_flight: NonZeroU32::new(1024).unwrap_or(NonZeroU32::MIN),
            max_in_flight_per_ip: NonZeroU32::new(32).unwrap_or(NonZeroU32::MIN),
            handshake_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 64 << 10,
            max_header_bytes: 16 << 10,
        }
    }
}

/// The `[admin]` section: the operator listener (token issue/revoke, metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address to listen on. Default `127.0.0.1:8444` (loopback only).
    pub listen: SocketAddr,
    /// File holding the bearer credential operators present (mode 0600).
    pub credential: PathBuf,
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// The certificate chain the client sent (leaf first) and proved it holds the key of;
    /// not verified against any trust anchor yet.
    pub client_chain: Option<Arc<[rustls_pki_types::CertificateDer<'static>]>>,
}

/// Answers one request. Implemented by the API.
pub trait Handler: Send + Sync + 'static {
    /// Produces the response; never fails (errors are responses too).
    fn handle(
        &self,
        request: Request<Incoming>,
        peer: Peer,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// Transport bounds for one listener.
#[derive(Debug, Clone)]
pub struct Bounds {
    /// Connection cap.
    pub max_connections: usize,
    /// Connection cap per client.
    pub max_connections_per_ip: u32,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// Header read deadline.
    pub header_read_timeout: Duration,
    /// Header size cap.
    pub max_header_bytes: usize,
}

impl From<&ServerConfig> for Bounds {
    fn from(c: &ServerConfig) -> Self {
        Self {
            max_connections: c.max_connections.get() as usize,
            max_connections_per_ip: c.max_connections_per_ip.get(),
            handshake_timeout: c.handshake_timeout,
            header_read_timeout: c.header_read_timeout,
            max_header_bytes: c.max_header_bytes,
        }
    }
}

/// Serves HTTPS on `listener` until `shutdown` turns true, then stops accepting, asks every
/// connection to finish its current request, and waits for them at most `grace`.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    bounds: Bounds,
    handler: Arc<H>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    let per_client = KeyedSlots::new(bounds.max_connections_per_ip);
    let mut connections = JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(bounds.header_read_timeout)
        .max_buf_size(bounds.max_header_bytes.max(8192))
        .keep_alive(true);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the connections we have.
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // Over a cap: close at once rather than queue; the client retries elsewhere. The
        // client's own cap first, so one client over it takes nothing from the shared one.
        let Ok(client_slot) = per_client.try_acquire(ClientKey::of(addr.ip())) else {
            metrics.connections_refused("per-ip");
            drop(stream);
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.connections_refused("global");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, http, handler, metrics) = (
            acceptor.clone(),
            http.clone(),
            handler.clone(),
            metrics.clone(),
        );
        let (handshake_timeout, mut stop) = (bounds.handshake_timeout, shutdown.clone());
        connections.spawn(async move {
            let _slots = (slot, client_slot);
            metrics.connections.inc();
            // Garbage or a stalled handshake costs this task only, never the accept loop.
            if let Ok(Ok(tls)) = tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                let client_chain = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .filter(|chain| !chain.is_empty())
                    .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect());
                let peer = Peer { addr, client_chain };
                let service = service_fn(move |request| {
                    let (handler, peer) = (handler.clone(), peer.clone());
                    async move { Ok::<_, std::convert::Infallible>(handler.handle(request, peer).await) }
                });
                let connection = http.serve_connection(TokioIo::new(tls), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => {}
                    _ = stop.changed() => {
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                    }
                }
            }
            metrics.connections.dec();
        });
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = connections.len(),
            "grace period over; closing connections"
        );
        connections.abort_all();
    }
}
