//! Per-call cost of the socket programs, from the kernel's own run-time statistics
//! (`BPF_ENABLE_STATS`: `run_time_ns / run_cnt` of each program), on a small lab: one
//! TCP and one UDP Service per family, one backend.
//!
//! Each case makes `N` attempts from the lab's cgroup and reads the statistics of the
//! lab agent's programs before and after, so it measures exactly the calls it made:
//! - hit: the Service address (connect4/6 for TCP and connected UDP, sendmsg4/6 for
//!   unconnected UDP, then recvmsg/getpeername showing the Service address again). Each
//!   attempt is a new socket, so each hit also creates the socket's reverse-NAT store
//!   (socket-local storage); "one socket" sends every datagram from one UDP socket,
//!   which shows the cost once the store exists;
//! - affinity: a TCP Service with `sessionAffinity: ClientIP` (remembered backend);
//! - miss: the same address on a port that is no Service (the program's fail-open path;
//!   the client has no route there, so every attempt fails with ENETUNREACH after the
//!   program ran).
//!
//! The test asserts what it can know for sure: every attempt went where it should, and
//! each measured program ran at least once per attempt. The nanoseconds are printed as a
//! table (they depend on the machine and its load); `SVCLB_HOTPATH_BUDGET_NS` turns the
//! hit-path budget into an assertion. `SVCLB_HOTPATH_N` sets the attempts per case.
//!
//! Run as root after `cargo build --release -p svc-lb`:
//! `cargo test --release -p svc-lb-tests --features e2e --test hotpath -- --test-threads=1 --nocapture`.
#![cfg(feature = "e2e")]

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context, Result, ensure};
use serde_json::json;
use svc_lb_tests::{
    ClientReport, Lab, Proto,
    bench::bpf::{self, ProgStats, StatsGuard},
    lab::with_lab,
    manifests::{EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
};

const NS: &str = "hotpath";
const VIP4: &str = "10.96.62.10";
const VIP6: &str = "fd00:96::62:10";
/// A TCP Service with session affinity (ClientIP).
const VIP4_STICKY: &str = "10.96.62.11";
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
/// A port of the VIPs that no Service uses.
const MISS_PORT: u16 = 81;
const TARGET: u16 = 8080;

const N_DEFAULT: u64 = 2000;
const N_ENV: &str = "SVCLB_HOTPATH_N";
const BUDGET_ENV: &str = "SVCLB_HOTPATH_BUDGET_NS";

fn env_u64(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(
            v.parse()
                .with_context(|| format!("{name}={v} is not a number"))?,
        )),
        Err(_) => Ok(None),
    }
}

fn services(lab: &Lab) -> String {
    let host = lab.topo.backend("a");
    let mut docs = Vec::new();
    for (vip, v6) in [(VIP4, false), (VIP6, true)] {
        let vip: IpAddr = vip.parse().expect("VIP");
        for (name, port, proto) in [
            ("web", TCP_PORT, Protocol::Tcp),
            ("dns", UDP_PORT, Protocol::Udp),
        ] {
            let name = format!("{name}{}", if v6 { 6 } else { 4 });
            docs.push(
                Service::new(NS, &name, &[vip])
                    .port("p", port, TargetPort::Number(TARGET), proto)
                    .to_value(),
            );
            docs.push(
                EndpointSlice::new(NS, &name, "x", v6)
                    .port("p", TARGET, proto)
                    .ready_endpoints(&[host.addr(v6)])
                    .to_value(),
            );
        }
    }
    // The same TCP port with session affinity: every connection after the first takes
    // the client's remembered backend.
    docs.push(
        Service::new(NS, "sticky4", &[VIP4_STICKY.parse().expect("VIP")])
            .spec("sessionAffinity", json!("ClientIP"))
            .port("p", TCP_PORT, TargetPort::Number(TARGET), Protocol::Tcp)
            .to_value(),
    );
    docs.push(
        EndpointSlice::new(NS, "sticky4", "x", false)
            .port("p", TARGET, Protocol::Tcp)
            .ready_endpoints(&[host.addr(false)])
            .to_value(),
    );
    yaml_docs(&docs)
}

/// One measured case: what the client does and which programs it exercises.
struct Case {
    name: &'static str,
    target: SocketAddr,
    proto: Proto,
    hit: bool,
    /// UDP: every attempt from one socket, whose reverse-NAT store then exists after the
    /// first datagram (the other cases create a socket, and so a store, per attempt).
    one_socket: bool,
    /// The programs every attempt runs at least once (bpftool's 15-character names).
    progs: Vec<&'static str>,
}

