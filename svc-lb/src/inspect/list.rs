//! `svc-lb list`: every programmed frontend with its Service, flags and backends.
//!
//! The text layout follows `ipvsadm -Ln`: one line per frontend, then one `->` line
//! per backend. `-o json` and `-o yaml` print [`ListEntry`] values; their field names
//! are a stable, documented format (see the README), extended only by adding fields.
use anyhow::{Result, bail};
use serde::Serialize;
use svc_lb_common::{
    KIND_CLUSTER_IP, SCOPE_EXTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY, SVC_FLAG_EXT_LOCAL,
    SVC_FLAG_SRC_RANGES,
};

use super::{names, view::DatapathView};
use crate::model::ServiceRef;

/// One frontend: what a client dials.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ListEntry {
    /// For an external NodePort frontend, the unspecified address ("0.0.0.0" or "::"):
    /// it matches every node address that serves NodePorts.
    pub address: String,
    pub port: u16,
    /// "TCP", "UDP" or "SCTP".
    pub protocol: &'static str,
    /// Which clients the entry serves: "socket" (programs on this node, by the socket
    /// hooks) or "external" (packets arriving on the node's devices, by tc/XDP).
    pub scope: &'static str,
    /// The datapath's flags of the entry: "affinity", "source_ranges" (only sources in
    /// loadBalancerSourceRanges), "external_local" (externalTrafficPolicy Local: local
    /// endpoints only, client address preserved), "drop_empty" (no local endpoint
    /// while other nodes have some: packets are dropped rather than rejected).
    pub datapath_flags: Vec<&'static str>,
    /// "ClusterIP", "NodePort", "LoadBalancer", "ExternalIP", or "Unknown" before the
    /// agent wrote the Service metadata.
    pub kind: &'static str,
    /// The Service; `null` when the metadata is missing.
    pub namespace: Option<String>,
    pub service: Option<String>,
    /// `spec.ports[].name` ("" when the port is unnamed).
    pub port_name: Option<String>,
    pub rev_nat_id: u32,
    /// "None" or "ClientIP".
    pub session_affinity: &'static str,
    /// Set exactly when `session_affinity` is "ClientIP".
    pub affinity_timeout_seconds: Option<u32>,
    /// "Cluster" or "Local".
    pub internal_traffic_policy: &'static str,
    pub external_traffic_policy: &'static str,
    /// How new connections pick a backend: "random", "rr", "wrr", "lc", "wlc" (socket
    /// scope) or "maglev" (external scope).
    pub scheduler: &'static str,
    /// New connections (and unconnected datagrams) sent to a backend since the frontend
    /// was programmed.
    pub new_connections: u64,
    /// In the order of their first slot, which is the order the datapath indexes them
    /// in; a weighted backend holds `weight` slots.
    pub backends: Vec<ListBackend>,
    /// The IPAddressPool a LoadBalancer address was allocated from (by this agent),
    /// when the agent answers; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// With `--l2-announce`, the node that answers ARP/NDP for a load-balancer address
    /// (as the agent sees it); `null` when no live node is eligible; absent when the
    /// address is not announced or the agent does not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announced_by: Option<Option<String>>,
    /// With `--stats`: the counters, as `ipvsadm -Ln --stats` shows them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
    /// With `--rate`: the counters' change per second over `--interval`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
}

/// Counters of a frontend or a backend (`--stats`). Directions as IPVS names them:
/// `in` from the client to the backend, `out` back. Packets and bytes are those of
/// the socket path's TCP connections, added when a connection closes, plus those of
/// the external path's flows (TCP and UDP, open ones included), which their conntrack
/// entries count per packet as long as the map holds them; `null` where the datapath
/// cannot know them (the socket path's UDP entries, or a node with neither the
/// sock_ops program nor a conntrack map), never 0.
#[derive(Serialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// New connections (and unconnected datagrams), as `new_connections`.
    pub connections: u64,
    /// Connections whose packets and bytes are counted and that are over: the socket
    /// path's closed ones, and external flows that are expired or closing (the packets
    /// of open external flows are counted too, but not here).
    pub closed_connections: Option<u64>,
    pub packets_in: Option<u64>,
    pub packets_out: Option<u64>,
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
}

