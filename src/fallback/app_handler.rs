//! The application served through hyper: the fallback front end's handler.
//!
//! hyper parses and frames the request (HTTP/1.1 over TLS or plaintext,
//! HTTP/2 over TLS or h2c); this module turns it into a [`RequestInfo`],
//! asks [`App`] for the decision and carries it out, so the statuses,
//! headers and bodies are the ones the ring engine sends for the same
//! request.

use std::cell::RefCell;
use std::fs::File;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response, Version};

use super::handler::{body_from_bytes, ConnInfo, GuardedBody, Handler, ResponseBody};
use crate::app::{App, Decision, PutSink, Reply, ReplyBody, RequestInfo};
use crate::metrics::BytePath;
use crate::store::OpenCache;

/// Bodies up to this many bytes are read in one pread on the worker and sent with the head.
const INLINE_BODY_BYTES_MAX: u64 = 64 * 1024;
/// First read of a larger body, in bytes: small, so the first bytes leave soon.
const FIRST_CHUNK_BYTES: u64 = 256 * 1024;
/// Later reads of a larger body, in bytes: fewer trips through the blocking pool.
const FILE_CHUNK_BYTES: u64 = 1024 * 1024;
const _: () = assert!(
    FIRST_CHUNK_BYTES <= FILE_CHUNK_BYTES,
    "a pooled buffer holds any chunk"
);

/// Default of [`AppHandler::with_body_read_timeout`], as `body_read_timeout_ms` defaults.
pub const BODY_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Default of [`AppHandler::with_uri_bytes_max`], as `uri_bytes_max` defaults.
pub const URI_BYTES_MAX_DEFAULT: usize = 8192;

/// Serves the gRPC requests of an HTTP/2 connection (REAPI, `crate::reapi`), plugged in by
/// `server`; the fallback itself knows nothing of gRPC.
pub struct Grpc {
    /// Whether a request is gRPC (HTTP/2, `content-type: application/grpc`).
    pub accepts: fn(&Request<Incoming>) -> bool,
    /// Answers one gRPC request.
    pub serve: Box<dyn Fn(Request<Incoming>) -> GrpcResponse + Send + Sync>,
}

/// What [`Grpc::serve`] returns.
pub type GrpcResponse = Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>>;

/// [`Handler`] that serves the application.
pub struct AppHandler {
    app: Arc<App>,
    body_read_timeout: Duration,
    uri_bytes_max: usize,
    grpc: Option<Arc<Grpc>>,
}

impl AppHandler {
    pub fn new(app: Arc<App>) -> AppHandler {
        AppHandler {
            app,
            body_read_timeout: BODY_READ_TIMEOUT_DEFAULT,
            uri_bytes_max: URI_BYTES_MAX_DEFAULT,
            grpc: None,
        }
    }

    /// Hand the requests `grpc` accepts to it (REAPI on the same port).
    pub fn with_grpc(mut self, grpc: Grpc) -> AppHandler {
        self.grpc = Some(Arc::new(grpc));
        self
    }

    /// Longest request target in bytes (`uri_bytes_max`); a longer one answers 414, as on the
    /// ring. HTTP/1 targets far over it never get here (the fallback's guard answers them);
    /// this catches HTTP/2 `:path` and pipelined HTTP/1 heads.
    pub fn with_uri_bytes_max(mut self, uri_bytes_max: usize) -> AppHandler {
        self.uri_bytes_max = uri_bytes_max;
        self
    }

    /// Longest wait for the next piece of a request body (`body_read_timeout_ms`); past it the
    /// request answers 408 and nothing is stored. On HTTP/2 the stream then ends (hyper resets
    /// the unread request side), on HTTP/1 the connection closes.
    pub fn with_body_read_timeout(mut self, timeout: Duration) -> AppHandler {
        self.body_read_timeout = timeout;
        self
    }
}

impl Handler for AppHandler {
    fn call(
        &self,
        req: Request<Incoming>,
        _conn: ConnInfo,
    ) -> impl Future<Output = Response<ResponseBody>> + Send {
        let app = Arc::clone(&self.app);
        let body_read_timeout = self.body_read_timeout;
        let uri_bytes_max = self.uri_bytes_max;
        let grpc = self.grpc.clone();
        async move {
            if let Some(grpc) = grpc.filter(|g| (g.accepts)(&req)) {
                return (grpc.serve)(req).await;
            }
            let target_bytes = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
            if target_bytes > uri_bytes_max {
                let reply = Reply::error(414, "request target is too long").closing();
                app.record("none", req.method().as_str(), reply.status);
                return into_response(&app, reply, req.version());
            }
            serve(app, req, body_read_timeout).await
        }
    }
}

