//! A private pin directory on bpffs.
use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use crate::{cmd, names};

/// The conventional bpffs mount point.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// `statfs.f_type` of bpffs (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` is the root of (or inside) a bpf filesystem. The directory exists on
/// every machine, mounted or not, so only the filesystem type tells.
pub fn is_bpffs(path: &Path) -> Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes()).context("path with NUL")?;
    // SAFETY: statfs writes only into the zeroed struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs.
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Mounts bpffs on /sys/fs/bpf when it is not mounted yet (machines boot without it) and
/// returns the mount point. The mount is left in place: it is the machine's normal state
/// and the agent itself would mount it too.
pub fn ensure_bpffs() -> Result<PathBuf> {
    let mnt = Path::new(BPFFS_MOUNT);
    if !is_bpffs(mnt)? {
        cmd::run("mount", ["-t", "bpf", "bpf", BPFFS_MOUNT])
            .context("mount bpffs on /sys/fs/bpf")?;
        if !is_bpffs(mnt)? {
            bail!("{BPFFS_MOUNT} is still not bpffs after mounting it");
        }
    }
    Ok(mnt.to_path_buf())
}

/// `/sys/fs/bpf/svclbt-<pid>-<n>`. On drop it runs `svc-lb cleanup` for this directory and
/// the lab's cgroup (detaching every program the agent left attached), then removes what
/// is left of the directory.
#[derive(Debug)]
pub struct BpfDir {
    path: PathBuf,
    svc_lb: PathBuf,
    cgroup: PathBuf,
}

impl BpfDir {
    pub fn new(svc_lb: &Path, cgroup: &Path) -> Result<Self> {
        let path = ensure_bpffs()?.join(names::unique());
        std::fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self {
            path,
            svc_lb: svc_lb.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
        })
    }

    /// A pin directory at a chosen path (created if missing), cleaned up the same way.
    pub fn at(path: &Path, svc_lb: &Path, cgroup: &Path) -> Result<Self> {
        ensure_bpffs()?;
        std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
        if !is_bpffs(path)? {
            bail!("{} is not on a bpf filesystem", path.display());
        }
        Ok(Self {
            path: path.to_path_buf(),
            svc_lb: svc_lb.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpfDir {
    fn drop(&mut self) {
        // A test may already have run cleanup and removed the directory; running it again
        // must be harmless, but there is nothing to do when the pins are gone.
        if self.path.exists() {
            cmd::run_logged(
                &self.svc_lb,
                [
                    "cleanup".as_ref(),
                    "--bpffs".as_ref(),
                    self.path.as_os_str(),
                    "--cgroup".as_ref(),
                    self.cgroup.as_os_str(),
                ],
            );
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "svclb-harness: teardown: remove {}: {e}",
                self.path.display()
            );
        }
    }
}

/// Entries of the bpffs mount whose names start with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let mnt = Path::new(BPFFS_MOUNT);
    if !is_bpffs(mnt)? {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(mnt).with_context(|| format!("read {BPFFS_MOUNT}"))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) {
            out.push(name);
        }
    }
    Ok(out)
}
