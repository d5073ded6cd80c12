//! What the fallback watches on a connection's bytes, below hyper: progress for the idle and
//! send timeouts, the HTTP/1 request line and head deadline (so the fallback answers 414 and
//! 408 as the ring does, where hyper would answer 431 or close silently), and HTTP/2 frame
//! headers (so a client resetting streams at a steady pace gets GOAWAY ENHANCE_YOUR_CALM, which
//! hyper's burst limits do not catch).
//!
//! The scanners ([`RequestLineScan`], [`FrameScan`], [`RateWindow`]) are sans-IO and take the
//! time as an argument; [`GuardIo`] feeds them what passes through the socket.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tracing::debug;

use super::slots::Sheddable;
use super::stats::Counters;
use crate::http1::{Event, Limits as Http1Limits, ReaderError, RequestReader};

/// HTTP/2 RST_STREAM frames a client may send per [`H2_RESET_WINDOW`] before the connection
/// gets GOAWAY ENHANCE_YOUR_CALM. Clients cancel streams legitimately (a build that fails
/// cancels its downloads), so the bound is generous; the paced rapid-reset attack sends
/// thousands a second and trips it within a fraction of a second.
pub const H2_RESETS_PER_WINDOW_MAX: u32 = 200;
/// The window [`H2_RESETS_PER_WINDOW_MAX`] is counted in.
pub const H2_RESET_WINDOW: Duration = Duration::from_secs(10);
/// Most unread input a connection refused with 408 or 414 discards before it closes, so the
/// client reads the status instead of a reset (lingering close, as the ring does).
pub const LINGER_BYTES_MAX: u64 = 1024 * 1024;
/// Longest a lingering close waits for the client.
pub const LINGER: Duration = Duration::from_secs(2);
/// Longest HTTP method token the request-line scan accepts as a method.
const METHOD_BYTES_MAX: usize = 16;

const H2_FRAME_HEADER_BYTES: usize = 9;
const H2_PREFACE_BYTES: u64 = 24;
const H2_HEADERS: u8 = 0x1;
const H2_RST_STREAM: u8 = 0x3;
const H2_GOAWAY: u8 = 0x7;
const H2_ENHANCE_YOUR_CALM: u32 = 0xb;

