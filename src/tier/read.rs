//! Read-through: a local miss asks the tier. One fetch per key however many
//! requests wait ([`super::policy::Reads`]); the object is checked (a `/cas/`
//! key is its own digest; any other object against the sha256 it was
//! uploaded with) while it is written to the store, and only a verified one
//! is published. The fetch and every wait for it run on the tier runtime:
//! a waiting request costs a parked connection and a task, no thread (the
//! ring's opener hands the wait over and goes on; the fallback awaits it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::Attribute;

use crate::store::format::Meta;

use super::client::{TierError, META_SHA256, META_WRITE_TIME_MS};
use super::policy::{self, Miss, Outcome};
use super::{lock, Tier};
use crate::app::{MissReader, Waiter};
use crate::exchange::Reply;
use crate::route::ArtifactKind;
use crate::store::{PutOptions, StoreError};

/// A waiter gives up after this long even if the fetch still makes
/// progress (each piece of the body must come within `tier_timeout_ms`, so
/// a stalled fetch ends much sooner): a guard against waiting for ever.
const WAIT_MS_MAX: u64 = 600_000;

/// The tier answers a local miss on the cold-open path.
impl MissReader for Tier {
    /// On a local miss, from the front end's thread: the reply when a recent
    /// fetch already decided it (or the tier is known down), `None` when
    /// the request must wait for a fetch ([`Tier::read_through`], off the
    /// engine thread).
    ///
    /// A small explicit `Range` (no `If-Range`) is answered from a ranged GET
    /// made for it while the whole object is still on its way: it is
    /// registered here, fetched by [`Tier::read_through`], and found here
    /// when the request decides again.
    fn answer_miss(
        &self,
        kind: ArtifactKind,
        ns: &str,
        key: &str,
        range: Option<&[u8]>,
        conditional: bool,
    ) -> Option<Reply> {
        let id = id(ns, key);
        let now = Instant::now();
        let small = range.filter(|_| !conditional).and_then(policy::small_range);
        if let Some((start, end_inclusive)) = small {
            let mut ranges = lock(&self.ranges);
            if let Some(piece) = ranges.find(&id, start, end_inclusive, now) {
                return Some(range_reply(ns, key, &piece, start, end_inclusive));
            }
        }
        if let Some(outcome) = lock(&self.reads).peek(&id, now) {
            return Some(reply_for(kind, outcome));
        }
        if let Some((start, end_inclusive)) = small {
            lock(&self.ranges).want(&id, start, end_inclusive, now);
        }
        None
    }

    /// The ring could not even look the artifact up without the disk: the
    /// opener thread will, and on a miss reads it through. A small range is
    /// registered now, since the request reaches [`Tier::answer_miss`] only
    /// after that read.
    /// A piece fetched for it already answers it.
    fn on_cold(
        &self,
        ns: &str,
        key: &str,
        range: Option<&[u8]>,
        conditional: bool,
    ) -> Option<Reply> {
        let (start, end_inclusive) = range
            .filter(|_| !conditional)
            .and_then(policy::small_range)?;
        let (id, now) = (id(ns, key), Instant::now());
        let mut ranges = lock(&self.ranges);
        if let Some(piece) = ranges.find(&id, start, end_inclusive, now) {
            return Some(range_reply(ns, key, &piece, start, end_inclusive));
        }
        ranges.want(&id, start, end_inclusive, now);
        None
    }

    fn fill(self: Arc<Self>, ns: String, key: String, done: Waiter) {
        self.read_through_then(ns, key, move |_| done());
    }
}

fn id(ns: &str, key: &str) -> String {
    format!("{ns}/{key}")
}

impl Tier {
    /// Read `ns/key` through (start the fetch or join the one running) on
    /// the tier runtime, then call `then` with the outcome, from that
    /// runtime. Never blocks the caller: the ring's opener thread and the
    /// fallback both use it.
    pub fn read_through_then(
        self: &Arc<Self>,
        ns: String,
        key: String,
        then: impl FnOnce(Outcome) + Send + 'static,
    ) {
        let tier = Arc::clone(self);
        self.rt.spawn(async move {
            let outcome = tier.read_through(&ns, &key).await;
            then(outcome);
        });
    }

