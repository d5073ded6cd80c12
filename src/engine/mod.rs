//! The public front door: io_uring engine threads when the host allows them,
//! otherwise the portable fallback path.
//!
//! `engine = "auto"` (the default) probes io_uring and starts one ring per
//! engine thread; if the kernel refuses (`kernel.io_uring_disabled`,
//! seccomp, an old kernel) the same HTTP/1 core runs on epoll threads
//! instead ([`epoll`]: non-blocking sockets, sendfile bodies), and the
//! reason is logged once and shown in `/status`. TLS and HTTP/2 go to the
//! hyper fallback either way. `engine = "uring"` refuses to start without
//! io_uring; `engine = "epoll"` never tries it; `engine = "fallback"` serves
//! every connection through hyper.

pub mod conn;
pub mod epoll;
pub mod offload;
pub mod opener;
pub mod publish;
pub mod receive;
pub mod ring;
pub mod threads;

use std::net::TcpListener;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use crate::app::App;
use crate::config::{Config, EngineChoice, FileServingMode as ConfigMode};
use crate::fallback::Fallback;
use crate::outgoing::{OutgoingRequest, Submit};
use conn::ConnLimits;
use epoll::{EpollEngine, EpollSettings};
use ring::{EngineSettings, FileServingMode, RingEngine};

/// Pipes per engine thread: the bound on splices in flight per core.
pub const PIPES_PER_CORE_MAX: usize = 64;
/// Size of each splice pipe, in bytes (clamped to `pipe-max-size`).
pub const PIPE_BYTES: usize = 1024 * 1024;

/// Handle on whatever accepts public connections.
pub struct Engine {
    description: String,
    ring: Option<RingEngine>,
    epoll: Option<EpollEngine>,
}

impl Engine {
    /// One line for the log and `/status`: which path serves plaintext and why.
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// Run an outgoing request on a ring (replication's building block).
    /// Without rings (fallback engine) the request comes back.
    pub fn submit_task(&self, request: OutgoingRequest) -> Result<(), OutgoingRequest> {
        match &self.ring {
            Some(ring) => ring.submit_task(request),
            None => Err(request),
        }
    }

    /// A handle for submitting tasks from another thread, when rings run.
    pub fn task_submitter(&self) -> Option<Arc<dyn Submit>> {
        self.ring
            .as_ref()
            .map(|ring| Arc::new(ring.submitter()) as Arc<dyn Submit>)
    }

    /// A handle that ends a drain in progress at once (a second SIGTERM).
    pub fn drain_cutter(&self) -> Option<threads::DrainCutter> {
        match (&self.ring, &self.epoll) {
            (Some(ring), _) => Some(ring.drain_cutter()),
            (None, Some(epoll)) => Some(epoll.drain_cutter()),
            (None, None) => None,
        }
    }

    /// Stop accepting and drain in-flight requests within `drain`; then give
    /// outgoing tasks in flight `tasks` to finish (shutdown phase 3).
    pub fn shutdown(self, drain: Duration, tasks: Duration) {
        if let Some(ring) = self.ring {
            ring.shutdown(drain, tasks);
        }
        if let Some(epoll) = self.epoll {
            epoll.shutdown(drain);
        }
    }
}

/// Opcodes every engine thread submits; `read_fixed` only in copy mode.
const ENGINE_OPS: &[&str] = &[
    "accept",
    "recv",
    "send",
    "poll_add",
    "async_cancel",
    "connect",
];

/// Multishot accept (a flag, so the opcode probe cannot see it) came with
/// Linux 5.19.
const MULTISHOT_ACCEPT_KERNEL: (u32, u32) = (5, 19);