impl crate::exchange::HeaderLookup for hyper::HeaderMap {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(|v| v.as_bytes())
    }

    fn each_header(&self, visit: &mut dyn FnMut(&str, &[u8])) {
        for (name, value) in self.iter() {
            visit(name.as_str(), value.as_bytes());
        }
    }
}

async fn serve(
    app: Arc<App>,
    req: Request<Incoming>,
    body_read_timeout: Duration,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let (parts, mut body) = req.into_parts();
    let arrival = parts
        .extensions
        .get::<super::stamp::Arrival>()
        .and_then(|a| a.0);
    let header = |name: &str| parts.headers.get(name).map(|v| v.as_bytes());
    // hyper has already validated the framing; its size hint is exact for a
    // Content-Length body (HTTP/1 and HTTP/2) and open for chunked or an
    // HTTP/2 body without a length.
    let content_length = body.size_hint().exact();
    let chunked = content_length.is_none() && !body.is_end_stream();
    let expect_continue = header("expect").is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"));
    // Whether the client may be sending the body now: it did not wait for
    // `100 Continue`, or polling the body below sent it.
    let mut body_invited = !expect_continue;
    let method = parts.method.as_str();
    let path = parts.uri.path();
    // Public pressure from here until the response body is dropped.
    let route_label = crate::route::route_label(method, path);
    let public =
        crate::pressure::is_public_route(route_label).then(|| app.metrics.pressure.begin());
    let info = RequestInfo {
        method,
        path,
        query: parts.uri.query(),
        headers: Some(&parts.headers),
        authorization: header("authorization"),
        range: header("range"),
        if_none_match: header("if-none-match"),
        if_match: header("if-match"),
        if_range: header("if-range"),
        content_length,
        chunked,
        read_through: true,
    };
    let reply = match decide(&app, info).await {
        Decision::Reply(reply) => reply,
        Decision::Fetch { .. } => Reply::error(404, "no such artifact"),
        // `App::handle` opens artifacts blocking (on this runtime's threads),
        // so it never answers `Cold`; should it, the client may retry.
        Decision::Cold { .. } => Reply::error(503, "artifact not ready; try again"),
        Decision::ReceiveBody(sink) => {
            // Polling the body is what makes hyper send `100 Continue`, so a
            // refusal decided above never invites the body.
            body_invited = true;
            receive_body(&app, &mut body, sink, body_read_timeout).await
        }
    };
    app.record(route_label, method, reply.status);
    let ttfb = started.elapsed();
    app.metrics.record_ttfb(ttfb);
    if public.is_some() && matches!(method, "GET" | "HEAD") {
        app.metrics.pressure.head_ready(ttfb);
        // From the kernel's receive time to the response handed to hyper,
        // which writes its head next.
        if let Some(arrival) = arrival {
            let latency = arrival.age_at(std::time::SystemTime::now());
            app.metrics.pressure.answered_after_arrival(latency);
        }
    }
    if reply.close && parts.version <= Version::HTTP_11 && body_invited && !body.is_end_stream() {
        // hyper drains at most one read of an unread body and then closes,
        // which resets a client still writing it before it reads our answer
        // (see `http1::Linger`). While a task holds the body, hyper keeps
        // reading it alongside sending the response, and closes once the
        // body ends or the task drops it at a bound.
        tokio::spawn(discard_body(body, app.linger_limits()));
    }
    let response = into_response(&app, reply, parts.version);
    match public {
        // Counted as public pressure until hyper drops the body.
        Some(guard) => response.map(|inner| GuardedBody::new(inner, guard).boxed()),
        None => response,
    }
}

