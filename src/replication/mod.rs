//! The replication mesh: a set of sluice nodes is one cache.
//!
//! - [`policy`]: the sans-IO state machines (membership, per-peer
//!   decisions), driven with a clock passed in; backoff, the outbox cursor,
//!   the durable outbox and the limiter are `crate::delivery`'s, shared with
//!   the object-store tier.
//! - [`peer_api`]: the receiving side, `/_peer/v1/...` on the public port,
//!   opened only by `peer_secret`.
//! - [`summary`]: anti-entropy summaries (bucketed digests of what a node
//!   holds).
//! - [`transport`]: how requests reach peers: tasks on the engine rings, or
//!   a blocking sender thread when there are no rings.
//! - [`driver`]: the replication thread, which runs the policies against the
//!   real clock, the outbox and the transport.
//!
//! See `docs/replication.md` for the model and its guarantees.

pub mod batch;
pub mod driver;
pub mod peer_api;
pub mod policy;
pub mod read_through;
pub mod summary;
pub mod transport;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::app::{PutFollowUp, WriteListener};
use crate::config::{Config, Secret};
use crate::delivery::outbox::{Op, Outbox};
use crate::delivery::{Lag, Limiter, Series};
use crate::exchange::Reply;

/// Every peer API path starts with this (reserved by the application).
pub use crate::app::PEER_PREFIX;
/// The `Authorization` scheme of peer requests: `SluicePeer <peer_secret>`.
/// Not `Bearer`, so a peer secret is never mistaken for a public token and
/// a public token never opens the peer API.
pub const AUTH_SCHEME: &str = "SluicePeer";

pub use crate::store::now_ms;

/// What the replication thread needs from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Static peers, `host:port`.
    pub peers: Vec<String>,
    /// `name:port`, re-resolved every `peer_refresh`.
    pub peers_dns: Option<String>,
    pub peer_refresh: Duration,
    /// Opens the peer API, and is sent to the peers (redacted in `Debug`).
    pub peer_secret: Secret,
    pub outbox_bytes_max: u64,
    pub anti_entropy_interval: Duration,
    pub probe_interval: Duration,
    pub request_timeout: Duration,
    /// This node's bound address: a peer entry naming it is this node.
    pub listen: SocketAddr,
    pub fsync: bool,
    /// Largest body a peer PUT may carry, bytes.
    pub body_bytes_max: u64,
    /// How long a delete's tombstone is kept (`tombstone_retention_ms`).
    pub tombstone_retention: Duration,
    /// Peers are configured (`peers` or `peers_dns`). Without them a node
    /// with a `peer_secret` still answers the peer API (an origin that
    /// replicates to nobody) but records no outbox entries.
    pub replicates: bool,
    /// Read-through from peers on a local miss (only when `replicates`).
    pub read_through: bool,
    pub read_through_timeout: Duration,
    pub read_through_negative: Duration,
}

impl Settings {
    /// `None` when neither peers nor a peer secret are configured: this
    /// node has no part in a mesh.
    pub fn from_config(config: &Config, listen: SocketAddr) -> Option<Settings> {
        let replicates = !config.peers.is_empty() || config.peers_dns.is_some();
        if !replicates && !config.peer_secret.is_given() {
            return None;
        }
        Some(Settings {
            peers: config.peers.clone(),
            peers_dns: config.peers_dns.clone(),
            peer_refresh: Duration::from_millis(config.peer_refresh_ms),
            peer_secret: config.peer_secret.clone(),
            outbox_bytes_max: config.replication_outbox_bytes_max,
            anti_entropy_interval: Duration::from_millis(config.anti_entropy_interval_ms),
            probe_interval: Duration::from_millis(config.peer_probe_interval_ms),
            request_timeout: Duration::from_millis(config.replication_request_timeout_ms),
            listen,
            fsync: config.fsync == crate::config::FsyncPolicy::Always,
            body_bytes_max: config.body_bytes_max.max(config.gradle_body_bytes_max),
            tombstone_retention: Duration::from_millis(config.tombstone_retention_ms),
            replicates,
            read_through: replicates && config.read_through,
            read_through_timeout: Duration::from_millis(config.read_through_timeout_ms),
            read_through_negative: Duration::from_millis(config.read_through_negative_ms),
        })
    }
}

