//! The upload burst of a cold CI fleet: many distinct CAS blobs of mixed sizes (by default
//! 10,000 from 1 KiB to 1 MiB, log-uniform, so most are small and most bytes are in the large
//! ones) PUT once each over a fixed number of keep-alive connections, as fast as the server
//! acknowledges them. Each repeat runs, alternating, the disk's own bound for the same blobs
//! (as many writer threads as connections; each blob a new file, written, `fdatasync`ed and
//! renamed into place), then every sluice binary given (a "before" and an "after" build in the
//! same run) alone and with two peers replicating every write (three nodes on loopback, each
//! listing the other two). Every sluice runs with `fsync = always` on a fresh data directory on
//! the disk under test. With peers, the figures are the rate the client saw acknowledged and
//! the time until both peers held every blob.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::compare::{free_port, load_average, median_min_max};
use crate::report::{new_latency_histogram, record_latency_us, LatencyHistogram, LatencySummary};
use crate::sys;

/// Bytes of each blob before its slice of the shared pool: the seed and the blob's index, which
/// make every blob (and so every CAS key) distinct.
const PREFIX_BYTES: usize = 16;

/// The peer secret the three nodes of a peered cell share.
const PEER_SECRET: &str = "burst-peer-secret-0123456789abcdef";

/// How long the peers of a cell may take to hold every blob after the burst.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(600);

/// What to run.
#[derive(Debug, Clone)]
pub struct BurstConfig {
    /// The sluice binaries to measure, each with a label (`after`, `before`, ...).
    pub sluice: Vec<(String, PathBuf)>,
    /// Distinct blobs per burst.
    pub blobs: usize,
    /// Smallest and largest blob, bytes.
    pub size_min: u64,
    pub size_max: u64,
    /// Client connections (and disk-bound writers).
    pub connections: usize,
    /// Rounds of every cell.
    pub repeats: usize,
    /// Run each sluice alone.
    pub alone: bool,
    /// Run each sluice with two peers.
    pub peers: bool,
    /// Where data directories, logs and the table go (on the disk under test).
    pub out_dir: PathBuf,
    /// Seed of the blob sizes and contents.
    pub seed: u64,
    /// How long to wait after a cell's files are deleted (see `forget_deleted`).
    pub settle: Duration,
}

/// The blobs of a burst: sizes, digests and where their bytes come from.
pub struct Blobs {
    seed: u64,
    pool: Vec<u8>,
    items: Vec<Blob>,
}

#[derive(Clone, Copy)]
struct Blob {
    len: usize,
    pool_at: usize,
    sha256: [u8; 32],
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Blobs {
    /// `count` blobs with sizes log-uniform in `[min, max]` (at least [`PREFIX_BYTES`]).
    pub fn generate(count: usize, min: u64, max: u64, seed: u64) -> Blobs {
        let min = min.max(PREFIX_BYTES as u64);
        let max = max.max(min);
        let mut rng = XorShift(seed ^ 0x9E37_79B9_7F4A_7C15 | 1);
        let pool_len = usize::try_from(max).unwrap_or(usize::MAX).saturating_mul(2);
        let mut pool = Vec::with_capacity(pool_len);
        while pool.len() < pool_len {
            pool.extend_from_slice(&rng.next().to_le_bytes());
        }
        pool.truncate(pool_len);
        let (ln_min, ln_max) = ((min as f64).ln(), (max as f64).ln());
        let mut blobs = Blobs {
            seed,
            pool,
            items: Vec::with_capacity(count),
        };
        for i in 0..count {
            let len = (ln_min + (ln_max - ln_min) * rng.unit()).exp().round() as u64;
            let len = usize::try_from(len.clamp(min, max)).unwrap_or(usize::MAX);
            let room = blobs.pool.len() - (len - PREFIX_BYTES);
            let pool_at = usize::try_from(rng.next() % room as u64).unwrap_or(0);
            let mut blob = Blob {
                len,
                pool_at,
                sha256: [0; 32],
            };
            let (prefix, rest) = blobs.parts(i, &blob);
            let mut h = Sha256::new();
            h.update(prefix);
            h.update(rest);
            blob.sha256 = h.finalize().into();
            blobs.items.push(blob);
        }
        blobs
    }

    /// Blob `i`'s bytes, as its prefix and its slice of the pool.
    fn parts<'a>(&'a self, i: usize, blob: &Blob) -> ([u8; PREFIX_BYTES], &'a [u8]) {
        let mut prefix = [0u8; PREFIX_BYTES];
        prefix[..8].copy_from_slice(&self.seed.to_le_bytes());
        prefix[8..].copy_from_slice(&(i as u64).to_le_bytes());
        (
            prefix,
            &self.pool[blob.pool_at..blob.pool_at + blob.len - PREFIX_BYTES],
        )
    }

