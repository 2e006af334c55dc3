//! Giving freed memory back to the system.
//!
//! glibc's allocator keeps freed memory in its arenas (one per thread that allocates, up to
//! eight per core) and returns it only from the top of each heap. After a burst of frees (a
//! closed window's groups and rows) the process's resident size stays at the burst's peak, and
//! the next burst's allocations, placed around what is still in use, raise it further.
//! `malloc_trim` returns every free page of every arena.

/// Returns the allocator's free pages to the system (glibc), or does nothing (other C
/// libraries, which trim on their own). Takes a few milliseconds: call it after a burst, not
/// on a hot path.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
