//! [`ChangeConsumer`], the handle of one extra consumer of a bitmap's changes, and
//! [`DirtyBitmap::add_consumer`]. The maps and the protocol that keeps a registration from
//! missing a change are in `consumer_maps.rs`.

use std::fmt;
use std::sync::Arc;

use super::atomic::sc_point;
use super::change_map::ChangedRegions;
use super::consumer_maps::{ConsumerStart, MAX_CONSUMERS};
use super::DirtyBitmap;

impl DirtyBitmap {
    /// Adds a consumer of this bitmap's changes. Like the flusher with
    /// [`take_changed`](Self::take_changed), it takes the regions changed since its own
    /// last take, but from a change map of its own: no consumer's take steals another's
    /// regions. A stream sending a bitmap's changes to another host is one, running beside
    /// the flusher that writes them to disk. Dropping the handle removes the consumer.
    ///
    /// # What a consumer sees
    /// Every change of the bitmap's bits (by [`mark_dirty`](Self::mark_dirty),
    /// [`clear`](Self::clear), [`merge_from`](Self::merge_from),
    /// [`take_dirty`](Self::take_dirty), [`load_region`](Self::load_region)) sets its region
    /// in every consumer's map, as in the primary map. At each
    /// [`ChangeConsumer::take_changed`] a consumer gets every region changed since its own
    /// previous take, and a change racing with a take and the
    /// [`serialize_region`](Self::serialize_region) calls after it is in the bytes
    /// serialized or in the consumer's next take. A region may come once more than needed,
    /// never once less.
    ///
    /// A change racing with the registration itself:
    /// - [`ConsumerStart::AllRegions`]: the first take holds every region, so the first
    ///   take-and-serialize copies the whole bitmap, with every change made before or during
    ///   the registration.
    /// - [`ConsumerStart::Empty`]: a change is in the consumer's first take, or visible to
    ///   every read of the bitmap that happens after `add_consumer` returns, or both. In
    ///   particular every change made by an operation that starts after `add_consumer`
    ///   returns is in the consumer's map.
    ///
    /// As for the primary map, a mark that finds its bits already set returns at once; its
    /// region is recorded by the mark that set them, which may still be running. With the
    /// writers stopped, call [`wait_for_marks`](Self::wait_for_marks) before a consumer's
    /// last take.
    ///
    /// Takes the bitmap's `Arc` so that the handle holds it: a consumer's takes cannot be
    /// applied to another bitmap, and [`resize`](Self::resize) (which needs the only
    /// reference) cannot run while a consumer exists.
    ///
    /// # Errors
    /// [`Error::Unsupported`](crate::Error::Unsupported) when the bitmap already has
    /// [`MAX_CONSUMERS`] consumers.
    pub fn add_consumer(self: &Arc<Self>, start: ConsumerStart) -> crate::Result<ChangeConsumer> {
        let slot = self
            .consumers
            .add(self.region_count(), start)
            .ok_or_else(|| {
                crate::Error::Unsupported(format!(
                    "a bitmap has at most {MAX_CONSUMERS} change consumers at a time"
                ))
            })?;
        Ok(ChangeConsumer {
            bitmap: Arc::clone(self),
            slot,
        })
    }

    /// Number of [`ChangeConsumer`]s this bitmap has now (the primary consumer of
    /// [`take_changed`](Self::take_changed) not included).
    pub fn consumer_count(&self) -> usize {
        self.consumers.count()
    }
}

/// A consumer of one bitmap's changes, from [`DirtyBitmap::add_consumer`]: a change map of
/// its own, set by every change of the bitmap, taken only through this handle. The handle
/// holds the bitmap; dropping it removes the consumer.
///
/// ```
/// use std::sync::Arc;
/// use dirty_bitmap::{ConsumerStart, DirtyBitmap};
///
/// let bitmap = Arc::new(DirtyBitmap::new(1 << 40, 64 << 10)?);
/// let stream = bitmap.add_consumer(ConsumerStart::AllRegions)?;
/// // The stream's first pass sends every region.
/// assert_eq!(stream.take_changed().len(), bitmap.region_count());
///
/// bitmap.mark_dirty(3 << 30, 4096);
/// // The flusher's take leaves the stream's regions alone, and the reverse.
/// assert_eq!(bitmap.take_changed().iter().collect::<Vec<_>>(), vec![1]);
/// let changed = stream.take_changed();
/// assert_eq!(changed.iter().collect::<Vec<_>>(), vec![1]);
/// let mut bytes = vec![0u8; bitmap.region_len(1) as usize];
/// bitmap.serialize_region(1, &mut bytes)?;
/// drop(stream);
/// assert_eq!(bitmap.consumer_count(), 0);
/// # Ok::<(), dirty_bitmap::Error>(())
/// ```
pub struct ChangeConsumer {
    bitmap: Arc<DirtyBitmap>,
    slot: usize,
}

