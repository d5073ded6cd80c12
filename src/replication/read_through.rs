//! Read-through from peers: a GET or HEAD that misses locally asks the
//! peers for the artifact, stores it (its sha256 checked first) and is
//! decided again from the store.
//!
//! - One fetch per key however many ask ([`crate::single_flight`]): the
//!   first miss starts it, later misses of the same key wait for it; all of
//!   them are woken when it ends and read the stored copy.
//! - A fetch that finds nothing is remembered for
//!   `read_through_negative_ms`: misses within it answer 404 at once.
//! - The fetch is a request through the replication transport (a task on
//!   an engine ring; the blocking senders without rings). Its answer is
//!   checked and stored on this module's own thread (`sluice-read-through`),
//!   never on an engine thread (storing may fsync).
//! - Peers are asked one at a time, up peers first, within one deadline
//!   (`read_through_timeout_ms`) for the whole fetch; whatever is left
//!   unanswered at the deadline is a miss: the honest 404.
//! - A body whose sha256 is not the one the peer announced (or, for `cas`,
//!   not its key) is refused and not stored; the next peer is asked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::outgoing::{OutgoingResponse, TaskError};
use crate::single_flight::{Bounds, Join, SingleFlight};
use crate::store::format::{Meta, META_HEADER};
use crate::store::{PutOptions, Store};

use super::policy::PeerState;
use super::transport::{self, Transport};
use super::{Replication, AUTH_SCHEME};

/// Largest answer a read-through reads into memory, bytes (checked, then
/// stored). A larger artifact is fetched again from the same peer by
/// [`stream_fetch`], which streams the body into the store with a bounded
/// buffer instead.
pub const FETCH_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Buffer of a streamed fetch, bytes.
const STREAM_CHUNK_BYTES: usize = 256 * 1024;
/// Largest head of a streamed fetch's answer, bytes.
const STREAM_HEAD_BYTES_MAX: usize = 64 * 1024;
/// Fetches under way at once (so at most this × [`FETCH_BYTES_MAX`] of
/// answers in memory); more keys wait in the queue.
pub const FETCHES_MAX: usize = 4;
/// Keys waiting for a fetch slot (beyond: an immediate miss).
pub const QUEUE_MAX: usize = 1024;
/// The single-flight table's bounds.
pub const BOUNDS: Bounds = Bounds {
    flights_max: QUEUE_MAX + FETCHES_MAX,
    waiters_per_flight_max: 4096,
    negative_max: 65_536,
};

/// Called once when the request may be decided again.
pub use crate::app::Waiter;
type Key = (String, String);

/// Why a peer's answer was not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 404: the peer does not hold it.
    NotFound,
    /// The body does not hash to what the peer announced, or a CAS body to
    /// its key.
    Corrupt(&'static str),
    /// Anything else (a status, a missing or malformed header).
    Bad(String),
}

/// A peer's answer that may be stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub sha256: [u8; 32],
    pub write_time_ms: u64,
    /// The response headers the artifact keeps (`x-sluice-meta`).
    pub meta: Meta,
}

/// Check a peer's answer to `GET /_peer/v1/get/{ns}/{key}` (bytes from
/// another host: the `peer_get_response` fuzz target runs it).
pub fn verify(ns: &str, key: &str, resp: &OutgoingResponse) -> Result<Verified, Refusal> {
    match resp.status {
        200 => {}
        404 => return Err(Refusal::NotFound),
        s => return Err(Refusal::Bad(format!("answered {s}"))),
    }
    let mut declared = [0u8; 32];
    let sha = resp
        .sluice_header("x-sluice-sha256")
        .ok_or_else(|| Refusal::Bad("no single x-sluice-sha256".into()))?;
    if hex::decode_to_slice(sha.trim_ascii(), &mut declared).is_err() {
        return Err(Refusal::Bad("x-sluice-sha256 is not 64 hex digits".into()));
    }
    let write_time_ms = resp
        .sluice_header("x-sluice-write-time-ms")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| Refusal::Bad("no valid x-sluice-write-time-ms".into()))?;
    let meta = match resp.sluice_header(META_HEADER).map(Meta::from_header_value) {
        None => Meta::default(),
        Some(Ok(meta)) => meta,
        Some(Err(err)) => return Err(Refusal::Bad(format!("x-sluice-meta: {err}"))),
    };
    let actual: [u8; 32] = Sha256::digest(&resp.body).into();
    if actual != declared {
        return Err(Refusal::Corrupt(
            "the body does not hash to x-sluice-sha256",
        ));
    }
    if ns == "cas" {
        let mut digest = [0u8; 32];
        if hex::decode_to_slice(key, &mut digest).is_err() || digest != actual {
            return Err(Refusal::Corrupt("the CAS body does not hash to its key"));
        }
    }
    Ok(Verified {
        sha256: actual,
        write_time_ms,
        meta,
    })
}

