//! `dbm bench flush`: what stopping costs on a 16 TiB bitmap-only image, against QEMU's own
//! store and the naive full rewrite (`docs/BENCHMARKS.md`).
//!
//! Setup, per bitmap count: a sparse bitmap-only qcow2 image (64 KiB clusters) with that
//! many bitmaps at `--granularity`, activated, every bit marked (fully dirty) and flushed,
//! so that every data cluster exists, as after a long run. A plain "floor" file holds the
//! same serialized bitmaps.
//!
//! A fully dirty bitmap does not change under marks alone: the stop then has nothing to
//! write but the directory's flags, while QEMU's strategy still rewrites every cluster.
//! That case is measured as it is ("marks only"). The harder case makes each guest write
//! *churn* its granule: it clears it (as a backup job does when it copies a granule) and
//! marks it again. The bit ends set, but its region changed and must reach the disk again.
//!
//! What is timed at each stop, side by side on the same bitmaps in the same run:
//! 1. `inactivate()`: the incremental stop (what changed since the last flush, then the
//!    directory's flags);
//! 2. the physical floor: exactly the bytes the writes touched since the last flush,
//!    written at their offsets in the plain file, then one `fdatasync` ("in place"); and
//!    the same bytes appended to an empty file, then one `fdatasync` ("appended", the floor
//!    of any layout);
//! 3. QEMU's strategy, `inactivate_full_rewrite()`: every non-zero cluster into fresh
//!    clusters, a new table and directory, one header commit (after an untimed
//!    `activate()` on the same bitmaps).
//!
//! Two sweeps: the flush interval (the writer runs with background flushes, then the VM
//! stops one whole interval after the last flush, the worst case of the timer), and the
//! changed fraction (from 1 changed region to every region, no writer). Last, QEMU's own
//! store: a fresh image whose table entries are all the all-ones marker (QEMU loads a fully
//! dirty bitmap), `qemu-io -c 'write 0 4k'` (open, write, store at close) against
//! `qemu-io -r -c 'read 0 4k'`.

use crate::work_dir::WorkDir;
use dirty_bitmap::{OpenMode, Recording};
use std::error::Error;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use dirty_bitmap::storage::{FileStorage, Storage, StorageExt};
use dirty_bitmap::units::{BytesPerMs, Millis};
use dirty_bitmap::{BitmapStore, FlushPolicy, SharedStore, Tracker};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use super::plot::{Chart, Series};
use crate::out::outln;
use crate::size::human;
use crate::size::parse_size;
use crate::CmdResult;

/// Guest write size.
const WRITE: u64 = 4096;
/// Cluster size of the images.
const CLUSTER: u64 = 65536;

/// Options of `dbm bench flush`.
#[derive(Debug, clap::Args)]
pub struct FlushArgs {
    /// Directory for the images (default: a temporary directory; removed afterwards either
    /// way).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Virtual disk size (suffixes K, M, G, T).
    #[arg(long, default_value = "16T", value_parser = parse_size, allow_negative_numbers = true)]
    pub disk_size: u64,
    /// Bytes of disk per bit.
    #[arg(long, default_value = "64K", value_parser = parse_size, allow_negative_numbers = true)]
    pub granularity: u64,
    /// Bitmap counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4])]
    pub bitmaps: Vec<usize>,
    /// Random 4 KiB guest writes per second.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// Burst mode: the writer marks as fast as it can instead of at --rate.
    #[arg(long)]
    pub burst: bool,
    /// Background flush interval in ms: the interval the targets are judged at.
    #[arg(long, default_value_t = 100)]
    pub flush_interval: u64,
    /// Flush intervals to sweep, in ms (comma-separated; --flush-interval is added).
    #[arg(long, value_delimiter = ',', default_values_t = [10u64, 1000])]
    pub sweep_intervals: Vec<u64>,
    /// Pending bytes per bitmap that `prepare_stop` flushes down to (while the writer runs)
    /// before the VM stops, in the second stop mode.
    #[arg(long, default_value = "1M", value_parser = parse_size, allow_negative_numbers = true)]
    pub stop_budget: u64,
    /// Seconds the writer runs with background flushes before each stop.
    #[arg(long, default_value_t = 0.5)]
    pub run_secs: f64,
    /// Repetitions of every measurement; the table shows medians.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Write the plot (stop time against changed fraction) to this SVG file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// A short run: no interval sweep, 0.3 s of writes, 1 repetition, 3 fraction points.
    #[arg(long)]
    pub quick: bool,
    /// Do not time QEMU's own store (needs qemu-io otherwise).
    #[arg(long)]
    pub no_qemu: bool,
    /// Random seed (default: random; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
}

type Res<T> = Result<T, Box<dyn Error>>;
type Shared = SharedStore<FileStorage>;

