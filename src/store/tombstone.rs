//! Tombstones: what a delete leaves behind when the store is replicated.
//!
//! Without one, a delete is indistinguishable from "never had it": a peer
//! that missed the delete (it was down, or its outbox overflowed) still
//! holds the artifact, and anti-entropy would copy it back. A tombstone
//! `data_dir/.tombstones/{ns}/{xx}/{file name}` is an empty file whose
//! mtime is the delete's time; last-writer-wins compares it like a write.
//!
//! - [`Store::delete_at`] deletes as of a time and leaves the tombstone,
//!   unless the local artifact is newer (then nothing changes).
//! - A replicated write ([`PutOptions::last_writer_wins`]) is published
//!   only when it is newer than both the local artifact and the tombstone;
//!   the check runs under the same index lock as the rename, so a local
//!   write or delete cannot slip in between.
//! - A client's PUT removes the key's tombstone when it publishes.
//! - [`Store::expire_tombstones`] drops tombstones older than the
//!   retention (`tombstone_retention_ms`); the anti-entropy thread calls it.
//!
//! `.tombstones` starts with a dot, so it is never a namespace: the scan,
//! eviction and accounting do not see it.

use super::*;

/// The directory under `data_dir` holding tombstones.
pub const TOMBSTONE_DIR: &str = ".tombstones";

/// What [`Store::delete_at`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteAt {
    /// The key is deleted as of `time_ms`; `existed`: an artifact was
    /// removed (otherwise only the tombstone was written or kept).
    Deleted { existed: bool, time_ms: u64 },
    /// The local artifact is newer than the delete: nothing changed.
    Kept,
}

fn tombstone_rel(rel: &str) -> String {
    format!("{TOMBSTONE_DIR}/{rel}")
}

impl Shared {
    /// `(write time, sha256)` of the artifact at `rel`, if there is a
    /// readable one. Reads its 64-byte header.
    pub(super) fn version_at(&self, rel: &str) -> Option<(u64, [u8; 32])> {
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let fd = rustix::fs::openat(&self.data_dir_fd, rel, flags, Mode::empty()).ok()?;
        let mut head = [0u8; HEADER_BYTES];
        let n = rustix::io::pread(&fd, &mut head, 0).ok()?;
        let header = format::decode_header(&head[..n]).ok()?;
        let st = rustix::fs::fstat(&fd).ok()?;
        Some((
            background::millis(st.st_mtime, st.st_mtime_nsec as i64),
            header.sha256,
        ))
    }

    /// The delete time recorded for `rel`, if a tombstone exists.
    pub(super) fn tombstone_time(&self, rel: &str) -> Option<u64> {
        if !self.has_tombstones.load(Ordering::Acquire) {
            return None;
        }
        let st = rustix::fs::statat(
            &self.data_dir_fd,
            tombstone_rel(rel).as_str(),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .ok()?;
        Some(background::millis(st.st_mtime, st.st_mtime_nsec as i64))
    }

    /// Removes `rel`'s tombstone if there is one (a newer write replaced it).
    pub(super) fn clear_tombstone(&self, rel: &str) {
        if self.has_tombstones.load(Ordering::Acquire) {
            let _ = rustix::fs::unlinkat(
                &self.data_dir_fd,
                tombstone_rel(rel).as_str(),
                AtFlags::empty(),
            );
        }
    }

    /// Writes (or moves forward) `rel`'s tombstone to `time_ms`, durably
    /// under `fsync = always`.
    fn write_tombstone(&self, rel: &str, time_ms: u64) -> Result<(), StoreError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        // `{ns}/{xx}` of `{ns}/{xx}/{name}`.
        let mut dir_fd = {
            self.mkdir(&self.data_dir_fd, TOMBSTONE_DIR, &self.data_dir.display())?;
            let path = self.path(TOMBSTONE_DIR);
            rustix::fs::openat(&self.data_dir_fd, TOMBSTONE_DIR, flags, Mode::empty())
                .map_err(|e| self.errno("open directory", &path.display(), e))?
        };
        self.has_tombstones.store(true, Ordering::Release);
        let mut parts = rel.split('/');
        let name = parts.next_back().ok_or(StoreError::InvalidKey)?;
        let mut dir_rel = String::from(TOMBSTONE_DIR);
        for part in parts {
            dir_rel.push('/');
            dir_rel.push_str(part);
            let path = self.path(&dir_rel);
            self.mkdir(&dir_fd, part, &path.display())?;
            dir_fd = rustix::fs::openat(&dir_fd, part, flags, Mode::empty())
                .map_err(|e| self.errno("open directory", &path.display(), e))?;
        }
        let path = self.path(&tombstone_rel(rel));
        let file = rustix::fs::openat(
            &dir_fd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o644),
        )
        .map_err(|e| self.errno("create tombstone", &path.display(), e))?;
        let file = File::from(file);
        file.set_modified(UNIX_EPOCH + Duration::from_millis(time_ms))
            .map_err(|e| self.io("set the delete time of", &path.display(), e))?;
        if self.fsync == FsyncPolicy::Always {
            rustix::fs::fdatasync(&file)
                .map_err(|e| self.errno("fdatasync", &path.display(), e))?;
        }
        self.fsync_dir(&dir_fd, &path.display())
    }
}

