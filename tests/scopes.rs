//! Token scopes (`namespaces = [...]` on a `[[tokens]]` entry) against the real binary, on
//! every front end (plaintext ring, TLS HTTP/1.1, TLS h2, h2c): a scoped token writes its
//! namespaces and gets 403 elsewhere on every artifact route with nothing stored, reads of
//! `read = "token"` namespaces follow the scope, public reads do not care; `check-config`
//! validates and prints scopes.

mod common;
use common::*;

const ADMIN: &str = "Bearer admin-secret-0123456789";
const TEAM_A: &str = "Bearer team-a-secret-0123456789";
const BAZEL: &str = "Bearer bazel-secret-0123456789";
const GRADLE_SECRET: &str = "gradle-secret-0123456789";
const TEAM_B_READER: &str = "Bearer team-b-reader-secret-0123456789";

/// `admin` covers every namespace; the others are scoped. `team-a-private`, `team-b-private`
/// and `ac` need a token to read; `team-a`, `team-b`, `cas` and `gradle` are public.
const SCOPED_CONFIG: &str = r#"
[namespaces.team-a-private]
read = "token"

[namespaces.team-b-private]
read = "token"

[namespaces.ac]
read = "token"

[[tokens]]
name = "admin"
secret = "admin-secret-0123456789"
access = "rw"

[[tokens]]
name = "team-a"
secret = "team-a-secret-0123456789"
access = "rw"
namespaces = ["team-a", "team-a-private"]

[[tokens]]
name = "bazel"
secret = "bazel-secret-0123456789"
access = "rw"
namespaces = ["ac", "cas"]

[[tokens]]
name = "gradle"
secret = "gradle-secret-0123456789"
access = "rw"
namespaces = ["gradle"]

[[tokens]]
name = "team-b-reader"
secret = "team-b-reader-secret-0123456789"
access = "ro"
namespaces = ["team-b-private"]
"#;

