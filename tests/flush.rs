//! Incremental flush: only changed clusters are written, flushes race with marks
//! without losing bits, the incremental inactivate leaves what QEMU would hold, activate
//! after inactivate keeps every bit, the stop loop never decides on a stale estimate, and
//! the background policy starts and stops cleanly.
//!
//! The QEMU test needs qemu-img, qemu-io, qemu-nbd and nbdinfo; a missing tool fails it.

mod common;

use dirty_bitmap::{OpenMode, Recording};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::qemu::{assert_qemu_clean, nbd_dirty, ok, p, qemu_bitmaps};
use common::seeded_rng;
use dirty_bitmap::flush::{run_stop_loop, run_stop_loop_with, StopSource};
use dirty_bitmap::storage::{
    FaultPlan, FaultStorage, FileStorage, Locking, MemStorage, StorageExt,
};
use dirty_bitmap::units::{fits, Bytes, BytesPerMs, Millis};
use dirty_bitmap::{
    BitmapState, BitmapStore, DirtyBitmap, FlushPolicy, FlushStats, Result, SharedStore, Tracker,
};
use parking_lot::Mutex;
use rand::{RngExt, SeedableRng};

const MIB: u64 = 1 << 20;
/// 4 KiB clusters, 512 B granularity, 64 MiB disk: 16 KiB of bitmap = 4 regions/clusters,
/// each covering 16 MiB of disk.
const CS: u64 = 4096;
const G: u64 = 512;
const DISK: u64 = 64 * MIB;
const REGION_DISK: u64 = CS * 8 * G;

type Counted = FaultStorage<MemStorage>;

fn counted_store() -> BitmapStore<Counted> {
    BitmapStore::create(
        FaultStorage::new(MemStorage::new(), FaultPlan::new()),
        DISK,
        CS,
    )
    .unwrap()
}

fn writes(s: &BitmapStore<Counted>) -> u64 {
    s.image().storage().writes()
}

fn reopen<S: dirty_bitmap::storage::Storage>(s: BitmapStore<S>) -> BitmapStore<S> {
    let img = s.close().unwrap();
    BitmapStore::open(img.into_storage(), OpenMode::ReadWrite).unwrap()
}

fn extents(bm: &DirtyBitmap) -> Vec<(u64, u64)> {
    bm.dirty_extents().collect()
}

