//! Lineages against each backend: renewals extend a lineage once per certificate,
//! revocations take back a token's, a SPIFFE ID's or a certificate's descendants, publish them
//! to the feed and quarantine their SPIFFE IDs, and every refusal writes nothing.

use std::time::Duration;

use super::harness::{Harness, Kind, both_backends};
use super::tests::{issue_record, open_with_token, policy, read_audit};
use super::*;
use crate::identity::Serial;

both_backends! {
    a_lineage_grows_by_renewals_and_a_token_revocation_takes_all_of_it,
    a_serial_revocation_takes_its_descendants_and_not_its_ancestors,
    the_expiry_summary_counts_live_unrenewed_identities_past_their_renewal_point,
    a_token_revocation_racing_renewals_leaves_none_of_its_identities_live,
    a_serial_revocation_racing_renewals_takes_every_descendant,
    a_spiffe_id_revocation_racing_renewals_takes_its_whole_lineage,
    the_newest_identity_of_a_spiffe_id_is_its_lineages_leaf_within_one_second,
}

fn renew_record(token: TokenId, predecessor: &str, like: &IssueRecord, now: u64) -> RenewRecord {
    let mut identity = like.identity.clone();
    identity.serial = Serial::random().unwrap();
    identity.not_before = now - 30;
    identity.not_after = now + 3600;
    RenewRecord {
        request_id: format!("renew-{}", &identity.serial.to_string()[..8]),
        predecessor: predecessor.to_string(),
        token,
        idempotency: Some((identity.serial.to_string(), [7; 32])),
        identity,
        response: "{}".into(),
        policy: policy(),
        audit_notes: Vec::new(),
        matched_rules: vec!["renew".into()],
        now,
        manual: None,
    }
}

fn order(target: RevokeTarget, quarantine: u64, now: u64) -> RevokeOrder {
    RevokeOrder {
        request_id: "revoke-1".into(),
        target,
        reason: "laptop lost".into(),
        revoked_by: "bob@ops".into(),
        quarantine: Duration::from_secs(quarantine),
        now,
    }
}

const NOW: u64 = 1_750_000_000;

