//! The state of a store active in durable mode (`durable.rs` has the mode itself): per
//! bitmap, the bits known to be on disk.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use arc_swap::ArcSwap;
#[cfg(not(loom))]
use parking_lot::Mutex;

use crate::bitmap::{region_words, DirtyBitmap};
use crate::flush;

/// The bits of one bitmap known to be on disk, in place: a commit sets them after its
/// barrier, from the bytes it wrote; a clear drops them before it changes anything.
#[derive(Debug)]
pub(super) struct DurableBits {
    words: Box<[AtomicU64]>,
    granularity_bits: u32,
    disk_size: u64,
}

impl DurableBits {
    /// The bits of `bm` as they are now: call it only when `bm` equals its disk copy and
    /// nothing marks it.
    pub(super) fn of(bm: &DirtyBitmap) -> Self {
        // A zeroed allocation (pages nobody writes stay unmapped), then only the non-zero
        // words, found through the bitmap's summary: a destination's activation inside
        // the downtime pays for the dirty part of the bitmap, not its size.
        let words = bytemuck::zeroed_slice_box::<AtomicU64>(bm.word_count());
        bm.for_each_nonzero_word(|w, v| {
            if let Some(x) = words.get(w) {
                x.store(v, SeqCst);
            }
        });
        DurableBits {
            words,
            granularity_bits: bm.granularity().trailing_zeros(),
            disk_size: bm.disk_size(),
        }
    }

    /// Whether every granule of `[offset, offset + len)` is durable (false for a range
    /// past the disk, true for an empty one). One load for a range inside one word.
    #[inline(always)]
    pub(super) fn covers(&self, offset: u64, len: u64) -> bool {
        // `last` is below `offset` only when `offset + len - 1` overflowed.
        let last = offset.wrapping_add(len).wrapping_sub(1);
        if len == 0 || last < offset || last >= self.disk_size {
            return len == 0;
        }
        let first_bit = offset >> self.granularity_bits;
        let last_bit = last >> self.granularity_bits;
        let word = |w: u64| self.words.get(w as usize).map_or(0, |x| x.load(SeqCst));
        if first_bit / 64 == last_bit / 64 {
            // The common case: a write inside one word's granules.
            let mask = (u64::MAX >> (63 - (last_bit - first_bit))) << (first_bit % 64);
            return word(first_bit / 64) & mask == mask;
        }
        let (fw, lw) = (first_bit / 64, last_bit / 64);
        let head = u64::MAX << (first_bit % 64);
        let tail = u64::MAX >> (63 - last_bit % 64);
        word(fw) & head == head
            && (fw + 1..lw).all(|w| word(w) == u64::MAX)
            && word(lw) & tail == tail
    }

    /// ORs in the serialized bytes of region `region` (of `region_size` bytes) as a commit
    /// wrote them: bit `k` of byte `i` is granule `8 i + k`, so word `w` is the
    /// little-endian u64 of bytes `8 w ..`.
    pub(super) fn confirm(&self, region: u64, region_size: u64, bytes: &[u8]) {
        let first = (region.saturating_mul(region_size) / 8) as usize;
        for (k, v) in region_words(bytes).enumerate() {
            if v != 0 {
                if let Some(w) = self.words.get(first.saturating_add(k)) {
                    w.fetch_or(v, SeqCst);
                }
            }
        }
    }

    /// Sets the words of region `region` (of `region_size` bytes) to its serialized
    /// `bytes` as read from disk: a bit the disk no longer holds is dropped, so these bits
    /// stay what the disk holds. For a preloaded copy nobody marks yet
    /// ([`Preloaded::apply`](super::Preloaded::apply)).
    pub(super) fn load_region(&self, region: u64, region_size: u64, bytes: &[u8]) {
        let first = (region.saturating_mul(region_size) / 8) as usize;
        for (k, v) in region_words(bytes).enumerate() {
            if let Some(w) = self.words.get(first.saturating_add(k)) {
                w.store(v, SeqCst);
            }
        }
    }

    /// Drops every bit (before a clear changes memory or disk).
    pub(super) fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, SeqCst);
        }
    }
}

/// What a [`DurableTracker`](super::durable::DurableTracker) marks, published as one value
/// so that a reader never sees one part of an activation with another's: each bitmap with
/// its durable bits, the disk size they cover (a resize between two activations changes
/// it), and whether the store is active in durable mode at all.
#[derive(Debug)]
pub(super) struct View {
    pub(super) marks: Vec<(Arc<DirtyBitmap>, Arc<DurableBits>)>,
    pub(super) disk_size: u64,
    /// False between a [`Durable::close`] and the next durable activation: intents fail
    /// (`marks` is then empty, and vouches for nothing). `disk_size` stays the last
    /// activation's, for an intent's range check.
    pub(super) open: bool,
}

