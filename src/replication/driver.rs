//! The replication thread: runs the per-peer policies against the real
//! clock, reads the outbox, builds peer requests and hands them to the
//! transport; answers come back as [`Event`]s. Anti-entropy's directory
//! walks and summary exchanges run on a second thread so this loop never
//! waits for a disk walk.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::outgoing::{FileBody, OutgoingResponse, TaskError};

/// A request ready to go: head (or whole request), file body, body bytes.
type Built = (Vec<u8>, Option<FileBody>, u64);
/// The outbox entries one request carries: `(start, record, end)` each,
/// consecutive in the outbox. One, or a batch of small writes.
type Parts = Vec<(u64, Record, u64)>;
use crate::store::Store;

use super::policy::{Action, Failure, Membership, PeerPolicy, PeerState, Transition};
use super::summary::{self, Entry, Query};
use super::transport::{self, Transport};
use super::{batch, PeerView, Replication, AUTH_SCHEME};
use crate::delivery::outbox::{Op, Reader, Record};
use crate::delivery::{Next, Rng};

/// Repairs queued for one peer past which a comparison pauses until they
/// drain: a run over any number of entries holds at most about this many
/// (plus one batch) in memory.
pub const REPAIRS_QUEUED_MAX: usize = 4096;
/// Repairs a comparison hands over at once.
const REPAIR_BATCH: usize = 256;
/// A comparison waiting for repairs to drain gives up after this long
/// without progress (the peer stopped taking them); the repairs stay
/// queued, and the comparison runs again after the peer's backoff.
const REPAIR_DRAIN_WAIT: Duration = Duration::from_secs(60);
/// Repairs in flight to one peer.
pub const REPAIR_WINDOW_MAX: usize = 16;
/// Longest wait of the loop without an event.
const TICK: Duration = Duration::from_millis(200);
/// Cursors are written at most this often (a stale one only re-sends).
const PERSIST_EVERY: Duration = Duration::from_millis(200);
/// Pause after the transport refused a request (its queue was full).
const REFUSED_PAUSE: Duration = Duration::from_millis(50);
/// How long a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Anti-entropy waits this long at most for a peer to compute an answer.
const QUERY_WAIT: Duration = Duration::from_secs(30);

/// What the loop hears.
pub enum Event {
    /// The outbox has new entries, or a summary is wanted.
    Kick,
    /// The resolver's current peer set: (name, address).
    Resolved(Vec<(String, SocketAddr)>),
    Probe {
        peer: String,
        outcome: Result<OutgoingResponse, TaskError>,
        retried: bool,
    },
    Sent {
        peer: String,
        /// The peer's generation when the send started.
        generation: u64,
        start: u64,
        bytes: u64,
        /// Writes the request carried.
        writes: u64,
        /// Whether it was a batch (`POST /_peer/v1/batch`).
        batch: bool,
        outcome: Result<OutgoingResponse, TaskError>,
        retried: bool,
    },
    Repaired {
        peer: String,
        /// The peer's generation when the repair started.
        generation: u64,
        /// Which repair (its key in the peer's repairs in flight).
        id: u64,
        bytes: u64,
        outcome: Result<OutgoingResponse, TaskError>,
    },
    /// A comparison found these to send the peer (more may follow).
    Repairs { peer: String, entries: Vec<Entry> },
    AntiEntropyDone {
        peer: String,
        result: Result<AntiEntropyReport, String>,
    },
}

/// One anti-entropy comparison's findings (its repairs went ahead in
/// [`Event::Repairs`]).
pub struct AntiEntropyReport {
    pub buckets_compared: u64,
    pub buckets_differing: u64,
    pub repairs: u64,
    /// Entries the peer lacked that were written at or after the
    /// comparison's cutoff: in the outbox, or for the next comparison.
    pub deferred: u64,
}

enum AeJob {
    Serve,
    Run {
        peer: String,
        addr: SocketAddr,
        /// Repairs of entries written at or after this (ms) are left out:
        /// the outbox still holds every such write of this node for the peer.
        cutoff_ms: u64,
        /// When the cutoff was taken: the peer's listings must come from a
        /// walk begun after it (see `summary::MAX_AGE_HEADER`).
        cutoff_at: Instant,
        /// How far the peer's repairs have drained: the comparison waits
        /// while too many are queued.
        flow: Arc<RepairFlow>,
    },
}

/// Back-pressure between a comparison and the replication thread.
#[derive(Default)]
pub struct RepairFlow {
    /// Repairs handed over, by the comparison (cumulative).
    sent: AtomicU64,
    /// Repairs the replication thread has taken from its events
    /// (cumulative): the difference is still in the channel.
    received: AtomicU64,
    /// Repairs queued and in flight at the replication thread.
    queued: AtomicU64,
}

impl RepairFlow {
    /// Repairs handed over and not yet sent and answered.
    fn backlog(&self) -> u64 {
        let sent = self.sent.load(Ordering::Acquire);
        let received = self.received.load(Ordering::Acquire);
        sent.saturating_sub(received) + self.queued.load(Ordering::Acquire)
    }
}

