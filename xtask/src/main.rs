//! `cargo xtask`: the project's one entry point for setting up, building, testing and
//! demonstrating svc-lb. Every subcommand starts with `setup`, which is idempotent, so a
//! newcomer needs nothing but `cargo xtask run` or `cargo xtask test`.

mod bench;
mod image;
mod process;
mod setup;
mod vm;

use std::{
    env,
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::process::{note, require_root, run, step};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Set up, build, test and demonstrate svc-lb",
    after_help = "Environment:\n  XTASK_BPF_TOOLCHAIN_DIR  where setup installs bpf-linker and its LLVM prefix \
                  (default: <workspace>/target/bpf-toolchain)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install whatever is missing to build and test (idempotent)
    ///
    /// In order: bpftool, iproute2, ethtool, iptables, nftables and umoci with apt-get (only if a command is
    /// missing; needs root); the nightly toolchain's rust-src; rustfmt and clippy; bpf-linker,
    /// built against the nightly toolchain's own libLLVM into <workspace>/target/bpf-toolchain;
    /// cargo-fuzz (cargo install, into the same directory).
    Setup,
    /// setup, then build target/release/svc-lb (eBPF object embedded) and the test harness
    Build,
    /// Everything CI runs: setup, fmt, clippy, host tests, fuzzing, e2e tests (root)
    ///
    /// In order, stopping at the first failure: setup; cargo fmt --check; clippy (workspace,
    /// and svc-lb-tests with the e2e feature); cargo test --workspace; each fuzz target of
    /// tests/fuzz for 60 s (cargo-fuzz, nightly); then, as root, the
    /// release agent and the end-to-end tests against it, one test at a time; then the
    /// container image (as `image` builds it) and its test (tests/tests/image.rs); then a
    /// seconds-long smoke run of the benchmark (svclb-bench --smoke).
    Test(TestArgs),
    /// The fuzz targets alone (tests/fuzz): setup, then 60 s each, as `test` runs them
    Fuzz,
    /// A few end-to-end tests on Debian's Linux 5.10 and 6.1 in QEMU guests (root), as
    /// `test` runs them: setup, a release build, then each kernel (xtask/src/vm.rs)
    Kernels,
    /// The demo (root): backends in netns, the agent, requests spread over backends
    ///
    /// setup, build, then exec svclb-harness demo against deploy/examples. Ctrl-C stops the
    /// demo, which removes its namespaces and the agent's programs.
    Run(RunArgs),
    /// Benchmarks (root): svc-lb against direct, iptables and nftables, side by side
    ///
    /// setup, a release build of svc-lb and svclb-bench, then the benchmark: 1, 1 000,
    /// 10 000 and 100 000 Services, 100 000 × 10 endpoints and the external path (up to
    /// about 25 minutes; --quick: about 3). Writes
    /// bench/results/<date>-<time>.md with raw samples and a plot; a full run also rewrites
    /// docs/benchmarks.md. Ctrl-C stops it and removes everything it created.
    Bench(bench::BenchArgs),
    /// The container image: a static svc-lb in an OCI archive built FROM scratch
    ///
    /// setup, a static release build (glibc, crt-static; target/<host triple>/release), then
    /// target/image/svc-lb-<version>.oci.tar with the DaemonSet's tag, entrypoint and args
    /// (read from deploy/daemonset.yaml). Pulls nothing and needs no container engine; prints
    /// how to load the archive (kind, containerd, podman).
    Image(image::ImageArgs),
}

#[derive(Args)]
struct TestArgs {
    /// Skip the privileged end-to-end tests (for local iteration; CI never uses this).
    #[arg(long)]
    host_only: bool,
    /// Skip `cargo fmt --check` and clippy (for local iteration; CI never uses this).
    #[arg(long)]
    no_lint: bool,
    /// Also run the long forms (root, about 20 minutes more): the chaos test for 10 minutes
    /// and the 10-minute soak (tests/tests/chaos.rs). Not part of CI.
    #[arg(long)]
    long: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Extra arguments passed to `svclb-harness demo` after `--`.
    #[arg(last = true)]
    extra: Vec<OsString>,
}

/// Paths every subcommand needs.
pub struct Ctx {
    /// The workspace root.
    ws: PathBuf,
    /// Cargo's target directory (honours CARGO_TARGET_DIR, like the cargo we invoke).
    target: PathBuf,
    /// Where bpf-linker lives: `bin/bpf-linker` and the LLVM prefix `llvm/lib` its rpath points at.
    bpf_root: PathBuf,
}

