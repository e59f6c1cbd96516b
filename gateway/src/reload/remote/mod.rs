//! Reaching the policy repository over the network, for the gateway's fetch and for `policy
//! publish`'s push. libgit2 is built without its own HTTPS (OpenSSL) and SSH (libssh2)
//! transports; instead this module registers git2 *smart subtransports* once per process:
//! `https://` (and `http://`, when plaintext is allowed) speak smart HTTP through hyper over
//! rustls — the TLS stack the gateway already has — and `ssh://` runs the system's OpenSSH
//! client, which owns key handling and `known_hosts`. Local paths and `file://` stay with
//! libgit2.
//!
//! A git operation runs inside [`Remote::run`], which hands the transport its settings (the
//! server's roots, the credential, the SSH key) through a thread-local for the length of that
//! call, and turns a transport failure back into a typed [`TransportError`]. Credentials are
//! read from files at each operation (so they rotate without a restart), sent as sensitive
//! headers, and never written into an error, a log line or a `Debug`.

mod http;
mod session;
mod ssh;
mod url;

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

pub use url::{Parts, RemoteUrl, Scheme, UrlError, redact};

use session::Session;

/// How a credential file is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CredentialKind {
    /// `Authorization: Bearer <file content>` (a token). The default.
    #[default]
    Bearer,
    /// `Authorization: Basic …` of the file's `user:password`.
    Basic,
}

impl CredentialKind {
    /// Parses `bearer` or `basic`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "bearer" => Some(Self::Bearer),
            "basic" => Some(Self::Basic),
            _ => None,
        }
    }
}

/// How to reach a network remote: the settings `[policy.source]` and `policy publish` share.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TransportConfig {
    /// PEM file of the CAs an HTTPS server's certificate must chain to. Default: the system's
    /// roots.
    pub ca_file: Option<PathBuf>,
    /// File holding the HTTP(S) credential (mode 0600). Default: none.
    pub credential_file: Option<PathBuf>,
    /// How the credential is sent. Default bearer.
    pub credential_kind: CredentialKind,
    /// Private key for SSH (mode 0600). Required for SSH remotes.
    pub ssh_key: Option<PathBuf>,
    /// OpenSSH `known_hosts` file with the server's host key. Required for SSH remotes; an
    /// unknown or changed host key is refused.
    pub known_hosts: Option<PathBuf>,
    /// Accept `http://` and `git://` (no encryption, no server authentication). Default false.
    pub allow_insecure_transport: bool,
}

/// A setting that does not fit the remote, found before anything is contacted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The setting (`ca_file`, `known_hosts`, … or `git` for the URL itself).
    pub key: &'static str,
    /// What is wrong, naming other settings in config-file form (`allow_insecure_transport =
    /// true`).
    pub message: String,
}

impl TransportConfig {
    /// Every problem of these settings for `url`: plaintext not allowed, settings of another
    /// transport, an SSH remote without key or `known_hosts`, a credential over plaintext.
    pub fn check(&self, url: &RemoteUrl) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key, message: String| problems.push(Problem { key, message });
        let scheme = url.scheme();
        if scheme.is_plaintext() && !self.allow_insecure_transport {
            problem(
                "git",
                format!(
                    "{} is plaintext (no encryption, no server authentication) and refused; \
                     use https:// or ssh://, or set allow_insecure_transport = true",
                    scheme.prefix()
                ),
            );
        }
        let http = matches!(scheme, Scheme::Https | Scheme::Http);
        let only = |what: &str| format!("applies to {what} remotes only, not {}", scheme.prefix());
        if !http && self.ca_file.is_some() {
            problem("ca_file", only("https://"));
        }
        if !http && self.credential_file.is_some() {
            problem("credential_file", only("https://"));
        }
        if scheme == Scheme::Http && self.credential_file.is_some() {
            problem(
                "credential_file",
                "a credential is never sent over plaintext http://; use https://".into(),
            );
        }
        if scheme == Scheme::Ssh {
            if self.ssh_key.is_none() {
                problem("ssh_key", "required for an SSH remote".into());
            }
            if self.known_hosts.is_none() {
                problem(
                    "known_hosts",
                    "required for an SSH remote (the server's host key is checked strictly)".into(),
                );
            }
        } else {
            if self.ssh_key.is_some() {
                problem("ssh_key", only("ssh://"));
            }
            if self.known_hosts.is_some() {
                problem("known_hosts", only("ssh://"));
            }
        }
        problems
    }
}

