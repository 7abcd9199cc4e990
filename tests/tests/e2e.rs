//! Privileged end-to-end tests: the real agent binary, real eBPF programs, real sockets.
//!
//! Run as root, one at a time (they share kernel state such as the bpffs mount):
//! `cargo test --release -p svc-lb-tests --features e2e -- --test-threads=1`.
//! A missing tool, capability or binary fails the test; nothing is skipped.
//!
//! Every test builds a private [`Lab`] (backend namespaces, a client namespace with no
//! default route, a cgroup, a pin directory), writes its own manifests, counts every
//! connection it makes and asserts exact numbers. The lab is torn down even when the test
//! fails, and each test then checks that nothing named with this run's prefix is left.
#![cfg(feature = "e2e")]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use svc_lb_tests::{
    ClientReport, Lab, Proto,
    bpfquery::sock_program_counts,
    cmd,
    lab::with_lab,
    manifests::{
        Endpoint, EndpointSlice, Protocol, Service, TargetPort, json_doc, yaml_docs, yaml_list,
    },
};
use svc_lb_tests::{ip, manifests::tcp_service, sa};

const NS: &str = "e2e";

/// Builds a lab with backends `ids`, runs `body` on it, tears it down (printing the agent
/// log if the body failed), then asserts that nothing of this run is left behind.
fn e2e(ids: &[&str], body: impl FnOnce(&mut Lab) -> Result<()>) {
    // A run killed earlier (SIGKILL skips destructors) must not disturb this one.
    with_lab(env!("CARGO_BIN_EXE_svclb-harness"), ids, body);
}

/// No failure, every reply from one of `ids`, and each of them got at least `min_share`
/// of the replies.
fn assert_spread(r: &ClientReport, ids: &[&str], min_share: f64) -> Result<()> {
    ensure!(
        r.failed == 0,
        "failures: {}\nfirst failures: {:?}",
        r.summary(),
        r.failure_samples
    );
    ensure!(
        r.ok == r.attempts,
        "not every attempt answered: {}",
        r.summary()
    );
    let got: BTreeSet<&str> = r.backends.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = ids.iter().copied().collect();
    ensure!(
        got == want,
        "replies from {got:?}, expected {want:?}: {}",
        r.summary()
    );
    for id in ids {
        let share = r.count(id) as f64 / r.ok as f64;
        ensure!(
            share >= min_share,
            "backend {id} got {:.1}% < {:.1}%: {}",
            share * 100.0,
            min_share * 100.0,
            r.summary()
        );
    }
    Ok(())
}

/// Every attempt of `r` gave `key` in `map` (reply source or getpeername).
fn assert_all(map: &BTreeMap<String, u64>, key: &str, r: &ClientReport, what: &str) -> Result<()> {
    let want = BTreeMap::from([(key.to_owned(), r.ok)]);
    ensure!(*map == want, "{what}: got {map:?}, expected {want:?}");
    Ok(())
}

