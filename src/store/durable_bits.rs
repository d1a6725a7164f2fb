//! The state of a store active in durable mode (`durable.rs` has the mode itself): per
//! bitmap, the bits known to be on disk.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use crate::bitmap::DirtyBitmap;
use crate::flush;

/// The bits of one bitmap known to be on disk, in place: a commit sets them after its
/// barrier, from the bytes it wrote; a clear drops them before it changes anything.
#[derive(Debug)]
pub(super) struct DurableBits {
    words: Box<[AtomicU64]>,
    granularity_bits: u32,
    disk_size: u64,
}

impl DurableBits {
    /// The bits of `bm` as they are now: call it only when `bm` equals its disk copy and
    /// nothing marks it.
    pub(super) fn of(bm: &DirtyBitmap) -> Self {
        DurableBits {
            words: (0..bm.word_count())
                .map(|w| AtomicU64::new(bm.word(w)))
                .collect(),
            granularity_bits: bm.granularity().trailing_zeros(),
            disk_size: bm.disk_size(),
        }
    }

    /// Whether every granule of `[offset, offset + len)` is durable (false for a range
    /// past the disk). One load for a range inside one word.
    #[inline]
    pub(super) fn covers(&self, offset: u64, len: u64) -> bool {
        let Some(last) = offset.checked_add(len).and_then(|e| e.checked_sub(1)) else {
            return len == 0;
        };
        if last >= self.disk_size {
            return false;
        }
        let first_bit = offset >> self.granularity_bits;
        let last_bit = last >> self.granularity_bits;
        let (fw, lw) = ((first_bit / 64) as usize, (last_bit / 64) as usize);
        (fw..=lw).all(|w| {
            let lo = if w == fw { first_bit % 64 } else { 0 };
            let hi = if w == lw { last_bit % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - (hi - lo))) << lo;
            self.words
                .get(w)
                .is_some_and(|x| x.load(SeqCst) & mask == mask)
        })
    }

    /// ORs in the serialized bytes of region `region` (of `region_size` bytes) as a commit
    /// wrote them: bit `k` of byte `i` is granule `8 i + k`, so word `w` is the
    /// little-endian u64 of bytes `8 w ..`.
    pub(super) fn confirm(&self, region: u64, region_size: u64, bytes: &[u8]) {
        let first = (region.saturating_mul(region_size) / 8) as usize;
        for (k, chunk) in bytes.chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            let v = u64::from_le_bytes(b);
            if v != 0 {
                if let Some(w) = self.words.get(first.saturating_add(k)) {
                    w.fetch_or(v, SeqCst);
                }
            }
        }
    }

    /// Drops every bit (before a clear changes memory or disk).
    pub(super) fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, SeqCst);
        }
    }
}

/// What a durable store holds beside its slots: each in-memory bitmap with its table (every
/// entry a data cluster since the activation) and its durable bits.
#[derive(Debug)]
pub(crate) struct Durable {
    pub(super) targets: Vec<flush::Target>,
    pub(super) bits: Vec<Arc<DurableBits>>,
}
