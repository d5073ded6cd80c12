//! The client APIs of issue 24 against the real binary, on every front end
//! (plaintext through the ring, TLS HTTP/1.1 and TLS h2 and h2c through the
//! fallback): Turborepo's `/v8/artifacts`, Nx's `/v1/cache/{hash}` and the
//! WebDAV methods on the generic route. Each case checks statuses, token
//! scopes and bad input (the right 4xx, nothing stored). The real clients
//! run in tests/clients.rs.

mod common;
use common::*;

const RW: &str = "Bearer rw-secret-0123456789";
const RO: &str = "Bearer ro-secret-0123456789";
const TEAM_A: &str = "Bearer team-a-secret-0123456789";

/// `rw` writes everywhere, `ro` reads, `team-a` writes only namespace
/// `team-a` (and `nx`); namespace `private` needs a token to read.
const CONFIG: &str = r#"
[namespaces.private]
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
name = "team-a"
secret = "team-a-secret-0123456789"
access = "rw"
namespaces = ["team-a", "nx"]
"#;

fn start() -> Server {
    server().config(CONFIG).start()
}

fn send(srv: &Server, front: Front, method: &str, path: &str, auth: Option<&str>) -> Resp {
    let mut r = req(method, path);
    if let Some(auth) = auth {
        r = r.header("authorization", auth);
    }
    srv.send(front, r)
}

fn with_body(
    srv: &Server,
    front: Front,
    method: &str,
    path: &str,
    auth: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut r = req(method, path).body(body.to_vec());
    if let Some(auth) = auth {
        r = r.header("authorization", auth);
    }
    for (k, v) in headers {
        r = r.header(k, v);
    }
    srv.send(front, r)
}

/// A POST of `body` with the read-write token.
fn post(srv: &Server, front: Front, path: &str, body: &[u8]) -> Resp {
    with_body(srv, front, "POST", path, Some(RW), &[], body)
}

/// The body OpenDAL sends with every PROPFIND.
const ALLPROP: &str = r#"<?xml version="1.0" encoding="utf-8" ?><D:propfind xmlns:D="DAV:"><D:allprop/></D:propfind>"#;

/// OpenDAL's PROPFIND: `Depth: 0` and an `allprop` body.
fn propfind(srv: &Server, front: Front, path: &str, auth: Option<&str>) -> Resp {
    let body = ALLPROP.as_bytes();
    with_body(srv, front, "PROPFIND", path, auth, &[("depth", "0")], body)
}

fn json(resp: &Resp) -> serde_json::Value {
    serde_json::from_slice(&resp.body).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {} {}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
        )
    })
}

/// A hash per front, so the fronts' cases do not see each other's writes.
fn hash(front: Front, n: u8) -> String {
    format!("{:02x}{n:02x}0123456789abcdef", front as u8)
}

