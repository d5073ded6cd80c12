//! One engine thread's loop: accept, peek and receive, the connection
//! slots and their generations, deadlines and the drain. Serving file
//! bodies is in [`super::serve`], outgoing tasks in [`super::tasks`].

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_uring::{
    Completion, Driver, DriverConfig, IoBuf, Op, OpId, OpKind, Pipe, PipePool, Returned,
    RingConfig, SharedFd, Token,
};

use super::spin::SpinGate;
use super::tasks::TaskClient;
use super::{
    errno_name, CoreStats, EngineSettings, COMPLETIONS_PER_TURN_MAX, CQ_ENTRIES,
    FIXED_BUFFERS_COUNT, FIXED_BUFFER_BYTES, IDLE_PIPE, IOWQ_WORKERS_MAX, READAHEADS_PER_CORE_MAX,
    SQ_ENTRIES, TASKS_PER_CORE_MAX,
};
use crate::address_cap::AddressCap;
use crate::app::App;
use crate::engine::conn::{Conn, Next};
use crate::engine::opener::{self, Opener};
use crate::engine::publish::{self, Done, Job, Publisher};
use crate::engine::threads::{CoreShared, StopSignal};
use crate::engine::threads::{OPEN_FILES_PER_CORE_MAX, OPEN_FILES_SWEEP_TICKS, TICK_MS};
use crate::fallback::Fallback;
use crate::outgoing::OutgoingRequest;
use crate::store::OpenCache;

