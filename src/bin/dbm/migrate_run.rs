//! One live migration of a guest with real vCPU threads and the real clock, shared by
//! `dbm demo` (its migration part) and `dbm bench migrate` (one point of the sweep).
//!
//! [`migrate`] fills a guest RAM with distinct page contents, starts the vCPU threads
//! ([`Workload`]) and a destination thread behind a TCP listener on 127.0.0.1
//! ([`TcpDestination`]), runs the precopy loop over the socket ([`migrate_to`]: a
//! rate-limited frame writer, the real clock) and, once the loop returns, compares the
//! destination's RAM with the source's, page by page (CRC32) and byte for byte. The source
//! guest is still stopped then, so its RAM is the RAM at the stop.
//!
//! Lines: the loop's controller turns [`IterationReport`]s into [`Line`]s, one per exact
//! query (a dirty-log sync, QEMU's "dirty sync count") plus, when asked, a progress line
//! every `progress` in between, as polling QEMU's `info migrate` would show.

use std::error::Error;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dirty_bitmap::flush::FlushStats;
use dirty_bitmap::migration::guest::new_log;
use dirty_bitmap::migration::tcp::{
    migrate_to, DestOptions, SourceOptions, SourceReport, TcpDestination,
};
use dirty_bitmap::migration::{
    Bytes, BytesPerMs, Controller, Directive, GuestRam, IterationReport, Kind, LoopConfig,
    MigrationState, Millis, Pattern, Pending, RamState, SetupMode, StallAction, StallReport, Vm,
    Workload, WorkloadConfig, PAGE_SIZE, RAM_ID,
};
use dirty_bitmap::migration::{
    DestState, SharedDestState, SharedDiskDest, SharedDiskState, StreamDiskDest, StreamDiskState,
};
use dirty_bitmap::migration::{DiskGuest as Guest, DiskWriter, DISK_WRITE};
use dirty_bitmap::rng::SplitMix64;
use dirty_bitmap::storage::{FileStorage, Storage};
use dirty_bitmap::{
    BitmapInfo, BitmapState, BitmapStore, DirtyBitmap, OpenMode, Recording, SharedStore,
};

use crate::open::at;
use crate::size::human;

type Res<T> = Result<T, Box<dyn Error>>;

/// Page size as u64.
pub const PAGE: u64 = PAGE_SIZE as u64;

/// One migration's parameters.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Guest RAM in bytes (a multiple of 4 KiB).
    pub ram_bytes: u64,
    /// vCPU threads.
    pub vcpus: usize,
    /// Guest page writes per second, over all vCPUs (each write fills one 4 KiB page).
    pub writes_per_sec: u64,
    /// Where they land.
    pub pattern: Pattern,
    /// The loop's rate limit (`max-bandwidth`), bytes per second.
    pub max_bandwidth: u64,
    /// Downtime limit.
    pub downtime_limit: Millis,
    /// Pages per batch.
    pub batch_pages: usize,
    /// Auto-converge: on a stall, throttle the vCPUs 20 % more (up to 99 %); else give up
    /// on the first stall.
    pub auto_converge: bool,
    /// Give up (cancel) after this long.
    pub time_cap: Option<Duration>,
    /// A progress line at most this often between syncs (`None`: sync lines only).
    pub progress: Option<Duration>,
    /// Seed of the RAM contents and the vCPUs' page choice.
    pub seed: u64,
}

/// Where the disk's bitmaps migrate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DiskMode {
    /// Both hosts see one image ([`SharedDiskState`], [`SharedDiskDest`]).
    #[default]
    Shared,
    /// The destination has an image of its own (`<image>-dest.qcow2`, created empty, the
    /// same disk size); the bitmaps travel in the migration stream ([`StreamDiskState`],
    /// [`StreamDiskDest`]).
    Stream,
    /// Shared storage with the store in durable mode on both hosts
    /// ([`BitmapStore::activate_durable`], [`SharedDiskDest::durable`]): the writer's marks
    /// wait for group commits, 64 in flight ([`DiskWriter::start_durable`]), and the stop
    /// has nothing left to write. QEMU has no such mode: no baseline.
    Durable,
}

impl DiskMode {
    /// `shared`, `stream` or `durable`.
    pub fn name(self) -> &'static str {
        match self {
            DiskMode::Shared => "shared",
            DiskMode::Stream => "stream",
            DiskMode::Durable => "durable",
        }
    }
}

