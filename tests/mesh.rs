//! The replication mesh through real processes: three `sluice serve`
//! nodes on loopback, each listing the others, with separate data dirs.
mod common;
use common::fleet::{Gauge, Ledger};
use common::{http, metric_at as metric, wait_for};

/// This binary's loopback port range: 20000..32000.
fn free_ports(n: usize) -> Vec<u16> {
    common::free_ports_in(20_000, 120, n)
}

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{server, sha256_hex, xorshift_bytes as body, Server};

const SECRET: &str = "mesh-test-secret-0123456789";

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn node(port: u16, data_dir: &Path, peers: &[u16], extra: &[(&str, &str)]) -> Server {
    let peers: Vec<String> = peers.iter().map(|p| addr(*p)).collect();
    let mut b = server()
        .no_tls()
        .listen(&addr(port))
        .data_dir(data_dir)
        .arg("--peers")
        .arg(&peers.join(","))
        .env("SLUICE_PEER_SECRET", SECRET)
        // These tests watch replication deliver: a read-through would
        // answer their polls before it does (tests/readthrough.rs covers it).
        .env("SLUICE_READ_THROUGH", "false");
    for (k, v) in extra {
        b = b.env(k, v);
    }
    b.start()
}

fn status_of(addr: SocketAddr, method: &str, path: &str) -> u16 {
    http(addr, method, path, &[], b"").status
}

/// An artifact: its path on every node and its body.
struct Artifact {
    path: String,
    body: Vec<u8>,
}

fn artifact(i: u64, len: usize) -> Artifact {
    let body = body(i, len);
    let path = match i % 4 {
        0 => format!("/cas/{}", sha256_hex(&body)),
        1 => format!("/ac/{:064x}", i),
        2 => format!("/cache/gradle-{i}"),
        _ => format!("/v1/artifacts/mesh/key-{i}"),
    };
    Artifact { path, body }
}

fn put_ok(addr: SocketAddr, a: &Artifact) {
    let r = http(addr, "PUT", &a.path, &[], &a.body);
    assert!(
        matches!(r.status, 201 | 204),
        "PUT {} -> {}",
        a.path,
        r.status
    );
}

fn holds(addr: SocketAddr, a: &Artifact) -> bool {
    let r = http(addr, "GET", &a.path, &[], b"");
    r.status == 200 && r.body == a.body
}

struct Mesh {
    ports: Vec<u16>,
    dirs: Vec<PathBuf>,
    nodes: Vec<Option<Server>>,
    _tmp: tempfile::TempDir,
}

impl Mesh {
    fn start(n: usize, extra: &[(&str, &str)]) -> Mesh {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ports = free_ports(n);
        let dirs: Vec<PathBuf> = (0..n)
            .map(|i| tmp.path().join(format!("node{i}")))
            .collect();
        let mut mesh = Mesh {
            ports,
            dirs,
            nodes: Vec::new(),
            _tmp: tmp,
        };
        for i in 0..n {
            let s = mesh.spawn(i, extra);
            mesh.nodes.push(Some(s));
        }
        mesh
    }

