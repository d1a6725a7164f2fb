//! Iteration over dirty extents.

use std::iter::FusedIterator;

use super::summary::Cursor;
use super::DirtyBitmap;

/// Iterator over merged `(offset, length)` byte extents of dirty granules, returned by
/// [`DirtyBitmap::dirty_extents`].
///
/// Each step finds the next dirty bit through the *any* summary tower and the end of its
/// run through the *full* tower, so clean and dirty stretches are both skipped in
/// O(log64 n). Like QEMU's `HBitmapIter`, it keeps its position in the any tower between
/// steps (the words it loaded at each level), so a step usually reads one summary word
/// instead of climbing and descending the tower; the tower's guard tells it when those
/// words can no longer be trusted. Under concurrent marks the extents reflect some
/// interleaving of them; with no concurrent writer they are exact.
#[derive(Debug, Clone)]
pub struct DirtyExtents<'a> {
    bitmap: &'a DirtyBitmap,
    /// Where the next search starts; past the last bit once a search found nothing, so
    /// that the iterator stays finished (it is a `FusedIterator`) even if a later mark
    /// lands behind the cursor's kept words.
    next_bit: u64,
    cursor: Cursor,
}

impl<'a> DirtyExtents<'a> {
    pub(super) fn new(bitmap: &'a DirtyBitmap) -> Self {
        DirtyExtents {
            bitmap,
            next_bit: 0,
            cursor: Cursor::new(),
        }
    }
}

impl Iterator for DirtyExtents<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let bm = self.bitmap;
        let Some(start) = bm.next_dirty_bit_cached(self.next_bit, &mut self.cursor) else {
            self.next_bit = u64::MAX;
            return None;
        };
        let end = bm.run_end(start);
        self.next_bit = end;
        let (s, e) = (bm.geo.bit_offset(start), bm.geo.bit_offset(end));
        Some((s, e - s))
    }
}

impl FusedIterator for DirtyExtents<'_> {}