#[test]
fn flush_writes_only_changed_clusters() {
    let mut s = counted_store();
    s.add("a", G, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let t = s.tracker().unwrap();
    // Regions 0 and 2 change; both need fresh clusters.
    t.mark(100 * G, 1);
    t.mark(2 * REGION_DISK + 7 * G, 1);
    assert_eq!(s.pending_estimate(), 2 * CS);
    assert_eq!(s.pending_exact().unwrap(), 2 * (CS + 8));
    // The exact query handed every region back.
    assert_eq!(s.pending_estimate(), 2 * CS);
    let w0 = writes(&s);
    let st = s.flush().unwrap();
    assert_eq!(st.regions, 2);
    assert_eq!(st.clusters_allocated, 2);
    assert_eq!(st.bytes_written, 2 * CS + 2 * 8);
    // Refcount block, the two fresh clusters (contiguous: one write), two table entries.
    let w = writes(&s) - w0;
    assert!(w <= 4, "{w} writes");
    assert_eq!(s.pending_estimate(), 0);

    // Region 2 again: one in-place write of one cluster, one barrier, nothing allocated.
    t.mark(2 * REGION_DISK + 100 * G, 1);
    let (w0, y0) = (writes(&s), s.image().storage().syncs());
    let st = s.flush().unwrap();
    assert_eq!(
        (
            st.regions,
            st.clusters_allocated,
            st.bytes_written,
            st.syncs
        ),
        (1, 0, CS, 1)
    );
    assert_eq!(writes(&s) - w0, 1);
    assert_eq!(s.image().storage().syncs() - y0, 1);

    // Regions 0 and 2 sit in adjacent clusters now: one coalesced write of two clusters.
    t.mark(5 * G, 1);
    t.mark(2 * REGION_DISK + 200 * G, 1);
    let w0 = writes(&s);
    let st = s.flush().unwrap();
    assert_eq!((st.regions, st.bytes_written), (2, 2 * CS));
    assert_eq!(writes(&s) - w0, 1, "adjacent clusters coalesce");

    // Nothing changed: no write, no barrier.
    let (w0, y0) = (writes(&s), s.image().storage().syncs());
    assert_eq!(s.flush().unwrap().bytes_written, 0);
    assert_eq!((writes(&s) - w0, s.image().storage().syncs() - y0), (0, 0));

    // A marked bit already set writes nothing either.
    t.mark(100 * G, 1);
    assert_eq!(s.pending_estimate(), 0);

    let mem = s.bitmap("a").unwrap().snapshot();
    let st = s.inactivate().unwrap();
    assert_eq!(st.bytes_written, 0, "everything was flushed before");
    let s = reopen(s);
    assert!(s.image().check().unwrap().is_clean());
    assert_eq!(extents(&s.load("a").unwrap()), extents(&mem));
}

#[test]
fn flush_rounds_while_threads_mark() {
    let (mut rng, seed) = seeded_rng("flush_rounds_while_threads_mark");
    let mut s = BitmapStore::create(MemStorage::new(), DISK, CS).unwrap();
    s.add("a", G, Recording::Enabled).unwrap();
    s.add("b", 4 * G, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let tracker = s.tracker().unwrap();
    let store = Arc::new(Mutex::new(s));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for k in 0..3u64 {
        let t = tracker.clone();
        let stop = Arc::clone(&stop);
        let mut r = rand::rngs::SmallRng::seed_from_u64(seed ^ k);
        handles.push(std::thread::spawn(move || {
            let mut marks = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let off = r.random_range(0..DISK - 4096);
                let len = r.random_range(1..4096);
                t.mark(off, len);
                marks.push((off, len));
                if marks.len() % 64 == 0 {
                    std::thread::yield_now();
                }
            }
            marks
        }));
    }
    let mut total = FlushStats::default();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(rng.random_range(0..3)));
        total.accumulate(&store.lock().flush().unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let marks: Vec<(u64, u64)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(total.regions > 0);
    let mut s = Arc::try_unwrap(store).unwrap().into_inner();
    let mems: Vec<DirtyBitmap> = ["a", "b"]
        .iter()
        .map(|n| s.bitmap(n).unwrap().snapshot())
        .collect();
    s.inactivate().unwrap();
    let s = reopen(s);
    assert!(s.image().check().unwrap().is_clean());
    for (n, mem) in ["a", "b"].iter().zip(&mems) {
        let disk = s.load(n).unwrap();
        assert_eq!(extents(&disk), extents(mem), "{n}, seed {seed}");
        for &(off, len) in &marks {
            assert!(disk.is_dirty(off) && disk.is_dirty(off + len - 1), "{n}");
        }
    }
}

/// Flushes racing marks lose no mark once the marker moved on: two threads each walk their
/// half of an 8 GiB disk (512 regions of the change map) forward, a few marks per region,
/// never marking a region again once they left it, while the main thread flushes as fast
/// as it can. A flush that lost a mark landing during it (a change bit taken after its
/// region was serialized, or dropped after the write) would leave that region short on
/// disk for good: no later mark sets its change bit again. The disk then holds exactly
/// what memory holds, and every mark.
#[test]
fn flush_rounds_lose_no_mark_a_marker_has_moved_past() {
    const BIG: u64 = 8 << 30;
    let (_, seed) = seeded_rng("flush_rounds_lose_no_mark_a_marker_has_moved_past");
    let mut s = BitmapStore::create(MemStorage::new(), BIG, 65536).unwrap();
    s.add("a", G, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let regions = s.bitmap("a").unwrap().region_count();
    assert!(regions >= 512, "{regions} regions");
    let per_region = BIG / regions;
    let tracker = s.tracker().unwrap();
    let store = Arc::new(Mutex::new(s));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut handles = Vec::new();
    for k in 0..2u64 {
        let t = tracker.clone();
        let done = Arc::clone(&done);
        let mut r = rand::rngs::SmallRng::seed_from_u64(seed ^ k);
        handles.push(std::thread::spawn(move || {
            let mut marks = Vec::new();
            let half = regions / 2;
            for reg in k * half..(k + 1) * half {
                let base = reg * per_region;
                let mut offs: Vec<u64> = (0..8)
                    .map(|_| base + r.random_range(0..per_region / G) * G)
                    .collect();
                offs.sort_unstable();
                for off in offs {
                    t.mark(off, G);
                    marks.push(off);
                }
                std::thread::yield_now();
            }
            done.fetch_add(1, Ordering::SeqCst);
            marks
        }));
    }
    let mut flushes = 0u64;
    let mut regions_flushed = 0u64;
    while done.load(Ordering::SeqCst) < 2 {
        regions_flushed += store.lock().flush().unwrap().regions;
        flushes += 1;
    }
    let marks: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(
        flushes > 1 && regions_flushed > 0,
        "no flush raced the marks"
    );
    let mut s = Arc::try_unwrap(store).unwrap().into_inner();
    let mem = s.bitmap("a").unwrap().snapshot();
    s.inactivate().unwrap();
    let s = reopen(s);
    assert!(s.image().check().unwrap().is_clean());
    let disk = s.load("a").unwrap();
    for &off in &marks {
        assert!(
            disk.is_dirty(off),
            "mark at {off} lost (seed {seed}, {flushes} flushes)"
        );
    }
    assert_eq!(extents(&disk), extents(&mem), "seed {seed}");
}

#[test]
fn inactivate_matches_qemu_and_qemu_continues() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.qcow2");
    let disk = 256 * MIB;
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), disk, 65536).unwrap();
    s.add("on", 65536, Recording::Enabled).unwrap();
    s.add("fine", 4096, Recording::Enabled).unwrap();
    s.add("off", 65536, Recording::Disabled).unwrap();
    s.activate().unwrap();
    let t = s.tracker().unwrap();
    t.mark(3 * MIB, 5 * MIB);
    s.flush().unwrap();
    t.mark(200 * MIB, 4096);
    t.mark(3 * MIB + 4096, 1);
    s.flush().unwrap();
    t.mark(100 * MIB, 1);
    t.mark(255 * MIB, MIB);
    assert!(s.pending_estimate() > 0);
    let mems: Vec<(String, DirtyBitmap)> = ["on", "fine", "off"]
        .iter()
        .map(|n| (n.to_string(), s.bitmap(n).unwrap().snapshot()))
        .collect();
    assert_eq!(mems[2].1.count(), 0, "a disabled bitmap is untouched");
    let st = s.inactivate().unwrap();
    assert!(st.bytes_written > 0 && st.bytes_written < 4 * 65536 + 64);
    drop(s);

    assert_qemu_clean(&img);
    let q = qemu_bitmaps(&img);
    assert_eq!(q.len(), 3);
    assert_eq!(q[0].2, vec!["auto"]);
    assert_eq!(q[2].2, Vec::<String>::new());
    for (n, mem) in &mems {
        assert_eq!(nbd_dirty(&img, n), extents(mem), "{n}");
    }

    // QEMU opens it and continues: its write lands in the enabled bitmaps.
    ok("qemu-io", &["-f", "qcow2", "-c", "write 128M 64k", p(&img)]);
    assert_qemu_clean(&img);
    let s = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    for (n, mem) in &mems {
        let want = mem.snapshot();
        if n != "off" {
            want.mark_dirty(128 * MIB, 65536);
        }
        assert_eq!(
            s.list().iter().find(|b| &b.name == n).unwrap().state,
            BitmapState::Consistent
        );
        assert_eq!(extents(&s.load(n).unwrap()), extents(&want), "{n}");
    }
}