/// A [`View`] as a tracker holds it.
pub(super) type Marks = Arc<View>;

/// The view a durable store's trackers mark: replaced as a whole when a bitmap is added or
/// removed and at every durable activation and inactivation, with `epoch` bumped after each
/// replacement, and bumped alone before a bitmap stops recording in memory and after one
/// starts recording or a clear dropped durable bits ([`bump`](Self::bump)). One per store, so trackers follow it from one durable activation
/// to the next (a migration that failed after its stop takes the store back). A tracker
/// keeps the open view it last saw with its epoch, and its fast path reads the shared epoch
/// (a word written only by a replacement or a bump) instead of the view: while they match,
/// its own copy is the current view. It reads the epoch again after the bitmaps, and
/// counts its answer only if the epoch did not move in between (the argument is at
/// `DurableTracker::is_durable`). A slow-path mark that reads the epoch before a bump sets
/// its bits in the old view: it was in flight during the change, and its wait reads the
/// new view before it returns.
///
/// The list, the disk size and the open state are one value, stored with one atomic
/// swap: a reader sees an activation's bitmaps exactly when it sees it open (an open
/// view with the empty list of a closed one would vouch for every write).
#[derive(Debug)]
pub(super) struct Published {
    pub(super) view: ArcSwap<View>,
    pub(super) epoch: AtomicU64,
    /// The writes registered in flight (`DurableTracker::begin_write`), one registry per
    /// store, across its activations.
    pub(super) in_flight: Arc<InFlight>,
}

impl Default for Published {
    /// Closed, with no bitmaps: no durable activation yet.
    fn default() -> Self {
        Published {
            view: ArcSwap::from_pointee(View {
                marks: Vec::new(),
                disk_size: 0,
                open: false,
            }),
            epoch: AtomicU64::new(0),
            in_flight: Arc::default(),
        }
    }
}

impl Published {
    /// Moves the epoch on, the view unchanged: before a durable bitmap stops recording in
    /// memory (`BitmapStore::stop_recording`), so that a fast path that reads its flag
    /// cleared finds the epoch moved and refuses its answer; after one starts recording
    /// and after a clear dropped durable bits, so that a fast path that read the flag
    /// cleared or a dropped bit set answers only before the call returns
    /// (`DurableTracker::is_durable`). Handles then read the store's view until refreshed.
    pub(super) fn bump(&self) {
        self.epoch.fetch_add(1, SeqCst);
    }
}

/// How many locks [`InFlight`] spreads its writes over.
const IN_FLIGHT_SHARDS: usize = 16;

/// The writes whose intent may have been acknowledged and that have not completed: each
/// registered before its intent reads anything (`DurableTracker::begin_write`), and
/// dropped by its guard once the write completed, failed or was abandoned.
///
/// Why a durable store needs it: an intent is acknowledged against the bitmaps that record
/// when it reads them, and the write lands later. A change of which bitmaps record (a
/// checkpoint, an `add` or an enable) or a clear between the two would leave the write in
/// no bitmap recording after it, or cleared. So each such change, once published (the new
/// view and epoch stored, the flags changed, the bits cleared), takes a
/// [`snapshot`](Self::snapshot) and marks every range in it into the bitmaps concerned,
/// durably, before it returns (`BitmapStore::commit_in_flight`). A registration the
/// snapshot misses took its shard's lock after the snapshot released it, so after the
/// publication: its intent's reads, which come after the registration, see the change, and
/// it marks the bitmaps of after the change itself.
///
/// Public (in a private module) only so that `tests/loom.rs` can race it, under
/// `--cfg loom`, where its locks and counter are loom's (`dirty_bitmap::loom_internals`).
#[derive(Debug)]
pub struct InFlight {
    /// Per shard, `(id, offset, len)` of each write registered there.
    shards: [Mutex<Vec<(u64, u64, u64)>>; IN_FLIGHT_SHARDS],
    next: InFlightCounter,
}

#[cfg(not(loom))]
type InFlightCounter = AtomicU64;
#[cfg(loom)]
type InFlightCounter = loom::sync::atomic::AtomicU64;

/// Under loom, its mutex with `parking_lot`'s interface (no poisoning to handle).
#[cfg(loom)]
#[derive(Debug)]
struct Mutex<T>(loom::sync::Mutex<T>);

