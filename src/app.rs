//! What a request means, independent of how it arrived.
//!
//! Every front end (the io_uring engine, the hyper + rustls fallback) turns
//! a request head into a [`RequestInfo`], asks [`App::handle`] for a
//! [`Decision`], and carries it out: send a [`Reply`] (whose body may be a
//! byte string or a range of an artifact file), or stream a PUT body into a
//! [`PutSink`] and send the reply it finishes with. Statuses, headers and
//! bodies are decided here once, so the two front ends cannot drift apart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use crate::auth::{Access, Auth, Denied};
use crate::config::{Config, TierWrite};
use crate::http1::{
    content_range, content_range_unsatisfied, evaluate, if_range, parse_range, Conditions,
    Precondition, RangeOutcome,
};
use crate::metrics::{write_metric, Metrics};
use crate::replication::Replication;
use crate::route::{classify, Action, ArtifactKind, Route, RouteError};
use crate::store::{
    Artifact, Committed, DeleteAt, OpenCache, PutOptions, PutWriter, Store, StoreError,
};

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
    fn without_body(mut self) -> Reply {
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

/// Limits the application applies per route.
#[derive(Clone, Copy, Debug)]
pub struct AppLimits {
    /// Largest PUT body on the Bazel and generic routes, in bytes.
    pub body_bytes_max: u64,
    /// Largest PUT body on the Gradle route, in bytes (Gradle expects 413).
    pub gradle_body_bytes_max: u64,
    /// The lingering close after an early error, for front ends that do
    /// not take it from their own limits (the hyper front).
    pub linger: crate::http1::LingerLimits,
}

type MetricsSource = Box<dyn Fn(&mut String) + Send + Sync>;
type StatusSource = Box<dyn Fn() -> (String, serde_json::Value) + Send + Sync>;

/// The application: router, store, auth and counters, shared by every front
/// end through an `Arc`.
pub struct App {
    pub store: Store,
    pub auth: Auth,
    pub metrics: Metrics,
    limits: AppLimits,
    draining: AtomicBool,
    /// Shutdown phase 2 (or an upgrade handed over): keep-alive responses say close.
    closing: AtomicBool,
    started: Instant,
    /// Extra series for `/metrics` (engine and fallback counters),
    /// registered once at start; read only when `/metrics` is scraped.
    metrics_sources: RwLock<Vec<MetricsSource>>,
    /// Extra sections of `/status`, registered once at start.
    status_sources: RwLock<Vec<StatusSource>>,
    /// The replication mesh, when peers are configured: acknowledged writes
    /// go to its outbox, `/_peer/` requests to its peer API.
    replication: OnceLock<Arc<Replication>>,
    /// Read-through from peers, when peers are configured and it is on.
    read_through: OnceLock<Arc<crate::replication::read_through::ReadThrough>>,
    /// The object-store tier, when `tier_url` is set: acknowledged writes
    /// are queued for it, local misses read through from it.
    tier: OnceLock<Arc<crate::tier::Tier>>,
}

impl App {
    pub fn new(config: &Config, store: Store) -> Arc<App> {
        Arc::new(App {
            store,
            auth: Auth::from_config(config),
            metrics: Metrics::new(),
            limits: AppLimits {
                body_bytes_max: config.body_bytes_max,
                gradle_body_bytes_max: config.gradle_body_bytes_max,
                linger: crate::http1::LingerLimits {
                    time_ms: config.lingering_time_ms,
                    timeout_ms: config.lingering_timeout_ms,
                    bytes_max: config.lingering_bytes_max,
                },
            },
            draining: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            started: Instant::now(),
            metrics_sources: RwLock::new(Vec::new()),
            status_sources: RwLock::new(Vec::new()),
            replication: OnceLock::new(),
            read_through: OnceLock::new(),
            tier: OnceLock::new(),
        })
    }

    /// Bounds on the lingering close after an early error.
    pub fn linger_limits(&self) -> crate::http1::LingerLimits {
        self.limits.linger
    }

    /// Attach the replication mesh (once, at start, before serving).
    pub fn set_replication(&self, replication: Arc<Replication>) {
        let _ = self.replication.set(replication);
    }

    pub fn replication(&self) -> Option<&Arc<Replication>> {
        self.replication.get()
    }

    /// Attach the read-through (once, when its thread has started).
    pub fn set_read_through(&self, rt: Arc<crate::replication::read_through::ReadThrough>) {
        let _ = self.read_through.set(rt);
    }

    pub fn read_through(&self) -> Option<&Arc<crate::replication::read_through::ReadThrough>> {
        self.read_through.get()
    }

    /// Attach the object-store tier (once, at start, before serving).
    pub fn set_tier(&self, tier: Arc<crate::tier::Tier>) {
        let _ = self.tier.set(tier);
    }

    pub fn tier(&self) -> Option<&Arc<crate::tier::Tier>> {
        self.tier.get()
    }

    /// Add series to `/metrics`.
    pub fn add_metrics_source(&self, source: impl Fn(&mut String) + Send + Sync + 'static) {
        if let Ok(mut sources) = self.metrics_sources.write() {
            sources.push(Box::new(source));
        }
    }

    /// Add a section (`name` → JSON value) to `/status`.
    pub fn add_status_source(
        &self,
        source: impl Fn() -> (String, serde_json::Value) + Send + Sync + 'static,
    ) {
        if let Ok(mut sources) = self.status_sources.write() {
            sources.push(Box::new(source));
        }
    }

    /// Start answering `/ready` with 503 (first shutdown phase).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Second shutdown phase: from now on every HTTP/1 response on the ring says
    /// `Connection: close`, so a keep-alive client learns it must reconnect (to the
    /// successor, or elsewhere) from the response itself instead of finding a closed socket.
    pub fn set_closing(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Decide what to do with a request whose head has been read.
    pub fn handle(&self, req: &RequestInfo<'_>) -> Decision {
        self.handle_with(req, None)
    }

    /// [`App::handle`], opening artifacts through a per-thread open-file
    /// cache (the ring engine keeps one per core).
    pub fn handle_with(&self, req: &RequestInfo<'_>, files: Option<&mut OpenCache>) -> Decision {
        let has_body = req.chunked || req.content_length.is_some_and(|n| n > 0);
        if let Some(rest) = req.path.strip_prefix(crate::replication::PEER_PREFIX) {
            return crate::replication::peer_api::handle(self, req, rest);
        }
        let route = match classify(req.method, req.path) {
            Ok(route) => route,
            Err(err) => {
                let reply = match err {
                    RouteError::NotFound => Reply::error(404, "no such route"),
                    RouteError::BadRequest(why) => Reply::error(400, why),
                    RouteError::MethodNotAllowed { allow, .. } => {
                        let mut r = Reply::error(405, "method not allowed on this route");
                        r.headers.push(("allow", allow.to_string()));
                        r
                    }
                };
                return Decision::Reply(close_if_unread(reply, has_body));
            }
        };
        let head = req.method == "HEAD";
        let reply = match route {
            Route::Up => Reply::text(200, "up\n"),
            Route::Ready if self.is_draining() => Reply::error(503, "draining"),
            Route::Ready => Reply::text(200, "ready\n"),
            Route::Metrics => {
                let mut r = Reply::text(200, self.render_metrics());
                r.headers[0].1 = "text/plain; version=0.0.4; charset=utf-8".to_string();
                r
            }
            Route::Status => {
                let mut r = Reply::text(200, self.render_status());
                r.headers[0].1 = "application/json".to_string();
                r
            }
            Route::Artifact {
                kind,
                namespace,
                key,
                action,
            } => match action {
                Action::Get | Action::Head => match self.get(req, kind, namespace, key, files) {
                    Ok(reply) => reply,
                    Err(Defer::Cold) => {
                        return Decision::Cold {
                            namespace: namespace.to_string(),
                            key: key.to_string(),
                        }
                    }
                    Err(Defer::Fetch) => {
                        return Decision::Fetch {
                            namespace: namespace.to_string(),
                            key: key.to_string(),
                        }
                    }
                },
                Action::Delete => self.delete(req, namespace, key),
                Action::Put => return self.put(req, kind, namespace, key),
            },
        };
        let reply = if head { reply.without_body() } else { reply };
        Decision::Reply(close_if_unread(reply, has_body))
    }

    // The error is the reply itself, built only on the refusal path; boxing
    // it would add an allocation there and buy nothing.
    #[allow(clippy::result_large_err)]
    fn authorize(&self, req: &RequestInfo<'_>, ns: &str, access: Access) -> Result<(), Reply> {
        self.auth
            .check(ns, access, req.authorization)
            .map_err(|denied| match denied {
                Denied::Unauthorized => {
                    let mut r = Reply::error(401, "a valid token is required");
                    r.headers
                        .push(("www-authenticate", Denied::WWW_AUTHENTICATE.to_string()));
                    r
                }
                Denied::Forbidden => Reply::error(403, "this token may not write"),
                Denied::OutOfScope => {
                    Reply::error(403, &format!("this token is not scoped to namespace {ns}"))
                }
            })
    }

    /// `If-Match` / `If-None-Match` on a PUT or DELETE (RFC 9110 13.2.2): 412 and no change
    /// when they fail. `If-None-Match: *` makes a create-only write. The check and the write
    /// are not one atomic step: a concurrent writer of the same key can slip between them,
    /// and then the last writer wins as it would without the header.
    #[allow(clippy::result_large_err)] // see `authorize`
    fn check_write_preconditions(
        &self,
        req: &RequestInfo<'_>,
        ns: &str,
        key: &str,
    ) -> Result<(), Reply> {
        let conditions = req.conditions();
        if conditions.if_match.is_none() && conditions.if_none_match.is_none() {
            return Ok(());
        }
        let current = match self.store.get(ns, key) {
            Ok(found) => found.map(|artifact| artifact.etag()),
            Err(err) => return Err(store_error(&err)),
        };
        match evaluate(conditions, current.as_deref(), false) {
            Precondition::Proceed => Ok(()),
            Precondition::NotModified | Precondition::Failed => Err(precondition_failed()),
        }
    }

    fn get(
        &self,
        req: &RequestInfo<'_>,
        kind: ArtifactKind,
        ns: &str,
        key: &str,
        files: Option<&mut OpenCache>,
    ) -> Result<Reply, Defer> {
        if let Err(reply) = self.authorize(req, ns, Access::Read) {
            return Ok(reply);
        }
        let opened = match files {
            Some(cache) => self.store.get_cached(ns, key, cache),
            None => self.store.get(ns, key),
        };
        let artifact = match opened {
            Ok(Some(artifact)) => artifact,
            Ok(None) => {
                // A miss here may be a hit on a peer: read through, unless
                // this request already did or the key was just found absent.
                if req.read_through {
                    if let Some(rt) = self.read_through() {
                        if !rt.known_absent(ns, key) {
                            return Err(Defer::Fetch);
                        }
                    }
                }
                // Then the object-store tier, off this thread (`Cold`: the
                // ring's opener hands it to the tier runtime), unless a recent
                // fetch already decided it.
                match self.tier() {
                    Some(tier) => {
                        let (range, conditional) = tier_range(req);
                        return tier
                            .answer_miss(kind, ns, key, range, conditional)
                            .ok_or(Defer::Cold);
                    }
                    None => return Ok(Reply::error(404, "no such artifact")),
                }
            }
            Err(StoreError::WouldBlock) => {
                if let Some(tier) = self.tier() {
                    let (range, conditional) = tier_range(req);
                    if let Some(reply) = tier.on_cold(ns, key, range, conditional) {
                        return Ok(reply);
                    }
                }
                return Err(Defer::Cold);
            }
            Err(err) => return Ok(store_error(&err)),
        };
        let etag = artifact.etag();
        let mut headers = vec![
            ("etag", etag.clone()),
            ("accept-ranges", "bytes".to_string()),
            ("content-type", "application/octet-stream".to_string()),
        ];
        match evaluate(req.conditions(), Some(&etag), true) {
            Precondition::Proceed => {}
            Precondition::NotModified => {
                headers.truncate(2);
                return Ok(Reply {
                    status: 304,
                    headers,
                    content_length: None,
                    body: ReplyBody::Empty,
                    close: false,
                });
            }
            Precondition::Failed => return Ok(precondition_failed()),
        }
        // A Range under an If-Range that does not strongly match the current ETag is ignored
        // (RFC 9110 13.1.5): the client holds part of another representation and must get
        // the whole current one, never a piece of it to stitch onto the old.
        let range = req
            .range
            .filter(|_| req.if_range.is_none_or(|value| if_range(value, &etag)));
        let len = artifact.len;
        let (status, start, count) = match range.map(|r| parse_range(r, len)) {
            None | Some(RangeOutcome::Full) => (200, 0, len),
            Some(RangeOutcome::Partial {
                start,
                end_inclusive,
            }) => {
                headers.push(("content-range", content_range(start, end_inclusive, len)));
                (206, start, end_inclusive - start + 1)
            }
            Some(RangeOutcome::Unsatisfiable) => {
                let mut r = Reply::error(416, "range not satisfiable");
                r.headers
                    .push(("content-range", content_range_unsatisfied(len)));
                return Ok(r);
            }
        };
        let offset = artifact.body_offset + start;
        Ok(Reply {
            status,
            headers,
            content_length: Some(count),
            body: ReplyBody::File {
                artifact,
                offset,
                len: count,
            },
            close: false,
        })
    }

    fn delete(&self, req: &RequestInfo<'_>, ns: &str, key: &str) -> Reply {
        if let Err(reply) = self.authorize(req, ns, Access::Write) {
            return reply;
        }
        if let Err(reply) = self.check_write_preconditions(req, ns, key) {
            return reply;
        }
        let now_ms = crate::replication::now_ms();
        let shared = self.replication().is_some() || self.tier().is_some();
        let deleted = match shared {
            // Replicated or tiered: the delete leaves a tombstone, so a peer
            // that missed it (anti-entropy) or the tier's old copy (a read
            // through before the queued tier delete ran) cannot bring the
            // artifact back.
            true => match self.store.delete_at(ns, key, now_ms, true) {
                Ok(DeleteAt::Deleted {
                    existed: true,
                    time_ms,
                }) => Ok(Some(time_ms)),
                Ok(_) => Ok(None),
                Err(err) => Err(err),
            },
            false => match self.store.delete(ns, key) {
                Ok(true) => Ok(Some(now_ms)),
                Ok(false) => Ok(None),
                Err(err) => Err(err),
            },
        };
        match deleted {
            Ok(Some(time_ms)) => {
                if let Some(replication) = self.replication() {
                    if let Err(reply) = replication.record_delete(ns, key, time_ms) {
                        return reply;
                    }
                }
                if let Some(tier) = self.tier() {
                    if let Err(reply) = tier.queue_delete(ns, key, time_ms) {
                        return reply;
                    }
                }
                Reply::empty(204)
            }
            Ok(None) => Reply::error(404, "no such artifact"),
            Err(err) => store_error(&err),
        }
    }

    fn put(&self, req: &RequestInfo<'_>, kind: ArtifactKind, ns: &str, key: &str) -> Decision {
        let has_body = req.chunked || req.content_length.is_some_and(|n| n > 0);
        let refuse = |reply: Reply| {
            self.metrics.count_put_aborted();
            Decision::Reply(close_if_unread(reply, has_body))
        };
        if let Err(reply) = self.authorize(req, ns, Access::Write) {
            return refuse(reply);
        }
        if let Err(reply) = self.check_write_preconditions(req, ns, key) {
            return refuse(reply);
        }
        if req.content_length.is_none() && !req.chunked {
            return refuse(Reply::error(411, "PUT needs Content-Length or chunked"));
        }
        let body_bytes_max = match kind {
            ArtifactKind::Gradle => self.limits.gradle_body_bytes_max,
            _ => self.limits.body_bytes_max,
        };
        if let Some(len) = req.content_length {
            if len > body_bytes_max {
                return refuse(Reply::error(
                    413,
                    &format!(
                        "body of {len} bytes is over this route's limit of {body_bytes_max} bytes"
                    ),
                ));
            }
        }
        let expected_sha256 = match kind {
            ArtifactKind::Cas => {
                let mut digest = [0u8; 32];
                if hex::decode_to_slice(key, &mut digest).is_err() {
                    return refuse(Reply::error(400, "CAS key is not a sha256 digest"));
                }
                Some(digest)
            }
            _ => None,
        };
        if let Some(reply) = self.tier().and_then(|tier| tier.refuse_put()) {
            return refuse(reply);
        }
        let options = PutOptions {
            expected_len: req.content_length,
            expected_sha256,
            body_bytes_max,
            write_time_ms: None,
            last_writer_wins: false,
        };
        match self.store.begin_put(ns, key, options) {
            Ok(writer) => {
                let mut sink = PutSink::new(writer, body_bytes_max);
                let replication = self.replication().map(Arc::clone);
                // Held from before the commit, so eviction never sees the new
                // artifact unprotected; released if the PUT never commits.
                let tier = self
                    .tier()
                    .map(|tier| (Arc::clone(tier), tier.hold(ns, key)));
                // Write-through waits for the tier after the commit, on the
                // tier's runtime (`AfterCommit`); write-behind queues in the
                // commit hook.
                let (tier, through) = match tier {
                    Some((tier, hold)) if tier.settings.write == TierWrite::Through => {
                        (None, Some((tier, hold)))
                    }
                    behind => (behind, None),
                };
                if let Some((tier, hold)) = through {
                    sink.set_after_commit(Box::new(move |committed, reply, send| {
                        tier.upload_through(hold, committed.write_time_ms, reply, send);
                    }));
                }
                if replication.is_some() || tier.is_some() {
                    let (ns, key) = (ns.to_string(), key.to_string());
                    sink.set_on_commit(OnCommit(Box::new(move |committed| {
                        if let Some(replication) = replication {
                            if let Err(reply) =
                                replication.record_put(&ns, &key, committed.write_time_ms)
                            {
                                return Some(reply);
                            }
                        }
                        let (tier, hold) = tier?;
                        tier.queue_put(hold, committed.write_time_ms).err()
                    })));
                }
                Decision::ReceiveBody(sink)
            }
            Err(err) => refuse(store_error(&err)),
        }
    }

    /// Count a finished request (called by the front end once the reply is
    /// on its way).
    pub fn record(&self, route_label: &str, method: &str, status: u16) {
        self.metrics.record_request(route_label, method, status);
    }

    fn render_metrics(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        self.metrics.render(&mut out);
        let stats = self.store.stats();
        write_metric(
            &mut out,
            "sluice_store_bytes",
            "gauge",
            "Bytes of artifacts on disk (body and header).",
            stats.bytes,
        );
        write_metric(
            &mut out,
            "sluice_store_entries",
            "gauge",
            "Artifacts on disk.",
            stats.entries,
        );
        write_metric(
            &mut out,
            "sluice_store_evictions_total",
            "counter",
            "Artifacts evicted to stay under store_bytes_max.",
            stats.evictions_total,
        );
        write_metric(
            &mut out,
            "sluice_store_evicted_bytes_total",
            "counter",
            "Bytes evicted to stay under store_bytes_max.",
            stats.evicted_bytes_total,
        );
        write_metric(
            &mut out,
            "sluice_store_corrupt_total",
            "counter",
            "Artifact files found corrupt and removed.",
            stats.corrupt_total,
        );
        write_metric(
            &mut out,
            "sluice_store_accounting_complete",
            "gauge",
            "1 once the background scan of the data directory has finished.",
            u8::from(stats.accounting_complete),
        );
        write_metric(
            &mut out,
            "sluice_draining",
            "gauge",
            "1 while the server is shutting down.",
            u8::from(self.is_draining()),
        );
        if let Ok(sources) = self.metrics_sources.read() {
            for source in sources.iter() {
                source(&mut out);
            }
        }
        out
    }

    fn render_status(&self) -> String {
        let stats = self.store.stats();
        let mut status = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.started.elapsed().as_secs(),
            "draining": self.is_draining(),
            "requests_total": self.metrics.requests_total(),
            "store": {
                "bytes": stats.bytes,
                "entries": stats.entries,
                "evictions_total": stats.evictions_total,
                "accounting_complete": stats.accounting_complete,
                "tmpfile_mode": stats.tmpfile_mode,
            },
        });
        if let (Ok(sources), Some(map)) = (self.status_sources.read(), status.as_object_mut()) {
            for source in sources.iter() {
                let (name, value) = source();
                map.insert(name, value);
            }
        }
        let mut text = status.to_string();
        text.push('\n');
        text
    }
}

