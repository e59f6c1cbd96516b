//! What a bootstrap token says: its audit id and claims, their wire names, and the syntax rules
//! every claim must pass before anyone acts on it.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Value, json};

use super::TokenError;

/// Largest `max_uses` a token may carry.
pub const MAX_USES_LIMIT: u32 = 1_000_000;

/// The token's audit GUID (`jti`). Random v4 UUID, displayed lowercase-hyphenated.
///
/// Parsing accepts only that canonical spelling, so one token has one id in every audit entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct TokenId(uuid::Uuid);

impl TokenId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    /// Parses a lowercase hyphenated UUID such as `67e55044-10b1-426f-9247-bb680e5fe0c8`.
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let invalid = || TokenError::InvalidClaim {
            claim: "jti",
            why: "must be a lowercase hyphenated UUID",
        };
        let id = uuid::Uuid::try_parse(s).map_err(|_| invalid())?;
        // `try_parse` also takes the simple, braced, URN and uppercase spellings.
        if id.hyphenated().to_string() != s {
            return Err(invalid());
        }
        Ok(Self(id))
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl Serialize for TokenId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Verified (or to-be-signed) claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `jti`: the audit id.
    pub id: TokenId,
    /// `iss`: who minted the token, e.g. `omnirelay`.
    pub issuer: String,
    /// `aud`: the gateway's SPIFFE trust domain, e.g. `omnirelay.example`.
    pub audience: String,
    /// `cluster`: becomes a SPIFFE path segment.
    pub cluster: String,
    /// `role`: becomes a SPIFFE path segment.
    pub role: String,
    /// `iat`: unix seconds.
    pub issued_at: u64,
    /// `nbf`: unix seconds.
    pub not_before: u64,
    /// `exp`: unix seconds.
    pub expires_at: u64,
    /// `max_uses`: how many joins the token allows, 1 to [`MAX_USES_LIMIT`].
    pub max_uses: u32,
    /// `node`: when present, the token admits only the node of this name (a node-name syntax
    /// string); the gateway refuses a join that names another node.
    pub node: Option<String>,
    /// `supersede`: a join with this token may replace a live identity of the same SPIFFE ID,
    /// revoking it in the same transaction. Absent means false: a second live lineage for one
    /// SPIFFE ID is refused.
    pub supersede: bool,
}

impl Claims {
    /// Checks the syntax rules a verifier enforces, so an issuer can refuse to mint a token that
    /// would never verify: `iss` and `aud` non-empty, `cluster` and `role` valid path segments,
    /// `max_uses` in range, `exp` after `nbf`.
    pub fn validate(&self) -> Result<(), TokenError> {
        let invalid = |claim, why| TokenError::InvalidClaim { claim, why };
        if self.issuer.is_empty() {
            return Err(invalid("iss", "must not be empty"));
        }
        if self.audience.is_empty() {
            return Err(invalid("aud", "must not be empty"));
        }
        check_segment("cluster", &self.cluster)?;
        check_segment("role", &self.role)?;
        if !(1..=MAX_USES_LIMIT).contains(&self.max_uses) {
            return Err(invalid("max_uses", "must be between 1 and 1000000"));
        }
        if self.expires_at <= self.not_before {
            return Err(invalid("exp", "must be after nbf"));
        }
        if let Some(node) = &self.node
            && !is_node_name(node)
        {
            return Err(invalid("node", NODE_NAME_RULE));
        }
        Ok(())
    }

    /// The JWT payload, with the registered claim names.
    pub(super) fn to_json(&self) -> Value {
        let mut payload = json!({
            "jti": self.id.to_string(),
            "iss": self.issuer,
            "aud": self.audience,
            "cluster": self.cluster,
            "role": self.role,
            "iat": self.issued_at,
            "nbf": self.not_before,
            "exp": self.expires_at,
            "max_uses": self.max_uses,
        });
        if let Some(node) = &self.node {
            payload["node"] = json!(node);
        }
        if self.supersede {
            payload["supersede"] = json!(true);
        }
        payload
    }

    /// Reads a verified payload: every claim present with the right JSON type. Unknown claims
    /// are ignored; a repeated known claim is refused (serde rejects duplicate fields), so no
    /// two parsers can disagree on which copy counts. Syntax rules are [`Claims::validate`]'s.
    pub(super) fn from_json(payload: &[u8]) -> Result<Self, TokenError> {
        let raw: RawClaims =
            serde_json::from_slice(payload).map_err(|_| TokenError::Malformed("payload"))?;
        let max_uses = u32::try_from(uint("max_uses", raw.max_uses)?).map_err(|_| {
            TokenError::InvalidClaim {
                claim: "max_uses",
                why: "must be between 1 and 1000000",
            }
        })?;
        Ok(Self {
            id: TokenId::parse(&string("jti", raw.jti)?)?,
            issuer: string("iss", raw.iss)?,
            audience: string("aud", raw.aud)?,
            cluster: string("cluster", raw.cluster)?,
            role: string("role", raw.role)?,
            issued_at: uint("iat", raw.iat)?,
            not_before: uint("nbf", raw.nbf)?,
            expires_at: uint("exp", raw.exp)?,
            max_uses,
            node: raw.node.map(|n| string("node", Some(n))).transpose()?,
            supersede: match raw.supersede {
                None | Some(Value::Bool(false)) => false,
                Some(Value::Bool(true)) => true,
                Some(_) => {
                    return Err(TokenError::InvalidClaim {
                        claim: "supersede",
                        why: "must be a boolean",
                    });
                }
            },
        })
    }
}

/// What a node name must look like (it becomes a SPIFFE path segment and a log field).
pub const NODE_NAME_RULE: &str =
    "must be 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'";

/// Whether `name` is a valid node name: a DNS label in lowercase.
pub fn is_node_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The payload as JSON values, so a missing or mistyped claim gets a precise error.
#[derive(Deserialize)]
struct RawClaims {
    jti: Option<Value>,
    iss: Option<Value>,
    aud: Option<Value>,
    cluster: Option<Value>,
    role: Option<Value>,
    iat: Option<Value>,
    nbf: Option<Value>,
    exp: Option<Value>,
    max_uses: Option<Value>,
    node: Option<Value>,
    supersede: Option<Value>,
}

fn string(claim: &'static str, value: Option<Value>) -> Result<String, TokenError> {
    match value {
        Some(Value::String(s)) => Ok(s),
        None => Err(TokenError::InvalidClaim {
            claim,
            why: "missing",
        }),
        // `aud` as an array is valid JWT, but our issuer never writes one: one token, one domain.
        Some(_) => Err(TokenError::InvalidClaim {
            claim,
            why: "must be a string",
        }),
    }
}

fn uint(claim: &'static str, value: Option<Value>) -> Result<u64, TokenError> {
    let value = value.ok_or(TokenError::InvalidClaim {
        claim,
        why: "missing",
    })?;
    value.as_u64().ok_or(TokenError::InvalidClaim {
        claim,
        why: "must be a non-negative integer",
    })
}

/// `cluster` and `role` become SPIFFE path segments: 1–63 of `a-z 0-9 - _ .`, not `.`/`..`.
fn check_segment(claim: &'static str, value: &str) -> Result<(), TokenError> {
    let invalid = |why| Err(TokenError::InvalidClaim { claim, why });
    if value.is_empty() || value.len() > 63 {
        return invalid("must be 1 to 63 characters");
    }
    if value == "." || value == ".." {
        return invalid("must not be a relative segment");
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    if !value.chars().all(allowed) {
        return invalid("may only contain a-z, 0-9, '-', '_', '.'");
    }
    Ok(())
}
