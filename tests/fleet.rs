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

/// The tests of this file one at a time: each runs three nodes under timed
/// load or faults, and the soak beside a steady stream starved it of CPU on a
/// 2-core machine until a send timed out and was sent twice (at least once is
/// correct; the test asserts exactly once, which needs the CPU it measures).
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

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
    let _one_at_a_time = one_at_a_time();
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
    let mut ledger = Ledger::new(SECRET);
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

// ------------------------------------------------------------ kernel faults

/// The user the faulty nodes run as: iptables matches their packets by it.
const FLEET_USER: &str = "sluice-fleet";
/// A second one, for a node whose packets must be told apart (the soak's B).
const FLEET_USER_B: &str = "sluice-fleet-b";
/// Every rule these tests add carries this comment.
const RULE_COMMENT: &str = "sluice-fleet-test";

/// `(uid, gid)` of the fleet user, created when missing; `None` (printed)
/// when it cannot be.
fn fleet_user() -> Option<(u32, u32)> {
    system_user(FLEET_USER)
}

/// `(uid, gid)` of the system user `name`, created when missing.
fn system_user(name: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, name]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        let made = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(name)
            .status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("fleet suite: cannot create the user {name}");
            return None;
        }
    }
    Some((id("-u")?, id("-g")?))
}

/// Whether iptables runs here, installing it (Debian) when missing.
fn iptables_works() -> bool {
    let works = || {
        Command::new("iptables")
            .args(["-w", "-L", "OUTPUT", "-n"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works() {
        return true;
    }
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-qq", "iptables"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output();
    works()
}

/// A copy of the server binary the fleet user can run (the build tree may
/// sit under a directory only root can enter).
fn shared_binary() -> PathBuf {
    static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        // Copies left by earlier runs (a process exits without dropping statics) go first:
        // each is a whole release or debug binary, and a machine that runs the suite often
        // filled its disk with them.
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let pid = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("sluice-fleet-bin-"))
                    .and_then(|pid| pid.parse::<u32>().ok());
                if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = std::env::temp_dir().join(format!("sluice-fleet-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("binary dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let copy = dir.join("sluice");
        std::fs::copy(env!("CARGO_BIN_EXE_sluice"), &copy).expect("copy the binary");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        copy
    })
    .clone()
}

/// Rules in the OUTPUT chain for as long as this lives.
struct Rules {
    added: Vec<Vec<String>>,
}

impl Rules {
    fn add(specs: Vec<Vec<String>>) -> Rules {
        let mut rules = Rules { added: Vec::new() };
        for spec in specs {
            let mut args = vec!["-w".to_string(), "-A".into(), "OUTPUT".into()];
            args.extend(spec.iter().cloned());
            args.extend(
                ["-m", "comment", "--comment", RULE_COMMENT, "-j", "DROP"].map(String::from),
            );
            let out = Command::new("iptables")
                .args(&args)
                .output()
                .expect("iptables");
            assert!(out.status.success(), "iptables {args:?}: {out:?}");
            rules.added.push(args);
        }
        rules
    }
}

impl Rules {
    /// Packets the rules on `port` have dropped so far (their iptables counters).
    fn dropped(&self, port: u16) -> u64 {
        let ports = [format!("dpt:{port}"), format!("spt:{port}")];
        let out = Command::new("iptables")
            .args(["-w", "-L", "OUTPUT", "-v", "-x", "-n"])
            .output()
            .expect("iptables -L");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(RULE_COMMENT))
            .filter(|l| l.split_whitespace().any(|w| ports.iter().any(|p| p == w)))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        for args in &self.added {
            let mut del = args.clone();
            del[1] = "-D".into();
            let _ = Command::new("iptables").args(&del).output();
        }
    }
}

/// The fleet user's TCP packets on loopback to (`dport`) or from (`sport`)
/// `port`, all of them or a share (`probability` < 1).
fn owned_packets(uid: u32, dir: &str, port: u16, probability: f64) -> Vec<String> {
    let mut spec: Vec<String> = ["-o", "lo", "-p", "tcp", "-m", "owner", "--uid-owner"]
        .map(String::from)
        .to_vec();
    spec.push(uid.to_string());
    spec.push(format!("--{dir}"));
    spec.push(port.to_string());
    if probability < 1.0 {
        spec.extend(["-m", "statistic", "--mode", "random", "--probability"].map(String::from));
        spec.push(format!("{probability}"));
    }
    spec
}

/// Two nodes run as the fleet user (A lists B, B lists A), and the ports.
struct Pair {
    a: Server,
    b: Server,
    ports: [u16; 2],
    uid: u32,
    _tmp: tempfile::TempDir,
}

/// Everything a fault test needs, or why it cannot run.
fn fault_pair(test: &str) -> Option<Pair> {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        skipped(test, "needs root (iptables, nodes run as another user)");
        return None;
    }
    if !iptables_works() {
        skipped(test, "no iptables (and apt-get could not install it)");
        return None;
    }
    let Some((uid, gid)) = fleet_user() else {
        skipped(test, "cannot create the user the nodes run as");
        return None;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let ports = free_ports(2);
    let binary = shared_binary();
    let start = |i: usize| {
        let dir = tmp.path().join(format!("n{i}"));
        std::fs::create_dir_all(&dir).expect("data dir");
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown");
        let peer = ports[1 - i];
        server()
            .no_tls()
            .binary(&binary)
            .run_as(uid, gid)
            .listen(&format!("127.0.0.1:{}", ports[i]))
            .data_dir(&dir)
            .arg("--peers")
            .arg(&format!("127.0.0.1:{peer}"))
            .env("SLUICE_PEER_SECRET", SECRET)
            .env("SLUICE_READ_THROUGH", "false")
            .env("SLUICE_FSYNC", "never")
            .start()
    };
    let a = start(0);
    let b = start(1);
    wait_for(
        "A and B to see each other up",
        Duration::from_secs(20),
        || {
            metric(a.addr, "sluice_peer_up", &[]) == 1.0
                && metric(b.addr, "sluice_peer_up", &[]) == 1.0
        },
    );
    Some(Pair {
        a,
        b,
        ports: [ports[0], ports[1]],
        uid,
        _tmp: tmp,
    })
}

/// Writes to `addr` at `per_sec` until told to stop, each acknowledged
/// write sent on the channel (path, body).
fn steady_writer(
    addr: SocketAddr,
    prefix: String,
    per_sec: u32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (
    std::thread::JoinHandle<u64>,
    std::sync::mpsc::Receiver<(String, Vec<u8>)>,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let every = Duration::from_secs_f64(1.0 / f64::from(per_sec));
        let mut next = Instant::now();
        let mut n = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let path = format!("{prefix}-{n}");
            let data = body(n + 0x5eed, 2048 + (n as usize * 613) % 6144);
            put(addr, &path, &data);
            let _ = tx.send((path, data));
            n += 1;
            next += every;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        n
    });
    (handle, rx)
}

