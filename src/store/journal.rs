//! The commit journal: small uploads made durable by one sync of a shared
//! log instead of one sync (and a directory sync) each.
//!
//! Under `fsync = always` a finished upload of at most
//! [`JOURNAL_FILE_BYTES_MAX`] bytes (header included) is copied, whole, into
//! a record of the current segment `data_dir/.journal/{id:020}.log`; one
//! `fdatasync` of the segment ([`GroupSync`]: the first waiter leads, everyone
//! who appended before it began is covered) makes every record in it
//! durable, and only then is each artifact renamed into place, without a sync
//! of its own file or directory. A larger upload syncs its own file and
//! directory (many in flight at once) and appends a small *marker* record;
//! a delete appends a *delete* record. Records are appended under the key's
//! index lock or before the rename they describe is checked against it, so
//! for any key the journal's order is the order its versions became
//! visible (see [`Journal::may_publish`]).
//!
//! Every [`CHECKPOINT_INTERVAL_MS`] (sooner when the segment passes
//! [`SEGMENT_BYTES`]) the checkpointer seals the segment, waits until every
//! commit that appended to it has published, calls `syncfs` on the data
//! directory's filesystem (one flush makes every artifact file and directory
//! entry written so far durable) and deletes the sealed segments. Past
//! [`JOURNAL_BYTES_MAX`] of unsealed records (a slow `syncfs`) uploads stop
//! being journaled and take the per-file path until a checkpoint frees room:
//! the journal degrades to the old path, never to a stall.
//!
//! After a crash, [`recover`] replays every segment before the store serves,
//! key by key, to the last record of each key, which is the version that was
//! visible last:
//! - a put record: the artifact file must be exactly the record's bytes;
//!   anything else (missing, torn, zeros where the data never reached the
//!   disk) is rewritten from the record. A replicated put
//!   (last-writer-wins) is rewritten only if it is still newer than what the
//!   disk holds and than the key's tombstone, as it was when it was applied.
//! - a marker: the artifact was synced before the marker was written, so a
//!   file whose header names the marker's version is whole. Otherwise the
//!   rename never became durable (no 2xx was sent for it); if the file holds
//!   the version of an earlier put record of the key it is checked (and
//!   rewritten) as that record.
//! - a delete: the artifact file is removed.
//!
//! then `syncfs`, then the segments are removed. A record is written before
//! its sync and acknowledged after it, so the first record that does not
//! check out (bad magic, checksum or body digest: a write the crash cut)
//! ends its segment, and nothing after it was acknowledged.
//!
//! Record layout (little-endian), then the store-relative path, then for a
//! put record the artifact file's bytes (its own header and body):
//!
//! ```text
//! offset size field
//!      0    8 magic            b"SLUICEJ1"
//!      8    8 sequence number  one more than the record before it
//!     16    1 kind             1 put, 2 marker, 3 delete
//!     17    1 flags            bit 0: last-writer-wins (a replicated write)
//!     18    2 path length      bytes of `ns/xx/key` after the header
//!     20    4 reserved         0
//!     24    8 write time       ms since the epoch (the file's mtime; a delete's time)
//!     32    8 file length      artifact file bytes after the path (0 unless put)
//!     40    8 body length      the artifact's body bytes
//!     48   32 body sha256
//!     80    8 checksum         first 8 bytes of sha256(bytes 0..80 ++ path)
//! ```

use super::{format, temp_name, Shared, StoreError};
use crate::group_sync::{GroupSync, Ticket};
use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

/// The directory under `data_dir` holding the segments. Starts with a dot,
/// so it is never a namespace.
pub const JOURNAL_DIR: &str = ".journal";
/// Largest artifact file (header + body, bytes) written through the journal;
/// larger ones sync their own file. About where copying the bytes a second
/// time costs this disk more than a sync of their own.
pub const JOURNAL_FILE_BYTES_MAX: u64 = 256 * 1024;
/// A segment past this many bytes is sealed and checkpointed at once.
pub const SEGMENT_BYTES: u64 = 32 * 1024 * 1024;
/// Bytes of segments not yet checkpointed past which uploads stop being
/// journaled (and sync their own files) until a checkpoint frees room.
pub const JOURNAL_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// How often the checkpointer runs while records arrive, ms.
pub const CHECKPOINT_INTERVAL_MS: u64 = 1000;
/// Syncs of one segment in flight at once: a commit no running sync covers
/// starts its own rather than wait for one to end (see `group_sync`).
pub const SYNCS_IN_FLIGHT: usize = 2;

