//! Schedulers and endpoint weights (issue 15, first part): the annotations that choose
//! them and the slot layout that makes the datapath's choice follow them. Pure, no I/O.
//!
//! - `svc-lb.io/scheduler` on a Service: `random`, `rr`, `wrr`, `lc`, `wlc` or `maglev`.
//!   `lc`/`wlc` need the active connection counts (the sock_ops program, probe feature
//!   `sock_ops_conn`): without them they are reported and the default applies. Anything
//!   else is reported and the default applies.
//! - `svc-lb.io/weights` on an EndpointSlice: `ADDRESS=WEIGHT,...`, weights 0–65535
//!   (default 1). Weight 0 drains an endpoint: no new connections, established ones stay.
//!   A bad entry is reported; the others apply.
//!
//! One slot layout serves `random` and `wrr`: [`weighted_layout`] repeats each backend
//! in proportion to its weight (reduced by the gcd) and interleaves the repetitions
//! evenly, so a uniform random slot is a weighted random choice and a round-robin walk
//! over the slots is a smooth weighted round robin. `lc`/`wlc` lay each backend's slots
//! out as one run instead, so that the datapath's scan reads a backend's weight as the
//! length of its run (`svc_lb_common::lookup::lc_scan`).
use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use super::{ModelError, ObjectRef};

/// Service annotation that chooses the scheduler.
pub const ANNOTATION_SCHEDULER: &str = "svc-lb.io/scheduler";
/// EndpointSlice annotation with the endpoints' weights.
pub const ANNOTATION_WEIGHTS: &str = "svc-lb.io/weights";
/// Weight of an endpoint the annotation does not name.
pub const DEFAULT_WEIGHT: u16 = 1;
/// Most slots one frontend's weighted layout may take. Weights that need more are
/// scaled down to fit (and reported): slots are map entries, and at 10 000 Services an
/// unbounded layout (65 535 × backends) would exhaust the service map.
pub const MAX_WEIGHTED_SLOTS: usize = 4096;
// The bpf_loop lc programs compare every slot a weighted layout can have.
const _: () = assert!(svc_lb_common::lookup::LC_LOOP_MAX as usize >= MAX_WEIGHTED_SLOTS);

/// How a frontend picks a backend for a new connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheduler {
    /// A uniformly random slot (weighted through the slot layout).
    #[default]
    Random,
    /// Round robin: every backend with a non-zero weight once per cycle.
    Rr,
    /// Weighted round robin (smooth: repetitions of a backend are spread out).
    Wrr,
    /// Maglev consistent hashing (weighted): the external path's scheduler.
    Maglev,
    /// Least connections (IPVS `lc`): the fewest active × 256 + inactive connections.
    Lc,
    /// Weighted least connections (IPVS `wlc`): the least `lc` load per weight.
    Wlc,
}

impl Scheduler {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::Rr => "rr",
            Self::Wrr => "wrr",
            Self::Maglev => "maglev",
            Self::Lc => "lc",
            Self::Wlc => "wlc",
        }
    }

    /// The `META_SCHED_*` bits that name this scheduler in the metadata map.
    pub fn meta_bits(self) -> u8 {
        match self {
            Self::Random => svc_lb_common::META_SCHED_RANDOM,
            Self::Rr => svc_lb_common::META_SCHED_RR,
            Self::Wrr => svc_lb_common::META_SCHED_WRR,
            Self::Maglev => svc_lb_common::META_SCHED_MAGLEV,
            Self::Lc => svc_lb_common::META_SCHED_LC,
            Self::Wlc => svc_lb_common::META_SCHED_WLC,
        }
    }

    /// Whether the weights shape this scheduler's layout (`rr` ignores them except
    /// that weight 0 drains, as IPVS's `rr` does).
    pub fn weighted(self) -> bool {
        !matches!(self, Self::Rr | Self::Lc)
    }

    /// Whether the datapath chooses by connection counts (`SVC_FLAG_SCHED_LC`), which
    /// only a node with the counts can do.
    pub fn needs_counts(self) -> bool {
        matches!(self, Self::Lc | Self::Wlc)
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a scheduler name was not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SchedulerError {
    Unknown(String),
}

impl fmt::Display for SchedulerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(s) => write!(
                f,
                "unknown scheduler '{s}' (expected random, rr, wrr, lc, wlc or maglev)"
            ),
        }
    }
}

impl std::error::Error for SchedulerError {}

