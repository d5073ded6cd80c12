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

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_uring::{
    residency, Completion, Driver, DriverConfig, Errno, FixedLease, IoBuf, Op, OpId, OpKind, Pipe,
    PipePool, Residency, Returned, RingConfig, SharedFd, Token, Waker,
};

use super::conn::{Conn, ConnLimits, Next};
use super::opener::{self, Opener};
use super::publish::{self, Done, Job, Publisher};
use super::threads::{CoreShared, CoreThreads, DrainCutter, StopSignal};
use super::{OPEN_FILES_PER_CORE_MAX, OPEN_FILES_SWEEP_TICKS, PUMP_BYTES_PER_TURN, TICK_MS};
use crate::app::App;
use crate::fallback::Fallback;
use crate::metrics::BytePath;
use crate::outgoing::{self, OutgoingRequest, Task, TaskError, TaskState, RESPONSE_READ_BYTES};
use crate::peer_limit::PerIpCounts;
use crate::store::OpenCache;

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

/// Submits outgoing tasks to the rings from any thread; see
/// [`RingEngine::submit_task`]. Once the engine stops, every submit is
/// given back.
#[derive(Clone)]
pub struct TaskSubmitter {
    task_queues: Vec<std::sync::mpsc::SyncSender<OutgoingRequest>>,
    wakers: Vec<Waker>,
    next_core: Arc<std::sync::atomic::AtomicUsize>,
    signal: Arc<StopSignal>,
}

impl outgoing::Submit for TaskSubmitter {
    /// Queue `request` on one of the rings (round robin); a full queue or a
    /// stopped engine gives it back.
    fn submit(&self, request: OutgoingRequest) -> Result<(), OutgoingRequest> {
        if self.task_queues.is_empty() || self.signal.stopping() {
            return Err(request);
        }
        let core = self.next_core.fetch_add(1, Ordering::Relaxed) % self.task_queues.len();
        match self.task_queues[core].try_send(request) {
            Ok(()) => {
                if let Some(waker) = self.wakers.get(core) {
                    waker.wake();
                }
                Ok(())
            }
            Err(
                std::sync::mpsc::TrySendError::Full(r)
                | std::sync::mpsc::TrySendError::Disconnected(r),
            ) => Err(r),
        }
    }
}