/// Bytes, barriers and wall time of one stop strategy.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    bytes: u64,
    syncs: u64,
    ms: f64,
}

/// One stop, every strategy measured on the same state.
#[derive(Debug, Clone, Copy, Default)]
struct Stop {
    /// Guest writes since the last flush.
    writes: u64,
    /// Changed regions over all bitmaps at the stop.
    regions: u64,
    inc: Cost,
    floor: Cost,
    appended: Cost,
    /// The floor of a stop with nothing to write: the 4-byte flags word of one directory
    /// entry written in place in the floor file, then one `fdatasync`.
    flags: Cost,
    full: Cost,
}

/// Picks one strategy's cost out of a stop.
type Pick = fn(&Stop) -> Cost;

/// The strategies, in table order.
const STRATEGIES: [(&str, Pick); 5] = [
    ("incremental inactivate", |s| s.inc),
    ("physical floor, in place", |s| s.floor),
    ("physical floor, appended", |s| s.appended),
    ("physical floor, flags word only", |s| s.flags),
    ("full rewrite (QEMU's strategy)", |s| s.full),
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn median_u(v: Vec<u64>) -> u64 {
    median(v.into_iter().map(|x| x as f64).collect()).round() as u64
}

/// The median of every field over repetitions.
fn median_stop(runs: &[Stop]) -> Stop {
    let m = |f: Pick| Cost {
        bytes: median_u(runs.iter().map(|s| f(s).bytes).collect()),
        syncs: median_u(runs.iter().map(|s| f(s).syncs).collect()),
        ms: median(runs.iter().map(|s| f(s).ms).collect()),
    };
    Stop {
        writes: median_u(runs.iter().map(|s| s.writes).collect()),
        regions: median_u(runs.iter().map(|s| s.regions).collect()),
        inc: m(|s| s.inc),
        floor: m(|s| s.floor),
        appended: m(|s| s.appended),
        flags: m(|s| s.flags),
        full: m(|s| s.full),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The writer thread's controls and its log of churned granules since the last flush.
#[derive(Debug, Default)]
struct Writer {
    stop: AtomicBool,
    pause: AtomicBool,
    paused: AtomicBool,
    writes: AtomicU64,
    log: Mutex<Vec<u64>>,
}

/// Clears granule `granule` in every bitmap, then marks a write on it: the bit ends set and
/// its region changed.
fn churn(t: &Tracker, g: u64, granule: u64, len: u64) {
    let off = granule * g;
    for b in t.bitmaps().iter() {
        b.clear(off, g);
    }
    t.mark(off, len);
}

/// Runs the guest writer: random 4 KiB writes at `rate` (or as fast as it can). With
/// `churn`, each write churns its granule; otherwise it is a plain mark. The log holds the
/// granules whose bits the write changed (every churned one; a plain mark only where the
/// first bitmap's bit was clean).
fn spawn_writer(
    w: Arc<Writer>,
    t: Tracker,
    (disk, g): (u64, u64),
    rate: Option<u64>,
    churn_writes: bool,
    seed: u64,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut start = Instant::now();
        let mut done = 0u64;
        while !w.stop.load(Ordering::SeqCst) {
            if w.pause.load(Ordering::SeqCst) {
                w.paused.store(true, Ordering::SeqCst);
                while w.pause.load(Ordering::SeqCst) && !w.stop.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_micros(100));
                }
                w.paused.store(false, Ordering::SeqCst);
                (start, done) = (Instant::now(), 0);
                continue;
            }
            if let Some(rate) = rate {
                let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                if done >= due {
                    thread::sleep(Duration::from_micros(200));
                    continue;
                }
                // A writer descheduled for a while does not catch up in one burst: at most
                // 10 ms of writes are owed.
                let owed_max = (rate / 100).max(1);
                if due - done > owed_max {
                    done = due - owed_max;
                }
            }
            let off = rng.random_range(0..disk / WRITE) * WRITE;
            if churn_writes {
                churn(&t, g, off / g, WRITE);
                w.log.lock().push(off / g);
            } else {
                let was_clean = t.bitmaps().first().is_some_and(|b| !b.is_dirty(off));
                t.mark(off, WRITE);
                if was_clean {
                    w.log.lock().push(off / g);
                }
            }
            done += 1;
            w.writes.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// One bitmap count's image, floor file and shared store.
struct Rig {
    n: usize,
    store: Shared,
    tracker: Tracker,
    floor: File,
    dir: PathBuf,
    /// Serialized bytes of one bitmap.
    ser_len: u64,
    /// Change-map regions of one bitmap, and their size.
    regions: u64,
    region_size: u64,
    first_flush: Cost,
}

fn setup(dir: &Path, n: usize, disk: u64, g: u64) -> Res<Rig> {
    let dir = dir.join(format!("bitmaps-{n}"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("image.qcow2");
    let mut s = BitmapStore::create(FileStorage::create(&path)?, disk, CLUSTER)?;
    for i in 0..n {
        s.add(&format!("b{i}"), g, Recording::Enabled)?;
    }
    s.activate()?;
    let tracker = s.tracker()?;
    tracker.mark(0, disk);
    let st = s.flush()?;
    let first_flush = Cost {
        bytes: st.bytes_written,
        syncs: st.syncs,
        ms: ms(st.duration),
    };
    let bm = s.bitmap("b0")?;
    let (ser_len, regions, region_size) =
        (bm.serialized_len(), bm.region_count(), bm.region_size());
    drop(bm);
    // The floor file: the same serialized bitmaps (all ones), durable.
    let floor = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join("floor.bin"))?;
    let chunk = vec![0xFFu8; 8 << 20];
    let total = ser_len * n as u64;
    let mut at = 0;
    while at < total {
        let len = (total - at).min(chunk.len() as u64) as usize;
        floor.write_all_at(&chunk[..len], at)?;
        at += len as u64;
    }
    floor.sync_data()?;
    Ok(Rig {
        n,
        store: SharedStore::new(s),
        tracker,
        floor,
        dir,
        ser_len,
        regions,
        region_size,
        first_flush,
    })
}

/// Times every strategy on the rig's current state. `granules`: the granules churned since
/// the last flush. The store is active before and after.
fn measure_stop(rig: &Rig, granules: &[u64], writes: u64) -> Res<Stop> {
    let mut s = rig.store.lock();
    let regions = s.bitmaps()?.iter().map(|b| b.changed_region_count()).sum();
    // On a VM the first barrier after a spell without one can cost more than one right
    // after another: the flags-word floor and the stop take turns going first, so that
    // over the repetitions neither always pays it.
    let flags_first = FLAGS_FIRST.fetch_xor(true, Ordering::Relaxed);
    let mut flags = Cost::default();
    let flags_floor = || -> Res<Cost> {
        let t0 = Instant::now();
        rig.floor.write_all_at(&1u32.to_be_bytes(), 12)?;
        rig.floor.sync_data()?;
        Ok(Cost {
            bytes: 4,
            syncs: 1,
            ms: ms(t0.elapsed()),
        })
    };
    if flags_first {
        flags = flags_floor()?;
    }
    let st = s.inactivate()?;
    if !flags_first {
        flags = flags_floor()?;
    }
    let inc = Cost {
        bytes: st.bytes_written,
        syncs: st.syncs,
        ms: ms(st.duration),
    };
    // The floor: the distinct bytes the writes touched, in every bitmap.
    let mut bytes: Vec<u64> = granules.iter().map(|g| g / 8).collect();
    bytes.sort_unstable();
    bytes.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for b in bytes.iter().copied() {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == b => *len += 1,
            _ => runs.push((b, 1)),
        }
    }
    let count = bytes.len() as u64 * rig.n as u64;
    let ones = vec![0xFFu8; runs.iter().map(|r| r.1).max().unwrap_or(0) as usize];
    let t0 = Instant::now();
    for k in 0..rig.n as u64 {
        for &(start, len) in &runs {
            rig.floor
                .write_all_at(&ones[..len as usize], k * rig.ser_len + start)?;
        }
    }
    rig.floor.sync_data()?;
    let floor = Cost {
        bytes: count,
        syncs: 1,
        ms: ms(t0.elapsed()),
    };
    let log_path = rig.dir.join("appended.bin");
    let _ = std::fs::remove_file(&log_path);
    let mut log = File::create(&log_path)?;
    let buf = vec![0xFFu8; count as usize];
    let t0 = Instant::now();
    log.write_all(&buf)?;
    log.sync_data()?;
    let appended = Cost {
        bytes: count,
        syncs: 1,
        ms: ms(t0.elapsed()),
    };
    s.activate()?;
    let st = s.inactivate_full_rewrite()?;
    let full = Cost {
        bytes: st.bytes_written,
        syncs: st.syncs,
        ms: ms(st.duration),
    };
    s.activate()?;
    Ok(Stop {
        writes,
        regions,
        inc,
        floor,
        appended,
        flags,
        full,
    })
}

/// Whether the next [`measure_stop`] times the flags-word floor before the stop (it
/// alternates).
static FLAGS_FIRST: AtomicBool = AtomicBool::new(false);

/// How the VM stop follows the running workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopMode {
    /// One whole flush interval after the last timer flush: the worst case of the timer.
    Timer,
    /// `prepare_stop` flushes (the writer still running) until at most this many bytes are
    /// pending, then the VM stops at once.
    Prepare(u64),
}

/// The stop loop of `prepare_stop`, with each flush noting where the writer's log stood
/// just before it: the writes after the last such point are the ones its flush may have
/// missed (a superset by the few microseconds before its take).
struct LoggedStop<'a> {
    store: &'a mut BitmapStore<FileStorage>,
    writer: &'a Writer,
    since: usize,
}

impl dirty_bitmap::flush::StopSource for LoggedStop<'_> {
    fn estimate(&mut self) -> u64 {
        self.store.pending_estimate()
    }
    fn exact(&mut self) -> dirty_bitmap::Result<u64> {
        self.store.pending_exact()
    }
    fn flush(&mut self) -> dirty_bitmap::Result<dirty_bitmap::FlushStats> {
        self.since = self.writer.log.lock().len();
        self.store.flush()
    }
}

