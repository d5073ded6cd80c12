//! Engine threads: one io_uring ring per thread, each with its own
//! `SO_REUSEPORT` listener, driving plaintext HTTP/1 connections.
//!
//! ```text
//!  loop turn:  wait(≥1 completion or tick) ─► complete(batch ≤ 256)
//!                 ▲                               │
//!                 │                               ▼
//!            submit next ops ◄── dispatch: accept / recv / send / splice
//!                 ▲                               │
//!                 └──── every tick: deadlines (408, idle), stats ◄──┘
//! ```
//!
//! Each connection has at most one operation in flight (see
//! [`super::conn`]); a file body moves by `splice` file → pipe → socket
//! (pipes pooled per thread, which also bounds splices in flight) or, in
//! copy mode, by a read into a registered buffer and a send.
//!
//! Here: the engine's settings, bounds and counters, starting and stopping
//! its threads, and its metrics. One thread's loop (accept, recv, the
//! connection slots, deadlines, the drain) is `core_loop.rs`; serving file
//! bodies (splice, copy, cold reads) is `serve.rs`; the outgoing task client
//! (task slots, [`TaskSubmitter`], idle pooled connections) is `tasks.rs`.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_uring::Errno;

use super::conn::ConnLimits;
use super::threads::{CoreThreads, DrainCutter};
use crate::app::App;
use crate::fallback::Fallback;
use crate::outgoing::{self, OutgoingRequest};
use core_loop::CoreLoop;
pub use tasks::TaskSubmitter;

mod background;
mod core_loop;
mod serve;
mod spin;
mod tasks;
#[cfg(test)]
mod tests;

/// How file bodies leave a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileServingMode {
    /// splice file → pipe → socket: no copy through user space.
    Splice,
    /// read into a (registered) buffer, then send.
    Copy,
}

/// Settings of the engine threads, from the config.
#[derive(Clone, Copy, Debug)]
pub struct EngineSettings {
    /// Engine threads (each with its own ring and listener).
    pub threads: usize,
    /// Connections one thread serves at once; more are handed to the
    /// fallback, which has its own bound.
    pub connections_per_core_max: usize,
    /// Connections one client address may hold on one engine thread (0 = no cap). Per thread,
    /// so the accept path takes no lock: `SO_REUSEPORT` spreads one client's connections over
    /// the threads, and each thread keeps the address from filling it.
    pub connections_per_ip_max: usize,
    pub conn_limits: ConnLimits,
    pub mode: FileServingMode,
    /// Pipes per thread: also the bound on splices in flight per thread.
    pub pipes_per_core_max: usize,
    /// Size of each pipe (`F_SETPIPE_SZ`), in bytes.
    pub pipe_bytes: usize,
    /// Poll the ring this long after a turn with completions before
    /// sleeping (`engine_spin_us`); zero never polls.
    pub spin: Duration,
    /// At most one request per this long is measured from the kernel's
    /// receive time (`public_latency_sample_us`); zero measures none.
    pub latency_sample: Duration,
}

/// Submission queue entries per ring.
pub const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries per ring.
pub const CQ_ENTRIES: u32 = 4096;
const _: () = assert!(CQ_ENTRIES >= 2 * SQ_ENTRIES);
/// Completions handled per loop turn before deadlines are looked at again.
pub const COMPLETIONS_PER_TURN_MAX: usize = 256;
/// Registered buffers per ring (copy mode reads into them), and their size.
pub const FIXED_BUFFERS_COUNT: u16 = 64;
pub const FIXED_BUFFER_BYTES: usize = 256 * 1024;

/// io-wq workers the kernel may start per ring, for each of its two classes
/// (bounded: regular-file work; unbounded: the rest, which includes a
/// splice into a pipe). Cold reads beyond it wait in io-wq's queue, which
/// the pipe pool bounds (`PIPES_PER_CORE_MAX` cold reads per core at most).
pub const IOWQ_WORKERS_MAX: u32 = 8;
/// Read-ahead hints (`fadvise(WILLNEED)` through the ring) in flight per core.
pub const READAHEADS_PER_CORE_MAX: usize = 32;
/// How far past a cold chunk read-ahead reaches, in chunks (pipe sizes). A
/// client that stops reading stops the pump and so the read-ahead: at most
/// this many chunks are read for it beyond what it took.
pub const READAHEAD_CHUNKS: u64 = 2;