impl Ctx {
    fn new() -> Result<Self> {
        // xtask lives at <workspace>/xtask, so its manifest directory's parent is the workspace.
        let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest directory has no parent")?
            .to_path_buf();
        let target = match env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
            Some(dir) => ws.join(dir),
            None => ws.join("target"),
        };
        let bpf_root = match env::var_os("XTASK_BPF_TOOLCHAIN_DIR").filter(|d| !d.is_empty()) {
            // Absolute, because the LLVM prefix ends up in bpf-linker's rpath.
            Some(dir) => std::path::absolute(&dir).with_context(|| {
                format!(
                    "resolving XTASK_BPF_TOOLCHAIN_DIR={}",
                    Path::new(&dir).display()
                )
            })?,
            None => ws.join("target").join("bpf-toolchain"),
        };
        Ok(Self {
            ws,
            target,
            bpf_root,
        })
    }

    pub fn bpf_bin(&self) -> PathBuf {
        self.bpf_root.join("bin")
    }

    pub fn llvm_prefix(&self) -> PathBuf {
        self.bpf_root.join("llvm")
    }

    fn release_bin(&self, name: &str) -> PathBuf {
        self.target.join("release").join(name)
    }

    /// A `cargo` command in the workspace with bpf-linker first on PATH: the agent's build.rs
    /// runs aya-build, which needs bpf-linker to link the eBPF object.
    fn cargo<I, S>(&self, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let old = env::var_os("PATH").unwrap_or_default();
        let path = env::join_paths(std::iter::once(self.bpf_bin()).chain(env::split_paths(&old)))
            .context("building PATH for cargo")?;
        let mut cmd = Command::new("cargo");
        cmd.args(args).current_dir(&self.ws).env("PATH", path);
        Ok(cmd)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match Ctx::new().and_then(|ctx| dispatch(&ctx, cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line: "doing X: because Y".
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(ctx: &Ctx, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Setup => setup::setup(ctx),
        Cmd::Build => build(ctx),
        Cmd::Test(args) => test(ctx, &args),
        Cmd::Fuzz => {
            setup::setup(ctx)?;
            fuzz(ctx)
        }
        Cmd::Kernels => {
            require_root("the guests' tests need root, as the end-to-end tests do")?;
            setup::setup(ctx)?;
            run(&mut ctx.cargo(["build", "--release", "-p", "svc-lb"])?)?;
            kernels(ctx, &ctx.release_bin("svc-lb"))
        }
        Cmd::Run(args) => demo(ctx, args),
        Cmd::Bench(args) => bench::bench(ctx, args),
        Cmd::Image(args) => {
            setup::setup(ctx)?;
            image::image(ctx, &args).map(|_| ())
        }
    }
}

fn build(ctx: &Ctx) -> Result<()> {
    setup::setup(ctx)?;
    build_release(ctx)?;
    note(format!("agent:   {}", ctx.release_bin("svc-lb").display()));
    note(format!(
        "harness: {}",
        ctx.release_bin("svclb-harness").display()
    ));
    Ok(())
}

/// Builds the agent (with the eBPF object embedded by its build.rs) and the test harness.
fn build_release(ctx: &Ctx) -> Result<()> {
    step("build: release binaries (svc-lb, svc-lb-tests)");
    run(&mut ctx.cargo(["build", "--release", "-p", "svc-lb", "-p", "svc-lb-tests"])?)
}

fn test(ctx: &Ctx, args: &TestArgs) -> Result<()> {
    // The e2e tests are part of "everything": without root they cannot run, and skipping them
    // silently would let CI pass without them. Checked first so that the failure comes before
    // minutes of building, not after.
    if !args.host_only {
        require_root(
            "`cargo xtask test` includes the end-to-end tests, which need root (BPF programs, \
             cgroups, network namespaces): rerun as root, or pass --host-only to run only the \
             host tests",
        )?;
    }
    setup::setup(ctx)?;

    if args.no_lint {
        step("lint: SKIPPED (--no-lint)");
    } else {
        step("lint: cargo fmt --check");
        run(&mut ctx.cargo(["fmt", "--all", "--", "--check"])?)
            .context("formatting differs; run `cargo fmt --all`")?;
        step("lint: clippy");
        run(&mut ctx.cargo([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])?)?;
        run(&mut ctx.cargo([
            "clippy",
            "-p",
            "svc-lb-tests",
            "--all-targets",
            "--features",
            "e2e,image",
            "--",
            "-D",
            "warnings",
        ])?)?;
    }

    step("test: host unit and property tests");
    run(&mut ctx.cargo(["test", "--workspace"])?)?;
    fuzz(ctx)?;

    if args.host_only {
        step(
            "test: E2E TESTS SKIPPED (--host-only): only the host tests ran; this is not what CI checks",
        );
        return Ok(());
    }

    step("test: end-to-end (privileged)");
    run(&mut ctx.cargo(["build", "--release", "-p", "svc-lb"])?)?;
    let agent = ctx.release_bin("svc-lb");
    if !agent.is_file() {
        bail!("the build succeeded but {} does not exist", agent.display());
    }
    // One test at a time: the tests share kernel state (bpffs pins, cgroup attachments).
    let mut e2e = suite(ctx, "e2e", &[], &[])?;
    e2e.env("SVC_LB_BIN", &agent);
    run(&mut e2e)?;
    // These machines run one kernel: the socket and external suites run again with every
    // kernel fallback forced (netlink tc, no bpf_set_retval, no BPF_F_IPV6, no FIB
    // redirect, no XDP links, reverse NAT in the LRU maps, no atomic fetch-add for the
    // rr/wrr cursor), as an older node would run them, real clients (Python, curl)
    // included; socket termination reads those maps then.
    step("test: end-to-end again with every kernel fallback forced (SVCLB_FORCE_FEATURE_OFF=all)");
    let mut forced = suite(
        ctx,
        "e2e",
        &["e2e", "external", "sockterm", "sched", "stats", "clients"],
        &[],
    )?;
    forced
        .env("SVC_LB_BIN", &agent)
        .env("SVCLB_FORCE_FEATURE_OFF", "all");
    run(&mut forced)?;
    step("test: the container image (unpacked, checked, run from a chroot)");
    let archive = image::image(ctx, &image::ImageArgs { output: None })?;
    let mut image_test = suite(ctx, "e2e,image", &["image"], &[])?;
    image_test.env("SVC_LB_IMAGE", &archive);
    run(&mut image_test)?;
    bench::smoke(ctx, &agent)?;
    // Forcing fallbacks (above) proves the fallback code on this kernel, not an older
    // kernel's verifier and probes: Debian's 5.10 and 6.1 run a subset in QEMU guests.
    kernels(ctx, &agent)?;
    if args.long {
        step("test: long forms (chaos test for 10 minutes, then the 10-minute soak)");
        let mut long = suite(
            ctx,
            "e2e",
            &["chaos"],
            &["--include-ignored", "--nocapture"],
        )?;
        long.env("SVC_LB_BIN", &agent).env("SVCLB_LONG", "1");
        run(&mut long)?;
    }
    step(
        "test: all passed (lint, host tests, end-to-end, end-to-end with kernel fallbacks, image, benchmark smoke run, end-to-end on Linux 5.10 and 6.1 guests)",
    );
    Ok(())
}

/// The guest stage ([`vm`]): builds the test binaries the guests run, then boots each
/// kernel of [`vm::KERNELS`].
fn kernels(ctx: &Ctx, agent: &Path) -> Result<()> {
    let mut targets: Vec<&str> = vm::GUEST_TESTS.iter().map(|(t, _)| *t).collect();
    targets.sort_unstable();
    targets.dedup();
    let mut args = test_args("e2e", &targets);
    args.extend(["--no-run", "--message-format=json"]);
    let json = process::output(&mut ctx.cargo(args)?)?;
    let mut executables = std::collections::BTreeMap::new();
    for line in json.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(name), Some(exe)) =
            (msg["target"]["name"].as_str(), msg["executable"].as_str())
            && targets.contains(&name)
        {
            executables.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    vm::run_all(ctx, &executables, agent)
}

/// `cargo test --release -p svc-lb-tests --features FEATURES --test T...` (every test
/// binary when `tests` is empty), without the harness's arguments.
fn test_args<'a>(features: &'a str, tests: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "test",
        "--release",
        "-p",
        "svc-lb-tests",
        "--features",
        features,
    ];
    for t in tests {
        args.extend(["--test", t]);
    }
    args
}

