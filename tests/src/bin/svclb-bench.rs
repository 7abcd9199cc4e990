//! `svclb-bench`: svc-lb against the direct path, kube-proxy-style iptables and nftables.
//!
//! - `svclb-bench [--quick|--smoke] [--only NAME] ...`: the benchmark (root);
//! - `svclb-bench serve ...`, `svclb-bench load ...`: its backend and load-generator
//!   processes, started by the benchmark itself.
//!
//! `cargo xtask bench` builds and runs it; see docs/benchmarks.md.
use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use svc_lb_tests::{
    bench::{
        self, RunArgs, clock, load, plot, report,
        results::Results,
        run::{self, Bench},
        server, signal,
    },
    lab, procs,
    tempdir::TempDir,
};

#[derive(Parser)]
#[command(
    name = "svclb-bench",
    about = "svc-lb against the direct path and kube-proxy-style iptables and nftables",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// (internal) A backend: answer TCP and UDP requests with a one-byte id.
    Serve(server::ServeArgs),
    /// (internal) A load generator: join a cgroup and a namespace, run client threads.
    Load(load::LoadArgs),
    /// Render a report again from a run's raw samples (after editing bench/NOTES.md).
    Render {
        /// The run's `<stem>.json`; the report and the plot are written next to it.
        json: PathBuf,
        /// Also rewrite this summary (docs/benchmarks.md) from it.
        #[arg(long)]
        docs: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Some(Cmd::Serve(a)) => server::serve(&a),
        Some(Cmd::Load(a)) => load::run(&a).and_then(|r| {
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }),
        Some(Cmd::Render { json, docs }) => render(&json, docs.as_deref()),
        None => run_bench(&cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svclb-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_bench(args: &RunArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark needs root (network namespaces, BPF programs, cgroups, netfilter)");
    }
    signal::install()?;
    // Other work on a shared machine (builds, tests) makes the numbers noisy. A higher
    // priority for the bench and every process it starts (servers, load generators, the
    // agent, iptables-restore and nft: all inherit it) makes it disturbed less, and
    // treats every mode alike.
    let _priority = bench::Priority::raise();
    // Children get their own process group: Ctrl-C reaches only this process, which then
    // stops them in order and removes everything it created.
    procs::set_own_process_group(true);
    for r in lab::sweep_dead_runs().context("sweep what killed runs left behind")? {
        eprintln!("svclb-bench: removed a dead run's {r}");
    }
    let svc_lb = args
        .svc_lb
        .clone()
        .unwrap_or_else(svc_lb_tests::agent::default_bin);
    if !svc_lb.is_file() {
        bail!(
            "agent binary {} not found (build it with `cargo build --release -p svc-lb`, or pass --svc-lb)",
            svc_lb.display()
        );
    }
    let command = args.command.clone().unwrap_or_else(|| {
        std::env::args()
            .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
            .collect::<Vec<_>>()
            .join(" ")
    });
    let mut b = Bench::new(args, svc_lb, command)?;
    let outcome = b.run();
    let results = std::mem::take(&mut b.results);
    // Tear the lab down before anything else can fail.
    drop(b);
    let left = lab::leftovers()?;
    if !left.is_empty() {
        eprintln!("svclb-bench: WARNING: left behind after teardown: {left:?}");
    }
    let (date, time) = clock::utc(std::time::SystemTime::now());
    let stamp = format!(
        "{date}-{}",
        time.replace(':', "").get(..4).unwrap_or("0000")
    );
    if let Err(e) = outcome {
        if !args.smoke && !signal::interrupted() {
            let dir = results_dir(args);
            std::fs::create_dir_all(&dir).ok();
            let p = dir.join(format!("{stamp}-failed.json"));
            if std::fs::write(&p, serde_json::to_string_pretty(&results)?).is_ok() {
                eprintln!("svclb-bench: partial results in {}", p.display());
            }
        }
        return Err(e);
    }

    if args.smoke {
        let tmp = TempDir::new()?;
        plot::conn_rate_svg(&results, &tmp.path().join("conn-rate.svg"))?;
        plot::metrics_svg(&results, &tmp.path().join("metrics.svg"))?;
        let md = report::render(
            &results,
            Some(report::Plots {
                conn_rate: "conn-rate.svg",
                metrics: "metrics.svg",
            }),
            None,
        );
        run::check_smoke(&results)?;
        if !left.is_empty() {
            bail!("the smoke run left behind: {left:?}");
        }
        for line in md.lines().filter(|l| {
            ["| 1 |", "| svclb_", "| svc-lb |", "| iptables |", "| pod "]
                .iter()
                .any(|p| l.starts_with(p))
        }) {
            eprintln!("{line}");
        }
        eprintln!(
            "svclb-bench: smoke run passed ({:.1} s): every mode loaded and answered, nothing left behind",
            results.meta.elapsed_s
        );
        return Ok(());
    }

    let dir = results_dir(args);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let partial = args.quick || args.only.is_some() || args.scales.is_some();
    let stem = if partial {
        format!("{stamp}-{}", if args.quick { "quick" } else { "partial" })
    } else {
        stamp
    };
    let json_path = dir.join(format!("{stem}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("write {}", json_path.display()))?;
    let docs = (!partial).then(|| {
        args.docs
            .clone()
            .unwrap_or_else(|| bench::workspace().join("docs").join("benchmarks.md"))
    });
    write_reports(&results, &json_path, docs.as_deref())?;
    eprintln!("svclb-bench: raw samples: {}", json_path.display());
    for g in report::missed_goals(&results) {
        eprintln!("svclb-bench: goal missed: {g}");
    }
    Ok(())
}

/// Writes `<stem>.md`, `<stem>-conn-rate.svg` and `<stem>-metrics.svg` next to
/// `json_path`, and with `docs` the summary and its plots next to it. The closing notes
/// come from bench/NOTES.md.
fn write_reports(results: &Results, json_path: &Path, docs: Option<&Path>) -> Result<()> {
    let dir = json_path.parent().unwrap_or(Path::new("."));
    let stem = json_path
        .file_stem()
        .and_then(|s| s.to_str())
        .context("a report name")?;
    let notes_path = bench::workspace().join("bench").join("NOTES.md");
    let notes = std::fs::read_to_string(&notes_path).ok();
    let svg_name = format!("{stem}-conn-rate.svg");
    plot::conn_rate_svg(results, &dir.join(&svg_name))?;
    let metrics_name = format!("{stem}-metrics.svg");
    plot::metrics_svg(results, &dir.join(&metrics_name))?;
    let md_path = dir.join(format!("{stem}.md"));
    std::fs::write(
        &md_path,
        report::render(
            results,
            Some(report::Plots {
                conn_rate: &svg_name,
                metrics: &metrics_name,
            }),
            notes.as_deref(),
        ),
    )
    .with_context(|| format!("write {}", md_path.display()))?;
    eprintln!("svclb-bench: report: {}", md_path.display());
    if let Some(docs) = docs {
        let parent = docs.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        let svg = "benchmarks-conn-rate.svg";
        plot::conn_rate_svg(results, &parent.join(svg))?;
        let metrics = "benchmarks-metrics.svg";
        plot::metrics_svg(results, &parent.join(metrics))?;
        let plots = report::Plots {
            conn_rate: svg,
            metrics,
        };
        std::fs::write(docs, report::render(results, Some(plots), notes.as_deref()))
            .with_context(|| format!("write {}", docs.display()))?;
        eprintln!("svclb-bench: summary: {}", docs.display());
    }
    Ok(())
}

fn render(json: &Path, docs: Option<&Path>) -> Result<()> {
    let text = std::fs::read_to_string(json).with_context(|| format!("read {}", json.display()))?;
    let results: Results =
        serde_json::from_str(&text).with_context(|| format!("parse {}", json.display()))?;
    write_reports(&results, json, docs)
}

fn results_dir(args: &RunArgs) -> PathBuf {
    args.results
        .clone()
        .unwrap_or_else(|| bench::workspace().join("bench").join("results"))
}
