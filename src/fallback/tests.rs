//! The fallback end to end: a [`Fallback`] on a loopback listener with an echoing handler,
//! driven by hyper and rustls clients.

use crate::config::ConnTimeouts;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::classify::TLS_HANDSHAKE_BYTE;
use super::{
    body_from_bytes, ConnInfo, Fallback, FallbackLimits, Handler, HandoffRefusal, ResponseBody,
    TlsError, TlsSettings, HTTP1_HEAD_BYTES_MAX, WORKER_THREADS,
};

/// Echoes what it saw as `METHOD PATH BODY_LEN VERSION tls=B h2=B`; `/slow/{ms}` waits
/// first, so a request can be in flight during shutdown.
#[derive(Default)]
struct Echo {
    started: AtomicUsize,
}

impl Handler for Echo {
    fn call(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<ResponseBody>> + Send {
        self.started.fetch_add(1, Ordering::SeqCst);
        async move {
            let method = req.method().clone();
            let path = req.uri().path().to_string();
            let version = req.version();
            if let Some(ms) = path.strip_prefix("/slow/") {
                let ms: u64 = ms.parse().unwrap();
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let mut body = req.into_body();
            let mut body_len = 0usize;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    body_len += data.len();
                }
            }
            let text = format!(
                "{method} {path} {body_len} {version:?} tls={} h2={}",
                conn.tls, conn.alpn_h2
            );
            Response::new(body_from_bytes(text))
        }
    }
}

type ReqBody = BoxBody<Bytes, Infallible>;

/// A request body of `left` bytes in 64 KiB frames with no length hint (chunked on HTTP/1).
struct Chunks {
    left: usize,
    chunk: Bytes,
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len());
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }
}

fn chunked_body(len: usize) -> ReqBody {
    Chunks {
        left: len,
        chunk: Bytes::from(vec![b'x'; 64 * 1024]),
    }
    .boxed()
}

fn small_body(text: &'static str) -> ReqBody {
    Full::new(Bytes::from_static(text.as_bytes())).boxed()
}

fn limits() -> FallbackLimits {
    FallbackLimits {
        connections_max: 64,
        connections_per_ip_max: 0,
        timeouts: ConnTimeouts {
            header_read_timeout_ms: 5_000,
            idle_timeout_ms: 30_000,
            send_timeout_ms: 30_000,
            ..ConnTimeouts::default()
        },
        uri_bytes_max: 8192,
        head_bytes_max: 16 * 1024,
        worker_threads: WORKER_THREADS,
        ..FallbackLimits::default()
    }
}

fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A fallback serving its own listener on 127.0.0.1:0.
fn start_listening(
    tls: Option<Arc<ServerConfig>>,
    limits: FallbackLimits,
) -> (Fallback, Arc<Echo>, SocketAddr) {
    let handler = Arc::new(Echo::default());
    let fallback = Fallback::start(handler.clone(), tls, limits).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    fallback.serve_listener(listener).unwrap();
    (fallback, handler, addr)
}

enum Client {
    H1(hyper::client::conn::http1::SendRequest<ReqBody>),
    H2(hyper::client::conn::http2::SendRequest<ReqBody>),
}

impl Client {
    /// A plaintext connection to `addr`: HTTP/1.1, or h2c with prior knowledge.
    async fn dial(addr: SocketAddr, h2: bool) -> Client {
        let tcp = TcpStream::connect(addr).await.unwrap();
        Client::connect(tcp, h2).await
    }

    async fn connect<I>(io: I, h2: bool) -> Client
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        if h2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Client::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Client::H1(send)
        }
    }

    /// Sends one request; returns the status and the echoed text.
    async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: ReqBody,
    ) -> hyper::Result<(StatusCode, String)> {
        let builder = Request::builder().method(method);
        let response = match self {
            Client::H1(send) => {
                let req = builder.uri(path).header("host", "localhost");
                send.send_request(req.body(body).unwrap()).await?
            }
            Client::H2(send) => {
                let req = builder.uri(format!("http://localhost{path}"));
                send.send_request(req.body(body).unwrap()).await?
            }
        };
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8(bytes.to_vec()).unwrap()))
    }
}

struct TestCert {
    dir: tempfile::TempDir,
    cert_path: PathBuf,
    key_path: PathBuf,
    der: CertificateDer<'static>,
}

