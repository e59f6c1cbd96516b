//! The single writer: takes every waiting change, applies each in its own savepoint inside one
//! transaction, seals their audit events onto the chain, commits once (one fsync for the whole
//! batch), then answers every caller and hands the new audit lines to the file mirror.

use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::checkpoints::{Checkpoints, Ticker, Unsigned};
use super::{IssueOutcome, IssueRecord, StoreError, TokenRecord};
use crate::audit::{AuditEvent, AuditFile, ChainHead, SealedEntry, seal};
use crate::token::TokenId;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// What the writer's inbox carries: changes, and requests about the audit chain itself.
#[allow(
    clippy::large_enum_variant,
    reason = "nearly every message is a change; boxing it would cost an allocation per change"
)]
pub(super) enum Message {
    /// A change to commit.
    Change(Command),
    /// Time passed: sign the chain if a checkpoint is due by time.
    Tick,
    /// Sign the unsigned tail now, and answer once the audit file holds (synced) every entry
    /// committed so far.
    Flush(Reply<()>),
}

/// A change waiting for the writer.
pub(super) enum Command {
    RegisterToken(TokenRecord, AuditEvent, Reply<()>),
    RevokeToken(TokenId, AuditEvent, u64, Reply<bool>),
    Issue(Box<IssueRecord>, Reply<IssueOutcome>),
    Audit(Vec<AuditEvent>, Reply<()>),
}

/// An answer computed inside the transaction, sent only after the commit.
enum Answer {
    Unit(Reply<()>, Result<(), StoreError>),
    Bool(Reply<bool>, Result<bool, StoreError>),
    Issue(Reply<IssueOutcome>, Result<IssueOutcome, StoreError>),
}

impl Answer {
    /// Sends the answer. A caller that went away (timed out) no longer needs it.
    fn send(self) {
        match self {
            Answer::Unit(r, v) => drop(r.send(v)),
            Answer::Bool(r, v) => drop(r.send(v)),
            Answer::Issue(r, v) => drop(r.send(v)),
        }
    }

    /// The commit failed: nothing of this batch happened.
    fn fail(self, why: &str) {
        let why = format!("commit failed: {why}");
        match self {
            Answer::Unit(r, _) => drop(r.send(failure(&why))),
            Answer::Bool(r, _) => drop(r.send(failure(&why))),
            Answer::Issue(r, _) => drop(r.send(failure(&why))),
        }
    }

    fn is_err(&self) -> bool {
        matches!(
            self,
            Answer::Unit(_, Err(_)) | Answer::Bool(_, Err(_)) | Answer::Issue(_, Err(_))
        )
    }
}

pub(super) struct Writer {
    conn: Connection,
    head: ChainHead,
    mirror: Mirror,
    max_batch: usize,
    checkpoints: Checkpoints,
    unsigned: Unsigned,
    ticker: Option<Ticker>,
}

/// The audit file mirror, on its own thread so that it never holds up the next commit. The
/// database is the durable copy (the mirror is caught up from it at every start), so the
/// mirror is written after each commit and synced at most every [`MIRROR_SYNC`]: measured,
/// syncing it per batch cost a fifth of the store's CPU.
/// Longest time mirrored audit lines may sit in the page cache before `fdatasync`.
const MIRROR_SYNC: std::time::Duration = std::time::Duration::from_millis(500);

pub(super) struct Mirror {
    batches: std::sync::mpsc::Sender<ToMirror>,
    thread: std::thread::JoinHandle<()>,
}

/// What the mirror thread is sent: committed entries, or callers waiting for a sync.
enum ToMirror {
    Entries(Vec<SealedEntry>),
    Flush(Vec<Reply<()>>),
}

