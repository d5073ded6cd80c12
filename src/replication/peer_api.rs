//! The receiving side of replication: `/_peer/v1/...` on the public port.
//!
//! | request | does |
//! |---|---|
//! | `GET /_peer/v1/hello` | the probe: `{"node_id": ...}` |
//! | `PUT /_peer/v1/put/{ns}/{key}/{write_time_ms}/{sha256}` | a replicated write (body: the artifact, `Content-Length` its length; `x-sluice-meta`: the response headers it keeps, if any) |
//! | `POST /_peer/v1/batch` | many small replicated writes, committed together (see [`super::batch`]) |
//! | `DELETE /_peer/v1/delete/{ns}/{key}/{write_time_ms}` | a replicated delete |
//! | `GET /_peer/v1/summary` | anti-entropy: 4096 bucket digests |
//! | `GET /_peer/v1/buckets/{b,b,...}[/after/{hex of ns/key}]` | anti-entropy: a page of the entries of those buckets (at most 4,096, then `more`) |
//!
//! Every request carries `Authorization: SluicePeer <peer_secret>`; without
//! it (or with a public token) the answer is 401 and nothing changes.
//!
//! Last-writer-wins: a replicated write is applied only when its
//! `(write_time_ms, sha256)` is greater than the local artifact's, so
//! applying the same write twice, or an older one late, changes nothing.
//! The CAS namespace is content-addressed: a present key is already right.
//! The check and the commit are not one atomic step: a local PUT of the
//! same key between them may be overwritten by an older replicated one;
//! the next anti-entropy run (which compares both ways) repairs it.

use std::sync::Arc;

use crate::app::{App, PeerService};
use crate::exchange::{Decision, OnCommit, PutSink, Reply, RequestInfo};
use crate::store::format::{Meta, META_HEADER};
use crate::store::{valid_key, valid_namespace, DeleteAt, PutOptions, StoreError};

use super::summary::Query;
use super::{batch, Replication};

impl PeerService for Replication {
    fn handle(self: Arc<Self>, app: &App, req: &RequestInfo<'_>, rest: &str) -> Decision {
        handle(app, &self, req, rest)
    }
}

/// Handle a request whose path starts with `/_peer/`; `rest` follows it.
pub fn handle(
    app: &App,
    replication: &Arc<Replication>,
    req: &RequestInfo<'_>,
    rest: &str,
) -> Decision {
    let has_body = req.chunked || req.content_length.is_some_and(|n| n > 0);
    let reply = |r: Reply| Decision::Reply(if has_body { r.closing() } else { r });
    let count = |result: &str| {
        replication.series.add(
            "sluice_replication_received_requests_total",
            format!("result=\"{result}\""),
            1,
        );
    };
    if !replication.authorized(req.authorization) {
        count("unauthorized");
        return reply(Reply::error(401, "the peer API needs the peer secret"));
    }
    let parts: Vec<&str> = rest.split('/').collect();
    match (req.method, parts.as_slice()) {
        ("GET", ["v1", "hello"]) => {
            count("hello");
            let body = serde_json::json!({ "node_id": replication.node_id }).to_string();
            let mut r = Reply::text(200, body);
            r.headers[0].1 = "application/json".to_string();
            reply(r)
        }
        // A key may have several `/`-separated segments (ccache's layout).
        ("PUT", ["v1", "put", ns, key @ .., time, sha]) if !key.is_empty() => {
            put(app, replication, req, ns, &key.join("/"), time, sha, &count)
        }
        ("POST", ["v1", "batch"]) => batch(app, replication, req, &count),
        ("DELETE", ["v1", "delete", ns, key @ .., time]) if !key.is_empty() => {
            reply(delete(app, ns, &key.join("/"), time, &count))
        }
        ("GET" | "HEAD", ["v1", "get", ns, key @ ..]) if !key.is_empty() => reply(get(
            app,
            replication,
            req.method == "HEAD",
            ns,
            &key.join("/"),
            &count,
        )),
        ("GET", ["v1", "summary"]) => reply(query(replication, req, Query::Summary, &count)),
        ("GET", ["v1", "buckets", list, tail @ ..]) => {
            // A later page: `.../after/{hex of ns/key}`.
            let after = match tail {
                [] => Some(None),
                ["after", hex] => Query::parse_after(hex).map(Some),
                _ => None,
            };
            let Some(after) = after else {
                count("bad");
                return reply(Reply::error(
                    400,
                    "bucket list: after/{hex of namespace/key} or nothing may follow",
                ));
            };
            let buckets: Option<Vec<u16>> = list
                .split(',')
                .map(|b| {
                    b.parse::<u16>()
                        .ok()
                        .filter(|&b| (b as usize) < super::summary::BUCKETS)
                })
                .collect();
            match buckets {
                Some(b) if !b.is_empty() && b.len() <= super::summary::QUERY_BUCKETS_MAX => {
                    reply(query(replication, req, Query::Buckets(b, after), &count))
                }
                _ => {
                    count("bad");
                    reply(Reply::error(
                        400,
                        "bucket list: comma-separated numbers below 4096",
                    ))
                }
            }
        }
        _ => {
            count("bad");
            reply(Reply::error(404, "no such peer API route"))
        }
    }
}

