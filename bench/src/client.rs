//! One keep-alive HTTP/1.1 client connection with blocking I/O: send a request, receive and
//! verify the response. Bodies are received with large reads (256 KiB) or, when no digest is
//! wanted, spliced from the socket through a pipe into `/dev/null` so the bench never copies
//! large bodies into user space.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::request::{Method, Request};
use crate::sys;

/// Size of the receive buffer for the head and for bodies read into user space, bytes.
/// wrk's 8 KiB buffer is what caps it near 2 GB/s; 256 KiB reads amortise the syscall cost.
pub const RECV_BUFFER_BYTES: usize = 256 * 1024;

/// Largest response head accepted, bytes. A longer head is a `read` error.
pub const HEAD_BYTES_MAX: usize = 64 * 1024;

/// Pipe size requested for splicing bodies to `/dev/null`, bytes.
pub const SPLICE_PIPE_BYTES: usize = 1024 * 1024;

/// Bodies at least this long are spliced rather than read (when splicing is on and no digest is
/// wanted); shorter ones arrive with the head in one read anyway, bytes.
pub const SPLICE_MIN_BYTES: u64 = 256 * 1024;

const _: () = assert!(HEAD_BYTES_MAX < RECV_BUFFER_BYTES);

/// Headers parsed per response, at most.
const HEADERS_MAX: usize = 64;

/// Why a request failed. Every failed request counts once, under one kind.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// TCP connect failed.
    Connect,
    /// Any other socket error in either direction, the peer closing before a complete head, or
    /// an unparsable or oversized head.
    Read,
    /// No progress within the request timeout.
    Timeout,
    /// The status was not 2xx.
    Status,
    /// Missing `Content-Length` (chunked responses are not accepted: the bench verifies
    /// lengths), a length other than expected, or a body shorter than announced.
    Length,
    /// The body's SHA-256 differs from the expected one.
    Digest,
}

impl ErrorKind {
    /// All kinds, in report order.
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::Connect,
        ErrorKind::Read,
        ErrorKind::Timeout,
        ErrorKind::Status,
        ErrorKind::Length,
        ErrorKind::Digest,
    ];

    /// Lower-case name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Read => "read",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Status => "status",
            ErrorKind::Length => "length",
            ErrorKind::Digest => "digest",
        }
    }

    /// Index into per-kind counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A completed exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    /// Body bytes moved: received for GET, sent for PUT, 0 for HEAD.
    pub body_bytes: u64,
    /// Whether the connection may carry another request (no `Connection: close`, HTTP/1.1).
    pub keep_alive: bool,
}

/// How a connection verifies and receives bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveOptions {
    /// Hash every response body and compare (see [`Request::expected_sha256`]).
    pub verify_sha256: bool,
    /// Splice bodies of at least [`SPLICE_MIN_BYTES`] into `/dev/null` instead of reading them.
    pub splice: bool,
}

/// A connection to the target.
pub struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
    // Created on first use: small-body runs never need them.
    splice_sink: Option<(OwnedFd, OwnedFd, File)>,
    opts: ReceiveOptions,
    /// The last exchange got at least one byte of response.
    received_any: bool,
    /// Status of the last response whose head was read (0: none yet).
    pub last_status: u16,
}

