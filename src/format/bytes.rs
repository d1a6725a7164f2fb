//! Bounds-checked big-endian field access shared by the codecs.
//!
//! Every read goes through `slice`, which returns `None` instead of panicking when the
//! field does not fit, and hands `byteorder` a slice of exactly the field's width.
//! Every write appends to a `Vec` from a fixed-size array, so it cannot go out of bounds.

use byteorder::{BigEndian, ByteOrder};

use super::corruption::Corruption;

/// `bytes[at..at + len]`, or `None` if that range is not inside `bytes`.
pub(crate) fn slice(bytes: &[u8], at: usize, len: usize) -> Option<&[u8]> {
    bytes.get(at..at.checked_add(len)?)
}

/// The byte at `at`.
pub(crate) fn be_u8(bytes: &[u8], at: usize) -> Option<u8> {
    bytes.get(at).copied()
}

/// The big-endian u16 at `at`.
pub(crate) fn be_u16(bytes: &[u8], at: usize) -> Option<u16> {
    slice(bytes, at, 2).map(BigEndian::read_u16)
}

/// The big-endian u32 at `at`.
pub(crate) fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    slice(bytes, at, 4).map(BigEndian::read_u32)
}

/// The big-endian u64 at `at`.
pub(crate) fn be_u64(bytes: &[u8], at: usize) -> Option<u64> {
    slice(bytes, at, 8).map(BigEndian::read_u64)
}

/// Appends `v` big-endian.
pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    let mut b = [0u8; 2];
    BigEndian::write_u16(&mut b, v);
    out.extend_from_slice(&b);
}

/// Appends `v` big-endian.
pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    let mut b = [0u8; 4];
    BigEndian::write_u32(&mut b, v);
    out.extend_from_slice(&b);
}

/// Appends `v` big-endian.
pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    let mut b = [0u8; 8];
    BigEndian::write_u64(&mut b, v);
    out.extend_from_slice(&b);
}

/// Appends zero bytes until `out.len()` is a multiple of 8.
pub(crate) fn pad8(out: &mut Vec<u8>) {
    let rem = out.len() % 8;
    if rem != 0 {
        out.resize(out.len().saturating_add(8usize.saturating_sub(rem)), 0);
    }
}

/// `x` rounded up to a multiple of 8, or `None` on overflow.
pub(crate) fn round_up8(x: u64) -> Option<u64> {
    x.checked_add(7).map(|v| v & !7)
}

/// Widens a `usize` (at most 64 bits on every supported target) to `u64`.
pub(crate) fn to_u64(x: usize) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

/// Narrows a `u64` to `usize`, saturating on 32-bit targets so later bounds checks fail.
pub(crate) fn to_usize(x: u64) -> usize {
    usize::try_from(x).unwrap_or(usize::MAX)
}

/// A [`Corruption::Truncated`] for a structure at `offset` that needed `needed` bytes.
pub(crate) fn truncated(
    what: &'static str,
    offset: u64,
    needed: u64,
    available: u64,
) -> Corruption {
    Corruption::Truncated {
        what,
        offset,
        needed,
        available,
    }
}