#[cfg(loom)]
impl<T> Mutex<T> {
    fn new(t: T) -> Self {
        Mutex(loom::sync::Mutex::new(t))
    }

    fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            shards: std::array::from_fn(|_| Mutex::new(Vec::new())),
            next: InFlightCounter::new(0),
        }
    }
}

impl InFlight {
    /// Registers a write of `len` bytes at `offset`; returns its shard and id, for
    /// [`remove`](Self::remove).
    pub fn insert(&self, offset: u64, len: u64) -> (usize, u64) {
        let id = self.next.fetch_add(1, SeqCst);
        let shard = (id % IN_FLIGHT_SHARDS as u64) as usize;
        if let Some(m) = self.shards.get(shard) {
            m.lock().push((id, offset, len));
        }
        (shard, id)
    }

    /// Drops the registration `(shard, id)`.
    pub fn remove(&self, shard: usize, id: u64) {
        if let Some(m) = self.shards.get(shard) {
            let mut v = m.lock();
            if let Some(k) = v.iter().position(|&(i, _, _)| i == id) {
                v.swap_remove(k);
            }
        }
    }

    /// Every write registered now, `(offset, len)`: each shard locked in turn.
    pub fn snapshot(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for m in &self.shards {
            out.extend(m.lock().iter().map(|&(_, o, l)| (o, l)));
        }
        out
    }
}

/// A point between two steps of a publication (`Durable::new`, `publish`, `close`): in
/// unit tests, runs the hook the test thread installed there, so that a test reads the
/// trackers' view between the steps, deterministically. Nothing in other builds.
#[inline(always)]
pub(super) fn step() {
    #[cfg(test)]
    hook::at();
}

/// The hook [`step`] runs, per thread (the publishing one).
#[cfg(test)]
pub(super) mod hook {
    use std::cell::RefCell;

    type Hook = Box<dyn FnMut()>;

    thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Runs `f` at every later [`step`](super::step) of this thread, until [`clear`].
    pub(crate) fn set(f: impl FnMut() + 'static) {
        HOOK.with(|h| *h.borrow_mut() = Some(Box::new(f)));
    }

    /// Removes this thread's hook.
    pub(crate) fn clear() {
        HOOK.with(|h| *h.borrow_mut() = None);
    }

    pub(super) fn at() {
        HOOK.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f();
            }
        });
    }

    type ReadHook = Box<dyn FnMut(usize)>;

    thread_local! {
        static READ: RefCell<Option<ReadHook>> = const { RefCell::new(None) };
        static POINT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// Runs `f` at every later read point of this thread's fast paths
    /// (`DurableTracker::is_durable`), with the point's number: 0 right after the first
    /// read of the epoch ([`read_start`]), `k` right after the `k`-th bitmap of the list
    /// was read ([`read_next`]). Until [`clear_read`].
    pub(crate) fn set_read(f: impl FnMut(usize) + 'static) {
        READ.with(|h| *h.borrow_mut() = Some(Box::new(f)));
    }

    /// Removes this thread's read hook.
    pub(crate) fn clear_read() {
        READ.with(|h| *h.borrow_mut() = None);
    }

    /// Point 0 of a fast path.
    pub(crate) fn read_start() {
        POINT.with(|p| p.set(0));
        read(0);
    }

    /// The point after the next bitmap of a fast path.
    pub(crate) fn read_next() {
        let k = POINT.with(|p| {
            p.set(p.get() + 1);
            p.get()
        });
        read(k);
    }

    /// The hook is taken out while it runs, so that what it calls (a checkpoint, say) may
    /// reach other points without finding it borrowed; it is put back unless it installed
    /// another.
    fn read(k: usize) {
        let Some(mut f) = READ.with(|h| h.borrow_mut().take()) else {
            return;
        };
        f(k);
        READ.with(|h| {
            let mut h = h.borrow_mut();
            if h.is_none() {
                *h = Some(f);
            }
        });
    }
}

/// [`Published`], shared by the store and its trackers.
pub(super) type DurableSet = Arc<Published>;

/// What a durable store holds beside its slots: each in-memory bitmap with its table (every
/// entry a data cluster since the activation or its `add`) and its durable bits, and the
/// list its trackers read.
#[derive(Debug)]
pub(crate) struct Durable {
    pub(super) targets: Vec<flush::Target>,
    pub(super) bits: Vec<Arc<DurableBits>>,
    pub(super) set: DurableSet,
    /// The disk size the bitmaps cover.
    disk_size: u64,
    /// [`close`](Self::close) ran: nothing publishes this activation's list again.
    closed: bool,
}

