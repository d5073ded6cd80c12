//! Wiring: store, application, front ends, signals and the shutdown phases.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{sockopt, AddressFamily, SocketType};

use crate::app::App;
use crate::config::Config;
use crate::fallback::app_handler::AppHandler;
use crate::fallback::{Fallback, FallbackLimits, TlsSettings};
use crate::lifecycle::{self, Launch};
use crate::reapi::{Reapi, Settings as ReapiSettings};
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

/// Ask the kernel to stamp received packets on the listeners (accepted sockets inherit it),
/// so the fronts can measure public latency from the arrival of a request's first bytes
/// (`public_latency_sample_us`; docs/replication.md says what it costs). A refusal only
/// leaves the limiter with the parse-to-reply time, and is said once.
fn stamp_arrivals(config: &Config, listeners: &[TcpListener]) {
    if config.public_latency_sample_us == 0 {
        return;
    }
    for l in listeners {
        if let Err(errno) = sluice_uring::enable_rx_timestamps(std::os::fd::AsFd::as_fd(l)) {
            tracing::warn!(errno = errno.0, "cannot turn on receive timestamps; public latency is measured from the parsed head only");
            return;
        }
    }
}

/// Bind `threads` `SO_REUSEPORT` listeners on `addr`, one per engine thread. With port 0
/// the first bind picks the port and the others join it.
fn bind_listeners(addr: SocketAddr, threads: usize) -> Result<Vec<TcpListener>, ServeError> {
    let refused = |e: std::io::Error| {
        ServeError(format!(
            "cannot listen on {addr} (config key `listen`): {e}"
        ))
    };
    let first = bind_reuseport(addr).map_err(refused)?;
    let bound = first
        .local_addr()
        .map_err(|e| ServeError(format!("cannot read the bound address: {e}")))?;
    let mut listeners = vec![first];
    for _ in 1..threads.max(1) {
        listeners.push(bind_reuseport(bound).map_err(refused)?);
    }
    Ok(listeners)
}

/// Why the serving loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// SIGTERM or SIGINT: all four shutdown phases.
    Stop,
    /// A successor serves on the same listeners: no pre-drain (readiness of this process no
    /// longer matters, the listeners stay open in the successor), straight to the drain.
    Upgraded,
}

/// Run `sluice serve` until SIGTERM or SIGINT, then shut down in phases. Without a
/// [`Launch`], SIGUSR2 upgrades are refused (logged).
pub fn run(config: Config) -> Result<(), ServeError> {
    run_with(
        config,
        &Launch {
            exe: None,
            args: Vec::new(),
        },
        &[],
    )
}

/// [`run`], with how the process was started (for SIGUSR2 upgrades) and its environment
/// (for `SLUICE_UPGRADE_FD`, `LISTEN_FDS` and `NOTIFY_SOCKET`).
pub fn run_with(
    config: Config,
    launch: &Launch,
    env: &[(String, String)],
) -> Result<(), ServeError> {
    // First of all: a SIGTERM that arrives once the port is open must start
    // the shutdown phases, not kill the process with the default action.
    let mut signals = Signals::install()?;
    // Before anything else can fail: an old process waits on the other end.
    let inherited = lifecycle::inherited(env).map_err(ServeError)?;
    let app = open_app(&config)?;

    let (tls, fallback) = start_fallback(&config, &app)?;

    let (listeners, local, parent) = take_listeners(&config, inherited)?;
    crate::background::configure(&config);
    stamp_arrivals(&config, &listeners);
    // Copies of the listening sockets for a successor: the same sockets (and so the same
    // accept queues), not new binds.
    let handoff: Vec<OwnedFd> = listeners
        .iter()
        .map(|l| l.try_clone().map(OwnedFd::from))
        .collect::<Result<_, _>>()
        .map_err(|e| ServeError(format!("cannot keep the listeners for upgrades: {e}")))?;
    // Before anything is served: no acknowledged write may miss the outbox.
    let replication = attach_fleet(&config, local, &app)?;
    let engine = crate::engine::start(&config, &app, &fallback, listeners)
        .map_err(|e| ServeError(format!("cannot start the engine: {e}")))?;
    let replication = start_replication(replication, &engine, &app)?;
    let scheme = if tls { "http and https" } else { "http" };
    tracing::info!(%local, engine = %engine.describe(), "sluice listening ({scheme})");
    // Tests and scripts wait for this line to learn the bound port.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "sluice listening on {local}");
    let _ = stdout.flush();

    announce_ready(&config, env, parent);
    // Freed heap goes back to the kernel every few seconds (glibc keeps it per arena).
    crate::heap::start();
    let upgrade_timeout = Duration::from_millis(config.upgrade_ready_timeout_ms);

    let exit = loop {
        match signals.next() {
            Signal::Stop => break Exit::Stop,
            Signal::Upgrade => {
                let fds: Vec<_> = handoff.iter().map(|fd| fd.as_fd()).collect();
                tracing::info!(
                    exe = ?launch.exe,
                    listeners = fds.len(),
                    timeout_ms = config.upgrade_ready_timeout_ms,
                    "SIGUSR2: starting the new binary on this process's listeners"
                );
                match lifecycle::upgrade(launch, &fds, upgrade_timeout) {
                    Ok(successor) => {
                        tracing::info!(
                            pid = successor.pid,
                            "the new process serves; this one drains and exits"
                        );
                        break Exit::Upgraded;
                    }
                    Err(why) => {
                        tracing::warn!("upgrade abandoned, this process keeps serving: {why}")
                    }
                }
            }
        }
    };
    shutdown(
        &config,
        env,
        exit,
        &mut signals,
        &app,
        engine,
        &fallback,
        replication,
    );
    drop(handoff);
    Ok(())
}

