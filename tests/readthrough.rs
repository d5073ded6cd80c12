//! Read-through from peers and the replication limiter, through real
//! `sluice serve` processes on loopback. Only the corrupt (and the silent)
//! origin is a fake: a small TCP server in this file that answers the peer
//! API with wrong bytes, or never answers.
mod common;
use common::{http, metric_at as metric, wait_for};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{server, sha256_hex, xorshift_bytes as body, Server};

const SECRET: &str = "readthrough-test-secret-0123456789";

/// A node on an ephemeral port: `peers` empty makes an origin that only
/// answers the peer API.
fn node(peers: &[SocketAddr], extra: &[(&str, &str)]) -> Server {
    let mut b = server()
        .no_tls()
        .env("SLUICE_PEER_SECRET", SECRET)
        .env("SLUICE_PEER_PROBE_INTERVAL_MS", "200");
    if !peers.is_empty() {
        let list: Vec<String> = peers.iter().map(|p| p.to_string()).collect();
        b = b.arg("--peers").arg(&list.join(","));
    }
    for (k, v) in extra {
        b = b.env(k, v);
    }
    b.start()
}

fn put_ok(addr: SocketAddr, path: &str, body: &[u8]) {
    let r = http(addr, "PUT", path, &[], body);
    assert!(matches!(r.status, 201 | 204), "PUT {path} -> {}", r.status);
}

/// A's count of read-through requests it answered (`get`: found,
/// `get_missing`: not held).
fn peer_gets(a: SocketAddr, result: &str) -> f64 {
    metric(
        a,
        "sluice_replication_received_requests_total",
        &[&format!("result=\"{result}\"")],
    )
}

fn wait_peer_up(c: SocketAddr, peer: SocketAddr) {
    wait_for("the origin seen up", Duration::from_secs(20), || {
        metric(c, "sluice_peer_up", &[&format!("peer=\"{peer}\"")]) == 1.0
    });
}

/// An origin A and a node C that reads through from it (`extra` set on C), once C sees A up.
fn origin_and_reader(extra: &[(&str, &str)]) -> (Server, Server) {
    let a = node(&[], &[]);
    let c = node(&[a.addr], extra);
    wait_peer_up(c.addr, a.addr);
    (a, c)
}

#[test]
fn a_hundred_concurrent_misses_cost_one_fetch_and_are_served_like_hits() {
    // A holds the artifact and replicates to nobody; C reads through from A.
    let (a, c) = origin_and_reader(&[]);
    let (a_addr, c_addr) = (a.addr, c.addr);
    let payload = body(1, 300 * 1024);
    let path = "/v1/artifacts/team/only-on-a";
    put_ok(a_addr, path, &payload);
    assert_eq!(
        http(c_addr, "HEAD", "/v1/artifacts/team/other", &[], b"").status,
        404,
        "an unknown key is a miss on C too"
    );

    for r in common::concurrent_gets(c_addr, path, 100) {
        assert_eq!(r.status, 200);
        assert!(r.body == payload, "the body read through is A's");
    }
    assert_eq!(peer_gets(a_addr, "get"), 1.0, "exactly one fetch from A");
    assert_eq!(
        metric(
            c_addr,
            "sluice_read_through_fetches_total",
            &["result=\"ok\""]
        ),
        1.0
    );
    let coalesced = metric(c_addr, "sluice_read_through_coalesced_total", &[]);
    println!("100 concurrent misses on C: 1 fetch from A, {coalesced} requests coalesced into it");

    // C stored it: served as a local hit now, with the same ETag as A.
    let etag = http(a_addr, "HEAD", path, &[], b"")
        .header("etag")
        .expect("etag")
        .to_string();
    let hit = http(c_addr, "GET", path, &[], b"");
    assert_eq!(hit.header("etag"), Some(etag.as_str()));

    // Range, If-None-Match and HEAD on a miss behave as on a local hit.
    let p2 = "/v1/artifacts/team/range-me";
    let b2 = body(2, 10_000);
    put_ok(a_addr, p2, &b2);
    let r = http(c_addr, "GET", p2, &[("Range", "bytes=100-199")], b"");
    assert_eq!(r.status, 206);
    assert!(r.body == b2[100..200]);
    let p3 = "/v1/artifacts/team/etag-me";
    let b3 = body(3, 5_000);
    put_ok(a_addr, p3, &b3);
    let etag3 = http(a_addr, "HEAD", p3, &[], b"")
        .header("etag")
        .expect("etag")
        .to_string();
    assert_eq!(
        http(c_addr, "GET", p3, &[("If-None-Match", &etag3)], b"").status,
        304
    );
    let p4 = format!("/cas/{}", sha256_hex(&body(4, 7_000)));
    put_ok(a_addr, &p4, &body(4, 7_000));
    let head = http(c_addr, "HEAD", &p4, &[], b"");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("7000"));
    assert_eq!(peer_gets(a_addr, "get"), 4.0, "one fetch per key");
}

