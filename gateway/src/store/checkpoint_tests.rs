//! When the store signs the audit chain: every N entries, after T with entries appended, when
//! flushed and when closed — checked on each backend and the real audit file, with the
//! checkpoints verified under the key's public half.

use std::io::BufReader;
use std::num::NonZeroU64;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::harness::{Harness, Kind, both_backends};
use super::tests::{token_issued, token_record};
use super::*;
use crate::audit::{self, AuditEvent, AuditKey, SignedSummary};

both_backends! {
    a_checkpoint_follows_every_n_entries_and_the_close,
    a_checkpoint_follows_the_interval_only_when_entries_were_appended,
    flush_signs_the_tail_and_returns_once_the_file_holds_it,
    entries_left_unsigned_by_a_crash_count_towards_the_next_checkpoint,
}

fn schedule(every: u64, interval: Duration) -> (Checkpoints, audit::AuditPublicKey) {
    let key = AuditKey::generate().unwrap().0;
    let public = key.public().clone();
    let checkpoints = Checkpoints {
        key: Arc::new(key),
        every: NonZeroU64::new(every).unwrap(),
        interval,
    };
    (checkpoints, public)
}

/// The file's events, after checking its chain and every checkpoint under `key`.
fn signed(path: &Path, key: &audit::AuditPublicKey) -> (SignedSummary, Vec<AuditEvent>) {
    let file = std::fs::File::open(path).unwrap();
    let summary = audit::verify_signed(BufReader::new(file), std::slice::from_ref(key), &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let events = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            serde_json::from_value(value["event"].clone()).unwrap()
        })
        .collect();
    (summary, events)
}

fn kinds(events: &[AuditEvent]) -> Vec<&'static str> {
    events.iter().map(AuditEvent::kind).collect()
}

/// Polls (with a deadline) until the audit file has `lines` complete lines.
async fn wait_for_lines(path: &Path, lines: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.ends_with('\n') && text.lines().count() >= lines {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the audit file never reached {lines} lines: {text}"
        );
        tokio::task::yield_now().await;
    }
}

async fn register(store: &dyn Store) {
    let t = token_record(1);
    store
        .register_token(t.clone(), token_issued(&t))
        .await
        .unwrap();
}

const T: &str = "token-issued";
const C: &str = "checkpoint";

async fn a_checkpoint_follows_every_n_entries_and_the_close(kind: Kind) {
    let h = Harness::new(kind, "cp-every").await;
    let config = h.config();
    let (checkpoints, public) = schedule(3, Duration::from_secs(3600));
    let store = h.open(checkpoints).await.unwrap();
    for _ in 0..7 {
        register(&*store).await;
    }
    wait_for_lines(&config.audit_file, 9).await;
    let (summary, events) = signed(&config.audit_file, &public);
    assert_eq!(kinds(&events), [T, T, T, C, T, T, T, C, T]);
    assert_eq!(summary.last_checkpoint.unwrap().entry.seq, 8);
    assert_eq!(summary.unsigned, 1);

    store.close().await;
    let (summary, events) = signed(&config.audit_file, &public);
    assert_eq!(kinds(&events), [T, T, T, C, T, T, T, C, T, C]);
    assert_eq!(summary.unsigned, 0);
    assert_eq!(summary.head, h.db_head().await);
    // A checkpoint signs the entry right before it.
    assert!(matches!(events[9], AuditEvent::Checkpoint { seq: 9, .. }));

    // Nothing unsigned: opening and closing again adds nothing.
    let (checkpoints, _) = schedule(3, Duration::from_secs(3600));
    h.open(checkpoints).await.unwrap().close().await;
    assert_eq!(signed(&config.audit_file, &public).1.len(), 10);
}

async fn a_checkpoint_follows_the_interval_only_when_entries_were_appended(kind: Kind) {
    let h = Harness::new(kind, "cp-interval").await;
    let config = h.config();
    let (checkpoints, public) = schedule(1000, Duration::from_millis(30));
    let store = h.open(checkpoints).await.unwrap();
    register(&*store).await;
    // No further call: the ticker alone brings the checkpoint.
    wait_for_lines(&config.audit_file, 2).await;
    register(&*store).await;
    wait_for_lines(&config.audit_file, 4).await;
    let (summary, events) = signed(&config.audit_file, &public);
    // Never two checkpoints in a row: an idle interval signs nothing.
    assert_eq!(kinds(&events)[..4], [T, C, T, C]);
    assert!(matches!(events[1], AuditEvent::Checkpoint { seq: 1, .. }));
    assert_eq!(summary.last_checkpoint.unwrap().entry.seq, 4);
    store.close().await;
    let (_, events) = signed(&config.audit_file, &public);
    assert!(
        events
            .windows(2)
            .all(|w| w[0].kind() != C || w[1].kind() != C),
        "{:?}",
        kinds(&events)
    );
}

async fn flush_signs_the_tail_and_returns_once_the_file_holds_it(kind: Kind) {
    let h = Harness::new(kind, "cp-flush").await;
    let config = h.config();
    let (checkpoints, public) = schedule(1000, Duration::from_secs(3600));
    let store = h.open(checkpoints).await.unwrap();
    register(&*store).await;
    register(&*store).await;
    store.flush_audit().await.unwrap();
    // No waiting: the flush promised the file holds it.
    let (summary, events) = signed(&config.audit_file, &public);
    assert_eq!(kinds(&events), [T, T, C]);
    assert_eq!(summary.head, h.db_head().await);
    // A second flush with nothing new signs nothing.
    store.flush_audit().await.unwrap();
    assert_eq!(signed(&config.audit_file, &public).1.len(), 3);
    store.close().await;
    assert_eq!(signed(&config.audit_file, &public).1.len(), 3);
}

async fn entries_left_unsigned_by_a_crash_count_towards_the_next_checkpoint(kind: Kind) {
    let h = Harness::new(kind, "cp-crash").await;
    let config = h.config();
    let (checkpoints, public) = schedule(3, Duration::from_secs(3600));
    let store = h.open(checkpoints.clone()).await.unwrap();
    register(&*store).await;
    register(&*store).await;
    store.close().await;
    // As if the process had died before the close: the closing checkpoint never written.
    h.execute("DELETE FROM audit WHERE seq = 3").await;
    let text = std::fs::read_to_string(&config.audit_file).unwrap();
    let kept: String = text.split_inclusive('\n').take(2).collect();
    std::fs::write(&config.audit_file, kept).unwrap();

    let store = h.open(checkpoints).await.unwrap();
    match kind {
        // Two unsigned entries are already there: the third is the N-th.
        Kind::Sqlite => {
            register(&*store).await;
            wait_for_lines(&config.audit_file, 4).await;
            let (_, events) = signed(&config.audit_file, &public);
            assert_eq!(kinds(&events), [T, T, T, C]);
        }
        // The store claims a new chain, signed after its own third entry; that checkpoint
        // binds the crashed chain's head, so its two unsigned entries are signed with it.
        Kind::Postgres => {
            for _ in 0..3 {
                register(&*store).await;
            }
            wait_for_lines(&config.audit_file, 6).await;
            let (summary, events) = signed(&config.audit_file, &public);
            assert_eq!(kinds(&events), [T, T, T, T, T, C]);
            assert_eq!(summary.chains.len(), 2);
            let AuditEvent::Checkpoint { bound, .. } = &events[5] else {
                unreachable!("the last entry is a checkpoint")
            };
            let crashed = *summary.chains.keys().next().unwrap();
            assert_eq!(bound.len(), 1);
            assert_eq!((bound[0].chain, bound[0].seq), (crashed, 2));
        }
    }
    store.close().await;
}
