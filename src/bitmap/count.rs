//! Per-thread slots: the dirty-bit counter and the marks-in-flight sequence.
//!
//! Every change of a leaf word adjusts the counter by the popcount difference, and every
//! mark that may write announces itself while it runs, so the hot path must not pay a
//! locked instruction for either on top of the word's own `fetch_or`. Each thread
//! therefore owns one of [`SLOTS`] slots, process-wide, and updates its slot in every
//! bitmap with plain loads and stores: a slot has exactly one writer at a time, so no
//! update is lost. Threads beyond [`SLOTS`] share one extra slot through read-modify-writes.
//!
//! # Counter
//! `count` sums the slots, O(1) in the bitmap size. Slot values wrap, and the wrapping sum
//! is exact whenever no operation is in flight; while marks and clears race it can be off
//! in either direction (a clear's decrement seen without the mark's increment it undid).
//!
//! # Marks in flight
//! A slot's `marks` word is a sequence number, odd while its thread has a mark in flight:
//! [`begin_mark`](ThreadSlots::begin_mark) stores it odd before the mark's first access to
//! the bitmap, [`end_mark`](ThreadSlots::end_mark) stores it even after the mark's last
//! (its change-map bit). Both are release stores; readers load with acquire. Then:
//! - if a thread observed a word value that a mark M wrote (its `fetch_or` is a release and
//!   `SeqCst` loads acquire), M's `begin_mark` happens before that observation, so anyone
//!   who synchronises with the observer afterwards reads M's slot at M's odd value or
//!   later: "in flight", or an even value stored after M's change-map bit, which the
//!   acquire load then makes visible;
//! - a waiter that reads an odd value v waits until the slot differs from v; whatever it
//!   then reads was stored by the owner after M's end (every store is a release), so M's
//!   effects are visible, and a new mark on that thread cannot hold the waiter up.
//!
//! The shared slot counts marks in flight instead (`fetch_add` before, `fetch_sub` with
//! release after); reading 0 there synchronises with every earlier `fetch_sub`, since each
//! read-modify-write continues the release sequences before it.
//!
//! Slot hand-over: a thread gives its slot back when it exits (through a thread-local
//! destructor) by clearing its bit of a process-wide word with a release `fetch_and`, and
//! the next owner takes it with an acquiring compare-and-swap on that word, so the previous
//! owner's last store happens before the new owner's first load. No lock is taken: a
//! thread's first mark never waits for another thread.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

use super::atomic::{backoff, AtomicU64};

/// Slots owned exclusively by one thread each.
#[cfg(not(loom))]
pub(crate) const SLOTS: usize = 32;
/// Under loom, enough for the models' threads; loom's atomics are large, and a model's
/// threads run on small coroutine stacks.
#[cfg(loom)]
pub(crate) const SLOTS: usize = 4;

/// One thread's words, on their own cache line pair (adjacent-line prefetch pulls lines
/// in twos). A mark that changes a word writes both, so they share the line.
#[derive(Debug)]
#[repr(align(128))]
struct Line {
    count: AtomicU64,
    marks: AtomicU64,
}

/// Per-thread slots plus one shared slot.
#[derive(Debug)]
pub(crate) struct ThreadSlots {
    lines: [Line; SLOTS + 1],
}

/// A mark in flight, from [`ThreadSlots::begin_mark`] to [`ThreadSlots::end_mark`].
#[derive(Debug)]
pub(crate) struct InFlight {
    /// The mark on the thread's own slot, or `None` for the shared slot.
    own: Option<OwnMark>,
}

/// A mark in flight on the thread's own slot, from [`ThreadSlots::begin_own_mark`] to
/// [`ThreadSlots::end_own_mark`]: the slot and the sequence value stored (odd).
#[derive(Debug)]
pub(crate) struct OwnMark {
    slot: usize,
    seq: u64,
}

impl ThreadSlots {
    pub fn new() -> Self {
        ThreadSlots {
            lines: std::array::from_fn(|_| Line {
                count: AtomicU64::new(0),
                marks: AtomicU64::new(0),
            }),
        }
    }

    /// Records that a word went from `old` to `new`.
    #[inline]
    pub fn adjust(&self, old: u64, new: u64) {
        self.add(ones(new & !old).wrapping_sub(ones(old & !new)));
    }

    /// Adds `delta` (wrapping, so a removal is a two's-complement negative).
    #[inline]
    pub fn add(&self, delta: u64) {
        self.add_at(thread_slot::for_count(), delta);
    }

    /// Adds `delta` to owned slot `slot`, or to the shared slot.
    #[inline]
    fn add_at(&self, slot: Option<usize>, delta: u64) {
        match slot {
            Some(i) => {
                // This thread is the slot's only writer: a plain read-modify-write is exact.
                let slot = &self.lines[i].count;
                slot.store(slot.load(Relaxed).wrapping_add(delta), Relaxed);
            }
            None => {
                self.lines[SLOTS].count.fetch_add(delta, Relaxed);
            }
        }
    }

