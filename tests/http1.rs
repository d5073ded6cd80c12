//! Plaintext HTTP/1.1 at the byte level: framing, malformed input,
//! pipelining, 100-continue, chunked bodies, aborted uploads, restarts.

mod common;
use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

/// PUTs `bodies[i]` to `{prefix}{i}` over plaintext; each must be created (201).
fn put_all(server: &Server, prefix: &str, bodies: &[Vec<u8>]) {
    for (i, body) in bodies.iter().enumerate() {
        let r = server.send(
            Front::Http1,
            req("PUT", &format!("{prefix}{i}")).body(body.clone()),
        );
        assert_eq!(r.status, 201, "{prefix}{i}");
    }
}

/// GETs `{prefix}{i}` over plaintext; each must answer 200 with `bodies[i]`.
fn get_all(server: &Server, prefix: &str, bodies: &[Vec<u8>]) {
    for (i, body) in bodies.iter().enumerate() {
        let r = server.send(Front::Http1, req("GET", &format!("{prefix}{i}")));
        assert_eq!((r.status, r.body.len()), (200, body.len()), "{prefix}{i}");
        assert!(r.body == *body, "{prefix}{i}: body differs");
    }
}

fn status_of(raw: &[u8]) -> u16 {
    parse_response(raw, false)
        .map(|(r, _)| r.status)
        .unwrap_or_else(|| panic!("no response in {:?}", String::from_utf8_lossy(raw)))
}

/// Each malformed request gets its 4xx/5xx and the connection is closed (the
/// exchange ends with EOF, and the second request smuggled behind it is
/// never answered).
#[test]
fn malformed_requests_get_their_status_and_close() {
    let server = server().no_tls().start();
    // These are the sans-IO core's rules, which plaintext meets on the ring.
    // tests/framing.rs checks that the fallback's heads follow them too; the
    // body-level case here ("bad chunk size") is left to hyper's decoder
    // there (docs/security.md), so this test stays on the ring.
    let (on, mode) = engine_status(&server);
    if !on {
        eprintln!("SKIP: plaintext is served by the fallback here: {mode}");
        return;
    }
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(9000));
    let big_head = format!(
        "GET /up HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(20_000)
    );
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("CL.TE", b"PUT /v1/artifacts/ns/a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("duplicate CL", b"PUT /v1/artifacts/ns/a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx".to_vec(), 400),
        ("signed CL", b"PUT /v1/artifacts/ns/a HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx".to_vec(), 400),
        ("TE gzip", b"PUT /v1/artifacts/ns/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(), 0),
        ("obs-fold", b"GET /up HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n".to_vec(), 400),
        ("no host", b"GET /up HTTP/1.1\r\n\r\n".to_vec(), 400),
        ("HTTP/1.0 with TE", b"PUT /v1/artifacts/ns/a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("bad chunk size", b"PUT /v1/artifacts/ns/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n".to_vec(), 400),
        ("URI too long", long_uri.into_bytes(), 414),
        ("head too large", big_head.into_bytes(), 431),
    ];
    for (name, mut raw, want) in cases {
        raw.extend_from_slice(b"GET /up HTTP/1.1\r\nHost: a\r\n\r\n");
        let out = server.http1(&raw);
        let status = status_of(&out);
        if want == 0 {
            assert!(status == 400 || status == 501, "{name}: got {status}");
        } else {
            assert_eq!(status, want, "{name}: {}", String::from_utf8_lossy(&out));
        }
        let text = String::from_utf8_lossy(&out);
        assert_eq!(
            text.matches("HTTP/1.1 ").count(),
            1,
            "{name}: connection must close after the error: {text}"
        );
    }
    // Nothing was stored by any of them.
    let r = server.send(Front::Http1, req("GET", "/v1/artifacts/ns/a"));
    assert_eq!(r.status, 404);
}

#[test]
fn pipelined_requests_in_one_write() {
    let server = server().no_tls().start();
    let put = server.send(
        Front::Http1,
        req("PUT", "/v1/artifacts/ns/p").body(b"pipelined".to_vec()),
    );
    assert_eq!(put.status, 201);
    let raw = b"GET /v1/artifacts/ns/p HTTP/1.1\r\nHost: a\r\n\r\nHEAD /v1/artifacts/ns/p HTTP/1.1\r\nHost: a\r\n\r\nPUT /v1/artifacts/ns/q HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /v1/artifacts/ns/q HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let out = server.http1(raw);
    let (r1, n1) = parse_response(&out, false).expect("first");
    assert_eq!((r1.status, r1.body.as_slice()), (200, &b"pipelined"[..]));
    let (r2, n2) = parse_response(&out[n1..], true).expect("second");
    assert_eq!(r2.status, 200);
    assert_eq!(r2.header("content-length"), Some("9"));
    let (r3, n3) = parse_response(&out[n1 + n2..], false).expect("third");
    assert_eq!(r3.status, 201);
    let (r4, n4) = parse_response(&out[n1 + n2 + n3..], false).expect("fourth");
    assert_eq!((r4.status, r4.body.as_slice()), (200, &b"abc"[..]));
    assert_eq!(
        n1 + n2 + n3 + n4,
        out.len(),
        "nothing after the last response"
    );
}

#[test]
fn chunked_put_and_expect_continue() {
    let server = server().no_tls().start();
    let raw = b"PUT /v1/artifacts/ns/c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n";
    assert_eq!(status_of(&server.http1(raw)), 201);
    let r = server.send(Front::Http1, req("GET", "/v1/artifacts/ns/c"));
    assert_eq!(r.body, b"hello world");

    // Expect: 100-continue gets 100 before the body, then the final status.
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"PUT /v1/artifacts/ns/e HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n").expect("head");
    let mut buf = [0u8; 256];
    let n = read_some(&mut s, &mut buf).expect("100");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    s.write_all(b"body").expect("body");
    let mut out = buf[..n].to_vec();
    let start = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |p| p + 4);
    out.drain(..start);
    while parse_response(&out, false).is_none() {
        let n = read_some(&mut s, &mut buf).expect("final");
        assert!(n > 0, "closed early");
        out.extend_from_slice(&buf[..n]);
    }
    assert_eq!(status_of(&out), 201);

    // A refused PUT with Expect answers its final status without 100.
    let raw = b"PUT /v1/artifacts/ns/f HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999999\r\nExpect: 100-continue\r\n\r\n";
    let out = server.http1(raw);
    assert!(
        out.starts_with(b"HTTP/1.1 413 "),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn client_disconnect_mid_upload_leaves_nothing() {
    let server = server().no_tls().start();
    let before = files_under(&server.data_dir);
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.write_all(
        b"PUT /v1/artifacts/ns/cut HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n",
    )
    .expect("head");
    s.write_all(&vec![1u8; 3_000_000])
        .expect("part of the body");
    drop(s);
    std::thread::sleep(Duration::from_millis(300));
    let r = server.send(Front::Http1, req("GET", "/v1/artifacts/ns/cut"));
    assert_eq!(r.status, 404);
    // Not the artifact, and no named temp file either: the data dir holds
    // exactly what it held before the upload began.
    assert_eq!(files_under(&server.data_dir), before);
    // The server still works.
    assert_eq!(server.status(Front::Http1, "GET", "/up"), 200);
}

#[test]
fn restart_keeps_acknowledged_artifacts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let bodies: Vec<Vec<u8>> = (0..20)
        .map(|i| format!("artifact number {i}").repeat(i + 1).into_bytes())
        .collect();
    {
        let mut server = server().no_tls().data_dir(&data).start();
        put_all(&server, "/v1/artifacts/keep/a", &bodies);
        assert!(
            server.stop().success(),
            "clean exit on SIGTERM: {}",
            server.stderr()
        );
    }
    let server = server().no_tls().data_dir(&data).start();
    get_all(&server, "/v1/artifacts/keep/a", &bodies);
}

