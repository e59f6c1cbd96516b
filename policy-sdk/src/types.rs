//! Plain Rust mirrors of the WIT records in `wit/policy.wit`.
//!
//! Policies are written against these types; the export macro converts them to and from the
//! canonical ABI. The gateway uses the same types (with serde) for test vectors, so a vector
//! file reads like the request a policy sees.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// Why the node is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RequestKind {
    /// First identity for a node, authorised by a bootstrap token.
    #[default]
    Join,
    /// A node holding a valid SVID asks for a fresh one.
    Renew,
    /// An operator issues by hand (`omnirelay identities issue`, the fallback during a renewal
    /// outage) for a SPIFFE ID that has an identity on record. The token claims, attestation and
    /// node name are those of that lineage's join; [`EXT_MANUAL_REASON`] and
    /// [`EXT_MANUAL_BY`] say why and who; the grant's path must be the requested SPIFFE ID's.
    /// On the wire (WIT 0.1.0) this is `join` with [`EXT_REQUEST_KIND`] = `manual`, so a policy
    /// built with an SDK that predates it decides it as a join of the same node.
    Manual,
}

/// A free-form key/value pair (the request's forward-compatible extension point).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kv {
    /// Key; unknown keys must be ignored by policies.
    pub key: String,
    /// Value.
    pub value: String,
}

/// Claims of the bootstrap token, already verified by the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenClaims {
    /// The token's audit GUID (`jti`).
    pub audit_id: String,
    /// Cluster the token was issued for.
    pub cluster: String,
    /// Role the token was issued for.
    pub role: String,
    /// The gateway's SPIFFE trust domain (the token's audience).
    pub trust_domain: String,
    /// Not-before, Unix seconds.
    #[serde(default)]
    pub not_before: u64,
    /// Expiry, Unix seconds.
    #[serde(default = "far_future")]
    pub expires_at: u64,
    /// Total joins the token allows.
    #[serde(default = "one")]
    pub max_uses: u32,
    /// Joins left, this one included.
    #[serde(default = "one")]
    pub uses_left: u32,
}

fn far_future() -> u64 {
    u64::from(u32::MAX)
}

fn one() -> u32 {
    1
}

/// A typed attestation claim value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClaimValue {
    /// A yes/no fact, such as `secure-boot`.
    Flag(bool),
    /// A number.
    Integer(i64),
    /// Text, such as an agent version.
    Text(String),
}

/// One named attestation claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Claim name, e.g. `secure-boot`.
    pub name: String,
    /// Claim value.
    pub value: ClaimValue,
}

/// How the node proved itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttestationKind {
    /// The bootstrap token is the only proof.
    #[default]
    TokenOnly,
    /// Proof of possession of a pre-provisioned device certificate over a gateway nonce.
    X509pop,
}

/// Attestation evidence after the gateway checked it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attestation {
    /// Which attestation method was used.
    #[serde(default)]
    pub kind: AttestationKind,
    /// Claims the gateway verified cryptographically.
    #[serde(default)]
    pub verified: Vec<Claim>,
    /// Claims the node asserted without proof. Never treat these as evidence.
    #[serde(default)]
    pub self_reported: Vec<Claim>,
    /// When the evidence was produced, Unix milliseconds.
    #[serde(default)]
    pub issued_at_ms: u64,
}

impl Attestation {
    /// The value of a claim the gateway verified, if present.
    pub fn verified_claim(&self, name: &str) -> Option<&ClaimValue> {
        self.verified
            .iter()
            .find(|c| c.name == name)
            .map(|c| &c.value)
    }

    /// The value of a claim the node reported about itself, if present.
    pub fn self_reported_claim(&self, name: &str) -> Option<&ClaimValue> {
        self.self_reported
            .iter()
            .find(|c| c.name == name)
            .map(|c| &c.value)
    }
}

/// Key algorithm of the CSR's public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    /// ECDSA on P-256.
    #[default]
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// RSA of any size (see [`CsrFacts::key_bits`]).
    Rsa,
    /// Anything else.
    Other,
}

/// Facts parsed from the certificate signing request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsrFacts {
    /// Key algorithm.
    #[serde(default)]
    pub key_algorithm: KeyAlgorithm,
    /// Key size in bits.
    #[serde(default = "p256_bits")]
    pub key_bits: u32,
    /// DNS names the node asked for (never copied into the certificate by the gateway).
    #[serde(default)]
    pub requested_dns_names: Vec<String>,
    /// URIs the node asked for (never copied into the certificate by the gateway).
    #[serde(default)]
    pub requested_uris: Vec<String>,
}

