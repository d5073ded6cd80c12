//! Replays every committed fuzz input through the same checks the fuzz targets run, on
//! stable and without a fuzzer: `fuzz/corpus/<target>/*` (seeds and minimised coverage) and
//! `fuzz/regressions/<target>/*` (every crash ever found, kept so it stays fixed).
//!
//! Also owns the seed generator: `SLUICE_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_corpus`
//! (re)writes the named seed files; without the variable the test checks that every seed is
//! committed with the generator's exact bytes, so the corpus cannot drift from the unit-test
//! tables in `sluice::http1::samples`.

use std::collections::BTreeMap;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use sluice::fuzzing::{target, TARGETS};
use sluice::http1::samples::{sample_requests, CHUNKED};
use sluice::http1::{parse_head, Limits, Status};
use sluice::store::format::{encode_header, HEADER_BYTES};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Targets that exist in the crate but whose corpus may not have seeds yet would be a silent
/// gap; every target must have at least this many committed seeds.
const SEEDS_PER_TARGET_MIN: usize = 10;

/// Replays one directory tree (`corpus` or `regressions`); returns files per target.
fn replay(kind: &str) -> BTreeMap<String, usize> {
    let root = fuzz_dir().join(kind);
    let mut counts = BTreeMap::new();
    let Ok(dirs) = fs::read_dir(&root) else {
        return counts;
    };
    let mut failures = Vec::new();
    for dir in dirs {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let check = target(&name)
            .unwrap_or_else(|| panic!("{kind}/{name}: no fuzz target of that name"))
            .check;
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for file in &files {
            let data = fs::read(file).unwrap();
            if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
                failures.push(file.display().to_string());
            }
        }
        counts.insert(name, files.len());
    }
    assert!(
        failures.is_empty(),
        "inputs failing their check: {failures:#?}"
    );
    counts
}

#[test]
fn corpus_replays_clean() {
    let counts = replay("corpus");
    for t in TARGETS {
        let n = counts.get(t.name).copied().unwrap_or(0);
        assert!(
            n >= SEEDS_PER_TARGET_MIN,
            "fuzz/corpus/{} has {n} files, want at least {SEEDS_PER_TARGET_MIN}",
            t.name
        );
    }
}

#[test]
fn regressions_replay_clean() {
    // Absent until the first crash is found; every file present must pass.
    replay("regressions");
}

