//! The io_uring engine against the real binary: what plaintext HTTP/1 on
//! the ring must survive (slow readers, aborted downloads, many
//! connections, slow heads) and what it must report.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn metric(server: &Server, name_and_labels: &str) -> Option<u64> {
    let r = server.send(Front::Http1, req("GET", "/metrics"));
    String::from_utf8_lossy(&r.body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name_and_labels))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .reduce(|a, b| a + b)
}

fn uring_available(server: &Server) -> bool {
    let (on, mode) = engine_status(server);
    if !on {
        eprintln!("SKIP: io_uring is not available here: {mode}");
    }
    on
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn plaintext_gets_are_spliced_and_copy_mode_copies() {
    let server = server().no_tls().start();
    if !uring_available(&server) {
        return;
    }
    let body = put_blob(&server, "/v1/artifacts/e/s", 3 << 20);
    let before = metric(&server, "sluice_response_bytes_total{path=\"ring_splice\"}").unwrap_or(0);
    let r = server.send(Front::Http1, req("GET", "/v1/artifacts/e/s"));
    assert_eq!(r.body, body);
    let after = metric(&server, "sluice_response_bytes_total{path=\"ring_splice\"}").unwrap_or(0);
    assert!(
        after >= before + body.len() as u64,
        "ring_splice {before} -> {after}"
    );
    // A range too large to go inline is spliced too, exactly the range.
    let r = server.send(
        Front::Http1,
        req("GET", "/v1/artifacts/e/s").header("Range", "bytes=1000-2098575"),
    );
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some("bytes 1000-2098575/3145728")
    );
    assert_eq!(r.body, &body[1000..2_098_576]);
    let ranged = metric(&server, "sluice_response_bytes_total{path=\"ring_splice\"}").unwrap_or(0);
    assert!(
        ranged >= after + 2_097_576,
        "ring_splice {after} -> {ranged}"
    );

    let copy = server_copy();
    let body = put_blob(&copy, "/v1/artifacts/e/c", (1 << 20) + 17);
    let r = copy.send(Front::Http1, req("GET", "/v1/artifacts/e/c"));
    assert_eq!(r.body, body);
    let r = copy.send(
        Front::Http1,
        req("GET", "/v1/artifacts/e/c").header("Range", "bytes=100-300099"),
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &body[100..300_100]);
    assert!(
        metric(&copy, "sluice_response_bytes_total{path=\"ring_copy\"}").unwrap_or(0)
            >= body.len() as u64
    );
}

fn server_copy() -> Server {
    server()
        .no_tls()
        .arg("--file-serving-mode")
        .arg("copy")
        .start()
}

#[test]
fn slow_reader_gets_every_byte() {
    common::slow_reader_gets_every_byte(server().no_tls());
}

#[test]
fn aborted_downloads_leak_no_fds_or_pipes() {
    let server = server().no_tls().start();
    put_blob(&server, "/v1/artifacts/e/big", 16 << 20);
    let pid = server.child.id();
    // Warm up: one complete download creates the pooled pipes.
    let _ = server.send(Front::Http1, req("GET", "/v1/artifacts/e/big"));
    std::thread::sleep(Duration::from_millis(200));
    let before = fd_count(pid);
    for _ in 0..20 {
        let mut s = TcpStream::connect(server.addr).expect("connect");
        s.write_all(b"GET /v1/artifacts/e/big HTTP/1.1\r\nHost: a\r\n\r\n")
            .expect("write");
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        drop(s); // close mid-body
    }
    // The server notices each close on its next send; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = fd_count(pid);
        if now <= before + 2 || Instant::now() > deadline {
            assert!(now <= before + 2, "fds before {before}, after {now}");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.status(Front::Http1, "GET", "/up"), 200);
}

