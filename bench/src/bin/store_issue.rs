//! The store alone: durable final steps of a join (consume the use, record the identity, the
//! nonce and two audit entries, group-committed with fsync) per second, from 16 concurrent
//! callers, and the CPU each costs. Isolates the store from TLS, HTTP and crypto.
//!
//! The audit chain is signed as the gateway signs it: a checkpoint every `--checkpoint-every`
//! entries (default 1000, the gateway's default).
//!
//! `cargo run --release -p omnirelay-bench --bin store_issue [-- --joins N] [--checkpoint-every N]`

#![allow(clippy::print_stdout, reason = "a benchmark prints its results")]

use std::error::Error;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use gateway::audit::{AuditEvent, AuditKey, PolicyRef};
use gateway::identity::{Serial, SpiffeId};
use gateway::store::{
    Checkpoints, IdentityRecord, IssueOutcome, IssueRecord, SqliteStore, Store, StoreConfig,
    TokenRecord,
};
use gateway::token::TokenId;
use omnirelay_bench::cpu_seconds;

type BoxResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

const CALLERS: usize = 16;

fn main() -> BoxResult<()> {
    let arg = |name: &str| {
        std::env::args()
            .skip_while(|a| a != name)
            .nth(1)
            .and_then(|v| v.parse::<usize>().ok())
    };
    let joins = arg("--joins").unwrap_or(20_000);
    let every = arg("--checkpoint-every").unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(joins, every))
}

async fn run(joins: usize, every: usize) -> BoxResult<()> {
    let dir = std::env::temp_dir().join(format!("omnirelay-store-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let checkpoints = Checkpoints {
        key: Arc::new(AuditKey::generate()?.0),
        every: std::num::NonZeroU64::new(every as u64).ok_or("--checkpoint-every must be > 0")?,
        interval: std::time::Duration::from_secs(60),
    };
    let store = Arc::new(SqliteStore::open(
        &StoreConfig {
            backend: Default::default(),
            sqlite: dir.join("gateway.db"),
            audit_file: dir.join("audit.log"),
            max_batch: 512,
        },
        checkpoints,
    )?);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut tokens = Vec::with_capacity(joins);
    for _ in 0..joins {
        let token = TokenRecord {
            id: TokenId::random(),
            cluster: "edge-eu".into(),
            role: "dispatcher".into(),
            max_uses: 1,
            uses: 0,
            not_before: now,
            expires_at: now + 3600,
            issued_at: now,
            revoked_at: None,
        };
        tokens.push(token.id);
        let event = AuditEvent::TokenIssued {
            token_id: token.id.to_string(),
            cluster: token.cluster.clone(),
            role: token.role.clone(),
            max_uses: 1,
            not_before: now,
            expires_at: now + 3600,
            issued_by: "bench".into(),
            node: None,
            supersede: false,
        };
        store.register_token(token, event).await?;
    }
    let records: Vec<IssueRecord> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| record(*t, i, now))
        .collect::<BoxResult<_>>()?;
    let records = Arc::new(std::sync::Mutex::new(records));
    let cpu_before = cpu_seconds(std::process::id());
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        let (store, records) = (store.clone(), records.clone());
        callers.spawn(async move {
            let mut issued = 0usize;
            loop {
                let next = records.lock().ok().and_then(|mut r| r.pop());
                let Some(record) = next else { break };
                if let Ok(IssueOutcome::Issued { .. }) = store.issue(record).await {
                    issued += 1;
                }
            }
            issued
        });
    }
    let mut issued = 0;
    while let Some(n) = callers.join_next().await {
        issued += n?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(std::process::id()) - cpu_before;
    println!(
        "{issued} durable issues from {CALLERS} callers, a checkpoint every {every} entries: \
         {:.0}/s, {:.0} µs of CPU each",
        issued as f64 / elapsed,
        cpu * 1e6 / issued.max(1) as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn record(token: TokenId, i: usize, now: u64) -> BoxResult<IssueRecord> {
    let node = format!("node-{i}");
    let policy = PolicyRef {
        name: "cluster-role".into(),
        bundle: "local".into(),
        version: "1296389a6807".into(),
        commit: None,
        module_digest: format!("sha256:{}", "ab".repeat(32)),
        settings_digest: format!("sha256:{}", "cd".repeat(32)),
    };
    let request_id = format!("{:032x}", i);
    Ok(IssueRecord {
        request_id: request_id.clone(),
        token,
        nonce: format!("nonce-{i}-{}", "x".repeat(40)),
        nonce_expires_at: now + 300,
        idempotency: None,
        identity: IdentityRecord {
            serial: Serial::random()?,
            spiffe_id: SpiffeId::parse(&format!(
                "spiffe://bench.omnirelay.example/cluster/edge-eu/role/dispatcher/node/{node}"
            ))?,
            node: node.clone(),
            cluster: "edge-eu".into(),
            role: "dispatcher".into(),
            not_before: now,
            not_after: now + 3600,
            attestation:
                r#"{"kind":"token-only","verified":[],"self_reported":[],"issued_at_ms":0}"#.into(),
            issuer: "0".repeat(64),
        },
        response: "x".repeat(1800),
        policy: policy.clone(),
        audit_notes: Vec::new(),
        decision: AuditEvent::PolicyDecision {
            request_id,
            token_id: token.to_string(),
            node,
            outcome: "allow".into(),
            code: None,
            operator_reason: None,
            matched_rules: vec!["cluster-role-listed".into()],
            policy,
        },
        supersede: false,
        now,
    })
}