/// [`Stats`] per second between two readings (`--rate`), as `ipvsadm -Ln --rate`:
/// CPS, InPPS, OutPPS, InBPS, OutBPS (bytes per second).
#[derive(Serialize, Debug, Clone, Copy, Default, PartialEq)]
pub struct Rate {
    pub connections_per_second: f64,
    pub packets_in_per_second: Option<f64>,
    pub packets_out_per_second: Option<f64>,
    pub bytes_in_per_second: Option<f64>,
    pub bytes_out_per_second: Option<f64>,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ListBackend {
    pub id: u32,
    /// "" when the backend entry is missing (see `state`).
    pub address: String,
    pub port: u16,
    /// "active", "terminating", "draining" (no new connections; see `weight`), or
    /// "missing" when a slot names a backend id that is not in the backend map (the
    /// datapath then refuses connections that draw that slot).
    pub state: &'static str,
    /// The slots this backend holds: its `svc-lb.io/weights` weight divided by the
    /// weights' gcd (1 without weights, and always 1 under `rr`). 0 for a `draining`
    /// backend (weight 0, or an external frontend's endpoint that still serves but is
    /// no longer ready): it takes no new connection and is listed, after the others,
    /// under the frontends it still has connections through (the maps link a draining
    /// backend to a frontend only by its connections: a live external flow, or a
    /// socket-path TCP connection seen by the sock_ops program); `list`'s text names
    /// the draining backends no frontend shows.
    pub weight: u32,
    /// New connections to this backend. The datapath counts per backend, not per
    /// (frontend, backend): when `shared` is true the count includes the connections of
    /// the other frontends that use the same backend.
    pub new_connections: u64,
    /// Whether other frontends (another port, address or Service) use this backend.
    pub shared: bool,
    /// TCP connections open to this backend now, in ESTABLISHED state (IPVS's
    /// `ActiveConn`): the socket path's count of the backend's address (the sock_ops
    /// program; every frontend that uses the address) plus the external path's
    /// established flows to the backend from the conntrack map. `null` when this node
    /// keeps no socket-path counts (kernel feature `sock_ops_conn`).
    pub active_connections: Option<u64>,
    /// TCP connections open in any other state (IPVS's `InActConn`: SYN_SENT,
    /// FIN_WAIT, CLOSE_WAIT...; external flows not yet established or closing).
    /// `null` as `active_connections`.
    pub inactive_connections: Option<u64>,
    /// With `--stats`: this backend's counters. `connections` is `new_connections`
    /// (over every frontend when `shared`); packets and bytes are this frontend's only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
    /// With `--rate`: the change of `stats` per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
}

impl ListEntry {
    fn service_ref(&self) -> Option<ServiceRef> {
        Some(ServiceRef {
            namespace: self.namespace.as_deref()?.into(),
            name: self.service.as_deref()?.into(),
        })
    }

    fn socket(&self) -> String {
        socket_str(&self.address, self.port)
    }

    fn external(&self) -> bool {
        self.scope == SCOPE_NAMES.1
    }

    /// What happens to a new connection when there is no backend.
    fn no_backends_note(&self) -> &'static str {
        if !self.external() {
            "(no backends: connections are refused)"
        } else if self.datapath_flags.contains(&"drop_empty") {
            "(no local endpoints: packets are dropped)"
        } else {
            "(no backends: rejected with ICMP port unreachable)"
        }
    }
}

/// `scope` values: (socket, external).
const SCOPE_NAMES: (&str, &str) = ("socket", "external");