fn test_cert() -> TestCert {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, generated.cert.pem()).unwrap();
    std::fs::write(&key_path, generated.signing_key.serialize_pem()).unwrap();
    TestCert {
        dir,
        cert_path,
        key_path,
        der: generated.cert.der().clone(),
    }
}

async fn tls_connect(
    addr: SocketAddr,
    cert: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// Polls `done` every 5 ms for up to 5 s.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn http1_keep_alive_serves_two_requests_on_one_connection() {
    let (fallback, _handler, addr) = start_listening(None, limits());
    client_runtime().block_on(async {
        let mut client = Client::dial(addr, false).await;
        let first = client.send("GET", "/up", small_body("")).await.unwrap();
        assert_eq!(
            first,
            (
                StatusCode::OK,
                "GET /up 0 HTTP/1.1 tls=false h2=false".into()
            )
        );
        let second = client
            .send("PUT", "/cache/k", small_body("hello"))
            .await
            .unwrap();
        assert_eq!(second.1, "PUT /cache/k 5 HTTP/1.1 tls=false h2=false");
    });
    let stats = fallback.stats();
    assert_eq!(stats.accepted_http1_total, 1, "{stats:?}");
    assert_eq!(stats.accepted_h2c_total, 0);
}

#[test]
fn h2c_prior_knowledge_is_served_as_http2() {
    let (fallback, _handler, addr) = start_listening(None, limits());
    client_runtime().block_on(async {
        let mut client = Client::dial(addr, true).await;
        for _ in 0..2 {
            let (status, text) = client.send("GET", "/status", small_body("")).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(text, "GET /status 0 HTTP/2.0 tls=false h2=false");
        }
    });
    assert_eq!(fallback.stats().accepted_h2c_total, 1);
    assert_eq!(fallback.stats().accepted_http1_total, 0);
}

#[test]
fn tls_alpn_selects_http2_or_http1() {
    let cert = test_cert();
    let tls = TlsSettings::load(&cert.cert_path, &cert.key_path).unwrap();
    let (fallback, _handler, addr) = start_listening(Some(tls), limits());
    let cases: &[(&[&[u8]], bool, &str)] = &[
        (
            &[b"h2", b"http/1.1"],
            true,
            "GET /x 0 HTTP/2.0 tls=true h2=true",
        ),
        (&[b"http/1.1"], false, "GET /x 0 HTTP/1.1 tls=true h2=false"),
        // No ALPN at all: HTTP/1.1, as curl --http1.1 without ALPN would expect.
        (&[], false, "GET /x 0 HTTP/1.1 tls=true h2=false"),
    ];
    client_runtime().block_on(async {
        for (alpn, h2, expected) in cases {
            let stream = tls_connect(addr, &cert.der, alpn).await;
            let negotiated = stream.get_ref().1.alpn_protocol().map(|p| p.to_vec());
            assert_eq!(negotiated.as_deref() == Some(b"h2".as_slice()), *h2);
            let mut client = Client::connect(stream, *h2).await;
            let (status, text) = client.send("GET", "/x", small_body("")).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(text, *expected, "alpn {alpn:?}");
        }
    });
    let stats = fallback.stats();
    assert_eq!(stats.accepted_tls_h2_total, 1, "{stats:?}");
    assert_eq!(stats.accepted_tls_http1_total, 2, "{stats:?}");
}

#[test]
fn streamed_8_mib_bodies_arrive_whole() {
    const BODY_BYTES: usize = 8 * 1024 * 1024;
    let cert = test_cert();
    let tls = TlsSettings::load(&cert.cert_path, &cert.key_path).unwrap();
    let (_fallback, _handler, addr) = start_listening(Some(tls), limits());
    client_runtime().block_on(async {
        let expected_h1 = format!("PUT /cas/big {BODY_BYTES} HTTP/1.1 tls=false h2=false");
        let mut client = Client::dial(addr, false).await;
        let sent = client
            .send("PUT", "/cas/big", chunked_body(BODY_BYTES))
            .await;
        assert_eq!(sent.unwrap(), (StatusCode::OK, expected_h1));

        let mut client = Client::dial(addr, true).await;
        let sent = client
            .send("PUT", "/cas/big", chunked_body(BODY_BYTES))
            .await;
        let expected_h2c = format!("PUT /cas/big {BODY_BYTES} HTTP/2.0 tls=false h2=false");
        assert_eq!(sent.unwrap().1, expected_h2c);

        let stream = tls_connect(addr, &cert.der, &[b"h2"]).await;
        let mut client = Client::connect(stream, true).await;
        let sent = client
            .send("PUT", "/cas/big", chunked_body(BODY_BYTES))
            .await;
        let expected_tls = format!("PUT /cas/big {BODY_BYTES} HTTP/2.0 tls=true h2=true");
        assert_eq!(sent.unwrap().1, expected_tls);
    });
}

