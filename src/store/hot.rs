//! The hot set: artifacts clients ask for often, kept in memory the server owns, so a request
//! for one touches neither the page cache nor the disk, and a cold stream can never push it out.
//!
//! What it holds, per artifact (`ns/xx/key`):
//! - a small artifact (at most [`HOT_BODY_BYTES_MAX`]): its whole body, shared (`Bytes`);
//! - a large one: its header (length, digest, ETag) and its open file, so a hot large artifact
//!   needs no path lookup, open or header read; its body still comes from the page cache.
//!
//! **Admission is scan resistant** (TinyLFU in front of a segmented LRU, as W-TinyLFU without
//! the window): every lookup counts the key in a small count-min sketch of 4-bit counters
//! that halve every `10 × entries` counts, so the sketch remembers how often, recently, each key
//! was asked. A new entry that needs room is admitted only if its key is asked more often than
//! every victim it would push out; a sequential scan asks each key once and loses to anything
//! asked twice. Admitted entries start in the probation segment; an entry hit since it was
//! last looked at moves to the protected one (80 % of the bytes), whose least recent entries
//! fall back to probation.
//!
//! **A hit takes only a shared lock.** It sets the entry's reference bit and counts the key in
//! the sketch with atomic counters; the lists are rearranged (referenced entries promoted,
//! CLOCK-style second chance) only under the write lock an insert takes. Two engine threads
//! asking for the same hot key never wait for each other, and a thread preempted while it
//! holds the read side (a loaded machine) never stalls the other.
//!
//! **Bounded by bytes**: `hot_set_bytes` over all shards, each entry charged its body, its key
//! and [`ENTRY_OVERHEAD_BYTES`]; the sketches are sized from the budget (about 0.5 % of it) and
//! reported beside it.
//!
//! **Always right**: every change of an artifact's name on disk (publish by rename, delete,
//! eviction, a corrupt file removed) happens under its index shard lock, and the index calls
//! [`HotSet::invalidate`] right there ([`super::index`]), before the writer's acknowledgement.
//! A reader that missed reads its shard's *generation* before it opens the file; invalidation
//! bumps it, and an insert whose generation moved is refused as stale. So a body read from the
//! old file can never be inserted after the new one became visible, and a body is immutable
//! once inserted (no torn reads: a request holds its own reference to the bytes it sends).
//!
//! The policy is sans-IO: the clock is passed in, nothing here reads a file.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;

use super::format::Meta;
use super::{check_names, now_ms, relative_path, Artifact, Store};

/// Largest artifact body the hot set keeps in memory, bytes; larger artifacts are kept as
/// their header and open file only. The same bound as the ring's inline bodies.
pub const HOT_BODY_BYTES_MAX: u64 = 64 * 1024;
/// What an entry costs besides its body and key, bytes: its node, its map slot, the shared
/// entry and its ETag string. Charged to the budget so it bounds real memory, not only bodies.
pub const ENTRY_OVERHEAD_BYTES: u64 = 256;
/// Most shards (each its own lock, sketch and LRU). Fewer when the budget is small, so that
/// a shard still holds several of the largest bodies.
const SHARDS_MAX: usize = 16;
/// Share of a shard's bytes the protected segment may hold, percent.
const PROTECTED_PERCENT: u64 = 80;
/// Most list moves one insert makes to promote referenced entries (see
/// `Shard::promote_referenced`).
const PROMOTIONS_PER_PASS_MAX: usize = 64;
/// Most entries one admission may push out; a candidate needing more is refused.
const VICTIMS_PER_ADMISSION_MAX: usize = 64;
/// What a large artifact's entry (header and open file, no body) is charged as if it held in
/// memory, bytes: one largest in-memory body, so the descriptors the set keeps open stay at
/// most `hot_set_bytes / 64 KiB` (1,024 for the default 64 MiB).
pub const FILE_ENTRY_BODY_BYTES: u64 = HOT_BODY_BYTES_MAX;
/// A hit records its access in the store's LRU index at most this often per entry, ms, so a
/// hot artifact's file is never the disk's eviction victim while its hits cost no index lock.
pub const TOUCH_INTERVAL_MS: u64 = 1_000;
/// Counter ceiling of the sketch (4-bit counters, as TinyLFU's).
const COUNTER_MAX: u8 = 15;
/// Bytes of budget per expected entry when sizing a shard's sketch (4 KiB: the artifacts that
/// matter most here are small).
const SKETCH_BYTES_PER_ENTRY: u64 = 4096;
/// Bounds on a shard's sketch width (counters per row).
const SKETCH_WIDTH_MIN: usize = 64;
const SKETCH_WIDTH_MAX: usize = 1 << 16;

const NIL: u32 = u32::MAX;

/// One artifact in the hot set. Immutable: a new version is a new entry.
#[derive(Debug)]
pub struct HotEntry {
    /// Body length, bytes.
    pub len: u64,
    /// sha256 of the body.
    pub sha256: [u8; 32],
    /// The strong ETag, quotes included (kept so a hit formats nothing).
    pub etag: String,
    /// Where the body starts in the artifact's file (after a version-2 header's metadata).
    pub body_offset: u64,
    /// The response headers the artifact keeps (Turborepo's `x-artifact-*`), if any.
    pub meta: Option<Arc<Meta>>,
    pub body: HotBody,
}

/// Where a hot entry's body comes from.
#[derive(Debug)]
pub enum HotBody {
    /// The whole body, in memory.
    Memory(Bytes),
    /// The artifact's open file (a large artifact: only its header is kept).
    File(Arc<File>),
}

