//! The C allocator's own view of the heap, for `src/heap.rs`: how much it
//! holds free, and giving the pages of free chunks back to the kernel. On a
//! libc other than glibc both are no-ops.

/// Bytes the allocator holds free in all its arenas (`mallinfo2().fordblks`:
/// free chunks and the arenas' top chunks, released to the kernel or not).
/// 0 where the allocator cannot say.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn free_bytes() -> u64 {
    // SAFETY: mallinfo2 takes no arguments and only reads the allocator's
    // own state under its arena locks; any thread may call it.
    let info = unsafe { libc::mallinfo2() };
    info.fordblks as u64
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn free_bytes() -> u64 {
    0
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
