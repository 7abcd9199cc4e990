//! The load generator: `svclb-bench load`, a child process that joins a cgroup and a
//! network namespace before it creates any thread or socket, then runs client threads
//! for a fixed time.
//!
//! TCP attempt: connect, send 1 byte, read the 1-byte reply and then the server's FIN,
//! close. Reading to EOF before closing makes the server close first, so the client
//! keeps no TIME_WAIT socket and never runs out of ephemeral ports.
//! UDP attempt: a new socket, sendto, recvfrom, close (a new flow each time, as a
//! resolver without a cached socket does).
//!
//! Only attempts that complete inside the measured window count; a warm-up before it
//! resolves neighbours and fills caches. Each thread cycles through the targets.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{errno, netns, procs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LoadProto {
    Tcp,
    Udp,
}

#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    #[arg(long)]
    pub netns: String,
    /// cgroup v2 directory to join before any socket exists.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub proto: LoadProto,
    /// Where to connect (repeatable; each thread cycles through them).
    #[arg(long = "target", required = true)]
    pub targets: Vec<SocketAddr>,
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Length of the measured window.
    #[arg(long)]
    pub duration_ms: u64,
    /// Attempts before the window, not counted.
    #[arg(long, default_value_t = 200)]
    pub warmup_ms: u64,
    /// Per-attempt timeout (connect, receive).
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
}

/// What one load run measured (printed as one JSON line).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadReport {
    /// Attempts completed with a reply inside the window.
    pub ok: u64,
    /// Attempts that failed inside the window.
    pub failed: u64,
    /// Length of the window, microseconds.
    pub window_us: u64,
    /// Reply byte (backend id) → count.
    pub replies: BTreeMap<String, u64>,
    /// `<step>:<errno>` → count.
    pub failures: BTreeMap<String, u64>,
}

impl LoadReport {
    /// Successful attempts per second.
    pub fn rate(&self) -> f64 {
        if self.window_us == 0 {
            return 0.0;
        }
        self.ok as f64 / (self.window_us as f64 / 1e6)
    }

    fn merge(&mut self, o: LoadReport) {
        self.ok += o.ok;
        self.failed += o.failed;
        for (k, v) in o.replies {
            *self.replies.entry(k).or_default() += v;
        }
        for (k, v) in o.failures {
            *self.failures.entry(k).or_default() += v;
        }
    }
}

/// Runs in the child: join, enter, load, report.
pub fn run(args: &LoadArgs) -> Result<LoadReport> {
    if let Some(cg) = &args.cgroup {
        // The socket programs act on sockets of processes in the cgroup: join before
        // any socket or thread exists.
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("join cgroup {}", cg.display()))?;
    }
    netns::enter_netns(&args.netns)?;
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let start = Instant::now();
    let window_start = start + Duration::from_millis(args.warmup_ms);
    let window_end = window_start + Duration::from_millis(args.duration_ms);
    let threads = args.threads.max(1);
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        let targets = args.targets.clone();
        let proto = args.proto;
        handles.push(std::thread::spawn(move || {
            worker(
                t,
                threads,
                &targets,
                proto,
                timeout,
                window_start,
                window_end,
            )
        }));
    }
    let mut report = LoadReport {
        window_us: u64::try_from((window_end - window_start).as_micros()).unwrap_or(u64::MAX),
        ..LoadReport::default()
    };
    for h in handles {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?;
        report.merge(r);
    }
    Ok(report)
}

fn worker(
    index: usize,
    threads: usize,
    targets: &[SocketAddr],
    proto: LoadProto,
    timeout: Duration,
    window_start: Instant,
    window_end: Instant,
) -> LoadReport {
    let mut r = LoadReport::default();
    // Threads start at different targets so that together they cover all of them evenly.
    let mut next = index;
    loop {
        if Instant::now() >= window_end {
            return r;
        }
        let target = targets[next % targets.len()];
        next = next.wrapping_add(threads);
        let started = Instant::now();
        let outcome = match proto {
            LoadProto::Tcp => tcp_attempt(target, timeout),
            LoadProto::Udp => udp_attempt(target, timeout),
        };
        let done = Instant::now();
        if done < window_start {
            continue;
        }
        if done > window_end {
            // A failure that began inside the window still counts (a stalled datapath
            // would otherwise read as zero attempts, none failed); a late success does not.
            if let Err(e) = outcome
                && started >= window_start
            {
                r.failed += 1;
                *r.failures
                    .entry(format!("{e} (ended after the window)"))
                    .or_default() += 1;
            }
            continue;
        }
        match outcome {
            Ok(id) => {
                r.ok += 1;
                *r.replies.entry(id).or_default() += 1;
            }
            Err(e) => {
                r.failed += 1;
                *r.failures.entry(e).or_default() += 1;
            }
        }
    }
}

