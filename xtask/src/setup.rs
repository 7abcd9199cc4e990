//! `cargo xtask setup`: installs what the build and the tests need, and nothing that is
//! already there. Each step first checks, then acts, so a second run only reports.

use std::{
    fs, io,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    Ctx,
    process::{find_program, is_root, note, output, run, step, succeeds},
};

/// Commands the e2e tests, the demo and debugging use, with the Debian package of each.
const SYSTEM_TOOLS: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    // The external-path tests turn GRO (veth NAPI, for XDP_TX) and TX checksumming on
    // and off on their veths.
    ("ethtool", "ethtool"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    // tests/tests/clients.rs runs real client programs: Python dual-stack sockets and curl.
    ("python3", "python3"),
    ("curl", "curl"),
    // tests/tests/runtimes.rs: the JDK's and Node.js's own sockets. Debian's JRE holds
    // the jdk.compiler module, so `java Client.java` runs the source without a JDK;
    // bookworm's nodejs is 18.
    ("java", "default-jre-headless"),
    ("node", "nodejs"),
    // tests/tests/dns.rs: dig queries dnsmasq backends through a Service.
    ("dig", "bind9-dnsutils"),
    ("dnsmasq", "dnsmasq-base"),
    // The image test unpacks the OCI archive with an independent reader (checking every
    // digest) into a bundle whose rootfs it runs from a chroot.
    ("umoci", "umoci"),
    // tests/tests/l2.rs: a foreign client's ARP (iputils arping) and NDP (ndisc6) probes
    // of the announced addresses.
    ("arping", "iputils-arping"),
    ("ndisc6", "ndisc6"),
];

/// The bpf-linker release that TOOLCHAIN.md verified against the nightly's LLVM. Pinned so
/// that a new release cannot break a fresh CI machine; bump it deliberately.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup(ctx: &Ctx) -> Result<()> {
    ensure_tools(
        "system tools (bpftool, ip, ethtool, iptables, nft, python3, curl, java, node, dig, dnsmasq, umoci, arping, ndisc6)",
        SYSTEM_TOOLS,
    )?;
    rust_components()?;
    bpf_linker(ctx)?;
    cargo_fuzz(ctx)?;
    step("setup: done");
    Ok(())
}

/// Installs with apt-get the Debian package of each command in `tools` (command,
/// package) that is not on PATH; `cargo xtask kernels` brings its own list.
pub fn ensure_tools(what: &str, tools: &[(&str, &str)]) -> Result<()> {
    step(format!("setup: {what}"));
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(cmd, _)| find_program(cmd).is_none())
        .map(|(cmd, _)| *cmd)
        .collect();
    if missing.is_empty() {
        note("all present, nothing to install");
        return Ok(());
    }
    let packages: Vec<&str> = tools.iter().map(|(_, pkg)| *pkg).collect();
    if !is_root()? {
        bail!(
            "missing command(s) {}; installing them needs root: run `apt-get install -y {}` as root, \
             or rerun this as root",
            missing.join(", "),
            packages.join(" ")
        );
    }
    note(format!(
        "missing: {}; installing with apt-get",
        missing.join(", ")
    ));
    // noninteractive: CI has no stdin, and a debconf prompt would hang the job.
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y"])
        .args(&packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    let still_missing: Vec<&str> = tools
        .iter()
        .filter(|(cmd, _)| find_program(cmd).is_none())
        .map(|(cmd, _)| *cmd)
        .collect();
    if !still_missing.is_empty() {
        bail!(
            "apt-get succeeded but {} still not found",
            still_missing.join(", ")
        );
    }
    Ok(())
}

fn rust_components() -> Result<()> {
    step("setup: Rust toolchains (nightly + rust-src for eBPF, rustfmt + clippy for lints)");
    output(Command::new("rustup").arg("--version"))
        .context("rustup is required (https://rustup.rs); it manages the nightly toolchain the eBPF build uses")?;

    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(is_nightly_channel) {
        note("no nightly toolchain; installing it");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    } else {
        let installed = output(Command::new("rustup").args([
            "component",
            "list",
            "--toolchain",
            "nightly",
            "--installed",
        ]))?;
        // Installed components print as `rust-src` (no target suffix, it is target-independent).
        if installed
            .lines()
            .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src-"))
        {
            note("nightly with rust-src: present");
        } else {
            run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))?;
        }
    }

    // `test` runs `cargo fmt` and `cargo clippy` on the toolchain cargo itself runs on (rustup
    // passes it down in RUSTUP_TOOLCHAIN); a minimal-profile install lacks both.
    let have_fmt = succeeds(Command::new("cargo").args(["fmt", "--version"]));
    let have_clippy = succeeds(Command::new("cargo").args(["clippy", "--version"]));
    if have_fmt && have_clippy {
        note("rustfmt and clippy: present");
    } else {
        run(Command::new("rustup").args(["component", "add", "rustfmt", "clippy"]))?;
    }
    Ok(())
}