/// The running engine threads.
pub struct RingEngine {
    threads: CoreThreads,
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
        Ok(RingEngine {
            threads,
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
    }

    /// Append the engine's series in the Prometheus text format.
    pub fn render_metrics(stats: &[CoreStats], out: &mut String) {
        use std::fmt::Write as _;
        let series: [super::CoreSeries<CoreStats>; 19] = [
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
        super::render_per_core(&series, stats, out);
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

/// A file body in progress on a connection.
enum Xfer {
    None,
    /// `chunk` bytes went into the pipe; they are being drained to the socket.
    Splice {
        chunk: u64,
    },
    /// `chunk` bytes were read into the lease; `sent` of them are out.
    Copy {
        chunk: usize,
        sent: usize,
    },
}

struct Slot {
    generation: u32,
    fd: SharedFd,
    conn: Conn,
    pending: Option<OpId>,
    /// The artifact being sent, while its body is in flight.
    file: Option<SharedFd>,
    xfer: Xfer,
    cancelling: bool,
    /// The pipe of a splice body, held across waits for `POLLOUT`.
    pipe: Option<Pipe>,
    /// What the connection wants sent next: (file offset, bytes).
    want: (u64, u64),
    /// The socket was made `O_NONBLOCK` for the engine's own splices.
    nonblocking: bool,
    /// When the connection started waiting for a cold open or read.
    cold_since: Option<Instant>,
    /// The body being sent was found not in the page cache: the rest of it
    /// goes by ring reads and sends.
    cold_body: bool,
    /// The client's address, counted in `per_ip` while the slot lives.
    ip: Option<IpAddr>,
}

/// Why a connection's pending operation is cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// Its deadline passed (408, or a close).
    Deadline,
    /// Shutdown closes it between requests.
    Drain,
}

/// Which connections a drain closes at once: keep-alive connections between requests. A
/// connection that has not sent its first request yet is left to its header deadline and
/// the drain budget: its client connected while this process still accepted, its request
/// may be on the wire, and unlike a reused connection no client retries a fresh one.
fn drain_idle(slot: &Slot) -> bool {
    slot.conn.is_idle() && slot.conn.responses > 0
}

/// One engine thread's state.
struct CoreLoop {
    core: usize,
    settings: EngineSettings,
    driver: Driver,
    listener: SharedFd,
    accept_op: Option<OpId>,
    /// The multishot accept ended in an error and is re-armed on the next
    /// tick, not at once: an error such as EMFILE repeats until fds free up,
    /// and re-arming in the completion handler would spin on it. Meanwhile
    /// new connections wait in the kernel backlog (as nginx does).
    accept_rearm: bool,
    /// Shutdown phase 3: queued outgoing tasks are refused, not started.
    refuse_new_tasks: bool,
    /// The last turn handled at least one completion.
    busy: bool,
    app: Arc<App>,
    fallback: Arc<Fallback>,
    stats: Arc<Vec<CoreStats>>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    generation: u32,
    pipes: PipePool,
    /// Connections waiting for a pipe (bounded by the connection count).
    pipe_waiters: VecDeque<(u32, u32, u64, u64)>,
    batch: Vec<Completion>,
    task_rx: std::sync::mpsc::Receiver<OutgoingRequest>,
    tasks: Vec<Option<TaskSlot>>,
    task_generation: u32,
    /// Idle keep-alive task connections, oldest first (bounded).
    idle_task_conns: VecDeque<IdleConn>,
    files: Rc<RefCell<OpenCache>>,
    /// Publishes finished uploads off this thread.
    publisher: Publisher,
    /// Opens cold artifacts off this thread.
    opener: Opener,
    /// Connections whose read-through fetch ended (slot, generation): the
    /// read-through's waiters send here and wake the ring. Unbounded, but
    /// holds at most one entry per connection (one fetch wait each).
    fetched_tx: std::sync::mpsc::Sender<(u32, u32)>,
    fetched_rx: std::sync::mpsc::Receiver<(u32, u32)>,
    /// Read-ahead hints in flight.
    readaheads_in_flight: usize,
    ticks: u64,
    /// Connections per client address on this thread (`connections_per_ip_max`).
    per_ip: PerIpCounts,
}

/// A keep-alive connection of a finished task, ready for the next task to
/// the same address.
struct IdleConn {
    addr: SocketAddr,
    fd: SharedFd,
    since: Instant,
}

struct TaskSlot {
    generation: u32,
    task: Task,
    fd: SharedFd,
    /// The connection came from the idle pool (no connect).
    reused: bool,
    /// The body file, when the body is spliced from a file.
    body_fd: Option<SharedFd>,
    /// Its pipe; `None` while an op holds it.
    pipe: Option<Pipe>,
    pending: Option<OpId>,
    timed_out: bool,
}

impl CoreLoop {
    fn new(
        core: usize,
        settings: EngineSettings,
        listener: TcpListener,
        shared: CoreShared<CoreStats>,
        task_rx: std::sync::mpsc::Receiver<OutgoingRequest>,
    ) -> std::io::Result<CoreLoop> {
        let CoreShared {
            app,
            fallback,
            stats,
            signal: _,
        } = shared;
        let connections_max = settings.connections_per_core_max;
        let ops_max =
            u32::try_from(connections_max + 1 + TASKS_PER_CORE_MAX + READAHEADS_PER_CORE_MAX)
                .unwrap_or(u32::MAX);
        let mut driver = Driver::new(DriverConfig {
            ring: RingConfig {
                sq_entries: SQ_ENTRIES,
                cq_entries: CQ_ENTRIES,
            },
            ops_max,
            fixed_buffers_count: FIXED_BUFFERS_COUNT,
            fixed_buffer_bytes: FIXED_BUFFER_BYTES,
            register_fixed_buffers: true,
            buf_rings_max: 1,
        })
        .map_err(|e| std::io::Error::from_raw_os_error(e.0))?;
        let pipe_max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let pipes = PipePool::new(settings.pipes_per_core_max, settings.pipe_bytes, pipe_max);
        let listener: SharedFd = Rc::new(OwnedFd::from(listener));
        let accept_op = driver
            .submit(
                Op::AcceptMulti {
                    listener: Rc::clone(&listener),
                },
                Token::Listener.pack(),
            )
            .map_err(|e| std::io::Error::other(format!("cannot arm accept: {:?}", e.kind)))?;
        if let Some(s) = stats.get(core) {
            s.fixed_buffers_registered
                .store(driver.fixed_buffers().registered(), Ordering::Relaxed);
        }
        let publisher = publish::start(core, driver.waker()).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot start the publisher thread of engine thread {core}: {e}"),
            )
        })?;
        let opener = opener::start(core, driver.waker(), Arc::clone(&app)).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot start the opener thread of engine thread {core}: {e}"),
            )
        })?;
        // A kernel without the limit (before 5.15) keeps its own; the ring
        // still serves, and the gauge says 0.
        let iowq_limit = driver
            .limit_iowq_workers(IOWQ_WORKERS_MAX, IOWQ_WORKERS_MAX)
            .map_or(0, |limits| limits[0]);
        if let Some(s) = stats.get(core) {
            s.iowq_workers_max
                .store(u64::from(iowq_limit), Ordering::Relaxed);
        }
        let (fetched_tx, fetched_rx) = std::sync::mpsc::channel();
        Ok(CoreLoop {
            publisher,
            opener,
            fetched_tx,
            fetched_rx,
            readaheads_in_flight: 0,
            core,
            settings,
            driver,
            listener,
            accept_op: Some(accept_op),
            accept_rearm: false,
            refuse_new_tasks: false,
            busy: false,
            app,
            fallback,
            stats,
            slots: (0..connections_max).map(|_| None).collect(),
            free: (0..u32::try_from(connections_max).unwrap_or(u32::MAX))
                .rev()
                .collect(),
            generation: 1,
            pipes,
            pipe_waiters: VecDeque::new(),
            batch: Vec::with_capacity(COMPLETIONS_PER_TURN_MAX),
            task_rx,
            tasks: (0..TASKS_PER_CORE_MAX).map(|_| None).collect(),
            task_generation: 1,
            idle_task_conns: VecDeque::new(),
            files: Rc::new(RefCell::new(OpenCache::new(OPEN_FILES_PER_CORE_MAX))),
            ticks: 0,
            per_ip: PerIpCounts::new(settings.connections_per_ip_max),
        })
    }

    fn fixed_buffers_note(&self) -> Option<String> {
        self.driver
            .fixed_buffers_refused()
            .map(|r| format!("fixed buffers not registered: {}", r.reason))
    }

    fn core_stats(&self) -> Option<&CoreStats> {
        self.stats.get(self.core)
    }

    fn run(&mut self, signal: &StopSignal) {
        let mut next_tick = Instant::now() + Duration::from_millis(TICK_MS);
        let mut drain_until: Option<Instant> = None;
        // Shutdown phase 3: the public side is done; outgoing tasks in flight finish.
        let mut tasks_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let timeout = next_tick.saturating_duration_since(now);
            // Poll only right after work: an idle thread sleeps at once.
            let waited = if self.busy && !self.settings.spin.is_zero() {
                self.driver.wait_spinning(self.settings.spin, Some(timeout))
            } else {
                self.driver.wait(1, Some(timeout))
            };
            if let Err(err) = waited {
                tracing::error!(
                    core = self.core,
                    errno = err.0,
                    "ring wait failed; engine thread stops"
                );
                break;
            }
            self.driver.take_woken();
            // Replies of uploads published meanwhile (their wake-up may be
            // what ended the wait).
            while let Some(done) = self.publisher.try_done() {
                self.on_published(done);
            }
            while let Some(done) = self.opener.try_done() {
                self.on_opened(done);
            }
            while let Ok((index, generation)) = self.fetched_rx.try_recv() {
                self.on_fetched(index, generation);
            }
            let mut batch = std::mem::take(&mut self.batch);
            self.busy = self.driver.complete(&mut batch, COMPLETIONS_PER_TURN_MAX) > 0;
            for completion in batch.drain(..) {
                self.dispatch(completion);
            }
            self.batch = batch;
            self.start_queued_tasks();

            if signal.stopping() && drain_until.is_none() {
                drain_until = Some(Instant::now() + signal.drain_budget());
                self.stop_accepting();
            }
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + Duration::from_millis(TICK_MS);
                self.tick(now, drain_until.is_some());
            }
            if let Some(until) = drain_until {
                let live = self.slots.iter().filter(|s| s.is_some()).count();
                let cut_now = signal.is_cut();
                if live == 0 || now >= until || cut_now {
                    if cut_now {
                        break;
                    }
                    let tasks_end = *tasks_until.get_or_insert_with(|| {
                        // New tasks are refused from here (their entries stay in the
                        // outbox); what is left of the public side is closed.
                        self.refuse_new_tasks = true;
                        for index in 0..self.slots.len() {
                            self.expire_if(index, Expiry::Deadline, |_| true);
                        }
                        now + signal.tasks_budget()
                    });
                    if now >= tasks_end || self.tasks.iter().all(Option::is_none) {
                        break;
                    }
                }
            }
        }
        // Whatever is left is closed; the driver parks buffers the kernel
        // still holds until their completions arrive (or leaks them).
        self.slots.iter_mut().for_each(|s| *s = None);
        for slot in self.tasks.iter_mut() {
            if let Some(t) = slot.take() {
                (t.task.request.done)(Err(TaskError::Refused));
            }
        }
        while let Ok(request) = self.task_rx.try_recv() {
            (request.done)(Err(TaskError::Refused));
        }
        let _ = self.driver.shutdown(Duration::from_secs(2));
    }

    fn stop_accepting(&mut self) {
        self.accept_rearm = false;
        if let Some(op) = self.accept_op.take() {
            let _ = self.driver.cancel(op);
        }
        // Idle keep-alive connections close now; busy ones finish.
        for index in 0..self.slots.len() {
            self.expire_if(index, Expiry::Drain, drain_idle);
        }
    }

    /// Every tick: enforce deadlines, publish counters.
    fn tick(&mut self, now: Instant, draining: bool) {
        if self.accept_rearm && !draining {
            self.accept_rearm = false;
            self.arm_accept();
        }
        for index in 0..self.slots.len() {
            self.expire_if(index, Expiry::Deadline, |slot| now >= slot.conn.deadline());
            if draining {
                self.expire_if(index, Expiry::Drain, drain_idle);
            }
        }
        let idle_max = Duration::from_millis(IDLE_TASK_CONN_MS);
        self.idle_task_conns
            .retain(|c| now.duration_since(c.since) < idle_max);
        for slot in self.tasks.iter_mut().flatten() {
            if now >= slot.task.deadline && !slot.timed_out {
                slot.timed_out = true;
                if let Some(op) = slot.pending {
                    let _ = self.driver.cancel(op);
                }
            }
        }
        self.ticks += 1;
        if self.ticks % OPEN_FILES_SWEEP_TICKS == 0 {
            if let Ok(mut files) = self.files.try_borrow_mut() {
                self.app.store.sweep_cache(&mut files);
            }
        }
        let (hits, misses) = self
            .files
            .try_borrow()
            .map_or((0, 0), |f| (f.hits_total, f.misses_total));
        let live = self.slots.iter().filter(|s| s.is_some()).count() as u64;
        let ring = self.driver.stats();
        if let Some(s) = self.core_stats() {
            s.connections.store(live, Ordering::Relaxed);
            s.open_file_hits_total.store(hits, Ordering::Relaxed);
            s.open_file_misses_total.store(misses, Ordering::Relaxed);
            s.submissions_total
                .store(ring.submissions, Ordering::Relaxed);
            s.completions_total
                .store(ring.completions, Ordering::Relaxed);
            s.sq_full_total.store(ring.sq_full, Ordering::Relaxed);
            s.cq_overflow_total
                .store(u64::from(ring.cq_overflow), Ordering::Relaxed);
        }
    }

    /// If the connection waits for the client (input, or a response it does
    /// not take) and `pred` holds, cancel its operation; the completion
    /// (ECANCELED) then lets the connection answer 408 or close.
    fn expire_if(&mut self, index: usize, why: Expiry, pred: impl Fn(&Slot) -> bool) {
        let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        let sending = slot.conn.waits_for_output();
        if slot.cancelling || !(slot.conn.waits_for_input() || sending) || !pred(slot) {
            return;
        }
        // A cold read in flight waits for the disk, not for the client: the
        // send timeout is the client's budget, so it does not run out here.
        if slot.cold_since.is_some() {
            return;
        }
        if let Some(op) = slot.pending {
            // A drain only cancels the wait: a request whose bytes complete the recv before
            // the cancel does is one the client already sent, and it is served (with
            // `Connection: close`) rather than answered 408 as a passed deadline would be.
            if why == Expiry::Deadline {
                slot.conn.on_deadline();
            }
            slot.cancelling = true;
            // A cancelled send, splice or POLLOUT wait completes with ECANCELED, and the
            // connection closes: a client that does not read gets no more time.
            let _ = self.driver.cancel(op);
            if sending {
                if let Some(s) = self.stats.get(self.core) {
                    s.send_timeout_total.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn dispatch(&mut self, completion: Completion) {
        let (index, generation) = match Token::unpack(completion.token) {
            Token::Listener => return self.on_accept(completion),
            Token::ReadAhead => {
                self.readaheads_in_flight = self.readaheads_in_flight.saturating_sub(1);
                return;
            }
            Token::Task { slot, generation } => return self.on_task(slot, generation, completion),
            Token::Waker => return,
            Token::Conn { slot, generation } => (slot, generation),
        };
        let live = self
            .slots
            .get(index as usize)
            .and_then(Option::as_ref)
            .is_some_and(|s| s.generation == generation);
        if !live {
            // A connection that is gone: its resources drop here.
            return;
        }
        let now = Instant::now();
        let next = {
            let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
                return;
            };
            slot.pending = None;
            slot.cancelling = false;
            let result = completion.result.map(|n| n as usize).map_err(|e| e.0);
            match (completion.kind, completion.resources) {
                (OpKind::Recv, Returned::Buf(IoBuf::Vec(buf))) if slot.conn.is_peeking() => {
                    let peeked = if result.is_ok() {
                        buf.as_slice()
                    } else {
                        &[][..]
                    };
                    if let Err(errno) = result {
                        if errno == libc::EINTR || errno == libc::EAGAIN {
                            Next::Peek
                        } else {
                            slot.conn.on_peek(&[], now)
                        }
                    } else {
                        slot.conn.on_peek(peeked, now)
                    }
                }
                (OpKind::Recv, Returned::Buf(IoBuf::Vec(buf))) => {
                    slot.conn.on_recv(buf, result, now)
                }
                (OpKind::Send, Returned::Buf(IoBuf::Vec(buf))) => {
                    slot.conn.on_sent(buf, result, now)
                }
                (OpKind::Send, Returned::Buf(IoBuf::Fixed(lease))) => {
                    self.on_copy_sent(index, lease, result, now);
                    return;
                }
                (OpKind::ReadFixed, Returned::Fixed(lease)) => {
                    self.on_copy_read(index, lease, result, now);
                    return;
                }
                (OpKind::PollAdd, _) => {
                    self.on_pollout(index, result);
                    return;
                }
                (OpKind::SpliceToPipe, Returned::Pipe(pipe)) => {
                    self.on_cold_read(index, pipe, result);
                    return;
                }
                // The pause of `Next::PeekAgain` is over (ETIME), or was
                // cancelled at the deadline (the peek then sees `timed_out`).
                (OpKind::Timeout, _) if slot.conn.is_peeking() => Next::Peek,
                _ => Next::Close,
            }
        };
        self.issue(index, next);
    }

    fn on_accept(&mut self, completion: Completion) {
        if !completion.more && self.accept_op.is_some() {
            match completion.result {
                Err(err) if err.0 != libc::ECANCELED => {
                    // Pause until the next tick (see `accept_rearm`).
                    self.accept_op = None;
                    self.accept_rearm = true;
                    if let Some(s) = self.core_stats() {
                        s.accept_errors_total.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(
                        core = self.core,
                        errno = %errno_name(err.0),
                        "accept failed; accepting again in {TICK_MS} ms"
                    );
                    return;
                }
                // The kernel ended the multishot without an error: arm it again.
                _ => self.arm_accept(),
            }
        }
        let Returned::Fd(fd) = completion.resources else {
            if let Err(err) = completion.result {
                if err.0 != libc::ECANCELED {
                    tracing::warn!(core = self.core, errno = err.0, "accept failed");
                }
            }
            return;
        };
        if let Some(s) = self.core_stats() {
            s.accepted_total.fetch_add(1, Ordering::Relaxed);
        }
        let _ = rustix::net::sockopt::set_tcp_nodelay(&fd, true);
        let stream = TcpStream::from(fd);
        let ip = stream.peer_addr().ok().map(|peer| peer.ip());
        let fd = OwnedFd::from(stream);
        if let Some(ip) = ip {
            if !self.per_ip.try_add(ip) {
                if let Some(s) = self.core_stats() {
                    s.per_ip_refused_total.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(%ip, "connections_per_ip_max reached; refusing");
                // Nothing has been read, so the protocol is not known yet: the fallback peeks
                // off this thread and answers HTTP/1 with 503, closes TLS and h2c
                // (docs/security.md). Its refusal tasks are bounded; past them, a close.
                self.fallback.answer_refused(TcpStream::from(fd));
                return;
            }
        }
        let Some(index) = self.free.pop() else {
            if let Some(ip) = ip {
                self.per_ip.remove(ip);
            }
            // The ring is full: the fallback takes the connection (it has
            // its own bound), so nothing waits unbounded here.
            if let Some(s) = self.core_stats() {
                s.over_capacity_total.fetch_add(1, Ordering::Relaxed);
            }
            self.hand_off(fd);
            return;
        };
        self.generation = Token::next_generation(self.generation);
        let conn = Conn::new(
            Arc::clone(&self.app),
            Rc::clone(&self.files),
            self.settings.conn_limits,
            Instant::now(),
        );
        if let Some(entry) = self.slots.get_mut(index as usize) {
            *entry = Some(Slot {
                generation: self.generation,
                fd: Rc::new(fd),
                conn,
                pending: None,
                file: None,
                xfer: Xfer::None,
                cancelling: false,
                pipe: None,
                want: (0, 0),
                nonblocking: false,
                cold_since: None,
                cold_body: false,
                ip,
            });
        }
        self.issue(index, Next::Peek);
    }

    fn hand_off(&mut self, fd: OwnedFd) {
        let stream = TcpStream::from(fd);
        let peer = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        match self.fallback.handoff(stream, peer) {
            Ok(()) => {
                if let Some(s) = self.core_stats() {
                    s.handed_off_total.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(refused) => {
                tracing::debug!(reason = ?refused.reason, "fallback refused a connection");
                if let Some(s) = self.core_stats() {
                    s.handoff_refused_total.fetch_add(1, Ordering::Relaxed);
                }
                // The fallback answers it without blocking this thread: 503 for HTTP/1,
                // a close for TLS and h2c (docs/security.md).
                self.fallback.answer_refused(refused.stream);
            }
        }
    }

    fn free_slot(&mut self, index: u32) -> Option<Slot> {
        let slot = self.slots.get_mut(index as usize)?.take()?;
        self.free.push(index);
        if let Some(ip) = slot.ip {
            self.per_ip.remove(ip);
        }
        Some(slot)
    }

    /// Submit `op` for the connection in `index`, or close it if the driver
    /// refuses (which the bounds make rare: ops_max covers one op per
    /// connection plus the accept).
    fn submit(&mut self, index: u32, op: Op) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let token = Token::Conn {
            slot: index,
            generation: slot.generation,
        };
        match self.driver.submit(op, token.pack()) {
            Ok(id) => slot.pending = Some(id),
            Err(err) => {
                tracing::warn!(kind = ?err.kind, "ring refused an operation; closing the connection");
                if let Some(s) = self.stats.get(self.core) {
                    s.submit_refused_total.fetch_add(1, Ordering::Relaxed);
                }
                drop(err);
                self.free_slot(index);
            }
        }
    }

    /// Carry out what the connection asked for.
    fn issue(&mut self, index: u32, next: Next) {
        if let Next::SendFile { offset, len } = next {
            // A body found cold goes on by the ring's reads (see `pump`),
            // never by an inline splice.
            let cold = self
                .slots
                .get(index as usize)
                .and_then(Option::as_ref)
                .is_some_and(|s| s.cold_body && s.file.is_some());
            if cold && self.copy_cold(index, offset, len) {
                return;
            }
        }
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let fd = Rc::clone(&slot.fd);
        match next {
            Next::Peek => {
                let buf = Vec::with_capacity(Conn::peek_buf_bytes());
                self.submit(
                    index,
                    Op::Recv {
                        fd,
                        buf: IoBuf::Vec(buf),
                        flags: libc::MSG_PEEK,
                    },
                );
            }
            Next::PeekAgain => self.submit(
                index,
                Op::Timeout {
                    duration: Duration::from_millis(super::conn::PEEK_AGAIN_MS),
                },
            ),
            Next::Recv | Next::Linger => {
                if next == Next::Linger {
                    let _ = rustix::net::shutdown(&*fd, rustix::net::Shutdown::Write);
                }
                let buf = slot.conn.take_read_buf();
                self.submit(
                    index,
                    Op::Recv {
                        fd,
                        buf: IoBuf::Vec(buf),
                        flags: 0,
                    },
                );
            }
            Next::Send { more } => {
                let buf = slot.conn.take_out_buf();
                let offset = slot.conn.out_sent();
                let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
                self.submit(
                    index,
                    Op::Send {
                        fd,
                        buf: IoBuf::Vec(buf),
                        offset,
                        flags,
                    },
                );
            }
            Next::SendFile { offset, len } => {
                if slot.file.is_none() {
                    slot.cold_body = false;
                    // Ring operations hold their fd as an `Rc<OwnedFd>`: a
                    // large body takes its own (small ones never get here).
                    slot.file = slot
                        .conn
                        .take_file()
                        .and_then(|a| a.into_file().ok())
                        .map(|f| {
                            // No kernel read-ahead on files the engine reads:
                            // it would run inside the engine's own splice of a
                            // cached chunk (an async read-ahead mark on a page)
                            // and wait there for block-map metadata from the
                            // disk (bench/cold: hot p99 1 s). The engine reads
                            // ahead itself, through the ring (`read_cold`). The
                            // flag is on the open file description, which the
                            // fallback never shares.
                            let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::Random);
                            Rc::new(OwnedFd::from(f))
                        });
                }
                let Some(file) = slot.file.clone() else {
                    self.close(index);
                    return;
                };
                if self.settings.mode == FileServingMode::Copy {
                    slot.want = (offset, len);
                    if let Some(lease) = self.driver.fixed_buffers().lease() {
                        // `chunk` holds the most this read may use: a range
                        // ends before the file does.
                        slot.xfer = Xfer::Copy {
                            chunk: usize::try_from(len).unwrap_or(usize::MAX),
                            sent: 0,
                        };
                        self.submit(
                            index,
                            Op::ReadFixed {
                                file,
                                offset,
                                buf: lease,
                            },
                        );
                        return;
                    }
                }
                slot.want = (offset, len);
                if !slot.nonblocking {
                    // The engine's own pipe -> socket splices must not block;
                    // ring recv and send still wait (io_uring polls itself).
                    if rustix::io::ioctl_fionbio(&*fd, true).is_err() {
                        self.close(index);
                        return;
                    }
                    slot.nonblocking = true;
                }
                if slot.pipe.is_none() {
                    match self.pipes.take() {
                        Ok(pipe) => {
                            // Corked while the body holds its pipe, as nginx's
                            // `tcp_nopush` does around sendfile: the connection
                            // is TCP_NODELAY, so without it every splice ends in
                            // a push of a part-filled segment and the loopback
                            // receiver wakes per chunk (64 MiB GET at c=1:
                            // 35 -> 25 ms, docs/benchmarks.md). `pump` uncorks
                            // when the pipe goes back. A failure only costs
                            // that gain, so it is not an error.
                            let _ = rustix::net::sockopt::set_tcp_cork(&*fd, true);
                            slot.pipe = Some(pipe);
                        }
                        Err(_) => {
                            // Every pipe is busy: wait for one (bounded by the
                            // number of connections).
                            let generation = slot.generation;
                            self.pipe_waiters
                                .push_back((index, generation, offset, len));
                            return;
                        }
                    }
                }
                drop(file);
                self.pump(index);
            }
            Next::Handoff => {
                // The only other reference to the socket must go first, so
                // the fallback gets sole ownership.
                drop(fd);
                if let Some(slot) = self.free_slot(index) {
                    match Rc::try_unwrap(slot.fd) {
                        Ok(fd) => self.hand_off(fd),
                        Err(_) => {
                            tracing::error!("connection fd still shared at hand-off; closing it")
                        }
                    }
                }
            }
            Next::Publish => {
                let Some(sink) = slot.conn.take_publish() else {
                    self.close(index);
                    return;
                };
                let job = Job {
                    index,
                    generation: slot.generation,
                    sink: Box::new(sink),
                };
                if let Err(job) = self.publisher.submit(job) {
                    // The publisher is PUBLISH_QUEUE_MAX uploads behind:
                    // publish here rather than queue without bound.
                    let next = slot.conn.on_published(job.sink.finish());
                    self.issue(index, next);
                }
            }
            Next::Open { namespace, key } => {
                let job = opener::Job {
                    index,
                    generation: slot.generation,
                    namespace,
                    key,
                };
                slot.cold_since = Some(Instant::now());
                if let Some(s) = self.stats.get(self.core) {
                    s.cold_opens_total.fetch_add(1, Ordering::Relaxed);
                }
                if self.opener.submit(job).is_err() {
                    // The opener is OPEN_QUEUE_MAX opens behind: open here
                    // rather than queue without bound.
                    slot.cold_since = None;
                    let next = slot.conn.open_here(Instant::now());
                    self.issue(index, next);
                }
            }
            Next::Fetch { namespace, key } => {
                let Some(rt) = self.app.read_through().cloned() else {
                    let next = slot.conn.on_fetched(Instant::now());
                    self.issue(index, next);
                    return;
                };
                // Waiting on the peers, not on the client: no deadline
                // applies meanwhile (as for a cold open); the read-through
                // ends every fetch within read_through_timeout_ms.
                slot.cold_since = Some(Instant::now());
                let (tx, waker, generation) = (
                    self.fetched_tx.clone(),
                    self.driver.waker(),
                    slot.generation,
                );
                rt.request(
                    &namespace,
                    &key,
                    Box::new(move || {
                        let _ = tx.send((index, generation));
                        waker.wake();
                    }),
                );
            }
            Next::Close => self.close(index),
        }
    }

    /// A read-through fetch this connection waited for has ended: decide
    /// its request again, unless the connection is gone.
    fn on_fetched(&mut self, index: u32, generation: u32) {
        let Some(slot) = self
            .slots
            .get_mut(index as usize)
            .and_then(Option::as_mut)
            .filter(|s| s.generation == generation)
        else {
            return;
        };
        slot.cold_since = None;
        let next = slot.conn.on_fetched(Instant::now());
        self.issue(index, next);
    }

    /// A cold open came back from the opener: decide the request again,
    /// unless its connection is gone.
    fn on_opened(&mut self, done: opener::Done) {
        let Some(slot) = self
            .slots
            .get_mut(done.index as usize)
            .and_then(Option::as_mut)
            .filter(|s| s.generation == done.generation)
        else {
            return;
        };
        if let (Some(since), Some(s)) = (slot.cold_since.take(), self.stats.get(self.core)) {
            s.cold_wait_us_total
                .fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        let next = slot.conn.on_opened(Instant::now());
        self.issue(done.index, next);
    }

    /// Read the next chunk of a body that is not in the page cache through
    /// the ring: the kernel runs the splice file -> pipe on an io-wq worker
    /// and this thread goes on serving. Read-ahead for the chunks after it
    /// goes out at the same time, so the disk is busy while the client
    /// takes this one.
    fn read_cold(&mut self, index: u32, offset: u64, chunk: usize) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let (Some(file), Some(pipe)) = (slot.file.clone(), slot.pipe.take()) else {
            self.close(index);
            return;
        };
        let remaining = slot.want.1;
        slot.cold_since = Some(Instant::now());
        let op = Op::SpliceToPipe {
            fd_in: Rc::clone(&file),
            offset_in: offset,
            pipe,
            len: u32::try_from(chunk).unwrap_or(u32::MAX),
        };
        self.submit(index, op);
        if self.slots.get(index as usize).is_none_or(Option::is_none) {
            // Refused: `submit` closed the connection; its pipe went back.
            self.release_pipe_waiter();
            return;
        }
        if let Some(s) = self.stats.get(self.core) {
            s.cold_reads_total.fetch_add(1, Ordering::Relaxed);
        }
        let ahead_len = remaining
            .saturating_sub(chunk as u64)
            .min(READAHEAD_CHUNKS * self.settings.pipe_bytes as u64);
        self.read_ahead(file, offset + chunk as u64, ahead_len);
    }

    /// `fadvise(WILLNEED)` through the ring for `len` bytes of `file` from
    /// `offset`, within the per-core bound on hints in flight.
    fn read_ahead(&mut self, file: SharedFd, offset: u64, len: u64) {
        if len == 0 || self.readaheads_in_flight >= READAHEADS_PER_CORE_MAX {
            return;
        }
        let hint = Op::Fadvise {
            file,
            offset,
            len: u32::try_from(len).unwrap_or(u32::MAX),
            advice: libc::POSIX_FADV_WILLNEED,
        };
        // A hint the ring cannot take is only a missed hint.
        if self.driver.submit(hint, Token::ReadAhead.pack()).is_ok() {
            self.readaheads_in_flight += 1;
        }
    }

    /// Read the next part of a body that is not in the page cache into a
    /// registered buffer through the ring, then send it (the copy path of
    /// `file_serving_mode = "copy"`, for this part only). False when no
    /// buffer is free.
    fn copy_cold(&mut self, index: u32, offset: u64, len: u64) -> bool {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return true;
        };
        let Some(file) = slot.file.clone() else {
            return false;
        };
        let Some(lease) = self.driver.fixed_buffers().lease() else {
            return false;
        };
        let chunk = usize::try_from(len).unwrap_or(usize::MAX);
        slot.want = (offset, len);
        slot.xfer = Xfer::Copy { chunk, sent: 0 };
        slot.cold_since = Some(Instant::now());
        if let Some(s) = self.stats.get(self.core) {
            s.cold_reads_total.fetch_add(1, Ordering::Relaxed);
        }
        let read_bytes = lease.capacity() as u64;
        let ahead_len = len
            .saturating_sub(read_bytes)
            .min(READAHEAD_CHUNKS * read_bytes);
        self.submit(
            index,
            Op::ReadFixed {
                file: Rc::clone(&file),
                offset,
                buf: lease,
            },
        );
        self.read_ahead(file, offset + read_bytes, ahead_len);
        true
    }

    /// A body's part went out by the copy path while the connection holds a
    /// splice pipe: when the body is done, the pipe goes back and the
    /// socket is uncorked, as at the end of a spliced body.
    fn release_body_pipe(&mut self, index: u32) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        if slot.pipe.take().is_some() {
            let _ = rustix::net::sockopt::set_tcp_cork(&*slot.fd, false);
            self.release_pipe_waiter();
        }
    }

    /// A cold chunk is in the pipe (or the read failed): send it on.
    fn on_cold_read(&mut self, index: u32, pipe: Pipe, result: Result<usize, i32>) {
        let now = Instant::now();
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        if let (Some(since), Some(s)) = (slot.cold_since.take(), self.stats.get(self.core)) {
            s.cold_wait_us_total
                .fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        match result {
            Ok(n) if n > 0 && pipe.held_bytes() > 0 => {
                if let Some(s) = self.stats.get(self.core) {
                    s.cold_read_bytes_total
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                slot.pipe = Some(pipe);
                slot.xfer = Xfer::Splice { chunk: n as u64 };
                self.pump(index);
            }
            // EOF before the body's end (the file was cut short behind the
            // store's back) or a read error: the response cannot be
            // completed, so the connection closes.
            _ => {
                drop(pipe);
                slot.xfer = Xfer::None;
                let next = slot.conn.on_file_sent(Err(libc::EIO), now);
                self.issue(index, next);
                self.release_pipe_waiter();
            }
        }
    }

    /// An upload came back from the publisher: answer it, unless its
    /// connection is gone (closed, or the slot reused: generation differs).
    fn on_published(&mut self, done: Done) {
        let Some(slot) = self
            .slots
            .get_mut(done.index as usize)
            .and_then(Option::as_mut)
            .filter(|s| s.generation == done.generation)
        else {
            return;
        };
        let next = slot.conn.on_published(done.reply);
        self.issue(done.index, next);
    }

    fn close(&mut self, index: u32) {
        // Dropping the slot closes the socket and the artifact; no operation
        // is in flight for it (Close always follows a completion).
        self.free_slot(index);
    }

    /// Move the file body to the socket: file -> pipe and pipe -> socket by
    /// non-blocking splices on this thread (see `Pipe::fill_from_file` and
    /// `Pipe::drain_to` for why not on the ring), waiting on the ring with
    /// `POLLOUT` when the socket is full. At most `PUMP_BYTES_PER_TURN`
    /// move before the connection yields to the others.
    fn pump(&mut self, index: u32) {
        let now = Instant::now();
        let mut moved_bytes = 0u64;
        loop {
            let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
                return;
            };
            let (Some(file), Some(pipe)) = (slot.file.as_ref(), slot.pipe.as_mut()) else {
                self.close(index);
                return;
            };
            if pipe.held_bytes() == 0 {
                let (offset, len) = slot.want;
                let chunk = len.min(pipe.capacity_bytes() as u64) as usize;
                // A chunk the page cache does not hold whole would block this
                // thread in the splice below: read it through the ring.
                // Unknown (no cachestat, before Linux 6.5) keeps the inline
                // splice, as before.
                if residency(&**file, offset, chunk as u64) == Residency::NotResident {
                    // The body is cold: from here on it is read through the
                    // ring into registered buffers and sent (io_uring's
                    // buffered read goes to io-wq only for what the cache
                    // lacks), not spliced on this thread. Measured in
                    // bench/cold, hot 4 KiB p99 while cold bodies streamed:
                    // io-wq splice into the pipe for cold chunks and inline
                    // splice for the chunks found resident 0.7-1.4 s; ring
                    // reads for every chunk of a cold body 1-20 ms. Without a
                    // free buffer, the splice on io-wq.
                    slot.cold_body = true;
                    if !self.copy_cold(index, offset, len) {
                        self.read_cold(index, offset, chunk);
                    }
                    return;
                }
                match pipe.fill_from_file(&**file, offset, chunk) {
                    Ok(n) if n > 0 => slot.xfer = Xfer::Splice { chunk: n as u64 },
                    _ => {
                        slot.pipe = None;
                        let next = slot.conn.on_file_sent(Err(libc::EIO), now);
                        self.issue(index, next);
                        self.release_pipe_waiter();
                        return;
                    }
                }
            }
            let held = pipe.held_bytes();
            match pipe.drain_to(&*slot.fd, held) {
                Ok(n) if n > 0 => {
                    if pipe.held_bytes() > 0 {
                        continue;
                    }
                    let Xfer::Splice { chunk } = std::mem::replace(&mut slot.xfer, Xfer::None)
                    else {
                        self.close(index);
                        return;
                    };
                    self.app
                        .metrics
                        .add_response_bytes(BytePath::RingSplice, chunk);
                    moved_bytes += chunk;
                    match slot.conn.on_file_sent(Ok(chunk), now) {
                        Next::SendFile { offset, len } => {
                            slot.want = (offset, len);
                            if moved_bytes >= PUMP_BYTES_PER_TURN {
                                self.wait_writable(index);
                                return;
                            }
                        }
                        next => {
                            // The body is out: uncorking pushes its last
                            // part-filled segment now, not after the kernel's
                            // 200 ms cork timer.
                            let _ = rustix::net::sockopt::set_tcp_cork(&*slot.fd, false);
                            // The (empty) pipe goes back.
                            slot.pipe = None;
                            slot.file = None;
                            self.issue(index, next);
                            self.release_pipe_waiter();
                            return;
                        }
                    }
                }
                Err(e) if e.0 == libc::EAGAIN => {
                    self.wait_writable(index);
                    return;
                }
                _ => {
                    // The client went away: a pipe with bytes in it is
                    // closed on drop, never reused.
                    slot.pipe = None;
                    slot.xfer = Xfer::None;
                    let next = slot.conn.on_file_sent(Err(libc::EPIPE), now);
                    self.issue(index, next);
                    self.release_pipe_waiter();
                    return;
                }
            }
        }
    }

    fn wait_writable(&mut self, index: u32) {
        let Some(slot) = self.slots.get(index as usize).and_then(Option::as_ref) else {
            return;
        };
        let fd = Rc::clone(&slot.fd);
        self.submit(
            index,
            Op::PollAdd {
                fd,
                events: libc::POLLOUT as u32,
            },
        );
    }

    fn on_pollout(&mut self, index: u32, result: Result<usize, i32>) {
        match result {
            Ok(_) => self.pump(index),
            Err(e) if e == libc::EINTR || e == libc::EAGAIN => self.wait_writable(index),
            Err(_) => self.close(index),
        }
    }

    /// Arm the multishot accept on this thread's listener.
    fn arm_accept(&mut self) {
        match self.driver.submit(
            Op::AcceptMulti {
                listener: Rc::clone(&self.listener),
            },
            Token::Listener.pack(),
        ) {
            Ok(op) => self.accept_op = Some(op),
            Err(err) => {
                tracing::error!(core = self.core, kind = ?err.kind, "cannot arm accept; retrying next tick");
                self.accept_op = None;
                self.accept_rearm = true;
            }
        }
    }

    /// A pipe went back to the pool: let the longest-waiting connection use it.
    fn release_pipe_waiter(&mut self) {
        while let Some((index, generation, offset, len)) = self.pipe_waiters.pop_front() {
            let live = self
                .slots
                .get(index as usize)
                .and_then(Option::as_ref)
                .is_some_and(|s| s.generation == generation);
            if live {
                self.issue(index, Next::SendFile { offset, len });
                return;
            }
        }
    }

    fn on_copy_read(
        &mut self,
        index: u32,
        lease: FixedLease,
        result: Result<usize, i32>,
        now: Instant,
    ) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let limit = match slot.xfer {
            Xfer::Copy { chunk, .. } => chunk,
            _ => 0,
        };
        if let Some(since) = slot.cold_since.take() {
            if let Some(s) = self.stats.get(self.core) {
                s.cold_wait_us_total
                    .fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
                if let Ok(n) = result {
                    s.cold_read_bytes_total
                        .fetch_add(n.min(limit) as u64, Ordering::Relaxed);
                }
            }
        }
        match result {
            Ok(n) if n > 0 && limit > 0 => {
                slot.xfer = Xfer::Copy {
                    chunk: n.min(limit),
                    sent: 0,
                };
                let mut lease = lease;
                lease.set_len(n.min(limit));
                let fd = Rc::clone(&slot.fd);
                self.submit(
                    index,
                    Op::Send {
                        fd,
                        buf: IoBuf::Fixed(lease),
                        offset: 0,
                        flags: libc::MSG_NOSIGNAL,
                    },
                );
            }
            Err(e) if e == libc::EINTR || e == libc::EAGAIN => {
                // Nothing was read: read the same part again.
                drop(lease);
                let (offset, len) = slot.want;
                self.issue(index, Next::SendFile { offset, len });
            }
            _ => {
                drop(lease);
                let next = slot.conn.on_file_sent(Err(libc::EIO), now);
                self.release_body_pipe(index);
                self.issue(index, next);
            }
        }
    }

    fn on_copy_sent(
        &mut self,
        index: u32,
        lease: FixedLease,
        result: Result<usize, i32>,
        now: Instant,
    ) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let Xfer::Copy { chunk, sent } = &mut slot.xfer else {
            return;
        };
        match result {
            Ok(n) if n > 0 => *sent += n,
            Err(e) if e == libc::EINTR || e == libc::EAGAIN => {}
            _ => {
                slot.xfer = Xfer::None;
                slot.file = None;
                let next = slot.conn.on_file_sent(Err(libc::EPIPE), now);
                self.release_body_pipe(index);
                self.issue(index, next);
                return;
            }
        }
        if *sent < *chunk {
            let offset = *sent;
            let fd = Rc::clone(&slot.fd);
            self.submit(
                index,
                Op::Send {
                    fd,
                    buf: IoBuf::Fixed(lease),
                    offset,
                    flags: libc::MSG_NOSIGNAL,
                },
            );
            return;
        }
        let done = *chunk as u64;
        slot.xfer = Xfer::None;
        drop(lease);
        self.app
            .metrics
            .add_response_bytes(BytePath::RingCopy, done);
        let next = slot.conn.on_file_sent(Ok(done), now);
        if !matches!(next, Next::SendFile { .. }) {
            slot.file = None;
            self.release_body_pipe(index);
        }
        self.issue(index, next);
    }
}

impl CoreLoop {
    /// Start tasks from the queue while the task table has room; the rest
    /// wait in the (bounded) queue.
    fn start_queued_tasks(&mut self) {
        if self.refuse_new_tasks {
            while let Ok(request) = self.task_rx.try_recv() {
                (request.done)(Err(TaskError::Refused));
            }
            return;
        }
        while let Some(index) = self.tasks.iter().position(Option::is_none) {
            let Ok(request) = self.task_rx.try_recv() else {
                return;
            };
            self.start_task(index as u32, request);
        }
    }

    fn start_task(&mut self, index: u32, request: OutgoingRequest) {
        // A file body needs its own fd (the op holds it) and a pipe for the
        // splices; without a free pipe the task is refused before anything
        // reaches the peer, and the caller tries again later.
        let body = match &request.body_file {
            None => None,
            Some(body) => {
                let file = Arc::clone(&body.file);
                let fd = Arc::try_unwrap(file)
                    .or_else(|shared| shared.try_clone())
                    .map(OwnedFd::from);
                match (fd, self.pipes.take()) {
                    (Ok(fd), Ok(pipe)) => Some((Rc::new(fd), pipe)),
                    _ => {
                        (request.done)(Err(TaskError::Refused));
                        return;
                    }
                }
            }
        };
        let pooled = if request.keep_alive {
            self.take_idle_conn(request.addr)
        } else {
            None
        };
        let reused = pooled.is_some();
        let fd = match pooled {
            Some(fd) => fd,
            None => {
                let family = if request.addr.is_ipv4() {
                    rustix::net::AddressFamily::INET
                } else {
                    rustix::net::AddressFamily::INET6
                };
                match rustix::net::socket_with(
                    family,
                    rustix::net::SocketType::STREAM,
                    rustix::net::SocketFlags::CLOEXEC,
                    None,
                ) {
                    Ok(fd) => Rc::new(fd),
                    Err(errno) => {
                        (request.done)(Err(TaskError::Connect(errno.raw_os_error())));
                        return;
                    }
                }
            }
        };
        let addr = request.addr;
        self.task_generation = Token::next_generation(self.task_generation);
        let generation = self.task_generation;
        let mut task = Task::new(request, Instant::now());
        let op = if reused {
            task.state = TaskState::Sending;
            Op::Send {
                fd: Rc::clone(&fd),
                buf: IoBuf::Vec(std::mem::take(&mut task.request.request)),
                offset: 0,
                flags: libc::MSG_NOSIGNAL,
            }
        } else {
            Op::Connect {
                fd: Rc::clone(&fd),
                addr,
            }
        };
        if let Some(entry) = self.tasks.get_mut(index as usize) {
            *entry = Some(TaskSlot {
                generation,
                task,
                fd,
                reused,
                body_fd: body.as_ref().map(|(f, _)| Rc::clone(f)),
                pipe: body.map(|(_, p)| p),
                pending: None,
                timed_out: false,
            });
        }
        self.submit_task_op(index, op);
    }

    /// An idle pooled connection to `addr` that is still open. The check is
    /// a non-blocking `MSG_PEEK`: no data and no EOF (`EAGAIN`) means open;
    /// a connection the peer closed while idle (EOF, an error, or stray
    /// bytes) is closed here, before anything is written to it, and the
    /// next one is tried.
    fn take_idle_conn(&mut self, addr: SocketAddr) -> Option<SharedFd> {
        while let Some(at) = self.idle_task_conns.iter().rposition(|c| c.addr == addr) {
            let conn = self.idle_task_conns.remove(at)?;
            let mut probe = [0u8; 1];
            match rustix::net::recv(
                &*conn.fd,
                &mut probe,
                rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
            ) {
                Err(rustix::io::Errno::AGAIN) => return Some(conn.fd),
                _ => continue,
            }
        }
        None
    }

    /// Keep a finished task's connection for the next task to its address.
    fn pool_idle_conn(&mut self, addr: SocketAddr, fd: SharedFd) {
        // Only a connection no op still holds can be pooled.
        if Rc::strong_count(&fd) != 1 {
            return;
        }
        if self.idle_task_conns.len() >= IDLE_TASK_CONNS_MAX {
            self.idle_task_conns.pop_front();
        }
        self.idle_task_conns.push_back(IdleConn {
            addr,
            fd,
            since: Instant::now(),
        });
    }

    /// The next splice of a task's file body, or `None` when the body is
    /// out (or there is none): file -> pipe while the pipe is empty, pipe ->
    /// socket while it holds bytes. Both run through the ring (io-wq), so a
    /// cold file or a slow peer never blocks this thread. The pipe travels
    /// with the op and comes back in its completion.
    fn next_body_op(slot: &mut TaskSlot) -> Option<Op> {
        let file_fd = slot.body_fd.as_ref()?;
        let body = slot.task.request.body_file.as_ref()?;
        let pipe = slot.pipe.take()?;
        if pipe.held_bytes() > 0 {
            slot.task.state = TaskState::SplicingOut;
            let len = u32::try_from(pipe.held_bytes()).unwrap_or(u32::MAX);
            return Some(Op::SpliceFromPipe {
                pipe,
                fd_out: Rc::clone(&slot.fd),
                len,
            });
        }
        let remaining = body.len.saturating_sub(slot.task.body_sent);
        if remaining == 0 {
            slot.pipe = Some(pipe);
            return None;
        }
        slot.task.state = TaskState::SplicingIn;
        let len = remaining.min(pipe.capacity_bytes() as u64);
        Some(Op::SpliceToPipe {
            fd_in: Rc::clone(file_fd),
            offset_in: body.offset + slot.task.body_sent,
            pipe,
            len: u32::try_from(len).unwrap_or(u32::MAX),
        })
    }

    fn submit_task_op(&mut self, index: u32, op: Op) {
        let Some(slot) = self.tasks.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let token = Token::Task {
            slot: index,
            generation: slot.generation,
        };
        match self.driver.submit(op, token.pack()) {
            Ok(id) => slot.pending = Some(id),
            Err(_) => self.finish_task(index, Err(TaskError::Refused)),
        }
    }

    fn finish_task(&mut self, index: u32, outcome: Result<outgoing::OutgoingResponse, TaskError>) {
        let Some(slot) = self.tasks.get_mut(index as usize).and_then(Option::take) else {
            return;
        };
        let TaskSlot {
            task, fd, reused, ..
        } = slot;
        let outcome = match outcome {
            Ok(mut response) => {
                response.reused_connection = reused;
                if task.request.keep_alive && task.keeps_alive() {
                    self.pool_idle_conn(task.request.addr, fd);
                }
                Ok(response)
            }
            // The peer closed a pooled connection while it was idle and the
            // check before the write could not see it yet: no response byte
            // came back, so nothing says the request was even read.
            Err(err @ (TaskError::Io(_) | TaskError::BadResponse(_)))
                if reused && task.received.is_empty() =>
            {
                let errno = match err {
                    TaskError::Io(errno) => errno,
                    _ => 0,
                };
                Err(TaskError::StaleConnection(errno))
            }
            Err(err) => Err(err),
        };
        (task.request.done)(outcome);
    }

    fn on_task(&mut self, index: u32, generation: u32, completion: Completion) {
        let Some(slot) = self.tasks.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        if slot.generation != generation {
            return;
        }
        slot.pending = None;
        if slot.timed_out {
            self.finish_task(index, Err(TaskError::TimedOut));
            return;
        }
        let fd = Rc::clone(&slot.fd);
        let result = completion.result.map(|n| n as usize).map_err(|e| e.0);
        match (slot.task.state, completion.resources) {
            (TaskState::Connecting, _) => match result {
                Ok(_) => {
                    slot.task.state = TaskState::Sending;
                    let buf = std::mem::take(&mut slot.task.request.request);
                    self.submit_task_op(
                        index,
                        Op::Send {
                            fd,
                            buf: IoBuf::Vec(buf),
                            offset: 0,
                            flags: libc::MSG_NOSIGNAL,
                        },
                    );
                }
                Err(errno) => self.finish_task(index, Err(TaskError::Connect(errno))),
            },
            (TaskState::Sending, Returned::Buf(IoBuf::Vec(buf))) => match result {
                Ok(n) => {
                    slot.task.sent += n;
                    let op = if slot.task.sent < buf.len() {
                        Op::Send {
                            fd,
                            buf: IoBuf::Vec(buf),
                            offset: slot.task.sent,
                            flags: libc::MSG_NOSIGNAL,
                        }
                    } else if let Some(op) = Self::next_body_op(slot) {
                        slot.task.request.request = buf;
                        op
                    } else {
                        slot.task.state = TaskState::Receiving;
                        slot.task.request.request = buf;
                        Op::Recv {
                            fd,
                            buf: IoBuf::Vec(Vec::with_capacity(RESPONSE_READ_BYTES)),
                            flags: 0,
                        }
                    };
                    self.submit_task_op(index, op);
                }
                Err(errno) => self.finish_task(index, Err(TaskError::Io(errno))),
            },
            (TaskState::SplicingIn | TaskState::SplicingOut, Returned::Pipe(pipe)) => {
                let spliced_out = slot.task.state == TaskState::SplicingOut;
                match result {
                    Ok(n) if n > 0 => {
                        if spliced_out {
                            slot.task.body_sent += n as u64;
                        }
                        slot.pipe = Some(pipe);
                        match Self::next_body_op(slot) {
                            Some(op) => self.submit_task_op(index, op),
                            None => {
                                slot.task.state = TaskState::Receiving;
                                self.submit_task_op(
                                    index,
                                    Op::Recv {
                                        fd,
                                        buf: IoBuf::Vec(Vec::with_capacity(RESPONSE_READ_BYTES)),
                                        flags: 0,
                                    },
                                );
                            }
                        }
                    }
                    // The file ended early (cut behind the store's back) or
                    // the peer went away: the request cannot complete. A
                    // pipe holding bytes is closed on drop, never reused.
                    Ok(_) => self.finish_task(index, Err(TaskError::Io(libc::EIO))),
                    Err(errno) => self.finish_task(index, Err(TaskError::Io(errno))),
                }
            }
            (TaskState::Receiving, Returned::Buf(IoBuf::Vec(mut buf))) => match result {
                Ok(n) => {
                    slot.task.received.extend_from_slice(&buf);
                    let eof = n == 0;
                    if let Some(outcome) = slot.task.response(eof) {
                        // The slot's own reference must be the last for the
                        // connection to go back to the pool.
                        drop(fd);
                        self.finish_task(index, outcome);
                    } else if slot.task.received.len() > slot.task.request.response_bytes_max {
                        self.finish_task(
                            index,
                            Err(TaskError::BadResponse("response over the size bound")),
                        );
                    } else {
                        buf.clear();
                        self.submit_task_op(
                            index,
                            Op::Recv {
                                fd,
                                buf: IoBuf::Vec(buf),
                                flags: 0,
                            },
                        );
                    }
                }
                Err(errno) => self.finish_task(index, Err(TaskError::Io(errno))),
            },
            _ => self.finish_task(index, Err(TaskError::Io(0))),
        }
    }
}

/// Errno helper for logs.
pub fn errno_name(errno: i32) -> String {
    Errno(errno)
        .name()
        .map_or_else(|| format!("errno {errno}"), str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fallback::FallbackLimits;
    use crate::front::AppHandler;
    use crate::outgoing::{self as task, OutgoingResponse};
    use crate::store::{Store, StoreConfig};
    use std::sync::mpsc;

    /// A one-thread ring engine serving a fresh store on an ephemeral port.
    fn engine() -> Option<(RingEngine, SocketAddr, tempfile::TempDir)> {
        if let Some(why) = sluice_uring::probe().unavailable {
            eprintln!("SKIP: io_uring unavailable: {}", why.reason);
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(StoreConfig {
            data_dir: dir.path().to_path_buf(),
            ..StoreConfig::default()
        })
        .expect("store");
        let config = crate::config::Config::default();
        let app = App::new(&config, store);
        let fallback = Arc::new(
            Fallback::start(
                Arc::new(AppHandler::new(Arc::clone(&app))),
                None,
                FallbackLimits {
                    connections_max: 16,
                    connections_per_ip_max: 0,
                    header_read_timeout_ms: 1000,
                    idle_timeout_ms: 1000,
                    send_timeout_ms: 1000,
                    uri_bytes_max: 8192,
                    ..FallbackLimits::default()
                },
            )
            .expect("fallback"),
        );
        let listener =
            crate::server::bind_reuseport(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let settings = EngineSettings {
            threads: 1,
            connections_per_core_max: 64,
            conn_limits: ConnLimits {
                head: crate::http1::Limits::default(),
                header_read_timeout_ms: 1000,
                idle_timeout_ms: 1000,
                linger: crate::http1::LingerLimits::default(),
                body_read_timeout_ms: 1000,
                send_timeout_ms: 1000,
            },
            connections_per_ip_max: 0,
            mode: FileServingMode::Splice,
            pipes_per_core_max: 4,
            pipe_bytes: 64 * 1024,
            spin: Duration::from_micros(50),
        };
        let engine = RingEngine::start(settings, vec![listener], &app, &fallback).expect("engine");
        Some((engine, addr, dir))
    }

    fn run(
        engine: &RingEngine,
        request: impl FnOnce(task::Done) -> OutgoingRequest,
    ) -> Result<OutgoingResponse, TaskError> {
        let (tx, rx) = mpsc::channel();
        let request = request(Box::new(move |outcome| {
            let _ = tx.send(outcome);
        }));
        assert!(engine.submit_task(request).is_ok(), "queue refused");
        rx.recv_timeout(Duration::from_secs(10))
            .expect("task outcome")
    }

    /// The ring is a scheduler, not only a server: an outgoing request
    /// task connects, sends and reads on the same ring that serves, here
    /// asking that very ring for `/up`.
    #[test]
    fn outgoing_request_task_runs_on_the_ring() {
        let Some((engine, addr, _dir)) = engine() else {
            return;
        };
        let got = run(&engine, |done| {
            OutgoingRequest::get(addr, "/up", Duration::from_secs(5), done)
        });
        assert_eq!(
            got,
            Ok(OutgoingResponse {
                status: 200,
                body: b"up\n".to_vec(),
                reused_connection: false,
                sluice_headers: Vec::new(),
            })
        );
        let got = run(&engine, |done| {
            OutgoingRequest::get(addr, "/v1/artifacts/ns/none", Duration::from_secs(5), done)
        });
        assert_eq!(got.map(|r| r.status), Ok(404));

        // Nothing listens here: a connect-level error, typed as such.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port");
        let got = run(&engine, |done| {
            OutgoingRequest::get(closed, "/up", Duration::from_secs(5), done)
        });
        assert_eq!(got, Err(TaskError::Connect(libc::ECONNREFUSED)));

        // A peer that accepts and never answers: the deadline ends it.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let silent_addr = silent.local_addr().expect("addr");
        let got = run(&engine, |done| {
            OutgoingRequest::get(silent_addr, "/up", Duration::from_millis(300), done)
        });
        assert_eq!(got, Err(TaskError::TimedOut));
        drop(silent);
        engine.shutdown(Duration::from_millis(100), Duration::ZERO);
    }

    /// A task's body can come from a file range: spliced file -> pipe ->
    /// socket in pipe-sized chunks (64 KiB here), all through the ring. The
    /// ring PUTs it to itself and reads it back byte for byte.
    #[test]
    fn a_task_body_is_spliced_from_a_file() {
        let Some((engine, addr, dir)) = engine() else {
            return;
        };
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let path = dir.path().join("body.bin");
        let mut bytes = b"garbage".to_vec();
        bytes.extend_from_slice(&body);
        std::fs::write(&path, &bytes).expect("write");
        let file = Arc::new(std::fs::File::open(&path).expect("open"));
        let got = run(&engine, |done| {
            OutgoingRequest {
            addr,
            request: format!(
                "PUT /v1/artifacts/ns/spliced HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes(),
            body_file: Some(Box::new(task::FileBody {
                file,
                offset: 7,
                len: body.len() as u64,
            })),
            keep_alive: false,
            timeout: Duration::from_secs(5),
            response_bytes_max: task::RESPONSE_BYTES_MAX_DEFAULT,
            done,
        }
        });
        assert_eq!(got.map(|r| r.status), Ok(201));
        let got = run(&engine, |done| {
            OutgoingRequest::get(
                addr,
                "/v1/artifacts/ns/spliced",
                Duration::from_secs(5),
                done,
            )
        });
        assert!(got.is_ok_and(|r| r.status == 200 && r.body == body));
        engine.shutdown(Duration::from_millis(100), Duration::ZERO);
    }

    /// Keep-alive tasks to one address share a pooled connection: the
    /// second and third skip the connect. A pooled connection the peer
    /// closed while idle is found closed before the write and replaced.
    #[test]
    fn keep_alive_tasks_reuse_a_pooled_connection() {
        let Some((engine, addr, _dir)) = engine() else {
            return;
        };
        let keep_alive = |done| {
            let mut r = OutgoingRequest::get(addr, "/up", Duration::from_secs(5), done);
            r.request = format!("GET /up HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes();
            r.keep_alive = true;
            r
        };
        let reused: Vec<bool> = (0..3)
            .map(|_| {
                let got = run(&engine, keep_alive).expect("response");
                assert_eq!((got.status, got.body.as_slice()), (200, &b"up\n"[..]));
                got.reused_connection
            })
            .collect();
        assert_eq!(reused, vec![false, true, true]);

        // A peer that answers one request and closes while idle.
        let once = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let once_addr = once.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            for _ in 0..2 {
                let (mut s, _) = once.accept().expect("accept");
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                std::thread::sleep(Duration::from_millis(50));
                drop(s); // closes while the client holds it idle
            }
        });
        let to_once = |done| {
            let mut r = OutgoingRequest::get(once_addr, "/", Duration::from_secs(5), done);
            r.request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
            r.keep_alive = true;
            r
        };
        let first = run(&engine, to_once).expect("first");
        assert!(!first.reused_connection);
        std::thread::sleep(Duration::from_millis(200));
        let second = run(&engine, to_once).expect("second, on a fresh connection");
        assert_eq!((second.status, second.reused_connection), (200, false));
        server.join().expect("server");
        engine.shutdown(Duration::from_millis(100), Duration::ZERO);
    }
}