#[test]
fn activate_after_inactivate_keeps_every_bit() {
    let mut s = counted_store();
    s.add("a", G, Recording::Enabled).unwrap();
    s.add("d", G, Recording::Disabled).unwrap();
    s.activate().unwrap();
    let t = s.tracker().unwrap();
    let a = s.bitmap("a").unwrap();
    t.mark(0, 1);
    s.flush().unwrap();
    t.mark(REGION_DISK, 1);
    s.inactivate().unwrap();
    assert!(!s.is_active());
    assert!(s.list().iter().all(|b| !b.in_use));
    // Marks while inactive: kept in memory (and in its change map), not on disk yet.
    t.mark(3 * REGION_DISK + G, 1);
    assert_eq!(a.changed_region_count(), 1);
    s.activate().unwrap();
    assert!(s.list().iter().all(|b| b.in_use));
    // The same bitmap resumed: no reload from the (older) disk.
    assert!(Arc::ptr_eq(&a, &s.bitmap("a").unwrap()));
    for off in [0, REGION_DISK, 3 * REGION_DISK + G] {
        assert!(a.is_dirty(off), "{off}");
    }
    t.mark(2 * REGION_DISK, 1);
    assert_eq!(s.pending_estimate(), 2 * CS);
    let s = reopen(s);
    assert!(s.image().check().unwrap().is_clean());
    let disk = s.load("a").unwrap();
    for off in [0, REGION_DISK, 2 * REGION_DISK, 3 * REGION_DISK + G] {
        assert!(disk.is_dirty(off), "{off}");
    }
    assert_eq!(disk.count(), 4);
    assert_eq!(s.load("d").unwrap().count(), 0);
}

/// Every activation makes `in_use` durable before it returns: from then on marks are
/// acknowledged without a write, so a crash right after the return (only what the barriers
/// made durable survives) must leave every bitmap the store activated inconsistent, never
/// clean without the marks. Checked for a first activation, a re-activation after an
/// incremental stop (the parked bitmaps resumed, nothing read), after QEMU's whole-rewrite
/// stop, and through `activate_preloaded` and `activate_with`. A barrier issued before the
/// flags write would leave them clean on the durable image.
#[test]
fn every_activation_makes_in_use_durable_before_it_returns() {
    use dirty_bitmap::storage::{CrashMode, CrashStorage};
    let durable_in_use = |c: &CrashStorage, what: &str| {
        let img = c.crash_image(c.op_count(), CrashMode::Dropped).unwrap();
        let d = BitmapStore::open(MemStorage::from_bytes(img), OpenMode::ReadOnly).unwrap();
        let list = d.list();
        assert_eq!(list.len(), 2, "{what}");
        for b in &list {
            assert!(
                b.in_use && b.state == BitmapState::Inconsistent,
                "{what}: {} is {:?} (in_use {}) on the durable image after the activation",
                b.name,
                b.state,
                b.in_use
            );
        }
    };
    let c = CrashStorage::new();
    let mut s = BitmapStore::create(&c, DISK, CS).unwrap();
    s.add("a", G, Recording::Enabled).unwrap();
    s.add("d", G, Recording::Disabled).unwrap();
    s.activate().unwrap();
    durable_in_use(&c, "first activate");
    let t = s.tracker().unwrap();
    t.mark(0, 1);
    s.inactivate().unwrap();
    t.mark(REGION_DISK, 1);
    s.activate().unwrap();
    durable_in_use(&c, "activate after an incremental stop");
    s.inactivate_full_rewrite().unwrap();
    s.activate().unwrap();
    durable_in_use(&c, "activate after a whole rewrite");
    s.inactivate().unwrap();
    let img = s.close().unwrap();
    drop(img);
    let mut s = BitmapStore::open(&c, OpenMode::ReadWrite).unwrap();
    let pre = s.preload().unwrap();
    s.activate_preloaded(pre).unwrap();
    durable_in_use(&c, "activate_preloaded");
    s.inactivate().unwrap();
    let a = Arc::new(s.load("a").unwrap());
    assert!(a.is_dirty(0) && a.is_dirty(REGION_DISK));
    s.activate_with(vec![("a".into(), a)]).unwrap();
    durable_in_use(&c, "activate_with");
    s.close().unwrap();
}

