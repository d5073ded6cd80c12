//! Anti-entropy summaries: what a node holds, in 4,096 buckets.
//!
//! An artifact `(ns, key)` falls in bucket `sha256(ns/key) mod 4096`; a
//! bucket's digest is the XOR of `sha256(ns/key, write_time, sha256)` over
//! its artifacts, so it is computed in one pass over the data directory in
//! fixed memory (128 KiB), whatever the number of artifacts. Two nodes
//! compare digests and walk only the buckets that differ.
//!
//! Walking the data directory reads every artifact's 64-byte header: that
//! is disk work, so it never runs on an engine thread. The peer API answers
//! from [`Cache`], which the anti-entropy thread fills.

use std::collections::{BTreeSet, HashMap};
use std::fs::DirEntry;
use std::io::{self, Read as _};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::store::format::{decode_header, HEADER_BYTES};
use crate::store::{key_of_file_name, valid_key, valid_namespace};

/// Buckets in a summary.
pub const BUCKETS: usize = 4096;
/// Buckets one listing query may ask for (bounds the answer and the URI).
pub const QUERY_BUCKETS_MAX: usize = 256;
/// Entries one listing answer carries at most; a larger one is cut and the
/// next anti-entropy run continues.
pub const LISTING_ENTRIES_MAX: usize = 100_000;
/// How long a computed answer is served from the cache.
pub const CACHE_FRESH: Duration = Duration::from_secs(5);
/// Answers and pending queries the cache keeps.
const CACHE_SLOTS_MAX: usize = 8;

/// One artifact (or one delete) as a summary sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub ns: String,
    pub key: String,
    /// The write time, or for a delete its time.
    pub write_time_ms: u64,
    /// Zero for a delete.
    pub sha256: [u8; 32],
    /// Zero for a delete.
    pub len: u64,
    /// A tombstone: the key was deleted at `write_time_ms`.
    pub deleted: bool,
}

impl Entry {
    /// Last-writer-wins order: the later time wins; at the same time a
    /// delete wins over a write, then the greater digest.
    pub fn version(&self) -> (u64, bool, [u8; 32]) {
        (self.write_time_ms, self.deleted, self.sha256)
    }
}

pub fn bucket_of(ns: &str, key: &str) -> usize {
    let mut h = Sha256::new();
    h.update(ns.as_bytes());
    h.update(b"/");
    h.update(key.as_bytes());
    let d = h.finalize();
    (usize::from(d[0]) << 8 | usize::from(d[1])) % BUCKETS
}

fn entry_digest(e: &Entry) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(e.ns.as_bytes());
    h.update(b"/");
    h.update(e.key.as_bytes());
    h.update([0]);
    h.update(e.write_time_ms.to_le_bytes());
    h.update(e.sha256);
    h.update([u8::from(e.deleted)]);
    h.finalize().into()
}

/// Visit every artifact under `data_dir` (valid names, valid headers) and
/// every tombstone, merged by last-writer-wins: a key with both is visited
/// once, as whichever is newer. Memory: one map entry per tombstone (they
/// live `tombstone_retention_ms`), none per artifact.
pub fn walk(data_dir: &Path, mut visit: impl FnMut(Entry)) -> io::Result<()> {
    let mut tombstones: HashMap<(String, String), u64> = HashMap::new();
    let tomb_root = data_dir.join(crate::store::TOMBSTONE_DIR);
    if tomb_root.is_dir() {
        walk_files(&tomb_root, |ns, key, file| {
            if let Ok(meta) = file.metadata() {
                let t = crate::store::background_millis(meta.mtime(), meta.mtime_nsec());
                tombstones.insert((ns.to_string(), key), t);
            }
        })?;
    }
    walk_files(data_dir, |ns, key, file| {
        let Ok(mut f) = std::fs::File::open(file.path()) else {
            return;
        };
        let mut head = [0u8; HEADER_BYTES];
        if f.read_exact(&mut head).is_err() {
            return;
        }
        let Ok(header) = decode_header(&head) else {
            return;
        };
        let Ok(meta) = f.metadata() else { return };
        let write_time_ms = crate::store::background_millis(meta.mtime(), meta.mtime_nsec());
        let id = (ns.to_string(), key);
        if let Some(&deleted_at) = tombstones.get(&id) {
            if deleted_at >= write_time_ms {
                return; // deleted after this write: the tombstone stands
            }
            tombstones.remove(&id);
        }
        visit(Entry {
            ns: id.0,
            key: id.1,
            write_time_ms,
            sha256: header.sha256,
            len: header.body_len,
            deleted: false,
        });
    })?;
    for ((ns, key), write_time_ms) in tombstones {
        visit(Entry {
            ns,
            key,
            write_time_ms,
            sha256: [0; 32],
            len: 0,
            deleted: true,
        });
    }
    Ok(())
}