/// Open the store (a bad data directory is a start-up error naming it) and
/// the application over it.
fn open_app(config: &Config) -> Result<Arc<App>, ServeError> {
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
    store.set_hot_set_bytes(config.hot_set_bytes);
    Ok(App::new(config, store))
}

/// Load the TLS certificate and key (when given) and start the fallback
/// front end over `app`.
fn start_fallback(config: &Config, app: &Arc<App>) -> Result<(bool, Arc<Fallback>), ServeError> {
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            Some(TlsSettings::load(cert, key).map_err(|e| ServeError(e.to_string()))?)
        }
        _ => None,
    };
    let fallback = Arc::new(
        Fallback::start(
            Arc::new(
                AppHandler::new(Arc::clone(app))
                    .with_body_read_timeout(Duration::from_millis(config.body_read_timeout_ms))
                    .with_uri_bytes_max(config.uri_bytes_max)
                    .with_grpc(reapi_front(config, app)),
            ),
            tls.clone(),
            FallbackLimits {
                connections_max: config.fallback_connections_max,
                connections_per_ip_max: config.connections_per_ip_max,
                timeouts: config.conn_timeouts(),
                uri_bytes_max: config.uri_bytes_max,
                head_bytes_max: config.head_bytes_max,
                worker_threads: config.fallback_threads_effective(),
                latency_sample: Duration::from_micros(config.public_latency_sample_us),
            },
        )
        .map_err(|e| ServeError(format!("cannot start the fallback front end: {e}")))?,
    );
    {
        let fallback = Arc::clone(&fallback);
        app.add_metrics_source(move |out| render_fallback_metrics(&fallback, out));
    }
    Ok((tls.is_some(), fallback))
}

/// The REAPI gRPC services, served by the fallback on its HTTP/2 connections.
fn reapi_front(config: &Config, app: &Arc<App>) -> crate::fallback::app_handler::Grpc {
    let reapi = Reapi::new(Arc::clone(app), ReapiSettings::from_config(config));
    crate::fallback::app_handler::Grpc {
        accepts: Reapi::accepts,
        serve: Box::new(move |req| {
            let reapi = Arc::clone(&reapi);
            Box::pin(async move { reapi.serve(req).await })
        }),
    }
}

/// The listening sockets: inherited (an upgrade, systemd) or bound to
/// `listen`, one per engine thread; the address they serve; and the parent
/// process, when this one is an upgrade's successor.
fn take_listeners(
    config: &Config,
    inherited: Option<lifecycle::Inherited>,
) -> Result<
    (
        Vec<std::net::TcpListener>,
        std::net::SocketAddr,
        Option<lifecycle::Parent>,
    ),
    ServeError,