/// `(name, type, help)` of every replication series, in render order.
pub const SERIES: &[(&str, &str, &str)] = &[
    ("sluice_peer_up", "gauge", "1 while the peer answers probes."),
    ("sluice_peer_transitions_total", "counter", "Peer state changes, by the state entered."),
    ("sluice_peer_probes_total", "counter", "Probes sent to the peer."),
    ("sluice_membership_reconciles_total", "counter", "Membership reconciles: only real transitions (peer up/down, set changed) count."),
    ("sluice_peer_backoff_seconds", "gauge", "Time until the next attempt to reach the peer."),
    ("sluice_replication_connect_attempts_total", "counter", "Requests started towards the peer (probes, sends, repairs; immediate retries included); each opens a connection unless it reuses a pooled one."),
    ("sluice_replication_connections_reused_total", "counter", "Requests answered over a pooled keep-alive connection (no connect)."),
    ("sluice_replication_connect_retries_total", "counter", "Immediate retries on a fresh connection after a failure before any byte reached the peer."),
    ("sluice_replication_lag_writes", "gauge", "Acknowledged writes and deletes the peer is not known to hold: queued in the outbox, in flight, failed and waiting for a retry, owed since an overflow, or handed to an anti-entropy repair. 0: the peer acknowledged every write this node knows of."),
    ("sluice_replication_lag_bytes", "gauge", "Artifact bytes of the writes counted by sluice_replication_lag_writes (a delete counts 0)."),
    ("sluice_replication_lag_seconds", "gauge", "Age of the oldest write counted by sluice_replication_lag_writes (0 when there is none)."),
    ("sluice_replication_outbox_entries", "gauge", "Outbox entries the peer has not taken."),
    ("sluice_replication_outbox_bytes", "gauge", "Outbox bytes (on disk) the peer has not taken."),
    ("sluice_replication_outbox_oldest_age_seconds", "gauge", "Age of the oldest outbox entry the peer has not taken."),
    ("sluice_replication_outbox_overflows_total", "counter", "Times the peer's backlog passed replication_outbox_bytes_max (anti-entropy repairs it)."),
    ("sluice_replication_sent_requests_total", "counter", "Replication requests sent, by peer and result (ok, rejected, full, failed)."),
    ("sluice_replication_sent_bytes_total", "counter", "Artifact body bytes replicated to the peer."),
    ("sluice_replication_received_requests_total", "counter", "Peer API requests received, by result; each write of a batch counts as one."),
    ("sluice_replication_sent_batches_total", "counter", "Batch requests sent to the peer (many small writes in one request; each write also counts in sluice_replication_sent_requests_total's result), by result."),
    ("sluice_replication_received_batches_total", "counter", "Batch requests received from peers, by result (ok; retry: an entry found no room or failed, the sender sends the batch again; bad)."),
    ("sluice_replication_received_bytes_total", "counter", "Artifact body bytes received from peers and stored."),
    ("sluice_anti_entropy_runs_total", "counter", "Anti-entropy comparisons with the peer, by result."),
    ("sluice_anti_entropy_buckets_compared_total", "counter", "Summary buckets compared."),
    ("sluice_anti_entropy_buckets_differing_total", "counter", "Summary buckets that differed and were walked."),
    ("sluice_anti_entropy_repaired_total", "counter", "Artifacts sent to a peer by anti-entropy."),
    ("sluice_replication_limit_bytes_per_second", "gauge", "The configured replication rate (replication_bytes_per_second; 0 = no limit)."),
    ("sluice_replication_effective_bytes_per_second", "gauge", "The replication rate in force now, after public pressure (0 = no limit)."),
    ("sluice_replication_public_ttfb_p99_seconds", "gauge", "p99 of public read TTFB over the limiter's last 100 ms window (0 without samples): the latency signal."),
    ("sluice_replication_public_latency_p99_seconds", "gauge", "p99 of public read latency from the kernel's receive time of the request's first bytes to the response's first byte handed to the kernel, over the limiter's last 100 ms window (sampled; 0 without samples): the latency signal."),
    ("sluice_replication_public_latency_samples_total", "counter", "Public reads measured from the kernel's receive time (the sampled ones)."),
    ("sluice_replication_public_in_flight", "gauge", "Public requests in flight at the limiter's last step: the concurrency signal."),
    ("sluice_replication_cpu_pressure_ratio", "gauge", "Share of the limiter's last step during which some task waited for a CPU (PSI cpu some; the cgroup's when the server runs in one)."),
    ("sluice_replication_io_pressure_ratio", "gauge", "Share of the limiter's last step during which some task waited for I/O (PSI io some)."),
    ("sluice_replication_limiter_seconds_total", "counter", "Time the limiter spent in each state (full, rising, holding, backing_off, capped, floor)."),
    ("sluice_replication_throttled_bytes_total", "counter", "Peer body bytes (outbox sends, repairs) that waited for limiter tokens before going."),
    ("sluice_read_through_fetches_total", "counter", "Read-through fetches from peers after a local miss, by result (ok, not_found, failed, corrupt, too_large, timeout)."),
    ("sluice_read_through_coalesced_total", "counter", "Requests that waited for another request's read-through fetch of the same key."),
    ("sluice_read_through_negative_hits_total", "counter", "Misses answered 404 at once because no peer held the key moments ago."),
];

