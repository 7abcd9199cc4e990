//! End-to-end tests of LB-IPAM in Kubernetes mode: real agents watch a fake API server
//! ([`svc_lb_tests::fakeapi`]) that holds MetalLB `IPAddressPool`s, one agent is
//! elected through a `coordination.k8s.io` Lease and writes the Services'
//! `status.loadBalancer.ingress` (the fake counts every status PATCH and Lease write),
//! and every agent programs those addresses into its own lab's datapath, where real
//! connections go through them.
//!
//! Run as root, one at a time:
//! `cargo test --release -p svc-lb-tests --features e2e --test kube_lb -- --test-threads=1`.
#![cfg(feature = "e2e")]

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use svc_lb_tests::{Bins, ClientReport, Lab, Proto, agent::Agent, fakeapi::FakeApi, lab::isolated};

const NS: &str = "kube-lb";
/// The pool: three addresses.
const POOL: [&str; 3] = ["10.252.7.10", "10.252.7.11", "10.252.7.12"];
/// The agent's Lease and its timing (svc-lb/src/lbipam/leader.rs).
const LEASE: &str = "svc-lb-lbipam";
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How long a write may take to reach the fake and come back into the datapath.
const CONVERGE: Duration = Duration::from_secs(15);
const WROTE: &str = "LB-IPAM: wrote status.loadBalancer.ingress";

fn node(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip}],
            "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2025-01-15T09:30:00Z"}],
        },
    })
}

fn pool() -> Value {
    json!({
        "apiVersion": "metallb.io/v1beta1",
        "kind": "IPAddressPool",
        "metadata": {"name": "edge", "namespace": "metallb-system"},
        "spec": {"addresses": [format!("{}-{}", POOL[0], POOL[2])]},
    })
}

fn service(name: &str, cluster_ip: &str, type_: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "type": type_,
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "externalTrafficPolicy": "Cluster",
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
        "status": {"loadBalancer": {}},
    })
}

fn slice(service: &str, lab: &Lab) -> Value {
    let endpoints: Vec<Value> = lab
        .topo
        .addrs(false)
        .iter()
        .map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}, "nodeName": "node-1"}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-x"),
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// Starts an agent for `node_name` on `lab`, and waits for its first applied sync.
fn start_agent(
    lab: &Lab,
    kubeconfig: &std::path::Path,
    node_name: &str,
    n: usize,
) -> Result<Agent> {
    let config = lab.kube_agent_config(
        kubeconfig,
        node_name,
        &format!("agent-{node_name}-{n}.log"),
        &[],
    );
    let mut agent = Agent::start(config)?;
    agent.wait_applied(1, Duration::from_secs(30))?;
    Ok(agent)
}

