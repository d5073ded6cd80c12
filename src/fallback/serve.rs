//! One admitted connection, from its first bytes to its close: classified, given its TLS
//! handshake if it needs one, then served by hyper over the guard ([`GuardIo`]) until it ends,
//! shutdown drains it, it idles out or the client stops reading.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use super::accept::{wait_shutdown, ConnSlot};
use super::classify::{sniff, Sniffed};
use super::coalesce::{CoalesceIo, TurnCounter};
use super::exec::InlineFirstPoll;
use super::guard::{Activity, GuardIo, H2Watch, Http1Watch, Watch};
use super::handler::{ConnInfo, GuardedBody, Handler};
use super::limits::{
    FallbackLimits, H2_CONNECTION_WINDOW_BYTES, H2_HEADER_LIST_BYTES_MAX,
    H2_LOCAL_ERROR_RESETS_MAX, H2_PENDING_ACCEPT_RESETS_MAX, H2_STREAMS_MAX,
    H2_STREAM_WINDOW_BYTES, HTTP1_BUF_BYTES_MAX, HTTP1_HEAD_BYTES_MAX,
};
use super::stamp::{Arrival, StampedTcp};
use super::stats::Counters;

/// State shared by every task of the runtime.
pub(super) struct Shared<H> {
    handler: Arc<H>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<InlineFirstPoll>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    send_timeout: Duration,
    /// The ring's head limits: the guard checks every HTTP/1 head against them.
    head_limits: crate::http1::Limits,
    /// `public_latency_sample_us`: one request per this on each worker is measured from
    /// its arrival.
    latency_sample: Duration,
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
        let header_read_timeout = Duration::from_millis(limits.timeouts.header_read_timeout_ms);
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
        let send_timeout = Duration::from_millis(limits.timeouts.send_timeout_ms);
        let idle_timeout = Duration::from_millis(limits.timeouts.idle_timeout_ms);
        let mut h2 = hyper::server::conn::http2::Builder::new(InlineFirstPoll);
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
            latency_sample: limits.latency_sample,
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
    // The shed request is looked at first: once the table gave this slot away, bytes that
    // arrive with (or after) the request must not start another request on it.
    tokio::select! {
        biased;
        () = activity.shed_requested() => {
            debug!(%peer, "fallback: idle connection closed to admit a new one");
        }
        () = classify_and_serve(&shared, stream, peer, activity.clone()) => {}
    }
    drop(slot);
}

/// Classifies a connection by its first bytes, within the header read timeout, and serves it
/// as what it is.
async fn classify_and_serve<H: Handler>(
    shared: &Arc<Shared<H>>,
    stream: TcpStream,
    peer: SocketAddr,
    activity: Arc<Activity>,
) {
    let mut shutdown = shared.shutdown.clone();
    let deadline = Instant::now() + shared.header_read_timeout;
    // Nagle would delay small response heads behind the previous segment's ACK.
    let _ = stream.set_nodelay(true);
    let peek = StartStep {
        deadline,
        peer,
        failed: "fallback peek failed",
        timed_out: "fallback: no first bytes within the header read timeout",
    };
    let Some(sniffed) = peek.run(shared, &mut shutdown, sniff(&stream)).await else {
        return;
    };
    let Some(sniffed) = sniffed else {
        // The client closed before sending anything.
        shared.counters.rejected.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let counters = &shared.counters;
    // Reads between requests bring the kernel's receive time (stamp.rs).
    let stream = StampedTcp::new(stream, Arc::clone(&activity));
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
        Sniffed::Tls => serve_tls(shared, stream, peer, conn).await,
    }
}

