//! Peers' replicated writes received off the engine threads.
//!
//! A replicated write's body is replication's work, and receiving it costs a
//! CPU: a copy out of the socket, sha256 over every byte, a copy into the
//! temporary file (the page cache). On an engine thread that work would run
//! at the priority of public requests and in front of them in the loop's
//! batch. So when the head of a peer's `PUT /_peer/v1/put/...` is decided
//! (`Conn` answers [`crate::engine::conn::Next::ReceiveInBackground`]), the
//! engine hands a duplicate of the socket, the body bytes that came with the
//! head and the upload's sink to this pool. Its threads run in the
//! background scheduling class (`crate::background`, `SCHED_IDLE` by
//! default), read exactly the body (never past it: the connection goes back
//! to the engine afterwards), hash and write it, publish it, and hand the
//! reply to the engine as its publisher would (`Completer`), which sends it
//! and serves the connection's next request. The engine holds the
//! connection meanwhile with no operation in flight.
//!
//! When the CPU is busy with public work these threads get none of it: the
//! socket's buffer fills, TCP pushes back, and the sending node's splices
//! wait. That is the yield, by construction; the limiter on the sending
//! node bounds the rate on top of it.

use std::os::fd::OwnedFd;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::app::{PutSink, Reply};
use crate::engine::conn::{BodyHandoff, Conn, Next};
use crate::engine::offload::Completer;
use crate::engine::publish::Done;

/// Threads receiving peer bodies (per process). A body waits in the queue
/// while all are busy; the sending peer's request timeout bounds that.
pub const RECEIVE_THREADS: usize = 4;
/// Bodies waiting for a receiving thread; past it the engine receives the
/// body itself, as any upload.
pub const RECEIVE_QUEUE_MAX: usize = 256;
/// Largest read of a body.
pub const RECEIVE_BYTES: usize = 256 * 1024;
/// Longest sleep for the limiter's tokens before looking again.
const PACE_WAIT_MAX: Duration = Duration::from_millis(100);

/// Where the reply goes: the connection's engine, as a published upload.
pub struct ReplyTo {
    pub index: u32,
    pub generation: u32,
    pub completer: Completer<Done>,
}

/// One body to receive.
pub struct BodyJob {
    /// A duplicate of the connection's socket (the engine keeps its own).
    pub fd: OwnedFd,
    pub handoff: BodyHandoff,
    pub sink: Box<PutSink>,
    /// `body_read_timeout_ms`: the longest wait for the next body bytes.
    pub read_timeout: Duration,
    pub reply: ReplyTo,
}

struct Pool {
    jobs: SyncSender<BodyJob>,
}

static POOL: OnceLock<Option<Pool>> = OnceLock::new();

fn pool() -> Option<&'static Pool> {
    POOL.get_or_init(|| {
        let (tx, rx) = sync_channel::<BodyJob>(RECEIVE_QUEUE_MAX);
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for i in 0..RECEIVE_THREADS {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new()
                .name(format!("sluice-peer-receive-{i}"))
                .spawn(move || {
                    crate::background::enter("peer-receive");
                    work(&rx);
                });
            match spawned {
                Ok(_) => started += 1,
                Err(err) => tracing::warn!(%err, "cannot start a peer body receiving thread"),
            }
        }
        (started > 0).then_some(Pool { jobs: tx })
    })
    .as_ref()
}

/// The engine's side of `Next::ReceiveInBackground`: hand `conn`'s body
/// (with `dup`, a duplicate of its socket) to the receiving threads. `None`:
/// handed over, the connection waits for its reply with no operation in
/// flight; `Some(next)`: received on the engine after all (no duplicate, or a
/// full queue), or closed.
pub fn hand_over(
    conn: &mut Conn,
    dup: std::io::Result<OwnedFd>,
    read_timeout: Duration,
    reply: ReplyTo,
    now: Instant,
) -> Option<Next> {
    let (Some(handoff), Some(sink)) = (conn.take_body_handoff(), conn.take_publish()) else {
        return Some(Next::Close);
    };
    let fd = match dup {
        Ok(fd) => fd,
        Err(_) => return Some(conn.receive_here(handoff, sink, now)),
    };
    let job = BodyJob {
        fd,
        handoff,
        sink: Box::new(sink),
        read_timeout,
        reply,
    };
    match submit(job) {
        Ok(()) => None,
        Err(job) => Some(conn.receive_here(job.handoff, *job.sink, now)),
    }
}

/// Queue a body; a full queue (or no thread) gives it back, and the engine
/// receives it itself.
#[allow(clippy::result_large_err)] // the job comes back whole, to be received here
pub fn submit(job: BodyJob) -> Result<(), BodyJob> {
    let Some(pool) = pool() else {
        return Err(job);
    };
    pool.jobs.try_send(job).map_err(|e| match e {
        TrySendError::Full(job) | TrySendError::Disconnected(job) => job,
    })
}

fn work(rx: &Mutex<Receiver<BodyJob>>) {
    let mut buf = vec![0u8; RECEIVE_BYTES];
    loop {
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(job) = next else {
            return;
        };
        let BodyJob {
            fd,
            handoff,
            sink,
            read_timeout,
            reply,
        } = job;
        let ReplyTo {
            index,
            generation,
            completer,
        } = reply;
        let outcome = receive(&fd, handoff, *sink, read_timeout, &mut buf);
        // Close our duplicate before the engine sends the reply: the socket
        // stays open through the engine's own descriptor.
        drop(fd);
        match outcome {
            Ok(sink) => match sink.finish_parts() {
                Ok(reply) => completer.complete(Done {
                    index,
                    generation,
                    reply,
                }),
                Err(later) => later.run(Box::new(move |reply| {
                    completer.complete(Done {
                        index,
                        generation,
                        reply,
                    })
                })),
            },
            Err(reply) => completer.complete(Done {
                index,
                generation,
                reply,
            }),
        }
    }
}

/// Read the rest of the body into `sink`; an error is the reply (closing).
#[allow(clippy::result_large_err)] // the error is the reply, as in `App`
fn receive(
    fd: &OwnedFd,
    handoff: BodyHandoff,
    mut sink: PutSink,
    read_timeout: Duration,
    buf: &mut [u8],
) -> Result<PutSink, Reply> {
    if !handoff.prefix.is_empty() {
        sink.write(&handoff.prefix)?;
    }
    let mut left = handoff.remaining;
    let mut last_progress = Instant::now();
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        // The receiving node's limiter: while it says wait, the body stays
        // in the socket and TCP slows the sender. Waiting here is not the
        // client's stall.
        let now = Instant::now();
        if let Err(until) = sink.pace(now, want as u64) {
            std::thread::sleep(until.saturating_duration_since(now).min(PACE_WAIT_MAX));
            last_progress = Instant::now();
            continue;
        }
        let waited = last_progress.elapsed();
        if waited >= read_timeout {
            return Err(Reply::error(408, "the request body stalled").closing());
        }
        let timeout = rustix::event::Timespec::try_from(read_timeout - waited).unwrap_or(
            rustix::event::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            },
        );
        let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(_) => return Err(Reply::error(400, "the request body could not be read").closing()),
        }
        match rustix::net::recv(fd, &mut buf[..want], rustix::net::RecvFlags::DONTWAIT) {
            Ok((0, _)) => {
                return Err(Reply::error(400, "the request body ended early").closing());
            }
            Ok((n, _)) => {
                left -= n as u64;
                last_progress = Instant::now();
                sink.write(&buf[..n])?;
            }
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
            Err(_) => return Err(Reply::error(400, "the request body could not be read").closing()),
        }
    }
    Ok(sink)
}