/// `bpftool -j cgroup show <cg>`: the programs attached to the lab's cgroup.
fn cgroup_programs(cg: &Path) -> Result<Vec<Value>> {
    let out = cmd::run(
        "bpftool",
        [
            "-j".as_ref(),
            "cgroup".as_ref(),
            "show".as_ref(),
            cg.as_os_str(),
        ],
    )?;
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_str(out.trim()).context("parse bpftool output")?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// Polls until every socket hook of `cg` has a program (at most 2 s), then returns the
/// counts. Tests that are not about the timing of the attachment use this rather than
/// depending on the agent attaching before its first `sync applied` line.
fn wait_attached(cg: &Path) -> Result<Vec<(&'static str, u32)>> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let counts = sock_program_counts(cg)?;
        if counts.iter().all(|(_, n)| *n > 0) || Instant::now() >= deadline {
            return Ok(counts);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The harness itself, without any agent: servers answer, clients count, and a Service
/// address is unreachable from the client namespace (so nothing leaves the lab).
#[test]
fn harness_works_without_an_agent() {
    e2e(&["a", "b"], |lab| {
        let a = lab.topo.backend("a").addr4;
        let b6 = lab.topo.backend("b").addr6;
        lab.serve("a", "a", &[SocketAddr::new(a.into(), 8080)], &[])?;
        lab.serve(
            "b",
            "b",
            &[SocketAddr::new(b6.into(), 8080)],
            &[SocketAddr::new(b6.into(), 5353)],
        )?;
        // IPv6 first: a fresh link must carry the very first connection (no DAD wait).
        let target = SocketAddr::new(b6.into(), 8080);
        let mut o = lab.client(target, Proto::Tcp);
        o.cgroup = None;
        o.count = 50;
        let r = lab.run_client(&o)?;
        ensure!(r.count("b") == 50 && r.failed == 0, "{}", r.summary());
        let mut o = lab.client(SocketAddr::new(a.into(), 8080), Proto::Tcp);
        o.cgroup = None;
        o.count = 50;
        let r = lab.run_client(&o)?;
        ensure!(r.count("a") == 50 && r.failed == 0, "{}", r.summary());
        assert_all(&r.peer_names, &format!("{a}:8080"), &r, "TCP getpeername")?;

        let target = SocketAddr::new(b6.into(), 5353);
        let mut o = lab.client(target, Proto::Udp);
        o.cgroup = None;
        o.count = 50;
        let r = lab.run_client(&o)?;
        ensure!(r.count("b") == 50 && r.failed == 0, "{}", r.summary());
        assert_all(&r.reply_sources, &target.to_string(), &r, "UDP source")?;

        // A cluster IP has no route in the client namespace: it fails locally.
        for target in [sa("10.96.0.1:80"), sa("[fd00:96::1]:80")] {
            let mut o = lab.client(target, Proto::Tcp);
            o.count = 5;
            let r = lab.run_client(&o)?;
            ensure!(r.failures_of("ENETUNREACH") == 5, "{}", r.summary());
        }
        Ok(())
    });
}

/// Case 1: TCP over three backends: every connection answered, each backend ≥ 10%.
/// The manifests come as a `kind: List`, as `kubectl get svc,endpointslice -o yaml` prints.
#[test]
fn tcp_spreads_connections_over_three_backends() {
    e2e(&["a", "b", "c"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        let svc = Service::new(NS, "web", &[ip("10.96.0.10")]).port(
            "http",
            80,
            TargetPort::Number(8080),
            Protocol::Tcp,
        );
        let slice = EndpointSlice::new(NS, "web", "abcde", false)
            .port("http", 8080, Protocol::Tcp)
            .ready_endpoints(&addrs);
        lab.write_manifest("web.yaml", &yaml_list(&[svc.to_value(), slice.to_value()]))?;
        lab.start_agent()?;

        let mut o = lab.client(sa("10.96.0.10:80"), Proto::Tcp);
        o.count = 300;
        let r = lab.run_client(&o)?;
        eprintln!("{}", r.summary());
        ensure!(r.attempts == 300 && r.ok == 300, "{}", r.summary());
        assert_spread(&r, &["a", "b", "c"], 0.10)?;
        // getpeername on a translated TCP socket shows the Service, not the backend.
        assert_all(&r.peer_names, "10.96.0.10:80", &r, "TCP getpeername")?;
        Ok(())
    });
}

/// Case 2: UDP: replies come from the VIP, datagrams spread over the backends (also from a
/// single unconnected socket), and a connected socket's peer is the VIP.
/// The manifests are JSON files, as `kubectl get -o json` prints.
#[test]
fn udp_replies_come_from_the_service_address() {
    e2e(&["a", "b", "c"], |lab| {
        for b in ["a", "b", "c"] {
            let addr = lab.topo.backend(b).addr4;
            lab.serve(b, b, &[], &[SocketAddr::new(addr.into(), 5353)])?;
        }
        let svc = Service::new(NS, "dns", &[ip("10.96.0.53")]).port(
            "dns",
            53,
            TargetPort::Number(5353),
            Protocol::Udp,
        );
        let slice = EndpointSlice::new(NS, "dns", "q7x2m", false)
            .port("dns", 5353, Protocol::Udp)
            .ready_endpoints(&lab.topo.addrs(false));
        lab.write_manifest("dns-svc.json", &json_doc(&svc.to_value()))?;
        lab.write_manifest("dns-slice.json", &json_doc(&slice.to_value()))?;
        lab.start_agent()?;

        let vip = "10.96.0.53:53";
        for (proto, one_socket) in [
            (Proto::Udp, false),
            (Proto::Udp, true),
            (Proto::UdpConnected, false),
        ] {
            let mut o = lab.client(sa(vip), proto);
            o.count = 150;
            o.one_socket = one_socket;
            let r = lab.run_client(&o)?;
            eprintln!("one_socket={one_socket}: {}", r.summary());
            ensure!(r.attempts == 150, "{}", r.summary());
            assert_spread(&r, &["a", "b", "c"], 0.10)?;
            assert_all(&r.reply_sources, vip, &r, "recvfrom source")?;
            if proto == Proto::UdpConnected {
                assert_all(&r.peer_names, vip, &r, "getpeername")?;
            }
        }
        Ok(())
    });
}

/// Case 3: An IPv6-only Service, and a dual-stack Service reached over both families (TCP,
/// and UDP with the reply source checked on IPv6).
#[test]
fn ipv6_and_dual_stack_services() {
    e2e(&["a", "b", "c"], |lab| {
        for b in ["a", "b", "c"] {
            let h = lab.topo.backend(b);
            let (v4, v6) = (IpAddr::from(h.addr4), IpAddr::from(h.addr6));
            lab.serve(
                b,
                b,
                &[SocketAddr::new(v4, 8080), SocketAddr::new(v6, 8080)],
                &[SocketAddr::new(v4, 5353), SocketAddr::new(v6, 5353)],
            )?;
        }
        let v4 = lab.topo.addrs(false);
        let v6 = lab.topo.addrs(true);
        let v6_only = tcp_service(NS, "v6only", "fd00:96::10", 80, 8080, &v6);
        let dual = Service::new(NS, "dual", &[ip("10.96.0.20"), ip("fd00:96::20")])
            .port("http", 80, TargetPort::Number(8080), Protocol::Tcp)
            .port("dns", 53, TargetPort::Number(5353), Protocol::Udp);
        let slice = |suffix: &str, v6: bool, addrs: &[IpAddr]| {
            EndpointSlice::new(NS, "dual", suffix, v6)
                .port("http", 8080, Protocol::Tcp)
                .port("dns", 5353, Protocol::Udp)
                .ready_endpoints(addrs)
                .to_value()
        };
        lab.write_manifest("v6only.yaml", &v6_only)?;
        lab.write_manifest(
            "dual.yaml",
            &yaml_docs(&[
                dual.to_value(),
                slice("v4xyz", false, &v4),
                slice("v6xyz", true, &v6),
            ]),
        )?;
        lab.start_agent()?;

        for vip in ["[fd00:96::10]:80", "10.96.0.20:80", "[fd00:96::20]:80"] {
            let mut o = lab.client(sa(vip), Proto::Tcp);
            o.count = 150;
            let r = lab.run_client(&o)?;
            eprintln!("{}", r.summary());
            ensure!(r.attempts == 150, "{}", r.summary());
            assert_spread(&r, &["a", "b", "c"], 0.10)?;
            assert_all(&r.peer_names, vip, &r, "getpeername")?;
        }
        for vip in ["10.96.0.20:53", "[fd00:96::20]:53"] {
            let mut o = lab.client(sa(vip), Proto::Udp);
            o.count = 150;
            let r = lab.run_client(&o)?;
            eprintln!("{}", r.summary());
            ensure!(r.attempts == 150, "{}", r.summary());
            assert_spread(&r, &["a", "b", "c"], 0.10)?;
            assert_all(&r.reply_sources, vip, &r, "recvfrom source")?;
        }
        Ok(())
    });
}

/// Case 4: Named targetPort: each Service port reaches the slice port of the same name, whose
/// number differs from the Service port's; the slice lists its ports in another order.
#[test]
fn named_target_port_resolves_through_slice_port_names() {
    e2e(&["a", "b", "c"], |lab| {
        for b in ["a", "b", "c"] {
            let addr = IpAddr::from(lab.topo.backend(b).addr4);
            // Different reply ids per port show which port a connection really reached.
            lab.serve(b, &format!("{b}-http"), &[SocketAddr::new(addr, 8080)], &[])?;
            lab.serve(b, &format!("{b}-alt"), &[SocketAddr::new(addr, 9090)], &[])?;
        }
        let svc = Service::new(NS, "named", &[ip("10.96.0.30")])
            .port("http", 80, TargetPort::Name("http".into()), Protocol::Tcp)
            .port("alt", 81, TargetPort::Name("alt".into()), Protocol::Tcp);
        let slice = EndpointSlice::new(NS, "named", "n4m3d", false)
            .port("alt", 9090, Protocol::Tcp)
            .port("http", 8080, Protocol::Tcp)
            .ready_endpoints(&lab.topo.addrs(false));
        lab.write_manifest(
            "named.yaml",
            &yaml_docs(&[svc.to_value(), slice.to_value()]),
        )?;
        lab.start_agent()?;

        for (vip, suffix) in [("10.96.0.30:80", "http"), ("10.96.0.30:81", "alt")] {
            let mut o = lab.client(sa(vip), Proto::Tcp);
            o.count = 150;
            let r = lab.run_client(&o)?;
            eprintln!("{}", r.summary());
            ensure!(r.attempts == 150, "{}", r.summary());
            let ids: Vec<String> = ["a", "b", "c"]
                .iter()
                .map(|b| format!("{b}-{suffix}"))
                .collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            assert_spread(&r, &ids, 0.10)?;
        }
        Ok(())
    });
}

/// Case 5: A backend removed from the slice while a client loops: after the agent logs the
/// sync, no new connection reaches it, and no connection fails at any time.
#[test]
fn endpoint_removal_while_traffic_runs() {
    e2e(&["a", "b", "c"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let all = lab.topo.addrs(false);
        lab.write_manifest(
            "web.yaml",
            &tcp_service(NS, "web", "10.96.0.50", 80, 8080, &all),
        )?;
        lab.start_agent()?;

        let mut bg = lab.client(sa("10.96.0.50:80"), Proto::Tcp);
        bg.count = 0;
        bg.duration = Some(Duration::from_secs(4));
        bg.interval = Duration::from_millis(2);
        let running = lab.spawn_client(&bg)?;
        std::thread::sleep(Duration::from_secs(1));

        let before = lab.agent().applied_count();
        lab.write_manifest(
            "web.yaml",
            &tcp_service(NS, "web", "10.96.0.50", 80, 8080, &all[..2]),
        )?;
        let took = lab
            .agent()
            .wait_applied(before + 1, Duration::from_secs(10))?;
        eprintln!(
            "slice change applied {} ms after the write",
            took.as_millis()
        );
        // The contract is "within 1 s"; allow scheduling slack on a busy 2-core machine.
        ensure!(
            took < Duration::from_secs(2),
            "the change took {took:?} to apply"
        );

        let mut o = lab.client(sa("10.96.0.50:80"), Proto::Tcp);
        o.count = 300;
        let after = lab.run_client(&o)?;
        eprintln!("after removal: {}", after.summary());
        ensure!(
            after.count("c") == 0,
            "removed backend still chosen: {}",
            after.summary()
        );
        assert_spread(&after, &["a", "b"], 0.10)?;

        let during = running.wait()?;
        eprintln!("during: {}", during.summary());
        ensure!(
            during.failed == 0,
            "failures while the slice changed: {}",
            during.summary()
        );
        ensure!(
            during.count("c") > 0,
            "backend c never used before its removal: {}",
            during.summary()
        );
        let ids: BTreeSet<&str> = during.backends.keys().map(String::as_str).collect();
        ensure!(
            ids.is_subset(&BTreeSet::from(["a", "b", "c"])),
            "{}",
            during.summary()
        );
        Ok(())
    });
}

/// Case 6: Services with no usable endpoint (empty slice, no slice, only non-serving
/// endpoints) refuse at once with ECONNREFUSED, for TCP connect and UDP send.
#[test]
fn no_endpoints_refuses_immediately() {
    e2e(&["a"], |lab| {
        // A backend that answers, so that any misrouted attempt would succeed and show.
        let a = IpAddr::from(lab.topo.backend("a").addr4);
        lab.serve(
            "a",
            "a",
            &[SocketAddr::new(a, 8080)],
            &[SocketAddr::new(a, 5353)],
        )?;
        let empty = Service::new(NS, "empty", &[ip("10.96.0.40")])
            .port("http", 80, TargetPort::Number(8080), Protocol::Tcp)
            .port("dns", 53, TargetPort::Number(5353), Protocol::Udp);
        let empty_slice = EndpointSlice::new(NS, "empty", "e0000", false)
            .port("http", 8080, Protocol::Tcp)
            .port("dns", 5353, Protocol::Udp);
        let no_slice = Service::new(NS, "noslice", &[ip("10.96.0.41")]).port(
            "http",
            80,
            TargetPort::Number(8080),
            Protocol::Tcp,
        );
        let not_serving = Service::new(NS, "notserving", &[ip("10.96.0.42")]).port(
            "http",
            80,
            TargetPort::Number(8080),
            Protocol::Tcp,
        );
        let not_serving_slice = EndpointSlice::new(NS, "notserving", "n0000", false)
            .port("http", 8080, Protocol::Tcp)
            .endpoint(Endpoint::ready(a).conditions(Some(false), Some(false), Some(true)));
        lab.write_manifest(
            "refused.yaml",
            &yaml_docs(&[
                empty.to_value(),
                empty_slice.to_value(),
                no_slice.to_value(),
                not_serving.to_value(),
                not_serving_slice.to_value(),
            ]),
        )?;
        // EPERM on kernels without bpf_set_retval (5.10 in the guests, or forced off in
        // the fallback run): the agent's probe says which.
        let errno = lab.start_agent()?.refused_errno();

        for (vip, proto) in [
            ("10.96.0.40:80", Proto::Tcp),
            ("10.96.0.41:80", Proto::Tcp),
            ("10.96.0.42:80", Proto::Tcp),
            ("10.96.0.40:53", Proto::Udp),
            ("10.96.0.40:53", Proto::UdpConnected),
        ] {
            let mut o = lab.client(sa(vip), proto);
            o.count = 20;
            o.timeout = Duration::from_secs(2);
            let r = lab.run_client(&o)?;
            eprintln!("{}", r.summary());
            ensure!(
                r.attempts == 20 && r.failures_of(errno) == 20,
                "{proto} {vip}: expected 20 × {errno}: {r:?}"
            );
            let step = match proto {
                Proto::Udp => format!("send:{errno}"),
                Proto::Tcp | Proto::UdpConnected => format!("connect:{errno}"),
            };
            ensure!(
                r.failure_steps.get(&step) == Some(&20),
                "{proto} {vip}: refused at the wrong step: {:?}",
                r.failure_steps
            );
            // Refused by the socket hook itself, not after waiting for a timeout.
            ensure!(
                r.max_failure_us < 200_000,
                "{proto} {vip}: slowest refusal took {} µs (timeout is 2 s)",
                r.max_failure_us
            );
        }
        Ok(())
    });
}

/// Case 7: The agent restarts while clients loop: programs stay attached through the pinned
/// links, the restarted agent adopts them (no second attachment), and no attempt fails or
/// reaches anything but a backend.
#[test]
fn agent_restart_keeps_traffic_flowing() {
    e2e(&["a", "b", "c"], |lab| {
        for b in ["a", "b", "c"] {
            let addr = IpAddr::from(lab.topo.backend(b).addr4);
            lab.serve(
                b,
                b,
                &[SocketAddr::new(addr, 8080)],
                &[SocketAddr::new(addr, 5353)],
            )?;
        }
        let svc = Service::new(NS, "web", &[ip("10.96.0.55")])
            .port("http", 80, TargetPort::Number(8080), Protocol::Tcp)
            .port("dns", 53, TargetPort::Number(5353), Protocol::Udp);
        let slice = EndpointSlice::new(NS, "web", "r3st4", false)
            .port("http", 8080, Protocol::Tcp)
            .port("dns", 5353, Protocol::Udp)
            .ready_endpoints(&lab.topo.addrs(false));
        lab.write_manifest("web.yaml", &yaml_docs(&[svc.to_value(), slice.to_value()]))?;
        lab.start_agent()?;
        let attached_before = wait_attached(lab.cgroup())?;
        ensure!(
            attached_before.iter().all(|(_, n)| *n == 1),
            "expected one program per socket hook: {attached_before:?}"
        );

        let mut clients = Vec::new();
        for (vip, proto) in [("10.96.0.55:80", Proto::Tcp), ("10.96.0.55:53", Proto::Udp)] {
            let mut o = lab.client(sa(vip), proto);
            o.count = 0;
            o.duration = Some(Duration::from_secs(6));
            o.interval = Duration::from_millis(2);
            clients.push(lab.spawn_client(&o)?);
        }
        std::thread::sleep(Duration::from_millis(1500));

        let mut old = lab.take_agent().context("agent")?;
        let t0 = Instant::now();
        let (status, graceful) = old.terminate(Duration::from_secs(5))?;
        eprintln!("agent stopped in {} ms: {status}", t0.elapsed().as_millis());
        ensure!(graceful, "the agent ignored SIGTERM for 5 s");
        ensure!(
            status.success(),
            "the agent exited with {status} on SIGTERM"
        );
        drop(old);
        ensure!(
            !entries(lab.bpffs()).is_empty(),
            "the stopped agent left no pins in {}",
            lab.bpffs().display()
        );
        // Traffic keeps flowing with no agent at all.
        std::thread::sleep(Duration::from_secs(1));
        lab.start_agent()?;
        let attached_after = wait_attached(lab.cgroup())?;
        ensure!(
            attached_after == attached_before,
            "attachments before the restart: {attached_before:?}\nafter: {attached_after:?}"
        );

        for c in clients {
            let r = c.wait()?;
            eprintln!("across the restart: {}", r.summary());
            ensure!(r.attempts > 100, "too few attempts: {}", r.summary());
            assert_spread(&r, &["a", "b", "c"], 0.05)?;
        }
        let mut o = lab.client(sa("10.96.0.55:80"), Proto::Tcp);
        o.count = 100;
        let r = lab.run_client(&o)?;
        assert_spread(&r, &["a", "b", "c"], 0.05)?;
        Ok(())
    });
}

/// The first `sync applied` line means the datapath is live: every socket hook already
/// has its program at that moment (tests start traffic right after that line).
#[test]
fn programs_are_attached_when_the_first_sync_is_logged() {
    e2e(&["a"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        lab.write_manifest(
            "web.yaml",
            &tcp_service(NS, "web", "10.96.0.66", 80, 8080, &addrs),
        )?;
        lab.start_agent()?;
        // Queried in-process within microseconds of the line, before anything else.
        let counts = sock_program_counts(lab.cgroup())?;
        ensure!(
            counts.iter().all(|(_, n)| *n == 1),
            "programs attached when the agent logged its first `sync applied`: {counts:?}"
        );
        let mut o = lab.client(sa("10.96.0.66:80"), Proto::Tcp);
        o.count = 10;
        let r = lab.run_client(&o)?;
        ensure!(r.count("a") == 10, "{}", r.summary());
        Ok(())
    });
}

/// Pins a map where an earlier version pinned one this version no longer uses.
fn plant_retired_pin(bpffs: &Path) -> Result<std::path::PathBuf> {
    let pin = bpffs.join(svc_lb_common::RETIRED_MAPS[0]);
    let pin_s = pin.to_string_lossy().into_owned();
    cmd::run(
        "bpftool",
        [
            "map",
            "create",
            &pin_s,
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "32",
            "name",
            "LB_COUNTERS_V1",
        ],
    )?;
    ensure!(pin.exists(), "bpftool did not pin {pin_s}");
    Ok(pin)
}

/// Case 8: `svc-lb cleanup` detaches every program and removes every pin: the VIP is no longer
/// translated (ENETUNREACH in the no-route namespace) and bpftool shows nothing attached.
/// The pin of a map an earlier version used (`RETIRED_MAPS`) is removed by the agent at
/// start, and by `cleanup` too.
#[test]
fn cleanup_detaches_everything() {
    e2e(&["a"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        lab.write_manifest(
            "web.yaml",
            &tcp_service(NS, "web", "10.96.0.65", 80, 8080, &addrs),
        )?;
        std::fs::create_dir_all(lab.bpffs()).context("create the pin directory")?;
        let retired = plant_retired_pin(lab.bpffs())?;
        lab.start_agent()?;
        ensure!(!retired.exists(), "the agent kept the retired pin");
        let mut o = lab.client(sa("10.96.0.65:80"), Proto::Tcp);
        o.count = 20;
        let r = lab.run_client(&o)?;
        ensure!(r.count("a") == 20, "{}", r.summary());
        ensure!(
            !cgroup_programs(lab.cgroup())?.is_empty(),
            "nothing attached"
        );

        let mut agent = lab.take_agent().context("agent")?;
        agent.terminate(Duration::from_secs(5))?;
        drop(agent);
        plant_retired_pin(lab.bpffs())?;
        let cg = lab.cgroup().to_path_buf();
        let out = lab.svc_lb(&["cleanup", "--cgroup", &cg.to_string_lossy()])?;
        ensure!(
            out.status.success(),
            "svc-lb cleanup failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let r = lab.run_client(&o)?;
        ensure!(
            r.failures_of("ENETUNREACH") == 20,
            "the VIP is still translated after cleanup: {}",
            r.summary()
        );
        let left = entries(lab.bpffs());
        ensure!(
            left.is_empty(),
            "pins left in {}: {left:?}",
            lab.bpffs().display()
        );
        let progs = cgroup_programs(&cg)?;
        ensure!(progs.is_empty(), "programs still attached: {progs:?}");
        Ok(())
    });
}

/// Case 9: Bad files next to a good one: the good Service works and the agent stays up, also
/// when more bad input arrives while it runs.
#[test]
fn bad_input_does_not_stop_the_good_service() {
    e2e(&["a", "b"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        lab.write_manifest(
            "good.yaml",
            &tcp_service(NS, "good", "10.96.0.60", 80, 8080, &addrs),
        )?;
        lab.write_manifest(
            "broken.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n",
        )?;
        lab.write_manifest(
            "unknown-kind.yaml",
            "apiVersion: example.com/v1\nkind: Frobnicator\nmetadata:\n  name: x\n  namespace: e2e\nspec: {}\n",
        )?;
        let bad_port = Service::new(NS, "badport", &[ip("10.96.0.61")]).port(
            "http",
            80,
            TargetPort::Number(8080),
            Protocol::Tcp,
        );
        let bad_port = yaml_docs(&[bad_port.to_value()]).replace("port: 80\n", "port: 70000\n");
        ensure!(bad_port.contains("port: 70000"), "{bad_port}");
        lab.write_manifest("bad-port.yaml", &bad_port)?;
        let bad_ip = tcp_service(NS, "badip", "10.96.0.62", 80, 8080, &addrs)
            .replace("10.96.0.62", "10.96.0.999")
            .replace(&addrs[0].to_string(), "10.240.1.300");
        lab.write_manifest("bad-ip.yaml", &bad_ip)?;
        lab.write_manifest("notes.txt", "not a manifest: ignored by extension\n")?;
        lab.start_agent()?;

        let mut o = lab.client(sa("10.96.0.60:80"), Proto::Tcp);
        o.count = 200;
        let r = lab.run_client(&o)?;
        eprintln!("{}", r.summary());
        ensure!(r.attempts == 200, "{}", r.summary());
        assert_spread(&r, &["a", "b"], 0.10)?;
        ensure!(lab.agent().is_running()?, "the agent exited on bad input");

        // More bad input while running: an empty file and a truncated one.
        let before = lab.agent().applied_count();
        lab.write_manifest("empty.yaml", "")?;
        lab.write_manifest(
            "truncated.json",
            "{\"apiVersion\": \"v1\", \"kind\": \"Serv",
        )?;
        // Give the watcher time to react (there may or may not be an applied sync).
        std::thread::sleep(Duration::from_millis(1500));
        ensure!(
            lab.agent().is_running()?,
            "the agent exited on bad input while running"
        );
        eprintln!(
            "syncs applied after the new bad files: {}",
            lab.agent().applied_count() - before
        );
        let r = lab.run_client(&o)?;
        ensure!(r.attempts == 200, "{}", r.summary());
        assert_spread(&r, &["a", "b"], 0.10)?;
        Ok(())
    });
}

/// Case 10: `svc-lb list -o json` shows each frontend with its backends.
#[test]
fn list_shows_frontends_and_backends() {
    e2e(&["a", "b"], |lab| {
        let addrs = lab.topo.addrs(false);
        let svc = Service::new(NS, "listed", &[ip("10.96.0.70")])
            .port("http", 80, TargetPort::Number(8080), Protocol::Tcp)
            .port("dns", 53, TargetPort::Number(5353), Protocol::Udp);
        let slice = EndpointSlice::new(NS, "listed", "l1st0", false)
            .port("http", 8080, Protocol::Tcp)
            .port("dns", 5353, Protocol::Udp)
            .ready_endpoints(&addrs);
        lab.write_manifest(
            "listed.yaml",
            &yaml_docs(&[svc.to_value(), slice.to_value()]),
        )?;
        lab.start_agent()?;

        let out = lab.svc_lb(&["list", "-o", "json"])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "svc-lb list failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_str(&stdout).with_context(|| format!("parse: {stdout}"))?;
        let list = v.as_array().context("list -o json is not an array")?;
        for (port, proto, target) in [(80, "TCP", 8080), (53, "UDP", 5353)] {
            let fe = list
                .iter()
                .find(|f| {
                    f["address"] == "10.96.0.70" && f["port"] == port && f["protocol"] == proto
                })
                .with_context(|| format!("no frontend 10.96.0.70:{port}/{proto} in {stdout}"))?;
            let backends = fe["backends"].as_array().context("backends")?;
            let got: BTreeSet<(String, u64)> = backends
                .iter()
                .map(|b| {
                    (
                        b["address"].as_str().unwrap_or_default().to_owned(),
                        b["port"].as_u64().unwrap_or_default(),
                    )
                })
                .collect();
            let want: BTreeSet<(String, u64)> =
                addrs.iter().map(|a| (a.to_string(), target)).collect();
            ensure!(
                got == want,
                "{port}/{proto}: backends {got:?}, expected {want:?}"
            );
            for b in backends {
                ensure!(
                    b["state"].as_str().is_some_and(|s| !s.is_empty()),
                    "backend without a state: {b}"
                );
            }
        }
        Ok(())
    });
}

/// Endpoint conditions: ready endpoints (an unset `ready` counts as ready) are used; a
/// not-ready serving terminating endpoint only when nothing is ready; a non-serving one
/// never.
#[test]
fn endpoint_conditions_choose_the_backends() {
    e2e(&["a", "b", "c"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let [a, b, c] = <[IpAddr; 3]>::try_from(lab.topo.addrs(false))
            .map_err(|_| anyhow::anyhow!("3 backends"))?;
        let mixed = Service::new(NS, "mixed", &[ip("10.96.0.80")]).port(
            "http",
            80,
            TargetPort::Number(8080),
            Protocol::Tcp,
        );
        let mixed_slice = EndpointSlice::new(NS, "mixed", "m1x3d", false)
            .port("http", 8080, Protocol::Tcp)
            .endpoint(Endpoint::ready(a))
            .endpoint(Endpoint::ready(b).conditions(None, None, None))
            .endpoint(Endpoint::ready(c).conditions(Some(false), Some(true), Some(true)));
        let draining = Service::new(NS, "draining", &[ip("10.96.0.81")]).port(
            "http",
            80,
            TargetPort::Number(8080),
            Protocol::Tcp,
        );
        let draining_slice = EndpointSlice::new(NS, "draining", "d4a1n", false)
            .port("http", 8080, Protocol::Tcp)
            .endpoint(Endpoint::ready(a).conditions(Some(false), Some(true), Some(true)))
            .endpoint(Endpoint::ready(b).conditions(Some(false), Some(false), Some(true)))
            .endpoint(Endpoint::ready(c).conditions(Some(false), Some(false), Some(false)));
        lab.write_manifest(
            "conditions.yaml",
            &yaml_docs(&[
                mixed.to_value(),
                mixed_slice.to_value(),
                draining.to_value(),
                draining_slice.to_value(),
            ]),
        )?;
        lab.start_agent()?;

        let mut o = lab.client(sa("10.96.0.80:80"), Proto::Tcp);
        o.count = 200;
        let r = lab.run_client(&o)?;
        eprintln!("mixed: {}", r.summary());
        assert_spread(&r, &["a", "b"], 0.10)?;

        let mut o = lab.client(sa("10.96.0.81:80"), Proto::Tcp);
        o.count = 100;
        let r = lab.run_client(&o)?;
        eprintln!("draining: {}", r.summary());
        ensure!(
            r.count("a") == 100,
            "only the serving terminating endpoint may answer: {}",
            r.summary()
        );
        Ok(())
    });
}

/// `(LB_CT_V2, LB_AFFEXT_V1)` sizes of the pinned maps.
fn ext_lru_sizes(bpffs: &Path) -> Result<(u32, u32)> {
    Ok((
        pinned_max_entries(bpffs, svc_lb_common::MAP_CT)?,
        pinned_max_entries(bpffs, svc_lb_common::MAP_AFFINITY_EXT)?,
    ))
}

/// `max_entries` of the pinned map `name`.
fn pinned_max_entries(bpffs: &Path, name: &str) -> Result<u32> {
    Ok(aya::maps::MapInfo::from_pin(bpffs.join(name))
        .with_context(|| format!("info of pinned {name}"))?
        .max_entries())
}

/// 30 TCP connections to `vip`, every one answered by backend `a`.
fn check_web(lab: &Lab, vip: &str, step: &str) -> Result<()> {
    let mut o = lab.client(sa(vip), Proto::Tcp);
    o.count = 30;
    let r = lab.run_client(&o)?;
    ensure!(
        r.attempts == 30 && r.failed == 0 && r.backends.get("a") == Some(&30),
        "{step}: {}",
        r.summary()
    );
    Ok(())
}

/// Stops an agent and checks that it exited cleanly.
fn stop_agent(agent: Option<svc_lb_tests::agent::Agent>) -> Result<()> {
    let (status, graceful) = agent
        .context("no agent")?
        .terminate(Duration::from_secs(5))?;
    ensure!(graceful && status.success(), "agent exit: {status}");
    Ok(())
}

/// The pinned conntrack map, as the tc programs write it.
fn pinned_ct(
    bpffs: &Path,
) -> Result<aya::maps::HashMap<aya::maps::MapData, svc_lb_common::CtKey, svc_lb_common::CtEntry>> {
    let data = aya::maps::MapData::from_pin(bpffs.join(svc_lb_common::MAP_CT))
        .context("open the pinned conntrack map")?;
    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))
        .context("the pinned conntrack map has an unexpected layout")
}

/// `--service-map-max`/`--backend-map-max`/`--revnat-map-max` size the maps an agent
/// creates; an agent started later with other sizes keeps the maps that hold entries
/// (the Services in them keep working) and replaces only the empty ones.
#[test]
fn map_size_flags_size_new_maps_and_a_filled_map_keeps_its_size() {
    e2e(&["a"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        lab.write_manifest(
            "web.yaml",
            &tcp_service(NS, "web", "10.96.0.61", 80, 8080, &addrs),
        )?;
        let check_traffic = |lab: &Lab, step: &str| check_web(lab, "10.96.0.61:80", step);
        let sizes = |lab: &Lab| -> Result<[u32; 4]> {
            Ok([
                pinned_max_entries(lab.bpffs(), svc_lb_common::MAP_SVC4)?,
                pinned_max_entries(lab.bpffs(), svc_lb_common::MAP_SVC6)?,
                pinned_max_entries(lab.bpffs(), svc_lb_common::MAP_BACKENDS)?,
                pinned_max_entries(lab.bpffs(), svc_lb_common::MAP_REVNAT)?,
            ])
        };
        // The lab's agent only to learn its configuration: it created default-sized maps.
        let base = lab.start_agent()?.config().clone();
        stop_agent(lab.take_agent())?;
        ensure!(
            sizes(lab)? != [4096, 4096, 2048, 1024],
            "the default sizes already equal the test's: {:?}",
            sizes(lab)?
        );

        let mut run = 0;
        let mut start = |lab: &Lab, args: &[&str]| -> Result<svc_lb_tests::agent::Agent> {
            run += 1;
            let mut c = base.clone();
            c.extra_args = args.iter().map(|a| (*a).to_owned()).collect();
            c.log_file = lab.dir().join(format!("agent-sized-{run}.log"));
            let mut a = svc_lb_tests::agent::Agent::start(c)?;
            a.wait_applied(1, Duration::from_secs(30))?;
            Ok(a)
        };
        // After `svc-lb cleanup` the maps are created anew, at the sizes asked for.
        cleanup(lab)?;
        let a = start(
            lab,
            &[
                "--service-map-max=4096",
                "--backend-map-max=2048",
                "--revnat-map-max=1024",
            ],
        )?;
        ensure!(
            sizes(lab)? == [4096, 4096, 2048, 1024],
            "sized: {:?}",
            sizes(lab)?
        );
        check_traffic(lab, "sized")?;
        stop_agent(Some(a))?;

        // The IPv4 maps hold the Service now: other sizes must not replace them. The
        // IPv6 service map is empty, so it takes the new size.
        let a = start(lab, &["--service-map-max=8192", "--backend-map-max=8192"])?;
        ensure!(
            sizes(lab)? == [4096, 8192, 2048, 1024],
            "a filled map was resized: {:?}",
            sizes(lab)?
        );
        check_traffic(lab, "kept")?;
        stop_agent(Some(a))?;
        Ok(())
    });
}

/// The external path's LRU maps are sized when the agent starts: one entry each with the
/// external path off, `--conntrack-max` with it on. A pinned map of another size is
/// replaced only when that loses nothing (empty, no tc link of an earlier run); one that
/// holds a flow keeps its size and the flow until `svc-lb cleanup`. Traffic through the
/// Service is counted at each step.
#[test]
fn conntrack_map_is_sized_at_start_and_a_busy_pin_keeps_its_flows() {
    e2e(&["a"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        lab.write_manifest(
            "web.yaml",
            &tcp_service(NS, "web", "10.96.0.60", 80, 8080, &addrs),
        )?;
        let check_traffic = |lab: &Lab, step: &str| check_web(lab, "10.96.0.60:80", step);
        let stop = stop_agent;

        // Manifest mode without --devices: the external path is off.
        let base = lab.start_agent()?.config().clone();
        ensure!(
            ext_lru_sizes(lab.bpffs())? == (1, 1),
            "off: {:?}",
            ext_lru_sizes(lab.bpffs())?
        );
        check_traffic(lab, "off")?;
        stop(lab.take_agent())?;

        // With a device (the agent in the client namespace, on its veth to backend a).
        let mut run = 0;
        let mut start_on = |lab: &Lab, args: &[&str]| -> Result<svc_lb_tests::agent::Agent> {
            run += 1;
            let mut c = base.clone();
            c.extra_args = args.iter().map(|a| (*a).to_owned()).collect();
            c.log_file = lab.dir().join(format!("agent-on-{run}.log"));
            let mut a = svc_lb_tests::agent::Agent::start_in_netns(c, lab.topo.client.name())?;
            a.wait_applied(1, Duration::from_secs(30))?;
            Ok(a)
        };
        // The 1-entry pins are empty and no tc link was ever pinned: replaced.
        let a = start_on(lab, &["--devices", "to-1", "--conntrack-max", "4096"])?;
        ensure!(
            ext_lru_sizes(lab.bpffs())? == (4096, svc_lb_common::AFFINITY_EXT_MAP_MAX),
            "on: {:?}",
            ext_lru_sizes(lab.bpffs())?
        );
        check_traffic(lab, "on")?;
        stop(Some(a))?;

        // A flow in the map: a new --conntrack-max must not drop it.
        let key = svc_lb_common::CtKey {
            sport_be: 4242u16.to_be(),
            ..bytemuck::Zeroable::zeroed()
        };
        pinned_ct(lab.bpffs())?
            .insert(
                key,
                <svc_lb_common::CtEntry as bytemuck::Zeroable>::zeroed(),
                0,
            )
            .context("insert a conntrack entry")?;
        let a = start_on(lab, &["--devices", "to-1", "--conntrack-max", "8192"])?;
        ensure!(
            ext_lru_sizes(lab.bpffs())?.0 == 4096,
            "resized under a live flow: {:?}",
            ext_lru_sizes(lab.bpffs())?
        );
        let kept: Vec<_> = pinned_ct(lab.bpffs())?.keys().collect::<Result<_, _>>()?;
        ensure!(
            kept == vec![key],
            "conntrack entries after the restart: {}",
            kept.len()
        );
        ensure!(
            a.log_text()
                .contains("keeping the pinned map at its old size"),
            "no warning about the kept size"
        );
        check_traffic(lab, "kept")?;
        stop(Some(a))?;

        // `svc-lb cleanup` lets the next start apply its size.
        cleanup(lab)?;
        lab.start_agent()?;
        ensure!(
            ext_lru_sizes(lab.bpffs())? == (1, 1),
            "off after cleanup: {:?}",
            ext_lru_sizes(lab.bpffs())?
        );
        check_traffic(lab, "off after cleanup")?;
        Ok(())
    });
}

/// An upgrade from the conntrack of earlier versions (`LB_CT_V1`, no counters): the
/// agent copies its live entries into `LB_CT_V2` (counters from 0) before its tc
/// programs take over, leaves the expired ones, and removes the old pin; traffic still
/// flows. The old map is made here with bpftool as an earlier agent pinned it.
#[test]
fn conntrack_v1_flows_are_copied_into_v2_at_start() {
    e2e(&["a"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        lab.write_manifest(
            "web.yaml",
            &tcp_service(NS, "web", "10.96.0.61", 80, 8080, &addrs),
        )?;
        let base = lab.start_agent()?.config().clone();
        stop_agent(lab.take_agent())?;
        cleanup(lab)?;
        std::fs::create_dir_all(lab.bpffs())?;

        let old = lab.bpffs().join(svc_lb_common::MAP_CT_V1);
        let old_s = old.to_str().context("pin path")?;
        cmd::run(
            "bpftool",
            [
                "map", "create", old_s, "type", "lru_hash", "key", "40", "value", "56", "entries",
                "1024", "name", "LB_CT_V1",
            ],
        )?;
        let mut v1: aya::maps::HashMap<_, svc_lb_common::CtKey, svc_lb_common::CtValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
                aya::maps::MapData::from_pin(&old).context("open the V1 pin")?,
            ))?;
        let key = |port: u16| svc_lb_common::CtKey {
            sport_be: port.to_be(),
            proto: svc_lb_common::PROTO_TCP,
            family: svc_lb_common::FAMILY_V4,
            ..bytemuck::Zeroable::zeroed()
        };
        let live = svc_lb_common::CtValue {
            expires_ns: monotonic_ns() + 600_000_000_000,
            backend_id: 7,
            rev_nat_id: 3,
            nat_port_be: 8080u16.to_be(),
            flags: svc_lb_common::CT_FLAG_ESTABLISHED,
            ..bytemuck::Zeroable::zeroed()
        };
        let expired = svc_lb_common::CtValue {
            expires_ns: 1,
            ..live
        };
        v1.insert(key(4242), live, 0)?;
        v1.insert(key(4243), expired, 0)?;
        drop(v1);

        let mut c = base.clone();
        c.extra_args = vec!["--devices".into(), "to-1".into()];
        c.log_file = lab.dir().join("agent-upgrade.log");
        let mut a = svc_lb_tests::agent::Agent::start_in_netns(c, lab.topo.client.name())?;
        a.wait_applied(1, Duration::from_secs(30))?;
        let v2 = pinned_ct(lab.bpffs())?;
        let got = v2
            .get(&key(4242), 0)
            .context("the live V1 flow is not in LB_CT_V2")?;
        ensure!(
            got.ct == live && got.packets == 0 && got.bytes == 0,
            "copied entry: {got:?}, expected {live:?} with counters 0"
        );
        ensure!(
            v2.get(&key(4243), 0).is_err(),
            "the expired V1 flow was copied"
        );
        ensure!(!old.exists(), "the LB_CT_V1 pin is still there");
        check_web(lab, "10.96.0.61:80", "after the upgrade")?;
        stop_agent(Some(a))?;
        Ok(())
    });
}

/// CLOCK_MONOTONIC in ns, as the programs' `bpf_ktime_get_ns` reads it.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `svc-lb cleanup` of this lab's cgroup and pins (the agent stopped before), which must
/// succeed.
fn cleanup(lab: &Lab) -> Result<()> {
    let cg = lab.cgroup().to_str().context("cgroup path")?.to_owned();
    let out = lab.svc_lb(&["cleanup", "--cgroup", &cg])?;
    ensure!(out.status.success(), "cleanup: {out:?}");
    Ok(())
}
