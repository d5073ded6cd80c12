//! Whether a file range is in the page cache, asked without reading it.
//!
//! The engine serves a range by splice on its own thread only when every page of it is
//! resident and up to date; anything else is read through the ring (io-wq), so no engine
//! thread waits for a disk.
//!
//! Two questions, cheapest first. `cachestat(2)` (Linux 6.5+) counts the range's pages in the
//! page cache in one syscall and touches none: fewer than all is the common cold answer. But a
//! page being read in (by read-ahead, ours or the kernel's) is in the cache before its data is:
//! a splice would then wait for the disk all the same. So when every page is present, a
//! one-byte `RWF_NOWAIT` read at each end of the range checks that the data is there
//! (read-ahead fills in order). Measured with read-ahead running (bench/cold), cachestat alone
//! let the engine block on pages in flight and hot requests waited seconds. Without
//! cachestat, `mincore(2)` over a never-touched mapping of the range answers page by page (the
//! kernel's `mincore_page` reports `folio_test_uptodate`); it costs a mapping per question.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::Errno;

/// The `cachestat` syscall number: the same on every architecture (it was added after the
/// syscall tables were unified at 424).
const SYS_CACHESTAT: libc::c_long = 451;
/// Page size assumed to count the pages of a range. A larger real page size only makes the
/// count of needed pages an over-estimate, which reads as "not resident": the safe side.
const PAGE_BYTES: u64 = 4096;

/// Set once `cachestat` answered ENOSYS: do not ask again.
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// What the page cache holds of a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    /// Every page of the range is cached: reading it does not wait for the disk.
    Resident,
    /// At least one page must come from the disk.
    NotResident,
    /// The kernel cannot tell (no `cachestat`): the caller decides.
    Unknown,
}

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Whether `len` bytes of `file` from `offset` are all in the page cache and up to date.
pub fn residency(file: &impl AsRawFd, offset: u64, len: u64) -> Residency {
    if len == 0 {
        return Residency::Resident;
    }
    if !UNSUPPORTED.load(Ordering::Relaxed) {
        match cachestat(file, offset, len) {
            Ok(stat) => {
                let first_page = offset / PAGE_BYTES;
                let end_page = offset.saturating_add(len).div_ceil(PAGE_BYTES);
                if stat.nr_cache < end_page - first_page {
                    return Residency::NotResident;
                }
                // Every page is present. One still being read in (read-ahead
                // runs in order) shows at the range's ends: a one-byte
                // `RWF_NOWAIT` read of the first and the last page is
                // refused while its data is not there. Cheaper than a
                // mapping and mincore for every chunk (two engine threads
                // mapping and unmapping at once cost a 17.9 MB c=8 GET a
                // third of its throughput); the ends are a heuristic, a
                // page evicted and re-read in the middle can slip by.
                return match (
                    nowait_byte(file, offset),
                    nowait_byte(file, offset + len - 1),
                ) {
                    (Some(true), Some(true)) => Residency::Resident,
                    (Some(_), Some(_)) => Residency::NotResident,
                    _ => Residency::Unknown,
                };
            }
            Err(err) if err.0 == libc::ENOSYS => UNSUPPORTED.store(true, Ordering::Relaxed),
            // EBADF, EINVAL, EOPNOTSUPP: no answer here; mincore may still know.
            Err(_) => {}
        }
    }
    match all_uptodate(file, offset, len) {
        Ok(true) => Residency::Resident,
        Ok(false) => Residency::NotResident,
        Err(_) => Residency::Unknown,
    }
}

/// Whether the byte at `offset` can be read without waiting for the disk (`None`: the
/// filesystem cannot say).
fn nowait_byte(file: &impl AsRawFd, offset: u64) -> Option<bool> {
    let mut byte = 0u8;
    let iov = libc::iovec {
        iov_base: (&mut byte as *mut u8).cast(),
        iov_len: 1,
    };
    let off = libc::off_t::try_from(offset).ok()?;
    // SAFETY: `iov` points at one live, writable byte for the duration of the call; the fd
    // is borrowed for the call, so it is open.
    let rc = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if rc >= 0 {
        // 0 is end of file: nothing there to wait for, and the caller's read will say so.
        return Some(true);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Some(false),
        _ => None,
    }
}

