//! One request and its answer, as every front end and every layer above the
//! store sees them: the facts of a request head ([`RequestInfo`]), the
//! answer decided for it ([`Reply`], [`Decision`]), and the sink a PUT body
//! is streamed into ([`PutSink`]). Nothing here knows how a request arrived
//! or what the application does with it; `crate::app` decides, the engines
//! and the fallback carry the decision out, and the fleet (replication, the
//! tier) adds steps to a commit through the hooks defined here.

use crate::http1::Conditions;
use crate::store::{Artifact, Committed, PutWriter, StoreError};

/// Any header of a request, for the routes that need more than the fields
/// of [`RequestInfo`] (Turborepo's `x-artifact-*`). Each front implements it
/// over its own parser's head, so nothing is copied.
pub trait HeaderLookup: std::fmt::Debug + Sync {
    /// The value of the first header called `name` (ASCII case-insensitive).
    fn header(&self, name: &str) -> Option<&[u8]>;
    /// Every header in the order received, as (name, value).
    fn each_header(&self, visit: &mut dyn FnMut(&str, &[u8]));
}

impl HeaderLookup for crate::http1::RequestHead<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        crate::http1::RequestHead::header(self, name)
    }

    fn each_header(&self, visit: &mut dyn FnMut(&str, &[u8])) {
        for (name, value) in self.headers() {
            visit(name, value);
        }
    }
}

/// The request facts every decision needs, borrowed from whichever parser
/// read the head.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestInfo<'a> {
    /// Method token as sent (`GET`, `PUT`, …).
    pub method: &'a str,
    /// Request-target path, without the query.
    pub path: &'a str,
    /// The query after `?`, without the `?`.
    pub query: Option<&'a str>,
    /// Every header, for the routes that need others than those below.
    pub headers: Option<&'a dyn HeaderLookup>,
    /// Raw `Authorization` value.
    pub authorization: Option<&'a [u8]>,
    /// Raw `Range` value.
    pub range: Option<&'a [u8]>,
    /// Raw `If-None-Match` value.
    pub if_none_match: Option<&'a [u8]>,
    /// Raw `If-Match` value.
    pub if_match: Option<&'a [u8]>,
    /// Raw `If-Range` value.
    pub if_range: Option<&'a [u8]>,
    /// Declared body length, when framed by `Content-Length`.
    pub content_length: Option<u64>,
    /// True when the body is `chunked` (length unknown up front).
    pub chunked: bool,
    /// A local miss may be answered by a read-through from the peers
    /// ([`Decision::Fetch`]). False once the request has waited for one:
    /// its second miss is the answer.
    pub read_through: bool,
}

/// Body of a [`Reply`].
#[derive(Debug)]
pub enum ReplyBody {
    /// No body bytes (HEAD, 204, 304, 1xx).
    Empty,
    /// A small generated body (errors, `/metrics`, `/status`).
    Bytes(Vec<u8>),
    /// Bytes the server holds in memory, shared (a hot-set entry, or the range of one
    /// asked for): sent without touching the page cache or the disk.
    Memory(bytes::Bytes),
    /// `len` bytes of an artifact file starting at `offset` (absolute file
    /// offset: the store's header is already skipped).
    File {
        artifact: Artifact,
        offset: u64,
        len: u64,
    },
}

/// A complete response, decided before its body is sent.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Headers other than `Content-Length` and `Connection`, which the front
    /// end writes from `content_length` and `close`.
    pub headers: Vec<(&'static str, String)>,
    /// Value of `Content-Length` (for HEAD: what GET would send).
    pub content_length: Option<u64>,
    pub body: ReplyBody,
    /// Close the connection after this reply: framing is in doubt or a
    /// request body was left unread.
    pub close: bool,
}

impl Reply {
    /// A reply with a short plain-text body.
    pub fn text(status: u16, text: impl Into<String>) -> Reply {
        let body = text.into().into_bytes();
        Reply {
            status,
            headers: vec![("content-type", "text/plain; charset=utf-8".to_string())],
            content_length: Some(body.len() as u64),
            body: ReplyBody::Bytes(body),
            close: false,
        }
    }

