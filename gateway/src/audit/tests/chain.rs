//! Sealing, verification and queries over logs held in memory.

use std::io::{BufReader, Read};

use super::*;

/// Lines in the mixed log.
const N: usize = 50;
/// The line (1-based) the tamper tests pick on: a `token-revoked`, whose reason has spaces.
const K: usize = 16;

fn fifty() -> (Vec<SealedEntry>, Vec<u8>) {
    let entries = sealed(&mixed(N));
    let log = log(&entries);
    (entries, log)
}

#[test]
fn genesis_is_seq_0_and_the_hash_of_the_format_tag() {
    let genesis = ChainHead::genesis();
    assert_eq!(genesis.seq, 0);
    // `printf %s omnirelay-audit-v1 | sha256sum`
    assert_eq!(
        hex::encode(genesis.hash),
        "4a60414ff7244a78e738c79bd9d869d26072f568fc33ab17015fde6df6a70644"
    );
}

#[test]
fn seal_writes_the_exact_line() {
    let revoked = &one_of_each()[1];
    let entry = seal(&ChainHead::genesis(), at(0), revoked);
    // The hash is `sha256sum` of everything before `,"hash":`.
    assert_eq!(
        entry.line,
        concat!(
            r#"{"seq":1,"ts":"2023-11-14T22:13:20.000Z","#,
            r#""prev":"4a60414ff7244a78e738c79bd9d869d26072f568fc33ab17015fde6df6a70644","#,
            r#""event":{"kind":"token-revoked","token_id":"0b6f4a3e-5c1d-4e8f-9a2b-6d7e8f901234","#,
            r#""reason":"leaked in ticket OPS-12","revoked_by":"bob@ops"},"#,
            r#""hash":"c17d1a9ef583b06cf1e4ee681eb7733c48f261dccc4aa8f459b2b4a52bb175ca"}"#,
        )
    );
    assert_eq!(entry.seq, 1);
    assert_eq!(
        hex::encode(entry.hash),
        "c17d1a9ef583b06cf1e4ee681eb7733c48f261dccc4aa8f459b2b4a52bb175ca"
    );
}