impl RequestInfo<'_> {
    fn conditions(&self) -> Conditions<'_> {
        Conditions {
            if_match: self.if_match,
            if_none_match: self.if_none_match,
        }
    }
}

/// Why [`App::get`] cannot answer yet.
enum Defer {
    /// The artifact's file is cold under a no-wait open.
    Cold,
    /// A miss the read-through may fill.
    Fetch,
}

/// What a read-through needs of a GET's range: the `Range` value (GET only),
/// and whether a precondition is attached (such a request takes the
/// whole-object path, where its preconditions are evaluated).
fn tier_range<'a>(req: &RequestInfo<'a>) -> (Option<&'a [u8]>, bool) {
    let range = req.range.filter(|_| req.method == "GET");
    let conditional =
        req.if_range.is_some() || req.if_match.is_some() || req.if_none_match.is_some();
    (range, conditional)
}

fn precondition_failed() -> Reply {
    Reply::error(
        412,
        "a precondition (If-Match or If-None-Match) does not hold",
    )
}

fn close_if_unread(reply: Reply, has_body: bool) -> Reply {
    if has_body {
        reply.closing()
    } else {
        reply
    }
}

fn store_error(err: &StoreError) -> Reply {
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
}

impl std::fmt::Debug for SinkHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkHooks")
            .field("on_commit", &self.on_commit)
            .field("discard", &self.discard)
            .field("after_commit", &self.after_commit.is_some())
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
