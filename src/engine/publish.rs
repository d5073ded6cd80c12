//! Publishing uploads off the engine threads.
//!
//! Publishing a PUT (verify the digest, link the temp file into place and,
//! with `fsync = always`, fdatasync it and its directory) blocks for as long
//! as the disk takes. On an engine thread that would stall every other
//! connection of the core for the duration of an fsync, so each core has a
//! publisher thread: the ring hands it the finished upload and goes on, and
//! the thread sends the reply back and wakes the ring.

use sluice_uring::Waker;

use super::offload::{Completer, Offload};
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
pub type Publisher = Offload<Job, Done>;

/// Start the publisher of `core`; it wakes the ring through `waker` after
/// each reply.
pub fn start(core: usize, waker: Waker) -> std::io::Result<Publisher> {
    Offload::start_deferred(
        format!("sluice-publish-{core}"),
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