/// [`App`]'s decision on a request, after waiting (bounded) for the peers, then the
/// object-store tier, to fill a local miss.
async fn decide(app: &Arc<App>, mut info: RequestInfo<'_>) -> Decision {
    let mut decision = handle_cached(app, &info);
    if let Decision::Fetch { namespace, key } = &decision {
        // A miss the peers may fill: wait (bounded) for the one fetch of
        // this key, then decide again from the store.
        if let Some(rt) = app.miss_fetcher() {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            rt.request(
                namespace,
                key,
                Box::new(move || {
                    let _ = tx.send(());
                }),
            );
            // The read-through ends every fetch by its timeout; the margin
            // only guards against a waiter that is never called.
            let _ = tokio::time::timeout(rt.timeout() + Duration::from_secs(1), rx).await;
        }
        info = RequestInfo {
            read_through: false,
            ..info
        };
        decision = handle_cached(app, &info);
    }
    if let (Decision::Cold { namespace, key }, Some(tier)) = (&decision, app.miss_reader()) {
        // A local miss to read through from the object-store tier: wait for
        // the fetch (it runs on the tier's runtime), then decide again.
        let (tx, rx) = tokio::sync::oneshot::channel();
        tier.read_through_then(namespace.clone(), key.clone(), move |outcome| {
            let _ = tx.send(outcome);
        });
        let _ = rx.await;
        decision = handle_cached(app, &info);
    }
    decision
}

/// Receives a PUT body into `sink`, waiting at most `body_read_timeout` for each piece, and
/// commits it; the reply says how that went.
async fn receive_body(
    app: &App,
    body: &mut Incoming,
    mut sink: PutSink,
    body_read_timeout: Duration,
) -> Reply {
    let mut failed = None;
    loop {
        // Idle time between body pieces is bounded, as on the ring: a client that
        // declares a length and stalls must not hold the request open forever.
        let Ok(frame) = tokio::time::timeout(body_read_timeout, body.frame()).await else {
            tracing::debug!("PUT body stalled past body_read_timeout_ms");
            failed = Some(sink.refuse(Reply::error(408, "request body timed out").closing()));
            break;
        };
        let Some(frame) = frame else { break };
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(reply) = sink.write(data) {
                        failed = Some(reply);
                        break;
                    }
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, "PUT body aborted by the client");
                failed =
                    Some(sink.refuse(Reply::error(400, "request body was cut short").closing()));
                break;
            }
        }
    }
    match failed {
        Some(reply) => {
            app.metrics.count_put_aborted();
            reply
        }
        None => commit(sink).await,
    }
}

/// Publishes a received upload, and for a write-through waits for the tier's reply.
async fn commit(sink: PutSink) -> Reply {
    // Commit may fsync: keep it off the async worker.
    match tokio::task::spawn_blocking(move || sink.finish_parts()).await {
        Ok(Ok(reply)) => reply,
        // A write-through: its reply comes when the tier has it.
        Ok(Err(later)) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            later.run(Box::new(move |reply| {
                let _ = tx.send(reply);
            }));
            rx.await
                .unwrap_or_else(|_| Reply::error(500, "the upload's last step failed").closing())
        }
        Err(_) => Reply::error(500, "upload commit failed").closing(),
    }
}

/// Open artifact files kept per fallback worker thread, at most.
pub const OPEN_FILES_PER_WORKER_MAX: usize = 256;
/// Lookups between two sweeps of a worker's open-file cache, which drop the files of
/// artifacts replaced or deleted since (so their disk space is freed).
const OPEN_FILES_SWEEP_LOOKUPS: u32 = 1024;

thread_local! {
    /// This worker's open-file cache: without it every GET paid `openat` + `statx` + header
    /// read + `close`, 16% of the fallback's CPU in the TLS profile (docs/benchmarks.md). The
    /// ring keeps one per core the same way; reads are positioned, so the shared descriptor's
    /// offset never matters.
    static OPEN_FILES: RefCell<(OpenCache, u32)> =
        RefCell::new((OpenCache::new(OPEN_FILES_PER_WORKER_MAX), 0));
}

/// [`App::handle`] through this worker's open-file cache.
fn handle_cached(app: &App, info: &RequestInfo<'_>) -> Decision {
    OPEN_FILES.with(|cell| match cell.try_borrow_mut() {
        Ok(mut guard) => {
            let (files, lookups) = &mut *guard;
            *lookups += 1;
            if *lookups >= OPEN_FILES_SWEEP_LOOKUPS {
                *lookups = 0;
                app.store.sweep_cache(files);
            }
            app.handle_with(info, Some(files))
        }
        // Not reentrant, but should it ever be, serve without the cache.
        Err(_) => app.handle(info),
    })
}

