//! Privileged end-to-end tests of L2 announcement (`--l2-announce`): three nodes and an
//! external client on one bridged segment (see `tests/src/l2lab.rs`), each node with its
//! own agent in manifest mode reading the same directory (three Node objects, the
//! Services). The load-balancer IPs sit on the segment's subnet, so the client resolves
//! them with ARP and NDP, and the tests count who answers. The `kube_mode_` test runs
//! the same lab in Kubernetes mode: the agents watch the fake API server, which listens
//! on the segment.
//!
//! Run as root, one at a time:
//! `cargo test --release -p svc-lb-tests --features e2e --test l2 -- --test-threads=1`.
#![cfg(feature = "e2e")]

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, bail, ensure};
use serde_json::json;
use svc_lb_tests::{
    l2lab::{
        L2Lab, NODES, hrw, lb_objects, lb_service, node_name, outage_ms, pod_name, run_l2_lab,
        vips_won_by_one_node,
    },
    report::Proto,
};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP address")
}

const CLUSTER: [&str; 2] = ["10.96.0.10", "fd00:96::10"];

fn cluster() -> Vec<IpAddr> {
    CLUSTER.iter().map(|s| ip(s)).collect()
}

/// Writes one LoadBalancer Service for both families' addresses with its endpoints on
/// `backends`, starts every node, and checks that the node the hash picks (`want`)
/// answers for each address; the shared first step of most tests here.
fn announce(
    lab: &mut L2Lab,
    vips: &[IpAddr],
    backends: &[usize],
    local: bool,
    want: usize,
) -> Result<()> {
    let name = if local { "local" } else { "lb" };
    lab.write_manifest(
        "lb.yaml",
        &lb_service(name, &cluster(), vips, backends, local),
    )?;
    lab.start_all()?;
    for vip in vips {
        let n = lab.wait_one_answer(*vip, Duration::from_secs(10))?;
        ensure!(
            n == want,
            "{vip} answered by {}, the hash says {}",
            node_name(n),
            node_name(want)
        );
    }
    Ok(())
}

#[test]
fn arp_and_ndp_are_answered_by_exactly_one_node_and_connections_succeed() {
    run_l2_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        let (v4, v6, owner) = vips_won_by_one_node();
        let all: Vec<usize> = (0..NODES).collect();
        announce(lab, &[v4, v6], &all, false, owner)?;
        for vip in [v4, v6] {
            lab.only(vip, owner, 5)?;
        }
        // An address of no Service gets no answer.
        ensure!(
            lab.who_answers(ip("10.250.0.250"), Duration::from_millis(300))?
                .is_empty()
        );
        for vip in [v4, v6] {
            let r = lab.connect(vip, 60)?;
            eprintln!("{}", r.summary());
            ensure!(r.ok == 60 && r.failed == 0, "{}", r.summary());
            let pods: Vec<String> = (0..NODES).map(pod_name).collect();
            ensure!(
                r.backends.keys().all(|k| pods.contains(k)) && r.backends.len() >= 2,
                "replies from {:?}",
                r.backends
            );
        }
        // Every agent logged the same choice: only the owner announces. Agents start
        // one after the other, and one that has run for the heartbeat's rise time before
        // its peers started is alone and announces everything until it hears them: so
        // what counts is each node's log at the end (announced minus released, per
        // address), and that the owner never released once it took them.
        for i in 0..NODES {
            for vip in [v4, v6] {
                let ip_s = vip.to_string();
                let took = lab.log_count(i, &["L2 announcement: announcing", &ip_s])?;
                let released = lab.log_count(i, &["L2 announcement: released", &ip_s])?;
                let want = if i == owner {
                    (1, 0)
                } else {
                    (released, released)
                };
                ensure!(
                    (took, released) == want && released <= 1,
                    "{} {vip}: announced {took}x, released {released}x",
                    node_name(i)
                );
            }
        }
        Ok(())
    });
}

