//! Internet checksum arithmetic (RFC 1071/1624) on values as they sit in memory: a
//! 32-bit word is read natively and split into its two 16-bit halves, which is the same
//! one's-complement sum as reading the bytes in network order, only byte-swapped, and
//! that swap cancels when the result is stored back the same way. The kernel's checksum
//! helpers take differences in exactly this form.

/// Folds a wide one's-complement sum to 16 bits.
#[inline(always)]
pub fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

#[inline(always)]
fn add32(acc: u64, w: u32) -> u64 {
    acc + u64::from(w & 0xffff) + u64::from(w >> 16)
}

/// Checksum difference of replacing the words `old` by `new` (same length).
#[inline(always)]
pub fn diff(old: &[u32], new: &[u32]) -> u32 {
    let mut acc = 0u64;
    let mut i = 0;
    while i < old.len() && i < new.len() {
        acc = add32(acc, !old[i]);
        acc = add32(acc, new[i]);
        i += 1;
    }
    u32::from(fold(acc))
}

/// Difference of replacing a 16-bit field.
#[inline(always)]
pub fn diff16(old: u16, new: u16) -> u32 {
    u32::from(fold(u64::from(!old) + u64::from(new)))
}

/// Adds two differences.
#[inline(always)]
pub fn add(a: u32, b: u32) -> u32 {
    u32::from(fold(u64::from(a) + u64::from(b)))
}

/// A stored checksum after a change with difference `diff` (RFC 1624, eqn. 3).
#[inline(always)]
pub fn apply(old: u16, diff: u32) -> u16 {
    !fold(u64::from(!old) + u64::from(diff))
}

/// Checksum of a byte buffer (even length), plus an initial sum, ready to store.
#[inline(always)]
pub fn of_bytes(buf: &[u8], initial: u64) -> u16 {
    let mut acc = initial;
    let mut i = 0;
    while i + 1 < buf.len() {
        acc += u64::from(u16::from_ne_bytes([buf[i], buf[i + 1]]));
        i += 2;
    }
    !fold(acc)
}

/// One's-complement sum of words as they sit in memory (for pseudo-headers).
#[inline(always)]
pub fn sum_words(words: &[u32]) -> u64 {
    let mut acc = 0u64;
    let mut i = 0;
    while i < words.len() {
        acc = add32(acc, words[i]);
        i += 1;
    }
    acc
}