fn p256_bits() -> u32 {
    256
}

impl Default for CsrFacts {
    fn default() -> Self {
        Self {
            key_algorithm: KeyAlgorithm::EcdsaP256,
            key_bits: 256,
            requested_dns_names: Vec::new(),
            requested_uris: Vec::new(),
        }
    }
}

/// Everything a policy may base its decision on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Join, renew or manual (an operator's issuance).
    #[serde(default)]
    pub kind: RequestKind,
    /// Verified token claims.
    pub token: TokenClaims,
    /// Checked attestation evidence.
    #[serde(default)]
    pub attestation: Attestation,
    /// Facts from the CSR.
    #[serde(default)]
    pub csr: CsrFacts,
    /// The node's name (DNS-label characters, validated by the gateway).
    pub node_name: String,
    /// The client's IP address as the gateway saw it.
    #[serde(default)]
    pub client_address: String,
    /// The gateway's clock, Unix milliseconds. Policies have no clock of their own.
    pub now_ms: u64,
    /// Extension point; ignore keys you do not know.
    #[serde(default)]
    pub extensions: Vec<Kv>,
}

/// Extension key: how the gateway bound `node-name` to something it verified — `device` (the
/// x509pop device certificate's common name, the verified `device-id` claim), `token` (the
/// token's `node` claim) or `none` (a fleet token: the name is the node's own choice, and only
/// the gateway's one-live-identity-per-SPIFFE-ID rule protects it).
pub const EXT_NODE_BINDING: &str = "omnirelay.node-binding";
/// Extension key: the node name the token admits, when the token is bound to one.
pub const EXT_TOKEN_NODE: &str = "omnirelay.token-node";
/// Extension key: `true` when the token may supersede a live identity of the same SPIFFE ID.
pub const EXT_SUPERSEDE: &str = "omnirelay.supersede";
/// Extension key (renewals): the SPIFFE ID of the certificate being renewed.
pub const EXT_RENEW_SPIFFE_ID: &str = "omnirelay.renew.spiffe-id";
/// Extension key (renewals): its serial, hex.
pub const EXT_RENEW_SERIAL: &str = "omnirelay.renew.serial";
/// Extension key (renewals): its notAfter, Unix seconds.
pub const EXT_RENEW_NOT_AFTER: &str = "omnirelay.renew.not-after";
/// Extension key (renewals): how many renewals its lineage had before this one (0 when the
/// certificate being renewed came from the join).
pub const EXT_RENEW_COUNT: &str = "omnirelay.renew.renewals";
/// Extension key (renewals): `true` when the CSR carries the key of the certificate being
/// renewed. The gateway refuses that unless the allow carries [`KEY_REUSE_PERMITTED`].
pub const EXT_RENEW_SAME_KEY: &str = "omnirelay.renew.same-key";
/// Extension key: `manual` for an operator's manual issuance (see [`RequestKind::Manual`]),
/// which the WIT 0.1.0 contract carries as kind `join`; the SDK turns it back into
/// [`RequestKind::Manual`].
pub const EXT_REQUEST_KIND: &str = "omnirelay.request-kind";
/// Extension key (manual issuance): the operator's reason, as audited.
pub const EXT_MANUAL_REASON: &str = "omnirelay.manual.reason";
/// Extension key (manual issuance): the operator who issued.
pub const EXT_MANUAL_BY: &str = "omnirelay.manual.by";
/// The audit note by which an allow permits a renewal to keep its key
/// ([`Allow::permit_key_reuse`]); it is recorded with the renewal like any note.
pub const KEY_REUSE_PERMITTED: &str = "omnirelay.renew.key-reuse-permitted";

/// The identity a renewal renews (what the node's client certificate carries), from the
/// `omnirelay.renew.*` extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentIdentity<'a> {
    /// The SPIFFE ID.
    pub spiffe_id: &'a str,
    /// The serial, hex.
    pub serial: &'a str,
    /// notAfter, Unix seconds.
    pub not_after: u64,
    /// Renewals in the lineage before this one.
    pub renewals: u32,
    /// Whether the CSR reuses the current key.
    pub same_key: bool,
}

impl Request {
    /// The value of an extension, if the gateway sent it.
    pub fn extension(&self, key: &str) -> Option<&str> {
        self.extensions
            .iter()
            .find(|kv| kv.key == key)
            .map(|kv| kv.value.as_str())
    }

