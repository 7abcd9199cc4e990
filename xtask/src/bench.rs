//! `cargo xtask bench`: setup (which installs iptables, nftables and bpftool), a release
//! build of the agent and of `svclb-bench`, then the benchmark itself.
//!
//! The full run writes `bench/results/<date>-<time>.md` (with the raw samples as JSON and
//! the plot as SVG) and rewrites `docs/benchmarks.md`; `--quick` and `--only` write only
//! under `bench/results/`.

use std::{ffi::OsString, os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{
    Ctx,
    process::{self, require_root, run, step},
    setup,
};

#[derive(Args)]
pub struct BenchArgs {
    /// Short run: 1 and 1 000 Services, shorter windows (about 3 minutes).
    #[arg(long)]
    quick: bool,
    /// Run one scenario: tcp, udp, sync, propagation, memory, bpf or ext.
    #[arg(long, value_name = "NAME")]
    only: Option<String>,
    /// Extra arguments passed on to `svclb-bench` after `--` (see `svclb-bench --help`).
    #[arg(last = true)]
    extra: Vec<OsString>,
}

/// The command as the user typed it, for the report.
fn command_line(args: &BenchArgs) -> String {
    let mut s = String::from("cargo xtask bench");
    if args.quick {
        s.push_str(" --quick");
    }
    if let Some(o) = &args.only {
        s.push_str(&format!(" --only {o}"));
    }
    if !args.extra.is_empty() {
        s.push_str(" --");
        for a in &args.extra {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
    }
    s
}

pub fn bench(ctx: &Ctx, args: BenchArgs) -> Result<()> {
    require_root(
        "the benchmark needs root (network namespaces, BPF programs, cgroups, iptables and \
         nftables rules): rerun as root",
    )?;
    setup::setup(ctx)?;
    step("build: release binaries (svc-lb, svclb-bench)");
    run(&mut ctx.cargo([
        "build",
        "--release",
        "-p",
        "svc-lb",
        "-p",
        "svc-lb-tests",
        "--bin",
        "svc-lb",
        "--bin",
        "svclb-bench",
        // The external-path measurement's two-node lab runs its pods' servers with it.
        "--bin",
        "svclb-harness",
    ])?)?;
    let bench = ctx.release_bin("svclb-bench");
    if !bench.is_file() {
        bail!("the build succeeded but {} does not exist", bench.display());
    }
    let mut cmd = Command::new(&bench);
    cmd.arg("--svc-lb")
        .arg(ctx.release_bin("svc-lb"))
        .arg("--results")
        .arg(ctx.ws.join("bench").join("results"))
        .arg("--docs")
        .arg(ctx.ws.join("docs").join("benchmarks.md"))
        .arg("--command")
        .arg(command_line(&args));
    if args.quick {
        cmd.arg("--quick");
    }
    if let Some(o) = &args.only {
        cmd.arg("--only").arg(o);
    }
    cmd.args(&args.extra);
    step(if args.quick {
        "bench: quick run (about 3 minutes; Ctrl-C stops it and cleans up)"
    } else {
        "bench: full run (up to about 25 minutes; Ctrl-C stops it and cleans up)"
    });
    eprintln!("$ {}", process::display(&cmd));
    // exec, as for the demo: Ctrl-C then reaches the bench directly, which stops its
    // children and removes its namespaces, rules and pins before it exits.
    let err = cmd.exec();
    Err(err).with_context(|| format!("could not exec {}", bench.display()))
}

/// The smoke run that `cargo xtask test` adds after the end-to-end tests: N = 1, a few
/// seconds, every mode, so that the benchmark cannot rot unnoticed.
pub fn smoke(ctx: &Ctx, agent: &std::path::Path) -> Result<()> {
    step("test: benchmark smoke run (svclb-bench --smoke)");
    // With the e2e feature, as the end-to-end step just built the crate: nothing to rebuild.
    run(&mut ctx.cargo([
        "build",
        "--release",
        "-p",
        "svc-lb-tests",
        "--features",
        "e2e",
        "--bin",
        "svclb-bench",
        "--bin",
        "svclb-harness",
    ])?)?;
    let mut cmd = Command::new(ctx.release_bin("svclb-bench"));
    cmd.arg("--smoke").arg("--svc-lb").arg(agent);
    run(&mut cmd)
}