/// Why a remote could not be reached. None of these carries a credential.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The settings do not fit the remote (see [`TransportConfig::check`]).
    #[error("{key}: {message}")]
    Refused {
        /// The setting.
        key: &'static str,
        /// Why.
        message: String,
    },
    /// The credential, CA, key or `known_hosts` file could not be used.
    #[error("{0}")]
    File(#[from] crate::secrets::SecretError),
    /// The credential file holds nothing usable.
    #[error("{path}: {reason}")]
    Credential {
        /// The file.
        path: PathBuf,
        /// What is wrong with it (never its content).
        reason: &'static str,
    },
    /// The CA file holds no certificate, or the system has no roots.
    #[error("no CA certificate to verify the server with: {0}")]
    NoRoots(String),
    /// The transport's own I/O driver could not start.
    #[error("cannot start the HTTP transport's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A TCP connection could not be made.
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        /// `host:port`.
        authority: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed, typically an untrusted or mismatched server certificate.
    #[error("TLS with {host} failed: {detail}")]
    Tls {
        /// The server.
        host: String,
        /// rustls's reason, and a hint.
        detail: String,
    },
    /// No answer in time.
    #[error("{what} took longer than {seconds} s")]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// The limit.
        seconds: u64,
    },
    /// The HTTP exchange failed below the status line.
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    /// The server answered with a status that is not success.
    #[error("{}", status_reason(*.status, *.had_credential))]
    Status {
        /// The HTTP status.
        status: u16,
        /// Whether a credential was sent.
        had_credential: bool,
    },
    /// The server is not a smart-HTTP git server.
    #[error("the server does not speak git's smart HTTP (content type {0:?})")]
    NotSmart(String),
    /// More to push than the transport buffers.
    #[error("the request body passed {0} bytes")]
    TooLarge(usize),
    /// `ssh` could not be started.
    #[error("cannot run ssh: {0}")]
    SshSpawn(#[source] std::io::Error),
    /// `ssh` failed: an unknown or changed host key, a refused key, no route.
    #[error("ssh failed ({status}): {stderr}")]
    Ssh {
        /// Its exit status.
        status: String,
        /// The end of what it printed (host key and authentication failures are named there).
        stderr: String,
    },
    /// A stream was used against the protocol (a write after the answer began).
    #[error("transport misuse: {0}")]
    Protocol(&'static str),
}

fn status_reason(status: u16, had_credential: bool) -> String {
    match status {
        401 if had_credential => "the server refused the credential (HTTP 401)".into(),
        401 => "the server requires a credential (HTTP 401); set a credential file".into(),
        403 => "the credential may not access this repository (HTTP 403)".into(),
        404 => "no repository at this URL (HTTP 404)".into(),
        300..=399 => {
            format!("the server redirects (HTTP {status}); configure the URL it redirects to")
        }
        other => format!("the server answered HTTP {other}"),
    }
}

/// A git operation on a remote failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Reaching the remote failed.
    #[error("{remote}: {source}")]
    Transport {
        /// The remote (shown redacted).
        remote: RemoteUrl,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// git failed (the remote's answer, the local repository).
    #[error("{remote}: {}", redact(&source.to_string()))]
    Git {
        /// The remote (shown redacted).
        remote: RemoteUrl,
        /// git's error.
        #[source]
        source: git2::Error,
    },
}

/// A remote and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// Where it is.
    pub url: RemoteUrl,
    /// How to reach it.
    pub transport: TransportConfig,
}

