//! Early errors on a request with a body: the client must read the status.
//!
//! Gradle 4.x's HTTP client (and many simple clients) write the whole
//! request body before they read the answer. If the server answers 413 (or
//! 400) after the head and then closes with body bytes unread, the kernel
//! resets the connection and the client sees `Broken pipe` instead of the
//! status. sluice reads and discards the body first (a lingering close,
//! bounded like nginx's `lingering_time`), on every front that speaks
//! HTTP/1.1: plaintext on the ring, plaintext on the fallback, TLS.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// 8 MiB against a 1 MiB Gradle limit: well past any socket buffer, so a
/// server that stops reading early makes the client's write fail.
const BODY_BYTES: usize = 8 * 1024 * 1024;

fn gradle_server(engine: &str) -> Server {
    server()
        .env("SLUICE_ENGINE", engine)
        .env("SLUICE_GRADLE_BODY_BYTES_MAX", "1MiB")
        .start()
}

/// The requests a write-everything-first client sends: an oversized Gradle
/// entry (413 from its Content-Length), a refused key with a body (400), and
/// an oversized chunked body (413 once the limit is crossed mid-body).
fn requests() -> Vec<(&'static str, Vec<u8>, u16)> {
    let body = vec![b'g'; BODY_BYTES];
    let mut oversized =
        format!("PUT /cache/0123abcd HTTP/1.1\r\nHost: a\r\nContent-Length: {BODY_BYTES}\r\n\r\n")
            .into_bytes();
    oversized.extend_from_slice(&body);
    let mut bad_key =
        format!("PUT /cache/a~b HTTP/1.1\r\nHost: a\r\nContent-Length: {BODY_BYTES}\r\n\r\n")
            .into_bytes();
    bad_key.extend_from_slice(&body);
    let mut chunked =
        b"PUT /cache/0123abce HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for piece in body.chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    vec![
        ("oversized Content-Length", oversized, 413),
        ("refused key", bad_key, 400),
        ("oversized chunked", chunked, 413),
    ]
}

/// Writes all of `raw`, then reads until EOF; returns the status line.
fn plaintext_write_then_read(server: &Server, raw: &[u8], what: &str) -> String {
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(raw)
        .unwrap_or_else(|e| panic!("{what}: writing the whole request failed: {e}"));
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match read_some(&mut s, &mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("{what}: reading the answer failed: {e}; got {out:?}"),
        }
    }
    status_line(&out)
}

fn status_line(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

async fn tls_write_then_read(server: &Server, raw: &[u8], what: &str) -> String {
    let mut tls = tls_connect(server, b"http/1.1").await;
    tls.write_all(raw)
        .await
        .unwrap_or_else(|e| panic!("{what}: writing the whole request failed: {e}"));
    tls.flush().await.expect("flush");
    let mut out = Vec::new();
    // A close_notify may be missing when the server closes after an
    // error: what counts is that the status arrived first.
    let _ = tls.read_to_end(&mut out).await;
    status_line(&out)
}

fn expect_status(line: &str, want: u16, what: &str) {
    assert!(
        line.starts_with(&format!("HTTP/1.1 {want} ")),
        "{what}: got {line:?}"
    );
}

/// Sends every request of [`requests`] over plaintext, each written whole before its status is
/// read; `front` names the front end in failures.
fn plaintext_clients_read_the_early_error(server: &Server, front: &str) {
    for (what, raw, want) in requests() {
        let line = plaintext_write_then_read(server, &raw, what);
        expect_status(&line, want, &format!("{front}: {what}"));
    }
}

#[test]
fn write_everything_first_clients_read_the_early_error_on_the_ring() {
    let server = gradle_server("auto");
    let (on, mode) = engine_status(&server);
    if !on {
        eprintln!("SKIP ring part: plaintext is served by the fallback here: {mode}");
    }
    plaintext_clients_read_the_early_error(&server, "plaintext");
    // Nothing was stored.
    assert_eq!(server.status(Front::Http1, "GET", "/cache/0123abcd"), 404);
}

/// The same on the epoll engine (hosts without io_uring): its lingering
/// close is the ring's, from the same core.
#[test]
fn write_everything_first_clients_read_the_early_error_on_epoll() {
    let server = gradle_server("epoll");
    plaintext_clients_read_the_early_error(&server, "plaintext epoll");
}

#[test]
fn write_everything_first_clients_read_the_early_error_on_the_fallback() {
    let server = gradle_server("fallback");
    plaintext_clients_read_the_early_error(&server, "plaintext fallback");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (what, raw, want) in requests() {
        let line = rt.block_on(tls_write_then_read(&server, &raw, what));
        expect_status(&line, want, &format!("TLS HTTP/1.1: {what}"));
    }
}

/// The linger is bounded: a client that sends an endless body is closed
/// after `lingering_bytes_max`, and one that stalls after
/// `lingering_timeout_ms`, each having had its status first.
#[test]
fn lingering_is_bounded_by_bytes_and_idle_time() {
    for engine in ["auto", "epoll", "fallback"] {
        let server = server()
            .env("SLUICE_ENGINE", engine)
            .env("SLUICE_GRADLE_BODY_BYTES_MAX", "1KiB")
            .env("SLUICE_LINGERING_BYTES_MAX", "2MiB")
            .env("SLUICE_LINGERING_TIMEOUT_MS", "300")
            .start();
        // Stalls: the status arrives, then the server closes after the idle
        // time although the declared body never came.
        let mut s = TcpStream::connect(server.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = Instant::now();
        s.write_all(
            b"PUT /cache/0123abcd HTTP/1.1\r\nHost: a\r\nContent-Length: 100000000\r\n\r\nxx",
        )
        .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        expect_status(&status_line(&out), 413, &format!("{engine}: stalled"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{engine}: lingered {:?}",
            started.elapsed()
        );

        // Endless: writing far past the byte cap fails, after the status.
        let mut s = TcpStream::connect(server.addr).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(
            b"PUT /cache/0123abcd HTTP/1.1\r\nHost: a\r\nContent-Length: 100000000\r\n\r\n",
        )
        .unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0usize;
        let ended = loop {
            match s.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break e,
            }
            assert!(
                written < 64 * 1024 * 1024,
                "{engine}: the server read {written} bytes of a refused body"
            );
        };
        // Closed by the server, not a write that timed out on a server that
        // stopped reading and kept the connection.
        assert!(
            matches!(
                ended.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{engine}: {ended}"
        );
    }
}
