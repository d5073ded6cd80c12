//! The object-store tier: an S3-compatible store under every node, with the
//! node's disk as a bounded cache of it.
//!
//! - [`policy`]: sans-IO read-side policy (one fetch per key, recent
//!   outcomes, a failing tier probed once per window).
//! - [`client`]: `object_store`'s S3 client and sluice's object layout.
//! - [`upload`]: write-behind, the tier's durable outbox drained by an
//!   upload loop with the replication machinery's cursor and backoff.
//! - [`read`]: read-through on a local miss, digest-checked, stored locally.
//!
//! Everything that talks to the tier runs on one tokio runtime of its own
//! (`sluice-tier`, two worker threads), never on an engine thread; see
//! `docs/architecture.md` for why.

pub mod client;
pub mod policy;
pub mod read;
pub mod upload;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use crate::app::{PutFollowUp, WriteListener};
use crate::config::{Config, TierWrite};
use crate::delivery::outbox::{Op, Outbox, RECORD_BYTES_MAX};
use crate::delivery::{Lag, Limiter, Series};
use crate::exchange::Reply;
use crate::store::Store;

/// The tier's name as the one target of its outbox.
pub const TARGET: &str = "tier";
/// Uploads in flight at once while the tier is healthy; one while it fails.
/// An upload of a small artifact is a round trip to the store: at 4 in
/// flight a 20 ms round trip held write-behind to 200 small writes a second.
pub const UPLOADS_IN_FLIGHT_MAX: usize = 16;
/// Slack between the bound the PUT path checks (`replication_outbox_bytes_max`:
/// past it, 507) and the outbox's own overflow bound, so the PUTs that pass
/// the check together (at most one per connection: 32,768 at the largest
/// `connections_per_core_max` of two cores' worth of bursts, far more than
/// happen at once) can never make the outbox stop queueing for the tier.
const OUTBOX_SLACK_BYTES: u64 = 32_768 * RECORD_BYTES_MAX as u64;
/// `Retry-After` on a 503 for a read the tier could not answer, seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

/// What the tier needs from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub url: String,
    pub endpoint: Option<String>,
    pub write: TierWrite,
    pub timeout: Duration,
    /// The PUT path answers 507 past this many bytes of queued uploads.
    pub outbox_bytes_max: u64,
    pub fsync: bool,
    /// Largest object read through, bytes.
    pub body_bytes_max: u64,
}

impl Settings {
    /// `None` without `tier_url`.
    pub fn from_config(config: &Config) -> Option<Settings> {
        Some(Settings {
            url: config.tier_url.clone()?,
            endpoint: config.tier_endpoint.clone(),
            write: config.tier_write,
            timeout: Duration::from_millis(config.tier_timeout_ms),
            outbox_bytes_max: config.replication_outbox_bytes_max,
            fsync: config.fsync == crate::config::FsyncPolicy::Always,
            body_bytes_max: config.body_bytes_max.max(config.gradle_body_bytes_max),
        })
    }
}

/// The tier's health as `/status` shows it, from uploads and reads alike.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// `unknown` until the first answer, then `up` or `down`.
    pub state: &'static str,
    pub failures: u32,
    pub backoff_ms: u64,
    pub last_error: Option<String>,
    pub uploads_in_flight: usize,
    /// The upload loop's position: the next queue offset not yet sent.
    pub read_pos: u64,
    /// Uploads in flight or failed and waiting to go again.
    pub pending: Lag,
    /// Everything before this queue offset the tier has taken.
    pub acked: u64,
}

/// The request latency buckets of `sluice_tier_request_duration_seconds`.
const LATENCY_BUCKETS_S: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
struct Latency {
    /// op → (bucket counts, count, sum in µs)
    ops: HashMap<&'static str, ([u64; LATENCY_BUCKETS_S.len()], u64, u64)>,
}

