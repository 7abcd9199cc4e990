//! `svc-lb trace --external`: what the external path (tc ingress, and XDP with `--xdp`)
//! does with a packet that arrives on a device from CLIENT:PORT for ADDR:PORT.
//!
//! The order of the steps is the order of `svc-lb-ebpf/src/ext.rs` (`reply` at tc
//! ingress, then `forward`: `established`, `frontend`, `decide`, `establish`), and the
//! choice itself is [`svc_lb_common::choose_external`], the function the programs call,
//! fed with lookups into the same pinned maps. The flow hash is
//! [`svc_lb_common::maglev::flow_hash`] over the same tuple, so the Maglev index is the
//! one the kernel computes for the packet. Only the SNAT source port can differ: the
//! datapath seeds its pseudo-random ports with a random number.
use std::{
    cell::RefCell,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{Result, bail};
use ipnet::IpNet;
use serde::Serialize;
use svc_lb_common::{
    AffinityExtKey, AffinityKey, AffinityValue, BACKEND_FLAG_LOCAL, Backend, CT_DIR_FORWARD,
    CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_SEEN_REPLY, CT_FLAG_SNAT, CTR_EXT_BACKEND_MISSING,
    CTR_EXT_DROP_NO_LOCAL, CTR_EXT_DROP_SRC_RANGE, CTR_EXT_MAGLEV_MISSING, CTR_EXT_NO_SNAT_ADDR,
    ConnKey, CtKey, CtValue, ExtChoice, ExtConfig, ExtVia, FAMILY_V4, FAMILY_V6, MAGLEV_TABLE_MAX,
    MAP_CONFIG, MAP_CT, MAP_NODE_ADDR, PROTO_TCP, PROTO_UDP, SCOPE_ALL, SCOPE_EXTERNAL,
    SNAT_PORT_MAX, SNAT_PORT_MIN, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY, SVC_FLAG_EXT_LOCAL,
    SVC_FLAG_SRC_RANGES, Stickiness, SvcValue, choose_external, maglev::flow_hash,
};

use super::{
    names,
    trace::{
        AffinityWords, MAX_LISTED, TraceAffinityEntry, TraceCandidate, TraceMaps, TraceStep,
        affinity_entry, affinity_text, candidate, counter_name,
    },
};
use crate::{
    datapath::{
        codec::{self, FrontendMeta, SvcKey, addr_words, port_be, port_from_be},
        pinned::PinnedMaps,
    },
    model::FrontendKey,
};

/// The map reads of the external path, on top of the socket path's [`TraceMaps`]. The
/// pinned maps and test fakes both provide them.
pub trait ExtTraceMaps: TraceMaps {
    /// Whether `LB_NODEADDR_V1` holds `addr` (a node address that serves NodePorts).
    fn is_node_addr(&self, addr: IpAddr) -> Result<bool>;
    /// Every address of `LB_NODEADDR_V1`, for the "not a node address" hint.
    fn node_addrs(&self) -> Result<Vec<IpAddr>>;
    /// The source-range LPM lookup the programs make for `rev_nat_id` and `src`.
    fn src_allowed(&self, rev_nat_id: u32, src: IpAddr) -> Result<bool>;
    /// The source ranges of `rev_nat_id`, for display.
    fn src_ranges(&self, rev_nat_id: u32) -> Result<Vec<IpNet>>;
    fn ct(&self, key: &CtKey) -> Result<Option<CtValue>>;
    fn affinity_ext(&self, key: &AffinityExtKey) -> Result<Option<AffinityValue>>;
    /// The frontend's Maglev table (as many entries as the map value holds).
    fn maglev_table(&self, rev_nat_id: u32) -> Result<Option<Vec<u32>>>;
    /// `LB_CONFIG_V1[0]`.
    fn ext_config(&self) -> Result<Option<ExtConfig>>;
}

/// The pinned maps of both paths, for `svc-lb trace --external`.
pub struct PinnedExtMaps {
    maps: PinnedMaps,
}

impl PinnedExtMaps {
    pub fn open(bpffs: &Path) -> Result<Self> {
        let maps = PinnedMaps::open(bpffs)?;
        // Fail early, with the reason, when the pins have no external path.
        maps.require_external()?;
        Ok(Self { maps })
    }
}

impl TraceMaps for PinnedExtMaps {
    fn svc(&self, key: &SvcKey) -> Result<Option<SvcValue>> {
        TraceMaps::svc(&self.maps, key)
    }
    fn backend(&self, id: u32) -> Result<Option<Backend>> {
        TraceMaps::backend(&self.maps, id)
    }
    fn meta(&self, rev_nat_id: u32) -> Result<Option<FrontendMeta>> {
        TraceMaps::meta(&self.maps, rev_nat_id)
    }
    fn frontends_at(&self, addr: IpAddr) -> Result<Vec<FrontendKey>> {
        TraceMaps::frontends_at(&self.maps, addr)
    }
    fn affinity(&self, key: &AffinityKey) -> Result<Option<AffinityValue>> {
        TraceMaps::affinity(&self.maps, key)
    }
    fn affinity_member(&self, backend_id: u32, rev_nat_id: u32) -> Result<bool> {
        TraceMaps::affinity_member(&self.maps, backend_id, rev_nat_id)
    }
    fn src_range_allowed(&self, rev_nat_id: u32, src: IpAddr) -> Result<Option<bool>> {
        ExtTraceMaps::src_allowed(self, rev_nat_id, src).map(Some)
    }
    // lc/wlc: the same counts and lc programs as the socket path's maps (without these
    // two, a node with the external path traced every lc choice at load 0 and as if
    // the bounded lc programs were loaded).
    fn open_conns(&self, key: &ConnKey) -> Result<Option<(u64, u64)>> {
        TraceMaps::open_conns(&self.maps, key)
    }
    fn lc_exact_max(&self) -> u32 {
        TraceMaps::lc_exact_max(&self.maps)
    }
}

impl ExtTraceMaps for PinnedExtMaps {
    fn is_node_addr(&self, addr: IpAddr) -> Result<bool> {
        self.maps.is_node_addr(addr)
    }
    fn node_addrs(&self) -> Result<Vec<IpAddr>> {
        self.maps.node_addrs()
    }
    fn src_allowed(&self, rev_nat_id: u32, src: IpAddr) -> Result<bool> {
        self.maps.src_allowed(rev_nat_id, src)
    }
    fn src_ranges(&self, rev_nat_id: u32) -> Result<Vec<IpNet>> {
        self.maps.src_ranges(rev_nat_id)
    }
    fn ct(&self, key: &CtKey) -> Result<Option<CtValue>> {
        self.maps.ct(key)
    }
    fn affinity_ext(&self, key: &AffinityExtKey) -> Result<Option<AffinityValue>> {
        self.maps.affinity_ext(key)
    }
    fn maglev_table(&self, rev_nat_id: u32) -> Result<Option<Vec<u32>>> {
        self.maps.maglev_table(rev_nat_id)
    }
    fn ext_config(&self) -> Result<Option<ExtConfig>> {
        self.maps.ext_config()
    }
}

/// What to trace: one packet from a client outside the node.
#[derive(Clone, Debug)]
pub struct ExtTraceRequest {
    /// The client's address and source port, as the packet carries them.
    pub from: SocketAddr,
    /// The destination: a node address and NodePort, a LoadBalancer IP or an external IP.
    pub to: SocketAddr,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `CLOCK_MONOTONIC` now (the clock of `bpf_ktime_get_ns()`).
    pub now_ns: u64,
    /// The per-packet path for pods (`trace --pod`, `svclb_pod_in` on `--pod-devices`):
    /// the frontends the socket programs serve (`SCOPE_ALL`), DNAT only (source
    /// rewritten to the Service address for hairpin), TCP rejects answered with a RST.
    pub pod: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ExtTrace {
    pub client: String,
    pub destination: String,
    pub protocol: &'static str,
    /// The programs that make this decision.
    pub programs: &'static str,
    /// The flow hash Maglev indexes with (source address and port, destination port,
    /// protocol).
    pub flow_hash: u32,
    /// The flow's forward conntrack entry; `null` when there is none.
    pub conntrack: Option<ExtTraceConntrack>,
    /// The external frontend that matched; `null` when none did.
    pub frontend: Option<ExtTraceFrontend>,
    /// `loadBalancerSourceRanges`; `null` when the frontend has none.
    pub source_ranges: Option<ExtTraceSourceRanges>,
    /// Session affinity (ClientIP); `null` when the Service has none or it was not
    /// reached.
    pub affinity: Option<ExtTraceAffinity>,
    /// The Maglev lookup; `null` when it was not reached.
    pub maglev: Option<ExtTraceMaglev>,
    /// Slots `1..=count` of the frontend (at most 64 listed).
    pub candidates: Vec<ExtTraceCandidate>,
    pub verdict: ExtTraceVerdict,
    /// The same facts as prose, one entry per step, in the datapath's order.
    pub steps: Vec<TraceStep>,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ExtTraceConntrack {
    pub backend_id: u32,
    pub backend: String,
    pub rev_nat_id: u32,
    /// The source the flow's packets are rewritten to; `null` without SNAT.
    pub snat: Option<String>,
    pub flags: Vec<&'static str>,
    /// Negative: expired (ignored, a new flow).
    pub expires_in_seconds: f64,
    /// Whether the entry decides this packet ("established"); otherwise why not:
    /// "expired" or "backend_gone".
    pub state: &'static str,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ExtTraceFrontend {
    /// The address of the entry: the destination, or the unspecified address of a
    /// NodePort entry.
    pub address: String,
    pub port: u16,
    /// For a NodePort entry: the node address (`LB_NODEADDR_V1`) the packet was sent to.
    pub node_address: Option<String>,
    pub rev_nat_id: u32,
    pub namespace: Option<String>,
    pub service: Option<String>,
    pub port_name: Option<String>,
    pub kind: &'static str,
    pub backend_count: u32,
    pub session_affinity: &'static str,
    pub affinity_timeout_seconds: Option<u32>,
    pub external_traffic_policy: &'static str,
    /// `SVC_FLAG_DROP_EMPTY`: no local endpoint while other nodes have some.
    pub drop_when_empty: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ExtTraceSourceRanges {
    pub ranges: Vec<String>,
    pub allowed: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ExtTraceAffinity {
    /// The client's entry (keyed by its source address and the frontend), if any.
    pub entry: Option<TraceAffinityEntry>,
    pub used: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ExtTraceMaglev {
    /// `LB_CONFIG_V1` `maglev_size` (0: no usable size).
    pub table_size: u32,
    /// `flow_hash % table_size`, when the table was used.
    pub index: Option<u32>,
    /// The backend id at that index.
    pub backend_id: Option<u32>,
    /// Without a usable table the flow hash picks a slot instead (`flow_hash % count + 1`).
    pub fallback_slot: Option<u16>,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ExtTraceCandidate {
    #[serde(flatten)]
    pub slot: TraceCandidate,
    /// On this node (`BACKEND_FLAG_LOCAL`).
    pub local: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ExtTraceVerdict {
    /// "pass" (not for an external frontend: untouched), "drop", "reject" (ICMP port
    /// unreachable), "forward" (translated to a backend) or "reply" (the packet is a
    /// backend's reply of an SNATed flow: reverse NAT).
    pub action: &'static str,
    /// For "drop" and "reject": the datapath counter that counts it.
    pub reason: Option<&'static str>,
    /// For "forward": the backend.
    pub backend: Option<ExtTraceChosen>,
    /// For "forward": the source rewrite.
    pub nat: Option<ExtTraceNat>,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ExtTraceChosen {
    pub id: u32,
    pub address: String,
    pub port: u16,
    pub state: &'static str,
    pub local: bool,
    /// "conntrack" (the established flow's backend), "affinity", "maglev" or "slot"
    /// (hashed slot, no Maglev table).
    pub via: &'static str,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ExtTraceNat {
    /// Whether the source is rewritten to the node (the backend sees the node's address).
    pub snat: bool,
    /// The SNAT address; `null` without SNAT.
    pub source_address: Option<String>,
    /// The SNAT source port when it is known: the established flow's, or the client's
    /// own when the datapath keeps it; `null` when a pseudo-random port of
    /// 61000-65535 is drawn.
    pub source_port: Option<u16>,
    /// Why: "externalTrafficPolicy Local", "backend on this node", "backend on another
    /// node".
    pub why: &'static str,
}

const SEC: u64 = 1_000_000_000;

fn family(a: &IpAddr) -> u8 {
    if a.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }
}

fn ip_of(family: u8, w: [u32; 4]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(codec::v4_from_word(w[0]))
    } else {
        IpAddr::V6(codec::v6_from_words(w))
    }
}

fn ct_flags(flags: u8) -> Vec<&'static str> {
    [
        (CT_FLAG_SNAT, "snat"),
        (CT_FLAG_CLOSING, "closing"),
        (CT_FLAG_SEEN_REPLY, "seen-reply"),
        (svc_lb_common::CT_FLAG_ESTABLISHED, "established"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, n)| *n)
    .collect()
}

fn secs_left(expires_ns: u64, now_ns: u64) -> f64 {
    (expires_ns as i128 - now_ns as i128) as f64 / SEC as f64
}

/// Keeps the first map error of the closures handed to the shared decision (its
/// lookups are infallible, as they are in the kernel).
struct Errors(RefCell<Option<anyhow::Error>>);

impl Errors {
    fn keep<T>(&self, r: Result<T>, fallback: T) -> T {
        r.unwrap_or_else(|e| {
            self.0.borrow_mut().get_or_insert(e);
            fallback
        })
    }
}

/// Runs the external path's decision for `req` against `maps`.
pub fn trace(maps: &dyn ExtTraceMaps, req: &ExtTraceRequest) -> Result<ExtTrace> {
    if req.proto != PROTO_TCP && req.proto != PROTO_UDP {
        bail!("the external path translates TCP and UDP only");
    }
    if req.from.is_ipv4() != req.to.is_ipv4() {
        bail!(
            "--from {} and --to {} are of different address families",
            req.from,
            req.to
        );
    }
    let fam = family(&req.to.ip());
    let saddr = addr_words(req.from.ip());
    let daddr = addr_words(req.to.ip());
    let (sport, dport) = (port_be(req.from.port()), port_be(req.to.port()));
    let hash = flow_hash(&saddr, sport, dport, req.proto);
    let key = |dir| CtKey {
        saddr_be: saddr,
        daddr_be: daddr,
        sport_be: sport,
        dport_be: dport,
        proto: req.proto,
        family: fam,
        dir,
        _pad: 0,
    };
    let fe_text = |addr: IpAddr| {
        format!(
            "{}/{}",
            names::socket(&addr, req.to.port()),
            names::proto(req.proto)
        )
    };
    let mut out = ExtTrace {
        client: names::socket(&req.from.ip(), req.from.port()),
        destination: names::socket(&req.to.ip(), req.to.port()),
        protocol: names::proto(req.proto),
        programs: if req.pod {
            "svclb_pod_in at tc ingress of the pod devices (--pod-devices)"
        } else {
            "svclb_tc_in at tc ingress of the node's devices; svclb_xdp first with --xdp"
        },
        flow_hash: hash,
        conntrack: None,
        frontend: None,
        source_ranges: None,
        affinity: None,
        maglev: None,
        candidates: Vec::new(),
        verdict: ExtTraceVerdict {
            action: "pass",
            reason: None,
            backend: None,
            nat: None,
        },
        steps: Vec::new(),
    };
    let mut steps = Vec::new();

    // ---- tc ingress: `reply(.., snat = true)` comes first ----
    if let Some(r) = maps.ct(&key(CT_DIR_REPLY))?
        && r.expires_ns > req.now_ns
        && r.flags & CT_FLAG_SNAT != 0
    {
        let frontend = SocketAddr::new(ip_of(fam, r.nat_addr_be), port_from_be(r.nat_port_be));
        let client = SocketAddr::new(ip_of(fam, r.snat_addr_be), port_from_be(r.snat_port_be));
        steps.push(TraceStep {
            step: "reply",
            result: format!(
                "a reply of an SNATed flow: reverse NAT to {} → {}",
                names::socket(&frontend.ip(), frontend.port()),
                names::socket(&client.ip(), client.port())
            ),
            details: vec![
                "tc ingress translates backend replies of SNATed flows before anything else (XDP does not look at replies)".to_owned(),
            ],
        });
        steps.push(TraceStep {
            step: "verdict",
            result: "REPLY: reverse-translated and passed to the stack".to_owned(),
            details: Vec::new(),
        });
        out.verdict.action = "reply";
        out.steps = steps;
        return Ok(out);
    }

    // ---- `established`: a live forward entry whose backend is unchanged ----
    let mut ct_note = None;
    if let Some(e) = maps.ct(&key(CT_DIR_FORWARD))? {
        let backend = SocketAddr::new(ip_of(fam, e.nat_addr_be), port_from_be(e.nat_port_be));
        let snat = (e.flags & CT_FLAG_SNAT != 0)
            .then(|| SocketAddr::new(ip_of(fam, e.snat_addr_be), port_from_be(e.snat_port_be)));
        let left = secs_left(e.expires_ns, req.now_ns);
        let be_now = maps.backend(e.backend_id)?;
        let same = be_now
            .as_ref()
            .is_some_and(|b| b.addr_be == e.nat_addr_be && b.port_be == e.nat_port_be);
        let state = if e.expires_ns <= req.now_ns {
            "expired"
        } else if same {
            "established"
        } else {
            "backend_gone"
        };
        let ct = ExtTraceConntrack {
            backend_id: e.backend_id,
            backend: names::socket(&backend.ip(), backend.port()),
            rev_nat_id: e.rev_nat_id,
            snat: snat.map(|s| names::socket(&s.ip(), s.port())),
            flags: ct_flags(e.flags),
            expires_in_seconds: left,
            state,
        };
        let summary = format!(
            "backend {} ({}){}; flags {}",
            e.backend_id,
            ct.backend,
            ct.snat
                .as_ref()
                .map(|s| format!(", SNAT to {s}"))
                .unwrap_or_default(),
            if ct.flags.is_empty() {
                "-".to_owned()
            } else {
                ct.flags.join(",")
            }
        );
        if state == "established" {
            let b = be_now.as_ref().map(|b| candidate(0, e.backend_id, Some(b)));
            steps.push(TraceStep {
                step: "conntrack",
                result: format!("established flow: {summary}"),
                details: vec![
                    format!(
                        "entry expires in {left:.0}s (every packet refreshes it); the flow keeps its backend whatever the Service's backends do now"
                    ),
                ],
            });
            let local = be_now.is_some_and(|b| b.flags & BACKEND_FLAG_LOCAL != 0);
            steps.push(TraceStep {
                step: "verdict",
                result: format!(
                    "FORWARD to {} (backend {}){}",
                    ct.backend,
                    e.backend_id,
                    ct.snat
                        .as_ref()
                        .map(|s| format!(", source rewritten to {s}"))
                        .unwrap_or_else(|| ", client address preserved".to_owned())
                ),
                details: vec!["the flow's recorded translation (no new choice)".to_owned()],
            });
            out.verdict = ExtTraceVerdict {
                action: "forward",
                reason: None,
                backend: Some(ExtTraceChosen {
                    id: e.backend_id,
                    address: backend.ip().to_string(),
                    port: backend.port(),
                    state: b.map_or("missing", |c| c.state),
                    local,
                    via: "conntrack",
                }),
                nat: Some(ExtTraceNat {
                    snat: snat.is_some(),
                    source_address: snat.map(|s| s.ip().to_string()),
                    source_port: snat.map(|s| s.port()),
                    why: if snat.is_some() {
                        "backend on another node"
                    } else {
                        "recorded without SNAT (externalTrafficPolicy Local or a backend on this node)"
                    },
                }),
            };
            out.conntrack = Some(ct);
            out.steps = steps;
            return Ok(out);
        }
        ct_note = Some(TraceStep {
            step: "conntrack",
            result: if state == "expired" {
                format!("expired entry ({:.0}s ago): a new flow", -left)
            } else {
                format!(
                    "its backend {} left the Service (or the id names another address now): chosen anew",
                    e.backend_id
                )
            },
            details: vec![
                format!("old entry: {summary}"),
                if state == "expired" {
                    "the datapath ignores expired entries (the LRU evicts them later)".to_owned()
                } else {
                    "counted as ext_conntrack_backend_gone; a TCP flow is then reset by its new backend".to_owned()
                },
            ],
        });
        out.conntrack = Some(ct);
    }
    steps.push(ct_note.unwrap_or_else(|| TraceStep {
        step: "conntrack",
        result: "no entry for this flow: a new flow".to_owned(),
        details: vec![format!(
            "{MAP_CT} has no forward entry for {} → {} {}",
            out.client, out.destination, out.protocol
        )],
    }));

    // ---- `frontend`: exact address first, then the NodePort entry ----
    let exact = FrontendKey {
        addr: req.to.ip(),
        port: req.to.port(),
        proto: req.proto,
        scope: if req.pod { SCOPE_ALL } else { SCOPE_EXTERNAL },
    };
    let wildcard = FrontendKey {
        addr: if req.to.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        },
        ..exact
    };
    let mut node_address = None;
    let (fe, master) = match maps.svc(&codec::svc_key(&exact, 0))? {
        Some(m) => (exact, Some(m)),
        None => {
            if !req.pod && maps.is_node_addr(req.to.ip())? {
                node_address = Some(req.to.ip());
                (wildcard, maps.svc(&codec::svc_key(&wildcard, 0))?)
            } else {
                (exact, None)
            }
        }
    };
    let map_name = if req.to.is_ipv4() {
        svc_lb_common::MAP_SVC4
    } else {
        svc_lb_common::MAP_SVC6
    };

    // ---- `decide`: the shared choice ----
    let errors = Errors(RefCell::new(None));
    let mut maglev_size = 0;
    let mut table: Option<Vec<u32>> = None;
    if let Some(m) = &master {
        maglev_size = maps.ext_config()?.map_or(0, |c| c.maglev_size);
        table = maps.maglev_table(m.rev_nat_id)?;
    }
    let aff_key = |rev_nat_id| AffinityExtKey {
        addr_be: saddr,
        rev_nat_id,
        family: fam,
        _pad: [0; 3],
    };
    let choice = choose_external(
        master.as_ref(),
        |rev| errors.keep(maps.src_allowed(rev, req.from.ip()), false),
        hash,
        || req.now_ns,
        |rev| errors.keep(maps.affinity_ext(&aff_key(rev)), None),
        |id, rev| errors.keep(maps.affinity_member(id, rev), false),
        maglev_size,
        |_rev, index| {
            // The kernel's table always holds MAGLEV_TABLE_MAX entries; a shorter one
            // (the test fake's) must not index past its end either.
            let i = index as usize;
            if i >= MAGLEV_TABLE_MAX {
                return None;
            }
            table.as_ref().and_then(|t| t.get(i).copied())
        },
        |slot| {
            errors
                .keep(maps.svc(&codec::svc_key(&fe, slot)), None)
                .map(|v| v.backend_id)
        },
        |id| errors.keep(maps.backend(id), None),
    );
    if let Some(e) = errors.0.into_inner() {
        return Err(e.context("read the maps"));
    }

    let Some(master) = master else {
        let mut details = vec![format!(
            "no entry for {} (slot 0, scope {}) in the {map_name} map",
            fe_text(req.to.ip()),
            if req.pod { "all" } else { "external" }
        )];
        if node_address.is_some() {
            details.push(format!(
                "{} is a node address, but no NodePort {} is programmed",
                req.to.ip(),
                fe_text(wildcard.addr)
            ));
        } else {
            let nodes = maps.node_addrs()?;
            if maps.svc(&codec::svc_key(&wildcard, 0))?.is_some() {
                details.push(format!(
                    "{} is a NodePort, but {} is not a node address ({MAP_NODE_ADDR}: {})",
                    req.to.port(),
                    req.to.ip(),
                    list_or_none(&nodes)
                ));
            } else {
                details.push(format!(
                    "node addresses ({MAP_NODE_ADDR}): {}",
                    list_or_none(&nodes)
                ));
            }
        }
        steps.push(TraceStep {
            step: "frontend",
            result: "not found: not an external frontend".to_owned(),
            details,
        });
        steps.push(TraceStep {
            step: "verdict",
            result: "PASS: the packet goes on into the node's stack untouched".to_owned(),
            details: Vec::new(),
        });
        out.steps = steps;
        return Ok(out);
    };

    let meta = maps.meta(master.rev_nat_id)?;
    let meta_flags = meta.as_ref().map_or(0, |m| m.flags);
    let affinity = master.flags & SVC_FLAG_AFFINITY != 0;
    let ext_local = master.flags & SVC_FLAG_EXT_LOCAL != 0;
    let frontend = ExtTraceFrontend {
        address: fe.addr.to_string(),
        port: fe.port,
        node_address: node_address.map(|a| a.to_string()),
        rev_nat_id: master.rev_nat_id,
        namespace: meta.as_ref().map(|m| m.service.namespace.to_string()),
        service: meta.as_ref().map(|m| m.service.name.to_string()),
        port_name: meta.as_ref().map(|m| m.port_name.clone()),
        kind: names::kind(meta.as_ref().map_or(0, |m| m.kind)),
        backend_count: master.count,
        session_affinity: if affinity { "ClientIP" } else { "None" },
        affinity_timeout_seconds: affinity.then_some(master.affinity_timeout_s),
        // The datapath's flag decides; the metadata only labels.
        external_traffic_policy: if ext_local {
            "Local"
        } else {
            names::external_policy(meta_flags)
        },
        drop_when_empty: master.flags & SVC_FLAG_DROP_EMPTY != 0,
    };
    let service = match &meta {
        Some(m) if m.port_name.is_empty() => format!("Service {} ({})", m.service, frontend.kind),
        Some(m) => format!(
            "Service {} port {:?} ({})",
            m.service, m.port_name, frontend.kind
        ),
        None => "Service unknown (no metadata for this rev-NAT id yet)".to_owned(),
    };
    let mut fe_details = Vec::new();
    match node_address {
        Some(a) => fe_details.push(format!(
            "NodePort entry {} matched: the destination {a} is a node address ({MAP_NODE_ADDR})",
            fe_text(fe.addr)
        )),
        None => fe_details.push(format!(
            "exact entry {} (scope {})",
            fe_text(fe.addr),
            if req.pod { "all" } else { "external" }
        )),
    }
    fe_details.push(service);
    steps.push(TraceStep {
        step: "frontend",
        result: format!(
            "found {}: rev-NAT id {}",
            fe_text(req.to.ip()),
            master.rev_nat_id
        ),
        details: fe_details,
    });
    steps.push(TraceStep {
        step: "flags",
        result: format!(
            "externalTrafficPolicy {}, session affinity {}",
            frontend.external_traffic_policy,
            match frontend.affinity_timeout_seconds {
                Some(t) => format!("ClientIP ({t}s)"),
                None => "None".to_owned(),
            }
        ),
        details: vec![format!(
            "loadBalancerSourceRanges: {}",
            if master.flags & SVC_FLAG_SRC_RANGES != 0 {
                "yes"
            } else {
                "none (every source)"
            }
        )],
    });

    // Source ranges (only when the frontend has them; `choose_external` checks them
    // first).
    if master.flags & SVC_FLAG_SRC_RANGES != 0 {
        let ranges = maps.src_ranges(master.rev_nat_id)?;
        let allowed = !matches!(
            choice,
            ExtChoice::Drop {
                reason: CTR_EXT_DROP_SRC_RANGE,
                ..
            }
        );
        let matched = ranges
            .iter()
            .filter(|r| r.contains(&req.from.ip()))
            .max_by_key(|r| r.prefix_len());
        steps.push(TraceStep {
            step: "source",
            result: if allowed {
                format!("{} allowed", req.from.ip())
            } else {
                format!("{} not in loadBalancerSourceRanges", req.from.ip())
            },
            details: vec![
                format!(
                    "ranges: {}",
                    if ranges.is_empty() {
                        "(none readable)".to_owned()
                    } else {
                        ranges
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
                match matched {
                    Some(r) => format!("longest match {r}"),
                    None => "no range contains it".to_owned(),
                },
            ],
        });
        out.source_ranges = Some(ExtTraceSourceRanges {
            ranges: ranges.iter().map(ToString::to_string).collect(),
            allowed,
        });
    }

    // Context: the slots (the Maglev table holds the same backends).
    let listed = u16::try_from(master.count)
        .unwrap_or(u16::MAX)
        .min(MAX_LISTED);
    for slot in 1..=listed {
        let id = maps.svc(&codec::svc_key(&fe, slot))?.map(|v| v.backend_id);
        let be = match id {
            Some(id) => maps.backend(id)?,
            None => None,
        };
        out.candidates.push(ExtTraceCandidate {
            slot: candidate(slot, id.unwrap_or(0), be.as_ref()),
            local: be.is_some_and(|b| b.flags & BACKEND_FLAG_LOCAL != 0),
        });
    }
    let share = |id: u32| {
        table
            .as_ref()
            .map(|t| {
                t.iter()
                    .take(maglev_size as usize)
                    .filter(|x| **x == id)
                    .count()
            })
            .unwrap_or(0)
    };
    let mut cand_lines: Vec<String> = out
        .candidates
        .iter()
        .map(|c| {
            let where_ = if c.local { "local " } else { "remote" };
            let s = &c.slot;
            if s.state == "missing" {
                format!("slot {:>3}  backend {:>5}  (missing)", s.slot, s.backend_id)
            } else {
                let addr: IpAddr = s.address.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
                format!(
                    "slot {:>3}  backend {:>5}  {}  {}  {where_}  {}/{} Maglev entries",
                    s.slot,
                    s.backend_id,
                    names::socket(&addr, s.port),
                    s.state,
                    share(s.backend_id),
                    maglev_size
                )
            }
        })
        .collect();
    if master.count > u32::from(listed) {
        cand_lines.push(format!("... and {} more", master.count - u32::from(listed)));
    }
    out.frontend = Some(frontend);

    let verdict_drop = |reason: u32, why: String, steps: &mut Vec<TraceStep>| {
        steps.push(TraceStep {
            step: "verdict",
            result: "DROP: the packet is discarded, the client gets no answer".to_owned(),
            details: vec![why, format!("counted as {}", counter_name(reason))],
        });
        ExtTraceVerdict {
            action: "drop",
            reason: Some(counter_name(reason)),
            backend: None,
            nat: None,
        }
    };

    match choice {
        // The master entry exists, and `choose_external` answers NotService only
        // without one.
        ExtChoice::NotService => {}
        ExtChoice::Drop { reason, .. } if reason == CTR_EXT_DROP_SRC_RANGE => {
            out.verdict = verdict_drop(
                reason,
                "the source is outside loadBalancerSourceRanges (checked before anything else, so a filtered client learns nothing)".to_owned(),
                &mut steps,
            );
        }
        ExtChoice::Drop { reason, .. } if reason == CTR_EXT_DROP_NO_LOCAL => {
            steps.push(TraceStep {
                step: "backends",
                result: "none on this node".to_owned(),
                details: vec![
                    "externalTrafficPolicy Local: only this node's endpoints serve, and other nodes have some".to_owned(),
                ],
            });
            out.verdict = verdict_drop(
                reason,
                "no local endpoint (kube-proxy drops rather than rejects, so a load balancer's health check moves the traffic)".to_owned(),
                &mut steps,
            );
        }
        ExtChoice::Reject { reason, .. } => {
            steps.push(TraceStep {
                step: "backends",
                result: "none".to_owned(),
                details: Vec::new(),
            });
            steps.push(TraceStep {
                step: "verdict",
                result: if req.pod && req.proto == PROTO_TCP {
                    "REJECT: answered with a TCP RST (the pod sees ECONNREFUSED)".to_owned()
                } else {
                    format!(
                        "REJECT: answered with ICMP{} port unreachable (the client sees ECONNREFUSED)",
                        if req.to.is_ipv4() { "" } else { "v6" }
                    )
                },
                details: vec![
                    "the Service has no usable endpoint (kube-proxy's REJECT); tc sends the answer back out the device (XDP leaves it to tc)".to_owned(),
                    format!("counted as {}", counter_name(reason)),
                ],
            });
            out.verdict = ExtTraceVerdict {
                action: "reject",
                reason: Some(counter_name(reason)),
                backend: None,
                nat: None,
            };
        }
        ExtChoice::Drop { reason, .. } => {
            steps.push(TraceStep {
                step: "backends",
                result: format!("{} in slots 1..={}", master.count, master.count),
                details: cand_lines,
            });
            maglev_step(
                &mut steps,
                &mut out,
                hash,
                maglev_size,
                table.as_deref(),
                &master,
                req,
            );
            out.verdict = verdict_drop(
                reason,
                if reason == CTR_EXT_BACKEND_MISSING {
                    "the table or slot names a backend id with no backend entry (a planner bug or a map edited by hand)".to_owned()
                } else {
                    "unknown reason".to_owned()
                },
                &mut steps,
            );
        }
        ExtChoice::Backend {
            backend,
            backend_id,
            svc_flags,
            via,
            sticky,
            ..
        } => {
            steps.push(TraceStep {
                step: "backends",
                result: format!("{} in slots 1..={}", master.count, master.count),
                details: cand_lines,
            });
            if affinity {
                let (step, aff) =
                    affinity_step(maps, req, &master, aff_key(master.rev_nat_id), sticky)?;
                steps.push(step);
                out.affinity = Some(aff);
            }
            let via_name = match via {
                ExtVia::Affinity => "affinity",
                ExtVia::Maglev { .. } => "maglev",
                ExtVia::SlotFallback { .. } => "slot",
            };
            if !matches!(via, ExtVia::Affinity) {
                maglev_step(
                    &mut steps,
                    &mut out,
                    hash,
                    maglev_size,
                    table.as_deref(),
                    &master,
                    req,
                );
            }
            let c = candidate(0, backend_id, Some(&backend));
            let addr: IpAddr = c.address.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
            let backend_local = backend.flags & BACKEND_FLAG_LOCAL != 0;
            // The pod path: DNAT only (the pod's address is routable), except hairpin.
            let hairpin = req.pod && addr == req.from.ip();
            let local = if req.pod {
                !hairpin
            } else {
                backend_local || svc_flags & SVC_FLAG_EXT_LOCAL != 0
            };
            let chosen = ExtTraceChosen {
                id: backend_id,
                address: c.address.clone(),
                port: c.port,
                state: c.state,
                local: backend_local,
                via: via_name,
            };
            let mut aff_note = match sticky {
                Stickiness::New { .. } => vec![format!(
                    "remembered for {} (session affinity, {}s)",
                    req.from.ip(),
                    master.affinity_timeout_s
                )],
                _ => Vec::new(),
            };
            // `establish`: DNAT only, or DNAT + SNAT to the node's address.
            if hairpin {
                let svc = req.to.ip();
                steps.push(TraceStep {
                    step: "nat",
                    result: format!(
                        "hairpin: DNAT + source rewritten to the Service address {svc}"
                    ),
                    details: vec![
                        "the pod reaches itself: it sees the Service address as its peer, with a port from the SNAT range; the packet goes straight back out its device".to_owned(),
                    ],
                });
                let mut details = vec![
                    "a conntrack entry is created; later packets of the flow keep this backend"
                        .to_owned(),
                ];
                details.append(&mut aff_note);
                steps.push(TraceStep {
                    step: "verdict",
                    result: format!(
                        "FORWARD to {} (backend {backend_id}, {}), hairpin",
                        names::socket(&addr, c.port),
                        c.state
                    ),
                    details,
                });
                out.verdict = ExtTraceVerdict {
                    action: "forward",
                    reason: None,
                    backend: Some(chosen),
                    nat: Some(ExtTraceNat {
                        snat: true,
                        source_address: Some(svc.to_string()),
                        source_port: None,
                        why: "hairpin (the pod is its own backend)",
                    }),
                };
            } else if local {
                let why = if req.pod {
                    "the per-packet path for pods (the pod's address is routable)"
                } else if svc_flags & SVC_FLAG_EXT_LOCAL != 0 {
                    "externalTrafficPolicy Local"
                } else {
                    "backend on this node"
                };
                steps.push(TraceStep {
                    step: "nat",
                    result: format!("DNAT only: the backend sees the client {}", req.from.ip()),
                    details: vec![format!(
                        "{why}: the reply comes back through this node without SNAT"
                    )],
                });
                let mut details = vec![
                    "a conntrack entry is created; later packets of the flow keep this backend"
                        .to_owned(),
                ];
                details.append(&mut aff_note);
                steps.push(TraceStep {
                    step: "verdict",
                    result: format!(
                        "FORWARD to {} (backend {backend_id}, {}), client address preserved",
                        names::socket(&addr, c.port),
                        c.state
                    ),
                    details,
                });
                out.verdict = ExtTraceVerdict {
                    action: "forward",
                    reason: None,
                    backend: Some(chosen),
                    nat: Some(ExtTraceNat {
                        snat: false,
                        source_address: None,
                        source_port: None,
                        why,
                    }),
                };
            } else {
                let cfg = maps.ext_config()?;
                let snat_addr = match (cfg, fam) {
                    (None, _) => None,
                    (Some(c), FAMILY_V4) => {
                        (c.snat4_be != 0).then(|| ip_of(FAMILY_V4, [c.snat4_be, 0, 0, 0]))
                    }
                    (Some(c), _) => (c.snat6_be != [0; 4]).then(|| ip_of(FAMILY_V6, c.snat6_be)),
                };
                let Some(snat_addr) = snat_addr else {
                    out.verdict = verdict_drop(
                        CTR_EXT_NO_SNAT_ADDR,
                        format!(
                            "backend {backend_id} is on another node and needs SNAT, but {MAP_CONFIG} has no address of this family"
                        ),
                        &mut steps,
                    );
                    out.steps = steps;
                    return Ok(out);
                };
                let client_port = req.from.port();
                let (port_min, port_max) = match cfg {
                    Some(c) => svc_lb_common::lookup::snat_range(c.snat_port_min, c.snat_port_max),
                    None => (SNAT_PORT_MIN, SNAT_PORT_MAX),
                };
                let keeps = client_port != 0 && (port_min..=port_max).contains(&client_port);
                // The first port tried: the client's own when it lies in the SNAT
                // range; it is taken when a live reply entry holds it.
                let kept = if keeps {
                    let rkey = CtKey {
                        saddr_be: backend.addr_be,
                        daddr_be: addr_words(snat_addr),
                        sport_be: backend.port_be,
                        dport_be: port_be(client_port),
                        proto: req.proto,
                        family: fam,
                        dir: CT_DIR_REPLY,
                        _pad: 0,
                    };
                    match maps.ct(&rkey)? {
                        Some(v) if v.expires_ns > req.now_ns => None,
                        _ => Some(client_port),
                    }
                } else {
                    None
                };
                let port_text = match kept {
                    Some(p) => {
                        format!("{p} (the client's port: inside the SNAT range and free)")
                    }
                    None if keeps => format!(
                        "a pseudo-random port of {port_min}-{port_max} (the client's port {client_port} is held by another flow to this backend)"
                    ),
                    None => format!(
                        "a pseudo-random port of {port_min}-{port_max} (the client's port {client_port} is outside the SNAT range)"
                    ),
                };
                steps.push(TraceStep {
                    step: "nat",
                    result: format!("DNAT + SNAT: source rewritten to {snat_addr}"),
                    details: vec![
                        "backend on another node (externalTrafficPolicy Cluster): its reply must come back through this node".to_owned(),
                        format!("source port: {port_text}"),
                    ],
                });
                let mut details = vec![
                    "a conntrack entry is created; later packets of the flow keep this backend"
                        .to_owned(),
                ];
                details.append(&mut aff_note);
                steps.push(TraceStep {
                    step: "verdict",
                    result: format!(
                        "FORWARD to {} (backend {backend_id}, {}), SNAT to {}",
                        names::socket(&addr, c.port),
                        c.state,
                        match kept {
                            Some(p) => names::socket(&snat_addr, p),
                            None => format!("{snat_addr}"),
                        }
                    ),
                    details,
                });
                out.verdict = ExtTraceVerdict {
                    action: "forward",
                    reason: None,
                    backend: Some(chosen),
                    nat: Some(ExtTraceNat {
                        snat: true,
                        source_address: Some(snat_addr.to_string()),
                        source_port: kept,
                        why: "backend on another node",
                    }),
                };
            }
        }
    }
    out.steps = steps;
    Ok(out)
}

fn list_or_none(addrs: &[IpAddr]) -> String {
    if addrs.is_empty() {
        "none".to_owned()
    } else {
        addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The Maglev lookup `choose_external` made (or its slot fallback), for display.
fn maglev_step(
    steps: &mut Vec<TraceStep>,
    out: &mut ExtTrace,
    hash: u32,
    size: u32,
    table: Option<&[u32]>,
    master: &SvcValue,
    req: &ExtTraceRequest,
) {
    let tuple = format!(
        "flow hash {hash:#010x} over source {}, destination port {}, {} (not the destination address, so every node picks the same)",
        names::socket(&req.from.ip(), req.from.port()),
        req.to.port(),
        names::proto(req.proto)
    );
    let index = svc_lb_common::lookup::maglev_index(hash, size);
    let entry = index.and_then(|i| table.and_then(|t| t.get(i as usize).copied()));
    match (index, entry) {
        (Some(i), Some(id)) => {
            steps.push(TraceStep {
                step: "maglev",
                result: format!("{hash} % {size} = entry {i} → backend {id}"),
                details: vec![tuple],
            });
            out.maglev = Some(ExtTraceMaglev {
                table_size: size,
                index: Some(i),
                backend_id: Some(id),
                fallback_slot: None,
            });
        }
        _ => {
            let slot = svc_lb_common::select_slot(hash, master.count);
            steps.push(TraceStep {
                step: "maglev",
                result: format!(
                    "no usable table (size {size}, table {}): hashed slot {}",
                    if table.is_some() {
                        "present"
                    } else {
                        "missing"
                    },
                    slot.map_or("-".to_owned(), |s| s.to_string())
                ),
                details: vec![
                    tuple,
                    format!(
                        "slot = hash % {} + 1; counted as {}",
                        master.count,
                        counter_name(CTR_EXT_MAGLEV_MISSING)
                    ),
                ],
            });
            out.maglev = Some(ExtTraceMaglev {
                table_size: size,
                index: None,
                backend_id: None,
                fallback_slot: slot,
            });
        }
    }
}

/// Explains the affinity lookup `choose_external` made (reads the maps again, for
/// display only).
fn affinity_step(
    maps: &dyn ExtTraceMaps,
    req: &ExtTraceRequest,
    master: &SvcValue,
    key: AffinityExtKey,
    sticky: Stickiness,
) -> Result<(TraceStep, ExtTraceAffinity)> {
    let used = matches!(sticky, Stickiness::Remembered { .. });
    let entry = match maps.affinity_ext(&key)? {
        Some(v) => Some(affinity_entry(
            &v,
            req.now_ns,
            master,
            maps.affinity_member(v.backend_id, master.rev_nat_id)?,
        )),
        None => None,
    };
    let who = format!("client {}", req.from.ip());
    let (result, details) = affinity_text(
        &who,
        entry.as_ref(),
        used,
        master.affinity_timeout_s,
        AffinityWords {
            first: "its first flow: Maglev chooses, and the choice is remembered",
            anew: "Maglev chooses anew",
            unit: "flow",
        },
    );
    Ok((
        TraceStep {
            step: "affinity",
            result,
            details,
        },
        ExtTraceAffinity { entry, used },
    ))
}

/// The steps as numbered lines.
pub fn render_text(t: &ExtTrace) -> String {
    let mut out = format!(
        "trace external {} {} → {} ({})\n",
        t.protocol, t.client, t.destination, t.programs
    );
    let width = t.steps.iter().map(|s| s.step.len()).max().unwrap_or(0);
    for (i, s) in t.steps.iter().enumerate() {
        out.push_str(&format!("{:>2}. {:<width$}  {}\n", i + 1, s.step, s.result));
        for d in &s.details {
            out.push_str(&format!("    {:<width$}    {d}\n", ""));
        }
    }
    out
}