impl HotEntry {
    /// Bytes this entry holds in memory (its body when kept in memory, else none).
    pub fn body_bytes(&self) -> u64 {
        match &self.body {
            HotBody::Memory(bytes) => bytes.len() as u64,
            HotBody::File(_) => 0,
        }
    }
}

/// The answer of [`HotSet::lookup`].
#[derive(Debug)]
pub enum Lookup {
    /// The hot set is off (`hot_set_bytes = 0`).
    Off,
    /// Here it is. `touch`: record the access in the store's LRU index now (see
    /// [`TOUCH_INTERVAL_MS`]).
    Hit { entry: Arc<HotEntry>, touch: bool },
    /// Not here; the ticket admits what the caller reads next (see [`HotSet::insert`]).
    Miss(Ticket),
}

/// A miss's right to insert, valid while its shard's generation stays the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    hash: u64,
    generation: u64,
}

/// What became of an insert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// In the set now (or already was, same version).
    Admitted,
    /// Refused: not asked more often than what it would push out, or larger than a shard.
    Rejected,
    /// Refused: the key's shard changed since the ticket was taken; the body read may be old.
    Stale,
    /// The hot set is off.
    Off,
}

/// Point-in-time counters of the hot set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HotStats {
    /// The budget, bytes (`hot_set_bytes`; 0 = off).
    pub budget_bytes: u64,
    /// Bytes charged now (bodies, keys and per-entry overhead).
    pub bytes: u64,
    /// Body bytes held in memory now.
    pub body_bytes: u64,
    /// Entries now.
    pub entries: u64,
    /// Memory of the frequency sketches, bytes (fixed at start).
    pub sketch_bytes: u64,
    pub hits_total: u64,
    pub misses_total: u64,
    pub admissions_total: u64,
    pub rejections_total: u64,
    /// Inserts refused because the artifact changed meanwhile.
    pub stale_total: u64,
    /// Entries pushed out to admit others.
    pub evictions_total: u64,
    /// Entries dropped because their artifact changed or went away.
    pub invalidations_total: u64,
}

/// The hot set. Off until [`HotSet::configure`] gives it a budget; then it stays configured.
#[derive(Default)]
pub struct HotSet {
    core: OnceLock<Core>,
}

struct Core {
    shards: Box<[RwLock<Shard>]>,
    /// One sketch per shard, outside the lock: hits count keys with atomic counters.
    sketches: Box<[Sketch]>,
    hasher: RandomState,
    budget_bytes: u64,
    sketch_bytes: u64,
    bytes: AtomicU64,
    body_bytes: AtomicU64,
    entries: AtomicU64,
    hits_total: AtomicU64,
    misses_total: AtomicU64,
    admissions_total: AtomicU64,
    rejections_total: AtomicU64,
    stale_total: AtomicU64,
    evictions_total: AtomicU64,
    invalidations_total: AtomicU64,
}

impl HotSet {
    /// A hot set that is off.
    pub fn new() -> HotSet {
        HotSet::default()
    }

    /// Turn the hot set on with `budget_bytes` (0 keeps it off). Once, before serving; a second
    /// call changes nothing and returns false.
    pub fn configure(&self, budget_bytes: u64) -> bool {
        if budget_bytes == 0 {
            return false;
        }
        self.core.set(Core::new(budget_bytes)).is_ok()
    }

    /// Whether the hot set is on.
    pub fn is_on(&self) -> bool {
        self.core.get().is_some()
    }

    /// Look `rel` (`ns/xx/key`) up, counting the access for admission.
    pub fn lookup(&self, rel: &str, now_ms: u64) -> Lookup {
        let Some(core) = self.core.get() else {
            return Lookup::Off;
        };
        let hash = core.hasher.hash_one(rel);
        core.sketch(hash).increment(hash);
        let shard = core.read(hash);
        if let Some(index) = shard.find(hash, rel) {
            let node = &shard.nodes[index as usize];
            let touch = node.on_hit(now_ms);
            let entry = node.entry.clone();
            drop(shard);
            if let Some(entry) = entry {
                core.hits_total.fetch_add(1, Ordering::Relaxed);
                return Lookup::Hit { entry, touch };
            }
            return Lookup::Off;
        }
        let generation = shard.generation;
        drop(shard);
        core.misses_total.fetch_add(1, Ordering::Relaxed);
        Lookup::Miss(Ticket { hash, generation })
    }

    /// Whether an entry for the ticket's key with `body_bytes` in memory (`None`: a large
    /// artifact's header and file) would be admitted now, so the caller reads a body only
    /// when it will be kept.
    pub fn would_admit(&self, rel: &str, ticket: Ticket, body_bytes: Option<u64>) -> bool {
        let Some(core) = self.core.get() else {
            return false;
        };
        let charge = match body_bytes {
            Some(n) => charge(rel, n),
            None => charge(rel, FILE_ENTRY_BODY_BYTES),
        };
        let sketch = core.sketch(ticket.hash);
        let mut shard = core.write(ticket.hash);
        shard.generation == ticket.generation
            && shard.plan_room(sketch, ticket.hash, charge).is_some()
    }

