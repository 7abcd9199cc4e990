//! `svclb-harness client`: makes counted attempts against one target and reports where
//! every one of them went.
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    errno, netns,
    report::{ClientReport, FAILURE_SAMPLES, FailureSample, Proto},
};

#[derive(Clone, Debug, clap::Args)]
pub struct ClientArgs {
    /// cgroup v2 directory to join first, before any socket exists: the agent's programs
    /// act on the sockets of processes in that cgroup.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Network namespace to run in (/run/netns/NAME), entered with setns.
    #[arg(long)]
    pub netns: Option<String>,
    /// Address to reach, e.g. 10.96.0.10:80 or [fd00:96::10]:80.
    #[arg(long)]
    pub target: SocketAddr,
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    pub proto: Proto,
    /// Attempts to make; with --duration-ms an upper bound (0 = none).
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Pause between attempts.
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
    /// Keep making attempts for this long.
    #[arg(long)]
    pub duration_ms: Option<u64>,
    /// Per-attempt timeout for connect and receive.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// UDP: send all datagrams from one socket (default: a new socket per attempt).
    #[arg(long)]
    pub one_socket: bool,
    /// Print the report as one JSON line.
    #[arg(long)]
    pub json: bool,
}

/// Where an attempt failed.
struct Failure {
    step: &'static str,
    errno: String,
}

fn at(step: &'static str) -> impl FnOnce(std::io::Error) -> Failure {
    move |e| Failure {
        step,
        errno: errno::name(&e),
    }
}

struct Reply {
    id: String,
    source: Option<SocketAddr>,
    peer: Option<SocketAddr>,
}

/// Joins the cgroup, enters the namespace, runs the attempts.
pub fn run(args: &ClientArgs) -> Result<ClientReport> {
    if let Some(cg) = &args.cgroup {
        let procs = cg.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .with_context(|| format!("join cgroup {}", cg.display()))?;
    }
    if let Some(ns) = &args.netns {
        netns::enter_netns(ns)?;
    }
    if args.duration_ms.is_none() && args.count == 0 {
        bail!("give --count N or --duration-ms D");
    }
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let interval = Duration::from_millis(args.interval_ms);
    let mut report = ClientReport {
        target: args.target.to_string(),
        proto: args.proto.to_string(),
        ..Default::default()
    };
    let shared_udp = if args.one_socket && args.proto == Proto::Udp {
        Some(udp_socket(args.target, timeout).context("create the UDP socket")?)
    } else {
        None
    };
    let start = Instant::now();
    loop {
        if let Some(d) = args.duration_ms {
            if start.elapsed() >= Duration::from_millis(d) {
                break;
            }
            if args.count != 0 && report.attempts >= args.count {
                break;
            }
        } else if report.attempts >= args.count {
            break;
        }
        let t0 = Instant::now();
        let at_ms = u64::try_from(t0.duration_since(start).as_millis()).unwrap_or(u64::MAX);
        let outcome = match args.proto {
            Proto::Tcp => tcp_attempt(args.target, timeout),
            Proto::Udp => match &shared_udp {
                Some(sock) => udp_send_recv(sock, args.target),
                None => udp_socket(args.target, timeout)
                    .map_err(at("socket"))
                    .and_then(|s| udp_send_recv(&s, args.target)),
            },
            Proto::UdpConnected => udp_connected_attempt(args.target, timeout),
        };
        let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        report.attempts += 1;
        match outcome {
            Ok(r) => {
                report.ok += 1;
                *report.backends.entry(r.id).or_default() += 1;
                if let Some(s) = r.source {
                    *report.reply_sources.entry(s.to_string()).or_default() += 1;
                }
                if let Some(p) = r.peer {
                    *report.peer_names.entry(p.to_string()).or_default() += 1;
                }
                report.max_ok_us = report.max_ok_us.max(us);
            }
            Err(f) => {
                report.failed += 1;
                let error = format!("{}:{}", f.step, f.errno);
                if report.failure_samples.len() < FAILURE_SAMPLES {
                    report.failure_samples.push(FailureSample {
                        attempt: report.attempts - 1,
                        at_ms,
                        error: error.clone(),
                    });
                }
                *report.failure_steps.entry(error).or_default() += 1;
                *report.failures.entry(f.errno).or_default() += 1;
                report.max_failure_us = report.max_failure_us.max(us);
            }
        }
        if !interval.is_zero() {
            std::thread::sleep(interval);
        }
    }
    report.elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(report)
}

fn tcp_attempt(target: SocketAddr, timeout: Duration) -> Result<Reply, Failure> {
    let mut s = TcpStream::connect_timeout(&target, timeout).map_err(at("connect"))?;
    let peer = s.peer_addr().map_err(at("getpeername"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(at("setsockopt"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(at("setsockopt"))?;
    s.write_all(b"?").map_err(at("send"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(at("recv"))?;
    let id = reply_id(&buf)?;
    Ok(Reply {
        id,
        source: None,
        peer: Some(peer),
    })
}

fn reply_id(buf: &[u8]) -> Result<String, Failure> {
    let id = String::from_utf8_lossy(buf).trim().to_owned();
    if id.is_empty() {
        return Err(Failure {
            step: "recv",
            errno: "EMPTY_REPLY".into(),
        });
    }
    Ok(id)
}

/// An unbound-address UDP socket of the target's family, with the receive timeout set.
fn udp_socket(target: SocketAddr, timeout: Duration) -> std::io::Result<UdpSocket> {
    let any: IpAddr = match target {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let s = UdpSocket::bind(SocketAddr::new(any, 0))?;
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

fn udp_send_recv(s: &UdpSocket, target: SocketAddr) -> Result<Reply, Failure> {
    s.send_to(b"?", target).map_err(at("send"))?;
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf).map_err(at("recv"))?;
    Ok(Reply {
        id: reply_id(&buf[..n])?,
        source: Some(from),
        peer: None,
    })
}

fn udp_connected_attempt(target: SocketAddr, timeout: Duration) -> Result<Reply, Failure> {
    let s = udp_socket(target, timeout).map_err(at("socket"))?;
    s.connect(target).map_err(at("connect"))?;
    s.send(b"?").map_err(at("send"))?;
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf).map_err(at("recv"))?;
    let peer = s.peer_addr().map_err(at("getpeername"))?;
    Ok(Reply {
        id: reply_id(&buf[..n])?,
        source: Some(from),
        peer: Some(peer),
    })
}
