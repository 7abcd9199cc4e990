//! Child processes: backend servers and clients (both `svclb-harness` subcommands), and
//! the generic guard that stops a child by its pid.
use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::report::{ClientReport, Proto};

static OWN_PROCESS_GROUP: AtomicBool = AtomicBool::new(false);

/// Start children in their own process group. The demo sets this so that Ctrl-C reaches
/// only the demo, which then stops its children in order; tests leave it off so that a
/// Ctrl-C on `cargo test` stops everything at once.
pub fn set_own_process_group(on: bool) {
    OWN_PROCESS_GROUP.store(on, Ordering::Relaxed);
}

pub fn own_process_group() -> bool {
    OWN_PROCESS_GROUP.load(Ordering::Relaxed)
}

/// Asks the kernel to send `signal` to the child when the thread that started it dies,
/// so that a test process killed without running destructors leaves no children.
pub fn die_with_parent(cmd: &mut Command, signal: libc::c_int) {
    // SAFETY: the closure runs between fork and exec and only makes the async-signal-safe
    // prctl system call.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A child process that is stopped by its own pid (never by name) when dropped.
/// The child is not reaped before it is signalled, so its pid cannot have been reused.
pub struct ChildGuard {
    child: Child,
    what: String,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn new(child: Child, what: impl Into<String>) -> Self {
        Self {
            child,
            what: what.into(),
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("wait for {}", self.what))?;
        }
        Ok(self.status)
    }

    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let s = self
            .child
            .wait()
            .with_context(|| format!("wait for {}", self.what))?;
        self.status = Some(s);
        Ok(s)
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid")?;
        // SAFETY: plain kill(2) on our own unreaped child.
        if unsafe { libc::kill(pid, sig) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e).with_context(|| format!("signal {sig} to {}", self.what));
            }
        }
        Ok(())
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL. Returns the status and whether the
    /// child exited within the grace period.
    pub fn terminate(&mut self, grace: Duration) -> Result<(ExitStatus, bool)> {
        if let Some(s) = self.try_wait()? {
            return Ok((s, true));
        }
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(s) = self.try_wait()? {
                return Ok((s, true));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "svclb-harness: {} (pid {}) ignored SIGTERM for {grace:?}; sending SIGKILL",
            self.what,
            self.pid()
        );
        self.signal(libc::SIGKILL)?;
        Ok((self.wait()?, false))
    }

    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        self.signal(libc::SIGKILL)?;
        self.wait()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("svclb-harness: teardown: {e:#}");
        }
    }
}

/// Path of the `svclb-harness` binary. Integration tests get it from Cargo
/// (`CARGO_BIN_EXE_svclb-harness`); the demo is that binary. `$SVCLB_HARNESS_BIN`
/// overrides both.
pub fn harness_bin(from_cargo: Option<&str>) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SVCLB_HARNESS_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = from_cargo {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    if exe.file_name().is_some_and(|n| n == "svclb-harness") {
        return Ok(exe);
    }
    // A test binary lives in target/<profile>/deps; the harness in target/<profile>.
    let sibling = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("svclb-harness"))
        .filter(|p| p.exists());
    sibling.context("cannot find the svclb-harness binary; set SVCLB_HARNESS_BIN")
}

/// A backend server (`svclb-harness serve`) in a backend namespace.
pub struct Server {
    child: ChildGuard,
    pub id: String,
    pub tcp: Vec<SocketAddr>,
    pub udp: Vec<SocketAddr>,
}

impl Server {
    /// Starts the server and waits until every socket is bound (it prints `ready`).
    pub fn start(
        harness: &Path,
        netns: &str,
        id: &str,
        tcp: &[SocketAddr],
        udp: &[SocketAddr],
    ) -> Result<Self> {
        Self::start_opts(harness, netns, id, tcp, udp, false)
    }

