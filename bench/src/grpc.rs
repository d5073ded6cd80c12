//! `sluice-bench grpc`: the REAPI goals of issue 25 against a release sluice started here,
//! each against its HTTP counterpart on the same server in the same run, alternating, medians
//! of the repeats (docs/benchmarks.md, "REAPI over gRPC"):
//!
//! - FindMissingBlobs of 10,000 digests (half of them present): latency of one call.
//! - BatchReadBlobs of 100 x 4 KiB over 8 connections vs 100 HTTP/1.1 GETs of the same blobs
//!   over 8 keep-alive connections on the ring (sluice-bench's own client): blobs per second.
//! - ByteStream.Read of a 64 MiB blob over h2c vs an HTTP/2 GET of it (h2c, the same fallback
//!   front): MB/s of one stream.
//! - zstd: ByteStream.Read of `compressed-blobs/zstd/` for a compressible (build-log text) and
//!   an incompressible 64 MiB blob: bytes on the wire and MB/s (uncompressed bytes delivered).
//! - What keeping blobs compressed on disk would cost instead: zstd's compress and decompress
//!   speed on the same data in this process, and the ring's plain HTTP/1.1 GET of the blob.
//!
//! The client runs on the same two cores as the server, as in every sluice-bench figure; the
//! load average is printed beside each result.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream as bs;
use sha2::{Digest as _, Sha256};

use crate::client::ReceiveOptions;
use crate::compare::median_min_max;
use crate::request::{Method, Request, RequestSet, Url};
use crate::run::{run, RunConfig, Stop};

/// What to run.
#[derive(Debug, Clone)]
pub struct GrpcConfig {
    /// The sluice binary (release build).
    pub sluice_bin: PathBuf,
    /// Where the server's data directory and log go.
    pub out_dir: PathBuf,
    /// Alternating repeats of each comparison.
    pub repeats: usize,
    /// Length of each throughput run.
    pub run_time: Duration,
    /// Sections to run (`fmb`, `batch`, `stream`, `zstd`, `disk`); empty: all.
    pub only: Vec<String>,
}

