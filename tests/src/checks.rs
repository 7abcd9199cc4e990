//! Checks on client reports and reference computations shared by the end-to-end tests.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{Result, ensure};

use crate::report::ClientReport;

/// Every attempt answered.
pub fn all_ok(r: &ClientReport, n: u64) -> Result<()> {
    ensure!(
        r.attempts == n && r.ok == n && r.failed == 0,
        "expected {n} answers and 0 failures: {}\nfirst failures: {:?}",
        r.summary(),
        r.failure_samples
    );
    Ok(())
}

/// Exactly these backends answered (each at least once).
pub fn backends_are(r: &ClientReport, ids: &[&str]) -> Result<()> {
    let got: BTreeSet<&str> = r.backends.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = ids.iter().copied().collect();
    ensure!(
        got == want,
        "replies from {got:?}, expected {want:?}: {}",
        r.summary()
    );
    Ok(())
}

/// Every attempt failed with `errno` (at `step`, when given).
pub fn all_failed(r: &ClientReport, n: u64, errno: &str) -> Result<()> {
    ensure!(
        r.attempts == n && r.ok == 0 && r.failures == BTreeMap::from([(errno.to_owned(), n)]),
        "expected all {n} attempts to fail with {errno}: {}\nfailures: {:?}",
        r.summary(),
        r.failure_samples
    );
    Ok(())
}

/// An address as the BPF maps hold it: network-order words, IPv4 in word 0.
pub fn addr_words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// Maglev's table population (Eisenbud et al., NSDI 2016, "Pseudo-code 1") for
/// `backends` in the given order: index into `backends` per slot.
pub fn maglev_table(backends: &[IpAddr], port: u16, proto: u8, m: u32) -> Vec<usize> {
    if backends.is_empty() {
        return vec![0; m as usize];
    }
    let perms: Vec<(u32, u32)> = backends
        .iter()
        .map(|b| svc_lb_common::maglev::permutation(&addr_words(*b), port.to_be(), proto, m))
        .collect();
    let mut next = vec![0u32; backends.len()];
    let mut table: Vec<Option<usize>> = vec![None; m as usize];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut c = ((u64::from(*offset) + u64::from(next[i]) * u64::from(*skip))
                % u64::from(m)) as usize;
            while table[c].is_some() {
                next[i] += 1;
                c = ((u64::from(*offset) + u64::from(next[i]) * u64::from(*skip)) % u64::from(m))
                    as usize;
            }
            table[c] = Some(i);
            next[i] += 1;
            filled += 1;
            if filled == m as usize {
                break 'fill;
            }
        }
    }
    table.into_iter().map(|s| s.unwrap_or(0)).collect()
}

/// Milliseconds since the Unix epoch, as the harness stamps its timelines.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch (the start of a `--timeline` attempt).
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