impl Mirror {
    pub(super) fn start(mut file: AuditFile) -> std::io::Result<Self> {
        let (batches, inbox) = std::sync::mpsc::channel::<ToMirror>();
        let thread = std::thread::Builder::new()
            .name("audit-mirror".into())
            .spawn(move || {
                let mut synced = std::time::Instant::now();
                while let Ok(first) = inbox.recv() {
                    let (mut entries, mut flushes) = (Vec::new(), Vec::new());
                    for message in std::iter::once(first).chain(inbox.try_iter()) {
                        match message {
                            ToMirror::Entries(more) => entries.extend(more),
                            ToMirror::Flush(more) => flushes.extend(more),
                        }
                    }
                    let mut result = file.append_unsynced(&entries);
                    if result.is_ok() && (!flushes.is_empty() || synced.elapsed() >= MIRROR_SYNC) {
                        result = file.sync();
                        synced = std::time::Instant::now();
                    }
                    if let Err(e) = &result {
                        // The database holds the chain; the mirror is rebuilt from it at start.
                        tracing::error!(error = %e, "store: audit mirror append failed");
                    }
                    for reply in flushes {
                        let answer = match &result {
                            Ok(()) => Ok(()),
                            Err(e) => failure(&format!("audit mirror: {e}")),
                        };
                        let _ = reply.send(answer);
                    }
                }
                let _ = file.sync();
            })?;
        Ok(Self { batches, thread })
    }

    fn send(&self, entries: Vec<SealedEntry>) {
        if !entries.is_empty() {
            let _ = self.batches.send(ToMirror::Entries(entries));
        }
    }

    /// Answers `replies` once everything sent before is written and synced.
    fn flush(&self, replies: Vec<Reply<()>>) {
        if !replies.is_empty() {
            let _ = self.batches.send(ToMirror::Flush(replies));
        }
    }

    /// Writes what is queued and releases the file.
    pub(super) fn finish(self) {
        drop(self.batches);
        let _ = self.thread.join();
    }
}

impl Writer {
    /// `unsigned`: how many entries of the chain ending at `head` follow its last checkpoint.
    pub(super) fn new(
        conn: Connection,
        head: ChainHead,
        mirror: Mirror,
        max_batch: usize,
        checkpoints: Checkpoints,
        unsigned: u64,
        ticker: Ticker,
    ) -> Self {
        Self {
            conn,
            head,
            mirror,
            max_batch: max_batch.max(1),
            checkpoints,
            unsigned: Unsigned {
                count: unsigned,
                since: std::time::Instant::now(),
            },
            ticker: Some(ticker),
        }
    }

    /// Runs until every sender is gone, then signs the unsigned tail (a clean close).
    pub(super) fn run(mut self, mut inbox: mpsc::Receiver<Message>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(first) = inbox.blocking_recv() {
            let mut flushes = Vec::new();
            sort(first, &mut batch, &mut flushes);
            while batch.len() < self.max_batch {
                match inbox.try_recv() {
                    Ok(next) => sort(next, &mut batch, &mut flushes),
                    Err(_) => break,
                }
            }
            let force = !flushes.is_empty();
            self.commit_batch(&mut batch, flushes, force);
        }
        if let Some(ticker) = self.ticker.take() {
            ticker.stop();
        }
        self.commit_batch(&mut batch, Vec::new(), true);
        self.mirror.finish();
    }

    /// Commits `batch` and, when one is due (or `force`d), a checkpoint after it; answers
    /// `flushes` once the audit file holds the result.
    fn commit_batch(&mut self, batch: &mut Vec<Command>, flushes: Vec<Reply<()>>, force: bool) {
        if batch.is_empty() && !self.checkpoints.due(&self.unsigned, force) {
            self.mirror.flush(flushes);
            return;
        }
        let mut head = self.head;
        let mut sealed = Vec::new();
        let mut answers = Vec::with_capacity(batch.len());
        let mut tx = match self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(e) => {
                tracing::error!(error = %e, "store: cannot begin a transaction");
                for command in batch.drain(..) {
                    answer_error(command, &e.to_string());
                }
                flushes
                    .into_iter()
                    .for_each(|r| drop(r.send(failure(&e.to_string()))));
                return;
            }
        };
        for command in batch.drain(..) {
            answers.push(apply(&mut tx, command, &mut head, &mut sealed));
        }
        let mut unsigned = self.unsigned;
        unsigned.count += head.seq - self.head.seq;
        if self.checkpoints.due(&unsigned, force) {
            match self.checkpoints.append(&tx, &mut head, &mut sealed) {
                Ok(()) => {
                    unsigned = Unsigned {
                        count: 0,
                        since: std::time::Instant::now(),
                    }
                }
                Err(e) => tracing::error!(error = %e, "store: cannot write an audit checkpoint"),
            }
        }
        match tx.commit() {
            Ok(()) => {
                self.head = head;
                self.unsigned = unsigned;
                answers.into_iter().for_each(Answer::send);
                self.mirror.send(sealed);
                self.mirror.flush(flushes);
            }
            Err(e) => {
                tracing::error!(error = %e, "store: commit failed");
                let why = e.to_string();
                answers.into_iter().for_each(|a| a.fail(&why));
                flushes.into_iter().for_each(|r| fail_flush(r, &why));
            }
        }
    }
}