const _: () = assert!(JOURNAL_FILE_BYTES_MAX < SEGMENT_BYTES);
const _: () = assert!(2 * SEGMENT_BYTES <= JOURNAL_BYTES_MAX);

const MAGIC: [u8; 8] = *b"SLUICEJ1";
const RECORD_HEADER_BYTES: usize = 88;
const CHECKSUM_AT: usize = 80;
/// Longest store-relative path a record holds.
const PATH_BYTES_MAX: usize = u16::MAX as usize;

/// What a record says about its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// The artifact's bytes follow: this version, whole.
    Put = 1,
    /// This version was synced in its own file before the record.
    Marker = 2,
    /// The key was deleted.
    Delete = 3,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Put),
            2 => Some(Kind::Marker),
            3 => Some(Kind::Delete),
            _ => None,
        }
    }
}

/// A record's fixed part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Head {
    pub seq: u64,
    pub kind: Kind,
    pub lww: bool,
    pub write_time_ms: u64,
    pub file_len: u64,
    pub body_len: u64,
    pub sha256: [u8; 32],
}

fn checksum(head: &[u8], path: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(head);
    h.update(path);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize()[..8]);
    out
}

impl Head {
    /// The header and path of a record.
    pub fn encode(&self, path: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_HEADER_BYTES + path.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.push(self.kind as u8);
        out.push(u8::from(self.lww));
        out.extend_from_slice(&(path.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
        out.extend_from_slice(&self.write_time_ms.to_le_bytes());
        out.extend_from_slice(&self.file_len.to_le_bytes());
        out.extend_from_slice(&self.body_len.to_le_bytes());
        out.extend_from_slice(&self.sha256);
        let sum = checksum(&out[..CHECKSUM_AT], path.as_bytes());
        out.extend_from_slice(&sum);
        out.extend_from_slice(path.as_bytes());
        out
    }

    /// Decodes a record header; returns it and the path length that
    /// follows. `None` for anything that is not a whole, intact header.
    pub fn decode(bytes: &[u8]) -> Option<(Head, usize)> {
        let h = bytes.get(..RECORD_HEADER_BYTES)?;
        if h[..8] != MAGIC {
            return None;
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let kind = Kind::from_u8(h[16])?;
        let path_len = usize::from(u16::from_le_bytes([h[18], h[19]]));
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&h[48..80]);
        let head = Head {
            seq: u64_at(8),
            kind,
            lww: h[17] & 1 != 0,
            write_time_ms: u64_at(24),
            file_len: u64_at(32),
            body_len: u64_at(40),
            sha256,
        };
        if h[17] & !1 != 0 || h[20..24] != [0; 4] {
            return None;
        }
        if kind != Kind::Put && head.file_len != 0 {
            return None;
        }
        if head.file_len > JOURNAL_FILE_BYTES_MAX
            || (kind == Kind::Put && head.body_len > head.file_len)
        {
            return None;
        }
        Some((head, path_len))
    }

    /// Whether the path that followed the header matches its checksum.
    pub(super) fn check(bytes: &[u8], path: &[u8]) -> bool {
        bytes.len() >= RECORD_HEADER_BYTES
            && bytes[CHECKSUM_AT..RECORD_HEADER_BYTES] == checksum(&bytes[..CHECKSUM_AT], path)
    }
}

/// One segment file and the syncs of what was appended to it.
pub(super) struct Segment {
    /// Its file name in `.journal/`.
    name: String,
    /// Open and `flock`ed for the segment's life: a live process's segments
    /// are locked, so another process opening the store (a binary upgrade)
    /// leaves them alone.
    file: File,
    /// Bytes appended (changed under `Inner`'s lock only).
    len: AtomicU64,
    group: GroupSync,
    /// Commits that appended here and have not finished publishing: a
    /// checkpoint waits for them, so its `syncfs` covers their renames.
    pending: AtomicU64,
    /// A sync failed: what it held may be lost, so nothing more is appended
    /// or acknowledged from this segment.
    poisoned: AtomicBool,
}

impl Segment {
    fn sync(&self) -> Result<(), Errno> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Errno::IO);
        }
        rustix::fs::fdatasync(&self.file).inspect_err(|_| {
            // After a failed fdatasync the kernel may have dropped the dirty
            // pages; a later sync succeeding would not bring them back.
            self.poisoned.store(true, Ordering::Release);
        })
    }
}

