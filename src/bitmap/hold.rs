//! [`DirtyBitmap::hold_incomplete`]: a bitmap whose bits are still on their way from
//! elsewhere (a migration destination's bitmap while the source's postcopy push runs), which
//! a store must not read as complete, drop, disable or write out as consistent meanwhile.

use std::sync::Arc;

use super::DirtyBitmap;
use std::sync::atomic::Ordering::SeqCst;

impl DirtyBitmap {
    /// Marks this bitmap as incomplete until the hold is released: bits it lacks are still
    /// to be ORed in by the holder. [`is_incomplete`](Self::is_incomplete) says so to a
    /// store holding it, which refuses meanwhile to hand out a copy, to remove or disable
    /// it, and to write it out as consistent.
    ///
    /// The holder releases it with [`IncompleteHold::complete`] once every bit arrived.
    /// Dropped without that, the hold marks every granule dirty first (what did not arrive
    /// is unknown: any doubt reads as dirty), then releases.
    pub(crate) fn hold_incomplete(self: &Arc<Self>) -> IncompleteHold {
        self.incomplete.fetch_add(1, SeqCst);
        IncompleteHold {
            bitmap: Arc::clone(self),
            complete: false,
        }
    }

    /// Whether a [`hold_incomplete`](Self::hold_incomplete) hold of it is still in force.
    pub(crate) fn is_incomplete(&self) -> bool {
        self.incomplete.load(SeqCst) != 0
    }
}

/// A hold of [`DirtyBitmap::hold_incomplete`].
#[derive(Debug)]
pub(crate) struct IncompleteHold {
    bitmap: Arc<DirtyBitmap>,
    complete: bool,
}

impl IncompleteHold {
    /// Every bit arrived: released without filling.
    pub(crate) fn complete(mut self) {
        self.complete = true;
    }
}

impl Drop for IncompleteHold {
    fn drop(&mut self) {
        if !self.complete {
            // Before the release: nobody reads it as complete without every bit.
            self.bitmap.fill();
        }
        self.bitmap.incomplete.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_dropped_before_it_completes_fills_the_bitmap() {
        let bm = Arc::new(DirtyBitmap::new(1 << 30, 65536).unwrap());
        bm.mark_dirty(0, 4096);
        let hold = bm.hold_incomplete();
        assert!(bm.is_incomplete());
        drop(hold);
        assert!(!bm.is_incomplete());
        assert_eq!(bm.count(), bm.bit_count(), "every granule dirty");
    }

    #[test]
    fn a_completed_hold_leaves_the_bits_as_they_are() {
        let bm = Arc::new(DirtyBitmap::new(1 << 30, 65536).unwrap());
        bm.mark_dirty(0, 4096);
        let (a, b) = (bm.hold_incomplete(), bm.hold_incomplete());
        a.complete();
        assert!(bm.is_incomplete(), "one hold is still in force");
        b.complete();
        assert!(!bm.is_incomplete());
        assert_eq!(bm.count(), 1);
    }
}
