//! Privileged end-to-end tests of L2 announcement (`--l2-announce`): three nodes and an
//! external client on one bridged segment (see `tests/src/l2lab.rs`), each node with its
//! own agent in manifest mode reading the same directory (three Node objects, the
//! Services). The load-balancer IPs sit on the segment's subnet, so the client resolves
//! them with ARP and NDP, and the tests count who answers.
//!
//! Run as root, one at a time:
//! `cargo test --release -p svc-lb-tests --features e2e --test l2 -- --test-threads=1`.
#![cfg(feature = "e2e")]

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, ensure};
use svc_lb::announce::choose::winner;
use svc_lb_tests::{
    l2lab::{L2Lab, NODES, lb_service, node_name, pod_name, run_l2_lab},
    report::{ClientReport, Proto},
};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP address")
}

const CLUSTER: [&str; 2] = ["10.96.0.10", "fd00:96::10"];

fn cluster() -> Vec<IpAddr> {
    CLUSTER.iter().map(|s| ip(s)).collect()
}

/// The node that the rendezvous hash picks for `vip` among `among`.
fn hrw(vip: IpAddr, among: &[usize]) -> usize {
    let names: Vec<String> = among.iter().map(|i| node_name(*i)).collect();
    let w = winner(vip, names.iter().map(String::as_str)).expect("a node");
    among[names.iter().position(|n| n == w).expect("a known name")]
}

/// An IPv4 and an IPv6 load-balancer address on the lab's subnet that the same node
/// wins among all three; returns (v4, v6, that node).
fn vips_won_by_one_node() -> (IpAddr, IpAddr, usize) {
    let all: Vec<usize> = (0..NODES).collect();
    let v4 = ip("10.250.0.200");
    let owner = hrw(v4, &all);
    let v6 = (0x200..0x300)
        .map(|h| ip(&format!("fd00:250::{h:x}")))
        .find(|v| hrw(*v, &all) == owner)
        .expect("some IPv6 address goes to the same node");
    (v4, v6, owner)
}

/// Probes `vip` `times` times and checks that exactly `node` answers, once each time.
fn only(lab: &L2Lab, vip: IpAddr, node: usize, times: usize) -> Result<()> {
    for _ in 0..times {
        let a = lab.who_answers(vip, Duration::from_millis(300))?;
        ensure!(
            a == vec![node],
            "{vip}: answers from {:?}, want exactly one from {}",
            a.iter().map(|i| node_name(*i)).collect::<Vec<_>>(),
            node_name(node)
        );
    }
    Ok(())
}

/// `n` TCP connections from the client to `vip:80`.
fn connect(lab: &L2Lab, vip: IpAddr, n: u64) -> Result<ClientReport> {
    let mut o = lab.client(SocketAddr::new(vip, 80), Proto::Tcp);
    o.count = n;
    let r = lab.run_client(&o)?;
    ensure!(r.is_consistent(), "inconsistent report {r:?}");
    Ok(r)
}

/// The longest time without a successful attempt in a timeline run, from its first
/// attempt's start to its last attempt's end.
fn outage_ms(r: &ClientReport) -> u64 {
    let Some(first) = r.timeline.first().map(|e| e.start_unix_us / 1000) else {
        return u64::MAX;
    };
    let end = r.timeline.last().map_or(first, |e| e.unix_ms);
    let mut last_ok = first;
    let mut worst = 0;
    for e in r.timeline.iter().filter(|e| !e.outcome.contains(':')) {
        worst = worst.max(e.unix_ms.saturating_sub(last_ok));
        last_ok = e.unix_ms;
    }
    worst.max(end.saturating_sub(last_ok))
}

#[test]
fn arp_and_ndp_are_answered_by_exactly_one_node_and_connections_succeed() {
    run_l2_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        let (v4, v6, owner) = vips_won_by_one_node();
        let all: Vec<usize> = (0..NODES).collect();
        lab.write_manifest(
            "lb.yaml",
            &lb_service("lb", &cluster(), &[v4, v6], &all, false),
        )?;
        lab.start_all()?;
        for vip in [v4, v6] {
            let n = lab.wait_one_answer(vip, Duration::from_secs(10))?;
            ensure!(
                n == owner,
                "{vip} answered by {}, the hash says {}",
                node_name(n),
                node_name(owner)
            );
            only(lab, vip, owner, 5)?;
        }
        // An address of no Service gets no answer.
        ensure!(
            lab.who_answers(ip("10.250.0.250"), Duration::from_millis(300))?
                .is_empty()
        );
        for vip in [v4, v6] {
            let r = connect(lab, vip, 60)?;
            eprintln!("{}", r.summary());
            ensure!(r.ok == 60 && r.failed == 0, "{}", r.summary());
            let pods: Vec<String> = (0..NODES).map(pod_name).collect();
            ensure!(
                r.backends.keys().all(|k| pods.contains(k)) && r.backends.len() >= 2,
                "replies from {:?}",
                r.backends
            );
        }
        // Every agent logged the same choice: only the owner announces.
        for i in 0..NODES {
            let n = lab.log_count(i, &["L2 announcement: announcing"])?;
            ensure!(
                n == if i == owner { 2 } else { 0 },
                "{} announced {n} addresses",
                node_name(i)
            );
        }
        Ok(())
    });
}

