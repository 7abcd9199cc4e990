//! `svclb-harness demo`: the example manifests, live.
//!
//! Builds three backend namespaces whose addresses are the ones deploy/examples uses,
//! a client namespace without a default route and a cgroup; starts the backends the
//! EndpointSlices describe, runs the agent on the example directory, and prints once a
//! second which backend answered each Service, until Ctrl-C. Then it removes everything.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::{
    lab::{Bins, Lab, LabOptions},
    procs,
    report::{ClientReport, Proto},
};

/// Backend namespaces the demo creates, in subnet order: `DEMO_BACKENDS[i]` is
/// 10.240.<i+1>.2 and fd00:240:<i+1>::2 (see deploy/examples/README.md).
pub const DEMO_BACKENDS: [&str; 3] = ["backend-a", "backend-b", "backend-c"];

#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// The agent binary.
    #[arg(long)]
    pub svc_lb: PathBuf,
    /// Directory of example manifests (the agent runs on it as it is).
    #[arg(long, default_value = "deploy/examples")]
    pub manifests: PathBuf,
    /// Pin directory (default: a private directory under /sys/fs/bpf). Removed at the end.
    #[arg(long)]
    pub bpffs: Option<PathBuf>,
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration_s: Option<u64>,
    /// Length of one tally line.
    #[arg(long, default_value_t = 1000)]
    pub tick_ms: u64,
    /// Pause between two requests of one client.
    #[arg(long, default_value_t = 10)]
    pub interval_ms: u64,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let rc = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        if rc == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error()).context("install signal handler");
        }
    }
    Ok(())
}

/// One address a client dials.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Frontend {
    pub service: String,
    pub addr: SocketAddr,
    pub protocol: String,
}

/// What the example directory asks for.
#[derive(Debug, Default)]
pub struct Examples {
    pub frontends: Vec<Frontend>,
    /// Backend address → (TCP ports, UDP ports) it must serve.
    pub endpoints: BTreeMap<IpAddr, (BTreeSet<u16>, BTreeSet<u16>)>,
    /// LoadBalancer Services ("ns/name") without an ingress address: the agent
    /// allocates one from an IPAddressPool, and the demo dials it too.
    pub lb_services: Vec<String>,
    /// IPAddressPool name → its `spec.addresses`.
    pub pools: BTreeMap<String, Vec<String>>,
    /// L2Advertisement name → its `spec.interfaces`.
    pub l2_interfaces: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// Reads every `*.yaml|*.yml|*.json` file (multi-document, `kind: List` unwrapped) and
/// keeps the ClusterIP Services and the EndpointSlices.
pub fn read_examples(dir: &Path) -> Result<Examples> {
    let mut docs = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
        })
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).with_context(|| format!("read {}", f.display()))?;
        for de in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(de).with_context(|| format!("parse {}", f.display()))?;
            if v.is_null() {
                continue;
            }
            if v["kind"] == "List" {
                docs.extend(v["items"].as_array().cloned().unwrap_or_default());
            } else {
                docs.push(v);
            }
        }
    }
    let mut ex = Examples::default();
    let mut service_names = BTreeSet::new();
    for d in &docs {
        let meta: Meta = serde_json::from_value(d["metadata"].clone()).context("metadata")?;
        let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
        match d["kind"].as_str() {
            Some("Service") => {
                let name = format!("{ns}/{}", meta.name);
                service_names.insert(name.clone());
                let no_ingress = d["status"]["loadBalancer"]["ingress"]
                    .as_array()
                    .is_none_or(Vec::is_empty);
                if d["spec"]["type"] == "LoadBalancer" && no_ingress {
                    ex.lb_services.push(name.clone());
                }
                let ips: Vec<IpAddr> = match d["spec"]["clusterIPs"].as_array() {
                    Some(a) => a.iter().filter_map(|v| v.as_str()?.parse().ok()).collect(),
                    None => d["spec"]["clusterIP"]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .into_iter()
                        .collect(),
                };
                for p in d["spec"]["ports"].as_array().into_iter().flatten() {
                    let port = p["port"].as_u64().context("service port")?;
                    let port = u16::try_from(port).context("service port")?;
                    let protocol = p["protocol"].as_str().unwrap_or("TCP").to_owned();
                    for ip in &ips {
                        ex.frontends.push(Frontend {
                            service: name.clone(),
                            addr: SocketAddr::new(*ip, port),
                            protocol: protocol.clone(),
                        });
                    }
                }
            }
            Some("IPAddressPool") => {
                let addrs = d["spec"]["addresses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.as_str().map(str::to_owned))
                    .collect();
                ex.pools.insert(meta.name.clone(), addrs);
            }
            Some("L2Advertisement") => {
                let ifaces = d["spec"]["interfaces"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.as_str().map(str::to_owned))
                    .collect();
                ex.l2_interfaces.insert(meta.name.clone(), ifaces);
            }
            Some("EndpointSlice") => {
                let mut tcp = BTreeSet::new();
                let mut udp = BTreeSet::new();
                for p in d["ports"].as_array().into_iter().flatten() {
                    let port = u16::try_from(p["port"].as_u64().context("slice port")?)
                        .context("slice port")?;
                    match p["protocol"].as_str().unwrap_or("TCP") {
                        "UDP" => udp.insert(port),
                        _ => tcp.insert(port),
                    };
                }
                for e in d["endpoints"].as_array().into_iter().flatten() {
                    for a in e["addresses"].as_array().into_iter().flatten() {
                        let ip: IpAddr = a
                            .as_str()
                            .context("endpoint address")?
                            .parse()
                            .context("endpoint address")?;
                        let entry = ex.endpoints.entry(ip).or_default();
                        entry.0.extend(&tcp);
                        entry.1.extend(&udp);
                    }
                }
            }
            _ => {}
        }
    }
    ex.frontends.sort();
    Ok(ex)
}