/// What one workload run ended with.
struct WorkloadRun {
    stop: Stop,
    /// Writes per second the writer achieved.
    rate: f64,
    /// Background flushes, plus the stop loop's rounds in [`StopMode::Prepare`].
    flushes: u64,
    /// Whether the stop loop reached its budget (always true for [`StopMode::Timer`]).
    converged: bool,
}

/// Runs the writer with background flushes for `run`, stops the VM as `mode` says, and
/// measures the stop.
#[allow(clippy::too_many_arguments)]
fn workload_stop(
    rig: &Rig,
    disk: u64,
    g: u64,
    interval: Duration,
    run: Duration,
    rate: Option<u64>,
    (mode, churn_writes): (StopMode, bool),
    seed: u64,
) -> Res<WorkloadRun> {
    let w = Arc::new(Writer::default());
    let writer = spawn_writer(
        Arc::clone(&w),
        rig.tracker.clone(),
        (disk, g),
        rate,
        churn_writes,
        seed,
    );
    let flusher = FlushPolicy::every(interval).spawn(rig.store.clone())?;
    let t0 = Instant::now();
    thread::sleep(run);
    let mut rounds = 0;
    let mut converged = true;
    let (before, granules) = match mode {
        StopMode::Timer => {
            // The last flush: the writer pauses so that the log holds exactly what follows.
            w.pause.store(true, Ordering::SeqCst);
            while !w.paused.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_micros(100));
            }
            let policy = flusher.stop()?;
            rounds += u32::try_from(policy.flushes).unwrap_or(u32::MAX);
            rig.store.lock().flush()?;
            w.log.lock().clear();
            let before = w.writes.load(Ordering::Relaxed);
            w.pause.store(false, Ordering::SeqCst);
            thread::sleep(interval);
            w.stop.store(true, Ordering::SeqCst);
            (before, 0)
        }
        StopMode::Prepare(budget) => {
            let policy = flusher.stop()?;
            rounds += u32::try_from(policy.flushes).unwrap_or(u32::MAX);
            let mut s = rig.store.lock();
            let mut src = LoggedStop {
                store: &mut s,
                writer: &w,
                since: 0,
            };
            dirty_bitmap::flush::StopSource::flush(&mut src)?;
            let before_idx = src.since;
            // A budget of `budget` bytes per bitmap: that many bytes per ms, for 1 ms.
            let report = dirty_bitmap::flush::run_stop_loop(
                &mut src,
                BytesPerMs::from_bytes_per_ms((budget * rig.n as u64) as f64),
                Millis(1),
            )?;
            let since = src.since.max(before_idx);
            // The VM stops now.
            w.stop.store(true, Ordering::SeqCst);
            rounds += report.rounds;
            converged = report.converged;
            (0, since)
        }
    };
    writer.join().map_err(|_| "the writer thread panicked")?;
    let ran = t0.elapsed();
    let total = w.writes.load(Ordering::Relaxed);
    let granules: Vec<u64> = w.log.lock().split_off(granules);
    let writes = match mode {
        StopMode::Timer => total - before,
        StopMode::Prepare(_) => granules.len() as u64,
    };
    let stop = measure_stop(rig, &granules, writes)?;
    Ok(WorkloadRun {
        stop,
        rate: total as f64 / ran.as_secs_f64(),
        flushes: u64::from(rounds),
        converged,
    })
}

