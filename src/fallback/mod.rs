//! The hyper + rustls fallback front end (DESIGN.md, data flow step 4).
//!
//! Everything the io_uring fast path does not take comes here: TLS (rustls, ALPN `h2` and
//! `http/1.1`), h2c with prior knowledge, and plaintext HTTP/1.1 whenever the ring engine is off
//! or declines a connection. Every request is served by a caller-supplied [`Handler`], so the
//! fallback knows nothing about routes or the store; it only owns sockets, protocols and limits.
//!
//! # Threads
//!
//! [`Fallback::start`] starts `worker_threads` worker threads (config `fallback_threads`, by
//! default as many as the ring engine's threads; the constant [`WORKER_THREADS`] only in
//! tests) named `sluice-fallback`, each running a current-thread tokio runtime of its own with
//! a share of [`BLOCKING_THREADS_MAX`] blocking-pool threads (`sluice-fallback-io`: large
//! artifact reads and upload commits run there). Connections are dealt to the workers
//! round-robin and stay on theirs, so a connection's tasks, timers and socket wake-ups never
//! cross to another thread: with one multi-thread runtime every HTTP/2 stream was a task that
//! woke idle workers to steal it, which was most of the fallback's cost per small response
//! (docs/benchmarks.md, "HTTP/2 and TLS at h2o's pace"). When io_uring is unavailable these
//! workers serve all traffic, and TLS costs CPU per byte, so they scale with the cores like
//! the engine does.
//!
//! # HTTP/2 streams and writes
//!
//! hyper gives every HTTP/2 stream to an executor; ours (`exec.rs`) polls it once on the
//! connection's task and spawns it only if it has to wait, so a GET answered from the page
//! cache costs no task. Below h2, `coalesce.rs` holds what one turn of the connection writes
//! and sends it with the next turn's flush: the answers to a batch of requests read in one
//! `recv` leave in one write (one batch of TLS records).
//!
//! # Connections
//!
//! Connections arrive either by [`Fallback::handoff`] (an engine thread accepted the socket and
//! only `MSG_PEEK`ed it, so nothing was consumed) or from a listener given to
//! [`Fallback::serve_listener`]. Each connection holds one of `connections_max` slots from
//! accept (or hand-off) until it closes; the queue between hand-off and the runtime is bounded
//! too. Per connection the first bytes are peeked again under the header-read deadline:
//! `0x16` is a TLS ClientHello, the 24-byte h2 preface is h2c, anything else is HTTP/1.1.
//!
//! # Slots under pressure (`slots.rs`)
//!
//! When every slot is taken, the connection idle longest (no handler running and no response
//! body being sent: an HTTP/1 keep-alive between requests, an h2 connection with no open
//! stream, a connection still in its TLS handshake or before its first request) is told to
//! close, and the new one is admitted at once, as nginx reuses keep-alive connections when
//! `worker_connections` run out. Only when every slot serves a request is the new one refused:
//! [`Fallback::answer_refused`] peeks it briefly and answers HTTP/1 `503` with `retry-after`;
//! TLS and h2c are closed, since no status can be sent before a handshake or an h2 session.
//! One client address holds at most `connections_per_ip_max` slots. Shed and refused
//! connections are counted in [`FallbackStats`].
//!
//! # Time bounds
//!
//! - `header_read_timeout_ms`: from accept to classification and a finished TLS handshake,
//!   and for HTTP/1 to the end of the first head; later heads get it from their first byte.
//!   The guard under hyper (`guard.rs`) answers `408` when it passes (hyper's own head timeout,
//!   which closes silently and starts when hyper begins to wait, is off).
//! - `idle_timeout_ms`: no socket progress and no request in flight: a graceful close (GOAWAY
//!   for h2). The server sends no keep-alive PINGs: their answers would count as progress.
//! - `send_timeout_ms`: a write that waits, or a response body in flight with nothing written,
//!   for that long closes the connection (nginx's `send_timeout`; an h2 client that opens no
//!   flow-control window never makes a write wait). It also bounds a graceful close the client
//!   does not finish (h2's GOAWAY is followed by a PING whose answer hyper would otherwise
//!   await for ever).
//! - `body_read_timeout_ms` is the handler's (`app_handler.rs`): idle time between request-body
//!   pieces, then `408`; on h2 that ends the stream, not the connection.
//!
//! # Limits on what a client sends
//!
//! - An HTTP/1 request target over `uri_bytes_max` gets `414` from the guard as soon as the
//!   request line shows it, however long (hyper would answer 431 past its head bound, or let a
//!   9,000-byte target through); an h2 `:path` gets it from the handler.
//! - Every HTTP/1 head goes through the ring's sans-IO core in the guard first
//!   ([`FallbackLimits::head_bytes_max`], the ring's framing rules: CL with TE, repeated or
//!   signed CL, unknown TE, obs-fold, missing Host, ...), which answers the core's status (400,
//!   414, 417, 431, 505) and closes, so every front gives the same bytes the same answer.
//!   Hyper's own head bound ([`HTTP1_HEAD_BYTES_MAX`]) is only a backstop behind it.
//! - HTTP/2: [`H2_STREAMS_MAX`] concurrent streams, [`H2_HEADER_LIST_BYTES_MAX`] of headers
//!   (431 from h2), h2's burst limits on resets ([`H2_PENDING_ACCEPT_RESETS_MAX`],
//!   [`H2_LOCAL_ERROR_RESETS_MAX`]), and the guard's count of RST_STREAM frames per window
//!   ([`H2_RESETS_PER_WINDOW_MAX`] per [`H2_RESET_WINDOW`]), which catches the paced rapid
//!   reset the burst limits miss: GOAWAY ENHANCE_YOUR_CALM, then close.
//!
//! # Decisions where the brief was silent
//!
//! - A TLS ClientHello arriving while TLS is not configured is closed without a reply: there is
//!   no way to answer it meaningfully, and it is counted in [`FallbackStats::rejected_total`].
//! - [`Fallback::handoff`] returns a refused socket at once so the engine thread never blocks;
//!   the engine passes it back to [`Fallback::answer_refused`].
//! - The guard writes its own `408`/`414`/GOAWAY only where nothing of hyper's can be
//!   interleaved (HTTP/1: no request in flight; h2: between frames, else it just closes), then
//!   half-closes and drains the client's input briefly, so a reset does not destroy the answer.
//!
//! # Files
//!
//! - this file: [`Fallback`], the handle the server and the engines hold (start, hand-off,
//!   listener, stats, shutdown);
//! - `limits.rs`: [`FallbackLimits`] and the fixed bounds; `stats.rs`: [`FallbackStats`];
//! - `tls.rs`: certificate and key loading, the rustls configuration with ALPN;
//! - `accept.rs`: how a connection arrives (accept loop, hand-off queue, its slot, the answer
//!   to a refused one); `classify.rs`: what its first bytes say it is;
//! - `serve.rs`: one admitted connection, from classification and handshake to hyper's end;
//!   `exec.rs`: the executor of h2 streams; `coalesce.rs`: one write per connection turn;
//! - `slots.rs` and `guard.rs`: the policies (admission and shedding; the watch under hyper);
//! - `handler.rs`: the [`Handler`] interface every request goes to; `app_handler.rs`: the
//!   implementation that serves [`crate::app::App`];
//! - `tests.rs`: the fallback end to end over loopback.