/// An appended record: wait for it with [`Journal::wait`], then
/// [`Journal::finish`] it once what it describes is published (or failed).
pub(super) struct Appended {
    segment: Arc<Segment>,
    ticket: Ticket,
    pub seq: u64,
}

struct Inner {
    active: Arc<Segment>,
    sealed: Vec<Arc<Segment>>,
    next_seq: u64,
    next_id: u64,
    /// Bytes in every segment not yet checkpointed.
    bytes: u64,
}

/// Per key with a put record appended and not yet published: the newest
/// sequence number published for it (a put, a marker or a delete).
#[derive(Default)]
struct KeyState {
    pending: u32,
    published_seq: u64,
}

/// Counters for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Put records appended (uploads made durable by the journal).
    pub puts_total: u64,
    /// Marker and delete records appended.
    pub markers_total: u64,
    /// Uploads small enough for the journal that took the per-file path
    /// because it was at [`JOURNAL_BYTES_MAX`].
    pub full_total: u64,
    /// Journal syncs (`fdatasync` of a segment).
    pub syncs_total: u64,
    /// Checkpoints (`syncfs`) completed.
    pub checkpoints_total: u64,
    /// Bytes in segments not yet checkpointed.
    pub bytes: u64,
}

/// The journal of one store (only under `fsync = always`).
pub(super) struct Journal {
    dir_fd: OwnedFd,
    /// [`JOURNAL_BYTES_MAX`]; lowered by tests.
    pub(super) bytes_max: AtomicU64,
    /// Checkpoint once more when the store shuts down (a restart then has
    /// nothing to replay). Tests clear it to leave the journal as a crash
    /// would.
    pub(super) final_checkpoint: AtomicBool,
    /// No checkpoints but the ones asked for by a call (tests).
    pub(super) paused: AtomicBool,
    inner: Mutex<Inner>,
    keys: Mutex<HashMap<Box<str>, KeyState>>,
    wake: Mutex<bool>,
    cond: Condvar,
    puts_total: AtomicU64,
    markers_total: AtomicU64,
    full_total: AtomicU64,
    syncs_total: AtomicU64,
    checkpoints_total: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A segment's file name: its id, then the writing process's id, so two
/// processes sharing the data directory (a binary upgrade hands the
/// listeners over while both serve) never pick the same name.
fn segment_name(id: u64) -> String {
    format!("{id:020}.{}.log", std::process::id())
}

/// The segments in `dir` as (id, file name), in id order.
fn segments_in(dir: &OwnedFd) -> io::Result<Vec<(u64, String)>> {
    let mut out = Vec::new();
    let dir = rustix::fs::Dir::read_from(dir).map_err(io::Error::from)?;
    for entry in dir {
        let entry = entry.map_err(io::Error::from)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let id = name
            .strip_suffix(".log")
            .and_then(|n| n.split('.').next())
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(id) = id {
            out.push((id, name));
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn open_journal_dir(sh: &Shared) -> Result<OwnedFd, StoreError> {
    let path = sh.path(JOURNAL_DIR);
    sh.mkdir(&sh.data_dir_fd, JOURNAL_DIR, &sh.data_dir.display())?;
    rustix::fs::openat(
        &sh.data_dir_fd,
        JOURNAL_DIR,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| sh.errno("open directory", &path.display(), e))
}

fn syncfs(sh: &Shared) -> Result<(), StoreError> {
    rustix::fs::syncfs(&sh.data_dir_fd).map_err(|e| sh.errno("syncfs", &sh.data_dir.display(), e))
}

impl Journal {
    /// A new journal with an empty first segment (after [`recover`]).
    pub fn create(sh: &Shared) -> Result<Journal, StoreError> {
        let dir_fd = open_journal_dir(sh)?;
        let next_id = segments_in(&dir_fd)
            .map_err(|e| sh.io("read directory", &sh.path(JOURNAL_DIR).display(), e))?
            .last()
            .map_or(0, |(id, _)| id + 1);
        let active = new_segment(sh, &dir_fd, next_id)?;
        Ok(Journal {
            dir_fd,
            bytes_max: AtomicU64::new(JOURNAL_BYTES_MAX),
            final_checkpoint: AtomicBool::new(true),
            paused: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                active: Arc::new(active),
                sealed: Vec::new(),
                next_seq: 1,
                next_id: next_id + 1,
                bytes: 0,
            }),
            keys: Mutex::new(HashMap::new()),
            wake: Mutex::new(false),
            cond: Condvar::new(),
            puts_total: AtomicU64::new(0),
            markers_total: AtomicU64::new(0),
            full_total: AtomicU64::new(0),
            syncs_total: AtomicU64::new(0),
            checkpoints_total: AtomicU64::new(0),
        })
    }

    pub fn stats(&self) -> JournalStats {
        let inner = lock(&self.inner);
        let syncs = inner
            .sealed
            .iter()
            .map(|s| s.group.syncs_total())
            .sum::<u64>()
            + inner.active.group.syncs_total();
        JournalStats {
            puts_total: self.puts_total.load(Ordering::Relaxed),
            markers_total: self.markers_total.load(Ordering::Relaxed),
            full_total: self.full_total.load(Ordering::Relaxed),
            syncs_total: self.syncs_total.load(Ordering::Relaxed) + syncs,
            checkpoints_total: self.checkpoints_total.load(Ordering::Relaxed),
            bytes: inner.bytes,
        }
    }

    /// Appends a put record holding the finished artifact file `file`
    /// (`file_len` bytes: header and body). `None` when it is too large for
    /// the journal, the journal is full, or the append failed: the caller
    /// syncs the file itself.
    pub fn append_put(&self, sh: &Shared, rel: &str, head: Head, file: &File) -> Option<Appended> {
        if head.file_len > JOURNAL_FILE_BYTES_MAX || rel.len() > PATH_BYTES_MAX {
            return None;
        }
        let mut inner = lock(&self.inner);
        let record_len = (RECORD_HEADER_BYTES + rel.len()) as u64 + head.file_len;
        if inner.bytes + record_len > self.bytes_max.load(Ordering::Relaxed) {
            drop(inner);
            self.full_total.fetch_add(1, Ordering::Relaxed);
            self.kick();
            return None;
        }
        match self.append_locked(sh, &mut inner, rel, head, Some(file)) {
            Ok(appended) => {
                drop(inner);
                let mut keys = lock(&self.keys);
                keys.entry(rel.into()).or_default().pending += 1;
                self.puts_total.fetch_add(1, Ordering::Relaxed);
                Some(appended)
            }
            // Out of space was logged once, when it began.
            Err(StoreError::NoSpace) => None,
            Err(e) => {
                tracing::warn!(error = %e, "journal append failed; the upload syncs its own file");
                None
            }
        }
    }

    /// Appends a marker (`kind` Marker: a version synced in its own file) or
    /// a delete record for `rel`. Called under `rel`'s index lock, right
    /// before the rename or unlink it stands for, so its sequence number
    /// orders it against the key's other records as it is published.
    pub fn append_mark(&self, sh: &Shared, rel: &str, head: Head) -> Result<Appended, StoreError> {
        if rel.len() > PATH_BYTES_MAX {
            return Err(StoreError::InvalidKey);
        }
        let mut inner = lock(&self.inner);
        let appended = self.append_locked(sh, &mut inner, rel, head, None)?;
        drop(inner);
        self.markers_total.fetch_add(1, Ordering::Relaxed);
        let seq = appended.seq;
        if let Some(key) = lock(&self.keys).get_mut(rel) {
            key.published_seq = key.published_seq.max(seq);
        }
        Ok(appended)
    }

    fn append_locked(
        &self,
        sh: &Shared,
        inner: &mut Inner,
        rel: &str,
        mut head: Head,
        file: Option<&File>,
    ) -> Result<Appended, StoreError> {
        if inner.active.poisoned.load(Ordering::Acquire) {
            self.roll_locked(sh, inner)?;
        }
        head.seq = inner.next_seq;
        let bytes = head.encode(rel);
        let segment = Arc::clone(&inner.active);
        let at = segment.len.load(Ordering::Relaxed);
        let journal_path = || sh.path(JOURNAL_DIR).join(&segment.name);
        let written = segment
            .file
            .write_all_at(&bytes, at)
            .and_then(|()| match file {
                Some(file) => {
                    copy_into(file, head.file_len, &segment.file, at + bytes.len() as u64)
                }
                None => Ok(()),
            });
        if let Err(e) = written {
            // A partial record would hide every record after it from a
            // replay: start a new segment for those.
            segment.poisoned.store(true, Ordering::Release);
            return Err(sh.io("append to", &journal_path().display(), e));
        }
        let len = bytes.len() as u64 + head.file_len;
        segment.len.store(at + len, Ordering::Relaxed);
        inner.bytes += len;
        inner.next_seq += 1;
        let ticket = segment.group.register();
        segment.pending.fetch_add(1, Ordering::AcqRel);
        if at + len >= SEGMENT_BYTES {
            self.kick();
        }
        Ok(Appended {
            segment,
            ticket,
            seq: head.seq,
        })
    }

    /// Starts a new active segment now (the current one is poisoned); the old
    /// one is checkpointed with the sealed ones.
    fn roll_locked(&self, sh: &Shared, inner: &mut Inner) -> Result<(), StoreError> {
        let segment = new_segment(sh, &self.dir_fd, inner.next_id)?;
        inner.next_id += 1;
        let old = std::mem::replace(&mut inner.active, Arc::new(segment));
        inner.sealed.push(old);
        Ok(())
    }

    /// Returns once `appended` is on stable storage (a segment sync that
    /// began after it was appended completed).
    pub fn wait(&self, sh: &Shared, appended: &Appended) -> Result<(), StoreError> {
        let segment = &appended.segment;
        segment.group.wait(appended.ticket, || {
            segment.sync().map_err(|e| {
                let path = sh.path(JOURNAL_DIR).join(&segment.name);
                sh.errno("fdatasync", &path.display(), e)
            })
        })
    }

    /// Under `rel`'s index lock, before publishing the put record `seq`:
    /// false when a later record of the key was published already (this
    /// version is superseded in the journal's order, so it must not become
    /// visible after it). True records `seq` as published.
    pub fn may_publish(&self, rel: &str, seq: u64) -> bool {
        let mut keys = lock(&self.keys);
        match keys.get_mut(rel) {
            Some(key) if key.published_seq > seq => false,
            Some(key) => {
                key.published_seq = seq;
                true
            }
            None => true,
        }
    }

    /// What `appended` stands for is published, or failed: a checkpoint may
    /// cover it now. `put`: it was a put record of `rel`.
    pub fn finish(&self, rel: &str, appended: Appended, put: bool) {
        if put {
            let mut keys = lock(&self.keys);
            if let Some(key) = keys.get_mut(rel) {
                key.pending -= 1;
                if key.pending == 0 {
                    keys.remove(rel);
                }
            }
        }
        appended.segment.pending.fetch_sub(1, Ordering::AcqRel);
    }

    /// Wake the checkpointer (a segment is full, or the journal is).
    pub(super) fn kick(&self) {
        *lock(&self.wake) = true;
        self.cond.notify_one();
    }

    /// The checkpointer's loop: runs until `stopping()`, and checkpoints a
    /// last time then.
    pub fn run_checkpoints(&self, sh: &Shared) {
        while !sh.stopping() {
            {
                let woken = lock(&self.wake);
                let (mut woken, _) = self
                    .cond
                    .wait_timeout_while(woken, Duration::from_millis(CHECKPOINT_INTERVAL_MS), |w| {
                        !*w && !sh.stopping()
                    })
                    .unwrap_or_else(PoisonError::into_inner);
                *woken = false;
            }
            if sh.stopping() && !self.final_checkpoint.load(Ordering::Acquire) {
                return;
            }
            if self.paused.load(Ordering::Acquire) {
                continue;
            }
            if let Err(e) = self.checkpoint(sh) {
                tracing::warn!(error = %e, "journal checkpoint failed; retrying in a second");
            }
        }
    }

    /// Seals the active segment (if it holds anything), waits until the
    /// commits of every sealed segment have published, `syncfs`, and
    /// removes the sealed segments.
    pub fn checkpoint(&self, sh: &Shared) -> Result<(), StoreError> {
        let has_records = lock(&self.inner).active.len.load(Ordering::Relaxed) > 0;
        if has_records {
            // Created before taking the lock: appends go on meanwhile.
            let id = {
                let mut inner = lock(&self.inner);
                inner.next_id += 1;
                inner.next_id - 1
            };
            let fresh = Arc::new(new_segment(sh, &self.dir_fd, id)?);
            let mut inner = lock(&self.inner);
            let old = std::mem::replace(&mut inner.active, fresh);
            inner.sealed.push(old);
        }
        let sealed: Vec<Arc<Segment>> = lock(&self.inner).sealed.clone();
        if sealed.is_empty() {
            return Ok(());
        }
        for segment in &sealed {
            // Commits publish within a sync or two; wait for them so the
            // syncfs below covers their renames.
            while segment.pending.load(Ordering::Acquire) > 0 {
                if sh.stopping() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        syncfs(sh)?;
        let mut freed = 0;
        for segment in &sealed {
            let name = segment.name.as_str();
            if let Err(e) = rustix::fs::unlinkat(&self.dir_fd, name, AtFlags::empty()) {
                tracing::warn!(error = %e, segment = name, "cannot remove a checkpointed journal segment");
            }
            freed += segment.len.load(Ordering::Relaxed);
            self.syncs_total
                .fetch_add(segment.group.syncs_total(), Ordering::Relaxed);
        }
        let mut inner = lock(&self.inner);
        inner
            .sealed
            .retain(|s| !sealed.iter().any(|d| d.name == s.name));
        inner.bytes = inner.bytes.saturating_sub(freed);
        drop(inner);
        self.checkpoints_total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn new_segment(sh: &Shared, dir_fd: &OwnedFd, id: u64) -> Result<Segment, StoreError> {
    let name = segment_name(id);
    let path = sh.path(JOURNAL_DIR).join(&name);
    let fd = rustix::fs::openat(
        dir_fd,
        name.as_str(),
        OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| sh.errno("create journal segment", &path.display(), e))?;
    rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive)
        .map_err(|e| sh.errno("lock journal segment", &path.display(), e))?;
    // The segment's name must survive a crash for its records to.
    rustix::fs::fsync(dir_fd)
        .map_err(|e| sh.errno("fsync directory", &sh.path(JOURNAL_DIR).display(), e))?;
    Ok(Segment {
        name,
        file: File::from(fd),
        len: AtomicU64::new(0),
        group: GroupSync::with_syncs_in_flight(SYNCS_IN_FLIGHT),
        pending: AtomicU64::new(0),
        poisoned: AtomicBool::new(false),
    })
}

/// Copies `len` bytes of `from` (from its start) to `to` at `at`: in the
/// kernel with `copy_file_range` where it can, else through a buffer.
fn copy_into(from: &File, len: u64, to: &File, at: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut off_in = done;
        let mut off_out = at + done;
        let want = usize::try_from(len - done).unwrap_or(usize::MAX);
        match rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "artifact file shorter than its length",
                ))
            }
            Ok(n) => done += n as u64,
            Err(Errno::INTR) => {}
            Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                return copy_through_buffer(from, done, len, to, at)
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_through_buffer(from: &File, mut done: u64, len: u64, to: &File, at: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    while done < len {
        let n = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        from.read_exact_at(&mut buf[..n], done)?;
        to.write_all_at(&buf[..n], at + done)?;
        done += n as u64;
    }
    Ok(())
}

/// One record found by a replay: where its file bytes are.
struct Found {
    head: Head,
    segment: usize,
    file_at: u64,
}

/// What [`recover`] did, for the log and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Records read from the segments left by the previous run.
    pub records: u64,
    /// Artifact files rewritten from put records.
    pub rewritten: u64,
    /// Artifact files removed by delete records.
    pub removed: u64,
    /// Segments that ended in a record a crash cut (never acknowledged).
    pub torn: u64,
}

/// Replays the segments a previous run left (see the module docs), makes
/// the result durable and removes them. Runs in `Store::open`, before
/// anything is served and before the journal of this run exists.
pub(super) fn recover(sh: &Shared) -> Result<Recovered, StoreError> {
    let mut recovered = Recovered::default();
    let dir_path = sh.path(JOURNAL_DIR);
    let dir_fd = match rustix::fs::openat(
        &sh.data_dir_fd,
        JOURNAL_DIR,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(recovered),
        Err(e) => return Err(sh.errno("open directory", &dir_path.display(), e)),
    };
    let listed =
        segments_in(&dir_fd).map_err(|e| sh.io("read directory", &dir_path.display(), e))?;
    // Only segments nobody holds: a live process (the old one during a
    // binary upgrade) keeps its own, and checkpoints or replays them itself.
    let mut names = Vec::with_capacity(listed.len());
    for (_, name) in listed {
        let path = dir_path.join(&name);
        let file = File::open(&path).map_err(|e| sh.io("open", &path.display(), e))?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => names.push((name, file)),
            Err(Errno::WOULDBLOCK) => {
                tracing::info!(segment = %path.display(), "journal segment of a live process left to it");
            }
            Err(e) => return Err(sh.errno("lock journal segment", &path.display(), e)),
        }
    }
    if names.is_empty() {
        return Ok(recovered);
    }
    let mut segments = Vec::with_capacity(names.len());
    // Every record of each key, in journal order.
    let mut keys: HashMap<String, Vec<Found>> = HashMap::new();
    for (name, file) in &names {
        let path = dir_path.join(name);
        let file = file
            .try_clone()
            .map_err(|e| sh.io("open", &path.display(), e))?;
        let size = file
            .metadata()
            .map_err(|e| sh.io("stat", &path.display(), e))?
            .len();
        let index = segments.len();
        let mut at = 0u64;
        while at < size {
            match read_record(&file, at, size) {
                Some((head, rel, file_at, next)) => {
                    recovered.records += 1;
                    let found = Found {
                        head,
                        segment: index,
                        file_at,
                    };
                    keys.entry(rel).or_default().push(found);
                    at = next;
                }
                None => {
                    recovered.torn += 1;
                    tracing::warn!(
                        segment = %path.display(),
                        offset = at,
                        "journal: a record cut by a crash ends the segment (it was never acknowledged)"
                    );
                    break;
                }
            }
        }
        segments.push(file);
    }
    for (rel, records) in &keys {
        let Some(found) = winner(sh, rel, records) else {
            continue;
        };
        match found.head.kind {
            Kind::Delete => {
                match rustix::fs::unlinkat(&sh.data_dir_fd, rel.as_str(), AtFlags::empty()) {
                    Ok(()) => recovered.removed += 1,
                    Err(Errno::NOENT | Errno::NOTDIR) => {}
                    Err(e) => return Err(sh.errno("unlink", &sh.path(rel).display(), e)),
                }
            }
            Kind::Put => {
                if restore_if_needed(sh, rel, found, &segments)? {
                    recovered.rewritten += 1;
                }
            }
            Kind::Marker => {
                let on_disk = header_at(sh, rel);
                if on_disk == Some((found.head.body_len, found.head.sha256)) {
                    continue;
                }
                // The marker's rename did not survive: check the version the
                // file holds if an earlier record of this run wrote it.
                let Some(on_disk) = on_disk else { continue };
                let older = records.iter().rev().find(|f| {
                    f.head.kind == Kind::Put && (f.head.body_len, f.head.sha256) == on_disk
                });
                if let Some(older) = older {
                    if restore_if_needed(sh, rel, older, &segments)? {
                        recovered.rewritten += 1;
                    }
                }
            }
        }
    }
    syncfs(sh)?;
    for (name, _) in &names {
        rustix::fs::unlinkat(&dir_fd, name.as_str(), AtFlags::empty())
            .map_err(|e| sh.errno("unlink", &dir_path.join(name).display(), e))?;
    }
    if recovered.records > 0 {
        tracing::info!(
            records = recovered.records,
            rewritten = recovered.rewritten,
            removed = recovered.removed,
            torn = recovered.torn,
            "journal replayed"
        );
    }
    Ok(recovered)
}

/// Reads the record at `at`: its head, path, where its file bytes start
/// and where the next record starts. `None` if it does not check out.
fn read_record(file: &File, at: u64, size: u64) -> Option<(Head, String, u64, u64)> {
    let mut head_bytes = [0u8; RECORD_HEADER_BYTES];
    if at + RECORD_HEADER_BYTES as u64 > size {
        return None;
    }
    file.read_exact_at(&mut head_bytes, at).ok()?;
    let (head, path_len) = Head::decode(&head_bytes)?;
    let path_at = at + RECORD_HEADER_BYTES as u64;
    let file_at = path_at + path_len as u64;
    let next = file_at.checked_add(head.file_len)?;
    if next > size {
        return None;
    }
    let mut path = vec![0u8; path_len];
    file.read_exact_at(&mut path, path_at).ok()?;
    if !Head::check(&head_bytes, &path) {
        return None;
    }
    let rel = String::from_utf8(path).ok()?;
    if rel.starts_with('.') || rel.contains("..") || rel.starts_with('/') {
        return None;
    }
    if head.kind == Kind::Put {
        // The body must be whole: its digest is the artifact's own.
        let bytes = read_file_bytes(file, file_at, head.file_len).ok()?;
        let body_at = usize::try_from(head.file_len.checked_sub(head.body_len)?).ok()?;
        let body: [u8; 32] = Sha256::digest(&bytes[body_at..]).into();
        let header = format::decode_header(&bytes).ok()?;
        if body != head.sha256 || header.sha256 != head.sha256 || header.body_len != head.body_len {
            return None;
        }
    }
    Some((head, rel, file_at, next))
}

fn read_file_bytes(file: &File, at: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
    file.read_exact_at(&mut bytes, at)?;
    Ok(bytes)
}

/// `(body length, sha256)` from the header of the artifact file at `rel`.
fn header_at(sh: &Shared, rel: &str) -> Option<(u64, [u8; 32])> {
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let fd = rustix::fs::openat(&sh.data_dir_fd, rel, flags, Mode::empty()).ok()?;
    let mut head = [0u8; format::HEADER_BYTES];
    let n = rustix::io::pread(&fd, &mut head, 0).ok()?;
    let header = format::decode_header(&head[..n]).ok()?;
    Some((header.body_len, header.sha256))
}

/// The record of `rel` that was visible last: the last one, except that a
/// replicated put (last-writer-wins) counts only if it was newer than what
/// it found, as its commit decided: than the record before it (a delete by
/// its time, a version by `(write time, sha256)`), or for the first record
/// of the key, than the artifact on disk (checkpointed, so whole) and the
/// key's tombstone. `None`: nothing in the journal changes the disk.
fn winner<'a>(sh: &Shared, rel: &str, records: &'a [Found]) -> Option<&'a Found> {
    let mut current: Option<&Found> = None;
    for found in records {
        let head = &found.head;
        if head.kind != Kind::Put || !head.lww {
            current = Some(found);
            continue;
        }
        let ours = (head.write_time_ms, head.sha256);
        let newer = match current {
            Some(c) if c.head.kind == Kind::Delete => head.write_time_ms > c.head.write_time_ms,
            Some(c) => ours > (c.head.write_time_ms, c.head.sha256),
            None => {
                let disk = sh.version_at(rel);
                // The disk holding this very version means this record was
                // published (and may be torn): it is the one to check.
                disk == Some(ours)
                    || (disk.is_none_or(|local| local < ours)
                        && sh
                            .tombstone_time(rel)
                            .is_none_or(|t| t < head.write_time_ms))
            }
        };
        if newer {
            current = Some(found);
        }
    }
    current
}

