//! Refcount table entries and refcounts inside refcount blocks, for every refcount_order.
//!
//! Byte tables: `docs/FORMAT.md`, "Refcount table entry" and "Refcount block". Widths of
//! 8 to 64 bits are big-endian; 1-, 2- and 4-bit refcounts are packed least significant bits
//! first within each byte, as QEMU's `get_refcount_ro0` .. `get_refcount_ro2` read them.

use byteorder::{BigEndian, ByteOrder};

use super::bytes::{be_u64, put_u64, slice, to_u64, to_usize, truncated};
use super::corruption::{invalid_input, Corruption, InvalidValue, RefcountEntryProblem};
use super::header::{check_cluster_bits, MAX_REFCOUNT_ORDER};

/// Bytes per refcount table entry.
pub const REFTABLE_ENTRY_LEN: usize = 8;
/// Bits 9-63: the refcount block offset (`REFT_OFFSET_MASK`).
pub const REFTABLE_OFFSET_MASK: u64 = 0xFFFF_FFFF_FFFF_FE00;
/// Bits 0-8: reserved, must be zero (`REFT_RESERVED_MASK`).
pub const REFTABLE_RESERVED_MASK: u64 = 0x1FF;

fn check_order(refcount_order: u32) -> Result<u32, InvalidValue> {
    if refcount_order > MAX_REFCOUNT_ORDER {
        Err(invalid_input!("refcount_order {refcount_order} exceeds 6"))
    } else {
        Ok(refcount_order)
    }
}

/// Width of one refcount in bits: `1 << refcount_order`.
///
/// # Errors
/// [`InvalidValue`] if refcount_order exceeds 6.
pub fn refcount_bits(refcount_order: u32) -> Result<u32, InvalidValue> {
    Ok(1u32 << check_order(refcount_order)?)
}

/// The largest refcount a block of this order can hold: `2^(1 << order) − 1`.
///
/// # Errors
/// [`InvalidValue`] if refcount_order exceeds 6.
pub fn max_refcount(refcount_order: u32) -> Result<u64, InvalidValue> {
    let bits = refcount_bits(refcount_order)?;
    Ok(u64::MAX >> 64u32.saturating_sub(bits))
}

/// Refcounts per refcount block: `cluster_size · 8 / refcount_bits`
/// (`1 << (cluster_bits + 3 − refcount_order)`).
///
/// # Errors
/// [`InvalidValue`] if cluster_bits is outside 9..=21 or refcount_order exceeds 6.
pub fn entries_per_block(cluster_bits: u32, refcount_order: u32) -> Result<u64, InvalidValue> {
    check_cluster_bits(cluster_bits)
        .map_err(|_| invalid_input!("cluster_bits {cluster_bits} is outside 9..=21"))?;
    let order = check_order(refcount_order)?;
    // cluster_bits >= 9 > 6 >= order, so the shift is in 6..=24.
    Ok(1u64 << cluster_bits.saturating_add(3).saturating_sub(order))
}

/// Where cluster `cluster_index`'s refcount lives: `(refcount table index, index in block)`.
///
/// # Errors
/// As for [`entries_per_block`].
pub fn refcount_location(
    cluster_index: u64,
    cluster_bits: u32,
    refcount_order: u32,
) -> Result<(u64, u64), InvalidValue> {
    let per_block = entries_per_block(cluster_bits, refcount_order)?;
    let shift = per_block.trailing_zeros();
    Ok((
        cluster_index >> shift,
        cluster_index & (per_block.saturating_sub(1)),
    ))
}

/// Byte position and width for refcount `index` at `order`; sub-byte widths share a byte.
struct Slot {
    byte: usize,
    /// For sub-byte widths, the bit shift inside the byte; otherwise 0.
    shift: u32,
    /// Bytes to read for widths of 8 bits and more; 1 for sub-byte widths.
    len: usize,
    sub_byte: bool,
}

