//! A guest that writes: vCPU threads storing into [`GuestRam`] pages at a rate and pattern
//! and marking the dirty log in the order `migration/guest.rs` proves safe. Test and
//! benchmark machinery (feature `testing`): the demo, `dbm simulate`, `dbm bench migrate`
//! and the tests drive the loop with it; a VMM brings its own vCPUs and implements [`Vm`].

use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::error::{MigrationError, Result};
use super::guest::{GuestRam, Vm, PAGE_SIZE};
use crate::rng::SplitMix64;
use crate::{DirtyBitmap, Tracker};

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

/// The most vCPU threads a [`Workload`] starts (QEMU's largest x86 machine has 4096).
pub const MAX_VCPUS: usize = 4096;

/// Options of a [`Workload`].
#[derive(Debug, Clone, Copy)]
pub struct WorkloadConfig {
    /// vCPU threads, 1 to [`MAX_VCPUS`].
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
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(MigrationError::InvalidInput(format!(
                "vcpus {}: must be 1 to {MAX_VCPUS}",
                config.vcpus
            )));
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
        // Built first, so that a spawn that fails drops it: its Drop stops and joins the
        // threads started before, which would otherwise write the RAM and its log after
        // this returned the error.
        let mut workload = Workload {
            shared,
            threads: Vec::with_capacity(config.vcpus),
        };
        for v in 0..config.vcpus {
            let shared = Arc::clone(&workload.shared);
            let rate = config.writes_per_sec as f64 / config.vcpus as f64;
            let pattern = config.pattern;
            let seed = config.seed ^ (v as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            workload.threads.push(
                std::thread::Builder::new()
                    .name(format!("vcpu-{v}"))
                    .spawn(move || vcpu(&shared, v, rate, pattern, seed))?,
            );
        }
        Ok(workload)
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

/// Checks that `log` tracks `ram` page by page.
fn check_log(ram: &GuestRam, log: &DirtyBitmap) -> Result<()> {
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

/// The bytes of each disk write a [`DiskWriter`] marks.
pub const DISK_WRITE: u64 = 4096;

/// Marks 4 KiB disk writes at a steady rate (90 % into a 64 GiB hot spot, the rest
/// anywhere) through a [`Tracker`], logging each after its mark returned, until paused. A
/// pause waits for the write in flight: the VM's disk I/O drained, as the `Vm` contract
/// asks before the final inactivate.
///
/// With a log file, each batch of marks is appended to it as `offset length` lines, after
/// the marks returned and before the batch counts as done: once [`pause`](Self::pause)
/// returns, the file lists every mark made, and only marks made.
pub struct DiskWriter {
    paused: Arc<AtomicBool>,
    /// Percent of the rate withheld ([`set_throttle`](Self::set_throttle)).
    throttle: Arc<AtomicU8>,
    quit: Arc<AtomicBool>,
    in_flight: Arc<std::sync::Mutex<()>>,
    log: Arc<std::sync::Mutex<Vec<u64>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl DiskWriter {
    /// Starts the writer; `file`, when given, receives the log as it grows.
    pub fn start(
        tracker: Tracker,
        disk_size: u64,
        writes_per_sec: u64,
        seed: u64,
        file: Option<std::fs::File>,
    ) -> Self {
        let mark = move |batch: &[u64]| {
            for &o in batch {
                tracker.mark(o, DISK_WRITE);
            }
            Ok(())
        };
        Self::start_marking(mark, disk_size, writes_per_sec, seed, file)
    }

    /// Starts a writer on a store active in durable mode, as a stack with 64 writes in
    /// flight issues them: each batch's intents first ([`DurableTracker::intent`]), then
    /// each waited for (the first wait runs one group commit for the whole batch), and only
    /// then the writes count as made. An intent that fails ends the writer, and its write
    /// and the batch's later ones are not logged: a write is issued only once its intent
    /// was acknowledged.
    ///
    /// [`DurableTracker::intent`]: crate::DurableTracker::intent
    pub fn start_durable<S: crate::storage::Storage + 'static>(
        tracker: crate::DurableTracker<S>,
        disk_size: u64,
        writes_per_sec: u64,
        seed: u64,
        file: Option<std::fs::File>,
    ) -> Self {
        let mark = move |batch: &[u64]| {
            let mut intents = Vec::with_capacity(batch.len());
            for &o in batch {
                // None is acknowledged before the waits below.
                intents.push(tracker.intent(o, DISK_WRITE).map_err(|e| (0, e))?);
            }
            for (k, i) in intents.into_iter().enumerate() {
                i.wait().map_err(|e| (k, e))?;
            }
            Ok(())
        };
        Self::start_marking(mark, disk_size, writes_per_sec, seed, file)
    }

    /// The writer's thread; `mark` marks a batch of 4 KiB writes, or says how many of them
    /// (a prefix) were acknowledged before it failed.
    fn start_marking(
        mark: impl Fn(&[u64]) -> std::result::Result<(), (usize, crate::Error)> + Send + 'static,
        disk_size: u64,
        writes_per_sec: u64,
        seed: u64,
        mut file: Option<std::fs::File>,
    ) -> Self {
        let paused = Arc::new(AtomicBool::new(false));
        let throttle = Arc::new(AtomicU8::new(0));
        let quit = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(std::sync::Mutex::new(()));
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (p, t, q, f, l) = (
            Arc::clone(&paused),
            Arc::clone(&throttle),
            Arc::clone(&quit),
            Arc::clone(&in_flight),
            Arc::clone(&log),
        );
        let handle = std::thread::spawn(move || {
            let mut rng = SplitMix64::new(seed ^ 0xD15C);
            let blocks = (disk_size / DISK_WRITE).max(1);
            let hot = (64u64 << 30) / DISK_WRITE;
            let hot_start = rng.below(blocks.saturating_sub(hot).max(1));
            let mut last = Instant::now();
            // Writes due and not made yet.
            let mut credit = 0f64;
            while !q.load(SeqCst) {
                // Pace: writes_per_sec on average, less the throttle, in batches of 64.
                let now = Instant::now();
                let share = f64::from(100 - t.load(Relaxed).min(99)) / 100.0;
                credit += now.duration_since(last).as_secs_f64() * writes_per_sec as f64 * share;
                last = now;
                if credit < 64.0 {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let _g = f.lock().unwrap_or_else(|e| e.into_inner());
                if p.load(SeqCst) {
                    drop(_g);
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let mut batch: Vec<u64> = (0..64)
                    .map(|_| {
                        let b = if rng.below(10) == 0 {
                            rng.below(blocks)
                        } else {
                            (hot_start + rng.below(hot)).min(blocks - 1)
                        };
                        b * DISK_WRITE
                    })
                    .collect();
                if let Err((acked, e)) = mark(&batch) {
                    // Never `eprintln!`: a stderr that cannot be written would panic this
                    // thread before the acknowledged marks below reach the list.
                    let _ = std::io::Write::write_all(
                        &mut std::io::stderr(),
                        format!("dbm: a mark failed, the disk writer stops: {e}\n").as_bytes(),
                    );
                    q.store(true, SeqCst);
                    batch.truncate(acked);
                }
                credit -= 64.0;
                if let Some(out) = file.as_mut() {
                    use std::fmt::Write as _;
                    let mut text = String::with_capacity(batch.len() * 20);
                    for o in &batch {
                        let _ = writeln!(text, "{o} {DISK_WRITE}");
                    }
                    if let Err(e) = std::io::Write::write_all(out, text.as_bytes()) {
                        // A log that cannot be written would make the check that reads it
                        // meaningless: stop writing (and marking) altogether.
                        let _ = std::io::Write::write_all(
                            &mut std::io::stderr(),
                            format!("dbm: the log of marks cannot be written: {e}\n").as_bytes(),
                        );
                        q.store(true, SeqCst);
                    }
                }
                l.lock().unwrap_or_else(|e| e.into_inner()).extend(batch);
            }
        });
        DiskWriter {
            paused,
            throttle,
            quit,
            in_flight,
            log,
            handle: Some(handle),
        }
    }

    /// Stops writing, after the write in flight.
    pub fn pause(&self) {
        self.paused.store(true, SeqCst);
        drop(self.in_flight.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Writes again.
    pub fn resume(&self) {
        self.paused.store(false, SeqCst);
    }

    /// Withholds `percent` (at most 99) of the write rate: a guest whose vCPUs are
    /// throttled submits its disk writes slower too.
    pub fn set_throttle(&self, percent: u8) {
        self.throttle.store(percent.min(99), Relaxed);
    }

    /// The offsets written so far.
    pub fn marks(&self) -> Vec<u64> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ends the thread; returns every offset written.
    pub fn shutdown(mut self) -> Vec<u64> {
        self.stop_thread();
        self.marks()
    }

    fn stop_thread(&mut self) {
        self.quit.store(true, SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A writer dropped without [`shutdown`](DiskWriter::shutdown) (its owner returned early
/// on an error) stops too: its thread would otherwise go on marking, and in durable mode
/// committing to the image, after its owner is gone.
impl Drop for DiskWriter {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// The guest as the loop sees it: the vCPUs, and the disk writer that stops with them.
pub struct DiskGuest<'a> {
    /// The vCPU threads.
    pub vcpus: &'a mut Workload,
    /// The disk writer, paused with the vCPUs and resumed with them.
    pub disk: Option<&'a DiskWriter>,
}

impl Vm for DiskGuest<'_> {
    fn stop(&mut self) -> Result<()> {
        self.vcpus.stop()?;
        if let Some(d) = self.disk {
            d.pause();
        }
        Ok(())
    }
    fn resume(&mut self) -> Result<()> {
        if let Some(d) = self.disk {
            d.resume();
        }
        self.vcpus.resume()
    }
    /// Throttles the vCPUs and, as the vCPUs issue them, the disk writes.
    fn set_throttle(&mut self, percent: u8) {
        self.vcpus.set_throttle(percent);
        if let Some(d) = self.disk {
            d.set_throttle(percent);
        }
    }
    fn run_until(&mut self, now: Duration) {
        self.vcpus.run_until(now);
    }
}

#[cfg(test)]
mod tests {
    use super::super::guest::{new_log, PAGE_SIZE};
    use super::*;

    /// A vCPU count the workload cannot start (`--vcpus 18446744073709551615` aborted on a
    /// capacity overflow) is refused before anything is allocated or spawned.
    #[test]
    fn a_vcpu_count_beyond_the_most_is_refused() {
        let ram = Arc::new(GuestRam::new(4).unwrap());
        let log = Arc::new(crate::migration::guest::new_log(&ram).unwrap());
        for vcpus in [0, MAX_VCPUS + 1, usize::MAX] {
            let Err(e) = Workload::start(
                Arc::clone(&ram),
                Arc::clone(&log),
                WorkloadConfig {
                    vcpus,
                    writes_per_sec: 1,
                    pattern: Pattern::Uniform,
                    seed: 1,
                },
            ) else {
                panic!("{vcpus} vCPUs accepted");
            };
            assert!(matches!(e, MigrationError::InvalidInput(_)), "{e}");
        }
    }
    use std::sync::atomic::fence;

    /// A throttled guest issues its disk writes slower: at 99 % the writer makes a small
    /// fraction of what it makes unthrottled in the same time.
    #[test]
    fn the_disk_writer_follows_the_throttle() {
        let disk = 1u64 << 40;
        let count = |throttle: u8| {
            let bm = Arc::new(DirtyBitmap::new(disk, 65536).unwrap());
            let w = DiskWriter::start(Tracker::new(vec![bm]), disk, 100_000, 3, None);
            w.set_throttle(throttle);
            std::thread::sleep(Duration::from_millis(300));
            w.shutdown().len()
        };
        let (free, throttled) = (count(0), count(99));
        assert!(free >= 3000, "unthrottled: {free} writes in 300 ms");
        assert!(
            throttled * 10 <= free,
            "99 %: {throttled}, unthrottled: {free}"
        );
    }

    /// A writer dropped without `shutdown` (its owner returned early on an error) stops
    /// marking, and in durable mode committing, once its owner is gone.
    #[test]
    fn a_dropped_disk_writer_stops_marking() {
        let disk = 1u64 << 40;
        let bm = Arc::new(DirtyBitmap::new(disk, 65536).unwrap());
        let w = DiskWriter::start(Tracker::new(vec![Arc::clone(&bm)]), disk, 100_000, 3, None);
        std::thread::sleep(Duration::from_millis(50));
        drop(w);
        let after = bm.count();
        assert!(after > 0, "the writer marked nothing");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(bm.count(), after, "marks after the drop");
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
