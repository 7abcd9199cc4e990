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
    let mut slice = EndpointSlice::new(NS, name, "w8t", vip.contains(':'))
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

/// `vip`:80 as a socket address (IPv6 in brackets).
fn vip80(vip: &str) -> std::net::SocketAddr {
    if vip.contains(':') {
        sa(&format!("[{vip}]:80"))
    } else {
        sa(&format!("{vip}:80"))
    }
}

fn run(lab: &Lab, vip: &str, count: u64, timeline: bool) -> Result<ClientReport> {
    let mut o = lab.client(vip80(vip), Proto::Tcp);
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
        long.duration = Some(Duration::from_secs(8));
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
        // `list` shows the drained backend as ipvsadm shows a weight-0 real server:
        // weight 0, with the held connection still counted active.
        let (sa_, sb) = (a.to_string(), b.to_string());
        check_drained(lab, vip, &[(&sa_, "draining", 0, 1), (&sb, "active", 1, 0)])?;

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
        // Both drained: `b` had connections through the frontend too (closed now).
        check_drained(
            lab,
            vip,
            &[(&sa_, "draining", 0, 1), (&sb, "draining", 0, 0)],
        )?;
        // EPERM on kernels without bpf_set_retval (older kernels, or forced off in the
        // fallback run).
        let errno = format!("connect:{}", lab.agent().refused_errno());
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

/// The backends `list` shows for the socket frontend `vip`:80 are `want` (address,
/// state, weight, active connections), in JSON and in the text layout. Without
/// connection counts (fallback run) nothing links a draining backend to the frontend
/// (the sock_ops program records the pairs): it is named by the text's footer instead,
/// and the active ones show no counts.
fn check_drained(lab: &mut Lab, vip: &str, want: &[(&str, &str, u64, u64)]) -> Result<()> {
    let off = lab.agent().counts_off();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let fe = loop {
        let fe = listed(lab, vip)?;
        let got: Vec<(String, String, u64, Option<u64>)> = fe["backends"]
            .as_array()
            .with_context(|| format!("{vip}: no backends in {fe}"))?
            .iter()
            .map(|b| {
                (
                    b["address"].as_str().unwrap_or_default().to_owned(),
                    b["state"].as_str().unwrap_or_default().to_owned(),
                    b["weight"].as_u64().unwrap_or(u64::MAX),
                    b["active_connections"].as_u64(),
                )
            })
            .collect();
        let expect: Vec<(String, String, u64, Option<u64>)> = want
            .iter()
            .filter(|w| !off || w.1 != "draining")
            .map(|(a, s, w, n)| ((*a).to_owned(), (*s).to_owned(), *w, (!off).then_some(*n)))
            .collect();
        let mut sorted = got.clone();
        sorted.sort();
        let mut expect_sorted = expect.clone();
        expect_sorted.sort();
        if sorted == expect_sorted {
            break fe;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{vip}: backends {got:?}, expected {expect:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = lab.svc_lb(&["list"])?;
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    for (addr, state, _, _) in want.iter().filter(|w| w.1 == "draining") {
        let line = text.lines().find(|l| {
            l.starts_with("  ->") && l.contains(&format!("{addr}:8080")) && l.contains(state)
        });
        let footer = text.lines().find(|l| {
            l.starts_with("draining, without connections")
                && l.contains(&format!("{addr}:8080/TCP"))
        });
        if off {
            ensure!(
                line.is_none() && footer.is_some(),
                "{addr}: without counts the footer must name the draining backend:\n{text}"
            );
        } else {
            ensure!(
                line.is_some_and(|l| l.contains(" 0 ")) && footer.is_none(),
                "{addr}: no draining line of weight 0 under {vip}:\n{text}\n{fe}"
            );
        }
    }
    let active_only = want.iter().all(|w| w.1 == "draining");
    ensure!(
        !active_only || text.contains("(no backends: connections are refused)"),
        "{vip}: every backend drains, the text must say new connections are refused:\n{text}"
    );
    Ok(())
}

// ---- Active connection counts and lc/wlc ----

/// (active, inactive) `list -o json` shows for each backend of the socket frontend at
/// `vip`:80, by address; `None` where the fields are null (no counts on this node).
/// A backend's address with its (active, inactive) counts as `list` shows them.
type Open = (String, Option<u64>, Option<u64>);

fn open_conns(lab: &Lab, vip: &str) -> Result<Vec<Open>> {
    let fe = listed(lab, vip)?;
    Ok(fe["backends"]
        .as_array()
        .with_context(|| format!("{vip}: no backends in {fe}"))?
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap_or_default().to_owned(),
                b["active_connections"].as_u64(),
                b["inactive_connections"].as_u64(),
            )
        })
        .collect())
}

/// Sums of (active, inactive) over the backends of `vip`.
fn open_total(lab: &Lab, vip: &str) -> Result<(u64, u64)> {
    let all = open_conns(lab, vip)?;
    let mut t = (0, 0);
    for (addr, a, i) in all {
        let (Some(a), Some(i)) = (a, i) else {
            anyhow::bail!("{vip}: backend {addr} has no counts although this node keeps them");
        };
        t = (t.0 + a, t.1 + i);
    }
    Ok(t)
}

/// Polls `list` until the totals of `vip` are `want` (connections settle within
/// milliseconds; the bound only guards against a hang).
fn wait_total(lab: &Lab, vip: &str, want: (u64, u64)) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = open_total(lab, vip)?;
        if got == want {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{vip}: open connections (active, inactive) stayed {got:?}, expected {want:?}: {:?}",
            open_conns(lab, vip)?
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One long-lived TCP connection to `vip`:80 for `secs`, one message every 50 ms.
/// Waits for held connections and counts them per backend; each went to exactly one
/// backend, and the first three were held while `a` was the only one.
fn landed_after_three_on_a(
    held: Vec<svc_lb_tests::procs::ClientRun>,
) -> Result<std::collections::BTreeMap<String, u64>> {
    let mut landed = std::collections::BTreeMap::<String, u64>::new();
    for (i, run) in held.into_iter().enumerate() {
        let r = run.wait()?;
        ensure!(
            r.failed == 0 && r.backends.len() == 1,
            "connection {i}: {}",
            r.summary()
        );
        let id = r.backends.keys().next().cloned().unwrap_or_default();
        ensure!(
            i >= 3 || id == "a",
            "connection {i} was held while a was the only backend: {id}"
        );
        *landed.entry(id).or_default() += 1;
    }
    Ok(landed)
}

fn hold(lab: &Lab, vip: &str, secs: u64) -> Result<svc_lb_tests::procs::ClientRun> {
    let mut o = lab.client(vip80(vip), Proto::Tcp);
    o.long_lived = true;
    o.count = 0;
    o.duration = Some(Duration::from_secs(secs));
    o.interval = Duration::from_millis(50);
    lab.spawn_client(&o)
}

/// Active connection counts follow real TCP connections on both families: four held
/// connections show as 4 active (per backend exactly where the clients landed), 0
/// after they close; refused connects (nothing listens on the backend port) leave
/// nothing behind. Without the counts (fallback run) every backend shows null and the
/// text says why.
#[test]
fn active_connections_follow_real_tcp_connections() {
    sched(&["a", "b"], |lab| {
        lab.serve_all_tcp(8080, true)?;
        let (v4, v6) = (lab.topo.addrs(false), lab.topo.addrs(true));
        let mut refused = service("refused", "10.96.0.68", &v4, None, &[]);
        refused[1]["ports"][0]["port"] = json!(8081);
        let docs: Vec<Value> = [
            service("cnt4", "10.96.0.65", &v4, None, &[]),
            service("cnt6", "fd00:96::65", &v6, None, &[]),
            refused,
        ]
        .into_iter()
        .flatten()
        .collect();
        lab.write_manifest("conns.yaml", &yaml_docs(&docs))?;
        lab.start_agent()?;

        if lab.agent().counts_off() {
            for vip in ["10.96.0.65", "fd00:96::65"] {
                let all = open_conns(lab, vip)?;
                ensure!(
                    all.iter().all(|(_, a, i)| a.is_none() && i.is_none()),
                    "{vip}: counts shown although the feature is off: {all:?}"
                );
            }
            let text = lab.svc_lb(&["list"])?;
            let text = String::from_utf8_lossy(&text.stdout);
            ensure!(
                text.contains("keeps no connection counts") && text.contains("sock_ops_conn"),
                "list must say why the counts are missing:\n{text}"
            );
            return Ok(());
        }

        for (vip, addrs) in [("10.96.0.65", &v4), ("fd00:96::65", &v6)] {
            wait_total(lab, vip, (0, 0))?;
            let held: Vec<_> = (0..4).map(|_| hold(lab, vip, 3)).collect::<Result<_>>()?;
            wait_total(lab, vip, (4, 0))?;
            let during = open_conns(lab, vip)?;
            let mut landed = std::collections::BTreeMap::<String, u64>::new();
            for run in held {
                let r = run.wait()?;
                ensure!(
                    r.failed == 0 && r.ok > 10 && r.backends.len() == 1,
                    "{vip}: a held connection failed or moved: {}",
                    r.summary()
                );
                for id in r.backends.keys() {
                    *landed.entry(id.clone()).or_default() += 1;
                }
            }
            // Backend ids a, b are the lab's first and second address.
            for (i, id) in ["a", "b"].iter().enumerate() {
                let addr = addrs[i].to_string();
                let shown = during
                    .iter()
                    .find(|(a, _, _)| *a == addr)
                    .and_then(|(_, a, _)| *a)
                    .unwrap_or(u64::MAX);
                let want = landed.get(*id).copied().unwrap_or(0);
                ensure!(
                    shown == want,
                    "{vip}: backend {id} ({addr}) showed {shown} active, {want} clients held a connection there: {during:?}"
                );
            }
            // Closed: the client's side goes FIN_WAIT → TIME_WAIT (no longer a full
            // socket), so nothing stays counted.
            wait_total(lab, vip, (0, 0))?;
        }

        let r = run(lab, "10.96.0.68", 20, false)?;
        ensure!(
            r.ok == 0 && r.failure_steps.get("connect:ECONNREFUSED") == Some(&20),
            "connects to a closed backend port should be refused by the backend: {}",
            r.summary()
        );
        wait_total(lab, "10.96.0.68", (0, 0))?;
        Ok(())
    });
}

/// `lc` and `wlc` with long-lived connections fill the lighter backends first: three
/// connections held on `a` (the only backend then), then `b` and `c` join and the next
/// six go to them, three each, none to `a`; `wlc` with weights 1:3 puts four
/// connections 1 and 3. `trace` names the choice. Without the counts (fallback run) an
/// `lc` Service is reported and served by the default scheduler.
#[test]
fn lc_and_wlc_fill_the_lighter_backends_first() {
    sched(&["a", "b", "c"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        let (a, b) = (addrs[0], addrs[1]);
        let docs: Vec<Value> = [
            service("lc", "10.96.0.66", &addrs[..1], Some("lc"), &[]),
            service(
                "wlc",
                "10.96.0.67",
                &addrs[..2],
                Some("wlc"),
                &[(a, 1), (b, 3)],
            ),
        ]
        .into_iter()
        .flatten()
        .collect();
        lab.write_manifest("lc.yaml", &yaml_docs(&docs))?;
        lab.start_agent()?;

        if lab.agent().counts_off() {
            for vip in ["10.96.0.66", "10.96.0.67"] {
                let fe = listed(lab, vip)?;
                ensure!(
                    fe["scheduler"] == "random",
                    "{vip}: lc/wlc must fall back: {fe}"
                );
            }
            let log = lab.agent().log_text();
            ensure!(
                log.contains("scheduler 'lc' needs active connection counts")
                    && log.contains("scheduler 'wlc' needs active connection counts"),
                "the fallback must be reported against the Services; log:\n{log}"
            );
            let r = run(lab, "10.96.0.67", 2000, false)?;
            assert_shares(&r, &[("a", 1), ("b", 3)])?;
            return Ok(());
        }

        ensure!(listed(lab, "10.96.0.66")?["scheduler"] == "lc");
        ensure!(listed(lab, "10.96.0.67")?["scheduler"] == "wlc");
        let mut held = Vec::new();
        for n in 1..=3 {
            held.push(hold(lab, "10.96.0.66", 20)?);
            wait_total(lab, "10.96.0.66", (n, 0))?;
        }
        let before = lab.agent().applied_count();
        let docs: Vec<Value> = [
            service("lc", "10.96.0.66", &addrs, Some("lc"), &[]),
            service(
                "wlc",
                "10.96.0.67",
                &addrs[..2],
                Some("wlc"),
                &[(a, 1), (b, 3)],
            ),
        ]
        .into_iter()
        .flatten()
        .collect();
        lab.write_manifest("lc.yaml", &yaml_docs(&docs))?;
        lab.agent()
            .wait_applied(before + 1, Duration::from_secs(10))?;
        wait_lc_loaded(lab.agent())?;
        let out = lab.svc_lb(&["trace", "--to", "10.96.0.66:80"])?;
        let trace = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && trace.contains("least connections"),
            "trace must explain the lc choice:\n{trace}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for n in 4..=9 {
            held.push(hold(lab, "10.96.0.66", 16)?);
            wait_total(lab, "10.96.0.66", (n, 0))?;
        }
        let shown = open_conns(lab, "10.96.0.66")?;
        ensure!(
            shown.iter().all(|(_, a, _)| *a == Some(3)),
            "after 3 held on a and 6 new, every backend should hold 3: {shown:?}"
        );
        let landed = landed_after_three_on_a(held)?;
        ensure!(
            landed.get("a") == Some(&3)
                && landed.get("b") == Some(&3)
                && landed.get("c") == Some(&3),
            "lc: {landed:?}, expected 3 each (the six new ones on b and c)"
        );
        // The counts are per backend address, which both Services share: let the lc
        // connections close before wlc is measured.
        wait_total(lab, "10.96.0.66", (0, 0))?;
        let mut wl = Vec::new();
        for n in 1..=4 {
            wl.push(hold(lab, "10.96.0.67", 4)?);
            wait_total(lab, "10.96.0.67", (n, 0))?;
        }
        let shown = open_conns(lab, "10.96.0.67")?;
        let of = |addr: IpAddr| {
            shown
                .iter()
                .find(|(x, _, _)| *x == addr.to_string())
                .and_then(|(_, a, _)| *a)
        };
        ensure!(
            (of(a), of(b)) == (Some(1), Some(3)),
            "wlc 1:3 with four held connections should hold 1 and 3: {shown:?}"
        );
        for run in wl {
            let r = run.wait()?;
            ensure!(r.failed == 0, "wlc connection: {}", r.summary());
        }
        Ok(())
    });
}

/// Log line of the agent once the lc programs are in the connect hooks' arrays.
const LC_LOADED: &str = "lc/wlc: scan programs loaded";
/// Log line of the agent when the verifier refused them.
const LC_REFUSED: &str = "lc/wlc programs not loaded";

/// Waits until `agent` has loaded the lc programs (on demand, after the sync that
/// brought the first lc/wlc frontend); fails at once if the verifier refused them.
fn wait_lc_loaded(agent: &svc_lb_tests::agent::Agent) -> Result<()> {
    let deadline = std::time::Instant::now() + svc_lb_tests::agent::scaled(Duration::from_secs(60));
    loop {
        let log = agent.log_text();
        ensure!(
            !log.contains(LC_REFUSED),
            "the lc programs were refused:\n{log}"
        );
        if log.contains(LC_LOADED) {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the lc programs did not load:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lc programs load on demand: an agent whose Services are all `random` verifies
/// no lc program (none in the kernel's program list reads this lab's maps, the
/// metrics say `not_needed`, the log never mentions their load), also after a full
/// second of serving; once the Service is switched to `lc`, the programs load beside
/// the running agent (the metrics say `loaded`, the kernel lists `svclb_lc4` and
/// `svclb_lc6` on this lab's maps), and the next connections get exact least-connection
/// choices: with three held on `a`, six new ones land three each on `b` and `c`, none
/// on `a`; `trace` names the program. Without the counts (fallback run) nothing loads,
/// even for the lc Service, and the metrics say `off`.
#[test]
fn lc_programs_load_on_demand_when_a_service_turns_lc() {
    use svc_lb_tests::metrics::{scrape_one, start_agent};
    sched(&["a", "b", "c"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        let vip = "10.96.0.69";
        let docs: Vec<Value> = service("ondemand", vip, &addrs[..1], None, &[]).into();
        lab.write_manifest("od.yaml", &yaml_docs(&docs))?;
        let mut agent = start_agent(lab, "ondemand", &[])?;
        let loaded = || svc_lb::datapath::lcdemand::lc_programs_loaded(lab.bpffs());
        let state = |agent: &svc_lb_tests::agent::Agent, s: &str| {
            scrape_one(agent, &format!("svclb_lc_programs{{state=\"{s}\"}}"))
        };
        let idle = if agent.counts_off() {
            "off"
        } else {
            "not_needed"
        };
        std::thread::sleep(Duration::from_secs(1));
        ensure!(
            loaded()?.is_empty(),
            "no lc frontend, yet lc programs are loaded: {:?}",
            loaded()?
        );
        ensure!(state(&agent, idle)? == 1.0, "lc state must be {idle}");
        ensure!(
            !agent.log_text().contains("scan programs"),
            "no lc frontend, yet the agent loaded the scan programs:\n{}",
            agent.log_text()
        );

        let mut held = Vec::new();
        if !agent.counts_off() {
            for n in 1..=3 {
                held.push(hold(lab, vip, 20)?);
                wait_total(lab, vip, (n, 0))?;
            }
        }
        let before = agent.applied_count();
        let docs: Vec<Value> = service("ondemand", vip, &addrs, Some("lc"), &[]).into();
        lab.write_manifest("od.yaml", &yaml_docs(&docs))?;
        agent.wait_applied(before + 1, Duration::from_secs(10))?;
        if agent.counts_off() {
            std::thread::sleep(Duration::from_secs(1));
            ensure!(
                loaded()?.is_empty(),
                "no counts, yet lc programs: {:?}",
                loaded()?
            );
            ensure!(state(&agent, "off")? == 1.0, "lc state must be off");
            return Ok(());
        }
        wait_lc_loaded(&agent)?;
        ensure!(state(&agent, "loaded")? == 1.0, "lc state must be loaded");
        let pair = lc_pair(&agent);
        ensure!(
            loaded()? == pair,
            "the kernel must list both lc programs {pair:?} on this lab's maps: {:?}",
            loaded()?
        );
        let out = lab.svc_lb(&["trace", "--to", &format!("{vip}:80")])?;
        let trace = String::from_utf8_lossy(&out.stdout);
        let by_program = format!(
            "by the lc program ({}/{}, loaded on this node)",
            pair[0], pair[1]
        );
        ensure!(
            out.status.success() && trace.contains(&by_program),
            "trace must name the lc program:\n{trace}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for n in 4..=9 {
            held.push(hold(lab, vip, 16)?);
            wait_total(lab, vip, (n, 0))?;
        }
        let landed = landed_after_three_on_a(held)?;
        ensure!(
            landed.get("a") == Some(&3)
                && landed.get("b") == Some(&3)
                && landed.get("c") == Some(&3),
            "lc after the switch: {landed:?}, expected 3 each (the six new ones on b and c)"
        );
        wait_total(lab, vip, (0, 0))?;
        drop(agent);
        Ok(())
    });
}

/// The lc program pair `agent` loads: `svclb_lcloop4`/`6` where its probe found
/// `bpf_loop`, else `svclb_lc4`/`6`.
fn lc_pair(agent: &svc_lb_tests::agent::Agent) -> [&'static str; 2] {
    if svc_lb_tests::agent::forced_off("bpf_loop") || agent.feature_unused("bpf_loop") {
        ["svclb_lc4", "svclb_lc6"]
    } else {
        ["svclb_lcloop4", "svclb_lcloop6"]
    }
}

/// The check of [`lc_without_bpf_loop_is_exact_up_to_its_bound`] and
/// [`lc_with_bpf_loop_compares_every_slot`], for an agent started on six backends
/// with the Services of [`lc_services`]:
/// - `wlc` with weights 1 and `LC_SCAN_MAX + 1` (66 slots, above the bounded scan's
///   64): with `bpf_loop` exact, so four held connections land one on the light
///   backend and three on the heavy one (the first ties at 0, the second goes to the
///   other, the next two to the heavy one, 256 / 65 < 256 / 1), which the two random
///   choices (one slot in 66 for the light backend) rarely give; `trace` says every
///   slot was compared. Without it `trace` says the choice was two random slots, and
///   the connections succeed.
/// - `lc` over six backends (six slots, in either program's bound) is exact: twelve
///   connections held one after the other land two on each backend, the first six one
///   on each, as only a scan over every slot makes sure; `trace` names the program.
fn check_lc_exact(lab: &Lab, agent: &svc_lb_tests::agent::Agent) -> Result<()> {
    use svc_lb_common::lookup::LC_SCAN_MAX;
    let (vip, wide) = ("10.96.0.68", "10.96.0.70");
    let pair = lc_pair(agent);
    let looped = pair[0] == "svclb_lcloop4";
    ensure!(listed(lab, vip)?["scheduler"] == "lc");
    ensure!(listed(lab, wide)?["scheduler"] == "wlc");
    wait_lc_loaded(agent)?;
    let loaded = svc_lb::datapath::lcdemand::lc_programs_loaded(lab.bpffs())?;
    ensure!(loaded == pair, "the kernel must list {pair:?}: {loaded:?}");
    let by_program = format!(
        "by the lc program ({}/{}, loaded on this node)",
        pair[0], pair[1]
    );

    let out = lab.svc_lb(&["trace", "--to", &format!("{wide}:80")])?;
    let trace = String::from_utf8_lossy(&out.stdout);
    let slots = LC_SCAN_MAX + 2;
    let want = if looped {
        format!("{by_program}: every slot 1..={slots} compared")
    } else {
        format!("more than {LC_SCAN_MAX} slots")
    };
    ensure!(
        out.status.success() && trace.contains(&want),
        "trace of wlc over {slots} slots must say {want:?}:\n{trace}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let addrs = lab.topo.addrs(false);
    let mut wl = Vec::new();
    for n in 1..=4 {
        wl.push(hold(lab, wide, 6)?);
        wait_total(lab, wide, (n, 0))?;
    }
    let shown = open_conns(lab, wide)?;
    let of = |addr: IpAddr| {
        shown
            .iter()
            .find(|(x, _, _)| *x == addr.to_string())
            .and_then(|(_, a, _)| *a)
    };
    if looped {
        ensure!(
            (of(addrs[0]), of(addrs[1])) == (Some(1), Some(3)),
            "wlc 1:{} exact over {slots} slots with four held connections: 1 and 3: {shown:?}",
            LC_SCAN_MAX + 1
        );
    }
    for run in wl {
        let r = run.wait()?;
        ensure!(r.failed == 0, "wlc connection: {}", r.summary());
    }
    // The counts are per backend address, which both Services share.
    wait_total(lab, wide, (0, 0))?;

    let out = lab.svc_lb(&["trace", "--to", &format!("{vip}:80")])?;
    let trace = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && trace.contains(&by_program),
        "trace must say the lc choice over 6 slots is the exact scan of {pair:?}:\n{trace}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut held = Vec::new();
    for n in 1..=12 {
        held.push(hold(lab, vip, 20)?);
        wait_total(lab, vip, (n, 0))?;
        if n == 6 {
            let shown = open_conns(lab, vip)?;
            ensure!(
                shown.iter().all(|(_, a, _)| *a == Some(1)),
                "lc: six held connections over six backends must be one each: {shown:?}"
            );
        }
    }
    let shown = open_conns(lab, vip)?;
    ensure!(
        shown.len() == 6 && shown.iter().all(|(_, a, _)| *a == Some(2)),
        "lc: twelve held connections over six backends must be two each: {shown:?}"
    );
    let mut landed = std::collections::BTreeMap::<String, u64>::new();
    for (i, run) in held.into_iter().enumerate() {
        let r = run.wait()?;
        ensure!(
            r.failed == 0 && r.backends.len() == 1,
            "lc connection {i}: {}",
            r.summary()
        );
        let id = r.backends.keys().next().cloned().unwrap_or_default();
        *landed.entry(id).or_default() += 1;
    }
    ensure!(
        landed.len() == 6 && landed.values().all(|n| *n == 2),
        "lc: {landed:?}, expected two on each of six backends"
    );
    wait_total(lab, vip, (0, 0))?;
    Ok(())
}

/// The Services [`check_lc_exact`] reads, written to the lab's manifests: `lc` over
/// all six backends, `wlc` over the first two with weights 1 and `LC_SCAN_MAX + 1`.
fn lc_services(lab: &Lab) -> Result<()> {
    use svc_lb_common::lookup::LC_SCAN_MAX;
    let addrs = lab.topo.addrs(false);
    let docs: Vec<Value> = [
        service("lc", "10.96.0.68", &addrs, Some("lc"), &[]),
        service(
            "wide",
            "10.96.0.70",
            &addrs[..2],
            Some("wlc"),
            &[(addrs[0], 1), (addrs[1], LC_SCAN_MAX + 1)],
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    lab.write_manifest("lc.yaml", &yaml_docs(&docs))
}

/// Without the counts (fallback run) `lc` is reported and served by the default
/// scheduler.
fn check_lc_fallback(lab: &Lab) -> Result<()> {
    let vip = "10.96.0.68";
    let fe = listed(lab, vip)?;
    ensure!(fe["scheduler"] == "random", "lc must fall back: {fe}");
    let r = run(lab, vip, 1200, false)?;
    let even: Vec<(&str, u32)> = ["a", "b", "c", "d", "e", "f"]
        .into_iter()
        .map(|id| (id, 1))
        .collect();
    assert_shares(&r, &even)
}

/// `svclb_lc4`/`6` (kernels without `bpf_loop`, here forced off): exact over six
/// slots, the lighter of two random slots over 66 (see [`check_lc_exact`]). When the
/// run forces features off itself (`SVCLB_FORCE_FEATURE_OFF`) the agent takes that
/// list alone, and the check follows what its probe left.
#[test]
fn lc_without_bpf_loop_is_exact_up_to_its_bound() {
    sched(&["a", "b", "c", "d", "e", "f"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        lc_services(lab)?;
        let own_list =
            std::env::var(svc_lb_tests::agent::FORCE_FEATURE_OFF_ENV).is_ok_and(|v| !v.is_empty());
        let extra: &[&str] = if own_list {
            &[]
        } else {
            &["--force-feature-off", "bpf_loop"]
        };
        let agent = svc_lb_tests::metrics::start_agent(lab, "bounded", extra)?;
        if agent.counts_off() {
            return check_lc_fallback(lab);
        }
        ensure!(
            own_list || lc_pair(&agent) == ["svclb_lc4", "svclb_lc6"],
            "bpf_loop forced off, yet the agent's probe uses it"
        );
        check_lc_exact(lab, &agent)
    });
}

/// `svclb_lcloop4`/`6` where the kernel has `bpf_loop` (5.17): every slot compared,
/// also the 66 of a `wlc` Service (see [`check_lc_exact`]).
#[test]
fn lc_with_bpf_loop_compares_every_slot() {
    sched(&["a", "b", "c", "d", "e", "f"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        lc_services(lab)?;
        let agent = svc_lb_tests::metrics::start_agent(lab, "loop", &[])?;
        if agent.counts_off() {
            return check_lc_fallback(lab);
        }
        check_lc_exact(lab, &agent)
    });
}

/// Run time and count of the programs named `name` that read this lab's Service maps
/// (kernel BPF statistics; zero while they are off).
fn hook_stats(lab: &Lab, name: &str) -> Result<(Duration, u64)> {
    let path = lab.bpffs().join(svc_lb_common::MAP_SVC4);
    let id = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("open {}", path.display()))?
        .info()
        .context("map info")?
        .id();
    let mut total = (Duration::ZERO, 0);
    for p in aya::programs::loaded_programs() {
        let Ok(p) = p else { continue };
        if p.name_as_str() != Some(name) {
            continue;
        }
        let maps = p.map_ids().context("map ids")?.unwrap_or_default();
        if maps.contains(&id) {
            total.0 += p.run_time();
            total.1 += p.run_count();
        }
    }
    Ok(total)
}

/// A measurement, not a check (run by hand with `--ignored`): the connect hook's run
/// time per connect (the tail-called lc program's time counts to the hook) for a
/// `random` Service, `lc` over 6 slots and `wlc` over 66 and 4096 slots (weights 1 and
/// 65, 1 and 4095), 300 connections each, with the kernel's BPF statistics on.
#[test]
#[ignore = "measurement: prints the connect hook's run time per connect"]
fn lc_scan_run_time_per_connect() {
    sched(&["a", "b", "c", "d", "e", "f"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        let cases = [
            ("random, 6 slots", "10.96.0.71", None, &addrs[..], vec![]),
            ("lc, 6 slots", "10.96.0.72", Some("lc"), &addrs[..], vec![]),
            (
                "wlc, 66 slots",
                "10.96.0.73",
                Some("wlc"),
                &addrs[..2],
                vec![(addrs[0], 1), (addrs[1], 65)],
            ),
            (
                "wlc, 4096 slots",
                "10.96.0.74",
                Some("wlc"),
                &addrs[..2],
                vec![(addrs[0], 1), (addrs[1], 4095)],
            ),
        ];
        let docs: Vec<Value> = cases
            .iter()
            .enumerate()
            .flat_map(|(i, (_, vip, s, a, w))| service(&format!("cost{i}"), vip, a, *s, w))
            .collect();
        lab.write_manifest("cost.yaml", &yaml_docs(&docs))?;
        let agent = svc_lb_tests::metrics::start_agent(lab, "cost", &[])?;
        wait_lc_loaded(&agent)?;
        let pair = lc_pair(&agent);
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enable the kernel's BPF run-time statistics")?;
        for (what, vip, _, _, _) in &cases {
            let before = hook_stats(lab, "svclb_connect4")?;
            let r = run(lab, vip, 300, false)?;
            ensure!(r.failed == 0, "{what}: {}", r.summary());
            let after = hook_stats(lab, "svclb_connect4")?;
            let runs = after.1 - before.1;
            ensure!(runs > 0, "{what}: no run counted");
            let ns = (after.0 - before.0).as_nanos() / u128::from(runs);
            eprintln!("COST {what} ({pair:?}): {ns} ns per connect over {runs} runs");
        }
        Ok(())
    });
}
