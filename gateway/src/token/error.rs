//! Everything that can go wrong signing, loading keys for, or verifying a bootstrap token. Every
//! verification variant is a refusal; [`TokenError::reason`] names it for audit and metrics.

use aws_lc_rs::error::{KeyRejected, Unspecified};

use super::MAX_TOKEN_LEN;

/// A token was refused, or a key could not be loaded.
///
/// Strings carried from a token are clipped to 64 characters and printed with `{:?}`,
/// so an attacker cannot put a long or control-character-laden value into a log line.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token is longer than [`MAX_TOKEN_LEN`]; checked before anything is parsed.
    #[error("token is {0} bytes, the limit is {MAX_TOKEN_LEN}")]
    TooLong(usize),
    /// The token is not a compact JWS: the named part (`"structure"`, `"header"`, `"payload"`,
    /// `"signature"`) is not base64url without padding, or is not the JSON it should be.
    #[error("token is malformed: bad {0}")]
    Malformed(&'static str),
    /// The header names an algorithm other than `EdDSA` (`none` and `HS256` included).
    #[error("token algorithm {0:?} is not supported (only EdDSA)")]
    UnsupportedAlgorithm(String),
    /// The header has a `typ` other than `JWT`.
    #[error("token type {0:?} is not supported (only JWT)")]
    UnsupportedType(String),
    /// The header has a `crit` parameter; we understand no extensions, so we must refuse
    /// (RFC 7515 §4.1.11).
    #[error("token header has a `crit` parameter")]
    CriticalHeader,
    /// The header has no `kid`, so there is no key to check the signature with.
    #[error("token header has no `kid`")]
    MissingKeyId,
    /// The header's `kid` names no key this verifier holds.
    #[error("token key {0:?} is not one of ours")]
    UnknownKey(String),
    /// The signature does not verify under the key the header names.
    #[error("token signature does not verify")]
    BadSignature,
    /// Now is at or past `exp` plus the leeway.
    #[error("token expired at {expires_at}")]
    Expired {
        /// The token's `exp`, unix seconds.
        expires_at: u64,
    },
    /// Now is before `nbf` minus the leeway.
    #[error("token is not valid before {not_before}")]
    NotYetValid {
        /// The token's `nbf`, unix seconds.
        not_before: u64,
    },
    /// The token's `aud` is not this gateway's trust domain.
    #[error("token is for audience {0:?}, not this gateway")]
    WrongAudience(String),
    /// A claim is missing, has the wrong JSON type, or breaks its syntax rule.
    #[error("token claim `{claim}` is invalid: {why}")]
    InvalidClaim {
        /// The claim's name on the wire (`jti`, `cluster`, `max_uses`, …).
        claim: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A key PEM has no section of the expected kind, or the section does not decode.
    #[error("cannot read the {what} PEM")]
    KeyPem {
        /// Which PEM: `"private key"` or `"public key"`.
        what: &'static str,
        /// The PEM parser's complaint.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The key decoded but is not a usable Ed25519 key.
    #[error("key is not a usable Ed25519 key")]
    KeyRejected(#[source] KeyRejected),
    /// The public key PEM holds a key of another algorithm.
    #[error("public key is not an Ed25519 SubjectPublicKeyInfo")]
    NotEd25519,
    /// The crypto library could not generate or encode a key.
    #[error("cannot generate a signing key")]
    KeyGeneration(#[source] Unspecified),
}

impl TokenError {
    /// A stable kebab-case code for audit entries and metric labels. Never changes meaning
    /// once shipped; safe to show to the presenter of the token.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLong(_) => "too-long",
            Self::Malformed(_) => "malformed",
            Self::UnsupportedAlgorithm(_) => "unsupported-algorithm",
            Self::UnsupportedType(_) => "unsupported-type",
            Self::CriticalHeader => "critical-header",
            Self::MissingKeyId => "missing-key-id",
            Self::UnknownKey(_) => "unknown-key",
            Self::BadSignature => "bad-signature",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not-yet-valid",
            Self::WrongAudience(_) => "wrong-audience",
            Self::InvalidClaim { .. } => "invalid-claim",
            Self::KeyPem { .. } => "key-pem",
            Self::KeyRejected(_) => "key-rejected",
            Self::NotEd25519 => "not-ed25519",
            Self::KeyGeneration(_) => "key-generation",
        }
    }
}

/// Longest header value an error carries, in characters.
const CLIP: usize = 64;

/// A copy of an untrusted value short enough to carry in an error.
pub(super) fn clip(value: &str) -> String {
    value.chars().take(CLIP).collect()
}