    fn spawn(&self, i: usize, extra: &[(&str, &str)]) -> Server {
        let peers: Vec<u16> = self
            .ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| *p)
            .collect();
        node(self.ports[i], &self.dirs[i], &peers, extra)
    }

    fn addr(&self, i: usize) -> SocketAddr {
        addr(self.ports[i]).parse().expect("addr")
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut s) = self.nodes[i].take() {
            s.child.kill().expect("SIGKILL");
            let _ = s.child.wait();
        }
    }

    fn restart(&mut self, i: usize, extra: &[(&str, &str)]) {
        let s = self.spawn(i, extra);
        self.nodes[i] = Some(s);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[test]
fn two_hundred_artifacts_written_to_one_node_appear_on_the_others() {
    let mesh = Mesh::start(3, &[]);
    let (a, b, c) = (mesh.addr(0), mesh.addr(1), mesh.addr(2));
    // Mostly small, a few large: 4 KiB .. 256 KiB, five of 1 MiB, three of 20 MB.
    let artifacts: Vec<Artifact> = (0..200u64)
        .map(|i| {
            let len = match i {
                _ if i % 67 == 5 => 20_000_000,
                _ if i % 40 == 7 => 1 << 20,
                _ => 4096 + (i as usize * 1237) % (252 * 1024),
            };
            artifact(i, len)
        })
        .collect();
    let total: usize = artifacts.iter().map(|a| a.body.len()).sum();
    // Each PUT, then B polled until it can read it: the delay from A's 2xx
    // to readable on B.
    let mut delays = Vec::with_capacity(artifacts.len());
    for art in &artifacts {
        put_ok(a, art);
        let acked = Instant::now();
        wait_for(
            &format!("{} on B", art.path),
            Duration::from_secs(30),
            || status_of(b, "HEAD", &art.path) == 200,
        );
        delays.push(acked.elapsed());
    }
    delays.sort();
    println!(
        "replication delay A 2xx -> readable on B over {} artifacts ({} bytes): p50 {:?}, p99 {:?}, max {:?}",
        delays.len(),
        total,
        percentile(&delays, 0.50),
        percentile(&delays, 0.99),
        delays[delays.len() - 1]
    );
    for art in &artifacts {
        wait_for(
            &format!("{} on C", art.path),
            Duration::from_secs(30),
            || holds(c, art),
        );
        assert!(holds(b, art), "{} differs on B", art.path);
    }
    assert_eq!(
        metric(
            a,
            "sluice_replication_sent_requests_total",
            &["result=\"ok\""]
        ),
        400.0
    );
    assert_eq!(metric(a, "sluice_peer_up", &[]), 2.0);
    // Keep-alive: most sends reuse a pooled connection instead of connecting.
    let reused = metric(a, "sluice_replication_connections_reused_total", &[]);
    println!("{reused} of 400 sends reused a pooled connection");
    assert!(reused >= 200.0, "{reused} reused");
    // The status page lists both peers, up, with an empty backlog.
    let status: serde_json::Value =
        serde_json::from_slice(&http(a, "GET", "/status", &[], b"").body).expect("json");
    let peers = status["replication"]["peers"].as_array().expect("peers");
    assert_eq!(peers.len(), 2);
    for p in peers {
        assert_eq!(p["state"], "up");
        assert_eq!(p["backlog"]["entries"], 0);
    }
}

#[test]
fn a_node_killed_before_a_burst_converges_after_restart() {
    let mut mesh = Mesh::start(3, &[]);
    let a = mesh.addr(0);
    let first = artifact(1000, 5000);
    put_ok(a, &first);
    wait_for("first on B", Duration::from_secs(10), || {
        holds(mesh.addr(1), &first)
    });
    mesh.kill(1);
    let burst: Vec<Artifact> = (0..120u64)
        .map(|i| artifact(2000 + i, 2048 + i as usize * 97))
        .collect();
    for art in &burst {
        put_ok(a, art);
    }
    // A delete in the burst travels too.
    let gone = artifact(3003, 100);
    put_ok(a, &gone);
    assert_eq!(http(a, "DELETE", &gone.path, &[], b"").status, 204);
    assert!(metric(a, "sluice_replication_outbox_entries", &["127.0.0.1"]) > 0.0);
    mesh.restart(1, &[]);
    let b = mesh.addr(1);
    let started = Instant::now();
    wait_for("the burst on B", Duration::from_secs(60), || {
        burst.iter().all(|art| holds(b, art))
    });
    println!("B converged {:?} after its restart", started.elapsed());
    assert_eq!(status_of(b, "GET", &gone.path), 404);
    assert!(holds(b, &first));
    // C had them all along.
    for art in &burst {
        assert!(holds(mesh.addr(2), art));
    }
}

/// Small writes queued for a peer go to it in batches (`POST
/// /_peer/v1/batch`, committed together): 600 small writes and a large one
/// written while B is down, a delete among them. When B returns, every
/// write is stored on B exactly once (the stored counter is the count, each
/// GET the bytes), the large one travels alone, the deleted one not at
/// all, and most requests carried many writes.
#[test]
fn writes_queued_for_a_peer_go_in_batches_and_each_lands_once() {
    let mut mesh = Mesh::start(2, &[]);
    let (a, b) = (mesh.addr(0), mesh.addr(1));
    mesh.kill(1);
    let mut writes: Vec<Artifact> = (0..600u64)
        .map(|i| artifact(40_000 + i, 100 + (i as usize * 97) % 8000))
        .collect();
    writes.insert(300, artifact(41_003, 200 * 1024));
    for art in &writes {
        put_ok(a, art);
    }
    // A generic key (i % 4 == 3), written and then deleted.
    let gone = artifact(42_003, 500);
    put_ok(a, &gone);
    assert_eq!(http(a, "DELETE", &gone.path, &[], b"").status, 204);
    mesh.restart(1, &[]);
    let stored = || {
        metric(
            b,
            "sluice_replication_received_requests_total",
            &["result=\"stored\""],
        )
    };
    wait_for("B to store every write", Duration::from_secs(60), || {
        stored() >= writes.len() as f64
    });
    // Nothing more arrives late (a second copy would count as kept).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(stored(), writes.len() as f64);
    for art in &writes {
        assert!(holds(b, art), "{} differs on B", art.path);
    }
    assert_eq!(status_of(b, "GET", &gone.path), 404);
    assert_eq!(
        metric(
            a,
            "sluice_replication_sent_requests_total",
            &["result=\"ok\""]
        ),
        writes.len() as f64 + 1.0,
        "each write (and the delete) acknowledged once"
    );
    let batches = metric(a, "sluice_replication_sent_batches_total", &[]);
    let singles = metric(
        b,
        "sluice_requests_total",
        &["route=\"peer\"", "method=\"PUT\""],
    );
    println!(
        "{} writes went in {batches} batches and {singles} single PUTs",
        writes.len()
    );
    // Small writes go only in batches; the large one and the delete alone.
    assert!(batches >= 600.0 / 64.0, "{batches} batches");
    assert!(
        batches + singles <= writes.len() as f64 / 20.0,
        "{batches} batches and {singles} single PUTs for {} writes: most should go in batches",
        writes.len()
    );
    assert!(
        metric(
            b,
            "sluice_replication_received_batches_total",
            &["result=\"ok\""]
        ) >= batches - 1.0
    );
}

#[test]
fn a_node_killed_mid_replication_finishes_from_its_outbox() {
    let mut mesh = Mesh::start(3, &[]);
    let a = mesh.addr(0);
    wait_for("A to see its peers up", Duration::from_secs(20), || {
        metric(a, "sluice_peer_up", &[]) == 2.0
    });
    let arts: Vec<Artifact> = (0..80u64).map(|i| artifact(4000 + i, 256 * 1024)).collect();
    for art in &arts {
        put_ok(a, art);
    }
    let pending = metric(a, "sluice_replication_outbox_entries", &[]);
    mesh.kill(0);
    println!("at the kill, A's outbox held {pending} entries over both peers");
    let b = mesh.addr(1);
    let on_b_at_kill = arts
        .iter()
        .filter(|art| status_of(b, "HEAD", &art.path) == 200)
        .count();
    println!("at the kill, B held {on_b_at_kill} of {}", arts.len());
    mesh.restart(0, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in [1, 2] {
        let addr = mesh.addr(i);
        while !arts.iter().all(|art| holds(addr, art)) {
            if Instant::now() > deadline {
                let status = http(mesh.addr(0), "GET", "/status", &[], b"");
                let missing = arts.iter().filter(|art| !holds(addr, art)).count();
                panic!(
                    "node {i} misses {missing}; A's status: {}\nA's log: {}",
                    String::from_utf8_lossy(&status.body),
                    mesh.nodes[0]
                        .as_ref()
                        .map(|s| s.stderr())
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `sluice_replication_lag_*` count exactly what a peer lacks (writes and
/// deletes, their bytes, the oldest's age), in `/metrics` and `/status`
/// alike, and read zero only once the peer's own store holds everything.
#[test]
fn the_lag_gauge_counts_what_a_down_peer_lacks_and_nothing_else() {
    let mut mesh = Mesh::start(2, &[("SLUICE_FSYNC", "never")]);
    let (a, b_port) = (mesh.addr(0), mesh.ports[1]);
    let gauge = Gauge::Peer(b_port);
    let mut ledger = Ledger::new(SECRET);
    let early = artifact(8003, 700); // the generic route: it takes DELETE
    put_ok(a, &early);
    ledger.put(&early.path, &early.body);
    ledger.converge(
        "the first write",
        a,
        &gauge,
        mesh.addr(1),
        Duration::from_secs(30),
        Duration::from_secs(5),
    );
    assert_eq!(gauge.read(a), 0.0);
    mesh.kill(1);
    let arts: Vec<Artifact> = (0..40u64)
        .map(|i| artifact(8100 + i, 1000 + 37 * i as usize))
        .collect();
    for art in &arts {
        put_ok(a, art);
        ledger.put(&art.path, &art.body);
    }
    assert_eq!(http(a, "DELETE", &early.path, &[], b"").status, 204);
    ledger.deleted(&early.path);
    let bytes: usize = arts.iter().map(|a| a.body.len()).sum();
    // Whatever A has tried meanwhile (probes, a send that failed and waits
    // for its retry), the count is exact: 40 writes and a delete.
    wait_for("A to find B down", Duration::from_secs(20), || {
        metric(a, "sluice_peer_up", &[]) == 0.0
    });
    assert_eq!(gauge.read(a), 41.0);
    let (lag_bytes, age) = gauge.bytes_and_age(a);
    assert_eq!(lag_bytes, bytes as f64);
    assert!(age > 0.0, "the oldest's age: {age}");
    let status: serde_json::Value =
        serde_json::from_slice(&http(a, "GET", "/status", &[], b"").body).expect("json");
    let peer = &status["replication"]["peers"][0];
    assert_eq!(peer["lag"]["writes"], 41, "{peer}");
    assert_eq!(peer["lag"]["bytes"], bytes as u64, "{peer}");
    // The outbox gauges keep their meaning: entries from B's cursor on.
    assert_eq!(
        metric(
            a,
            "sluice_replication_outbox_entries",
            &[&format!(":{b_port}\"")]
        ),
        41.0
    );
    mesh.restart(1, &[("SLUICE_FSYNC", "never")]);
    let held = ledger.converge(
        "B back",
        a,
        &gauge,
        mesh.addr(1),
        Duration::from_secs(60),
        Duration::from_secs(5),
    );
    println!("B held everything {held:?} after its restart; the gauge then read 0");
    assert_eq!(gauge.bytes_and_age(a), (0.0, 0.0));
}

#[test]
fn a_backlog_past_the_bound_is_repaired_by_anti_entropy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ports = free_ports(2);
    let env = [
        ("SLUICE_REPLICATION_OUTBOX_BYTES_MAX", "4096"),
        ("SLUICE_FSYNC", "never"),
    ];
    let a_node = node(ports[0], &tmp.path().join("a"), &[ports[1]], &env);
    let a = a_node.addr;
    let gauge = Gauge::Peer(ports[1]);
    let mut ledger = Ledger::new(SECRET);
    // B is down: A's backlog for it passes 4 KiB after a few dozen entries.
    let arts: Vec<Artifact> = (0..300u64).map(|i| artifact(5000 + i, 1024)).collect();
    for art in &arts {
        put_ok(a, art);
        ledger.put(&art.path, &art.body);
    }
    assert!(metric(a, "sluice_replication_outbox_overflows_total", &[]) >= 1.0);
    assert!(metric(a, "sluice_replication_outbox_bytes", &[]) <= 4096.0);
    // Out of the outbox, not out of the count: the overflow owes B all 300.
    assert_eq!(gauge.read(a), 300.0);
    assert_eq!(gauge.bytes_and_age(a).0, 300.0 * 1024.0);
    let outbox_disk: u64 = std::fs::read_dir(tmp.path().join("a/.outbox"))
        .expect("outbox dir")
        .map(|e| e.expect("entry").metadata().expect("meta").len())
        .sum();
    assert!(
        outbox_disk <= 3 * 4096,
        "outbox uses {outbox_disk} bytes on disk"
    );
    let b_node = node(ports[1], &tmp.path().join("b"), &[ports[0]], &env);
    let b = b_node.addr;
    // Through the comparison and the repairs the gauge never reads 0 while
    // B lacks one of them.
    ledger.converge(
        "anti-entropy repairing B",
        a,
        &gauge,
        b,
        Duration::from_secs(90),
        Duration::from_secs(5),
    );
    for art in &arts {
        assert!(holds(b, art));
    }
    assert!(metric(a, "sluice_anti_entropy_runs_total", &["result=\"ok\""]) >= 1.0);
    assert!(metric(a, "sluice_anti_entropy_repaired_total", &[]) >= 1.0);
    println!(
        "anti-entropy: {} buckets differing, {} repaired",
        metric(a, "sluice_anti_entropy_buckets_differing_total", &[]),
        metric(a, "sluice_anti_entropy_repaired_total", &[])
    );
}

/// Resident memory and open files of a process (from /proc).
fn rss_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss_kib * 1024, fds)
}

/// PUT `count` small artifacts `/v1/artifacts/ae/k{first..}` over 8
/// connections at once.
fn put_many(a: SocketAddr, first: u64, count: u64) {
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            std::thread::spawn(move || {
                for i in (first + t..first + count).step_by(8) {
                    let path = format!("/v1/artifacts/ae/k{i}");
                    let r = http(a, "PUT", &path, &[], format!("artifact {i}").as_bytes());
                    assert!(matches!(r.status, 201 | 204), "PUT {path} -> {}", r.status);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer");
    }
}

/// Anti-entropy over tens of thousands of entries stays within its memory
/// bound: the differing buckets are compared in pieces of a listing page
/// each, listings come in pages, and the comparison pauses while the
/// peer's queued repairs are over their bound (before, one run queued up
/// to 10,000 repairs at once and listings were answered whole). RSS and
/// open files stay near where they were.
#[test]
fn anti_entropy_over_tens_of_thousands_of_entries_keeps_its_bounds() {
    let env = [
        ("SLUICE_REPLICATION_OUTBOX_BYTES_MAX", "4096"),
        ("SLUICE_FSYNC", "never"),
    ];
    let mut mesh = Mesh::start(2, &env);
    let (a, b_port) = (mesh.addr(0), mesh.ports[1]);
    let gauge = Gauge::Peer(b_port);
    // B holds the first part; then it is away while many more are written.
    let (first, total) = (2_000u64, 20_000u64);
    let writing = Instant::now();
    put_many(a, 0, first);
    wait_for("B to hold the first part", Duration::from_secs(120), || {
        gauge.read(a) == 0.0
    });
    mesh.kill(1);
    put_many(a, first, total - first);
    println!("{total} written in {:?}", writing.elapsed());
    assert!(metric(a, "sluice_replication_outbox_overflows_total", &[]) >= 1.0);
    assert_eq!(
        gauge.read(a),
        (total - first) as f64,
        "owed by the overflow"
    );
    let a_pid = mesh.nodes[0].as_ref().expect("A").child.id();
    let (rss_before, fds_before) = rss_and_fds(a_pid);
    mesh.restart(1, &env);
    let b = mesh.addr(1);
    let started = Instant::now();
    let (mut rss_max, mut fds_max, mut queued_max) = (rss_before, fds_before, 0u64);
    loop {
        let (rss, fds) = rss_and_fds(a_pid);
        rss_max = rss_max.max(rss);
        fds_max = fds_max.max(fds);
        let status: serde_json::Value =
            serde_json::from_slice(&http(a, "GET", "/status", &[], b"").body).expect("json");
        let queued = status["replication"]["peers"][0]["repairs_queued"]
            .as_u64()
            .unwrap_or(0);
        queued_max = queued_max.max(queued);
        if gauge.read(a) == 0.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "not repaired: lag {}, status {status}",
            gauge.read(a)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "repaired {} entries in {:?}: A's RSS {} -> max {} MiB, open files {fds_before} -> max \
         {fds_max}, repairs queued at most {queued_max}",
        total - first,
        started.elapsed(),
        rss_before >> 20,
        rss_max >> 20
    );
    assert!(metric(a, "sluice_anti_entropy_repaired_total", &[]) >= (total - first) as f64);
    assert!(queued_max <= 4096, "{queued_max} repairs queued at once");
    assert!(
        rss_max <= rss_before + (32 << 20),
        "RSS grew from {} to {} MiB",
        rss_before >> 20,
        rss_max >> 20
    );
    // Each repair in flight holds its artifact, a pipe and a connection
    // (16 at most): bounded by the window, not by the entries.
    assert!(
        fds_max <= fds_before + 80,
        "open files {fds_before} -> {fds_max}"
    );
    // And B holds every one (its own store: read-through is off).
    for i in (0..total).step_by(97).chain(total - 50..total) {
        let path = format!("/v1/artifacts/ae/k{i}");
        assert_eq!(status_of(b, "HEAD", &path), 200, "{path} on B");
    }
}

/// A delete that an overflowed peer missed must not come back: the
/// deleting node keeps a tombstone, anti-entropy (run from both sides)
/// carries the delete to the peer instead of copying the old artifact back.
/// Also covers multi-segment keys (ccache's default layout) in anti-entropy.
#[test]
fn a_delete_missed_by_an_overflowed_peer_is_not_resurrected() {
    let env = [
        ("SLUICE_REPLICATION_OUTBOX_BYTES_MAX", "4096"),
        ("SLUICE_ANTI_ENTROPY_INTERVAL_MS", "1000"),
        ("SLUICE_FSYNC", "never"),
    ];
    let mut mesh = Mesh::start(2, &env);
    let (a, b) = (mesh.addr(0), mesh.addr(1));
    let doomed = [
        Artifact {
            path: "/v1/artifacts/ccache/fe/a5c6ltr4q0kut6qjm9545n50fgo5cbi".into(),
            body: body(1, 3000),
        },
        Artifact {
            path: "/v1/artifacts/mesh/doomed".into(),
            body: body(2, 3000),
        },
    ];
    let kept = Artifact {
        path: "/v1/artifacts/ccache/ab/kept".into(),
        body: body(3, 3000),
    };
    for art in doomed.iter().chain([&kept]) {
        put_ok(a, art);
    }
    wait_for("the artifacts on B", Duration::from_secs(20), || {
        doomed.iter().chain([&kept]).all(|art| holds(b, art))
    });
    mesh.kill(1);
    // Overflow A's backlog for B, then delete: B's outbox entries are gone.
    let filler: Vec<Artifact> = (0..60u64).map(|i| artifact(7000 + i, 512)).collect();
    for art in &filler {
        put_ok(a, art);
    }
    assert!(metric(a, "sluice_replication_outbox_overflows_total", &[]) >= 1.0);
    for art in &doomed {
        assert_eq!(http(a, "DELETE", &art.path, &[], b"").status, 204);
    }
    mesh.restart(1, &env);
    wait_for("anti-entropy to repair B", Duration::from_secs(60), || {
        filler
            .iter()
            .all(|art| status_of(b, "HEAD", &art.path) == 200)
            && doomed
                .iter()
                .all(|art| status_of(b, "HEAD", &art.path) == 404)
    });
    // Several more runs in both directions: still deleted on both, and the
    // untouched multi-segment key is still everywhere.
    let runs = metric(b, "sluice_anti_entropy_runs_total", &["result=\"ok\""]);
    wait_for(
        "B's next anti-entropy runs",
        Duration::from_secs(30),
        || metric(b, "sluice_anti_entropy_runs_total", &["result=\"ok\""]) >= runs + 2.0,
    );
    for node in [a, b] {
        for art in &doomed {
            assert_eq!(status_of(node, "GET", &art.path), 404, "{}", art.path);
        }
        assert!(holds(node, &kept));
    }
}

/// Bytes received and not yet read on the established IPv4 connections
/// whose local port is `port` (from /proc/net/tcp): what a stopped server's
/// peers have sent it.
fn bytes_waiting_at(port: u16) -> u64 {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    tcp.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let established = *f.get(3)? == "01";
            let rx = u64::from_str_radix(f.get(4)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && established).then_some(rx)
        })
        .sum()
}

fn signal(server: &Server, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(server.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, sig).expect("kill");
}

/// Shutdown phase 3: a send in flight when SIGTERM comes gets
/// `shutdown_replication_ms` to finish. B is stopped (SIGSTOP) while A
/// sends to it, so the send is in flight for as long as B stays stopped;
/// B continues a second after A's SIGTERM. With a budget the artifact
/// reaches B before A exits; with none A cuts the send and B has nothing
/// (the outbox keeps the entry for A's next start).
#[test]
fn shutdown_gives_sends_in_flight_the_replication_budget() {
    // A budget long enough that a loaded host still finishes the send (A
    // exits as soon as it is answered, so a long budget costs nothing), and
    // within the default grace ceiling (30 s with drain and teardown).
    let cases = [
        ("auto", "18000", true),
        ("auto", "0", false),
        // Without rings the sends run on blocking sender threads.
        ("fallback", "18000", true),
    ];
    for (engine, budget, delivered) in cases {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ports = free_ports(2);
        // Replication in the normal class: on a loaded host (CI runs
        // tests in parallel) the idle class can starve the 32 MiB send
        // past the budget; the budget, not the class, is what is tested.
        let env = [
            ("SLUICE_FSYNC", "never"),
            ("SLUICE_REPLICATION_SCHEDULING", "normal"),
        ];
        let b_node = node(ports[1], &tmp.path().join("b"), &[ports[0]], &env);
        let b = b_node.addr;
        let mut a_node = node(
            ports[0],
            &tmp.path().join("a"),
            &[ports[1]],
            &[
                ("SLUICE_FSYNC", "never"),
                ("SLUICE_REPLICATION_SCHEDULING", "normal"),
                ("SLUICE_SHUTDOWN_REPLICATION_MS", budget),
                ("SLUICE_ENGINE", engine),
                // No probe after the first: one that times out while B is
                // stopped marks it down, and a down peer gets no send. On
                // a loaded host the 32 MiB PUT below can outlast a probe's
                // timeout.
                ("SLUICE_PEER_PROBE_INTERVAL_MS", "3600000"),
            ],
        );
        let a = a_node.addr;
        wait_for("A to see B up", Duration::from_secs(10), || {
            metric(a, "sluice_peer_up", &[]) >= 1.0
        });
        signal(&b_node, rustix::process::Signal::STOP);
        // Larger than the loopback socket buffers, so the body cannot be all written while B is stopped.
        let art = artifact(9001, 32 << 20);
        put_ok(a, &art);
        // SIGTERM only once the send is in flight (B, stopped, cannot answer
        // it): a send not yet started when phase 3 begins is refused and
        // stays in the outbox, which is the other case. `/status` counts a
        // send handed to a ring thread's queue as in flight before the ring
        // starts it; that the body's first bytes wait in B's socket is what
        // says it started (CI once sent SIGTERM in between).
        wait_for("A's send to B in flight", Duration::from_secs(20), || {
            let status: serde_json::Value =
                serde_json::from_slice(&http(a, "GET", "/status", &[], b"").body).expect("json");
            status["replication"]["peers"]
                .as_array()
                .is_some_and(|peers| peers.iter().any(|p| p["in_flight"].as_u64() >= Some(1)))
                && bytes_waiting_at(ports[1]) > 0
        });
        signal(&a_node, rustix::process::Signal::TERM);
        std::thread::sleep(Duration::from_millis(1000));
        signal(&b_node, rustix::process::Signal::CONT);
        let deadline = Instant::now() + Duration::from_secs(40);
        let status = loop {
            if let Some(status) = a_node.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "A did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{engine}, budget {budget}: {status}");
        if delivered {
            assert!(
                holds(b, &art),
                "{engine}: the send in flight did not finish"
            );
        } else {
            std::thread::sleep(Duration::from_millis(500));
            assert_eq!(status_of(b, "HEAD", &art.path), 404);
        }
    }
}

/// A peer that stops reading (frozen: SIGSTOP here; in the field a node
/// whose receiving threads are all busy) does not hold up replication to
/// the others. A's sends to C fill C's sockets and wait; before the body
/// drain was a non-blocking splice on the ring's thread, each waiting send
/// held one of the ring's few io-wq workers, and B's sends queued behind
/// them until C's requests reached their deadline (60 s here). Then C
/// continues and gets every artifact too, each once.
#[test]
fn a_peer_that_stops_reading_does_not_hold_up_the_others() {
    // Without rings the sends run on blocking sender threads, where a
    // waiting send holds a thread: one peer gets only its share of them.
    for engine in ["auto", "fallback"] {
        frozen_peer_case(engine);
    }
}

fn frozen_peer_case(engine: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ports = free_ports(3);
    // Replication in the normal class: on a loaded host (CI runs tests in
    // parallel) the idle class could starve it, and what is measured here
    // is whether one peer holds up another, not the class.
    let quiet = [
        ("SLUICE_FSYNC", "never"),
        ("SLUICE_REPLICATION_SCHEDULING", "normal"),
    ];
    let b_node = node(ports[1], &tmp.path().join("b"), &[], &quiet);
    let c_node = node(ports[2], &tmp.path().join("c"), &[], &quiet);
    let (b, c) = (b_node.addr, c_node.addr);
    let a_node = node(
        ports[0],
        &tmp.path().join("a"),
        &ports[1..],
        &[
            ("SLUICE_FSYNC", "never"),
            ("SLUICE_REPLICATION_SCHEDULING", "normal"),
            ("SLUICE_ENGINE", engine),
            // A stall lasts until C's requests time out: long, so that
            // one cannot pass for progress.
            ("SLUICE_REPLICATION_REQUEST_TIMEOUT_MS", "60000"),
            // No probe after the first: one that times out while C is
            // stopped marks it down, and a down peer gets one send at a
            // time, not a window.
            ("SLUICE_PEER_PROBE_INTERVAL_MS", "3600000"),
        ],
    );
    let a = a_node.addr;
    wait_for("A to see B and C up", Duration::from_secs(10), || {
        metric(a, "sluice_peer_up", &[]) >= 2.0
    });
    signal(&c_node, rustix::process::Signal::STOP);
    // More sends than a ring has io-wq workers (8), each larger than what
    // the loopback socket buffers take while C does not read (about 4 MB).
    let arts: Vec<Artifact> = (0..24).map(|i| artifact(40_000 + i, 6 << 20)).collect();
    for art in &arts {
        put_ok(a, art);
    }
    let started = Instant::now();
    wait_for(
        &format!("{engine}: every artifact on B while C is stopped"),
        Duration::from_secs(30),
        || arts.iter().all(|art| holds(b, art)),
    );
    let took = started.elapsed();
    // C is really stopped with A's sends waiting on it (else the test
    // proves nothing).
    assert!(
        bytes_waiting_at(ports[2]) > 0,
        "{engine}: nothing waits at C"
    );
    assert!(
        took < Duration::from_secs(20),
        "{engine}: B waited {took:?} behind the stopped peer"
    );
    signal(&c_node, rustix::process::Signal::CONT);
    wait_for(
        &format!("{engine}: every artifact on C after it continues"),
        Duration::from_secs(90),
        || arts.iter().all(|art| holds(c, art)),
    );
    // Each was sent and stored once: no retry after a stall.
    let bytes: usize = arts.iter().map(|art| art.body.len()).sum();
    for node in [b, c] {
        assert_eq!(
            metric(node, "sluice_replication_received_bytes_total", &[]) as usize,
            bytes,
            "{engine}, {node}: body bytes received"
        );
    }
}

/// A sender that stops mid-body (frozen, or its network cut) does not hold
/// up the other peers' writes to this node. Eight peer PUTs send their
/// head and a first part of their body to C and then nothing, more than C
/// has receiving threads (4); B's writes to C still land at once. Before a
/// receiving thread read many bodies at once, each stalled body held a
/// thread until `body_read_timeout_ms` (60 s here), and B's waited behind
/// them. The stalled writes are answered 400 once cut, and store nothing.
#[test]
fn a_sender_that_stalls_mid_body_does_not_hold_up_the_others() {
    use std::io::Write as _;
    let tmp = tempfile::tempdir().expect("tempdir");
    let ports = free_ports(2);
    let c_node = node(
        ports[1],
        &tmp.path().join("c"),
        &[],
        &[
            ("SLUICE_FSYNC", "never"),
            ("SLUICE_REPLICATION_SCHEDULING", "normal"),
            ("SLUICE_BODY_READ_TIMEOUT_MS", "60000"),
        ],
    );
    let c = c_node.addr;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    let stalled: Vec<std::net::TcpStream> = (0..8)
        .map(|i| {
            let data = body(50_000 + i, 1 << 20);
            let head = format!(
                "PUT /_peer/v1/put/stall/k{i}/{now_ms}/{} HTTP/1.1\r\nHost: c\r\n\
                 Authorization: SluicePeer {SECRET}\r\nContent-Length: {}\r\n\r\n",
                sha256_hex(&data),
                data.len()
            );
            let mut s = std::net::TcpStream::connect(c).expect("connect");
            s.write_all(head.as_bytes()).expect("head");
            // Past what comes with the head, so the rest is received in
            // the background, and then nothing.
            s.write_all(&data[..256 << 10]).expect("first part");
            s
        })
        .collect();
    // Every stalled body is in C's hands (its first part read).
    wait_for(
        "C to read the stalled bodies' first parts",
        Duration::from_secs(10),
        || bytes_waiting_at(ports[1]) == 0,
    );
    let b_node = node(
        ports[0],
        &tmp.path().join("b"),
        &[ports[1]],
        &[
            ("SLUICE_FSYNC", "never"),
            ("SLUICE_REPLICATION_SCHEDULING", "normal"),
        ],
    );
    let b = b_node.addr;
    let arts: Vec<Artifact> = (0..10).map(|i| artifact(60_000 + i, 2 << 20)).collect();
    for art in &arts {
        put_ok(b, art);
    }
    let started = Instant::now();
    wait_for("B's writes on C", Duration::from_secs(40), || {
        arts.iter().all(|art| holds(c, art))
    });
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "B's writes waited {took:?} behind the stalled bodies"
    );
    // Cut: each stalled write is answered and stores nothing.
    for mut s in stalled {
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut answer = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut answer);
        assert!(
            answer.starts_with(b"HTTP/1.1 400"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    for i in 0..8 {
        assert_eq!(
            status_of(c, "GET", &format!("/v1/artifacts/stall/k{i}")),
            404
        );
    }
}

/// A listener that accepts and resets every connection, counting them.
fn resetting_listener() -> (u16, Arc<AtomicU64>, Arc<AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    l.set_nonblocking(true).expect("nonblocking");
    let accepts = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (count, halt) = (Arc::clone(&accepts), Arc::clone(&stop));
    std::thread::spawn(move || {
        while !halt.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => {
                    count.fetch_add(1, Ordering::Relaxed);
                    // SO_LINGER 0: close sends RST.
                    let _ = rustix::net::sockopt::set_socket_linger(&s, Some(Duration::ZERO));
                    drop(s);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    (port, accepts, stop)
}

#[test]
fn a_cold_start_with_dead_peers_backs_off_and_is_ready_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ports = free_ports(4);
    let (reset_port, accepts, stop) = resetting_listener();
    let peers = [ports[1], ports[2], ports[3], reset_port];
    let env = [("SLUICE_FSYNC", "never")];
    let dir = tmp.path().join("a");
    let mut first = node(ports[0], &dir, &peers, &env);
    let arts = 2000u64;
    for i in 0..arts {
        let path = format!("/v1/artifacts/cold/k{i}");
        assert_eq!(http(first.addr, "PUT", &path, &[], b"x").status, 201);
    }
    first.child.kill().expect("SIGKILL");
    let _ = first.child.wait();
    drop(first);
    let accepts_before = accepts.load(Ordering::Relaxed);

    let started = Instant::now();
    let a_node = node(ports[0], &dir, &peers, &env);
    let a = a_node.addr;
    assert_eq!(status_of(a, "GET", "/ready"), 200);
    let ready_after = started.elapsed();
    println!(
        "ready {ready_after:?} after spawn, with {} entries pending per peer",
        arts
    );
    assert!(ready_after < Duration::from_secs(5));
    let pending = metric(
        a,
        "sluice_replication_outbox_entries",
        &[&format!(":{reset_port}\"")],
    );
    assert_eq!(
        pending, arts as f64,
        "every entry survived the kill: {pending}"
    );

    let window = Duration::from_secs(7);
    std::thread::sleep(window.saturating_sub(started.elapsed()));
    let observed = started.elapsed();
    // Backoff: attempts at about 0, 2, 6 s (then 14): three in 7 s, four at
    // most with jitter and scheduling slack, whatever the 2000 entries.
    for p in peers {
        let label = format!("peer=\"127.0.0.1:{p}\"");
        let attempts = metric(a, "sluice_replication_connect_attempts_total", &[&label]);
        let retries = metric(a, "sluice_replication_connect_retries_total", &[&label]);
        println!("peer {p}: {attempts} connects ({retries} immediate retries) in {observed:?}");
        assert!(
            attempts - retries >= 2.0 && attempts - retries <= 4.0,
            "peer {p}: {attempts} - {retries}"
        );
        assert!(
            retries <= attempts - retries,
            "at most one immediate retry per attempt"
        );
        assert!(
            metric(a, "sluice_peer_backoff_seconds", &[&label]) > 0.0 || attempts - retries >= 3.0
        );
    }
    let resets = accepts.load(Ordering::Relaxed) - accepts_before;
    println!("the resetting listener accepted {resets} connections in {observed:?}");
    assert!((2..=4).contains(&resets), "{resets} accepts");
    assert_eq!(metric(a, "sluice_peer_up", &[]), 0.0);
    assert_eq!(status_of(a, "GET", "/ready"), 200);
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn the_peer_api_needs_the_secret_and_identical_probes_change_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ports = free_ports(2);
    let env = [("SLUICE_PEER_PROBE_INTERVAL_MS", "100")];
    let a_node = node(ports[0], &tmp.path().join("a"), &[ports[1]], &env);
    let b_node = node(ports[1], &tmp.path().join("b"), &[ports[0]], &env);
    let (a, b) = (a_node.addr, b_node.addr);
    let data = b"replicated?";
    let sha = sha256_hex(data);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    let path = format!("/_peer/v1/put/evil/k1/{now_ms}/{sha}");
    let wrong = format!("SluicePeer {}x", SECRET);
    let bearer = format!("Bearer {SECRET}");
    for auth in [None, Some(wrong.as_str()), Some(bearer.as_str())] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|v| ("Authorization", *v)).collect();
        assert_eq!(
            http(b, "PUT", &path, &headers, data).status,
            401,
            "{auth:?}"
        );
        assert_eq!(http(b, "GET", "/_peer/v1/hello", &headers, b"").status, 401);
    }
    assert_eq!(
        status_of(b, "GET", "/v1/artifacts/evil/k1"),
        404,
        "nothing stored"
    );
    assert!(!b_node.data_dir.join("evil").exists());
    assert!(
        metric(
            b,
            "sluice_replication_received_requests_total",
            &["unauthorized"]
        ) >= 6.0
    );
    // Peer API requests have their own route label in the request counter.
    assert!(metric(b, "sluice_requests_total", &["route=\"peer\""]) >= 6.0);
    // The right secret stores, and applying the same write twice is harmless.
    let good = format!("SluicePeer {SECRET}");
    assert_eq!(
        http(b, "PUT", &path, &[("Authorization", &good)], data).status,
        201
    );
    assert_eq!(
        http(b, "PUT", &path, &[("Authorization", &good)], data).status,
        200
    );
    assert_eq!(http(b, "GET", "/v1/artifacts/evil/k1", &[], b"").body, data);
    // Last writer wins: an older version is read and dropped, a newer one
    // replaces; a delete older than what B holds changes nothing.
    let other = b"another version";
    let older = format!(
        "/_peer/v1/put/evil/k1/{}/{}",
        now_ms - 1000,
        sha256_hex(other)
    );
    let auth = [("Authorization", good.as_str())];
    assert_eq!(http(b, "PUT", &older, &auth, other).status, 200);
    assert_eq!(http(b, "GET", "/v1/artifacts/evil/k1", &[], b"").body, data);
    let stale_delete = format!("/_peer/v1/delete/evil/k1/{}", now_ms - 1);
    assert_eq!(http(b, "DELETE", &stale_delete, &auth, b"").status, 200);
    let newer = format!("/_peer/v1/put/evil/k1/{}/{}", now_ms + 1, sha256_hex(other));
    assert_eq!(http(b, "PUT", &newer, &auth, other).status, 204);
    assert_eq!(
        http(b, "GET", "/v1/artifacts/evil/k1", &[], b"").body,
        other
    );
    // A body that does not hash to the announced sha256 is refused.
    let lying = format!("/_peer/v1/put/evil/k2/{now_ms}/{}", sha256_hex(b"x"));
    assert_eq!(http(b, "PUT", &lying, &auth, b"y").status, 400);
    assert_eq!(status_of(b, "GET", "/v1/artifacts/evil/k2"), 404);
    // The peer secret opens nothing else: it is not a public token.
    assert_eq!(
        http(b, "GET", "/status", &[("Authorization", &good)], b"").status,
        200,
        "admin routes stay public"
    );

    // A probe storm of identical states: up, up, up... no reconcile.
    wait_for("A sees B up", Duration::from_secs(10), || {
        metric(a, "sluice_peer_up", &[]) == 1.0
    });
    let reconciles = metric(a, "sluice_membership_reconciles_total", &[]);
    let probes = metric(a, "sluice_peer_probes_total", &[]);
    std::thread::sleep(Duration::from_secs(3));
    let probes_after = metric(a, "sluice_peer_probes_total", &[]);
    assert!(
        probes_after - probes >= 10.0,
        "probes: {probes} -> {probes_after}"
    );
    assert_eq!(
        metric(a, "sluice_membership_reconciles_total", &[]),
        reconciles
    );
    assert_eq!(
        metric(a, "sluice_peer_transitions_total", &["to=\"up\""]),
        1.0
    );
    // Joined, then each state change (down first, if B started later): no more.
    let transitions = metric(a, "sluice_peer_transitions_total", &[]);
    assert_eq!(reconciles, 1.0 + transitions);
    let log = a_node.stderr();
    assert_eq!(
        log.matches("peer state changed").count() as f64,
        transitions,
        "{log}"
    );
}

#[test]
fn a_short_peer_secret_is_a_config_error_naming_the_key() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--peers",
            "127.0.0.1:1",
            "--peer-secret",
            "short",
        ])
        .env_remove("SLUICE_PEER_SECRET")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("peer_secret"), "{err}");
    assert!(!err.contains("short"), "the secret is not echoed: {err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", "127.0.0.1:0", "--peers", "127.0.0.1:1"])
        .env_remove("SLUICE_PEER_SECRET")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("peer_secret"));
}

