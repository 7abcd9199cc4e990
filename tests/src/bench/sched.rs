//! The connection rate through a VIP per socket scheduler (issue 15): `random`, `rr`,
//! `wrr` and `lc`, side by side with direct, at one scale point (10 000 Services in the full
//! run, see [`super::run::Profile::sched_n`]).
//!
//! The scale point's agent is already loaded with its N Services; four more Services,
//! one per scheduler, are added in a manifest file of their own (as they would arrive
//! from the API): TCP 80 → 8080 on the measured Service's three backends, annotated
//! `svc-lb.io/scheduler`, and for `wrr` also `svc-lb.io/weights` 1:2:3. Each repetition
//! runs direct (the backends' own addresses) and every scheduler's VIP once, the order
//! rotating, with the load generator of the rate tables. The replies per backend show
//! that each scheduler did what it says (`rr` 1:1:1, `wrr` 1:2:3, `random` and `lc`
//! about 1:1:1: equal backends, and `lc` breaks ties at random).
//!
//! `wlc` is not measured: with the load generator's few connections open at a time its
//! choice is mostly between idle backends, so its shares would show the tie-break, not
//! the weights; its cost per connection is `lc`'s (the same scan).
use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::workload::{self, K8S_NS, Plane, SVC_TCP_PORT, TCP_TARGET_PORT};
use crate::manifests::{EndpointSlice, Protocol, Service, TargetPort};

/// One scheduler under test: its annotation value and, for the weighted ones, the
/// weights of the three backends (in [`workload::IDS`] order).
#[derive(Clone, Copy, Debug)]
pub struct Sched {
    pub name: &'static str,
    pub weights: Option<[u16; 3]>,
}

/// The schedulers measured.
pub const SCHEDULERS: [Sched; 4] = [
    Sched {
        name: "random",
        weights: None,
    },
    Sched {
        name: "rr",
        weights: None,
    },
    Sched {
        name: "wrr",
        weights: Some([1, 2, 3]),
    },
    Sched {
        name: "lc",
        weights: None,
    },
];

/// The manifest file of the schedulers' Services.
pub const FILE: &str = "sched.json";

/// The name of the direct row (the backends' own addresses, no Service).
pub const DIRECT: &str = "direct";

/// ClusterIP of scheduler `i`'s Service (10.112.0.10 up, outside every generated range).
pub fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 112, 0, 10 + u8::try_from(i).unwrap_or(0))
}

fn service(i: usize, s: &Sched) -> [serde_json::Value; 2] {
    let name = format!("sched-{}", s.name);
    let mut svc = Service::new(K8S_NS, &name, &[vip(i).into()])
        .port(
            "http",
            SVC_TCP_PORT,
            TargetPort::Number(TCP_TARGET_PORT),
            Protocol::Tcp,
        )
        .to_value();
    svc["metadata"]["annotations"] = json!({ "svc-lb.io/scheduler": s.name });
    let backends = Plane::SvcLb.measured_endpoints();
    let addrs: Vec<std::net::IpAddr> = backends.iter().map(|a| (*a).into()).collect();
    let mut slice = EndpointSlice::new(K8S_NS, &name, "bench", false)
        .port("http", TCP_TARGET_PORT, Protocol::Tcp)
        .ready_endpoints(&addrs)
        .to_value();
    if let Some(w) = s.weights {
        let list: Vec<String> = backends
            .iter()
            .zip(w)
            .map(|(a, w)| format!("{a}={w}"))
            .collect();
        slice["metadata"]["annotations"] = json!({ "svc-lb.io/weights": list.join(",") });
    }
    [svc, slice]
}

/// The `kind: List` of every scheduler's Service and slice.
pub fn manifest() -> String {
    let items: Vec<serde_json::Value> = SCHEDULERS
        .iter()
        .enumerate()
        .flat_map(|(i, s)| service(i, s))
        .collect();
    json!({ "apiVersion": "v1", "kind": "List", "metadata": { "resourceVersion": "" }, "items": items })
        .to_string()
}

/// The share of each backend a scheduler must give (`random` and `rr`: equal).
pub fn expected_shares(s: &Sched) -> [f64; 3] {
    let w = s.weights.unwrap_or([1, 1, 1]).map(f64::from);
    let total: f64 = w.iter().sum();
    w.map(|x| x / total)
}

/// One row of the table: a scheduler (or [`DIRECT`]) at scale point `n`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SchedCell {
    pub n: usize,
    pub scheduler: String,
    /// Weights of the backends a, b, c (weighted schedulers only).
    #[serde(default)]
    pub weights: Option<[u16; 3]>,
    /// One rate per repetition (successful connections per second).
    pub samples: Vec<f64>,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    /// Which backend answered, over all repetitions.
    pub replies: BTreeMap<String, u64>,
}

impl SchedCell {
    pub fn new(n: usize, scheduler: &str, weights: Option<[u16; 3]>) -> Self {
        Self {
            n,
            scheduler: scheduler.to_owned(),
            weights,
            samples: Vec::new(),
            failed: 0,
            failures: BTreeMap::new(),
            replies: BTreeMap::new(),
        }
    }

