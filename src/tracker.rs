//! [`Tracker`]: fans every guest write out to the enabled bitmaps of one disk, lock-free.

use std::sync::Arc;

use crate::bitmap::DirtyBitmap;

/// The write path of one disk: [`mark`](Self::mark) records a guest write in every enabled
/// bitmap it holds. Cheap to clone, `Send + Sync`, and it never takes a lock: it holds the
/// same `Arc<DirtyBitmap>`s as the store ([`BitmapStore::tracker`](crate::BitmapStore::tracker)),
/// so marks never go through the store, and a flush under the store's lock runs
/// concurrently with them.
///
/// Whether a bitmap is enabled is read at every mark ([`DirtyBitmap::mark_dirty`] ignores a
/// disabled bitmap), so a bitmap disabled later stays untouched from then on.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    bitmaps: Arc<[Arc<DirtyBitmap>]>,
}

impl Tracker {
    /// A tracker over `bitmaps`.
    pub fn new(bitmaps: Vec<Arc<DirtyBitmap>>) -> Self {
        Self {
            bitmaps: bitmaps.into(),
        }
    }

    /// Records a guest write of `len` bytes at `offset` in every enabled bitmap.
    #[inline]
    pub fn mark(&self, offset: u64, len: u64) {
        for b in self.bitmaps.iter() {
            b.mark_dirty(offset, len);
        }
    }

    /// The bitmaps this tracker marks (enabled or not).
    pub fn bitmaps(&self) -> &[Arc<DirtyBitmap>] {
        &self.bitmaps
    }

    /// The lock-free pending estimate over these bitmaps, as
    /// [`BitmapStore::pending_estimate`](crate::BitmapStore::pending_estimate) computes it.
    pub fn pending_estimate(&self) -> u64 {
        crate::flush::pending_estimate(&self.bitmaps)
    }
}