#[test]
fn handoff_of_a_peeked_connection_completes_the_tls_handshake() {
    let cert = test_cert();
    let tls = TlsSettings::load(&cert.cert_path, &cert.key_path).unwrap();
    let handler = Arc::new(Echo::default());
    let fallback = Fallback::start(handler, Some(tls), limits()).unwrap();
    // The "engine": a plain std listener that only peeks, as MSG_PEEK does on the ring.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let der = cert.der.clone();
    let client = std::thread::spawn(move || {
        client_runtime().block_on(async {
            let stream = tls_connect(addr, &der, &[b"h2", b"http/1.1"]).await;
            let mut client = Client::connect(stream, true).await;
            client.send("GET", "/ac/00", small_body("")).await.unwrap()
        })
    });
    let (stream, peer) = listener.accept().unwrap();
    let mut first = [0u8; 5];
    let peeked = stream.peek(&mut first).unwrap();
    assert!(peeked >= 1 && first[0] == TLS_HANDSHAKE_BYTE, "{first:?}");
    fallback.handoff(stream, peer).unwrap();
    let (status, text) = client.join().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text, "GET /ac/00 0 HTTP/2.0 tls=true h2=true");
    assert_eq!(fallback.stats().accepted_tls_h2_total, 1);
}

#[test]
fn tls_client_without_tls_configured_is_closed() {
    let cert = test_cert();
    let (fallback, _handler, addr) = start_listening(None, limits());
    client_runtime().block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        assert!(connector.connect(name, tcp).await.is_err());
    });
    wait_until("the rejection to be counted", || {
        fallback.stats().rejected_total == 1
    });
}

#[test]
fn tls_load_errors_name_the_file() {
    let a = test_cert();
    let b = test_cert();
    let missing = a.dir.path().join("missing.pem");
    type Check = fn(&TlsError) -> bool;
    let cases: &[(&str, &Path, &Path, Check, &[&Path])] = &[
        (
            "missing certificate file",
            &missing,
            &a.key_path,
            |e| matches!(e, TlsError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound),
            &[&missing],
        ),
        (
            "missing key file",
            &a.cert_path,
            &missing,
            |e| matches!(e, TlsError::Read { .. }),
            &[&missing],
        ),
        (
            "certificate file holds only a key",
            &a.key_path,
            &a.key_path,
            |e| matches!(e, TlsError::NoCertificate { .. }),
            &[&a.key_path],
        ),
        (
            "key file holds only a certificate",
            &a.cert_path,
            &a.cert_path,
            |e| matches!(e, TlsError::NoPrivateKey { .. }),
            &[&a.cert_path],
        ),
        (
            "key of another certificate",
            &a.cert_path,
            &b.key_path,
            |e| matches!(e, TlsError::KeyMismatch { .. }),
            &[&a.cert_path, &b.key_path],
        ),
    ];
    for (name, cert_path, key_path, check, named) in cases {
        let err = TlsSettings::load(cert_path, key_path).unwrap_err();
        assert!(check(&err), "{name}: wrong error {err:?}");
        let message = err.to_string();
        for path in *named {
            let path = path.display().to_string();
            assert!(message.contains(&path), "{name}: {message:?} lacks {path}");
        }
    }
    let config = TlsSettings::load(&a.cert_path, &a.key_path).unwrap();
    assert_eq!(
        config.alpn_protocols,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );
}

#[test]
fn zero_limits_are_refused() {
    for limits in [
        FallbackLimits {
            connections_max: 0,
            ..limits()
        },
        FallbackLimits {
            timeouts: ConnTimeouts {
                header_read_timeout_ms: 0,
                ..limits().timeouts
            },
            ..limits()
        },
        FallbackLimits {
            timeouts: ConnTimeouts {
                idle_timeout_ms: 0,
                ..limits().timeouts
            },
            ..limits()
        },
        FallbackLimits {
            timeouts: ConnTimeouts {
                send_timeout_ms: 0,
                ..limits().timeouts
            },
            ..limits()
        },
        FallbackLimits {
            uri_bytes_max: 0,
            ..limits()
        },
    ] {
        let result = Fallback::start(Arc::new(Echo::default()), None, limits);
        let err = result.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("= 0"), "{err}");
    }
}