/// A disk whose bitmaps live in a qcow2 image, migrated beside the RAM (on storage both
/// hosts share, or in the stream: [`DiskMode`]), with a writer marking it throughout.
#[derive(Debug, Clone)]
pub struct DiskParams {
    /// The image to create (replaced if it exists).
    pub image: PathBuf,
    /// Shared storage or the bitmaps in the stream.
    pub mode: DiskMode,
    /// Virtual disk size.
    pub disk_size: u64,
    /// Bytes per bit.
    pub granularity: u64,
    /// Bitmaps, all enabled (every write marks each).
    pub bitmaps: usize,
    /// 4 KiB disk writes per second (each marked, then logged).
    pub writes_per_sec: u64,
    /// QEMU's way, as the benchmark's baseline. Shared: no flush before the stop, the whole
    /// bitmaps rewritten inside the downtime ([`SharedDiskState::qemu_baseline`]). Stream:
    /// nothing sent before the stop, every bitmap whole at it
    /// ([`StreamDiskState::qemu_baseline`]).
    pub qemu_baseline: bool,
    /// The destination refuses to start: a failed hand-over, after which the source must
    /// resume with every mark.
    pub refuse: bool,
}

/// What the disk part of a run did.
#[derive(Debug, Clone, Default)]
pub struct DiskRun {
    /// Disk writes marked during the migration.
    pub marks: u64,
    /// Of which not dirty where they must be: on disk as the destination opens the image
    /// (hand-over), or in the source's bitmaps and then on disk (failure). Must be 0.
    pub marks_lost: u64,
    /// Bytes the precopy flushes wrote.
    pub flushed: Bytes,
    /// The stop's disk work inside the downtime.
    pub stop: FlushStats,
    /// The disk stop time the switchover was decided with.
    pub disk_time_at_switch: Option<Millis>,
    /// Shared storage: of that, the destination's activate as the source timed it for
    /// the same figure (`Pending::dest_disk_time`).
    pub dest_time_estimate: Option<Millis>,
    /// Whether the source store was active again after the run (a failed hand-over).
    pub source_active_after: bool,
    /// Whether the destination opened the image writable after the hand-over (the source
    /// released its write locks).
    pub destination_opened: bool,
    /// `qemu-img check` on the image afterwards.
    pub qemu_check: String,
    /// The destination's open and activate of the image (after End, before Started: inside
    /// the downtime), when it ran. In stream mode it stores the received bitmaps too.
    pub dest_activate: Option<Duration>,
    /// Stream mode: the bitmap sections' wire bytes at the stop (inside the downtime).
    pub stream_bytes_in_downtime: Option<Bytes>,
    /// Stream mode: regions sent, over the whole migration (resends included).
    pub stream_regions_sent: u64,
}

/// The destination's disk state, timing its take-over ([`DestState::before_start`]: open
/// and activate the image), which falls inside the downtime.
#[derive(Debug)]
struct TimedDest<D> {
    inner: Arc<Mutex<D>>,
    took: Arc<Mutex<Option<Duration>>>,
}

impl<D> TimedDest<D> {
    fn inner(&self) -> std::sync::MutexGuard<'_, D> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<D: DestState> DestState for TimedDest<D> {
    fn name(&self) -> &str {
        "disk-bitmaps"
    }
    fn hello(
        &mut self,
        id: dirty_bitmap::migration::StateId,
        binding: dirty_bitmap::migration::Binding,
    ) -> dirty_bitmap::migration::Result<()> {
        self.inner().hello(id, binding)
    }
    fn section(&mut self, payload: &[u8]) -> dirty_bitmap::migration::Result<Option<Vec<u8>>> {
        self.inner().section(payload)
    }
    fn switchover(&mut self, postcopy: bool) {
        self.inner().switchover(postcopy);
    }
    fn before_start(&mut self) -> dirty_bitmap::migration::Result<()> {
        let t = Instant::now();
        let r = self.inner().before_start();
        *self.took.lock().unwrap_or_else(|e| e.into_inner()) = Some(t.elapsed());
        r
    }
    fn failed(&mut self) {
        self.inner().failed();
    }
    fn failed_after_start(&mut self) {
        self.inner().failed_after_start();
    }
    fn push_ended(&mut self) {
        self.inner().push_ended();
    }
}

/// A fresh image for `d`: its bitmaps added and active.
fn disk_store(d: &DiskParams) -> Res<SharedStore<FileStorage>> {
    let _ = std::fs::remove_file(&d.image);
    let mut s = BitmapStore::create(FileStorage::create(&d.image)?, d.disk_size, 65536)?;
    for i in 0..d.bitmaps {
        s.add(&format!("b{i}"), d.granularity, Recording::Enabled)?;
    }
    if d.mode == DiskMode::Durable {
        s.activate_durable()?;
    } else {
        s.activate()?;
    }
    Ok(SharedStore::new(s))
}