    /// An error reply whose body names the status and the reason.
    pub fn error(status: u16, detail: &str) -> Reply {
        Reply::text(status, format!("{} {}: {detail}\n", status, reason(status)))
    }

    pub fn empty(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            // RFC 9110 §8.6: no Content-Length on 204.
            content_length: (status != 204).then_some(0),
            body: ReplyBody::Empty,
            close: false,
        }
    }

    /// Mark the reply as the last on its connection.
    pub fn closing(mut self) -> Reply {
        self.close = true;
        self
    }

    /// Drop the body but keep the headers (HEAD).
    pub fn without_body(mut self) -> Reply {
        self.body = ReplyBody::Empty;
        self
    }
}

/// The reason phrase sluice uses for `status`.
pub fn reason(status: u16) -> &'static str {
    crate::http1::reason_phrase(status)
}

/// What the front end must do next.
#[derive(Debug)]
pub enum Decision {
    /// Send this reply. If the request carried a body that was not read,
    /// `Reply::close` is set.
    Reply(Reply),
    /// Accept the request body (answering `100 Continue` first if the client
    /// asked for it), feed it to the sink, then send what
    /// [`PutSink::finish`] returns.
    ReceiveBody(PutSink),
    /// The artifact is not in memory (its path or header would be read from
    /// the disk). Only [`App::handle_with`] under a no-wait [`OpenCache`]
    /// answers this: the ring engine opens it on another thread, so its own
    /// thread never waits for a disk, and then asks again.
    Cold { namespace: String, key: String },
    /// The artifact is not here, and the peers may hold it: the front end
    /// asks the read-through ([`App::read_through`]) with a waiter, and
    /// decides the request again (with `read_through` false) when woken.
    Fetch { namespace: String, key: String },
}

impl RequestInfo<'_> {
    /// The value of header `name`, if the front gave its headers.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.and_then(|h| h.header(name))
    }

    /// Whether the request carries a body.
    pub fn has_body(&self) -> bool {
        self.chunked || self.content_length.is_some_and(|n| n > 0)
    }

    /// The write preconditions of this request.
    pub fn conditions(&self) -> Conditions<'_> {
        Conditions {
            if_match: self.if_match,
            if_none_match: self.if_none_match,
        }
    }
}

/// Close the connection after `reply` when the request carried a body that was not read.
pub fn close_if_unread(reply: Reply, has_body: bool) -> Reply {
    if has_body {
        reply.closing()
    } else {
        reply
    }
}

/// The reply for a store error (5xx are logged, but for a full store's 507:
/// the store logs running out of space once, when it starts).
pub fn store_error(err: &StoreError) -> Reply {
    let status = err.status();
    if status >= 500 && !matches!(err, StoreError::NoSpace) {
        tracing::error!(error = %err, "store error");
    }
    Reply::error(status, &err.to_string())
}

/// Runs once a PUT is published, before the client's reply: replication
/// records the write in its outbox here. `Some(reply)` replaces the 2xx
/// (the write is visible but was not acknowledged).
pub struct OnCommit(pub CommitHook);

/// The function inside an [`OnCommit`].
pub type CommitHook = Box<dyn FnOnce(&Committed) -> Option<Reply> + Send>;

/// Paces a body received in the background (a peer's replicated write): asked
/// before each read with the bytes about to be read, `Err(t)` says read
/// nothing more before `t`. The receiving node's replication limiter, so a
/// node under public load takes replication in no faster than its own
/// public latency allows (TCP pushes back on the sender meanwhile).
pub type Pacer =
    std::sync::Arc<dyn Fn(std::time::Instant, u64) -> Result<(), std::time::Instant> + Send + Sync>;

/// A step after a successful commit whose reply comes later, off the thread
/// that committed (a write-through to the object-store tier): it gets the
/// commit, the reply the PUT would send now, and where to send the final one.
pub type AfterCommit = Box<dyn FnOnce(&Committed, Reply, ReplyLater) + Send>;

/// Sends a reply decided later ([`AfterCommit`]).
pub type ReplyLater = Box<dyn FnOnce(Reply) + Send>;

/// What [`PutSink::finish_parts`] leaves to do.
pub struct Later {
    committed: Committed,
    reply: Reply,
    after: AfterCommit,
    reshape: Option<Reshape>,
}

