//! The portable engine: the ring's sans-IO HTTP/1 core ([`Conn`]) driven by
//! epoll, for hosts where io_uring is refused (a container's default seccomp
//! profile, `kernel.io_uring_disabled`, an old kernel).
//!
//! One thread per core, each with its own `SO_REUSEPORT` listener, epoll
//! set and connections, as the rings have. Sockets are non-blocking and
//! registered edge-triggered once: an operation is tried at once, and only
//! when the kernel says `EAGAIN` does the connection wait for the readiness
//! it needs. File bodies leave by `sendfile(2)` (no copy through user
//! space). Nothing on this thread waits for the disk:
//!
//! - a chunk of a body the page cache does not hold (`residency`) is read
//!   by this core's reader thread into memory and sent from there;
//! - cold opens go to the opener thread ([`super::opener`]), uploads are
//!   published on the publisher thread ([`super::publish`]), as on the ring.
//!
//! TLS and HTTP/2 are handed, untouched, to the fallback, as on the ring.
//! Replication sends use the blocking senders (there are no rings to carry
//! tasks).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags};
use sluice_uring::residency::{residency, Residency};
use sluice_uring::{Token, Waker};

use super::conn::{Conn, ConnLimits, Next, PEEK_AGAIN_MS};
use super::offload::Offload;
use super::threads::{
    CoreShared, CoreThreads, DrainCutter, StopSignal, OPEN_FILES_PER_CORE_MAX,
    OPEN_FILES_SWEEP_TICKS, PUMP_BYTES_PER_TURN, TICK_MS,
};
use super::{opener, publish};
use crate::address_cap::AddressCap;
use crate::app::App;
use crate::fallback::Fallback;
use crate::store::OpenCache;

/// Events taken from the kernel per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 256;
/// Connections accepted per listener wake-up before the others get a turn.
const ACCEPTS_PER_TURN: usize = 64;
/// Most of a file body one `sendfile` call moves (nginx's `sendfile_max_chunk` default).
const SENDFILE_BYTES: usize = 2 << 20;
/// The reader thread reads only cold bodies, in bulk: its reads queue below the rest of
/// the process's where the device's scheduler honours priorities (`sluice_uring::ioprio`).
fn lower_io_priority_once() {
    thread_local!(static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    LOWERED.with(|lowered| {
        if !lowered.replace(true) {
            if let Err(err) =
                sluice_uring::ioprio::set_current_thread(sluice_uring::ioprio::BULK_READ)
            {
                tracing::debug!(%err, "ioprio_set on the epoll reader thread refused");
            }
        }
    });
}

/// A cold chunk the reader thread reads at once.
const COLD_READ_BYTES: u64 = 1 << 20;
/// Cold reads queued per core; past it a body waits for the next tick.
const COLD_QUEUE_MAX: usize = 64;

/// What the engine threads need from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct EpollSettings {
    pub connections_per_core_max: usize,
    pub connections_per_ip_max: usize,
    pub conn_limits: ConnLimits,
    /// At most one request per this long is measured from the kernel's
    /// receive time (`public_latency_sample_us`); zero measures none.
    pub latency_sample: Duration,
}

/// Counters of one engine thread, for `/metrics` and `/status`.
#[derive(Default, Debug)]
pub struct EpollStats {
    pub accepted_total: AtomicU64,
    pub connections: AtomicU64,
    pub handed_off_total: AtomicU64,
    pub over_capacity_total: AtomicU64,
    pub per_ip_refused_total: AtomicU64,
    pub accept_errors_total: AtomicU64,
    pub sendfile_bytes_total: AtomicU64,
    pub cold_opens_total: AtomicU64,
    pub cold_reads_total: AtomicU64,
    pub cold_read_bytes_total: AtomicU64,
}

/// The running epoll engine threads.
pub struct EpollEngine {
    threads: CoreThreads,
    pub stats: Arc<Vec<EpollStats>>,
}

impl EpollEngine {
    /// One thread per listener. Fails (and leaves nothing running) if an
    /// epoll set or eventfd cannot be made.
    pub fn start(
        settings: EpollSettings,
        listeners: Vec<TcpListener>,
        app: &Arc<App>,
        fallback: &Arc<Fallback>,
    ) -> std::io::Result<EpollEngine> {
        let seeds = vec![(); listeners.len()];
        let (threads, stats, _) = CoreThreads::start(
            ("sluice-epoll", "epoll"),
            listeners,
            seeds,
            app,
            fallback,
            move |core, listener, (), shared, ready| {
                let mut core_loop = match CoreLoop::new(core, settings, listener, shared) {
                    Ok(core_loop) => core_loop,
                    Err(err) => return ready.failed(err),
                };
                ready.ready(core_loop.waker.clone(), ());
                core_loop.run();
            },
        )?;
        Ok(EpollEngine { threads, stats })
    }

