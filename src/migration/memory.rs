//! What the RAM state needs from a VMM: its guest memory ([`GuestMemory`]) and its dirty
//! log ([`DirtyLog`]), which hands over the pages dirtied since the last harvest into a
//! [`DirtyPages`] set. [`super::GuestRam`] with a [`DirtyBitmap`] log is one
//! implementation; a VMM plugs in its own memory mapping and KVM's dirty log or dirty ring.
//!
//! # The order that loses no write
//!
//! The RAM state copies a page only after a harvest that covers it, in this order:
//!
//! 1. (H) [`DirtyLog::harvest`]: take the pages dirtied since the last harvest;
//! 2. (F) [`DirtyLog::fence`]: order H before the reads that follow;
//! 3. (R) [`GuestMemory::read_page`] for the pages to send.
//!
//! The log's half of the contract: **for every guest write W to page p, either every read
//! of p that starts after some H-then-F returned sees W (or a later write), or p is handed
//! over by a later harvest.** A write racing a copy is then sent again; and once the VM is
//! stopped ([`super::Vm::stop`]: no write in flight, none starting), one more H-then-F
//! covers everything, which is what the final sync relies on. Handing over too much is
//! always safe (it costs a resend), so a log that cannot tell (a failed ioctl) hands over
//! every page.
//!
//! How implementations meet it:
//!
//! - **A log in memory marked by the writers** (a [`DirtyBitmap`], `GuestRam`'s): each
//!   writer stores into the page, then `fence(SeqCst)`, then marks; H atomically takes and
//!   clears the bits; F is `fence(SeqCst)` (the default). Either the writer's fence comes
//!   first in the single order of `SeqCst` fences, and R sees the store, or the reader's
//!   does, and then the mark reads the log as H left it or later: it finds the bit clear
//!   and sets it, or set by a mark after H; either way the next harvest has the page.
//!   Marking before the store would be wrong: an H between the mark and the store clears
//!   the bit, R misses the store, and nothing marks the page again. The proof in full is in
//!   `guest.rs`.
//! - **KVM's `KVM_GET_DIRTY_LOG`**: the ioctl fetches and clears the bitmap and
//!   write-protects the reported pages before it returns, so a later guest write faults and
//!   is logged again. With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, H must also issue
//!   `KVM_CLEAR_DIRTY_LOG` for the bits it took before it returns: a page read before its
//!   protection is restored could take a write that no harvest reports.
//! - **KVM's dirty ring**: H collects the entries of every vCPU's ring, then calls
//!   `KVM_RESET_DIRTY_RINGS` before it returns (the reset re-protects the pages), for the
//!   same reason.
//! - **Writes KVM does not see**: the VMM's own stores into guest memory (device emulation,
//!   the data of a completed disk read DMA'd into guest RAM, vhost) are marked by the VMM,
//!   after the store, in a log of its own that H merges, under the writer rule above.
//!
//! [`DirtyLog::redirty`] is the other direction: after a failed attempt the state gives
//! back the pages it cannot prove the destination holds, so that a retry sends them.

use std::sync::atomic::{fence, Ordering::SeqCst};

use crate::DirtyBitmap;

/// Guest RAM as the RAM state reads it: `pages` pages of `page_size` bytes, each readable
/// by index while the guest runs.
///
/// A copy made while the guest writes the page may be torn (part before, part after the
/// write); that is harmless under the [`DirtyLog`] contract, since such a page is harvested
/// again and re-sent. Reading must not be undefined behaviour while vCPUs write: read
/// through volatile or atomic accesses, or from a mapping the compiler cannot assume
/// unchanged (not through a `&[u8]` into memory the guest writes concurrently).
pub trait GuestMemory {
    /// Bytes per page: a power of two from [`super::ram_codec::MIN_PAGE_SIZE`] to
    /// [`super::ram_codec::MAX_PAGE_SIZE`], the same for every page.
    fn page_size(&self) -> usize;

    /// Number of pages; never 0.
    fn pages(&self) -> u64;

