//! Rotation against real files in a fresh directory: the steps in order and out of order, what
//! they write, a restart on the written state, and state files that must stop the start.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::*;
use crate::identity::{MintRequest, SpiffeId, verify_csr};

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "omnirelay-rotation-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(path.join("ca")).unwrap();
        Self(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn td() -> TrustDomain {
    TrustDomain::parse("rotation.example").unwrap()
}

/// A state directory with a configured CA, as `omnirelay init` leaves it.
fn configured(name: &str) -> (Dir, IdentityConfig) {
    let dir = Dir::new(name);
    let (cert, key) = Ca::generate(&td(), Duration::from_secs(86_400), SystemTime::now()).unwrap();
    std::fs::write(dir.0.join("ca/ca.pem"), cert).unwrap();
    secrets::write(&dir.0.join("ca/ca.key"), key.as_bytes()).unwrap();
    let config = IdentityConfig {
        ca_cert: dir.0.join("ca/ca.pem"),
        ca_key: dir.0.join("ca/ca.key"),
        rotation_dir: dir.0.join("ca"),
        ..IdentityConfig::defaults()
    };
    (dir, config)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn fingerprints(set: &CaSet) -> Vec<(String, CaState)> {
    set.cas()
        .iter()
        .map(|c| (c.ca.fingerprint().to_string(), c.state))
        .collect()
}

/// What the set publishes: the PEM bundle's certificates, the JWKS keys' `x5c` and sequence,
/// and the roots, all the same CAs in the same order.
fn published(set: &CaSet) -> Vec<Vec<u8>> {
    let pem: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(set.bundle_pem())
        .map(|c| c.unwrap().to_vec())
        .collect();
    let jwks: serde_json::Value = serde_json::from_slice(set.spiffe_bundle()).unwrap();
    assert_eq!(jwks["spiffe_sequence"], set.sequence());
    let x5c: Vec<Vec<u8>> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(k["x5c"][0].as_str().unwrap())
                .unwrap()
        })
        .collect();
    let roots: Vec<Vec<u8>> = set.roots().iter().map(|r| r.to_vec()).collect();
    assert_eq!(pem, x5c);
    assert_eq!(pem, roots);
    pem
}

/// A leaf of `ca` for a throwaway key.
fn leaf(ca: &Ca) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let pem = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let csr = verify_csr(&pem, 16 << 10).unwrap();
    let id = SpiffeId::parse("spiffe://rotation.example/node/n1").unwrap();
    ca.mint(&MintRequest {
        csr: &csr,
        spiffe_id: &id,
        dns_sans: &[],
        ttl: Duration::from_secs(600),
        now: SystemTime::now(),
    })
    .unwrap()
    .cert_der
}

async fn step(rotation: &Rotation, name: &str) -> Result<Arc<CaSet>, RotationError> {
    let change = rotation.begin().await;
    let plan = match name {
        "prepare" => change.prepare(&td(), None, SystemTime::now()),
        "activate" => change.activate(),
        "retire" => change.retire(),
        other => panic!("no step {other}"),
    }?;
    Ok(change.commit(plan)?.install())
}

#[tokio::test]
async fn a_gateway_that_never_rotated_signs_with_its_configured_ca_at_sequence_one() {
    let (dir, config) = configured("never");
    let rotation = Rotation::load(&config).unwrap();
    let set = rotation.current();
    assert_eq!(set.sequence(), 1);
    assert_eq!(set.cas().len(), 1);
    assert_eq!(set.cas()[0].state, CaState::Active);
    let configured = std::fs::read(&config.ca_cert).unwrap();
    assert_eq!(set.bundle_pem().as_ref(), configured.as_slice());
    assert_eq!(published(&set).len(), 1);
    assert_eq!(trust_bundle(&config).unwrap(), configured);
    assert!(!dir.0.join("ca/rotation.json").exists());
}