fn slot(block_len: usize, refcount_order: u32, index: u64) -> Result<Slot, InvalidValue> {
    let order = check_order(refcount_order)?;
    let bits = 1u64 << order;
    let bit_pos = index
        .checked_mul(bits)
        .ok_or_else(|| invalid_input!("refcount index {index} is out of range"))?;
    let byte = bit_pos >> 3;
    let len = if bits < 8 { 1 } else { bits >> 3 };
    let end = byte.saturating_add(len);
    if end > to_u64(block_len) {
        return Err(invalid_input!(
            "refcount index {index} at order {order} lies beyond a {block_len}-byte block"
        ));
    }
    Ok(Slot {
        byte: to_usize(byte),
        shift: u32::try_from(bit_pos & 7).unwrap_or(0),
        len: to_usize(len),
        sub_byte: bits < 8,
    })
}

/// Reads refcount `index` from a refcount block of the given order.
///
/// # Errors
/// [`InvalidValue`] if refcount_order exceeds 6 or the refcount lies beyond `block`.
pub fn get_refcount(block: &[u8], refcount_order: u32, index: u64) -> Result<u64, InvalidValue> {
    let s = slot(block.len(), refcount_order, index)?;
    let field = slice(block, s.byte, s.len)
        .ok_or_else(|| invalid_input!("refcount index {index} lies beyond the block"))?;
    let max = max_refcount(refcount_order)?;
    Ok(match field {
        [b] if s.sub_byte => (u64::from(*b) >> s.shift) & max,
        [b] => u64::from(*b),
        [_, _] => u64::from(BigEndian::read_u16(field)),
        [_, _, _, _] => u64::from(BigEndian::read_u32(field)),
        _ => BigEndian::read_u64(field),
    })
}

/// Writes `value` as refcount `index` into a refcount block of the given order, leaving
/// every other refcount untouched.
///
/// # Errors
/// [`InvalidValue`] if refcount_order exceeds 6, the refcount lies beyond `block`, or
/// `value` exceeds [`max_refcount`].
pub fn set_refcount(
    block: &mut [u8],
    refcount_order: u32,
    index: u64,
    value: u64,
) -> Result<(), InvalidValue> {
    let max = max_refcount(refcount_order)?;
    if value > max {
        return Err(invalid_input!(
            "refcount {value} exceeds {max}, the maximum at refcount_order {refcount_order}"
        ));
    }
    let s = slot(block.len(), refcount_order, index)?;
    let end = s.byte.saturating_add(s.len);
    let field = block
        .get_mut(s.byte..end)
        .ok_or_else(|| invalid_input!("refcount index {index} lies beyond the block"))?;
    match field {
        [b] if s.sub_byte => {
            // value <= max < 2^4 here, so both shifted values fit in a byte.
            let mask = u8::try_from(max << s.shift).unwrap_or(0);
            let bits = u8::try_from(value << s.shift).unwrap_or(0);
            *b = (*b & !mask) | bits;
        }
        [b] => *b = u8::try_from(value).unwrap_or(u8::MAX),
        [_, _] => BigEndian::write_u16(field, u16::try_from(value).unwrap_or(u16::MAX)),
        [_, _, _, _] => BigEndian::write_u32(field, u32::try_from(value).unwrap_or(u32::MAX)),
        _ => BigEndian::write_u64(field, value),
    }
    Ok(())
}

/// Decodes one refcount table entry: `None` for "no refcount block" (all refcounts 0),
/// otherwise the block's offset.
///
/// # Errors
/// [`Corruption::RefcountTableEntry`] with [`RefcountEntryProblem::ReservedBits`] or
/// [`RefcountEntryProblem::Unaligned`], as `qemu-img check` reports them.
pub fn decode_reftable_entry(
    raw: u64,
    index: u64,
    cluster_size: u64,
) -> Result<Option<u64>, Corruption> {
    let bad = |reason| Corruption::RefcountTableEntry { index, raw, reason };
    if raw & REFTABLE_RESERVED_MASK != 0 {
        return Err(bad(RefcountEntryProblem::ReservedBits));
    }
    let offset = raw & REFTABLE_OFFSET_MASK;
    if offset == 0 {
        return Ok(None);
    }
    if cluster_size == 0 || !offset.is_multiple_of(cluster_size) {
        return Err(bad(RefcountEntryProblem::Unaligned));
    }
    Ok(Some(offset))
}

