//! DNS through a Service, with real programs: dnsmasq (Debian's) in each backend
//! namespace behind a dual-stack ClusterIP Service on port 53 UDP and TCP, queried with
//! `dig` (bind9-dnsutils) from the lab's client namespace and cgroup.
//!
//! Each backend answers one name with its own A and AAAA record, so every answer says
//! which backend served it. dig prints the server each reply came from (`;; SERVER:`)
//! and warns `reply from unexpected source` when a UDP reply's source is not the address
//! it asked: both must be the Service address, or the test fails.
//!
//! Run as root, one at a time:
//! `cargo test --release -p svc-lb-tests --features e2e --test dns -- --test-threads=1`.
//! A missing dig or dnsmasq fails the test (`cargo xtask setup` installs both).
#![cfg(feature = "e2e")]

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::IpAddr,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use svc_lb_tests::ip;
use svc_lb_tests::{
    Bins, Lab,
    lab::{in_client, isolated},
    manifests::{EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
    procs::{ChildGuard, die_with_parent},
};

const NS: &str = "dns";
const NAME: &str = "web.svc.test";
const V4: &str = "10.96.53.10";
const V6: &str = "fd00:96::53";
const EMPTY_V4: &str = "10.96.53.20";
const EMPTY_V6: &str = "fd00:96::5320";

/// The records backend `index` answers for [`NAME`]: `10.99.0.<index>` and
/// `fd00:99::<index>`.
fn records(index: u8) -> (String, String) {
    (format!("10.99.0.{index}"), format!("fd00:99::{index}"))
}

/// Starts dnsmasq in backend `id`'s namespace on its two addresses, port 53, answering
/// only [`NAME`] from its own records (no upstream, no /etc/hosts), and waits until it
/// answers. Stopped by pid when the guard drops.
fn start_dnsmasq(lab: &Lab, id: &str) -> Result<ChildGuard> {
    let b = lab.topo.backend(id);
    let (a, aaaa) = records(b.index);
    let args = vec![
        "--keep-in-foreground".to_owned(),
        "--conf-file=/dev/null".to_owned(),
        "--no-resolv".to_owned(),
        "--no-hosts".to_owned(),
        "--bind-interfaces".to_owned(),
        format!("--listen-address={}", b.addr(false)),
        format!("--listen-address={}", b.addr(true)),
        "--port=53".to_owned(),
        format!("--host-record={NAME},{a},{aaaa}"),
        // Stay root: the lab may run where no `dnsmasq` user exists.
        "--user=root".to_owned(),
        "--group=root".to_owned(),
        "--pid-file=".to_owned(),
        "--log-facility=-".to_owned(),
    ];
    let ns = b.netns.name().to_owned();
    // `ip netns exec` execs dnsmasq in place, from this (long-lived) thread: the death
    // signal is tied to the thread that forks, so not a short-lived `in_netns` thread.
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns, "dnsmasq"])
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd, libc::SIGKILL);
    let mut child = cmd
        .spawn()
        .context("start dnsmasq (is it installed? `cargo xtask setup` installs it)")?;
    let stderr = child.stderr.take().context("dnsmasq stderr")?;
    let mut guard = ChildGuard::new(child, format!("dnsmasq {id}"));
    // dnsmasq logs `started` once its sockets are bound; keep draining afterwards.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stderr).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            let started = line.contains("started");
            let _ = tx.send(line);
            if started {
                break;
            }
        }
        for _ in lines {}
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut said = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("started") => return Ok(guard),
            Ok(line) => said.push(line),
            Err(_) => {
                let status = guard.kill().ok();
                bail!("dnsmasq in {ns} did not start (exit {status:?}): {said:?}");
            }
        }
    }
}