    /// Replies per backend as shares, in [`workload::IDS`] order.
    pub fn shares(&self) -> [f64; 3] {
        let total: u64 = self.replies.values().sum();
        workload::IDS.map(|id| {
            let n = self.replies.get(&id.to_string()).copied().unwrap_or(0);
            if total == 0 {
                0.0
            } else {
                n as f64 / total as f64
            }
        })
    }
}

/// What a smoke run checks: every row has rates and no failure, and each scheduler
/// gave every backend its share within `tolerance` (absolute, in share).
pub fn check(cells: &[SchedCell], tolerance: f64) -> Vec<String> {
    let mut problems = Vec::new();
    let rows = std::iter::once(DIRECT).chain(SCHEDULERS.iter().map(|s| s.name));
    for name in rows {
        match cells.iter().find(|c| c.scheduler == name) {
            Some(c)
                if c.samples.iter().all(|s| *s > 0.0) && !c.samples.is_empty() && c.failed == 0 => {
            }
            other => problems.push(format!("scheduler {name}: {other:?}")),
        }
    }
    for s in &SCHEDULERS {
        let Some(c) = cells.iter().find(|c| c.scheduler == s.name) else {
            continue;
        };
        let (got, want) = (c.shares(), expected_shares(s));
        if got.iter().zip(want).any(|(g, w)| (g - w).abs() > tolerance) {
            problems.push(format!(
                "scheduler {}: backend shares {got:?}, expected {want:?} (± {tolerance}): {:?}",
                s.name, c.replies
            ));
        }
    }
    problems
}

/// The report's table: conn/s per scheduler and the ratio to direct (paired by
/// repetition), with the backends' shares.
pub fn table(out: &mut String, cells: &[SchedCell]) {
    use std::fmt::Write as _;

    use super::{
        report::{n_label, pm_rate, rate_ratio, table_head},
        stats,
    };
    table_head(
        out,
        "TCP connection rate through the VIP per scheduler",
        &[
            "The scale point's agent and Services stay loaded; four Services are added, one per socket scheduler \
             (`svc-lb.io/scheduler` `random`, `rr`, `wrr`, `lc`; `wrr` with `svc-lb.io/weights` 1:2:3), each TCP 80 → 8080 \
             on the measured Service's three backends. Each repetition runs direct and every scheduler's VIP once \
             (the order rotating), with the load generator of the rate tables. The shares say which backend \
             answered (a : b : c): `rr` must give 1:1:1, `wrr` 1:2:3, `random` and `lc` about 1:1:1. `wlc` is not \
             measured (at a few open connections its choice is mostly the tie-break; it costs what `lc` does).",
        ],
        "| N | scheduler | conn/s (mean ± sd) | reps | × direct | shares a : b : c | failed |\n|---:|---|---:|---:|---:|---|---:|",
    );
    let direct = cells.iter().find(|c| c.scheduler == DIRECT);
    for c in cells {
        let Some(s) = stats::summarize(&c.samples) else {
            continue;
        };
        let vs = match direct {
            Some(d) if c.scheduler != DIRECT => rate_ratio(&c.samples, &d.samples),
            _ => "—".into(),
        };
        let shares = if c.scheduler == DIRECT {
            "—".to_owned()
        } else {
            c.shares()
                .iter()
                .map(|x| format!("{:.3}", x))
                .collect::<Vec<_>>()
                .join(" : ")
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {vs} | {shares} | {} |",
            n_label(c.n),
            c.scheduler,
            pm_rate(&s),
            s.n,
            c.failed
        );
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_annotates_every_scheduler_and_weights_only_wrr() {
        let v: serde_json::Value = serde_json::from_str(&manifest()).unwrap();
        let items = v["items"].as_array().unwrap();
        assert_eq!(items.len(), 2 * SCHEDULERS.len());
        for (i, s) in SCHEDULERS.iter().enumerate() {
            let (svc, slice) = (&items[2 * i], &items[2 * i + 1]);
            assert_eq!(
                svc["metadata"]["annotations"]["svc-lb.io/scheduler"],
                s.name
            );
            assert_eq!(svc["spec"]["clusterIP"], vip(i).to_string());
            let weights = &slice["metadata"]["annotations"]["svc-lb.io/weights"];
            assert_eq!(weights.is_string(), s.weights.is_some(), "{}", s.name);
        }
        assert_eq!(
            items[5]["metadata"]["annotations"]["svc-lb.io/weights"],
            "10.240.1.2=1,10.240.2.2=2,10.240.3.2=3"
        );
    }

    #[test]
    fn check_wants_the_shares() {
        let mut cells = vec![SchedCell::new(1, DIRECT, None)];
        for s in &SCHEDULERS {
            let mut c = SchedCell::new(1, s.name, s.weights);
            c.samples = vec![100.0];
            for (id, share) in workload::IDS.iter().zip(expected_shares(s)) {
                c.replies.insert(id.to_string(), (share * 600.0) as u64);
            }
            cells.push(c);
        }
        cells[0].samples = vec![100.0];
        assert!(check(&cells, 0.05).is_empty(), "{:?}", check(&cells, 0.05));
        // wrr answering 1:1:1 is a failure.
        let wrr = cells.iter_mut().find(|c| c.scheduler == "wrr").unwrap();
        for v in wrr.replies.values_mut() {
            *v = 200;
        }
        assert_eq!(check(&cells, 0.05).len(), 1);
    }
}
