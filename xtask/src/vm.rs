//! `cargo xtask kernels` (and a stage of `test`): the agent on real older kernels.
//!
//! The machines that build and test svc-lb run one kernel; the fallbacks an older node
//! takes are forced there by `SVCLB_FORCE_FEATURE_OFF`, which proves the fallback code
//! but not the older kernel's verifier, its probes' answers or its helpers. This stage
//! boots Debian's own kernel packages (the LTS kernels that nodes run: 5.10 from
//! bullseye, 6.1 from bookworm) in a QEMU guest whose root is this machine's root, read
//! only (9p) under a tmpfs overlay, and runs a few end-to-end tests there with the same
//! binaries.
//!
//! Decisions:
//! - **TCG, not KVM.** On these machines (themselves VMs) `/dev/kvm` exists but a guest
//!   kernel hangs before its first line under nested KVM; TCG is slow (about 20× on the
//!   verifier) but runs the real kernel. The tests' waits are scaled by
//!   `SVCLB_TEST_TIME_SCALE`.
//! - **The guest sees the host's files, never writes them:** 9p read-only, every write
//!   goes to the overlay's tmpfs and disappears with the guest.
//! - Everything downloaded or built stays under `target/kernels/` (Debian packages are
//!   checked by apt against Debian's keyring).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    Ctx,
    process::{display, note, output, run, step},
};

/// A Debian kernel to boot: where apt finds it and which package names match.
pub struct Kernel {
    /// Short name for logs and directories.
    pub name: &'static str,
    /// One apt source line (deb822 one-liner form) that carries the package.
    pub source: &'static str,
    /// `apt-cache search` regex for the image package; the highest version wins, so a
    /// point release that Debian removes does not break the stage.
    pub package: &'static str,
}

/// The kernels `test` boots: 5.10 (Debian 11, Amazon Linux 2's and many nodes' LTS) and
/// 6.1 (Debian 12's). Both are below the 6.6 of TCX and the 5.17/6.x helpers the agent
/// probes for.
pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "5.10",
        source: "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main",
        package: r"^linux-image-5\.10\.0-[0-9]+-amd64$",
    },
    Kernel {
        name: "6.1",
        source: "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main\ndeb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main",
        package: r"^linux-image-6\.1\.0-[0-9]+-amd64$",
    },
];

/// Modules the initramfs loads to mount the host's root (9p over virtio) and the
/// overlay on it; their dependencies are added from modules.dep.
const BOOT_MODULES: &[&str] = &["9pnet_virtio", "9p", "virtio_pci", "overlay"];

/// The e2e tests run in each guest: a connection spread over backends (TCP), UDP
/// replies from the Service address, both families, a refusal without endpoints, an
/// AF_INET6 socket (Python, curl) dialing an IPv4 Service through its `::ffff:` address,
/// connected UDP moved off a removed backend (socket termination), NodePort through the
/// tc programs and through XDP between two nodes, and the demo's LoadBalancer address
/// from its pool.
pub const GUEST_TESTS: &[(&str, &str)] = &[
    ("e2e", "tcp_spreads_connections_over_three_backends"),
    ("e2e", "udp_replies_come_from_the_service_address"),
    ("e2e", "ipv6_and_dual_stack_services"),
    ("e2e", "no_endpoints_refuses_immediately"),
    (
        "clients",
        "python_and_curl_dual_stack_sockets_reach_ipv4_services_through_mapped_addresses",
    ),
    (
        "sockterm",
        "connected_udp_to_a_removed_backend_is_destroyed_and_nothing_else",
    ),
    (
        "external",
        "cluster_policy_nodeport_reaches_pods_on_both_nodes",
    ),
    (
        "external",
        "xdp_cluster_policy_nodeport_reaches_pods_on_both_nodes",
    ),
    (
        "lbipam",
        "the_demo_dials_the_address_the_example_pool_gave_its_load_balancer_service",
    ),
    (
        "sched",
        "lc_programs_load_on_demand_when_a_service_turns_lc",
    ),
];

/// What the stage needs besides the test tools of `setup` (command, Debian package):
/// QEMU, and depmod to index the kernel package's modules.
const GUEST_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("depmod", "kmod"),
];

