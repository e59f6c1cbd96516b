use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::leaf::tests::certificate;
use crate::testutil::TempDir;

fn files(n: u32) -> SvidFiles {
    SvidFiles {
        key_pem: format!("key {n}"),
        chain_pem: format!("cert {n}"),
        bundle_pem: "bundle".into(),
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn install_writes_a_version_the_data_link_and_stable_links() {
    let tmp = TempDir::new("svid-layout");
    let dir = SvidDir::new(tmp.path().join("id"));
    let version = dir.install("8a01", &files(1)).unwrap();
    assert_eq!(version, tmp.path().join("id/..svid-8a01"));
    assert_eq!(
        fs::read_link(dir.link(DATA)).unwrap(),
        Path::new("..svid-8a01")
    );
    for file in [KEY, CERT, BUNDLE] {
        assert_eq!(
            fs::read_link(dir.link(file)).unwrap(),
            Path::new("..data").join(file)
        );
    }
    // Through the stable names, as existing users read them.
    assert_eq!(fs::read_to_string(dir.link(KEY)).unwrap(), "key 1");
    assert_eq!(fs::read_to_string(dir.link(CERT)).unwrap(), "cert 1");
    assert_eq!(mode(&dir.link(KEY)), 0o600);
    assert_eq!(mode(&dir.link(CERT)), 0o644);
    assert_eq!(mode(&dir.link(BUNDLE)), 0o644);
    assert_eq!(mode(&version), 0o755, "exact, whatever the umask");
    assert_eq!(dir.current().unwrap(), files(1));
    assert_eq!(
        names(dir.root()),
        [
            "..data",
            "..svid-8a01",
            ".lock",
            "bundle.pem",
            "cert.pem",
            "key.pem"
        ]
    );
}

#[test]
fn a_new_version_replaces_the_old_one_whole() {
    let tmp = TempDir::new("svid-swap");
    let dir = SvidDir::new(tmp.path());
    dir.install("01", &files(1)).unwrap();
    dir.install("02", &files(2)).unwrap();
    assert_eq!(dir.current().unwrap(), files(2));
    assert_eq!(fs::read_to_string(dir.link(KEY)).unwrap(), "key 2");
    assert!(
        !tmp.path().join("..svid-01").exists(),
        "the old version is gone"
    );
    // The same version again changes nothing.
    dir.install("02", &files(2)).unwrap();
    assert_eq!(dir.current().unwrap(), files(2));
}

#[test]
fn an_empty_directory_is_not_joined() {
    let tmp = TempDir::new("svid-empty");
    let dir = SvidDir::new(tmp.path());
    assert!(matches!(dir.current(), Err(SvidDirError::NotJoined { .. })));
    assert!(matches!(
        dir.replace_bundle("b"),
        Err(SvidDirError::NotJoined { .. })
    ));
    let err = dir.current().unwrap_err().to_string();
    assert!(err.contains("join with `--out"), "{err}");
}

#[test]
fn plain_files_of_an_older_agent_become_links() {
    let tmp = TempDir::new("svid-migrate");
    for file in [KEY, CERT, BUNDLE] {
        fs::write(tmp.path().join(file), "old").unwrap();
    }
    let dir = SvidDir::new(tmp.path());
    dir.install("03", &files(3)).unwrap();
    for file in [KEY, CERT, BUNDLE] {
        assert!(fs::symlink_metadata(dir.link(file)).unwrap().is_symlink());
    }
    assert_eq!(fs::read_to_string(dir.link(CERT)).unwrap(), "cert 3");
}

#[test]
fn leftovers_of_a_crash_are_cleared_and_never_mistaken_for_the_new_version() {
    let tmp = TempDir::new("svid-crash");
    let dir = SvidDir::new(tmp.path());
    dir.install("01", &files(1)).unwrap();
    // A crash while writing version 02, and a temporary link left behind.
    fs::create_dir(tmp.path().join("..svid-02")).unwrap();
    fs::write(tmp.path().join("..svid-02/key.pem"), "torn").unwrap();
    symlink("..svid-02", tmp.path().join("..tmp-link-..data-dead")).unwrap();
    // Files of the user's are left alone.
    fs::write(tmp.path().join("notes.tmp-keep"), "mine").unwrap();
    dir.install("02", &files(2)).unwrap();
    assert_eq!(dir.current().unwrap(), files(2));
    assert_eq!(
        names(dir.root()),
        [
            "..data",
            "..svid-02",
            ".lock",
            "bundle.pem",
            "cert.pem",
            "key.pem",
            "notes.tmp-keep"
        ]
    );
}

#[test]
fn a_key_open_to_others_is_refused() {
    let tmp = TempDir::new("svid-open");
    let dir = SvidDir::new(tmp.path());
    let version = dir.install("01", &files(1)).unwrap();
    fs::set_permissions(version.join(KEY), fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        dir.current(),
        Err(SvidDirError::Secret(SecretError::TooOpen { .. }))
    ));
}

#[test]
fn versions_are_hex_serials_only() {
    let tmp = TempDir::new("svid-names");
    let dir = SvidDir::new(tmp.path());
    for bad in ["", "../x", "a/b", "..", "X Y"] {
        assert!(
            matches!(
                dir.install(bad, &files(1)),
                Err(SvidDirError::BadVersion(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn a_changed_bundle_becomes_a_version_with_the_same_key_and_certificate() {
    let tmp = TempDir::new("svid-bundle");
    let dir = SvidDir::new(tmp.path());
    let (cert, key) = certificate("spiffe://td.example/n", 1_700_000_000, 1_700_003_600);
    let first = SvidFiles {
        key_pem: key,
        chain_pem: cert,
        bundle_pem: "bundle A".into(),
    };
    dir.install("8a01", &first).unwrap();
    assert!(!dir.replace_bundle("bundle A").unwrap(), "unchanged");
    assert!(dir.replace_bundle("bundle B").unwrap());
    let now = dir.current().unwrap();
    assert_eq!(now.bundle_pem, "bundle B");
    assert_eq!(
        (&now.key_pem, &now.chain_pem),
        (&first.key_pem, &first.chain_pem)
    );
    let version = fs::read_link(dir.link(DATA)).unwrap();
    assert!(
        version.to_string_lossy().starts_with("..svid-8a01-bundle-"),
        "{version:?}"
    );
    assert!(!tmp.path().join("..svid-8a01").exists());
}

/// A reader resolving `..data` once never pairs a key of one version with a certificate of
/// another, however the installs interleave with its reads.
#[test]
fn readers_see_whole_versions_while_installs_swap_them() {
    let tmp = TempDir::new("svid-readers");
    let dir = SvidDir::new(tmp.path());
    dir.install("0", &files(0)).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (root, done) = (tmp.path().to_path_buf(), done.clone());
            std::thread::spawn(move || {
                let mut consistent = 0u32;
                // Until the writer is done, and at least one read got through.
                while !done.load(Ordering::Acquire) || consistent == 0 {
                    let Ok(version) = fs::canonicalize(root.join(DATA)) else {
                        continue;
                    };
                    // The version may be removed between resolving and reading: read again.
                    let (Ok(key), Ok(cert)) = (
                        fs::read_to_string(version.join(KEY)),
                        fs::read_to_string(version.join(CERT)),
                    ) else {
                        continue;
                    };
                    assert_eq!(key.replace("key", ""), cert.replace("cert", ""));
                    consistent += 1;
                }
                consistent
            })
        })
        .collect();
    for n in 1..=200 {
        dir.install(&format!("{n:x}"), &files(n)).unwrap();
    }
    done.store(true, Ordering::Release);
    for reader in readers {
        assert!(reader.join().unwrap() > 0);
    }
    assert_eq!(dir.current().unwrap(), files(200));
}
