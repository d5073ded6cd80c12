//! The fleet under real faults: `sluice serve` nodes on loopback, faults
//! made by the kernel between them (iptables rules matching a node's
//! packets by the user it runs as: silent drops, loss, one-way cuts) or
//! under them (a peer's data directory on a small tmpfs that fills). In
//! each, a node's lag gauge for a peer is checked against the peer's own
//! store (read-through off) on every sample: never 0 while the peer lacks
//! an acknowledged write, 0 within 5 s of the peer holding everything, and
//! after the heal the peer holds everything within 10 s.
//!
//! The faults need root (mount, iptables, running nodes as other users).
//! Without root, or without iptables (installed with apt-get when missing),
//! the tests say SKIPPED on stderr and pass.
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::fleet::{Gauge, Ledger};
use common::{http, metric_at as metric, server, wait_for, xorshift_bytes as body, Server};

const SECRET: &str = "fleet-test-secret-0123456789";

/// This binary's loopback port range: 61000..65000 (above the kernel's
/// ephemeral range; mesh and tier use 8000..32000).
fn free_ports(n: usize) -> Vec<u16> {
    common::free_ports_in(61_000, 40, n)
}

fn skipped(test: &str, why: &str) {
    eprintln!("\n*** fleet suite: {test}: SKIPPED: {why} ***\n");
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A node of the fleet on `port`, replicating to `peers`.
fn node(port: u16, data_dir: &Path, peers: &[u16], extra: &[(&str, &str)]) -> Server {
    let peers: Vec<String> = peers.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut b = server()
        .no_tls()
        .listen(&format!("127.0.0.1:{port}"))
        .data_dir(data_dir)
        .arg("--peers")
        .arg(&peers.join(","))
        .env("SLUICE_PEER_SECRET", SECRET)
        // The peer's own store answers the checks: no read-through.
        .env("SLUICE_READ_THROUGH", "false")
        .env("SLUICE_FSYNC", "never");
    for (k, v) in extra {
        b = b.env(k, v);
    }
    b.start()
}

fn put(addr: SocketAddr, path: &str, data: &[u8]) {
    let r = http(addr, "PUT", path, &[], data);
    assert!(matches!(r.status, 201 | 204), "PUT {path} -> {}", r.status);
}

fn status(addr: SocketAddr) -> serde_json::Value {
    serde_json::from_slice(&http(addr, "GET", "/status", &[], b"").body).expect("status json")
}

fn peer_state(addr: SocketAddr, peer_port: u16) -> String {
    let status = status(addr);
    status["replication"]["peers"]
        .as_array()
        .and_then(|peers| {
            peers
                .iter()
                .find(|p| p["peer"] == format!("127.0.0.1:{peer_port}"))
        })
        .and_then(|p| p["state"].as_str())
        .unwrap_or("absent")
        .to_string()
}

/// A tmpfs mounted on a directory for as long as this lives.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir)
            .output()
            .expect("mount -o remount");
        assert!(out.status.success(), "{out:?}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A peer whose disk fills is a state, not bad input: the writes it cannot
/// take wait (and are counted) on the sender, retried with backoff, each
/// side logs the change once, and when the disk grows the peer holds
/// everything within 10 s and the gauge reads 0 within 5 s after that.
#[test]
fn a_peer_whose_disk_fills_is_retried_and_counted_until_it_has_room() {
    if !is_root() {
        return skipped("full peer", "needs root to mount a tmpfs");
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let b_dir = tmp.path().join("b");
    let disk = match Tmpfs::mount(&b_dir, "24m") {
        Ok(d) => d,
        Err(why) => return skipped("full peer", &why),
    };
    let ports = free_ports(2);
    let a_node = node(ports[0], &tmp.path().join("a"), &[ports[1]], &[]);
    let b_node = node(ports[1], &b_dir.join("data"), &[ports[0]], &[]);
    let (a, b) = (a_node.addr, b_node.addr);
    wait_for("A to see B up", Duration::from_secs(20), || {
        metric(a, "sluice_peer_up", &[]) == 1.0
    });
    let gauge = Gauge::Peer(ports[1]);
    let mut ledger = Ledger::default();
    // 40 MB for a 24 MB disk: B fills part way.
    for i in 0..40u64 {
        let path = format!("/v1/artifacts/full/k{i}");
        let data = body(i, 1_000_000);
        put(a, &path, &data);
        ledger.put(&path, &data);
        let s = ledger.sample(a, &gauge, b);
        assert!(
            !(s.lag_writes == 0.0 && s.missing > 0),
            "gauge 0 while B lacks {}",
            s.missing
        );
    }
    wait_for("A to find B full", Duration::from_secs(30), || {
        peer_state(a, ports[1]) == "full"
    });
    // While full, the gauge counts what B lacks, and B lacks some.
    let until = Instant::now() + Duration::from_secs(4);
    let mut lacking = 0;
    while Instant::now() < until {
        let s = ledger.sample(a, &gauge, b);
        assert!(s.lag_writes > 0.0 && s.missing > 0, "{s:?}");
        lacking = s.missing;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(metric(b, "sluice_replication_received_requests_total", &["full"]) >= 1.0);
    assert_eq!(
        metric(b, "sluice_replication_received_requests_total", &["bad"]),
        0.0,
        "a full disk is not bad input"
    );
    assert!(
        metric(
            a,
            "sluice_replication_sent_requests_total",
            &["result=\"full\""]
        ) >= 1.0
    );
    assert_eq!(status(b)["replication"]["store_full"], true);
    println!("B full with {lacking} of 40 missing; growing its disk");
    disk.resize("96m");
    let healed = Instant::now();
    let held = ledger.converge(
        "B's disk grown",
        a,
        &gauge,
        b,
        Duration::from_secs(30),
        Duration::from_secs(5),
    );
    println!("B held everything {held:?} after its disk grew");
    assert!(
        held <= Duration::from_secs(10),
        "B held everything only {held:?} after the heal"
    );
    assert!(healed.elapsed() < Duration::from_secs(20));
    assert_eq!(peer_state(a, ports[1]), "up");
    // Once per transition, on each side.
    assert_eq!(
        metric(a, "sluice_peer_transitions_total", &["to=\"full\""]),
        1.0
    );
    let a_log = a_node.stderr();
    assert_eq!(a_log.matches("the peer has no room").count(), 1, "{a_log}");
    let b_log = b_node.stderr();
    assert_eq!(b_log.matches("store is full").count(), 1, "{b_log}");
    assert_eq!(b_log.matches("has room again").count(), 1, "{b_log}");
    assert_eq!(status(b)["replication"]["store_full"], false);
    drop(b_node);
}
