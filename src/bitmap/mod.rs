//! The layered in-memory dirty bitmap.
//!
//! Three layers, described in `docs/DESIGN.md`:
//! 1. leaf words: one bit per granule, set lock-free by any number of threads;
//! 2. summary levels: an *any* tower for finding dirty bits and a *full* tower for finding
//!    clean bits, each skipping 512 bits per level-1 bit and 64× more per level above;
//! 3. the change maps: one bit per region of the serialized bitmap. The primary map tells
//!    the flusher which parts of the on-disk copy are stale ([`ChangedRegions`]); each
//!    [`ChangeConsumer`] has a map of its own, set by the same changes (`consumer_maps.rs`,
//!    `consumers.rs`).
//!
//! Every mutation of a leaf word is followed by the same bookkeeping, in this order: the
//! counter, both towers, then the change maps (the primary one, then each consumer's). A
//! mark that may write a word announces itself in its thread's slot first and withdraws
//! after the change maps (`count.rs`), so that [`DirtyBitmap::wait_for_marks`] and
//! [`DirtyBitmap::set_enabled`] know when no mark is half done.

mod atomic;
mod barrier;
mod change_map;
mod consumer_maps;
mod consumers;
mod count;
mod geometry;
mod hold;
mod iter;
mod summary;
mod words;

use std::fmt;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};

pub use change_map::{ChangedRegions, IntoRegions, Regions};
pub use consumer_maps::{ConsumerStart, MAX_CONSUMERS};
pub use consumers::ChangeConsumer;
pub use geometry::{
    DEFAULT_REGION_SIZE, MAX_BITS, MAX_GRANULARITY, MAX_REGION_SIZE, MIN_GRANULARITY,
    MIN_REGION_SIZE,
};
pub(crate) use hold::IncompleteHold;
pub use iter::DirtyExtents;

use crate::error::{invalid_input, Result};
use atomic::{sc_point, AtomicU64, AtomicU8};
use change_map::ChangeMap;
use consumer_maps::ConsumerMaps;
#[cfg(loom)]
pub(crate) use count::use_shared_slot;
use count::{InFlight, OwnMark, ThreadSlots};
use geometry::Geometry;
use summary::{AnyTower, FullTower, BLOCK_WORDS};
use words::Words;

/// A dirty bitmap for one disk: bit n records whether disk bytes `[n·g, (n+1)·g)` were
/// written, where g is the granularity. The last bit may cover a partial granule.
///
/// All methods except [`resize`](Self::resize) take `&self`, and marking is lock-free, so
/// one bitmap can be shared (for example in an `Arc`) by every I/O thread of a disk.
///
/// ```
/// use dirty_bitmap::DirtyBitmap;
///
/// let bitmap = DirtyBitmap::new(16 << 40, 64 << 10)?; // 16 TiB at 64 KiB
/// bitmap.mark_dirty(4096, 4096);
/// bitmap.mark_dirty(1 << 30, 1 << 20);
/// let extents: Vec<(u64, u64)> = bitmap.dirty_extents().collect();
/// assert_eq!(extents, vec![(0, 64 << 10), (1 << 30, 1 << 20)]);
/// assert_eq!(bitmap.dirty_bytes(), (64 << 10) + (1 << 20));
/// # Ok::<(), dirty_bitmap::Error>(())
/// ```
pub struct DirtyBitmap {
    geo: Geometry,
    words: Words,
    any: AnyTower,
    full: FullTower,
    /// The primary change map: the flusher's ([`take_changed`](Self::take_changed)).
    changes: ChangeMap,
    /// The extra consumers' change maps ([`add_consumer`](Self::add_consumer)).
    consumers: ConsumerMaps,
    slots: ThreadSlots,
    /// [`ENABLED`], [`SEALED`] and [`FENCED`]: one load tells a mark whether it may take
    /// the short path ([`mark_word`](Self::mark_word)).
    state: AtomicU8,
    /// Holds of [`hold_incomplete`](Self::hold_incomplete) not released yet (`hold.rs`).
    incomplete: AtomicU64,
    /// 1 once the public [`take_changed`](Self::take_changed) or
    /// [`load_region`](Self::load_region) may have hidden a change from the primary map's
    /// owner (a store's flusher), until that owner's next take
    /// ([`take_primary`](Self::take_primary)), which then takes every region.
    disturbed: AtomicU8,
    /// Public takes and loads in progress: while one runs, the owner's takes return every
    /// region and leave `disturbed` set, and `primary_pending` counts every region.
    disturbing: AtomicU64,
}

/// `state` bit: marks are recorded ([`set_enabled`](DirtyBitmap::set_enabled)).
const ENABLED: u8 = 1;
/// `state` bit, set by [`seal`](DirtyBitmap::seal): a mark that would write waits until
/// [`unseal`](DirtyBitmap::unseal) instead of writing.
const SEALED: u8 = 2;
/// `state` bit, fixed when the bitmap is built: this process's light barrier is a real
/// fence (`barrier.rs`), so marks take the general path, which issues it.
const FENCED: u8 = 4;

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("disk_size", &self.geo.disk_size)
            .field("granularity", &self.geo.granularity)
            .field("bits", &self.geo.nbits)
            .field("dirty_bits", &self.count())
            .field("region_size", &self.geo.region_size)
            .field("changed_regions", &self.changes.count())
            .field("consumers", &self.consumers.count())
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