/// Why a ring that can be set up still cannot run the engine, or `None`.
/// Without this a kernel lacking multishot accept would fail every accept
/// instead of falling back with a reason.
pub fn missing_support(probe: &sluice_uring::ProbeReport, mode: ConfigMode) -> Option<String> {
    let mut missing: Vec<&str> = ENGINE_OPS
        .iter()
        .copied()
        .filter(|op| !probe.supports(op))
        .collect();
    if mode == ConfigMode::Copy && !probe.supports("read_fixed") {
        missing.push("read_fixed");
    }
    if !missing.is_empty() {
        return Some(format!(
            "the kernel's io_uring lacks {} (kernel {})",
            missing.join(", "),
            probe.kernel_release
        ));
    }
    match kernel_version(&probe.kernel_release) {
        Some(v) if v < MULTISHOT_ACCEPT_KERNEL => Some(format!(
            "kernel {} predates multishot accept ({}.{})",
            probe.kernel_release, MULTISHOT_ACCEPT_KERNEL.0, MULTISHOT_ACCEPT_KERNEL.1
        )),
        _ => None,
    }
}

/// Why `serve` cannot run rings on this host in this mode, or `None`: io_uring
/// unavailable, or a ring without what the engine needs. `sluice doctor`
/// asks the same question.
pub fn ring_refusal(probe: &sluice_uring::ProbeReport, mode: ConfigMode) -> Option<String> {
    probe
        .unavailable
        .as_ref()
        .map(|u| format!("io_uring is unavailable on this host: {}", u.reason))
        .or_else(|| missing_support(probe, mode))
}

/// `(major, minor)` of a `uname -r` string such as `6.18.44-fc-v782`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Start serving `listeners`: one ring thread per listener (each an `SO_REUSEPORT` socket
/// on the same address, bound here or handed over by an old process), or all of them
/// through the fallback. Every listener gets an acceptor: a handed-over socket without one
/// would strand the connections queued on it.
pub fn start(
    config: &Config,
    app: &Arc<App>,
    fallback: &Arc<Fallback>,
    listeners: Vec<TcpListener>,
) -> std::io::Result<Engine> {
    let probe = sluice_uring::probe();
    let why_not = match config.engine {
        EngineChoice::Fallback => Some("engine = \"fallback\" in the config".to_string()),
        EngineChoice::Epoll => Some("engine = \"epoll\" in the config".to_string()),
        _ => ring_refusal(&probe, config.file_serving_mode),
    };
    let ring = match why_not {
        Some(reason) => {
            if config.engine == EngineChoice::Uring {
                return Err(std::io::Error::other(format!(
                    "engine = \"uring\" but {reason}"
                )));
            }
            Err(reason)
        }
        None => start_ring(config, app, fallback, &listeners),
    };
    let (description, ring, epoll) = match ring {
        Ok(ring) => {
            let threads = listeners.len();
            let mut d = format!(
                "io_uring: {threads} ring thread(s), {:?} file serving",
                config.file_serving_mode
            );
            if let Some(note) = &ring.fixed_buffers_note {
                tracing::warn!("{note}; copy mode reads into unregistered buffers");
                d.push_str("; ");
                d.push_str(note);
            }
            // The ring threads own clones of these.
            drop(listeners);
            let stats = Arc::clone(&ring.stats);
            app.add_metrics_source(move |out| RingEngine::render_metrics(&stats, out));
            (d, Some(ring), None)
        }
        Err(reason) => {
            let (d, epoll) = start_without_ring(config, app, fallback, listeners, reason)?;
            (d, None, epoll)
        }
    };
    add_status_source(app, &description, ring.as_ref(), epoll.as_ref());
    Ok(Engine {
        description,
        ring,
        epoll,
    })
}