/// `aa:bb:...` (lower case), as the tools print a MAC address modulo case.
fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The MAC addresses in `text`'s lines that contain `marker`, lower-cased: arping's
/// `Unicast reply from IP [MAC]` and ndisc6's `Target link-layer address: MAC`.
fn macs_in(text: &str, marker: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| {
            l.split(|c: char| c.is_whitespace() || c == '[' || c == ']')
                .find(|w| w.len() == 17 && w.matches(':').count() == 5)
                .map(str::to_ascii_lowercase)
        })
        .collect()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Standard tools on a machine that knows nothing of svc-lb: iputils `arping` gets
/// exactly one answer per request, from the announcing node's MAC, and `curl` reaches
/// the pods over both families (ndisc6: the test below). Then the
/// operator's view: the metrics, `svc-lb list` and `svc-lb status` of the nodes name the
/// same announcer.
#[test]
fn foreign_clients_arping_and_curl_see_exactly_one_node() {
    run_l2_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        let (v4, v6, owner) = vips_won_by_one_node();
        let all: Vec<usize> = (0..NODES).collect();
        announce(lab, &[v4, v6], &all, false, owner)?;
        let want = mac_str(lab.node_macs()?[owner]);

        let probes = 3;
        let v4s = v4.to_string();
        let arping = lab.in_client(
            "arping",
            &["-c", "3", "-w", "5", "-I", "eth0", v4s.as_str()].map(str::to_owned),
        )?;
        let out = text(&arping);
        eprintln!("arping:\n{out}");
        let got = macs_in(&out, "reply from");
        ensure!(
            arping.status.success() && got.len() == probes && got.iter().all(|m| *m == want),
            "arping {v4}: want {probes} replies from {want} ({}), got {got:?}",
            node_name(owner)
        );

        // curl: --http0.9 because the pods answer with their name only.
        for vip in [v4, v6] {
            let url = format!("http://{}/", SocketAddr::new(vip, 80));
            let mut seen: BTreeMap<String, u64> = BTreeMap::new();
            let mut failed = 0;
            for _ in 0..20 {
                let o = lab.in_client(
                    "curl",
                    &["-sS", "-g", "--http0.9", "--max-time", "3", url.as_str()].map(str::to_owned),
                )?;
                if o.status.success() {
                    // The pod answers "<name> <peer address>".
                    let body = String::from_utf8_lossy(&o.stdout);
                    let pod = body.split_whitespace().next().unwrap_or_default();
                    *seen.entry(pod.to_owned()).or_default() += 1;
                } else {
                    failed += 1;
                    eprintln!("curl {url}: {}", text(&o));
                }
            }
            eprintln!("curl {url}: {seen:?}, failed {failed}");
            let pods: Vec<String> = (0..NODES).map(pod_name).collect();
            ensure!(
                failed == 0
                    && seen.values().sum::<u64>() == 20
                    && seen.keys().all(|k| pods.contains(k)),
                "curl {url}: {seen:?}, failed {failed}"
            );
        }

        // Metrics: only the owner announces, and it counted the answers above.
        for i in 0..NODES {
            let m = lab.metrics(i)?;
            let get = |k: &str| m.get(k).copied().unwrap_or(-1.0);
            let mine = if i == owner { 1.0 } else { 0.0 };
            for fam in ["ipv4", "ipv6"] {
                let k = format!("svclb_l2_announced_addresses{{family=\"{fam}\"}}");
                ensure!(get(&k) == mine, "{}: {k} = {}", node_name(i), get(&k));
            }
            let arp = get("svclb_l2_replies_total{proto=\"arp\"}");
            let ndp = get("svclb_l2_replies_total{proto=\"ndp\"}");
            if i == owner {
                ensure!(
                    arp >= probes as f64 && ndp >= 1.0,
                    "{}: replies arp {arp} ndp {ndp}",
                    node_name(i)
                );
                ensure!(
                    get("svclb_l2_takeovers_total") >= 2.0,
                    "{}: takeovers",
                    node_name(i)
                );
                ensure!(
                    get("svclb_l2_gratuitous_total{family=\"ipv4\"}") >= 1.0,
                    "{}: gratuitous",
                    node_name(i)
                );
            } else {
                ensure!(
                    arp == 0.0 && ndp == 0.0,
                    "{}: replies arp {arp} ndp {ndp}",
                    node_name(i)
                );
            }
            ensure!(
                get("svclb_l2_live_nodes") == NODES as f64,
                "{}: live nodes {}",
                node_name(i),
                get("svclb_l2_live_nodes")
            );
        }

        // `svc-lb list` on another node names the owner for both addresses (socket and
        // external entries alike); `svc-lb status` on the owner shows its two.
        let other = (owner + 1) % NODES;
        let o = lab.svc_lb_on(other, &["list", "-o", "json"])?;
        ensure!(o.status.success(), "svc-lb list: {}", text(&o));
        let entries: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout)?;
        for vip in [v4, v6] {
            let lb: Vec<&serde_json::Value> = entries
                .iter()
                .filter(|e| e["address"] == vip.to_string().as_str() && e["kind"] == "LoadBalancer")
                .collect();
            ensure!(
                !lb.is_empty()
                    && lb
                        .iter()
                        .all(|e| e["announced_by"] == node_name(owner).as_str()),
                "svc-lb list on {}: {vip} entries {lb:?}",
                node_name(other)
            );
        }
        let o = lab.svc_lb_on(other, &["list"])?;
        let list = text(&o);
        ensure!(
            list.matches(&format!("l2={}", node_name(owner))).count() >= 2,
            "svc-lb list text:\n{list}"
        );
        let o = lab.svc_lb_on(owner, &["status"])?;
        let status = text(&o);
        eprintln!("svc-lb status on the owner:\n{status}");
        ensure!(
            status.contains("L2 announcement: this node answers for 2 of 2 addresses"),
            "svc-lb status on {}:\n{status}",
            node_name(owner)
        );
        Ok(())
    });
}