#[allow(clippy::result_large_err)] // the error is the reply, as in `App`
fn parse_write(ns: &str, key: &str, time: &str) -> Result<u64, Reply> {
    if !valid_namespace(ns) || !valid_key(key) {
        return Err(Reply::error(400, "invalid namespace or key"));
    }
    time.parse::<u64>()
        .map_err(|_| Reply::error(400, "write time must be milliseconds since the epoch"))
}

#[allow(clippy::too_many_arguments)]
fn put(
    app: &App,
    replication: &Arc<Replication>,
    req: &RequestInfo<'_>,
    ns: &str,
    key: &str,
    time: &str,
    sha: &str,
    count: &dyn Fn(&str),
) -> Decision {
    let refuse = refuser(req, count);
    let write_time_ms = match parse_write(ns, key, time) {
        Ok(t) => t,
        Err(r) => return refuse(r),
    };
    let mut sha256 = [0u8; 32];
    if hex::decode_to_slice(sha, &mut sha256).is_err() {
        return refuse(Reply::error(400, "sha256 must be 64 hex digits"));
    }
    let Some(len) = req.content_length else {
        return refuse(Reply::error(411, "a replicated write needs Content-Length"));
    };
    // The response headers the artifact keeps (Turborepo's x-artifact-*).
    let meta = match req.header(META_HEADER).map(Meta::from_header_value) {
        None => Meta::default(),
        Some(Ok(meta)) => meta,
        Some(Err(err)) => return refuse(Reply::error(400, &format!("{META_HEADER}: {err}"))),
    };
    let body_bytes_max = replication.settings.body_bytes_max;
    let keep = match loses(&app.store, ns, key, write_time_ms, &sha256) {
        Ok(keep) => keep,
        Err(err) => return refuse(Reply::error(err.status(), &err.to_string())),
    };
    if let Some(keep) = keep {
        count("kept");
        let r = match keep {
            Keep::Deleted => Reply::text(200, "kept: this node deleted the key after this write\n"),
            Keep::Newer(etag) => {
                let mut r = Reply::text(200, "kept: this node holds the same or a newer version\n");
                r.headers.push(("etag", etag));
                r
            }
        };
        return Decision::ReceiveBody(background(PutSink::discarding(r, body_bytes_max)));
    }
    let options = PutOptions {
        expected_len: Some(len),
        expected_sha256: Some(sha256),
        body_bytes_max,
        write_time_ms: Some(write_time_ms),
        // The check above saves reading a body that loses; this one, under
        // the key's lock at commit, makes last-writer-wins exact.
        last_writer_wins: true,
    };
    match app.store.begin_put_with(ns, key, options, meta) {
        Ok(writer) => {
            let mut sink = PutSink::new(writer, body_bytes_max);
            let series_ok = Arc::clone(replication);
            let on_failure = Arc::clone(replication);
            let epoch = replication.full_epoch();
            // A failure while the body arrives reads the rest and answers
            // after it: the sender hears 507 (full) on a usable connection
            // instead of a reset it would take for the peer being down.
            sink.set_on_failure(Box::new(move |err| on_failure.write_failed(err)), true);
            sink.set_on_commit(OnCommit(Box::new(move |committed| {
                series_ok.note_room(epoch);
                let result = if committed.superseded {
                    "result=\"kept\""
                } else {
                    "result=\"stored\""
                };
                series_ok.series.add(
                    "sluice_replication_received_requests_total",
                    result.to_string(),
                    1,
                );
                series_ok.series.add(
                    "sluice_replication_received_bytes_total",
                    String::new(),
                    committed.len,
                );
                None
            })));
            pace_inbound(&mut sink, replication);
            Decision::ReceiveBody(background(sink))
        }
        Err(err @ StoreError::NoSpace) => {
            // Full is a state of this node, not bad input: the body is read
            // and dropped, and the sender keeps the write for later.
            replication.write_failed(&err);
            Decision::ReceiveBody(PutSink::discarding(
                Reply::error(507, &err.to_string()),
                body_bytes_max,
            ))
        }
        Err(err) => refuse(Reply::error(err.status(), &err.to_string())),
    }
}