/// The source's disk state.
enum DiskSource {
    Shared(Box<SharedDiskState<FileStorage>>),
    Stream(StreamDiskState),
}

/// The destination's disk state: the shared image's, or (stream mode) one over an image of
/// its own, and that image.
enum DestSide {
    Shared(Arc<Mutex<SharedDiskDest<FileStorage>>>),
    Stream(Arc<Mutex<StreamDiskDest<FileStorage>>>, PathBuf),
}

/// The destination's side for `d`; in stream mode a fresh empty image of the same disk
/// size next to the source's (`<image stem>-dest.qcow2`).
fn dest_side(d: &DiskParams) -> Res<DestSide> {
    Ok(match d.mode {
        // Source and destination run in this process: one host, one page cache.
        DiskMode::Durable => DestSide::Shared(Arc::new(Mutex::new(
            SharedDiskDest::file_on_one_host("disk-bitmaps", d.image.clone()).durable(),
        ))),
        DiskMode::Shared => {
            let dest = SharedDiskDest::file_on_one_host("disk-bitmaps", d.image.clone());
            // QEMU's destination loads the bitmaps whole at its activate.
            DestSide::Shared(Arc::new(Mutex::new(if d.qemu_baseline {
                dest.without_preload()
            } else {
                dest
            })))
        }
        DiskMode::Stream => {
            let stem = d
                .image
                .file_stem()
                .map_or_else(|| "disk".into(), |s| s.to_string_lossy().into_owned());
            let img = d.image.with_file_name(format!("{stem}-dest.qcow2"));
            let _ = std::fs::remove_file(&img);
            drop(BitmapStore::create(
                FileStorage::create(&img)?,
                d.disk_size,
                65536,
            )?);
            DestSide::Stream(
                Arc::new(Mutex::new(StreamDiskDest::file(
                    "disk-bitmaps",
                    img.clone(),
                ))),
                img,
            )
        }
    })
}

/// The bitmaps of `store` whose marks are counted: the enabled ones. One that is
/// inconsistent in `store` records nothing (`activate` leaves it alone), so a count over it
/// would say nothing: an error, never a bitmap left out. A disabled one, consistent or not,
/// is not counted; and a store with none counted is an error, since a count over no bitmap
/// finds every mark present (the bitmap that was to hold them disabled or gone).
fn counted<S: Storage>(store: &BitmapStore<S>) -> Result<Vec<BitmapInfo>, String> {
    let mut counted = Vec::new();
    for b in store.list().into_iter().filter(|b| b.enabled) {
        if b.state != BitmapState::Consistent {
            return Err(format!(
                "bitmap {} is enabled but inconsistent: it records nothing",
                b.name
            ));
        }
        counted.push(b);
    }
    if counted.is_empty() {
        return Err(
            "no enabled bitmap records the guest's writes: no mark can be counted".to_string(),
        );
    }
    Ok(counted)
}

/// The [`counted`] bitmaps of `store` as it holds them: in memory while it is active.
/// Once it is inactive, [`counted_on_disk`] is what the disk holds.
pub fn counted_in_store<S: Storage>(store: &BitmapStore<S>) -> Result<Vec<DirtyBitmap>, String> {
    counted(store)?
        .iter()
        .map(|info| {
            store
                .load(&info.name)
                .map_err(|e| format!("bitmap {}: {e}", info.name))
        })
        .collect()
}

/// The [`counted`] bitmaps of `store` as the image at `path` holds them on disk: read
/// through a fresh read-only open with QEMU's force-share locking (`store`, inactive, still
/// holds the image), never through `store`, whose load of an inactive bitmap is its parked
/// in-memory copy ORed with the disk, so a mark the stop failed to write would count as
/// present. A bitmap `store` holds consistent that is missing there, or in use (the stop
/// did not leave it consistent), is an error; one inconsistent before the run stays in use,
/// as `activate` left it, and is not looked at.
pub fn counted_on_disk<S: Storage>(
    store: &BitmapStore<S>,
    path: &std::path::Path,
) -> Result<Vec<DirtyBitmap>, String> {
    let disk = FileStorage::open_shared(path)
        .and_then(|f| BitmapStore::open(f, OpenMode::ReadOnly))
        .map_err(|e| at(path, e))?;
    let on_disk = disk.list();
    for b in store
        .list()
        .into_iter()
        .filter(|b| b.state == BitmapState::Consistent)
    {
        if on_disk.iter().any(|d| d.name == b.name && d.in_use) {
            return Err(at(path, format!("bitmap {} is in use on disk", b.name)));
        }
    }
    counted(store)?
        .iter()
        .map(|info| {
            disk.load(&info.name)
                .map_err(|e| at(path, format!("bitmap {}: {e}", info.name)))
        })
        .collect()
}