#[test]
fn full_fallback_sheds_the_idle_and_refuses_with_503_when_all_are_busy() {
    use std::io::{Read, Write};
    let limits = FallbackLimits {
        connections_max: 1,
        ..limits()
    };
    let (fallback, handler, addr) = start_listening(None, limits);
    let engine = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let engine_addr = engine.local_addr().unwrap();
    client_runtime().block_on(async {
        // The only slot serves a slow request: nothing can be shed.
        let mut first = Client::dial(addr, false).await;
        let slow = tokio::spawn(async move {
            let sent = first.send("GET", "/slow/1500", small_body("")).await;
            (first, sent)
        });
        while handler.started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // A hand-off at capacity comes back at once with its socket.
        let _engine_client = std::net::TcpStream::connect(engine_addr).unwrap();
        let (stream, peer) = engine.accept().unwrap();
        let refused = fallback.handoff(stream, peer).unwrap_err();
        assert_eq!(refused.reason, HandoffRefusal::AtCapacity);
        assert_eq!(refused.stream.peer_addr().unwrap(), peer);
        assert_eq!(fallback.stats().handoff_refused_total, 1);

        // A listener client is answered 503 at once instead of waiting.
        let reply = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
            let mut reply = Vec::new();
            let _ = s.read_to_end(&mut reply);
            String::from_utf8_lossy(&reply).into_owned()
        })
        .await
        .unwrap();
        assert!(reply.starts_with("HTTP/1.1 503"), "{reply:?}");
        assert!(reply.contains("retry-after: 1"), "{reply:?}");

        // Once the first connection is idle, a new one takes its slot.
        let (mut first, sent) = slow.await.unwrap();
        assert_eq!(sent.unwrap().0, StatusCode::OK);
        let mut third = Client::dial(addr, false).await;
        let (_, text) = third.send("GET", "/c", small_body("")).await.unwrap();
        assert_eq!(text, "GET /c 0 HTTP/1.1 tls=false h2=false");
        assert!(
            first.send("GET", "/a", small_body("")).await.is_err(),
            "shed"
        );
        let stats = fallback.stats();
        assert_eq!(stats.shed_idle_total, 1);
        assert_eq!(stats.refused_full_total, 2);
    });
}

#[test]
fn connections_per_ip_max_refuses_the_next_from_one_address() {
    let limits = FallbackLimits {
        connections_per_ip_max: 1,
        ..limits()
    };
    let (fallback, _handler, addr) = start_listening(None, limits);
    client_runtime().block_on(async {
        let mut first = Client::dial(addr, false).await;
        first.send("GET", "/a", small_body("")).await.unwrap();
        let mut second = Client::dial(addr, false).await;
        let refused = second.send("GET", "/b", small_body("")).await;
        match refused {
            Ok((status, _)) => assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE),
            Err(err) => panic!("expected a 503, got {err}"),
        }
        assert_eq!(fallback.stats().refused_per_ip_total, 1);
        first.send("GET", "/c", small_body("")).await.unwrap();
    });
}

#[test]
fn idle_h2_connection_is_closed() {
    let limits = FallbackLimits {
        timeouts: ConnTimeouts {
            idle_timeout_ms: 200,
            ..limits().timeouts
        },
        ..limits()
    };
    let (fallback, _handler, addr) = start_listening(None, limits);
    client_runtime().block_on(async {
        let mut client = Client::dial(addr, true).await;
        client.send("GET", "/a", small_body("")).await.unwrap();
        assert_eq!(fallback.connections(), 1);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(fallback.connections(), 0);
        assert!(client.send("GET", "/b", small_body("")).await.is_err());
    });
}

/// A fallback with one HTTP/1 request to `path` (a `/slow/{ms}`) in its handler, and the
/// thread whose client waits for the answer.
fn slow_request_in_flight(path: &'static str) -> (Fallback, SocketAddr, ClientThread) {
    let (fallback, handler, addr) = start_listening(None, limits());
    let client = std::thread::spawn(move || {
        client_runtime().block_on(async {
            let mut client = Client::dial(addr, false).await;
            client.send("GET", path, small_body("")).await
        })
    });
    wait_until("the slow request to start", || {
        handler.started.load(Ordering::SeqCst) == 1
    });
    (fallback, addr, client)
}

