//! How a connection reaches the fallback: admitted to one of the slots ([`ConnSlot`]), either
//! from a listener ([`accept_loop`]) or handed off by an engine thread through a bounded queue
//! ([`dispatch`]); and the answer a refused one gets ([`answer_refused`]).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::debug;

use super::classify::{sniff, Sniffed};
use super::guard::{self, Activity};
use super::slots::{Admitted, Refusal, SlotTable};
use super::stats::Counters;

/// How long a refused connection is given to show its first bytes, so HTTP/1 can get a 503.
const REFUSAL_PEEK: Duration = Duration::from_millis(500);
/// Pause after a failed `accept` (EMFILE and friends) so the loop does not spin on the error.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(20);

/// Why [`Fallback::handoff`](super::Fallback::handoff) refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffRefusal {
    /// `connections_max` connections serve requests; none was idle to make room.
    AtCapacity,
    /// The client's address holds `connections_per_ip_max` connections.
    PerIpCap,
    /// The hand-off queue is full (the runtime is not keeping up).
    QueueFull,
    /// [`Fallback::shutdown`] has begun.
    ShutDown,
}

/// A refused hand-off; the socket comes back untouched so the caller can answer 503 or close.
#[derive(Debug)]
pub struct HandoffError {
    /// The connection, still unread.
    pub stream: std::net::TcpStream,
    /// The client's address, as passed in.
    pub peer: SocketAddr,
    /// Why it was refused.
    pub reason: HandoffRefusal,
}

impl fmt::Display for HandoffError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.reason {
            HandoffRefusal::AtCapacity => "fallback at connections_max",
            HandoffRefusal::PerIpCap => "client address at connections_per_ip_max",
            HandoffRefusal::QueueFull => "fallback hand-off queue full",
            HandoffRefusal::ShutDown => "fallback shut down",
        };
        write!(f, "hand-off of {} refused: {why}", self.peer)
    }
}

impl std::error::Error for HandoffError {}

/// The slot table, shared by the accept paths and every connection's slot.
pub(super) type Table = Arc<Mutex<SlotTable<Activity>>>;

pub(super) fn lock(table: &Table) -> MutexGuard<'_, SlotTable<Activity>> {
    // Nothing panics while the lock is held, so a poisoned table still holds valid state.
    table
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One of `connections_max` slots, held by an open (or queued) connection from admission until
/// it closes. It carries the connection's [`Activity`], which the table reads to choose an
/// idle connection to shed.
pub(super) struct ConnSlot {
    id: u64,
    pub(super) activity: Arc<Activity>,
    table: Table,
    gauge: Arc<AtomicUsize>,
}

impl ConnSlot {
    /// Admits a connection from `peer`, shedding the longest-idle one when full.
    pub(super) fn admit(
        table: &Table,
        gauge: &Arc<AtomicUsize>,
        counters: &Counters,
        peer: SocketAddr,
    ) -> Result<ConnSlot, HandoffRefusal> {
        let activity = Arc::new(Activity::new());
        let admitted = lock(table).admit(peer.ip(), activity.clone());
        match admitted {
            Ok((id, how)) => {
                if how == Admitted::Shed {
                    counters.shed_idle.fetch_add(1, Ordering::Relaxed);
                }
                gauge.fetch_add(1, Ordering::Relaxed);
                Ok(ConnSlot {
                    id,
                    activity,
                    table: table.clone(),
                    gauge: gauge.clone(),
                })
            }
            Err(Refusal::Full) => {
                counters.refused_full.fetch_add(1, Ordering::Relaxed);
                Err(HandoffRefusal::AtCapacity)
            }
            Err(Refusal::PerIp) => {
                counters.refused_per_ip.fetch_add(1, Ordering::Relaxed);
                Err(HandoffRefusal::PerIpCap)
            }
            Err(Refusal::Closed) => Err(HandoffRefusal::ShutDown),
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        lock(&self.table).release(self.id);
        self.gauge.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A handed-off connection waiting for the runtime, with the slot it holds. The stream is
/// registered with the runtime's reactor on arrival, which needs the runtime's context.
pub(super) struct Queued {
    pub(super) stream: std::net::TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) slot: ConnSlot,
}

/// Spawns the task serving one connection on the current worker; erases the handler type so
/// [`Fallback`](super::Fallback) is not generic.
pub(super) type Spawner = Arc<dyn Fn(TcpStream, SocketAddr, ConnSlot) + Send + Sync>;

/// The fallback's workers: one thread each, with a current-thread runtime of its own that
/// serves every task of the connections it was given, as nginx's and h2o's workers do. A
/// connection lives on one thread, so its stream tasks, timers and socket wake-ups never cross
/// to another core or wake an idle one to steal work (what tokio's multi-thread scheduler did,
/// per response: docs/benchmarks.md, issue 20). Connections are dealt round-robin through a
/// bounded queue per worker.
pub(super) struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    queues: Vec<mpsc::Sender<Queued>>,
    next: AtomicUsize,
}

impl Workers {
    /// `handles[i]` runs the task that empties `queues[i]`; at least one of each.
    pub(super) fn new(
        handles: Vec<tokio::runtime::Handle>,
        queues: Vec<mpsc::Sender<Queued>>,
    ) -> Workers {
        debug_assert!(!handles.is_empty() && handles.len() == queues.len());
        Workers {
            handles,
            queues,
            next: AtomicUsize::new(0),
        }
    }