#[tokio::test]
async fn prepare_activate_retire_move_the_cas_through_the_bundle_each_bumping_the_sequence() {
    let (dir, config) = configured("cycle");
    let rotation = Rotation::load(&config).unwrap();
    let first = rotation.current().active().clone();
    let old_leaf = leaf(&first);

    // prepare: the next CA is published, the first one still signs.
    let set = step(&rotation, "prepare").await.unwrap();
    assert_eq!(set.sequence(), 2);
    assert_eq!(set.active().fingerprint(), first.fingerprint());
    let next = set.cas()[1].ca.clone();
    assert_eq!(
        fingerprints(&set),
        [
            (first.fingerprint().to_string(), CaState::Active),
            (next.fingerprint().to_string(), CaState::Prepared)
        ]
    );
    assert_eq!(published(&set), [first.cert_der(), next.cert_der()]);
    let stem = format!("ca/ca-{}", &next.fingerprint()[..16]);
    assert_eq!(mode(&dir.0.join(format!("{stem}.key"))), 0o600);
    assert_eq!(mode(&dir.0.join(format!("{stem}.pem"))), 0o644);
    assert_eq!(mode(&dir.0.join("ca/rotation.json")), 0o600);
    assert_ne!(
        parse_subject(first.cert_der()),
        parse_subject(next.cert_der()),
        "CAs sharing a bundle have distinct subjects"
    );
    assert_eq!(
        rotation.current().sequence(),
        2,
        "install put the set in force"
    );

    // activate: the next CA signs; leaves of either verify against the set.
    let set = step(&rotation, "activate").await.unwrap();
    assert_eq!(set.sequence(), 3);
    assert_eq!(set.active().fingerprint(), next.fingerprint());
    let new_leaf = leaf(set.active());
    let issuer = |set: &CaSet, der: &[u8]| {
        set.issuer_of(der)
            .map(|c| (c.ca.fingerprint().to_string(), c.state))
    };
    assert_eq!(
        issuer(&set, &old_leaf),
        Some((first.fingerprint().to_string(), CaState::Previous))
    );
    assert_eq!(
        issuer(&set, &new_leaf),
        Some((next.fingerprint().to_string(), CaState::Active))
    );

    // A restart reads the same set back, and the CLI's bundle is the same CAs.
    let reloaded = Rotation::load(&config).unwrap().current();
    assert_eq!(fingerprints(&reloaded), fingerprints(&set));
    assert_eq!(reloaded.sequence(), 3);
    assert_eq!(trust_bundle(&config).unwrap(), set.bundle_pem().to_vec());

    // retire: the first CA leaves the bundle; its leaves no longer verify.
    let set = step(&rotation, "retire").await.unwrap();
    assert_eq!(set.sequence(), 4);
    assert_eq!(
        fingerprints(&set),
        [(next.fingerprint().to_string(), CaState::Active)]
    );
    assert_eq!(issuer(&set, &old_leaf), None);
    assert!(issuer(&set, &new_leaf).is_some());
    let status = rotation.begin().await.status(&new_leaf);
    let states: Vec<_> = status
        .cas
        .iter()
        .map(|c| (c.state, c.serving, c.not_after))
        .collect();
    assert_eq!(
        states,
        [
            (CaState::Retired, false, unix(first.not_after())),
            (CaState::Active, true, unix(next.not_after()))
        ]
    );
    // Retired CAs stay out after a restart, even though the configured files are still there.
    let reloaded = Rotation::load(&config).unwrap().current();
    assert_eq!(fingerprints(&reloaded), fingerprints(&set));
    assert_eq!(trust_bundle(&config).unwrap(), set.bundle_pem().to_vec());

    // And the next rotation can start.
    assert_eq!(step(&rotation, "prepare").await.unwrap().sequence(), 5);
}

#[tokio::test]
async fn steps_out_of_order_are_refused_and_change_nothing() {
    let (dir, config) = configured("order");
    let rotation = Rotation::load(&config).unwrap();
    assert!(matches!(
        step(&rotation, "activate").await,
        Err(RotationError::NothingPrepared)
    ));
    assert!(matches!(
        step(&rotation, "retire").await,
        Err(RotationError::NothingToRetire)
    ));
    assert!(!dir.0.join("ca/rotation.json").exists());
    let prepared = step(&rotation, "prepare").await.unwrap();
    let next = prepared.cas()[1].ca.fingerprint().to_string();
    match step(&rotation, "prepare").await {
        Err(e @ RotationError::AlreadyPrepared { .. }) => {
            assert!(e.to_string().contains(&next), "{e}");
            assert!(e.is_refusal());
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        step(&rotation, "retire").await,
        Err(RotationError::NothingToRetire)
    ));
    step(&rotation, "activate").await.unwrap();
    let first = rotation.current().cas()[0].ca.fingerprint().to_string();
    match step(&rotation, "prepare").await {
        Err(RotationError::PreviousNotRetired { fingerprint }) => assert_eq!(fingerprint, first),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        step(&rotation, "activate").await,
        Err(RotationError::NothingPrepared)
    ));
    assert_eq!(rotation.current().sequence(), 3);
}

