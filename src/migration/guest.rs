//! The source guest: RAM in an anonymous mapping, its dirty log, and the [`Vm`] trait the
//! loop uses to stop, resume and throttle it.
//!
//! # Why a concurrently written page can be read safely, and why no write is lost
//!
//! Guest RAM is only ever accessed as `AtomicU64` words, never as `&[u8]`, so a vCPU
//! storing into a page while the migration thread copies it is a data race in no sense of
//! the memory model: each word is read whole, old or new. A *page* can still be read torn
//! (some words from before a write, some from after). That is harmless because of the
//! order both sides follow:
//!
//! - writer ([`GuestRam::write_page`] callers, see [`Workload`]): (W) store the words, then
//!   `fence(SeqCst)`, then (M) `mark_dirty` the page in the log;
//! - migration thread ([`super::ram::RamState`]): (T) `take_dirty` the log, then
//!   `fence(SeqCst)`, then (R) copy the pages it took.
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
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use parking_lot::{Condvar, Mutex};

use super::error::{MigrationError, Result};
use crate::rng::SplitMix64;
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

/// A fresh dirty log for `ram`: a [`DirtyBitmap`] at page granularity.
///
/// # Errors
/// As [`DirtyBitmap::new`].
pub fn new_log(ram: &GuestRam) -> Result<DirtyBitmap> {
    Ok(DirtyBitmap::new(ram.size(), PAGE_SIZE as u64)?)
}

/// What the loop needs from the guest's vCPUs.
pub trait Vm {
    /// VM stop: returns once no guest write is in flight and none will start until
    /// [`resume`](Self::resume). Every write made before is marked in the log.
    ///
    /// # Errors
    /// The VM could not be stopped; the migration attempt ends.
    fn stop(&mut self) -> Result<()>;

    /// VM resume.
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

/// Where the vCPUs write.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pattern {
    /// Every page equally likely.
    Uniform,
    /// `hot_share` of the writes (0..=1) go into the first `hot_fraction` (0..=1) of the
    /// pages, the rest anywhere.
    HotSet {
        /// Fraction of pages that are hot, e.g. 0.05.
        hot_fraction: f64,
        /// Fraction of writes into the hot pages, e.g. 0.9.
        hot_share: f64,
    },
    /// Page after page, wrapping around.
    Sequential,
}

impl Pattern {
    /// The hot-set pattern `dbm simulate` and the benchmarks use: 90 % of writes into 5 % of
    /// the pages.
    pub const HOT_90_5: Pattern = Pattern::HotSet {
        hot_fraction: 0.05,
        hot_share: 0.9,
    };

    /// The page of the `n`-th write, drawn with `rng`, in a RAM of `pages` pages.
    pub fn pick(&self, rng: &mut SplitMix64, pages: u64, n: u64) -> u64 {
        match *self {
            Pattern::Uniform => rng.below(pages),
            Pattern::HotSet {
                hot_fraction,
                hot_share,
            } => {
                let hot = ((pages as f64 * hot_fraction) as u64).clamp(1, pages);
                if rng.unit() < hot_share {
                    rng.below(hot)
                } else {
                    rng.below(pages)
                }
            }
            Pattern::Sequential => n % pages,
        }
    }
}

/// Options of a [`Workload`].
#[derive(Debug, Clone, Copy)]
pub struct WorkloadConfig {
    /// vCPU threads.
    pub vcpus: usize,
    /// Page writes per second over all vCPUs, before throttling.
    pub writes_per_sec: u64,
    /// Where they land.
    pub pattern: Pattern,
    /// Seed of the page choice.
    pub seed: u64,
}

#[repr(align(64))]
#[derive(Default)]
struct Busy(AtomicBool);

struct Shared {
    ram: Arc<GuestRam>,
    log: Arc<DirtyBitmap>,
    paused: AtomicBool,
    quit: AtomicBool,
    throttle: AtomicU8,
    /// One flag per vCPU: set while a write (store + mark) is in flight.
    busy: Vec<Busy>,
    wake: Mutex<()>,
    resumed: Condvar,
    writes: AtomicU64,
}

/// vCPU threads writing guest pages at a rate and pattern and marking the log; a [`Vm`].
///
/// Pause protocol (a Dekker pair, all `SeqCst`): a vCPU sets its busy flag, then reads
/// `paused`; [`Vm::stop`] sets `paused`, then waits for every busy flag to clear. In the
/// total order either the vCPU's flag comes first (stop waits for its write to finish) or
/// stop's store does (the vCPU sees `paused` and parks before writing). So once `stop`
/// returns no write is in flight, and each write completed happens-before the return.
pub struct Workload {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("vcpus", &self.threads.len())
            .field("writes", &self.writes())
            .finish()
    }
}

