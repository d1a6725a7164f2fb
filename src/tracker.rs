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
/// disabled bitmap), and [`DirtyBitmap::set_enabled`]`(false)` waits for the marks in
/// flight, so a bitmap stays untouched from the moment that call returns.
///
/// To hand recording over from bitmap A to bitmap B (a new checkpoint), enable B first,
/// then disable A: a write marked between the two calls lands in both (a spurious dirty
/// bit at worst), never in neither, whatever the order of A and B here. Disabling A first
/// would lose a write marked between the two calls. Each [`mark`](Self::mark) over two or
/// more bitmaps announces itself process-wide while it runs, and disabling waits for those
/// announced before it, so a mark that found B still disabled also finds A still enabled.
/// On a tracker taken from a store, "enable B" may be the [`add`](crate::BitmapStore::add)
/// that publishes B: an add of a recording bitmap returns only once no mark runs over a
/// list without it, so every mark completing after it is in B.
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
    ///
    /// Over one bitmap this is [`DirtyBitmap::mark_dirty`]. Over several, a write already
    /// dirty in all of them costs one load each, as there; otherwise the fan-out also
    /// announces itself for the hand-over order above, at the cost of two plain stores.
    /// As `mark_dirty` it waits while a bitmap it would write is
    /// [sealed](DirtyBitmap::seal), but without the announcement (which every disable in
    /// the process waits for), marking every bitmap again after the unseal.
    #[inline]
    pub fn mark(&self, offset: u64, len: u64) {
        let list = self.bitmaps.load();
        match list.as_slice() {
            [] => {}
            [only] => only.mark_dirty(offset, len),
            several => {
                // A write already in every bitmap reads no `enabled` flag: nothing to
                // announce, and the hand-over cannot lose it.
                if several.iter().all(|b| b.already_marked(offset, len)) {
                    return;
                }
                crate::bitmap::mark_fanned_out(several.iter().map(|b| &**b), offset, len);
            }
        }
    }

    /// Whether a mark of any of these bitmaps is in flight; see
    /// [`DirtyBitmap::marks_in_flight`].
    pub fn marks_in_flight(&self) -> bool {
        self.bitmaps.load().iter().any(|b| b.marks_in_flight())
    }

    /// Waits until no mark of these bitmaps that was in flight when it was called still is;
    /// see [`DirtyBitmap::wait_for_marks`]. It does not stop new marks.
    pub fn wait_for_marks(&self) {
        for b in self.bitmaps.load().iter() {
            b.wait_for_marks();
        }
    }

    /// The bitmaps this tracker marks now (enabled or not): a copy of the list, so that
    /// only marks in flight ever hold the published one (a store's checkpoint waits for
    /// them, `BitmapStore::checkpoint`).
    pub fn bitmaps(&self) -> Arc<Vec<Arc<DirtyBitmap>>> {
        Arc::new(self.bitmaps.load().as_ref().clone())
    }

    /// The lock-free pending estimate over these bitmaps: [`crate::flush::pending_estimate`].
    pub fn pending_estimate(&self) -> u64 {
        crate::flush::pending_estimate(self.bitmaps.load().iter())
    }
}