#[test]
fn a_thousand_keep_alive_connections() {
    // One test client is one address: lift the per-address cap (default 256 per thread).
    let server = server()
        .no_tls()
        .env("SLUICE_CONNECTIONS_PER_IP_MAX", "0")
        .start();
    put_blob(&server, "/v1/artifacts/e/small", 4096);
    let mut conns: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(server.addr).expect("connect"))
        .collect();
    for round in 0..2 {
        for s in &mut conns {
            s.write_all(b"GET /v1/artifacts/e/small HTTP/1.1\r\nHost: a\r\n\r\n")
                .expect("write");
        }
        for (i, s) in conns.iter_mut().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            let r = read_one_response(s, &format!("conn {i} round {round}"));
            assert_eq!((r.status, r.body.len()), (200, 4096), "conn {i}");
        }
    }
}

#[test]
fn slow_head_gets_408_while_others_are_served() {
    common::slow_head_gets_408_while_others_are_served(server().no_tls());
}

#[test]
fn fallback_engine_serves_everything_and_says_so() {
    let server = server().env("SLUICE_ENGINE", "fallback").start();
    let r = server.send(Front::Http1, req("GET", "/status"));
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["engine"]["io_uring"], false, "{v}");
    let body = put_blob(&server, "/v1/artifacts/e/f", 100_000);
    for front in FRONTS {
        let r = server.send(front, req("GET", "/v1/artifacts/e/f"));
        assert_eq!((r.status, &r.body), (200, &body), "{front:?}");
    }
    assert!(
        metric(&server, "sluice_response_bytes_total{path=\"fallback\"}").unwrap_or(0) >= 400_000
    );
}

#[test]
fn open_file_cache_hits_and_serves_replacements_fresh() {
    // The hot set would answer these GETs from memory before the open-file cache is asked
    // (tests/hot_set.rs covers it); this test is about the cache.
    let server = server().no_tls().env("SLUICE_HOT_SET_BYTES", "0").start();
    if !uring_available(&server) {
        return;
    }
    for round in 0..3u8 {
        let body = vec![round; 10_000 + usize::from(round)];
        let r = server.send(
            Front::Http1,
            req("PUT", "/v1/artifacts/e/cached").body(body.clone()),
        );
        assert!(r.status == 201 || r.status == 204);
        for _ in 0..5 {
            let r = server.send(Front::Http1, req("GET", "/v1/artifacts/e/cached"));
            assert_eq!(
                r.body, body,
                "round {round}: a replaced artifact is never served stale"
            );
        }
    }
    let cached = "/v1/artifacts/e/cached";
    assert_eq!(server.status(Front::Http1, "DELETE", cached), 204);
    assert_eq!(server.status(Front::Http1, "GET", cached), 404);
    // Published every tick (100 ms).
    std::thread::sleep(Duration::from_millis(300));
    let hits = metric(&server, "sluice_ring_open_file_hits_total").unwrap_or(0);
    assert!(hits >= 6, "open-file cache hits: {hits}");
}

/// Out of file descriptors, the multishot accept fails with EMFILE until
/// some close. The engine pauses accepting for a tick instead of re-arming
/// in a loop (which spun on the error: one failed accept per ring round
/// trip, and a log line each), and serves again once fds are free. The
/// limit is set at start: io_uring reads RLIMIT_NOFILE when an accept is
/// armed, so lowering it on a running server would not reach the armed one.
#[test]
fn accept_pauses_on_emfile_and_recovers() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: prlimit (util-linux) is not installed");
        return;
    }
    // The idle server holds about 25 fds (rings, listeners, store, logs).
    let server = server().no_tls().nofile(48).start();
    if !uring_available(&server) {
        return;
    }
    let conns: Vec<TcpStream> = (0..64)
        .filter_map(|_| TcpStream::connect(server.addr).ok())
        .collect();
    assert!(conns.len() > 30, "the kernel backlog takes the connections");
    std::thread::sleep(Duration::from_millis(1000));
    let accepted_while_full = fd_count(server.child.id());
    drop(conns);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(server.status(Front::Http1, "GET", "/up"), 200);
    // Bounded by the limit, not by the 64 connections waiting.
    assert!(accepted_while_full < 60, "{accepted_while_full} fds");
    let errors = metric(&server, "sluice_ring_accept_errors_total").unwrap_or(0);
    // About one per engine thread per 100 ms tick over ~1 s; a re-arm loop
    // makes thousands.
    assert!(
        (1..=200).contains(&errors),
        "accept errors while out of fds: {errors}"
    );
}