/// Outgoing tasks one thread runs at once.
pub const TASKS_PER_CORE_MAX: usize = 64;
/// Outgoing tasks waiting for a thread, per thread.
pub const TASKS_QUEUED_MAX: usize = 256;
/// Idle keep-alive connections of outgoing tasks one thread keeps.
pub const IDLE_TASK_CONNS_MAX: usize = 16;
/// An idle task connection is closed after this long, in ms: well under
/// a sluice peer's default `idle_timeout_ms`, so the pool seldom holds a
/// connection the peer has already closed.
pub const IDLE_TASK_CONN_MS: u64 = 20_000;
/// An empty splice pipe unused for this long, in ms, is closed, as idle task
/// connections are: the pool shrinks back after a burst (a new pipe costs a
/// `pipe2` and an `fcntl`, a few microseconds, against two descriptors and a
/// pipe's kernel buffers held for nothing).
pub const IDLE_PIPE: Duration = Duration::from_secs(20);

/// Counters one engine thread publishes every tick.
#[derive(Default)]
pub struct CoreStats {
    pub connections: AtomicU64,
    pub accepted_total: AtomicU64,
    pub accept_errors_total: AtomicU64,
    pub handed_off_total: AtomicU64,
    pub handoff_refused_total: AtomicU64,
    pub over_capacity_total: AtomicU64,
    pub per_ip_refused_total: AtomicU64,
    pub send_timeout_total: AtomicU64,
    pub submissions_total: AtomicU64,
    pub completions_total: AtomicU64,
    pub sq_full_total: AtomicU64,
    pub cq_overflow_total: AtomicU64,
    pub submit_refused_total: AtomicU64,
    pub open_file_hits_total: AtomicU64,
    pub open_file_misses_total: AtomicU64,
    pub fixed_buffers_registered: AtomicBool,
    /// Bytes of this ring's fixed buffers registered (pinned) so far: buffers are
    /// registered when first leased, so this is the most ever in use at once.
    pub fixed_buffers_pinned_bytes: AtomicU64,
    /// GETs whose artifact had to be opened off the engine thread.
    pub cold_opens_total: AtomicU64,
    /// File chunks read through the ring (io-wq) because they were not in
    /// the page cache.
    pub cold_reads_total: AtomicU64,
    pub cold_read_bytes_total: AtomicU64,
    /// Time connections waited for cold opens and cold reads, in µs.
    pub cold_wait_us_total: AtomicU64,
    /// io-wq worker limit of this ring (bounded class; 0: not set).
    pub iowq_workers_max: AtomicU64,
}

/// The running engine threads.
pub struct RingEngine {
    threads: CoreThreads,
    /// Replication's body sends (`background.rs`); `None` if its ring could
    /// not be set up (they then go from the engine rings).
    background: Option<background::BackgroundRing>,
    task_queues: Vec<std::sync::mpsc::SyncSender<OutgoingRequest>>,
    next_core: Arc<std::sync::atomic::AtomicUsize>,
    pub stats: Arc<Vec<CoreStats>>,
    pub fixed_buffers_note: Option<String>,
}

impl RingEngine {
    /// Start `settings.threads` engine threads. `listeners` holds one
    /// `SO_REUSEPORT` listener per thread. Fails (and starts nothing that
    /// keeps running) if a ring cannot be set up.
    pub fn start(
        settings: EngineSettings,
        listeners: Vec<TcpListener>,
        app: &Arc<App>,
        fallback: &Arc<Fallback>,
    ) -> std::io::Result<RingEngine> {
        let (task_queues, task_rxs): (Vec<_>, Vec<_>) = (0..listeners.len())
            .map(|_| std::sync::mpsc::sync_channel(TASKS_QUEUED_MAX))
            .unzip();
        let background_settings = settings;
        let (threads, stats, notes) = CoreThreads::start(
            ("sluice-ring", "engine"),
            listeners,
            task_rxs,
            app,
            fallback,
            move |core, listener, task_rx, shared, ready| {
                let signal = Arc::clone(&shared.signal);
                let mut engine = match CoreLoop::new(core, settings, listener, shared, task_rx) {
                    Ok(engine) => engine,
                    Err(err) => return ready.failed(err),
                };
                ready.ready(engine.driver.waker(), engine.fixed_buffers_note());
                engine.run(&signal);
            },
        )?;
        let pinned = Arc::clone(&stats);
        app.add_memory_part("fixed_buffers", move || {
            pinned
                .iter()
                .map(|s| s.fixed_buffers_pinned_bytes.load(Ordering::Relaxed))
                .sum()
        });
        let background = match background::BackgroundRing::start(
            &background_settings,
            Arc::clone(threads.signal()),
        ) {
            Ok(ring) => Some(ring),
            Err(err) => {
                tracing::warn!(%err, "cannot start the background ring; replication sends from the engine rings");
                None
            }
        };
        Ok(RingEngine {
            threads,
            background,
            task_queues,
            next_core: Default::default(),
            stats,
            fixed_buffers_note: notes.into_iter().flatten().next(),
        })
    }

