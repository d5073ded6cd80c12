//! What the threads of both engines share. Their lifecycle: one thread per
//! listener, each building its own loop and saying it is ready before the
//! next one starts, one stop signal that every loop reads at each turn, and
//! stop-and-join. And what every loop turn does alike: the tick, the bound on
//! file bytes per turn, the open-file cache's bounds, handing a connection
//! to the fallback, waking for a read-through, and rendering per-core
//! series. The loops themselves (`ring::CoreLoop`, `epoll::CoreLoop`) stay
//! apart.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use sluice_uring::Waker;

use crate::app::App;
use crate::fallback::Fallback;

/// How often every engine thread checks deadlines and publishes stats, in
/// milliseconds.
pub const TICK_MS: u64 = 100;
/// File bytes one connection moves before yielding to the others.
pub const PUMP_BYTES_PER_TURN: u64 = 4 * 1024 * 1024;
/// Open artifact files one engine thread keeps (each holds an fd).
pub const OPEN_FILES_PER_CORE_MAX: usize = 1024;
/// Every this many ticks, cached fds of changed artifacts are closed.
pub const OPEN_FILES_SWEEP_TICKS: u64 = 10;

/// How the threads of one engine are told to stop: set once by
/// [`CoreThreads::stop`] (or a drop), read by every loop at each turn.
#[derive(Default)]
pub struct StopSignal {
    stop: AtomicBool,
    /// The public drain's budget, ms.
    drain_ms: AtomicU64,
    /// The budget of outgoing tasks after the drain (shutdown phase 3), ms.
    tasks_ms: AtomicU64,
    /// Set to end a drain at once (see [`DrainCutter`]).
    cut: AtomicBool,
}

impl StopSignal {
    /// The engine is stopping: stop accepting and drain.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// How long in-flight requests may take once the engine stops.
    pub fn drain_budget(&self) -> Duration {
        Duration::from_millis(self.drain_ms.load(Ordering::SeqCst))
    }

    /// How long outgoing tasks in flight may take after the drain.
    pub fn tasks_budget(&self) -> Duration {
        Duration::from_millis(self.tasks_ms.load(Ordering::SeqCst))
    }

    /// The drain was cut short: close what is left now.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

/// Ends a drain in progress: each engine thread closes what is left at its next turn (at
/// most one tick later). A second SIGTERM uses it to skip to teardown.
#[derive(Clone)]
pub struct DrainCutter(Arc<StopSignal>);

impl DrainCutter {
    pub fn cut(&self) {
        self.0.cut.store(true, Ordering::SeqCst);
    }
}

/// What every thread of an engine is given: the app it serves, the
/// fallback it hands connections to, the counters of every core (its own at
/// its core's index) and the stop signal.
pub struct CoreShared<S> {
    pub app: Arc<App>,
    pub fallback: Arc<Fallback>,
    pub stats: Arc<Vec<S>>,
    pub signal: Arc<StopSignal>,
}

/// What a new engine thread answers once its loop is built (or failed to
/// be): its waker and a report of type `T`, or why it cannot run.
pub struct Ready<T>(SyncSender<std::io::Result<(Waker, T)>>);

impl<T> Ready<T> {
    /// The loop is built; it runs once this returns.
    pub fn ready(self, waker: Waker, report: T) {
        let _ = self.0.send(Ok((waker, report)));
    }

