//! SPIFFE identifiers, parsed and validated per the SPIFFE ID specification
//! (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>).
//!
//! The gateway only ever builds a [`SpiffeId`] from its own [`TrustDomain`] and a
//! [`SpiffePath`] that passed [`SpiffePath::parse`]: request input never reaches a certificate
//! unchecked.

use std::fmt;

/// Longest SPIFFE ID a certificate may carry, in bytes (SPIFFE ID spec §2.3, as URI SAN).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    /// The trust domain is empty.
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain has a character outside `a-z 0-9 . - _` (uppercase included: SPIFFE
    /// trust domains are lowercase so that one domain has one spelling).
    #[error("trust domain {domain:?} has a character outside a-z, 0-9, '.', '-', '_': {found:?}")]
    TrustDomainChar {
        /// The refused domain.
        domain: String,
        /// The first offending character.
        found: char,
    },
    /// The path does not start with `/`.
    #[error("path must start with '/'")]
    NotAbsolute,
    /// The path is just `/` or empty: a workload needs a path.
    #[error("path is empty")]
    EmptyPath,
    /// The path ends with `/`.
    #[error("path must not end with '/'")]
    TrailingSlash,
    /// Two slashes in a row.
    #[error("path has an empty segment")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("path has a relative segment {0:?}")]
    DotSegment(&'static str),
    /// A character outside `A-Z a-z 0-9 . - _` in a segment (no percent-encoding, no `:`).
    #[error("path has a character outside A-Z, a-z, 0-9, '.', '-', '_': {0:?}")]
    PathChar(char),
    /// The whole ID would be longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE ID would be {0} bytes, the limit is {MAX_SPIFFE_ID_LEN}")]
    TooLong(usize),
    /// Not a `spiffe://` URI.
    #[error("not a spiffe:// URI")]
    Scheme,
}

/// A SPIFFE trust domain, e.g. `prod.omnirelay.example`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a trust domain name (without `spiffe://`).
    pub fn parse(name: &str) -> Result<Self, SpiffeError> {
        if name.is_empty() {
            return Err(SpiffeError::EmptyTrustDomain);
        }
        if name.len() > 255 {
            return Err(SpiffeError::TooLong(name.len() + "spiffe://".len()));
        }
        let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c);
        if let Some(found) = name.chars().find(|&c| !allowed(c)) {
            return Err(SpiffeError::TrustDomainChar {
                domain: name.to_string(),
                found,
            });
        }
        Ok(Self(name.to_string()))
    }

    /// The domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The path part of a SPIFFE ID: `/`-separated, non-empty segments of `A-Z a-z 0-9 . - _`,
/// no `.`/`..` segments, no trailing slash.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffePath(String);

impl SpiffePath {
    /// Parses and validates a path such as `/cluster/edge/node/n1`.
    pub fn parse(path: &str) -> Result<Self, SpiffeError> {
        // Checked first so that a huge input is refused before it is walked.
        if path.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeError::TooLong(path.len()));
        }
        let rest = path.strip_prefix('/').ok_or(SpiffeError::NotAbsolute)?;
        if rest.is_empty() {
            return Err(SpiffeError::EmptyPath);
        }
        if rest.ends_with('/') {
            return Err(SpiffeError::TrailingSlash);
        }
        for segment in rest.split('/') {
            match segment {
                "" => return Err(SpiffeError::EmptySegment),
                "." => return Err(SpiffeError::DotSegment(".")),
                ".." => return Err(SpiffeError::DotSegment("..")),
                _ => {}
            }
            let allowed = |c: char| c.is_ascii_alphanumeric() || ".-_".contains(c);
            if let Some(c) = segment.chars().find(|&c| !allowed(c)) {
                return Err(SpiffeError::PathChar(c));
            }
        }
        Ok(Self(path.to_string()))
    }

    /// The path, starting with `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SpiffePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A complete SPIFFE ID, `spiffe://<trust-domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    path: SpiffePath,
}

impl SpiffeId {
    /// Joins a trust domain and a path, refusing IDs longer than [`MAX_SPIFFE_ID_LEN`].
    pub fn new(trust_domain: TrustDomain, path: SpiffePath) -> Result<Self, SpiffeError> {
        let len = "spiffe://".len() + trust_domain.0.len() + path.0.len();
        if len > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeError::TooLong(len));
        }
        Ok(Self { trust_domain, path })
    }

    /// Parses `spiffe://domain/path`.
    pub fn parse(uri: &str) -> Result<Self, SpiffeError> {
        let rest = uri.strip_prefix("spiffe://").ok_or(SpiffeError::Scheme)?;
        let (domain, path) = rest.split_at(rest.find('/').ok_or(SpiffeError::EmptyPath)?);
        Self::new(TrustDomain::parse(domain)?, SpiffePath::parse(path)?)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path.
    pub fn path(&self) -> &SpiffePath {
        &self.path
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_well_formed_paths() {
        for p in [
            "/a",
            "/cluster/edge-eu/role/dispatcher/node/n_1",
            "/A.b-C_d/9",
        ] {
            assert_eq!(SpiffePath::parse(p).unwrap().as_str(), p);
        }
    }

    #[test]
    fn refuses_malformed_paths_with_the_specific_reason() {
        let cases: &[(&str, SpiffeError)] = &[
            ("", SpiffeError::NotAbsolute),
            ("a/b", SpiffeError::NotAbsolute),
            ("/", SpiffeError::EmptyPath),
            ("/a/", SpiffeError::TrailingSlash),
            ("/a//b", SpiffeError::EmptySegment),
            ("//evil.example/admin", SpiffeError::EmptySegment),
            ("/a/../admin", SpiffeError::DotSegment("..")),
            ("/./a", SpiffeError::DotSegment(".")),
            ("/a%2Fb", SpiffeError::PathChar('%')),
            ("/spiffe:/x", SpiffeError::PathChar(':')),
            ("/a b", SpiffeError::PathChar(' ')),
            ("/ä", SpiffeError::PathChar('ä')),
            ("/a?b", SpiffeError::PathChar('?')),
            ("/a#b", SpiffeError::PathChar('#')),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffePath::parse(input).unwrap_err(), *want, "{input:?}");
        }
        let long = format!("/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert_eq!(
            SpiffePath::parse(&long).unwrap_err(),
            SpiffeError::TooLong(MAX_SPIFFE_ID_LEN + 1)
        );
    }

    #[test]
    fn trust_domains_are_lowercase_only() {
        assert!(TrustDomain::parse("prod.omnirelay.example").is_ok());
        for bad in ["Prod.example", "EXAMPLE.ORG", "a:443", "user@a", "a/b", ""] {
            assert!(TrustDomain::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn whole_id_length_is_bounded_and_round_trips() {
        let td = TrustDomain::parse("example.org").unwrap();
        let path = SpiffePath::parse(&format!("/{}", "a".repeat(2030))).unwrap();
        assert!(matches!(
            SpiffeId::new(td.clone(), path),
            Err(SpiffeError::TooLong(_))
        ));
        let id = SpiffeId::new(td, SpiffePath::parse("/node/n1").unwrap()).unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/node/n1");
        assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
        assert!(SpiffeId::parse("spiffe://EXAMPLE.org/x").is_err());
        assert!(SpiffeId::parse("https://example.org/x").is_err());
    }
}