/// The running replication thread.
pub struct Handle {
    stop: Arc<AtomicBool>,
    /// Shutdown phase 3's budget, ms, set before `stop`.
    finish_ms: Arc<AtomicU64>,
    tx: Sender<Event>,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    /// Shutdown phase 3: nothing new is sent; sends in flight get up to
    /// `finish` to be answered (an answered entry leaves the outbox). Then
    /// the thread writes the cursors and stops; the outbox keeps the rest.
    pub fn shutdown(mut self, finish: Duration) {
        let ms = u64::try_from(finish.as_millis()).unwrap_or(u64::MAX);
        self.finish_ms.store(ms, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Event::Kick);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct PeerRun {
    addr: SocketAddr,
    policy: PeerPolicy,
    last_error: Option<String>,
    repairs: VecDeque<Entry>,
    /// Repairs sent and not answered, by id: a failed one goes back to the
    /// front of `repairs`.
    repairs_in_flight: BTreeMap<u64, Entry>,
    next_repair_id: u64,
    /// What the repairs (queued and in flight) owe the peer, recomputed
    /// when they change.
    repairs_lag: Option<crate::delivery::Lag>,
    /// A comparison has listed what the peer lacks: once the repairs are
    /// published, the outbox may forget what an overflow owed it.
    settle_owed: bool,
    /// Repairs queued and in flight, for the comparison's back-pressure.
    repairs_flow: Arc<RepairFlow>,
    /// The policy's generation this run last acted on (see `lost`).
    seen_generation: u64,
    /// Reads the peer's entries from the outbox, in order, without taking
    /// its lock (which appends hold through their syncs).
    reader: Reader,
    /// An entry read but not sent yet (no tokens, its key busy, the
    /// transport full): the next send takes it first.
    peeked: Option<(u64, Record, u64)>,
    /// Entries in flight or failed and waiting, by outbox offset of the
    /// first one of their request: a retry sends them again without reading
    /// the outbox.
    records: BTreeMap<u64, Parts>,
    /// Whether the peer takes batches (`POST /_peer/v1/batch`); an older
    /// version answers 404, and gets one write per request from then on.
    batching: bool,
    /// Keys of the entries in flight. A key is never in flight twice to one
    /// peer: a PUT and the DELETE after it could otherwise arrive swapped,
    /// and without tombstones the peer would keep the artifact.
    keys_in_flight: HashSet<(String, String)>,
    /// The transport refused a request (engine queue full): wait a little
    /// before the next, rather than spin on the refusal.
    paused_until: Option<Instant>,
}

impl PeerRun {
    /// The next entry from `start`: the one peeked before, else the
    /// reader's (moved to `start` first if it is elsewhere).
    fn next_record(
        &mut self,
        outbox: &crate::delivery::outbox::Outbox,
        start: u64,
    ) -> std::io::Result<Option<(u64, Record, u64)>> {
        if let Some(found) = self.peeked.take() {
            if found.0 == start {
                return Ok(Some(found));
            }
        }
        if self.reader.pos() != start {
            self.reader.seek(start);
        }
        self.reader.next(outbox)
    }

    /// Add to `parts` (one new small write) the small writes queued right
    /// after it, up to a batch's bounds: consecutive in the outbox, each
    /// key once and none in flight. The first entry that does not fit waits
    /// in front of the reader.
    fn gather(&mut self, outbox: &crate::delivery::outbox::Outbox, parts: &mut Parts) {
        let small = batch::fits;
        let Some((_, first, mut end)) = parts.first().cloned() else {
            return;
        };
        if !small(&first) {
            return;
        }
        let mut bytes = first.len;
        let mut keys: HashSet<(String, String)> = HashSet::new();
        keys.insert((first.ns, first.key));
        if self.reader.pos() != end {
            self.reader.seek(end);
        }
        while parts.len() < batch::ENTRIES_MAX && bytes < batch::BODY_BYTES_TARGET {
            let found = match self.peeked.take() {
                Some(p) if p.0 == end => Ok(Some(p)),
                _ => self.reader.next(outbox),
            };
            match found {
                Ok(Some((s, r, e))) => {
                    let key = (r.ns.clone(), r.key.clone());
                    let fits = s == end
                        && small(&r)
                        && bytes + r.len <= batch::BODY_BYTES_TARGET
                        && !self.keys_in_flight.contains(&key)
                        && !keys.contains(&key);
                    if !fits {
                        self.peeked = Some((s, r, e));
                        break;
                    }
                    bytes += r.len;
                    end = e;
                    keys.insert(key);
                    parts.push((s, r, e));
                }
                Ok(None) | Err(_) => {
                    // Read again from here next time (an error is the
                    // reader's to report then).
                    self.reader.seek(end);
                    break;
                }
            }
        }
    }

    /// The policy found the peer down and gave up what was in flight for
    /// lost: no key is in flight any more, and the repairs in flight go back
    /// to the front of the queue (their late answers are ignored).
    fn lost(&mut self) {
        if self.seen_generation == self.policy.generation {
            return;
        }
        self.seen_generation = self.policy.generation;
        self.keys_in_flight.clear();
        for (_, entry) in std::mem::take(&mut self.repairs_in_flight)
            .into_iter()
            .rev()
        {
            self.repairs.push_front(entry);
        }
        self.repairs_lag = None;
    }

    /// Tell a comparison in progress how many repairs wait here.
    fn note_repairs_queued(&self) {
        self.repairs_flow.queued.store(
            (self.repairs.len() + self.repairs_in_flight.len()) as u64,
            Ordering::Release,
        );
    }

    /// The write time of the oldest write the outbox still holds for this
    /// peer (in flight, waiting, or next to read), or now: a comparison need
    /// not repair anything written since, the outbox delivers it.
    fn oldest_pending_write_ms(&self, outbox: &crate::delivery::outbox::Outbox) -> u64 {
        let mut oldest = super::now_ms();
        for (_, r, _) in self.records.values().flatten() {
            oldest = oldest.min(r.write_time_ms);
        }
        let next = match &self.peeked {
            Some((_, r, _)) => Some(r.write_time_ms),
            None => outbox
                .read_at(self.policy.cursor.read_pos())
                .ok()
                .flatten()
                .map(|(r, _)| r.write_time_ms),
        };
        next.map_or(oldest, |t| oldest.min(t))
    }

    /// Nothing before `pos` needs sending any more (an overflow: anti-entropy
    /// covers it; or an unreadable outbox).
    fn jump(&mut self, pos: u64) {
        self.policy.cursor.jump(pos);
        let at = self.policy.cursor.read_pos();
        self.reader.seek(at);
        self.peeked = None;
        self.records.retain(|&s, _| s >= pos);
        self.keys_in_flight = self
            .records
            .values()
            .flatten()
            .map(|(_, r, _)| (r.ns.clone(), r.key.clone()))
            .collect();
    }
}

struct Driver {
    r: Arc<Replication>,
    store: Store,
    transport: Transport,
    tx: Sender<Event>,
    membership: Membership,
    peers: BTreeMap<String, PeerRun>,
    rng: Rng,
    last_persist: Instant,
    in_flight_bytes: u64,
    ae_tx: SyncSender<AeJob>,
    /// Shutdown phase 3: no new request is started.
    closing: bool,
    /// The limiter has no tokens for peer bodies until then.
    throttled_until: Option<Instant>,
    /// Entries (peer, outbox offset or `u64::MAX - n` for repairs) already
    /// counted as throttled, so a request that waits twice counts once.
    throttled: BTreeSet<(String, u64)>,
    turn: usize,
}

/// Start the replication thread (and the anti-entropy thread).
pub fn start(r: Arc<Replication>, store: Store, transport: Transport) -> std::io::Result<Handle> {
    let (tx, rx) = channel();
    *r.wake.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let (ae_tx, ae_rx) = sync_channel::<AeJob>(16);
    {
        let r = Arc::clone(&r);
        let tx = tx.clone();
        let transport = transport.clone();
        let store = store.clone();
        std::thread::Builder::new()
            .name("sluice-anti-entropy".into())
            .spawn(move || {
                crate::background::enter("anti-entropy");
                anti_entropy_loop(&r, &store, &transport, &ae_rx, &tx)
            })?;
    }
    let seed = super::now_ms() ^ u64::from(std::process::id()) << 32;
    let now = Instant::now();
    let mut driver = Driver {
        r: Arc::clone(&r),
        store,
        transport,
        tx: tx.clone(),
        membership: Membership::default(),
        peers: BTreeMap::new(),
        rng: Rng::new(seed),
        last_persist: now,
        in_flight_bytes: 0,
        ae_tx,
        closing: false,
        throttled_until: None,
        throttled: BTreeSet::new(),
        turn: 0,
    };
    tracing::info!(
        node_id = %r.node_id,
        transport = driver.transport.describe(),
        "replication started"
    );
    {
        let settings = r.settings.clone();
        let tx = tx.clone();
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("sluice-peer-dns".into())
            .spawn(move || resolver_loop(&settings, &tx, &stop))?;
    }
    let thread_stop = Arc::clone(&stop);
    let finish_ms = Arc::new(AtomicU64::new(0));
    let thread_finish = Arc::clone(&finish_ms);
    let thread = std::thread::Builder::new()
        .name("sluice-replication".into())
        .spawn(move || driver.run(&rx, &thread_stop, &thread_finish))?;
    Ok(Handle {
        stop,
        finish_ms,
        tx,
        thread: Some(thread),
    })
}

fn label(peer: &str) -> String {
    format!("peer=\"{peer}\"")
}

/// A failure before any byte reached the peer: the connect was refused or
/// unroutable, or a pooled connection turned out closed. The only class
/// retried at once, once, on a fresh connection.
fn is_before_any_byte(err: &TaskError) -> bool {
    match err {
        TaskError::Connect(e) => {
            [libc::ECONNREFUSED, libc::EHOSTUNREACH, libc::ENETUNREACH].contains(e)
        }
        TaskError::StaleConnection(_) => true,
        _ => false,
    }
}

impl Driver {
    fn run(&mut self, rx: &Receiver<Event>, stop: &AtomicBool, finish_ms: &AtomicU64) {
        while !stop.load(Ordering::SeqCst) {
            // Cleared before the outbox is read, so an append after this
            // point kicks again: none waits for the tick.
            self.r.take_kick();
            let now = Instant::now();
            let mut wake_at = now + TICK;
            if now.duration_since(self.last_persist) >= PERSIST_EVERY {
                self.last_persist = now;
                self.sync_marks();
                if let Err(err) = self.r.outbox.persist() {
                    tracing::warn!(error = %err, "outbox: cannot write cursors");
                }
            }
            let mut names: Vec<String> = self.peers.keys().cloned().collect();
            // Each turn starts with the next peer, so when the limiter has
            // few tokens no peer always comes first and takes them all.
            if !names.is_empty() {
                self.turn = self.turn.wrapping_add(1);
                let first = self.turn % names.len();
                names.rotate_left(first);
            }
            for name in names {
                if let Some(t) = self.step_peer(&name, now) {
                    wake_at = wake_at.min(t);
                }
            }
            if self.r.summaries.has_pending() {
                let _ = self.ae_tx.try_send(AeJob::Serve);
            }
            self.publish_views(now);
            let wait = wake_at.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait.max(Duration::from_millis(1))) {
                Ok(event) => {
                    self.on_event(event);
                    while let Ok(event) = rx.try_recv() {
                        self.on_event(event);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.finish(rx, Duration::from_millis(finish_ms.load(Ordering::SeqCst)));
        self.sync_marks();
        let _ = self.r.outbox.persist();
    }

    /// Requests in flight (outbox sends and repairs) over all peers.
    fn sends_in_flight(&self) -> usize {
        self.peers
            .values()
            .map(|run| run.policy.cursor.in_flight() + run.repairs_in_flight.len())
            .sum()
    }

    /// Shutdown phase 3: start nothing new, take the answers of what is in
    /// flight until none is left or `budget` has passed.
    fn finish(&mut self, rx: &Receiver<Event>, budget: Duration) {
        self.closing = true;
        let deadline = Instant::now() + budget;
        let in_flight = self.sends_in_flight();
        if in_flight > 0 {
            tracing::info!(
                in_flight,
                budget_ms = budget.as_millis() as u64,
                "replication: waiting for the sends in flight"
            );
        }
        while self.sends_in_flight() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::info!(
                    in_flight = self.sends_in_flight(),
                    "replication: shutdown_replication_ms spent; the outbox keeps the rest"
                );
                break;
            }
            match rx.recv_timeout(left) {
                Ok(event) => self.on_event(event),
                Err(_) => break,
            }
        }
    }

    /// The resolver thread's latest peer set. Only a real change of the set
    /// reconciles.
    fn on_resolved(&mut self, now: Instant, resolved: &[(String, SocketAddr)]) {
        let names: Vec<String> = resolved.iter().map(|(n, _)| n.clone()).collect();
        // An address can change under the same name (a static host name).
        for (name, addr) in resolved {
            if let Some(run) = self.peers.get_mut(name) {
                run.addr = *addr;
            }
        }
        let transitions = self.membership.set_peers(&names);
        if transitions.is_empty() {
            return;
        }
        let known: Vec<bool> = names
            .iter()
            .map(|n| self.r.outbox.mark(n).is_some())
            .collect();
        self.r.outbox.set_peers(&names);
        for t in &transitions {
            match t {
                Transition::Joined(peer) => {
                    let addr = resolved
                        .iter()
                        .find(|(n, _)| n == peer)
                        .map(|(_, a)| *a)
                        .unwrap_or(self.r.settings.listen);
                    let acked = self.r.outbox.mark(peer).map_or(0, |m| m.acked);
                    let mut policy = PeerPolicy::new(
                        now,
                        acked,
                        self.r.settings.probe_interval,
                        self.r.settings.anti_entropy_interval,
                    );
                    if self.r.outbox.mark(peer).is_some_and(|m| m.overflow) {
                        policy.anti_entropy_due = true;
                    }
                    // A peer the outbox never kept a cursor for (a new node
                    // behind the DNS name) missed everything written before:
                    // compare summaries once it is up.
                    let was_known = names
                        .iter()
                        .position(|n| n == peer)
                        .and_then(|i| known.get(i).copied())
                        .unwrap_or(false);
                    if !was_known {
                        policy.anti_entropy_due = true;
                    }
                    self.peers.insert(
                        peer.clone(),
                        PeerRun {
                            addr,
                            policy,
                            last_error: None,
                            repairs: VecDeque::new(),
                            repairs_in_flight: BTreeMap::new(),
                            next_repair_id: 0,
                            repairs_lag: None,
                            settle_owed: false,
                            repairs_flow: Arc::new(RepairFlow::default()),
                            seen_generation: 0,
                            reader: Reader::new(&self.r.outbox, acked),
                            peeked: None,
                            records: BTreeMap::new(),
                            batching: true,
                            keys_in_flight: HashSet::new(),
                            paused_until: None,
                        },
                    );
                    tracing::info!(%peer, %addr, "peer joined the set");
                }
                Transition::Left(peer) => {
                    self.peers.remove(peer);
                    tracing::info!(%peer, "peer left the set");
                }
                Transition::Changed { .. } => {}
            }
        }
        self.count_reconciles();
    }

    fn count_reconciles(&self) {
        self.r.series.set(
            "sluice_membership_reconciles_total",
            String::new(),
            self.membership.reconciles_total,
        );
    }

    fn observe(&mut self, peer: &str, state: PeerState) {
        if let Some(run) = self.peers.get_mut(peer) {
            run.lost();
        }
        if let Some(Transition::Changed { from, to, .. }) = self.membership.observe(peer, state) {
            if to == PeerState::Full {
                tracing::warn!(
                    %peer,
                    from = from.as_str(),
                    to = to.as_str(),
                    "peer state changed: the peer has no room (507); its writes wait with its \
                     backoff, one at a time, until it takes one"
                );
            } else {
                tracing::info!(%peer, from = from.as_str(), to = to.as_str(), "peer state changed");
            }
            self.r.series.add(
                "sluice_peer_transitions_total",
                format!("peer=\"{peer}\",to=\"{}\"", to.as_str()),
                1,
            );
            // A full peer answers: it is up, only without room.
            self.r.series.set(
                "sluice_peer_up",
                label(peer),
                u64::from(matches!(to, PeerState::Up | PeerState::Full)),
            );
            self.count_reconciles();
        }
    }

    /// Run `peer`'s policy until it waits; returns when to look again.
    fn step_peer(&mut self, name: &str, now: Instant) -> Option<Instant> {
        // The reader finds the end: until it says there is nothing more,
        // the policy may ask for the next entry.
        let end = u64::MAX;
        if let Some(until) = self.peers.get(name).and_then(|r| r.paused_until) {
            if now < until {
                return Some(until);
            }
        }
        for _ in 0..64 {
            let run = self.peers.get_mut(name)?;
            match run.policy.next(now, end) {
                Action::Probe => self.probe(name, false),
                Action::Send(next) => {
                    if !self.send_next(name, next) {
                        break;
                    }
                }
                Action::AntiEntropy => {
                    let addr = run.addr;
                    match self.r.outbox.clear_overflow(name) {
                        Ok(Some(pos)) => run.jump(pos),
                        Ok(None) => {}
                        Err(err) => {
                            tracing::warn!(error = %err, "outbox: cannot clear an overflow")
                        }
                    }
                    let cutoff_ms = run.oldest_pending_write_ms(&self.r.outbox);
                    let flow = Arc::clone(&run.repairs_flow);
                    if self
                        .ae_tx
                        .try_send(AeJob::Run {
                            peer: name.to_string(),
                            addr,
                            cutoff_ms,
                            cutoff_at: now,
                            flow,
                        })
                        .is_err()
                    {
                        run.policy.on_anti_entropy(now, false, &mut self.rng);
                    }
                }
                Action::WaitUntil(t) => {
                    self.send_repairs(name);
                    return Some(t);
                }
                Action::Idle => break,
            }
        }
        self.send_repairs(name);
        self.throttled_until.filter(|&t| t > now)
    }

    /// Whether `bytes` of peer body may go now (the limiter); if not, the
    /// caller stops sending until [`Driver::throttled_until`].
    fn tokens_for(&mut self, peer: &str, id: u64, bytes: u64) -> bool {
        let now = Instant::now();
        if self.throttled_until.is_some_and(|t| now < t) {
            self.count_throttled(peer, id, bytes);
            return false;
        }
        match self.r.limiter.acquire(now, bytes) {
            Ok(()) => {
                self.throttled_until = None;
                self.throttled.remove(&(peer.to_string(), id));
                // Entries of peers gone since, or retried another way, are
                // never granted under their id: forget them now and then
                // (the worst is one request counted twice).
                if self.throttled.len() > 1024 {
                    self.throttled.clear();
                }
                true
            }
            Err(until) => {
                self.throttled_until = Some(until);
                self.count_throttled(peer, id, bytes);
                false
            }
        }
    }

    fn count_throttled(&mut self, peer: &str, id: u64, bytes: u64) {
        // Bounded: one entry per request a peer would send next (its window).
        if self.throttled.len() < 4096 && self.throttled.insert((peer.to_string(), id)) {
            self.r.series.add(
                "sluice_replication_throttled_bytes_total",
                String::new(),
                bytes,
            );
        }
    }

    /// Tell the outbox how far each peer has taken (its gauges, its
    /// segment collection and the cursors file follow), and pick up an
    /// overflow it marked since. Every `PERSIST_EVERY`, not per entry: the
    /// outbox's lock is held through append syncs.
    fn sync_marks(&mut self) {
        for (name, run) in self.peers.iter_mut() {
            self.r.outbox.set_acked(name, run.policy.cursor.acked());
            if let Some(mark) = self.r.outbox.mark(name) {
                if mark.overflow {
                    run.jump(mark.acked);
                    run.policy.anti_entropy_due = true;
                }
            }
        }
    }

    fn auth_header(&self) -> String {
        format!(
            "Authorization: {AUTH_SCHEME} {}\r\n",
            self.r.peer_secret_text()
        )
    }

    fn count_attempt(&self, peer: &str, retried: bool) {
        self.r
            .series
            .add("sluice_replication_connect_attempts_total", label(peer), 1);
        if retried {
            self.r
                .series
                .add("sluice_replication_connect_retries_total", label(peer), 1);
        }
    }

    fn probe(&mut self, name: &str, retried: bool) {
        if self.closing {
            return;
        }
        let Some(run) = self.peers.get(name) else {
            return;
        };
        let addr = run.addr;
        let req = format!(
            "GET /_peer/v1/hello HTTP/1.1\r\nHost: {addr}\r\n{}\r\n",
            self.auth_header()
        );
        self.r
            .series
            .add("sluice_peer_probes_total", label(name), 1);
        self.count_attempt(name, retried);
        let tx = self.tx.clone();
        let peer = name.to_string();
        self.transport.submit(transport::request(
            addr,
            req.into_bytes(),
            None,
            PROBE_TIMEOUT,
            Box::new(move |outcome| {
                let _ = tx.send(Event::Probe {
                    peer,
                    outcome,
                    retried,
                });
            }),
        ));
    }

    /// Build the request for `record`: `None` when nothing needs sending
    /// (the artifact is gone since), `Err` to wait (memory bound).
    fn build(&self, addr: SocketAddr, record: &Record) -> Result<Option<Built>, ()> {
        match record.op {
            Op::Delete => Ok(Some(self.build_delete(
                addr,
                &record.ns,
                &record.key,
                record.write_time_ms,
            ))),
            Op::Put => self.build_put(addr, &record.ns, &record.key),
        }
    }

    fn build_delete(&self, addr: SocketAddr, ns: &str, key: &str, time_ms: u64) -> Built {
        (
            format!(
                "DELETE /_peer/v1/delete/{ns}/{key}/{time_ms} HTTP/1.1\r\nHost: {addr}\r\n{}\r\n",
                self.auth_header()
            )
            .into_bytes(),
            None,
            0,
        )
    }

    fn build_put(&self, addr: SocketAddr, ns: &str, key: &str) -> Result<Option<Built>, ()> {
        let artifact = match self.store.get(ns, key) {
            Ok(Some(a)) => a,
            Ok(None) => return Ok(None),
            Err(err) => {
                tracing::warn!(ns, key, error = %err, "replication: cannot open an artifact to send");
                return Ok(None);
            }
        };
        let write_time_ms = artifact.write_time_ms().unwrap_or(0);
        // The response headers the artifact keeps travel with it.
        let meta = artifact.meta.as_ref().map_or(String::new(), |meta| {
            format!(
                "{}: {}\r\n",
                crate::store::format::META_HEADER,
                meta.to_header_value()
            )
        });
        let head = format!(
            "PUT /_peer/v1/put/{ns}/{key}/{write_time_ms}/{} HTTP/1.1\r\nHost: {addr}\r\n{}{meta}Content-Length: {}\r\n\r\n",
            hex::encode(artifact.sha256),
            self.auth_header(),
            artifact.len
        );
        // The body goes from the file (the version opened here, whatever
        // replaces it meanwhile): spliced by the ring, never read into
        // this thread's memory.
        let body = FileBody {
            file: Arc::clone(&artifact.file),
            offset: artifact.body_offset,
            len: artifact.len,
        };
        Ok(Some((head.into_bytes(), Some(body), artifact.len)))
    }

    /// One `POST /_peer/v1/batch` for `parts` (small writes), the bodies
    /// read into the request, and how many it carries: `None` when none of
    /// the artifacts is left. An artifact gone since, or replaced by one too
    /// large for a batch, is left out: the version that replaced it has its
    /// own outbox entry.
    fn build_batch(&self, addr: SocketAddr, parts: &Parts) -> Result<Option<(Built, u64)>, ()> {
        use std::os::unix::fs::FileExt as _;
        let mut body = Vec::new();
        let mut bytes = 0u64;
        let mut data = Vec::new();
        let mut carried = 0u64;
        for (_, record, _) in parts {
            let (ns, key) = (record.ns.as_str(), record.key.as_str());
            let artifact = match self.store.get(ns, key) {
                Ok(Some(a)) if a.len <= batch::ENTRY_BYTES_MAX => a,
                Ok(_) => continue,
                Err(err) => {
                    tracing::warn!(ns, key, error = %err, "replication: cannot open an artifact to send");
                    continue;
                }
            };
            data.resize(artifact.len as usize, 0);
            if let Err(err) = artifact.file.read_exact_at(&mut data, artifact.body_offset) {
                tracing::warn!(ns, key, error = %err, "replication: cannot read an artifact to send");
                continue;
            }
            let meta = artifact.meta.as_ref().map(|m| m.to_header_value());
            batch::encode_entry(
                &mut body,
                ns,
                key,
                artifact.write_time_ms().unwrap_or(0),
                &artifact.sha256,
                meta.as_deref(),
                &data,
            );
            bytes += artifact.len;
            carried += 1;
        }
        if body.is_empty() {
            return Ok(None);
        }
        let mut request = format!(
            "POST /_peer/v1/batch HTTP/1.1\r\nHost: {addr}\r\n{}Content-Length: {}\r\n\r\n",
            self.auth_header(),
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        Ok(Some(((request, None, bytes), carried)))
    }

    /// Send the entry `next` to `name` (with the small writes queued after
    /// it, as one batch); false when the loop should stop for now (memory
    /// bound, unreadable outbox).
    fn send_next(&mut self, name: &str, next: Next) -> bool {
        let Some(run) = self.peers.get_mut(name) else {
            return false;
        };
        let parts: Parts = match next {
            Next::Again { start, end } => match run.records.get(&start) {
                Some(parts) if parts.len() > 1 && !run.batching => {
                    // The peer does not take batches: the batch's entries
                    // wait to go again one by one.
                    let parts = run.records.remove(&start).unwrap_or_default();
                    run.policy
                        .cursor
                        .split_retry(start, parts.iter().map(|(s, r, e)| (*s, *e, r.owed())));
                    for part in parts {
                        run.records.insert(part.0, vec![part]);
                    }
                    return true;
                }
                Some(parts) => parts.clone(),
                None => {
                    // Not kept (cannot happen: every entry sent is kept
                    // until answered); read it again.
                    match self.r.outbox.read_at(start) {
                        Ok(Some((record, end))) => vec![(start, record, end)],
                        _ => {
                            run.policy.cursor.skip(start, end);
                            run.policy.anti_entropy_due = true;
                            return true;
                        }
                    }
                }
            },
            Next::New { start } => match run.next_record(&self.r.outbox, start) {
                Ok(Some(found)) => vec![found],
                Ok(None) => return false,
                Err(err) => {
                    tracing::error!(peer = name, error = %err, "outbox unreadable; anti-entropy will repair");
                    let end = self.r.outbox.end();
                    run.jump(end);
                    run.policy.anti_entropy_due = true;
                    return false;
                }
            },
        };
        let (start, first, end) = &parts[0];
        let start = *start;
        let key = (first.ns.clone(), first.key.clone());
        if !run.records.contains_key(&start) && run.keys_in_flight.contains(&key) {
            // After the earlier entry for this key is answered.
            run.peeked = parts.into_iter().next();
            return false;
        }
        let first_end = *end;
        let mut parts = parts;
        if matches!(next, Next::New { .. }) && run.batching && batch::fits(&parts[0].1) {
            let batched: u64 = run
                .records
                .values()
                .filter(|p| p.len() > 1)
                .flatten()
                .map(|(_, r, _)| r.len)
                .sum();
            if batched + batch::BODY_BYTES_TARGET > batch::IN_FLIGHT_BYTES_MAX {
                // A small write waits for a batch's answer rather than going
                // alone: one request per write is what batches replace.
                run.peeked = parts.into_iter().next();
                return false;
            }
            run.gather(&self.r.outbox, &mut parts);
        }
        if self.send_record(name, &parts, false) {
            return true;
        }
        // Not sent (no tokens, closing, nothing to build): a new entry
        // waits in front of the reader (what was read after it is read
        // again); a retry stays in the cursor's list.
        if let Some(run) = self.peers.get_mut(name) {
            if matches!(next, Next::New { .. }) && run.policy.cursor.read_pos() == start {
                run.reader.seek(first_end);
                run.peeked = parts.into_iter().next();
            }
        }
        false
    }

    fn send_record(&mut self, name: &str, parts: &Parts, retried: bool) -> bool {
        if self.closing {
            return false;
        }
        let (Some((start, first, _)), Some((_, _, end))) = (parts.first(), parts.last()) else {
            return true;
        };
        let (start, end) = (*start, *end);
        let Some(addr) = self.peers.get(name).map(|r| r.addr) else {
            return false;
        };
        if first.op == Op::Put && self.throttled_until.is_some_and(|t| Instant::now() < t) {
            return false; // no tokens: do not even open the artifact yet
        }
        let built = if parts.len() == 1 {
            self.build(addr, first).map(|b| b.map(|b| (b, 1)))
        } else {
            self.build_batch(addr, parts)
        };
        let ((bytes, file_body, body), writes) = match built {
            Ok(Some(built)) => built,
            Ok(None) => {
                if let Some(run) = self.peers.get_mut(name) {
                    run.policy.cursor.skip(start, end);
                    if run.records.remove(&start).is_some() {
                        for (_, r, _) in parts {
                            run.keys_in_flight.remove(&(r.ns.clone(), r.key.clone()));
                        }
                    }
                }
                return true;
            }
            Err(()) => return false,
        };
        // A retry at once after a failure before any byte went already had
        // its tokens.
        if !retried && !self.tokens_for(name, start, body) {
            return false;
        }
        if let Some(run) = self.peers.get_mut(name) {
            if !retried {
                let mut owed = crate::delivery::Lag::default();
                for (_, r, _) in parts {
                    owed.add(r.owed());
                }
                run.policy.cursor.on_sent(start, end, owed);
            }
            for (_, r, _) in parts {
                run.keys_in_flight.insert((r.ns.clone(), r.key.clone()));
            }
            run.records.insert(start, parts.clone());
        }
        self.in_flight_bytes += body;
        self.count_attempt(name, retried);
        if parts.len() > 1 {
            self.r
                .series
                .add("sluice_replication_sent_batches_total", label(name), 1);
        }
        let batch = parts.len() > 1;
        let tx = self.tx.clone();
        let peer = name.to_string();
        let timeout = self.r.settings.request_timeout;
        let generation = self.peers.get(name).map_or(0, |run| run.policy.generation);
        self.transport.submit(transport::request(
            addr,
            bytes,
            file_body,
            timeout,
            Box::new(move |outcome| {
                let _ = tx.send(Event::Sent {
                    peer,
                    generation,
                    start,
                    bytes: body,
                    writes,
                    batch,
                    outcome,
                    retried,
                });
            }),
        ));
        true
    }

    fn send_repairs(&mut self, name: &str) {
        if self.closing {
            return;
        }
        loop {
            let Some(run) = self.peers.get_mut(name) else {
                return;
            };
            let in_flight = run.policy.cursor.in_flight() + run.repairs_in_flight.len();
            if !run.policy.may_send_more(Instant::now(), in_flight)
                || run.repairs_in_flight.len() >= REPAIR_WINDOW_MAX
            {
                return;
            }
            if self.throttled_until.is_some_and(|t| Instant::now() < t) {
                return;
            }
            let Some(entry) = run.repairs.pop_front() else {
                return;
            };
            run.repairs_lag = None;
            let addr = run.addr;
            run.next_repair_id += 1;
            let repair = run.next_repair_id;
            // The limiter's key for it: outbox offsets never come near.
            let id = u64::MAX - repair;
            let built = if entry.deleted {
                Ok(Some(self.build_delete(
                    addr,
                    &entry.ns,
                    &entry.key,
                    entry.write_time_ms,
                )))
            } else {
                self.build_put(addr, &entry.ns, &entry.key)
            };
            let built = match built {
                Ok(Some(built)) => built,
                Ok(None) => continue,
                Err(()) => {
                    if let Some(run) = self.peers.get_mut(name) {
                        run.repairs.push_front(entry);
                    }
                    return;
                }
            };
            if !self.tokens_for(name, id, built.2) {
                if let Some(run) = self.peers.get_mut(name) {
                    run.repairs.push_front(entry);
                }
                return;
            }
            let generation = match self.peers.get_mut(name) {
                Some(run) => {
                    run.repairs_in_flight.insert(repair, entry);
                    run.policy.generation
                }
                None => 0,
            };
            self.in_flight_bytes += built.2;
            self.count_attempt(name, false);
            let tx = self.tx.clone();
            let peer = name.to_string();
            let body = built.2;
            self.transport.submit(transport::request(
                addr,
                built.0,
                built.1,
                self.r.settings.request_timeout,
                Box::new(move |outcome| {
                    let _ = tx.send(Event::Repaired {
                        peer,
                        generation,
                        id: repair,
                        bytes: body,
                        outcome,
                    });
                }),
            ));
        }
    }

    fn on_event(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Kick => {}
            Event::Resolved(resolved) => self.on_resolved(now, &resolved),
            Event::Probe {
                peer,
                outcome,
                retried,
            } => self.on_probe(now, peer, outcome, retried),
            Event::Sent {
                peer,
                generation,
                start,
                bytes,
                writes,
                batch,
                outcome,
                retried,
            } => {
                let stale = self
                    .peers
                    .get(&peer)
                    .is_some_and(|run| !run.policy.is_current(generation));
                if stale {
                    self.on_stale_sent(peer, start, (bytes, writes), outcome);
                } else {
                    self.on_sent(now, peer, start, (bytes, writes, batch), outcome, retried);
                }
            }
            Event::Repaired {
                peer,
                generation,
                id,
                bytes,
                outcome,
            } => {
                let stale = self
                    .peers
                    .get(&peer)
                    .is_some_and(|run| !run.policy.is_current(generation));
                if stale {
                    // Sent again already (or about to be): only counted.
                    self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
                    let _ = self.classify(&peer, &outcome, bytes, 1);
                } else {
                    self.on_repaired(now, peer, id, bytes, outcome);
                }
            }
            Event::Repairs { peer, entries } => {
                if let Some(run) = self.peers.get_mut(&peer) {
                    let n = entries.len() as u64;
                    run.repairs.extend(entries);
                    run.repairs_lag = None;
                    run.note_repairs_queued();
                    run.repairs_flow.received.fetch_add(n, Ordering::AcqRel);
                }
            }
            Event::AntiEntropyDone { peer, result } => self.on_anti_entropy_done(now, peer, result),
        }
    }

    fn on_probe(
        &mut self,
        now: Instant,
        peer: String,
        outcome: Result<OutgoingResponse, TaskError>,
        retried: bool,
    ) {
        if let Err(err) = &outcome {
            if !retried && is_before_any_byte(err) {
                self.probe(&peer, true);
                return;
            }
        }
        let node_id = self.r.node_id.clone();
        let Some(run) = self.peers.get_mut(&peer) else {
            return;
        };
        let result = match &outcome {
            Ok(resp) if resp.status == 200 => {
                let myself = serde_json::from_slice::<serde_json::Value>(&resp.body)
                    .ok()
                    .and_then(|v| {
                        v.get("node_id")
                            .and_then(|n| n.as_str())
                            .map(str::to_string)
                    })
                    .is_some_and(|id| id == node_id);
                Some(!myself)
            }
            Ok(resp) => {
                run.last_error = Some(format!("probe answered {}", resp.status));
                None
            }
            Err(err) => {
                run.last_error = Some(format!("probe: {err}"));
                None
            }
        };
        let state = run.policy.on_probe(now, result, &mut self.rng);
        if result == Some(false) {
            tracing::info!(%peer, "this peer entry is this node; ignored");
        }
        self.observe(&peer, state);
    }

    fn on_sent(
        &mut self,
        now: Instant,
        peer: String,
        start: u64,
        (bytes, writes, batch): (u64, u64, bool),
        outcome: Result<OutgoingResponse, TaskError>,
        retried: bool,
    ) {
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
        if let Err(err) = &outcome {
            if !retried && is_before_any_byte(err) {
                // Nothing reached the peer: once more, at once, on a
                // fresh connection. Nothing else is retried here.
                let kept = self
                    .peers
                    .get(&peer)
                    .and_then(|run| run.records.get(&start).cloned());
                if let Some(parts) = kept {
                    if self.send_record(&peer, &parts, true) {
                        return;
                    }
                }
            }
        }
        let refused_batch = |r: &OutgoingResponse| {
            (400..500).contains(&r.status) && ![401, 408, 429].contains(&r.status)
        };
        if batch && outcome.as_ref().is_ok_and(refused_batch) {
            // An older version without the batch route (404), or a batch it
            // cannot read: a write it would refuse for good is answered
            // inside a 200, so this refuses the batch, not its writes. They
            // go again one by one (`send_next` splits them), never dropped.
            if let Some(run) = self.peers.get_mut(&peer) {
                if run.batching {
                    let status = outcome.as_ref().map_or(0, |r| r.status);
                    tracing::warn!(%peer, status, "peer refused a batch; sending one write per request from now on");
                }
                run.batching = false;
                for (_, r, _) in run.records.get(&start).into_iter().flatten() {
                    run.keys_in_flight.remove(&(r.ns.clone(), r.key.clone()));
                }
                run.policy.cursor.on_fail(start);
            }
            return;
        }
        let verdict = self.classify(&peer, &outcome, bytes, writes);
        let Some(run) = self.peers.get_mut(&peer) else {
            return;
        };
        for (_, r, _) in run.records.get(&start).into_iter().flatten() {
            run.keys_in_flight.remove(&(r.ns.clone(), r.key.clone()));
        }
        if matches!(verdict, Verdict::Done) {
            run.records.remove(&start);
        }
        let state = match verdict {
            Verdict::Refused => {
                run.policy.cursor.on_fail(start);
                run.paused_until = Some(now + REFUSED_PAUSE);
                return;
            }
            Verdict::Done => run.policy.on_send(now, start, Ok(()), &mut self.rng),
            Verdict::Failed { how, why } => {
                run.last_error = Some(why);
                run.policy.on_send(now, start, Err(how), &mut self.rng)
            }
        };
        self.observe(&peer, state);
    }

    /// The answer to a send given up for lost when its peer was found down.
    /// A success still means the peer holds the entry (unless it is being
    /// sent again right now: that send's answer decides); a failure changes
    /// nothing (the entry waits for its retry).
    fn on_stale_sent(
        &mut self,
        peer: String,
        start: u64,
        (bytes, writes): (u64, u64),
        outcome: Result<OutgoingResponse, TaskError>,
    ) {
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
        let verdict = self.classify(&peer, &outcome, bytes, writes);
        let Some(run) = self.peers.get_mut(&peer) else {
            return;
        };
        if matches!(verdict, Verdict::Done) && !run.policy.cursor.is_in_flight(start) {
            run.policy.cursor.on_ack(start);
            run.records.remove(&start);
        }
    }

    fn on_repaired(
        &mut self,
        now: Instant,
        peer: String,
        id: u64,
        bytes: u64,
        outcome: Result<OutgoingResponse, TaskError>,
    ) {
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
        let verdict = self.classify(&peer, &outcome, bytes, 1);
        let Some(run) = self.peers.get_mut(&peer) else {
            return;
        };
        let entry = run.repairs_in_flight.remove(&id);
        run.repairs_lag = None;
        match verdict {
            Verdict::Done => {
                self.r
                    .series
                    .add("sluice_anti_entropy_repaired_total", String::new(), 1);
                // A repair taken is a write taken: a full peer has room again.
                let state = run.policy.on_send(now, u64::MAX, Ok(()), &mut self.rng);
                self.observe(&peer, state);
            }
            Verdict::Refused | Verdict::Failed { .. } => {
                // Sent again first, after the peer's backoff: a repair is
                // owed like an outbox entry, not left to the next
                // comparison (which may be `anti_entropy_interval_ms` away).
                if let Some(entry) = entry {
                    run.repairs.push_front(entry);
                }
                match verdict {
                    Verdict::Failed { how, why } => {
                        run.last_error = Some(why);
                        let state = run.policy.on_send(now, u64::MAX, Err(how), &mut self.rng);
                        self.observe(&peer, state);
                    }
                    _ => run.paused_until = Some(now + REFUSED_PAUSE),
                }
            }
        }
    }

    fn on_anti_entropy_done(
        &mut self,
        now: Instant,
        peer: String,
        result: Result<AntiEntropyReport, String>,
    ) {
        let Some(run) = self.peers.get_mut(&peer) else {
            return;
        };
        match result {
            Ok(report) => {
                tracing::info!(
                    %peer,
                    differing = report.buckets_differing,
                    repairs = report.repairs,
                    deferred = report.deferred,
                    "anti-entropy compared summaries"
                );
                run.policy.on_anti_entropy(now, true, &mut self.rng);
                // Every bucket compared: the repairs are what the peer
                // lacks, an overflow's count included.
                run.settle_owed = true;
                self.r.series.add(
                    "sluice_anti_entropy_runs_total",
                    format!("peer=\"{peer}\",result=\"ok\""),
                    1,
                );
                self.r.series.add(
                    "sluice_anti_entropy_buckets_compared_total",
                    String::new(),
                    report.buckets_compared,
                );
                self.r.series.add(
                    "sluice_anti_entropy_buckets_differing_total",
                    String::new(),
                    report.buckets_differing,
                );
            }
            Err(why) => {
                tracing::warn!(%peer, error = %why, "anti-entropy failed; will retry");
                run.last_error = Some(format!("anti-entropy: {why}"));
                run.policy.on_anti_entropy(now, false, &mut self.rng);
                self.r.series.add(
                    "sluice_anti_entropy_runs_total",
                    format!("peer=\"{peer}\",result=\"failed\""),
                    1,
                );
            }
        }
    }

    /// What an answer means for the `writes` entries its request carried
    /// (each counts in `sluice_replication_sent_requests_total`).
    fn classify(
        &self,
        peer: &str,
        outcome: &Result<OutgoingResponse, TaskError>,
        bytes: u64,
        writes: u64,
    ) -> Verdict {
        let count = |result: &str| {
            self.r.series.add(
                "sluice_replication_sent_requests_total",
                format!("peer=\"{peer}\",result=\"{result}\""),
                writes,
            );
        };
        if outcome.as_ref().is_ok_and(|r| r.reused_connection) {
            self.r.series.add(
                "sluice_replication_connections_reused_total",
                label(peer),
                1,
            );
        }
        match outcome {
            Ok(resp) if (200..300).contains(&resp.status) => {
                count("ok");
                self.r
                    .series
                    .add("sluice_replication_sent_bytes_total", label(peer), bytes);
                Verdict::Done
            }
            Ok(resp)
                if (400..500).contains(&resp.status) && ![401, 408, 429].contains(&resp.status) =>
            {
                // The peer says it will never take this entry (bad name,
                // digest mismatch, too large): retrying cannot help.
                count("rejected");
                tracing::warn!(
                    %peer,
                    status = resp.status,
                    body = %String::from_utf8_lossy(&resp.body[..resp.body.len().min(200)]),
                    "peer refused a replicated write for good; dropped from its outbox"
                );
                Verdict::Done
            }
            Ok(resp) if resp.status == 507 => {
                // No room on the peer: a state, not bad input. Kept, and
                // sent again after the peer's backoff.
                count("full");
                Verdict::Failed {
                    how: Failure::Full,
                    why: format!("full: answered 507 ({bytes} bytes)"),
                }
            }
            Ok(resp) => {
                count("failed");
                Verdict::Failed {
                    how: Failure::Unwell,
                    why: format!("answered {}", resp.status),
                }
            }
            Err(TaskError::Refused) => Verdict::Refused,
            Err(err) => {
                count("failed");
                let down = matches!(
                    err,
                    TaskError::Connect(_) | TaskError::Io(_) | TaskError::TimedOut
                );
                Verdict::Failed {
                    how: if down { Failure::Down } else { Failure::Unwell },
                    why: err.to_string(),
                }
            }
        }
    }

    /// Publish each peer's state for `/status`, `/metrics` and the
    /// read-through. What a peer lacks is published in one piece (the
    /// cursor's position and what it has in flight or waiting, the repairs),
    /// so a reader never sees an entry in neither place; the outbox part
    /// from the cursor's position on is read live by the gauges.
    fn publish_views(&mut self, now: Instant) {
        let mut settle = Vec::new();
        let views = self
            .peers
            .iter_mut()
            .map(|(name, run)| {
                let repairs = *run.repairs_lag.get_or_insert_with(|| {
                    let mut lag = crate::delivery::Lag::default();
                    for e in run.repairs.iter().chain(run.repairs_in_flight.values()) {
                        lag.add(crate::delivery::Lag::one(e.len, e.write_time_ms));
                    }
                    lag
                });
                if std::mem::take(&mut run.settle_owed) {
                    settle.push(name.clone());
                }
                run.note_repairs_queued();
                PeerView {
                    peer: name.clone(),
                    state: run.policy.state.as_str(),
                    backoff_ms: u64::try_from(run.policy.backoff.remaining(now).as_millis())
                        .unwrap_or(u64::MAX),
                    failures: run.policy.backoff.failures(),
                    last_error: run.last_error.clone(),
                    in_flight: run.policy.cursor.in_flight() + run.repairs_in_flight.len(),
                    acked: run.policy.cursor.acked(),
                    read_pos: run.policy.cursor.read_pos(),
                    pending: run.policy.cursor.pending(),
                    repairs,
                    repairs_queued: run.repairs.len(),
                }
            })
            .collect();
        *self.r.views.lock().unwrap_or_else(PoisonError::into_inner) = views;
        // Only now that the repairs are visible may the overflow's count go.
        for name in settle {
            self.r.outbox.settle_owed(&name);
        }
        let addrs = self
            .peers
            .iter()
            .map(|(name, run)| (name.clone(), run.addr, run.policy.state))
            .collect();
        *self
            .r
            .peer_addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = addrs;
    }
}

enum Verdict {
    Done,
    Refused,
    Failed { how: Failure, why: String },
}

/// Resolve the peer set every `peer_refresh` on a thread of its own, so a
/// slow DNS server never stalls replication. A name that fails to resolve
/// keeps its last address (a DNS hiccup is not a peer leaving); a node's
/// own listen address is never a peer.
fn resolver_loop(s: &super::Settings, tx: &Sender<Event>, stop: &AtomicBool) {
    let mut statics: BTreeMap<String, SocketAddr> = BTreeMap::new();
    let mut dns: Vec<SocketAddr> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        for peer in &s.peers {
            match peer.to_socket_addrs().map(|mut a| a.next()) {
                Ok(Some(addr)) => {
                    statics.insert(peer.clone(), addr);
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::debug!(%peer, error = %err, "cannot resolve peer; keeping its last address")
                }
            }
        }
        if let Some(name) = &s.peers_dns {
            match name.to_socket_addrs() {
                Ok(addrs) => dns = addrs.collect(),
                Err(err) => {
                    tracing::debug!(%name, error = %err, "cannot resolve peers_dns; keeping the last set")
                }
            }
        }
        let mut out: Vec<(String, SocketAddr)> = Vec::new();
        for (name, addr) in &statics {
            if *addr != s.listen {
                out.push((name.clone(), *addr));
            }
        }
        for addr in &dns {
            if *addr != s.listen && !out.iter().any(|(_, a)| a == addr) {
                out.push((addr.to_string(), *addr));
            }
        }
        if tx.send(Event::Resolved(out)).is_err() {
            return;
        }
        // Sleep in short steps so shutdown is not held up.
        let until = Instant::now() + s.peer_refresh;
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50).min(s.peer_refresh));
        }
    }
}

