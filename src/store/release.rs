//! Replaced versions freed after the commit, not inside it.
//!
//! A rename over a key drops the old version's last link; when nothing holds
//! it open, the kernel frees its blocks inside the rename, and on a
//! filesystem mounted with `discard` waits there for the device to discard
//! them (13 % of the durable 4 KiB PUT's publisher sleeps in a profile,
//! docs/benchmarks.md). So a commit opens the old version (`O_PATH`, which
//! holds the inode) before its rename and hands the descriptor here; this
//! thread closes it, and the freeing happens beside the next commits rather
//! than before the 2xx. Bounded in descriptors and in bytes held: past
//! either bound the commit closes it itself, as before. Nothing here is
//! about durability: the rename is what a crash keeps or loses, and a crash
//! frees whatever was held.

use rustix::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

/// Old versions waiting to be closed, at most.
pub(super) const RELEASE_QUEUE_MAX: usize = 1024;
/// Disk bytes those may hold, at most (a queue of large old versions would
/// otherwise keep gigabytes from a nearly full disk).
pub(super) const RELEASE_BYTES_MAX: u64 = 256 << 20;

/// The queue to the releasing thread.
#[derive(Debug)]
pub(super) struct Releaser {
    tx: Mutex<Option<SyncSender<(OwnedFd, u64)>>>,
    held_bytes: Arc<AtomicU64>,
}

impl Releaser {
    /// The releaser and its thread (`sluice-release`), which ends once
    /// [`Releaser::stop`] is called and the queue is worked off.
    pub(super) fn start() -> std::io::Result<(Releaser, JoinHandle<()>)> {
        let (tx, rx) = sync_channel::<(OwnedFd, u64)>(RELEASE_QUEUE_MAX);
        let held_bytes = Arc::new(AtomicU64::new(0));
        let held = Arc::clone(&held_bytes);
        let thread = std::thread::Builder::new()
            .name("sluice-release".into())
            .spawn(move || {
                for (fd, bytes) in rx {
                    drop(fd);
                    held.fetch_sub(bytes, Ordering::Relaxed);
                }
            })?;
        Ok((
            Releaser {
                tx: Mutex::new(Some(tx)),
                held_bytes,
            },
            thread,
        ))
    }

    /// Close `old` (a descriptor of a version just replaced, `size_bytes`
    /// long when the index knew it) on the releasing thread, or here when
    /// the queue or the byte bound is full or the thread has stopped.
    pub(super) fn release(&self, old: OwnedFd, size_bytes: Option<u64>) {
        // The index knows the size of nearly every replaced version; only
        // one the startup scan has not reached yet costs a stat.
        let bytes = size_bytes
            .unwrap_or_else(|| rustix::fs::fstat(&old).map_or(0, |st| (st.st_blocks as u64) * 512));
        let held = self.held_bytes.fetch_add(bytes, Ordering::Relaxed);
        if held + bytes > RELEASE_BYTES_MAX {
            self.held_bytes.fetch_sub(bytes, Ordering::Relaxed);
            return; // `old` closes here
        }
        let tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        let refused = match tx.as_ref() {
            Some(tx) => match tx.try_send((old, bytes)) {
                Ok(()) => None,
                Err(TrySendError::Full(item) | TrySendError::Disconnected(item)) => Some(item),
            },
            None => Some((old, bytes)),
        };
        drop(tx);
        if refused.is_some() {
            self.held_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Bytes of old versions not yet closed.
    #[cfg(test)]
    fn held_bytes(&self) -> u64 {
        self.held_bytes.load(Ordering::Relaxed)
    }

    /// No more hand-offs: the thread closes what is queued and ends.
    pub(super) fn stop(&self) {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{Mode, OFlags};
    use std::io::Write;

    fn old_version(dir: &std::path::Path, name: &str, bytes: usize) -> OwnedFd {
        let path = dir.join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&vec![7u8; bytes])
            .unwrap();
        let fd = rustix::fs::open(
            &path,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        fd
    }

    #[test]
    fn old_versions_are_closed_on_the_thread_and_their_bytes_counted_until_then() {
        let dir = tempfile::tempdir().unwrap();
        let (releaser, thread) = Releaser::start().unwrap();
        for i in 0..10 {
            let bytes = (i % 2 == 0).then_some(64 << 10);
            releaser.release(old_version(dir.path(), &format!("v{i}"), 64 << 10), bytes);
        }
        releaser.stop();
        thread.join().unwrap();
        assert_eq!(releaser.held_bytes(), 0);
        // After the stop, a release closes inline and holds nothing.
        releaser.release(old_version(dir.path(), "late", 4096), None);
        assert_eq!(releaser.held_bytes(), 0);
    }

    #[test]
    fn past_the_byte_bound_the_caller_closes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (releaser, thread) = Releaser::start().unwrap();
        // Pretend the queue already holds the bound: the next release must not add to it.
        releaser
            .held_bytes
            .store(RELEASE_BYTES_MAX, Ordering::Relaxed);
        releaser.release(old_version(dir.path(), "big", 8192), None);
        assert_eq!(releaser.held_bytes(), RELEASE_BYTES_MAX);
        releaser.held_bytes.store(0, Ordering::Relaxed);
        releaser.stop();
        thread.join().unwrap();
    }
}
