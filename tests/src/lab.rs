//! A complete lab: topology, cgroup, pin directory, backend servers, agent, manifests.
use std::{
    collections::BTreeMap,
    ffi::CString,
    net::SocketAddr,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    agent::{Agent, AgentConfig},
    bpffs::{self, BpfDir},
    cgroup::{self, Cgroup},
    names, netns,
    procs::{self, ClientOpts, ClientRun, Server},
    report::{ClientReport, Proto},
    tempdir::TempDir,
    topology::Topology,
};

/// The two binaries a lab runs.
#[derive(Clone, Debug)]
pub struct Bins {
    /// The agent (`svc-lb`).
    pub svc_lb: PathBuf,
    /// `svclb-harness` (servers, clients).
    pub harness: PathBuf,
}

impl Bins {
    /// `$SVC_LB_BIN` or `<workspace>/target/release/svc-lb`, and the harness binary
    /// (`cargo_harness` is `env!("CARGO_BIN_EXE_svclb-harness")` in integration tests).
    pub fn from_env(cargo_harness: Option<&str>) -> Result<Self> {
        Ok(Self {
            svc_lb: crate::agent::default_bin(),
            harness: procs::harness_bin(cargo_harness)?,
        })
    }
}

/// Fields drop in declaration order, which is the teardown order:
/// clients and the agent stop first, then the servers; then `svc-lb cleanup` detaches
/// the programs and removes the pins (it needs the cgroup, which goes next); then the
/// namespaces and finally the temp directory with the manifests and logs.
pub struct Lab {
    agent: Option<Agent>,
    servers: Vec<Server>,
    bpf: BpfDir,
    cgroup: Cgroup,
    pub topo: Topology,
    dir: TempDir,
    pub bins: Bins,
    manifests: PathBuf,
    agent_starts: usize,
}

/// Where a lab keeps its manifests and pins when not in its own private places.
#[derive(Clone, Debug, Default)]
pub struct LabOptions {
    /// Run the agent on this manifest directory instead of a fresh empty one (the demo
    /// uses deploy/examples). [`Lab::write_manifest`] then writes into that directory.
    pub manifests: Option<PathBuf>,
    /// Pin directory instead of `/sys/fs/bpf/svclbt-<pid>-<n>`.
    pub bpffs: Option<PathBuf>,
}

impl Lab {
    /// Builds the network with one backend namespace per id, the cgroup, the pin
    /// directory and an empty manifest directory. No agent or server runs yet.
    pub fn new(bins: Bins, backend_ids: &[&str]) -> Result<Self> {
        Self::with_options(bins, backend_ids, LabOptions::default())
    }

