//! One set of framing rules on every front: the malformed-input corpus of the sans-IO HTTP/1
//! core (`sluice::http1::samples`, the table `parse_head` is tested with) and the upload
//! smuggling cases of `tests/http1.rs`, sent byte for byte through plaintext on the ring,
//! plaintext on the fallback (`SLUICE_ENGINE=fallback`, the path of hosts without io_uring)
//! and TLS with HTTP/1.1. Every front must answer the same status, close, never answer the
//! request smuggled behind, and store nothing.

mod common;
use common::*;

use sluice::http1::samples::{Want, HEADS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A request appended behind each case: answered only if the server misread the framing.
const SMUGGLED: &[u8] = b"GET /up HTTP/1.1\r\nHost: a\r\n\r\n";

/// The fronts compared. Plaintext on the ring is left out (loudly) where io_uring is not
/// available; the other two always run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    RingPlaintext,
    EpollPlaintext,
    FallbackPlaintext,
    TlsHttp1,
}

/// Upload cases on a real route: (name, bytes, status). Each PUTs to
/// `/v1/artifacts/ns/{name}`, which must stay absent.
fn upload_cases() -> Vec<(&'static str, Vec<u8>, u16)> {
    let put = |name: &'static str, headers: &str, body: &str, status: u16| {
        let raw = format!("PUT /v1/artifacts/ns/{name} HTTP/1.1\r\nHost: a\r\n{headers}\r\n{body}");
        (name, raw.into_bytes(), status)
    };
    let chunked_abc = "3\r\nabc\r\n0\r\n\r\n";
    let te_chunked = "Transfer-Encoding: chunked\r\n";
    vec![
        put("cl-te", &format!("Content-Length: 5\r\n{te_chunked}"), "0\r\n\r\n", 400),
        put("te-cl", &format!("{te_chunked}Content-Length: 3\r\n"), chunked_abc, 400),
        put("cl-twice", "Content-Length: 3\r\nContent-Length: 3\r\n", "abc", 400),
        put("cl-signed", "Content-Length: +3\r\n", "abc", 400),
        put("cl-list", "Content-Length: 3, 3\r\n", "abc", 400),
        put("te-gzip", "Transfer-Encoding: gzip, chunked\r\n", chunked_abc, 400),
        put("te-twice", &format!("{te_chunked}{te_chunked}"), chunked_abc, 400),
        put("obs-fold-cl", "X-A: b\r\n c\r\nContent-Length: 3\r\n", "abc", 400),
        (
            "no-host",
            b"PUT /v1/artifacts/ns/no-host HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc".to_vec(),
            400,
        ),
        (
            "http10-te",
            b"PUT /v1/artifacts/ns/http10-te HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                .to_vec(),
            400,
        ),
        put("expect-other", "Expect: 200-ok\r\nContent-Length: 3\r\n", "abc", 417),
    ]
}

/// Every rejected head of the core's table, with its status. The h2 preface is left out: on a
/// connection's first bytes every front classifies it as h2c before HTTP/1 parsing.
fn head_cases() -> Vec<(&'static str, Vec<u8>, u16)> {
    HEADS
        .iter()
        .filter(|(name, _, _)| *name != "h2_preface")
        .filter_map(|(name, bytes, want)| match want {
            Want::Reject(status) => Some((*name, bytes.to_vec(), *status)),
            _ => None,
        })
        .collect()
}

/// One TLS (ALPN http/1.1) exchange on a fresh connection: write `raw`, read until the server
/// closes or 5 s pass.
fn tls_exchange(server: &Server, raw: &[u8]) -> Vec<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut tls = tls_connect(server, b"http/1.1").await;
        tls.write_all(raw).await.expect("write");
        tls.flush().await.expect("flush");
        let mut out = Vec::new();
        let read = tls.read_to_end(&mut out);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), read).await;
        out
    })
}

fn exchange(server: &Server, path: Path, raw: &[u8]) -> Vec<u8> {
    match path {
        Path::RingPlaintext | Path::EpollPlaintext | Path::FallbackPlaintext => server.http1(raw),
        Path::TlsHttp1 => tls_exchange(server, raw),
    }
}