/// How a write request is refused: counted as `bad`, and closing when a
/// body follows (it is not read).
fn refuser<'a>(req: &RequestInfo<'_>, count: &'a dyn Fn(&str)) -> impl Fn(Reply) -> Decision + 'a {
    let has_body = req.chunked || req.content_length.is_some_and(|n| n > 0);
    move |r: Reply| {
        count("bad");
        Decision::Reply(if has_body { r.closing() } else { r })
    }
}

/// `POST /_peer/v1/batch`: the body is collected in memory (at most
/// [`batch::BODY_BYTES_MAX`]) on a background thread, paced by this node's
/// limiter like a single write, then applied by [`apply_batch`].
fn batch(
    app: &App,
    replication: &Arc<Replication>,
    req: &RequestInfo<'_>,
    count: &dyn Fn(&str),
) -> Decision {
    let refuse = refuser(req, count);
    let Some(len) = req.content_length else {
        return refuse(Reply::error(411, "a batch needs Content-Length"));
    };
    if len > batch::BODY_BYTES_MAX {
        return refuse(Reply::error(
            413,
            &format!("a batch body is at most {} bytes", batch::BODY_BYTES_MAX),
        ));
    }
    let store = app.store.clone();
    let r = Arc::clone(replication);
    let mut sink = PutSink::collecting(
        batch::BODY_BYTES_MAX,
        Box::new(move |body| apply_batch(&store, &r, body)),
    );
    pace_inbound(&mut sink, replication);
    Decision::ReceiveBody(background(sink))
}

/// What became of one entry of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    Stored,
    Kept,
    /// Refused for good (bad name, digest mismatch): the status a PUT gets.
    Rejected(u16),
    Full,
    Failed(u16),
}

impl Applied {
    fn of_error(err: &StoreError) -> Applied {
        match err {
            StoreError::NoSpace => Applied::Full,
            err if err.status() < 500 => Applied::Rejected(err.status()),
            err => Applied::Failed(err.status()),
        }
    }

    /// The `result` label of `sluice_replication_received_requests_total`.
    fn label(self) -> &'static str {
        match self {
            Applied::Stored => "stored",
            Applied::Kept => "kept",
            Applied::Rejected(_) => "bad",
            Applied::Full => "full",
            Applied::Failed(_) => "failed",
        }
    }
}

