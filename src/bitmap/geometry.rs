//! Geometry of a bitmap: disk size, granularity, bit count and change-map regions.
//!
//! All arithmetic here is checked once, at construction, so that the hot paths can index
//! without overflow: `nbits <= 2^32`, so every bit and word index fits in a `u64` and every
//! word index in a `usize` on 64-bit hosts.

use crate::error::{invalid_input, Result};

/// Smallest granularity qcow2 allows (2^9 bytes).
pub const MIN_GRANULARITY: u64 = 1 << 9;
/// Largest granularity qcow2 allows (2^31 bytes).
pub const MAX_GRANULARITY: u64 = 1 << 31;
/// Largest bit count a qcow2 bitmap may have (2^32 bits).
pub const MAX_BITS: u64 = 1 << 32;
/// Default change-map region: 4 KiB of serialized bitmap (2 GiB of disk at 64 KiB granularity).
pub const DEFAULT_REGION_SIZE: u64 = 4096;
/// Smallest change-map region, in bytes of serialized bitmap.
pub const MIN_REGION_SIZE: u64 = 512;
/// Largest change-map region, in bytes of serialized bitmap (qcow2's largest cluster).
pub const MAX_REGION_SIZE: u64 = 2 << 20;

/// Validated geometry of one bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Disk bytes covered.
    pub disk_size: u64,
    /// Disk bytes per bit (a power of two).
    pub granularity: u64,
    /// log2(granularity).
    pub granularity_bits: u32,
    /// ceil(disk_size / granularity), in 1..=2^32.
    pub nbits: u64,
    /// Bytes of serialized bitmap per change-map region (a power of two).
    pub region_size: u64,
    /// log2 of the words per region, kept for the mark path.
    region_word_shift: u32,
}

impl Geometry {
    /// Checks every limit and computes the bit count.
    pub fn new(disk_size: u64, granularity: u64, region_size: u64) -> Result<Self> {
        if !granularity.is_power_of_two()
            || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
        {
            return Err(invalid_input!(
                "granularity {granularity} must be a power of two from {MIN_GRANULARITY} to {MAX_GRANULARITY}"
            ));
        }
        if !region_size.is_power_of_two()
            || !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&region_size)
        {
            return Err(invalid_input!(
                "region size {region_size} must be a power of two from {MIN_REGION_SIZE} to {MAX_REGION_SIZE}"
            ));
        }
        if disk_size == 0 {
            return Err(invalid_input!(
                "disk size 0: a bitmap needs at least one bit"
            ));
        }
        let nbits = disk_size.div_ceil(granularity);
        if nbits > MAX_BITS {
            return Err(invalid_input!(
                "disk size {disk_size} at granularity {granularity} needs {nbits} bits, more than qcow2's limit of 2^32"
            ));
        }
        Ok(Geometry {
            disk_size,
            granularity,
            granularity_bits: granularity.trailing_zeros(),
            nbits,
            region_size,
            region_word_shift: (region_size / 8).trailing_zeros(),
        })
    }

    /// Number of 64-bit words holding the bits.
    pub fn nwords(&self) -> usize {
        // nbits <= 2^32, so this is at most 2^26.
        self.nbits.div_ceil(64) as usize
    }

    /// Bytes of the serialized bitmap: ceil(nbits / 8).
    pub fn serialized_len(&self) -> u64 {
        self.nbits.div_ceil(8)
    }

    /// Words per change-map region (at least 64, since regions are at least 512 bytes).
    pub fn region_words(&self) -> usize {
        (self.region_size / 8) as usize
    }

    /// log2 of [`Self::region_words`].
    #[inline]
    pub fn region_word_shift(&self) -> u32 {
        self.region_word_shift
    }

    /// Number of change-map regions.
    pub fn nregions(&self) -> u64 {
        self.serialized_len().div_ceil(self.region_size)
    }

    /// The bits touched by the byte range `[offset, offset + len)`, clamped to the disk,
    /// as a half-open bit range. `None` when nothing is touched.
    pub fn touched_bits(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.disk_size {
            return None;
        }
        let first = offset >> self.granularity_bits;
        let last_byte = offset.saturating_add(len - 1).min(self.disk_size - 1);
        Some((first, (last_byte >> self.granularity_bits) + 1))
    }

    /// The bits whose granules lie entirely inside `[offset, offset + len)`, as a half-open
    /// bit range. The last granule of the disk counts as entirely inside when the range
    /// reaches the end of the disk. `None` when no granule is covered.
    pub fn covered_bits(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.disk_size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.disk_size);
        let first = offset.div_ceil(self.granularity);
        let last = if end == self.disk_size {
            self.nbits
        } else {
            end >> self.granularity_bits
        };
        (first < last).then_some((first, last))
    }

    /// Disk byte offset of bit `bit`'s granule, for a bit below [`nbits`](Self::nbits):
    /// such a granule starts before the disk's end, so no clip is needed.
    #[inline]
    pub fn bit_start(&self, bit: u64) -> u64 {
        debug_assert!(bit < self.nbits);
        bit << self.granularity_bits
    }

    /// Disk byte offset of bit `bit`'s granule, clipped to the disk size.
    pub fn bit_offset(&self, bit: u64) -> u64 {
        // A bit whose offset does not fit in 64 bits lies past any disk's end: a plain
        // shift would drop its high bits and land inside the disk.
        if bit > u64::MAX >> self.granularity_bits {
            self.disk_size
        } else {
            (bit << self.granularity_bits).min(self.disk_size)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covered_bits_rounds_inward_and_keeps_the_last_partial_granule() {
        let g = Geometry::new(10 * 512 + 100, 512, 4096).unwrap();
        assert_eq!(g.nbits, 11);
        assert_eq!(g.covered_bits(1, 1024), Some((1, 2)));
        assert_eq!(g.covered_bits(1, 512), None);
        assert_eq!(g.covered_bits(10 * 512, 100), Some((10, 11)));
        assert_eq!(g.covered_bits(10 * 512, 99), None);
        assert_eq!(g.touched_bits(511, 2), Some((0, 2)));
        assert_eq!(g.touched_bits(0, u64::MAX), Some((0, 11)));
    }
}
