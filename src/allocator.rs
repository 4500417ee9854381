//! How the process takes memory: mimalloc (declared by each binary: `src/main.rs`, the e2e
//! bench), without transparent huge pages.
//!
//! mimalloc asks the kernel for huge pages on its arenas (`MADV_HUGEPAGE`), so every first
//! touch of a 2 MiB region zeroes all of it, however little of it is used, and its purges
//! split those pages again. Under load that was an eighth of the store writer's CPU (the kernel
//! zeroing pages in its page faults) and a third of the e2e bench's resident memory.

/// Turns transparent huge pages off for this process (Linux; nothing elsewhere). Call it first
/// thing in `main`: memory touched before keeps its pages.
pub fn without_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}