impl Store {
    /// Deletes `ns/key` as of `time_ms` (ms since the epoch) and leaves a
    /// tombstone. A replicated delete (`local == false`) changes nothing when
    /// the local artifact was written after `time_ms` ([`DeleteAt::Kept`]).
    /// A client's delete (`local == true`) always wins: its time moves past
    /// the artifact's (a replicated write may carry a clock ahead of ours),
    /// and a key with no artifact is left alone (no tombstone). An older
    /// tombstone moves forward; a newer one stays. The check and the change
    /// happen under the key's index lock.
    pub fn delete_at(
        &self,
        ns: &str,
        key: &str,
        time_ms: u64,
        local: bool,
    ) -> Result<DeleteAt, StoreError> {
        check_names(ns, key)?;
        let sh = self.shared();
        let rel = relative_path(ns, key);
        let locked = sh.index.lock(&rel);
        let mut time_ms = time_ms;
        match sh.version_at(&rel) {
            Some((t, _)) if t > time_ms && !local => return Ok(DeleteAt::Kept),
            Some((t, _)) => time_ms = time_ms.max(t.saturating_add(1)),
            None if local => {
                return Ok(DeleteAt::Deleted {
                    existed: false,
                    time_ms,
                })
            }
            None => {}
        }
        if sh.tombstone_time(&rel).is_none_or(|t| t < time_ms) {
            sh.write_tombstone(&rel, time_ms)?;
        }
        let existed = sh.unlink_artifact(&rel, time_ms, locked)?;
        Ok(DeleteAt::Deleted { existed, time_ms })
    }

    /// The time `ns/key` was deleted, if a tombstone records it.
    pub fn tombstone_time(&self, ns: &str, key: &str) -> Option<u64> {
        if !(valid_namespace(ns) && valid_key(key)) {
            return None;
        }
        self.shared().tombstone_time(&relative_path(ns, key))
    }

    /// Removes tombstones whose delete time is before `cutoff_ms`; returns
    /// how many. Walks `.tombstones` (disk work: call it off the engine
    /// threads). Each removal re-checks the time under the key's lock, so a
    /// delete that moved the tombstone forward meanwhile keeps it.
    pub fn expire_tombstones(&self, cutoff_ms: u64) -> u64 {
        let sh = self.shared();
        if !sh.has_tombstones.load(Ordering::Acquire) {
            return 0;
        }
        let mut removed = 0;
        let root = sh.path(TOMBSTONE_DIR);
        let Ok(namespaces) = std::fs::read_dir(&root) else {
            return 0;
        };
        for ns in namespaces.flatten() {
            let Ok(shards) = std::fs::read_dir(ns.path()) else {
                continue;
            };
            for shard in shards.flatten() {
                let Ok(files) = std::fs::read_dir(shard.path()) else {
                    continue;
                };
                for file in files.flatten() {
                    let rel = format!(
                        "{}/{}/{}",
                        ns.file_name().to_string_lossy(),
                        shard.file_name().to_string_lossy(),
                        file.file_name().to_string_lossy()
                    );
                    let locked = sh.index.lock(&rel);
                    if sh.tombstone_time(&rel).is_some_and(|t| t < cutoff_ms) {
                        sh.clear_tombstone(&rel);
                        removed += 1;
                    }
                    drop(locked);
                }
            }
        }
        removed
    }
}
