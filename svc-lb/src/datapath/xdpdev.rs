//! Where the XDP program may answer a reject itself (XDP_TX) and where it leaves the
//! packet to tc (`LB_XDPDEV_V1`, `--xdp-reject`).
//!
//! XDP_TX sends the frame back out the device it came in on. On a veth that means
//! handing it to the peer device, which drops it unless the peer runs an XDP program
//! (or GRO) itself: the sender then never sees the ICMP error and its connect() times
//! out instead of failing with ECONNREFUSED. Nothing on this node decides what the peer
//! runs (it is often in another namespace, or another container's), so a veth answers
//! through tc, which sends the reject as an skb and never loses it.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use svc_lb_common::XDP_DEV_TX_OK;
use tracing::{debug, info};

/// `--xdp-reject`: who answers a Service without endpoints on an XDP device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum XdpReject {
    /// XDP_TX, except on drivers where it cannot be trusted (veth): tc there.
    #[default]
    Auto,
    /// XDP_TX on every device (for a veth whose peer runs XDP).
    Tx,
    /// tc on every device.
    Tc,
}

/// Drivers whose XDP_TX frames may be dropped by whatever is on the other side.
const UNTRUSTED_TX: &[&str] = &["veth"];

/// The `LB_XDPDEV_V1` flags of a device with driver `driver` (`None`: unknown).
pub fn flags(mode: XdpReject, driver: Option<&str>) -> u32 {
    let tx = match mode {
        XdpReject::Tx => true,
        XdpReject::Tc => false,
        // A physical device's driver always answers ETHTOOL_GDRVINFO, so an unknown
        // one is a virtual device: tc, like the program's default for an unmarked one.
        XdpReject::Auto => driver.is_some_and(|d| !UNTRUSTED_TX.contains(&d)),
    };
    if tx { XDP_DEV_TX_OK } else { 0 }
}

/// The `LB_XDPDEV_V1` entries (ifindex, flags) of `devices`, each choice logged once.
pub fn entries(devices: &[String], mode: XdpReject) -> Result<Vec<(u32, u32)>> {
    let mut out = Vec::new();
    for dev in devices {
        let ifindex = nix::net::if_::if_nametoindex(dev.as_str())
            .with_context(|| format!("device {dev} (see --devices)"))?;
        let driver = match driver(dev) {
            Ok(d) => Some(d),
            Err(e) => {
                debug!(device = %dev, error = %format!("{e:#}"), "driver unknown");
                None
            }
        };
        let flags = flags(mode, driver.as_deref());
        let by = if flags & XDP_DEV_TX_OK != 0 {
            "xdp"
        } else {
            "tc"
        };
        info!(device = %dev, driver = driver.as_deref().unwrap_or("unknown"), mode = ?mode, rejects_by = by, "XDP device");
        out.push((ifindex, flags));
    }
    Ok(out)
}

/// `SIOCETHTOOL` command that reads the driver's name (linux/ethtool.h).
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// `struct ethtool_drvinfo` (linux/ethtool.h).
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// The driver of device `dev` in this network namespace, as `ethtool -i` shows it
/// (`veth`, `ixgbe`, `virtio_net`...).
pub fn driver(dev: &str) -> Result<String> {
    if dev.len() >= libc::IFNAMSIZ {
        bail!("device name {dev:?} is too long");
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for the SIOCETHTOOL ioctl");
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: both structs are plain integers and arrays (and a pointer union); all
    // zeroes is a valid value.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in dev.bytes().enumerate() {
        req.ifr_name[i] = b as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO writes at most a `DrvInfo` through
    // `ifru_data`, which points at `info` for the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &mut req) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("ETHTOOL_GDRVINFO on device {dev}"));
    }
    let end = info
        .driver
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_rejects_through_tc_unless_forced() {
        assert_eq!(flags(XdpReject::Auto, Some("veth")), 0);
        assert_eq!(flags(XdpReject::Auto, Some("ixgbe")), XDP_DEV_TX_OK);
        assert_eq!(flags(XdpReject::Auto, Some("virtio_net")), XDP_DEV_TX_OK);
        assert_eq!(flags(XdpReject::Auto, None), 0);
        assert_eq!(flags(XdpReject::Tx, Some("veth")), XDP_DEV_TX_OK);
        assert_eq!(flags(XdpReject::Tc, Some("ixgbe")), 0);
    }

    #[test]
    fn driver_errors_name_the_device() {
        let e = format!("{:#}", driver("no-such-dev0").unwrap_err());
        assert!(e.contains("no-such-dev0"), "{e}");
        assert!(driver("a-name-far-too-long-for-linux").is_err());
    }
}