#[test]
fn readiness_turns_503_while_draining() {
    let mut server = server()
        .no_tls()
        .env("SLUICE_SHUTDOWN_PRE_DRAIN_MS", "4000")
        .start();
    assert_eq!(server.status(Front::Http1, "GET", "/ready"), 200);
    let pid = rustix::process::Pid::from_raw(server.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.status(Front::Http1, "GET", "/ready"), 503);
    assert_eq!(server.status(Front::Http1, "GET", "/up"), 200);
    assert!(server.stop().success());
}

/// kill -9 right after the 201s: every acknowledged artifact is there after
/// the restart (the publish is complete before the reply is sent), and no
/// temp file of an upload in flight at the kill became visible.
#[test]
fn kill_9_keeps_acknowledged_artifacts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let bodies: Vec<Vec<u8>> = (0..10).map(|i| vec![i as u8; 100_000 + i]).collect();
    {
        let mut server = server().no_tls().data_dir(&data).start();
        put_all(&server, "/v1/artifacts/crash/a", &bodies);
        // One more upload, half sent when the process dies.
        let mut s = TcpStream::connect(server.addr).expect("connect");
        s.write_all(
            b"PUT /v1/artifacts/crash/half HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n",
        )
        .expect("head");
        s.write_all(&[9u8; 400_000]).expect("half the body");
        std::thread::sleep(Duration::from_millis(200));
        server.child.kill().expect("SIGKILL");
        server.child.wait().expect("wait");
    }
    let server = server().no_tls().data_dir(&data).start();
    get_all(&server, "/v1/artifacts/crash/a", &bodies);
    let r = server.send(Front::Http1, req("GET", "/v1/artifacts/crash/half"));
    assert_eq!(r.status, 404);
    let visible: Vec<_> = files_under(&data)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("crash"))
        .collect();
    assert_eq!(visible.len(), bodies.len(), "{visible:?}");
}