impl DirtyBitmap {
    /// A clean, enabled bitmap for a disk of `disk_size` bytes with one bit per
    /// `granularity` bytes, and change-map regions of [`DEFAULT_REGION_SIZE`].
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput), naming the value, when the
    /// granularity is not a power of two from 512 B to 2 GiB, when `disk_size` is 0, or
    /// when ceil(disk_size / granularity) exceeds qcow2's limit of 2^32 bits.
    pub fn new(disk_size: u64, granularity: u64) -> Result<Self> {
        Self::with_region_size(disk_size, granularity, DEFAULT_REGION_SIZE)
    }

    /// Like [`new`](Self::new), with change-map regions of `region_size` bytes of
    /// serialized bitmap (a power of two from 512 B to 2 MiB).
    ///
    /// # Errors
    /// As [`new`](Self::new), and [`Error::InvalidInput`](crate::Error::InvalidInput)
    /// for a region size out of range.
    pub fn with_region_size(disk_size: u64, granularity: u64, region_size: u64) -> Result<Self> {
        Ok(Self::from_geometry(Geometry::new(
            disk_size,
            granularity,
            region_size,
        )?))
    }

    /// Whether [`with_region_size`](Self::with_region_size) would accept this geometry,
    /// allocating nothing: a caller that must refuse before it changes anything asks
    /// this first.
    ///
    /// # Errors
    /// As [`with_region_size`](Self::with_region_size).
    pub(crate) fn check_geometry(disk_size: u64, granularity: u64, region_size: u64) -> Result<()> {
        Geometry::new(disk_size, granularity, region_size).map(|_| ())
    }

    fn from_geometry(geo: Geometry) -> Self {
        barrier::init();
        let fenced = if barrier::free_light_is_valid() {
            0
        } else {
            FENCED
        };
        let nblocks = (geo.nwords() as u64).div_ceil(BLOCK_WORDS as u64);
        DirtyBitmap {
            words: Words::new(geo.nbits),
            any: AnyTower::new(nblocks),
            full: FullTower::new(nblocks),
            changes: ChangeMap::new(geo.nregions()),
            consumers: ConsumerMaps::new(),
            slots: ThreadSlots::new(),
            state: AtomicU8::new(ENABLED | fenced),
            incomplete: AtomicU64::new(0),
            disturbed: AtomicU8::new(0),
            disturbing: AtomicU64::new(0),
            geo,
        }
    }

    /// Words of the bitmap.
    pub(crate) fn word_count(&self) -> usize {
        self.words.len()
    }

    /// Disk bytes covered.
    pub fn disk_size(&self) -> u64 {
        self.geo.disk_size
    }

    /// Disk bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.geo.granularity
    }

    /// Number of bits: ceil(disk_size / granularity).
    pub fn bit_count(&self) -> u64 {
        self.geo.nbits
    }

    /// Whether marks are recorded. A disabled bitmap ignores [`mark_dirty`](Self::mark_dirty),
    /// as QEMU's disabled bitmaps do; every other operation still works.
    pub fn is_enabled(&self) -> bool {
        self.state.load(SeqCst) & ENABLED != 0
    }

    /// Enables or disables recording of marks.
    ///
    /// Disabling waits for the marks in flight: once `set_enabled(false)` returns, no word
    /// of this bitmap gains a bit from any mark, however long a range it was marking. It
    /// waits for marks already running, each a bounded amount of work (a range mark for
    /// as long as its range takes): those of this bitmap, and the
    /// [`Tracker::mark`](crate::Tracker::mark) fan-outs over several bitmaps anywhere in
    /// the process (see below). A thread beyond the first 32 that mark shares one
    /// counter with the others beyond them, and the wait there lasts until that counter
    /// reads zero: marks such threads start during the wait can prolong it. No mark waits for a [`seal`](Self::seal) while it is
    /// announced (a fan-out that meets one withdraws and starts again after the unseal), so
    /// a bitmap sealed elsewhere holds up only its own writers. Enabling does not wait.
    ///
    /// # Handing marking over to another bitmap
    /// To move recording from bitmap A to bitmap B (a new checkpoint) without losing a
    /// write, enable B first, then disable A: a write marked in between lands in both,
    /// which costs at most a spurious dirty bit. The reverse order loses a write marked
    /// between the two calls. With both bitmaps in one [`Tracker`](crate::Tracker) this
    /// holds whatever their order there: disabling first waits for every fan-out
    /// ([`Tracker::mark`](crate::Tracker::mark)) in flight, so one that found B still
    /// disabled also finds A still enabled. Make both calls from one thread, or order
    /// them with your own synchronisation.
    pub fn set_enabled(&self, enabled: bool) {
        if enabled {
            self.state.fetch_or(ENABLED, SeqCst);
            return;
        }
        // A fan-out that read another bitmap as disabled before it was enabled must find
        // this one enabled: wait for the fan-outs that started before this point. The heavy
        // barrier pairs with the light one after `begin_fan_out`'s slot store: either the
        // fan-out's reads of the flags come after everything before this call (the
        // other bitmap's enable), or its slot store is visible to the wait below.
        barrier::heavy();
        count::fan_out().wait_for_marks();
        self.state.fetch_and(!ENABLED, SeqCst);
        // A mark writes a word only after reading the flag true between its begin_mark
        // and its first write, behind a light barrier. The pair of barriers makes the
        // wait see that mark's slot odd, or the mark read the flag false.
        barrier::heavy();
        self.slots.wait_for_marks();
    }

    /// Sets the enabled flag of a bitmap no other thread can reach yet (just built or
    /// loaded), without the waits of [`set_enabled`](Self::set_enabled).
    pub(crate) fn set_enabled_unshared(&self, enabled: bool) {
        if enabled {
            self.state.fetch_or(ENABLED, SeqCst);
        } else {
            self.state.fetch_and(!ENABLED, SeqCst);
        }
    }

    /// Whether a mark of this bitmap that may write is running now: one that found a bit of
    /// its range clear and has not yet recorded its change-map region.
    ///
    /// Why it matters for a persistent copy: a mark that finds its bits already set returns
    /// at once (one load), relying on the mark that set them to record the change-map
    /// region, and that mark may still be running. Once the writers have returned (the
    /// guest stopped, its writes acknowledged), a call that synchronises with them
    /// afterwards (for example through the stop itself) returns true, or the region of
    /// every bit they saw set is visible: in the change map, or taken by a
    /// [`take_changed`](Self::take_changed) ordered after the record, whose serialization
    /// then holds the bit. So a store that writes the bitmap out as consistent waits
    /// ([`wait_for_marks`](Self::wait_for_marks)) before its last take-and-serialize, and
    /// afterwards checks that this is false and that no region changed.
    ///
    /// A snapshot: new marks may start right after it returns.
    pub fn marks_in_flight(&self) -> bool {
        self.slots.marks_in_flight()
    }

    /// A mark of `[offset, offset + len)` (enabled or not) that runs `pause` after writing
    /// its words and before recording their change-map regions, announced throughout, as a
    /// mark descheduled between the two steps of [`set_bits`](Self::set_bits): tests of
    /// callers that must not take a set bit for a recorded one.
    #[cfg(test)]
    pub(crate) fn mark_pausing_before_its_record(
        &self,
        offset: u64,
        len: u64,
        pause: impl FnOnce(),
    ) {
        let Some((first, end)) = self.geo.touched_bits(offset, len) else {
            return;
        };
        let mark = self.begin_unsealed_mark();
        let mut changed = Vec::new();
        for_each_word(first, end, |w, mask| {
            let old = self.words.get(w).fetch_or(mask, SeqCst);
            changed.push((w, old, old | mask));
        });
        pause();
        for (w, old, new) in changed {
            if new != old {
                self.after_change(w, old, new);
            }
        }
        self.slots.end_mark(mark);
    }

    /// Waits until no mark that was in flight when it was called (see
    /// [`marks_in_flight`](Self::marks_in_flight)) still is: afterwards, the words,
    /// towers and change-map regions of every such mark are visible to this thread. Spins,
    /// then yields.
    ///
    /// It does not stop new marks: one that starts during the call may or may not be
    /// waited for, and marks may run again as soon as it returns. Stop the writers first
    /// (or disable the bitmap with [`set_enabled`](Self::set_enabled)) when that matters.
    pub fn wait_for_marks(&self) {
        self.slots.wait_for_marks();
    }

    /// Marks every granule touched by disk bytes `[offset, offset + len)` dirty.
    ///
    /// Lock-free, from any number of threads. Costs one atomic read-modify-write per
    /// 64-bit word that gains a bit, and none for bits already dirty. The range is clamped
    /// to the disk; `len == 0` and ranges past the end mark nothing. Ignored while the
    /// bitmap is disabled.
    #[inline(always)]
    pub fn mark_dirty(&self, offset: u64, len: u64) {
        self.mark::<true>(offset, len);
    }

    /// [`mark_dirty`](Self::mark_dirty) for a fan-out over several bitmaps
    /// ([`mark_fanned_out`]), which must never wait while it is announced: on a sealed
    /// bitmap it returns false having written nothing, where `mark_dirty` waits for the
    /// unseal. True when the mark is done (or the bitmap is disabled).
    #[inline(always)]
    pub(crate) fn mark_dirty_unless_sealed(&self, offset: u64, len: u64) -> bool {
        self.mark::<false>(offset, len)
    }

    /// The dispatch of [`mark_dirty`](Self::mark_dirty) (`WAIT`: wait while sealed) and
    /// [`mark_dirty_unless_sealed`](Self::mark_dirty_unless_sealed) (give up instead, and
    /// return false).
    #[inline(always)]
    fn mark<const WAIT: bool>(&self, offset: u64, len: u64) -> bool {
        match self.one_word(offset, len) {
            // Bits already set need nothing, enabled or not: one plain load.
            Some((w, mask)) => self.words.load(w) & mask == mask || self.mark_word::<WAIT>(w, mask),
            None => self.mark_dirty_range::<WAIT>(offset, len),
        }
    }

    /// Whether [`mark_dirty`](Self::mark_dirty)`(offset, len)` would return on its fast
    /// path: the range lies in one word whose bits are all set. One plain load.
    #[inline(always)]
    pub(crate) fn already_marked(&self, offset: u64, len: u64) -> bool {
        self.one_word(offset, len)
            .is_some_and(|(w, mask)| self.words.load(w) & mask == mask)
    }

    /// The fast path's case: a non-empty range inside the disk whose bits lie in one word,
    /// as `(word, mask)`.
    #[inline(always)]
    fn one_word(&self, offset: u64, len: u64) -> Option<(usize, u64)> {
        // `last` is below `offset` only when `offset + len - 1` overflowed.
        let last = offset.wrapping_add(len).wrapping_sub(1);
        if len == 0 || last < offset || last >= self.geo.disk_size {
            return None;
        }
        let first_bit = offset >> self.geo.granularity_bits;
        let last_bit = last >> self.geo.granularity_bits;
        let w = (first_bit / 64) as usize;
        if first_bit == last_bit {
            // A write inside one granule, the most common case.
            Some((w, 1u64 << (first_bit % 64)))
        } else if w == (last_bit / 64) as usize {
            Some((w, word_mask(first_bit, last_bit + 1)))
        } else {
            None
        }
    }

    /// Sets `mask` in word `w` if the bitmap is enabled. Kept out of line so that the
    /// already-dirty check in [`mark_dirty`](Self::mark_dirty) inlines into its callers.
    ///
    /// The short path is the general protocol ([`mark_word_slow`](Self::mark_word_slow))
    /// for its common case: `state` is exactly [`ENABLED`] (enabled, not sealed, a free
    /// light barrier) when read before the announcement and again after it. The read
    /// after the announcement and the light barrier is the one the protocol rests on
    /// (see [`set_enabled`](Self::set_enabled) and [`seal`](Self::seal)); any other state
    /// withdraws the announcement and takes the general path from the start.
    ///
    /// After the write it does the bookkeeping of [`after_change`](Self::after_change) in
    /// the same order, reading first whether each step has anything to do: while the
    /// block's summary bit is set, the word is not full, the region's change bit is set
    /// and no consumer is registered, it writes only the counter. Otherwise
    /// [`finish_mark`](Self::finish_mark) does every step from the first. The summary bit
    /// is read whatever `old` was: a branch on `old == 0` would wait for the `fetch_or`,
    /// and is taken or not at random when marks land on fresh words now and then. The rare
    /// steps are tail calls, so the short path keeps few values live and saves three
    /// registers instead of six.
    ///
    /// False only when `WAIT` is false and the general path found the bitmap sealed (the
    /// short path never waits: a sealed state sends it to the general path).
    #[inline(never)]
    fn mark_word<const WAIT: bool>(&self, w: usize, mask: u64) -> bool {
        if self.state.load(SeqCst) == ENABLED {
            if let Some(mark) = self.slots.begin_own_mark() {
                // `state` had no FENCED bit, so this process's light barrier is free.
                barrier::light_free();
                if self.state.load(SeqCst) == ENABLED {
                    // The caller's load just saw a bit of `mask` clear: go straight to the
                    // write.
                    let old = self.words.get(w).fetch_or(mask, SeqCst);
                    let new = old | mask;
                    if new != old {
                        // The word changed; what follows reads the summaries and the
                        // change map.
                        sc_point();
                        self.slots.add_own(&mark, count::ones(mask & !old));
                        let b = (w / BLOCK_WORDS) as u64;
                        if !self.any.block_is_set(b) || new == self.words.valid(w) {
                            return self.finish_mark(w, new, mark);
                        }
                        let r = (w >> self.geo.region_word_shift()) as u64;
                        if !self.changes.is_set(r) || self.consumers.any_active() {
                            return self.finish_mark_change(r, mark);
                        }
                    }
                    self.slots.end_own_mark(mark);
                    return true;
                }
                self.slots.end_own_mark(mark);
            }
        }
        self.mark_word_slow::<WAIT>(w, mask)
    }

    /// The rest of [`mark_word`](Self::mark_word)'s bookkeeping after its counter, from the
    /// summaries on: word `w` is now `new` (or later), and non-zero.
    #[cold]
    #[inline(never)]
    fn finish_mark(&self, w: usize, new: u64, mark: OwnMark) -> bool {
        let b = (w / BLOCK_WORDS) as u64;
        self.any.set_block(b);
        if new == self.words.valid(w) && self.block_is_full(b) {
            self.full.set(b, &|| self.block_is_full(b));
        }
        self.finish_mark_change((w >> self.geo.region_word_shift()) as u64, mark)
    }

    /// The change maps' part of [`mark_word`](Self::mark_word)'s bookkeeping, and its end.
    /// Returns true, [`mark_word`](Self::mark_word)'s "done", so that both stay tail calls.
    #[cold]
    #[inline(never)]
    fn finish_mark_change(&self, r: u64, mark: OwnMark) -> bool {
        self.record_change(r);
        self.slots.end_own_mark(mark);
        true
    }

    /// [`mark_word`](Self::mark_word) in every state: disabled (one load, no
    /// announcement), sealed (wait, or with `WAIT` false return false having written
    /// nothing), or with a light barrier that is a real fence.
    #[cold]
    #[inline(never)]
    fn mark_word_slow<const WAIT: bool>(&self, w: usize, mask: u64) -> bool {
        #[cfg(all(test, not(loom)))]
        tests::SLOW_MARKS.with(|n| n.set(n.get() + 1));
        if !self.is_enabled() {
            return true;
        }
        let Some(mark) = self.begin_mark_after_seal::<WAIT>() else {
            return false;
        };
        if self.is_enabled() {
            let old = self.words.get(w).fetch_or(mask, SeqCst);
            if old | mask != old {
                self.after_change(w, old, old | mask);
            }
        }
        self.slots.end_mark(mark);
        true
    }

    /// The general case of [`mark_dirty`](Self::mark_dirty): clamping, several words. On
    /// a sealed bitmap as [`mark_word_slow`](Self::mark_word_slow).
    #[inline(never)]
    fn mark_dirty_range<const WAIT: bool>(&self, offset: u64, len: u64) -> bool {
        if !self.is_enabled() {
            return true;
        }
        let Some((first, end)) = self.geo.touched_bits(offset, len) else {
            return true;
        };
        // On a sealed bitmap, a range whose bits are all set needs nothing, as on the
        // one-word fast path (see `seal`): it returns at once instead of waiting for the
        // unseal, which under a stop that keeps its marks held never comes.
        if self.is_sealed() && self.all_set(first, end) {
            return true;
        }
        let Some(mark) = self.begin_mark_after_seal::<WAIT>() else {
            return false;
        };
        if self.is_enabled() {
            for_each_word(first, end, |w, mask| self.set_bits(w, mask));
        }
        self.slots.end_mark(mark);
        true
    }

    /// Announces a mark that may write (see [`ThreadSlots::begin_mark`]); the caller reads
    /// `enabled` again after this and before its first write, and calls `end_mark` after
    /// its last change-map bit. The light barrier orders the slot store before that read,
    /// against the heavy barrier in [`set_enabled`](Self::set_enabled).
    #[inline(always)]
    fn begin_mark(&self) -> InFlight {
        let mark = self.slots.begin_mark();
        barrier::light();
        mark
    }

    /// [`begin_mark`](Self::begin_mark), waiting first while the bitmap is sealed: the
    /// announcement is withdrawn during the wait, so a sealer's `wait_for_marks` never
    /// waits for a mark that waits for it. After the announcement the seal is read again
    /// behind the same light barrier as `enabled`, so a mark either is waited for by
    /// [`seal`](Self::seal) or finds the seal and waits.
    #[inline(always)]
    fn begin_unsealed_mark(&self) -> InFlight {
        loop {
            self.wait_while_sealed();
            if let Some(mark) = self.begin_mark_unless_sealed() {
                return mark;
            }
        }
    }

    /// [`begin_mark`](Self::begin_mark) on a bitmap found unsealed after the announcement
    /// (the read [`begin_unsealed_mark`](Self::begin_unsealed_mark) rests on), or `None`,
    /// with nothing announced, on a sealed one.
    #[inline(always)]
    fn begin_mark_unless_sealed(&self) -> Option<InFlight> {
        if self.is_sealed() {
            return None;
        }
        let mark = self.begin_mark();
        if !self.is_sealed() {
            return Some(mark);
        }
        self.slots.end_mark(mark);
        None
    }

    /// [`begin_unsealed_mark`](Self::begin_unsealed_mark) with `WAIT`, else
    /// [`begin_mark_unless_sealed`](Self::begin_mark_unless_sealed).
    #[inline(always)]
    fn begin_mark_after_seal<const WAIT: bool>(&self) -> Option<InFlight> {
        if WAIT {
            Some(self.begin_unsealed_mark())
        } else {
            self.begin_mark_unless_sealed()
        }
    }

    /// Returns once the bitmap is found unsealed (spins, then yields).
    fn wait_while_sealed(&self) {
        let mut spins = 0;
        while self.is_sealed() {
            atomic::backoff(&mut spins);
        }
    }

    /// Seals the bitmap: from now on a mark that would write a word waits until
    /// [`unseal`](Self::unseal), and `seal` returns once every mark that was writing has
    /// finished (its words and change-map regions visible to this thread). A mark whose
    /// bits are already set still returns at once: every such bit was set by a mark that
    /// finished before the seal, or that the seal waited for.
    ///
    /// A store seals its bitmaps while it writes them out as consistent, so that no mark
    /// can complete (and no guest write it guards can go ahead) between the last
    /// take-and-serialize and the moment the outcome is durable; see
    /// `BitmapStore::inactivate`. Marks of a sealed bitmap block their threads: unseal
    /// promptly, also on every error path.
    pub fn seal(&self) {
        Self::seal_all(&[self]);
    }

    /// [`seal`](Self::seal)s every bitmap of `bitmaps` with one heavy barrier for all of
    /// them, so that a stop sealing several bitmaps pays the barrier once.
    pub fn seal_all(bitmaps: &[&DirtyBitmap]) {
        for b in bitmaps {
            b.state.fetch_or(SEALED, SeqCst);
        }
        // The same pairing as disabling: a mark reads the seal after its announcement and
        // a light barrier; the heavy barrier makes the waits below see the announcement,
        // or the mark see the seal.
        barrier::heavy();
        for b in bitmaps {
            b.slots.wait_for_marks();
        }
    }

    /// Lifts [`seal`](Self::seal): the marks waiting go on.
    pub fn unseal(&self) {
        self.state.fetch_and(!SEALED, SeqCst);
    }

    /// Whether the bitmap is sealed.
    pub fn is_sealed(&self) -> bool {
        self.state.load(SeqCst) & SEALED != 0
    }

    /// Marks clean every granule that lies entirely inside disk bytes `[offset, offset + len)`.
    ///
    /// A granule only partly inside the range stays dirty: when in doubt, dirty. The last
    /// granule of the disk counts as entirely inside when the range reaches the disk's end.
    pub fn clear(&self, offset: u64, len: u64) {
        if let Some((first, end)) = self.geo.covered_bits(offset, len) {
            for_each_word(first, end, |w, mask| self.clear_bits(w, mask));
        }
    }

    /// Whether the granule holding disk byte `offset` is dirty. False past the end.
    pub fn is_dirty(&self, offset: u64) -> bool {
        if offset >= self.geo.disk_size {
            return false;
        }
        let bit = offset >> self.geo.granularity_bits;
        self.words.load((bit / 64) as usize) & (1 << (bit % 64)) != 0
    }

    /// Number of dirty bits, in O(1), at most [`bit_count`](Self::bit_count).
    ///
    /// Exact when no mark or clear is running. While they race, the per-thread counters it
    /// sums can be caught mid-update, so the figure can be off by the operations in
    /// flight; a sum above the bit count (including one that went below zero and wrapped)
    /// reads as the bit count: when in doubt, dirty.
    pub fn count(&self) -> u64 {
        self.slots.count().min(self.geo.nbits)
    }

    /// Disk bytes covered by dirty bits (the last partial granule counts its real size), at
    /// most [`disk_size`](Self::disk_size). Inherits [`count`](Self::count)'s
    /// imprecision while marks and clears run.
    pub fn dirty_bytes(&self) -> u64 {
        // count() <= nbits <= 2^32 and granularity <= 2^31: no overflow.
        let mut bytes = self.count() << self.geo.granularity_bits;
        let overhang = (self.geo.nbits << self.geo.granularity_bits) - self.geo.disk_size;
        if overhang != 0 && self.is_dirty(self.geo.disk_size - 1) {
            bytes = bytes.saturating_sub(overhang);
        }
        bytes.min(self.geo.disk_size)
    }

    /// Merged `(offset, length)` byte extents of dirty granules, in ascending order and
    /// clipped to the disk size. Skips clean and dirty stretches through the summary
    /// levels, so listing k extents costs about O(k · log64 n).
    pub fn dirty_extents(&self) -> DirtyExtents<'_> {
        DirtyExtents::new(self)
    }

    /// The smallest dirty disk offset >= `from`, or `None`.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        if from >= self.geo.disk_size {
            return None;
        }
        let bit = self.next_dirty_bit(from >> self.geo.granularity_bits)?;
        Some(self.geo.bit_offset(bit).max(from))
    }

    /// The smallest clean disk offset >= `from`, or `None` if the rest of the disk is dirty.
    pub fn next_clean(&self, from: u64) -> Option<u64> {
        if from >= self.geo.disk_size {
            return None;
        }
        let bit = self.next_clean_bit(from >> self.geo.granularity_bits)?;
        Some(self.geo.bit_offset(bit).max(from))
    }

    /// ORs every dirty bit of `other` into this bitmap, as QEMU's bitmap merge
    /// (`hbitmap_merge`) does. The granularities may differ: a dirty granule of `other`
    /// dirties every granule of this bitmap its bytes touch, so a merge never cleans a byte
    /// `other` calls dirty. Works on a disabled bitmap too. Waits while the bitmap is
    /// sealed, as a mark does, and [`seal`](Self::seal) waits for a merge in flight.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) when the disk sizes differ.
    pub fn merge_from(&self, other: &DirtyBitmap) -> Result<()> {
        if other.geo.disk_size != self.geo.disk_size {
            return Err(invalid_input!(
                "cannot merge a bitmap of a {}-byte disk into one of {} bytes",
                other.geo.disk_size,
                self.geo.disk_size
            ));
        }
        if other.geo.granularity == self.geo.granularity {
            self.announced(|| other.for_each_nonzero_word(|w, v| self.set_bits(w, v)));
        } else {
            self.announced(|| {
                for (off, len) in other.dirty_extents() {
                    if let Some((first, end)) = self.geo.touched_bits(off, len) {
                        for_each_word(first, end, |w, mask| self.set_bits(w, mask));
                    }
                }
            });
        }
        Ok(())
    }

    /// Runs `f`, which sets bits another copy holds (not writes to record, so whatever
    /// `enabled` says), as a mark a store can wait for: announced, after waiting while the
    /// bitmap is sealed, until its last change-map region is recorded. A mark that returns
    /// on a bit `f` set (one load) relies on `f` finishing that record, and
    /// [`seal`](Self::seal), [`wait_for_marks`](Self::wait_for_marks) and
    /// [`marks_in_flight`](Self::marks_in_flight) see `f` in flight until it has.
    fn announced<R>(&self, f: impl FnOnce() -> R) -> R {
        let mark = self.begin_unsealed_mark();
        let r = f();
        self.slots.end_mark(mark);
        r
    }

    /// ORs serialized bitmap bytes (qcow2's layout, as
    /// [`serialize_region`](Self::serialize_region) writes them) into this bitmap, from
    /// byte `at` of its serialized form on. Works on a disabled bitmap too, as
    /// [`merge_from`](Self::merge_from) does: the bits are another copy's, not writes to
    /// record. Safe beside concurrent marks: each word gains its bits with one atomic OR,
    /// and a bit once set stays set. Bytes past the end are ignored.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) when `at` is not a multiple of 8
    /// (a word boundary).
    pub(crate) fn or_serialized(&self, at: u64, bytes: &[u8]) -> Result<()> {
        if !at.is_multiple_of(8) {
            return Err(invalid_input!(
                "serialized offset {at} is not a word boundary"
            ));
        }
        let w0 = usize::try_from(at / 8).unwrap_or(usize::MAX);
        self.announced(|| {
            for (i, v) in region_words(bytes).enumerate() {
                let w = w0.saturating_add(i);
                if w >= self.words.len() {
                    break;
                }
                let v = v & self.words.valid(w);
                if v != 0 {
                    self.set_bits(w, v);
                }
            }
        });
        Ok(())
    }

    /// Sets every granule `[offset, offset + len)` touches (clamped to the disk), on a
    /// disabled bitmap too, as a mark a store can wait for (see `announced`): a durable
    /// store's record of a write still in flight (`BitmapStore::commit_in_flight`), owed
    /// to a bitmap whatever its flag says.
    pub(crate) fn or_range(&self, offset: u64, len: u64) {
        if let Some((first, end)) = self.geo.touched_bits(offset, len) {
            self.announced(|| for_each_word(first, end, |w, mask| self.set_bits(w, mask)));
        }
    }

    /// Sets every bit, on a disabled bitmap too: a copy that may lack bits reads as needing
    /// everything. Safe beside concurrent marks, as [`or_serialized`](Self::or_serialized).
    pub(crate) fn fill(&self) {
        self.announced(|| {
            for w in 0..self.words.len() {
                self.set_bits(w, self.words.valid(w));
            }
        });
    }

    /// A copy: same geometry, bits, primary change map and enabled state, and no
    /// [`ChangeConsumer`]s.
    pub fn snapshot(&self) -> DirtyBitmap {
        let mut copy = Self::from_geometry(self.geo);
        self.for_each_nonzero_word(|w, v| copy.set_bits(w, v));
        copy.changes = ChangeMap::from_regions(&self.changes.peek());
        // Nobody else sees the copy yet: no mark to wait for.
        copy.set_enabled_unshared(self.is_enabled());
        copy
    }

    /// Returns the dirty bits and clears them here, atomically per word: a concurrent
    /// mark lands either in the returned bitmap or in this one, never in neither. The
    /// returned bitmap has this one's geometry, is enabled, and has a change bit for each
    /// region it holds bits in. Cost is proportional to the dirty words, not the disk.
    ///
    /// The whole take is one window of the *any* tower's guard (see `summary.rs`) instead
    /// of one per block: a search that overlaps it retries and then answers conservatively,
    /// as it does beside any clear, so searches on this bitmap from other threads slow
    /// down while it runs.
    pub fn take_dirty(&self) -> DirtyBitmap {
        let out = Self::from_geometry(self.geo);
        // The walk reads the tower unguarded, inside its own window. Only another clearer's
        // window can make a tower bit hide a non-zero block; if the guard shows that none
        // opened meanwhile, the walk saw every such block; if one did, a guarded walk takes
        // what the first may have missed.
        //
        // Inside the window the any bits of the blocks it emptied are cleared per level-1
        // word, once the walk has left that word (`clear_blocks_in_window`): until then they
        // stay set over empty blocks, which a tower allows (a search finds nothing there
        // and moves on).
        let window = self.any.open_window();
        let nonzero = |b: u64| !self.block_is_zero(b);
        let mut emptied: Option<(usize, u64)> = None;
        let mut next = 0;
        while let Some(b) = self.any.next_block_in_window(next) {
            let w = (b / 64) as usize;
            if let Some((ew, mask)) = emptied.filter(|&(ew, _)| ew != w) {
                self.any.clear_blocks_in_window(ew, mask, nonzero);
                emptied = None;
            }
            if self.take_block(b, &out, AnyClear::Deferred) {
                emptied.get_or_insert((w, 0)).1 |= 1 << (b % 64);
            }
            next = b + 1;
        }
        if let Some((ew, mask)) = emptied {
            self.any.clear_blocks_in_window(ew, mask, nonzero);
        }
        if !self.any.close_window(window) {
            let mut next = 0;
            while let Some(b) = self.any.next_block(next) {
                self.take_block(b, &out, AnyClear::Guarded);
                next = b + 1;
            }
        }
        out
    }

    /// Moves block `b`'s bits into `out` (not shared yet), with the bookkeeping of both,
    /// this bitmap's any tower as `any` says. True if it moved a bit (so the block may be
    /// empty now).
    fn take_block(&self, b: u64, out: &DirtyBitmap, any: AnyClear) -> bool {
        let mut moved = 0u64;
        let mut added = 0u64;
        let mut was_full = false;
        // Which words hold bits, read first without a branch per word: in a block of
        // scattered bits about half the words are zero, and a branch on each would be
        // mispredicted about half the time.
        let words = self.block_words(b);
        let mut nonzero = 0u32;
        for (i, w) in words.clone().enumerate() {
            nonzero |= u32::from(self.words.load(w) != 0) << i;
        }
        while nonzero != 0 {
            let w = words.start + nonzero.trailing_zeros() as usize;
            nonzero &= nonzero - 1;
            let word = self.words.get(w);
            let old = word.swap(0, SeqCst);
            if old != 0 {
                let n = u64::from(old.count_ones());
                moved += n;
                was_full |= old == self.words.valid(w);
                // `out` is not shared until it is returned, so plain loads and stores are
                // enough; returning it publishes the words. A block taken twice (the
                // guarded walk after the first) ORs into what the first walk moved.
                let dst = out.words.get(w);
                let prev = dst.load(Relaxed);
                dst.store(prev | old, Relaxed);
                added += if prev == 0 {
                    n
                } else {
                    count::ones(prev | old) - count::ones(prev)
                };
            }
        }
        if moved == 0 {
            return false;
        }
        let region = self.region_of_block(b);
        // This bitmap: the block's words went to zero (or lost bits).
        sc_point();
        self.slots.add(moved.wrapping_neg());
        if any == AnyClear::Guarded {
            self.any.clear(b, &|| !self.block_is_zero(b));
        }
        if was_full {
            self.full.clear(0, b);
        }
        self.record_change(region);
        // The returned bitmap: the same words went from zero to the bits taken.
        out.slots.add(added);
        out.any.set_unshared(b);
        if out.block_is_full(b) {
            out.full.set_unshared(b);
        }
        out.changes.set(region);
        true
    }

    /// Changes the disk size. Shrinking drops the bits past the new end; growing adds
    /// clean bits (a caller tracking a disk that grew marks the grown area dirty, as
    /// [`BitmapStore::resize`](crate::BitmapStore::resize) does: it may have been inside
    /// the disk before a shrink, and an older backup hold data there that the disk does not
    /// read any more). Every change-map region is marked changed, since the serialized form
    /// (and on disk, the table size) changes with the size. The bitmap has no
    /// [`ChangeConsumer`] then: each holds the bitmap's `Arc`, which `&mut` excludes.
    ///
    /// # Errors
    /// As [`new`](Self::new) for the new size; the bitmap is unchanged then.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        let geo = Geometry::new(new_size, self.geo.granularity, self.geo.region_size)?;
        let resized = Self::from_geometry(geo);
        let keep = resized.words.len();
        self.for_each_nonzero_word(|w, v| {
            if w < keep {
                let v = v & resized.words.valid(w);
                if v != 0 {
                    resized.set_bits(w, v);
                }
            }
        });
        resized.changes.set_every();
        // `&mut self`: no mark is running, nobody else sees `resized` yet, and no
        // `ChangeConsumer` exists (each holds an `Arc` of its bitmap).
        debug_assert_eq!(self.consumers.count(), 0);
        resized.set_enabled_unshared(self.is_enabled());
        *self = resized;
        Ok(())
    }

    /// Bytes of serialized bitmap per change-map region.
    pub fn region_size(&self) -> u64 {
        self.geo.region_size
    }

    /// Number of change-map regions: ceil(serialized length / region size).
    pub fn region_count(&self) -> u64 {
        self.geo.nregions()
    }

    /// Length of the serialized bitmap: ceil(bit_count / 8) bytes.
    pub fn serialized_len(&self) -> u64 {
        self.geo.serialized_len()
    }

    /// Bytes of serialized bitmap in region `region`: the region size, except for a
    /// shorter last region. 0 past the end.
    pub fn region_len(&self, region: u64) -> u64 {
        let start = region.saturating_mul(self.geo.region_size);
        self.geo
            .serialized_len()
            .saturating_sub(start)
            .min(self.geo.region_size)
    }

    /// Disk bytes `(offset, length)` whose bits sit in region `region`, clipped to the disk:
    /// `(disk_size, 0)` for a region past the end.
    pub fn region_disk_range(&self, region: u64) -> (u64, u64) {
        let bits_per_region = self.geo.region_size * 8;
        let start = self.geo.bit_offset(region.saturating_mul(bits_per_region));
        let end = self
            .geo
            .bit_offset(region.saturating_add(1).saturating_mul(bits_per_region));
        (start, end.saturating_sub(start))
    }

    /// Takes the set of regions whose serialized bytes changed since the last take, and
    /// clears it. See [`serialize_region`](Self::serialize_region) for the ordering that
    /// makes this safe against concurrent marks.
    ///
    /// This is the primary consumer's map, the flusher's: [`load_region`](Self::load_region)
    /// leaves it alone (the bytes loaded are what is on disk). Other consumers, such as a
    /// migration stream, have maps of their own ([`add_consumer`](Self::add_consumer)),
    /// which this take leaves alone.
    ///
    /// On a bitmap a [`BitmapStore`](crate::BitmapStore) holds (from `bitmap`, `bitmaps`,
    /// [`Tracker::bitmaps`](crate::Tracker::bitmaps), or given to `activate_with`), the
    /// primary map is the store's. A take here hides regions from it, so the store's next
    /// flush or stop writes every region of the bitmap (it cannot tell which it missed):
    /// nothing is lost, but watch changes with [`add_consumer`](Self::add_consumer) instead.
    pub fn take_changed(&self) -> ChangedRegions {
        self.disturbing(|| self.take_primary_unflagged())
    }

    /// Runs a public take or load of the primary map inside the `disturbing` count, with
    /// `disturbed` set before and after. An owner's take that overlaps it, in either
    /// order, sees the count (and takes every region, the flag left set); one that comes
    /// after sees the flag set after the work; a region this take removed before an
    /// owner's take read its change-map word is covered the same way (that read returns
    /// this take's swap or a later value, after the count went up).
    fn disturbing<T>(&self, f: impl FnOnce() -> T) -> T {
        self.disturbing.fetch_add(1, SeqCst);
        self.disturbed.fetch_or(1, SeqCst);
        let r = f();
        self.disturbed.fetch_or(1, SeqCst);
        self.disturbing.fetch_sub(1, SeqCst);
        r
    }

    /// The primary map's owner's take (a store's flusher): the regions changed since its
    /// last take, or every region if a public [`take_changed`](Self::take_changed) or
    /// [`load_region`](Self::load_region) runs or ran since (see `disturbing`: a region
    /// another take took from under this one is covered).
    pub(crate) fn take_primary(&self) -> ChangedRegions {
        let taken = self.take_primary_unflagged();
        // Read-modify-writes, which read the last value of each word: a caller's count or
        // flag is never missed for an older value.
        if self.disturbing.fetch_add(0, SeqCst) != 0 {
            // The flag stays for the take after this one: the public take or load may
            // remove or add more once this one returned.
            return ChangedRegions::all(self.region_count());
        }
        if self.disturbed.swap(0, SeqCst) != 0 {
            return ChangedRegions::all(self.region_count());
        }
        taken
    }

    /// The regions the primary map's owner's next [`take_primary`](Self::take_primary)
    /// would return now: every region while a public take or load has disturbed the map.
    pub(crate) fn primary_pending(&self) -> u64 {
        // Read-modify-writes, as in `take_primary`.
        if self.disturbing.fetch_add(0, SeqCst) != 0 || self.disturbed.fetch_or(0, SeqCst) != 0 {
            self.region_count()
        } else {
            self.changes.count()
        }
    }

    fn take_primary_unflagged(&self) -> ChangedRegions {
        let taken = self.changes.take();
        // The change bits are cleared; the caller reads the words next.
        sc_point();
        taken
    }

    /// Marks the regions of `regions` changed again in the primary map, for a flusher whose
    /// write failed.
    pub fn requeue_changed(&self, regions: &ChangedRegions) {
        self.changes.set_all_of(regions);
    }

    /// Number of regions changed since the last [`take_changed`](Self::take_changed), read
    /// without taking them.
    pub fn changed_region_count(&self) -> u64 {
        self.changes.count()
    }

    /// Writes region `region` of the serialized bitmap into `out`, in qcow2's layout: bit n
    /// at byte n / 8, bit n % 8, least significant bit first; bits past the last valid bit
    /// are zero. `out` must be exactly [`region_len`](Self::region_len) bytes.
    ///
    /// # Ordering against concurrent marks
    /// Call [`take_changed`](Self::take_changed) first, then serialize its regions. A mark
    /// racing with that pair is either in the bytes serialized or leaves its region in the
    /// change map for the next take; it is never in neither. A mark that found its bits
    /// already set returns at once; its region is recorded by the mark that set them, which
    /// may still be running. So once every mark has returned (for example with the guest
    /// stopped) and [`wait_for_marks`](Self::wait_for_marks) has returned after that, one
    /// more take-and-serialize captures everything.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a region past the end or an
    /// `out` of the wrong length.
    pub fn serialize_region(&self, region: u64, out: &mut [u8]) -> Result<()> {
        let w0 = self.check_region(region, out.len())?;
        // The one little-endian place: qcow2 bitmap data is a byte stream, LSB first, which
        // is exactly our u64 words written little-endian.
        let mut chunks = out.chunks_exact_mut(8);
        let mut w = w0;
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.words.load_masked(w).to_le_bytes());
            w += 1;
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            tail.copy_from_slice(&self.words.load_masked(w).to_le_bytes()[..tail.len()]);
        }
        Ok(())
    }

    /// Replaces region `region` with `bytes` in qcow2's layout, masking any tail bits past
    /// the last valid bit. The primary change map is left as it is: the loaded bytes are
    /// what is on disk. Each [`ChangeConsumer`] gets the region if a word of it changed.
    /// Meant for loading a bitmap before it is shared; a mark racing with the load of its
    /// region may be overwritten.
    ///
    /// On a bitmap a [`BitmapStore`](crate::BitmapStore) holds, the bytes are not what its
    /// disk holds: a load makes the store's next flush or stop write every region of the
    /// bitmap (see [`take_changed`](Self::take_changed)).
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a region past the end or
    /// `bytes` of the wrong length.
    pub fn load_region(&self, region: u64, bytes: &[u8]) -> Result<()> {
        self.check_region(region, bytes.len())?;
        self.disturbing(|| self.load_region_unflagged(region, bytes))
            .map(drop)
    }

    /// [`load_region`](Self::load_region) of bytes the primary map's owner knows are on its
    /// disk (or will write itself); whether a word changed.
    ///
    /// # Errors
    /// As [`load_region`](Self::load_region).
    pub(crate) fn load_region_unflagged(&self, region: u64, bytes: &[u8]) -> Result<bool> {
        let w0 = self.check_region(region, bytes.len())?;
        let mut changed = false;
        for (i, raw) in region_words(bytes).enumerate() {
            let w = w0 + i;
            let new = raw & self.words.valid(w);
            let word = self.words.get(w);
            if word.load(SeqCst) != new {
                let old = word.swap(new, SeqCst);
                if old != new {
                    self.update_summaries(w, old, new);
                    changed = true;
                }
            }
        }
        if changed {
            self.consumers.record(region);
        }
        Ok(changed)
    }

    /// Makes every page of the leaf words resident by storing each page's first word back
    /// (one store per 4 KiB page; no bit changes), so that later writes into this bitmap
    /// take no page fault. For a bitmap that is not shared yet (a store writes it back
    /// unchanged; a mark racing it could be lost). A [`Preloaded`](crate::Preloaded) bitmap
    /// is made resident so that its refresh inside a migration's downtime does not fault.
    pub(crate) fn prefault_unshared(&self) {
        const WORDS_PER_PAGE: usize = 4096 / 8;
        for w in (0..self.words.len()).step_by(WORDS_PER_PAGE) {
            let word = self.words.get(w);
            word.store(word.load(SeqCst), SeqCst);
        }
    }

    /// Whether region `region` holds exactly `bytes` (its serialized form, as
    /// [`load_region`](Self::load_region) takes it), compared word by word without
    /// writing: what a [`load_region`](Self::load_region) into a bitmap that already
    /// holds about this content costs, less the few words it writes.
    pub(crate) fn region_equals(&self, region: u64, bytes: &[u8]) -> Result<bool> {
        let w0 = self.check_region(region, bytes.len())?;
        let mut same = true;
        for (i, raw) in region_words(bytes).enumerate() {
            let w = w0 + i;
            same &= self.words.load(w) == raw & self.words.valid(w);
        }
        Ok(same)
    }

    /// Loads region `region` into a bitmap that no other thread can reach yet and whose
    /// words of that region are all zero (just built): `Some(bytes)` in qcow2's layout, or
    /// `None` for every bit set (an all-ones table entry: no bytes, no per-bit work).
    ///
    /// Where [`load_region`](Self::load_region) pays a read-modify-write and the tower
    /// upkeep for every word, this stores each non-zero word plainly (a clean word is never
    /// written, so its page is never faulted in) and updates the towers once per block and
    /// the counter once per region: loading a large bitmap is mostly this loop. Returning the bitmap (or sharing it through an `Arc`) publishes
    /// the plain stores. The primary change map is left as it is (the loaded bytes are what
    /// is on disk); the bitmap has no consumers yet.
    ///
    /// # Errors
    /// As [`load_region`](Self::load_region).
    pub(crate) fn load_region_unshared(&self, region: u64, bytes: Option<&[u8]>) -> Result<()> {
        let len = self.region_len(region) as usize;
        let w0 = self.check_region(region, bytes.map_or(len, <[u8]>::len))?;
        let end = w0 + len.div_ceil(8);
        // Whole words as fixed 8-byte reads (a partial last word, only in the last region,
        // padded with zero bytes).
        let mut raw = bytes.map(|b| {
            let chunks = b.chunks_exact(8);
            let mut tail = [0u8; 8];
            tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
            let has_tail = !chunks.remainder().is_empty();
            chunks
                .map(|c| c.try_into().map_or(0, u64::from_le_bytes))
                .chain(has_tail.then(|| u64::from_le_bytes(tail)))
        });
        let mut added = 0u64;
        // Regions start on a block (at least 64 words each), so blocks do not straddle.
        let mut w = w0;
        while w < end {
            let b = (w / BLOCK_WORDS) as u64;
            let block_end = self.block_words(b).end.min(end);
            let (mut any, mut full) = (false, true);
            while w < block_end {
                let valid = self.words.valid(w);
                let v = match raw.as_mut() {
                    Some(it) => it.next().unwrap_or(0) & valid,
                    None => valid,
                };
                if v != 0 {
                    self.words.get(w).store(v, Relaxed);
                    any = true;
                    added = added.wrapping_add(if v == !0 { 64 } else { count::ones(v) });
                }
                full &= v == valid;
                w += 1;
            }
            if any {
                self.any.set_unshared(b);
            }
            if full && block_end == self.block_words(b).end {
                self.full.set_unshared(b);
            }
        }
        self.slots.add(added);
        Ok(())
    }

    /// Bytes of memory this bitmap holds: the struct itself (which holds the counter
    /// shards inline) plus its heap: leaf words, both summary towers and the change maps
    /// (the primary one, and those allocated for consumers).
    pub fn memory_usage(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.words.memory_usage()
            + self.any.memory_usage()
            + self.full.memory_usage()
            + self.changes.memory_usage()
            + self.consumers.memory_usage()
    }

    // ----- internals -----

    fn check_region(&self, region: u64, len: usize) -> Result<usize> {
        if region >= self.geo.nregions() {
            return Err(invalid_input!(
                "region {region} is past the last region {}",
                self.geo.nregions() - 1
            ));
        }
        let want = self.region_len(region);
        if len as u64 != want {
            return Err(invalid_input!(
                "region {region} holds {want} bytes, but the buffer has {len}"
            ));
        }
        Ok(region as usize * self.geo.region_words())
    }

    /// Sets `mask` in word `w`, skipping the atomic write when the bits are already set.
    #[inline]
    fn set_bits(&self, w: usize, mask: u64) {
        let word = self.words.get(w);
        if word.load(SeqCst) & mask == mask {
            return;
        }
        let old = word.fetch_or(mask, SeqCst);
        if old | mask != old {
            self.after_change(w, old, old | mask);
        }
    }

    /// Whether every bit of `[first, end)` is set: plain loads, stopping at the first word
    /// short of its mask.
    fn all_set(&self, first: u64, end: u64) -> bool {
        word_masks(first, end).all(|(w, mask)| self.words.load(w) & mask == mask)
    }

    /// Clears `mask` in word `w`, skipping the atomic write when the bits are already clear.
    #[inline]
    fn clear_bits(&self, w: usize, mask: u64) {
        let word = self.words.get(w);
        if word.load(SeqCst) & mask == 0 {
            return;
        }
        let old = word.fetch_and(!mask, SeqCst);
        if old & mask != 0 {
            self.after_change(w, old, old & !mask);
        }
    }

    /// Bookkeeping after word `w` changed from `old` to `new` (`old != new`): counter,
    /// summaries, then the change maps. The change maps come last so that a consumer that
    /// sees the change bit also sees the word (see `change_map`).
    #[inline]
    fn after_change(&self, w: usize, old: u64, new: u64) {
        self.update_summaries(w, old, new);
        self.record_change((w >> self.geo.region_word_shift()) as u64);
    }

    /// Sets region `r` in the primary change map and in every consumer's. Called after the
    /// word change and the `sc_point` behind it.
    #[inline(always)]
    fn record_change(&self, r: u64) {
        self.changes.set(r);
        self.consumers.record(r);
    }

    #[inline]
    fn update_summaries(&self, w: usize, old: u64, new: u64) {
        // The word changed; what follows reads the summaries and the change map.
        sc_point();
        self.slots.adjust(old, new);
        let b = (w / BLOCK_WORDS) as u64;
        if old == 0 {
            self.any.set(0, b);
        } else if new == 0 {
            self.any.clear(b, &|| !self.block_is_zero(b));
        }
        let valid = self.words.valid(w);
        if new == valid {
            if self.block_is_full(b) {
                self.full.set(b, &|| self.block_is_full(b));
            }
        } else if old == valid {
            self.full.clear(0, b);
        }
    }

    /// Change-map region holding block `b` (a region is at least 64 words, a block 8).
    fn region_of_block(&self, b: u64) -> u64 {
        (b * BLOCK_WORDS as u64) >> self.geo.region_word_shift()
    }

    fn block_words(&self, b: u64) -> std::ops::Range<usize> {
        let start = b as usize * BLOCK_WORDS;
        start..(start + BLOCK_WORDS).min(self.words.len())
    }

    fn block_is_zero(&self, b: u64) -> bool {
        self.block_words(b).all(|w| self.words.load(w) == 0)
    }

    fn block_is_full(&self, b: u64) -> bool {
        self.block_words(b)
            .all(|w| self.words.load(w) == self.words.valid(w))
    }

    /// Calls `f(word_index, value)` for every non-zero word, skipping clean blocks.
    pub(crate) fn for_each_nonzero_word(&self, mut f: impl FnMut(usize, u64)) {
        let mut next = 0;
        while let Some(b) = self.any.next_block(next) {
            for w in self.block_words(b) {
                let v = self.words.load(w);
                if v != 0 {
                    f(w, v);
                }
            }
            next = b + 1;
        }
    }

    /// First dirty bit at index >= `bit`.
    pub(crate) fn next_dirty_bit(&self, bit: u64) -> Option<u64> {
        self.find_bit(bit, |_, v| v, |b| self.any.next_block(b))
    }

    /// Starts bringing in block `b`'s leaf words (see [`atomic::prefetch`]): the lines of
    /// its first and last word, which are one line when the array is page-aligned (a
    /// mapped array, 2 MiB or more) and may be two otherwise.
    #[inline]
    pub(crate) fn prefetch_block(&self, b: u64) {
        // Addresses only, never dereferenced: past the end of the array (a last, partial
        // block) the hint is merely wasted.
        let first = self.words.as_ptr().wrapping_add(b as usize * BLOCK_WORDS);
        atomic::prefetch(first);
        atomic::prefetch(first.wrapping_add(BLOCK_WORDS - 1));
    }

    /// Which words of block `b` are non-zero now, as bit i for the block's word i: every
    /// word is read, with no branch on what it holds, so a scan does not mispredict where
    /// the first one lies.
    #[inline]
    pub(crate) fn block_nonzero_words(&self, b: u64) -> u32 {
        #[inline(always)]
        fn mask<'a>(words: impl Iterator<Item = &'a AtomicU64>) -> u32 {
            let mut mask = 0;
            for (i, word) in words.enumerate() {
                mask |= u32::from(word.load(SeqCst) != 0) << i;
            }
            mask
        }
        let words = self.words.slice(self.block_words(b));
        // A whole block (every block but maybe the last) has a fixed length, which lets the
        // loop unroll.
        match <&[AtomicU64; BLOCK_WORDS]>::try_from(words) {
            Ok(full) => mask(full.iter()),
            Err(_) => mask(words.iter()),
        }
    }

    /// First clean bit at index >= `bit`.
    pub(crate) fn next_clean_bit(&self, bit: u64) -> Option<u64> {
        self.find_bit(
            bit,
            |w, v| !v & self.words.valid(w),
            |b| self.full.next_block(b),
        )
    }

    /// First bit >= `bit` whose word value passes through `interesting(w, v)` as a set
    /// bit: first in `bit`'s own word, then the rest of its block, then the blocks that
    /// `next_block` reports.
    #[inline]
    fn find_bit(
        &self,
        bit: u64,
        interesting: impl Fn(usize, u64) -> u64,
        mut next_block: impl FnMut(u64) -> Option<u64>,
    ) -> Option<u64> {
        if bit >= self.geo.nbits {
            return None;
        }
        let w = (bit / 64) as usize;
        let hit = interesting(w, self.words.load(w)) & (!0u64 << (bit % 64));
        if hit != 0 {
            return Some(w as u64 * 64 + u64::from(hit.trailing_zeros()));
        }
        let b = (w / BLOCK_WORDS) as u64;
        let scan = |range: std::ops::Range<usize>| {
            let first = range.start;
            for (i, word) in self.words.slice(range).iter().enumerate() {
                let v = interesting(first + i, word.load(SeqCst));
                if v != 0 {
                    return Some((first + i) as u64 * 64 + u64::from(v.trailing_zeros()));
                }
            }
            None
        };
        if let Some(found) = scan(w + 1..self.block_words(b).end) {
            return Some(found);
        }
        let mut next = b + 1;
        loop {
            let nb = next_block(next)?;
            if let Some(found) = scan(self.block_words(nb)) {
                return Some(found);
            }
            next = nb + 1;
        }
    }
}