/// One request through the transport, waited for (anti-entropy thread only).
fn fetch(
    transport: &Transport,
    addr: SocketAddr,
    path: &str,
    secret: &str,
    extra_headers: &str,
) -> Result<OutgoingResponse, String> {
    let (tx, rx) = sync_channel(1);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {AUTH_SCHEME} {secret}\r\n{extra_headers}\r\n"
    );
    transport.submit(transport::request(
        addr,
        req.into_bytes(),
        None,
        Duration::from_secs(10),
        Box::new(move |outcome| {
            let _ = tx.send(outcome);
        }),
    ));
    match rx.recv_timeout(Duration::from_secs(15)) {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("no answer".to_string()),
    }
}

/// A peer query, waiting while the peer computes it (503) and serving our
/// own pending queries meanwhile, so two nodes comparing with each other at
/// once never wait on each other.
fn query(
    r: &Replication,
    transport: &Transport,
    addr: SocketAddr,
    path: &str,
    fresh_since: Option<Instant>,
) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + QUERY_WAIT;
    loop {
        // A listing whose walk began after `fresh_since` (rounded up to the
        // millisecond; an older one is computed again).
        let header = fresh_since.map_or(String::new(), |at| {
            format!(
                "{}: {}\r\n",
                summary::MAX_AGE_HEADER,
                at.elapsed().as_millis() + 1
            )
        });
        let resp = fetch(transport, addr, path, &r.peer_secret_text(), &header)?;
        match resp.status {
            200 => return Ok(resp.body),
            503 if Instant::now() < deadline => {
                r.summaries.serve_pending();
                std::thread::sleep(Duration::from_millis(100));
            }
            status => return Err(format!("{path} answered {status}")),
        }
    }
}

