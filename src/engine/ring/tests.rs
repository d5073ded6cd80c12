//! The ring engine against itself: outgoing tasks run on a real ring that
//! also serves, so each test skips (loudly) where io_uring is unavailable.

use super::*;
use crate::fallback::app_handler::AppHandler;
use crate::fallback::FallbackLimits;
use crate::outgoing::{self as task, OutgoingResponse, TaskError};
use crate::store::{Store, StoreConfig};
use std::net::SocketAddr;
use std::sync::mpsc;

/// A one-thread ring engine serving a fresh store on an ephemeral port.
fn engine() -> Option<(RingEngine, SocketAddr, tempfile::TempDir)> {
    if let Some(why) = sluice_uring::probe().unavailable {
        eprintln!("SKIP: io_uring unavailable: {}", why.reason);
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(StoreConfig {
        data_dir: dir.path().to_path_buf(),
        ..StoreConfig::default()
    })
    .expect("store");
    let config = crate::config::Config::default();
    let app = App::new(&config, store);
    let fallback = Arc::new(
        Fallback::start(
            Arc::new(AppHandler::new(Arc::clone(&app))),
            None,
            FallbackLimits {
                connections_max: 16,
                connections_per_ip_max: 0,
                timeouts: crate::config::ConnTimeouts {
                    header_read_timeout_ms: 1000,
                    idle_timeout_ms: 1000,
                    send_timeout_ms: 1000,
                    body_read_timeout_ms: 1000,
                },
                uri_bytes_max: 8192,
                ..FallbackLimits::default()
            },
        )
        .expect("fallback"),
    );
    let listener =
        crate::server::bind_reuseport(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let settings = EngineSettings {
        threads: 1,
        connections_per_core_max: 64,
        conn_limits: ConnLimits {
            head: crate::http1::Limits::default(),
            timeouts: crate::config::ConnTimeouts {
                header_read_timeout_ms: 1000,
                idle_timeout_ms: 1000,
                send_timeout_ms: 1000,
                body_read_timeout_ms: 1000,
            },
            linger: crate::http1::LingerLimits::default(),
        },
        connections_per_ip_max: 0,
        mode: FileServingMode::Splice,
        pipes_per_core_max: 4,
        pipe_bytes: 64 * 1024,
        spin: Duration::from_micros(50),
        latency_sample: Duration::from_micros(250),
    };
    let engine = RingEngine::start(settings, vec![listener], &app, &fallback).expect("engine");
    Some((engine, addr, dir))
}

fn run(
    engine: &RingEngine,
    request: impl FnOnce(task::Done) -> OutgoingRequest,
) -> Result<OutgoingResponse, TaskError> {
    let (tx, rx) = mpsc::channel();
    let request = request(Box::new(move |outcome| {
        let _ = tx.send(outcome);
    }));
    assert!(engine.submit_task(request).is_ok(), "queue refused");
    rx.recv_timeout(Duration::from_secs(10))
        .expect("task outcome")
}

/// The ring is a scheduler, not only a server: an outgoing request
/// task connects, sends and reads on the same ring that serves, here
/// asking that very ring for `/up`.
#[test]
fn outgoing_request_task_runs_on_the_ring() {
    let Some((engine, addr, _dir)) = engine() else {
        return;
    };
    let got = run(&engine, |done| {
        OutgoingRequest::get(addr, "/up", Duration::from_secs(5), done)
    });
    assert_eq!(
        got,
        Ok(OutgoingResponse {
            status: 200,
            body: b"up\n".to_vec(),
            reused_connection: false,
            sluice_headers: Vec::new(),
        })
    );
    let got = run(&engine, |done| {
        OutgoingRequest::get(addr, "/v1/artifacts/ns/none", Duration::from_secs(5), done)
    });
    assert_eq!(got.map(|r| r.status), Ok(404));

    // Nothing listens here: a connect-level error, typed as such.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let got = run(&engine, |done| {
        OutgoingRequest::get(closed, "/up", Duration::from_secs(5), done)
    });
    assert_eq!(got, Err(TaskError::Connect(libc::ECONNREFUSED)));

    // A peer that accepts and never answers: the deadline ends it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let got = run(&engine, |done| {
        OutgoingRequest::get(silent_addr, "/up", Duration::from_millis(300), done)
    });
    assert_eq!(got, Err(TaskError::TimedOut));
    drop(silent);
    engine.shutdown(Duration::from_millis(100), Duration::ZERO);
}

/// A task's body can come from a file range: spliced file -> pipe ->
/// socket in pipe-sized chunks (64 KiB here), all through the ring. The
/// ring PUTs it to itself and reads it back byte for byte.
#[test]
fn a_task_body_is_spliced_from_a_file() {
    let Some((engine, addr, dir)) = engine() else {
        return;
    };
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let path = dir.path().join("body.bin");
    let mut bytes = b"garbage".to_vec();
    bytes.extend_from_slice(&body);
    std::fs::write(&path, &bytes).expect("write");
    let file = Arc::new(std::fs::File::open(&path).expect("open"));
    let got = run(&engine, |done| {
        OutgoingRequest {
        addr,
        request: format!(
            "PUT /v1/artifacts/ns/spliced HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes(),
        body_file: Some(Box::new(task::FileBody {
            file,
            offset: 7,
            len: body.len() as u64,
        })),
        keep_alive: false,
        timeout: Duration::from_secs(5),
        response_bytes_max: task::RESPONSE_BYTES_MAX_DEFAULT,
        done,
    }
    });
    assert_eq!(got.map(|r| r.status), Ok(201));
    let got = run(&engine, |done| {
        OutgoingRequest::get(
            addr,
            "/v1/artifacts/ns/spliced",
            Duration::from_secs(5),
            done,
        )
    });
    assert!(got.is_ok_and(|r| r.status == 200 && r.body == body));
    engine.shutdown(Duration::from_millis(100), Duration::ZERO);
}

/// Keep-alive tasks to one address share a pooled connection: the
/// second and third skip the connect. A pooled connection the peer
/// closed while idle is found closed before the write and replaced.
#[test]
fn keep_alive_tasks_reuse_a_pooled_connection() {
    let Some((engine, addr, _dir)) = engine() else {
        return;
    };
    let keep_alive = |done| {
        let mut r = OutgoingRequest::get(addr, "/up", Duration::from_secs(5), done);
        r.request = format!("GET /up HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes();
        r.keep_alive = true;
        r
    };
    let reused: Vec<bool> = (0..3)
        .map(|_| {
            let got = run(&engine, keep_alive).expect("response");
            assert_eq!((got.status, got.body.as_slice()), (200, &b"up\n"[..]));
            got.reused_connection
        })
        .collect();
    assert_eq!(reused, vec![false, true, true]);

    // A peer that answers one request and closes while idle.
    let once = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let once_addr = once.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        for _ in 0..2 {
            let (mut s, _) = once.accept().expect("accept");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            std::thread::sleep(Duration::from_millis(50));
            drop(s); // closes while the client holds it idle
        }
    });
    let to_once = |done| {
        let mut r = OutgoingRequest::get(once_addr, "/", Duration::from_secs(5), done);
        r.request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        r.keep_alive = true;
        r
    };
    let first = run(&engine, to_once).expect("first");
    assert!(!first.reused_connection);
    std::thread::sleep(Duration::from_millis(200));
    let second = run(&engine, to_once).expect("second, on a fresh connection");
    assert_eq!((second.status, second.reused_connection), (200, false));
    server.join().expect("server");
    engine.shutdown(Duration::from_millis(100), Duration::ZERO);
}
