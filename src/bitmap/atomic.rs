//! The atomics the bitmap is built on: `std`'s, or loom's under `--cfg loom` so that
//! `tests/loom.rs` can explore every interleaving of the mark, clear, take and summary
//! protocols.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64};

#[cfg(not(loom))]
pub(crate) use words::{zeroed_words, WordArray};

/// Under loom: a plain boxed slice.
#[cfg(loom)]
pub(crate) type WordArray = Box<[AtomicU64]>;

/// Allocates `n` zeroed atomic words (loom's atomics cannot come from zeroed memory).
#[cfg(loom)]
pub(crate) fn zeroed_words(n: usize) -> WordArray {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

#[cfg(not(loom))]
mod words {
    use std::ops::Deref;
    use std::sync::atomic::AtomicU64;

    /// Arrays of at least this many bytes (one x86-64 huge page) are mapped for huge
    /// pages.
    const HUGE: usize = 2 << 20;

    /// A zeroed array of atomic words: the leaf words of a bitmap, a tower level, a change
    /// map.
    ///
    /// An array of [`HUGE`] bytes or more is an anonymous mapping advised for transparent
    /// huge pages (`MADV_HUGEPAGE`; Linux aligns such mappings to 2 MiB): the 32 MiB of
    /// leaf words of a 16 TiB bitmap at 64 KiB then take 16 TLB entries instead of 8,192,
    /// which is what a mark landing on a new word pays for, and a bitmap built by
    /// `take_dirty` faults in 16 pages instead of 8,192. Pages nobody writes still cost no
    /// memory. Smaller arrays, a refused mapping and Miri use a zeroed heap allocation.
    #[derive(Debug)]
    pub(crate) struct WordArray(Inner);

    #[derive(Debug)]
    enum Inner {
        Boxed(Box<[AtomicU64]>),
        Mapped { map: memmap2::MmapMut, len: usize },
    }

    /// Allocates `n` zeroed atomic words.
    pub(crate) fn zeroed_words(n: usize) -> WordArray {
        let bytes = n.saturating_mul(8);
        if bytes >= HUGE && !cfg!(miri) {
            if let Ok(map) = memmap2::MmapMut::map_anon(bytes) {
                // Only advice: without huge pages the mapping works the same.
                let _ = map.advise(memmap2::Advice::HugePage);
                return WordArray(Inner::Mapped { map, len: n });
            }
        }
        WordArray(Inner::Boxed(bytemuck::zeroed_slice_box::<AtomicU64>(n)))
    }

    impl FromIterator<AtomicU64> for WordArray {
        fn from_iter<I: IntoIterator<Item = AtomicU64>>(iter: I) -> Self {
            WordArray(Inner::Boxed(iter.into_iter().collect()))
        }
    }

    impl Deref for WordArray {
        type Target = [AtomicU64];

        #[inline]
        fn deref(&self) -> &[AtomicU64] {
            match &self.0 {
                Inner::Boxed(b) => b,
                #[allow(unsafe_code)]
                // SAFETY: the mapping is page-aligned (so aligned for `AtomicU64`), at least
                // `len * 8` bytes long (it was made that size), and zero-filled by the
                // kernel, and zero bytes are a valid `AtomicU64`. It lives as long as
                // `self`, which the returned slice borrows, and nothing reaches it except
                // through this slice, whose atomics give the interior mutability (the
                // mapping's own `&mut [u8]` view is never taken).
                Inner::Mapped { map, len } => unsafe {
                    std::slice::from_raw_parts(map.as_ptr().cast::<AtomicU64>(), *len)
                },
            }
        }
    }
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
