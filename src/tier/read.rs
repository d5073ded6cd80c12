//! Read-through: a local miss asks the tier. One fetch per key however many
//! requests wait ([`super::policy::Reads`]); the object is checked (a `/cas/`
//! key is its own digest; any other object against the sha256 it was
//! uploaded with) while it is written to the store, and only a verified one
//! is published. The fetch runs on the tier runtime; a waiting request's
//! thread (a core's opener thread, or a blocking thread of the fallback)
//! waits on a condition variable, never an engine thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::Attribute;

use super::client::{TierError, META_SHA256, META_WRITE_TIME_MS};
use super::policy::{Miss, Outcome};
use super::{lock, Tier};
use crate::app::Reply;
use crate::route::ArtifactKind;
use crate::store::{PutOptions, StoreError};

/// A waiter gives up after this long even if the fetch still makes
/// progress (each piece of the body must come within `tier_timeout_ms`, so
/// a stalled fetch ends much sooner): a guard against waiting for ever.
const WAIT_MS_MAX: u64 = 600_000;

fn id(ns: &str, key: &str) -> String {
    format!("{ns}/{key}")
}

impl Tier {
    /// On a local miss, from the front end's thread: the reply when a recent
    /// fetch already decided it (or the tier is known down), `None` when
    /// the request must wait for a fetch ([`Tier::read_through`], off the
    /// engine thread).
    pub fn answer_miss(&self, kind: ArtifactKind, ns: &str, key: &str) -> Option<Reply> {
        let outcome = lock(&self.reads).peek(&id(ns, key), Instant::now())?;
        Some(reply_for(kind, outcome))
    }

    /// Fetch `ns/key` into the store (or join the fetch already running)
    /// and wait for it. Blocks; never call it on an engine thread.
    pub fn read_through(self: &Arc<Self>, ns: &str, key: &str) -> Outcome {
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
                    tier.reads_done.notify_all();
                });
            }
        }
        let deadline = Instant::now() + Duration::from_millis(WAIT_MS_MAX);
        let mut reads = lock(&self.reads);
        while reads.fetching(&id) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Outcome::Unavailable;
            }
            reads = self
                .reads_done
                .wait_timeout(reads, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        reads.outcome(&id).unwrap_or(Outcome::Unavailable)
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
        };
        let begun = tokio::task::block_in_place(|| self.store.begin_put(ns, key, options));
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