mod accept;
pub mod app_handler;
mod classify;
mod coalesce;
mod exec;
mod guard;
mod handler;
mod limits;
mod serve;
mod slots;
pub mod stamp;
mod stats;
#[cfg(test)]
mod tests;
mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::warn;

use accept::{
    accept_loop, adopt, answer_refused, dispatch, lock, AcceptShared, ConnSlot, Queued, Spawner,
    Table, Workers,
};
pub use accept::{HandoffError, HandoffRefusal};
pub use coalesce::H2_COALESCE_BYTES_MAX;
pub use guard::{H2_RESETS_PER_WINDOW_MAX, H2_RESET_WINDOW};
pub use handler::{body_from_bytes, empty_body, ConnInfo, Handler, ResponseBody};
pub use limits::{
    FallbackLimits, BLOCKING_THREADS_MAX, H2_CONNECTION_WINDOW_BYTES, H2_HEADER_LIST_BYTES_MAX,
    H2_LOCAL_ERROR_RESETS_MAX, H2_PENDING_ACCEPT_RESETS_MAX, H2_STREAMS_MAX,
    H2_STREAM_WINDOW_BYTES, HANDOFF_QUEUE_MAX, HTTP1_BUF_BYTES_MAX, HTTP1_HEAD_BYTES_MAX,
    REFUSALS_IN_FLIGHT_MAX, WORKER_THREADS,
};
use serve::{serve_connection, Shared};
use slots::SlotTable;
pub use slots::SHEDDING_MAX;
use stats::Counters;
pub use stats::FallbackStats;
pub use tls::{TlsError, TlsSettings};

// Engine threads share one handle, so it must cross threads.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<Fallback>();
};

