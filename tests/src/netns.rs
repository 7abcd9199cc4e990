//! Network namespaces, veth pairs and addresses, all through `ip -n` (never
//! `ip netns exec`, which remounts /sys and would hide bpffs and the cgroup mount).
use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{cmd, names};

/// Where `ip netns add` bind-mounts the namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Moves the calling thread into the named network namespace. Threads spawned by it
/// afterwards inherit the namespace, so call this before starting any worker thread.
/// Only the network namespace changes: mounts (bpffs, cgroup2) stay visible.
pub fn enter_netns(name: &str) -> Result<()> {
    let path = Path::new(NETNS_RUN_DIR).join(name);
    let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: setns only reads the fd, which stays open for the whole call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns into network namespace {name}"));
    }
    Ok(())
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `svclbt-<pid>-<n>` with `lo` up and IPv6 duplicate address detection
    /// off, so that addresses added later are usable at once (a tentative address
    /// cannot be bound and makes the first connections fail).
    pub fn new() -> Result<Self> {
        let name = names::unique();
        cmd::run("ip", ["netns", "add", &name])?;
        let ns = Self { name };
        ns.sysctl("net/ipv6/conf/all/accept_dad", "0")?;
        ns.sysctl("net/ipv6/conf/default/accept_dad", "0")?;
        ns.ip(["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// `ip -n <name> args...`.
    pub fn ip<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> = vec!["-n".into(), self.name.clone().into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        cmd::run("ip", all)
    }

    /// Writes `/proc/sys/<key>` inside the namespace. /proc/sys/net follows the netns of
    /// the calling thread, so a short-lived thread enters the namespace and writes it;
    /// the test process itself never changes namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let name = self.name.clone();
        let path = Path::new("/proc/sys").join(key);
        let value = value.to_owned();
        std::thread::scope(|s| {
            s.spawn(move || -> Result<()> {
                enter_netns(&name)?;
                std::fs::write(&path, &value)
                    .with_context(|| format!("write {} in netns {name}", path.display()))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("sysctl thread panicked"))?
        })
    }

    /// Adds an address (`10.240.1.2/24`, `fd00:240:1::2/64`) to `dev`. IPv6 addresses get
    /// `nodad` for the same reason as [`Netns::new`] turns DAD off.
    pub fn add_addr(&self, dev: &str, addr: IpAddr, prefix_len: u8) -> Result<()> {
        let cidr = format!("{addr}/{prefix_len}");
        match addr {
            IpAddr::V4(_) => self.ip(["addr", "add", &cidr, "dev", dev])?,
            IpAddr::V6(_) => self.ip(["addr", "add", &cidr, "dev", dev, "nodad"])?,
        };
        Ok(())
    }

    pub fn link_up(&self, dev: &str) -> Result<()> {
        self.ip(["link", "set", dev, "up"])?;
        Ok(())
    }

    /// Waits until `dev` is operationally up and none of its IPv6 addresses is tentative.
    /// `ip link set up` returns before the carrier is on: a packet sent in that window is
    /// dropped, and the first connection then waits for a SYN retransmit (1 s) — seen as
    /// a cold-start timeout on IPv6 links that were used within ~100 ms of setup.
    pub fn wait_link_ready(&self, dev: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let link: serde_json::Value =
                serde_json::from_str(&self.ip(["-j", "link", "show", "dev", dev])?)
                    .context("parse ip -j link")?;
            let addrs: serde_json::Value =
                serde_json::from_str(&self.ip(["-j", "-6", "addr", "show", "dev", dev])?)
                    .context("parse ip -j addr")?;
            let up = link[0]["operstate"] == "UP";
            let infos = addrs[0]["addr_info"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let has_link_local = infos.iter().any(|a| a["scope"] == "link");
            let tentative = infos.iter().any(|a| a["tentative"] == true);
            if up && has_link_local && !tentative {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{dev} in {} not ready after {timeout:?}: operstate {}, addresses {infos:?}",
                    self.name,
                    link[0]["operstate"]
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the namespace still exists (it may be deleted by a test on purpose).
    pub fn exists(&self) -> bool {
        self.path().exists()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also destroys every interface still inside it.
        cmd::run_logged("ip", ["netns", "delete", &self.name]);
    }
}

/// A veth pair whose ends are created directly inside two namespaces, so the pair never
/// appears in the host namespace and short fixed names cannot collide with anyone's.
#[derive(Debug)]
pub struct Veth {
    ns_a: String,
    name_a: String,
}

impl Veth {
    pub fn new(a: &Netns, name_a: &str, b: &Netns, name_b: &str) -> Result<Self> {
        if name_a.len() > 15 || name_b.len() > 15 {
            bail!("interface names are limited to 15 bytes: {name_a}, {name_b}");
        }
        cmd::run(
            "ip",
            [
                "link",
                "add",
                "name",
                name_a,
                "netns",
                a.name(),
                "type",
                "veth",
                "peer",
                "name",
                name_b,
                "netns",
                b.name(),
            ],
        )?;
        Ok(Self {
            ns_a: a.name().to_owned(),
            name_a: name_a.to_owned(),
        })
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // If the namespace is already gone the pair went with it: nothing to do.
        if Path::new(NETNS_RUN_DIR).join(&self.ns_a).exists() {
            cmd::run_logged("ip", ["-n", &self.ns_a, "link", "del", &self.name_a]);
        }
    }
}

/// Names under /run/netns that start with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let out = cmd::run("ip", ["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect())
}

/// Runs `f` on a short-lived thread inside namespace `name` and returns its result. The
/// test process itself never changes namespace; child processes spawned by `f` start in
/// the namespace too (a forked child inherits the namespace of the forking thread).
pub fn in_netns<T, F>(name: &str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            enter_netns(name)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns {name} panicked"))?
    })
}