#[tokio::test]
async fn an_undone_change_leaves_the_state_as_it_was() {
    let (dir, config) = configured("undo");
    let rotation = Rotation::load(&config).unwrap();
    let state = dir.0.join("ca/rotation.json");

    // The first change of a gateway that never rotated: undoing it removes the file again.
    let change = rotation.begin().await;
    let plan = change.prepare(&td(), None, SystemTime::now()).unwrap();
    let committed = change.commit(plan).unwrap();
    assert!(state.exists());
    committed.undo().unwrap();
    assert!(!state.exists());
    assert_eq!(rotation.current().sequence(), 1);
    assert_eq!(Rotation::load(&config).unwrap().current().sequence(), 1);

    // A later change: the file from before is written back.
    step(&rotation, "prepare").await.unwrap();
    let before = std::fs::read(&state).unwrap();
    let change = rotation.begin().await;
    let plan = change.activate().unwrap();
    change.commit(plan).unwrap().undo().unwrap();
    assert_eq!(std::fs::read(&state).unwrap(), before);
    assert_eq!(rotation.current().sequence(), 2);
    assert_eq!(rotation.current().cas()[1].state, CaState::Prepared);
}

#[tokio::test]
async fn a_state_file_that_is_open_malformed_or_contradicts_its_files_stops_the_load() {
    let (dir, config) = configured("broken");
    let rotation = Rotation::load(&config).unwrap();
    step(&rotation, "prepare").await.unwrap();
    let state = dir.0.join("ca/rotation.json");
    let good = std::fs::read_to_string(&state).unwrap();
    let next = rotation.current().cas()[1].ca.fingerprint().to_string();
    let first = rotation.current().cas()[0].ca.fingerprint().to_string();
    let edits: Vec<(&str, String)> = vec![
        ("SHA-256", good.replacen(&next, &"0".repeat(64), 1)),
        ("2 active CAs", good.replace("\"prepared\"", "\"active\"")),
        ("besides the active one", {
            let extra = format!(
                "{{\"fingerprint\": \"{}\", \"state\": \"previous\", \"not_after\": 1}}",
                "1".repeat(64)
            );
            good.replacen("\"cas\": [", &format!("\"cas\": [{extra}, "), 1)
        }),
        ("file names", good.replace("\"ca-", "\"../ca-")),
        ("format", good.replace("\"format\": 1", "\"format\": 2")),
        (
            "unknown field",
            good.replace("\"sequence\"", "\"colour\": 1, \"sequence\""),
        ),
        ("listed twice", good.replace(&next, &first)),
    ];
    for (expected, text) in edits {
        assert_ne!(text, good, "{expected}: the edit changed nothing");
        secrets::write(&state, text.as_bytes()).unwrap();
        match Rotation::load(&config) {
            Err(e) => assert!(e.to_string().contains(expected), "{expected}: {e}"),
            Ok(_) => panic!("{expected}: the state loaded"),
        }
    }
    secrets::write(&state, good.as_bytes()).unwrap();
    Rotation::load(&config).unwrap();

    // Files others can read are refused: the state file and a generated CA key.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Rotation::load(&config).unwrap_err();
    assert!(e.to_string().contains("chmod 600"), "{e}");
    assert!(trust_bundle(&config).is_err());
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = dir.0.join(format!("ca/ca-{}.key", &next[..16]));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = Rotation::load(&config).unwrap_err();
    assert!(e.to_string().contains(&key.display().to_string()), "{e}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A configured CA replaced behind the rotation's back.
    let (cert, ca_key) = Ca::generate(&td(), Duration::from_secs(600), SystemTime::now()).unwrap();
    std::fs::write(&config.ca_cert, cert).unwrap();
    secrets::write(&config.ca_key, ca_key.as_bytes()).unwrap();
    let e = Rotation::load(&config).unwrap_err();
    assert!(e.to_string().contains("inconsistent"), "{e}");
}

fn parse_subject(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .unwrap()
        .1
        .subject()
        .to_string()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}
