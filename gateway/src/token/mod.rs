//! Bootstrap tokens: self-describing Ed25519-signed JWTs (compact JWS, `alg` `EdDSA`) that name
//! the audience, cluster, role, validity window and use limit of a join.
//!
//! Promises: signing and verification only, no I/O and no database; no claim is read before
//! the signature verifies under a key the verifier was given (never one the token names by
//! URL or embeds); every refusal is a [`TokenError`] with a stable [`TokenError::reason`];
//! keys and tokens have redacting `Debug` implementations and tokens have no `Display`.

mod claims;
mod config;
mod error;
mod keys;
mod secret;
mod verify;

pub use claims::{Claims, MAX_USES_LIMIT, NODE_NAME_RULE, TokenId, is_node_name};
pub use config::TokenConfig;
pub use error::TokenError;
pub use keys::{SigningKey, VerifyingKey};
pub use secret::TokenString;
pub use verify::Verifier;

/// Longest token the verifier will look at, in bytes. Ours are about 400.
pub const MAX_TOKEN_LEN: usize = 4096;

#[cfg(test)]
mod tests;
