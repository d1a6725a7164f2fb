//! `dbm workload`: a guest-like write load on one image, for users and for crash drills.
//!
//! The image is activated (`in_use` set on disk), and one writer thread marks random 4 KiB
//! writes through a [`Tracker`] at a steady rate, paced millisecond by millisecond (no
//! bursts), while a [`FlushPolicy`] thread flushes the changed regions in the background.
//! In the last flush interval of the run the background flusher is stopped and
//! `prepare_stop` runs while the writes continue; the writes stop (the "VM stop") when it
//! has converged or the duration is up, and `inactivate` writes the rest and clears
//! `in_use`. Only bitmaps are written, never guest data.
//!
//! Crash reasoning for `--log`: each mark's `offset length` line is appended with one
//! write(2) *before* the mark is made. A SIGKILL ends the process but not the kernel: a
//! write(2) that returned is in the page cache and reaches the file, so after a kill the log
//! holds every mark that was made (and maybe one more that was logged but never made). A
//! line without its newline is a write that never returned; its mark was never made, so a
//! reader skips it. (A power failure is another matter: the log is not synced.)
//!
//! Progress lines (`activated`, `stopping`, `inactivating`, `inactivated`) are printed at once, so a drill
//! reading stdout can aim its kill at a phase.
//!
//! With `--durable` the image is activated in durable mode instead (never `in_use`): each
//! write waits for its intent ([`DurableTracker::mark`]) and is logged only after it, so
//! after a kill at any moment the bitmap is consistent and covers every logged write. No
//! background flusher and no `prepare_stop` (there is nothing to prepare): `activated`,
//! `inactivating`, `inactivated`.

use dirty_bitmap::format::BitmapName;
use dirty_bitmap::units::{BytesPerMs, Millis};
use dirty_bitmap::OpenMode;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::{
    BitmapState, BitmapStore, DurableTracker, FlushPolicy, FlushStats, SharedStore, StopReport,
    Tracker,
};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::open::{at, store};
use crate::out::emit;
use crate::CmdResult;

/// Bytes per simulated guest write.
pub const WRITE: u64 = 4096;

/// Options of `dbm workload`.
#[derive(Debug, clap::Args)]
pub struct WorkloadArgs {
    /// The qcow2 image (written in place: activated, flushed, inactivated).
    pub image: PathBuf,
    /// The bitmap to report on; it must exist, be consistent and be enabled. Every enabled
    /// bitmap of the image records the writes, as for a guest.
    #[arg(long)]
    pub bitmap: String,
    /// 4 KiB writes per second, spread evenly over each second.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// Seconds of writes (fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Milliseconds between background flushes.
    #[arg(long, default_value_t = 100)]
    pub flush_interval: u64,
    /// Append one `offset length` line per write to this file, before the write is marked.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Random seed (default: random; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop budget: bytes per millisecond the stop can write (see --downtime-ms).
    #[arg(long, default_value_t = 100_000)]
    pub bandwidth: u64,
    /// Stop budget: milliseconds of downtime. `prepare_stop` flushes until at most
    /// bandwidth × downtime bytes are left for `inactivate`.
    #[arg(long, default_value_t = 10)]
    pub downtime_ms: u64,
    /// Durable mode: the image is activated with `activate_durable` (never `in_use`), each
    /// write waits for its intent to be on disk (a group commit) and is logged only after
    /// that; no background flusher, no `prepare_stop`.
    #[arg(long)]
    pub durable: bool,
}

/// The writer's side: how many writes it made.
struct Writer {
    marks: u64,
    elapsed: Duration,
}

