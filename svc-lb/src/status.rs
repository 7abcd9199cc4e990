//! The agent's own state, published for `svc-lb status` as JSON at `/status` on the
//! metrics address.
//!
//! Why HTTP and not a file: the agent already serves metrics, the endpoint needs no
//! shared directory between a DaemonSet pod and the operator's shell, and a stale file
//! would look like a live agent. When the agent is down, `svc-lb status` says so and
//! still shows the programs and maps from bpffs, which keep working without it.
use std::{
    sync::{Mutex, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// The `/status` document. Field names are a stable format (new fields may be added).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub version: String,
    pub pid: u32,
    /// Unix time, milliseconds.
    pub started_at_ms: u64,
    /// Where the objects come from, e.g. `manifests /etc/svc-lb` or `kubernetes`.
    pub source: String,
    pub bpffs: String,
    pub cgroup: String,
    /// Whether the socket programs are attached (after the first sync).
    pub attached: bool,
    pub syncs: u64,
    pub sync_errors: u64,
    pub last_sync: Option<SyncRecord>,
    /// The last sync that succeeded (the same as `last_sync` unless that failed).
    pub last_success: Option<SyncRecord>,
    /// What the last sync left out and why, one line per object ("OBJECT: reason"): bad
    /// input skipped and Services rejected because a map is full. At most
    /// [`MAX_PROBLEMS`] lines; `problems_total` counts them all.
    #[serde(default)]
    pub problems: Vec<String>,
    #[serde(default)]
    pub problems_total: usize,
    /// The kernel release and what the feature probe found (see `datapath::probe`).
    #[serde(default)]
    pub kernel: String,
    #[serde(default)]
    pub features: Vec<crate::datapath::probe::FeatureStatus>,
    /// How the tc programs attach on this kernel.
    #[serde(default)]
    pub tc_attach: Option<crate::datapath::probe::TcAttach>,
    /// Why the external path is off for this run, when it failed to start.
    #[serde(default)]
    pub external_error: Option<String>,
    /// `--l2-announce`: the addresses this node answers ARP/NDP for ("IP on dev").
    #[serde(default)]
    pub l2_announcing: Vec<String>,
    /// `--l2-announce`: the node that announces each load-balancer address, as this
    /// agent sees it (every agent computes the same from the same live nodes).
    #[serde(default)]
    pub l2_announcers: Vec<L2Announcer>,
    /// LoadBalancer IP allocation, when any IPAddressPool is configured.
    #[serde(default)]
    pub lb: Option<LbStatus>,
    /// `--socket-lb-scope`: which sockets the socket programs translate ("all", "host").
    #[serde(default)]
    pub socket_lb_scope: String,
    /// `--pod-devices` with the per-packet path attached (empty: none).
    #[serde(default)]
    pub pod_devices: Vec<String>,
    /// The pod devices whose attach failed, with the reasons (retried on link events).
    #[serde(default)]
    pub pod_error: Option<String>,
    /// `--pod-devices` discovers the devices (the default with `--socket-lb-scope host`).
    #[serde(default)]
    pub pod_discovery: bool,
    /// `--route-cluster-ips`: the external path translates cluster IPs too.
    #[serde(default)]
    pub route_cluster_ips: bool,
    /// The `lc`/`wlc` scan programs on this node (`datapath::lcdemand::LcState`):
    /// "off", "not_needed", "loading", "loaded" or "refused"; empty from an agent
    /// before they loaded on demand.
    #[serde(default)]
    pub lc_programs: String,
    /// Why the verifier refused them (the first line and the last lines of its log).
    #[serde(default)]
    pub lc_error: Option<String>,
}

/// LoadBalancer IP allocation (see `lbipam`), for `svc-lb status` and `svc-lb list`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LbStatus {
    pub pools: Vec<LbPool>,
    /// Every allocated address, in Service order.
    pub addresses: Vec<LbAddress>,
    pub pending: Vec<LbPending>,
    /// IPAddressPools left out, with the reason.
    #[serde(default)]
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LbPool {
    pub name: String,
    pub size: u128,
    pub used: u128,
    pub free: u128,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LbAddress {
    /// namespace/name
    pub service: String,
    pub ip: String,
    pub pool: String,
}

/// One announced load-balancer address and its node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct L2Announcer {
    pub ip: String,
    /// namespace/name
    pub service: String,
    /// `None`: no live node is eligible (for `externalTrafficPolicy: Local`, none with
    /// a ready endpoint), so no one answers for the address.
    pub node: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LbPending {
    /// namespace/name
    pub service: String,
    pub reason: String,
}

/// Lines of `problems` published at most, to keep `/status` small on a node with many
/// bad objects (the log and the metrics still see every one).
pub const MAX_PROBLEMS: usize = 50;

/// One pass of model → plan → apply.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncRecord {
    /// Unix time the sync finished, milliseconds.
    pub at_ms: u64,
    pub ok: bool,
    /// The error chain when `ok` is false.
    pub error: Option<String>,
    pub duration_us: u64,
    /// Map operations applied (0 when nothing changed).
    pub ops: usize,
    pub frontends: usize,
    pub backends: usize,
    /// Services left out because the maps are full.
    pub rejected: usize,
    /// Objects skipped because they are invalid.
    pub skipped: usize,
}

fn global() -> &'static Mutex<AgentStatus> {
    static STATUS: OnceLock<Mutex<AgentStatus>> = OnceLock::new();
    STATUS.get_or_init(|| {
        Mutex::new(AgentStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            started_at_ms: now_ms(),
            ..Default::default()
        })
    })
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// Changes the published status. A poisoned lock only means a panic elsewhere while
/// updating plain data, which is still worth publishing.
pub fn update(f: impl FnOnce(&mut AgentStatus)) {
    let mut st = global().lock().unwrap_or_else(|p| p.into_inner());
    f(&mut st);
}

pub fn snapshot() -> AgentStatus {
    global().lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Records the outcome of one sync in the status. The agent reports a sync through
/// `metrics::record_sync`, which also counts it: this module depends on neither metrics
/// nor inspect, which both read it.
pub fn record_sync(rec: SyncRecord) {
    update(|st| {
        st.syncs += 1;
        if rec.ok {
            st.last_success = Some(rec.clone());
        } else {
            st.sync_errors += 1;
        }
        st.last_sync = Some(rec);
    });
}

/// `2026-11-26T14:26:27Z` from Unix milliseconds (UTC; no time-zone database needed).
pub fn format_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), after Howard Hinnant's public-domain
    // algorithm description.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `3h2m`, `41s`: a duration for people.
pub fn format_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_703_187_000), "2026-11-26T14:26:27Z");
    }

    #[test]
    fn ages() {
        assert_eq!(format_age(Duration::from_secs(41)), "41s");
        assert_eq!(format_age(Duration::from_secs(3 * 3600 + 125)), "3h2m");
        assert_eq!(format_age(Duration::from_secs(90_000)), "1d1h");
    }
}