/// A full disk answers 507 and leaves nothing visible; the server keeps
/// serving what it has. The data dir is a 2 MiB tmpfs (root only; skipped
/// loudly elsewhere).
#[test]
fn a_full_disk_answers_507_and_stores_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIP: cannot mount a small tmpfs here (needs root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let data = mnt.join("data");
    {
        let server = server().no_tls().data_dir(&data).start();
        let small = vec![1u8; 10_000];
        let r = server.send(
            Front::Http1,
            req("PUT", "/v1/artifacts/full/small").body(small.clone()),
        );
        assert_eq!(r.status, 201);
        let before = files_under(&data);
        let r = server.send(
            Front::Http1,
            req("PUT", "/v1/artifacts/full/big").body(vec![2u8; 3 << 20]),
        );
        assert_eq!(r.status, 507, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(
            files_under(&data),
            before,
            "nothing of the failed upload is visible"
        );
        let r = server.send(Front::Http1, req("GET", "/v1/artifacts/full/big"));
        assert_eq!(r.status, 404);
        let r = server.send(Front::Http1, req("GET", "/v1/artifacts/full/small"));
        assert_eq!((r.status, r.body), (200, small.clone()));
        // The disk filled to the last byte: small uploads (the commit
        // journal's) answer 507 too, and the log says so once, not once per
        // request (each 507 was an ERROR line, and each failed journal
        // append a WARN, before).
        let mut filler = std::fs::File::create(mnt.join("filler")).expect("filler");
        let block = vec![0u8; 64 * 1024];
        while filler.write_all(&block).is_ok() {}
        while filler.write_all(&block[..512]).is_ok() {}
        for i in 0..5 {
            let r = server.send(
                Front::Http1,
                req("PUT", &format!("/v1/artifacts/full/s{i}")).body(small.clone()),
            );
            assert_eq!(r.status, 507, "{}", String::from_utf8_lossy(&r.body));
        }
        let log = server.stderr();
        assert_eq!(log.matches("store out of space").count(), 1, "{log}");
        assert_eq!(log.matches("store error").count(), 0, "{log}");
        assert_eq!(log.matches("journal append failed").count(), 0, "{log}");
    }
}

/// With `store_bytes_max`, the background evictor keeps the store under its
/// budget, least recently used first: the artifact read most recently stays.
#[test]
fn store_bytes_max_evicts_least_recently_used() {
    let server = server()
        .no_tls()
        .config("store_bytes_max = 1000000\n")
        .start();
    // Written 20 ms apart, so their times of use differ.
    let put = |i: u8| {
        let r = server.send(
            Front::Http1,
            req("PUT", &format!("/v1/artifacts/lru/k{i}")).body(vec![i; 300_000]),
        );
        assert_eq!(r.status, 201);
        std::thread::sleep(Duration::from_millis(20));
    };
    (0..3).for_each(put);
    // k0 is the oldest write, but read now: k1 becomes the least recent.
    assert_eq!(
        server.status(Front::Http1, "GET", "/v1/artifacts/lru/k0"),
        200
    );
    std::thread::sleep(Duration::from_millis(20));
    (3..5).for_each(put);
    // Eviction runs in the background: wait (bounded) for the budget to hold.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let store_bytes = |server: &Server| -> u64 {
        let r = server.send(Front::Http1, req("GET", "/metrics"));
        String::from_utf8_lossy(&r.body)
            .lines()
            .find_map(|l| l.strip_prefix("sluice_store_bytes ")?.trim().parse().ok())
            .unwrap_or(u64::MAX)
    };
    while store_bytes(&server) > 1_000_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "store stayed over its budget"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = |k: &str| server.status(Front::Http1, "GET", &format!("/v1/artifacts/lru/{k}"));
    assert_eq!(status("k1"), 404, "least recently used goes first");
    assert_eq!(status("k4"), 200, "the newest stays");
    assert_eq!(status("k0"), 200, "a recent read keeps an old write");
}

/// A SIGTERM the moment the server says it is listening starts the graceful
/// shutdown: exit status 0. The handlers used to be installed only after the
/// "listening" line, and a signal in that gap killed the process outright
/// (this test failed most times then; the readiness test failed about one
/// run in four under load).
#[test]
fn sigterm_right_after_start_shuts_down_cleanly() {
    for round in 0..5 {
        let mut server = server().no_tls().start();
        let pid = rustix::process::Pid::from_raw(server.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill");
        let status = server.stop();
        assert!(
            status.success(),
            "round {round}: {status:?}\n{}",
            server.stderr()
        );
    }
}
