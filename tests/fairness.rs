//! Issue #7, finding 3: one client must not starve everyone. Each test poses as several
//! clients (Linux routes all of 127.0.0.0/8 to loopback, so a client can bind 127.0.0.2 or
//! 127.0.0.3 as its source) and checks that the one misbehaving pays, and the other does not:
//! the client's own rate budget is charged before the global one, a slow body is cut off at
//! its own deadline and frees its slot, one client's open connections and joins in flight are
//! capped, and the challenge endpoint is rate limited too.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use omnirelay_e2e::raw::{DEADLINE, raw_problem, read_response, try_tls_from};
use omnirelay_e2e::*;
use tokio::io::AsyncWriteExt;

/// Polls `done` until it holds or [`DEADLINE`] passes (then fails, naming `what`).
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut done: impl FnMut() -> F,
) {
    let deadline = Instant::now() + DEADLINE;
    while !done().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::task::yield_now().await;
    }
}

fn retry_after(reply: &gateway::agent::Reply) -> u64 {
    reply
        .headers
        .get("retry-after")
        .expect("a 429 says when to retry")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_limit_does_not_drain_the_global_budget() {
    // Refusals are answered at once here: the loud client counts a hundred of them, and
    // holding each for its Retry-After (`isolation.rs` tests that) would take minutes.
    let gw = Gateway::start_with("per-ip-first", |toml| {
        toml.push_str(
            "\n[limits]\nglobal = { per_second = 1, burst = 30 }\n\
             per_ip = { per_second = 1, burst = 3 }\nrefusal_hold = \"0s\"\n",
        );
    });
    let token = gw.issue_token("edge-eu", "dispatcher", 2).await;
    // The quiet client prepares its two joins (challenges have buckets of their own).
    let quiet = gw.node_from("127.0.0.3");
    let mut requests = Vec::new();
    for i in 0..2 {
        let name = format!("quiet-{i}");
        requests.push(join_request(&quiet, &token.token, &name, &NodeKey::new(&name)).await);
    }

    // The loud client hammers until told to stop, counting the refusals of its own limit.
    let (stop, own_limit) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let loud = gw.node_from("127.0.0.2");
    let hammer = {
        let (stop, own_limit) = (stop.clone(), own_limit.clone());
        tokio::spawn(async move {
            let mut others = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let reply = loud
                    .post("/v1/bootstrap/join", b"{}".to_vec())
                    .await
                    .unwrap();
                let problem = problem(&reply);
                if problem.reason == "rate-limited-ip" {
                    own_limit.fetch_add(1, Ordering::Relaxed);
                } else {
                    others.push((reply.status, problem.reason));
                }
            }
            others
        })
    };
    eventually(
        "the loud client is refused by its own limit 100 times",
        || {
            let refused = own_limit.load(Ordering::Relaxed);
            async move { refused >= 100 }
        },
    )
    .await;

    // While it keeps hammering, the quiet client's joins pass the global limit.
    for request in &requests {
        let reply = post_join(&quiet, request).await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
    }
    stop.store(true, Ordering::Relaxed);
    let others = hammer.await.unwrap();
    // Whatever got past its own limit was refused by the parser, never by the global limit.
    assert!(
        others
            .iter()
            .all(|(status, reason)| (status.as_u16(), reason.as_str()) == (400, "malformed")),
        "{others:?}"
    );
    assert_eq!(
        gw.metric("bootstrap_rate_limited_total{scope=\"global\"}")
            .await,
        None
    );
    gw.wait_for_coalesced("127.0.0.2", "rate-limited-ip", 100);
}

