//! Wiring: store, application, front ends, signals and the shutdown phases.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{sockopt, AddressFamily, SocketType};

use crate::app::App;
use crate::config::Config;
use crate::fallback::{Fallback, FallbackLimits, TlsSettings};
use crate::front::AppHandler;
use crate::store::{Store, StoreConfig};

/// Why the server could not start or stop cleanly. The message names what
/// failed and with which value.
#[derive(Debug)]
pub struct ServeError(pub String);

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ServeError {}

/// Backlog of every listening socket. Connections the engine is not ready
/// to take wait here, in the kernel.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Bind a listening TCP socket with `SO_REUSEPORT`, so that every engine
/// thread (and a successor process during an upgrade) can own a socket on
/// the same port.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket(family, SocketType::STREAM, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    sockopt::set_socket_reuseport(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, LISTEN_BACKLOG)?;
    Ok(TcpListener::from(fd))
}

/// Run `sluice serve` until SIGTERM or SIGINT, then shut down in phases.
pub fn run(config: Config) -> Result<(), ServeError> {
    // First of all: a SIGTERM that arrives once the port is open must start
    // the shutdown phases, not kill the process with the default action.
    let signals = ShutdownSignals::install()?;
    let store = Store::open(StoreConfig {
        data_dir: config.data_dir.clone(),
        store_bytes_max: config.store_bytes_max,
        fsync: match config.fsync {
            crate::config::FsyncPolicy::Always => crate::store::FsyncPolicy::Always,
            crate::config::FsyncPolicy::Never => crate::store::FsyncPolicy::Never,
        },
    })
    .map_err(|e| {
        ServeError(format!(
            "cannot open the data directory {}: {e}",
            config.data_dir.display()
        ))
    })?;
    let app = App::new(&config, store);

    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            Some(TlsSettings::load(cert, key).map_err(|e| ServeError(e.to_string()))?)
        }
        _ => None,
    };
    let fallback = Arc::new(
        Fallback::start(
            Arc::new(
                AppHandler::new(Arc::clone(&app))
                    .with_body_read_timeout(Duration::from_millis(config.body_read_timeout_ms))
                    .with_uri_bytes_max(config.uri_bytes_max),
            ),
            tls.clone(),
            FallbackLimits {
                connections_max: config.fallback_connections_max,
                connections_per_ip_max: config.connections_per_ip_max,
                header_read_timeout_ms: config.header_read_timeout_ms,
                idle_timeout_ms: config.idle_timeout_ms,
                send_timeout_ms: config.send_timeout_ms,
                uri_bytes_max: config.uri_bytes_max,
                head_bytes_max: config.head_bytes_max,
                worker_threads: config.fallback_threads_effective(),
            },
        )
        .map_err(|e| ServeError(format!("cannot start the fallback front end: {e}")))?,
    );
    {
        let fallback = Arc::clone(&fallback);
        app.add_metrics_source(move |out| render_fallback_metrics(&fallback, out));
    }

    let listener = bind_reuseport(config.listen).map_err(|e| {
        ServeError(format!(
            "cannot listen on {} (config key `listen`): {e}",
            config.listen
        ))
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| ServeError(format!("cannot read the bound address: {e}")))?;
    // Before anything is served: no acknowledged write may miss the outbox.
    let replication = crate::replication::attach(&config, local, &app)
        .map_err(|e| ServeError(format!("cannot open the replication outbox: {e}")))?;
    let engine = crate::engine::start(&config, &app, &fallback, listener)
        .map_err(|e| ServeError(format!("cannot start the engine: {e}")))?;
    let replication = match replication {
        Some(replication) => {
            // Rings when they run; otherwise replication brings its own
            // blocking sender threads (engine = fallback).
            let transport = match engine.task_submitter() {
                Some(submitter) => crate::replication::transport::Transport::Ring {
                    submitter,
                    splice: sluice_uring::probe().supports("splice"),
                },
                None => crate::replication::transport::Transport::blocking().map_err(|e| {
                    ServeError(format!("cannot start the replication senders: {e}"))
                })?,
            };
            Some(
                crate::replication::driver::start(replication, app.store.clone(), transport)
                    .map_err(|e| ServeError(format!("cannot start replication: {e}")))?,
            )
        }
        None => None,
    };
    let scheme = if tls.is_some() {
        "http and https"
    } else {
        "http"
    };
    tracing::info!(%local, engine = %engine.describe(), "sluice listening ({scheme})");
    // Tests and scripts wait for this line to learn the bound port.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "sluice listening on {local}");
    let _ = stdout.flush();

    signals.wait();
    tracing::info!("shutdown requested: readiness now answers 503");
    app.set_draining();
    std::thread::sleep(Duration::from_millis(config.shutdown_pre_drain_ms));
    let drain = Duration::from_millis(config.shutdown_drain_ms);
    tracing::info!(
        drain_ms = config.shutdown_drain_ms,
        "stopped accepting; draining in-flight requests"
    );
    engine.shutdown(drain);
    fallback.shutdown(drain);
    if let Some(replication) = replication {
        // What is still queued stays in the outbox for the next start.
        replication.shutdown();
    }
    app.store.shutdown();
    tracing::info!("shutdown complete");
    Ok(())
}

