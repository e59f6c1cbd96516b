//! The store against each backend (a real SQLite file, a real PostgreSQL database) and a real
//! audit file, one fresh directory and database per test. Outcomes are checked three ways:
//! what the call returned, what a read sees afterwards, and what the audit file (verified end
//! to end by `audit::verify`) says happened.

use std::collections::BTreeSet;
use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::harness::{Harness, Kind, TestStore, both_backends};
use super::*;
use crate::audit::{self, AuditEvent, PolicyRef};
use crate::identity::{Serial, SpiffeId};
use crate::token::TokenId;

both_backends! {
    twenty_racing_joins_get_exactly_the_three_uses,
    revoked_and_expired_tokens_are_refused_without_consuming_a_use,
    a_reused_nonce_is_refused_and_its_use_given_back,
    an_idempotent_retry_gets_the_first_response_and_consumes_nothing,
    a_live_spiffe_id_refuses_a_second_lineage_unless_the_token_supersedes,
    the_latest_live_expiry_of_a_ca_skips_revoked_expired_and_other_cas_leaves,
    tokens_list_newest_first_and_revoke_once,
    close_then_reopen_at_once_keeps_state_and_continues_the_chain,
    close_releases_the_files_every_time,
    a_mirror_cut_short_is_caught_up_from_the_database,
    a_torn_mirror_line_left_by_a_crash_is_cut_and_written_again,
    an_edited_last_line_stops_the_store_from_opening,
    a_rewritten_or_extended_mirror_disagrees_with_the_database,
    ping_answers_and_export_writes_the_whole_chain,
    shadow_disagreements_keep_only_the_newest_rows,
    recorded_decisions_are_bounded_in_rows_and_by_age,
    a_policy_pin_is_shared_on_postgres_and_stays_the_gateways_own_on_sqlite,
}

/// A fixed "now" (2025-06-15T14:13:20Z); tests never read the clock for store decisions.
pub(super) const NOW: u64 = 1_750_000_000;
/// The issuing CA of every identity `issue_record` makes (a certificate SHA-256, hex).
const ISSUER: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
/// How long to wait for the writer thread to mirror a commit before failing the test.
const MIRROR_DEADLINE: Duration = Duration::from_secs(10);

/// The audit key and checkpoint schedule of the tests: a fresh key, and checkpoints only when
/// the store closes (the schedule's own tests set theirs).
/// Checkpoints every 1000 entries or hour, signed by one audit key for the whole test process
/// (replicas of one fleet share theirs, and a database's chains verify under it).
pub(super) fn checkpoints() -> Checkpoints {
    static KEY: std::sync::OnceLock<Arc<audit::AuditKey>> = std::sync::OnceLock::new();
    Checkpoints {
        key: KEY
            .get_or_init(|| Arc::new(audit::AuditKey::generate().unwrap().0))
            .clone(),
        every: std::num::NonZeroU64::new(1000).unwrap(),
        interval: Duration::from_secs(3600),
    }
}

