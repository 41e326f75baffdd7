//! Process-wide settings that decide CPU speed: how the allocator treats freed memory.
//!
//! A training step allocates and frees hundreds of tensors of 1–200 MB. With glibc's defaults
//! every allocation above 128 KB (up to 32 MB adaptively) is a fresh `mmap`, and every free an
//! `munmap`: each step then pays page faults, page zeroing and TLB shootdowns for every tensor
//! (25 % of the process's time was in the kernel in `perf`). PyTorch avoids it with a caching
//! allocator. Here glibc is told to serve every allocation from its heap and never give memory
//! back (`M_MMAP_MAX = 0`, a high `M_TRIM_THRESHOLD`), so freed tensors are reused as-is.
//! Measured with the train bench (`docs/performance-history.md`, `--allocator system|retain` of the same
//! binary): 5.12 → 3.64 s per KD step.
//!
//! One arena (`M_ARENA_MAX = 1`): the kernels run on short-lived scoped threads, and glibc
//! gives such threads their own arenas, whose heaps are `mmap`ed and trimmed apart from the
//! settings above; their memory was faulted in and zeroed again on every step (`clear_page_erms`
//! 10 % of a KD step on the AMX host). Train bench, online teacher, bf16 products: 418.9 → 438.7
//! tok/s (`MALLOC_ARENA_MAX=1` on the same binary).

/// How the allocator treats freed memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AllocatorMode {
    /// Keep freed memory in the process for reuse (the process stays at its peak size).
    #[default]
    Retain,
    /// The C library's defaults.
    System,
}

impl std::str::FromStr for AllocatorMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "retain" => Ok(Self::Retain),
            "system" => Ok(Self::System),
            _ => Err(format!(
                "unknown allocator mode `{s}` (expected retain or system)"
            )),
        }
    }
}

/// Apply `mode` to this process's allocator. Call once, before any tensor work. Returns whether
/// anything changed (only glibc on Linux is tuned; elsewhere this does nothing).
pub fn configure_allocator(mode: AllocatorMode) -> bool {
    if mode == AllocatorMode::System {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes glibc's tuning parameters; it is called before the
        // process starts its worker threads.
        #[allow(unsafe_code)]
        unsafe {
            let a = libc::mallopt(libc::M_MMAP_MAX, 0);
            let b = libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            let c = libc::mallopt(libc::M_TOP_PAD, 64 << 20);
            let d = libc::mallopt(libc::M_ARENA_MAX, 1);
            a == 1 && b == 1 && c == 1 && d == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Sets environment variables the process's libraries read when they start (candle's and rayon's
/// thread count, `RAYON_NUM_THREADS`; std's library backtraces, `RUST_LIB_BACKTRACE`). Changing
/// the environment is only sound while no other thread exists, so this checks that first (on
/// Linux, from `/proc/self/status`) and refuses otherwise: call it first thing in `main`.
pub fn set_env_at_start(vars: &[(&str, String)]) -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        let status = fs_err::read("/proc/self/status").map_err(|e| e.to_string())?;
        let status = String::from_utf8_lossy(&status);
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse::<usize>().ok());
        if threads != Some(1) {
            return Err(format!(
                "environment changed with {threads:?} threads running; call set_env_at_start first in main"
            ));
        }
    }
    for (var, value) in vars {
        // SAFETY: no other thread exists (checked above on Linux; elsewhere the caller's contract),
        // so nothing reads the environment concurrently.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var(var, value)
        };
    }
    Ok(())
}
