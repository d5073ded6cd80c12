//! Turborepo's remote cache API (`/v8/artifacts...`) over the store.
//!
//! | request | answer |
//! |---|---|
//! | `GET /v8/artifacts/status` | `200 {"status":"enabled"}` |
//! | `GET`, `HEAD /v8/artifacts/{hash}` | the artifact, with the `x-artifact-*` headers it was stored with; 404 |
//! | `PUT /v8/artifacts/{hash}` | `202 {"urls":[]}`; an existing hash is replaced (turbo warns on 409) |
//! | `POST /v8/artifacts` `{"hashes":[...]}` | `{hash: {"size","taskDurationMs"[,"tag"]} or null}` |
//! | `POST /v8/artifacts/events` | `200`; the events are counted by source and kind |
//! | `OPTIONS /v8/artifacts...` | `200` with the CORS headers turbo's preflight reads |
//!
//! The team is the namespace: `teamId` if the query has one, else `slug`,
//! else [`DEFAULT_NAMESPACE`]. Errors are JSON, `{"error":{"code","message"}}`:
//! turbo reads the body of a 403 and tells a forbidden token (`forbidden`:
//! it stops using the cache for the run, with one warning) from a disabled
//! cache by the code.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;

use super::{close_if_unread, App, Decision, PutSink, Reply, ReplyBody, RequestInfo};
use crate::auth::Access;
use crate::route::RESERVED_NAMESPACES;
use crate::route::{is_turbo_hash, valid_namespace, Action, ArtifactKind, TurboRoute};
use crate::store::format::Meta;
use crate::store::{OpenCache, Store};

/// The namespace of a request that names no team (neither `teamId` nor
/// `slug`; turbo sends none when `TURBO_TEAMID` lacks the `team_` prefix).
pub const DEFAULT_NAMESPACE: &str = "turbo";
/// Largest `POST /v8/artifacts` body, bytes.
pub const QUERY_BODY_BYTES_MAX: u64 = 1024 * 1024;
/// Most hashes one `POST /v8/artifacts` may ask about.
pub const QUERY_HASHES_MAX: usize = 16 * 1024;
/// Largest `POST /v8/artifacts/events` body, bytes.
pub const EVENTS_BODY_BYTES_MAX: u64 = 1024 * 1024;
/// Longest `x-artifact-duration` value: a u64 in decimal.
const DURATION_DIGITS_MAX: usize = 20;
/// What the preflight allows to be sent (turbo sends the token only if
/// `Authorization` is listed).
const ALLOW_HEADERS: &str = "Authorization, Content-Type, User-Agent, x-artifact-duration, \
     x-artifact-tag, x-artifact-sha, x-artifact-dirty-hash, x-artifact-client-ci, \
     x-artifact-client-interactive";

impl App {
    /// A request under `/v8/artifacts`.
    pub(super) fn turbo(
        &self,
        req: &RequestInfo<'_>,
        route: TurboRoute<'_>,
        files: Option<&mut OpenCache>,
    ) -> Decision {
        let has_body = req.has_body();
        let head = req.method == "HEAD";
        let done = |reply: Reply| {
            let reply = json_error(reply);
            let reply = if head { reply.without_body() } else { reply };
            Decision::Reply(close_if_unread(reply, has_body))
        };
        if route == TurboRoute::Preflight {
            return done(preflight());
        }
        let ns = match team_namespace(req.query) {
            Ok(ns) => ns,
            Err(why) => {
                if matches!(
                    route,
                    TurboRoute::Artifact {
                        action: Action::Put,
                        ..
                    }
                ) {
                    self.metrics.count_put_aborted();
                }
                return done(Reply::error(400, why));
            }
        };
        match route {
            TurboRoute::Preflight => done(preflight()),
            TurboRoute::Status => match self.authorize(req, ns, Access::Read) {
                Ok(()) => done(json(200, &serde_json::json!({ "status": "enabled" }))),
                Err(reply) => done(reply),
            },
            TurboRoute::Artifact {
                hash,
                action: Action::Put,
            } => {
                let meta = match artifact_meta(req) {
                    Ok(meta) => meta,
                    Err(why) => {
                        self.metrics.count_put_aborted();
                        return done(Reply::error(400, &why));
                    }
                };
                match self.put(req, ArtifactKind::Turbo, ns, hash, meta) {
                    Decision::ReceiveBody(mut sink) => {
                        sink.set_reshape(reshape_put);
                        Decision::ReceiveBody(sink)
                    }
                    Decision::Reply(reply) => Decision::Reply(json_error(reply)),
                    other => other,
                }
            }
            TurboRoute::Artifact { hash, .. } => {
                match self.get(req, ArtifactKind::Turbo, ns, hash, files) {
                    Ok(reply) => done(reply),
                    Err(defer) => defer.decision(ns, hash),
                }
            }
            TurboRoute::Query => {
                if let Err(reply) = self.authorize(req, ns, Access::Read) {
                    return done(reply);
                }
                if !has_body {
                    return done(Reply::error(
                        400,
                        "a JSON body {\"hashes\": [...]} is required",
                    ));
                }
                let store = self.store.clone();
                let ns = ns.to_string();
                Decision::ReceiveBody(PutSink::collecting(
                    QUERY_BODY_BYTES_MAX,
                    Box::new(move |body| json_error(answer_query(&store, &ns, body))),
                ))
            }
            TurboRoute::Events => {
                if let Err(reply) = self.authorize(req, ns, Access::Read) {
                    return done(reply);
                }
                if !has_body {
                    return done(Reply::empty(200));
                }
                let counts = self.turbo_events.clone_handle();
                Decision::ReceiveBody(PutSink::collecting(
                    EVENTS_BODY_BYTES_MAX,
                    Box::new(move |body| match parse_events(body) {
                        Ok(parsed) => {
                            counts.add(&parsed);
                            Reply::empty(200)
                        }
                        Err(why) => json_error(Reply::error(400, why)),
                    }),
                ))
            }
        }
    }
}

