//! The artifact store: one self-describing file per artifact, atomic
//! publication, LRU-style eviction in the background.
//!
//! Layout: `data_dir/{ns}/{2 hex}/{key}` (see [`relative_path`]; a key's `/`
//! is written `~` in its file name, see [`file_name`]); each file is
//! a 64-byte [`format`] header (length, sha256, checksum) followed by the body.
//! `data_dir/.tmp/` holds named temporary files when the filesystem lacks
//! `O_TMPFILE`.
//!
//! Writes stream into an anonymous `O_TMPFILE` in the target directory (or a
//! named temp file in `.tmp/`), are hashed as they arrive, and become visible
//! only at [`PutWriter::commit`]: `linkat` to a private `.tmp-…` name, then
//! `renameat` over the final name, so a crash, an abort or ENOSPC never leaves
//! a partial artifact under a real key. A writer holds an exclusive `flock` on
//! its temp file for its whole life, which is how leftovers are told apart
//! from in-flight writes of a live process sharing the directory (for example
//! during a binary upgrade): a leftover is a temp file nobody holds locked.
//!
//! `Store::open` returns at once. A background thread walks the data dir to
//! rebuild the in-memory index (size and last access of every artifact) while
//! serving proceeds, then evicts least-recently-accessed artifacts whenever a
//! commit pushes the store over its byte limit (down to 90% of it).
//!
//! Decisions an operator may want to know:
//! - Access times survive a restart only as the files' atime/mtime; with the
//!   usual `relatime` mount option, reads are remembered at day granularity,
//!   so the first evictions after a restart are LRU only approximately.
//!   Recording every read in the inode would cost a metadata write per GET.
//! - `stats().bytes` counts whole files (header + body), not allocated blocks.
//! - A GET validates the header and the file size, not the body digest (that
//!   would read the whole body twice); truncation, the common damage, is caught.
//! - A body larger than the store's own byte limit is refused (413) rather
//!   than stored and immediately evicted along with everything else.
//! - While the startup scan runs, eviction already acts if the artifacts
//!   accounted so far exceed the limit; it then picks among those only.
//! - If fsyncing the directory fails after the rename, the artifact is
//!   complete and visible but the PUT reports an error; the client retries.

mod background;
mod commit;
#[cfg(test)]
mod commit_tests;
pub mod format;
mod hot;
mod index;
mod journal;
mod layout;
mod release;
#[cfg(test)]
mod tests;
mod tombstone;

pub use background::millis as background_millis;
pub use hot::{
    HotBody, HotEntry, HotGet, HotMiss, HotStats, ENTRY_OVERHEAD_BYTES, HOT_BODY_BYTES_MAX,
};
pub use index::{INDEX_ENTRIES_MAX, SHARDS};
pub use journal::{
    JournalStats, CHECKPOINT_INTERVAL_MS, JOURNAL_BYTES_MAX, JOURNAL_DIR, JOURNAL_FILE_BYTES_MAX,
};
pub use layout::{
    file_name, key_of_file_name, relative_path, shard_dir, valid_key, valid_key_part,
    valid_key_segment, valid_namespace, KEY_BYTES_MAX, KEY_SEGMENTS_MAX, NAMESPACE_BYTES_MAX,
    SEGMENT_SEPARATOR_ON_DISK,
};
pub use tombstone::{DeleteAt, TOMBSTONE_DIR};

use format::HEADER_BYTES;
use index::{Entry, Index};
use rustix::fd::{AsRawFd, OwnedFd};
use rustix::fs::{AtFlags, FallocateFlags, FlockOperation, Mode, OFlags, CWD};
use rustix::io::Errno;
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// When acknowledged writes reach stable storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Default. `fdatasync` the file before publishing and `fsync` the
    /// directory after, so an acknowledged PUT survives power loss.
    #[default]
    Always,
    /// Leave it to the kernel's writeback: faster, but a crash may lose
    /// recent writes (never expose a partial one: publication stays atomic).
    Never,
}

/// Store configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Root of the store; created if missing. Default `./sluice-data`.
    pub data_dir: PathBuf,
    /// Byte limit over all artifact files (header + body); 0 = unlimited
    /// (the default). Over it, the background thread evicts down to 90%.
    pub store_bytes_max: u64,
    /// Durability of acknowledged writes. Default [`FsyncPolicy::Always`].
    pub fsync: FsyncPolicy,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("sluice-data"),
            store_bytes_max: 0,
            fsync: FsyncPolicy::Always,
        }
    }
}

/// Store failures, each mapping to an HTTP status via [`StoreError::status`].
#[derive(Debug)]
pub enum StoreError {
    /// The namespace or key breaks the naming rules ([`valid_namespace`],
    /// [`valid_key`]).
    InvalidKey,
    /// ENOSPC or EDQUOT at any step; nothing was published.
    NoSpace,
    /// The body's sha256 differs from the one the client promised.
    DigestMismatch {
        expected: [u8; 32],
        actual: [u8; 32],
    },
    /// The body's length differs from the one the client announced.
    LengthMismatch { expected: u64, actual: u64 },
    /// The body exceeds the per-request limit or the store's size.
    TooLarge { limit_bytes: u64 },
    /// Any other I/O failure; the message names the operation and the path.
    Io(io::Error),
    /// [`Store::get_nowait`] would have waited for the disk.
    WouldBlock,
}