/// Past `connections_per_core_max` the ring hands new connections to the
/// fallback, which serves them: nothing is refused and nothing waits
/// unbounded on the ring.
#[test]
fn over_capacity_connections_are_served_by_the_fallback() {
    let server = server()
        .no_tls()
        .config("connections_per_core_max = 2\nengine_threads = 1\n")
        .start();
    if !uring_available(&server) {
        return;
    }
    put_blob(&server, "/v1/artifacts/e/cap", 4096);
    // Six idle keep-alive connections hold the ring's two slots and more.
    let mut held: Vec<TcpStream> = (0..6)
        .map(|_| TcpStream::connect(server.addr).expect("connect"))
        .collect();
    for (i, s) in held.iter_mut().enumerate() {
        s.write_all(b"GET /v1/artifacts/e/cap HTTP/1.1\r\nHost: a\r\n\r\n")
            .expect("write");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let r = read_one_response(s, &format!("conn {i}"));
        assert_eq!((r.status, r.body.len()), (200, 4096), "conn {i}");
    }
    let over = metric(&server, "sluice_ring_over_capacity_total").unwrap_or(0);
    assert!(over >= 4, "over-capacity hand-offs: {over}");
    let served = metric(&server, "sluice_fallback_accepted_http1_total").unwrap_or(0);
    assert!(served >= 4, "fallback HTTP/1 connections: {served}");
}

