//! Side-by-side runs: sluice against nginx (or sluice's splice mode against its copy mode) on
//! the same artifacts, the same machine and the same moment, alternating servers A B A B so
//! drift in the machine's state hits both equally.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::client::{Connection, ReceiveOptions};
use crate::h2load::{self, Transport};
use crate::loopback::{self, LoopbackConfig};
use crate::plot::{plot_svg, Series};
use crate::record::{HostFacts, RunDescription, RunRecord};
use crate::report::hgrm_text;
use crate::request::{Body, Method, Request, RequestSet, Url};
use crate::run::{run, RunConfig, Stop};
use crate::sys;

/// Artifact sizes of the standard comparison, bytes: a small object, an odd-sized large one (no
/// alignment luck) and a 64 MiB one.
pub const DEFAULT_SIZES: [u64; 3] = [4096, 17_941_067, 64 << 20];

/// Concurrencies of the standard comparison.
pub const DEFAULT_CONCURRENCIES: [usize; 3] = [1, 8, 20];

/// Which two servers are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pairing {
    /// A = sluice (default mode), B = nginx.
    SluiceVsNginx,
    /// A = sluice `--file-serving-mode splice`, B = sluice `--file-serving-mode copy`.
    SpliceVsCopy,
}

/// Configuration of a comparison.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// Path of the sluice binary (built with `--release`).
    pub sluice_bin: PathBuf,
    /// nginx binary. Default `nginx`.
    pub nginx_bin: PathBuf,
    /// Which servers.
    pub pairing: Pairing,
    /// Artifact sizes, bytes.
    pub sizes: Vec<u64>,
    /// Concurrencies.
    pub concurrencies: Vec<usize>,
    /// Repeats per (size, concurrency, server); at least 3 for a min/median/max to mean much.
    pub repeats: usize,
    /// Measured time per run.
    pub run_time: Duration,
    /// Warm-up before each run (separate from the measured run, so CPU accounting covers the
    /// measured part only).
    pub warmup: Duration,
    /// Directory for artifacts, server state, records and the table.
    pub out_dir: PathBuf,
    /// Also measure the loopback bound at the start.
    pub loopback_bound: bool,
    /// Keep-alive connections opened (one GET each, then idle) to report each server's RSS
    /// under them; 0 skips it.
    pub idle_connections: usize,
    /// Body size of the sluice-only PUT runs (to the Bazel CAS route, so the server checks the
    /// digest of every body against its key); 0 skips them.
    pub put_bytes: usize,
    /// Connections of the PUT runs.
    pub put_concurrency: usize,
    /// How the GET runs speak to both servers: plaintext HTTP/1.1 with sluice-bench's own
    /// client, or TLS 1.3 / HTTP/2 through h2load (`--tls`, `--h2`), with one certificate for
    /// both servers.
    pub transport: Transport,
    /// Run sluice with `SLUICE_ENGINE=epoll`: what `engine = "auto"` runs on hosts without
    /// io_uring (the epoll engine for plaintext HTTP/1).
    pub no_uring: bool,
}

impl CompareConfig {
    /// Total measured-plus-warm-up time of the matrix, for the operator's estimate.
    pub fn planned_time(&self) -> Duration {
        let runs = self.sizes.len() * self.concurrencies.len() * self.repeats * 2;
        (self.run_time + self.warmup).mul_f64(runs as f64)
    }
}

/// A server process started for the comparison; stopped (SIGTERM, then SIGKILL after 5 s) on drop.
struct Server {
    name: String,
    child: Child,
    /// Plaintext HTTP/1.1 port (uploads, checks, readiness).
    port: u16,
    /// Port the measured runs use: `port`, or nginx's TLS / h2c listener.
    bench_port: u16,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM first so nginx's master stops its workers; SIGKILL only if it lingers.
        if sys::terminate(self.child.id()).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Picks a free loopback port by binding port 0 and closing it again. Another process could take
/// it in between; the server would then fail to start and the comparison says so.
fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// `/proc/*/stat` of every live process: pid -> (ppid, utime + stime + cutime + cstime ticks).
fn all_stats() -> BTreeMap<u32, (u32, u64)> {
    let mut stats = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(stat) = read_stat(p) {
                stats.insert(p, stat);
            }
        }
    }
    stats
}

/// `pid` and all its live descendants, with their `/proc/PID/stat` CPU ticks.
fn process_tree(pid: u32) -> Vec<(u32, u64)> {
    let stats = all_stats();
    let mut tree = Vec::new();
    let mut frontier = vec![pid];
    // Bounded by the number of processes: each pid is visited once, since a pid has one parent.
    while let Some(p) = frontier.pop() {
        if let Some((_, ticks)) = stats.get(&p) {
            tree.push((p, *ticks));
        }
        frontier.extend(
            stats
                .iter()
                .filter(|(_, (pp, _))| *pp == p)
                .map(|(c, _)| *c),
        );
    }
    tree
}

