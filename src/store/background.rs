//! The store's background thread: the startup scan that rebuilds the index,
//! then LRU-style eviction whenever the store is over its limits.

use super::index::{Entry, INDEX_ENTRIES_MAX};
use super::{layout, remove_if_abandoned, Shared};
use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How often the thread re-checks the limits without being woken, ms. A
/// safety net: commits that cross the limit wake it directly.
const IDLE_CHECK_MS: u64 = 10_000;

/// Most eviction candidates gathered per pass over the index. Bounds the
/// pass's memory (about 100 bytes per candidate); a pass that does not free
/// enough is followed by another.
const EVICT_BATCH_MAX: usize = 64 * 1024;

pub(super) fn run(sh: &Shared) {
    let started = Instant::now();
    if scan(sh) {
        sh.accounting_complete.store(true, Ordering::Release);
        tracing::info!(
            entries = sh.index.entries(),
            bytes = sh.index.bytes(),
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "store accounting complete"
        );
    }
    while !sh.stopping() {
        evict_if_needed(sh);
        sh.wait(Duration::from_millis(IDLE_CHECK_MS));
    }
}

/// Milliseconds since the epoch from a stat's seconds and nanoseconds.
pub fn millis(secs: i64, nsecs: i64) -> u64 {
    let ms = secs.saturating_mul(1000).saturating_add(nsecs / 1_000_000);
    u64::try_from(ms).unwrap_or(0)
}

fn entry_from(meta: &std::fs::Metadata) -> Entry {
    Entry {
        size_bytes: meta.len(),
        last_access_ms: millis(meta.atime(), meta.atime_nsec())
            .max(millis(meta.mtime(), meta.mtime_nsec())),
    }
}

fn read_dir_logged(path: &Path) -> Option<std::fs::ReadDir> {
    match std::fs::read_dir(path) {
        Ok(rd) => Some(rd),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "store scan: cannot read directory; skipped");
            None
        }
    }
}

/// Walks `data_dir/{ns}/{xx}/{key}` and adds every artifact the index does
/// not know yet. Returns false if stopped early.
fn scan(sh: &Shared) -> bool {
    let Some(namespaces) = read_dir_logged(&sh.data_dir) else {
        return !sh.stopping();
    };
    for ns_entry in namespaces.flatten() {
        let Ok(ns) = ns_entry.file_name().into_string() else {
            continue;
        };
        // Skips `.tmp` and anything that is not a namespace.
        if !layout::valid_namespace(&ns) || !ns_entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Some(shards) = read_dir_logged(&ns_entry.path()) else {
            continue;
        };
        for shard_entry in shards.flatten() {
            let Ok(shard) = shard_entry.file_name().into_string() else {
                continue;
            };
            let is_shard = shard.len() == 2
                && shard
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
            if !is_shard || !shard_entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if !scan_shard(sh, &ns, &shard) {
                return false;
            }
            // A store restarted over its limit (or with a lowered limit)
            // need not wait for the whole scan to start freeing space.
            evict_if_needed(sh);
        }
    }
    !sh.stopping()
}

fn scan_shard(sh: &Shared, ns: &str, shard: &str) -> bool {
    let dir_rel = format!("{ns}/{shard}");
    let dir_path = sh.path(&dir_rel);
    let Some(files) = read_dir_logged(&dir_path) else {
        return true;
    };
    let dir_fd: Option<OwnedFd> = rustix::fs::openat(
        &sh.data_dir_fd,
        dir_rel.as_str(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok();
    for file in files.flatten() {
        if sh.stopping() {
            return false;
        }
        let Ok(name) = file.file_name().into_string() else {
            continue;
        };
        if name.starts_with(".tmp-") {
            // A crash between linking a finished upload and renaming it.
            if let Some(dir_fd) = &dir_fd {
                if remove_if_abandoned(dir_fd, &name) {
                    tracing::info!(path = %dir_path.join(&name).display(), "removed abandoned temp file");
                }
            }
            continue;
        }
        if layout::key_of_file_name(&name).is_none() || layout::shard_dir(&name) != shard.as_bytes()
        {
            continue; // not ours, or misplaced: never served, never counted
        }
        scan_file(sh, &format!("{dir_rel}/{name}"));
    }
    true
}

fn scan_file(sh: &Shared, rel: &str) {
    let path = sh.path(rel);
    // The stat is made without the lock, so it may race with an unlink; the
    // unlink generation tells, and then it is repeated under the lock.
    let generation = sh.index.unlink_generation(rel);
    let Ok(meta) = std::fs::symlink_metadata(&path) else {
        return;
    };
    if !meta.is_file() {
        return;
    }
    let mut locked = sh.index.lock(rel);
    if locked
        .insert_scanned(rel, entry_from(&meta), generation)
        .is_none()
    {
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if meta.is_file() {
                locked.insert_if_absent(rel, entry_from(&meta));
            }
        }
    }
}

fn over_targets(sh: &Shared) -> bool {
    let max = sh.store_bytes_max;
    let bytes_target = max - max / 10;
    (max != 0 && sh.index.bytes() > bytes_target)
        || sh.index.entries() > INDEX_ENTRIES_MAX - INDEX_ENTRIES_MAX / 10
}

/// If over a limit, evicts least-recently-accessed artifacts until under 90%
/// of it. An artifact read or rewritten after it was picked is spared.
pub(super) fn evict_if_needed(sh: &Shared) {
    if !sh.over_limit() {
        return;
    }
    if sh.index.entries() > INDEX_ENTRIES_MAX {
        tracing::warn!(
            entries = sh.index.entries(),
            entries_max = INDEX_ENTRIES_MAX,
            "store holds more artifacts than the index bound; evicting by count"
        );
    }
    while over_targets(sh) && !sh.stopping() {
        let mut freed_any = false;
        let mut guarded = 0u64;
        for (last_access_ms, rel) in sh.index.oldest(EVICT_BATCH_MAX) {
            if !over_targets(sh) || sh.stopping() {
                return;
            }
            let mut locked = sh.index.lock(&rel);
            if locked.get(&rel).map(|e| e.last_access_ms) != Some(last_access_ms) {
                continue;
            }
            if sh
                .evict_guard
                .get()
                .is_some_and(|may_evict| !may_evict(&rel))
            {
                guarded += 1;
                continue;
            }
            match rustix::fs::unlinkat(&sh.data_dir_fd, &*rel, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {
                    if let Some(old) = locked.remove(&rel) {
                        sh.evictions_total.fetch_add(1, Ordering::Relaxed);
                        sh.evicted_bytes_total
                            .fetch_add(old.size_bytes, Ordering::Relaxed);
                        freed_any = true;
                        tracing::debug!(path = %sh.path(&rel).display(), bytes = old.size_bytes, "evicted");
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %sh.path(&rel).display(), error = %e, "eviction: unlink failed");
                }
            }
        }
        if !freed_any {
            // Every candidate not yet in the object-store tier is expected
            // while the tier is behind: not worth a line per pass.
            if guarded == 0 {
                tracing::warn!(
                    bytes = sh.index.bytes(),
                    "eviction made no progress; retrying later"
                );
            }
            return;
        }
    }
}
