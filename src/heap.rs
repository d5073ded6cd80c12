//! Giving freed heap memory back to the kernel.
//!
//! glibc's allocator keeps what a thread frees in that thread's arena (up to
//! eight arenas per core) and hands memory back to the kernel only from the
//! top of a heap. A server whose threads take turns allocating (engine
//! threads, publishers, peer receivers, anti-entropy walks, tier uploads)
//! therefore grows its resident set by the free holes left in each arena,
//! which is not a leak but reads as one: in the hour-long soak (issue 27)
//! every node's RSS crept up by a quarter with a steady number of artifacts,
//! and `malloc_trim(0)` called by hand gave back 2.4 to 4.1 MB of the 18 to
//! 25 MB of anonymous memory of each node.
//!
//! So one thread (`sluice-heap`, normal scheduling class: it takes each
//! arena's lock, and a thread in `SCHED_IDLE` holding it could stall an
//! engine thread) wakes every [`TRIM_INTERVAL`], asks the allocator how much
//! it holds free (`mallinfo2`), and when that is at least [`TRIM_FREE_BYTES_MIN`]
//! calls `malloc_trim(0)`, which releases the free pages inside every arena
//! (`madvise(MADV_DONTNEED)`), not only at the tops. The cost is a walk of
//! the arenas' free lists under their locks, a fraction of a millisecond for
//! a heap of tens of MiB, once per interval.
//!
//! The last reading is `sluice_memory_bytes{part="heap_in_use"}` (what the
//! program holds: a leak shows here) and `{part="heap_free"}` (what the
//! allocator holds free, released or not: RSS above `heap_in_use` that a
//! trim does not bring down is fragmentation, pages with a live block).
//! The calls into the allocator are `sluice_uring::allocator` (this crate
//! has no `unsafe`); on a libc other than glibc they do nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// How often the thread looks at the heap.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);
/// Free bytes in the allocator below which a trim is not worth its walk.
pub const TRIM_FREE_BYTES_MIN: u64 = 1 << 20;

static FREE_BYTES: AtomicU64 = AtomicU64::new(0);
static IN_USE_BYTES: AtomicU64 = AtomicU64::new(0);
static STARTED: OnceLock<()> = OnceLock::new();

/// Bytes the allocator held free at its last reading (0 before the first,
/// and where the allocator cannot say).
pub fn free_bytes() -> u64 {
    FREE_BYTES.load(Ordering::Relaxed)
}

/// Bytes the program held allocated at the allocator's last reading.
pub fn in_use_bytes() -> u64 {
    IN_USE_BYTES.load(Ordering::Relaxed)
}

/// Start the trimming thread (once per process; later calls do nothing).
pub fn start() {
    STARTED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("sluice-heap".into())
            .spawn(|| loop {
                std::thread::sleep(TRIM_INTERVAL);
                trim_if_worthwhile();
            });
        if let Err(err) = spawned {
            tracing::warn!(%err, "could not start the heap-trimming thread; freed memory stays in the allocator");
        }
    });
}

/// Read the allocator's free bytes and, when there are at least
/// [`TRIM_FREE_BYTES_MIN`], give the free pages back. Returns the free bytes read.
pub fn trim_if_worthwhile() -> u64 {
    let heap = sluice_uring::allocator::heap_bytes();
    let free = heap.free;
    FREE_BYTES.store(free, Ordering::Relaxed);
    IN_USE_BYTES.store(heap.in_use, Ordering::Relaxed);
    if free >= TRIM_FREE_BYTES_MIN {
        sluice_uring::allocator::trim();
    }
    free
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_trim_gives_back_what_a_thread_freed_inside_its_arena() {
        // A thread fills its arena with 64 MiB of small blocks and frees all
        // but every 64th: the holes cannot shrink the heap from its top, so
        // without a trim they stay resident.
        let kept = std::thread::spawn(|| {
            let blocks: Vec<Vec<u8>> = (0..65_536).map(|i| vec![i as u8; 1000]).collect();
            blocks
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % 64 == 0)
                .map(|(_, b)| b)
                .collect::<Vec<_>>()
        })
        .join()
        .expect("thread");
        let before = anon_bytes();
        let free = trim_if_worthwhile();
        let after = anon_bytes();
        assert!(free >= 32 << 20, "the allocator held {free} bytes free");
        assert_eq!(free_bytes(), free);
        // The kept blocks (a 64th of 64 MiB) are in use.
        assert!(in_use_bytes() >= 1 << 20, "in use {}", in_use_bytes());
        assert!(
            after + (16 << 20) <= before,
            "RssAnon {before} -> {after} bytes: the trim gave back less than 16 MiB"
        );
        drop(kept);
    }
}