/// The namespace a query names: `teamId`, else `slug`, else
/// [`DEFAULT_NAMESPACE`]; it must be a valid, unreserved namespace. Values
/// are taken as sent (a percent-encoded one is refused by the name rule).
pub fn team_namespace(query: Option<&str>) -> Result<&str, &'static str> {
    let mut team_id = None;
    let mut slug = None;
    for pair in query.unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "teamId" if team_id.is_none() && !value.is_empty() => team_id = Some(value),
            "slug" if slug.is_none() && !value.is_empty() => slug = Some(value),
            _ => {}
        }
    }
    let ns = team_id.or(slug).unwrap_or(DEFAULT_NAMESPACE);
    if !valid_namespace(ns) {
        return Err("the team (teamId or slug) must match [a-z0-9][a-z0-9_-]{0,63}");
    }
    if RESERVED_NAMESPACES.contains(&ns) {
        return Err("teams ac, cas and gradle are reserved for the Bazel and Gradle routes");
    }
    Ok(ns)
}

/// The `x-artifact-*` headers of a PUT, to keep with the artifact.
fn artifact_meta(req: &RequestInfo<'_>) -> Result<Meta, String> {
    let mut meta = Meta::default();
    let mut failed = None;
    if let Some(headers) = req.headers {
        headers.each_header(&mut |name, value| {
            if failed.is_some() || !starts_with_ignore_case(name, "x-artifact-") {
                return;
            }
            if name.eq_ignore_ascii_case("x-artifact-duration")
                && (value.is_empty()
                    || value.len() > DURATION_DIGITS_MAX
                    || !value.iter().all(u8::is_ascii_digit))
            {
                failed = Some("x-artifact-duration must be a whole number of milliseconds".into());
                return;
            }
            if let Err(err) = meta.push(name, value) {
                failed = Some(format!("x-artifact-* headers: {err}"));
            }
        });
    }
    match failed {
        Some(why) => Err(why),
        None => Ok(meta),
    }
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// The final reply of a stored PUT: 202 with the body the API describes.
fn reshape_put(reply: Reply) -> Reply {
    match reply.status {
        201 | 204 => {
            let mut r = json(202, &serde_json::json!({ "urls": [] }));
            r.headers.extend(reply.headers);
            r.close = reply.close;
            r
        }
        _ => json_error(reply),
    }
}

/// The preflight answer: everything turbo sends may be sent.
fn preflight() -> Reply {
    let mut r = Reply::empty(200);
    r.headers.extend([
        ("access-control-allow-origin", "*".to_string()),
        (
            "access-control-allow-methods",
            "GET, HEAD, PUT, POST, OPTIONS".to_string(),
        ),
        ("access-control-allow-headers", ALLOW_HEADERS.to_string()),
        ("access-control-max-age", "600".to_string()),
    ]);
    r
}

fn json(status: u16, value: &serde_json::Value) -> Reply {
    let mut r = Reply::text(status, value.to_string());
    r.headers[0].1 = "application/json".to_string();
    r
}

/// An error reply in the API's shape, `{"error":{"code","message"}}`, keeping
/// its other headers (`www-authenticate`, `allow`, …). Other replies pass.
pub fn json_error(reply: Reply) -> Reply {
    if reply.status < 400 {
        return reply;
    }
    let message = match &reply.body {
        ReplyBody::Bytes(text) => String::from_utf8_lossy(text).trim().to_string(),
        _ => crate::exchange::reason(reply.status).to_string(),
    };
    let code = match reply.status {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        411 => "length_required",
        412 => "precondition_failed",
        413 => "payload_too_large",
        416 => "range_not_satisfiable",
        507 => "insufficient_storage",
        s if s >= 500 => "server_error",
        _ => "bad_request",
    };
    let mut r = json(
        reply.status,
        &serde_json::json!({ "error": { "code": code, "message": message } }),
    );
    r.headers.extend(
        reply
            .headers
            .into_iter()
            .filter(|(n, _)| *n != "content-type"),
    );
    r.close = reply.close;
    r
}

#[derive(Deserialize)]
struct QueryBody {
    hashes: Vec<String>,
}

/// The hashes a `POST /v8/artifacts` body asks about, checked: at most
/// [`QUERY_HASHES_MAX`], each a Turborepo hash. Never panics.
pub fn parse_query(body: &[u8]) -> Result<Vec<String>, &'static str> {
    // JSON is UTF-8 (RFC 8259); serde skips the fields it ignores without
    // checking that (found by the `turbo_bodies` fuzz target).
    let body = std::str::from_utf8(body).map_err(|_| "the body must be UTF-8 JSON")?;
    let parsed: QueryBody = serde_json::from_str(body)
        .map_err(|_| "the body must be JSON: {\"hashes\": [\"<hex>\", ...]}")?;
    if parsed.hashes.len() > QUERY_HASHES_MAX {
        return Err("at most 16384 hashes per request");
    }
    if !parsed.hashes.iter().all(|h| is_turbo_hash(h)) {
        return Err("Turborepo artifact hashes are 1 to 255 hex digits");
    }
    Ok(parsed.hashes)
}

