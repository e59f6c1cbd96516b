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
use std::time::{Duration, Instant};

use omnirelay_e2e::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Generous bound for things the server must do on its own (close a connection, answer).
const DEADLINE: Duration = Duration::from_secs(20);

/// A TLS connection to the node listener, trusting only the gateway's CA, with no HTTP on top.
async fn tls(gw: &Gateway) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&gw.bundle()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(gw.node_addr).await.unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(gw.node_addr.ip().into()), tcp)
        .await
        .unwrap()
}

/// A raw HTTP/1.1 response.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response (head, then a Content-Length body). A server that closes or resets the
/// connection right after answering is fine, as long as the whole answer arrived first.
async fn read_response(reader: &mut (impl AsyncRead + Unpin)) -> RawResponse {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let complete = |buf: &[u8]| -> Option<RawResponse> {
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = std::str::from_utf8(&buf[..end]).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().unwrap());
        let body = buf.get(end + 4..end + 4 + length)?.to_vec();
        Some(RawResponse {
            status,
            headers,
            body,
        })
    };
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(response) = complete(&buf) {
            return response;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, reader.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            outcome => panic!(
                "no complete response ({outcome:?}); got {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
}

/// The problem document of a raw response, after checking its content type.
fn raw_problem(response: &RawResponse) -> gateway::api::wire::Problem {
    assert_eq!(
        response.header("content-type"),
        Some("application/problem+json"),
        "{response:?}"
    );
    serde_json::from_slice(&response.body).unwrap()
}

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
    // already fetched (challenges are not limited): the burst lets two through.
    let barrier = Arc::new(tokio::sync::Barrier::new(3));
    let mut joins = Vec::new();
    for i in 0..3 {
        let node = gw.node();
        let name = format!("limited-{i}");
        let request = join_request(&node, &token.token, &name, &NodeKey::new(&name)).await;
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
    let limited = gw.wait_for_audit("rate-limited", |e| e["scope"] == "ip");
    assert_eq!(limited["key"], "127.0.0.1");
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
    let entry = gw.wait_for_audit("join-refused", |e| e["request_id"] == problem.request_id);
    assert_eq!(entry["status"], 413);

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
