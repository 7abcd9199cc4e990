//! End-to-end tests of the Kubernetes mode: the real agent binary watches a fake API
//! server ([`svc_lb_tests::fakeapi`]) through a kubeconfig, and programs the real eBPF
//! datapath of a private lab (backend namespaces, a client namespace with no default
//! route, a cgroup, a pin directory).
//!
//! Run as root, one at a time:
//! `cargo test --release -p svc-lb-tests --features e2e --test kube -- --test-threads=1`.
//!
//! Every test counts every connection it makes and asserts exact numbers: how many
//! reached which backend and how many failed with which errno (0 where none may fail).
#![cfg(feature = "e2e")]

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use svc_lb_tests::sa;
use svc_lb_tests::{Bins, ClientReport, Lab, Proto, agent::Agent, fakeapi::FakeApi, lab::isolated};

const NS: &str = "kube-e2e";
const NODE: &str = "node-1";
/// The node's InternalIP: node ports are programmed on it. Nothing in the lab owns it,
/// so a connection that the agent does not rewrite fails with ENETUNREACH.
const NODE_IP: &str = "10.250.0.1";
const ZONE: &str = "zone-a";
/// How long a change may take from the API server to the kernel in these tests. The
/// agent batches for 40 ms; the rest is slack for a loaded test machine.
const CONVERGE: Duration = Duration::from_secs(10);

/// A running fake API server and the agent watching it. Fields drop in order: the agent
/// stops before the API server goes away.
struct Cluster {
    agent: Option<Agent>,
    api: FakeApi,
    kubeconfig: PathBuf,
    starts: usize,
    /// More agent arguments (e.g. `--service-proxy-name`).
    extra_args: Vec<String>,
}

impl Cluster {
    /// A fake API server holding this node's Node object.
    fn new(lab: &Lab) -> Result<Self> {
        let api = FakeApi::start()?;
        let kubeconfig = lab.dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        api.apply(node(NODE, &[NODE_IP], Some(ZONE)))?;
        Ok(Self {
            agent: None,
            api,
            kubeconfig,
            starts: 0,
            extra_args: Vec::new(),
        })
    }

    /// Starts the agent in Kubernetes mode and waits for its first applied sync.
    fn start_agent(&mut self, lab: &Lab) -> Result<&mut Agent> {
        if self.agent.is_some() {
            bail!("the agent is already running");
        }
        self.starts += 1;
        let extra: Vec<&str> = self.extra_args.iter().map(String::as_str).collect();
        let config = lab.kube_agent_config(
            &self.kubeconfig,
            NODE,
            &format!("kube-agent-{}.log", self.starts),
            &extra,
        );
        let mut agent = Agent::start(config)?;
        agent.wait_applied(1, Duration::from_secs(30))?;
        Ok(self.agent.insert(agent))
    }

    fn agent(&mut self) -> Result<&mut Agent> {
        self.agent.as_mut().context("the agent is not running")
    }

    /// Applies `objects` and waits until the agent applied a sync after them.
    fn change(&mut self, objects: &[Value]) -> Result<()> {
        let before = self.agent()?.applied_count();
        for o in objects {
            self.api.apply(o.clone())?;
        }
        self.agent()?.wait_applied(before + 1, CONVERGE)?;
        Ok(())
    }

    /// Deletes objects (kind, name in [`NS`]) and waits for the sync.
    fn remove(&mut self, objects: &[(&str, &str)]) -> Result<()> {
        let before = self.agent()?.applied_count();
        for (kind, name) in objects {
            self.api.delete(kind, NS, name)?;
        }
        self.agent()?.wait_applied(before + 1, CONVERGE)?;
        Ok(())
    }
}

/// Builds a lab with backends `ids` and a fake API server, runs `body`, tears everything
/// down (printing the agent log if the body failed) and checks nothing is left behind.
fn kube_e2e(ids: &[&str], body: impl FnOnce(&mut Lab, &mut Cluster) -> Result<()>) {
    isolated(|| {
        let bins =
            Bins::from_env(Some(env!("CARGO_BIN_EXE_svclb-harness"))).expect("locate the binaries");
        let mut lab = Lab::new(bins, ids).expect("build the lab");
        let mut cluster = Cluster::new(&lab).expect("start the fake API server");
        if let Err(e) = body(&mut lab, &mut cluster) {
            // Panicking while the agent is alive makes it print its log on drop.
            panic!("{e:?}");
        }
    });
}

// ---------------------------------------------------------------------------------
// Objects, as the API server would hold them.

fn node(name: &str, addresses: &[&str], zone: Option<&str>) -> Value {
    let mut labels = json!({"kubernetes.io/hostname": name});
    if let Some(z) = zone {
        labels["topology.kubernetes.io/zone"] = json!(z);
    }
    let addrs: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"type": "InternalIP", "address": a}))
        .chain(std::iter::once(
            json!({"type": "Hostname", "address": name}),
        ))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {
            "addresses": addrs,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "ok", "lastHeartbeatTime": "2025-01-15T09:30:00Z", "lastTransitionTime": "2025-01-15T09:30:00Z"}],
        },
    })
}

/// A Service with one TCP port `port` → `target` (named "http").
fn service(name: &str, cluster_ip: &str, port: u32, target: u16) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "selector": {"app": name},
            "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": target}],
        },
        "status": {"loadBalancer": {}},
    })
}

/// One endpoint: address, node, ready.
#[derive(Clone, Copy)]
struct Ep<'a> {
    addr: IpAddr,
    node: &'a str,
    ready: bool,
}

fn ready(addr: IpAddr) -> Ep<'static> {
    Ep {
        addr,
        node: NODE,
        ready: true,
    }
}