    /// The node's name as the gateway verified it: the device certificate's `device-id` under
    /// x509pop, the token's `node` claim for a node-bound token, otherwise `None` (the
    /// node chose its name itself). The gateway refuses a join whose `node-name` differs from
    /// a bound name, so when this is `Some` it equals `node-name`; build identities from it.
    pub fn verified_node_name(&self) -> Option<&str> {
        if let Some(ClaimValue::Text(id)) = self.attestation.verified_claim("device-id") {
            return Some(id);
        }
        self.extension(EXT_TOKEN_NODE)
    }

    /// [`Request::verified_node_name`] when there is one, else the self-chosen `node-name`.
    pub fn node_identity(&self) -> &str {
        self.verified_node_name().unwrap_or(&self.node_name)
    }

    /// For a renewal, the identity being renewed; `None` for a join. The token claims and the
    /// attestation of a renewal are those the lineage's join was decided on.
    pub fn current_identity(&self) -> Option<CurrentIdentity<'_>> {
        if self.kind != RequestKind::Renew {
            return None;
        }
        Some(CurrentIdentity {
            spiffe_id: self.extension(EXT_RENEW_SPIFFE_ID)?,
            serial: self.extension(EXT_RENEW_SERIAL)?,
            not_after: self.extension(EXT_RENEW_NOT_AFTER)?.parse().ok()?,
            renewals: self.extension(EXT_RENEW_COUNT)?.parse().ok()?,
            same_key: self.extension(EXT_RENEW_SAME_KEY) == Some("true"),
        })
    }
}

/// Something the gateway must enforce when it issues, or refuse to issue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Obligation {
    /// Tell the node to renew after this many seconds.
    RenewAfterSeconds(u32),
    /// Record this note with the issuance in the audit log.
    AuditNote(String),
}

/// Issue an identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allow {
    /// SPIFFE ID path, starting with `/`; the gateway adds its own trust domain.
    pub spiffe_path: String,
    /// Requested lifetime in seconds (capped by the gateway).
    pub ttl_seconds: u32,
    /// DNS SANs to include.
    #[serde(default)]
    pub dns_sans: Vec<String>,
    /// Obligations the gateway must enforce.
    #[serde(default)]
    pub obligations: Vec<Obligation>,
    /// Names of the rules that matched.
    #[serde(default)]
    pub matched_rules: Vec<String>,
}

impl Allow {
    /// An allow for `spiffe_path` with lifetime `ttl_seconds` and nothing else.
    pub fn new(spiffe_path: impl Into<String>, ttl_seconds: u32) -> Self {
        Self {
            spiffe_path: spiffe_path.into(),
            ttl_seconds,
            dns_sans: Vec::new(),
            obligations: Vec::new(),
            matched_rules: Vec::new(),
        }
    }

    /// Adds a DNS SAN.
    pub fn dns_san(mut self, name: impl Into<String>) -> Self {
        self.dns_sans.push(name.into());
        self
    }

    /// Adds an obligation.
    pub fn obligation(mut self, obligation: Obligation) -> Self {
        self.obligations.push(obligation);
        self
    }

    /// Records the name of a rule that matched.
    pub fn matched(mut self, rule: impl Into<String>) -> Self {
        self.matched_rules.push(rule.into());
        self
    }

    /// Lets a renewal keep the key of the certificate it renews (refused by default: a new
    /// key per certificate limits what a leaked key is worth).
    pub fn permit_key_reuse(self) -> Self {
        self.obligation(Obligation::AuditNote(KEY_REUSE_PERMITTED.into()))
    }
}

/// Refuse the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deny {
    /// Stable machine-readable code, e.g. `cluster-not-allowed`.
    pub code: String,
    /// Why, for the operator (audit log only).
    pub reason: String,
    /// What the node may be told; when absent it learns only the code.
    #[serde(default)]
    pub node_message: Option<String>,
    /// Suggest a retry after this many seconds.
    #[serde(default)]
    pub retry_after_seconds: Option<u32>,
}

impl Deny {
    /// A deny with a code and an operator-only reason.
    pub fn new(code: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            reason: reason.into(),
            node_message: None,
            retry_after_seconds: None,
        }
    }

    /// Sets the message the node may see.
    pub fn node_message(mut self, message: impl Into<String>) -> Self {
        self.node_message = Some(message.into());
        self
    }

    /// Suggests a retry delay.
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after_seconds = Some(seconds);
        self
    }
}

/// A policy's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Issue.
    Allow(Allow),
    /// Refuse.
    Deny(Deny),
}

/// The policy could not decide. The gateway fails closed and alerts on these apart from denials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyError {
    /// What went wrong, for the operator.
    pub message: String,
}

impl PolicyError {
    /// A policy error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl core::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.message)
    }
}

impl core::error::Error for PolicyError {}
