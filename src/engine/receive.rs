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
//! Each thread reads many bodies at once, whichever has bytes, so a sender
//! that stops mid-body holds one place, not a thread (`work`).
//!
//! When the CPU is busy with public work these threads get none of it: the
//! socket's buffer fills, TCP pushes back, and the sending node's splices
//! wait. That is the yield, by construction; the limiter on the sending
//! node bounds the rate on top of it.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::app::{PutSink, Reply};
use crate::engine::conn::{BodyHandoff, Conn, Next};
use crate::engine::offload::Completer;
use crate::engine::publish::Done;

/// Threads receiving peer bodies (per process). A body waits in the queue
/// while all are full; the sending peer's request timeout bounds that.
pub const RECEIVE_THREADS: usize = 4;
/// Bodies one receiving thread reads at once.
pub const BODIES_PER_THREAD_MAX: usize = 16;
/// Receiving threads waiting for a body with none in hand.
static IDLE_THREADS: AtomicUsize = AtomicUsize::new(0);
/// Longest a thread with bodies in hand goes without looking for new ones.
const NEW_BODY_CHECK: Duration = Duration::from_millis(5);
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

/// A body being read: its socket, where it goes and how much is left.
struct Receiving {
    fd: OwnedFd,
    sink: PutSink,
    left: u64,
    /// When bytes last came (or the limiter last let this body go on).
    last_progress: Instant,
    read_timeout: Duration,
    /// The limiter said wait: not read before this.
    paced_until: Option<Instant>,
    reply: ReplyTo,
}

/// Each thread reads up to [`BODIES_PER_THREAD_MAX`] bodies at once,
/// whichever has bytes: a sender that stops mid-body (frozen, or cut off)
/// holds one of them until `body_read_timeout_ms`, not a thread, so the
/// other peers' bodies keep coming in.
fn work(rx: &Mutex<Receiver<BodyJob>>) {
    let mut buf = vec![0u8; RECEIVE_BYTES];
    let mut bodies: Vec<Receiving> = Vec::new();
    loop {
        while bodies.len() < BODIES_PER_THREAD_MAX {
            let next = if bodies.is_empty() {
                // Nothing in hand: wait for a body.
                IDLE_THREADS.fetch_add(1, Ordering::Relaxed);
                let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                IDLE_THREADS.fetch_sub(1, Ordering::Relaxed);
                match next {
                    Ok(job) => Some(job),
                    Err(_) => return, // the engine is gone
                }
            } else if IDLE_THREADS.load(Ordering::Relaxed) > 0 {
                // An idle thread takes the next body: a burst is spread over
                // the threads (and the CPUs), not read by the first.
                None
            } else {
                // Every thread has bodies: take one if it is there now.
                match rx.try_lock() {
                    Ok(rx) => rx.try_recv().ok(),
                    Err(_) => None,
                }
            };
            let Some(job) = next else {
                break;
            };
            if let Some(body) = start(job) {
                bodies.push(body);
            }
        }
        step(&mut bodies, &mut buf);
    }
}

/// Begin a body: the bytes that came with the head go first. `None`: it
/// is already answered (all of it came with the head, or it failed).
fn start(job: BodyJob) -> Option<Receiving> {
    let BodyJob {
        fd,
        handoff,
        mut sink,
        read_timeout,
        reply,
    } = job;
    if !handoff.prefix.is_empty() {
        if let Err(error) = sink.write(&handoff.prefix) {
            drop(fd);
            answer(reply, Err(error));
            return None;
        }
    }
    let body = Receiving {
        fd,
        sink: *sink,
        left: handoff.remaining,
        last_progress: Instant::now(),
        read_timeout,
        paced_until: None,
        reply,
    };
    if body.left == 0 {
        body.end(None);
        return None;
    }
    Some(body)
}

impl Receiving {
    /// The body is all read (`None`) or failed with `error`: answer it.
    fn end(self, error: Option<Reply>) {
        // Close our duplicate before the engine sends the reply: the socket
        // stays open through the engine's own descriptor.
        drop(self.fd);
        answer(
            self.reply,
            match error {
                None => Ok(self.sink),
                Some(reply) => Err(reply),
            },
        );
    }
}

