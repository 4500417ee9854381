//! How the process takes memory: mimalloc for Rust (declared by each binary: `src/main.rs`, the
//! e2e bench), glibc's malloc for SQLite (C), and for both, settings that keep the kernel out of
//! the hot path. `configure` applies them; call it first thing in `main`.
//!
//! - mimalloc asks the kernel for huge pages on its arenas (`MADV_HUGEPAGE`), so every first
//!   touch of a 2 MiB region zeroes all of it, however little of it is used, and its purges
//!   split those pages again. Under load that was an eighth of the store writer's CPU (the kernel
//!   zeroing pages in its page faults) and a third of the e2e bench's resident memory.
//! - glibc gives a thread's heap back to the kernel (`madvise`) as soon as its free top passes
//!   128 KiB. SQLite frees and takes again all the time (a statement journal for every
//!   multi-row update), so the writer gave memory back and faulted it in again: about a tenth
//!   of its CPU (page faults, `madvise`, the TLB flushes they send to the other core).

/// Free memory glibc keeps at the top of a heap before giving it back: more than SQLite's
/// connections ever hold at once (a writer's page cache is 2 MiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const GLIBC_TRIM_THRESHOLD: libc::c_int = 64 << 20;

/// Applies both settings; a setting that fails is named on stderr (logging starts later) and
/// the process runs without it.
pub fn configure() {
    if let Err(error) = without_huge_pages() {
        eprintln!("warning: transparent huge pages stay on for this process: {error}");
    }
    if !glibc_keeps_freed_memory() {
        eprintln!("warning: glibc's malloc gives freed memory back to the kernel at once");
    }
}

/// Turns transparent huge pages off for this process (Linux; nothing elsewhere). Memory touched
/// before keeps its pages.
fn without_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}

/// Raises glibc's trim threshold (and so stops it moving with the allocations). True where
/// glibc is not the C allocator.
fn glibc_keeps_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of glibc's allocator, and takes any value; it is
    // called before the process has other threads.
    return unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD) } == 1;
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    true
}