#[test]
fn replication_works_without_io_uring_and_with_a_dns_peer_list() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ports = free_ports(2);
    // A runs the portable engine (blocking senders) and finds B by a DNS
    // name; B runs the rings and lists A statically.
    let a_node = server()
        .no_tls()
        .listen(&addr(ports[0]))
        .data_dir(&tmp.path().join("a"))
        .arg("--engine")
        .arg("fallback")
        .arg("--peers-dns")
        .arg(&format!("localhost:{}", ports[1]))
        .env("SLUICE_PEER_SECRET", SECRET)
        .env("SLUICE_PEER_REFRESH_MS", "200")
        .env("SLUICE_READ_THROUGH", "false")
        .start();
    let b_node = node(ports[1], &tmp.path().join("b"), &[ports[0]], &[]);
    let (a, b) = (a_node.addr, b_node.addr);
    let arts: Vec<Artifact> = (0..20u64)
        .map(|i| artifact(7000 + i, 10_000 + i as usize))
        .collect();
    for (i, art) in arts.iter().enumerate() {
        // Both directions: through the fallback's senders and the rings.
        put_ok(if i % 2 == 0 { a } else { b }, art);
    }
    for art in &arts {
        for n in [a, b] {
            wait_for(
                &format!("{} everywhere", art.path),
                Duration::from_secs(30),
                || holds(n, art),
            );
        }
    }
    let status: serde_json::Value =
        serde_json::from_slice(&http(a, "GET", "/status", &[], b"").body).expect("json");
    assert_eq!(status["engine"]["io_uring"], false);
    let peers = status["replication"]["peers"].as_array().expect("peers");
    assert!(peers
        .iter()
        .any(|p| p["peer"] == format!("127.0.0.1:{}", ports[1]) && p["state"] == "up"));
}

