//! Running external commands: every command is echoed before it runs, and every failure
//! becomes a one-line error that names the command, so a CI log shows what broke.

use std::{
    ffi::OsStr,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Prints a step banner. Everything xtask says goes to stderr, like cargo's own output,
/// so the two interleave in the right order in a log.
pub fn step(msg: impl std::fmt::Display) {
    eprintln!("==> {msg}");
}

/// Prints a detail line under the current step.
pub fn note(msg: impl std::fmt::Display) {
    eprintln!("    {msg}");
}

/// Renders a command the way a user could paste it into a shell, including the environment
/// variables we set explicitly (except PATH, which is long and the same for every command).
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        if key == "PATH" {
            continue;
        }
        if let Some(value) = value {
            parts.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=+./:,@%".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs a command with inherited stdio and fails unless it exits with status 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    eprintln!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout; on failure the error carries the
/// command's stderr, trimmed to one line.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let reason = stderr.split_whitespace().collect::<Vec<_>>().join(" ");
        bail!("`{shown}` failed ({}): {reason}", out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 output"))
}

/// Whether a command runs and exits with status 0, with all its output discarded.
/// Used for "is this already installed" probes, where any failure just means "no".
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Finds an executable by name on PATH, and also in the sbin directories: a non-root
/// user's PATH often lacks them, yet that is where Debian puts ip, bpftool and nft.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether this process runs with effective uid 0. Read from /proc rather than calling
/// geteuid() so that xtask needs no libc dependency.
pub fn is_root() -> Result<bool> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no effective uid in /proc/self/status")?;
    Ok(euid == "0")
}

/// Fails with `message` unless we are root.
pub fn require_root(message: &str) -> Result<()> {
    if !is_root()? {
        bail!("{message}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_when_needed() {
        let mut cmd = Command::new("cargo");
        cmd.args(["test", "--", "--test-threads=1", "a b", "it's"])
            .env("X", "1");
        assert_eq!(
            display(&cmd),
            r"X=1 cargo test -- --test-threads=1 'a b' 'it'\''s'"
        );
    }

    #[test]
    fn display_hides_path() {
        let mut cmd = Command::new("cargo");
        cmd.env("PATH", "/x:/y");
        assert_eq!(display(&cmd), "cargo");
    }

    #[test]
    fn finds_sh() {
        assert!(find_program("sh").is_some());
        assert!(find_program("definitely-not-a-command-xtask").is_none());
    }
}