/// A fault between A and B while A takes a steady stream of writes: on
/// every sample the gauge is 0 only if B's store holds every write
/// acknowledged before it was read; after the heal B holds everything
/// within 10 s and the gauge reads 0 within 5 s of that.
/// `holds_back`: the fault must keep some write from B while it lasts (a cut
/// does; a share of packets lost may not, since the kernel's tail-loss
/// probes resend a lost segment within milliseconds on loopback: then the
/// rules must at least have dropped packets, so the fault was real).
fn fault_scenario(
    test: &str,
    rules: impl Fn(&Pair) -> Vec<Vec<String>>,
    fault: Duration,
    holds_back: bool,
) {
    let Some(pair) = fault_pair(test) else {
        return;
    };
    let (a, b) = (pair.a.addr, pair.b.addr);
    let gauge = Gauge::Peer(pair.ports[1]);
    let mut ledger = Ledger::new(SECRET);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prefix = format!("/v1/artifacts/fault/{}", test.replace(' ', "-"));
    let (writer, acked) = steady_writer(a, prefix, 25, std::sync::Arc::clone(&stop));
    let mut take = |ledger: &mut Ledger| {
        while let Ok((path, data)) = acked.try_recv() {
            ledger.put(&path, &data);
        }
    };
    let check = |ledger: &mut Ledger, until: Instant, take: &mut dyn FnMut(&mut Ledger)| {
        let mut worst = 0;
        while Instant::now() < until {
            take(ledger);
            let s = ledger.sample(a, &gauge, b);
            assert!(
                !(s.lag_writes == 0.0 && s.missing > 0),
                "{test}: the gauge read 0 while B lacked {} acknowledged writes",
                s.missing
            );
            worst = worst.max(s.missing);
            std::thread::sleep(Duration::from_millis(100));
        }
        worst
    };
    check(
        &mut ledger,
        Instant::now() + Duration::from_secs(2),
        &mut take,
    );
    let fault_rules = Rules::add(rules(&pair));
    let worst = check(&mut ledger, Instant::now() + fault, &mut take);
    if holds_back {
        assert!(worst > 0, "{test}: the fault never kept a write from B");
    } else {
        assert!(
            fault_rules.dropped(pair.ports[1]) > 0,
            "{test}: the rules dropped nothing"
        );
    }
    // Heal, with the writes acknowledged up to now.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().expect("writer");
    take(&mut ledger);
    drop(fault_rules);
    let held = ledger.converge(
        test,
        a,
        &gauge,
        b,
        Duration::from_secs(60),
        Duration::from_secs(5),
    );
    println!(
        "{test}: {written} writes, B lacked up to {worst} during the fault, held everything \
         {held:?} after the heal"
    );
    assert!(
        held <= Duration::from_secs(10),
        "{test}: B held everything only {held:?} after the heal"
    );
    assert_eq!(ledger.len() as u64, written);
}

/// Every packet between A and B dropped, both ways, with no reset: sends
/// hang until A finds B down and gives them up for lost.
#[test]
fn a_silent_partition_is_counted_and_healed() {
    let _one_at_a_time = one_at_a_time();
    fault_scenario(
        "silent partition",
        |p| {
            vec![
                owned_packets(p.uid, "dport", p.ports[1], 1.0),
                owned_packets(p.uid, "dport", p.ports[0], 1.0),
            ]
        },
        Duration::from_secs(8),
        true,
    );
}

/// A's packets to B dropped, B's to A delivered: B still reaches A (its
/// probes of A succeed), A cannot reach B.
#[test]
fn a_one_way_cut_is_counted_and_healed() {
    let _one_at_a_time = one_at_a_time();
    fault_scenario(
        "one-way cut",
        |p| vec![owned_packets(p.uid, "dport", p.ports[1], 1.0)],
        Duration::from_secs(8),
        true,
    );
}

/// 10 % of the packets of A's connections to B lost, both ways (A's
/// requests and B's answers): retransmits, timeouts, a peer found down and
/// back. Only B's port, so the test's writer keeps its rate. Whether a loss
/// holds a write back long enough to be sampled is chance (loopback's
/// tail-loss probes resend within milliseconds), so the premise checked is
/// that packets were dropped; the gauge's truth and the heal are checked
/// as for a cut.
#[test]
fn packet_loss_between_peers_is_counted_and_healed() {
    let _one_at_a_time = one_at_a_time();
    fault_scenario(
        "packet loss",
        |p| {
            ["dport", "sport"]
                .iter()
                .map(|dir| owned_packets(p.uid, dir, p.ports[1], 0.1))
                .collect()
        },
        Duration::from_secs(10),
        false,
    );
}

