//! The source guest: RAM in an anonymous mapping, its dirty log, and the [`Vm`] trait the
//! loop uses to stop, resume and throttle it.
//!
//! [`GuestRam`] is this crate's [`GuestMemory`]; its dirty log is a [`DirtyBitmap`] at page
//! granularity (a [`super::memory::DirtyLog`]). A VMM brings its own of both; the contract
//! they meet is in `memory.rs`.
//!
//! # Why a concurrently written page can be read safely, and why no write is lost
//!
//! Guest RAM is only ever accessed as `AtomicU64` words, never as `&[u8]`, so a vCPU
//! storing into a page while the migration thread copies it is a data race in no sense of
//! the memory model: each word is read whole, old or new. A *page* can still be read torn
//! (some words from before a write, some from after). That is harmless because of the
//! order both sides follow:
//!
//! - writer ([`GuestRam::write_page`] callers, see `Workload` in `migration/workload.rs`): (W) store the words, then
//!   `fence(SeqCst)`, then (M) `mark_dirty` the page in the log;
//! - migration thread ([`super::ram::RamState`]): (T) harvest the log (`take_dirty`), then
//!   `fence(SeqCst)` ([`super::memory::DirtyLog::fence`]), then (R) copy the pages it took.
//!   Every take is followed by that fence before any copy, the one that discards the log
//!   at a full setup included.
//!
//! Take a write W to page p and the copy R of p that follows some take T. Both fences are
//! in the single total order S of `SeqCst` operations. If the writer's fence precedes the
//! reader's fence in S, R sees W (or a later store) in every word, so the copy is not stale
//! for W. Otherwise the reader's fence, hence T, precedes M's accesses to the log word, so M
//! reads the word as T left it (bit clear) or later: either M sets the bit itself, or
//! another mark set it after T. In both cases p is dirty for the *next* take, and is sent
//! again. A torn copy therefore only ever happens for a page that is re-dirtied, and the
//! final take, after [`Vm::stop`] (a barrier: no write in flight once it returns), sees
//! every write. This matters because `mark_dirty` returns without a read-modify-write
//! when the bit is already set; without the fences a write could sit in a store buffer
//! while its mark found the bit set, and the copy made after the take could miss it.
//!
//! Writing the page *after* marking would be wrong: a take between M and W would clear the
//! bit, the copy could miss W, and nothing would mark the page again.
//!
//! The only `unsafe` here is in the items marked `#[allow(unsafe_code)]`: the `Send` and
//! `Sync` of [`GuestRam`] and its word access (`GuestRam::page_words`).

use std::ptr::NonNull;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{fence, AtomicU64};
use std::time::Duration;

use memmap2::MmapMut;

use super::error::{MigrationError, Result};
use super::memory::GuestMemory;
use crate::DirtyBitmap;

/// Bytes per guest page.
pub const PAGE_SIZE: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;

/// Guest RAM: `pages` pages of [`PAGE_SIZE`] bytes in an anonymous mapping, accessed only
/// as atomic 64-bit words (see the module docs for why a concurrent copy is sound).
pub struct GuestRam {
    /// Base of the mapping as words. Derived once from `&mut` access to `map`, so it may
    /// be written through; valid for `pages * WORDS_PER_PAGE` words while `map` lives.
    base: NonNull<AtomicU64>,
    pages: u64,
    /// Random at creation; the Hello's migration id for every migration of this guest.
    migration_id: u64,
    /// Owns the mapping; never touched as bytes after construction.
    _map: MmapMut,
}

// SAFETY: the mapping is owned by the struct and only reached through `base` as
// `AtomicU64`s, which are `Sync`; nothing is thread-local.
#[allow(unsafe_code)]
unsafe impl Send for GuestRam {}
// SAFETY: as above; every access through `&self` is an atomic operation.
#[allow(unsafe_code)]
unsafe impl Sync for GuestRam {}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("pages", &self.pages)
            .finish()
    }
}