fn gradle_basic() -> String {
    use base64::Engine as _;
    let credentials = format!("gradle:{GRADLE_SECRET}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

fn put(path: &str, authorization: &str, body: &[u8]) -> Req {
    req("PUT", path)
        .header("Authorization", authorization)
        .body(body.to_vec())
}

fn get(path: &str, authorization: &str) -> Req {
    req("GET", path).header("Authorization", authorization)
}

/// In scope: 201 on `/v1/artifacts/`, `/ac/`, `/cas/`, an instance-prefixed `/ac/` and
/// `/cache/`. Out of scope: 403 naming the namespace, on each of those routes (a plain and
/// a streamed `Expect: 100-continue` body), and an all-namespace token then finds nothing;
/// an out-of-scope DELETE is refused and leaves the artifact.
#[test]
fn scoped_tokens_write_only_their_namespaces_on_every_front() {
    let server = server().config(SCOPED_CONFIG).start();
    let gradle = gradle_basic();
    for (i, front) in FRONTS.iter().copied().enumerate() {
        // In scope.
        let body = format!("team-a artifact {front:?}").into_bytes();
        let path = format!("/v1/artifacts/team-a/in-{i}");
        assert_eq!(server.send(front, put(&path, TEAM_A, &body)).status, 201);
        let r = server.send(front, req("GET", &path));
        assert_eq!((r.status, r.body), (200, body), "{front:?} {path}");

        let cas_body = format!("cas in scope {front:?}").into_bytes();
        let cas = format!("/cas/{}", sha256_hex(&cas_body));
        let ac_key = sha256_hex(format!("ac in scope {front:?}").as_bytes());
        let ac = format!("/ac/{ac_key}");
        let instance_key = sha256_hex(format!("instance ac in scope {front:?}").as_bytes());
        let instance_ac = format!("/ci/main/ac/{instance_key}");
        let cache = format!("/cache/in-{i}");
        let rows: [(&str, &str, &[u8]); 4] = [
            (&cas, BAZEL, &cas_body),
            (&ac, BAZEL, b"action result"),
            (&instance_ac, BAZEL, b"instance action result"),
            (&cache, &gradle, b"gradle entry"),
        ];
        for (path, token, body) in rows {
            let r = server.send(front, put(path, token, body));
            assert_eq!(r.status, 201, "{front:?} PUT {path}");
            let r = server.send(front, get(path, ADMIN));
            assert_eq!((r.status, &r.body[..]), (200, body), "{front:?} GET {path}");
        }
        // The instance name does not partition the cache, so it is not part of the scope.
        let r = server.send(front, get(&format!("/ac/{instance_key}"), ADMIN));
        assert_eq!(r.status, 200, "{front:?}");

        // Out of scope: (token, path, body, the namespace the route maps to).
        let cas_out_body = format!("cas out of scope {front:?}").into_bytes();
        let cas_out_key = sha256_hex(&cas_out_body);
        let ac_out_key = sha256_hex(format!("ac out of scope {front:?}").as_bytes());
        let rows: Vec<(&str, String, Vec<u8>, &str)> = vec![
            (
                TEAM_A,
                format!("/v1/artifacts/team-b/out-{i}"),
                b"x".to_vec(),
                "team-b",
            ),
            (TEAM_A, format!("/ac/{ac_out_key}"), b"x".to_vec(), "ac"),
            (
                TEAM_A,
                format!("/cas/{cas_out_key}"),
                cas_out_body.clone(),
                "cas",
            ),
            (TEAM_A, format!("/cache/out-{i}"), b"x".to_vec(), "gradle"),
            (
                TEAM_A,
                format!("/some/instance/ac/{ac_out_key}"),
                b"x".to_vec(),
                "ac",
            ),
            (
                BAZEL,
                format!("/v1/artifacts/team-a/out-bazel-{i}"),
                b"x".to_vec(),
                "team-a",
            ),
            (
                BAZEL,
                format!("/cache/out-bazel-{i}"),
                b"x".to_vec(),
                "gradle",
            ),
            (
                &gradle,
                format!("/ci/main/cas/{cas_out_key}"),
                cas_out_body.clone(),
                "cas",
            ),
            (
                &gradle,
                format!("/v1/artifacts/team-a-private/out-{i}"),
                b"x".to_vec(),
                "team-a-private",
            ),
        ];
        for (token, path, body, namespace) in &rows {
            let r = server.send(front, put(path, token, body));
            assert_eq!(r.status, 403, "{front:?} PUT {path} with {token}");
            assert_eq!(r.header("www-authenticate"), None, "{front:?} {path}");
            let text = String::from_utf8_lossy(&r.body);
            assert!(
                text.contains(&format!(
                    "this token is not scoped to namespace {namespace}"
                )),
                "{front:?} {path}: {text}"
            );
        }
        // A streamed body announced with `Expect: 100-continue` is refused the same way.
        let streamed = format!("/v1/artifacts/team-b/streamed-{i}");
        let r = server.send(
            front,
            put(&streamed, TEAM_A, &[7u8; 50_000])
                .header("expect", "100-continue")
                .streamed(7_000),
        );
        assert_eq!(r.status, 403, "{front:?} streamed PUT");
        // DELETE is a write too: out of scope it is refused and the artifact stays.
        let keep = format!("/v1/artifacts/team-b/keep-{i}");
        assert_eq!(server.send(front, put(&keep, ADMIN, b"kept")).status, 201);
        let r = server.send(front, req("DELETE", &keep).header("Authorization", TEAM_A));
        assert_eq!(r.status, 403, "{front:?} DELETE {keep}");
        assert_eq!(
            server.send(front, get(&keep, ADMIN)).status,
            200,
            "{front:?}"
        );
        let own = format!("/v1/artifacts/team-a/in-{i}");
        let r = server.send(front, req("DELETE", &own).header("Authorization", TEAM_A));
        assert_eq!(r.status, 204, "{front:?} DELETE {own}");
        // Nothing was stored: a token covering every namespace finds none of them.
        let stored_as = [
            streamed,
            format!("/ac/{ac_out_key}"),
            format!("/cas/{cas_out_key}"),
        ];
        for path in rows.iter().map(|row| &row.1).chain(&stored_as) {
            let r = server.send(front, get(path, ADMIN));
            assert_eq!(r.status, 404, "{front:?} GET {path}: nothing stored");
        }
    }
    assert!(
        !server.stderr().contains("secret-0123456789"),
        "secrets must never be logged"
    );
}

/// Reads of `read = "token"` namespaces follow the scope (403 outside it, on the generic and
/// the Bazel routes, with and without an instance name); reads of public namespaces work for
/// any token or none; a scoped read-only token still may not write.
#[test]
fn scoped_tokens_read_only_their_token_namespaces_on_every_front() {
    let server = server().config(SCOPED_CONFIG).start();
    let ac_key = sha256_hex(b"scoped reads");
    let cas_body = b"public cas entry".to_vec();
    let cas = format!("/cas/{}", sha256_hex(&cas_body));
    let seeds: [(String, Vec<u8>); 6] = [
        (
            "/v1/artifacts/team-a-private/r".into(),
            b"a-private".to_vec(),
        ),
        (
            "/v1/artifacts/team-b-private/r".into(),
            b"b-private".to_vec(),
        ),
        ("/v1/artifacts/team-b/r".into(), b"b-public".to_vec()),
        (format!("/ac/{ac_key}"), b"action result".to_vec()),
        (cas.clone(), cas_body.clone()),
        ("/cache/r".into(), b"gradle entry".to_vec()),
    ];
    for (path, body) in &seeds {
        let r = server.send(Front::Http1, put(path, ADMIN, body));
        assert_eq!(r.status, 201, "seed {path}");
    }
    let gradle = gradle_basic();
    let instance_ac = format!("/ci/main/ac/{ac_key}");
    let ac = format!("/ac/{ac_key}");
    for front in FRONTS {
        // (token, path, status): 200 in scope or public, 403 outside the scope.
        let rows: &[(Option<&str>, &str, u16)] = &[
            (Some(TEAM_A), "/v1/artifacts/team-a-private/r", 200),
            (Some(TEAM_A), "/v1/artifacts/team-b-private/r", 403),
            (Some(TEAM_A), &ac, 403),
            (Some(TEAM_A), &instance_ac, 403),
            (Some(TEAM_A), "/v1/artifacts/team-b/r", 200),
            (Some(TEAM_A), &cas, 200),
            (Some(TEAM_A), "/cache/r", 200),
            (Some(BAZEL), &ac, 200),
            (Some(BAZEL), &instance_ac, 200),
            (Some(BAZEL), "/v1/artifacts/team-a-private/r", 403),
            (Some(&gradle), &ac, 403),
            (Some(&gradle), "/cache/r", 200),
            (Some(TEAM_B_READER), "/v1/artifacts/team-b-private/r", 200),
            (Some(TEAM_B_READER), "/v1/artifacts/team-a-private/r", 403),
            (Some(TEAM_B_READER), &cas, 200),
            (Some(ADMIN), "/v1/artifacts/team-b-private/r", 200),
            (Some(ADMIN), &instance_ac, 200),
            (None, "/v1/artifacts/team-b/r", 200),
            (None, &cas, 200),
            (None, "/cache/r", 200),
            (None, "/v1/artifacts/team-a-private/r", 401),
        ];
        for &(token, path, status) in rows {
            for method in ["GET", "HEAD"] {
                let mut request = req(method, path);
                if let Some(token) = token {
                    request = request.header("Authorization", token);
                }
                let r = server.send(front, request);
                assert_eq!(r.status, status, "{front:?} {method} {path} with {token:?}");
                if status == 403 && method == "GET" {
                    let text = String::from_utf8_lossy(&r.body);
                    assert!(text.contains("is not scoped to namespace"), "{text}");
                }
            }
        }
        // A read-only token may not write even inside its scope; nothing is stored.
        let path = format!("/v1/artifacts/team-b-private/ro-{}", front as u8);
        let r = server.send(front, put(&path, TEAM_B_READER, b"no"));
        assert_eq!(r.status, 403, "{front:?}");
        assert_eq!(server.send(front, get(&path, ADMIN)).status, 404);
    }
}

fn check_config(toml: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, toml).expect("write config");
    common::run_sluice(&["check-config", path.to_str().expect("utf8")], &[])
}

/// `check-config` accepts scopes and prints them back; it refuses an empty list, a value
/// that is not a list, an invalid name and a duplicate, naming the key and the value.
#[test]
fn check_config_validates_token_scopes() {
    let (code, out, err) = check_config(SCOPED_CONFIG);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("namespaces = [\"team-a\", \"team-a-private\"]"),
        "{out}"
    );
    assert!(out.contains("namespaces = [\"ac\", \"cas\"]"), "{out}");
    assert!(!out.contains("secret-0123456789"), "{out}");

    let token = |scope: &str| {
        format!(
            "[[tokens]]\nname = \"admin\"\nsecret = \"admin-secret-0123456789\"\naccess = \"rw\"\n\
             [[tokens]]\nname = \"team\"\nsecret = \"team-secret-0123456789\"\naccess = \"rw\"\n\
             namespaces = {scope}\n"
        )
    };
    let rows: &[(&str, &[&str])] = &[
        ("[]", &["`tokens[1].namespaces`", "`[]`", "at least one"]),
        (
            "\"team-a\"",
            &["`tokens[1].namespaces`", "\"team-a\"", "an array of"],
        ),
        (
            "[\"team-a\", \"Team_B\"]",
            &[
                "`tokens[1].namespaces[1]`",
                "\"Team_B\"",
                "[a-z0-9][a-z0-9_-]{0,63}",
            ],
        ),
        (
            "[\"ac\", \"cas\", \"ac\"]",
            &["`tokens[1].namespaces[2]`", "\"ac\"", "already listed"],
        ),
    ];
    for (scope, needles) in rows {
        let (code, _, err) = check_config(&token(scope));
        assert_eq!(code, 2, "{scope}: {err}");
        for needle in *needles {
            assert!(err.contains(needle), "{scope}: {needle:?} not in {err}");
        }
        assert!(!err.contains("secret-0123456789"), "{err}");
    }
}
