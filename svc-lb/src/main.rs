use std::process::ExitCode;

use clap::Parser;
use svc_lb::cli::{BPF_LOG_TARGET, Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn init_logging(cli: &Cli) {
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // `--bpf-log` asks for the eBPF log: show it at debug unless the filter already
    // says something about its target.
    if matches!(cli.command, Command::Agent { bpf_log: true, .. })
        && !filter.to_string().contains(BPF_LOG_TARGET)
        && let Ok(d) = format!("{BPF_LOG_TARGET}=debug").parse()
    {
        filter = filter.add_directive(d);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    svc_lb::mem::limit_arenas();
    let cli = Cli::parse();
    init_logging(&cli);
    match svc_lb::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of contexts, outermost first.
            eprintln!("svc-lb: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