/// Reads and drops what is left of a request body, within `limits`.
async fn discard_body(mut body: Incoming, limits: crate::http1::LingerLimits) {
    use crate::http1::{Linger, LingerStep};
    let Some((mut linger, mut step)) = Linger::start(limits, Instant::now()) else {
        return;
    };
    while let LingerStep::ReadUntil(deadline) = step {
        let frame = tokio::time::timeout_at(deadline.into(), body.frame()).await;
        step = match frame {
            Ok(Some(Ok(frame))) => {
                let received = frame.data_ref().map_or(0, |data| data.len());
                // An empty frame (trailers) is not the end of the body.
                linger.on_read(received.max(1), Instant::now())
            }
            // The body ended, failed, or the client went quiet.
            _ => LingerStep::Close,
        };
    }
}

fn into_response(app: &Arc<App>, mut reply: Reply, version: Version) -> Response<ResponseBody> {
    let mut builder = Response::builder().status(reply.status);
    // Each value's String becomes the header value's buffer as it is, without a copy.
    for (name, value) in std::mem::take(&mut reply.headers) {
        builder = builder.header(name, value);
    }
    if let Some(len) = reply.content_length {
        builder = builder.header("content-length", len);
    }
    // Connection-specific headers are forbidden in HTTP/2.
    if reply.close && version <= Version::HTTP_11 {
        builder = builder.header("connection", "close");
    }
    let body: ResponseBody = match reply.body {
        ReplyBody::Empty => body_from_bytes(Bytes::new()),
        ReplyBody::Bytes(bytes) => {
            app.metrics
                .add_response_bytes(BytePath::Fallback, bytes.len() as u64);
            body_from_bytes(bytes)
        }
        // A hot-set entry: the shared bytes themselves, no read and no copy.
        ReplyBody::Memory(bytes) => {
            app.metrics
                .add_response_bytes(BytePath::Fallback, bytes.len() as u64);
            body_from_bytes(bytes)
        }
        ReplyBody::File {
            artifact,
            offset,
            len,
        } => {
            if len <= INLINE_BODY_BYTES_MAX {
                // One pread on this worker, as nginx reads a small file in its worker: the
                // open already happened here (`App::handle`), the bytes are almost always in
                // the page cache, and a trip through the blocking pool costs more than the
                // read. The whole response then goes out in one write (one TLS record).
                match small_body(&artifact, offset, len) {
                    Ok(bytes) => {
                        app.metrics
                            .add_response_bytes(BytePath::Fallback, bytes.len() as u64);
                        body_from_bytes(bytes)
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "artifact could not be read");
                        return internal_error();
                    }
                }
            } else {
                FileBody::new(artifact.file, offset, len, Arc::clone(app)).boxed()
            }
        }
    };
    match builder.body(body) {
        Ok(response) => response,
        Err(err) => {
            tracing::error!(error = %err, "building a response failed");
            internal_error()
        }
    }
}

/// An empty `500`, for when the reply cannot be built or its file cannot be read.
fn internal_error() -> Response<ResponseBody> {
    let mut response = Response::new(body_from_bytes(Bytes::new()));
    *response.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
    response
}

/// Bytes of small artifact bodies one fallback worker keeps in memory, at most.
pub const SMALL_BODIES_PER_WORKER_BYTES_MAX: usize = 2 * 1024 * 1024;

/// Small bodies read on this worker, by the sha256 of the body: the digest names the bytes,
/// so an artifact replaced with other content is another entry and nothing goes stale.
#[derive(Default)]
struct SmallBodies {
    by_digest: std::collections::HashMap<[u8; 32], Bytes, DigestHash>,
    bytes: usize,
}

/// Hashes a sha256 digest by its first eight bytes: they are already uniform, and SipHash
/// over all 32 cost more than the lookup it served.
#[derive(Clone, Copy, Default)]
struct DigestHash;

