//! The single writer: takes every waiting change, applies each in its own savepoint inside one
//! transaction, seals their audit events onto the chain, commits once (one fsync for the whole
//! batch), then answers every caller and hands the new audit lines to the file mirror.

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::chain::append_audit;
use super::checkpoints::{Checkpoints, Ticker, Unsigned};
use super::lineage;
use super::wal::WalCheckpointer;
use super::{
    DecisionRecord, Disagreement, IssueOutcome, IssueRecord, RenewOutcome, RenewRecord,
    RevokeOrder, RevokeSummary, StoreError, TokenRecord,
};
use crate::audit::{AuditError, AuditEvent, AuditFile, ChainHead, SealedEntry};

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
    RegisterToken(Box<(TokenRecord, AuditEvent)>, Reply<()>),
    Revoke(Box<RevokeOrder>, Reply<RevokeSummary>),
    Issue(Box<IssueRecord>, Reply<IssueOutcome>),
    Renew(Box<RenewRecord>, Reply<RenewOutcome>),
    LiftQuarantine(String, String, u64, Reply<bool>),
    Audit(Vec<AuditEvent>, Reply<()>),
    /// A shadow disagreement, and how many of the newest to keep.
    Disagreement(Box<Disagreement>, u32, Reply<()>),
    /// Decisions kept for replay, how many of the newest to keep, and the oldest time kept.
    Decisions(Vec<DecisionRecord>, u32, u64, Reply<()>),
}

/// An answer computed inside the transaction, sent only after the commit.
enum Answer {
    Unit(Reply<()>, Result<(), StoreError>),
    Bool(Reply<bool>, Result<bool, StoreError>),
    Issue(Reply<IssueOutcome>, Result<IssueOutcome, StoreError>),
    Renew(Reply<RenewOutcome>, Result<RenewOutcome, StoreError>),
    Revoke(Reply<RevokeSummary>, Result<RevokeSummary, StoreError>),
}

impl Answer {
    /// Sends the answer. A caller that went away (timed out) no longer needs it.
    fn send(self) {
        match self {
            Answer::Unit(r, v) => drop(r.send(v)),
            Answer::Bool(r, v) => drop(r.send(v)),
            Answer::Issue(r, v) => drop(r.send(v)),
            Answer::Renew(r, v) => drop(r.send(v)),
            Answer::Revoke(r, v) => drop(r.send(v)),
        }
    }

    /// The commit failed: nothing of this batch happened.
    fn fail(self, why: &str) {
        let why = format!("commit failed: {why}");
        match self {
            Answer::Unit(r, _) => drop(r.send(failure(&why))),
            Answer::Bool(r, _) => drop(r.send(failure(&why))),
            Answer::Issue(r, _) => drop(r.send(failure(&why))),
            Answer::Renew(r, _) => drop(r.send(failure(&why))),
            Answer::Revoke(r, _) => drop(r.send(failure(&why))),
        }
    }

    fn is_err(&self) -> bool {
        matches!(
            self,
            Answer::Unit(_, Err(_))
                | Answer::Bool(_, Err(_))
                | Answer::Issue(_, Err(_))
                | Answer::Renew(_, Err(_))
                | Answer::Revoke(_, Err(_))
        )
    }
}

pub(super) struct Writer {
    conn: Connection,
    head: ChainHead,
    mirror: Mirror,
    /// Copies the log into the database file after commits, off this thread.
    wal: WalCheckpointer,
    max_batch: usize,
    checkpoints: Checkpoints,
    unsigned: Unsigned,
    ticker: Option<Ticker>,
    /// The feed position of the newest revocation, sent after each commit that moved it.
    revocation_head: tokio::sync::watch::Sender<u64>,
}

/// The audit file mirror, on its own thread so that it never holds up the next commit. The
/// database is the durable copy (the mirror is caught up from it at every start), so the
/// mirror is written after each commit and synced at most every [`MIRROR_SYNC`]: measured,
/// syncing it per batch cost a fifth of the store's CPU. Entries whose append failed (a full
/// disk) stay queued and are appended again every [`MIRROR_RETRY`] until the file takes them,
/// so the file never keeps a gap while the gateway runs.
/// Longest time mirrored audit lines may sit in the page cache before `fdatasync`.
const MIRROR_SYNC: std::time::Duration = std::time::Duration::from_millis(500);