/// [`test_args`], one test at a time (the tests share kernel state: bpffs pins, cgroup
/// attachments) and `extra` arguments for the test harness.
fn suite(ctx: &Ctx, features: &str, tests: &[&str], extra: &[&str]) -> Result<Command> {
    let mut args = test_args(features, tests);
    args.extend(["--", "--test-threads=1"]);
    args.extend(extra);
    ctx.cargo(args)
}

/// How long `test` runs each fuzz target (issue 12: 60 s in CI).
const FUZZ_SECONDS_PER_TARGET: u32 = 60;
const FUZZ_TARGETS: [&str; 5] = ["manifest", "model", "codec", "lbipam", "weights"];

/// The fuzz targets of tests/fuzz, one after the other, with cargo-fuzz on nightly. Each
/// run first executes its whole initial corpus (the kept regressions, the seeds and, for
/// the parser and the model, the example manifests), then fuzzes for
/// [`FUZZ_SECONDS_PER_TARGET`]; new inputs go to tests/fuzz/corpus (not in git). The kept
/// regressions also run on stable in `cargo test` (svc-lb/tests/fuzz_regressions.rs).
fn fuzz(ctx: &Ctx) -> Result<()> {
    let dir = ctx.ws.join("tests").join("fuzz");
    for target in FUZZ_TARGETS {
        step(format!(
            "test: fuzz target {target} for {FUZZ_SECONDS_PER_TARGET} s (cargo +nightly fuzz)"
        ));
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        // `rustup run nightly`, not `cargo +nightly`: under `cargo run` PATH may resolve
        // `cargo` to a toolchain binary, which does not know `+`. The bpf-toolchain `bin`
        // goes first on PATH, as in `Ctx::cargo`: cargo-fuzz is there, and bpf-linker,
        // which the agent's build.rs needs for the eBPF object.
        let old = env::var_os("PATH").unwrap_or_default();
        let path = env::join_paths(std::iter::once(ctx.bpf_bin()).chain(env::split_paths(&old)))
            .context("building PATH for cargo fuzz")?;
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "nightly", "cargo", "fuzz", "run", "--fuzz-dir"])
            .current_dir(&ctx.ws)
            .env("PATH", path)
            .arg(&dir)
            // Its own target directory: the sanitizer flags would otherwise rebuild the
            // workspace's artifacts back and forth.
            .arg("--target-dir")
            .arg(ctx.target.join("fuzz"))
            // No AddressSanitizer: the targets are safe Rust (a panic, an overflow check or
            // the heap budget is the finding), and instrumenting every dependency with it
            // costs CI minutes of build time for nothing.
            .args(["--sanitizer", "none"])
            .arg(target)
            .arg(&corpus)
            .arg(dir.join("regressions").join(target))
            .arg(dir.join("seeds").join(target));
        // The examples are manifests: seeds for the targets that read manifests.
        if !matches!(target, "codec" | "weights") {
            cmd.arg(ctx.ws.join("deploy").join("examples"));
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={FUZZ_SECONDS_PER_TARGET}"))
            // An input that takes seconds is a finding too (quadratic parsing).
            .arg("-timeout=10");
        run(&mut cmd).with_context(|| {
            format!(
                "fuzz target {target} failed; the input is under {}: fix the bug, then keep the \
                 input in {}",
                dir.join("artifacts").join(target).display(),
                dir.join("regressions").join(target).display()
            )
        })?;
    }
    Ok(())
}

fn demo(ctx: &Ctx, args: RunArgs) -> Result<()> {
    require_root(
        "the demo needs root (it creates network namespaces and attaches BPF programs to a \
         cgroup): rerun as root",
    )?;
    setup::setup(ctx)?;
    build_release(ctx)?;

    let harness = ctx.release_bin("svclb-harness");
    if !harness.is_file() {
        bail!(
            "{} was not built; the svc-lb-tests crate should provide the `svclb-harness` binary",
            harness.display()
        );
    }
    let mut cmd = Command::new(&harness);
    cmd.arg("demo")
        .arg("--svc-lb")
        .arg(ctx.release_bin("svc-lb"))
        .arg("--manifests")
        .arg(ctx.ws.join("deploy").join("examples"))
        .args(&args.extra);
    step("run: the demo (Ctrl-C stops it and cleans up)");
    eprintln!("$ {}", process::display(&cmd));
    // exec, not spawn: the harness takes over this process (and `cargo run` execs too), so
    // Ctrl-C and SIGTERM reach it directly and no parent can exit while it is still
    // cleaning up its namespaces.
    let err = cmd.exec();
    Err(err).with_context(|| format!("could not exec {}", harness.display()))
}