/// A directory of its own under the system temp dir, removed when dropped.
pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn new(name: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let unique = format!(
            "omnirelay-store-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(unique);
        // A leftover from an earlier, aborted run of the same process id.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub(super) fn config(&self) -> StoreConfig {
        StoreConfig {
            backend: Backend::Sqlite,
            sqlite: self.0.join("state.db"),
            audit_file: self.0.join("audit.log"),
            max_batch: 512,
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn policy() -> PolicyRef {
    PolicyRef {
        name: "cluster-role".into(),
        bundle: "core".into(),
        version: "1.4.0".into(),
        commit: None,
        module_digest: "5e1f".into(),
        settings_digest: "c0de".into(),
    }
}

/// A token issued at `NOW`, valid for an hour.
pub(super) fn token_record(max_uses: u32) -> TokenRecord {
    TokenRecord {
        id: TokenId::random(),
        cluster: "edge-eu".into(),
        role: "relay".into(),
        max_uses,
        uses: 0,
        not_before: NOW - 60,
        expires_at: NOW + 3600,
        issued_at: NOW,
        revoked_at: None,
    }
}

pub(super) fn token_issued(t: &TokenRecord) -> AuditEvent {
    AuditEvent::TokenIssued {
        token_id: t.id.to_string(),
        cluster: t.cluster.clone(),
        role: t.role.clone(),
        max_uses: t.max_uses,
        not_before: t.not_before,
        expires_at: t.expires_at,
        issued_by: "alice@ops".into(),
        node: None,
        supersede: false,
    }
}

fn token_revoked(id: TokenId, by: &str) -> AuditEvent {
    AuditEvent::TokenRevoked {
        token_id: id.to_string(),
        reason: "leaked".into(),
        revoked_by: by.into(),
    }
}

/// Revokes a token as the admin API does (no quarantine); whether it is on record.
async fn revoke_token(store: &dyn Store, id: TokenId, by: &str, now: u64) -> bool {
    store
        .revoke(RevokeOrder {
            request_id: "revoke".into(),
            target: RevokeTarget::Token(id),
            reason: "leaked".into(),
            revoked_by: by.into(),
            quarantine: Duration::ZERO,
            now,
        })
        .await
        .unwrap()
        .found
}

/// A join's final step through `token`, with its own nonce and a fresh serial.
pub(super) fn issue_record(token: TokenId, request: &str, nonce: &str) -> IssueRecord {
    let node = format!("node-{request}");
    let spiffe_id = SpiffeId::parse(&format!(
        "spiffe://prod.omnirelay.example/cluster/edge-eu/role/relay/node/{node}"
    ))
    .unwrap();
    IssueRecord {
        request_id: request.into(),
        token,
        nonce: nonce.into(),
        nonce_expires_at: NOW + 300,
        idempotency: None,
        identity: IdentityRecord {
            serial: Serial::random().unwrap(),
            spiffe_id,
            node: node.clone(),
            cluster: "edge-eu".into(),
            role: "relay".into(),
            not_before: NOW - 60,
            not_after: NOW + 3600,
            attestation: r#"{"kind":"token-only"}"#.into(),
            issuer: ISSUER.into(),
        },
        response: format!("{{\"svid\":\"for {request}\"}}"),
        policy: policy(),
        audit_notes: vec!["posture: tpm".into()],
        decision: AuditEvent::PolicyDecision {
            request_id: request.into(),
            token_id: token.to_string(),
            node,
            outcome: "allow".into(),
            code: None,
            operator_reason: None,
            matched_rules: vec!["cluster-role".into()],
            policy: policy(),
        },
        supersede: false,
        now: NOW,
    }
}

/// The events of a log that verifies end to end, in order.
pub(super) fn read_audit(path: &Path) -> Vec<AuditEvent> {
    let file = std::fs::File::open(path).unwrap();
    let summary = audit::verify(BufReader::new(file)).unwrap();
    let text = std::fs::read_to_string(path).unwrap();
    let events: Vec<AuditEvent> = text
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            serde_json::from_value(value["event"].clone()).unwrap()
        })
        .collect();
    assert_eq!(summary.entries, events.len() as u64);
    events
}

/// Waits, with a deadline, until the writer has mirrored `entries` entries to the file; the
/// mirror is written after the commit is acknowledged, so it may trail a returned call briefly.
async fn mirrored(path: &Path, entries: u64) -> Vec<AuditEvent> {
    let deadline = Instant::now() + MIRROR_DEADLINE;
    loop {
        let file = std::fs::File::open(path).unwrap();
        // A batch lands in one write, but a reader can still catch it half-way.
        if let Ok(summary) = audit::verify(BufReader::new(file)) {
            assert!(
                summary.entries <= entries,
                "the audit file has {} entries, expected {entries}",
                summary.entries
            );
            if summary.entries == entries {
                return read_audit(path);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the audit file never reached {entries} entries"
        );
        tokio::task::yield_now().await;
    }
}

fn kinds(events: &[AuditEvent]) -> Vec<&'static str> {
    events.iter().map(AuditEvent::kind).collect()
}

fn count(events: &[AuditEvent], kind: &str) -> usize {
    events.iter().filter(|e| e.kind() == kind).count()
}

/// The record the refused join of [`with_history`] carried.
fn record_of_refusal(token: TokenId) -> IssueRecord {
    issue_record(token, "r2", "n2")
}

/// What the API audits for a join the final step refused: the policy's decision and the
/// refusal.
fn refusal(r: &IssueRecord) -> Vec<AuditEvent> {
    vec![
        r.decision.clone(),
        AuditEvent::JoinRefused {
            request_id: r.request_id.clone(),
            stage: "token".into(),
            status: 403,
            reason: "token-revoked".into(),
            token_id: Some(r.token.to_string()),
            cluster: Some(r.identity.cluster.clone()),
            role: Some(r.identity.role.clone()),
            node: Some(r.identity.node.clone()),
            client_ip: "192.0.2.7".into(),
            policy: Some(r.policy.clone()),
        },
    ]
}

/// The status and reason of every `join-refused` event, in order.
fn refusals(events: &[AuditEvent]) -> Vec<(u16, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            AuditEvent::JoinRefused { status, reason, .. } => Some((*status, reason.clone())),
            _ => None,
        })
        .collect()
}

pub(super) async fn open_with_token(h: &Harness, max_uses: u32) -> (TestStore, TokenRecord) {
    let store = h.open(checkpoints()).await.unwrap();
    let token = token_record(max_uses);
    store
        .register_token(token.clone(), token_issued(&token))
        .await
        .unwrap();
    (store, token)
}