/// Churns one granule in each of `k` evenly spaced regions, then measures the stop.
fn fraction_stop(rig: &Rig, g: u64, k: u64) -> Res<Stop> {
    let mut granules = Vec::with_capacity(k as usize);
    for i in 0..k {
        let r = i * rig.regions / k;
        let granule = r * rig.region_size * 8;
        churn(&rig.tracker, g, granule, g);
        granules.push(granule);
    }
    measure_stop(rig, &granules, k)
}

/// One point of the crossover sweep: the stop with k evenly spaced regions churned, timed
/// three ways on the same rig, each after churning the same granules again.
struct Crossing {
    k: u64,
    /// Changed regions only (the threshold above 1).
    changed: Cost,
    /// Every region of the data clusters (the threshold 0).
    whole: Cost,
    /// The default threshold's choice, and whether it rewrote whole.
    default: Cost,
    chose_whole: bool,
}

fn crossing(rig: &Rig, g: u64, k: u64) -> Res<Crossing> {
    let stop = |threshold: f64| -> Res<Cost> {
        for i in 0..k {
            churn(
                &rig.tracker,
                g,
                i * rig.regions / k * rig.region_size * 8,
                g,
            );
        }
        let mut s = rig.store.lock();
        s.set_rewrite_threshold(threshold)?;
        let st = s.inactivate();
        s.set_rewrite_threshold(dirty_bitmap::flush::DEFAULT_REWRITE_THRESHOLD)?;
        let st = st?;
        s.activate()?;
        Ok(Cost {
            bytes: st.bytes_written,
            syncs: st.syncs,
            ms: ms(st.duration),
        })
    };
    let changed = stop(2.0)?;
    let whole = stop(0.0)?;
    let default = stop(dirty_bitmap::flush::DEFAULT_REWRITE_THRESHOLD)?;
    Ok(Crossing {
        k,
        changed,
        whole,
        default,
        chose_whole: dirty_bitmap::flush::rewrites_whole(
            k,
            rig.regions,
            dirty_bitmap::flush::DEFAULT_REWRITE_THRESHOLD,
        ),
    })
}

