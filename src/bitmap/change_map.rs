//! The change map: one bit per region of the serialized bitmap, set when a word in that
//! region changed since the region was last taken by a flusher.
//!
//! # Ordering: a mark is never lost to a flush
//! A writer changes a leaf word first and sets the region's bit after. A flusher takes
//! (swaps to zero) the region bits first and reads the words after. All of these are
//! `SeqCst`, so they fall in one total order, and for a mark that raced with a flush either:
//! 1. the writer's bit-set came before the flusher's swap. Then its word change came
//!    earlier still, so the flusher's later read of the words sees the mark; or
//! 2. the writer's bit-set came after the swap. Then the bit is set again and the region
//!    is handed to the next take.
//!
//! The writer skips the atomic write when a load shows the bit already set. That load sits
//! where the write would, after the word change, so the same two cases apply. The only
//! cost of a race is a spurious bit: a region written twice, never a region skipped.

use std::sync::atomic::Ordering::SeqCst;

use super::atomic::{zeroed_words, AtomicU64};

/// One bit per region.
#[derive(Debug)]
pub(crate) struct ChangeMap {
    words: Box<[AtomicU64]>,
    nregions: u64,
}

impl ChangeMap {
    pub fn new(nregions: u64) -> Self {
        ChangeMap {
            words: zeroed_words(nregions.div_ceil(64) as usize),
            nregions,
        }
    }

    /// A map holding exactly `regions`.
    pub fn from_regions(regions: &ChangedRegions) -> Self {
        ChangeMap {
            words: regions.words.iter().map(|&v| AtomicU64::new(v)).collect(),
            nregions: regions.nregions,
        }
    }

    /// Marks region `r` changed.
    #[inline]
    pub fn set(&self, r: u64) {
        let w = &self.words[(r / 64) as usize];
        let b = 1u64 << (r % 64);
        if w.load(SeqCst) & b == 0 {
            w.fetch_or(b, SeqCst);
        }
    }

    /// Marks every region in `regions` changed again.
    pub fn set_all_of(&self, regions: &ChangedRegions) {
        for (w, &bits) in self.words.iter().zip(regions.words.iter()) {
            if bits != 0 && w.load(SeqCst) & bits != bits {
                w.fetch_or(bits, SeqCst);
            }
        }
    }

    /// Marks every region changed.
    pub fn set_every(&self) {
        for (i, w) in self.words.iter().enumerate() {
            w.fetch_or(self.valid(i), SeqCst);
        }
    }

    fn valid(&self, i: usize) -> u64 {
        let tail = self.nregions % 64;
        if i + 1 == self.words.len() && tail != 0 {
            (1 << tail) - 1
        } else {
            !0
        }
    }

    /// Takes the set of changed regions and clears it.
    pub fn take(&self) -> ChangedRegions {
        let mut count = 0;
        let words = self
            .words
            .iter()
            .map(|w| {
                // Skip the write on clean words: the load is enough to prove there is
                // nothing to take there at this point of the total order.
                let v = if w.load(SeqCst) == 0 {
                    0
                } else {
                    w.swap(0, SeqCst)
                };
                count += u64::from(v.count_ones());
                v
            })
            .collect();
        ChangedRegions {
            words,
            nregions: self.nregions,
            count,
        }
    }

    /// Copies the current set without clearing it.
    pub fn peek(&self) -> ChangedRegions {
        let words: Vec<u64> = self.words.iter().map(|w| w.load(SeqCst)).collect();
        let count = words.iter().map(|v| u64::from(v.count_ones())).sum();
        ChangedRegions {
            words,
            nregions: self.nregions,
            count,
        }
    }

    /// Number of regions currently marked, read without taking them.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(SeqCst).count_ones()))
            .sum()
    }

    pub fn memory_usage(&self) -> usize {
        std::mem::size_of_val(&*self.words)
    }
}

/// A set of change-map regions, as returned by
/// [`DirtyBitmap::take_changed`](crate::DirtyBitmap::take_changed).
///
/// A flusher serializes each region in the set. If the flush fails, it hands the set
/// back with [`DirtyBitmap::requeue_changed`](crate::DirtyBitmap::requeue_changed) so the
/// regions are not forgotten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedRegions {
    words: Vec<u64>,
    nregions: u64,
    count: u64,
}

impl ChangedRegions {
    /// Number of regions in the set.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// True when no region changed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether region `r` is in the set.
    pub fn contains(&self, r: u64) -> bool {
        r < self.nregions
            && self
                .words
                .get((r / 64) as usize)
                .is_some_and(|w| w & (1 << (r % 64)) != 0)
    }

    /// The region indices in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut bits = w;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                Some(i as u64 * 64 + u64::from(b))
            })
        })
    }

    /// Adds every region of `other` to this set. Both must come from bitmaps with the
    /// same region count; regions past this set's end are ignored.
    pub fn union_with(&mut self, other: &ChangedRegions) {
        for (a, b) in self.words.iter_mut().zip(other.words.iter()) {
            *a |= b;
        }
        self.count = self.words.iter().map(|v| u64::from(v.count_ones())).sum();
    }

    /// Total number of regions of the bitmap this set belongs to.
    pub fn region_count(&self) -> u64 {
        self.nregions
    }
}
