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
//!
//! Listings are pages: the entries of a set of buckets in `(ns, key)`
//! order after a given key, at most [`LISTING_ENTRIES_MAX`] of them, kept in
//! a bounded heap while the directory is walked. So a listing costs the
//! same memory whatever the store holds, and a comparison walks two sorted
//! pages side by side ([`Pages`]).

use std::collections::{BTreeSet, BinaryHeap, HashMap};
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
/// Buckets one listing query may ask for (bounds the URI).
pub const QUERY_BUCKETS_MAX: usize = 256;
/// Entries one listing page carries at most (about 400 KiB of text); the
/// next page starts after its last key.
pub const LISTING_ENTRIES_MAX: usize = 4096;
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
/// once, as whichever is newer. Tombstones mirror the data's layout
/// (`.tombstones/{ns}/{xx}/{file}` beside `{ns}/{xx}/{file}`), so the walk
/// goes shard by shard and holds only one shard's tombstones at a time
/// (they live `tombstone_retention_ms`, a week by default: a store that
/// deletes 20 a second keeps over a million, and a map of all of them made
/// every comparison of the hour-long soak allocate megabytes). None per
/// artifact. Returns the most tombstones it held at once.
pub fn walk(data_dir: &Path, mut visit: impl FnMut(Entry)) -> io::Result<usize> {
    let tomb_root = data_dir.join(crate::store::TOMBSTONE_DIR);
    let mut held_max = 0;
    // The first read of the data directory fails as it always has when the
    // directory is missing; the tombstones' tree may be absent.
    let mut namespaces = names_of(data_dir, valid_namespace)?;
    namespaces.extend(names_of(&tomb_root, valid_namespace).unwrap_or_default());
    for ns in &namespaces {
        let (data_ns, tomb_ns) = (data_dir.join(ns), tomb_root.join(ns));
        let mut shards = names_of(&data_ns, |_| true).unwrap_or_default();
        shards.extend(names_of(&tomb_ns, |_| true).unwrap_or_default());
        for shard in &shards {
            let mut tombstones: HashMap<String, u64> = HashMap::new();
            each_file(&tomb_ns.join(shard), |key, file| {
                if let Ok(meta) = file.metadata() {
                    let t = crate::store::background_millis(meta.mtime(), meta.mtime_nsec());
                    tombstones.insert(key, t);
                }
            });
            held_max = held_max.max(tombstones.len());
            each_file(&data_ns.join(shard), |key, file| {
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
                let write_time_ms =
                    crate::store::background_millis(meta.mtime(), meta.mtime_nsec());
                if let Some(&deleted_at) = tombstones.get(&key) {
                    if deleted_at >= write_time_ms {
                        return; // deleted after this write: the tombstone stands
                    }
                    tombstones.remove(&key);
                }
                visit(Entry {
                    ns: ns.clone(),
                    key,
                    write_time_ms,
                    sha256: header.sha256,
                    len: header.body_len,
                    deleted: false,
                });
            });
            for (key, write_time_ms) in tombstones {
                visit(Entry {
                    ns: ns.clone(),
                    key,
                    write_time_ms,
                    sha256: [0; 32],
                    len: 0,
                    deleted: true,
                });
            }
        }
    }
    Ok(held_max)
}

/// The names in `dir` that `keep` accepts, sorted (a directory holds 256
/// shards or a few namespaces: small).
fn names_of(dir: &Path, keep: impl Fn(&str) -> bool) -> io::Result<BTreeSet<String>> {
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| keep(name))
        .collect())
}

/// Every file in the shard directory `dir` whose name stands for a valid
/// key (none when it does not exist).
fn each_file(dir: &Path, mut visit: impl FnMut(String, &DirEntry)) {
    let Ok(files) = std::fs::read_dir(dir) else {
        return;
    };
    for file in files.flatten() {
        let Some(key) = file.file_name().to_str().and_then(key_of_file_name) else {
            continue;
        };
        visit(key, &file);
    }
}

/// The bucket digests of `data_dir`.
pub fn compute(data_dir: &Path) -> io::Result<Vec<[u8; 32]>> {
    Ok(compute_counted(data_dir)?.0)
}

