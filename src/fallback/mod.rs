//! The hyper + rustls fallback front end (DESIGN.md, data flow step 4).
//!
//! Everything the io_uring fast path does not take comes here: TLS (rustls, ALPN `h2` and
//! `http/1.1`), h2c with prior knowledge, and plaintext HTTP/1.1 whenever the ring engine is off
//! or declines a connection. Every request is served by a caller-supplied [`Handler`], so the
//! fallback knows nothing about routes or the store; it only owns sockets, protocols and limits.
//!
//! # Threads
//!
//! [`Fallback::start`] builds one multi-thread tokio runtime with `worker_threads` worker
//! threads (config `fallback_threads`, by default as many as the ring engine's threads; the
//! constant [`WORKER_THREADS`] only in tests) named `sluice-fallback` and at most
//! [`BLOCKING_THREADS_MAX`] blocking-pool threads (large artifact reads run there). It used to
//! be a constant two, but when io_uring is unavailable this runtime serves all traffic, and
//! TLS costs CPU per byte: the profile in docs/benchmarks.md ("Off the ring") shows the
//! workers busy, not waiting, so they scale with the cores like the engine does.
//!
//! # Connections
//!
//! Connections arrive either by [`Fallback::handoff`] (an engine thread accepted the socket and
//! only `MSG_PEEK`ed it, so nothing was consumed) or from a listener given to
//! [`Fallback::serve_listener`]. Each connection holds one of `connections_max` slots from
//! accept (or hand-off) until it closes; the queue between hand-off and the runtime is bounded
//! too. Per connection the first bytes are peeked again under the header-read deadline:
//! `0x16` is a TLS ClientHello, the 24-byte h2 preface is h2c, anything else is HTTP/1.1.
//!
//! # Slots under pressure (`slots.rs`)
//!
//! When every slot is taken, the connection idle longest (no handler running and no response
//! body being sent: an HTTP/1 keep-alive between requests, an h2 connection with no open
//! stream, a connection still in its TLS handshake or before its first request) is told to
//! close, and the new one is admitted at once, as nginx reuses keep-alive connections when
//! `worker_connections` run out. Only when every slot serves a request is the new one refused:
//! [`Fallback::answer_refused`] peeks it briefly and answers HTTP/1 `503` with `retry-after`;
//! TLS and h2c are closed, since no status can be sent before a handshake or an h2 session.
//! One client address holds at most `connections_per_ip_max` slots. Shed and refused
//! connections are counted in [`FallbackStats`].
//!
//! # Time bounds
//!
//! - `header_read_timeout_ms`: from accept to classification and a finished TLS handshake,
//!   and for HTTP/1 to the end of the first head; later heads get it from their first byte.
//!   The guard under hyper (`guard.rs`) answers `408` when it passes (hyper's own head timeout,
//!   which closes silently and starts when hyper begins to wait, is off).
//! - `idle_timeout_ms`: no socket progress and no request in flight: a graceful close (GOAWAY
//!   for h2). The server sends no keep-alive PINGs: their answers would count as progress.
//! - `send_timeout_ms`: a write that waits, or a response body in flight with nothing written,
//!   for that long closes the connection (nginx's `send_timeout`; an h2 client that opens no
//!   flow-control window never makes a write wait). It also bounds a graceful close the client
//!   does not finish (h2's GOAWAY is followed by a PING whose answer hyper would otherwise
//!   await for ever).
//! - `body_read_timeout_ms` is the handler's (`app_handler.rs`): idle time between request-body
//!   pieces, then `408`; on h2 that ends the stream, not the connection.
//!
//! # Limits on what a client sends
//!
//! - An HTTP/1 request target over `uri_bytes_max` gets `414` from the guard as soon as the
//!   request line shows it, however long (hyper would answer 431 past its head bound, or let a
//!   9,000-byte target through); an h2 `:path` gets it from the handler.
//! - Every HTTP/1 head goes through the ring's sans-IO core in the guard first
//!   ([`FallbackLimits::head_bytes_max`], the ring's framing rules: CL with TE, repeated or
//!   signed CL, unknown TE, obs-fold, missing Host, ...), which answers the core's status (400,
//!   414, 417, 431, 505) and closes, so every front gives the same bytes the same answer.
//!   Hyper's own head bound ([`HTTP1_HEAD_BYTES_MAX`]) is only a backstop behind it.
//! - HTTP/2: [`H2_STREAMS_MAX`] concurrent streams, [`H2_HEADER_LIST_BYTES_MAX`] of headers
//!   (431 from h2), h2's burst limits on resets ([`H2_PENDING_ACCEPT_RESETS_MAX`],
//!   [`H2_LOCAL_ERROR_RESETS_MAX`]), and the guard's count of RST_STREAM frames per window
//!   ([`H2_RESETS_PER_WINDOW_MAX`] per [`H2_RESET_WINDOW`]), which catches the paced rapid
//!   reset the burst limits miss: GOAWAY ENHANCE_YOUR_CALM, then close.
//!
//! # Decisions where the brief was silent
//!
//! - A TLS ClientHello arriving while TLS is not configured is closed without a reply: there is
//!   no way to answer it meaningfully, and it is counted in [`FallbackStats::rejected_total`].
//! - [`Fallback::handoff`] returns a refused socket at once so the engine thread never blocks;
//!   the engine passes it back to [`Fallback::answer_refused`].
//! - The guard writes its own `408`/`414`/GOAWAY only where nothing of hyper's can be
//!   interleaved (HTTP/1: no request in flight; h2: between frames, else it just closes), then
//!   half-closes and drains the client's input briefly, so a reset does not destroy the answer.

pub mod app_handler;
mod guard;
mod slots;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;
use tracing::{debug, warn};

use guard::{Activity, GuardIo, H2Watch, Http1Watch, Watch};
pub use guard::{H2_RESETS_PER_WINDOW_MAX, H2_RESET_WINDOW};
pub use slots::SHEDDING_MAX;
use slots::{Admitted, Refusal, SlotTable};

/// Worker threads of [`FallbackLimits::default`] (the server sizes the runtime from the config).
pub const WORKER_THREADS: usize = 2;
/// Upper bound on tokio's blocking pool (file I/O from handlers runs there).
pub const BLOCKING_THREADS_MAX: usize = 16;
/// Bound on connections queued between [`Fallback::handoff`] / the accept loop and the runtime.
pub const HANDOFF_QUEUE_MAX: usize = 1024;
/// Largest HTTP/1 request head in bytes; a larger head answers 431 and closes.
pub const HTTP1_HEAD_BYTES_MAX: usize = 64 * 1024;
/// HTTP/1 read and write buffer bound per connection, in bytes. Larger than the head limit so
/// upload bodies arrive in big reads.
pub const HTTP1_BUF_BYTES_MAX: usize = 256 * 1024;
/// Write buffer between h2 and rustls on a TLS h2 connection, in bytes: frames written
/// until h2 flushes are coalesced into as few TLS records and syscalls as fit.
pub const H2_TLS_WRITE_BUF_BYTES: usize = 32 * 1024;
/// HTTP/2 concurrent streams a client may open per connection.
pub const H2_STREAMS_MAX: u32 = 128;
/// HTTP/2 bound on the decoded header list of one request, in bytes.
pub const H2_HEADER_LIST_BYTES_MAX: u32 = 64 * 1024;
/// HTTP/2 receive window per stream, in bytes. The 64 KiB protocol default caps an upload at
/// one window per round trip; 1 MiB keeps large artifact PUTs near line rate on a LAN.
pub const H2_STREAM_WINDOW_BYTES: u32 = 1024 * 1024;
/// HTTP/2 receive window per connection, in bytes (bounds buffered upload data per connection).
pub const H2_CONNECTION_WINDOW_BYTES: u32 = 2 * 1024 * 1024;
/// HTTP/2 streams the client reset before the server accepted them, at most at once (h2's
/// burst rapid-reset guard; over it, GOAWAY ENHANCE_YOUR_CALM). hyper's default is 20.
pub const H2_PENDING_ACCEPT_RESETS_MAX: usize = 20;
/// HTTP/2 streams the server reset for the client's protocol errors before GOAWAY
/// ENHANCE_YOUR_CALM (h2's guard against provoking resets). hyper's default is 1024.
pub const H2_LOCAL_ERROR_RESETS_MAX: usize = 256;
/// Refused connections answered at once (peek, 503 for HTTP/1, close), at most; past it a
/// refused connection is closed without a status.
pub const REFUSALS_IN_FLIGHT_MAX: usize = 64;
/// How long a refused connection is given to show its first bytes, so HTTP/1 can get a 503.
const REFUSAL_PEEK: Duration = Duration::from_millis(500);

