use super::*;
use crate::Backoff;
use crate::renew::tests::{FixedClock, joined_dir};
use crate::testutil::TempDir;

fn env(dir: &Path) -> HookEnv<'_> {
    HookEnv {
        dir,
        spiffe_id: "spiffe://td.example/node/n1",
        serial: "8a01",
        event: "renewed",
    }
}

#[tokio::test]
async fn the_hook_runs_in_a_shell_with_the_svids_facts() {
    let tmp = TempDir::new("hook");
    let out = tmp.path().join("out");
    let command = format!(
        "printf '%s %s %s %s' \"$OMNIRELAY_SVID_DIR\" \"$OMNIRELAY_SPIFFE_ID\" \
         \"$OMNIRELAY_SERIAL\" \"$OMNIRELAY_EVENT\" > {}",
        out.display()
    );
    let outcome = run_hook(&command, &env(tmp.path()), HOOK_TIMEOUT).await;
    assert_eq!(outcome, HookOutcome::Succeeded);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        format!(
            "{} spiffe://td.example/node/n1 8a01 renewed",
            tmp.path().display()
        )
    );
}

#[tokio::test]
async fn a_failing_hook_is_reported_not_fatal() {
    let tmp = TempDir::new("hook-fails");
    let outcome = run_hook("exit 7", &env(tmp.path()), HOOK_TIMEOUT).await;
    assert!(
        matches!(&outcome, HookOutcome::Failed(status) if status.contains('7')),
        "{outcome:?}"
    );
}

/// Paused time: the timeout elapses as soon as the runtime has nothing else to do.
#[tokio::test(start_paused = true)]
async fn a_hook_that_hangs_is_killed_at_the_timeout() {
    let tmp = TempDir::new("hook-hangs");
    let outcome = run_hook("exec sleep 600", &env(tmp.path()), Duration::from_secs(5)).await;
    assert_eq!(outcome, HookOutcome::TimedOut);
}

#[tokio::test]
async fn an_expired_identity_stops_the_daemon_without_contacting_anyone() {
    let tmp = TempDir::new("daemon-expired");
    let (dir, listener) = joined_dir(&tmp, -7200, -3600);
    let options = DaemonOptions {
        renew: RenewOptions {
            dir,
            ca_bundle: None,
            backoff: Backoff::default(),
            max_attempts: None,
        },
        policy: RenewPolicy::default(),
        on_renew: None,
        bundle_refresh: Duration::from_secs(300),
        follow_revocations: None,
    };
    let err = match run(options, Arc::new(FixedClock::real_now())).await {
        Err(e) => e,
        Ok(never) => match never {},
    };
    assert!(err.needs_rejoin(), "{err}");
    assert!(err.to_string().starts_with("re-join needed: "), "{err}");
    assert_eq!(
        listener.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "no connection was made"
    );
}
