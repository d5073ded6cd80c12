//! The replication thread: runs the per-peer policies against the real
//! clock, reads the outbox, builds peer requests and hands them to the
//! transport; answers come back as [`Event`]s. Anti-entropy's directory
//! walks and summary exchanges run on a second thread so this loop never
//! waits for a disk walk.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::outgoing::{FileBody, OutgoingResponse, TaskError};

/// A request ready to go: head (or whole request), file body, body bytes.
type Built = (Vec<u8>, Option<FileBody>, u64);
use crate::store::Store;

use super::policy::{Action, Membership, PeerPolicy, PeerState, Transition};
use super::summary::{self, Entry};
use super::transport::{self, Transport};
use super::{PeerView, Replication, AUTH_SCHEME};
use crate::delivery::outbox::{Op, Record};
use crate::delivery::{Next, Rng};

/// Repairs queued from one anti-entropy run per peer; more wait for the
/// next run.
pub const REPAIRS_MAX: usize = 10_000;
/// Repairs in flight to one peer.
pub const REPAIR_WINDOW_MAX: usize = 4;
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
        start: u64,
        bytes: u64,
        outcome: Result<OutgoingResponse, TaskError>,
        retried: bool,
    },
    Repaired {
        peer: String,
        bytes: u64,
        outcome: Result<OutgoingResponse, TaskError>,
    },
    AntiEntropyDone {
        peer: String,
        result: Result<AntiEntropyReport, String>,
    },
}

/// One anti-entropy comparison's findings.
pub struct AntiEntropyReport {
    pub buckets_compared: u64,
    pub buckets_differing: u64,
    pub repairs: Vec<Entry>,
    /// More differed than one run repairs: run again.
    pub incomplete: bool,
}

