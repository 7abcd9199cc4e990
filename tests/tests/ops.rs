//! Privileged end-to-end tests of the operability surface: the metrics endpoint,
//! `svc-lb list`, `status` and `trace` against real traffic, and `--bpf-log`.
//!
//! Run as root, one at a time, after `cargo build --release -p svc-lb`:
//! `cargo test --release -p svc-lb-tests --features e2e --test ops -- --test-threads=1`.
//! Every connection is counted, and the counts the datapath reports must match exactly.
#![cfg(feature = "e2e")]

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use svc_lb_tests::{
    ClientReport, Lab, Proto,
    lab::with_lab,
    manifests::{EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
    metrics::{http_get, metric, metrics_addr, parse_metrics, start_agent},
};
use svc_lb_tests::{ip, sa};

const NS: &str = "ops";

/// Builds a lab, runs `body`, tears it down, then checks nothing of this run is left.
fn e2e(ids: &[&str], body: impl FnOnce(&mut Lab) -> Result<()>) {
    with_lab(env!("CARGO_BIN_EXE_svclb-harness"), ids, body);
}

fn svc_lb_json(lab: &Lab, args: &[&str]) -> Result<Value> {
    let out = lab.svc_lb(args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "svc-lb {args:?} failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).with_context(|| format!("parse {args:?}: {stdout}"))
}

/// A Service `name` with the given ports and ready endpoints at `addrs` (empty: no
/// EndpointSlice at all).
fn service(
    name: &str,
    vip: &str,
    ports: &[(&str, u16, u16, Protocol)],
    addrs: &[IpAddr],
    affinity_s: Option<u32>,
) -> String {
    let mut svc = Service::new(NS, name, &[ip(vip)]);
    for (pname, port, target, proto) in ports {
        svc = svc.port(pname, *port, TargetPort::Number(*target), *proto);
    }
    let mut svc = svc.to_value();
    if let Some(t) = affinity_s {
        svc["spec"]["sessionAffinity"] = "ClientIP".into();
        svc["spec"]["sessionAffinityConfig"] =
            serde_json::json!({"clientIP": {"timeoutSeconds": t}});
    }
    let mut docs = vec![svc];
    if !addrs.is_empty() {
        let mut slice = EndpointSlice::new(NS, name, "x0p9", false);
        for (pname, _, target, proto) in ports {
            slice = slice.port(pname, *target, *proto);
        }
        docs.push(slice.ready_endpoints(addrs).to_value());
    }
    yaml_docs(&docs)
}

fn ok_run(lab: &Lab, target: &str, proto: Proto, count: u64) -> Result<ClientReport> {
    let mut o = lab.client(sa(target), proto);
    o.count = count;
    let r = lab.run_client(&o)?;
    eprintln!("{}", r.summary());
    ensure!(r.is_consistent(), "inconsistent report: {r:?}");
    ensure!(
        r.ok == count && r.failed == 0,
        "{}; first failures: {:?}",
        r.summary(),
        r.failure_samples
    );
    Ok(r)
}

/// Real TCP, UDP and refused traffic, then the metrics, `list` and `status` must count
/// exactly what was sent, per Service and per backend.
#[test]
fn metrics_list_and_status_count_real_traffic() {
    e2e(&["a", "b"], |lab| {
        let (a, b) = (lab.topo.backend("a").addr4, lab.topo.backend("b").addr4);
        for (id, addr) in [("a", a), ("b", b)] {
            lab.serve(
                id,
                id,
                &[SocketAddr::new(addr.into(), 8080)],
                &[SocketAddr::new(addr.into(), 5353)],
            )?;
        }
        let addrs = lab.topo.addrs(false);
        lab.write_manifest(
            "web.yaml",
            &service(
                "web",
                "10.96.5.10",
                &[
                    ("http", 80, 8080, Protocol::Tcp),
                    ("dns", 53, 5353, Protocol::Udp),
                ],
                &addrs,
                None,
            ),
        )?;
        lab.write_manifest(
            "empty.yaml",
            &service(
                "empty",
                "10.96.5.30",
                &[("http", 80, 8080, Protocol::Tcp)],
                &[],
                None,
            ),
        )?;
        // Bad input next to the good Services: `status` names it and says why.
        lab.write_manifest(
            "bad.yaml",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: badport\n  namespace: ops\nspec:\n  clusterIP: 10.96.5.40\n  ports:\n  - port: 70000\n",
        )?;
        let agent = start_agent(lab, "metrics", &[])?;
        let addr = metrics_addr(&agent)?;

        let tcp = ok_run(lab, "10.96.5.10:80", Proto::Tcp, 60)?;
        let udp = ok_run(lab, "10.96.5.10:53", Proto::Udp, 40)?;
        let mut o = lab.client(sa("10.96.5.30:80"), Proto::Tcp);
        o.count = 7;
        let refused = lab.run_client(&o)?;
        ensure!(
            refused.failures_of("ECONNREFUSED") == 7,
            "{}",
            refused.summary()
        );

        let m = parse_metrics(&http_get(addr, "/metrics")?);
        let svc = |name: &str| {
            format!(r#"svclb_service_new_connections_total{{namespace="{NS}",service="{name}"}}"#)
        };
        ensure!(
            metric(&m, &svc("web"))? == 100.0,
            "web: {}",
            metric(&m, &svc("web"))?
        );
        ensure!(metric(&m, &svc("empty"))? == 0.0);
        let fe = |port_name: &str, fe: &str| {
            format!(
                r#"svclb_frontend_new_connections_total{{namespace="{NS}",service="web",port_name="{port_name}",kind="ClusterIP",scope="socket",frontend="{fe}"}}"#
            )
        };
        ensure!(metric(&m, &fe("http", "10.96.5.10:80/TCP"))? == 60.0);
        ensure!(metric(&m, &fe("dns", "10.96.5.10:53/UDP"))? == 40.0);
        for (id, host) in [("a", a), ("b", b)] {
            for (port, proto, report) in [(8080, "TCP", &tcp), (5353, "UDP", &udp)] {
                let series = format!(
                    r#"svclb_backend_new_connections_total{{namespace="{NS}",service="web",backend="{host}:{port}/{proto}"}}"#
                );
                let got = metric(&m, &series)?;
                ensure!(
                    got == report.count(id) as f64,
                    "{series} = {got}, but backend {id} answered {}",
                    report.count(id)
                );
            }
        }
        for (series, want) in [
            (
                r#"svclb_datapath_translations_total{hook="sock",direction="forward"}"#,
                100.0,
            ),
            (
                r#"svclb_datapath_rejects_total{hook="sock",reason="no_backend"}"#,
                7.0,
            ),
            (
                r#"svclb_datapath_rejects_total{hook="sock",reason="slot_missing"}"#,
                0.0,
            ),
            (
                r#"svclb_datapath_rejects_total{hook="sock",reason="backend_missing"}"#,
                0.0,
            ),
            (
                r#"svclb_datapath_errors_total{hook="sock",reason="revnat_update"}"#,
                0.0,
            ),
            ("svclb_programmed_services", 2.0),
            ("svclb_programmed_frontends", 3.0),
            ("svclb_programmed_backends", 4.0),
            // 3 masters + 2 + 2 slots.
            (r#"svclb_map_entries{map="LB_SVC4_V1"}"#, 7.0),
            (r#"svclb_map_entries{map="LB_BACKENDS_V1"}"#, 4.0),
            ("svclb_datapath_readable", 1.0),
            ("svclb_sync_errors_total", 0.0),
            ("svclb_last_sync_success", 1.0),
        ] {
            let got = metric(&m, series)?;
            ensure!(got == want, "{series} = {got}, expected {want}");
        }
        let syncs = metric(&m, "svclb_syncs_total")?;
        ensure!(syncs >= 1.0, "svclb_syncs_total = {syncs}");
        ensure!(metric(&m, "svclb_sync_duration_seconds_count")? == syncs);

        // `list` reads the same counters from the pins.
        let list = svc_lb_json(lab, &["list", "-o", "json", "--service", "ops/web"])?;
        let list = list.as_array().context("list is an array")?;
        ensure!(list.len() == 2, "two frontends of ops/web: {list:?}");
        for fe in list {
            let (report, want) = match fe["protocol"].as_str() {
                Some("TCP") => (&tcp, 60),
                Some("UDP") => (&udp, 40),
                other => bail!("unexpected protocol {other:?}"),
            };
            ensure!(fe["new_connections"] == want, "{fe}");
            for be in fe["backends"].as_array().context("backends")? {
                let id = if be["address"] == a.to_string() {
                    "a"
                } else {
                    "b"
                };
                ensure!(be["new_connections"] == report.count(id), "{be} vs {id}");
                ensure!(be["shared"] == false, "{be}");
            }
        }
        let text = String::from_utf8_lossy(&lab.svc_lb(&["list"])?.stdout).into_owned();
        ensure!(
            text.contains("ClusterIP") && text.contains("ops/empty:http"),
            "{text}"
        );
        ensure!(
            text.contains("(no backends: connections are refused)"),
            "{text}"
        );

        // `status` asks the agent and reads programs and maps from bpffs.
        let st = svc_lb_json(
            lab,
            &["status", "-o", "json", "--metrics-addr", &addr.to_string()],
        )?;
        ensure!(st["agent"]["reachable"] == true, "{st}");
        ensure!(st["agent"]["status"]["last_sync"]["ok"] == true, "{st}");
        ensure!(st["agent"]["status"]["attached"] == true, "{st}");
        let problems = &st["agent"]["status"]["problems"];
        ensure!(
            st["agent"]["status"]["problems_total"] == 1
                && problems[0]
                    .as_str()
                    .is_some_and(|p| p.contains("badport") && p.contains("70000")),
            "status must name the bad Service and its port: {problems}"
        );
        let hooks: Vec<&str> = st["programs"]
            .as_array()
            .context("programs")?
            .iter()
            .filter_map(|p| p["attach_type"].as_str())
            .collect();
        ensure!(
            hooks
                == [
                    "connect4",
                    "connect6",
                    "sendmsg4",
                    "sendmsg6",
                    "recvmsg4",
                    "recvmsg6",
                    "getpeername4",
                    "getpeername6",
                    // The connection counts (issue 15), on the same cgroup.
                    "sock_ops"
                ],
            "{hooks:?}"
        );
        let cg = format!("cgroup {}", lab.cgroup().display());
        for p in st["programs"].as_array().context("programs")? {
            ensure!(p["attached_to"] == cg.as_str(), "{p}");
            ensure!(
                p["name"].as_str().is_some_and(|n| n.starts_with("svclb_")),
                "{p}"
            );
        }
        let maps = st["maps"].as_array().context("maps")?;
        for m in maps {
            ensure!(m["capacity"].as_u64().is_some_and(|c| c > 0), "{m}");
        }
        let svc4 = maps
            .iter()
            .find(|m| m["name"] == "LB_SVC4_V1")
            .context("LB_SVC4_V1")?;
        ensure!(svc4["entries"] == 7, "{svc4}");
        // The kernel section is the agent's probe: every feature with its state.
        let k = &st["kernel"];
        ensure!(k["probed_by"] == "agent", "{k}");
        ensure!(k["release"].as_str().is_some_and(|r| !r.is_empty()), "{k}");
        let feature = |name: &str| {
            k["features"]
                .as_array()
                .and_then(|f| f.iter().find(|f| f["name"] == name))
                .cloned()
        };
        for name in ["sock_addr_hooks", "cgroup_link", "tcx", "set_retval"] {
            let f = feature(name).with_context(|| format!("feature {name} in {k}"))?;
            ensure!(
                f["state"] == "found" || f["state"] == "forced_off",
                "{name} on this kernel: {f}"
            );
        }

        // With the agent gone, status still shows the datapath and says so.
        drop(agent);
        let out = lab.svc_lb(&["status", "--metrics-addr", &addr.to_string()])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success(), "{text}");
        ensure!(text.contains("not reachable"), "{text}");
        ensure!(text.contains("svclb_connect4"), "{text}");
        ensure!(text.contains("(probed by this command)"), "{text}");
        Ok(())
    });
}

/// `trace` and real connections agree: a refused Service, an address that is not a
/// Service, and a Service with one backend.
#[test]
fn trace_verdicts_match_real_connections() {
    e2e(&["a", "b"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let b = lab.topo.backend("b").addr4;
        lab.write_manifest(
            "one.yaml",
            &service(
                "one",
                "10.96.6.10",
                &[("http", 80, 8080, Protocol::Tcp)],
                &[b.into()],
                None,
            ),
        )?;
        lab.write_manifest(
            "empty.yaml",
            &service(
                "empty",
                "10.96.6.30",
                &[("http", 80, 8080, Protocol::Tcp)],
                &[],
                None,
            ),
        )?;
        let _agent = start_agent(lab, "trace", &[])?;

        let t = svc_lb_json(lab, &["trace", "--to", "10.96.6.10:80", "-o", "json"])?;
        ensure!(t["verdict"]["action"] == "rewrite", "{t}");
        ensure!(t["verdict"]["backend"]["address"] == b.to_string(), "{t}");
        ensure!(t["verdict"]["backend"]["deterministic"] == true, "{t}");
        let r = ok_run(lab, "10.96.6.10:80", Proto::Tcp, 20)?;
        ensure!(r.count("b") == 20, "{}", r.summary());

        let t = svc_lb_json(lab, &["trace", "--to", "10.96.6.30:80", "-o", "json"])?;
        ensure!(t["verdict"]["action"] == "reject", "{t}");
        ensure!(t["verdict"]["errno"] == "ECONNREFUSED", "{t}");
        let mut o = lab.client(sa("10.96.6.30:80"), Proto::Tcp);
        o.count = 5;
        let r = lab.run_client(&o)?;
        ensure!(r.failures_of("ECONNREFUSED") == 5, "{}", r.summary());

        // Not a Service: passed untouched, so it fails in the client namespace, which
        // has no route for it.
        let t = svc_lb_json(lab, &["trace", "--to", "10.96.6.10:81", "-o", "json"])?;
        ensure!(t["verdict"]["action"] == "pass", "{t}");
        ensure!(t["frontend"].is_null(), "{t}");
        let mut o = lab.client(sa("10.96.6.10:81"), Proto::Tcp);
        o.count = 5;
        let r = lab.run_client(&o)?;
        ensure!(r.failures_of("ENETUNREACH") == 5, "{}", r.summary());

        let text =
            String::from_utf8_lossy(&lab.svc_lb(&["trace", "--to", "10.96.6.10:81"])?.stdout)
                .into_owned();
        ensure!(text.contains("not a Service"), "{text}");
        ensure!(text.contains("other ports: 80/TCP"), "{text}");
        Ok(())
    });
}

/// `--bpf-log` prints one line per decision, with the address before and after.
#[test]
fn bpf_log_shows_decisions() {
    e2e(&["a"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let a = lab.topo.backend("a").addr4;
        lab.write_manifest(
            "one.yaml",
            &service(
                "one",
                "10.96.7.10",
                &[("http", 80, 8080, Protocol::Tcp)],
                &[a.into()],
                None,
            ),
        )?;
        let agent = start_agent(lab, "bpflog", &["--bpf-log"])?;
        ok_run(lab, "10.96.7.10:80", Proto::Tcp, 3)?;
        let want = format!("connect4 10.96.7.10:80 -> {a}:8080 verdict 1");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let n = agent
                .log_lines()
                .iter()
                .filter(|l| l.contains(&want) && l.contains("svclb_ebpf"))
                .count();
            if n == 3 {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "{n} of 3 log lines {want:?}:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    });
}

/// With session affinity, `trace` for the client's network namespace names the backend
/// that the client's connections really reach, and a client without an entry is traced
/// as a first connection.
#[test]
fn trace_with_affinity_matches_the_backend_connections_reach() {
    e2e(&["a", "b", "c"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        lab.write_manifest(
            "sticky.yaml",
            &service(
                "sticky",
                "10.96.8.10",
                &[("http", 80, 8080, Protocol::Tcp)],
                &addrs,
                Some(600),
            ),
        )?;
        let agent = start_agent(lab, "affinity", &[])?;
        let netns = lab.topo.client.path();
        let netns = netns.to_string_lossy().into_owned();
        let trace = |lab: &Lab| {
            svc_lb_json(
                lab,
                &[
                    "trace",
                    "--to",
                    "10.96.8.10:80",
                    "--netns",
                    &netns,
                    "-o",
                    "json",
                ],
            )
        };

        let t = trace(lab)?;
        ensure!(t["frontend"]["session_affinity"] == "ClientIP", "{t}");
        ensure!(
            t["affinity"]["entry"].is_null(),
            "no entry before any connection: {t}"
        );
        ensure!(t["affinity"]["used"] == false, "{t}");
        ensure!(t["verdict"]["backend"]["via"] == "random", "{t}");

        // The first connection draws a backend and the datapath remembers it.
        let first = ok_run(lab, "10.96.8.10:80", Proto::Tcp, 1)?;
        let (id, _) = first.backends.iter().next().context("one reply")?;
        let want = lab.topo.backend(id).addr4.to_string();

        let t = trace(lab)?;
        ensure!(t["affinity"]["used"] == true, "{t}");
        ensure!(t["affinity"]["entry"]["fresh"] == true, "{t}");
        ensure!(t["affinity"]["entry"]["member"] == true, "{t}");
        ensure!(t["verdict"]["backend"]["via"] == "affinity", "{t}");
        ensure!(t["verdict"]["backend"]["deterministic"] == true, "{t}");
        ensure!(
            t["verdict"]["backend"]["address"] == want.as_str(),
            "trace chose {} but the connection reached {id} ({want})",
            t["verdict"]["backend"]["address"]
        );

        // Every further connection goes where the trace said.
        let r = ok_run(lab, "10.96.8.10:80", Proto::Tcp, 30)?;
        ensure!(r.count(id) == 30, "trace said {id}: {}", r.summary());

        // Another client (this test's own network namespace) has no entry.
        let other = svc_lb_json(lab, &["trace", "--to", "10.96.8.10:80", "-o", "json"])?;
        ensure!(other["affinity"]["entry"].is_null(), "{other}");

        let m = parse_metrics(&http_get(metrics_addr(&agent)?, "/metrics")?);
        let hits = metric(
            &m,
            r#"svclb_datapath_affinity_total{hook="sock",result="hit"}"#,
        )?;
        ensure!(hits == 30.0, "affinity hits {hits}, expected 30");
        Ok(())
    });
}