impl Durable {
    /// The state of `targets`, each equal to its disk copy and unmarked, published in
    /// the store's `set` (opened) for a disk of `disk_size` bytes. A target's bits come from
    /// `ready` when it holds them for that very bitmap (built and kept equal to it before),
    /// and are built here otherwise.
    pub(super) fn new(
        targets: Vec<flush::Target>,
        set: &DurableSet,
        disk_size: u64,
        mut ready: Vec<(Arc<DirtyBitmap>, DurableBits)>,
    ) -> Self {
        let bits = targets
            .iter()
            .map(
                |t| match ready.iter().position(|(b, _)| Arc::ptr_eq(b, &t.bitmap)) {
                    Some(i) => Arc::new(ready.swap_remove(i).1),
                    None => Arc::new(DurableBits::of(&t.bitmap)),
                },
            )
            .collect();
        let d = Durable {
            targets,
            bits,
            set: Arc::clone(set),
            disk_size,
            closed: false,
        };
        d.publish();
        d
    }

    /// Makes the current bitmaps the ones every tracker marks from its next intent on.
    pub(super) fn publish(&self) {
        if self.closed {
            return;
        }
        let marks = self
            .targets
            .iter()
            .zip(&self.bits)
            .map(|(t, b)| (Arc::clone(&t.bitmap), Arc::clone(b)))
            .collect();
        self.replace(View {
            marks,
            disk_size: self.disk_size,
            open: true,
        });
    }

    /// Swaps in `view`, then bumps the epoch: a handle whose copy is of an older epoch
    /// reads the shared view from then on.
    fn replace(&self, view: View) {
        step();
        self.set.view.store(Arc::new(view));
        step();
        self.set.epoch.fetch_add(1, SeqCst);
        step();
    }

    /// Adds `target` (equal to its disk copy, not yet marked by anyone) and publishes it.
    pub(super) fn push(&mut self, target: flush::Target) {
        self.bits.push(Arc::new(DurableBits::of(&target.bitmap)));
        self.targets.push(target);
        self.publish();
    }

    /// Ends this activation for the trackers: intents fail until the next durable
    /// activation. No handle's copy of the list is read again: the epoch moves on here,
    /// a handle made while closed never matches one, and the next activation moves it
    /// again. So these bitmaps' durable bits vouch for nothing from now on (a later
    /// activation has bitmaps and durable bits of its own, which a clear may empty), and
    /// nothing proportional to the bitmaps runs inside the stop. Also after a directory
    /// commit of this activation failed (`add_inner`): nothing publishes its list again.
    pub(super) fn close(&mut self) {
        self.closed = true;
        self.replace(View {
            marks: Vec::new(),
            disk_size: self.disk_size,
            open: false,
        });
    }

    /// Drops the target of `bitmap`, if any, and publishes the rest.
    pub(super) fn drop_bitmap(&mut self, bitmap: &Arc<DirtyBitmap>) {
        if let Some(k) = self
            .targets
            .iter()
            .position(|t| Arc::ptr_eq(&t.bitmap, bitmap))
        {
            self.targets.remove(k);
            self.bits.remove(k);
            self.publish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// `covers` says what a granule-by-granule check says, for ranges inside one word,
    /// across words, at the disk's end and past it.
    #[test]
    fn covers_agrees_with_the_granules() {
        let g = 512u64;
        let disk = 300 * 64 * g + 3 * g;
        let bm = DirtyBitmap::new(disk, g).unwrap();
        let mut rng = SplitMix64::new(7);
        // Dense runs, so that long ranges are sometimes covered.
        for _ in 0..40 {
            let at = rng.below(disk / g) * g;
            bm.mark_dirty(at, (rng.below(200) + 1) * g);
        }
        let d = DurableBits::of(&bm);
        let mut long_covered = 0;
        for _ in 0..20_000 {
            let off = rng.below(disk + 2 * g);
            let len = match rng.below(3) {
                0 => rng.below(g) + 1,
                1 => rng.below(64 * g) + 1,
                _ => rng.below(300 * g) + 1,
            };
            let want = off.checked_add(len).is_some_and(|e| e <= disk)
                && (off / g..=(off + len - 1) / g).all(|k| bm.is_dirty(k * g));
            assert_eq!(d.covers(off, len), want, "{off} + {len}");
            long_covered += usize::from(want && len > 64 * g);
        }
        assert!(long_covered > 0, "no range across words was covered");
        assert!(d.covers(0, 0));
        assert!(!d.covers(u64::MAX, 2));
    }
}