async fn a_lineage_grows_by_renewals_and_a_token_revocation_takes_all_of_it(kind: Kind) {
    let h = Harness::new(kind, "lineage").await;
    let (store, token) = open_with_token(&h, 5).await;
    let joined = issue_record(token.id, "r1", "n1");
    let first = joined.identity.serial.to_string();
    assert!(matches!(
        store.issue(joined.clone()).await.unwrap(),
        IssueOutcome::Issued { .. }
    ));
    let lineage = store.lineage(&first, NOW).await.unwrap().unwrap();
    assert_eq!(lineage.renewals, 0);
    assert!(!lineage.renewed);
    assert_eq!(lineage.token.id, token.id);
    assert_eq!(lineage.attestation, r#"{"kind":"token-only"}"#);

    // First renewal; its retry with the same key gets the same answer; a second renewal of
    // the same certificate (an agent that lost the first answer's files) is a second branch.
    let renewal = renew_record(token.id, &first, &joined, NOW + 10);
    let second = renewal.identity.serial.to_string();
    assert_eq!(
        store.renew(renewal.clone()).await.unwrap(),
        RenewOutcome::Renewed { renewals: 1 }
    );
    assert_eq!(
        store.renew(renewal.clone()).await.unwrap(),
        RenewOutcome::Replayed("{}".into())
    );
    let fork = renew_record(token.id, &first, &joined, NOW + 11);
    let branch = fork.identity.serial.to_string();
    assert_eq!(
        store.renew(fork).await.unwrap(),
        RenewOutcome::Renewed { renewals: 1 }
    );
    let renewed = store.lineage(&second, NOW + 12).await.unwrap().unwrap();
    assert_eq!(renewed.renewals, 1);
    assert_eq!(renewed.attestation, lineage.attestation);
    assert!(
        store
            .lineage(&first, NOW + 12)
            .await
            .unwrap()
            .unwrap()
            .renewed
    );
    // The lineage shares the token: one join use only.
    assert_eq!(store.token(token.id).await.unwrap().unwrap().uses, 1);

    let mut feed = store.revocation_head();
    let before = *feed.borrow_and_update();
    let summary = store
        .revoke(order(RevokeTarget::Token(token.id), 600, NOW + 20))
        .await
        .unwrap();
    assert!(summary.found && summary.token_revoked);
    assert_eq!(
        summary.serials,
        [first.clone(), second.clone(), branch.clone()]
    );
    let spiffe_id = joined.identity.spiffe_id.to_string();
    assert_eq!(summary.quarantined.len(), 1);
    assert_eq!(summary.quarantined[0].spiffe_id, spiffe_id);
    assert_eq!(summary.quarantined[0].until, NOW + 620);
    // The feed moved before the revocation was answered.
    assert!(feed.has_changed().unwrap());
    assert_eq!(*feed.borrow_and_update(), before + 3);
    let published = store.revocations_since(before, 10).await.unwrap();
    let serials: Vec<_> = published.iter().map(|r| r.serial.clone()).collect();
    assert_eq!(serials, [first.clone(), second.clone(), branch]);
    assert!(published.iter().all(|r| r.reason == "laptop lost"));
    let (crl, head) = store.unexpired_revocations(NOW + 30).await.unwrap();
    assert_eq!((crl.len(), head), (3, before + 3));
    // Expired ones leave the CRL.
    assert!(
        store
            .unexpired_revocations(NOW + 10_000)
            .await
            .unwrap()
            .0
            .is_empty()
    );

    // Revoked again: nothing more is revoked or audited.
    let again = store
        .revoke(order(RevokeTarget::Token(token.id), 600, NOW + 21))
        .await
        .unwrap();
    assert!(again.found && !again.token_revoked && again.serials.is_empty());

    // The renewal of the revoked certificate is refused, and so is a join for the quarantined
    // SPIFFE ID with a fresh token, until the quarantine is lifted.
    let late = renew_record(token.id, &second, &joined, NOW + 30);
    assert_eq!(store.renew(late).await.unwrap(), RenewOutcome::TokenRevoked);
    let fresh = token_record_for(&*store).await;
    let mut rejoin = issue_record(fresh.id, "r9", "n9");
    rejoin.identity.spiffe_id = joined.identity.spiffe_id.clone();
    rejoin.now = NOW + 40;
    assert_eq!(
        store.issue(rejoin.clone()).await.unwrap(),
        IssueOutcome::Quarantined { until: NOW + 620 }
    );
    assert_eq!(store.token(fresh.id).await.unwrap().unwrap().uses, 0);
    assert_eq!(store.quarantined(NOW + 40).await.unwrap().len(), 1);
    assert!(
        store
            .lift_quarantine(spiffe_id.clone(), "carol@ops".into(), NOW + 41)
            .await
            .unwrap()
    );
    assert!(
        !store
            .lift_quarantine(spiffe_id.clone(), "carol@ops".into(), NOW + 42)
            .await
            .unwrap()
    );
    rejoin.now = NOW + 43;
    assert!(matches!(
        store.issue(rejoin).await.unwrap(),
        IssueOutcome::Issued { .. }
    ));

    store.close().await;
    let events = read_audit(&h.audit_file());
    let kinds: Vec<_> = events.iter().map(AuditEvent::kind).collect();
    assert_eq!(
        kinds,
        [
            "token-issued",
            "identity-issued",
            "identity-renewed",
            "identity-renewed",
            "token-revoked",
            "identity-revoked",
            "identity-revoked",
            "identity-revoked",
            "spiffe-id-quarantined",
            "token-issued",
            "quarantine-lifted",
            "identity-issued",
            "checkpoint",
        ]
    );
    // The whole lineage is findable by its token.
    let by_token = events
        .iter()
        .filter(|e| e.ids().contains(&token.id.to_string().as_str()))
        .count();
    assert_eq!(by_token, 8);
}

/// Registers another token in `store`.
async fn token_record_for(store: &dyn Store) -> TokenRecord {
    let token = super::tests::token_record(5);
    store
        .register_token(token.clone(), super::tests::token_issued(&token))
        .await
        .unwrap();
    token
}

async fn a_serial_revocation_takes_its_descendants_and_not_its_ancestors(kind: Kind) {
    let h = Harness::new(kind, "descendants").await;
    let (store, token) = open_with_token(&h, 5).await;
    let joined = issue_record(token.id, "r1", "n1");
    let first = joined.identity.serial.to_string();
    store.issue(joined.clone()).await.unwrap();
    let r2 = renew_record(token.id, &first, &joined, NOW + 1);
    let second = r2.identity.serial.to_string();
    store.renew(r2).await.unwrap();
    let r3 = renew_record(token.id, &second, &joined, NOW + 2);
    let third = r3.identity.serial.to_string();
    store.renew(r3).await.unwrap();

    let summary = store
        .revoke(order(RevokeTarget::Serial(second.clone()), 0, NOW + 3))
        .await
        .unwrap();
    assert_eq!(summary.serials, [second, third]);
    assert!(summary.quarantined.is_empty(), "zero quarantine: none");
    assert!(!summary.token_revoked);
    let first_now = store.lineage(&first, NOW + 4).await.unwrap().unwrap();
    assert_eq!(first_now.identity.revoked_at, None);
    // A renewal naming a serial never issued.
    let never = renew_record(
        token.id,
        &Serial::random().unwrap().to_string(),
        &joined,
        NOW,
    );
    assert_eq!(store.renew(never).await.unwrap(), RenewOutcome::Unknown);
}

async fn the_expiry_summary_counts_live_unrenewed_identities_past_their_renewal_point(kind: Kind) {
    let h = Harness::new(kind, "expiry").await;
    let (store, token) = open_with_token(&h, 5).await;
    // Issued at NOW, expiring at NOW+3600: 20 % of the lifetime remains from NOW+2880.
    let joined = issue_record(token.id, "r1", "n1");
    store.issue(joined.clone()).await.unwrap();
    let at = |t| store.expiry_summary(t, 20);
    assert_eq!(
        at(NOW).await.unwrap(),
        ExpirySummary {
            soonest: Some(NOW + 3600),
            past_renewal: 0
        }
    );
    assert_eq!(at(NOW + 2900).await.unwrap().past_renewal, 1);
    // Renewed: the old certificate no longer counts; the new one is not due yet.
    let renewal = renew_record(
        token.id,
        &joined.identity.serial.to_string(),
        &joined,
        NOW + 2900,
    );
    store.renew(renewal).await.unwrap();
    assert_eq!(
        at(NOW + 2901).await.unwrap(),
        ExpirySummary {
            soonest: Some(NOW + 2900 + 3600),
            past_renewal: 0
        }
    );
    assert_eq!(at(NOW + 100_000).await.unwrap(), ExpirySummary::default());
}

/// Eight lineages renewing as fast as they can while `target` (built from the first join's
/// record and the token) is revoked: whichever commits first, nothing the revocation covers
/// is live afterwards, each renewal was recorded or refused as revoked, and the feed lists
/// every revoked certificate exactly once.
async fn revocation_racing_renewals(kind: Kind, target: fn(&IssueRecord) -> RevokeTarget) {
    let h = Harness::new(kind, "revoke-race").await;
    let (store, token) = open_with_token(&h, 8).await;
    let store = std::sync::Arc::new(store);
    let mut joined = Vec::new();
    for i in 0..8 {
        let record = issue_record(token.id, &format!("r{i}"), &format!("n{i}"));
        store.issue(record.clone()).await.unwrap();
        joined.push(record);
    }
    let target = target(&joined[0]);
    let mut renewals = Vec::new();
    for record in joined.clone() {
        let store = store.clone();
        renewals.push(tokio::spawn(async move {
            let mut predecessor = record.identity.serial.to_string();
            for step in 0..6 {
                let renewal = renew_record(token.id, &predecessor, &record, NOW + 1 + step);
                let serial = renewal.identity.serial.to_string();
                match store.renew(renewal).await.unwrap() {
                    RenewOutcome::Renewed { .. } => predecessor = serial,
                    RenewOutcome::TokenRevoked | RenewOutcome::Revoked => break,
                    other => panic!("unexpected renewal outcome {other:?}"),
                }
            }
        }));
    }
    tokio::task::yield_now().await;
    let summary = store
        .revoke(order(target.clone(), 0, NOW + 3))
        .await
        .unwrap();
    for renewal in renewals {
        renewal.await.unwrap();
    }
    let covered = |identity: &IssuedIdentity| match &target {
        RevokeTarget::Token(_) => true,
        RevokeTarget::SpiffeId(id) => identity.spiffe_id == *id,
        RevokeTarget::Serial(_) => identity.spiffe_id == joined[0].identity.spiffe_id.to_string(),
    };
    let all = store
        .identities(
            IdentityFilter {
                token_id: Some(token.id),
                ..IdentityFilter::default()
            },
            NOW + 10,
        )
        .await
        .unwrap();
    let (hit, spared): (Vec<_>, Vec<_>) = all.iter().partition(|i| covered(i));
    assert!(
        hit.iter().all(|i| i.state == IdentityState::Revoked),
        "{target:?} left live: {:?}",
        hit.iter()
            .filter(|i| i.state != IdentityState::Revoked)
            .map(|i| &i.serial)
            .collect::<Vec<_>>()
    );
    assert!(spared.iter().all(|i| i.state == IdentityState::Live));
    let mut revoked: Vec<String> = hit.iter().map(|i| i.serial.clone()).collect();
    revoked.sort();
    let mut reported = summary.serials.clone();
    reported.sort();
    assert_eq!(reported, revoked);
    let mut fed: Vec<String> = store
        .revocations_since(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.serial)
        .collect();
    fed.sort();
    assert_eq!(fed, revoked);
    std::sync::Arc::into_inner(store).unwrap().close().await;
}

async fn a_token_revocation_racing_renewals_leaves_none_of_its_identities_live(kind: Kind) {
    revocation_racing_renewals(kind, |r| RevokeTarget::Token(r.token)).await;
}

async fn a_serial_revocation_racing_renewals_takes_every_descendant(kind: Kind) {
    revocation_racing_renewals(kind, |r| {
        RevokeTarget::Serial(r.identity.serial.to_string())
    })
    .await;
}

async fn a_spiffe_id_revocation_racing_renewals_takes_its_whole_lineage(kind: Kind) {
    revocation_racing_renewals(kind, |r| {
        RevokeTarget::SpiffeId(r.identity.spiffe_id.to_string())
    })
    .await;
}

async fn the_newest_identity_of_a_spiffe_id_is_its_lineages_leaf_within_one_second(kind: Kind) {
    let h = Harness::new(kind, "newest").await;
    let (store, token) = open_with_token(&h, 5).await;
    // A join and two renewals in one second, the serials rising along the lineage: ordered by
    // serial alone (as the tie-break was), the root would come first.
    let serial = |last: u8| Serial::parse_hex(&format!("7f{}{last:02x}", "0".repeat(28))).unwrap();
    let mut joined = issue_record(token.id, "r1", "n1");
    joined.identity.serial = serial(1);
    assert!(matches!(
        store.issue(joined.clone()).await.unwrap(),
        IssueOutcome::Issued { .. }
    ));
    let mut predecessor = joined.identity.serial.to_string();
    for (depth, last) in [(1, 2), (2, 3)] {
        let mut renewal = renew_record(token.id, &predecessor, &joined, NOW);
        renewal.identity.serial = serial(last);
        predecessor = renewal.identity.serial.to_string();
        assert_eq!(
            store.renew(renewal).await.unwrap(),
            RenewOutcome::Renewed { renewals: depth }
        );
    }
    let spiffe_id = joined.identity.spiffe_id.to_string();
    let listed = |limit| IdentityFilter {
        spiffe_id: Some(spiffe_id.clone()),
        limit,
        ..IdentityFilter::default()
    };
    let newest = store.identities(listed(Some(1)), NOW).await.unwrap();
    assert_eq!(newest[0].serial, serial(3).to_string());
    let all: Vec<String> = store
        .identities(listed(None), NOW)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.serial)
        .collect();
    assert_eq!(
        all,
        [serial(3), serial(2), serial(1)].map(|s| s.to_string())
    );
}
