//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): the pure parts both sides
//! need. The agent fills a table of `M` backend ids per external frontend from each
//! backend's permutation ([`permutation`]); the tc/XDP programs index it with
//! [`flow_hash`] `% M`. Both hashes depend only on addresses and ports, never on the
//! node-local backend ids, so every node builds the same table for the same backend set
//! and picks the same backend for the same flow (what ECMP in front of nodes needs).

/// 64-bit finalizer of MurmurHash3: a cheap, well-mixing bijection with no table and no
/// loop, so the verifier accepts it and both sides compute it bit for bit.
#[inline(always)]
pub const fn mix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

#[inline(always)]
const fn absorb(h: u64, word: u64) -> u64 {
    mix64(h ^ word.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Hash of a flow for the Maglev lookup: source address and port, destination port and
/// protocol, as the packet carries them (network order). The destination *address* is
/// left out on purpose: a NodePort flow reaches each node at that node's own address,
/// and every node must still pick the same backend for it.
#[inline(always)]
pub fn flow_hash(saddr_be: &[u32; 4], sport_be: u16, dport_be: u16, proto: u8) -> u32 {
    let mut h = 0x53_5643_4c42_u64; // "SVCLB"
    h = absorb(h, u64::from(saddr_be[0]) | (u64::from(saddr_be[1]) << 32));
    h = absorb(h, u64::from(saddr_be[2]) | (u64::from(saddr_be[3]) << 32));
    h = absorb(
        h,
        u64::from(sport_be) | (u64::from(dport_be) << 16) | (u64::from(proto) << 32),
    );
    (h ^ (h >> 32)) as u32
}

/// Maglev's (offset, skip) for a backend identified by its address, port and protocol
/// (network order), for a table of prime size `m` (> 1). `skip` is in `1..m`, so the
/// permutation `(offset + j * skip) % m` visits every slot.
pub fn permutation(addr_be: &[u32; 4], port_be: u16, proto: u8, m: u32) -> (u32, u32) {
    let mut h = 0x6d61_676c_6576u64; // "maglev"
    h = absorb(h, u64::from(addr_be[0]) | (u64::from(addr_be[1]) << 32));
    h = absorb(h, u64::from(addr_be[2]) | (u64::from(addr_be[3]) << 32));
    h = absorb(h, u64::from(port_be) | (u64::from(proto) << 16));
    let h2 = mix64(h ^ 0x0123_4567_89ab_cdef);
    let m = u64::from(m.max(2));
    let offset = (h % m) as u32;
    let skip = (h2 % (m - 1)) as u32 + 1;
    (offset, skip)
}

/// Whether `n` is prime (for validating `--maglev-table-size`).
pub const fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d as u64 * d as u64 <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_size_is_prime() {
        assert!(is_prime(crate::MAGLEV_DEFAULT_SIZE));
        assert!(is_prime(crate::MAGLEV_TABLE_MAX as u32));
        assert!(!is_prime(16_383));
        assert!(!is_prime(1));
    }

    #[test]
    fn skip_is_never_zero_and_offset_in_range() {
        for i in 0..1000u32 {
            let (o, s) = permutation(&[i.to_be(), 0, 0, 0], 8080u16.to_be(), 6, 251);
            assert!(o < 251);
            assert!((1..251).contains(&s));
        }
    }

    #[test]
    fn flow_hash_ignores_nothing_but_the_destination_address() {
        let a = [0x0a00_0001u32.to_be(), 0, 0, 0];
        let base = flow_hash(&a, 1000, 80, 6);
        assert_ne!(base, flow_hash(&a, 1001, 80, 6));
        assert_ne!(base, flow_hash(&a, 1000, 81, 6));
        assert_ne!(base, flow_hash(&a, 1000, 80, 17));
        assert_ne!(
            base,
            flow_hash(&[0x0a00_0002u32.to_be(), 0, 0, 0], 1000, 80, 6)
        );
        assert_eq!(base, flow_hash(&a, 1000, 80, 6));
    }
}
