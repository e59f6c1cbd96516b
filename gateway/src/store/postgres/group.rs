//! Group commit for the hot path. The changes of joins, renewals, audited refusals and
//! recorded decisions are queued to a few tasks, each of which runs many of them in one
//! transaction, each under a savepoint (a refusal rolls back to it and takes nothing of the
//! others with it), seals all their audit entries onto the replica's chain and commits once:
//! one commit, one WAL flush and one hold of the chain per group instead of per change, as
//! SQLite's writer does. Measured with `pgbench` on this machine kind (one issuance's
//! statements as a function): 263–277 µs of server CPU per issuance committed alone, 127–134
//! µs in transactions of 16. `BEGIN` and each savepoint go in the round trip of the change's
//! first statement, so a change kept costs its own round trips and nothing more; several
//! groups are in flight at once (on connections of their own), since the round trips of one
//! group follow one another and the commits are what the chain orders.
//!
//! A group that fails as a whole (its connection lost, its commit refused) runs again, all
//! of it, in a fresh transaction, with the bound and backoff of [`Db::write`]; a commit whose
//! outcome is unknown is never repeated: every change of it is answered `CommitUnknown`.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::super::{BoxFuture, StoreError};
use super::connect::{Applied, Change, Db, Retries, Tx, retryable};

/// Most changes in one transaction. Each holds a subtransaction until the commit, and
/// PostgreSQL keeps 64 of them per backend in shared memory before every other backend's
/// snapshots have to look them up on disk.
const GROUP: usize = 32;
/// Groups in flight at once.
const IN_FLIGHT: usize = 4;
/// Changes waiting for a group; a caller beyond them waits for room.
const QUEUE: usize = IN_FLIGHT * GROUP;
/// Times one change is run again alone after its own statement failed with an error that
/// proves nothing committed (a deadlock with another replica).
const RETRIES: u32 = 3;

/// What running a change in the group's transaction came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Keep what it wrote; answer once the group has committed.
    Keep,
    /// It wrote nothing that stays (rolled back to its savepoint); answer with the group.
    Discard,
    /// Run it again in the next group (a concurrent change it waited for has committed).
    Again,
}

/// A change waiting for its group, with the caller's answer.
pub(super) trait Queued: Send {
    /// Runs the change inside the group's transaction.
    fn apply<'a>(&'a mut self, tx: &'a mut Tx) -> BoxFuture<'a, Result<Step, StoreError>>;
    /// Its own statement failed (the group's transaction goes on without it): run again in
    /// the next group, or answered with `error`.
    fn failed(&mut self, error: StoreError) -> Step;
    /// Answers the caller: what the change decided, or the group's failure.
    fn answer(self: Box<Self>, group_failed: Option<&Arc<StoreError>>);
}

struct Pending<C: Change> {
    change: C,
    decided: Option<Result<C::Output, StoreError>>,
    reply: oneshot::Sender<Result<C::Output, StoreError>>,
    retries: u32,
}

impl<C> Queued for Pending<C>
where
    C: Change + Send + 'static,
{
    fn apply<'a>(&'a mut self, tx: &'a mut Tx) -> BoxFuture<'a, Result<Step, StoreError>> {
        Box::pin(async move {
            self.decided = None;
            Ok(match self.change.apply(tx).await? {
                Applied::Commit(output) => {
                    self.decided = Some(Ok(output));
                    Step::Keep
                }
                Applied::Refuse(output) => {
                    self.decided = Some(Ok(output));
                    Step::Discard
                }
                Applied::Again => Step::Again,
            })
        })
    }

    fn failed(&mut self, error: StoreError) -> Step {
        if retryable(&error) && self.retries < RETRIES {
            self.retries += 1;
            tracing::debug!(error = %error, "store: change retried in the next group");
            return Step::Again;
        }
        self.decided = Some(Err(error));
        Step::Discard
    }

    fn answer(self: Box<Self>, group_failed: Option<&Arc<StoreError>>) {
        let answer = match group_failed {
            Some(e) => Err(StoreError::Group(e.clone())),
            None => self.decided.unwrap_or(Err(StoreError::Closed)),
        };
        // A caller that gave up (its request timed out) no longer waits for the answer.
        let _ = self.reply.send(answer);
    }
}

/// The queue and the tasks that commit it in groups.
pub(super) struct Grouper {
    inbox: mpsc::Sender<Box<dyn Queued>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

type Queue = Arc<tokio::sync::Mutex<mpsc::Receiver<Box<dyn Queued>>>>;

impl Grouper {
    pub(super) fn start(db: Arc<Db>) -> Self {
        let (inbox, queue) = mpsc::channel(QUEUE);
        let queue: Queue = Arc::new(tokio::sync::Mutex::new(queue));
        let tasks = (0..IN_FLIGHT)
            .map(|_| tokio::spawn(run(db.clone(), queue.clone())))
            .collect();
        Self { inbox, tasks }
    }