/// Whether the mark of a `len`-byte write at `offset` is missing from `b`: it is there only
/// if every byte of it up to the disk's end is dirty (below 4 KiB granularity a write sets
/// several bits, and any of them may be the one lost; a write the disk's end cuts short, on
/// a disk under 4 KiB, is there up to the end, as the writer marks it), and one starting
/// past the disk's end is in no bit (a log of another, larger disk).
pub fn mark_missing(b: &DirtyBitmap, offset: u64, len: u64) -> bool {
    let end = offset.saturating_add(len).min(b.disk_size());
    offset >= b.disk_size() || b.next_clean(offset).is_some_and(|c| c < end)
}

/// Marks of `marks` (the offsets of [`DISK_WRITE`]-byte writes) missing
/// ([`mark_missing`]), summed over `bitmaps` ([`counted_in_store`], [`counted_on_disk`]).
pub fn lost_marks(bitmaps: &[DirtyBitmap], marks: &[u64]) -> u64 {
    bitmaps
        .iter()
        .map(|b| {
            marks
                .iter()
                .filter(|&&o| mark_missing(b, o, DISK_WRITE))
                .count() as u64
        })
        .sum()
}

/// What [`qemu_check`] says on a machine without `qemu-img`: the demo needs nothing but
/// itself.
pub const QEMU_IMG_MISSING: &str = "not run: qemu-img is not installed (package qemu-utils)";

/// `qemu-img check` on `path`: "clean", what it said otherwise, [`QEMU_IMG_MISSING`]
/// without qemu-img, or "not run" and why.
pub fn qemu_check(path: &std::path::Path) -> String {
    match std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
    {
        Ok(out) if out.status.code() == Some(0) => "clean".into(),
        Ok(out) => format!(
            "exit {:?}: {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => QEMU_IMG_MISSING.into(),
        Err(e) => format!("not run: {e}"),
    }
}

/// A [`qemu_check`] result as a verdict: clean, or qemu-img not installed, passes; anything
/// else (a corruption, a leak, qemu-img failing to run) is an error naming `path`.
///
/// # Errors
/// As above.
pub fn require_clean(q: &str, path: &std::path::Path) -> Res<()> {
    if q == "clean" || q == QEMU_IMG_MISSING {
        Ok(())
    } else {
        Err(format!("qemu-img check {}: {q}", path.display()).into())
    }
}

impl Params {
    /// Pages of guest RAM.
    pub fn pages(&self) -> u64 {
        self.ram_bytes / PAGE
    }
}

/// One `info migrate`-like line.
#[derive(Debug, Clone, Copy)]
pub struct Line {
    /// Time since the migration started.
    pub at: Duration,
    /// Exact queries (dirty-log syncs) so far, this one included.
    pub syncs: u64,
    /// Whether this line is a sync (exact figure) or a progress line (estimate).
    pub exact: bool,
    /// Pending bytes the loop saw (exact or estimate), control message included.
    pub pending: Bytes,
    /// Threshold: bandwidth × downtime limit.
    pub threshold: Bytes,
    /// Last measured bandwidth.
    pub bandwidth: BytesPerMs,
    /// The guest's dirty rate as of the last sync, as QEMU's dirty-pages-rate: the pages
    /// the sync found newly dirty (not already pending), in wire bytes, over the time since
    /// the previous sync. `None` before the second sync.
    pub dirty_rate: Option<BytesPerMs>,
    /// Pages put on the wire so far (a page sent twice counts twice).
    pub pages_sent: u64,
    /// vCPU throttle, percent.
    pub throttle: u8,
}

impl Line {
    /// Expected downtime if the loop switched over now: pending / bandwidth, in ms
    /// (`None` before the first bandwidth measurement).
    pub fn expected_downtime_ms(&self) -> Option<f64> {
        (self.bandwidth.get() > 0.0).then(|| self.pending.get() as f64 / self.bandwidth.get())
    }
}

/// How the run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Precopy switchover; the destination runs the guest.
    Converged,
    /// The stall guard reported and the run gave up (no auto-converge, or fully
    /// throttled): the source keeps running.
    Stalled,
    /// Cancelled at the time cap: the source keeps running.
    TimeCap,
    /// The loop failed; its error.
    Failed(String),
}

