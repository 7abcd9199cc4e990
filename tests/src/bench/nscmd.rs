//! Running iptables-restore and nft inside a client namespace, timed exactly and bounded.
//!
//! The child switches network namespace itself (setns between fork and exec) instead of
//! going through `ip netns exec`, which would add an exec and a /sys remount to every
//! timed command. Completion is observed with `waitid(WNOWAIT)` on a helper thread, so
//! the recorded time is the moment the process exited (for these tools: after the kernel
//! committed the transaction), not the next tick of a polling loop; and because only
//! the owning thread reaps the child, a kill on timeout can never hit a reused pid.
use std::{
    fs::File,
    io::{Read, Write},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{netns::NETNS_RUN_DIR, procs};

/// What to feed the command on stdin.
pub enum Input<'a> {
    File(&'a Path),
    Text(&'a str),
}

/// How a bounded command ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Done,
    TimedOut,
    Failed(String),
}

/// Runs `program args` in network namespace `netns` with `input` on stdin, killing it
/// after `timeout`. Returns how long it ran and how it ended. Ctrl-C kills it and fails.
pub fn run(
    netns: &str,
    program: &str,
    args: &[&str],
    input: Input<'_>,
    timeout: Duration,
) -> Result<(Duration, Outcome)> {
    let ns_path = Path::new(NETNS_RUN_DIR).join(netns);
    let ns = File::open(&ns_path).with_context(|| format!("open {}", ns_path.display()))?;
    let ns_fd = ns.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    match &input {
        Input::File(p) => {
            cmd.stdin(File::open(p).with_context(|| format!("open {}", p.display()))?);
        }
        Input::Text(_) => {
            cmd.stdin(Stdio::piped());
        }
    }
    procs::die_with_parent(&mut cmd, libc::SIGKILL);
    cmd.process_group(0);
    // SAFETY: between fork and exec only the async-signal-safe setns system call runs, on
    // a descriptor the parent keeps open until spawn() returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let line = format!("{program} {}", args.join(" "));
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start `{line}` in netns {netns}"))?;
    drop(ns);
    let stdin_writer = match (&input, child.stdin.take()) {
        (Input::Text(t), Some(mut w)) => {
            let text = t.to_string();
            Some(std::thread::spawn(move || {
                // A tool that exits early closes the pipe: its exit status tells why.
                let _ = w.write_all(text.as_bytes());
            }))
        }
        _ => None,
    };
    let mut stderr = child.stderr.take().context("stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let pid = libc::id_t::try_from(child.id()).context("pid")?;
    let mut guard = procs::ChildGuard::new(child, line.clone());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: waitid with WNOWAIT only observes the exit; the zombie stays for the
        // owner of the Child to reap, so the pid stays ours.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let _ = unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
        let _ = tx.send(Instant::now());
    });
    let deadline = start + timeout;
    let ended = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(t) => break Some(t),
            Err(mpsc::RecvTimeoutError::Disconnected) => break Some(Instant::now()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if super::signal::interrupted() {
            let _ = guard.kill();
            super::signal::check()?;
        }
        if Instant::now() >= deadline {
            break None;
        }
    };
    let Some(end) = ended else {
        guard.kill()?;
        if let Some(w) = stdin_writer {
            let _ = w.join();
        }
        return Ok((start.elapsed(), Outcome::TimedOut));
    };
    let status = guard.wait()?;
    if let Some(w) = stdin_writer {
        let _ = w.join();
    }
    let err = err_reader.join().unwrap_or_default();
    let elapsed = end.duration_since(start);
    if status.success() {
        Ok((elapsed, Outcome::Done))
    } else {
        let first: String = err.lines().take(3).collect::<Vec<_>>().join(" / ");
        Ok((elapsed, Outcome::Failed(format!("{status}: {first}"))))
    }
}

/// Like [`run`], but any outcome other than success is an error.
pub fn run_ok(
    netns: &str,
    program: &str,
    args: &[&str],
    input: Input<'_>,
    timeout: Duration,
) -> Result<Duration> {
    match run(netns, program, args, input, timeout)? {
        (d, Outcome::Done) => Ok(d),
        (d, Outcome::TimedOut) => {
            anyhow::bail!(
                "`{program} {}` did not finish within {d:.1?}",
                args.join(" ")
            )
        }
        (_, Outcome::Failed(e)) => anyhow::bail!("`{program} {}` failed: {e}", args.join(" ")),
    }
}
