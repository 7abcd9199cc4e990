//! `svc-lb conntrack`: the external path's flows, from the pinned `LB_CT_V1`.
//!
//! Each external flow has two entries (see `CtKey`/`CtValue` in svc-lb-common): the
//! forward one, keyed by the client's packet, and the reply one, keyed by the backend's
//! answer as it reaches this node. They are paired back into one row per flow: the
//! reply key of a forward entry is (backend → client), or (backend → SNAT address and
//! port) when the flow was SNATed. An entry whose partner is gone (LRU eviction, or a
//! flow that never got its reply entry) still gets a row, with `direction` saying which
//! half was found.
//!
//! `-o json` and `-o yaml` print [`CtFlow`] values; the field names are a stable format,
//! extended only by adding fields.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::Result;
use serde::Serialize;
use svc_lb_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_SEEN_REPLY, CT_FLAG_SNAT, CtKey,
    CtValue, FAMILY_V4, FAMILY_V6,
};

use super::names;
use crate::datapath::codec::{FrontendMeta, port_from_be, v4_from_word, v6_from_words};

/// One flow of the external path.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct CtFlow {
    /// "TCP", "UDP" or "SCTP".
    pub protocol: &'static str,
    /// The client as it sent the packet.
    pub client: String,
    /// What the client dialled (a node address for NodePorts, the LoadBalancer or
    /// external IP otherwise).
    pub frontend: String,
    /// The backend the flow was sent to.
    pub backend: String,
    pub backend_id: u32,
    /// The source the client's packets are rewritten to (the node's address and a
    /// port), when the backend is on another node; `null` otherwise.
    pub snat: Option<String>,
    /// Which entries exist: "both", "forward" (no reply entry: none seen yet, or
    /// evicted) or "reply" (the forward entry was evicted).
    pub direction: &'static str,
    /// Among "snat", "closing" (FIN/RST seen), "seen-reply" (the backend answered) and
    /// "established" (TCP handshake completed),
    /// from both entries.
    pub flags: Vec<&'static str>,
    pub rev_nat_id: u32,
    /// The Service, from the metadata map; `null` when unknown.
    pub namespace: Option<String>,
    pub service: Option<String>,
    pub port_name: Option<String>,
    /// Seconds until the forward entry expires (negative: expired, ignored by the
    /// datapath and waiting for LRU eviction); `null` without a forward entry.
    pub forward_expires_in_seconds: Option<f64>,
    /// The same for the reply entry.
    pub reply_expires_in_seconds: Option<f64>,
}

/// The flows and what could not be shown.
#[derive(Serialize, Debug, Clone, PartialEq, Default)]
pub struct CtTable {
    pub flows: Vec<CtFlow>,
    /// Entries with an unknown address family or direction (a newer layout, or
    /// corruption); they are counted, not shown.
    pub unreadable_entries: usize,
}

fn addr(family: u8, w: [u32; 4]) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(v4_from_word(w[0]))),
        FAMILY_V6 => Some(IpAddr::V6(v6_from_words(w))),
        _ => None,
    }
}

fn sock(family: u8, w: [u32; 4], port_be: u16) -> Option<SocketAddr> {
    Some(SocketAddr::new(addr(family, w)?, port_from_be(port_be)))
}

fn sock_str(s: SocketAddr) -> String {
    names::socket(&s.ip(), s.port())
}

/// The key the reply entry of a forward entry has.
fn reply_key_of(k: &CtKey, v: &CtValue) -> CtKey {
    let snat = v.flags & CT_FLAG_SNAT != 0;
    CtKey {
        saddr_be: v.nat_addr_be,
        sport_be: v.nat_port_be,
        daddr_be: if snat { v.snat_addr_be } else { k.saddr_be },
        dport_be: if snat { v.snat_port_be } else { k.sport_be },
        proto: k.proto,
        family: k.family,
        dir: CT_DIR_REPLY,
        _pad: 0,
    }
}