/// The bucket digests of `data_dir` and how many entries fall in each
/// (what a comparison sizes its pieces by).
pub fn compute_counted(data_dir: &Path) -> io::Result<(Vec<[u8; 32]>, Vec<u32>)> {
    let mut buckets = vec![[0u8; 32]; BUCKETS];
    let mut counts = vec![0u32; BUCKETS];
    walk(data_dir, |e| {
        let d = entry_digest(&e);
        let i = bucket_of(&e.ns, &e.key);
        counts[i] = counts[i].saturating_add(1);
        for (x, y) in buckets[i].iter_mut().zip(d) {
            *x ^= y;
        }
    })?;
    Ok((buckets, counts))
}

/// Where a listing page starts: after this `(ns, key)` (`None`: at the
/// first).
pub type After = Option<(String, String)>;

/// A page of a listing: the entries of `buckets` in `data_dir` whose
/// `(ns, key)` comes after `after`, in order, at most `max` of them, and
/// whether more follow. Memory: `max` entries, whatever the store holds.
pub fn list_page(
    data_dir: &Path,
    buckets: &BTreeSet<usize>,
    after: &After,
    max: usize,
) -> io::Result<(Vec<Entry>, bool)> {
    // The `max + 1` smallest keys past `after`: a max-heap dropping its
    // largest keeps them, and the one extra says whether more follow.
    let mut heap: BinaryHeap<Entry> = BinaryHeap::with_capacity(max + 1);
    walk(data_dir, |e| {
        if !buckets.contains(&bucket_of(&e.ns, &e.key)) {
            return;
        }
        if let Some((ns, key)) = after {
            if (e.ns.as_str(), e.key.as_str()) <= (ns.as_str(), key.as_str()) {
                return;
            }
        }
        if heap.len() <= max {
            heap.push(e);
        } else if heap.peek().is_some_and(|top| e < *top) {
            heap.pop();
            heap.push(e);
        }
    })?;
    let mut out = heap.into_sorted_vec();
    let more = out.len() > max;
    out.truncate(max);
    Ok((out, more))
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

/// A listing page as text: one line per entry, then `more` when another
/// page follows.
pub fn encode_listing(entries: &[Entry], more: bool) -> Vec<u8> {
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
    if more {
        out.push_str("more\n");
    }
    out.into_bytes()
}

/// A listing page's entries and whether another follows; `None` when it
/// is not one [`encode_listing`] wrote.
pub fn decode_listing(bytes: &[u8]) -> Option<(Vec<Entry>, bool)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (text, more) = match text.strip_suffix("more\n") {
        Some(rest) if rest.is_empty() || rest.ends_with('\n') => (rest, true),
        _ => (text, false),
    };
    let entries = text
        .lines()
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
        .collect::<Option<Vec<Entry>>>()?;
    Some((entries, more))
}

/// A question a peer asks of this node's holdings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    Summary,
    /// A page of the listing of these buckets, after a key.
    Buckets(Vec<u16>, After),
}

impl Query {
    /// The peer API path that asks it.
    pub fn path(&self) -> String {
        match self {
            Query::Summary => "/_peer/v1/summary".to_string(),
            Query::Buckets(buckets, after) => {
                let list = buckets
                    .iter()
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                match after {
                    None => format!("/_peer/v1/buckets/{list}"),
                    Some((ns, key)) => format!(
                        "/_peer/v1/buckets/{list}/after/{}",
                        hex::encode(format!("{ns}/{key}"))
                    ),
                }
            }
        }
    }

    /// The `after` part of a buckets path: hex of `ns/key`.
    pub fn parse_after(hex_text: &str) -> Option<(String, String)> {
        let text = String::from_utf8(hex::decode(hex_text).ok()?).ok()?;
        let (ns, key) = text.split_once('/')?;
        (valid_namespace(ns) && valid_key(key)).then(|| (ns.to_string(), key.to_string()))
    }
}

/// A computed answer: its query, when its walk of the data directory began,
/// and its bytes.
type Ready = (Query, Instant, Arc<Vec<u8>>);

