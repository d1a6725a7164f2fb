//! `dbm drill migrate`: the failure matrix of a migration whose disk bitmaps are written
//! throughout, over TCP, in both modes (shared storage: [`SharedDiskState`] and
//! [`SharedDiskDest`] on one image; stream: [`StreamDiskState`] to a destination with its
//! own image, [`StreamDiskDest`]).
//!
//! Each case runs a guest (vCPU threads writing RAM, a disk writer marking the source
//! image's bitmap and logging each write after its mark returned, both stopping at VM
//! stop) through a TCP proxy that can cut the link, with a fault state in the stream that
//! injects the failure at its point of the protocol:
//!
//! | failure | how |
//! |---|---|
//! | `cancel` | the controller cancels before the switchover |
//! | `cut-before-end` | in the downtime, before End: the proxy cuts both ways, the source's send fails |
//! | `cut-after-end` | End goes through; the proxy swallows the answer and closes: [`MigrationError::OutcomeUnknown`], the source stays stopped |
//! | `refuse` | the destination refuses to start |
//! | `dest-crash` | the destination takes over (activates), then dies before Started: the source learns it is gone, re-dirties, takes its bitmaps back and resumes |
//! | `after-start` | postcopy: after Started the proxy cuts: [`MigrationError::AfterStart`], the source never takes its bitmaps back |
//!
//! After each: every logged disk write must be dirty where the bitmap now lives (the source's
//! memory, then its image after its own stop; or the destination's image), `qemu-img check`
//! must be clean, and where the source kept the guest a retry (no faults) must hand over.
//! One line per case; the exit status is 2 on any lost mark, corruption or failed retry.

use crate::work_dir::WorkDir;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, ValueEnum};
use dirty_bitmap::migration::guest::new_log;
use dirty_bitmap::migration::tcp::{
    migrate_in_session, DestOptions, Session, SourceOptions, TcpDestination,
};
use dirty_bitmap::migration::{
    AutoConverge, Bytes, BytesPerMs, Controller, DestState, Directive, GuestRam, IterationReport,
    Kind, LoopConfig, MigrationError, MigrationState, Outbound, Pattern, Pending, RamState,
    SetupMode, SharedDestState, SharedDiskDest, SharedDiskState, StallAction, StallReport, StateId,
    StreamDiskDest, StreamDiskState, Vm, Workload, WorkloadConfig, RAM_ID,
};
use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::{BitmapStore, OpenMode, Recording, SharedStore};

use crate::migrate_run::{counted_in_store, lost_marks, qemu_check};
use crate::out::outln;
use crate::CmdResult;
use dirty_bitmap::migration::{DiskGuest, DiskWriter};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const DISK: u64 = 64 << 30;
const PAGES: u64 = 512;

/// Which disk-bitmap modes to drill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// One image both hosts see.
    Shared,
    /// The bitmap in the stream, to the destination's own image.
    Stream,
    /// Both.
    Both,
}

/// Options of `dbm drill migrate`.
#[derive(Debug, Args)]
pub struct DrillArgs {
    /// Seed of the guest workloads (random if not given; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Which modes.
    #[arg(long, value_enum, default_value = "both")]
    pub mode: ModeArg,
    /// Directory for the images (default: a temporary directory, removed after); its files
    /// named MODE-FAILURE.qcow2 and MODE-FAILURE-dest.qcow2 are replaced.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Shared,
    Stream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Cancel,
    CutBeforeEnd,
    CutAfterEnd,
    Refuse,
    DestCrash,
    AfterStart,
}

impl Failure {
    const ALL: [Failure; 6] = [
        Failure::Cancel,
        Failure::CutBeforeEnd,
        Failure::CutAfterEnd,
        Failure::Refuse,
        Failure::DestCrash,
        Failure::AfterStart,
    ];

    fn name(self) -> &'static str {
        match self {
            Failure::Cancel => "cancel",
            Failure::CutBeforeEnd => "cut-before-end",
            Failure::CutAfterEnd => "cut-after-end",
            Failure::Refuse => "refuse",
            Failure::DestCrash => "dest-crash",
            Failure::AfterStart => "after-start",
        }
    }
}

