//! `dbm bench durable`: what the durable mode's intents cost, side by side in one run.
//!
//! On a bitmap-only image of `--disk-size` in a file under `--dir`, `--threads` writer
//! threads each mark `--intents` random 4 KiB writes (4 KiB-aligned, uniform over the disk,
//! so nearly every one dirties a clean granule), once per mode:
//!
//! - `none`: no tracking (the loop and the clock alone);
//! - `deferred`: `Tracker::mark` on an active store (today's default: in memory, flushed
//!   later);
//! - `durable`: `DurableTracker::mark`, group commit (each waits until its bit is on disk);
//! - `naive`: a durable mark that syncs once per intent (the store locked, the bit set, a
//!   commit: md's classic write-intent without batching).
//!
//! Per mode and thread count: the intent latency of the first pass (p50, p99, p99.9, timed
//! one by one), its throughput and barriers per second; then a second pass over the same
//! offsets (every granule dirty and, in durable mode, durable), 200 times over in 20 blocks
//! timed by each thread: the slowest thread's median block, per intent (its loop and the
//! offsets' reads included), and the barriers issued (0 expected).
//!
//! Then the write-through part (`--write-through N` writes per row, one thread, a sparse raw
//! file of at most 1 TiB): each 4 KiB data write followed by `fdatasync`, untracked, on
//! fresh offsets and again on the same ones; the floor (a fresh write plus one 4 KiB
//! in-place write and `fdatasync` of another file, written whole beforehand as the image's
//! clusters are); with a durable intent before it on clean granules; and again on the same
//! granules, dirty and durable. The rows are interleaved write by write, in rotating
//! order, so that drift over the run falls on all of them alike. Targets: the clean row against the floor
//! ≤ 1.1× at p50, the dirty row against the untracked rewrite ≤ 1.05×.

use crate::work_dir::WorkDir;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::{BitmapStore, Recording, SharedStore};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::migrate_run::{loadavg, machine};
use crate::out::emit;
use crate::size::{human, parse_size};
use crate::CmdResult;

/// Bytes per write.
const WRITE: u64 = 4096;
/// Times the second pass (every granule dirty) runs over its offsets, in
/// [`SECOND_BLOCKS`] blocks timed one by one: a thread's figure is its median block, so
/// that a preemption (the VM's or the scheduler's) spoils a block, not the figure.
const SECOND_REPS: usize = 200;
/// Blocks of the second pass.
const SECOND_BLOCKS: usize = 20;

/// How intents are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// No tracking.
    None,
    /// `Tracker::mark` (in memory; flushed later).
    Deferred,
    /// `DurableTracker::mark`, group commit.
    Durable,
    /// One commit (and barrier) per intent.
    Naive,
}

/// Options of `dbm bench durable`.
#[derive(Debug, clap::Args)]
pub struct DurableArgs {
    /// Directory for the images (default: a temporary directory under /tmp).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Disk size the bitmap covers (suffixes K, M, G, T).
    #[arg(long, default_value = "16T", value_parser = parse_size, allow_negative_numbers = true)]
    pub disk_size: u64,
    /// Granularity (suffixes K, M).
    #[arg(long, default_value = "64K", value_parser = parse_size, allow_negative_numbers = true)]
    pub granularity: u64,
    /// Writer thread counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16])]
    pub threads: Vec<usize>,
    /// Intents per thread in each pass.
    #[arg(long, default_value_t = 500)]
    pub intents: usize,
    /// Modes (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Mode::None, Mode::Deferred, Mode::Durable, Mode::Naive])]
    pub modes: Vec<Mode>,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Writes of the write-through part (each with its data write and `fdatasync`); 0
    /// skips it.
    #[arg(long, default_value_t = 300)]
    pub write_through: usize,
    /// Where the intents of the first part fall: `uniform` over the disk (every intent on
    /// a page of the bitmap of its own), or `hot` (90 % into a 64 GiB hot spot, the rest
    /// anywhere: `dbm demo`'s disk writes; the hot spot's bits fill 32 pages of 4 KiB).
    #[arg(long, value_enum, default_value_t = Pattern::Uniform)]
    pub pattern: Pattern,
    /// Enabled bitmaps on the image of the first part: each intent marks every one, and a
    /// commit writes a page of each.
    #[arg(long, default_value_t = 1)]
    pub bitmaps: usize,
    /// Seconds per row of the disk's own ceiling (the same page writes and barriers with
    /// no bitmap code, at the most threads, run when both `durable` and `naive` are, with
    /// the uniform pattern); 0 skips it.
    #[arg(long, default_value_t = 1.0)]
    pub ceiling_secs: f64,
}