    pub fn with_options(bins: Bins, backend_ids: &[&str], opts: LabOptions) -> Result<Self> {
        let dir = TempDir::new()?;
        for sub in ["manifests", "staging"] {
            std::fs::create_dir(dir.path().join(sub))
                .with_context(|| format!("create {sub} dir"))?;
        }
        let topo = Topology::new(backend_ids)?;
        let cgroup = Cgroup::new()?;
        let bpf = match &opts.bpffs {
            Some(p) => BpfDir::at(p, &bins.svc_lb, cgroup.path())?,
            None => BpfDir::new(&bins.svc_lb, cgroup.path())?,
        };
        let manifests = opts
            .manifests
            .unwrap_or_else(|| dir.path().join("manifests"));
        Ok(Self {
            agent: None,
            servers: Vec::new(),
            bpf,
            cgroup,
            topo,
            dir,
            bins,
            manifests,
            agent_starts: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The directory the agent watches.
    pub fn manifests_dir(&self) -> PathBuf {
        self.manifests.clone()
    }

    pub fn bpffs(&self) -> &Path {
        self.bpf.path()
    }

    pub fn cgroup(&self) -> &Path {
        self.cgroup.path()
    }

    /// Writes (or replaces) a manifest file atomically: the content is written next door
    /// and renamed in, so the agent's watcher can never read half a file.
    pub fn write_manifest(&self, file: &str, content: &str) -> Result<()> {
        let staged = self.dir.path().join("staging").join(file);
        std::fs::write(&staged, content).with_context(|| format!("write {}", staged.display()))?;
        let target = self.manifests_dir().join(file);
        std::fs::rename(&staged, &target)
            .with_context(|| format!("rename into {}", target.display()))
    }

    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        let p = self.manifests_dir().join(file);
        std::fs::remove_file(&p).with_context(|| format!("remove {}", p.display()))
    }

    /// Starts a server in backend `backend`'s namespace answering with `reply_id`.
    pub fn serve(
        &mut self,
        backend: &str,
        reply_id: &str,
        tcp: &[SocketAddr],
        udp: &[SocketAddr],
    ) -> Result<()> {
        let ns = self.topo.backend(backend).netns.name().to_owned();
        let s = Server::start(&self.bins.harness, &ns, reply_id, tcp, udp)?;
        self.servers.push(s);
        Ok(())
    }

    /// Every backend serves TCP on `port` at its IPv4 (and, with `v6`, IPv6) address,
    /// answering with its id.
    pub fn serve_all_tcp(&mut self, port: u16, v6: bool) -> Result<()> {
        let plan: Vec<(String, Vec<SocketAddr>)> = self
            .topo
            .backends
            .iter()
            .map(|b| {
                let mut addrs = vec![SocketAddr::new(b.addr(false), port)];
                if v6 {
                    addrs.push(SocketAddr::new(b.addr(true), port));
                }
                (b.id.clone(), addrs)
            })
            .collect();
        for (id, addrs) in plan {
            self.serve(&id, &id, &addrs, &[])?;
        }
        Ok(())
    }

    /// Starts the agent and waits for its first `sync applied`.
    pub fn start_agent(&mut self) -> Result<&mut Agent> {
        if self.agent.is_some() {
            bail!("the agent is already running");
        }
        self.agent_starts += 1;
        let config = AgentConfig {
            bin: self.bins.svc_lb.clone(),
            manifests: self.manifests_dir(),
            bpffs: self.bpf.path().to_path_buf(),
            cgroup: self.cgroup.path().to_path_buf(),
            log_file: self
                .dir
                .path()
                .join(format!("agent-{}.log", self.agent_starts)),
            extra_args: Vec::new(),
        };
        let mut agent = Agent::start(config)?;
        agent.wait_applied(1, Duration::from_secs(30))?;
        Ok(self.agent.insert(agent))
    }

    /// An agent for this lab in Kubernetes mode: it reads the API server named in
    /// `kubeconfig` as node `node` and logs to `log_name` in the lab's directory. The
    /// health listener takes any free port and metrics are off, unless `extra` names
    /// those flags itself (clap refuses a flag given twice).
    pub fn kube_agent_config(
        &self,
        kubeconfig: &Path,
        node: &str,
        log_name: &str,
        extra: &[&str],
    ) -> AgentConfig {
        let mut extra_args = vec![
            "--kubeconfig".to_string(),
            kubeconfig.display().to_string(),
            "--node-name".to_string(),
            node.to_string(),
        ];
        for (flag, default) in [("--health-addr", "127.0.0.1:0"), ("--metrics-addr", "off")] {
            if !extra.contains(&flag) {
                extra_args.extend([flag.to_string(), default.to_string()]);
            }
        }
        extra_args.extend(extra.iter().map(|s| s.to_string()));
        AgentConfig {
            bin: self.bins.svc_lb.clone(),
            manifests: PathBuf::new(),
            bpffs: self.bpf.path().to_path_buf(),
            cgroup: self.cgroup.path().to_path_buf(),
            log_file: self.dir.path().join(log_name),
            extra_args,
        }
    }

    pub fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("the agent is not running")
    }

    /// Takes the agent out of the lab (to stop it and inspect its exit).
    pub fn take_agent(&mut self) -> Option<Agent> {
        self.agent.take()
    }

    /// Client options aimed at `target` from the client namespace and cgroup.
    pub fn client(&self, target: SocketAddr, proto: Proto) -> ClientOpts {
        let mut o = ClientOpts::new(target, proto);
        o.cgroup = Some(self.cgroup.path().to_path_buf());
        o.netns = Some(self.topo.client.name().to_owned());
        o
    }

    pub fn run_client(&self, opts: &ClientOpts) -> Result<ClientReport> {
        procs::run_client(&self.bins.harness, opts)
    }

    pub fn spawn_client(&self, opts: &ClientOpts) -> Result<ClientRun> {
        procs::spawn_client(&self.bins.harness, opts)
    }

    /// Runs `svc-lb <args...>`, adding `--bpffs <this lab's dir>` (and nothing else).
    pub fn svc_lb(&self, args: &[&str]) -> Result<Output> {
        let out = std::process::Command::new(&self.bins.svc_lb)
            .args(args)
            .arg("--bpffs")
            .arg(self.bpf.path())
            .output()
            .with_context(|| format!("run {} {args:?}", self.bins.svc_lb.display()))?;
        Ok(out)
    }

    /// `svc-lb list -o json --service NAMESPACE/NAME`: new connections per frontend
    /// (`address:port/PROTOCOL` → count) and per backend (`address:port` → count, summed
    /// over the frontends).
    pub fn list_new_connections(
        &self,
        service: &str,
    ) -> Result<(BTreeMap<String, u64>, BTreeMap<String, u64>)> {
        let out = self.svc_lb(&["list", "-o", "json", "--service", service])?;
        if !out.status.success() {
            bail!("svc-lb list: {out:?}");
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parse list")?;
        let mut fes = BTreeMap::new();
        let mut bes = BTreeMap::new();
        for fe in v.as_array().context("list is an array")? {
            let key = format!(
                "{}:{}/{}",
                fe["address"].as_str().unwrap_or("?"),
                fe["port"],
                fe["protocol"].as_str().unwrap_or("?")
            );
            fes.insert(key, fe["new_connections"].as_u64().unwrap_or(0));
            for be in fe["backends"].as_array().context("backends")? {
                let a = format!(
                    "{}:{}",
                    be["address"].as_str().unwrap_or("?"),
                    be["port"].as_u64().unwrap_or(0)
                );
                *bes.entry(a).or_default() += be["new_connections"].as_u64().unwrap_or(0);
            }
        }
        Ok((fes, bes))
    }
}

/// Objects named with this process's prefix that still exist: network namespaces,
/// cgroups, bpffs entries, temp directories. Tests assert this is empty once their lab is dropped.
pub fn leftovers() -> Result<Vec<String>> {
    let prefix = names::run_prefix();
    let mut out: Vec<String> = netns::list_with_prefix(&prefix)?
        .into_iter()
        .map(|n| format!("netns {n}"))
        .collect();
    out.extend(
        cgroup::list_with_prefix(&prefix)?
            .into_iter()
            .map(|n| format!("cgroup {n}")),
    );
    out.extend(
        bpffs::list_with_prefix(&prefix)?
            .into_iter()
            .map(|n| format!("bpffs {n}")),
    );
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        out.extend(
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .map(|n| format!("temp dir {n}")),
        );
    }
    Ok(out)
}

/// The pid in a `svclbt-<pid>-<n>` name.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(names::PREFIX)?.strip_prefix('-')?;
    let (pid, n) = rest.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Whether `name` was made by a harness process that no longer runs: gone, or a zombie
/// (an orphan is reparented to init, which may never reap it on this kind of machine).
fn from_dead_run(name: &str) -> bool {
    owner_pid(name).is_some_and(
        |pid| match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // "pid (comm) S ...": the state follows the last ')' (comm may contain one).
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "Z" || state == "X"),
        },
    )
}

