//! One admitted connection, from its first bytes to its close: classified, given its TLS
//! handshake if it needs one, then served by hyper over the guard ([`GuardIo`]) until it ends,
//! shutdown drains it, it idles out or the client stops reading.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use super::accept::{wait_shutdown, ConnSlot};
use super::classify::{sniff, Sniffed};
use super::guard::{Activity, GuardIo, H2Watch, Http1Watch, Watch};
use super::handler::{ConnInfo, Handler, ResponseBody};
use super::limits::{
    FallbackLimits, H2_CONNECTION_WINDOW_BYTES, H2_HEADER_LIST_BYTES_MAX,
    H2_LOCAL_ERROR_RESETS_MAX, H2_PENDING_ACCEPT_RESETS_MAX, H2_STREAMS_MAX,
    H2_STREAM_WINDOW_BYTES, H2_TLS_WRITE_BUF_BYTES, HTTP1_BUF_BYTES_MAX, HTTP1_HEAD_BYTES_MAX,
};
use super::stats::Counters;

/// State shared by every task of the runtime.
pub(super) struct Shared<H> {
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
    pub(super) shutdown: watch::Receiver<bool>,
}

impl<H: Handler> Shared<H> {
    pub(super) fn new(
        handler: Arc<H>,
        tls: Option<Arc<ServerConfig>>,
        limits: &FallbackLimits,
        counters: Arc<Counters>,
        shutdown: watch::Receiver<bool>,
    ) -> Shared<H> {
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
        Shared {
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
            counters,
            shutdown,
        }
    }
}

/// One connection from admission to close. The slot returns to the table on drop. The slot
/// table may ask the connection to close for room at any point (it is then idle).
pub(super) async fn serve_connection<H: Handler>(
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
