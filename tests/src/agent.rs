//! The agent binary as a child process whose log the tests can wait on.
use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::procs::{self, ChildGuard};

/// The substring the agent prints once per sync applied to the maps.
pub const SYNC_APPLIED: &str = "sync applied";

/// Set (for example to `all`) to start every agent with `--force-feature-off <value>`,
/// so that the suites run on the fallbacks an older kernel gets (`cargo xtask test`
/// runs the socket and external suites once more this way).
pub const FORCE_FEATURE_OFF_ENV: &str = "SVCLB_FORCE_FEATURE_OFF";

/// A factor for the tests' waits on the agent: `cargo xtask kernels` runs tests in QEMU
/// guests without KVM (xtask/src/vm.rs), where loading the programs alone takes many
/// times longer than on the machine itself.
pub const TIME_SCALE_ENV: &str = "SVCLB_TEST_TIME_SCALE";

/// `d` times [`TIME_SCALE_ENV`] (1 when unset or not a positive integer).
pub fn scaled(d: Duration) -> Duration {
    let k = std::env::var(TIME_SCALE_ENV)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|k| *k > 0)
        .unwrap_or(1);
    d * k
}

/// Whether the agents of this run have kernel feature `name` forced off (see
/// [`FORCE_FEATURE_OFF_ENV`]), for the few checks whose expected result differs on
/// the fallback (for example EPERM instead of ECONNREFUSED without `set_retval`).
pub fn forced_off(name: &str) -> bool {
    std::env::var(FORCE_FEATURE_OFF_ENV)
        .is_ok_and(|v| v.split(',').map(str::trim).any(|f| f == name || f == "all"))
}

/// The errno a Service without endpoints refuses a socket-path connect with:
/// ECONNREFUSED, or EPERM when `bpf_set_retval` is forced off (kernels < 5.18).
/// Tests that have the agent at hand use [`Agent::refused_errno`], which also sees a
/// kernel that lacks the helper.
pub fn refused_errno() -> &'static str {
    if forced_off("set_retval") {
        "EPERM"
    } else {
        "ECONNREFUSED"
    }
}

/// The message the agent's probe logs for each feature it does not use (missing on the
/// kernel or forced off).
const FEATURE_NOT_USED: &str = "kernel feature not used";

/// Whether `line` (JSON or text, colored or not) is the probe's "not used" line for
/// feature `name`.
fn says_feature_unused(line: &str, name: &str) -> bool {
    if !line.contains(FEATURE_NOT_USED) {
        return false;
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        return v["fields"]["message"] == FEATURE_NOT_USED && v["fields"]["feature"] == name;
    }
    // Text format: `feature=NAME` among the fields, maybe with ANSI color codes
    // around the `=` (ESC [ ... m).
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let want = format!("feature={name}");
    plain.split_whitespace().any(|w| w == want)
}

/// How to start the agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub bin: PathBuf,
    /// The manifest directory; empty for Kubernetes mode (see [`Agent::start`]).
    pub manifests: PathBuf,
    pub bpffs: PathBuf,
    pub cgroup: PathBuf,
    /// Every log line is also appended here, so a failed run can be read afterwards.
    pub log_file: PathBuf,
    pub extra_args: Vec<String>,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    applied: usize,
    /// Number of output streams (stdout, stderr) that reached EOF.
    closed: usize,
}

#[derive(Default)]
struct Log {
    state: Mutex<LogState>,
    cond: Condvar,
}