    /// Number of blobs.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes over all blobs.
    pub fn total_bytes(&self) -> u64 {
        self.items.iter().map(|b| b.len as u64).sum()
    }

    /// Blob `i`'s CAS path.
    fn path(&self, i: usize) -> String {
        format!("/cas/{}", hex::encode(self.items[i].sha256))
    }
}

/// What one cell measured.
#[derive(Debug)]
pub struct CellResult {
    /// From the first request (or file) to the last acknowledged one.
    pub elapsed: Duration,
    /// Blobs acknowledged (or written durably).
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Requests that failed (non-2xx or a broken connection).
    pub failed: u64,
    /// Per-blob latency, µs.
    pub histogram: LatencyHistogram,
    /// With peers: from the first request until both peers held every blob.
    pub replicated: Option<Duration>,
    /// Load averages before and after.
    pub load: (String, String),
}

impl CellResult {
    /// A cell that took `elapsed`, with nothing counted yet.
    fn started(elapsed: Duration, load_before: String) -> CellResult {
        CellResult {
            elapsed,
            blobs: 0,
            bytes: 0,
            failed: 0,
            histogram: new_latency_histogram(),
            replicated: None,
            load: (load_before, load_average()),
        }
    }

    fn blobs_per_sec(&self) -> f64 {
        self.blobs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The disk's bound for the burst: `writers` threads, each taking the next blob and writing it
/// as a new file in `dir` (create, write, `fdatasync`, rename), as a store that syncs every
/// file would. The files are removed afterwards.
pub fn disk_bound(
    dir: &Path,
    blobs: &Blobs,
    writers: usize,
    settle: Duration,
) -> Result<CellResult, String> {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let load_before = load_average();
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let results: Vec<Result<(LatencyHistogram, u64, u64), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..writers.max(1))
            .map(|w| {
                let next = &next;
                s.spawn(move || {
                    let mut hist = new_latency_histogram();
                    let (mut count, mut bytes) = (0u64, 0u64);
                    let temp = dir.join(format!(".writer-{w}.tmp"));
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(blob) = blobs.items.get(i) else {
                            break;
                        };
                        let t = Instant::now();
                        let (prefix, rest) = blobs.parts(i, blob);
                        let f = fs::File::create(&temp)
                            .map_err(|e| format!("disk bound: creating {}: {e}", temp.display()))?;
                        f.write_all_at(&prefix, 0)
                            .and_then(|()| f.write_all_at(rest, PREFIX_BYTES as u64))
                            .and_then(|()| f.sync_data())
                            .map_err(|e| format!("disk bound: writing {}: {e}", temp.display()))?;
                        drop(f);
                        fs::rename(&temp, dir.join(format!("blob-{i}")))
                            .map_err(|e| format!("disk bound: renaming: {e}"))?;
                        record_latency_us(&mut hist, t.elapsed().as_micros() as u64);
                        count += 1;
                        bytes += blob.len as u64;
                    }
                    Ok((hist, count, bytes))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a disk writer panicked".into()))
            })
            .collect()
    });
    let elapsed = started.elapsed();
    let _ = fs::remove_dir_all(dir);
    forget_deleted(settle);
    let mut cell = CellResult::started(elapsed, load_before);
    for r in results {
        let (hist, count, bytes) = r?;
        cell.histogram
            .add(&hist)
            .map_err(|e| format!("merging histograms: {e}"))?;
        cell.blobs += count;
        cell.bytes += bytes;
    }
    Ok(cell)
}

