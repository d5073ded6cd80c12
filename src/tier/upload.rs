//! Write-behind: the tier's outbox drained by one upload loop on the tier
//! runtime. The outbox (`data_dir/.tier-outbox`) is the same durable log as
//! peer replication's, with the tier as its one target; the cursor
//! (several entries in flight, completing out of order, a failed one sent
//! again first) and the backoff (2 s doubling to 60 s, jittered, cleared by
//! a success) are replication's sans-IO policies, driven here by the real
//! clock. An entry leaves only when the tier took it, so a kill -9 re-sends
//! at most what was in flight (uploading the same version twice is
//! harmless).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::client::TierError;
use super::{lock, Tier, TARGET, UPLOADS_IN_FLIGHT_MAX};
use crate::delivery::outbox::{Op, Reader, Record};
use crate::delivery::{Backoff, Next, OutboxCursor, Rng};

/// `Retry-After` on a 507 for a full upload queue, seconds.
pub const RETRY_AFTER_FULL_SECS: u64 = 5;
/// How often the cursor is written (re-sending after a crash is harmless,
/// so it is lazy, as replication's).
const PERSIST_EVERY_MS: u64 = 200;

/// How one queued entry went.
#[derive(Debug)]
pub enum Sent {
    /// The tier took it.
    Ok,
    /// Nothing to upload: the artifact is gone locally (deleted since; its
    /// delete is queued after it).
    Gone,
    /// Try again after the backoff.
    Failed(String),
}

