//! A hosted git server for the remote-transport tests: `git http-backend` (the CGI program that
//! ships with git, as hosting servers run it) behind an HTTPS listener of our own on loopback
//! (hyper + rustls, a certificate from a CA made for the test), which demands a credential
//! before it hands a request to git.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::TempDir;

/// One request the server answered: method, path and query, status.
pub type Logged = (String, String, u16);

/// `git http-backend` over HTTPS, serving every bare repository under its root.
#[derive(Debug)]
pub struct GitHttpServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The repositories' root (`GIT_PROJECT_ROOT`); `policy.git` is created in it.
    pub root: TempDir,
    /// PEM of the CA that issued the server's certificate (give it as `ca_file`).
    pub ca_pem: String,
    tls: bool,
    log: Arc<Mutex<Vec<Logged>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GitHttpServer {
    /// Starts the server; only requests carrying `authorization` (the whole header value,
    /// e.g. `Bearer …`) reach git, the others get 401.
    pub fn start(name: &str, authorization: &str) -> Self {
        Self::launch(name, Some(authorization.to_string()), true)
    }

    /// Starts a plaintext `http://` server that wants no credential (what a gateway must refuse
    /// unless plaintext is explicitly allowed).
    pub fn start_plaintext(name: &str) -> Self {
        Self::launch(name, None, false)
    }

    fn launch(name: &str, authorization: Option<String>, tls: bool) -> Self {
        let root = TempDir::new(&format!("{name}-git-root"));
        git2::Repository::init_bare(root.0.join("policy.git")).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} git CA"));
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(leaf.pem().as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Arc<Mutex<Vec<Logged>>> = Arc::default();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let state = Arc::new(State {
            root: root.0.clone(),
            authorization,
            log: log.clone(),
        });
        let config = tls.then_some(config);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(serve(listener, config, state, stopped));
        });
        Self {
            addr,
            root,
            ca_pem: ca.pem(),
            tls,
            log,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `https://127.0.0.1:PORT/policy.git` (`http://` for a plaintext server).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/policy.git", self.addr)
    }

    /// The bare repository on the server's disk.
    pub fn repo_dir(&self) -> PathBuf {
        self.root.0.join("policy.git")
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct State {
    root: PathBuf,
    /// The `Authorization` a request must carry; `None`: any request.
    authorization: Option<String>,
    log: Arc<Mutex<Vec<Logged>>>,
}

async fn serve(
    listener: std::net::TcpListener,
    config: Option<rustls::ServerConfig>,
    state: Arc<State>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let acceptor = config.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => accepted.unwrap(),
            _ = &mut stopped => return,
        };
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&state, request).await) }
            });
            let http = hyper::server::conn::http1::Builder::new();
            match acceptor {
                Some(acceptor) => {
                    // A client that does not trust our certificate ends here, as it should.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = http.serve_connection(TokioIo::new(tls), service).await;
                }
                None => {
                    let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                }
            }
        });
    }
}

async fn handle(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().to_string();
    let target = request
        .uri()
        .path_and_query()
        .map(ToString::to_string)
        .unwrap_or_default();
    let authorized = match &state.authorization {
        None => true,
        Some(wanted) => request
            .headers()
            .get(http::header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == wanted.as_bytes()),
    };
    let response = if authorized {
        cgi(&state.root, request).await
    } else {
        Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(http::header::WWW_AUTHENTICATE, "Bearer realm=\"git\"")
            .body(Full::new(Bytes::from_static(b"credential required\n")))
            .unwrap()
    };
    state
        .log
        .lock()
        .unwrap()
        .push((method, target, response.status().as_u16()));
    response
}

/// Runs `git http-backend` for one request (RFC 3875 CGI).
async fn cgi(root: &Path, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let header = |name: http::header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let mut cgi = std::process::Command::new("git");
    cgi.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        // An authenticated user may push (http-backend refuses receive-pack otherwise).
        .env("REMOTE_USER", "ci")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", parts.uri.path())
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
        .env("CONTENT_TYPE", header(http::header::CONTENT_TYPE))
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        let mut child = cgi.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // Fed from a thread of its own: git may answer before it has read everything.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&body);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    })
    .await
    .unwrap();
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| {
            out.stdout
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, 2))
        })
        .unwrap_or_else(|| {
            panic!(
                "http-backend wrote no CGI header: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let head = String::from_utf8_lossy(&out.stdout[..split.0]).into_owned();
    let mut response = Response::builder().status(StatusCode::OK);
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code: u16 = value.split_whitespace().next().unwrap().parse().unwrap();
            response = response.status(code);
        } else {
            response = response.header(name, value);
        }
    }
    response
        .body(Full::new(Bytes::copy_from_slice(
            &out.stdout[split.0 + split.1..],
        )))
        .unwrap()
}