/// `{hash: {"size", "taskDurationMs"[, "tag"]} | null}` for each hash asked.
fn answer_query(store: &Store, ns: &str, body: &[u8]) -> Reply {
    let hashes = match parse_query(body) {
        Ok(hashes) => hashes,
        Err(why) => return Reply::error(400, why),
    };
    let mut out = serde_json::Map::new();
    for hash in hashes {
        let found = match store.get(ns, &hash) {
            Ok(found) => found,
            Err(err) => return crate::exchange::store_error(&err),
        };
        let value = match found {
            None => serde_json::Value::Null,
            Some(artifact) => {
                let meta = artifact.meta.as_deref();
                let duration = meta
                    .and_then(|m| m.get("x-artifact-duration"))
                    .and_then(|d| d.parse::<u64>().ok())
                    .unwrap_or(0);
                let mut entry = serde_json::json!({
                    "size": artifact.len,
                    "taskDurationMs": duration,
                });
                if let Some(tag) = meta.and_then(|m| m.get("x-artifact-tag")) {
                    entry["tag"] = serde_json::Value::String(tag.to_string());
                }
                entry
            }
        };
        out.insert(hash, value);
    }
    json(200, &serde_json::Value::Object(out))
}

#[derive(Deserialize)]
struct Event {
    source: Option<String>,
    event: Option<String>,
}

/// Counts of one events body: local hit, local miss, remote hit, remote
/// miss, anything else.
pub type EventTally = [u64; 5];

/// Tallies a `POST /v8/artifacts/events` body (a JSON array of
/// `{"source": "LOCAL"|"REMOTE", "event": "HIT"|"MISS", ...}`). Never panics.
pub fn parse_events(body: &[u8]) -> Result<EventTally, &'static str> {
    // As in `parse_query`: the ignored fields must be UTF-8 too.
    let body = std::str::from_utf8(body).map_err(|_| "the body must be UTF-8 JSON")?;
    let events: Vec<Event> =
        serde_json::from_str(body).map_err(|_| "the body must be a JSON array of events")?;
    let mut tally = [0u64; 5];
    for e in events {
        let source = e.source.as_deref().map(str::to_ascii_uppercase);
        let event = e.event.as_deref().map(str::to_ascii_uppercase);
        let slot = match (source.as_deref(), event.as_deref()) {
            (Some("LOCAL"), Some("HIT")) => 0,
            (Some("LOCAL"), Some("MISS")) => 1,
            (Some("REMOTE"), Some("HIT")) => 2,
            (Some("REMOTE"), Some("MISS")) => 3,
            _ => 4,
        };
        tally[slot] += 1;
    }
    Ok(tally)
}