/// A TCP proxy between source and destination that can cut the link, or swallow the
/// destination's answers and close the source's side.
///
/// A swallow never loses what the source sent: the source sets it in its last state's
/// `complete`, *before* it writes End, so the answers' pump may see it before the other
/// pump has forwarded End. The answers' pump therefore closes only the source's read
/// direction (the source sees the end of its return path: the outcome is unknown to it)
/// and goes on reading the destination's answers into nothing, a cut ignored, until the
/// destination closes; the source's pump forwards every byte the source wrote, ignoring a
/// cut once a swallow is set, until the source closes, and then ends only the stream to
/// the destination, never its answers: the destination, still starting after End when the
/// source has given up, must be able to write its Started (into nothing), or its start
/// fails and it undoes the take-over. Only a cut drops bytes in flight (`cut-before-end`,
/// and the end of an attempt).
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    swallow: Arc<AtomicBool>,
}

impl Proxy {
    fn start(to: SocketAddr) -> Res<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let swallow = Arc::new(AtomicBool::new(false));
        let (c, s) = (Arc::clone(&cut), Arc::clone(&swallow));
        std::thread::spawn(move || {
            let Ok((src, _)) = listener.accept() else {
                return;
            };
            let Ok(dst) = TcpStream::connect(to) else {
                return;
            };
            let _ = src.set_nodelay(true);
            let _ = dst.set_nodelay(true);
            let (Ok(src2), Ok(dst2)) = (src.try_clone(), dst.try_clone()) else {
                return;
            };
            let forward = {
                let (c, s) = (Arc::clone(&c), Arc::clone(&s));
                std::thread::spawn(move || pump(src, dst, &c, &s, false))
            };
            let answers = std::thread::spawn(move || pump(dst2, src2, &c, &s, true));
            let _ = forward.join();
            let _ = answers.join();
        });
        Ok(Proxy { addr, cut, swallow })
    }
}

