//! Side-by-side runs: sluice against nginx, h2o and Caddy (or sluice's splice mode against its
//! copy mode) on the same artifacts, the same machine and the same moment, alternating servers
//! A B C A B C so drift in the machine's state hits all equally. Uploads compare sluice's PUT
//! (digest checked, `fsync = always`, and once more with `fsync = never`) with nginx's WebDAV
//! PUT and with the disk's own bound for durable writes, measured in the same alternation.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::client::{Connection, ErrorKind, ReceiveOptions};
use crate::disk;
use crate::h2load::{self, Transport};
use crate::loopback::{self, LoopbackConfig};
use crate::peers::{self, Peer, TlsListener};
use crate::plot::{plot_svg, Series};
use crate::record::{HostFacts, RunDescription, RunRecord};
use crate::report::hgrm_text;
use crate::request::{Body, Method, Request, RequestSet, Url};
use crate::run::{run, RunConfig, RunResult, Stop};
use crate::sys;

/// Artifact sizes of the standard comparison, bytes: a small object, an odd-sized large one (no
/// alignment luck) and a 64 MiB one.
pub const DEFAULT_SIZES: [u64; 3] = [4096, 17_941_067, 64 << 20];

/// Concurrencies of the standard comparison.
pub const DEFAULT_CONCURRENCIES: [usize; 3] = [1, 8, 20];

/// Which servers are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pairing {
    /// sluice (default mode) against each of [`CompareConfig::peers`].
    SluiceVsPeers,
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
    /// h2o binary. Default `h2o`.
    pub h2o_bin: PathBuf,
    /// Caddy binary. Default `caddy`.
    pub caddy_bin: PathBuf,
    /// The servers sluice is compared with, in alternation order (default: nginx alone).
    pub peers: Vec<Peer>,
    /// Run the GET matrix (off: uploads only).
    pub get: bool,
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
    /// Body sizes of the PUT cells, bytes; empty skips them. sluice's PUTs go to the Bazel CAS
    /// route, so the server checks every body's digest against its key; nginx's (when it is a
    /// peer) to a WebDAV location; the disk bound writes the same bodies.
    pub put_sizes: Vec<usize>,
    /// Connections of the PUT cells.
    pub put_concurrencies: Vec<usize>,
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
        let servers = match self.pairing {
            Pairing::SluiceVsPeers => 1 + self.peers.len(),
            Pairing::SpliceVsCopy => 2,
        };
        let gets = if self.get {
            self.sizes.len() * self.concurrencies.len() * self.repeats * servers
        } else {
            0
        };
        // sluice, sluice with fsync = never, nginx, the disk.
        let puts = self.put_sizes.len() * self.put_concurrencies.len() * self.repeats * 4;
        (self.run_time + self.warmup).mul_f64((gets + puts) as f64)
    }
}

/// What a started server is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sluice,
    Peer(Peer),
}

/// A server process started for the comparison; stopped (SIGTERM, then SIGKILL after 5 s) on drop.
struct Server {
    name: String,
    kind: Kind,
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
        sys::stop_child(&mut self.child, Duration::from_secs(5));
    }
}

