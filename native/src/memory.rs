//! The binary's allocator and how it holds memory.
//!
//! A server's resident memory is mostly many small, long-lived pieces
//! (connections, logs, indexes): what matters is that freed memory goes back
//! to the OS and that little is mapped but unused. BENCHMARKS.md (§7, §16,
//! §18, §24) has the measurements behind each setting.

// mimalloc returns freed memory to the OS and keeps no per-thread arenas
// of glibc's size: less RSS per connection under W5.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (position 15 of `mi_option_e` in the
/// headers of mimalloc 2.x and 3.x; the sys crate names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Apply the settings below; call early in `main`, before the work allocates.
pub fn tune() {
    return_memory_promptly();
    no_transparent_huge_pages();
}

/// Return freed memory to the OS 1 ms after it is freed instead of 10 ms.
/// mimalloc purges only when the thread that owns the memory next calls the
/// allocator, so after a burst (a database seeded, a cold sync served) an
/// idle server kept tens of MB it no longer used (28–55 MB for the same
/// state, §16–§17); 1 ms keeps it near what is live, for about 6% of peak
/// durable ingest. `MIMALLOC_PURGE_DELAY` still wins when set.
fn return_memory_promptly() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads options
        // atomically, so this is sound at any time, from any thread.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1) };
    }
}

/// No transparent huge pages for this process. Where the kernel hands them
/// out (`always`, or `madvise`, which mimalloc asks for), one 2 MiB page
/// backs each region of the allocator that a few small objects touch, and a
/// purge of part of it is undone by the next fault, which zeroes all 2 MiB
/// again: the same server held the W1 database in 42–44 MB with them and
/// 24–25 MB without, and 15–17 KB per idle connection against 10–12 KB
/// (§24).
/// mimalloc's own switch (`MIMALLOC_ALLOW_THP=0`) is read before `main`
/// runs, so the process flag is set here instead (inherited by children,
/// checked by the kernel at every fault). `MIMALLOC_ALLOW_THP` set to
/// anything keeps the kernel's and mimalloc's choice.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no
        // memory of ours; it fails only on kernels older than 3.15.
        let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if r != 0 {
            tracing::debug!(
                "transparent huge pages stay on: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
