//! One plaintext HTTP/1 connection on a ring, as a sans-IO state machine.
//!
//! The engine thread owns the socket and submits the operations; this type
//! owns the protocol. Each handler is named after the operation it
//! completes (`on_peek`, `on_recv`, `on_sent`, `on_file_sent`) and returns
//! the [`Next`] operation to submit. At most one operation per connection is
//! in flight, so a connection's buffers are either here or inside that one
//! operation, never both.
//!
//! ```text
//!  accept ──► Peeking ──TLS/h2c──► (handed to the fallback)
//!                │
//!                ▼
//!   ┌────► ReadingHead ──error──► SendingHead{close} ──► Lingering ──► closed
//!   │            │
//!   │            ├─ GET/HEAD/errors ─► SendingHead ──file body──► SendingFile ─┐
//!   │            │                                                            │
//!   │            └─ PUT ─► [SendingHead{100}] ─► ReadingBody ─► SendingHead ──┤
//!   └──────────────────────────── keep-alive ◄─────────────────────────────────┘
//! ```

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::app::{App, Decision, PutSink, Reply, ReplyBody, RequestInfo};
use crate::config::ConnTimeouts;
use crate::http1::{self, BodyDecoder, Framing, Limits, Linger, LingerLimits, LingerStep, Status};
use crate::route::route_label;
use crate::store::{Artifact, OpenCache};

/// The first bytes of an HTTP/2 prior-knowledge connection.
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";
/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// Wait before peeking again at a first segment too short to classify, ms.
pub const PEEK_AGAIN_MS: u64 = 5;
/// Largest body chunk the connection reads at once while receiving a PUT,
/// in bytes. Heads are read into at most `head_bytes_max`.
pub const BODY_READ_BYTES: usize = 256 * 1024;
/// Largest artifact body sent inline with its head: one `pread` from the
/// page cache into the out buffer and one `send`, instead of a send, two
/// splices and their completions. Measured in docs/benchmarks.md.
pub const INLINE_BODY_BYTES_MAX: u64 = 64 * 1024;
/// Most bytes of out buffer a connection keeps between requests: an inline
/// body and its head. A larger in-memory answer (a listing page for a peer,
/// `/metrics`) is sent from a buffer freed once it is sent, so an idle
/// keep-alive connection holds what the configuration says, not the largest
/// answer it ever sent.
pub const OUT_BUF_KEEP_BYTES: usize = INLINE_BODY_BYTES_MAX as usize + 4096;
/// Cold opens one request may wait for before its open is done on the
/// engine thread after all: a page evicted again between the opener's read
/// and the ring's second look must not bounce a request for ever.
pub const COLD_OPENS_PER_REQUEST_MAX: u8 = 2;

/// Per-connection limits, from the config.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    pub head: Limits,
    /// Header, idle, send and body timeouts, as every front applies them.
    pub timeouts: ConnTimeouts,
    /// The lingering close after a response that closes the connection
    /// (see [`http1::Linger`] for why).
    pub linger: LingerLimits,
}

/// The operation the engine must submit next for this connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// `recv` with `MSG_PEEK` into [`Conn::peek_buf_bytes`] bytes; report
    /// with [`Conn::on_peek`].
    Peek,
    /// Peek again after [`PEEK_AGAIN_MS`]: the bytes so far (`P`, `PR`,
    /// `PRI`) could begin the h2 preface or an HTTP/1 `PUT`. A peek returns
    /// at once while any byte is queued, so waiting on the socket would spin.
    PeekAgain,
    /// `recv` into the spare capacity of the buffer from
    /// [`Conn::take_read_buf`]; report with [`Conn::on_recv`].
    Recv,
    /// `send` the buffer from [`Conn::take_out_buf`] from its offset
    /// [`Conn::out_sent`]; `more` says a file body follows (`MSG_MORE`).
    /// Report with [`Conn::on_sent`].
    Send { more: bool },
    /// Move `len` bytes of [`Conn::file`] at `offset` to the socket (splice
    /// or copy); report progress with [`Conn::on_file_sent`].
    SendFile { offset: u64, len: u64 },
    /// The first bytes are TLS or HTTP/2: give the socket, untouched, to the
    /// fallback.
    Handoff,
    /// Shut down the write side and keep reading (discarding) until the
    /// client closes or the linger budget ends; report with
    /// [`Conn::on_recv`].
    Linger,
    /// The body is in: publish the upload from [`Conn::take_publish`] off
    /// the engine thread (it may fsync) and report with
    /// [`Conn::on_published`].
    Publish,
    /// The artifact the request names is cold (its path or header would
    /// come from the disk): open it off the engine thread, then call
    /// [`Conn::on_opened`], which decides the request again.
    Open { namespace: String, key: String },
    /// Wait for the read-through of a miss (the engine asks
    /// [`App::read_through`] with a waiter); report with
    /// [`Conn::on_fetched`].
    Fetch { namespace: String, key: String },
    /// A peer's replicated write: its body is received, hashed and written
    /// by a background thread ([`Conn::take_body_handoff`] and
    /// [`Conn::take_publish`] hand it over with a duplicate of the socket);
    /// the reply comes back as a published upload would
    /// ([`Conn::on_published`]). [`Conn::receive_here`] takes it back when
    /// no background thread can.
    ReceiveInBackground,
    /// Close the socket.
    Close,
}

/// The part of a request body that arrived with its head, and how much is
/// left, for a body received off the engine thread.
#[derive(Debug)]
pub struct BodyHandoff {
    /// Body bytes already read (they came with the head).
    pub prefix: Vec<u8>,
    /// Body bytes still to read from the socket (`Content-Length` framing).
    pub remaining: u64,
    decoder: BodyDecoder,
}