/// How [`DirtyBitmap::take_block`] updates the any tower of the bitmap it takes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnyClear {
    /// Not at all: the caller holds a window and clears a level-1 word's emptied blocks
    /// together (`AnyTower::clear_blocks_in_window`).
    Deferred,
    /// A clear with its own window, as any clear does.
    Guarded,
}

/// Marks a write of `len` bytes at `offset` in every bitmap of `bitmaps` as one fan-out:
/// announced process-wide for the whole pass (see [`DirtyBitmap::set_enabled`] on handing
/// marking over), at the cost of two plain stores to the thread's own slot.
///
/// `set_enabled(false)` on any bitmap of the process waits for the fan-outs announced, so
/// a fan-out never waits while announced: a bitmap found sealed ends the pass (nothing
/// written to it), the announcement is withdrawn, and once that bitmap is unsealed the
/// whole pass runs again, every flag read anew (marking a bitmap twice is harmless). The
/// pass that completes ran whole inside one announcement and waited for nothing, which is
/// all the hand-over argument asks of a fan-out; the call returns only after it, so a
/// write still waits for every seal of its bitmaps, as through `mark_dirty`.
#[inline]
pub(crate) fn mark_fanned_out<'a>(
    bitmaps: impl Iterator<Item = &'a DirtyBitmap> + Clone,
    offset: u64,
    len: u64,
) {
    loop {
        let fan = count::fan_out().begin_mark();
        // Orders the slot store before the fan-out's reads of the `enabled` flags, against
        // the heavy barrier in `set_enabled(false)`.
        barrier::light();
        let sealed = bitmaps
            .clone()
            .find(|b| !b.mark_dirty_unless_sealed(offset, len));
        count::fan_out().end_mark(fan);
        match sealed {
            None => return,
            Some(b) => b.wait_while_sealed(),
        }
    }
}

