//! Additions to the two-node lab ([`crate::twonode`]) for the per-packet path of pod
//! traffic (`--socket-lb-scope`, `--pod-devices`; tests/tests/podpath.rs).
//!
//! - Pods lose their default route: they get 10.0.0.0/8 and fd00::/8 via their node
//!   instead, which covers the other pods and the Service ranges of the tests. The nodes
//!   have no default route either, so an untranslated Service address goes nowhere.
//! - A mesh-like pod: an iptables REDIRECT rule in its own namespace sends its outgoing
//!   TCP to a local listener ([`OrigDstListener`]) that answers each connection with the
//!   address the connection was made to (`SO_ORIGINAL_DST`), in the lab servers' reply
//!   format, so the client's report counts what the "proxy" saw.
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;

use crate::{
    agent::AgentConfig,
    manifests::{Protocol, Service, TargetPort, yaml_docs},
    netns,
    twonode::{Node, POD_PORT, TwoNodeLab},
};

/// Namespace of the tests' Services.
pub const NS: &str = "pod";
/// The port the mesh listener takes the redirected connections on.
pub const MESH_PORT: u16 = 15001;

/// Replaces pod `pod`'s default routes (both families) with routes to the lab's ranges
/// via its node.
pub fn drop_default_routes(lab: &TwoNodeLab, pod: &str) -> Result<()> {
    let ns = &lab.net.pod(pod).netns;
    for (fam, range) in [("-4", "10.0.0.0/8"), ("-6", "fd00::/8")] {
        let out = ns.ip([fam, "route", "show", "default"])?;
        let gw = out
            .split_whitespace()
            .skip_while(|w| *w != "via")
            .nth(1)
            .with_context(|| format!("default route of pod {pod} ({fam}): {out:?}"))?
            .to_owned();
        ns.ip([fam, "route", "del", "default"])?;
        ns.ip([fam, "route", "add", range, "via", &gw])?;
    }
    let left = ns.ip(["route", "show", "default"])? + &ns.ip(["-6", "route", "show", "default"])?;
    ensure!(
        left.trim().is_empty(),
        "pod {pod} still has a default route: {left}"
    );
    Ok(())
}

/// A ClusterIP Service `name` with ports http (TCP 80) and dns (UDP 53), both to
/// [`POD_PORT`], and one EndpointSlice per family of `cluster` with the pods `pods`.
/// `affinity`: `sessionAffinity: ClientIP`.
pub fn cluster_service(
    lab: &TwoNodeLab,
    name: &str,
    cluster: &[IpAddr],
    pods: &[&str],
    affinity: bool,
) -> String {
    let mut svc = Service::new(NS, name, cluster)
        .port("http", 80, TargetPort::Number(POD_PORT), Protocol::Tcp)
        .port("dns", 53, TargetPort::Number(POD_PORT), Protocol::Udp);
    if cluster.len() > 1 {
        svc = svc.spec("ipFamilyPolicy", json!("PreferDualStack"));
    }
    if affinity {
        svc = svc.spec("sessionAffinity", json!("ClientIP"));
    }
    let mut docs = vec![svc.to_value()];
    for c in cluster {
        let ports = [("http", Protocol::Tcp), ("dns", Protocol::Udp)];
        docs.push(
            lab.pod_slice(NS, name, c.is_ipv6(), &ports, pods)
                .to_value(),
        );
    }
    yaml_docs(&docs)
}