    /// Insert `entry` under `rel` with the ticket its lookup gave.
    pub fn insert(
        &self,
        rel: &str,
        ticket: Ticket,
        entry: Arc<HotEntry>,
        now_ms: u64,
    ) -> Admission {
        let Some(core) = self.core.get() else {
            return Admission::Off;
        };
        let body_bytes = entry.body_bytes();
        let charge = entry_charge(rel, &entry);
        let sketch = core.sketch(ticket.hash);
        let mut shard = core.write(ticket.hash);
        if shard.generation != ticket.generation {
            drop(shard);
            core.stale_total.fetch_add(1, Ordering::Relaxed);
            return Admission::Stale;
        }
        if shard.find(ticket.hash, rel).is_some() {
            // Another request admitted the same version meanwhile (the generation has not
            // moved, so it is the same file).
            return Admission::Admitted;
        }
        if shard.map.contains_key(&ticket.hash) {
            // A different key with the same 64-bit hash holds the slot: keep it.
            drop(shard);
            core.rejections_total.fetch_add(1, Ordering::Relaxed);
            return Admission::Rejected;
        }
        let Some(victims) = shard.plan_room(sketch, ticket.hash, charge) else {
            drop(shard);
            core.rejections_total.fetch_add(1, Ordering::Relaxed);
            return Admission::Rejected;
        };
        let evicted = victims.len() as u64;
        for victim in victims {
            if let Some(gone) = shard.remove_node(victim) {
                core.forget(&gone);
            }
        }
        shard.add(ticket.hash, rel, entry, charge, now_ms);
        drop(shard);
        core.evictions_total.fetch_add(evicted, Ordering::Relaxed);
        core.admissions_total.fetch_add(1, Ordering::Relaxed);
        core.bytes.fetch_add(charge, Ordering::Relaxed);
        core.body_bytes.fetch_add(body_bytes, Ordering::Relaxed);
        core.entries.fetch_add(1, Ordering::Relaxed);
        Admission::Admitted
    }