/// Threads each tier runtime may add to its workers while a task blocks on
/// the disk (`block_in_place`: opening and reading an artifact to upload,
/// storing one read through). Tokio's default is 512: with 16 uploads in
/// flight the upload runtime grew one thread per upload that happened to
/// block at the same moment, so its thread count followed the backlog (the
/// hour-long soak saw A gain seven threads in one step). When every one is
/// busy, a blocking call runs on the worker itself, which then waits for
/// it, so the bound costs concurrency only while the disk is slow.
const UPLOAD_BLOCKING_THREADS_MAX: usize = 2;
/// The same for the tier runtime (read-through and write-through, where
/// clients wait, so more of them may block at once).
const TIER_BLOCKING_THREADS_MAX: usize = 8;
/// How long an idle blocking thread of a tier runtime stays (tokio's default
/// is 10 s): a steady stream of uploads keeps its few threads instead of
/// starting new ones after every pause.
const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(60);

/// The process's tier runtime. One per process: a node has one tier for its
/// whole life, and a runtime that is never dropped cannot be dropped from
/// inside one of its own tasks.
fn runtime() -> std::io::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(TIER_BLOCKING_THREADS_MAX)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .thread_name("sluice-tier")
        .enable_all()
        .build()?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// The runtime of write-behind uploads: threads in the background scheduling
/// class (`crate::background`), so the CPU an upload costs (reading the file,
/// signing and sending it) is never taken from public work. Apart from the
/// tier runtime, which also serves read-through and write-through, where a
/// client waits.
fn upload_runtime() -> std::io::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(UPLOAD_BLOCKING_THREADS_MAX)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .thread_name("sluice-tier-upload")
        .on_thread_start(|| crate::background::enter("tier-upload"))
        .enable_all()
        .build()?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// The tier, shared by the front ends (queueing, read-through, eviction
