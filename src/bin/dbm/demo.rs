//! `dbm demo`: a guest-like workload on a 16 TiB bitmap-only qcow2 image, flushed
//! incrementally, then stopped, reopened and checked.
//!
//! The demo is a sequence of parts, each returning a [`Part`] for the closing summary. The
//! disk part ([`run_disk_part`]):
//! 1. creates a bitmap-only image with one enabled bitmap, activates it (`in_use` set) and
//!    starts a [`FlushPolicy`] thread;
//! 2. writer threads mark random 4 KiB writes through a [`Tracker`], most of them in a
//!    64 GiB hot spot that moves every round, paced evenly over each 1-second round;
//! 3. one flush interval before the end, the flusher stops and `prepare_stop` flushes while
//!    the writes go on; then the writes stop (the "VM stop") and `inactivate` writes only
//!    the remainder: the part of the stop that falls inside the downtime;
//! 4. a copy of the image is activated and stored QEMU's way
//!    (`inactivate_full_rewrite`) to measure what a full store costs on the same bitmap;
//! 5. the image is reopened read-only and checked: its bits equal the in-memory bitmap,
//!    `Image::check` is clean, and `qemu-img check` is clean when it is installed.
//!
//! The migration part ([`run_migration_part`]) live-migrates a guest (1 GiB by default)
//! whose vCPU threads keep writing pages (90 % of the writes into 5 % of the pages) and
//! whose disk keeps being written (100,000 writes of 4 KiB per second, marked on the disk
//! bitmap of a 16 TiB image both hosts share), with QEMU's defaults (`max-bandwidth`
//! 128 MiB/s, `downtime-limit` 300 ms) and auto-converge: one line per dirty-log sync and
//! a progress line every second, as polling QEMU's `info migrate` shows; then the
//! switchover figures (network pending against what the limit leaves once the disk stop
//! time is taken off), the downtime against the limit with the inactivate inside it, the
//! total time, the destination RAM compared with the source RAM at the stop (CRC32 per
//! page and byte for byte), and the image opened by the destination: every logged disk
//! write dirty, and `qemu-img check` clean. Then the same with the destination refusing
//! to start: the source takes its bitmaps back, resumes, and holds every mark. Then the
//! same in durable mode ([`run_durable_hand_over`]): the stop writes nothing. A
//! destination that differs, a lost mark, or a switchover that sent more bytes in the
//! downtime than were pending at the stop, fails the demo (the pending figure against the
//! threshold is printed, and checked by `tests/cli.rs`); a wall-clock downtime over the
//! limit with the bytes within it is reported with the machine's load.

use crate::work_dir::WorkDir;
use dirty_bitmap::{OpenMode, Recording};
use std::error::Error;
use std::io::ErrorKind;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::{
    BitmapState, BitmapStore, DirtyBitmap, FlushPolicy, FlushStats, PolicyStats, SharedStore,
    Tracker,
};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use dirty_bitmap::migration::{BytesPerMs, Millis, Pattern as GuestPattern};

use crate::migrate_run::{self, format_line, line_header, mib_s, DiskParams, End, Params};
use crate::out::emit;
use crate::size::human;
use crate::DemoArgs;

type Res<T> = Result<T, Box<dyn Error>>;

const WRITE: u64 = 4096;
/// The most writer threads `dbm demo` starts.
const MAX_THREADS: usize = 256;
/// The most 4 KiB writes per one-second round `dbm demo` asks for (far above what marks
/// reach on one machine).
const MAX_WRITES_PER_ROUND: u64 = 1_000_000_000;
const HOT_SPOT: u64 = 64 << 30;
const ROUND: Duration = Duration::from_millis(1000);
const TICK: Duration = Duration::from_millis(5);
const CLUSTER: u64 = 64 << 10;
const BITMAP: &str = "demo";
/// The image the disk part writes, in the demo directory.
pub const IMAGE_FILE: &str = "demo.qcow2";
/// The copy the full store is measured on.
pub const FULL_STORE_FILE: &str = "demo-full-store.qcow2";