#[test]
fn inactive_edits_keep_the_parked_bitmap_in_step() {
    let mut s = counted_store();
    s.add("a", G, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let t = s.tracker().unwrap();
    t.mark(0, 1);
    s.inactivate().unwrap();
    t.mark(REGION_DISK, 1);
    // An inactive clear rewrites the disk and clears the parked copy too.
    s.clear("a").unwrap();
    t.mark(2 * REGION_DISK, 1);
    s.activate().unwrap();
    let a = s.bitmap("a").unwrap();
    assert_eq!(extents(&a), vec![(2 * REGION_DISK, G)]);
    let s = reopen(s);
    assert_eq!(extents(&s.load("a").unwrap()), vec![(2 * REGION_DISK, G)]);
}

/// Drives a real store through the stop loop; the estimate it reports is taken *before* a
/// guest write that lands on a new region (step 0 only), so it is stale by one region.
struct StaleEstimate<'a> {
    store: &'a mut BitmapStore<Counted>,
    tracker: Tracker,
    step: u32,
}

impl StopSource for StaleEstimate<'_> {
    fn estimate(&mut self) -> u64 {
        let e = self.store.pending_estimate();
        if self.step == 0 {
            self.tracker.mark(3 * REGION_DISK + 5 * G, 1);
        }
        self.step += 1;
        e
    }
    fn exact(&mut self) -> Result<u64> {
        self.store.pending_exact()
    }
    fn flush(&mut self) -> Result<FlushStats> {
        self.store.flush()
    }
}

/// The bandwidth whose budget over 1 ms is exactly `bytes` (exact in `f64` for these sizes).
fn budget_bandwidth(bytes: u64) -> BytesPerMs {
    BytesPerMs::from_bytes_per_ms(bytes as f64)
}

