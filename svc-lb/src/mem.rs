//! Giving freed heap memory back to the kernel.
//!
//! A full sync decodes the whole input (tens of MB of JSON at 10 000 Services) and
//! builds a plan; most of that is garbage once the maps are written, but it was
//! allocated between the objects that stay, in the scan thread's arena and the main
//! one. glibc keeps such free memory for later allocations and returns only the top of
//! each heap; `malloc_trim(0)` also releases the free pages in the middle of every
//! arena (`MADV_DONTNEED`), which is where most of it sits.
use std::time::{Duration, Instant};

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

fn release() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists, under
    // the allocator's locks; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}
