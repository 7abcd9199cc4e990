//! Unique, recognisable names for everything the harness creates.
use std::sync::atomic::{AtomicU32, Ordering};

/// Every object (netns, cgroup, pin directory, temp directory) starts with this.
pub const PREFIX: &str = "svclbt";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `svclbt-<pid>-`: names made by this process. The pid keeps concurrent runs (other
/// developers' test binaries on the same machine) from seeing each other's objects.
pub fn run_prefix() -> String {
    format!("{PREFIX}-{}-", std::process::id())
}

/// A fresh name: `svclbt-<pid>-<n>`.
pub fn unique() -> String {
    format!(
        "{}{}",
        run_prefix(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