/// What `/status` shows of one peer (published by the replication thread).
#[derive(Clone, Debug, Default)]
pub struct PeerView {
    pub peer: String,
    pub state: &'static str,
    pub backoff_ms: u64,
    pub failures: u32,
    pub last_error: Option<String>,
    pub in_flight: usize,
    /// Everything before this outbox offset the peer has taken.
    pub acked: u64,
    /// The next outbox offset not yet sent: from here to the end is queued.
    pub read_pos: u64,
    /// Entries sent and not answered, or failed and waiting to go again.
    pub pending: Lag,
    /// Anti-entropy repairs queued and in flight.
    pub repairs: Lag,
    /// How many repairs are queued (not yet sent).
    pub repairs_queued: usize,
}

/// The mesh, shared by the front ends (outbox, peer API) and the
/// replication thread.
pub struct Replication {
    pub settings: Settings,
    pub node_id: String,
    pub outbox: Outbox,
    pub series: Series,
    pub views: Mutex<Vec<PeerView>>,
    /// Set when the outbox has something new; the thread clears it.
    kicked: AtomicBool,
    /// This node's store answered a replicated write "no space" and has
    /// not stored one since (logged once per change).
    store_full: AtomicBool,
    /// Bumped each time the store is found full: a write begun before that
    /// (it took room the store had then) does not say it has room again.
    full_epoch: std::sync::atomic::AtomicU64,
    wake: Mutex<Option<std::sync::mpsc::Sender<driver::Event>>>,
    /// Anti-entropy summaries, computed off the engine threads.
    pub summaries: summary::Cache,
    /// The bandwidth limiter every peer body draws from (and the object-store
    /// tier's uploads: one budget for all replication).
    pub limiter: Arc<Limiter>,
    /// The peers' addresses and states, published by the replication thread
    /// for read-through.
    pub peer_addrs: Mutex<Vec<(String, SocketAddr, policy::PeerState)>>,
}