impl std::hash::BuildHasher for DigestHash {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

/// See [`DigestHash`]. Every `write` is folded in by its first eight bytes (a key hashes as its
/// length, then its bytes; the length is the same for every key).
struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut first = [0u8; 8];
        let n = bytes.len().min(8);
        first[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_ne_bytes(first);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

thread_local! {
    /// This worker's small bodies: a hot 4 KiB GET paid a `pread` (syscall and copy) every
    /// time, 8 % of the fallback's CPU for TLS h2 in the profile of issue 20. Bounded by
    /// [`SMALL_BODIES_PER_WORKER_BYTES_MAX`]; when full it starts again empty, which keeps
    /// the bound without bookkeeping per entry (a scan of cold artifacts costs one refill).
    static SMALL_BODIES: RefCell<SmallBodies> = RefCell::new(SmallBodies::default());
}

/// `len` bytes at the absolute file offset `offset` of a small artifact (whole body at most
/// [`INLINE_BODY_BYTES_MAX`]), from this worker's memory when it read the same body before.
fn small_body(artifact: &crate::store::Artifact, offset: u64, len: u64) -> std::io::Result<Bytes> {
    let start = offset.saturating_sub(artifact.body_offset) as usize;
    let end = start + len as usize;
    if artifact.len > INLINE_BODY_BYTES_MAX || end as u64 > artifact.len {
        return read_at(&artifact.file, offset, len as usize);
    }
    let cached = SMALL_BODIES.with(|cell| {
        cell.try_borrow()
            .ok()
            .and_then(|bodies| bodies.by_digest.get(&artifact.sha256).cloned())
    });
    let body = match cached {
        Some(body) if body.len() as u64 == artifact.len => body,
        _ => {
            let body = read_at(&artifact.file, artifact.body_offset, artifact.len as usize)?;
            SMALL_BODIES.with(|cell| {
                if let Ok(mut bodies) = cell.try_borrow_mut() {
                    if bodies.bytes + body.len() > SMALL_BODIES_PER_WORKER_BYTES_MAX {
                        bodies.by_digest.clear();
                        bodies.bytes = 0;
                    }
                    bodies.bytes += body.len();
                    if let Some(old) = bodies.by_digest.insert(artifact.sha256, body.clone()) {
                        bodies.bytes -= old.len();
                    }
                }
            });
            body
        }
    };
    Ok(body.slice(start..end))
}

/// Reads `len` bytes at `offset` with one positioned read (no shared file offset: the open-file
/// cache shares the descriptor between requests). A file shorter than its header promised is
/// an error, never a short body under a longer `Content-Length`.
fn read_at(file: &File, offset: u64, len: usize) -> std::io::Result<Bytes> {
    // Read into uninitialised capacity: zeroing what the read overwrites at once cost as
    // much as the read itself for a 4 KiB body (calloc, in the callgrind profile of issue 20).
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        let spare = rustix::buffer::spare_capacity(&mut buf);
        match rustix::io::pread(file, spare, at) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(Bytes::from(buf))
}

/// Bytes of one blocking-pool read of a large body: the first chunk is small so the first
/// bytes leave soon, later ones are large so a 64 MiB artifact costs 64 pool trips, not 256.
fn chunk_bytes(sent_bytes: u64) -> u64 {
    if sent_bytes == 0 {
        FIRST_CHUNK_BYTES
    } else {
        FILE_CHUNK_BYTES
    }
}

/// Chunk buffers kept for reuse, at most ([`FILE_CHUNK_BYTES`] each, so 16 MiB). A fresh
/// 1 MiB buffer per chunk cost page faults and zeroing: 14% of the fallback's CPU serving a
/// 17.9 MB artifact (docs/benchmarks.md, Off the ring). Sixteen cover eight large bodies in
/// flight (one chunk being sent and one read ahead each); 32 made the pool the largest part of
/// the fallback's RSS under large bodies (issue 20: 40 MiB against nginx's 25).
const CHUNK_BUFFERS_MAX: usize = 16;

/// Free chunk buffers; a chunk's buffer comes back here when hyper drops its `Bytes`.
static CHUNK_BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A chunk read into a reusable buffer; returns the buffer to [`CHUNK_BUFFERS`] on drop.
struct PooledChunk {
    buf: Vec<u8>,
    len: usize,
}

impl AsRef<[u8]> for PooledChunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for PooledChunk {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if let Ok(mut free) = CHUNK_BUFFERS.lock() {
            if free.len() < CHUNK_BUFFERS_MAX {
                free.push(buf);
            }
        }
    }
}

/// [`read_at`] of at most [`FILE_CHUNK_BYTES`] into a pooled buffer.
fn read_chunk_at(file: &File, offset: u64, len: usize) -> std::io::Result<Bytes> {
    let len = len.min(FILE_CHUNK_BYTES as usize);
    let reused = CHUNK_BUFFERS.lock().ok().and_then(|mut free| free.pop());
    let mut buf = reused.unwrap_or_else(|| vec![0u8; FILE_CHUNK_BYTES as usize]);
    file.read_exact_at(&mut buf[..len], offset)?;
    Ok(Bytes::from_owner(PooledChunk { buf, len }))
}

type ChunkRead = tokio::task::JoinHandle<std::io::Result<Bytes>>;

/// Streams `remaining_bytes` of an artifact file from `offset`, with positioned reads on the
/// blocking pool and one read ahead: while hyper (and rustls) send one chunk, the next is
/// already being read.
struct FileBody {
    file: Arc<File>,
    offset: u64,
    /// Bytes not yet handed to hyper.
    remaining_bytes: u64,
    /// Bytes not yet asked of the blocking pool.
    unread_bytes: u64,
    sent_bytes: u64,
    reading: Option<ChunkRead>,
    app: Arc<App>,
}

impl FileBody {
    fn new(file: Arc<File>, offset: u64, len: u64, app: Arc<App>) -> FileBody {
        FileBody {
            file,
            offset,
            remaining_bytes: len,
            unread_bytes: len,
            sent_bytes: 0,
            reading: None,
            app,
        }
    }

