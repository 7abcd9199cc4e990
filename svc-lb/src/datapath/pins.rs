//! Who may touch the pins. Whoever can open a pinned map can rewrite where every
//! Service on the node goes, and whoever can replace a pin can make a restarted agent
//! adopt a map or link of their own; so the pin directory is root's alone (mode 0700,
//! and an existing one owned by anyone else is refused), the pins themselves are 0600
//! (the kernel creates them `0600 & ~umask`), and a bpffs the agent mounts is 0700.
//!
//! It also holds the layout of the pin directory (maps at the top, links under
//! `links/`, netlink tc records under `tc-netlink/`).
//!
//! It also finishes what a killed agent left half done: a link pinned as `<name>_new`
//! whose rename over `<name>` never happened is still attached, next to the link the
//! next start adopts, and would run twice; it is detached and unpinned at start.
use std::{
    fs::{self, DirBuilder},
    io,
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use tracing::{info, warn};

use super::sys;

/// Default pin directory.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/svc-lb";
/// Where a missing bpffs gets mounted.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("links")
}

/// Where netlink-attached tc programs are recorded: one pinned program per
/// `<program>@<device>`, so that a restart knows to replace the filter and `cleanup`
/// knows which filters to remove (a netlink filter has no bpf link to pin).
pub fn tc_netlink_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("tc-netlink")
}

/// Makes sure `bpffs` is a directory on a bpf filesystem, mounting bpffs at
/// /sys/fs/bpf when the host has not (fresh machines boot without it), and that it and
/// its links directory are root's alone (see `pins`).
pub fn ensure_bpffs(bpffs: &Path) -> Result<()> {
    let parent = bpffs.parent().unwrap_or(Path::new("/"));
    if !parent.exists() {
        bail!("bpffs parent directory {} does not exist", parent.display());
    }
    if !sys::is_bpffs(parent)? {
        let mount = Path::new(BPFFS_MOUNT);
        if parent == mount {
            info!(path = BPFFS_MOUNT, "bpffs not mounted; mounting it");
            sys::mount_bpffs(mount)?;
        } else {
            bail!(
                "{} is not on a bpf filesystem (mount -t bpf bpf <dir>)",
                parent.display()
            );
        }
    }
    ensure_private_dir(bpffs)?;
    ensure_private_dir(&links_dir(bpffs))?;
    remove_interrupted_links(&links_dir(bpffs))?;
    Ok(())
}

/// Removes the pins of maps an earlier version used (`RETIRED_MAPS`), so that an
/// upgraded node does not keep them forever.
pub fn remove_retired_pins(bpffs: &Path) -> Result<()> {
    for name in svc_lb_common::RETIRED_MAPS {
        let path = bpffs.join(name);
        if path.exists() {
            fs::remove_file(&path)
                .with_context(|| format!("remove retired pin {}", path.display()))?;
            info!(pin = %path.display(), "removed the pin of a map this version no longer uses");
        }
    }
    Ok(())
}

/// Mode of the pin directories and of a bpffs the agent mounts.
pub const DIR_MODE: u32 = 0o700;
/// Suffix of a link pinned under its temporary name (see `links::pin_link`).
pub const INTERRUPTED_SUFFIX: &str = "_new";

/// Creates `dir` with mode 0700, or checks an existing one: it must be a directory
/// owned by root (or by this process's user), and a looser mode is tightened to 0700.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {
            // The umask can only take bits away, never add group or other access; set
            // the mode anyway so the result does not depend on it.
            fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
                .with_context(|| format!("chmod 0700 {}", dir.display()))?;
            return Ok(());
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("create {}", dir.display())),
    }
    let meta = fs::symlink_metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
    check_owner(dir, &meta, euid())?;
    let mode = meta.mode() & 0o7777;
    if mode != DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
            .with_context(|| format!("chmod 0700 {}", dir.display()))?;
        info!(path = %dir.display(), old_mode = format!("{mode:o}"), "pin directory tightened to mode 0700");
    }
    Ok(())
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn check_owner(dir: &Path, meta: &fs::Metadata, euid: u32) -> Result<()> {
    if !meta.is_dir() {
        bail!(
            "pin directory {} exists but is not a directory (a symlink or file there is refused)",
            dir.display()
        );
    }
    if meta.uid() != 0 && meta.uid() != euid {
        bail!(
            "pin directory {} is owned by uid {}, not root: refusing it, because its owner \
             could replace the pinned maps and links (remove it, or chown it to root)",
            dir.display(),
            meta.uid()
        );
    }
    Ok(())
}

/// Detaches and unpins every `*_new` link under `links` (left by an agent killed between
/// pinning a link and renaming it into place). Returns how many it removed.
pub fn remove_interrupted_links(links: &Path) -> Result<usize> {
    let mut removed = 0;
    let entries = match fs::read_dir(links) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("read {}", links.display())),
    };
    for entry in entries {
        let path = entry
            .with_context(|| format!("read {}", links.display()))?
            .path();
        let interrupted = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(INTERRUPTED_SUFFIX));
        if !interrupted {
            continue;
        }
        // Unpinning alone would do once no process holds the link; detaching first
        // also covers a link someone still holds open.
        if let Err(e) = sys::obj_get(&path).and_then(|fd| sys::link_detach(&fd)) {
            warn!(pin = %path.display(), error = %format!("{e:#}"), "could not detach an interrupted link; unpinning it anyway");
        }
        fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        warn!(pin = %path.display(), "removed a link pinned by an agent that was killed before renaming it into place");
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "svclb-pins-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        fs::create_dir(&d).expect("create temp dir");
        d
    }

    #[test]
    fn a_new_directory_is_0700_and_a_loose_one_is_tightened() {
        let base = tempdir();
        let dir = base.join("pins");
        ensure_private_dir(&dir).expect("create");
        let mode = |p: &Path| fs::metadata(p).expect("stat").mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        ensure_private_dir(&dir).expect("existing dir of ours");
        assert_eq!(mode(&dir), 0o700);
        fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn a_directory_of_another_user_or_a_file_is_refused() {
        let base = tempdir();
        let meta = fs::metadata(&base).expect("stat");
        let owner = meta.uid();
        // Owned by this user: fine whoever we are. Seen by a process of another
        // (non-root) user: refused, naming the owner.
        check_owner(&base, &meta, owner).expect("own dir");
        if owner != 0 {
            let err = check_owner(&base, &meta, owner + 1).expect_err("foreign dir");
            assert!(
                format!("{err:#}").contains(&format!("uid {owner}")),
                "{err:#}"
            );
        }
        let file = base.join("f");
        fs::write(&file, b"x").expect("write");
        let err = ensure_private_dir(&file).expect_err("a file is not a pin directory");
        assert!(format!("{err:#}").contains("not a directory"), "{err:#}");
        fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn interrupted_links_are_found_by_suffix_only() {
        let base = tempdir();
        // Plain files stand in for pins: obj_get fails on them, which is logged, and
        // the `_new` one is removed all the same; the others stay.
        for n in [
            "svclb_connect4",
            "svclb_connect4_new",
            "tc_ingress@eth0_new",
            "x_newer",
        ] {
            fs::write(base.join(n), b"").expect("write");
        }
        assert_eq!(remove_interrupted_links(&base).expect("remove"), 2);
        let mut left: Vec<String> = fs::read_dir(&base)
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["svclb_connect4", "x_newer"]);
        assert_eq!(
            remove_interrupted_links(&base.join("missing")).expect("no dir"),
            0
        );
        fs::remove_dir_all(&base).expect("cleanup");
    }
}
