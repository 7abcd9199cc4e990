//! Who may touch the pins: the real agent on a private pin directory refuses one owned
//! by another user (naming the owner), and once it runs, its directories are 0700 and
//! every pin is 0600, so that only root can open a map or replace a link.
//!
//! Run as root: `cargo test --release -p svc-lb-tests --features e2e --test pins`.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
};

use anyhow::{Context, Result, ensure};
use svc_lb_tests::{Bins, Lab, lab::isolated};

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::symlink_metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .mode()
        & 0o7777)
}

#[test]
fn pin_directory_is_root_only_and_a_foreign_one_is_refused() {
    isolated(|| {
        let bins =
            Bins::from_env(Some(env!("CARGO_BIN_EXE_svclb-harness"))).expect("locate binaries");
        let mut lab = Lab::new(bins, &["a"]).expect("build the lab");
        if let Err(e) = check(&mut lab) {
            panic!("{e:?}");
        }
    });
}

fn check(lab: &mut Lab) -> Result<()> {
    let dir = lab.bpffs().to_path_buf();
    // A directory another user could write to (as an earlier, careless install left it).
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).context("chown the pin dir")?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
        .context("chmod the pin dir")?;
    let refused = lab
        .start_agent()
        .err()
        .context("the agent started on a pin directory owned by uid 65534")?;
    let text = format!("{refused:#}");
    ensure!(
        text.contains("owned by uid 65534, not root"),
        "the refusal does not name the owner: {text}"
    );
    drop(lab.take_agent());
    ensure!(
        std::fs::read_dir(&dir)?.next().is_none(),
        "the refused start pinned something in {}",
        dir.display()
    );

    std::os::unix::fs::chown(&dir, Some(0), Some(0)).context("chown back")?;
    lab.start_agent()?;
    ensure!(mode(&dir)? == 0o700, "pin dir mode {:o}", mode(&dir)?);
    let links = dir.join("links");
    ensure!(mode(&links)? == 0o700, "links dir mode {:o}", mode(&links)?);
    let mut pins = 0;
    for d in [&dir, &links] {
        for e in std::fs::read_dir(d)? {
            let p = e?.path();
            if p.is_dir() {
                continue;
            }
            ensure!(
                mode(&p)? == 0o600,
                "{} has mode {:o}",
                p.display(),
                mode(&p)?
            );
            pins += 1;
        }
    }
    ensure!(pins > 10, "only {pins} pins found under {}", dir.display());
    Ok(())
}

/// `svc-lb prepare` on a host without bpffs (simulated in a private mount namespace, where
/// a tmpfs hides the real bpffs) mounts one with mode 0700 and creates the pin directory
/// 0700. Nothing outside that namespace sees either mount.
#[test]
fn prepare_mounts_a_private_bpffs_when_the_host_has_none() {
    let bin = svc_lb_tests::agent::default_bin();
    let script = format!(
        "set -e
mount -t tmpfs tmpfs /sys/fs/bpf
'{bin}' prepare --bpffs /sys/fs/bpf/svc-lb
stat -f -c %T /sys/fs/bpf
stat -c %a /sys/fs/bpf /sys/fs/bpf/svc-lb /sys/fs/bpf/svc-lb/links",
        bin = bin.display()
    );
    let out = std::process::Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "prepare in a private mount namespace: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[lines.len() - 4..],
        // The kernel always adds the sticky bit to a bpffs root: 1700.
        ["bpf_fs", "1700", "700", "700"],
        "filesystem type and modes: {stdout}"
    );
}