/// A store with regions 0..4 holding data clusters and region 0 changed again: the
/// estimate is exactly one region, CS bytes, and the exact figure is CS too.
fn stop_fixture() -> (BitmapStore<Counted>, Tracker) {
    let mut s = counted_store();
    s.add("a", G, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let t = s.tracker().unwrap();
    for r in 0..4 {
        t.mark(r * REGION_DISK, 1);
    }
    s.flush().unwrap();
    t.mark(G, 1);
    assert_eq!(s.pending_estimate(), CS);
    (s, t)
}

#[test]
fn stop_loop_never_decides_on_a_stale_estimate_equal_to_the_budget() {
    let (mut s, t) = stop_fixture();
    let threshold = CS; // estimate == threshold exactly
    let mut src = StaleEstimate {
        store: &mut s,
        tracker: t,
        step: 0,
    };
    // CS bytes/ms for 1 ms: a budget of exactly CS bytes.
    let r = run_stop_loop(&mut src, budget_bandwidth(threshold), Millis(1)).unwrap();
    assert_eq!(r.threshold, Bytes(threshold));
    assert!(r.converged);
    assert!(r.exact_queries >= 2, "{r:?}");
    assert!(
        r.flushed.regions >= 2,
        "the exact query saw 2 regions and flushed"
    );
    assert!(fits(r.pending, Bytes(threshold)));
    let left = s.pending_exact().unwrap();
    assert!(left <= threshold, "{left} pending after the decision");
    // The stop writes at most the budget.
    let st = s.inactivate().unwrap();
    assert!(st.bytes_written <= threshold);

    // The public entry point, on the plain store: the estimate is CS, the exact figure
    // CS + 8 (a fresh cluster and its entry): must flush rather than stop.
    let mut s = counted_store();
    s.add("a", G, Recording::Enabled).unwrap();
    s.activate().unwrap();
    s.tracker().unwrap().mark(0, 1);
    assert_eq!(s.pending_estimate(), CS);
    let r = s.prepare_stop(budget_bandwidth(CS), Millis(1)).unwrap();
    assert_eq!(r.threshold, Bytes(CS));
    assert!(r.converged && r.flushed.clusters_allocated == 1, "{r:?}");
    assert_eq!(r.pending, Bytes(0));
}

/// A stop whose bitmap has at least the rewrite threshold of its regions changed rewrites
/// every region of its data clusters, so the exact stop figure counts what the flush at the
/// store's threshold writes, not only the changed regions: counting those alone,
/// `prepare_stop` would converge on a budget the stop then overruns (here 64 regions
/// counted, 128 written). The stop stays within the figure.
#[test]
fn the_exact_stop_figure_counts_a_whole_rewrite() {
    // 128 regions of one 4 KiB cluster each (16 MiB of disk per region at 512 bytes a
    // bit), every one a data cluster on disk.
    let regions = 128;
    let mut s = BitmapStore::create(MemStorage::new(), regions * REGION_DISK, CS).unwrap();
    s.add("a", G, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let t = s.tracker().unwrap();
    for r in 0..regions {
        t.mark(r * REGION_DISK, 1);
    }
    s.flush().unwrap();
    // Half of them change again: over the default threshold of 0.375.
    for r in 0..regions / 2 {
        t.mark(r * REGION_DISK + 4096, 1);
    }
    assert!(dirty_bitmap::flush::rewrites_whole(
        regions / 2,
        regions,
        s.rewrite_threshold()
    ));
    let exact = s.pending_exact().unwrap();
    assert_eq!(exact, regions * CS, "every region of the data clusters");
    let r = s.prepare_stop(budget_bandwidth(exact), Millis(1)).unwrap();
    assert!(r.converged && r.flushed.regions == 0, "{r:?}");
    let st = s.inactivate().unwrap();
    assert!(
        st.bytes_written <= exact,
        "the stop wrote {} bytes on a figure of {exact}",
        st.bytes_written
    );
}

#[test]
fn qemus_lt_gate_with_le_decision_stops_over_budget() {
    let (mut s, t) = stop_fixture();
    let threshold = CS;
    let mut src = StaleEstimate {
        store: &mut s,
        tracker: t,
        step: 0,
    };
    // QEMU 7aaa1fc072: exact query only if estimate < threshold; stop if pending <= it.
    let r = run_stop_loop_with(
        &mut src,
        budget_bandwidth(threshold),
        Millis(1),
        |a, b| a < b,
        |a, b| a <= b,
    )
    .unwrap();
    assert_eq!(r.threshold, Bytes(threshold));
    assert!(r.converged);
    assert_eq!(r.exact_queries, 0, "it decided on the estimate");
    assert_eq!(r.pending, Bytes(threshold));
    let left = s.pending_exact().unwrap();
    assert_eq!(left, 2 * CS);
    assert!(
        left > threshold,
        "stopped with {left} > {threshold} pending"
    );
}

fn wait_until(mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn flush_policy_starts_and_stops() {
    let mut s = counted_store();
    s.add("a", G, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let t = s.tracker().unwrap();
    let store = SharedStore::new(s);

    // Timer.
    let th = FlushPolicy::every(Duration::from_millis(5))
        .spawn(store.clone())
        .unwrap();
    for r in 0..4 {
        t.mark(r * REGION_DISK, 1);
        std::thread::sleep(Duration::from_millis(15));
    }
    wait_until(|| store.lock().pending_estimate() == 0);
    let stats = th.stop().unwrap();
    assert!(stats.flushes >= 2, "{stats:?}");
    assert_eq!(store.lock().pending_estimate(), 0);
    // No flush after stop returned.
    let w0 = writes(&store.lock());
    t.mark(G * 9, 1);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(writes(&store.lock()), w0);
    assert_eq!(store.lock().pending_estimate(), CS);

    // The owner inactivates and reactivates under the lock while the thread runs: the
    // thread skips flushes while inactive, and nothing is lost.
    let th = FlushPolicy::every(Duration::from_millis(1))
        .spawn(store.clone())
        .unwrap();
    store.lock().inactivate().unwrap();
    let w0 = writes(&store.lock());
    t.mark(G * 11, 1);
    std::thread::sleep(Duration::from_millis(20));
    // Nothing written while inactive (the mark waits in the parked copy).
    assert_eq!(writes(&store.lock()), w0);
    store.lock().activate().unwrap();
    wait_until(|| store.lock().pending_estimate() == 0);
    assert!(th.stop().unwrap().flushes >= 1);
    assert_eq!(store.lock().pending_estimate(), 0);

    // Threshold: below it nothing is flushed (in deferred mode; a durable store's
    // pending intents are due at once: tests/durable.rs), however many polls pass.
    t.mark(G * 13, 1);
    let pending = store.lock().pending_estimate();
    let th = FlushPolicy {
        interval: None,
        max_pending_bytes: Some(pending),
        poll: Duration::from_millis(1),
    }
    .spawn(store.clone())
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(th.stop().unwrap().flushes, 0);
    assert_eq!(store.lock().pending_estimate(), pending);
    // Flushes once more than 0 bytes changed.
    let th = FlushPolicy::when_pending_above(0)
        .spawn(store.clone())
        .unwrap();
    wait_until(|| store.lock().pending_estimate() == 0);
    let stats = th.stop().unwrap();
    assert!(stats.flushes >= 1);
    assert!(FlushPolicy {
        interval: None,
        max_pending_bytes: None,
        poll: Duration::from_millis(1)
    }
    .spawn(store.clone())
    .is_err());

    let s = store.try_into_inner().unwrap();
    let s = reopen(s);
    assert_eq!(s.load("a").unwrap().count(), 7);
}

#[test]
fn activate_refuses_an_image_qemu_wrote_while_inactive() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("h.qcow2");
    // Without image locks, as on shared storage whose locks do not reach the other host: a
    // locked writable handle keeps QEMU out altogether (tests/locking.rs).
    let storage = FileStorage::create_with(&img, Locking::Off).unwrap();
    let mut s = BitmapStore::create(storage, 64 * MIB, 65536).unwrap();
    s.add("a", 65536, Recording::Enabled).unwrap();
    s.activate().unwrap();
    s.tracker().unwrap().mark(MIB, 1);
    s.inactivate().unwrap();
    // Our own inactive edits are fine to resume over.
    s.set_enabled("a", true).unwrap();
    s.activate().unwrap();
    s.inactivate().unwrap();
    // A failed hand-over where the target wrote the disk: QEMU stored its bitmaps into new
    // clusters and freed ours. Resuming the parked bitmaps would write into freed clusters.
    ok("qemu-io", &["-f", "qcow2", "-c", "write 0 4k", p(&img)]);
    let err = s.activate().unwrap_err();
    assert!(
        matches!(
            err,
            dirty_bitmap::Error::WrongState(
                dirty_bitmap::error::StateProblem::ChangedWhileInactive
            )
        ),
        "{err}"
    );
    assert!(err.to_string().contains("changed while inactive"), "{err}");
    drop(s);
    assert_qemu_clean(&img);
}

/// A storage that starts a guest write (a thread marking a bitmap) from inside its
/// `write_all_at`, at the N-th write: a guest write that races with `inactivate`, placed
/// deterministically. The hook then gives the mark up to 200 ms to return, and every later
/// write records whether it had: a mark that returned while the store was still writing
/// the bitmaps out could let its guest write go ahead before the outcome is durable. The
/// barriers are counted, and the marking thread records how many had been issued when its
/// mark returned: one that returns before the stop's last barrier returned before the
/// outcome was durable.
#[derive(Debug)]
struct MarkOnWrite {
    inner: dirty_bitmap::storage::MemStorage,
    writes: std::sync::atomic::AtomicU64,
    syncs: Arc<std::sync::atomic::AtomicU64>,
    syncs_when_marked: Arc<std::sync::atomic::AtomicU64>,
    at: std::sync::atomic::AtomicU64,
    target: std::sync::Mutex<Option<(Arc<DirtyBitmap>, u64)>>,
    marked: Arc<std::sync::atomic::AtomicBool>,
    written_after_the_mark_returned: std::sync::atomic::AtomicBool,
    marker: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl dirty_bitmap::storage::Storage for MarkOnWrite {
    fn len(&self) -> dirty_bitmap::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> dirty_bitmap::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> dirty_bitmap::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.writes.fetch_add(1, SeqCst) + 1;
        if self.marked.load(SeqCst) {
            self.written_after_the_mark_returned.store(true, SeqCst);
        }
        if n == self.at.load(SeqCst) {
            if let Some((bm, off)) = self.target.lock().unwrap().clone() {
                let marked = Arc::clone(&self.marked);
                let (syncs, when) = (Arc::clone(&self.syncs), Arc::clone(&self.syncs_when_marked));
                let (tx, rx) = std::sync::mpsc::channel();
                *self.marker.lock().unwrap() = Some(std::thread::spawn(move || {
                    bm.mark_dirty(off, 4096);
                    when.store(syncs.load(SeqCst), SeqCst);
                    marked.store(true, SeqCst);
                    let _ = tx.send(());
                }));
                let _ = rx.recv_timeout(std::time::Duration::from_millis(200));
            }
        }
        self.inner.write_all_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> dirty_bitmap::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> dirty_bitmap::Result<()> {
        let r = self.inner.sync_data();
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        r
    }
}

/// A guest write racing `inactivate` (its mark starts at the stop's first write) cannot
/// return before the stop's outcome is durable: the bitmaps are sealed, so the mark waits,
/// then lands in the parked bitmap, and the next activate and stop write it. Without the
/// seal the mark returned at once while the stop went on to write "clean" (defect 9 in
/// `tests/review_defects.rs`: a crash before `in_use` was put back lost it).
#[test]
fn a_mark_racing_inactivate_waits_until_the_stop_is_durable_and_is_kept() {
    use std::sync::atomic::Ordering::SeqCst;
    let storage = MarkOnWrite {
        inner: dirty_bitmap::storage::MemStorage::new(),
        writes: Default::default(),
        syncs: Default::default(),
        syncs_when_marked: Default::default(),
        at: Default::default(),
        target: Default::default(),
        marked: Default::default(),
        written_after_the_mark_returned: Default::default(),
        marker: Default::default(),
    };
    let mut s = BitmapStore::create(storage, 1 << 30, 65536).unwrap();
    s.add("b", 65536, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let bm = s.bitmap("b").unwrap();
    bm.mark_dirty(0, 4096);
    s.flush().unwrap();
    // The first write of inactivate (nothing left to flush: the directory's flags) brings a
    // guest write with it.
    let written = s.image().storage().writes.load(SeqCst);
    *s.image().storage().target.lock().unwrap() = Some((Arc::clone(&bm), 512 << 20));
    s.image().storage().at.store(written + 1, SeqCst);
    let syncs_before = s.image().storage().syncs.load(SeqCst);
    s.inactivate().unwrap();
    assert!(!s.is_active());
    let marker = s.image().storage().marker.lock().unwrap().take().unwrap();
    marker.join().unwrap();
    assert!(
        !s.image()
            .storage()
            .written_after_the_mark_returned
            .load(SeqCst),
        "the racing mark returned while the stop was still writing"
    );
    let syncs = s.image().storage().syncs.load(SeqCst);
    assert!(syncs > syncs_before, "the stop issued no barrier");
    assert_eq!(
        s.image().storage().syncs_when_marked.load(SeqCst),
        syncs,
        "the racing mark returned before the stop's last barrier"
    );
    // The mark waited and is in the parked bitmap: the next activate and stop write it.
    assert!(s.load("b").unwrap().is_dirty(512 << 20));
    s.activate().unwrap();
    let image = s.close().unwrap();
    let bytes = image.into_storage().inner.to_vec();
    let s = BitmapStore::open(
        dirty_bitmap::storage::MemStorage::from_bytes(bytes),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let loaded = s.load("b").unwrap();
    assert!(
        loaded.is_dirty(0) && loaded.is_dirty(512 << 20),
        "a mark was lost"
    );
}

/// The incremental stop commits with two barriers and never rewrites cluster 0: the
/// remainder, a barrier, the directory's flags in place, a barrier. With nothing left, one.
/// `activate` likewise sets the flags in place with one barrier.
#[test]
fn inactivate_commits_with_two_barriers_and_no_header_write() {
    let mut s = counted_store();
    s.add("a", G, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let t = s.tracker().unwrap();
    t.mark(0, 1);
    s.flush().unwrap();
    t.mark(7 * G, 1);
    let header = s.image().storage().inner().read_vec_at(0, 512).unwrap();
    let (w0, y0) = (writes(&s), s.image().storage().syncs());
    let st = s.inactivate().unwrap();
    assert_eq!((st.bytes_written, st.syncs), (CS, 2));
    assert_eq!(
        (writes(&s) - w0, s.image().storage().syncs() - y0),
        (2, 2),
        "one region, one directory write"
    );
    assert_eq!(
        s.image().storage().inner().read_vec_at(0, 512).unwrap(),
        header,
        "cluster 0 untouched"
    );
    // Taking the disk back: the flags in place, one write and one barrier, cluster 0
    // untouched (QEMU's way would be three writes and three barriers).
    let (w0, y0) = (writes(&s), s.image().storage().syncs());
    s.activate().unwrap();
    assert_eq!(
        (writes(&s) - w0, s.image().storage().syncs() - y0),
        (1, 1),
        "activate: one directory write, one barrier"
    );
    assert_eq!(
        s.image().storage().inner().read_vec_at(0, 512).unwrap(),
        header,
        "cluster 0 untouched by activate"
    );
    let st = s.inactivate().unwrap();
    assert_eq!((st.bytes_written, st.syncs), (0, 1));
    let s = reopen(s);
    assert!(s.image().check().unwrap().is_clean());
    assert_eq!(extents(&s.load("a").unwrap()), vec![(0, G), (7 * G, G)]);
}

/// The table entries of bitmap `name`, rewritten to the spec's all-ones marker (1), so
/// that QEMU and we read every bit as set. The table must hold only zero entries (no data
/// cluster leaks).
fn patch_all_ones(img: &std::path::Path, name: &str) {
    use dirty_bitmap::storage::Storage;
    let st = FileStorage::open(img, OpenMode::ReadWrite).unwrap();
    let image = dirty_bitmap::Image::open(&st, OpenMode::ReadOnly).unwrap();
    let ext = image.area().bitmaps.unwrap();
    let bytes = st
        .read_vec_at(ext.directory_offset, ext.directory_size)
        .unwrap();
    let geo = image.header().geometry().unwrap();
    let dir = dirty_bitmap::format::decode_directory(&bytes, ext.nb_bitmaps, &geo).unwrap();
    let e = dir.iter().find(|e| e.name == name).unwrap();
    let table = st
        .read_vec_at(e.table_offset, u64::from(e.table_size) * 8)
        .unwrap();
    assert!(table.iter().all(|&b| b == 0), "the table must be empty");
    let ones: Vec<u8> = (0..e.table_size).flat_map(|_| 1u64.to_be_bytes()).collect();
    st.write_all_at(&ones, e.table_offset).unwrap();
    st.sync_data().unwrap();
}

/// All-ones table entries (the spec's marker; QEMU reads them, never writes them): we load
/// them as every bit set, `qemu-img check` stays clean, and with 4 KiB regions inside
/// 64 KiB clusters a change to one region of an all-ones cluster writes the whole cluster
/// fresh, a change inside a data cluster writes only its region. QEMU agrees bit for bit
/// afterwards and stores over it cleanly.
#[test]
fn all_ones_entries_and_sub_cluster_regions_agree_with_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ones.qcow2");
    // 512 B granularity, 64 KiB clusters: each cluster of bitmap covers 256 MiB, each 4 KiB
    // region 16 MiB; 1 GiB = 4 clusters.
    let disk = 1024 * MIB;
    let cluster_disk = 256 * MIB;
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), disk, 65536).unwrap();
    s.add("b", G, Recording::Enabled).unwrap();
    drop(s);
    patch_all_ones(&img, "b");
    assert_qemu_clean(&img);
    // Before our writable open: qemu-nbd cannot open the image beside it (image locking).
    assert_eq!(nbd_dirty(&img, "b"), vec![(0, disk)]);
    let mut s = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    )
    .unwrap();
    assert_eq!(s.region_size(), 4096);
    assert_eq!(extents(&s.load("b").unwrap()), vec![(0, disk)]);

    s.activate().unwrap();
    let bm = s.bitmap("b").unwrap();
    // Cluster 1: one region cleared (all-ones entry: the whole cluster goes fresh).
    bm.clear(cluster_disk + 16 * MIB, 16 * MIB);
    // Cluster 2: cleared whole (the entry becomes 0, nothing written but 8 bytes).
    bm.clear(2 * cluster_disk, cluster_disk);
    assert_eq!(s.pending_exact().unwrap(), 65536 + 8 + 8);
    let st = s.flush().unwrap();
    assert_eq!(
        (st.clusters_allocated, st.bytes_written),
        (1, 65536 + 8 + 8)
    );
    // Cluster 1 now has data: a change in one of its regions writes 4 KiB in place.
    bm.clear(cluster_disk + 100 * MIB, 4 * MIB);
    // Cluster 2 is zero now: a mark there allocates a fresh cluster.
    bm.mark_dirty(2 * cluster_disk + 5 * MIB, 1);
    let st = s.flush().unwrap();
    assert_eq!(
        (st.regions, st.clusters_allocated, st.bytes_written),
        (2, 1, 4096 + 65536 + 8)
    );
    let mem = bm.snapshot();
    drop(bm);
    s.inactivate().unwrap();
    drop(s);
    assert_qemu_clean(&img);
    assert_eq!(nbd_dirty(&img, "b"), extents(&mem));
    let s = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    assert_eq!(extents(&s.load("b").unwrap()), extents(&mem));
    drop(s);

    // QEMU stores over it (open, write, store at close): still clean, and we read its store.
    ok("qemu-io", &["-f", "qcow2", "-c", "write 0 4k", p(&img)]);
    assert_qemu_clean(&img);
    let s = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    mem.mark_dirty(0, 4096);
    assert_eq!(extents(&s.load("b").unwrap()), extents(&mem));
}

/// Above the rewrite threshold a flush writes every region of the bitmap's data clusters
/// in place (one long run per stretch of adjacent clusters) instead of the changed regions
/// alone; below it, only the changed ones. Either way the image is what QEMU reads back:
/// `qemu-img check` clean and every extent as in memory over NBD.
#[test]
fn a_flush_above_the_rewrite_threshold_rewrites_every_data_region_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.qcow2");
    // 512 regions, so that a quarter of them is above the minimum of a whole rewrite.
    let disk = 8192 * MIB;
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), disk, CS).unwrap();
    s.add("b", G, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let t = s.tracker().unwrap();
    // Every cluster gets data.
    t.mark(0, disk);
    s.flush().unwrap();
    let bm = s.bitmap("b").unwrap();
    let regions = bm.region_count();
    assert_eq!(regions / 4, 2 * dirty_bitmap::flush::MIN_REWRITE_REGIONS);
    let region_len = bm.region_size();
    let churn = |k: u64| {
        for i in 0..k {
            let off = i * regions / k * REGION_DISK / (CS / region_len);
            bm.clear(off, G);
            t.mark(off, 1);
        }
    };
    // Below: only the changed regions.
    s.set_rewrite_threshold(0.5).unwrap();
    churn(regions / 4);
    let st = s.flush().unwrap();
    assert_eq!(st.regions, regions / 4);
    assert_eq!(st.bytes_written, regions / 4 * region_len);
    // At or above: every region, though a quarter changed.
    s.set_rewrite_threshold(0.25).unwrap();
    churn(regions / 4);
    let st = s.flush().unwrap();
    assert_eq!(st.regions, regions / 4);
    assert_eq!(st.bytes_written, bm.serialized_len());
    // Nothing changed, or fewer regions than the minimum: nothing more written, whatever
    // the threshold.
    s.set_rewrite_threshold(0.0).unwrap();
    assert_eq!(s.flush().unwrap().bytes_written, 0);
    churn(dirty_bitmap::flush::MIN_REWRITE_REGIONS - 1);
    assert_eq!(
        s.flush().unwrap().bytes_written,
        (dirty_bitmap::flush::MIN_REWRITE_REGIONS - 1) * region_len
    );
    assert!(s.set_rewrite_threshold(-1.0).is_err());
    assert!(s.set_rewrite_threshold(f64::NAN).is_err());
    bm.clear(5 * MIB, MIB);
    let mem = bm.snapshot();
    s.inactivate().unwrap();
    drop(s);
    assert_qemu_clean(&img);
    assert_eq!(nbd_dirty(&img, "b"), extents(&mem));
}