impl FromStr for Scheduler {
    type Err = SchedulerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "random" => Ok(Self::Random),
            "rr" => Ok(Self::Rr),
            "wrr" => Ok(Self::Wrr),
            "maglev" => Ok(Self::Maglev),
            "lc" => Ok(Self::Lc),
            "wlc" => Ok(Self::Wlc),
            other => Err(SchedulerError::Unknown(other.to_owned())),
        }
    }
}

/// Parses the node flag `--scheduler` (the default for socket traffic). `maglev` is
/// refused there: a socket hook sees no source port to hash at connect time.
pub fn parse_socket_default(s: &str) -> Result<Scheduler, String> {
    match s.parse::<Scheduler>() {
        Ok(Scheduler::Maglev) => Err(
            "maglev is the external path's scheduler; for sockets use random, rr, wrr, lc or wlc"
                .into(),
        ),
        Ok(sched) => Ok(sched),
        Err(e) => Err(e.to_string()),
    }
}

/// The scheduler of a Service from its `svc-lb.io/scheduler` annotation (the value
/// the Service accessor returns), and the error to report when the value was not
/// taken (`default` applies then).
///
/// `conn_counts`: the node keeps active connection counts. Without them `lc`/`wlc`
/// cannot run: an annotation asking for one is reported and the default applies; a
/// default (`--scheduler`) of `lc`/`wlc` becomes `random` (the agent says so once at
/// start, not per Service).
pub fn service_scheduler(
    annotation: Option<&str>,
    default: Scheduler,
    conn_counts: bool,
    service: &ObjectRef,
) -> (Scheduler, Option<ModelError>) {
    let usable = |s: Scheduler| conn_counts || !s.needs_counts();
    let default = if usable(default) {
        default
    } else {
        Scheduler::Random
    };
    let error = |reason: String| ModelError {
        object: service.clone(),
        reason: format!("annotation {ANNOTATION_SCHEDULER}: {reason}; using {default}"),
    };
    match annotation.map(str::parse::<Scheduler>) {
        None => (default, None),
        Some(Ok(sched)) if usable(sched) => (sched, None),
        Some(Ok(sched)) => (
            default,
            Some(error(format!(
                "scheduler '{sched}' needs active connection counts, which this node does not \
                 keep (kernel feature sock_ops_conn, see `svc-lb status`)"
            ))),
        ),
        Some(Err(e)) => (default, Some(error(e.to_string()))),
    }
}

/// The parsed `svc-lb.io/weights` annotation of one EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointWeights {
    /// Address → weight, for the entries that parsed (a repeated address: the last wins).
    pub weights: BTreeMap<IpAddr, u16>,
    /// One reason per entry that did not parse, to report against the slice.
    pub bad: Vec<String>,
}

impl EndpointWeights {
    /// The weight of the endpoint at `addr` ([`DEFAULT_WEIGHT`] when not named).
    pub fn of(&self, addr: &IpAddr) -> u16 {
        self.weights.get(addr).copied().unwrap_or(DEFAULT_WEIGHT)
    }

    /// The bad entries as model errors against `slice`.
    pub fn errors<'a>(&'a self, slice: &'a ObjectRef) -> impl Iterator<Item = ModelError> + 'a {
        self.bad.iter().map(move |reason| ModelError {
            object: slice.clone(),
            reason: format!("annotation {ANNOTATION_WEIGHTS}: {reason}"),
        })
    }
}

/// Parses `ADDRESS=WEIGHT,...`. Empty entries (a trailing comma) are ignored; every
/// other entry that does not parse is kept in [`EndpointWeights::bad`] with its reason,
/// and the rest apply.
pub fn parse_weights(value: &str) -> EndpointWeights {
    let mut out = EndpointWeights::default();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((addr, weight)) = entry.split_once('=') else {
            out.bad.push(format!("'{entry}': expected ADDRESS=WEIGHT"));
            continue;
        };
        let addr = match addr.trim().parse::<IpAddr>() {
            Ok(a) => a,
            Err(_) => {
                out.bad
                    .push(format!("'{entry}': '{}' is not an IP address", addr.trim()));
                continue;
            }
        };
        match weight.trim().parse::<u16>() {
            Ok(w) => {
                out.weights.insert(addr, w);
            }
            Err(_) => out.bad.push(format!(
                "'{entry}': weight '{}' is not an integer in 0..=65535",
                weight.trim()
            )),
        }
    }
    out
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A frontend's slot layout: indexes into its backend list, one per slot, in slot order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub slots: Vec<usize>,
    /// Set when the weights needed more than [`MAX_WEIGHTED_SLOTS`] slots and were
    /// scaled down to fit: the reason to report (proportions are then approximate).
    pub scaled: Option<String>,
}

