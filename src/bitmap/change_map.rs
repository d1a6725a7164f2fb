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

use super::atomic::{zeroed_words, AtomicU64, WordArray};

/// One bit per region.
#[derive(Debug)]
pub(crate) struct ChangeMap {
    words: WordArray,
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

    /// Whether region `r` is marked changed now.
    #[inline(always)]
    pub fn is_set(&self, r: u64) -> bool {
        self.words[(r / 64) as usize].load(SeqCst) & (1u64 << (r % 64)) != 0
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

    /// Marks every region in `regions` changed again. Regions past this map's end (a set
    /// taken before a shrink, or from another bitmap) are ignored: a bit past the end
    /// would make `take`, `count` and `iter` name regions no table has.
    pub fn set_all_of(&self, regions: &ChangedRegions) {
        for (i, (w, &bits)) in self.words.iter().zip(regions.words.iter()).enumerate() {
            let bits = bits & self.valid(i);
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
    /// An empty set for a bitmap of `nregions` regions (to fill with
    /// [`insert`](Self::insert), say, and hand back with a requeue).
    ///
    /// # Panics
    /// If `nregions / 8` bytes cannot be allocated: pass a bitmap's
    /// [`region_count`](crate::DirtyBitmap::region_count), which is bounded by its size.
    pub fn empty(nregions: u64) -> Self {
        ChangedRegions {
            words: vec![0; usize::try_from(nregions.div_ceil(64)).unwrap_or(usize::MAX)],
            nregions,
            count: 0,
        }
    }

    /// Every region of a bitmap of `nregions` regions.
    ///
    /// # Panics
    /// As [`empty`](Self::empty).
    pub fn all(nregions: u64) -> Self {
        let mut s = Self::empty(nregions);
        let tail = nregions % 64;
        let n = s.words.len();
        for (i, w) in s.words.iter_mut().enumerate() {
            *w = if i + 1 == n && tail != 0 {
                (1 << tail) - 1
            } else {
                !0
            };
        }
        s.count = nregions;
        s
    }

    /// Adds region `r`; one past the set's bitmap is ignored.
    pub fn insert(&mut self, r: u64) {
        if r >= self.nregions {
            return;
        }
        if let Some(w) = self.words.get_mut((r / 64) as usize) {
            let b = 1u64 << (r % 64);
            if *w & b == 0 {
                *w |= b;
                self.count += 1;
            }
        }
    }

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
    pub fn iter(&self) -> Regions<'_> {
        Regions {
            words: &self.words,
            cursor: Cursor::default(),
        }
    }

    /// Adds every region of `other` to this set. Both must come from bitmaps with the
    /// same region count; regions past this set's end are ignored.
    pub fn union_with(&mut self, other: &ChangedRegions) {
        let (n, tail) = (self.words.len(), self.nregions % 64);
        for (i, (a, b)) in self.words.iter_mut().zip(other.words.iter()).enumerate() {
            *a |= if i + 1 == n && tail != 0 {
                b & ((1 << tail) - 1)
            } else {
                *b
            };
        }
        self.count = self.words.iter().map(|v| u64::from(v.count_ones())).sum();
    }

    /// Total number of regions of the bitmap this set belongs to.
    pub fn region_count(&self) -> u64 {
        self.nregions
    }
}

/// Where an iteration over a set's words stands: the next word to load, and the bits of the
/// current word not yet returned.
#[derive(Debug, Clone, Copy, Default)]
struct Cursor {
    next_word: usize,
    bits: u64,
}

impl Cursor {
    /// The next set bit of `words` as a region index, in ascending order.
    #[inline]
    fn next(&mut self, words: &[u64]) -> Option<u64> {
        while self.bits == 0 {
            self.bits = *words.get(self.next_word)?;
            self.next_word += 1;
        }
        let b = self.bits.trailing_zeros();
        self.bits &= self.bits - 1;
        // `next_word` was incremented past the word `bits` came from.
        Some((self.next_word as u64 - 1) * 64 + u64::from(b))
    }

    /// At most the set bits left: those of the current word and of the words after it.
    fn remaining(&self, words: &[u64]) -> usize {
        let rest: u64 = words
            .get(self.next_word..)
            .unwrap_or_default()
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        usize::try_from(rest + u64::from(self.bits.count_ones())).unwrap_or(usize::MAX)
    }
}

/// The region indices of a [`ChangedRegions`], in ascending order; from
/// [`ChangedRegions::iter`] or `&ChangedRegions`'s [`IntoIterator`].
#[derive(Debug, Clone)]
pub struct Regions<'a> {
    words: &'a [u64],
    cursor: Cursor,
}

impl Iterator for Regions<'_> {
    type Item = u64;