fn anti_entropy_loop(
    r: &Replication,
    store: &Store,
    transport: &Transport,
    rx: &Receiver<AeJob>,
    tx: &Sender<Event>,
) {
    while let Ok(job) = rx.recv() {
        match job {
            AeJob::Serve => r.summaries.serve_pending(),
            AeJob::Run {
                peer,
                addr,
                cutoff_ms,
                cutoff_at,
                flow,
            } => {
                // Before the walk, so the summary no longer counts them.
                let expire_before = super::now_ms()
                    .saturating_sub(r.settings.tombstone_retention.as_millis() as u64);
                let expired = store.expire_tombstones(expire_before);
                if expired > 0 {
                    r.series
                        .add("sluice_tombstones_expired_total", String::new(), expired);
                }
                let run = Comparison {
                    r,
                    transport,
                    addr,
                    peer: &peer,
                    cutoff_ms,
                    cutoff_at,
                    flow: &flow,
                    tx,
                };
                let result = run.compare();
                let _ = tx.send(Event::AntiEntropyDone { peer, result });
            }
        }
    }
}

/// One anti-entropy comparison with a peer, on the anti-entropy thread.
struct Comparison<'a> {
    r: &'a Replication,
    transport: &'a Transport,
    addr: SocketAddr,
    peer: &'a str,
    cutoff_ms: u64,
    cutoff_at: Instant,
    flow: &'a RepairFlow,
    tx: &'a Sender<Event>,
}

