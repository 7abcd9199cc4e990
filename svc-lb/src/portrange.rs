//! The SNAT source-port range of the external path (flows to backends on other nodes):
//! `--snat-port-range`, or derived from the node's `net.ipv4.ip_local_port_range` and
//! the node port range so that a SNAT flow never takes a port the node's own sockets
//! pick or a node port a client connects to.
use std::{fmt, str::FromStr};

use anyhow::{Context, Result, bail};

/// Where the node's ephemeral range is read (per network namespace).
pub const LOCAL_PORT_RANGE_PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// The kernel's default `ip_local_port_range`, assumed when it cannot be read.
pub const KERNEL_EPHEMERAL: PortRange = PortRange {
    min: svc_lb_common::EPHEMERAL_PORT_MIN,
    max: svc_lb_common::EPHEMERAL_PORT_MAX,
};
/// Kubernetes' default `--service-node-port-range`.
pub const DEFAULT_NODE_PORTS: &str = "30000-32767";
/// A derived range must hold at least this many ports (concurrent SNAT flows per
/// backend): fewer, and the agent asks for `--snat-port-range` instead.
pub const MIN_DERIVED_PORTS: u32 = 1024;
/// Ports below this are never derived (privileged, well-known services).
const FIRST_PORT: u16 = 1024;

/// An inclusive port range, `MIN-MAX` on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    /// How many ports it holds (never 0: MIN <= MAX).
    pub fn ports(&self) -> u32 {
        u32::from(self.max) - u32::from(self.min) + 1
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.min <= other.max && other.min <= self.max
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `MIN-MAX` (a flag), or `MIN MAX` separated by blanks (the sysctl file).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let s = s.trim();
        let (a, b) = s
            .split_once('-')
            .or_else(|| s.split_once(char::is_whitespace))
            .ok_or_else(|| format!("port range {s:?}: expected MIN-MAX"))?;
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|e| format!("port range {s:?}: {:?} is not a port: {e}", p.trim()))
        };
        let (min, max) = (port(a)?, port(b)?);
        if min == 0 || min > max {
            return Err(format!(
                "port range {s:?}: expected 1 <= MIN <= MAX <= 65535"
            ));
        }
        Ok(PortRange { min, max })
    }
}

/// The node's `ip_local_port_range` (the ports its own connections pick).
pub fn read_local_port_range() -> Result<PortRange> {
    let text = std::fs::read_to_string(LOCAL_PORT_RANGE_PATH)
        .with_context(|| format!("read {LOCAL_PORT_RANGE_PATH}"))?;
    text.parse::<PortRange>()
        .map_err(|e| anyhow::anyhow!("{LOCAL_PORT_RANGE_PATH}: {e}"))
}

/// The SNAT range and what the operator should know about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen {
    pub range: PortRange,
    /// Set when `--snat-port-range` overlaps the ephemeral range: the node's own
    /// connections to a backend may then collide with a SNAT flow's port.
    pub warning: Option<String>,
}

