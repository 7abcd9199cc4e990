//! Running the system tools (`ip`, `bpftool`, the agent's CLI) with useful errors.
use std::{ffi::OsStr, process::Command};

use anyhow::{Context, Result, bail};

/// Runs `program args...` and returns its stdout. A non-zero exit is an error that
/// carries the command line and its stderr, because "ip failed" alone is useless.
pub fn run<I, S>(program: impl AsRef<OsStr>, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program.as_ref());
    cmd.args(args);
    let line = describe(&cmd);
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{line}` (is the tool installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8"))
}

/// Like [`run`] but for teardown paths: a failure is printed, never raised, because a
/// Drop must go on cleaning the rest.
pub fn run_logged<I, S>(program: impl AsRef<OsStr>, args: I)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    if let Err(e) = run(program, args) {
        eprintln!("svclb-harness: teardown: {e:#}");
    }
}

/// The command line as a human would type it, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