    #[inline]
    fn next(&mut self) -> Option<u64> {
        self.cursor.next(self.words)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.cursor.remaining(self.words);
        (n, Some(n))
    }
}

impl ExactSizeIterator for Regions<'_> {}

impl std::iter::FusedIterator for Regions<'_> {}

impl<'a> IntoIterator for &'a ChangedRegions {
    type Item = u64;
    type IntoIter = Regions<'a>;

    fn into_iter(self) -> Regions<'a> {
        self.iter()
    }
}

/// The region indices of a [`ChangedRegions`] taken by value, in ascending order; from
/// `ChangedRegions`'s [`IntoIterator`].
#[derive(Debug, Clone)]
pub struct IntoRegions {
    words: Vec<u64>,
    cursor: Cursor,
}

impl Iterator for IntoRegions {
    type Item = u64;

    #[inline]
    fn next(&mut self) -> Option<u64> {
        self.cursor.next(&self.words)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.cursor.remaining(&self.words);
        (n, Some(n))
    }
}

impl ExactSizeIterator for IntoRegions {}

impl std::iter::FusedIterator for IntoRegions {}

impl IntoIterator for ChangedRegions {
    type Item = u64;
    type IntoIter = IntoRegions;

    fn into_iter(self) -> IntoRegions {
        IntoRegions {
            words: self.words,
            cursor: Cursor::default(),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Regions 0, 5, 63, 64 and 129 of 130.
    fn sample() -> ChangedRegions {
        let m = ChangeMap::new(130);
        for r in [129, 0, 64, 5, 63] {
            m.set(r);
        }
        m.take()
    }

    #[test]
    fn built_sets_equal_taken_ones() {
        let mut built = ChangedRegions::empty(130);
        for r in [129, 0, 64, 5, 63, 5, 130] {
            built.insert(r);
        }
        assert_eq!(built, sample());
        let every = ChangeMap::new(130);
        every.set_every();
        assert_eq!(ChangedRegions::all(130), every.take());
        assert_eq!(ChangedRegions::all(128).len(), 128);
        assert_eq!(ChangedRegions::all(128).iter().last(), Some(127));
        assert!(ChangedRegions::empty(0).is_empty());
    }

    #[test]
    fn a_reference_iterates_in_ascending_order() {
        let set = sample();
        let mut seen = Vec::new();
        for r in &set {
            seen.push(r);
        }
        assert_eq!(seen, vec![0, 5, 63, 64, 129]);
        assert_eq!(seen, set.iter().collect::<Vec<_>>());
        assert_eq!((&set).into_iter().len(), 5);
        // Borrowed, so still whole.
        assert_eq!(set.len(), 5);
        let empty = ChangeMap::new(130).take();
        assert_eq!((&empty).into_iter().next(), None);
    }

    #[test]
    fn by_value_iterates_in_ascending_order() {
        let set = sample();
        let mut it = set.clone().into_iter();
        assert_eq!(it.len(), 5);
        assert_eq!(it.next(), Some(0));
        assert_eq!(it.len(), 4);
        assert_eq!(it.collect::<Vec<_>>(), vec![5, 63, 64, 129]);
        let mut seen = Vec::new();
        for r in set {
            seen.push(r);
        }
        assert_eq!(seen, vec![0, 5, 63, 64, 129]);
        let mut empty = ChangeMap::new(0).take().into_iter();
        assert_eq!(empty.next(), None);
        assert_eq!(empty.next(), None);
    }

    /// `union_with` keeps no region of a longer set past this one's end: ORing the last
    /// word whole would keep and count one (`len` 1, `iter` yielding 80 of a 70-region set)
    /// while `contains` says no.
    #[test]
    fn a_union_ignores_regions_past_the_sets_end() {
        let mut a = ChangedRegions::empty(70);
        let mut b = ChangedRegions::empty(100);
        b.insert(80);
        b.insert(69);
        a.union_with(&b);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![69]);
        assert_eq!(a.len(), 1);
    }
}