/// [`mark_fanned_out`] without waiting on a sealed bitmap: marks every bitmap of
/// `bitmaps` that is not sealed, under the fan-out's announcement, and returns false if one
/// was sealed (its mark is for a later call to make).
pub(crate) fn mark_fanned_out_unless_sealed<'a>(
    bitmaps: impl Iterator<Item = &'a DirtyBitmap>,
    offset: u64,
    len: u64,
) -> bool {
    let fan = count::fan_out().begin_mark();
    // As in `mark_fanned_out`: orders the slot store before the reads of the `enabled`
    // flags, against the heavy barrier in `set_enabled(false)`.
    barrier::light();
    // Every bitmap not sealed is marked, whether or not one before it was.
    let mut all = true;
    for b in bitmaps {
        all &= b.mark_dirty_unless_sealed(offset, len);
    }
    count::fan_out().end_mark(fan);
    all
}

/// Calls `f(word, mask)` for each word overlapping bits `[first, end)`, `first < end`.
/// The words of a region's serialized bytes (qcow2's layout: little-endian `u64`s), the
/// last one zero-padded if `bytes` ends mid-word.
#[inline]
pub(crate) fn region_words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks(8).map(|chunk| {
        let mut le = [0u8; 8];
        le[..chunk.len()].copy_from_slice(chunk);
        u64::from_le_bytes(le)
    })
}

