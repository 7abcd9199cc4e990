//! Hostile and careless input (issue 12): manifest files that are too big, alias bombs,
//! files caught half-written, addresses that must never become frontends. Every test runs
//! the real agent on a private lab and counts real connections, as in `e2e.rs`.
#![cfg(feature = "e2e")]

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use svc_lb_tests::{
    ClientReport, Lab, Proto,
    agent::{Agent, AgentConfig},
    lab::with_lab,
    manifests::{EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
};
use svc_lb_tests::{ip, manifests::tcp_service, sa};

const NS: &str = "input";

fn lab_test(ids: &[&str], body: impl FnOnce(&mut Lab) -> Result<()>) {
    with_lab(env!("CARGO_BIN_EXE_svclb-harness"), ids, body);
}

/// The agent's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")
}

/// A YAML "billion laughs": one anchored list of `n` scalars referenced `m` times, so
/// that about 40 KB of text expands to `n × m` nodes.
fn alias_bomb(n: usize, m: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: bomb\n  namespace: {NS}\n  annotations:\n    a: &a [{}]\n    b: [{}]\n",
        vec!["x"; n].join(","),
        vec!["*a"; m].join(","),
    )
}

fn no_failures(r: &ClientReport, what: &str) -> Result<()> {
    ensure!(r.failed == 0 && r.attempts > 0, "{what}: {}", r.summary());
    Ok(())
}

/// A 40 KB alias bomb next to a good Service: the agent reports the file by name and
/// reason, its memory stays bounded, and the good Service keeps working.
#[test]
fn yaml_alias_bomb_is_refused_with_bounded_memory() {
    lab_test(&["a"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        lab.write_manifest(
            "good.yaml",
            &tcp_service(NS, "good", "10.96.1.10", 80, 8080, &addrs),
        )?;
        let bomb = alias_bomb(5000, 5000);
        eprintln!("bomb file: {} bytes", bomb.len());
        lab.write_manifest("bomb.yaml", &bomb)?;
        lab.start_agent()?;
        let pid = lab.agent().pid();
        let peak = peak_rss_kib(pid)?;
        eprintln!("agent peak RSS (VmHWM) after the first sync: {peak} KiB");
        let log = lab.agent().log_text();
        ensure!(
            log.lines()
                .any(|l| l.contains("bomb.yaml") && l.contains("budget")),
            "the bomb file is not reported with its reason:\n{log}"
        );
        let mut o = lab.client(sa("10.96.1.10:80"), Proto::Tcp);
        o.count = 50;
        let r = lab.run_client(&o)?;
        no_failures(&r, "good Service next to the bomb")?;
        ensure!(r.count("a") == 50, "{}", r.summary());
        // The agent alone (maps open, one Service) stays well under 100 MiB; the bomb
        // used to take it past 1 GiB.
        ensure!(
            peak < 150 * 1024,
            "agent peak RSS {peak} KiB: the bomb was expanded"
        );
        Ok(())
    });
}