/// One direction of the [`Proxy`]: `answers` is the destination's, which a swallow stops.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    cut: &AtomicBool,
    swallow: &AtomicBool,
    answers: bool,
) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = vec![0u8; 64 << 10];
    let mut swallowing = false;
    loop {
        // Once a swallow is set, a cut ends neither direction: the source's drains to the
        // source's own close, the answers to the destination's.
        if cut.load(Ordering::SeqCst) && !swallow.load(Ordering::SeqCst) {
            break;
        }
        if answers && !swallowing && swallow.load(Ordering::SeqCst) {
            swallowing = true;
            // The source's return path ends; its stream to the destination does not.
            let _ = to.shutdown(Shutdown::Write);
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if answers && (swallowing || swallow.load(Ordering::SeqCst)) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    if swallowing {
        // The destination closed: its socket is done with.
        return;
    }
    if !answers && swallow.load(Ordering::SeqCst) {
        // The source closed after the swallow: the destination reads the end of its
        // stream, and may still write its answers (to the answers' pump, which drops them).
        let _ = to.shutdown(Shutdown::Write);
        return;
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// The fault, as a state of the stream: it acts at its point of the protocol.
struct Fault {
    failure: Failure,
    cut: Arc<AtomicBool>,
    swallow: Arc<AtomicBool>,
    /// Postcopy switched (the destination starts next).
    switched: bool,
}

const FAULT_ID: StateId = 99;
const FAULT_NAME: &str = "drill-fault";

fn cut_error() -> MigrationError {
    MigrationError::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "drill: link cut",
    ))
}

impl MigrationState for Fault {
    fn id(&self) -> StateId {
        FAULT_ID
    }
    fn name(&self) -> &str {
        FAULT_NAME
    }
    fn setup(&mut self, _: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        Ok(Bytes(0))
    }
    fn pending(&mut self, _: bool) -> Pending {
        Pending {
            // After-start: one byte the destination may pull keeps the loop pushing after
            // Started, where this state cuts the link.
            can_postcopy: Bytes(u64::from(self.failure == Failure::AfterStart)),
            ..Pending::default()
        }
    }
    fn iterate(
        &mut self,
        _: &mut dyn Outbound,
        _: Bytes,
    ) -> dirty_bitmap::migration::Result<Bytes> {
        if self.switched {
            self.cut.store(true, Ordering::SeqCst);
            return Err(cut_error());
        }
        Ok(Bytes(0))
    }
    fn complete(&mut self, _: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        match self.failure {
            Failure::CutBeforeEnd => {
                self.cut.store(true, Ordering::SeqCst);
                Err(cut_error())
            }
            Failure::CutAfterEnd | Failure::DestCrash => {
                self.swallow.store(true, Ordering::SeqCst);
                Ok(Bytes(0))
            }
            _ => Ok(Bytes(0)),
        }
    }
    fn postcopy_start(&mut self, out: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        if self.failure == Failure::AfterStart {
            self.switched = true;
            return Ok(Bytes(0));
        }
        self.complete(out)
    }
    fn serve(&mut self, _: &mut dyn Outbound, _: &[u8]) -> dirty_bitmap::migration::Result<Bytes> {
        Ok(Bytes(0))
    }
    fn cancel(&mut self) {}
    fn resume_source(&mut self) {}
}

/// The fault's destination side: nothing to do.
#[derive(Debug)]
struct FaultDest;

impl DestState for FaultDest {
    fn name(&self) -> &str {
        FAULT_NAME
    }
}

/// Cancels on the first turn (the `cancel` case: the first measurement window is not
/// closed yet, so the loop cannot have switched over); otherwise auto-converges.
struct Control {
    cancel: bool,
    turns: u32,
    inner: AutoConverge,
}

impl Controller for Control {
    fn on_iteration(&mut self, _: &IterationReport) -> Directive {
        self.turns += 1;
        if self.cancel && self.turns == 1 {
            Directive::Cancel
        } else {
            Directive::Continue
        }
    }
    fn on_stall(&mut self, r: &StallReport) -> StallAction {
        self.inner.on_stall(r)
    }
}

/// The guest: vCPUs and the disk writer, which stop together as a [`DiskGuest`].
struct Guest {
    vcpus: Workload,
    disk: DiskWriter,
}

impl Guest {
    /// The guest as the loop drives it.
    fn vm(&mut self) -> DiskGuest<'_> {
        DiskGuest {
            vcpus: &mut self.vcpus,
            disk: Some(&self.disk),
        }
    }
}

/// What a case found.
struct CaseResult {
    outcome: String,
    marks: usize,
    lost: usize,
    state: String,
    qemu: String,
    retry: String,
    ok: bool,
}

/// The destination side of a mode, with its store once it took over.
enum DestSide {
    Shared(Arc<Mutex<SharedDiskDest<FileStorage>>>),
    Stream(Arc<Mutex<StreamDiskDest<FileStorage>>>, PathBuf),
}

impl DestSide {
    fn shared(&self) -> SharedDestState {
        match self {
            DestSide::Shared(d) => Arc::clone(d) as SharedDestState,
            DestSide::Stream(d, _) => Arc::clone(d) as SharedDestState,
        }
    }

    fn take_store(&self) -> Option<BitmapStore<FileStorage>> {
        match self {
            DestSide::Shared(d) => d.lock().ok()?.take_store(),
            DestSide::Stream(d, _) => d.lock().ok()?.take_store(),
        }
    }
}

fn new_image(path: &Path, bitmap: bool) -> Res<()> {
    let _ = std::fs::remove_file(path);
    let mut s = BitmapStore::create(FileStorage::create(path)?, DISK, 65536)?;
    if bitmap {
        s.add("b", 65536, Recording::Enabled)?;
    }
    Ok(())
}

fn open_rw(path: &Path) -> dirty_bitmap::Result<BitmapStore<FileStorage>> {
    BitmapStore::open(
        FileStorage::open(path, OpenMode::ReadWrite)?,
        OpenMode::ReadWrite,
    )
}

