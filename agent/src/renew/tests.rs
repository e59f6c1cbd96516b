use std::net::TcpListener;
use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::leaf::tests::{certificate, signed};
use crate::testutil::TempDir;
use crate::wire::PolicyVersion;

/// A clock that reads one fixed time.
#[derive(Debug)]
pub(crate) struct FixedClock(pub(crate) SystemTime);

impl FixedClock {
    pub(crate) fn real_now() -> Self {
        Self(SystemTime::now())
    }
}

impl Clock for FixedClock {
    fn now(&self) -> SystemTime {
        self.0
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn response(chain_pem: &str, serial: &str, bundle: &str) -> JoinResponse {
    let leaf = Leaf::parse(chain_pem.as_bytes()).unwrap();
    JoinResponse {
        spiffe_id: "spiffe://td.example/node/n1".into(),
        serial: serial.into(),
        not_before: leaf.not_before,
        not_after: leaf.not_after,
        renew_after: leaf.not_after - 60,
        certificate_chain: chain_pem.into(),
        bundle: bundle.into(),
        policy: PolicyVersion {
            name: "cluster-role".into(),
            version: "1.0.0".into(),
        },
    }
}

/// An identity directory as a join leaves it, with an SVID valid from `from` to `until`
/// seconds around now, whose gateway is a listening socket that nobody answers: the test can
/// tell whether anything connected.
pub(crate) fn joined_dir(tmp: &TempDir, from: i64, until: i64) -> (SvidDir, TcpListener) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let now = unix_now();
    let (cert, key) = certificate("spiffe://td.example/node/n1", now + from, now + until);
    let dir = SvidDir::new(tmp.path().join("identity"));
    let files = SvidFiles {
        key_pem: key,
        bundle_pem: cert.clone(),
        chain_pem: cert.clone(),
    };
    dir.install("8a01", &files).unwrap();
    let gateway = format!("https://{}", listener.local_addr().unwrap());
    AgentRecord::new(&gateway, "n1", &response(&cert, "8a01", &cert))
        .store(dir.root())
        .unwrap();
    (dir, listener)
}

fn options(dir: SvidDir) -> RenewOptions {
    RenewOptions {
        dir,
        ca_bundle: None,
        backoff: Backoff::default(),
        max_attempts: Some(3),
    }
}

#[tokio::test]
async fn an_expired_certificate_needs_a_rejoin_and_nothing_is_sent() {
    let tmp = TempDir::new("renew-expired");
    let (dir, listener) = joined_dir(&tmp, -7200, -1);
    let err = renew(&options(dir), &FixedClock::real_now())
        .await
        .unwrap_err();
    assert!(matches!(err, RenewError::Expired { .. }), "{err}");
    assert!(err.needs_rejoin());
    let message = err.to_string();
    assert!(
        message.starts_with("re-join needed: the certificate in "),
        "{message}"
    );
    assert!(message.contains("expired at"), "{message}");
    assert_eq!(
        listener.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "no connection was made"
    );
}

#[tokio::test]
async fn a_directory_without_a_join_is_a_setup_error() {
    let tmp = TempDir::new("renew-empty");
    let err = renew(&options(SvidDir::new(tmp.path())), &FixedClock::real_now())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RenewError::Record(RecordError::Missing { .. })),
        "{err}"
    );
    assert!(!err.needs_rejoin());
}

#[tokio::test]
async fn a_key_that_does_not_match_the_certificate_is_never_presented() {
    let tmp = TempDir::new("renew-mismatch");
    let (dir, listener) = joined_dir(&tmp, -60, 3600);
    let (other_cert, _) = certificate(
        "spiffe://td.example/node/n1",
        unix_now() - 60,
        unix_now() + 3600,
    );
    let mut files = dir.current().unwrap();
    files.chain_pem = other_cert;
    dir.install("8a02", &files).unwrap();
    let err = renew(&options(dir), &FixedClock::real_now())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RenewError::Current {
                source: LeafError::KeyMismatch { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(listener.accept().is_err());
}

/// The gateway is down (nothing listens): every attempt fails in transport, the backoff
/// (paused time, so no real waiting) runs between them, and the attempts run out.
#[tokio::test(start_paused = true)]
async fn transport_failures_are_retried_until_the_attempts_run_out() {
    let tmp = TempDir::new("renew-down");
    let (dir, listener) = joined_dir(&tmp, -60, 3600);
    drop(listener);
    let err = renew(&options(dir), &FixedClock::real_now())
        .await
        .unwrap_err();
    match &err {
        RenewError::GaveUp { attempts: 3, last } => {
            assert!(last.starts_with("cannot reach the gateway"), "{last}")
        }
        other => panic!("{other}"),
    }
    assert!(!err.needs_rejoin());
}

#[test]
fn a_renewed_svid_is_installed_with_its_record() {
    let tmp = TempDir::new("renew-install");
    let (dir, _listener) = joined_dir(&tmp, -60, 3600);
    let current = Current::load(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let now = unix_now();
    let cert = signed(&key, None, &[0x7f, 0x02], now - 30, now + 7200);
    let (bundle, _) = certificate("spiffe://td.example/ca", now, now + 1);
    let renewed = install(
        &options(dir.clone()),
        &current,
        &key,
        response(&cert, "7f02", &bundle),
    )
    .unwrap();
    assert_eq!(renewed.serial, "7f02");
    let now_current = Current::load(&dir).unwrap();
    assert_eq!(now_current.leaf.serial, "7f02");
    assert_eq!(now_current.files.key_pem, key.serialize_pem());
    assert_eq!(now_current.files.bundle_pem, bundle);
    assert_eq!(now_current.record.serial, "7f02");
    assert_eq!(now_current.record.gateway, current.record.gateway);
    assert_eq!(now_current.record.node_name, "n1");
    assert_eq!(
        now_current.hint(),
        Some(UNIX_EPOCH + Duration::from_secs(now_current.leaf.not_after - 60))
    );
    assert!(!dir.root().join("..svid-8a01").exists());
}

#[test]
fn a_certificate_for_another_key_is_refused_and_nothing_changes() {
    let tmp = TempDir::new("renew-wrong-key");
    let (dir, _listener) = joined_dir(&tmp, -60, 3600);
    let current = Current::load(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let (foreign, _) = certificate("spiffe://td.example/node/n1", unix_now(), unix_now() + 60);
    let err = install(
        &options(dir.clone()),
        &current,
        &key,
        response(&foreign, "8a01", ""),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            RenewError::BadCertificate(LeafError::KeyMismatch { .. })
        ),
        "{err}"
    );
    assert_eq!(dir.current().unwrap(), current.files);
}

#[test]
fn an_answer_without_a_bundle_keeps_the_one_we_have() {
    let tmp = TempDir::new("renew-no-bundle");
    let (dir, _listener) = joined_dir(&tmp, -60, 3600);
    let current = Current::load(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = signed(&key, None, &[0x03], unix_now() - 30, unix_now() + 60);
    install(
        &options(dir.clone()),
        &current,
        &key,
        response(&cert, "03", ""),
    )
    .unwrap();
    assert_eq!(dir.current().unwrap().bundle_pem, current.files.bundle_pem);
}