fn flag_names(flags: u8) -> Vec<&'static str> {
    let mut out = Vec::new();
    for (bit, name) in [
        (CT_FLAG_SNAT, "snat"),
        (CT_FLAG_CLOSING, "closing"),
        (CT_FLAG_SEEN_REPLY, "seen-reply"),
        (svc_lb_common::CT_FLAG_ESTABLISHED, "established"),
    ] {
        if flags & bit != 0 {
            out.push(name);
        }
    }
    out
}

fn remaining_s(expires_ns: u64, now_ns: u64) -> f64 {
    // Millisecond resolution is plenty for timeouts of seconds to hours, and keeps
    // the output stable for tests.
    let ms = (i128::from(expires_ns) - i128::from(now_ns)) / 1_000_000;
    ms as f64 / 1000.0
}

/// Pairs the raw entries into flows, sorted by protocol, frontend and client.
pub fn flows(
    entries: &[(CtKey, CtValue)],
    meta: &HashMap<u32, FrontendMeta>,
    now_ns: u64,
) -> CtTable {
    let mut replies: HashMap<CtKey, &CtValue> = HashMap::new();
    let mut forwards = Vec::new();
    let mut table = CtTable::default();
    for (k, v) in entries {
        match k.dir {
            CT_DIR_FORWARD => forwards.push((k, v)),
            CT_DIR_REPLY => {
                replies.insert(*k, v);
            }
            _ => table.unreadable_entries += 1,
        }
    }
    let with_meta = |f: &mut CtFlow| {
        if let Some(m) = meta.get(&f.rev_nat_id) {
            f.namespace = Some(m.service.namespace.to_string());
            f.service = Some(m.service.name.to_string());
            f.port_name = Some(m.port_name.clone());
        }
    };
    let mut rows: Vec<(SortKey, CtFlow)> = Vec::with_capacity(forwards.len());
    for (k, v) in forwards {
        let (Some(client), Some(frontend), Some(backend)) = (
            sock(k.family, k.saddr_be, k.sport_be),
            sock(k.family, k.daddr_be, k.dport_be),
            sock(k.family, v.nat_addr_be, v.nat_port_be),
        ) else {
            table.unreadable_entries += 1;
            continue;
        };
        let reply = replies.remove(&reply_key_of(k, v));
        let snat = (v.flags & CT_FLAG_SNAT != 0)
            .then(|| sock(k.family, v.snat_addr_be, v.snat_port_be))
            .flatten();
        let mut f = CtFlow {
            protocol: names::proto(k.proto),
            client: sock_str(client),
            frontend: sock_str(frontend),
            backend: sock_str(backend),
            backend_id: v.backend_id,
            snat: snat.map(sock_str),
            direction: if reply.is_some() { "both" } else { "forward" },
            flags: flag_names(v.flags | reply.map_or(0, |r| r.flags)),
            rev_nat_id: v.rev_nat_id,
            namespace: None,
            service: None,
            port_name: None,
            forward_expires_in_seconds: Some(remaining_s(v.expires_ns, now_ns)),
            reply_expires_in_seconds: reply.map(|r| remaining_s(r.expires_ns, now_ns)),
        };
        with_meta(&mut f);
        rows.push(((k.proto, frontend, client), f));
    }
    // Reply entries whose forward entry is gone.
    for (k, v) in replies {
        let snat = v.flags & CT_FLAG_SNAT != 0;
        let parts = (
            sock(k.family, k.saddr_be, k.sport_be),
            sock(k.family, k.daddr_be, k.dport_be),
            sock(k.family, v.nat_addr_be, v.nat_port_be),
            sock(k.family, v.snat_addr_be, v.snat_port_be),
        );
        let (Some(backend), Some(dst), Some(frontend), Some(orig_client)) = parts else {
            table.unreadable_entries += 1;
            continue;
        };
        // Without SNAT the reply goes straight to the client; with it, to the node's
        // SNAT address, and the value remembers the client.
        let (client, snat_addr) = if snat {
            (orig_client, Some(dst))
        } else {
            (dst, None)
        };
        let mut f = CtFlow {
            protocol: names::proto(k.proto),
            client: sock_str(client),
            frontend: sock_str(frontend),
            backend: sock_str(backend),
            backend_id: v.backend_id,
            snat: snat_addr.map(sock_str),
            direction: "reply",
            flags: flag_names(v.flags),
            rev_nat_id: v.rev_nat_id,
            namespace: None,
            service: None,
            port_name: None,
            forward_expires_in_seconds: None,
            reply_expires_in_seconds: Some(remaining_s(v.expires_ns, now_ns)),
        };
        with_meta(&mut f);
        rows.push(((k.proto, frontend, client), f));
    }
    rows.sort_by_key(|a| a.0);
    table.flows = rows.into_iter().map(|(_, f)| f).collect();
    table
}