/// Where the intents fall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    /// Uniform over the disk.
    Uniform,
    /// 90 % into a 64 GiB hot spot, the rest anywhere.
    Hot,
}

/// One mode at one thread count.
struct Row {
    mode: Mode,
    threads: usize,
    first: Vec<Duration>,
    first_elapsed: Duration,
    first_syncs: u64,
    second_ns: f64,
    second_syncs: u64,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn offsets(disk: u64, n: usize, seed: u64) -> Vec<u64> {
    offsets_in(disk, n, seed, Pattern::Uniform)
}

/// `n` 4 KiB-aligned offsets; a hot spot's place depends on `disk` only, so every thread
/// writes into the same one.
fn offsets_in(disk: u64, n: usize, seed: u64, pattern: Pattern) -> Vec<u64> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let blocks = (disk / WRITE).max(1);
    let hot = ((64u64 << 30) / WRITE).min(blocks);
    let hot_start = (blocks - hot) / 3;
    (0..n)
        .map(|_| {
            let b = match pattern {
                Pattern::Hot if rng.random_range(0..10) != 0 => {
                    hot_start + rng.random_range(0..hot)
                }
                _ => rng.random_range(0..blocks),
            };
            b * WRITE
        })
        .collect()
}

/// Runs one mode with `threads` writers on a fresh image at `path`.
fn one(
    args: &DurableArgs,
    mode: Mode,
    threads: usize,
    path: &std::path::Path,
) -> Result<Row, String> {
    let _ = std::fs::remove_file(path);
    let mut st = BitmapStore::create(
        FileStorage::create(path).map_err(|e| e.to_string())?,
        args.disk_size,
        65536,
    )
    .map_err(|e| e.to_string())?;
    for i in 0..args.bitmaps {
        st.add(&format!("b{i}"), args.granularity, Recording::Enabled)
            .map_err(|e| e.to_string())?;
    }
    match mode {
        Mode::Durable | Mode::Naive => st.activate_durable(),
        Mode::None | Mode::Deferred => st.activate(),
    }
    .map_err(|e| e.to_string())?;
    let store = SharedStore::new(st);
    let deferred = match mode {
        Mode::Deferred => Some(store.lock().tracker().map_err(|e| e.to_string())?),
        _ => None,
    };
    let durable = match mode {
        // Naive marks through it too (a durable store hands out no live bitmap), then
        // commits alone.
        Mode::Durable | Mode::Naive => Some(store.durable_tracker().map_err(|e| e.to_string())?),
        _ => None,
    };
    let per_thread: Vec<Vec<u64>> = (0..threads)
        .map(|t| {
            offsets_in(
                args.disk_size,
                args.intents,
                args.seed ^ ((t as u64 + 1) * 0x9E37),
                args.pattern,
            )
        })
        .collect();
    let syncs = || store.lock().image().sync_count();
    let intent = |off: u64| -> Result<(), String> {
        match mode {
            Mode::None => {
                std::hint::black_box(off);
            }
            Mode::Deferred => {
                if let Some(t) = &deferred {
                    t.mark(off, WRITE);
                }
            }
            Mode::Durable => {
                if let Some(t) = &durable {
                    t.mark(off, WRITE).map_err(|e| e.to_string())?;
                }
            }
            Mode::Naive => {
                let mut g = store.lock();
                if let Some(t) = &durable {
                    // The bits in memory; the flush below is the commit that writes them.
                    drop(t.intent(off, WRITE).map_err(|e| e.to_string())?);
                }
                g.flush().map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    };
    // First pass: every intent timed.
    let s0 = syncs();
    let start = Instant::now();
    let lat: Vec<Result<Vec<Duration>, String>> = std::thread::scope(|sc| {
        let hs: Vec<_> = per_thread
            .iter()
            .map(|offs| {
                let intent = &intent;
                sc.spawn(move || {
                    let mut out = Vec::with_capacity(offs.len());
                    for &o in offs {
                        let t = Instant::now();
                        intent(o)?;
                        out.push(t.elapsed());
                    }
                    Ok(out)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a writer panicked".into())))
            .collect()
    });
    let first_elapsed = start.elapsed();
    let first_syncs = syncs() - s0;
    let mut first = Vec::new();
    for l in lat {
        first.extend(l?);
    }
    first.sort();
    // Second pass over the same offsets, SECOND_REPS times: dirty (and durable) already;
    // each thread times its own blocks (no spawn in the figure) and keeps its median
    // block's time per intent; the slowest thread's counts.
    let s1 = syncs();
    let r: Vec<Result<f64, String>> = std::thread::scope(|sc| {
        let hs: Vec<_> = per_thread
            .iter()
            .map(|offs| {
                let intent = &intent;
                sc.spawn(move || {
                    let reps = SECOND_REPS / SECOND_BLOCKS;
                    let mut blocks = Vec::with_capacity(SECOND_BLOCKS);
                    for _ in 0..SECOND_BLOCKS {
                        let start = Instant::now();
                        for _ in 0..reps {
                            for &o in offs {
                                intent(o)?;
                            }
                        }
                        let per = (reps * offs.len()).max(1) as f64;
                        blocks.push(start.elapsed().as_nanos() as f64 / per);
                    }
                    blocks.sort_by(f64::total_cmp);
                    Ok(blocks[blocks.len() / 2])
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a writer panicked".into())))
            .collect()
    });
    let mut second = 0f64;
    for x in r {
        second = second.max(x?);
    }
    let second_syncs = syncs() - s1;
    drop(durable);
    drop(deferred);
    let st = store
        .try_into_inner()
        .map_err(|_| "the store is still shared".to_string())?;
    let mut st = st;
    st.inactivate().map_err(|e| e.to_string())?;
    drop(st);
    let _ = std::fs::remove_file(path);
    Ok(Row {
        mode,
        threads,
        first,
        first_elapsed,
        first_syncs,
        // The slowest thread's median block, per intent.
        second_ns: second,
        second_syncs,
    })
}

/// Runs `dbm bench durable`.
pub fn run(args: &DurableArgs) -> CmdResult {
    if args.intents == 0 || args.threads.contains(&0) || args.bitmaps == 0 {
        return Err("--intents, --bitmaps and every --threads must be at least 1".into());
    }
    let work = WorkDir::given_or_temp(args.dir.as_deref())?;
    let dir = work.path();
    let path = dir.join("bench-durable.qcow2");
    let threads: Vec<String> = args.threads.iter().map(ToString::to_string).collect();
    let modes: Vec<String> = args
        .modes
        .iter()
        .map(|m| format!("{m:?}").to_lowercase())
        .collect();
    emit(&format!(
        "# dbm bench durable\n\n- machine: {}\n- load average (1, 5, 15 min) at the start: {}\n\
         - a bitmap-only image of {} at {} granularity in {} (a file on this machine's disk), \
         {} enabled bitmap(s); {} random 4 KiB writes per thread per pass, {}\n\
         - reproduce: `cargo run --release -- bench durable --disk-size {} --granularity {} \
         --threads {} --intents {} --modes {} --pattern {} --bitmaps {} --seed {}`\n\n",
        machine(),
        loadavg(),
        human(args.disk_size),
        human(args.granularity),
        dir.display(),
        args.bitmaps,
        args.intents,
        match args.pattern {
            Pattern::Uniform => "uniform over the disk",
            Pattern::Hot => "90 % into a 64 GiB hot spot, the rest anywhere",
        },
        args.disk_size,
        args.granularity,
        threads.join(","),
        args.intents,
        modes.join(","),
        format!("{:?}", args.pattern).to_lowercase(),
        args.bitmaps,
        args.seed,
    ))?;
    emit(
        "| mode | threads | first pass: p50 µs | p99 µs | p99.9 µs | intents/s | barriers/s | \
         second pass (dirty): ns per intent | second pass barriers |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    )?;
    let mut rows = Vec::new();
    for &t in &args.threads {
        for &m in &args.modes {
            crate::out::errln!("dbm bench durable: {m:?}, {t} thread(s)");
            let r = one(args, m, t, &path).map_err(|e| format!("{m:?} with {t} threads: {e}"))?;
            let secs = r.first_elapsed.as_secs_f64().max(1e-9);
            emit(&format!(
                "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.1} | {} |\n",
                format!("{:?}", r.mode).to_lowercase(),
                r.threads,
                us(pct(&r.first, 0.5)),
                us(pct(&r.first, 0.99)),
                us(pct(&r.first, 0.999)),
                r.first.len() as f64 / secs,
                r.first_syncs as f64 / secs,
                r.second_ns,
                r.second_syncs,
            ))?;
            rows.push(r);
        }
    }
    // The targets the issue sets that this run measures.
    let thr = |m: Mode, t: usize| {
        rows.iter()
            .find(|r| r.mode == m && r.threads == t)
            .map(|r| r.first.len() as f64 / r.first_elapsed.as_secs_f64().max(1e-9))
    };
    emit("\n")?;
    // The fast path's cost on one thread (more threads than CPUs time the scheduler), net
    // of the same loop without tracking.
    let fewest = args.threads.iter().copied().min().unwrap_or(1);
    let second = |m: Mode| {
        rows.iter()
            .find(|r| r.mode == m && r.threads == fewest)
            .map(|r| (r.second_ns, r.second_syncs))
    };
    if let Some((ns, syncs)) = second(Mode::Durable) {
        let base = second(Mode::None).map_or(0.0, |(b, _)| b);
        let net = (ns - base).max(0.0);
        emit(&format!(
            "- an intent on a granule already dirty and durable, {fewest} thread(s): {ns:.1} ns \
             ({net:.1} ns more than the loop without tracking), {syncs} barriers (target ≤ 5 \
             ns, no barrier): **{}**\n",
            if net <= 5.0 && syncs == 0 {
                "met"
            } else {
                "not met"
            }
        ))?;
    }
    let most = args.threads.iter().copied().max().unwrap_or(1);
    if let (Some(g), Some(n)) = (thr(Mode::Durable, most), thr(Mode::Naive, most)) {
        emit(&format!(
            "- group commit against one barrier per intent at {most} threads: {:.1}× the \
             throughput (target ≥ 5×): **{}**\n",
            g / n.max(1e-9),
            if g >= 5.0 * n { "met" } else { "not met" }
        ))?;
    }
    // What bounds the group commit: a naive commit is one page and a barrier (T1); a
    // group commit of k pages takes Tk = T1 + (k - 1) P. With every intent on a page of
    // its own, k intents cost at least k P, so the group commit cannot pass T1 / P times
    // the naive throughput however many threads wait.
    let per_commit = |m: Mode| {
        rows.iter()
            .find(|r| r.mode == m && r.threads == most && r.first_syncs > 0)
            .map(|r| {
                let commits = r.first_syncs as f64;
                (
                    r.first_elapsed.as_secs_f64() / commits,
                    r.first.len() as f64 / commits,
                )
            })
    };
    if let (Some((tk, k)), Some((t1, _))) = (per_commit(Mode::Durable), per_commit(Mode::Naive)) {
        if k > 1.0 && tk > t1 {
            let page = (tk - t1) / (k - 1.0);
            emit(&format!(
                "- what bounds it at {most} threads: a naive commit (one page, one barrier) \
                 takes {:.0} µs; a group commit took {:.0} µs for {k:.1} intents, so each \
                 further page costs {:.0} µs: with every intent on a page of its own, no \
                 batching passes {:.1}× the naive throughput on this disk\n",
                t1 * 1e6,
                tk * 1e6,
                page * 1e6,
                t1 / page,
            ))?;
        }
    }
    // The ceiling writes uniform pages: the uniform pattern's.
    if args.ceiling_secs > 0.0 && args.pattern == Pattern::Uniform {
        if let (Some(g), Some(n)) = (thr(Mode::Durable, most), thr(Mode::Naive, most)) {
            ceiling(args, dir, most, g / n.max(1e-9))?;
        }
    }
    if args.write_through > 0 {
        write_through(args, dir)?;
    }
    emit(&format!("- load average at the end: {}\n", loadavg()))?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// The disk's own ceiling at `threads` writers (`super::ceiling`), beside `ratio`, the
/// group commit's throughput over the naive mode's in this run.
fn ceiling(args: &DurableArgs, dir: &std::path::Path, threads: usize, ratio: f64) -> CmdResult {
    let bitmap_bytes = args.disk_size.div_ceil(args.granularity.max(1)).div_ceil(8);
    let span = bitmap_bytes.saturating_mul(args.bitmaps as u64);
    crate::out::errln!("dbm bench durable: the disk's ceiling, {threads} thread(s)");
    let c = super::ceiling::measure(dir, (span, args.bitmaps as u64), threads, args.ceiling_secs)?;
    let best = c.batched.max(c.overlapped) / c.naive.max(1e-9);
    emit(&format!(
        "- the disk's own ceiling at {threads} threads, no bitmap code (per write a random 4 KiB \
         page in each of {} part(s) of a file of {} written whole, each write waiting until its pages are durable; {:.1} s per \
         row, median of 3 interleaved rounds): the pages and one fdatasync per write under a \
         lock {:.0} writes/s; batched, one commit at a time {:.0} writes/s ({:.1}×, {:.1} \
         writes per barrier); batched with up to {} commits in flight {:.0} writes/s ({:.1}×, \
         {:.1} writes per barrier). No group commit passes {best:.1}× one barrier per write on \
         this disk at this hour; ours reached {ratio:.1}× against the naive mode ({:.0} % of \
         that)\n",
        args.bitmaps,
        human(span),
        args.ceiling_secs,
        c.naive,
        c.batched,
        c.batched / c.naive.max(1e-9),
        c.batched_per_barrier,
        super::ceiling::OVERLAP,
        c.overlapped,
        c.overlapped / c.naive.max(1e-9),
        c.overlapped_per_barrier,
        100.0 * ratio / best.max(1e-9),
    ))?;
    emit(&format!(
        "- one writer, a page and an fdatasync per write: {:.0} µs; with an fstat before each \
         write (the range check `FileStorage` made before it used lseek): {:.0} µs ({:.2}×)\n",
        c.plain_us,
        c.stat_us,
        c.stat_us / c.plain_us.max(1e-9),
    ))?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Disk size of the write-through part: a sparse raw file must fit the filesystem's
/// largest file (ext4's is just under 16 TiB), so at most 1 TiB.
const WT_DISK: u64 = 1 << 40;

/// The write-through part: one thread, each 4 KiB data write to a sparse raw file followed
/// by `fdatasync` (a guest with write-through caching), without tracking, with a durable
/// intent before it on clean granules and again on the same granules once durable, and
/// the floor: the untracked write plus one 4 KiB in-place write and `fdatasync` of another
/// file on the same disk, measured alone in the same run.
fn write_through(args: &DurableArgs, dir: &std::path::Path) -> CmdResult {
    use std::os::unix::fs::FileExt;
    let disk = args.disk_size.min(WT_DISK);
    let n = args.write_through;
    let raw_path = dir.join("bench-durable.raw");
    let side_path = dir.join("bench-durable.side");
    let img_path = dir.join("bench-durable-wt.qcow2");
    let raw = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&raw_path)?;
    raw.set_len(disk)?;
    let side = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&side_path)?;
    // Written whole first, as the image's clusters are at a durable activation: the
    // floor's in-place writes then allocate nothing.
    side.write_all_at(&vec![0u8; 32 << 20], 0)?;
    side.sync_data()?;
    let data = [0xA5u8; WRITE as usize];
    let write = |off: u64| -> std::io::Result<()> {
        raw.write_all_at(&data, off)?;
        raw.sync_data()
    };
    let timed = |f: &mut dyn FnMut() -> Result<(), String>| -> Result<Duration, String> {
        let t = Instant::now();
        f()?;
        Ok(t.elapsed())
    };
    let _ = std::fs::remove_file(&img_path);
    let mut st = BitmapStore::create(
        FileStorage::create(&img_path).map_err(|e| e.to_string())?,
        disk,
        65536,
    )?;
    st.add("b", args.granularity, Recording::Enabled)?;
    st.activate_durable()?;
    let store = SharedStore::new(st);
    let tracker = store.durable_tracker()?;
    let intent_then_write = |o: u64| -> Result<(), String> {
        tracker.mark(o, WRITE).map_err(|e| e.to_string())?;
        write(o).map_err(|e| e.to_string())
    };
    let mut side_at = 0u64;
    let mut floor_write = |o: u64| -> Result<(), String> {
        write(o).map_err(|e| e.to_string())?;
        side_at = (side_at + 7919 * WRITE) % (32 << 20);
        side.write_all_at(&data, side_at)
            .and_then(|()| side.sync_data())
            .map_err(|e| e.to_string())
    };
    // The rows interleaved write by write, their order rotating, so that the disk's and
    // the file system's drift over the run (write-back, journal commits) falls on every
    // row alike. First fresh offsets (the raw file allocates): untracked, the floor, and a
    // durable intent on a clean granule before the write; then the same offsets again:
    // untracked rewrites, and intents on dirty, durable granules.
    let untracked_offs = offsets(disk, n, args.seed ^ 0xA1);
    let floor_offs = offsets(disk, n, args.seed ^ 0xA2);
    let clean_offs = offsets(disk, n, args.seed ^ 0xA3);
    let (mut untracked, mut floor, mut clean) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        for k in 0..3 {
            match (i + k) % 3 {
                0 => untracked.push(timed(&mut || {
                    write(untracked_offs[i]).map_err(|e| e.to_string())
                })?),
                1 => floor.push(timed(&mut || floor_write(floor_offs[i]))?),
                _ => clean.push(timed(&mut || intent_then_write(clean_offs[i]))?),
            }
        }
    }
    let (mut rewrite, mut dirty) = (Vec::new(), Vec::new());
    for i in 0..n {
        for k in 0..2 {
            if (i + k) % 2 == 0 {
                rewrite.push(timed(&mut || {
                    write(untracked_offs[i]).map_err(|e| e.to_string())
                })?);
            } else {
                dirty.push(timed(&mut || intent_then_write(clean_offs[i]))?);
            }
        }
    }
    for v in [
        &mut untracked,
        &mut floor,
        &mut clean,
        &mut rewrite,
        &mut dirty,
    ] {
        v.sort();
    }
    drop(tracker);
    store
        .try_into_inner()
        .map_err(|_| "the store is still shared")?
        .inactivate()?;
    for p in [&raw_path, &side_path, &img_path] {
        let _ = std::fs::remove_file(p);
    }
    emit(&format!(
        "\n## Write-through: each 4 KiB data write followed by fdatasync, one thread, {n} \
         writes per row, a {} sparse raw file\n\n\
         | row | p50 µs | p99 µs | p99.9 µs |\n|---|---|---|---|\n",
        human(disk)
    ))?;
    for (name, v) in [
        ("untracked", &untracked),
        ("untracked, the same offsets again", &rewrite),
        (
            "floor: untracked + one 4 KiB in-place write and fdatasync",
            &floor,
        ),
        ("durable, clean granules (intent, then the write)", &clean),
        (
            "durable, the same granules again (dirty and durable)",
            &dirty,
        ),
    ] {
        emit(&format!(
            "| {name} | {} | {} | {} |\n",
            us(pct(v, 0.5)),
            us(pct(v, 0.99)),
            us(pct(v, 0.999))
        ))?;
    }
    let p50 = |v: &[Duration]| pct(v, 0.5).as_secs_f64().max(1e-12);
    let first = p50(&clean) / p50(&floor);
    let later = p50(&dirty) / p50(&rewrite);
    emit(&format!(
        "\n- a first write to a clean granule against its floor, p50: {first:.2}× (target ≤ \
         1.1×): **{}**\n- once the working set is dirty, against untracked on the same offsets, \
         p50: {later:.2}× \
         (target ≤ 1.05×): **{}**\n",
        if first <= 1.1 { "met" } else { "not met" },
        if later <= 1.05 { "met" } else { "not met" },
    ))?;
    Ok(std::process::ExitCode::SUCCESS)
}