/// Starts node `n`'s agent with `--devices eth0 --node-name <n>`, `--socket-lb-scope
/// scope`, when `pod_devices` is not empty `--pod-devices pod_devices`, and `extra`.
pub fn start_agent(
    lab: &mut TwoNodeLab,
    n: Node,
    scope: &str,
    pod_devices: &str,
    extra: &[&str],
) -> Result<()> {
    let mut extra_args: Vec<String> = [
        "--devices",
        "eth0",
        "--node-name",
        n.name(),
        "--socket-lb-scope",
        scope,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if !pod_devices.is_empty() {
        extra_args.extend(["--pod-devices".to_owned(), pod_devices.to_owned()]);
    }
    extra_args.extend(extra.iter().map(|s| (*s).to_owned()));
    let config = AgentConfig {
        bin: lab.bins.svc_lb.clone(),
        manifests: lab.manifests_dir(),
        bpffs: lab.bpffs(n).to_path_buf(),
        cgroup: lab.cgroup(n).to_path_buf(),
        log_file: lab.next_agent_log(n),
        extra_args,
    };
    lab.start_agent_with(n, config)?;
    Ok(())
}

/// Waits (up to 5 s) until node `n`'s `svc-lb status` "paths" line contains `want`
/// (for example the pod devices the agent found).
pub fn wait_pod_devices(lab: &TwoNodeLab, n: Node, want: &str) -> Result<()> {
    let svc_lb = lab.bins.svc_lb.display().to_string();
    let bpffs = lab.bpffs(n).display().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let st = lab.node_cmd(n, &svc_lb, &["status", "--bpffs", &bpffs])?;
        let paths = st.lines().find(|l| l.contains("paths")).unwrap_or_default();
        if paths.contains(want) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "node {}: status should show {want:?} within 5 s:\n{st}",
                n.name()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The index of device `dev` in the calling thread's namespace.
pub fn ifindex(dev: &str) -> Result<u32> {
    let c = std::ffi::CString::new(dev).context("device name")?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("no device {dev}: {}", std::io::Error::last_os_error());
    }
    Ok(idx)
}

/// Runs `program args` in pod `pod`'s namespace and its node's cgroup (where the
/// node's socket programs are attached), as a pod's own process would run.
pub fn pod_exec(lab: &TwoNodeLab, pod: &str, program: &str, args: &[&str]) -> Result<Output> {
    let p = lab.net.pod(pod);
    crate::lab::run_in_ns_and_cgroup(p.netns.name(), lab.cgroup(p.node), program, args)
        .with_context(|| format!("run {program} in pod {pod} (installed by `cargo xtask setup`)"))
}

/// Makes pod `pod` mesh-like: its outgoing TCP (except to loopback) is redirected to
/// [`MESH_PORT`] in its own namespace, as a sidecar proxy's rules do.
pub fn mesh_redirect(lab: &TwoNodeLab, pod: &str) -> Result<()> {
    let ns = lab.net.pod(pod).netns.name().to_owned();
    let port = MESH_PORT.to_string();
    netns::in_netns(&ns, || {
        let out = Command::new("iptables")
            .args([
                "-w",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "!",
                "-d",
                "127.0.0.0/8",
                "-j",
                "REDIRECT",
                "--to-ports",
                &port,
            ])
            .output()
            .context("run iptables (installed by `cargo xtask setup`)")?;
        if !out.status.success() {
            bail!(
                "iptables REDIRECT in pod {pod}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    })
}

/// The mesh "proxy": a TCP listener on [`MESH_PORT`] in a pod's namespace. Each
/// connection is answered with `orig=<SO_ORIGINAL_DST> -`, so the client's report
/// counts the original destinations as reply ids. Stops when dropped.
pub struct OrigDstListener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl OrigDstListener {
    pub fn start(lab: &TwoNodeLab, pod: &str) -> Result<Self> {
        let ns = lab.net.pod(pod).netns.name().to_owned();
        // The socket belongs to the namespace it was created in, whatever thread
        // serves it later.
        let listener = netns::in_netns(&ns, || {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, MESH_PORT)).context("bind the mesh listener")
        })?;
        listener.set_nonblocking(true).context("nonblocking")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut byte = [0u8; 1];
                        let _ = s.read(&mut byte);
                        let orig = match original_dst(&s) {
                            Ok(a) => a.to_string(),
                            Err(e) => format!("error:{e}"),
                        };
                        let _ = s.write_all(format!("orig={orig} -").as_bytes());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for OrigDstListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h): where an IPv4 connection was going
/// before the nat table redirected it.
fn original_dst(s: &std::net::TcpStream) -> std::io::Result<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: an all-zero sockaddr_in is valid.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&raw mut sin).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    )))
}