impl StoreError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::InvalidKey | Self::DigestMismatch { .. } | Self::LengthMismatch { .. } => 400,
            Self::NoSpace => 507,
            Self::TooLarge { .. } => 413,
            Self::Io(_) => 500,
            // Never meant for a client: the ring opens the artifact elsewhere
            // and asks again. Should one escape, "try again" is the truth.
            Self::WouldBlock => 503,
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidKey => write!(
                f,
                "invalid namespace or key: namespace must match [a-z0-9][a-z0-9_-]{{0,63}}, \
                 key [A-Za-z0-9_.-]{{1,255}} not starting with '.'"
            ),
            Self::NoSpace => write!(f, "no space left on the store's filesystem (ENOSPC/EDQUOT)"),
            Self::DigestMismatch { expected, actual } => write!(
                f,
                "body sha256 {} does not match the expected {}",
                hex::encode(actual),
                hex::encode(expected)
            ),
            Self::LengthMismatch { expected, actual } => {
                write!(
                    f,
                    "body length {actual} does not match the announced {expected} bytes"
                )
            }
            Self::TooLarge { limit_bytes } => {
                write!(f, "body exceeds the limit of {limit_bytes} bytes")
            }
            Self::Io(e) => write!(f, "store I/O error: {e}"),
            Self::WouldBlock => write!(f, "the artifact is not in memory yet; try again"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// An open artifact, ready to be spliced or read from `body_offset`.
#[derive(Debug)]
pub struct Artifact {
    /// The artifact file, opened read-only. It stays valid if the artifact is
    /// replaced, deleted or evicted meanwhile (the inode lives until closed).
    /// Shared with the per-core open-file cache, so a cache hit costs no
    /// `dup` and no `close`.
    pub file: Arc<File>,
    /// Where the body starts in `file`, bytes.
    pub body_offset: u64,
    /// Body length, bytes.
    pub len: u64,
    /// sha256 of the body.
    pub sha256: [u8; 32],
    /// Response headers kept with the artifact (a version-2 file), sent back
    /// with it: Turborepo's `x-artifact-*`.
    pub meta: Option<Arc<format::Meta>>,
}

impl Artifact {
    /// Strong ETag: `"<64 lowercase hex of the body's sha256>"`, quotes included.
    pub fn etag(&self) -> String {
        // Into a fixed buffer: hex::encode's char-by-char collect was 3 % of the fallback's
        // instructions per 4 KiB GET (callgrind, issue 20).
        let mut out = [b'"'; 66];
        // Fails only on a length mismatch, which the array sizes rule out.
        let _ = hex::encode_to_slice(self.sha256, &mut out[1..65]);
        std::str::from_utf8(&out).map_or_else(|_| String::new(), str::to_owned)
    }

    /// When this version was written (its file's mtime), ms since the Unix
    /// epoch; replication's last-writer-wins compares these.
    pub fn write_time_ms(&self) -> std::io::Result<u64> {
        let meta = self.file.metadata()?;
        Ok(background::millis(meta.mtime(), meta.mtime_nsec()))
    }

    /// The file as a descriptor of its own: this artifact's, if nothing else
    /// shares it (an uncached `Store::get`), else a `dup` of the one the
    /// open-file cache shares.
    pub fn into_file(self) -> std::io::Result<File> {
        Arc::try_unwrap(self.file).or_else(|shared| shared.try_clone())
    }
}

/// Limits and promises for one upload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// The announced body length (Content-Length), if known. A body that
    /// turns out longer or shorter fails with `LengthMismatch`. Known lengths
    /// are reserved on disk up front, so a full disk answers 507 before the
    /// body is read.
    pub expected_len: Option<u64>,
    /// The digest the body must have (Bazel CAS: the key), if any.
    pub expected_sha256: Option<[u8; 32]>,
    /// Largest accepted body in bytes; 0 = no per-request limit (the store's
    /// own limit still applies).
    pub body_bytes_max: u64,
    /// The artifact's write time, ms since the Unix epoch, kept as the file's
    /// mtime. `None` (a client's PUT): now. A replicated write brings its
    /// origin's time, so every node holds the same (key, time, digest) and
    /// last-writer-wins compares like with like.
    pub write_time_ms: Option<u64>,
    /// Publish only if `(write time, sha256)` is greater than the local
    /// artifact's and the write time is after the key's tombstone, checked
    /// under the key's lock at commit; otherwise the commit succeeds with
    /// [`Committed::superseded`] and nothing changes. For replicated writes.
    pub last_writer_wins: bool,
}

/// The outcome of a successful commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// Body length, bytes.
    pub len: u64,
    /// sha256 of the body.
    pub sha256: [u8; 32],
    /// Whether an artifact with this key existed and was replaced.
    pub replaced: bool,
    /// The write time recorded as the file's mtime, ms since the Unix epoch.
    pub write_time_ms: u64,
    /// Under [`PutOptions::last_writer_wins`]: the local artifact or its
    /// tombstone was as new or newer, so nothing was published.
    pub superseded: bool,
}

/// How commits made themselves durable ([`Store::sync_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// `fdatasync`s of uploads' own files (larger than the journal takes,
    /// or the journal was full or off).
    pub file_syncs_total: u64,
    /// Directory `fsync`s after per-file uploads' renames.
    pub dir_syncs_total: u64,
    /// Renames those directory syncs covered (more renames than syncs:
    /// syncs were shared).
    pub dir_renames_total: u64,
    /// The commit journal's counters; `None` without a journal.
    pub journal: Option<JournalStats>,
}

/// Point-in-time counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStats {
    /// Bytes of all artifact files known to the index (header + body).
    pub bytes: u64,
    /// Artifacts known to the index.
    pub entries: u64,
    /// Artifacts evicted since open.
    pub evictions_total: u64,
    /// File bytes evicted since open.
    pub evicted_bytes_total: u64,
    /// Corrupt or truncated artifacts found (and removed) since open.
    pub corrupt_total: u64,
    /// Whether the startup scan finished; before that `bytes`/`entries` only
    /// cover what was scanned, written or read so far.
    pub accounting_complete: bool,
    /// How temp files are made: `"o_tmpfile"` or `"named_temp"`.
    pub tmpfile_mode: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TmpfileMode {
    /// Anonymous `O_TMPFILE` in the target directory, linked via
    /// `/proc/self/fd`.
    Anonymous,
    /// Named temp file under `data_dir/.tmp/`, renamed into place.
    Named,
}

impl TmpfileMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Anonymous => "o_tmpfile",
            Self::Named => "named_temp",
        }
    }
}

/// Wakes the background thread.
struct Signal {
    state: Mutex<SignalState>,
    cond: Condvar,
    stopping: AtomicBool,
}

#[derive(Default)]
struct SignalState {
    wake: bool,
}

/// State shared by store handles, writers and the background thread.
struct Shared {
    data_dir: PathBuf,
    data_dir_fd: OwnedFd,
    tmp_dir_fd: OwnedFd,
    store_bytes_max: u64,
    fsync: FsyncPolicy,
    tmpfile: TmpfileMode,
    index: Index,
    evictions_total: AtomicU64,
    evicted_bytes_total: AtomicU64,
    corrupt_total: AtomicU64,
    accounting_complete: AtomicBool,
    /// Set on the first ENOSPC, cleared by the next successful commit: a full
    /// disk is logged once per episode, not once per request.
    nospace_logged: AtomicBool,
    /// Whether `.tombstones/` may hold anything (see `tombstone`): while
    /// false, writes skip looking for a tombstone to clear.
    has_tombstones: AtomicBool,
    signal: Signal,
    /// Asked before evicting an artifact (its store-relative path): false
    /// keeps it (the object-store tier does not hold it yet).
    evict_guard: std::sync::OnceLock<EvictGuard>,
    /// The commit journal (`fsync = always`; see [`journal`]). Set once, at
    /// open, after the previous run's segments were replayed.
    journal: std::sync::OnceLock<journal::Journal>,
    /// Directory syncs shared by the renames before them.
    dir_syncs: commit::DirSyncs,
    /// Per-file data syncs.
    file_syncs: commit::FileSyncs,
    /// Closes replaced versions after their commit (see `release`).
    releaser: release::Releaser,
}

/// See [`Store::set_evict_guard`].
pub type EvictGuard = Box<dyn Fn(&str) -> bool + Send + Sync>;

impl Shared {
    fn path(&self, rel: &str) -> PathBuf {
        self.data_dir.join(rel)
    }

    fn stopping(&self) -> bool {
        self.signal.stopping.load(Ordering::Acquire)
    }

    fn wake(&self) {
        let mut state = self
            .signal
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.wake = true;
        self.signal.cond.notify_one();
    }

    fn stop(&self) {
        self.signal.stopping.store(true, Ordering::Release);
        self.wake();
        if let Some(journal) = self.journal.get() {
            journal.kick();
        }
    }

    /// Waits for a wake-up, a stop, or `timeout`.
    fn wait(&self, timeout: Duration) {
        let mut state = self
            .signal
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !state.wake && !self.stopping() {
            state = self
                .signal
                .cond
                .wait_timeout(state, timeout)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.wake = false;
    }

    fn over_limit(&self) -> bool {
        (self.store_bytes_max != 0 && self.index.bytes() > self.store_bytes_max)
            || self.index.entries() > INDEX_ENTRIES_MAX
    }

    fn no_space(&self, op: &str, path: &dyn fmt::Display, errno: i32) -> StoreError {
        if !self.nospace_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(op, path = %path, errno, "store out of space; PUTs answer 507");
        }
        StoreError::NoSpace
    }

