//! `allowed_signers` options, against signatures `ssh-keygen -Y sign` made.

use proptest::prelude::*;

use super::super::tests::{MESSAGE, NOW, ssh_keygen_signature};
use super::*;

/// 2020-01-01 and 2030-01-01, UTC.
const Y2020: i64 = 1_577_836_800;
const Y2030: i64 = 1_893_456_000;

fn signers(text: &str) -> AllowedSigners {
    AllowedSigners::parse(text).unwrap()
}

#[test]
fn a_signer_past_its_valid_before_is_refused() {
    let (sig, public) = ssh_keygen_signature("expired", "git");
    let s = signers(&format!("ci valid-before=\"20200101Z\" {public}"));
    assert_eq!(
        s.verify(&sig, MESSAGE, &[NOW]),
        Err(SigError::Expired {
            principals: "ci".into(),
            valid_before: Y2020,
            at: NOW,
        })
    );
    // The boundary is inclusive, as in ssh-keygen: valid up to and at that second.
    assert_eq!(s.verify(&sig, MESSAGE, &[Y2020]), Ok("ci"));
}

#[test]
fn a_signer_before_its_valid_after_is_refused() {
    let (sig, public) = ssh_keygen_signature("early", "git");
    let s = signers(&format!("ci valid-after=\"20300101000000Z\" {public}"));
    assert_eq!(
        s.verify(&sig, MESSAGE, &[NOW]),
        Err(SigError::NotYetValid {
            principals: "ci".into(),
            valid_after: Y2030,
            at: NOW,
        })
    );
}

#[test]
fn every_time_given_must_be_inside_the_window() {
    let (sig, public) = ssh_keygen_signature("both", "git");
    let s = signers(&format!(
        "ci valid-after=\"202001010000Z\",valid-before=\"20300101Z\" {public}"
    ));
    assert_eq!(s.verify(&sig, MESSAGE, &[NOW]), Ok("ci"));
    // A commit dated inside the window, checked after the key retired.
    assert!(matches!(
        s.verify(&sig, MESSAGE, &[NOW, Y2030 + 1]),
        Err(SigError::Expired { .. })
    ));
}

#[test]
fn a_line_that_does_not_allow_the_git_namespace_is_refused() {
    let (sig, public) = ssh_keygen_signature("files-only", "git");
    let s = signers(&format!("ci namespaces=\"file\" {public}"));
    assert_eq!(
        s.verify(&sig, MESSAGE, &[NOW]),
        Err(SigError::NamespaceNotAllowed {
            principals: "ci".into(),
            namespace: "git".into(),
        })
    );
    // Pattern lists as OpenSSH reads them: a glob allows, a negation refuses.
    assert_eq!(
        signers(&format!("ci namespaces=\"file,g?t\" {public}")).verify(&sig, MESSAGE, &[NOW]),
        Ok("ci")
    );
    assert!(matches!(
        signers(&format!("ci namespaces=\"*,!git\" {public}")).verify(&sig, MESSAGE, &[NOW]),
        Err(SigError::NamespaceNotAllowed { .. })
    ));
}

#[test]
fn any_line_for_the_key_that_allows_the_signature_accepts_it() {
    let (sig, public) = ssh_keygen_signature("two-lines", "git");
    let s = signers(&format!(
        "old VALID-BEFORE=\"20200101Z\" {public}\nnew Valid-After=\"20200101Z\" {public}\n"
    ));
    assert_eq!(s.verify(&sig, MESSAGE, &[NOW]), Ok("new"));
}

#[test]
fn cert_authority_is_a_parse_error_naming_line_and_option() {
    let (_, public) = ssh_keygen_signature("ca", "git");
    let err = AllowedSigners::parse(&format!(
        "# signers\nci namespaces=\"git\",cert-authority {public}\n"
    ))
    .unwrap_err();
    assert_eq!(err, SigError::CertAuthority { line: 2 });
    let text = err.to_string();
    assert!(
        text.contains("line 2") && text.contains("cert-authority"),
        "{text}"
    );
}