async fn twenty_racing_joins_get_exactly_the_three_uses(kind: Kind) {
    let h = Harness::new(kind, "race").await;
    let (store, token) = open_with_token(&h, 3).await;
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = Arc::clone(&store);
        let record = issue_record(token.id, &format!("req-{i}"), &format!("nonce-{i}"));
        let serial = record.identity.serial.to_string();
        tasks.push(tokio::spawn(async move {
            (serial, store.issue(record).await.unwrap())
        }));
    }
    let mut issued = BTreeSet::new();
    let mut uses_left = Vec::new();
    let mut exhausted = 0;
    for task in tasks {
        match task.await.unwrap() {
            (serial, IssueOutcome::Issued { uses_left: left }) => {
                issued.insert(serial);
                uses_left.push(left);
            }
            (_, IssueOutcome::Exhausted) => exhausted += 1,
            (_, other) => panic!("unexpected outcome {other:?}"),
        }
    }
    uses_left.sort_unstable();
    assert_eq!(uses_left, [0, 1, 2]);
    assert_eq!(exhausted, 17);

    let after = store.token(token.id).await.unwrap().unwrap();
    assert_eq!(after.uses, 3);
    assert_eq!(after.status(NOW), TokenStatus::Exhausted);
    let recorded: BTreeSet<String> = store
        .identities_of(token.id)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(recorded, issued);

    // token-issued, then an identity-issued entry (which records the allow decision) for each
    // winner. A refusal is an outcome the caller audits (with what the node was told): the
    // store wrote nothing for the 17 losers.
    let events = mirrored(&h.audit_file(), 1 + 3).await;
    assert_eq!(events[0], token_issued(&token));
    assert_eq!(count(&events, "identity-issued"), 3);
    assert!(refusals(&events).is_empty());
    let audited: BTreeSet<String> = events
        .iter()
        .filter_map(|e| match e {
            AuditEvent::IdentityIssued { serial, .. } => Some(serial.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(audited, issued);
    let mut uses_after: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            AuditEvent::IdentityIssued { uses_after, .. } => Some(*uses_after),
            _ => None,
        })
        .collect();
    uses_after.sort_unstable();
    assert_eq!(uses_after, [1, 2, 3]);
    // Every refused join burned no nonce; every issued one did.
    for i in 0..20 {
        let used = store.nonce_used(&format!("nonce-{i}")).await.unwrap();
        let request = format!("req-{i}");
        let was_issued = events.iter().any(|e| {
            matches!(e, AuditEvent::IdentityIssued { request_id, .. } if *request_id == request)
        });
        assert_eq!(used, was_issued, "nonce-{i}");
    }
}

async fn revoked_and_expired_tokens_are_refused_without_consuming_a_use(kind: Kind) {
    let h = Harness::new(kind, "refused").await;
    let (store, revoked) = open_with_token(&h, 5).await;
    assert!(revoke_token(&*store, revoked.id, "bob@ops", NOW).await);
    let outcome = store
        .issue(issue_record(revoked.id, "r1", "n1"))
        .await
        .unwrap();
    assert_eq!(outcome, IssueOutcome::Revoked);

    let expiring = token_record(5);
    store
        .register_token(expiring.clone(), token_issued(&expiring))
        .await
        .unwrap();
    // One second before expiry still works; at expiry it does not.
    let mut last_second = issue_record(expiring.id, "r2", "n2");
    last_second.now = expiring.expires_at - 1;
    assert_eq!(
        store.issue(last_second).await.unwrap(),
        IssueOutcome::Issued { uses_left: 4 }
    );
    let mut at_expiry = issue_record(expiring.id, "r3", "n3");
    at_expiry.now = expiring.expires_at;
    assert_eq!(store.issue(at_expiry).await.unwrap(), IssueOutcome::Expired);

    assert_eq!(store.token(revoked.id).await.unwrap().unwrap().uses, 0);
    assert_eq!(store.token(expiring.id).await.unwrap().unwrap().uses, 1);
    assert!(store.identities_of(revoked.id).await.unwrap().is_empty());
    assert_eq!(store.identities_of(expiring.id).await.unwrap().len(), 1);
    assert!(!store.nonce_used("n1").await.unwrap());
    assert!(store.nonce_used("n2").await.unwrap());
    assert!(!store.nonce_used("n3").await.unwrap());

    let events = mirrored(&h.audit_file(), 4).await;
    assert_eq!(
        kinds(&events),
        [
            "token-issued",
            "token-revoked",
            "token-issued",
            "identity-issued",
        ]
    );
}

async fn a_reused_nonce_is_refused_and_its_use_given_back(kind: Kind) {
    let h = Harness::new(kind, "nonce").await;
    let (store, token) = open_with_token(&h, 2).await;
    let first = issue_record(token.id, "r1", "shared-nonce");
    let first_serial = first.identity.serial.to_string();
    assert_eq!(
        store.issue(first).await.unwrap(),
        IssueOutcome::Issued { uses_left: 1 }
    );
    let replay = issue_record(token.id, "r2", "shared-nonce");
    assert_eq!(
        store.issue(replay).await.unwrap(),
        IssueOutcome::NonceReplayed
    );
    assert_eq!(store.token(token.id).await.unwrap().unwrap().uses, 1);
    assert!(store.nonce_used("shared-nonce").await.unwrap());
    assert_eq!(store.identities_of(token.id).await.unwrap(), [first_serial]);
    // The use taken by the replay was really given back: the token's last use still works.
    assert_eq!(
        store
            .issue(issue_record(token.id, "r3", "fresh-nonce"))
            .await
            .unwrap(),
        IssueOutcome::Issued { uses_left: 0 }
    );

    let events = mirrored(&h.audit_file(), 3).await;
    assert_eq!(
        kinds(&events),
        ["token-issued", "identity-issued", "identity-issued"]
    );
}