    /// `rel` changed or went away: drop its entry, and refuse inserts from tickets taken
    /// before now. Called under the key's index lock, right after the rename or unlink.
    pub fn invalidate(&self, rel: &str) {
        let Some(core) = self.core.get() else {
            return;
        };
        let hash = core.hasher.hash_one(rel);
        let mut shard = core.write(hash);
        shard.generation = shard.generation.wrapping_add(1);
        let Some(index) = shard.find(hash, rel) else {
            return;
        };
        let gone = shard.remove_node(index);
        drop(shard);
        if let Some(gone) = gone {
            core.forget(&gone);
            core.invalidations_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Current counters.
    pub fn stats(&self) -> HotStats {
        let Some(core) = self.core.get() else {
            return HotStats::default();
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HotStats {
            budget_bytes: core.budget_bytes,
            bytes: load(&core.bytes),
            body_bytes: load(&core.body_bytes),
            entries: load(&core.entries),
            sketch_bytes: core.sketch_bytes,
            hits_total: load(&core.hits_total),
            misses_total: load(&core.misses_total),
            admissions_total: load(&core.admissions_total),
            rejections_total: load(&core.rejections_total),
            stale_total: load(&core.stale_total),
            evictions_total: load(&core.evictions_total),
            invalidations_total: load(&core.invalidations_total),
        }
    }
}

/// What an entry for `rel` with `body_bytes` in memory is charged, bytes.
fn charge(rel: &str, body_bytes: u64) -> u64 {
    body_bytes + rel.len() as u64 + ENTRY_OVERHEAD_BYTES
}

fn entry_charge(rel: &str, entry: &HotEntry) -> u64 {
    match entry.body {
        HotBody::Memory(ref bytes) => charge(rel, bytes.len() as u64),
        HotBody::File(_) => charge(rel, FILE_ENTRY_BODY_BYTES),
    }
}

impl Core {
    fn new(budget_bytes: u64) -> Core {
        // Enough shards for two engine threads and the fallback to rarely meet, few enough
        // that each holds at least 16 of the largest in-memory bodies.
        let per_shard_min = 16 * (HOT_BODY_BYTES_MAX + ENTRY_OVERHEAD_BYTES);
        let mut count = SHARDS_MAX;
        while count > 1 && budget_bytes / (count as u64) < per_shard_min {
            count /= 2;
        }
        let shard_budget = budget_bytes / count as u64;
        let shards: Box<[RwLock<Shard>]> = (0..count)
            .map(|_| RwLock::new(Shard::new(shard_budget)))
            .collect();
        let expected = usize::try_from(shard_budget / SKETCH_BYTES_PER_ENTRY).unwrap_or(usize::MAX);
        let sketches: Box<[Sketch]> = (0..count).map(|_| Sketch::new(expected)).collect();
        let sketch_bytes = sketches.iter().map(Sketch::memory_bytes).sum();
        Core {
            shards,
            sketches,
            // SipHash with a random key: keys come from request URLs, so a predictable hash
            // would let a client aim at one shard or crowd the sketch's counters.
            hasher: RandomState::new(),
            budget_bytes,
            sketch_bytes,
            bytes: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            hits_total: AtomicU64::new(0),
            misses_total: AtomicU64::new(0),
            admissions_total: AtomicU64::new(0),
            rejections_total: AtomicU64::new(0),
            stale_total: AtomicU64::new(0),
            evictions_total: AtomicU64::new(0),
            invalidations_total: AtomicU64::new(0),
        }
    }

    fn shard_index(&self, hash: u64) -> usize {
        // The high bits pick the shard; the sketch and the map use the rest.
        (hash >> 48) as usize % self.shards.len()
    }

    fn sketch(&self, hash: u64) -> &Sketch {
        &self.sketches[self.shard_index(hash)]
    }

    fn read(&self, hash: u64) -> RwLockReadGuard<'_, Shard> {
        self.shards[self.shard_index(hash)]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, hash: u64) -> RwLockWriteGuard<'_, Shard> {
        self.shards[self.shard_index(hash)]
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn forget(&self, gone: &Removed) {
        self.bytes.fetch_sub(gone.charge, Ordering::Relaxed);
        self.body_bytes
            .fetch_sub(gone.body_bytes, Ordering::Relaxed);
        self.entries.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The map's keys are already SipHash values: hash them no further.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Segment {
    Probation = 0,
    Protected = 1,
}

struct Node {
    hash: u64,
    key: Box<str>,
    entry: Option<Arc<HotEntry>>,
    charge: u64,
    body_bytes: u64,
    segment: Segment,
    prev: u32,
    next: u32,
    /// Hit since the lists last looked at it (set under the read lock, cleared under the
    /// write lock when the entry is promoted or given its second chance).
    referenced: AtomicBool,
    /// When the access was last recorded in the store's index, ms.
    touched_ms: AtomicU64,
}

impl Node {
    /// A hit, under the shared lock. Returns whether the access should be recorded in the
    /// store's index now (once per [`TOUCH_INTERVAL_MS`], by whichever hit gets there).
    fn on_hit(&self, now_ms: u64) -> bool {
        if !self.referenced.load(Ordering::Relaxed) {
            self.referenced.store(true, Ordering::Relaxed);
        }
        let last = self.touched_ms.load(Ordering::Relaxed);
        now_ms.saturating_sub(last) >= TOUCH_INTERVAL_MS
            && self
                .touched_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// A doubly linked list through `Shard::nodes`: `head` is the most recent.
#[derive(Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
    bytes: u64,
}

impl List {
    const EMPTY: List = List {
        head: NIL,
        tail: NIL,
        bytes: 0,
    };
}

struct Removed {
    charge: u64,
    body_bytes: u64,
}

struct Shard {
    map: HashMap<u64, u32, BuildHasherDefault<Identity>>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    lists: [List; 2],
    budget_bytes: u64,
    /// Bumped by every invalidation in this shard (see the module docs).
    generation: u64,
}

impl Shard {
    fn new(budget_bytes: u64) -> Shard {
        Shard {
            map: HashMap::default(),
            nodes: Vec::new(),
            free: Vec::new(),
            lists: [List::EMPTY; 2],
            budget_bytes,
            generation: 0,
        }
    }

    fn bytes(&self) -> u64 {
        self.lists[0].bytes + self.lists[1].bytes
    }

    fn find(&self, hash: u64, rel: &str) -> Option<u32> {
        let index = *self.map.get(&hash)?;
        (*self.nodes[index as usize].key == *rel).then_some(index)
    }

    /// Rearrange the lists by the reference bits the hits set (under the write lock): a
    /// referenced entry at the least recent end of probation moves to the front of protected,
    /// and protected's least recent entries go back to probation (a referenced one gets a
    /// second chance at protected's front instead). At most [`PROMOTIONS_PER_PASS_MAX`]
    /// moves, so an insert's time is bounded.
    fn promote_referenced(&mut self) {
        let protected_max = self.budget_bytes / 100 * PROTECTED_PERCENT;
        let mut moves = 0;
        while moves < PROMOTIONS_PER_PASS_MAX {
            let tail = self.lists[Segment::Probation as usize].tail;
            if tail == NIL
                || !self.nodes[tail as usize]
                    .referenced
                    .swap(false, Ordering::Relaxed)
            {
                break;
            }
            self.unlink(tail);
            self.push_front(tail, Segment::Protected);
            moves += 1;
        }
        while moves < PROMOTIONS_PER_PASS_MAX
            && self.lists[Segment::Protected as usize].bytes > protected_max
        {
            let tail = self.lists[Segment::Protected as usize].tail;
            if tail == NIL {
                break;
            }
            self.unlink(tail);
            if self.nodes[tail as usize]
                .referenced
                .swap(false, Ordering::Relaxed)
            {
                self.push_front(tail, Segment::Protected);
            } else {
                self.push_front(tail, Segment::Probation);
            }
            moves += 1;
        }
    }

    /// The entries to push out so that `charge` more bytes fit, least recent first
    /// (probation, then protected), each asked less often than the candidate; `None` when
    /// the candidate does not win that room.
    fn plan_room(&mut self, sketch: &Sketch, hash: u64, charge: u64) -> Option<Vec<u32>> {
        if charge > self.budget_bytes {
            return None;
        }
        let mut needed = (self.bytes() + charge).saturating_sub(self.budget_bytes);
        let mut victims = Vec::new();
        if needed == 0 {
            return Some(victims);
        }
        self.promote_referenced();
        let candidate = sketch.estimate(hash);
        for segment in [Segment::Probation, Segment::Protected] {
            let mut at = self.lists[segment as usize].tail;
            while at != NIL {
                if victims.len() >= VICTIMS_PER_ADMISSION_MAX {
                    return None;
                }
                let node = &self.nodes[at as usize];
                // Hit since the lists last looked: not a victim this time (second chance).
                if node.referenced.load(Ordering::Relaxed) {
                    at = node.prev;
                    continue;
                }
                if sketch.estimate(node.hash) >= candidate {
                    return None;
                }
                victims.push(at);
                needed = needed.saturating_sub(node.charge);
                if needed == 0 {
                    return Some(victims);
                }
                at = node.prev;
            }
        }
        None
    }

    fn add(&mut self, hash: u64, rel: &str, entry: Arc<HotEntry>, charge: u64, now_ms: u64) {
        let body_bytes = entry.body_bytes();
        let node = Node {
            hash,
            key: rel.into(),
            entry: Some(entry),
            charge,
            body_bytes,
            segment: Segment::Probation,
            prev: NIL,
            next: NIL,
            referenced: AtomicBool::new(false),
            touched_ms: AtomicU64::new(now_ms),
        };
        let index = match self.free.pop() {
            Some(index) => {
                self.nodes[index as usize] = node;
                index
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.map.insert(hash, index);
        self.push_front(index, Segment::Probation);
    }

    fn remove_node(&mut self, index: u32) -> Option<Removed> {
        let node = self.nodes.get(index as usize)?;
        node.entry.as_ref()?;
        let hash = node.hash;
        self.unlink(index);
        self.map.remove(&hash);
        let node = &mut self.nodes[index as usize];
        node.entry = None;
        node.key = Box::from("");
        let removed = Removed {
            charge: node.charge,
            body_bytes: node.body_bytes,
        };
        self.free.push(index);
        Some(removed)
    }

    fn unlink(&mut self, index: u32) {
        let (prev, next, segment, charge) = {
            let n = &self.nodes[index as usize];
            (n.prev, n.next, n.segment, n.charge)
        };
        let list = &mut self.lists[segment as usize];
        if prev == NIL {
            list.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.lists[segment as usize].tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
        self.lists[segment as usize].bytes -= charge;
        let n = &mut self.nodes[index as usize];
        n.prev = NIL;
        n.next = NIL;
    }

    fn push_front(&mut self, index: u32, segment: Segment) {
        let list = self.lists[segment as usize];
        {
            let n = &mut self.nodes[index as usize];
            n.segment = segment;
            n.prev = NIL;
            n.next = list.head;
        }
        if list.head != NIL {
            self.nodes[list.head as usize].prev = index;
        }
        let charge = self.nodes[index as usize].charge;
        let list = &mut self.lists[segment as usize];
        list.head = index;
        if list.tail == NIL {
            list.tail = index;
        }
        list.bytes += charge;
    }
}

/// A count-min sketch of 4-bit (saturating at 15) counters, 4 rows, with conservative update
/// (only the smallest counters grow, which keeps the noise of many one-time keys low) and
/// aging: after `10 × expected entries` counts every counter halves, so old popularity fades.
struct Sketch {
    counters: Box<[AtomicU8]>,
    /// Counters per row minus one (rows are a power of two wide).
    mask: usize,
    additions: AtomicU64,
    reset_at: u64,
}

const SKETCH_ROWS: usize = 4;
const SKETCH_SEEDS: [u64; SKETCH_ROWS] = [
    0x9E37_79B9_7F4A_7C15,
    0xC2B2_AE3D_27D4_EB4F,
    0x1656_67B1_9E37_79F9,
    0x85EB_CA77_C2B2_AE63,
];

impl Sketch {
    fn new(expected_entries: usize) -> Sketch {
        let width = expected_entries
            .saturating_mul(4)
            .clamp(SKETCH_WIDTH_MIN, SKETCH_WIDTH_MAX)
            .next_power_of_two();
        Sketch {
            counters: (0..width * SKETCH_ROWS).map(|_| AtomicU8::new(0)).collect(),
            mask: width - 1,
            additions: AtomicU64::new(0),
            reset_at: 10 * (expected_entries.max(SKETCH_WIDTH_MIN / 4) as u64),
        }
    }

    fn memory_bytes(&self) -> u64 {
        self.counters.len() as u64
    }

    fn slots(&self, hash: u64) -> [usize; SKETCH_ROWS] {
        let width = self.mask + 1;
        let mut out = [0usize; SKETCH_ROWS];
        for (row, seed) in SKETCH_SEEDS.iter().enumerate() {
            let mixed = (hash ^ seed).wrapping_mul(0xFF51_AFD7_ED55_8CCD);
            let column = (mixed ^ (mixed >> 29)) as usize & self.mask;
            out[row] = row * width + column;
        }
        out
    }

    fn estimate(&self, hash: u64) -> u8 {
        self.slots(hash)
            .iter()
            .map(|&i| self.counters[i].load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    /// Count `hash` once. Lock-free: two threads counting at once may lose a count or halve
    /// a counter late, which an estimate of popularity can afford.
    fn increment(&self, hash: u64) {
        let slots = self.slots(hash);
        let least = slots
            .iter()
            .map(|&i| self.counters[i].load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        if least < COUNTER_MAX {
            for &i in &slots {
                // Only the smallest counters grow (conservative update); a counter another
                // thread moved meanwhile is left alone.
                let _ = self.counters[i].compare_exchange(
                    least,
                    least + 1,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
        }
        // Exactly one counting thread sees the threshold and halves the sketch.
        if self.additions.fetch_add(1, Ordering::Relaxed) + 1 == self.reset_at {
            for c in self.counters.iter() {
                c.store(c.load(Ordering::Relaxed) / 2, Ordering::Relaxed);
            }
            self.additions
                .fetch_sub(self.reset_at / 2, Ordering::Relaxed);
        }
    }
}

/// What the store's hot set answers for a GET ([`Store::hot_get`]).
#[derive(Debug)]
pub enum HotGet {
    /// The hot set is off.
    Off,
    /// Served from memory (or, for a large artifact, from its kept header and file).
    Hit(Arc<HotEntry>),
    /// Not hot: open it as usual, then offer it with [`Store::hot_admit`].
    Miss(HotMiss),
}

/// A miss, carrying what [`Store::hot_admit`] needs.
#[derive(Debug)]
pub struct HotMiss {
    rel: String,
    ticket: Ticket,
}

impl Store {
    /// Turn the hot set on with a budget of `hot_set_bytes` (0 = off), once, before serving.
    pub fn set_hot_set_bytes(&self, hot_set_bytes: u64) {
        self.shared().index.hot.configure(hot_set_bytes);
    }

    /// Look `ns/key` up in the hot set, counting the request for admission. A hit now and
    /// then records the access in the store's LRU index, so a hot artifact's file is not
    /// the disk's eviction victim.
    pub fn hot_get(&self, ns: &str, key: &str) -> HotGet {
        let sh = self.shared();
        if !sh.index.hot.is_on() || check_names(ns, key).is_err() {
            return HotGet::Off;
        }
        let rel = relative_path(ns, key);
        let now = now_ms();
        match sh.index.hot.lookup(&rel, now) {
            Lookup::Off => HotGet::Off,
            Lookup::Hit { entry, touch } => {
                if touch {
                    sh.index.lock(&rel).touch(&rel, now);
                }
                HotGet::Hit(entry)
            }
            Lookup::Miss(ticket) => HotGet::Miss(HotMiss { rel, ticket }),
        }
    }

    /// Offer `artifact`, just opened after `miss`, to the hot set: a small body is read from
    /// the page cache only (never waiting for the disk; a body not there is not admitted this
    /// time) and kept if the admission policy takes it; a large artifact keeps its header and
    /// file. Returns the entry when it was admitted.
    pub fn hot_admit(&self, miss: HotMiss, artifact: &Artifact) -> Option<Arc<HotEntry>> {
        let hot = &self.shared().index.hot;
        let small = artifact.len <= HOT_BODY_BYTES_MAX;
        if !hot.would_admit(&miss.rel, miss.ticket, small.then_some(artifact.len)) {
            return None;
        }
        let body = if small {
            HotBody::Memory(read_cached(artifact)?)
        } else {
            HotBody::File(Arc::clone(&artifact.file))
        };
        let entry = Arc::new(HotEntry {
            len: artifact.len,
            sha256: artifact.sha256,
            etag: artifact.etag(),
            body_offset: artifact.body_offset,
            meta: artifact.meta.clone(),
            body,
        });
        match hot.insert(&miss.rel, miss.ticket, Arc::clone(&entry), now_ms()) {
            Admission::Admitted => Some(entry),
            Admission::Rejected | Admission::Stale | Admission::Off => None,
        }
    }

    /// The hot set's counters.
    pub fn hot_stats(&self) -> HotStats {
        self.shared().index.hot.stats()
    }
}

/// The whole body of `artifact` from the page cache (`RWF_NOWAIT`), or `None` when part of
/// it is not there or the file is shorter than its header says.
fn read_cached(artifact: &Artifact) -> Option<Bytes> {
    let len = usize::try_from(artifact.len).ok()?;
    let mut body = vec![0u8; len];
    if len > 0 {
        let read = rustix::io::preadv2(
            &*artifact.file,
            &mut [std::io::IoSliceMut::new(&mut body)],
            artifact.body_offset,
            rustix::io::ReadWriteFlags::NOWAIT,
        );
        if read.ok()? != len {
            return None;
        }
    }
    Some(Bytes::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(body: &[u8]) -> Arc<HotEntry> {
        Arc::new(HotEntry {
            len: body.len() as u64,
            sha256: [0; 32],
            etag: String::new(),
            body_offset: 64,
            meta: None,
            body: HotBody::Memory(Bytes::copy_from_slice(body)),
        })
    }

    fn miss(hot: &HotSet, rel: &str) -> Ticket {
        match hot.lookup(rel, 0) {
            Lookup::Miss(ticket) => ticket,
            other => panic!("{rel}: expected a miss, got {other:?}"),
        }
    }

    fn hit_body(hot: &HotSet, rel: &str) -> Option<Bytes> {
        match hot.lookup(rel, 0) {
            Lookup::Hit { entry, .. } => match &entry.body {
                HotBody::Memory(bytes) => Some(bytes.clone()),
                HotBody::File(_) => None,
            },
            _ => None,
        }
    }

    #[test]
    fn off_until_configured() {
        let hot = HotSet::new();
        assert!(matches!(hot.lookup("n/00/k", 0), Lookup::Off));
        assert!(!hot.configure(0));
        assert!(!hot.is_on());
        assert!(hot.configure(1 << 20));
        assert!(!hot.configure(2 << 20), "configured once");
        assert_eq!(hot.stats().budget_bytes, 1 << 20);
    }

    #[test]
    fn a_miss_admits_then_hits() {
        let hot = HotSet::new();
        hot.configure(4 << 20);
        let ticket = miss(&hot, "n/00/k");
        assert!(hot.would_admit("n/00/k", ticket, Some(3)));
        assert_eq!(
            hot.insert("n/00/k", ticket, memory(b"abc"), 0),
            Admission::Admitted
        );
        assert_eq!(hit_body(&hot, "n/00/k").as_deref(), Some(&b"abc"[..]));
        let stats = hot.stats();
        assert_eq!((stats.hits_total, stats.misses_total), (1, 1));
        assert_eq!(stats.entries, 1);
        assert_eq!(stats.body_bytes, 3);
        assert_eq!(stats.bytes, charge("n/00/k", 3));
    }

    /// The race the generation closes: a reader takes its ticket, the artifact is replaced
    /// (invalidate), and the reader's body, read from the old file, must not get in.
    #[test]
    fn an_insert_after_an_invalidation_is_stale() {
        let hot = HotSet::new();
        hot.configure(4 << 20);
        let ticket = miss(&hot, "n/00/k");
        hot.invalidate("n/00/k");
        assert_eq!(
            hot.insert("n/00/k", ticket, memory(b"old"), 0),
            Admission::Stale
        );
        assert!(hit_body(&hot, "n/00/k").is_none());
        assert!(!hot.would_admit("n/00/k", ticket, Some(3)));
        assert_eq!(hot.stats().stale_total, 1);
    }

    #[test]
    fn invalidation_drops_the_entry() {
        let hot = HotSet::new();
        hot.configure(4 << 20);
        let ticket = miss(&hot, "n/00/k");
        hot.insert("n/00/k", ticket, memory(b"v1"), 0);
        hot.invalidate("n/00/k");
        assert!(hit_body(&hot, "n/00/k").is_none());
        let stats = hot.stats();
        assert_eq!((stats.entries, stats.bytes, stats.body_bytes), (0, 0, 0));
        assert_eq!(stats.invalidations_total, 1);
    }

    #[test]
    fn the_budget_holds_and_an_oversized_entry_is_refused() {
        let budget = 1 << 20;
        let hot = HotSet::new();
        hot.configure(budget);
        for i in 0..2000 {
            let rel = format!("n/00/k{i}");
            let ticket = miss(&hot, &rel);
            hot.insert(&rel, ticket, memory(&[1u8; 4096]), 0);
            assert!(hot.stats().bytes <= budget, "after {i}");
        }
        // More than a whole shard can hold: one shard (the budget is small), so the budget.
        let ticket = miss(&hot, "n/00/huge");
        assert!(!hot.would_admit("n/00/huge", ticket, Some(budget)));
    }

    /// Scan resistance: a working set asked over and over survives a sequential scan of
    /// fifty times the budget in distinct keys, each asked once, and stays hit after it.
    #[test]
    fn a_scan_does_not_push_out_the_working_set() {
        let budget: u64 = 2 << 20;
        let hot = HotSet::new();
        hot.configure(budget);
        let body = [7u8; 4096];
        let working: Vec<String> = (0..64).map(|i| format!("hot/00/w{i}")).collect();
        let ask = |rel: &str| match hot.lookup(rel, 0) {
            Lookup::Hit { .. } => true,
            Lookup::Miss(ticket) => {
                hot.insert(rel, ticket, memory(&body), 0);
                false
            }
            Lookup::Off => false,
        };
        for _ in 0..4 {
            for rel in &working {
                ask(rel);
            }
        }
        let scan_keys = 50 * budget / 4096;
        let (mut hot_hits, mut hot_asks) = (0u64, 0u64);
        for i in 0..scan_keys {
            ask(&format!("scan/00/s{i}"));
            // The working set is asked all along, 1 in 8 requests.
            if i % 8 == 0 {
                let rel = &working[(i / 8) as usize % working.len()];
                hot_asks += 1;
                hot_hits += u64::from(ask(rel));
            }
        }
        let ratio = hot_hits as f64 / hot_asks as f64;
        assert!(
            ratio >= 0.99,
            "working set hit ratio {ratio} during the scan"
        );
        assert!(working.iter().all(|rel| ask(rel)), "all still hot after");
        assert!(hot.stats().rejections_total > scan_keys / 2);
    }

    /// A key asked often gets in even when the set is full of keys asked once.
    #[test]
    fn frequency_wins_room() {
        let budget: u64 = 1 << 20;
        let hot = HotSet::new();
        hot.configure(budget);
        let body = [1u8; 8192];
        for i in 0..(2 * budget / 8192) {
            let rel = format!("n/00/once{i}");
            let ticket = miss(&hot, &rel);
            hot.insert(&rel, ticket, memory(&body), 0);
        }
        let mut admitted = false;
        for _ in 0..4 {
            if let Lookup::Miss(ticket) = hot.lookup("n/00/popular", 0) {
                admitted =
                    hot.insert("n/00/popular", ticket, memory(&body), 0) == Admission::Admitted;
            }
        }
        assert!(admitted);
        assert!(hit_body(&hot, "n/00/popular").is_some());
    }

    #[test]
    fn hits_touch_the_index_once_a_second() {
        let hot = HotSet::new();
        hot.configure(4 << 20);
        let ticket = miss(&hot, "n/00/k");
        hot.insert("n/00/k", ticket, memory(b"x"), 10_000);
        let touch = |now| match hot.lookup("n/00/k", now) {
            Lookup::Hit { touch, .. } => touch,
            _ => panic!("a hit"),
        };
        assert!(!touch(10_500));
        assert!(touch(11_000));
        assert!(!touch(11_999));
        assert!(touch(12_000));
    }

    #[test]
    fn sketch_counts_saturate_and_age() {
        let sketch = Sketch::new(16);
        for _ in 0..40 {
            sketch.increment(42);
        }
        assert_eq!(sketch.estimate(42), COUNTER_MAX);
        assert_eq!(sketch.estimate(7), 0);
        for i in 0..sketch.reset_at {
            sketch.increment(1000 + i);
        }
        assert!(sketch.estimate(42) < COUNTER_MAX, "halved");
    }

    /// Threads insert, look up and invalidate the same few keys at once; the byte and entry
    /// totals stay equal to what the shards hold.
    #[test]
    fn totals_stay_consistent_under_threads() {
        let hot = Arc::new(HotSet::new());
        hot.configure(1 << 20);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let hot = Arc::clone(&hot);
                std::thread::spawn(move || {
                    for i in 0..5_000u32 {
                        let rel = format!("n/00/k{}", (i * 7 + t) % 50);
                        match hot.lookup(&rel, 0) {
                            Lookup::Miss(ticket) => {
                                hot.insert(&rel, ticket, memory(&[0u8; 1000]), 0);
                            }
                            _ if i % 5 == 0 => hot.invalidate(&rel),
                            _ => {}
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let core = hot.core.get().expect("on");
        let (mut bytes, mut entries) = (0, 0);
        for shard in core.shards.iter() {
            let shard = shard.read().expect("lock");
            bytes += shard.bytes();
            entries += shard.map.len() as u64;
        }
        let stats = hot.stats();
        assert_eq!((stats.bytes, stats.entries), (bytes, entries));
    }
}

/// The hot set through a real store: every way an artifact changes drops its entry before
/// the change returns, and readers racing a writer never see an old or torn body.
#[cfg(test)]
mod store_tests {
    use super::*;
    use crate::store::{PutOptions, StoreConfig};
    use std::sync::atomic::AtomicBool;

    fn store(dir: &std::path::Path) -> Store {
        let store = Store::open(StoreConfig {
            data_dir: dir.to_path_buf(),
            ..StoreConfig::default()
        })
        .expect("store");
        store.set_hot_set_bytes(4 << 20);
        store
    }

    fn put_with(store: &Store, key: &str, body: &[u8], options: PutOptions) {
        let mut w = store.begin_put("n", key, options).expect("begin");
        w.write(body).expect("write");
        w.commit().expect("commit");
    }

    fn put(store: &Store, key: &str, body: &[u8]) {
        put_with(store, key, body, PutOptions::default());
    }

    /// A GET as the app does it: the hot set, else open and offer. The body it would send.
    fn get(store: &Store, key: &str) -> Option<Vec<u8>> {
        let miss = match store.hot_get("n", key) {
            HotGet::Hit(entry) => return Some(body_of(&entry)),
            HotGet::Miss(miss) => miss,
            HotGet::Off => panic!("the hot set is on"),
        };
        let artifact = store.get("n", key).expect("get")?;
        if let Some(entry) = store.hot_admit(miss, &artifact) {
            return Some(body_of(&entry));
        }
        let mut body = vec![0u8; artifact.len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&*artifact.file, &mut body, artifact.body_offset)
            .expect("read");
        Some(body)
    }

    fn body_of(entry: &HotEntry) -> Vec<u8> {
        match &entry.body {
            HotBody::Memory(bytes) => bytes.to_vec(),
            HotBody::File(file) => {
                let mut body = vec![0u8; entry.len as usize];
                std::os::unix::fs::FileExt::read_exact_at(&**file, &mut body, 64).expect("read");
                body
            }
        }
    }

    fn hot_now(store: &Store, key: &str) -> bool {
        let rel = relative_path("n", key);
        matches!(
            store.shared().index.hot.lookup(&rel, now_ms()),
            Lookup::Hit { .. }
        )
    }

    #[test]
    fn every_change_drops_the_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        put(&store, "k", b"one");
        assert_eq!(get(&store, "k").as_deref(), Some(&b"one"[..]));
        assert!(hot_now(&store, "k"), "admitted on the first GET");

        // A client's PUT.
        put(&store, "k", b"two");
        assert!(!hot_now(&store, "k"));
        assert_eq!(get(&store, "k").as_deref(), Some(&b"two"[..]));

        // A replicated write (last writer wins, the origin's later time).
        let later = now_ms() + 60_000;
        put_with(
            &store,
            "k",
            b"three",
            PutOptions {
                write_time_ms: Some(later),
                last_writer_wins: true,
                ..PutOptions::default()
            },
        );
        assert!(!hot_now(&store, "k"));
        assert_eq!(get(&store, "k").as_deref(), Some(&b"three"[..]));

        // A replicated delete (tombstone).
        store
            .delete_at("n", "k", later + 1, false)
            .expect("delete_at");
        assert!(!hot_now(&store, "k"));
        assert_eq!(get(&store, "k"), None);

        // A client's DELETE.
        put(&store, "d", b"gone soon");
        assert!(get(&store, "d").is_some());
        assert!(hot_now(&store, "d"));
        assert!(store.delete("n", "d").expect("delete"));
        assert!(!hot_now(&store, "d"));
        assert_eq!(get(&store, "d"), None);
        assert!(store.hot_stats().invalidations_total >= 3);
    }

    /// A large artifact keeps its header and file, and a replacement drops them too.
    #[test]
    fn large_artifacts_keep_their_header_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let big = vec![5u8; 200_000];
        put(&store, "big", &big);
        assert_eq!(get(&store, "big").as_deref(), Some(&big[..]));
        match store.hot_get("n", "big") {
            HotGet::Hit(entry) => {
                assert!(matches!(entry.body, HotBody::File(_)));
                assert_eq!(entry.len, big.len() as u64);
            }
            other => panic!("expected a hit, got {other:?}"),
        }
        let big2 = vec![6u8; 150_000];
        put(&store, "big", &big2);
        assert_eq!(get(&store, "big").as_deref(), Some(&big2[..]));
    }

    /// Writers replace a key over and over while readers GET it through the hot set: each
    /// body a reader gets is whole (its bytes are one version's) and never older than the
    /// last version acknowledged before the GET began.
    #[test]
    fn readers_racing_writers_never_see_stale_or_torn_bodies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let body = |v: u64| -> Vec<u8> {
            let mut b = v.to_le_bytes().repeat(512);
            b.truncate(4096);
            b
        };
        put(&store, "race", &body(0));
        let acked = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (store, acked, done) = (store.clone(), Arc::clone(&acked), Arc::clone(&done));
                std::thread::spawn(move || {
                    let mut reads = 0u64;
                    while !done.load(Ordering::Acquire) {
                        let floor = acked.load(Ordering::Acquire);
                        let got = get(&store, "race").expect("present");
                        let v = u64::from_le_bytes(got[..8].try_into().expect("8 bytes"));
                        assert_eq!(got, body(v), "a torn body");
                        assert!(v >= floor, "version {v} after {floor} was acknowledged");
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for v in 1..=300 {
            put(&store, "race", &body(v));
            acked.store(v, Ordering::Release);
        }
        done.store(true, Ordering::Release);
        let reads: u64 = readers.into_iter().map(|r| r.join().expect("reader")).sum();
        assert!(reads > 300, "{reads} reads");
        let stats = store.hot_stats();
        assert!(stats.hits_total > 0, "{stats:?}");
    }
}
