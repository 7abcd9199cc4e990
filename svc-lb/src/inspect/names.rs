//! Display names of the datapath's numeric constants, shared by `list`, `trace`,
//! `status` and the metrics so that they all say the same thing.
use std::net::IpAddr;

use svc_lb_common::{
    BACKEND_ACTIVE, BACKEND_DRAINING, BACKEND_TERMINATING, KIND_CLUSTER_IP, KIND_EXTERNAL_IP,
    KIND_LOAD_BALANCER, KIND_NODE_PORT, META_EXTERNAL_LOCAL, META_INTERNAL_LOCAL, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP,
};

pub fn proto(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        PROTO_SCTP => "SCTP",
        _ => "UNKNOWN",
    }
}

/// The Service field a frontend address comes from, spelled as in the Kubernetes API.
pub fn kind(k: u8) -> &'static str {
    match k {
        KIND_CLUSTER_IP => "ClusterIP",
        KIND_NODE_PORT => "NodePort",
        KIND_LOAD_BALANCER => "LoadBalancer",
        KIND_EXTERNAL_IP => "ExternalIP",
        // The metadata is written after each sync; a frontend seen before that has none.
        _ => "Unknown",
    }
}

pub fn backend_state(s: u8) -> &'static str {
    match s {
        BACKEND_ACTIVE => "active",
        BACKEND_TERMINATING => "terminating",
        BACKEND_DRAINING => "draining",
        _ => "unknown",
    }
}

/// `internalTrafficPolicy` as the API spells it.
/// The scheduler `META_SCHED_*` bits name.
pub fn scheduler(meta_flags: u8) -> &'static str {
    match meta_flags & svc_lb_common::META_SCHED_MASK {
        svc_lb_common::META_SCHED_RR => "rr",
        svc_lb_common::META_SCHED_WRR => "wrr",
        svc_lb_common::META_SCHED_MAGLEV => "maglev",
        svc_lb_common::META_SCHED_LC => "lc",
        svc_lb_common::META_SCHED_WLC => "wlc",
        _ => "random",
    }
}

pub fn internal_policy(meta_flags: u8) -> &'static str {
    if meta_flags & META_INTERNAL_LOCAL != 0 {
        "Local"
    } else {
        "Cluster"
    }
}

/// `externalTrafficPolicy` as the API spells it.
pub fn external_policy(meta_flags: u8) -> &'static str {
    if meta_flags & META_EXTERNAL_LOCAL != 0 {
        "Local"
    } else {
        "Cluster"
    }
}

/// `addr:port`, with brackets around IPv6 addresses.
pub fn socket(addr: &IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}
