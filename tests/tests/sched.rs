//! Schedulers and endpoint weights (issue 15) through the real socket programs: a client
//! in the lab's client namespace dials a Service VIP thousands of times and counts which
//! backend answered each connection.
//!
//! Run as root, one at a time:
//! `cargo test --release -p svc-lb-tests --features e2e --test sched -- --test-threads=1`.
#![cfg(feature = "e2e")]

use std::{net::IpAddr, time::Duration};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use svc_lb_tests::ip;
use svc_lb_tests::{
    ClientReport, Lab, Proto,
    lab::with_lab,
    manifests::{EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
    sa,
};

const NS: &str = "sched";

fn sched(ids: &[&str], body: impl FnOnce(&mut Lab) -> Result<()>) {
    with_lab(env!("CARGO_BIN_EXE_svclb-harness"), ids, body);
}

/// A TCP Service `name` at `vip`:80 → 8080 with endpoints `addrs`, the scheduler
/// annotation `scheduler` (none when `None`) and the weights annotation built from
/// `weights` (address, weight): the Service and its slice.
fn service(
    name: &str,
    vip: &str,
    addrs: &[IpAddr],
    scheduler: Option<&str>,
    weights: &[(IpAddr, u32)],
) -> [Value; 2] {
    let mut svc = Service::new(NS, name, &[ip(vip)])
        .port("http", 80, TargetPort::Number(8080), Protocol::Tcp)
        .to_value();
    if let Some(s) = scheduler {
        svc["metadata"]["annotations"] = json!({ "svc-lb.io/scheduler": s });
    }
    let mut slice = EndpointSlice::new(NS, name, "w8t", false)
        .port("http", 8080, Protocol::Tcp)
        .ready_endpoints(addrs)
        .to_value();
    if !weights.is_empty() {
        let w: Vec<String> = weights.iter().map(|(a, w)| format!("{a}={w}")).collect();
        slice["metadata"]["annotations"]["svc-lb.io/weights"] = json!(w.join(","));
    }
    [svc, slice]
}

/// Every attempt answered; replies only from the backends in `want`, each within ±15 %
/// (relative) of its share of the weights.
fn assert_shares(r: &ClientReport, want: &[(&str, u32)]) -> Result<()> {
    ensure!(
        r.failed == 0 && r.ok == r.attempts,
        "failures: {}\nfirst failures: {:?}",
        r.summary(),
        r.failure_samples
    );
    let total: u32 = want.iter().map(|(_, w)| w).sum();
    for id in r.backends.keys() {
        ensure!(
            want.iter().any(|(w, weight)| w == id && *weight > 0),
            "backend {id} answered but has no share: {}",
            r.summary()
        );
    }
    for (id, w) in want {
        let expect = f64::from(*w) / f64::from(total) * r.ok as f64;
        let got = r.count(id) as f64;
        ensure!(
            (got - expect).abs() <= 0.15 * expect,
            "backend {id}: {got} replies, expected {expect:.0} ± 15 %: {}",
            r.summary()
        );
    }
    Ok(())
}

fn run(lab: &Lab, vip: &str, count: u64, timeline: bool) -> Result<ClientReport> {
    let mut o = lab.client(sa(&format!("{vip}:80")), Proto::Tcp);
    o.count = count;
    o.timeline = timeline;
    let r = lab.run_client(&o)?;
    eprintln!("{vip}: {}", r.summary());
    Ok(r)
}

/// The `list -o json` entry of the socket frontend at `vip`:80.
fn listed(lab: &Lab, vip: &str) -> Result<Value> {
    let out = lab.svc_lb(&["list", "-o", "json"])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "svc-lb list failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&stdout).with_context(|| format!("parse: {stdout}"))?;
    v.as_array()
        .context("list -o json is not an array")?
        .iter()
        .find(|f| f["address"] == vip && f["port"] == 80 && f["scope"] == "socket")
        .cloned()
        .with_context(|| format!("no socket frontend {vip}:80 in {stdout}"))
}

/// `wrr` with weights 1:2:3 gives shares within ±15 % over 3000 connections, `random`
/// with the same weights too, and `rr` (which ignores weights other than 0) takes the
/// backends in a fixed cycle, one connection each. `list` names the scheduler and the
/// weights.
#[test]
fn wrr_rr_and_weighted_random_distribute_as_weighted() {
    sched(&["a", "b", "c"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        let weights: Vec<(IpAddr, u32)> = addrs.iter().copied().zip([1, 2, 3]).collect();
        let docs: Vec<Value> = [
            service("wrr", "10.96.0.61", &addrs, Some("wrr"), &weights),
            service("rr", "10.96.0.62", &addrs, Some("rr"), &weights),
            service("rnd", "10.96.0.63", &addrs, None, &weights),
        ]
        .into_iter()
        .flatten()
        .collect();
        lab.write_manifest("sched.yaml", &yaml_docs(&docs))?;
        lab.start_agent()?;

        let want = [("a", 1), ("b", 2), ("c", 3)];
        let wrr = run(lab, "10.96.0.61", 3000, true)?;
        assert_shares(&wrr, &want)?;
        // One client, one connection at a time: the cursor moves by one per connection,
        // so every full cycle of 6 slots holds each backend exactly its weight.
        let outcomes: Vec<&str> = wrr.timeline.iter().map(|t| t.outcome.as_str()).collect();
        for (i, cycle) in outcomes.chunks_exact(6).enumerate() {
            let n = |id: &str| cycle.iter().filter(|o| **o == id).count();
            ensure!(
                (n("a"), n("b"), n("c")) == (1, 2, 3),
                "wrr cycle {i} is {cycle:?}, expected 1 a, 2 b, 3 c"
            );
        }

        let rr = run(lab, "10.96.0.62", 300, true)?;
        assert_shares(&rr, &[("a", 1), ("b", 1), ("c", 1)])?;
        let outcomes: Vec<&str> = rr.timeline.iter().map(|t| t.outcome.as_str()).collect();
        let first: Vec<&str> = outcomes.iter().take(3).copied().collect();
        ensure!(
            first
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == 3,
            "rr's first three connections went to {first:?}"
        );
        for (i, o) in outcomes.iter().enumerate() {
            ensure!(
                *o == first[i % 3],
                "rr connection {i} went to {o}, expected {} (cycle {first:?})",
                first[i % 3]
            );
        }

        let rnd = run(lab, "10.96.0.63", 3000, false)?;
        assert_shares(&rnd, &want)?;

        for (vip, scheduler, w) in [
            ("10.96.0.61", "wrr", [1, 2, 3]),
            ("10.96.0.62", "rr", [1, 1, 1]),
            ("10.96.0.63", "random", [1, 2, 3]),
        ] {
            let fe = listed(lab, vip)?;
            ensure!(fe["scheduler"] == scheduler, "{vip}: {fe}");
            for (addr, weight) in addrs.iter().zip(w) {
                let b = fe["backends"]
                    .as_array()
                    .and_then(|bs| bs.iter().find(|b| b["address"] == addr.to_string()))
                    .with_context(|| format!("{vip}: no backend {addr} in {fe}"))?;
                ensure!(b["weight"] == weight, "{vip}: backend {addr}: {b}");
            }
        }
        Ok(())
    });
}

/// Weight 0 drains: a long-lived connection to the drained backend keeps working while
/// every new connection goes to the other one; all weights 0 refuse new connections
/// (as a Service without endpoints), still without breaking the established one.
#[test]
fn weight_zero_drains_new_connections_and_keeps_established_ones() {
    sched(&["a", "b"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        let (a, b) = (addrs[0], addrs[1]);
        let vip = "10.96.0.64";
        lab.write_manifest(
            "drain.yaml",
            &yaml_docs(&service(
                "drain",
                vip,
                &addrs,
                Some("wrr"),
                &[(a, 1), (b, 0)],
            )),
        )?;
        lab.start_agent()?;
        let first = run(lab, vip, 50, false)?;
        assert_shares(&first, &[("a", 1), ("b", 0)])?;

        // One TCP connection, one message every 20 ms, for the whole test: it lands on
        // `a`, the only backend with a weight.
        let mut long = lab.client(sa(&format!("{vip}:80")), Proto::Tcp);
        long.long_lived = true;
        long.count = 0;
        long.duration = Some(Duration::from_secs(5));
        long.interval = Duration::from_millis(20);
        let running = lab.spawn_client(&long)?;
        std::thread::sleep(Duration::from_millis(500));

        let before = lab.agent().applied_count();
        lab.write_manifest(
            "drain.yaml",
            &yaml_docs(&service(
                "drain",
                vip,
                &addrs,
                Some("wrr"),
                &[(a, 0), (b, 1)],
            )),
        )?;
        lab.agent()
            .wait_applied(before + 1, Duration::from_secs(10))?;
        let drained = run(lab, vip, 200, false)?;
        assert_shares(&drained, &[("a", 0), ("b", 1)])?;

        let before = lab.agent().applied_count();
        lab.write_manifest(
            "drain.yaml",
            &yaml_docs(&service(
                "drain",
                vip,
                &addrs,
                Some("wrr"),
                &[(a, 0), (b, 0)],
            )),
        )?;
        lab.agent()
            .wait_applied(before + 1, Duration::from_secs(10))?;
        let refused = run(lab, vip, 20, false)?;
        // EPERM on kernels without bpf_set_retval (forced off in the fallback run).
        let errno = format!("connect:{}", svc_lb_tests::agent::refused_errno());
        ensure!(
            refused.ok == 0 && refused.failure_steps.get(&errno) == Some(&20),
            "all weights 0 should refuse every connection: {}",
            refused.summary()
        );

        let long = running.wait()?;
        eprintln!("long-lived: {}", long.summary());
        ensure!(
            long.failed == 0 && long.ok > 100 && long.backends.keys().eq(["a"]),
            "the established connection to the drained backend broke or moved: {}",
            long.summary()
        );
        Ok(())
    });
}