    /// The loop could not be built; the thread ends.
    pub fn failed(self, err: std::io::Error) {
        let _ = self.0.send(Err(err));
    }
}

/// The running threads of one engine, one per listener.
pub struct CoreThreads {
    threads: Vec<JoinHandle<()>>,
    wakers: Vec<Waker>,
    signal: Arc<StopSignal>,
}

impl CoreThreads {
    /// Start one thread per listener, named `{name}-{core}`, with counters
    /// `S` for each. Each runs `body(core, listener, seed, shared, ready)`:
    /// it builds its loop on its own thread (the loops hold `Rc`s), answers
    /// through `ready`, then runs until `shared.signal` ends it. The threads
    /// start one after another; the first that cannot (its error, or
    /// `"{role} thread exited during set-up"` when it panicked) stops and
    /// joins those started before it, so a failed start leaves nothing
    /// running. On success, the counters and the reports in core order.
    pub fn start<S, Seed, T, F>(
        (name, role): (&str, &str),
        listeners: Vec<TcpListener>,
        seeds: Vec<Seed>,
        app: &Arc<App>,
        fallback: &Arc<Fallback>,
        body: F,
    ) -> std::io::Result<(CoreThreads, Arc<Vec<S>>, Vec<T>)>
    where
        S: Default + Send + Sync + 'static,
        Seed: Send + 'static,
        T: Send + 'static,
        F: Fn(usize, TcpListener, Seed, CoreShared<S>, Ready<T>) + Send + Sync + 'static,
    {
        let body = Arc::new(body);
        let stats: Arc<Vec<S>> = Arc::new((0..listeners.len()).map(|_| S::default()).collect());
        let mut threads = CoreThreads {
            threads: Vec::new(),
            wakers: Vec::new(),
            signal: Arc::new(StopSignal::default()),
        };
        let mut reports = Vec::new();
        for (core, (listener, seed)) in listeners.into_iter().zip(seeds).enumerate() {
            let (ready_tx, ready_rx) = sync_channel(1);
            let body = Arc::clone(&body);
            let shared = CoreShared {
                app: Arc::clone(app),
                fallback: Arc::clone(fallback),
                stats: Arc::clone(&stats),
                signal: Arc::clone(&threads.signal),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{core}"))
                .spawn(move || body(core, listener, seed, shared, Ready(ready_tx)));
            let started = match spawned {
                Ok(thread) => {
                    threads.threads.push(thread);
                    ready_rx.recv().unwrap_or_else(|_| {
                        Err(std::io::Error::other(format!(
                            "{role} thread exited during set-up"
                        )))
                    })
                }
                Err(err) => Err(err),
            };
            match started {
                Ok((waker, report)) => {
                    threads.wakers.push(waker);
                    reports.push(report);
                }
                Err(err) => {
                    threads.stop(Duration::ZERO, Duration::ZERO);
                    return Err(err);
                }
            }
        }
        Ok((threads, stats, reports))
    }

    /// The wakers of the threads that run, in core order.
    pub fn wakers(&self) -> &[Waker] {
        &self.wakers
    }

    /// The signal the threads read.
    pub fn signal(&self) -> &Arc<StopSignal> {
        &self.signal
    }

    /// A handle that ends the drain early.
    pub fn drain_cutter(&self) -> DrainCutter {
        DrainCutter(Arc::clone(&self.signal))
    }

    /// Tell the threads to stop (stop accepting, drain within `drain`, then
    /// give outgoing tasks `tasks`), wake them, and wait for them.
    pub fn stop(&mut self, drain: Duration, tasks: Duration) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.signal.tasks_ms.store(ms(tasks), Ordering::SeqCst);
        self.signal
            .drain_ms
            .store(ms(drain).max(1), Ordering::SeqCst);
        self.signal.stop.store(true, Ordering::SeqCst);
        for waker in &self.wakers {
            waker.wake();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for CoreThreads {
    /// An engine dropped without a shutdown still stops its threads (with
    /// no drain budget) rather than leave them serving; it does not wait.
    fn drop(&mut self) {
        self.signal.stop.store(true, Ordering::SeqCst);
        for waker in &self.wakers {
            waker.wake();
        }
    }
}

/// One per-core series of an engine: name, Prometheus type, help, and how to read it from
/// one core's counters.
pub type CoreSeries<S> = (&'static str, &'static str, &'static str, fn(&S) -> u64);

/// Append per-core series in the Prometheus text format, one sample per core.
pub fn render_per_core<S>(series: &[CoreSeries<S>], stats: &[S], out: &mut String) {
    use std::fmt::Write as _;
    for (name, kind, help, get) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (core, s) in stats.iter().enumerate() {
            let _ = writeln!(out, "{name}{{core=\"{core}\"}} {}", get(s));
        }
    }
}

/// Give an accepted connection to the fallback (TLS, h2c, or this engine thread is full).
/// A refusal (the fallback at its own bound) gives the stream back, for the engine to
/// count and then have the fallback answer it without blocking this thread
/// (`Fallback::answer_refused`: 503 for HTTP/1, a close for TLS and h2c).
pub fn hand_to_fallback(
    fallback: &Fallback,
    stream: std::net::TcpStream,
) -> Result<(), crate::fallback::HandoffError> {
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    fallback.handoff(stream, peer)
}

/// What a read-through calls when the fetch that connection (`index`, `generation`) waits
/// for has ended, on whichever thread ends it: the connection goes on `fetched` and its
/// engine thread wakes to decide its request again.
pub fn fetch_waiter(
    fetched: std::sync::mpsc::Sender<(u32, u32)>,
    waker: sluice_uring::Waker,
    index: u32,
    generation: u32,
) -> Box<dyn FnOnce() + Send> {
    Box::new(move || {
        let _ = fetched.send((index, generation));
        waker.wake();
    })
}