/// A flush whose commit failed.
fn fail_flush(reply: Reply<()>, why: &str) {
    drop(reply.send(failure(&format!("commit failed: {why}"))));
}

/// Puts a message from the inbox where it belongs: a change into the batch, a flush among the
/// callers to answer; a tick needs nothing more than the commit it causes.
fn sort(message: Message, batch: &mut Vec<Command>, flushes: &mut Vec<Reply<()>>) {
    match message {
        Message::Change(command) => batch.push(command),
        Message::Tick => {}
        Message::Flush(reply) => flushes.push(reply),
    }
}

fn answer_error(command: Command, why: &str) {
    let why = format!("cannot begin a transaction: {why}");
    match command {
        Command::RegisterToken(.., r) | Command::Audit(_, r) => drop(r.send(failure(&why))),
        Command::RevokeToken(.., r) => drop(r.send(failure(&why))),
        Command::Issue(_, r) => drop(r.send(failure(&why))),
    }
}

fn failure<T>(why: &str) -> Result<T, StoreError> {
    Err(StoreError::Io(why.to_string()))
}

/// One command's work inside its savepoint: its rows, and the audit events to seal with them.
type Change<'a> = dyn FnMut(&Connection, &mut Vec<AuditEvent>) -> Result<(), StoreError> + 'a;

/// Applies one command in its own savepoint: its rows and its audit entries go in together or
/// not at all, without disturbing the rest of the batch.
fn apply(
    tx: &mut Transaction<'_>,
    command: Command,
    head: &mut ChainHead,
    sealed: &mut Vec<SealedEntry>,
) -> Answer {
    let (before_head, before_len) = (*head, sealed.len());
    // A savepoint per change, through cached statements (rusqlite's `Savepoint` re-parses its
    // SQL every time, which showed in profiles of the hot path).
    let mut run = |f: &mut Change<'_>| {
        tx.prepare_cached("SAVEPOINT change")?.execute([])?;
        let mut events = Vec::new();
        let applied = f(tx, &mut events).and_then(|()| append_audit(tx, head, sealed, &events));
        if applied.is_err() {
            tx.prepare_cached("ROLLBACK TO change")?.execute([])?;
        }
        tx.prepare_cached("RELEASE change")?.execute([])?;
        applied
    };
    let answer = match command {
        Command::RegisterToken(token, event, reply) => {
            let result = run(&mut |tx, events| {
                insert_token(tx, &token)?;
                events.push(event.clone());
                Ok(())
            });
            Answer::Unit(reply, result)
        }
        Command::RevokeToken(id, event, now, reply) => {
            let mut found = false;
            let result = run(&mut |tx, events| {
                let id = id.to_string();
                let revoked = tx.execute(
                    "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                    params![id, now],
                )? == 1;
                found = revoked
                    || tx
                        .prepare_cached("SELECT 1 FROM tokens WHERE id = ?1")?
                        .exists([&id])?;
                // Only the revocation that took effect is audited. Repeating it changes nothing
                // (`revoked_at` keeps the first time), and a second entry, with its own operator
                // and reason, would contradict the record of who revoked the token and why.
                if revoked {
                    events.push(event.clone());
                }
                Ok(())
            });
            Answer::Bool(reply, result.map(|()| found))
        }
        Command::Audit(events, reply) => {
            let result = run(&mut |_, out| {
                out.extend(events.iter().cloned());
                Ok(())
            });
            Answer::Unit(reply, result)
        }
        Command::Issue(record, reply) => {
            let mut outcome = IssueOutcome::Exhausted;
            let result = run(&mut |tx, events| {
                outcome = issue(tx, &record, events)?;
                Ok(())
            });
            Answer::Issue(reply, result.map(|()| outcome))
        }
    };
    if answer.is_err() {
        *head = before_head;
        sealed.truncate(before_len);
    }
    answer
}

