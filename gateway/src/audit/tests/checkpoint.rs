//! Signed checkpoints: what they catch (a recomputed chain, a foreign key, a cut before a kept
//! anchor) and what verification reports about the part no signature covers.

use super::*;

/// A log of `n` mixed entries with a checkpoint signed by `key` after every `every` of them
/// (checkpoints included in the count of lines, not of `n`).
fn signed_log(key: &AuditKey, n: usize, every: usize) -> Vec<SealedEntry> {
    let mut head = ChainHead::genesis();
    let mut entries = Vec::new();
    for (i, event) in mixed(n).iter().enumerate() {
        let entry = seal(&head, at(i), event);
        head = head_of(&entry);
        entries.push(entry);
        if (i + 1) % every == 0 {
            let entry = seal(&head, at(i), &checkpoint(key, &head, at(i)));
            head = head_of(&entry);
            entries.push(entry);
        }
    }
    entries
}

fn key() -> AuditKey {
    AuditKey::generate().unwrap().0
}

fn verify_signed_err(log: &[u8], keys: &[AuditPublicKey]) -> VerifyError {
    match verify_signed(log, keys, &[]) {
        Ok(summary) => panic!("expected a verification failure, got {summary:?}"),
        Err(e) => e,
    }
}

/// What an attacker without the key can do: change one entry's event text and recompute the
/// chain from there on — every later `prev` and `hash`, the checkpoints' lines included — so
/// that the plain hash chain verifies again.
fn edit_and_recompute(log: &[u8], line: usize, from: &str, to: &str) -> Vec<u8> {
    let mut head = ChainHead::genesis();
    let mut out = Vec::new();
    for (i, text) in lines(log).iter().enumerate() {
        let text = String::from_utf8(text.clone()).unwrap();
        let text = if i + 1 == line {
            assert!(text.contains(from), "{text}");
            text.replacen(from, to, 1)
        } else {
            text
        };
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let event: AuditEvent = serde_json::from_value(value["event"].clone()).unwrap();
        let ts = humantime::parse_rfc3339(value["ts"].as_str().unwrap()).unwrap();
        let entry = seal(&head, ts, &event);
        head = head_of(&entry);
        out.extend(entry.line.bytes().chain([b'\n']));
    }
    out
}

#[test]
fn a_signed_log_verifies_and_reports_the_last_checkpoint_and_the_unsigned_tail() {
    let key = key();
    let entries = signed_log(&key, 25, 10);
    // 25 entries and checkpoints after the 10th and 20th: lines 11 and 22, three lines after.
    assert_eq!(entries.len(), 27);
    let summary = verify_signed(&log(&entries)[..], &[key.public().clone()], &[]).unwrap();
    assert_eq!(summary.entries, 27);
    assert_eq!(summary.head, head_of(&entries[26]));
    let last = summary.last_checkpoint.unwrap();
    assert_eq!(last.entry, head_of(&entries[21]));
    assert_eq!(last.key_id, key.public().key_id());
    assert_eq!(summary.unsigned, 5);
    // The plain chain check agrees on the chain.
    assert_eq!(verify(&log(&entries)[..]).unwrap().head, summary.head);
}

