use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::*;

fn url(text: &str) -> RemoteUrl {
    RemoteUrl::parse(text).unwrap()
}

fn keys(problems: &[Problem]) -> Vec<&'static str> {
    problems.iter().map(|p| p.key).collect()
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "omnirelay-remote-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn plaintext_is_refused_unless_allowed_and_never_carries_a_credential() {
    let none = TransportConfig::default();
    assert_eq!(keys(&none.check(&url("http://git.example/p.git"))), ["git"]);
    assert_eq!(keys(&none.check(&url("git://git.example/p.git"))), ["git"]);
    assert!(none.check(&url("https://git.example/p.git")).is_empty());
    assert!(none.check(&url("/srv/policy.git")).is_empty());
    let insecure = TransportConfig {
        allow_insecure_transport: true,
        ..TransportConfig::default()
    };
    assert!(insecure.check(&url("http://git.example/p.git")).is_empty());
    let with_credential = TransportConfig {
        credential_file: Some("cred".into()),
        ..insecure
    };
    let problems = with_credential.check(&url("http://git.example/p.git"));
    assert_eq!(keys(&problems), ["credential_file"]);
    assert!(problems[0].message.contains("never sent over plaintext"));
}

#[test]
fn ssh_needs_a_key_and_known_hosts_and_settings_of_other_transports_are_refused() {
    let none = TransportConfig::default();
    assert_eq!(
        keys(&none.check(&url("git@git.example:p.git"))),
        ["ssh_key", "known_hosts"]
    );
    let ssh = TransportConfig {
        ssh_key: Some("id".into()),
        known_hosts: Some("known_hosts".into()),
        ..TransportConfig::default()
    };
    assert!(
        ssh.check(&url("ssh://git@git.example:2222/p.git"))
            .is_empty()
    );
    assert_eq!(
        keys(&ssh.check(&url("https://git.example/p.git"))),
        ["ssh_key", "known_hosts"]
    );
    let https = TransportConfig {
        ca_file: Some("ca.pem".into()),
        credential_file: Some("cred".into()),
        ..TransportConfig::default()
    };
    assert_eq!(
        keys(&https.check(&url("/srv/policy.git"))),
        ["ca_file", "credential_file"]
    );
}

#[test]
fn credential_files_must_be_private_and_well_formed_and_are_never_quoted() {
    let dir = temp("credential");
    let file = dir.join("credential");
    let remote = |kind| Remote {
        url: url("https://git.example/p.git"),
        transport: TransportConfig {
            credential_file: Some(file.clone()),
            credential_kind: kind,
            ca_file: Some(dir.join("ca.pem")),
            ..TransportConfig::default()
        },
    };
    write(&file, "hunter2-token\n", 0o644);
    let open = Session::open(&remote(CredentialKind::Bearer)).unwrap_err();
    assert!(matches!(open, TransportError::File(_)), "{open}");
    write(&file, "hunter2-token\n", 0o600);
    let basic = Session::open(&remote(CredentialKind::Basic)).unwrap_err();
    assert!(
        matches!(basic, TransportError::Credential { .. }),
        "{basic}"
    );
    for e in [open.to_string(), basic.to_string()] {
        assert!(!e.contains("hunter2"), "{e}");
    }
    // Well-formed but no CA file yet: the CA is the problem, and the Debug hides the header.
    write(&file, "ci:hunter2\n", 0o600);
    let no_ca = Session::open(&remote(CredentialKind::Basic)).unwrap_err();
    assert!(no_ca.to_string().contains("ca.pem"), "{no_ca}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unreachable_https_remote_is_a_typed_connect_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = temp("connect");
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    write(&dir.join("ca.pem"), &ca.cert.pem(), 0o644);
    let remote = Remote {
        url: url(&format!("https://127.0.0.1:{port}/p.git")),
        transport: TransportConfig {
            ca_file: Some(dir.join("ca.pem")),
            ..TransportConfig::default()
        },
    };
    let repo = git2::Repository::init_bare(dir.join("mirror.git")).unwrap();
    let error = remote
        .run(|u| {
            repo.remote_anonymous(u)?
                .fetch(&["+refs/heads/*:refs/heads/*"], None, None)
        })
        .unwrap_err();
    assert!(
        matches!(
            &error,
            RemoteError::Transport {
                source: TransportError::Connect { .. },
                ..
            }
        ),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plaintext_is_refused_before_anything_is_contacted() {
    let remote = Remote {
        url: url("http://127.0.0.1:9/p.git"),
        transport: TransportConfig::default(),
    };
    let error = remote.run(|_| Ok(())).unwrap_err();
    assert!(
        error.to_string().contains("plaintext") && error.to_string().contains("refused"),
        "{error}"
    );
}