impl Replication {
    /// Open the outbox (in `data_dir/.outbox`) and the node id. Peer bodies
    /// draw from `limiter` (the node's one budget, shared with the tier).
    pub fn open(
        settings: Settings,
        data_dir: &Path,
        limiter: Arc<Limiter>,
    ) -> std::io::Result<Replication> {
        let outbox = Outbox::open(
            &data_dir.join(".outbox"),
            settings.fsync,
            settings.outbox_bytes_max,
        )?;
        // The static peers get cursors now, before anything is served: the
        // replication thread learns the set a moment later, and a write
        // acknowledged in between must still be recorded for them. (Peers
        // found by DNS later are compared by anti-entropy when they join.)
        let statics: Vec<String> = settings
            .peers
            .iter()
            .filter(|p| p.parse::<SocketAddr>().ok() != Some(settings.listen))
            .cloned()
            .collect();
        outbox.add_peers(&statics);
        let node_id = node_id(data_dir)?;
        let series = Series::default();
        // Present from the start, so a scrape can tell "none" from "unknown".
        for name in [
            "sluice_membership_reconciles_total",
            "sluice_replication_received_bytes_total",
            "sluice_anti_entropy_buckets_compared_total",
            "sluice_anti_entropy_buckets_differing_total",
            "sluice_anti_entropy_repaired_total",
            "sluice_replication_throttled_bytes_total",
            "sluice_read_through_coalesced_total",
            "sluice_read_through_negative_hits_total",
        ] {
            series.add(name, String::new(), 0);
        }
        Ok(Replication {
            settings,
            limiter,
            peer_addrs: Mutex::new(Vec::new()),
            node_id,
            outbox,
            series,
            views: Mutex::new(Vec::new()),
            kicked: AtomicBool::new(false),
            store_full: AtomicBool::new(false),
            full_epoch: std::sync::atomic::AtomicU64::new(0),
            wake: Mutex::new(None),
            summaries: summary::Cache::new(data_dir.to_path_buf()),
        })
    }

    /// Whether `authorization` carries this mesh's peer secret
    /// (constant-time).
    pub fn authorized(&self, authorization: Option<&[u8]>) -> bool {
        use subtle::ConstantTimeEq;
        let Some(value) = authorization else {
            return false;
        };
        let value = value.trim_ascii();
        let Some(rest) = value
            .strip_prefix(AUTH_SCHEME.as_bytes())
            .and_then(|r| r.strip_prefix(b" "))
        else {
            return false;
        };
        let secret = self.settings.peer_secret.expose();
        !secret.is_empty() && bool::from(rest.trim_ascii().ct_eq(secret))
    }

    /// The peer secret as a request to a peer carries it. Read out of its
    /// redacting [`Secret`] only here, where a request is written.
    pub fn peer_secret_text(&self) -> String {
        String::from_utf8_lossy(self.settings.peer_secret.expose()).into_owned()
    }

    /// Record an acknowledged PUT for the peers. `Err` is the reply the
    /// client gets instead of its 2xx.
    #[allow(clippy::result_large_err)] // the error is the reply, as in `App`
    pub fn record_put(
        &self,
        ns: &str,
        key: &str,
        write_time_ms: u64,
        len: u64,
    ) -> Result<(), Reply> {
        self.record(Op::Put, ns, key, write_time_ms, len)
    }

    /// Record an acknowledged DELETE for the peers.
    #[allow(clippy::result_large_err)]
    pub fn record_delete(&self, ns: &str, key: &str, write_time_ms: u64) -> Result<(), Reply> {
        self.record(Op::Delete, ns, key, write_time_ms, 0)
    }

