//! Command-line interface: `agent`, `list`, `cleanup`.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use svc_lb_common::{BACKEND_TERMINATING, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::{
    agent::{self, AgentConfig},
    datapath::bpf::{self, DEFAULT_BPFFS, PinnedMaps},
    model::NodeInfo,
    plan::CurrentState,
};

#[derive(Parser, Debug)]
#[command(
    name = "svc-lb",
    version,
    about = "Kubernetes Service load balancer on eBPF"
)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: program Services into the kernel and keep them in sync.
    Agent {
        /// Directory of Service and EndpointSlice manifests (*.yaml, *.yml, *.json).
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// cgroup v2 directory to attach to [default: the cgroup2 root from /proc/self/mountinfo]
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// This node's name, for node-local rules [default: $NODE_NAME, then the hostname]
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
    },
    /// Show every programmed frontend with its backends, from the pinned maps.
    List {
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Detach every program and remove every pin.
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Also detach svc-lb programs on this cgroup whose pins were lost.
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Agent {
            manifests,
            bpffs,
            cgroup,
            node_name,
        } => {
            let cgroup = match cgroup {
                Some(c) => c,
                None => crate::datapath::sys::cgroup2_root()?,
            };
            let node = NodeInfo {
                name: node_name.or_else(hostname),
                zone: None,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("start the async runtime")?;
            rt.block_on(agent::run(AgentConfig {
                manifests,
                bpffs,
                cgroup,
                node,
            }))
        }
        Command::List { output, bpffs } => {
            let state = PinnedMaps::open(&bpffs)?.read_current()?;
            let text = match output {
                Output::Text => render_text(&state),
                Output::Json => {
                    serde_json::to_string_pretty(&list_entries(&state)).context("encode JSON")?
                        + "\n"
                }
            };
            print!("{text}");
            Ok(())
        }
        Command::Cleanup { bpffs, cgroup } => {
            let n = bpf::cleanup(&bpffs, cgroup.as_deref())?;
            println!(
                "detached {n} links and removed pins under {}",
                bpffs.display()
            );
            Ok(())
        }
    }
}

/// One frontend in `list -o json`. The field names are a stable format.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct ListEntry {
    pub address: String,
    pub port: u16,
    pub protocol: &'static str,
    pub rev_nat_id: u32,
    pub affinity_timeout_seconds: Option<u32>,
    pub backends: Vec<ListBackend>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct ListBackend {
    pub id: u32,
    pub address: String,
    pub port: u16,
    pub state: &'static str,
}

pub fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        PROTO_SCTP => "SCTP",
        _ => "UNKNOWN",
    }
}

pub fn list_entries(state: &CurrentState) -> Vec<ListEntry> {
    state
        .frontends
        .iter()
        .map(|(fe, cur)| ListEntry {
            address: fe.addr.to_string(),
            port: fe.port,
            protocol: proto_name(fe.proto),
            rev_nat_id: cur.rev_nat_id,
            affinity_timeout_seconds: (cur.flags & svc_lb_common::SVC_FLAG_AFFINITY != 0)
                .then_some(cur.affinity_timeout_s),
            backends: cur
                .backend_ids
                .iter()
                .map(|id| match state.backends.get(id) {
                    Some(b) => ListBackend {
                        id: *id,
                        address: b.addr.addr.to_string(),
                        port: b.addr.port,
                        state: if b.state == BACKEND_TERMINATING {
                            "terminating"
                        } else {
                            "active"
                        },
                    },
                    None => ListBackend {
                        id: *id,
                        address: String::new(),
                        port: 0,
                        state: "missing",
                    },
                })
                .collect(),
        })
        .collect()
}

fn socket(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// ipvsadm -Ln style: one block per frontend, one `->` line per backend.
pub fn render_text(state: &CurrentState) -> String {
    let mut out = String::from(
        "Prot LocalAddress:Port                    Backends  Flags\n  -> RemoteAddress:Port                  State\n",
    );
    for e in list_entries(state) {
        let flags = e
            .affinity_timeout_seconds
            .map(|t| format!("affinity {t}s"))
            .unwrap_or_default();
        let count = if e.backends.is_empty() {
            "0 (reject)".to_owned()
        } else {
            e.backends.len().to_string()
        };
        let line = format!(
            "{:<4} {:<40} {:<9} {}",
            e.protocol,
            socket(&e.address, e.port),
            count,
            flags
        );
        out.push_str(line.trim_end());
        out.push('\n');
        for b in e.backends {
            out.push_str(&format!(
                "  -> {:<38} {}\n",
                socket(&b.address, b.port),
                b.state
            ));
        }
    }
    out
}