const EVENT_LABELS: [&str; 5] = [
    "source=\"local\",event=\"hit\"",
    "source=\"local\",event=\"miss\"",
    "source=\"remote\",event=\"hit\"",
    "source=\"remote\",event=\"miss\"",
    "source=\"other\",event=\"other\"",
];

/// Turborepo's cache events, as `sluice_turbo_events_total`.
#[derive(Default)]
pub(super) struct EventCounts {
    counts: std::sync::Arc<[AtomicU64; 5]>,
}

/// A handle on [`EventCounts`] a collecting sink can carry.
pub(super) struct EventCountsHandle(std::sync::Arc<[AtomicU64; 5]>);

impl EventCounts {
    fn clone_handle(&self) -> EventCountsHandle {
        EventCountsHandle(std::sync::Arc::clone(&self.counts))
    }

    pub(super) fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let name = "sluice_turbo_events_total";
        let _ = writeln!(
            out,
            "# HELP {name} Turborepo cache events reported by clients (POST /v8/artifacts/events).\n# TYPE {name} counter"
        );
        for (labels, count) in EVENT_LABELS.iter().zip(self.counts.iter()) {
            let _ = writeln!(out, "{name}{{{labels}}} {}", count.load(Ordering::Relaxed));
        }
    }
}

impl EventCountsHandle {
    fn add(&self, tally: &EventTally) {
        for (count, n) in self.0.iter().zip(tally) {
            count.fetch_add(*n, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teams_map_to_namespaces() {
        let rows: &[(Option<&str>, Result<&str, &str>)] = &[
            (None, Ok("turbo")),
            (Some(""), Ok("turbo")),
            (Some("slug=lab"), Ok("lab")),
            (Some("teamId=team_xyz"), Ok("team_xyz")),
            (Some("teamId=team_both&slug=lab"), Ok("team_both")),
            (Some("slug=lab&teamId=team_both"), Ok("team_both")),
            (Some("slug=&teamId="), Ok("turbo")),
            (Some("other=1&slug=lab"), Ok("lab")),
            (
                Some("slug=Lab"),
                Err("the team (teamId or slug) must match [a-z0-9][a-z0-9_-]{0,63}"),
            ),
            (
                Some("slug=a%2Fb"),
                Err("the team (teamId or slug) must match [a-z0-9][a-z0-9_-]{0,63}"),
            ),
            (
                Some("slug=cas"),
                Err("teams ac, cas and gradle are reserved for the Bazel and Gradle routes"),
            ),
        ];
        for (query, want) in rows {
            assert_eq!(team_namespace(*query), *want, "{query:?}");
        }
    }

    #[test]
    fn query_and_events_bodies() {
        assert_eq!(
            parse_query(br#"{"hashes":["3c6dfcbfd60adb51","AB"]}"#),
            Ok(vec!["3c6dfcbfd60adb51".to_string(), "AB".to_string()])
        );
        for bad in [
            &b"{}"[..],
            b"[]",
            b"{\"hashes\":[\"x/y\"]}",
            b"{\"hashes\":[1]}",
            b"\xff",
        ] {
            assert!(parse_query(bad).is_err(), "{bad:?}");
        }
        let events =
            br#"[{"sessionId":"s","source":"LOCAL","event":"MISS","hash":"ab","duration":0},
            {"sessionId":"s","source":"REMOTE","event":"HIT","hash":"ab","duration":256},
            {"source":"REMOTE"}]"#;
        assert_eq!(parse_events(events), Ok([0, 1, 1, 0, 1]));
        assert!(parse_events(b"{}").is_err());
        // Invalid UTF-8 in a field serde ignores (found by fuzzing).
        assert!(parse_events(b"[{\"hash\":\"\xff\"}]").is_err());
        assert!(parse_query(b"{\"hashes\":[],\"x\":\"\xff\"}").is_err());
    }

    #[test]
    fn errors_are_json_and_keep_their_headers() {
        let mut r = Reply::error(401, "a valid token is required");
        r.headers.push(("www-authenticate", "Bearer".to_string()));
        let j = json_error(r.closing());
        assert_eq!(j.status, 401);
        assert!(j.close);
        assert!(j
            .headers
            .contains(&("content-type", "application/json".to_string())));
        assert!(j
            .headers
            .contains(&("www-authenticate", "Bearer".to_string())));
        let ReplyBody::Bytes(body) = &j.body else {
            panic!("no body")
        };
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["error"]["code"], "unauthorized");
        assert_eq!(reshape_put(Reply::empty(201)).status, 202);
        assert_eq!(reshape_put(Reply::empty(204)).status, 202);
        assert_eq!(reshape_put(Reply::error(507, "full")).status, 507);
    }
}
