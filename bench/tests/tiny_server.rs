//! Benches a tiny in-test HTTP/1.1 server and checks the tool's counts against the server's own.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_bench::client::{ErrorKind, ReceiveOptions};
use sluice_bench::request::{Method, RequestSet};
use sluice_bench::run::{run, RunConfig, Stop};

/// How the tiny server misbehaves, if at all.
#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Answers every request with a body of the size named by the path's last segment.
    Correct,
    /// Announces the full length, sends half, and closes.
    ShortBody,
    /// Flips one byte of every second body.
    CorruptEverySecond,
}

struct TinyServer {
    port: u16,
    answered: Arc<AtomicU64>,
    /// The path of every PUT received, in arrival order.
    puts: Arc<Mutex<Vec<String>>>,
}

impl TinyServer {
    /// GETs of `/bench/{size}`: bodies of `size` bytes.
    fn gets_of(&self, size: &str) -> RequestSet {
        let url = format!("http://127.0.0.1:{}/bench/{size}", self.port);
        RequestSet::single(&url, Method::Get, 0).unwrap()
    }
}

fn start(behaviour: Behaviour) -> TinyServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let answered = Arc::new(AtomicU64::new(0));
    let puts = Arc::new(Mutex::new(Vec::new()));
    let counter = Arc::clone(&answered);
    let seen = Arc::clone(&puts);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let counter = Arc::clone(&counter);
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || serve(stream, behaviour, &counter, &seen));
        }
    });
    TinyServer {
        port,
        answered,
        puts,
    }
}

