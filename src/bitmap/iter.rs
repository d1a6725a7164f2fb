//! Iteration over dirty extents.

use std::iter::FusedIterator;

use super::summary::{Cursor, BLOCK_WORDS};
use super::DirtyBitmap;

/// Iterator over merged `(offset, length)` byte extents of dirty granules, returned by
/// [`DirtyBitmap::dirty_extents`].
///
/// Each step finds the next dirty bit through the *any* summary tower and the end of its
/// run through the *full* tower, so clean and dirty stretches are both skipped in
/// O(log64 n). Like QEMU's `HBitmapIter`, it keeps its position in the any tower between
/// steps (the words it loaded at each level), so a step usually reads one summary word
/// instead of climbing and descending the tower; the tower's guard tells it when those
/// words can no longer be trusted. It reads a block's words once, without a branch per
/// word, and searches for the next block one step ahead while the current one is read
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
    /// The block after `block` that the last search found, searched for one step ahead
    /// so that its tower words and its leaf line load while this block is read; `None`
    /// when that search found nothing. It is used only while the cursor is current (no
    /// clear opened a window since), and searched for again otherwise.
    ahead: Option<u64>,
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
            ahead: None,
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
        self.look_ahead();
    }

    /// Searches for the block after `block` and starts bringing in its leaf line.
    fn look_ahead(&mut self) {
        let bm = self.bitmap;
        self.ahead = bm.any.next_block_cached(self.block + 1, &mut self.cursor);
        if let Some(b) = self.ahead {
            bm.prefetch_block(b);
        }
    }
}

impl Iterator for DirtyExtents<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let bm = self.bitmap;
        while self.bits == 0 {
            if self.done {
                return None;
            }
            if self.words != 0 {
                let i = self.words.trailing_zeros() as usize;
                self.words &= self.words - 1;
                self.word = self.block as usize * BLOCK_WORDS + i;
                // Zero if a clear emptied it since the block was read.
                self.bits = bm.words.load(self.word);
            } else {
                if !bm.any.cursor_is_current(&self.cursor) {
                    self.look_ahead();
                }
                match self.ahead {
                    Some(b) => {
                        self.block = b;
                        // Zero if the tower bit was spurious.
                        self.words = bm.block_nonzero_words(b);
                        self.look_ahead();
                    }
                    None => self.done = true,
                }
            }
        }
        let w = self.word as u64;
        let first = u64::from(self.bits.trailing_zeros());
        // The run's end: the first clear bit after its start in the word as read, or, if
        // the run fills the rest of the word, the next clean bit searched from the next
        // word. Bits past the last granule are never set, so a run ends by the last bit.
        let clean = !self.bits & (!0u64 << first);
        let end = if clean != 0 {
            let last = u64::from(clean.trailing_zeros());
            self.bits &= !0u64 << last;
            w * 64 + last
        } else {
            let end = bm.next_clean_bit((w + 1) * 64).unwrap_or(bm.geo.nbits);
            if end < bm.geo.nbits {
                self.seek(end);
            } else {
                self.bits = 0;
                self.words = 0;
                self.done = true;
            }
            end
        };
        let (s, e) = (bm.geo.bit_offset(w * 64 + first), bm.geo.bit_offset(end));
        Some((s, e - s))
    }
}

impl FusedIterator for DirtyExtents<'_> {}
