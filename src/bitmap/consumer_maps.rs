//! The change maps of a bitmap's extra consumers (the handles are in `consumers.rs`): each
//! has a map of its own, set by every change as the primary map is, so that each sees every
//! change whatever the others take.
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
use std::sync::OnceLock;

use super::atomic::{sc_point, AtomicU64};
use super::change_map::ChangeMap;

/// How many [`ChangeConsumer`](crate::ChangeConsumer)s one bitmap can have at a time,
/// besides the primary consumer that
/// [`DirtyBitmap::take_changed`](crate::DirtyBitmap::take_changed) serves.
pub const MAX_CONSUMERS: usize = 8;

/// The bits of `active` and `claimed` that name a slot.
const ALL_SLOTS: u64 = (1 << MAX_CONSUMERS) - 1;

/// What a new consumer's first take holds, besides the changes made after it was added (see
/// [`DirtyBitmap::add_consumer`](crate::DirtyBitmap::add_consumer)).
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
pub(crate) struct ConsumerMaps {
    /// Bit i: slot i's map records changes. The mark path reads only this word while it is 0.
    active: AtomicU64,
    /// Bit i: slot i belongs to a `ChangeConsumer`, or is being set up or released.
    claimed: AtomicU64,
    /// Slot i's map, allocated at the first claim of slot i, for the bitmap's region count.
    maps: [OnceLock<ChangeMap>; MAX_CONSUMERS],
}

impl fmt::Debug for ConsumerMaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerMaps")
            .field("active", &format_args!("{:#b}", self.active.load(SeqCst)))
            .finish()
    }
}

impl ConsumerMaps {
    pub fn new() -> Self {
        ConsumerMaps {
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

    /// Whether any consumer is registered now: [`record`](Self::record) has work to do.
    #[inline(always)]
    pub fn any_active(&self) -> bool {
        self.active.load(SeqCst) != 0
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
    pub fn add(&self, nregions: u64, start: ConsumerStart) -> Option<usize> {
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
    pub fn release(&self, i: usize) {
        self.active.fetch_and(!(1 << i), SeqCst);
        self.claimed.fetch_and(!(1 << i), SeqCst);
    }

    /// Slot `i`'s map; `i` is the slot of a live `ChangeConsumer`.
    pub fn map(&self, i: usize) -> &ChangeMap {
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