/// How much slower the guest's waits may be than the host's (TCG).
const TIME_SCALE: u32 = 20;
/// The whole guest run, boot to power-off.
const GUEST_TIMEOUT: Duration = Duration::from_secs(25 * 60);
/// The line the guest prints last; the host reads the exit status from it.
const EXIT_MARK: &str = "SVCLB_VM_EXIT=";

struct Prepared {
    vmlinuz: PathBuf,
    modules: PathBuf,
    initrd: PathBuf,
    release: String,
}

/// Boots each kernel and runs [`GUEST_TESTS`] in it; `executables` maps a test target
/// name to its built binary. The guests boot at the same time, the machine's CPUs split
/// between them: TCG runs one host thread per guest CPU, and the two guests together
/// take about as long as the slower one.
pub fn run_all(ctx: &Ctx, executables: &BTreeMap<String, PathBuf>, agent: &Path) -> Result<()> {
    crate::setup::ensure_tools("guest tools (qemu-system-x86_64, depmod)", GUEST_TOOLS)?;
    let base = ctx.target.join("kernels");
    fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
    let busybox = busybox(&base)?;
    let mut guests = Vec::new();
    for k in KERNELS {
        let p = prepare(&base, k, &busybox)
            .with_context(|| format!("prepare Debian's Linux {}", k.name))?;
        let script = guest_script(&p, executables, agent)?;
        let script_path = base.join(format!("guest-{}.sh", k.name));
        fs::write(&script_path, script)
            .with_context(|| format!("write {}", script_path.display()))?;
        set_executable(&script_path)?;
        guests.push((k, p, script_path));
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let smp = (cpus / guests.len().max(1)).max(1);
    step(format!(
        "test: end-to-end on Debian's Linux {} (QEMU, TCG, in parallel, {smp} CPU(s) each)",
        KERNELS
            .iter()
            .map(|k| k.name)
            .collect::<Vec<_>>()
            .join(" and ")
    ));
    let results: Vec<(String, Result<u64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = guests
            .iter()
            .map(|(k, p, script)| {
                let log = base.join(format!("console-{}.log", k.name));
                let handle = s.spawn(move || {
                    boot(p, script, &log, smp)
                        .with_context(|| format!("Linux {} ({})", k.name, p.release))
                });
                (k.name, handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(name, h)| {
                let r = h.join().unwrap_or_else(|_| {
                    Err(anyhow::anyhow!("Linux {name}: the guest's thread panicked"))
                });
                (name.to_owned(), r)
            })
            .collect()
    });
    let mut failed = Vec::new();
    for (name, r) in results {
        match r {
            Ok(secs) => note(format!("Linux {name}: all guest tests passed in {secs} s")),
            Err(e) => {
                eprintln!("xtask: Linux {name}: {e:#}");
                failed.push(format!("{e:#}"));
            }
        }
    }
    if !failed.is_empty() {
        bail!("guest stage failed: {}", failed.join("; "));
    }
    Ok(())
}

fn set_executable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(p, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", p.display()))
}

/// apt options that keep a private source list, index and cache under `dir`.
fn apt_opts(dir: &Path) -> Vec<String> {
    vec![
        format!(
            "-oDir::Etc::SourceList={}",
            dir.join("sources.list").display()
        ),
        "-oDir::Etc::SourceParts=/dev/null".to_owned(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
        "-oAPT::Sandbox::User=root".to_owned(),
    ]
}

/// Downloads the newest package matching `regex` from `source` into `dir` and unpacks
/// it into `dir/root`; a second run reuses what is there.
fn fetch_unpack(dir: &Path, source: &str, regex: &str) -> Result<PathBuf> {
    let root = dir.join("root");
    if root.join(".done").exists() {
        return Ok(root);
    }
    for d in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(dir.join(d)).with_context(|| format!("create {}", dir.display()))?;
    }
    fs::write(dir.join("sources.list"), format!("{source}\n"))
        .with_context(|| format!("write {}/sources.list", dir.display()))?;
    let opts = apt_opts(dir);
    // `--error-on=any`: without it apt-get update succeeds when a source cannot be
    // fetched, and the failure would surface later as "no package matching".
    run(Command::new("apt-get")
        .args(&opts)
        .args(["update", "--error-on=any"]))
    .with_context(|| {
        format!("download the package index of `{source}` (the guest stage needs the network)")
    })?;
    let found =
        output(
            Command::new("apt-cache")
                .args(&opts)
                .args(["search", "--names-only", regex]),
        )?;
    let mut names: Vec<&str> = found.lines().filter_map(|l| l.split(' ').next()).collect();
    names.sort_by_key(|n| version_key(n));
    let Some(pkg) = names.last() else {
        bail!("no package matching {regex} in `{source}`");
    };
    note(format!("package {pkg}"));
    run(Command::new("apt-get")
        .args(&opts)
        .args(["download", pkg])
        .current_dir(dir))
    .with_context(|| format!("download {pkg} (the guest stage needs the network)"))?;
    let deb = fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
        })
        .with_context(|| format!("{pkg}: apt-get download left no .deb in {}", dir.display()))?;
    let _ = fs::remove_dir_all(&root);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    fs::write(root.join(".done"), pkg).with_context(|| format!("mark {}", root.display()))?;
    Ok(root)
}