/// A manifest rewritten in place in two steps with a pause in between (an editor, `cp`,
/// a slow `kubectl get > file`): the half-written file is never published, so a client
/// connecting all the while sees no failure. Deleting the file withdraws the Service.
#[test]
fn a_file_written_in_two_steps_never_withdraws_its_service() {
    lab_test(&["a", "b"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        let full = tcp_service(NS, "web", "10.96.1.20", 80, 8080, &addrs);
        lab.write_manifest("web.yaml", &full)?;
        lab.start_agent()?;

        let mut bg = lab.client(sa("10.96.1.20:80"), Proto::Tcp);
        bg.count = 0;
        bg.duration = Some(Duration::from_secs(5));
        bg.interval = Duration::from_millis(5);
        let running = lab.spawn_client(&bg)?;
        std::thread::sleep(Duration::from_millis(500));

        // Step 1: truncate and write the Service document only (a valid prefix: on its
        // own it would be a Service without endpoints, refusing every connection).
        let path = lab.manifests_dir().join("web.yaml");
        let split = full.find("\n---").context("two documents")? + 1;
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&path).context("open web.yaml in place")?;
            f.write_all(&full.as_bytes()[..split])?;
            f.flush()?;
            std::thread::sleep(Duration::from_millis(1500));
            // Step 2: the rest, then close.
            f.write_all(&full.as_bytes()[split..])?;
        }
        let during = running.wait()?;
        eprintln!("during the two-step write: {}", during.summary());
        ensure!(
            during.failed == 0 && during.attempts > 100,
            "connections failed while the file was half-written: {}",
            during.summary()
        );
        ensure!(
            during.count("a") > 0 && during.count("b") > 0,
            "{}",
            during.summary()
        );

        // Deleting the file withdraws the Service.
        let before = lab.agent().applied_count();
        std::fs::remove_file(&path).context("remove web.yaml")?;
        lab.agent()
            .wait_applied(before + 1, Duration::from_secs(10))?;
        let out = lab.svc_lb(&["list", "-o", "json"])?;
        let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        ensure!(
            list.as_array().is_some_and(Vec::is_empty),
            "frontends left after the file was deleted: {list}"
        );
        let mut o = lab.client(sa("10.96.1.20:80"), Proto::Tcp);
        o.count = 20;
        o.timeout = Duration::from_millis(500);
        let after = lab.run_client(&o)?;
        eprintln!("after the delete: {}", after.summary());
        ensure!(
            after.ok == 0 && after.failed == 20,
            "the deleted Service still answers: {}",
            after.summary()
        );
        Ok(())
    });
}

/// A load-balancer ingress IP of 127.0.0.1 is refused with a message naming the Service
/// and the address: a client in the client netns dialling 127.0.0.1 reaches its own
/// local server, never a backend; the Service's cluster IP still balances.
#[test]
fn a_loopback_ingress_ip_does_not_capture_local_connections() {
    lab_test(&["a", "b"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let client_ns = lab.topo.client.name().to_owned();
        let _local = svc_lb_tests::procs::Server::start(
            &lab.bins.harness,
            &client_ns,
            "local",
            &[sa("127.0.0.1:80")],
            &[],
        )?;
        let addrs = lab.topo.addrs(false);
        let svc = Service::new(NS, "hijack", &[ip("10.96.1.30")])
            .spec("type", serde_json::json!("LoadBalancer"))
            .port("http", 80, TargetPort::Number(8080), Protocol::Tcp)
            .lb_ingress(ip("127.0.0.1"));
        let slice = EndpointSlice::new(NS, "hijack", "x1", false)
            .port("http", 8080, Protocol::Tcp)
            .ready_endpoints(&addrs);
        lab.write_manifest(
            "hijack.yaml",
            &yaml_docs(&[svc.to_value(), slice.to_value()]),
        )?;
        lab.start_agent()?;
        let log = lab.agent().log_text();
        ensure!(
            log.lines().any(|l| l.contains("Service input/hijack")
                && l.contains("load-balancer ingress IP '127.0.0.1' is refused")),
            "no message naming the Service and the address:\n{log}"
        );

        let mut o = lab.client(sa("127.0.0.1:80"), Proto::Tcp);
        o.count = 50;
        let local = lab.run_client(&o)?;
        eprintln!("127.0.0.1:80 from the client: {}", local.summary());
        no_failures(&local, "loopback")?;
        ensure!(
            local.count("local") == 50,
            "loopback connections were captured: {}",
            local.summary()
        );

        let mut o = lab.client(sa("10.96.1.30:80"), Proto::Tcp);
        o.count = 200;
        let cluster = lab.run_client(&o)?;
        eprintln!("cluster IP: {}", cluster.summary());
        no_failures(&cluster, "cluster IP")?;
        ensure!(
            cluster.count("a") >= 20 && cluster.count("b") >= 20 && cluster.count("local") == 0,
            "{}",
            cluster.summary()
        );
        Ok(())
    });
}