/// Check every entry as [`put`] would, write the ones that win, and commit
/// those together. Runs where the body was received (a background thread).
pub(super) fn apply_batch(
    store: &crate::store::Store,
    replication: &Arc<Replication>,
    body: &[u8],
) -> Reply {
    let entries = match batch::decode(body) {
        Ok(entries) => entries,
        Err(why) => {
            replication.series.add(
                "sluice_replication_received_batches_total",
                "result=\"bad\"".to_string(),
                1,
            );
            return Reply::error(400, &format!("batch: {why}"));
        }
    };
    let epoch = replication.full_epoch();
    let body_bytes_max = replication.settings.body_bytes_max;
    let mut outcomes: Vec<Option<Applied>> = Vec::with_capacity(entries.len());
    let mut writers = Vec::new();
    for entry in &entries {
        match begin_entry(store, body_bytes_max, entry) {
            Ok(writer) => {
                writers.push(writer);
                outcomes.push(None);
            }
            Err(applied) => outcomes.push(Some(applied)),
        }
    }
    let mut results = store.commit_batch(writers).into_iter();
    let mut stored_bytes = 0u64;
    for outcome in outcomes.iter_mut().filter(|o| o.is_none()) {
        *outcome = Some(match results.next() {
            Some(Ok(committed)) if committed.superseded => Applied::Kept,
            Some(Ok(committed)) => {
                stored_bytes += committed.len;
                Applied::Stored
            }
            Some(Err(err)) => Applied::of_error(&err),
            None => Applied::Failed(500),
        });
    }
    let outcomes: Vec<Applied> = outcomes.into_iter().flatten().collect();
    if outcomes.contains(&Applied::Full) {
        // The state only: each write is counted below, once.
        replication.note_full();
    }
    let mut text = String::with_capacity(outcomes.len() * 8);
    for applied in &outcomes {
        replication.series.add(
            "sluice_replication_received_requests_total",
            format!("result=\"{}\"", applied.label()),
            1,
        );
        match applied {
            Applied::Rejected(status) | Applied::Failed(status) => {
                text.push_str(&format!("{} {status}\n", applied.label()));
            }
            _ => {
                text.push_str(applied.label());
                text.push('\n');
            }
        }
    }
    if stored_bytes > 0 {
        replication.series.add(
            "sluice_replication_received_bytes_total",
            String::new(),
            stored_bytes,
        );
    }
    let status = if outcomes.contains(&Applied::Full) {
        507
    } else if outcomes.iter().any(|o| matches!(o, Applied::Failed(_))) {
        503
    } else {
        200
    };
    if outcomes
        .iter()
        .any(|o| matches!(o, Applied::Stored | Applied::Kept))
    {
        replication.note_room(epoch);
    }
    replication.series.add(
        "sluice_replication_received_batches_total",
        format!("result=\"{}\"", if status == 200 { "ok" } else { "retry" }),
        1,
    );
    Reply::text(status, text)
}

/// Why this node keeps what it has instead of a replicated write.
enum Keep {
    /// Deleted here at or after the write's time: the delete wins.
    Deleted,
    /// This node holds the same or a newer version (its ETag).
    Newer(String),
}

/// Last-writer-wins before a body is read, for a single PUT and a batch
/// entry alike: `Some` when the write at `write_time_ms` with `sha256` loses
/// to what this node holds (a content-addressed key is the same whatever
/// its time). The store checks again under the key's lock at commit, which
/// makes it exact; this saves reading a body that loses.
fn loses(
    store: &crate::store::Store,
    ns: &str,
    key: &str,
    write_time_ms: u64,
    sha256: &[u8; 32],
) -> Result<Option<Keep>, crate::store::StoreError> {
    if store
        .tombstone_time(ns, key)
        .is_some_and(|t| t >= write_time_ms)
    {
        return Ok(Some(Keep::Deleted));
    }
    let Some(local) = store.get(ns, key)? else {
        return Ok(None);
    };
    let local_time = local.write_time_ms().unwrap_or(0);
    if ns == "cas" || (local_time, local.sha256) >= (write_time_ms, *sha256) {
        return Ok(Some(Keep::Newer(local.etag())));
    }
    Ok(None)
}

