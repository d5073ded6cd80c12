//! Between hyper and tonic: which requests are gRPC, the request and response bodies that
//! count bytes and record each RPC, and the `grpc-timeout` deadline.
//!
//! The fallback's HTTP/2 connections carry both HTTP and gRPC; `server` plugs
//! [`super::Reapi::serve`] into the fallback's handler for requests [`is_grpc`] accepts.
//! tonic's own server is not used (it would need its own listener): its routes are called
//! directly, so what `tonic::transport::Server` adds is done here where sluice needs it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::CONTENT_TYPE;
use hyper::{Request, Version};

use super::rpc_metrics::RpcMetrics;
use crate::pressure::InFlight;

/// Whether a request is gRPC: HTTP/2 with `content-type: application/grpc`,
/// `application/grpc+proto` or `application/grpc;…` (`application/grpc-web` is not gRPC
/// and stays HTTP). gRPC over HTTP/1.1 does not exist, so such a request is HTTP.
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    if req.version() != Version::HTTP_2 {
        return false;
    }
    let Some(value) = req.headers().get(CONTENT_TYPE) else {
        return false;
    };
    let (value, prefix) = (value.as_bytes(), b"application/grpc");
    value.len() >= prefix.len()
        && value[..prefix.len()].eq_ignore_ascii_case(prefix)
        && matches!(value.get(prefix.len()), None | Some(b'+') | Some(b';'))
}

/// Longest deadline honoured from `grpc-timeout`, so a client cannot pin work for days.
const DEADLINE_MAX: Duration = Duration::from_secs(3600);

/// The deadline a client set with `grpc-timeout` (`{1..8 digits}{H|M|S|m|u|n}`), capped at
/// [`DEADLINE_MAX`]; `None` when absent or malformed (as grpc-go ignores a bad one).
pub fn grpc_timeout<B>(req: &Request<B>) -> Option<Duration> {
    let value = req.headers().get("grpc-timeout")?.as_bytes();
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let timeout = match unit {
        b"H" => Duration::from_secs(n.saturating_mul(3600)),
        b"M" => Duration::from_secs(n.saturating_mul(60)),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(timeout.min(DEADLINE_MAX))
}

/// A request body that counts the bytes tonic reads from it.
pub struct CountingBody<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
}

impl<B> CountingBody<B> {
    pub fn new(inner: B, bytes: Arc<AtomicU64>) -> CountingBody<B> {
        CountingBody { inner, bytes }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for CountingBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What one RPC is recorded as when its response body ends (or is dropped: the client went).
pub struct Recorder {
    pub metrics: Arc<RpcMetrics>,
    pub method: usize,
    pub started: Instant,
    pub request_bytes: Arc<AtomicU64>,
    /// Public work in flight until the response is gone, so replication yields to gRPC as
    /// it does to HTTP.
    pub _public: Option<InFlight>,
}

/// tonic's response body made `Sync` (which the fallback's boxed body needs; tonic's is
/// only `Send`) without `unsafe`, counting bytes and recording the RPC at its end.
///
/// It forwards `is_end_stream`. Without that, a trailers-only response (every error tonic
/// answers: NOT_FOUND from GetActionResult, UNIMPLEMENTED) goes out as HEADERS then an empty
/// DATA frame with END_STREAM, which grpc-core clients reject ("Stream removed"): hyper sends
/// the headers alone with END_STREAM only when the body says it is already over.
pub struct RpcBody<B> {
    inner: sync_wrapper::SyncWrapper<B>,
    end_stream: bool,
    hint: SizeHint,
    /// The status in the response headers (trailers-only), or in the trailers once seen.
    code: Option<i32>,
    response_bytes: u64,
    recorder: Option<Recorder>,
}

impl<B: Body> RpcBody<B> {
    pub fn new(body: B, header_code: Option<i32>, recorder: Recorder) -> RpcBody<B> {
        RpcBody {
            end_stream: body.is_end_stream(),
            hint: body.size_hint(),
            inner: sync_wrapper::SyncWrapper::new(body),
            code: header_code,
            response_bytes: 0,
            recorder: Some(recorder),
        }
    }
}

impl<B> RpcBody<B> {
    /// Count the RPC, once.
    fn record(&mut self) {
        if let Some(r) = self.recorder.take() {
            // A body dropped before its trailers: the client cancelled (or the connection
            // went), which gRPC calls CANCELLED.
            let code = self.code.unwrap_or(1);
            r.metrics.record(
                r.method,
                code,
                r.request_bytes.load(Ordering::Relaxed),
                self.response_bytes,
                r.started.elapsed(),
            );
        }
    }
}

impl<B> Drop for RpcBody<B> {
    fn drop(&mut self) {
        self.record();
    }
}

/// The `grpc-status` of a header map, when present and numeric.
pub fn status_code(headers: &hyper::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.parse().ok())
}

impl<B> Body for RpcBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let inner = this.inner.get_mut();
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        // The inner body changes only while polled.
        this.end_stream = inner.is_end_stream();
        this.hint = inner.size_hint();
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.record();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                this.code.get_or_insert(13);
                this.record();
                Poll::Ready(Some(Err(io::Error::other(err))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.response_bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref() {
                    if let Some(code) = status_code(trailers) {
                        this.code = Some(code);
                    }
                }
                if this.end_stream {
                    this.record();
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.end_stream
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, ct: Option<&str>, timeout: Option<&str>) -> Request<()> {
        let mut b = Request::builder().version(version).uri("/x");
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        if let Some(t) = timeout {
            b = b.header("grpc-timeout", t);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn which_requests_are_grpc() {
        let cases = [
            (Version::HTTP_2, Some("application/grpc"), true),
            (Version::HTTP_2, Some("application/grpc+proto"), true),
            (Version::HTTP_2, Some("application/GRPC;charset=x"), true),
            (Version::HTTP_2, Some("application/grpc-web"), false),
            (Version::HTTP_2, Some("application/grpcx"), false),
            (Version::HTTP_2, Some("text/plain"), false),
            (Version::HTTP_2, None, false),
            (Version::HTTP_11, Some("application/grpc"), false),
        ];
        for (version, ct, want) in cases {
            assert_eq!(is_grpc(&req(version, ct, None)), want, "{version:?} {ct:?}");
        }
    }

    #[test]
    fn grpc_timeouts() {
        let cases = [
            ("59999m", Some(Duration::from_millis(59_999))),
            ("1S", Some(Duration::from_secs(1))),
            ("2M", Some(Duration::from_secs(120))),
            ("99999999H", Some(DEADLINE_MAX)),
            ("100u", Some(Duration::from_micros(100))),
            ("5n", Some(Duration::from_nanos(5))),
            ("123456789S", None),
            ("S", None),
            ("", None),
            ("10x", None),
            ("-1S", None),
        ];
        for (value, want) in cases {
            assert_eq!(
                grpc_timeout(&req(Version::HTTP_2, None, Some(value))),
                want,
                "{value}"
            );
        }
        assert_eq!(grpc_timeout(&req(Version::HTTP_2, None, None)), None);
    }
}