> {
    let (listeners, parent) = match inherited {
        Some(inherited) => {
            tracing::info!(
                listeners = inherited.listeners.len(),
                from = if inherited.parent.is_some() {
                    "an upgrade"
                } else {
                    "systemd"
                },
                "serving on inherited listeners, not binding `listen`"
            );
            let mut listeners = inherited.listeners;
            // systemd passes one socket per ListenStream=; every engine thread still gets
            // an acceptor, on a copy of one of them (same socket, same queue).
            let threads = config.engine_threads_effective().max(1);
            let given = listeners.len();
            for i in 0..threads.saturating_sub(given) {
                let copy = listeners[i % given]
                    .try_clone()
                    .map_err(|e| ServeError(format!("cannot share an inherited listener: {e}")))?;
                listeners.push(copy);
            }
            (listeners, inherited.parent)
        }
        None => (
            bind_listeners(config.listen, config.engine_threads_effective())?,
            None,
        ),
    };
    let local = listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .ok_or_else(|| ServeError("cannot read the bound address".to_string()))?;
    if config.listen.port() != 0 && local != config.listen {
        tracing::warn!(
            %local,
            listen = %config.listen,
            "the inherited listeners are not on `listen`; they are served as they are"
        );
    }
    Ok((listeners, local, parent))
}

/// Start what replication runs once the engine is up: its transport (the
/// engine's rings, or blocking sender threads without them), the
/// read-through, and the replication thread.
fn start_replication(
    replication: Option<Arc<crate::replication::Replication>>,
    engine: &crate::engine::Engine,
    app: &Arc<App>,
) -> Result<Option<crate::replication::driver::Handle>, ServeError> {
    Ok(match replication {
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
            if replication.settings.read_through {
                let rt = crate::replication::read_through::ReadThrough::start(
                    Arc::clone(&replication),
                    app.store.clone(),
                    transport.clone(),
                )
                .map_err(|e| ServeError(format!("cannot start the read-through: {e}")))?;
                app.set_miss_fetcher(rt);
            }
            Some(
                crate::replication::driver::start(replication, app.store.clone(), transport)
                    .map_err(|e| ServeError(format!("cannot start replication: {e}")))?,
            )
        }
        None => None,
    })
}

/// Tell whoever started this process that it serves: the old process of
/// an upgrade (which decides whether this one takes over), the pid file,
/// systemd.
fn announce_ready(config: &Config, env: &[(String, String)], parent: Option<lifecycle::Parent>) {
    let upgrade_timeout = Duration::from_millis(config.upgrade_ready_timeout_ms);
    let owner = match &parent {
        // The old process decides: it may have given up on this one meanwhile.
        Some(parent) => match parent.report_ready(upgrade_timeout) {
            Ok(()) => true,
            Err(why) => {
                tracing::warn!(
                    "the old process did not hand over ({why}); this one stops when told to"
                );
                false
            }
        },
        None => true,
    };
    if owner {
        if let Some(path) = &config.pid_file {
            if let Err(e) = lifecycle::write_pid_file(path) {
                tracing::warn!(path = %path.display(), "cannot write the pid file: {e}");
            }
        }
        let state = if parent.is_some() {
            // systemd follows the new main process (NotifyAccess=all in dist/sluice.service).
            format!("MAINPID={}\nREADY=1", std::process::id())
        } else {
            "READY=1".to_string()
        };
        lifecycle::sd_notify(env, &state);
    }
    drop(parent);
}