#[test]
fn turbo_statuses_scopes_and_bad_input_on_every_front() {
    let srv = start();
    let tag = "Mx0BnNBEdW4rhFJd2mdwRfAd0llqFFMxsimK91qFj6g=";
    for front in FRONTS {
        let h = hash(front, 1);
        let at = |team: &str| format!("/v8/artifacts/{h}?slug={team}");
        let kept = [("x-artifact-duration", "256"), ("x-artifact-tag", tag)];

        let r = send(
            &srv,
            front,
            "GET",
            "/v8/artifacts/status?slug=lab",
            Some(RW),
        );
        assert_eq!(
            (r.status, json(&r)["status"].as_str()),
            (200, Some("enabled")),
            "{front:?}"
        );
        assert_eq!(r.header("content-type"), Some("application/json"));

        // Writes need a token that may write there; refused writes store nothing.
        let r = with_body(&srv, front, "PUT", &at("lab"), None, &kept, b"body");
        assert_eq!(r.status, 401, "{front:?}");
        assert_eq!(json(&r)["error"]["code"], "unauthorized");
        assert!(r.header("www-authenticate").is_some());
        let r = with_body(&srv, front, "PUT", &at("lab"), Some(RO), &kept, b"body");
        assert_eq!(
            (r.status, json(&r)["error"]["code"].clone()),
            (403, "forbidden".into())
        );
        let r = with_body(
            &srv,
            front,
            "PUT",
            &at("team-b"),
            Some(TEAM_A),
            &kept,
            b"body",
        );
        assert_eq!(r.status, 403, "{front:?}: out of scope");
        assert_eq!(send(&srv, front, "GET", &at("team-b"), None).status, 404);

        // Bad input: 400 (JSON), nothing stored.
        for (path, headers) in [
            (at("Bad-Team"), vec![]),
            (at("cas"), vec![]),
            (at("lab"), vec![("x-artifact-duration", "12ms")]),
            (at("lab"), vec![("x-artifact-duration", "")]),
        ] {
            let r = with_body(&srv, front, "PUT", &path, Some(RW), &headers, b"body");
            assert_eq!(r.status, 400, "{front:?} {path} {headers:?}");
            assert_eq!(json(&r)["error"]["code"], "bad_request");
        }
        let long_tag = "t".repeat(1025);
        let r = with_body(
            &srv,
            front,
            "PUT",
            &at("lab"),
            Some(RW),
            &[("x-artifact-tag", &long_tag)],
            b"body",
        );
        assert_eq!(r.status, 400, "{front:?}");
        assert_eq!(send(&srv, front, "GET", &at("lab"), None).status, 404);
        let r = send(&srv, front, "GET", "/v8/artifacts/not-hex?slug=lab", None);
        assert_eq!(r.status, 400);
        let r = send(&srv, front, "DELETE", &at("lab"), Some(RW));
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET, HEAD, PUT, OPTIONS"));

        // Stored with its headers; GET and HEAD give them back.
        let r = with_body(
            &srv,
            front,
            "PUT",
            &at("lab"),
            Some(RW),
            &kept,
            b"first body",
        );
        assert_eq!(
            r.status,
            202,
            "{front:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(json(&r)["urls"], serde_json::json!([]));
        for method in ["GET", "HEAD"] {
            let r = send(&srv, front, method, &at("lab"), None);
            assert_eq!(r.status, 200, "{front:?} {method}");
            assert_eq!(r.header("x-artifact-tag"), Some(tag), "{front:?} {method}");
            assert_eq!(r.header("x-artifact-duration"), Some("256"));
            assert_eq!(r.header("content-length"), Some("10"));
        }
        // The team is the namespace: another team, or none, does not see it.
        assert_eq!(
            send(&srv, front, "GET", &format!("/v8/artifacts/{h}"), None).status,
            404
        );
        // teamId wins over slug; the generic route sees the same namespace.
        let both = format!("/v8/artifacts/{h}?teamId=lab&slug=other");
        assert_eq!(send(&srv, front, "GET", &both, None).status, 200);
        let generic = send(&srv, front, "GET", &format!("/v1/artifacts/lab/{h}"), None);
        assert_eq!(
            (generic.status, &generic.body[..]),
            (200, &b"first body"[..])
        );

        // A PUT over an existing hash replaces it (turbo warns on anything but 2xx).
        let r = with_body(
            &srv,
            front,
            "PUT",
            &at("lab"),
            Some(RW),
            &[("x-artifact-duration", "7")],
            b"second",
        );
        assert_eq!(r.status, 202);
        let r = send(&srv, front, "GET", &at("lab"), None);
        assert_eq!((r.status, &r.body[..]), (200, &b"second"[..]));
        assert_eq!(r.header("x-artifact-duration"), Some("7"));
        assert_eq!(r.header("x-artifact-tag"), None);

        // Which hashes exist.
        let miss = hash(front, 2);
        let body = format!(r#"{{"hashes":["{h}","{miss}"]}}"#);
        let r = post(&srv, front, "/v8/artifacts?slug=lab", body.as_bytes());
        assert_eq!(r.status, 200, "{front:?}");
        let v = json(&r);
        assert_eq!(v[&h], serde_json::json!({"size": 6, "taskDurationMs": 7}));
        assert_eq!(v[&miss], serde_json::Value::Null);
        for bad in [&b"{}"[..], b"not json", b"{\"hashes\":[\"../x\"]}"] {
            let r = post(&srv, front, "/v8/artifacts?slug=lab", bad);
            assert_eq!(r.status, 400, "{front:?} {bad:?}");
        }

        // Events are accepted and counted; garbage is a 400.
        let events =
            br#"[{"sessionId":"s","source":"REMOTE","event":"HIT","hash":"ab","duration":1}]"#;
        let r = post(&srv, front, "/v8/artifacts/events?slug=lab", events);
        assert_eq!(r.status, 200, "{front:?}");
        let r = post(&srv, front, "/v8/artifacts/events?slug=lab", b"{");
        assert_eq!(r.status, 400);

        // The preflight lets turbo send its token.
        let r = send(&srv, front, "OPTIONS", &at("lab"), None);
        assert_eq!(r.status, 200, "{front:?}");
        let allowed = r.header("access-control-allow-headers").unwrap_or("");
        assert!(allowed.contains("Authorization") && allowed.contains("x-artifact-tag"));

        // A token-read namespace needs a token for reads too.
        assert_eq!(
            send(
                &srv,
                front,
                "GET",
                &format!("/v8/artifacts/{h}?slug=private"),
                None
            )
            .status,
            401
        );
        assert_eq!(
            send(
                &srv,
                front,
                "GET",
                &format!("/v8/artifacts/{h}?slug=private"),
                Some(RO)
            )
            .status,
            404
        );
    }
    let m = metric_at(
        srv.addr,
        "sluice_turbo_events_total",
        &["source=\"remote\"", "event=\"hit\""],
    );
    assert_eq!(m, FRONTS.len() as f64);
    let puts = metric_at(
        srv.addr,
        "sluice_requests_total",
        &["route=\"turbo\"", "method=\"PUT\"", "status=\"202\""],
    );
    assert_eq!(puts, 2.0 * FRONTS.len() as f64);
}

#[test]
fn nx_statuses_on_every_front() {
    let srv = start();
    for front in FRONTS {
        let path = format!("/v1/cache/{}{}", front as u8, 5939140485192582302u64);
        // No token, a bad one, a read-only one: nothing stored.
        let r = with_body(&srv, front, "PUT", &path, None, &[], b"tar");
        assert_eq!(r.status, 401, "{front:?}");
        // Nx refuses a 401 whose content type has any parameter.
        assert_eq!(r.header("content-type"), Some("text/plain"), "{front:?}");
        let r = with_body(
            &srv,
            front,
            "PUT",
            &path,
            Some("Bearer wrong-secret-0123456789"),
            &[],
            b"tar",
        );
        assert_eq!(r.status, 401);
        let r = with_body(&srv, front, "PUT", &path, Some(RO), &[], b"tar");
        assert_eq!(r.status, 403, "{front:?}");
        assert_eq!(send(&srv, front, "GET", &path, Some(RO)).status, 404);
        // Content-Length is required.
        let r = srv.send(
            front,
            req("PUT", &path)
                .header("authorization", RW)
                .body(b"tar".to_vec())
                .streamed(1),
        );
        assert_eq!(r.status, 411, "{front:?}");
        // Stored: exactly 200; again: 409, and the first body stays.
        let r = with_body(
            &srv,
            front,
            "PUT",
            &path,
            Some(TEAM_A),
            &[],
            b"tar.gz bytes",
        );
        assert_eq!(r.status, 200, "{front:?}");
        let r = with_body(&srv, front, "PUT", &path, Some(RW), &[], b"other");
        assert_eq!(r.status, 409, "{front:?}");
        let r = send(&srv, front, "GET", &path, Some(RO));
        assert_eq!(
            (r.status, &r.body[..]),
            (200, &b"tar.gz bytes"[..]),
            "{front:?}"
        );
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
        // Bad hashes.
        assert_eq!(send(&srv, front, "GET", "/v1/cache/a/b", None).status, 400);
        assert_eq!(send(&srv, front, "GET", "/v1/cache/.x", None).status, 400);
        let r = send(&srv, front, "DELETE", &path, Some(RW));
        assert_eq!(r.status, 405, "{front:?}");
    }
}

#[test]
fn webdav_methods_on_the_generic_route_on_every_front() {
    let srv = start();
    for front in FRONTS {
        let ns = format!("sccache-{}", front as u8);
        let root = format!("/v1/artifacts/{ns}/");
        for dir in [
            root.clone(),
            format!("{root}1/7/8/"),
            format!("/v1/artifacts/{ns}"),
        ] {
            let r = propfind(&srv, front, &dir, Some(RO));
            assert_eq!(r.status, 207, "{front:?} {dir}");
            let text = String::from_utf8_lossy(&r.body);
            assert!(
                text.contains("<D:collection/>") && text.contains("<D:getlastmodified>"),
                "{text}"
            );
            assert!(text.contains(&format!("<D:href>{dir}</D:href>")), "{text}");
        }
        // The start-up probe of sccache: a key starting with a dot.
        let check = format!("{root}.sccache_check");
        assert_eq!(send(&srv, front, "GET", &check, Some(RW)).status, 404);
        let r = with_body(&srv, front, "PUT", &check, Some(RW), &[], b"Hello, World!");
        assert_eq!(r.status, 201, "{front:?}");
        let r = with_body(&srv, front, "PUT", &check, Some(RW), &[], b"Hello, World!");
        assert_eq!(
            r.status, 204,
            "{front:?}: sccache rewrites it at every start"
        );
        let r = send(&srv, front, "GET", &check, Some(RW));
        assert_eq!((r.status, &r.body[..]), (200, &b"Hello, World!"[..]));
        // PROPFIND on a key: the artifact, or 404.
        let r = propfind(&srv, front, &check, Some(RO));
        assert_eq!(r.status, 207, "{front:?}");
        assert!(String::from_utf8_lossy(&r.body)
            .contains("<D:getcontentlength>13</D:getcontentlength>"));
        let r = propfind(&srv, front, &format!("{root}nope"), None);
        assert_eq!(r.status, 404);
        // MKCOL writes: it needs a token that may write there, and no body.
        assert_eq!(
            send(&srv, front, "MKCOL", &format!("{root}1/"), Some(RW)).status,
            201
        );
        assert_eq!(
            send(&srv, front, "MKCOL", &format!("{root}1/"), Some(RO)).status,
            403
        );
        assert_eq!(
            send(&srv, front, "MKCOL", &format!("{root}1/"), None).status,
            401
        );
        assert_eq!(
            send(&srv, front, "MKCOL", &format!("{root}1/"), Some(TEAM_A)).status,
            403
        );
        let r = with_body(
            &srv,
            front,
            "MKCOL",
            &format!("{root}1/"),
            Some(RW),
            &[],
            b"<x/>",
        );
        assert_eq!(r.status, 415, "{front:?}");
        // Bad paths and names; reads of a token namespace need a token.
        for bad in [
            format!("{root}/"),
            format!("{root}a/../"),
            "/v1/artifacts/Bad/".to_string(),
        ] {
            assert_eq!(
                send(&srv, front, "PROPFIND", &bad, Some(RW)).status,
                400,
                "{front:?} {bad}"
            );
        }
        assert_eq!(
            send(&srv, front, "PROPFIND", "/v1/artifacts/private/", None).status,
            401
        );
        assert_eq!(
            send(&srv, front, "PROPFIND", "/v1/artifacts/private/", Some(RO)).status,
            207
        );
    }
}

/// A PROPFIND's body is read, so the connection carries the PUT that
/// OpenDAL sends next (on the ring: one connection, both answers).
#[test]
fn a_propfind_body_keeps_the_connection() {
    let srv = start();
    let allprop = ALLPROP;
    let raw = format!(
        "PROPFIND /v1/artifacts/s/1/7/8/ HTTP/1.1\r\nHost: x\r\nDepth: 0\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{allprop}\
         PUT /v1/artifacts/s/1/7/8/k HTTP/1.1\r\nHost: x\r\nAuthorization: {RW}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        allprop.len()
    );
    let out = srv.http1(raw.as_bytes());
    let (first, used) = parse_response(&out, false).expect("first response");
    assert_eq!(first.status, 207);
    assert_eq!(first.header("connection"), None);
    let (second, _) = parse_response(&out[used..], false).expect("second response");
    assert_eq!(second.status, 201);
}

/// Drops every page of every file under `dir` from the page cache.
fn evict_all(dir: &std::path::Path) {
    for path in files_under(dir) {
        let file = std::fs::File::open(&path).expect("open artifact file");
        file.sync_all().expect("fsync artifact file");
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
    }
}

/// Artifacts whose pages (header, kept headers and body) are not in the page
/// cache: the ring opens them off its thread (a Turborepo hash in its team's
/// namespace, an Nx hash, a key starting with `.`) and serves them whole,
/// kept headers included.
#[test]
fn cold_client_artifacts_are_served_whole() {
    let srv = server().config(CONFIG).no_tls().start();
    let (uring, mode) = engine_status(&srv);
    if !uring {
        eprintln!("SKIP: plaintext is not on the ring here: {mode}");
        return;
    }
    let tag = "c2lnbmVkIGJ5IHR1cmJv";
    let small = xorshift_bytes(1, 4096);
    let large = xorshift_bytes(2, 3 << 20);
    let kept = [("x-artifact-duration", "99"), ("x-artifact-tag", tag)];
    for (hash, body) in [("aa01", &small), ("aa02", &large)] {
        let path = format!("/v8/artifacts/{hash}?slug=cold");
        let r = with_body(&srv, Front::Http1, "PUT", &path, Some(RW), &kept, body);
        assert_eq!(r.status, 202);
    }
    let r = with_body(
        &srv,
        Front::Http1,
        "PUT",
        "/v1/cache/42",
        Some(RW),
        &[],
        &small,
    );
    assert_eq!(r.status, 200);
    let check = "/v1/artifacts/sccache/.sccache_check";
    let r = with_body(
        &srv,
        Front::Http1,
        "PUT",
        check,
        Some(RW),
        &[],
        b"Hello, World!",
    );
    assert_eq!(r.status, 201);
    let opens = |srv: &Server| metric_at(srv.addr, "sluice_ring_cold_opens_total", &[]);
    let before = opens(&srv);
    evict_all(&srv.data_dir);
    for (hash, body) in [("aa01", &small), ("aa02", &large)] {
        let r = send(
            &srv,
            Front::Http1,
            "GET",
            &format!("/v8/artifacts/{hash}?slug=cold"),
            None,
        );
        assert_eq!(r.status, 200, "{hash}");
        assert!(r.body == *body, "{hash}: body differs");
        assert_eq!(r.header("x-artifact-tag"), Some(tag), "{hash}");
    }
    let r = send(&srv, Front::Http1, "GET", "/v1/cache/42", None);
    assert!(r.status == 200 && r.body == small);
    let r = send(&srv, Front::Http1, "GET", check, None);
    assert_eq!((r.status, &r.body[..]), (200, &b"Hello, World!"[..]));
    assert!(opens(&srv) > before, "nothing was opened cold");
}

/// A body that grows past the limit while it arrives (chunked, so the
/// limit cannot be checked up front) is refused in the route's own error
/// shape, JSON for Turborepo, and nothing is stored.
#[test]
fn an_oversized_streamed_turbo_upload_gets_a_json_413() {
    let srv = server()
        .config(CONFIG)
        .env("SLUICE_BODY_BYTES_MAX", "1024")
        .start();
    for front in FRONTS {
        let path = format!("/v8/artifacts/{}?slug=big", hash(front, 9));
        let r = srv.send(
            front,
            req("PUT", &path)
                .header("authorization", RW)
                .body(vec![7u8; 4096])
                .streamed(512),
        );
        assert_eq!(r.status, 413, "{front:?}");
        assert_eq!(json(&r)["error"]["code"], "payload_too_large", "{front:?}");
        assert_eq!(send(&srv, front, "GET", &path, None).status, 404);
    }
}