    /// Copies page `page` (below [`pages`](Self::pages)) into `out`, which is exactly
    /// [`page_size`](Self::page_size) bytes.
    fn read_page(&self, page: u64, out: &mut [u8]);

    /// The id this guest's migrations carry in their Hello: random, fixed for the life of
    /// the guest, so that a retry's destination can tell its own kept RAM from another
    /// guest's.
    fn migration_id(&self) -> u64;
}

/// A dirty log the RAM state harvests: the pages the guest (and the VMM on its behalf)
/// wrote since the last harvest, as KVM's dirty log or dirty ring hands them over. The
/// ordering contract is in the [module docs](self): a harvest followed by
/// [`fence`](Self::fence) happens before the page copies it covers, and a write those
/// copies may miss is in a later harvest.
pub trait DirtyLog {
    /// Bytes per page; must equal the memory's [`GuestMemory::page_size`].
    fn page_size(&self) -> usize;

    /// Number of pages tracked; must equal the memory's [`GuestMemory::pages`].
    fn pages(&self) -> u64;

    /// Adds to `into` every page dirtied since the last harvest (or since the log was made,
    /// for the first), and forgets them, so that the next harvest reports only pages
    /// dirtied after this one. Called only from the migration thread, never concurrently
    /// with itself. Infallible: a log that cannot tell which pages changed adds all of
    /// them.
    fn harvest(&self, into: &mut DirtyPages<'_>);

    /// Orders the harvest that just returned before the page reads that follow it. The
    /// default is `fence(SeqCst)`, which pairs with the `fence(SeqCst)` writers put between
    /// their store and their mark; it is also harmless for a log whose harvest is already a
    /// barrier (a KVM ioctl).
    fn fence(&self) {
        fence(SeqCst);
    }

    /// Marks pages `first..first + count` dirty, so that a later harvest hands them over.
    /// The state calls it for pages it cannot prove the destination holds (a cancelled or
    /// failed attempt). A log that cannot be written (KVM's) keeps a set of its own that
    /// [`harvest`](Self::harvest) adds in.
    fn redirty(&self, first: u64, count: u64);
}

/// The set a [`DirtyLog::harvest`] adds its pages to: the RAM state's own, at page
/// granularity. Adding a page already in the set is harmless.
#[derive(Debug)]
pub struct DirtyPages<'a> {
    set: &'a DirtyBitmap,
    page_size: u64,
    pages: u64,
}

impl<'a> DirtyPages<'a> {
    /// A view of `set` (a bitmap at page granularity over `pages` pages) to add pages to.
    pub(crate) fn new(set: &'a DirtyBitmap, pages: u64) -> Self {
        DirtyPages {
            set,
            page_size: set.granularity(),
            pages,
        }
    }

    /// Pages the set covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Adds page `page`.
    ///
    /// # Panics
    /// If `page` is not below [`pages`](Self::pages) (a log that reports pages it does not
    /// track).
    pub fn add(&mut self, page: u64) {
        self.add_range(page, 1);
    }

    /// Adds pages `first..first + count`.
    ///
    /// # Panics
    /// If the range does not lie below [`pages`](Self::pages).
    pub fn add_range(&mut self, first: u64, count: u64) {
        let end = first.checked_add(count);
        assert!(
            end.is_some_and(|e| e <= self.pages),
            "dirty pages {first}+{count} out of {}",
            self.pages
        );
        if count > 0 {
            self.set
                .mark_dirty(first * self.page_size, count * self.page_size);
        }
    }

    /// Adds the pages set in `words`, KVM's dirty-bitmap layout: bit `b` of `words[i]` is
    /// page `first + 64 × i + b`.
    ///
    /// # Panics
    /// If a set bit names a page not below [`pages`](Self::pages).
    pub fn add_words(&mut self, first: u64, words: &[u64]) {
        for (i, &word) in words.iter().enumerate() {
            if word == 0 {
                continue;
            }
            // A base past u64::MAX names no page below `pages`: the panic documented, not
            // a wrap to low pages.
            let base = (i as u64)
                .checked_mul(64)
                .and_then(|o| first.checked_add(o))
                .unwrap_or_else(|| panic!("dirty pages from {first} out of {}", self.pages));
            let mut w = word;
            while w != 0 {
                let start = u64::from(w.trailing_zeros());
                let run = u64::from((w >> start).trailing_ones());
                self.add_range(base.saturating_add(start), run);
                w &= if start + run == 64 {
                    0
                } else {
                    !((1u64 << (start + run)) - 1)
                };
            }
        }
    }