enum Event {
    Start(Key),
    Answer {
        id: u64,
        outcome: Result<OutgoingResponse, TaskError>,
    },
    /// A streamed fetch (an artifact over [`FETCH_BYTES_MAX`]) ended: the
    /// body bytes stored, or the result label of the failure.
    Streamed {
        id: u64,
        result: Result<u64, &'static str>,
    },
}

/// The peers fill a miss the request waits for.
impl crate::app::MissFetcher for ReadThrough {
    fn known_absent(&self, ns: &str, key: &str) -> bool {
        ReadThrough::known_absent(self, ns, key)
    }

    fn request(&self, ns: &str, key: &str, done: Waiter) {
        ReadThrough::request(self, ns, key, done)
    }

    fn timeout(&self) -> Duration {
        ReadThrough::timeout(self)
    }
}

/// The read-through of one node.
pub struct ReadThrough {
    r: Arc<Replication>,
    flights: Mutex<SingleFlight<Key, Waiter>>,
    events: SyncSender<Event>,
}

impl ReadThrough {
    /// Start the read-through thread.
    pub fn start(
        r: Arc<Replication>,
        store: Store,
        transport: Transport,
    ) -> std::io::Result<Arc<ReadThrough>> {
        // Answers come back on this channel too: room for every fetch's
        // answer beside a full queue of starts, so an answer is never lost.
        let (tx, rx) = sync_channel(QUEUE_MAX + 2 * FETCHES_MAX);
        let rt = Arc::new(ReadThrough {
            flights: Mutex::new(SingleFlight::new(BOUNDS, r.settings.read_through_negative)),
            r,
            events: tx,
        });
        let worker = Worker {
            rt: Arc::clone(&rt),
            store,
            transport,
            running: HashMap::new(),
            queued: std::collections::VecDeque::new(),
            next_id: 0,
        };
        std::thread::Builder::new()
            .name("sluice-read-through".into())
            .spawn(move || worker.run(&rx))?;
        for result in [
            "ok",
            "not_found",
            "failed",
            "corrupt",
            "too_large",
            "timeout",
        ] {
            rt.r.series.add(
                "sluice_read_through_fetches_total",
                format!("result=\"{result}\""),
                0,
            );
        }
        Ok(rt)
    }

    /// How long a fetch may take (`read_through_timeout_ms`).
    pub fn timeout(&self) -> Duration {
        self.r.settings.read_through_timeout
    }

    /// Whether a miss of `ns/key` is known absent now (counted as a
    /// negative-cache hit): answer 404 without waiting.
    pub fn known_absent(&self, ns: &str, key: &str) -> bool {
        let key = (ns.to_string(), key.to_string());
        let absent = self
            .flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_negative(&key, Instant::now());
        if absent {
            self.count("sluice_read_through_negative_hits_total", String::new());
        }
        absent
    }

    /// A miss of `ns/key`: `done` is called once the fetch (this request's
    /// or the one it joins) has ended, or at once if there is none to wait
    /// for. Never blocks.
    pub fn request(&self, ns: &str, key: &str, done: Waiter) {
        let key = (ns.to_string(), key.to_string());
        let joined = self
            .flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .join(key.clone(), Instant::now(), done);
        match joined {
            Join::Leader => {
                if self.events.try_send(Event::Start(key.clone())).is_err() {
                    // The thread is gone or its queue is full: a miss.
                    self.finish(&key, "failed", false);
                }
            }
            Join::Follower => {
                self.count("sluice_read_through_coalesced_total", String::new());
            }
            Join::Negative(done) => {
                self.count("sluice_read_through_negative_hits_total", String::new());
                done();
            }
            Join::Full(done) => done(),
        }
    }