fn serve(mut s: TcpStream, behaviour: Behaviour, answered: &AtomicU64, puts: &Mutex<Vec<String>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Read one request head (the bench does not pipeline).
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        buf.drain(..head_end);
        if head.starts_with("PUT ") {
            // Read the body away (Content-Length framed, as the bench sends it), note the
            // path, answer 201.
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < len {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..len);
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            puts.lock().unwrap().push(path);
            answered.fetch_add(1, Ordering::SeqCst);
            if s.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                .is_err()
            {
                return;
            }
            continue;
        }
        let size: usize = head
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.rsplit('/').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        // Counted before the answer goes out, so once the bench has read it the count includes it.
        let n = answered.fetch_add(1, Ordering::SeqCst) + 1;
        let response_head = format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n");
        if s.write_all(response_head.as_bytes()).is_err() {
            return;
        }
        let sent = match behaviour {
            Behaviour::Correct => s.write_all(&body),
            Behaviour::ShortBody => {
                let _ = s.write_all(&body[..size / 2]);
                return;
            }
            Behaviour::CorruptEverySecond => {
                let mut body = body;
                if n.is_multiple_of(2) && !body.is_empty() {
                    body[0] ^= 0xff;
                }
                s.write_all(&body)
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

fn config(connections: usize, stop: Stop) -> RunConfig {
    RunConfig {
        connections,
        stop,
        timeout: Duration::from_secs(5),
        progress: false,
        ..RunConfig::default()
    }
}

#[test]
fn closed_loop_counts_match_the_server() {
    let server = start(Behaviour::Correct);
    // A small body (one read with the head) and one large enough to be spliced.
    let url = format!("http://127.0.0.1:{}/bench/{{size}}", server.port);
    let set = RequestSet::size_mix(&url, "1000:3,300k:1", Method::Get).unwrap();
    let result = run(set, config(4, Stop::Duration(Duration::from_secs(1)))).unwrap();
    assert_eq!(result.errors.total(), 0, "errors {:?}", result.errors);
    assert!(result.requests_ok > 0);
    assert_eq!(result.requests_ok, server.answered.load(Ordering::SeqCst));
    assert_eq!(result.histogram.len(), result.requests_ok);
}

#[test]
fn open_loop_with_digests_counts_match_the_server() {
    let server = start(Behaviour::Correct);
    let set = server.gets_of("70000");
    let cfg = RunConfig {
        rate_per_sec: Some(200.0),
        receive: ReceiveOptions {
            verify_sha256: true,
            splice: true,
        },
        ..config(2, Stop::Duration(Duration::from_millis(700)))
    };
    let result = run(set, cfg).unwrap();
    assert_eq!(result.errors.total(), 0, "errors {:?}", result.errors);
    assert!(result.requests_ok > 0);
    assert_eq!(result.requests_ok, server.answered.load(Ordering::SeqCst));
}

/// At a rate far below one request per run, the open loop sends the first request and then
/// stops at the end of the run: before, a connection slept out its whole interval (here 5 s)
/// and sent one more request after the stop.
#[test]
fn open_loop_sends_nothing_after_the_stop() {
    let server = start(Behaviour::Correct);
    let set = server.gets_of("10");
    let cfg = RunConfig {
        rate_per_sec: Some(0.2),
        ..config(1, Stop::Duration(Duration::from_millis(300)))
    };
    let result = run(set, cfg).unwrap();
    assert_eq!(result.errors.total(), 0, "errors {:?}", result.errors);
    assert_eq!(result.requests_ok, 1);
    assert_eq!(server.answered.load(Ordering::SeqCst), 1);
}

/// A PUT list over several connections sends each entry once and ends when the list is done,
/// well before the run's duration: N keys are N uploads. Before, each connection walked the
/// whole list from its own starting point, so every key was written about c times.
#[test]
fn a_put_list_sends_each_entry_once_across_connections() {
    let server = start(Behaviour::Correct);
    let list: String = (0..97)
        .map(|i| format!("http://127.0.0.1:{}/up/k{i} 100\n", server.port))
        .collect();
    let set = RequestSet::from_list(&list, Method::Put, 0).unwrap();
    let started = std::time::Instant::now();
    for rate in [None, Some(400.0)] {
        server.puts.lock().unwrap().clear();
        let set = RequestSet::from_list(&list, Method::Put, 0).unwrap();
        let cfg = RunConfig {
            rate_per_sec: rate,
            ..config(8, Stop::Duration(Duration::from_secs(30)))
        };
        let result = run(set, cfg).unwrap();
        assert_eq!(result.errors.total(), 0, "errors {:?}", result.errors);
        assert_eq!(result.requests_ok, 97, "rate {rate:?}");
        let mut seen = server.puts.lock().unwrap().clone();
        assert_eq!(seen.len(), 97, "rate {rate:?}");
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 97, "rate {rate:?}: a key was sent twice");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the run ended with the list"
    );
    // The old walk, asked for: every connection goes round the list for the whole run.
    let mut repeat = set;
    repeat.once = false;
    server.puts.lock().unwrap().clear();
    let result = run(repeat, config(2, Stop::Requests(300))).unwrap();
    assert_eq!(result.requests_ok, 300);
}

#[test]
fn request_count_stops_exactly() {
    let server = start(Behaviour::Correct);
    let set = server.gets_of("10");
    let result = run(set, config(3, Stop::Requests(50))).unwrap();
    assert_eq!(result.requests_ok, 50);
    assert_eq!(server.answered.load(Ordering::SeqCst), 50);
}

#[test]
fn short_body_is_a_length_error() {
    let server = start(Behaviour::ShortBody);
    for size in ["1000", "600000"] {
        let set = server.gets_of(size);
        let result = run(set, config(1, Stop::Requests(5))).unwrap();
        assert_eq!(result.requests_ok, 0, "size {size}");
        assert_eq!(
            result.errors.get(ErrorKind::Length),
            5,
            "size {size}: {:?}",
            result.errors
        );
        assert_eq!(result.errors.total(), 5, "size {size}");
    }
}

#[test]
fn corrupt_body_is_a_digest_error() {
    let server = start(Behaviour::CorruptEverySecond);
    let set = server.gets_of("5000");
    let cfg = RunConfig {
        receive: ReceiveOptions {
            verify_sha256: true,
            splice: true,
        },
        ..config(1, Stop::Requests(10))
    };
    let result = run(set, cfg).unwrap();
    // Responses alternate good, corrupt; the first (good) one is the reference.
    assert_eq!(result.requests_ok, 5);
    assert_eq!(result.errors.get(ErrorKind::Digest), 5);
}