/// What one migration did.
#[derive(Debug, Clone)]
pub struct Run {
    /// The parameters.
    pub params: Params,
    /// How it ended.
    pub end: End,
    /// The lines, in order.
    pub lines: Vec<Line>,
    /// Loop turns.
    pub iterations: u64,
    /// Exact queries (syncs).
    pub syncs: u64,
    /// Downtime (VM stop to the destination's `Started`), for a switchover.
    pub downtime: Option<Duration>,
    /// Bytes sent during the downtime, for a switchover.
    pub bytes_in_downtime: Option<Bytes>,
    /// Pending figure and threshold the switchover was decided on, and the exact query's
    /// time that threshold took off the limit.
    pub switch: Option<(Pending, Bytes, Millis)>,
    /// The exact figure again just after the VM stopped: the decision's figure plus what
    /// the guest wrote between that sync and the stop. The downtime sends at most this.
    pub at_stop: Option<Pending>,
    /// From the start of the loop to its end.
    pub total_time: Duration,
    /// Bytes on the wire.
    pub bytes_sent: Bytes,
    /// Pages sent, resends included.
    pub pages_sent: u64,
    /// Guest page writes during the migration.
    pub guest_writes: u64,
    /// Final vCPU throttle, percent.
    pub throttle: u8,
    /// For a switchover: pages compared, and whether every page of the destination equals
    /// the source's at the stop (CRC32 per page and a full compare).
    pub verified: Option<(u64, bool)>,
    /// The transport: what carried the stream.
    pub transport: &'static str,
    /// The disk part, if the run had one.
    pub disk: Option<DiskRun>,
}

impl Run {
    /// Pages sent more than once: everything beyond the first full pass.
    pub fn pages_resent(&self) -> u64 {
        self.pages_sent.saturating_sub(self.params.pages())
    }

    /// Whether the run switched over.
    pub fn converged(&self) -> bool {
        self.end == End::Converged
    }
}

/// The controller: lines, the time cap, and the stall policy.
struct Watch<'a> {
    params: Params,
    pages_sent: Arc<AtomicU64>,
    /// Exact queries (syncs) so far.
    syncs: u64,
    /// The last sync's dirty rate, shown until the next.
    dirty_rate: Option<BytesPerMs>,
    last_line: Option<Duration>,
    lines: Vec<Line>,
    on_line: &'a mut dyn FnMut(&Line),
    stalled: bool,
    capped: bool,
    start: Instant,
    /// Loop turns seen (the loop's own count is lost when it returns an error).
    turns: u64,
    /// Bytes on the wire as of the last turn (likewise).
    bytes_sent: u64,
}

impl Controller for Watch<'_> {
    fn on_iteration(&mut self, r: &IterationReport) -> Directive {
        self.turns += 1;
        self.bytes_sent = r.bytes_sent.get();
        if r.exact {
            self.syncs += 1;
            self.dirty_rate = r.dirty_rate;
        }
        let due = match (self.params.progress, self.last_line) {
            (Some(_), None) => true,
            (Some(every), Some(t)) => r.at >= t + every,
            (None, _) => false,
        };
        if r.exact || due {
            let line = Line {
                at: r.at,
                syncs: self.syncs,
                exact: r.exact,
                pending: if r.exact {
                    r.pending.total()
                } else {
                    r.estimate
                },
                threshold: r.threshold,
                bandwidth: r.bandwidth,
                dirty_rate: self.dirty_rate,
                pages_sent: self.pages_sent.load(Ordering::Relaxed),
                throttle: r.throttle,
            };
            self.last_line = Some(r.at);
            (self.on_line)(&line);
            self.lines.push(line);
        }
        if self
            .params
            .time_cap
            .is_some_and(|cap| self.start.elapsed() >= cap)
        {
            self.capped = true;
            return Directive::Cancel;
        }
        Directive::Continue
    }

    fn on_stall(&mut self, r: &StallReport) -> StallAction {
        if self.params.auto_converge && r.throttle < 99 {
            StallAction::Throttle(r.throttle.saturating_add(20).min(99))
        } else {
            self.stalled = true;
            StallAction::Cancel
        }
    }
}