/// What the connection waits on.
#[derive(Debug)]
enum State {
    Peeking,
    ReadingHead,
    /// Sending `out`; what comes after it.
    SendingHead(AfterSend),
    SendingFile {
        offset: u64,
        remaining: u64,
    },
    /// Receiving a PUT body. Boxed: large, and one per upload.
    ReadingBody(Box<BodyRx>),
    /// The body is in; the upload is being published (verified, linked,
    /// fsynced) by the core's publisher thread.
    Publishing,
    /// Discarding input after a closing response, write side shut down,
    /// until the client closes or a [`LingerLimits`] bound is reached.
    Lingering(Linger),
    Closed,
}

/// A PUT body being received: where it goes and how it is framed.
#[derive(Debug)]
struct BodyRx {
    sink: PutSink,
    decoder: BodyDecoder,
}

#[derive(Debug)]
enum AfterSend {
    /// The response is complete: next request, or close.
    Done,
    /// The head is out; the body comes from the file.
    File { offset: u64, len: u64 },
    /// `100 Continue` is out; read the body.
    Body(Box<BodyRx>),
}

/// A finished response, for the engine's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

/// One connection's protocol state.
pub struct Conn {
    app: Arc<App>,
    /// The engine thread's open-file cache, shared by its connections.
    files: Rc<RefCell<OpenCache>>,
    limits: ConnLimits,
    state: State,
    /// Bytes received and not yet consumed: `read_buf[..]` (its length is
    /// the filled part). `None` while a recv owns it.
    read_buf: Option<Vec<u8>>,
    /// Response bytes to send; `None` while a send owns it.
    out_buf: Option<Vec<u8>>,
    out_sent: usize,
    /// The artifact whose bytes are being sent.
    file: Option<Artifact>,
    /// A complete upload waiting to be taken for publishing.
    publish: Option<PutSink>,
    /// Close after the current response.
    close_after: bool,
    /// The request being answered (for counters).
    current: Option<Finished>,
    /// Set when a head started arriving (for the 408 deadline) and when
    /// the connection went idle (for the keep-alive deadline).
    deadline: Instant,
    timed_out: bool,
    /// When the current request's head was complete (for TTFB).
    head_at: Instant,
    /// Responses completed on this connection.
    pub responses: u64,
    /// Cold opens the current request has waited for.
    cold_opens: u8,
    /// The current request already waited for a read-through fetch: a
    /// second miss is the answer (404), not another fetch.
    fetched: bool,
    /// The current request is public pressure until its response is out.
    public: Option<crate::pressure::InFlight>,
    /// The engine starts write-back of upload bodies itself
    /// ([`Conn::take_writeback`]).
    engine_writeback: bool,
    /// The kernel's receive time of the current request's first bytes, when
    /// the engine sampled it ([`Conn::note_arrival`]).
    arrival: Option<sluice_uring::RxStamp>,
    /// A public read's arrival, measured when its response's first bytes
    /// are handed to the kernel.
    answer_arrival: Option<sluice_uring::RxStamp>,
    /// A body being received off the engine thread.
    handoff: Option<BodyHandoff>,
}

impl Conn {
    /// The engine starts the write-back of upload bodies itself, as ring
    /// operations, from [`Conn::take_writeback`]; without this the store
    /// starts it with a syscall on the thread that writes the body.
    pub fn with_engine_writeback(mut self) -> Conn {
        self.engine_writeback = true;
        self
    }

    /// While an upload's body arrives: a range of its file whose write-back
    /// should start now (`fd`, offset, length). See `store::WRITEBACK_BYTES`.
    pub fn take_writeback(&mut self) -> Option<(std::os::fd::OwnedFd, u64, u64)> {
        match &mut self.state {
            State::ReadingBody(rx) => rx.sink.take_writeback(),
            _ => None,
        }
    }

    pub fn new(
        app: Arc<App>,
        files: Rc<RefCell<OpenCache>>,
        limits: ConnLimits,
        now: Instant,
    ) -> Conn {
        Conn {
            app,
            files,
            limits,
            state: State::Peeking,
            read_buf: Some(Vec::new()),
            out_buf: Some(Vec::new()),
            out_sent: 0,
            file: None,
            publish: None,
            close_after: false,
            current: None,
            deadline: now + Duration::from_millis(limits.timeouts.header_read_timeout_ms),
            timed_out: false,
            head_at: now,
            responses: 0,
            cold_opens: 0,
            fetched: false,
            public: None,
            engine_writeback: false,
            arrival: None,
            answer_arrival: None,
            handoff: None,
        }
    }

    /// The kernel received the bytes the next receive completes with at
    /// `stamp`: the engine asked for the stamp because the connection was
    /// waiting for a new request ([`Conn::is_idle`] when it issued the
    /// receive), so it is the request's arrival.
    pub fn note_arrival(&mut self, stamp: sluice_uring::RxStamp) {
        self.arrival = Some(stamp);
    }

    /// The body of a peer's write to receive off the engine thread, after
    /// [`Next::ReceiveInBackground`].
    pub fn take_body_handoff(&mut self) -> Option<BodyHandoff> {
        self.handoff.take()
    }

    /// No background thread took the body handed over with `sink`: receive
    /// it here after all, as any upload.
    pub fn receive_here(&mut self, handoff: BodyHandoff, sink: PutSink, now: Instant) -> Next {
        if !matches!(self.state, State::Publishing) {
            return self.close();
        }
        let mut buf = self.read_buf.take().unwrap_or_default();
        // The prefix was taken from the front of the buffer, which held
        // nothing after it (the body's bytes were all it had).
        let mut rest = handoff.prefix;
        rest.extend_from_slice(&buf);
        buf.clear();
        buf.extend_from_slice(&rest);
        self.read_buf = Some(buf);
        self.state = State::ReadingBody(Box::new(BodyRx {
            sink,
            decoder: handoff.decoder,
        }));
        self.read_body(now)
    }

    /// How many bytes the first, peeking recv should ask for.
    pub fn peek_buf_bytes() -> usize {
        H2_PREFACE_START.len()
    }