impl GuestRam {
    /// A zeroed guest RAM of `pages` pages.
    ///
    /// # Errors
    /// [`MigrationError::InvalidInput`] for 0 pages or a size that does not fit the
    /// address space; [`MigrationError::Io`] when the mapping fails.
    pub fn new(pages: u64) -> Result<Self> {
        let len = usize::try_from(pages)
            .ok()
            .and_then(|p| p.checked_mul(PAGE_SIZE))
            .filter(|&l| l > 0 && l <= isize::MAX as usize)
            .ok_or_else(|| MigrationError::InvalidInput(format!("guest RAM of {pages} pages")))?;
        let mut map = MmapMut::map_anon(len)?;
        let base = NonNull::new(map.as_mut_ptr().cast::<AtomicU64>())
            .ok_or_else(|| MigrationError::internal("a mapping at address 0"))?;
        Ok(GuestRam {
            base,
            pages,
            migration_id: crate::rng::unique_u64(),
            _map: map,
        })
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The id this guest's migrations carry in their Hello: random, fixed for the life of
    /// the guest, so a retry's destination can tell its own kept RAM from another guest's.
    pub fn migration_id(&self) -> u64 {
        self.migration_id
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.pages * PAGE_SIZE as u64
    }

    /// The words of page `page`.
    ///
    /// # Panics
    /// If `page` is out of range (a caller bug: pages come from the RAM's own bitmaps).
    #[allow(unsafe_code)]
    fn page_words(&self, page: u64) -> &[AtomicU64] {
        assert!(page < self.pages, "page {page} out of {}", self.pages);
        // SAFETY: `base` points to `pages * WORDS_PER_PAGE` words of a live mapping owned
        // by `self` (page-aligned, so 8-byte aligned; zero-initialised, a valid
        // `AtomicU64`); the range is in bounds by the assert; all access is atomic, so
        // shared references may coexist with writes through other shared references.
        unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add(page as usize * WORDS_PER_PAGE),
                WORDS_PER_PAGE,
            )
        }
    }

    /// Copies page `page` into `out` (at least [`PAGE_SIZE`] bytes), word by word. A page
    /// written meanwhile may be copied torn; see the module docs.
    ///
    /// # Panics
    /// If `page` is not below [`GuestRam::pages`] or `out` is shorter than [`PAGE_SIZE`]
    /// (caller bugs: pages come from the RAM's own bitmaps, buffers from its page size).
    pub fn read_page(&self, page: u64, out: &mut [u8]) {
        let words = self.page_words(page);
        let mut tmp = [0u64; WORDS_PER_PAGE];
        for i in 0..WORDS_PER_PAGE {
            tmp[i] = words[i].load(Relaxed).to_le();
        }
        out[..PAGE_SIZE].copy_from_slice(bytemuck::cast_slice(&tmp));
    }

    /// Stores `data` (at least [`PAGE_SIZE`] bytes; only the first page's worth is used)
    /// into page `page`. The caller marks the log afterwards, with a `fence(SeqCst)` in
    /// between ([`GuestRam::write_and_mark`]).
    ///
    /// # Panics
    /// If `page` is not below [`GuestRam::pages`] or `data` is shorter than [`PAGE_SIZE`].
    pub fn write_page(&self, page: u64, data: &[u8]) {
        for (w, chunk) in self
            .page_words(page)
            .iter()
            .zip(data[..PAGE_SIZE].chunks_exact(8))
        {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            w.store(u64::from_le_bytes(b), Relaxed);
        }
    }

    /// Fills page `page` with words derived from `value` (word i = `value ^ i`).
    ///
    /// # Panics
    /// If `page` is not below [`GuestRam::pages`].
    pub fn fill_page(&self, page: u64, value: u64) {
        for (i, w) in self.page_words(page).iter().enumerate() {
            w.store(value ^ i as u64, Relaxed);
        }
    }

    /// Stores `value` into word `word % (PAGE_SIZE / 8)` of page `page`.
    ///
    /// # Panics
    /// If `page` is not below [`GuestRam::pages`].
    pub fn write_word(&self, page: u64, word: usize, value: u64) {
        self.page_words(page)[word % WORDS_PER_PAGE].store(value, Relaxed);
    }

    /// The guest's write protocol: `store` changes the page, then a `fence(SeqCst)`, then
    /// the page is marked in `log` (module docs: the order that loses no write).
    pub fn write_and_mark(&self, log: &DirtyBitmap, page: u64, store: impl FnOnce(&Self)) {
        store(self);
        fence(SeqCst);
        log.mark_dirty(page * PAGE_SIZE as u64, PAGE_SIZE as u64);
    }

    /// A copy of all of RAM.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.size() as usize];
        for (p, chunk) in out.chunks_exact_mut(PAGE_SIZE).enumerate() {
            self.read_page(p as u64, chunk);
        }
        out
    }
}