#[test]
fn an_absent_key_costs_one_round_within_the_negative_window() {
    let (a, c) = origin_and_reader(&[("SLUICE_READ_THROUGH_NEGATIVE_MS", "20000")]);
    let (a_addr, c_addr) = (a.addr, c.addr);
    let path = "/cache/absent-everywhere";
    let handles: Vec<_> = (0..50)
        .map(|_| std::thread::spawn(move || http(c_addr, "GET", path, &[], b"").status))
        .collect();
    for h in handles {
        assert_eq!(h.join().expect("client"), 404);
    }
    for _ in 0..50 {
        assert_eq!(http(c_addr, "HEAD", path, &[], b"").status, 404);
    }
    assert_eq!(
        peer_gets(a_addr, "get_missing"),
        1.0,
        "one round for the storm"
    );
    assert!(metric(c_addr, "sluice_read_through_negative_hits_total", &[]) >= 50.0);
    // Written on A now: still 404 on C until the window ends (the price
    // of the negative cache, bounded by read_through_negative_ms).
    put_ok(a_addr, path, b"late");
    assert_eq!(http(c_addr, "GET", path, &[], b"").status, 404);
    assert_eq!(peer_gets(a_addr, "get_missing"), 1.0);
}

/// A fake peer: answers probes, and answers every read-through with the
/// announced sha256 of `announced` but the bytes of `sent` (or, `silent`,
/// accepts and never answers). Counts the reads it was asked.
struct FakePeer {
    addr: SocketAddr,
    reads: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FakePeer {
    fn start(announced: Vec<u8>, sent: Vec<u8>, silent: bool) -> FakePeer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let reads = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (Arc::clone(&reads), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (announced, sent, r) =
                            (announced.clone(), sent.clone(), Arc::clone(&r));
                        if silent {
                            held.push(stream);
                            continue;
                        }
                        std::thread::spawn(move || serve_fake(stream, &announced, &sent, &r));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakePeer { addr, reads, stop }
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve_fake(mut s: TcpStream, announced: &[u8], sent: &[u8], reads: &AtomicU64) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // One request head at a time (peer requests here have no body).
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let answer = if head.starts_with("GET /_peer/v1/hello") {
            let b = "{\"node_id\":\"fake\"}";
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{b}", b.len()).into_bytes()
        } else if head.starts_with("GET /_peer/v1/get/") {
            reads.fetch_add(1, Ordering::SeqCst);
            let mut a = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nx-sluice-sha256: {}\r\nx-sluice-write-time-ms: 1700000000000\r\n\r\n",
                sent.len(),
                sha256_hex(announced)
            )
            .into_bytes();
            a.extend_from_slice(sent);
            a
        } else {
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()
        };
        if s.write_all(&answer).is_err() {
            return;
        }
    }
}