/// Every `{root}/{ns}/{xx}/{file}` with a valid namespace and a file name
/// that stands for a valid key.
fn walk_files(root: &Path, mut visit: impl FnMut(&str, String, &DirEntry)) -> io::Result<()> {
    for ns_entry in std::fs::read_dir(root)?.flatten() {
        let Ok(ns) = ns_entry.file_name().into_string() else {
            continue;
        };
        if !valid_namespace(&ns) || !ns_entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(shards) = std::fs::read_dir(ns_entry.path()) else {
            continue;
        };
        for shard in shards.flatten() {
            let Ok(files) = std::fs::read_dir(shard.path()) else {
                continue;
            };
            for file in files.flatten() {
                let Some(key) = file.file_name().to_str().and_then(key_of_file_name) else {
                    continue;
                };
                visit(&ns, key, &file);
            }
        }
    }
    Ok(())
}

/// The bucket digests of `data_dir`.
pub fn compute(data_dir: &Path) -> io::Result<Vec<[u8; 32]>> {
    let mut buckets = vec![[0u8; 32]; BUCKETS];
    walk(data_dir, |e| {
        let d = entry_digest(&e);
        let b = &mut buckets[bucket_of(&e.ns, &e.key)];
        for (x, y) in b.iter_mut().zip(d) {
            *x ^= y;
        }
    })?;
    Ok(buckets)
}

/// The entries of `buckets` in `data_dir` (at most [`LISTING_ENTRIES_MAX`]).
pub fn list(data_dir: &Path, buckets: &BTreeSet<usize>) -> io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    walk(data_dir, |e| {
        if out.len() < LISTING_ENTRIES_MAX && buckets.contains(&bucket_of(&e.ns, &e.key)) {
            out.push(e);
        }
    })?;
    out.sort();
    Ok(out)
}

pub fn encode_summary(buckets: &[[u8; 32]]) -> Vec<u8> {
    buckets.iter().flatten().copied().collect()
}

pub fn decode_summary(bytes: &[u8]) -> Option<Vec<[u8; 32]>> {
    if bytes.len() != BUCKETS * 32 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(32)
            .map(|c| {
                let mut b = [0u8; 32];
                b.copy_from_slice(c);
                b
            })
            .collect(),
    )
}

pub fn encode_listing(entries: &[Entry]) -> Vec<u8> {
    let mut out = String::new();
    for e in entries {
        // A tombstone's digest is `-`.
        let sha = if e.deleted {
            "-".to_string()
        } else {
            hex::encode(e.sha256)
        };
        out.push_str(&format!(
            "{} {} {} {} {}\n",
            e.ns, e.key, e.write_time_ms, sha, e.len
        ));
    }
    out.into_bytes()
}

