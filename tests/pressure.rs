//! The limiter's public latency signal, measured from the kernel's receive time, on every front
//! (the ring, the epoll engine, the fallback), with the real binary over loopback.
//!
//! A request whose bytes wait in the kernel while the server cannot run (SIGSTOP for a few
//! hundred ms, what a CPU queue or a busy engine thread does to a request) must show that wait
//! in `sluice_replication_public_latency_p99_seconds`, while the parse-to-reply TTFB
//! (`sluice_replication_public_ttfb_p99_seconds`) stays small: the direction of the new signal.
//! And a long healthy download must not, by itself, push replication to the floor.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "pressure-test-secret-0123456789";

/// A node with replication on (towards a port nobody listens on), so the limiter runs and its
/// gauges are in `/metrics`.
fn node(engine: &str) -> Server {
    let dead = free_ports_in(40_000, 100, 1)[0];
    server()
        .no_tls()
        .arg("--peers")
        .arg(&format!("127.0.0.1:{dead}"))
        .env("SLUICE_PEER_SECRET", SECRET)
        .env("SLUICE_ENGINE", engine)
        .env("SLUICE_FSYNC", "never")
        .start()
}

fn signal(server: &Server, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(server.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, sig).expect("kill");
}

/// The largest value of `name` seen while polling `/metrics` for `window` (the gauges hold
/// the limiter's last 100 ms window only, so a sample shows for a moment).
fn max_over(addr: SocketAddr, name: &str, window: Duration) -> f64 {
    let until = Instant::now() + window;
    let mut max = 0.0f64;
    while Instant::now() < until {
        max = max.max(metric_at(addr, name, &[]));
        std::thread::sleep(Duration::from_millis(20));
    }
    max
}

/// One keep-alive GET, its response read whole; returns the status.
fn get_on(s: &mut TcpStream, path: &str) -> u16 {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .expect("write");
    read_one_response(s, path).status
}

/// The request's bytes reach the kernel while the server is stopped for `stopped`: the
/// latency from arrival counts the stop, the TTFB does not.
fn a_request_queued_in_the_kernel_shows_in_latency_from_arrival(engine: &str) {
    let server = node(engine);
    let (io_uring, mode) = engine_status(&server);
    assert_eq!(io_uring, engine == "uring", "{engine}: {mode}");
    put_blob(&server, "/v1/artifacts/p/small", 4096);
    // A keep-alive connection that has served a request already: the next request starts
    // with an idle connection waiting for it, as between a client's requests.
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    assert_eq!(get_on(&mut s, "/v1/artifacts/p/small"), 200);
    let samples_before = metric_at(
        server.addr,
        "sluice_replication_public_latency_samples_total",
        &[],
    );
    // Let the sampler's gap pass, then queue a request while the server cannot run.
    std::thread::sleep(Duration::from_millis(50));
    let stopped = Duration::from_millis(400);
    signal(&server, rustix::process::Signal::STOP);
    s.write_all(b"GET /v1/artifacts/p/small HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    std::thread::sleep(stopped);
    signal(&server, rustix::process::Signal::CONT);
    assert_eq!(read_one_response(&mut s, "queued GET").status, 200);
    let latency = max_over(
        server.addr,
        "sluice_replication_public_latency_p99_seconds",
        Duration::from_millis(600),
    );
    let ttfb = metric_at(
        server.addr,
        "sluice_replication_public_ttfb_p99_seconds",
        &[],
    );
    let samples = metric_at(
        server.addr,
        "sluice_replication_public_latency_samples_total",
        &[],
    );
    assert!(samples > samples_before, "{engine}: no sample was taken");
    assert!(
        latency >= 0.8 * stopped.as_secs_f64(),
        "{engine}: latency from arrival {latency} s does not show the {stopped:?} in the kernel"
    );
    assert!(
        ttfb < 0.1,
        "{engine}: TTFB {ttfb} s should not see the wait before the parser"
    );
    // A healthy request afterwards measures small again.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(get_on(&mut s, "/v1/artifacts/p/small"), 200);
    let after = max_over(
        server.addr,
        "sluice_replication_public_latency_p99_seconds",
        Duration::from_millis(400),
    );
    assert!(
        after < 0.1,
        "{engine}: a healthy request measured {after} s"
    );
}

#[test]
fn ring_latency_from_arrival_sees_the_kernel_queue() {
    if !ring_available() {
        eprintln!("SKIP: ring_latency_from_arrival_sees_the_kernel_queue: io_uring unavailable");
        return;
    }
    a_request_queued_in_the_kernel_shows_in_latency_from_arrival("uring");
}

#[test]
fn epoll_latency_from_arrival_sees_the_kernel_queue() {
    a_request_queued_in_the_kernel_shows_in_latency_from_arrival("epoll");
}

#[test]
fn fallback_latency_from_arrival_sees_the_kernel_queue() {
    a_request_queued_in_the_kernel_shows_in_latency_from_arrival("fallback");
}

fn ring_available() -> bool {
    sluice_uring::probe().available()
}

/// What Kura learned, with real processes: a download of 32 MiB read slowly for a few
/// seconds counts as one request in flight (a gentle cap) and one fast latency sample; the
/// limiter never goes to the floor, and its latency signal stays low.
#[test]
fn a_long_healthy_download_does_not_push_replication_to_the_floor() {
    let server = node("auto");
    put_blob(&server, "/v1/artifacts/p/big", 32 << 20);
    let limit = metric_at(
        server.addr,
        "sluice_replication_limit_bytes_per_second",
        &[],
    );
    assert!(limit > 0.0);
    let mut s = start_get(server.addr, "/v1/artifacts/p/big");
    let addr = server.addr;
    let watcher = std::thread::spawn(move || {
        let mut min_rate = f64::MAX;
        let mut max_latency = 0.0f64;
        let mut max_in_flight = 0.0f64;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            min_rate = min_rate.min(metric_at(
                addr,
                "sluice_replication_effective_bytes_per_second",
                &[],
            ));
            max_latency = max_latency.max(metric_at(
                addr,
                "sluice_replication_public_latency_p99_seconds",
                &[],
            ));
            max_in_flight =
                max_in_flight.max(metric_at(addr, "sluice_replication_public_in_flight", &[]));
            std::thread::sleep(Duration::from_millis(25));
        }
        (min_rate, max_latency, max_in_flight)
    });
    // Read about 10 MiB a second: the download lasts about three seconds.
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("read: {e}"),
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(got > 32 << 20, "{got}");
    let (min_rate, max_latency, max_in_flight) = watcher.join().expect("watcher");
    assert!(max_in_flight >= 1.0, "the download counted as in flight");
    assert!(
        min_rate >= limit / 1.125 - 1.0,
        "the rate went to {min_rate} of {limit}"
    );
    assert!(
        max_latency < 0.1,
        "the download's body is no latency: {max_latency} s"
    );
}
