//! What a request means, independent of how it arrived.
//!
//! Every front end (the io_uring engine, the hyper + rustls fallback) turns
//! a request head into a [`RequestInfo`], asks [`App::handle`] for a
//! [`Decision`], and carries it out: send a [`Reply`] (whose body may be a
//! byte string or a range of an artifact file), or stream a PUT body into a
//! [`PutSink`] and send the reply it finishes with. Statuses, headers and
//! bodies are decided here once, so the two front ends cannot drift apart.

mod fleet;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use crate::auth::{Access, Auth, Denied};
use crate::config::Config;
// The request and reply types live below the application (every layer uses
// them); they are re-exported here for the front ends that speak of both.
pub use crate::exchange::{
    close_if_unread, reason, store_error, AfterCommit, CommitHook, Decision, Later, OnCommit,
    PutSink, Reply, ReplyBody, ReplyLater, RequestInfo,
};
use crate::http1::{
    content_range, content_range_unsatisfied, evaluate, if_range, parse_range, Precondition,
    RangeOutcome,
};
use crate::metrics::{write_metric, Metrics};
use crate::route::{classify, Action, ArtifactKind, Route, RouteError};
use crate::store::{DeleteAt, OpenCache, PutOptions, Store, StoreError};
pub use fleet::{
    MissFetcher, MissReader, PeerService, PutFollowUp, Waiter, WriteListener, PEER_PREFIX,
};

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
    /// What a fleet plugs in (peers, the object-store tier): the peer API,
    /// who answers a miss, who hears about acknowledged writes.
    fleet: fleet::Fleet,
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
                linger: config.linger_limits(),
            },
            draining: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            started: Instant::now(),
            metrics_sources: RwLock::new(Vec::new()),
            status_sources: RwLock::new(Vec::new()),
            fleet: fleet::Fleet::default(),
        })
    }

    /// Bounds on the lingering close after an early error.
    pub fn linger_limits(&self) -> crate::http1::LingerLimits {
        self.limits.linger
    }

    /// Serve [`PEER_PREFIX`] with `service` (once, at start, before serving).
    pub fn set_peer_service(&self, service: Arc<dyn PeerService>) {
        let _ = self.fleet.peer_service.set(service);
    }

    /// Add a listener for acknowledged writes (at start, before serving, so
    /// no acknowledged write misses it). Their commit steps run in the order
    /// they were added.
    pub fn add_write_listener(&self, listener: Arc<dyn WriteListener>) {
        self.fleet
            .writes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(listener);
    }

    fn write_listeners(&self) -> Vec<Arc<dyn WriteListener>> {
        self.fleet
            .writes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Ask `fetcher` on a local miss before answering 404 (once, when it
    /// has started).
    pub fn set_miss_fetcher(&self, fetcher: Arc<dyn MissFetcher>) {
        let _ = self.fleet.miss_fetcher.set(fetcher);
    }

    /// Who fills a miss the request waits for ([`Decision::Fetch`]): the
    /// peers' read-through, when there is one.
    pub fn miss_fetcher(&self) -> Option<&Arc<dyn MissFetcher>> {
        self.fleet.miss_fetcher.get()
    }

    /// Read a local miss through `reader` on the cold-open path (once, at
    /// start, before serving).
    pub fn set_miss_reader(&self, reader: Arc<dyn MissReader>) {
        let _ = self.fleet.miss_reader.set(reader);
    }

    /// Who reads a miss through on the cold-open path ([`Decision::Cold`]):
    /// the object-store tier, when there is one.
    pub fn miss_reader(&self) -> Option<&Arc<dyn MissReader>> {
        self.fleet.miss_reader.get()
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
        if let Some(rest) = req.path.strip_prefix(PEER_PREFIX) {
            return match self.fleet.peer_service.get() {
                Some(service) => Arc::clone(service).handle(self, req, rest),
                None => Decision::Reply(close_if_unread(
                    Reply::error(404, "this node has no peers configured"),
                    has_body,
                )),
            };
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
                    if let Some(rt) = self.miss_fetcher() {
                        if !rt.known_absent(ns, key) {
                            return Err(Defer::Fetch);
                        }
                    }
                }
                // Then the object-store tier, off this thread (`Cold`: the
                // ring's opener hands it to the tier runtime), unless a recent
                // fetch already decided it.
                match self.miss_reader() {
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
                if let Some(tier) = self.miss_reader() {
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
        let now_ms = crate::store::now_ms();
        let listeners = self.write_listeners();
        let deleted = match !listeners.is_empty() {
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
                for listener in &listeners {
                    if let Err(reply) = listener.deleted(ns, key, time_ms) {
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
        let listeners = self.write_listeners();
        if let Some(reply) = listeners.iter().find_map(|l| l.refuse_put()) {
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
                // Asked after the store has begun the PUT and before its
                // commit, so a listener (the tier's eviction guard) never
                // sees the new artifact unprotected.
                let mut on_commit = Vec::new();
                for listener in &listeners {
                    match Arc::clone(listener).begin_put(ns, key) {
                        PutFollowUp::None => {}
                        PutFollowUp::OnCommit(step) => on_commit.push(step),
                        PutFollowUp::AfterCommit(after) => sink.set_after_commit(after),
                    }
                }
                if !on_commit.is_empty() {
                    sink.set_on_commit(OnCommit(Box::new(move |committed| {
                        on_commit.into_iter().find_map(|step| step(committed))
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
        let syncs = self.store.sync_stats();
        let journal = syncs.journal.unwrap_or_default();
        for (name, kind, help, value) in [
            ("sluice_store_file_syncs_total", "counter", "fdatasyncs of uploads' own files (too large for the commit journal, or it was full or off).", syncs.file_syncs_total),
            ("sluice_store_dir_syncs_total", "counter", "Directory fsyncs after per-file uploads' renames.", syncs.dir_syncs_total),
            ("sluice_store_dir_renames_total", "counter", "Renames of per-file uploads those directory syncs covered (more than syncs: shared).", syncs.dir_renames_total),
            ("sluice_store_journal_puts_total", "counter", "Uploads made durable through the commit journal.", journal.puts_total),
            ("sluice_store_journal_markers_total", "counter", "Marker and delete records appended to the commit journal.", journal.markers_total),
            ("sluice_store_journal_full_total", "counter", "Uploads small enough for the journal that synced their own file because it was full.", journal.full_total),
            ("sluice_store_journal_syncs_total", "counter", "fdatasyncs of the commit journal (each covers every record appended before it began).", journal.syncs_total),
            ("sluice_store_journal_checkpoints_total", "counter", "Journal checkpoints (syncfs, then the sealed segments are dropped).", journal.checkpoints_total),
            ("sluice_store_journal_bytes", "gauge", "Bytes of journal segments not yet checkpointed.", journal.bytes),
        ] {
            write_metric(&mut out, name, kind, help, value);
        }
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