/// guard) and its own tasks.
pub struct Tier {
    pub settings: Settings,
    pub(crate) client: client::Client,
    pub(crate) rt: tokio::runtime::Handle,
    /// Write-behind uploads: a client of their own (its pooled connections
    /// live on their runtime) on the background runtime.
    pub(crate) upload_client: client::Client,
    pub(crate) upload_rt: tokio::runtime::Handle,
    pub(crate) store: Store,
    pub(crate) outbox: Outbox,
    /// Store-relative paths of artifacts with an upload still queued (and
    /// how many records each has): eviction spares them. Bounded by the
    /// outbox's byte bound (one entry per queued record at most).
    pending: Mutex<HashMap<String, u32>>,
    pub(crate) reads: Mutex<policy::Reads>,
    /// Woken whenever a fetch ends (its waiters check their key).
    pub(crate) fetched: tokio::sync::Notify,
    pub(crate) ranges: Mutex<policy::Ranges>,
    pub(crate) kick: tokio::sync::Notify,
    /// Set by the probe when the tier answers again after failing.
    pub(crate) recovered: std::sync::atomic::AtomicBool,
    pub(crate) series: Series,
    /// The replication limiter (shared with the peers when there are any):
    /// write-behind uploads draw from it; write-through ones do not (a
    /// client waits for them).
    pub(crate) limiter: Option<Arc<Limiter>>,
    pub(crate) throttled_bytes: std::sync::atomic::AtomicU64,
    latency: Mutex<Latency>,
    pub(crate) view: Mutex<View>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Tier {
    /// Build the client, open the tier's outbox (`data_dir/.tier-outbox`)
    /// and rebuild the set of artifacts still to upload from it.
    /// Write-behind uploads draw from `limiter` (the node's one budget for
    /// background bytes, shared with the peers; `None` only in tests that
    /// upload nothing).
    pub fn open(
        settings: Settings,
        data_dir: &Path,
        store: Store,
        limiter: Option<Arc<Limiter>>,
    ) -> Result<Arc<Tier>, String> {
        let client = client::Client::build(
            &settings.url,
            settings.endpoint.as_deref(),
            settings.timeout,
        )?;
        let rt = runtime()
            .map_err(|e| format!("cannot start the tier runtime: {e}"))?
            .handle()
            .clone();
        let upload_client = client::Client::build(
            &settings.url,
            settings.endpoint.as_deref(),
            settings.timeout,
        )?;
        let upload_rt = upload_runtime()
            .map_err(|e| format!("cannot start the tier upload runtime: {e}"))?
            .handle()
            .clone();
        let outbox = Outbox::open(
            &data_dir.join(".tier-outbox"),
            settings.fsync,
            settings.outbox_bytes_max + OUTBOX_SLACK_BYTES,
        )
        .map_err(|e| format!("cannot open the tier outbox: {e}"))?;
        outbox.add_peers(&[TARGET.to_string()]);
        if outbox.mark(TARGET).is_some_and(|m| m.overflow) {
            // The slack above makes this unreachable in practice; should it
            // happen, queueing must resume (the peers' remedy, anti-entropy,
            // does not exist for the tier).
            tracing::error!("tier outbox was marked overflowed; writes before this start may not reach the tier");
            outbox
                .clear_overflow(TARGET)
                .map_err(|e| format!("cannot clear the tier outbox's overflow mark: {e}"))?;
        }
        let mut pending = HashMap::new();
        let mut pos = outbox.mark(TARGET).map_or(0, |m| m.acked);
        loop {
            match outbox.read_at(pos) {
                Ok(Some((record, next))) => {
                    if record.op == Op::Put {
                        *pending
                            .entry(crate::store::relative_path(&record.ns, &record.key))
                            .or_insert(0) += 1;
                    }
                    pos = next;
                }
                Ok(None) => break,
                Err(err) => {
                    return Err(format!("cannot read the tier outbox at {pos}: {err}"));
                }
            }
        }
        let series = Series::default();
        Ok(Arc::new(Tier {
            settings,
            client,
            rt,
            upload_client,
            upload_rt,
            store,
            outbox,
            pending: Mutex::new(pending),
            reads: Mutex::new(policy::Reads::default()),
            fetched: tokio::sync::Notify::new(),
            ranges: Mutex::new(policy::Ranges::default()),
            kick: tokio::sync::Notify::new(),
            recovered: std::sync::atomic::AtomicBool::new(false),
            series,
            limiter,
            throttled_bytes: std::sync::atomic::AtomicU64::new(0),
            latency: Mutex::new(Latency::default()),
            view: Mutex::new(View {
                state: "unknown",
                ..View::default()
            }),
        }))
    }

    /// What the tier is not known to hold: acknowledged writes and deletes
    /// queued, uploading, or failed and waiting for a retry (see [`Lag`]).
    /// The upload loop's view is read before the queue, so an entry it
    /// takes in between is counted twice for a moment, never missed.
    pub fn lag(&self) -> Lag {
        let (read_pos, pending) = {
            let view = lock(&self.view);
            (view.read_pos, view.pending)
        };
        let acked = self.outbox.mark(TARGET).map_or(0, |m| m.acked);
        self.outbox.lag_from(read_pos.max(acked)).plus(pending)
    }

    /// Bytes of queued uploads (outbox bytes from the tier's cursor to the end).
    pub fn queue_bytes(&self) -> u64 {
        let acked = self.outbox.mark(TARGET).map_or(0, |m| m.acked);
        self.outbox.end().saturating_sub(acked)
    }

    /// A PUT that would pass the queue's bound is refused with 507 before
    /// its body is read: the tier is behind and the write could not be kept
    /// safe for it.
    pub fn refuse_put(&self) -> Option<Reply> {
        let room = |tier: &Tier| {
            tier.queue_bytes() + RECORD_BYTES_MAX as u64 <= tier.settings.outbox_bytes_max
        };
        if room(self) {
            return None;
        }
        // The outbox hears the upload loop's position every 200 ms only: a
        // queue the loop has drained since must not refuse (it answered 507
        // right after the queue gauge read 0). Bring the outbox up to date
        // first; only a PUT about to be refused pays for it.
        let acked = lock(&self.view).acked;
        self.outbox.set_acked(TARGET, acked);
        if room(self) {
            return None;
        }
        let mut reply = Reply::error(
            507,
            "the object-store tier is behind: its upload queue is at replication_outbox_bytes_max",
        );
        reply
            .headers
            .push(("retry-after", upload::RETRY_AFTER_FULL_SECS.to_string()));
        Some(reply)
    }

    /// Mark `ns/key` as not yet in the tier (eviction spares it) until the
    /// returned guard is dropped or handed to the outbox by [`Tier::queue_put`].
    pub fn hold(self: &Arc<Self>, ns: &str, key: &str) -> Hold {
        let rel = crate::store::relative_path(ns, key);
        *lock(&self.pending).entry(rel.clone()).or_insert(0) += 1;
        Hold {
            tier: Arc::clone(self),
            rel: Some(rel),
            ns: ns.to_string(),
            key: key.to_string(),
        }
    }

    fn release(&self, rel: &str) {
        let mut pending = lock(&self.pending);
        if let Some(n) = pending.get_mut(rel) {
            *n -= 1;
            if *n == 0 {
                pending.remove(rel);
            }
        }
    }

    /// Whether eviction may drop the local copy at `rel`: not while an
    /// upload of it is queued.
    pub fn may_evict(&self, rel: &str) -> bool {
        !lock(&self.pending).contains_key(rel)
    }

    /// Artifacts with an upload queued.
    pub fn pending_keys(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Queue the upload of a committed PUT (durably, before the 2xx); the
    /// hold passes to the queued record.
    #[allow(clippy::result_large_err)] // the error is the reply, as in `App`
    pub fn queue_put(&self, hold: Hold, write_time_ms: u64, len: u64) -> Result<(), Reply> {
        let (ns, key) = (hold.ns.clone(), hold.key.clone());
        match self.outbox.append(Op::Put, &ns, &key, write_time_ms, len) {
            Ok(()) => {
                hold.keep();
                self.kick.notify_one();
                Ok(())
            }
            Err(err) => {
                tracing::error!(error = %err, ns, key, "cannot queue a write for the object-store tier");
                Err(Reply::error(
                    500,
                    "the write is stored here but could not be queued for the object-store tier",
                ))
            }
        }
    }

    /// `tier_write = "through"`, after the commit: upload now, on the tier
    /// runtime, and `send` the PUT's `reply` once the tier holds it. If it
    /// does not take it, the write is queued like a write-behind and the
    /// answer is 503 with `Retry-After`.
    pub fn upload_through(
        self: &Arc<Self>,
        hold: Hold,
        write_time_ms: u64,
        len: u64,
        reply: Reply,
        send: crate::exchange::ReplyLater,
    ) {
        let tier = Arc::clone(self);
        self.rt.spawn(async move {
            let sent = upload::upload_put(&tier, &hold.ns, &hold.key, false).await;
            if matches!(sent, upload::Sent::Ok | upload::Sent::Gone) {
                // `hold` drops: the tier has it.
                send(reply);
                return;
            }
            let refused =
                tokio::task::block_in_place(|| tier.queue_put(hold, write_time_ms, len).err());
            send(match refused {
                None => {
                    let mut reply = Reply::error(
                        503,
                        "stored here and queued for the object-store tier, which did not take \
                         it in time (tier_write = through)",
                    );
                    reply
                        .headers
                        .push(("retry-after", RETRY_AFTER_SECS.to_string()));
                    reply
                }
                Some(reply) => reply,
            });
        });
    }

    /// Queue the deletion of `ns/key` in the tier.
    #[allow(clippy::result_large_err)]
    pub fn queue_delete(&self, ns: &str, key: &str, write_time_ms: u64) -> Result<(), Reply> {
        match self.outbox.append(Op::Delete, ns, key, write_time_ms, 0) {
            Ok(()) => {
                self.kick.notify_one();
                Ok(())
            }
            Err(err) => {
                tracing::error!(error = %err, ns, key, "cannot queue a delete for the object-store tier");
                Err(Reply::error(
                    500,
                    "deleted here but could not be queued for the object-store tier",
                ))
            }
        }
    }

    /// Count a tier request: `op`, `result`, how long it took.
    pub(crate) fn observe(&self, op: &'static str, result: &'static str, took: Duration) {
        self.series.add(
            "sluice_tier_requests_total",
            format!("op=\"{op}\",result=\"{result}\""),
            1,
        );
        let mut latency = lock(&self.latency);
        let entry = latency
            .ops
            .entry(op)
            .or_insert(([0; LATENCY_BUCKETS_S.len()], 0, 0));
        let secs = took.as_secs_f64();
        for (i, le) in LATENCY_BUCKETS_S.iter().enumerate() {
            if secs <= *le {
                entry.0[i] += 1;
            }
        }
        entry.1 += 1;
        entry.2 += took.as_micros() as u64;
    }

    /// The tier answered (`Ok`) or failed: keep `/status` and the log
    /// current, logging transitions only.
    pub(crate) fn note_health(&self, result: Result<(), &str>, backoff: Option<Duration>) {
        let mut view = lock(&self.view);
        match result {
            Ok(()) => {
                if view.state == "down" {
                    tracing::info!(url = %self.settings.url, "object-store tier is answering again");
                }
                view.state = "up";
                view.failures = 0;
                view.backoff_ms = 0;
            }
            Err(err) => {
                if view.state != "down" {
                    tracing::warn!(url = %self.settings.url, error = %err, "object-store tier is failing; local hits keep serving, writes queue");
                }
                view.state = "down";
                view.failures = view.failures.saturating_add(1);
                view.last_error = Some(err.to_string());
                if let Some(b) = backoff {
                    view.backoff_ms = b.as_millis() as u64;
                }
            }
        }
    }

    /// `/metrics` lines.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let view = lock(&self.view).clone();
        head(
            out,
            "sluice_tier_up",
            "gauge",
            "1 while the object-store tier answers.",
        );
        let _ = writeln!(out, "sluice_tier_up {}", u8::from(view.state == "up"));
        head(
            out,
            "sluice_tier_requests_total",
            "counter",
            "Requests to the object-store tier, by op (upload, delete, get, get_range, probe) and result (ok, not_found, failed).",
        );
        for op in ["upload", "delete", "get", "get_range", "probe"] {
            for result in ["ok", "not_found", "failed"] {
                let labels = format!("op=\"{op}\",result=\"{result}\"");
                let v = self.series.get("sluice_tier_requests_total", &labels);
                let _ = writeln!(out, "sluice_tier_requests_total{{{labels}}} {v}");
            }
        }
        head(
            out,
            "sluice_tier_request_duration_seconds",
            "histogram",
            "Latency of requests to the object-store tier (a get until its answer's head), by op.",
        );
        {
            let latency = lock(&self.latency);
            let mut ops: Vec<_> = latency.ops.iter().collect();
            ops.sort_by_key(|(op, _)| **op);
            for (op, (buckets, count, sum_us)) in ops {
                for (i, le) in LATENCY_BUCKETS_S.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "sluice_tier_request_duration_seconds_bucket{{op=\"{op}\",le=\"{le}\"}} {}",
                        buckets[i]
                    );
                }
                let _ = writeln!(
                    out,
                    "sluice_tier_request_duration_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}} {count}"
                );
                let _ = writeln!(
                    out,
                    "sluice_tier_request_duration_seconds_sum{{op=\"{op}\"}} {}",
                    *sum_us as f64 / 1e6
                );
                let _ = writeln!(
                    out,
                    "sluice_tier_request_duration_seconds_count{{op=\"{op}\"}} {count}"
                );
            }
        }
        head(
            out,
            "sluice_tier_throttled_bytes_total",
            "counter",
            "Bytes of write-behind uploads that waited for the replication limiter's tokens.",
        );
        let _ = writeln!(
            out,
            "sluice_tier_throttled_bytes_total {}",
            self.throttled_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        let acked = lock(&self.view).acked;
        let backlog = self.outbox.backlog_at(TARGET, acked);
        let lag = self.lag();
        head(
            out,
            "sluice_tier_lag_writes",
            "gauge",
            "Acknowledged writes and deletes the tier is not known to hold: queued, uploading, or failed and waiting for a retry. 0: the tier took every write this node knows of.",
        );
        let _ = writeln!(out, "sluice_tier_lag_writes {}", lag.writes);
        head(
            out,
            "sluice_tier_lag_bytes",
            "gauge",
            "Artifact bytes of the writes counted by sluice_tier_lag_writes.",
        );
        let _ = writeln!(out, "sluice_tier_lag_bytes {}", lag.bytes);
        head(
            out,
            "sluice_tier_lag_seconds",
            "gauge",
            "Age of the oldest write counted by sluice_tier_lag_writes (0 when there is none).",
        );
        let _ = writeln!(
            out,
            "sluice_tier_lag_seconds {}",
            lag.age_ms(crate::store::now_ms()) as f64 / 1000.0
        );
        head(
            out,
            "sluice_tier_queue_entries",
            "gauge",
            "Uploads (and deletes) queued for the tier.",
        );
        let _ = writeln!(out, "sluice_tier_queue_entries {}", backlog.entries);
        head(
            out,
            "sluice_tier_queue_bytes",
            "gauge",
            "Bytes of the tier's outbox not yet taken (the bound is replication_outbox_bytes_max).",
        );
        let _ = writeln!(out, "sluice_tier_queue_bytes {}", backlog.bytes);
        head(
            out,
            "sluice_tier_queue_oldest_age_seconds",
            "gauge",
            "Age of the oldest queued upload: how far the tier is behind.",
        );
        let _ = writeln!(
            out,
            "sluice_tier_queue_oldest_age_seconds {}",
            backlog.oldest_age_ms as f64 / 1000.0
        );
        head(
            out,
            "sluice_tier_pending_artifacts",
            "gauge",
            "Local artifacts not yet in the tier (eviction spares them).",
        );
        let _ = writeln!(out, "sluice_tier_pending_artifacts {}", self.pending_keys());
        head(
            out,
            "sluice_tier_read_through_total",
            "counter",
            "Local misses read through from the tier, by result: stored, not_found, refused (failed verification), unavailable, joined (waited for another request's fetch), range (a small range served from a ranged read before the whole object arrived).",
        );
        for result in [
            "stored",
            "not_found",
            "refused",
            "unavailable",
            "joined",
            "range",
        ] {
            let labels = format!("result=\"{result}\"");
            let v = self.series.get("sluice_tier_read_through_total", &labels);
            let _ = writeln!(out, "sluice_tier_read_through_total{{{labels}}} {v}");
        }
        head(
            out,
            "sluice_tier_read_through_bytes_total",
            "counter",
            "Bytes read through from the tier and stored locally.",
        );
        let _ = writeln!(
            out,
            "sluice_tier_read_through_bytes_total {}",
            self.series.get("sluice_tier_read_through_bytes_total", "")
        );
    }

