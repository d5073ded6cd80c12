//! How replication requests reach peers.
//!
//! With io_uring, every request is an outgoing task on an engine ring
//! (`outgoing`): connect, send, read the answer, on the same loop and
//! under the same bounded tables as public connections. Without rings
//! (engine = fallback) a few blocking sender threads of their own do the
//! same, so replication works on any host.
//!
//! A PUT's body goes from the artifact file: on the rings by splice (file →
//! pipe → socket, both through the ring, no user-space copy), over
//! keep-alive connections pooled per ring; on the blocking senders by
//! sendfile(2) (no user-space copy either), one connection per request.
//!
//! A peer that stops reading (frozen, or its receiving threads all busy)
//! must not hold up the others: on the rings a body waits for room in the
//! socket without holding a thread (`crate::engine::ring::tasks`), and here
//! one peer's requests run on at most [`BLOCKING_PER_PEER_MAX`] of the
//! threads at once, so the rest stay free for the other peers.

use std::collections::{HashMap, VecDeque};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::outgoing::{
    parse_response, Done, FileBody, OutgoingRequest, Submit, TaskError, RESPONSE_BYTES_MAX_DEFAULT,
    RESPONSE_READ_BYTES,
};

/// Most of a file body one sendfile(2) call of the blocking sender moves
/// (each call gets the remaining deadline as its send timeout).
const SENDFILE_BYTES: usize = 4 << 20;

/// Blocking sender threads when there are no rings.
pub const BLOCKING_THREADS: usize = 8;
/// Blocking sender threads one peer's requests take at once: with up to
/// three peers that stopped reading, two threads still serve the others.
pub const BLOCKING_PER_PEER_MAX: usize = 2;
const _: () = assert!(BLOCKING_PER_PEER_MAX * 3 < BLOCKING_THREADS);
/// Requests waiting for a blocking sender thread.
pub const BLOCKING_QUEUE_MAX: usize = 256;

/// Where requests go.
#[derive(Clone)]
pub enum Transport {
    /// Tasks on the rings; `splice`: the ring can splice (IORING_OP_SPLICE,
    /// Linux 5.7), else file bodies are read into the request first.
    Ring {
        submitter: Arc<dyn Submit>,
        splice: bool,
    },
    Blocking(Arc<BlockingQueue>),
}

impl Transport {
    /// Run `request`; its `done` is called exactly once, on whichever thread
    /// finishes it (a refusal calls it here).
    pub fn submit(&self, mut request: OutgoingRequest) {
        let refused = match self {
            Transport::Ring { submitter, splice } => {
                if !splice {
                    if let Some(body) = request.body_file.take() {
                        if let Err(err) = append_body(&mut request.request, &body) {
                            (request.done)(Err(TaskError::Io(errno_of(&err))));
                            return;
                        }
                    }
                }
                submitter.submit(request).err()
            }
            Transport::Blocking(queue) => queue.push(request).err(),
        };
        if let Some(request) = refused {
            (request.done)(Err(TaskError::Refused));
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Transport::Ring { splice: true, .. } => "tasks on the engine rings, bodies spliced",
            Transport::Ring { .. } => "tasks on the engine rings, bodies copied (no ring splice)",
            Transport::Blocking(_) => "blocking sender threads (no rings)",
        }
    }

    /// Start the blocking sender threads.
    pub fn blocking() -> std::io::Result<Transport> {
        let queue = Arc::new(BlockingQueue::default());
        for i in 0..BLOCKING_THREADS {
            // The threads hold the queue weakly: once every `Transport`
            // is gone they find it gone and end.
            let weak = Arc::downgrade(&queue);
            std::thread::Builder::new()
                .name(format!("sluice-peer-send-{i}"))
                .spawn(move || {
                    crate::background::enter("peer-send");
                    blocking_loop(&weak)
                })?;
        }
        Ok(Transport::Blocking(queue))
    }
}

/// Requests waiting for a blocking sender thread, oldest first, and how
/// many threads each peer holds. A thread takes the oldest request whose
/// peer holds fewer than `per_peer_max`; the others wait their turn.
struct Lanes<R> {
    waiting: VecDeque<(SocketAddr, R)>,
    running: HashMap<SocketAddr, usize>,
    waiting_max: usize,
    per_peer_max: usize,
}

impl<R> Lanes<R> {
    fn new(waiting_max: usize, per_peer_max: usize) -> Self {
        Lanes {
            waiting: VecDeque::new(),
            running: HashMap::new(),
            waiting_max,
            per_peer_max,
        }
    }