/// Serve plaintext HTTP/1 on epoll threads, or (`engine = "fallback"`) every connection
/// through the fallback, because rings do not run (`reason`). Returns what `/status` says.
fn start_without_ring(
    config: &Config,
    app: &Arc<App>,
    fallback: &Arc<Fallback>,
    listeners: Vec<TcpListener>,
    reason: String,
) -> std::io::Result<(String, Option<EpollEngine>)> {
    if config.engine == EngineChoice::Uring {
        return Err(std::io::Error::other(reason));
    }
    if config.engine == EngineChoice::Fallback {
        tracing::info!("serving every connection through the fallback: {reason}");
        for listener in listeners {
            fallback.serve_listener(listener)?;
        }
        return Ok((
            format!("fallback (hyper) serves every connection: {reason}"),
            None,
        ));
    }
    let threads = listeners.len();
    let started = EpollEngine::start(epoll_settings(config), listeners, app, fallback)?;
    if config.engine == EngineChoice::Auto {
        tracing::warn!("io_uring unavailable, serving plaintext HTTP/1 on epoll threads: {reason}");
    }
    let stats = Arc::clone(&started.stats);
    app.add_metrics_source(move |out| EpollEngine::render_metrics(&stats, out));
    Ok((
        format!(
            "epoll: {threads} thread(s), sendfile file serving (TLS and HTTP/2 on the fallback): {reason}"
        ),
        Some(started),
    ))
}

/// `/status`'s `engine` entry: which path serves plaintext, and the cold path's counters
/// of the engine that runs.
fn add_status_source(
    app: &App,
    description: &str,
    ring: Option<&RingEngine>,
    epoll: Option<&EpollEngine>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let status = description.to_string();
    let uring = ring.is_some();
    let stats = ring.map(|r| Arc::clone(&r.stats));
    let epoll_stats = epoll.map(|e| Arc::clone(&e.stats));
    let residency_known = sluice_uring::residency::supported();
    app.add_status_source(move || {
        let mut engine = serde_json::json!({ "io_uring": uring, "mode": status });
        if let Some(stats) = &stats {
            let mut cold = cold_status(stats, residency_known, |s| {
                [
                    &s.cold_opens_total,
                    &s.cold_reads_total,
                    &s.cold_read_bytes_total,
                ]
            });
            let wait_us: u64 = stats
                .iter()
                .map(|s| s.cold_wait_us_total.load(Relaxed))
                .sum();
            cold["wait_seconds_total"] = serde_json::json!(wait_us as f64 / 1e6);
            cold["iowq_workers_max_per_ring"] = serde_json::json!(stats
                .first()
                .map_or(0, |s| s.iowq_workers_max.load(Relaxed)));
            engine["cold"] = cold;
        }
        if let Some(stats) = &epoll_stats {
            engine["cold"] = cold_status(stats, residency_known, |s| {
                [
                    &s.cold_opens_total,
                    &s.cold_reads_total,
                    &s.cold_read_bytes_total,
                ]
            });
        }
        ("engine".to_string(), engine)
    });
}

/// The cold-path counters both engines keep (`counters`: opens, reads, read bytes), summed
/// over the cores, as `/status` shows them.
fn cold_status<S>(
    stats: &[S],
    residency_known: bool,
    counters: fn(&S) -> [&AtomicU64; 3],
) -> serde_json::Value {
    let mut totals = [0u64; 3];
    for s in stats {
        for (total, counter) in totals.iter_mut().zip(counters(s)) {
            *total += counter.load(std::sync::atomic::Ordering::Relaxed);
        }
    }
    serde_json::json!({
        "page_cache_residency_known": residency_known,
        "opens_total": totals[0],
        "reads_total": totals[1],
        "read_bytes_total": totals[2],
    })
}

fn conn_limits(config: &Config) -> ConnLimits {
    ConnLimits {
        head: crate::http1::Limits {
            head_bytes_max: config.head_bytes_max,
            uri_bytes_max: config.uri_bytes_max,
            ..crate::http1::Limits::default()
        },
        timeouts: config.conn_timeouts(),
        linger: config.linger_limits(),
    }
}