impl Workload {
    /// Starts `config.vcpus` threads writing into `ram` and marking `log` (running).
    ///
    /// # Errors
    /// [`MigrationError::InvalidInput`] for 0 vCPUs or a log that does not cover `ram` at
    /// page granularity; [`MigrationError::Io`] when a thread cannot be spawned.
    pub fn start(
        ram: Arc<GuestRam>,
        log: Arc<DirtyBitmap>,
        config: WorkloadConfig,
    ) -> Result<Workload> {
        if config.vcpus == 0 {
            return Err(MigrationError::InvalidInput(
                "vcpus must be at least 1".into(),
            ));
        }
        check_log(&ram, &log)?;
        let shared = Arc::new(Shared {
            ram,
            log,
            paused: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            throttle: AtomicU8::new(0),
            busy: (0..config.vcpus).map(|_| Busy::default()).collect(),
            wake: Mutex::new(()),
            resumed: Condvar::new(),
            writes: AtomicU64::new(0),
        });
        let mut threads = Vec::with_capacity(config.vcpus);
        for v in 0..config.vcpus {
            let shared = Arc::clone(&shared);
            let rate = config.writes_per_sec as f64 / config.vcpus as f64;
            let pattern = config.pattern;
            let seed = config.seed ^ (v as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("vcpu-{v}"))
                    .spawn(move || vcpu(&shared, v, rate, pattern, seed))?,
            );
        }
        Ok(Workload { shared, threads })
    }

    /// Page writes completed so far.
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(SeqCst)
    }

    /// Stops the threads (pausing first) and joins them.
    pub fn shutdown(mut self) {
        self.join();
    }

    fn join(&mut self) {
        self.shared.quit.store(true, SeqCst);
        {
            let _g = self.shared.wake.lock();
            self.shared.resumed.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.join();
    }
}

/// Checks that `log` tracks `ram` page by page.
pub(crate) fn check_log(ram: &GuestRam, log: &DirtyBitmap) -> Result<()> {
    if log.disk_size() != ram.size() || log.granularity() != PAGE_SIZE as u64 {
        return Err(MigrationError::InvalidInput(format!(
            "dirty log covers {} bytes at granularity {}, guest RAM is {} bytes of {}-byte pages",
            log.disk_size(),
            log.granularity(),
            ram.size(),
            PAGE_SIZE
        )));
    }
    Ok(())
}

fn vcpu(shared: &Shared, me: usize, rate: f64, pattern: Pattern, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let pages = shared.ram.pages();
    let mut n = 0u64;
    let mut credit = 0.0f64;
    let mut last = Instant::now();
    while !shared.quit.load(SeqCst) {
        // Dekker: flag first, then look at `paused`.
        shared.busy[me].0.store(true, SeqCst);
        if shared.paused.load(SeqCst) {
            shared.busy[me].0.store(false, SeqCst);
            let mut g = shared.wake.lock();
            while shared.paused.load(SeqCst) && !shared.quit.load(SeqCst) {
                shared.resumed.wait(&mut g);
            }
            last = Instant::now();
            continue;
        }
        let now = Instant::now();
        let throttle = f64::from(shared.throttle.load(Relaxed).min(99)) / 100.0;
        credit += now.duration_since(last).as_secs_f64() * rate * (1.0 - throttle);
        last = now;
        // Bounded bursts, so that a pause never waits long.
        let burst = (credit as u64).min(64);
        for _ in 0..burst {
            let page = pattern.pick(&mut rng, pages, n);
            let value = (me as u64) << 56 | n;
            shared
                .ram
                .write_and_mark(&shared.log, page, |ram| ram.fill_page(page, value));
            n += 1;
        }
        credit -= burst as f64;
        shared.writes.fetch_add(burst, Relaxed);
        shared.busy[me].0.store(false, SeqCst);
        if burst == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    shared.busy[me].0.store(false, SeqCst);
}

impl Vm for Workload {
    fn stop(&mut self) -> Result<()> {
        self.shared.paused.store(true, SeqCst);
        for b in &self.shared.busy {
            while b.0.load(SeqCst) {
                std::hint::spin_loop();
            }
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<()> {
        let _g = self.shared.wake.lock();
        self.shared.paused.store(false, SeqCst);
        self.shared.resumed.notify_all();
        Ok(())
    }

    fn set_throttle(&mut self, percent: u8) {
        self.shared.throttle.store(percent.min(99), Relaxed);
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

    #[test]
    fn stop_is_a_barrier_and_every_write_is_marked() {
        let ram = Arc::new(GuestRam::new(64).unwrap());
        let log = Arc::new(new_log(&ram).unwrap());
        let mut w = Workload::start(
            Arc::clone(&ram),
            Arc::clone(&log),
            WorkloadConfig {
                vcpus: 2,
                writes_per_sec: 200_000,
                pattern: Pattern::Uniform,
                seed: 1,
            },
        )
        .unwrap();
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(5));
            let before = ram.snapshot();
            let taken = log.take_dirty();
            fence(SeqCst);
            w.stop().unwrap();
            let after = ram.snapshot();
            let writes = w.writes();
            std::thread::sleep(Duration::from_millis(5));
            // Nothing moves while stopped.
            assert_eq!(ram.snapshot(), after);
            assert_eq!(w.writes(), writes);
            // Every page that changed since the take is dirty in the log.
            for p in 0..64u64 {
                let r = p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE;
                if before[r.clone()] != after[r] {
                    assert!(
                        log.is_dirty(p * PAGE_SIZE as u64) || taken.is_dirty(p * PAGE_SIZE as u64),
                        "page {p} changed but is clean"
                    );
                }
            }
            w.resume().unwrap();
        }
        assert!(w.writes() > 0);
    }
}
