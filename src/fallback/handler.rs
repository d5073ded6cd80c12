//! What the fallback asks of the application: a [`Handler`] that answers each request, given
//! the facts of its connection ([`ConnInfo`]), with a [`ResponseBody`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};

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

/// A [`ResponseBody`] that holds `guard` until hyper drops it (after the last byte, or when the
/// client goes), so what the guard marks (a response being sent, public pressure) lasts as
/// long as the sending does.
pub(super) struct GuardedBody<G> {
    inner: ResponseBody,
    _guard: G,
}

impl<G> GuardedBody<G> {
    pub(super) fn new(inner: ResponseBody, guard: G) -> GuardedBody<G> {
        GuardedBody {
            inner,
            _guard: guard,
        }
    }
}

impl<G: Unpin> Body for GuardedBody<G> {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