impl fmt::Debug for ChangeConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangeConsumer")
            .field("slot", &self.slot)
            .field("changed_regions", &self.changed_region_count())
            .finish()
    }
}

impl ChangeConsumer {
    /// The bitmap whose changes this consumer sees.
    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.bitmap
    }

    /// Takes the set of regions changed since this consumer's last take (or since it was
    /// added, see [`DirtyBitmap::add_consumer`]) and clears it, leaving every other
    /// consumer's set alone. Serialize the regions after the take, as with
    /// [`DirtyBitmap::take_changed`].
    pub fn take_changed(&self) -> ChangedRegions {
        let taken = self.bitmap.consumers.map(self.slot).take();
        // The change bits are cleared; the caller reads the words next.
        sc_point();
        taken
    }

    /// Marks the regions of `regions` changed again for this consumer, for one whose use of
    /// a take failed (a send that did not arrive).
    pub fn requeue_changed(&self, regions: &ChangedRegions) {
        self.bitmap.consumers.map(self.slot).set_all_of(regions);
    }

    /// Number of regions changed since this consumer's last take, read without taking them.
    pub fn changed_region_count(&self) -> u64 {
        self.bitmap.consumers.map(self.slot).count()
    }
}

impl Drop for ChangeConsumer {
    fn drop(&mut self) {
        self.bitmap.consumers.release(self.slot);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;

    use super::{ConsumerStart, MAX_CONSUMERS};
    use crate::DirtyBitmap;

    const G: u64 = 4096;
    /// Bits per 512-byte region.
    const REGION_BITS: u64 = 512 * 8;

    /// 4 regions of 512 bytes at 4 KiB granularity.
    fn bitmap() -> Arc<DirtyBitmap> {
        Arc::new(DirtyBitmap::with_region_size(4 * REGION_BITS * G, G, 512).unwrap())
    }

    /// Disk offset of the first bit of region `r`.
    fn at(r: u64) -> u64 {
        r * REGION_BITS * G
    }

    fn regions(set: &crate::ChangedRegions) -> Vec<u64> {
        set.iter().collect()
    }

    #[test]
    fn every_consumer_sees_every_change_and_no_take_steals_another_s() {
        let bm = bitmap();
        let a = bm.add_consumer(ConsumerStart::Empty).unwrap();
        let b = bm.add_consumer(ConsumerStart::Empty).unwrap();
        assert_eq!(bm.consumer_count(), 2);
        bm.mark_dirty(at(1), G);
        assert_eq!(regions(&a.take_changed()), vec![1]);
        bm.mark_dirty(at(3), G);
        assert_eq!(regions(&bm.take_changed()), vec![1, 3]);
        assert_eq!(regions(&b.take_changed()), vec![1, 3]);
        assert_eq!(regions(&a.take_changed()), vec![3]);
        assert!(a.take_changed().is_empty());
        assert!(b.take_changed().is_empty());
        assert!(bm.take_changed().is_empty());
    }

    #[test]
    fn a_consumer_starts_empty_or_with_every_region() {
        let bm = bitmap();
        bm.mark_dirty(at(2), G);
        let empty = bm.add_consumer(ConsumerStart::Empty).unwrap();
        let all = bm.add_consumer(ConsumerStart::AllRegions).unwrap();
        assert_eq!(empty.changed_region_count(), 0);
        assert_eq!(all.changed_region_count(), 4);
        assert_eq!(regions(&all.take_changed()), vec![0, 1, 2, 3]);
        assert!(empty.take_changed().is_empty());
        // The primary map is untouched by either registration.
        assert_eq!(regions(&bm.take_changed()), vec![2]);
    }

    #[test]
    fn every_kind_of_change_reaches_the_consumers() {
        let bm = bitmap();
        let c = bm.add_consumer(ConsumerStart::Empty).unwrap();
        bm.mark_dirty(at(0), G);
        let _ = bm.take_changed();
        assert_eq!(regions(&c.take_changed()), vec![0]);

        bm.clear(at(0), G);
        assert_eq!(regions(&c.take_changed()), vec![0]);

        let other = DirtyBitmap::with_region_size(bm.disk_size(), G, 512).unwrap();
        other.mark_dirty(at(1), G);
        bm.merge_from(&other).unwrap();
        assert_eq!(regions(&c.take_changed()), vec![1]);

        let taken = bm.take_dirty();
        assert!(taken.is_dirty(at(1)));
        assert_eq!(regions(&c.take_changed()), vec![1]);
        assert_eq!(regions(&bm.take_changed()), vec![0, 1]);

        // A load changes the bitmap for a consumer, not against the disk it came from.
        let mut bytes = vec![0u8; 512];
        bytes[7] = 0x80;
        bm.load_region(2, &bytes).unwrap();
        assert_eq!(regions(&c.take_changed()), vec![2]);
        assert!(bm.take_changed().is_empty());
        // Loading the same bytes again changes nothing.
        bm.load_region(2, &bytes).unwrap();
        assert!(c.take_changed().is_empty());
    }

    #[test]
    fn a_requeued_set_comes_back_to_its_consumer_only() {
        let bm = bitmap();
        let a = bm.add_consumer(ConsumerStart::Empty).unwrap();
        let b = bm.add_consumer(ConsumerStart::Empty).unwrap();
        bm.mark_dirty(at(1), G);
        let taken = a.take_changed();
        assert!(b.take_changed().contains(1));
        a.requeue_changed(&taken);
        assert_eq!(a.changed_region_count(), 1);
        assert_eq!(b.changed_region_count(), 0);
        assert_eq!(regions(&a.take_changed()), vec![1]);
    }

    #[test]
    fn dropping_a_consumer_frees_its_slot_and_a_new_owner_starts_clean() {
        let bm = bitmap();
        let mut held: Vec<_> = (0..MAX_CONSUMERS)
            .map(|_| bm.add_consumer(ConsumerStart::Empty).unwrap())
            .collect();
        assert!(matches!(
            bm.add_consumer(ConsumerStart::Empty),
            Err(crate::Error::Unsupported(_))
        ));
        bm.mark_dirty(at(3), G);
        assert!(held.iter().all(|c| c.changed_region_count() == 1));
        // The dropped consumer leaves region 3 untaken in its map.
        held.pop();
        assert_eq!(bm.consumer_count(), MAX_CONSUMERS - 1);
        let again = bm.add_consumer(ConsumerStart::Empty).unwrap();
        assert!(
            again.take_changed().is_empty(),
            "a stale region of the slot"
        );
        bm.mark_dirty(at(0), G);
        assert_eq!(regions(&again.take_changed()), vec![0]);
        drop(again);
        drop(held);
        assert_eq!(bm.consumer_count(), 0);
        // With no consumer the bitmap is shared by nobody else again.
        assert_eq!(Arc::strong_count(&bm), 1);
    }

    #[test]
    fn a_consumer_is_tied_to_its_bitmap_and_counted_in_its_memory() {
        let bm = bitmap();
        let before = bm.memory_usage();
        let c = bm.add_consumer(ConsumerStart::Empty).unwrap();
        assert!(Arc::ptr_eq(c.bitmap(), &bm));
        // One 64-bit word for 4 regions.
        assert_eq!(bm.memory_usage(), before + 8);
        // The map stays allocated for the slot's next owner.
        drop(c);
        assert_eq!(bm.memory_usage(), before + 8);
        let copy = bm.snapshot();
        assert_eq!(copy.consumer_count(), 0);
        assert!(format!(
            "{c:?}",
            c = bm.add_consumer(ConsumerStart::AllRegions).unwrap()
        )
        .contains("changed_regions: 4"));
    }
}
