//! The audit event types: what happened, as data. Owns their JSON shape, which is part of the
//! on-disk format: `kind` tag first, kebab-case kinds, snake_case fields, absent options omitted.

use serde::{Deserialize, Serialize};

/// Something the gateway did or refused that an auditor must be able to find later.
///
/// Identifiers are plain strings here (token GUID, SPIFFE ID, serial in hex, request id): the
/// log must stay readable even for values that a later version of the parsers would refuse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AuditEvent {
    /// An operator issued a bootstrap token.
    TokenIssued {
        /// The token's GUID (never the secret).
        token_id: String,
        /// The cluster the token admits to.
        cluster: String,
        /// The role the token admits as.
        role: String,
        /// How many joins the token allows.
        max_uses: u32,
        /// Unix seconds before which the token is refused.
        not_before: u64,
        /// Unix seconds from which the token is refused.
        expires_at: u64,
        /// Who issued it (operator identity).
        issued_by: String,
        /// The only node name the token admits, when it is bound to one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        /// Whether a join with it may replace a live identity of the same SPIFFE ID.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        supersede: bool,
    },
    /// An operator revoked a bootstrap token.
    TokenRevoked {
        /// The token's GUID.
        token_id: String,
        /// Why, in the operator's words.
        reason: String,
        /// Who revoked it (operator identity).
        revoked_by: String,
    },
    /// A join request was refused before an identity was issued.
    JoinRefused {
        /// The request id.
        request_id: String,
        /// The pipeline stage that refused (`limits`, `token`, `attest`, `policy`, ...).
        stage: String,
        /// The HTTP status returned.
        status: u16,
        /// Why, as the operator should read it.
        reason: String,
        /// The token's GUID, when the request got far enough to name one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_id: Option<String>,
        /// The cluster, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cluster: Option<String>,
        /// The role, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role: Option<String>,
        /// The node name, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        /// The client's address.
        client_ip: String,
        /// The policy that refused, when the refusal came from a policy.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy: Option<PolicyRef>,
    },
    /// A policy decided on a join request.
    PolicyDecision {
        /// The request id.
        request_id: String,
        /// The token's GUID.
        token_id: String,
        /// The node name.
        node: String,
        /// `allow`, `deny` or `error`.
        outcome: String,
        /// The policy's machine-readable code, when it gave one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        /// The policy's reason for operators, when it gave one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        operator_reason: Option<String>,
        /// The rules the policy reports as matched.
        matched_rules: Vec<String>,
        /// The policy that decided.
        policy: PolicyRef,
    },
    /// An X.509-SVID was issued.
    IdentityIssued {
        /// The request id.
        request_id: String,
        /// The token's GUID.
        token_id: String,
        /// The SPIFFE ID in the certificate.
        spiffe_id: String,
        /// The certificate serial, hex.
        serial: String,
        /// The node name.
        node: String,
        /// Unix seconds at which the certificate expires.
        not_after: u64,
        /// The token's use count after this issuance.
        uses_after: u32,
        /// Notes the policy asked to have audited.
        audit_notes: Vec<String>,
        /// The rules of the policy that matched: this entry is also the record of the allow
        /// decision (a separate `policy-decision` entry is written for denials and errors).
        matched_rules: Vec<String>,
        /// The policy that allowed it.
        policy: PolicyRef,
    },
    /// A live identity was revoked because a join with a superseding token took its SPIFFE ID.
    IdentitySuperseded {
        /// The request id of the superseding join.
        request_id: String,
        /// The SPIFFE ID both certificates carry.
        spiffe_id: String,
        /// The serial of the revoked certificate, hex.
        serial: String,
        /// The token the revoked certificate was issued through.
        token_id: String,
        /// The serial of the certificate that replaces it, hex.
        superseded_by: String,
        /// The superseding token.
        superseding_token_id: String,
    },
    /// A node renewed its identity: a new certificate succeeds the one it presented, in the
    /// same lineage (same token, same SPIFFE ID).
    IdentityRenewed {
        /// The request id.
        request_id: String,
        /// The token the lineage began with.
        token_id: String,
        /// The SPIFFE ID both certificates carry.
        spiffe_id: String,
        /// The new certificate's serial, hex.
        serial: String,
        /// The presented (renewed) certificate's serial, hex.
        predecessor: String,
        /// Renewals in the lineage, this one included.
        renewals: u32,
        /// The node name.
        node: String,
        /// Unix seconds at which the new certificate expires.
        not_after: u64,
        /// Notes the policy asked to have audited.
        audit_notes: Vec<String>,
        /// The rules of the policy that matched (the record of the allow decision).
        matched_rules: Vec<String>,
        /// The policy that allowed it.
        policy: PolicyRef,
        /// Set when an operator issued it by hand (`omnirelay identities issue`, policy kind
        /// `manual`) instead of the node renewing: who, and why.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        manual: Option<ManualIssuance>,
    },
    /// An operator's manual issuance (`omnirelay identities issue`) was refused.
    ManualIssueRefused {
        /// The request id.
        request_id: String,
        /// The refusing stage.
        stage: String,
        /// The HTTP status returned.
        status: u16,
        /// `<reason code>: <explanation>`.
        reason: String,
        /// The SPIFFE ID asked for.
        spiffe_id: String,
        /// The identity on record it would have succeeded, when one was found.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        predecessor: Option<String>,
        /// The token that lineage began with, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_id: Option<String>,
        /// Who asked, and why.
        manual: ManualIssuance,
        /// The policy that refused, when the refusal came from a policy.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy: Option<PolicyRef>,
    },
    /// A renewal was refused after its client certificate verified.
    RenewRefused {
        /// The request id.
        request_id: String,
        /// The refusing stage.
        stage: String,
        /// The HTTP status returned.
        status: u16,
        /// `<reason code>: <explanation>`.
        reason: String,
        /// The presented certificate's serial, hex.
        serial: String,
        /// The SPIFFE ID it carries.
        spiffe_id: String,
        /// The token its lineage began with, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_id: Option<String>,
        /// The client's address.
        client_ip: String,
        /// The policy that refused, when the refusal came from a policy.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy: Option<PolicyRef>,
    },
    /// An operator's revocation took an identity back before its expiry.
    IdentityRevoked {
        /// The revocation request's id.
        request_id: String,
        /// The revoked certificate's serial, hex.
        serial: String,
        /// The SPIFFE ID it carried.
        spiffe_id: String,
        /// The token its lineage began with.
        token_id: String,
        /// What the operator revoked (`token:<id>`, `spiffe-id:<id>`, `serial:<hex>`).
        target: String,
        /// Why, in the operator's words.
        reason: String,
        /// Who revoked it.
        revoked_by: String,
    },
    /// A SPIFFE ID may not join or renew until `until` (after a revocation).
    SpiffeIdQuarantined {
        /// The SPIFFE ID.
        spiffe_id: String,
        /// Unix seconds the quarantine ends.
        until: u64,
        /// The revocation's reason.
        reason: String,
        /// Who revoked.
        by: String,
    },
    /// An operator ended a SPIFFE ID's quarantine early.
    QuarantineLifted {
        /// The SPIFFE ID.
        spiffe_id: String,
        /// Who lifted it.
        lifted_by: String,
    },
    /// A retried request was answered with an identity already issued (same idempotency key).
    IdentityReplayed {
        /// The request id of the retry.
        request_id: String,
        /// The token's GUID.
        token_id: String,
        /// The serial of the certificate handed back again.
        serial: String,
        /// The idempotency key the retry carried.
        idempotency_key: String,
    },
    /// A request was shed by a rate limit.
    RateLimited {
        /// Which limit (`ip`, `token`, `global`, ...).
        scope: String,
        /// The key the limit counts by within its scope.
        key: String,
        /// The client's address.
        client_ip: String,
    },
    /// Requests from one client refused for one reason before their token verified, counted
    /// over an interval: what an unauthenticated client sends grows the log by one bounded
    /// entry per interval, never by one entry per request.
    RefusalsCoalesced {
        /// The client (IPv4 address or IPv6 /64), or `*` for the overflow entry that counts
        /// every refusal beyond the distinct clients remembered in one interval.
        client: String,
        /// The refusing stage (`transport`, `request`, `limits`, `token`), `*` for overflow.
        stage: String,
        /// The problem's reason code, `*` for overflow.
        reason: String,
        /// The HTTP status returned (0 for overflow).
        status: u16,
        /// How many requests were refused.
        count: u64,
        /// Unix seconds of the first and the last of them.
        first_at: u64,
        /// See `first_at`.
        last_at: u64,
        /// The explanation given for the first of them, at most 256 bytes, without control
        /// characters.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        sample: String,
    },
    /// A policy bundle version was taken live.
    PolicyActivated {
        /// Bundle name.
        bundle: String,
        /// Bundle version.
        version: String,
        /// Git commit.
        commit: String,
        /// What caused it: `startup`, `poll`, `pin`.
        trigger: String,
    },
    /// A candidate policy bundle version was refused; the active one keeps serving.
    PolicyRejected {
        /// Git commit of the candidate.
        commit: String,
        /// Its version, when its manifest could be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
        /// The reload result label (`digest_mismatch`, `vector_failure`, ...).
        result: String,
        /// Why.
        reason: String,
    },
    /// A candidate policy bundle version passed the reload pipeline and now runs in shadow
    /// beside the active one (its decisions are compared, never used).
    PolicyCandidate {
        /// Bundle name.
        bundle: String,
        /// Bundle version.
        version: String,
        /// Git commit.
        commit: String,
    },
    /// An operator made the shadow candidate the active version.
    PolicyPromoted {
        /// Bundle version.
        version: String,
        /// Git commit.
        commit: String,
        /// Who.
        promoted_by: String,
    },
    /// An operator pinned the gateway to a policy version.
    PolicyPinned {
        /// What the operator named (a version, tag or commit).
        target: String,
        /// The commit it resolved to.
        commit: String,
        /// Who.
        pinned_by: String,
    },
    /// An operator let the gateway follow the policy repository again.
    PolicyUnpinned {
        /// Who.
        unpinned_by: String,
    },
    /// A signed checkpoint: the audit key's Ed25519 signature over the chain head this entry
    /// follows, so an auditor holding only the public key can tell the chain up to here was
    /// written by the gateway (see [`checkpoint`](super::checkpoint)).
    Checkpoint {
        /// The chain it is part of (0, the one chain of a single writer, is not written).
        #[serde(default, skip_serializing_if = "is_zero")]
        chain: u64,
        /// The seq of the entry it signs (the one right before it).
        seq: u64,
        /// That entry's hash, hex.
        head: String,
        /// When it was signed, Unix milliseconds.
        signed_at: u64,
        /// The signing key's id (`ed25519-` and 16 hex digits).
        key_id: String,
        /// The Ed25519 signature, hex.
        signature: String,
        /// The heads of the other writers' chains when it was signed (on a shared database),
        /// which the signature binds too: an entry of theirs it names that is later missing
        /// or different is found by `audit verify`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        bound: Vec<BoundHead>,
    },
    /// A policy's circuit breaker changed state: `open` (its evaluations fail fast for the
    /// cooldown), `half-open` (one probe runs), `closed` (the probe answered).
    PolicyCircuit {
        /// The policy's configured name.
        policy: String,
        /// SHA-256 of the loaded module, as `sha256:<hex>`.
        module_digest: String,
        /// The new state.
        state: String,
        /// Consecutive failures that opened it (0 for other transitions).
        failures: u32,
        /// The failure kind that opened it (`timeout`, `trap`, `out-of-memory`, ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cause: Option<String>,
        /// How long it stays open, milliseconds (0 for other transitions).
        cooldown_ms: u64,
    },
    /// An operator published a new CA in the trust bundle (`ca prepare`); it does not sign yet.
    CaPrepared {
        /// SHA-256 of the new CA certificate, hex.
        fingerprint: String,
        /// The new CA's notAfter, Unix seconds.
        not_after: u64,
        /// The SPIFFE bundle sequence that publishes it.
        sequence: u64,
        /// Who (operator identity).
        prepared_by: String,
    },
    /// An operator made the prepared CA the signer (`ca activate`); the one it replaces stays
    /// in the bundle until retired.
    CaActivated {
        /// SHA-256 of the CA that signs from now on, hex.
        fingerprint: String,
        /// SHA-256 of the CA that signed until now, hex.
        previous: String,
        /// The SPIFFE bundle sequence after the change.
        sequence: u64,
        /// Whether the gateway's serving certificate was issued again under the new CA.
        serving_reissued: bool,
        /// Who (operator identity).
        activated_by: String,
    },
    /// An operator dropped the previous CA from the trust bundle (`ca retire`).
    CaRetired {
        /// SHA-256 of the retired CA, hex.
        fingerprint: String,
        /// The SPIFFE bundle sequence after the change.
        sequence: u64,
        /// Retired with `--force` although certificates it issued were still live.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        forced: bool,
        /// When forced: the latest notAfter of its live certificates, Unix seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        live_until: Option<u64>,
        /// Who (operator identity).
        retired_by: String,
    },
}

