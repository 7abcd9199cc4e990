//! `svclb-harness`: the processes of svc-lb's end-to-end lab.
//!
//! - `serve`: a backend in a network namespace that answers with its id;
//! - `client`: counted attempts from inside a cgroup and a network namespace;
//! - `demo`: the example manifests, live, with a per-second tally;
//! - `sweep`: remove what killed runs left behind.
use anyhow::Result;
use clap::{Parser, Subcommand};
use svc_lb_tests::{client, demo, serve};

#[derive(Parser)]
#[command(name = "svclb-harness", about = "svc-lb end-to-end lab processes")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve TCP/UDP in a network namespace, answering every request with --name.
    Serve(serve::ServeArgs),
    /// Join a cgroup and a network namespace, make counted attempts, report.
    Client(client::ClientArgs),
    /// Run the example manifests with three backends and show who answers.
    Demo(demo::DemoArgs),
    /// Remove what killed harness runs left behind (their pids no longer exist).
    Sweep,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve(a) => serve::serve(&a),
        Cmd::Client(a) => {
            let report = client::run(&a)?;
            if a.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", report.summary());
            }
            Ok(())
        }
        Cmd::Demo(a) => demo::run(&a),
        Cmd::Sweep => {
            for r in svc_lb_tests::lab::sweep_dead_runs()? {
                println!("removed {r}");
            }
            Ok(())
        }
    }
}
