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

use std::collections::BTreeSet;
use std::io::{self, Read as _};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::store::format::{decode_header, HEADER_BYTES};
use crate::store::{valid_key, valid_namespace};

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

/// One artifact as a summary sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub ns: String,
    pub key: String,
    pub write_time_ms: u64,
    pub sha256: [u8; 32],
    pub len: u64,
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
    h.finalize().into()
}

/// Visit every artifact under `data_dir` (valid names, valid headers).
pub fn walk(data_dir: &Path, mut visit: impl FnMut(Entry)) -> io::Result<()> {
    for ns_entry in std::fs::read_dir(data_dir)?.flatten() {
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
                let Ok(key) = file.file_name().into_string() else {
                    continue;
                };
                if !valid_key(&key) {
                    continue;
                }
                let Ok(mut f) = std::fs::File::open(file.path()) else {
                    continue;
                };
                let mut head = [0u8; HEADER_BYTES];
                if f.read_exact(&mut head).is_err() {
                    continue;
                }
                let Ok(header) = decode_header(&head) else {
                    continue;
                };
                let Ok(meta) = f.metadata() else { continue };
                visit(Entry {
                    ns: ns.clone(),
                    key,
                    write_time_ms: crate::store::background_millis(meta.mtime(), meta.mtime_nsec()),
                    sha256: header.sha256,
                    len: header.body_len,
                });
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
        out.push_str(&format!(
            "{} {} {} {} {}\n",
            e.ns,
            e.key,
            e.write_time_ms,
            hex::encode(e.sha256),
            e.len
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
            hex::decode_to_slice(it.next()?, &mut sha256).ok()?;
            let len = it.next()?.parse().ok()?;
            Some(Entry {
                ns,
                key,
                write_time_ms,
                sha256,
                len,
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
/// `(write_time, sha256)`; CAS only when missing). Both sorted.
pub fn to_repair(ours: &[Entry], theirs: &[Entry]) -> Vec<Entry> {
    let theirs: std::collections::HashMap<(&str, &str), &Entry> = theirs
        .iter()
        .map(|e| ((e.ns.as_str(), e.key.as_str()), e))
        .collect();
    ours.iter()
        .filter(|e| match theirs.get(&(e.ns.as_str(), e.key.as_str())) {
            None => true,
            Some(_) if e.ns == "cas" => false,
            Some(t) => (e.write_time_ms, e.sha256) > (t.write_time_ms, t.sha256),
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
        }
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
