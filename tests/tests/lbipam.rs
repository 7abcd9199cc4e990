//! Privileged end-to-end test of LoadBalancer IP allocation in manifest mode: a
//! MetalLB `IPAddressPool` in the manifest directory hands its addresses to LoadBalancer
//! Services that have no `status.loadBalancer`, and both agents of the two-node lab (see
//! `tests/src/twonode.rs`) serve them on the external path.
//!
//! Run as root, one at a time:
//! `cargo test --release -p svc-lb-tests --features e2e --test lbipam -- --test-threads=1`.
//!
//! Every connection is counted: how many reached which backend, and 0 failures.
#![cfg(feature = "e2e")]

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, ensure};
use serde_json::json;
use svc_lb_tests::ip;
use svc_lb_tests::{
    Proto,
    checks::{all_ok, backends_are},
    manifests::{Endpoint, EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
    twonode::{Node, POD_PORT, TwoNodeLab, run_lab},
};

const NS: &str = "lbipam";
/// Connections per measurement.
const N: u64 = 30;
/// The pool: two addresses, so that a third Service finds it exhausted.
const FIRST: &str = "10.253.1.10";
const SECOND: &str = "10.253.1.11";

const POOL: &str = r#"apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: edge
  namespace: metallb-system
spec:
  addresses:
  - 10.253.1.10-10.253.1.11
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata:
  name: edge
  namespace: metallb-system
spec:
  ipAddressPools: [edge]
"#;

/// A LoadBalancer Service without status, and its EndpointSlice on the lab's pods.
fn lb_service(lab: &TwoNodeLab, name: &str, cluster: &str, node_port: u16) -> String {
    let svc = Service::new(NS, name, &[ip(cluster)])
        .port("http", 80, TargetPort::Number(POD_PORT), Protocol::Tcp)
        .node_port(node_port)
        .spec("type", json!("LoadBalancer"))
        .spec("externalTrafficPolicy", json!("Cluster"));
    let mut slice = EndpointSlice::new(NS, name, "v4", false).port("http", POD_PORT, Protocol::Tcp);
    for pod in ["a1", "a2", "b1"] {
        let p = lab.net.pod(pod);
        slice = slice.endpoint(
            Endpoint::ready(p.addr(false))
                .pod(&format!("{name}-{pod}"))
                .node(p.node.name()),
        );
    }
    yaml_docs(&[svc.to_value(), slice.to_value()])
}

/// `N` connections from the external client to `addr`:80 through node `entry`: all
/// succeed and reach all three pods.
fn reach(lab: &TwoNodeLab, addr: &str, entry: Node) -> Result<()> {
    lab.net.route_via(ip(addr), entry)?;
    let mut o = lab.client(SocketAddr::new(ip(addr), 80), Proto::Tcp);
    o.count = N;
    o.timeout = Duration::from_secs(1);
    let r = lab.run_client(&o)?;
    eprintln!("{addr} via {}: {}", entry.name(), r.summary());
    all_ok(&r, N).with_context(|| format!("{addr} via {}", entry.name()))?;
    backends_are(&r, &["a1", "a2", "b1"])
}

/// `svc-lb <args> --bpffs <node's pins>` in node `n` (its agent answers on the default
/// metrics address there).
fn svc_lb(lab: &TwoNodeLab, n: Node, args: &[&str]) -> Result<String> {
    let bin = lab.bins.svc_lb.display().to_string();
    let bpffs = lab.bpffs(n).display().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--bpffs", &bpffs]);
    lab.node_cmd(n, &bin, &all)
}

fn pool_metric(lab: &TwoNodeLab, n: Node, state: &str) -> Result<u64> {
    lab.node_metric(
        n,
        &format!("svclb_lb_pool_addresses{{pool=\"edge\",state=\"{state}\"}}"),
    )
}

#[test]
fn pool_addresses_serve_services_in_name_order_and_exhaustion_leaves_the_third_pending() {
    run_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        lab.write_manifest("pool.yaml", POOL)?;
        lab.write_manifest("alpha.yaml", &lb_service(lab, "alpha", "10.96.60.1", 30210))?;
        lab.write_manifest("beta.yaml", &lb_service(lab, "beta", "10.96.60.2", 30211))?;
        lab.start_agents(&Default::default())?;

        // alpha sorts first: the pool's first address; beta the next. Both agents
        // computed the same allocation, so either node serves it.
        for entry in Node::ALL {
            reach(lab, FIRST, entry)?;
        }
        reach(lab, SECOND, Node::A)?;
        for n in Node::ALL {
            ensure!(
                pool_metric(lab, n, "used")? == 2,
                "used addresses on {}",
                n.name()
            );
            ensure!(
                pool_metric(lab, n, "free")? == 0,
                "free addresses on {}",
                n.name()
            );
        }
        let list = svc_lb(lab, Node::A, &["list"])?;
        // Each address has a socket and an external entry.
        ensure!(
            list.matches("pool=edge").count() == 4,
            "svc-lb list names the pool of both LoadBalancer addresses:\n{list}"
        );

        // A third Service finds the pool exhausted: pending, with the reason, while the
        // other two keep working.
        let gamma = lb_service(lab, "gamma", "10.96.60.3", 30212);
        lab.apply_manifest("gamma.yaml", &gamma)?;
        let status = svc_lb(lab, Node::A, &["status"])?;
        ensure!(
            status.contains("pending      1 Services:")
                && status.contains("lbipam/gamma: no free IPv4 address: pool edge exhausted"),
            "svc-lb status shows gamma pending and why:\n{status}"
        );
        ensure!(
            status.contains("edge     2     2     0"),
            "svc-lb status shows the pool's size, used and free:\n{status}"
        );
        ensure!(lab.node_metric(Node::B, "svclb_lb_pending_services")? == 1);
        reach(lab, FIRST, Node::B)?;
        reach(lab, SECOND, Node::B)?;

        // Deleting beta releases its address, and gamma (pending) takes it; alpha keeps
        // its own.
        let before = lab.applied()?;
        std::fs::remove_file(lab.manifests_dir().join("beta.yaml")).context("remove beta")?;
        lab.wait_both_applied(before)?;
        ensure!(lab.node_metric(Node::A, "svclb_lb_pending_services")? == 0);
        let list = svc_lb(lab, Node::A, &["list", "--service", "lbipam/gamma"])?;
        ensure!(
            list.contains(&format!("{SECOND}:80")),
            "gamma has {SECOND}:\n{list}"
        );
        for entry in Node::ALL {
            reach(lab, SECOND, entry)?;
        }
        reach(lab, FIRST, Node::A)?;

        // Bad pools next to the good one: each is rejected with its reason, the agents
        // stay up and the good pool's Services keep their addresses and keep working.
        lab.write_manifest("bad-pools.yaml", BAD_POOLS)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let status = loop {
            let status = svc_lb(lab, Node::A, &["status"])?;
            if status.contains("rejected: IPAddressPool metallb-system/zz-clash")
                || std::time::Instant::now() > deadline
            {
                break status;
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        for want in [
            "rejected: IPAddressPool metallb-system/broken: ",
            "rejected: IPAddressPool metallb-system/zz-clash: its addresses 10.253.1.0-10.253.1.255 overlap",
            "edge     2     2     0",
        ] {
            ensure!(
                status.contains(want),
                "svc-lb status lacks {want:?}:\n{status}"
            );
        }
        for n in Node::ALL {
            ensure!(
                pool_metric(lab, n, "used")? == 2,
                "used addresses on {}",
                n.name()
            );
            ensure!(lab.node_metric(n, "svclb_lb_pending_services")? == 0);
        }
        for entry in Node::ALL {
            reach(lab, FIRST, entry)?;
            reach(lab, SECOND, entry)?;
        }
        Ok(())
    });
}

/// A pool with garbage addresses and one that overlaps `edge` (and sorts after it).
const BAD_POOLS: &str = r#"apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: broken
  namespace: metallb-system
spec:
  addresses: ["10.253.2.300/24", "not-an-address"]
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: zz-clash
  namespace: metallb-system
spec:
  addresses: ["10.253.1.0/24"]
"#;

/// `cargo xtask run` (the demo) on deploy/examples: the LoadBalancer Service there gets
/// the first usable address of the example pool from the agent, the demo finds it with
/// `svc-lb list` and dials it, and every request reaches one of the three backends.
#[test]
fn the_demo_dials_the_address_the_example_pool_gave_its_load_balancer_service() {
    svc_lb_tests::lab::isolated(|| {
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_svclb-harness"));
        cmd.arg("demo")
            .arg("--svc-lb")
            .arg(svc_lb_tests::agent::default_bin())
            .arg("--manifests")
            .arg(&examples)
            .args(["--duration-s", "3"]);
        let child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the demo");
        let pid = child.id();
        let out = child.wait_with_output().expect("run the demo");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("{text}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "the demo failed");
        assert!(
            text.contains("load balancer  demo/web-lb got 198.51.100.1:80 from an IPAddressPool"),
            "the demo did not report the allocated address"
        );
        // The demo's totals: every request to the pool address reached a backend.
        let totals = text
            .lines()
            .skip_while(|l| !l.starts_with("svc-lb demo: totals"))
            .find(|l| l.contains("demo/web-lb 198.51.100.1:80/TCP"))
            .expect("a total for the pool address");
        assert!(totals.ends_with("failed 0"), "{totals}");
        let counts: Vec<u64> = ["backend-a", "backend-b", "backend-c"]
            .iter()
            .map(|b| {
                totals
                    .split(&format!("{b} "))
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            })
            .collect();
        assert!(counts.iter().all(|n| *n > 0), "{totals}");
        // The demo cleaned up its namespaces.
        let prefix = format!("svclbt-{pid}-");
        let left: Vec<String> = std::fs::read_dir("/run/netns")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "the demo left {left:?}");
    });
}