// hyper panics on a read buffer under 8 KiB, and the head must fit in the buffer.
const _: () = assert!(HTTP1_BUF_BYTES_MAX >= 8192 && HTTP1_BUF_BYTES_MAX >= HTTP1_HEAD_BYTES_MAX);
// HTTP/2 requires the connection window to hold at least one stream window to be useful.
const _: () = assert!(H2_CONNECTION_WINDOW_BYTES >= H2_STREAM_WINDOW_BYTES);
// Engine threads share one handle, so it must cross threads.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<Fallback>();
};

/// The h2 prior-knowledge connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// First byte of a TLS handshake record (content type 22).
const TLS_HANDSHAKE_BYTE: u8 = 0x16;
/// Pause between peeks while only part of the h2 preface has arrived: `peek` returns at once
/// while unread bytes remain, so re-peeking without a pause would spin.
const SNIFF_RETRY: Duration = Duration::from_millis(2);
/// Pause after a failed `accept` (EMFILE and friends) so the loop does not spin on the error.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(20);
/// How often `shutdown` looks at the connection gauge while draining.
const DRAIN_POLL: Duration = Duration::from_millis(5);
/// How long `shutdown` lets the runtime cancel its remaining tasks after the drain budget.
const RUNTIME_TEARDOWN: Duration = Duration::from_millis(200);

/// The response body type handlers return: boxed so a handler can stream a file as well as
/// send a small buffer.
pub type ResponseBody = BoxBody<Bytes, io::Error>;

/// A whole-buffer [`ResponseBody`].
pub fn body_from_bytes(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty [`ResponseBody`] (HEAD, 304, 204).
pub fn empty_body() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Facts about the connection a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// Whether TLS ALPN negotiated `h2` (false for h2c, which has no ALPN).
    pub alpn_h2: bool,
}

/// Serves every request the fallback receives. Implemented by the router.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. Errors are responses (4xx/5xx); a body that fails mid-stream ends
    /// the connection (HTTP/1) or resets the stream (HTTP/2).
    fn call(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<ResponseBody>> + Send;
}

/// Bounds of the fallback. Zero is rejected by [`Fallback::start`] except for
/// `connections_per_ip_max`, where it means no cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FallbackLimits {
    /// Open connections at most, counting those queued after hand-off.
    pub connections_max: usize,
    /// Open connections one client address may hold (0 = no cap).
    pub connections_per_ip_max: usize,
    /// Milliseconds from accept to a classified connection with a finished TLS handshake and
    /// the first HTTP/1 request head; then for each later head from its first byte (408).
    pub header_read_timeout_ms: u64,
    /// Milliseconds without socket progress, while no request is in flight, before a
    /// connection is closed gracefully.
    pub idle_timeout_ms: u64,
    /// Milliseconds a response may wait for a client that does not read before the connection
    /// closes; also the bound on a graceful close (GOAWAY and its PING) the client ignores.
    pub send_timeout_ms: u64,
    /// Longest HTTP/1 request target in bytes (414 above).
    pub uri_bytes_max: usize,
    /// Longest HTTP/1 request head in bytes (431 above), as the ring's `head_bytes_max`.
    pub head_bytes_max: usize,
    /// Worker threads of the runtime (`fallback_threads`; the server passes the engine's
    /// thread count when it is 0).
    pub worker_threads: usize,
}

impl Default for FallbackLimits {
    /// The config's defaults, and [`WORKER_THREADS`] workers.
    fn default() -> Self {
        FallbackLimits {
            connections_max: 1024,
            connections_per_ip_max: 0,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            send_timeout_ms: 30_000,
            uri_bytes_max: 8192,
            head_bytes_max: 16 * 1024,
            worker_threads: WORKER_THREADS,
        }
    }
}

/// Snapshot of the fallback's gauges and counters for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FallbackStats {
    /// Connections open now (gauge), including queued hand-offs.
    pub connections: usize,
    /// Connections served as TLS with ALPN `h2`.
    pub accepted_tls_h2_total: u64,
    /// Connections served as TLS with HTTP/1.1 (ALPN `http/1.1` or none).
    pub accepted_tls_http1_total: u64,
    /// Connections served as h2c (prior knowledge).
    pub accepted_h2c_total: u64,
    /// Connections served as plaintext HTTP/1.1.
    pub accepted_http1_total: u64,
    /// Hand-offs refused (at capacity, queue full or shut down); the caller got the socket back.
    pub handoff_refused_total: u64,
    /// Connections closed before serving: peer closed or timed out before classification or
    /// handshake, failed handshake, or TLS while TLS is not configured.
    pub rejected_total: u64,
    /// Idle connections closed to admit a new one while all slots were taken.
    pub shed_idle_total: u64,
    /// Connections refused because every slot served a request (503 for HTTP/1, else closed).
    pub refused_full_total: u64,
    /// Connections refused because their address held `connections_per_ip_max`.
    pub refused_per_ip_total: u64,
    /// Connections closed because the client did not read a response for `send_timeout_ms`
    /// (or ignored a graceful close for as long).
    pub send_timeout_total: u64,
    /// HTTP/1 heads not complete within `header_read_timeout_ms` (answered 408).
    pub head_timeout_total: u64,
    /// HTTP/1 request targets over `uri_bytes_max` refused before hyper parsed them (414).
    pub uri_too_long_total: u64,
    /// HTTP/2 connections sent GOAWAY ENHANCE_YOUR_CALM for resetting streams too often.
    pub h2_reset_flood_total: u64,
    /// HTTP/1 requests the sans-IO core's framing rules refused before hyper saw their head
    /// (answered 400, 417, 431, 414 or 505 and closed, as on the ring).
    pub head_refused_total: u64,
}

/// Why a TLS certificate or key could not be loaded. Every variant names the file(s).
#[derive(Debug)]
pub enum TlsError {
    /// The file could not be read (missing, permissions, ...).
    Read { path: PathBuf, source: io::Error },
    /// The file is not valid PEM.
    Pem { path: PathBuf, source: io::Error },
    /// The certificate file holds no `CERTIFICATE` block.
    NoCertificate { path: PathBuf },
    /// The key file holds no PKCS#8, PKCS#1 or SEC1 private key block.
    NoPrivateKey { path: PathBuf },
    /// The private key is not the key of the first certificate.
    KeyMismatch {
        cert_path: PathBuf,
        key_path: PathBuf,
    },
    /// rustls refused the pair for another reason (e.g. an unsupported key type).
    Rejected {
        cert_path: PathBuf,
        key_path: PathBuf,
        source: rustls::Error,
    },
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { path, source } => {
                write!(f, "cannot read TLS file {}: {source}", path.display())
            }
            TlsError::Pem { path, source } => {
                write!(f, "TLS file {} is not valid PEM: {source}", path.display())
            }
            TlsError::NoCertificate { path } => write!(
                f,
                "no certificate in {}: expected a PEM block 'BEGIN CERTIFICATE'",
                path.display()
            ),
            TlsError::NoPrivateKey { path } => write!(
                f,
                "no private key in {}: expected a PEM block 'BEGIN PRIVATE KEY', \
                 'BEGIN RSA PRIVATE KEY' or 'BEGIN EC PRIVATE KEY'",
                path.display()
            ),
            TlsError::KeyMismatch {
                cert_path,
                key_path,
            } => write!(
                f,
                "private key {} does not match the certificate in {}",
                key_path.display(),
                cert_path.display()
            ),
            TlsError::Rejected {
                cert_path,
                key_path,
                source,
            } => write!(
                f,
                "certificate {} with key {} rejected: {source}",
                cert_path.display(),
                key_path.display()
            ),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::Read { source, .. } | TlsError::Pem { source, .. } => Some(source),
            TlsError::Rejected { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Loads the server's TLS configuration.
pub struct TlsSettings;

impl TlsSettings {
    /// Reads a PEM certificate chain (leaf first) and a PEM private key and builds a rustls
    /// server configuration with the ring provider, TLS 1.2 and 1.3, no client auth, and ALPN
    /// `h2` then `http/1.1` (a client offering both gets h2).
    pub fn load(cert_pem: &Path, key_pem: &Path) -> Result<Arc<ServerConfig>, TlsError> {
        let cert_bytes = read_file(cert_pem)?;
        let certs: Vec<_> = rustls_pemfile::certs(&mut cert_bytes.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|source| TlsError::Pem {
                path: cert_pem.to_path_buf(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate {
                path: cert_pem.to_path_buf(),
            });
        }
        let key_bytes = read_file(key_pem)?;
        let key = rustls_pemfile::private_key(&mut key_bytes.as_slice())
            .map_err(|source| TlsError::Pem {
                path: key_pem.to_path_buf(),
                source,
            })?
            .ok_or_else(|| TlsError::NoPrivateKey {
                path: key_pem.to_path_buf(),
            })?;
        let rejected = |source: rustls::Error| match source {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert_path: cert_pem.to_path_buf(),
                    key_path: key_pem.to_path_buf(),
                }
            }
            source => TlsError::Rejected {
                cert_path: cert_pem.to_path_buf(),
                key_path: key_pem.to_path_buf(),
                source,
            },
        };
        // The provider is passed explicitly: a process-wide default may be unset, or set to a
        // different provider by another crate, and either would make start-up order matter.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(rejected)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(rejected)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Why [`Fallback::handoff`] refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffRefusal {
    /// `connections_max` connections serve requests; none was idle to make room.
    AtCapacity,
    /// The client's address holds `connections_per_ip_max` connections.
    PerIpCap,
    /// The hand-off queue is full (the runtime is not keeping up).
    QueueFull,
    /// [`Fallback::shutdown`] has begun.
    ShutDown,
}

/// A refused hand-off; the socket comes back untouched so the caller can answer 503 or close.
#[derive(Debug)]
pub struct HandoffError {
    /// The connection, still unread.
    pub stream: std::net::TcpStream,
    /// The client's address, as passed in.
    pub peer: SocketAddr,
    /// Why it was refused.
    pub reason: HandoffRefusal,
}

impl fmt::Display for HandoffError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.reason {
            HandoffRefusal::AtCapacity => "fallback at connections_max",
            HandoffRefusal::PerIpCap => "client address at connections_per_ip_max",
            HandoffRefusal::QueueFull => "fallback hand-off queue full",
            HandoffRefusal::ShutDown => "fallback shut down",
        };
        write!(f, "hand-off of {} refused: {why}", self.peer)
    }
}