/// How often `shutdown` looks at the connection gauge while draining.
const DRAIN_POLL: Duration = Duration::from_millis(5);
/// How long each worker lets its runtime cancel its remaining tasks after the drain budget.
const RUNTIME_TEARDOWN: Duration = Duration::from_millis(200);

/// A running fallback front end. Dropping it without [`Fallback::shutdown`] cancels every
/// connection at once.
pub struct Fallback {
    /// The worker threads, until shutdown or drop takes them.
    threads: Mutex<Option<Vec<std::thread::JoinHandle<()>>>>,
    /// Ends the workers' runtimes (after the drain).
    stop: Arc<watch::Sender<bool>>,
    workers: Arc<Workers>,
    table: Table,
    gauge: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    /// Bounds the tasks that answer refused connections.
    refusals: Arc<Semaphore>,
    shutdown: watch::Sender<bool>,
    shutting_down: AtomicBool,
    /// Set to end a drain in progress at once (a second SIGTERM).
    drain_cut: Arc<AtomicBool>,
}

impl Fallback {
    /// Starts the runtime (see the module docs for its threads) and the task that serves
    /// handed-off and accepted connections. `tls: None` serves plaintext only and closes TLS
    /// connections. Fails on a zero limit or if the runtime's threads cannot be spawned.
    pub fn start<H: Handler>(
        handler: Arc<H>,
        tls: Option<Arc<ServerConfig>>,
        limits: FallbackLimits,
    ) -> Result<Fallback, io::Error> {
        limits.check()?;
        let counters = Arc::new(Counters::default());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared::new(
            handler,
            tls,
            &limits,
            counters.clone(),
            shutdown_rx.clone(),
        ));
        let spawner: Spawner = {
            let shared = shared.clone();
            Arc::new(move |stream, peer, slot| {
                tokio::spawn(serve_connection(shared.clone(), stream, peer, slot));
            })
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let queue_max = limits.connections_max.min(HANDOFF_QUEUE_MAX);
        let blocking_max = (BLOCKING_THREADS_MAX / limits.worker_threads).max(1);
        let mut handles = Vec::with_capacity(limits.worker_threads);
        let mut queues = Vec::with_capacity(limits.worker_threads);
        let mut threads = Vec::with_capacity(limits.worker_threads);
        for _ in 0..limits.worker_threads {
            // A start that fails part-way drops `stop_tx`, which ends the workers begun.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .max_blocking_threads(blocking_max)
                .thread_name("sluice-fallback-io")
                .enable_all()
                .build()?;
            let (queue_tx, queue_rx) = mpsc::channel(queue_max);
            runtime.spawn(dispatch(spawner.clone(), shutdown_rx.clone(), queue_rx));
            handles.push(runtime.handle().clone());
            queues.push(queue_tx);
            let mut stop = stop_rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("sluice-fallback".into())
                    .spawn(move || {
                        runtime.block_on(async move {
                            let _ = stop.wait_for(|stopping| *stopping).await;
                        });
                        runtime.shutdown_timeout(RUNTIME_TEARDOWN);
                    })?,
            );
        }
        Ok(Fallback {
            threads: Mutex::new(Some(threads)),
            stop: Arc::new(stop_tx),
            workers: Arc::new(Workers::new(handles, queues)),
            table: Arc::new(Mutex::new(SlotTable::new(
                limits.connections_max,
                limits.connections_per_ip_max,
            ))),
            gauge: Arc::new(AtomicUsize::new(0)),
            counters,
            refusals: Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT_MAX)),
            shutdown: shutdown_tx,
            shutting_down: AtomicBool::new(false),
            drain_cut: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Passes an accepted connection to the fallback without blocking. The stream must be
    /// unread (the engine only `MSG_PEEK`ed it). It may be blocking or not; the fallback makes
    /// it non-blocking. On refusal the stream comes back in the error.
    pub fn handoff(
        &self,
        stream: std::net::TcpStream,
        peer: SocketAddr,
    ) -> Result<(), HandoffError> {
        let refuse = |stream, reason| {
            self.counters
                .handoff_refused
                .fetch_add(1, Ordering::Relaxed);
            Err(HandoffError {
                stream,
                peer,
                reason,
            })
        };
        if self.shutting_down.load(Ordering::Acquire) {
            return refuse(stream, HandoffRefusal::ShutDown);
        }
        let slot = match ConnSlot::admit(&self.table, &self.gauge, &self.counters, peer) {
            Ok(slot) => slot,
            Err(reason) => return refuse(stream, reason),
        };
        match self.workers.queue(Queued { stream, peer, slot }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(q)) => refuse(q.stream, HandoffRefusal::QueueFull),
            Err(mpsc::error::TrySendError::Closed(q)) => refuse(q.stream, HandoffRefusal::ShutDown),
        }
    }

    /// Answers a connection that was refused (by [`Fallback::handoff`] or the caller's own
    /// limits) as well as its protocol allows, without blocking: a task peeks its first bytes
    /// for a moment and sends HTTP/1 a `503` with `retry-after`; TLS and h2c are closed (no
    /// status can be sent without a handshake or an h2 session). At most
    /// [`REFUSALS_IN_FLIGHT_MAX`] such tasks run; past that the connection closes at once.
    pub fn answer_refused(&self, stream: std::net::TcpStream) {
        let Ok(permit) = self.refusals.clone().try_acquire_owned() else {
            return;
        };
        let handle = self.workers.next_handle();
        let _enter = handle.enter();
        let Ok(stream) = adopt(stream) else {
            return;
        };
        handle.spawn(async move {
            answer_refused(stream).await;
            drop(permit);
        });
    }

    /// Accepts connections from `listener` on the fallback runtime until shutdown. When all
    /// `connections_max` slots are taken, the longest-idle connection is closed to admit the
    /// new one; if every slot serves a request, the new one is refused
    /// ([`Fallback::answer_refused`]).
    pub fn serve_listener(&self, listener: std::net::TcpListener) -> Result<(), io::Error> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(io::Error::other("fallback is shut down"));
        }
        listener.set_nonblocking(true)?;
        let handle = self.workers.next_handle();
        let listener = {
            // Registering with the reactor needs the runtime's context.
            let _enter = handle.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        handle.spawn(accept_loop(
            listener,
            AcceptShared {
                table: self.table.clone(),
                gauge: self.gauge.clone(),
                counters: self.counters.clone(),
                refusals: self.refusals.clone(),
                workers: self.workers.clone(),
            },
            self.shutdown.subscribe(),
        ));
        Ok(())
    }

    /// Connections open now, including queued hand-offs.
    pub fn connections(&self) -> usize {
        self.gauge.load(Ordering::Relaxed)
    }

    /// Counters and the connection gauge.
    pub fn stats(&self) -> FallbackStats {
        self.counters.snapshot(self.connections())
    }

    /// Ends a drain in progress (or the next one) at once: what is left is cancelled within
    /// one poll (a second SIGTERM).
    pub fn cut_drain(&self) {
        self.drain_cut.store(true, Ordering::Release);
    }

    /// Graceful shutdown: stop accepting and refuse hand-offs, close connections that are
    /// idle or not yet serving, let in-flight requests finish (HTTP/1 closes after the current
    /// response, HTTP/2 sends GOAWAY), and after `drain` cancel whatever is left. Blocks the
    /// calling thread for at most about `drain` + 200 ms (the waiting runs on a helper thread,
    /// so calling this from async code is safe but stalls that worker; prefer
    /// `spawn_blocking`). A second call returns at once.
    pub fn shutdown(&self, drain: Duration) {
        self.shutting_down.store(true, Ordering::Release);
        lock(&self.table).close();
        // send_replace stores the value even when no receiver is left.
        self.shutdown.send_replace(true);
        let Some(threads) = self.take_threads() else {
            return;
        };
        let started = std::time::Instant::now();
        while self.gauge.load(Ordering::Relaxed) > 0 && !self.drain_cut.load(Ordering::Acquire) {
            if started.elapsed() >= drain {
                warn!(
                    open = self.gauge.load(Ordering::Relaxed),
                    drain_ms = drain.as_millis() as u64,
                    "fallback drain budget spent; closing the remaining connections"
                );
                break;
            }
            std::thread::sleep(DRAIN_POLL);
        }
        self.stop.send_replace(true);
        let me = std::thread::current().id();
        for thread in threads {
            // Called from a fallback worker itself, that worker ends once this call returns.
            if thread.thread().id() != me && thread.join().is_err() {
                warn!("a fallback worker panicked; its connections were cancelled");
            }
        }
    }

    /// The worker threads, the first time they are asked for (shutdown or drop); `None` after.
    fn take_threads(&self) -> Option<Vec<std::thread::JoinHandle<()>>> {
        // Nothing can panic while the lock is held, so a poisoned lock still holds valid state.
        match self.threads.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }
}

impl Drop for Fallback {
    fn drop(&mut self) {
        lock(&self.table).close();
        self.shutdown.send_replace(true);
        // Never blocks, so dropping a Fallback inside an async context is safe: the workers
        // cancel their connections and end on their own threads.
        self.stop.send_replace(true);
        drop(self.take_threads());
    }
}