async fn an_idempotent_retry_gets_the_first_response_and_consumes_nothing(kind: Kind) {
    let h = Harness::new(kind, "idempotency").await;
    let (store, token) = open_with_token(&h, 3).await;
    let (csr, other_csr) = ([7u8; 32], [8u8; 32]);
    let mut first = issue_record(token.id, "r1", "n1");
    first.idempotency = Some(("key-1".into(), csr));
    let first_response = first.response.clone();
    let first_serial = first.identity.serial.to_string();
    assert_eq!(
        store.issue(first).await.unwrap(),
        IssueOutcome::Issued { uses_left: 2 }
    );

    let mut retry = issue_record(token.id, "r2", "n2");
    retry.idempotency = Some(("key-1".into(), csr));
    assert_ne!(retry.response, first_response);
    assert_eq!(
        store.issue(retry).await.unwrap(),
        IssueOutcome::Replayed(first_response.clone())
    );
    let mut conflict = issue_record(token.id, "r3", "n3");
    conflict.idempotency = Some(("key-1".into(), other_csr));
    assert_eq!(
        store.issue(conflict).await.unwrap(),
        IssueOutcome::IdempotencyConflict
    );

    assert_eq!(store.token(token.id).await.unwrap().unwrap().uses, 1);
    assert_eq!(store.identities_of(token.id).await.unwrap(), [first_serial]);
    assert!(!store.nonce_used("n2").await.unwrap());
    assert!(!store.nonce_used("n3").await.unwrap());
    assert_eq!(
        store.idempotent(token.id, "key-1").await.unwrap(),
        Some((csr, first_response))
    );
    assert_eq!(store.idempotent(token.id, "key-2").await.unwrap(), None);
    // Keys are scoped to their token.
    assert_eq!(
        store.idempotent(TokenId::random(), "key-1").await.unwrap(),
        None
    );

    // The replay itself writes no entry: the caller audits it, as here.
    let replayed = AuditEvent::IdentityReplayed {
        request_id: "r2".into(),
        token_id: token.id.to_string(),
        serial: "ab".into(),
        idempotency_key: "key-1".into(),
    };
    store.audit(vec![replayed.clone()]).await.unwrap();
    let events = mirrored(&h.audit_file(), 3).await;
    assert_eq!(
        kinds(&events),
        ["token-issued", "identity-issued", "identity-replayed"]
    );
    assert_eq!(events[2], replayed);
}

/// The same SPIFFE ID as `record`, joining again through `token` with its own nonce and serial.
fn same_identity(record: &IssueRecord, token: TokenId, request: &str) -> IssueRecord {
    let mut again = issue_record(token, request, &format!("nonce-{request}"));
    again.identity.spiffe_id = record.identity.spiffe_id.clone();
    again.identity.node = record.identity.node.clone();
    again
}

async fn a_live_spiffe_id_refuses_a_second_lineage_unless_the_token_supersedes(kind: Kind) {
    let h = Harness::new(kind, "in-use").await;
    let (store, fleet) = open_with_token(&h, 10).await;
    let mut first = issue_record(fleet.id, "r1", "n1");
    first.identity.not_after = NOW + 600;
    let first_serial = first.identity.serial.to_string();
    assert!(matches!(
        store.issue(first.clone()).await.unwrap(),
        IssueOutcome::Issued { .. }
    ));

    // Another holder of the fleet token asks for the same SPIFFE ID: refused, nothing taken.
    let thief = same_identity(&first, fleet.id, "r2");
    assert_eq!(
        store.issue(thief).await.unwrap(),
        IssueOutcome::IdentityInUse
    );
    assert_eq!(store.token(fleet.id).await.unwrap().unwrap().uses, 1);
    assert!(!store.nonce_used("nonce-r2").await.unwrap());

    // Once the first identity has expired, the name is free again.
    let mut later = same_identity(&first, fleet.id, "r3");
    later.now = first.identity.not_after;
    let later_serial = later.identity.serial.to_string();
    assert!(matches!(
        store.issue(later).await.unwrap(),
        IssueOutcome::Issued { .. }
    ));

    // A superseding token replaces a live identity and revokes it in the same transaction.
    let rescue = token_record(1);
    store
        .register_token(rescue.clone(), token_issued(&rescue))
        .await
        .unwrap();
    let mut replace = same_identity(&first, rescue.id, "r4");
    replace.supersede = true;
    let new_serial = replace.identity.serial.to_string();
    let live_before = replace.identity.spiffe_id.to_string();
    assert!(matches!(
        store.issue(replace).await.unwrap(),
        IssueOutcome::Issued { .. }
    ));
    // token, r1, r3, token, two supersessions (at NOW both r1 and r3 are live), r4.
    let events = mirrored(&h.audit_file(), 7).await;
    let superseded: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            AuditEvent::IdentitySuperseded {
                serial,
                superseded_by,
                spiffe_id,
                ..
            } => Some((serial.clone(), superseded_by.clone(), spiffe_id.clone())),
            _ => None,
        })
        .collect();
    assert!(
        superseded
            .iter()
            .all(|(_, by, id)| *by == new_serial && *id == live_before)
    );
    let revoked: BTreeSet<String> = superseded.into_iter().map(|(s, ..)| s).collect();
    assert_eq!(revoked, BTreeSet::from([first_serial, later_serial]));

    // And now the new identity is the only live one: another plain join is refused again.
    let again = same_identity(&first, fleet.id, "r5");
    assert_eq!(
        store.issue(again).await.unwrap(),
        IssueOutcome::IdentityInUse
    );
}