impl std::error::Error for HandoffError {}

/// The first bytes of a connection, classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sniffed {
    Tls,
    H2c,
    Http1,
}

/// Classifies what has been peeked so far; `None` means "a strict prefix of the h2 preface,
/// wait for more". `bytes` must not be empty.
fn classify_prefix(bytes: &[u8]) -> Option<Sniffed> {
    let len = bytes.len().min(H2_PREFACE.len());
    if bytes.first() == Some(&TLS_HANDSHAKE_BYTE) {
        Some(Sniffed::Tls)
    } else if bytes[..len] != H2_PREFACE[..len] {
        Some(Sniffed::Http1)
    } else if len == H2_PREFACE.len() {
        Some(Sniffed::H2c)
    } else {
        None
    }
}

/// Peeks (never reads) until the connection can be classified; `None` if the peer closed.
async fn sniff(stream: &TcpStream) -> io::Result<Option<Sniffed>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let seen = stream.peek(&mut buf).await?;
        if seen == 0 {
            return Ok(None);
        }
        if let Some(kind) = classify_prefix(&buf[..seen]) {
            return Ok(Some(kind));
        }
        tokio::time::sleep(SNIFF_RETRY).await;
    }
}

/// The slot table, shared by the accept paths and every connection's slot.
type Table = Arc<Mutex<SlotTable<Activity>>>;

fn lock(table: &Table) -> MutexGuard<'_, SlotTable<Activity>> {
    // Nothing panics while the lock is held, so a poisoned table still holds valid state.
    table
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One of `connections_max` slots, held by an open (or queued) connection from admission until
/// it closes. It carries the connection's [`Activity`], which the table reads to choose an
/// idle connection to shed.
struct ConnSlot {
    id: u64,
    activity: Arc<Activity>,
    table: Table,
    gauge: Arc<AtomicUsize>,
}

impl ConnSlot {
    /// Admits a connection from `peer`, shedding the longest-idle one when full.
    fn admit(
        table: &Table,
        gauge: &Arc<AtomicUsize>,
        counters: &Counters,
        peer: SocketAddr,
    ) -> Result<ConnSlot, HandoffRefusal> {
        let activity = Arc::new(Activity::new());
        let admitted = lock(table).admit(peer.ip(), activity.clone());
        match admitted {
            Ok((id, how)) => {
                if how == Admitted::Shed {
                    counters.shed_idle.fetch_add(1, Ordering::Relaxed);
                }
                gauge.fetch_add(1, Ordering::Relaxed);
                Ok(ConnSlot {
                    id,
                    activity,
                    table: table.clone(),
                    gauge: gauge.clone(),
                })
            }
            Err(Refusal::Full) => {
                counters.refused_full.fetch_add(1, Ordering::Relaxed);
                Err(HandoffRefusal::AtCapacity)
            }
            Err(Refusal::PerIp) => {
                counters.refused_per_ip.fetch_add(1, Ordering::Relaxed);
                Err(HandoffRefusal::PerIpCap)
            }
            Err(Refusal::Closed) => Err(HandoffRefusal::ShutDown),
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        lock(&self.table).release(self.id);
        self.gauge.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A handed-off connection waiting for the runtime, with the slot it holds. The stream is
/// registered with the runtime's reactor on arrival, which needs the runtime's context.
struct Queued {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: ConnSlot,
}

/// Spawns the task serving one connection; erases the handler type so [`Fallback`] is not
/// generic.
type Spawner = Arc<dyn Fn(TcpStream, SocketAddr, ConnSlot) + Send + Sync>;

#[derive(Default)]
struct Counters {
    tls_h2: AtomicU64,
    tls_http1: AtomicU64,
    h2c: AtomicU64,
    http1: AtomicU64,
    handoff_refused: AtomicU64,
    rejected: AtomicU64,
    shed_idle: AtomicU64,
    refused_full: AtomicU64,
    refused_per_ip: AtomicU64,
    send_timeout: AtomicU64,
    head_timeout: AtomicU64,
    uri_too_long: AtomicU64,
    head_refused: AtomicU64,
    h2_calm: AtomicU64,
}

/// State shared by every task of the runtime.
struct Shared<H> {
    handler: Arc<H>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    send_timeout: Duration,
    /// The ring's head limits: the guard checks every HTTP/1 head against them.
    head_limits: crate::http1::Limits,
    counters: Arc<Counters>,
    shutdown: watch::Receiver<bool>,
}

/// A running fallback front end. Dropping it without [`Fallback::shutdown`] cancels every
/// connection at once.
pub struct Fallback {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    queue: mpsc::Sender<Queued>,
    spawner: Spawner,
    table: Table,
    gauge: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    /// Bounds the tasks that answer refused connections.
    refusals: Arc<Semaphore>,
    shutdown: watch::Sender<bool>,
    shutting_down: AtomicBool,
    /// Set to end a drain in progress at once (a second SIGTERM).
    drain_cut: Arc<AtomicBool>,
}

impl Fallback {
    /// Starts the runtime (see the module docs for its threads) and the task that serves
    /// handed-off and accepted connections. `tls: None` serves plaintext only and closes TLS
    /// connections. Fails on a zero limit or if the runtime's threads cannot be spawned.
    pub fn start<H: Handler>(
        handler: Arc<H>,
        tls: Option<Arc<ServerConfig>>,
        limits: FallbackLimits,
    ) -> Result<Fallback, io::Error> {
        for (key, value) in [
            ("connections_max", limits.connections_max as u64),
            ("header_read_timeout_ms", limits.header_read_timeout_ms),
            ("idle_timeout_ms", limits.idle_timeout_ms),
            ("send_timeout_ms", limits.send_timeout_ms),
            ("uri_bytes_max", limits.uri_bytes_max as u64),
            ("head_bytes_max", limits.head_bytes_max as u64),
            ("fallback_threads", limits.worker_threads as u64),
        ] {
            if value == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("fallback limit {key} = 0: must be at least 1"),
                ));
            }
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(limits.worker_threads)
            .max_blocking_threads(BLOCKING_THREADS_MAX)
            .thread_name("sluice-fallback")
            .enable_all()
            .build()?;
        let header_read_timeout = Duration::from_millis(limits.header_read_timeout_ms);
        // hyper's own builders, not hyper-util's auto builder: the protocol is already known
        // from the peek, and only hyper's builder exposes `max_header_size` (the read buffer
        // bound alone lets a head overshoot it by a whole read).
        let mut h1 = hyper::server::conn::http1::Builder::new();
        // hyper's own head timeout is off: it would close a slow head without a status, and it
        // starts when hyper waits for a head rather than at the head's first byte. The guard
        // (guard.rs) enforces the deadline and answers 408 instead.
        h1.timer(TokioTimer::new())
            .keep_alive(true)
            .header_read_timeout(None)
            .max_header_size(HTTP1_HEAD_BYTES_MAX)
            .max_buf_size(HTTP1_BUF_BYTES_MAX);
        let send_timeout = Duration::from_millis(limits.send_timeout_ms);
        let idle_timeout = Duration::from_millis(limits.idle_timeout_ms);
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        // No keep-alive PINGs: each PING and its answer would count as progress and keep an
        // idle connection from ever reaching idle_timeout_ms. A peer that stops reading is
        // found by the send timeout instead, and the PING of a graceful close by `quiet_for`.
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(H2_STREAMS_MAX)
            .max_header_list_size(H2_HEADER_LIST_BYTES_MAX)
            .initial_stream_window_size(H2_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(H2_CONNECTION_WINDOW_BYTES)
            .max_pending_accept_reset_streams(H2_PENDING_ACCEPT_RESETS_MAX)
            .max_local_error_reset_streams(H2_LOCAL_ERROR_RESETS_MAX);
        let counters = Arc::new(Counters::default());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            handler,
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
            h1,
            h2,
            header_read_timeout,
            idle_timeout,
            send_timeout,
            head_limits: crate::http1::Limits {
                head_bytes_max: limits.head_bytes_max,
                uri_bytes_max: limits.uri_bytes_max,
                ..crate::http1::Limits::default()
            },
            counters: counters.clone(),
            shutdown: shutdown_rx,
        });
        let (queue_tx, queue_rx) = mpsc::channel(limits.connections_max.min(HANDOFF_QUEUE_MAX));
        let handle = runtime.handle().clone();
        let spawner: Spawner = {
            let shared = shared.clone();
            Arc::new(move |stream, peer, slot| {
                tokio::spawn(serve_connection(shared.clone(), stream, peer, slot));
            })
        };
        handle.spawn(dispatch(spawner.clone(), shared.shutdown.clone(), queue_rx));
        Ok(Fallback {
            runtime: Mutex::new(Some(runtime)),
            handle,
            queue: queue_tx,
            spawner,
            table: Arc::new(Mutex::new(SlotTable::new(
                limits.connections_max,
                limits.connections_per_ip_max,
            ))),
            gauge: Arc::new(AtomicUsize::new(0)),
            counters,
            refusals: Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT_MAX)),
            shutdown: shutdown_tx,
            shutting_down: AtomicBool::new(false),
            drain_cut: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Passes an accepted connection to the fallback without blocking. The stream must be
    /// unread (the engine only `MSG_PEEK`ed it). It may be blocking or not; the fallback makes
    /// it non-blocking. On refusal the stream comes back in the error.
    pub fn handoff(
        &self,
        stream: std::net::TcpStream,
        peer: SocketAddr,
    ) -> Result<(), HandoffError> {
        let refuse = |stream, reason| {
            self.counters
                .handoff_refused
                .fetch_add(1, Ordering::Relaxed);
            Err(HandoffError {
                stream,
                peer,
                reason,
            })
        };
        if self.shutting_down.load(Ordering::Acquire) {
            return refuse(stream, HandoffRefusal::ShutDown);
        }
        let slot = match ConnSlot::admit(&self.table, &self.gauge, &self.counters, peer) {
            Ok(slot) => slot,
            Err(reason) => return refuse(stream, reason),
        };
        match self.queue.try_send(Queued { stream, peer, slot }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(q)) => refuse(q.stream, HandoffRefusal::QueueFull),
            Err(mpsc::error::TrySendError::Closed(q)) => refuse(q.stream, HandoffRefusal::ShutDown),
        }
    }