/// Completes the TLS handshake, within what is left of the header read timeout, and serves
/// the protocol ALPN chose.
async fn serve_tls<H: Handler>(
    shared: &Arc<Shared<H>>,
    stream: StampedTcp,
    peer: SocketAddr,
    conn: ConnStart,
) {
    let counters = &shared.counters;
    let Some(acceptor) = shared.tls.clone() else {
        debug!(%peer, "fallback: TLS ClientHello but TLS is not configured; closing");
        counters.rejected.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut shutdown = conn.shutdown.clone();
    let handshake = StartStep {
        deadline: conn.head_deadline,
        peer,
        failed: "fallback TLS handshake failed",
        timed_out: "fallback TLS handshake timed out",
    };
    let Some(tls_stream) = handshake
        .run(shared, &mut shutdown, acceptor.accept(stream))
        .await
    else {
        return;
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
    serve_http(shared, tls_stream, info, alpn_h2, conn).await;
}

/// A step between accept and a classified connection with a finished TLS handshake (the
/// peek, the handshake), bounded by the header read deadline.
struct StartStep {
    deadline: Instant,
    peer: SocketAddr,
    /// Logged when the step fails.
    failed: &'static str,
    /// Logged when the deadline passes first.
    timed_out: &'static str,
}

impl StartStep {
    /// Runs `step`; `None` ends the connection: shutdown came first, or the step failed or ran
    /// out of time (then the connection counts as rejected).
    async fn run<H, T>(
        self,
        shared: &Shared<H>,
        shutdown: &mut watch::Receiver<bool>,
        step: impl Future<Output = io::Result<T>>,
    ) -> Option<T> {
        let done = tokio::select! {
            done = tokio::time::timeout_at(self.deadline, step) => done,
            _ = wait_shutdown(shutdown) => return None,
        };
        let peer = self.peer;
        match done {
            Ok(Ok(value)) => return Some(value),
            Ok(Err(err)) => debug!(%err, %peer, "{}", self.failed),
            Err(_elapsed) => debug!(%peer, "{}", self.timed_out),
        }
        shared.counters.rejected.fetch_add(1, Ordering::Relaxed);
        None
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
    let io = GuardIo::new(
        io,
        activity.clone(),
        shared.counters.clone(),
        watch,
        shared.latency_sample,
    );
    let handler = shared.handler.clone();
    let service_activity = activity.clone();
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let handler = handler.clone();
        let activity = service_activity.clone();
        req.extensions_mut()
            .insert(Arrival(activity.take_head_arrival()));
        let busy = InFlightMark::handler_running(activity.clone());
        async move {
            let response = handler.call(req, info).await;
            // The request stays in flight until hyper drops the body, i.e. until it is sent:
            // an idle timeout or shedding must not cut a response short.
            let sending = InFlightMark::body_sending(activity);
            drop(busy);
            Ok::<_, Infallible>(response.map(|body| GuardedBody::new(body, sending).boxed()))
        }
    });
    let turns = TurnCounter::default();
    let drive = Drive {
        info,
        turns: turns.clone(),
        idle_timeout: shared.idle_timeout,
        send_timeout: shared.send_timeout,
        counters: &shared.counters,
        activity: &activity,
        shutdown: &mut shutdown,
    };
    if h2 {
        // Above the guard, so the guard sees (and times) only what reaches the socket.
        let io = TokioIo::new(CoalesceIo::new(io, turns));
        let conn = shared.h2.serve_connection(io, service);
        drive.run(conn, |conn| conn.graceful_shutdown()).await;
    } else {
        // hyper's HTTP/1 flattens a response into one write already.
        let conn = shared.h1.serve_connection(TokioIo::new(io), service);
        drive.run(conn, |conn| conn.graceful_shutdown()).await;
    }
}

/// Drives one hyper connection (HTTP/1 or HTTP/2, whose types differ) to its end.
struct Drive<'a> {
    info: ConnInfo,
    /// Bumped on every poll of hyper's connection (for [`CoalesceIo`]).
    turns: TurnCounter,
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
            turns,
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
                result = Turn { conn: conn.as_mut(), turns: &turns } => {
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

/// One poll of hyper's connection future, counted as a turn of the connection's task.
struct Turn<'a, C> {
    conn: Pin<&'a mut C>,
    turns: &'a TurnCounter,
}

impl<C: Future> Future for Turn<'_, C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<C::Output> {
        self.turns.bump();
        self.conn.as_mut().poll(cx)
    }
}

/// Counts one thing in flight on a connection while it lives (a handler running, a response
/// body being sent), for the idle timeout and shedding; touches the connection when it ends.
struct InFlightMark {
    activity: Arc<Activity>,
    count: fn(&Activity) -> &AtomicUsize,
}

impl InFlightMark {
    /// A handler runs (reading the request, deciding); counts the request as started.
    fn handler_running(activity: Arc<Activity>) -> InFlightMark {
        let mark = InFlightMark::new(activity, |a| &a.handlers_running);
        mark.activity
            .requests_started
            .fetch_add(1, Ordering::Relaxed);
        mark
    }

    /// hyper holds a response body, until it has sent it (or the client went).
    fn body_sending(activity: Arc<Activity>) -> InFlightMark {
        InFlightMark::new(activity, |a| &a.bodies_sending)
    }

    fn new(activity: Arc<Activity>, count: fn(&Activity) -> &AtomicUsize) -> InFlightMark {
        count(&activity).fetch_add(1, Ordering::Relaxed);
        InFlightMark { activity, count }
    }
}

impl Drop for InFlightMark {
    fn drop(&mut self) {
        self.activity.touch();
        (self.count)(&self.activity).fetch_sub(1, Ordering::Relaxed);
    }
}