    /// Queue `item` for `addr`; a full queue gives it back.
    fn push(&mut self, addr: SocketAddr, item: R) -> Result<(), R> {
        if self.waiting.len() >= self.waiting_max {
            return Err(item);
        }
        self.waiting.push_back((addr, item));
        Ok(())
    }

    fn may_run(&self, addr: &SocketAddr) -> bool {
        self.running.get(addr).copied().unwrap_or(0) < self.per_peer_max
    }

    /// Some waiting request may run now.
    fn can_take(&self) -> bool {
        self.waiting.iter().any(|(addr, _)| self.may_run(addr))
    }

    /// The oldest request a thread may run now, counted as running.
    fn take(&mut self) -> Option<(SocketAddr, R)> {
        let at = self
            .waiting
            .iter()
            .position(|(addr, _)| self.may_run(addr))?;
        let (addr, item) = self.waiting.remove(at)?;
        *self.running.entry(addr).or_default() += 1;
        Some((addr, item))
    }

    /// A request to `addr` ended.
    fn done(&mut self, addr: SocketAddr) {
        if let Some(n) = self.running.get_mut(&addr) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.running.remove(&addr);
            }
        }
    }
}

/// The blocking senders' queue (see [`Lanes`]).
pub struct BlockingQueue {
    lanes: Mutex<Lanes<OutgoingRequest>>,
    ready: Condvar,
}

impl Default for BlockingQueue {
    fn default() -> Self {
        BlockingQueue {
            lanes: Mutex::new(Lanes::new(BLOCKING_QUEUE_MAX, BLOCKING_PER_PEER_MAX)),
            ready: Condvar::new(),
        }
    }
}

impl Drop for BlockingQueue {
    /// The server is gone: what still waits is refused (replication keeps
    /// it in the outbox), so every `done` is still called once.
    fn drop(&mut self) {
        let lanes = self.lanes.get_mut().unwrap_or_else(PoisonError::into_inner);
        for (_, request) in lanes.waiting.drain(..) {
            (request.done)(Err(TaskError::Refused));
        }
    }
}

impl BlockingQueue {
    fn push(&self, request: OutgoingRequest) -> Result<(), OutgoingRequest> {
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        lanes.push(request.addr, request)?;
        drop(lanes);
        self.ready.notify_one();
        Ok(())
    }
}

/// How long an idle sender thread waits before it looks whether the
/// server is gone (the queue dropped).
const BLOCKING_IDLE_CHECK: Duration = Duration::from_secs(1);

fn blocking_loop(weak: &std::sync::Weak<BlockingQueue>) {
    loop {
        let Some(queue) = weak.upgrade() else {
            return; // every sender gone: the server is stopping
        };
        let next = {
            let lanes = queue.lanes.lock().unwrap_or_else(PoisonError::into_inner);
            let (mut lanes, _) = queue
                .ready
                .wait_timeout_while(lanes, BLOCKING_IDLE_CHECK, |lanes| !lanes.can_take())
                .unwrap_or_else(PoisonError::into_inner);
            lanes.take()
        };
        let Some((addr, request)) = next else {
            continue;
        };
        let outcome = send_blocking(
            request.addr,
            &request.request,
            request.body_file.as_deref(),
            request.timeout,
        );
        (request.done)(outcome);
        queue
            .lanes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .done(addr);
        // A request to the same peer may be free to run now.
        queue.ready.notify_one();
    }
}

fn errno_of(err: &std::io::Error) -> i32 {
    err.raw_os_error().unwrap_or(0)
}

/// One request on a fresh blocking connection.
pub fn send_blocking(
    addr: SocketAddr,
    request: &[u8],
    body: Option<&FileBody>,
    timeout: Duration,
) -> Result<crate::outgoing::OutgoingResponse, TaskError> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
        if e.kind() == std::io::ErrorKind::TimedOut {
            TaskError::TimedOut
        } else {
            TaskError::Connect(errno_of(&e))
        }
    })?;
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => TaskError::TimedOut,
        _ => TaskError::Io(errno_of(&e)),
    };
    let remaining = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    stream.set_write_timeout(Some(remaining())).map_err(io)?;
    stream.write_all(request).map_err(io)?;
    if let Some(body) = body {
        // sendfile(2): file -> socket in the kernel, no copy through this
        // thread. The socket is blocking with SO_SNDTIMEO, which bounds
        // each call as it bounds write(2).
        let mut offset = body.offset;
        let end = body.offset + body.len;
        while offset < end {
            stream.set_write_timeout(Some(remaining())).map_err(io)?;
            let want = usize::try_from(end - offset)
                .unwrap_or(usize::MAX)
                .min(SENDFILE_BYTES);
            match rustix::fs::sendfile(&stream, &*body.file, Some(&mut offset), want) {
                Ok(0) => return Err(TaskError::Io(libc::EIO)), // the file is shorter than its header says
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(io(e.into())),
            }
        }
    }
    let mut received = Vec::new();
    let mut buf = vec![0u8; RESPONSE_READ_BYTES];
    loop {
        stream.set_read_timeout(Some(remaining())).map_err(io)?;
        let n = stream.read(&mut buf).map_err(io)?;
        received.extend_from_slice(&buf[..n]);
        if let Some(outcome) = parse_response(&received, n == 0) {
            return outcome;
        }
        if received.len() > RESPONSE_BYTES_MAX_DEFAULT {
            return Err(TaskError::BadResponse("response over the size bound"));
        }
        if Instant::now() >= deadline {
            return Err(TaskError::TimedOut);
        }
    }
}