/// Runs one migration with `params`, calling `on_line` for every line as it happens.
///
/// # Errors
/// Bad parameters (RAM size, vCPUs, batch), a mapping or thread that cannot be created.
/// A migration that fails or gives up is not an error: see [`Run::end`].
pub fn migrate(
    params: &Params,
    disk: Option<&DiskParams>,
    on_line: &mut dyn FnMut(&Line),
) -> Res<Run> {
    if params.ram_bytes == 0 || !params.ram_bytes.is_multiple_of(PAGE) {
        return Err(format!(
            "guest RAM of {} bytes is not a positive multiple of 4 KiB",
            params.ram_bytes
        )
        .into());
    }
    // The loop's window is 100 ms: a lower rate could never send a byte.
    if params.max_bandwidth < 10 {
        return Err("the bandwidth must be at least 10 bytes/s (1 byte per 100 ms)".into());
    }
    let pages = params.pages();
    let ram = Arc::new(GuestRam::new(pages)?);
    let log = Arc::new(new_log(&ram)?);
    // Distinct contents, so that a page the destination missed shows.
    let mut init = SplitMix64::new(params.seed ^ 0x1417);
    for p in 0..pages {
        ram.fill_page(p, init.next_u64());
    }
    let mut vm = Workload::start(
        Arc::clone(&ram),
        Arc::clone(&log),
        WorkloadConfig {
            vcpus: params.vcpus,
            writes_per_sec: params.writes_per_sec,
            pattern: params.pattern,
            seed: params.seed,
        },
    )?;
    let mut state = RamState::new(
        RAM_ID,
        Arc::clone(&ram),
        Arc::clone(&log),
        SetupMode::Full,
        false,
        params.batch_pages,
    )?;
    let config = LoopConfig {
        downtime_limit: params.downtime_limit,
        max_bandwidth: Some(BytesPerMs::from_bytes_per_sec(params.max_bandwidth)),
        iterate_chunk: Bytes((params.batch_pages as u64 * PAGE * 4).max(1 << 20)),
        ..LoopConfig::default()
    };
    let mut watch = Watch {
        params: *params,
        pages_sent: state.pages_sent_counter(),
        syncs: 0,
        dirty_rate: None,
        last_line: None,
        lines: Vec::new(),
        on_line,
        stalled: false,
        capped: false,
        start: Instant::now(),
        turns: 0,
        bytes_sent: 0,
    };
    let writes_before = vm.writes();
    if disk.is_some_and(|d| d.mode == DiskMode::Durable && d.qemu_baseline) {
        return Err("QEMU has no durable mode: no baseline for it".into());
    }
    let store = disk.map(disk_store).transpose()?;
    let writer = match (disk, &store) {
        (Some(d), Some(s)) if d.mode == DiskMode::Durable => Some(DiskWriter::start_durable(
            s.durable_tracker()?,
            d.disk_size,
            d.writes_per_sec,
            params.seed,
            None,
        )),
        (Some(d), Some(s)) => Some(DiskWriter::start(
            s.lock().tracker()?,
            d.disk_size,
            d.writes_per_sec,
            params.seed,
            None,
        )),
        _ => None,
    };
    let mut disk_state = match (disk, &store) {
        (Some(d), Some(s)) => Some(match (d.mode, d.qemu_baseline) {
            (DiskMode::Shared | DiskMode::Durable, true) => DiskSource::Shared(Box::new(
                SharedDiskState::qemu_baseline(2, "disk-bitmaps", s.clone()),
            )),
            (DiskMode::Shared | DiskMode::Durable, false) => {
                DiskSource::Shared(Box::new(SharedDiskState::new(2, "disk-bitmaps", s.clone())))
            }
            (DiskMode::Stream, true) => DiskSource::Stream(
                StreamDiskState::qemu_baseline_from_store(2, "disk-bitmaps", &s.lock())?,
            ),
            (DiskMode::Stream, false) => {
                DiskSource::Stream(StreamDiskState::from_store(2, "disk-bitmaps", &s.lock())?)
            }
        }),
        _ => None,
    };

    // The transport: a destination thread behind a TCP listener on 127.0.0.1, the loop
    // over a rate-limited frame writer on the socket.
    // On shared storage the destination opens the same image, after End and before it
    // answers Started; in stream mode it opens an image of its own then and stores the
    // bitmaps it received into it.
    let disk_dest = disk.map(dest_side).transpose()?;
    let dest_activate = Arc::new(Mutex::new(None));
    let took = Arc::clone(&dest_activate);
    let dest = TcpDestination::spawn(DestOptions {
        max_ram_bytes: Bytes(params.ram_bytes),
        seed: params.seed,
        refuse_attempts: u32::from(disk.is_some_and(|d| d.refuse)),
        states: disk_dest
            .iter()
            .map(|d| match d {
                DestSide::Shared(d) => Arc::new(Mutex::new(TimedDest {
                    inner: Arc::clone(d),
                    took: Arc::clone(&took),
                })) as SharedDestState,
                DestSide::Stream(d, _) => Arc::new(Mutex::new(TimedDest {
                    inner: Arc::clone(d),
                    took: Arc::clone(&took),
                })) as SharedDestState,
            })
            .collect(),
        ..DestOptions::default()
    })?;
    let mut states: Vec<&mut dyn MigrationState> = vec![&mut state];
    match disk_state.as_mut() {
        Some(DiskSource::Shared(d)) => states.push(d.as_mut()),
        // The stream first: its first pass goes out before RAM's, as QEMU's block states
        // come before RAM.
        Some(DiskSource::Stream(d)) => states.insert(0, d),
        None => {}
    }
    let result = migrate_to(
        dest.addr(),
        &SourceOptions {
            loop_config: config,
            ..SourceOptions::default()
        },
        &mut Guest {
            vcpus: &mut vm,
            disk: writer.as_ref(),
        },
        &mut states,
        &mut watch,
    );
    drop(states);
    let guest_writes = vm.writes() - writes_before;
    let report = dest.join()?;
    let mut run = Run {
        params: *params,
        end: End::Failed(String::new()),
        lines: std::mem::take(&mut watch.lines),
        iterations: watch.turns,
        syncs: watch.syncs,
        downtime: None,
        bytes_in_downtime: None,
        switch: None,
        at_stop: None,
        total_time: watch.start.elapsed(),
        bytes_sent: Bytes(0),
        pages_sent: state.stats().pages_sent,
        guest_writes,
        throttle: 0,
        verified: None,
        transport: "TCP on 127.0.0.1",
        disk: None,
    };
    match (disk, &store, writer, &disk_state, &disk_dest) {
        (Some(d), Some(store), Some(writer), Some(DiskSource::Stream(ds)), Some(side)) => {
            let mut dr = DiskRun {
                dest_activate: *dest_activate.lock().unwrap_or_else(|e| e.into_inner()),
                stream_regions_sent: ds.regions_sent(),
                ..DiskRun::default()
            };
            if let Ok(SourceReport { outcome, .. }) = &result {
                dr.disk_time_at_switch = Some(outcome.pending_at_switch.disk_time);
                if matches!(outcome.kind, Kind::Completed | Kind::Postcopy) {
                    dr.stream_bytes_in_downtime = Some(ds.complete_bytes());
                }
            }
            let taken = match side {
                DestSide::Stream(dd, _) => {
                    dd.lock().unwrap_or_else(|e| e.into_inner()).take_store()
                }
                DestSide::Shared(_) => None,
            };
            // The guest is stopped (or, after a failure, resumed; its writer stops here) and
            // its disk writes drained.
            let marks = writer.shutdown();
            dr.marks = marks.len() as u64;
            match taken {
                Some(mut dst) => {
                    // The destination took over: its own image holds every mark.
                    dr.destination_opened = true;
                    dr.marks_lost = lost_marks(&counted_in_store(&dst)?, &marks);
                    dst.inactivate()?;
                }
                None => {
                    // The source kept its bitmaps: every mark is in its memory.
                    dr.marks_lost = lost_marks(&counted_in_store(&store.lock())?, &marks);
                }
            }
            // The source's image is its own in stream mode: it stays active until here.
            let mut st = store.lock();
            dr.source_active_after = st.is_active();
            if st.is_active() {
                st.inactivate()?;
            }
            drop(st);
            dr.qemu_check = match side {
                DestSide::Stream(_, img) if dr.destination_opened => qemu_check(img),
                _ => qemu_check(&d.image),
            };
            run.disk = Some(dr);
        }
        (Some(d), Some(store), Some(writer), Some(DiskSource::Shared(ds)), _) => {
            let mut dr = DiskRun {
                flushed: Bytes(ds.flushed().bytes_written),
                stop: ds.disk_stop(),
                dest_activate: *dest_activate.lock().unwrap_or_else(|e| e.into_inner()),
                ..DiskRun::default()
            };
            if let Ok(SourceReport { outcome, .. }) = &result {
                let p = outcome.pending_at_switch;
                dr.disk_time_at_switch = Some(p.disk_time);
                // QEMU's way counts no destination time: no figure, not a zero.
                dr.dest_time_estimate =
                    Some(p.dest_disk_time).filter(|t| *t < Millis::MAX && !d.qemu_baseline);
            }
            dr.source_active_after = store.lock().is_active();
            if ds.handed_over() {
                // The guest is stopped and its disk writes drained: the destination opens the
                // image writable (the source released its write locks), activates, and finds
                // every mark; then it hands the image back clean.
                let marks = writer.shutdown();
                dr.marks = marks.len() as u64;
                let taken = match &disk_dest {
                    Some(DestSide::Shared(d)) => {
                        d.lock().unwrap_or_else(|e| e.into_inner()).take_store()
                    }
                    _ => None,
                };
                if let Some(mut dst) = taken {
                    dr.destination_opened = true;
                    dr.marks_lost = lost_marks(&counted_in_store(&dst)?, &marks);
                    dst.inactivate()?;
                }
            } else {
                // The source kept (or took back) its bitmaps and resumed: every mark is in
                // its memory, and on disk once it stops.
                let marks = writer.shutdown();
                dr.marks = marks.len() as u64;
                let mut st = store.lock();
                dr.marks_lost = lost_marks(&counted_in_store(&st)?, &marks);
                st.inactivate()?;
                dr.marks_lost += lost_marks(&counted_on_disk(&st, &d.image)?, &marks);
            }
            dr.qemu_check = qemu_check(&d.image);
            run.disk = Some(dr);
        }
        _ => {}
    }
    match result {
        Ok(SourceReport { outcome: o, wire }) => {
            run.iterations = o.iterations;
            run.total_time = o.total_time;
            run.throttle = o.throttle;
            run.bytes_sent = wire.bytes;
            match o.kind {
                Kind::Completed | Kind::Postcopy => {
                    // The stop syncs once more.
                    run.syncs += 1;
                    run.end = End::Converged;
                    run.downtime = Some(o.downtime);
                    run.bytes_in_downtime = Some(o.bytes_in_downtime);
                    run.switch = Some((
                        o.pending_at_switch,
                        o.threshold_at_switch,
                        o.query_time_at_switch,
                    ));
                    run.at_stop = Some(o.pending_at_stop);
                    // The source is stopped: its RAM is the RAM at the stop.
                    let same = report
                        .guest
                        .as_ref()
                        .is_some_and(|g| same_ram(&ram, g.ram()));
                    run.verified = Some((pages, same));
                    vm.resume()?;
                }
                Kind::NotConverging => run.end = End::Stalled,
            }
        }
        Err(e) => {
            run.end = if watch.capped {
                End::TimeCap
            } else if watch.stalled {
                End::Stalled
            } else {
                // The destination's error says more about a broken stream than the
                // source's view of it.
                let dest_err = report.attempts.iter().find_map(|a| a.error.as_ref());
                End::Failed(match dest_err {
                    Some(d) => format!("{e} (destination: {d})"),
                    None => e.to_string(),
                })
            };
            run.bytes_sent = Bytes(watch.bytes_sent);
        }
    }
    vm.shutdown();
    Ok(run)
}