/// `nightly-x86_64-unknown-linux-gnu (…)` is the nightly channel; `nightly-2026-05-19-…` is a
/// dated toolchain that `+nightly` would not select.
fn is_nightly_channel(line: &str) -> bool {
    line.strip_prefix("nightly-")
        .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// The nightly toolchain's libLLVM: where it is and which LLVM major version it has.
struct NightlyLlvm {
    /// The shared library inside the toolchain's sysroot.
    lib: PathBuf,
    /// Its file name, which is also its soname: bpf-linker's binary asks for exactly that.
    soname: String,
    major: String,
}

fn nightly_llvm() -> Result<NightlyLlvm> {
    // `rustup run nightly` rather than `rustc +nightly`: under `cargo run`, PATH may resolve
    // `rustc` to a toolchain binary instead of the rustup proxy, and only the proxy knows `+`.
    let verbose = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))?;
    let major =
        llvm_major(&verbose).context("`rustc +nightly -vV` printed no `LLVM version: N.…` line")?;
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let mut candidates: Vec<String> = fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.starts_with("libLLVM.so."))
        .collect();
    candidates.sort();
    let soname = match candidates.as_slice() {
        [one] => one.clone(),
        [] => bail!(
            "no libLLVM.so.* in {}; the nightly toolchain looks incomplete",
            libdir.display()
        ),
        many => bail!(
            "several libLLVM.so.* in {}: {}; cannot tell which one rustc uses",
            libdir.display(),
            many.join(", ")
        ),
    };
    Ok(NightlyLlvm {
        lib: libdir.join(&soname),
        soname,
        major,
    })
}

fn llvm_major(rustc_verbose: &str) -> Option<String> {
    let version = rustc_verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))?
        .trim();
    let major = version.split('.').next()?;
    (!major.is_empty() && major.chars().all(|c| c.is_ascii_digit())).then(|| major.to_owned())
}

fn bpf_linker(ctx: &Ctx) -> Result<()> {
    step(format!("setup: bpf-linker in {}", ctx.bpf_root.display()));
    let llvm = nightly_llvm()?;
    let prefix = ctx.llvm_prefix();
    let prefix_lib = prefix.join("lib");
    let bin = ctx.bpf_bin().join("bpf-linker");
    let links = [prefix_lib.join("libLLVM.so"), prefix_lib.join(&llvm.soname)];

    // Installed means: the binary runs, and its rpath directory points at the nightly's
    // current libLLVM. After a nightly update the old soname dangles and `--version` fails,
    // or the major version moved; either way we rebuild.
    let links_current = links
        .iter()
        .all(|l| fs::read_link(l).is_ok_and(|t| t == llvm.lib));
    if links_current && succeeds(Command::new(&bin).arg("--version")) {
        let version = output(Command::new(&bin).arg("--version"))?;
        note(format!(
            "{} already installed (LLVM {}, {}), nothing to do",
            version.trim(),
            llvm.major,
            llvm.soname
        ));
        return Ok(());
    }

    note(format!(
        "linking bpf-linker against the nightly's own libLLVM {} ({})",
        llvm.major,
        llvm.lib.display()
    ));
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for link in &links {
        replace_symlink(&llvm.lib, link)?;
    }
    let mut install = Command::new("cargo");
    install
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{}", llvm.major),
        ])
        .arg("--root")
        .arg(&ctx.bpf_root)
        .env("LLVM_PREFIX", &prefix);
    run(&mut install)?;
    let version = output(Command::new(&bin).arg("--version")).with_context(|| {
        format!(
            "bpf-linker was installed but {} does not run",
            bin.display()
        )
    })?;
    note(format!("installed {}", version.trim()));
    Ok(())
}

/// The cargo-fuzz release `test` runs the fuzz targets with (tests/fuzz). Pinned, like
/// bpf-linker, so that a new release cannot break a fresh CI machine.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, for `test`'s fuzzing step, installed next to bpf-linker (under target/, whose
/// `bin` every cargo command of xtask has first on PATH). `cargo install` takes about a
/// minute.
fn cargo_fuzz(ctx: &Ctx) -> Result<()> {
    let bin = ctx.bpf_bin().join("cargo-fuzz");
    step(format!("setup: cargo-fuzz in {}", ctx.bpf_root.display()));
    // Invoked as cargo invokes a subcommand: `cargo-fuzz fuzz ...`.
    if let Ok(version) = output(Command::new(&bin).args(["fuzz", "--version"])) {
        note(format!(
            "{} already installed, nothing to do",
            version.trim()
        ));
        return Ok(());
    }
    run(Command::new("cargo")
        .args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
            "--force",
            "--root",
        ])
        .arg(&ctx.bpf_root))?;
    let version = output(Command::new(&bin).args(["fuzz", "--version"])).with_context(|| {
        format!(
            "cargo-fuzz was installed but {} does not run",
            bin.display()
        )
    })?;
    note(format!("installed {}", version.trim()));
    Ok(())
}

/// Points `link` at `target`, replacing whatever is there (a stale link from an older nightly).
fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    match fs::remove_file(link) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", link.display())),
    }
    symlink(target, link)
        .with_context(|| format!("symlinking {} -> {}", link.display(), target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv).as_deref(), Some("22"));
        assert_eq!(llvm_major("rustc 1.0\n"), None);
        assert_eq!(llvm_major("LLVM version: x.1\n"), None);
    }

    #[test]
    fn nightly_channel_detection() {
        assert!(is_nightly_channel("nightly-x86_64-unknown-linux-gnu"));
        assert!(is_nightly_channel(
            "nightly-x86_64-unknown-linux-gnu (active)"
        ));
        assert!(!is_nightly_channel(
            "nightly-2026-05-19-x86_64-unknown-linux-gnu"
        ));
        assert!(!is_nightly_channel(
            "stable-x86_64-unknown-linux-gnu (default)"
        ));
    }
}
