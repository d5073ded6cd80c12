//! Outgoing HTTP/1.1 requests (replication sends, read-through fetches):
//! what a request is, what it produced, how it failed, and the sans-IO
//! state of one in progress. The engine loop is a general scheduler, not
//! only a server: the ring engine runs these as tasks with the same driver,
//! the same bounded tables and the same deadlines as public connections.
//!
//! This module knows no engine. Whoever runs requests implements
//! [`Submit`]; replication holds a `dyn Submit` and never learns which
//! engine thread (or which engine) carries its requests, so the imports
//! point down: engine -> outgoing <- replication.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Longest response an outgoing request accepts (head and body), in bytes.
pub const RESPONSE_BYTES_MAX_DEFAULT: usize = 16 * 1024 * 1024;
/// Read size of an outgoing request's response, in bytes.
pub const RESPONSE_READ_BYTES: usize = 64 * 1024;

/// What an outgoing request produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingResponse {
    pub status: u16,
    pub body: Vec<u8>,
    /// It went over a pooled keep-alive connection (no connect).
    pub reused_connection: bool,
    /// The response's `x-sluice-*` headers (name lower-cased, value as
    /// sent): what the peer API says about a body (its sha256, its write
    /// time). Other headers are not kept.
    pub sluice_headers: Vec<(String, Vec<u8>)>,
}

impl OutgoingResponse {
    /// The value of `x-sluice-` header `name` (lower case), if sent once.
    pub fn sluice_header(&self, name: &str) -> Option<&[u8]> {
        let mut found = self.sluice_headers.iter().filter(|(n, _)| n == name);
        match (found.next(), found.next()) {
            (Some((_, v)), None) => Some(v),
            _ => None,
        }
    }
}

/// Why an outgoing request failed. `Connect` is the class the replication
/// design retries once on a fresh connection; nothing else is retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskError {
    /// The connection could not be made (errno).
    Connect(i32),
    /// The connection failed after it was made (errno, or 0 for an early close).
    Io(i32),
    /// The response was not valid HTTP/1.1 or was over the size bound.
    BadResponse(&'static str),
    /// A pooled keep-alive connection failed before any byte of a response
    /// came back: the peer had closed it while idle. Like `Connect`, the
    /// one class retried at once on a fresh connection.
    StaleConnection(i32),
    /// The deadline passed.
    TimedOut,
    /// The engine's task queue or table was full, or it is shutting down.
    Refused,
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskError::Connect(e) => write!(f, "connect failed: errno {e}"),
            TaskError::Io(0) => write!(f, "the peer closed the connection early"),
            TaskError::Io(e) => write!(f, "connection failed: errno {e}"),
            TaskError::BadResponse(why) => write!(f, "bad response: {why}"),
            TaskError::StaleConnection(e) => {
                write!(f, "a pooled connection was closed by the peer (errno {e})")
            }
            TaskError::TimedOut => write!(f, "timed out"),
            TaskError::Refused => write!(f, "the engine refused the task"),
        }
    }
}

/// Called once, on the engine thread, with the outcome.
pub type Done = Box<dyn FnOnce(Result<OutgoingResponse, TaskError>) + Send>;

/// A request body taken from a file range: the ring splices it file ->
/// pipe -> socket, with no copy through user space.
pub struct FileBody {
    pub file: std::sync::Arc<std::fs::File>,
    /// Where the body starts in `file`, bytes.
    pub offset: u64,
    pub len: u64,
}

/// An outgoing HTTP/1.1 request for a ring to run.
pub struct OutgoingRequest {
    pub addr: SocketAddr,
    /// The request as it goes on the wire: head and body, or only the head
    /// when `body_file` carries the body.
    pub request: Vec<u8>,
    /// The body, sent after `request`, straight from a file. Boxed: most
    /// requests have none, and a request is moved through queues and given
    /// back in `Err` when refused.
    pub body_file: Option<Box<FileBody>>,
    /// The head asks for keep-alive: the ring may run it on a pooled
    /// connection to `addr` and pools the connection again after a
    /// complete response that does not say `Connection: close`.
    pub keep_alive: bool,
    pub timeout: Duration,
    pub response_bytes_max: usize,
    pub done: Done,
}

impl OutgoingRequest {
    /// A `GET` of `path` with `Connection: close`.
    pub fn get(addr: SocketAddr, path: &str, timeout: Duration, done: Done) -> OutgoingRequest {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
            .into_bytes();
        OutgoingRequest {
            addr,
            request,
            body_file: None,
            keep_alive: false,
            timeout,
            response_bytes_max: RESPONSE_BYTES_MAX_DEFAULT,
            done,
        }
    }
}

/// Runs outgoing requests on some engine thread. The ring engine's
/// `TaskSubmitter` implements it; replication and the read-through hold it
/// as an `Arc<dyn Submit>`.
pub trait Submit: Send + Sync {
    /// Queue `request` on one of the engine threads. A full queue or a
    /// stopped engine gives the request back, its `done` not called: the
    /// caller decides whether to retry later (replication keeps it in its
    /// outbox). Once queued, `done` is called exactly once, on the engine
    /// thread.
    fn submit(&self, request: OutgoingRequest) -> Result<(), OutgoingRequest>;
}

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Connecting,
    Sending,
    /// Body: a chunk of the file is being spliced into the pipe.
    SplicingIn,
    /// Body: the pipe's bytes wait for room in the socket (`POLLOUT`).
    SplicingOut,
    Receiving,
}