async fn the_latest_live_expiry_of_a_ca_skips_revoked_expired_and_other_cas_leaves(kind: Kind) {
    let h = Harness::new(kind, "issuer").await;
    let (store, fleet) = open_with_token(&h, 10).await;
    let other = "b2".repeat(32);
    let issue = |request: &str, issuer: &str, not_after: u64| {
        let mut r = issue_record(fleet.id, request, &format!("nonce-{request}"));
        r.identity.issuer = issuer.to_string();
        r.identity.not_after = not_after;
        r
    };
    assert_eq!(
        store.latest_live_expiry(ISSUER, true, NOW).await.unwrap(),
        None
    );
    let live = issue("r1", ISSUER, NOW + 600);
    let revoked = issue("r2", ISSUER, NOW + 1200);
    for record in [
        live.clone(),
        revoked.clone(),
        issue("r3", &other, NOW + 9000),
    ] {
        assert!(matches!(
            store.issue(record).await.unwrap(),
            IssueOutcome::Issued { .. }
        ));
    }
    assert_eq!(
        store.latest_live_expiry(ISSUER, false, NOW).await.unwrap(),
        Some(NOW + 1200)
    );
    // Superseding r2 revokes it: r1 is the last live leaf of the CA.
    let mut replace = same_identity(&revoked, fleet.id, "r4");
    replace.supersede = true;
    replace.identity.issuer = other.clone();
    assert!(matches!(
        store.issue(replace).await.unwrap(),
        IssueOutcome::Issued { .. }
    ));
    assert_eq!(
        store.latest_live_expiry(ISSUER, false, NOW).await.unwrap(),
        Some(NOW + 600)
    );
    // At its notAfter it has expired: nothing of the CA is live any more.
    assert_eq!(
        store
            .latest_live_expiry(ISSUER, false, NOW + 600)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .latest_live_expiry(&other, false, NOW + 600)
            .await
            .unwrap(),
        Some(NOW + 9000)
    );
    // Rows recorded before issuers were count for the configured CA only when asked.
    h.execute(&format!(
        "UPDATE identities SET issuer = NULL WHERE serial = '{}'",
        live.identity.serial
    ))
    .await;
    assert_eq!(
        store.latest_live_expiry(ISSUER, false, NOW).await.unwrap(),
        None
    );
    assert_eq!(
        store.latest_live_expiry(ISSUER, true, NOW).await.unwrap(),
        Some(NOW + 600)
    );
    let issuers = h
        .texts("SELECT issuer FROM identities ORDER BY not_after")
        .await;
    assert_eq!(
        issuers,
        [
            None,
            Some(ISSUER.to_string()),
            Some(other.clone()),
            Some(other)
        ]
    );
}

async fn tokens_list_newest_first_and_revoke_once(kind: Kind) {
    let h = Harness::new(kind, "tokens").await;
    let store = h.open(checkpoints()).await.unwrap();
    let mut old = token_record(1);
    let mut mid = token_record(1);
    let mut new = token_record(1);
    old.issued_at = NOW - 20;
    mid.issued_at = NOW - 10;
    new.issued_at = NOW;
    for t in [&mid, &new, &old] {
        store
            .register_token(t.clone(), token_issued(t))
            .await
            .unwrap();
    }
    // A second registration of one id fails, and leaves no audit entry behind it.
    let err = store
        .register_token(mid.clone(), token_issued(&mid))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Sqlite(_) | StoreError::Postgres(_)),
        "{err:?}"
    );
    assert_eq!(
        store.list_tokens().await.unwrap(),
        [new.clone(), mid.clone(), old.clone()]
    );

    let unknown = TokenId::random();
    assert!(!revoke_token(&*store, unknown, "bob@ops", NOW).await);
    assert!(revoke_token(&*store, mid.id, "bob@ops", NOW + 5).await);
    assert!(revoke_token(&*store, mid.id, "carol@ops", NOW + 9).await);
    let revoked = store.token(mid.id).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(NOW + 5));
    assert_eq!(revoked.status(NOW + 10), TokenStatus::Revoked);
    assert_eq!(store.token(new.id).await.unwrap().unwrap().revoked_at, None);
    assert_eq!(store.token(unknown).await.unwrap(), None);

    // Three registrations and the one revocation that took effect: the repeat changed nothing
    // and must not name a second operator as the one who revoked it.
    let events = mirrored(&h.audit_file(), 4).await;
    assert_eq!(
        events,
        [
            token_issued(&mid),
            token_issued(&new),
            token_issued(&old),
            token_revoked(mid.id, "bob@ops"),
        ]
    );
}

fn verify_file(path: &Path) -> audit::VerifySummary {
    audit::verify(BufReader::new(std::fs::File::open(path).unwrap())).unwrap()
}

/// A store with some history: a token with one identity issued through it (under an
/// idempotency key) and a revoked token, refused once, then closed. [`HISTORY`] audit entries,
/// the last the checkpoint written at close.
pub(super) async fn with_history(h: &Harness) -> (TokenRecord, TokenRecord, String) {
    let store = h.open(checkpoints()).await.unwrap();
    let live = token_record(3);
    let gone = token_record(3);
    for t in [&live, &gone] {
        store
            .register_token(t.clone(), token_issued(t))
            .await
            .unwrap();
    }
    let mut record = issue_record(live.id, "r1", "n1");
    record.idempotency = Some(("key-1".into(), [1; 32]));
    let serial = record.identity.serial.to_string();
    assert_eq!(
        store.issue(record).await.unwrap(),
        IssueOutcome::Issued { uses_left: 2 }
    );
    assert!(revoke_token(&*store, gone.id, "bob@ops", NOW).await);
    let refused = store
        .issue(issue_record(gone.id, "r2", "n2"))
        .await
        .unwrap();
    assert_eq!(refused, IssueOutcome::Revoked);
    // The refusal is audited by the caller, as the API does.
    store
        .audit(refusal(&record_of_refusal(gone.id)))
        .await
        .unwrap();
    store.close().await;
    (live, gone, serial)
}

pub(super) const HISTORY: u64 = 7;

