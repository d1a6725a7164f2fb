//! The atomics the bitmap is built on: `std`'s, or loom's under `--cfg loom` so that
//! `tests/loom.rs` can explore every interleaving of the mark, clear, take and summary
//! protocols.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64};

/// Allocates `n` zeroed atomic words.
///
/// Uses a zeroed allocation, so a large mostly clean bitmap costs no resident memory for
/// the pages nobody writes.
#[cfg(not(loom))]
pub(crate) fn zeroed_words(n: usize) -> Box<[AtomicU64]> {
    bytemuck::zeroed_slice_box::<AtomicU64>(n)
}

/// Allocates `n` zeroed atomic words (loom's atomics cannot come from zeroed memory).
#[cfg(loom)]
pub(crate) fn zeroed_words(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// Marks a point where the protocol relies on `SeqCst` accesses to another location being
/// ordered after the `SeqCst` read-modify-write just made (the store-buffering pattern:
/// "change A, then read B" racing with "change B, then read A"). All our accesses are
/// `SeqCst`, which already forbids both reads missing the other side's change, so this
/// is a no-op in real builds.
///
/// loom models `SeqCst` accesses as `AcqRel` (see its README, "Unsupported features"),
/// which would report that forbidden outcome as a false alarm; it does model
/// `fence(SeqCst)`, so under loom this is such a fence.
#[inline(always)]
pub(crate) fn sc_point() {
    #[cfg(loom)]
    loom::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// One step of a wait for another thread: a few spins, then yielding the CPU. Under loom,
/// a yield, which tells loom's scheduler to run the thread being waited for.
#[inline]
pub(crate) fn backoff(spins: &mut u32) {
    #[cfg(loom)]
    {
        let _ = spins;
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    {
        if *spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
        *spins = spins.saturating_add(1);
    }
}