pub fn run(args: &DemoArgs) -> Result<()> {
    install_signal_handlers()?;
    // Ctrl-C must reach only the demo, which then stops its children in order.
    procs::set_own_process_group(true);
    let examples = read_examples(&args.manifests)?;
    if examples.frontends.is_empty() {
        bail!("no Service in {}", args.manifests.display());
    }
    let manifests = std::fs::canonicalize(&args.manifests)
        .with_context(|| format!("resolve {}", args.manifests.display()))?;
    let bins = Bins {
        svc_lb: std::fs::canonicalize(&args.svc_lb)
            .with_context(|| format!("agent binary {}", args.svc_lb.display()))?,
        harness: procs::harness_bin(None)?,
    };
    println!("svc-lb demo: setting up");
    let mut lab = Lab::with_options(
        bins,
        &DEMO_BACKENDS,
        LabOptions {
            manifests: Some(manifests.clone()),
            bpffs: args.bpffs.clone(),
        },
    )?;
    println!(
        "  client netns   {} (no default route; VIPs reach nothing unless svc-lb rewrites them)",
        lab.topo.client.name()
    );
    // Which demo backend owns each endpoint address of the examples.
    let mut plan: BTreeMap<String, (Vec<SocketAddr>, Vec<SocketAddr>)> = BTreeMap::new();
    for (ip, (tcp, udp)) in &examples.endpoints {
        let Some(b) = lab
            .topo
            .backends
            .iter()
            .find(|b| IpAddr::V4(b.addr4) == *ip || IpAddr::V6(b.addr6) == *ip)
        else {
            bail!(
                "{} uses endpoint address {ip}, which the demo does not create; it creates {}",
                args.manifests.display(),
                lab.topo
                    .backends
                    .iter()
                    .map(|b| format!("{} = {} / {}", b.id, b.addr4, b.addr6))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let e = plan.entry(b.id.clone()).or_default();
        e.0.extend(tcp.iter().map(|p| SocketAddr::new(*ip, *p)));
        e.1.extend(udp.iter().map(|p| SocketAddr::new(*ip, *p)));
    }
    for b in &lab.topo.backends {
        println!(
            "  backend netns  {} = {}  {} / {}",
            b.netns.name(),
            b.id,
            b.addr4,
            b.addr6
        );
    }
    for (id, (tcp, udp)) in &plan {
        lab.serve(id, id, tcp, udp)?;
        let list = |v: &Vec<SocketAddr>| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "  server         {id}: tcp [{}] udp [{}] (answers \"{id}\")",
            list(tcp),
            list(udp)
        );
    }
    println!("  cgroup         {}", lab.cgroup().display());
    println!("  pins           {}", lab.bpffs().display());
    println!("  manifests      {}", manifests.display());
    println!(
        "  agent          {} agent --manifests {} --bpffs {} --cgroup {}",
        lab.bins.svc_lb.display(),
        manifests.display(),
        lab.bpffs().display(),
        lab.cgroup().display()
    );
    let started = Instant::now();
    lab.start_agent()?;
    println!(
        "svc-lb demo: agent up (first sync applied after {} ms); sending requests, Ctrl-C to stop",
        started.elapsed().as_millis()
    );
    let mut frontends = examples.frontends.clone();
    if !examples.lb_services.is_empty() {
        let lb = lb_frontends(&mut lab, &examples.lb_services)?;
        frontends.extend(lb);
        frontends.sort();
    }
    let mut totals: BTreeMap<Frontend, ClientReport> = BTreeMap::new();
    // Agent log lines already shown; new ones are printed each tick, so an edit of the
    // manifests shows up next to the tally it changes.
    let mut shown = 0;
    show_agent_log(&mut lab, &mut shown);
    let deadline = args
        .duration_s
        .map(|s| Instant::now() + Duration::from_secs(s));
    while !STOP.load(Ordering::SeqCst) && deadline.is_none_or(|d| Instant::now() < d) {
        let mut runs = Vec::new();
        for f in &frontends {
            let proto = if f.protocol == "UDP" {
                Proto::Udp
            } else {
                Proto::Tcp
            };
            let mut o = lab.client(f.addr, proto);
            o.count = 0;
            o.duration = Some(Duration::from_millis(args.tick_ms));
            o.interval = Duration::from_millis(args.interval_ms);
            o.timeout = Duration::from_millis(500);
            runs.push((f.clone(), lab.spawn_client(&o)?));
        }
        let secs = started.elapsed().as_secs();
        for (f, run) in runs {
            let r = run.wait()?;
            println!(
                "[{secs:>4}s] {} {}/{} → {}",
                f.service,
                f.addr,
                f.protocol,
                tally(&r)
            );
            let t = totals.entry(f).or_default();
            t.attempts += r.attempts;
            t.failed += r.failed;
            for (k, v) in r.backends {
                *t.backends.entry(k).or_default() += v;
            }
            for (k, v) in r.failures {
                *t.failures.entry(k).or_default() += v;
            }
        }
        show_agent_log(&mut lab, &mut shown);
        if !lab.agent().is_running()? {
            bail!("the agent exited; its log:\n{}", lab.agent().log_text());
        }
    }
    println!("svc-lb demo: totals");
    for (f, r) in &totals {
        println!("  {} {}/{} → {}", f.service, f.addr, f.protocol, tally(r));
    }
    println!("svc-lb demo: cleaning up (agent, servers, programs, pins, cgroup, namespaces)");
    drop(lab);
    println!("svc-lb demo: done");
    Ok(())
}

/// The load-balancer addresses the agent allocated to `services`, as `svc-lb list`
/// shows them (socket scope: what the demo's clients reach); also prints that list,
/// which names each address's pool when the agent answers on its default metrics
/// address.
fn lb_frontends(lab: &mut Lab, services: &[String]) -> Result<Vec<Frontend>> {
    let mut out = Vec::new();
    for svc in services {
        let deadline = Instant::now() + crate::agent::scaled(Duration::from_secs(10));
        let found = loop {
            let o = lab.svc_lb(&["list", "-o", "json", "--service", svc.as_str()])?;
            let entries: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap_or_default();
            let found: Vec<Frontend> = entries
                .iter()
                .filter(|e| e["kind"] == "LoadBalancer" && e["scope"] == "socket")
                .filter_map(|e| {
                    let ip: IpAddr = e["address"].as_str()?.parse().ok()?;
                    let port = u16::try_from(e["port"].as_u64()?).ok()?;
                    Some(Frontend {
                        service: svc.clone(),
                        addr: SocketAddr::new(ip, port),
                        protocol: e["protocol"].as_str()?.to_owned(),
                    })
                })
                .collect();
            if !found.is_empty() || Instant::now() >= deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if found.is_empty() {
            bail!(
                "{svc} is a LoadBalancer Service without an address, but the agent allocated none \
                 (is there an IPAddressPool with a free address?); its log:\n{}",
                lab.agent().log_text()
            );
        }
        for f in &found {
            println!(
                "  load balancer  {} got {} from an IPAddressPool (svc-lb allocated it; no route leads there)",
                f.service, f.addr
            );
        }
        let o = lab.svc_lb(&["list", "--service", svc.as_str()])?;
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            println!("    svc-lb list: {l}");
        }
        out.extend(found);
    }
    Ok(out)
}

/// Prints the agent's log lines after the first `shown`.
fn show_agent_log(lab: &mut Lab, shown: &mut usize) {
    let lines = lab.agent().log_lines();
    for l in lines.iter().skip(*shown) {
        println!("        agent: {}", strip_ansi(l));
    }
    *shown = lines.len();
}

/// The agent colours its log even into a pipe; the demo shows it as plain text.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters... final byte in @..~
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `backend-a 34  backend-b 31  backend-c 35  failed 0`.
fn tally(r: &ClientReport) -> String {
    let mut parts: Vec<String> = r.backends.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let mut failed = format!("failed {}", r.failed);
    if r.failed > 0 {
        let why: Vec<String> = r.failures.iter().map(|(k, v)| format!("{k}={v}")).collect();
        failed.push_str(&format!(" ({})", why.join(" ")));
    }
    parts.push(failed);
    parts.join("  ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{backend_v4, backend_v6};

    /// deploy/examples must parse and use only the addresses the demo creates.
    #[test]
    fn strips_colour_codes() {
        assert_eq!(
            strip_ansi("\u{1b}[2mts\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "ts  INFO x"
        );
    }

    #[test]
    fn examples_match_the_demo_topology() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let ex = read_examples(&dir).expect("read deploy/examples");
        let web: SocketAddr = "10.96.100.10:80".parse().unwrap();
        assert!(
            ex.frontends
                .iter()
                .any(|f| f.addr == web && f.protocol == "TCP" && f.service == "demo/web"),
            "demo/web 10.96.100.10:80 missing: {:?}",
            ex.frontends
        );
        let ours: BTreeSet<IpAddr> = (1..=3u8)
            .flat_map(|k| [IpAddr::from(backend_v4(k)), IpAddr::from(backend_v6(k))])
            .collect();
        assert!(!ex.endpoints.is_empty(), "no endpoints in deploy/examples");
        for addr in ex.endpoints.keys() {
            assert!(
                ours.contains(addr),
                "example endpoint {addr} is not a demo backend"
            );
        }
        // The LoadBalancer Service gets its address from a pool of documentation
        // addresses (routed nowhere), and the L2Advertisement can only ever name an
        // interface the demo does not create, never a real one.
        assert_eq!(ex.lb_services, ["demo/web-lb"]);
        assert_eq!(
            ex.pools.get("demo-pool").map(Vec::as_slice),
            Some(&["198.51.100.0/29".to_owned()][..])
        );
        assert!(
            !ex.l2_interfaces.is_empty(),
            "no L2Advertisement in deploy/examples"
        );
        for (name, ifaces) in &ex.l2_interfaces {
            assert!(
                !ifaces.is_empty() && ifaces.iter().all(|i| i.starts_with("svclb-demo")),
                "L2Advertisement {name} may announce on a real interface: {ifaces:?}"
            );
        }
    }
}