// ------------------------------------------------------------ steady streams

/// Thousands of distinct writes at a fixed rate for a minute on A of three
/// nodes (each listing the other two) over one SeaweedFS bucket: every one
/// reaches B, C and the bucket, each sent once (no duplicate send, no
/// second upload), and A's lag gauges for B and for the tier tell the truth
/// throughout and read 0 at the end.
#[test]
fn a_steady_stream_reaches_every_peer_and_the_bucket_once_each() {
    steady_stream("auto", true);
}

/// The same stream without rings: the sends go through the blocking
/// senders' queue (at most two threads per peer), and every write still
/// reaches both peers once, the lag gauges reading the truth and then 0.
#[test]
fn a_steady_stream_without_rings_reaches_every_peer_once_each() {
    steady_stream("fallback", false);
}

fn steady_stream(engine: &str, tier: bool) {
    let _one_at_a_time = one_at_a_time();
    use common::weed::{with_tier, Weed};
    let weed = if tier {
        Weed::start(free_ports(8))
    } else {
        None
    };
    if tier && weed.is_none() {
        skipped(
            "steady stream",
            "no SeaweedFS: the bucket part is not checked",
        );
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let ports = free_ports(3);
    let nodes: Vec<Server> = (0..3)
        .map(|i| {
            let peers: Vec<String> = (0..3)
                .filter(|&j| j != i)
                .map(|j| format!("127.0.0.1:{}", ports[j]))
                .collect();
            let mut b = server()
                .no_tls()
                .listen(&format!("127.0.0.1:{}", ports[i]))
                .data_dir(&tmp.path().join(format!("n{i}")))
                .arg("--peers")
                .arg(&peers.join(","))
                .env("SLUICE_PEER_SECRET", SECRET)
                .env("SLUICE_READ_THROUGH", "false")
                .env("SLUICE_ENGINE", engine);
            if let Some(w) = &weed {
                b = with_tier(b, &w.endpoint());
            }
            b.start()
        })
        .collect();
    let (a, b, c) = (nodes[0].addr, nodes[1].addr, nodes[2].addr);
    wait_for("A to see B and C up", Duration::from_secs(30), || {
        metric(a, "sluice_peer_up", &[]) == 2.0
    });
    let (per_sec, secs) = (50u32, 60u64);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (writer, acked) = steady_writer(
        a,
        "/v1/artifacts/steady/k".to_string(),
        per_sec,
        std::sync::Arc::clone(&stop),
    );
    let gauge_b = Gauge::Peer(ports[1]);
    let mut on_b = Ledger::new(SECRET);
    let mut on_c = Ledger::new(SECRET);
    let mut writes: Vec<(String, Vec<u8>)> = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        while let Ok((path, data)) = acked.try_recv() {
            on_b.put(&path, &data);
            on_c.put(&path, &data);
            writes.push((path, data));
        }
        let s = on_b.sample(a, &gauge_b, b);
        assert!(
            !(s.lag_writes == 0.0 && s.missing > 0),
            "the gauge read 0 while B lacked {}",
            s.missing
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().expect("writer");
    while let Ok((path, data)) = acked.try_recv() {
        on_b.put(&path, &data);
        on_c.put(&path, &data);
        writes.push((path, data));
    }
    let ended = Instant::now();
    assert_eq!(writes.len() as u64, written);
    assert!(
        written >= u64::from(per_sec) * secs * 9 / 10,
        "only {written} writes in {secs} s: the rate was not held"
    );
    let held_b = on_b.converge(
        "B",
        a,
        &gauge_b,
        b,
        Duration::from_secs(60),
        Duration::from_secs(5),
    );
    let held_c = on_c.converge(
        "C",
        a,
        &Gauge::Peer(ports[2]),
        c,
        Duration::from_secs(60),
        Duration::from_secs(5),
    );
    println!(
        "{written} writes at {per_sec}/s: B held everything {held_b:?}, C {held_c:?} after the \
         load ended ({:?} ago)",
        ended.elapsed()
    );
    // Each acknowledged by its peer once: as many successful sends as writes.
    // A write reaches a peer a second time only when an earlier attempt
    // failed as A saw it (its answer lost or late: a timeout, a peer found
    // down while it was in flight) or as an anti-entropy repair by any node
    // (B repairs to C what it got from A):
    // at least once, and more only after a failure or a repair counted.
    // Every node compares with every peer: B, holding A's writes, may repair
    // one to C that A's outbox is still delivering (the comparison's cutoff
    // covers only B's own outbox).
    let repaired: f64 = [a, b, c]
        .iter()
        .map(|&n| metric(n, "sluice_anti_entropy_repaired_total", &[]))
        .sum();
    let mut kept = 0.0;
    let mut failed = 0.0;
    for (port, node) in [(ports[1], b), (ports[2], c)] {
        let label = format!("peer=\"127.0.0.1:{port}\"");
        let ok = metric(
            a,
            "sluice_replication_sent_requests_total",
            &[&label, "result=\"ok\""],
        );
        assert_eq!(ok, written as f64, "sends to {port}");
        let all = metric(a, "sluice_replication_sent_requests_total", &[&label]);
        assert_eq!(
            metric(
                node,
                "sluice_replication_received_requests_total",
                &["stored"]
            ),
            written as f64
        );
        let twice = metric(
            node,
            "sluice_replication_received_requests_total",
            &["kept"],
        );
        println!(
            "{port}: arrived twice {twice}, sends that failed as A saw them {}",
            all - ok
        );
        kept += twice;
        failed += all - ok;
    }
    println!("anti-entropy repairs: {repaired}");
    assert!(
        kept <= failed + repaired,
        "{kept} writes arrived twice, more than the {failed} failed sends and {repaired} repairs"
    );
    let Some(weed) = weed else { return };
    wait_for(
        "the tier to hold everything",
        Duration::from_secs(60),
        || Gauge::Tier.read(a) == 0.0,
    );
    for (path, data) in &writes {
        let key = path.trim_start_matches("/v1/artifacts/steady/");
        assert_eq!(
            weed.object("steady", key).as_deref(),
            Some(&data[..]),
            "{path} in the bucket"
        );
    }
    let uploads = |n: SocketAddr| {
        metric(
            n,
            "sluice_tier_requests_total",
            &["op=\"upload\"", "result=\"ok\""],
        )
    };
    assert_eq!(uploads(a), written as f64, "each uploaded once");
    assert_eq!(
        uploads(b) + uploads(c),
        0.0,
        "peers do not upload replicated writes"
    );
}

// ------------------------------------------------------------ the soak

/// A setting of the soak from the environment (bench/soak runs it for an
/// hour with higher rates), or its default for `cargo test`.
fn soak_setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident bytes, open files and threads of a process (from /proc).
fn proc_stats(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (field("VmRSS:") * 1024, fds, field("Threads:"))
}

/// A process's threads by name, digits folded to `N` (`sluice-ring-0` and
/// `sluice-ring-1` count as two `sluice-ring-N`).
fn thread_names(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut names = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return names;
    };
    for task in tasks.flatten() {
        if let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) {
            let mut name = String::new();
            for ch in comm.trim_end().chars() {
                if !ch.is_ascii_digit() {
                    name.push(ch);
                } else if !name.ends_with('N') {
                    name.push('N');
                }
            }
            *names.entry(name).or_insert(0) += 1;
        }
    }
    names
}