type SortKey = (u8, SocketAddr, SocketAddr);

/// Reads every entry of the pinned conntrack map.
pub fn read_entries(bpffs: &Path) -> Result<Vec<(CtKey, CtValue)>> {
    crate::datapath::pinned::ct_entries(bpffs)
}

fn seconds(s: Option<f64>) -> String {
    match s {
        None => "-".to_owned(),
        Some(s) if s <= 0.0 => "expired".to_owned(),
        Some(s) => format!("{}s", s.ceil() as u64),
    }
}

/// A table in the style of `conntrack -L`, one row per flow.
pub fn render_text(t: &CtTable) -> String {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .force_no_tty()
        .set_header(vec![
            "PROTO", "CLIENT", "FRONTEND", "BACKEND", "SNAT", "DIR", "FLAGS", "TTL", "SERVICE",
        ]);
    for f in &t.flows {
        let service = match (&f.namespace, &f.service) {
            (Some(ns), Some(name)) => match f.port_name.as_deref() {
                Some(p) if !p.is_empty() => format!("{ns}/{name}:{p}"),
                _ => format!("{ns}/{name}"),
            },
            _ => format!("? (rev-NAT {})", f.rev_nat_id),
        };
        // The lifetime that governs the flow: the forward entry's, which new packets
        // of the client need.
        let ttl = seconds(f.forward_expires_in_seconds.or(f.reply_expires_in_seconds));
        table.add_row(vec![
            f.protocol.to_owned(),
            f.client.clone(),
            f.frontend.clone(),
            format!("{} (id {})", f.backend, f.backend_id),
            f.snat.clone().unwrap_or_else(|| "-".to_owned()),
            f.direction.to_owned(),
            if f.flags.is_empty() {
                "-".to_owned()
            } else {
                f.flags.join(",")
            },
            ttl,
            service,
        ]);
    }
    let mut out = String::new();
    if t.flows.is_empty() {
        out.push_str("no external flows\n");
    } else {
        for line in table.lines() {
            // comfy-table pads the first and last column; the golden files and
            // terminals are better off without trailing blanks.
            let line = line.trim_end();
            if !line.is_empty() {
                out.push_str(line.strip_prefix(' ').unwrap_or(line));
                out.push('\n');
            }
        }
    }
    let pairs = t.flows.iter().filter(|f| f.direction == "both").count();
    out.push_str(&format!(
        "{} flows ({} with both entries)",
        t.flows.len(),
        pairs
    ));
    if t.unreadable_entries > 0 {
        out.push_str(&format!(
            ", {} unreadable entries left out",
            t.unreadable_entries
        ));
    }
    out.push('\n');
    out
}

pub fn render_json(t: &CtTable) -> Result<String> {
    Ok(serde_json::to_string_pretty(t)? + "\n")
}

pub fn render_yaml(t: &CtTable) -> Result<String> {
    Ok(serde_yaml::to_string(t)?)
}
