//! Queries by identifier: exact matches on `AuditEvent::ids`, from a verified log only.
//!
//! The log's tokens, SPIFFE IDs and serials are chosen so that some are prefixes of others and
//! some appear in free text, where a query must not find them.

use super::*;

const TOKEN_B: &str = "9d3c2b1a-0000-4000-8000-00000000000b";
const SPIFFE_B: &str = "spiffe://prod.omnirelay.example/cluster/edge-eu/role/relay/node/node-7";

fn issued(request: &str, token: &str, spiffe_id: &str, serial: &str) -> AuditEvent {
    AuditEvent::IdentityIssued {
        request_id: request.into(),
        token_id: token.into(),
        spiffe_id: spiffe_id.into(),
        serial: serial.into(),
        node: "node-42".into(),
        not_after: 1_700_003_600,
        uses_after: 1,
        audit_notes: vec![format!("renewal of {SPIFFE_B}")],
        matched_rules: vec![],
        policy: policy(),
    }
}

fn events() -> Vec<AuditEvent> {
    let all = one_of_each();
    vec![
        /* 0 */ all[0].clone(),
        /* 1 */
        AuditEvent::TokenIssued {
            token_id: TOKEN_B.into(),
            cluster: "edge-eu".into(),
            role: "relay".into(),
            max_uses: 1,
            not_before: 0,
            expires_at: 1,
            issued_by: TOKEN.into(),
            node: None,
            supersede: false,
        },
        /* 2 */
        AuditEvent::JoinRefused {
            request_id: "req-10".into(),
            stage: "token".into(),
            status: 401,
            reason: format!("token {TOKEN} used from the wrong cluster"),
            token_id: None,
            cluster: None,
            role: None,
            node: None,
            client_ip: "192.0.2.7".into(),
            policy: None,
        },
        /* 3 */ all[3].clone(),
        /* 4 */ issued("req-2", TOKEN, SPIFFE_ID, "0a1b"),
        /* 5 */ issued("req-11", TOKEN_B, SPIFFE_B, "0a1b2c"),
        /* 6 */
        AuditEvent::IdentityReplayed {
            request_id: "req-12".into(),
            token_id: TOKEN.into(),
            serial: "0a1b".into(),
            idempotency_key: "0a1b2c".into(),
        },
        /* 7 */
        AuditEvent::TokenRevoked {
            token_id: TOKEN_B.into(),
            reason: format!("{SPIFFE_ID} misbehaved"),
            revoked_by: "bob@ops".into(),
        },
        /* 8 */
        AuditEvent::RateLimited {
            scope: "token".into(),
            key: TOKEN.into(),
            client_ip: "192.0.2.7".into(),
        },
    ]
}

fn found(id: &str) -> Vec<usize> {
    let entries = sealed(&events());
    let matched = query(log(&entries).as_slice(), id).unwrap();
    matched
        .iter()
        .map(|line| entries.iter().position(|e| &e.line == line).unwrap())
        .collect()
}

#[test]
fn by_token_guid_finds_exactly_the_events_naming_it() {
    // Not 1 (issued_by), 2 (reason), 8 (a rate-limit key is not an identifier).
    assert_eq!(found(TOKEN), [0, 3, 4, 6]);
    assert_eq!(found(TOKEN_B), [1, 5, 7]);
}

#[test]
fn by_spiffe_id_finds_exactly_the_identities_issued_to_it() {
    // Not 7 (reason), not 4's note mentioning SPIFFE_B.
    assert_eq!(found(SPIFFE_ID), [4]);
    assert_eq!(found(SPIFFE_B), [5]);
}

#[test]
fn by_serial_matches_whole_serials_only() {
    assert_eq!(found("0a1b"), [4, 6]);
    // Not 6, whose idempotency key happens to equal it.
    assert_eq!(found("0a1b2c"), [5]);
    assert_eq!(found("0a1"), Vec::<usize>::new());
}

#[test]
fn by_request_id_finds_the_request() {
    assert_eq!(found("req-2"), [3, 4]);
    assert_eq!(found("req-1"), Vec::<usize>::new());
}

#[test]
fn a_tampered_log_answers_with_the_verification_error() {
    let mut all = lines(&log(&sealed(&events())));
    all[5][30] ^= 0x01;
    let err = query(join(&all).as_slice(), TOKEN).unwrap_err();
    assert_eq!(err.line, 6);
    assert!(matches!(err.problem, Problem::HashMismatch), "{err}");
}