#[test]
fn a_chain_recomputed_after_an_edit_fails_at_the_first_checkpoint_after_it() {
    let key = key();
    let original = log(&signed_log(&key, 25, 10));
    // Line 18 is a `join-refused` (the 17th event); the next checkpoint is line 22.
    let forged = edit_and_recompute(&original, 18, "role not allowed", "role allowed");
    assert_ne!(forged, original);
    // The plain hash chain cannot tell: it verifies.
    assert_eq!(verify(&forged[..]).unwrap().entries, 27);
    let err = verify_signed_err(&forged, &[key.public().clone()]);
    assert_eq!(err.line, 22, "{err}");
    assert!(
        matches!(
            err.problem,
            Problem::CheckpointHead {
                signed_seq: 21,
                seq: 21,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_checkpoint_rewritten_to_sign_the_recomputed_head_fails_its_signature() {
    let key = key();
    let original = log(&signed_log(&key, 25, 10));
    let forged = edit_and_recompute(&original, 18, "role not allowed", "role allowed");
    // Make line 22's checkpoint name the recomputed head, then recompute again from there.
    let mut lines = lines(&forged);
    let recomputed_head = verify(&join(&lines[..21])[..]).unwrap().head;
    let checkpoint_line = String::from_utf8(lines[21].clone()).unwrap();
    let value: serde_json::Value = serde_json::from_str(&checkpoint_line).unwrap();
    let old_head = value["event"]["head"].as_str().unwrap().to_string();
    lines[21] = checkpoint_line
        .replace(&old_head, &hex::encode(recomputed_head.hash))
        .into_bytes();
    let forged = edit_and_recompute(&join(&lines), 0, "", "");
    assert_eq!(verify(&forged[..]).unwrap().entries, 27);
    let err = verify_signed_err(&forged, &[key.public().clone()]);
    assert_eq!(err.line, 22, "{err}");
    assert!(matches!(err.problem, Problem::BadSignature { .. }), "{err}");
}

#[test]
fn a_checkpoint_signed_by_another_key_is_refused() {
    let (trusted, other) = (key(), key());
    let entries = signed_log(&other, 12, 10);
    let err = verify_signed_err(&log(&entries), &[trusted.public().clone()]);
    assert_eq!(err.line, 11, "{err}");
    assert!(
        matches!(&err.problem, Problem::UntrustedKey { key_id } if key_id == other.public().key_id()),
        "{err}"
    );
    // Naming the trusted key's id over the other key's signature does not help.
    let mut lines = lines(&log(&entries));
    lines[10] = String::from_utf8(lines[10].clone())
        .unwrap()
        .replace(other.public().key_id(), trusted.public().key_id())
        .into_bytes();
    let forged = edit_and_recompute(&join(&lines), 0, "", "");
    let err = verify_signed_err(&forged, &[trusted.public().clone()]);
    assert_eq!(err.line, 11, "{err}");
    assert!(matches!(err.problem, Problem::BadSignature { .. }), "{err}");
    // Several trusted keys (a rotation): the one that signed is among them.
    let summary = verify_signed(
        &log(&entries)[..],
        &[trusted.public().clone(), other.public().clone()],
        &[],
    )
    .unwrap();
    assert_eq!(summary.unsigned, 2);
}

#[test]
fn a_log_cut_before_a_kept_anchor_fails_and_one_that_holds_it_passes() {
    let key = key();
    let entries = signed_log(&key, 25, 10);
    let full = log(&entries);
    let keys = [key.public().clone()];
    // The operator kept the signed head a verify printed earlier: the checkpoint at line 22.
    let anchor = verify_signed(&full[..], &keys, &[])
        .unwrap()
        .last_checkpoint
        .unwrap()
        .entry;
    assert!(verify_signed(&full[..], &keys, &[anchor]).is_ok());
    // Cut back to the first checkpoint: a chain that verifies, signed, with nothing unsigned.
    let cut = log(&entries[..11]);
    let summary = verify_signed(&cut[..], &keys, &[]).unwrap();
    assert_eq!(summary.unsigned, 0);
    let err = verify_signed(&cut[..], &keys, &[anchor]).unwrap_err();
    assert_eq!(err.line, 12, "{err}");
    assert!(
        matches!(
            err.problem,
            Problem::Truncated {
                expected_seq: 22,
                ends_at: 11,
                ..
            }
        ),
        "{err}"
    );
    // A log rewritten from scratch (here: without checkpoints) differs at the anchor's seq.
    let other = log(&sealed(&mixed(30)));
    let err = verify_signed(&other[..], &keys, &[anchor]).unwrap_err();
    assert_eq!(err.line, 22, "{err}");
    assert!(
        matches!(err.problem, Problem::Anchor { seq: 22, .. }),
        "{err}"
    );
}

#[test]
fn a_log_without_checkpoints_reports_every_entry_unsigned() {
    let entries = sealed(&mixed(7));
    let summary = verify_signed(&log(&entries)[..], &[key().public().clone()], &[]).unwrap();
    assert_eq!(summary.last_checkpoint, None);
    assert_eq!(summary.unsigned, 7);
}

#[test]
fn the_checkpoint_event_has_its_documented_shape_and_the_key_round_trips_through_pem() {
    let key = key();
    let event = checkpoint(&key, &ChainHead::genesis(), at(0));
    let json = serde_json::to_value(&event).unwrap();
    assert_eq!(json["kind"], "checkpoint");
    assert_eq!(json["seq"], 0);
    assert_eq!(json["head"], hex::encode(ChainHead::genesis().hash));
    assert_eq!(json["signed_at"], 1_700_000_000_000u64);
    assert_eq!(json["key_id"], key.public().key_id());
    assert_eq!(json["signature"].as_str().unwrap().len(), 128);
    assert!(event.ids().is_empty());
    let public = AuditPublicKey::from_public_pem(&key.public().to_public_pem()).unwrap();
    assert_eq!(public.key_id(), key.public().key_id());
    // The debug form names the key, never its material.
    assert!(!format!("{key:?}").contains("PRIVATE"));
}
