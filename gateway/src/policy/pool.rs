//! The threads policies run on: at most one per evaluation slot, started on demand, reused
//! most-recently-idle first. Guests never run on a tokio worker (a runaway one would hold the
//! worker for its whole deadline), and unlike tokio's blocking pool the thread count is bounded
//! by the slots, so the process does not grow a new thread (and its warmed stack) whenever a
//! call lands between one thread finishing and going idle.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OwnedSemaphorePermit;

/// A guest call and the evaluation slots it holds; the slots are released only once its
/// thread is idle again, so a caller that gets a slot always finds a thread.
pub(super) struct Job {
    /// The call (it sends its own result back).
    pub run: Box<dyn FnOnce() + Send>,
    /// The policy's share slot and the host slot.
    pub slots: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// The evaluation threads.
#[derive(Debug, Default)]
pub(super) struct EvalPool {
    /// Senders to the idle threads; the last one pushed is the warmest.
    idle: Mutex<Vec<Sender<Job>>>,
}

impl EvalPool {
    /// Runs `job` on an idle thread, or on a new one when none is idle (the slots the job
    /// holds bound how many can exist).
    pub(super) fn submit(self: &Arc<Self>, job: Job) -> std::io::Result<()> {
        let mut job = job;
        loop {
            let idle = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            match idle {
                Some(thread) => match thread.send(job) {
                    Ok(()) => return Ok(()),
                    // That thread is gone (it panicked); try the next one.
                    Err(returned) => job = returned.0,
                },
                None => return self.spawn(job),
            }
        }
    }

    fn spawn(self: &Arc<Self>, first: Job) -> std::io::Result<()> {
        let (to_me, inbox) = channel::<Job>();
        let pool = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("policy-eval".into())
            .spawn(move || work(first, &inbox, &to_me, &pool))?;
        Ok(())
    }
}

/// One thread's life: run a job, go idle (then free its slots), wait for the next; end when
/// the pool is gone.
fn work(first: Job, inbox: &Receiver<Job>, to_me: &Sender<Job>, pool: &std::sync::Weak<EvalPool>) {
    let mut job = first;
    loop {
        let Job { run, slots } = job;
        run();
        let Some(pool) = pool.upgrade() else { return };
        pool.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(to_me.clone());
        drop(pool);
        drop(slots);
        job = match inbox.recv() {
            Ok(next) => next,
            Err(_) => return,
        };
    }
}