/// A process's open files by kind: `socket`, `pipe`, `anon_inode:[io_uring]` and the like as
/// the kernel names them, `file` for a path (`file (deleted)` for one unlinked while open);
/// TCP sockets carry their state (`socket:tcp:CLOSE_WAIT`), so a leak says what it is.
fn fd_kinds(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut kinds = std::collections::BTreeMap::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return kinds;
    };
    let tcp = tcp_states(pid);
    for fd in fds.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let target = target.to_string_lossy();
            let kind = if target.starts_with('/') {
                if target.ends_with(" (deleted)") {
                    "file (deleted)".to_string()
                } else {
                    "file".to_string()
                }
            } else if target.starts_with("anon_inode:") {
                // Few and named by what they are (`[io_uring]`, `[eventfd]`).
                target.into_owned()
            } else if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|rest| rest.strip_suffix(']'))
            {
                match tcp.get(inode) {
                    Some(state) => format!("socket:tcp:{state}"),
                    None => "socket".to_string(),
                }
            } else if let Some((kind, _)) = target.split_once(":[") {
                // `pipe:[inode]`: the kind without the inode.
                kind.to_string()
            } else {
                target.into_owned()
            };
            *kinds.entry(format!("fd:{kind}")).or_insert(0) += 1;
        }
    }
    kinds
}

/// The state of each TCP socket in `pid`'s network namespace, by inode.
fn tcp_states(pid: u32) -> std::collections::HashMap<String, &'static str> {
    const STATES: [&str; 12] = [
        "?",
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSE",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
    ];
    let mut states = std::collections::HashMap::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let (Some(state), Some(inode)) = (fields.get(3), fields.get(9)) {
                let state = usize::from_str_radix(state, 16)
                    .ok()
                    .and_then(|i| STATES.get(i))
                    .unwrap_or(&"?");
                states.insert((*inode).to_string(), *state);
            }
        }
    }
    states
}

/// One second of the soak: per node (A, B, C) RSS, open files, threads and
/// artifacts stored; A's outbox bytes and lag for B, C and the tier; the
/// fault that began.
struct Sample {
    t: f64,
    rss: [u64; 3],
    fds: [u64; 3],
    threads: [u64; 3],
    entries: [f64; 3],
    outbox_bytes: f64,
    lag: [f64; 3],
    fault: &'static str,
}

/// The soak's counters, bumped by its load threads.
#[derive(Default)]
struct Load {
    requests: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
}

impl Load {
    fn count(&self, ok: bool, what: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        if !ok {
            let n = self.errors.fetch_add(1, Relaxed);
            if n < 10 {
                eprintln!("soak: {what} failed");
            }
        }
    }
}

/// Run `f` every `1/per_sec` s until `stop`.
fn paced(per_sec: u64, stop: &std::sync::atomic::AtomicBool, mut f: impl FnMut(u64)) {
    if per_sec == 0 {
        return;
    }
    let every = Duration::from_secs_f64(1.0 / per_sec as f64);
    let mut next = Instant::now();
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        f(n);
        n += 1;
        next += every;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > Duration::from_secs(1) {
            next = now; // behind: do not burst to catch up
        }
    }
}

/// The size of C's disk for a soak of `secs` at `put_rate` plaintext PUTs a
/// second (every 20th of 256 KiB, the rest 4 KiB, each taking its body and a
/// page for the header on a tmpfs) plus the h2 PUTs (two a second, 3,000
/// bytes): twice what they store, and never under 512 MiB.
fn soak_disk_mib(secs: u64, put_rate: u64) -> u64 {
    let per_write = (19 * (4096 + 4096) + (256 << 10) + 4096) / 20;
    let bytes = secs * (put_rate * per_write + 2 * 8192);
    ((2 * bytes) >> 20).max(512)
}