/// Logged marks not dirty in the bitmaps of `store` (only `b` here; in memory when active,
/// else on disk).
fn lost(store: &BitmapStore<FileStorage>, marks: &[u64]) -> Res<usize> {
    Ok(usize::try_from(lost_marks(
        &counted_in_store(store)?,
        marks,
    ))?)
}

/// Logged marks not dirty in bitmap `b` of the image at `path`, read from disk; an error
/// if a bitmap there is `in_use` (a stop that did not end cleanly: the count would say only
/// that `b` records nothing).
fn lost_on_disk(path: &Path, marks: &[u64]) -> Res<usize> {
    let s = BitmapStore::open(FileStorage::open_shared(path)?, OpenMode::ReadOnly)?;
    if s.list().iter().any(|i| i.in_use) {
        return Err("the bitmap is in_use on disk".into());
    }
    lost(&s, marks)
}

/// A step of a case whose failure is the case's verdict, not the drill's (the source cannot
/// take its image back, a stop fails, a bitmap is left `in_use`): it fails the case, saying
/// what failed in its row, and the matrix goes on (exit status 2, as for a lost mark).
fn judged<T>(res: &mut CaseResult, what: &str, r: Res<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            res.ok = false;
            res.state = format!("FAILED: {what}: {e}");
            None
        }
    }
}

fn config(postcopy: bool) -> LoopConfig {
    LoopConfig {
        max_bandwidth: Some(BytesPerMs::from_bytes_per_sec(8 << 20)),
        postcopy,
        start_postcopy: postcopy,
        ..LoopConfig::default()
    }
}

/// One attempt of the migration `session` through a proxy with `failure` (or none), the
/// destination taking `side`.
fn attempt(
    guest: &mut Guest,
    ram: &mut RamState,
    disk: &mut dyn MigrationState,
    side: &DestSide,
    session: &mut Session,
    failure: Option<Failure>,
) -> Res<dirty_bitmap::migration::Result<dirty_bitmap::migration::Outcome>> {
    let dest = TcpDestination::spawn(DestOptions {
        states: vec![
            side.shared(),
            Arc::new(Mutex::new(FaultDest)) as SharedDestState,
        ],
        refuse_attempts: u32::from(failure == Some(Failure::Refuse)),
        timeout: Duration::from_secs(5),
        ..DestOptions::default()
    })?;
    let proxy = Proxy::start(dest.addr())?;
    let mut fault = Fault {
        failure: failure.unwrap_or(Failure::Refuse),
        cut: Arc::clone(&proxy.cut),
        swallow: Arc::clone(&proxy.swallow),
        switched: false,
    };
    let postcopy = failure == Some(Failure::AfterStart);
    let mut control = Control {
        cancel: failure == Some(Failure::Cancel),
        turns: 0,
        inner: AutoConverge::default(),
    };
    let mut states: Vec<&mut dyn MigrationState> = vec![ram, disk];
    if failure.is_some() {
        states.push(&mut fault);
    }
    let r = migrate_in_session(
        proxy.addr,
        &SourceOptions {
            loop_config: config(postcopy),
            timeout: Duration::from_secs(5),
            ..SourceOptions::default()
        },
        session,
        &mut guest.vm(),
        &mut states,
        &mut control,
    );
    proxy.cut.store(true, Ordering::SeqCst);
    let _ = dest.join();
    Ok(r.map(|s| s.outcome))
}