/// An operator's manual issuance: who issued, and the reason they gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManualIssuance {
    /// The operator (as the CLI reports it).
    pub by: String,
    /// Why, in the operator's words.
    pub reason: String,
}

/// Which policy decided: enough to replay the decision offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    /// The policy's configured name.
    pub name: String,
    /// The bundle it was loaded from.
    pub bundle: String,
    /// The bundle's version.
    pub version: String,
    /// The git commit the bundle came from, when it came from git.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// SHA-256 of the WebAssembly module, hex.
    pub module_digest: String,
    /// SHA-256 of the policy's settings, hex.
    pub settings_digest: String,
}

impl AuditEvent {
    /// Every identifier the event mentions (token id, SPIFFE ID, serial, request id, policy
    /// commit, CA fingerprint), for queries. Free text (reasons, notes), operator names, node names, addresses and rate-limit
    /// keys are not identifiers and are not listed.
    pub fn ids(&self) -> Vec<&str> {
        match self {
            Self::TokenIssued { token_id, .. } | Self::TokenRevoked { token_id, .. } => {
                vec![token_id]
            }
            Self::JoinRefused {
                request_id,
                token_id,
                ..
            } => std::iter::once(request_id.as_str())
                .chain(token_id.as_deref())
                .collect(),
            Self::PolicyDecision {
                request_id,
                token_id,
                ..
            } => vec![request_id, token_id],
            Self::IdentityIssued {
                request_id,
                token_id,
                spiffe_id,
                serial,
                ..
            } => vec![request_id, token_id, spiffe_id, serial],
            Self::IdentityReplayed {
                request_id,
                token_id,
                serial,
                ..
            } => vec![request_id, token_id, serial],
            Self::IdentityRenewed {
                request_id,
                token_id,
                spiffe_id,
                serial,
                predecessor,
                ..
            } => vec![request_id, token_id, spiffe_id, serial, predecessor],
            Self::ManualIssueRefused {
                request_id,
                spiffe_id,
                predecessor,
                token_id,
                ..
            } => [request_id.as_str(), spiffe_id]
                .into_iter()
                .chain(predecessor.as_deref())
                .chain(token_id.as_deref())
                .collect(),
            Self::RenewRefused {
                request_id,
                serial,
                spiffe_id,
                token_id,
                ..
            } => [request_id.as_str(), serial, spiffe_id]
                .into_iter()
                .chain(token_id.as_deref())
                .collect(),
            Self::IdentityRevoked {
                request_id,
                serial,
                spiffe_id,
                token_id,
                ..
            } => vec![request_id, serial, spiffe_id, token_id],
            Self::SpiffeIdQuarantined { spiffe_id, .. }
            | Self::QuarantineLifted { spiffe_id, .. } => vec![spiffe_id],
            Self::IdentitySuperseded {
                request_id,
                spiffe_id,
                serial,
                token_id,
                superseded_by,
                superseding_token_id,
            } => vec![
                request_id,
                spiffe_id,
                serial,
                token_id,
                superseded_by,
                superseding_token_id,
            ],
            Self::RateLimited { .. }
            | Self::RefusalsCoalesced { .. }
            | Self::PolicyUnpinned { .. }
            | Self::Checkpoint { .. }
            | Self::PolicyCircuit { .. } => Vec::new(),
            Self::PolicyActivated { commit, .. }
            | Self::PolicyRejected { commit, .. }
            | Self::PolicyPinned { commit, .. }
            | Self::PolicyCandidate { commit, .. }
            | Self::PolicyPromoted { commit, .. } => vec![commit],
            Self::CaPrepared { fingerprint, .. } | Self::CaRetired { fingerprint, .. } => {
                vec![fingerprint]
            }
            Self::CaActivated {
                fingerprint,
                previous,
                ..
            } => vec![fingerprint, previous],
        }
    }