/// PUTs every blob once to `authority` over `connections` keep-alive connections.
pub fn burst(authority: &str, blobs: &Blobs, connections: usize) -> Result<CellResult, String> {
    let load_before = load_average();
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let results: Vec<(LatencyHistogram, u64, u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..connections.max(1))
            .map(|_| {
                let next = &next;
                s.spawn(move || {
                    let mut hist = new_latency_histogram();
                    let (mut ok, mut bytes, mut failed) = (0u64, 0u64, 0u64);
                    let mut conn: Option<TcpStream> = None;
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(blob) = blobs.items.get(i) else {
                            break;
                        };
                        let t = Instant::now();
                        let sent = put_blob(&mut conn, authority, blobs, i, blob, &mut buf);
                        match sent {
                            Ok(()) => {
                                record_latency_us(&mut hist, t.elapsed().as_micros() as u64);
                                ok += 1;
                                bytes += blob.len as u64;
                            }
                            Err(_) => {
                                failed += 1;
                                conn = None;
                            }
                        }
                    }
                    (hist, ok, bytes, failed)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (new_latency_histogram(), 0, 0, 1))
            })
            .collect()
    });
    let elapsed = started.elapsed();
    let mut cell = CellResult::started(elapsed, load_before);
    for (hist, ok, bytes, failed) in results {
        cell.histogram
            .add(&hist)
            .map_err(|e| format!("merging histograms: {e}"))?;
        cell.blobs += ok;
        cell.bytes += bytes;
        cell.failed += failed;
    }
    Ok(cell)
}

/// One PUT on a keep-alive connection (opened when `conn` is empty). `Err` closes it.
fn put_blob(
    conn: &mut Option<TcpStream>,
    authority: &str,
    blobs: &Blobs,
    i: usize,
    blob: &Blob,
    buf: &mut [u8],
) -> Result<(), String> {
    if conn.is_none() {
        let s = TcpStream::connect(authority).map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        *conn = Some(s);
    }
    let Some(stream) = conn.as_mut() else {
        return Err("no connection".into());
    };
    let (prefix, rest) = blobs.parts(i, blob);
    let mut head = format!(
        "PUT {} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {}\r\n\r\n",
        blobs.path(i),
        blob.len
    )
    .into_bytes();
    head.extend_from_slice(&prefix);
    stream.write_all(&head).map_err(|e| e.to_string())?;
    stream.write_all(rest).map_err(|e| e.to_string())?;
    let (status, body_len, keep_alive, mut filled, head_len) = read_head(stream, buf)?;
    // Skip the (short) body of the reply.
    let mut left = body_len.saturating_sub((filled - head_len) as u64);
    while left > 0 {
        let n = stream.read(buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed inside a reply body".into());
        }
        left = left.saturating_sub(n as u64);
        filled = 0;
    }
    let _ = filled;
    if !keep_alive {
        *conn = None;
    }
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

/// Reads a response head: (status, Content-Length, keep-alive, bytes read, head length).
fn read_head(
    stream: &mut TcpStream,
    buf: &mut [u8],
) -> Result<(u16, u64, bool, usize, usize), String> {
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            return Err("response head too long".into());
        }
        let n = stream.read(&mut buf[filled..]).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before a response".into());
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head_len) =
            resp.parse(&buf[..filled]).map_err(|e| e.to_string())?
        {
            let mut len = 0;
            let mut keep_alive = true;
            for h in resp.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    len = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                } else if h.name.eq_ignore_ascii_case("connection")
                    && h.value.eq_ignore_ascii_case(b"close")
                {
                    keep_alive = false;
                }
            }
            return Ok((resp.code.unwrap_or(0), len, keep_alive, filled, head_len));
        }
    }
}

