//! The public front door: io_uring engine threads when the host allows them,
//! otherwise the portable fallback path.
//!
//! `engine = "auto"` (the default) probes io_uring and starts one ring per
//! engine thread; if the kernel refuses (`kernel.io_uring_disabled`,
//! seccomp, an old kernel) every connection goes to the hyper fallback, and
//! the reason is logged once and shown in `/status`. `engine = "uring"`
//! refuses to start instead; `engine = "fallback"` never tries.

pub mod conn;
pub mod ring;
pub mod task;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use crate::app::App;
use crate::config::{Config, EngineChoice, FileServingMode as ConfigMode};
use crate::fallback::Fallback;
use crate::server::bind_reuseport;
use conn::ConnLimits;
use ring::{EngineSettings, FileServingMode, RingEngine};

/// Pipes per engine thread: the bound on splices in flight per core.
pub const PIPES_PER_CORE_MAX: usize = 64;
/// Size of each splice pipe, in bytes (clamped to `pipe-max-size`).
pub const PIPE_BYTES: usize = 1024 * 1024;

/// Handle on whatever accepts public connections.
pub struct Engine {
    description: String,
    ring: Option<RingEngine>,
}

impl Engine {
    /// One line for the log and `/status`: which path serves plaintext and why.
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// Run an outgoing request on a ring (replication's building block).
    /// Without rings (fallback engine) the request comes back.
    pub fn submit_task(&self, request: task::OutgoingRequest) -> Result<(), task::OutgoingRequest> {
        match &self.ring {
            Some(ring) => ring.submit_task(request),
            None => Err(request),
        }
    }

    /// Stop accepting and drain in-flight requests within `drain`.
    pub fn shutdown(self, drain: Duration) {
        if let Some(ring) = self.ring {
            ring.shutdown(drain);
        }
    }
}

/// Start serving `listener` (and, for ring threads after the first, more
/// `SO_REUSEPORT` listeners on the same address).
pub fn start(
    config: &Config,
    app: &Arc<App>,
    fallback: &Arc<Fallback>,
    listener: TcpListener,
) -> std::io::Result<Engine> {
    let probe = sluice_uring::probe();
    let why_not = match config.engine {
        EngineChoice::Fallback => Some("engine = \"fallback\" in the config".to_string()),
        _ => probe
            .unavailable
            .as_ref()
            .map(|u| format!("io_uring is unavailable on this host: {}", u.reason)),
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
        None => start_ring(config, app, fallback, &listener),
    };
    let (description, ring) = match ring {
        Ok(ring) => {
            let threads = config.engine_threads_effective();
            let mut d = format!(
                "io_uring: {threads} ring thread(s), {:?} file serving",
                config.file_serving_mode
            );
            if let Some(note) = &ring.fixed_buffers_note {
                tracing::warn!("{note}; copy mode reads into unregistered buffers");
                d.push_str("; ");
                d.push_str(note);
            }
            // The ring threads own their own listeners; this one (the
            // first) was cloned into them.
            drop(listener);
            (d, Some(ring))
        }
        Err(reason) => {
            if config.engine == EngineChoice::Uring {
                return Err(std::io::Error::other(reason));
            }
            tracing::warn!("serving every connection through the fallback: {reason}");
            fallback.serve_listener(listener)?;
            (
                format!("fallback (hyper) serves every connection: {reason}"),
                None,
            )
        }
    };
    {
        let status = description.clone();
        let uring = ring.is_some();
        app.add_status_source(move || {
            (
                "engine".to_string(),
                serde_json::json!({ "io_uring": uring, "mode": status }),
            )
        });
    }
    if let Some(ring) = &ring {
        let stats = Arc::clone(&ring.stats);
        app.add_metrics_source(move |out| RingEngine::render_metrics(&stats, out));
    }
    Ok(Engine { description, ring })
}

fn start_ring(
    config: &Config,
    app: &Arc<App>,
    fallback: &Arc<Fallback>,
    listener: &TcpListener,
) -> Result<RingEngine, String> {
    let threads = config.engine_threads_effective().max(1);
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listener's address: {e}"))?;
    let mut listeners = Vec::with_capacity(threads);
    listeners.push(
        listener
            .try_clone()
            .map_err(|e| format!("cannot share the listener: {e}"))?,
    );
    for _ in 1..threads {
        listeners.push(
            bind_reuseport(addr)
                .map_err(|e| format!("cannot bind another listener on {addr}: {e}"))?,
        );
    }
    let settings = EngineSettings {
        threads,
        connections_per_core_max: config.connections_per_core_max,
        conn_limits: ConnLimits {
            head: crate::http1::Limits {
                head_bytes_max: config.head_bytes_max,
                uri_bytes_max: config.uri_bytes_max,
                ..crate::http1::Limits::default()
            },
            header_read_timeout_ms: config.header_read_timeout_ms,
            idle_timeout_ms: config.idle_timeout_ms,
        },
        mode: match config.file_serving_mode {
            ConfigMode::Splice => FileServingMode::Splice,
            ConfigMode::Copy => FileServingMode::Copy,
        },
        pipes_per_core_max: PIPES_PER_CORE_MAX,
        pipe_bytes: PIPE_BYTES,
    };
    RingEngine::start(settings, listeners, app, fallback)
        .map_err(|e| format!("cannot set up a ring: {e}"))
}