/// One batch entry up to its commit: `Err` is its outcome without one
/// (kept, refused, no room).
fn begin_entry(
    store: &crate::store::Store,
    body_bytes_max: u64,
    entry: &batch::Entry<'_>,
) -> Result<crate::store::PutWriter, Applied> {
    let (ns, key, write_time_ms) = (entry.ns, entry.key, entry.write_time_ms);
    if !valid_namespace(ns) || !valid_key(key) {
        return Err(Applied::Rejected(400));
    }
    let meta = match entry.meta.map(|m| Meta::from_header_value(m.as_bytes())) {
        None => Meta::default(),
        Some(Ok(meta)) => meta,
        Some(Err(_)) => return Err(Applied::Rejected(400)),
    };
    match loses(store, ns, key, write_time_ms, &entry.sha256) {
        Ok(None) => {}
        Ok(Some(_)) => return Err(Applied::Kept),
        Err(err) => return Err(Applied::of_error(&err)),
    }
    let options = PutOptions {
        expected_len: Some(entry.body.len() as u64),
        expected_sha256: Some(entry.sha256),
        body_bytes_max,
        write_time_ms: Some(write_time_ms),
        last_writer_wins: true,
    };
    let mut writer = store
        .begin_put_with(ns, key, options, meta)
        .map_err(|err| Applied::of_error(&err))?;
    writer
        .write(entry.body)
        .map_err(|err| Applied::of_error(&err))?;
    Ok(writer)
}

/// Pace a peer body in by this node's limiter: under public load here,
/// replication comes in no faster than the local latency allows.
fn pace_inbound(sink: &mut PutSink, replication: &Replication) {
    let limiter = Arc::clone(&replication.limiter);
    sink.set_pacer(Arc::new(move |now, n| limiter.acquire_inbound(now, n)));
}

/// A replicated write's body is replication's work: received, hashed and
/// written on a background thread where the front can (`crate::background`).
fn background(mut sink: PutSink) -> PutSink {
    sink.set_in_background();
    sink
}

/// A peer's read-through: the artifact with its sha256 and write time, so
/// the asker can check the body before storing it. The body bytes are
/// charged to the limiter (a client waits on the other side, so they are
/// not delayed; the outbox and repairs wait for them instead).
fn get(
    app: &App,
    replication: &Replication,
    head: bool,
    ns: &str,
    key: &str,
    count: &dyn Fn(&str),
) -> Reply {
    if !valid_namespace(ns) || !valid_key(key) {
        count("bad");
        return Reply::error(400, "invalid namespace or key");
    }
    let artifact = match app.store.get(ns, key) {
        Ok(Some(a)) => a,
        Ok(None) => {
            count("get_missing");
            return Reply::error(404, "no such artifact");
        }
        Err(err) => return Reply::error(err.status(), &err.to_string()),
    };
    count("get");
    if !head {
        replication
            .limiter
            .charge(std::time::Instant::now(), artifact.len);
    }
    let len = artifact.len;
    let mut headers = vec![
        ("etag", artifact.etag()),
        ("content-type", "application/octet-stream".to_string()),
        ("x-sluice-sha256", hex::encode(artifact.sha256)),
        (
            "x-sluice-write-time-ms",
            artifact.write_time_ms().unwrap_or(0).to_string(),
        ),
    ];
    if let Some(meta) = &artifact.meta {
        headers.push((META_HEADER, meta.to_header_value()));
    }
    let offset = artifact.body_offset;
    Reply {
        status: 200,
        headers,
        content_length: Some(len),
        body: if head {
            crate::exchange::ReplyBody::Empty
        } else {
            crate::exchange::ReplyBody::File {
                artifact,
                offset,
                len,
            }
        },
        close: false,
    }
}

fn delete(app: &App, ns: &str, key: &str, time: &str, count: &dyn Fn(&str)) -> Reply {
    let write_time_ms = match parse_write(ns, key, time) {
        Ok(t) => t,
        Err(r) => {
            count("bad");
            return r;
        }
    };
    match app.store.delete_at(ns, key, write_time_ms, false) {
        Ok(DeleteAt::Kept) => {
            count("kept");
            Reply::text(200, "kept: this node holds a newer version\n")
        }
        Ok(DeleteAt::Deleted { .. }) => {
            count("deleted");
            Reply::empty(204)
        }
        Err(err) => Reply::error(err.status(), &err.to_string()),
    }
}