impl Later {
    /// Run the step; `send` gets the final reply, possibly from another thread.
    pub fn run(self, send: ReplyLater) {
        let send: ReplyLater = match self.reshape {
            Some(reshape) => Box::new(move |reply| send(reshape(reply))),
            None => send,
        };
        (self.after)(&self.committed, self.reply, send);
    }
}

/// Turns a PUT's final reply into the one a client API expects (Nx wants
/// exactly 200 for a stored entry, Turborepo's API 202 with a JSON body).
pub type Reshape = fn(Reply) -> Reply;

/// Called with a whole request body collected in memory (a JSON request);
/// returns the reply.
pub type Collected = Box<dyn FnOnce(&[u8]) -> Reply + Send>;

impl std::fmt::Debug for OnCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnCommit")
    }
}

/// Receives one PUT body and publishes it, atomically, when it is complete.
/// Dropping the sink before [`PutSink::finish`] stores nothing.
#[derive(Debug)]
pub struct PutSink {
    /// Boxed: a writer is a few hundred bytes (hasher state, names, write-back
    /// marks), and every sink travels inside a `Decision`.
    writer: Option<Box<PutWriter>>,
    received_bytes: u64,
    body_bytes_max: u64,
    /// Replication's additions, boxed: most sinks have none, and every
    /// sink travels inside a `Decision`.
    hooks: Option<Box<SinkHooks>>,
}

#[derive(Default)]
struct SinkHooks {
    /// Called after a successful commit.
    on_commit: Option<OnCommit>,
    /// Read the body and throw it away, then answer this (a replicated
    /// write older than what this node holds).
    discard: Option<Reply>,
    /// Run after a successful commit; it sends the reply (see [`AfterCommit`]).
    after_commit: Option<AfterCommit>,
    /// Applied to the final reply, however it ends.
    reshape: Option<Reshape>,
    /// Collect the body in memory (bounded by `body_bytes_max`) and answer
    /// what this returns for it; nothing is stored.
    collect: Option<(Vec<u8>, Collected)>,
    /// Told when the store fails the write (its error); with `keep_reading`,
    /// the rest of the body is then read and dropped and the error answered
    /// after it, so the connection stays usable (a peer's PUT: the sender
    /// learns "full" instead of a reset).
    on_failure: Option<OnFailure>,
    keep_reading: bool,
    /// Received on a background thread where the front can.
    background: bool,
    /// Paces the background receive.
    pacer: Option<Pacer>,
}

/// Told of the store error that ended a PUT ([`PutSink::set_on_failure`]).
pub type OnFailure = Box<dyn FnOnce(&StoreError) + Send>;

impl std::fmt::Debug for SinkHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkHooks")
            .field("on_commit", &self.on_commit)
            .field("discard", &self.discard)
            .field("after_commit", &self.after_commit.is_some())
            .field("reshape", &self.reshape.is_some())
            .field("collect", &self.collect.as_ref().map(|c| c.0.len()))
            .field("on_failure", &self.on_failure.is_some())
            .field("background", &self.background)
            .field("pacer", &self.pacer.is_some())
            .finish()
    }
}

impl PutSink {
    pub fn new(writer: PutWriter, body_bytes_max: u64) -> PutSink {
        PutSink {
            writer: Some(Box::new(writer)),
            received_bytes: 0,
            body_bytes_max,
            hooks: None,
        }
    }

    /// Run `hook` after a successful commit, before the reply.
    pub fn set_on_commit(&mut self, hook: OnCommit) {
        self.hooks.get_or_insert_with(Box::default).on_commit = Some(hook);
    }

    /// Call `hook` with the store's error if the write fails (while the body
    /// arrives, or at the commit). With `keep_reading`, a failure while the
    /// body arrives reads the rest of it (up to the limit) and drops it,
    /// then answers the error: the connection stays usable.
    pub fn set_on_failure(&mut self, hook: OnFailure, keep_reading: bool) {
        let hooks = self.hooks.get_or_insert_with(Box::default);
        hooks.on_failure = Some(hook);
        hooks.keep_reading = keep_reading;
    }

    fn failed(&mut self, err: &StoreError) -> bool {
        let Some(hooks) = self.hooks.as_mut() else {
            return false;
        };
        if let Some(hook) = hooks.on_failure.take() {
            hook(err);
        }
        hooks.keep_reading
    }