async fn close_then_reopen_at_once_keeps_state_and_continues_the_chain(kind: Kind) {
    let h = Harness::new(kind, "reopen").await;
    let config = h.config();
    let (live, gone, serial) = with_history(&h).await;
    // `close` returned, so the writer has mirrored everything and let go of the files.
    let before = std::fs::read(&config.audit_file).unwrap();
    assert_eq!(verify_file(&config.audit_file).entries, HISTORY);

    let store = h.open(checkpoints()).await.unwrap();
    let mut live_now = live.clone();
    live_now.uses = 1;
    let mut gone_now = gone.clone();
    gone_now.revoked_at = Some(NOW);
    assert_eq!(store.token(live.id).await.unwrap(), Some(live_now));
    assert_eq!(store.token(gone.id).await.unwrap(), Some(gone_now));
    assert_eq!(store.identities_of(live.id).await.unwrap(), [serial]);
    assert!(store.nonce_used("n1").await.unwrap());
    assert!(!store.nonce_used("n2").await.unwrap());
    assert_eq!(
        store
            .idempotent(live.id, "key-1")
            .await
            .unwrap()
            .map(|(digest, _)| digest),
        Some([1; 32])
    );
    assert_eq!(
        store
            .issue(issue_record(live.id, "r3", "n3"))
            .await
            .unwrap(),
        IssueOutcome::Issued { uses_left: 1 }
    );
    store.close().await;

    // The old lines are untouched and the new ones chain onto them; the file's head is the
    // database's.
    let after = std::fs::read(&config.audit_file).unwrap();
    assert_eq!(after[..before.len()], before[..]);
    let summary = verify_file(&config.audit_file);
    assert_eq!(summary.entries, HISTORY + 2);
    assert_eq!(summary.head, h.db_head().await);
    let events = read_audit(&config.audit_file);
    assert!(matches!(
        &events[events.len() - 2],
        AuditEvent::IdentityIssued { uses_after: 2, request_id, .. } if request_id == "r3"
    ));
    assert_eq!(events[events.len() - 1].kind(), "checkpoint");
}

async fn close_releases_the_files_every_time(kind: Kind) {
    let h = Harness::new(kind, "cycle").await;
    for round in 0..20 {
        let store = h
            .open(checkpoints())
            .await
            .unwrap_or_else(|e| panic!("reopen in round {round}: {e}"));
        let t = token_record(1);
        store
            .register_token(t.clone(), token_issued(&t))
            .await
            .unwrap();
        store.close().await;
    }
    // Each round: the token, and the checkpoint at close.
    assert_eq!(verify_file(&h.audit_file()).entries, 40);
}

async fn a_mirror_cut_short_is_caught_up_from_the_database(kind: Kind) {
    let h = Harness::new(kind, "catch-up").await;
    let config = h.config();
    with_history(&h).await;
    let full = std::fs::read_to_string(&config.audit_file).unwrap();
    let lines: Vec<&str> = full.split_inclusive('\n').collect();
    assert_eq!(lines.len() as u64, HISTORY);

    // The last three lines lost (a crash before the mirror write), cut at a line boundary.
    std::fs::write(&config.audit_file, lines[..lines.len() - 3].concat()).unwrap();
    assert_eq!(verify_file(&config.audit_file).entries, HISTORY - 3);
    h.open(checkpoints()).await.unwrap().close().await;
    assert_eq!(std::fs::read_to_string(&config.audit_file).unwrap(), full);
    assert_eq!(verify_file(&config.audit_file).head, h.db_head().await);

    // The whole file lost: made again, with its restrictive mode. On SQLite it is rebuilt
    // from the database's chain. On PostgreSQL a replica's file holds the chains that replica
    // wrote, and nothing says which earlier chains were its own: the new file starts with the
    // new chain, and `audit export` writes every chain from the database.
    std::fs::remove_file(&config.audit_file).unwrap();
    h.open(checkpoints()).await.unwrap().close().await;
    let rebuilt = match kind {
        Kind::Sqlite => full,
        Kind::Postgres => String::new(),
    };
    assert_eq!(
        std::fs::read_to_string(&config.audit_file).unwrap(),
        rebuilt
    );
    assert_eq!(mode(&config.audit_file), 0o600);
}

async fn a_torn_mirror_line_left_by_a_crash_is_cut_and_written_again(kind: Kind) {
    let h = Harness::new(kind, "torn").await;
    let config = h.config();
    with_history(&h).await;
    let full = std::fs::read_to_string(&config.audit_file).unwrap();

    // A kill in the middle of the mirror's append: the last line lacks its end, or only its
    // newline. The database holds the entry, so the store opens and the file is whole again.
    for cut in [40, 1] {
        std::fs::write(&config.audit_file, &full[..full.len() - cut]).unwrap();
        h.open(checkpoints()).await.unwrap().close().await;
        assert_eq!(std::fs::read_to_string(&config.audit_file).unwrap(), full);
    }
    assert_eq!(verify_file(&config.audit_file).head, h.db_head().await);
}

/// Replaces the file's last line with `last` (which must end in a newline).
fn replace_last_line(path: &Path, last: impl FnOnce(&str) -> String) {
    let text = std::fs::read_to_string(path).unwrap();
    let trimmed = text.strip_suffix('\n').unwrap();
    let start = trimmed.rfind('\n').map_or(0, |i| i + 1);
    let edited = format!("{}{}", &text[..start], last(&trimmed[start..]));
    std::fs::write(path, edited).unwrap();
}