    /// The `/status` section.
    pub fn render_status(&self) -> serde_json::Value {
        let view = lock(&self.view).clone();
        let backlog = self.outbox.backlog_at(TARGET, view.acked);
        let lag = self.lag();
        serde_json::json!({
            "url": self.settings.url,
            "endpoint": self.settings.endpoint,
            "write": match self.settings.write { TierWrite::Behind => "behind", TierWrite::Through => "through" },
            "timeout_ms": self.settings.timeout.as_millis() as u64,
            "state": view.state,
            "failures": view.failures,
            "backoff_ms": view.backoff_ms,
            "last_error": view.last_error,
            "uploads_in_flight": view.uploads_in_flight,
            "fetches_in_flight": lock(&self.reads).in_flight(),
            "pending_artifacts": self.pending_keys(),
            "lag": lag.to_json(crate::store::now_ms()),
            "queue": {
                "entries": backlog.entries,
                "bytes": backlog.bytes,
                "bytes_max": self.settings.outbox_bytes_max,
                "oldest_age_ms": backlog.oldest_age_ms,
            },
        })
    }
}

/// An artifact marked as not yet in the tier (see [`Tier::hold`]).
pub struct Hold {
    tier: Arc<Tier>,
    rel: Option<String>,
    ns: String,
    key: String,
}