    fn count(&self, name: &'static str, labels: String) {
        self.r.series.add(name, labels, 1);
    }

    /// End the fetch of `key`: count it, wake its waiters.
    fn finish(&self, key: &Key, result: &str, found: bool) {
        self.count(
            "sluice_read_through_fetches_total",
            format!("result=\"{result}\""),
        );
        self.wake(key, found);
    }

    /// Wake the waiters of `key`'s flight; `found` false remembers a miss.
    fn wake(&self, key: &Key, found: bool) {
        let waiters = self
            .flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .complete(key, Instant::now(), !found);
        for waiter in waiters {
            waiter();
        }
    }
}

/// One fetch under way.
struct Fetch {
    key: Key,
    /// Peers still to ask, in order.
    candidates: Vec<(String, SocketAddr)>,
    /// The peer asked last.
    asked: Option<SocketAddr>,
    deadline: Instant,
    /// The worst answer so far, for the result label when nobody has it.
    worst: &'static str,
}

struct Worker {
    rt: Arc<ReadThrough>,
    store: Store,
    transport: Transport,
    running: HashMap<u64, Fetch>,
    /// Keys waiting for a fetch slot, with their deadlines (in order).
    queued: std::collections::VecDeque<(Key, Instant)>,
    next_id: u64,
}