/// Hand the outcome to the connection's engine as its publisher would.
fn answer(reply: ReplyTo, outcome: Result<PutSink, Reply>) {
    let ReplyTo {
        index,
        generation,
        completer,
    } = reply;
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

/// One turn over the bodies in hand: wait until one has bytes (or the
/// limiter lets one go on, or a deadline passes, or it is time to look for
/// new bodies), read what came, and answer the bodies that ended.
fn step(bodies: &mut Vec<Receiving>, buf: &mut [u8]) {
    let now = Instant::now();
    let mut wait = if bodies.len() < BODIES_PER_THREAD_MAX {
        NEW_BODY_CHECK
    } else {
        PACE_WAIT_MAX
    };
    let mut polled = Vec::with_capacity(bodies.len());
    for (i, body) in bodies.iter_mut().enumerate() {
        if let Some(until) = body.paced_until {
            if now < until {
                wait = wait.min(until - now);
                continue;
            }
            // Waiting for the limiter is not the sender's stall.
            body.paced_until = None;
            body.last_progress = now;
        }
        let deadline = body.last_progress + body.read_timeout;
        wait = wait.min(deadline.saturating_duration_since(now));
        polled.push(i);
    }
    let mut fds: Vec<rustix::event::PollFd<'_>> = polled
        .iter()
        .map(|&i| rustix::event::PollFd::new(&bodies[i].fd, rustix::event::PollFlags::IN))
        .collect();
    let timeout = rustix::event::Timespec::try_from(wait).unwrap_or(rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 10_000_000,
    });
    let ready: Vec<bool> = match rustix::event::poll(&mut fds, Some(&timeout)) {
        Ok(_) => fds.iter().map(|f| !f.revents().is_empty()).collect(),
        Err(_) => vec![false; fds.len()],
    };
    drop(fds);
    let now = Instant::now();
    // Which bodies ended, and how; answered after the loop (highest index
    // first, so the indices stay valid while they are removed).
    let mut ended: Vec<(usize, Option<Reply>)> = Vec::new();
    for (&i, ready) in polled.iter().zip(ready) {
        let body = &mut bodies[i];
        if ready {
            match read_some(body, buf, now) {
                Ok(true) => ended.push((i, None)),
                Ok(false) => {}
                Err(reply) => ended.push((i, Some(reply))),
            }
        } else if body.paced_until.is_none()
            && now.duration_since(body.last_progress) >= body.read_timeout
        {
            ended.push((
                i,
                Some(Reply::error(408, "the request body stalled").closing()),
            ));
        }
    }
    for (i, error) in ended.into_iter().rev() {
        bodies.swap_remove(i).end(error);
    }
}

/// Read what the socket has of `body` into its sink. `Ok(true)`: the body
/// is all in; an error is the reply (closing).
#[allow(clippy::result_large_err)] // the error is the reply, as in `App`
fn read_some(body: &mut Receiving, buf: &mut [u8], now: Instant) -> Result<bool, Reply> {
    let want = buf
        .len()
        .min(usize::try_from(body.left).unwrap_or(usize::MAX));
    // The receiving node's limiter: while it says wait, the body stays in
    // the socket and TCP slows the sender.
    if let Err(until) = body.sink.pace(now, want as u64) {
        body.paced_until = Some(until.min(now + PACE_WAIT_MAX));
        return Ok(false);
    }
    match rustix::net::recv(&body.fd, &mut buf[..want], rustix::net::RecvFlags::DONTWAIT) {
        Ok((0, _)) => Err(Reply::error(400, "the request body ended early").closing()),
        Ok((n, _)) => {
            body.left -= n as u64;
            body.last_progress = now;
            body.sink.write(&buf[..n])?;
            Ok(body.left == 0)
        }
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => Ok(false),
        Err(_) => Err(Reply::error(400, "the request body could not be read").closing()),
    }
}
