//! Threads beside an engine thread for work that may block on the disk.
//!
//! The engine hands a job over a bounded queue and goes on serving; a thread does the
//! blocking part, sends the result back and wakes the ring. Publishing uploads (fsync) and
//! opening cold artifacts (a path lookup or header read from the disk) both work this way,
//! each on threads of their own so a long fsync never delays a cold open. Publishing uses
//! a small pool: a commit mostly waits for a sync another commit leads (group commit), and
//! a commit can only share a sync if it is waiting at the same time.

use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use sluice_uring::Waker;

/// Blocking worker threads with a bounded job queue and their replies.
pub struct Offload<J, D> {
    jobs: Option<Jobs<J>>,
    // Unbounded, but holds at most one reply per job the ring submitted since
    // it last drained it, and each connection has at most one job in flight:
    // bounded by `connections_per_core_max`.
    done: Receiver<D>,
    /// Replies from elsewhere (see [`Offload::completer`]).
    completer: Completer<D>,
    threads: Vec<JoinHandle<()>>,
}

/// Completes a job later, from any thread: for work the thread only starts
/// (a read-through from the object-store tier, which runs on the tier's
/// runtime), so the thread goes on with the next job meanwhile. Each job is
/// still answered once, so the reply channel keeps its bound.
pub struct Completer<D> {
    done: Sender<D>,
    waker: Waker,
}

// Not derived: a derive would ask `D: Clone`, and replies need not be.
impl<D> Clone for Completer<D> {
    fn clone(&self) -> Self {
        Completer {
            done: self.done.clone(),
            waker: self.waker.clone(),
        }
    }
}

impl<D> Completer<D> {
    pub fn complete(&self, done: D) {
        if self.done.send(done).is_ok() {
            self.waker.wake();
        }
    }
}

impl<J: Send + 'static, D: Send + 'static> Offload<J, D> {
    /// Start thread `name`, taking at most `queue_max` queued jobs; it runs
    /// `work` on each and wakes the ring through `waker` after each reply.
    pub fn start(
        name: String,
        queue_max: usize,
        waker: Waker,
        mut work: impl FnMut(J) -> D + Send + 'static,
    ) -> std::io::Result<Offload<J, D>> {
        Self::start_deferred(name, queue_max, waker, move |job, _| Some(work(job)))
    }

    /// [`Offload::start`] where `work` may answer a job later through the
    /// [`Completer`] instead (it returns `None` then, and must complete it
    /// exactly once).
    pub fn start_deferred(
        name: String,
        queue_max: usize,
        waker: Waker,
        mut work: impl FnMut(J, &Completer<D>) -> Option<D> + Send + 'static,
    ) -> std::io::Result<Offload<J, D>> {
        let (jobs_tx, jobs_rx) = sync_channel::<J>(queue_max);
        let (done_tx, done_rx): (Sender<D>, Receiver<D>) = channel();
        let completer = Completer {
            done: done_tx.clone(),
            waker: waker.clone(),
        };
        let own_completer = completer.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            // Ends when the engine drops its sender (after the queue is
            // worked off) or stops reading replies.
            for job in jobs_rx {
                let Some(done) = work(job, &completer) else {
                    continue;
                };
                if done_tx.send(done).is_err() {
                    break;
                }
                waker.wake();
            }
        })?;
        Ok(Offload {
            jobs: Some(Jobs::One(jobs_tx)),
            done: done_rx,
            completer: own_completer,
            threads: vec![thread],
        })
    }

    /// [`Offload::start_deferred`] with `workers` threads (named `{name}.{i}`) taking jobs
    /// from the one queue, so up to `workers` jobs block at once.
    pub fn start_pool(
        name: &str,
        workers: usize,
        queue_max: usize,
        waker: Waker,
        work: impl Fn(J, &Completer<D>) -> Option<D> + Send + Sync + 'static,
    ) -> std::io::Result<Offload<J, D>> {
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<J>(queue_max);
        let (done_tx, done_rx): (Sender<D>, Receiver<D>) = channel();
        let work = Arc::new(work);
        let mut offload = Offload {
            jobs: Some(Jobs::Pool(jobs_tx)),
            done: done_rx,
            completer: Completer {
                done: done_tx.clone(),
                waker: waker.clone(),
            },
            threads: Vec::with_capacity(workers),
        };
        for i in 0..workers.max(1) {
            let (jobs_rx, work, done_tx) = (jobs_rx.clone(), Arc::clone(&work), done_tx.clone());
            let completer = Completer {
                done: done_tx.clone(),
                waker: waker.clone(),
            };
            let waker = waker.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{name}.{i}"))
                .spawn(move || loop {
                    // Every idle worker waits on the queue; a job wakes one.
                    let Ok(job) = jobs_rx.recv() else { break };
                    let Some(done) = work(job, &completer) else {
                        continue;
                    };
                    if done_tx.send(done).is_err() {
                        break;
                    }
                    waker.wake();
                });
            match spawned {
                Ok(thread) => offload.threads.push(thread),
                // Dropping `offload` ends and joins the ones started.
                Err(e) => return Err(e),
            }
        }
        Ok(offload)
    }

    /// Queue a job; a full queue (or a stopped thread) gives it back.
    pub fn submit(&self, job: J) -> Result<(), J> {
        use crossbeam_channel::TrySendError as PoolError;
        use std::sync::mpsc::TrySendError as OneError;
        match &self.jobs {
            Some(Jobs::One(jobs)) => jobs.try_send(job).map_err(|e| match e {
                OneError::Full(job) | OneError::Disconnected(job) => job,
            }),
            Some(Jobs::Pool(jobs)) => jobs.try_send(job).map_err(|e| match e {
                PoolError::Full(job) | PoolError::Disconnected(job) => job,
            }),
            None => Err(job),
        }
    }

    /// Answers on this queue from another thread: a job the engine gave to
    /// someone else (a peer body received in the background) comes back as
    /// one of this thread's replies.
    pub fn completer(&self) -> Completer<D> {
        self.completer.clone()
    }

    /// A reply that is ready, if any. Never blocks.
    pub fn try_done(&self) -> Option<D> {
        self.done.try_recv().ok()
    }
}

/// The job queue. One thread receives from std's channel; a pool's workers all
/// receive from crossbeam's bounded channel (behind a mutex, std's single
/// receiver made each job wake two workers: the one that took it and the next
/// in line for the lock). Not crossbeam for one thread: its receiver calls
/// `sched_yield` four times before it sleeps, where std's only spins, and
/// with the openers on it `bench/mesh`'s public p99 under replication was
/// twice what it is on std's (docs/benchmarks.md, issue 21).
enum Jobs<J> {
    One(SyncSender<J>),
    Pool(crossbeam_channel::Sender<J>),
}

impl<J, D> Drop for Offload<J, D> {
    /// Jobs already queued are still worked off (for uploads: their clients
    /// may be gone, but nothing half-written becomes visible either way);
    /// then the thread ends.
    fn drop(&mut self) {
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