/// A running outgoing request on a ring.
pub struct Task {
    pub request: OutgoingRequest,
    pub state: TaskState,
    pub sent: usize,
    /// Body bytes spliced to the socket so far.
    pub body_sent: u64,
    pub received: Vec<u8>,
    pub deadline: Instant,
}

impl Task {
    pub fn new(request: OutgoingRequest, now: Instant) -> Task {
        let deadline = now + request.timeout;
        Task {
            request,
            state: TaskState::Connecting,
            sent: 0,
            body_sent: 0,
            received: Vec::new(),
            deadline,
        }
    }

    /// Parse the response received so far: `None` while incomplete.
    /// Without `Content-Length` the body runs to the close (`eof`).
    pub fn response(&self, eof: bool) -> Option<Result<OutgoingResponse, TaskError>> {
        parse_response(&self.received, eof)
    }

    /// After a complete response: whether its connection can carry another
    /// request (framed by length, nothing extra received, no `close`).
    pub fn keeps_alive(&self) -> bool {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = parsed.parse(&self.received) else {
            return false;
        };
        let close = parsed.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("connection")
                && std::str::from_utf8(h.value)
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
        });
        let body_len = match body_framing(&parsed) {
            Framing::Empty => Some(0),
            Framing::Length(n) => Some(n),
            Framing::ToClose => None,
        };
        !close
            && parsed.version == Some(1)
            && body_len.is_some_and(|n| self.received.len() == head_len + n)
    }
}

enum Framing {
    /// 1xx, 204, 304: no body, whatever the headers say.
    Empty,
    Length(usize),
    ToClose,
}

fn body_framing(parsed: &httparse::Response<'_, '_>) -> Framing {
    let status = parsed.code.unwrap_or(0);
    if status < 200 || status == 204 || status == 304 {
        return Framing::Empty;
    }
    parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(Framing::ToClose, Framing::Length)
}

/// Parse a response received so far: `None` while incomplete. Without
/// `Content-Length` the body runs to the close (`eof`). Shared by the ring's
/// tasks and the blocking sender the fallback engine uses.
pub fn parse_response(received: &[u8], eof: bool) -> Option<Result<OutgoingResponse, TaskError>> {
    {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        let head_len = match parsed.parse(received) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if eof => {
                return Some(Err(TaskError::BadResponse("incomplete head")))
            }
            Ok(httparse::Status::Partial) => return None,
            Err(_) => return Some(Err(TaskError::BadResponse("malformed head"))),
        };
        let status = parsed.code.unwrap_or(0);
        // 204 and 304 carry no body and often no Content-Length: on a
        // keep-alive connection waiting for the close would never end.
        let length = match body_framing(&parsed) {
            Framing::Empty => Some(0),
            Framing::Length(n) => Some(n),
            Framing::ToClose => None,
        };
        let body = &received[head_len..];
        let sluice_headers = || {
            parsed
                .headers
                .iter()
                .filter(|h| {
                    h.name.len() > 9 && h.name.as_bytes()[..9].eq_ignore_ascii_case(b"x-sluice-")
                })
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect::<Vec<_>>()
        };
        match length {
            Some(len) if body.len() >= len => Some(Ok(OutgoingResponse {
                status,
                body: body[..len].to_vec(),
                reused_connection: false,
                sluice_headers: sluice_headers(),
            })),
            Some(_) if eof => Some(Err(TaskError::Io(0))),
            Some(_) => None,
            None if eof => Some(Ok(OutgoingResponse {
                status,
                body: body.to_vec(),
                reused_connection: false,
                sluice_headers: sluice_headers(),
            })),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task_with(received: &[u8]) -> Task {
        let mut t = Task::new(
            OutgoingRequest::get(
                SocketAddr::from(([127, 0, 0, 1], 1)),
                "/up",
                Duration::from_secs(1),
                Box::new(|_| {}),
            ),
            Instant::now(),
        );
        t.received = received.to_vec();
        t
    }

    #[test]
    fn response_parsing() {
        let ok = |status, body: &[u8]| {
            Some(Ok(OutgoingResponse {
                status,
                body: body.to_vec(),
                reused_connection: false,
                sluice_headers: Vec::new(),
            }))
        };
        type Want = Option<Result<OutgoingResponse, TaskError>>;
        let rows: &[(&[u8], bool, Want)] = &[
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nup\n",
                false,
                ok(200, b"up\n"),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nu",
                false,
                None,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nu",
                true,
                Some(Err(TaskError::Io(0))),
            ),
            (b"HTTP/1.1 404 Not Found\r\n\r\nno", true, ok(404, b"no")),
            // 204 ends at its head, with or without a close.
            (b"HTTP/1.1 204 No Content\r\n\r\n", false, ok(204, b"")),
            (b"HTTP/1.1 200 OK\r\n", false, None),
            (
                b"HTTP/1.1 200 OK\r\n",
                true,
                Some(Err(TaskError::BadResponse("incomplete head"))),
            ),
            (
                b"garbage\r\n\r\n",
                false,
                Some(Err(TaskError::BadResponse("malformed head"))),
            ),
        ];
        for (bytes, eof, want) in rows {
            assert_eq!(
                &task_with(bytes).response(*eof),
                want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