/// As [`exchange`], without half-closing plaintext: hyper drops pipelined requests it has not
/// started once it reads EOF, so a pipelining test keeps the write side open.
fn pipelined_exchange(server: &Server, path: Path, raw: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    if path == Path::TlsHttp1 {
        return tls_exchange(server, raw);
    }
    let mut s = std::net::TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(raw).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// Sends every case through `path` and returns the failures (empty when the front follows
/// the rules).
fn check(server: &Server, path: Path) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, mut raw, want) in head_cases().into_iter().chain(upload_cases()) {
        raw.extend_from_slice(SMUGGLED);
        let out = exchange(server, path, &raw);
        let text = String::from_utf8_lossy(&out);
        let status = parse_response(&out, false).map(|(r, _)| r.status);
        if status != Some(want) {
            failures.push(format!(
                "{path:?} {name}: want {want}, got {status:?}: {text}"
            ));
        } else if text.matches("HTTP/1.1 ").count() != 1 {
            failures.push(format!(
                "{path:?} {name}: the connection must close after {want}: {text}"
            ));
        }
    }
    for (name, _, _) in upload_cases() {
        let r = server.send(
            Front::Http1,
            req("GET", &format!("/v1/artifacts/ns/{name}")),
        );
        if r.status != 404 {
            failures.push(format!(
                "{path:?} {name}: stored (GET answers {})",
                r.status
            ));
        }
    }
    failures
}

#[test]
fn malformed_input_gets_the_same_answer_on_every_front() {
    let mut failures = Vec::new();
    let ring = server().start();
    let (uring, mode) = engine_status(&ring);
    if uring {
        failures.extend(check(&ring, Path::RingPlaintext));
    } else {
        eprintln!("SKIP plaintext on the ring (io_uring unavailable here): {mode}");
    }
    failures.extend(check(&ring, Path::TlsHttp1));
    let fallback = server().env("SLUICE_ENGINE", "fallback").start();
    let (uring, mode) = engine_status(&fallback);
    assert!(
        !uring,
        "SLUICE_ENGINE=fallback must keep the ring off: {mode}"
    );
    failures.extend(check(&fallback, Path::FallbackPlaintext));
    let epoll = server().env("SLUICE_ENGINE", "epoll").start();
    failures.extend(check(&epoll, Path::EpollPlaintext));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Valid requests still pass the check under hyper: pipelined heads with bodies (both
/// framings) on the fallback, where the check follows every body to find the next head.
#[test]
fn pipelined_uploads_pass_the_framing_check_on_the_fallback() {
    let server = server().env("SLUICE_ENGINE", "fallback").start();
    for path in [Path::FallbackPlaintext, Path::TlsHttp1] {
        let p = format!("/v1/artifacts/ns/{path:?}");
        let raw = format!(
            "PUT {p}1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
PUT {p}2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n1\r\nf\r\n0\r\n\r\n\
GET {p}2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        );
        let out = pipelined_exchange(&server, path, raw.as_bytes());
        let (r1, n1) = parse_response(&out, false).expect("first");
        let (r2, n2) = parse_response(&out[n1..], false).expect("second");
        let (r3, _) = parse_response(&out[n1 + n2..], false)
            .unwrap_or_else(|| panic!("{path:?} third: {}", String::from_utf8_lossy(&out)));
        assert_eq!((r1.status, r2.status), (201, 201), "{path:?}");
        assert_eq!(
            (r3.status, r3.body.as_slice()),
            (200, &b"def"[..]),
            "{path:?}"
        );
        // A malformed head pipelined behind a valid request: the valid one is answered, then
        // the 400, then the connection closes.
        let raw = format!(
            "GET {p}1 HTTP/1.1\r\nHost: a\r\n\r\n\
PUT {p}3 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx\
GET /up HTTP/1.1\r\nHost: a\r\n\r\n"
        );
        let out = pipelined_exchange(&server, path, raw.as_bytes());
        let (r1, n1) = parse_response(&out, false).expect("first");
        assert_eq!(
            (r1.status, r1.body.as_slice()),
            (200, &b"abc"[..]),
            "{path:?}"
        );
        let (r2, n2) = parse_response(&out[n1..], false).expect("second");
        assert_eq!(r2.status, 400, "{path:?}");
        assert_eq!(out.len(), n1 + n2, "{path:?}: nothing after the 400");
        let r = server.send(Front::Http1, req("GET", &format!("{p}3")));
        assert_eq!(r.status, 404, "{path:?}");
    }
}