#[test]
fn a_corrupt_body_from_a_peer_is_refused_and_not_stored() {
    let real = body(7, 20_000);
    let mut wrong = real.clone();
    wrong[12_345] ^= 0x40;
    let fake = FakePeer::start(real.clone(), wrong, false);
    let c = node(&[fake.addr], &[("SLUICE_READ_THROUGH_NEGATIVE_MS", "0")]);
    let cas = format!("/cas/{}", sha256_hex(&real));
    assert_eq!(http(c.addr, "GET", &cas, &[], b"").status, 404);
    assert_eq!(fake.reads.load(Ordering::SeqCst), 1);
    assert_eq!(
        metric(
            c.addr,
            "sluice_read_through_fetches_total",
            &["result=\"corrupt\""]
        ),
        1.0
    );
    // Nothing stored: the next miss asks again (no negative cache here),
    // and is refused again.
    assert_eq!(http(c.addr, "HEAD", &cas, &[], b"").status, 404);
    assert_eq!(fake.reads.load(Ordering::SeqCst), 2);
    assert_eq!(metric(c.addr, "sluice_store_entries", &[]), 0.0);
    // A generic key is checked against the announced sha256 the same way.
    assert_eq!(
        http(c.addr, "GET", "/v1/artifacts/x/y", &[], b"").status,
        404
    );
    assert_eq!(
        metric(
            c.addr,
            "sluice_read_through_fetches_total",
            &["result=\"corrupt\""]
        ),
        3.0
    );
    assert_eq!(metric(c.addr, "sluice_store_entries", &[]), 0.0);
}

#[test]
fn a_silent_or_dead_peer_turns_a_miss_into_an_honest_404() {
    let silent = FakePeer::start(Vec::new(), Vec::new(), true);
    let dead = TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    let c = node(
        &[silent.addr, dead_addr],
        &[
            ("SLUICE_READ_THROUGH_TIMEOUT_MS", "500"),
            ("SLUICE_READ_THROUGH_NEGATIVE_MS", "0"),
        ],
    );
    let started = Instant::now();
    assert_eq!(http(c.addr, "GET", "/cache/nowhere", &[], b"").status, 404);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert_eq!(
        metric(
            c.addr,
            "sluice_read_through_fetches_total",
            &["result=\"timeout\""]
        ),
        1.0
    );
}

