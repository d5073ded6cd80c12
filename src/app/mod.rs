//! What a request means, independent of how it arrived.
//!
//! Every front end (the io_uring engine, the hyper + rustls fallback) turns
//! a request head into a [`RequestInfo`], asks [`App::handle`] for a
//! [`Decision`], and carries it out: send a [`Reply`] (whose body may be a
//! byte string or a range of an artifact file), or stream a PUT body into a
//! [`PutSink`] and send the reply it finishes with. Statuses, headers and
//! bodies are decided here once, so the two front ends cannot drift apart.

mod action_cache;
mod dav;
mod fleet;
mod nx;
pub mod turbo;

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
use crate::store::format::Meta;
use crate::store::{
    Artifact, DeleteAt, HotBody, HotEntry, HotGet, OpenCache, PutOptions, Store, StoreError,
};
pub use action_cache::{StoreCas, AC_CHECKED_BYTES_MAX};
use bytes::Bytes;
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
    /// An action-cache hit needs every blob it names in the CAS (`ac_completeness_check`).
    pub ac_completeness_check: bool,
}

type MetricsSource = Box<dyn Fn(&mut String) + Send + Sync>;
type StatusSource = Box<dyn Fn() -> (String, serde_json::Value) + Send + Sync>;
type MemorySource = Box<dyn Fn() -> u64 + Send + Sync>;

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
    /// Memory by part (`sluice_memory_bytes{part}`, `/status` `memory`), registered at start
    /// by the parts that own memory (the engines' registered buffers).
    memory_parts: RwLock<Vec<(&'static str, MemorySource)>>,
    /// What a fleet plugs in (peers, the object-store tier): the peer API,
    /// who answers a miss, who hears about acknowledged writes.
    fleet: fleet::Fleet,
    /// Turborepo's cache events, counted.
    turbo_events: turbo::EventCounts,
    /// Counters of the action-cache completeness check.
    ac_checks: action_cache::AcChecks,
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
                ac_completeness_check: config.ac_completeness_check,
            },
            draining: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            started: Instant::now(),
            metrics_sources: RwLock::new(Vec::new()),
            status_sources: RwLock::new(Vec::new()),
            memory_parts: RwLock::new(Vec::new()),
            fleet: fleet::Fleet::default(),
            turbo_events: turbo::EventCounts::default(),
            ac_checks: action_cache::AcChecks::default(),
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

    /// Report `bytes()` as the memory of `part` in `/metrics` and `/status`.
    pub fn add_memory_part(
        &self,
        part: &'static str,
        bytes: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        if let Ok(mut parts) = self.memory_parts.write() {
            parts.push((part, Box::new(bytes)));
        }
    }

    /// Memory by part, bytes: the process's resident set, the hot set (its entries and its
    /// sketches), the store's index (estimated, about 120 bytes an artifact), what the
    /// allocator held free at its last look (`crate::heap`), and what the other parts
    /// registered.
    pub fn memory(&self) -> Vec<(&'static str, u64)> {
        let hot = self.store.hot_stats();
        let mut parts = vec![
            ("rss", resident_bytes()),
            ("hot_set", hot.bytes),
            ("hot_set_sketch", hot.sketch_bytes),
            (
                "store_index",
                self.store.stats().entries * INDEX_BYTES_PER_ENTRY,
            ),
            ("heap_in_use", crate::heap::in_use_bytes()),
            ("heap_free", crate::heap::free_bytes()),
        ];
        if let Ok(sources) = self.memory_parts.read() {
            parts.extend(sources.iter().map(|(part, bytes)| (*part, bytes())));
        }
        parts
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
            Route::Turbo(route) => return self.turbo(req, route, files),
            Route::Dav {
                namespace,
                path,
                method,
            } => return self.dav(req, namespace, path, method, files),
            Route::Artifact {
                kind: ArtifactKind::Nx,
                key,
                action,
                ..
            } => return self.nx(req, key, action, files),
            Route::Artifact {
                kind,
                namespace,
                key,
                action,
            } => match action {
                Action::Get | Action::Head => match self.get(req, kind, namespace, key, files) {
                    Ok(reply) => reply,
                    Err(defer) => return defer.decision(namespace, key),
                },
                Action::Delete => self.delete(req, namespace, key),
                Action::Put => return self.put(req, kind, namespace, key, Meta::default()),
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
        let nowait = files.as_ref().is_some_and(|cache| cache.nowait);
        // An action result is checked for completeness on every read, so it never comes from
        // the hot set while the check is on.
        let checked = kind == ArtifactKind::Ac && self.limits.ac_completeness_check;
        // The hot set first: a hit is answered from memory (or a large artifact's kept header
        // and file), with no open, no header read and no page-cache lookup.
        // (Not even looked up when checked: a lookup counts the key in the admission
        // sketch and the hit/miss metrics.)
        let miss = match (!checked).then(|| self.store.hot_get(ns, key)) {
            None | Some(HotGet::Off) => None,
            Some(HotGet::Hit(entry)) => return Ok(answer_hot(req, &entry)),
            Some(HotGet::Miss(miss)) => Some(miss),
        };
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
        // An action result is a hit only while every blob it names is in the CAS.
        if checked {
            match self.ac_incomplete(&artifact, nowait) {
                Ok(None) => {}
                Ok(Some(reply)) => return Ok(reply),
                Err(StoreError::WouldBlock) => return Err(Defer::Cold),
                Err(err) => return Ok(store_error(&err)),
            }
        }
        // Offer it to the hot set (a small body is read from the page cache only; a body not
        // there, or one the admission refuses, is served from the file as before).
        if let Some(miss) = miss {
            if let Some(entry) = self.store.hot_admit(miss, &artifact) {
                return Ok(answer_hot(req, &entry));
            }
        }
        let etag = artifact.etag();
        let len = artifact.len;
        let meta = artifact.meta.clone();
        Ok(answer(
            req,
            &etag,
            len,
            meta.as_deref(),
            Source::File(artifact),
        ))
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

    fn put(
        &self,
        req: &RequestInfo<'_>,
        kind: ArtifactKind,
        ns: &str,
        key: &str,
        meta: Meta,
    ) -> Decision {
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
        match self.store.begin_put_with(ns, key, options, meta) {
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
        let hot = self.store.hot_stats();
        for (name, kind, help, value) in [
            ("sluice_hot_set_hits_total", "counter", "GETs and HEADs answered from the hot set (memory), no open and no page-cache read.", hot.hits_total),
            ("sluice_hot_set_misses_total", "counter", "GETs and HEADs the hot set did not hold.", hot.misses_total),
            ("sluice_hot_set_admissions_total", "counter", "Artifacts admitted to the hot set.", hot.admissions_total),
            ("sluice_hot_set_rejections_total", "counter", "Artifacts the hot set refused: asked no more often than what they would push out, or too large.", hot.rejections_total),
            ("sluice_hot_set_stale_total", "counter", "Admissions refused because the artifact changed while it was read.", hot.stale_total),
            ("sluice_hot_set_evictions_total", "counter", "Hot-set entries pushed out to admit others.", hot.evictions_total),
            ("sluice_hot_set_invalidations_total", "counter", "Hot-set entries dropped because their artifact was replaced, deleted or evicted.", hot.invalidations_total),
            ("sluice_hot_set_bytes", "gauge", "Bytes the hot set holds (bodies, keys and per-entry overhead).", hot.bytes),
            ("sluice_hot_set_body_bytes", "gauge", "Artifact body bytes the hot set holds in memory.", hot.body_bytes),
            ("sluice_hot_set_entries", "gauge", "Entries in the hot set.", hot.entries),
            ("sluice_hot_set_budget_bytes", "gauge", "The hot set's budget (hot_set_bytes; 0 = off).", hot.budget_bytes),
        ] {
            write_metric(&mut out, name, kind, help, value);
        }
        {
            use std::fmt::Write as _;
            let name = "sluice_memory_bytes";
            let _ = writeln!(
                out,
                "# HELP {name} Memory by part, bytes (rss: the whole process's resident set).\n# TYPE {name} gauge"
            );
            for (part, bytes) in self.memory() {
                let _ = writeln!(out, "{name}{{part=\"{part}\"}} {bytes}");
            }
        }
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
        self.turbo_events.render(&mut out);
        self.render_ac_checks(&mut out);
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
            "hot_set": self.store.hot_stats(),
            "memory": self.memory().into_iter().map(|(part, bytes)| (part.to_string(), serde_json::Value::from(bytes))).collect::<serde_json::Map<String, serde_json::Value>>(),
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

/// The store namespace and key a request's artifact route names (a
/// Turborepo hash in its team's namespace included), if it names one: what
/// an engine opens off its thread for it.
pub fn artifact_target(req: &RequestInfo<'_>) -> Option<(String, String)> {
    match classify(req.method, req.path).ok()? {
        Route::Artifact { namespace, key, .. } => Some((namespace.to_string(), key.to_string())),
        Route::Turbo(crate::route::TurboRoute::Artifact { hash, .. }) => {
            let ns = turbo::team_namespace(req.query).ok()?;
            Some((ns.to_string(), hash.to_string()))
        }
        _ => None,
    }
}

/// Where a GET's body comes from.
enum Source {
    File(Artifact),
    Memory(Bytes),
}

/// A GET or HEAD answered from a hot-set entry.
fn answer_hot(req: &RequestInfo<'_>, entry: &HotEntry) -> Reply {
    let source = match &entry.body {
        HotBody::Memory(bytes) => Source::Memory(bytes.clone()),
        HotBody::File(file) => Source::File(Artifact {
            file: Arc::clone(file),
            body_offset: entry.body_offset,
            len: entry.len,
            sha256: entry.sha256,
            meta: entry.meta.clone(),
        }),
    };
    answer(req, &entry.etag, entry.len, entry.meta.as_deref(), source)
}

/// The reply to a GET or HEAD of an artifact of `len` bytes with ETag `etag`: its
/// preconditions (304, 412), its range (206, 416), or the whole body (200), with the
/// response headers it keeps (`meta`) on a 200 or 206.
fn answer(
    req: &RequestInfo<'_>,
    etag: &str,
    len: u64,
    meta: Option<&Meta>,
    source: Source,
) -> Reply {
    let mut headers = vec![
        ("etag", etag.to_string()),
        ("accept-ranges", "bytes".to_string()),
        ("content-type", "application/octet-stream".to_string()),
    ];
    match evaluate(req.conditions(), Some(etag), true) {
        Precondition::Proceed => {}
        Precondition::NotModified => {
            headers.truncate(2);
            return Reply {
                status: 304,
                headers,
                content_length: None,
                body: ReplyBody::Empty,
                close: false,
            };
        }
        Precondition::Failed => return precondition_failed(),
    }
    // A Range under an If-Range that does not strongly match the current ETag is ignored
    // (RFC 9110 13.1.5): the client holds part of another representation and must get
    // the whole current one, never a piece of it to stitch onto the old.
    let range = req
        .range
        .filter(|_| req.if_range.is_none_or(|value| if_range(value, etag)));
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
            return r;
        }
    };
    // The response headers a client asked to keep (Turborepo's `x-artifact-*`), on a 200
    // or 206 as on HEAD.
    headers.extend(meta.map(kept_headers).into_iter().flatten());
    let body = match source {
        Source::File(artifact) => {
            let offset = artifact.body_offset + start;
            ReplyBody::File {
                artifact,
                offset,
                len: count,
            }
        }
        // In memory, so `start + count <= len` fits the bytes (len is their length).
        Source::Memory(bytes) => {
            let from = usize::try_from(start)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            let to = usize::try_from(start + count)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            ReplyBody::Memory(bytes.slice(from..to))
        }
    };
    Reply {
        status,
        headers,
        content_length: Some(count),
        body,
        close: false,
    }
}

/// The store index's memory per artifact, bytes (estimated: see `store::index`).
const INDEX_BYTES_PER_ENTRY: u64 = 120;

/// This process's resident set, bytes (`/proc/self/statm`); 0 where it cannot be read.
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * rustix::param::page_size() as u64)
}