/// RFC 9112 (and RFC 9110) example messages.
const RFC9112: &[(&str, &[u8])] = &[
    ("origin_form", b"GET /where?q=now HTTP/1.1\r\nHost: www.example.org\r\n\r\n"),
    ("absolute_form", b"GET http://www.example.org/pub/WWW/TheProject.html HTTP/1.1\r\nHost: www.example.org\r\n\r\n"),
    ("authority_form", b"CONNECT www.example.com:80 HTTP/1.1\r\nHost: www.example.com\r\n\r\n"),
    ("asterisk_form", b"OPTIONS * HTTP/1.1\r\nHost: www.example.org:8001\r\n\r\n"),
    ("curl_example", b"GET /hello.txt HTTP/1.1\r\nUser-Agent: curl/7.64.1\r\nHost: www.example.com\r\nAccept-Language: en, mi\r\n\r\n"),
    ("chunked_with_trailer", b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: Expires\r\n\r\n4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: Wed, 21 Oct 2015 07:28:00 GMT\r\n\r\n"),
    ("pipelined_gets", b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\nGET /c HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
    ("http10_keep_alive_pipeline", b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nPUT /b HTTP/1.0\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabcGET /c HTTP/1.0\r\n\r\n"),
    ("expect_continue", b"PUT /cas/e3b0 HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\ndata"),
    ("bazel_put", b"PUT /ac/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 HTTP/1.1\r\nHost: cache:8080\r\nContent-Length: 2\r\nContent-Type: application/octet-stream\r\n\r\nhi"),
];

macro_rules! smuggle {
    ($head:literal, $body:literal) => {
        concat!(
            "POST /cache/k HTTP/1.1\r\nHost: a\r\n",
            $head,
            "\r\n",
            $body,
            "GET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        .as_bytes()
    };
}

/// Known request-smuggling shapes, each followed by a request a confused parser would see.
const SMUGGLING: &[(&str, &[u8])] = &[
    ("cl_te", smuggle!("Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\nX")),
    ("te_cl", smuggle!("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", "8\r\nSMUGGLED\r\n0\r\n\r\n")),
    ("te_te_xchunked", smuggle!("Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n", "0\r\n\r\n")),
    ("te_te_space_before_colon", smuggle!("Transfer-Encoding : chunked\r\n", "0\r\n\r\n")),
    ("te_te_tab", smuggle!("Transfer-Encoding:\tchunked\r\n", "0\r\n\r\n")),
    ("te_te_leading_space", smuggle!(" Transfer-Encoding: chunked\r\n", "0\r\n\r\n")),
    ("te_te_mixed_case", smuggle!("tRANSFER-eNCODING: cHuNkEd\r\n", "0\r\n\r\n")),
    ("te_te_identity_chunked", smuggle!("Transfer-Encoding: identity, chunked\r\n", "0\r\n\r\n")),
    ("te_te_chunked_identity", smuggle!("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n")),
    ("te_te_comma_only", smuggle!("Transfer-Encoding: ,chunked\r\n", "0\r\n\r\n")),
    ("te_te_vertical_tab", smuggle!("Transfer-Encoding:\x0bchunked\r\n", "0\r\n\r\n")),
    ("te_te_bare_lf_name", smuggle!("X: y\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n")),
    ("cl_duplicate_differ", smuggle!("Content-Length: 0\r\nContent-Length: 5\r\n", "hello")),
    ("cl_duplicate_equal", smuggle!("Content-Length: 5\r\nContent-Length: 5\r\n", "hello")),
    ("cl_list_equal", smuggle!("Content-Length: 5,5\r\n", "hello")),
    ("cl_plus", smuggle!("Content-Length: +5\r\n", "hello")),
    ("cl_minus", smuggle!("Content-Length: -5\r\n", "hello")),
    ("cl_hex", smuggle!("Content-Length: 0x5\r\n", "hello")),
    ("cl_exponent", smuggle!("Content-Length: 5e0\r\n", "hello")),
    ("cl_overflow", smuggle!("Content-Length: 18446744073709551621\r\n", "hello")),
    ("cl_trailing_garbage", smuggle!("Content-Length: 5x\r\n", "hello")),
    ("chunk_size_0x", smuggle!("Transfer-Encoding: chunked\r\n", "0x5\r\nhello\r\n0\r\n\r\n")),
    ("chunk_size_overflow", smuggle!("Transfer-Encoding: chunked\r\n", "1ffffffffffffffff\r\nhello\r\n0\r\n\r\n")),
    ("chunk_size_u64_wrap", smuggle!("Transfer-Encoding: chunked\r\n", "10000000000000005\r\nhello\r\n0\r\n\r\n")),
    ("chunk_size_minus", smuggle!("Transfer-Encoding: chunked\r\n", "-5\r\nhello\r\n0\r\n\r\n")),
    ("chunk_ext_bare_lf", smuggle!("Transfer-Encoding: chunked\r\n", "5;a\nb\r\nhello\r\n0\r\n\r\n")),
    ("chunk_ext_bare_cr", smuggle!("Transfer-Encoding: chunked\r\n", "5;a\rb\r\nhello\r\n0\r\n\r\n")),
    ("chunk_size_bare_lf", smuggle!("Transfer-Encoding: chunked\r\n", "5\nhello\n0\n\n")),
    ("chunk_data_lf_only", smuggle!("Transfer-Encoding: chunked\r\n", "5\r\nhello\n0\r\n\r\n")),
    ("chunk_size_trailing_ws", smuggle!("Transfer-Encoding: chunked\r\n", "5 \r\nhello\r\n0\r\n\r\n")),
    ("chunk_last_no_crlf", smuggle!("Transfer-Encoding: chunked\r\n", "0\r\n")),
    ("obs_fold_te", smuggle!("Transfer-Encoding:\r\n chunked\r\n", "0\r\n\r\n")),
    ("obs_fold_cl", smuggle!("Content-Length:\r\n 5\r\n", "hello")),
    ("bare_lf_head", b"POST /cache/k HTTP/1.1\nHost: a\nContent-Length: 5\n\nhelloGET /admin HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("bare_cr_head", b"POST /cache/k HTTP/1.1\rHost: a\r\nContent-Length: 5\r\n\r\nhello"),
    ("http10_te", b"POST /cache/k HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("http10_te_cl", b"POST /cache/k HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("nul_in_te", smuggle!("Transfer-Encoding: chunked\x00\r\n", "0\r\n\r\n")),
    ("get_with_body", b"GET /up HTTP/1.1\r\nHost: a\r\nContent-Length: 37\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n"),
];

/// `Range` values for the range target (each seeded with three lengths).
const RANGES: &[(&str, &str)] = &[
    ("first_byte", "bytes=0-0"),
    ("middle", "bytes=2-5"),
    ("open_end", "bytes=2-"),
    ("suffix", "bytes=-3"),
    ("suffix_zero", "bytes=-0"),
    ("upper_unit", "BYTES=1-2"),
    ("ows", " bytes = 1-2 "),
    ("reversed", "bytes=5-3"),
    ("multi", "bytes=0-1,3-4"),
    ("empty_spec", "bytes="),
    ("dash_only", "bytes=-"),
    ("other_unit", "items=0-1"),
    ("huge_start", "bytes=99999999999999999999-"),
    ("huge_end", "bytes=0-99999999999999999999"),
    ("u64_max", "bytes=18446744073709551615-18446744073709551615"),
    ("plus", "bytes=+1-2"),
    ("hex", "bytes=0x1-2"),
];

/// Config files: the operations guide's examples and one bad value per kind of check.
const CONFIGS: &[(&str, &str)] = &[
    ("empty", ""),
    ("full", "listen = \"0.0.0.0:9090\"\ndata_dir = \"/var/lib/sluice\"\nallow_anonymous_writes = true\nstore_bytes_max = \"10GiB\"\nfsync = \"never\"\nhead_bytes_max = 8192\nuri_bytes_max = 4096\nbody_bytes_max = \"1GiB\"\ngradle_body_bytes_max = \"100MB\"\nheader_read_timeout_ms = 5000\nidle_timeout_ms = 30000\nengine = \"fallback\"\nengine_threads = 2\nfile_serving_mode = \"copy\"\nconnections_per_core_max = 1024\nfallback_connections_max = 64\nshutdown_pre_drain_ms = 1000\nshutdown_drain_ms = 5000\nshutdown_teardown_ms = 1000\nshutdown_grace_ms = 30000\nlog_level = \"debug\"\nlog_format = \"json\"\nlingering_time_ms = 30000\nlingering_timeout_ms = 5000\nlingering_bytes_max = \"256MiB\"\n"),
    ("auth", "[namespaces.private]\nread = \"token\"\n\n[[tokens]]\nname = \"ci\"\nsecret_env = \"FUZZ_TOKEN\"\naccess = \"rw\"\n\n[[tokens]]\nname = \"dev\"\nsecret = \"0123456789abcdef0123\"\naccess = \"ro\"\n"),
    ("tls_half", "tls_cert = \"cert.pem\"\n"),
    ("unknown_key", "listen_addr = \"127.0.0.1:1\"\n"),
    ("bad_listen", "listen = \"localhost\"\n"),
    ("bad_type", "head_bytes_max = \"big\"\n"),
    ("bad_suffix", "store_bytes_max = \"10XB\"\n"),
    ("negative", "engine_threads = -1\n"),
    ("overflow_size", "body_bytes_max = \"99999999999999999999GiB\"\n"),
    ("grace_exceeded", "shutdown_drain_ms = 40000\nshutdown_grace_ms = 30000\n"),
    ("anonymous_public", "listen = \"0.0.0.0:8080\"\n"),
    ("short_secret", "[[tokens]]\nname = \"a\"\nsecret = \"short\"\naccess = \"rw\"\n"),
    ("shared_secret", "[[tokens]]\nname = \"a\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n[[tokens]]\nname = \"b\"\nsecret = \"0123456789abcdef\"\naccess = \"ro\"\n"),
    ("missing_env", "[[tokens]]\nname = \"a\"\nsecret_env = \"NOT_SET\"\naccess = \"rw\"\n"),
    ("bad_namespace", "[namespaces.\"../x\"]\nread = \"token\"\n"),
    ("bad_access", "[[tokens]]\nname = \"a\"\nsecret_env = \"FUZZ_TOKEN\"\naccess = \"admin\"\n"),
    ("not_toml", "listen = [\n"),
    ("token_scopes", "[namespaces.team-a-private]\nread = \"token\"\n\n[[tokens]]\nname = \"team-a\"\nsecret_env = \"FUZZ_TOKEN\"\naccess = \"rw\"\nnamespaces = [\"team-a\", \"team-a-private\", \"ac\", \"cas\", \"gradle\"]\n"),
    ("empty_token_scope", "[[tokens]]\nname = \"a\"\nsecret_env = \"FUZZ_TOKEN\"\naccess = \"rw\"\nnamespaces = []\n"),
    ("bad_token_scope", "[[tokens]]\nname = \"a\"\nsecret_env = \"FUZZ_TOKEN\"\naccess = \"rw\"\nnamespaces = [\"ac\", \"../x\", \"ac\"]\n"),
];

/// Every named seed: (target, file name, bytes).
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut requests: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, bytes) in sample_requests() {
        requests.push((format!("sample-{name}"), bytes.to_vec()));
    }
    for (name, bytes) in RFC9112 {
        requests.push((format!("rfc9112-{name}"), bytes.to_vec()));
    }
    for (name, bytes) in SMUGGLING {
        requests.push((format!("smuggle-{name}"), bytes.to_vec()));
    }
    let mut out = Vec::new();
    for (name, bytes) in &requests {
        out.push(("http1_request", name.clone(), bytes.clone()));
        out.push(("http1_vs_hyper", name.clone(), bytes.clone()));
        // Pieces of 1 and 7 bytes on top of the whole / byte-by-byte comparison.
        let mut stream = vec![2u8, 0, 6];
        stream.extend_from_slice(bytes);
        out.push(("http1_stream", name.clone(), stream));
    }
    // Chunked bodies: the body after the head, in pieces of 3, in four encoder styles.
    let chunked_requests = CHUNKED
        .iter()
        .map(|&(name, bytes, _)| (format!("sample-{name}"), bytes))
        .chain(
            SMUGGLING
                .iter()
                .filter(|(name, _)| name.starts_with("chunk"))
                .map(|&(name, bytes)| (format!("smuggle-{name}"), bytes)),
        );
    for (i, (name, bytes)) in chunked_requests.enumerate() {
        let Ok(Status::Complete(head)) = parse_head(bytes, &Limits::default()) else {
            panic!("{name}: head must parse")
        };
        let style = [0x01u8, 0x11, 0x61, 0xf1][i % 4];
        let mut body = vec![style, 2];
        body.extend_from_slice(&bytes[head.head_len()..]);
        out.push(("chunked", name, body));
    }
    for (name, value) in RANGES {
        for len in [10u64, 0, u64::MAX] {
            let mut data = len.to_le_bytes().to_vec();
            data.extend_from_slice(value.as_bytes());
            out.push(("range_header", format!("range-{name}-len{len}"), data));
        }
    }
    // Artifact headers: valid ones, and the 56 signed bytes with one field wrong each.
    let valid = |len: u64, fill: u8| encode_header(len, &[fill; 32]).to_vec();
    let headers: Vec<(&str, Vec<u8>)> = vec![
        ("empty_body", valid(0, 0)),
        ("small_body", valid(5, 0xab)),
        ("large_body", valid(1 << 40, 0x11)),
        ("max_body", valid(u64::MAX - HEADER_BYTES as u64, 0xff)),
        ("with_body_bytes", [valid(3, 1), b"abc".to_vec()].concat()),
        ("truncated", valid(5, 2)[..63].to_vec()),
        (
            "bad_magic",
            [b"SLUICEB\0".to_vec(), valid(5, 3)[8..].to_vec()].concat(),
        ),
        (
            "bad_checksum",
            [valid(5, 4)[..63].to_vec(), vec![0]].concat(),
        ),
        (
            "version_2_fields",
            [valid(5, 5)[..8].to_vec(), vec![2, 0, 64, 0]].concat(),
        ),
        (
            "header_len_32_fields",
            [valid(5, 6)[..8].to_vec(), vec![1, 0, 32, 0]].concat(),
        ),
        (
            "flags_fields",
            [valid(5, 7)[..8].to_vec(), vec![1, 0, 64, 0, 1, 0, 0, 0]].concat(),
        ),
        (
            "body_too_long_fields",
            [valid(0, 8)[..16].to_vec(), vec![0xff; 8]].concat(),
        ),
    ];
    for (name, data) in headers {
        out.push(("artifact_header", format!("header-{name}"), data));
    }
    out.push((
        "config",
        "config-default-rendered".to_owned(),
        sluice::config::Config::default().to_toml().into_bytes(),
    ));
    for (name, text) in CONFIGS {
        out.push(("config", format!("config-{name}"), text.as_bytes().to_vec()));
    }
    // Anti-entropy messages: a whole bucket summary, listings well-formed and not.
    let summary: Vec<u8> = (0..4096u32 * 32).map(|i| (i % 251) as u8).collect();
    out.push(("peer_summaries", "summary-4096-buckets".to_owned(), summary));
    out.push(("peer_summaries", "summary-short".to_owned(), vec![7u8; 64]));
    let sha = "ab".repeat(32);
    let listings: &[(&str, String)] = &[
        ("listing-one", format!("ac {sha} 1700000000000 {sha} 12\n")),
        (
            "listing-three",
            format!("ac {sha} 1 {sha} 0\ncas {sha} 2 {sha} 4096\nblobs a~b 3 {sha} 20000000\n"),
        ),
        ("listing-empty", String::new()),
        ("listing-crlf", format!("ac k 1 {sha} 5\r\n")),
        ("listing-extra-field", format!("ac k 1 {sha} 5 extra\n")),
        ("listing-bad-hex", "ac k 1 zz 5\n".to_owned()),
        ("listing-missing-len", format!("ac k 1 {sha}\n")),
        ("listing-negative-time", format!("ac k -1 {sha} 5\n")),
        ("listing-empty-line", format!("ac k 1 {sha} 5\n\n")),
        (
            "listing-huge-len",
            format!("ac k 1 {sha} 99999999999999999999999\n"),
        ),
    ];
    // Outbox lines: what `Record::line` writes, and what a crash or damage leaves.
    let records: &[(&str, &str)] = &[
        (
            "outbox-put",
            "P 1 1700000000000 ac 0123abcd 1700000000001\n",
        ),
        (
            "outbox-delete",
            "D 2 1700000000002 blobs a~b 1700000000003\n",
        ),
        ("outbox-two", "P 3 1 cas k 2\nD 4 5 blobs k 6\n"),
        ("outbox-torn-tail", "P 5 1 ac k 2\nD 6 1 blo"),
        ("outbox-bad-op", "X 1 1 ac k 2\n"),
        ("outbox-extra-field", "P 1 1 ac k 2 3\n"),
        ("outbox-negative", "P -1 1 ac k 2\n"),
        ("outbox-huge-seq", "P 99999999999999999999999 1 ac k 2\n"),
        ("outbox-empty", ""),
        ("outbox-crlf", "P 1 1 ac k 2\r\n"),
    ];
    for (name, text) in records {
        out.push((
            "outbox_record",
            (*name).to_owned(),
            text.as_bytes().to_vec(),
        ));
    }
    for (name, text) in listings {
        out.push((
            "peer_summaries",
            (*name).to_owned(),
            text.as_bytes().to_vec(),
        ));
    }
    // A peer's answers to a read-through: good, corrupt, and damaged in every header the
    // fetch reads.
    let body = b"artifact bytes";
    let sha = sluice_sha256_hex(body);
    let answer = |status: &str, headers: &str, payload: &[u8]| {
        let mut bytes = format!("HTTP/1.1 {status}\r\n{headers}\r\n").into_bytes();
        bytes.extend_from_slice(payload);
        bytes
    };
    let good = format!(
        "Content-Length: 14\r\nx-sluice-sha256: {sha}\r\nx-sluice-write-time-ms: 1700000000000\r\n"
    );
    let answers: Vec<(&str, Vec<u8>)> = vec![
        ("get-ok", answer("200 OK", &good, body)),
        ("get-corrupt", answer("200 OK", &good, b"Artifact bytes")),
        ("get-404", answer("404 Not Found", "Content-Length: 0\r\n", b"")),
        (
            "get-no-time",
            answer(
                "200 OK",
                &format!("Content-Length: 14\r\nX-Sluice-SHA256: {sha}\r\n"),
                body,
            ),
        ),
        (
            "get-two-sha",
            answer(
                "200 OK",
                &format!("{good}x-sluice-sha256: {sha}\r\n"),
                body,
            ),
        ),
        (
            "get-to-close",
            answer(
                "200 OK",
                &format!("x-sluice-sha256: {sha}\r\nx-sluice-write-time-ms: 5\r\n"),
                body,
            ),
        ),
        (
            "get-truncated",
            answer(
                "200 OK",
                &format!("Content-Length: 100\r\nx-sluice-sha256: {sha}\r\n"),
                body,
            ),
        ),
        (
            "get-bad-hex",
            answer(
                "200 OK",
                "Content-Length: 14\r\nx-sluice-sha256: zz\r\nx-sluice-write-time-ms: 1\r\n",
                body,
            ),
        ),
        (
            "get-negative-time",
            answer(
                "200 OK",
                &format!("Content-Length: 14\r\nx-sluice-sha256: {sha}\r\nx-sluice-write-time-ms: -1\r\n"),
                body,
            ),
        ),
        ("get-503", answer("503 Service Unavailable", &good, body)),
    ];
    for (name, bytes) in answers {
        out.push(("peer_get_response", name.to_owned(), bytes));
    }
    out.extend(reapi_seeds());
    out.extend(meta_seeds());
    out.extend(batch_seeds());
    for (name, body) in TURBO_BODIES {
        out.push(("turbo_bodies", name.to_string(), body.as_bytes().to_vec()));
    }
    out
}

/// ByteStream resource names (first byte: 0 read, 1 write) and action results.
fn reapi_seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
    use prost::Message as _;
    let h = sluice_sha256_hex(b"blob");
    let names: Vec<(&str, u8, String)> = vec![
        ("read-plain", 0, format!("blobs/{h}/4")),
        ("read-instance", 0, format!("main/ci/blobs/{h}/4")),
        ("read-zstd", 0, format!("compressed-blobs/zstd/{h}/4")),
        ("read-sha256-named", 0, format!("blobs/sha256/{h}/4")),
        ("read-md5", 0, format!("blobs/md5/{h}/4")),
        ("read-extra", 0, format!("blobs/{h}/4/x")),
        ("read-upper", 0, format!("blobs/{}/4", h.to_uppercase())),
        (
            "read-huge-size",
            0,
            format!("blobs/{h}/9223372036854775808"),
        ),
        ("read-keyword-instance", 0, format!("actions/blobs/{h}/4")),
        ("write-plain", 1, format!("uploads/5f0c/blobs/{h}/4")),
        (
            "write-metadata",
            1,
            format!("i/uploads/u/blobs/{h}/4/meta/data"),
        ),
        (
            "write-zstd",
            1,
            format!("uploads/u/compressed-blobs/zstd/{h}/4"),
        ),
        ("write-no-upload", 1, format!("blobs/{h}/4")),
        ("write-empty-uuid", 1, format!("uploads//blobs/{h}/4")),
        (
            "write-brotli",
            1,
            format!("uploads/u/compressed-blobs/brotli/{h}/4"),
        ),
    ];
    let mut out = Vec::new();
    for (name, access, text) in names {
        let mut bytes = vec![access];
        bytes.extend_from_slice(text.as_bytes());
        out.push(("reapi_resource", format!("name-{name}"), bytes));
    }
    let digest = |data: &[u8]| re::Digest {
        hash: sluice_sha256_hex(data),
        size_bytes: data.len() as i64,
    };
    let file = |path: &str, d: re::Digest| re::OutputFile {
        path: path.to_owned(),
        digest: Some(d),
        ..Default::default()
    };
    let tree = re::Tree {
        root: Some(re::Directory {
            files: vec![re::FileNode {
                name: "f".into(),
                digest: Some(digest(b"in a tree")),
                ..Default::default()
            }],
            ..Default::default()
        }),
        children: vec![],
    };
    let results: Vec<(&str, Vec<u8>)> = vec![
        ("empty", re::ActionResult::default().encode_to_vec()),
        (
            "one-file",
            re::ActionResult {
                output_files: vec![file("bazel-out/k8-fastbuild/bin/hello", digest(b"elf"))],
                stdout_digest: Some(digest(b"")),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "dir-and-streams",
            re::ActionResult {
                output_directories: vec![re::OutputDirectory {
                    path: "out/dir".into(),
                    tree_digest: Some(digest(&tree.encode_to_vec())),
                    ..Default::default()
                }],
                stdout_digest: Some(digest(b"out")),
                stderr_digest: Some(digest(b"err")),
                exit_code: 1,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "duplicate-blobs",
            re::ActionResult {
                output_files: vec![file("a", digest(b"x")), file("b", digest(b"x"))],
                output_directories: vec![
                    re::OutputDirectory {
                        path: "d1".into(),
                        tree_digest: Some(digest(b"x")),
                        ..Default::default()
                    },
                    re::OutputDirectory {
                        path: "d2".into(),
                        tree_digest: Some(digest(b"x")),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "symlinks",
            re::ActionResult {
                output_symlinks: vec![re::OutputSymlink {
                    path: "l".into(),
                    target: "../t".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "absolute-path",
            re::ActionResult {
                output_files: vec![file("/etc/passwd", digest(b"x"))],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "bad-hash",
            re::ActionResult {
                output_files: vec![file(
                    "a",
                    re::Digest {
                        hash: "nothex".into(),
                        size_bytes: 1,
                    },
                )],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "negative-size",
            re::ActionResult {
                stdout_digest: Some(re::Digest {
                    hash: sluice_sha256_hex(b"x"),
                    size_bytes: -5,
                }),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "inline-contents",
            re::ActionResult {
                output_files: vec![re::OutputFile {
                    contents: b"abc".to_vec(),
                    ..file("a", digest(b"abc"))
                }],
                stdout_raw: b"raw".to_vec(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        ("a-tree", tree.encode_to_vec()),
        ("not-protobuf", b"\xff\xff\xff not a protobuf".to_vec()),
        ("truncated", {
            let mut bytes = re::ActionResult {
                output_files: vec![file("a", digest(b"x"))],
                ..Default::default()
            }
            .encode_to_vec();
            bytes.truncate(bytes.len() / 2);
            bytes
        }),
    ];
    for (name, bytes) in results {
        out.push(("action_result", format!("result-{name}"), bytes));
    }
    out
}

/// Metadata sections, bare entries, `x-sluice-meta` values and `name:value` lines, valid and
/// damaged (the `artifact_meta` target).
fn meta_seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    use sluice::store::format::{encode_header_with, Meta};
    let meta = |entries: &[(&str, &[u8])]| {
        let mut m = Meta::default();
        for (name, value) in entries {
            m.push(name, value).unwrap();
        }
        m
    };
    let section = |m: &Meta| encode_header_with(1, &[0; 32], m)[HEADER_BYTES..].to_vec();
    let turbo = meta(&[
        ("x-artifact-duration", b"256"),
        (
            "x-artifact-tag",
            b"Mx0BnNBEdW4rhFJd2mdwRfAd0llqFFMxsimK91qFj6g=",
        ),
        (
            "x-artifact-sha",
            b"0123456789abcdef0123456789abcdef01234567",
        ),
    ]);
    let names: Vec<String> = (0..16).map(|i| format!("n{i}")).collect();
    let many = meta(
        &names
            .iter()
            .map(|n| (n.as_str(), &b"v"[..]))
            .collect::<Vec<_>>(),
    );
    let big = meta(&[
        ("a", &[b'x'; 1024][..]),
        ("b", &[b'y'; 1024][..]),
        ("c", &[b'z'; 1024][..]),
    ]);
    let mut damaged = section(&turbo);
    damaged[5] ^= 0x20;
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("section-turbo", section(&turbo)),
        ("section-sixteen-entries", section(&many)),
        ("section-3k", section(&big)),
        ("section-tab-value", section(&meta(&[("x", b"a\tb")]))),
        ("section-damaged", damaged),
        ("entries-turbo", turbo.encode_entries()),
        ("entries-truncated", vec![3, b'a']),
        ("entries-uppercase-name", vec![1, b'A', 1, 0, b'v']),
        ("header-value-turbo", turbo.to_header_value().into_bytes()),
        (
            "lines-turbo",
            b"x-artifact-duration:256\nX-Artifact-Tag:abc=\n".to_vec(),
        ),
        ("lines-refused", b"bad name:v\nx:\r\n\nx:again\n".to_vec()),
        ("empty", Vec::new()),
    ];
    seeds
        .into_iter()
        .map(|(name, bytes)| ("artifact_meta", format!("meta-{name}"), bytes))
        .collect()
}

/// Bodies of turbo's `POST /v8/artifacts` and `POST /v8/artifacts/events`, and query strings
/// (the `turbo_bodies` target).
const TURBO_BODIES: &[(&str, &str)] = &[
    ("query-one", r#"{"hashes":["3c6dfcbfd60adb51"]}"#),
    ("query-two", r#"{"hashes":["3c6dfcbfd60adb51","ABCDEF"]}"#),
    ("query-empty", r#"{"hashes":[]}"#),
    ("query-bad-hash", r#"{"hashes":["../etc"]}"#),
    ("query-null", r#"{"hashes":null}"#),
    (
        "events-run-1",
        r#"[{"sessionId":"cb5a5802-1","source":"LOCAL","event":"MISS","hash":"3c6dfcbfd60adb51","duration":0},{"sessionId":"cb5a5802-1","source":"REMOTE","event":"MISS","hash":"3c6dfcbfd60adb51","duration":0}]"#,
    ),
    (
        "events-run-2",
        r#"[{"sessionId":"cb5a5802-2","source":"LOCAL","event":"MISS","hash":"3c6dfcbfd60adb51","duration":0},{"sessionId":"cb5a5802-2","source":"REMOTE","event":"HIT","hash":"3c6dfcbfd60adb51","duration":256}]"#,
    ),
    (
        "events-odd",
        r#"[{"source":"remote"},{},{"event":"HIT","extra":[1,2]}]"#,
    ),
    ("events-empty", "[]"),
    ("query-string-slug", "slug=lab"),
    ("query-string-both", "teamId=team_xyz&slug=lab"),
    ("query-string-reserved", "slug=cas"),
    ("not-json", "{\"hashes\":"),
];

/// Bodies of `POST /_peer/v1/batch`: what the sender writes, and the ways one can be wrong.
fn batch_seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    use sluice::replication::batch::encode_entry;
    let sha = [7u8; 32];
    let mut one = Vec::new();
    encode_entry(&mut one, "ns", "k", 1_700_000_000_000, &sha, None, b"body");
    let mut three = Vec::new();
    encode_entry(&mut three, "cas", "ab", 1, &sha, None, b"");
    encode_entry(
        &mut three,
        "ccache",
        "a/b/c",
        2,
        &sha,
        Some("bWV0YQ=="),
        b"x y\nz",
    );
    encode_entry(&mut three, "ns", ".hidden", 3, &sha, None, &[0u8; 300]);
    let hex = "07".repeat(32);
    let named: Vec<(&str, Vec<u8>)> = vec![
        ("one", one),
        ("three", three.clone()),
        ("empty", Vec::new()),
        ("torn", three[..three.len() - 7].to_vec()),
        ("five-fields", format!("ns k 1 {hex} 1\na").into_bytes()),
        (
            "long-len",
            format!("ns k 1 {hex} 99999999999 -\n").into_bytes(),
        ),
        ("bad-sha", b"ns k 1 xyz 1 -\na".to_vec()),
        ("no-newline", format!("ns k 1 {hex} 1 -").into_bytes()),
        (
            "leading-zeros",
            format!("ns k 007 {hex} 01 -\na").into_bytes(),
        ),
        ("empty-fields", format!("  0 {hex} 0 -\n").into_bytes()),
    ];
    let mut out: Vec<(&'static str, String, Vec<u8>)> = named
        .into_iter()
        .map(|(name, bytes)| ("peer_batch", format!("batch-{name}"), bytes))
        .collect();
    let mut many = Vec::new();
    for i in 0..65 {
        encode_entry(&mut many, "ns", &format!("k{i}"), i, &sha, None, b"");
    }
    out.push(("peer_batch", "batch-too-many".into(), many));
    out
}

fn sluice_sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}

#[test]
fn seeds_are_committed() {
    let write = std::env::var_os("SLUICE_WRITE_FUZZ_SEEDS").is_some();
    let mut missing = Vec::new();
    for (target_name, file, bytes) in seeds() {
        assert!(target(target_name).is_some(), "{target_name}");
        let path = fuzz_dir().join("corpus").join(target_name).join(&file);
        if write {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, &bytes).unwrap();
        } else if fs::read(&path).ok().as_deref() != Some(bytes.as_slice()) {
            missing.push(path.display().to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "seed files missing or stale; run SLUICE_WRITE_FUZZ_SEEDS=1 cargo test --test \
         fuzz_corpus and commit fuzz/corpus: {missing:#?}"
    );
}