#[test]
fn public_ttfb_over_the_target_slows_replication() {
    // B receives; A replicates to B at 4 MiB/s, and also lists a peer that
    // accepts and never answers, so a public GET of an absent key on A
    // waits the whole read-through timeout (300 ms): public TTFB far over
    // the 50 ms target.
    //
    // Replication in the normal class on both: with the idle class a host
    // loaded by other tests (CI runs them in parallel) can starve the
    // quiet round, and what is tested is the limiter, not the class.
    let silent = FakePeer::start(Vec::new(), Vec::new(), true);
    let b = node(&[], &[("SLUICE_REPLICATION_SCHEDULING", "normal")]);
    let a = node(
        &[b.addr, silent.addr],
        &[
            ("SLUICE_REPLICATION_SCHEDULING", "normal"),
            ("SLUICE_REPLICATION_BYTES_PER_SECOND", "4MiB"),
            ("SLUICE_REPLICATION_BURST_BYTES", "1MiB"),
            ("SLUICE_READ_THROUGH_TIMEOUT_MS", "300"),
            ("SLUICE_READ_THROUGH_NEGATIVE_MS", "0"),
        ],
    );
    let (a_addr, b_addr) = (a.addr, b.addr);
    wait_peer_up(a_addr, b_addr);
    let received = || metric(b_addr, "sluice_replication_received_bytes_total", &[]);
    const ARTIFACTS: u64 = 64;
    const LEN: usize = 256 * 1024;
    let total = (ARTIFACTS as usize * LEN) as f64;
    // Bytes B received within `window` of the first of 64 PUTs of 256 KiB.
    let moved_in = |round: u64, window: Duration| {
        let before = received();
        let start = Instant::now();
        for i in 0..ARTIFACTS {
            put_ok(
                a_addr,
                &format!("/v1/artifacts/r{round}/k{i}"),
                &body(round * 1000 + i, LEN),
            );
        }
        std::thread::sleep(window.saturating_sub(start.elapsed()));
        received() - before
    };
    let quiet = moved_in(1, Duration::from_secs(3));
    wait_for("round 1 replicated", Duration::from_secs(60), || {
        received() >= total
    });

    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..6)
        .map(|t| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let _ = http(a_addr, "GET", &format!("/cache/absent-{t}-{n}"), &[], b"");
                    n += 1;
                }
            })
        })
        .collect();
    wait_for(
        "the limiter to see the load",
        Duration::from_secs(20),
        || metric(a_addr, "sluice_replication_public_ttfb_p99_seconds", &[]) > 0.05,
    );
    let loaded = moved_in(2, Duration::from_secs(3));
    let effective = metric(a_addr, "sluice_replication_effective_bytes_per_second", &[]);
    stop.store(true, Ordering::SeqCst);
    for h in load {
        let _ = h.join();
    }
    println!(
        "replication A -> B in 3 s: {:.1} MiB quiet, {:.1} MiB with public TTFB over target \
         (effective rate then {:.0} KiB/s of 4096)",
        quiet / 1048576.0,
        loaded / 1048576.0,
        effective / 1024.0
    );
    assert!(quiet > 4.0 * 1048576.0, "quiet round moved {quiet}");
    assert!(loaded * 2.0 < quiet, "quiet {quiet}, loaded {loaded}");
    assert!(effective < 4.0 * 1048576.0, "{effective}");
    assert_eq!(
        metric(a_addr, "sluice_replication_limit_bytes_per_second", &[]),
        4.0 * 1048576.0
    );
    assert!(metric(a_addr, "sluice_replication_throttled_bytes_total", &[]) > 0.0);
}

#[test]
fn the_fallback_front_reads_through_too() {
    // C without io_uring: the hyper front awaits the fetch, and the fetch
    // goes through the blocking senders.
    let (a, c) = origin_and_reader(&[("SLUICE_ENGINE", "fallback")]);
    let (a_addr, c_addr) = (a.addr, c.addr);
    let payload = body(11, 70_000);
    let path = "/cache/fallback-read";
    put_ok(a_addr, path, &payload);
    for r in common::concurrent_gets(c_addr, path, 20) {
        assert_eq!(r.status, 200);
        assert!(r.body == payload);
    }
    assert_eq!(peer_gets(a_addr, "get"), 1.0, "one fetch from A");
    let r = http(c_addr, "GET", path, &[("Range", "bytes=-10")], b"");
    assert_eq!(r.status, 206);
    assert!(r.body == payload[payload.len() - 10..]);
    assert_eq!(http(c_addr, "GET", "/cache/nowhere", &[], b"").status, 404);
}

/// An artifact too large to hold in memory (over 64 MiB) is read through
/// too: streamed from the peer into the store, digest checked, then served.
#[test]
fn an_artifact_over_the_memory_bound_is_streamed_through() {
    let (a, c) = origin_and_reader(&[("SLUICE_READ_THROUGH_TIMEOUT_MS", "30000")]);
    let payload = body(7, 70 << 20);
    let path = "/v1/artifacts/team/large-on-a";
    put_ok(a.addr, path, &payload);
    let r = http(c.addr, "GET", path, &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.body == payload, "the streamed body is A's");
    assert_eq!(
        metric(
            c.addr,
            "sluice_read_through_fetches_total",
            &["result=\"ok\""]
        ),
        1.0
    );
    // Stored on C: a local hit now, even with A gone.
    drop(a);
    let again = http(c.addr, "HEAD", path, &[], b"");
    assert_eq!(again.status, 200);
}