/// Turborepo's `x-artifact-*` headers are part of the artifact: replicated
/// to a peer with it, and given back there on GET and HEAD (turbo checks the
/// signature in `x-artifact-tag`; a missing one is a silent miss).
#[test]
fn kept_response_headers_are_replicated() {
    let ports = free_ports(2);
    let tmp = tempfile::tempdir().unwrap();
    let a = node(ports[0], &tmp.path().join("a"), &[ports[1]], &[]);
    let b = node(ports[1], &tmp.path().join("b"), &[ports[0]], &[]);
    let body = body(11, 50_000);
    let path = "/v8/artifacts/00aa11bb22cc33dd?teamId=team_mesh";
    let tag = "c2lnbmF0dXJl";
    let headers = [("x-artifact-duration", "90"), ("x-artifact-tag", tag)];
    let r = http(a.addr, "PUT", path, &headers, &body);
    assert_eq!(r.status, 202);
    wait_for("replication to b", Duration::from_secs(30), || {
        http(b.addr, "HEAD", path, &[], b"").status == 200
    });
    for method in ["GET", "HEAD"] {
        let r = http(b.addr, method, path, &[], b"");
        assert_eq!(r.status, 200, "{method}");
        assert_eq!(r.header("x-artifact-tag"), Some(tag), "{method}");
        assert_eq!(r.header("x-artifact-duration"), Some("90"), "{method}");
    }
    assert_eq!(http(b.addr, "GET", path, &[], b"").body, body);
}