/// Read a file body onto the end of `request` (rings without splice).
fn append_body(request: &mut Vec<u8>, body: &FileBody) -> std::io::Result<()> {
    let at = request.len();
    let len = usize::try_from(body.len).map_err(std::io::Error::other)?;
    request.resize(at + len, 0);
    body.file.read_exact_at(&mut request[at..], body.offset)
}

/// An outgoing request for `transport`.
pub fn request(
    addr: SocketAddr,
    bytes: Vec<u8>,
    body_file: Option<FileBody>,
    timeout: Duration,
    done: Done,
) -> OutgoingRequest {
    OutgoingRequest {
        addr,
        request: bytes,
        body_file: body_file.map(Box::new),
        // Every replication request is keep-alive: the rings pool
        // connections per peer (the blocking senders do not).
        keep_alive: true,
        timeout,
        response_bytes_max: RESPONSE_BYTES_MAX_DEFAULT,
        done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A peer whose requests all hang holds at most its share of the
    /// threads: the other peers' requests, queued behind its own, run.
    #[test]
    fn a_stuck_peer_holds_at_most_its_share_and_the_others_run() {
        let mut lanes = Lanes::new(BLOCKING_QUEUE_MAX, BLOCKING_PER_PEER_MAX);
        for i in 0..20 {
            lanes.push(peer(1), i).expect("room");
        }
        lanes.push(peer(2), 100).expect("room");
        lanes.push(peer(3), 200).expect("room");
        let mut running = Vec::new();
        while let Some(taken) = lanes.take() {
            running.push(taken);
        }
        let of = |p: u16| running.iter().filter(|(a, _)| *a == peer(p)).count();
        assert_eq!(of(1), BLOCKING_PER_PEER_MAX);
        assert_eq!((of(2), of(3)), (1, 1));
        // Oldest first within a peer.
        let firsts: Vec<i32> = running
            .iter()
            .filter(|(a, _)| *a == peer(1))
            .map(|(_, i)| *i)
            .collect();
        assert_eq!(firsts, vec![0, 1]);
        assert!(!lanes.can_take());
        // One of the stuck peer's requests ends: its next one may run.
        lanes.done(peer(1));
        assert!(lanes.can_take());
        assert_eq!(lanes.take(), Some((peer(1), 2)));
        assert_eq!(lanes.take(), None);
    }

    #[test]
    fn a_full_queue_gives_the_request_back() {
        let mut lanes = Lanes::new(2, BLOCKING_PER_PEER_MAX);
        assert_eq!(lanes.push(peer(1), 1), Ok(()));
        assert_eq!(lanes.push(peer(2), 2), Ok(()));
        assert_eq!(lanes.push(peer(3), 3), Err(3));
        assert_eq!(lanes.take(), Some((peer(1), 1)));
        assert_eq!(lanes.push(peer(3), 3), Ok(()));
    }

    /// The blocking senders end once the transport is gone, and what they
    /// had not started is refused, each `done` called once.
    #[test]
    fn dropping_the_transport_refuses_what_waits() {
        let queue = BlockingQueue::default();
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for _ in 0..3 {
            let count = Arc::clone(&refused);
            let done: Done = Box::new(move |outcome| {
                assert!(matches!(outcome, Err(TaskError::Refused)));
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            });
            let request = request(peer(1), Vec::new(), None, Duration::from_secs(1), done);
            assert!(queue.push(request).is_ok());
        }
        drop(queue);
        assert_eq!(refused.load(std::sync::atomic::Ordering::Relaxed), 3);
    }
}
