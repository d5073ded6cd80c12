//! The portable epoll engine (`engine = "epoll"`, what `auto` runs where
//! io_uring is refused) against the real binary: every front, slow readers,
//! slow heads, pipelining, idle keep-alive, cold bodies, and what it reports.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn metric(server: &Server, name: &str) -> u64 {
    let r = server.send(Front::Http1, req("GET", "/metrics"));
    String::from_utf8_lossy(&r.body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn epoll_server() -> ServerBuilder {
    server().env("SLUICE_ENGINE", "epoll")
}

#[test]
fn serves_every_front_and_says_so() {
    let server = epoll_server().start();
    let (uring, mode) = engine_status(&server);
    assert!(!uring, "{mode}");
    assert!(mode.starts_with("epoll"), "{mode}");
    let big = put_blob(&server, "/v1/artifacts/e/big", 3 << 20);
    let small = put_blob(&server, "/v1/artifacts/e/small", 1000);
    for front in FRONTS {
        for (path, body) in [
            ("/v1/artifacts/e/big", &big),
            ("/v1/artifacts/e/small", &small),
        ] {
            let r = server.send(front, req("GET", path));
            assert_eq!((r.status, &r.body), (200, body), "{front:?} {path}");
        }
        let r = server.send(
            front,
            req("GET", "/v1/artifacts/e/big").header("range", "bytes=10-19"),
        );
        assert_eq!((r.status, &r.body[..]), (206, &big[10..20]), "{front:?}");
    }
    // Plaintext went through the epoll threads, the big body by sendfile;
    // TLS and h2c were handed to the fallback.
    assert!(metric(&server, "sluice_epoll_accepted_total") > 0);
    assert!(metric(&server, "sluice_epoll_sendfile_bytes_total") >= 3 << 20);
    assert!(metric(&server, "sluice_epoll_handed_off_total") > 0);
}

#[test]
fn slow_reader_gets_every_byte() {
    common::slow_reader_gets_every_byte(epoll_server());
}

#[test]
fn slow_head_gets_408_while_others_are_served() {
    common::slow_head_gets_408_while_others_are_served(epoll_server());
}

#[test]
fn pipelined_requests_and_uploads_on_one_connection() {
    let server = epoll_server().start();
    let raw = b"PUT /v1/artifacts/e/p1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
PUT /v1/artifacts/e/p2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n1\r\nf\r\n0\r\n\r\n\
GET /v1/artifacts/e/p1 HTTP/1.1\r\nHost: a\r\n\r\n\
GET /v1/artifacts/e/p2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let out = server.http1(raw);
    let mut at = 0;
    let mut got = Vec::new();
    while let Some((r, n)) = parse_response(&out[at..], false) {
        got.push((r.status, r.body));
        at += n;
    }
    assert_eq!(
        got,
        vec![
            (201, Vec::new()),
            (201, Vec::new()),
            (200, b"abc".to_vec()),
            (200, b"def".to_vec())
        ]
    );
}

#[test]
fn idle_keep_alive_connections_are_closed() {
    let server = epoll_server().env("SLUICE_IDLE_TIMEOUT_MS", "500").start();
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.write_all(b"GET /up HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    let first = read_one_response(&mut s, "first");
    assert_eq!(first.status, 200);
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(started.elapsed() < Duration::from_secs(4));
}

/// A body the page cache does not hold is read by the core's reader thread
/// (never by sendfile on the engine thread) and arrives intact.
#[test]
fn a_cold_body_is_read_off_the_engine_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = epoll_server().data_dir(dir.path()).start();
    let body = put_blob(&server, "/v1/artifacts/cold/blob", 6 << 20);
    // Evict the file's pages (it is clean: fsync = always wrote it back).
    let files = files_under(&dir.path().join("cold"));
    assert_eq!(files.len(), 1, "{files:?}");
    let f = std::fs::File::open(&files[0]).expect("open artifact");
    f.sync_all().expect("sync");
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
    let r = server.send(Front::Http1, req("GET", "/v1/artifacts/cold/blob"));
    assert_eq!(r.status, 200);
    assert!(r.body == body, "body differs");
    let (uring, mode) = engine_status(&server);
    assert!(!uring, "{mode}");
    if sluice_residency_known(&server) {
        assert!(metric(&server, "sluice_epoll_cold_reads_total") >= 1);
        assert!(metric(&server, "sluice_epoll_cold_read_bytes_total") >= 1 << 20);
    } else {
        eprintln!("SKIP cold-read counters: page-cache residency is unknown on this kernel");
    }
}

fn sluice_residency_known(server: &Server) -> bool {
    // cachestat(2) arrived in Linux 6.5; without it residency is unknown
    // and bodies go by sendfile as before.
    let r = server.send(Front::Http1, req("GET", "/status"));
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    v["engine"]["cold"]["page_cache_residency_known"]
        .as_bool()
        .unwrap_or(false)
}

/// SIGTERM: a download in flight finishes, new connections are refused, the
/// process exits 0.
#[test]
fn a_download_in_flight_finishes_across_sigterm() {
    let mut server = epoll_server().start();
    let body = put_blob(&server, "/v1/artifacts/e/drain", 16 << 20);
    let mut s = start_get(server.addr, "/v1/artifacts/e/drain");
    let mut first = vec![0u8; 64 * 1024];
    let n = read_some(&mut s, &mut first).expect("first bytes");
    let pid = rustix::process::Pid::from_raw(server.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let mut out = first[..n].to_vec();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match read_some(&mut s, &mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e}"),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let (resp, _) = parse_response(&out, false).expect("response");
    assert!(resp.body == body, "body differs");
    let status = server.stop();
    assert!(status.success(), "{status}");
}