/// How often the mirror tries again to append entries the file refused.
const MIRROR_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

/// Most entries the mirror holds while the file refuses them (about 1 KiB each). Past it, it
/// stops until a restart, whose catch-up from the database fills the file in.
const MIRROR_BACKLOG: usize = 65_536;

pub(super) struct Mirror {
    batches: std::sync::mpsc::Sender<ToMirror>,
    thread: std::thread::JoinHandle<()>,
    backlog: MirrorBacklog,
}

/// Committed audit entries handed to the mirror and not in the file yet: what the
/// `bootstrap_audit_mirror_backlog_entries` gauge shows. Entries the mirror dropped after it
/// stopped stay counted: the file is that far behind until a restart catches it up.
#[derive(Debug, Clone, Default)]
pub(super) struct MirrorBacklog(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl MirrorBacklog {
    /// Entries committed and not written to the file.
    pub(super) fn entries(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        self.0.fetch_add(
            u64::try_from(n).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn written(&self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        let _ = self.0.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |v| Some(v.saturating_sub(n)),
        );
    }
}

/// What the mirror thread is sent: committed entries, or callers waiting for a sync.
enum ToMirror {
    Entries(Vec<SealedEntry>),
    Flush(Vec<Reply<()>>),
}

impl Mirror {
    pub(super) fn start(file: AuditFile) -> std::io::Result<Self> {
        let (batches, inbox) = std::sync::mpsc::channel::<ToMirror>();
        let backlog = MirrorBacklog::default();
        let counted = backlog.clone();
        let thread = std::thread::Builder::new()
            .name("audit-mirror".into())
            .spawn(move || MirrorLoop::new(file, counted).run(&inbox))?;
        Ok(Self {
            batches,
            thread,
            backlog,
        })
    }

    /// The count of entries sent and not written yet.
    pub(super) fn backlog(&self) -> MirrorBacklog {
        self.backlog.clone()
    }

    pub(super) fn send(&self, entries: Vec<SealedEntry>) {
        if !entries.is_empty() {
            self.backlog.add(entries.len());
            let _ = self.batches.send(ToMirror::Entries(entries));
        }
    }

    /// Answers `replies` once everything sent before is written and synced.
    pub(super) fn flush(&self, replies: Vec<Reply<()>>) {
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

/// The mirror thread's state: the file, and the committed entries it has not taken yet.
struct MirrorLoop {
    file: AuditFile,
    /// Committed entries not in the file yet, in chain order.
    pending: Vec<SealedEntry>,
    synced: std::time::Instant,
    /// Whether the last append failed (logged once per failure, not per retry).
    failing: bool,
    /// Retrying cannot help (the file's tail is unknown, or the backlog is full): entries are
    /// dropped until a restart catches the file up from the database.
    stopped: bool,
    /// Callers waiting until the file holds and has synced every entry sent before them.
    flushes: Vec<Reply<()>>,
    /// Lowered by what each append wrote.
    backlog: MirrorBacklog,
}

impl MirrorLoop {
    fn new(file: AuditFile, backlog: MirrorBacklog) -> Self {
        Self {
            file,
            pending: Vec::new(),
            synced: std::time::Instant::now(),
            failing: false,
            stopped: false,
            flushes: Vec::new(),
            backlog,
        }
    }

    fn take(&mut self, message: ToMirror) {
        match message {
            ToMirror::Entries(entries) => self.pending.extend(entries),
            ToMirror::Flush(replies) => self.flushes.extend(replies),
        }
    }

    fn run(mut self, inbox: &std::sync::mpsc::Receiver<ToMirror>) {
        use std::sync::mpsc::RecvTimeoutError;
        loop {
            let received = if self.pending.is_empty() {
                inbox.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                inbox.recv_timeout(MIRROR_RETRY)
            };
            match received {
                Ok(message) => self.take(message),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while let Ok(more) = inbox.try_recv() {
                self.take(more);
            }
            self.append();
            self.answer_flushes();
        }
        self.append();
        let _ = self.file.sync();
        self.answer_flushes();
    }

    /// Answers the callers waiting for a flush: synced when nothing is pending, an error while
    /// the file refuses entries (they stay queued, or the restart's catch-up writes them).
    fn answer_flushes(&mut self) {
        if self.flushes.is_empty() {
            return;
        }
        let result = if self.pending.is_empty() && !self.stopped {
            self.synced = std::time::Instant::now();
            self.file.sync().map_err(|e| format!("audit mirror: {e}"))
        } else {
            Err("audit mirror: the audit file refuses entries".to_string())
        };
        for reply in self.flushes.drain(..) {
            let _ = reply.send(match &result {
                Ok(()) => Ok(()),
                Err(why) => failure(why),
            });
        }
    }

    /// Appends what is pending; on failure keeps it for the next try, unless trying again
    /// cannot help or the backlog is full (then the restart's catch-up from the database
    /// repairs the file).
    fn append(&mut self) {
        if self.stopped {
            self.pending.clear();
        }
        if self.pending.is_empty() {
            return;
        }
        let mut result = self.file.append_unsynced(&self.pending);
        if result.is_ok() {
            self.backlog.written(self.pending.len());
            self.pending.clear();
            if self.synced.elapsed() >= MIRROR_SYNC {
                result = self.file.sync();
                self.synced = std::time::Instant::now();
            }
        }
        match result {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("store: the audit mirror caught up");
            }
            Ok(()) => {}
            Err(AuditError::Io(e))
                if !self.pending.is_empty() && self.pending.len() <= MIRROR_BACKLOG =>
            {
                if !self.failing {
                    self.failing = true;
                    tracing::error!(error = %e, "store: audit mirror append failed; retrying");
                }
            }
            Err(e) => {
                // The database holds the chain; the mirror is rebuilt from it at start.
                self.pending.clear();
                self.stopped = true;
                tracing::error!(error = %e, "store: audit mirror stopped until restart");
            }
        }
    }
}

impl Writer {
    /// `unsigned`: how many entries of the chain ending at `head` follow its last checkpoint.
    #[allow(
        clippy::too_many_arguments,
        reason = "the writer's parts, each built by `SqliteStore::open` and used once"
    )]
    pub(super) fn new(
        conn: Connection,
        head: ChainHead,
        mirror: Mirror,
        wal: WalCheckpointer,
        max_batch: usize,
        checkpoints: Checkpoints,
        unsigned: u64,
        ticker: Ticker,
        revocation_head: tokio::sync::watch::Sender<u64>,
    ) -> Self {
        Self {
            conn,
            head,
            mirror,
            wal,
            max_batch: max_batch.max(1),
            checkpoints,
            unsigned: Unsigned {
                count: unsigned,
                since: std::time::Instant::now(),
            },
            ticker: Some(ticker),
            revocation_head,
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
        self.wal.finish();
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
                // Before the answers: whoever revoked finds the feed already moved.
                self.publish_revocation_head();
                answers.into_iter().for_each(Answer::send);
                self.mirror.send(sealed);
                self.mirror.flush(flushes);
                self.wal.nudge();
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

impl Writer {
    /// Tells feed watchers when the newest revocation changed (one indexed read per batch).
    fn publish_revocation_head(&self) {
        match revocation_head(&self.conn) {
            Ok(seq) => {
                self.revocation_head.send_if_modified(|head| {
                    let moved = *head != seq;
                    *head = seq;
                    moved
                });
            }
            Err(e) => tracing::error!(error = %e, "store: cannot read the revocation feed's head"),
        }
    }
}

/// The feed position of the newest revocation (0 when there is none).
pub(super) fn revocation_head(conn: &Connection) -> Result<u64, StoreError> {
    Ok(conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM revocations")?
        .query_row([], |row| row.get(0))?)
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
        Command::RegisterToken(.., r)
        | Command::Audit(_, r)
        | Command::Disagreement(.., r)
        | Command::Decisions(.., r) => drop(r.send(failure(&why))),
        Command::LiftQuarantine(.., r) => drop(r.send(failure(&why))),
        Command::Revoke(_, r) => drop(r.send(failure(&why))),
        Command::Issue(_, r) => drop(r.send(failure(&why))),
        Command::Renew(_, r) => drop(r.send(failure(&why))),
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
        Command::RegisterToken(registration, reply) => {
            let (token, event) = *registration;
            let result = run(&mut |tx, events| {
                insert_token(tx, &token)?;
                events.push(event.clone());
                Ok(())
            });
            Answer::Unit(reply, result)
        }
        Command::Revoke(order, reply) => {
            let mut summary = RevokeSummary::default();
            let result = run(&mut |tx, events| {
                summary = lineage::revoke(tx, &order, events)?;
                Ok(())
            });
            Answer::Revoke(reply, result.map(|()| summary.clone()))
        }
        Command::LiftQuarantine(spiffe_id, by, now, reply) => {
            let mut lifted = false;
            let result = run(&mut |tx, events| {
                lifted = lineage::lift(tx, &spiffe_id, &by, now, events)?;
                Ok(())
            });
            Answer::Bool(reply, result.map(|()| lifted))
        }
        Command::Renew(record, reply) => {
            let mut outcome = RenewOutcome::Unknown;
            let result = run(&mut |tx, events| {
                outcome = lineage::renew(tx, &record, events)?;
                Ok(())
            });
            Answer::Renew(reply, result.map(|()| outcome.clone()))
        }
        Command::Audit(events, reply) => {
            let result = run(&mut |_, out| {
                out.extend(events.iter().cloned());
                Ok(())
            });
            Answer::Unit(reply, result)
        }
        Command::Disagreement(disagreement, keep, reply) => {
            let result = run(&mut |tx, _| record_disagreement(tx, &disagreement, keep));
            Answer::Unit(reply, result)
        }
        Command::Decisions(decisions, keep, older_than, reply) => {
            let result = run(&mut |tx, _| record_decisions(tx, &decisions, keep, older_than));
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

/// Inserts the row, then drops every row older than the newest `keep`.
fn record_disagreement(tx: &Connection, d: &Disagreement, keep: u32) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO shadow_disagreements (at, request_id, cluster, role, active_version,
             candidate_version, active, candidate, input)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        d.at,
        d.request_id,
        d.cluster,
        d.role,
        d.active_version,
        d.candidate_version,
        d.active,
        d.candidate,
        d.input
    ])?;
    let newest = tx.last_insert_rowid();
    tx.prepare_cached("DELETE FROM shadow_disagreements WHERE seq <= ?1")?
        .execute([newest - i64::from(keep)])?;
    Ok(())
}

/// Inserts the rows, then drops those older than `older_than` and all but the newest `keep`.
fn record_decisions(
    tx: &Connection,
    decisions: &[DecisionRecord],
    keep: u32,
    older_than: u64,
) -> Result<(), StoreError> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO decisions (at, request_id, cluster, role, policy_version, outcome, input)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for d in decisions {
        insert.execute(params![
            d.at,
            d.request_id,
            d.cluster,
            d.role,
            d.policy_version,
            d.outcome,
            d.input
        ])?;
    }
    let newest = tx.last_insert_rowid();
    tx.prepare_cached("DELETE FROM decisions WHERE seq <= ?1 OR at < ?2")?
        .execute(params![newest - i64::from(keep), older_than])?;
    Ok(())
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

/// The final step of a join, as a short sequence of checks and writes. The use is taken by a
/// conditional update, so two joins racing for the last use cannot both win, on this replica or
/// any other sharing the database. A refusal writes nothing (the caller audits it); only an
/// issuance adds rows and audit entries.
fn issue(
    tx: &Connection,
    r: &IssueRecord,
    events: &mut Vec<AuditEvent>,
) -> Result<IssueOutcome, StoreError> {
    let token = r.token.to_string();
    if let Some(earlier) = earlier_answer(tx, r, &token)? {
        return Ok(earlier);
    }
    let spiffe_id = r.identity.spiffe_id.to_string();
    if let Some(until) = lineage::quarantined_until(tx, &spiffe_id, r.now)? {
        return Ok(IssueOutcome::Quarantined { until });
    }
    let live = live_identities(tx, &spiffe_id, r.now)?;
    if !live.is_empty() && !r.supersede {
        return Ok(IssueOutcome::IdentityInUse);
    }
    let Some((uses, max_uses)) = consume_use(tx, &token, r.now)? else {
        return why_not_usable(tx, &token, r.now);
    };
    if !consume_nonce(tx, r)? {
        // Undo the use taken above: the savepoint rolls back only on error, so do it here.
        tx.execute("UPDATE tokens SET uses = uses - 1 WHERE id = ?1", [&token])?;
        return Ok(IssueOutcome::NonceReplayed);
    }
    supersede(tx, r, &live, events)?;
    record_identity(tx, r, &token)?;
    // The issuance entry records the allow decision too (its rules and policy): one entry
    // per issued join instead of two halves the audit volume of the hot path (measured: a
    // third of the store's CPU per join).
    let matched_rules = match &r.decision {
        AuditEvent::PolicyDecision { matched_rules, .. } => matched_rules.clone(),
        _ => Vec::new(),
    };
    let id = &r.identity;
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

/// A retry with an idempotency key seen before: the earlier response for the same CSR, a
/// conflict for another one.
fn earlier_answer(
    tx: &Connection,
    r: &IssueRecord,
    token: &str,
) -> Result<Option<IssueOutcome>, StoreError> {
    let Some((key, digest)) = &r.idempotency else {
        return Ok(None);
    };
    let earlier: Option<(String, String)> = tx
        .prepare_cached(
            "SELECT csr_digest, response FROM idempotency WHERE token_id = ?1 AND key = ?2",
        )?
        .query_row(params![token, key], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    Ok(earlier.map(|(earlier_digest, response)| {
        if earlier_digest == hex::encode(digest) {
            IssueOutcome::Replayed(response)
        } else {
            IssueOutcome::IdempotencyConflict
        }
    }))
}

/// Serials (with their tokens and expiry) of the unrevoked, unexpired identities carrying
/// `spiffe_id`.
fn live_identities(
    tx: &Connection,
    spiffe_id: &str,
    now: u64,
) -> Result<Vec<(String, String, u64)>, StoreError> {
    let mut stmt = tx.prepare_cached(
        "SELECT serial, token_id, not_after FROM identities
         WHERE spiffe_id = ?1 AND revoked_at IS NULL AND not_after > ?2",
    )?;
    let rows = stmt.query_map(params![spiffe_id, now], |row| {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Takes one use of the token if it has one left and is neither revoked nor expired; returns
/// the uses after and the maximum.
fn consume_use(tx: &Connection, token: &str, now: u64) -> Result<Option<(u32, u32)>, StoreError> {
    Ok(tx
        .prepare_cached(
            "UPDATE tokens SET uses = uses + 1
             WHERE id = ?1 AND uses < max_uses AND revoked_at IS NULL AND expires_at > ?2
             RETURNING uses, max_uses",
        )?
        .query_row(params![token, now], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?)
}

/// Marks the attestation nonce used for good; false when another join already did.
fn consume_nonce(tx: &Connection, r: &IssueRecord) -> Result<bool, StoreError> {
    Ok(tx
        .prepare_cached("INSERT OR IGNORE INTO used_nonces (nonce, expires_at) VALUES (?1, ?2)")?
        .execute(params![r.nonce, r.nonce_expires_at])?
        == 1)
}

/// Revokes the live identities a superseding join replaces, each audited.
fn supersede(
    tx: &Connection,
    r: &IssueRecord,
    live: &[(String, String, u64)],
    events: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    let spiffe_id = r.identity.spiffe_id.to_string();
    for (serial, token_id, not_after) in live {
        tx.prepare_cached(
            "UPDATE identities SET revoked_at = ?2, revoked_reason = 'superseded'
             WHERE serial = ?1 AND revoked_at IS NULL",
        )?
        .execute(params![serial, r.now])?;
        lineage::publish(
            tx,
            serial,
            &spiffe_id,
            token_id,
            "superseded",
            *not_after,
            r.now,
        )?;
        events.push(AuditEvent::IdentitySuperseded {
            request_id: r.request_id.clone(),
            spiffe_id: r.identity.spiffe_id.to_string(),
            serial: serial.clone(),
            token_id: token_id.clone(),
            superseded_by: r.identity.serial.to_string(),
            superseding_token_id: r.token.to_string(),
        });
    }
    Ok(())
}

/// A join's identity row, and the response an idempotent retry gets back.
fn record_identity(tx: &Connection, r: &IssueRecord, token: &str) -> Result<(), StoreError> {
    lineage::insert_identity(
        tx,
        &lineage::NewIdentity {
            identity: &r.identity,
            token,
            policy: &r.policy,
            now: r.now,
            predecessor: None,
            renewals: 0,
            attestation: &r.identity.attestation,
            idempotency: r.idempotency.as_ref(),
            response: &r.response,
        },
    )
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