impl Hold {
    /// The mark now belongs to a queued record (released when it is uploaded).
    fn keep(mut self) {
        self.rel = None;
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(rel) = self.rel.take() {
            self.tier.release(&rel);
        }
    }
}

impl Tier {
    /// Start the upload loop and the health probe on the tier runtime.
    pub fn start(self: &Arc<Self>) {
        self.upload_rt.spawn(upload::run(Arc::clone(self)));
        self.rt.spawn(upload::probe(Arc::clone(self)));
        tracing::info!(
            url = %self.settings.url,
            endpoint = self.settings.endpoint.as_deref().unwrap_or("aws"),
            queued = self.outbox.backlog(TARGET).entries,
            "object-store tier attached"
        );
    }
}

/// The tier hears about every acknowledged client write: it holds the new
/// artifact from before its commit (eviction spares it) and queues it
/// (write-behind) or uploads it before the reply (write-through).
impl WriteListener for Tier {
    fn refuse_put(&self) -> Option<Reply> {
        Tier::refuse_put(self)
    }

    fn begin_put(self: Arc<Self>, ns: &str, key: &str) -> PutFollowUp {
        let hold = self.hold(ns, key);
        match self.settings.write {
            TierWrite::Through => {
                PutFollowUp::AfterCommit(Box::new(move |committed, reply, send| {
                    self.upload_through(hold, committed.write_time_ms, committed.len, reply, send);
                }))
            }
            TierWrite::Behind => PutFollowUp::OnCommit(Box::new(move |committed| {
                self.queue_put(hold, committed.write_time_ms, committed.len)
                    .err()
            })),
        }
    }