/// The request header by which a comparing peer asks for a listing whose
/// walk began at most this many milliseconds ago: it took its cutoff then
/// (every write it had acknowledged before is in this node's store), so an
/// older cached listing could miss a write its outbox delivered in between
/// and make it repair that write a second time.
pub const MAX_AGE_HEADER: &str = "x-sluice-max-age-ms";

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

    /// The answer if fresh (its walk began less than [`CACHE_FRESH`] ago,
    /// and less than `max_age` when the asker gives one); otherwise queue
    /// the query (bounded) and `None`.
    pub fn get_or_request(&self, q: &Query, max_age: Option<Duration>) -> Option<Arc<Vec<u8>>> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        inner
            .0
            .retain(|(_, at, _)| now.duration_since(*at) < CACHE_FRESH);
        let fresh = max_age.map_or(CACHE_FRESH, |m| m.min(CACHE_FRESH));
        if let Some(i) = inner.0.iter().position(|(query, _, _)| query == q) {
            if now.duration_since(inner.0[i].1) < fresh {
                return Some(Arc::clone(&inner.0[i].2));
            }
            // Too old for this asker: computed again (and replaced).
            inner.0.remove(i);
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
            let started = Instant::now();
            let body = match &q {
                Query::Summary => compute(&self.data_dir).map(|s| encode_summary(&s)),
                Query::Buckets(b, after) => {
                    let set = b.iter().map(|&b| usize::from(b)).collect();
                    list_page(&self.data_dir, &set, after, LISTING_ENTRIES_MAX)
                        .map(|(l, more)| encode_listing(&l, more))
                }
            };
            match body {
                Ok(body) => {
                    let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
                    if inner.0.len() >= CACHE_SLOTS_MAX {
                        inner.0.remove(0);
                    }
                    inner.0.retain(|(query, _, _)| *query != q);
                    inner.0.push((q, started, Arc::new(body)));
                }
                Err(err) => {
                    tracing::warn!(error = %err, "anti-entropy: cannot walk the data directory")
                }
            }
        }
    }
}

/// A listing read page by page (each fetched when the one before is used
/// up): at most one page in memory.
pub struct Pages<F> {
    fetch: F,
    page: std::collections::VecDeque<Entry>,
    more: bool,
    after: After,
}

impl<F> Pages<F>
where
    F: FnMut(&After) -> Result<(Vec<Entry>, bool), String>,
{
    /// `fetch(after)` gives the page after a key (`None`: the first).
    pub fn new(fetch: F) -> Pages<F> {
        Pages {
            fetch,
            page: std::collections::VecDeque::new(),
            more: true,
            after: None,
        }
    }

    /// The next entry, without taking it.
    pub fn peek(&mut self) -> Result<Option<&Entry>, String> {
        while self.page.is_empty() && self.more {
            let (entries, more) = (self.fetch)(&self.after)?;
            if let Some(last) = entries.last() {
                // Pages are in order: the next starts after this one's last.
                if self
                    .after
                    .as_ref()
                    .is_some_and(|(ns, key)| (last.ns.as_str(), last.key.as_str()) <= (ns, key))
                {
                    return Err("a listing page went backwards".to_string());
                }
                self.after = Some((last.ns.clone(), last.key.clone()));
            }
            self.more = more && !entries.is_empty();
            self.page = entries.into();
        }
        Ok(self.page.front())
    }

    /// The next entry.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, String> {
        self.peek()?;
        Ok(self.page.pop_front())
    }
}

/// Walk two listings of the same buckets side by side (both in `(ns, key)`
/// order) and hand `repair` each entry of `ours` that `theirs` lacks or
/// holds older, as [`to_repair`] decides, holding one page of each.
/// Returns how many were handed over.
pub fn repairs_between<F, G>(
    ours: &mut Pages<F>,
    theirs: &mut Pages<G>,
    mut repair: impl FnMut(Entry) -> Result<(), String>,
) -> Result<u64, String>
where
    F: FnMut(&After) -> Result<(Vec<Entry>, bool), String>,
    G: FnMut(&After) -> Result<(Vec<Entry>, bool), String>,
{
    let mut handed = 0;
    while let Some(o) = ours.next_entry()? {
        // Skip what only they hold.
        while theirs
            .peek()?
            .is_some_and(|t| (t.ns.as_str(), t.key.as_str()) < (o.ns.as_str(), o.key.as_str()))
        {
            theirs.next_entry()?;
        }
        let matched = theirs
            .peek()?
            .filter(|t| t.ns == o.ns && t.key == o.key)
            .cloned();
        if needs_repair(&o, matched.as_ref()) {
            repair(o)?;
            handed += 1;
        }
    }
    Ok(handed)
}

