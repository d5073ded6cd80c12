//! Test harness: start the real `sluice` binary on an ephemeral loopback
//! port and speak HTTP to it over plaintext HTTP/1.1 (raw bytes), HTTPS with
//! HTTP/1.1 or HTTP/2 (rustls + hyper), and h2c (hyper).
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod fleet;
pub mod weed;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};

/// How a test talks to the server. The same scenarios run through each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Front {
    /// Plaintext HTTP/1.1, raw bytes on a TCP socket (the ring engine's path).
    Http1,
    /// TLS with ALPN http/1.1 (fallback).
    TlsHttp1,
    /// TLS with ALPN h2 (fallback).
    TlsH2,
    /// HTTP/2 prior knowledge on plaintext (fallback).
    H2c,
}

pub const FRONTS: [Front; 4] = [Front::Http1, Front::TlsHttp1, Front::TlsH2, Front::H2c];

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub cert_der: Vec<u8>,
    _tmp: Option<tempfile::TempDir>,
    pub stderr_path: PathBuf,
}

pub struct ServerBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    data_dir: Option<PathBuf>,
    config: Option<String>,
    tls: bool,
    /// A command line the binary runs under (`prlimit ... --`, `setpriv ... --`).
    wrapper: Vec<String>,
    /// `--listen` value; default `127.0.0.1:0`.
    listen: Option<String>,
    /// The binary to run; default the one cargo built.
    binary: Option<PathBuf>,
}

pub fn server() -> ServerBuilder {
    ServerBuilder {
        args: Vec::new(),
        env: Vec::new(),
        data_dir: None,
        config: None,
        tls: true,
        wrapper: Vec::new(),
        listen: None,
        binary: None,
    }
}

impl ServerBuilder {
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }
    /// Listen on this address instead of an ephemeral port (tests whose
    /// nodes must know each other's ports before they start).
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = Some(addr.to_string());
        self
    }
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_string());
        self
    }
    /// Start the server under `prlimit --nofile=N:N` (util-linux).
    pub fn nofile(mut self, n: u64) -> Self {
        self.wrapper
            .extend(["prlimit".into(), format!("--nofile={n}:{n}"), "--".into()]);
        self
    }

    /// Start the server as an unprivileged user (nobody, via util-linux
    /// `setpriv`) with `RLIMIT_MEMLOCK` at `bytes`: without CAP_IPC_LOCK the
    /// kernel then accounts ring memory and fixed buffers against it. The
    /// data dir must be writable by that user.
    pub fn unprivileged_memlock(mut self, bytes: u64) -> Self {
        for a in [
            "prlimit".to_string(),
            format!("--memlock={bytes}:{bytes}"),
            "--".into(),
            "setpriv".into(),
            "--reuid=65534".into(),
            "--regid=65534".into(),
            "--clear-groups".into(),
            "--".into(),
        ] {
            self.wrapper.push(a);
        }
        self
    }

    /// Run the server as `uid`:`gid` (util-linux `setpriv`), so the
    /// fleet tests can match its packets by owner. The data dir must be
    /// writable by that user.
    pub fn run_as(mut self, uid: u32, gid: u32) -> Self {
        for a in [
            "setpriv".to_string(),
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".into(),
            "--".into(),
        ] {
            self.wrapper.push(a);
        }
        self
    }

    /// Run this copy of the binary (one another user can reach).
    pub fn binary(mut self, path: &Path) -> Self {
        self.binary = Some(path.to_path_buf());
        self
    }

    pub fn no_tls(mut self) -> Self {
        self.tls = false;
        self
    }

    pub fn start(self) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| tmp.path().join("data"));
        // The wrappers exec the binary, so the child's pid is the server's.
        let binary = self
            .binary
            .clone()
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sluice")));
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        cmd.arg("serve")
            .arg("--listen")
            .arg(self.listen.as_deref().unwrap_or("127.0.0.1:0"))
            .arg("--data-dir")
            .arg(&data_dir);
        let mut cert_der = Vec::new();
        if self.tls {
            let cert =
                rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
            let cert_path = tmp.path().join("cert.pem");
            let key_path = tmp.path().join("key.pem");
            std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
            std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
            cert_der = cert.cert.der().to_vec();
            cmd.arg("--tls-cert")
                .arg(&cert_path)
                .arg("--tls-key")
                .arg(&key_path);
        }
        if let Some(toml) = &self.config {
            let path = tmp.path().join("sluice.toml");
            std::fs::write(&path, toml).expect("write config");
            cmd.arg("--config").arg(&path);
        }
        cmd.args(&self.args);
        without_sluice_env(&mut cmd);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let stderr_path = tmp.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        cmd.stdout(Stdio::piped()).stderr(stderr);
        let mut child = cmd.spawn().expect("spawn sluice");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(rest) = line.strip_prefix("sluice listening on ") {
                        break rest.trim().parse().expect("address");
                    }
                }
                _ => {
                    let _ = child.wait();
                    panic!(
                        "sluice exited before listening; stderr:\n{}",
                        std::fs::read_to_string(&stderr_path).unwrap_or_default()
                    );
                }
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            addr,
            data_dir,
            cert_der,
            _tmp: Some(tmp),
            stderr_path,
        }
    }
}