    /// Answers a connection that was refused (by [`Fallback::handoff`] or the caller's own
    /// limits) as well as its protocol allows, without blocking: a task peeks its first bytes
    /// for a moment and sends HTTP/1 a `503` with `retry-after`; TLS and h2c are closed (no
    /// status can be sent without a handshake or an h2 session). At most
    /// [`REFUSALS_IN_FLIGHT_MAX`] such tasks run; past that the connection closes at once.
    pub fn answer_refused(&self, stream: std::net::TcpStream) {
        let Ok(permit) = self.refusals.clone().try_acquire_owned() else {
            return;
        };
        let _enter = self.handle.enter();
        let Ok(stream) = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream))
        else {
            return;
        };
        self.handle.spawn(async move {
            answer_refused(stream).await;
            drop(permit);
        });
    }

    /// Accepts connections from `listener` on the fallback runtime until shutdown. When all
    /// `connections_max` slots are taken, the longest-idle connection is closed to admit the
    /// new one; if every slot serves a request, the new one is refused
    /// ([`Fallback::answer_refused`]).
    pub fn serve_listener(&self, listener: std::net::TcpListener) -> Result<(), io::Error> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(io::Error::other("fallback is shut down"));
        }
        listener.set_nonblocking(true)?;
        let listener = {
            // Registering with the reactor needs the runtime's context.
            let _enter = self.handle.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        self.handle.spawn(accept_loop(
            listener,
            AcceptShared {
                table: self.table.clone(),
                gauge: self.gauge.clone(),
                counters: self.counters.clone(),
                refusals: self.refusals.clone(),
                spawner: self.spawner.clone(),
            },
            self.shutdown.subscribe(),
        ));
        Ok(())
    }

    /// Connections open now, including queued hand-offs.
    pub fn connections(&self) -> usize {
        self.gauge.load(Ordering::Relaxed)
    }

    /// Counters and the connection gauge.
    pub fn stats(&self) -> FallbackStats {
        let c = &self.counters;
        FallbackStats {
            connections: self.connections(),
            accepted_tls_h2_total: c.tls_h2.load(Ordering::Relaxed),
            accepted_tls_http1_total: c.tls_http1.load(Ordering::Relaxed),
            accepted_h2c_total: c.h2c.load(Ordering::Relaxed),
            accepted_http1_total: c.http1.load(Ordering::Relaxed),
            handoff_refused_total: c.handoff_refused.load(Ordering::Relaxed),
            rejected_total: c.rejected.load(Ordering::Relaxed),
            shed_idle_total: c.shed_idle.load(Ordering::Relaxed),
            refused_full_total: c.refused_full.load(Ordering::Relaxed),
            refused_per_ip_total: c.refused_per_ip.load(Ordering::Relaxed),
            send_timeout_total: c.send_timeout.load(Ordering::Relaxed),
            head_timeout_total: c.head_timeout.load(Ordering::Relaxed),
            uri_too_long_total: c.uri_too_long.load(Ordering::Relaxed),
            head_refused_total: c.head_refused.load(Ordering::Relaxed),
            h2_reset_flood_total: c.h2_calm.load(Ordering::Relaxed),
        }
    }

    /// Ends a drain in progress (or the next one) at once: what is left is cancelled within
    /// one poll (a second SIGTERM).
    pub fn cut_drain(&self) {
        self.drain_cut.store(true, Ordering::Release);
    }

    /// Graceful shutdown: stop accepting and refuse hand-offs, close connections that are
    /// idle or not yet serving, let in-flight requests finish (HTTP/1 closes after the current
    /// response, HTTP/2 sends GOAWAY), and after `drain` cancel whatever is left. Blocks the
    /// calling thread for at most about `drain` + 200 ms (the waiting runs on a helper thread,
    /// so calling this from async code is safe but stalls that worker; prefer
    /// `spawn_blocking`). A second call returns at once.
    pub fn shutdown(&self, drain: Duration) {
        self.shutting_down.store(true, Ordering::Release);
        lock(&self.table).close();
        // send_replace stores the value even when no receiver is left.
        self.shutdown.send_replace(true);
        // Nothing can panic while the lock is held, so a poisoned lock still holds valid state.
        let runtime = match self.runtime.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(runtime) = runtime else { return };
        let gauge = self.gauge.clone();
        let cut = Arc::clone(&self.drain_cut);
        // Waiting happens on a thread of its own: `block_on` and a blocking runtime teardown
        // panic when called from inside any tokio runtime, and a caller's main may be one.
        let waiter = std::thread::Builder::new()
            .name("sluice-fallback-drain".into())
            .spawn(move || drain_and_stop(runtime, &gauge, &cut, drain));
        match waiter {
            Ok(waiter) => {
                if waiter.join().is_err() {
                    warn!("fallback drain thread panicked; connections were cancelled");
                }
            }
            Err(err) => warn!(%err, "cannot spawn the fallback drain thread"),
        }
    }
}