/// Where `bench/soak` wants the soak's samples, logs and summary, if anywhere.
fn soak_out() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("SLUICE_SOAK_OUT")?);
    std::fs::create_dir_all(&dir).expect("soak out dir");
    Some(dir)
}

/// The soak's samples as `samples.csv`, written as soon as the load ends so a
/// failing end still leaves them.
fn write_soak_samples(dir: &std::path::Path, samples: &[Sample]) {
    let mut csv = String::from(
        "t,rss_mib:A,rss_mib:B,rss_mib:C,open_files:A,open_files:B,open_files:C,threads:A,\
         threads:B,threads:C,entries:A,entries:B,entries:C,outbox_kib:A,lag_writes:B,\
         lag_writes:C,lag_writes:tier,fault\n",
    );
    for s in samples {
        csv.push_str(&format!(
            "{:.1},{:.1},{:.1},{:.1},{},{},{},{},{},{},{},{},{},{:.1},{},{},{},{}\n",
            s.t,
            s.rss[0] as f64 / 1048576.0,
            s.rss[1] as f64 / 1048576.0,
            s.rss[2] as f64 / 1048576.0,
            s.fds[0],
            s.fds[1],
            s.fds[2],
            s.threads[0],
            s.threads[1],
            s.threads[2],
            s.entries[0],
            s.entries[1],
            s.entries[2],
            s.outbox_bytes / 1024.0,
            s.lag[0],
            s.lag[1],
            s.lag[2],
            s.fault
        ));
    }
    std::fs::write(dir.join("samples.csv"), csv).expect("samples.csv");
}

/// What a failed soak leaves for a post-mortem: each node's log and metrics.
fn keep_soak_evidence(dir: &std::path::Path, nodes: &[(&str, &Server)]) {
    for (name, node) in nodes {
        let _ = std::fs::write(dir.join(format!("{name}.log")), node.stderr());
        let m = http(node.addr, "GET", "/metrics", &[], b"");
        let _ = std::fs::write(dir.join(format!("{name}.metrics")), &m.body);
        let st = http(node.addr, "GET", "/status", &[], b"");
        let _ = std::fs::write(dir.join(format!("{name}.status")), &st.body);
    }
}