fn cases() -> Vec<Case> {
    let v4: IpAddr = VIP4.parse().expect("VIP");
    let v6: IpAddr = VIP6.parse().expect("VIP");
    let mut out = Vec::new();
    for (fam, ip, connect, sendmsg, recvmsg, getpeer) in [
        (
            4,
            v4,
            "svclb_connect4",
            "svclb_sendmsg4",
            "svclb_recvmsg4",
            "svclb_getpeer4",
        ),
        (
            6,
            v6,
            "svclb_connect6",
            "svclb_sendmsg6",
            "svclb_recvmsg6",
            "svclb_getpeer6",
        ),
    ] {
        let hit = |port| SocketAddr::new(ip, port);
        let v = fam == 6;
        out.extend([
            Case {
                name: if v { "tcp6 hit" } else { "tcp4 hit" },
                target: hit(TCP_PORT),
                proto: Proto::Tcp,
                hit: true,
                one_socket: false,
                progs: vec![connect],
            },
            Case {
                name: if v { "tcp6 miss" } else { "tcp4 miss" },
                target: hit(MISS_PORT),
                proto: Proto::Tcp,
                hit: false,
                one_socket: false,
                progs: vec![connect],
            },
            Case {
                name: if v { "udp6 hit" } else { "udp4 hit" },
                target: hit(UDP_PORT),
                proto: Proto::Udp,
                hit: true,
                one_socket: false,
                progs: vec![sendmsg, recvmsg],
            },
            Case {
                name: if v {
                    "udp6 hit one socket"
                } else {
                    "udp4 hit one socket"
                },
                target: hit(UDP_PORT),
                proto: Proto::Udp,
                hit: true,
                one_socket: true,
                progs: vec![sendmsg, recvmsg],
            },
            Case {
                name: if v { "udp6 miss" } else { "udp4 miss" },
                target: hit(MISS_PORT),
                proto: Proto::Udp,
                hit: false,
                one_socket: false,
                progs: vec![sendmsg],
            },
            Case {
                name: if v {
                    "udp6 connected hit"
                } else {
                    "udp4 connected hit"
                },
                target: hit(UDP_PORT),
                proto: Proto::UdpConnected,
                hit: true,
                one_socket: false,
                progs: vec![connect, recvmsg, getpeer],
            },
        ]);
    }
    out.push(Case {
        name: "tcp4 affinity hit",
        target: SocketAddr::new(VIP4_STICKY.parse().expect("VIP"), TCP_PORT),
        proto: Proto::Tcp,
        hit: true,
        one_socket: false,
        progs: vec!["svclb_connect4"],
    });
    out
}

/// The client's outcome is the one the case expects: all answered by the backend on a
/// hit, all refused locally with ENETUNREACH on a miss.
fn check_outcome(case: &Case, r: &ClientReport, n: u64) -> Result<()> {
    ensure!(
        r.attempts == n,
        "{}: {} attempts of {n}",
        case.name,
        r.attempts
    );
    if case.hit {
        ensure!(
            r.ok == n && r.backends.get("a") == Some(&n),
            "{}: not every attempt answered by backend a: {}",
            case.name,
            r.summary()
        );
    } else {
        ensure!(
            r.failures == BTreeMap::from([("ENETUNREACH".to_owned(), n)]),
            "{}: expected {n} ENETUNREACH: {}",
            case.name,
            r.summary()
        );
    }
    Ok(())
}

#[test]
fn socket_programs_cost_per_call() {
    with_lab(env!("CARGO_BIN_EXE_svclb-harness"), &["a"], |lab| {
        let n = env_u64(N_ENV)?.unwrap_or(N_DEFAULT);
        let budget = env_u64(BUDGET_ENV)?;
        let host = lab.topo.backend("a");
        let (a4, a6) = (host.addr(false), host.addr(true));
        lab.serve(
            "a",
            "a",
            &[SocketAddr::new(a4, TARGET), SocketAddr::new(a6, TARGET)],
            &[SocketAddr::new(a4, TARGET), SocketAddr::new(a6, TARGET)],
        )?;
        lab.write_manifest("svc.yaml", &services(lab))?;
        lab.start_agent()?;
        let ids = bpf::cgroup_programs(lab.cgroup())?;
        ensure!(!ids.is_empty(), "no program attached to the lab cgroup");
        let _stats = StatsGuard::enable().context("turn on the kernel's BPF statistics")?;

        let mut rows: Vec<(String, ProgStats)> = Vec::new();
        let mut over = Vec::new();
        for case in cases() {
            let mut opts = lab.client(case.target, case.proto);
            opts.count = n;
            opts.one_socket = case.one_socket;
            let before = bpf::prog_stats(&ids)?;
            let r = lab.run_client(&opts)?;
            let after = bpf::prog_stats(&ids)?;
            check_outcome(&case, &r, n)?;
            let delta = bpf::delta(&before, &after)?;
            for prog in &case.progs {
                let d = delta
                    .iter()
                    .find(|d| d.name == *prog)
                    .with_context(|| format!("{}: program {prog} is not attached", case.name))?;
                ensure!(
                    d.run_cnt >= n,
                    "{}: {prog} ran {} times for {n} attempts",
                    case.name,
                    d.run_cnt
                );
                if case.hit
                    && let Some(b) = budget
                    && d.run_time_ns / d.run_cnt > b
                {
                    over.push(format!(
                        "{} {prog}: {} ns/call > {b}",
                        case.name,
                        d.run_time_ns / d.run_cnt
                    ));
                }
                rows.push((case.name.to_owned(), d.clone()));
            }
        }
        println!(
            "{:<20} {:<16} {:>8} {:>8}",
            "case", "program", "calls", "ns/call"
        );
        for (case, d) in &rows {
            println!(
                "{case:<20} {:<16} {:>8} {:>8}",
                d.name,
                d.run_cnt,
                d.run_time_ns / d.run_cnt.max(1)
            );
        }
        ensure!(over.is_empty(), "over the hit-path budget: {over:?}");
        Ok(())
    });
}