    /// When the engine must call [`Conn::on_deadline`] unless the pending
    /// operation completes first.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The deadline passed while waiting for input: the engine cancels the
    /// pending recv and reports its completion (`ECANCELED`) as usual, then
    /// this connection answers 408 (head incomplete) or closes (idle).
    pub fn on_deadline(&mut self) {
        self.timed_out = true;
    }

    /// True while a response waits for the client to take it (a send, a
    /// splice or its `POLLOUT` wait is pending): the deadline is then
    /// `send_timeout_ms` after the last progress, and passing it closes.
    pub fn waits_for_output(&self) -> bool {
        matches!(
            self.state,
            State::SendingHead(_) | State::SendingFile { .. }
        )
    }

    /// True while the connection waits for the client (a recv is pending),
    /// which is when a deadline applies.
    pub fn waits_for_input(&self) -> bool {
        matches!(
            self.state,
            State::Peeking | State::ReadingHead | State::ReadingBody(_) | State::Lingering(_)
        )
    }

    /// The buffer a `Recv` fills: received bytes stay in `..len()`, the
    /// kernel writes into the spare capacity, which is at least one byte.
    pub fn take_read_buf(&mut self) -> Vec<u8> {
        let mut buf = self.read_buf.take().unwrap_or_default();
        let want = match self.state {
            State::ReadingBody(_) | State::Lingering(_) => BODY_READ_BYTES,
            _ => self.limits.head.head_bytes_max,
        };
        if buf.capacity() < want {
            buf.reserve_exact(want - buf.len());
        }
        buf
    }

    /// The buffer a `Send` sends from `out_sent()`.
    pub fn take_out_buf(&mut self) -> Vec<u8> {
        self.out_buf.take().unwrap_or_default()
    }

    /// Bytes of the out buffer already sent.
    pub fn out_sent(&self) -> usize {
        self.out_sent
    }

    /// The artifact a `SendFile` reads from, handed to the engine once for
    /// the whole body (the engine keeps the fd until the body is out).
    pub fn take_file(&mut self) -> Option<Artifact> {
        self.file.take()
    }

    /// The complete upload after [`Next::Publish`].
    pub fn take_publish(&mut self) -> Option<PutSink> {
        self.publish.take()
    }

    /// The upload taken after [`Next::Publish`] was published (or refused)
    /// with this reply: send it, then go on with the next request.
    pub fn on_published(&mut self, reply: Reply) -> Next {
        if !matches!(self.state, State::Publishing) {
            return self.close();
        }
        let (route, method) = self
            .current
            .map_or(("none", "OTHER"), |f| (f.route, f.method));
        self.respond(reply, route, method)
    }

    /// The cold open asked for by [`Next::Open`] is done: decide the request
    /// again (its head is still in the read buffer).
    pub fn on_opened(&mut self, now: Instant) -> Next {
        if !matches!(self.state, State::ReadingHead) {
            return self.close();
        }
        self.cold_opens = self.cold_opens.saturating_add(1);
        self.read_head(now)
    }

    /// The read-through asked for by [`Next::Fetch`] has ended (found, or
    /// not): decide the request again; a second miss answers 404.
    pub fn on_fetched(&mut self, now: Instant) -> Next {
        if !matches!(self.state, State::ReadingHead) {
            return self.close();
        }
        self.fetched = true;
        self.read_head(now)
    }

    /// The opener could not take the cold open: decide the request again,
    /// opening the artifact on the engine thread this once.
    pub fn open_here(&mut self, now: Instant) -> Next {
        self.cold_opens = COLD_OPENS_PER_REQUEST_MAX;
        self.on_opened(now)
    }

    /// True until the first bytes have been classified.
    pub fn is_peeking(&self) -> bool {
        matches!(self.state, State::Peeking)
    }

