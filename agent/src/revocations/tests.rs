use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::testutil::TempDir;

fn entry(seq: u64, serial: &str, not_after: u64) -> Revocation {
    Revocation {
        seq,
        serial: serial.into(),
        spiffe_id: format!("spiffe://td.example/node/{serial}"),
        token_id: "t1".into(),
        revoked_at: 50,
        reason: "superseded".into(),
        not_after,
    }
}

fn page(next: u64, revocations: Vec<Revocation>) -> RevocationPage {
    RevocationPage { revocations, next }
}

fn serials(file: &RevocationFile) -> Vec<&str> {
    file.revocations.iter().map(|r| r.serial.as_str()).collect()
}

#[test]
fn a_page_adds_what_is_new_in_feed_order_and_moves_next() {
    let empty = RevocationFile::default();
    let first = empty.merge(&page(2, vec![entry(2, "b", 500), entry(1, "a", 500)]), 100);
    assert_eq!(first.next, 2);
    assert_eq!(serials(&first), ["a", "b"]);
    // The same entries again (a retried poll) are held once.
    let again = first.merge(&page(3, vec![entry(2, "b", 500), entry(3, "c", 500)]), 100);
    assert_eq!(again.next, 3);
    assert_eq!(serials(&again), ["a", "b", "c"]);
    // An empty page (the long poll ran out) changes nothing but what expired.
    assert_eq!(again.merge(&page(3, Vec::new()), 100), again);
}

#[test]
fn entries_are_dropped_once_their_certificate_expired() {
    let held = RevocationFile::default().merge(
        &page(
            3,
            vec![entry(1, "a", 150), entry(2, "b", 300), entry(3, "c", 200)],
        ),
        100,
    );
    assert_eq!(serials(&held), ["a", "b", "c"]);
    // At 200, `a` (150) and `c` (200, not_after reached) are gone.
    let later = held.merge(&page(3, Vec::new()), 200);
    assert_eq!(serials(&later), ["b"]);
    assert_eq!(later.next, 3);
    // An entry that arrives already expired is never held.
    let stale = later.merge(&page(4, vec![entry(4, "d", 199)]), 200);
    assert_eq!(serials(&stale), ["b"]);
    assert_eq!(stale.next, 4);
}

#[test]
fn a_restarted_feed_is_followed_from_where_the_gateway_says() {
    let held = RevocationFile::default().merge(&page(9, vec![entry(9, "i", 500)]), 100);
    let reset = held.merge(&page(1, vec![entry(1, "a", 500)]), 100);
    assert_eq!(reset.next, 1);
    assert_eq!(serials(&reset), ["a", "i"]);
}

#[test]
fn the_file_is_public_json_written_whole_and_resumes_the_feed() {
    let tmp = TempDir::new("revocations");
    let path = tmp.path().join("revoked.json");
    assert_eq!(
        RevocationFile::load(&path).unwrap(),
        RevocationFile::default()
    );
    let file = RevocationFile::default().merge(&page(7, vec![entry(7, "g", 500)]), 100);
    file.store(&path).unwrap();
    assert_eq!(RevocationFile::load(&path).unwrap(), file);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(json["next"], 7);
    assert_eq!(json["revocations"][0]["serial"], "g");
    std::fs::write(&path, b"[]").unwrap();
    assert!(matches!(
        RevocationFile::load(&path),
        Err(JsonFileError::Parse { .. })
    ));
}

#[test]
fn the_follower_writes_only_what_changed() {
    let tmp = TempDir::new("revocations-follower");
    let follower = Follower {
        dir: SvidDir::new(tmp.path()),
        gateway: "https://127.0.0.1:1".into(),
        ca_bundle: None,
        file: tmp.path().join("revoked.json"),
    };
    let state = follower.take_in(RevocationFile::default(), &page(0, Vec::new()), 100);
    assert_eq!(state, RevocationFile::default());
    assert!(!follower.file.exists(), "nothing changed, nothing written");
    let state = follower.take_in(state, &page(1, vec![entry(1, "a", 500)]), 100);
    assert_eq!(RevocationFile::load(&follower.file).unwrap(), state);
    // A file that cannot be written keeps the old state, so the entries are asked for again.
    std::fs::remove_file(&follower.file).unwrap();
    std::fs::create_dir(&follower.file).unwrap();
    let kept = follower.take_in(state.clone(), &page(2, vec![entry(2, "b", 500)]), 100);
    assert_eq!(kept, state);
}
