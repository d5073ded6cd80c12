//! The cold path through the real binary: artifacts whose pages are not in the page cache are
//! served byte-identical (whole, ranges, small and large), through the ring's cold opens and
//! cold reads, and a client that stops reading or goes away stops the disk reads for it.
//!
//! Pages are dropped with `fadvise(DONTNEED)` on the artifact's file after `fsync`, which
//! evicts clean pages: no root and no cgroup needed. Where the kernel cannot tell residency
//! (no cachestat(2)) or plaintext is not on the ring, the tests skip loudly.

mod common;
use common::*;

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Drops every page of every file under `dir` from the page cache.
fn evict_all(dir: &Path) {
    for path in files_under(dir) {
        let file = std::fs::File::open(&path).expect("open artifact file");
        file.sync_all().expect("fsync artifact file");
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
    }
}

fn artifact_file(dir: &Path, key: &str) -> PathBuf {
    files_under(dir)
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == key))
        .expect("artifact file on disk")
}

fn metric(server: &Server, name: &str) -> f64 {
    let r = server.send(Front::Http1, req("GET", "/metrics"));
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A server on the ring with residency known, or `None` (skip).
fn cold_server() -> Option<Server> {
    let server = server().start();
    let (uring, mode) = engine_status(&server);
    if !uring {
        eprintln!("SKIP: plaintext is not on the ring here: {mode}");
        return None;
    }
    let r = server.send(Front::Http1, req("GET", "/status"));
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("status json");
    if v["engine"]["cold"]["page_cache_residency_known"] != serde_json::Value::Bool(true) {
        eprintln!("SKIP: this kernel cannot tell page-cache residency (no cachestat)");
        return None;
    }
    Some(server)
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|n| (n.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

#[test]
fn cold_artifacts_are_served_byte_identical_through_cold_opens_and_reads() {
    let Some(server) = cold_server() else { return };
    let small = pattern(10_000, 1);
    let large = pattern(9 * 1024 * 1024 + 123, 2);
    for (key, body) in [("small", &small), ("large", &large)] {
        let r = server.send(
            Front::Http1,
            req("PUT", &format!("/v1/artifacts/cold/{key}")).body(body.clone()),
        );
        assert_eq!(r.status, 201);
    }
    let cases: &[(&str, Option<(usize, usize)>)] = &[
        ("small", None),
        ("small", Some((100, 4_999))),
        ("large", None),
        ("large", Some((3_000_000, 7_654_321))),
        ("large", Some((9 * 1024 * 1024, 9 * 1024 * 1024 + 122))),
    ];
    for &(key, range) in cases {
        // A fresh server for every case would also empty the open-file
        // cache; evicting the pages is what makes the read cold.
        evict_all(&server.data_dir);
        let body = if key == "small" { &small } else { &large };
        let mut request = req("GET", &format!("/v1/artifacts/cold/{key}"));
        if let Some((a, b)) = range {
            request = request.header("Range", &format!("bytes={a}-{b}"));
        }
        let r = server.send(Front::Http1, request);
        match range {
            None => {
                assert_eq!(r.status, 200, "{key}");
                assert!(r.body == *body, "{key}: cold body differs");
            }
            Some((a, b)) => {
                assert_eq!(r.status, 206, "{key} {a}-{b}");
                assert!(r.body == body[a..=b], "{key} {a}-{b}: cold range differs");
            }
        }
    }
    assert!(
        metric(&server, "sluice_ring_cold_opens_total") >= 1.0,
        "a cold header went to the opener"
    );
    assert!(metric(&server, "sluice_ring_cold_reads_total") >= 1.0);
    assert!(metric(&server, "sluice_ring_cold_read_bytes_total") >= 1_000_000.0);
    assert!(metric(&server, "sluice_ring_iowq_workers_max") > 0.0);
    // HEAD of a cold artifact needs only its header.
    evict_all(&server.data_dir);
    let h = server.send(Front::Http1, req("HEAD", "/v1/artifacts/cold/large"));
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-length"), Some(&*large.len().to_string()));
}

/// Sends a GET for `path` and reads just past the head plus `body_bytes`.
fn start_download(server: &Server, path: &str, body_bytes: usize) -> TcpStream {
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // A small receive buffer so the server meets back-pressure early.
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&s, 64 * 1024);
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while got < body_bytes {
        let n = read_some(&mut s, &mut buf).expect("read body");
        assert!(n > 0, "closed early");
        got += n;
    }
    s
}

fn wait_stable(server: &Server, name: &str) -> f64 {
    let mut last = metric(server, name);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = metric(server, name);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

#[test]
fn a_client_that_stops_reading_or_leaves_stops_the_cold_reads() {
    let Some(server) = cold_server() else { return };
    const BODY_BYTES: usize = 48 * 1024 * 1024;
    let body = pattern(BODY_BYTES, 3);
    let r = server.send(
        Front::Http1,
        req("PUT", "/v1/artifacts/cold/big").body(body),
    );
    assert_eq!(r.status, 201);
    let file = artifact_file(&server.data_dir, "big");

    // A client that stops reading after 2 MiB: the server reads on only as
    // far as the socket buffers, the pipe and the read-ahead window reach.
    evict_all(&server.data_dir);
    let before = metric(&server, "sluice_ring_cold_read_bytes_total");
    let stalled = start_download(&server, "/v1/artifacts/cold/big", 2 * 1024 * 1024);
    let read = wait_stable(&server, "sluice_ring_cold_read_bytes_total") - before;
    assert!(read > 0.0, "the download was cold");
    assert!(
        read < (BODY_BYTES / 3) as f64,
        "a stalled client made the server read {read} bytes of {BODY_BYTES}"
    );
    // And the page cache holds little more than that: read-ahead is bounded.
    let resident = resident_bytes(&file);
    eprintln!("stalled client: {read} bytes read cold, {resident} bytes resident of {BODY_BYTES}");
    assert!(
        resident < BODY_BYTES as u64 / 2,
        "{resident} bytes of {BODY_BYTES} were read into the page cache for a stalled client"
    );

    // The client goes away: the reads for it stop, the connection closes.
    drop(stalled);
    let after_close = wait_stable(&server, "sluice_ring_cold_read_bytes_total");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        metric(&server, "sluice_ring_cold_read_bytes_total"),
        after_close,
        "cold reads go on after the client left"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&server, "sluice_ring_connections") > 1.0 {
        assert!(
            Instant::now() < deadline,
            "the stalled connection never closed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A client that reads it all still gets every byte, cold.
    evict_all(&server.data_dir);
    let r = server.send(Front::Http1, req("GET", "/v1/artifacts/cold/big"));
    assert_eq!(r.status, 200);
    assert!(r.body == pattern(BODY_BYTES, 3), "cold 48 MiB body differs");
}

/// Bytes of `path` in the page cache (cachestat(2), as the server asks).
fn resident_bytes(path: &Path) -> u64 {
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    sluice_uring::residency::cached_bytes(&file, 0, len).expect("cachestat")
}
