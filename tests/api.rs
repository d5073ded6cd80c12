//! The API suite: every route and status, run through every front end
//! (plaintext HTTP/1.1, HTTPS with HTTP/1.1 and HTTP/2, h2c) against the real
//! binary. The same request must get the same status, headers and body.

mod common;
use common::*;

const SHA_EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

#[test]
fn admin_routes_on_every_front() {
    let server = server().start();
    for front in FRONTS {
        assert_eq!(server.status(front, "GET", "/up"), 200, "{front:?}");
        assert_eq!(server.status(front, "GET", "/ready"), 200, "{front:?}");
        let r = server.send(front, req("GET", "/metrics"));
        assert_eq!(r.status, 200, "{front:?}");
        let text = String::from_utf8_lossy(&r.body);
        assert!(
            text.contains("sluice_requests_total{route=\"up\",method=\"GET\",status=\"200\"}"),
            "{front:?}: {text}"
        );
        assert!(
            text.contains("sluice_request_ttfb_seconds_bucket"),
            "{front:?}"
        );
        assert!(text.contains("sluice_store_entries"), "{front:?}");
        let r = server.send(front, req("GET", "/status"));
        assert_eq!(r.status, 200, "{front:?}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("status json");
        assert!(v["store"]["entries"].is_u64(), "{v}");
        assert!(v["engine"].is_object(), "{v}");
        let r = server.send(front, req("POST", "/up"));
        assert_eq!(r.status, 405, "{front:?}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{front:?}");
        let r = server.send(front, req("GET", "/no/such/route"));
        assert_eq!(r.status, 404, "{front:?}");
    }
}

#[test]
fn generic_round_trip_with_conditional_and_range_on_every_front() {
    let server = server().start();
    let body = repeating_bytes(100_000, 251);
    let etag = format!("\"{}\"", sha256_hex(&body));
    for (i, front) in FRONTS.iter().copied().enumerate() {
        let path = format!("/v1/artifacts/blobs/item-{i}");
        assert_eq!(server.status(front, "GET", &path), 404, "{front:?}");
        let r = server.send(front, req("PUT", &path).body(body.clone()));
        assert_eq!(r.status, 201, "{front:?}");
        assert_eq!(r.header("etag"), Some(etag.as_str()), "{front:?}");
        // Replacing answers 204.
        let r = server.send(front, req("PUT", &path).body(body.clone()));
        assert_eq!(r.status, 204, "{front:?}");

        let r = server.send(front, req("GET", &path));
        assert_eq!(r.status, 200, "{front:?}");
        assert_eq!(r.body, body, "{front:?}");
        assert_eq!(r.header("etag"), Some(etag.as_str()), "{front:?}");
        assert_eq!(r.header("accept-ranges"), Some("bytes"), "{front:?}");
        assert_eq!(r.header("content-length"), Some("100000"), "{front:?}");

        let h = server.send(front, req("HEAD", &path));
        assert_eq!(h.status, 200, "{front:?}");
        assert!(h.body.is_empty(), "{front:?}");
        assert_eq!(h.header("content-length"), Some("100000"), "{front:?}");
        assert_eq!(h.header("etag"), r.header("etag"), "{front:?}");

        let r = server.send(front, req("GET", &path).header("If-None-Match", &etag));
        assert_eq!(r.status, 304, "{front:?}");
        assert!(r.body.is_empty());
        let r = server.send(
            front,
            req("GET", &path).header("If-None-Match", "\"other\""),
        );
        assert_eq!(r.status, 200, "{front:?}");

        let r = server.send(front, req("GET", &path).header("Range", "bytes=10-19"));
        assert_eq!(r.status, 206, "{front:?}");
        assert_eq!(r.body, &body[10..20], "{front:?}");
        assert_eq!(
            r.header("content-range"),
            Some("bytes 10-19/100000"),
            "{front:?}"
        );
        let r = server.send(front, req("GET", &path).header("Range", "bytes=-5"));
        assert_eq!(r.status, 206, "{front:?}");
        assert_eq!(r.body, &body[99_995..], "{front:?}");
        let r = server.send(front, req("GET", &path).header("Range", "bytes=100000-"));
        assert_eq!(r.status, 416, "{front:?}");
        assert_eq!(
            r.header("content-range"),
            Some("bytes */100000"),
            "{front:?}"
        );

        let r = server.send(front, req("DELETE", &path));
        assert_eq!(r.status, 204, "{front:?}");
        assert_eq!(server.status(front, "GET", &path), 404, "{front:?}");
        assert_eq!(server.status(front, "DELETE", &path), 404, "{front:?}");
    }
}

#[test]
fn bazel_and_gradle_routes_on_every_front() {
    let server = server().env("SLUICE_GRADLE_BODY_BYTES_MAX", "1024").start();
    for front in FRONTS {
        let body = format!("artifact for {front:?}").into_bytes();
        let digest = sha256_hex(&body);
        // CAS: the body must hash to the key.
        let r = server.send(
            front,
            req("PUT", &format!("/cas/{digest}")).body(body.clone()),
        );
        assert_eq!(r.status, 201, "{front:?}");
        let r = server.send(front, req("GET", &format!("/cas/{digest}")));
        assert_eq!((r.status, r.body.clone()), (200, body.clone()), "{front:?}");
        let wrong = format!("/cas/{SHA_EMPTY}");
        let r = server.send(front, req("PUT", &wrong).body(body.clone()));
        assert_eq!(r.status, 400, "{front:?}");
        assert_eq!(
            server.status(front, "GET", &wrong),
            404,
            "{front:?}: nothing stored"
        );
        // AC with an instance name prefix reads what was written without one.
        let r = server.send(
            front,
            req("PUT", &format!("/ac/{digest}")).body(b"action result".to_vec()),
        );
        assert_eq!(r.status, 201, "{front:?}");
        let r = server.send(front, req("GET", &format!("/some/instance/ac/{digest}")));
        assert_eq!(
            (r.status, r.body.clone()),
            (200, b"action result".to_vec()),
            "{front:?}"
        );
        let r = server.send(front, req("GET", "/ac/not-a-digest"));
        assert_eq!(r.status, 400, "{front:?}");
        let r = server.send(front, req("DELETE", &format!("/ac/{digest}")));
        assert_eq!(r.status, 405, "{front:?}");
        assert_eq!(r.header("allow"), Some("GET, HEAD, PUT"), "{front:?}");
        // Gradle: over the (test-lowered) limit answers 413, under it stores.
        let key = format!("gradle{}", front as u8);
        let r = server.send(
            front,
            req("PUT", &format!("/cache/{key}")).body(vec![7u8; 2048]),
        );
        assert_eq!(r.status, 413, "{front:?}");
        assert_eq!(
            server.status(front, "GET", &format!("/cache/{key}")),
            404,
            "{front:?}"
        );
        let r = server.send(
            front,
            req("PUT", &format!("/cache/{key}")).body(vec![7u8; 1000]),
        );
        assert_eq!(r.status, 201, "{front:?}");
        let r = server.send(front, req("GET", &format!("/cache/{key}")));
        assert_eq!((r.status, r.body.len()), (200, 1000), "{front:?}");
    }
}

const AUTH_CONFIG: &str = r#"
[namespaces.private]
read = "token"

[[tokens]]
name = "reader"
secret = "reader-secret-0123456789"
access = "ro"

[[tokens]]
name = "writer"
secret = "writer-secret-0123456789"
access = "rw"
"#;

#[test]
fn auth_on_every_front() {
    let server = server().config(AUTH_CONFIG).start();
    let basic_rw = format!(
        "Basic {}",
        base64_encode(b"gradle:writer-secret-0123456789")
    );
    for front in FRONTS {
        // A PUT of `body` with this Authorization.
        let put = |path: &str, authorization: &str, body: &[u8]| {
            let r = req("PUT", path).header("Authorization", authorization);
            server.send(front, r.body(body.to_vec()))
        };
        let path = format!("/v1/artifacts/private/k{}", front as u8);
        let r = server.send(front, req("PUT", &path).body(b"x".to_vec()));
        assert_eq!(r.status, 401, "{front:?}");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.contains("Bearer")),
            "{front:?}"
        );
        let r = put(&path, "Bearer reader-secret-0123456789", b"x");
        assert_eq!(r.status, 403, "{front:?}");
        let r = put(&path, "Bearer wrong-secret-0123456789", b"x");
        assert_eq!(r.status, 401, "{front:?}");
        let r = put(&path, &basic_rw, b"x");
        assert_eq!(r.status, 201, "{front:?}");
        assert_eq!(server.status(front, "GET", &path), 401, "{front:?}");
        let r = server.send(
            front,
            req("GET", &path).header("Authorization", "Bearer reader-secret-0123456789"),
        );
        assert_eq!(
            (r.status, r.body.clone()),
            (200, b"x".to_vec()),
            "{front:?}"
        );
        // A public namespace reads without a token but still needs one to write.
        let public = format!("/v1/artifacts/public/k{}", front as u8);
        let r = put(&public, "Bearer writer-secret-0123456789", b"y");
        assert_eq!(r.status, 201, "{front:?}");
        assert_eq!(server.status(front, "GET", &public), 200, "{front:?}");
    }
    assert!(
        !server.stderr().contains("secret-0123456789"),
        "secrets must never be logged"
    );
}

