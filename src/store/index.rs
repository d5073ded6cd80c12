//! The in-memory accounting index: size and last access of every artifact.
//!
//! Sharded so that the hot paths (a GET recording its access, a commit) take
//! one of [`SHARDS`] small locks, never a global one. Every change to the
//! filesystem namespace of an artifact (publish by rename, unlink) happens
//! while its shard is locked, which is what keeps the index and the disk in
//! agreement when the background scan, GETs, commits, deletes and eviction
//! race on one key.
//!
//! Memory: one entry is the relative path `ns/xx/key` as a `Box<str>` (16 bytes
//! plus the string's heap block: about 80 bytes for a 64-hex key), 16 bytes of
//! [`Entry`], and about 2 bytes of hash-table control and slack per slot:
//! roughly 120 bytes per artifact, so the [`INDEX_ENTRIES_MAX`] default of
//! 4 Mi entries bounds the index near 500 MiB.

use std::collections::hash_map::RandomState;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Number of lock shards. A power of two well above the core count, so two
/// cores rarely contend.
pub const SHARDS: usize = 64;

/// Most artifacts the store keeps (2^22 = 4,194,304). Past this the
/// background thread evicts least-recently-used artifacts, as it does for the
/// byte limit, which is what bounds the index's memory (about 120 bytes per
/// entry, see the module docs). It applies even when the byte limit is 0.
pub const INDEX_ENTRIES_MAX: u64 = 1 << 22;

/// What the index knows about one artifact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Size of the whole file (header + body), bytes.
    pub size_bytes: u64,
    /// Last access (publish or GET) in milliseconds since the Unix epoch; for
    /// files found by the startup scan, the later of their atime and mtime.
    pub last_access_ms: u64,
}

struct Shard {
    map: Mutex<HashMap<Box<str>, Entry>>,
    /// Bumped (under the lock) on every unlink of a name in this shard, so the
    /// scan can tell whether a `stat` it made without the lock may be stale.
    unlinks: AtomicU64,
    /// Bumped (under the lock, after the rename or unlink) whenever a name in
    /// this shard may point at a different file: per-core open-file caches
    /// compare it to tell whether a cached fd is still the artifact.
    changes: AtomicU64,
}

/// The sharded index plus the totals it maintains.
pub struct Index {
    shards: Box<[Shard]>,
    hasher: RandomState,
    bytes: AtomicU64,
    entries: AtomicU64,
    /// The hot set, told under the shard lock about every name that changes (see
    /// [`super::hot`]): every publish and unlink goes through [`Locked::upsert`] or
    /// [`Locked::remove`], so no path can change an artifact and leave its old body hot.
    pub hot: super::hot::HotSet,
}

impl Default for Index {
    fn default() -> Self {
        Self::new()
    }
}

impl Index {
    pub fn new() -> Self {
        let shards = (0..SHARDS)
            .map(|_| Shard {
                map: Mutex::new(HashMap::new()),
                unlinks: AtomicU64::new(0),
                changes: AtomicU64::new(0),
            })
            .collect();
        Self {
            shards,
            // SipHash with a random key: keys come from request URLs, so a
            // predictable hash would let a client aim at one shard or bucket.
            hasher: RandomState::new(),
            bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            hot: super::hot::HotSet::new(),
        }
    }

    fn shard(&self, rel: &str) -> &Shard {
        let h = self.hasher.hash_one(rel);
        &self.shards[(h as usize) % SHARDS]
    }

    /// Locks the shard that holds `rel`.
    pub fn lock(&self, rel: &str) -> Locked<'_> {
        let shard = self.shard(rel);
        Locked {
            map: shard.map.lock().unwrap_or_else(PoisonError::into_inner),
            shard,
            index: self,
        }
    }

    /// The change epoch of `rel`'s shard: it moves after every publish or
    /// unlink of a name in the shard (see `Shard::changes`).
    pub fn change_epoch(&self, rel: &str) -> u64 {
        self.shard(rel).changes.load(Ordering::Acquire)
    }

    /// The unlink generation of `rel`'s shard; see [`Locked::insert_scanned`].
    pub fn unlink_generation(&self, rel: &str) -> u64 {
        self.shard(rel).unlinks.load(Ordering::Acquire)
    }

    /// Sum of `size_bytes` over all entries.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Number of entries.
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    /// The up to `count_max` least recently accessed entries, oldest first.
    /// Memory is bounded by `count_max`, whatever the index size; shards are
    /// locked one at a time.
    pub fn oldest(&self, count_max: usize) -> Vec<(u64, Box<str>)> {
        let mut heap: BinaryHeap<(u64, Box<str>)> = BinaryHeap::with_capacity(count_max + 1);
        if count_max == 0 {
            return Vec::new();
        }
        for shard in self.shards.iter() {
            let map = shard.map.lock().unwrap_or_else(PoisonError::into_inner);
            for (rel, entry) in map.iter() {
                let newer_than_all = heap.len() >= count_max
                    && heap
                        .peek()
                        .is_some_and(|(top, _)| entry.last_access_ms >= *top);
                if newer_than_all {
                    continue;
                }
                heap.push((entry.last_access_ms, rel.clone()));
                if heap.len() > count_max {
                    heap.pop();
                }
            }
        }
        heap.into_sorted_vec()
    }
}

