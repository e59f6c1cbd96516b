//! Fixtures shared by the audit tests: one event of each kind, a mixed chain, logs as bytes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;

mod chain;
mod checkpoint;
mod events;
mod file;
mod query;

/// A token GUID that the fixtures use throughout.
const TOKEN: &str = "0b6f4a3e-5c1d-4e8f-9a2b-6d7e8f901234";
/// A SPIFFE ID that the fixtures use throughout.
const SPIFFE_ID: &str = "spiffe://prod.omnirelay.example/cluster/edge-eu/role/relay/node/node-42";

fn policy() -> PolicyRef {
    PolicyRef {
        name: "cluster-role".into(),
        bundle: "core".into(),
        version: "1.4.0".into(),
        commit: Some("9748a06".into()),
        module_digest: "5e1f".into(),
        settings_digest: "c0de".into(),
    }
}

/// One event of each kind, in declaration order.
fn one_of_each() -> Vec<AuditEvent> {
    vec![
        AuditEvent::TokenIssued {
            token_id: TOKEN.into(),
            cluster: "edge-eu".into(),
            role: "relay".into(),
            max_uses: 3,
            not_before: 1_700_000_000,
            expires_at: 1_700_086_400,
            issued_by: "alice@ops".into(),
            node: None,
            supersede: false,
        },
        AuditEvent::TokenRevoked {
            token_id: TOKEN.into(),
            reason: "leaked in ticket OPS-12".into(),
            revoked_by: "bob@ops".into(),
        },
        AuditEvent::JoinRefused {
            request_id: "req-1".into(),
            stage: "policy".into(),
            status: 403,
            reason: "role not allowed".into(),
            token_id: Some(TOKEN.into()),
            cluster: Some("edge-eu".into()),
            role: Some("relay".into()),
            node: Some("node-42".into()),
            client_ip: "192.0.2.7".into(),
            policy: Some(policy()),
        },
        AuditEvent::PolicyDecision {
            request_id: "req-2".into(),
            token_id: TOKEN.into(),
            node: "node-42".into(),
            outcome: "deny".into(),
            code: Some("role-unlisted".into()),
            operator_reason: None,
            matched_rules: vec![],
            policy: policy(),
        },
        AuditEvent::IdentityIssued {
            request_id: "req-3".into(),
            token_id: TOKEN.into(),
            spiffe_id: SPIFFE_ID.into(),
            serial: "3f2a9c".into(),
            node: "node-42".into(),
            not_after: 1_700_003_600,
            uses_after: 1,
            audit_notes: vec!["posture: tpm".into()],
            matched_rules: vec!["cluster-role-listed".into()],
            policy: policy(),
        },
        AuditEvent::IdentityReplayed {
            request_id: "req-4".into(),
            token_id: TOKEN.into(),
            serial: "3f2a9c".into(),
            idempotency_key: "idem-1".into(),
        },
        AuditEvent::RateLimited {
            scope: "ip".into(),
            key: "192.0.2.7".into(),
            client_ip: "192.0.2.7".into(),
        },
    ]
}

/// The time the `i`th fixture entry is sealed at: 2023-11-14T22:13:20Z plus 1.5 s per entry.
fn at(i: usize) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + 1500 * i as u64)
}

/// `n` events cycling through every kind.
fn mixed(n: usize) -> Vec<AuditEvent> {
    one_of_each().into_iter().cycle().take(n).collect()
}

/// The head after `entry`.
fn head_of(entry: &SealedEntry) -> ChainHead {
    ChainHead {
        seq: entry.seq,
        hash: entry.hash,
    }
}

/// Seals `events` into a chain from genesis.
fn sealed(events: &[AuditEvent]) -> Vec<SealedEntry> {
    let mut head = ChainHead::genesis();
    let mut entries = Vec::new();
    for (i, event) in events.iter().enumerate() {
        let entry = seal(&head, at(i), event);
        head = head_of(&entry);
        entries.push(entry);
    }
    entries
}

/// The log file's bytes for `entries`: each line followed by a newline.
fn log(entries: &[SealedEntry]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|e| e.line.bytes().chain([b'\n']))
        .collect()
}

/// A log from its lines (without newlines).
fn join(lines: &[Vec<u8>]) -> Vec<u8> {
    lines
        .iter()
        .flat_map(|l| l.iter().copied().chain([b'\n']))
        .collect()
}

/// The lines of a log, without newlines.
fn lines(log: &[u8]) -> Vec<Vec<u8>> {
    log.split_inclusive(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\n").unwrap_or(l).to_vec())
        .collect()
}

/// Verifies `log` and returns the error, failing the test if it verifies.
fn verify_err(log: &[u8]) -> VerifyError {
    match verify(log) {
        Ok(summary) => panic!("expected a verification failure, got {summary:?}"),
        Err(e) => e,
    }
}