impl GuestMemory for GuestRam {
    fn page_size(&self) -> usize {
        PAGE_SIZE
    }

    fn pages(&self) -> u64 {
        self.pages
    }

    fn read_page(&self, page: u64, out: &mut [u8]) {
        GuestRam::read_page(self, page, out);
    }

    fn migration_id(&self) -> u64 {
        self.migration_id
    }
}

/// A fresh dirty log for `ram`: a [`DirtyBitmap`] at page granularity.
///
/// # Errors
/// As [`DirtyBitmap::new`].
pub fn new_log(ram: &GuestRam) -> Result<DirtyBitmap> {
    Ok(DirtyBitmap::new(ram.size(), PAGE_SIZE as u64)?)
}

/// What the loop needs from the guest: its vCPUs and its devices.
///
/// # What "stopped" means
///
/// The loop takes the final dirty-log harvest, and a disk-bitmap state its final
/// inactivation, right after [`stop`](Self::stop) returns, and counts on both seeing every
/// write the guest made. So when `stop` returns:
///
/// - **RAM**: no vCPU runs guest code, and none will until [`resume`](Self::resume); every
///   store into guest memory made so far (by a vCPU, or by the VMM on the guest's behalf:
///   device emulation, the data of a completed disk read) is marked in the RAM dirty log
///   where the next harvest finds it (for KVM: the vCPUs have left `KVM_RUN`, and the VMM's
///   own stores are marked).
/// - **Disk**: every disk write the guest issued has *completed or been cancelled*, and its
///   mark is made in every enabled disk bitmap (a cancelled write may have reached the
///   disk, so it is marked as well); no new disk request starts until `resume` (the device
///   queues are stopped and the block layer drained, as QEMU's `bdrv_drain_all_begin`).
///   A write still in flight at the final inactivation would complete afterwards and mark
///   a bitmap whose stored copy says it holds every write: that write would be lost to
///   the next incremental backup.
///
/// Where a disk write's mark goes, relative to the write (the rule the storage stack
/// follows while the guest runs; `docs/DESIGN.md`, "Disk marks and VM stop"): always
/// before the write's completion is reported to the guest. Marking after the data write
/// completes is right for every consumer; marking earlier (when the request is issued, or
/// batched before the completion is reported) is right only when every consumer that takes
/// the bitmap and then reads the disk drains in-flight writes before its take.
pub trait Vm {
    /// VM stop: returns once no guest write (to RAM or to a disk) is in flight and none
    /// will start until [`resume`](Self::resume), every write made before marked in its
    /// log or bitmap (the trait docs say exactly what that covers).
    ///
    /// # Errors
    /// The VM could not be stopped; the migration attempt ends. It may have stopped in
    /// part (QEMU pauses the vCPUs before the flush that can fail), so the loop then calls
    /// [`resume`](Self::resume), as QEMU resumes a VM whose migration failed.
    fn stop(&mut self) -> Result<()>;

    /// VM resume. Also called after a failed [`stop`](Self::stop), on a VM that may still
    /// run: resuming a running VM must succeed and change nothing.
    ///
    /// # Errors
    /// The VM could not be resumed.
    fn resume(&mut self) -> Result<()>;

    /// Auto-converge: slow the vCPUs down by `percent` (0 = full speed, capped at 99).
    fn set_throttle(&mut self, percent: u8);

    /// Lets a simulated guest run up to `now` (it dirties pages as time passes). Real vCPU
    /// threads run by themselves and ignore it.
    fn run_until(&mut self, now: Duration) {
        let _ = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_round_trip() {
        let ram = GuestRam::new(3).unwrap();
        let data: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7) as u8).collect();
        ram.write_page(1, &data);
        let mut out = vec![0u8; PAGE_SIZE];
        ram.read_page(1, &mut out);
        assert_eq!(out, data);
        ram.read_page(0, &mut out);
        assert!(out.iter().all(|&b| b == 0));
        assert!(GuestRam::new(0).is_err());
    }
}