/// Whether `dest` holds exactly the pages of `ram`: CRC32 per page, then every byte.
fn same_ram(ram: &GuestRam, dest: &[u8]) -> bool {
    if dest.len() as u64 != ram.size() {
        return false;
    }
    let mut page = vec![0u8; PAGE_SIZE];
    dest.chunks_exact(PAGE_SIZE).enumerate().all(|(p, d)| {
        ram.read_page(p as u64, &mut page);
        crc32fast::hash(&page) == crc32fast::hash(d) && page == d
    })
}

/// Bytes per ms as MiB/s.
pub fn mib_s(rate: BytesPerMs) -> f64 {
    rate.get() * 1000.0 / (1 << 20) as f64
}

/// The header of the [`Line`] table.
pub fn line_header() -> String {
    format!(
        "{:>8} {:>4} {:>5} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10} {:>8}",
        "time ms",
        "sync",
        "",
        "pending",
        "threshold",
        "bandwidth",
        "dirty rate",
        "exp. down",
        "pages sent",
        "throttle"
    )
}

/// One [`Line`] under [`line_header`]: `exact` for a sync, `est.` for a progress line;
/// rates in MiB/s, the expected downtime in ms.
pub fn format_line(l: &Line) -> String {
    let down = l
        .expected_downtime_ms()
        .map_or_else(|| "-".to_string(), |ms| format!("{ms:.0} ms"));
    format!(
        "{:>8.0} {:>4} {:>5} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10} {:>7} %",
        l.at.as_secs_f64() * 1000.0,
        l.syncs,
        if l.exact { "exact" } else { "est." },
        human(l.pending.get()),
        human(l.threshold.get()),
        format!("{:.1} MiB/s", mib_s(l.bandwidth)),
        l.dirty_rate
            .map_or_else(|| "-".to_string(), |r| format!("{:.1} MiB/s", mib_s(r))),
        down,
        l.pages_sent,
        l.throttle
    )
}

/// The load average (1, 5, 15 min) from `/proc/loadavg` ("unknown" elsewhere).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// CPU model, CPU count and kernel, as far as `/proc` tells.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "{cpu}, {} CPUs, kernel {kernel}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}