/// A clean environment: the developer's SLUICE_* must not leak into `cmd`.
fn without_sluice_env(cmd: &mut Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("SLUICE_") {
            cmd.env_remove(k);
        }
    }
}

/// Runs the binary once with `args` and `env` (and no SLUICE_* of the developer's):
/// (exit code, -1 for a signal; stdout; stderr).
pub fn run_sluice(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(args);
    without_sluice_env(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run sluice");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Server {
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        self.child.wait().expect("wait")
    }

    pub fn send(&self, front: Front, req: Req) -> Resp {
        send(self, front, req)
    }

    pub fn http1(&self, raw: &[u8]) -> Vec<u8> {
        raw_exchange(self.addr, raw)
    }

    /// The status of a request without headers or body through `front`.
    pub fn status(&self, front: Front, method: &str, path: &str) -> u16 {
        self.send(front, req(method, path)).status
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Debug, Default)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    /// Send the body without a length, in pieces of this many bytes:
    /// `chunked` on HTTP/1.1, DATA frames without `content-length` on h2.
    pub streamed: Option<usize>,
}

/// A request body sent as separate frames of unknown total length.
struct Pieces(std::collections::VecDeque<Bytes>);

impl hyper::body::Body for Pieces {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

pub fn req(method: &str, path: &str) -> Req {
    Req {
        method: method.to_string(),
        path: path.to_string(),
        headers: Vec::new(),
        body: None,
        streamed: None,
    }
}

impl Req {
    pub fn header(mut self, k: &str, v: &str) -> Req {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Req {
        self.body = Some(body.into());
        self
    }
    /// Send the body without a length, `piece_bytes` at a time.
    pub fn streamed(mut self, piece_bytes: usize) -> Req {
        self.streamed = Some(piece_bytes.max(1));
        self
    }
}

#[derive(Clone, Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// One plaintext HTTP/1.1 exchange on a fresh connection: write `raw`, read
/// until the server closes or 5 s pass.
pub fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(raw).expect("write");
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// Parse one HTTP/1.1 response from the front of `buf`; returns it and the
/// number of bytes it took. `head_only` for responses to HEAD.
pub fn parse_response(buf: &[u8], head_only: bool) -> Option<(Resp, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut headers);
    let n = match r.parse(buf).ok()? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let status = r.code?;
    let hs: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).to_string(),
            )
        })
        .collect();
    let len = hs
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let body_len = if head_only || status == 304 || status == 204 || status < 200 {
        0
    } else {
        len.unwrap_or(buf.len() - n)
    };
    if buf.len() < n + body_len {
        return None;
    }
    Some((
        Resp {
            status,
            headers: hs,
            body: buf[n..n + body_len].to_vec(),
        },
        n + body_len,
    ))
}

fn send(server: &Server, front: Front, req: Req) -> Resp {
    match front {
        Front::Http1 => send_http1(server.addr, &req),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(send_hyper(server, front, req)),
    }
}

fn send_http1(addr: SocketAddr, req: &Req) -> Resp {
    let mut raw = format!(
        "{} {} HTTP/1.1\r\nHost: localhost\r\n",
        req.method, req.path
    );
    for (k, v) in &req.headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    let mut body_bytes = req.body.clone();
    if let (Some(body), Some(piece)) = (&req.body, req.streamed) {
        raw.push_str("Transfer-Encoding: chunked\r\n");
        let mut chunked = Vec::new();
        for part in body.chunks(piece) {
            chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            chunked.extend_from_slice(part);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        body_bytes = Some(chunked);
    } else if let Some(body) = &req.body {
        raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    raw.push_str("Connection: close\r\n\r\n");
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(raw.as_bytes()).expect("write head");
    if let Some(body) = &body_bytes {
        // The server may refuse before the body (and close): not an error here.
        let _ = s.write_all(body);
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match read_some(&mut s, &mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    let head_only = req.method == "HEAD";
    // Interim 1xx responses (100 Continue) come before the final one.
    let mut out = &out[..];
    while out.starts_with(b"HTTP/1.1 1") {
        match out.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) => out = &out[end + 4..],
            None => break,
        }
    }
    let (resp, _) = parse_response(out, head_only).unwrap_or_else(|| {
        panic!(
            "bad response: {:?}",
            String::from_utf8_lossy(&out[..out.len().min(500)])
        )
    });
    resp
}

pub fn tls_connector(cert_der: &[u8], alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert_der.to_vec()))
        .expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A TLS connection to `server` offering `alpn`, or the handshake's error.
pub async fn try_tls_connect(
    server: &Server,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tls_connector(&server.cert_der, alpn)
        .connect(name, tcp)
        .await
}

/// A TLS connection to `server` offering `alpn`; panics when the handshake fails.
pub async fn tls_connect(
    server: &Server,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    try_tls_connect(server, alpn).await.expect("tls handshake")
}

type RequestBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// Sends `request` on a new HTTP/2 connection over `io` (h2c or TLS h2); `what` names the
/// transport when it fails.
async fn send_h2<T>(
    io: T,
    request: hyper::Request<RequestBody>,
    what: &str,
) -> hyper::Response<hyper::body::Incoming>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(io),
    )
    .await
    .unwrap_or_else(|e| panic!("{what} handshake: {e:?}"));
    tokio::spawn(conn);
    sender
        .send_request(request)
        .await
        .unwrap_or_else(|e| panic!("{what} request: {e:?}"))
}