impl Connection {
    /// Connects to `authority` (`host:port`) with `TCP_NODELAY` and the given I/O timeout.
    pub fn connect(
        authority: &str,
        timeout: Duration,
        opts: ReceiveOptions,
    ) -> io::Result<Connection> {
        let stream = TcpStream::connect(authority)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Connection {
            stream,
            buf: vec![0; RECV_BUFFER_BYTES],
            splice_sink: None,
            opts,
            received_any: false,
            last_status: 0,
        })
    }

    /// Whether the server has closed this idle connection (end of stream, or bytes nobody
    /// asked for, waiting to be read). A pooled connection is checked before reuse, as curl
    /// and browsers do, so a keep-alive the server let go of is replaced instead of failing
    /// the next request.
    pub fn peer_closed(&self) -> bool {
        if self.stream.set_nonblocking(true).is_err() {
            return true;
        }
        let mut byte = [0u8; 1];
        let closed =
            !matches!(self.stream.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        closed || self.stream.set_nonblocking(false).is_err()
    }

    /// Whether the last exchange failed before any byte of the response arrived: on a
    /// reused connection that is the keep-alive race (the server closed it as the request
    /// went out), which HTTP clients answer by retrying once on a fresh connection.
    pub fn received_nothing(&self) -> bool {
        !self.received_any
    }

    /// Sends `req` and receives its response. On `Err`, the connection's framing is in doubt
    /// unless the kind is `Status` or `Digest` with `keep_alive`; callers reconnect on any error.
    pub fn exchange(&mut self, req: &Request) -> Result<Exchange, ErrorKind> {
        self.received_any = false;
        self.stream.write_all(&req.head).map_err(io_kind)?;
        let mut sent_bytes = 0u64;
        if let Some(body) = &req.body {
            self.stream.write_all(&body.bytes).map_err(io_kind)?;
            sent_bytes = body.bytes.len() as u64;
        }

        // Read until the head is complete; whatever follows it is the start of the body.
        let mut filled = 0usize;
        let (head_len, status, content_length, keep_alive) = loop {
            // Unreachable while HEAD_BYTES_MAX < RECV_BUFFER_BYTES (a partial head longer than
            // HEAD_BYTES_MAX is refused below), kept so a full buffer can never loop on read(&[]).
            if filled == self.buf.len() {
                return Err(ErrorKind::Read);
            }
            let n = self.stream.read(&mut self.buf[filled..]).map_err(io_kind)?;
            if n == 0 {
                return Err(ErrorKind::Read);
            }
            self.received_any = true;
            filled += n;
            let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf[..filled]) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = resp.code.unwrap_or(0);
                    let mut keep_alive = resp.version == Some(1);
                    let mut content_length = None;
                    let mut chunked = false;
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            let v = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse::<u64>().ok());
                            match (content_length, v) {
                                (None, Some(v)) => content_length = Some(v),
                                // Repeated or unparsable: framing is unknowable.
                                _ => return Err(ErrorKind::Length),
                            }
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                            if v.contains("close") {
                                keep_alive = false;
                            } else if v.contains("keep-alive") {
                                keep_alive = true;
                            }
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            chunked = true;
                        }
                    }
                    if chunked {
                        return Err(ErrorKind::Length);
                    }
                    break (len, status, content_length, keep_alive);
                }
                Ok(httparse::Status::Partial) if filled < HEAD_BYTES_MAX => continue,
                _ => return Err(ErrorKind::Read),
            }
        };

        // 1xx would need another head; the bench never sends Expect, so it is a protocol error.
        let body_len = match (req.method, status) {
            (Method::Head, _) | (_, 204) | (_, 304) => 0,
            _ => match content_length {
                Some(l) => l,
                None => return Err(ErrorKind::Length),
            },
        };
        let ok_status = (200..300).contains(&status);
        if ok_status {
            if let (Some(want), Some(got)) = (req.expected_len, content_length) {
                if want != got {
                    return Err(ErrorKind::Length);
                }
            }
        }

        let already = (filled - head_len) as u64;
        if already > body_len {
            // More bytes than announced without pipelining: the server broke framing.
            return Err(ErrorKind::Length);
        }
        let want_digest = self.opts.verify_sha256 && ok_status && req.method == Method::Get;
        let mut hasher = want_digest.then(Sha256::new);
        if let Some(h) = hasher.as_mut() {
            h.update(&self.buf[head_len..filled]);
        }
        let mut remaining = body_len - already;
        if hasher.is_none() && self.opts.splice && remaining >= SPLICE_MIN_BYTES {
            self.splice_body(remaining)?;
            remaining = 0;
        }
        while remaining > 0 {
            let want = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let n = self.stream.read(&mut self.buf[..want]).map_err(io_kind)?;
            if n == 0 {
                return Err(ErrorKind::Length);
            }
            if let Some(h) = hasher.as_mut() {
                h.update(&self.buf[..n]);
            }
            remaining -= n as u64;
        }

        if !ok_status {
            self.last_status = status;
            return Err(ErrorKind::Status);
        }
        if let Some(h) = hasher {
            let got: [u8; 32] = h.finalize().into();
            // The first body seen becomes the reference when the list gave no digest.
            if *req.expected_sha256.get_or_init(|| got) != got {
                return Err(ErrorKind::Digest);
            }
        }
        let body_bytes = match req.method {
            Method::Get => body_len,
            Method::Put => sent_bytes,
            Method::Head => 0,
        };
        Ok(Exchange {
            body_bytes,
            keep_alive,
        })
    }

    /// Moves exactly `len` body bytes from the socket to `/dev/null` through a pipe.
    fn splice_body(&mut self, len: u64) -> Result<(), ErrorKind> {
        if self.splice_sink.is_none() {
            let (r, w) = sys::pipe().map_err(|_| ErrorKind::Read)?;
            // A smaller pipe than asked for only costs more syscalls.
            let _ = sys::set_pipe_size(&w, SPLICE_PIPE_BYTES);
            let null = File::options()
                .write(true)
                .open("/dev/null")
                .map_err(|_| ErrorKind::Read)?;
            self.splice_sink = Some((r, w, null));
        }
        let Some((r, w, null)) = self.splice_sink.as_ref() else {
            return Err(ErrorKind::Read);
        };
        let mut remaining = len;
        while remaining > 0 {
            let want = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(SPLICE_PIPE_BYTES);
            let n = sys::splice(&self.stream, w, want).map_err(io_kind)?;
            if n == 0 {
                return Err(ErrorKind::Length);
            }
            let mut in_pipe = n;
            while in_pipe > 0 {
                let m = sys::splice(r, null, in_pipe).map_err(|_| ErrorKind::Read)?;
                if m == 0 {
                    return Err(ErrorKind::Read);
                }
                in_pipe -= m;
            }
            remaining -= n as u64;
        }
        Ok(())
    }
}

fn io_kind(e: io::Error) -> ErrorKind {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::Read,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pooled_connection_the_server_closed_is_seen_before_reuse() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let opts = ReceiveOptions {
            verify_sha256: false,
            splice: false,
        };
        let conn = Connection::connect(&addr, Duration::from_secs(5), opts).expect("connect");
        let (server_side, _) = listener.accept().expect("accept");
        assert!(!conn.peer_closed(), "an open, quiet connection is reusable");
        drop(server_side);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !conn.peer_closed() {
            assert!(
                std::time::Instant::now() < deadline,
                "the close was never seen"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
