//! REAPI v2 over gRPC against the real binary, with real gRPC clients: Python `grpcio`
//! (grpc-core: strict about HTTP/2 framing) over h2c and TLS on the HTTP port, and a Rust
//! tonic client. Every RPC sluice serves is exercised (tests/reapi/cases.py): capabilities,
//! the action cache with completeness checking, FindMissingBlobs, the batch calls, GetTree
//! with pages, ByteStream reads with offsets and limits, resumable writes and
//! QueryWriteStatus, zstd both ways, tokens and scopes, bad input, and that HTTP and gRPC see
//! the same blobs. Replication and read-through carry gRPC writes between two nodes.
//!
//! The Python client is installed on first use into a virtual environment under the target
//! directory (`pip install grpcio grpcio-tools zstandard`), with stubs generated from the
//! protos in the `buildstream` wheel (tests/reapi/setup.py). Where that cannot be done (no
//! python3, no index), the Python cases skip with a message on stderr; the tonic case runs
//! regardless. Bazel over `grpc://` and `grpcs://` is in tests/clients.rs.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream as bs;
use common::{http, metric_at, server, sha256_hex, wait_for, xorshift_bytes};

const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reapi/cases.py");
const SETUP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reapi/setup.py");

/// Says loudly that a case is skipped (the harness captures `eprintln!`, not this).
fn skip(why: &str) {
    let case = std::thread::current()
        .name()
        .unwrap_or("reapi case")
        .to_string();
    let _ = writeln!(
        std::io::stderr(),
        "\n*** reapi suite: SKIPPED {case}: {why} ***\n"
    );
}

/// The venv's python and the generated stubs' directory, set up once per test binary.
fn python() -> Option<(PathBuf, PathBuf)> {
    static READY: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let venv = root.join("reapi-venv");
        let py = venv.join("bin").join("python");
        let out = root.join("reapi-py");
        let started = Instant::now();
        let run = |cmd: &mut Command| -> Result<(), String> {
            let output = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{cmd:?} failed:\n{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ))
            }
        };
        let have = |module: &str| {
            Command::new(&py)
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !(have("grpc") && have("grpc_tools") && have("zstandard")) {
            run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
            run(Command::new(&py).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "grpcio",
                "grpcio-tools",
                "zstandard",
            ]))?;
        }
        run(Command::new(&py).arg(SETUP).arg(&out))?;
        let took = started.elapsed();
        if took > Duration::from_secs(2) {
            eprintln!(
                "reapi suite: Python gRPC client ready in {:.1} s",
                took.as_secs_f64()
            );
        }
        Ok((py, out.join("gen")))
    });
    match ready {
        Ok(paths) => Some(paths.clone()),
        Err(why) => {
            skip(&format!("no Python gRPC client: {why}"));
            None
        }
    }
}

/// Run `cases` of cases.py against `port`; panics with the output when one fails.
fn run_cases(port: u16, extra: &[&str], env: &[(&str, &str)], cases: &[&str]) -> String {
    let Some((py, gen)) = python() else {
        return String::new();
    };
    let mut cmd = Command::new(py);
    cmd.arg(CASES)
        .arg(gen)
        .arg(port.to_string())
        .args(extra)
        .args(cases);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run cases.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "cases {cases:?} failed:\n{text}");
    for case in cases {
        assert!(
            text.contains(&format!("ok {case}\n")),
            "{case} did not finish:\n{text}"
        );
    }
    text
}

/// A whole ByteStream read.
async fn read_blob(
    client: &mut bs::byte_stream_client::ByteStreamClient<tonic::transport::Channel>,
    resource_name: String,
) -> Vec<u8> {
    let mut read = client
        .read(bs::ReadRequest {
            resource_name,
            ..Default::default()
        })
        .await
        .expect("read")
        .into_inner();
    let mut got = Vec::new();
    while let Some(msg) = read.message().await.expect("message") {
        got.extend_from_slice(&msg.data);
    }
    got
}

const EVERY_RPC: [&str; 9] = [
    "caps",
    "bytestream",
    "zstd",
    "resume",
    "batch",
    "tree",
    "ac",
    "http_shared",
    "unimplemented",
];

