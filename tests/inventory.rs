//! `omnirelay identities list` (issue #8, inventory): the real CLI against the real gateway's
//! admin API, every filter narrowing to exactly the identities it names.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::collections::BTreeSet;

use gateway::api::wire::IssueTokenRequest;
use gateway::store::{IdentityState, IssuedIdentity};
use omnirelay_e2e::*;

/// `identities list --output json` with `args`, parsed.
fn list(gw: &Gateway, args: &[&str]) -> Vec<IssuedIdentity> {
    let config = gw.config_naming_the_admin_port();
    let mut all = vec![
        "identities",
        "list",
        "--config",
        config.as_str(),
        "--output",
        "json",
    ];
    all.extend_from_slice(args);
    let out = omnirelay(&all).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn serials(listed: &[IssuedIdentity]) -> BTreeSet<String> {
    listed.iter().map(|i| i.serial.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_filter_narrows_the_inventory_to_what_it_names() {
    let gw = Gateway::start("inventory");
    let eu = gw.issue_token("edge-eu", "dispatcher", 3).await;
    let us = gw.issue_token("edge-us", "relay", 1).await;
    let a = join_ok(&gw, &eu.token, "inv-a").await;
    let b = join_ok(&gw, &eu.token, "inv-b").await;
    let c = join_ok(&gw, &us.token, "inv-c").await;
    // inv-a re-provisioned through a superseding token: its first identity is revoked.
    let rescue = gw
        .issue_token_with(IssueTokenRequest {
            cluster: "edge-eu".into(),
            role: "dispatcher".into(),
            ttl_seconds: 900,
            max_uses: 1,
            issued_by: None,
            node: Some("inv-a".into()),
            supersede: true,
        })
        .await;
    let a2 = join_ok(&gw, &rescue.token, "inv-a").await;

    let everything = list(&gw, &[]);
    assert_eq!(
        serials(&everything),
        BTreeSet::from([
            a.serial.clone(),
            b.serial.clone(),
            c.serial.clone(),
            a2.serial.clone()
        ])
    );
    let first_a = everything.iter().find(|i| i.serial == a.serial).unwrap();
    assert_eq!(first_a.state, IdentityState::Revoked);
    assert_eq!(first_a.revoked_reason.as_deref(), Some("superseded"));
    assert_eq!(first_a.token_id, eu.id);

    let by = |args: &[&str]| serials(&list(&gw, args));
    assert_eq!(
        by(&["--token", &eu.id]),
        BTreeSet::from([a.serial.clone(), b.serial.clone()])
    );
    assert_eq!(
        by(&["--cluster", "edge-us"]),
        BTreeSet::from([c.serial.clone()])
    );
    assert_eq!(by(&["--role", "relay"]), BTreeSet::from([c.serial.clone()]));
    assert_eq!(
        by(&["--spiffe-id", &a.spiffe_id]),
        BTreeSet::from([a.serial.clone(), a2.serial.clone()])
    );
    assert_eq!(
        by(&["--serial", &b.serial.to_uppercase()]),
        BTreeSet::from([b.serial.clone()])
    );
    assert_eq!(
        by(&["--state", "revoked"]),
        BTreeSet::from([a.serial.clone()])
    );
    assert_eq!(
        by(&["--state", "live", "--cluster", "edge-eu"]),
        BTreeSet::from([b.serial.clone(), a2.serial.clone()])
    );
    assert!(by(&["--state", "expired"]).is_empty());
    let version = &first_a.policy_version;
    assert_eq!(by(&["--policy-version", version]).len(), 4);
    assert!(by(&["--policy-version", "no-such-version"]).is_empty());
    // Everything issued here lives an hour: all of it expires within two, none within a minute.
    assert_eq!(by(&["--expires-within", "2h"]).len(), 4);
    assert!(by(&["--expires-within", "1m"]).is_empty());
    assert_eq!(list(&gw, &["--limit", "1"]).len(), 1);

    // A bad filter is refused by the API with its reason, and the CLI says so.
    let config = gw.config_naming_the_admin_port();
    let out = omnirelay(&[
        "identities",
        "list",
        "--config",
        config.as_str(),
        "--token",
        "not-a-guid",
    ])
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("400") && stderr.contains("not a token id"),
        "{stderr}"
    );

    // The human table lists the same identities.
    let out = omnirelay(&["identities", "list", "--config", config.as_str()]).unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    for serial in [&a.serial, &b.serial, &c.serial, &a2.serial] {
        assert!(table.contains(serial.as_str()), "{table}");
    }
}
