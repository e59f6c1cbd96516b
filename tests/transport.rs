//! The transport bounds against hostile clients over real sockets: the per-IP rate limit,
//! the body cap (declared or streamed), slow-loris connections and non-TLS garbage. Each test
//! ends by checking that the gateway is still healthy.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::sync::Arc;
use std::time::Duration;

use omnirelay_e2e::raw::{DEADLINE, RawResponse, raw_problem, read_response, tls};
use omnirelay_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

async fn assert_healthy(gw: &Gateway) {
    let reply = gw.node().get("/healthz").await.unwrap();
    assert_eq!(reply.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_ip_rate_limit_gets_429_with_retry_after() {
    let gw = Gateway::start_with("ratelimit", |toml| {
        toml.push_str("\n[limits]\nper_ip = { per_second = 1, burst = 2 }\n");
    });
    let token = gw.issue_token("edge-eu", "dispatcher", 3).await;
    // Three joins from one address at once, each on its own connection with its challenge
    // already fetched from another address (challenges have buckets of their own, under the
    // same limits): the burst lets two through.
    let barrier = Arc::new(tokio::sync::Barrier::new(3));
    let mut joins = Vec::new();
    for i in 0..3 {
        let node = gw.node();
        let name = format!("limited-{i}");
        let request = join_request(
            &gw.node_from(&format!("127.0.0.{}", 10 + i)),
            &token.token,
            &name,
            &NodeKey::new(&name),
        )
        .await;
        let barrier = barrier.clone();
        joins.push(tokio::spawn(async move {
            barrier.wait().await;
            post_join(&node, &request).await
        }));
    }
    let mut replies = Vec::new();
    for join in joins {
        replies.push(join.await.unwrap());
    }
    replies.sort_by_key(|r| r.status);
    for reply in &replies[..2] {
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
    }
    let third = &replies[2];
    assert_eq!(
        third.status,
        429,
        "{}",
        String::from_utf8_lossy(&third.body)
    );
    let retry_after: u64 = third
        .headers
        .get("retry-after")
        .expect("a 429 says when to retry")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "Retry-After: {retry_after}");
    let problem = problem(third);
    assert_eq!(
        (problem.stage.as_str(), problem.reason.as_str()),
        ("limits", "rate-limited-ip")
    );
    // Refused before the token was read: counted, and audited coalesced for the client.
    let (entries, count) = gw.wait_for_coalesced("127.0.0.1", "rate-limited-ip", 1);
    assert_eq!(count, 1, "{entries:#?}");
    assert_eq!(
        (entries[0]["stage"].as_str(), entries[0]["status"].as_u64()),
        (Some("limits"), Some(429))
    );
    // Refused before the token was even read: the third join burned nothing.
    assert_eq!(gw.token(&token.id).await.unwrap().uses, 2);
    assert_healthy(&gw).await;
}

/// Sends `head` and then up to 10 MiB of `chunk`s from a task of its own, while this side
/// reads the answer; the server may stop reading (and close) at any point.
async fn oversized(gw: &Gateway, head: String, chunk: Vec<u8>) -> RawResponse {
    let (mut reader, mut writer) = tokio::io::split(tls(gw).await);
    writer.write_all(head.as_bytes()).await.unwrap();
    let sender = tokio::spawn(async move {
        let mut sent = 0;
        while sent < 10 << 20 {
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        writer
    });
    let response = read_response(&mut reader).await;
    sender.abort();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_mebibyte_body_is_refused_413_declared_or_streamed() {
    let gw = Gateway::start("too-large");
    let addr = gw.node_addr;

    // Declared: refused on the Content-Length alone.
    let head = format!(
        "POST /v1/bootstrap/join HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        10 << 20
    );
    let declared = oversized(&gw, head, vec![b' '; 64 << 10]).await;
    assert_eq!(declared.status, 413, "{declared:?}");
    let problem = raw_problem(&declared);
    assert_eq!(
        (
            problem.status,
            problem.stage.as_str(),
            problem.reason.as_str()
        ),
        (413, "transport", "too-large")
    );
    // Unauthenticated: counted in the coalesced entry, not audited one by one.
    let (entries, _) = gw.wait_for_coalesced("127.0.0.1", "too-large", 1);
    assert_eq!(entries[0]["status"], 413);

    // Streamed without a length: refused once the cap is crossed.
    let head = format!(
        "POST /v1/bootstrap/join HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    let mut chunk = format!("{:x}\r\n", 16 << 10).into_bytes();
    chunk.extend(std::iter::repeat_n(b' ', 16 << 10));
    chunk.extend_from_slice(b"\r\n");
    let streamed = oversized(&gw, head, chunk).await;
    assert_eq!(streamed.status, 413, "{streamed:?}");
    assert_eq!(raw_problem(&streamed).reason, "too-large");

    assert_healthy(&gw).await;
}

/// A slow-loris client on an established TLS connection: a request head that grows by a few
/// bytes every 100 ms and never ends. The task finishes when the server closes the connection.
fn slow_loris(stream: TlsStream<TcpStream>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let head = b"POST /v1/bootstrap/join HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
        let mut sent = 0;
        // Paces the attack; nothing waits on it.
        let mut pace = tokio::time::interval(Duration::from_millis(100));
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                _ = pace.tick() => {
                    let bytes: &[u8] = head.get(sent..(sent + 3).min(head.len())).filter(|b| !b.is_empty()).unwrap_or(b"aaa");
                    sent += bytes.len();
                    if writer.write_all(bytes).await.is_err() || writer.flush().await.is_err() {
                        return;
                    }
                }
                read = reader.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    // An error response before the close is fine; keep reading to the end.
                    Ok(_) => {}
                },
            }
        }
    })
}