/// Upload the current local version of `ns/key`; `limited`: first wait for
/// the replication limiter's tokens for its body (write-behind).
pub async fn upload_put(tier: &Tier, ns: &str, key: &str, limited: bool) -> Sent {
    let opened = tokio::task::block_in_place(|| tier.store.get(ns, key));
    let artifact = match opened {
        Ok(Some(artifact)) => artifact,
        Ok(None) => return Sent::Gone,
        Err(err) => return Sent::Failed(format!("cannot open the artifact: {err}")),
    };
    let write_time_ms = artifact.write_time_ms().unwrap_or(0);
    if let Some(limiter) = tier.limiter.as_ref().filter(|_| limited) {
        let mut waited = false;
        while let Err(until) = limiter.acquire(Instant::now(), artifact.len) {
            waited = true;
            tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
        }
        if waited {
            tier.throttled_bytes
                .fetch_add(artifact.len, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let started = Instant::now();
    // Write-behind goes through the background runtime's own client.
    let client = if limited {
        &tier.upload_client
    } else {
        &tier.client
    };
    let result = client.upload(ns, key, &artifact, write_time_ms).await;
    let took = started.elapsed();
    match result {
        Ok(()) => {
            tier.observe("upload", "ok", took);
            Sent::Ok
        }
        Err(TierError::NotFound) => {
            // S3 answers NoSuchBucket as a 404: the tier is misconfigured,
            // which backoff (and the log) must show, not a skip.
            tier.observe("upload", "not_found", took);
            Sent::Failed("the bucket does not exist".to_string())
        }
        Err(TierError::Failed(why)) => {
            tier.observe("upload", "failed", took);
            Sent::Failed(why)
        }
    }
}

async fn send(tier: Arc<Tier>, record: Record) -> Sent {
    match record.op {
        Op::Put => upload_put(&tier, &record.ns, &record.key, true).await,
        Op::Delete => {
            let started = Instant::now();
            match tier.upload_client.delete(&record.ns, &record.key).await {
                Ok(()) => {
                    tier.observe("delete", "ok", started.elapsed());
                    Sent::Ok
                }
                Err(err) => {
                    tier.observe("delete", "failed", started.elapsed());
                    Sent::Failed(err.to_string())
                }
            }
        }
    }
}

/// While nothing is queued, the tier is asked how it is this often, so
/// `/status` and `sluice_tier_up` tell the truth on an idle node too.
const PROBE_INTERVAL_MS: u64 = 10_000;
/// While the tier is down it is asked this often (a HEAD, cheap), so
/// uploads resume within this of its return instead of after the rest of
/// a backoff window of up to 60 s.
const PROBE_DOWN_INTERVAL_MS: u64 = 2_000;

/// The probe: runs for the life of the process.
pub async fn probe(tier: Arc<Tier>) {
    loop {
        let down = lock(&tier.view).state == "down";
        if down || tier.queue_bytes() == 0 {
            let started = Instant::now();
            let result = tier.client.probe().await;
            let took = started.elapsed();
            match result {
                Ok(()) => {
                    tier.observe("probe", "ok", took);
                    tier.note_health(Ok(()), None);
                    lock(&tier.reads).on_tier_ok();
                    if down {
                        // The upload loop retries at once.
                        tier.recovered
                            .store(true, std::sync::atomic::Ordering::Release);
                        tier.kick.notify_one();
                    }
                }
                Err(err) => {
                    tier.observe("probe", "failed", took);
                    tier.note_health(Err(&err.to_string()), None);
                }
            }
        }
        let every = if lock(&tier.view).state == "down" {
            PROBE_DOWN_INTERVAL_MS
        } else {
            PROBE_INTERVAL_MS
        };
        tokio::time::sleep(Duration::from_millis(every)).await;
    }
}

/// The upload loop: runs for the life of the process.
pub async fn run(tier: Arc<Tier>) {
    let start_at = tier.outbox.mark(TARGET).map_or(0, |m| m.acked);
    let mut cursor = OutboxCursor::at(start_at);
    // Entries are read in order without the outbox's lock (appends hold it
    // through their syncs); those in flight or failed are kept here, so a
    // retry does not read the outbox again.
    let mut reader = Reader::new(&tier.outbox, start_at);
    let mut peeked: Option<(u64, Record, u64)> = None;
    let mut records: BTreeMap<u64, Record> = BTreeMap::new();
    let mut backoff = Backoff::default();
    let mut rng = Rng::new(crate::store::now_ms());
    let mut tasks: JoinSet<(u64, Record, Sent)> = JoinSet::new();
    // Keys with an entry in flight: two entries of one key never overlap, so
    // a delete cannot overtake the upload before it.
    let mut busy: HashSet<(String, String)> = HashSet::new();
    let mut last_persist = Instant::now();
    let mut read_error_logged = false;
    loop {
        let now = Instant::now();
        if tier
            .recovered
            .swap(false, std::sync::atomic::Ordering::AcqRel)
            && backoff.failures() > 0
        {
            // The probe found the tier answering: no need to sit out the
            // rest of the window.
            backoff.on_success();
        }
        let window = if backoff.failures() == 0 {
            UPLOADS_IN_FLIGHT_MAX
        } else {
            1
        };
        if backoff.ready(now) {
            while let Some(next) = cursor.next(u64::MAX, window) {
                let found = match next {
                    Next::Again { start, end } => match records.get(&start) {
                        Some(record) => Ok(Some((start, record.clone(), end))),
                        None => tier
                            .outbox
                            .read_at(start)
                            .map(|r| r.map(|(r, e)| (start, r, e))),
                    },
                    Next::New { start } => match peeked.take() {
                        Some(p) if p.0 == start => Ok(Some(p)),
                        _ => {
                            reader.seek(start);
                            reader.next(&tier.outbox)
                        }
                    },
                };
                let (start, record, end) = match found {
                    Ok(Some(found)) => found,
                    Ok(None) => break,
                    Err(err) => {
                        if !read_error_logged {
                            tracing::error!(error = %err, "tier outbox: cannot read an entry; retrying");
                            read_error_logged = true;
                        }
                        // Read it again next time round.
                        reader.seek(cursor.read_pos());
                        break;
                    }
                };
                read_error_logged = false;
                let id = (record.ns.clone(), record.key.clone());
                if !records.contains_key(&start) && busy.contains(&id) {
                    // After the entry in flight for this key is answered.
                    peeked = Some((start, record, end));
                    break;
                }
                busy.insert(id);
                cursor.on_sent(start, end, record.owed());
                records.insert(start, record.clone());
                let t = Arc::clone(&tier);
                tasks.spawn(async move {
                    let sent = send(t, record.clone()).await;
                    (start, record, sent)
                });
            }
        }
        {
            // What the tier lacks, in one piece with the loop's position
            // (`Tier::lag` adds the queue from there on).
            let mut view = lock(&tier.view);
            view.uploads_in_flight = tasks.len();
            view.read_pos = cursor.read_pos();
            view.pending = cursor.pending();
            view.acked = cursor.acked();
        }
        let wait = backoff
            .until()
            .map_or(Duration::from_millis(PERSIST_EVERY_MS), |t| {
                t.saturating_duration_since(now)
                    .min(Duration::from_millis(PERSIST_EVERY_MS))
            });
        tokio::select! {
            _ = tier.kick.notified() => {}
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok((start, record, sent)) = joined {
                    busy.remove(&(record.ns.clone(), record.key.clone()));
                    match sent {
                        Sent::Ok | Sent::Gone => {
                            cursor.on_ack(start);
                            records.remove(&start);
                            if record.op == Op::Put {
                                tier.release(&crate::store::relative_path(&record.ns, &record.key));
                            }
                            if backoff.failures() > 0 || lock(&tier.view).state != "up" {
                                tier.note_health(Ok(()), None);
                            }
                            backoff.on_success();
                            lock(&tier.reads).on_tier_ok();
                        }
                        Sent::Failed(why) => {
                            cursor.on_fail(start);
                            let until = backoff.on_failure(Instant::now(), &mut rng);
                            tier.note_health(Err(&why), Some(until.saturating_duration_since(Instant::now())));
                        }
                    }
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
        // Every PERSIST_EVERY_MS, not per upload: the outbox's lock is held
        // through append syncs.
        if last_persist.elapsed() >= Duration::from_millis(PERSIST_EVERY_MS) {
            last_persist = Instant::now();
            tier.outbox.set_acked(TARGET, cursor.acked());
            if let Err(err) = tier.outbox.persist() {
                tracing::warn!(error = %err, "tier outbox: cannot write the cursor");
            }
        }
    }
}