/// Waits up to `drain` for the connection gauge to reach zero (or for `cut`), then cancels
/// what is left.
fn drain_and_stop(
    runtime: tokio::runtime::Runtime,
    gauge: &AtomicUsize,
    cut: &AtomicBool,
    drain: Duration,
) {
    runtime.block_on(async move {
        let drained = async {
            while gauge.load(Ordering::Relaxed) > 0 && !cut.load(Ordering::Acquire) {
                tokio::time::sleep(DRAIN_POLL).await;
            }
        };
        if tokio::time::timeout(drain, drained).await.is_err() {
            warn!(
                open = gauge.load(Ordering::Relaxed),
                drain_ms = drain.as_millis() as u64,
                "fallback drain budget spent; closing the remaining connections"
            );
        }
    });
    runtime.shutdown_timeout(RUNTIME_TEARDOWN);
}

impl Drop for Fallback {
    fn drop(&mut self) {
        lock(&self.table).close();
        self.shutdown.send_replace(true);
        let runtime = match self.runtime.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(runtime) = runtime {
            // Never blocks, so dropping a Fallback inside an async context is safe.
            runtime.shutdown_background();
        }
    }
}

/// Resolves once shutdown is signalled (or the signal's sender is gone, which only happens
/// while the runtime is being torn down).
async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stopping| *stopping).await;
}

/// What the accept loop needs of the [`Fallback`].
struct AcceptShared {
    table: Table,
    gauge: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    refusals: Arc<Semaphore>,
    spawner: Spawner,
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: AcceptShared,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = wait_shutdown(&mut shutdown) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                match ConnSlot::admit(&shared.table, &shared.gauge, &shared.counters, peer) {
                    Ok(slot) => (shared.spawner)(stream, peer, slot),
                    Err(reason) => {
                        debug!(%peer, ?reason, "fallback refused a connection");
                        if let Ok(permit) = shared.refusals.clone().try_acquire_owned() {
                            tokio::spawn(async move {
                                answer_refused(stream).await;
                                drop(permit);
                            });
                        }
                    }
                }
            }
            Err(err) => {
                // EMFILE, ENOBUFS, ECONNABORTED: none is fatal for the listener.
                debug!(%err, "fallback accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// Answers a refused connection: 503 for HTTP/1 (after a short peek), nothing for TLS or h2c.
async fn answer_refused(mut stream: TcpStream) {
    let sniffed = tokio::time::timeout(REFUSAL_PEEK, sniff(&stream)).await;
    if let Ok(Ok(Some(Sniffed::Http1))) = sniffed {
        let reply = guard::status_response(
            503,
            "Service Unavailable",
            "too many connections; retry later",
        );
        // retry-after goes in before the blank line ending the head.
        let reply = String::from_utf8_lossy(&reply).replacen(
            "connection: close\r\n",
            "connection: close\r\nretry-after: 1\r\n",
            1,
        );
        let sent = tokio::time::timeout(REFUSAL_PEEK, async {
            stream.write_all(reply.as_bytes()).await?;
            stream.shutdown().await?;
            // Read what the client sent, briefly, so closing does not reset the answer away.
            let mut scratch = [0u8; 4096];
            loop {
                let n = tokio::io::AsyncReadExt::read(&mut stream, &mut scratch).await?;
                if n == 0 {
                    return Ok::<_, io::Error>(());
                }
            }
        })
        .await;
        if let Ok(Err(err)) = sent {
            debug!(%err, "503 to a refused connection not delivered");
        }
    }
}

/// Takes handed-off connections and spawns one task per connection.
async fn dispatch(
    spawner: Spawner,
    mut shutdown: watch::Receiver<bool>,
    mut queue: mpsc::Receiver<Queued>,
) {
    loop {
        let queued = tokio::select! {
            queued = queue.recv() => queued,
            _ = wait_shutdown(&mut shutdown) => None,
        };
        let Some(Queued { stream, peer, slot }) = queued else {
            return;
        };
        // Adoption fails only if the fd is not a usable socket; the slot returns on drop.
        match stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream))
        {
            Ok(stream) => spawner(stream, peer, slot),
            Err(err) => debug!(%err, %peer, "cannot adopt handed-off connection"),
        }
    }
}

/// One connection from admission to close. The slot returns to the table on drop. The slot
/// table may ask the connection to close for room at any point (it is then idle).
async fn serve_connection<H: Handler>(
    shared: Arc<Shared<H>>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: ConnSlot,
) {
    let activity = slot.activity.clone();
    tokio::select! {
        () = classify_and_serve(&shared, stream, peer, activity.clone()) => {}
        () = activity.shed_requested() => {
            debug!(%peer, "fallback: idle connection closed to admit a new one");
        }
    }
    drop(slot);
}

async fn classify_and_serve<H: Handler>(
    shared: &Arc<Shared<H>>,
    stream: TcpStream,
    peer: SocketAddr,
    activity: Arc<Activity>,
) {
    let mut shutdown = shared.shutdown.clone();
    let deadline = Instant::now() + shared.header_read_timeout;
    let rejected = || shared.counters.rejected.fetch_add(1, Ordering::Relaxed);
    // Nagle would delay small response heads behind the previous segment's ACK.
    let _ = stream.set_nodelay(true);
    let sniffed = tokio::select! {
        sniffed = tokio::time::timeout_at(deadline, sniff(&stream)) => sniffed,
        _ = wait_shutdown(&mut shutdown) => return,
    };
    let sniffed = match sniffed {
        Ok(Ok(Some(kind))) => kind,
        Ok(Ok(None)) => {
            rejected();
            return;
        }
        Ok(Err(err)) => {
            debug!(%err, %peer, "fallback peek failed");
            rejected();
            return;
        }
        Err(_elapsed) => {
            debug!(%peer, "fallback: no first bytes within the header read timeout");
            rejected();
            return;
        }
    };
    let counters = &shared.counters;
    let conn = ConnStart {
        activity,
        head_deadline: deadline,
        shutdown,
    };
    match sniffed {
        Sniffed::Http1 | Sniffed::H2c => {
            let h2 = sniffed == Sniffed::H2c;
            let counter = if h2 { &counters.h2c } else { &counters.http1 };
            counter.fetch_add(1, Ordering::Relaxed);
            let info = ConnInfo {
                peer,
                tls: false,
                alpn_h2: false,
            };
            serve_http(shared, stream, info, h2, conn).await;
        }
        Sniffed::Tls => {
            let Some(acceptor) = shared.tls.clone() else {
                debug!(%peer, "fallback: TLS ClientHello but TLS is not configured; closing");
                rejected();
                return;
            };
            let mut shutdown = conn.shutdown.clone();
            let handshake = tokio::select! {
                done = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => done,
                _ = wait_shutdown(&mut shutdown) => return,
            };
            let tls_stream = match handshake {
                Ok(Ok(tls_stream)) => tls_stream,
                Ok(Err(err)) => {
                    debug!(%err, %peer, "fallback TLS handshake failed");
                    rejected();
                    return;
                }
                Err(_elapsed) => {
                    debug!(%peer, "fallback TLS handshake timed out");
                    rejected();
                    return;
                }
            };
            conn.activity.touch();
            let alpn_h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            let counter = if alpn_h2 {
                &counters.tls_h2
            } else {
                &counters.tls_http1
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let info = ConnInfo {
                peer,
                tls: true,
                alpn_h2,
            };
            if alpn_h2 {
                // h2 writes each frame header and each DATA payload as its own write when the
                // stream is not vectored, as a TLS stream is not: two TLS records and two
                // syscalls per 4 KiB response. Coalescing them until h2 flushes (once per
                // batch of frames) makes one record per batch. hyper's HTTP/1 flattens its own
                // writes already.
                let tls_stream =
                    tokio::io::BufWriter::with_capacity(H2_TLS_WRITE_BUF_BYTES, tls_stream);
                serve_http(shared, tls_stream, info, alpn_h2, conn).await;
            } else {
                serve_http(shared, tls_stream, info, alpn_h2, conn).await;
            }
        }
    }
}

/// What a classified connection carries into [`serve_http`].
struct ConnStart {
    activity: Arc<Activity>,
    /// The first HTTP/1 head must be complete by then (counted from accept).
    head_deadline: Instant,
    shutdown: watch::Receiver<bool>,
}

/// Runs hyper on a classified connection until it ends, shutdown drains it, it idles out, or
/// the client stops reading.
async fn serve_http<H, I>(shared: &Shared<H>, io: I, info: ConnInfo, h2: bool, conn: ConnStart)
where
    H: Handler,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ConnStart {
        activity,
        head_deadline,
        mut shutdown,
    } = conn;
    let watch = if h2 {
        Watch::H2(Box::new(H2Watch::new()))
    } else {
        Watch::Http1(Box::new(Http1Watch::new(
            head_deadline,
            shared.header_read_timeout,
            shared.head_limits,
        )))
    };
    let io = TokioIo::new(GuardIo::new(
        io,
        activity.clone(),
        shared.counters.clone(),
        watch,
    ));
    let handler = shared.handler.clone();
    let service_activity = activity.clone();
    let service = service_fn(move |req| {
        let handler = handler.clone();
        let activity = service_activity.clone();
        let busy = BusyGuard::new(activity.clone());
        async move {
            let response = handler.call(req, info).await;
            // The request stays in flight until hyper drops the body, i.e. until it is sent:
            // an idle timeout or shedding must not cut a response short.
            let sending = SendingGuard::new(activity);
            drop(busy);
            Ok::<_, Infallible>(response.map(|body| {
                TrackedBody {
                    inner: body,
                    _sending: sending,
                }
                .boxed()
            }))
        }
    });
    let drive = Drive {
        info,
        idle_timeout: shared.idle_timeout,
        send_timeout: shared.send_timeout,
        counters: &shared.counters,
        activity: &activity,
        shutdown: &mut shutdown,
    };
    if h2 {
        let conn = shared.h2.serve_connection(io, service);
        drive.run(conn, |conn| conn.graceful_shutdown()).await;
    } else {
        let conn = shared.h1.serve_connection(io, service);
        drive.run(conn, |conn| conn.graceful_shutdown()).await;
    }
}