type Reader = tokio::io::ReadHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Sends the head of a join announcing a 1000-byte body, then one byte every 100 ms from a
/// task of its own (aborted when the returned handle is); the answer is left to read.
async fn start_slow_body(gw: &Gateway, from: &str) -> (Reader, tokio::task::JoinHandle<()>) {
    let stream = try_tls_from(gw, Some(from.parse().unwrap())).await.unwrap();
    let (reader, mut writer) = tokio::io::split(stream);
    let head = format!(
        "POST /v1/bootstrap/join HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n{{",
        gw.node_addr
    );
    writer.write_all(head.as_bytes()).await.unwrap();
    writer.flush().await.unwrap();
    let trickle = tokio::spawn(async move {
        // Paces the trickle; nothing waits on it.
        let mut pace = tokio::time::interval(Duration::from_millis(100));
        loop {
            pace.tick().await;
            if writer.write_all(b" ").await.is_err() || writer.flush().await.is_err() {
                return;
            }
        }
    });
    (reader, trickle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_cut_off_at_its_deadline_and_frees_the_in_flight_slot() {
    // One join in flight at most; a body must arrive within 1 s, the whole request within 300
    // (far beyond the test's own deadline for an answer, so only the body deadline can answer).
    let gw = Gateway::start_with("slow-body", |toml| {
        *toml = toml.replace(
            "[server]\n",
            "[server]\nmax_in_flight = 1\nbody_read_timeout = \"1s\"\nrequest_timeout = \"300s\"\n",
        );
    });
    let token = gw.issue_token("edge-eu", "dispatcher", 1).await;
    let (mut reader, trickle) = start_slow_body(&gw, "127.0.0.2").await;
    let response = read_response(&mut reader).await;
    trickle.abort();
    assert_eq!(response.status, 408, "{response:?}");
    let problem = raw_problem(&response);
    assert_eq!(
        (problem.stage.as_str(), problem.reason.as_str()),
        ("transport", "slow-body")
    );
    // Well inside the request deadline, which would still hold the slot: the slot is free.
    join_ok(&gw, &token.token, "after-slow-body").await;
    gw.wait_for_coalesced("127.0.0.2", "slow-body", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_hold_more_than_its_share_of_connections() {
    let gw = Gateway::start_with("per-ip-connections", |toml| {
        *toml = toml.replace(
            "[server]\n",
            "[server]\nmax_connections_per_ip = 3\nheader_read_timeout = \"120s\"\n",
        );
    });
    let loud: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(try_tls_from(&gw, Some(loud)).await.unwrap());
    }
    // The fourth is closed at accept: its handshake never completes.
    assert!(
        try_tls_from(&gw, Some(loud)).await.is_err(),
        "a fourth connection from 127.0.0.2 was accepted"
    );
    assert_eq!(
        gw.metric("bootstrap_connections_refused_total{scope=\"per-ip\"}")
            .await,
        Some(1.0)
    );
    // Another client connects and joins meanwhile.
    let token = gw.issue_token("edge-eu", "dispatcher", 1).await;
    join_as(
        &gw.node_from("127.0.0.3"),
        &token.token,
        "other-client",
        &NodeKey::new("other-client"),
    )
    .await;
    // A connection given back makes room for one more.
    drop(held.pop());
    let gw = &gw;
    eventually(
        "127.0.0.2 connects again once it closed one",
        || async move { try_tls_from(gw, Some(loud)).await.is_ok() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_hold_more_than_its_share_of_joins_in_flight() {
    let gw = Gateway::start_with("per-ip-in-flight", |toml| {
        *toml = toml.replace(
            "[server]\n",
            "[server]\nmax_in_flight_per_ip = 2\nbody_read_timeout = \"120s\"\n\
             request_timeout = \"120s\"\n",
        );
    });
    // Two joins from 127.0.0.2 stay in flight, their bodies trickling.
    let mut slow = Vec::new();
    for _ in 0..2 {
        slow.push(start_slow_body(&gw, "127.0.0.2").await);
    }
    // The third from the same client is refused once both are in flight: 429, Retry-After.
    let loud = gw.node_from("127.0.0.2");
    let deadline = Instant::now() + DEADLINE;
    let refused = loop {
        let reply = loud
            .post("/v1/bootstrap/join", b"{}".to_vec())
            .await
            .unwrap();
        if reply.status == 429 {
            break Some(reply);
        }
        // Before both slow joins are in flight, the third is refused by the parser.
        assert_eq!(
            reply.status,
            400,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        if Instant::now() > deadline {
            break None;
        }
    };
    let refused = refused.expect("a third join from 127.0.0.2 was never refused");
    assert!(retry_after(&refused) >= 1);
    let problem = problem(&refused);
    assert_eq!(
        (problem.stage.as_str(), problem.reason.as_str()),
        ("limits", "too-many-in-flight")
    );
    // Another client joins meanwhile.
    let token = gw.issue_token("edge-eu", "dispatcher", 1).await;
    join_as(
        &gw.node_from("127.0.0.3"),
        &token.token,
        "unhindered",
        &NodeKey::new("unhindered"),
    )
    .await;
    assert!(
        slow.iter().all(|(_, trickle)| !trickle.is_finished()),
        "the slow joins were still sending"
    );
    for (_, trickle) in slow {
        trickle.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hammering_the_challenge_endpoint_gets_429_with_retry_after() {
    let gw = Gateway::start_with("challenge-limit", |toml| {
        toml.push_str("\n[limits]\nper_ip = { per_second = 1, burst = 5 }\n");
    });
    let node = gw.node();
    let mut passed = 0;
    let refused = loop {
        let reply = node.get("/v1/bootstrap/challenge").await.unwrap();
        if reply.status == 429 {
            break reply;
        }
        assert_eq!(reply.status, 200);
        passed += 1;
        assert!(passed < 1000, "1000 challenges from one client and no 429");
    };
    // The burst of five passed first.
    assert!(passed >= 5, "{passed}");
    assert!(retry_after(&refused) >= 1);
    let problem = problem(&refused);
    assert_eq!(
        (problem.stage.as_str(), problem.reason.as_str()),
        ("limits", "rate-limited-ip")
    );
    // Another client still gets its challenge.
    challenge(&gw.node_from("127.0.0.3")).await;
    let (entries, count) = gw.wait_for_coalesced("127.0.0.1", "rate-limited-ip", 1);
    assert_eq!(count, 1, "{entries:#?}");
}