    #[allow(clippy::result_large_err)]
    fn record(
        &self,
        op: Op,
        ns: &str,
        key: &str,
        write_time_ms: u64,
        len: u64,
    ) -> Result<(), Reply> {
        if !self.settings.replicates {
            return Ok(()); // an origin only: nobody to send to
        }
        match self.outbox.append(op, ns, key, write_time_ms, len) {
            Ok(()) => {
                self.kick();
                Ok(())
            }
            Err(err) => {
                tracing::error!(error = %err, ns, key, "cannot record a write in the replication outbox");
                Err(Reply::error(
                    500,
                    "the write is stored here but could not be queued for the peers",
                ))
            }
        }
    }

    /// A replicated write failed in this node's store: counted by cause
    /// (`full` for no space, `bad` for a body that is not what was
    /// announced, `failed` otherwise); running out of space is logged once,
    /// when it starts.
    /// This node's store found no room for a replicated write: the state
    /// changes (logged once) until a write begun after it is taken.
    pub fn note_full(&self) {
        if !self.store_full.swap(true, Ordering::AcqRel) {
            self.full_epoch.fetch_add(1, Ordering::AcqRel);
            tracing::warn!(
                "this node's store is full: replicated writes are answered 507 and \
                 the peers keep them until it has room"
            );
        }
    }

    pub fn write_failed(&self, err: &crate::store::StoreError) {
        use crate::store::StoreError;
        let result = match err {
            StoreError::NoSpace => {
                self.note_full();
                "full"
            }
            StoreError::DigestMismatch { .. }
            | StoreError::LengthMismatch { .. }
            | StoreError::TooLarge { .. }
            | StoreError::InvalidKey => "bad",
            _ => "failed",
        };
        self.series.add(
            "sluice_replication_received_requests_total",
            format!("result=\"{result}\""),
            1,
        );
    }

    /// Pass to [`Replication::note_room`] when a replicated write begins.
    pub fn full_epoch(&self) -> u64 {
        self.full_epoch.load(Ordering::Acquire)
    }

    /// A replicated write begun at `epoch` ([`Replication::full_epoch`]) was
    /// stored: if the store was full when it began, it has room again
    /// (logged once). One begun before the store was found full took room
    /// the store had then, and says nothing: with several bodies received
    /// at once, those made the state flap full/room.
    pub fn note_room(&self, epoch: u64) {
        if self.store_full.load(Ordering::Acquire)
            && epoch == self.full_epoch()
            && self.store_full.swap(false, Ordering::AcqRel)
        {
            tracing::info!("this node's store has room again: replicated writes are stored");
        }
    }

    /// Wake the replication thread (coalesced).
    pub fn kick(&self) {
        if !self.kicked.swap(true, Ordering::AcqRel) {
            let wake = self.wake.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(tx) = wake.as_ref() {
                let _ = tx.send(driver::Event::Kick);
            }
        }
    }

    fn take_kick(&self) {
        self.kicked.store(false, Ordering::Release);
    }