/// Every RPC through grpc-core, on the one port, by prior knowledge (h2c) and over TLS with
/// ALPN h2; the per-RPC metrics count them.
#[test]
fn grpcio_over_h2c_and_tls_covers_every_rpc() {
    let srv = server().start();
    let port = srv.addr.port();
    let tmp = tempfile::tempdir().expect("tempdir");
    let pem = common::write_cert_pem(&srv, tmp.path());
    run_cases(port, &[], &[], &EVERY_RPC);
    if python().is_none() {
        return;
    }
    run_cases(
        port,
        &["--tls", pem.to_str().expect("path")],
        &[],
        &EVERY_RPC,
    );
    let count = |method: &str, code: &str| {
        metric_at(
            srv.addr,
            "sluice_grpc_requests_total",
            &[&format!("method=\"{method}\""), &format!("code=\"{code}\"")],
        )
    };
    for (method, code) in [
        ("Capabilities.GetCapabilities", "OK"),
        ("ActionCache.GetActionResult", "OK"),
        ("ActionCache.GetActionResult", "NOT_FOUND"),
        ("ActionCache.UpdateActionResult", "FAILED_PRECONDITION"),
        ("ContentAddressableStorage.FindMissingBlobs", "OK"),
        ("ContentAddressableStorage.BatchUpdateBlobs", "OK"),
        ("ContentAddressableStorage.BatchReadBlobs", "OK"),
        ("ContentAddressableStorage.GetTree", "OK"),
        ("ContentAddressableStorage.SplitBlob", "UNIMPLEMENTED"),
        ("ByteStream.Read", "OUT_OF_RANGE"),
        ("ByteStream.Write", "OK"),
        ("ByteStream.Write", "CANCELLED"),
        ("ByteStream.QueryWriteStatus", "OK"),
        ("Execution.Execute", "UNIMPLEMENTED"),
    ] {
        assert!(
            count(method, code) >= 2.0,
            "{method} {code} should be counted once per pass"
        );
    }
    let written = metric_at(
        srv.addr,
        "sluice_grpc_request_bytes_total",
        &["method=\"ByteStream.Write\""],
    );
    let read = metric_at(
        srv.addr,
        "sluice_grpc_response_bytes_total",
        &["method=\"ByteStream.Read\""],
    );
    assert!(
        written > 1e6 && read > 1e6,
        "bytes: {written} in, {read} out"
    );
}

/// An action result whose output was evicted is a miss on gRPC and on HTTP, while the
/// entry itself is still stored.
#[test]
fn an_evicted_output_makes_its_action_result_a_miss() {
    // Room for three of the four 1 MiB blobs the case writes, and the small entry.
    let srv = server()
        .no_tls()
        .env(
            "SLUICE_STORE_BYTES_MAX",
            &(3 * 1024 * 1024 + 512 * 1024).to_string(),
        )
        .start();
    run_cases(srv.addr.port(), &[], &[], &["evicted"]);
}

/// With `ac_completeness_check = false`, an entry naming a missing blob is served and stored.
#[test]
fn completeness_checking_can_be_turned_off() {
    let srv = server()
        .no_tls()
        .env("SLUICE_AC_COMPLETENESS_CHECK", "false")
        .start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let url = format!("http://{}", srv.addr);
        let mut ac = re::action_cache_client::ActionCacheClient::connect(url)
            .await
            .expect("connect");
        let ghost = re::Digest {
            hash: sha256_hex(b"never uploaded"),
            size_bytes: 14,
        };
        let action = re::Digest {
            hash: sha256_hex(b"an action"),
            size_bytes: 9,
        };
        let result = re::ActionResult {
            output_files: vec![re::OutputFile {
                path: "out".into(),
                digest: Some(ghost),
                ..Default::default()
            }],
            ..Default::default()
        };
        ac.update_action_result(re::UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            action_result: Some(result.clone()),
            ..Default::default()
        })
        .await
        .expect("stored without its blob");
        let got = ac
            .get_action_result(re::GetActionResultRequest {
                action_digest: Some(action.clone()),
                ..Default::default()
            })
            .await
            .expect("served without its blob")
            .into_inner();
        assert_eq!(got, result);
        let resp = http(srv.addr, "GET", &format!("/ac/{}", action.hash), &[], b"");
        assert_eq!(resp.status, 200);
    });
}

const TOKENS: &str = r#"
[namespaces.ac]
read = "token"

[[tokens]]
name = "rw"
secret = "rw-secret-0123456789"
access = "rw"

[[tokens]]
name = "ro"
secret = "ro-secret-0123456789"
access = "ro"

[[tokens]]
name = "cas-only"
secret = "cas-only-secret-0123456789"
access = "rw"
namespaces = ["cas"]
"#;

/// Tokens from the `authorization` metadata with HTTP's scopes: UNAUTHENTICATED without a
/// valid one where one is needed, PERMISSION_DENIED for a read-only token writing or a
/// token out of its namespaces, and `update_enabled` in the capabilities per caller.
#[test]
fn tokens_and_scopes_as_on_http() {
    let srv = server().config(TOKENS).start();
    let port = srv.addr.port();
    run_cases(port, &[], &[], &["auth_anonymous"]);
    for (kind, secret) in [
        ("rw", "rw-secret-0123456789"),
        ("ro", "ro-secret-0123456789"),
        ("cas-only", "cas-only-secret-0123456789"),
        ("wrong", "not-a-configured-secret"),
    ] {
        run_cases(
            port,
            &["--token", secret],
            &[("TOKEN_KIND", kind)],
            &["auth_token"],
        );
    }
}