/// An idle keep-alive connection is closed after `idle_timeout_ms`.
#[test]
fn idle_keep_alive_connections_are_closed() {
    let server = server().no_tls().config("idle_timeout_ms = 300\n").start();
    if !uring_available(&server) {
        return;
    }
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.write_all(b"GET /up HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let r = read_one_response(&mut s, "/up");
    assert_eq!(r.status, 200);
    let mut buf = [0u8; 4096];
    // Then nothing more arrives, and the server closes (EOF) well inside the
    // 10 s read timeout.
    let start = Instant::now();
    let n = read_some(&mut s, &mut buf).expect("EOF, not a timeout");
    assert_eq!(n, 0);
    assert!(start.elapsed() < Duration::from_secs(9));
}

/// An h2c client whose first segment is only `PR` (the rest of the preface
/// follows later) still reaches the h2 fallback: the ring cannot tell `PR`
/// from the start of `PUT`, so it peeks again instead of taking the bytes
/// as HTTP/1. Before, it answered with an HTTP/1.1 error.
#[test]
fn a_split_h2c_preface_is_still_handed_off() {
    let server = server().no_tls().start();
    if !uring_available(&server) {
        return;
    }
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(b"PR").expect("first segment");
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(b"I * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .expect("rest of the preface");
    // An empty SETTINGS frame: length 0, type 4, flags 0, stream 0.
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).expect("settings");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut head = [0u8; 9];
    s.read_exact(&mut head).expect("the server's first frame");
    assert_ne!(&head[..5], b"HTTP/", "answered as HTTP/1");
    assert_eq!(head[3], 4, "h2 servers open with SETTINGS: {head:?}");
    // The ring thread counts the hand-off after the fallback took the socket,
    // so the fallback's answer can arrive first: wait (bounded) for the count.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&server, "sluice_ring_handed_off_total").unwrap_or(0) < 1 {
        assert!(Instant::now() < deadline, "no hand-off counted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs as nobody under a memlock limit, if this host lets the test do
/// that (root, util-linux prlimit and setpriv); None (skipped, loudly)
/// otherwise. The data dir is world-writable so nobody can use it.
fn unprivileged_server(memlock_bytes: u64, extra: &[&str]) -> Option<(Server, tempfile::TempDir)> {
    let tools = ["prlimit", "setpriv"].iter().all(|t| {
        std::process::Command::new(t)
            .arg("--version")
            .output()
            .is_ok()
    });
    if !tools || !rustix::process::geteuid().is_root() {
        eprintln!("SKIP: needs root with prlimit and setpriv to run the server unprivileged");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    use std::os::unix::fs::PermissionsExt;
    for p in [dir.path(), data.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let mut b = server()
        .no_tls()
        .data_dir(&data)
        .unprivileged_memlock(memlock_bytes);
    for a in extra {
        b = b.arg(a);
    }
    Some((b.start(), dir))
}

/// Without CAP_IPC_LOCK and with a 512 KiB memlock limit, the rings come up (their fixed
/// buffers are registered on first use, so nothing is pinned at start), but 16 copy-mode
/// reads at once need more 256 KiB buffers than the limit can pin: each ring says so once in
/// the log, naming memlock, and serves on (those reads go into the same buffers,
/// unregistered).
#[test]
fn refused_fixed_buffers_are_reported_once_and_serving_goes_on() {
    let Some((server, _dir)) = unprivileged_server(512 << 10, &["--file-serving-mode", "copy"])
    else {
        return;
    };
    let (on, mode) = engine_status(&server);
    if !on {
        eprintln!("SKIP: no ring under a 512 KiB memlock limit here: {mode}");
        return;
    }
    let body = put_blob(&server, "/v1/artifacts/e/unreg", (1 << 20) + 3);
    for r in concurrent_gets(server.addr, "/v1/artifacts/e/unreg", 16) {
        assert_eq!((r.status, r.body == body), (200, true));
    }
    let refusals = || {
        server
            .stderr()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("fixed buffers: registration refused"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    wait_for("the refusal in the log", Duration::from_secs(10), || {
        !refusals().is_empty()
    });
    let lines = refusals();
    assert!(lines.iter().all(|l| l.contains("memlock")), "{lines:?}");
    // Once per ring at most, however many reads were refused.
    assert!(lines.len() <= 2, "{lines:?}");
}

/// With no memlock allowance at all, io_uring cannot set up a ring: the
/// epoll engine serves plaintext HTTP/1 (TLS and h2 go to the fallback),
/// and the log and /status say why.
#[test]
fn without_a_ring_the_epoll_engine_serves_and_says_why() {
    let Some((server, _dir)) = unprivileged_server(0, &[]) else {
        return;
    };
    let (on, mode) = engine_status(&server);
    if on {
        eprintln!("SKIP: this kernel sets up rings without memlock: {mode}");
        return;
    }
    assert!(mode.starts_with("epoll"), "{mode}");
    assert!(mode.contains("memlock"), "says why: {mode}");
    let body = put_blob(&server, "/v1/artifacts/e/fb", 300_000);
    let r = server.send(Front::Http1, req("GET", "/v1/artifacts/e/fb"));
    assert_eq!((r.status, r.body == body), (200, true));
    assert!(metric(&server, "sluice_epoll_sendfile_bytes_total").unwrap_or(0) >= 300_000);
    assert!(server
        .stderr()
        .contains("io_uring unavailable, serving plaintext HTTP/1 on epoll threads"));
}

/// With two engine threads, each has its own SO_REUSEPORT listener and the
/// kernel spreads connections over both: every thread accepts some of 40
/// connections (all landing on one would happen with probability 2^-39).
#[test]
fn engine_threads_each_accept_on_their_own_listener() {
    let server = server().no_tls().arg("--engine-threads").arg("2").start();
    if !uring_available(&server) {
        return;
    }
    for _ in 0..40 {
        let r = server.send(Front::Http1, req("GET", "/up"));
        assert_eq!(r.status, 200);
    }
    for core in 0..2 {
        let accepted = metric(
            &server,
            &format!("sluice_ring_accepted_total{{core=\"{core}\"}}"),
        )
        .unwrap_or(0);
        assert!(accepted > 0, "engine thread {core} accepted nothing");
    }
    let (_, mode) = engine_status(&server);
    assert!(mode.contains("2 ring thread(s)"), "{mode}");
}