async fn send_hyper(server: &Server, front: Front, req: Req) -> Resp {
    let mut builder = hyper::Request::builder()
        .method(req.method.as_str())
        .uri(format!("https://localhost{}", req.path));
    if front == Front::TlsHttp1 {
        builder = builder.header("host", "localhost");
    }
    for (k, v) in &req.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    let body = match req.streamed {
        Some(piece) => Pieces(
            req.body
                .clone()
                .unwrap_or_default()
                .chunks(piece)
                .map(Bytes::copy_from_slice)
                .collect(),
        )
        .boxed(),
        None => Full::new(Bytes::from(req.body.clone().unwrap_or_default())).boxed(),
    };
    let request = builder.body(body).expect("request");
    let response = match front {
        Front::TlsH2 => send_h2(tls_connect(server, b"h2").await, request, "h2").await,
        Front::TlsHttp1 => {
            let tls = tls_connect(server, b"http/1.1").await;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .expect("h1 handshake");
            tokio::spawn(conn);
            sender.send_request(request).await.expect("h1 request")
        }
        Front::H2c => {
            let tcp = tokio::net::TcpStream::connect(server.addr)
                .await
                .expect("connect");
            send_h2(tcp, request, "h2c").await
        }
        Front::Http1 => unreachable!("plaintext HTTP/1 uses raw bytes"),
    };
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).to_string(),
            )
        })
        .collect();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    Resp {
        status,
        headers,
        body,
    }
}

/// Writes `server`'s certificate as PEM to `dir/cert.pem` (for clients that read a file,
/// such as `SSL_CERT_FILE`: a self-signed leaf, not a CA, since rustls-based clients refuse a
/// CA certificate as the server's own).
pub fn write_cert_pem(server: &Server, dir: &Path) -> PathBuf {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&server.cert_der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    let path = dir.join("cert.pem");
    std::fs::write(&path, pem).expect("write cert");
    path
}

/// Every file under `dir`, recursively (to check nothing half-written is visible).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            // The commit journal's segments are the store's bookkeeping, not
            // artifacts; a checkpoint replaces them every second.
            if p.file_name()
                .is_some_and(|n| n == sluice::store::JOURNAL_DIR)
            {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The server's engine as `/status` reports it: (io_uring serves plaintext,
/// the one-line description of what serves and why).
pub fn engine_status(server: &Server) -> (bool, String) {
    let r = server.send(Front::Http1, req("GET", "/status"));
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("status json");
    (
        v["engine"]["io_uring"].as_bool().unwrap_or(false),
        v["engine"]["mode"].as_str().unwrap_or_default().to_string(),
    )
}

/// One `read`, retried on EINTR. A read on a socket with a timeout
/// (SO_RCVTIMEO) is not restarted after a signal handler runs, and the test
/// process gets signals while it reaps the servers it starts: a client must
/// retry, as any real one does.
pub fn read_some(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Reads one complete response (not a HEAD's) from a keep-alive connection;
/// panics, naming `what`, on an error or on EOF before it is complete.
pub fn read_one_response(s: &mut TcpStream, what: &str) -> Resp {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some((r, _)) = parse_response(&out, false) {
            return r;
        }
        let n = read_some(s, &mut buf).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(n > 0, "{what}: closed before the response was complete");
        out.extend_from_slice(&buf[..n]);
    }
}

/// One request on a fresh connection (`Connection: close`), the response
/// parsed; panics when there is none. `Content-Length` is sent for PUTs and
/// for any body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "PUT" || !body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write head");
    s.write_all(body).expect("write body");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_response(&out, method == "HEAD")
        .unwrap_or_else(|| {
            panic!(
                "no response to {method} {path}: {:?}",
                String::from_utf8_lossy(&out)
            )
        })
        .0
}

/// A metric's value from `/metrics`, summed over the series whose labels
/// contain every part of `labels`.
pub fn metric_at(addr: SocketAddr, name: &str, labels: &[&str]) -> f64 {
    let text = String::from_utf8(http(addr, "GET", "/metrics", &[], b"").body).expect("utf8");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Poll `ok` every 20 ms; panic naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Loopback ports nothing listens on now, for nodes that must know each
/// other's ports before they start: from a per-process block of 100 in
/// `[first, first + 100 * blocks)`, below the kernel's ephemeral range
/// (32768+). A port bound to 0 and closed could be handed to a parallel
/// test (or an outgoing connection) before the node binds it, and two nodes
/// sharing a port through SO_REUSEPORT would split each other's
/// connections. Each test binary passes its own range.
pub fn free_ports_in(first: u64, blocks: u64, n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = first + (u64::from(std::process::id()) % blocks) * 100;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(offset < 100, "this test binary ran out of its port block");
        let port = u16::try_from(base + offset).expect("port below 65536");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            out.push(port);
        }
    }
    out
}