    fn deleted(&self, ns: &str, key: &str, time_ms: u64) -> Result<(), Reply> {
        self.queue_delete(ns, key, time_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{PutOptions, StoreConfig};

    /// Threads of this process whose name starts with `prefix` (the
    /// kernel keeps 15 bytes of a thread's name).
    fn threads_named(prefix: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim_end().starts_with(prefix))
            .count()
    }

    #[test]
    fn the_upload_runtime_keeps_its_threads_bounded_while_uploads_block() {
        // Many uploads blocking on the disk at once (as a backlog of cold
        // files would) must not each add a thread.
        let rt = upload_runtime().unwrap();
        let blocked: Vec<_> = (0..4 * UPLOADS_IN_FLIGHT_MAX)
            .map(|_| {
                rt.spawn(async {
                    tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(20)))
                })
            })
            .collect();
        let mut most = 0;
        for _ in 0..20 {
            most = most.max(threads_named("sluice-tier-upl"));
            std::thread::sleep(Duration::from_millis(5));
        }
        for task in blocked {
            rt.block_on(task).unwrap();
        }
        most = most.max(threads_named("sluice-tier-upl"));
        assert!(
            most <= 1 + UPLOAD_BLOCKING_THREADS_MAX,
            "{most} upload threads, at most {} expected",
            1 + UPLOAD_BLOCKING_THREADS_MAX
        );
        assert!(most >= 1);
    }

    fn settings(bytes_max: u64) -> Settings {
        Settings {
            url: "s3://bucket/prefix".to_string(),
            // Nothing listens there; these tests make no request.
            endpoint: Some("http://127.0.0.1:1".to_string()),
            write: TierWrite::Behind,
            timeout: Duration::from_millis(100),
            outbox_bytes_max: bytes_max,
            fsync: false,
            body_bytes_max: 1 << 20,
        }
    }

    #[test]
    fn held_artifacts_are_spared_until_uploaded_and_the_set_survives_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig {
            data_dir: tmp.path().join("data"),
            ..StoreConfig::default()
        })
        .unwrap();
        let mut w = store.begin_put("ns", "k", PutOptions::default()).unwrap();
        w.write(b"body").unwrap();
        w.commit().unwrap();
        let rel = crate::store::relative_path("ns", "k");
        let tier = Tier::open(settings(1 << 20), tmp.path(), store.clone(), None).unwrap();
        assert!(tier.may_evict(&rel));
        // Held from before the commit; a PUT that never commits releases it.
        drop(tier.hold("ns", "k"));
        assert!(tier.may_evict(&rel));
        let hold = tier.hold("ns", "k");
        assert!(!tier.may_evict(&rel));
        tier.queue_put(hold, 5, 4).unwrap();
        assert!(!tier.may_evict(&rel), "queued, not uploaded");
        assert_eq!(tier.pending_keys(), 1);
        drop(tier);
        // kill -9: the queue is on disk, and so is what eviction must spare.
        let tier = Tier::open(settings(1 << 20), tmp.path(), store.clone(), None).unwrap();
        assert!(!tier.may_evict(&rel));
        assert_eq!(tier.outbox.backlog(TARGET).entries, 1);
        // The upload loop acknowledges it: released.
        tier.release(&rel);
        assert!(tier.may_evict(&rel));
    }

    /// A tier whose 4 KiB queue is full: the next PUT would be refused.
    fn full_tier(tmp: &tempfile::TempDir) -> Arc<Tier> {
        let store = Store::open(StoreConfig {
            data_dir: tmp.path().join("data"),
            ..StoreConfig::default()
        })
        .unwrap();
        let tier = Tier::open(settings(4096), tmp.path(), store, None).unwrap();
        let mut queued = 0;
        while tier.refuse_put().is_none() {
            tier.queue_put(tier.hold("ns", &format!("k{queued}")), 1, 1)
                .unwrap();
            queued += 1;
            assert!(queued < 1000, "never full");
        }
        tier
    }

    #[test]
    fn a_full_queue_refuses_puts_with_507() {
        let tmp = tempfile::tempdir().unwrap();
        let tier = full_tier(&tmp);
        let reply = tier.refuse_put().unwrap();
        assert_eq!(reply.status, 507);
        assert!(reply.headers.iter().any(|(k, _)| *k == "retry-after"));
        assert!(tier.queue_bytes() <= 4096);
        assert!(!tier.outbox.mark(TARGET).unwrap().overflow);
    }

    #[test]
    fn a_queue_the_upload_loop_drained_takes_puts_before_the_cursor_is_synced() {
        let tmp = tempfile::tempdir().unwrap();
        let tier = full_tier(&tmp);
        // The upload loop took everything; the outbox has not heard yet
        // (it is told every 200 ms).
        lock(&tier.view).acked = tier.outbox.end();
        assert!(tier.refuse_put().is_none(), "a drained queue refused a PUT");
        assert_eq!(tier.queue_bytes(), 0);
        // And the outbox's cursor only moves forward.
        tier.outbox.set_acked(TARGET, 0);
        assert_eq!(tier.queue_bytes(), 0);
    }
}