    fn next_index(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len()
    }

    /// The runtime of the next worker in turn, for a task not tied to a connection.
    pub(super) fn next_handle(&self) -> &tokio::runtime::Handle {
        &self.handles[self.next_index() % self.handles.len()]
    }

    /// Gives a connection to the next worker in turn, without blocking.
    pub(super) fn queue(&self, queued: Queued) -> Result<(), mpsc::error::TrySendError<Queued>> {
        self.queues[self.next_index()].try_send(queued)
    }
}

/// Resolves once shutdown is signalled (or the signal's sender is gone, which only happens
/// while the runtime is being torn down).
pub(super) async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stopping| *stopping).await;
}

/// What the accept loop needs of the [`Fallback`](super::Fallback).
pub(super) struct AcceptShared {
    pub(super) table: Table,
    pub(super) gauge: Arc<AtomicUsize>,
    pub(super) counters: Arc<Counters>,
    pub(super) refusals: Arc<Semaphore>,
    pub(super) workers: Arc<Workers>,
}

pub(super) async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: AcceptShared,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = wait_shutdown(&mut shutdown) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                match ConnSlot::admit(&shared.table, &shared.gauge, &shared.counters, peer) {
                    Ok(slot) => {
                        // The worker registers it with its own reactor.
                        let queued = stream
                            .into_std()
                            .map(|stream| Queued { stream, peer, slot });
                        match queued.map(|queued| shared.workers.queue(queued)) {
                            Ok(Ok(())) => {}
                            Ok(Err(refused)) => {
                                let q = refused.into_inner();
                                shared
                                    .counters
                                    .handoff_refused
                                    .fetch_add(1, Ordering::Relaxed);
                                debug!(peer = %q.peer, "fallback worker queue full");
                                if let Ok(stream) = adopt(q.stream) {
                                    refuse(&shared, stream);
                                }
                            }
                            Err(err) => debug!(%err, %peer, "cannot detach an accepted connection"),
                        }
                    }
                    Err(reason) => {
                        debug!(%peer, ?reason, "fallback refused a connection");
                        refuse(&shared, stream);
                    }
                }
            }
            Err(err) => {
                // EMFILE, ENOBUFS, ECONNABORTED: none is fatal for the listener.
                debug!(%err, "fallback accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// Answers a refused connection on this worker while fewer than the bound are being answered.
fn refuse(shared: &AcceptShared, stream: TcpStream) {
    if let Ok(permit) = shared.refusals.clone().try_acquire_owned() {
        tokio::spawn(async move {
            answer_refused(stream).await;
            drop(permit);
        });
    }
}

/// Answers a refused connection: 503 for HTTP/1 (after a short peek), nothing for TLS or h2c.
pub(super) async fn answer_refused(mut stream: TcpStream) {
    let sniffed = tokio::time::timeout(REFUSAL_PEEK, sniff(&stream)).await;
    if let Ok(Ok(Some(Sniffed::Http1))) = sniffed {
        let reply = guard::status_response(
            503,
            "Service Unavailable",
            "too many connections; retry later",
        );
        // retry-after goes in before the blank line ending the head.
        let reply = String::from_utf8_lossy(&reply).replacen(
            "connection: close\r\n",
            "connection: close\r\nretry-after: 1\r\n",
            1,
        );
        let sent = tokio::time::timeout(REFUSAL_PEEK, async {
            stream.write_all(reply.as_bytes()).await?;
            stream.shutdown().await?;
            // Read what the client sent, briefly, so closing does not reset the answer away.
            let mut scratch = [0u8; 4096];
            loop {
                let n = tokio::io::AsyncReadExt::read(&mut stream, &mut scratch).await?;
                if n == 0 {
                    return Ok::<_, io::Error>(());
                }
            }
        })
        .await;
        if let Ok(Err(err)) = sent {
            debug!(%err, "503 to a refused connection not delivered");
        }
    }
}

/// Takes handed-off connections and spawns one task per connection.
pub(super) async fn dispatch(
    spawner: Spawner,
    mut shutdown: watch::Receiver<bool>,
    mut queue: mpsc::Receiver<Queued>,
) {
    loop {
        let queued = tokio::select! {
            queued = queue.recv() => queued,
            _ = wait_shutdown(&mut shutdown) => None,
        };
        let Some(Queued { stream, peer, slot }) = queued else {
            return;
        };
        // Adoption fails only if the fd is not a usable socket; the slot returns on drop.
        match adopt(stream) {
            Ok(stream) => spawner(stream, peer, slot),
            Err(err) => debug!(%err, %peer, "cannot adopt handed-off connection"),
        }
    }
}

/// Registers a connection accepted elsewhere (by an engine thread) with the runtime's reactor,
/// non-blocking; needs the runtime's context.
pub(super) fn adopt(stream: std::net::TcpStream) -> io::Result<TcpStream> {
    stream
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(stream))
}
