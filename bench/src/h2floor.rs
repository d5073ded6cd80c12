//! `sluice-bench h2-floor`: the floor of sluice's HTTP/2 stack, for `compare --peers h2-floor`.
//!
//! The same crates sluice's fallback serves HTTP/2 with (`h2`, rustls with ring, tokio), but
//! none of what sits above them: no hyper, no `http::Request` turned into sluice's request, no
//! store, no guard, no metrics. Every GET is answered from memory (a file of `www` read once per
//! worker) with the headers sluice sends for an artifact. Its CPU per byte is what sluice
//! would spend if everything of its own and of hyper's cost nothing, so the distance from
//! sluice to it is what a leaner path of sluice's own could win, and the distance from it to
//! h2o is what `h2` and rustls cost (issue 20). Not a server: no limits, no timeouts, no
//! hardening; loopback benchmarks only.
//!
//! Like sluice's fallback: h2's writes held to the end of the connection's turn and sent in
//! one write (`--no-coalesce`: as h2 makes them, once per stream), `threads` current-thread
//! runtimes, connections dealt round-robin and kept by their worker, one accept thread per
//! listener. The plaintext port takes h2c with prior knowledge and HTTP/1.1 GETs (the
//! comparison's readiness probe and byte check); the TLS port offers ALPN `h2` only.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// What `h2-floor` serves and where.
pub struct FloorConfig {
    /// Loopback port for HTTP/1.1 probes and h2c with prior knowledge.
    pub port: u16,
    /// Loopback port for TLS (ALPN h2), with `cert` and `key` (PEM).
    pub tls: Option<(u16, PathBuf, PathBuf)>,
    /// Directory whose files are served (`GET /name`).
    pub www: PathBuf,
    /// Worker threads (sluice's fallback uses one per core).
    pub threads: usize,
    /// Hold h2's writes until the end of the connection's turn and send them in one write, as
    /// sluice's `CoalesceIo` does (without it, h2 writes once per stream).
    pub coalesce: bool,
}

/// A file's body and its ETag, read on first use by each worker.
type Files = Rc<RefCell<HashMap<String, Option<(Bytes, String)>>>>;

/// Runs until killed.
pub fn run(cfg: FloorConfig) -> Result<(), String> {
    let tls = match &cfg.tls {
        Some((_, cert, key)) => Some(tls_acceptor(cert, key)?),
        None => None,
    };
    let threads = cfg.threads.max(1);
    let mut workers = Vec::with_capacity(threads);
    for i in 0..threads {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(TcpStream, bool)>();
        let www = cfg.www.clone();
        let tls = tls.clone();
        let coalesce = cfg.coalesce;
        std::thread::Builder::new()
            .name(format!("h2-floor-{i}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let local = tokio::task::LocalSet::new();
                let files: Files = Rc::default();
                local.block_on(&rt, async move {
                    while let Some((stream, secure)) = rx.recv().await {
                        let (www, files, tls) = (www.clone(), Rc::clone(&files), tls.clone());
                        tokio::task::spawn_local(async move {
                            let _ = stream.set_nonblocking(true);
                            let _ = stream.set_nodelay(true);
                            let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                                return;
                            };
                            match (secure, tls) {
                                (true, Some(acceptor)) => {
                                    if let Ok(tls) = acceptor.accept(stream).await {
                                        serve_h2(Coalesce::new(tls, coalesce), &www, &files).await;
                                    }
                                }
                                _ => serve_plain(stream, &www, &files, coalesce).await,
                            }
                        });
                    }
                });
            })
            .map_err(|e| format!("starting a worker: {e}"))?;
        workers.push(tx);
    }
    let workers = Arc::new(workers);
    let mut listeners = vec![(cfg.port, false)];
    if let Some((port, _, _)) = &cfg.tls {
        listeners.push((*port, true));
    }
    let mut accepters = Vec::new();
    for (port, secure) in listeners {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .map_err(|e| format!("binding 127.0.0.1:{port}: {e}"))?;
        let workers = Arc::clone(&workers);
        accepters.push(std::thread::spawn(move || {
            for (next, stream) in listener.incoming().flatten().enumerate() {
                let _ = workers[next % workers.len()].send((stream, secure));
            }
        }));
    }
    for a in accepters {
        let _ = a.join();
    }
    Ok(())
}

fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let certs = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key_path = key;
    let key = rustls_pemfile::private_key(&mut read(key_path)?.as_slice())
        .map_err(|e| format!("{}: {e}", key_path.display()))?
        .ok_or_else(|| format!("{}: no private key", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("rustls refused its own protocol versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "{} and {} do not make a pair: {e}",
                cert.display(),
                key_path.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The plaintext port: h2c with prior knowledge, or HTTP/1.1 GETs (the comparison's readiness
/// probe and its check that every server returns the same bytes), kept alive.
async fn serve_plain(stream: tokio::net::TcpStream, www: &Path, files: &Files, coalesce: bool) {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0";
    let mut first = [0u8; 14];
    match stream.peek(&mut first).await {
        Ok(n) if n >= PREFACE.len() && first == PREFACE => {
            serve_h2(Coalesce::new(stream, coalesce), www, files).await
        }
        Ok(_) => serve_http1(stream, www, files).await,
        Err(_) => {}
    }
}

/// The longest HTTP/1.1 head the floor reads before it gives up on the connection.
const HTTP1_HEAD_BYTES_MAX: usize = 16 * 1024;

/// HTTP/1.1 GETs without bodies, one at a time; anything else ends the connection.
async fn serve_http1(mut stream: tokio::net::TcpStream, www: &Path, files: &Files) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > HTTP1_HEAD_BYTES_MAX {
                return;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        let reply = match lookup(www, files, path) {
            Some((body, etag)) => {
                let mut reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
                     content-length: {}\r\netag: {etag}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                reply.extend_from_slice(&body);
                reply
            }
            None => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec(),
        };
        if stream.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// The body and ETag of `path` under `www`, read on this worker's first request for it.
fn lookup(www: &Path, files: &Files, path: &str) -> Option<(Bytes, String)> {
    let name = path.trim_start_matches('/');
    if name.split('/').any(|part| part == "..") {
        return None;
    }
    files
        .borrow_mut()
        .entry(name.to_string())
        .or_insert_with(|| {
            let body = std::fs::read(www.join(name)).ok()?;
            let etag = format!("\"{}\"", hex::encode(Sha256::digest(&body)));
            Some((Bytes::from(body), etag))
        })
        .clone()
}

/// One HTTP/2 connection: every GET answered from memory, with sluice's settings.
async fn serve_h2<T: AsyncRead + AsyncWrite + Unpin>(io: T, www: &Path, files: &Files) {
    let Ok(mut conn) = h2::server::Builder::new()
        .max_concurrent_streams(128)
        .max_header_list_size(64 * 1024)
        .initial_window_size(1024 * 1024)
        .initial_connection_window_size(2 * 1024 * 1024)
        .handshake::<_, Bytes>(io)
        .await
    else {
        return;
    };
    while let Some(Ok((request, mut respond))) = conn.accept().await {
        let found = lookup(www, files, request.uri().path());
        let response = match &found {
            Some((body, etag)) => http::Response::builder()
                .status(200)
                .header("content-type", "application/octet-stream")
                .header("content-length", body.len())
                .header("etag", etag.as_str()),
            None => http::Response::builder()
                .status(404)
                .header("content-length", 0),
        };
        let Ok(response) = response.body(()) else {
            return;
        };
        let body = found.map(|(body, _)| body).filter(|b| !b.is_empty());
        match respond.send_response(response, body.is_none()) {
            Ok(mut send) => {
                if let Some(body) = body {
                    let _ = send.send_data(body, true);
                }
            }
            Err(_) => return,
        }
    }
}

/// Bytes held between flushes, at most (sluice's `H2_COALESCE_BYTES_MAX`).
const COALESCE_BYTES_MAX: usize = 64 * 1024;

/// Below h2: writes are copied into a buffer, and the first flush after a write answers
/// `Pending` after waking the task, so the rest of the turn's streams are answered into the
/// same buffer; the next poll's flush sends it in one write. The idea of sluice's
/// `fallback/coalesce.rs`, without its pool, pass-through and turn counter. With `hold` off,
/// writes and flushes go straight to the socket (h2's own write path, `--no-coalesce`).
struct Coalesce<T> {
    io: T,
    buf: Vec<u8>,
    sent: usize,
    /// Whether the first flush of a turn is held.
    hold: bool,
    /// A flush was held this turn; the next one sends.
    held: bool,
}

impl<T> Coalesce<T> {
    fn new(io: T, hold: bool) -> Self {
        Coalesce {
            io,
            buf: Vec::with_capacity(COALESCE_BYTES_MAX),
            sent: 0,
            hold,
            held: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes out what is held.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.sent < self.buf.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => self.sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if !this.hold {
            return Pin::new(&mut this.io).poll_write(cx, data);
        }
        if this.buf.len() + data.len() > COALESCE_BYTES_MAX && !this.buf.is_empty() {
            match this.poll_send(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = data.len().min(COALESCE_BYTES_MAX);
        this.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.hold && !this.held && this.buf.len() > this.sent {
            this.held = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.held = false;
        match this.poll_send(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match this.poll_send(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_shutdown(cx),
            other => other,
        }
    }
}