    /// The body is background work (a peer's replicated write): a front
    /// that can receive it on a background thread (lower scheduling class,
    /// see `crate::background`) does, so its hashing and writing never take
    /// a CPU from public requests.
    pub fn set_in_background(&mut self) {
        self.hooks.get_or_insert_with(Box::default).background = true;
    }

    /// See [`PutSink::set_in_background`].
    pub fn in_background(&self) -> bool {
        self.hooks.as_ref().is_some_and(|h| h.background)
    }

    /// Pace the background receive of this body with `pacer`.
    pub fn set_pacer(&mut self, pacer: Pacer) {
        self.hooks.get_or_insert_with(Box::default).pacer = Some(pacer);
    }

    /// May `n` more body bytes be read at `now`? (`Err(t)`: not before `t`.)
    pub fn pace(&self, now: std::time::Instant, n: u64) -> Result<(), std::time::Instant> {
        match self.hooks.as_ref().and_then(|h| h.pacer.as_ref()) {
            Some(pacer) => pacer(now, n),
            None => Ok(()),
        }
    }

    /// Run `after` after a successful commit (and `on_commit`): the reply
    /// waits for it.
    pub fn set_after_commit(&mut self, after: AfterCommit) {
        self.hooks.get_or_insert_with(Box::default).after_commit = Some(after);
    }

    fn discarding_reply(&self) -> bool {
        self.hooks.as_ref().is_some_and(|h| h.discard.is_some())
    }

    /// Apply `reshape` to the final reply, whatever it is.
    pub fn set_reshape(&mut self, reshape: Reshape) {
        self.hooks.get_or_insert_with(Box::default).reshape = Some(reshape);
    }

    /// A sink that keeps up to `body_bytes_max` bytes in memory (413 past
    /// them), stores nothing, and answers what `answer` returns for the
    /// whole body.
    pub fn collecting(body_bytes_max: u64, answer: Collected) -> PutSink {
        PutSink {
            writer: None,
            received_bytes: 0,
            body_bytes_max,
            hooks: Some(Box::new(SinkHooks {
                collect: Some((Vec::new(), answer)),
                ..SinkHooks::default()
            })),
        }
    }

    /// A sink that reads up to `body_bytes_max` bytes, stores nothing and
    /// answers `reply`.
    pub fn discarding(reply: Reply, body_bytes_max: u64) -> PutSink {
        PutSink {
            writer: None,
            received_bytes: 0,
            body_bytes_max,
            hooks: Some(Box::new(SinkHooks {
                discard: Some(reply),
                ..SinkHooks::default()
            })),
        }
    }

    /// The front end starts the write-back of the body's file itself, from
    /// [`PutSink::take_writeback`] (the ring engine, as a ring operation).
    pub fn defer_writeback(&mut self) {
        if let Some(writer) = self.writer.as_mut() {
            writer.defer_writeback();
        }
    }

    /// After [`PutSink::defer_writeback`]: a range of the body's file whose
    /// write-back should start now (`fd`, offset, length).
    pub fn take_writeback(&mut self) -> Option<(std::os::fd::OwnedFd, u64, u64)> {
        self.writer.as_mut()?.take_writeback()
    }

    /// The body limit that applies to this PUT, in bytes.
    pub fn body_bytes_max(&self) -> u64 {
        self.body_bytes_max
    }

    /// Body bytes received so far.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }

    /// `reply`, a refusal the front end decided itself (malformed framing,
    /// a stalled body), in the shape this route answers in (see
    /// [`PutSink::set_reshape`]).
    pub fn refuse(&self, reply: Reply) -> Reply {
        match self.hooks.as_ref().and_then(|h| h.reshape) {
            Some(reshape) => reshape(reply),
            None => reply,
        }
    }

    /// The reply to a body past [`PutSink::body_bytes_max`].
    fn over_limit(&self) -> Reply {
        Reply::error(
            413,
            &format!(
                "body is over this route's limit of {} bytes",
                self.body_bytes_max
            ),
        )
        .closing()
    }