    /// Starts the next read, if any bytes are left to read.
    fn read_next(&mut self) {
        if self.unread_bytes == 0 || self.reading.is_some() {
            return;
        }
        let want = self.unread_bytes.min(chunk_bytes(self.len_done_or_asked()));
        let file = Arc::clone(&self.file);
        let offset = self.offset;
        self.offset += want;
        self.unread_bytes -= want;
        self.reading = Some(tokio::task::spawn_blocking(move || {
            read_chunk_at(&file, offset, want as usize)
        }));
    }

    fn len_done_or_asked(&self) -> u64 {
        self.sent_bytes + (self.remaining_bytes - self.unread_bytes)
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.remaining_bytes == 0 {
            return Poll::Ready(None);
        }
        self.read_next();
        let Some(reading) = self.reading.as_mut() else {
            return Poll::Ready(None);
        };
        let result = match Pin::new(reading).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(result) => result,
        };
        self.reading = None;
        let bytes = match result {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(err)) => return Poll::Ready(Some(Err(err))),
            Err(join) => return Poll::Ready(Some(Err(std::io::Error::other(join)))),
        };
        let n = bytes.len() as u64;
        self.remaining_bytes -= n;
        self.sent_bytes += n;
        self.app.metrics.add_response_bytes(BytePath::Fallback, n);
        // Read ahead while this chunk is sent.
        self.read_next();
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining_bytes == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// An artifact whose file holds `header` filler bytes, then `body`; `digest` stands in for
    /// the body's sha256.
    fn artifact(body: &[u8], header: usize, digest: u8) -> crate::store::Artifact {
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(&vec![0xaa; header]).expect("header");
        file.write_all(body).expect("body");
        crate::store::Artifact {
            file: Arc::new(file),
            body_offset: header as u64,
            len: body.len() as u64,
            sha256: [digest; 32],
            meta: None,
        }
    }

    #[test]
    fn small_bodies_come_from_memory_after_the_first_read_and_ranges_slice_them() {
        let a = artifact(b"hello world", 16, 201);
        assert_eq!(&small_body(&a, 16, 11).expect("read")[..], b"hello world");
        assert_eq!(&small_body(&a, 22, 5).expect("range")[..], b"world");
        // The same digest comes from memory: emptying the file changes nothing.
        a.file.set_len(0).expect("truncate");
        assert_eq!(&small_body(&a, 16, 5).expect("cached")[..], b"hello");
        // Another digest is read from its own file.
        let b = artifact(b"other bytes", 3, 202);
        assert_eq!(&small_body(&b, 3, 5).expect("read")[..], b"other");
        // A file shorter than its header promised is an error, never a short body.
        let c = artifact(b"abc", 0, 203);
        c.file.set_len(1).expect("truncate");
        assert!(small_body(&c, 0, 3).is_err());
    }
}
