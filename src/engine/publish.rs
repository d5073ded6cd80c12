//! Publishing uploads off the engine threads.
//!
//! Publishing a PUT (verify the digest, make it durable, rename it into
//! place, record it in the outboxes) blocks for as long as the disk takes.
//! On an engine thread that would stall every other connection of the core
//! for the duration of a sync, so each core has a pool of
//! [`PUBLISHERS_PER_CORE`] publisher threads: the ring hands one the finished
//! upload and goes on, and the thread sends the reply back and wakes the
//! ring. A pool, not one thread: under `fsync = always` a commit mostly
//! waits for a group sync (`store::commit`), and the uploads of a core can
//! only share one if they wait for it together. One thread per core made the
//! core's durable PUTs wait for each other's syncs one after another.

use sluice_uring::Waker;

use super::offload::{Completer, Offload};
use crate::app::{PutSink, Reply};

/// Uploads queued for one core's publishers. A full queue makes the engine
/// publish on its own thread (slower for the others, never unbounded).
pub const PUBLISH_QUEUE_MAX: usize = 64;
/// Publisher threads per core: commits of one core in flight at once. Each
/// mostly sleeps in a sync (a journal or directory sync shared with others).
pub const PUBLISHERS_PER_CORE: usize = 8;
const _: () = assert!(PUBLISHERS_PER_CORE <= PUBLISH_QUEUE_MAX);

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

/// One core's publisher threads and their two queues.
pub type Publisher = Offload<Job, Done>;

/// Start the publishers of `core`; they wake the ring through `waker` after
/// each reply.
pub fn start(core: usize, waker: Waker) -> std::io::Result<Publisher> {
    Offload::start_pool(
        &format!("sluice-publish-{core}"),
        PUBLISHERS_PER_CORE,
        PUBLISH_QUEUE_MAX,
        waker,
        |job: Job, completer: &Completer<Done>| {
            let (index, generation) = (job.index, job.generation);
            match job.sink.finish_parts() {
                Ok(reply) => Some(Done {
                    index,
                    generation,
                    reply,
                }),
                // A step after the commit (a write-through to the object-store
                // tier) answers the ring itself when it is done; this thread
                // goes on publishing.
                Err(later) => {
                    let completer = completer.clone();
                    later.run(Box::new(move |reply| {
                        completer.complete(Done {
                            index,
                            generation,
                            reply,
                        })
                    }));
                    None
                }
            }
        },
    )
}