/// Makes the artifact at `rel` exactly the put record `found`'s bytes,
/// unless it already is. Returns whether it rewrote the file.
fn restore_if_needed(
    sh: &Shared,
    rel: &str,
    found: &Found,
    segments: &[File],
) -> Result<bool, StoreError> {
    let segment = &segments[found.segment];
    let bytes = read_file_bytes(segment, found.file_at, found.head.file_len)
        .map_err(|e| sh.io("read journal record for", &sh.path(rel).display(), e))?;
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    if let Ok(fd) = rustix::fs::openat(&sh.data_dir_fd, rel, flags, Mode::empty()) {
        let file = File::from(fd);
        let same_len = file
            .metadata()
            .is_ok_and(|m| m.len() == found.head.file_len);
        if same_len {
            let mut on_disk = vec![0u8; bytes.len()];
            if file.read_exact_at(&mut on_disk, 0).is_ok() && on_disk == bytes {
                return Ok(false);
            }
        }
    }
    write_artifact(sh, rel, &bytes, found.head.write_time_ms)?;
    Ok(true)
}

/// Writes `bytes` as the artifact file at `rel` (temp file, write time,
/// rename), without syncing: the caller's `syncfs` does.
fn write_artifact(
    sh: &Shared,
    rel: &str,
    bytes: &[u8],
    write_time_ms: u64,
) -> Result<(), StoreError> {
    let path = sh.path(rel);
    let (dir_rel, name) = rel.rsplit_once('/').ok_or(StoreError::InvalidKey)?;
    let dir_fd = sh.open_artifact_dir(dir_rel)?;
    let temp = temp_name();
    let fd = rustix::fs::openat(
        &dir_fd,
        temp.as_str(),
        OFlags::CREATE | OFlags::TRUNC | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o644),
    )
    .map_err(|e| sh.errno("create temp file for", &path.display(), e))?;
    let file = File::from(fd);
    let written = file
        .write_all_at(bytes, 0)
        .and_then(|()| file.set_modified(UNIX_EPOCH + Duration::from_millis(write_time_ms)));
    if let Err(e) = written {
        let _ = rustix::fs::unlinkat(&dir_fd, temp.as_str(), AtFlags::empty());
        return Err(sh.io("write", &path.display(), e));
    }
    if let Err(e) = rustix::fs::renameat(&dir_fd, temp.as_str(), &dir_fd, name) {
        let _ = rustix::fs::unlinkat(&dir_fd, temp.as_str(), AtFlags::empty());
        return Err(sh.errno("rename into place", &path.display(), e));
    }
    Ok(())
}