    /// Maps a syscall failure to a `StoreError` with its context.
    fn errno(&self, op: &str, path: &dyn fmt::Display, e: Errno) -> StoreError {
        if e == Errno::NOSPC || e == Errno::DQUOT {
            return self.no_space(op, path, e.raw_os_error());
        }
        let err = io::Error::from(e);
        StoreError::Io(io::Error::new(err.kind(), format!("{op} {path}: {err}")))
    }

    fn io(&self, op: &str, path: &dyn fmt::Display, e: io::Error) -> StoreError {
        match e.raw_os_error() {
            Some(code) if code == libc::ENOSPC || code == libc::EDQUOT => {
                self.no_space(op, path, code)
            }
            _ => StoreError::Io(io::Error::new(e.kind(), format!("{op} {path}: {e}"))),
        }
    }

    fn fsync_dir(&self, fd: &OwnedFd, path: &dyn fmt::Display) -> Result<(), StoreError> {
        if self.fsync == FsyncPolicy::Always {
            rustix::fs::fsync(fd).map_err(|e| self.errno("fsync directory", path, e))?;
        }
        Ok(())
    }

    /// Creates directory `name` under `parent` if missing; under
    /// [`FsyncPolicy::Always`] a new directory is made durable in its parent.
    fn mkdir(
        &self,
        parent: &OwnedFd,
        name: &str,
        path: &dyn fmt::Display,
    ) -> Result<(), StoreError> {
        match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755)) {
            Ok(()) => self.fsync_dir(parent, path),
            Err(Errno::EXIST) => Ok(()),
            Err(e) => Err(self.errno("create directory", path, e)),
        }
    }

    /// Unlinks the artifact at `rel` (whose index lock the caller holds, given here and
    /// released before any fsync) and forgets it, as of `time_ms` (the delete's time, which a
    /// replay compares with replicated writes as the tombstone would); returns whether it
    /// existed. Under
    /// `fsync = always` a delete record in the journal (or, without one, a sync of the
    /// directory) makes it durable, so an acknowledged DELETE does not come back after a
    /// crash.
    fn unlink_artifact(
        &self,
        rel: &str,
        time_ms: u64,
        mut locked: index::Locked<'_>,
    ) -> Result<bool, StoreError> {
        // Appended under the key's lock, before the unlink: in the journal's
        // order the delete comes after every version published before it.
        let record = match self.journal.get() {
            Some(journal) => {
                let head = journal::Head {
                    seq: 0,
                    kind: journal::Kind::Delete,
                    lww: false,
                    write_time_ms: time_ms,
                    file_len: 0,
                    body_len: 0,
                    sha256: [0; 32],
                };
                Some((journal, journal.append_mark(self, rel, head)?))
            }
            None => None,
        };
        let existed = match rustix::fs::unlinkat(&self.data_dir_fd, rel, AtFlags::empty()) {
            Ok(()) => true,
            Err(Errno::NOENT | Errno::NOTDIR) => false,
            Err(e) => {
                if let Some((journal, appended)) = record {
                    journal.finish(rel, appended, false);
                }
                return Err(self.errno("unlink", &self.path(rel).display(), e));
            }
        };
        locked.remove(rel);
        drop(locked);
        if let Some((journal, appended)) = record {
            let waited = journal.wait(self, &appended);
            journal.finish(rel, appended, false);
            return waited.map(|()| existed);
        }
        if existed && self.fsync == FsyncPolicy::Always {
            let dir_rel = rel.rsplit_once('/').map_or("", |(dir, _)| dir);
            let dir_path = self.path(dir_rel);
            let dir = rustix::fs::openat(
                &self.data_dir_fd,
                dir_rel,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.errno("open directory", &dir_path.display(), e))?;
            self.fsync_dir(&dir, &dir_path.display())?;
        }
        Ok(existed)
    }

    /// Creates every shard directory of a namespace (`00` to `ff`) that is
    /// missing, and makes them durable with one sync of the namespace
    /// directory: one sync per namespace instead of one per shard's first
    /// write (a batch of replicated writes into a fresh store synced dozens
    /// in a row; that was not what held a fresh mesh back, see
    /// docs/benchmarks.md). The sync runs even when another thread made
    /// them: it covers their creation too, before this write relies on them.
    fn make_shards(&self, ns_fd: &OwnedFd, ns_path: &dyn fmt::Display) -> Result<(), StoreError> {
        for shard in 0..=u8::MAX {
            let name = format!("{shard:02x}");
            match rustix::fs::mkdirat(ns_fd, name.as_str(), Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(self.errno("create directory", ns_path, e)),
            }
        }
        self.fsync_dir(ns_fd, ns_path)
    }

    /// Opens `data_dir/{ns}/{xx}`, creating it (and the namespace's other
    /// shards) on first use.
    fn open_artifact_dir(&self, dir_rel: &str) -> Result<OwnedFd, StoreError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        match rustix::fs::openat(&self.data_dir_fd, dir_rel, flags, Mode::empty()) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) => {}
            Err(e) => return Err(self.errno("open directory", &self.path(dir_rel).display(), e)),
        }
        let Some((ns, shard)) = dir_rel.split_once('/') else {
            return Err(StoreError::InvalidKey);
        };
        self.mkdir(&self.data_dir_fd, ns, &self.data_dir.display())?;
        let ns_path = self.path(ns);
        let ns_fd = rustix::fs::openat(&self.data_dir_fd, ns, flags, Mode::empty())
            .map_err(|e| self.errno("open directory", &ns_path.display(), e))?;
        self.make_shards(&ns_fd, &ns_path.display())?;
        rustix::fs::openat(&ns_fd, shard, flags, Mode::empty())
            .map_err(|e| self.errno("open directory", &self.path(dir_rel).display(), e))
    }
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A process-unique temporary name. The leading dot keeps it out of the key
/// space ([`valid_key`] refuses leading dots).
fn temp_name() -> String {
    format!(
        ".tmp-{}-{}",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// How many fresh names to try when a temp name is taken (a leftover from a
/// previous process that had the same pid).
const TEMP_NAME_ATTEMPTS_MAX: usize = 16;

/// Milliseconds since the Unix epoch: write times, last-access times,
/// tombstone times (0 before the epoch, saturating far after it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn proc_fd_path(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Removes `name` in `dir` if it is a temp file no live writer holds locked.
/// Returns whether it was removed.
fn remove_if_abandoned(dir: &OwnedFd, name: &str) -> bool {
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK;
    let Ok(fd) = rustix::fs::openat(dir, name, flags, Mode::empty()) else {
        return false;
    };
    if rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive).is_err() {
        return false; // a live writer holds it
    }
    rustix::fs::unlinkat(dir, name, AtFlags::empty()).is_ok()
}

/// Whether `O_TMPFILE` plus `linkat` through `/proc/self/fd` works here
/// (it needs filesystem support and a mounted `/proc`).
fn probe_tmpfile(data_dir_fd: &OwnedFd, tmp_dir_fd: &OwnedFd) -> TmpfileMode {
    let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(data_dir_fd, ".", flags, Mode::from_raw_mode(0o600)) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::info!(error = %e, "O_TMPFILE unavailable; using named temp files in .tmp/");
            return TmpfileMode::Named;
        }
    };
    let name = temp_name();
    match rustix::fs::linkat(
        CWD,
        proc_fd_path(&fd),
        tmp_dir_fd,
        &name,
        AtFlags::SYMLINK_FOLLOW,
    ) {
        Ok(()) => {
            // Best effort: the probe file is empty and the scan would remove
            // it as abandoned anyway.
            let _ = rustix::fs::unlinkat(tmp_dir_fd, &name, AtFlags::empty());
            TmpfileMode::Anonymous
        }
        Err(e) => {
            tracing::info!(error = %e, "linking an O_TMPFILE failed; using named temp files in .tmp/");
            TmpfileMode::Named
        }
    }
}