fn render_fallback_metrics(fallback: &Fallback, out: &mut String) {
    use crate::metrics::write_metric;
    let stats = fallback.stats();
    write_metric(
        out,
        "sluice_fallback_connections",
        "gauge",
        "Connections the fallback serves now.",
        stats.connections,
    );
    write_metric(
        out,
        "sluice_fallback_accepted_tls_h2_total",
        "counter",
        "TLS connections that negotiated h2.",
        stats.accepted_tls_h2_total,
    );
    write_metric(
        out,
        "sluice_fallback_accepted_tls_http1_total",
        "counter",
        "TLS connections that speak HTTP/1.1.",
        stats.accepted_tls_http1_total,
    );
    write_metric(
        out,
        "sluice_fallback_accepted_h2c_total",
        "counter",
        "Plaintext HTTP/2 (prior knowledge) connections.",
        stats.accepted_h2c_total,
    );
    write_metric(
        out,
        "sluice_fallback_accepted_http1_total",
        "counter",
        "Plaintext HTTP/1.1 connections served by the fallback.",
        stats.accepted_http1_total,
    );
    write_metric(
        out,
        "sluice_fallback_handoff_refused_total",
        "counter",
        "Connections the fallback refused at capacity.",
        stats.handoff_refused_total,
    );
    write_metric(
        out,
        "sluice_fallback_rejected_total",
        "counter",
        "Connections closed before serving (e.g. TLS without a certificate).",
        stats.rejected_total,
    );
    let shed: [(&str, &str, u64); 7] = [
        (
            "sluice_fallback_shed_idle_total",
            "Idle connections closed to admit a new one at fallback_connections_max.",
            stats.shed_idle_total,
        ),
        (
            "sluice_fallback_refused_full_total",
            "Connections refused at fallback_connections_max with nothing idle (HTTP/1 got 503).",
            stats.refused_full_total,
        ),
        (
            "sluice_fallback_refused_per_ip_total",
            "Connections refused at connections_per_ip_max (HTTP/1 got 503).",
            stats.refused_per_ip_total,
        ),
        (
            "sluice_fallback_send_timeout_total",
            "Connections closed because the client did not read for send_timeout_ms.",
            stats.send_timeout_total,
        ),
        (
            "sluice_fallback_head_timeout_total",
            "HTTP/1 heads not complete within header_read_timeout_ms (408).",
            stats.head_timeout_total,
        ),
        (
            "sluice_fallback_uri_too_long_total",
            "HTTP/1 request targets over uri_bytes_max refused before parsing (414).",
            stats.uri_too_long_total,
        ),
        (
            "sluice_fallback_h2_reset_flood_total",
            "HTTP/2 connections sent GOAWAY ENHANCE_YOUR_CALM for resetting streams too often.",
            stats.h2_reset_flood_total,
        ),
    ];
    for (name, help, value) in shed {
        write_metric(out, name, "counter", help, value);
    }
}

/// SIGTERM and SIGINT handlers, installed before anything listens. They
/// used to be installed only after "sluice listening" was printed, so a
/// SIGTERM in between (an orchestrator stopping a fresh instance, or a test
/// under load) killed the process outright: connections refused, no drain.
/// A signal delivered before [`ShutdownSignals::wait`] is kept, not lost.
struct ShutdownSignals {
    runtime: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> Result<ShutdownSignals, ServeError> {
        use tokio::signal::unix::{signal, SignalKind};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ServeError(format!("cannot start the signal runtime: {e}")))?;
        let (term, int) = {
            let _context = runtime.enter();
            let term = signal(SignalKind::terminate())
                .map_err(|e| ServeError(format!("cannot install the SIGTERM handler: {e}")))?;
            let int = signal(SignalKind::interrupt())
                .map_err(|e| ServeError(format!("cannot install the SIGINT handler: {e}")))?;
            (term, int)
        };
        Ok(ShutdownSignals { runtime, term, int })
    }

    /// Blocks until SIGTERM or SIGINT (or one that came earlier).
    fn wait(mut self) {
        let (term, int) = (&mut self.term, &mut self.int);
        self.runtime.block_on(async {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
    }
}