    /// `/metrics` lines.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let snapshot = self.series.snapshot();
        let o = self.limiter.observe(std::time::Instant::now());
        let views = self.views_snapshot();
        let acked_of = |peer: &str| views.iter().find(|v| v.peer == peer).map_or(0, |v| v.acked);
        let lags: Vec<(String, Lag)> = self
            .outbox
            .peers()
            .into_iter()
            .map(|p| {
                let lag = self.lag_with(&p, views.iter().find(|v| v.peer == p));
                (p, lag)
            })
            .collect();
        for (name, kind, help) in SERIES {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            match *name {
                "sluice_replication_limit_bytes_per_second" => {
                    let _ = writeln!(out, "{name} {}", self.limiter.limit);
                }
                "sluice_replication_effective_bytes_per_second" => {
                    let _ = writeln!(out, "{name} {}", o.effective);
                }
                "sluice_replication_public_ttfb_p99_seconds" => {
                    let _ = writeln!(out, "{name} {}", o.signals.windows.ttfb.p99_secs());
                }
                "sluice_replication_public_latency_p99_seconds" => {
                    let _ = writeln!(out, "{name} {}", o.signals.windows.latency.p99_secs());
                }
                "sluice_replication_public_latency_samples_total" => {
                    let _ = writeln!(out, "{name} {}", self.limiter.latency_samples_total());
                }
                "sluice_replication_public_in_flight" => {
                    let _ = writeln!(out, "{name} {}", o.signals.in_flight);
                }
                "sluice_replication_cpu_pressure_ratio" => {
                    let v = o.signals.psi.map_or(0.0, |p| p.cpu_some);
                    let _ = writeln!(out, "{name} {v}");
                }
                "sluice_replication_io_pressure_ratio" => {
                    let v = o.signals.psi.map_or(0.0, |p| p.io_some);
                    let _ = writeln!(out, "{name} {v}");
                }
                "sluice_replication_limiter_seconds_total" => {
                    for (state, secs) in &o.state_secs {
                        let _ = writeln!(out, "{name}{{state=\"{}\"}} {secs}", state.label());
                    }
                }
                "sluice_replication_lag_writes"
                | "sluice_replication_lag_bytes"
                | "sluice_replication_lag_seconds" => {
                    let now = now_ms();
                    for (peer, lag) in &lags {
                        let v = match *name {
                            "sluice_replication_lag_writes" => lag.writes as f64,
                            "sluice_replication_lag_bytes" => lag.bytes as f64,
                            _ => lag.age_ms(now) as f64 / 1000.0,
                        };
                        let _ = writeln!(out, "{name}{{peer=\"{peer}\"}} {v}");
                    }
                }
                "sluice_replication_outbox_entries"
                | "sluice_replication_outbox_bytes"
                | "sluice_replication_outbox_oldest_age_seconds"
                | "sluice_replication_outbox_overflows_total" => {
                    // From the outbox's own peer list: right after a restart
                    // the backlog shows before the thread's first round.
                    for peer in self.outbox.peers() {
                        let b = self.outbox.backlog_at(&peer, acked_of(&peer));
                        let v = match *name {
                            "sluice_replication_outbox_entries" => b.entries as f64,
                            "sluice_replication_outbox_bytes" => b.bytes as f64,
                            "sluice_replication_outbox_overflows_total" => b.overflows_total as f64,
                            _ => b.oldest_age_ms as f64 / 1000.0,
                        };
                        let _ = writeln!(out, "{name}{{peer=\"{peer}\"}} {v}");
                    }
                }
                "sluice_peer_backoff_seconds" => {
                    for view in self.views_snapshot() {
                        let _ = writeln!(
                            out,
                            "{name}{{peer=\"{}\"}} {}",
                            view.peer,
                            view.backoff_ms as f64 / 1000.0
                        );
                    }
                }
                _ => {
                    for ((n, labels), v) in &snapshot {
                        if n != name {
                            continue;
                        }
                        if labels.is_empty() {
                            let _ = writeln!(out, "{name} {v}");
                        } else {
                            let _ = writeln!(out, "{name}{{{labels}}} {v}");
                        }
                    }
                }
            }
        }
    }

    /// What `peer` is not known to hold (see [`Lag`]): the outbox from
    /// the sender's position to the end, what the sender has in flight or
    /// waiting, what an overflow owes, and the anti-entropy repairs.
    pub fn lag(&self, peer: &str) -> Lag {
        let views = self.views_snapshot();
        self.lag_with(peer, views.iter().find(|v| v.peer == peer))
    }

    /// [`Replication::lag`] given the sender's last published view. The
    /// view is read before the outbox: an entry the sender takes in between
    /// is counted in both (for a moment), never in neither.
    fn lag_with(&self, peer: &str, view: Option<&PeerView>) -> Lag {
        let Some(mark) = self.outbox.mark(peer) else {
            return Lag::default();
        };
        let mut lag = Lag::default();
        if !mark.overflow {
            // Everything before the mark was taken; from the sender's
            // position on, nothing was sent yet.
            let from = view.map_or(mark.acked, |v| v.read_pos.max(mark.acked));
            lag.add(self.outbox.lag_from(from));
        }
        if let Some(v) = view {
            lag.add(v.pending);
        }
        // An overflow's count is a lower bound on what the comparison after
        // it lists; the repairs are what it listed (and what later runs did).
        let repairs = view.map_or(Lag::default(), |v| v.repairs);
        lag.add(mark.owed.at_least(repairs));
        lag
    }

    fn views_snapshot(&self) -> Vec<PeerView> {
        self.views
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The `/status` section.
    pub fn render_status(&self) -> serde_json::Value {
        let peers: Vec<serde_json::Value> = self
            .views_snapshot()
            .into_iter()
            .map(|v| {
                let b = self.outbox.backlog_at(&v.peer, v.acked);
                let lag = self.lag_with(&v.peer, Some(&v));
                serde_json::json!({
                    "peer": v.peer,
                    "state": v.state,
                    "backoff_ms": v.backoff_ms,
                    "failures": v.failures,
                    "in_flight": v.in_flight,
                    "last_error": v.last_error,
                    "lag": lag.to_json(now_ms()),
                    "repairs_queued": v.repairs_queued,
                    "backlog": {
                        "entries": b.entries,
                        "bytes": b.bytes,
                        "oldest_age_ms": b.oldest_age_ms,
                        "overflow": b.overflow,
                    },
                })
            })
            .collect();
        let o = self.limiter.observe(std::time::Instant::now());
        let states: serde_json::Map<String, serde_json::Value> = o
            .state_secs
            .iter()
            .map(|(s, secs)| (s.label().to_string(), serde_json::json!(secs)))
            .collect();
        serde_json::json!({
            "node_id": self.node_id,
            "store_full": self.store_full.load(Ordering::Acquire),
            "outbox_bytes_max": self.outbox.bytes_max(),
            "limiter": {
                "limit_bytes_per_second": self.limiter.limit,
                "burst_bytes": self.limiter.burst,
                "effective_bytes_per_second": o.effective,
                "state": o.state.map(|s| s.label()),
                "seconds_in_state": states,
                "public_latency_p99_seconds": o.signals.windows.latency.p99_secs(),
                "public_latency_samples": o.signals.windows.latency.samples,
                "public_ttfb_p99_seconds": o.signals.windows.ttfb.p99_secs(),
                "public_in_flight": o.signals.in_flight,
                "cpu_pressure_ratio": o.signals.psi.map(|p| p.cpu_some),
                "io_pressure_ratio": o.signals.psi.map(|p| p.io_some),
                "pressure_source": o.psi_scope,
                "pressure_read_failures": o.psi_failures,
            },
            "read_through": self.settings.read_through,
            "background": crate::background::status(),
            "peers": peers,
        })
    }
}

/// This node's id, made once and kept in `data_dir/.node-id`. A probe that
/// reaches a node with the same id reached this node (a DNS name listing
/// every node, this one included).
fn node_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join(".node-id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let id = text.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(now_ms().to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(data_dir.as_os_str().as_encoded_bytes());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    h.update(nanos.to_le_bytes());
    let id = hex::encode(&h.finalize()[..8]);
    std::fs::write(&path, format!("{id}\n"))?;
    Ok(id)
}

/// Every acknowledged client write and delete is recorded in the outbox
/// before its 2xx.
impl WriteListener for Replication {
    fn begin_put(self: Arc<Self>, ns: &str, key: &str) -> PutFollowUp {
        let (ns, key) = (ns.to_string(), key.to_string());
        PutFollowUp::OnCommit(Box::new(move |committed| {
            self.record_put(&ns, &key, committed.write_time_ms, committed.len)
                .err()
        }))
    }

    fn deleted(&self, ns: &str, key: &str, time_ms: u64) -> Result<(), Reply> {
        self.record_delete(ns, key, time_ms)
    }
}