    /// True when no request is in progress and none has started arriving:
    /// such a connection can be closed at shutdown without losing work.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Peeking | State::ReadingHead) && self.read_len() == 0
    }

    /// The peeking recv completed with these bytes (none: the client closed).
    pub fn on_peek(&mut self, peeked: &[u8], now: Instant) -> Next {
        if self.timed_out || peeked.is_empty() {
            return self.close();
        }
        if peeked[0] == TLS_HANDSHAKE || peeked.starts_with(b"PRI ") {
            self.state = State::Closed;
            return Next::Handoff;
        }
        if peeked.len() < H2_PREFACE_START.len() && H2_PREFACE_START.starts_with(peeked) {
            // Too few bytes to tell; the header-read deadline bounds the wait.
            return Next::PeekAgain;
        }
        self.state = State::ReadingHead;
        self.deadline = now + Duration::from_millis(self.limits.timeouts.header_read_timeout_ms);
        Next::Recv
    }

    /// A recv completed: `buf` is the buffer from `take_read_buf` with the
    /// received bytes appended (`received` of them; 0 means the client
    /// closed its side), or `Err` with the errno.
    pub fn on_recv(&mut self, buf: Vec<u8>, received: Result<usize, i32>, now: Instant) -> Next {
        self.read_buf = Some(buf);
        let received = match received {
            Ok(n) => n,
            Err(errno) if errno == libc::EINTR || errno == libc::EAGAIN => {
                return self.resume_recv()
            }
            Err(_) if self.timed_out => return self.on_timed_out(),
            Err(_) => return self.close(),
        };
        if self.timed_out {
            return self.on_timed_out();
        }
        if let State::Lingering(linger) = &mut self.state {
            let step = linger.on_read(received, now);
            if let Some(buf) = self.read_buf.as_mut() {
                buf.clear();
            }
            return self.linger_step(step);
        }
        if received == 0 {
            // The client closed. A PUT in progress is dropped here: its
            // sink removes the temporary file, nothing becomes visible.
            if matches!(self.state, State::ReadingBody(_)) {
                self.app.metrics.count_put_aborted();
            }
            return self.close();
        }
        if matches!(self.state, State::ReadingHead) && self.read_len() == received {
            // First bytes of a new head: the header-read clock starts now.
            self.deadline =
                now + Duration::from_millis(self.limits.timeouts.header_read_timeout_ms);
        }
        self.advance(now)
    }

    /// A send completed with `sent` bytes (or an errno).
    pub fn on_sent(&mut self, buf: Vec<u8>, sent: Result<usize, i32>, now: Instant) -> Next {
        self.out_buf = Some(buf);
        let sent = match sent {
            Ok(n) => n,
            Err(errno) if errno == libc::EINTR || errno == libc::EAGAIN => {
                return self.resume_send()
            }
            Err(_) => return self.close(),
        };
        self.out_sent += sent;
        if sent > 0 {
            self.deadline = now + Duration::from_millis(self.limits.timeouts.send_timeout_ms);
            if let Some(arrival) = self.answer_arrival.take() {
                let latency = arrival.age_at(std::time::SystemTime::now());
                self.app.metrics.pressure.answered_after_arrival(latency);
            }
        }
        if self.out_sent < self.out_len() {
            // Short send: resume from where the kernel stopped.
            return self.resume_send();
        }
        self.out_sent = 0;
        if let Some(out) = self.out_buf.as_mut() {
            out.clear();
        }
        let state = std::mem::replace(&mut self.state, State::Closed);
        match state {
            State::SendingHead(AfterSend::File { offset, len }) => {
                self.state = State::SendingFile {
                    offset,
                    remaining: len,
                };
                Next::SendFile { offset, len }
            }
            State::SendingHead(AfterSend::Body(body)) => {
                self.state = State::ReadingBody(body);
                self.advance(now)
            }
            State::SendingHead(AfterSend::Done) => self.response_done(now),
            other => {
                self.state = other;
                self.close()
            }
        }
    }

    /// Part of a file body left: `moved` bytes (0 or an errno: the file or
    /// the socket failed; the response cannot be completed, so the
    /// connection closes, which the client sees as a short body).
    pub fn on_file_sent(&mut self, moved: Result<u64, i32>, now: Instant) -> Next {
        let State::SendingFile { offset, remaining } = &mut self.state else {
            return self.close();
        };
        match moved {
            Ok(n) if n > 0 && n <= *remaining => {
                *offset += n;
                *remaining -= n;
                self.deadline = now + Duration::from_millis(self.limits.timeouts.send_timeout_ms);
                if *remaining == 0 {
                    self.file = None;
                    self.response_done(now)
                } else {
                    Next::SendFile {
                        offset: *offset,
                        len: *remaining,
                    }
                }
            }
            _ => {
                self.file = None;
                self.close()
            }
        }
    }

    fn read_len(&self) -> usize {
        self.read_buf.as_ref().map_or(0, Vec::len)
    }

    fn out_len(&self) -> usize {
        self.out_buf.as_ref().map_or(0, Vec::len)
    }

    fn resume_recv(&mut self) -> Next {
        match self.state {
            State::Peeking => Next::Peek,
            State::Lingering(_) => Next::Linger,
            _ => Next::Recv,
        }
    }

    fn resume_send(&self) -> Next {
        let more = matches!(self.state, State::SendingHead(AfterSend::File { .. }));
        Next::Send { more }
    }

    /// Count the current response (once).
    fn finish_current(&mut self) {
        self.public = None;
        self.answer_arrival = None;
        if let Some(done) = self.current.take() {
            if done.status != 0 {
                self.app.record(done.route, done.method, done.status);
            }
        }
    }

    fn close(&mut self) -> Next {
        self.finish_current();
        self.state = State::Closed;
        self.file = None;
        Next::Close
    }

    fn linger_step(&mut self, step: LingerStep) -> Next {
        match step {
            LingerStep::ReadUntil(deadline) => {
                self.deadline = deadline;
                Next::Linger
            }
            LingerStep::Close => self.close(),
        }
    }

    fn on_timed_out(&mut self) -> Next {
        self.timed_out = false;
        match self.state {
            State::ReadingHead if self.read_len() > 0 => self.respond(
                Reply::error(408, "the request head did not arrive in time").closing(),
                "none",
                "OTHER",
            ),
            // A body that stalls past body_read_timeout_ms: answer as the fallback does. The
            // sink goes with the old state, so nothing half-written becomes visible.
            State::ReadingBody(_) => {
                self.state = State::Closed;
                self.app.metrics.count_put_aborted();
                let (route, method) = self
                    .current
                    .map_or(("none", "OTHER"), |f| (f.route, f.method));
                self.respond(
                    Reply::error(408, "the request body stalled").closing(),
                    route,
                    method,
                )
            }
            _ => self.close(),
        }
    }

    /// The response is out: read the next request (pipelined bytes may be
    /// waiting already), or close.
    fn response_done(&mut self, now: Instant) -> Next {
        self.responses += 1;
        self.finish_current();
        if self.close_after {
            // Input may still be arriving (an unread body): linger so the
            // client reads our answer instead of a reset.
            let Some((linger, step)) = Linger::start(self.limits.linger, now) else {
                return self.close();
            };
            self.state = State::Lingering(linger);
            if let Some(buf) = self.read_buf.as_mut() {
                buf.clear();
            }
            return self.linger_step(step);
        }
        self.state = State::ReadingHead;
        self.deadline = now + Duration::from_millis(self.limits.timeouts.idle_timeout_ms);
        // A PUT grew the buffer to BODY_READ_BYTES; back between requests it
        // returns to head_bytes_max (or what pipelined bytes need), so the
        // memory of idle keep-alive connections is bounded by configuration,
        // not by what they once uploaded.
        let head_max = self.limits.head.head_bytes_max;
        if let Some(buf) = self.read_buf.as_mut() {
            if buf.capacity() > head_max {
                buf.shrink_to(head_max);
            }
        }
        if let Some(out) = self.out_buf.as_mut() {
            if out.capacity() > OUT_BUF_KEEP_BYTES {
                *out = Vec::new();
            }
        }
        if self.read_len() > 0 {
            self.deadline =
                now + Duration::from_millis(self.limits.timeouts.header_read_timeout_ms);
            return self.advance(now);
        }
        Next::Recv
    }

    /// Act on the bytes in the read buffer.
    fn advance(&mut self, now: Instant) -> Next {
        match self.state {
            State::ReadingHead => self.read_head(now),
            State::ReadingBody(_) => self.read_body(now),
            _ => self.close(),
        }
    }

    fn read_head(&mut self, now: Instant) -> Next {
        let mut buf = self.read_buf.take().unwrap_or_default();
        let (next, consumed) = self.decide(&buf, now);
        buf.drain(..consumed);
        self.read_buf = Some(buf);
        match next {
            Some(next) => next,
            None => self.read_body(now),
        }
    }

    /// Parse the head in `buf` and turn the application's decision into
    /// the next operation (`None`: go on reading the body). Returns how
    /// many bytes of `buf` the head took.
    fn decide(&mut self, buf: &[u8], now: Instant) -> (Option<Next>, usize) {
        let head = match http1::parse_head(buf, &self.limits.head) {
            Ok(Status::Partial) => {
                if buf.len() >= self.limits.head.head_bytes_max {
                    let reply = Reply::error(431, "request head too large").closing();
                    let method = head_method_label(buf);
                    return (Some(self.respond(reply, "none", method)), 0);
                }
                return (Some(Next::Recv), 0);
            }
            Ok(Status::Complete(head)) => head,
            Err(err) => {
                let reply = Reply::error(err.status(), err.reason()).closing();
                let method = head_method_label(buf);
                return (Some(self.respond(reply, "none", method)), 0);
            }
        };
        // A request decided again after a cold open keeps the time its head
        // first arrived: the wait for the disk is part of its TTFB.
        // So is the wait for a read-through.
        if self.cold_opens == 0 && !self.fetched {
            self.head_at = now;
        }
        let head_len = head.head_len();
        let (content_length, chunked) = match head.framing() {
            Framing::None => (None, false),
            Framing::Length(n) => (Some(n), false),
            Framing::Chunked => (None, true),
        };
        let info = RequestInfo {
            method: head.method_str(),
            path: head.path(),
            query: head.query(),
            headers: Some(&head),
            authorization: head.header("authorization"),
            range: head.header("range"),
            if_none_match: head.header("if-none-match"),
            if_match: head.header("if-match"),
            if_range: head.header("if-range"),
            content_length,
            chunked,
            read_through: !self.fetched,
        };
        let route = route_label(info.method, info.path);
        let method = method_label(info.method);
        if crate::pressure::is_public_route(route) && self.public.is_none() {
            self.public = Some(self.app.metrics.pressure.begin());
        }
        let head_only = info.method == "HEAD";
        let expect_continue = head.expect_continue();
        let framing = head.framing();
        self.close_after = !head.keep_alive() || self.app.is_closing();
        let decision = {
            let mut files = self.files.borrow_mut();
            files.nowait = self.cold_opens < COLD_OPENS_PER_REQUEST_MAX;
            self.app.handle_with(&info, Some(&mut files))
        };
        let mut decision = decision;
        if let Decision::Reply(reply) = &mut decision {
            if !head_only && self.cold_opens < COLD_OPENS_PER_REQUEST_MAX {
                // A small body is read here, from the page cache only. One
                // that is not there goes to the opener thread like a cold
                // header, never to io-wq: there it would wait behind this
                // core's 1 MiB cold chunks, and a hot small request must not
                // queue behind a cold large one (bench/cold: an evicted 4 KiB
                // artifact behind four cold streams made hot p90 440 ms).
                if let Some(target) = read_small_body(reply, &info) {
                    decision = Decision::Cold {
                        namespace: target.0,
                        key: target.1,
                    };
                }
            }
        }
        if let Decision::Cold { namespace, key } = decision {
            // Nothing of the head is consumed: it is decided again once the
            // artifact is open.
            return (Some(Next::Open { namespace, key }), 0);
        }
        if let Decision::Fetch { namespace, key } = decision {
            // Likewise once the read-through of the miss has ended.
            return (Some(Next::Fetch { namespace, key }), 0);
        }
        self.cold_opens = 0;
        self.fetched = false;
        let next = match decision {
            Decision::Cold { .. } | Decision::Fetch { .. } => Some(self.close()),
            Decision::Reply(reply) => Some(self.respond_head_only(reply, route, method, head_only)),
            Decision::ReceiveBody(mut sink) => {
                match BodyDecoder::new(framing, sink.body_bytes_max()) {
                    Err(err) => {
                        let reply = Reply::error(err.status(), "request body refused").closing();
                        Some(self.respond(sink.refuse(reply), route, method))
                    }
                    Ok(decoder) => {
                        self.current = Some(Finished {
                            route,
                            method,
                            status: 0,
                        });
                        if let (true, false, Framing::Length(len)) =
                            (sink.in_background(), expect_continue, framing)
                        {
                            // A peer's write: the body's bytes that came with
                            // the head go along; the rest is read by the
                            // background thread, never past the body.
                            let rest = &buf[head_len.min(buf.len())..];
                            let have = rest.len().min(usize::try_from(len).unwrap_or(usize::MAX));
                            self.handoff = Some(BodyHandoff {
                                prefix: rest[..have].to_vec(),
                                remaining: len - have as u64,
                                decoder,
                            });
                            self.publish = Some(sink);
                            self.state = State::Publishing;
                            return (Some(Next::ReceiveInBackground), head_len + have);
                        }
                        if self.engine_writeback {
                            sink.defer_writeback();
                        }
                        if expect_continue {
                            let out = self.out_buf.get_or_insert_with(Vec::new);
                            out.clear();
                            out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                            self.out_sent = 0;
                            self.state = State::SendingHead(AfterSend::Body(Box::new(BodyRx {
                                sink,
                                decoder,
                            })));
                            Some(Next::Send { more: false })
                        } else {
                            self.state = State::ReadingBody(Box::new(BodyRx { sink, decoder }));
                            self.deadline = now
                                + Duration::from_millis(self.limits.timeouts.body_read_timeout_ms);
                            None
                        }
                    }
                }
            }
        };
        (next, head_len)
    }

    fn read_body(&mut self, now: Instant) -> Next {
        let State::ReadingBody(mut rx) = std::mem::replace(&mut self.state, State::Closed) else {
            return self.close();
        };
        let BodyRx { sink, decoder } = &mut *rx;
        let mut buf = self.read_buf.take().unwrap_or_default();
        let mut at = 0;
        let outcome = loop {
            if at == buf.len() && !decoder.is_done() {
                break None;
            }
            match decoder.decode(&buf[at..]) {
                Ok(step) => {
                    let data = &buf[at + step.data.start..at + step.data.end];
                    if !data.is_empty() {
                        if let Err(reply) = sink.write(data) {
                            break Some(Err(reply));
                        }
                    }
                    at += step.consumed;
                    if step.done {
                        break Some(Ok(()));
                    }
                    if step.consumed == 0 {
                        break None;
                    }
                }
                Err(err) => {
                    let reply = Reply::error(err.status(), "malformed request body").closing();
                    break Some(Err(sink.refuse(reply)));
                }
            }
        };
        buf.drain(..at);
        self.read_buf = Some(buf);
        let (route, method) = self
            .current
            .map_or(("none", "OTHER"), |f| (f.route, f.method));
        match outcome {
            None => {
                self.state = State::ReadingBody(rx);
                self.deadline =
                    now + Duration::from_millis(self.limits.timeouts.body_read_timeout_ms);
                Next::Recv
            }
            Some(Ok(())) => {
                // Publishing may fsync: the engine hands it to a publisher
                // thread and reports back (see docs/architecture.md).
                let BodyRx { sink, .. } = *rx;
                self.publish = Some(sink);
                self.state = State::Publishing;
                Next::Publish
            }
            Some(Err(reply)) => {
                drop(rx);
                self.app.metrics.count_put_aborted();
                self.respond(reply, route, method)
            }
        }
    }

    fn respond(&mut self, reply: Reply, route: &'static str, method: &'static str) -> Next {
        self.respond_head_only(reply, route, method, false)
    }

    /// Encode `reply`'s head (and a small body) into the out buffer and
    /// start sending it.
    fn respond_head_only(
        &mut self,
        mut reply: Reply,
        route: &'static str,
        method: &'static str,
        head_only: bool,
    ) -> Next {
        if reply.close {
            self.close_after = true;
        }
        let close = self.close_after;
        let ttfb = self.head_at.elapsed();
        self.app.metrics.record_ttfb(ttfb);
        let arrival = self.arrival.take();
        if self.public.is_some() && matches!(method, "GET" | "HEAD") {
            self.app.metrics.pressure.head_ready(ttfb);
            // Measured once the first bytes are with the kernel (`on_sent`).
            self.answer_arrival = arrival;
        }
        self.deadline =
            Instant::now() + Duration::from_millis(self.limits.timeouts.send_timeout_ms);
        self.current = Some(Finished {
            route,
            method,
            status: reply.status,
        });
        // hyper adds Date on the fallback; the ring matches it.
        reply.headers.push(("date", http1::http_date_now()));
        let out = self.out_buf.get_or_insert_with(Vec::new);
        out.clear();
        encode_reply_head(&mut reply, close, out);
        self.out_sent = 0;
        let after = match reply.body {
            ReplyBody::Empty => AfterSend::Done,
            ReplyBody::Bytes(bytes) => append_body(&self.app, out, &bytes, head_only),
            // A hot-set entry (at most 64 KiB): copied behind the head, so head and body
            // leave in one send, as a small body read from the page cache does, but
            // without the read.
            ReplyBody::Memory(bytes) => append_body(&self.app, out, &bytes, head_only),
            ReplyBody::File {
                artifact,
                offset,
                len,
            } => {
                let inline = if head_only || len == 0 {
                    None
                } else if len <= INLINE_BODY_BYTES_MAX {
                    Some(inline_read(&artifact, out, offset, len))
                } else {
                    Some(InlineRead::Cold)
                };
                match inline {
                    None => AfterSend::Done,
                    Some(InlineRead::Done) => {
                        self.app
                            .metrics
                            .add_response_bytes(crate::metrics::BytePath::RingCopy, len);
                        AfterSend::Done
                    }
                    Some(InlineRead::Failed) => {
                        // A file cut short behind the store's back: answer
                        // 500 and close instead of a short body.
                        out.clear();
                        self.close_after = true;
                        let mut reply = Reply::error(500, "artifact could not be read").closing();
                        encode_reply_head(&mut reply, true, out);
                        if let ReplyBody::Bytes(bytes) = &reply.body {
                            out.extend_from_slice(bytes);
                        }
                        if let Some(current) = self.current.as_mut() {
                            current.status = 500;
                        }
                        AfterSend::Done
                    }
                    // Large, or small but not all in the page cache: the
                    // engine moves it, reading cold parts through the ring.
                    Some(InlineRead::Cold) => {
                        self.file = Some(artifact);
                        AfterSend::File { offset, len }
                    }
                }
            }
        };
        let more = matches!(after, AfterSend::File { .. });
        self.state = State::SendingHead(after);
        Next::Send { more }
    }
}