/// The SNAT range: `explicit` (`--snat-port-range`) if given, which must stay clear of
/// the node ports; otherwise the largest block (of at least [`MIN_DERIVED_PORTS`] ports;
/// the higher one of two of the same size) in 1024-65535 outside both the ephemeral range
/// and the node ports (1024-29999 with the kernel's defaults). The largest, because the
/// range bounds the rate of new SNATed flows to one backend: a closed flow keeps its port
/// for `CT_TCP_CLOSE_TIMEOUT_S` (10 s), so 61000-65535 (4 536 ports) held only about 450
/// new connections per second per backend, and the bench's NodePort load ran out of
/// ports within a second.
pub fn choose(
    explicit: Option<PortRange>,
    ephemeral: PortRange,
    node_ports: PortRange,
) -> Result<Chosen> {
    if let Some(r) = explicit {
        if r.overlaps(&node_ports) {
            bail!(
                "--snat-port-range {r} overlaps the node port range {node_ports}: a SNAT flow could take a port clients connect to (choose ports outside it, or set --service-node-port-range)"
            );
        }
        let warning = r.overlaps(&ephemeral).then(|| {
            format!(
                "--snat-port-range {r} overlaps the node's ip_local_port_range {ephemeral}: a connection of the node itself to a backend may collide with a SNAT flow"
            )
        });
        return Ok(Chosen { range: r, warning });
    }
    let mut best: Option<PortRange> = None;
    let mut start: Option<u16> = None;
    for p in FIRST_PORT..=u16::MAX {
        let free = !(ephemeral.min..=ephemeral.max).contains(&p)
            && !(node_ports.min..=node_ports.max).contains(&p);
        match (free, start) {
            (true, None) => start = Some(p),
            (false, Some(s)) => {
                keep_largest(&mut best, PortRange { min: s, max: p - 1 });
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        keep_largest(
            &mut best,
            PortRange {
                min: s,
                max: u16::MAX,
            },
        );
    }
    match best {
        Some(range) => Ok(Chosen {
            range,
            warning: None,
        }),
        None => bail!(
            "no block of {MIN_DERIVED_PORTS} ports in {FIRST_PORT}-65535 lies outside the node's ip_local_port_range {ephemeral} and the node port range {node_ports}: set --snat-port-range"
        ),
    }
}

/// Blocks come in ascending order: a later one replaces an earlier one that is not larger.
fn keep_largest(best: &mut Option<PortRange>, block: PortRange) {
    if block.ports() >= MIN_DERIVED_PORTS && best.is_none_or(|b| block.ports() >= b.ports()) {
        *best = Some(block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> PortRange {
        s.parse().unwrap()
    }

    #[test]
    fn parses_flags_and_the_sysctl_file() {
        assert_eq!(
            r("61000-65535"),
            PortRange {
                min: 61000,
                max: 65535
            }
        );
        assert_eq!(
            r("32768\t60999\n"),
            PortRange {
                min: 32768,
                max: 60999
            }
        );
        assert_eq!(r("80-80").ports(), 1);
        for bad in ["", "100", "0-10", "10-5", "1-65536", "a-b", "1-2-3"] {
            let e = bad.parse::<PortRange>().unwrap_err();
            assert!(e.contains("port range"), "{bad}: {e}");
        }
    }

    #[test]
    fn derives_the_largest_block_outside_the_kernel_defaults() {
        // 1024-29999 (28 976 ports) beats 61000-65535 (4 536).
        let c = choose(None, KERNEL_EPHEMERAL, r(DEFAULT_NODE_PORTS)).unwrap();
        assert_eq!(c.range, r("1024-29999"));
        assert_eq!(c.warning, None);
    }

    #[test]
    fn derives_from_the_nodes_own_ranges() {
        // A wider ephemeral range: the block above it is too small, the one below wins.
        let c = choose(None, r("15000-65000"), r(DEFAULT_NODE_PORTS)).unwrap();
        assert_eq!(c.range, r("1024-14999"));
        // Node ports moved above the ephemeral range: they are left out, and the block
        // below the ephemeral range is the largest.
        let c = choose(None, KERNEL_EPHEMERAL, r("61000-62999")).unwrap();
        assert_eq!(c.range, r("1024-32767"));
        // Ephemeral and node ports leaving two blocks of one size: the higher one.
        let c = choose(None, r("2048-33791"), r("33792-64511")).unwrap();
        assert_eq!(c.range, r("64512-65535"));
        let c = choose(None, r("11024-40000"), r("40001-55535")).unwrap();
        assert_eq!(c.range, r("55536-65535"));
        // Ephemeral ports low: the block between them and the node ports.
        let c = choose(None, r("1024-9999"), r(DEFAULT_NODE_PORTS)).unwrap();
        assert_eq!(c.range, r("32768-65535"));
    }

    #[test]
    fn refuses_when_nothing_is_left() {
        let e = choose(None, r("1024-65535"), r(DEFAULT_NODE_PORTS)).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("1024-65535") && msg.contains("--snat-port-range"),
            "{msg}"
        );
    }

    #[test]
    fn explicit_range_must_avoid_node_ports_and_warns_on_ephemeral_ones() {
        let e = choose(
            Some(r("30000-40000")),
            KERNEL_EPHEMERAL,
            r(DEFAULT_NODE_PORTS),
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("node port range 30000-32767"),
            "{e:#}"
        );
        let c = choose(
            Some(r("40000-41000")),
            KERNEL_EPHEMERAL,
            r(DEFAULT_NODE_PORTS),
        )
        .unwrap();
        assert_eq!(c.range, r("40000-41000"));
        assert!(
            c.warning
                .unwrap()
                .contains("ip_local_port_range 32768-60999")
        );
        let c = choose(
            Some(r("20000-29999")),
            KERNEL_EPHEMERAL,
            r(DEFAULT_NODE_PORTS),
        )
        .unwrap();
        assert_eq!(c.warning, None);
    }
}