    /// A handle that ends a drain in progress at once (a second SIGTERM).
    pub fn drain_cutter(&self) -> DrainCutter {
        self.threads.drain_cutter()
    }

    /// Stop accepting, let in-flight requests finish within `drain`, then
    /// close what is left and join the threads.
    pub fn shutdown(mut self, drain: Duration) {
        self.threads.stop(drain, Duration::ZERO);
    }

    /// Append the engine's series in the Prometheus text format.
    pub fn render_metrics(stats: &[EpollStats], out: &mut String) {
        let series: [super::threads::CoreSeries<EpollStats>; 10] = [
            ("sluice_epoll_accepted_total", "counter", "Connections accepted by the epoll engine.", |s| s.accepted_total.load(Ordering::Relaxed)),
            ("sluice_epoll_connections", "gauge", "Connections the epoll engine holds.", |s| s.connections.load(Ordering::Relaxed)),
            ("sluice_epoll_handed_off_total", "counter", "Connections handed to the fallback (TLS, HTTP/2, or the engine full).", |s| s.handed_off_total.load(Ordering::Relaxed)),
            ("sluice_epoll_over_capacity_total", "counter", "Connections handed to the fallback because connections_per_core_max was reached.", |s| s.over_capacity_total.load(Ordering::Relaxed)),
            ("sluice_epoll_per_ip_refused_total", "counter", "Connections refused at accept: their address held connections_per_ip_max.", |s| s.per_ip_refused_total.load(Ordering::Relaxed)),
            ("sluice_epoll_accept_errors_total", "counter", "accept(2) errors other than EAGAIN (EMFILE, ENFILE, ...); accepting pauses one tick.", |s| s.accept_errors_total.load(Ordering::Relaxed)),
            ("sluice_epoll_sendfile_bytes_total", "counter", "File body bytes sent by sendfile(2).", |s| s.sendfile_bytes_total.load(Ordering::Relaxed)),
            ("sluice_epoll_cold_opens_total", "counter", "Artifacts opened off the engine thread because their path or header was not cached.", |s| s.cold_opens_total.load(Ordering::Relaxed)),
            ("sluice_epoll_cold_reads_total", "counter", "Body chunks read off the engine thread because the page cache did not hold them.", |s| s.cold_reads_total.load(Ordering::Relaxed)),
            ("sluice_epoll_cold_read_bytes_total", "counter", "Bytes of those reads.", |s| s.cold_read_bytes_total.load(Ordering::Relaxed)),
        ];
        super::threads::render_per_core(&series, stats, out);
    }
}

/// A chunk of a cold body, read by the reader thread.
struct ReadJob {
    index: u32,
    generation: u32,
    file: Arc<File>,
    offset: u64,
    len: u64,
}

struct ReadDone {
    index: u32,
    generation: u32,
    data: std::io::Result<Vec<u8>>,
}

/// What a connection waits for.
enum Wait {
    /// Nothing: being driven, or about to be.
    Idle,
    /// Readable, then peek.
    Peek,
    /// The `PeekAgain` pause.
    PeekAt,
    /// Readable, then recv into this buffer.
    Recv(Vec<u8>),
    /// Writable, then send this buffer from `Conn::out_sent`.
    Send { buf: Vec<u8> },
    /// Writable, then sendfile.
    File { offset: u64, len: u64 },
    /// Writable, then send what the reader read (`sent` of it is out).
    Cold { data: Vec<u8>, sent: usize },
    /// A thread of this core works for it (open, publish, cold read).
    Offloaded,
    /// Its turn ended with work left: go on at the next turn.
    Ready(Next),
}

struct Slot {
    generation: u32,
    stream: TcpStream,
    conn: Conn,
    wait: Wait,
    /// The body being sent, once `Next::SendFile` took it.
    file: Option<Arc<File>>,
    ip: Option<IpAddr>,
    corked: bool,
    /// The body's bytes below this offset were found in the page cache: a
    /// socket that fills and drains again does not ask twice.
    resident_until: u64,
}

struct CoreLoop {
    core: usize,
    settings: EpollSettings,
    epoll: OwnedFd,
    listener: TcpListener,
    accepting: bool,
    eventfd: Arc<OwnedFd>,
    waker: Waker,
    app: Arc<App>,
    fallback: Arc<Fallback>,
    files: Rc<RefCell<OpenCache>>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    generation: u32,
    per_ip: AddressCap,
    /// Which receives ask for the kernel's receive time.
    sampler: crate::pressure::LatencySampler,
    /// Connections whose turn ended with work left.
    ready: VecDeque<(u32, u32)>,
    /// Read-throughs from peers that ended: (index, generation).
    fetched_tx: std::sync::mpsc::Sender<(u32, u32)>,
    fetched_rx: std::sync::mpsc::Receiver<(u32, u32)>,
    /// Connections in the `PeekAgain` pause: (until, index, generation).
    peek_timers: Vec<(Instant, u32, u32)>,
    publisher: publish::Publisher,
    opener: opener::Opener,
    reader: Offload<ReadJob, ReadDone>,
    stats: Arc<Vec<EpollStats>>,
    signal: Arc<StopSignal>,
    ticks: u64,
}