/// Picks a free loopback port by binding port 0 and closing it again. Another process could take
/// it in between; the server would then fail to start and the comparison says so.
pub(crate) fn free_port() -> Result<u16, String> {
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

/// Starts sluice; `fsync_never` runs it with `fsync = never` (the PUT comparison's like-for-like
/// row against nginx, which does not sync uploads).
fn start_sluice(
    cfg: &CompareConfig,
    name: &str,
    mode: Option<&str>,
    fsync_never: bool,
) -> Result<Server, String> {
    let port = free_port()?;
    let data = cfg.out_dir.join(format!("{}-data", file_stem(name)));
    std::fs::create_dir_all(&data).map_err(|e| format!("creating {}: {e}", data.display()))?;
    let log = std::fs::File::create(cfg.out_dir.join(format!("{}.log", file_stem(name))))
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
    if fsync_never {
        cmd.env("SLUICE_FSYNC", "never");
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
        kind: Kind::Sluice,
        child,
        port,
        bench_port: port,
    };
    wait_ready(&mut s, "/up", Duration::from_secs(30))?;
    Ok(s)
}

/// The nginx configuration the comparison uses: what an operator would run for static
/// artifacts (sendfile, tcp_nopush, no access log, 2 workers), rooted at `www`, with a WebDAV
/// PUT location under `/put/` for the upload cells: no body size limit, full paths created,
/// bodies received into `client_body_temp_path` under `prefix` (the comparison keeps `prefix`
/// and `www` in one output directory, so one filesystem) and renamed into place. nginx does
/// not fsync an upload.
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
         \x20   location = /up {{ return 200 \"ok\\n\"; }}\n\
         \x20   location /put/ {{ dav_methods PUT; create_full_put_path on; client_max_body_size 0; }}\n\
         \x20 }}\n}}\n",
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
    let as_root = running_as_root();
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
        kind: Kind::Peer(Peer::Nginx),
        child,
        port,
        bench_port,
    };
    wait_ready(&mut s, "/up", Duration::from_secs(15))?;
    Ok(s)
}

/// Whether this process runs as root (effective uid 0).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// The ports of a peer that is not nginx (h2o, Caddy): a plaintext port (which also takes h2c
/// with prior knowledge) and, for a TLS comparison, a TLS port; the measured runs use the
/// latter for TLS and the former otherwise.
fn peer_ports(cfg: &CompareConfig) -> Result<(u16, Option<u16>), String> {
    let port = free_port()?;
    let tls_port = if cfg.transport.tls() {
        Some(free_port()?)
    } else {
        None
    };
    Ok((port, tls_port))
}

/// Starts h2o or Caddy on `www` with a configuration written under `out_dir/{name}/`.
fn start_peer(cfg: &CompareConfig, peer: Peer, www: &Path) -> Result<Server, String> {
    if peer == Peer::Nginx {
        return start_nginx(cfg, www);
    }
    let prefix = cfg.out_dir.join(peer.name());
    std::fs::create_dir_all(&prefix).map_err(|e| format!("creating {}: {e}", prefix.display()))?;
    let (port, tls_port) = peer_ports(cfg)?;
    let (cert, key) = cert_paths(cfg);
    let tls = tls_port.map(|port| TlsListener {
        port,
        cert: &cert,
        key: &key,
    });
    let log =
        std::fs::File::create(prefix.join("stderr.log")).map_err(|e| format!("{peer} log: {e}"))?;
    let mut cmd = match peer {
        Peer::H2o => {
            let conf = prefix.join("h2o.conf");
            let text = peers::h2o_conf(&prefix, www, port, tls, running_as_root());
            std::fs::write(&conf, text).map_err(|e| format!("writing {}: {e}", conf.display()))?;
            let mut cmd = Command::new(&cfg.h2o_bin);
            cmd.arg("-c").arg(conf);
            cmd
        }
        Peer::Caddy => {
            let conf = prefix.join("Caddyfile");
            std::fs::write(&conf, peers::caddyfile(www, port, tls))
                .map_err(|e| format!("writing {}: {e}", conf.display()))?;
            let mut cmd = Command::new(&cfg.caddy_bin);
            cmd.arg("run")
                .arg("--config")
                .arg(conf)
                .arg("--adapter")
                .arg("caddyfile")
                // Caddy keeps state (autosaved config, certificates it would manage) under
                // these; keep it inside the comparison's directory.
                .env("XDG_DATA_HOME", &prefix)
                .env("XDG_CONFIG_HOME", &prefix);
            cmd
        }
        Peer::H2Floor => {
            let exe = std::env::current_exe().map_err(|e| format!("sluice-bench's path: {e}"))?;
            let mut cmd = Command::new(exe);
            cmd.arg("h2-floor")
                .arg("--port")
                .arg(port.to_string())
                .arg("--www")
                .arg(www);
            if let Some(tls) = tls {
                cmd.arg("--tls-port")
                    .arg(tls.port.to_string())
                    .arg("--cert")
                    .arg(tls.cert)
                    .arg("--key")
                    .arg(tls.key);
            }
            cmd
        }
        Peer::Nginx => return start_nginx(cfg, www),
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {peer}: {e} (install it: apt-get install -y {peer})"))?;
    let mut s = Server {
        name: peer.name().into(),
        kind: Kind::Peer(peer),
        child,
        port,
        bench_port: tls_port.unwrap_or(port),
    };
    // `up` is a file in `www` (h2o and Caddy only serve files here).
    wait_ready(&mut s, "/up", Duration::from_secs(30))?;
    Ok(s)
}

/// A name safe as a file name (labels hold spaces and `=`).
fn file_stem(name: &str) -> String {
    name.replace([' ', '/', '='], "_")
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

/// Sends one request per artifact to `server`, on one connection (checking each body's SHA-256
/// when `verify_sha256`): `request` makes it from the artifact's URL, size and body; `failure`
/// says what a failed exchange means.
fn exchange_each(
    server: &Server,
    bodies: &[(u64, Arc<Body>)],
    verify_sha256: bool,
    request: impl Fn(&Url, u64, &Arc<Body>) -> Request,
    failure: impl Fn(u64, ErrorKind) -> String,
) -> Result<(), String> {
    let authority = format!("127.0.0.1:{}", server.port);
    let opts = ReceiveOptions {
        verify_sha256,
        splice: false,
    };
    let mut conn = Connection::connect(&authority, Duration::from_secs(60), opts)
        .map_err(|e| format!("connecting to {}: {e}", server.name))?;
    for (size, body) in bodies {
        let url = Url::parse(&format!(
            "http://{authority}{ARTIFACT_PREFIX}{}",
            artifact_name(*size)
        ))?;
        conn.exchange(&request(&url, *size, body))
            .map_err(|k| failure(*size, k))?;
    }
    Ok(())
}

/// PUTs every artifact to a sluice server and checks the answer is 2xx.
fn upload(server: &Server, bodies: &[(u64, Arc<Body>)]) -> Result<(), String> {
    exchange_each(
        server,
        bodies,
        false,
        |url, _, body| Request::new(Method::Put, url, Some(Arc::clone(body)), None),
        |size, k| format!("PUT of {size} B to {} failed: {}", server.name, k.name()),
    )
}

/// GETs every artifact and checks length and SHA-256 against the generated content.
fn verify_identical(server: &Server, bodies: &[(u64, Arc<Body>)]) -> Result<(), String> {
    exchange_each(
        server,
        bodies,
        true,
        |url, size, body| {
            let req = Request::new(Method::Get, url, None, Some(size));
            let _ = req.expected_sha256.set(body.sha256);
            req
        },
        |size, k| {
            format!("{} served {size} B artifact wrongly ({} error): the servers do not return identical bytes", server.name, k.name())
        },
    )
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

/// Runs `go` once for the warm-up and once measured, counting the server's CPU and sampling its
/// RSS around the measured run (`server` None: the disk bound, no server), and writes the
/// record (`.json`, and `.hgrm` when there is a latency distribution) under `runs/`.
fn measure(
    cfg: &CompareConfig,
    server: Option<&Server>,
    label: String,
    connections: usize,
    mut go: impl FnMut(Duration) -> Result<RunResult, String>,
) -> Result<Measurement, String> {
    if !cfg.warmup.is_zero() {
        go(cfg.warmup)?;
    }
    let started = SystemTime::now();
    let pid = server.map(Server::pid);
    let cpu_before = pid.map_or(0.0, process_tree_cpu_secs);
    let rss = pid.map(RssSampler::start);
    let result = go(cfg.run_time)?;
    let cpu_after = pid.map_or(0.0, process_tree_cpu_secs);
    let server_rss_max_bytes = rss.map_or(0, RssSampler::max_bytes);
    let desc = RunDescription {
        command: std::env::args().collect(),
        label,
        started,
        connections,
        rate_per_sec: None,
        warmup_secs: cfg.warmup.as_secs_f64(),
    };
    let record = RunRecord::new(&desc, &result);
    let stem = cfg.out_dir.join("runs").join(file_stem(&record.label));
    // h2load reports no latency distribution.
    if !result.histogram.is_empty() {
        std::fs::write(stem.with_extension("hgrm"), hgrm_text(&result.histogram))
            .map_err(|e| format!("writing {}: {e}", stem.display()))?;
    }
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

/// One measured GET run of `size` against one server: sluice-bench's client on plaintext,
/// h2load for TLS and HTTP/2.
fn bench_once(
    cfg: &CompareConfig,
    server: &Server,
    size: u64,
    connections: usize,
    label: String,
) -> Result<Measurement, String> {
    let path = format!("{ARTIFACT_PREFIX}{}", artifact_name(size));
    if cfg.transport != Transport::Plain {
        let scheme = if cfg.transport.tls() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{}{path}", server.bench_port);
        if h2load::counted_get(cfg.transport, size) {
            let mut rate: Option<f64> = None;
            return measure(cfg, Some(server), label, connections, |d| {
                counted_run(&mut rate, connections, d, |n| {
                    h2load::run_count(cfg.transport, &url, connections, n, size)
                })
            });
        }
        return measure(cfg, Some(server), label, connections, |d| {
            h2load::run(cfg.transport, &url, connections, d, size)
        });
    }
    let url = format!("http://127.0.0.1:{}{path}", server.port);
    let base = RunConfig {
        connections,
        warmup: Duration::ZERO,
        progress: false,
        ..RunConfig::default()
    };
    measure(cfg, Some(server), label, connections, |d| {
        let mut set = RequestSet::single(&url, Method::Get, 0)?;
        set.requests[0].expected_len = Some(size);
        run(
            set,
            RunConfig {
                stop: Stop::Duration(d),
                ..base.clone()
            },
        )
    })
}

/// Where a server takes a PUT of `body`: sluice's Bazel CAS route (so it checks the body's
/// digest against the key), nginx's WebDAV location.
fn put_path(server: &Server, body: &Body) -> String {
    match server.kind {
        Kind::Sluice => format!("/cas/{}", hex::encode(body.sha256)),
        Kind::Peer(_) => format!("/put/a-{}", body.bytes.len()),
    }
}

/// One measured PUT run of `body` (also in the file `body_file`, for h2load) against one
/// server, or against the disk (`server` None) with [`disk::write_bound`] into `disk_dir`.
fn put_once(
    cfg: &CompareConfig,
    server: Option<&Server>,
    body: &Arc<Body>,
    body_file: &Path,
    disk_dir: &Path,
    connections: usize,
    label: String,
) -> Result<Measurement, String> {
    let Some(s) = server else {
        return measure(cfg, None, label, connections, |d| {
            disk::write_bound(disk_dir, body, connections, d)
        });
    };
    let path = put_path(s, body);
    let size = body.bytes.len() as u64;
    if cfg.transport != Transport::Plain {
        let scheme = if cfg.transport.tls() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{}{path}", s.bench_port);
        // h2load's uploads run a fixed count (see `h2load::put_args`).
        let mut rate: Option<f64> = None;
        return measure(cfg, server, label, connections, |d| {
            counted_run(&mut rate, connections, d, |n| {
                h2load::run_put(cfg.transport, &url, connections, n, size, body_file)
            })
        });
    }
    let url = Url::parse(&format!("http://127.0.0.1:{}{path}", s.port))?;
    measure(cfg, server, label, connections, |d| {
        let set = RequestSet {
            authority: url.authority.clone(),
            requests: vec![Request::new(
                Method::Put,
                &url,
                Some(Arc::clone(body)),
                None,
            )],
            weighted: false,
            once: false,
        };
        run(
            set,
            RunConfig {
                connections,
                progress: false,
                stop: Stop::Duration(d),
                ..RunConfig::default()
            },
        )
    })
}

/// One h2load run of a fixed count, sized to last about `d`: a run given a duration counts only
/// the responses that complete inside it, which for a large body reads the run's length more
/// than the server. The warm-up (`rate` still `None`) doubles the count from one per
/// connection until a run lasts a quarter of the warm-up time, which gives the rate; a
/// measured run asks for about `d` worth at that rate, whole rounds of `connections`.
fn counted_run(
    rate: &mut Option<f64>,
    connections: usize,
    d: Duration,
    run: impl Fn(u64) -> Result<RunResult, String>,
) -> Result<RunResult, String> {
    let c = connections as u64;
    match *rate {
        None => {
            let (mut n, mut spent) = (c, Duration::ZERO);
            loop {
                let r = run(n)?;
                spent += r.elapsed;
                *rate = Some(r.requests_per_sec());
                if r.elapsed * 4 >= d || spent >= d {
                    return Ok(r);
                }
                n = n.saturating_mul(2);
            }
        }
        Some(per_sec) => {
            let want = (per_sec * d.as_secs_f64() / c as f64).ceil().max(1.0);
            run(c.saturating_mul(want as u64))
        }
    }
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
    let runs = cells.values().flat_map(|c| c.a.iter().chain(&c.b));
    list_failures(
        &mut out,
        runs,
        "No request failed in any run.",
        "Runs with failed requests:",
    );
    out
}

/// Appends the runs among `runs` in which requests failed, with their errors by kind, under
/// `heading`; or `none` when there are none.
fn list_failures<'a>(
    out: &mut String,
    runs: impl Iterator<Item = &'a Measurement>,
    none: &str,
    heading: &str,
) {
    let errors: Vec<String> = runs
        .filter(|m| m.record.errors.values().sum::<u64>() > 0)
        .map(|m| format!("{}: {:?}", m.record.label, m.record.errors))
        .collect();
    if errors.is_empty() {
        let _ = writeln!(out, "\n{none}");
    } else {
        let _ = writeln!(out, "\n{heading}\n");
        for e in errors {
            let _ = writeln!(out, "- {e}");
        }
    }
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

/// Measurements of one (size, concurrency) cell per server, in the servers' order; each
/// server's in repeat order.
pub type Runs = BTreeMap<(u64, usize), Vec<Vec<Measurement>>>;

fn median_of(ms: &[Measurement], f: fn(&Measurement) -> f64) -> Option<f64> {
    let v: Vec<f64> = ms.iter().map(f).collect();
    median_min_max(&v).map(|m| m.0)
}

/// The metrics of a several-server table: req/s for small bodies and MB/s for bodies of 1 MiB
/// or more (each is the other times the size), and p99 where the client measured latency;
/// the flag says whether higher is better.
fn several_metrics(size: u64, with_latency: bool) -> Vec<(Metric, bool)> {
    let mut v: Vec<(Metric, bool)> = if size < 1 << 20 {
        vec![(("req/s", |m| m.record.requests_per_sec), true)]
    } else {
        vec![(("MB/s", |m| m.record.mb_per_sec), true)]
    };
    if with_latency {
        v.push((("p99 ms", |m| m.record.latency.p99_ms), false));
    }
    v
}

/// The table of sluice (`names[0]`) against several peers (`names[1..]`): each server's median
/// per cell, the best peer (highest throughput, lowest p99), and sluice's median over the best
/// peer's and over nginx's (a ratio of medians).
pub fn peers_table(names: &[String], runs: &Runs, with_latency: bool) -> String {
    let mut out = String::new();
    let nginx = names.iter().position(|n| n == "nginx");
    let _ = writeln!(
        out,
        "| size (B) | c | metric | {} | best peer | {} / best | {} / nginx |",
        names.join(" | "),
        names[0],
        names[0]
    );
    let _ = writeln!(
        out,
        "|---:|---:|---|{}---|---:|---:|",
        "---:|".repeat(names.len())
    );
    for ((size, c), per_server) in runs {
        for ((metric, f), higher_better) in several_metrics(*size, with_latency) {
            let medians: Vec<Option<f64>> = per_server.iter().map(|ms| median_of(ms, f)).collect();
            let best = (1..medians.len())
                .filter(|i| names[*i] != Peer::H2Floor.name())
                .filter_map(|i| medians[i].map(|m| (i, m)))
                .reduce(|x, y| {
                    let y_better = if higher_better { y.1 > x.1 } else { y.1 < x.1 };
                    if y_better {
                        y
                    } else {
                        x
                    }
                });
            let ratio = |other: Option<f64>| match (medians[0], other) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "–".to_string(),
            };
            let cols: Vec<String> = medians
                .iter()
                .map(|m| m.map_or("–".to_string(), fmt_num))
                .collect();
            let _ = writeln!(
                out,
                "| {size} | {c} | {metric} | {} | {} | {} | {} |",
                cols.join(" | "),
                best.map_or("–", |(i, _)| names[i].as_str()),
                ratio(best.map(|b| b.1)),
                ratio(nginx.and_then(|i| medians[i])),
            );
        }
    }
    out
}

/// The upload table: each participant's median per cell (servers and the disk bound, whose
/// column is `names[bound]`), each sluice row's throughput over nginx's, and sluice's
/// (`names[0]`) MB/s as a share of the disk bound.
pub fn put_table(names: &[String], runs: &Runs, bound: usize, with_latency: bool) -> String {
    let mut out = String::new();
    let nginx = names.iter().position(|n| n == "nginx");
    let sluices: Vec<usize> = (0..names.len())
        .filter(|&i| names[i].starts_with("sluice"))
        .collect();
    let mut head = format!("| size (B) | c | metric | {} |", names.join(" | "));
    let mut rule = format!("|---:|---:|---|{}", "---:|".repeat(names.len()));
    if nginx.is_some() {
        for &i in &sluices {
            head.push_str(&format!(" {} / nginx |", names[i]));
            rule.push_str("---:|");
        }
    }
    head.push_str(&format!(" {} / {} |", names[0], names[bound]));
    rule.push_str("---:|");
    let _ = writeln!(out, "{head}\n{rule}");
    for ((size, c), per_server) in runs {
        let mut metrics: Vec<Metric> = vec![
            ("req/s", |m| m.record.requests_per_sec),
            ("MB/s", |m| m.record.mb_per_sec),
        ];
        if with_latency {
            metrics.push(("p99 ms", |m| m.record.latency.p99_ms));
        }
        for (metric, f) in metrics {
            let medians: Vec<Option<f64>> = per_server.iter().map(|ms| median_of(ms, f)).collect();
            let cols: Vec<String> = medians
                .iter()
                .map(|m| m.map_or("–".to_string(), fmt_num))
                .collect();
            let mut row = format!("| {size} | {c} | {metric} | {} |", cols.join(" | "));
            let ratio = |a: Option<f64>, b: Option<f64>, percent: bool| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 && percent => format!("{:.0} %", 100.0 * a / b),
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "–".to_string(),
            };
            let throughput = metric != "p99 ms";
            if let Some(n) = nginx {
                for &i in &sluices {
                    let r = if throughput {
                        ratio(medians[i], medians[n], false)
                    } else {
                        "–".to_string()
                    };
                    row.push_str(&format!(" {r} |"));
                }
            }
            let share = if throughput {
                ratio(medians[0], medians[bound], true)
            } else {
                "–".to_string()
            };
            row.push_str(&format!(" {share} |"));
            let _ = writeln!(out, "{row}");
        }
    }
    out
}

/// Runs the whole comparison and returns the Markdown report (also written to
/// `out_dir/table.md`).
pub fn compare(cfg: &CompareConfig) -> Result<String, String> {
    if cfg.repeats == 0 || cfg.sizes.is_empty() || cfg.concurrencies.is_empty() {
        return Err("repeats, sizes and concurrencies must not be empty".into());
    }
    if cfg.put_concurrencies.is_empty() && !cfg.put_sizes.is_empty() {
        return Err("PUT concurrencies must not be empty".into());
    }
    let mkdir =
        |p: &Path| std::fs::create_dir_all(p).map_err(|e| format!("creating {}: {e}", p.display()));
    mkdir(&cfg.out_dir.join("runs"))?;
    let www = cfg.out_dir.join("www");
    let dir = www.join(ARTIFACT_PREFIX.trim_matches('/'));
    mkdir(&dir)?;
    // h2o and Caddy serve only files here: their readiness check GETs this one.
    std::fs::write(www.join("up"), "ok\n").map_err(|e| format!("writing www/up: {e}"))?;
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
    let bound = if cfg.loopback_bound && cfg.get {
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
    let servers: Vec<Server> = match cfg.pairing {
        Pairing::SluiceVsPeers => {
            let mut v = vec![start_sluice(cfg, "sluice", None, false)?];
            for &p in &cfg.peers {
                v.push(start_peer(cfg, p, &www)?);
            }
            v
        }
        Pairing::SpliceVsCopy => vec![
            start_sluice(cfg, "sluice-splice", Some("splice"), false)?,
            start_sluice(cfg, "sluice-copy", Some("copy"), false)?,
        ],
    };
    let names: Vec<String> = servers.iter().map(|s| s.name.clone()).collect();

    let mut idle = Vec::new();
    let mut cells: Runs = BTreeMap::new();
    if cfg.get {
        for s in servers.iter().filter(|s| s.kind == Kind::Sluice) {
            upload(s, &bodies)?;
        }
        for s in &servers {
            verify_identical(s, &bodies)?;
        }
        eprintln!(
            "sluice-bench compare: {} return identical bytes; about {:.0} s of runs follow",
            names.join(", "),
            cfg.planned_time().as_secs_f64()
        );
        if cfg.idle_connections > 0 {
            let smallest = cfg.sizes.iter().copied().min().unwrap_or(0);
            for s in &servers {
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
        for &size in &cfg.sizes {
            for &c in &cfg.concurrencies {
                let cell = cells
                    .entry((size, c))
                    .or_insert_with(|| servers.iter().map(|_| Vec::new()).collect());
                for r in 0..cfg.repeats {
                    for (server, into) in servers.iter().zip(cell.iter_mut()) {
                        let label = format!("{} {size}B c{c} r{r}", server.name);
                        let m = bench_once(cfg, server, size, c, label)?;
                        eprintln!(
                            "  {:<32} {:>10.1} req/s {:>9.1} MB/s  p99 {:.3} ms  cpu {:.3} s/GB  load {}",
                            m.record.label,
                            m.record.requests_per_sec,
                            m.record.mb_per_sec,
                            m.record.latency.p99_ms,
                            m.cpu_secs_per_gb(),
                            load_average()
                        );
                        into.push(m);
                    }
                }
                // h2load reports no latency distribution to plot.
                if cfg.transport == Transport::Plain {
                    let series: Vec<Series> = cell
                        .iter()
                        .flatten()
                        .map(|m| Series {
                            label: m.record.label.clone(),
                            rows: m.record.percentiles.clone(),
                        })
                        .collect();
                    let svg = cfg.out_dir.join(format!("latency-{size}B-c{c}.svg"));
                    plot_svg(&series, &format!("{size} B, c={c}"), &svg)?;
                }
            }
        }
    }

    // PUT: sluice to /cas/{sha256} (digest checked) with its default fsync = always and again
    // with fsync = never, nginx's WebDAV PUT when nginx is a peer, and the disk's own bound,
    // alternating per repeat like the GET cells.
    let mut put_cells: Runs = BTreeMap::new();
    let mut put_names: Vec<String> = Vec::new();
    if !cfg.put_sizes.is_empty() {
        let no_fsync = match cfg.pairing {
            Pairing::SluiceVsPeers => Some(start_sluice(cfg, "sluice fsync=never", None, true)?),
            Pairing::SpliceVsCopy => None,
        };
        let mut takers: Vec<&Server> = servers.iter().filter(|s| s.kind == Kind::Sluice).collect();
        takers.extend(no_fsync.as_ref());
        takers.extend(servers.iter().filter(|s| s.kind == Kind::Peer(Peer::Nginx)));
        put_names = takers.iter().map(|s| s.name.clone()).collect();
        put_names.push("disk bound".into());
        let disk_dir = cfg.out_dir.join("disk-bound");
        for &size in &cfg.put_sizes {
            let body = Arc::new(Body::generate(size));
            let body_file = cfg.out_dir.join(format!("put-body-{size}"));
            std::fs::write(&body_file, &body.bytes)
                .map_err(|e| format!("writing {}: {e}", body_file.display()))?;
            for &c in &cfg.put_concurrencies {
                let cell = put_cells
                    .entry((size as u64, c))
                    .or_insert_with(|| put_names.iter().map(|_| Vec::new()).collect());
                for r in 0..cfg.repeats {
                    let participants = takers.iter().map(|s| Some(*s)).chain([None]);
                    for (server, into) in participants.zip(cell.iter_mut()) {
                        let name = server.map_or("disk bound", |s| s.name.as_str());
                        let label = format!("{name} PUT {size}B c{c} r{r}");
                        let m = put_once(cfg, server, &body, &body_file, &disk_dir, c, label)?;
                        eprintln!(
                            "  {:<40} {:>10.1} req/s {:>9.1} MB/s  p99 {:.3} ms  errors {}  load {}",
                            m.record.label,
                            m.record.requests_per_sec,
                            m.record.mb_per_sec,
                            m.record.latency.p99_ms,
                            m.record.errors.values().sum::<u64>(),
                            load_average()
                        );
                        into.push(m);
                    }
                }
            }
        }
    }

    let host = HostFacts::collect();
    let mut report = String::new();
    let mut alternating = Vec::new();
    if cfg.get {
        alternating.push(names.join(", "));
    }
    if !put_names.is_empty() {
        alternating.push(format!("PUT: {}", put_names.join(", ")));
    }
    let _ = writeln!(
        report,
        "Machine: {} ({} cores), kernel {}, host {}. Runs: {} s measured after {} s warm-up, {} repeats, alternating {}. Load average at the end: {}.",
        host.cpu_model,
        host.cores,
        host.kernel,
        host.hostname,
        cfg.run_time.as_secs_f64(),
        cfg.warmup.as_secs_f64(),
        cfg.repeats,
        alternating.join("; "),
        load_average()
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
    let transport_note = format!(
        "{}{}{}",
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
    if cfg.get {
        let _ = writeln!(report, "GET runs: {transport_note}.");
        // The full two-server table: sluice against nginx (or the first peer).
        let other = names.iter().position(|n| n == "nginx").unwrap_or(1);
        let pair = |per_server: &Vec<Vec<Measurement>>| Cell {
            a: per_server[0].clone(),
            b: per_server.get(other).cloned().unwrap_or_default(),
        };
        let pairs: BTreeMap<(u64, usize), Cell> =
            cells.iter().map(|(k, v)| (*k, pair(v))).collect();
        if names.len() > 2 {
            report.push_str("\nAll servers (medians; the ratios are of medians):\n\n");
            report.push_str(&peers_table(
                &names,
                &cells,
                cfg.transport == Transport::Plain,
            ));
            let _ = writeln!(report, "\n{} against {} in full:", names[0], names[other]);
        }
        report.push('\n');
        report.push_str(&markdown_table((&names[0], &names[other]), &pairs));
        if let Some((one, many)) = bound {
            report.push('\n');
            report.push_str(&bound_table(
                (&names[0], &names[other]),
                &pairs,
                one.gb_per_sec,
                many.gb_per_sec,
            ));
        }
    }
    if !put_cells.is_empty() {
        let _ = writeln!(
            report,
            "\nPUT runs: {transport_note}. sluice PUTs to /cas/{{sha256}} (the server checks the body's digest) with its default fsync = always (fdatasync of the file, fsync of the directory, before the 2xx) and, as `sluice fsync=never`, without; nginx PUTs with WebDAV (`dav_methods PUT`, temp file in `client_body_temp_path` on the same filesystem, then rename), which never fsyncs. The disk bound: as many writers as connections, each writing the body to a new file, fdatasync, rename over the last (no server, no network). Every PUT of a cell goes to one key.\n"
        );
        report.push_str(&put_table(
            &put_names,
            &put_cells,
            put_names.len() - 1,
            cfg.transport == Transport::Plain,
        ));
        list_failures(
            &mut report,
            put_cells.values().flatten().flatten(),
            "No PUT failed in any run.",
            "PUT runs with failed requests:",
        );
    }
    std::fs::write(cfg.out_dir.join("table.md"), &report)
        .map_err(|e| format!("writing table.md: {e}"))?;
    Ok(report)
}

/// The 1-, 5- and 15-minute load averages, as `/proc/loadavg` gives them.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
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
            let mut m = one_request_a_second();
            m.record.mb_per_sec = mb_per_sec;
            m
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

    /// The measurement of a run with one request of one byte in one second; each test sets
    /// the figures it reads.
    fn one_request_a_second() -> Measurement {
        let result = crate::run::RunResult {
            requests_ok: 1,
            body_bytes: 1,
            elapsed: Duration::from_secs(1),
            connects: 1,
            ..crate::run::RunResult::default()
        };
        let desc = RunDescription {
            command: Vec::new(),
            label: "t".into(),
            started: SystemTime::now(),
            connections: 1,
            rate_per_sec: None,
            warmup_secs: 0.0,
        };
        Measurement {
            record: RunRecord::new(&desc, &result),
            server_cpu_secs: 1.0,
            server_rss_max_bytes: 0,
        }
    }

    fn measurement(requests_per_sec: f64, mb_per_sec: f64, p99_ms: f64) -> Measurement {
        let mut m = one_request_a_second();
        m.record.requests_per_sec = requests_per_sec;
        m.record.mb_per_sec = mb_per_sec;
        m.record.latency.p99_ms = p99_ms;
        m
    }

    fn owned(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn peers_table_names_the_best_peer_and_both_ratios() {
        let names = owned(&["sluice", "nginx", "h2o", "caddy"]);
        let runs_of = |req_s: [f64; 3], p99: f64| {
            req_s
                .iter()
                .map(|&r| measurement(r, r * 0.004, p99))
                .collect::<Vec<_>>()
        };
        let mut runs: Runs = BTreeMap::new();
        runs.insert(
            (4096, 8),
            vec![
                runs_of([60.0, 50.0, 70.0], 1.0),
                runs_of([40.0, 40.0, 40.0], 2.0),
                runs_of([80.0, 90.0, 100.0], 0.5),
                runs_of([10.0, 10.0, 10.0], 4.0),
            ],
        );
        runs.insert(
            (64 << 20, 1),
            vec![
                vec![measurement(1.0, 3000.0, 9.0)],
                vec![measurement(1.0, 2000.0, 9.0)],
                vec![measurement(1.0, 1000.0, 9.0)],
                vec![measurement(1.0, 2500.0, 9.0)],
            ],
        );
        let t = peers_table(&names, &runs, true);
        // Medians 60 / 40 / 90 / 10: h2o is best, sluice is 0.67 of it and 1.50 of nginx.
        assert!(
            t.contains("| 4096 | 8 | req/s | 60.00 | 40.00 | 90.00 | 10.00 | h2o | 0.67 | 1.50 |"),
            "{t}"
        );
        // Lowest p99 is best.
        assert!(
            t.contains("| 4096 | 8 | p99 ms | 1.00 | 2.00 | 0.500 | 4.00 | h2o | 2.00 | 0.50 |"),
            "{t}"
        );
        // Large bodies are compared in MB/s, not req/s.
        assert!(
            t.contains("| 67108864 | 1 | MB/s | 3000 | 2000 | 1000 | 2500 | caddy | 1.20 | 1.50 |"),
            "{t}"
        );
        assert!(!t.contains("| 67108864 | 1 | req/s"), "{t}");
        assert!(!peers_table(&names, &runs, false).contains("p99"));
    }

    #[test]
    fn the_h2_floor_is_never_the_best_peer() {
        let names = owned(&["sluice", "nginx", "h2-floor"]);
        let mut runs: Runs = BTreeMap::new();
        runs.insert(
            (4096, 8),
            vec![
                vec![measurement(60.0, 0.24, 1.0)],
                vec![measurement(40.0, 0.16, 2.0)],
                vec![measurement(90.0, 0.36, 0.5)],
            ],
        );
        let t = peers_table(&names, &runs, false);
        assert!(
            t.contains("| 4096 | 8 | req/s | 60.00 | 40.00 | 90.00 | nginx | 1.50 | 1.50 |"),
            "{t}"
        );
    }

    #[test]
    fn put_table_gives_ratios_to_nginx_and_the_disk_bound() {
        let names = owned(&["sluice", "sluice fsync=never", "nginx", "disk bound"]);
        let mut runs: Runs = BTreeMap::new();
        runs.insert(
            (64 << 20, 8),
            vec![
                vec![measurement(10.0, 700.0, 1.0)],
                vec![measurement(12.0, 840.0, 1.0)],
                vec![measurement(14.0, 1000.0, 1.0)],
                vec![measurement(16.0, 1000.0, 1.0)],
            ],
        );
        let t = put_table(&names, &runs, 3, false);
        assert!(t.starts_with("| size (B) | c | metric | sluice | sluice fsync=never | nginx | disk bound | sluice / nginx | sluice fsync=never / nginx | sluice / disk bound |"), "{t}");
        assert!(
            t.contains("| 67108864 | 8 | MB/s | 700 | 840 | 1000 | 1000 | 0.70 | 0.84 | 70 % |"),
            "{t}"
        );
        assert!(!t.contains("p99"), "{t}");
        // Without nginx (a comparison of sluice's modes) only the disk ratio is given.
        let no_nginx = owned(&["sluice-splice", "disk bound"]);
        let mut runs: Runs = BTreeMap::new();
        runs.insert(
            (4096, 1),
            vec![
                vec![measurement(1.0, 5.0, 1.0)],
                vec![measurement(1.0, 10.0, 1.0)],
            ],
        );
        let t = put_table(&no_nginx, &runs, 1, true);
        assert!(
            t.contains("| 4096 | 1 | MB/s | 5.00 | 10.00 | 50 % |"),
            "{t}"
        );
        assert!(t.contains("| 4096 | 1 | p99 ms | 1.00 | 1.00 | – |"), "{t}");
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
            "location /put/ { dav_methods PUT; create_full_put_path on; client_max_body_size 0; }",
            "client_body_temp_path /p/client_body;",
        ] {
            assert!(conf.contains(want), "missing {want:?} in\n{conf}");
        }
        assert!(!conf.contains("user root"));
    }
}
