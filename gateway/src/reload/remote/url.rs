//! Remote URLs of the policy repository: parsed once, classified by transport, and shown
//! without anything secret. A password in a URL is refused outright (credentials come from
//! files), and the user part of an HTTP(S) URL is never printed.

use std::fmt;

/// How a remote is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// A path on this machine.
    Path,
    /// `file://`.
    File,
    /// `https://`: smart HTTP over rustls.
    Https,
    /// `http://`: smart HTTP in plaintext (refused unless allowed).
    Http,
    /// `ssh://` or `[user@]host:path`: through the system's `ssh`.
    Ssh,
    /// `git://`: git's own protocol, in plaintext (refused unless allowed).
    Git,
}

impl Scheme {
    /// Whether the remote is on another machine.
    pub fn is_network(self) -> bool {
        !matches!(self, Self::Path | Self::File)
    }

    /// Whether the bytes travel unencrypted and unauthenticated.
    pub fn is_plaintext(self) -> bool {
        matches!(self, Self::Http | Self::Git)
    }

    /// The URL prefix, for messages.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Path => "a local path",
            Self::File => "file://",
            Self::Https => "https://",
            Self::Http => "http://",
            Self::Ssh => "ssh://",
            Self::Git => "git://",
        }
    }
}

/// A URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Empty.
    #[error("the repository URL is empty")]
    Empty,
    /// A scheme this gateway does not speak.
    #[error("{0}:// is not supported (use https://, ssh://, file:// or a path)")]
    Scheme(String),
    /// A password in the URL: it would end up in configs, shell histories and logs.
    #[error("the URL carries a password; put the credential in a credential file instead")]
    Password,
    /// No host, or a malformed one.
    #[error("the URL names no host")]
    Host,
    /// A port that is not a number.
    #[error("the URL's port is not a number")]
    Port,
}

/// The parts of a network URL the transports need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    /// The user (`git@`), if any. Not secret: passwords are refused.
    pub user: Option<String>,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// The port, if given.
    pub port: Option<u16>,
    /// The path: absolute for URLs, as written for `host:path`.
    pub path: String,
}

/// The policy repository's location, as configured.
#[derive(Clone, PartialEq, Eq)]
pub struct RemoteUrl {
    text: String,
    scheme: Scheme,
    /// Boxed: a URL travels inside errors, which should stay small.
    parts: Option<Box<Parts>>,
}

impl RemoteUrl {
    /// Parses and classifies `text`; refuses a password in it.
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(UrlError::Empty);
        }
        let (scheme, rest) = match text.split_once("://") {
            Some((name, rest)) => {
                let scheme = match name.to_ascii_lowercase().as_str() {
                    "https" => Scheme::Https,
                    "http" => Scheme::Http,
                    "ssh" => Scheme::Ssh,
                    "git" => Scheme::Git,
                    "file" => Scheme::File,
                    _ => return Err(UrlError::Scheme(name.to_string())),
                };
                (scheme, Some(rest))
            }
            None => (Self::path_or_scp(text), None),
        };
        let parts = match (scheme, rest) {
            (Scheme::Path | Scheme::File, _) => None,
            (Scheme::Ssh, None) => Some(Box::new(scp_parts(text)?)),
            (_, Some(rest)) => Some(Box::new(url_parts(rest)?)),
            (_, None) => return Err(UrlError::Host),
        };
        Ok(Self {
            text: text.to_string(),
            scheme,
            parts,
        })
    }

    /// git's rule: `host:path` is SSH when no `/` comes before the first `:`.
    fn path_or_scp(text: &str) -> Scheme {
        match text.find(':') {
            Some(colon) if colon > 0 && !text[..colon].contains('/') => Scheme::Ssh,
            _ => Scheme::Path,
        }
    }

    /// How the remote is reached.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Host, port, user and path of a network URL.
    pub fn parts(&self) -> Option<&Parts> {
        self.parts.as_deref()
    }

    /// The URL as given to git (it carries no password: [`parse`](Self::parse) refuses one).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// `[user@]host[:port][/path]` after the `scheme://`.
fn url_parts(rest: &str) -> Result<Parts, UrlError> {
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((userinfo, _)) if userinfo.contains(':') => return Err(UrlError::Password),
        Some((user, hostport)) => (Some(user.to_string()), hostport),
        None => (None, authority),
    };
    let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
        let (host, after) = inner.split_once(']').ok_or(UrlError::Host)?;
        (host, after.strip_prefix(':'))
    } else {
        match hostport.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return Err(UrlError::Host);
    }
    let port = match port {
        None | Some("") => None,
        Some(p) => Some(p.parse::<u16>().map_err(|_| UrlError::Port)?),
    };
    Ok(Parts {
        user,
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

/// `[user@]host:path` (scp syntax).
fn scp_parts(text: &str) -> Result<Parts, UrlError> {
    let (authority, path) = text.split_once(':').ok_or(UrlError::Host)?;
    let (user, host) = match authority.rsplit_once('@') {
        Some((user, host)) => (Some(user.to_string()), host),
        None => (None, authority),
    };
    if host.is_empty() || path.is_empty() {
        return Err(UrlError::Host);
    }
    Ok(Parts {
        user,
        host: host.to_string(),
        port: None,
        path: path.to_string(),
    })
}

/// Shows the URL without the user part of an HTTP(S) URL (`https://***@host/…`); paths, SSH
/// users and hosts are shown as they are.
impl fmt::Display for RemoteUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.text))
    }
}