/// The slot layout for backends with these weights under `sched`.
///
/// Weight-0 backends get no slot (drain). `rr` gives every other backend one slot.
/// `random`/`wrr`/`maglev` repeat backend `i` `w[i] / gcd(w)` times, interleaved by
/// stride order (the k-th repetition of `i` sits at virtual time `(2k + 1) / (2 w[i])`),
/// so that any window of the cycle holds each backend in about its share. All backends
/// with weight 0 give an empty layout (refuse, as a Service without endpoints).
pub fn weighted_layout(weights: &[u16], sched: Scheduler) -> Layout {
    let live: Vec<(usize, u32)> = weights
        .iter()
        .enumerate()
        .filter(|(_, w)| **w != 0)
        .map(|(i, w)| (i, if sched.weighted() { u32::from(*w) } else { 1 }))
        .collect();
    if live.is_empty() {
        return Layout {
            slots: Vec::new(),
            scaled: None,
        };
    }
    let g = live.iter().fold(0, |g, (_, w)| gcd(g, *w));
    let mut reduced: Vec<(usize, u32)> = live.iter().map(|(i, w)| (*i, w / g)).collect();
    let total: u64 = reduced.iter().map(|(_, w)| u64::from(*w)).sum();
    let mut scaled = None;
    if total > MAX_WEIGHTED_SLOTS as u64 {
        // Scale to fit; every live backend keeps at least one slot, so a cap below the
        // backend count cannot be honoured and the planner's backend limit applies.
        // floor(w · (cap − n) / total) + 1 sums to at most cap.
        let n = reduced.len() as u64;
        let room = (MAX_WEIGHTED_SLOTS as u64).saturating_sub(n);
        for (_, w) in &mut reduced {
            *w = ((u64::from(*w) * room) / total + 1) as u32;
        }
        let g = reduced.iter().fold(0, |g, (_, w)| gcd(g, *w));
        for (_, w) in &mut reduced {
            *w /= g;
        }
        scaled = Some(format!(
            "weights need {total} slots, more than {MAX_WEIGHTED_SLOTS}; scaled down to fit \
             (shares are approximate)"
        ));
    }
    if sched.needs_counts() {
        // One run per backend: the lc scan reads the weight as the run's length.
        return Layout {
            slots: reduced
                .iter()
                .flat_map(|(i, w)| std::iter::repeat_n(*i, *w as usize))
                .collect(),
            scaled,
        };
    }
    let mut order: Vec<(u32, u32, usize)> = reduced
        .iter()
        .flat_map(|(i, w)| (0..*w).map(move |k| (k, *w, *i)))
        .collect();
    // Compare (2k+1)/w without floats: (2a+1)·wb vs (2b+1)·wa; ties by backend index
    // keep the layout a function of the inputs only.
    order.sort_by(|(ka, wa, ia), (kb, wb, ib)| {
        let l = (2 * u64::from(*ka) + 1) * u64::from(*wb);
        let r = (2 * u64::from(*kb) + 1) * u64::from(*wa);
        l.cmp(&r).then(ia.cmp(ib))
    });
    Layout {
        slots: order.into_iter().map(|(_, _, i)| i).collect(),
        scaled,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    fn svc() -> ObjectRef {
        ObjectRef {
            kind: "Service".into(),
            namespace: Arc::from("ns"),
            name: Arc::from("web"),
        }
    }

    #[test]
    fn scheduler_names() {
        for (s, want) in [
            ("random", Scheduler::Random),
            ("rr", Scheduler::Rr),
            (" wrr ", Scheduler::Wrr),
            ("maglev", Scheduler::Maglev),
            ("lc", Scheduler::Lc),
            ("wlc", Scheduler::Wlc),
        ] {
            assert_eq!(s.parse::<Scheduler>(), Ok(want));
            assert_eq!(want.as_str().parse::<Scheduler>(), Ok(want));
        }
        assert_eq!("wlc".parse::<Scheduler>(), Ok(Scheduler::Wlc));
        assert_eq!("lc".parse::<Scheduler>(), Ok(Scheduler::Lc));
        assert_eq!(
            "RR".parse::<Scheduler>(),
            Err(SchedulerError::Unknown("RR".into()))
        );
    }

    #[test]
    fn service_annotation_reports_and_falls_back() {
        assert_eq!(
            service_scheduler(None, Scheduler::Random, true, &svc()),
            (Scheduler::Random, None)
        );
        assert_eq!(
            service_scheduler(Some("wrr"), Scheduler::Random, false, &svc()),
            (Scheduler::Wrr, None)
        );
        assert_eq!(
            service_scheduler(Some("wlc"), Scheduler::Random, true, &svc()),
            (Scheduler::Wlc, None)
        );
        // Without connection counts lc/wlc cannot run: reported, the default applies.
        let (s, err) = service_scheduler(Some("lc"), Scheduler::Rr, false, &svc());
        assert_eq!(s, Scheduler::Rr);
        let err = err.map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(
            err,
            "Service ns/web: annotation svc-lb.io/scheduler: scheduler 'lc' needs active \
             connection counts, which this node does not keep (kernel feature sock_ops_conn, \
             see `svc-lb status`); using rr"
        );
        // A default of wlc without counts is random, silently (the agent logs it once).
        assert_eq!(
            service_scheduler(None, Scheduler::Wlc, false, &svc()),
            (Scheduler::Random, None)
        );
        assert_eq!(
            service_scheduler(None, Scheduler::Wlc, true, &svc()),
            (Scheduler::Wlc, None)
        );
        let (s, err) = service_scheduler(Some("fastest"), Scheduler::Random, true, &svc());
        assert_eq!(s, Scheduler::Random);
        assert!(
            err.is_some_and(|e| e.reason.contains("unknown scheduler 'fastest'")),
            "unknown value is reported"
        );
    }

    #[test]
    fn socket_default_refuses_maglev() {
        assert_eq!(parse_socket_default("rr"), Ok(Scheduler::Rr));
        assert!(parse_socket_default("maglev").is_err());
        assert_eq!(parse_socket_default("wlc"), Ok(Scheduler::Wlc));
    }

    #[test]
    fn weights_parse_and_bad_entries_are_reported() {
        let w = parse_weights("10.0.0.1=3, 10.0.0.2=0,fd00::1=65535,,10.0.0.3=70000,x=1,10.0.0.4");
        let a = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert_eq!(w.of(&a("10.0.0.1")), 3);
        assert_eq!(w.of(&a("10.0.0.2")), 0);
        assert_eq!(w.of(&a("fd00::1")), 65535);
        assert_eq!(w.of(&a("10.0.0.9")), DEFAULT_WEIGHT, "unnamed: default");
        assert_eq!(w.of(&a("10.0.0.3")), DEFAULT_WEIGHT, "bad weight: default");
        assert_eq!(w.weights.len(), 3);
        assert_eq!(
            w.bad,
            vec![
                "'10.0.0.3=70000': weight '70000' is not an integer in 0..=65535".to_owned(),
                "'x=1': 'x' is not an IP address".to_owned(),
                "'10.0.0.4': expected ADDRESS=WEIGHT".to_owned(),
            ]
        );
        let slice = ObjectRef {
            kind: "EndpointSlice".into(),
            namespace: Arc::from("ns"),
            name: Arc::from("web-abc"),
        };
        let first = w.errors(&slice).next().map(|e| e.to_string());
        assert_eq!(
            first.as_deref(),
            Some(
                "EndpointSlice ns/web-abc: annotation svc-lb.io/weights: '10.0.0.3=70000': \
                 weight '70000' is not an integer in 0..=65535"
            )
        );
    }

    #[test]
    fn layout_reduces_by_gcd_and_interleaves() {
        let l = weighted_layout(&[2, 4, 6], Scheduler::Wrr);
        assert_eq!(l.scaled, None);
        assert_eq!(l.slots.len(), 6, "1:2:3 after the gcd");
        assert_eq!(l.slots, vec![2, 1, 0, 2, 1, 2]);
        // rr: every live backend once, weights ignored.
        assert_eq!(
            weighted_layout(&[2, 4, 6], Scheduler::Rr).slots,
            vec![0, 1, 2]
        );
    }

    #[test]
    fn lc_layouts_are_runs_whose_length_is_the_weight() {
        // wlc: 1:2:3 after the gcd, each backend's slots together.
        assert_eq!(
            weighted_layout(&[2, 4, 6], Scheduler::Wlc).slots,
            vec![0, 1, 1, 2, 2, 2]
        );
        // lc: one slot each; weight 0 still drains.
        assert_eq!(weighted_layout(&[2, 0, 6], Scheduler::Lc).slots, vec![0, 2]);
        assert_eq!(
            weighted_layout(&[3, 0, 1], Scheduler::Wlc).slots,
            vec![0, 0, 0, 2]
        );
    }

    #[test]
    fn weight_zero_drains_and_all_zero_is_empty() {
        assert_eq!(
            weighted_layout(&[1, 0, 1], Scheduler::Random).slots,
            vec![0, 2]
        );
        assert_eq!(weighted_layout(&[0, 5, 0], Scheduler::Rr).slots, vec![1]);
        assert!(weighted_layout(&[0, 0], Scheduler::Wrr).slots.is_empty());
        assert!(weighted_layout(&[], Scheduler::Wrr).slots.is_empty());
    }

    #[test]
    fn layout_over_the_cap_is_scaled_and_reported() {
        let l = weighted_layout(&[65535, 65534, 1], Scheduler::Random);
        assert!(l.slots.len() <= MAX_WEIGHTED_SLOTS);
        assert!(l.scaled.is_some());
        for i in 0..3 {
            assert!(l.slots.contains(&i), "backend {i} keeps a slot");
        }
    }

    proptest! {
        /// Every live backend gets exactly its reduced weight in slots (no cap hit), no
        /// drained one gets any, and every prefix of the cycle is close to each
        /// backend's exact share (the interleaving is smooth). Stride order puts backend
        /// i's count within 1/2 of w_i·t at virtual time t (within 1 while ties are
        /// being placed), so a prefix of n slots is off its share n·w_i/T by at most
        /// 1 + (w_i/T)·(number of backends); a layout of runs breaks it (5:5 after 5 slots).
        #[test]
        fn layout_shares_are_exact_and_smooth(weights in prop::collection::vec(0u16..40, 1..12)) {
            let l = weighted_layout(&weights, Scheduler::Wrr);
            let live: Vec<u32> = weights.iter().filter(|w| **w != 0).map(|w| u32::from(*w)).collect();
            if live.is_empty() {
                prop_assert!(l.slots.is_empty());
                return Ok(());
            }
            let g = live.iter().fold(0, |g, w| gcd(g, *w));
            let total: u32 = live.iter().map(|w| w / g).sum();
            prop_assert_eq!(l.slots.len() as u32, total);
            prop_assert_eq!(l.scaled.clone(), None);
            let mut seen = vec![0u32; weights.len()];
            for (n, i) in l.slots.iter().enumerate() {
                seen[*i] += 1;
                let done = (n + 1) as f64;
                let m = weights.len() as f64;
                for (j, w) in weights.iter().enumerate() {
                    let wj = f64::from(u32::from(*w) / g);
                    let share = done * wj / f64::from(total);
                    let bound = 1.0 + wj / f64::from(total) * m + 1e-9;
                    prop_assert!((f64::from(seen[j]) - share).abs() <= bound,
                        "prefix {} backend {}: {} slots, share {}", n + 1, j, seen[j], share);
                }
            }
            for (j, w) in weights.iter().enumerate() {
                prop_assert_eq!(seen[j], u32::from(*w) / g);
            }
        }

        /// The cap always holds and every live backend keeps at least one slot.
        #[test]
        fn layout_respects_the_cap(weights in prop::collection::vec(0u16..=u16::MAX, 1..40)) {
            let l = weighted_layout(&weights, Scheduler::Random);
            prop_assert!(l.slots.len() <= MAX_WEIGHTED_SLOTS);
            for (j, w) in weights.iter().enumerate() {
                prop_assert_eq!(*w != 0, l.slots.contains(&j));
            }
        }

        #[test]
        fn weights_round_trip(entries in prop::collection::btree_map(any::<u32>(), any::<u16>(), 0..20)) {
            let text: Vec<String> = entries.iter()
                .map(|(a, w)| format!("{}={w}", std::net::Ipv4Addr::from(*a))).collect();
            let parsed = parse_weights(&text.join(","));
            prop_assert!(parsed.bad.is_empty());
            for (a, w) in &entries {
                prop_assert_eq!(parsed.of(&IpAddr::V4((*a).into())), *w);
            }
        }
    }
}