    /// The event's kind, exactly as its JSON `kind` tag spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TokenIssued { .. } => "token-issued",
            Self::TokenRevoked { .. } => "token-revoked",
            Self::JoinRefused { .. } => "join-refused",
            Self::PolicyDecision { .. } => "policy-decision",
            Self::IdentityIssued { .. } => "identity-issued",
            Self::IdentityReplayed { .. } => "identity-replayed",
            Self::IdentitySuperseded { .. } => "identity-superseded",
            Self::IdentityRenewed { .. } => "identity-renewed",
            Self::RenewRefused { .. } => "renew-refused",
            Self::ManualIssueRefused { .. } => "manual-issue-refused",
            Self::IdentityRevoked { .. } => "identity-revoked",
            Self::SpiffeIdQuarantined { .. } => "spiffe-id-quarantined",
            Self::QuarantineLifted { .. } => "quarantine-lifted",
            Self::RateLimited { .. } => "rate-limited",
            Self::RefusalsCoalesced { .. } => "refusals-coalesced",
            Self::PolicyActivated { .. } => "policy-activated",
            Self::PolicyRejected { .. } => "policy-rejected",
            Self::PolicyPinned { .. } => "policy-pinned",
            Self::PolicyCandidate { .. } => "policy-candidate",
            Self::PolicyPromoted { .. } => "policy-promoted",
            Self::PolicyUnpinned { .. } => "policy-unpinned",
            Self::Checkpoint { .. } => "checkpoint",
            Self::PolicyCircuit { .. } => "policy-circuit",
            Self::CaPrepared { .. } => "ca-prepared",
            Self::CaActivated { .. } => "ca-activated",
            Self::CaRetired { .. } => "ca-retired",
        }
    }
}

/// Another chain's head, as a checkpoint binds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundHead {
    /// The chain.
    pub chain: u64,
    /// Its last entry's seq.
    pub seq: u64,
    /// That entry's hash, hex.
    pub head: String,
}

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero(n: &u64) -> bool {
    *n == 0
}