impl GrpcConfig {
    fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

/// The 1-, 5- and 15-minute load averages, as `/proc/loadavg` has them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Incompressible bytes from a seed (xorshift64*).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Compressible bytes like a build log: numbered lines with paths and a little variation.
pub fn log_bytes(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    let mut i = 0u64;
    while out.len() < len {
        let line = format!(
            "INFO: [{i:>7}] Compiling src/module_{}/file_{}.cc (target //pkg{}:lib, {} ms)\n",
            i % 97,
            i % 13,
            i % 7,
            (i * 7919) % 1000
        );
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

struct Sluice {
    child: Child,
    port: u16,
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = crate::sys::terminate(self.child.id());
        let _ = self.child.wait();
    }
}

fn start(cfg: &GrpcConfig) -> Result<Sluice, String> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let data = cfg.out_dir.join("grpc-data");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    let log = std::fs::File::create(cfg.out_dir.join("grpc-sluice.log"))
        .map_err(|e| format!("sluice log: {e}"))?;
    let child = Command::new(&cfg.sluice_bin)
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(&data)
        .env("SLUICE_CONNECTIONS_PER_IP_MAX", "0")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", cfg.sluice_bin.display()))?;
    let server = Sluice { child, port };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err("sluice did not listen within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(server)
}

type Channel = tonic::transport::Channel;

async fn channel(port: u16) -> Result<Channel, String> {
    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("gRPC connect: {e}"))
}

fn digest(data: &[u8]) -> re::Digest {
    re::Digest {
        hash: sha256_hex(data),
        size_bytes: data.len() as i64,
    }
}

/// Upload blobs with BatchUpdateBlobs (small) or ByteStream (large).
async fn upload(ch: &Channel, blobs: &[Vec<u8>]) -> Result<(), String> {
    let mut cas =
        re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch.clone());
    let mut stream = bs::byte_stream_client::ByteStreamClient::new(ch.clone());
    for blob in blobs {
        if blob.len() < 1 << 20 {
            let r = cas
                .batch_update_blobs(re::BatchUpdateBlobsRequest {
                    requests: vec![re::batch_update_blobs_request::Request {
                        digest: Some(digest(blob)),
                        data: blob.clone(),
                        compressor: 0,
                    }],
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("BatchUpdateBlobs: {e}"))?
                .into_inner();
            if r.responses
                .iter()
                .any(|x| x.status.as_ref().is_some_and(|s| s.code != 0))
            {
                return Err(format!("BatchUpdateBlobs refused a blob: {r:?}"));
            }
        } else {
            let d = digest(blob);
            let name = format!("uploads/bench/blobs/{}/{}", d.hash, d.size_bytes);
            let chunk = 1 << 20;
            let messages: Vec<_> = blob
                .chunks(chunk)
                .enumerate()
                .map(|(i, piece)| bs::WriteRequest {
                    resource_name: name.clone(),
                    write_offset: (i * chunk) as i64,
                    finish_write: (i + 1) * chunk >= blob.len(),
                    data: piece.to_vec(),
                })
                .collect();
            stream
                .write(futures::stream::iter(messages))
                .await
                .map_err(|e| format!("ByteStream.Write: {e}"))?;
        }
    }
    Ok(())
}

/// Read a whole blob over ByteStream: (payload bytes on the wire, elapsed).
async fn bytestream_read(ch: &Channel, name: String) -> Result<(u64, Duration), String> {
    let mut client = bs::byte_stream_client::ByteStreamClient::new(ch.clone())
        .max_decoding_message_size(16 << 20);
    let started = Instant::now();
    let mut stream = client
        .read(bs::ReadRequest {
            resource_name: name,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("ByteStream.Read: {e}"))?
        .into_inner();
    let mut bytes = 0u64;
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|e| format!("ByteStream.Read: {e}"))?
    {
        bytes += msg.data.len() as u64;
    }
    Ok((bytes, started.elapsed()))
}

/// GET `path` over HTTP/2 prior knowledge (h2c) on one connection: (body bytes, elapsed).
async fn h2c_get(port: u16, path: &str) -> Result<(u64, Duration), String> {
    use http_body_util::BodyExt as _;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            // As a gRPC client's defaults would be: large windows for one large stream.
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(8 << 20)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(format!("http://127.0.0.1:{port}{path}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("GET {path}: {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(data) = frame.data_ref() {
            bytes += data.len() as u64;
        }
    }
    Ok((bytes, started.elapsed()))
}

/// BatchReadBlobs of `digests` from `connections` connections, closed loop, for `time`:
/// blobs per second.
async fn batch_read_rate(
    port: u16,
    digests: &[re::Digest],
    connections: usize,
    time: Duration,
) -> Result<f64, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let blobs = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        // One connection each (a Channel is one HTTP/2 connection).
        let ch = channel(port).await?;
        let (stop, blobs, digests) = (Arc::clone(&stop), Arc::clone(&blobs), digests.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut cas =
                re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch)
                    .max_decoding_message_size(16 << 20);
            while !stop.load(Ordering::Relaxed) {
                let r = cas
                    .batch_read_blobs(re::BatchReadBlobsRequest {
                        digests: digests.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("BatchReadBlobs: {e}"))?
                    .into_inner();
                let ok = r
                    .responses
                    .iter()
                    .filter(|x| x.status.as_ref().is_none_or(|s| s.code == 0))
                    .count();
                if ok != digests.len() {
                    return Err(format!("BatchReadBlobs: {ok} of {} ok", digests.len()));
                }
                blobs.fetch_add(ok as u64, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(time).await;
    let counted = blobs.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    Ok(counted as f64 / elapsed.as_secs_f64())
}

/// 100 HTTP/1.1 GETs of the blobs, round robin, over `connections` keep-alive connections on
/// the ring (sluice-bench's own client): requests per second.
fn http1_get_rate(
    port: u16,
    hashes: &[String],
    connections: usize,
    time: Duration,
) -> Result<f64, String> {
    let mut requests = Vec::new();
    for hash in hashes {
        let url = Url::parse(&format!("http://127.0.0.1:{port}/cas/{hash}"))?;
        requests.push(Request::new(Method::Get, &url, None, None));
    }
    let set = RequestSet {
        authority: format!("127.0.0.1:{port}"),
        requests,
        weighted: false,
        once: false,
    };
    let result = run(
        set,
        RunConfig {
            connections,
            stop: Stop::Duration(time),
            warmup: Duration::from_millis(300),
            receive: ReceiveOptions {
                verify_sha256: false,
                splice: false,
            },
            progress: false,
            ..RunConfig::default()
        },
    )?;
    if result.errors.total() > 0 {
        return Err(format!("HTTP/1.1 GETs failed: {:?}", result.errors));
    }
    Ok(result.requests_per_sec())
}

/// One GET of a large blob over HTTP/1.1 on the ring: MB/s.
fn http1_large_get(port: u16, hash: &str) -> Result<f64, String> {
    let url = format!("http://127.0.0.1:{port}/cas/{hash}");
    let result = run(
        RequestSet::single(&url, Method::Get, 0)?,
        RunConfig {
            connections: 1,
            stop: Stop::Requests(3),
            receive: ReceiveOptions {
                verify_sha256: false,
                splice: true,
            },
            progress: false,
            ..RunConfig::default()
        },
    )?;
    Ok(result.mb_per_sec())
}

fn median(xs: &[f64]) -> f64 {
    median_min_max(xs).map_or(f64::NAN, |(m, _, _)| m)
}

fn range(xs: &[f64]) -> String {
    match median_min_max(xs) {
        Some((m, lo, hi)) => format!("{m:.1} ({lo:.1}-{hi:.1})"),
        None => "-".into(),
    }
}

/// In-process zstd speed on `data` at `level`: (compress MB/s, decompress MB/s, ratio).
fn zstd_speed(data: &[u8], level: i32) -> (f64, f64, f64) {
    let started = Instant::now();
    let packed = zstd::bulk::compress(data, level).unwrap_or_default();
    let compress = data.len() as f64 / 1e6 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let plain = zstd::bulk::decompress(&packed, data.len()).unwrap_or_default();
    let decompress = plain.len() as f64 / 1e6 / started.elapsed().as_secs_f64();
    (
        compress,
        decompress,
        data.len() as f64 / packed.len().max(1) as f64,
    )
}

/// Run everything; the report is Markdown.
pub fn grpc_bench(cfg: &GrpcConfig) -> Result<String, String> {
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| e.to_string())?;
    let server = start(cfg)?;
    let port = server.port;
    // One client thread per connection of the 8-connection runs, as sluice-bench's HTTP/1.1
    // client has: on a loaded machine the CPU a client gets follows its thread count.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(8)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let small: Vec<Vec<u8>> = (0..100).map(|i| random_bytes(1000 + i, 4096)).collect();
    let big = random_bytes(7, 64 << 20);
    let text = log_bytes(64 << 20);
    let present: Vec<Vec<u8>> = (0..5000).map(|i| random_bytes(50_000 + i, 64)).collect();
    let mut report = String::new();
    let mut line = |s: String| {
        eprintln!("{s}");
        report.push_str(&s);
        report.push('\n');
    };
    line(format!(
        "sluice {} (pid {}) on 127.0.0.1:{port}; load average at start {}",
        cfg.sluice_bin.display(),
        server.child.id(),
        load_average()
    ));
    let ch = rt.block_on(channel(port))?;
    rt.block_on(upload(&ch, &small))?;
    rt.block_on(upload(&ch, &present))?;
    rt.block_on(upload(&ch, &[big.clone(), text.clone()]))?;

    // FindMissingBlobs: 5,000 present and 5,000 absent digests.
    if cfg.runs("fmb") {
        let mut asked: Vec<re::Digest> = present.iter().map(|b| digest(b)).collect();
        asked.extend((0..5000u64).map(|i| digest(&random_bytes(90_000 + i, 64))));
        let mut fmb_ms = Vec::new();
        let mut cas = re::content_addressable_storage_client::ContentAddressableStorageClient::new(
            ch.clone(),
        );
        for _ in 0..(cfg.repeats * 4).max(10) {
            let started = Instant::now();
            let r = rt
                .block_on(cas.find_missing_blobs(re::FindMissingBlobsRequest {
                    blob_digests: asked.clone(),
                    ..Default::default()
                }))
                .map_err(|e| format!("FindMissingBlobs: {e}"))?
                .into_inner();
            fmb_ms.push(started.elapsed().as_secs_f64() * 1e3);
            if r.missing_blob_digests.len() != 5000 {
                return Err(format!(
                    "FindMissingBlobs found {} missing, not 5000",
                    r.missing_blob_digests.len()
                ));
            }
        }
        line(format!(
        "\nFindMissingBlobs of 10,000 digests (5,000 present): {} ms, median (min-max) of {} calls; load {}",
        range(&fmb_ms),
        fmb_ms.len(),
        load_average()
    ));
    }

    // BatchReadBlobs of 100 x 4 KiB vs 100 HTTP/1.1 GETs, 8 connections each, alternating.
    let digests: Vec<re::Digest> = small.iter().map(|b| digest(b)).collect();
    let hashes: Vec<String> = digests.iter().map(|d| d.hash.clone()).collect();
    if cfg.runs("batch") {
        let (mut batch, mut gets) = (Vec::new(), Vec::new());
        let (mut batch_cpu, mut gets_cpu) = (Vec::new(), Vec::new());
        let pid = server.child.id();
        // Server CPU time per blob: what the load average changes least.
        let cpu_us_per_blob = |before: f64, rate: f64, time: Duration| {
            (crate::compare::process_tree_cpu_secs(pid) - before) * 1e6
                / (rate * time.as_secs_f64()).max(1.0)
        };
        for _ in 0..cfg.repeats {
            let before = crate::compare::process_tree_cpu_secs(pid);
            let rate = rt.block_on(batch_read_rate(port, &digests, 8, cfg.run_time))?;
            batch_cpu.push(cpu_us_per_blob(before, rate, cfg.run_time));
            batch.push(rate);
            let before = crate::compare::process_tree_cpu_secs(pid);
            let rate = http1_get_rate(port, &hashes, 8, cfg.run_time)?;
            // The HTTP run adds 0.3 s of warm-up to its measured time.
            let counted = cfg.run_time + Duration::from_millis(300);
            gets_cpu.push(cpu_us_per_blob(before, rate, counted));
            gets.push(rate);
        }
        line(format!(
            "\n4 KiB blobs per second, 8 connections, {} alternating runs of {:?}; load {}\n\n\
             | | blobs/s, median (min-max) | server CPU µs per blob |\n|---|---|---|\n\
             | BatchReadBlobs (100 per call), h2c | {} | {} |\n\
             | HTTP/1.1 GET on the ring | {} | {} |\n\
             | ratio | {:.2}x | {:.2}x |",
            cfg.repeats,
            cfg.run_time,
            load_average(),
            range(&batch),
            range(&batch_cpu),
            range(&gets),
            range(&gets_cpu),
            median(&batch) / median(&gets),
            median(&batch_cpu) / median(&gets_cpu)
        ));
    }

    // 64 MiB: ByteStream.Read vs an HTTP/2 GET on the same front (h2c), alternating.
    let big_d = digest(&big);
    let text_d = digest(&text);
    let (mut bsr, mut h2) = (Vec::new(), Vec::new());
    if cfg.runs("stream") {
        for _ in 0..cfg.repeats {
            let (n, took) = rt.block_on(bytestream_read(
                &ch,
                format!("blobs/{}/{}", big_d.hash, big_d.size_bytes),
            ))?;
            bsr.push(n as f64 / 1e6 / took.as_secs_f64());
            let (n, took) = rt.block_on(h2c_get(port, &format!("/cas/{}", big_d.hash)))?;
            h2.push(n as f64 / 1e6 / took.as_secs_f64());
        }
        line(format!(
            "\n64 MiB blob, one stream, h2c, {} alternating runs; load {}\n\n\
         | | MB/s, median (min-max) |\n|---|---|\n\
         | ByteStream.Read | {} |\n| HTTP/2 GET | {} |\n| ratio | {:.2}x |",
            cfg.repeats,
            load_average(),
            range(&bsr),
            range(&h2),
            median(&bsr) / median(&h2)
        ));
    }

    // zstd on the wire.
    if cfg.runs("zstd") {
        let mut rows = String::new();
        for (what, d) in [("build-log text", &text_d), ("random bytes", &big_d)] {
            let (mut plain_mbs, mut z_mbs, mut z_bytes) = (Vec::new(), Vec::new(), 0u64);
            for _ in 0..cfg.repeats {
                let (n, took) = rt.block_on(bytestream_read(
                    &ch,
                    format!("blobs/{}/{}", d.hash, d.size_bytes),
                ))?;
                plain_mbs.push(n as f64 / 1e6 / took.as_secs_f64());
                let (n, took) = rt.block_on(bytestream_read(
                    &ch,
                    format!("compressed-blobs/zstd/{}/{}", d.hash, d.size_bytes),
                ))?;
                z_bytes = n;
                z_mbs.push(d.size_bytes as f64 / 1e6 / took.as_secs_f64());
            }
            rows.push_str(&format!(
                "| {what} | {} | {} ({:.1}x smaller) | {} | {} |\n",
                d.size_bytes,
                z_bytes,
                d.size_bytes as f64 / z_bytes.max(1) as f64,
                range(&plain_mbs),
                range(&z_mbs)
            ));
        }
        line(format!(
        "\nByteStream.Read of 64 MiB, plain vs compressed-blobs/zstd (level {}), {} runs each; load {}\n\n\
         | blob | plain bytes on the wire | zstd bytes on the wire | plain MB/s | zstd MB/s (uncompressed) |\n\
         |---|---|---|---|---|\n{rows}",
        1,
        cfg.repeats,
        load_average()
    ));
    }

    // What storing compressed would cost instead.
    if cfg.runs("disk") {
        let ring_mbs: Vec<f64> = (0..cfg.repeats)
            .map(|_| http1_large_get(port, &text_d.hash))
            .collect::<Result<_, _>>()?;
        let mut rows = String::new();
        for (what, data) in [("build-log text", &text), ("random bytes", &big)] {
            for level in [1, 3] {
                let (c, d, ratio) = zstd_speed(data, level);
                rows.push_str(&format!(
                    "| {what} | {level} | {ratio:.2} | {c:.0} | {d:.0} |\n"
                ));
            }
        }
        line(format!(
        "\nzstd in this process (one core), 64 MiB; load {}\n\n\
         | data | level | ratio | compress MB/s | decompress MB/s |\n|---|---|---|---|---|\n{rows}\n\
         The ring's HTTP/1.1 GET of the 64 MiB text blob (plain on disk, splice): {} MB/s",
        load_average(),
        range(&ring_mbs)
    ));
    }
    drop(server);
    Ok(report)
}

/// Where `sluice-bench grpc` writes by default.
pub fn default_out_dir(root: &Path) -> PathBuf {
    root.join("bench/out/grpc")
}