/// The crossover sweep: for each changed fraction, the in-place stop of the changed regions
/// against the in-place rewrite of every region, and what the default threshold picks.
fn crossover_sweep(rigs: &[Rig], g: u64, repeat: usize, quick: bool) -> Res<()> {
    outln!(
        "## The crossover: changed regions only, or every region, in place (k evenly spaced \
         regions churned; threshold {})",
        dirty_bitmap::flush::DEFAULT_REWRITE_THRESHOLD
    );
    outln!();
    outln!(
        "| bitmaps | k | fraction | changed only ms | bytes | whole ms | bytes | default picks | default ms |"
    );
    outln!("|---|---|---|---|---|---|---|---|---|");
    let eighths: &[u64] = if quick {
        &[1, 4, 8]
    } else {
        &[1, 2, 3, 4, 5, 6, 7, 8]
    };
    for rig in rigs {
        let mut first_cheaper = None;
        for &e in eighths {
            let k = (rig.regions * e / 8).max(1);
            let runs = (0..repeat)
                .map(|_| crossing(rig, g, k))
                .collect::<Res<Vec<_>>>()?;
            let med = |f: fn(&Crossing) -> Cost| Cost {
                bytes: median_u(runs.iter().map(|c| f(c).bytes).collect()),
                syncs: median_u(runs.iter().map(|c| f(c).syncs).collect()),
                ms: median(runs.iter().map(|c| f(c).ms).collect()),
            };
            let (c, w, d) = (med(|c| c.changed), med(|c| c.whole), med(|c| c.default));
            if w.ms <= c.ms && first_cheaper.is_none() {
                first_cheaper = Some(runs[0].k as f64 / rig.regions as f64);
            }
            outln!(
                "| {} | {} | {:.3} | {:.2} | {} | {:.2} | {} | {} | {:.2} |",
                rig.n,
                runs[0].k,
                runs[0].k as f64 / rig.regions as f64,
                c.ms,
                c.bytes,
                w.ms,
                w.bytes,
                if runs[0].chose_whole {
                    "whole"
                } else {
                    "changed only"
                },
                d.ms
            );
        }
        match first_cheaper {
            Some(f) => outln!(
                "\n- {} bitmap(s): the whole rewrite is no slower from a changed fraction of {f:.3} on \
                 (default threshold {})",
                rig.n,
                dirty_bitmap::flush::DEFAULT_REWRITE_THRESHOLD
            ),
            None => outln!(
                "\n- {} bitmap(s): the whole rewrite was slower at every fraction measured",
                rig.n
            ),
        }
    }
    outln!();
    Ok(())
}

/// Sets every table entry of every bitmap in the image at `path` to 1, the spec's
/// all-ones marker. The tables must be empty (all 0), so no data cluster leaks.
fn patch_all_ones(path: &Path) -> Res<()> {
    let st = FileStorage::open(path, OpenMode::ReadWrite)?;
    let image = dirty_bitmap::Image::open(&st, OpenMode::ReadOnly)?;
    let ext = image.area().bitmaps.ok_or("no bitmaps extension")?;
    let bytes = st.read_vec_at(ext.directory_offset, ext.directory_size)?;
    let geo = image.header().geometry()?;
    for e in dirty_bitmap::format::decode_directory(&bytes, ext.nb_bitmaps, &geo)? {
        let len = u64::from(e.table_size) * 8;
        if st.read_vec_at(e.table_offset, len)?.iter().any(|&b| b != 0) {
            return Err(format!("bitmap {:?} has data clusters", e.name).into());
        }
        let ones: Vec<u8> = (0..e.table_size).flat_map(|_| 1u64.to_be_bytes()).collect();
        st.write_all_at(&ones, e.table_offset)?;
    }
    st.sync_data()?;
    Ok(())
}