fn datapath_flags(flags: u16) -> Vec<&'static str> {
    [
        (SVC_FLAG_AFFINITY, "affinity"),
        (SVC_FLAG_SRC_RANGES, "source_ranges"),
        (SVC_FLAG_EXT_LOCAL, "external_local"),
        (SVC_FLAG_DROP_EMPTY, "drop_empty"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

fn socket_str(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// Parses `--service ns/name`.
pub fn parse_service(s: &str) -> Result<ServiceRef> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(ServiceRef {
                namespace: ns.into(),
                name: name.into(),
            })
        }
        _ => bail!("--service takes NAMESPACE/NAME, got {s:?}"),
    }
}

/// The frontends of `view`, in address order, optionally only those of one Service.
pub fn entries(view: &DatapathView, service: Option<&ServiceRef>) -> Vec<ListEntry> {
    let mut out = Vec::with_capacity(view.state.frontends.len());
    let drain = view.draining();
    // Draining backends per frontend, after its slots' backends (weight 0).
    let draining: std::collections::HashMap<u32, Vec<u32>> = view
        .state
        .frontends
        .iter()
        .map(|(fe, cur)| {
            (
                cur.rev_nat_id,
                view.draining_of(cur.rev_nat_id, fe.proto, &drain),
            )
        })
        .collect();
    let mut users: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for cur in view.state.frontends.values() {
        let listed = weighted(&cur.backend_ids)
            .into_iter()
            .map(|(id, _)| id)
            .chain(draining.get(&cur.rev_nat_id).into_iter().flatten().copied());
        for id in listed {
            *users.entry(id).or_default() += 1;
        }
    }
    for (fe, cur) in &view.state.frontends {
        let meta = view.meta.get(&cur.rev_nat_id);
        if let Some(want) = service
            && meta.map(|m| &m.service) != Some(want)
        {
            continue;
        }
        let meta_flags = meta.map_or(0, |m| m.flags);
        let affinity = cur.flags & SVC_FLAG_AFFINITY != 0;
        let external = fe.scope == SCOPE_EXTERNAL;
        out.push(ListEntry {
            address: fe.addr.to_string(),
            port: fe.port,
            protocol: names::proto(fe.proto),
            scope: if external {
                SCOPE_NAMES.1
            } else {
                SCOPE_NAMES.0
            },
            datapath_flags: datapath_flags(cur.flags),
            kind: names::kind(meta.map_or(0, |m| m.kind)),
            namespace: meta.map(|m| m.service.namespace.to_string()),
            service: meta.map(|m| m.service.name.to_string()),
            port_name: meta.map(|m| m.port_name.clone()),
            rev_nat_id: cur.rev_nat_id,
            session_affinity: if affinity { "ClientIP" } else { "None" },
            affinity_timeout_seconds: affinity.then_some(cur.affinity_timeout_s),
            internal_traffic_policy: names::internal_policy(meta_flags),
            // The datapath flag is the truth for an external entry, even before the
            // metadata is written.
            external_traffic_policy: if external && cur.flags & SVC_FLAG_EXT_LOCAL != 0 {
                "Local"
            } else {
                names::external_policy(meta_flags)
            },
            // The external path always uses Maglev, whatever older metadata says.
            scheduler: if external {
                "maglev"
            } else {
                names::scheduler(meta_flags)
            },
            pool: None,
            announced_by: None,
            stats: None,
            rate: None,
            new_connections: view
                .frontend_conns
                .get(&cur.rev_nat_id)
                .copied()
                .unwrap_or(0),
            backends: weighted(&cur.backend_ids)
                .into_iter()
                .chain(
                    draining
                        .get(&cur.rev_nat_id)
                        .into_iter()
                        .flatten()
                        .map(|id| (*id, 0)),
                )
                .map(|(id, weight)| {
                    let id = &id;
                    let new_connections = view.backend_conns.get(id).copied().unwrap_or(0);
                    let shared = users.get(id).copied().unwrap_or(0) > 1;
                    let open = view.open_connections(*id);
                    let active_connections = open.map(|o| o.0);
                    let inactive_connections = open.map(|o| o.1);
                    match view.state.backends.get(id) {
                        Some(b) => ListBackend {
                            id: *id,
                            address: b.addr.addr.to_string(),
                            port: b.addr.port,
                            state: names::backend_state(b.state),
                            weight,
                            new_connections,
                            shared,
                            active_connections,
                            inactive_connections,
                            stats: None,
                            rate: None,
                        },
                        None => ListBackend {
                            id: *id,
                            address: String::new(),
                            port: 0,
                            state: "missing",
                            weight,
                            new_connections,
                            shared,
                            active_connections,
                            inactive_connections,
                            stats: None,
                            rate: None,
                        },
                    }
                })
                .collect(),
        });
    }
    out
}