    /// A handle that submits tasks from another thread (the replication
    /// thread) without owning the engine.
    pub fn submitter(&self) -> TaskSubmitter {
        TaskSubmitter {
            task_queues: self.task_queues.clone(),
            wakers: self.threads.wakers().to_vec(),
            next_core: Arc::clone(&self.next_core),
            signal: Arc::clone(self.threads.signal()),
            background: self
                .background
                .as_ref()
                .map(|b| (b.tx.clone(), b.waker.clone())),
        }
    }

    /// Queue an outgoing request on one of the rings (round robin). A full
    /// queue gives the request back: the caller decides whether to retry
    /// later (replication keeps it in its outbox).
    pub fn submit_task(&self, request: OutgoingRequest) -> Result<(), OutgoingRequest> {
        outgoing::Submit::submit(&self.submitter(), request)
    }

    /// A handle that ends the drain early.
    pub fn drain_cutter(&self) -> DrainCutter {
        self.threads.drain_cutter()
    }

    /// Stop accepting, let in-flight requests finish within `drain`, then
    /// let outgoing tasks in flight (replication sends) finish within
    /// `tasks` while new ones are refused (shutdown phase 3), then close
    /// what is left and join the threads.
    pub fn shutdown(mut self, drain: Duration, tasks: Duration) {
        self.threads.stop(drain, tasks);
        if let Some(background) = self.background.take() {
            background.join();
        }
    }

    /// Append the engine's series in the Prometheus text format.
    pub fn render_metrics(stats: &[CoreStats], out: &mut String) {
        use std::fmt::Write as _;
        let series: [super::threads::CoreSeries<CoreStats>; 19] = [
            (
                "sluice_ring_accept_errors_total",
                "counter",
                "Times the multishot accept ended in an error (EMFILE, ENFILE, ...); accept then pauses one tick.",
                |s| s.accept_errors_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_open_file_hits_total",
                "counter",
                "GETs answered from the per-core open-file cache.",
                |s| s.open_file_hits_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_open_file_misses_total",
                "counter",
                "GETs that opened the artifact file.",
                |s| s.open_file_misses_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_connections",
                "gauge",
                "Connections served by the ring, per core.",
                |s| s.connections.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_accepted_total",
                "counter",
                "Connections accepted by the ring.",
                |s| s.accepted_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_handed_off_total",
                "counter",
                "Connections handed to the fallback (TLS, h2c, over capacity).",
                |s| s.handed_off_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_handoff_refused_total",
                "counter",
                "Hand-offs the fallback refused (closed).",
                |s| s.handoff_refused_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_over_capacity_total",
                "counter",
                "Connections accepted while the ring was full.",
                |s| s.over_capacity_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_per_ip_refused_total",
                "counter",
                "Connections refused at accept (503 for HTTP/1): their address held connections_per_ip_max.",
                |s| s.per_ip_refused_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_send_timeout_total",
                "counter",
                "Connections closed: the client took no response bytes for send_timeout_ms.",
                |s| s.send_timeout_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_submissions_total",
                "counter",
                "Operations submitted to the ring.",
                |s| s.submissions_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_completions_total",
                "counter",
                "Completions reaped from the ring.",
                |s| s.completions_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_sq_full_total",
                "counter",
                "Times the submission queue was full.",
                |s| s.sq_full_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_cq_overflow_total",
                "counter",
                "Completions the kernel had to hold back (CQ overflow).",
                |s| s.cq_overflow_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_submit_refused_total",
                "counter",
                "Operations the driver refused (slots or queue full).",
                |s| s.submit_refused_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_cold_opens_total",
                "counter",
                "GETs whose artifact was not in memory and was opened off the engine thread.",
                |s| s.cold_opens_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_cold_reads_total",
                "counter",
                "Body chunks read through the ring because the body was found not in the page cache (io_uring reads from the cache what it holds, the rest on io-wq).",
                |s| s.cold_reads_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_cold_read_bytes_total",
                "counter",
                "Body bytes read through the ring because the body was found not in the page cache.",
                |s| s.cold_read_bytes_total.load(Ordering::Relaxed),
            ),
            (
                "sluice_ring_iowq_workers_max",
                "gauge",
                "io-wq worker limit per class of this ring (0: the kernel's own).",
                |s| s.iowq_workers_max.load(Ordering::Relaxed),
            ),
        ];
        super::threads::render_per_core(&series, stats, out);
        let name = "sluice_ring_cold_wait_seconds_total";
        let _ = writeln!(
            out,
            "# HELP {name} Time connections waited for cold opens and cold reads.\n# TYPE {name} counter"
        );
        for (core, s) in stats.iter().enumerate() {
            let secs = s.cold_wait_us_total.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "{name}{{core=\"{core}\"}} {secs}");
        }
    }
}

/// Errno helper for logs.
pub fn errno_name(errno: i32) -> String {
    Errno(errno)
        .name()
        .map_or_else(|| format!("errno {errno}"), str::to_string)
}