#[inline]
fn for_each_word(first: u64, end: u64, mut f: impl FnMut(usize, u64)) {
    word_masks(first, end).for_each(|(w, mask)| f(w, mask));
}

/// The words of bits `[first, end)` (`first < end`), each with the mask of its bits in the
/// range.
fn word_masks(first: u64, end: u64) -> impl Iterator<Item = (usize, u64)> {
    let w0 = first / 64;
    let w1 = (end - 1) / 64;
    (w0..=w1).map(move |w| {
        let lo = if w == w0 { first % 64 } else { 0 };
        let hi = if w == w1 { (end - 1) % 64 } else { 63 };
        (w as usize, (!0u64 >> (63 - hi)) & (!0u64 << lo))
    })
}

/// Mask of bits `[first, end)` within their word; both ends lie in the same word.
#[inline]
fn word_mask(first: u64, end: u64) -> u64 {
    (!0u64 >> (63 - (end - 1) % 64)) & (!0u64 << (first % 64))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::DirtyBitmap;
    use std::sync::atomic::Ordering::SeqCst;

    /// The unshared bulk load gives what the per-word load gives: words, count, both
    /// towers (searched through extents and clean offsets), on every region kind (random,
    /// all ones, all zero, the short last region), from bytes and from the all-ones marker.
    #[test]
    fn unshared_load_matches_the_per_word_load() {
        // 3 full regions of 512 B and a short tail; the last bit covers a partial granule.
        let disk = (3 * 4096 + 1000) * 4096 + 100;
        let seed = 0x10ad_u64;
        eprintln!("seed {seed}");
        let mut x = seed;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for pattern in 0..4 {
            let a = DirtyBitmap::with_region_size(disk, 4096, 512).unwrap();
            let b = DirtyBitmap::with_region_size(disk, 4096, 512).unwrap();
            for r in 0..a.region_count() {
                let len = a.region_len(r) as usize;
                let bytes: Vec<u8> = (0..len)
                    .map(|i| match (pattern + r) % 4 {
                        0 => next() as u8,
                        1 => 0xFF,
                        2 => 0,
                        _ => u8::from(i % 7 == 0),
                    })
                    .collect();
                a.load_region(r, &bytes).unwrap();
                if bytes.iter().all(|&v| v == 0xFF) && pattern % 2 == 0 {
                    b.load_region_unshared(r, None).unwrap();
                } else {
                    b.load_region_unshared(r, Some(&bytes)).unwrap();
                }
            }
            assert_eq!(a.count(), b.count(), "pattern {pattern}");
            assert!(a.dirty_extents().eq(b.dirty_extents()), "pattern {pattern}");
            let mut off = 0;
            while let Some(c) = a.next_clean(off) {
                assert_eq!(b.next_clean(off), Some(c), "pattern {pattern}");
                off = c + 1;
            }
            assert_eq!(b.next_clean(off), None);
            for w in 0..a.words.len() {
                assert_eq!(
                    a.words.load(w),
                    b.words.load(w),
                    "pattern {pattern} word {w}"
                );
            }
        }
    }

    /// `take_dirty` in its one guard window moves every bit, leaves the towers of both
    /// bitmaps right, and a second take finds nothing.
    #[test]
    fn take_dirty_moves_every_bit_and_leaves_the_towers_right() {
        let bm = DirtyBitmap::new(1 << 30, 4096).unwrap();
        for k in 0..5000u64 {
            bm.mark_dirty((k * 7919 * 4096) % (1 << 30), 4096 * (k % 3 + 1));
        }
        bm.mark_dirty(100 << 20, 64 << 20);
        let want: Vec<(u64, u64)> = bm.dirty_extents().collect();
        let n = bm.count();
        let out = bm.take_dirty();
        assert_eq!(out.count(), n);
        assert!(out.dirty_extents().eq(want.iter().copied()));
        assert_eq!(out.next_clean(100 << 20), Some(164 << 20));
        assert_eq!(bm.count(), 0);
        assert_eq!(bm.dirty_extents().next(), None);
        assert_eq!(bm.take_dirty().count(), 0);
    }

    #[test]
    fn count_and_dirty_bytes_stay_in_range_while_the_slot_sum_is_off() {
        // 11 bits, the last covering 100 bytes of a 4 KiB granule.
        let bm = DirtyBitmap::new(10 * 4096 + 100, 4096).unwrap();
        bm.mark_dirty(0, 4096);
        // A clear's decrement read without the increment of the mark it undid: the sum of
        // the slots goes below zero and wraps.
        bm.slots.add(2u64.wrapping_neg());
        assert_eq!(bm.count(), bm.bit_count());
        assert_eq!(bm.dirty_bytes(), bm.disk_size());
        // Increments read without their decrements: above the bit count, with the last
        // (partial) bit clean, which the byte figure cannot subtract.
        bm.slots.add(100);
        assert_eq!(bm.count(), bm.bit_count());
        assert!(!bm.is_dirty(bm.disk_size() - 1));
        assert_eq!(bm.dirty_bytes(), bm.disk_size());
        // Exact again once the operations "finish".
        bm.slots.add(98u64.wrapping_neg());
        assert_eq!(bm.count(), 1);
        assert_eq!(bm.dirty_bytes(), 4096);
    }

    std::thread_local! {
        /// Calls of `mark_word_slow` on this thread.
        pub(super) static SLOW_MARKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    fn slow_marks() -> u64 {
        SLOW_MARKS.with(std::cell::Cell::get)
    }

    #[test]
    fn marks_take_the_general_path_when_the_light_barrier_is_a_fence() {
        // What a process without expedited membarriers gets: every mark of a clean bit goes
        // through `mark_word_slow`, whose light barrier is a real fence. The short path's
        // compiler fence pairs only with a membarrier: taken in such a process, a mark
        // could write after `set_enabled(false)` or a seal returned.
        const G: u64 = 64 << 10;
        let bm = DirtyBitmap::new(1 << 30, G).unwrap();
        bm.state.fetch_or(super::FENCED, SeqCst);
        bm.mark_dirty(3 * G, 4096);
        bm.mark_dirty(3 * G + 8192, 4096);
        assert!(bm.is_dirty(3 * G));
        assert_eq!(bm.count(), 1);
        assert_eq!(bm.next_dirty(0), Some(3 * G));
        assert_eq!(bm.changed_region_count(), 1);
        // A word filled by single marks sets its block's full summary bit. Each of the 511
        // clean bits marked is one call of the general path.
        let before = slow_marks();
        for i in 0..8 * 64 {
            bm.mark_dirty(i * G, 1);
        }
        assert_eq!(
            slow_marks() - before,
            8 * 64 - 1,
            "a mark took the short path"
        );
        assert_eq!(bm.next_clean(0), Some(8 * 64 * G));
        // The same marks where the light barrier is free, on a thread that owns a slot,
        // take the short path: the count above tells the paths apart.
        let free = DirtyBitmap::new(1 << 30, G).unwrap();
        free.state.fetch_and(!super::FENCED, SeqCst);
        let ran = std::thread::scope(|s| {
            s.spawn(|| {
                let Some(m) = free.slots.begin_own_mark() else {
                    return false;
                };
                free.slots.end_own_mark(m);
                for i in 0..8 * 64 {
                    free.mark_dirty(i * G, 1);
                }
                assert_eq!(slow_marks(), 0, "a mark took the general path");
                true
            })
            .join()
            .unwrap()
        });
        if !ran {
            eprintln!("the short-path half did not run: every owned slot was taken");
        }
        bm.set_enabled(false);
        bm.mark_dirty(1000 * G, 4096);
        assert!(!bm.is_dirty(1000 * G));
        bm.set_enabled(true);
        assert_ne!(bm.state.load(SeqCst) & super::FENCED, 0);
        // Sealed: a mark of a clean bit waits for the unseal.
        bm.seal();
        std::thread::scope(|s| {
            let marker = s.spawn(|| bm.mark_dirty(2000 * G, 4096));
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!bm.is_dirty(2000 * G), "a mark wrote while sealed");
            bm.unseal();
            marker.join().unwrap();
        });
        assert!(bm.is_dirty(2000 * G));
        assert_eq!(bm.count(), 8 * 64 + 1);
    }

    #[test]
    fn the_short_mark_path_keeps_counter_towers_and_change_map() {
        // Each branch out of `mark_word`'s short path: a block's first bit (summary bit
        // clear), a word filled (full summary), a region's first change, a consumer.
        const G: u64 = 64 << 10;
        let bm = std::sync::Arc::new(DirtyBitmap::new(1 << 40, G).unwrap());
        // The short path runs only where the light barrier is free (an expedited membarrier
        // registered, or fences on both sides): without it every mark here would take the
        // slow path and this test, and every threaded one, would say nothing of the short
        // one. A system that refuses the registration (seccomp, gVisor) fails here, named.
        assert!(
            super::barrier::free_light_is_valid() && bm.state.load(SeqCst) & super::FENCED == 0,
            "the light barrier is not free in this process (membarrier registration refused): \
             the short mark path is not what runs"
        );
        let words_per_region = bm.region_size() / 8;
        // Two bits in one word, one block: the second mark reads everything set.
        bm.mark_dirty(5 * G, 1);
        bm.mark_dirty(6 * G, 1);
        assert_eq!(bm.count(), 2);
        assert_eq!(bm.changed_region_count(), 1);
        // A word of the same block, region and summary bit, filled bit by bit.
        for i in 64..128 {
            bm.mark_dirty(i * G, 1);
        }
        assert_eq!(bm.count(), 66);
        assert_eq!(bm.next_dirty(7 * G), Some(64 * G));
        // The full summary is per block (8 words): fill the block, and the clean search
        // skips it.
        for i in (0..512).filter(|i| !(64..128).contains(i)) {
            bm.mark_dirty(i * G, 1);
        }
        assert_eq!(bm.next_clean(0), Some(512 * G));
        // A new region, taken first so that its change bit is the only one.
        let _ = bm.take_changed();
        let far = 3 * words_per_region * 64;
        bm.mark_dirty(far * G, 1);
        let changed: Vec<u64> = bm.take_changed().iter().collect();
        assert_eq!(changed, vec![3]);
        // With a consumer, a mark in a region already changed still reaches its map.
        bm.mark_dirty((far + 1) * G, 1);
        let consumer = bm.add_consumer(super::ConsumerStart::Empty).unwrap();
        bm.mark_dirty((far + 2) * G, 1);
        let seen: Vec<u64> = consumer.take_changed().iter().collect();
        assert_eq!(seen, vec![3]);
        assert_eq!(bm.count(), 512 + 3);
    }

    #[test]
    fn marks_in_flight_is_false_at_rest_and_waiting_returns() {
        let bm = DirtyBitmap::new(1 << 30, 4096).unwrap();
        assert!(!bm.marks_in_flight());
        bm.mark_dirty(0, 1 << 20);
        bm.mark_dirty(8192, 1);
        assert!(!bm.marks_in_flight());
        bm.wait_for_marks();
        bm.set_enabled(false);
        bm.mark_dirty(1 << 21, 1);
        assert!(!bm.is_dirty(1 << 21));
        assert!(!bm.marks_in_flight());
        bm.set_enabled(true);
        bm.mark_dirty(1 << 21, 1);
        assert!(bm.is_dirty(1 << 21));
        // A mark that only reads (its bit is set) and one in flight on another thread.
        let slot = bm.slots.begin_mark();
        assert!(bm.marks_in_flight());
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(bm.marks_in_flight());
            });
        });
        bm.slots.end_mark(slot);
        assert!(!bm.marks_in_flight());
    }
}
