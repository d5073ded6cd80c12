//! Each core's opener thread: opening cold artifacts off the engine threads.
//!
//! The ring opens artifacts without waiting for the disk (`Store::get_nowait`). When the
//! path, the header or a small body is not in memory, the request goes to this core's opener
//! thread, which does the open and reads what the ring will need (the header, and a body
//! small enough to be sent inline) with ordinary blocking calls, then wakes the ring. The
//! connection then decides again, now from memory. Nothing is handed across but the names:
//! the decision is always made on the engine thread, from the state of the store at that
//! moment.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_uring::Waker;

use super::conn::INLINE_BODY_BYTES_MAX;
use super::offload::{Completer, Offload};
use crate::app::App;

/// Cold opens queued for one core's opener. A full queue makes the engine
/// open on its own thread (slower for the others, never unbounded).
pub const OPEN_QUEUE_MAX: usize = 256;

/// Open `namespace/key` for connection `index` (generation `generation`).
pub struct Job {
    pub index: u32,
    pub generation: u32,
    pub namespace: String,
    pub key: String,
}

/// The open is done (whatever it found): decide again.
pub struct Done {
    pub index: u32,
    pub generation: u32,
    /// How long the disk kept the opener busy.
    pub waited: Duration,
}

/// One core's opener thread.
pub type Opener = Offload<Job, Done>;

/// Start the opener of `core`.
pub fn start(core: usize, waker: Waker, app: Arc<App>) -> std::io::Result<Opener> {
    Offload::start_deferred(
        format!("sluice-open-{core}"),
        OPEN_QUEUE_MAX,
        waker,
        move |job: Job, completer: &Completer<Done>| {
            let started = Instant::now();
            let done = move |started: Instant| Done {
                index: job.index,
                generation: job.generation,
                waited: started.elapsed(),
            };
            match warm(&app, &job.namespace, &job.key) {
                Warmed::Ready => Some(done(started)),
                // A local miss with an object-store tier: the read-through
                // runs on the tier's runtime and answers the ring from there,
                // so this thread goes on with other cold opens meanwhile.
                Warmed::Missing => match app.miss_reader() {
                    Some(tier) => {
                        let completer = completer.clone();
                        tier.read_through_then(job.namespace, job.key, move |_| {
                            completer.complete(done(started));
                        });
                        None
                    }
                    None => Some(done(started)),
                },
            }
        },
    )
}

/// What the opener found.
enum Warmed {
    /// Open (or failed in a way the ring meets when it decides again).
    Ready,
    /// Not in the store.
    Missing,
}

/// Bring what the ring reads next for `namespace/key` into memory: the
/// path's dentries and inode and the header (by opening it), and a body
/// small enough to go inline with the head. Errors are the ring's to meet
/// when it decides again; nothing is answered from here.
fn warm(app: &App, namespace: &str, key: &str) -> Warmed {
    let artifact = match app.store.get(namespace, key) {
        Ok(Some(artifact)) => artifact,
        Ok(None) => return Warmed::Missing,
        Err(_) => return Warmed::Ready,
    };
    if artifact.len <= INLINE_BODY_BYTES_MAX {
        let mut body = vec![0u8; artifact.len as usize];
        let _ = artifact.file.read_exact_at(&mut body, artifact.body_offset);
    }
    Warmed::Ready
}