impl Log {
    fn push(&self, line: String) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if line.contains(SYNC_APPLIED) {
            st.applied += 1;
        }
        st.lines.push(line);
        self.cond.notify_all();
    }

    fn close(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.closed += 1;
        self.cond.notify_all();
    }

    /// Waits (at most `timeout`) until both output streams reached EOF, so that an agent
    /// that has exited has all its lines in the log, its last error included: the reader
    /// threads may still be behind when `try_wait` already reports the exit.
    fn wait_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.closed < 2 {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A running agent. Dropping it stops it (SIGTERM, then SIGKILL) and, when the current
/// thread is panicking (or `SVCLB_SHOW_AGENT_LOG` is set), prints its log so a failed
/// test shows what the agent said.
pub struct Agent {
    child: ChildGuard,
    log: Arc<Log>,
    readers: Vec<JoinHandle<()>>,
    config: AgentConfig,
    exit: Option<ExitStatus>,
}

impl Agent {
    pub fn start(config: AgentConfig) -> Result<Self> {
        Self::start_in(config, None)
    }

    /// [`Agent::start`] with the agent inside network namespace `netns` (a node of the
    /// two-node lab). The namespace is entered with setns between fork and exec, not with
    /// `ip netns exec`, which would remount /sys and hide bpffs and the cgroup mount.
    pub fn start_in_netns(config: AgentConfig, netns: &str) -> Result<Self> {
        Self::start_in(config, Some(netns))
    }

    fn start_in(config: AgentConfig, netns: Option<&str>) -> Result<Self> {
        if !config.bin.exists() {
            bail!(
                "agent binary {} does not exist (build it with `cargo build --release -p svc-lb`, or set SVC_LB_BIN)",
                config.bin.display()
            );
        }
        let mut cmd = Command::new(&config.bin);
        cmd.arg("agent");
        // An empty manifest path means Kubernetes mode: the caller passes
        // `--kubeconfig` in `extra_args` instead.
        if !config.manifests.as_os_str().is_empty() {
            cmd.arg("--manifests").arg(&config.manifests);
        }
        cmd.arg("--bpffs")
            .arg(&config.bpffs)
            .arg("--cgroup")
            .arg(&config.cgroup)
            .args(&config.extra_args)
            .args(
                std::env::var(FORCE_FEATURE_OFF_ENV)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .map(|v| vec!["--force-feature-off".to_owned(), v])
                    .unwrap_or_default(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if std::env::var_os("RUST_LOG").is_none() {
            // The `sync applied` line is logged at info; make sure it is not filtered out.
            cmd.env("RUST_LOG", "info");
        }
        // SIGTERM (not SIGKILL) if the test process dies without running its destructors:
        // the agent then exits cleanly and leaves its pins for `cleanup`.
        procs::die_with_parent(&mut cmd, libc::SIGTERM);
        if let Some(ns) = netns {
            let path = Path::new(crate::netns::NETNS_RUN_DIR).join(ns);
            let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
            let fd = file.as_raw_fd();
            // SAFETY: the closure runs between fork and exec and only makes the
            // async-signal-safe setns system call on an fd that `file` keeps open until
            // the spawn below has returned (the closure owns it).
            unsafe {
                cmd.pre_exec(move || {
                    let _keep = &file;
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if procs::own_process_group() {
            cmd.process_group(0);
        }
        let line = crate::cmd::describe(&cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start the agent: {line}"))?;
        let stdout = child.stdout.take().context("agent stdout")?;
        let stderr = child.stderr.take().context("agent stderr")?;
        let log = Arc::new(Log::default());
        let file = File::options()
            .create(true)
            .append(true)
            .open(&config.log_file)
            .with_context(|| format!("open {}", config.log_file.display()))?;
        let file = Arc::new(Mutex::new(file));
        let readers = vec![
            spawn_reader(stdout, "stdout", log.clone(), file.clone()),
            spawn_reader(stderr, "stderr", log.clone(), file),
        ];
        Ok(Self {
            child: ChildGuard::new(child, "agent"),
            log,
            readers,
            config,
            exit: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// `sync applied` lines seen so far.
    pub fn applied_count(&self) -> usize {
        self.log
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .applied
    }

    /// Waits until at least `n` `sync applied` lines were logged. Fails early, with the
    /// log, if the agent exits.
    pub fn wait_applied(&mut self, n: usize, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let deadline = start + scaled(timeout);
        loop {
            {
                let st = self.log.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.applied >= n {
                    return Ok(start.elapsed());
                }
                let now = Instant::now();
                if now >= deadline {
                    drop(st);
                    bail!(
                        "timed out after {timeout:?} waiting for `{SYNC_APPLIED}` #{n} (saw {}); agent log:\n{}",
                        self.applied_count(),
                        self.log_text()
                    );
                }
                // Wake up regularly to notice an agent that died without closing its
                // output (it cannot, but a grandchild could hold the pipe).
                let wait = (deadline - now).min(Duration::from_millis(100));
                let _ = self
                    .log
                    .cond
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|p| p.into_inner());
            }
            if let Some(status) = self.try_exit()? {
                bail!(
                    "the agent exited ({status}) before `{SYNC_APPLIED}` #{n}; agent log:\n{}",
                    self.log_text()
                );
            }
        }
    }

    /// Every line logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .clone()
    }

    pub fn log_text(&self) -> String {
        self.log_lines().join("\n")
    }

    /// Whether this agent's feature probe left kernel feature `name` unused: missing on
    /// the kernel it runs on (an older one, as in `cargo xtask kernels`' guests) or
    /// forced off. Read from its start-up log, so call it after the agent started.
    pub fn feature_unused(&self, name: &str) -> bool {
        self.log_lines()
            .iter()
            .any(|l| says_feature_unused(l, name))
    }

    /// Whether this agent keeps no socket-path connection and traffic counts: they need
    /// the sock_ops program (`sock_ops_conn`) and the sockets' reverse-NAT storage
    /// (`sk_storage_rnat`), which a kernel may lack or a run may force off.
    pub fn counts_off(&self) -> bool {
        ["sock_ops_conn", "sk_storage_rnat"]
            .iter()
            .any(|f| forced_off(f) || self.feature_unused(f))
    }

    /// The errno this agent's socket hooks refuse a Service without endpoints with:
    /// ECONNREFUSED, or EPERM without `bpf_set_retval` (kernels < 5.18, or forced off).
    pub fn refused_errno(&self) -> &'static str {
        if forced_off("set_retval") || self.feature_unused("set_retval") {
            "EPERM"
        } else {
            "ECONNREFUSED"
        }
    }

    /// `Some(status)` once the agent has exited.
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait()?;
            if self.exit.is_some() {
                // Bounded: a grandchild holding the pipe must not hang the test.
                self.log.wait_closed(Duration::from_secs(2));
            }
        }
        Ok(self.exit)
    }

    pub fn is_running(&mut self) -> Result<bool> {
        Ok(self.try_exit()?.is_none())
    }

    /// SIGKILL now, as a crash or an OOM kill would end the agent (no clean exit), and
    /// waits for the exit.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_exit()? {
            return Ok(status);
        }
        let status = self.child.kill()?;
        self.exit = Some(status);
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Ok(status)
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status and whether it
    /// exited by itself within the grace period.
    pub fn terminate(&mut self, grace: Duration) -> Result<(ExitStatus, bool)> {
        if let Some(status) = self.try_exit()? {
            return Ok((status, true));
        }
        let (status, graceful) = self.child.terminate(grace)?;
        self.exit = Some(status);
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Ok((status, graceful))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.terminate(Duration::from_secs(5)) {
            eprintln!("svclb-harness: teardown: stop agent: {e:#}");
        }
        if std::thread::panicking() || std::env::var_os("SVCLB_SHOW_AGENT_LOG").is_some() {
            eprintln!(
                "---- agent log ({}) ----\n{}\n---- end of agent log ----",
                self.config.log_file.display(),
                self.log_text()
            );
        }
    }
}

fn spawn_reader(
    stream: impl Read + Send + 'static,
    name: &'static str,
    log: Arc<Log>,
    file: Arc<Mutex<File>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let reader = BufReader::new(stream);
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            if let Ok(mut f) = file.lock() {
                let _ = writeln!(f, "[{name}] {line}");
            }
            log.push(line);
        }
        log.close();
    })
}

/// Path of the agent's binary: `$SVC_LB_BIN`, else `<workspace>/target/release/svc-lb`.
pub fn default_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SVC_LB_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("target/release/svc-lb")
}

#[cfg(test)]
mod feature_log_tests {
    use super::says_feature_unused;

    #[test]
    fn the_probe_line_is_found_in_json_and_colored_text() {
        let json = r#"{"level":"WARN","fields":{"message":"kernel feature not used","feature":"set_retval","state":"Missing"}}"#;
        assert!(says_feature_unused(json, "set_retval"));
        assert!(!says_feature_unused(json, "tcx"));
        let text = "\u{1b}[33m WARN\u{1b}[0m svc_lb::datapath::probe: kernel feature not used \u{1b}[3mfeature\u{1b}[0m\u{1b}[2m=\u{1b}[0mset_retval \u{1b}[3mstate\u{1b}[0m=Missing";
        assert!(says_feature_unused(text, "set_retval"));
        assert!(!says_feature_unused(text, "set_ret"));
        assert!(!says_feature_unused(
            "kernel feature found feature=set_retval since=5.18",
            "set_retval"
        ));
    }
}
