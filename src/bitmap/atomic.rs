//! The atomics the bitmap is built on: `std`'s, or loom's under `--cfg loom` so that
//! `tests/loom.rs` can explore every interleaving of the mark, clear, take and summary
//! protocols.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, AtomicU8};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, AtomicU8};

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
    use std::ptr::NonNull;
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
    ///
    /// The slice's address and length are kept beside the owner, so that indexing a word
    /// (every mark does) costs what indexing a boxed slice does, with no branch on where
    /// the memory came from.
    #[derive(Debug)]
    pub(crate) struct WordArray {
        ptr: NonNull<AtomicU64>,
        len: usize,
        owner: Owner,
    }

    /// Where a [`WordArray`]'s memory came from, and so how it is given back.
    #[derive(Debug)]
    enum Owner {
        /// `Box::<[AtomicU64]>::into_raw` of `len` words at `ptr`: rebuilt and dropped by
        /// `WordArray`'s `Drop`.
        Boxed,
        /// The mapping itself (unmapped when dropped); held only to be dropped.
        Mapped(#[allow(dead_code)] memmap2::MmapMut),
    }

    #[allow(unsafe_code)]
    // SAFETY: a `WordArray` owns a `[AtomicU64]` (a boxed slice taken apart, or a
    // `MmapMut`, which is `Send`); the pointer is only an address into that memory,
    // never freed or reallocated while `self` lives, so moving the array to another
    // thread moves exactly that ownership.
    unsafe impl Send for WordArray {}

    #[allow(unsafe_code)]
    // SAFETY: shared access only ever yields `&[AtomicU64]` (`Deref`), which is `Sync`:
    // every access to the words goes through the atomics.
    unsafe impl Sync for WordArray {}

    impl WordArray {
        fn boxed(b: Box<[AtomicU64]>) -> Self {
            let len = b.len();
            let raw = Box::into_raw(b);
            WordArray {
                // `Box::into_raw` never returns null.
                ptr: NonNull::new(raw.cast::<AtomicU64>()).unwrap_or(NonNull::dangling()),
                len,
                owner: Owner::Boxed,
            }
        }
    }

    impl Drop for WordArray {
        fn drop(&mut self) {
            if let Owner::Boxed = self.owner {
                #[allow(unsafe_code)]
                // SAFETY: `ptr` and `len` are exactly what `Box::into_raw` of a boxed slice
                // of `len` words gave in `boxed`, and this is the only place that rebuilds
                // it, once, when the array goes; no slice borrowed from `self` outlives it.
                drop(unsafe {
                    Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                        self.ptr.as_ptr(),
                        self.len,
                    ))
                });
            }
        }
    }

    /// Allocates `n` zeroed atomic words.
    pub(crate) fn zeroed_words(n: usize) -> WordArray {
        let bytes = n.saturating_mul(8);
        if bytes >= HUGE && !cfg!(miri) {
            if let Ok(mut map) = memmap2::MmapMut::map_anon(bytes) {
                // Only advice: without huge pages the mapping works the same.
                let _ = map.advise(memmap2::Advice::HugePage);
                if let Some(ptr) = NonNull::new(map.as_mut_ptr().cast::<AtomicU64>()) {
                    return WordArray {
                        ptr,
                        len: n,
                        owner: Owner::Mapped(map),
                    };
                }
            }
        }
        WordArray::boxed(bytemuck::zeroed_slice_box::<AtomicU64>(n))
    }

    impl FromIterator<AtomicU64> for WordArray {
        fn from_iter<I: IntoIterator<Item = AtomicU64>>(iter: I) -> Self {
            WordArray::boxed(iter.into_iter().collect())
        }
    }

    impl Deref for WordArray {
        type Target = [AtomicU64];

        #[inline]
        fn deref(&self) -> &[AtomicU64] {
            #[allow(unsafe_code)]
            // SAFETY: `ptr` and `len` describe the owner's whole array: a boxed slice of
            // `len` words, or a mapping of `len * 8` bytes, page-aligned (so aligned for
            // `AtomicU64`) and zero-filled by the kernel (zero bytes are a valid
            // `AtomicU64`). The owner lives as long as `self`, which the slice borrows, and
            // nothing reaches the memory except through such slices, whose atomics give the
            // interior mutability (the owner's own views are never taken again).
            unsafe {
                std::slice::from_raw_parts(self.ptr.as_ptr(), self.len)
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

/// Asks the CPU to start bringing the cache line at `addr` in: a hint that reads nothing
/// into the program, orders nothing and never faults, whatever the address (it need not
/// point into a live array). An iterator that knows which lines its next steps will read
/// issues it ahead, so that those steps do not wait for them. A no-op off x86-64 and under
/// loom.
#[inline(always)]
pub(crate) fn prefetch(addr: *const AtomicU64) {
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        #[allow(unsafe_code)]
        // SAFETY: a prefetch is only a hint: it neither reads bytes into the program nor
        // faults on any address, mapped or not.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(addr.cast::<i8>());
        }
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom))))]
    let _ = addr;
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