/// The dual-stack Service `name` on port 53 UDP and TCP, with ready endpoints at the
/// backends `ids` (none: no EndpointSlice).
fn dns_service(lab: &Lab, name: &str, vips: [&str; 2], ids: &[&str]) -> String {
    let mut docs = vec![
        Service::new(NS, name, &[ip(vips[0]), ip(vips[1])])
            .port("dns", 53, TargetPort::Number(53), Protocol::Udp)
            .port("dns-tcp", 53, TargetPort::Number(53), Protocol::Tcp)
            .to_value(),
    ];
    if !ids.is_empty() {
        for v6 in [false, true] {
            let addrs: Vec<IpAddr> = ids.iter().map(|id| lab.topo.backend(id).addr(v6)).collect();
            let slice = EndpointSlice::new(NS, name, if v6 { "v6" } else { "v4" }, v6)
                .port("dns", 53, Protocol::Udp)
                .port("dns-tcp", 53, Protocol::Tcp)
                .ready_endpoints(&addrs);
            docs.push(slice.to_value());
        }
    }
    yaml_docs(&docs)
}

/// What a batch of dig queries got.
#[derive(Debug, Default)]
struct Digs {
    /// Answers per backend id.
    backends: BTreeMap<String, u64>,
    /// `;; SERVER:` lines: the address each reply came from, with the transport.
    servers: BTreeMap<String, u64>,
    /// Queries without an answer, and dig's own words about each.
    failed: u64,
    complaints: Vec<String>,
}

impl Digs {
    fn answered(&self) -> u64 {
        self.backends.values().sum()
    }
}

/// Runs `runs` dig invocations of `per_run` queries each (A and AAAA alternating) at
/// `server` port 53, over TCP when `tcp`, in the client namespace and cgroup. Each query
/// is a new socket, so each is a new backend choice.
fn dig(lab: &Lab, server: &str, tcp: bool, runs: u32, per_run: u32) -> Result<Digs> {
    let by_record: BTreeMap<String, String> = lab
        .topo
        .backends
        .iter()
        .flat_map(|b| {
            let (a, aaaa) = records(b.index);
            [(a, b.id.clone()), (aaaa, b.id.clone())]
        })
        .collect();
    let mut out = Digs::default();
    for _ in 0..runs {
        let mut args = vec![
            format!("@{server}"),
            "-p".to_owned(),
            "53".to_owned(),
            "+tries=1".to_owned(),
            "+time=2".to_owned(),
            "+noall".to_owned(),
            "+answer".to_owned(),
            "+stats".to_owned(),
        ];
        if tcp {
            args.push("+tcp".to_owned());
        }
        for i in 0..per_run {
            args.push(NAME.to_owned());
            args.push(if i % 2 == 0 { "A" } else { "AAAA" }.to_owned());
        }
        let o = in_client(lab, "dig", &args)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let mut answered = 0;
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let [name, _ttl, "IN", "A" | "AAAA", addr] = fields[..]
                && name == format!("{NAME}.")
            {
                let id = by_record
                    .get(addr)
                    .with_context(|| format!("an answer from no backend: {line}"))?;
                *out.backends.entry(id.clone()).or_default() += 1;
                answered += 1;
            } else if let Some(server) = line.strip_prefix(";; SERVER: ") {
                *out.servers.entry(server.to_owned()).or_default() += 1;
            } else if line.starts_with(";;")
                && !line.starts_with(";; Query time")
                && !line.starts_with(";; WHEN")
                && !line.starts_with(";; MSG SIZE")
            {
                // "reply from unexpected source", timeouts, refusals, errors.
                out.complaints.push(line.to_owned());
            }
        }
        out.failed += u64::from(per_run.saturating_sub(answered));
    }
    eprintln!(
        "dig @{server} {}: {out:?}",
        if tcp { "+tcp" } else { "(UDP)" }
    );
    Ok(out)
}