/// A plain TCP client writing bytes that are not TLS; finishes when the server hangs up.
async fn garbage(gw: &Gateway, seed: u64) -> JoinHandle<()> {
    let mut tcp = TcpStream::connect(gw.node_addr).await.unwrap();
    // xorshift64*: reproducible noise. The first byte is made `G`, so it never even starts
    // like a TLS record (content types 0x14-0x18).
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut noise: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect();
    noise[0] = b'G';
    tokio::spawn(async move {
        let _ = tcp.write_all(&noise).await;
        let mut buf = [0u8; 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
}

/// A TCP client that connects and never starts the handshake.
async fn silent(gw: &Gateway) -> JoinHandle<()> {
    let mut tcp = TcpStream::connect(gw.node_addr).await.unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok(n) = tcp.read(&mut buf).await
            && n > 0
        {}
    })
}

/// Waits (with a deadline) for every client task to see the server close its connection.
async fn all_closed_by_server(what: &str, clients: Vec<JoinHandle<()>>) {
    let count = clients.len();
    tokio::time::timeout(DEADLINE, async {
        for client in clients {
            client.await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the server left some of the {count} {what} connections open"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_while_slow_loris_and_garbage_clients_hold_connections() {
    // A header deadline far beyond the test, so the attackers are certainly still connected
    // while the node joins.
    let gw = Gateway::start_with("loris-live", |toml| {
        *toml = toml.replace("[server]\n", "[server]\nheader_read_timeout = \"120s\"\n");
    });
    let mut loris = Vec::new();
    for _ in 0..20 {
        loris.push(slow_loris(tls(&gw).await));
    }
    let mut noise = Vec::new();
    for seed in 0..10 {
        noise.push(garbage(&gw, seed).await);
    }

    let token = gw.issue_token("edge-eu", "dispatcher", 1).await;
    join_ok(&gw, &token.token, "steady-1").await;
    assert!(
        loris.iter().all(|l| !l.is_finished()),
        "the slow-loris connections were open during the join"
    );
    // Not TLS: each garbage connection is dropped by the server on its own.
    all_closed_by_server("garbage", noise).await;
    assert_healthy(&gw).await;
    for l in loris {
        l.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_closes_slow_loris_and_silent_connections_at_its_deadlines() {
    let gw = Gateway::start_with("loris-timeout", |toml| {
        *toml = toml.replace(
            "[server]\n",
            "[server]\nheader_read_timeout = \"1s\"\nhandshake_timeout = \"1s\"\n",
        );
    });
    let mut loris = Vec::new();
    for _ in 0..20 {
        loris.push(slow_loris(tls(&gw).await));
    }
    let mut mute = Vec::new();
    for _ in 0..5 {
        mute.push(silent(&gw).await);
    }
    // Still serving while they hang on.
    let token = gw.issue_token("edge-eu", "dispatcher", 1).await;
    join_ok(&gw, &token.token, "steady-2").await;

    all_closed_by_server("slow-loris", loris).await;
    all_closed_by_server("silent", mute).await;
    assert_healthy(&gw).await;
}