/// What one part of the demo reports in the closing summary.
pub struct Part {
    /// A heading.
    pub title: String,
    /// `(what, figure)` rows.
    pub rows: Vec<(String, String)>,
}

fn say(s: impl AsRef<str>) -> Res<()> {
    emit(&format!("{}\n", s.as_ref()))?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `B bytes (human), S syncs, M ms`.
fn cost(s: &FlushStats) -> String {
    format!(
        "{} bytes ({}), {} syncs, {:.2} ms",
        s.bytes_written,
        human(s.bytes_written),
        s.syncs,
        ms(s.duration)
    )
}

/// Runs `dbm demo`.
pub fn run(args: &DemoArgs) -> Res<()> {
    if args.threads == 0 || args.rounds == 0 || args.writes_per_round == 0 {
        return Err("--threads, --rounds and --writes-per-round must be at least 1".into());
    }
    // Each writer collects a tick's offsets before it marks them: bounded, so that no
    // argument asks for an allocation the machine refuses (an abort, not an error).
    if args.threads > MAX_THREADS || args.writes_per_round > MAX_WRITES_PER_ROUND {
        return Err(format!(
            "--threads is at most {MAX_THREADS} and --writes-per-round at most \
             {MAX_WRITES_PER_ROUND}"
        )
        .into());
    }
    if args.flush_interval == 0 {
        return Err("--flush-interval must be at least 1".into());
    }
    if !(0.0..=100.0).contains(&args.uniform_percent) {
        return Err(format!(
            "--uniform-percent {} is not in 0..=100",
            args.uniform_percent
        )
        .into());
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let work = WorkDir::given_or_temp(args.dir.as_deref())?;
    let dir = work.path();
    let mut parts = vec![run_disk_part(args, seed, dir)?];
    if !args.no_migration {
        say("")?;
        parts.push(run_migration_part(args, seed, dir)?);
        say("")?;
        parts.push(run_failed_hand_over(args, seed, dir)?);
        say("")?;
        parts.push(run_durable_hand_over(args, seed, dir)?);
    }
    print_summary(&parts)
}

fn print_summary(parts: &[Part]) -> Res<()> {
    say("")?;
    say("summary")?;
    let width = parts
        .iter()
        .flat_map(|p| p.rows.iter().map(|r| r.0.len()))
        .max()
        .unwrap_or(0);
    for part in parts {
        say(format!("  {}", part.title))?;
        for (what, figure) in &part.rows {
            say(format!("    {what:<width$}  {figure}"))?;
        }
    }
    Ok(())
}

/// Where the writers put their writes this round.
#[derive(Clone, Copy)]
struct Pattern {
    disk: u64,
    hot_start: u64,
    hot_len: u64,
    /// Share of writes anywhere on the disk, 0..=1.
    uniform: f64,
}

impl Pattern {
    fn offset(&self, rng: &mut SmallRng) -> u64 {
        let off = if rng.random::<f64>() < self.uniform {
            rng.random_range(0..self.disk)
        } else {
            self.hot_start + rng.random_range(0..self.hot_len)
        };
        off / WRITE * WRITE
    }
}

/// One writer thread's round: `writes` marks paced evenly over [`ROUND`] in [`TICK`]s,
/// ending early when `stop` is set. Returns the marks made.
fn writer(
    tracker: Tracker,
    pattern: Pattern,
    writes: u64,
    mut rng: SmallRng,
    stop: Arc<AtomicBool>,
    mark_nanos: Arc<AtomicU64>,
) -> u64 {
    let start = Instant::now();
    let ticks = (ROUND.as_millis() / TICK.as_millis()) as u64;
    let mut done = 0u64;
    for tick in 1..=ticks {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let target = writes * tick / ticks;
        let offsets: Vec<u64> = (done..target).map(|_| pattern.offset(&mut rng)).collect();
        let t0 = Instant::now();
        for off in offsets {
            tracker.mark(off, WRITE);
        }
        mark_nanos.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        done = target;
        if let Some(wait) = (start + TICK * tick as u32).checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    done
}

/// The disk part: see the module docs.
pub fn run_disk_part(args: &DemoArgs, seed: u64, dir: &Path) -> Res<Part> {
    let path = dir.join(IMAGE_FILE);
    let copy = dir.join(FULL_STORE_FILE);
    for p in [&path, &copy] {
        match std::fs::remove_file(p) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(format!("{}: {e}", p.display()).into())
            }
            _ => {}
        }
    }
    let mut store = BitmapStore::create(FileStorage::create(&path)?, args.disk_size, CLUSTER)?;
    store.add(BITMAP, args.granularity, Recording::Enabled)?;
    store.activate()?;
    let bm = store.bitmap(BITMAP)?;
    let tracker = store.tracker()?;
    let disk = store.disk_size();
    let flush_every = Duration::from_millis(args.flush_interval);
    // Stop budget: 1 MB, 100 kB/ms for 10 ms.
    let (bandwidth, downtime_limit) = (BytesPerMs::from_bytes_per_ms(100_000.0), Millis(10));

    let leaf = bm.bit_count().div_ceil(64) * 8;
    say(format!(
        "dbm demo, disk part: a {} bitmap-only qcow2 image at {} granularity, {}: {} bits, \
         {} of bitmap in {} regions of {}",
        human(disk),
        human(bm.granularity()),
        path.display(),
        bm.bit_count(),
        human(bm.serialized_len()),
        bm.region_count(),
        human(bm.region_size()),
    ))?;
    say(format!(
        "memory: {} ({} of leaf words + {:.2} % for summaries and change map)",
        human(bm.memory_usage() as u64),
        human(leaf),
        (bm.memory_usage() as f64 - leaf as f64) * 100.0 / leaf as f64
    ))?;
    say(format!(
        "{} writer threads, {} writes of 4 KiB per {} ms round ({} % anywhere on the disk, the \
         rest in a 64 GiB hot spot that moves every round), background flush every {} ms; \
         seed {seed}",
        args.threads,
        args.writes_per_round,
        ROUND.as_millis(),
        args.uniform_percent,
        args.flush_interval,
    ))?;
    say("")?;
    say(format!(
        "{:>5} {:>9} {:>10} {:>8} {:>9} {:>12} {:>9}",
        "round", "writes", "dirty", "flushes", "regions", "flushed", "flush ms"
    ))?;

    let store = SharedStore::new(store);
    let flusher = FlushPolicy::every(flush_every).spawn(store.clone())?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mark_nanos = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut total_writes = 0u64;
    let mut before = PolicyStats::default();
    let mut flusher = Some(flusher);
    let mut background = PolicyStats::default();
    let mut prep = None;
    for round in 1..=args.rounds {
        let hot_len = HOT_SPOT.min(disk);
        let pattern = Pattern {
            disk,
            hot_start: rng.random_range(0..=disk - hot_len) / WRITE * WRITE,
            hot_len,
            uniform: args.uniform_percent / 100.0,
        };
        let round_start = Instant::now();
        let per_thread = args.writes_per_round / args.threads as u64;
        let writers = (0..args.threads)
            .map(|t| {
                let rng = SmallRng::seed_from_u64(seed ^ (u64::from(round) << 32) ^ t as u64);
                let (tracker, stop, nanos) = (tracker.clone(), stop.clone(), mark_nanos.clone());
                thread::Builder::new()
                    .spawn(move || writer(tracker, pattern, per_thread, rng, stop, nanos))
                    .map_err(|e| format!("starting writer thread {t}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let last = round == args.rounds;
        if last {
            // The stop begins one flush interval before the end, while the writes go on.
            let at = round_start + ROUND.saturating_sub(flush_every);
            while Instant::now() < at && writers.iter().any(|w| !w.is_finished()) {
                thread::sleep((at - Instant::now()).min(Duration::from_millis(5)));
            }
            if let Some(f) = flusher.take() {
                background = f.stop()?;
            }
            prep = Some(store.lock().prepare_stop(bandwidth, downtime_limit)?);
            // The VM stops.
            stop.store(true, Ordering::Release);
        }
        let mut writes = 0;
        for w in writers {
            writes += w.join().map_err(|_| "a writer thread panicked")?;
        }
        total_writes += writes;
        let now = match &flusher {
            Some(f) => f.stats(),
            None => background,
        };
        let mut d = now.total;
        d.regions = d.regions.saturating_sub(before.total.regions);
        d.bytes_written = d.bytes_written.saturating_sub(before.total.bytes_written);
        d.duration = d.duration.saturating_sub(before.total.duration);
        say(format!(
            "{:>5} {:>9} {:>10} {:>8} {:>9} {:>12} {:>9.1}",
            round,
            writes,
            human(bm.dirty_bytes()),
            now.flushes.saturating_sub(before.flushes),
            d.regions,
            human(d.bytes_written),
            ms(d.duration),
        ))?;
        before = now;
    }
    let prep = prep.ok_or("the stop did not run")?;
    let fin = store.lock().inactivate()?;
    drop(store);

    let secs = mark_nanos.load(Ordering::Relaxed) as f64 / 1e9;
    let t0 = Instant::now();
    let extents = bm.dirty_extents().count();
    let list_ms = ms(t0.elapsed());
    say("")?;
    say(format!(
        "dirty: {} bytes ({}) in {extents} extents (listed in {list_ms:.1} ms); {total_writes} \
         marks in {:.1} ms of marking time over all threads = {:.1} M marks/s per thread",
        bm.dirty_bytes(),
        human(bm.dirty_bytes()),
        secs * 1000.0,
        total_writes as f64 / secs.max(1e-9) / 1e6
    ))?;
    say(format!(
        "background: {} flushes wrote {}",
        background.flushes,
        cost(&background.total)
    ))?;
    say(format!(
        "prepare_stop (writes still running): {} rounds, {} exact queries, wrote {}; {} bytes \
         pending against a budget of {} ({})",
        prep.rounds,
        prep.exact_queries,
        cost(&prep.flushed),
        prep.pending.get(),
        prep.threshold.get(),
        if prep.converged {
            "converged"
        } else {
            "gave up"
        }
    ))?;
    say(format!(
        "inactivate (the downtime part): {} regions, {}",
        fin.regions,
        cost(&fin)
    ))?;

    // What QEMU's whole-bitmap store costs on the same bitmap, measured on a copy.
    std::fs::copy(&path, &copy)?;
    let mut full = BitmapStore::open(
        FileStorage::open(&copy, OpenMode::ReadWrite)?,
        OpenMode::ReadWrite,
    )?;
    full.activate()?;
    let full_stats = full.inactivate_full_rewrite()?;
    let full_check = full.image().check()?;
    drop(full);
    if !full_check.is_clean() {
        return Err(format!("{}: not clean after the full store", copy.display()).into());
    }
    say(format!(
        "full store (QEMU's way, on a copy): {}",
        cost(&full_stats)
    ))?;

    // Reopen and check with our own reader.
    let reopened = BitmapStore::open(
        FileStorage::open(&path, OpenMode::ReadOnly)?,
        OpenMode::ReadOnly,
    )?;
    let listed = reopened.list();
    if listed.len() != 1 || listed[0].state != BitmapState::Consistent || listed[0].in_use {
        return Err(format!("reopened: expected one consistent bitmap, found {listed:?}").into());
    }
    let loaded: DirtyBitmap = reopened.load(BITMAP)?;
    if loaded.count() != bm.count() || !loaded.dirty_extents().eq(bm.dirty_extents()) {
        return Err("the reopened bitmap differs from the in-memory bitmap".into());
    }
    let report = reopened.image().check()?;
    if !report.is_clean() {
        return Err(format!("Image::check found problems: {report:?}").into());
    }
    say(format!(
        "verified: reopened, {} dirty bits equal the in-memory bitmap; Image::check clean",
        loaded.count()
    ))?;
    let qemu = migrate_run::qemu_check(&path);
    migrate_run::require_clean(&qemu, &path)?;
    say(format!("qemu-img check: {qemu}"))?;

    // Percent of the full store's figure; 0 when the full store itself was 0.
    let pct = |part: f64, whole: f64| {
        if whole > 0.0 {
            part * 100.0 / whole
        } else {
            0.0
        }
    };
    let mut stop_total = prep.flushed;
    stop_total.accumulate(&fin);
    Ok(Part {
        title: format!(
            "disk: incremental flush of a {} bitmap-only qcow2 image",
            human(disk)
        ),
        rows: vec![
            (
                "disk".into(),
                format!("{} at {}", human(disk), human(bm.granularity())),
            ),
            (
                "marks".into(),
                format!("{total_writes}, {} dirty", human(bm.dirty_bytes())),
            ),
            (
                "background flushes".into(),
                format!("{}: {}", background.flushes, cost(&background.total)),
            ),
            ("prepare_stop".into(), cost(&prep.flushed)),
            ("stop (inactivate)".into(), cost(&fin)),
            ("full store instead".into(), cost(&full_stats)),
            (
                "stop against full store".into(),
                format!(
                    "{:.1} % of the bytes, {:.1} % of the time",
                    pct(fin.bytes_written as f64, full_stats.bytes_written as f64),
                    pct(
                        fin.duration.as_secs_f64(),
                        full_stats.duration.as_secs_f64()
                    )
                ),
            ),
            (
                "stop incl. prepare_stop".into(),
                format!("{} rounds, {}", prep.rounds, cost(&stop_total)),
            ),
            (
                "checks".into(),
                format!("our reader: equal, clean; qemu-img check: {qemu}"),
            ),
        ],
    })
}

/// The image the migration part's disk bitmap lives in, in the demo directory (replaced
/// by each migration, as `--help` and docs/CLI.md say).
pub const MIGRATE_IMAGE_FILE: &str = "demo-migrate.qcow2";

/// 4 KiB disk writes per second during the migration part.
pub const DISK_WRITES_PER_SEC: u64 = 100_000;

fn disk_params(args: &DemoArgs, dir: &Path, refuse: bool) -> DiskParams {
    disk_params_in(args, dir, refuse, crate::migrate_run::DiskMode::Shared)
}

fn disk_params_in(
    args: &DemoArgs,
    dir: &Path,
    refuse: bool,
    mode: crate::migrate_run::DiskMode,
) -> DiskParams {
    DiskParams {
        image: dir.join(MIGRATE_IMAGE_FILE),
        disk_size: args.disk_size,
        granularity: args.granularity,
        bitmaps: 1,
        writes_per_sec: DISK_WRITES_PER_SEC,
        qemu_baseline: false,
        mode,
        refuse,
    }
}

/// The migration of the hand-over parts (the durable one and the failed one): a guest of
/// at most 256 MiB, the demo's rates and limits, auto-converge, a 120 s cap.
fn hand_over_params(args: &DemoArgs, seed: u64) -> Params {
    Params {
        ram_bytes: args.guest_ram.min(256 << 20),
        vcpus: args.vcpus,
        writes_per_sec: args.dirty_rate / migrate_run::PAGE,
        pattern: GuestPattern::HOT_90_5,
        max_bandwidth: args.max_bandwidth,
        downtime_limit: Millis(args.downtime_limit),
        batch_pages: 64,
        auto_converge: true,
        time_cap: Some(Duration::from_secs(120)),
        progress: None,
        seed,
    }
}

/// The same migration with the store in durable mode on both hosts: every disk write's
/// mark is on disk before the write counts as made, so the stop has nothing left to write.
pub fn run_durable_hand_over(args: &DemoArgs, seed: u64, dir: &Path) -> Res<Part> {
    let params = hand_over_params(args, seed ^ 2);
    let disk = disk_params_in(args, dir, false, migrate_run::DiskMode::Durable);
    say(format!(
        "dbm demo, durable mode: the same with a {} guest, the store in durable mode on both \
         hosts (each disk write's mark on disk before the write is made, 64 writes in flight)",
        human(params.ram_bytes)
    ))?;
    let run = migrate_run::migrate(&params, Some(&disk), &mut |_| {})?;
    let d = run.disk.as_ref().ok_or("a disk run without its figures")?;
    match &run.end {
        End::Converged => {}
        End::Failed(e) => return Err(format!("the migration failed: {e}").into()),
        other => return Err(format!("the migration did not converge: {other:?}").into()),
    }
    if d.marks_lost > 0 {
        return Err(format!("{} of {} marks lost", d.marks_lost, d.marks).into());
    }
    if d.stop.bytes_written > 0 {
        return Err(format!(
            "the durable stop wrote {} bytes: a mark was acknowledged before it was on disk",
            d.stop.bytes_written
        )
        .into());
    }
    let dest = d.dest_activate.map_or(0.0, |t| t.as_secs_f64() * 1000.0);
    let verdict = format!(
        "{} disk writes, each acknowledged once on disk; the stop wrote 0 bytes with {} \
         barriers in {:.2} ms; the destination's activate took {dest:.1} ms; downtime {:.1} \
         ms; 0 marks lost; qemu-img check: {}",
        d.marks,
        d.stop.syncs,
        d.stop.duration.as_secs_f64() * 1000.0,
        run.downtime.unwrap_or_default().as_secs_f64() * 1000.0,
        d.qemu_check
    );
    say(&verdict)?;
    migrate_run::require_clean(&d.qemu_check, &disk.image)?;
    Ok(Part {
        title: "durable mode".into(),
        rows: vec![("outcome".into(), verdict)],
    })
}

/// The same migration, with the destination refusing to start: the source must take its
/// bitmaps back before it resumes, and hold every mark.
pub fn run_failed_hand_over(args: &DemoArgs, seed: u64, dir: &Path) -> Res<Part> {
    let params = hand_over_params(args, seed ^ 1);
    let disk = disk_params(args, dir, true);
    say(format!(
        "dbm demo, a failed hand-over: the same with a {} guest, and the destination refuses \
         to start after the source inactivated its bitmaps",
        human(params.ram_bytes)
    ))?;
    let run = migrate_run::migrate(&params, Some(&disk), &mut |_| {})?;
    let d = run.disk.as_ref().ok_or("a disk run without its figures")?;
    match &run.end {
        End::Failed(e) if e.contains("refused") => {}
        other => return Err(format!("expected a refused hand-over, got {other:?}").into()),
    }
    if !d.source_active_after {
        return Err("the source did not take its bitmaps back before resuming".into());
    }
    if d.marks_lost > 0 {
        return Err(format!("{} of {} marks lost", d.marks_lost, d.marks).into());
    }
    let verdict = format!(
        "the destination refused; the source activated its bitmaps again (write locks taken \
         back) and resumed: {} disk writes marked, 0 lost (in memory, and on disk after its \
         own stop); qemu-img check: {}",
        d.marks, d.qemu_check
    );
    say(&verdict)?;
    migrate_run::require_clean(&d.qemu_check, &disk.image)?;
    Ok(Part {
        title: "a failed hand-over".into(),
        rows: vec![("outcome".into(), verdict)],
    })
}

/// The migration part: see the module docs.
pub fn run_migration_part(args: &DemoArgs, seed: u64, dir: &Path) -> Res<Part> {
    if args.vcpus == 0 {
        return Err("--vcpus must be at least 1".into());
    }
    let params = Params {
        ram_bytes: args.guest_ram,
        vcpus: args.vcpus,
        writes_per_sec: args.dirty_rate / migrate_run::PAGE,
        pattern: GuestPattern::HOT_90_5,
        max_bandwidth: args.max_bandwidth,
        downtime_limit: Millis(args.downtime_limit),
        batch_pages: 64,
        auto_converge: true,
        time_cap: Some(Duration::from_secs(120)),
        progress: Some(Duration::from_secs(1)),
        seed,
    };
    let disk = disk_params(args, dir, false);
    say(format!(
        "dbm demo, migration part: a {} guest ({} pages of 4 KiB), {} vCPU threads writing {} \
         pages/s ({}/s, 90 % of them into 5 % of the pages), and its {} disk written {} \
         times a second (4 KiB each), marked on a bitmap in an image both hosts share; \
         max-bandwidth {}/s, downtime limit {} ms, auto-converge; seed {seed}",
        human(params.ram_bytes),
        params.pages(),
        params.vcpus,
        params.writes_per_sec,
        human(params.writes_per_sec * migrate_run::PAGE),
        human(disk.disk_size),
        disk.writes_per_sec,
        human(params.max_bandwidth),
        args.downtime_limit,
    ))?;
    say("")?;
    say(line_header())?;
    let mut failed = None;
    let run = migrate_run::migrate(&params, Some(&disk), &mut |l| {
        if let Err(e) = say(format_line(l)) {
            failed.get_or_insert(e);
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    say("")?;
    say(format!("transport: {}", run.transport))?;
    let (pending, threshold, query) = match (&run.end, run.switch) {
        (End::Converged, Some(s)) => s,
        (End::Converged, None) => return Err("a switchover without its figures".into()),
        (End::Stalled, _) => {
            return Err("the migration did not converge, even fully throttled".into())
        }
        (End::TimeCap, _) => return Err("the migration did not converge within 120 s".into()),
        (End::Failed(e), _) => return Err(format!("the migration failed: {e}").into()),
    };
    let downtime = run.downtime.unwrap_or_default();
    let in_downtime = run.bytes_in_downtime.unwrap_or_default();
    let decided = run
        .lines
        .iter()
        .rev()
        .find(|l| l.exact)
        .map_or(0, |l| l.syncs);
    let at_stop = run.at_stop.unwrap_or_default();
    // The VM stops right after the decision's sync, but the vCPUs run until `stop` parks
    // them: what they write in those microseconds goes out in the downtime too. So the
    // bytes in the downtime are bounded by the figure taken again at the stop (the RAM
    // state's contract), not by the threshold; the difference is reported, not hidden.
    say(format!(
        "switchover decided on sync {decided} (the stop syncs once more): pending {} bytes \
         (exact) ≤ threshold {} bytes. At the stop: {} bytes pending ({} more, written by the \
         guest between that sync and the stop); sent in the downtime: {} bytes",
        pending.total().get(),
        threshold.get(),
        at_stop.total().get(),
        at_stop.total().get().saturating_sub(pending.total().get()),
        in_downtime.get()
    ))?;
    let d = run.disk.clone().ok_or("a disk run without its figures")?;
    let disk_ms = d.disk_time_at_switch.map_or(0, |m| m.get());
    let dest_ms = d.dest_time_estimate.map_or(0, |m| m.get());
    say(format!(
        "the switchover rule: network pending {} bytes ≤ bandwidth × (limit {} ms − disk stop \
         time {disk_ms} ms − the exact query's {} ms) = {} bytes (the stop runs that query \
         once more); the disk stop time is the source's inactivate, timed \
         from the precopy flushes ({} written while the guest ran), and the destination's \
         activate, {dest_ms} ms: the regions of the source's last write log (and of any the \
         destination has not said it applied) read again, at the time per region of a load \
         timed at setup",
        pending.total().get(),
        args.downtime_limit,
        query.get(),
        threshold.get(),
        human(d.flushed.get()),
    ))?;
    if in_downtime > at_stop.total() {
        return Err(format!(
            "the switchover sent {} bytes in the downtime, over the {} bytes pending at the stop",
            in_downtime.get(),
            at_stop.total().get()
        )
        .into());
    }
    let limit = Duration::from_millis(args.downtime_limit);
    let verdict = if downtime <= limit {
        "within the limit".to_string()
    } else {
        // Either the bytes went out slower than the bandwidth the threshold was computed
        // from, or the guest's writes between the decision and the stop added to them.
        let measured = run.lines.last().map_or(0.0, |l| mib_s(l.bandwidth));
        format!(
            "over the limit by {:.1} ms: its {} bytes (threshold {}) went out at {:.1} MiB/s, \
             against {measured:.1} MiB/s measured before the stop (load average {})",
            ms(downtime - limit),
            in_downtime.get(),
            threshold.get(),
            in_downtime.get() as f64 / downtime.as_secs_f64().max(1e-9) / (1 << 20) as f64,
            migrate_run::loadavg()
        )
    };
    say(format!(
        "downtime: {:.1} ms (limit {} ms): {verdict}; of which the disk bitmap's inactivate: \
         {}",
        ms(downtime),
        args.downtime_limit,
        cost(&d.stop),
    ))?;
    if d.marks_lost > 0 || !d.destination_opened {
        return Err(format!(
            "the destination's bitmap lacks {} of {} disk writes",
            d.marks_lost, d.marks
        )
        .into());
    }
    let disk_check = format!(
        "the destination opened the image writable (the source had released its write \
         locks), activated it and found all {} disk writes dirty; qemu-img check: {}",
        d.marks, d.qemu_check
    );
    say(&disk_check)?;
    migrate_run::require_clean(&d.qemu_check, &disk.image)?;
    say(format!(
        "total time: {:.0} ms; {} sent ({} bytes), {} pages of which {} resent, {} loop \
         turns; the guest wrote {} pages meanwhile, vCPU throttle at the end {} %",
        ms(run.total_time),
        human(run.bytes_sent.get()),
        run.bytes_sent.get(),
        run.pages_sent,
        run.pages_resent(),
        run.iterations,
        run.guest_writes,
        run.throttle,
    ))?;
    match run.verified {
        Some((pages, true)) => say(format!(
            "verified: destination RAM equals the source RAM at stop: {pages} pages, CRC32 \
             per page and byte for byte"
        ))?,
        _ => return Err("the destination RAM differs from the source RAM at stop".into()),
    }
    Ok(Part {
        title: format!(
            "migration: a {} guest over {}",
            human(params.ram_bytes),
            run.transport
        ),
        rows: vec![
            (
                "guest".into(),
                format!(
                    "{}, {} vCPUs, {}/s of page writes (90 % into 5 %)",
                    human(params.ram_bytes),
                    params.vcpus,
                    human(params.writes_per_sec * migrate_run::PAGE)
                ),
            ),
            (
                "limits".into(),
                format!(
                    "max-bandwidth {}/s, downtime limit {} ms",
                    human(params.max_bandwidth),
                    args.downtime_limit
                ),
            ),
            (
                "iterations".into(),
                format!("{} syncs, {} loop turns", run.syncs, run.iterations),
            ),
            (
                "sent".into(),
                format!(
                    "{}, {} pages ({} resent)",
                    human(run.bytes_sent.get()),
                    run.pages_sent,
                    run.pages_resent()
                ),
            ),
            (
                "downtime".into(),
                format!("{:.1} ms, {verdict}", ms(downtime)),
            ),
            ("total time".into(), format!("{:.0} ms", ms(run.total_time))),
            (
                "disk bitmap".into(),
                format!(
                    "{} disk writes marked; stop time {disk_ms} ms counted \
                     against the limit; inactivate in the downtime: {}",
                    d.marks,
                    cost(&d.stop)
                ),
            ),
            (
                "checks".into(),
                format!("destination RAM equals the source RAM at stop; {disk_check}"),
            ),
        ],
    })
}