    /// [`Server::start`], optionally with `--with-peer` (replies carry the client
    /// address the server saw).
    pub fn start_opts(
        harness: &Path,
        netns: &str,
        id: &str,
        tcp: &[SocketAddr],
        udp: &[SocketAddr],
        with_peer: bool,
    ) -> Result<Self> {
        let mut cmd = Command::new(harness);
        cmd.args(["serve", "--netns", netns, "--name", id]);
        if with_peer {
            cmd.arg("--with-peer");
        }
        for a in tcp {
            cmd.arg("--tcp").arg(a.to_string());
        }
        for a in udp {
            cmd.arg("--udp").arg(a.to_string());
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        die_with_parent(&mut cmd, libc::SIGKILL);
        if own_process_group() {
            cmd.process_group(0);
        }
        let line = crate::cmd::describe(&cmd);
        let mut child = cmd.spawn().with_context(|| format!("start `{line}`"))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut guard = ChildGuard::new(child, format!("server {id}"));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut first = String::new();
            let mut reader = BufReader::new(stdout);
            let _ = reader.read_line(&mut first);
            let _ = tx.send(first);
            // Keep draining so the server never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(l) if l.trim() == "ready" => {}
            Ok(l) => {
                let status = guard.kill().ok();
                bail!("`{line}` did not start (said {l:?}, exit {status:?})");
            }
            Err(_) => bail!("`{line}` not ready after 10 s"),
        }
        Ok(Self {
            child: guard,
            id: id.to_owned(),
            tcp: tcp.to_vec(),
            udp: udp.to_vec(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Stops the server now (a test may take a backend away).
    pub fn stop(&mut self) -> Result<()> {
        self.child.kill()?;
        Ok(())
    }
}

/// Options of `svclb-harness client`.
#[derive(Clone, Debug)]
pub struct ClientOpts {
    /// Joined before any socket exists; `None` runs outside any test cgroup.
    pub cgroup: Option<PathBuf>,
    pub netns: Option<String>,
    pub target: SocketAddr,
    pub proto: Proto,
    /// Attempts to make; with `duration`, an upper bound (0 = no bound).
    pub count: u64,
    /// Keep going for this long (counting every attempt).
    pub duration: Option<Duration>,
    /// Pause between attempts.
    pub interval: Duration,
    /// Per-attempt timeout (connect and receive).
    pub timeout: Duration,
    /// UDP: send every datagram from one socket instead of one socket per attempt.
    pub one_socket: bool,
    /// Source port of the first attempt (`None` = ephemeral).
    pub sport: Option<u16>,
    /// Attempt i uses `sport + i * sport_step`.
    pub sport_step: u16,
    /// TCP: one long-lived connection, one message per attempt.
    pub long_lived: bool,
    /// Record every attempt's time and outcome.
    pub timeline: bool,
}

impl ClientOpts {
    pub fn new(target: SocketAddr, proto: Proto) -> Self {
        Self {
            cgroup: None,
            netns: None,
            target,
            proto,
            count: 1,
            duration: None,
            interval: Duration::ZERO,
            timeout: Duration::from_secs(1),
            one_socket: false,
            sport: None,
            sport_step: 0,
            long_lived: false,
            timeline: false,
        }
    }

    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            "client".to_owned(),
            "--target".to_owned(),
            self.target.to_string(),
            "--proto".to_owned(),
            self.proto.to_string(),
            "--count".to_owned(),
            self.count.to_string(),
            "--interval-ms".to_owned(),
            self.interval.as_millis().to_string(),
            "--timeout-ms".to_owned(),
            self.timeout.as_millis().to_string(),
            "--json".to_owned(),
        ];
        if let Some(cg) = &self.cgroup {
            a.push("--cgroup".to_owned());
            a.push(cg.display().to_string());
        }
        if let Some(ns) = &self.netns {
            a.push("--netns".to_owned());
            a.push(ns.clone());
        }
        if let Some(d) = self.duration {
            a.push("--duration-ms".to_owned());
            a.push(d.as_millis().to_string());
        }
        if self.one_socket {
            a.push("--one-socket".to_owned());
        }
        if let Some(p) = self.sport {
            a.push("--sport".to_owned());
            a.push(p.to_string());
            a.push("--sport-step".to_owned());
            a.push(self.sport_step.to_string());
        }
        if self.long_lived {
            a.push("--long-lived".to_owned());
        }
        if self.timeline {
            a.push("--timeline".to_owned());
        }
        a
    }
}

/// A client running in the background; [`ClientRun::wait`] returns its report.
pub struct ClientRun {
    child: ChildGuard,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    line: String,
}

pub fn spawn_client(harness: &Path, opts: &ClientOpts) -> Result<ClientRun> {
    let mut cmd = Command::new(harness);
    cmd.args(opts.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd, libc::SIGKILL);
    if own_process_group() {
        cmd.process_group(0);
    }
    let line = crate::cmd::describe(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("start `{line}`"))?;
    let stdout = child.stdout.take().context("client stdout")?;
    let stderr = child.stderr.take().context("client stderr")?;
    Ok(ClientRun {
        child: ChildGuard::new(child, "client"),
        stdout: Some(read_all(stdout)),
        stderr: Some(read_all(stderr)),
        line,
    })
}

fn read_all(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

impl ClientRun {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn wait(mut self) -> Result<ClientReport> {
        let status = self.child.wait()?;
        let out = self
            .stdout
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let err = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if !status.success() {
            bail!("`{}` failed ({status}): {}", self.line, err.trim());
        }
        let report: ClientReport = serde_json::from_str(out.trim())
            .with_context(|| format!("parse the report of `{}`: {out:?}", self.line))?;
        if !report.is_consistent() {
            bail!("inconsistent client report: {report:?}");
        }
        Ok(report)
    }
}

/// Runs a client to completion.
pub fn run_client(harness: &Path, opts: &ClientOpts) -> Result<ClientReport> {
    spawn_client(harness, opts)?.wait()
}
