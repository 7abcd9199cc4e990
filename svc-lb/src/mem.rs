//! Giving freed heap memory back to the kernel.
//!
//! A full sync decodes the whole input (tens of MB of JSON at 10 000 Services) and
//! builds a plan; most of that is garbage once the maps are written, but it was
//! allocated between the objects that stay, in the scan thread's arena and the main
//! one. glibc keeps such free memory for later allocations and returns only the top of
//! each heap; `malloc_trim(0)` also releases the free pages in the middle of every
//! arena (`MADV_DONTNEED`), which is where most of it sits.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

/// Below this, a sync freed too little to be worth a walk over the heap.
const WORTH_IT: Duration = Duration::from_millis(20);

/// Releases free heap pages after a sync that took `took`; cheap syncs (one changed
/// Service) skip it, so it costs nothing on the propagation path. Returns how long the
/// release took, for the log.
pub fn release_after_sync(took: Duration) -> Option<Duration> {
    if took < WORTH_IT {
        return None;
    }
    let start = Instant::now();
    release();
    Some(start.elapsed())
}

/// Releases free heap pages between the stages of a full sync into empty maps (the
/// first one): what the sources' decoding and the model's building freed sits in
/// the middle of the heap, resident, while the plan and the mirror of the maps grow
/// to the sync's high-water mark in pages of their own. A few milliseconds at
/// 100 000 Services.
pub fn release_between_stages() {
    release();
}

/// One malloc arena for the whole process, unless the operator chose otherwise with
/// `MALLOC_ARENA_MAX`. glibc gives every thread that allocates concurrently its own
/// arena (up to 8 per CPU), and each keeps its freed pages for later; the agent's
/// few threads (tokio workers, the scan thread, the mirror builder) then hold several
/// copies of a sync's garbage. Measured with the same binary at 10 000 Services × 3:
/// 68.1 MiB resident by default, 62.0 MiB with one arena (high-water mark 85.1 → 74.9
/// MiB). The agent's allocations are not contended enough for one lock to matter.
/// Call before any thread starts.
pub fn limit_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator parameter; it is called before the
    // runtime starts any thread, and takes no pointers.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Rebuilds `map` with full nodes. A `BTreeMap` filled by inserts, in key order or
/// scattered, leaves its nodes about two thirds full (a full node splits in two); one
/// built from sorted entries packs them. For the agent's large long-lived maps, built
/// once by a full sync: at 100 000 Services × 10 endpoints the mirror's backend map
/// alone held 43 MB of nodes. O(n), without comparisons beyond a check that the
/// entries are sorted.
pub fn compact<K: Ord, V>(map: &mut BTreeMap<K, V>) {
    *map = std::mem::take(map).into_iter().collect();
}

/// (VmRSS, VmHWM) of this process in KiB, from /proc/self/status; `None` where it
/// cannot be read. For the debug log of a full sync's stages (`svc_lb::mem=debug`):
/// which stage sets the high-water mark.
pub fn usage() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Logs [`usage`] at debug level under `stage`, if that level is on for this module.
pub fn log_usage(stage: &'static str) {
    if tracing::enabled!(tracing::Level::DEBUG)
        && let Some((rss_kib, hwm_kib)) = usage()
    {
        tracing::debug!(stage, rss_kib, hwm_kib, "memory");
    }
}

fn release() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists, under
    // the allocator's locks; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}
