//! Publishing uploads off the engine threads.
//!
//! Publishing a PUT (verify the digest, link the temp file into place and,
//! with `fsync = always`, fdatasync it and its directory) blocks for as long
//! as the disk takes. On an engine thread that would stall every other
//! connection of the core for the duration of an fsync, so each core has a
//! publisher thread: the ring hands it the finished upload and goes on, and
//! the thread sends the reply back and wakes the ring.

use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender, TrySendError};
use std::thread::JoinHandle;

use sluice_uring::Waker;

use crate::app::{PutSink, Reply};

/// Uploads queued for one core's publisher. A full queue makes the engine
/// publish on its own thread (slower for the others, never unbounded).
pub const PUBLISH_QUEUE_MAX: usize = 64;

/// A finished upload of connection `index` (generation `generation`).
pub struct Job {
    pub index: u32,
    pub generation: u32,
    /// Boxed: a sink is a few hundred bytes (file, hasher state), and the
    /// queue and a refused submit move it around.
    pub sink: Box<PutSink>,
}

/// Its reply.
pub struct Done {
    pub index: u32,
    pub generation: u32,
    pub reply: Reply,
}

/// One core's publisher thread and its two queues.
pub struct Publisher {
    jobs: Option<SyncSender<Job>>,
    // Unbounded, but holds at most one reply per job the ring submitted
    // since it last drained it, and each connection has at most one job:
    // bounded by `connections_per_core_max`.
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
}

impl Publisher {
    /// Start the publisher of `core`; it wakes the ring through `waker`
    /// after each reply.
    pub fn start(core: usize, waker: Waker) -> std::io::Result<Publisher> {
        let (jobs_tx, jobs_rx) = sync_channel::<Job>(PUBLISH_QUEUE_MAX);
        let (done_tx, done_rx): (Sender<Done>, Receiver<Done>) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("sluice-publish-{core}"))
            .spawn(move || {
                // Ends when the engine drops its sender (after the queue is
                // worked off) or stops reading replies.
                for job in jobs_rx {
                    let reply = job.sink.finish();
                    let done = Done {
                        index: job.index,
                        generation: job.generation,
                        reply,
                    };
                    if done_tx.send(done).is_err() {
                        break;
                    }
                    waker.wake();
                }
            })?;
        Ok(Publisher {
            jobs: Some(jobs_tx),
            done: done_rx,
            thread: Some(thread),
        })
    }

    /// Queue an upload; a full queue (or a stopped thread) gives it back.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        match &self.jobs {
            Some(jobs) => jobs.try_send(job).map_err(|e| match e {
                TrySendError::Full(job) | TrySendError::Disconnected(job) => job,
            }),
            None => Err(job),
        }
    }

    /// A reply that is ready, if any. Never blocks.
    pub fn try_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }
}

impl Drop for Publisher {
    /// Uploads already queued are still published (their clients may be
    /// gone, but nothing half-written becomes visible either way); then the
    /// thread ends.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