/// CPU time (user + system, seconds) of `pid` and all its live descendants, plus the reaped
/// children's times folded into each (`cutime`, `cstime`), from `/proc/*/stat`.
pub fn process_tree_cpu_secs(pid: u32) -> f64 {
    let ticks: u64 = process_tree(pid).iter().map(|(_, t)| t).sum();
    ticks as f64 / sys::clock_ticks_per_sec() as f64
}

/// Resident memory (bytes) of `pid` and all its live descendants: the sum of each process's
/// resident pages from `/proc/*/statm`. Pages shared between processes (nginx's workers and
/// master) are counted in each, so for a multi-process server this is an upper bound.
pub fn process_tree_rss_bytes(pid: u32) -> u64 {
    let page = sys::page_bytes();
    process_tree(pid)
        .iter()
        .map(|(p, _)| {
            std::fs::read_to_string(format!("/proc/{p}/statm"))
                .ok()
                .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
                .unwrap_or(0)
                * page
        })
        .sum()
}

/// Samples [`process_tree_rss_bytes`] every 50 ms on a thread until dropped; `max_bytes`
/// then gives the largest sample.
struct RssSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut max = process_tree_rss_bytes(pid);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                max = max.max(process_tree_rss_bytes(pid));
            }
            max
        });
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    fn max_bytes(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

/// Server RSS before and while `idle` keep-alive connections each completed one GET of the
/// smallest artifact and then stayed open, bytes.
#[derive(Debug, Clone, Copy)]
pub struct IdleRss {
    /// Before the connections were opened.
    pub before_bytes: u64,
    /// With every connection open and idle.
    pub idle_bytes: u64,
    /// Connections that completed their GET.
    pub connections: usize,
}

fn idle_connections_rss(server: &Server, size: u64, idle: usize) -> Result<IdleRss, String> {
    use std::io::{Read, Write};
    let before_bytes = process_tree_rss_bytes(server.pid());
    let request = format!(
        "GET {ARTIFACT_PREFIX}{} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        artifact_name(size)
    );
    let mut conns = Vec::with_capacity(idle);
    for _ in 0..idle {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port))
            .map_err(|e| format!("idle connections: connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| format!("idle connections: {e}"))?;
        s.write_all(request.as_bytes())
            .map_err(|e| format!("idle connections: write: {e}"))?;
        conns.push(s);
    }
    let mut connections = 0;
    let mut buf = vec![0u8; 64 * 1024];
    for s in &mut conns {
        // Read until the body's length has arrived past the head (the artifact is small).
        let mut got = Vec::new();
        let done = loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                if got.len() >= end + 4 + usize::try_from(size).unwrap_or(usize::MAX) {
                    break true;
                }
            }
        };
        connections += usize::from(done);
    }
    std::thread::sleep(Duration::from_millis(300));
    let idle_bytes = process_tree_rss_bytes(server.pid());
    drop(conns);
    Ok(IdleRss {
        before_bytes,
        idle_bytes,
        connections,
    })
}

/// (ppid, utime + stime + cutime + cstime) of one process, in clock ticks.
fn read_stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses `/proc/PID/stat`: fields after the `)` that closes the command name, which may itself
/// hold spaces and parentheses.
fn parse_stat(text: &str) -> Option<(u32, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    let ppid = f.get(1)?.parse().ok()?;
    let mut ticks = 0u64;
    for i in 11..15 {
        ticks += f.get(i)?.parse::<u64>().ok()?;
    }
    Some((ppid, ticks))
}

