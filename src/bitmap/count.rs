//! The dirty-bit counter.
//!
//! Every change of a leaf word adjusts the counter by the popcount difference, so the hot
//! path must not pay a locked instruction for it on top of the word's own `fetch_or`. Each
//! thread therefore owns one of [`SLOTS`] slots, process-wide, and updates its slot in every
//! bitmap with a plain load and store: a slot has exactly one writer at a time, so no
//! update is lost. Threads beyond [`SLOTS`] share one extra slot through `fetch_add`.
//!
//! `get` sums the slots, O(1) in the bitmap size. Slot values wrap, and the wrapping sum
//! is exact whenever no operation is in flight.
//!
//! Slot hand-over: a thread gives its slot back when it exits (through a thread-local
//! destructor) under the registry's mutex, and the next owner takes it under the same
//! mutex, so the previous owner's last store happens before the new owner's first load.

use std::sync::atomic::Ordering::{Relaxed, SeqCst};

use super::atomic::AtomicU64;

/// Slots owned exclusively by one thread each.
pub(crate) const SLOTS: usize = 32;

/// A counter on its own cache line pair (adjacent-line prefetch pulls lines in twos).
#[derive(Debug)]
#[repr(align(128))]
struct Padded(AtomicU64);

/// Dirty-bit counter with per-thread slots plus one shared slot.
#[derive(Debug)]
pub(crate) struct BitCount {
    slots: [Padded; SLOTS + 1],
}

impl BitCount {
    pub fn new() -> Self {
        BitCount {
            slots: std::array::from_fn(|_| Padded(AtomicU64::new(0))),
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
        match thread_slot::current() {
            Some(i) => {
                // This thread is the slot's only writer: a plain read-modify-write is exact.
                let slot = &self.slots[i].0;
                slot.store(slot.load(Relaxed).wrapping_add(delta), Relaxed);
            }
            None => {
                self.slots[SLOTS].0.fetch_add(delta, Relaxed);
            }
        }
    }

    /// Sum of the slots.
    pub fn get(&self) -> u64 {
        self.slots
            .iter()
            .fold(0u64, |acc, s| acc.wrapping_add(s.0.load(SeqCst)))
    }
}

/// Set bits of `x`. Marks usually change one bit, and the baseline x86-64 target has no
/// `popcnt` instruction, so the single-bit case skips the bit-twiddling popcount.
#[inline]
fn ones(x: u64) -> u64 {
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
    use std::sync::Mutex;

    use super::SLOTS;

    const UNSET: usize = usize::MAX;
    const SHARED: usize = usize::MAX - 1;

    struct Registry {
        next: usize,
        free: Vec<usize>,
    }

    static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
        next: 0,
        free: Vec::new(),
    });

    /// Owns a slot; gives it back when the thread's locals are destroyed.
    struct Owned(usize);

    impl Drop for Owned {
        fn drop(&mut self) {
            // Stop using the slot before anyone else can take it.
            let _ = INDEX.try_with(|c| c.set(SHARED));
            if let Ok(mut r) = REGISTRY.lock() {
                r.free.push(self.0);
            }
        }
    }

    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(UNSET) };
        static OWNED: RefCell<Option<Owned>> = const { RefCell::new(None) };
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

    #[cold]
    fn acquire() -> Option<usize> {
        let taken = REGISTRY.lock().ok().and_then(|mut r| {
            r.free.pop().or_else(|| {
                (r.next < SLOTS).then(|| {
                    r.next += 1;
                    r.next - 1
                })
            })
        });
        let Some(i) = taken else {
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
            if let Ok(mut r) = REGISTRY.lock() {
                r.free.push(i);
            }
            None
        }
    }
}

/// Under loom every thread uses the shared slot: the models check the bitmap protocols,
/// not the slot registry.
#[cfg(loom)]
mod thread_slot {
    #[inline]
    pub(super) fn current() -> Option<usize> {
        None
    }
}