/// A file body in progress on a connection.
pub(super) enum Xfer {
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

/// One connection on this thread: its sans-IO state, its socket, the
/// operation in flight and what its file body holds.
pub(super) struct Slot {
    pub(super) generation: u32,
    pub(super) fd: SharedFd,
    pub(super) conn: Conn,
    pub(super) pending: Option<OpId>,
    /// The artifact being sent, while its body is in flight.
    pub(super) file: Option<SharedFd>,
    pub(super) xfer: Xfer,
    pub(super) cancelling: bool,
    /// The pipe of a splice body, held across waits for `POLLOUT`.
    pub(super) pipe: Option<Pipe>,
    /// What the connection wants sent next: (file offset, bytes).
    pub(super) want: (u64, u64),
    /// The socket was made `O_NONBLOCK` for the engine's own splices.
    pub(super) nonblocking: bool,
    /// When the connection started waiting for a cold open or read.
    pub(super) cold_since: Option<Instant>,
    /// The body being sent was found not in the page cache: the rest of it
    /// goes by ring reads and sends.
    pub(super) cold_body: bool,
    /// The client's address, counted in `per_ip` while the slot lives.
    pub(super) ip: Option<IpAddr>,
}

/// Why a connection's pending operation is cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expiry {
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

/// The slot at `index` if it still holds the connection of `generation`: a
/// completion or a reply for a connection that closed, or whose slot was
/// reused since, finds none.
pub(super) fn live_slot(
    slots: &mut [Option<Slot>],
    index: u32,
    generation: u32,
) -> Option<&mut Slot> {
    slots
        .get_mut(index as usize)
        .and_then(Option::as_mut)
        .filter(|s| s.generation == generation)
}

/// One engine thread's state.
pub(super) struct CoreLoop {
    pub(super) core: usize,
    pub(super) settings: EngineSettings,
    pub(super) driver: Driver,
    pub(super) listener: SharedFd,
    pub(super) accept_op: Option<OpId>,
    /// The multishot accept ended in an error and is re-armed on the next
    /// tick, not at once: an error such as EMFILE repeats until fds free up,
    /// and re-arming in the completion handler would spin on it. Meanwhile
    /// new connections wait in the kernel backlog (as nginx does).
    pub(super) accept_rearm: bool,
    /// The last turn handled at least one completion.
    pub(super) busy: bool,
    /// Whether to poll the ring before sleeping after such a turn.
    pub(super) spin_gate: SpinGate,
    pub(super) app: Arc<App>,
    pub(super) fallback: Arc<Fallback>,
    pub(super) stats: Arc<Vec<CoreStats>>,
    pub(super) slots: Vec<Option<Slot>>,
    pub(super) free: Vec<u32>,
    pub(super) generation: u32,
    pub(super) pipes: PipePool,
    /// Connections waiting for a pipe (bounded by the connection count).
    pub(super) pipe_waiters: VecDeque<(u32, u32, u64, u64)>,
    pub(super) batch: Vec<Completion>,
    /// Outgoing tasks (replication sends, read-through fetches).
    pub(super) tasks: TaskClient,
    pub(super) files: Rc<RefCell<OpenCache>>,
    /// Publishes finished uploads off this thread.
    pub(super) publisher: Publisher,
    /// Opens cold artifacts off this thread.
    pub(super) opener: Opener,
    /// Connections whose read-through fetch ended (slot, generation): the
    /// read-through's waiters send here and wake the ring. Unbounded, but
    /// holds at most one entry per connection (one fetch wait each).
    pub(super) fetched_tx: std::sync::mpsc::Sender<(u32, u32)>,
    pub(super) fetched_rx: std::sync::mpsc::Receiver<(u32, u32)>,
    /// Read-ahead hints in flight.
    pub(super) readaheads_in_flight: usize,
    pub(super) ticks: u64,
    /// Connections per client address on this thread (`connections_per_ip_max`).
    pub(super) per_ip: AddressCap,
    /// Which receives ask for the kernel's receive time.
    pub(super) sampler: crate::pressure::LatencySampler,
    /// The ring has `IORING_OP_RECVMSG` (checked at start).
    pub(super) recvmsg: bool,
    /// When this turn's completions were taken: the sampler's clock (a turn
    /// is short, and a clock read per request is what sampling saves).
    pub(super) turn_at: Instant,
}

impl CoreLoop {
    pub(super) fn new(
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
            // Cold body reads queue below everything else this process reads, where the
            // device's scheduler honours it (see `sluice_uring::ioprio`).
            read_ioprio: sluice_uring::ioprio::BULK_READ,
        })
        .map_err(|e| std::io::Error::from_raw_os_error(e.0))?;
        let pipe_max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let pipes = PipePool::new(settings.pipes_per_core_max, settings.pipe_bytes, pipe_max)
            .closing_idle_after(IDLE_PIPE);
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
            spin_gate: SpinGate::new(settings.spin),
            settings,
            driver,
            listener,
            accept_op: Some(accept_op),
            accept_rearm: false,
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
            tasks: TaskClient::new(task_rx),
            files: Rc::new(RefCell::new(OpenCache::new(OPEN_FILES_PER_CORE_MAX))),
            ticks: 0,
            per_ip: AddressCap::new(settings.connections_per_ip_max),
            sampler: crate::pressure::LatencySampler::new(settings.latency_sample),
            recvmsg: sluice_uring::probe().supports("recvmsg"),
            turn_at: Instant::now(),
        })
    }

    pub(super) fn fixed_buffers_note(&self) -> Option<String> {
        self.driver
            .fixed_buffers_refused()
            .map(|r| format!("fixed buffers not registered: {}", r.reason))
    }

    fn core_stats(&self) -> Option<&CoreStats> {
        self.stats.get(self.core)
    }

    pub(super) fn run(&mut self, signal: &StopSignal) {
        let mut next_tick = Instant::now() + Duration::from_millis(TICK_MS);
        let mut drain_until: Option<Instant> = None;
        // Shutdown phase 3: the public side is done; outgoing tasks in flight finish.
        let mut tasks_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let timeout = next_tick.saturating_duration_since(now);
            // Poll only right after work, and only while polling pays (`spin_gate`):
            // an idle thread sleeps at once.
            let spin = if self.busy {
                self.spin_gate.spin()
            } else {
                Duration::ZERO
            };
            let waited = if spin.is_zero() {
                self.driver.wait(1, Some(timeout))
            } else {
                self.driver.wait_spinning(spin, Some(timeout))
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
            self.turn_at = Instant::now();
            // (A tick due within the spin would end it with nothing to say.)
            if !spin.is_zero() && timeout > spin {
                self.spin_gate
                    .spun(self.turn_at.saturating_duration_since(now));
            }
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
            self.tasks.start_queued(&mut self.driver, &mut self.pipes);

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
                        self.tasks.refuse_new();
                        for index in 0..self.slots.len() {
                            self.expire_if(index, Expiry::Deadline, |_| true);
                        }
                        now + signal.tasks_budget()
                    });
                    if now >= tasks_end || self.tasks.is_idle() {
                        break;
                    }
                }
            }
        }
        // Whatever is left is closed; the driver parks buffers the kernel
        // still holds until their completions arrive (or leaks them).
        self.slots.iter_mut().for_each(|s| *s = None);
        self.tasks.refuse_all();
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
        self.tasks.expire(&mut self.driver, now);
        self.pipes.close_idle(now);
        self.ticks += 1;
        if self.ticks.is_multiple_of(OPEN_FILES_SWEEP_TICKS) {
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
            s.fixed_buffers_pinned_bytes.store(
                self.driver.fixed_buffers().registered_bytes(),
                Ordering::Relaxed,
            );
            // Buffers are registered on first use, so a memlock refusal can come long after
            // start: say so once (later buffers are read unregistered, which still works).
            if let Some(refused) = self.driver.fixed_buffers_refused() {
                if s.fixed_buffers_registered.swap(false, Ordering::Relaxed) {
                    tracing::warn!(core = self.core, reason = %refused.reason, "fixed buffers: registration refused");
                }
            }
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

    /// Route a completion by its token to what it completes.
    fn dispatch(&mut self, completion: Completion) {
        match Token::unpack(completion.token) {
            Token::Listener => self.on_accept(completion),
            Token::ReadAhead => {
                self.readaheads_in_flight = self.readaheads_in_flight.saturating_sub(1);
            }
            Token::Task { slot, generation } => {
                self.tasks
                    .on_completion(&mut self.driver, slot, generation, completion)
            }
            Token::Conn { slot, generation } => self.on_conn_op(slot, generation, completion),
            // A ring's waker is the driver's own (its WAKE tag), never a token.
            Token::Waker => {}
        }
    }

    /// An operation of connection `index` completed: give its result to the
    /// handler of that operation, or to the connection, and carry out what
    /// it asks next. A connection that is gone (closed, or its slot reused
    /// under a new generation) only gets its resources dropped.
    fn on_conn_op(&mut self, index: u32, generation: u32, completion: Completion) {
        if live_slot(&mut self.slots, index, generation).is_none() {
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
                (OpKind::RecvMsg, Returned::Stamped { buf, stamp }) => {
                    // A sampled receive: the request's arrival, then as a recv.
                    if let Some(stamp) = stamp {
                        slot.conn.note_arrival(stamp);
                    }
                    let buf = match buf {
                        IoBuf::Vec(buf) => buf,
                        IoBuf::Fixed(_) => Vec::new(),
                    };
                    if slot.conn.is_peeking() {
                        match result {
                            Err(errno) if errno == libc::EINTR || errno == libc::EAGAIN => {
                                Next::Peek
                            }
                            Err(_) => slot.conn.on_peek(&[], now),
                            Ok(_) => slot.conn.on_peek(&buf, now),
                        }
                    } else {
                        slot.conn.on_recv(buf, result, now)
                    }
                }
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
                    let next = slot.conn.on_recv(buf, result, now);
                    if let Some((file, offset, len)) = slot.conn.take_writeback() {
                        self.write_back(Rc::new(file), offset, len);
                    }
                    next
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
        )
        .with_engine_writeback();
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
        match crate::engine::threads::hand_to_fallback(&self.fallback, TcpStream::from(fd)) {
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
    pub(super) fn submit(&mut self, index: u32, op: Op) {
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

    /// Carry out what the connection asked for: the one place that turns a
    /// connection's [`Next`] into ring operations (or a hand-over to another
    /// thread).
    pub(super) fn issue(&mut self, index: u32, next: Next) {
        match next {
            Next::Peek => self.peek(index),
            Next::PeekAgain => self.submit(
                index,
                Op::Timeout {
                    duration: Duration::from_millis(crate::engine::conn::PEEK_AGAIN_MS),
                },
            ),
            Next::Recv => self.recv(index, false),
            Next::Linger => self.recv(index, true),
            Next::Send { more } => self.send(index, more),
            Next::SendFile { offset, len } => self.send_file(index, offset, len),
            Next::Handoff => self.hand_off_slot(index),
            Next::Publish => self.publish(index),
            Next::Open { namespace, key } => self.open(index, namespace, key),
            Next::Fetch { namespace, key } => self.fetch(index, namespace, key),
            Next::ReceiveInBackground => self.receive_in_background(index),
            Next::Close => self.close(index),
        }
    }

    /// A peer's replicated write: its body goes to the background receiving
    /// threads (`engine::receive`) with a duplicate of the socket; the
    /// reply comes back through the publisher's queue. Received here when
    /// they cannot take it.
    fn receive_in_background(&mut self, index: u32) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let reply = crate::engine::receive::ReplyTo {
            index,
            generation: slot.generation,
            completer: self.publisher.completer(),
        };
        let read_timeout =
            Duration::from_millis(self.settings.conn_limits.timeouts.body_read_timeout_ms);
        let dup = slot.fd.try_clone();
        let handed = crate::engine::receive::hand_over(
            &mut slot.conn,
            dup,
            read_timeout,
            reply,
            Instant::now(),
        );
        if let Some(next) = handed {
            self.issue(index, next);
        }
    }

    /// Peek at the first bytes (`MSG_PEEK`, nothing consumed): TLS and h2c
    /// go to the fallback untouched.
    fn peek(&mut self, index: u32) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let fd = Rc::clone(&slot.fd);
        let buf = IoBuf::Vec(Vec::with_capacity(Conn::peek_buf_bytes()));
        let flags = libc::MSG_PEEK;
        let op = if self.recvmsg && self.sampler.take(self.turn_at) {
            Op::RecvMsg { fd, buf, flags }
        } else {
            Op::Recv { fd, buf, flags }
        };
        self.submit(index, op);
    }

    /// Receive more of the request. `linger`: the connection closes after
    /// its response, so shut the write side and read (discarding) until
    /// the client closes or the linger budget ends.
    fn recv(&mut self, index: u32, linger: bool) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let fd = Rc::clone(&slot.fd);
        if linger {
            let _ = rustix::net::shutdown(&*fd, rustix::net::Shutdown::Write);
        }
        // The first bytes of a request: sampled ones bring the kernel's
        // receive time (a recvmsg with a control buffer; see
        // `pressure::LatencySampler` for the cost).
        let stamped =
            !linger && slot.conn.is_idle() && self.recvmsg && self.sampler.take(self.turn_at);
        let buf = IoBuf::Vec(slot.conn.take_read_buf());
        let op = if stamped {
            Op::RecvMsg { fd, buf, flags: 0 }
        } else {
            Op::Recv { fd, buf, flags: 0 }
        };
        self.submit(index, op);
    }

    /// Send the connection's output buffer (`more`: `MSG_MORE`, a body follows).
    fn send(&mut self, index: u32, more: bool) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let fd = Rc::clone(&slot.fd);
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

    /// Give the socket to the fallback (TLS, h2c, over capacity). The slot
    /// goes first: its fd must be the only reference left, so the fallback
    /// gets sole ownership.
    fn hand_off_slot(&mut self, index: u32) {
        if let Some(slot) = self.free_slot(index) {
            match Rc::try_unwrap(slot.fd) {
                Ok(fd) => self.hand_off(fd),
                Err(_) => {
                    tracing::error!("connection fd still shared at hand-off; closing it")
                }
            }
        }
    }

    /// Hand a finished upload to this core's publisher thread (the fsync
    /// happens there), or publish it here when the publisher is behind.
    fn publish(&mut self, index: u32) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
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

    /// Hand a cold open to this core's opener thread, or open here when the
    /// opener is behind.
    fn open(&mut self, index: u32, namespace: String, key: String) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
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

    /// Ask the read-through (peers, then the tier) for a local miss; the
    /// connection waits with no operation in flight until `on_fetched`.
    fn fetch(&mut self, index: u32, namespace: String, key: String) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let Some(rt) = self.app.miss_fetcher().cloned() else {
            let next = slot.conn.on_fetched(Instant::now());
            self.issue(index, next);
            return;
        };
        // Waiting on the peers, not on the client: no deadline
        // applies meanwhile (as for a cold open); the read-through
        // ends every fetch within read_through_timeout_ms.
        slot.cold_since = Some(Instant::now());
        let waiter = crate::engine::threads::fetch_waiter(
            self.fetched_tx.clone(),
            self.driver.waker(),
            index,
            slot.generation,
        );
        rt.request(&namespace, &key, waiter);
    }

    /// A read-through fetch this connection waited for has ended: decide
    /// its request again, unless the connection is gone.
    fn on_fetched(&mut self, index: u32, generation: u32) {
        let Some(slot) = live_slot(&mut self.slots, index, generation) else {
            return;
        };
        slot.cold_since = None;
        let next = slot.conn.on_fetched(Instant::now());
        self.issue(index, next);
    }

    /// A cold open came back from the opener: decide the request again,
    /// unless its connection is gone.
    fn on_opened(&mut self, done: opener::Done) {
        let Some(slot) = live_slot(&mut self.slots, done.index, done.generation) else {
            return;
        };
        if let (Some(since), Some(s)) = (slot.cold_since.take(), self.stats.get(self.core)) {
            s.cold_wait_us_total
                .fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        let next = slot.conn.on_opened(Instant::now());
        self.issue(done.index, next);
    }

    /// An upload came back from the publisher: answer it, unless its
    /// connection is gone (closed, or the slot reused: generation differs).
    fn on_published(&mut self, done: Done) {
        let Some(slot) = live_slot(&mut self.slots, done.index, done.generation) else {
            return;
        };
        let next = slot.conn.on_published(done.reply);
        self.issue(done.index, next);
    }

    pub(super) fn close(&mut self, index: u32) {
        // Dropping the slot closes the socket and the artifact; no operation
        // is in flight for it (Close always follows a completion).
        self.free_slot(index);
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
}