    /// Wrapping sum of the counter slots.
    pub fn count(&self) -> u64 {
        self.lines
            .iter()
            .fold(0u64, |acc, l| acc.wrapping_add(l.count.load(SeqCst)))
    }

    /// Announces a mark of this thread; pair with [`end_mark`](Self::end_mark). Two plain
    /// stores' worth of cost on an owned slot. Marks of one thread do not nest.
    #[inline]
    pub fn begin_mark(&self) -> InFlight {
        let own = self.begin_own_mark();
        if own.is_none() {
            self.lines[SLOTS].marks.fetch_add(1, Relaxed);
        }
        InFlight { own }
    }

    /// [`begin_mark`](Self::begin_mark) for a thread that owns a slot, the case of
    /// `DirtyBitmap::mark_word`'s short path; `None` (and nothing announced) for a thread
    /// on the shared slot.
    #[inline(always)]
    pub fn begin_own_mark(&self) -> Option<OwnMark> {
        let i = thread_slot::current()?;
        let m = &self.lines[i].marks;
        let seq = m.load(Relaxed) | 1;
        m.store(seq, Release);
        Some(OwnMark { slot: i, seq })
    }

    /// [`add`](Self::add) from inside a mark: the slot `begin_own_mark` found for this
    /// thread is the counter's slot too, so the thread-local lookup is not repeated. (Under
    /// loom the counter always uses the shared slot; see the loom `thread_slot` below.)
    #[inline(always)]
    pub fn add_own(&self, mark: &OwnMark, delta: u64) {
        #[cfg(loom)]
        let slot = {
            let _ = mark;
            None
        };
        #[cfg(not(loom))]
        let slot = Some(mark.slot);
        self.add_at(slot, delta);
    }

    /// [`end_mark`](Self::end_mark) for an [`OwnMark`].
    #[inline(always)]
    pub fn end_own_mark(&self, mark: OwnMark) {
        self.lines[mark.slot]
            .marks
            .store(mark.seq.wrapping_add(1), Release);
    }

    /// Ends the mark `begin_mark` announced; everything the mark did is visible to whoever
    /// reads the slot afterwards with acquire.
    #[inline]
    pub fn end_mark(&self, mark: InFlight) {
        match mark.own {
            Some(own) => self.end_own_mark(own),
            None => {
                self.lines[SLOTS].marks.fetch_sub(1, Release);
            }
        }
    }

    /// Whether any thread has a mark in flight.
    pub fn marks_in_flight(&self) -> bool {
        self.lines[..SLOTS]
            .iter()
            .any(|l| l.marks.load(Acquire) & 1 != 0)
            || self.lines[SLOTS].marks.load(Acquire) != 0
    }

    /// Returns once every mark that was in flight when this call read its slot has ended.
    /// On an owned slot a later mark of the same thread does not hold it up; the shared
    /// slot is a count, so there it waits for a moment with no mark in flight.
    pub fn wait_for_marks(&self) {
        let mut spins = 0;
        for l in &self.lines[..SLOTS] {
            let v = l.marks.load(Acquire);
            if v & 1 != 0 {
                while l.marks.load(Acquire) == v {
                    backoff(&mut spins);
                }
            }
        }
        while self.lines[SLOTS].marks.load(Acquire) != 0 {
            backoff(&mut spins);
        }
    }
}

/// Set bits of `x`. Marks usually change one bit, and the baseline x86-64 target has no
/// `popcnt` instruction, so the single-bit case skips the bit-twiddling popcount.
#[inline]
pub(crate) fn ones(x: u64) -> u64 {
    if x & x.wrapping_sub(1) == 0 {
        u64::from(x != 0)
    } else {
        u64::from(x.count_ones())
    }
}