fn check_names(ns: &str, key: &str) -> Result<(), StoreError> {
    if valid_namespace(ns) && valid_key(key) {
        Ok(())
    } else {
        Err(StoreError::InvalidKey)
    }
}

struct Inner {
    shared: Arc<Shared>,
    /// The background thread (scan, eviction) and the journal's checkpointer.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    fn shutdown(&self) {
        self.shared.stop();
        self.shared.releaser.stop();
        let handles =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for handle in handles {
            if handle.join().is_err() {
                tracing::error!("store background thread panicked");
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A per-thread cache of open artifact files for [`Store::get_cached`],
/// bounded by `entries_max` (each entry holds one fd).
#[derive(Debug)]
pub struct OpenCache {
    entries: std::collections::HashMap<Box<str>, CachedFile>,
    entries_max: usize,
    /// Lookups answered from the cache.
    pub hits_total: u64,
    /// Lookups that opened the file.
    pub misses_total: u64,
    /// Open misses with [`Store::get_nowait`]: a miss that would wait for
    /// the disk is [`StoreError::WouldBlock`]. The ring engine sets it.
    pub nowait: bool,
}

#[derive(Debug)]
struct CachedFile {
    file: Arc<File>,
    body_offset: u64,
    meta: Option<Arc<format::Meta>>,
    len: u64,
    sha256: [u8; 32],
    epoch: u64,
}

impl OpenCache {
    /// A cache holding at most `entries_max` open files (0 disables it).
    pub fn new(entries_max: usize) -> OpenCache {
        OpenCache {
            entries: std::collections::HashMap::with_capacity(entries_max.min(4096)),
            entries_max,
            hits_total: 0,
            misses_total: 0,
            nowait: false,
        }
    }

    /// Open files held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The artifact store. Cheap to clone; all clones share one index and one
/// background thread, which stops on [`Store::shutdown`] or when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("data_dir", &self.inner.shared.data_dir)
            .finish()
    }
}

impl Store {
    /// Opens (creating if needed) the store in `config.data_dir`, removes
    /// abandoned temp files in `.tmp/`, probes `O_TMPFILE`, and starts the
    /// background thread. Returns without scanning existing artifacts: they
    /// are served at once and accounted in the background.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        Self::open_with(config, None)
    }

    /// `open`, optionally forcing the temp-file mode (tests of the fallback).
    fn open_with(config: StoreConfig, force: Option<TmpfileMode>) -> Result<Store, StoreError> {
        let data_dir = config.data_dir;
        let tmp_dir = data_dir.join(".tmp");
        let plain = |op: &str, path: &Path, e: io::Error| {
            StoreError::Io(io::Error::new(
                e.kind(),
                format!("{op} {}: {e}", path.display()),
            ))
        };
        std::fs::create_dir_all(&tmp_dir).map_err(|e| plain("create directory", &tmp_dir, e))?;
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let data_dir_fd = rustix::fs::open(&data_dir, dir_flags, Mode::empty())
            .map_err(|e| plain("open directory", &data_dir, e.into()))?;
        let tmp_dir_fd = rustix::fs::open(&tmp_dir, dir_flags, Mode::empty())
            .map_err(|e| plain("open directory", &tmp_dir, e.into()))?;

        // `.tmp/` only ever holds in-flight or abandoned temp files, so it is
        // small and cleaning it here does not delay the start.
        let mut removed = 0u64;
        let entries =
            std::fs::read_dir(&tmp_dir).map_err(|e| plain("read directory", &tmp_dir, e))?;
        for entry in entries.flatten() {
            if let Some(name) = entry.file_name().to_str() {
                removed += u64::from(remove_if_abandoned(&tmp_dir_fd, name));
            }
        }
        if removed > 0 {
            tracing::info!(removed, dir = %tmp_dir.display(), "removed abandoned temp files");
        }

        let tmpfile = force.unwrap_or_else(|| probe_tmpfile(&data_dir_fd, &tmp_dir_fd));
        if config.fsync == FsyncPolicy::Always {
            rustix::fs::fsync(&data_dir_fd)
                .map_err(|e| plain("fsync directory", &data_dir, e.into()))?;
        }
        let data_dir_has_tombstones = data_dir.join(TOMBSTONE_DIR).exists();
        let (releaser, release_thread) = release::Releaser::start()
            .map_err(|e| plain("spawn release thread for", &data_dir, e))?;
        let shared = Arc::new(Shared {
            data_dir,
            data_dir_fd,
            tmp_dir_fd,
            store_bytes_max: config.store_bytes_max,
            fsync: config.fsync,
            tmpfile,
            index: Index::new(),
            evictions_total: AtomicU64::new(0),
            evicted_bytes_total: AtomicU64::new(0),
            corrupt_total: AtomicU64::new(0),
            accounting_complete: AtomicBool::new(false),
            nospace_logged: AtomicBool::new(false),
            has_tombstones: AtomicBool::new(data_dir_has_tombstones),
            evict_guard: std::sync::OnceLock::new(),
            journal: std::sync::OnceLock::new(),
            dir_syncs: commit::DirSyncs::default(),
            file_syncs: commit::FileSyncs::default(),
            releaser,
            signal: Signal {
                state: Mutex::new(SignalState::default()),
                cond: Condvar::new(),
                stopping: AtomicBool::new(false),
            },
        });
        // What a crash left in the journal is put right before anything is
        // served, whatever this run's fsync policy.
        journal::recover(&shared)?;
        let mut threads = vec![release_thread];
        if shared.fsync == FsyncPolicy::Always {
            match journal::Journal::create(&shared) {
                Ok(journal) => {
                    let _ = shared.journal.set(journal);
                    let for_thread = Arc::clone(&shared);
                    let thread = std::thread::Builder::new()
                        .name("sluice-journal".into())
                        .spawn(move || {
                            if let Some(journal) = for_thread.journal.get() {
                                journal.run_checkpoints(&for_thread);
                            }
                        })
                        .map_err(|e| plain("spawn journal thread for", &shared.data_dir, e))?;
                    threads.push(thread);
                }
                // Without a journal every upload syncs its own file and
                // directory: slower for small ones, as durable.
                Err(e) => {
                    tracing::warn!(error = %e, "no commit journal; every upload syncs its own file")
                }
            }
        }
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("sluice-store".into())
            .spawn(move || background::run(&for_thread))
            .map_err(|e| plain("spawn background thread for", &shared.data_dir, e))?;
        threads.push(thread);
        tracing::info!(
            data_dir = %shared.data_dir.display(),
            tmpfile_mode = tmpfile.as_str(),
            store_bytes_max = shared.store_bytes_max,
            fsync = ?shared.fsync,
            "store open; accounting existing artifacts in the background"
        );
        Ok(Store {
            inner: Arc::new(Inner {
                shared,
                threads: Mutex::new(threads),
            }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// Opens artifact `ns/key`. `Ok(None)` on a miss, including a corrupt or
    /// truncated file, which is removed, counted in `corrupt_total` and logged.
    /// Records the access for LRU (one shard lock, no global lock).
    pub fn get(&self, ns: &str, key: &str) -> Result<Option<Artifact>, StoreError> {
        self.open_artifact(ns, key, false)
    }

    /// [`Store::get`], or [`StoreError::WouldBlock`] where it would wait for the disk: the
    /// path is resolved only from the dentry cache (`openat2` with `RESOLVE_CACHED`) and the
    /// header read only from the page cache (`preadv2` with `RWF_NOWAIT`). The ring engine
    /// calls this so a cold artifact never stalls its thread; it has the open done elsewhere
    /// and asks again.
    pub fn get_nowait(&self, ns: &str, key: &str) -> Result<Option<Artifact>, StoreError> {
        self.open_artifact(ns, key, true)
    }

    fn open_artifact(
        &self,
        ns: &str,
        key: &str,
        nowait: bool,
    ) -> Result<Option<Artifact>, StoreError> {
        check_names(ns, key)?;
        let sh = self.shared();
        let rel = relative_path(ns, key);
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY;
        let opened = if nowait {
            rustix::fs::openat2(
                &sh.data_dir_fd,
                rel.as_str(),
                flags,
                Mode::empty(),
                rustix::fs::ResolveFlags::CACHED,
            )
        } else {
            rustix::fs::openat(&sh.data_dir_fd, rel.as_str(), flags, Mode::empty())
        };
        let fd = match opened {
            Ok(fd) => fd,
            // ELOOP: a symlink, which sluice never writes; do not follow it
            // out of the store.
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => return Ok(None),
            // RESOLVE_CACHED: a lookup needs the disk. ENOSYS/EINVAL: a kernel
            // before openat2 (5.6) or RESOLVE_CACHED (5.12); let the caller
            // open it elsewhere too, which is always safe.
            Err(Errno::AGAIN | Errno::NOSYS | Errno::INVAL) if nowait => {
                return Err(StoreError::WouldBlock)
            }
            Err(e) => return Err(sh.errno("open", &sh.path(&rel).display(), e)),
        };
        let file = File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| sh.io("stat", &sh.path(&rel).display(), e))?;
        if !meta.is_file() {
            return Ok(None);
        }
        let mut head = [0u8; HEADER_BYTES];
        if meta.len() < HEADER_BYTES as u64 {
            self.discard_corrupt(&rel, &meta, "shorter than the header");
            return Ok(None);
        }
        if nowait {
            match rustix::io::preadv2(
                &file,
                &mut [std::io::IoSliceMut::new(&mut head)],
                0,
                rustix::io::ReadWriteFlags::NOWAIT,
            ) {
                Ok(n) if n == HEADER_BYTES => {}
                // Short: part of the header is not cached. EOPNOTSUPP: a
                // filesystem without RWF_NOWAIT support.
                Ok(_) | Err(Errno::AGAIN | Errno::OPNOTSUPP) => return Err(StoreError::WouldBlock),
                Err(e) => return Err(sh.errno("read header of", &sh.path(&rel).display(), e)),
            }
        } else {
            file.read_exact_at(&mut head, 0)
                .map_err(|e| sh.io("read header of", &sh.path(&rel).display(), e))?;
        }
        let header = match format::decode_header(&head) {
            Ok(h) => h,
            Err(e) => {
                self.discard_corrupt(&rel, &meta, &e.to_string());
                return Ok(None);
            }
        };
        // decode_header guarantees this sum does not overflow.
        let size_bytes = header.body_len + header.header_len;
        if meta.len() != size_bytes {
            let reason = format!("file is {} bytes, header says {size_bytes}", meta.len());
            self.discard_corrupt(&rel, &meta, &reason);
            return Ok(None);
        }
        let kept = match read_meta(&file, &header, nowait) {
            Ok(kept) => kept,
            Err(MetaRead::WouldBlock) => return Err(StoreError::WouldBlock),
            Err(MetaRead::Io(e)) => {
                return Err(sh.io("read header of", &sh.path(&rel).display(), e))
            }
            Err(MetaRead::Bad(e)) => {
                self.discard_corrupt(&rel, &meta, &e.to_string());
                return Ok(None);
            }
        };
        let mut locked = sh.index.lock(&rel);
        if !locked.touch(&rel, now_ms()) {
            // Not yet seen by the startup scan. Add it, unless it was unlinked
            // since we opened it (unlinks happen under this lock, so the link
            // count read here is current): that would be a phantom entry.
            let linked = file.metadata().is_ok_and(|m| m.nlink() > 0);
            if linked {
                locked.insert_if_absent(
                    &rel,
                    Entry {
                        size_bytes,
                        last_access_ms: now_ms(),
                    },
                );
            }
        }
        drop(locked);
        Ok(Some(Artifact {
            file: Arc::new(file),
            body_offset: header.header_len,
            len: header.body_len,
            sha256: header.sha256,
            meta: kept,
        }))
    }

    /// [`Store::get`] through a per-thread open-file cache: a hit shares the
    /// cached fd instead of an open, a stat and a header read. A cached fd is
    /// used only while its shard's change epoch is the one read before it
    /// was opened, so a replaced or deleted artifact is never served from
    /// the cache. Still records the access for LRU.
    pub fn get_cached(
        &self,
        ns: &str,
        key: &str,
        cache: &mut OpenCache,
    ) -> Result<Option<Artifact>, StoreError> {
        check_names(ns, key)?;
        let sh = self.shared();
        let rel = relative_path(ns, key);
        let epoch = sh.index.change_epoch(&rel);
        if let Some(cached) = cache.entries.get(rel.as_str()) {
            if cached.epoch == epoch {
                let artifact = Artifact {
                    file: Arc::clone(&cached.file),
                    body_offset: cached.body_offset,
                    len: cached.len,
                    sha256: cached.sha256,
                    meta: cached.meta.clone(),
                };
                sh.index.lock(&rel).touch(&rel, now_ms());
                cache.hits_total += 1;
                return Ok(Some(artifact));
            }
        }
        cache.misses_total += 1;
        let got = if cache.nowait {
            self.get_nowait(ns, key)?
        } else {
            self.get(ns, key)?
        };
        match &got {
            Some(artifact) => {
                if cache.entries.len() >= cache.entries_max
                    && !cache.entries.contains_key(rel.as_str())
                {
                    // Full: drop any one entry (the table is small and a miss
                    // costs only what an uncached GET costs).
                    if let Some(victim) = cache.entries.keys().next().cloned() {
                        cache.entries.remove(&victim);
                    }
                }
                if cache.entries_max > 0 {
                    cache.entries.insert(
                        rel.into_boxed_str(),
                        CachedFile {
                            file: Arc::clone(&artifact.file),
                            body_offset: artifact.body_offset,
                            len: artifact.len,
                            sha256: artifact.sha256,
                            meta: artifact.meta.clone(),
                            epoch,
                        },
                    );
                }
            }
            None => {
                cache.entries.remove(rel.as_str());
            }
        }
        Ok(got)
    }

    /// The body length of `ns/key` when it is stored, `None` when not. Answered from the
    /// in-memory index (no system call) whenever it can be: always once the startup scan has
    /// finished, since every publish and unlink updates the index under its shard lock.
    /// Before that, a key the index does not know yet is opened ([`Store::get`], or
    /// [`Store::get_nowait`] with `nowait`). Records the access for LRU, as a GET does, so the
    /// blobs a client was just told about are the last to be evicted. REAPI's
    /// `FindMissingBlobs` and the completeness check of action results ask this.
    pub fn contains(&self, ns: &str, key: &str, nowait: bool) -> Result<Option<u64>, StoreError> {
        check_names(ns, key)?;
        let sh = self.shared();
        let rel = relative_path(ns, key);
        let complete = sh.accounting_complete.load(Ordering::Acquire);
        {
            let mut locked = sh.index.lock(&rel);
            if let Some(entry) = locked.get(&rel) {
                locked.touch(&rel, now_ms());
                return Ok(Some(entry.size_bytes.saturating_sub(HEADER_BYTES as u64)));
            }
        }
        if complete {
            return Ok(None);
        }
        Ok(self
            .open_artifact(ns, key, nowait)?
            .map(|artifact| artifact.len))
    }

    /// Close cached fds whose artifact may have changed, so a deleted or
    /// evicted file's disk space is not held by a cache nobody asks again.
    pub fn sweep_cache(&self, cache: &mut OpenCache) {
        let sh = self.shared();
        cache
            .entries
            .retain(|rel, cached| sh.index.change_epoch(rel) == cached.epoch);
    }

    /// Removes a corrupt file, unless it was replaced since we opened it.
    fn discard_corrupt(&self, rel: &str, opened: &std::fs::Metadata, reason: &str) {
        let sh = self.shared();
        let path = sh.path(rel);
        let mut locked = sh.index.lock(rel);
        let same = std::fs::symlink_metadata(&path)
            .is_ok_and(|m| m.dev() == opened.dev() && m.ino() == opened.ino());
        if !same {
            return; // replaced or removed meanwhile: someone else's business
        }
        match rustix::fs::unlinkat(&sh.data_dir_fd, rel, AtFlags::empty()) {
            Ok(()) => {
                locked.remove(rel);
                drop(locked);
                sh.corrupt_total.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %path.display(), reason, "corrupt artifact removed; served as a miss");
            }
            Err(e) => {
                drop(locked);
                tracing::warn!(path = %path.display(), reason, error = %e, "corrupt artifact could not be removed");
            }
        }
    }

    /// Starts an upload of `ns/key`. Nothing is visible until
    /// [`PutWriter::commit`]; dropping the writer abandons the upload.
    pub fn begin_put(
        &self,
        ns: &str,
        key: &str,
        options: PutOptions,
    ) -> Result<PutWriter, StoreError> {
        self.begin_put_with(ns, key, options, format::Meta::default())
    }

    /// [`Store::begin_put`] for an artifact that keeps `meta` (response
    /// headers) in its header, a version-2 file when `meta` is not empty.
    pub fn begin_put_with(
        &self,
        ns: &str,
        key: &str,
        options: PutOptions,
        meta: format::Meta,
    ) -> Result<PutWriter, StoreError> {
        check_names(ns, key)?;
        let sh = Arc::clone(self.shared());
        let store_body_max = sh.store_bytes_max.saturating_sub(HEADER_BYTES as u64);
        let limit_bytes = match (options.body_bytes_max, sh.store_bytes_max) {
            (0, 0) => 0,
            (0, _) => store_body_max,
            (body_max, 0) => body_max,
            (body_max, _) => body_max.min(store_body_max),
        };
        if let Some(len) = options.expected_len {
            if limit_bytes != 0 && len > limit_bytes {
                return Err(StoreError::TooLarge { limit_bytes });
            }
        }
        let rel = relative_path(ns, key);
        // The file name, not the key: they differ in length for a key
        // starting with `.` (see `file_name`).
        let key_at = rel.rfind('/').map_or(0, |slash| slash + 1);
        let dir_fd = sh.open_artifact_dir(&rel[..key_at - 1])?;
        let (file, temp_name) = open_temp(&sh, &dir_fd, &rel)?;
        let mut writer = PutWriter {
            shared: sh,
            rel,
            key_at,
            dir_fd,
            file,
            named_temp: temp_name,
            hasher: Sha256::new(),
            buf: Vec::with_capacity(WRITE_BUFFER_BYTES),
            body_len: 0,
            file_offset: format::header_len_for(&meta),
            // Boxed: most writers keep nothing, and a writer travels inside
            // every PUT's `Decision`.
            meta: (!meta.is_empty()).then(|| Box::new(meta)),
            expected_len: options.expected_len,
            expected_sha256: options.expected_sha256,
            limit_bytes,
            write_time_ms: options.write_time_ms,
            last_writer_wins: options.last_writer_wins,
            failed: false,
            writeback_from: 0,
            writeback_deferred: false,
            writeback_pending: None,
        };
        if let Some(len) = options.expected_len.filter(|len| *len > 0) {
            writer.reserve(len)?;
        }
        Ok(writer)
    }

    /// Commits several uploads (all begun on this store) together and
    /// answers each, in order, once every one that succeeded is durable under
    /// the fsync policy and visible. Under `fsync = always` the small ones
    /// share one journal sync and the large ones sync their files in
    /// parallel, each directory once; a failed upload does not fail the
    /// others. Blocks for as long as the disk takes: call it off the engine
    /// threads. What a batch of replicated writes from a peer should use.
    pub fn commit_batch(&self, writers: Vec<PutWriter>) -> Vec<Result<Committed, StoreError>> {
        let (ours, theirs): (Vec<_>, Vec<_>) = writers
            .into_iter()
            .enumerate()
            .partition(|(_, w)| Arc::ptr_eq(&w.shared, self.shared()));
        let mut results: Vec<Option<Result<Committed, StoreError>>> =
            (0..ours.len() + theirs.len()).map(|_| None).collect();
        let (at, ours): (Vec<usize>, Vec<PutWriter>) = ours.into_iter().unzip();
        for (i, result) in at.into_iter().zip(commit::commit_all(ours)) {
            results[i] = Some(result);
        }
        for (i, _) in theirs {
            results[i] = Some(Err(StoreError::Io(io::Error::other(
                "the upload was begun on another store",
            ))));
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(PutWriter::spent())))
            .collect()
    }

    /// How commits have synced so far.
    pub fn sync_stats(&self) -> SyncStats {
        let sh = self.shared();
        let (dir_syncs_total, renames_total) = sh.dir_syncs.totals();
        SyncStats {
            file_syncs_total: sh.file_syncs.total.load(Ordering::Relaxed),
            dir_syncs_total,
            dir_renames_total: renames_total,
            journal: sh.journal.get().map(journal::Journal::stats),
        }
    }

    /// Deletes `ns/key`. Returns whether it existed.
    pub fn delete(&self, ns: &str, key: &str) -> Result<bool, StoreError> {
        check_names(ns, key)?;
        let sh = self.shared();
        let rel = relative_path(ns, key);
        let locked = sh.index.lock(&rel);
        sh.unlink_artifact(&rel, now_ms(), locked)
    }

    /// Current counters. Lock-free.
    /// Ask `guard` (with the store-relative path) before evicting anything;
    /// false keeps that artifact. Set once, before serving (the object-store
    /// tier: only what it already holds may go).
    pub fn set_evict_guard(&self, guard: EvictGuard) {
        let _ = self.shared().evict_guard.set(guard);
    }

    pub fn stats(&self) -> StoreStats {
        let sh = self.shared();
        StoreStats {
            bytes: sh.index.bytes(),
            entries: sh.index.entries(),
            evictions_total: sh.evictions_total.load(Ordering::Relaxed),
            evicted_bytes_total: sh.evicted_bytes_total.load(Ordering::Relaxed),
            corrupt_total: sh.corrupt_total.load(Ordering::Relaxed),
            accounting_complete: sh.accounting_complete.load(Ordering::Acquire),
            tmpfile_mode: sh.tmpfile.as_str(),
        }
    }

    /// Stops the background thread (scan and eviction) and waits for it.
    /// The store keeps serving gets, puts and deletes; only accounting and
    /// eviction stop. Also happens when the last clone is dropped.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

/// Why [`read_meta`] found no metadata.
enum MetaRead {
    /// Under `nowait`, the section is not in the page cache.
    WouldBlock,
    Io(io::Error),
    /// The section is damaged: the artifact is corrupt.
    Bad(format::FormatError),
}

/// The metadata section of a version-2 file (`None` for version 1): one more
/// positioned read of at most [`format::META_BYTES_MAX`] bytes, from the page
/// cache only under `nowait`.
fn read_meta(
    file: &File,
    header: &format::Header,
    nowait: bool,
) -> Result<Option<Arc<format::Meta>>, MetaRead> {
    let len = header.meta_len();
    if len == 0 {
        return Ok(None);
    }
    let mut section = vec![0u8; len];
    if nowait {
        match rustix::io::preadv2(
            file,
            &mut [std::io::IoSliceMut::new(&mut section)],
            HEADER_BYTES as u64,
            rustix::io::ReadWriteFlags::NOWAIT,
        ) {
            Ok(n) if n == len => {}
            Ok(_) | Err(Errno::AGAIN | Errno::OPNOTSUPP) => return Err(MetaRead::WouldBlock),
            Err(e) => return Err(MetaRead::Io(e.into())),
        }
    } else {
        file.read_exact_at(&mut section, HEADER_BYTES as u64)
            .map_err(MetaRead::Io)?;
    }
    format::decode_meta_section(&section)
        .map(|meta| Some(Arc::new(meta)))
        .map_err(MetaRead::Bad)
}

/// Bytes a writer coalesces before a `pwrite`, so a stream of small chunks
/// (chunked encoding) does not become a stream of small syscalls.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// Under `fsync = always`, write-back of an upload's file is started every
/// this many bytes while the body arrives (see `PutWriter::start_writeback`).
pub const WRITEBACK_BYTES: u64 = 4 * 1024 * 1024;

/// Opens the temp file for an upload into `dir_fd` and locks it (see the
/// module docs). Returns the file and, for a named temp, its name in `.tmp/`.
fn open_temp(
    sh: &Shared,
    dir_fd: &OwnedFd,
    rel: &str,
) -> Result<(File, Option<String>), StoreError> {
    let mode = Mode::from_raw_mode(0o644);
    if sh.tmpfile == TmpfileMode::Anonymous {
        let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
        match rustix::fs::openat(dir_fd, ".", flags, mode) {
            Ok(fd) => {
                lock_temp(sh, &fd, rel)?;
                return Ok((File::from(fd), None));
            }
            // A directory on another filesystem without O_TMPFILE support:
            // fall back for this upload rather than fail it.
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {}
            Err(e) => return Err(sh.errno("create temp file for", &sh.path(rel).display(), e)),
        }
    }
    let flags = OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    for _ in 0..TEMP_NAME_ATTEMPTS_MAX {
        let name = temp_name();
        match rustix::fs::openat(&sh.tmp_dir_fd, name.as_str(), flags, mode) {
            Ok(fd) => {
                if let Err(e) = lock_temp(sh, &fd, rel) {
                    let _ = rustix::fs::unlinkat(&sh.tmp_dir_fd, name.as_str(), AtFlags::empty());
                    return Err(e);
                }
                return Ok((File::from(fd), Some(name)));
            }
            Err(Errno::EXIST) => continue,
            Err(e) => {
                let path = sh.data_dir.join(".tmp").join(&name);
                return Err(sh.errno("create temp file", &path.display(), e));
            }
        }
    }
    Err(StoreError::Io(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "no free temp name in {} after {TEMP_NAME_ATTEMPTS_MAX} attempts",
            sh.data_dir.join(".tmp").display()
        ),
    )))
}

fn lock_temp(sh: &Shared, fd: &OwnedFd, rel: &str) -> Result<(), StoreError> {
    rustix::fs::flock(fd, FlockOperation::NonBlockingLockExclusive)
        .map_err(|e| sh.errno("lock temp file for", &sh.path(rel).display(), e))
}

/// An upload in progress. Write the body with [`PutWriter::write`], then
/// [`PutWriter::commit`]. Dropping it without committing leaves nothing
/// visible (an anonymous temp file vanishes with its descriptor; a named one
/// is unlinked). After any error the writer is spent: drop it.
pub struct PutWriter {
    shared: Arc<Shared>,
    /// `ns/xx/key`.
    rel: String,
    /// Where the file name starts in `rel`.
    key_at: usize,
    /// The target directory `ns/xx`.
    dir_fd: OwnedFd,
    file: File,
    /// Name in `.tmp/` while a named temp file exists (fallback mode).
    named_temp: Option<String>,
    hasher: Sha256,
    buf: Vec<u8>,
    /// Body bytes accepted so far (written or buffered).
    body_len: u64,
    /// Next file offset to write the buffer at.
    file_offset: u64,
    /// Kept in the header (version 2), if any.
    meta: Option<Box<format::Meta>>,
    expected_len: Option<u64>,
    expected_sha256: Option<[u8; 32]>,
    /// 0 = unlimited.
    limit_bytes: u64,
    write_time_ms: Option<u64>,
    last_writer_wins: bool,
    failed: bool,
    /// Write-back of the file from here on has not been started.
    writeback_from: u64,
    /// The caller starts write-back itself ([`PutWriter::take_writeback`]).
    writeback_deferred: bool,
    /// A range whose write-back the caller should start.
    writeback_pending: Option<(u64, u64)>,
}

impl fmt::Debug for PutWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutWriter")
            .field("rel", &self.rel)
            .field("body_len", &self.body_len)
            .field(
                "tmpfile_mode",
                &if self.named_temp.is_some() {
                    "named_temp"
                } else {
                    "o_tmpfile"
                },
            )
            .finish()
    }
}