/// Fills `stats` of every entry and backend from `view` (`list --stats`).
pub fn set_stats(entries: &mut [ListEntry], view: &DatapathView) {
    let per_frontend = view.frontend_traffic();
    let udp_per_frontend = view.udp_frontend_traffic();
    let ext_per_frontend = view.ext_frontend_traffic();
    let has_ct = view.ext_traffic.is_some();
    for e in entries.iter_mut() {
        // The socket path counts its TCP connections (when they close) and its
        // unconnected UDP datagrams (packets in only: the sendmsg hook sees no length
        // and no reply); the external path (tc/XDP, and tc on pod devices) counts every
        // flow in its conntrack entries. A UDP frontend of the socket path shows only
        // its datagrams, whatever tc saw of it.
        let sock = !e.external() && e.protocol == "TCP" && view.traffic.is_some();
        let udp = !e.external() && e.protocol == "UDP" && view.udp_traffic.is_some();
        let ext = has_ct && (e.external() || sock);
        let rev_nat_id = e.rev_nat_id;
        if udp {
            let fe = udp_per_frontend
                .get(&rev_nat_id)
                .copied()
                .unwrap_or_default();
            e.stats = Some(datagram_stats(e.new_connections, &fe));
            for b in e.backends.iter_mut() {
                let t = view.udp_pair_traffic(rev_nat_id, b.id);
                b.stats = Some(match t {
                    Some(t) => datagram_stats(b.new_connections, &t),
                    None => stats(b.new_connections, None),
                });
            }
            continue;
        }
        let fe = sum(
            sock.then(|| per_frontend.get(&rev_nat_id).copied().unwrap_or_default()),
            ext.then(|| {
                ext_per_frontend
                    .get(&rev_nat_id)
                    .copied()
                    .unwrap_or_default()
            }),
        );
        e.stats = Some(stats(e.new_connections, fe));
        for b in e.backends.iter_mut() {
            let t = sum(
                if sock {
                    view.pair_traffic(rev_nat_id, b.id)
                } else {
                    None
                },
                if ext {
                    view.ext_pair_traffic(rev_nat_id, b.id)
                } else {
                    None
                },
            );
            b.stats = Some(stats(b.new_connections, t));
        }
    }
}

/// The socket path's UDP counts: the datagrams sent (`packets_in`); nothing else is
/// measured (no close, no length, no reply), so the rest is unknown, not 0.
fn datagram_stats(connections: u64, t: &svc_lb_common::TrafficCount) -> Stats {
    Stats {
        packets_in: Some(t.packets_in),
        ..stats(connections, None)
    }
}

/// Both counts added; `None` when neither path counts.
fn sum(
    a: Option<svc_lb_common::TrafficCount>,
    b: Option<svc_lb_common::TrafficCount>,
) -> Option<svc_lb_common::TrafficCount> {
    match (a, b) {
        (None, None) => None,
        (a, b) => {
            let mut t = a.unwrap_or_default();
            t.add(&b.unwrap_or_default());
            Some(t)
        }
    }
}

fn stats(connections: u64, t: Option<svc_lb_common::TrafficCount>) -> Stats {
    Stats {
        connections,
        closed_connections: t.map(|t| t.closed),
        packets_in: t.map(|t| t.packets_in),
        packets_out: t.map(|t| t.packets_out),
        bytes_in: t.map(|t| t.bytes_in),
        bytes_out: t.map(|t| t.bytes_out),
    }
}