pub fn decode_listing(bytes: &[u8]) -> Option<Vec<Entry>> {
    let text = std::str::from_utf8(bytes).ok()?;
    text.lines()
        .map(|line| {
            let mut it = line.split(' ');
            let ns = it.next()?.to_string();
            let key = it.next()?.to_string();
            let write_time_ms = it.next()?.parse().ok()?;
            let mut sha256 = [0u8; 32];
            let sha = it.next()?;
            let deleted = sha == "-";
            if !deleted {
                hex::decode_to_slice(sha, &mut sha256).ok()?;
            }
            let len = it.next()?.parse().ok()?;
            if it.next().is_some() || !valid_namespace(&ns) || !valid_key(&key) {
                return None;
            }
            Some(Entry {
                ns,
                key,
                write_time_ms,
                sha256,
                len,
                deleted,
            })
        })
        .collect()
}

/// A question a peer asks of this node's holdings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    Summary,
    Buckets(Vec<u16>),
}

type Ready = (Query, Instant, Arc<Vec<u8>>);

/// Answers computed off the engine threads, for the peer API.
pub struct Cache {
    data_dir: PathBuf,
    inner: Mutex<(Vec<Ready>, Vec<Query>)>,
}

impl Cache {
    pub fn new(data_dir: PathBuf) -> Cache {
        Cache {
            data_dir,
            inner: Mutex::new((Vec::new(), Vec::new())),
        }
    }

    /// The answer if fresh; otherwise queue the query (bounded) and `None`.
    pub fn get_or_request(&self, q: &Query) -> Option<Arc<Vec<u8>>> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        inner
            .0
            .retain(|(_, at, _)| now.duration_since(*at) < CACHE_FRESH);
        if let Some((_, _, body)) = inner.0.iter().find(|(query, _, _)| query == q) {
            return Some(Arc::clone(body));
        }
        if !inner.1.contains(q) && inner.1.len() < CACHE_SLOTS_MAX {
            inner.1.push(q.clone());
        }
        None
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn has_pending(&self) -> bool {
        !self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .is_empty()
    }

    /// Compute every queued query (on the anti-entropy thread).
    pub fn serve_pending(&self) {
        let pending =
            std::mem::take(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner).1);
        for q in pending {
            let body = match &q {
                Query::Summary => compute(&self.data_dir).map(|s| encode_summary(&s)),
                Query::Buckets(b) => {
                    let set = b.iter().map(|&b| usize::from(b)).collect();
                    list(&self.data_dir, &set).map(|l| encode_listing(&l))
                }
            };
            match body {
                Ok(body) => {
                    let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
                    if inner.0.len() >= CACHE_SLOTS_MAX {
                        inner.0.remove(0);
                    }
                    inner.0.push((q, Instant::now(), Arc::new(body)));
                }
                Err(err) => {
                    tracing::warn!(error = %err, "anti-entropy: cannot walk the data directory")
                }
            }
        }
    }
}