impl PutWriter {
    /// Body bytes accepted so far.
    pub fn body_len(&self) -> u64 {
        self.body_len
    }

    fn path(&self) -> PathBuf {
        self.shared.path(&self.rel)
    }

    /// Where the body starts in the file.
    fn header_len(&self) -> u64 {
        self.meta
            .as_deref()
            .map_or(HEADER_BYTES as u64, format::header_len_for)
    }

    fn spent() -> StoreError {
        StoreError::Io(io::Error::other(
            "upload already failed; the writer must be dropped",
        ))
    }

    /// Reserves the whole file up front so a full disk fails before the body
    /// is read. Filesystems without `fallocate` just skip the reservation.
    fn reserve(&mut self, body_len: u64) -> Result<(), StoreError> {
        let total = body_len.saturating_add(self.header_len());
        match rustix::fs::fallocate(&self.file, FallocateFlags::KEEP_SIZE, 0, total) {
            Ok(()) => Ok(()),
            Err(e) if e == Errno::NOSPC || e == Errno::DQUOT => {
                self.failed = true;
                Err(self
                    .shared
                    .errno("reserve space for", &self.path().display(), e))
            }
            Err(_) => Ok(()),
        }
    }

    /// Appends body bytes: hashed now, written through a small buffer.
    pub fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        if self.failed {
            return Err(Self::spent());
        }
        let new_len = self.body_len.saturating_add(data.len() as u64);
        if self.limit_bytes != 0 && new_len > self.limit_bytes {
            self.failed = true;
            return Err(StoreError::TooLarge {
                limit_bytes: self.limit_bytes,
            });
        }
        if let Some(expected) = self.expected_len {
            if new_len > expected {
                self.failed = true;
                return Err(StoreError::LengthMismatch {
                    expected,
                    actual: new_len,
                });
            }
        }
        self.hasher.update(data);
        self.body_len = new_len;
        if self.buf.len() + data.len() > WRITE_BUFFER_BYTES {
            self.flush()?;
        }
        if data.len() >= WRITE_BUFFER_BYTES {
            self.write_at(data)
        } else {
            self.buf.extend_from_slice(data);
            Ok(())
        }
    }

    fn write_at(&mut self, data: &[u8]) -> Result<(), StoreError> {
        if let Err(e) = self.file.write_all_at(data, self.file_offset) {
            self.failed = true;
            return Err(self.shared.io("write", &self.path().display(), e));
        }
        self.file_offset += data.len() as u64;
        self.start_writeback();
        Ok(())
    }

    /// Under `fsync = always`, every [`WRITEBACK_BYTES`] written, starts
    /// write-back of them (`sync_file_range`), so the commit's final sync of
    /// a large body has little left to write. Here, or by the caller when it
    /// asked to ([`PutWriter::defer_writeback`]: the ring engine, whose
    /// thread must not wait for a congested device queue).
    fn start_writeback(&mut self) {
        let end = self.file_offset;
        if self.shared.fsync != FsyncPolicy::Always || end - self.writeback_from < WRITEBACK_BYTES {
            return;
        }
        let range = (self.writeback_from, end - self.writeback_from);
        self.writeback_from = end;
        if self.writeback_deferred {
            self.writeback_pending = Some(match self.writeback_pending {
                Some((from, _)) => (from, end - from),
                None => range,
            });
        } else {
            // Only a head start for the final sync: a failure costs time, not data.
            let _ = sluice_uring::sync_file_range(
                &self.file,
                range.0,
                range.1,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    /// Hand write-back to the caller: [`PutWriter::take_writeback`] then says
    /// what to start.
    pub fn defer_writeback(&mut self) {
        self.writeback_deferred = true;
    }

    /// A range (`offset`, `len`) of the temp file whose write-back should
    /// start now, and a descriptor of the file to start it on (a `dup`: the
    /// writer keeps its own).
    pub fn take_writeback(&mut self) -> Option<(OwnedFd, u64, u64)> {
        let (offset, len) = self.writeback_pending.take()?;
        let fd = self.file.try_clone().ok()?;
        Some((OwnedFd::from(fd), offset, len))
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let result = self.write_at(&buf);
        self.buf = buf;
        self.buf.clear();
        result
    }

    /// Checks length and digest, writes the header, syncs per policy and
    /// publishes atomically (replacing an existing artifact). On any error
    /// nothing new is visible under the key. Under `fsync = always` the
    /// syncs are shared with every commit running at the same time (see
    /// [`commit`]); to commit several uploads under one group sync, use
    /// [`Store::commit_batch`].
    pub fn commit(self) -> Result<Committed, StoreError> {
        let mut results = commit::commit_all(vec![self]);
        results.pop().unwrap_or_else(|| Err(Self::spent()))
    }

    /// The first step of a commit: checks length and digest, writes the
    /// header and the write time. The temp file is then complete, neither
    /// durable nor visible.
    fn prepare(mut self) -> Result<commit::Prepared, StoreError> {
        if self.failed {
            return Err(Self::spent());
        }
        self.flush()?;
        if let Some(expected) = self.expected_len {
            if self.body_len != expected {
                return Err(StoreError::LengthMismatch {
                    expected,
                    actual: self.body_len,
                });
            }
        }
        let sha256: [u8; 32] = self.hasher.finalize_reset().into();
        if let Some(expected) = self.expected_sha256 {
            if expected != sha256 {
                return Err(StoreError::DigestMismatch {
                    expected,
                    actual: sha256,
                });
            }
        }
        let sh = Arc::clone(&self.shared);
        let path = self.path();
        let header = match &self.meta {
            Some(meta) => format::encode_header_with(self.body_len, &sha256, meta),
            None => format::encode_header(self.body_len, &sha256).to_vec(),
        };
        self.file
            .write_all_at(&header, 0)
            .map_err(|e| sh.io("write header of", &path.display(), e))?;
        // The write time is the file's mtime (set after the last write, which
        // would move it again), so it needs no format change and survives
        // as long as the file does.
        let write_time_ms = self.write_time_ms.unwrap_or_else(now_ms);
        self.file
            .set_modified(UNIX_EPOCH + Duration::from_millis(write_time_ms))
            .map_err(|e| sh.io("set the write time of", &path.display(), e))?;
        let size_bytes = self.body_len + header.len() as u64;
        Ok(commit::Prepared::new(
            self,
            sha256,
            write_time_ms,
            size_bytes,
        ))
    }

    /// Gives the anonymous temp file a private name in the target directory.
    fn link_anonymous(&self, path: &Path) -> Result<String, StoreError> {
        let source = proc_fd_path(&self.file);
        for _ in 0..TEMP_NAME_ATTEMPTS_MAX {
            let name = temp_name();
            match rustix::fs::linkat(
                CWD,
                source.as_str(),
                &self.dir_fd,
                name.as_str(),
                AtFlags::SYMLINK_FOLLOW,
            ) {
                Ok(()) => return Ok(name),
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(self.shared.errno("link temp file for", &path.display(), e)),
            }
        }
        Err(StoreError::Io(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "no free temp name beside {} after {TEMP_NAME_ATTEMPTS_MAX} attempts",
                path.display()
            ),
        )))
    }
}

impl Drop for PutWriter {
    fn drop(&mut self) {
        if let Some(name) = self.named_temp.take() {
            let _ = rustix::fs::unlinkat(&self.shared.tmp_dir_fd, name.as_str(), AtFlags::empty());
        }
    }
}

// The front end moves stores and writers across threads (spawn_blocking,
// engine threads); keep that a compile-time fact.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}
    assert_send_sync::<Store>();
    assert_send::<PutWriter>();
    assert_send::<Artifact>();
};