/// Fills `rate` of the entries of `after` (with `stats` set) from the change since
/// `before` (the same listing `secs` seconds earlier). An entry or backend that was not
/// there before, or a counter that went down (its entry was deleted and created
/// again), counts from 0.
pub fn set_rate(after: &mut [ListEntry], before: &[ListEntry], secs: f64) {
    let same = |a: &ListEntry, b: &ListEntry| {
        a.rev_nat_id == b.rev_nat_id
            && a.address == b.address
            && a.port == b.port
            && a.protocol == b.protocol
            && a.scope == b.scope
    };
    for e in after.iter_mut() {
        let old = before.iter().find(|b| same(e, b));
        e.rate = e
            .stats
            .map(|now| rate(&now, old.and_then(|o| o.stats).as_ref(), secs));
        for b in e.backends.iter_mut() {
            let was = old
                .and_then(|o| o.backends.iter().find(|x| x.id == b.id))
                .and_then(|x| x.stats);
            b.rate = b.stats.map(|now| rate(&now, was.as_ref(), secs));
        }
    }
}

fn rate(now: &Stats, before: Option<&Stats>, secs: f64) -> Rate {
    let per_s = |n: u64, b: Option<u64>| {
        // A counter below its earlier value was reset: count from 0.
        let d = match b {
            Some(b) if b <= n => n - b,
            _ => n,
        };
        d as f64 / secs
    };
    let opt =
        |n: Option<u64>, f: fn(&Stats) -> Option<u64>| n.map(|n| per_s(n, before.and_then(f)));
    Rate {
        connections_per_second: per_s(now.connections, before.map(|b| b.connections)),
        packets_in_per_second: opt(now.packets_in, |s| s.packets_in),
        packets_out_per_second: opt(now.packets_out, |s| s.packets_out),
        bytes_in_per_second: opt(now.bytes_in, |s| s.bytes_in),
        bytes_out_per_second: opt(now.bytes_out, |s| s.bytes_out),
    }
}

/// What `render_counters` shows: `ipvsadm -Ln --stats` or `--rate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counters {
    Stats,
    Rate,
}