    /// Fetch `ns/key` into the store (or join the fetch already running)
    /// and wait for it; with a small range wanted, wait only for that.
    pub async fn read_through(self: &Arc<Self>, ns: &str, key: &str) -> Outcome {
        let id = id(ns, key);
        let miss = lock(&self.reads).on_miss(&id, Instant::now());
        match miss {
            Miss::Answer(outcome) => return outcome,
            Miss::Join => self.count("joined"),
            Miss::Fetch => {
                let (tier, ns, key, id) = (
                    Arc::clone(self),
                    ns.to_string(),
                    key.to_string(),
                    id.clone(),
                );
                self.rt.spawn(async move {
                    let outcome = tier.fetch(&ns, &key).await;
                    tier.count(outcome.as_str());
                    lock(&tier.reads).on_done(&id, outcome, Instant::now());
                    tier.fetched.notify_waiters();
                });
            }
        }
        let wanted = lock(&self.ranges).take_wanted(&id, Instant::now());
        if let Some((start, end_inclusive)) = wanted {
            // The whole object keeps coming; this request needs only its
            // range. If the ranged read fails, it waits for the whole.
            if self.fetch_range(ns, key, &id, start, end_inclusive).await {
                return Outcome::Stored;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(WAIT_MS_MAX);
        loop {
            // Registered before the check, so a fetch ending in between
            // still wakes this waiter.
            let fetched = self.fetched.notified();
            {
                let reads = lock(&self.reads);
                if !reads.fetching(&id) {
                    return reads.outcome(&id).unwrap_or(Outcome::Unavailable);
                }
            }
            if tokio::time::timeout_at(deadline, fetched).await.is_err() {
                return Outcome::Unavailable;
            }
        }
    }

    /// A ranged GET for a waiting request, kept for it in `ranges` (at most
    /// about `tier_timeout_ms`). True when the piece is there.
    async fn fetch_range(
        &self,
        ns: &str,
        key: &str,
        id: &str,
        start: u64,
        end_inclusive: u64,
    ) -> bool {
        let started = Instant::now();
        let read = self.client.get_range(ns, key, start, end_inclusive).await;
        let result = match &read {
            Ok(_) => "ok",
            Err(TierError::NotFound) => "not_found",
            Err(TierError::Failed(_)) => "failed",
        };
        self.observe("get_range", result, started.elapsed());
        let Ok(read) = read else {
            return false;
        };
        if read.start != start || read.bytes.is_empty() {
            return false;
        }
        let end = start + read.bytes.len() as u64 - 1;
        let piece = policy::Piece {
            id: id.to_string(),
            start,
            end_inclusive: end,
            total: read.total,
            sha256: read.sha256,
            bytes: read.bytes,
            at: Instant::now(),
        };
        lock(&self.ranges).insert(piece, Instant::now());
        self.count("range");
        true
    }

    fn count(&self, result: &str) {
        self.series.add(
            "sluice_tier_read_through_total",
            format!("result=\"{result}\""),
            1,
        );
    }

    /// One fetch: GET, stream into a store writer with the digest to check,
    /// commit.
    async fn fetch(&self, ns: &str, key: &str) -> Outcome {
        let started = Instant::now();
        let result = match self.client.get(ns, key).await {
            Ok(result) => {
                self.observe("get", "ok", started.elapsed());
                result
            }
            Err(TierError::NotFound) => {
                self.observe("get", "not_found", started.elapsed());
                self.note_health(Ok(()), None);
                return Outcome::NotFound;
            }
            Err(TierError::Failed(why)) => {
                self.observe("get", "failed", started.elapsed());
                self.note_health(Err(&why), None);
                return Outcome::Unavailable;
            }
        };
        self.note_health(Ok(()), None);
        let size = result.meta.size;
        if size > self.settings.body_bytes_max {
            tracing::warn!(
                ns,
                key,
                size,
                "tier object is larger than body_bytes_max; not stored"
            );
            return Outcome::Refused;
        }
        let meta = |name: &'static str| {
            result
                .attributes
                .get(&Attribute::Metadata(name.into()))
                .map(|v| v.as_ref().to_string())
        };
        // `/cas/` is content-addressed: the key is the digest, whatever the
        // object's metadata says. Anything else is checked against the
        // sha256 it was uploaded with, when it carries one.
        let expected_sha256 = if ns == "cas" {
            let mut digest = [0u8; 32];
            if hex::decode_to_slice(key, &mut digest).is_err() {
                return Outcome::Refused;
            }
            Some(digest)
        } else {
            meta(META_SHA256).and_then(|hex_text| {
                let mut digest = [0u8; 32];
                hex::decode_to_slice(hex_text.trim(), &mut digest)
                    .ok()
                    .map(|()| digest)
            })
        };
        let write_time_ms = meta(META_WRITE_TIME_MS)
            .and_then(|t| t.trim().parse::<u64>().ok())
            .or_else(|| u64::try_from(result.meta.last_modified.timestamp_millis()).ok());
        let options = PutOptions {
            expected_len: Some(size),
            expected_sha256,
            body_bytes_max: self.settings.body_bytes_max,
            write_time_ms,
            // A local write or delete (tombstone) newer than the object wins,
            // under the key's lock at commit: a DELETE whose tier delete is
            // still queued is not undone by reading the old object back.
            last_writer_wins: true,
        };
        let kept = match meta(super::client::META_KEPT)
            .map(|v| Meta::from_header_value(v.as_bytes()))
        {
            None => Meta::default(),
            Some(Ok(kept)) => kept,
            Some(Err(err)) => {
                tracing::warn!(ns, key, error = %err, "tier object's sluice-meta is unreadable; not stored");
                return Outcome::Refused;
            }
        };
        let begun =
            tokio::task::block_in_place(|| self.store.begin_put_with(ns, key, options, kept));
        let mut writer = match begun {
            Ok(writer) => writer,
            Err(err) => {
                tracing::warn!(ns, key, error = %err, "cannot store an object read through from the tier");
                return Outcome::Refused;
            }
        };
        let streamed = self
            .client
            .for_each_chunk(result, |chunk| {
                tokio::task::block_in_place(|| writer.write(chunk))
                    .map_err(|e| TierError::Failed(format!("local write: {e}")))
            })
            .await;
        if let Err(err) = streamed {
            // The writer is dropped unpublished: nothing half-read is visible.
            tracing::debug!(ns, key, error = %err, "read-through from the tier broke off");
            return Outcome::Unavailable;
        }
        match tokio::task::block_in_place(|| writer.commit()) {
            Ok(committed) => {
                self.series.add(
                    "sluice_tier_read_through_bytes_total",
                    String::new(),
                    committed.len,
                );
                Outcome::Stored
            }
            Err(err @ (StoreError::DigestMismatch { .. } | StoreError::LengthMismatch { .. })) => {
                tracing::error!(ns, key, error = %err, "object in the tier failed verification; refused, nothing stored");
                Outcome::Refused
            }
            Err(err) => {
                tracing::warn!(ns, key, error = %err, "cannot store an object read through from the tier");
                Outcome::Refused
            }
        }
    }
}

/// 206 from a piece fetched by a ranged read: the bytes are the tier's,
/// served before the whole object is verified (the whole is verified
/// before it is stored); the ETag is the object's recorded digest (for
/// `/cas/` the key).
fn range_reply(ns: &str, key: &str, piece: &policy::Piece, start: u64, end: u64) -> Reply {
    let end = end
        .min(piece.total.saturating_sub(1))
        .min(piece.end_inclusive);
    let from = (start - piece.start) as usize;
    let to = (end - piece.start) as usize + 1;
    let body = piece.bytes.slice(from..to.max(from)).to_vec();
    let mut headers = Vec::new();
    let digest = if ns == "cas" {
        Some(key.to_ascii_lowercase())
    } else {
        piece.sha256.clone()
    };
    if let Some(digest) = digest {
        headers.push(("etag", format!("\"{digest}\"")));
    }
    headers.push(("accept-ranges", "bytes".to_string()));
    headers.push(("content-type", "application/octet-stream".to_string()));
    headers.push((
        "content-range",
        crate::http1::content_range(start, end, piece.total),
    ));
    Reply {
        status: 206,
        headers,
        content_length: Some(body.len() as u64),
        body: crate::exchange::ReplyBody::Bytes(body),
        close: false,
    }
}

/// The answer to a miss the tier could not fill. Not found (or refused as
/// corrupt): 404, as any miss. Tier unavailable: the cache routes (Bazel,
/// Gradle) answer 404 too, because a build treats a miss as "build it" and
/// goes on, while a 5xx makes Gradle turn its remote cache off for the rest
/// of the build; the generic route answers 503 with `Retry-After`, because
/// its clients store data there and must not read "it does not exist" when
/// the truth is "cannot tell now".
pub fn reply_for(kind: ArtifactKind, outcome: Outcome) -> Reply {
    match (outcome, kind) {
        (Outcome::Unavailable, ArtifactKind::Generic) => {
            let mut reply = Reply::error(503, "the object-store tier is unavailable");
            reply
                .headers
                .push(("retry-after", super::RETRY_AFTER_SECS.to_string()));
            reply
        }
        _ => Reply::error(404, "no such artifact"),
    }
}