/// Removes what harness runs that died without running their destructors (SIGKILL,
/// a machine-wide timeout) left behind: pin directories (unpinning a link detaches its
/// program once no process holds it), cgroups, network namespaces and temp directories.
/// Objects of live processes, including this one, are never touched. Returns what it
/// removed.
pub fn sweep_dead_runs() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let prefix = format!("{}-", names::PREFIX);
    for name in bpffs::list_with_prefix(&prefix)? {
        if from_dead_run(&name) {
            let p = Path::new(bpffs::BPFFS_MOUNT).join(&name);
            std::fs::remove_dir_all(&p).with_context(|| format!("remove {}", p.display()))?;
            removed.push(format!("bpffs {name}"));
        }
    }
    let root = cgroup::cgroup2_root()?;
    for name in cgroup::list_with_prefix(&prefix)? {
        if from_dead_run(&name) {
            cgroup::remove_cgroup(&root, &root.join(&name))?;
            removed.push(format!("cgroup {name}"));
        }
    }
    for name in netns::list_with_prefix(&prefix)? {
        if from_dead_run(&name) {
            crate::cmd::run("ip", ["netns", "delete", &name])?;
            removed.push(format!("netns {name}"));
        }
    }
    let tmp = std::env::temp_dir();
    if let Ok(rd) = std::fs::read_dir(&tmp) {
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && from_dead_run(&name) {
                std::fs::remove_dir_all(e.path())
                    .with_context(|| format!("remove {}", e.path().display()))?;
                removed.push(format!("temp dir {name}"));
            }
        }
    }
    Ok(removed)
}