/// Orders package names by their numbers (`-44-` before `-46-`).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Debian's static busybox: the initramfs's shell, insmod, mount and cpio.
fn busybox(base: &Path) -> Result<PathBuf> {
    let dir = base.join("busybox");
    let root = fetch_unpack(
        &dir,
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main",
        "^busybox-static$",
    )?;
    let bin = root.join("bin/busybox");
    if !bin.is_file() {
        bail!("busybox-static unpacked without bin/busybox");
    }
    Ok(bin)
}

fn prepare(base: &Path, k: &Kernel, busybox: &Path) -> Result<Prepared> {
    let dir = base.join(format!("linux-{}", k.name));
    let root = fetch_unpack(&dir, k.source, k.package)?;
    let modroot = root.join("lib/modules");
    let release = fs::read_dir(&modroot)
        .with_context(|| format!("read {}", modroot.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("no kernel release under {}", modroot.display()))?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    let moddir = modroot.join(&release);
    if !moddir.join("modules.dep").exists() {
        run(Command::new("depmod").arg("-b").arg(&root).arg(&release))
            .context("depmod (Debian package kmod)")?;
    }
    let initrd = dir.join("initrd.gz");
    build_initrd(&dir, &moddir, busybox, &initrd)?;
    Ok(Prepared {
        vmlinuz,
        modules: modroot,
        initrd,
        release,
    })
}

/// The modules of [`BOOT_MODULES`] with their dependencies, each after what it needs.
fn boot_modules(moddir: &Path) -> Result<Vec<String>> {
    let dep = fs::read_to_string(moddir.join("modules.dep"))
        .with_context(|| format!("read {}/modules.dep", moddir.display()))?;
    let deps: BTreeMap<String, Vec<String>> = dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| {
            (
                m.to_owned(),
                d.split_whitespace().map(str::to_owned).collect(),
            )
        })
        .collect();
    let by_name = |name: &str| {
        deps.keys()
            .find(|k| {
                Path::new(k)
                    .file_name()
                    .is_some_and(|f| f.to_string_lossy().split('.').next() == Some(name))
            })
            .cloned()
    };
    let mut order: Vec<String> = Vec::new();
    fn visit(m: &str, deps: &BTreeMap<String, Vec<String>>, order: &mut Vec<String>) {
        if order.iter().any(|o| o == m) {
            return;
        }
        for d in deps.get(m).into_iter().flatten() {
            visit(d, deps, order);
        }
        order.push(m.to_owned());
    }
    for name in BOOT_MODULES {
        match by_name(name) {
            Some(m) => visit(&m, &deps, &mut order),
            // Built into this kernel: nothing to load.
            None => note(format!("module {name}: built in")),
        }
    }
    Ok(order)
}