/// Every query answered by the Service address, no complaint from dig, and exactly the
/// backends `ids` answering, each a real share.
fn assert_served(d: &Digs, server: &str, tcp: bool, ids: &[&str], count: u64) -> Result<()> {
    ensure!(
        d.failed == 0 && d.answered() == count && d.complaints.is_empty(),
        "{count} queries to {server}: {d:?}"
    );
    let transport = if tcp { "TCP" } else { "UDP" };
    let want = BTreeMap::from([(format!("{server}#53({server}) ({transport})"), count)]);
    ensure!(
        d.servers == want,
        "replies came from {:?}, expected {want:?}",
        d.servers
    );
    let got: Vec<&str> = d.backends.keys().map(String::as_str).collect();
    ensure!(got == ids, "answers from {got:?}, expected {ids:?}: {d:?}");
    // Random choice per query: with 60 queries over three backends a share under a
    // twelfth happens about once in 100 000 checks.
    for id in ids {
        ensure!(
            d.backends[*id] * 12 >= count,
            "backend {id} answered {} of {count}: {d:?}",
            d.backends[*id]
        );
    }
    Ok(())
}

/// dig at a Service without endpoints: refused at once, not a hang until dig's timeout.
fn assert_refused_fast(lab: &Lab, server: &str, tcp: bool) -> Result<()> {
    let t0 = Instant::now();
    // A hang would take 2 tries × 3 s.
    let mut args = vec![
        format!("@{server}"),
        "+tries=2".to_owned(),
        "+time=3".to_owned(),
        NAME.to_owned(),
    ];
    if tcp {
        args.push("+tcp".to_owned());
    }
    let o = in_client(lab, "dig", &args)?;
    let took = t0.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!(
        "dig @{server} tcp={tcp} without endpoints: {took:?}, {}: {text}",
        o.status
    );
    ensure!(
        !o.status.success(),
        "dig succeeded without endpoints: {text}"
    );
    ensure!(
        text.contains("connection refused"),
        "dig @{server} tcp={tcp}: no `connection refused` in {text}"
    );
    ensure!(
        took < Duration::from_secs(2),
        "dig @{server} tcp={tcp} took {took:?} to fail: {text}"
    );
    Ok(())
}

/// Three dnsmasq backends behind a dual-stack Service: 60 UDP and 60 TCP queries to
/// each cluster IP, all answered from the Service address by all three; after backend c
/// leaves the EndpointSlices (its dnsmasq still running), 60 more per case, none from c;
/// a Service without endpoints makes dig fail at once with `connection refused`.
#[test]
fn dig_through_a_dual_stack_service_over_udp_and_tcp() {
    isolated(|| {
        let bins =
            Bins::from_env(Some(env!("CARGO_BIN_EXE_svclb-harness"))).expect("locate the binaries");
        let mut lab = Lab::new(bins, &["a", "b", "c"]).expect("build the lab");
        if let Err(e) = dig_case(&mut lab) {
            panic!("{e:?}");
        }
    });
}

fn dig_case(lab: &mut Lab) -> Result<()> {
    let _servers = ["a", "b", "c"]
        .iter()
        .map(|id| start_dnsmasq(lab, id))
        .collect::<Result<Vec<_>>>()?;
    lab.write_manifest(
        "dns.yaml",
        &dns_service(lab, "dns", [V4, V6], &["a", "b", "c"]),
    )?;
    lab.write_manifest(
        "empty.yaml",
        &dns_service(lab, "empty", [EMPTY_V4, EMPTY_V6], &[]),
    )?;
    lab.start_agent()?;

    for server in [V4, V6] {
        for tcp in [false, true] {
            let d = dig(lab, server, tcp, 4, 15)?;
            assert_served(&d, server, tcp, &["a", "b", "c"], 60)?;
        }
    }

    // c leaves the Service; its server keeps answering, so a query sent there would show.
    let applied = lab.agent().applied_count();
    lab.write_manifest("dns.yaml", &dns_service(lab, "dns", [V4, V6], &["a", "b"]))?;
    lab.agent()
        .wait_applied(applied + 1, Duration::from_secs(10))?;
    for server in [V4, V6] {
        for tcp in [false, true] {
            let d = dig(lab, server, tcp, 4, 15)?;
            assert_served(&d, server, tcp, &["a", "b"], 60)?;
        }
    }

    for server in [EMPTY_V4, EMPTY_V6] {
        for tcp in [false, true] {
            assert_refused_fast(lab, server, tcp)?;
        }
    }
    Ok(())
}
