//! Interrupted ByteStream writes, kept so the client can resume them (`QueryWriteStatus`,
//! then `Write` from `committed_size`). A policy with the clock passed in: no I/O, no
//! threads; the services hold it under a mutex.
//!
//! Bounded twice: at most [`PARKED_UPLOADS_MAX`] entries (the oldest goes first; each holds
//! an open temporary file) and [`PARKED_UPLOAD_TTL`] each. Dropping an entry drops its
//! upload, which removes its temporary file.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Interrupted uploads kept at most.
pub const PARKED_UPLOADS_MAX: usize = 64;
/// How long an interrupted upload waits for its client to resume it.
pub const PARKED_UPLOAD_TTL: Duration = Duration::from_secs(300);

/// Interrupted uploads by resource name.
pub struct Parked<T> {
    entries: HashMap<String, Entry<T>>,
    entries_max: usize,
    ttl: Duration,
}

struct Entry<T> {
    upload: T,
    /// Bytes of the resource processed (the next `write_offset`).
    committed: u64,
    parked_at: Instant,
}

impl<T> Parked<T> {
    pub fn new(entries_max: usize, ttl: Duration) -> Parked<T> {
        Parked {
            entries: HashMap::new(),
            entries_max,
            ttl,
        }
    }

    /// Keep `upload` of `name`, `committed` bytes in. Expired entries go first; then, at the
    /// bound, the oldest (it is dropped, so its client must start again).
    pub fn park(&mut self, name: &str, upload: T, committed: u64, now: Instant) {
        self.sweep(now);
        if !self.entries.contains_key(name) && self.entries.len() >= self.entries_max {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.parked_at)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        if self.entries_max > 0 {
            self.entries.insert(
                name.to_string(),
                Entry {
                    upload,
                    committed,
                    parked_at: now,
                },
            );
        }
    }

    /// Take the upload of `name` back to resume it, with its committed size.
    pub fn take(&mut self, name: &str, now: Instant) -> Option<(T, u64)> {
        self.sweep(now);
        self.entries.remove(name).map(|e| (e.upload, e.committed))
    }

    /// The committed size of `name`'s interrupted upload.
    pub fn committed(&mut self, name: &str, now: Instant) -> Option<u64> {
        self.sweep(now);
        self.entries.get(name).map(|e| e.committed)
    }

    /// Drop every entry past its time.
    pub fn sweep(&mut self, now: Instant) {
        let ttl = self.ttl;
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.parked_at) < ttl);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_expire_and_bound() {
        let t0 = Instant::now();
        let mut p = Parked::new(2, Duration::from_secs(10));
        p.park("a", "A", 100, t0);
        p.park("b", "B", 200, t0 + Duration::from_secs(1));
        assert_eq!(p.committed("a", t0), Some(100));
        // At the bound the oldest goes.
        p.park("c", "C", 300, t0 + Duration::from_secs(2));
        assert_eq!(p.committed("a", t0 + Duration::from_secs(2)), None);
        assert_eq!(p.len(), 2);
        // Taking removes it.
        assert_eq!(p.take("b", t0 + Duration::from_secs(3)), Some(("B", 200)));
        assert_eq!(p.take("b", t0 + Duration::from_secs(3)), None);
        // Re-parking the same name replaces it, at its new size.
        p.park("c", "C2", 400, t0 + Duration::from_secs(4));
        assert_eq!(p.committed("c", t0 + Duration::from_secs(5)), Some(400));
        // Past the time to live it is gone.
        assert_eq!(p.committed("c", t0 + Duration::from_secs(14)), None);
        assert!(p.is_empty());
    }

    #[test]
    fn zero_bound_keeps_nothing() {
        let now = Instant::now();
        let mut p = Parked::new(0, Duration::from_secs(10));
        p.park("a", 1, 1, now);
        assert!(p.is_empty());
    }
}