fn insert_token(tx: &Connection, t: &TokenRecord) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO tokens (id, cluster, role, max_uses, uses, not_before, expires_at, issued_at)
         VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7)",
    )?
    .execute(params![
        t.id.to_string(),
        t.cluster,
        t.role,
        t.max_uses,
        t.not_before,
        t.expires_at,
        t.issued_at
    ])?;
    Ok(())
}

/// The final step of a join. The use is taken by a conditional update, so two joins racing for
/// the last use cannot both win, on this replica or any other sharing the database.
fn issue(
    tx: &Connection,
    r: &IssueRecord,
    events: &mut Vec<AuditEvent>,
) -> Result<IssueOutcome, StoreError> {
    let token = r.token.to_string();
    if let Some((key, digest)) = &r.idempotency {
        let earlier: Option<(String, String)> = tx
            .prepare_cached(
                "SELECT csr_digest, response FROM idempotency WHERE token_id = ?1 AND key = ?2",
            )?
            .query_row(params![token, key], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        if let Some((earlier_digest, response)) = earlier {
            return Ok(if earlier_digest == hex::encode(digest) {
                IssueOutcome::Replayed(response)
            } else {
                refused(r, events, "record", 409, "idempotency-conflict");
                IssueOutcome::IdempotencyConflict
            });
        }
    }
    let consumed: Option<(u32, u32)> = tx
        .prepare_cached(
            "UPDATE tokens SET uses = uses + 1
             WHERE id = ?1 AND uses < max_uses AND revoked_at IS NULL AND expires_at > ?2
             RETURNING uses, max_uses",
        )?
        .query_row(params![token, r.now], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((uses, max_uses)) = consumed else {
        let outcome = why_not_usable(tx, &token, r.now)?;
        let (status, reason) = match outcome {
            IssueOutcome::Revoked => (403, "token-revoked"),
            IssueOutcome::Expired => (401, "expired"),
            _ => (409, "token-exhausted"),
        };
        refused(r, events, "token", status, reason);
        return Ok(outcome);
    };
    let nonce_is_new = tx
        .prepare_cached("INSERT OR IGNORE INTO used_nonces (nonce, expires_at) VALUES (?1, ?2)")?
        .execute(params![r.nonce, r.nonce_expires_at])?
        == 1;
    if !nonce_is_new {
        // Undo the use taken above: the savepoint rolls back only on error, so do it here.
        tx.execute("UPDATE tokens SET uses = uses - 1 WHERE id = ?1", [&token])?;
        refused(r, events, "attestation", 401, "nonce-replayed");
        return Ok(IssueOutcome::NonceReplayed);
    }
    let id = &r.identity;
    tx.prepare_cached(
        "INSERT INTO identities (serial, spiffe_id, token_id, node, cluster, role, policy_name,
             policy_version, module_digest, not_before, not_after, issued_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        id.serial.to_string(),
        id.spiffe_id.to_string(),
        token,
        id.node,
        id.cluster,
        id.role,
        r.policy.name,
        r.policy.version,
        r.policy.module_digest,
        id.not_before,
        id.not_after,
        r.now
    ])?;
    if let Some((key, digest)) = &r.idempotency {
        tx.prepare_cached(
            "INSERT INTO idempotency (token_id, key, csr_digest, response) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![token, key, hex::encode(digest), r.response])?;
    }
    // The issuance entry records the allow decision too (its rules and policy): one entry
    // per issued join instead of two halves the audit volume of the hot path (measured: a
    // third of the store's CPU per join).
    let matched_rules = match &r.decision {
        AuditEvent::PolicyDecision { matched_rules, .. } => matched_rules.clone(),
        _ => Vec::new(),
    };
    events.push(AuditEvent::IdentityIssued {
        request_id: r.request_id.clone(),
        token_id: token,
        spiffe_id: id.spiffe_id.to_string(),
        serial: id.serial.to_string(),
        node: id.node.clone(),
        not_after: id.not_after,
        uses_after: uses,
        audit_notes: r.audit_notes.clone(),
        matched_rules,
        policy: r.policy.clone(),
    });
    Ok(IssueOutcome::Issued {
        uses_left: max_uses - uses,
    })
}

fn why_not_usable(tx: &Connection, token: &str, now: u64) -> Result<IssueOutcome, StoreError> {
    let row: Option<(Option<u64>, u64)> = tx
        .prepare_cached("SELECT revoked_at, expires_at FROM tokens WHERE id = ?1")?
        .query_row([token], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    Ok(match row {
        Some((Some(_), _)) => IssueOutcome::Revoked,
        Some((None, expires_at)) if now >= expires_at => IssueOutcome::Expired,
        _ => IssueOutcome::Exhausted,
    })
}

/// The audit entry of a join the final step refused (the policy had allowed it). `stage` is
/// the stage the node is told refused it (the token's, for a use lost to a concurrent join), so
/// the entry reads the same whether the refusal came before or inside the transaction.
fn refused(r: &IssueRecord, events: &mut Vec<AuditEvent>, stage: &str, status: u16, reason: &str) {
    events.push(r.decision.clone());
    events.push(AuditEvent::JoinRefused {
        request_id: r.request_id.clone(),
        stage: stage.into(),
        status,
        reason: reason.into(),
        token_id: Some(r.token.to_string()),
        cluster: Some(r.identity.cluster.clone()),
        role: Some(r.identity.role.clone()),
        node: Some(r.identity.node.clone()),
        client_ip: r.client_ip.clone(),
        policy: Some(r.policy.clone()),
    });
}

pub(super) fn append_audit(
    tx: &Connection,
    head: &mut ChainHead,
    sealed: &mut Vec<SealedEntry>,
    events: &[AuditEvent],
) -> Result<(), StoreError> {
    let now = SystemTime::now();
    let mut insert =
        tx.prepare_cached("INSERT INTO audit (seq, hash, line) VALUES (?1, ?2, ?3)")?;
    for event in events {
        let entry = seal(head, now, event);
        insert.execute(params![entry.seq, hex::encode(entry.hash), entry.line])?;
        *head = ChainHead {
            seq: entry.seq,
            hash: entry.hash,
        };
        sealed.push(entry);
    }
    Ok(())
}

/// Brings the file mirror up to the database's chain and returns the chain head. A mirror that
/// is ahead of the database, or disagrees with it at its last line, was edited: refuse.
pub(super) fn catch_up(
    conn: &Connection,
    mirror: &mut AuditFile,
    path: &std::path::Path,
) -> Result<ChainHead, StoreError> {
    let db_head = super::sqlite::audit_head(conn)?;
    let file_head = mirror.head();
    if file_head.seq > db_head.seq {
        return Err(StoreError::AuditMismatch(format!(
            "the audit file has {} entries, the database {}",
            file_head.seq, db_head.seq
        )));
    }
    if file_head.seq > 0 {
        let hash_at: String = conn.query_row(
            "SELECT hash FROM audit WHERE seq = ?1",
            [file_head.seq],
            |r| r.get(0),
        )?;
        if hash_at != hex::encode(file_head.hash) {
            return Err(StoreError::AuditMismatch(format!(
                "entry {} differs between the audit file and the database",
                file_head.seq
            )));
        }
    }
    let mut stmt = conn.prepare("SELECT seq, hash, line FROM audit WHERE seq > ?1 ORDER BY seq")?;
    let missing = stmt
        .query_map([file_head.seq], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?
        .map(|row| {
            let (seq, hash, line) = row?;
            Ok(SealedEntry {
                seq,
                hash: super::sqlite::digest_from_hex(&hash)?,
                line,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    if !missing.is_empty() {
        tracing::info!(
            entries = missing.len(),
            "catching the audit file up with the database"
        );
        mirror
            .append(&missing)
            .map_err(|source| StoreError::Audit {
                path: path.to_path_buf(),
                source,
            })?;
    }
    Ok(db_head)
}
