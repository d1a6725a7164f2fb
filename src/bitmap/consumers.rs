//! Extra consumers of the change map: each has a map of its own, set by every change as the
//! primary map is, so that each sees every change whatever the others take.
//!
//! # The slot table
//! [`MAX_CONSUMERS`] slots, each with a change map allocated the first time the slot is
//! claimed and kept for the bitmap's life. A change never reads a map that could be freed
//! under it, so the mark path needs no lock, no reference count and no deferred
//! reclamation. Bit i of `active` is set while slot i records changes; it is the only word
//! the mark path reads while no consumer exists. Bit i of `claimed` is set from the claim of
//! slot i to the end of its release, so that two registrations never share a slot.
//!
//! # A registration racing a change
//! A change writes its leaf word (a `SeqCst` read-modify-write), then reads `active` (after
//! the summaries and the primary map, with `sc_point` after the word). A registration
//! prepares slot i's map, publishes bit i in `active` (a `SeqCst` read-modify-write), then
//! passes an `sc_point`. In the total order either the change's read of `active` comes
//! after the publication, and the change sets its region in slot i's map; or it comes
//! before, and so does the word write, which every read made after the registration returns
//! therefore sees. A change is in the new consumer's map, or visible to whatever reads the
//! bitmap after `add_consumer` returns, or both.
//!
//! # Release
//! A release clears bit i of `active`, then of `claimed`. A change that read `active` before
//! the release may still set its region in slot i's map afterwards, even once the slot is
//! claimed again: the next owner then sees that region once more than needed, never once
//! less.

use std::fmt;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, OnceLock};

use super::atomic::{sc_point, AtomicU64};
use super::change_map::{ChangeMap, ChangedRegions};
use super::DirtyBitmap;

/// How many [`ChangeConsumer`]s one bitmap can have at a time, besides the primary consumer
/// that [`DirtyBitmap::take_changed`] serves.
pub const MAX_CONSUMERS: usize = 8;

/// The bits of `active` and `claimed` that name a slot.
const ALL_SLOTS: u64 = (1 << MAX_CONSUMERS) - 1;

/// What a new consumer's first take holds, besides the changes made after it was added (see
/// [`DirtyBitmap::add_consumer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerStart {
    /// Nothing: the consumer sees the changes from its registration on. For a consumer that
    /// reads the whole bitmap after `add_consumer` returns, or that needs no earlier state.
    Empty,
    /// Every region: the first take-and-serialize copies the whole bitmap. For a consumer
    /// that starts from nothing, such as a stream to another host.
    AllRegions,
}

/// The slot table of a bitmap's extra consumers.
pub(crate) struct Consumers {
    /// Bit i: slot i's map records changes. The mark path reads only this word while it is 0.
    active: AtomicU64,
    /// Bit i: slot i belongs to a [`ChangeConsumer`], or is being set up or released.
    claimed: AtomicU64,
    /// Slot i's map, allocated at the first claim of slot i, for the bitmap's region count.
    maps: [OnceLock<ChangeMap>; MAX_CONSUMERS],
}

impl fmt::Debug for Consumers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumers")
            .field("active", &format_args!("{:#b}", self.active.load(SeqCst)))
            .finish()
    }
}

impl Consumers {
    pub fn new() -> Self {
        Consumers {
            active: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            maps: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// Sets region `r` in every active consumer's map: one load and a branch while there is
    /// none. Called after the change's word write and the `sc_point` that follows it.
    #[inline(always)]
    pub fn record(&self, r: u64) {
        let active = self.active.load(SeqCst);
        if active != 0 {
            self.record_in(active, r);
        }
    }

    #[inline(never)]
    fn record_in(&self, mut active: u64, r: u64) {
        while active != 0 {
            let i = active.trailing_zeros() as usize;
            active &= active - 1;
            // Bit i was published after the map was set up, and the load above synchronised
            // with that publication: the map is there.
            if let Some(map) = self.maps.get(i).and_then(OnceLock::get) {
                map.set(r);
            }
        }
    }

    /// Number of consumers registered now.
    pub fn count(&self) -> usize {
        self.active.load(SeqCst).count_ones() as usize
    }

    /// Claims a free slot, prepares its map for `start` and publishes it; `None` when every
    /// slot is taken. Every change whose read of `active` follows the publication sets its
    /// region in the slot's map; every change before it is visible to the caller's reads
    /// after this returns (see the module's documentation).
    fn add(&self, nregions: u64, start: ConsumerStart) -> Option<usize> {
        let i = self.claim()?;
        let map = self.maps[i].get_or_init(|| ChangeMap::new(nregions));
        // A previous owner's regions, and those of changes that read `active` before its
        // release, belong to nobody now.
        let _ = map.take();
        if start == ConsumerStart::AllRegions {
            map.set_every();
        }
        self.active.fetch_or(1 << i, SeqCst);
        // The publication is made; the caller reads the words next.
        sc_point();
        Some(i)
    }

    /// Takes a free bit of `claimed`.
    fn claim(&self) -> Option<usize> {
        let mut claimed = self.claimed.load(SeqCst);
        loop {
            let free = !claimed & ALL_SLOTS;
            if free == 0 {
                return None;
            }
            let bit = free & free.wrapping_neg();
            match self
                .claimed
                .compare_exchange(claimed, claimed | bit, SeqCst, SeqCst)
            {
                Ok(_) => return Some(bit.trailing_zeros() as usize),
                Err(now) => claimed = now,
            }
        }
    }

    /// Stops recording into slot `i` and frees it.
    fn release(&self, i: usize) {
        self.active.fetch_and(!(1 << i), SeqCst);
        self.claimed.fetch_and(!(1 << i), SeqCst);
    }

    /// Slot `i`'s map; `i` is the slot of a live [`ChangeConsumer`].
    fn map(&self, i: usize) -> &ChangeMap {
        self.maps[i]
            .get()
            .expect("a consumer's slot has its map from the claim on")
    }

    /// Heap bytes of the maps allocated so far.
    pub fn memory_usage(&self) -> usize {
        self.maps
            .iter()
            .filter_map(OnceLock::get)
            .map(ChangeMap::memory_usage)
            .sum()
    }
}

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
