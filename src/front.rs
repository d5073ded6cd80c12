//! The application served through hyper: the fallback front end's handler.
//!
//! hyper parses and frames the request (HTTP/1.1 over TLS or plaintext,
//! HTTP/2 over TLS or h2c); this module turns it into a [`RequestInfo`],
//! asks [`App`] for the decision and carries it out, so the statuses,
//! headers and bodies are the ones the ring engine sends for the same
//! request.

use std::future::Future;
use std::io::{Seek, SeekFrom};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response, Version};
use tokio::io::{AsyncRead, ReadBuf};

use crate::app::{App, Decision, Reply, ReplyBody, RequestInfo};
use crate::fallback::{ConnInfo, Handler, ResponseBody};
use crate::metrics::BytePath;

/// Size of one read when streaming an artifact through hyper, in bytes.
const FILE_CHUNK_BYTES: usize = 256 * 1024;

/// [`Handler`] that serves the application.
pub struct AppHandler {
    app: Arc<App>,
}

impl AppHandler {
    pub fn new(app: Arc<App>) -> AppHandler {
        AppHandler { app }
    }
}

impl Handler for AppHandler {
    fn call(
        &self,
        req: Request<Incoming>,
        _conn: ConnInfo,
    ) -> impl Future<Output = Response<ResponseBody>> + Send {
        let app = Arc::clone(&self.app);
        async move { serve(app, req).await }
    }
}

async fn serve(app: Arc<App>, req: Request<Incoming>) -> Response<ResponseBody> {
    let started = Instant::now();
    let (parts, mut body) = req.into_parts();
    let header = |name: &str| parts.headers.get(name).map(|v| v.as_bytes());
    // hyper has already validated the framing; its size hint is exact for a
    // Content-Length body (HTTP/1 and HTTP/2) and open for chunked or an
    // HTTP/2 body without a length.
    let content_length = body.size_hint().exact();
    let chunked = content_length.is_none() && !body.is_end_stream();
    let method = parts.method.as_str().to_string();
    let path = parts.uri.path().to_string();
    let info = RequestInfo {
        method: &method,
        path: &path,
        authorization: header("authorization"),
        range: header("range"),
        if_none_match: header("if-none-match"),
        if_match: header("if-match"),
        if_range: header("if-range"),
        content_length,
        chunked,
    };
    let route_label = crate::route::label_of(&method, &path);
    let reply = match app.handle(&info) {
        Decision::Reply(reply) => reply,
        // `App::handle` opens artifacts blocking (on this runtime's threads),
        // so it never answers `Cold`; should it, the client may retry.
        Decision::Cold { .. } => Reply::error(503, "artifact not ready; try again"),
        Decision::ReceiveBody(mut sink) => {
            // Polling the body is what makes hyper send `100 Continue`, so a
            // refusal decided above never invites the body.
            let mut failed = None;
            while let Some(frame) = body.frame().await {
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
                        failed = Some(Reply::error(400, "request body was cut short").closing());
                        break;
                    }
                }
            }
            match failed {
                Some(reply) => {
                    app.metrics.count_put_aborted();
                    reply
                }
                // Commit may fsync: keep it off the async worker.
                None => match tokio::task::spawn_blocking(move || sink.finish()).await {
                    Ok(reply) => reply,
                    Err(_) => Reply::error(500, "upload commit failed").closing(),
                },
            }
        }
    };
    app.record(route_label, &method, reply.status);
    app.metrics.record_ttfb(started.elapsed());
    into_response(&app, reply, parts.version)
}

fn into_response(app: &Arc<App>, reply: Reply, version: Version) -> Response<ResponseBody> {
    let mut builder = Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        builder = builder.header(*name, value.as_str());
    }
    if let Some(len) = reply.content_length {
        builder = builder.header("content-length", len);
    }
    // Connection-specific headers are forbidden in HTTP/2.
    if reply.close && version <= Version::HTTP_11 {
        builder = builder.header("connection", "close");
    }
    let body: ResponseBody = match reply.body {
        ReplyBody::Empty => Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
        ReplyBody::Bytes(bytes) => {
            app.metrics
                .add_response_bytes(BytePath::Fallback, bytes.len() as u64);
            Full::new(Bytes::from(bytes))
                .map_err(|never| match never {})
                .boxed()
        }
        ReplyBody::File {
            artifact,
            offset,
            len,
        } => {
            let file = artifact
                .into_file()
                .and_then(|mut file| file.seek(SeekFrom::Start(offset)).map(|_| file));
            match file {
                Ok(file) => FileBody {
                    file: tokio::fs::File::from_std(file),
                    remaining_bytes: len,
                    app: Arc::clone(app),
                }
                .boxed(),
                Err(err) => {
                    tracing::error!(error = %err, "artifact could not be prepared for reading");
                    return Response::builder()
                        .status(500)
                        .body(
                            Full::new(Bytes::new())
                                .map_err(|never| match never {})
                                .boxed(),
                        )
                        .unwrap_or_default();
                }
            }
        }
    };
    match builder.body(body) {
        Ok(response) => response,
        Err(err) => {
            tracing::error!(error = %err, "building a response failed");
            let mut response = Response::new(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            );
            *response.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
    }
}

/// Streams `remaining_bytes` of an artifact file from its current position.
struct FileBody {
    file: tokio::fs::File,
    remaining_bytes: u64,
    app: Arc<App>,
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
        let want = usize::try_from(self.remaining_bytes)
            .unwrap_or(usize::MAX)
            .min(FILE_CHUNK_BYTES);
        let mut chunk = vec![0u8; want];
        let mut buf = ReadBuf::new(&mut chunk);
        match Pin::new(&mut self.file).poll_read(cx, &mut buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(err)) => Poll::Ready(Some(Err(err))),
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                if n == 0 {
                    // The file is shorter than its header said: end the
                    // response with an error rather than send short data
                    // under a Content-Length that promised more.
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "artifact file ended early",
                    ))));
                }
                self.remaining_bytes -= n as u64;
                self.app
                    .metrics
                    .add_response_bytes(BytePath::Fallback, n as u64);
                chunk.truncate(n);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining_bytes == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining_bytes)
    }
}
