//! Bitmap table entries, and where each bit of bitmap data sits.
//!
//! Byte table: `docs/FORMAT.md`, "Bitmap table entry". Decoding applies QEMU's
//! `check_table_entry` to every entry, as `bitmap_table_load` does.

use super::bytes::{be_u64, put_u64, to_u64, to_usize, truncated};
use super::corruption::{invalid_input, Corruption, InvalidValue, TableEntryProblem};
use super::header::check_cluster_bits;

/// Bytes per bitmap table entry.
pub const TABLE_ENTRY_LEN: usize = 8;
/// Bits 9-55: the data cluster offset.
pub const TABLE_ENTRY_OFFSET_MASK: u64 = 0x00FF_FFFF_FFFF_FE00;
/// Bits 1-8 and 56-63: reserved, must be zero.
pub const TABLE_ENTRY_RESERVED_MASK: u64 = 0xFF00_0000_0000_01FE;
/// Bit 0: with offset 0, the cluster reads as all ones.
pub const TABLE_ENTRY_ALL_ONES: u64 = 1;

/// One bitmap table entry: what one cluster's worth of bitmap data holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// Offset 0, bit 0 clear: every bit in this cluster's range is 0. QEMU writes this for
    /// every cluster without a set bit.
    Zeroes,
    /// Offset 0, bit 0 set: every bit in this cluster's range is 1. QEMU reads it but never
    /// writes it.
    Ones,
    /// The bits are stored in the cluster at this cluster-aligned, non-zero offset.
    Data(u64),
}

impl TableEntry {
    /// Decodes a raw entry for 2^`cluster_bits`-byte clusters (QEMU's `check_table_entry`).
    ///
    /// # Errors
    /// [`TableEntryProblem::ReservedBits`], then with a non-zero offset
    /// [`TableEntryProblem::OnesWithOffset`] or [`TableEntryProblem::Unaligned`].
    pub fn from_raw(raw: u64, cluster_size: u64) -> Result<Self, TableEntryProblem> {
        if raw & TABLE_ENTRY_RESERVED_MASK != 0 {
            return Err(TableEntryProblem::ReservedBits);
        }
        let offset = raw & TABLE_ENTRY_OFFSET_MASK;
        if offset == 0 {
            return Ok(if raw & TABLE_ENTRY_ALL_ONES != 0 {
                Self::Ones
            } else {
                Self::Zeroes
            });
        }
        if raw & TABLE_ENTRY_ALL_ONES != 0 {
            return Err(TableEntryProblem::OnesWithOffset);
        }
        if cluster_size == 0 || !offset.is_multiple_of(cluster_size) {
            return Err(TableEntryProblem::Unaligned);
        }
        Ok(Self::Data(offset))
    }

    /// The raw value (not checked; see [`encode_table`] for the checked path).
    pub fn to_raw(self) -> u64 {
        match self {
            Self::Zeroes => 0,
            Self::Ones => TABLE_ENTRY_ALL_ONES,
            Self::Data(offset) => offset,
        }
    }
}

/// Decodes the first `table_size` entries of `bytes`, checking each one.
///
/// `bytes` may be longer (the table's clusters are usually larger than the table);
/// QEMU reads only `table_size × 8` bytes.
///
/// # Errors
/// [`Corruption::ClusterBits`] for a bad cluster size, [`Corruption::Truncated`] if `bytes`
/// is shorter than `table_size × 8`, [`Corruption::TableEntry`] for the first bad entry.
pub fn decode_table(
    bytes: &[u8],
    table_size: u32,
    cluster_bits: u32,
) -> Result<Vec<TableEntry>, Corruption> {
    let cluster_size = check_cluster_bits(cluster_bits)?;
    let needed = u64::from(table_size).saturating_mul(to_u64(TABLE_ENTRY_LEN));
    if to_u64(bytes.len()) < needed {
        return Err(truncated("bitmap table", 0, needed, to_u64(bytes.len())));
    }
    let mut out = Vec::with_capacity(to_usize(u64::from(table_size)));
    for (index, chunk) in bytes
        .chunks_exact(TABLE_ENTRY_LEN)
        .take(to_usize(u64::from(table_size)))
        .enumerate()
    {
        let raw = be_u64(chunk, 0).unwrap_or(0);
        let entry =
            TableEntry::from_raw(raw, cluster_size).map_err(|reason| Corruption::TableEntry {
                index: to_u64(index),
                raw,
                reason,
            })?;
        out.push(entry);
    }
    Ok(out)
}