/// Builds a lab with backends `ids` (the harness binary is `harness`, the test's
/// `CARGO_BIN_EXE_svclb-harness`), runs `body` on it and tears it down, all under
/// [`isolated`]. An error panics while the lab is still alive, so its agent prints its log
/// on drop.
pub fn with_lab(harness: &str, ids: &[&str], body: impl FnOnce(&mut Lab) -> Result<()>) {
    isolated(|| {
        let bins = Bins::from_env(Some(harness)).expect("locate the binaries");
        let mut lab = Lab::new(bins, ids).expect("build the lab");
        if let Err(e) = body(&mut lab) {
            panic!("{e:?}");
        }
    });
}

/// Runs one privileged test: first sweeps what runs killed earlier left (SIGKILL skips
/// destructors), then runs `test`, which panics on failure and tears its lab down as it
/// returns or unwinds, then fails if anything named for this run is still there.
pub fn isolated(test: impl FnOnce()) {
    for r in sweep_dead_runs().expect("sweep dead runs") {
        eprintln!("swept a dead run's {r}");
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(test));
    let left = leftovers().expect("list leftovers");
    if let Err(p) = outcome {
        if !left.is_empty() {
            eprintln!("teardown also left behind: {left:?}");
        }
        std::panic::resume_unwind(p);
    }
    assert!(left.is_empty(), "the test left behind: {left:?}");
}

/// Runs `program args...` in the lab's client network namespace and cgroup: the
/// namespace is entered by the forking thread (the child inherits it), and the child
/// joins the cgroup before exec, so every socket it makes is under the agent's programs.
pub fn in_client(lab: &Lab, program: &str, args: &[String]) -> Result<Output> {
    run_in_ns_and_cgroup(lab.topo.client.name(), lab.cgroup(), program, args)
        .with_context(|| format!("run {program} in the client namespace and cgroup"))
}

/// Runs `program args...` in network namespace `ns` and cgroup `cgroup`: the namespace is
/// entered by the forking thread (the child inherits it), and the child joins the cgroup
/// before exec.
pub fn run_in_ns_and_cgroup(
    ns: &str,
    cgroup: &Path,
    program: &str,
    args: &[impl AsRef<std::ffi::OsStr> + Sync],
) -> Result<Output> {
    let mut cmd = command_in_cgroup(cgroup, program, args)?;
    netns::in_netns(ns, || {
        cmd.output().with_context(|| format!("run {program}"))
    })
}

/// Starts `program args...` in the lab's client network namespace and cgroup, as
/// [`in_client`] runs it, with stdout piped and stdin and stderr null, and returns at
/// once: the caller reads its output while it runs and stops it by pid. No parent-death
/// signal: the forking thread is short-lived.
pub fn spawn_in_client(lab: &Lab, program: &str, args: &[String]) -> Result<std::process::Child> {
    let mut cmd = command_in_cgroup(lab.cgroup(), program, args)?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    netns::in_netns(lab.topo.client.name(), || {
        cmd.spawn().with_context(|| format!("start {program}"))
    })
    .with_context(|| format!("start {program} in the client namespace and cgroup"))
}

/// `program args...`, joining cgroup `cgroup` between fork and exec.
fn command_in_cgroup(
    cgroup: &Path,
    program: &str,
    args: &[impl AsRef<std::ffi::OsStr>],
) -> Result<Command> {
    let procs =
        CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes()).context("cgroup path")?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: between fork and exec only async-signal-safe calls (open, write,
    // close) run, on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process itself.
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_harness_names() {
        assert_eq!(owner_pid("svclbt-1234-7"), Some(1234));
        assert_eq!(owner_pid("svclbt-1234-x"), None);
        assert_eq!(owner_pid("svc-lb"), None);
        assert_eq!(owner_pid("svclbt-abc-1"), None);
        // This process is alive, so its own objects are never swept.
        assert!(!from_dead_run(&names::unique()));
    }
}