/// Issue 11 item 4: a Service labelled `service.kubernetes.io/headless` is not
/// programmed even with a cluster IP, `svc-lb status` says why; removing the label
/// programs it.
#[test]
fn the_headless_label_keeps_a_service_unprogrammed_until_removed() {
    lab_test(&["a"], |lab| {
        lab.serve_all_tcp(8080, false)?;
        let addrs = lab.topo.addrs(false);
        let plain = tcp_service(NS, "web", "10.96.1.40", 80, 8080, &addrs);
        let svc = Service::new(NS, "web", &[ip("10.96.1.40")]).port(
            "http",
            80,
            TargetPort::Number(8080),
            Protocol::Tcp,
        );
        let mut svc = svc.to_value();
        let labels = svc
            .pointer_mut("/metadata/labels")
            .and_then(serde_json::Value::as_object_mut);
        match labels {
            Some(l) => {
                l.insert("service.kubernetes.io/headless".into(), "".into());
            }
            None => {
                svc["metadata"]["labels"] =
                    serde_json::json!({"service.kubernetes.io/headless": ""});
            }
        }
        let slice = EndpointSlice::new(NS, "web", "x1", false)
            .port("http", 8080, Protocol::Tcp)
            .ready_endpoints(&addrs);
        let labelled = yaml_docs(&[svc, slice.to_value()]);
        ensure!(
            labelled.contains("service.kubernetes.io/headless"),
            "{labelled}"
        );
        lab.write_manifest("web.yaml", &labelled)?;
        lab.write_manifest(
            "other.yaml",
            &tcp_service(NS, "other", "10.96.1.41", 80, 8080, &addrs),
        )?;
        let port = free_port()?;
        let mut agent = start_agent_with(lab, &["--metrics-addr", &format!("127.0.0.1:{port}")])?;

        let mut o = lab.client(sa("10.96.1.40:80"), Proto::Tcp);
        o.count = 20;
        o.timeout = Duration::from_millis(500);
        let r = lab.run_client(&o)?;
        eprintln!("labelled: {}", r.summary());
        ensure!(r.ok == 0 && r.failed == 20, "{}", r.summary());
        let out = lab.svc_lb(&["status", "--metrics-addr", &format!("127.0.0.1:{port}")])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains("Service input/web: labelled service.kubernetes.io/headless"),
            "status does not say why:\n{text}"
        );
        let out = lab.svc_lb(&[
            "list",
            "--service",
            "input/web",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            err.contains("no frontend of Service input/web is programmed")
                && err.contains("labelled service.kubernetes.io/headless"),
            "list does not say why:\n{err}"
        );

        let before = agent.applied_count();
        lab.write_manifest("web.yaml", &plain)?;
        agent.wait_applied(before + 1, Duration::from_secs(10))?;
        let r = lab.run_client(&o)?;
        eprintln!("label removed: {}", r.summary());
        no_failures(&r, "label removed")?;
        ensure!(r.count("a") == 20, "{}", r.summary());
        Ok(())
    });
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(l.local_addr()?.port())
}

/// Starts an agent on the lab's manifests, pins and cgroup with extra flags, and waits
/// for its first sync. The caller drops it before the lab.
fn start_agent_with(lab: &Lab, args: &[&str]) -> Result<Agent> {
    let config = AgentConfig {
        bin: lab.bins.svc_lb.clone(),
        manifests: lab.manifests_dir(),
        bpffs: lab.bpffs().to_path_buf(),
        cgroup: lab.cgroup().to_path_buf(),
        log_file: lab.dir().join("agent-with-flags.log"),
        extra_args: args.iter().map(|a| (*a).to_owned()).collect(),
    };
    let mut agent = Agent::start(config)?;
    agent.wait_applied(1, Duration::from_secs(30))?;
    Ok(agent)
}