async fn an_edited_last_line_stops_the_store_from_opening(kind: Kind) {
    let h = Harness::new(kind, "tamper").await;
    let config = h.config();
    with_history(&h).await;

    // One byte of the last line's event changed: the line no longer matches its own hash, so
    // the audit file refuses to open (a typed audit error naming the file).
    replace_last_line(&config.audit_file, |line| {
        let at = line.find("\"key_id\":\"ed25519").unwrap() + "\"key_id\":\"ed2551".len();
        format!("{}8{}\n", &line[..at], &line[at + 1..])
    });
    let tampered = std::fs::read(&config.audit_file).unwrap();
    let err = h.open(checkpoints()).await.err().unwrap();
    match &err {
        StoreError::Audit { path, source } => {
            assert_eq!(path, &config.audit_file);
            assert!(
                matches!(source, crate::audit::AuditError::Corrupt(e) if e.problem.to_string().contains("hash")),
                "{source:?}"
            );
        }
        other => panic!("expected an audit file error, got {other:?}"),
    }
    // Nothing was written past the edited line.
    assert_eq!(std::fs::read(&config.audit_file).unwrap(), tampered);
}

async fn a_rewritten_or_extended_mirror_disagrees_with_the_database(kind: Kind) {
    let h = Harness::new(kind, "rewrite").await;
    let config = h.config();
    with_history(&h).await;
    let original = std::fs::read_to_string(&config.audit_file).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    // The chain the file's lines are on (0 on SQLite, this replica's on PostgreSQL).
    let chain = *audit::verify(original.as_bytes())
        .unwrap()
        .chains
        .keys()
        .last()
        .unwrap();
    let prev = {
        let cut: String = lines[..lines.len() - 1]
            .iter()
            .map(|l| format!("{l}\n"))
            .collect();
        audit::verify(cut.as_bytes()).unwrap().chains[&chain]
    };
    let forged = AuditEvent::TokenRevoked {
        token_id: "forged".into(),
        reason: "cover-up".into(),
        revoked_by: "mallory".into(),
    };

    // The last line replaced by a well-formed one with a recomputed hash: the file verifies on
    // its own, but its head is not the database's.
    replace_last_line(&config.audit_file, |_| {
        format!(
            "{}\n",
            audit::seal_in(chain, &prev, std::time::SystemTime::now(), &forged).line
        )
    });
    verify_file(&config.audit_file);
    let err = h.open(checkpoints()).await.err().unwrap();
    assert!(
        matches!(&err, StoreError::AuditMismatch(m) if m.contains("entry 7 differs")),
        "{err:?}"
    );

    // An extra, well-formed entry after the real ones: the file is ahead of the database.
    let head = audit::verify(original.as_bytes()).unwrap().head;
    let extra = audit::seal_in(chain, &head, std::time::SystemTime::now(), &forged).line;
    std::fs::write(&config.audit_file, format!("{original}{extra}\n")).unwrap();
    let err = h.open(checkpoints()).await.err().unwrap();
    assert!(
        matches!(&err, StoreError::AuditMismatch(m) if m.contains("8 entries, the database 7")),
        "{err:?}"
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// SQLite only: its files on disk, and its writer's batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_and_its_side_files_are_private() {
    let h = Harness::new(Kind::Sqlite, "mode").await;
    let config = h.config();
    let (store, _) = open_with_token(&h, 1).await;
    assert_eq!(mode(&config.sqlite), 0o600);
    assert_eq!(mode(&config.audit_file), 0o600);
    // The WAL holds the same rows as the database until a checkpoint; it must be as private.
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", config.sqlite.display()));
        assert_eq!(mode(&side), 0o600, "{}", side.display());
    }
    store.close().await;
}

/// SQLite only: its files on disk, and its writer's batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_max_batch_commits_one_change_at_a_time() {
    let h = Harness::new(Kind::Sqlite, "batch").await;
    let mut config = h.config();
    config.max_batch = 0;
    let store = h.open(checkpoints()).await.unwrap();
    let t = token_record(1);
    store
        .register_token(t.clone(), token_issued(&t))
        .await
        .unwrap();
    assert_eq!(store.list_tokens().await.unwrap(), [t]);
    store.close().await;
}

async fn ping_answers_and_export_writes_the_whole_chain(kind: Kind) {
    let h = Harness::new(kind, "ping-export").await;
    let (store, token) = open_with_token(&h, 2).await;
    store.ping().await.unwrap();
    let backend = match kind {
        Kind::Sqlite => "sqlite",
        Kind::Postgres => "postgres",
    };
    assert_eq!(store.backend(), backend);
    assert_eq!(
        store
            .issue(issue_record(token.id, "e1", "export-nonce"))
            .await
            .unwrap(),
        IssueOutcome::Issued { uses_left: 1 }
    );
    store.close().await;

    // The export is the database's chain: after a clean close, the very lines of the mirror.
    let mut out = Vec::new();
    let config = h.config();
    let head = match &config.backend {
        Backend::Sqlite => SqliteStore::export_audit(&config.sqlite, &mut out).unwrap(),
        Backend::Postgres(pg) => {
            let (entries, heads) = super::postgres::export_audit(pg, checkpoints(), &mut out)
                .await
                .unwrap();
            // One store opened once: one chain, all of it.
            assert_eq!(heads.len(), 1, "{heads:?}");
            let head = *heads.values().next().unwrap();
            assert_eq!(entries, head.seq);
            head
        }
    };
    assert_eq!(head, h.db_head().await);
    assert!(head.seq >= 3, "{head:?}");
    assert_eq!(
        String::from_utf8(out).unwrap(),
        std::fs::read_to_string(h.audit_file()).unwrap()
    );
}