enum AeJob {
    Serve,
    Run { peer: String, addr: SocketAddr },
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
    repairs_in_flight: usize,
    /// Keys of the entries in flight (by outbox offset). A key is never in
    /// flight twice to one peer: a PUT and the DELETE after it could
    /// otherwise arrive swapped, and without tombstones the peer would keep
    /// the artifact.
    keys_in_flight: BTreeMap<u64, (String, String)>,
    /// The transport refused a request (engine queue full): wait a little
    /// before the next, rather than spin on the refusal.
    paused_until: Option<Instant>,
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
            let now = Instant::now();
            let mut wake_at = now + TICK;
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
            if now.duration_since(self.last_persist) >= PERSIST_EVERY {
                self.last_persist = now;
                if let Err(err) = self.r.outbox.persist() {
                    tracing::warn!(error = %err, "outbox: cannot write cursors");
                }
            }
            self.publish_views(now);
            self.r.take_kick();
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
        let _ = self.r.outbox.persist();
    }

    /// Requests in flight (outbox sends and repairs) over all peers.
    fn sends_in_flight(&self) -> usize {
        self.peers
            .values()
            .map(|run| run.policy.cursor.in_flight() + run.repairs_in_flight)
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
                            repairs_in_flight: 0,
                            keys_in_flight: BTreeMap::new(),
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
        if let Some(Transition::Changed { from, to, .. }) = self.membership.observe(peer, state) {
            tracing::info!(%peer, from = from.as_str(), to = to.as_str(), "peer state changed");
            self.r.series.add(
                "sluice_peer_transitions_total",
                format!("peer=\"{peer}\",to=\"{}\"", to.as_str()),
                1,
            );
            self.r.series.set(
                "sluice_peer_up",
                label(peer),
                u64::from(to == PeerState::Up),
            );
            self.count_reconciles();
        }
    }

    /// Run `peer`'s policy until it waits; returns when to look again.
    fn step_peer(&mut self, name: &str, now: Instant) -> Option<Instant> {
        let end = self.r.outbox.end();
        if let Some(mark) = self.r.outbox.mark(name) {
            if let Some(run) = self.peers.get_mut(name) {
                if mark.overflow {
                    run.policy.cursor.jump(mark.acked);
                    run.policy.anti_entropy_due = true;
                }
            }
        }
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
                        Ok(pos) => run.policy.cursor.jump(pos),
                        Err(err) => {
                            tracing::warn!(error = %err, "outbox: cannot clear an overflow")
                        }
                    }
                    if self
                        .ae_tx
                        .try_send(AeJob::Run {
                            peer: name.to_string(),
                            addr,
                        })
                        .is_err()
                    {
                        run.policy.on_anti_entropy(now, false, &mut self.rng);
                    }
                }
                Action::WaitUntil(t) => {
                    self.send_repairs(name);
                    self.sync_acked(name);
                    return Some(t);
                }
                Action::Idle => break,
            }
        }
        self.send_repairs(name);
        self.sync_acked(name);
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

    fn sync_acked(&self, name: &str) {
        if let Some(run) = self.peers.get(name) {
            self.r.outbox.set_acked(name, run.policy.cursor.acked());
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
        let head = format!(
            "PUT /_peer/v1/put/{ns}/{key}/{write_time_ms}/{} HTTP/1.1\r\nHost: {addr}\r\n{}Content-Length: {}\r\n\r\n",
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

    /// Send the entry `next` to `name`; false when the loop should stop
    /// for now (memory bound, unreadable outbox).
    fn send_next(&mut self, name: &str, next: Next) -> bool {
        let start = match next {
            Next::Again { start, .. } | Next::New { start } => start,
        };
        let (record, end) = match self.r.outbox.read_at(start) {
            Ok(Some(found)) => found,
            Ok(None) => return false,
            Err(err) => {
                tracing::error!(peer = name, error = %err, "outbox unreadable; anti-entropy will repair");
                let end = self.r.outbox.end();
                if let Some(run) = self.peers.get_mut(name) {
                    run.policy.cursor.jump(end);
                    run.policy.anti_entropy_due = true;
                }
                return false;
            }
        };
        let busy = self.peers.get(name).is_some_and(|run| {
            run.keys_in_flight
                .iter()
                .any(|(&at, (ns, key))| at != start && *ns == record.ns && *key == record.key)
        });
        if busy {
            return false; // after the earlier entry for this key is answered
        }
        self.send_record(name, start, end, &record, false)
    }

    fn send_record(
        &mut self,
        name: &str,
        start: u64,
        end: u64,
        record: &Record,
        retried: bool,
    ) -> bool {
        if self.closing {
            return false;
        }
        let Some(addr) = self.peers.get(name).map(|r| r.addr) else {
            return false;
        };
        if record.op == Op::Put && self.throttled_until.is_some_and(|t| Instant::now() < t) {
            return false; // no tokens: do not even open the artifact yet
        }
        let (bytes, file_body, body) = match self.build(addr, record) {
            Ok(Some(built)) => built,
            Ok(None) => {
                if let Some(run) = self.peers.get_mut(name) {
                    run.policy.cursor.skip(start, end);
                    run.keys_in_flight.remove(&start);
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
                run.policy.cursor.on_sent(start, end);
            }
            run.keys_in_flight
                .insert(start, (record.ns.clone(), record.key.clone()));
        }
        self.in_flight_bytes += body;
        self.count_attempt(name, retried);
        let tx = self.tx.clone();
        let peer = name.to_string();
        let timeout = self.r.settings.request_timeout;
        self.transport.submit(transport::request(
            addr,
            bytes,
            file_body,
            timeout,
            Box::new(move |outcome| {
                let _ = tx.send(Event::Sent {
                    peer,
                    start,
                    bytes: body,
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
            if run.policy.state != PeerState::Up
                || run.policy.backoff.failures() > 0
                || run.repairs_in_flight >= REPAIR_WINDOW_MAX
            {
                return;
            }
            if self.throttled_until.is_some_and(|t| Instant::now() < t) {
                return;
            }
            let Some(entry) = run.repairs.pop_front() else {
                return;
            };
            let addr = run.addr;
            let id = u64::MAX - run.repairs.len() as u64;
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
            if let Some(run) = self.peers.get_mut(name) {
                run.repairs_in_flight += 1;
            }
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
                start,
                bytes,
                outcome,
                retried,
            } => self.on_sent(now, peer, start, bytes, outcome, retried),
            Event::Repaired {
                peer,
                bytes,
                outcome,
            } => self.on_repaired(now, peer, bytes, outcome),
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
        bytes: u64,
        outcome: Result<OutgoingResponse, TaskError>,
        retried: bool,
    ) {
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
        if let Err(err) = &outcome {
            if !retried && is_before_any_byte(err) {
                // Nothing reached the peer: once more, at once, on a
                // fresh connection. Nothing else is retried here.
                if let Ok(Some((record, end))) = self.r.outbox.read_at(start) {
                    if self.send_record(&peer, start, end, &record, true) {
                        return;
                    }
                }
            }
        }
        let verdict = self.classify(&peer, &outcome, bytes);
        let Some(run) = self.peers.get_mut(&peer) else {
            return;
        };
        run.keys_in_flight.remove(&start);
        let state = match verdict {
            Verdict::Refused => {
                run.policy.cursor.on_fail(start);
                run.paused_until = Some(now + REFUSED_PAUSE);
                return;
            }
            Verdict::Done => run.policy.on_send(now, start, Ok(()), &mut self.rng),
            Verdict::Failed { down, why } => {
                run.last_error = Some(why);
                run.policy.on_send(now, start, Err(down), &mut self.rng)
            }
        };
        self.observe(&peer, state);
        self.sync_acked(&peer);
    }

    fn on_repaired(
        &mut self,
        now: Instant,
        peer: String,
        bytes: u64,
        outcome: Result<OutgoingResponse, TaskError>,
    ) {
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
        let verdict = self.classify(&peer, &outcome, bytes);
        let Some(run) = self.peers.get_mut(&peer) else {
            return;
        };
        run.repairs_in_flight = run.repairs_in_flight.saturating_sub(1);
        match verdict {
            Verdict::Done => {
                self.r
                    .series
                    .add("sluice_anti_entropy_repaired_total", String::new(), 1);
            }
            Verdict::Refused | Verdict::Failed { .. } => {
                // The next comparison finds whatever was not repaired.
                run.repairs.clear();
                run.policy.anti_entropy_due = true;
                if let Verdict::Failed { down, why } = verdict {
                    run.last_error = Some(why);
                    run.policy.on_send(now, u64::MAX, Err(down), &mut self.rng);
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
                    repairs = report.repairs.len(),
                    "anti-entropy compared summaries"
                );
                run.policy.on_anti_entropy(now, true, &mut self.rng);
                if report.incomplete {
                    run.policy.anti_entropy_due = true;
                }
                run.repairs.extend(report.repairs);
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

    fn classify(
        &self,
        peer: &str,
        outcome: &Result<OutgoingResponse, TaskError>,
        bytes: u64,
    ) -> Verdict {
        let count = |result: &str| {
            self.r.series.add(
                "sluice_replication_sent_requests_total",
                format!("peer=\"{peer}\",result=\"{result}\""),
                1,
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
            Ok(resp) => {
                count("failed");
                Verdict::Failed {
                    down: false,
                    why: format!("answered {}", resp.status),
                }
            }
            Err(TaskError::Refused) => Verdict::Refused,
            Err(err) => {
                count("failed");
                Verdict::Failed {
                    down: matches!(
                        err,
                        TaskError::Connect(_) | TaskError::Io(_) | TaskError::TimedOut
                    ),
                    why: err.to_string(),
                }
            }
        }
    }

    fn publish_views(&self, now: Instant) {
        let views = self
            .peers
            .iter()
            .map(|(name, run)| PeerView {
                peer: name.clone(),
                state: run.policy.state.as_str(),
                backoff_ms: u64::try_from(run.policy.backoff.remaining(now).as_millis())
                    .unwrap_or(u64::MAX),
                failures: run.policy.backoff.failures(),
                last_error: run.last_error.clone(),
                in_flight: run.policy.cursor.in_flight() + run.repairs_in_flight,
            })
            .collect();
        *self.r.views.lock().unwrap_or_else(PoisonError::into_inner) = views;
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
    Failed { down: bool, why: String },
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
) -> Result<OutgoingResponse, String> {
    let (tx, rx) = sync_channel(1);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {AUTH_SCHEME} {secret}\r\n\r\n"
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
) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + QUERY_WAIT;
    loop {
        let resp = fetch(transport, addr, path, &r.peer_secret_text())?;
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
            AeJob::Run { peer, addr } => {
                // Before the walk, so the summary no longer counts them.
                let cutoff = super::now_ms()
                    .saturating_sub(r.settings.tombstone_retention.as_millis() as u64);
                let expired = store.expire_tombstones(cutoff);
                if expired > 0 {
                    r.series
                        .add("sluice_tombstones_expired_total", String::new(), expired);
                }
                let result = compare(r, transport, addr);
                let _ = tx.send(Event::AntiEntropyDone { peer, result });
            }
        }
    }
}

/// Compare summaries with the peer at `addr` and list what it lacks.
fn compare(
    r: &Replication,
    transport: &Transport,
    addr: SocketAddr,
) -> Result<AntiEntropyReport, String> {
    let data_dir = r.summaries.data_dir();
    let ours = summary::compute(data_dir).map_err(|e| e.to_string())?;
    let theirs = query(r, transport, addr, "/_peer/v1/summary")?;
    let theirs = summary::decode_summary(&theirs).ok_or("malformed summary")?;
    let differing: Vec<usize> = (0..summary::BUCKETS)
        .filter(|&b| ours[b] != theirs[b])
        .collect();
    let mut report = AntiEntropyReport {
        buckets_compared: summary::BUCKETS as u64,
        buckets_differing: differing.len() as u64,
        repairs: Vec::new(),
        incomplete: false,
    };
    for chunk in differing.chunks(summary::QUERY_BUCKETS_MAX) {
        let set: BTreeSet<usize> = chunk.iter().copied().collect();
        let our_list = summary::list(data_dir, &set).map_err(|e| e.to_string())?;
        let path = format!(
            "/_peer/v1/buckets/{}",
            chunk
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        let their_list = query(r, transport, addr, &path)?;
        let their_list = summary::decode_listing(&their_list).ok_or("malformed listing")?;
        report
            .repairs
            .extend(summary::to_repair(&our_list, &their_list));
        if report.repairs.len() >= REPAIRS_MAX {
            report.repairs.truncate(REPAIRS_MAX);
            report.incomplete = true;
            break;
        }
    }
    Ok(report)
}