/// Decodes a whole refcount table (every full 8-byte entry of `bytes`).
///
/// # Errors
/// [`Corruption::ClusterBits`] for a bad cluster size, [`Corruption::Truncated`] if the
/// length is not a multiple of 8, or the first bad entry as in [`decode_reftable_entry`].
pub fn decode_reftable(bytes: &[u8], cluster_bits: u32) -> Result<Vec<Option<u64>>, Corruption> {
    let cluster_size = check_cluster_bits(cluster_bits)?;
    if !bytes.len().is_multiple_of(REFTABLE_ENTRY_LEN) {
        let len = to_u64(bytes.len());
        return Err(truncated(
            "refcount table",
            0,
            (len | 7).saturating_add(1),
            len,
        ));
    }
    bytes
        .chunks_exact(REFTABLE_ENTRY_LEN)
        .enumerate()
        .map(|(i, c)| decode_reftable_entry(be_u64(c, 0).unwrap_or(0), to_u64(i), cluster_size))
        .collect()
}

/// Encodes a refcount table; `None` becomes 0.
///
/// # Errors
/// [`InvalidValue`] for a bad cluster size or an offset that is 0 or not
/// cluster-aligned.
pub fn encode_reftable(
    entries: &[Option<u64>],
    cluster_bits: u32,
) -> Result<Vec<u8>, InvalidValue> {
    let cluster_size = check_cluster_bits(cluster_bits)
        .map_err(|_| invalid_input!("cluster_bits {cluster_bits} is outside 9..=21"))?;
    let mut out = Vec::with_capacity(entries.len().saturating_mul(REFTABLE_ENTRY_LEN));
    for (i, e) in entries.iter().enumerate() {
        let raw = match *e {
            None => 0,
            Some(offset) if offset != 0 && offset.is_multiple_of(cluster_size) => offset,
            Some(offset) => {
                return Err(invalid_input!(
                    "refcount table entry {i}: block offset {offset:#x} is not a non-zero \
                     cluster-aligned offset"
                ))
            }
        };
        put_u64(&mut out, raw);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_and_maxima() {
        let maxima = [1, 3, 15, 255, 65535, u32::MAX as u64, u64::MAX];
        for (order, max) in maxima.iter().enumerate() {
            assert_eq!(max_refcount(order as u32).unwrap(), *max);
            assert_eq!(refcount_bits(order as u32).unwrap(), 1 << order);
        }
        assert!(matches!(max_refcount(7), Err(InvalidValue(_))));
    }

    #[test]
    fn entries_per_block_matches_qemu() {
        assert_eq!(entries_per_block(16, 4).unwrap(), 32768);
        assert_eq!(entries_per_block(16, 0).unwrap(), 524288);
        assert_eq!(entries_per_block(16, 6).unwrap(), 8192);
        assert_eq!(entries_per_block(9, 6).unwrap(), 64);
        assert_eq!(entries_per_block(21, 0).unwrap(), 1 << 24);
        assert!(entries_per_block(8, 4).is_err());
        assert!(entries_per_block(16, 7).is_err());
        assert_eq!(refcount_location(32769, 16, 4).unwrap(), (1, 1));
    }

    #[test]
    fn round_trip_every_order() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let n = entries_per_block(9, order).unwrap();
            let max = max_refcount(order).unwrap();
            for i in 0..n {
                set_refcount(&mut block, order, i, (i * 7 + 1) & max).unwrap();
            }
            for i in 0..n {
                assert_eq!(get_refcount(&block, order, i).unwrap(), (i * 7 + 1) & max);
            }
            assert!(get_refcount(&block, order, n).is_err());
            assert!(set_refcount(&mut block, order, n, 0).is_err());
        }
    }

    #[test]
    fn one_bit_refcounts_pack_lsb_first() {
        // Clusters 0-3 and 6-10 in use give bytes cf 07 (`docs/FORMAT.md`, refcount blocks).
        let mut block = vec![0u8; 2];
        for c in [0, 1, 2, 3, 6, 7, 8, 9, 10] {
            set_refcount(&mut block, 0, c, 1).unwrap();
        }
        assert_eq!(block, [0xcf, 0x07]);
    }

    #[test]
    fn sub_byte_layouts() {
        let mut b = vec![0u8; 1];
        set_refcount(&mut b, 1, 1, 3).unwrap();
        assert_eq!(b, [0b0000_1100]);
        set_refcount(&mut b, 1, 3, 2).unwrap();
        assert_eq!(b, [0b1000_1100]);
        let mut b = vec![0u8; 1];
        set_refcount(&mut b, 2, 1, 0xA).unwrap();
        set_refcount(&mut b, 2, 0, 0x5).unwrap();
        assert_eq!(b, [0xA5]);
        set_refcount(&mut b, 2, 1, 0).unwrap();
        assert_eq!(b, [0x05]);
    }

    #[test]
    fn wide_refcounts_are_big_endian() {
        let mut b = vec![0u8; 16];
        set_refcount(&mut b, 4, 1, 0x0102).unwrap();
        assert_eq!(&b[2..4], &[1, 2]);
        set_refcount(&mut b, 5, 1, 0x0A0B_0C0D).unwrap();
        assert_eq!(&b[4..8], &[0xA, 0xB, 0xC, 0xD]);
        set_refcount(&mut b, 6, 1, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_be_bytes());
    }

    #[test]
    fn set_rejects_values_above_max() {
        let mut b = vec![0u8; 8];
        for order in 0..=5u32 {
            let max = max_refcount(order).unwrap();
            assert!(set_refcount(&mut b, order, 0, max).is_ok());
            assert!(matches!(
                set_refcount(&mut b, order, 0, max + 1),
                Err(InvalidValue(_))
            ));
        }
    }

    #[test]
    fn reftable_round_trip() {
        let t = vec![Some(0x20000), None, Some(0x7FFF_0000)];
        let bytes = encode_reftable(&t, 16).unwrap();
        assert_eq!(bytes.len(), 3 * REFTABLE_ENTRY_LEN);
        assert_eq!(decode_reftable(&bytes, 16).unwrap(), t);
    }

    #[test]
    fn reftable_rejects_reserved_bits() {
        let bytes = (0x20000u64 | 0x100).to_be_bytes();
        assert_eq!(
            decode_reftable(&bytes, 16),
            Err(Corruption::RefcountTableEntry {
                index: 0,
                raw: 0x20100,
                reason: RefcountEntryProblem::ReservedBits
            })
        );
    }

    #[test]
    fn reftable_rejects_unaligned_block() {
        let mut bytes = vec![0; 8];
        bytes.extend_from_slice(&0x20200u64.to_be_bytes());
        assert_eq!(
            decode_reftable(&bytes, 16),
            Err(Corruption::RefcountTableEntry {
                index: 1,
                raw: 0x20200,
                reason: RefcountEntryProblem::Unaligned
            })
        );
    }

    #[test]
    fn reftable_rejects_partial_entry() {
        assert!(matches!(
            decode_reftable(&[0; 12], 16),
            Err(Corruption::Truncated {
                needed: 16,
                available: 12,
                ..
            })
        ));
    }

    #[test]
    fn encode_reftable_rejects_bad_offsets() {
        assert!(encode_reftable(&[Some(0)], 16).is_err());
        assert!(encode_reftable(&[Some(0x200)], 16).is_err());
    }
}