impl Worker {
    fn run(mut self, rx: &Receiver<Event>) {
        loop {
            let now = Instant::now();
            // Fetches past their deadline: the honest 404 for their waiters.
            // A late answer finds no fetch under its id and is dropped.
            let overdue: Vec<u64> = self
                .running
                .iter()
                .filter(|(_, f)| now >= f.deadline)
                .map(|(id, _)| *id)
                .collect();
            for id in overdue {
                if let Some(f) = self.running.remove(&id) {
                    self.rt.finish(&f.key, "timeout", false);
                }
            }
            // Keys that waited in the queue for their whole deadline never
            // start: their waiters get the 404 on time.
            while self.queued.front().is_some_and(|(_, d)| now >= *d) {
                if let Some((key, _)) = self.queued.pop_front() {
                    self.rt.finish(&key, "timeout", false);
                }
            }
            while self.running.len() < FETCHES_MAX {
                let Some((key, deadline)) = self.queued.pop_front() else {
                    break;
                };
                self.begin(key, deadline);
            }
            let wait = self
                .running
                .values()
                .map(|f| f.deadline)
                .chain(self.queued.front().map(|(_, d)| *d))
                .map(|d| d.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_secs(1));
            match rx.recv_timeout(wait.max(Duration::from_millis(1))) {
                Ok(Event::Start(key)) => {
                    // The deadline runs from the first miss, queued or not.
                    let deadline = Instant::now() + self.rt.r.settings.read_through_timeout;
                    if self.running.len() < FETCHES_MAX {
                        self.begin(key, deadline);
                    } else {
                        self.queued.push_back((key, deadline));
                    }
                }
                Ok(Event::Answer { id, outcome }) => self.on_answer(id, outcome),
                Ok(Event::Streamed { id, result }) => self.on_streamed(id, result),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn begin(&mut self, key: Key, deadline: Instant) {
        // A miss that lost the race with the previous fetch of this key (it
        // looked before that fetch stored, joined after it ended) finds the
        // artifact here: no second fetch.
        if let Ok(Some(_)) = self.store.get(&key.0, &key.1) {
            self.rt.wake(&key, true);
            return;
        }
        let r = &self.rt.r;
        let mut peers: Vec<(String, SocketAddr, PeerState)> = r
            .peer_addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, _, s)| *s != PeerState::Myself)
            .cloned()
            .collect();
        if peers.is_empty() {
            // Right after start the replication thread has not published
            // the peer set yet: the static peers written as addresses are
            // known without it (names wait for the resolver).
            peers = r
                .settings
                .peers
                .iter()
                .filter_map(|p| Some((p.clone(), p.parse::<SocketAddr>().ok()?)))
                .filter(|(_, a)| *a != r.settings.listen)
                .map(|(p, a)| (p, a, PeerState::Unknown))
                .collect();
        }
        // Up peers first, then those not heard from, then those down.
        peers.sort_by_key(|(_, _, s)| match s {
            // A full peer still holds (and serves) what it has.
            PeerState::Up | PeerState::Full => 0,
            PeerState::Unknown => 1,
            _ => 2,
        });
        let candidates: Vec<(String, SocketAddr)> =
            peers.into_iter().rev().map(|(n, a, _)| (n, a)).collect();
        let id = self.next_id;
        self.next_id += 1;
        let fetch = Fetch {
            key,
            candidates,
            asked: None,
            deadline,
            worst: "not_found",
        };
        self.running.insert(id, fetch);
        self.ask_next(id);
    }

    /// Ask the next candidate of fetch `id`, or end it as a miss.
    fn ask_next(&mut self, id: u64) {
        let Some(fetch) = self.running.get_mut(&id) else {
            return;
        };
        let Some((_peer, addr)) = fetch.candidates.pop() else {
            if let Some(f) = self.running.remove(&id) {
                self.rt.finish(&f.key, f.worst, false);
            }
            return;
        };
        fetch.asked = Some(addr);
        let (ns, key) = &fetch.key;
        let remaining = fetch.deadline.saturating_duration_since(Instant::now());
        let request = format!(
            "GET /_peer/v1/get/{ns}/{key} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {AUTH_SCHEME} {}\r\n\r\n",
            self.rt.r.peer_secret_text()
        );
        let events = self.rt.events.clone();
        let mut req = transport::request(
            addr,
            request.into_bytes(),
            None,
            remaining.max(Duration::from_millis(1)),
            Box::new(move |outcome| {
                // The channel has room for every running fetch's answer.
                let _ = events.try_send(Event::Answer { id, outcome });
            }),
        );
        req.response_bytes_max = FETCH_BYTES_MAX + 64 * 1024;
        self.transport.submit(req);
    }

    fn on_answer(&mut self, id: u64, outcome: Result<OutgoingResponse, TaskError>) {
        let Some(fetch) = self.running.get_mut(&id) else {
            return; // it timed out meanwhile
        };
        let (ns, key) = fetch.key.clone();
        let refusal = match outcome {
            Ok(resp) => match verify(&ns, &key, &resp) {
                Ok(verified) => match store(&self.store, &ns, &key, &resp.body, &verified) {
                    Ok(()) => {
                        self.rt.r.series.add(
                            "sluice_replication_received_bytes_total",
                            String::new(),
                            resp.body.len() as u64,
                        );
                        if let Some(f) = self.running.remove(&id) {
                            self.rt.finish(&f.key, "ok", true);
                        }
                        return;
                    }
                    Err(why) => {
                        tracing::warn!(ns, key, error = %why, "read-through: cannot store a fetched artifact");
                        "failed"
                    }
                },
                Err(Refusal::NotFound) => "not_found",
                Err(Refusal::Corrupt(why)) => {
                    tracing::warn!(
                        ns,
                        key,
                        why,
                        "read-through: a peer sent a corrupt body; refused, not stored"
                    );
                    "corrupt"
                }
                Err(Refusal::Bad(why)) => {
                    tracing::debug!(ns, key, why, "read-through: unusable answer");
                    "failed"
                }
            },
            Err(TaskError::BadResponse(why)) if why.contains("size bound") => {
                // Too large to hold in memory: the same peer again, the body
                // streamed into the store on a thread of its own.
                if let Some(addr) = fetch.asked {
                    let (store, events) = (self.store.clone(), self.rt.events.clone());
                    let secret = self.rt.r.peer_secret_text();
                    let idle = self.rt.r.settings.request_timeout;
                    let deadline = fetch.deadline;
                    let spawned = std::thread::Builder::new()
                        .name("sluice-read-through-stream".into())
                        .spawn(move || {
                            let result =
                                stream_fetch(&store, addr, &secret, &ns, &key, deadline, idle);
                            let _ = events.try_send(Event::Streamed { id, result });
                        });
                    if spawned.is_ok() {
                        return;
                    }
                }
                "too_large"
            }
            Err(TaskError::TimedOut) => "timeout",
            Err(_) => "failed",
        };
        // The result label says the worst thing that happened when nobody
        // had it: a corrupt body outranks a failure, which outranks a 404.
        let rank = |r: &str| match r {
            "corrupt" => 4,
            "too_large" => 3,
            "timeout" => 2,
            "failed" => 1,
            _ => 0,
        };
        if rank(refusal) > rank(fetch.worst) {
            fetch.worst = refusal;
        }
        self.ask_next(id);
    }
}

impl Worker {
    fn on_streamed(&mut self, id: u64, result: Result<u64, &'static str>) {
        // A fetch that timed out meanwhile is gone (its waiters had their
        // 404); what the stream stored serves the next request.
        let Some(fetch) = self.running.get_mut(&id) else {
            return;
        };
        match result {
            Ok(bytes) => {
                self.rt.r.series.add(
                    "sluice_replication_received_bytes_total",
                    String::new(),
                    bytes,
                );
                if let Some(f) = self.running.remove(&id) {
                    self.rt.finish(&f.key, "ok", true);
                }
            }
            Err(refusal) => {
                if refusal == "corrupt" {
                    let (ns, key) = &fetch.key;
                    tracing::warn!(
                        ns,
                        key,
                        "read-through: a peer sent a corrupt body; refused, not stored"
                    );
                }
                fetch.worst = refusal;
                self.ask_next(id);
            }
        }
    }
}

/// What a streamed fetch needs from the head of a peer's 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHead {
    pub len: u64,
    pub sha256: [u8; 32],
    pub write_time_ms: u64,
    /// The response headers the artifact keeps (`x-sluice-meta`).
    pub meta: Meta,
}

