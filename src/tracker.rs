//! [`Tracker`]: fans every guest write out to the enabled bitmaps of one disk, lock-free.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::bitmap::DirtyBitmap;

/// The bitmaps a [`Tracker`] marks, replaceable as a whole while marks go on: the store
/// publishes a new list whenever a bitmap gains or loses an in-memory copy (activate, add,
/// remove, any commit), and every tracker taken from it sees the new list at its next mark.
pub(crate) type TrackedSet = Arc<ArcSwap<Vec<Arc<DirtyBitmap>>>>;

/// The write path of one disk: [`mark`](Self::mark) records a guest write in every enabled
/// bitmap it holds. Cheap to clone, `Send + Sync`, and it never takes a lock: it reads the
/// store's current list of in-memory bitmaps with one lock-free load
/// ([`BitmapStore::tracker`](crate::BitmapStore::tracker)), so marks never go through the
/// store, and a flush under the store's lock runs concurrently with them.
///
/// A tracker taken from a store follows it: a bitmap added later, or loaded by a later
/// [`activate`](crate::BitmapStore::activate), receives every mark that starts after the
/// call that made it returned. (A mark in flight during that call may miss it; that write
/// overlapped the bitmap's creation.)
///
/// Whether a bitmap is enabled is read at every mark ([`DirtyBitmap::mark_dirty`] ignores a
/// disabled bitmap), so a bitmap disabled later stays untouched from then on.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    bitmaps: TrackedSet,
}

impl Tracker {
    /// A tracker over the fixed list `bitmaps`.
    pub fn new(bitmaps: Vec<Arc<DirtyBitmap>>) -> Self {
        Self {
            bitmaps: Arc::new(ArcSwap::from_pointee(bitmaps)),
        }
    }

    /// A tracker over the store's published list.
    pub(crate) fn following(set: &TrackedSet) -> Self {
        Self {
            bitmaps: Arc::clone(set),
        }
    }

    /// Records a guest write of `len` bytes at `offset` in every enabled bitmap.
    #[inline]
    pub fn mark(&self, offset: u64, len: u64) {
        for b in self.bitmaps.load().iter() {
            b.mark_dirty(offset, len);
        }
    }

    /// The bitmaps this tracker marks now (enabled or not).
    pub fn bitmaps(&self) -> Arc<Vec<Arc<DirtyBitmap>>> {
        self.bitmaps.load_full()
    }

    /// The lock-free pending estimate over these bitmaps, as
    /// [`BitmapStore::pending_estimate`](crate::BitmapStore::pending_estimate) computes it.
    pub fn pending_estimate(&self) -> u64 {
        crate::flush::pending_estimate(&self.bitmaps.load())
    }
}