impl fmt::Debug for RemoteUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemoteUrl({self})")
    }
}

/// `text` with the userinfo of every `http://` or `https://` URL in it replaced by `***`:
/// for text that did not come through [`RemoteUrl`] (a git error quoting a URL).
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = find_http(rest) {
        let (before, url) = rest.split_at(at);
        out.push_str(before);
        let start = url.find("://").map_or(0, |i| i + 3);
        let end = url[start..]
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'')
            .map_or(url.len(), |i| start + i);
        let authority = &url[start..end];
        out.push_str(&url[..start]);
        match authority.rfind('@') {
            Some(userinfo) => {
                out.push_str("***");
                out.push_str(&authority[userinfo..]);
            }
            None => out.push_str(authority),
        }
        rest = &url[end..];
    }
    out.push_str(rest);
    out
}

fn find_http(text: &str) -> Option<usize> {
    let lower = text.to_ascii_lowercase();
    [lower.find("https://"), lower.find("http://")]
        .into_iter()
        .flatten()
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_classified_as_git_classifies_them() {
        let scheme = |t: &str| RemoteUrl::parse(t).unwrap().scheme();
        assert_eq!(scheme("/srv/policy.git"), Scheme::Path);
        assert_eq!(scheme("policy.git"), Scheme::Path);
        assert_eq!(scheme("./a:b"), Scheme::Path);
        assert_eq!(scheme("file:///srv/policy.git"), Scheme::File);
        assert_eq!(scheme("HTTPS://git.example/p.git"), Scheme::Https);
        assert_eq!(scheme("http://git.example/p.git"), Scheme::Http);
        assert_eq!(scheme("git://git.example/p.git"), Scheme::Git);
        assert_eq!(scheme("ssh://git@git.example:2222/p.git"), Scheme::Ssh);
        assert_eq!(scheme("git@git.example:team/p.git"), Scheme::Ssh);
        assert!(Scheme::Https.is_network() && !Scheme::File.is_network());
        assert!(Scheme::Git.is_plaintext() && !Scheme::Ssh.is_plaintext());
    }

    #[test]
    fn parts_name_host_port_user_and_path() {
        let url = RemoteUrl::parse("ssh://git@[::1]:2222/srv/p.git").unwrap();
        assert_eq!(
            url.parts().unwrap(),
            &Parts {
                user: Some("git".into()),
                host: "::1".into(),
                port: Some(2222),
                path: "/srv/p.git".into()
            }
        );
        let scp = RemoteUrl::parse("git@git.example:team/p.git").unwrap();
        let parts = scp.parts().unwrap();
        assert_eq!(
            (parts.host.as_str(), parts.path.as_str()),
            ("git.example", "team/p.git")
        );
        let https = RemoteUrl::parse("https://git.example").unwrap();
        assert_eq!(https.parts().unwrap().path, "/");
        assert_eq!(https.parts().unwrap().port, None);
    }

    #[test]
    fn passwords_bad_hosts_and_unknown_schemes_are_refused() {
        assert_eq!(
            RemoteUrl::parse("https://ci:s3cret@git.example/p.git"),
            Err(UrlError::Password)
        );
        assert_eq!(
            RemoteUrl::parse("git+ssh://git.example/p.git"),
            Err(UrlError::Scheme("git+ssh".into()))
        );
        assert_eq!(RemoteUrl::parse("https:///p.git"), Err(UrlError::Host));
        assert_eq!(RemoteUrl::parse("https://h:x/p.git"), Err(UrlError::Port));
        assert_eq!(RemoteUrl::parse("  "), Err(UrlError::Empty));
        // The refusal never repeats the secret.
        assert!(!UrlError::Password.to_string().contains("s3cret"));
    }

    #[test]
    fn display_hides_http_userinfo_and_redact_cleans_free_text() {
        let url = RemoteUrl::parse("https://ci-bot@git.example/p.git").unwrap();
        assert_eq!(url.to_string(), "https://***@git.example/p.git");
        assert_eq!(
            format!("{url:?}"),
            "RemoteUrl(https://***@git.example/p.git)"
        );
        assert_eq!(url.as_str(), "https://ci-bot@git.example/p.git");
        assert_eq!(
            redact("failed: 'https://u:pw@h.example/r' and http://x@y/z, ssh://git@h/p"),
            "failed: 'https://***@h.example/r' and http://***@y/z, ssh://git@h/p"
        );
    }
}
