//! Instructions that verifiers before 5.12 refuse before they look at any path.
//!
//! The `.rodata` switches of `svc-lb-ebpf/src/compat.rs` let a program carry code for a
//! newer kernel in a branch the verifier removes: that works for helper calls, which the
//! verifier resolves on the paths it walks. An atomic with BPF_FETCH (the `rr`/`wrr`
//! cursor, 5.12) is different: 5.10's verifier checks the encoding of every instruction
//! up front (`BPF_STX uses reserved fields`), dead or not, so the object does not load at
//! all. Seen on Debian's 5.10 in a guest of `cargo xtask kernels`.
//!
//! With `atomic_fetch` off the agent therefore loads a copy of the object in which each
//! such atomic is a plain load of the same width from the same address into the same
//! register. That code sits only behind `SVCLB_ATOMIC_FETCH` = 0, which the verifier
//! never walks; the rewrite only makes the encoding acceptable.

use anyhow::{Result, bail};

/// `BPF_STX | BPF_ATOMIC` with a 32- and a 64-bit operand.
const ATOMIC_W: u8 = 0xc3;
const ATOMIC_DW: u8 = 0xdb;
/// `BPF_LDX | BPF_MEM` of the same widths.
const LDX_W: u8 = 0x61;
const LDX_DW: u8 = 0x79;
/// Section flag of code.
const SHF_EXECINSTR: u64 = 0x4;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The object with every atomic except the plain add (BPF_XADD, the only one before
/// 5.12: immediate 0) rewritten as described above, and how many were rewritten.
pub fn without_fetch_atomics(object: &[u8]) -> Result<(Vec<u8>, usize)> {
    // ELF64, little endian (the BPF target of this build).
    if object.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        bail!("the eBPF object is not a little-endian ELF64 file");
    }
    let header = || -> Option<(usize, usize, usize)> {
        let shoff = usize::try_from(u64_at(object, 0x28)?).ok()?;
        Some((
            shoff,
            usize::from(u16_at(object, 0x3a)?),
            usize::from(u16_at(object, 0x3c)?),
        ))
    };
    let Some((shoff, shentsize, shnum)) = header() else {
        bail!("the eBPF object's ELF header is cut short");
    };
    let mut out = object.to_vec();
    let mut rewritten = 0;
    for i in 0..shnum {
        let Some(sh) = i.checked_mul(shentsize).and_then(|o| o.checked_add(shoff)) else {
            bail!("section header {i} of the eBPF object lies past any address");
        };
        let section = || -> Option<(u64, usize, usize)> {
            Some((
                u64_at(object, sh + 0x08)?,
                usize::try_from(u64_at(object, sh + 0x18)?).ok()?,
                usize::try_from(u64_at(object, sh + 0x20)?).ok()?,
            ))
        };
        let Some((flags, offset, size)) = section() else {
            bail!("section header {i} of the eBPF object is cut short");
        };
        if flags & SHF_EXECINSTR == 0 {
            continue;
        }
        let Some(code) = offset
            .checked_add(size)
            .and_then(|end| out.get_mut(offset..end))
        else {
            bail!("section {i} of the eBPF object runs past its end");
        };
        for insn in code.chunks_exact_mut(8) {
            let ldx = match insn[0] {
                ATOMIC_W => LDX_W,
                ATOMIC_DW => LDX_DW,
                _ => continue,
            };
            if insn[4..8] == [0, 0, 0, 0] {
                continue;
            }
            // regs: dst (the address) in the low nibble, src (the operand, which a
            // fetch overwrites) in the high one; the load swaps them.
            let (dst, src) = (insn[1] & 0x0f, insn[1] >> 4);
            insn[0] = ldx;
            insn[1] = (dst << 4) | src;
            insn[4..8].fill(0);
            rewritten += 1;
        }
    }
    Ok((out, rewritten))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code section of the agent's real object: after the rewrite no atomic but
    /// the plain add is left, something was rewritten (the `rr` cursor), and nothing
    /// else changed.
    #[test]
    fn the_real_object_loses_its_fetch_atomics_and_nothing_else() {
        let obj = crate::datapath::load::OBJECT;
        let (patched, n) = without_fetch_atomics(obj).unwrap();
        assert!(n >= 1, "the rr cursor's fetch-add was not found");
        assert_eq!(patched.len(), obj.len());
        let changed: Vec<usize> = (0..obj.len() / 8)
            .filter(|i| obj[i * 8..i * 8 + 8] != patched[i * 8..i * 8 + 8])
            .collect();
        assert_eq!(changed.len(), n);
        for i in changed {
            let (old, new) = (&obj[i * 8..i * 8 + 8], &patched[i * 8..i * 8 + 8]);
            assert!(matches!(old[0], ATOMIC_W | ATOMIC_DW) && old[4..8] != [0; 4]);
            assert!(matches!(new[0], LDX_W | LDX_DW));
            assert_eq!(new[1], old[1].rotate_right(4));
            assert_eq!(new[2..4], old[2..4], "the offset is kept");
        }
        let (again, more) = without_fetch_atomics(&patched).unwrap();
        assert_eq!((again, more), (patched, 0));
    }

    #[test]
    fn a_file_that_is_not_elf64_is_refused() {
        assert!(without_fetch_atomics(b"not an elf").is_err());
        let mut cut = crate::datapath::load::OBJECT[..0x30].to_vec();
        cut[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(without_fetch_atomics(&cut).is_err());
    }
}