fn at(step: &'static str) -> impl FnOnce(std::io::Error) -> String {
    move |e| format!("{step}:{}", errno::name(&e))
}

fn reply_id(buf: &[u8]) -> Result<String, String> {
    match buf {
        [b] => Ok(char::from(*b).to_string()),
        [] => Err("recv:EMPTY_REPLY".into()),
        _ => Err("recv:LONG_REPLY".into()),
    }
}

fn tcp_attempt(target: SocketAddr, timeout: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&target, timeout).map_err(at("connect"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(at("setsockopt"))?;
    s.write_all(b"?").map_err(at("send"))?;
    let mut buf = [0u8; 8];
    let mut len = 0;
    loop {
        let n = s.read(&mut buf[len..]).map_err(at("recv"))?;
        if n == 0 {
            break;
        }
        len += n;
        if len == buf.len() {
            break;
        }
    }
    reply_id(&buf[..len])
}

fn udp_attempt(target: SocketAddr, timeout: Duration) -> Result<String, String> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(at("socket"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(at("setsockopt"))?;
    s.send_to(b"?", target).map_err(at("send"))?;
    let mut buf = [0u8; 64];
    let (n, _) = s.recv_from(&mut buf).map_err(at("recv"))?;
    reply_id(&buf[..n])
}

/// What the parent asks a load child to do.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub netns: String,
    pub cgroup: Option<PathBuf>,
    pub proto: LoadProto,
    pub targets: Vec<SocketAddr>,
    pub threads: usize,
    pub duration: Duration,
    pub warmup: Duration,
}

/// Runs `svclb-bench load` as a child and returns its report. Ctrl-C stops the child.
pub fn run_child(bench_bin: &Path, spec: &LoadSpec) -> Result<LoadReport> {
    if spec.targets.is_empty() {
        bail!("a load needs at least one target");
    }
    let mut cmd = Command::new(bench_bin);
    cmd.arg("load")
        .arg("--netns")
        .arg(&spec.netns)
        .arg("--proto")
        .arg(match spec.proto {
            LoadProto::Tcp => "tcp",
            LoadProto::Udp => "udp",
        })
        .arg("--threads")
        .arg(spec.threads.to_string())
        .arg("--duration-ms")
        .arg(spec.duration.as_millis().to_string())
        .arg("--warmup-ms")
        .arg(spec.warmup.as_millis().to_string());
    if let Some(cg) = &spec.cgroup {
        cmd.arg("--cgroup").arg(cg);
    }
    for t in &spec.targets {
        cmd.arg("--target").arg(t.to_string());
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    procs::die_with_parent(&mut cmd, libc::SIGKILL);
    cmd.process_group(0);
    let line = crate::cmd::describe(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("start `{line}`"))?;
    let stdout = child.stdout.take().context("load stdout")?;
    let stderr = child.stderr.take().context("load stderr")?;
    let out = read_all(stdout);
    let err = read_all(stderr);
    let mut guard = procs::ChildGuard::new(child, "load generator");
    // Generous: the child stops by itself after warm-up + window + one timeout.
    let deadline = Instant::now() + spec.warmup + spec.duration + Duration::from_secs(15);
    let status = loop {
        super::signal::check()?;
        if let Some(s) = guard.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            guard.kill()?;
            bail!("`{line}` did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        bail!("`{line}` failed ({status}): {}", err.trim());
    }
    serde_json::from_str(out.trim()).with_context(|| format!("parse the report of `{line}`"))
}

fn read_all(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}