/// Paces `rate` random 4 KiB writes per second on `[0, disk)`, millisecond by millisecond,
/// calling `write(offset, len)` for each, until `stop()` says so or `deadline` passes.
fn paced<E>(
    disk: u64,
    rate: u64,
    deadline: Instant,
    rng: &mut SmallRng,
    mut stop: impl FnMut() -> bool,
    mut write: impl FnMut(u64, u64) -> Result<(), E>,
) -> Result<Writer, E> {
    let start = Instant::now();
    let slots = disk.div_ceil(WRITE);
    let mut marks = 0u64;
    loop {
        let now = Instant::now();
        if stop() || now >= deadline {
            return Ok(Writer {
                marks,
                elapsed: now.duration_since(start),
            });
        }
        // Pace by elapsed time, so a late wake-up catches up in the next millisecond
        // instead of drifting.
        let due =
            u64::try_from(u128::from(rate) * now.duration_since(start).as_nanos() / 1_000_000_000)
                .unwrap_or(u64::MAX);
        while marks < due && !stop() {
            let offset = rng.random_range(0..slots) * WRITE;
            write(offset, WRITE.min(disk - offset))?;
            marks += 1;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Appends `offset len` as one line with one write(2).
fn log_line(f: &mut File, line: &mut String, offset: u64, len: u64) -> std::io::Result<()> {
    use std::fmt::Write as _;
    line.clear();
    let _ = writeln!(line, "{offset} {len}");
    f.write_all(line.as_bytes())
}

/// Marks `rate` random 4 KiB writes per second on `[0, disk)` until `stop` is set or
/// `deadline` passes, each logged to `log` (when given) before it is marked.
fn write_loop(
    tracker: &Tracker,
    disk: u64,
    rate: u64,
    deadline: Instant,
    stop: &AtomicBool,
    mut log: Option<File>,
    rng: &mut SmallRng,
) -> std::io::Result<Writer> {
    let mut line = String::with_capacity(48);
    paced(
        disk,
        rate,
        deadline,
        rng,
        || stop.load(Ordering::Acquire),
        |offset, len| {
            if let Some(f) = log.as_mut() {
                // One write(2): durable against SIGKILL once it returns (page cache).
                log_line(f, &mut line, offset, len)?;
            }
            tracker.mark(offset, len);
            Ok(())
        },
    )
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// `regions R, bytes B, clusters allocated C, syncs S, ms M`.
pub fn stats_line(s: &FlushStats) -> String {
    format!(
        "regions {}, bytes {}, clusters allocated {}, syncs {}, ms {}",
        s.regions,
        s.bytes_written,
        s.clusters_allocated,
        s.syncs,
        ms(s.duration)
    )
}

/// The stop as a whole: `prepare_stop`'s flushes plus `inactivate`.
pub fn stop_line(prep: &StopReport, inactivate: &FlushStats) -> String {
    let mut total = prep.flushed;
    total.accumulate(inactivate);
    format!(
        "rounds {}, bytes {}, syncs {}, ms {}",
        prep.rounds,
        total.bytes_written,
        total.syncs,
        ms(total.duration)
    )
}

fn say(s: &str) -> Result<(), String> {
    // A progress line that cannot be written (stdout on a full disk) must not end the run:
    // it would leave the store active and its bitmaps `in_use` (a full backup next), or
    // report a stop that committed as failed. The line is lost; one warning says so.
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Err(e) = emit(&format!("{s}\n")) {
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            crate::out::errln!("dbm: warning: progress lines are lost, the run goes on: {e}");
        }
    }
    Ok(())
}

/// Durable mode's writer: marks `rate` random 4 KiB writes per second, each through a
/// waiting intent, and logs each only once the intent returned (its bit is on disk).
fn durable_write_loop(
    tracker: &DurableTracker<FileStorage>,
    disk: u64,
    rate: u64,
    deadline: Instant,
    mut log: Option<File>,
    rng: &mut SmallRng,
) -> Result<Writer, String> {
    let mut line = String::with_capacity(48);
    paced(
        disk,
        rate,
        deadline,
        rng,
        || Instant::now() >= deadline,
        |offset, len| {
            tracker
                .mark(offset, len)
                .map_err(|e| format!("intent at {offset}: {e}"))?;
            if let Some(f) = log.as_mut() {
                // After the intent: every logged write's bit is on disk.
                log_line(f, &mut line, offset, len).map_err(|e| e.to_string())?;
            }
            Ok(())
        },
    )
}

/// `dbm workload --durable`: activate_durable, waiting intents, inactivate.
fn run_durable(
    args: &WorkloadArgs,
    mut st: BitmapStore<FileStorage>,
    log: Option<File>,
    seed: u64,
) -> CmdResult {
    let img = &args.image;
    let disk = st.disk_size();
    let name = BitmapName::parse_escaped(&args.bitmap);
    st.activate_durable().map_err(|e| at(img, e))?;
    // A durable store hands out no live bitmap: the bitmap is checked here, as `bitmap`
    // would, and its count read from a copy at the end.
    match st.list().into_iter().find(|b| b.name == name) {
        None => return Err(at(img, dirty_bitmap::Error::NotFound { name }).into()),
        Some(b) if b.state == dirty_bitmap::BitmapState::Inconsistent => {
            return Err(at(
                img,
                dirty_bitmap::Error::Inconsistent { name: name.clone() },
            )
            .into())
        }
        Some(_) => {}
    }
    let store = SharedStore::new(st);
    let tracker = store.durable_tracker().map_err(|e| at(img, e))?;
    say("activated")?;
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let mut rng = SmallRng::seed_from_u64(seed);
    let written = durable_write_loop(&tracker, disk, args.rate, deadline, log, &mut rng)
        .map_err(|e| at(img, e))?;
    drop(tracker);
    say("inactivating")?;
    let fin = store
        .lock()
        .inactivate()
        .map_err(|e| at(img, format!("inactivate: {e}")))?;
    say("inactivated")?;
    let elapsed = written.elapsed.as_secs_f64();
    say(&format!(
        "marks: {} in {elapsed:.2} s ({:.0}/s), each durable before it was logged",
        written.marks,
        written.marks as f64 / elapsed.max(1e-9),
    ))?;
    say(&format!("inactivate: {}", stats_line(&fin)))?;
    let dirty = store
        .lock()
        .load(&name)
        .map_err(|e| at(img, e))?
        .dirty_bytes();
    say(&format!(
        "bitmap {:?}: {dirty} dirty bytes, never in_use",
        args.bitmap,
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `dbm workload`.
pub fn run(args: &WorkloadArgs) -> CmdResult {
    if !(args.duration.is_finite() && args.duration >= 0.0 && args.duration <= 1e9) {
        return Err(format!(
            "--duration {} is not a number of seconds in 0..=1e9",
            args.duration
        )
        .into());
    }
    if args.rate == 0 || args.flush_interval == 0 {
        return Err("--rate and --flush-interval must be at least 1".into());
    }
    let duration = Duration::from_secs_f64(args.duration);
    let flush_every = Duration::from_millis(args.flush_interval);
    let seed = args.seed.unwrap_or_else(rand::random);
    let img = &args.image;

    let mut st = store(img, OpenMode::ReadWrite)?;
    let info = st
        .list()
        .into_iter()
        .find(|b| b.name == BitmapName::parse_escaped(&args.bitmap))
        .ok_or_else(|| {
            at(
                img,
                dirty_bitmap::Error::NotFound {
                    name: BitmapName::parse_escaped(&args.bitmap),
                },
            )
        })?;
    if info.state == BitmapState::Inconsistent {
        return Err(at(
            img,
            format!(
                "bitmap {:?} is inconsistent: its bits cannot be trusted; remove the bitmaps and \
                 add a new one, then back up in full",
                args.bitmap
            ),
        )
        .into());
    }
    if !info.enabled {
        return Err(at(
            img,
            format!(
                "bitmap {:?} is disabled and would record nothing; enable it first",
                args.bitmap
            ),
        )
        .into());
    }
    // Opened before activating, so that a bad path changes nothing on the image.
    let log = match &args.log {
        Some(p) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| at(p, e))?,
        ),
        None => None,
    };
    let disk = st.disk_size();
    if args.durable {
        say(&format!(
            "dbm workload: {}: bitmap {:?}, {disk}-byte disk at {}-byte granularity; {} writes/s \
             of 4 KiB for {} s, durable (each write waits for its intent); seed {seed}",
            img.display(),
            args.bitmap,
            info.granularity,
            args.rate,
            args.duration,
        ))?;
        return run_durable(args, st, log, seed);
    }
    say(&format!(
        "dbm workload: {}: bitmap {:?}, {disk}-byte disk at {}-byte granularity; {} writes/s of \
         4 KiB for {} s, background flush every {} ms, stop budget {} bytes/ms x {} ms; seed {seed}",
        img.display(),
        args.bitmap,
        info.granularity,
        args.rate,
        args.duration,
        args.flush_interval,
        args.bandwidth,
        args.downtime_ms,
    ))?;

    st.activate().map_err(|e| at(img, e))?;
    let bitmap = st
        .bitmap(BitmapName::parse_escaped(&args.bitmap))
        .map_err(|e| at(img, e))?;
    let tracker = st.tracker().map_err(|e| at(img, e))?;
    let store = SharedStore::new(st);
    let flusher = FlushPolicy::every(flush_every)
        .spawn(store.clone())
        .map_err(|e| at(img, e))?;
    say("activated")?;

    let start = Instant::now();
    let deadline = start + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        let tracker = tracker.clone();
        let rate = args.rate;
        thread::Builder::new()
            .name("dbm-writer".into())
            .spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed);
                write_loop(&tracker, disk, rate, deadline, &stop, log, &mut rng)
            })?
    };

    // The stop begins one flush interval before the end, while the writes go on.
    let stop_at = deadline
        .checked_sub(flush_every)
        .unwrap_or(start)
        .max(start);
    while Instant::now() < stop_at && !writer.is_finished() {
        thread::sleep((stop_at - Instant::now()).min(Duration::from_millis(10)));
    }
    let background = flusher.stop();
    say("stopping")?;
    // After a failed background flush the store is poisoned: skip the stop, report below.
    let prep = background.is_ok().then(|| {
        store.lock().prepare_stop(
            BytesPerMs::from_bytes_per_ms(args.bandwidth as f64),
            Millis(args.downtime_ms),
        )
    });
    // The VM stops: no write after this.
    stop.store(true, Ordering::Release);
    let written = writer
        .join()
        .map_err(|_| "the writer thread panicked")?
        .map_err(|e| match &args.log {
            Some(p) => at(p, e),
            None => e.to_string(),
        })?;
    let background = background.map_err(|e| at(img, format!("background flush: {e}")))?;
    let prep = prep
        .ok_or("prepare_stop did not run")?
        .map_err(|e| at(img, format!("prepare_stop: {e}")))?;
    say("inactivating")?;
    let mut st = store.lock();
    let fin = st
        .inactivate()
        .map_err(|e| at(img, format!("inactivate: {e}")))?;
    say("inactivated")?;

    let elapsed = written.elapsed.as_secs_f64();
    say(&format!(
        "marks: {} in {elapsed:.2} s ({:.0}/s){}",
        written.marks,
        written.marks as f64 / elapsed.max(1e-9),
        match &args.log {
            Some(p) => format!(", logged to {}", p.display()),
            None => String::new(),
        }
    ))?;
    say(&format!(
        "background flushes: {}, {}",
        background.flushes,
        stats_line(&background.total)
    ))?;
    say(&format!(
        "prepare_stop: rounds {}, exact queries {}, pending {} against a budget of {} ({}); \
         flushed {}",
        prep.rounds,
        prep.exact_queries,
        prep.pending.get(),
        prep.threshold.get(),
        if prep.converged {
            "converged"
        } else {
            "gave up"
        },
        stats_line(&prep.flushed)
    ))?;
    say(&format!("inactivate: {}", stats_line(&fin)))?;
    say(&format!("stop: {}", stop_line(&prep, &fin)))?;
    say(&format!(
        "bitmap {:?}: {} dirty bytes, saved consistent",
        args.bitmap,
        bitmap.dirty_bytes()
    ))?;
    Ok(ExitCode::SUCCESS)
}