#[test]
fn an_unknown_option_is_a_parse_error_naming_line_and_option() {
    let (_, public) = ssh_keygen_signature("unknown", "git");
    let err = AllowedSigners::parse(&format!(
        "ci {public}\n\nci no-touch-required,namespaces=\"git\" {public}\n"
    ))
    .unwrap_err();
    assert_eq!(
        err,
        SigError::UnknownOption {
            line: 3,
            option: "no-touch-required".into(),
        }
    );
    assert!(err.to_string().contains("line 3"), "{err}");
    assert!(err.to_string().contains("no-touch-required"), "{err}");
}

#[test]
fn malformed_options_and_times_are_parse_errors() {
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOVoZEKbPfYWGjNvHhmyqMVj6QVMY9a8sqzN4PXI3DnQ";
    for options in [
        "valid-before=20300101Z",                               // not quoted
        "valid-before=\"20300101\"",                            // no zone
        "valid-before=\"2030010\"",                             // wrong length
        "valid-before=\"20301301Z\"",                           // month 13
        "valid-before=\"20300101Z",                             // no closing quote
        "valid-after=\"20300101Z\",valid-before=\"20200101Z\"", // empty window
        "namespaces=\"git\",namespaces=\"file\"",               // twice
        "namespaces=\"git\",",                                  // trailing comma
        "namespaces=\"git\"x",                                  // junk after a value
    ] {
        let line = format!("ci {options} {key}");
        assert!(
            matches!(
                AllowedSigners::parse(&line),
                Err(SigError::AllowedSigners { line: 1, .. })
            ),
            "{line}"
        );
    }
    assert!(AllowedSigners::parse(&format!("ci valid-before=\"20300101UTC\" {key}")).is_ok());
    assert!(AllowedSigners::parse(&format!("\"ci, cd\" namespaces=\"a b,git\" {key} c")).is_ok());
}

#[test]
fn times_read_as_ssh_keygen_reads_them() {
    assert_eq!(parse_time("20200101Z"), Ok(Y2020));
    assert_eq!(parse_time("202001010001Z"), Ok(Y2020 + 60));
    assert_eq!(parse_time("20200101000001z"), Ok(Y2020 + 1));
    assert!(parse_time("20200230Z").is_err());
    assert!(parse_time("20200101246000Z").is_err());
}

/// What `parse` may refuse with: only the parse variants, never a verification outcome.
fn is_parse_error(e: &SigError) -> bool {
    matches!(
        e,
        SigError::AllowedSigners { .. }
            | SigError::CertAuthority { .. }
            | SigError::UnknownOption { .. }
    )
}

proptest! {
    #[test]
    fn parse_never_panics_on_arbitrary_text(text in any::<String>()) {
        if let Err(e) = AllowedSigners::parse(&text) {
            prop_assert!(is_parse_error(&e), "{e:?}");
        }
    }

    #[test]
    fn parse_never_panics_on_near_miss_lines(
        principal in "[a-z\"@,* ]{0,8}",
        options in "[a-zA-Z\"=,!*?\\\\ 0-9-]{0,60}",
        key in "(ssh-ed25519|ssh-rsa|sk-x|x)? ?[A-Za-z0-9+/=]{0,70}",
    ) {
        let line = format!("{principal} {options} {key}\n");
        if let Err(e) = AllowedSigners::parse(&line) {
            prop_assert!(is_parse_error(&e), "{e:?}");
            let quoted = matches!(&e, SigError::UnknownOption { option, .. } if option.chars().count() > MAX_QUOTED);
            prop_assert!(!quoted);
        }
    }

    #[test]
    fn globs_never_panic(value in "[a-z*?]{0,12}", pattern in "[a-z*?!,]{0,12}") {
        let _ = pattern_list_matches(&value, &pattern);
    }
}
