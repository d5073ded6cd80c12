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

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::outgoing::{
    parse_response, Done, FileBody, OutgoingRequest, Submit, TaskError, RESPONSE_BYTES_MAX_DEFAULT,
    RESPONSE_READ_BYTES,
};

/// Most of a file body one sendfile(2) call of the blocking sender moves
/// (each call gets the remaining deadline as its send timeout).
const SENDFILE_BYTES: usize = 4 << 20;

/// Blocking sender threads when there are no rings.
pub const BLOCKING_THREADS: usize = 4;
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
    Blocking(SyncSender<OutgoingRequest>),
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
            Transport::Blocking(tx) => match tx.try_send(request) {
                Ok(()) => None,
                Err(TrySendError::Full(r) | TrySendError::Disconnected(r)) => Some(r),
            },
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
        let (tx, rx) = sync_channel::<OutgoingRequest>(BLOCKING_QUEUE_MAX);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..BLOCKING_THREADS {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("sluice-peer-send-{i}"))
                .spawn(move || {
                    crate::background::enter("peer-send");
                    blocking_loop(&rx)
                })?;
        }
        Ok(Transport::Blocking(tx))
    }
}

fn blocking_loop(rx: &Mutex<Receiver<OutgoingRequest>>) {
    loop {
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(request) = next else {
            return; // every sender gone: the server is stopping
        };
        let outcome = send_blocking(
            request.addr,
            &request.request,
            request.body_file.as_deref(),
            request.timeout,
        );
        (request.done)(outcome);
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