fn epoll_settings(config: &Config) -> EpollSettings {
    EpollSettings {
        connections_per_core_max: config.connections_per_core_max,
        connections_per_ip_max: config.connections_per_ip_max,
        conn_limits: conn_limits(config),
        latency_sample: Duration::from_micros(config.public_latency_sample_us),
    }
}

fn start_ring(
    config: &Config,
    app: &Arc<App>,
    fallback: &Arc<Fallback>,
    listeners: &[TcpListener],
) -> Result<RingEngine, String> {
    let threads = listeners.len().max(1);
    let listeners = listeners
        .iter()
        .map(TcpListener::try_clone)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot share the listener: {e}"))?;
    let settings = EngineSettings {
        threads,
        connections_per_core_max: config.connections_per_core_max,
        conn_limits: conn_limits(config),
        connections_per_ip_max: config.connections_per_ip_max,
        mode: match config.file_serving_mode {
            ConfigMode::Splice => FileServingMode::Splice,
            ConfigMode::Copy => FileServingMode::Copy,
        },
        pipes_per_core_max: PIPES_PER_CORE_MAX,
        pipe_bytes: PIPE_BYTES,
        spin: Duration::from_micros(config.engine_spin_us),
        latency_sample: Duration::from_micros(config.public_latency_sample_us),
    };
    RingEngine::start(settings, listeners, app, fallback)
        // The probe's ring is small; the engine's can still be refused (a
        // memlock limit between the two): explain it as the probe would.
        .map_err(|e| match e.raw_os_error() {
            Some(errno) => format!(
                "cannot set up a ring: {}",
                sluice_uring::unavailable_reason(sluice_uring::Errno(errno), None)
            ),
            None => format!("cannot set up a ring: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_uring::{OpSupport, ProbeReport, OPS_OF_INTEREST};

    fn report(kernel: &str, unsupported: &[&str]) -> ProbeReport {
        ProbeReport {
            kernel_release: kernel.to_string(),
            unavailable: None,
            io_uring_disabled_sysctl: None,
            ops: OPS_OF_INTEREST
                .iter()
                .map(|&(name, code)| OpSupport {
                    name,
                    code,
                    supported: !unsupported.contains(&name),
                })
                .collect(),
            setup_single_issuer: true,
            setup_coop_taskrun: true,
            setup_defer_taskrun: true,
            setup_submit_all: true,
            buf_ring: true,
            memlock_bytes_soft: None,
            memlock_exempt: true,
            pipe_max_size_bytes: None,
        }
    }

    #[test]
    fn engine_needs_its_ops_and_multishot_accept() {
        let cases: &[(&str, &[&str], ConfigMode, Option<&str>)] = &[
            ("6.18.44-fc-v782", &[], ConfigMode::Splice, None),
            ("5.19.0", &[], ConfigMode::Copy, None),
            (
                "6.1.0-13-amd64",
                &["splice", "msg_ring"],
                ConfigMode::Splice,
                None,
            ),
            ("6.1.0", &["read_fixed"], ConfigMode::Splice, None),
            (
                "6.1.0",
                &["read_fixed"],
                ConfigMode::Copy,
                Some("lacks read_fixed"),
            ),
            (
                "6.1.0",
                &["poll_add", "connect"],
                ConfigMode::Splice,
                Some("lacks poll_add, connect"),
            ),
            (
                "5.15.0-91-generic",
                &[],
                ConfigMode::Splice,
                Some("predates multishot accept"),
            ),
            (
                "4.19.0",
                &["accept"],
                ConfigMode::Splice,
                Some("lacks accept"),
            ),
            // An unparsable release is not a reason to refuse: the ops decide.
            ("weird", &[], ConfigMode::Splice, None),
        ];
        for &(kernel, unsupported, mode, want) in cases {
            let got = missing_support(&report(kernel, unsupported), mode);
            match (want, &got) {
                (None, None) => {}
                (Some(w), Some(g)) if g.contains(w) && g.contains(kernel) => {}
                _ => panic!("{kernel} {unsupported:?} {mode:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