/// The same RPCs from a Rust tonic client: capabilities, a NOT_FOUND (trailers-only) and a
/// ByteStream round trip whose blob HTTP then serves.
#[test]
fn tonic_client_round_trip() {
    let srv = server().no_tls().start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let data = xorshift_bytes(7, 3 * 1024 * 1024 + 5);
    let hash = sha256_hex(&data);
    rt.block_on(async {
        let url = format!("http://{}", srv.addr);
        let mut caps = re::capabilities_client::CapabilitiesClient::connect(url.clone())
            .await
            .expect("connect");
        let c = caps
            .get_capabilities(re::GetCapabilitiesRequest::default())
            .await
            .expect("capabilities")
            .into_inner();
        assert_eq!(
            c.cache_capabilities.expect("cache").digest_functions,
            vec![re::digest_function::Value::Sha256 as i32]
        );
        let mut ac = re::action_cache_client::ActionCacheClient::connect(url.clone())
            .await
            .expect("connect");
        let absent = ac
            .get_action_result(re::GetActionResultRequest {
                action_digest: Some(re::Digest {
                    hash: "0".repeat(64),
                    size_bytes: 1,
                }),
                ..Default::default()
            })
            .await
            .expect_err("absent");
        assert_eq!(absent.code(), tonic::Code::NotFound);
        let mut stream = bs::byte_stream_client::ByteStreamClient::connect(url)
            .await
            .expect("connect");
        let name = format!("uploads/tonic/blobs/{hash}/{}", data.len());
        let chunks: Vec<_> = data
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, piece)| bs::WriteRequest {
                resource_name: name.clone(),
                write_offset: (i << 20) as i64,
                finish_write: (i + 1) << 20 >= data.len(),
                data: piece.to_vec(),
            })
            .collect();
        let written = stream
            .write(futures::stream::iter(chunks))
            .await
            .expect("write")
            .into_inner();
        assert_eq!(written.committed_size, data.len() as i64);
        let got = read_blob(&mut stream, format!("blobs/{hash}/{}", data.len())).await;
        assert!(got == data, "read back {} bytes", got.len());
    });
    let resp = http(srv.addr, "GET", &format!("/cas/{hash}"), &[], b"");
    assert_eq!(resp.status, 200);
    assert!(resp.body == data);
}