/// ndisc6 (a foreign IPv6 client's own Neighbor Solicitation, from its link-local
/// address) gets exactly one answer, from the owner's MAC. ndisc6 drops an answer
/// whose source address has a scope the target has not: the responder once answered
/// from its link-local address, and ndisc6 received the advertisement (strace) and
/// still said "No response". It now answers from the target address, as Linux does.
#[test]
fn ndisc6_from_a_foreign_client_gets_one_answer_from_the_owner() {
    run_l2_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        let (v4, v6, owner) = vips_won_by_one_node();
        let all: Vec<usize> = (0..NODES).collect();
        announce(lab, &[v4, v6], &all, false, owner)?;
        // The takeover's unsolicited advertisements (repeated up to 1 s after it) are
        // over: ndisc6 shows every advertisement for the target, asked for or not.
        std::thread::sleep(Duration::from_millis(1500));
        let want = mac_str(lab.node_macs()?[owner]);
        let v6s = v6.to_string();
        // One solicitation (-r 1), every answer within a second shown (-m).
        let ndisc = lab.in_client(
            "ndisc6",
            &["-m", "-n", "-r", "1", "-w", "1000", v6s.as_str(), "eth0"].map(str::to_owned),
        )?;
        let out = text(&ndisc);
        eprintln!("ndisc6:\n{out}");
        let got = macs_in(&out, "Target link-layer address");
        ensure!(
            ndisc.status.success() && got == vec![want.clone()],
            "ndisc6 {v6}: want one answer from {want} ({}), got {got:?}",
            node_name(owner)
        );

        Ok(())
    });
}

