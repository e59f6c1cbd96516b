//! The JSON bodies of the HTTP API, shared by the server and by clients (the node agent, the
//! CLI, tests and the load generator) so both sides agree on one definition. A leaf: it imports
//! nothing from the rest of the crate, so the node side can use it without the server.

use serde::{Deserialize, Serialize};

/// `GET /v1/bootstrap/challenge`: a nonce to bind into attestation evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// Put this in the evidence.
    pub nonce: String,
    /// Unix seconds from which it is refused.
    pub expires_at: u64,
}

/// `POST /v1/bootstrap/join`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The bootstrap token (a JWT).
    pub token: String,
    /// The node's name: 1–63 characters of `a-z 0-9 -`, not starting or ending with `-`.
    pub node_name: String,
    /// The certificate signing request, PEM. Only its public key is used.
    pub csr: String,
    /// Lets a retry after a lost response get the same certificate without a second use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The attestation evidence (see `attest::Evidence`); validated against the selected
    /// policy's JSON Schema as sent.
    pub attestation: serde_json::Value,
}

/// A successful join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinResponse {
    /// The SPIFFE ID granted.
    pub spiffe_id: String,
    /// Certificate serial, hex.
    pub serial: String,
    /// Validity start, Unix seconds.
    pub not_before: u64,
    /// Validity end, Unix seconds.
    pub not_after: u64,
    /// Renew at this time (Unix seconds), give or take jitter.
    pub renew_after: u64,
    /// The X.509-SVID and any intermediates, PEM, leaf first.
    pub certificate_chain: String,
    /// The trust bundle (CA certificates), PEM.
    pub bundle: String,
    /// The policy that decided.
    pub policy: PolicyVersion,
}

/// `POST /v1/bootstrap/renew`, over mTLS with the node's current SVID as client certificate
/// (the certificate is the credential: no token, no attestation). The answer is a
/// [`JoinResponse`] for the new identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// The certificate signing request for the new SVID, PEM. A new key unless the policy
    /// permits reusing the current one.
    pub csr: String,
    /// Lets a retry after a lost response get the same certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// One entry of the revocation feed (`GET /v1/revocations?since=SEQ`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Position in the feed; ask for `since=<seq>` to get what follows it.
    pub seq: u64,
    /// The revoked certificate's serial, hex.
    pub serial: String,
    /// The SPIFFE ID it carried.
    pub spiffe_id: String,
    /// The token it descends from.
    pub token_id: String,
    /// When it was revoked, Unix seconds.
    pub revoked_at: u64,
    /// Why (`superseded`, `token-revoked`, or an operator's reason).
    pub reason: String,
    /// The certificate's expiry, Unix seconds: after it a relying party can forget the entry.
    pub not_after: u64,
}

/// A page of the revocation feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationPage {
    /// Entries after `since`, oldest first.
    pub revocations: Vec<Revocation>,
    /// Ask for `since=<next>` next time.
    pub next: u64,
}

/// Which policy version decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersion {
    /// Policy name.
    pub name: String,
    /// Bundle version.
    pub version: String,
}

/// `POST /admin/v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueTokenRequest {
    /// Cluster the token admits to.
    pub cluster: String,
    /// Role it grants.
    pub role: String,
    /// Lifetime, seconds.
    pub ttl_seconds: u64,
    /// Joins it allows.
    pub max_uses: u32,
    /// Who asked (recorded in the audit log).
    #[serde(default)]
    pub issued_by: Option<String>,
    /// Admit only the node of this name (the gateway refuses a join naming another node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// A join with this token may replace a live identity of the same SPIFFE ID (revoking it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub supersede: bool,
}

/// A freshly issued token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssueTokenResponse {
    /// The token itself: a secret, shown once.
    pub token: String,
    /// Its audit GUID.
    pub id: String,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
}

/// `POST /admin/v1/tokens/{id}/revoke`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// Why (recorded in the audit log).
    #[serde(default)]
    pub reason: Option<String>,
    /// Who asked.
    #[serde(default)]
    pub revoked_by: Option<String>,
}

/// The answer to a revocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokeResponse {
    /// False when no such token exists.
    pub revoked: bool,
}

/// An RFC 7807 problem, as every refusal is reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The HTTP reason phrase.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// The pipeline stage that refused.
    pub stage: String,
    /// A stable, machine-readable reason.
    pub reason: String,
    /// What the client may be told.
    pub detail: String,
    /// Correlates with the gateway's logs and audit entries.
    pub request_id: String,
}

/// `POST /admin/v1/policy/pin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinRequest {
    /// A bundle version (`1.2.0`), tag or commit id.
    pub target: String,
    /// Who asked (audited).
    #[serde(default)]
    pub by: Option<String>,
}

/// `POST /admin/v1/policy/unpin`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnpinRequest {
    /// Who asked (audited).
    #[serde(default)]
    pub by: Option<String>,
}

/// The answer to a reload, pin or unpin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadResponse {
    /// `ok` (a new version is active) or `unchanged`.
    pub result: String,
    /// The version now active.
    pub active: Option<Version>,
}

/// A policy bundle version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// Bundle name.
    pub bundle: String,
    /// Version.
    pub version: String,
    /// Commit id.
    pub commit: String,
    /// When it became active, Unix seconds.
    pub since: u64,
}

/// `POST /admin/v1/identities/issue`: an operator's manual issuance for a SPIFFE ID with an
/// identity on record (the fallback during a renewal outage). The answer is a [`JoinResponse`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManualIssueRequest {
    /// The node's CSR, PEM.
    pub csr: String,
    /// The SPIFFE ID to issue; its newest identity on record is the one continued.
    pub spiffe_id: String,
    /// Requested lifetime, seconds; the policy's grant caps it.
    pub ttl_seconds: u64,
    /// Why (audited, and shown to the policy).
    pub reason: String,
    /// Who asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_by: Option<String>,
}

/// `POST /admin/v1/revoke`: exactly one of `token`, `spiffe_id`, `serial`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeIdentityRequest {
    /// A token's audit GUID: the token and every identity of its lineages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A SPIFFE ID: every identity carrying it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// A certificate serial (hex): it and every renewal descending from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Why (audited, published in the revocation feed).
    pub reason: String,
    /// Who asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
}

/// `POST /admin/v1/quarantine/lift`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiftQuarantineRequest {
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// Who asked (audited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// The answer to a lift.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiftQuarantineResponse {
    /// False when the SPIFFE ID was not quarantined.
    pub lifted: bool,
}