/// Encodes `entries` as `entries.len() × 8` big-endian bytes, as QEMU writes them.
///
/// # Errors
/// [`InvalidValue`] for a bad cluster size or a [`TableEntry::Data`] offset that is
/// 0, unaligned, or outside bits 9-55.
pub fn encode_table(entries: &[TableEntry], cluster_bits: u32) -> Result<Vec<u8>, InvalidValue> {
    let cluster_size = check_cluster_bits(cluster_bits)
        .map_err(|_| invalid_input!("cluster_bits {cluster_bits} is outside 9..=21"))?;
    let mut out = Vec::with_capacity(entries.len().saturating_mul(TABLE_ENTRY_LEN));
    for (i, e) in entries.iter().enumerate() {
        if let TableEntry::Data(offset) = *e {
            if offset == 0
                || offset & !TABLE_ENTRY_OFFSET_MASK != 0
                || !offset.is_multiple_of(cluster_size)
            {
                return Err(invalid_input!(
                    "bitmap table entry {i}: data offset {offset:#x} is not a cluster-aligned \
                     non-zero offset below 2^56"
                ));
            }
        }
        put_u64(&mut out, e.to_raw());
    }
    Ok(out)
}

/// Where bit `n` of a bitmap's serialized data sits: `(byte index, mask)`.
///
/// Bit `n` covers guest bytes `[n·g, (n+1)·g)` and is stored in byte `n / 8` at bit
/// position `n % 8`, least significant bit first. This is the one little-endian layout in
/// qcow2: QEMU serializes its `unsigned long` words with `cpu_to_le64`, so the bytes come
/// out in LSB-first order regardless of the host.
pub fn bit_location(n: u64) -> (u64, u8) {
    (n >> 3, 1u8 << (n & 7))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_is_8_bytes_and_round_trips() {
        let entries = [
            TableEntry::Zeroes,
            TableEntry::Ones,
            TableEntry::Data(0x50000),
            TableEntry::Data(0x00FF_FFFF_FFFF_0000),
        ];
        let bytes = encode_table(&entries, 16).unwrap();
        assert_eq!(bytes.len(), entries.len() * TABLE_ENTRY_LEN);
        assert_eq!(
            &bytes[..16],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!(&bytes[16..24], &[0, 0, 0, 0, 0, 5, 0, 0]);
        assert_eq!(decode_table(&bytes, 4, 16).unwrap(), entries);
    }

    #[test]
    fn reads_only_table_size_entries() {
        let mut bytes = encode_table(&[TableEntry::Data(0x50000)], 16).unwrap();
        bytes.extend_from_slice(&[0xFF; 8]); // rest of the table cluster
        assert_eq!(
            decode_table(&bytes, 1, 16).unwrap(),
            vec![TableEntry::Data(0x50000)]
        );
    }

    #[test]
    fn rejects_short_table() {
        assert!(matches!(
            decode_table(&[0; 15], 2, 16),
            Err(Corruption::Truncated {
                needed: 16,
                available: 15,
                ..
            })
        ));
    }

    #[test]
    fn rejects_reserved_bits() {
        for raw in [1u64 << 1, 1 << 8, 1 << 56, 1 << 63, 0x50000 | 2] {
            let bytes = raw.to_be_bytes();
            assert_eq!(
                decode_table(&bytes, 1, 16),
                Err(Corruption::TableEntry {
                    index: 0,
                    raw,
                    reason: TableEntryProblem::ReservedBits
                })
            );
        }
    }

    #[test]
    fn rejects_ones_with_offset() {
        let mut bytes = vec![0; 8];
        bytes.extend_from_slice(&(0x50000u64 | 1).to_be_bytes());
        assert_eq!(
            decode_table(&bytes, 2, 16),
            Err(Corruption::TableEntry {
                index: 1,
                raw: 0x50001,
                reason: TableEntryProblem::OnesWithOffset
            })
        );
    }

    #[test]
    fn rejects_unaligned_offset() {
        let bytes = 0x50200u64.to_be_bytes();
        assert_eq!(
            decode_table(&bytes, 1, 16),
            Err(Corruption::TableEntry {
                index: 0,
                raw: 0x50200,
                reason: TableEntryProblem::Unaligned
            })
        );
        // The same offset is fine with 512-byte clusters.
        assert_eq!(
            decode_table(&bytes, 1, 9).unwrap(),
            vec![TableEntry::Data(0x50200)]
        );
    }

    #[test]
    fn rejects_bad_cluster_bits() {
        assert_eq!(
            decode_table(&[], 0, 8),
            Err(Corruption::ClusterBits { found: 8 })
        );
    }

    #[test]
    fn encode_rejects_bad_offsets() {
        for off in [0, 0x50200, 1 << 56] {
            assert!(matches!(
                encode_table(&[TableEntry::Data(off)], 16),
                Err(InvalidValue(_))
            ));
        }
    }

    #[test]
    fn bit_location_is_lsb_first() {
        // Bits 0, 16 and 63 give bytes 01 00 01 00 00 00 00 80 (`docs/FORMAT.md`, bitmap data).
        let mut data = [0u8; 8];
        for n in [0, 16, 63] {
            let (byte, mask) = bit_location(n);
            data[byte as usize] |= mask;
        }
        assert_eq!(data, [0x01, 0, 0x01, 0, 0, 0, 0, 0x80]);
    }
}