    /// Take the next piece of the body. An error is the final reply: the
    /// front end sends it and closes the connection; nothing is stored.
    #[allow(clippy::result_large_err)] // see `App::authorize`
    pub fn write(&mut self, data: &[u8]) -> Result<(), Reply> {
        self.write_piece(data).map_err(|reply| self.refuse(reply))
    }

    #[allow(clippy::result_large_err)] // see `App::authorize`
    fn write_piece(&mut self, data: &[u8]) -> Result<(), Reply> {
        if self.discarding_reply() {
            self.received_bytes += data.len() as u64;
            return Ok(());
        }
        if let Some((buf, _)) = self.hooks.as_mut().and_then(|h| h.collect.as_mut()) {
            self.received_bytes += data.len() as u64;
            if self.received_bytes > self.body_bytes_max {
                return Err(self.over_limit());
            }
            buf.extend_from_slice(data);
            return Ok(());
        }
        let Some(writer) = self.writer.as_mut() else {
            return Err(Reply::error(500, "body received after the upload ended").closing());
        };
        self.received_bytes += data.len() as u64;
        if self.received_bytes > self.body_bytes_max {
            self.writer = None;
            return Err(self.over_limit());
        }
        match writer.write(data) {
            Ok(()) => Ok(()),
            Err(err) => {
                self.writer = None;
                let reply = store_error(&err);
                if self.failed(&err) {
                    // Read the rest and drop it, then answer the error.
                    if let Some(hooks) = self.hooks.as_mut() {
                        hooks.discard = Some(reply);
                    }
                    return Ok(());
                }
                Err(reply.closing())
            }
        }
    }

    /// The body is complete: verify, publish and answer. 201 for a new
    /// artifact, 204 when it replaced one (as nginx's WebDAV PUT does).
    /// With an [`AfterCommit`] step this waits for it; front ends that can
    /// answer later use [`PutSink::finish_parts`] instead.
    pub fn finish(self) -> Reply {
        match self.finish_parts() {
            Ok(reply) => reply,
            Err(later) => {
                let (tx, rx) = std::sync::mpsc::channel();
                later.run(Box::new(move |reply| {
                    let _ = tx.send(reply);
                }));
                rx.recv()
                    .unwrap_or_else(|_| Reply::error(500, "the upload's last step failed"))
            }
        }
    }

    /// [`PutSink::finish`], except that a step after the commit is handed
    /// back (`Err`) for the caller to run, so its thread need not wait.
    #[allow(clippy::result_large_err)] // `Ok` is the reply itself, as in `App`
    pub fn finish_parts(mut self) -> Result<Reply, Box<Later>> {
        let after = self.hooks.as_mut().and_then(|h| h.after_commit.take());
        let reshape = self.hooks.as_ref().and_then(|h| h.reshape);
        let (reply, committed) = self.commit_and_reply();
        match (after, committed) {
            (Some(after), Some(committed)) => Err(Box::new(Later {
                committed,
                reply,
                after,
                reshape,
            })),
            _ => Ok(match reshape {
                Some(reshape) => reshape(reply),
                None => reply,
            }),
        }
    }

    /// The reply, and the commit when it succeeded with nothing to add.
    fn commit_and_reply(&mut self) -> (Reply, Option<Committed>) {
        if let Some(reply) = self.hooks.as_mut().and_then(|h| h.discard.take()) {
            return (reply, None);
        }
        if let Some((body, answer)) = self.hooks.as_mut().and_then(|h| h.collect.take()) {
            return (answer(&body), None);
        }
        let Some(writer) = self.writer.take() else {
            return (Reply::error(500, "upload already ended").closing(), None);
        };
        match (*writer).commit() {
            Ok(committed) => {
                if let Some(hook) = self.hooks.as_mut().and_then(|h| h.on_commit.take()) {
                    if let Some(reply) = (hook.0)(&committed) {
                        return (reply, None);
                    }
                }
                let etag = format!("\"{}\"", hex::encode(committed.sha256));
                let mut reply = if committed.replaced {
                    Reply::empty(204)
                } else {
                    Reply::empty(201)
                };
                reply.headers.push(("etag", etag));
                (reply, Some(committed))
            }
            Err(err) => {
                self.failed(&err);
                (store_error(&err), None)
            }
        }
    }
}