/// Mixed load on three nodes over the object-store tier, with a fault every
/// `SLUICE_SOAK_FAULT_SECS` (a partition of B, C's disk full, B killed with
/// SIGKILL and restarted): GETs over plaintext (A and C), TLS HTTP/1.1 and
/// h2 (A), PUTs over plaintext and h2 (A). Through it RSS, open files and
/// threads of every node stay bounded, A's outbox stays under its bound,
/// no public request fails, and at the end every acknowledged write is on
/// B, C and in the bucket, with the lag gauges at 0. `cargo test` runs it
/// for 3 minutes; bench/soak for an hour (`SLUICE_SOAK_SECS`).
///
/// Each written artifact is deleted on A `SLUICE_SOAK_LIVE_SECS` after its
/// write was acknowledged (0: never), as a cache at its size limit drops
/// old entries: the number of artifacts levels off, so what grows with it
/// (the accounting index, about 120 bytes an artifact) does not read as a
/// leak, and deletes replicate and reach the bucket under the faults too.
#[test]
fn a_soak_of_mixed_load_and_faults_stays_bounded_and_loses_nothing() {
    let _one_at_a_time = one_at_a_time();
    use common::weed::{with_tier, Weed};
    use common::{req, Front};
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    let secs = soak_setting("SLUICE_SOAK_SECS", 180);
    let fault_every = soak_setting("SLUICE_SOAK_FAULT_SECS", 45);
    let get_rate = soak_setting("SLUICE_SOAK_GET_RATE", 100);
    let put_rate = soak_setting("SLUICE_SOAK_PUT_RATE", 20);
    let live_secs = soak_setting("SLUICE_SOAK_LIVE_SECS", 60);
    let users = if is_root() && iptables_works() {
        fleet_user().zip(system_user(FLEET_USER_B))
    } else {
        None
    };
    if users.is_none() {
        skipped(
            "soak faults",
            "needs root and iptables: the soak runs without faults",
        );
    }
    let weed = Weed::start(free_ports(8));
    if weed.is_none() {
        skipped("soak tier", "no SeaweedFS: the soak runs without the tier");
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let ports = free_ports(3);
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("n{i}"))).collect();
    // C's disk: a tmpfs the full-disk fault fills with a file beside C's data.
    // It holds every write of the soak with room to spare: C stores them all
    // (no `store_bytes_max`), and on a tmpfs a 4 KiB artifact with its header
    // takes two pages. A fixed 512 MiB filled for good about 25,000 writes
    // into the hour-long run, and C then rightly answered 507 to the rest.
    let c_disk_mib = soak_disk_mib(secs, put_rate);
    let c_disk = users.map(|_| {
        Tmpfs::mount(&tmp.path().join("c-disk"), &format!("{c_disk_mib}m")).expect("tmpfs")
    });
    let dirs = [
        dirs[0].clone(),
        dirs[1].clone(),
        c_disk
            .as_ref()
            .map_or(dirs[2].clone(), |d| d.dir.join("data")),
    ];
    let start = |i: usize| -> Server {
        std::fs::create_dir_all(&dirs[i]).expect("data dir");
        let peers: Vec<String> = (0..3)
            .filter(|&j| j != i)
            .map(|j| format!("127.0.0.1:{}", ports[j]))
            .collect();
        let mut b = server()
            .listen(&format!("127.0.0.1:{}", ports[i]))
            .data_dir(&dirs[i])
            .arg("--peers")
            .arg(&peers.join(","))
            .env("SLUICE_PEER_SECRET", SECRET)
            // The periodic comparison runs during the soak too.
            .env("SLUICE_ANTI_ENTROPY_INTERVAL_MS", "60000");
        if let Some(((uid, gid), (uid_b, gid_b))) = users {
            let (u, g) = if i == 1 { (uid_b, gid_b) } else { (uid, gid) };
            std::os::unix::fs::chown(&dirs[i], Some(u), Some(g)).expect("chown");
            b = b.binary(&shared_binary()).run_as(u, g);
        }
        if let Some(w) = &weed {
            b = with_tier(b, &w.endpoint());
        }
        b.start()
    };
    let a_node = start(0);
    let mut b_node = Some(start(1));
    let c_node = start(2);
    let (a, c) = (a_node.addr, c_node.addr);
    wait_for("A to see B and C up", Duration::from_secs(30), || {
        metric(a, "sluice_peer_up", &[]) == 2.0
    });
    // The hot set the GETs ask for.
    let hot: Vec<(String, usize)> = (0..40usize)
        .map(|i| {
            let path = format!("/v1/artifacts/hot/h{i}");
            let len = 4096 + (i * 1531) % 60_000;
            put(a, &path, &body(i as u64 + 9_000, len));
            (path, len)
        })
        .collect();
    let stop = AtomicBool::new(false);
    let load = Load::default();
    // Acknowledged writes (`Some(body)`) and deletes (`None`), for the ledgers.
    let (acked_tx, acked) = std::sync::mpsc::channel::<(String, Option<Vec<u8>>)>();
    // Acknowledged writes, for the deleter.
    let (written_tx, written) = std::sync::mpsc::channel::<(String, Instant)>();
    let mut samples: Vec<Sample> = Vec::new();
    let mut ledgers = [Ledger::new(SECRET), Ledger::new(SECRET)];
    // What each key should be at the end: its body, or gone.
    let mut writes: std::collections::HashMap<String, Option<Vec<u8>>> = Default::default();
    let (mut puts, mut deletes) = (0u64, 0u64);
    let mut record = |path: String, data: Option<Vec<u8>>| {
        for l in ledgers.iter_mut() {
            match &data {
                Some(data) => l.put(&path, data),
                None => l.deleted(&path),
            }
        }
        match data {
            Some(_) => puts += 1,
            None => deletes += 1,
        }
        writes.insert(path, data);
    };
    // Where bench/soak wants the samples, logs and the 30-second records, if anywhere.
    let out = soak_out();
    let started = Instant::now();
    std::thread::scope(|scope| {
        // Plaintext GETs on A over keep-alive connections.
        scope.spawn(|| {
            let mut conn: Option<std::net::TcpStream> = None;
            paced(get_rate, &stop, |n| {
                let (path, len) = &hot[n as usize % hot.len()];
                let s = match conn.as_mut() {
                    Some(s) => s,
                    None => conn.insert(std::net::TcpStream::connect(a).expect("connect A")),
                };
                let raw = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
                let ok = std::io::Write::write_all(s, raw.as_bytes()).is_ok()
                    && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let r = common::read_one_response(s, "GET");
                        r.status == 200 && r.body.len() == *len
                    }))
                    .unwrap_or(false);
                if !ok {
                    conn = None;
                }
                load.count(ok, "plaintext GET on A");
            });
        });
        // Plaintext GETs on C (which may be full, never down).
        scope.spawn(|| {
            paced(get_rate / 5, &stop, |n| {
                let (path, len) = &hot[n as usize % hot.len()];
                let r = http(c, "GET", path, &[], b"");
                load.count(r.status == 200 && r.body.len() == *len, "GET on C");
            });
        });
        // TLS HTTP/1.1 and h2 GETs on A, h2 PUTs on A.
        for front in [Front::TlsHttp1, Front::TlsH2] {
            let (a_node, hot, load, stop) = (&a_node, &hot, &load, &stop);
            let (acked_tx, written_tx) = (acked_tx.clone(), written_tx.clone());
            scope.spawn(move || {
                paced(10, stop, |n| {
                    let (path, len) = &hot[n as usize % hot.len()];
                    if front == Front::TlsH2 && n % 5 == 0 {
                        let path = format!("/v1/artifacts/soak/h2-{n}");
                        let data = body(n + 77_000, 3000);
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            a_node.send(front, req("PUT", &path).body(data.clone()))
                        }));
                        let ok = r.is_ok_and(|r| matches!(r.status, 201 | 204));
                        if ok {
                            let _ = written_tx.send((path.clone(), Instant::now()));
                            let _ = acked_tx.send((path, Some(data)));
                        }
                        load.count(ok, "h2 PUT on A");
                        return;
                    }
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        a_node.send(front, req("GET", path))
                    }));
                    load.count(
                        r.is_ok_and(|r| r.status == 200 && r.body.len() == *len),
                        "TLS GET on A",
                    );
                });
            });
        }
        // Plaintext PUTs on A: distinct keys, every 20th of 256 KiB.
        {
            let (load, stop) = (&load, &stop);
            let acked_tx = acked_tx.clone();
            let written_tx = written_tx.clone();
            scope.spawn(move || {
                paced(put_rate, stop, |n| {
                    let path = format!("/v1/artifacts/soak/k{n}");
                    let len = if n % 20 == 7 { 256 << 10 } else { 4096 };
                    let data = body(n, len);
                    let r = std::panic::catch_unwind(|| http(a, "PUT", &path, &[], &data));
                    let ok = r.is_ok_and(|r| matches!(r.status, 201 | 204));
                    if ok {
                        let _ = written_tx.send((path.clone(), Instant::now()));
                        let _ = acked_tx.send((path, Some(data)));
                    }
                    load.count(ok, "plaintext PUT on A");
                });
            });
        }
        // DELETEs on A, each `live_secs` after its write was acknowledged.
        if live_secs > 0 {
            let (load, stop) = (&load, &stop);
            let acked_tx = acked_tx.clone();
            let live = Duration::from_secs(live_secs);
            scope.spawn(move || {
                let mut next: Option<(String, Instant)> = None;
                while !stop.load(Ordering::Relaxed) {
                    let (path, at) = match next.take() {
                        Some(due) => due,
                        None => match written.recv_timeout(Duration::from_millis(200)) {
                            Ok(due) => due,
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                        },
                    };
                    let wait = (at + live).saturating_duration_since(Instant::now());
                    if !wait.is_zero() {
                        // In slices, so the end of the load is seen.
                        std::thread::sleep(wait.min(Duration::from_millis(200)));
                        next = Some((path, at));
                        continue;
                    }
                    let r = std::panic::catch_unwind(|| http(a, "DELETE", &path, &[], b""));
                    let ok = r.is_ok_and(|r| matches!(r.status, 200 | 204));
                    if ok {
                        let _ = acked_tx.send((path, None));
                    }
                    load.count(ok, "DELETE on A");
                }
            });
        }
        drop(acked_tx);
        drop(written_tx);
        // The faults, and a sample every second.
        let mut fault_rules: Option<Rules> = None;
        let mut filler: Option<PathBuf> = None;
        let mut b_down_since: Option<Instant> = None;
        let mut fault_until = Instant::now();
        let mut next_fault = Duration::from_secs(15);
        let mut kind = 0u64;
        while started.elapsed() < Duration::from_secs(secs) {
            let mut fault = "";
            let now = started.elapsed();
            if let Some(((uid, _), (uid_b, _))) = users {
                if now >= next_fault && now + Duration::from_secs(20) < Duration::from_secs(secs) {
                    next_fault += Duration::from_secs(fault_every);
                    fault_until = Instant::now() + Duration::from_secs(15);
                    match kind % 3 {
                        0 => {
                            // B cut off, both ways, silently.
                            fault = "partition B";
                            let mut rules = vec![owned_packets(uid, "dport", ports[1], 1.0)];
                            for port in [ports[0], ports[2]] {
                                rules.push(owned_packets(uid_b, "dport", port, 1.0));
                            }
                            fault_rules = Some(Rules::add(rules));
                        }
                        1 => {
                            // C's disk full: a file takes what is left of it.
                            fault = "C full";
                            let dir = c_disk.as_ref().map(|d| d.dir.clone()).expect("C's disk");
                            let free = rustix::fs::statvfs(&dir)
                                .map(|v| v.f_bavail * v.f_frsize)
                                .unwrap_or(0);
                            let path = dir.join("filler");
                            let f = std::fs::File::create(&path).expect("filler");
                            let _ = f.set_len(0);
                            let chunk = vec![0u8; 1 << 20];
                            let mut w = std::io::BufWriter::new(f);
                            let mut left = free;
                            while left > 0 {
                                let n = left.min(chunk.len() as u64) as usize;
                                if std::io::Write::write_all(&mut w, &chunk[..n]).is_err() {
                                    break;
                                }
                                left -= n as u64;
                            }
                            let _ = std::io::Write::flush(&mut w);
                            filler = Some(path);
                        }
                        _ => {
                            fault = "kill -9 B";
                            if let Some(mut b) = b_node.take() {
                                let _ = b.child.kill();
                                let _ = b.child.wait();
                            }
                            b_down_since = Some(Instant::now());
                        }
                    }
                    kind += 1;
                }
            }
            if Instant::now() >= fault_until {
                fault_rules = None;
                if let Some(path) = filler.take() {
                    let _ = std::fs::remove_file(path);
                }
            }
            if b_down_since.is_some_and(|t| t.elapsed() >= Duration::from_secs(10)) {
                b_down_since = None;
                b_node = Some(start(1));
            }
            while let Ok((path, data)) = acked.try_recv() {
                record(path, data);
            }
            let pids = [
                Some(a_node.child.id()),
                b_node.as_ref().map(|b| b.child.id()),
                Some(c_node.child.id()),
            ];
            let mut sample = Sample {
                t: started.elapsed().as_secs_f64(),
                rss: [0; 3],
                fds: [0; 3],
                threads: [0; 3],
                entries: [0.0; 3],
                outbox_bytes: metric(a, "sluice_replication_outbox_bytes", &[]),
                lag: [
                    Gauge::Peer(ports[1]).read(a),
                    Gauge::Peer(ports[2]).read(a),
                    Gauge::Tier.read(a),
                ],
                fault,
            };
            for (i, pid) in pids.iter().enumerate() {
                if let Some(pid) = pid {
                    let (rss, fds, threads) = proc_stats(*pid);
                    sample.rss[i] = rss;
                    sample.fds[i] = fds;
                    sample.threads[i] = threads;
                }
            }
            let addrs = [Some(a), b_node.as_ref().map(|b| b.addr), Some(c)];
            for (i, addr) in addrs.iter().enumerate() {
                if let Some(addr) = addr {
                    sample.entries[i] = metric(*addr, "sluice_store_entries", &[]);
                }
            }
            // Every 30 s, each node's threads by name and open files by
            // kind (`fd:...`), for bench/soak's report of which came or went.
            if let Some(dir) = out.as_ref().filter(|_| samples.len().is_multiple_of(30)) {
                let mut lines = String::new();
                for (pid, name) in pids.iter().zip(["A", "B", "C"]) {
                    let names = pid.map(|pid| {
                        let mut names = thread_names(pid);
                        names.extend(fd_kinds(pid));
                        names
                    });
                    for (thread, count) in names.unwrap_or_default() {
                        lines.push_str(&format!("{:.1},{name},{thread},{count}\n", sample.t));
                    }
                }
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("threads.csv"))
                    .expect("threads.csv");
                std::io::Write::write_all(&mut file, lines.as_bytes()).expect("threads.csv");
            }
            samples.push(sample);
            std::thread::sleep(Duration::from_secs(1));
        }
        stop.store(true, Ordering::Relaxed);
        drop(fault_rules);
        if let Some(path) = filler.take() {
            let _ = std::fs::remove_file(path);
        }
    });
    if b_node.is_none() {
        b_node = Some(start(1));
    }
    while let Ok((path, data)) = acked.try_recv() {
        record(path, data);
    }
    let b = b_node.as_ref().expect("B").addr;
    if let Some(dir) = &out {
        write_soak_samples(dir, &samples);
    }
    let ended = Instant::now();
    let converging = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for (i, (peer, port, name)) in [(b, ports[1], "B"), (c, ports[2], "C")]
            .into_iter()
            .enumerate()
        {
            ledgers[i].converge(
                &format!("the soak's end, {name}"),
                a,
                &Gauge::Peer(port),
                peer,
                Duration::from_secs(120),
                Duration::from_secs(5),
            );
        }
        if weed.is_some() {
            wait_for(
                "the tier to hold everything",
                Duration::from_secs(120),
                || Gauge::Tier.read(a) == 0.0,
            );
        }
    }));
    if let Err(panic) = converging {
        if let Some(dir) = &out {
            let b_node = b_node.as_ref().expect("B");
            keep_soak_evidence(dir, &[("A", &a_node), ("B", b_node), ("C", &c_node)]);
        }
        std::panic::resume_unwind(panic);
    }
    let converged = ended.elapsed();
    if let Some(weed) = &weed {
        for (path, data) in &writes {
            let key = path.trim_start_matches("/v1/artifacts/soak/");
            assert_eq!(
                weed.object("soak", key).as_deref(),
                data.as_deref(),
                "{path} in the bucket"
            );
        }
    }
    let requests = load.requests.load(Ordering::Relaxed);
    let errors = load.errors.load(Ordering::Relaxed);
    // Bounds: from a quarter of the way in (after the warm-up) to the end.
    let base_at = samples
        .iter()
        .position(|s| s.t >= secs as f64 / 4.0)
        .unwrap_or(0);
    let base = &samples[base_at];
    let mut report = String::new();
    for (i, name) in ["A", "B", "C"].iter().enumerate() {
        let later: Vec<&Sample> = samples[base_at..].iter().filter(|s| s.rss[i] > 0).collect();
        let max = |f: &dyn Fn(&Sample) -> u64| later.iter().map(|s| f(s)).max().unwrap_or(0);
        let (rss, fds, threads) = (
            max(&|s| s.rss[i]),
            max(&|s| s.fds[i]),
            max(&|s| s.threads[i]),
        );
        let last = later.last().map_or((0, 0, 0, 0.0), |s| {
            (s.rss[i], s.fds[i], s.threads[i], s.entries[i])
        });
        report.push_str(&format!(
            "{name}: RSS {} -> max {} -> end {} MiB, open files {} -> max {fds} -> end {}, \
             threads {} -> max {threads} -> end {}, artifacts {} -> end {}\n",
            base.rss[i] >> 20,
            rss >> 20,
            last.0 >> 20,
            base.fds[i],
            last.1,
            base.threads[i],
            last.2,
            base.entries[i],
            last.3
        ));
        if i != 1 && base.rss[i] > 0 {
            // B restarts: its own figures start again each time.
            assert!(
                rss <= base.rss[i] + base.rss[i] / 4 + (24 << 20),
                "{name}'s RSS grew from {} to {} MiB",
                base.rss[i] >> 20,
                rss >> 20
            );
            // What the design lets a node hold open at once beyond the base: per peer up to
            // 32 sends in flight, each a socket, the artifact's file and a splice pipe (4);
            // 16 tier uploads (socket and file); 64 for connections and caches.
            let fds_slack = 2 * 32 * 4 + 16 * 2 + 64;
            assert!(
                fds <= base.fds[i] + fds_slack,
                "{name}'s open files {} -> {fds}",
                base.fds[i]
            );
            // And back near the base once the load is over: nothing leaked.
            assert!(
                last.1 <= base.fds[i] + 64,
                "{name}'s open files {} -> {} at the end",
                base.fds[i],
                last.1
            );
            assert!(
                threads <= base.threads[i] + 16,
                "{name}'s threads {} -> {threads}",
                base.threads[i]
            );
        }
    }
    let outbox_max = samples.iter().map(|s| s.outbox_bytes).fold(0.0, f64::max);
    println!(
        "soak: {secs} s, {requests} public requests, {errors} failed, {puts} writes and \
         {deletes} deletes; every one on B, C{} {converged:?} after the load ended; A's outbox \
         at most {outbox_max} bytes\n{report}",
        if weed.is_some() {
            " and in the bucket"
        } else {
            ""
        },
    );
    if let Some(dir) = &out {
        std::fs::write(
            dir.join("summary.txt"),
            format!(
                "{secs} s, {requests} public requests, {errors} failed, {puts} writes and \
                 {deletes} deletes, converged {converged:?} after the load ended\n{report}"
            ),
        )
        .expect("summary");
    }
    assert_eq!(errors, 0, "public requests failed during the soak");
    drop(c_disk);
}