/// A plain GET with `Connection: close`: the body as text.
fn get_text(authority: &str, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(authority).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out).into_owned();
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(format!("GET {path}: {}", text.lines().next().unwrap_or(""))),
    }
}

/// The sum of a metric's samples in a `/metrics` text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A sluice node of a cell; stopped (SIGTERM, then SIGKILL) on drop.
struct Node {
    child: Child,
    authority: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        sys::stop_child(&mut self.child, Duration::from_secs(10));
    }
}

fn start_node(
    bin: &Path,
    port: u16,
    data: &Path,
    peers: &[u16],
    log: &Path,
) -> Result<Node, String> {
    fs::create_dir_all(data).map_err(|e| format!("creating {}: {e}", data.display()))?;
    let log = fs::File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let err_log = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(data)
        .env("SLUICE_CONNECTIONS_PER_IP_MAX", "0")
        .env("SLUICE_FSYNC", "always");
    if !peers.is_empty() {
        let list: Vec<String> = peers.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        cmd.arg("--peers")
            .arg(list.join(","))
            .env("SLUICE_PEER_SECRET", PEER_SECRET)
            .env("SLUICE_READ_THROUGH", "false");
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let mut node = Node {
        child,
        authority: format!("127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_text(&node.authority, "/up").is_err() {
        if let Ok(Some(status)) = node.child.try_wait() {
            return Err(format!("{} exited at start ({status})", bin.display()));
        }
        if Instant::now() > deadline {
            return Err(format!("{} did not answer /up in 30 s", bin.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(node)
}

/// One sluice cell: a fresh node (and two peers), the burst, and with peers the wait until
/// both hold every blob.
fn sluice_cell(
    cfg: &BurstConfig,
    bin: &Path,
    label: &str,
    with_peers: bool,
    blobs: &Blobs,
) -> Result<CellResult, String> {
    let dir = cfg.out_dir.join(format!(
        "{label}-{}",
        if with_peers { "peers" } else { "alone" }
    ));
    let _ = fs::remove_dir_all(&dir);
    let ports: Vec<u16> = (0..if with_peers { 3 } else { 1 })
        .map(|_| free_port())
        .collect::<Result<_, _>>()?;
    let mut nodes = Vec::new();
    for (n, port) in ports.iter().enumerate() {
        let others: Vec<u16> = ports.iter().copied().filter(|p| p != port).collect();
        nodes.push(start_node(
            bin,
            *port,
            &dir.join(format!("node{n}")),
            &others,
            &cfg.out_dir.join(format!("{label}-node{n}.log")),
        )?);
    }
    if with_peers {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = get_text(&nodes[0].authority, "/metrics")
                .map(|t| metric_sum(&t, "sluice_peer_up"))
                .unwrap_or(0.0);
            if up >= 2.0 {
                break;
            }
            if Instant::now() > deadline {
                return Err("the first node did not see both peers up within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let started = Instant::now();
    let mut cell = burst(&nodes[0].authority, blobs, cfg.connections)?;
    if with_peers {
        let want = cell.blobs as f64;
        let deadline = started + REPLICATION_TIMEOUT;
        loop {
            let held: Vec<f64> = nodes[1..]
                .iter()
                .map(|n| {
                    get_text(&n.authority, "/metrics")
                        .map(|t| metric_sum(&t, "sluice_store_entries"))
                        .unwrap_or(0.0)
                })
                .collect();
            if held.iter().all(|h| *h >= want) {
                cell.replicated = Some(started.elapsed());
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(nodes);
    let _ = fs::remove_dir_all(&dir);
    forget_deleted(cfg.settle);
    Ok(cell)
}

/// After a cell's files are deleted: sync, drop the clean page cache where allowed (root), and
/// wait `settle`. On ext4 without a journal a new inode is skipped while one freed in the last
/// 60 s sits in the same inode table block (the allocator reads the block to check; 360 s while
/// the block is dirty), so the next cell would otherwise pay for this one's clean-up (the
/// 2,000/s profile in docs/benchmarks.md, issue 27: 30 % of the host's samples; dropping the
/// cache alone left 18-21 % of a burst cell's samples in `recently_deleted`).
fn forget_deleted(settle: Duration) {
    let _ = std::process::Command::new("sync").status();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
    if !settle.is_zero() {
        eprintln!(
            "burst: waiting {} s for the deleted files' inodes to settle",
            settle.as_secs()
        );
        std::thread::sleep(settle);
    }
}

/// Runs every cell `repeats` times, alternating, and returns the Markdown report (also written
/// to `table.md` in the output directory).
pub fn run_burst(cfg: &BurstConfig) -> Result<String, String> {
    fs::create_dir_all(&cfg.out_dir)
        .map_err(|e| format!("creating {}: {e}", cfg.out_dir.display()))?;
    let generated = Instant::now();
    let blobs = Blobs::generate(cfg.blobs, cfg.size_min, cfg.size_max, cfg.seed);
    eprintln!(
        "burst: {} blobs, {:.1} MB, generated in {:.1} s",
        blobs.len(),
        blobs.total_bytes() as f64 / 1e6,
        generated.elapsed().as_secs_f64()
    );
    let mut cells: BTreeMap<String, Vec<CellResult>> = BTreeMap::new();
    let mut order = vec!["disk bound".to_string()];
    for round in 0..cfg.repeats {
        eprintln!("burst: round {} of {}: disk bound", round + 1, cfg.repeats);
        let cell = disk_bound(
            &cfg.out_dir.join("disk-bound"),
            &blobs,
            cfg.connections,
            cfg.settle,
        )?;
        cells.entry("disk bound".into()).or_default().push(cell);
        for (label, bin) in &cfg.sluice {
            for with_peers in [false, true] {
                if (with_peers && !cfg.peers) || (!with_peers && !cfg.alone) {
                    continue;
                }
                let name = format!(
                    "sluice {label}{}",
                    if with_peers { ", 2 peers" } else { "" }
                );
                eprintln!("burst: round {} of {}: {name}", round + 1, cfg.repeats);
                let cell = sluice_cell(cfg, bin, label, with_peers, &blobs)?;
                if !order.contains(&name) {
                    order.push(name.clone());
                }
                cells.entry(name).or_default().push(cell);
            }
        }
    }
    let report = table(cfg, &blobs, &order, &cells);
    fs::write(cfg.out_dir.join("table.md"), &report)
        .map_err(|e| format!("writing table.md: {e}"))?;
    Ok(report)
}

fn fmt_range(xs: &[f64], digits: usize) -> String {
    match median_min_max(xs) {
        Some((med, min, max)) => format!("{med:.digits$} ({min:.digits$}–{max:.digits$})"),
        None => "–".into(),
    }
}

fn table(
    cfg: &BurstConfig,
    blobs: &Blobs,
    order: &[String],
    cells: &BTreeMap<String, Vec<CellResult>>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Burst: {} distinct CAS blobs, {}–{} bytes log-uniform ({:.1} MB in all), {} connections \
         (disk bound: {} writers), {} round(s), medians (min–max).\n",
        blobs.len(),
        cfg.size_min,
        cfg.size_max,
        blobs.total_bytes() as f64 / 1e6,
        cfg.connections,
        cfg.connections,
        cfg.repeats
    );
    let _ = writeln!(
        out,
        "| cell | blobs/s acknowledged | MB/s | p50 ms | p99 ms | failed | blobs/s held by both peers | vs disk bound | load (1-min, before → after) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---|");
    let bound = cells
        .get("disk bound")
        .and_then(|c| median_min_max(&c.iter().map(CellResult::blobs_per_sec).collect::<Vec<_>>()))
        .map(|(m, _, _)| m);
    for name in order {
        let Some(runs) = cells.get(name) else {
            continue;
        };
        let rate: Vec<f64> = runs.iter().map(CellResult::blobs_per_sec).collect();
        let mb: Vec<f64> = runs.iter().map(CellResult::mb_per_sec).collect();
        let p50: Vec<f64> = runs
            .iter()
            .map(|r| LatencySummary::of(&r.histogram).p50_ms)
            .collect();
        let p99: Vec<f64> = runs
            .iter()
            .map(|r| LatencySummary::of(&r.histogram).p99_ms)
            .collect();
        let failed: u64 = runs.iter().map(|r| r.failed).sum();
        let replicated: Vec<f64> = runs
            .iter()
            .filter_map(|r| {
                r.replicated
                    .map(|d| r.blobs as f64 / d.as_secs_f64().max(1e-9))
            })
            .collect();
        let incomplete = runs.iter().filter(|r| r.replicated.is_none()).count();
        let held = if name.contains("peers") {
            let mut s = fmt_range(&replicated, 0);
            if incomplete > 0 {
                let _ = write!(s, " ({incomplete} incomplete)");
            }
            s
        } else {
            "–".into()
        };
        let vs = match (bound, median_min_max(&rate)) {
            (Some(b), Some((m, _, _))) if name != "disk bound" => format!("{:.2}", m / b),
            _ => "–".into(),
        };
        let load: Vec<String> = runs
            .iter()
            .map(|r| {
                format!(
                    "{} → {}",
                    r.load.0.split(' ').next().unwrap_or("?"),
                    r.load.1.split(' ').next().unwrap_or("?")
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {failed} | {held} | {vs} | {} |",
            fmt_range(&rate, 0),
            fmt_range(&mb, 1),
            fmt_range(&p50, 2),
            fmt_range(&p99, 2),
            load.join("; ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_distinct_deterministic_and_within_their_sizes() {
        let a = Blobs::generate(500, 1024, 256 << 10, 7);
        let b = Blobs::generate(500, 1024, 256 << 10, 7);
        assert_eq!(a.len(), 500);
        let mut keys = std::collections::BTreeSet::new();
        for i in 0..a.len() {
            assert_eq!(a.items[i].sha256, b.items[i].sha256, "deterministic");
            assert!((1024..=256 << 10).contains(&a.items[i].len));
            let (prefix, rest) = a.parts(i, &a.items[i]);
            let mut bytes = prefix.to_vec();
            bytes.extend_from_slice(rest);
            assert_eq!(bytes.len(), a.items[i].len);
            assert_eq!(<[u8; 32]>::from(Sha256::digest(&bytes)), a.items[i].sha256);
            keys.insert(a.items[i].sha256);
        }
        assert_eq!(keys.len(), 500, "every blob has its own key");
        // Log-uniform: most blobs are small, most bytes are in the large ones.
        let small = a.items.iter().filter(|b| b.len < 16 * 1024).count();
        assert!(small > 200, "{small} of 500 under 16 KiB");
    }

    #[test]
    fn the_disk_bound_writes_every_blob_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("sluice-burst-disk-{}", std::process::id()));
        let blobs = Blobs::generate(40, 1024, 64 * 1024, 1);
        let cell = disk_bound(&dir, &blobs, 4, Duration::ZERO).unwrap();
        assert_eq!(cell.blobs, 40);
        assert_eq!(cell.bytes, blobs.total_bytes());
        assert_eq!(cell.histogram.len(), 40);
        assert!(!dir.exists());
    }

    #[test]
    fn metric_sums_add_every_sample_of_the_name_only() {
        let text = "# HELP x\nsluice_peer_up{peer=\"a\"} 1\nsluice_peer_up{peer=\"b\"} 1\n\
                    sluice_peer_up_total 5\nsluice_store_entries 42\n";
        assert_eq!(metric_sum(text, "sluice_peer_up"), 2.0);
        assert_eq!(metric_sum(text, "sluice_store_entries"), 42.0);
    }
}