/// Two nodes: a blob and an action result written over gRPC on A are replicated to B (A's
/// outbox carries gRPC writes), and a blob only B holds is read through by A on a gRPC read.
#[test]
fn grpc_writes_replicate_and_grpc_reads_read_through() {
    let secret = "reapi-mesh-secret-0123456789";
    // B only answers the peer API (no peers of its own); A lists B.
    let b = server().no_tls().env("SLUICE_PEER_SECRET", secret).start();
    let a = server()
        .no_tls()
        .env("SLUICE_PEER_SECRET", secret)
        .arg("--peers")
        .arg(&b.addr.to_string())
        .start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let blob = xorshift_bytes(11, 200_000);
    let hash = sha256_hex(&blob);
    let action = sha256_hex(b"replicated action");
    rt.block_on(async {
        let url = format!("http://{}", a.addr);
        let mut cas =
            re::content_addressable_storage_client::ContentAddressableStorageClient::connect(
                url.clone(),
            )
            .await
            .expect("connect");
        let digest = re::Digest {
            hash: hash.clone(),
            size_bytes: blob.len() as i64,
        };
        let r = cas
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                requests: vec![re::batch_update_blobs_request::Request {
                    digest: Some(digest.clone()),
                    data: blob.clone(),
                    compressor: 0,
                }],
                ..Default::default()
            })
            .await
            .expect("batch update")
            .into_inner();
        assert_eq!(r.responses[0].status.as_ref().map(|s| s.code), Some(0));
        let mut ac = re::action_cache_client::ActionCacheClient::connect(url)
            .await
            .expect("connect");
        ac.update_action_result(re::UpdateActionResultRequest {
            action_digest: Some(re::Digest {
                hash: action.clone(),
                size_bytes: 17,
            }),
            action_result: Some(re::ActionResult {
                output_files: vec![re::OutputFile {
                    path: "o".into(),
                    digest: Some(digest),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("update");
    });
    wait_for(
        "replication of the gRPC writes",
        Duration::from_secs(60),
        || {
            http(b.addr, "GET", &format!("/cas/{hash}"), &[], b"").status == 200
                && http(b.addr, "GET", &format!("/ac/{action}"), &[], b"").status == 200
        },
    );
    // Written to B only (B replicates to no one): A reads it through on a gRPC read.
    let only_b = xorshift_bytes(12, 50_000);
    let only_b_hash = sha256_hex(&only_b);
    let put = http(b.addr, "PUT", &format!("/cas/{only_b_hash}"), &[], &only_b);
    assert_eq!(put.status, 201);
    rt.block_on(async {
        let mut stream =
            bs::byte_stream_client::ByteStreamClient::connect(format!("http://{}", a.addr))
                .await
                .expect("connect");
        let name = format!("blobs/{only_b_hash}/{}", only_b.len());
        let got = read_blob(&mut stream, name).await;
        assert!(got == only_b, "read through {} bytes", got.len());
    });
    let fetched = metric_at(
        a.addr,
        "sluice_read_through_fetches_total",
        &["result=\"ok\""],
    );
    assert!(fetched >= 1.0, "A fetched {fetched} from its peer");
}

/// A full disk: a ByteStream write and a batch entry answer RESOURCE_EXHAUSTED and nothing is
/// stored. The data dir is a 2 MiB tmpfs (root only; skipped loudly elsewhere).
#[test]
fn a_full_disk_answers_resource_exhausted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        skip("cannot mount a small tmpfs here (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let srv = server().no_tls().data_dir(&mnt.join("data")).start();
    let big = xorshift_bytes(21, 3 << 20);
    let hash = sha256_hex(&big);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let url = format!("http://{}", srv.addr);
        let mut stream = bs::byte_stream_client::ByteStreamClient::connect(url.clone())
            .await
            .expect("connect");
        let name = format!("uploads/full/blobs/{hash}/{}", big.len());
        let chunks: Vec<_> = big
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, piece)| bs::WriteRequest {
                resource_name: name.clone(),
                write_offset: (i << 20) as i64,
                finish_write: (i + 1) << 20 >= big.len(),
                data: piece.to_vec(),
            })
            .collect();
        let err = stream
            .write(futures::stream::iter(chunks))
            .await
            .expect_err("a full disk");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
        let mut cas =
            re::content_addressable_storage_client::ContentAddressableStorageClient::connect(url)
                .await
                .expect("connect");
        let r = cas
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                requests: vec![re::batch_update_blobs_request::Request {
                    digest: Some(re::Digest {
                        hash: hash.clone(),
                        size_bytes: big.len() as i64,
                    }),
                    data: big.clone(),
                    compressor: 0,
                }],
                ..Default::default()
            })
            .await
            .expect("batch update")
            .into_inner();
        let code = r.responses[0].status.as_ref().map(|s| s.code);
        assert_eq!(code, Some(tonic::Code::ResourceExhausted as i32), "{r:?}");
    });
    let resp = http(srv.addr, "GET", &format!("/cas/{hash}"), &[], b"");
    assert_eq!(resp.status, 404);
}

/// The HTTP `/ac/` GET checks completeness on every front (the ring, TLS HTTP/1.1 and h2,
/// h2c): an entry naming a missing blob is a 404 (HEAD too) until the blob arrives.
#[test]
fn http_ac_completeness_on_every_front() {
    use prost::Message as _;
    let srv = server().start();
    let blob = xorshift_bytes(31, 10_000);
    let digest = re::Digest {
        hash: sha256_hex(&blob),
        size_bytes: blob.len() as i64,
    };
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "bazel-out/out".into(),
            digest: Some(digest.clone()),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let key = sha256_hex(b"front action");
    let put = srv.send(
        common::Front::Http1,
        common::req("PUT", &format!("/ac/{key}")).body(result.clone()),
    );
    assert_eq!(put.status, 201);
    for front in common::FRONTS {
        for method in ["GET", "HEAD"] {
            let status = srv.status(front, method, &format!("/ac/{key}"));
            assert_eq!(status, 404, "{method} on {front:?}");
        }
    }
    let put = srv.send(
        common::Front::Http1,
        common::req("PUT", &format!("/cas/{}", digest.hash)).body(blob),
    );
    assert_eq!(put.status, 201);
    for front in common::FRONTS {
        let resp = srv.send(front, common::req("GET", &format!("/main/ac/{key}")));
        assert_eq!(
            (resp.status, resp.body.as_slice()),
            (200, result.as_slice()),
            "{front:?}"
        );
    }
    assert_eq!(
        metric_at(srv.addr, "sluice_ac_incomplete_total", &[]),
        8.0,
        "four fronts, GET and HEAD"
    );
}