/// Summaries are computed off the engine threads (they walk the data
/// directory): the first ask queues the work and answers 503; the asker
/// retries and gets the cached answer.
fn query(
    replication: &Replication,
    req: &RequestInfo<'_>,
    q: Query,
    count: &dyn Fn(&str),
) -> Reply {
    let max_age = req
        .header(super::summary::MAX_AGE_HEADER)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(std::time::Duration::from_millis);
    match replication.summaries.get_or_request(&q, max_age) {
        Some(body) => {
            count("summary");
            let mut r = Reply::text(200, String::new());
            r.body = crate::exchange::ReplyBody::Bytes(body.to_vec());
            r.content_length = Some(body.len() as u64);
            r
        }
        None => {
            count("summary_pending");
            replication.kick();
            let mut r = Reply::error(503, "summary being computed; retry shortly");
            r.headers.push(("retry-after", "1".to_string()));
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::delivery::limiter::Limiter;
    use crate::store::{Store, StoreConfig};

    fn node(dir: &std::path::Path) -> (Store, Arc<Replication>) {
        let store = Store::open(StoreConfig {
            data_dir: dir.join("data"),
            ..StoreConfig::default()
        })
        .unwrap();
        let config = Config {
            peers: vec!["127.0.0.1:1".to_string()],
            ..Config::default()
        };
        let listen = "127.0.0.1:2".parse().unwrap();
        let settings = super::super::Settings::from_config(&config, listen).unwrap();
        let limiter = Arc::new(Limiter::from_config(&config, Arc::default()));
        let r = Replication::open(settings, &dir.join("data"), limiter).unwrap();
        (store, Arc::new(r))
    }

    fn sha(data: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(data).into()
    }

    /// Each write of a batch is checked as a single PUT would be and
    /// counted once: stored, kept (this node holds newer), refused for good
    /// (a body that does not hash to its digest, a bad name), all in a 200
    /// whose lines say which; only the stored ones are on disk.
    #[test]
    fn a_batch_applies_each_write_as_a_put_would_and_counts_it_once() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, r) = node(tmp.path());
        let mut w = store
            .begin_put_with(
                "ns",
                "newer",
                PutOptions {
                    write_time_ms: Some(500),
                    ..PutOptions::default()
                },
                Meta::default(),
            )
            .unwrap();
        w.write(b"local").unwrap();
        w.commit().unwrap();
        let mut body = Vec::new();
        batch::encode_entry(&mut body, "ns", "new", 100, &sha(b"one"), None, b"one");
        batch::encode_entry(&mut body, "ns", "newer", 100, &sha(b"old"), None, b"old");
        batch::encode_entry(&mut body, "ns", "lying", 100, &sha(b"x"), None, b"y");
        batch::encode_entry(&mut body, "NS!", "bad", 100, &sha(b"z"), None, b"z");
        batch::encode_entry(&mut body, "ns", "two", 100, &sha(b"two"), None, b"two");
        let reply = apply_batch(&store, &r, &body);
        assert_eq!(reply.status, 200);
        let text = match &reply.body {
            crate::exchange::ReplyBody::Bytes(b) => String::from_utf8(b.clone()).unwrap(),
            other => panic!("{other:?}"),
        };
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "stored");
        assert_eq!(lines[1], "kept");
        assert!(lines[2].starts_with("bad 4"), "{text}");
        assert_eq!(lines[3], "bad 400");
        assert_eq!(lines[4], "stored");
        let count = |result: &str| {
            r.series.get(
                "sluice_replication_received_requests_total",
                &format!("result=\"{result}\""),
            )
        };
        assert_eq!((count("stored"), count("kept"), count("bad")), (2, 1, 2));
        assert_eq!(
            r.series
                .get("sluice_replication_received_batches_total", "result=\"ok\""),
            1
        );
        assert!(store.get("ns", "new").unwrap().is_some());
        assert!(store.get("ns", "lying").unwrap().is_none());
        let kept = store.get("ns", "newer").unwrap().unwrap();
        assert_eq!(kept.write_time_ms().unwrap(), 500);
        // Not a batch body: 400, nothing stored.
        assert_eq!(apply_batch(&store, &r, b"garbage").status, 400);
    }
}
