//! The JSON shape of every event kind, which is part of the on-disk format.

use super::*;

const POLICY_JSON: &str = r#"{"name":"cluster-role","bundle":"core","version":"1.4.0","commit":"9748a06","module_digest":"5e1f","settings_digest":"c0de"}"#;

fn json(event: &AuditEvent) -> String {
    serde_json::to_string(event).unwrap()
}

#[test]
fn each_kind_has_its_exact_json_shape() {
    let expected = [
        r#"{"kind":"token-issued","token_id":"0b6f4a3e-5c1d-4e8f-9a2b-6d7e8f901234","cluster":"edge-eu","role":"relay","max_uses":3,"not_before":1700000000,"expires_at":1700086400,"issued_by":"alice@ops"}"#.to_string(),
        r#"{"kind":"token-revoked","token_id":"0b6f4a3e-5c1d-4e8f-9a2b-6d7e8f901234","reason":"leaked in ticket OPS-12","revoked_by":"bob@ops"}"#.to_string(),
        format!(
            r#"{{"kind":"join-refused","request_id":"req-1","stage":"policy","status":403,"reason":"role not allowed","token_id":"0b6f4a3e-5c1d-4e8f-9a2b-6d7e8f901234","cluster":"edge-eu","role":"relay","node":"node-42","client_ip":"192.0.2.7","policy":{POLICY_JSON}}}"#
        ),
        format!(
            r#"{{"kind":"policy-decision","request_id":"req-2","token_id":"0b6f4a3e-5c1d-4e8f-9a2b-6d7e8f901234","node":"node-42","outcome":"deny","code":"role-unlisted","matched_rules":[],"policy":{POLICY_JSON}}}"#
        ),
        format!(
            r#"{{"kind":"identity-issued","request_id":"req-3","token_id":"0b6f4a3e-5c1d-4e8f-9a2b-6d7e8f901234","spiffe_id":"spiffe://prod.omnirelay.example/cluster/edge-eu/role/relay/node/node-42","serial":"3f2a9c","node":"node-42","not_after":1700003600,"uses_after":1,"audit_notes":["posture: tpm"],"matched_rules":["cluster-role-listed"],"policy":{POLICY_JSON}}}"#
        ),
        r#"{"kind":"identity-replayed","request_id":"req-4","token_id":"0b6f4a3e-5c1d-4e8f-9a2b-6d7e8f901234","serial":"3f2a9c","idempotency_key":"idem-1"}"#.to_string(),
        r#"{"kind":"rate-limited","scope":"ip","key":"192.0.2.7","client_ip":"192.0.2.7"}"#.to_string(),
    ];
    let events = one_of_each();
    assert_eq!(events.len(), expected.len());
    for (event, expected) in events.iter().zip(&expected) {
        assert_eq!(&json(event), expected, "{}", event.kind());
    }
}

#[test]
fn absent_options_are_omitted_not_null() {
    let refused = AuditEvent::JoinRefused {
        request_id: "req-9".into(),
        stage: "token".into(),
        status: 401,
        reason: "unknown token".into(),
        token_id: None,
        cluster: None,
        role: None,
        node: None,
        client_ip: "198.51.100.4".into(),
        policy: None,
    };
    assert_eq!(
        json(&refused),
        r#"{"kind":"join-refused","request_id":"req-9","stage":"token","status":401,"reason":"unknown token","client_ip":"198.51.100.4"}"#
    );
    let no_commit = PolicyRef {
        commit: None,
        ..policy()
    };
    assert_eq!(
        serde_json::to_string(&no_commit).unwrap(),
        r#"{"name":"cluster-role","bundle":"core","version":"1.4.0","module_digest":"5e1f","settings_digest":"c0de"}"#
    );
    // And they read back as None.
    let back: AuditEvent = serde_json::from_str(&json(&refused)).unwrap();
    assert_eq!(back, refused);
}

#[test]
fn every_kind_reads_back_equal() {
    for event in one_of_each() {
        let back: AuditEvent = serde_json::from_str(&json(&event)).unwrap();
        assert_eq!(back, event);
    }
}

#[test]
fn kind_is_the_json_tag() {
    let kinds: Vec<&str> = one_of_each().iter().map(AuditEvent::kind).collect();
    assert_eq!(
        kinds,
        [
            "token-issued",
            "token-revoked",
            "join-refused",
            "policy-decision",
            "identity-issued",
            "identity-replayed",
            "rate-limited",
        ]
    );
    for event in one_of_each() {
        let value: serde_json::Value = serde_json::from_str(&json(&event)).unwrap();
        assert_eq!(value["kind"], event.kind());
    }
}