fn errno_of(e: Errno) -> i32 {
    e.raw_os_error()
}

impl CoreLoop {
    fn new(
        core: usize,
        settings: EpollSettings,
        listener: TcpListener,
        shared: CoreShared<EpollStats>,
    ) -> std::io::Result<CoreLoop> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let eventfd = Arc::new(rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?);
        let waker = Waker::from_eventfd(Arc::clone(&eventfd));
        listener.set_nonblocking(true)?;
        epoll::add(
            &epoll,
            &listener,
            epoll::EventData::new_u64(Token::Listener.pack()),
            epoll::EventFlags::IN,
        )?;
        epoll::add(
            &epoll,
            &*eventfd,
            epoll::EventData::new_u64(Token::Waker.pack()),
            epoll::EventFlags::IN,
        )?;
        let max = settings.connections_per_core_max.max(1);
        let reader = Offload::start(
            format!("sluice-epoll-read-{core}"),
            COLD_QUEUE_MAX,
            waker.clone(),
            |job: ReadJob| {
                lower_io_priority_once();
                let mut data = vec![0u8; usize::try_from(job.len).unwrap_or(0)];
                let data = job.file.read_exact_at(&mut data, job.offset).map(|()| data);
                ReadDone {
                    index: job.index,
                    generation: job.generation,
                    data,
                }
            },
        )?;
        let (fetched_tx, fetched_rx) = std::sync::mpsc::channel();
        Ok(CoreLoop {
            fetched_tx,
            fetched_rx,
            core,
            settings,
            epoll,
            listener,
            accepting: true,
            eventfd,
            publisher: publish::start(core, waker.clone())?,
            opener: opener::start(core, waker.clone(), Arc::clone(&shared.app))?,
            reader,
            waker,
            app: shared.app,
            fallback: shared.fallback,
            files: Rc::new(RefCell::new(OpenCache::new(OPEN_FILES_PER_CORE_MAX))),
            slots: (0..max).map(|_| None).collect(),
            free: (0..max as u32).rev().collect(),
            generation: 0,
            per_ip: AddressCap::new(settings.connections_per_ip_max),
            sampler: crate::pressure::LatencySampler::new(settings.latency_sample),
            ready: VecDeque::new(),
            peek_timers: Vec::new(),
            stats: shared.stats,
            signal: shared.signal,
            ticks: 0,
        })
    }

    fn stats(&self) -> Option<&EpollStats> {
        self.stats.get(self.core)
    }

    fn run(&mut self) {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(EVENTS_PER_WAIT);
        let mut next_tick = Instant::now() + Duration::from_millis(TICK_MS);
        let mut drain_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let mut wake_at = next_tick;
            if !self.ready.is_empty() {
                wake_at = now;
            }
            if let Some(&(at, _, _)) = self.peek_timers.iter().min_by_key(|t| t.0) {
                wake_at = wake_at.min(at);
            }
            let timeout = rustix::event::Timespec::try_from(wake_at.saturating_duration_since(now))
                .unwrap_or(rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                });
            events.clear();
            match epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                Some(&timeout),
            ) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(err) => {
                    tracing::error!(core = self.core, error = %err, "epoll_wait failed; engine thread stops");
                    break;
                }
            }
            for event in &events {
                match Token::unpack(event.data.u64()) {
                    Token::Listener => self.accept(),
                    Token::Waker => {
                        let mut counter = [0u8; 8];
                        let _ = rustix::io::read(&*self.eventfd, &mut counter[..]);
                    }
                    Token::Conn { slot, generation } => {
                        self.on_ready(slot, generation, event.flags)
                    }
                    // Never registered in an epoll set.
                    Token::ReadAhead | Token::Task { .. } => {}
                }
            }
            self.take_offloaded();
            self.run_ready();
            let now = Instant::now();
            self.wake_peekers(now);

            if self.signal.stopping() && drain_until.is_none() {
                drain_until = Some(now + self.signal.drain_budget());
                self.stop_accepting();
                self.expire(now, true);
            }
            if now >= next_tick {
                next_tick = now + Duration::from_millis(TICK_MS);
                self.tick(now, drain_until.is_some());
            }
            if let Some(until) = drain_until {
                let live = self.slots.iter().filter(|s| s.is_some()).count();
                if live == 0 || now >= until || self.signal.is_cut() {
                    break;
                }
            }
        }
        self.slots.iter_mut().for_each(|s| *s = None);
        if let Some(s) = self.stats() {
            s.connections.store(0, Ordering::Relaxed);
        }
    }

    fn stop_accepting(&mut self) {
        if self.accepting {
            self.accepting = false;
            let _ = epoll::delete(&self.epoll, &self.listener);
        }
    }

    fn tick(&mut self, now: Instant, draining: bool) {
        if !self.accepting && !draining {
            // Accepting paused after an error (EMFILE): try again.
            if epoll::add(
                &self.epoll,
                &self.listener,
                epoll::EventData::new_u64(Token::Listener.pack()),
                epoll::EventFlags::IN,
            )
            .is_ok()
            {
                self.accepting = true;
            }
        }
        self.expire(now, draining);
        self.ticks += 1;
        if self.ticks.is_multiple_of(OPEN_FILES_SWEEP_TICKS) {
            if let Ok(mut files) = self.files.try_borrow_mut() {
                self.app.store.sweep_cache(&mut files);
            }
        }
        let live = self.slots.iter().filter(|s| s.is_some()).count() as u64;
        if let Some(s) = self.stats() {
            s.connections.store(live, Ordering::Relaxed);
        }
    }

    /// Connections past their deadline (or, draining, idle between
    /// requests) get their wait ended as the ring's cancel ends it: the
    /// operation completes with `ECANCELED`, and the connection answers 408
    /// or closes.
    fn expire(&mut self, now: Instant, draining: bool) {
        for index in 0..self.slots.len() {
            let Some(slot) = self.slots[index].as_mut() else {
                continue;
            };
            if !(slot.conn.waits_for_input() || slot.conn.waits_for_output()) {
                continue;
            }
            let waiting = matches!(
                slot.wait,
                Wait::Peek
                    | Wait::PeekAt
                    | Wait::Recv(_)
                    | Wait::Send { .. }
                    | Wait::File { .. }
                    | Wait::Cold { .. }
            );
            if !waiting {
                continue;
            }
            let late = now >= slot.conn.deadline();
            let idle = draining && slot.conn.is_idle() && slot.conn.responses > 0;
            if !(late || idle) {
                continue;
            }
            if late {
                slot.conn.on_deadline();
            }
            let cancelled = Err(libc::ECANCELED);
            let next = match std::mem::replace(&mut slot.wait, Wait::Idle) {
                Wait::Peek | Wait::PeekAt => slot.conn.on_peek(&[], now),
                Wait::Recv(buf) => slot.conn.on_recv(buf, cancelled, now),
                Wait::Send { buf, .. } => slot.conn.on_sent(buf, cancelled, now),
                Wait::File { .. } | Wait::Cold { .. } => {
                    slot.conn.on_file_sent(Err(libc::ECANCELED), now)
                }
                other => {
                    slot.wait = other;
                    continue;
                }
            };
            self.drive(index as u32, next);
        }
    }

    fn wake_peekers(&mut self, now: Instant) {
        if self.peek_timers.is_empty() {
            return;
        }
        let timers = std::mem::take(&mut self.peek_timers);
        for (at, index, generation) in timers {
            if now < at {
                self.peek_timers.push((at, index, generation));
                continue;
            }
            let Some(slot) = self
                .slots
                .get_mut(index as usize)
                .and_then(Option::as_mut)
                .filter(|s| s.generation == generation)
            else {
                continue;
            };
            if matches!(slot.wait, Wait::PeekAt) {
                slot.wait = Wait::Idle;
                self.drive(index, Next::Peek);
            }
        }
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPTS_PER_TURN {
            let (stream, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    if let Some(s) = self.stats() {
                        s.accept_errors_total.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(core = self.core, error = %err, "accept failed; accepting again in {TICK_MS} ms");
                    // Level-triggered: without a pause the error would spin.
                    self.stop_accepting();
                    return;
                }
            };
            self.on_accepted(stream, peer);
        }
    }

    fn on_accepted(&mut self, stream: TcpStream, peer: SocketAddr) {
        if let Some(s) = self.stats() {
            s.accepted_total.fetch_add(1, Ordering::Relaxed);
        }
        let _ = stream.set_nodelay(true);
        let ip = peer.ip();
        if !self.per_ip.try_add(ip) {
            if let Some(s) = self.stats() {
                s.per_ip_refused_total.fetch_add(1, Ordering::Relaxed);
            }
            self.fallback.answer_refused(stream);
            return;
        }
        let Some(index) = self.free.pop() else {
            self.per_ip.remove(ip);
            if let Some(s) = self.stats() {
                s.over_capacity_total.fetch_add(1, Ordering::Relaxed);
            }
            self.hand_off(stream);
            return;
        };
        if stream.set_nonblocking(true).is_err() {
            self.per_ip.remove(ip);
            self.free.push(index);
            return;
        }
        self.generation = Token::next_generation(self.generation);
        let token = Token::Conn {
            slot: index,
            generation: self.generation,
        }
        .pack();
        let flags = epoll::EventFlags::IN
            | epoll::EventFlags::OUT
            | epoll::EventFlags::RDHUP
            | epoll::EventFlags::ET;
        if epoll::add(
            &self.epoll,
            &stream,
            epoll::EventData::new_u64(token),
            flags,
        )
        .is_err()
        {
            self.per_ip.remove(ip);
            self.free.push(index);
            return;
        }
        let conn = Conn::new(
            Arc::clone(&self.app),
            Rc::clone(&self.files),
            self.settings.conn_limits,
            Instant::now(),
        );
        self.slots[index as usize] = Some(Slot {
            generation: self.generation,
            stream,
            conn,
            wait: Wait::Idle,
            file: None,
            ip: Some(ip),
            corked: false,
            resident_until: 0,
        });
        self.drive(index, Next::Peek);
    }

    fn hand_off(&mut self, stream: TcpStream) {
        match super::threads::hand_to_fallback(&self.fallback, stream) {
            Ok(()) => {
                if let Some(s) = self.stats() {
                    s.handed_off_total.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(refused) => self.fallback.answer_refused(refused.stream),
        }
    }

    fn live(&self, index: u32, generation: u32) -> bool {
        self.slots
            .get(index as usize)
            .and_then(Option::as_ref)
            .is_some_and(|s| s.generation == generation)
    }

    fn close(&mut self, index: u32) {
        if let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::take) {
            self.free.push(index);
            if let Some(ip) = slot.ip {
                self.per_ip.remove(ip);
            }
            // Dropping the stream closes it, which removes it from the set.
        }
    }

    /// A readiness event for a connection: retry what it waits for.
    fn on_ready(&mut self, index: u32, generation: u32, flags: epoll::EventFlags) {
        if !self.live(index, generation) {
            return;
        }
        let readable = flags.intersects(
            epoll::EventFlags::IN
                | epoll::EventFlags::ERR
                | epoll::EventFlags::HUP
                | epoll::EventFlags::RDHUP,
        );
        let writable = flags
            .intersects(epoll::EventFlags::OUT | epoll::EventFlags::ERR | epoll::EventFlags::HUP);
        let Some(slot) = self.slots[index as usize].as_mut() else {
            return;
        };
        let next = match std::mem::replace(&mut slot.wait, Wait::Idle) {
            Wait::Peek if readable => Next::Peek,
            Wait::Recv(buf) if readable => {
                // The buffer goes back; `drive` takes it again for the recv.
                let now = Instant::now();
                slot.conn.on_recv(buf, Err(libc::EAGAIN), now)
            }
            Wait::Send { buf, .. } if writable => {
                let now = Instant::now();
                slot.conn.on_sent(buf, Err(libc::EAGAIN), now)
            }
            Wait::File { offset, len } if writable => Next::SendFile { offset, len },
            Wait::Cold { data, sent } if writable => {
                self.send_cold(index, data, sent);
                return;
            }
            other => {
                slot.wait = other;
                return;
            }
        };
        self.drive(index, next);
    }

    /// Answers from this core's threads: published uploads, cold opens and
    /// cold reads.
    fn take_offloaded(&mut self) {
        while let Some(done) = self.publisher.try_done() {
            self.resume(done.index, done.generation, |conn| {
                conn.on_published(done.reply)
            });
        }
        while let Some(done) = self.opener.try_done() {
            self.resume(done.index, done.generation, |conn| {
                conn.on_opened(Instant::now())
            });
        }
        while let Ok((index, generation)) = self.fetched_rx.try_recv() {
            self.resume(index, generation, |conn| conn.on_fetched(Instant::now()));
        }
        while let Some(done) = self.reader.try_done() {
            if !self.live(done.index, done.generation) {
                continue;
            }
            match done.data {
                Ok(data) if !data.is_empty() => {
                    if let Some(s) = self.stats() {
                        s.cold_read_bytes_total
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    self.send_cold(done.index, data, 0);
                }
                _ => {
                    let Some(slot) = self.slots[done.index as usize].as_mut() else {
                        continue;
                    };
                    slot.wait = Wait::Idle;
                    let next = slot.conn.on_file_sent(Err(libc::EIO), Instant::now());
                    self.drive(done.index, next);
                }
            }
        }
    }

    /// A thread of this core finished what connection `index` waited for:
    /// its wait ends, it decides (`decide`) and goes on, unless it is gone.
    fn resume(&mut self, index: u32, generation: u32, decide: impl FnOnce(&mut Conn) -> Next) {
        if !self.live(index, generation) {
            return;
        }
        let Some(slot) = self.slots[index as usize].as_mut() else {
            return;
        };
        slot.wait = Wait::Idle;
        let next = decide(&mut slot.conn);
        self.drive(index, next);
    }

    fn run_ready(&mut self) {
        for _ in 0..self.ready.len() {
            let Some((index, generation)) = self.ready.pop_front() else {
                return;
            };
            if !self.live(index, generation) {
                continue;
            }
            let Some(slot) = self.slots[index as usize].as_mut() else {
                continue;
            };
            if let Wait::Ready(next) = std::mem::replace(&mut slot.wait, Wait::Idle) {
                self.drive(index, next);
            }
        }
    }

    /// Carry out what the connection asks for, until it must wait: the one
    /// place that turns a connection's [`Next`] into syscalls. Each step
    /// returns the next, or `None` once the connection waits (for
    /// readiness, a timer, a thread of this core) or is gone.
    fn drive(&mut self, index: u32, first: Next) {
        let mut next = first;
        // File bytes moved this turn, bounded by PUMP_BYTES_PER_TURN.
        let mut moved = 0u64;
        loop {
            let now = Instant::now();
            let step = match next {
                Next::Peek => self.peek(index, now),
                Next::PeekAgain => self.peek_again(index, now),
                Next::Recv => self.recv(index, false, now),
                Next::Linger => self.recv(index, true, now),
                Next::Send { more } => self.send(index, more, now),
                Next::SendFile { offset, len } => {
                    self.send_file(index, offset, len, &mut moved, now)
                }
                Next::Handoff => self.hand_off_slot(index),
                Next::Publish => self.publish(index),
                Next::Open { namespace, key } => self.open(index, namespace, key, now),
                Next::Fetch { namespace, key } => self.fetch(index, namespace, key, now),
                Next::ReceiveInBackground => self.receive_in_background(index, now),
                Next::Close => {
                    self.close(index);
                    None
                }
            };
            match step {
                Some(step) => next = step,
                None => return,
            }
        }
    }

    /// Peek at the first bytes (`MSG_PEEK`, nothing consumed): TLS and h2c
    /// go to the fallback untouched.
    fn peek(&mut self, index: u32, now: Instant) -> Option<Next> {
        let slot = slot_mut(&mut self.slots, index)?;
        if self.sampler.take(now) {
            // A sampled first request: the peek brings the kernel's receive time.
            let mut buf = Vec::with_capacity(Conn::peek_buf_bytes());
            return match sluice_uring::recv_stamped(slot.stream.as_fd(), &mut buf, libc::MSG_PEEK) {
                Ok((n, stamp)) => {
                    if let Some(stamp) = stamp.filter(|_| n > 0) {
                        slot.conn.note_arrival(stamp);
                    }
                    Some(slot.conn.on_peek(&buf, now))
                }
                Err(e) if e.0 == libc::EAGAIN => {
                    self.sampler.give_back();
                    slot.wait = Wait::Peek;
                    None
                }
                Err(e) if e.0 == libc::EINTR => Some(Next::Peek),
                Err(_) => Some(slot.conn.on_peek(&[], now)),
            };
        }
        let mut buf = [0u8; 16];
        let want = Conn::peek_buf_bytes().min(buf.len());
        match rustix::net::recv(&slot.stream, &mut buf[..want], RecvFlags::PEEK) {
            Ok((n, _)) => Some(slot.conn.on_peek(&buf[..n], now)),
            Err(Errno::AGAIN) => {
                slot.wait = Wait::Peek;
                None
            }
            Err(Errno::INTR) => Some(Next::Peek),
            Err(_) => Some(slot.conn.on_peek(&[], now)),
        }
    }

    /// Pause before peeking again (`wake_peekers` ends the pause).
    fn peek_again(&mut self, index: u32, now: Instant) -> Option<Next> {
        let slot = slot_mut(&mut self.slots, index)?;
        let at = now + Duration::from_millis(PEEK_AGAIN_MS);
        slot.wait = Wait::PeekAt;
        self.peek_timers.push((at, index, slot.generation));
        None
    }

    /// Receive more of the request. `linger`: the connection closes after
    /// its response, so shut the write side and read (discarding) until
    /// the client closes or the linger budget ends.
    fn recv(&mut self, index: u32, linger: bool, now: Instant) -> Option<Next> {
        let slot = slot_mut(&mut self.slots, index)?;
        if linger {
            let _ = rustix::net::shutdown(&slot.stream, rustix::net::Shutdown::Write);
        }
        // The first bytes of a request: sampled ones bring the kernel's
        // receive time (recvmsg with a control buffer).
        let stamped = !linger && slot.conn.is_idle() && self.sampler.take(now);
        let mut buf = slot.conn.take_read_buf();
        let result = if stamped {
            match sluice_uring::recv_stamped(slot.stream.as_fd(), &mut buf, 0) {
                Ok((n, stamp)) => {
                    if let Some(stamp) = stamp.filter(|_| n > 0) {
                        slot.conn.note_arrival(stamp);
                    }
                    // recv_stamped already grew the buffer by n.
                    return Some(slot.conn.on_recv(buf, Ok(n), now));
                }
                Err(e) => Err(Errno::from_raw_os_error(e.0)),
            }
        } else {
            rustix::net::recv(
                &slot.stream,
                rustix::buffer::spare_capacity(&mut buf),
                RecvFlags::empty(),
            )
        };
        match result {
            Ok((n, _)) => Some(slot.conn.on_recv(buf, Ok(n), now)),
            Err(Errno::AGAIN) => {
                if stamped {
                    self.sampler.give_back();
                }
                slot.wait = Wait::Recv(buf);
                None
            }
            Err(e) => Some(slot.conn.on_recv(buf, Err(errno_of(e)), now)),
        }
    }

    /// A peer's replicated write: its body goes to the background receiving
    /// threads (`engine::receive`) with a duplicate of the socket; the reply
    /// comes back through the publisher's queue. Received here when they
    /// cannot take it.
    fn receive_in_background(&mut self, index: u32, now: Instant) -> Option<Next> {
        let slot = slot_mut(&mut self.slots, index)?;
        let reply = crate::engine::receive::ReplyTo {
            index,
            generation: slot.generation,
            completer: self.publisher.completer(),
        };
        let read_timeout =
            Duration::from_millis(self.settings.conn_limits.timeouts.body_read_timeout_ms);
        let dup = slot.stream.try_clone().map(OwnedFd::from);
        slot.wait = Wait::Idle;
        crate::engine::receive::hand_over(&mut slot.conn, dup, read_timeout, reply, now)
    }

    /// Send the connection's output buffer (`more`: `MSG_MORE`, a body follows).
    fn send(&mut self, index: u32, more: bool, now: Instant) -> Option<Next> {
        let slot = slot_mut(&mut self.slots, index)?;
        let buf = slot.conn.take_out_buf();
        let from = slot.conn.out_sent().min(buf.len());
        let mut flags = SendFlags::NOSIGNAL;
        if more {
            flags |= SendFlags::MORE;
        }
        match rustix::net::send(&slot.stream, &buf[from..], flags) {
            Ok(n) => Some(slot.conn.on_sent(buf, Ok(n), now)),
            Err(Errno::AGAIN) => {
                slot.wait = Wait::Send { buf };
                None
            }
            Err(e) => Some(slot.conn.on_sent(buf, Err(errno_of(e)), now)),
        }
    }

    /// Send `len` bytes of the connection's artifact from `offset` by
    /// `sendfile`, or hand a chunk the page cache lacks to the reader
    /// thread. `moved` counts this turn's bytes: past PUMP_BYTES_PER_TURN
    /// the connection waits for the next turn.
    fn send_file(
        &mut self,
        index: u32,
        offset: u64,
        len: u64,
        moved: &mut u64,
        now: Instant,
    ) -> Option<Next> {
        let slot = slot_mut(&mut self.slots, index)?;
        if *moved >= PUMP_BYTES_PER_TURN {
            // Enough for one turn: the others go first.
            slot.wait = Wait::Ready(Next::SendFile { offset, len });
            self.ready.push_back((index, slot.generation));
            return None;
        }
        if slot.file.is_none() {
            slot.resident_until = 0;
            slot.file = slot
                .conn
                .take_file()
                .and_then(|a| a.into_file().ok())
                .map(Arc::new);
            // Corked while the body goes, as nginx's tcp_nopush
            // around sendfile: whole segments, one push at the end.
            slot.corked = rustix::net::sockopt::set_tcp_cork(&slot.stream, true).is_ok();
        }
        let Some(file) = slot.file.clone() else {
            self.close(index);
            return None;
        };
        let chunk = len.min(SENDFILE_BYTES as u64);
        let known_resident = offset + chunk <= slot.resident_until;
        if !known_resident && residency(&*file, offset, chunk) == Residency::NotResident {
            // The disk would block this thread in sendfile: the
            // reader thread reads the chunk, then it is sent.
            let job = ReadJob {
                index,
                generation: slot.generation,
                file,
                offset,
                len: len.min(COLD_READ_BYTES),
            };
            match self.reader.submit(job) {
                Ok(()) => {
                    slot.wait = Wait::Offloaded;
                    if let Some(s) = self.stats.get(self.core) {
                        s.cold_reads_total.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(_) => {
                    // The reader is COLD_QUEUE_MAX chunks behind:
                    // try again at the next turn.
                    slot.wait = Wait::Ready(Next::SendFile { offset, len });
                    self.ready.push_back((index, slot.generation));
                }
            }
            return None;
        }
        slot.resident_until = slot.resident_until.max(offset + chunk);
        let mut at = offset;
        match rustix::fs::sendfile(&slot.stream, &*file, Some(&mut at), chunk as usize) {
            Ok(n) => {
                *moved += n as u64;
                if let Some(s) = self.stats.get(self.core) {
                    s.sendfile_bytes_total
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                let next = slot.conn.on_file_sent(Ok(n as u64), now);
                if !matches!(next, Next::SendFile { .. }) {
                    uncork(slot);
                }
                Some(next)
            }
            Err(Errno::AGAIN) => {
                slot.wait = Wait::File { offset, len };
                None
            }
            Err(Errno::INTR) => Some(Next::SendFile { offset, len }),
            Err(e) => {
                uncork(slot);
                Some(slot.conn.on_file_sent(Err(errno_of(e)), now))
            }
        }
    }

    /// Give the socket to the fallback (TLS, h2c, over capacity).
    fn hand_off_slot(&mut self, index: u32) -> Option<Next> {
        if let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::take) {
            self.free.push(index);
            if let Some(ip) = slot.ip {
                self.per_ip.remove(ip);
            }
            let _ = epoll::delete(&self.epoll, &slot.stream);
            self.hand_off(slot.stream);
        }
        None
    }

    /// Hand a finished upload to this core's publisher thread (the fsync
    /// happens there), or publish it here when the publisher is behind.
    fn publish(&mut self, index: u32) -> Option<Next> {
        let slot = slot_mut(&mut self.slots, index)?;
        let Some(sink) = slot.conn.take_publish() else {
            self.close(index);
            return None;
        };
        let job = publish::Job {
            index,
            generation: slot.generation,
            sink: Box::new(sink),
        };
        match self.publisher.submit(job) {
            Ok(()) => {
                slot.wait = Wait::Offloaded;
                None
            }
            // The publisher is PUBLISH_QUEUE_MAX uploads behind:
            // publish here rather than queue without bound.
            Err(job) => Some(slot.conn.on_published(job.sink.finish())),
        }
    }

    /// Hand a cold open to this core's opener thread, or open here when the
    /// opener is behind.
    fn open(&mut self, index: u32, namespace: String, key: String, now: Instant) -> Option<Next> {
        let slot = slot_mut(&mut self.slots, index)?;
        let job = opener::Job {
            index,
            generation: slot.generation,
            namespace,
            key,
        };
        if let Some(s) = self.stats.get(self.core) {
            s.cold_opens_total.fetch_add(1, Ordering::Relaxed);
        }
        match self.opener.submit(job) {
            Ok(()) => {
                slot.wait = Wait::Offloaded;
                None
            }
            Err(_) => Some(slot.conn.open_here(now)),
        }
    }

    /// Ask the read-through (peers, then the tier) for a local miss; the
    /// connection waits until `take_offloaded` hears it ended.
    fn fetch(&mut self, index: u32, namespace: String, key: String, now: Instant) -> Option<Next> {
        let slot = slot_mut(&mut self.slots, index)?;
        let Some(rt) = self.app.miss_fetcher().cloned() else {
            return Some(slot.conn.on_fetched(now));
        };
        // Waiting on the peers, not the client: no deadline
        // applies (the read-through ends every fetch within
        // read_through_timeout_ms).
        slot.wait = Wait::Offloaded;
        let waiter = super::threads::fetch_waiter(
            self.fetched_tx.clone(),
            self.waker.clone(),
            index,
            slot.generation,
        );
        rt.request(&namespace, &key, waiter);
        None
    }

    /// Send what the reader read of a cold body; report it to the
    /// connection when all of it is out.
    fn send_cold(&mut self, index: u32, data: Vec<u8>, mut sent: usize) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        while sent < data.len() {
            match rustix::net::send(&slot.stream, &data[sent..], SendFlags::NOSIGNAL) {
                Ok(n) => sent += n,
                Err(Errno::AGAIN) => {
                    slot.wait = Wait::Cold { data, sent };
                    return;
                }
                Err(Errno::INTR) => {}
                Err(e) => {
                    slot.wait = Wait::Idle;
                    uncork(slot);
                    let next = slot.conn.on_file_sent(Err(errno_of(e)), Instant::now());
                    self.drive(index, next);
                    return;
                }
            }
        }
        slot.wait = Wait::Idle;
        let next = slot
            .conn
            .on_file_sent(Ok(data.len() as u64), Instant::now());
        if !matches!(next, Next::SendFile { .. }) {
            uncork(slot);
        }
        self.drive(index, next);
    }
}

/// The connection in slot `index`, if any. A free function, not a method, so the
/// caller can still use the loop's other fields while it holds the slot.
fn slot_mut(slots: &mut [Option<Slot>], index: u32) -> Option<&mut Slot> {
    slots.get_mut(index as usize).and_then(Option::as_mut)
}

fn uncork(slot: &mut Slot) {
    if slot.corked {
        slot.corked = false;
        let _ = rustix::net::sockopt::set_tcp_cork(&slot.stream, false);
        slot.file = None;
    } else {
        slot.file = None;
    }
}