type ClientThread = std::thread::JoinHandle<hyper::Result<(StatusCode, String)>>;

#[test]
fn shutdown_drains_an_in_flight_request() {
    let (fallback, addr, client) = slow_request_in_flight("/slow/300");
    let began = std::time::Instant::now();
    fallback.shutdown(Duration::from_secs(5));
    let took = began.elapsed();
    let (status, text) = client.join().unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text, "GET /slow/300 0 HTTP/1.1 tls=false h2=false");
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    assert_eq!(fallback.connections(), 0);

    let engine = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let _late_client = std::net::TcpStream::connect(engine.local_addr().unwrap()).unwrap();
    let (stream, peer) = engine.accept().unwrap();
    let refused = fallback.handoff(stream, peer).unwrap_err();
    assert_eq!(refused.reason, HandoffRefusal::ShutDown);
    assert!(std::net::TcpStream::connect(addr)
        .and_then(|mut s| {
            use std::io::{Read, Write};
            s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")?;
            let mut buf = [0u8; 1];
            // Closed listener: either the connect or this read fails or sees EOF.
            s.read(&mut buf)
        })
        .map_or(true, |n| n == 0));
}

#[test]
fn shutdown_closes_what_outlives_the_drain_budget() {
    let (fallback, _addr, client) = slow_request_in_flight("/slow/10000");
    let began = std::time::Instant::now();
    fallback.shutdown(Duration::from_millis(100));
    let took = began.elapsed();
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    assert!(client.join().unwrap().is_err(), "request should be cut off");
}

#[test]
fn slow_first_bytes_and_slow_heads_are_closed() {
    use std::io::{Read, Write};
    let limits = FallbackLimits {
        timeouts: ConnTimeouts {
            header_read_timeout_ms: 200,
            ..limits().timeouts
        },
        ..limits()
    };
    let (fallback, handler, addr) = start_listening(None, limits);
    let timeout = Some(Duration::from_secs(5));
    // Silent client: closed before classification, counted as rejected.
    let mut silent = std::net::TcpStream::connect(addr).unwrap();
    silent.set_read_timeout(timeout).unwrap();
    // Half a head: classified as HTTP/1, then hyper's header read timeout closes it.
    let mut partial = std::net::TcpStream::connect(addr).unwrap();
    partial.set_read_timeout(timeout).unwrap();
    partial
        .write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let began = std::time::Instant::now();
    let mut buf = [0u8; 64];
    assert_eq!(
        silent.read(&mut buf).unwrap(),
        0,
        "silent client not closed"
    );
    // The guard answers a slow head 408, as the ring does.
    let mut rest = Vec::new();
    partial.read_to_end(&mut rest).unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.starts_with("HTTP/1.1 408"),
        "unexpected reply {rest:?}"
    );
    assert!(began.elapsed() < Duration::from_secs(3));
    assert_eq!(handler.started.load(Ordering::SeqCst), 0);
    wait_until("both connections to close", || fallback.connections() == 0);
    assert_eq!(fallback.stats().rejected_total, 1);
    assert_eq!(fallback.stats().accepted_http1_total, 1);
    assert_eq!(fallback.stats().head_timeout_total, 1);
}

#[test]
fn shutdown_from_inside_an_async_runtime_does_not_panic() {
    let (fallback, _handler, _addr) = start_listening(None, limits());
    client_runtime().block_on(async move {
        fallback.shutdown(Duration::from_millis(50));
        assert_eq!(fallback.connections(), 0);
    });
}

#[test]
fn oversized_http1_head_answers_431() {
    use std::io::{Read, Write};
    let (_fallback, handler, addr) = start_listening(None, limits());
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let filler = "a".repeat(HTTP1_HEAD_BYTES_MAX + 1024);
    let head = format!("GET / HTTP/1.1\r\nhost: x\r\nx-filler: {filler}\r\n\r\n");
    // The server may close before taking the whole head; the answer is what matters.
    let _ = stream.write_all(head.as_bytes());
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:?}");
    assert_eq!(handler.started.load(Ordering::SeqCst), 0);
}