/// The IPs `status.loadBalancer.ingress` lists in the fake for Service `name`.
fn ingress(api: &FakeApi, name: &str) -> Vec<String> {
    api.get("Service", NS, name)
        .and_then(|s| {
            s["status"]["loadBalancer"]["ingress"].as_array().map(|a| {
                a.iter()
                    .filter_map(|i| i["ip"].as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Waits until Service `name`'s status lists exactly `want`.
fn wait_ingress(api: &FakeApi, name: &str, want: &[&str], within: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let got = ingress(api, name);
        if got == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!(
                "{name}: status.loadBalancer.ingress is {got:?}, expected {want:?} within {within:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn lease_holder(api: &FakeApi) -> Option<String> {
    let lease = api.get("Lease", "default", LEASE)?;
    lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
}

fn connect(lab: &Lab, target: &str, count: u64) -> Result<ClientReport> {
    let mut o = lab.client(target.parse::<SocketAddr>()?, Proto::Tcp);
    o.count = count;
    o.timeout = Duration::from_secs(1);
    let r = lab.run_client(&o)?;
    ensure!(r.is_consistent(), "inconsistent report: {}", r.summary());
    ensure!(r.attempts == count, "{}", r.summary());
    Ok(r)
}

/// The lab's datapath serves `target` once the status reached the agent: waits for the
/// first success (the status has to come back through the watch), then counts `count`
/// connections that must all reach the lab's backends.
fn serves(lab: &Lab, target: &str, count: u64) -> Result<()> {
    let start = Instant::now();
    while connect(lab, target, 1)?.ok != 1 {
        ensure!(start.elapsed() < CONVERGE, "{target} never served");
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = connect(lab, target, count)?;
    eprintln!("{target}: {}", r.summary());
    ensure!(
        r.failed == 0 && r.ok == count,
        "{target}: {}\nfirst failures: {:?}",
        r.summary(),
        r.failure_samples
    );
    let got: BTreeSet<&str> = r.backends.keys().map(String::as_str).collect();
    ensure!(
        got == BTreeSet::from(["a", "b"]),
        "{target}: replies from {got:?}"
    );
    Ok(())
}

/// Lines of the agent's log with `what`.
fn count_log(agent: &Agent, what: &str) -> usize {
    agent
        .log_lines()
        .iter()
        .filter(|l| l.contains(what))
        .count()
}

fn kube_lb_e2e(
    labs: usize,
    body: impl FnOnce(&mut [Lab], &FakeApi, &std::path::Path) -> Result<()>,
) {
    isolated(|| {
        let bins =
            Bins::from_env(Some(env!("CARGO_BIN_EXE_svclb-harness"))).expect("locate the binaries");
        let mut all: Vec<Lab> = (0..labs)
            .map(|_| Lab::new(bins.clone(), &["a", "b"]).expect("build the lab"))
            .collect();
        for lab in &mut all {
            lab.serve_all_tcp(8080, false).expect("serve");
        }
        let api = FakeApi::start().expect("start the fake API server");
        let kubeconfig = all[0].dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        if let Err(e) = body(&mut all, &api, &kubeconfig) {
            panic!("{e:?}");
        }
    });
}

/// The leader allocates from the pool in name order and writes each status once; the
/// address serves real connections; a Service that stops being a LoadBalancer is
/// released (its status cleared) and the address goes to the next Service; a restarted
/// agent keeps every address and writes nothing.
#[test]
fn kube_leader_writes_pool_addresses_into_the_status_and_they_serve() {
    kube_lb_e2e(1, |labs, api, kubeconfig| {
        let lab = &labs[0];
        api.apply(node("node-1", "10.250.0.1"))?;
        api.apply(pool())?;
        for (name, ip) in [("alpha", "10.96.70.1"), ("beta", "10.96.70.2")] {
            api.apply(service(name, ip, "LoadBalancer"))?;
            api.apply(slice(name, lab))?;
        }
        let mut agent = start_agent(lab, kubeconfig, "node-1", 1)?;
        wait_ingress(api, "alpha", &[POOL[0]], CONVERGE)?;
        wait_ingress(api, "beta", &[POOL[1]], CONVERGE)?;
        serves(lab, &format!("{}:80", POOL[0]), 30)?;
        serves(lab, &format!("{}:80", POOL[1]), 30)?;
        ensure!(lease_holder(api).as_deref() == Some("node-1"));
        // One write per Service, even after several renewals.
        std::thread::sleep(RENEW_EVERY * 2);
        let c = api.counters();
        ensure!(
            c.status_patches_total() == 2,
            "status patches: {:?}",
            c.status_patches
        );

        // beta becomes a ClusterIP Service: the leader clears its status, and gamma,
        // new, gets the lowest free address (.11 again).
        let mut cluster_ip = service("beta", "10.96.70.2", "ClusterIP");
        // The status stays as the type changes: releasing it is the leader's job.
        cluster_ip["status"] = api.get("Service", NS, "beta").context("beta")?["status"].clone();
        api.apply(cluster_ip)?;
        ensure!(ingress(api, "beta") == [POOL[1]]);
        wait_ingress(api, "beta", &[], CONVERGE)?;
        api.apply(service("gamma", "10.96.70.3", "LoadBalancer"))?;
        api.apply(slice("gamma", lab))?;
        wait_ingress(api, "gamma", &[POOL[1]], CONVERGE)?;
        serves(lab, &format!("{}:80", POOL[1]), 30)?;
        ensure!(ingress(api, "alpha") == [POOL[0]]);

        // A restart (SIGKILL, no goodbye) starts from the statuses: nothing moves,
        // nothing is written again.
        let before = api.counters().status_patches_total();
        agent.kill()?;
        drop(agent);
        let agent = start_agent(lab, kubeconfig, "node-1", 2)?;
        std::thread::sleep(RENEW_EVERY * 2);
        ensure!(
            count_log(&agent, "this agent leads") == 1,
            "the restarted agent renews its own Lease"
        );
        ensure!(api.counters().status_patches_total() == before);
        ensure!(ingress(api, "alpha") == [POOL[0]] && ingress(api, "gamma") == [POOL[1]]);
        serves(lab, &format!("{}:80", POOL[0]), 30)?;
        Ok(())
    });
}

/// Two agents: exactly one writes. The leader is killed: the other takes the Lease
/// within the lease time, keeps every address and writes only what is new.
#[test]
fn kube_two_agents_one_writer_and_takeover_keeps_the_allocation() {
    kube_lb_e2e(2, |labs, api, kubeconfig| {
        api.apply(node("node-1", "10.250.0.1"))?;
        api.apply(node("node-2", "10.250.0.2"))?;
        api.apply(pool())?;
        for (name, ip) in [("alpha", "10.96.71.1"), ("beta", "10.96.71.2")] {
            api.apply(service(name, ip, "LoadBalancer"))?;
            api.apply(slice(name, &labs[0]))?;
        }
        let mut first = start_agent(&labs[0], kubeconfig, "node-1", 1)?;
        wait_ingress(api, "alpha", &[POOL[0]], CONVERGE)?;
        wait_ingress(api, "beta", &[POOL[1]], CONVERGE)?;
        let second = start_agent(&labs[1], kubeconfig, "node-2", 1)?;
        // The follower programs the statuses the leader wrote.
        serves(&labs[1], &format!("{}:80", POOL[0]), 30)?;
        serves(&labs[1], &format!("{}:80", POOL[1]), 30)?;
        std::thread::sleep(RENEW_EVERY * 2);
        let c = api.counters();
        ensure!(
            c.status_patches_total() == 2,
            "two Services, two writes: {:?}",
            c.status_patches
        );
        ensure!(count_log(&first, WROTE) == 2, "node-1 wrote both");
        ensure!(count_log(&second, WROTE) == 0, "node-2 wrote nothing");
        ensure!(lease_holder(api).as_deref() == Some("node-1"));

        // The leader dies without a word.
        first.kill()?;
        let killed = Instant::now();
        loop {
            if lease_holder(api).as_deref() == Some("node-2") {
                break;
            }
            ensure!(
                killed.elapsed() < LEASE_DURATION + RENEW_EVERY + Duration::from_secs(3),
                "node-2 did not take the Lease within the lease time and one read period"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let took = killed.elapsed();
        eprintln!("takeover after {took:?}");
        ensure!(
            took >= LEASE_DURATION - RENEW_EVERY,
            "taken over after {took:?}: before the Lease could have expired"
        );
        // Nothing moved, nothing was rewritten.
        ensure!(ingress(api, "alpha") == [POOL[0]] && ingress(api, "beta") == [POOL[1]]);
        ensure!(api.counters().status_patches_total() == 2);
        // A new Service is the new leader's to write.
        api.apply(service("gamma", "10.96.71.3", "LoadBalancer"))?;
        api.apply(slice("gamma", &labs[1]))?;
        wait_ingress(api, "gamma", &[POOL[2]], CONVERGE)?;
        ensure!(count_log(&second, WROTE) == 1, "node-2 wrote gamma");
        ensure!(api.counters().status_patches_total() == 3);
        serves(&labs[1], &format!("{}:80", POOL[2]), 30)?;
        serves(&labs[1], &format!("{}:80", POOL[0]), 30)?;
        Ok(())
    });
}

/// No MetalLB CRDs (404 on their lists): Services are programmed all the same, a
/// LoadBalancer status written by someone else serves, and nothing is allocated. Once
/// the CRD and a pool appear, the next retry picks them up.
#[test]
fn kube_a_missing_metallb_crd_does_not_hold_up_services() {
    kube_lb_e2e(1, |labs, api, kubeconfig| {
        let lab = &labs[0];
        api.set_served("IPAddressPool", false)?;
        api.set_served("L2Advertisement", false)?;
        api.apply(node("node-1", "10.250.0.1"))?;
        api.apply(service("plain", "10.96.72.1", "ClusterIP"))?;
        api.apply(slice("plain", lab))?;
        let mut given = service("given", "10.96.72.2", "LoadBalancer");
        given["status"] =
            json!({"loadBalancer": {"ingress": [{"ip": "10.252.8.1", "ipMode": "VIP"}]}});
        api.apply(given)?;
        api.apply(slice("given", lab))?;
        api.apply(service("wants", "10.96.72.3", "LoadBalancer"))?;
        api.apply(slice("wants", lab))?;
        let agent = start_agent(lab, kubeconfig, "node-1", 1)?;
        serves(lab, "10.96.72.1:80", 30)?;
        serves(lab, "10.252.8.1:80", 30)?;
        ensure!(
            count_log(&agent, "MetalLB's CRDs are not installed") == 2,
            "one warning per kind:\n{}",
            agent.log_text()
        );
        std::thread::sleep(RENEW_EVERY);
        ensure!(
            api.counters().status_patches_total() == 0,
            "no pool, no writes"
        );
        ensure!(ingress(api, "given") == ["10.252.8.1"]);

        api.set_served("IPAddressPool", true)?;
        api.set_served("L2Advertisement", true)?;
        api.apply(pool())?;
        // The list is retried every 30 s (plus jitter).
        wait_ingress(api, "wants", &[POOL[0]], Duration::from_secs(45))?;
        serves(lab, &format!("{}:80", POOL[0]), 30)?;
        ensure!(
            ingress(api, "given") == ["10.252.8.1"],
            "someone else's address is left alone"
        );
        ensure!(count_log(&agent, "served now") >= 1);
        Ok(())
    });
}

/// Lease hygiene: at steady state nobody reads the Lease (the followers watch it, the
/// leader only renews it), and a leader stopped with SIGTERM hands the Lease over, so
/// the other agent writes within about a second, not after the lease time.
#[test]
fn kube_sigterm_hands_the_lease_over_at_once_and_followers_only_watch() {
    kube_lb_e2e(2, |labs, api, kubeconfig| {
        api.apply(node("node-1", "10.250.0.1"))?;
        api.apply(node("node-2", "10.250.0.2"))?;
        api.apply(pool())?;
        api.apply(service("alpha", "10.96.73.1", "LoadBalancer"))?;
        api.apply(slice("alpha", &labs[0]))?;
        let mut first = start_agent(&labs[0], kubeconfig, "node-1", 1)?;
        wait_ingress(api, "alpha", &[POOL[0]], CONVERGE)?;
        let second = start_agent(&labs[1], kubeconfig, "node-2", 1)?;
        serves(&labs[1], &format!("{}:80", POOL[0]), 10)?;
        ensure!(lease_holder(api).as_deref() == Some("node-1"));

        // Steady state: over three renew periods, the leader's renewals are the only
        // Lease requests; the follower's watch is one long request.
        let c0 = api.counters();
        std::thread::sleep(RENEW_EVERY * 3);
        let c1 = api.counters();
        let renewals = c1.lease_writes - c0.lease_writes;
        eprintln!(
            "over {:?}: lease reads {}, writes {renewals}, watches {:?}",
            RENEW_EVERY * 3,
            c1.lease_reads - c0.lease_reads,
            c1.watches.get("Lease")
        );
        ensure!(
            c1.lease_reads == c0.lease_reads,
            "Lease GETs at steady state: {} -> {}",
            c0.lease_reads,
            c1.lease_reads
        );
        ensure!((2..=4).contains(&renewals), "{renewals} renewals in 15 s");
        ensure!(c1.lease_conflicts == c0.lease_conflicts, "no conflicts");

        // SIGTERM: the leader releases, the follower takes over at once.
        let sent = Instant::now();
        let (_, graceful) = first.terminate(Duration::from_secs(5))?;
        ensure!(graceful, "node-1 exits on SIGTERM by itself");
        ensure!(
            count_log(&first, "released the Lease") == 1,
            "node-1 released the Lease:\n{}",
            first.log_text()
        );
        loop {
            if lease_holder(api).as_deref() == Some("node-2") {
                break;
            }
            ensure!(
                sent.elapsed() < Duration::from_secs(5),
                "node-2 did not take the released Lease within 5 s (holder {:?})",
                lease_holder(api)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let took = sent.elapsed();
        eprintln!("takeover {took:?} after SIGTERM");
        ensure!(
            took < Duration::from_secs(2),
            "takeover after {took:?}: not at once"
        );
        // The new leader writes a new Service's status at once too.
        let applied = Instant::now();
        api.apply(service("beta", "10.96.73.2", "LoadBalancer"))?;
        api.apply(slice("beta", &labs[1]))?;
        wait_ingress(api, "beta", &[POOL[1]], CONVERGE)?;
        eprintln!("beta written {:?} after it appeared", applied.elapsed());
        ensure!(count_log(&second, WROTE) == 1, "node-2 wrote beta");
        ensure!(ingress(api, "alpha") == [POOL[0]], "alpha kept its address");
        Ok(())
    });
}