/// The head of a peer's answer to a streamed `GET /_peer/v1/get/...` (bytes
/// from another host: the `peer_get_response` fuzz target runs it).
/// `Ok(None)`: the head is not complete yet; `Ok(Some((head, its length)))`
/// for a 200 with `Content-Length`, `x-sluice-sha256` and
/// `x-sluice-write-time-ms`; else the result label.
pub fn parse_stream_head(bytes: &[u8]) -> Result<Option<(StreamHead, usize)>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("failed"),
    };
    let find = |name: &str| {
        let mut found = resp
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name));
        match (found.next(), found.next()) {
            (Some(h), None) => std::str::from_utf8(h.value).ok().map(str::trim),
            _ => None, // absent, or said twice
        }
    };
    match resp.code {
        Some(200) => {}
        Some(404) => return Err("not_found"),
        _ => return Err("failed"),
    }
    let len = find("content-length").and_then(|v| v.parse::<u64>().ok());
    let mut sha256 = [0u8; 32];
    let sha_ok =
        find("x-sluice-sha256").is_some_and(|v| hex::decode_to_slice(v, &mut sha256).is_ok());
    let time = find("x-sluice-write-time-ms").and_then(|v| v.parse::<u64>().ok());
    let sent_meta = resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(META_HEADER))
        .count();
    let meta = match (sent_meta, find(META_HEADER)) {
        (0, _) => Meta::default(),
        (1, Some(value)) => Meta::from_header_value(value.as_bytes()).map_err(|_| "failed")?,
        _ => return Err("failed"),
    };
    match (len, sha_ok, time) {
        (Some(len), true, Some(write_time_ms)) => Ok(Some((
            StreamHead {
                len,
                sha256,
                write_time_ms,
                meta,
            },
            head_len,
        ))),
        _ => Err("failed"),
    }
}