/// Append a body held in memory behind the head in `out` (unless the request was a HEAD).
fn append_body(app: &App, out: &mut Vec<u8>, body: &[u8], head_only: bool) -> AfterSend {
    if !head_only {
        out.extend_from_slice(body);
        app.metrics
            .add_response_bytes(crate::metrics::BytePath::RingCopy, body.len() as u64);
    }
    AfterSend::Done
}

/// If `reply` carries a small artifact body, read it into memory from the
/// page cache (the reply then carries the bytes). When the page cache does
/// not hold it, returns the artifact's namespace and key to open it
/// elsewhere; the reply is left as it is otherwise.
fn read_small_body(reply: &mut Reply, info: &RequestInfo<'_>) -> Option<(String, String)> {
    let ReplyBody::File {
        artifact,
        offset,
        len,
    } = &reply.body
    else {
        return None;
    };
    if *len == 0 || *len > INLINE_BODY_BYTES_MAX {
        return None;
    }
    let mut body = Vec::new();
    match inline_read(artifact, &mut body, *offset, *len) {
        InlineRead::Done => {
            reply.body = ReplyBody::Bytes(body);
            None
        }
        InlineRead::Cold => crate::app::artifact_target(info),
        // Answered (500) where the reply is sent, as before.
        InlineRead::Failed => None,
    }
}