/// Whether every page of the range is up to date in the page cache, by `mincore(2)` over a
/// shared, never-touched mapping of it (no page is faulted in, so nothing is read).
fn all_uptodate(file: &impl AsRawFd, offset: u64, len: u64) -> Result<bool, Errno> {
    let map_offset = offset - offset % PAGE_BYTES;
    let map_len = usize::try_from(offset + len - map_offset).map_err(|_| Errno(libc::EINVAL))?;
    let pages = map_len.div_ceil(PAGE_BYTES as usize);
    if pages > MINCORE_PAGES_MAX {
        return Err(Errno(libc::E2BIG));
    }
    let file_offset = libc::off_t::try_from(map_offset).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: a fresh mapping chosen by the kernel (null hint, no MAP_FIXED), so it cannot
    // replace any existing mapping; PROT_READ of a file we hold open; the fd is borrowed for
    // the call. The mapping is never dereferenced.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            file_offset,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(Errno::from_io(&std::io::Error::last_os_error()));
    }
    let mut vec = [0u8; MINCORE_PAGES_MAX];
    // SAFETY: `addr..addr + map_len` is the mapping made above; `vec` has room for one byte
    // per page of it (`pages <= MINCORE_PAGES_MAX`) and lives across the call.
    let rc = unsafe { libc::mincore(addr, map_len, vec.as_mut_ptr()) };
    let err = (rc != 0).then(|| Errno::from_io(&std::io::Error::last_os_error()));
    // SAFETY: unmaps exactly the mapping made above, which nothing else refers to.
    unsafe { libc::munmap(addr, map_len) };
    match err {
        Some(err) => Err(err),
        None => Ok(vec[..pages].iter().all(|&v| v & 1 == 1)),
    }
}

/// Largest range [`residency`] checks page by page, in pages (a body chunk is at most one
/// pipe, 1 MiB, so 257 pages with an unaligned start; a larger range is `Unknown`).
const MINCORE_PAGES_MAX: usize = 2048;

/// Bytes of `len` from `offset` of `file` that the page cache holds (whole
/// pages), or `None` where the kernel cannot tell.
pub fn cached_bytes(file: &impl AsRawFd, offset: u64, len: u64) -> Option<u64> {
    cachestat(file, offset, len)
        .ok()
        .map(|stat| stat.nr_cache.saturating_mul(PAGE_BYTES))
}

/// Whether this kernel answers `cachestat` (probed on a pipe-free fd: `/proc/self/exe`'s page
/// cache is as good as any file's).
pub fn supported() -> bool {
    if UNSUPPORTED.load(Ordering::Relaxed) {
        return false;
    }
    match std::fs::File::open("/proc/self/exe") {
        Ok(file) => residency(&file, 0, 1) != Residency::Unknown,
        Err(_) => false,
    }
}

fn cachestat(file: &impl AsRawFd, offset: u64, len: u64) -> Result<Cachestat, Errno> {
    let range = CachestatRange { off: offset, len };
    let mut stat = Cachestat::default();
    // SAFETY: `range` and `stat` are live, properly aligned `repr(C)` structs laid out as the
    // kernel's `struct cachestat_range` and `struct cachestat`; the kernel reads the first and
    // writes the second only during the call. The fd is borrowed for the call, so it is open.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    if rc == 0 {
        Ok(stat)
    } else {
        Err(Errno::from_io(&std::io::Error::last_os_error()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_just_written_is_resident_and_a_dropped_one_is_not() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![7u8; 64 * 1024]).unwrap();
        let first = residency(&file, 0, 64 * 1024);
        if first == Residency::Unknown {
            eprintln!("SKIP: this kernel has no cachestat(2)");
            return;
        }
        assert_eq!(first, Residency::Resident);
        assert_eq!(residency(&file, 100, 20_000), Residency::Resident);
        assert_eq!(residency(&file, 0, 0), Residency::Resident);
        // Past the end of the file nothing can be cached.
        assert_eq!(residency(&file, 1 << 30, 4096), Residency::NotResident);
        // Written back and dropped from the cache, the pages are no longer resident.
        file.sync_all().unwrap();
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        assert_eq!(residency(&file, 0, 64 * 1024), Residency::NotResident);
        assert!(supported());
    }
}