/// Waits until `GET path` on the port answers 200, or fails after `timeout`.
fn wait_ready(server: &mut Server, path: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let url = Url::parse(&format!("http://127.0.0.1:{}{path}", server.port))?;
    let req = Request::new(Method::Get, &url, None, None);
    let opts = ReceiveOptions {
        verify_sha256: false,
        splice: false,
    };
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(format!(
                "{} exited before it was ready ({status})",
                server.name
            ));
        }
        if let Ok(mut c) = Connection::connect(&url.authority, Duration::from_secs(2), opts) {
            if c.exchange(&req).is_ok() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not answer GET {path} with 2xx within {timeout:?}",
                server.name
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_sluice(cfg: &CompareConfig, name: &str, mode: Option<&str>) -> Result<Server, String> {
    let port = free_port()?;
    let data = cfg.out_dir.join(format!("{name}-data"));
    std::fs::create_dir_all(&data).map_err(|e| format!("creating {}: {e}", data.display()))?;
    let log = std::fs::File::create(cfg.out_dir.join(format!("{name}.log")))
        .map_err(|e| format!("creating the {name} log: {e}"))?;
    let mut cmd = Command::new(&cfg.sluice_bin);
    cmd.arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(&data)
        // The load generator is one address holding up to `idle_connections` sockets: the
        // per-address cap (a defence against one client holding every slot) must not apply.
        .env("SLUICE_CONNECTIONS_PER_IP_MAX", "0");
    if cfg.no_uring {
        cmd.env("SLUICE_ENGINE", "epoll");
    }
    if cfg.transport.tls() {
        let (cert, key) = cert_paths(cfg);
        cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
    }
    if let Some(m) = mode {
        cmd.arg("--file-serving-mode").arg(m);
    }
    let err_log = log.try_clone().map_err(|e| format!("{name} log: {e}"))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", cfg.sluice_bin.display()))?;
    let mut s = Server {
        name: name.into(),
        child,
        port,
        bench_port: port,
    };
    wait_ready(&mut s, "/up", Duration::from_secs(30))?;
    Ok(s)
}

/// The nginx configuration the comparison uses: what an operator would run for static
/// artifacts (sendfile, tcp_nopush, no access log, 2 workers), rooted at `www`.
pub fn nginx_conf(prefix: &Path, www: &Path, port: u16, as_root: bool) -> String {
    let p = prefix.display();
    format!(
        "{user}worker_processes 2;\ndaemon off;\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  sendfile on;\n  tcp_nopush on;\n  access_log off;\n\
         \x20 # Keep-alive for the whole run, as sluice does: nginx's default 1000 would make it reconnect.\n\
         \x20 keepalive_requests 100000000;\n  keepalive_timeout 300s;\n\
         \x20 default_type application/octet-stream;\n\
         \x20 client_body_temp_path {p}/client_body;\n  proxy_temp_path {p}/proxy;\n\
         \x20 fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
         \x20 server {{\n    listen 127.0.0.1:{port};\n    root {www};\n\
         \x20   location = /up {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
        user = if as_root { "user root;\n" } else { "" },
        www = www.display(),
    )
}

fn start_nginx(cfg: &CompareConfig, www: &Path) -> Result<Server, String> {
    let port = free_port()?;
    let prefix = cfg.out_dir.join("nginx");
    std::fs::create_dir_all(&prefix).map_err(|e| format!("creating {}: {e}", prefix.display()))?;
    // When started as root, nginx's workers would drop to `nobody`, which may not be able to
    // traverse the output tree; `user root` keeps them able to read what the bench wrote.
    let as_root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    let conf = prefix.join("nginx.conf");
    let bench_port = if cfg.transport == Transport::Plain {
        port
    } else {
        free_port()?
    };
    let mut text = nginx_conf(&prefix, www, port, as_root);
    if let Some(extra) = nginx_listen(cfg, bench_port) {
        text = text.replace("    root ", &format!("{extra}    root "));
    }
    std::fs::write(&conf, text).map_err(|e| format!("writing {}: {e}", conf.display()))?;
    let log =
        std::fs::File::create(prefix.join("stderr.log")).map_err(|e| format!("nginx log: {e}"))?;
    let child = Command::new(&cfg.nginx_bin)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| {
            format!(
                "starting {}: {e} (install it: apt-get install -y nginx)",
                cfg.nginx_bin.display()
            )
        })?;
    let mut s = Server {
        name: "nginx".into(),
        child,
        port,
        bench_port,
    };
    wait_ready(&mut s, "/up", Duration::from_secs(15))?;
    Ok(s)
}

/// The certificate and key both servers present (generated once per comparison).
fn cert_paths(cfg: &CompareConfig) -> (PathBuf, PathBuf) {
    (cfg.out_dir.join("cert.pem"), cfg.out_dir.join("key.pem"))
}

/// Generates a self-signed P-256 certificate for 127.0.0.1 with openssl.
fn make_cert(cfg: &CompareConfig) -> Result<(), String> {
    let (cert, key) = cert_paths(cfg);
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "7", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("running openssl to make a test certificate: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("openssl req failed ({status})"))
    }
}

/// nginx's extra listener for a TLS or h2c comparison: TLS 1.3 only, with ALPN h2 and
/// http/1.1 on one port (as sluice), or h2c with prior knowledge.
fn nginx_listen(cfg: &CompareConfig, bench_port: u16) -> Option<String> {
    let (cert, key) = cert_paths(cfg);
    match cfg.transport {
        Transport::Plain => None,
        Transport::TlsHttp1 | Transport::TlsH2 => Some(format!(
            "    listen 127.0.0.1:{bench_port} ssl http2;\n    ssl_protocols TLSv1.3;\n\
             \x20   ssl_certificate {};\n    ssl_certificate_key {};\n",
            cert.display(),
            key.display()
        )),
        Transport::H2c => Some(format!("    listen 127.0.0.1:{bench_port} http2;\n")),
    }
}

/// Path under which every server serves the artifacts.
const ARTIFACT_PREFIX: &str = "/v1/artifacts/bench/";

fn artifact_name(size: u64) -> String {
    format!("a-{size}")
}

/// PUTs every artifact to a sluice server and checks the answer is 2xx.
fn upload(server: &Server, bodies: &[(u64, Arc<Body>)]) -> Result<(), String> {
    let authority = format!("127.0.0.1:{}", server.port);
    let opts = ReceiveOptions {
        verify_sha256: false,
        splice: false,
    };
    let mut conn = Connection::connect(&authority, Duration::from_secs(60), opts)
        .map_err(|e| format!("connecting to {}: {e}", server.name))?;
    for (size, body) in bodies {
        let url = Url::parse(&format!(
            "http://{authority}{ARTIFACT_PREFIX}{}",
            artifact_name(*size)
        ))?;
        let req = Request::new(Method::Put, &url, Some(Arc::clone(body)), None);
        conn.exchange(&req)
            .map_err(|k| format!("PUT of {size} B to {} failed: {}", server.name, k.name()))?;
    }
    Ok(())
}

/// GETs every artifact and checks length and SHA-256 against the generated content.
fn verify_identical(server: &Server, bodies: &[(u64, Arc<Body>)]) -> Result<(), String> {
    let authority = format!("127.0.0.1:{}", server.port);
    let opts = ReceiveOptions {
        verify_sha256: true,
        splice: false,
    };
    let mut conn = Connection::connect(&authority, Duration::from_secs(60), opts)
        .map_err(|e| format!("connecting to {}: {e}", server.name))?;
    for (size, body) in bodies {
        let url = Url::parse(&format!(
            "http://{authority}{ARTIFACT_PREFIX}{}",
            artifact_name(*size)
        ))?;
        let req = Request::new(Method::Get, &url, None, Some(*size));
        let _ = req.expected_sha256.set(body.sha256);
        conn.exchange(&req).map_err(|k| {
            format!("{} served {size} B artifact wrongly ({} error): the servers do not return identical bytes", server.name, k.name())
        })?;
    }
    Ok(())
}

/// One measured run of one server.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// The run's record.
    pub record: RunRecord,
    /// Server CPU seconds (process tree) during the measured part.
    pub server_cpu_secs: f64,
    /// Largest server RSS (process tree, sampled every 50 ms) during the measured part, bytes.
    pub server_rss_max_bytes: u64,
}

impl Measurement {
    /// Server CPU seconds per 10^9 body bytes (infinite when nothing moved).
    pub fn cpu_secs_per_gb(&self) -> f64 {
        if self.record.body_bytes == 0 {
            f64::INFINITY
        } else {
            self.server_cpu_secs / (self.record.body_bytes as f64 / 1e9)
        }
    }
}

fn bench_once(
    cfg: &CompareConfig,
    server: &Server,
    size: u64,
    connections: usize,
    label: String,
) -> Result<Measurement, String> {
    if cfg.transport != Transport::Plain {
        return bench_once_h2load(cfg, server, size, connections, label);
    }
    let url = format!(
        "http://127.0.0.1:{}{ARTIFACT_PREFIX}{}",
        server.port,
        artifact_name(size)
    );
    let make_set = || -> Result<RequestSet, String> {
        let mut set = RequestSet::single(&url, Method::Get, 0)?;
        set.requests[0].expected_len = Some(size);
        Ok(set)
    };
    let base = RunConfig {
        connections,
        warmup: Duration::ZERO,
        progress: false,
        ..RunConfig::default()
    };
    if !cfg.warmup.is_zero() {
        run(
            make_set()?,
            RunConfig {
                stop: Stop::Duration(cfg.warmup),
                ..base.clone()
            },
        )?;
    }
    let started = SystemTime::now();
    let cpu_before = process_tree_cpu_secs(server.pid());
    let rss = RssSampler::start(server.pid());
    let result = run(
        make_set()?,
        RunConfig {
            stop: Stop::Duration(cfg.run_time),
            ..base
        },
    )?;
    let cpu_after = process_tree_cpu_secs(server.pid());
    let server_rss_max_bytes = rss.max_bytes();
    let desc = RunDescription {
        command: std::env::args().collect(),
        label,
        started,
        connections,
        rate_per_sec: None,
        warmup_secs: cfg.warmup.as_secs_f64(),
    };
    let record = RunRecord::new(&desc, &result);
    let stem = cfg
        .out_dir
        .join("runs")
        .join(record.label.replace([' ', '/'], "_"));
    std::fs::write(stem.with_extension("hgrm"), hgrm_text(&result.histogram))
        .map_err(|e| format!("writing {}: {e}", stem.display()))?;
    let json =
        serde_json::to_string_pretty(&record).map_err(|e| format!("encoding the record: {e}"))?;
    std::fs::write(stem.with_extension("json"), json)
        .map_err(|e| format!("writing {}: {e}", stem.display()))?;
    Ok(Measurement {
        record,
        server_cpu_secs: (cpu_after - cpu_before).max(0.0),
        server_rss_max_bytes,
    })
}

/// [`bench_once`] through h2load (TLS, HTTP/2): a warm-up run, then the measured run with the
/// server's CPU counted around it.
fn bench_once_h2load(
    cfg: &CompareConfig,
    server: &Server,
    size: u64,
    connections: usize,
    label: String,
) -> Result<Measurement, String> {
    let scheme = if cfg.transport.tls() { "https" } else { "http" };
    let url = format!(
        "{scheme}://127.0.0.1:{}{ARTIFACT_PREFIX}{}",
        server.bench_port,
        artifact_name(size)
    );
    if !cfg.warmup.is_zero() {
        h2load::run(cfg.transport, &url, connections, cfg.warmup, size)?;
    }
    let started = SystemTime::now();
    let cpu_before = process_tree_cpu_secs(server.pid());
    let rss = RssSampler::start(server.pid());
    let result = h2load::run(cfg.transport, &url, connections, cfg.run_time, size)?;
    let cpu_after = process_tree_cpu_secs(server.pid());
    let server_rss_max_bytes = rss.max_bytes();
    let desc = RunDescription {
        command: std::env::args().collect(),
        label,
        started,
        connections,
        rate_per_sec: None,
        warmup_secs: cfg.warmup.as_secs_f64(),
    };
    let record = RunRecord::new(&desc, &result);
    let stem = cfg
        .out_dir
        .join("runs")
        .join(record.label.replace([' ', '/'], "_"));
    let json =
        serde_json::to_string_pretty(&record).map_err(|e| format!("encoding the record: {e}"))?;
    std::fs::write(stem.with_extension("json"), json)
        .map_err(|e| format!("writing {}: {e}", stem.display()))?;
    Ok(Measurement {
        record,
        server_cpu_secs: (cpu_after - cpu_before).max(0.0),
        server_rss_max_bytes,
    })
}

/// Median, min and max of a non-empty sample (median of an even count is the mean of the two
/// middle values).
pub fn median_min_max(xs: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((median, v[0], v[n - 1]))
}

/// All measurements of one (size, concurrency) cell, per server, in repeat order.
#[derive(Debug, Clone, Default)]
pub struct Cell {
    /// Server A's runs.
    pub a: Vec<Measurement>,
    /// Server B's runs.
    pub b: Vec<Measurement>,
}

type Metric = (&'static str, fn(&Measurement) -> f64);

const METRICS: [Metric; 7] = [
    ("req/s", |m| m.record.requests_per_sec),
    ("MB/s", |m| m.record.mb_per_sec),
    ("p50 ms", |m| m.record.latency.p50_ms),
    ("p99 ms", |m| m.record.latency.p99_ms),
    ("p99.9 ms", |m| m.record.latency.p99_9_ms),
    ("CPU s/GB", Measurement::cpu_secs_per_gb),
    ("RSS max MiB", |m| {
        m.server_rss_max_bytes as f64 / (1u64 << 20) as f64
    }),
];

fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        "–".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// The Markdown table: per size and concurrency, each metric's median for A and B, and the
/// ratio A/B paired by repeat (repeat i of A over repeat i of B) as median, min and max.
pub fn markdown_table(names: (&str, &str), cells: &BTreeMap<(u64, usize), Cell>) -> String {
    let (a, b) = names;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| size (B) | c | metric | {a} (median) | {b} (median) | {a}/{b} median | min | max |"
    );
    let _ = writeln!(out, "|---:|---:|---|---:|---:|---:|---:|---:|");
    for ((size, c), cell) in cells {
        for (name, f) in METRICS {
            let av: Vec<f64> = cell.a.iter().map(f).collect();
            let bv: Vec<f64> = cell.b.iter().map(f).collect();
            let ratios: Vec<f64> = av.iter().zip(&bv).map(|(x, y)| x / y).collect();
            let med = |v: &[f64]| median_min_max(v).map_or("–".to_string(), |m| fmt_num(m.0));
            let (rm, rmin, rmax) = median_min_max(&ratios)
                .map_or(("–".into(), "–".into(), "–".into()), |(m, lo, hi)| {
                    (format!("{m:.2}"), format!("{lo:.2}"), format!("{hi:.2}"))
                });
            let _ = writeln!(
                out,
                "| {size} | {c} | {name} | {} | {} | {rm} | {rmin} | {rmax} |",
                med(&av),
                med(&bv)
            );
        }
    }
    let errors: Vec<String> = cells
        .values()
        .flat_map(|c| c.a.iter().chain(&c.b))
        .filter(|m| m.record.errors.values().sum::<u64>() > 0)
        .map(|m| format!("{}: {:?}", m.record.label, m.record.errors))
        .collect();
    if errors.is_empty() {
        let _ = writeln!(out, "\nNo request failed in any run.");
    } else {
        let _ = writeln!(out, "\nRuns with failed requests:\n");
        for e in errors {
            let _ = writeln!(out, "- {e}");
        }
    }
    out
}

/// Each server's median MB/s as a share of the loopback bound: the 1-stream bound for c=1,
/// the per-core-streams bound otherwise. Sizes under 1 MiB are left out (they are bound by
/// requests, not bytes).
pub fn bound_table(
    names: (&str, &str),
    cells: &BTreeMap<(u64, usize), Cell>,
    one_gb_per_sec: f64,
    many_gb_per_sec: f64,
) -> String {
    let (a, b) = names;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| size (B) | c | bound GB/s | {a} MB/s / bound | {b} MB/s / bound |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|");
    for ((size, c), cell) in cells {
        if *size < 1 << 20 {
            continue;
        }
        let bound = if *c == 1 {
            one_gb_per_sec
        } else {
            many_gb_per_sec
        };
        let share = |ms: &[Measurement]| {
            let v: Vec<f64> = ms.iter().map(|m| m.record.mb_per_sec).collect();
            median_min_max(&v).map_or("–".to_string(), |(m, _, _)| {
                format!("{:.0} %", 100.0 * m / (bound * 1000.0))
            })
        };
        let _ = writeln!(
            out,
            "| {size} | {c} | {bound:.2} | {} | {} |",
            share(&cell.a),
            share(&cell.b)
        );
    }
    out
}

/// Runs the whole comparison and returns the Markdown report (also written to
/// `out_dir/table.md`).
pub fn compare(cfg: &CompareConfig) -> Result<String, String> {
    if cfg.repeats == 0 || cfg.sizes.is_empty() || cfg.concurrencies.is_empty() {
        return Err("repeats, sizes and concurrencies must not be empty".into());
    }
    let mkdir =
        |p: &Path| std::fs::create_dir_all(p).map_err(|e| format!("creating {}: {e}", p.display()));
    mkdir(&cfg.out_dir.join("runs"))?;
    let www = cfg.out_dir.join("www");
    let dir = www.join(ARTIFACT_PREFIX.trim_matches('/'));
    mkdir(&dir)?;
    eprintln!(
        "sluice-bench compare: generating artifacts in {}",
        dir.display()
    );
    let mut bodies = Vec::new();
    for &size in &cfg.sizes {
        let len =
            usize::try_from(size).map_err(|_| format!("size {size} does not fit in memory"))?;
        let body = Arc::new(Body::generate(len));
        std::fs::write(dir.join(artifact_name(size)), &body.bytes)
            .map_err(|e| format!("writing artifact: {e}"))?;
        bodies.push((size, body));
    }

    // One stream bounds c=1; one stream per core bounds the concurrent cells, where one
    // connection's sender no longer has the machine to itself.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bound = if cfg.loopback_bound {
        eprintln!("sluice-bench compare: measuring the loopback bound (1 and {cores} streams)");
        let one = loopback::measure(&LoopbackConfig::default())?;
        let many = loopback::measure(&LoopbackConfig {
            streams: cores,
            ..LoopbackConfig::default()
        })?;
        Some((one, many))
    } else {
        None
    };

    if cfg.transport.tls() {
        make_cert(cfg)?;
    }
    let (a, b) = match cfg.pairing {
        Pairing::SluiceVsNginx => (start_sluice(cfg, "sluice", None)?, start_nginx(cfg, &www)?),
        Pairing::SpliceVsCopy => (
            start_sluice(cfg, "sluice-splice", Some("splice"))?,
            start_sluice(cfg, "sluice-copy", Some("copy"))?,
        ),
    };
    for s in [&a, &b] {
        if s.name.starts_with("sluice") {
            upload(s, &bodies)?;
        }
    }
    verify_identical(&a, &bodies)?;
    verify_identical(&b, &bodies)?;
    eprintln!(
        "sluice-bench compare: {} and {} return identical bytes; about {:.0} s of runs follow",
        a.name,
        b.name,
        cfg.planned_time().as_secs_f64()
    );

    let mut idle = Vec::new();
    if cfg.idle_connections > 0 {
        let smallest = cfg.sizes.iter().copied().min().unwrap_or(0);
        for s in [&a, &b] {
            let r = idle_connections_rss(s, smallest, cfg.idle_connections)?;
            eprintln!(
                "  {:<32} RSS {:.1} MiB -> {:.1} MiB with {} idle keep-alive connections",
                s.name,
                r.before_bytes as f64 / (1u64 << 20) as f64,
                r.idle_bytes as f64 / (1u64 << 20) as f64,
                r.connections
            );
            idle.push((s.name.clone(), r));
        }
    }

    let mut cells: BTreeMap<(u64, usize), Cell> = BTreeMap::new();
    for &size in &cfg.sizes {
        for &c in &cfg.concurrencies {
            let cell = cells.entry((size, c)).or_default();
            for r in 0..cfg.repeats {
                for (server, into) in [(&a, &mut cell.a), (&b, &mut cell.b)] {
                    let label = format!("{} {size}B c{c} r{r}", server.name);
                    let m = bench_once(cfg, server, size, c, label)?;
                    eprintln!(
                        "  {:<32} {:>10.1} req/s {:>9.1} MB/s  p99 {:.3} ms  cpu {:.3} s/GB",
                        m.record.label,
                        m.record.requests_per_sec,
                        m.record.mb_per_sec,
                        m.record.latency.p99_ms,
                        m.cpu_secs_per_gb()
                    );
                    into.push(m);
                }
            }
            let series: Vec<Series> = cell
                .a
                .iter()
                .chain(&cell.b)
                .map(|m| Series {
                    label: m.record.label.clone(),
                    rows: m.record.percentiles.clone(),
                })
                .collect();
            // h2load reports no latency distribution to plot.
            if cfg.transport == Transport::Plain {
                let svg = cfg.out_dir.join(format!("latency-{size}B-c{c}.svg"));
                plot_svg(&series, &format!("{size} B, c={c}"), &svg)?;
            }
        }
    }

    // PUT: sluice only (nginx has no store that checks a digest), to the CAS route.
    let mut puts: Vec<(String, Vec<RunRecord>)> = Vec::new();
    if cfg.put_bytes > 0 {
        let body = Arc::new(Body::generate(cfg.put_bytes));
        for s in [&a, &b]
            .into_iter()
            .filter(|s| s.name.starts_with("sluice"))
        {
            let url = format!(
                "http://127.0.0.1:{}/cas/{}",
                s.port,
                hex::encode(body.sha256)
            );
            let mut records = Vec::new();
            for r in 0..cfg.repeats {
                let set = RequestSet {
                    authority: Url::parse(&url)?.authority,
                    requests: vec![Request::new(
                        Method::Put,
                        &Url::parse(&url)?,
                        Some(Arc::clone(&body)),
                        None,
                    )],
                    weighted: false,
                };
                let result = run(
                    set,
                    RunConfig {
                        connections: cfg.put_concurrency,
                        warmup: cfg.warmup,
                        progress: false,
                        stop: Stop::Duration(cfg.run_time),
                        ..RunConfig::default()
                    },
                )?;
                let desc = RunDescription {
                    command: std::env::args().collect(),
                    label: format!(
                        "{} PUT {}B c{} r{r}",
                        s.name, cfg.put_bytes, cfg.put_concurrency
                    ),
                    started: SystemTime::now(),
                    connections: cfg.put_concurrency,
                    rate_per_sec: None,
                    warmup_secs: cfg.warmup.as_secs_f64(),
                };
                let record = RunRecord::new(&desc, &result);
                eprintln!(
                    "  {:<32} {:>10.1} req/s {:>9.1} MB/s  p99 {:.3} ms  errors {}",
                    record.label,
                    record.requests_per_sec,
                    record.mb_per_sec,
                    record.latency.p99_ms,
                    record.errors.values().sum::<u64>()
                );
                records.push(record);
            }
            puts.push((s.name.clone(), records));
        }
    }

    let host = HostFacts::collect();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "Machine: {} ({} cores), kernel {}, host {}. Runs: {} s measured after {} s warm-up, {} repeats, alternating {} and {}.",
        host.cpu_model,
        host.cores,
        host.kernel,
        host.hostname,
        cfg.run_time.as_secs_f64(),
        cfg.warmup.as_secs_f64(),
        cfg.repeats,
        a.name,
        b.name
    );
    if let Some((one, many)) = bound {
        let _ = writeln!(
            report,
            "Zero-copy loopback bound (corked sendfile -> splice to /dev/null): {:.2} GB/s with 1 stream, {:.2} GB/s with {cores}.",
            one.gb_per_sec, many.gb_per_sec
        );
    }
    for (name, r) in &idle {
        let _ = writeln!(
            report,
            "{name} RSS: {:.1} MiB idle, {:.1} MiB with {} keep-alive connections open after one GET each.",
            r.before_bytes as f64 / (1u64 << 20) as f64,
            r.idle_bytes as f64 / (1u64 << 20) as f64,
            r.connections
        );
    }
    let _ = writeln!(
        report,
        "GET runs: {}{}{}.",
        cfg.transport.name(),
        if cfg.transport == Transport::Plain {
            " with sluice-bench's client"
        } else {
            " with h2load (no latency distribution: the latency columns read 0)"
        },
        if cfg.no_uring {
            "; sluice with SLUICE_ENGINE=epoll (no io_uring)"
        } else {
            ""
        }
    );
    report.push('\n');
    report.push_str(&markdown_table((&a.name, &b.name), &cells));
    for (name, records) in &puts {
        let v: Vec<f64> = records.iter().map(|r| r.mb_per_sec).collect();
        let errors: u64 = records.iter().flat_map(|r| r.errors.values()).sum();
        if let Some((m, lo, hi)) = median_min_max(&v) {
            let _ = writeln!(
                report,
                "\n{name} PUT of {} B to /cas/{{sha256}} (digest checked by the server) at c={}: {} MB/s median (min {}, max {}), {errors} failed requests.",
                cfg.put_bytes,
                cfg.put_concurrency,
                fmt_num(m),
                fmt_num(lo),
                fmt_num(hi)
            );
        }
    }
    if let Some((one, many)) = bound {
        report.push('\n');
        report.push_str(&bound_table(
            (&a.name, &b.name),
            &cells,
            one.gb_per_sec,
            many.gb_per_sec,
        ));
    }
    std::fs::write(cfg.out_dir.join("table.md"), &report)
        .map_err(|e| format!("writing table.md: {e}"))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_awkward_names() {
        let line =
            "1234 (my (odd) proc) S 77 1234 1234 0 -1 4194560 100 0 0 0 11 22 33 44 20 0 1 0 5 0 0";
        assert_eq!(parse_stat(line), Some((77, 11 + 22 + 33 + 44)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_uses_cpu() {
        // Burn a little CPU so the figure is not all zero ticks.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(process_tree_cpu_secs(std::process::id()) > 0.0);
    }

    #[test]
    fn own_process_tree_rss_counts_a_child() {
        // A 32 MiB buffer that is really touched is resident; a child process adds its own.
        let buf = std::hint::black_box(vec![1u8; 32 << 20]);
        let alone = process_tree_rss_bytes(std::process::id());
        assert!(alone >= 32 << 20, "rss {alone}");
        let mut child = Command::new("sleep").arg("5").spawn().expect("sleep");
        std::thread::sleep(Duration::from_millis(100));
        let with_child = process_tree_rss_bytes(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(with_child > alone - (4 << 20), "{with_child} vs {alone}");
        assert!(process_tree_rss_bytes(u32::MAX) == 0);
        drop(buf);
    }

    #[test]
    fn bound_table_uses_the_bound_of_its_concurrency() {
        let cell = |mb_per_sec: f64| {
            let result = crate::run::RunResult {
                histogram: crate::report::new_latency_histogram(),
                requests_ok: 1,
                errors: crate::run::ErrorCounts::default(),
                body_bytes: 1,
                elapsed: Duration::from_secs(1),
                connects: 1,
                retries: 0,
            };
            let desc = RunDescription {
                command: Vec::new(),
                label: "t".into(),
                started: SystemTime::now(),
                connections: 1,
                rate_per_sec: None,
                warmup_secs: 0.0,
            };
            let mut record = RunRecord::new(&desc, &result);
            record.mb_per_sec = mb_per_sec;
            Measurement {
                record,
                server_cpu_secs: 1.0,
                server_rss_max_bytes: 0,
            }
        };
        let mut cells = BTreeMap::new();
        cells.insert(
            (4096, 1),
            Cell {
                a: vec![cell(100.0)],
                b: vec![cell(100.0)],
            },
        );
        cells.insert(
            (64 << 20, 1),
            Cell {
                a: vec![cell(2000.0)],
                b: vec![cell(1000.0)],
            },
        );
        cells.insert(
            (64 << 20, 8),
            Cell {
                a: vec![cell(3000.0)],
                b: vec![cell(4000.0)],
            },
        );
        let t = bound_table(("x", "y"), &cells, 2.5, 4.0);
        assert!(!t.contains("| 4096 |"), "small sizes are left out:\n{t}");
        assert!(t.contains("| 67108864 | 1 | 2.50 | 80 % | 40 % |"), "{t}");
        assert!(t.contains("| 67108864 | 8 | 4.00 | 75 % | 100 % |"), "{t}");
    }

    #[test]
    fn median_min_max_cases() {
        type Case<'a> = (&'a [f64], Option<(f64, f64, f64)>);
        let cases: [Case; 4] = [
            (&[], None),
            (&[2.0], Some((2.0, 2.0, 2.0))),
            (&[3.0, 1.0, 2.0], Some((2.0, 1.0, 3.0))),
            (&[4.0, 1.0, 2.0, 3.0], Some((2.5, 1.0, 4.0))),
        ];
        for (xs, want) in cases {
            assert_eq!(median_min_max(xs), want, "{xs:?}");
        }
    }

    #[test]
    fn nginx_conf_has_the_operator_settings() {
        let conf = nginx_conf(Path::new("/p"), Path::new("/w"), 8080, false);
        for want in [
            "sendfile on;",
            "tcp_nopush on;",
            "access_log off;",
            "worker_processes 2;",
            "listen 127.0.0.1:8080;",
            "root /w;",
        ] {
            assert!(conf.contains(want), "missing {want:?} in\n{conf}");
        }
        assert!(!conf.contains("user root"));
    }
}
