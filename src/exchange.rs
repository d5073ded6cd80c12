//! One request and its answer, as every front end and every layer above the
//! store sees them: the facts of a request head ([`RequestInfo`]), the
//! answer decided for it ([`Reply`], [`Decision`]), and the sink a PUT body
//! is streamed into ([`PutSink`]). Nothing here knows how a request arrived
//! or what the application does with it; `crate::app` decides, the engines
//! and the fallback carry the decision out, and the fleet (replication, the
//! tier) adds steps to a commit through the hooks defined here.

use crate::http1::Conditions;
use crate::store::{Artifact, Committed, PutWriter, StoreError};

/// The request facts every decision needs, borrowed from whichever parser
/// read the head.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestInfo<'a> {
    /// Method token as sent (`GET`, `PUT`, …).
    pub method: &'a str,
    /// Request-target path, without the query.
    pub path: &'a str,
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

/// The reply for a store error (5xx are logged).
pub fn store_error(err: &StoreError) -> Reply {
    let status = err.status();
    if status >= 500 {
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
}

impl Later {
    /// Run the step; `send` gets the final reply, possibly from another thread.
    pub fn run(self, send: ReplyLater) {
        (self.after)(&self.committed, self.reply, send);
    }
}

impl std::fmt::Debug for OnCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnCommit")
    }
}

/// Receives one PUT body and publishes it, atomically, when it is complete.
/// Dropping the sink before [`PutSink::finish`] stores nothing.
#[derive(Debug)]
pub struct PutSink {
    writer: Option<PutWriter>,
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
    /// Received on a background thread where the front can.
    background: bool,
    /// Paces the background receive.
    pacer: Option<Pacer>,
}

impl std::fmt::Debug for SinkHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkHooks")
            .field("on_commit", &self.on_commit)
            .field("discard", &self.discard)
            .field("after_commit", &self.after_commit.is_some())
            .field("background", &self.background)
            .field("pacer", &self.pacer.is_some())
            .finish()
    }
}

impl PutSink {
    pub fn new(writer: PutWriter, body_bytes_max: u64) -> PutSink {
        PutSink {
            writer: Some(writer),
            received_bytes: 0,
            body_bytes_max,
            hooks: None,
        }
    }

    /// Run `hook` after a successful commit, before the reply.
    pub fn set_on_commit(&mut self, hook: OnCommit) {
        self.hooks.get_or_insert_with(Box::default).on_commit = Some(hook);
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

    /// A sink that reads up to `body_bytes_max` bytes, stores nothing and
    /// answers `reply`.
    pub fn discarding(reply: Reply, body_bytes_max: u64) -> PutSink {
        PutSink {
            writer: None,
            received_bytes: 0,
            body_bytes_max,
            hooks: Some(Box::new(SinkHooks {
                on_commit: None,
                discard: Some(reply),
                after_commit: None,
                background: false,
                pacer: None,
            })),
        }
    }

    /// The body limit that applies to this PUT, in bytes.
    pub fn body_bytes_max(&self) -> u64 {
        self.body_bytes_max
    }

    /// Body bytes received so far.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }

    /// Take the next piece of the body. An error is the final reply: the
    /// front end sends it and closes the connection; nothing is stored.
    #[allow(clippy::result_large_err)] // see `App::authorize`
    pub fn write(&mut self, data: &[u8]) -> Result<(), Reply> {
        if self.discarding_reply() {
            self.received_bytes += data.len() as u64;
            return Ok(());
        }
        let Some(writer) = self.writer.as_mut() else {
            return Err(Reply::error(500, "body received after the upload ended").closing());
        };
        self.received_bytes += data.len() as u64;
        if self.received_bytes > self.body_bytes_max {
            self.writer = None;
            return Err(Reply::error(
                413,
                &format!(
                    "body is over this route's limit of {} bytes",
                    self.body_bytes_max
                ),
            )
            .closing());
        }
        writer.write(data).map_err(|err| {
            self.writer = None;
            store_error(&err).closing()
        })
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
        let (reply, committed) = self.commit_and_reply();
        match (after, committed) {
            (Some(after), Some(committed)) => Err(Box::new(Later {
                committed,
                reply,
                after,
            })),
            _ => Ok(reply),
        }
    }

    /// The reply, and the commit when it succeeded with nothing to add.
    fn commit_and_reply(&mut self) -> (Reply, Option<Committed>) {
        if let Some(reply) = self.hooks.as_mut().and_then(|h| h.discard.take()) {
            return (reply, None);
        }
        let Some(writer) = self.writer.take() else {
            return (Reply::error(500, "upload already ended").closing(), None);
        };
        match writer.commit() {
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
            Err(err) => (store_error(&err), None),
        }
    }
}