    /// Adds every page dirty in `bitmap`, a bitmap at this page size (granularity) over
    /// this many pages.
    ///
    /// # Panics
    /// If `bitmap` has another granularity or bit count.
    pub fn add_bitmap(&mut self, bitmap: &DirtyBitmap) {
        assert!(
            bitmap.granularity() == self.page_size && bitmap.bit_count() == self.pages,
            "a dirty bitmap of {} bits at {} B for {} pages of {} B",
            bitmap.bit_count(),
            bitmap.granularity(),
            self.pages,
            self.page_size
        );
        if bitmap.disk_size() == self.set.disk_size() {
            // Same geometry: checked just above.
            let _ = self.set.merge_from(bitmap);
        } else {
            // A partial last granule: same bits, another disk size.
            for (off, len) in bitmap.dirty_extents() {
                let first = off / self.page_size;
                self.add_range(first, (off + len).div_ceil(self.page_size) - first);
            }
        }
    }
}

/// A [`DirtyBitmap`] at page granularity is a dirty log: writers mark it after their store
/// and a `fence(SeqCst)` ([`super::GuestRam::write_and_mark`]); a harvest is
/// [`DirtyBitmap::take_dirty`].
impl DirtyLog for DirtyBitmap {
    fn page_size(&self) -> usize {
        usize::try_from(self.granularity()).unwrap_or(usize::MAX)
    }

    fn pages(&self) -> u64 {
        self.bit_count()
    }

    fn harvest(&self, into: &mut DirtyPages<'_>) {
        into.add_bitmap(&self.take_dirty());
    }

    fn redirty(&self, first: u64, count: u64) {
        let g = self.granularity();
        self.mark_dirty(first.saturating_mul(g), count.saturating_mul(g));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages_of(set: &DirtyBitmap) -> Vec<u64> {
        let g = set.granularity();
        let mut out = Vec::new();
        for (off, len) in set.dirty_extents() {
            out.extend(off / g..(off + len) / g);
        }
        out
    }

    #[test]
    fn words_in_kvm_layout() {
        let set = DirtyBitmap::new(200 * 4096, 4096).unwrap();
        let mut d = DirtyPages::new(&set, 200);
        d.add_words(3, &[0b1011, 1 << 63, u64::MAX, 0]);
        d.add(199);
        let mut want = vec![3, 4, 6, 3 + 127];
        want.extend(3 + 128..3 + 192);
        want.push(199);
        assert_eq!(pages_of(&set), want);
    }

    #[test]
    #[should_panic(expected = "out of")]
    fn a_page_past_the_end_is_refused() {
        let set = DirtyBitmap::new(10 * 4096, 4096).unwrap();
        DirtyPages::new(&set, 10).add_words(0, &[1 << 10]);
    }

    #[test]
    fn a_bitmap_log_hands_over_once_and_takes_redirtied_pages() {
        let log = DirtyBitmap::new(16 * 4096, 4096).unwrap();
        assert_eq!(
            (DirtyLog::page_size(&log), DirtyLog::pages(&log)),
            (4096, 16)
        );
        log.mark_dirty(5 * 4096, 1);
        log.redirty(9, 2);
        let set = DirtyBitmap::new(16 * 4096, 4096).unwrap();
        log.harvest(&mut DirtyPages::new(&set, 16));
        assert_eq!(pages_of(&set), vec![5, 9, 10]);
        let again = DirtyBitmap::new(16 * 4096, 4096).unwrap();
        log.harvest(&mut DirtyPages::new(&again, 16));
        assert_eq!(again.count(), 0);
    }
}