/// The shadow table is bounded: however many disagreements arrive, only the newest `keep`
/// stay, newest first, and each keeps what was recorded; the audit chain is untouched.
async fn shadow_disagreements_keep_only_the_newest_rows(kind: Kind) {
    let h = Harness::new(kind, "shadow").await;
    let store = h.open(checkpoints()).await.unwrap();
    let audited = || h.texts("SELECT CAST(COUNT(*) AS TEXT) FROM audit");
    let before = audited().await;
    let keep = 5;
    for i in 0..12u64 {
        let d = Disagreement {
            seq: 0,
            at: NOW + i,
            request_id: format!("req-{i}"),
            cluster: "edge-eu".into(),
            role: "relay".into(),
            active_version: "1.0.0".into(),
            candidate_version: "1.1.0".into(),
            active: r#"{"allow":{}}"#.into(),
            candidate: r#"{"deny":{}}"#.into(),
            input: format!(r#"{{"node_name":"n{i}"}}"#),
        };
        store.record_disagreement(d, keep).await.unwrap();
    }
    let rows = store.disagreements(100).await.unwrap();
    let ids: Vec<_> = rows.iter().map(|d| d.request_id.as_str()).collect();
    assert_eq!(ids, ["req-11", "req-10", "req-9", "req-8", "req-7"]);
    assert_eq!(rows[0].input, r#"{"node_name":"n11"}"#);
    assert_eq!(rows[0].at, NOW + 11);
    assert!(rows.windows(2).all(|w| w[0].seq > w[1].seq));
    assert_eq!(store.disagreements(2).await.unwrap().len(), 2);
    assert_eq!(audited().await, before, "disagreements are not audited");
    store.close().await;
}

/// Decisions kept for replay: read back oldest first and paged by position, trimmed to the
/// newest `keep` rows and to the retention window in the transaction that records them.
async fn recorded_decisions_are_bounded_in_rows_and_by_age(kind: Kind) {
    let h = Harness::new(kind, "decisions").await;
    let store = h.open(checkpoints()).await.unwrap();
    let decision = |i: u64| DecisionRecord {
        seq: 0,
        at: NOW + i,
        request_id: format!("req-{i}"),
        cluster: "edge-eu".into(),
        role: "dispatcher".into(),
        policy_version: "1.0.0".into(),
        outcome: r#"{"deny":{"code":"x"}}"#.into(),
        input: format!(r#"{{"node_name":"n{i}"}}"#),
    };
    store
        .record_decisions((0..4).map(decision).collect(), 6, NOW)
        .await
        .unwrap();
    store
        .record_decisions((4..8).map(decision).collect(), 6, NOW)
        .await
        .unwrap();
    let ids = |rows: &[DecisionRecord]| -> Vec<String> {
        rows.iter().map(|d| d.request_id.clone()).collect()
    };
    let all = store.decisions(0, 0, 100).await.unwrap();
    assert_eq!(
        ids(&all),
        ["req-2", "req-3", "req-4", "req-5", "req-6", "req-7"]
    );
    assert_eq!(all[0].input, r#"{"node_name":"n2"}"#);
    let page = store.decisions(0, all[1].seq, 2).await.unwrap();
    assert_eq!(ids(&page), ["req-4", "req-5"]);
    let recent = store.decisions(NOW + 6, 0, 100).await.unwrap();
    assert_eq!(ids(&recent), ["req-6", "req-7"]);
    // Past the retention window: everything before NOW + 7 goes with the next record.
    store
        .record_decisions(vec![decision(9)], 6, NOW + 7)
        .await
        .unwrap();
    let all = store.decisions(0, 0, 100).await.unwrap();
    assert_eq!(ids(&all), ["req-7", "req-9"]);
}

async fn a_policy_pin_is_shared_on_postgres_and_stays_the_gateways_own_on_sqlite(kind: Kind) {
    let h = Harness::new(kind, "pin-share").await;
    let store = h.open(checkpoints()).await.unwrap();
    let shared = store
        .share_policy_pin(Some("1.0.0".into()), Some("c0ffee".into()), "ops".into())
        .await
        .unwrap();
    match kind {
        Kind::Sqlite => {
            assert_eq!(shared, None);
            assert!(store.shared_policy_pin().is_none());
        }
        Kind::Postgres => {
            let want = SharedPin {
                generation: 1,
                target: Some("1.0.0".into()),
                commit: Some("c0ffee".into()),
                by: "ops".into(),
            };
            assert_eq!(shared.as_ref(), Some(&want));
            // The writer's own watch has it at once, before any notification.
            assert_eq!(*store.shared_policy_pin().unwrap().borrow(), want);
            let unpinned = store
                .share_policy_pin(None, None, "ops".into())
                .await
                .unwrap()
                .unwrap();
            assert_eq!((unpinned.generation, unpinned.target), (2, None));
            assert_eq!(
                h.texts("SELECT CAST(generation AS TEXT) FROM policy_pin")
                    .await,
                vec![Some("2".to_string())]
            );
        }
    }
    store.close().await;
}