#[test]
fn local_policy_is_announced_only_by_the_node_with_the_endpoint() {
    run_l2_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        let (v4, v6, owner) = vips_won_by_one_node();
        // The endpoint on a node the hash would not pick among all three.
        let with_endpoint = (owner + 1) % NODES;
        announce(lab, &[v4, v6], &[with_endpoint], true, with_endpoint)?;
        for vip in [v4, v6] {
            lab.only(vip, with_endpoint, 5)?;
            let r = lab.connect(vip, 30)?;
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
        announce(lab, &[v4, v6], &others, false, owner)?;
        let heir = |vip: IpAddr| hrw(vip, &others);

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

        // The owner dies, while a forger without the key claims it is alive: the
        // authenticated heartbeat must not let that delay the failover.
        let runs = [lab.client_loop(v4, 7)?, lab.client_loop(v6, 7)?];
        std::thread::sleep(Duration::from_secs(2));
        lab.kill_node(owner)?;
        let forger = lab.forge_heartbeats(owner, 4);
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
            lab.only(vip, heir(vip), 3)?;
        }
        let forged = forger
            .join()
            .map_err(|_| anyhow::anyhow!("the forger panicked"))??;
        for i in others.iter().copied() {
            let m = lab.metrics(i)?;
            let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
            let plain = get("svclb_l2_heartbeats_rejected_total{reason=\"key_mismatch\"}");
            let bad_tag = get("svclb_l2_heartbeats_rejected_total{reason=\"bad_tag\"}");
            ensure!(
                plain > 0.0 && bad_tag > 0.0,
                "{}: forged heartbeats refused: {plain} plain, {bad_tag} with a bad tag (the forger sent {forged})",
                node_name(i)
            );
        }

        // It comes back: one move back to it (the hash prefers it), no outage, no flap.
        let runs = [lab.client_loop(v4, 7)?, lab.client_loop(v6, 7)?];
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
            lab.only(vip, owner, 3)?;
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

/// A key rotation done the way the README describes it (`OLD`, `OLD NEW`, `NEW OLD`,
/// `NEW`), one node after the other as the kubelet updates the Secret, moves no address
/// and refuses no heartbeat; invalid key files on one node (a short key, over 4 KiB)
/// are refused by it and change nothing; a node left on the old key alone is then
/// refused, so the agents really changed keys.
#[test]
fn heartbeat_key_rotation_node_by_node_moves_no_address() {
    run_l2_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        let (v4, v6, owner) = vips_won_by_one_node();
        let all: Vec<usize> = (0..NODES).collect();
        announce(lab, &[v4, v6], &all, false, owner)?;
        let moves = |lab: &mut L2Lab| -> Result<Vec<usize>> {
            (0..NODES)
                .map(|i| {
                    Ok(lab.log_count(i, &["L2 announcement: announcing"])?
                        + lab.log_count(i, &["L2 announcement: released"])?)
                })
                .collect()
        };
        let before = moves(lab)?;

        let old = lab.heartbeat_key().to_owned();
        let new = format!("{old}-rotated");
        let runs = [lab.client_loop(v4, 8)?, lab.client_loop(v6, 8)?];
        let steps = [
            format!("{old}\n{new}\n"),
            format!("{new}\n{old}\n"),
            format!("{new}\n"),
        ];
        for (n, content) in steps.iter().enumerate() {
            for i in 0..NODES {
                lab.write_heartbeat_keys(i, content)?;
                // Nodes take the new file at different times, as they do in a cluster.
                std::thread::sleep(Duration::from_millis(300));
            }
            for i in 0..NODES {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while lab.log_count(i, &["heartbeat keys reloaded"])? < n + 1 {
                    ensure!(
                        std::time::Instant::now() < deadline,
                        "{} did not reload its key file for step {}",
                        node_name(i),
                        n + 1
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        for (vip, run) in [v4, v6].into_iter().zip(runs) {
            let r = run.wait()?;
            eprintln!("{vip} during the rotation: {}", r.summary());
            ensure!(
                r.ok > 0 && r.failed == 0,
                "{vip}: {} of {} connections failed during the rotation",
                r.failed,
                r.ok + r.failed
            );
        }
        ensure!(
            moves(lab)? == before,
            "addresses moved during the rotation: {before:?} -> {:?}",
            moves(lab)?
        );
        for i in 0..NODES {
            let m = lab.metrics(i)?;
            let refused: f64 = m
                .iter()
                .filter(|(k, _)| k.starts_with("svclb_l2_heartbeats_rejected_total"))
                .map(|(_, v)| *v)
                .sum();
            ensure!(
                refused == 0.0,
                "{} refused {refused} heartbeats during the rotation",
                node_name(i)
            );
            ensure!(
                m.get("svclb_l2_live_nodes").copied() == Some(NODES as f64),
                "{}: live nodes {:?}",
                node_name(i),
                m.get("svclb_l2_live_nodes")
            );
        }
        for vip in [v4, v6] {
            lab.only(vip, owner, 3)?;
        }

        // Invalid key files on one node (a short key, a file over the 4 KiB limit): it
        // logs each and keeps signing with the keys in use, so the others still take its
        // heartbeats and nothing moves.
        let stale = (owner + 1) % NODES;
        let refusals = |lab: &mut L2Lab| lab.log_count(stale, &["keeping the keys in use"]);
        let big = format!("{new}\n").repeat(4096 / new.len() + 1);
        for (n, content) in ["short\n".to_owned(), big].iter().enumerate() {
            lab.write_heartbeat_keys(stale, content)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while refusals(lab)? < n + 1 {
                ensure!(
                    std::time::Instant::now() < deadline,
                    "{} did not refuse invalid key file {}",
                    node_name(stale),
                    n + 1
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Past the 700 ms a silent peer takes to count as dead.
        std::thread::sleep(Duration::from_secs(1));
        for i in 0..NODES {
            let m = lab.metrics(i)?;
            let refused: f64 = m
                .iter()
                .filter(|(k, _)| k.starts_with("svclb_l2_heartbeats_rejected_total"))
                .map(|(_, v)| *v)
                .sum();
            ensure!(
                refused == 0.0 && m.get("svclb_l2_live_nodes").copied() == Some(NODES as f64),
                "{} after {}'s invalid key files: {refused} heartbeats refused, live nodes {:?}",
                node_name(i),
                node_name(stale),
                m.get("svclb_l2_live_nodes")
            );
        }
        ensure!(
            moves(lab)? == before,
            "addresses moved after invalid key files: {before:?} -> {:?}",
            moves(lab)?
        );

        // A node put back on the old key alone: the others refuse it now (so it still
        // reloads after the invalid files).
        lab.write_heartbeat_keys(stale, &old)?;
        std::thread::sleep(Duration::from_secs(1));
        for i in (0..NODES).filter(|i| *i != stale) {
            let bad_tag = lab
                .metrics(i)?
                .get("svclb_l2_heartbeats_rejected_total{reason=\"bad_tag\"}")
                .copied()
                .unwrap_or(0.0);
            ensure!(
                bad_tag > 0.0,
                "{} still takes {}'s heartbeats signed with the old key",
                node_name(i),
                node_name(stale)
            );
        }
        Ok(())
    });
}

/// The IPs of Service `name`'s `status.loadBalancer.ingress` in the fake API server.
fn ingress(lab: &L2Lab, name: &str) -> Result<Vec<IpAddr>> {
    let svc = lab.api()?.get("Service", "default", name);
    Ok(svc
        .and_then(|s| {
            s["status"]["loadBalancer"]["ingress"].as_array().map(|a| {
                a.iter()
                    .filter_map(|i| i["ip"].as_str().and_then(|s| s.parse().ok()))
                    .collect()
            })
        })
        .unwrap_or_default())
}

/// Waits until Service `name`'s status lists exactly `want` (in any order).
fn wait_ingress(lab: &L2Lab, name: &str, want: &[IpAddr]) -> Result<()> {
    let start = std::time::Instant::now();
    let want: std::collections::BTreeSet<IpAddr> = want.iter().copied().collect();
    loop {
        let got = ingress(lab, name)?;
        if got.len() == want.len() && got.iter().all(|g| want.contains(g)) {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(15) {
            bail!("{name}: status.loadBalancer.ingress is {got:?}, want {want:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

const WROTE: &str = "LB-IPAM: wrote status.loadBalancer.ingress";
const PENDING: &str = "load-balancer address pending";
const SHARE: &str = "metallb.universe.tf/allow-shared-ip";

/// Kubernetes mode end to end: the three agents run with `--kubeconfig` against the
/// fake API server (on the segment), and every object is an API object: the Nodes, a
/// MetalLB IPAddressPool with an L2Advertisement, the Services and EndpointSlices. The
/// elected agent writes the pool's addresses into the statuses (once each: a requested
/// address first, then the lowest free ones in name order, one address shared by two
/// Services with one allow-shared-ip key; the exhausted pool's last Service stays
/// pending, warned about by the leader only; the operator's view agrees); exactly
/// one node answers ARP and NDP for each address, the hash's choice (for the `Local`
/// Service: the node with its endpoint); connections over both families land on the
/// backends; the announcing node dies and the client's connections succeed through
/// another node within 2 s, with no API write.
#[test]
fn kube_mode_pool_addresses_are_written_announced_by_one_node_and_fail_over() {
    run_l2_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        let (v4, v6, owner) = vips_won_by_one_node();
        let all: Vec<usize> = (0..NODES).collect();
        // Backends only on the survivors: the outage measured is the announcement's.
        let others: Vec<usize> = all.iter().copied().filter(|i| *i != owner).collect();
        // The pool's second IPv4 address goes to the `Local` Service (name order);
        // its endpoint is on a node the hash would not pick among all three.
        let v4_local = ip("10.250.0.201");
        let with_endpoint = (hrw(v4_local, &all) + 1) % NODES;
        // `req` asks for the pool's last address, which name order alone would give
        // `sh-a`; `sh-a` (port 80) and `sh-b` (port 81) share the next free one.
        let (v4_req, v4_shared) = (ip("10.250.0.203"), ip("10.250.0.202"));
        let api = lab.use_kube_api()?;
        api.apply(json!({
            "apiVersion": "metallb.io/v1beta1",
            "kind": "IPAddressPool",
            "metadata": {"name": "lan", "namespace": "metallb-system"},
            "spec": {"addresses": [format!("{v4}-{v4_req}"), format!("{v6}/128")]},
        }))?;
        api.apply(json!({
            "apiVersion": "metallb.io/v1beta1",
            "kind": "L2Advertisement",
            "metadata": {"name": "lan", "namespace": "metallb-system"},
            "spec": {"ipAddressPools": ["lan"]},
        }))?;
        let annotated = |name: &str, cluster: &str, key: &str, value: &str, port: u16| {
            let mut o = lb_objects(name, &[ip(cluster)], &[], &others, false);
            o[0]["metadata"]["annotations"] = json!({ key: value });
            o[0]["spec"]["ports"][0]["port"] = json!(port);
            o
        };
        let services = [
            lb_objects("lb", &cluster(), &[], &others, false),
            lb_objects("local", &[ip("10.96.0.11")], &[], &[with_endpoint], true),
            annotated(
                "req",
                "10.96.0.13",
                "metallb.universe.tf/loadBalancerIPs",
                &v4_req.to_string(),
                80,
            ),
            annotated("sh-a", "10.96.0.14", SHARE, "k", 80),
            annotated("sh-b", "10.96.0.15", SHARE, "k", 81),
            // Nothing left in the pool for it.
            lb_objects("zz-pending", &[ip("10.96.0.12")], &[], &others, false),
        ];
        for o in services.into_iter().flatten() {
            api.apply(o)?;
        }
        // node-1 starts first and takes the Lease.
        lab.start_all()?;
        wait_ingress(lab, "lb", &[v4, v6])?;
        wait_ingress(lab, "local", &[v4_local])?;
        wait_ingress(lab, "req", &[v4_req])?;
        wait_ingress(lab, "sh-a", &[v4_shared])?;
        wait_ingress(lab, "sh-b", &[v4_shared])?;

        for vip in [v4, v6] {
            let n = lab.wait_one_answer(vip, Duration::from_secs(10))?;
            ensure!(
                n == owner,
                "{vip} answered by {}, the hash says {}",
                node_name(n),
                node_name(owner)
            );
            lab.only(vip, owner, 3)?;
            let r = lab.connect(vip, 40)?;
            eprintln!("{vip}: {}", r.summary());
            let want: Vec<String> = others.iter().map(|i| pod_name(*i)).collect();
            ensure!(
                r.ok == 40
                    && r.failed == 0
                    && want.iter().all(|p| r.count(p) > 0)
                    && want.iter().map(|p| r.count(p)).sum::<u64>() == 40,
                "{vip}: {}",
                r.summary()
            );
        }
        let n = lab.wait_one_answer(v4_local, Duration::from_secs(10))?;
        ensure!(
            n == with_endpoint,
            "{v4_local} (Local) answered by {}",
            node_name(n)
        );
        lab.only(v4_local, with_endpoint, 3)?;
        let r = lab.connect(v4_local, 20)?;
        ensure!(
            r.ok == 20 && r.count(&pod_name(with_endpoint)) == 20,
            "{v4_local}: {}",
            r.summary()
        );
        // The requested and the shared address: one answer each, and both ports of the
        // shared one serve.
        for (vip, port) in [(v4_req, 80), (v4_shared, 80), (v4_shared, 81)] {
            let n = lab.wait_one_answer(vip, Duration::from_secs(10))?;
            ensure!(n == hrw(vip, &all), "{vip} answered by {}", node_name(n));
            let mut o = lab.client(SocketAddr::new(vip, port), Proto::Tcp);
            o.count = 20;
            let r = lab.run_client(&o)?;
            ensure!(
                r.ok == 20 && others.iter().map(|i| r.count(&pod_name(*i))).sum::<u64>() == 20,
                "{vip}:{port}: {}",
                r.summary()
            );
        }

        // One writer, one write per Service; the pending one is the leader's to warn
        // about (the others log it at debug).
        let lease = lab.api()?.get("Lease", "default", "svc-lb-lbipam");
        let holder = lease
            .as_ref()
            .and_then(|l| l["spec"]["holderIdentity"].as_str())
            .unwrap_or_default()
            .to_owned();
        ensure!(holder == node_name(0), "Lease holder {holder:?}");
        ensure!(ingress(lab, "zz-pending")?.is_empty());
        for i in 0..NODES {
            let (wrote, pending) = (
                lab.log_count(i, &[WROTE])?,
                lab.log_count(i, &[PENDING, "zz-pending", "WARN"])?,
            );
            let want_wrote = if i == 0 { 5 } else { 0 };
            ensure!(
                wrote == want_wrote && (pending > 0) == (i == 0),
                "{}: {wrote} status writes, {pending} pending warnings",
                node_name(i)
            );
        }
        let patches = lab.api()?.counters().status_patches_total();
        ensure!(patches == 5, "{patches} status patches");

        // The operator's view on every node: the pool full, one Service pending, the
        // leader flag on node-1 only; `svc-lb list` names each address's pool and
        // announcer.
        for i in 0..NODES {
            let m = lab.metrics(i)?;
            let get = |k: &str| m.get(k).copied().unwrap_or(-1.0);
            let leader = if i == 0 { 1.0 } else { 0.0 };
            // Four IPv4 addresses and one IPv6, the shared one counted once.
            let seen = [
                get("svclb_lb_pool_addresses{pool=\"lan\",state=\"used\"}"),
                get("svclb_lb_pool_addresses{pool=\"lan\",state=\"free\"}"),
                get("svclb_lb_pending_services"),
                get("svclb_lb_ipam_leader"),
            ];
            ensure!(
                seen == [5.0, 0.0, 1.0, leader],
                "{}: used, free, pending, leader = {seen:?}",
                node_name(i)
            );
            if i == owner {
                // It took both over (gratuitous ARP, unsolicited NA) and answered the
                // probes above.
                let said = [
                    get("svclb_l2_gratuitous_total{family=\"ipv4\"}"),
                    get("svclb_l2_gratuitous_total{family=\"ipv6\"}"),
                    get("svclb_l2_replies_total{proto=\"arp\"}"),
                    get("svclb_l2_replies_total{proto=\"ndp\"}"),
                ];
                ensure!(
                    said.iter().all(|n| *n >= 1.0),
                    "{}: gratuitous v4, v6, replies arp, ndp = {said:?}",
                    node_name(i)
                );
            }
            let o = lab.svc_lb_on(i, &["list", "-o", "json"])?;
            ensure!(o.status.success(), "svc-lb list: {}", text(&o));
            let entries: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout)?;
            for (vip, by) in [
                (v4, owner),
                (v6, owner),
                (v4_local, with_endpoint),
                (v4_shared, hrw(v4_shared, &all)),
            ] {
                let lb: Vec<&serde_json::Value> = entries
                    .iter()
                    .filter(|e| {
                        e["address"] == vip.to_string().as_str() && e["kind"] == "LoadBalancer"
                    })
                    .collect();
                ensure!(
                    !lb.is_empty()
                        && lb
                            .iter()
                            .all(|e| e["pool"] == "lan"
                                && e["announced_by"] == node_name(by).as_str()),
                    "svc-lb list on {}: {vip} entries {lb:?}",
                    node_name(i)
                );
            }
        }
        let status = text(&lab.svc_lb_on(0, &["status"])?);
        ensure!(
            status.contains("LoadBalancer address pools")
                && status.contains("default/zz-pending: "),
            "svc-lb status on node-1:\n{status}"
        );

        // The owner dies. Each heir announces its address at once (three gratuitous
        // ARPs or unsolicited NAs per takeover).
        let gratuitous = |lab: &L2Lab, vip: IpAddr| -> Result<f64> {
            let fam = if vip.is_ipv6() { "ipv6" } else { "ipv4" };
            let k = format!("svclb_l2_gratuitous_total{{family=\"{fam}\"}}");
            Ok(lab
                .metrics(hrw(vip, &others))?
                .get(&k)
                .copied()
                .unwrap_or(0.0))
        };
        let sent_before = [gratuitous(lab, v4)?, gratuitous(lab, v6)?];
        let runs = [lab.client_loop(v4, 7)?, lab.client_loop(v6, 7)?];
        std::thread::sleep(Duration::from_secs(2));
        lab.kill_node(owner)?;
        for (vip, run) in [v4, v6].into_iter().zip(runs) {
            let r = run.wait()?;
            let out = outage_ms(&r);
            eprintln!("owner died: {vip}: {} ; outage {out} ms", r.summary());
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
            lab.only(vip, hrw(vip, &others), 3)?;
        }
        for (vip, before) in [v4, v6].into_iter().zip(sent_before) {
            let after = gratuitous(lab, vip)?;
            ensure!(
                after >= before + 3.0,
                "{vip}: the heir sent {} gratuitous announcements",
                after - before
            );
        }
        // The move cost no API write: the statuses still say the same.
        ensure!(lab.api()?.counters().status_patches_total() == patches);
        wait_ingress(lab, "lb", &[v4, v6])?;
        Ok(())
    });
}
