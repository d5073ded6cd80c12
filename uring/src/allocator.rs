//! The C allocator's own view of the heap, for `src/heap.rs`: how much it
//! holds in use and free, and giving the pages of free chunks back to the
//! kernel. On a libc other than glibc these are no-ops.

/// What the allocator holds in all its arenas, bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapBytes {
    /// Allocated and not freed (`mallinfo2().uordblks`, plus the large
    /// blocks it mapped on their own, `hblkhd`).
    pub in_use: u64,
    /// Free chunks and the arenas' top chunks (`fordblks`), given back to
    /// the kernel or not.
    pub free: u64,
}

/// The allocator's totals now; zeros where it cannot say.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn heap_bytes() -> HeapBytes {
    // SAFETY: mallinfo2 takes no arguments and only reads the allocator's
    // own state under its arena locks; any thread may call it.
    let info = unsafe { libc::mallinfo2() };
    HeapBytes {
        in_use: (info.uordblks + info.hblkhd) as u64,
        free: info.fordblks as u64,
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn heap_bytes() -> HeapBytes {
    HeapBytes::default()
}

/// `malloc_trim(0)`: give back to the kernel every whole page inside the
/// allocator's free chunks, in every arena (`madvise(MADV_DONTNEED)`), and
/// shrink each heap's top. Frees nothing in use.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim() {
    // SAFETY: malloc_trim takes a plain size (the top padding to keep) and
    // works under each arena's lock; it touches only free chunks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() {}