impl Comparison<'_> {
    /// Compare summaries with the peer and hand the replication thread what
    /// it lacks, a batch at a time. Memory stays bounded however many
    /// entries either side holds: the buckets that differ are walked in
    /// pieces of about a listing page of this node's entries, each as two
    /// sorted pages side by side (`summary::repairs_between`), and the run
    /// pauses while the peer's queued repairs are over `REPAIRS_QUEUED_MAX`.
    fn compare(&self) -> Result<AntiEntropyReport, String> {
        let data_dir = self.r.summaries.data_dir();
        let (ours, counts) = summary::compute_counted(data_dir)
            .map_err(|e| format!("summing up {}: {e}", data_dir.display()))?;
        let theirs = query(
            self.r,
            self.transport,
            self.addr,
            &Query::Summary.path(),
            None,
        )?;
        let theirs = summary::decode_summary(&theirs).ok_or("malformed summary")?;
        let differing: Vec<usize> = (0..summary::BUCKETS)
            .filter(|&b| ours[b] != theirs[b])
            .collect();
        let mut report = AntiEntropyReport {
            buckets_compared: summary::BUCKETS as u64,
            buckets_differing: differing.len() as u64,
            repairs: 0,
            deferred: 0,
        };
        let mut batch: Vec<Entry> = Vec::new();
        for piece in pieces(&differing, &counts) {
            let set: BTreeSet<usize> = piece.iter().copied().collect();
            let buckets: Vec<u16> = piece.iter().map(|&b| b as u16).collect();
            // Buckets empty on their side need no listing from them.
            let they_hold_none = piece.iter().all(|&b| theirs[b] == [0u8; 32]);
            let mut our_pages = summary::Pages::new(|after: &summary::After| {
                summary::list_page(data_dir, &set, after, summary::LISTING_ENTRIES_MAX)
                    .map_err(|e| format!("listing {}: {e}", data_dir.display()))
            });
            let mut their_pages = summary::Pages::new(|after: &summary::After| {
                if they_hold_none {
                    return Ok((Vec::new(), false));
                }
                let path = Query::Buckets(buckets.clone(), after.clone()).path();
                let body = query(
                    self.r,
                    self.transport,
                    self.addr,
                    &path,
                    Some(self.cutoff_at),
                )?;
                summary::decode_listing(&body).ok_or_else(|| "malformed listing".to_string())
            });
            summary::repairs_between(&mut our_pages, &mut their_pages, |entry| {
                if entry.write_time_ms >= self.cutoff_ms {
                    report.deferred += 1;
                    return Ok(());
                }
                report.repairs += 1;
                batch.push(entry);
                if batch.len() >= REPAIR_BATCH {
                    self.hand_over(&mut batch)?;
                }
                Ok(())
            })?;
        }
        self.hand_over(&mut batch)?;
        Ok(report)
    }

    /// Wait until the peer's repairs leave room for `batch` (serving this
    /// node's own pending summary queries meanwhile, so two nodes comparing
    /// never wait on each other), then send it to the replication thread.
    fn hand_over(&self, batch: &mut Vec<Entry>) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len() as u64;
        let room = (REPAIRS_QUEUED_MAX as u64).saturating_sub(n);
        let mut last = self.flow.backlog();
        let mut progress = Instant::now();
        while last > room {
            self.r.summaries.serve_pending();
            std::thread::sleep(Duration::from_millis(50));
            let now = self.flow.backlog();
            if now < last {
                progress = Instant::now();
            }
            last = now;
            if progress.elapsed() > REPAIR_DRAIN_WAIT {
                return Err("the peer's repairs stopped draining".to_string());
            }
        }
        self.flow.sent.fetch_add(n, Ordering::AcqRel);
        self.tx
            .send(Event::Repairs {
                peer: self.peer.to_string(),
                entries: std::mem::take(batch),
            })
            .map_err(|_| "replication stopped".to_string())
    }
}

/// The differing buckets in pieces a listing page or so of this node's
/// entries each (at most `QUERY_BUCKETS_MAX` buckets; a bucket over a page
/// goes alone, and its listing pages).
fn pieces(differing: &[usize], counts: &[u32]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut entries = 0usize;
    for &b in differing {
        let n = counts.get(b).copied().unwrap_or(0) as usize;
        if !current.is_empty()
            && (current.len() >= summary::QUERY_BUCKETS_MAX
                || entries + n > summary::LISTING_ENTRIES_MAX)
        {
            out.push(std::mem::take(&mut current));
            entries = 0;
        }
        current.push(b);
        entries += n;
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}