/// An IPv4 EndpointSlice of Service `service` with port "http" = `port`.
fn slice(service: &str, suffix: &str, port: u16, eps: &[Ep<'_>]) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|e| {
            json!({
                "addresses": [e.addr.to_string()],
                "conditions": {"ready": e.ready, "serving": e.ready, "terminating": false},
                "nodeName": e.node,
                "zone": ZONE,
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-{suffix}"),
            "namespace": NS,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

// ---------------------------------------------------------------------------------
// Traffic.

/// `count` TCP connections to `target` from the client namespace and cgroup.
fn connect(lab: &Lab, target: &str, count: u64) -> Result<ClientReport> {
    let mut o = lab.client(sa(target), Proto::Tcp);
    o.count = count;
    let r = lab.run_client(&o)?;
    ensure!(r.is_consistent(), "inconsistent report: {}", r.summary());
    ensure!(r.attempts == count, "{}", r.summary());
    Ok(r)
}

/// Every connection answered, by exactly the backends `ids` (each at least once).
fn expect_backends(r: &ClientReport, ids: &[&str]) -> Result<()> {
    ensure!(
        r.failed == 0 && r.ok == r.attempts,
        "failures: {}\nfirst failures: {:?}",
        r.summary(),
        r.failure_samples
    );
    let got: BTreeSet<&str> = r.backends.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = ids.iter().copied().collect();
    ensure!(
        got == want,
        "replies from {got:?}, expected {want:?}: {}",
        r.summary()
    );
    Ok(())
}

/// Every connection failed with `errno`.
fn expect_failures(r: &ClientReport, errno: &str) -> Result<()> {
    ensure!(
        r.ok == 0 && r.failures_of(errno) == r.attempts,
        "expected {} × {errno}: {}",
        r.attempts,
        r.summary()
    );
    Ok(())
}

/// A log line without its terminal colours (`\x1b[...m`).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The agent's log so far, without colours.
fn log_lines(agent: &Agent) -> Vec<String> {
    agent.log_lines().iter().map(|l| plain(l)).collect()
}

/// The address the agent logged for its health endpoints (`--health-addr` port 0).
fn health_addr(agent: &Agent) -> Result<SocketAddr> {
    log_lines(agent)
        .iter()
        .find(|l| l.contains("serving /healthz and /readyz"))
        .and_then(|l| l.split("addr=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .context("the agent did not log its health address")
}

/// `GET path` on the health endpoint: the status code.
fn probe(addr: SocketAddr, path: &str) -> Result<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP answer {out:?}"))
}

// ---------------------------------------------------------------------------------
// Scenarios.

/// Initial sync, then create, update and delete of Services and slices, and an agent
/// restart under load. The initial sync is applied as one batch after every list
/// completed; the restarted agent adopts the maps and changes nothing.
#[test]
fn kube_initial_sync_crud_and_restart() {
    kube_e2e(&["a", "b", "c"], |lab, k8s| {
        lab.serve_all_tcp(8080, false)?;
        let [a, b, c] = [0, 1, 2].map(|i| lab.topo.addrs(false)[i]);
        // Everything exists before the agent starts: the first sync must hold it all.
        k8s.api.apply(service("web", "10.96.1.1", 80, 8080))?;
        k8s.api
            .apply(slice("web", "x1", 8080, &[ready(a), ready(b)]))?;
        k8s.api.apply(slice("web", "x2", 8080, &[ready(c)]))?;
        k8s.start_agent(lab)?;
        let health = health_addr(k8s.agent()?)?;
        ensure!(probe(health, "/healthz")? == 200, "healthz");
        ensure!(probe(health, "/readyz")? == 200, "readyz");
        // Exactly one sync: the first complete view, not Services before slices.
        ensure!(k8s.agent()?.applied_count() == 1, "one initial sync");

        let r = connect(lab, "10.96.1.1:80", 150)?;
        expect_backends(&r, &["a", "b", "c"])?;

        // Update a slice: b goes away.
        k8s.change(&[slice("web", "x1", 8080, &[ready(a)])])?;
        expect_backends(&connect(lab, "10.96.1.1:80", 60)?, &["a", "c"])?;

        // Delete a slice: only a is left.
        k8s.remove(&[("EndpointSlice", "web-x2")])?;
        expect_backends(&connect(lab, "10.96.1.1:80", 30)?, &["a"])?;

        // Update the Service: port 80 → 81. The old frontend is gone (not rewritten:
        // no route), the new one works.
        k8s.change(&[service("web", "10.96.1.1", 81, 8080)])?;
        expect_failures(&connect(lab, "10.96.1.1:80", 10)?, "ENETUNREACH")?;
        expect_backends(&connect(lab, "10.96.1.1:81", 30)?, &["a"])?;

        // A new Service without endpoints refuses, as kube-proxy's REJECT.
        k8s.change(&[service("empty", "10.96.1.2", 80, 8080)])?;
        expect_failures(&connect(lab, "10.96.1.2:80", 10)?, "ECONNREFUSED")?;
        // ... until a slice with a ready endpoint appears.
        k8s.change(&[slice("empty", "x1", 8080, &[ready(b)])])?;
        expect_backends(&connect(lab, "10.96.1.2:80", 20)?, &["b"])?;

        // Restart the agent while a client connects continuously: not one failure, and
        // the restarted agent's first sync changes nothing in the maps.
        let mut o = lab.client(sa("10.96.1.2:80"), Proto::Tcp);
        o.count = 0;
        o.duration = Some(Duration::from_secs(6));
        o.interval = Duration::from_millis(10);
        let run = lab.spawn_client(&o)?;
        std::thread::sleep(Duration::from_secs(1));
        let mut old = k8s.agent.take().context("agent")?;
        let (status, graceful) = old.terminate(Duration::from_secs(5))?;
        ensure!(graceful && status.success(), "agent exit: {status}");
        drop(old);
        let agent = k8s.start_agent(lab)?;
        ensure!(
            log_lines(agent)
                .iter()
                .any(|l| l.contains("sync applied") && l.contains("ops=0")),
            "the restarted agent's first sync should change nothing:\n{}",
            agent.log_text()
        );
        let r = run.wait()?;
        eprintln!("during the restart: {}", r.summary());
        expect_backends(&r, &["b"])?;

        // Delete the Service: no longer rewritten.
        k8s.remove(&[("Service", "web")])?;
        expect_failures(&connect(lab, "10.96.1.1:81", 10)?, "ENETUNREACH")?;
        Ok(())
    });
}

/// A Service of one TCP port "http" (`port` → 8080) and one UDP port "dns" (53 → 5353),
/// with extra spec fields merged in (type, nodePorts, affinity, policies...).
fn service_with(name: &str, cluster_ip: Option<&str>, spec: Value) -> Value {
    let mut svc = service(name, cluster_ip.unwrap_or("None"), 80, 8080);
    if cluster_ip.is_none() {
        let s = svc["spec"].as_object_mut().expect("spec");
        s.remove("clusterIP");
        s.remove("clusterIPs");
    }
    if let (Some(base), Some(extra)) = (svc["spec"].as_object_mut(), spec.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    svc
}

/// Connections to each target, each expected to fail with `errno`.
fn expect_unreachable(lab: &Lab, targets: &[&str], errno: &str) -> Result<()> {
    for t in targets {
        expect_failures(&connect(lab, t, 5)?, errno).with_context(|| format!("target {t}"))?;
    }
    Ok(())
}

/// Switching the type in every direction: after each switch exactly the new type's
/// addresses are served (the old ones fail locally: not rewritten, no route), and an
/// `ipMode: Proxy` load-balancer IP is never short-circuited.
#[test]
fn kube_type_switches() {
    kube_e2e(&["a", "b"], |lab, k8s| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        let eps: Vec<Ep<'_>> = addrs.iter().map(|a| ready(*a)).collect();
        let external_name = service_with(
            "sw",
            None,
            json!({"type": "ExternalName", "externalName": "example.com"}),
        );
        k8s.api.apply(external_name.clone())?;
        k8s.api.apply(slice("sw", "x1", 8080, &eps))?;
        k8s.start_agent(lab)?;

        let cluster = "10.96.3.1:80";
        let node_port = "10.250.0.1:30081";
        let lb_vip = "10.252.0.1:80";
        let lb_proxy = "10.252.0.2:80";
        let external_ip = "10.251.0.1:80";
        let all = [cluster, node_port, lb_vip, lb_proxy, external_ip];
        expect_unreachable(lab, &all, "ENETUNREACH")?;

        let cluster_ip = service_with("sw", Some("10.96.3.1"), json!({"type": "ClusterIP"}));
        let node_port_svc = service_with(
            "sw",
            Some("10.96.3.1"),
            json!({
                "type": "NodePort",
                "externalTrafficPolicy": "Cluster",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30081}],
            }),
        );
        let mut load_balancer = service_with(
            "sw",
            Some("10.96.3.1"),
            json!({
                "type": "LoadBalancer",
                "externalTrafficPolicy": "Local",
                "externalIPs": ["10.251.0.1"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30081}],
            }),
        );
        load_balancer["status"] = json!({"loadBalancer": {"ingress": [
            {"ip": "10.252.0.1", "ipMode": "VIP"},
            {"ip": "10.252.0.2", "ipMode": "Proxy"},
        ]}});

        let steps: [(&str, &Value, &[&str]); 7] = [
            ("ExternalName→ClusterIP", &cluster_ip, &[cluster]),
            ("ClusterIP→NodePort", &node_port_svc, &[cluster, node_port]),
            ("NodePort→ExternalName", &external_name, &[]),
            (
                "ExternalName→NodePort",
                &node_port_svc,
                &[cluster, node_port],
            ),
            (
                "NodePort→LoadBalancer",
                &load_balancer,
                &[cluster, node_port, lb_vip, external_ip],
            ),
            ("LoadBalancer→ClusterIP", &cluster_ip, &[cluster]),
            ("ClusterIP→ExternalName", &external_name, &[]),
        ];
        for (what, svc, served) in steps {
            k8s.change(std::slice::from_ref(svc))
                .with_context(|| what.to_owned())?;
            for t in all {
                let r = connect(lab, t, 20)?;
                if served.contains(&t) {
                    expect_backends(&r, &["a", "b"]).with_context(|| format!("{what}: {t}"))?;
                } else {
                    expect_failures(&r, "ENETUNREACH").with_context(|| format!("{what}: {t}"))?;
                }
            }
        }
        Ok(())
    });
}

/// internalTrafficPolicy Local: the cluster IP uses this node's endpoints only and
/// refuses when there are none (no fallback), while node ports on this node reach every
/// endpoint (kube-proxy's short-circuit for local clients). Topology hints: a
/// PreferClose Service uses the endpoints hinted for this node's zone.
#[test]
fn kube_traffic_policy_and_topology() {
    kube_e2e(&["a", "b", "c"], |lab, k8s| {
        lab.serve_all_tcp(8080, false)?;
        let [a, b, c] = [0, 1, 2].map(|i| lab.topo.addrs(false)[i]);
        let on = |addr, node| Ep {
            addr,
            node,
            ready: true,
        };
        let local = service_with(
            "local",
            Some("10.96.4.1"),
            json!({
                "type": "NodePort",
                "internalTrafficPolicy": "Local",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30082}],
            }),
        );
        k8s.api.apply(local)?;
        k8s.api.apply(slice(
            "local",
            "x1",
            8080,
            &[on(a, NODE), on(b, "node-2"), on(c, "node-2")],
        ))?;
        // Zone hints: a and c are for this node's zone, b for another one.
        let mut hinted_slice = slice("near", "x1", 8080, &[ready(a), ready(b), ready(c)]);
        for (i, zone) in [ZONE, "zone-b", ZONE].iter().enumerate() {
            hinted_slice["endpoints"][i]["hints"] = json!({"forZones": [{"name": zone}]});
        }
        k8s.api.apply(service_with(
            "near",
            Some("10.96.4.2"),
            json!({"trafficDistribution": "PreferClose"}),
        ))?;
        k8s.api.apply(hinted_slice.clone())?;
        k8s.start_agent(lab)?;

        expect_backends(&connect(lab, "10.96.4.1:80", 60)?, &["a"])?;
        expect_backends(&connect(lab, "10.250.0.1:30082", 150)?, &["a", "b", "c"])?;
        expect_backends(&connect(lab, "10.96.4.2:80", 100)?, &["a", "c"])?;

        // The local endpoint moves to another node: the cluster IP refuses, the node
        // port still reaches every endpoint.
        k8s.change(&[slice(
            "local",
            "x1",
            8080,
            &[on(a, "node-2"), on(b, "node-2"), on(c, "node-2")],
        )])?;
        expect_failures(&connect(lab, "10.96.4.1:80", 20)?, "ECONNREFUSED")?;
        expect_backends(&connect(lab, "10.250.0.1:30082", 150)?, &["a", "b", "c"])?;

        // Incomplete hints (one endpoint without any): every endpoint is used.
        hinted_slice["endpoints"][1]
            .as_object_mut()
            .context("endpoint")?
            .remove("hints");
        k8s.change(&[hinted_slice])?;
        expect_backends(&connect(lab, "10.96.4.2:80", 150)?, &["a", "b", "c"])?;
        Ok(())
    });
}

