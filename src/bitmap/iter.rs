//! Iteration over dirty extents.

use std::iter::FusedIterator;
use std::num::NonZeroU64;

use super::summary::{Cursor, BLOCK_WORDS};
use super::DirtyBitmap;

/// Blocks searched for at once.
const AHEAD: usize = 8;

/// Iterator over merged `(offset, length)` byte extents of dirty granules, returned by
/// [`DirtyBitmap::dirty_extents`].
///
/// Each step finds the next dirty bit through the *any* summary tower and the end of its
/// run through the *full* tower, so clean and dirty stretches are both skipped in
/// O(log64 n). Like QEMU's `HBitmapIter`, it keeps its position in the any tower between
/// steps (the words it loaded at each level), so a step usually reads one summary word
/// instead of climbing and descending the tower; the tower's guard tells it when those
/// words can no longer be trusted. It reads a block's words once, without a branch per
/// word, and searches for the next blocks a batch ahead, fetching their lines together
/// (docs/DESIGN.md, "The extents cursor"). Under marks and clears made while it runs
/// (also by the iterating thread between two steps) the extents reflect some
/// interleaving of them: a bit set in a block after the iterator read that block, or
/// after it searched past it, may be missed. With no mark or clear during the iteration
/// they are exact.
#[derive(Debug, Clone)]
pub struct DirtyExtents<'a> {
    bitmap: &'a DirtyBitmap,
    /// The block being read: the words of it still to report from (bit i for its word i)
    /// as they were when the block was read, and the word being read with the bits still
    /// to report from it.
    block: u64,
    words: u32,
    word: usize,
    bits: u64,
    /// The blocks after `block` that the last search found (`ahead[at..len]`), searched
    /// for a batch at a time so that their tower words and leaf lines load together. They
    /// are used only while the cursor is current (no clear opened a window since), and
    /// searched for again otherwise.
    ahead: [u64; AHEAD],
    at: u8,
    len: u8,
    /// Set once a search found nothing or a run reached the last bit: the iterator stays
    /// finished (it is a `FusedIterator`) even if a later mark lands behind the cursor's
    /// kept words.
    done: bool,
    cursor: Cursor,
}

impl<'a> DirtyExtents<'a> {
    pub(super) fn new(bitmap: &'a DirtyBitmap) -> Self {
        let mut it = DirtyExtents {
            bitmap,
            block: 0,
            words: 0,
            word: 0,
            bits: 0,
            ahead: [0; AHEAD],
            at: 0,
            len: 0,
            done: false,
            cursor: Cursor::new(),
        };
        it.seek(0);
        it
    }

    /// Resumes at bit `bit` (below the bit count): its block's words after its own, and
    /// its own word's bits from `bit` on.
    fn seek(&mut self, bit: u64) {
        let w = (bit / 64) as usize;
        self.block = (w / BLOCK_WORDS) as u64;
        let i = w % BLOCK_WORDS;
        self.words = self.bitmap.block_nonzero_words(self.block) & !((2u32 << i) - 1);
        self.word = w;
        self.bits = self.bitmap.words.load(w) & (!0u64 << (bit % 64));
        // The blocks searched ahead up to this one are passed; the next block step searches
        // again once the rest are used.
        while self.at < self.len && self.ahead[usize::from(self.at)] <= self.block {
            self.at += 1;
        }
    }

    /// Searches for the blocks after `block` and starts bringing in their leaf lines. Kept
    /// out of line: it runs once per batch, and inlined it spreads the extent step's
    /// common path over several kilobytes of code.
    #[inline(never)]
    fn look_ahead(&mut self) {
        let bm = self.bitmap;
        let len = bm
            .any
            .next_blocks(self.block + 1, &mut self.cursor, &mut self.ahead);
        for &b in &self.ahead[..len] {
            bm.prefetch_block(b);
        }
        self.at = 0;
        self.len = len as u8;
    }
}

impl Iterator for DirtyExtents<'_> {
    type Item = (u64, u64);

    // Inlined into the caller, which then gets the extent from `next_extent` in two
    // registers instead of through memory (a 24-byte `Option<(u64, u64)>` is returned
    // through the stack, and reading it back right after the stores stalls).
    #[inline]
    fn next(&mut self) -> Option<(u64, u64)> {
        self.next_extent().map(|(offset, len)| (offset, len.get()))
    }
}

impl DirtyExtents<'_> {
    /// The next extent, its length non-zero so that the `Option` fits in 16 bytes, in two
    /// registers. Out of line, so that every caller's inlined `next` gets it that way.
    #[inline(never)]
    fn next_extent(&mut self) -> Option<(u64, NonZeroU64)> {
        let bm = self.bitmap;
        while self.bits == 0 {
            if self.words == 0 {
                if self.done {
                    return None;
                }
                if self.at == self.len || !bm.any.cursor_is_current(&self.cursor) {
                    self.look_ahead();
                    if self.len == 0 {
                        self.done = true;
                        return None;
                    }
                }
                self.block = self.ahead[usize::from(self.at)];
                self.at += 1;
                // Zero if the tower bit was spurious.
                self.words = bm.block_nonzero_words(self.block);
                if self.words == 0 {
                    continue;
                }
            }
            let i = self.words.trailing_zeros() as usize;
            self.words &= self.words - 1;
            self.word = self.block as usize * BLOCK_WORDS + i;
            // Zero if a clear emptied it since the block was read.
            self.bits = bm.words.load(self.word);
        }
        let w = self.word as u64;
        let first = u64::from(self.bits.trailing_zeros());
        // The run's end: adding the run's lowest bit carries through the run and stops at
        // the first clear bit after it, or carries out of the word if the run fills the
        // rest of it; then the end is the next clean bit searched from the next word. Bits
        // past the last granule are never set, so a run ends by the last bit. (ANDing the
        // sum in clears the run: the step's chain from one extent to the next is these four
        // single-cycle operations.)
        let carry = self.bits.wrapping_add(self.bits & self.bits.wrapping_neg());
        self.bits &= carry;
        let end = if carry != 0 {
            w * 64 + u64::from(carry.trailing_zeros())
        } else {
            let end = bm.next_clean_bit((w + 1) * 64).unwrap_or(bm.geo.nbits);
            if end < bm.geo.nbits {
                self.seek(end);
            } else {
                self.words = 0;
                self.done = true;
            }
            end
        };
        let (s, e) = (bm.geo.bit_start(w * 64 + first), bm.geo.bit_offset(end));
        // `e > s`: the run's first bit lies below the bit count, so its granule starts
        // before the disk's end (no clip needed), and the run ends after it. The `MIN` is
        // never taken.
        Some((s, NonZeroU64::new(e - s).unwrap_or(NonZeroU64::MIN)))
    }
}

impl FusedIterator for DirtyExtents<'_> {}