/// Runs the matrix.
pub fn run(args: &DrillArgs) -> CmdResult {
    // QEMU judges every case's image: without it each case would read as corrupt.
    if let Err(e) = std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
    {
        return Err(format!(
            "dbm drill migrate needs qemu-img to check every case's image (package \
             qemu-utils): {e}"
        )
        .into());
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let work = WorkDir::given_or_temp(args.dir.as_deref())?;
    let dir = work.path();
    let modes: &[Mode] = match args.mode {
        ModeArg::Shared => &[Mode::Shared],
        ModeArg::Stream => &[Mode::Stream],
        ModeArg::Both => &[Mode::Shared, Mode::Stream],
    };
    outln!(
        "dbm drill migrate: seed {seed}; a guest of {PAGES} pages written by a vCPU thread, \
         its {} GiB disk written {DISK_WRITES} times a second (each write marked on bitmap \
         `b`, then logged); over TCP through a proxy that injects each failure",
        DISK >> 30
    );
    outln!(
        "{:<7} {:<15} {:<40} {:>7} {:>5} {:<44} {:<10} retry",
        "mode",
        "failure",
        "outcome",
        "marks",
        "lost",
        "bitmap",
        "qemu-img"
    );
    let mut bad = 0;
    for &mode in modes {
        for f in Failure::ALL {
            let r = case(dir, mode, f, seed)?;
            outln!(
                "{:<7} {:<15} {:<40} {:>7} {:>5} {:<44} {:<10} {}",
                match mode {
                    Mode::Shared => "shared",
                    Mode::Stream => "stream",
                },
                f.name(),
                r.outcome,
                r.marks,
                r.lost,
                r.state,
                r.qemu,
                r.retry
            );
            bad += usize::from(!r.ok);
        }
    }
    if bad > 0 {
        outln!(
            "{bad} case(s) lost marks, left corruption, failed a stop or take-back, or could not \
             hand over on retry"
        );
        return Ok(ExitCode::from(2));
    }
    outln!("every case: no mark lost, qemu-img check clean, and a retry handed over where the source kept the guest");
    Ok(ExitCode::SUCCESS)
}

const DISK_WRITES: u64 = 20_000;

fn outcome_name(r: &dirty_bitmap::migration::Result<dirty_bitmap::migration::Outcome>) -> String {
    match r {
        Ok(o) => format!("{:?}", o.kind),
        Err(MigrationError::Cancelled) => "Cancelled".into(),
        Err(MigrationError::OutcomeUnknown(_)) => "OutcomeUnknown (source stopped)".into(),
        Err(MigrationError::AfterStart(_)) => "AfterStart (source stopped)".into(),
        Err(MigrationError::DestinationRefused(_)) => "DestinationRefused".into(),
        Err(MigrationError::SourceNotResumed { .. }) => "SourceNotResumed".into(),
        Err(MigrationError::Io(_)) => "Io (link cut)".into(),
        Err(MigrationError::PeerAborted(_)) => "PeerAborted".into(),
        Err(e) => {
            let t = e.to_string();
            t.chars().take(40).collect()
        }
    }
}

fn case(dir: &Path, mode: Mode, failure: Failure, seed: u64) -> Res<CaseResult> {
    let tag = format!(
        "{}-{}",
        if mode == Mode::Shared {
            "shared"
        } else {
            "stream"
        },
        failure.name()
    );
    let src_img = dir.join(format!("{tag}.qcow2"));
    new_image(&src_img, true)?;
    let mut st = open_rw(&src_img)?;
    st.activate()?;
    let store = SharedStore::new(st);
    let side = match mode {
        Mode::Shared => DestSide::Shared(Arc::new(Mutex::new(SharedDiskDest::file(
            "disk-bitmaps",
            src_img.clone(),
        )))),
        Mode::Stream => {
            let d = dir.join(format!("{tag}-dest.qcow2"));
            new_image(&d, false)?;
            DestSide::Stream(
                Arc::new(Mutex::new(StreamDiskDest::file("disk-bitmaps", d.clone()))),
                d,
            )
        }
    };
    let ram = Arc::new(GuestRam::new(PAGES)?);
    let log = Arc::new(new_log(&ram)?);
    let vcpus = Workload::start(
        Arc::clone(&ram),
        Arc::clone(&log),
        WorkloadConfig {
            vcpus: 1,
            writes_per_sec: 2_000,
            pattern: Pattern::HOT_90_5,
            seed,
        },
    )?;
    let disk_writer = DiskWriter::start(store.lock().tracker()?, DISK, DISK_WRITES, seed, None);
    let mut guest = Guest {
        vcpus,
        disk: disk_writer,
    };
    std::thread::sleep(Duration::from_millis(30));
    let mut ram_state = RamState::new(RAM_ID, ram, log, SetupMode::Full, true, 16)?;
    let mut disk = match mode {
        Mode::Shared => Disk::Shared(Box::new(SharedDiskState::new(
            2,
            "disk-bitmaps",
            store.clone(),
        ))),
        // In postcopy (the after-start case) its regions may follow the switch.
        Mode::Stream => Disk::Stream(
            StreamDiskState::from_store(2, "disk-bitmaps", &store.lock())?.defer_to_postcopy(true),
        ),
    };
    // One migration: the retry names the first attempt's token, so the destination's
    // kept bitmaps serve it.
    let mut session = Session::new();
    let r = attempt(
        &mut guest,
        &mut ram_state,
        disk.state(),
        &side,
        &mut session,
        Some(failure),
    )?;
    let outcome = outcome_name(&r);
    let mut res = CaseResult {
        outcome,
        marks: 0,
        lost: 0,
        state: String::new(),
        qemu: String::new(),
        retry: "-".into(),
        ok: true,
    };
    let expected = match failure {
        Failure::Cancel => matches!(r, Err(MigrationError::Cancelled)),
        Failure::CutBeforeEnd => matches!(
            r,
            Err(MigrationError::Io(_) | MigrationError::PeerAborted(_))
        ),
        Failure::CutAfterEnd | Failure::DestCrash => {
            matches!(r, Err(MigrationError::OutcomeUnknown(_)))
        }
        Failure::Refuse => matches!(r, Err(MigrationError::DestinationRefused(_))),
        Failure::AfterStart => matches!(r, Err(MigrationError::AfterStart(_))),
    };
    if !expected {
        res.ok = false;
        res.outcome = format!("UNEXPECTED {}", res.outcome);
    }
    let dest_img = match &side {
        DestSide::Shared(_) => src_img.clone(),
        DestSide::Stream(_, p) => p.clone(),
    };
    match failure {
        Failure::CutAfterEnd | Failure::AfterStart => {
            // The destination runs the guest: it holds the bitmap now, with every mark.
            let marks = guest.disk.marks();
            res.marks = marks.len();
            let held = side.take_store();
            let Some(d) = held else {
                res.ok = false;
                res.state = "the destination did not take over".into();
                return finish(guest, res);
            };
            // A postcopy push that broke off leaves the bitmap dirty everywhere.
            let all_dirty = d.bitmap("b").is_ok_and(|b| b.count() == b.bit_count());
            if !lost_at_destination(&mut res, d, &marks, &dest_img) {
                return finish(guest, res);
            }
            res.state = match (mode, store.lock().is_active()) {
                (Mode::Shared, false) => "at the destination; source handed over".into(),
                (Mode::Shared, true) => "at the destination; source ACTIVE".into(),
                (Mode::Stream, _) if all_dirty => "at the destination, all dirty (push cut)".into(),
                (Mode::Stream, _) => "at the destination (its own image)".into(),
            };
            if mode == Mode::Shared && store.lock().is_active() {
                res.ok = false;
            }
            res.qemu = qemu_check(&dest_img);
            res.retry = "n/a: the guest runs on the destination".into();
        }
        _ => {
            if failure == Failure::DestCrash {
                // The destination died after it took over: its store goes without a word
                // (in_use stays set on its image). The source learns it is gone, so it
                // re-dirties, takes its bitmaps back, and resumes.
                drop(side.take_store());
                ram_state.channel_failed();
                ram_state.resume_source();
                disk.state().channel_failed();
                disk.state().resume_source();
                let back = disk.state().reactivate().map_err(Into::into);
                if judged(&mut res, "the source's take-back", back).is_none() {
                    return finish(guest, res);
                }
                guest.vm().resume()?;
            }
            // The source kept (or took back) the guest: every mark so far is in its bitmap.
            std::thread::sleep(Duration::from_millis(100));
            let before = guest.disk.marks();
            res.marks = before.len();
            let counted = lost(&store.lock(), &before);
            let Some(n) = judged(&mut res, "the source's marks", counted) else {
                return finish(guest, res);
            };
            res.lost = n;
            res.state = if store.lock().is_active() {
                "source active, every mark in memory".into()
            } else {
                res.ok = false;
                "source NOT active".into()
            };
            // A retry, without faults, hands over.
            let retry = attempt(
                &mut guest,
                &mut ram_state,
                disk.state(),
                &side,
                &mut session,
                None,
            )?;
            match retry {
                Ok(o) if o.kind == Kind::Completed => {
                    let marks = guest.disk.marks();
                    res.marks = marks.len();
                    let Some(d) = side.take_store() else {
                        res.ok = false;
                        res.retry = "completed, but the destination holds nothing".into();
                        return finish(guest, res);
                    };
                    if !lost_at_destination(&mut res, d, &marks, &dest_img) {
                        return finish(guest, res);
                    }
                    res.qemu = qemu_check(&dest_img);
                    res.retry = format!(
                        "handed over, downtime {:.1} ms",
                        o.downtime.as_secs_f64() * 1e3
                    );
                    if let Disk::Stream(st) = &disk {
                        // What the destination's report left due, of the whole bitmap.
                        res.retry.push_str(&match st.due_after_report() {
                            Some(due) => format!(", {due} of {} regions due", st.region_count()),
                            None => ", no report".into(),
                        });
                    }
                    if mode == Mode::Stream {
                        // The source's own image, after its own stop, holds every mark too.
                        let stopped = store.lock().inactivate().map_err(Into::into);
                        if judged(&mut res, "the source's stop", stopped).is_none() {
                            return finish(guest, res);
                        }
                        let on_disk = lost_on_disk(&src_img, &marks);
                        let Some(n) = judged(&mut res, "the source's image", on_disk) else {
                            return finish(guest, res);
                        };
                        res.lost += n;
                        let q = qemu_check(&src_img);
                        if q != "clean" {
                            res.qemu = format!("source: {q}");
                        }
                    }
                }
                other => {
                    res.ok = false;
                    res.retry = format!("FAILED: {}", outcome_name(&other));
                }
            }
        }
    }
    if res.lost > 0 || res.qemu != "clean" {
        res.ok = false;
    }
    finish(guest, res)
}

/// Adds to `res.lost` the logged `marks` missing from the store `d` the destination took
/// over, then, after its stop and close, from its image at `img`. False when a step failed the case
/// ([`judged`]).
fn lost_at_destination(
    res: &mut CaseResult,
    mut d: BitmapStore<FileStorage>,
    marks: &[u64],
    img: &Path,
) -> bool {
    let Some(n) = judged(res, "the destination's marks", lost(&d, marks)) else {
        return false;
    };
    res.lost += n;
    let stopped = d.inactivate().map(drop).map_err(Into::into);
    if judged(res, "the destination's stop", stopped).is_none() {
        return false;
    }
    // Closed before the image is read anew.
    drop(d);
    let Some(n) = judged(res, "the destination's image", lost_on_disk(img, marks)) else {
        return false;
    };
    res.lost += n;
    true
}

/// The disk state of a mode.
enum Disk {
    Shared(Box<SharedDiskState<FileStorage>>),
    Stream(StreamDiskState),
}

impl Disk {
    fn state(&mut self) -> &mut dyn MigrationState {
        match self {
            Disk::Shared(s) => &mut **s,
            Disk::Stream(s) => s,
        }
    }
}

fn finish(guest: Guest, res: CaseResult) -> Res<CaseResult> {
    let Guest { mut vcpus, disk } = guest;
    let _ = disk.shutdown();
    let _ = vcpus.resume();
    vcpus.shutdown();
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stop that leaves `b` in use on disk makes the count refuse ("enabled but
    /// inconsistent: it records nothing") before the in-use check can say so; that error
    /// fails the case (status 2) and does not end the whole drill with status 1.
    #[test]
    fn a_bitmap_left_in_use_fails_the_case_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("left.qcow2");
        new_image(&img, true).unwrap();
        let mut st = open_rw(&img).unwrap();
        st.activate().unwrap();
        // Dropped while active, as a process that dies: `in_use` stays set.
        drop(st);
        let e = lost_on_disk(&img, &[0]).unwrap_err().to_string();
        assert!(e.contains("in_use on disk"), "{e}");
        let mut res = CaseResult {
            outcome: String::new(),
            marks: 1,
            lost: 0,
            state: String::new(),
            qemu: "clean".into(),
            retry: "-".into(),
            ok: true,
        };
        assert!(judged(
            &mut res,
            "the destination's image",
            lost_on_disk(&img, &[0])
        )
        .is_none());
        assert!(!res.ok);
        assert!(
            res.state.contains("the destination's image") && res.state.contains("in_use"),
            "{}",
            res.state
        );
    }

    /// The `cut-after-end` race on the other side: the source gives up as soon as its
    /// return path ends, and closes; a destination still starting after End (its activate)
    /// must still be able to write its Started, or its start fails and it undoes the
    /// take-over (the drill then finds no destination holding the bitmaps).
    #[test]
    fn a_destination_answers_after_the_source_gave_up_on_a_swallowed_end() {
        let dest = TcpListener::bind("127.0.0.1:0").unwrap();
        let dest_addr = dest.local_addr().unwrap();
        let (closed, source_gone) = std::sync::mpsc::channel::<()>();
        let received = std::thread::spawn(move || {
            let (mut s, _) = dest.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            // Still starting when the source has gone: then its answers, each written whole.
            source_gone.recv().unwrap();
            std::thread::sleep(Duration::from_millis(100));
            for _ in 0..20 {
                s.write_all(b"started").unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
            got
        });
        let proxy = Proxy::start(dest_addr).unwrap();
        let mut src = TcpStream::connect(proxy.addr).unwrap();
        src.write_all(b"pages").unwrap();
        proxy.swallow.store(true, Ordering::SeqCst);
        src.write_all(b"END").unwrap();
        drop(src);
        proxy.cut.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        closed.send(()).unwrap();
        assert_eq!(received.join().unwrap(), b"pagesEND");
    }

    /// The `cut-after-end` race: the source sets the swallow before it writes End, and the
    /// answers' pump may act on it before the other pump has forwarded End. Here it acts
    /// first for certain (the source waits well past the pumps' 20 ms poll), and the cut that
    /// ends the attempt comes before the source closes: every byte the source wrote still
    /// reaches the destination, while the source sees its return path end.
    #[test]
    fn a_swallow_never_drops_what_the_source_sent() {
        let dest = TcpListener::bind("127.0.0.1:0").unwrap();
        let dest_addr = dest.local_addr().unwrap();
        let (answered, after_end) = std::sync::mpsc::channel();
        let received = std::thread::spawn(move || {
            let (mut s, _) = dest.accept().unwrap();
            let mut got = vec![0u8; 5];
            s.read_exact(&mut got).unwrap();
            // An answer before the swallow, which the source receives.
            s.write_all(b"ok").unwrap();
            let mut end = [0u8; 3];
            s.read_exact(&mut end).unwrap();
            got.extend_from_slice(&end);
            // An answer after End, which the proxy swallows.
            s.write_all(b"started").unwrap();
            answered.send(()).unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            got.extend_from_slice(&rest);
            got
        });
        let proxy = Proxy::start(dest_addr).unwrap();
        let mut src = TcpStream::connect(proxy.addr).unwrap();
        src.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        src.write_all(b"pages").unwrap();
        let mut answer = [0u8; 2];
        src.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"ok");
        proxy.swallow.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        src.write_all(b"END").unwrap();
        after_end
            .recv_timeout(Duration::from_secs(10))
            .expect("the destination received End and answered");
        std::thread::sleep(Duration::from_millis(100));
        let mut rest = Vec::new();
        src.read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "the source received {rest:?} after the swallow"
        );
        proxy.cut.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        drop(src);
        assert_eq!(received.join().unwrap(), b"pagesEND");
    }
}