thread_local! {
    /// The settings of the operation running on this thread, for the transport factory.
    static CURRENT: RefCell<Option<Arc<Session>>> = const { RefCell::new(None) };
    /// The typed reason behind the last transport failure on this thread.
    static FAILURE: RefCell<Option<TransportError>> = const { RefCell::new(None) };
}

impl Remote {
    /// Runs `op` (given the URL to hand to git2) with this remote's transport settings in
    /// force on this thread. Blocking: call from a blocking thread, never a runtime worker.
    pub fn run<T>(
        &self,
        op: impl FnOnce(&str) -> Result<T, git2::Error>,
    ) -> Result<T, RemoteError> {
        let transport = |source| RemoteError::Transport {
            remote: self.url.clone(),
            source,
        };
        register().map_err(|e| RemoteError::Git {
            remote: self.url.clone(),
            source: e,
        })?;
        if let Some(p) = self.transport.check(&self.url).into_iter().next() {
            return Err(transport(TransportError::Refused {
                key: p.key,
                message: p.message,
            }));
        }
        let session = Session::open(self).map_err(transport)?;
        let result = {
            let _scope = Scope::enter(session);
            op(self.url.as_str())
        };
        let failure = FAILURE.with(|f| f.take());
        result.map_err(|source| match failure {
            Some(reason) => transport(reason),
            None => RemoteError::Git {
                remote: self.url.clone(),
                source,
            },
        })
    }
}

/// The settings of one operation in force on this thread; the previous ones come back when it
/// is dropped, even if the operation panicked.
struct Scope {
    previous: Option<Arc<Session>>,
}

impl Scope {
    fn enter(session: Session) -> Self {
        FAILURE.with(|f| f.take());
        Self {
            previous: CURRENT.with(|c| c.replace(Some(Arc::new(session)))),
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| c.replace(previous));
    }
}

/// Keeps `reason` for [`Remote::run`] and hands libgit2 an error with the same text.
fn fail(reason: TransportError) -> git2::Error {
    let error = git2::Error::new(
        git2::ErrorCode::GenericError,
        git2::ErrorClass::Net,
        reason.to_string(),
    );
    FAILURE.with(|f| *f.borrow_mut() = Some(reason));
    error
}

/// The same as [`fail`], for the `std::io` side of a stream.
fn fail_io(reason: TransportError) -> std::io::Error {
    let error = std::io::Error::other(reason.to_string());
    FAILURE.with(|f| *f.borrow_mut() = Some(reason));
    error
}

fn session() -> Result<Arc<Session>, git2::Error> {
    CURRENT.with(|c| c.borrow().clone()).ok_or_else(|| {
        fail(TransportError::Protocol(
            "a network remote outside Remote::run",
        ))
    })
}

/// Registers the transports with libgit2, once per process, before any remote operation.
fn register() -> Result<(), git2::Error> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = REGISTERED.get_or_init(|| {
        let http = |remote: &git2::Remote<'_>| {
            git2::transport::Transport::smart(remote, true, http::Subtransport::new(session()?)?)
        };
        let ssh = |remote: &git2::Remote<'_>| {
            git2::transport::Transport::smart(remote, false, ssh::Subtransport::new(session()?))
        };
        // SAFETY: `register` must not race with libgit2 creating transports. It runs once,
        // inside this `OnceLock`, and every remote operation of this crate goes through
        // `Remote::run`, which calls it (and waits for it) first.
        #[allow(unsafe_code)]
        let registered = unsafe {
            git2::transport::register("https", http)
                .and_then(|()| git2::transport::register("http", http))
                .and_then(|()| git2::transport::register("ssh", ssh))
        };
        registered.map_err(|e| e.message().to_string())
    });
    result.clone().map_err(|message| {
        git2::Error::new(
            git2::ErrorCode::GenericError,
            git2::ErrorClass::Net,
            message,
        )
    })
}

#[cfg(test)]
mod tests;
