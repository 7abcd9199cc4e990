//! The agent's metrics endpoint as tests use it: an agent with JSON logs and metrics on
//! a free port, the address it logged, and the series of one scrape.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{
    Lab,
    agent::{Agent, AgentConfig},
};

/// Starts the agent on the lab with extra flags, JSON logs and metrics on a free port,
/// and waits for its first sync. The caller drops the agent before the lab.
pub fn start_agent(lab: &Lab, tag: &str, extra: &[&str]) -> Result<Agent> {
    let mut extra_args: Vec<String> = ["--log-format", "json", "--metrics-addr", "127.0.0.1:0"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    extra_args.extend(extra.iter().map(|s| (*s).to_owned()));
    let mut agent = Agent::start(AgentConfig {
        bin: lab.bins.svc_lb.clone(),
        manifests: lab.manifests_dir(),
        bpffs: lab.bpffs().to_path_buf(),
        cgroup: lab.cgroup().to_path_buf(),
        log_file: lab.dir().join(format!("agent-{tag}.log")),
        extra_args,
    })?;
    agent.wait_applied(1, Duration::from_secs(30))?;
    Ok(agent)
}

/// The address the agent logged for its metrics server.
pub fn metrics_addr(agent: &Agent) -> Result<SocketAddr> {
    for line in agent.log_lines() {
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if v["fields"]["message"] == "serving /metrics and /status" {
            let addr = v["fields"]["addr"].as_str().context("addr field")?;
            return addr.parse().context("parse the metrics address");
        }
    }
    bail!(
        "the agent did not log its metrics address:\n{}",
        agent.log_text()
    )
}

pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").context("malformed answer")?;
    ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    Ok(body.to_owned())
}

/// `name{labels}` → value, from the text exposition.
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

pub fn metric(m: &BTreeMap<String, f64>, series: &str) -> Result<f64> {
    m.get(series).copied().with_context(|| {
        let names: Vec<&String> = m.keys().collect();
        format!("no series {series} among {names:#?}")
    })
}

/// One series of a fresh scrape of `agent`'s /metrics.
pub fn scrape_one(agent: &Agent, series: &str) -> Result<f64> {
    metric(
        &parse_metrics(&http_get(metrics_addr(agent)?, "/metrics")?),
        series,
    )
}