/// One locked shard. Every mutation keeps the global totals in step.
pub struct Locked<'a> {
    map: MutexGuard<'a, HashMap<Box<str>, Entry>>,
    shard: &'a Shard,
    index: &'a Index,
}

impl Locked<'_> {
    pub fn get(&self, rel: &str) -> Option<Entry> {
        self.map.get(rel).copied()
    }

    /// Records a publish: the new file replaces whatever the index had,
    /// which is returned.
    pub fn upsert(&mut self, rel: &str, entry: Entry) -> Option<Entry> {
        self.shard.changes.fetch_add(1, Ordering::Release);
        self.index.hot.invalidate(rel);
        match self.map.get_mut(rel) {
            Some(old) => {
                self.index
                    .bytes
                    .fetch_sub(old.size_bytes, Ordering::Relaxed);
                self.index
                    .bytes
                    .fetch_add(entry.size_bytes, Ordering::Relaxed);
                Some(std::mem::replace(old, entry))
            }
            None => {
                self.map.insert(rel.into(), entry);
                self.index
                    .bytes
                    .fetch_add(entry.size_bytes, Ordering::Relaxed);
                self.index.entries.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Records a read. Returns false when the entry is unknown (the startup
    /// scan has not reached it yet); the caller then decides whether to add it.
    pub fn touch(&mut self, rel: &str, now_ms: u64) -> bool {
        match self.map.get_mut(rel) {
            Some(e) => {
                e.last_access_ms = e.last_access_ms.max(now_ms);
                true
            }
            None => false,
        }
    }

    /// Adds an entry only if the key is unknown: whoever recorded it first (a
    /// commit or a GET during the scan) knows better than an older `stat`.
    /// Returns whether it was added.
    pub fn insert_if_absent(&mut self, rel: &str, entry: Entry) -> bool {
        if self.map.contains_key(rel) {
            return false;
        }
        self.upsert(rel, entry);
        true
    }

    /// Adds an entry found by the scan, whose `stat` was made at unlink
    /// generation `generation` without the lock. If a name in this shard was
    /// unlinked since, the `stat` may describe a deleted file; returns false
    /// and the caller re-checks under the lock.
    pub fn insert_scanned(&mut self, rel: &str, entry: Entry, generation: u64) -> Option<bool> {
        if self.shard.unlinks.load(Ordering::Acquire) != generation {
            return None;
        }
        Some(self.insert_if_absent(rel, entry))
    }

    /// Records that the name `rel` was unlinked (delete, eviction, corrupt
    /// file). Call after the unlink, before releasing the lock.
    pub fn remove(&mut self, rel: &str) -> Option<Entry> {
        self.shard.unlinks.fetch_add(1, Ordering::Release);
        self.shard.changes.fetch_add(1, Ordering::Release);
        self.index.hot.invalidate(rel);
        let old = self.map.remove(rel)?;
        self.index
            .bytes
            .fetch_sub(old.size_bytes, Ordering::Relaxed);
        self.index.entries.fetch_sub(1, Ordering::Relaxed);
        Some(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(size_bytes: u64, last_access_ms: u64) -> Entry {
        Entry {
            size_bytes,
            last_access_ms,
        }
    }

    #[test]
    fn totals_follow_mutations() {
        let index = Index::new();
        index.lock("a/00/a").upsert("a/00/a", e(100, 1));
        index.lock("a/00/b").upsert("a/00/b", e(50, 2));
        assert_eq!((index.bytes(), index.entries()), (150, 2));
        index.lock("a/00/a").upsert("a/00/a", e(10, 3));
        assert_eq!((index.bytes(), index.entries()), (60, 2));
        assert!(!index.lock("a/00/b").insert_if_absent("a/00/b", e(999, 0)));
        assert!(index.lock("a/00/c").insert_if_absent("a/00/c", e(5, 0)));
        assert_eq!((index.bytes(), index.entries()), (65, 3));
        assert_eq!(index.lock("a/00/a").remove("a/00/a"), Some(e(10, 3)));
        assert_eq!(index.lock("a/00/a").remove("a/00/a"), None);
        assert_eq!((index.bytes(), index.entries()), (55, 2));
    }

    #[test]
    fn scanned_insert_yields_to_unlinks() {
        let index = Index::new();
        let generation = index.unlink_generation("n/00/k");
        index.lock("n/00/k").remove("n/00/k");
        assert_eq!(
            index
                .lock("n/00/k")
                .insert_scanned("n/00/k", e(1, 1), generation),
            None
        );
        let generation = index.unlink_generation("n/00/k");
        assert_eq!(
            index
                .lock("n/00/k")
                .insert_scanned("n/00/k", e(1, 1), generation),
            Some(true)
        );
        assert_eq!(index.entries(), 1);
    }

    #[test]
    fn oldest_is_bounded_and_sorted() {
        let index = Index::new();
        for i in 0..100u64 {
            let rel = format!("n/00/{i}");
            // Access times in a scrambled order.
            index.lock(&rel).upsert(&rel, e(1, (i * 37) % 100));
        }
        let oldest = index.oldest(5);
        let times: Vec<u64> = oldest.iter().map(|(t, _)| *t).collect();
        assert_eq!(times, vec![0, 1, 2, 3, 4]);
        assert_eq!(&*oldest[0].1, "n/00/0");
        assert!(index.oldest(0).is_empty());
        assert_eq!(index.oldest(1000).len(), 100);
    }
}