/// Why [`App::get`] cannot answer yet.
enum Defer {
    /// The artifact's file is cold under a no-wait open.
    Cold,
    /// A miss the read-through may fill.
    Fetch,
}

impl Defer {
    /// What the front end must do for `ns/key`.
    fn decision(self, ns: &str, key: &str) -> Decision {
        let (namespace, key) = (ns.to_string(), key.to_string());
        match self {
            Defer::Cold => Decision::Cold { namespace, key },
            Defer::Fetch => Decision::Fetch { namespace, key },
        }
    }
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

/// `meta`'s entries as response headers. Names are `'static` in a [`Reply`];
/// the few a client keeps are matched to constants, the rest (bounded by the
/// store's metadata rules) are leaked once per distinct name, as a small
/// interned set (see `intern_header_name`).
fn kept_headers(meta: &Meta) -> Vec<(&'static str, String)> {
    meta.iter()
        .map(|(name, value)| (intern_header_name(name), value.to_string()))
        .collect()
}

/// The `'static` form of a kept header name. Turborepo's names are
/// constants; any other name is interned in a set bounded by
/// [`INTERNED_NAMES_MAX`], past which it is sent under a generic name
/// rather than grow without bound.
fn intern_header_name(name: &str) -> &'static str {
    const KNOWN: [&str; 6] = [
        "x-artifact-duration",
        "x-artifact-tag",
        "x-artifact-sha",
        "x-artifact-dirty-hash",
        "x-artifact-client-ci",
        "x-artifact-client-interactive",
    ];
    if let Some(known) = KNOWN.iter().find(|k| **k == name) {
        return known;
    }
    static INTERNED: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut interned = INTERNED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(found) = interned.iter().find(|k| **k == name) {
        return found;
    }
    if interned.len() >= INTERNED_NAMES_MAX {
        return "x-sluice-kept-header";
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    interned.push(leaked);
    leaked
}

/// Most distinct kept header names outside the known set, process-wide.
const INTERNED_NAMES_MAX: usize = 256;

fn precondition_failed() -> Reply {
    Reply::error(
        412,
        "a precondition (If-Match or If-None-Match) does not hold",
    )
}