fn timed_qemu_io(args: &[&str]) -> Res<f64> {
    let t0 = Instant::now();
    let out = Command::new("qemu-io")
        .args(args)
        .output()
        .map_err(|e| format!("qemu-io: {e}"))?;
    let t = ms(t0.elapsed());
    if !out.status.success() || !out.stderr.is_empty() {
        return Err(format!(
            "qemu-io {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(t)
}

/// QEMU's own store of `n` fully dirty bitmaps: (read-only open ms, read-write open +
/// write + store ms, bytes the file grew), medians over `repeat` fresh images.
fn qemu_store(dir: &Path, n: usize, disk: u64, g: u64, repeat: usize) -> Res<(f64, f64, u64)> {
    let (mut ro, mut rw, mut grew) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..repeat {
        let path = dir.join(format!("qemu-{n}-{rep}.qcow2"));
        let mut s = BitmapStore::create(FileStorage::create(&path)?, disk, CLUSTER)?;
        for i in 0..n {
            s.add(&format!("b{i}"), g, Recording::Enabled)?;
        }
        drop(s);
        patch_all_ones(&path)?;
        let p = path.to_str().ok_or("path is not UTF-8")?;
        ro.push(timed_qemu_io(&["-f", "qcow2", "-r", "-c", "read 0 4k", p])?);
        let len0 = std::fs::metadata(&path)?.len();
        rw.push(timed_qemu_io(&["-f", "qcow2", "-c", "write 0 4k", p])?);
        grew.push(std::fs::metadata(&path)?.len().saturating_sub(len0));
        std::fs::remove_file(&path)?;
    }
    Ok((median(ro), median(rw), median_u(grew)))
}

fn first_line(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn cost_row(prefix: &str, name: &str, c: Cost) -> String {
    format!(
        "| {prefix} | {name} | {} | {} | {:.2} |",
        c.bytes, c.syncs, c.ms
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// Runs the benchmark and prints its tables.
pub fn run(args: &FlushArgs) -> CmdResult {
    let seed = args.seed.unwrap_or_else(rand::random);
    let (disk, g) = (args.disk_size, args.granularity);
    if args.repeat == 0 || args.rate == 0 || args.flush_interval == 0 {
        return Err("--repeat, --rate and --flush-interval must be above 0".into());
    }
    if args.bitmaps.iter().any(|&n| n == 0 || n > 64) {
        return Err("--bitmaps takes counts from 1 to 64".into());
    }
    let repeat = if args.quick { 1 } else { args.repeat };
    let run_for = Duration::from_secs_f64(if args.quick {
        0.3
    } else {
        args.run_secs.max(0.0)
    });
    let mut intervals = vec![args.flush_interval];
    if !args.quick {
        for &i in &args.sweep_intervals {
            if i > 0 && !intervals.contains(&i) {
                intervals.push(i);
            }
        }
    }
    intervals.sort_unstable();
    let rate = (!args.burst).then_some(args.rate);
    let tmp = WorkDir::temp_in(args.dir.as_deref())?;

    outln!("# dbm bench flush");
    outln!();
    outln!(
        "- machine: {}, {} CPUs, kernel {}",
        first_line("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown CPU".into()),
        thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into())
    );
    outln!("- load average (1, 5, 15 min) at the start: {}", loadavg());
    outln!(
        "- dbm {} , images in {}",
        env!("CARGO_PKG_VERSION"),
        tmp.path().display()
    );
    outln!(
        "- disk {} at granularity {}, clusters {}, seed {seed}",
        human(disk),
        human(g),
        human(CLUSTER)
    );
    outln!(
        "- writer: random 4 KiB writes, each churning its granule (cleared, then marked; \
         \"marks only\": plain marks), {}",
        match rate {
            Some(r) => format!("{r}/s"),
            None => "burst (as fast as one thread marks)".into(),
        }
    );
    outln!("- every figure is the median of {repeat} run(s); ms are wall-clock");
    outln!();

    let mut rigs = Vec::new();
    outln!("## Setup: every bit marked, first flush (allocates every data cluster)");
    outln!();
    outln!("| bitmaps | regions per bitmap | region size | bytes | syncs | ms |");
    outln!("|---|---|---|---|---|---|");
    for &n in &args.bitmaps {
        let rig = setup(tmp.path(), n, disk, g)?;
        outln!(
            "| {n} | {} | {} | {} | {} | {:.2} |",
            rig.regions,
            rig.region_size,
            rig.first_flush.bytes,
            rig.first_flush.syncs,
            rig.first_flush.ms
        );
        rigs.push(rig);
    }
    outln!();

    // Interval sweep.
    outln!(
        "## Workload: {:.1} s of writes with background flushes, then the VM stops",
        run_for.as_secs_f64()
    );
    outln!();
    outln!(
        "Stop modes: **timer**: the VM stops one whole interval after the last flush (the \
         worst case of the timer alone); **prepare_stop**: `prepare_stop` flushes, with the \
         writer running, until at most {} per bitmap is pending, then the VM stops at once.",
        human(args.stop_budget)
    );
    outln!();
    outln!("| bitmaps | interval ms | stop mode | writes/s | flushes | writes since flush | changed regions | stop | bytes | syncs | ms |");
    outln!("|---|---|---|---|---|---|---|---|---|---|---|");
    // (n, interval, mode) → median stop.
    let mut at_interval: Vec<(usize, u64, (StopMode, bool), Stop)> = Vec::new();
    let mut not_converged: Vec<String> = Vec::new();
    for rig in &rigs {
        for &iv in &intervals {
            // prepare_stop hardly depends on the interval: only at the judged one.
            // Plain marks on the fully dirty bitmaps: only at the judged one too.
            let modes = if iv == args.flush_interval {
                vec![
                    (StopMode::Timer, true),
                    (StopMode::Prepare(args.stop_budget), true),
                    (StopMode::Timer, false),
                ]
            } else {
                vec![(StopMode::Timer, true)]
            };
            for mode in modes {
                let mut runs = Vec::new();
                let (mut rates, mut flushes) = (Vec::new(), Vec::new());
                for rep in 0..repeat {
                    let r = workload_stop(
                        rig,
                        disk,
                        g,
                        Duration::from_millis(iv),
                        run_for,
                        rate,
                        mode,
                        seed ^ (rep as u64) ^ (iv << 8) ^ ((rig.n as u64) << 40),
                    )?;
                    runs.push(r.stop);
                    rates.push(r.rate);
                    flushes.push(r.flushes);
                    if !r.converged {
                        not_converged.push(format!(
                            "{} bitmap(s) at {iv} ms, run {}",
                            rig.n,
                            rep + 1
                        ));
                    }
                }
                let m = median_stop(&runs);
                let mode_name = match mode {
                    (StopMode::Timer, true) => "timer",
                    (StopMode::Prepare(_), true) => "prepare_stop",
                    (StopMode::Timer, false) => "timer, marks only",
                    (StopMode::Prepare(_), false) => "prepare_stop, marks only",
                };
                for (name, f) in STRATEGIES {
                    let c = f(&m);
                    outln!(
                        "| {} | {iv} | {mode_name} | {:.0} | {} | {} | {} | {name} | {} | {} | {:.2} |",
                        rig.n,
                        median(rates.clone()),
                        median_u(flushes.clone()),
                        m.writes,
                        m.regions,
                        c.bytes,
                        c.syncs,
                        c.ms
                    );
                }
                at_interval.push((rig.n, iv, mode, m));
            }
        }
    }
    outln!();
    if !not_converged.is_empty() {
        outln!(
            "prepare_stop gave up after {} rounds without reaching the budget (marks outpaced \
             the flushes) in: {}.",
            dirty_bitmap::flush::MAX_STOP_ROUNDS,
            not_converged.join("; ")
        );
        outln!();
    }

    // Fraction sweep.
    outln!(
        "## Changed fraction: one granule churned in each of k evenly spaced regions, no writer"
    );
    outln!();
    outln!("| bitmaps | changed regions (k) | fraction | stop | bytes | syncs | ms |");
    outln!("|---|---|---|---|---|---|---|");
    let mut fractions: Vec<(usize, f64, Stop)> = Vec::new();
    for rig in &rigs {
        let mut ks: Vec<u64> = if args.quick {
            vec![1, 64.min(rig.regions), rig.regions]
        } else {
            let mut v = Vec::new();
            let mut k = 1;
            while k < rig.regions {
                v.push(k);
                k *= 8;
            }
            v.push(rig.regions);
            v
        };
        ks.dedup();
        for k in ks {
            let runs = (0..repeat)
                .map(|_| fraction_stop(rig, g, k))
                .collect::<Res<Vec<_>>>()?;
            let m = median_stop(&runs);
            let frac = k as f64 / rig.regions as f64;
            for (name, f) in STRATEGIES {
                outln!(
                    "{}",
                    cost_row(&format!("{} | {k} | {frac:.6}", rig.n), name, f(&m))
                );
            }
            fractions.push((rig.n, frac, m));
        }
    }
    outln!();

    crossover_sweep(&rigs, g, repeat, args.quick)?;

    // QEMU's own store.
    let mut qemu: Vec<(usize, f64)> = Vec::new();
    if args.no_qemu {
        outln!("## QEMU's own store: skipped (--no-qemu)");
    } else {
        outln!(
            "## QEMU's own store: all table entries patched to the all-ones marker (fully dirty)"
        );
        outln!();
        outln!("| bitmaps | qemu-io -r read 0 4k ms | qemu-io write 0 4k ms | store (difference) ms | file grew |");
        outln!("|---|---|---|---|---|");
        for &n in &args.bitmaps {
            let (ro, rw, grew) = qemu_store(tmp.path(), n, disk, g, repeat)?;
            outln!("| {n} | {ro:.1} | {rw:.1} | {:.1} | {grew} |", rw - ro);
            qemu.push((n, rw - ro));
        }
    }
    outln!();

    // Targets.
    outln!(
        "## Targets (fully dirty, {} writes/s, {} ms interval; both stop modes)",
        args.rate,
        args.flush_interval
    );
    outln!();
    for (n, iv, mode, m) in &at_interval {
        if *iv != args.flush_interval {
            continue;
        }
        let n = match mode {
            (StopMode::Timer, true) => format!("{n} bitmap(s), churn, timer stop"),
            (StopMode::Prepare(_), true) => format!("{n} bitmap(s), churn, prepare_stop"),
            (StopMode::Timer, false) => format!("{n} bitmap(s), marks only, timer stop"),
            (StopMode::Prepare(_), false) => {
                format!("{n} bitmap(s), marks only, prepare_stop")
            }
        };
        let full_ratio = m.full.ms / m.inc.ms;
        outln!(
            "- {n}: incremental {:.2} ms vs full rewrite {:.2} ms = 1/{full_ratio:.1} \
             (target ≤ 1/50): {}",
            m.inc.ms,
            m.full.ms,
            verdict(m.inc.ms * 50.0 <= m.full.ms)
        );
        outln!(
            "- {n}: incremental {:.2} ms vs floor in place {:.2} ms = {:.2}× \
             (target ≤ 2×): {}; vs floor appended {:.2} ms = {:.2}×: {}",
            m.inc.ms,
            m.floor.ms,
            m.inc.ms / m.floor.ms,
            verdict(m.inc.ms <= 2.0 * m.floor.ms),
            m.appended.ms,
            m.inc.ms / m.appended.ms,
            verdict(m.inc.ms <= 2.0 * m.appended.ms)
        );
        if m.regions == 0 {
            outln!(
                "- {n}: nothing changed: incremental {:.2} ms vs the flags word and one \
                 barrier {:.2} ms = {:.2}× (target ≤ 2×): {}",
                m.inc.ms,
                m.flags.ms,
                m.inc.ms / m.flags.ms,
                verdict(m.inc.ms <= 2.0 * m.flags.ms)
            );
        }
        outln!(
            "- {n}: bytes {} incremental vs {} full rewrite (1/{:.0})",
            m.inc.bytes,
            m.full.bytes,
            m.full.bytes as f64 / m.inc.bytes.max(1) as f64
        );
    }
    outln!();
    outln!("- load average at the end: {}", loadavg());

    if let Some(path) = &args.svg {
        let mut series = Vec::new();
        for &n in &args.bitmaps {
            let pts = |f: Pick| -> Vec<(f64, f64)> {
                fractions
                    .iter()
                    .filter(|(m, ..)| *m == n)
                    .map(|(_, x, s)| (*x, f(s).ms))
                    .collect()
            };
            let dashed = n != args.bitmaps[0];
            let suffix = if n == 1 {
                "1 bitmap".into()
            } else {
                format!("{n} bitmaps")
            };
            for (i, (name, f)) in STRATEGIES.into_iter().enumerate() {
                series.push(Series {
                    name: format!("{name}, {suffix}"),
                    points: pts(f),
                    dashed,
                    colour: Some(i),
                });
            }
            if let Some(&(_, q)) = qemu.iter().find(|(m, _)| *m == n) {
                // QEMU stores every non-zero cluster whatever changed: flat.
                let xs: Vec<f64> = pts(|s| s.inc).iter().map(|p| p.0).collect();
                series.push(Series {
                    name: format!("QEMU's own store (qemu-io), {suffix}"),
                    points: xs.iter().map(|&x| (x, q)).collect(),
                    dashed,
                    colour: Some(STRATEGIES.len()),
                });
            }
        }
        let chart = Chart {
            title: format!(
                "Stop time against changed fraction, {} disk, {} granularity",
                human(disk),
                human(g)
            ),
            x_label: "changed fraction of the bitmap (changed regions / all regions)".into(),
            y_label: "stop time, ms".into(),
            x_log: true,
            y_log: true,
            series,
        };
        std::fs::write(path, chart.to_svg())?;
        outln!("- plot: {}", path.display());
    }
    Ok(std::process::ExitCode::SUCCESS)
}