/// The calling thread's exclusive slot.
#[cfg(not(loom))]
mod thread_slot {
    use std::cell::{Cell, RefCell};
    use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Release};

    use super::SLOTS;

    const UNSET: usize = usize::MAX;
    const SHARED: usize = usize::MAX - 1;
    const _: () = assert!(SLOTS <= 64, "the owned slots are the bits of one word");

    /// Bit i set while a thread owns slot i. Taken with a compare-and-swap and given back
    /// with a `fetch_and`, so a thread's first mark never waits for another thread (an
    /// exiting one, say): marking takes no lock.
    static TAKEN: AtomicU64 = AtomicU64::new(0);

    /// Gives slot `i` back: the release pairs with the next owner's acquiring
    /// compare-and-swap (which reads this write or a later read-modify-write of its release
    /// sequence), so every store of this owner happens before that owner's first load.
    fn give_back(i: usize) {
        TAKEN.fetch_and(!(1u64 << i), Release);
    }

    /// Owns a slot; gives it back when the thread's locals are destroyed.
    struct Owned(usize);

    impl Drop for Owned {
        fn drop(&mut self) {
            // Stop using the slot before anyone else can take it.
            let _ = INDEX.try_with(|c| c.set(SHARED));
            give_back(self.0);
        }
    }

    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(UNSET) };
        static OWNED: RefCell<Option<Owned>> = const { RefCell::new(None) };
    }

    /// The slot for the counter: the same as [`current`].
    #[inline]
    pub(super) fn for_count() -> Option<usize> {
        current()
    }

    /// `Some(slot)` owned by this thread, or `None` to use the shared slot.
    #[inline]
    pub(super) fn current() -> Option<usize> {
        match INDEX.try_with(Cell::get) {
            Ok(i) if i < SLOTS => Some(i),
            Ok(UNSET) => acquire(),
            _ => None,
        }
    }

    /// The lowest free slot, if any, taken for this thread; the shared slot from then on
    /// otherwise (a thread that found none does not look again).
    fn take() -> Option<usize> {
        let all = if SLOTS == 64 {
            u64::MAX
        } else {
            (1u64 << SLOTS) - 1
        };
        let mut taken = TAKEN.load(Acquire);
        loop {
            let free = !taken & all;
            if free == 0 {
                return None;
            }
            let i = free.trailing_zeros() as usize;
            match TAKEN.compare_exchange_weak(taken, taken | 1u64 << i, Acquire, Acquire) {
                Ok(_) => return Some(i),
                Err(now) => taken = now,
            }
        }
    }

    #[cold]
    fn acquire() -> Option<usize> {
        let Some(i) = take() else {
            let _ = INDEX.try_with(|c| c.set(SHARED));
            return None;
        };
        let registered = OWNED.try_with(|o| {
            if let Ok(mut o) = o.try_borrow_mut() {
                *o = Some(Owned(i));
                true
            } else {
                false
            }
        });
        if registered == Ok(true) && INDEX.try_with(|c| c.set(i)).is_ok() {
            Some(i)
        } else {
            // The thread is shutting down: hand the slot straight back.
            give_back(i);
            None
        }
    }
}

/// Under loom, marks use owned slots (one per model thread, in order of first use), so the
/// models exercise the plain-store protocol of the in-flight sequence. The counter uses the
/// shared slot: its `fetch_add`s are read-modify-writes that both threads of a model touch,
/// and loom's exploration leans on such conflicts (with owned counter slots some models
/// collapsed to a single execution). The owned counter slots are the plain single-writer
/// argument above; `tests/concurrency.rs` checks them with real threads.
#[cfg(loom)]
mod thread_slot {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    use super::SLOTS;

    loom::lazy_static! {
        // Reset for every execution; a std atomic, so loom does not explore it.
        static ref NEXT: AtomicUsize = AtomicUsize::new(0);
    }
    loom::thread_local! {
        static INDEX: Cell<Option<usize>> = Cell::new(None);
    }

    #[inline]
    pub(super) fn for_count() -> Option<usize> {
        None
    }

    /// What `INDEX` holds for a thread that [`use_shared`] put on the shared slot.
    const SHARED: usize = usize::MAX;

    #[inline]
    pub(super) fn current() -> Option<usize> {
        INDEX.with(|c| {
            let i = c.get().unwrap_or_else(|| {
                let i = NEXT.fetch_add(1, Relaxed);
                c.set(Some(i));
                i
            });
            if i == SHARED {
                return None;
            }
            assert!(i < SLOTS, "a loom model with more than {SLOTS} threads");
            Some(i)
        })
    }

    /// The calling thread announces its marks on the shared slot from now on, as a thread
    /// beyond the owned slots does outside loom (`fetch_add`, `fetch_sub`, and a sealer's
    /// wait for the count to reach 0).
    pub(crate) fn use_shared() {
        INDEX.with(|c| c.set(Some(SHARED)));
    }
}

/// Under loom: the calling model thread takes the shared slot's path of the in-flight
/// protocol for its marks (see the loom `thread_slot` above).
#[cfg(loom)]
pub(crate) fn use_shared_slot() {
    thread_slot::use_shared();
}

/// Marks in flight through a fan-out over several bitmaps
/// ([`Tracker::mark`](crate::Tracker::mark)), process-wide: only the `marks` words are used.
/// [`DirtyBitmap::set_enabled`](super::DirtyBitmap::set_enabled) waits for these before it
/// disables, so that a fan-out that read another bitmap as disabled also sees this one
/// still enabled (see `docs/DESIGN.md`, "Handing marking over between bitmaps").
#[cfg(not(loom))]
pub(crate) fn fan_out() -> &'static ThreadSlots {
    static FAN_OUT: ThreadSlots = ThreadSlots {
        lines: [const {
            Line {
                count: AtomicU64::new(0),
                marks: AtomicU64::new(0),
            }
        }; SLOTS + 1],
    };
    &FAN_OUT
}

/// As above; loom's atomics are not `const`, and its `lazy_static` is reset per execution.
#[cfg(loom)]
pub(crate) fn fan_out() -> &'static ThreadSlots {
    loom::lazy_static! {
        static ref FAN_OUT: ThreadSlots = ThreadSlots::new();
    }
    &FAN_OUT
}
