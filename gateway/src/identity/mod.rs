//! Workload identity: SPIFFE identifiers today; the CA, SVID minting, bundle and CRL as the
//! issuance pipeline lands. Owns the promise that a certificate's SPIFFE ID is always our trust
//! domain plus a validated path.

mod spiffe;

pub use spiffe::{MAX_SPIFFE_ID_LEN, SpiffeError, SpiffeId, SpiffePath, TrustDomain};
