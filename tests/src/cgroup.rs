//! A cgroup v2 child directory for the clients.
//!
//! The agent attaches its socket programs to this directory, so they act on sockets
//! created by processes inside it (the clients) and on nothing else on the machine.
use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::names;

/// The cgroup2 mount point, read from /proc/self/mountinfo. It is not always
/// /sys/fs/cgroup: hybrid layouts put it at /sys/fs/cgroup/unified.
pub fn cgroup2_root() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
    find_mount(&text, "cgroup2").context("no cgroup2 mount in /proc/self/mountinfo")
}

/// First mount point of filesystem type `fstype` in mountinfo text.
pub fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != fstype {
            return None;
        }
        left.split_whitespace()
            .nth(4)
            .map(|p| PathBuf::from(unescape_mountinfo(p)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A child of the cgroup2 root, removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    root: PathBuf,
    path: PathBuf,
}

impl Cgroup {
    pub fn new() -> Result<Self> {
        let root = cgroup2_root()?;
        let path = root.join(names::unique());
        std::fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(Self { root, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pids currently in the cgroup.
    pub fn procs(&self) -> Result<Vec<u32>> {
        read_procs(&self.path)
    }
}

fn read_procs(dir: &Path) -> Result<Vec<u32>> {
    let file = dir.join("cgroup.procs");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
    text.lines()
        .map(|l| {
            l.trim()
                .parse::<u32>()
                .with_context(|| format!("pid {l:?}"))
        })
        .collect()
}

/// Moves any process left inside back to the root (a cgroup with members cannot be
/// removed), then removes the directory, retrying while exiting tasks drain.
pub fn remove_cgroup(root: &Path, path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(pids) = read_procs(path) {
            for pid in pids {
                // The process may exit meanwhile (ESRCH): that is fine.
                let _ = std::fs::write(root.join("cgroup.procs"), pid.to_string());
            }
        }
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => bail!("remove cgroup {}: {e}", path.display()),
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_cgroup(&self.root, &self.path) {
            eprintln!("svclb-harness: teardown: {e:#}");
        }
    }
}

/// Entries of the cgroup2 root whose names start with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let root = cgroup2_root()?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&root).with_context(|| format!("read {}", root.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) {
            out.push(name);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout() {
        let text = "\
25 1 0:23 / /sys rw,nosuid - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
41 35 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
42 35 0:39 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            find_mount(text, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_mount(text, "bpf"), None);
    }

    #[test]
    fn unescapes_octal_sequences() {
        let text = "41 35 0:38 / /mnt/a\\040b rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_mount(text, "cgroup2"), Some(PathBuf::from("/mnt/a b")));
    }
}