fn build_initrd(dir: &Path, moddir: &Path, busybox: &Path, out: &Path) -> Result<()> {
    let tree = dir.join("initrd");
    let _ = fs::remove_dir_all(&tree);
    for d in [
        "bin", "mods", "proc", "sys", "dev", "lower", "upper", "newroot",
    ] {
        fs::create_dir_all(tree.join(d)).with_context(|| format!("create {}", tree.display()))?;
    }
    fs::copy(busybox, tree.join("bin/busybox")).context("copy busybox")?;
    let mut names = Vec::new();
    for m in boot_modules(moddir)? {
        let file = Path::new(&m)
            .file_name()
            .context("module path without a name")?
            .to_owned();
        // Debian's 5.10 and 6.1 packages ship modules uncompressed.
        if m.ends_with(".xz") || m.ends_with(".zst") {
            bail!("module {m} is compressed; busybox insmod needs it plain");
        }
        fs::copy(moddir.join(&m), tree.join("mods").join(&file))
            .with_context(|| format!("copy {m}"))?;
        names.push(file.to_string_lossy().into_owned());
    }
    let init = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in {mods}; do insmod /mods/$m || echo "insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288 hostroot /lower || echo "guest: mounting the host's root (9p) failed"
mount -t tmpfs -o size=75% tmpfs /upper; mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot || echo "guest: the overlay failed"
for a in $(cat /proc/cmdline); do case $a in svclb.init=*) INIT=${{a#svclb.init=}};; esac; done
exec switch_root /newroot "$INIT"
"#,
        mods = names.join(" "),
    );
    fs::write(tree.join("init"), init).context("write init")?;
    set_executable(&tree.join("init"))?;
    // busybox's own cpio writes the newc archive the kernel unpacks.
    let cmd = format!(
        "cd '{}' && find . | '{}' cpio -o -H newc 2>/dev/null | gzip -1 > '{}'",
        tree.display(),
        busybox.display(),
        out.display()
    );
    run(Command::new("sh").args(["-c", &cmd]))
}

/// The guest's init after switch_root: the mounts a node has, then the tests.
fn guest_script(
    p: &Prepared,
    executables: &BTreeMap<String, PathBuf>,
    agent: &Path,
) -> Result<String> {
    let mut tests = String::new();
    for (target, name) in GUEST_TESTS {
        let exe = executables
            .get(*target)
            .with_context(|| format!("test binary {target} not built"))?;
        tests.push_str(&format!(
            "run '{}' --exact --test-threads=1 '{}'\n",
            exe.display(),
            name
        ));
    }
    Ok(format!(
        r#"#!/bin/bash
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /lib/modules && mount --bind '{modules}' /lib/modules
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp; mkdir -p /run/netns
mount -t cgroup2 cgroup2 /sys/fs/cgroup; mount -t bpf bpf /sys/fs/bpf
ip link set lo up
echo "guest kernel: $(uname -r)"
export HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export SVC_LB_BIN='{agent}' SVCLB_TEST_TIME_SCALE={scale} RUST_BACKTRACE=1
failed=0
run() {{
  start=$(date +%s)
  "$@"; rc=$?
  echo "guest: $* -> exit $rc after $(( $(date +%s) - start )) s"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}}
{tests}echo "{mark}$failed"
echo o > /proc/sysrq-trigger
sleep 60
"#,
        modules = p.modules.display(),
        agent = agent.display(),
        scale = TIME_SCALE,
        mark = EXIT_MARK,
    ))
}

/// Boots one guest with `smp` CPUs and returns its run time in seconds when every test
/// passed.
fn boot(p: &Prepared, script: &Path, log: &Path, smp: usize) -> Result<u64> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "3G", "-smp"])
        .arg(smp.to_string())
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(&p.vmlinuz)
        .arg("-initrd")
        .arg(&p.initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 svclb.init={}",
            script.display()
        ))
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ]);
    eprintln!("$ {}", display(&cmd));
    let file = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone().context("dup console log")?)
        .stderr(file)
        .spawn()
        .context("start qemu-system-x86_64 (Debian package qemu-system-x86)")?;
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().context("wait for qemu")? {
            break Some(s);
        }
        if started.elapsed() > GUEST_TIMEOUT {
            // Only our own child, by its handle.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let text = fs::read_to_string(log).unwrap_or_default();
    let shown: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .skip_while(|l| !l.contains("guest kernel"))
        .collect();
    eprintln!("--- guest {} ---\n{}", p.release, shown.join("\n"));
    let took = started.elapsed().as_secs();
    let Some(status) = status else {
        bail!(
            "the guest did not finish within {} s (console: {})",
            GUEST_TIMEOUT.as_secs(),
            log.display()
        );
    };
    let verdict = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(EXIT_MARK))
        .map(str::to_owned);
    match verdict.as_deref() {
        Some("0") => Ok(took),
        Some(v) => bail!("guest: {v} test(s) failed (console: {})", log.display()),
        None => bail!(
            "the guest ended ({status}) without a verdict (console: {})",
            log.display()
        ),
    }
}