/// Read `s` to its end in 16 KiB reads, pausing 20 ms every 64 reads, so the
/// server's socket fills and its sends come back short and must resume.
pub fn read_slowly(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut reads = 0u32;
    loop {
        match read_some(s, &mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e}"),
        }
        reads += 1;
        if reads.is_multiple_of(64) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `n` GETs of `path` on `addr` released at once (a barrier), each on its
/// own connection; their responses.
pub fn concurrent_gets(addr: SocketAddr, path: &str, n: usize) -> Vec<Resp> {
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            let path = path.to_string();
            std::thread::spawn(move || {
                barrier.wait();
                http(addr, "GET", &path, &[], b"")
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect()
}

/// Deterministic bytes (a tiny xorshift), different per seed: no piece of one body stands in
/// another, or elsewhere in the same body.
pub fn xorshift_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `len` bytes counting 0, 1, ... up to `period - 1` and over again: with a period that is not
/// a power of two (251, 241), a piece served from the wrong offset shows.
pub fn repeating_bytes(len: usize, period: u8) -> Vec<u8> {
    (0..len).map(|n| (n % usize::from(period)) as u8).collect()
}

/// PUTs `len` bytes to `path` over plaintext HTTP/1 and returns them ([`repeating_bytes`] of
/// period 251).
pub fn put_blob(server: &Server, path: &str, len: usize) -> Vec<u8> {
    let body = repeating_bytes(len, 251);
    let r = server.send(Front::Http1, req("PUT", path).body(body.clone()));
    assert!(r.status == 201 || r.status == 204, "{}", r.status);
    body
}

/// A plaintext connection with a 20 s read timeout that has sent `GET path` with
/// `Connection: close`.
pub fn start_get(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes())
        .expect("write");
    s
}

// Scenarios every plaintext engine must pass (the ring in tests/engine.rs, epoll in
// tests/epoll.rs): each starts its own server from `builder`.

/// A client that reads an 8 MiB body in small pieces with pauses gets every byte: the socket
/// fills, the engine's sends (splices on the ring, sendfile on epoll) come back short or with
/// EAGAIN, and the body must go on when the socket drains.
pub fn slow_reader_gets_every_byte(builder: ServerBuilder) {
    let server = builder.start();
    let body = put_blob(&server, "/v1/artifacts/e/slow", 8 << 20);
    let mut s = start_get(server.addr, "/v1/artifacts/e/slow");
    let out = read_slowly(&mut s);
    let (resp, _) = parse_response(&out, false).expect("response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.len(), body.len());
    assert!(resp.body == body, "body differs");
}

/// A connection that sends part of a head and stops gets 408 after
/// `header_read_timeout_ms` (1 s here), while other clients are served meanwhile.
pub fn slow_head_gets_408_while_others_are_served(builder: ServerBuilder) {
    let server = builder.env("SLUICE_HEADER_READ_TIMEOUT_MS", "1000").start();
    let mut slow = TcpStream::connect(server.addr).expect("connect");
    slow.write_all(b"GET /up HTTP/1.1\r\nHost: a\r\n")
        .expect("partial head");
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(600) {
        assert_eq!(server.status(Front::Http1, "GET", "/up"), 200);
    }
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut out = Vec::new();
    let _ = slow.read_to_end(&mut out);
    assert!(
        out.starts_with(b"HTTP/1.1 408 "),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(8));
}