/// Plug the fleet into `app` (before anything is served, so no
/// acknowledged write misses an outbox): the replication mesh when peers or
/// a peer secret are configured, the object-store tier when `tier_url` is
/// set, and the one limiter their background bytes share. The replication
/// thread starts later, once the engine's transport exists.
fn attach_fleet(
    config: &Config,
    listen: std::net::SocketAddr,
    app: &Arc<App>,
) -> Result<Option<Arc<crate::replication::Replication>>, ServeError> {
    let replication = crate::replication::Settings::from_config(config, listen);
    let tier = crate::tier::Settings::from_config(config);
    if replication.is_none() && tier.is_none() {
        return Ok(None);
    }
    let limiter = Arc::new(crate::delivery::Limiter::from_config(
        config,
        Arc::clone(&app.metrics.pressure),
    ));
    let replication = match replication {
        Some(settings) => {
            let r = Arc::new(
                crate::replication::Replication::open(
                    settings,
                    &config.data_dir,
                    Arc::clone(&limiter),
                )
                .map_err(|e| ServeError(format!("cannot open the replication outbox: {e}")))?,
            );
            app.set_peer_service(Arc::clone(&r) as _);
            app.add_write_listener(Arc::clone(&r) as _);
            let m = Arc::clone(&r);
            app.add_metrics_source(move |out| m.render_metrics(out));
            let s = Arc::clone(&r);
            app.add_status_source(move || ("replication".to_string(), s.render_status()));
            Some(r)
        }
        None => None,
    };
    if let Some(settings) = tier {
        let tier =
            crate::tier::Tier::open(settings, &config.data_dir, app.store.clone(), Some(limiter))
                .map_err(ServeError)?;
        app.add_write_listener(Arc::clone(&tier) as _);
        app.set_miss_reader(Arc::clone(&tier) as _);
        let t = Arc::clone(&tier);
        app.store
            .set_evict_guard(Box::new(move |rel: &str| t.may_evict(rel)));
        let t = Arc::clone(&tier);
        app.add_metrics_source(move |out| t.render_metrics(out));
        let t = Arc::clone(&tier);
        app.add_status_source(move || ("tier".to_string(), t.render_status()));
        tier.start();
    }
    Ok(replication)
}

/// The shutdown phases (see docs/operations.md): (1) readiness 503 while serving, (2) stop
/// accepting and drain, (3) replication, (4) teardown. A second SIGTERM or SIGINT skips to
/// teardown; `shutdown_grace_ms` after the first the process exits whatever is left.
// Each argument is one running part that a phase stops; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
fn shutdown(
    config: &Config,
    env: &[(String, String)],
    exit: Exit,
    signals: &mut Signals,
    app: &Arc<App>,
    engine: crate::engine::Engine,
    fallback: &Arc<Fallback>,
    replication: Option<crate::replication::driver::Handle>,
) {
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    // The ceiling holds even if a phase overruns its budget (a stuck store flush).
    let _ = std::thread::Builder::new()
        .name("sluice-grace".into())
        .spawn(move || {
            std::thread::sleep(grace);
            tracing::error!(
                grace_ms = grace.as_millis() as u64,
                "shutdown_grace_ms passed; exiting with what is left"
            );
            std::process::exit(1);
        });
    if exit == Exit::Stop {
        // After an upgrade the successor is the main process for systemd now.
        lifecycle::sd_notify(env, "STOPPING=1");
    }
    app.set_draining();
    let mut cut = false;
    if exit == Exit::Stop && config.shutdown_pre_drain_ms > 0 {
        tracing::info!(
            pre_drain_ms = config.shutdown_pre_drain_ms,
            "shutdown phase 1: readiness answers 503, serving goes on"
        );
        cut = signals.stop_within(Duration::from_millis(config.shutdown_pre_drain_ms));
    }

    let (drain, replication_budget) = if cut {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (
            Duration::from_millis(config.shutdown_drain_ms),
            Duration::from_millis(config.shutdown_replication_ms),
        )
    };
    tracing::info!(
        drain_ms = drain.as_millis() as u64,
        "shutdown phase 2: stopped accepting; draining in-flight requests"
    );
    app.set_closing();
    let cutter = engine.drain_cutter();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let drainer = {
        let fallback = Arc::clone(fallback);
        std::thread::Builder::new()
            .name("sluice-drain".into())
            .spawn(move || {
                // Both fronts stop accepting and drain at once, within one budget. The rings
                // then run shutdown phase 3 (replication sends in flight finish, new ones
                // are refused and stay in the outbox) before they stop.
                let fallback_drain = std::thread::Builder::new()
                    .name("sluice-drain-fallback".into())
                    .spawn(move || fallback.shutdown(drain));
                engine.shutdown(drain, replication_budget);
                if let Ok(thread) = fallback_drain {
                    let _ = thread.join();
                }
                let _ = done_tx.send(());
            })
    };
    if let Err(e) = drainer {
        tracing::error!("cannot start the drain thread: {e}");
    }
    let teardown = Duration::from_millis(config.shutdown_teardown_ms);
    let mut stop_seen = false;
    loop {
        match done_rx.recv_timeout(Duration::from_millis(DRAIN_POLL_MS)) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if cut {
            continue;
        }
        if signals.stop_within(Duration::ZERO) {
            if exit == Exit::Upgraded && !stop_seen {
                // After an upgrade no signal started this drain: the first SIGTERM (an
                // orchestrator stopping the old pid) asks for what is happening already.
                stop_seen = true;
                tracing::info!(
                    "stop signal: already draining after an upgrade; a second one cuts the drain"
                );
                continue;
            }
            tracing::warn!("second stop signal: the drain is cut short, closing what is left");
            cut = true;
            if let Some(cutter) = &cutter {
                cutter.cut();
            }
            fallback.cut_drain();
            if done_rx.recv_timeout(teardown).is_err() {
                tracing::warn!("the drain did not end within shutdown_teardown_ms");
            }
            break;
        }
    }

    // Phase 3 on the rings ran inside the drain thread: their sends in flight finished
    // (or the budget ended) and they refused new ones. Now the replication thread takes the
    // answers, starts nothing new, waits for sends still in flight on the blocking senders
    // (no rings) within the budget, writes the peers' cursors and stops; whatever is not sent
    // stays in the outbox for the next start.
    tracing::info!(
        replication_ms = replication_budget.as_millis() as u64,
        "shutdown phase 3: replication finishes what is in flight; the outbox keeps the rest"
    );
    if let Some(replication) = replication {
        replication.shutdown(if cut {
            Duration::ZERO
        } else {
            replication_budget
        });
    }
    tracing::info!(
        teardown_ms = config.shutdown_teardown_ms,
        "shutdown phase 4: teardown"
    );
    app.store.shutdown();
    if let Some(path) = &config.pid_file {
        lifecycle::remove_pid_file_if_ours(path);
    }
    tracing::info!(cut, "shutdown complete");
}

