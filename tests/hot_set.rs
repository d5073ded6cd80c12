//! The hot set against the real binary, on each engine (ring, epoll, fallback): hot GETs are
//! answered from memory with the same headers on every front, and no write, delete or
//! eviction of a key ever lets a client see its old body.

mod common;
use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The engines a plaintext HTTP/1 request can be served by.
const ENGINES: [&str; 3] = ["auto", "epoll", "fallback"];

fn metric(server: &Server, name: &str) -> f64 {
    metric_at(server.addr, name, &[])
}

/// One GET on a keep-alive connection.
fn get_on(s: &mut TcpStream, path: &str) -> Resp {
    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(head.as_bytes()).expect("write");
    read_one_response(s, path)
}

/// The headers that must match between fronts and between a hot and a cold answer.
fn comparable(r: &Resp) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = r
        .headers
        .iter()
        .filter(|(k, _)| !matches!(k.to_ascii_lowercase().as_str(), "date" | "connection"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    headers.sort();
    headers
}

#[test]
fn hot_gets_are_answered_from_memory_alike_on_every_front() {
    for engine in ENGINES {
        let server = server().env("SLUICE_ENGINE", engine).start();
        let body = put_blob(&server, "/v1/artifacts/h/small", 4096);
        let first = server.send(Front::Http1, req("GET", "/v1/artifacts/h/small"));
        assert_eq!((first.status, &first.body), (200, &body), "{engine}");
        let hits_before = metric(&server, "sluice_hot_set_hits_total");
        for front in FRONTS {
            let r = server.send(front, req("GET", "/v1/artifacts/h/small"));
            assert_eq!((r.status, &r.body), (200, &body), "{engine} {front:?}");
            assert_eq!(comparable(&r), comparable(&first), "{engine} {front:?}");
            let etag = r.header("etag").expect("etag").to_string();
            let ranged = server.send(
                front,
                req("GET", "/v1/artifacts/h/small").header("range", "bytes=100-199"),
            );
            assert_eq!(
                (ranged.status, &ranged.body[..]),
                (206, &body[100..200]),
                "{engine} {front:?}"
            );
            assert_eq!(ranged.header("content-range"), Some("bytes 100-199/4096"));
            let unchanged = server.send(
                front,
                req("GET", "/v1/artifacts/h/small").header("if-none-match", &etag),
            );
            assert_eq!(unchanged.status, 304, "{engine} {front:?}");
            let head = server.send(front, req("HEAD", "/v1/artifacts/h/small"));
            assert_eq!(head.status, 200, "{engine} {front:?}");
            assert_eq!(head.header("content-length"), Some("4096"));
        }
        let hits = metric(&server, "sluice_hot_set_hits_total") - hits_before;
        assert!(hits >= 16.0, "{engine}: {hits} hot hits");
        assert!(metric(&server, "sluice_hot_set_body_bytes") >= 4096.0);
        assert!(metric(&server, "sluice_memory_bytes") > 0.0);
        let status = server.send(Front::Http1, req("GET", "/status"));
        let status: serde_json::Value = serde_json::from_slice(&status.body).expect("json");
        assert!(status["hot_set"]["entries"].as_u64() >= Some(1), "{status}");
        assert!(status["memory"]["rss"].as_u64() > Some(0), "{status}");
    }
}

/// A writer replaces one key 150 times while readers GET it on keep-alive connections
/// (plaintext on the engine, h2c through the fallback): every body is one whole version
/// (its ETag matches its bytes), never older than the last version acknowledged before the
/// GET was sent. Then a DELETE: once acknowledged, no GET finds the key.
#[test]
fn writes_racing_hot_reads_never_show_a_stale_or_torn_body() {
    let body = |v: u64| -> Vec<u8> {
        let mut b = v.to_le_bytes().repeat(1024);
        b.truncate(8000);
        b
    };
    for engine in ENGINES {
        let server = server().env("SLUICE_ENGINE", engine).start();
        let addr = server.addr;
        let path = "/v1/artifacts/race/key";
        assert_eq!(http(addr, "PUT", path, &[], &body(0)).status, 201);
        let acked = Arc::new(AtomicU64::new(0));
        let deleted = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let check = move |r: &Resp, floor: u64, what: &str| {
            assert_eq!(r.status, 200, "{what}");
            let v = u64::from_le_bytes(r.body[..8].try_into().expect("8 bytes"));
            assert_eq!(r.body, body(v), "{what}: a torn body");
            assert_eq!(
                r.header("etag"),
                Some(format!("\"{}\"", sha256_hex(&r.body)).as_str()),
                "{what}"
            );
            assert!(
                v >= floor,
                "{what}: version {v} after {floor} was acknowledged"
            );
        };
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (acked, deleted, done) =
                    (Arc::clone(&acked), Arc::clone(&deleted), Arc::clone(&done));
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect(addr).expect("connect");
                    s.set_read_timeout(Some(Duration::from_secs(30)))
                        .expect("timeout");
                    let mut reads = 0u64;
                    while !done.load(Ordering::Acquire) {
                        let gone = deleted.load(Ordering::Acquire);
                        let floor = acked.load(Ordering::Acquire);
                        let r = get_on(&mut s, path);
                        if gone {
                            assert_eq!(r.status, 404, "{engine}: a deleted key was served");
                        } else if r.status != 404 {
                            check(&r, floor, engine);
                        }
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        let server_ref = &server;
        let fallback_reads = std::thread::scope(|scope| {
            let (acked_h2, done_h2) = (Arc::clone(&acked), Arc::clone(&done));
            let deleted_h2 = Arc::clone(&deleted);
            let h2c = scope.spawn(move || {
                let mut reads = 0u64;
                while !done_h2.load(Ordering::Acquire) {
                    let gone = deleted_h2.load(Ordering::Acquire);
                    let floor = acked_h2.load(Ordering::Acquire);
                    let r = server_ref.send(Front::H2c, req("GET", path));
                    if gone {
                        assert_eq!(r.status, 404, "h2c: a deleted key was served");
                    } else if r.status != 404 {
                        check(&r, floor, "h2c");
                    }
                    reads += 1;
                }
                reads
            });
            let mut w = TcpStream::connect(addr).expect("connect");
            w.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            for v in 1..=150u64 {
                let b = body(v);
                let head = format!(
                    "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                );
                w.write_all(head.as_bytes()).expect("write head");
                w.write_all(&b).expect("write body");
                let r = read_one_response(&mut w, "PUT");
                assert_eq!(r.status, 204, "{engine}: PUT {v}");
                acked.store(v, Ordering::Release);
            }
            w.write_all(format!("DELETE {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .expect("write delete");
            assert_eq!(read_one_response(&mut w, "DELETE").status, 204);
            deleted.store(true, Ordering::Release);
            std::thread::sleep(Duration::from_millis(200));
            done.store(true, Ordering::Release);
            h2c.join().expect("h2c reader")
        });
        let reads: u64 = readers.into_iter().map(|r| r.join().expect("reader")).sum();
        assert!(reads > 150, "{engine}: {reads} reads");
        assert!(fallback_reads > 10, "{engine}: {fallback_reads} h2c reads");
        assert!(
            metric(&server, "sluice_hot_set_hits_total") > 0.0,
            "{engine}: the reads went through the hot set"
        );
        assert!(metric(&server, "sluice_hot_set_invalidations_total") > 0.0);
    }
}

/// Eviction to stay under `store_bytes_max` drops a hot artifact from memory too: once its
/// file is gone, no front serves it.
#[test]
fn an_evicted_artifact_leaves_the_hot_set() {
    for engine in ENGINES {
        let server = server()
            .env("SLUICE_ENGINE", engine)
            .env("SLUICE_STORE_BYTES_MAX", "1MiB")
            .start();
        let body = put_blob(&server, "/v1/artifacts/ev/hot", 4096);
        for _ in 0..3 {
            let r = server.send(Front::Http1, req("GET", "/v1/artifacts/ev/hot"));
            assert_eq!((r.status, &r.body), (200, &body), "{engine}");
        }
        assert!(
            metric(&server, "sluice_hot_set_hits_total") >= 1.0,
            "{engine}"
        );
        // Newer artifacts push the store over its limit; the hot one was read least recently.
        std::thread::sleep(Duration::from_millis(20));
        for i in 0..12 {
            put_blob(&server, &format!("/v1/artifacts/ev/filler{i}"), 100_000);
        }
        wait_for("eviction", Duration::from_secs(20), || {
            metric(&server, "sluice_store_evictions_total") > 0.0
        });
        wait_for("the hot artifact evicted", Duration::from_secs(20), || {
            server.status(Front::Http1, "GET", "/v1/artifacts/ev/filler11") == 200
                && !files_under(&server.data_dir)
                    .iter()
                    .any(|p| p.file_name().is_some_and(|n| n == "hot"))
        });
        for front in FRONTS {
            assert_eq!(
                server.status(front, "GET", "/v1/artifacts/ev/hot"),
                404,
                "{engine} {front:?}: an evicted artifact was served from memory"
            );
        }
    }
}

/// `hot_set_bytes = 0` turns it off: nothing is admitted, everything is still served.
#[test]
fn zero_turns_it_off() {
    let server = server().env("SLUICE_HOT_SET_BYTES", "0").start();
    let body = put_blob(&server, "/v1/artifacts/off/k", 1000);
    for _ in 0..3 {
        let r = server.send(Front::Http1, req("GET", "/v1/artifacts/off/k"));
        assert_eq!((r.status, &r.body), (200, &body));
    }
    assert_eq!(metric(&server, "sluice_hot_set_hits_total"), 0.0);
    assert_eq!(metric(&server, "sluice_hot_set_budget_bytes"), 0.0);
}
