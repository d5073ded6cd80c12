//! Opening cold artifacts off the engine threads.
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
use super::offload::Offload;
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
    Offload::start(
        format!("sluice-open-{core}"),
        OPEN_QUEUE_MAX,
        waker,
        move |job: Job| {
            let started = Instant::now();
            warm(&app, &job.namespace, &job.key);
            Done {
                index: job.index,
                generation: job.generation,
                waited: started.elapsed(),
            }
        },
    )
}

/// Bring what the ring reads next for `namespace/key` into memory: the
/// path's dentries and inode and the header (by opening it), and a body
/// small enough to go inline with the head. Errors are the ring's to meet
/// when it decides again; nothing is answered from here.
fn warm(app: &App, namespace: &str, key: &str) {
    let artifact = match app.store.get(namespace, key) {
        Ok(Some(artifact)) => artifact,
        // A local miss with an object-store tier: read it through here, on
        // the opener thread (the fetch itself runs on the tier's runtime).
        Ok(None) => match app.tier() {
            Some(tier) => {
                tier.read_through(namespace, key);
                return;
            }
            None => return,
        },
        Err(_) => return,
    };
    if artifact.len <= INLINE_BODY_BYTES_MAX {
        let mut body = vec![0u8; artifact.len as usize];
        let _ = artifact.file.read_exact_at(&mut body, artifact.body_offset);
    }
}