/// How often the shutdown loop looks for a second stop signal while the drain runs, in ms.
const DRAIN_POLL_MS: u64 = 50;

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

/// What a signal asks for.
enum Signal {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGUSR2.
    Upgrade,
}

/// SIGTERM, SIGINT and SIGUSR2 handlers, installed before anything listens. They
/// used to be installed only after "sluice listening" was printed, so a
/// SIGTERM in between (an orchestrator stopping a fresh instance, or a test
/// under load) killed the process outright: connections refused, no drain.
/// A signal delivered before it is waited for is kept, not lost.
struct Signals {
    runtime: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, ServeError> {
        use tokio::signal::unix::{signal, SignalKind};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ServeError(format!("cannot start the signal runtime: {e}")))?;
        let _context = runtime.enter();
        let install = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| ServeError(format!("cannot install the {name} handler: {e}")))
        };
        let term = install(SignalKind::terminate(), "SIGTERM")?;
        let int = install(SignalKind::interrupt(), "SIGINT")?;
        let usr2 = install(SignalKind::user_defined2(), "SIGUSR2")?;
        drop(_context);
        Ok(Signals {
            runtime,
            term,
            int,
            usr2,
        })
    }

    /// Blocks until the next signal (or one that came earlier).
    fn next(&mut self) -> Signal {
        let (term, int, usr2) = (&mut self.term, &mut self.int, &mut self.usr2);
        self.runtime.block_on(async {
            tokio::select! {
                _ = term.recv() => Signal::Stop,
                _ = int.recv() => Signal::Stop,
                _ = usr2.recv() => Signal::Upgrade,
            }
        })
    }

    /// Whether SIGTERM or SIGINT arrives within `wait` (SIGUSR2 is ignored while stopping).
    fn stop_within(&mut self, wait: Duration) -> bool {
        let (term, int, usr2) = (&mut self.term, &mut self.int, &mut self.usr2);
        self.runtime.block_on(async {
            let stop = async {
                loop {
                    tokio::select! {
                        biased;
                        _ = term.recv() => return,
                        _ = int.recv() => return,
                        _ = usr2.recv() => {
                            tracing::warn!("SIGUSR2 ignored: this process is shutting down");
                        }
                    }
                }
            };
            tokio::time::timeout(wait, stop).await.is_ok()
        })
    }
}