#[test]
fn seal_continues_from_the_head_it_is_given() {
    let first = seal(&ChainHead::genesis(), at(0), &one_of_each()[0]);
    let second = seal(&head_of(&first), at(1), &one_of_each()[1]);
    assert_eq!(second.seq, 2);
    let prev = format!(r#""prev":"{}""#, hex::encode(first.hash));
    assert!(second.line.contains(&prev), "{}", second.line);
    assert!(second.line.contains(r#""ts":"2023-11-14T22:13:21.500Z""#));
}

#[test]
fn seal_clamps_times_rfc3339_cannot_write() {
    let event = &one_of_each()[6];
    let before_1970 = UNIX_EPOCH - Duration::from_secs(1);
    let after_9999 = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
    let early = seal(&ChainHead::genesis(), before_1970, event);
    let late = seal(&ChainHead::genesis(), after_9999, event);
    assert!(early.line.contains(r#""ts":"1970-01-01T00:00:00.000Z""#));
    assert!(late.line.contains(r#""ts":"9999-12-31T23:59:59.999Z""#));
    assert_eq!(verify(log(&[late]).as_slice()).unwrap().entries, 1);
}

#[test]
fn fifty_mixed_entries_verify_to_the_last_head() {
    let (entries, log) = fifty();
    let summary = verify(log.as_slice()).unwrap();
    assert_eq!(summary.entries, N as u64);
    assert_eq!(summary.head, head_of(&entries[N - 1]));
    assert_eq!(summary.head.seq, N as u64);
}

#[test]
fn an_empty_log_verifies_at_genesis() {
    let summary = verify(&b""[..]).unwrap();
    assert_eq!(summary.entries, 0);
    assert_eq!(summary.head, ChainHead::genesis());
}

#[test]
fn every_single_byte_edit_of_a_line_fails_on_that_line() {
    let (_, log) = fifty();
    let original = lines(&log);
    let line = &original[K - 1];
    let len = line.len();
    // `,"hash":"` and the closing `"}` frame the hash; everything else is hashed or is the hash.
    let framing = |pos: usize| (len - 75..len - 66).contains(&pos) || pos >= len - 2;
    for pos in 0..len {
        for byte in [line[pos] ^ 0x01, 0xff] {
            let mut edited = original.clone();
            edited[K - 1][pos] = byte;
            let err = verify_err(&join(&edited));
            assert_eq!(err.line, K as u64, "byte {pos}");
            if framing(pos) {
                assert!(
                    matches!(err.problem, Problem::Malformed(_)),
                    "byte {pos}: {err}"
                );
            } else {
                assert!(
                    matches!(err.problem, Problem::HashMismatch),
                    "byte {pos}: {err}"
                );
            }
        }
    }
}

#[test]
fn whitespace_edits_inside_the_event_are_hash_mismatches() {
    let (_, log) = fifty();
    let original = lines(&log);
    let text = String::from_utf8(original[K - 1].clone()).unwrap();
    assert!(
        text.contains("leaked in ticket"),
        "line {K} is a token-revoked: {text}"
    );
    let edits = [
        // A tab for a space inside a string: same length, same meaning to a reader.
        text.replacen("leaked in", "leaked\tin", 1),
        // A space between tokens: the same JSON value, different bytes.
        text.replacen(r#""event":{"#, r#""event": {"#, 1),
        text.replacen(r#","reason""#, r#", "reason""#, 1),
    ];
    for edit in edits {
        assert_ne!(edit, text);
        let mut edited = original.clone();
        edited[K - 1] = edit.into_bytes();
        let err = verify_err(&join(&edited));
        assert_eq!(err.line, K as u64);
        assert!(matches!(err.problem, Problem::HashMismatch), "{err}");
    }
    // After the hash, whitespace is outside the hashed bytes and breaks the framing instead.
    let mut edited = original.clone();
    edited[K - 1].push(b' ');
    let err = verify_err(&join(&edited));
    assert_eq!(err.line, K as u64);
    assert!(matches!(err.problem, Problem::Malformed(_)), "{err}");
}

#[test]
fn deleting_a_line_is_a_sequence_gap_at_that_line() {
    // The line that moves up into place K is intact (its hash matches and its prev is right
    // for the line now missing), so the first thing wrong with it is its number: the seq is
    // checked before the link, and a gap names what is missing better than "broken link".
    let (_, log) = fifty();
    for k in [1, K, N - 1] {
        let mut edited = lines(&log);
        edited.remove(k - 1);
        let err = verify_err(&join(&edited));
        assert_eq!(err.line, k as u64);
        assert!(
            matches!(err.problem, Problem::SequenceGap { expected, found }
                if expected == k as u64 && found == k as u64 + 1),
            "{err}"
        );
    }
}

#[test]
fn swapping_two_lines_fails_at_the_first() {
    let (_, log) = fifty();
    let mut edited = lines(&log);
    edited.swap(K - 1, K);
    let err = verify_err(&join(&edited));
    assert_eq!(err.line, K as u64);
    assert!(
        matches!(err.problem, Problem::SequenceGap { expected, found }
            if expected == K as u64 && found == K as u64 + 1),
        "{err}"
    );
}

#[test]
fn a_line_resealed_with_a_valid_hash_breaks_the_next_link() {
    // Rewriting line K and recomputing its hash makes line K consistent on its own; line K+1
    // still names the old hash as its prev.
    let (entries, log) = fifty();
    let forged = seal(&head_of(&entries[K - 2]), at(K - 1), &one_of_each()[6]);
    let mut edited = lines(&log);
    edited[K - 1] = forged.line.into_bytes();
    let err = verify_err(&join(&edited));
    assert_eq!(err.line, K as u64 + 1);
    assert!(matches!(err.problem, Problem::BrokenLink), "{err}");
}

#[test]
fn a_first_line_not_chained_to_genesis_is_a_broken_link() {
    let elsewhere = ChainHead {
        seq: 0,
        hash: [7; 32],
    };
    let entry = seal(&elsewhere, at(0), &one_of_each()[0]);
    let err = verify_err(&log(&[entry]));
    assert_eq!(err.line, 1);
    assert!(matches!(err.problem, Problem::BrokenLink), "{err}");
}

#[test]
fn truncating_at_a_line_boundary_verifies_and_only_the_head_shows_it() {
    // Expected: the chain links each line to the one before, never to the ones after, so a
    // prefix is a valid chain. Whoever verifies must compare the head with the store's.
    let (entries, log) = fifty();
    let all = lines(&log);
    let stored_head = head_of(&entries[N - 1]);
    for n in 0..N {
        let summary = verify(join(&all[..n]).as_slice()).unwrap();
        assert_eq!(summary.entries, n as u64);
        let expected = if n == 0 {
            ChainHead::genesis()
        } else {
            head_of(&entries[n - 1])
        };
        assert_eq!(summary.head, expected);
        assert_ne!(summary.head, stored_head);
    }
}

#[test]
fn truncating_inside_a_line_is_malformed_at_that_line() {
    let (_, log) = fifty();
    let all = lines(&log);
    let mut cut = join(&all[..K - 1]);
    cut.extend_from_slice(&all[K - 1][..40]);
    let err = verify_err(&cut);
    assert_eq!(err.line, K as u64);
    assert!(
        matches!(&err.problem, Problem::Malformed(m) if m.contains("torn")),
        "{err}"
    );
    // A whole entry missing only its newline is torn too.
    let err = verify_err(&log[..log.len() - 1]);
    assert_eq!(err.line, N as u64);
    assert!(matches!(&err.problem, Problem::Malformed(m) if m.contains("torn")));
}

/// Yields its bytes, then fails.
struct FailAfter(Vec<u8>);

impl Read for FailAfter {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0.is_empty() {
            return Err(std::io::Error::other("disk on fire"));
        }
        let n = buf.len().min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0.drain(..n);
        Ok(n)
    }
}

#[test]
fn a_read_error_names_the_line_being_read() {
    let (_, log) = fifty();
    let three = join(&lines(&log)[..3]);
    let err = verify(BufReader::new(FailAfter(three))).unwrap_err();
    assert_eq!(err.line, 4);
    let Problem::Io(io) = &err.problem else {
        panic!("expected an I/O problem, got {err}");
    };
    assert_eq!(io.to_string(), "disk on fire");
    assert_eq!(err.to_string(), "line 4: cannot read the log");
    let source = std::error::Error::source(&err).unwrap();
    assert_eq!(source.to_string(), "disk on fire");
}

#[test]
fn the_error_names_the_line_and_the_problem() {
    let shown = |line, problem| VerifyError { line, problem }.to_string();
    assert_eq!(
        shown(7, Problem::HashMismatch),
        "line 7: hash mismatch (the line was edited)"
    );
    assert_eq!(
        shown(
            3,
            Problem::SequenceGap {
                expected: 3,
                found: 4
            }
        ),
        "line 3: sequence gap: expected seq 3, found 4"
    );
    assert_eq!(
        shown(2, Problem::BrokenLink),
        "line 2: broken link: prev is not the previous line's hash (a line before it was removed, edited or reordered)"
    );
}

#[test]
fn a_line_with_an_unknown_field_or_kind_is_malformed_even_with_a_valid_hash() {
    let valid = seal(&ChainHead::genesis(), at(0), &one_of_each()[6]).line;
    let body = &valid[..valid.len() - 75];
    for forged_body in [
        body.replacen(r#""seq":1,"#, r#""seq":1,"extra":0,"#, 1),
        body.replacen("rate-limited", "rate-unlimited", 1),
        body.replacen("2023-11-14T22:13:20.000Z", "yesterday", 1),
    ] {
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&forged_body));
        let line = format!(r#"{forged_body},"hash":"{hash}"}}"#);
        let err = verify_err(format!("{line}\n").as_bytes());
        assert_eq!(err.line, 1);
        assert!(matches!(err.problem, Problem::Malformed(_)), "{err}");
    }
}
