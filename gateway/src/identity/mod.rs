//! Workload identity: SPIFFE identifiers, CSR intake, the issuing CA, X.509-SVID minting and the
//! trust bundle. Owns the promise that a certificate's SPIFFE ID is always our trust domain plus a
//! validated path handed over by the caller, and that nothing a node puts in its CSR other than
//! the public key reaches a certificate. CA rotation (`rotation`) keeps the CA set in force
//! ([`CaSet`]) and its durable state.

mod bundle;
mod ca;
mod client;
mod config;
mod csr;
mod error;
mod leaf;
mod rotation;
mod serial;
mod serving;
mod spiffe;
mod trust;

pub use bundle::{bundle_pem, spiffe_bundle};
pub use ca::{CA_CLOCK_SKEW, Ca, CrlEntry, LEAF_CLOCK_SKEW, MintRequest, Svid};
pub use client::{ClientSvid, ClientSvidError, verify_client_svid};
pub use config::IdentityConfig;
pub use csr::{CsrError, MAX_RSA_BITS, MIN_RSA_BITS, VerifiedCsr, verify_csr};
pub use error::IdentityError;
pub use leaf::pem_encode;
pub use rotation::{
    CaStatus, CaStatusEntry, Change, Committed, Plan, Rotation, RotationError, RotationRequest,
    rotation_state_file, trust_bundle,
};
pub use serial::{Serial, SerialError};
pub use serving::reissue_server_cert;
pub use spiffe::{MAX_SPIFFE_ID_LEN, SpiffeError, SpiffeId, SpiffePath, TrustDomain};
pub use trust::{CaSet, CaState, TrustedCa, issued_by};

#[cfg(test)]
mod tests;