/// How an inline body read went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InlineRead {
    /// The body follows the head in the out buffer.
    Done,
    /// Part of it is not in the page cache: nothing was added.
    Cold,
    /// The file is shorter than its header says, or unreadable.
    Failed,
}

/// Append `len` bytes of `artifact` at `offset` to `out` from the page
/// cache only (`RWF_NOWAIT`): an engine thread never waits for the disk.
fn inline_read(artifact: &Artifact, out: &mut Vec<u8>, offset: u64, len: u64) -> InlineRead {
    let start = out.len();
    out.resize(start + len as usize, 0);
    let read = rustix::io::preadv2(
        &*artifact.file,
        &mut [std::io::IoSliceMut::new(&mut out[start..])],
        offset,
        rustix::io::ReadWriteFlags::NOWAIT,
    );
    let outcome = match read {
        Ok(n) if n as u64 == len => return InlineRead::Done,
        // Short with NOWAIT: the rest is not cached, or the file ends early;
        // the engine's file path tells the two apart (EOF answers an error).
        Ok(_) | Err(rustix::io::Errno::AGAIN | rustix::io::Errno::OPNOTSUPP) => InlineRead::Cold,
        Err(_) => InlineRead::Failed,
    };
    out.truncate(start);
    outcome
}

/// The metrics label for a method token.
pub fn method_label(method: &str) -> &'static str {
    crate::metrics::method_label(method)
}