fn base64_encode(input: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(input)
}

#[test]
fn large_upload_and_download_compare_by_digest() {
    let server = server().start();
    let body: Vec<u8> = (0..64u32 * 1024 * 1024)
        .map(|n| (n.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let digest = sha256_hex(&body);
    for front in [Front::Http1, Front::TlsH2] {
        let path = format!("/cas/{digest}");
        let r = server.send(front, req("PUT", &path).body(body.clone()));
        assert!(
            r.status == 201 || r.status == 204,
            "{front:?}: {}",
            r.status
        );
        let r = server.send(front, req("GET", &path));
        assert_eq!(r.status, 200, "{front:?}");
        assert_eq!(r.body.len(), body.len(), "{front:?}");
        assert_eq!(sha256_hex(&r.body), digest, "{front:?}");
    }
}

/// The ring (plaintext HTTP/1.1) and the fallback (TLS, h2c) answer the
/// same requests with the same status, the same headers (names and values,
/// the clock's `date` aside) and the same body.
#[test]
fn ring_and_fallback_give_identical_answers() {
    let server = server().start();
    let body = repeating_bytes(300_000, 241);
    let digest = sha256_hex(&body);
    let r = server.send(
        Front::Http1,
        req("PUT", &format!("/cas/{digest}")).body(body.clone()),
    );
    assert_eq!(r.status, 201);
    let etag = format!("\"{digest}\"");
    let requests = vec![
        req("GET", &format!("/cas/{digest}")),
        req("HEAD", &format!("/cas/{digest}")),
        req("GET", &format!("/cas/{digest}")).header("Range", "bytes=5-99"),
        req("GET", &format!("/cas/{digest}")).header("Range", "bytes=999999-"),
        req("GET", &format!("/cas/{digest}")).header("If-None-Match", &etag),
        req("GET", &format!("/cas/{SHA_EMPTY}")),
        req("GET", "/cas/xyz"),
        req("DELETE", &format!("/cas/{digest}")),
        req("GET", "/up"),
        req("GET", "/nowhere"),
        req("PUT", &format!("/cas/{SHA_EMPTY}")).body(b"not empty".to_vec()),
    ];
    let normalise = |r: &Resp| {
        let mut headers: Vec<(String, String)> = r
            .headers
            .iter()
            .filter(|(k, _)| k != "date" && k != "connection")
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        headers.sort();
        (r.status, headers, r.body.clone())
    };
    for request in requests {
        let ring = normalise(&server.send(Front::Http1, request.clone()));
        for front in [Front::TlsHttp1, Front::TlsH2, Front::H2c] {
            let other = normalise(&server.send(front, request.clone()));
            assert_eq!(
                ring, other,
                "{} {} via {front:?}",
                request.method, request.path
            );
        }
    }
    for front in FRONTS {
        let r = server.send(front, req("GET", "/up"));
        assert!(
            r.header("date").is_some(),
            "{front:?}: every response carries Date"
        );
    }
}

/// A PUT without a length (chunked on HTTP/1.1, DATA frames without
/// `content-length` on h2), with and without `Expect: 100-continue`, is
/// stored whole on every front; over the Gradle limit it is 413 and
/// nothing is stored.
#[test]
fn streamed_puts_and_expect_continue_on_every_front() {
    let server = server().config("gradle_body_bytes_max = 200000\n").start();
    let body = repeating_bytes(300_000, 241);
    for (i, front) in FRONTS.iter().copied().enumerate() {
        for expect in [false, true] {
            let path = format!("/v1/artifacts/stream/f{i}-{expect}");
            let mut r = req("PUT", &path).body(body.clone()).streamed(7_000);
            if expect {
                r = r.header("expect", "100-continue");
            }
            let put = server.send(front, r);
            assert_eq!(put.status, 201, "{front:?} expect={expect}");
            let got = server.send(front, req("GET", &path));
            assert_eq!((got.status, got.body.len()), (200, body.len()), "{front:?}");
            assert!(got.body == body, "{front:?} expect={expect}: body differs");
        }
        let path = format!("/cache/too-big-{i}");
        let r = server.send(front, req("PUT", &path).body(body.clone()).streamed(7_000));
        assert_eq!(r.status, 413, "{front:?}");
        assert_eq!(server.status(front, "GET", &path), 404, "{front:?}");
    }
}

/// After SIGTERM, in the pre-drain phase, every front answers /ready 503
/// and still serves.
#[test]
fn readiness_turns_503_on_every_front_while_draining() {
    let mut server = server().env("SLUICE_SHUTDOWN_PRE_DRAIN_MS", "4000").start();
    for front in FRONTS {
        assert_eq!(server.status(front, "GET", "/ready"), 200, "{front:?}");
    }
    let pid = rustix::process::Pid::from_raw(server.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill");
    std::thread::sleep(std::time::Duration::from_millis(300));
    for front in FRONTS {
        assert_eq!(server.status(front, "GET", "/ready"), 503, "{front:?}");
        assert_eq!(server.status(front, "GET", "/up"), 200, "{front:?}");
    }
    assert!(server.stop().success());
}

/// RFC 9110 13: a resumed download of an artifact that changed meanwhile gets the whole
/// current body, never a piece of it; conditional writes are refused with 412 and change
/// nothing. The same answers on every front.
#[test]
fn conditional_requests_on_every_front() {
    let server = server().start();
    for (i, front) in FRONTS.iter().copied().enumerate() {
        let path = format!("/v1/artifacts/cond/item-{i}");
        let old = repeating_bytes(50_000, 251);
        let new = repeating_bytes(60_000, 241);
        let old_etag = format!("\"{}\"", sha256_hex(&old));
        let new_etag = format!("\"{}\"", sha256_hex(&new));

        // A PUT of `body` under one precondition header.
        let put_if = |header: &str, value: &str, body: &[u8]| {
            let r = req("PUT", &path).header(header, value);
            server.send(front, r.body(body.to_vec()))
        };
        // A GET of a range under an If-Range.
        let get_range_if = |range: &str, if_range: &str| {
            let r = req("GET", &path).header("Range", range);
            server.send(front, r.header("If-Range", if_range))
        };

        // Create-only: If-None-Match: * creates once, then refuses.
        let r = put_if("If-None-Match", "*", &old);
        assert_eq!(r.status, 201, "{front:?}");
        let r = put_if("If-None-Match", "*", &new);
        assert_eq!(
            r.status, 412,
            "{front:?}: create-only PUT over an existing key"
        );
        let r = server.send(front, req("GET", &path));
        assert_eq!(r.body, old, "{front:?}: a refused PUT changes nothing");

        // If-Match that does not hold: 412, nothing changes.
        let r = put_if("If-Match", "\"not-the-current-one\"", &new);
        assert_eq!(r.status, 412, "{front:?}: If-Match mismatch");
        // A weak tag never matches If-Match (strong comparison).
        let r = put_if("If-Match", &format!("W/{old_etag}"), &new);
        assert_eq!(r.status, 412, "{front:?}: weak If-Match");
        assert_eq!(server.send(front, req("GET", &path)).body, old, "{front:?}");

        // A Range under an If-Range of the current ETag is honoured.
        let r = get_range_if("bytes=100-199", &old_etag);
        assert_eq!(r.status, 206, "{front:?}");
        assert_eq!(r.body, &old[100..200], "{front:?}");

        // If-Match that holds: the write goes through.
        let r = put_if("If-Match", &old_etag, &new);
        assert_eq!(r.status, 204, "{front:?}: If-Match of the current ETag");

        // The artifact changed: resuming with the old ETag gets all of the new one.
        for if_range in [old_etag.clone(), format!("W/{new_etag}")] {
            let r = get_range_if("bytes=100-199", &if_range);
            assert_eq!(r.status, 200, "{front:?}: If-Range {if_range}");
            assert_eq!(r.body, new, "{front:?}: If-Range {if_range}");
            assert_eq!(r.header("content-range"), None, "{front:?}");
        }
        // A date cannot match: sluice sends no Last-Modified.
        let r = get_range_if("bytes=0-0", "Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!((r.status, r.body.len()), (200, new.len()), "{front:?}");

        // Reads: If-Match that fails is 412 too.
        let r = server.send(front, req("GET", &path).header("If-Match", &old_etag));
        assert_eq!(r.status, 412, "{front:?}");

        // DELETE under a failing If-Match keeps the artifact.
        let r = server.send(front, req("DELETE", &path).header("If-Match", &old_etag));
        assert_eq!(r.status, 412, "{front:?}");
        assert_eq!(server.status(front, "GET", &path), 200);
        let r = server.send(front, req("DELETE", &path).header("If-Match", &new_etag));
        assert_eq!(r.status, 204, "{front:?}");
        // If-Match: * on a missing artifact fails.
        let r = put_if("If-Match", "*", &new);
        assert_eq!(r.status, 412, "{front:?}");
        assert_eq!(server.status(front, "GET", &path), 404, "{front:?}");
    }
}

/// ccache's default layout sends `/v1/artifacts/ccache/fe/a5c6…`: generic
/// keys take `/`-separated segments on every front (and on plaintext served
/// by the fallback), while traversal and empty segments answer 400 and store
/// nothing.
#[test]
fn multi_segment_generic_keys_on_every_front() {
    for engine in ["auto", "epoll", "fallback"] {
        let server = server().env("SLUICE_ENGINE", engine).start();
        for (i, front) in FRONTS.iter().copied().enumerate() {
            let path = format!("/v1/artifacts/ccache/fe/a5c6ltr4q0kut6qjm9545n50fgo5c{i}");
            let body = vec![i as u8; 70_000];
            let what = format!("{engine} {front:?}");
            assert_eq!(server.status(front, "GET", &path), 404, "{what}");
            let r = server.send(front, req("PUT", &path).body(body.clone()));
            assert_eq!(r.status, 201, "{what}");
            let r = server.send(front, req("GET", &path));
            assert_eq!((r.status, &r.body), (200, &body), "{what}");
            let h = server.send(front, req("HEAD", &path));
            assert_eq!(h.status, 200, "{what}");
            assert_eq!(h.header("content-length"), Some("70000"), "{what}");
            // A deeper key beside it is a different artifact.
            let deep = format!("/v1/artifacts/ccache/a/b/c/d/{i}.bin");
            assert_eq!(
                server
                    .send(front, req("PUT", &deep).body(b"x".to_vec()))
                    .status,
                201
            );
            assert_eq!(server.send(front, req("GET", &deep)).body, b"x", "{what}");
            assert_eq!(server.status(front, "DELETE", &deep), 204, "{what}");
            let r = server.send(front, req("DELETE", &path));
            assert_eq!(r.status, 204, "{what}");
            assert_eq!(server.status(front, "GET", &path), 404, "{what}");
        }
        // One stays, to show its file: one flat name in the key's shard.
        let r = server.send(
            Front::Http1,
            req("PUT", "/v1/artifacts/ccache/fe/kept").body(b"k".to_vec()),
        );
        assert_eq!(r.status, 201);
        let before = files_under(&server.data_dir);
        assert!(
            before.contains(&server.data_dir.join("ccache/fe/fe~kept")),
            "{before:?}"
        );
        let refused = [
            "/v1/artifacts/ccache/a/../../../etc/passwd",
            "/v1/artifacts/ccache/../gradle/x",
            "/v1/artifacts/ccache/a/./b",
            "/v1/artifacts/ccache/a//b",
            "/v1/artifacts/ccache/a/",
            "/v1/artifacts/ccache/a/./.",
            "/v1/artifacts/ccache/a/%2e%2e/b",
            "/v1/artifacts/ccache/a%2fb",
            "/v1/artifacts/ccache/a~b",
        ];
        for front in FRONTS {
            for path in refused {
                let r = server.send(front, req("PUT", path).body(b"evil".to_vec()));
                assert_eq!(r.status, 400, "{engine} {front:?} PUT {path}");
                let r = server.send(front, req("GET", path));
                assert_eq!(r.status, 400, "{engine} {front:?} GET {path}");
            }
        }
        assert_eq!(
            files_under(&server.data_dir),
            before,
            "{engine}: nothing stored"
        );
    }
}

/// Metrics count the methods HTTP defines by name on every front (a POST to
/// an artifact path was `OTHER`), keep `OTHER` for the rest, and count a 414
/// under the method of its request line.
#[test]
fn metrics_label_real_method_names_on_every_front() {
    let server = server().start();
    for front in FRONTS {
        assert_eq!(
            server.status(front, "POST", "/v1/artifacts/blobs/k"),
            405,
            "{front:?}"
        );
        assert_eq!(server.status(front, "PATCH", "/cache/k"), 405, "{front:?}");
    }
    let r = server.send(Front::Http1, req("BREW", "/cache/k"));
    assert_eq!(r.status, 405);
    let long = format!("POST /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(9000));
    let out = server.http1(long.as_bytes());
    assert!(
        out.starts_with(b"HTTP/1.1 414 "),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let text = String::from_utf8_lossy(&server.send(Front::Http1, req("GET", "/metrics")).body)
        .into_owned();
    let n = FRONTS.len();
    for line in [
        format!("sluice_requests_total{{route=\"generic\",method=\"POST\",status=\"405\"}} {n}\n"),
        format!("sluice_requests_total{{route=\"gradle\",method=\"PATCH\",status=\"405\"}} {n}\n"),
        "sluice_requests_total{route=\"gradle\",method=\"OTHER\",status=\"405\"} 1\n".to_string(),
    ] {
        assert!(text.contains(&line), "missing {line:?} in:\n{text}");
    }
    // The ring parses the head itself; the fallback's hyper answers 414
    // without calling the application, so it is only counted on the ring.
    let (on, _) = engine_status(&server);
    if on {
        let line = "sluice_requests_total{route=\"none\",method=\"POST\",status=\"414\"} 1\n";
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}