#[test]
fn ids_lists_token_spiffe_id_serial_and_request_id_only() {
    let events = one_of_each();
    let ids: Vec<Vec<&str>> = events.iter().map(AuditEvent::ids).collect();
    assert_eq!(
        ids,
        [
            vec![TOKEN],
            vec![TOKEN],
            vec!["req-1", TOKEN],
            vec!["req-2", TOKEN],
            vec!["req-3", TOKEN, SPIFFE_ID, "3f2a9c"],
            vec!["req-4", TOKEN, "3f2a9c"],
            vec![],
        ]
    );
}

#[test]
fn an_unknown_kind_does_not_parse() {
    let err =
        serde_json::from_str::<AuditEvent>(r#"{"kind":"token-eaten","token_id":"t"}"#).unwrap_err();
    assert!(
        err.to_string().contains("unknown variant `token-eaten`"),
        "{err}"
    );
}

#[test]
fn coalesced_refusals_have_a_fixed_shape_and_no_ids() {
    let event = AuditEvent::RefusalsCoalesced {
        client: "2001:db8:1:2::/64".into(),
        stage: "request".into(),
        reason: "malformed".into(),
        status: 400,
        count: 200,
        first_at: 1_700_000_000,
        last_at: 1_700_000_009,
        sample: "malformed request: unknown field `aaa…".into(),
    };
    assert_eq!(
        json(&event),
        r#"{"kind":"refusals-coalesced","client":"2001:db8:1:2::/64","stage":"request","reason":"malformed","status":400,"count":200,"first_at":1700000000,"last_at":1700000009,"sample":"malformed request: unknown field `aaa…"}"#
    );
    assert_eq!(event.kind(), "refusals-coalesced");
    assert!(event.ids().is_empty());
    let back: AuditEvent = serde_json::from_str(&json(&event)).unwrap();
    assert_eq!(back, event);
}

#[test]
fn ca_rotation_events_name_the_cas_and_the_operator() {
    let (ca1, ca2) = ("1a".repeat(32), "2b".repeat(32));
    let events = [
        AuditEvent::CaPrepared {
            fingerprint: ca2.clone(),
            not_after: 1_800_000_000,
            sequence: 2,
            prepared_by: "cli:alice".into(),
        },
        AuditEvent::CaActivated {
            fingerprint: ca2.clone(),
            previous: ca1.clone(),
            sequence: 3,
            serving_reissued: true,
            activated_by: "cli:alice".into(),
        },
        AuditEvent::CaRetired {
            fingerprint: ca1.clone(),
            sequence: 4,
            forced: false,
            live_until: None,
            retired_by: "cli:bob".into(),
        },
        AuditEvent::CaRetired {
            fingerprint: ca1.clone(),
            sequence: 4,
            forced: true,
            live_until: Some(1_750_000_600),
            retired_by: "cli:bob".into(),
        },
    ];
    let expected = [
        format!(
            r#"{{"kind":"ca-prepared","fingerprint":"{ca2}","not_after":1800000000,"sequence":2,"prepared_by":"cli:alice"}}"#
        ),
        format!(
            r#"{{"kind":"ca-activated","fingerprint":"{ca2}","previous":"{ca1}","sequence":3,"serving_reissued":true,"activated_by":"cli:alice"}}"#
        ),
        format!(
            r#"{{"kind":"ca-retired","fingerprint":"{ca1}","sequence":4,"retired_by":"cli:bob"}}"#
        ),
        format!(
            r#"{{"kind":"ca-retired","fingerprint":"{ca1}","sequence":4,"forced":true,"live_until":1750000600,"retired_by":"cli:bob"}}"#
        ),
    ];
    for (event, expected) in events.iter().zip(&expected) {
        assert_eq!(&json(event), expected);
        let value: serde_json::Value = serde_json::from_str(expected).unwrap();
        assert_eq!(value["kind"], event.kind());
        let back: AuditEvent = serde_json::from_str(expected).unwrap();
        assert_eq!(&back, event);
    }
    let ids: Vec<Vec<&str>> = events.iter().map(AuditEvent::ids).collect();
    assert_eq!(
        ids,
        [
            vec![ca2.as_str()],
            vec![ca2.as_str(), ca1.as_str()],
            vec![ca1.as_str()],
            vec![ca1.as_str()]
        ]
    );
}