/// Drives one hyper connection (HTTP/1 or HTTP/2, whose types differ) to its end.
struct Drive<'a> {
    info: ConnInfo,
    idle_timeout: Duration,
    send_timeout: Duration,
    counters: &'a Counters,
    activity: &'a Activity,
    shutdown: &'a mut watch::Receiver<bool>,
}

impl Drive<'_> {
    async fn run<C>(self, conn: C, graceful_shutdown: impl Fn(Pin<&mut C>))
    where
        C: Future<Output = hyper::Result<()>>,
    {
        let Drive {
            info,
            idle_timeout,
            send_timeout,
            counters,
            activity,
            shutdown,
        } = self;
        tokio::pin!(conn);
        let mut draining = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(err) = result {
                        debug!(%err, peer = %info.peer, "fallback connection ended with an error");
                    }
                    return;
                }
                _ = wait_shutdown(shutdown), if !draining => {
                    graceful_shutdown(conn.as_mut());
                    draining = true;
                }
                _ = activity.idle_expired(idle_timeout), if !draining => {
                    debug!(peer = %info.peer, "fallback connection idle; closing");
                    graceful_shutdown(conn.as_mut());
                    draining = true;
                }
                _ = activity.send_stalled(send_timeout) => {
                    debug!(peer = %info.peer, "fallback client does not read; closing");
                    counters.send_timeout.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // A graceful close waits for the client (h2: the answer to its PING); one that
                // ignores it is closed once nothing is in flight and nothing moved for as long.
                _ = activity.quiet_for(send_timeout), if draining => {
                    debug!(peer = %info.peer, "fallback client ignored the graceful close");
                    counters.send_timeout.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

/// Marks a handler as running, for the idle timeout and shedding; touches the connection when
/// it ends.
struct BusyGuard(Arc<Activity>);

impl BusyGuard {
    fn new(activity: Arc<Activity>) -> BusyGuard {
        activity.handlers_running.fetch_add(1, Ordering::Relaxed);
        activity.requests_started.fetch_add(1, Ordering::Relaxed);
        BusyGuard(activity)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.handlers_running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Marks a response body as being sent until hyper drops it.
struct SendingGuard(Arc<Activity>);

impl SendingGuard {
    fn new(activity: Arc<Activity>) -> SendingGuard {
        activity.bodies_sending.fetch_add(1, Ordering::Relaxed);
        SendingGuard(activity)
    }
}

impl Drop for SendingGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.bodies_sending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that holds a [`SendingGuard`] while hyper sends it.
struct TrackedBody {
    inner: ResponseBody,
    _sending: SendingGuard,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::{Body, Frame};
    use hyper::StatusCode;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// Echoes what it saw as `METHOD PATH BODY_LEN VERSION tls=B h2=B`; `/slow/{ms}` waits
    /// first, so a request can be in flight during shutdown.
    #[derive(Default)]
    struct Echo {
        started: AtomicUsize,
    }

    impl Handler for Echo {
        fn call(
            &self,
            req: Request<Incoming>,
            conn: ConnInfo,
        ) -> impl Future<Output = Response<ResponseBody>> + Send {
            self.started.fetch_add(1, Ordering::SeqCst);
            async move {
                let method = req.method().clone();
                let path = req.uri().path().to_string();
                let version = req.version();
                if let Some(ms) = path.strip_prefix("/slow/") {
                    let ms: u64 = ms.parse().unwrap();
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let mut body = req.into_body();
                let mut body_len = 0usize;
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.unwrap().into_data() {
                        body_len += data.len();
                    }
                }
                let text = format!(
                    "{method} {path} {body_len} {version:?} tls={} h2={}",
                    conn.tls, conn.alpn_h2
                );
                Response::new(body_from_bytes(text))
            }
        }
    }

    type ReqBody = BoxBody<Bytes, Infallible>;

    /// A request body of `left` bytes in 64 KiB frames with no length hint (chunked on HTTP/1).
    struct Chunks {
        left: usize,
        chunk: Bytes,
    }

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            let n = self.left.min(self.chunk.len());
            self.left -= n;
            Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
        }
    }

    fn chunked_body(len: usize) -> ReqBody {
        Chunks {
            left: len,
            chunk: Bytes::from(vec![b'x'; 64 * 1024]),
        }
        .boxed()
    }

    fn small_body(text: &'static str) -> ReqBody {
        Full::new(Bytes::from_static(text.as_bytes())).boxed()
    }

    fn limits() -> FallbackLimits {
        FallbackLimits {
            connections_max: 64,
            connections_per_ip_max: 0,
            header_read_timeout_ms: 5_000,
            idle_timeout_ms: 30_000,
            send_timeout_ms: 30_000,
            uri_bytes_max: 8192,
            head_bytes_max: 16 * 1024,
            worker_threads: WORKER_THREADS,
        }
    }

    fn client_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A fallback serving its own listener on 127.0.0.1:0.
    fn start_listening(
        tls: Option<Arc<ServerConfig>>,
        limits: FallbackLimits,
    ) -> (Fallback, Arc<Echo>, SocketAddr) {
        let handler = Arc::new(Echo::default());
        let fallback = Fallback::start(handler.clone(), tls, limits).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        fallback.serve_listener(listener).unwrap();
        (fallback, handler, addr)
    }

    enum Client {
        H1(hyper::client::conn::http1::SendRequest<ReqBody>),
        H2(hyper::client::conn::http2::SendRequest<ReqBody>),
    }

    impl Client {
        async fn connect<I>(io: I, h2: bool) -> Client
        where
            I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        {
            let io = TokioIo::new(io);
            if h2 {
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                Client::H2(send)
            } else {
                let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                tokio::spawn(conn);
                Client::H1(send)
            }
        }

        /// Sends one request; returns the status and the echoed text.
        async fn send(
            &mut self,
            method: &str,
            path: &str,
            body: ReqBody,
        ) -> hyper::Result<(StatusCode, String)> {
            let builder = Request::builder().method(method);
            let response = match self {
                Client::H1(send) => {
                    let req = builder.uri(path).header("host", "localhost");
                    send.send_request(req.body(body).unwrap()).await?
                }
                Client::H2(send) => {
                    let req = builder.uri(format!("http://localhost{path}"));
                    send.send_request(req.body(body).unwrap()).await?
                }
            };
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            Ok((status, String::from_utf8(bytes.to_vec()).unwrap()))
        }
    }

    struct TestCert {
        dir: tempfile::TempDir,
        cert_path: PathBuf,
        key_path: PathBuf,
        der: CertificateDer<'static>,
    }

    fn test_cert() -> TestCert {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, generated.cert.pem()).unwrap();
        std::fs::write(&key_path, generated.signing_key.serialize_pem()).unwrap();
        TestCert {
            dir,
            cert_path,
            key_path,
            der: generated.cert.der().clone(),
        }
    }

    async fn tls_connect(
        addr: SocketAddr,
        cert: &CertificateDer<'static>,
        alpn: &[&[u8]],
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        connector.connect(name, tcp).await.unwrap()
    }

    /// Polls `done` every 5 ms for up to 5 s.
    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn classify_prefix_table() {
        let cases: &[(&[u8], Option<Sniffed>)] = &[
            (&[0x16], Some(Sniffed::Tls)),
            (&[0x16, 0x03, 0x01, 0x02, 0x00], Some(Sniffed::Tls)),
            (b"GET / HTTP/1.1\r\n", Some(Sniffed::Http1)),
            (b"PUT /cas/ab HTTP/1.1\r\n", Some(Sniffed::Http1)),
            (b"P", None),
            (b"PRI * HTTP/2.0\r\n", None),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(Sniffed::H2c)),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",
                Some(Sniffed::H2c),
            ),
            (b"PRI * HTTP/1.1\r\n", Some(Sniffed::Http1)),
            (b"POST / HTTP/1.1\r\n", Some(Sniffed::Http1)),
            (b"\x00\x01", Some(Sniffed::Http1)),
        ];
        for (bytes, expected) in cases {
            assert_eq!(classify_prefix(bytes), *expected, "input {bytes:?}");
        }
    }

    #[test]
    fn http1_keep_alive_serves_two_requests_on_one_connection() {
        let (fallback, _handler, addr) = start_listening(None, limits());
        client_runtime().block_on(async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut client = Client::connect(tcp, false).await;
            let first = client.send("GET", "/up", small_body("")).await.unwrap();
            assert_eq!(
                first,
                (
                    StatusCode::OK,
                    "GET /up 0 HTTP/1.1 tls=false h2=false".into()
                )
            );
            let second = client
                .send("PUT", "/cache/k", small_body("hello"))
                .await
                .unwrap();
            assert_eq!(second.1, "PUT /cache/k 5 HTTP/1.1 tls=false h2=false");
        });
        let stats = fallback.stats();
        assert_eq!(stats.accepted_http1_total, 1, "{stats:?}");
        assert_eq!(stats.accepted_h2c_total, 0);
    }

    #[test]
    fn h2c_prior_knowledge_is_served_as_http2() {
        let (fallback, _handler, addr) = start_listening(None, limits());
        client_runtime().block_on(async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut client = Client::connect(tcp, true).await;
            for _ in 0..2 {
                let (status, text) = client.send("GET", "/status", small_body("")).await.unwrap();
                assert_eq!(status, StatusCode::OK);
                assert_eq!(text, "GET /status 0 HTTP/2.0 tls=false h2=false");
            }
        });
        assert_eq!(fallback.stats().accepted_h2c_total, 1);
        assert_eq!(fallback.stats().accepted_http1_total, 0);
    }

    #[test]
    fn tls_alpn_selects_http2_or_http1() {
        let cert = test_cert();
        let tls = TlsSettings::load(&cert.cert_path, &cert.key_path).unwrap();
        let (fallback, _handler, addr) = start_listening(Some(tls), limits());
        let cases: &[(&[&[u8]], bool, &str)] = &[
            (
                &[b"h2", b"http/1.1"],
                true,
                "GET /x 0 HTTP/2.0 tls=true h2=true",
            ),
            (&[b"http/1.1"], false, "GET /x 0 HTTP/1.1 tls=true h2=false"),
            // No ALPN at all: HTTP/1.1, as curl --http1.1 without ALPN would expect.
            (&[], false, "GET /x 0 HTTP/1.1 tls=true h2=false"),
        ];
        client_runtime().block_on(async {
            for (alpn, h2, expected) in cases {
                let stream = tls_connect(addr, &cert.der, alpn).await;
                let negotiated = stream.get_ref().1.alpn_protocol().map(|p| p.to_vec());
                assert_eq!(negotiated.as_deref() == Some(b"h2".as_slice()), *h2);
                let mut client = Client::connect(stream, *h2).await;
                let (status, text) = client.send("GET", "/x", small_body("")).await.unwrap();
                assert_eq!(status, StatusCode::OK);
                assert_eq!(text, *expected, "alpn {alpn:?}");
            }
        });
        let stats = fallback.stats();
        assert_eq!(stats.accepted_tls_h2_total, 1, "{stats:?}");
        assert_eq!(stats.accepted_tls_http1_total, 2, "{stats:?}");
    }

    #[test]
    fn streamed_8_mib_bodies_arrive_whole() {
        const BODY_BYTES: usize = 8 * 1024 * 1024;
        let cert = test_cert();
        let tls = TlsSettings::load(&cert.cert_path, &cert.key_path).unwrap();
        let (_fallback, _handler, addr) = start_listening(Some(tls), limits());
        client_runtime().block_on(async {
            let expected_h1 = format!("PUT /cas/big {BODY_BYTES} HTTP/1.1 tls=false h2=false");
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut client = Client::connect(tcp, false).await;
            let sent = client
                .send("PUT", "/cas/big", chunked_body(BODY_BYTES))
                .await;
            assert_eq!(sent.unwrap(), (StatusCode::OK, expected_h1));

            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut client = Client::connect(tcp, true).await;
            let sent = client
                .send("PUT", "/cas/big", chunked_body(BODY_BYTES))
                .await;
            let expected_h2c = format!("PUT /cas/big {BODY_BYTES} HTTP/2.0 tls=false h2=false");
            assert_eq!(sent.unwrap().1, expected_h2c);

            let stream = tls_connect(addr, &cert.der, &[b"h2"]).await;
            let mut client = Client::connect(stream, true).await;
            let sent = client
                .send("PUT", "/cas/big", chunked_body(BODY_BYTES))
                .await;
            let expected_tls = format!("PUT /cas/big {BODY_BYTES} HTTP/2.0 tls=true h2=true");
            assert_eq!(sent.unwrap().1, expected_tls);
        });
    }

    #[test]
    fn handoff_of_a_peeked_connection_completes_the_tls_handshake() {
        let cert = test_cert();
        let tls = TlsSettings::load(&cert.cert_path, &cert.key_path).unwrap();
        let handler = Arc::new(Echo::default());
        let fallback = Fallback::start(handler, Some(tls), limits()).unwrap();
        // The "engine": a plain std listener that only peeks, as MSG_PEEK does on the ring.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let der = cert.der.clone();
        let client = std::thread::spawn(move || {
            client_runtime().block_on(async {
                let stream = tls_connect(addr, &der, &[b"h2", b"http/1.1"]).await;
                let mut client = Client::connect(stream, true).await;
                client.send("GET", "/ac/00", small_body("")).await.unwrap()
            })
        });
        let (stream, peer) = listener.accept().unwrap();
        let mut first = [0u8; 5];
        let peeked = stream.peek(&mut first).unwrap();
        assert!(peeked >= 1 && first[0] == TLS_HANDSHAKE_BYTE, "{first:?}");
        fallback.handoff(stream, peer).unwrap();
        let (status, text) = client.join().unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(text, "GET /ac/00 0 HTTP/2.0 tls=true h2=true");
        assert_eq!(fallback.stats().accepted_tls_h2_total, 1);
    }

    #[test]
    fn tls_client_without_tls_configured_is_closed() {
        let cert = test_cert();
        let (fallback, _handler, addr) = start_listening(None, limits());
        client_runtime().block_on(async {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert.der.clone()).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            assert!(connector.connect(name, tcp).await.is_err());
        });
        wait_until("the rejection to be counted", || {
            fallback.stats().rejected_total == 1
        });
    }

    #[test]
    fn tls_load_errors_name_the_file() {
        let a = test_cert();
        let b = test_cert();
        let missing = a.dir.path().join("missing.pem");
        type Check = fn(&TlsError) -> bool;
        let cases: &[(&str, &Path, &Path, Check, &[&Path])] = &[
            (
                "missing certificate file",
                &missing,
                &a.key_path,
                |e| matches!(e, TlsError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound),
                &[&missing],
            ),
            (
                "missing key file",
                &a.cert_path,
                &missing,
                |e| matches!(e, TlsError::Read { .. }),
                &[&missing],
            ),
            (
                "certificate file holds only a key",
                &a.key_path,
                &a.key_path,
                |e| matches!(e, TlsError::NoCertificate { .. }),
                &[&a.key_path],
            ),
            (
                "key file holds only a certificate",
                &a.cert_path,
                &a.cert_path,
                |e| matches!(e, TlsError::NoPrivateKey { .. }),
                &[&a.cert_path],
            ),
            (
                "key of another certificate",
                &a.cert_path,
                &b.key_path,
                |e| matches!(e, TlsError::KeyMismatch { .. }),
                &[&a.cert_path, &b.key_path],
            ),
        ];
        for (name, cert_path, key_path, check, named) in cases {
            let err = TlsSettings::load(cert_path, key_path).unwrap_err();
            assert!(check(&err), "{name}: wrong error {err:?}");
            let message = err.to_string();
            for path in *named {
                let path = path.display().to_string();
                assert!(message.contains(&path), "{name}: {message:?} lacks {path}");
            }
        }
        let config = TlsSettings::load(&a.cert_path, &a.key_path).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn zero_limits_are_refused() {
        for limits in [
            FallbackLimits {
                connections_max: 0,
                ..limits()
            },
            FallbackLimits {
                header_read_timeout_ms: 0,
                ..limits()
            },
            FallbackLimits {
                idle_timeout_ms: 0,
                ..limits()
            },
            FallbackLimits {
                send_timeout_ms: 0,
                ..limits()
            },
            FallbackLimits {
                uri_bytes_max: 0,
                ..limits()
            },
        ] {
            let result = Fallback::start(Arc::new(Echo::default()), None, limits);
            let err = result.err().unwrap();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert!(err.to_string().contains("= 0"), "{err}");
        }
    }

    #[test]
    fn full_fallback_sheds_the_idle_and_refuses_with_503_when_all_are_busy() {
        use std::io::{Read, Write};
        let limits = FallbackLimits {
            connections_max: 1,
            ..limits()
        };
        let (fallback, handler, addr) = start_listening(None, limits);
        let engine = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let engine_addr = engine.local_addr().unwrap();
        client_runtime().block_on(async {
            // The only slot serves a slow request: nothing can be shed.
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut first = Client::connect(tcp, false).await;
            let slow = tokio::spawn(async move {
                let sent = first.send("GET", "/slow/1500", small_body("")).await;
                (first, sent)
            });
            while handler.started.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }

            // A hand-off at capacity comes back at once with its socket.
            let _engine_client = std::net::TcpStream::connect(engine_addr).unwrap();
            let (stream, peer) = engine.accept().unwrap();
            let refused = fallback.handoff(stream, peer).unwrap_err();
            assert_eq!(refused.reason, HandoffRefusal::AtCapacity);
            assert_eq!(refused.stream.peer_addr().unwrap(), peer);
            assert_eq!(fallback.stats().handoff_refused_total, 1);

            // A listener client is answered 503 at once instead of waiting.
            let reply = tokio::task::spawn_blocking(move || {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.write_all(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
                let mut reply = Vec::new();
                let _ = s.read_to_end(&mut reply);
                String::from_utf8_lossy(&reply).into_owned()
            })
            .await
            .unwrap();
            assert!(reply.starts_with("HTTP/1.1 503"), "{reply:?}");
            assert!(reply.contains("retry-after: 1"), "{reply:?}");

            // Once the first connection is idle, a new one takes its slot.
            let (mut first, sent) = slow.await.unwrap();
            assert_eq!(sent.unwrap().0, StatusCode::OK);
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut third = Client::connect(tcp, false).await;
            let (_, text) = third.send("GET", "/c", small_body("")).await.unwrap();
            assert_eq!(text, "GET /c 0 HTTP/1.1 tls=false h2=false");
            assert!(
                first.send("GET", "/a", small_body("")).await.is_err(),
                "shed"
            );
            let stats = fallback.stats();
            assert_eq!(stats.shed_idle_total, 1);
            assert_eq!(stats.refused_full_total, 2);
        });
    }

    #[test]
    fn connections_per_ip_max_refuses_the_next_from_one_address() {
        let limits = FallbackLimits {
            connections_per_ip_max: 1,
            ..limits()
        };
        let (fallback, _handler, addr) = start_listening(None, limits);
        client_runtime().block_on(async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut first = Client::connect(tcp, false).await;
            first.send("GET", "/a", small_body("")).await.unwrap();
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut second = Client::connect(tcp, false).await;
            let refused = second.send("GET", "/b", small_body("")).await;
            match refused {
                Ok((status, _)) => assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE),
                Err(err) => panic!("expected a 503, got {err}"),
            }
            assert_eq!(fallback.stats().refused_per_ip_total, 1);
            first.send("GET", "/c", small_body("")).await.unwrap();
        });
    }

    #[test]
    fn idle_h2_connection_is_closed() {
        let limits = FallbackLimits {
            idle_timeout_ms: 200,
            ..limits()
        };
        let (fallback, _handler, addr) = start_listening(None, limits);
        client_runtime().block_on(async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut client = Client::connect(tcp, true).await;
            client.send("GET", "/a", small_body("")).await.unwrap();
            assert_eq!(fallback.connections(), 1);
            tokio::time::sleep(Duration::from_millis(800)).await;
            assert_eq!(fallback.connections(), 0);
            assert!(client.send("GET", "/b", small_body("")).await.is_err());
        });
    }

    #[test]
    fn shutdown_drains_an_in_flight_request() {
        let (fallback, handler, addr) = start_listening(None, limits());
        let client = std::thread::spawn(move || {
            client_runtime().block_on(async {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let mut client = Client::connect(tcp, false).await;
                client.send("GET", "/slow/300", small_body("")).await
            })
        });
        wait_until("the slow request to start", || {
            handler.started.load(Ordering::SeqCst) == 1
        });
        let began = std::time::Instant::now();
        fallback.shutdown(Duration::from_secs(5));
        let took = began.elapsed();
        let (status, text) = client.join().unwrap().unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(text, "GET /slow/300 0 HTTP/1.1 tls=false h2=false");
        assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
        assert_eq!(fallback.connections(), 0);

        let engine = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _late_client = std::net::TcpStream::connect(engine.local_addr().unwrap()).unwrap();
        let (stream, peer) = engine.accept().unwrap();
        let refused = fallback.handoff(stream, peer).unwrap_err();
        assert_eq!(refused.reason, HandoffRefusal::ShutDown);
        assert!(std::net::TcpStream::connect(addr)
            .and_then(|mut s| {
                use std::io::{Read, Write};
                s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")?;
                let mut buf = [0u8; 1];
                // Closed listener: either the connect or this read fails or sees EOF.
                s.read(&mut buf)
            })
            .map_or(true, |n| n == 0));
    }

    #[test]
    fn shutdown_closes_what_outlives_the_drain_budget() {
        let (fallback, handler, addr) = start_listening(None, limits());
        let client = std::thread::spawn(move || {
            client_runtime().block_on(async {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let mut client = Client::connect(tcp, false).await;
                client.send("GET", "/slow/10000", small_body("")).await
            })
        });
        wait_until("the slow request to start", || {
            handler.started.load(Ordering::SeqCst) == 1
        });
        let began = std::time::Instant::now();
        fallback.shutdown(Duration::from_millis(100));
        let took = began.elapsed();
        assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
        assert!(client.join().unwrap().is_err(), "request should be cut off");
    }

    #[test]
    fn slow_first_bytes_and_slow_heads_are_closed() {
        use std::io::{Read, Write};
        let limits = FallbackLimits {
            header_read_timeout_ms: 200,
            ..limits()
        };
        let (fallback, handler, addr) = start_listening(None, limits);
        let timeout = Some(Duration::from_secs(5));
        // Silent client: closed before classification, counted as rejected.
        let mut silent = std::net::TcpStream::connect(addr).unwrap();
        silent.set_read_timeout(timeout).unwrap();
        // Half a head: classified as HTTP/1, then hyper's header read timeout closes it.
        let mut partial = std::net::TcpStream::connect(addr).unwrap();
        partial.set_read_timeout(timeout).unwrap();
        partial
            .write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n")
            .unwrap();
        let began = std::time::Instant::now();
        let mut buf = [0u8; 64];
        assert_eq!(
            silent.read(&mut buf).unwrap(),
            0,
            "silent client not closed"
        );
        // The guard answers a slow head 408, as the ring does.
        let mut rest = Vec::new();
        partial.read_to_end(&mut rest).unwrap();
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.starts_with("HTTP/1.1 408"),
            "unexpected reply {rest:?}"
        );
        assert!(began.elapsed() < Duration::from_secs(3));
        assert_eq!(handler.started.load(Ordering::SeqCst), 0);
        wait_until("both connections to close", || fallback.connections() == 0);
        assert_eq!(fallback.stats().rejected_total, 1);
        assert_eq!(fallback.stats().accepted_http1_total, 1);
        assert_eq!(fallback.stats().head_timeout_total, 1);
    }

    #[test]
    fn shutdown_from_inside_an_async_runtime_does_not_panic() {
        let (fallback, _handler, _addr) = start_listening(None, limits());
        client_runtime().block_on(async move {
            fallback.shutdown(Duration::from_millis(50));
            assert_eq!(fallback.connections(), 0);
        });
    }

    #[test]
    fn oversized_http1_head_answers_431() {
        use std::io::{Read, Write};
        let (_fallback, handler, addr) = start_listening(None, limits());
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let filler = "a".repeat(HTTP1_HEAD_BYTES_MAX + 1024);
        let head = format!("GET / HTTP/1.1\r\nhost: x\r\nx-filler: {filler}\r\n\r\n");
        // The server may close before taking the whole head; the answer is what matters.
        let _ = stream.write_all(head.as_bytes());
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 431"), "{reply:?}");
        assert_eq!(handler.started.load(Ordering::SeqCst), 0);
    }
}