/// Fetch `ns/key` from the peer at `addr` on a blocking connection and
/// stream its body into the store through a bounded buffer: for artifacts
/// too large to hold in memory. The answer's head must come by `deadline`;
/// then each read may wait `idle`. The store's writer checks length and
/// digest (the peer's `x-sluice-sha256`, and for `cas` the key) before
/// anything is published. `Ok(body bytes)` or the result label.
fn stream_fetch(
    store: &Store,
    addr: SocketAddr,
    secret: &str,
    ns: &str,
    key: &str,
    deadline: Instant,
    idle: Duration,
) -> Result<u64, &'static str> {
    use std::io::{Read as _, Write as _};
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut conn = std::net::TcpStream::connect_timeout(&addr, left()).map_err(|_| "failed")?;
    conn.set_write_timeout(Some(left())).map_err(|_| "failed")?;
    conn.write_all(
        format!(
            "GET /_peer/v1/get/{ns}/{key} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {AUTH_SCHEME} {secret}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .map_err(|_| "failed")?;
    let mut buf = vec![0u8; STREAM_CHUNK_BYTES];
    let mut filled = 0;
    let (head, head_len) = loop {
        conn.set_read_timeout(Some(left())).map_err(|_| "timeout")?;
        let n = conn.read(&mut buf[filled..]).map_err(|_| "timeout")?;
        if n == 0 {
            return Err("failed");
        }
        filled += n;
        match parse_stream_head(&buf[..filled])? {
            Some(found) => break found,
            None if filled < STREAM_HEAD_BYTES_MAX => {}
            None => return Err("failed"),
        }
    };
    let StreamHead {
        len,
        sha256: declared,
        write_time_ms,
        meta,
    } = head;
    if ns == "cas" {
        let mut digest = [0u8; 32];
        if hex::decode_to_slice(key, &mut digest).is_err() || digest != declared {
            return Err("corrupt");
        }
    }
    let options = PutOptions {
        expected_len: Some(len),
        expected_sha256: Some(declared),
        body_bytes_max: len,
        write_time_ms: Some(write_time_ms),
        last_writer_wins: true,
    };
    let mut writer = store
        .begin_put_with(ns, key, options, meta)
        .map_err(|_| "failed")?;
    let mut received = (filled - head_len) as u64;
    writer.write(&buf[head_len..filled]).map_err(|_| "failed")?;
    conn.set_read_timeout(Some(idle.max(Duration::from_millis(1))))
        .map_err(|_| "failed")?;
    while received < len {
        let n = conn.read(&mut buf).map_err(|_| "timeout")?;
        if n == 0 {
            return Err("failed"); // cut short: nothing is published
        }
        received += n as u64;
        writer.write(&buf[..n]).map_err(|_| "failed")?;
    }
    match writer.commit() {
        Ok(_) => Ok(len),
        Err(crate::store::StoreError::DigestMismatch { .. }) => Err("corrupt"),
        Err(_) => Err("failed"),
    }
}

/// Store a verified fetch, unless this node holds the key meanwhile (a
/// local PUT, or replication, got there first: that copy is as new or newer).
fn store(store: &Store, ns: &str, key: &str, body: &[u8], v: &Verified) -> Result<(), String> {
    if let Ok(Some(_)) = store.get(ns, key) {
        return Ok(());
    }
    let options = PutOptions {
        expected_len: Some(body.len() as u64),
        expected_sha256: Some(v.sha256),
        body_bytes_max: body.len() as u64,
        write_time_ms: Some(v.write_time_ms),
        // A local PUT or a tombstone newer than the peer's copy wins, checked
        // under the key's lock at commit (a delete here is not undone).
        last_writer_wins: true,
    };
    let mut writer = store
        .begin_put_with(ns, key, options, v.meta.clone())
        .map_err(|e| e.to_string())?;
    writer.write(body).map_err(|e| e.to_string())?;
    writer.commit().map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_head_needs_the_whole_head_and_every_field_once() {
        let sha = "ab".repeat(32);
        let ok = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 70\r\nx-sluice-sha256: {sha}\r\nx-sluice-write-time-ms: 5\r\n\r\nbody"
        );
        let (head, n) = parse_stream_head(ok.as_bytes()).unwrap().unwrap();
        assert_eq!(
            (head.len, head.write_time_ms, head.sha256),
            (70, 5, [0xab; 32])
        );
        assert_eq!(&ok.as_bytes()[n..], b"body");
        assert_eq!(parse_stream_head(&ok.as_bytes()[..20]), Ok(None));
        assert_eq!(
            parse_stream_head(b"HTTP/1.1 404 Not Found\r\n\r\n"),
            Err("not_found")
        );
        let twice = ok.replace(
            "Content-Length: 70\r\n",
            "Content-Length: 70\r\nContent-Length: 71\r\n",
        );
        assert_eq!(parse_stream_head(twice.as_bytes()), Err("failed"));
        let no_time = ok.replace("x-sluice-write-time-ms: 5\r\n", "");
        assert_eq!(parse_stream_head(no_time.as_bytes()), Err("failed"));
        // The kept headers come along; a damaged or repeated one refuses the answer.
        let mut meta = Meta::default();
        meta.push("x-artifact-tag", b"sig").unwrap();
        let with_meta = ok.replace(
            "\r\n\r\n",
            &format!("\r\nx-sluice-meta: {}\r\n\r\n", meta.to_header_value()),
        );
        let (head, _) = parse_stream_head(with_meta.as_bytes()).unwrap().unwrap();
        assert_eq!(head.meta, meta);
        let bad = ok.replace("\r\n\r\n", "\r\nx-sluice-meta: !!\r\n\r\n");
        assert_eq!(parse_stream_head(bad.as_bytes()), Err("failed"));
        let twice = with_meta.replace("x-sluice-meta", "X-Sluice-Meta: a\r\nx-sluice-meta");
        assert_eq!(parse_stream_head(twice.as_bytes()), Err("failed"));
    }

    fn answer(status: u16, headers: &[(&str, &str)], body: &[u8]) -> OutgoingResponse {
        OutgoingResponse {
            status,
            body: body.to_vec(),
            reused_connection: false,
            sluice_headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn answers_are_checked_before_anything_is_stored() {
        let body = b"artifact bytes";
        let sha = hex::encode(Sha256::digest(body));
        let good = [
            ("x-sluice-sha256", sha.as_str()),
            ("x-sluice-write-time-ms", "1700000000000"),
        ];
        let ok = verify("gradle", "k", &answer(200, &good, body)).expect("good");
        assert_eq!(ok.write_time_ms, 1_700_000_000_000);
        assert!(ok.meta.is_empty());
        let mut meta = Meta::default();
        meta.push("x-artifact-duration", b"12").unwrap();
        let value = meta.to_header_value();
        let with_meta = [good[0], good[1], ("x-sluice-meta", value.as_str())];
        let kept = verify("t", "k", &answer(200, &with_meta, body)).expect("with meta");
        assert_eq!(kept.meta, meta);
        let bad_meta = [good[0], good[1], ("x-sluice-meta", "%%")];
        assert!(matches!(
            verify("t", "k", &answer(200, &bad_meta, body)),
            Err(Refusal::Bad(_))
        ));
        assert_eq!(
            verify("cas", &sha, &answer(200, &good, body)),
            Ok(ok.clone())
        );
        let rows: &[(&str, &str, OutgoingResponse, Refusal)] = &[
            ("gradle", "k", answer(404, &[], b""), Refusal::NotFound),
            (
                "gradle",
                "k",
                answer(200, &good, b"other bytes"),
                Refusal::Corrupt("the body does not hash to x-sluice-sha256"),
            ),
            (
                "cas",
                "00",
                answer(200, &good, body),
                Refusal::Corrupt("the CAS body does not hash to its key"),
            ),
            (
                "gradle",
                "k",
                answer(200, &good[1..], body),
                Refusal::Bad("no single x-sluice-sha256".into()),
            ),
            (
                "gradle",
                "k",
                answer(200, &[good[0], good[0], good[1]], body),
                Refusal::Bad("no single x-sluice-sha256".into()),
            ),
            (
                "gradle",
                "k",
                answer(200, &[("x-sluice-sha256", "zz"), good[1]], body),
                Refusal::Bad("x-sluice-sha256 is not 64 hex digits".into()),
            ),
            (
                "gradle",
                "k",
                answer(200, &[good[0], ("x-sluice-write-time-ms", "-1")], body),
                Refusal::Bad("no valid x-sluice-write-time-ms".into()),
            ),
            (
                "gradle",
                "k",
                answer(503, &good, body),
                Refusal::Bad("answered 503".into()),
            ),
        ];
        for (ns, key, resp, want) in rows {
            assert_eq!(verify(ns, key, resp).as_ref(), Err(want), "{ns}/{key}");
        }
    }
}
