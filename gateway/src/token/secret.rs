//! The bootstrap token as a secret string: it can be carried and passed to the verifier, but
//! never printed.

use std::fmt;

/// A secret bootstrap token string. `Debug` prints only its length; there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenString(String);

impl TokenString {
    /// Wraps a token as presented or as just signed.
    pub fn new(token: String) -> Self {
        Self(token)
    }

    /// The token itself, for the verifier or for handing to the node that will present it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TokenString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenString(<redacted, {} bytes>)", self.0.len())
    }
}