/// Last socket progress and requests in flight of one connection, shared by its task, its
/// I/O wrapper, its service and the slot table. Times are milliseconds since `epoch`.
pub struct Activity {
    epoch: Instant,
    last_progress_ms: AtomicU64,
    last_write_ms: AtomicU64,
    /// When a write last returned `Pending` with nothing written since; `u64::MAX` if not.
    write_blocked_ms: AtomicU64,
    /// Handlers running (reading a request, deciding).
    pub handlers_running: AtomicUsize,
    /// Response bodies hyper still holds (being sent).
    pub bodies_sending: AtomicUsize,
    /// Requests that reached a handler, ever.
    pub requests_started: AtomicU64,
    shed_requested: AtomicBool,
    shed: Notify,
    /// Reads should bring the kernel's receive time (`stamp::StampedTcp`):
    /// while the connection waits for a request the sampler chose
    /// ([`Activity::sample_next`]).
    want_stamp: AtomicBool,
    /// The last receive time a read brought, unix ns (0: none since taken).
    last_stamp_ns: AtomicU64,
    /// The receive time of the request head being read, unix ns (0: none).
    head_stamp_ns: AtomicU64,
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_progress_ms: AtomicU64::new(0),
            last_write_ms: AtomicU64::new(0),
            write_blocked_ms: AtomicU64::new(u64::MAX),
            handlers_running: AtomicUsize::new(0),
            bodies_sending: AtomicUsize::new(0),
            requests_started: AtomicU64::new(0),
            shed_requested: AtomicBool::new(false),
            shed: Notify::new(),
            want_stamp: AtomicBool::new(false),
            last_stamp_ns: AtomicU64::new(0),
            head_stamp_ns: AtomicU64::new(0),
        }
    }

    /// Whether the next read should ask for the kernel's receive time.
    pub fn wants_stamp(&self) -> bool {
        self.want_stamp.load(Ordering::Relaxed)
    }

    /// A stamped read brought this receive time (`None`: the kernel gave
    /// none, and no older stamp may stand for these bytes).
    pub fn stamped(&self, stamp: Option<sluice_uring::RxStamp>) {
        let ns = stamp.map_or(0, |s| s.unix_ns);
        self.last_stamp_ns.store(ns, Ordering::Relaxed);
    }

    /// Whether the next request is measured from its arrival: asks this
    /// thread's sampler (one request per `gap`, as on an engine thread; see
    /// `pressure::LatencySampler`), before the request's bytes are read, so
    /// the choice cannot favour fast or slow requests. Unsampled requests
    /// are read with plain reads.
    pub fn sample_next(&self, gap: Duration) {
        let take = crate::pressure::sample_on_this_thread(gap, std::time::Instant::now());
        self.want_stamp.store(take, Ordering::Relaxed);
    }

    /// A request head starts in the bytes just read: its arrival is the
    /// last stamp (none if this request was not sampled). Reads stop
    /// stamping until the guard asks the sampler again.
    fn head_started(&self) {
        let ns = self.last_stamp_ns.swap(0, Ordering::Relaxed);
        self.head_stamp_ns.store(ns, Ordering::Relaxed);
        self.want_stamp.store(false, Ordering::Relaxed);
    }

    /// The arrival of the request whose handler starts now, taken once.
    pub fn take_head_arrival(&self) -> Option<sluice_uring::RxStamp> {
        match self.head_stamp_ns.swap(0, Ordering::Relaxed) {
            0 => None,
            unix_ns => Some(sluice_uring::RxStamp { unix_ns }),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    pub fn touch(&self) {
        self.last_progress_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    fn wrote(&self) {
        let now = self.now_ms();
        self.last_progress_ms.store(now, Ordering::Relaxed);
        self.last_write_ms.store(now, Ordering::Relaxed);
        self.write_blocked_ms.store(u64::MAX, Ordering::Relaxed);
    }

    fn write_blocked(&self) {
        let now = self.now_ms();
        let _ = self.write_blocked_ms.compare_exchange(
            u64::MAX,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// A request is in flight: a handler runs or a response body is being sent.
    pub fn in_request(&self) -> bool {
        self.handlers_running.load(Ordering::Relaxed) > 0
            || self.bodies_sending.load(Ordering::Relaxed) > 0
    }

    /// Resolves once the connection has made no progress for `idle` with no request in flight.
    pub async fn idle_expired(&self, idle: Duration) {
        loop {
            let due = self.at(self.last_progress_ms.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= due {
                if !self.in_request() {
                    return;
                }
                // A request is in flight: its own timeouts bound it; look again later.
                tokio::time::sleep(idle).await;
            } else {
                tokio::time::sleep_until(due).await;
            }
        }
    }

    /// Resolves once the client has not taken response bytes for `limit`: a write has waited
    /// that long, or a response body is in flight and nothing was written for that long (an
    /// HTTP/2 client that opens no flow-control window never makes a write wait).
    pub async fn send_stalled(&self, limit: Duration) {
        loop {
            let now = Instant::now();
            let blocked = self.write_blocked_ms.load(Ordering::Relaxed);
            let blocked_due = (blocked != u64::MAX).then(|| self.at(blocked) + limit);
            let sending = self.bodies_sending.load(Ordering::Relaxed) > 0;
            let quiet_due = sending
                .then(|| self.at(self.last_write_ms.load(Ordering::Relaxed)) + limit)
                .filter(|_| self.handlers_running.load(Ordering::Relaxed) == 0);
            let due = match (blocked_due, quiet_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match due {
                Some(due) if now >= due => return,
                Some(due) => tokio::time::sleep_until(due.min(now + limit)).await,
                None => tokio::time::sleep(limit).await,
            }
        }
    }

    /// Resolves once no request is in flight and nothing moved for `limit`: a connection told
    /// to close gracefully (GOAWAY sent, PING unanswered) that the client does not finish.
    pub async fn quiet_for(&self, limit: Duration) {
        loop {
            let due = self.at(self.last_progress_ms.load(Ordering::Relaxed)) + limit;
            if Instant::now() >= due && !self.in_request() {
                return;
            }
            tokio::time::sleep_until(due.max(Instant::now() + limit / 4)).await;
        }
    }

    /// Resolves once the slot table asked this connection to close for room.
    pub async fn shed_requested(&self) {
        self.shed.notified().await;
    }
}

impl Sheddable for Activity {
    fn busy(&self) -> bool {
        self.in_request()
    }

    fn idle_for(&self) -> Duration {
        let last = self.last_progress_ms.load(Ordering::Relaxed);
        Duration::from_millis(self.now_ms().saturating_sub(last))
    }

    fn shed(&self) {
        self.shed_requested.store(true, Ordering::Relaxed);
        // notify_one keeps a permit if the task is not waiting yet, so the request is not lost.
        self.shed.notify_one();
    }
}

/// What the scan of a request line concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineVerdict {
    /// The line has not ended and nothing is wrong yet.
    NeedMore,
    /// The target ended within the limit (or the line is not one to judge): hyper decides.
    Done,
    /// The request target is longer than the limit: answer 414.
    TargetTooLong,
}

/// Scans the start of an HTTP/1 request line, incrementally, for the length of its target.
/// Anything that does not look like `METHOD SP` (upper-case method of at most 16 bytes) is
/// left to hyper: the scan must never refuse what it does not understand.
#[derive(Clone, Debug)]
pub struct RequestLineScan {
    uri_bytes_max: usize,
    method_bytes: usize,
    target_bytes: usize,
    in_target: bool,
    done: Option<LineVerdict>,
}

impl RequestLineScan {
    pub fn new(uri_bytes_max: usize) -> RequestLineScan {
        RequestLineScan {
            uri_bytes_max,
            method_bytes: 0,
            target_bytes: 0,
            in_target: false,
            done: None,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) -> LineVerdict {
        if let Some(verdict) = self.done {
            return verdict;
        }
        for &b in bytes {
            let verdict = if self.in_target {
                if b == b' ' || b == b'\r' || b == b'\n' {
                    Some(LineVerdict::Done)
                } else {
                    self.target_bytes += 1;
                    (self.target_bytes > self.uri_bytes_max).then_some(LineVerdict::TargetTooLong)
                }
            } else if b.is_ascii_uppercase() && self.method_bytes < METHOD_BYTES_MAX {
                self.method_bytes += 1;
                None
            } else if (b == b'\r' || b == b'\n') && self.method_bytes == 0 {
                // Empty lines before a request line are allowed (RFC 9112 §2.2).
                None
            } else if b == b' ' && self.method_bytes > 0 {
                self.in_target = true;
                None
            } else {
                Some(LineVerdict::Done)
            };
            if let Some(verdict) = verdict {
                self.done = Some(verdict);
                return verdict;
            }
        }
        LineVerdict::NeedMore
    }
}

/// Where the framing check stopped an HTTP/1 stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FramingRefusal {
    /// Offset in the bytes just fed where the refused request starts; the bytes before it
    /// belong to earlier, valid requests and still go to hyper.
    pub at: usize,
    /// Status to answer with before closing (the ring's, from the sans-IO core).
    pub status: u16,
    /// Why, for logs and the one-line body.
    pub reason: &'static str,
    /// The fault is inside a body, where hyper is mid-request: nothing can be answered.
    pub in_body: bool,
}

/// Runs an HTTP/1 connection's request stream through the sans-IO core
/// ([`crate::http1::RequestReader`]), the parser the ring engine uses, before hyper sees it.
/// hyper accepts some framing the core refuses (a `Content-Length` with `Transfer-Encoding`,
/// two equal `Content-Length`s, a missing `Host`, ...); with this check every front gives the
/// same bytes the same answer. Bodies are followed (skipped, not kept) so pipelined heads are
/// found where the ring would find them. It keeps only the bytes of a head or chunk line that
/// has not ended, which the core bounds by `head_bytes_max`.
#[derive(Clone, Debug)]
pub struct FramingCheck {
    reader: RequestReader,
    /// Unconsumed bytes carried from earlier reads (a partial head or chunk line).
    carried: Vec<u8>,
    /// A request closed the connection: hyper ignores what follows, and so does the check.
    finished: bool,
}

impl FramingCheck {
    pub fn new(limits: Http1Limits) -> FramingCheck {
        FramingCheck {
            reader: RequestReader::new(limits),
            carried: Vec::new(),
            finished: false,
        }
    }

    /// Feeds the bytes that just arrived; `Err` once a request is refused (sticky: the
    /// connection is answered and closed).
    pub fn feed(&mut self, new: &[u8]) -> Result<(), FramingRefusal> {
        if self.finished {
            return Ok(());
        }
        let mut owned = std::mem::take(&mut self.carried);
        let carried = owned.len();
        let buf: &[u8] = if carried == 0 {
            new
        } else {
            owned.extend_from_slice(new);
            &owned
        };
        let mut off = 0;
        loop {
            match self.reader.next(&buf[off..]) {
                Event::NeedMore => {
                    let rest = &buf[off..];
                    if !rest.is_empty() {
                        let mut keep = Vec::with_capacity(rest.len());
                        keep.extend_from_slice(rest);
                        self.carried = keep;
                    }
                    return Ok(());
                }
                Event::Head(head) => {
                    let len = head.head_len();
                    // The route's own size limit is the handler's (413 there); the check only
                    // follows the framing, so it drains whatever length the head declares.
                    if let Err(err) = self.reader.skip_body(u64::MAX) {
                        return Err(refusal(err, off.saturating_sub(carried), false));
                    }
                    off += len;
                }
                Event::Body { consumed, .. } | Event::MessageEnd { consumed } => off += consumed,
                Event::Closed => {
                    self.finished = true;
                    return Ok(());
                }
                Event::Error(err) => {
                    let in_body = matches!(err, ReaderError::Body(_));
                    return Err(refusal(err, off.saturating_sub(carried), in_body));
                }
            }
        }
    }
}

fn refusal(err: ReaderError, at: usize, in_body: bool) -> FramingRefusal {
    let reason = match err {
        ReaderError::Head(e) => e.reason(),
        ReaderError::Body(_) => "malformed request body framing",
        ReaderError::OutOfOrder => "request framing check out of order",
    };
    FramingRefusal {
        at,
        status: err.status(),
        reason,
        in_body,
    }
}

/// Follows HTTP/2 frame boundaries in one direction of a connection, calling back with each
/// frame header `(type, flags, stream id)` as it completes.
#[derive(Clone, Debug)]
pub struct FrameScan {
    preface_left: u64,
    header: [u8; H2_FRAME_HEADER_BYTES],
    header_len: usize,
    payload_left: u64,
}

impl FrameScan {
    /// A scan of client bytes (which start with the 24-byte preface) or of server bytes.
    pub fn new(client_side: bool) -> FrameScan {
        FrameScan {
            preface_left: if client_side { H2_PREFACE_BYTES } else { 0 },
            header: [0; H2_FRAME_HEADER_BYTES],
            header_len: 0,
            payload_left: 0,
        }
    }

    /// True between frames: bytes written now would start a frame of their own.
    pub fn at_boundary(&self) -> bool {
        self.preface_left == 0 && self.header_len == 0 && self.payload_left == 0
    }

    pub fn feed(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(u8, u8, u32)) {
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let skip = (self.preface_left.min(bytes.len() as u64)) as usize;
                self.preface_left -= skip as u64;
                bytes = &bytes[skip..];
            } else if self.payload_left > 0 {
                let skip = (self.payload_left.min(bytes.len() as u64)) as usize;
                self.payload_left -= skip as u64;
                bytes = &bytes[skip..];
            } else {
                let take = (H2_FRAME_HEADER_BYTES - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_len += take;
                bytes = &bytes[take..];
                if self.header_len == H2_FRAME_HEADER_BYTES {
                    let h = self.header;
                    self.header_len = 0;
                    self.payload_left = u64::from(u32::from_be_bytes([0, h[0], h[1], h[2]]));
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    on_frame(h[3], h[4], stream);
                }
            }
        }
    }
}

/// Counts events in fixed windows of `window`; `record` says whether `max` was passed. A
/// client timing its events across a window edge gets at most twice `max` per window.
#[derive(Clone, Debug)]
pub struct RateWindow {
    window: Duration,
    max: u32,
    started: Option<Instant>,
    count: u32,
}

impl RateWindow {
    pub fn new(window: Duration, max: u32) -> RateWindow {
        RateWindow {
            window,
            max,
            started: None,
            count: 0,
        }
    }

    /// One event at `now`; true when it is over the limit of its window.
    pub fn record(&mut self, now: Instant) -> bool {
        match self.started {
            Some(start) if now.saturating_duration_since(start) < self.window => {}
            _ => {
                self.started = Some(now);
                self.count = 0;
            }
        }
        self.count = self.count.saturating_add(1);
        self.count > self.max
    }
}

/// A GOAWAY frame: last stream id, error code, no debug data.
fn goaway_frame(last_stream: u32, code: u32) -> [u8; 17] {
    let mut f = [0u8; 17];
    f[2] = 8;
    f[3] = H2_GOAWAY;
    f[9..13].copy_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    f[13..17].copy_from_slice(&code.to_be_bytes());
    f
}

/// A complete `connection: close` response with a one-line text body.
pub fn status_response(status: u16, reason: &str, text: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nconnection: close\r\ncontent-type: text/plain\r\n\
         content-length: {}\r\n\r\n{text}\n",
        text.len() + 1
    )
    .into_bytes()
}

/// Where the HTTP/1 watch is in the request cycle.
enum Http1Phase {
    /// A head is arriving (or awaited right after accept); its deadline runs.
    Head(RequestLineScan),
    /// A request reached the handler; hyper owns the bytes until it is done.
    Request,
    /// Between requests: the next byte starts a head.
    Idle,
}

/// Bytes the guard writes itself, then closes.
struct Refusing {
    bytes: Vec<u8>,
    written: usize,
    flushed: bool,
    /// Discard input until EOF, a bound or a deadline, so the client reads `bytes`.
    linger: bool,
    discarded: u64,
    linger_until: Option<Pin<Box<Sleep>>>,
    why: &'static str,
}

/// HTTP/1 specifics of [`GuardIo`].
pub struct Http1Watch {
    phase: Http1Phase,
    deadline: Pin<Box<Sleep>>,
    header_read_timeout: Duration,
    uri_bytes_max: usize,
    requests_seen: u64,
    framing: FramingCheck,
    /// A refused head that arrived while a request was in flight: answered once it is done.
    deferred: Option<FramingRefusal>,
    /// Wakes the read that waits for the in-flight request before answering `deferred`.
    recheck: Option<Pin<Box<Sleep>>>,
}

/// How often a deferred refusal looks whether the request before it has finished.
const DEFERRED_RECHECK: Duration = Duration::from_millis(5);

impl Http1Watch {
    /// `first_head_deadline` bounds the first head (counted from accept); `limits` are the
    /// ring's head limits (`head_bytes_max`, `uri_bytes_max`).
    pub fn new(
        first_head_deadline: Instant,
        header_read_timeout: Duration,
        limits: Http1Limits,
    ) -> Self {
        Http1Watch {
            phase: Http1Phase::Head(RequestLineScan::new(limits.uri_bytes_max)),
            deadline: Box::pin(tokio::time::sleep_until(first_head_deadline)),
            header_read_timeout,
            uri_bytes_max: limits.uri_bytes_max,
            requests_seen: 0,
            framing: FramingCheck::new(limits),
            deferred: None,
            recheck: None,
        }
    }
}

/// HTTP/2 specifics of [`GuardIo`].
pub struct H2Watch {
    inbound: FrameScan,
    outbound: FrameScan,
    resets: RateWindow,
    last_stream: u32,
}

impl H2Watch {
    pub fn new() -> H2Watch {
        H2Watch {
            inbound: FrameScan::new(true),
            outbound: FrameScan::new(false),
            resets: RateWindow::new(H2_RESET_WINDOW, H2_RESETS_PER_WINDOW_MAX),
            last_stream: 0,
        }
    }
}

pub enum Watch {
    Http1(Box<Http1Watch>),
    H2(Box<H2Watch>),
}

/// The I/O hyper sees: records progress, and watches heads (HTTP/1) or frames (HTTP/2).
pub struct GuardIo<I> {
    inner: I,
    activity: Arc<Activity>,
    counters: Arc<Counters>,
    watch: Watch,
    refusing: Option<Refusing>,
    /// `public_latency_sample_us`: one request per this on the thread is measured from its
    /// arrival; asked when the connection starts and as each request starts after it.
    latency_sample: Duration,
}

impl<I> GuardIo<I> {
    pub fn new(
        inner: I,
        activity: Arc<Activity>,
        counters: Arc<Counters>,
        watch: Watch,
        latency_sample: Duration,
    ) -> Self {
        // Whether the first request is measured from its arrival.
        activity.sample_next(latency_sample);
        GuardIo {
            inner,
            activity,
            counters,
            watch,
            refusing: None,
            latency_sample,
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> GuardIo<I> {
    /// Writes the refusal, flushes, shuts the write side, lingers; then fails the read so hyper
    /// ends the connection without writing anything of its own.
    fn poll_refusing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(r) = self.refusing.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while r.written < r.bytes.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &r.bytes[r.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::Error::other(r.why))),
                Poll::Ready(Ok(n)) => r.written += n,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if !r.flushed {
            match Pin::new(&mut self.inner).poll_flush(cx) {
                Poll::Ready(_) => r.flushed = true,
                Poll::Pending => return Poll::Pending,
            }
            if r.linger {
                // Half-close: the client sees the end of our answer, and may still send.
                let _ = Pin::new(&mut self.inner).poll_shutdown(cx);
                r.linger_until = Some(Box::pin(tokio::time::sleep(LINGER)));
            }
        }
        if r.linger {
            let mut scratch = [0u8; 8192];
            loop {
                if r.discarded >= LINGER_BYTES_MAX {
                    break;
                }
                if let Some(until) = r.linger_until.as_mut() {
                    if until.as_mut().poll(cx).is_ready() {
                        break;
                    }
                }
                let mut buf = ReadBuf::new(&mut scratch);
                match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                        r.discarded += buf.filled().len() as u64;
                    }
                    Poll::Ready(_) => break,
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
        Poll::Ready(Err(io::Error::other(r.why)))
    }

    /// Answers a head the sans-IO core refused, as the ring does: its status, then close.
    fn refuse_framing(&mut self, refusal: FramingRefusal) {
        debug!(
            status = refusal.status,
            reason = refusal.reason,
            "fallback: request refused"
        );
        self.counters.head_refused.fetch_add(1, Ordering::Relaxed);
        let phrase = crate::http1::reason_phrase(refusal.status);
        self.refuse(
            status_response(refusal.status, phrase, refusal.reason),
            true,
            "request head refused by the framing rules",
        );
    }

    fn refuse(&mut self, bytes: Vec<u8>, linger: bool, why: &'static str) {
        self.refusing = Some(Refusing {
            bytes,
            written: 0,
            flushed: false,
            linger,
            discarded: 0,
            linger_until: None,
            why,
        });
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for GuardIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.refusing.is_some() {
            return this.poll_refusing(cx);
        }
        if let Some(answer) = this.before_http1_read(cx) {
            return answer;
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !matches!(result, Poll::Ready(Ok(()))) || buf.filled().len() == before {
            return result;
        }
        this.activity.touch();
        this.after_read(cx, buf, before).unwrap_or(result)
    }
}

/// The watch's part of a read: `Some` is what the read answers instead of passing on what
/// arrived (a refusal being written, or a wait).
type ReadAnswer = Option<Poll<io::Result<()>>>;

impl<I: AsyncRead + AsyncWrite + Unpin> GuardIo<I> {
    /// Before an HTTP/1 read: follows the request cycle, answers a deferred refusal once the
    /// request before it is done, and a head past its deadline with 408.
    fn before_http1_read(&mut self, cx: &mut Context<'_>) -> ReadAnswer {
        let Watch::Http1(w) = &mut self.watch else {
            return None;
        };
        let started = self.activity.requests_started.load(Ordering::Relaxed);
        if started != w.requests_seen {
            w.requests_seen = started;
            w.phase = Http1Phase::Request;
        }
        if matches!(w.phase, Http1Phase::Request) && !self.activity.in_request() {
            w.phase = Http1Phase::Idle;
            // The next read brings a new head: stamp it if the sampler says so.
            self.activity.sample_next(self.latency_sample);
        }
        if let Some(refusal) = w.deferred {
            if self.activity.in_request() {
                // hyper is still answering the request before the refused one; our 400
                // may only follow its response.
                let recheck = w
                    .recheck
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(DEFERRED_RECHECK)));
                while recheck.as_mut().poll(cx).is_ready() {
                    recheck.as_mut().reset(Instant::now() + DEFERRED_RECHECK);
                }
                return Some(Poll::Pending);
            }
            self.refuse_framing(refusal);
            return Some(self.poll_refusing(cx));
        }
        if matches!(w.phase, Http1Phase::Head(_)) && w.deadline.as_mut().poll(cx).is_ready() {
            self.counters.head_timeout.fetch_add(1, Ordering::Relaxed);
            self.refuse(
                status_response(408, "Request Timeout", "request head took too long"),
                true,
                "request head timed out (408)",
            );
            return Some(self.poll_refusing(cx));
        }
        None
    }

    /// After a read that added `buf[before..]`. HTTP/1: a request target over the limit gets
    /// 414, a head the sans-IO core refuses gets its status (after the valid requests before
    /// it). HTTP/2: stream resets are counted, and past the limit the connection gets GOAWAY
    /// ENHANCE_YOUR_CALM and closes.
    fn after_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        before: usize,
    ) -> ReadAnswer {
        let new = &buf.filled()[before..];
        match &mut self.watch {
            Watch::Http1(w) => {
                if matches!(w.phase, Http1Phase::Idle) {
                    w.phase = Http1Phase::Head(RequestLineScan::new(w.uri_bytes_max));
                    let due = Instant::now() + w.header_read_timeout;
                    w.deadline.as_mut().reset(due);
                    self.activity.head_started();
                } else if w.requests_seen == 0 && self.activity.wants_stamp() {
                    // The first head, read since accept.
                    self.activity.head_started();
                }
                if let Http1Phase::Head(scan) = &mut w.phase {
                    if scan.feed(new) == LineVerdict::TargetTooLong {
                        self.counters.uri_too_long.fetch_add(1, Ordering::Relaxed);
                        buf.set_filled(before);
                        self.refuse(
                            status_response(414, "URI Too Long", "request target is too long"),
                            true,
                            "request target too long (414)",
                        );
                        return Some(self.poll_refusing(cx));
                    }
                }
                if let Err(refusal) = w.framing.feed(new) {
                    if refusal.in_body {
                        // Mid-body hyper owns the request and nothing of ours can be written;
                        // hyper's own chunked decoder judges the rest (it refuses what the
                        // core refuses there: bad sizes, missing CRLF, oversized lines).
                        debug!(
                            reason = refusal.reason,
                            "fallback: body framing left to hyper"
                        );
                        return None;
                    }
                    buf.set_filled(before + refusal.at);
                    if refusal.at == 0 && !self.activity.in_request() {
                        self.refuse_framing(refusal);
                        return Some(self.poll_refusing(cx));
                    }
                    // Earlier pipelined requests go to hyper first; the refusal follows them.
                    w.deferred = Some(refusal);
                    if refusal.at == 0 {
                        // Nothing to hand over now, and an empty read would mean EOF to hyper.
                        cx.waker().wake_by_ref();
                        return Some(Poll::Pending);
                    }
                }
            }
            Watch::H2(w) => {
                let now = Instant::now();
                let mut calm = false;
                let mut headers = false;
                let last_stream = &mut w.last_stream;
                let resets = &mut w.resets;
                w.inbound.feed(new, |kind, _flags, stream| {
                    if kind == H2_HEADERS && stream % 2 == 1 {
                        headers = true;
                        *last_stream = (*last_stream).max(stream);
                    } else if kind == H2_RST_STREAM && resets.record(now) {
                        calm = true;
                    }
                });
                if headers {
                    // A new stream may start in any later read: the sampler
                    // decides now whether the next one is stamped.
                    self.activity.head_started();
                    self.activity.sample_next(self.latency_sample);
                }
                if calm {
                    self.counters.h2_calm.fetch_add(1, Ordering::Relaxed);
                    buf.set_filled(before);
                    // A frame of our own may only start where hyper's last one ended; if hyper
                    // is mid-frame the connection closes without the GOAWAY.
                    let goaway = if w.outbound.at_boundary() {
                        goaway_frame(w.last_stream, H2_ENHANCE_YOUR_CALM).to_vec()
                    } else {
                        Vec::new()
                    };
                    // Linger as for a 414: closing on unread input would reset the connection,
                    // and a reset can destroy the GOAWAY before the client reads it.
                    self.refuse(goaway, true, "HTTP/2 stream resets over the limit");
                    return Some(self.poll_refusing(cx));
                }
            }
        }
        None
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> GuardIo<I> {
    /// One write through the guard: refused once the guard answers, else passed on and
    /// recorded (progress and the h2 frames written in `bufs`, or a client that does not read).
    fn guarded_write<'b>(
        &mut self,
        bufs: impl IntoIterator<Item = &'b [u8]>,
        write: impl FnOnce(Pin<&mut I>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if self.refusing.is_some() {
            // hyper gets nothing more onto the wire once the guard answers.
            return Poll::Ready(Err(io::Error::other("connection refused by the guard")));
        }
        let result = write(Pin::new(&mut self.inner));
        match result {
            Poll::Ready(Ok(n)) => self.wrote(bufs, n),
            Poll::Pending => self.activity.write_blocked(),
            Poll::Ready(Err(_)) => {}
        }
        result
    }

    fn wrote<'b>(&mut self, bufs: impl IntoIterator<Item = &'b [u8]>, mut written: usize) {
        if written == 0 {
            return;
        }
        self.activity.wrote();
        if let Watch::H2(w) = &mut self.watch {
            for b in bufs {
                let n = written.min(b.len());
                w.outbound.feed(&b[..n], |_, _, _| {});
                written -= n;
                if written == 0 {
                    break;
                }
            }
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for GuardIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .guarded_write([buf], |inner| inner.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .guarded_write(bufs.iter().map(|b| &**b), |inner| {
                inner.poll_write_vectored(cx, bufs)
            })
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        if result.is_pending() {
            this.activity.write_blocked();
        }
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` in pieces of `piece` bytes; returns the refusal and the offset in the
    /// whole stream where the refused request starts.
    fn framing_of(bytes: &[u8], piece: usize) -> Option<(usize, FramingRefusal)> {
        let mut check = FramingCheck::new(Http1Limits::default());
        let mut fed = 0;
        for chunk in bytes.chunks(piece) {
            if let Err(refusal) = check.feed(chunk) {
                return Some((fed + refusal.at, refusal));
            }
            fed += chunk.len();
        }
        None
    }

    #[test]
    fn framing_check_table() {
        let good = b"PUT /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc";
        let chunked = b"PUT /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n";
        let cl_te = b"PUT /c HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let bad_chunk = b"PUT /d HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        let mut pipelined = Vec::new();
        pipelined.extend_from_slice(good);
        pipelined.extend_from_slice(chunked);
        let bad_at = pipelined.len();
        pipelined.extend_from_slice(cl_te);
        let mut closing = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".to_vec();
        closing.extend_from_slice(cl_te);
        // Whatever the split, the same verdict.
        for piece in [1, 2, 7, 64, 4096] {
            let mut valid = good.to_vec();
            valid.extend_from_slice(chunked);
            assert_eq!(framing_of(&valid, piece), None, "valid, piece {piece}");
            // Every byte of the valid requests before it reaches hyper; bytes of the refused
            // head that arrived in earlier reads already have (hyper holds them unparsed), so
            // the refusal starts where the read that completed the verdict starts, at the
            // earliest at the refused head.
            let (at, r) = framing_of(&pipelined, piece).expect("refused");
            assert_eq!((r.status, r.in_body), (400, false), "piece {piece}");
            assert!(at >= bad_at, "piece {piece}: {at} < {bad_at}");
            if piece >= pipelined.len() {
                assert_eq!(at, bad_at);
            }
            let (_, r) = framing_of(cl_te, piece).expect("refused");
            assert_eq!(r.status, 400, "piece {piece}");
            let (_, r) = framing_of(bad_chunk, piece).expect("refused");
            assert!(r.in_body, "a bad chunk size is a body fault, piece {piece}");
            // After a request that closes, hyper reads nothing more and neither does the check.
            assert_eq!(framing_of(&closing, piece), None, "piece {piece}");
        }
        let (_, r) =
            framing_of(b"GET / HTTP/1.1\r\nHost: a\r\nExpect: x\r\n\r\n", 4096).expect("refused");
        assert_eq!(r.status, 417);
    }

    #[test]
    fn request_line_scan_table() {
        // (input pieces, uri_bytes_max, verdict)
        let rows: &[(&[&str], usize, LineVerdict)] = &[
            (&["GET /a HTTP/1.1\r\n"], 8, LineVerdict::Done),
            (&["GET /abcdefgh"], 8, LineVerdict::TargetTooLong),
            (&["GET /abcdefg"], 8, LineVerdict::NeedMore),
            (&["GE", "T /abc", "defgh"], 8, LineVerdict::TargetTooLong),
            (&["\r\nPUT /x HTTP/1.1"], 8, LineVerdict::Done),
            // Not a request line: left to hyper, never refused.
            (&["x-filler: /aaaaaaaaaaaaaaaaa"], 8, LineVerdict::Done),
            (&["get /aaaaaaaaaaaaaaaaaaaaaaa"], 8, LineVerdict::Done),
            (&["AAAAAAAAAAAAAAAAAAAAAAAAA /a"], 8, LineVerdict::Done),
        ];
        for (pieces, max, want) in rows {
            let mut scan = RequestLineScan::new(*max);
            let mut got = LineVerdict::NeedMore;
            for p in *pieces {
                got = scan.feed(p.as_bytes());
            }
            assert_eq!(got, *want, "{pieces:?}");
        }
    }

    #[test]
    fn frame_scan_follows_boundaries_across_pieces() {
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS (len 0), HEADERS on stream 1 (len 3), RST_STREAM on stream 1 (len 4).
        wire.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        wire.extend_from_slice(&[0, 0, 3, 1, 4, 0, 0, 0, 1, 9, 9, 9]);
        wire.extend_from_slice(&[0, 0, 4, 3, 0, 0, 0, 0, 1, 0, 0, 0, 8]);
        for piece in [1, 2, 5, 9, 64] {
            let mut scan = FrameScan::new(true);
            let mut seen = Vec::new();
            for chunk in wire.chunks(piece) {
                scan.feed(chunk, |t, f, s| seen.push((t, f, s)));
            }
            assert_eq!(seen, vec![(4, 0, 0), (1, 4, 1), (3, 0, 1)], "piece {piece}");
            assert!(scan.at_boundary());
        }
        let mut scan = FrameScan::new(false);
        scan.feed(&[0, 0, 5, 0, 0, 0, 0, 0, 1, 1], |_, _, _| {});
        assert!(!scan.at_boundary(), "mid-payload");
    }

    #[test]
    fn rate_window_counts_per_window() {
        let start = Instant::now();
        let mut w = RateWindow::new(Duration::from_secs(1), 3);
        assert!(!w.record(start));
        assert!(!w.record(start));
        assert!(!w.record(start + Duration::from_millis(500)));
        assert!(
            w.record(start + Duration::from_millis(900)),
            "fourth in one window"
        );
        assert!(
            !w.record(start + Duration::from_millis(1000)),
            "a new window"
        );
    }

    #[test]
    fn goaway_frame_layout() {
        let f = goaway_frame(7, H2_ENHANCE_YOUR_CALM);
        assert_eq!(&f[..9], &[0, 0, 8, 7, 0, 0, 0, 0, 0]);
        assert_eq!(&f[9..], &[0, 0, 0, 7, 0, 0, 0, 0xb]);
    }
}