/// Whether a peer holding `theirs` for the key of `ours` needs `ours`.
fn needs_repair(ours: &Entry, theirs: Option<&Entry>) -> bool {
    match theirs {
        None => !ours.deleted,
        Some(_) if ours.ns == "cas" => false,
        Some(t) => !(ours.deleted && t.deleted) && ours.version() > t.version(),
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
        .filter(|e| needs_repair(e, theirs.get(&(e.ns.as_str(), e.key.as_str())).copied()))
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

    /// The 5 s cache answers a comparing peer only with a listing walked
    /// after its cutoff: a listing from before a write arrived here would
    /// make it repair that write a second time.
    #[test]
    fn a_listing_older_than_the_askers_cutoff_is_walked_again() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().to_path_buf());
        let q = Query::Buckets(vec![1, 2], None);
        assert!(cache.get_or_request(&q, None).is_none(), "computed first");
        cache.serve_pending();
        assert!(cache.get_or_request(&q, None).is_some());
        std::thread::sleep(Duration::from_millis(30));
        // Walked 30 ms ago: fresh for an asker whose cutoff is older, not
        // for one whose cutoff came after the walk.
        assert!(cache
            .get_or_request(&q, Some(Duration::from_millis(1000)))
            .is_some());
        assert!(cache
            .get_or_request(&q, Some(Duration::from_millis(10)))
            .is_none());
        assert!(cache.has_pending(), "queued to be walked again");
        cache.serve_pending();
        assert!(cache
            .get_or_request(&q, Some(Duration::from_millis(1000)))
            .is_some());
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
        for more in [false, true] {
            assert_eq!(
                decode_listing(&encode_listing(&listing, more)).unwrap(),
                (listing.clone(), more)
            );
        }
        assert_eq!(decode_listing(b"more\n").unwrap(), (Vec::new(), true));
        assert_eq!(decode_listing(b"").unwrap(), (Vec::new(), false));
        // A listing naming a bad key or carrying extra fields is malformed.
        assert!(decode_listing(b"g ../x 1 - 0\n").is_none());
        assert!(decode_listing(b"g x 1 - 0 extra\n").is_none());
        assert!(decode_listing(b"g x 1 - 0\nmore\ng y 1 - 0\n").is_none());
    }

    /// A store in `dir` without syncs, for the walk's tests.
    fn test_store(dir: &Path) -> crate::store::Store {
        use crate::store::{FsyncPolicy, Store, StoreConfig};
        Store::open(StoreConfig {
            data_dir: dir.to_path_buf(),
            store_bytes_max: 0,
            fsync: FsyncPolicy::Never,
        })
        .unwrap()
    }

    /// Write `ns/key` (its body is the key) as of `t`.
    fn put_at(store: &crate::store::Store, ns: &str, key: &str, t: u64) {
        let options = crate::store::PutOptions {
            write_time_ms: Some(t),
            ..Default::default()
        };
        let mut w = store.begin_put(ns, key, options).unwrap();
        w.write(key.as_bytes()).unwrap();
        w.commit().unwrap();
    }

    /// The walk sees multi-segment keys (stored as `~`-joined file names)
    /// and merges tombstones with artifacts by time.
    #[test]
    fn walk_merges_tombstones_and_reads_multi_segment_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = test_store(dir.path());
        put_at(&store, "g", "fe/a5c6ltr4", 1_000);
        put_at(&store, "g", "deleted", 1_000);
        put_at(&store, "g", "kept", 3_000);
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

    /// The walk holds one shard's tombstones at a time, not all of them,
    /// and still visits each deleted key once, a namespace with only
    /// tombstones left among them (the hour-long soak's comparisons grew
    /// by megabytes with a map of every tombstone).
    #[test]
    fn walk_holds_one_shards_tombstones_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = test_store(dir.path());
        for i in 0..600u64 {
            let key = format!("k{i}");
            put_at(&store, "live", &key, 1_000);
            store.delete_at("live", &key, 2_000 + i, false).unwrap();
        }
        // Deletes of keys this node never held: a namespace of tombstones only.
        for i in 0..200u64 {
            store
                .delete_at("gone", &format!("g{i}"), 5_000, false)
                .unwrap();
        }
        let mut deleted = std::collections::BTreeSet::new();
        let held = walk(dir.path(), |e| {
            assert!(e.deleted, "{e:?}");
            assert!(deleted.insert((e.ns, e.key)), "visited twice");
        })
        .unwrap();
        assert_eq!(deleted.len(), 800);
        // 256 shards: about 2 to 3 tombstones in each, never the 800.
        assert!(held <= 32, "held {held} tombstones at once");
        store.shutdown();
    }

    /// Paged listings walked side by side find exactly what the whole
    /// lists compared at once find, holding one page of each, whatever the
    /// page sizes.
    #[test]
    fn paged_comparison_matches_the_whole_lists() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..200 {
            let mut ours = Vec::new();
            let mut theirs = Vec::new();
            for k in 0..rnd(60) {
                let key = format!("k{k:03}");
                let ns = if rnd(5) == 0 { "cas" } else { "g" };
                let t = 10 + rnd(5);
                let mine = if rnd(6) == 0 {
                    tomb(ns, &key, t)
                } else {
                    e(ns, &key, t, rnd(3) as u8)
                };
                match rnd(4) {
                    0 => ours.push(mine),
                    1 => theirs.push(mine),
                    _ => {
                        ours.push(mine);
                        let t2 = 10 + rnd(5);
                        theirs.push(if rnd(6) == 0 {
                            tomb(ns, &key, t2)
                        } else {
                            e(ns, &key, t2, rnd(3) as u8)
                        });
                    }
                }
            }
            ours.sort();
            theirs.sort();
            let want = to_repair(&ours, &theirs);
            let page = 1 + (round % 7);
            let pager = |all: Vec<Entry>| {
                move |after: &After| -> Result<(Vec<Entry>, bool), String> {
                    let rest: Vec<Entry> = all
                        .iter()
                        .filter(|e| {
                            after.as_ref().is_none_or(|(ns, key)| {
                                (e.ns.as_str(), e.key.as_str()) > (ns.as_str(), key.as_str())
                            })
                        })
                        .cloned()
                        .collect();
                    let more = rest.len() > page;
                    Ok((rest.into_iter().take(page).collect(), more))
                }
            };
            let mut got = Vec::new();
            let handed = repairs_between(
                &mut Pages::new(pager(ours.clone())),
                &mut Pages::new(pager(theirs.clone())),
                |e| {
                    got.push(e);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(got, want, "round {round}, pages of {page}");
            assert_eq!(handed as usize, want.len());
        }
    }

    /// A page keeps the smallest keys after `after`, however many the
    /// buckets hold, and says whether more follow.
    #[test]
    fn list_pages_are_bounded_and_ordered() {
        use crate::store::{FsyncPolicy, PutOptions, Store, StoreConfig};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig {
            data_dir: dir.path().to_path_buf(),
            store_bytes_max: 0,
            fsync: FsyncPolicy::Never,
        })
        .unwrap();
        for i in 0..300 {
            let mut w = store
                .begin_put("g", &format!("k{i:04}"), PutOptions::default())
                .unwrap();
            w.write(b"x").unwrap();
            w.commit().unwrap();
        }
        let all: BTreeSet<usize> = (0..BUCKETS).collect();
        let mut after: After = None;
        let mut seen = Vec::new();
        loop {
            let (page, more) = list_page(dir.path(), &all, &after, 64).unwrap();
            assert!(page.len() <= 64);
            assert!(page.windows(2).all(|w| w[0] < w[1]), "in order");
            seen.extend(page.iter().map(|e| e.key.clone()));
            match page.last() {
                Some(last) if more => after = Some((last.ns.clone(), last.key.clone())),
                _ => break,
            }
        }
        let want: Vec<String> = (0..300).map(|i| format!("k{i:04}")).collect();
        assert_eq!(seen, want);
        let q = Query::Buckets(vec![1, 2], Some(("g".into(), "a/b".into())));
        let path = q.path();
        let hex = path.rsplit('/').next().unwrap();
        assert_eq!(Query::parse_after(hex), Some(("g".into(), "a/b".into())));
        assert_eq!(Query::parse_after("zz"), None);
        assert_eq!(Query::parse_after(&hex::encode("g/../x")), None);
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
        assert_eq!(
            decode_listing(&encode_listing(&listing, false)).unwrap(),
            (listing, false)
        );
        let s = vec![[7u8; 32]; BUCKETS];
        assert_eq!(decode_summary(&encode_summary(&s)).unwrap(), s);
        assert!(bucket_of("a", "b") < BUCKETS);
    }
}