/// `rounds` runs of `burst` back-to-back connections; returns the backend of each run,
/// checking that every run stuck to one backend.
fn sticky_rounds(
    lab: &Lab,
    target: &str,
    rounds: usize,
    burst: u64,
    pause: Duration,
) -> Result<Vec<String>> {
    let mut seen = Vec::new();
    for i in 0..rounds {
        if i > 0 {
            std::thread::sleep(pause);
        }
        let r = connect(lab, target, burst)?;
        ensure!(
            r.failed == 0 && r.backends.len() == 1,
            "round {i}: a burst must stick to one backend: {}",
            r.summary()
        );
        seen.extend(r.backends.keys().cloned());
    }
    Ok(seen)
}

/// Session affinity (ClientIP): the same client (here: the client's network namespace)
/// gets the same backend until the timeout runs out; an entry pointing at a removed
/// backend is never used; switching affinity off and on takes effect for new
/// connections; UDP datagrams stick too.
#[test]
fn kube_session_affinity() {
    kube_e2e(&["a", "b", "c"], |lab, k8s| {
        let addrs = lab.topo.addrs(false);
        for (id, addr) in ["a", "b", "c"].iter().zip(&addrs) {
            lab.serve(
                id,
                id,
                &[SocketAddr::new(*addr, 8080)],
                &[SocketAddr::new(*addr, 5353)],
            )?;
        }
        let sticky = |timeout: u32| {
            service_with(
                "sticky",
                Some("10.96.5.1"),
                json!({
                    "sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout}},
                    "ports": [
                        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
                    ],
                }),
            )
        };
        let eps =
            |ids: &[usize]| -> Vec<Ep<'static>> { ids.iter().map(|i| ready(addrs[*i])).collect() };
        let slice_of = |ids: &[usize]| {
            let mut s = slice("sticky", "x1", 8080, &eps(ids));
            s["ports"] = json!([
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "UDP"},
            ]);
            s
        };
        k8s.api.apply(sticky(3600))?;
        k8s.api.apply(slice_of(&[0, 1, 2]))?;
        k8s.start_agent(lab)?;

        // Sticky: every connection of this client goes to one backend.
        let r = connect(lab, "10.96.5.1:80", 60)?;
        ensure!(
            r.failed == 0 && r.backends.len() == 1,
            "sticky: {}",
            r.summary()
        );
        let first = r.backends.keys().next().cloned().context("a backend")?;
        // UDP too (one datagram per socket, all from this client).
        let mut o = lab.client(sa("10.96.5.1:53"), Proto::Udp);
        o.count = 40;
        let r = lab.run_client(&o)?;
        ensure!(
            r.failed == 0 && r.backends.len() == 1,
            "sticky UDP: {}",
            r.summary()
        );

        // The remembered backend leaves the Service: it is never used again, and the
        // client sticks to a new one.
        let idx = ["a", "b", "c"]
            .iter()
            .position(|b| *b == first)
            .context("index")?;
        let rest: Vec<usize> = (0..3).filter(|i| *i != idx).collect();
        k8s.change(&[slice_of(&rest)])?;
        let r = connect(lab, "10.96.5.1:80", 40)?;
        ensure!(
            r.failed == 0 && r.backends.len() == 1 && r.count(&first) == 0,
            "after removing {first}: {}",
            r.summary()
        );
        let second = r.backends.keys().next().cloned().context("a backend")?;
        // The old backend comes back: the client keeps its new choice.
        k8s.change(&[slice_of(&[0, 1, 2])])?;
        let r = connect(lab, "10.96.5.1:80", 30)?;
        ensure!(r.count(&second) == 30, "kept {second}: {}", r.summary());

        // Affinity off: new connections spread again.
        k8s.change(&[service_with(
            "sticky",
            Some("10.96.5.1"),
            json!({"ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}),
        )])?;
        expect_backends(&connect(lab, "10.96.5.1:80", 150)?, &["a", "b", "c"])?;

        // On again with a 1 s timeout: bursts stick; after a pause longer than the
        // timeout the client may land anywhere. Eight rounds 1.3 s apart all landing on
        // the same backend would be a (1/3)^7 chance, about 1 in 2000.
        k8s.change(&[sticky(1)])?;
        let seen = sticky_rounds(lab, "10.96.5.1:80", 8, 5, Duration::from_millis(1300))?;
        let distinct: BTreeSet<&String> = seen.iter().collect();
        ensure!(distinct.len() > 1, "the timeout never ran out: {seen:?}");
        // Within the timeout (pauses of 0.3 s), the same backend throughout.
        let seen = sticky_rounds(lab, "10.96.5.1:80", 4, 5, Duration::from_millis(300))?;
        let distinct: BTreeSet<&String> = seen.iter().collect();
        ensure!(
            distinct.len() == 1,
            "stickiness broke within the timeout: {seen:?}"
        );
        Ok(())
    });
}

/// A client connecting every `interval` for `duration` in the background.
fn background(
    lab: &Lab,
    target: &str,
    duration: Duration,
    interval: Duration,
) -> Result<svc_lb_tests::procs::ClientRun> {
    let mut o = lab.client(sa(target), Proto::Tcp);
    o.count = 0;
    o.duration = Some(duration);
    o.interval = interval;
    lab.spawn_client(&o)
}

/// Waits until the API server served at least `want` lists of every resource.
fn wait_lists(k8s: &Cluster, want: u64) -> Result<()> {
    let deadline = Instant::now() + CONVERGE;
    while ["Service", "EndpointSlice", "Node"]
        .iter()
        .any(|k| k8s.api.counters().lists_of(k) < want)
    {
        ensure!(
            Instant::now() < deadline,
            "no relist: {:?}",
            k8s.api.counters()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Lines of the agent's log (without colours) that contain `needle`.
fn count_log(agent: &Agent, needle: &str) -> usize {
    log_lines(agent)
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// The API server is unreachable for 30 s: the datapath keeps the last programmed state
/// (a client connecting throughout sees no failure), the agent retries with backoff (no
/// hot loop) and stays ready, and when the API server returns without its history the
/// agent relists and converges in one sync, with no flapping.
#[test]
fn kube_apiserver_outage() {
    kube_e2e(&["a", "b", "c"], |lab, k8s| {
        lab.serve_all_tcp(8080, false)?;
        let [a, b, c] = [0, 1, 2].map(|i| lab.topo.addrs(false)[i]);
        k8s.api.apply(service("web", "10.96.6.1", 80, 8080))?;
        k8s.api
            .apply(slice("web", "x1", 8080, &[ready(a), ready(b)]))?;
        k8s.start_agent(lab)?;
        let health = health_addr(k8s.agent()?)?;
        let run = background(
            lab,
            "10.96.6.1:80",
            Duration::from_secs(40),
            Duration::from_millis(50),
        )?;
        std::thread::sleep(Duration::from_secs(2));

        let lists_before = k8s.api.counters();
        let syncs_before = k8s.agent()?.applied_count();
        let errors_before = count_log(k8s.agent()?, "watch failed");
        k8s.api.stop();
        let outage = Instant::now();
        // While the API server is away, the cluster changes (c joins) and the history
        // that recorded it is lost: only a relist can see it.
        std::thread::sleep(Duration::from_secs(2));
        k8s.api
            .expire_with(&[slice("web", "x1", 8080, &[ready(a), ready(b), ready(c)])])?;
        while outage.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_secs(1));
            ensure!(
                probe(health, "/healthz")? == 200,
                "healthz during the outage"
            );
            ensure!(probe(health, "/readyz")? == 200, "readyz during the outage");
        }
        let retries = count_log(k8s.agent()?, "watch failed") - errors_before;
        ensure!(
            k8s.agent()?.applied_count() == syncs_before,
            "no sync while the API server is away"
        );
        // Three watches, each retrying with a backoff capped at 5 s: about ten retries
        // each in 30 s. A hot loop would log thousands.
        ensure!(
            (3..=60).contains(&retries),
            "{retries} watch errors logged during a 30 s outage"
        );
        k8s.api.restart()?;
        let back = Instant::now();
        k8s.agent()?
            .wait_applied(syncs_before + 1, Duration::from_secs(20))?;
        eprintln!(
            "converged {:?} after the API server returned ({retries} retries logged)",
            back.elapsed()
        );
        // Every resource is listed again (each watch comes back after its own backoff,
        // at most 5 s + jitter).
        ensure!(
            ["Service", "EndpointSlice", "Node"]
                .iter()
                .all(|k| lists_before.lists_of(k) == 1),
            "{lists_before:?}"
        );
        wait_lists(k8s, 2)?;
        expect_backends(&connect(lab, "10.96.6.1:80", 150)?, &["a", "b", "c"])?;
        let r = run.wait()?;
        eprintln!("throughout the outage: {}", r.summary());
        ensure!(
            r.attempts > 300,
            "the background client ran: {}",
            r.summary()
        );
        ensure!(
            r.failed == 0 && r.count("a") > 0 && r.count("b") > 0,
            "the datapath kept serving: {}",
            r.summary()
        );
        // Converged in exactly one sync: no flapping.
        std::thread::sleep(Duration::from_secs(2));
        ensure!(
            k8s.agent()?.applied_count() == syncs_before + 1,
            "one sync after the outage, saw {}",
            k8s.agent()?.applied_count() - syncs_before
        );
        Ok(())
    });
}

/// 410 Gone: the watches end with "too old resource version" and the agent relists.
/// A relist that finds nothing new changes nothing (no sync at all); one that finds a
/// change applies it in one sync. A client connecting throughout sees no failure.
#[test]
fn kube_relist_after_410() {
    kube_e2e(&["a", "b"], |lab, k8s| {
        lab.serve_all_tcp(8080, false)?;
        let [a, b] = [0, 1].map(|i| lab.topo.addrs(false)[i]);
        k8s.api.apply(service("web", "10.96.7.1", 80, 8080))?;
        k8s.api.apply(slice("web", "x1", 8080, &[ready(a)]))?;
        k8s.start_agent(lab)?;
        let run = background(
            lab,
            "10.96.7.1:80",
            Duration::from_secs(8),
            Duration::from_millis(20),
        )?;

        std::thread::sleep(Duration::from_secs(1));
        let syncs = k8s.agent()?.applied_count();
        ensure!(
            k8s.api.counters().lists_of("Service") == 1,
            "one list so far"
        );
        k8s.api.expire();
        wait_lists(k8s, 2)?;
        std::thread::sleep(Duration::from_secs(1));
        ensure!(
            k8s.agent()?.applied_count() == syncs,
            "a relist without changes must not touch the datapath"
        );
        ensure!(k8s.api.counters().expired >= 3, "{:?}", k8s.api.counters());

        k8s.api
            .expire_with(&[slice("web", "x1", 8080, &[ready(a), ready(b)])])?;
        wait_lists(k8s, 3)?;
        k8s.agent()?.wait_applied(syncs + 1, CONVERGE)?;
        expect_backends(&connect(lab, "10.96.7.1:80", 60)?, &["a", "b"])?;
        let r = run.wait()?;
        eprintln!("during the relists: {}", r.summary());
        ensure!(r.failed == 0 && r.count("a") > 0, "{}", r.summary());
        std::thread::sleep(Duration::from_millis(500));
        ensure!(
            k8s.agent()?.applied_count() == syncs + 1,
            "exactly one sync for the change"
        );
        Ok(())
    });
}

/// A change touches only its own Service: an unchanged re-apply (new resourceVersion,
/// annotation churn) syncs nothing; a slice edit reaches the datapath in one sync while
/// a client of an unrelated Service sees no failure and only its own backend; a slice
/// whose `kubernetes.io/service-name` label changes moves to the other Service.
#[test]
fn kube_slice_edit_changes_only_its_service() {
    kube_e2e(&["a", "b", "c"], |lab, k8s| {
        lab.serve_all_tcp(8080, false)?;
        let [a, b, c] = [0, 1, 2].map(|i| lab.topo.addrs(false)[i]);
        k8s.api.apply(service("web", "10.96.8.1", 80, 8080))?;
        k8s.api
            .apply(slice("web", "x1", 8080, &[ready(a), ready(b)]))?;
        k8s.api.apply(service("other", "10.96.8.2", 80, 8080))?;
        k8s.api.apply(slice("other", "x1", 8080, &[ready(c)]))?;
        k8s.start_agent(lab)?;
        expect_backends(&connect(lab, "10.96.8.1:80", 60)?, &["a", "b"])?;
        let run = background(
            lab,
            "10.96.8.2:80",
            Duration::from_secs(4),
            Duration::from_millis(20),
        )?;
        std::thread::sleep(Duration::from_millis(500));

        let syncs = k8s.agent()?.applied_count();
        let mut churned = service("other", "10.96.8.2", 80, 8080);
        churned["metadata"]["annotations"] = json!({"deploy/rev": "2"});
        k8s.api.apply(churned)?;
        k8s.api.apply(slice("other", "x1", 8080, &[ready(c)]))?;
        std::thread::sleep(Duration::from_secs(1));
        ensure!(
            k8s.agent()?.applied_count() == syncs,
            "re-applying unchanged objects must not sync"
        );

        k8s.change(&[slice("web", "x1", 8080, &[ready(b)])])?;
        expect_backends(&connect(lab, "10.96.8.1:80", 30)?, &["b"])?;
        ensure!(
            k8s.agent()?.applied_count() == syncs + 1,
            "one sync for one slice edit"
        );
        let r = run.wait()?;
        eprintln!("the unrelated Service during the edit: {}", r.summary());
        ensure!(
            r.attempts > 50,
            "the background client ran: {}",
            r.summary()
        );
        expect_backends(&r, &["c"])?;

        // The slice web-x1 now says it belongs to "other": web has no endpoints left
        // (refused), other gains b.
        let mut moved = slice("web", "x1", 8080, &[ready(b)]);
        moved["metadata"]["labels"]["kubernetes.io/service-name"] = json!("other");
        k8s.change(&[moved])?;
        expect_failures(&connect(lab, "10.96.8.1:80", 10)?, "ECONNREFUSED")?;
        expect_backends(&connect(lab, "10.96.8.2:80", 60)?, &["b", "c"])?;
        Ok(())
    });
}

/// Objects that cannot be programmed are logged with namespace, name and reason, and
/// skipped; they never crash the agent nor disturb other Services. Fixing one programs
/// it.
#[test]
fn kube_bad_objects() {
    kube_e2e(&["a", "b"], |lab, k8s| {
        lab.serve_all_tcp(8080, false)?;
        let [a, b] = [0, 1].map(|i| lab.topo.addrs(false)[i]);
        k8s.api.apply(service("good", "10.96.8.1", 80, 8080))?;
        let mut good_slice = slice("good", "x1", 8080, &[ready(a), ready(b)]);
        good_slice["endpoints"]
            .as_array_mut()
            .context("endpoints")?
            .push(json!({"addresses": ["10.0.0.999"], "conditions": {"ready": true}}));
        k8s.api.apply(good_slice)?;
        k8s.api.apply(service("bad-ip", "10.96.8.300", 80, 8080))?;
        k8s.api.apply(slice("bad-ip", "x1", 8080, &[ready(a)]))?;
        k8s.api
            .apply(service("bad-port", "10.96.8.3", 70000, 8080))?;
        // Two Services claim one frontend: the first by namespace/name keeps it.
        k8s.api.apply(service("dup-a", "10.96.8.4", 80, 8080))?;
        k8s.api.apply(slice("dup-a", "x1", 8080, &[ready(a)]))?;
        k8s.api.apply(service("dup-b", "10.96.8.4", 80, 8080))?;
        k8s.api.apply(slice("dup-b", "x1", 8080, &[ready(b)]))?;
        // SCTP cannot be served by the socket programs: reported once, the TCP port works.
        let sctp = service_with(
            "sctp",
            Some("10.96.8.5"),
            json!({"ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                {"name": "sig", "port": 3868, "protocol": "SCTP", "targetPort": 3868},
            ]}),
        );
        k8s.api.apply(sctp)?;
        k8s.api.apply(slice("sctp", "x1", 8080, &[ready(b)]))?;
        k8s.start_agent(lab)?;

        expect_backends(&connect(lab, "10.96.8.1:80", 60)?, &["a", "b"])?;
        expect_backends(&connect(lab, "10.96.8.4:80", 20)?, &["a"])?;
        expect_backends(&connect(lab, "10.96.8.5:80", 20)?, &["b"])?;
        expect_unreachable(lab, &["10.96.8.3:80"], "ENETUNREACH")?;
        let log = log_lines(k8s.agent()?);
        for (object, reason) in [
            (
                "Service kube-e2e/bad-ip",
                "cluster IP '10.96.8.300' is not a valid IP address",
            ),
            ("Service kube-e2e/bad-port", "port 70000 is out of range"),
            (
                "Service kube-e2e/dup-b",
                "frontend 10.96.8.4:80/TCP is already used by Service kube-e2e/dup-a",
            ),
            (
                "Service kube-e2e/sctp",
                "SCTP port 'sig' (3868) is not programmed",
            ),
            (
                "EndpointSlice kube-e2e/good-x1",
                "'10.0.0.999' is not a valid IP address",
            ),
        ] {
            let n = log
                .iter()
                .filter(|l| {
                    l.contains("skipped bad input") && l.contains(object) && l.contains(reason)
                })
                .count();
            ensure!(n == 1, "{object}: {reason}: logged {n} times");
        }
        ensure!(k8s.agent()?.is_running()?, "the agent survived");

        // Fixing the bad Service programs it; the others are undisturbed.
        k8s.change(&[service("bad-ip", "10.96.8.2", 80, 8080)])?;
        expect_backends(&connect(lab, "10.96.8.2:80", 20)?, &["a"])?;
        expect_backends(&connect(lab, "10.96.8.1:80", 60)?, &["a", "b"])?;
        // Reported once while it persists, not on every sync.
        let log = log_lines(k8s.agent()?);
        let n = log
            .iter()
            .filter(|l| l.contains("skipped bad input") && l.contains("kube-e2e/dup-b"))
            .count();
        ensure!(n == 1, "dup-b reported {n} times");
        Ok(())
    });
}

/// The behaviours of the upstream [sig-network] Services e2e suite that apply to a
/// socket-level proxy (see tests/README.md for the checklist): multiport Services, one
/// port number with two protocols, the terminating-endpoint fallback,
/// `service.kubernetes.io/service-proxy-name` and headless Services.
#[test]
fn kube_conformance_ports_terminating_proxy_name_headless() {
    kube_e2e(&["a", "b", "c"], |lab, k8s| {
        let addrs = lab.topo.addrs(false);
        for (id, addr) in ["a", "b", "c"].iter().zip(&addrs) {
            let tcp: Vec<SocketAddr> = [8080, 8081, 5353]
                .iter()
                .map(|p| SocketAddr::new(*addr, *p))
                .collect();
            lab.serve(id, id, &tcp, &[SocketAddr::new(*addr, 5353)])?;
        }
        let [a, b, c] = [0, 1, 2].map(|i| addrs[i]);
        // Multiport, and port 53 over TCP and UDP (one number, two protocols).
        k8s.api.apply(service_with(
            "multi",
            Some("10.96.9.1"),
            json!({"ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                {"name": "alt", "port": 81, "protocol": "TCP", "targetPort": 8081},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 5353},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
            ]}),
        ))?;
        let mut multi = slice("multi", "x1", 8080, &[ready(a), ready(b)]);
        multi["ports"] = json!([
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "alt", "port": 8081, "protocol": "TCP"},
            {"name": "dns-tcp", "port": 5353, "protocol": "TCP"},
            {"name": "dns", "port": 5353, "protocol": "UDP"},
        ]);
        k8s.api.apply(multi)?;
        // Terminating endpoints: a still serves, b does not.
        let mut draining = slice("draining", "x1", 8080, &[ready(a), ready(b)]);
        draining["endpoints"][0]["conditions"] =
            json!({"ready": false, "serving": true, "terminating": true});
        draining["endpoints"][1]["conditions"] =
            json!({"ready": false, "serving": false, "terminating": true});
        k8s.api.apply(service("draining", "10.96.9.2", 80, 8080))?;
        k8s.api.apply(draining.clone())?;
        // service-proxy-name: ours, someone else's.
        let labelled = |name: &str, ip: &str, proxy: Option<&str>| {
            let mut s = service(name, ip, 80, 8080);
            if let Some(p) = proxy {
                s["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!(p);
            }
            s
        };
        k8s.api
            .apply(labelled("ours", "10.96.9.3", Some("svc-lb")))?;
        k8s.api.apply(slice("ours", "x1", 8080, &[ready(c)]))?;
        k8s.api
            .apply(labelled("theirs", "10.96.9.4", Some("other-proxy")))?;
        k8s.api.apply(slice("theirs", "x1", 8080, &[ready(c)]))?;
        // Headless: no cluster IP, and its slices carry the headless label.
        k8s.api.apply(service_with(
            "headless",
            None,
            json!({"clusterIP": "None", "clusterIPs": ["None"]}),
        ))?;
        let mut headless = slice("headless", "x1", 8080, &[ready(a)]);
        headless["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
        k8s.api.apply(headless)?;
        k8s.extra_args = vec!["--service-proxy-name".into(), "svc-lb".into()];
        k8s.start_agent(lab)?;

        for target in ["10.96.9.1:80", "10.96.9.1:81", "10.96.9.1:53"] {
            expect_backends(&connect(lab, target, 40)?, &["a", "b"])
                .with_context(|| target.to_owned())?;
        }
        let mut o = lab.client(sa("10.96.9.1:53"), Proto::Udp);
        o.count = 40;
        let r = lab.run_client(&o)?;
        expect_backends(&r, &["a", "b"]).context("UDP 53")?;
        ensure!(
            r.reply_sources.keys().all(|s| s == "10.96.9.1:53"),
            "UDP replies come from the Service: {:?}",
            r.reply_sources
        );

        // Only the terminating endpoint that still serves takes traffic...
        expect_backends(&connect(lab, "10.96.9.2:80", 30)?, &["a"])?;
        // ... until a ready one exists: then only ready ones.
        let endpoints = draining["endpoints"].as_array_mut().context("endpoints")?;
        endpoints.push(
            json!({"addresses": [c.to_string()], "conditions": {"ready": true}, "nodeName": NODE}),
        );
        k8s.change(&[draining])?;
        expect_backends(&connect(lab, "10.96.9.2:80", 30)?, &["c"])?;

        expect_backends(&connect(lab, "10.96.9.3:80", 20)?, &["c"])?;
        expect_failures(&connect(lab, "10.96.9.4:80", 10)?, "ENETUNREACH")?;
        // Relabelled for us: programmed; for someone else again: removed.
        k8s.change(&[labelled("theirs", "10.96.9.4", Some("svc-lb"))])?;
        expect_backends(&connect(lab, "10.96.9.4:80", 20)?, &["c"])?;
        k8s.change(&[labelled("theirs", "10.96.9.4", Some("other-proxy"))])?;
        expect_failures(&connect(lab, "10.96.9.4:80", 10)?, "ENETUNREACH")?;

        // Nothing of the headless Service is programmed.
        let out = lab.svc_lb(&["list", "-o", "json"])?;
        ensure!(out.status.success(), "svc-lb list: {out:?}");
        let list: Value = serde_json::from_slice(&out.stdout).context("list JSON")?;
        let services: BTreeSet<String> = list
            .as_array()
            .context("a list")?
            .iter()
            .filter_map(|e| e["service"].as_str().map(str::to_owned))
            .collect();
        let want: BTreeSet<String> = ["multi", "draining", "ours"].map(String::from).into();
        ensure!(services == want, "programmed Services: {services:?}");
        Ok(())
    });
}

/// `GET path` on the health endpoint: the status code and the body.
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP answer {out:?}"))?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// `/healthz` as kube-proxy answers it: the status, and `nodeEligible` from the JSON body
/// (which must carry `lastUpdated` and `currentTime` too; equal while healthy).
fn healthz(addr: SocketAddr) -> Result<(u16, bool)> {
    let (code, body) = get(addr, "/healthz")?;
    let v: Value = serde_json::from_str(&body).with_context(|| format!("JSON body {body:?}"))?;
    let (last, now) = (v["lastUpdated"].as_str(), v["currentTime"].as_str());
    ensure!(
        last.is_some() && now.is_some(),
        "lastUpdated and currentTime in {body}"
    );
    if code == 200 {
        ensure!(last == now, "healthy: lastUpdated is currentTime: {body}");
    }
    let eligible = v["nodeEligible"]
        .as_bool()
        .with_context(|| format!("nodeEligible in {body}"))?;
    Ok((code, eligible))
}

/// Node health as kube-proxy reports it: `/healthz` turns 503 (`nodeEligible: false`)
/// while this Node carries the cluster autoscaler's to-be-deleted taint or a
/// `deletionTimestamp`, and back to 200 without them; `/livez` and `/readyz` stay 200
/// throughout (a draining node's agent must not be restarted); Services keep working.
#[test]
fn kube_node_health_follows_deletion_and_autoscaler_taint() {
    kube_e2e(&["a"], |lab, k8s| {
        lab.serve_all_tcp(8080, false)?;
        let a = lab.topo.addrs(false)[0];
        k8s.api.apply(service("web", "10.96.7.1", 80, 8080))?;
        k8s.api.apply(slice("web", "x1", 8080, &[ready(a)]))?;
        k8s.start_agent(lab)?;
        let health = health_addr(k8s.agent()?)?;
        ensure!(healthz(health)? == (200, true), "healthy at start");
        let mut tainted = node(NODE, &[NODE_IP], Some(ZONE));
        tainted["spec"]["taints"] = json!([
            {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}
        ]);
        let mut deleted = node(NODE, &[NODE_IP], Some(ZONE));
        deleted["metadata"]["deletionTimestamp"] = json!("2025-01-15T09:30:00Z");
        for (what, n) in [("tainted", tainted), ("deleted", deleted)] {
            k8s.change(&[n])?;
            ensure!(healthz(health)? == (503, false), "{what}: /healthz");
            ensure!(get(health, "/livez")?.0 == 200, "{what}: /livez");
            ensure!(probe(health, "/readyz")? == 200, "{what}: /readyz");
            expect_backends(&connect(lab, "10.96.7.1:80", 10)?, &["a"])?;
            k8s.change(&[node(NODE, &[NODE_IP], Some(ZONE))])?;
            ensure!(healthz(health)? == (200, true), "{what} then restored");
        }
        Ok(())
    });
}

/// A `--health-addr` or `--metrics-addr` given explicitly whose port is taken stops the
/// agent at start (exit status 1, the flag and the bind error in its message) before it
/// programs anything.
#[test]
fn kube_explicit_health_or_metrics_port_in_use_stops_the_start() {
    kube_e2e(&["a"], |lab, k8s| {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").context("take a port")?;
        let addr = taken.local_addr()?.to_string();
        for (flag, other) in [
            ("--health-addr", "--metrics-addr"),
            ("--metrics-addr", "--health-addr"),
        ] {
            let config = lab.kube_agent_config(
                &k8s.kubeconfig,
                NODE,
                &format!("kube-agent-port{flag}.log"),
                &[flag, &addr, other, "off"],
            );
            let mut agent = Agent::start(config)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let status = loop {
                if let Some(s) = agent.try_exit()? {
                    break s;
                }
                ensure!(
                    Instant::now() < deadline,
                    "{flag} {addr} taken: the agent still runs"
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            ensure!(status.code() == Some(1), "{flag}: exit status {status}");
            let want = format!("{flag} {addr}: cannot serve");
            let deadline = Instant::now() + Duration::from_secs(2);
            while !agent.log_text().contains("Address already in use") && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let log = agent.log_text();
            ensure!(
                log.contains(&want) && log.contains("Address already in use"),
                "{flag}: the error must name the flag, the address and the reason: {log}"
            );
            ensure!(agent.applied_count() == 0, "{flag}: nothing applied");
        }
        drop(taken);
        Ok(())
    });
}
