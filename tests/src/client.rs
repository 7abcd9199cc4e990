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
    report::{ClientReport, FAILURE_SAMPLES, FailureSample, Proto, TimelineEntry},
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
    /// With udp-connected: one connected socket, replaced by a new one (connected
    /// again) after a failed attempt, as a resolver does.
    #[arg(long)]
    pub one_socket: bool,
    /// Print the report as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Bind this source port (SO_REUSEADDR) instead of an ephemeral one.
    #[arg(long)]
    pub sport: Option<u16>,
    /// With --sport: attempt i uses port sport + i * step (0: the same port every time).
    #[arg(long, default_value_t = 0)]
    pub sport_step: u16,
    /// TCP: one connection for all attempts; each attempt is one message and its reply
    /// (the server's long-lived mode). After a failure the connection is not reused and
    /// every later attempt fails with BROKEN.
    #[arg(long)]
    pub long_lived: bool,
    /// Record the wall-clock time and outcome of every attempt (`timeline`).
    #[arg(long)]
    pub timeline: bool,
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
    /// The client address the backend saw (servers started with `--with-peer`).
    seen: Option<SocketAddr>,
    source: Option<SocketAddr>,
    peer: Option<SocketAddr>,
}

/// The source address for an attempt: the unspecified address of the target's family,
/// with `port` (0 = ephemeral).
fn local_addr(target: SocketAddr, port: u16) -> SocketAddr {
    let any: IpAddr = match target {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(any, port)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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
    let sport_of = |attempt: u64| -> u16 {
        args.sport.map_or(0, |p| {
            let off = u16::try_from(attempt)
                .unwrap_or(u16::MAX)
                .wrapping_mul(args.sport_step);
            p.wrapping_add(off)
        })
    };
    let shared_udp = if args.one_socket && args.proto == Proto::Udp {
        Some(udp_socket(args.target, timeout, sport_of(0)).context("create the UDP socket")?)
    } else {
        None
    };
    if args.long_lived && args.proto != Proto::Tcp {
        bail!("--long-lived is for TCP only");
    }
    let mut session: Option<TcpStream> = None;
    let mut connected_udp: Option<UdpSocket> = None;
    let mut broken = false;
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
        let start_unix_us = crate::checks::unix_us();
        let t0 = Instant::now();
        let at_ms = u64::try_from(t0.duration_since(start).as_millis()).unwrap_or(u64::MAX);
        let sport = sport_of(report.attempts);
        let outcome = match args.proto {
            Proto::Tcp if args.long_lived => {
                if broken {
                    Err(Failure {
                        step: "session",
                        errno: "BROKEN".into(),
                    })
                } else {
                    let r = long_lived_attempt(&mut session, args.target, timeout, sport);
                    broken = r.is_err();
                    r
                }
            }
            Proto::Tcp => tcp_attempt(args.target, timeout, sport),
            Proto::Udp => match &shared_udp {
                Some(sock) => udp_send_recv(sock, args.target),
                None => udp_socket(args.target, timeout, sport)
                    .map_err(at("socket"))
                    .and_then(|s| udp_send_recv(&s, args.target)),
            },
            Proto::UdpConnected if args.one_socket => {
                let r = reused_connected_attempt(&mut connected_udp, args.target, timeout, sport);
                if r.is_err() {
                    connected_udp = None;
                }
                r
            }
            Proto::UdpConnected => udp_connected_attempt(args.target, timeout, sport),
        };
        if args.timeline {
            report.timeline.push(TimelineEntry {
                unix_ms: unix_ms(),
                start_unix_us,
                outcome: match &outcome {
                    Ok(r) => r.id.clone(),
                    Err(f) => format!("{}:{}", f.step, f.errno),
                },
            });
        }
        if args.sport.is_some() {
            report.by_sport.insert(
                sport,
                match &outcome {
                    Ok(r) => r.id.clone(),
                    Err(f) => format!("{}:{}", f.step, f.errno),
                },
            );
        }
        let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        report.attempts += 1;
        match outcome {
            Ok(r) => {
                report.ok += 1;
                if let Some(seen) = r.seen {
                    *report.backend_saw.entry(seen.ip().to_string()).or_default() += 1;
                }
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

/// A TCP connection from source port `sport` (0 = ephemeral).
fn tcp_connect(target: SocketAddr, timeout: Duration, sport: u16) -> Result<TcpStream, Failure> {
    if sport == 0 {
        return TcpStream::connect_timeout(&target, timeout).map_err(at("connect"));
    }
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(at("socket"))?;
    sock.set_reuse_address(true).map_err(at("setsockopt"))?;
    sock.bind(&local_addr(target, sport).into())
        .map_err(at("bind"))?;
    sock.connect_timeout(&target.into(), timeout)
        .map_err(at("connect"))?;
    Ok(sock.into())
}

fn tcp_attempt(target: SocketAddr, timeout: Duration, sport: u16) -> Result<Reply, Failure> {
    let mut s = tcp_connect(target, timeout, sport)?;
    let peer = s.peer_addr().map_err(at("getpeername"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(at("setsockopt"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(at("setsockopt"))?;
    s.write_all(b"?").map_err(at("send"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(at("recv"))?;
    let (id, seen) = reply_id(&buf)?;
    Ok(Reply {
        id,
        seen,
        source: None,
        peer: Some(peer),
    })
}

/// One message of a long-lived session, opening it on the first attempt.
fn long_lived_attempt(
    session: &mut Option<TcpStream>,
    target: SocketAddr,
    timeout: Duration,
    sport: u16,
) -> Result<Reply, Failure> {
    let first = session.is_none();
    if first {
        let s = tcp_connect(target, timeout, sport)?;
        s.set_read_timeout(Some(timeout))
            .map_err(at("setsockopt"))?;
        s.set_write_timeout(Some(timeout))
            .map_err(at("setsockopt"))?;
        *session = Some(s);
    }
    let Some(s) = session.as_mut() else {
        return Err(Failure {
            step: "session",
            errno: "BROKEN".into(),
        });
    };
    let msg: &[u8] = if first {
        &[crate::serve::LONG_LIVED]
    } else {
        b"?"
    };
    s.write_all(msg).map_err(at("send"))?;
    // Read one reply line; the reply is short, so byte-wise reads cost nothing.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = s.read(&mut byte).map_err(at("recv"))?;
        if n == 0 {
            return Err(Failure {
                step: "recv",
                errno: "EOF".into(),
            });
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    let peer = s.peer_addr().map_err(at("getpeername"))?;
    let (id, seen) = reply_id(&line)?;
    Ok(Reply {
        id,
        seen,
        source: None,
        peer: Some(peer),
    })
}

/// The reply's id and, when the server appended it (`serve --with-peer`), the client
/// address the server saw.
fn reply_id(buf: &[u8]) -> Result<(String, Option<SocketAddr>), Failure> {
    let text = String::from_utf8_lossy(buf).trim().to_owned();
    let (id, seen) = match text.split_once(' ') {
        Some((id, peer)) => (id.to_owned(), peer.trim().parse::<SocketAddr>().ok()),
        None => (text, None),
    };
    if id.is_empty() {
        return Err(Failure {
            step: "recv",
            errno: "EMPTY_REPLY".into(),
        });
    }
    Ok((id, seen))
}

/// A UDP socket of the target's family on the unspecified address and port `sport`
/// (0 = ephemeral), with the receive timeout set.
fn udp_socket(target: SocketAddr, timeout: Duration, sport: u16) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(local_addr(target, sport))?;
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

fn udp_send_recv(s: &UdpSocket, target: SocketAddr) -> Result<Reply, Failure> {
    s.send_to(b"?", target).map_err(at("send"))?;
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf).map_err(at("recv"))?;
    let (id, seen) = reply_id(&buf[..n])?;
    Ok(Reply {
        id,
        seen,
        source: Some(from),
        peer: None,
    })
}

fn udp_connected_attempt(
    target: SocketAddr,
    timeout: Duration,
    sport: u16,
) -> Result<Reply, Failure> {
    let s = udp_socket(target, timeout, sport).map_err(at("socket"))?;
    s.connect(target).map_err(at("connect"))?;
    connected_send_recv(&s)
}

/// One attempt on the long-lived connected UDP socket, connecting it first if needed.
fn reused_connected_attempt(
    sock: &mut Option<UdpSocket>,
    target: SocketAddr,
    timeout: Duration,
    sport: u16,
) -> Result<Reply, Failure> {
    if sock.is_none() {
        let s = udp_socket(target, timeout, sport).map_err(at("socket"))?;
        s.connect(target).map_err(at("connect"))?;
        *sock = Some(s);
    }
    let Some(s) = sock.as_ref() else {
        return Err(Failure {
            step: "socket",
            errno: "NONE".into(),
        });
    };
    connected_send_recv(s)
}

fn connected_send_recv(s: &UdpSocket) -> Result<Reply, Failure> {
    s.send(b"?").map_err(at("send"))?;
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf).map_err(at("recv"))?;
    let peer = s.peer_addr().map_err(at("getpeername"))?;
    let (id, seen) = reply_id(&buf[..n])?;
    Ok(Reply {
        id,
        seen,
        source: Some(from),
        peer: Some(peer),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_carries_the_id_and_optionally_the_address_the_server_saw() {
        let (id, seen) = reply_id(b"a1 10.250.0.100:40000\n").ok().unwrap();
        assert_eq!(id, "a1");
        assert_eq!(seen, Some("10.250.0.100:40000".parse().unwrap()));
        let (id, seen) = reply_id(b"b1 [fd00:250::1]:1").ok().unwrap();
        assert_eq!(
            (id.as_str(), seen),
            ("b1", Some("[fd00:250::1]:1".parse().unwrap()))
        );
        // Servers without --with-peer answer the bare id, as before.
        let (id, seen) = reply_id(b"c").ok().unwrap();
        assert_eq!((id.as_str(), seen), ("c", None));
        assert!(reply_id(b"  ").is_err());
    }
}