#[test]
fn local_policy_is_announced_only_by_the_node_with_the_endpoint() {
    run_l2_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        let (v4, v6, owner) = vips_won_by_one_node();
        // The endpoint on a node the hash would not pick among all three.
        let with_endpoint = (owner + 1) % NODES;
        lab.write_manifest(
            "lb.yaml",
            &lb_service("local", &cluster(), &[v4, v6], &[with_endpoint], true),
        )?;
        lab.start_all()?;
        for vip in [v4, v6] {
            let n = lab.wait_one_answer(vip, Duration::from_secs(10))?;
            ensure!(n == with_endpoint, "{vip} answered by {}", node_name(n));
            only(lab, vip, with_endpoint, 5)?;
            let r = connect(lab, vip, 30)?;
            eprintln!("{}", r.summary());
            ensure!(
                r.ok == 30 && r.count(&pod_name(with_endpoint)) == 30,
                "{}",
                r.summary()
            );
        }
        Ok(())
    });
}

#[test]
fn failover_within_two_seconds_and_one_move_back() {
    run_l2_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        let (v4, v6, owner) = vips_won_by_one_node();
        // Backends only on the survivors: the outage measured is the announcement's.
        let others: Vec<usize> = (0..NODES).filter(|i| *i != owner).collect();
        lab.write_manifest(
            "lb.yaml",
            &lb_service("lb", &cluster(), &[v4, v6], &others, false),
        )?;
        lab.start_all()?;
        for vip in [v4, v6] {
            ensure!(lab.wait_one_answer(vip, Duration::from_secs(10))? == owner);
        }
        let heir = |vip: IpAddr| hrw(vip, &others);
        let loop_for = |lab: &L2Lab, vip: IpAddr| {
            let mut o = lab.client(SocketAddr::new(vip, 80), Proto::Tcp);
            o.count = 0;
            o.duration = Some(Duration::from_secs(7));
            o.interval = Duration::from_millis(20);
            o.timeout = Duration::from_millis(300);
            o.timeline = true;
            lab.spawn_client(&o)
        };

        // Agents start one after the other, so the first one announced alone for a
        // while: count moves from here on.
        let moves = |lab: &mut L2Lab, i: usize, vip: IpAddr| -> Result<[usize; 2]> {
            let ip_s = vip.to_string();
            Ok([
                lab.log_count(i, &["L2 announcement: announcing", &ip_s])?,
                lab.log_count(i, &["L2 announcement: released", &ip_s])?,
            ])
        };
        let mut before = BTreeMap::new();
        for vip in [v4, v6] {
            before.insert(vip, moves(lab, heir(vip), vip)?);
        }

        // The owner dies.
        let runs = [loop_for(lab, v4)?, loop_for(lab, v6)?];
        std::thread::sleep(Duration::from_secs(2));
        lab.kill_node(owner)?;
        let mut outages = BTreeMap::new();
        for (vip, run) in [v4, v6].into_iter().zip(runs) {
            let r = run.wait()?;
            let out = outage_ms(&r);
            eprintln!("owner died: {} ; outage {out} ms", r.summary());
            outages.insert(vip, out);
            // The owner's death must be visible to the client (else this measures
            // nothing), and short.
            ensure!(
                r.failed > 0,
                "{vip}: no failure at all: the client did not go through {}",
                node_name(owner)
            );
            ensure!(
                out <= 2000,
                "{vip}: {out} ms without a connection after {} died",
                node_name(owner)
            );
        }
        for vip in [v4, v6] {
            only(lab, vip, heir(vip), 3)?;
        }

        // It comes back: one move back to it (the hash prefers it), no outage, no flap.
        let runs = [loop_for(lab, v4)?, loop_for(lab, v6)?];
        std::thread::sleep(Duration::from_secs(1));
        lab.revive_node(owner)?;
        for (vip, run) in [v4, v6].into_iter().zip(runs) {
            let r = run.wait()?;
            let out = outage_ms(&r);
            eprintln!("owner back: {} ; longest gap {out} ms", r.summary());
            ensure!(
                out <= 2000,
                "{vip}: {out} ms without a connection when {} came back",
                node_name(owner)
            );
        }
        for vip in [v4, v6] {
            only(lab, vip, owner, 3)?;
        }
        for vip in [v4, v6] {
            let h = heir(vip);
            let [took, released] = moves(lab, h, vip)?;
            let [took0, released0] = before[&vip];
            let retook = moves(lab, owner, vip)?[0];
            ensure!(
                took - took0 == 1 && released - released0 == 1 && retook == 1,
                "{vip}: {} took it {}x and released it {}x; {} took it back {retook}x",
                node_name(h),
                took - took0,
                released - released0,
                node_name(owner)
            );
        }
        eprintln!("outages: {outages:?}");
        Ok(())
    });
}