/// Entries `ours` holds that `theirs` lacks or holds older (by
/// [`Entry::version`]; CAS only when missing). A tombstone of ours is sent
/// only where they hold an older version of the key (a delete of
/// something they never had changes nothing).
pub fn to_repair(ours: &[Entry], theirs: &[Entry]) -> Vec<Entry> {
    let theirs: HashMap<(&str, &str), &Entry> = theirs
        .iter()
        .map(|e| ((e.ns.as_str(), e.key.as_str()), e))
        .collect();
    ours.iter()
        .filter(|e| match theirs.get(&(e.ns.as_str(), e.key.as_str())) {
            None => !e.deleted,
            Some(_) if e.ns == "cas" => false,
            Some(t) => !(e.deleted && t.deleted) && e.version() > t.version(),
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(ns: &str, key: &str, t: u64, s: u8) -> Entry {
        Entry {
            ns: ns.into(),
            key: key.into(),
            write_time_ms: t,
            sha256: [s; 32],
            len: 1,
            deleted: false,
        }
    }

    fn tomb(ns: &str, key: &str, t: u64) -> Entry {
        Entry {
            ns: ns.into(),
            key: key.into(),
            write_time_ms: t,
            sha256: [0; 32],
            len: 0,
            deleted: true,
        }
    }

    #[test]
    fn tombstones_repair_by_last_writer_wins() {
        let ours = vec![
            tomb("g", "gone", 10),     // they hold it older: send the delete
            tomb("g", "never", 10),    // they never had it: nothing to send
            tomb("g", "rewritten", 5), // they wrote it again later: theirs wins
            tomb("g", "same", 7),      // they hold the same tombstone
            tomb("g", "tie", 8),       // a delete beats a write at the same ms
        ];
        let theirs = vec![
            e("g", "gone", 9, 1),
            e("g", "rewritten", 6, 1),
            tomb("g", "same", 7),
            e("g", "tie", 8, 0xff),
        ];
        let repairs = to_repair(&ours, &theirs);
        let got: Vec<&str> = repairs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(got, vec!["gone", "tie"]);
        // And the other way: a live artifact newer than their tombstone goes.
        let back = to_repair(&[e("g", "rewritten", 6, 1)], &[tomb("g", "rewritten", 5)]);
        assert_eq!(back.len(), 1);
        assert!(!back[0].deleted);
        let listing = vec![e("g", "a/b", 5, 1), tomb("g", "x", 7)];
        assert_eq!(decode_listing(&encode_listing(&listing)).unwrap(), listing);
        // A listing naming a bad key or carrying extra fields is malformed.
        assert!(decode_listing(b"g ../x 1 - 0\n").is_none());
        assert!(decode_listing(b"g x 1 - 0 extra\n").is_none());
    }

    /// The walk sees multi-segment keys (stored as `~`-joined file names)
    /// and merges tombstones with artifacts by time.
    #[test]
    fn walk_merges_tombstones_and_reads_multi_segment_keys() {
        use crate::store::{FsyncPolicy, PutOptions, Store, StoreConfig};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig {
            data_dir: dir.path().to_path_buf(),
            store_bytes_max: 0,
            fsync: FsyncPolicy::Never,
        })
        .unwrap();
        let put = |key: &str, t: u64| {
            let mut w = store
                .begin_put(
                    "g",
                    key,
                    PutOptions {
                        write_time_ms: Some(t),
                        ..Default::default()
                    },
                )
                .unwrap();
            w.write(key.as_bytes()).unwrap();
            w.commit().unwrap()
        };
        put("fe/a5c6ltr4", 1_000);
        put("deleted", 1_000);
        put("kept", 3_000);
        store.delete_at("g", "deleted", 2_000, false).unwrap();
        assert_eq!(
            store.delete_at("g", "kept", 2_000, false).unwrap(),
            crate::store::DeleteAt::Kept
        );
        let mut seen = Vec::new();
        walk(dir.path(), |e| seen.push(e)).unwrap();
        seen.sort();
        let got: Vec<(&str, u64, bool)> = seen
            .iter()
            .map(|e| (e.key.as_str(), e.write_time_ms, e.deleted))
            .collect();
        assert_eq!(
            got,
            vec![
                ("deleted", 2_000, true),
                ("fe/a5c6ltr4", 1_000, false),
                ("kept", 3_000, false)
            ]
        );
        store.shutdown();
    }

    #[test]
    fn repairs_send_missing_and_newer_only() {
        let ours = vec![
            e("a", "k1", 5, 1),
            e("a", "k2", 5, 1),
            e("a", "k3", 5, 1),
            e("cas", "x", 9, 1),
        ];
        let theirs = vec![e("a", "k2", 6, 1), e("a", "k3", 4, 1), e("cas", "x", 1, 2)];
        let repairs = to_repair(&ours, &theirs);
        let got: Vec<&str> = repairs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(got, vec!["k1", "k3"]);
        let listing = vec![e("a", "k1", 5, 1), e("b", "k.2", 7, 3)];
        assert_eq!(decode_listing(&encode_listing(&listing)).unwrap(), listing);
        let s = vec![[7u8; 32]; BUCKETS];
        assert_eq!(decode_summary(&encode_summary(&s)).unwrap(), s);
        assert!(bucket_of("a", "b") < BUCKETS);
    }
}