/// `ipvsadm -Ln --stats`/`--rate`-style text of entries with `stats` (and `rate`)
/// set: the frontend line, then one `->` line per backend, five numbers each.
pub fn render_counters(entries: &[ListEntry], what: Counters) -> String {
    let heads: [&str; 5] = match what {
        Counters::Stats => ["Conns", "InPkts", "OutPkts", "InBytes", "OutBytes"],
        Counters::Rate => ["CPS", "InPPS", "OutPPS", "InBPS", "OutBPS"],
    };
    let mut rows: Vec<Vec<String>> = vec![
        ["Prot", "LocalAddress:Port", "Scope", "Service"]
            .into_iter()
            .map(str::to_owned)
            .chain(std::iter::once(format!("{} ", heads[0])))
            .chain(heads[1..].iter().map(|h| (*h).to_owned()))
            .collect(),
        vec![
            "  ->".into(),
            "RemoteAddress:Port".into(),
            "State".into(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ],
    ];
    let (mut unknown, mut no_counts, mut datagrams, mut any_shared) = (false, false, false, false);
    let cells = |st: Option<Stats>, rt: Option<Rate>, shared: bool| -> [String; 5] {
        let n = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        let r = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
        let mark = if shared { "*" } else { " " };
        match (what, st, rt) {
            (Counters::Stats, Some(s), _) => [
                format!("{}{mark}", s.connections),
                n(s.packets_in),
                n(s.packets_out),
                n(s.bytes_in),
                n(s.bytes_out),
            ],
            (Counters::Rate, _, Some(x)) => [
                format!("{:.0}{mark}", x.connections_per_second),
                r(x.packets_in_per_second),
                r(x.packets_out_per_second),
                r(x.bytes_in_per_second),
                r(x.bytes_out_per_second),
            ],
            _ => Default::default(),
        }
    };
    for e in entries {
        let service = match e.service_ref() {
            Some(s) => match e.port_name.as_deref() {
                Some(p) if !p.is_empty() => format!("{s}:{p}"),
                _ => s.to_string(),
            },
            None => "?".to_owned(),
        };
        if e.stats.is_some_and(|s| s.bytes_in.is_none()) {
            if !e.external()
                && e.protocol == "UDP"
                && e.stats.is_some_and(|s| s.packets_in.is_some())
            {
                datagrams = true;
            } else if e.external() || e.protocol != "TCP" {
                unknown = true;
            } else {
                no_counts = true;
            }
        }
        let mut row = vec![
            e.protocol.to_owned(),
            e.socket(),
            e.scope.to_owned(),
            service,
        ];
        row.extend(cells(e.stats, e.rate, false));
        rows.push(row);
        for b in &e.backends {
            any_shared |= b.shared;
            let addr = if b.state == "missing" {
                format!("(backend id {} missing)", b.id)
            } else {
                socket_str(&b.address, b.port)
            };
            let mut row = vec!["  ->".to_owned(), addr, b.state.to_owned(), String::new()];
            row.extend(cells(b.stats, b.rate, b.shared));
            rows.push(row);
        }
    }
    let mut width = [0usize; 9];
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(width).enumerate() {
            match i {
                0 => line.push_str(&format!("{c:<4} ")),
                1..=3 => line.push_str(&format!("{c:<w$}  ")),
                // Numbers right-aligned; Conns/CPS end in the `*` mark or a space.
                _ => line.push_str(&format!("{c:>w$} ")),
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(match what {
        Counters::Stats => "Pkts/Bytes: TCP connections of the socket path, added when they close (payload bytes; packets are TCP segments); external flows per packet from conntrack (IP bytes)\n",
        Counters::Rate => "per second over the interval; Pkts/Bytes: TCP connections of the socket path, added when they close; external flows per packet\n",
    });
    if datagrams {
        out.push_str(
            "- on UDP socket entries: InPkts are the unconnected datagrams sent (the sendmsg hook counts them; it sees no length, and connected sockets' datagrams and replies are not counted)\n",
        );
    }
    if unknown {
        out.push_str(
            "- on UDP socket entries (and external ones without a conntrack map): the datapath does not count their packets and bytes\n",
        );
    }
    if no_counts {
        out.push_str(
            "- on TCP socket entries: this node keeps no traffic counts (kernel feature sock_ops_conn, see `svc-lb status`)\n",
        );
    }
    if any_shared {
        out.push_str(
            "* backend shared with other frontends: its Conns include their connections (its packets and bytes do not)\n",
        );
    }
    out
}

/// The distinct backend ids of a slot list, in the order of their first slot, with how
/// many slots each holds (its weight in the layout).
fn weighted(slots: &[u32]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut at: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for id in slots {
        match at.get(id) {
            Some(&i) => out[i].1 += 1,
            None => {
                at.insert(*id, out.len());
                out.push((*id, 1));
            }
        }
    }
    out
}

/// The flags column: only what differs from the Kubernetes defaults, so that an
/// ordinary Service shows "-" and anything unusual stands out.
fn flags(e: &ListEntry) -> String {
    let mut f = Vec::new();
    if let Some(t) = e.affinity_timeout_seconds {
        f.push(format!("affinity=ClientIP/{t}s"));
    }
    // A traffic policy only applies to the addresses it governs: the internal one to
    // cluster IPs, the external one to node ports, load balancers and external IPs.
    let cluster_ip = e.kind == names::kind(KIND_CLUSTER_IP);
    if e.internal_traffic_policy == "Local" && cluster_ip {
        f.push("internalTrafficPolicy=Local".to_owned());
    }
    if e.external_traffic_policy == "Local" && !cluster_ip {
        f.push("externalTrafficPolicy=Local".to_owned());
    }
    if e.datapath_flags.contains(&"source_ranges") {
        f.push("loadBalancerSourceRanges".to_owned());
    }
    if e.datapath_flags.contains(&"drop_empty") {
        f.push("dropNoLocalEndpoint".to_owned());
    }
    if let Some(pool) = &e.pool {
        f.push(format!("pool={pool}"));
    }
    if let Some(node) = &e.announced_by {
        f.push(format!("l2={}", node.as_deref().unwrap_or("none")));
    }
    if f.is_empty() {
        "-".to_owned()
    } else {
        f.join(",")
    }
}

/// Names the pool of each LoadBalancer entry whose address the agent allocated.
pub fn set_pools(entries: &mut [ListEntry], lb: &crate::status::LbStatus) {
    for e in entries.iter_mut() {
        let Some(svc) = e.service_ref().map(|s| s.to_string()) else {
            continue;
        };
        e.pool = lb
            .addresses
            .iter()
            .find(|a| a.service == svc && a.ip == e.address)
            .map(|a| a.pool.clone());
    }
}

/// Names the node that announces each load-balancer address (`--l2-announce`). One
/// node answers for an address whichever Service it serves: Services sharing it
/// (allow-shared-ip) are listed under the first one, and every one gets the node.
pub fn set_announcers(entries: &mut [ListEntry], announcers: &[crate::status::L2Announcer]) {
    for e in entries.iter_mut() {
        if e.service_ref().is_none() {
            continue;
        }
        e.announced_by = announcers
            .iter()
            .find(|a| a.ip == e.address)
            .map(|a| a.node.clone());
    }
}

/// Columns of the text layout; the last (new connections) is right-aligned.
const COLS: usize = 10;
const LAST: usize = COLS - 1;

/// `ipvsadm -Ln`-style text. Column widths follow the content, so the output is the
/// same for the same maps (the golden tests rely on it).
pub fn render_text(entries: &[ListEntry]) -> String {
    // Rows: [prot/arrow, address, scope, kind/state, scheduler/weight, active, inactive,
    // service, flags, new conns].
    let mut rows: Vec<[String; COLS]> = vec![
        [
            "Prot".into(),
            "LocalAddress:Port".into(),
            "Scope".into(),
            "Kind".into(),
            "Sched".into(),
            String::new(),
            String::new(),
            "Service".into(),
            "Flags".into(),
            "NewConns ".into(),
        ],
        [
            "  ->".into(),
            "RemoteAddress:Port".into(),
            String::new(),
            "State".into(),
            "Weight".into(),
            "ActiveConn".into(),
            "InActConn".into(),
            String::new(),
            String::new(),
            "NewConns ".into(),
        ],
    ];
    let mut no_counts = false;
    let mut backends = 0usize;
    let mut any_shared = false;
    let mut services = std::collections::BTreeSet::new();
    for e in entries {
        let service = match e.service_ref() {
            Some(s) => {
                services.insert(s.clone());
                match e.port_name.as_deref() {
                    Some(p) if !p.is_empty() => format!("{s}:{p}"),
                    _ => s.to_string(),
                }
            }
            None => "?".to_owned(),
        };
        rows.push([
            e.protocol.into(),
            e.socket(),
            e.scope.into(),
            e.kind.into(),
            e.scheduler.into(),
            String::new(),
            String::new(),
            service,
            flags(e),
            format!("{} ", e.new_connections),
        ]);
        // Draining backends (weight 0) take no new connection: a frontend with only
        // those is one without backends for new connections.
        if e.backends.iter().all(|b| b.weight == 0) {
            let mut row: [String; COLS] = Default::default();
            row[0] = "  ->".into();
            row[1] = e.no_backends_note().into();
            rows.push(row);
        }
        for b in &e.backends {
            backends += b.weight as usize;
            let addr = if b.state == "missing" {
                format!("(backend id {} missing)", b.id)
            } else {
                socket_str(&b.address, b.port)
            };
            let count = |c: Option<u64>| match c {
                Some(n) => n.to_string(),
                None => "-".to_owned(),
            };
            no_counts |= b.active_connections.is_none();
            rows.push([
                "  ->".into(),
                addr,
                String::new(),
                b.state.into(),
                b.weight.to_string(),
                count(b.active_connections),
                count(b.inactive_connections),
                String::new(),
                String::new(),
                if b.shared {
                    any_shared = true;
                    format!("{}*", b.new_connections)
                } else {
                    format!("{} ", b.new_connections)
                },
            ]);
        }
    }
    let mut width = [0usize; COLS];
    // Notes (no backends) start with "(" and may overflow their column.
    for r in rows
        .iter()
        .filter(|r| !(r[0] == "  ->" && r[1].starts_with("(no ")))
    {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    // A no-backends note may be wider than every address: let it overflow rather than
    // widen the whole column.
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(width).enumerate() {
            match i {
                0 => line.push_str(&format!("{c:<4} ")),
                LAST => line.push_str(&format!("{c:>w$}")),
                _ => line.push_str(&format!("{c:<w$}  ")),
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if entries
        .iter()
        .any(|e| e.external() && (e.address == "0.0.0.0" || e.address == "::"))
    {
        out.push_str(
            "0.0.0.0/[::] external NodePort frontends: every node address that serves NodePorts\n",
        );
    }
    if no_counts {
        out.push_str(
            "ActiveConn/InActConn -: this node keeps no connection counts (kernel feature sock_ops_conn, see `svc-lb status`)\n",
        );
    }
    if any_shared {
        out.push_str(
            "* backend shared with other frontends: the count includes their connections\n",
        );
    }
    out.push_str(&format!(
        "{} frontends of {} Services, {} backend slots\n",
        entries.len(),
        services.len(),
        backends
    ));
    out
}

pub fn render_json(entries: &[ListEntry]) -> Result<String> {
    Ok(serde_json::to_string_pretty(entries)? + "\n")
}

pub fn render_yaml(entries: &[ListEntry]) -> Result<String> {
    Ok(serde_yaml::to_string(entries)?)
}

/// A text line naming the draining backends that no frontend lists (no connection
/// links them to one: see [`ListBackend::weight`]); empty when there are none.
pub fn unlisted_draining(view: &DatapathView, entries: &[ListEntry]) -> String {
    let listed: std::collections::HashSet<u32> = entries
        .iter()
        .flat_map(|e| e.backends.iter().map(|b| b.id))
        .collect();
    let rest: Vec<String> = view
        .draining()
        .into_iter()
        .filter(|(id, _)| !listed.contains(id))
        .map(|(_, b)| {
            format!(
                "{}/{}",
                socket_str(&b.addr.addr.to_string(), b.addr.port),
                names::proto(b.addr.proto)
            )
        })
        .collect();
    if rest.is_empty() {
        return String::new();
    }
    format!(
        "draining, without connections through any frontend listed: {}\n",
        rest.join(", ")
    )
}

/// The text output's last line: which programs serve the `socket` and `external`
/// entries on this node, from the pinned links under `bpffs`.
pub fn paths_footer(bpffs: &std::path::Path) -> String {
    use crate::datapath::poddev::devices_with;
    let join = |s: std::collections::BTreeSet<String>| s.into_iter().collect::<Vec<_>>().join(",");
    let pods = join(devices_with(
        bpffs,
        &[
            svc_lb_common::PROG_POD_INGRESS,
            svc_lb_common::PROG_POD_EGRESS,
        ],
    ));
    let ext = join(devices_with(bpffs, &[svc_lb_common::PROG_TC_INGRESS]));
    format!(
        "\npaths: socket entries: socket programs{}; external entries: {}\n",
        if pods.is_empty() {
            String::new()
        } else {
            format!(", and per packet (tc) for pods on {pods}")
        },
        if ext.is_empty() {
            "no device (external path off)".to_owned()
        } else {
            format!("tc/XDP on {ext}")
        }
    )
}