    /// Runs `change` in the next group and returns its answer once the group committed.
    pub(super) async fn write<C>(&self, change: C) -> Result<C::Output, StoreError>
    where
        C: Change + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            change,
            decided: None,
            reply,
            retries: 0,
        };
        self.inbox
            .send(Box::new(pending))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Commits what is queued, then stops.
    pub(super) async fn finish(self) {
        drop(self.inbox);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Takes what is queued (at most [`GROUP`], after the changes of its last group that run
/// again), commits it as one group, and again, until every sender is gone and the queue is
/// empty. One task at a time waits on the queue; a task with changes to run again takes what
/// is queued only when no other holds the queue, and otherwise runs them alone (the holder
/// may wait for a change that never comes).
async fn run(db: Arc<Db>, queue: Queue) {
    let mut group: Vec<Box<dyn Queued>> = Vec::with_capacity(GROUP);
    loop {
        if group.is_empty() {
            let mut queue = queue.lock().await;
            match queue.recv().await {
                Some(first) => group.push(first),
                None => return,
            }
            take_queued(&mut queue, &mut group);
        } else if let Ok(mut queue) = queue.try_lock() {
            take_queued(&mut queue, &mut group);
        }
        group = commit_group(&db, std::mem::take(&mut group)).await;
    }
}

/// Adds what is queued to `group`, up to [`GROUP`].
fn take_queued(queue: &mut mpsc::Receiver<Box<dyn Queued>>, group: &mut Vec<Box<dyn Queued>>) {
    while group.len() < GROUP {
        match queue.try_recv() {
            Ok(next) => group.push(next),
            Err(_) => break,
        }
    }
}

/// Commits `group` (again after a failure that proves nothing committed, within the bound of
/// [`Db::write`]), answers each change, and returns those to run in the next group.
async fn commit_group(db: &Db, mut group: Vec<Box<dyn Queued>>) -> Vec<Box<dyn Queued>> {
    let mut retries = Retries::of("group");
    loop {
        match attempt_group(db, &mut group).await {
            Ok(steps) => {
                let mut again = Vec::new();
                for (queued, step) in group.into_iter().zip(steps) {
                    match step {
                        Step::Again => again.push(queued),
                        Step::Keep | Step::Discard => queued.answer(None),
                    }
                }
                return again;
            }
            Err(e) if retries.again_after(&e).await => {}
            Err(e) => {
                let e = Arc::new(e);
                group.into_iter().for_each(|queued| queued.answer(Some(&e)));
                return Vec::new();
            }
        }
    }
}

/// One transaction for the whole group, each change under a savepoint `g` of its own (nested
/// in the one before, so a change kept costs no statement to release it), then the seal and
/// the commit. A group of one needs no savepoint: its refusal rolls the transaction back.
/// Returns each change's step.
async fn attempt_group(db: &Db, group: &mut [Box<dyn Queued>]) -> Result<Vec<Step>, StoreError> {
    let mut tx = db.begin().await?;
    let single = group.len() == 1;
    let applied = async {
        tx.send_ahead("BEGIN");
        let mut steps = Vec::with_capacity(group.len());
        for queued in group.iter_mut() {
            if !single {
                tx.send_ahead("SAVEPOINT g");
            }
            let queued_before = (tx.events.len(), tx.revocations.len());
            let step = match queued.apply(&mut tx).await {
                Ok(step) => step,
                // The connection is gone, and with it the whole transaction.
                Err(StoreError::Postgres(e)) if e.as_db_error().is_none() => {
                    return Err(StoreError::Postgres(e));
                }
                Err(e) => queued.failed(e),
            };
            steps.push(step);
            if step != Step::Keep {
                tx.events.truncate(queued_before.0);
                tx.revocations.truncate(queued_before.1);
                tx.flush_ahead().await?;
                if single {
                    tx.end("ROLLBACK").await?;
                    return Ok((steps, false));
                }
                tx.end("ROLLBACK TO SAVEPOINT g").await?;
            }
        }
        // A last change that sent no statement (an audit entry alone) left its savepoint, or
        // the group's `BEGIN`, waiting.
        tx.flush_ahead().await?;
        Ok((steps, true))
    }
    .await;
    match applied {
        Ok((steps, commit)) => {
            if commit {
                db.commit(&mut tx).await?;
            }
            Ok(steps)
        }
        Err(e) => {
            tx.discard();
            Err(e)
        }
    }
}