/// The metrics label for the method of a head that failed to parse or grew
/// too large: its method once the request line got past the method token
/// (a 414, or a 431 after the request line), `OTHER` before that.
fn head_method_label(buf: &[u8]) -> &'static str {
    // Empty lines before a request line are allowed (RFC 9112 §2.2).
    let start = buf
        .iter()
        .position(|&c| c != b'\r' && c != b'\n')
        .unwrap_or(buf.len());
    let line = &buf[start..];
    let Some(end) = line.iter().position(|&c| c == b' ') else {
        return "OTHER";
    };
    std::str::from_utf8(&line[..end]).map_or("OTHER", method_label)
}

/// Write the status line and headers of `reply`, ending with the blank
/// line, through the HTTP/1 core's encoder (which also guards against
/// header injection). Takes the headers out of `reply`.
pub fn encode_reply_head(reply: &mut Reply, close: bool, out: &mut Vec<u8>) {
    let head = http1::ResponseHead {
        status: reply.status,
        headers: std::mem::take(&mut reply.headers),
        content_length: reply.content_length,
        close,
    };
    http1::encode_response_head(&head, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreConfig};

    /// A connection on an app over a fresh store in `dir`, already past
    /// the peek (its first bytes begin with `first`).
    fn conn(dir: &std::path::Path, first: &[u8], now: Instant) -> (Conn, Arc<App>) {
        let store = Store::open(StoreConfig {
            data_dir: dir.to_path_buf(),
            ..StoreConfig::default()
        })
        .expect("store");
        let app = App::new(&crate::config::Config::default(), store);
        let files = Rc::new(RefCell::new(OpenCache::new(4)));
        let limits = ConnLimits {
            head: Limits::default(),
            timeouts: crate::config::ConnTimeouts {
                header_read_timeout_ms: 1000,
                idle_timeout_ms: 1000,
                send_timeout_ms: 1000,
                body_read_timeout_ms: 1000,
            },
            linger: LingerLimits::default(),
        };
        let mut conn = Conn::new(Arc::clone(&app), files, limits, now);
        assert_eq!(conn.on_peek(first, now), Next::Recv);
        (conn, app)
    }

    /// Feeds `bytes` to the connection as one recv (the kernel's part).
    fn recv(conn: &mut Conn, bytes: &[u8], now: Instant) -> Next {
        let mut buf = conn.take_read_buf();
        buf.extend_from_slice(bytes);
        conn.on_recv(buf, Ok(bytes.len()), now)
    }

    /// Completes a whole send of the out buffer; returns it and what follows.
    fn send_all(conn: &mut Conn, now: Instant) -> (Vec<u8>, Next) {
        let buf = conn.take_out_buf();
        let copy = buf.clone();
        let n = buf.len();
        (copy, conn.on_sent(buf, Ok(n), now))
    }

    /// A PUT goes ReadingBody -> Publishing (nothing answered until the
    /// publisher's reply comes back) -> SendingHead -> ReadingHead, and its
    /// 256 KiB body buffer shrinks back to `head_bytes_max` for the idle
    /// keep-alive wait (it stayed at 256 KiB per connection before).
    #[test]
    fn put_publishes_through_the_engine_then_the_buffer_shrinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        let (mut conn, app) = conn(dir.path(), b"PUT ", now);
        let head_max = Limits::default().head_bytes_max;

        let body = vec![7u8; 300_000];
        let head = format!(
            "PUT /v1/artifacts/ns/big HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        assert_eq!(recv(&mut conn, head.as_bytes(), now), Next::Recv);
        let mut next = Next::Recv;
        for chunk in body.chunks(100_000) {
            assert_eq!(next, Next::Recv);
            next = recv(&mut conn, chunk, now);
        }
        assert_eq!(next, Next::Publish);
        assert!(!conn.waits_for_input(), "no deadline while publishing");
        let sink = conn.take_publish().expect("the upload");
        assert!(conn.take_publish().is_none());
        assert_eq!(conn.on_published(sink.finish()), Next::Send { more: false });
        let (reply, next) = send_all(&mut conn, now);
        assert!(
            reply.starts_with(b"HTTP/1.1 201 "),
            "{}",
            String::from_utf8_lossy(&reply)
        );
        assert_eq!(next, Next::Recv);
        assert!(app.store.get("ns", "big").expect("get").is_some());
        let buf = conn.take_read_buf();
        assert!(
            buf.capacity() < BODY_READ_BYTES,
            "idle buffer holds {} bytes",
            buf.capacity()
        );
        assert!(buf.capacity() >= head_max);
    }

    /// An answer sent from memory that is larger than an inline body (a
    /// peer's listing page of up to 0.4 MB) does not stay allocated on the
    /// connection: before, each keep-alive connection kept the out buffer of
    /// the largest answer it had sent, for its life (seen in a heap profile
    /// of the soak as 0.5 MB held by 22 connections).
    #[test]
    fn a_large_answer_does_not_stay_in_the_out_buffer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        let (mut conn, _app) = conn(dir.path(), b"GET ", now);
        // What a large in-memory answer leaves behind.
        conn.out_buf = Some(Vec::with_capacity(512 * 1024));
        let get = b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(recv(&mut conn, get, now), Next::Send { more: false });
        let (reply, next) = send_all(&mut conn, now);
        assert!(reply.starts_with(b"HTTP/1.1 200 "));
        assert_eq!(next, Next::Recv);
        let mut buf = conn.take_out_buf();
        assert!(
            buf.capacity() <= OUT_BUF_KEEP_BYTES,
            "kept {} bytes",
            buf.capacity()
        );
        // A buffer no larger than an inline answer stays for the next request.
        buf.reserve(32 * 1024);
        let cap = buf.capacity();
        conn.out_buf = Some(buf);
        let ready = b"GET /ready HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(recv(&mut conn, ready, now), Next::Send { more: false });
        let (reply, next) = send_all(&mut conn, now);
        assert!(reply.starts_with(b"HTTP/1.1 "));
        assert_eq!(next, Next::Recv);
        assert_eq!(conn.take_out_buf().capacity(), cap);
    }

    /// An oversized Gradle PUT is answered 413 at once; then the connection
    /// discards the body as it keeps arriving (more than the 1 MiB it
    /// used to stop at, which reset clients that write the whole body
    /// before reading), each read under the lingering idle deadline, and
    /// closes when the client does.
    #[test]
    fn an_early_413_lingers_through_the_body() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        let (mut conn, _app) = conn(dir.path(), b"PUT ", now);
        let head =
            "PUT /cache/0123abcd HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999999\r\n\r\n";
        assert_eq!(
            recv(&mut conn, head.as_bytes(), now),
            Next::Send { more: false }
        );
        let (reply, next) = send_all(&mut conn, now);
        assert!(
            reply.starts_with(b"HTTP/1.1 413 "),
            "{}",
            String::from_utf8_lossy(&reply)
        );
        assert_eq!(next, Next::Linger);
        let timeout = Duration::from_millis(LingerLimits::default().timeout_ms);
        assert_eq!(conn.deadline(), now + timeout);
        assert!(conn.waits_for_input());
        let chunk = vec![0u8; BODY_READ_BYTES];
        for i in 1..=8u32 {
            let at = now + Duration::from_millis(u64::from(i));
            assert_eq!(recv(&mut conn, &chunk, at), Next::Linger, "read {i}");
            assert_eq!(conn.deadline(), at + timeout);
        }
        assert_eq!(recv(&mut conn, b"", now), Next::Close);
    }

    #[test]
    fn method_labels() {
        let rows: &[(&[u8], &str)] = &[
            (b"POST /x HTTP/1.1\r\n", "POST"),
            (b"\r\nOPTIONS * HTTP/1.1", "OPTIONS"),
            (b"PATCH /aaaaaaaa", "PATCH"),
            (b"TRACE ", "TRACE"),
            (b"CONNECT a:1 ", "CONNECT"),
            (b"DELETE /x", "DELETE"),
            (b"get /x", "OTHER"),
            (b"BREW /pot", "OTHER"),
            (b"GETTING-LONGER", "OTHER"),
            (b"\xff\xfe /x", "OTHER"),
            (b"", "OTHER"),
        ];
        for (head, want) in rows {
            assert_eq!(
                head_method_label(head),
                *want,
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    /// A 414 is counted under the method of its request line.
    #[test]
    fn a_414_counts_its_method() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        let (mut conn, app) = conn(dir.path(), b"POS", now);
        let long = format!(
            "POST /{} HTTP/1.1\r\n",
            "a".repeat(Limits::default().uri_bytes_max + 1)
        );
        assert_eq!(
            recv(&mut conn, long.as_bytes(), now),
            Next::Send { more: false }
        );
        let (reply, _) = send_all(&mut conn, now);
        assert!(
            reply.starts_with(b"HTTP/1.1 414 "),
            "{}",
            String::from_utf8_lossy(&reply)
        );
        assert_eq!(app.metrics.requests("none", "POST", 414), 1);
    }

    /// A reply for a connection that is not publishing closes it instead of
    /// answering out of turn.
    #[test]
    fn a_stray_publish_reply_closes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        let (mut conn, _app) = conn(dir.path(), b"GET ", now);
        assert_eq!(conn.on_published(Reply::error(500, "stray")), Next::Close);
    }
}
