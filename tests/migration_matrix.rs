//! The failure matrix of issue 11 §6 under the virtual clock, both modes: a real
//! [`SharedDiskState`] (or [`StreamDiskState`]) over a real [`BitmapStore`] on an image file,
//! its bitmap marked by the simulated guest's disk writes as virtual time passes (every mark
//! logged), the destination's real side ([`SharedDiskDest`], [`StreamDiskDest`]) in the
//! simulation's [`DestModel`], and each failure injected at its point of the protocol.
//! After each: every logged mark is in the source's bitmap in memory and, after the source
//! writes it out and the image is opened again, on disk; `qemu-img check` is clean; where
//! the source kept the guest, a retry hands over and the destination's bitmap covers every
//! mark; where the destination runs the guest, it holds every mark and the source never
//! takes the image back.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::qemu::{assert_qemu_clean, qemu_bitmaps, qemu_bitmaps_shared};
use dirty_bitmap::migration::guest::{new_log, Vm};
use dirty_bitmap::migration::sim::{LinkFault, Sim, SimDiskWriter, SimMarked};
use dirty_bitmap::migration::{
    run, AutoConverge, BytesPerMs, Controller, Directive, Endpoints, GuestRam, IterationReport,
    Kind, LoopConfig, MigrationError, MigrationState, Outcome, Pattern, RamState, SetupMode,
    SharedDestState, SharedDiskDest, SharedDiskState, StallAction, StallReport, StateId,
    StreamDiskDest, StreamDiskState, RAM_ID,
};
use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::{BitmapStore, DirtyBitmap, OpenMode, Recording, SharedStore};

const GIB: u64 = 1 << 30;
const DISK: u64 = 64 * GIB;
const DISK_ID: StateId = 2;
const PAGES: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// The caller cancels before the switchover.
    Cancel,
    /// The link is cut inside the downtime, before End.
    CutBeforeEnd,
    /// The link is cut right after End: the destination starts, its Started is lost.
    CutAfterEnd,
    /// The destination refuses to start.
    Refuse,
    /// The destination activates (its states' `before_start`) and dies before Started.
    DestCrash,
    /// Postcopy: the link is cut after Started.
    AfterStart,
}

const ALL: [Failure; 6] = [
    Failure::Cancel,
    Failure::CutBeforeEnd,
    Failure::CutAfterEnd,
    Failure::Refuse,
    Failure::DestCrash,
    Failure::AfterStart,
];

/// Cancels on the second turn (the first measurement window is not closed: no switchover
/// can have happened); otherwise auto-converges.
struct CancelSoon(u32);

impl Controller for CancelSoon {
    fn on_iteration(&mut self, _: &IterationReport) -> Directive {
        self.0 += 1;
        if self.0 == 2 {
            Directive::Cancel
        } else {
            Directive::Continue
        }
    }
    fn on_stall(&mut self, r: &StallReport) -> StallAction {
        AutoConverge::default().on_stall(r)
    }
}

/// A fresh image of a 64 GiB disk at `path`, with bitmap `b` (64 KiB granularity) if
/// `bitmap`.
fn new_image(path: &Path, bitmap: bool) {
    let mut s = BitmapStore::create(FileStorage::create(path).unwrap(), DISK, 65536).unwrap();
    if bitmap {
        s.add("b", 65536, Recording::Enabled).unwrap();
    }
}

fn open_rw(path: &Path) -> dirty_bitmap::Result<BitmapStore<FileStorage>> {
    BitmapStore::open(
        FileStorage::open(path, OpenMode::ReadWrite)?,
        OpenMode::ReadWrite,
    )
}

/// Panics unless every logged mark is dirty in `b`.
fn assert_covers(b: &DirtyBitmap, marks: &[u64], what: &str) {
    let lost: Vec<u64> = marks.iter().copied().filter(|&m| !b.is_dirty(m)).collect();
    assert!(
        lost.is_empty(),
        "{what}: {} of {} marks lost, first at {:?}",
        lost.len(),
        marks.len(),
        lost.first()
    );
}

/// The image at `img` as opened anew (read-only, from disk): bitmap `b` holds every mark
/// and is not `in_use`, and `qemu-img check` is clean.
fn assert_on_disk(img: &Path, marks: &[u64], what: &str) {
    let s = BitmapStore::open(FileStorage::open_shared(img).unwrap(), OpenMode::ReadOnly).unwrap();
    assert!(
        s.list().iter().all(|i| !i.in_use),
        "{what}: a bitmap is in_use on disk"
    );
    assert_covers(&s.load("b").unwrap(), marks, &format!("{what}, on disk"));
    drop(s);
    let q = qemu_bitmaps(img);
    assert!(
        q.iter().all(|(_, _, f)| !f.iter().any(|f| f == "in-use")),
        "{what}: {q:?}"
    );
    assert_qemu_clean(img);
}

/// The source's bitmap `b` in memory (active, or parked by a hand-over).
fn source_bitmap(store: &SharedStore<FileStorage>) -> DirtyBitmap {
    store.lock().load("b").unwrap()
}

/// The source writes its bitmaps out (the incremental inactivate, as a close does), the
/// image is opened anew and checked, and the source takes it back.
fn assert_written_out_and_take_back(
    store: &SharedStore<FileStorage>,
    img: &Path,
    marks: &[u64],
    what: &str,
) {
    store.lock().inactivate().unwrap();
    assert_on_disk(img, marks, what);
    store.lock().activate().unwrap();
}

fn sim() -> (Sim, RamState) {
    let ram = Arc::new(GuestRam::new(PAGES).unwrap());
    let log = Arc::new(new_log(&ram).unwrap());
    let sim = Sim::new(
        Arc::clone(&ram),
        Arc::clone(&log),
        0.2,
        Pattern::Uniform,
        BytesPerMs::from_bytes_per_ms(20_000.0),
        9,
    );
    let state = RamState::new(RAM_ID, ram, log, SetupMode::Full, true, 8).unwrap();
    (sim, state)
}

fn config(postcopy: bool) -> LoopConfig {
    LoopConfig {
        max_bandwidth: None,
        postcopy,
        start_postcopy: postcopy,
        ..LoopConfig::default()
    }
}

/// One attempt over the simulated link, with `failure` armed (or none).
fn attempt(
    sim: &Sim,
    ram: &mut RamState,
    disk: &mut dyn MigrationState,
    failure: Option<Failure>,
) -> dirty_bitmap::migration::Result<Outcome> {
    {
        let mut w = sim.world();
        w.link_fault = match failure {
            Some(Failure::CutBeforeEnd) => Some(LinkFault::BeforeEnd),
            Some(Failure::CutAfterEnd) => Some(LinkFault::AfterEnd),
            Some(Failure::AfterStart) => Some(LinkFault::AfterStarted),
            _ => None,
        };
        w.dest.refuse = (failure == Some(Failure::Refuse)).then(|| "no".to_string());
        w.dest.crash_before_started = failure == Some(Failure::DestCrash);
    }
    let mut cancel = CancelSoon(0);
    let mut auto = AutoConverge::default();
    let control: &mut dyn Controller = if failure == Some(Failure::Cancel) {
        &mut cancel
    } else {
        &mut auto
    };
    let (mut c, mut v, mut o, mut i) = (sim.clone(), sim.clone(), sim.clone(), sim.clone());
    let r = run(
        &config(failure == Some(Failure::AfterStart)),
        Endpoints {
            clock: &mut c,
            vm: &mut v,
            out: &mut o,
            inbound: &mut i,
        },
        &mut [ram as &mut dyn MigrationState, disk],
        control,
    );
    let mut w = sim.world();
    w.link_fault = None;
    w.dest.refuse = None;
    w.dest.crash_before_started = false;
    r
}

/// Whether `r` is the error `failure` must give.
fn expected(failure: Failure, r: &dirty_bitmap::migration::Result<Outcome>) -> bool {
    match failure {
        Failure::Cancel => matches!(r, Err(MigrationError::Cancelled)),
        Failure::CutBeforeEnd => matches!(r, Err(MigrationError::Io(_))),
        Failure::CutAfterEnd | Failure::DestCrash => {
            matches!(r, Err(MigrationError::OutcomeUnknown(_)))
        }
        Failure::Refuse => matches!(r, Err(MigrationError::DestinationRefused(_))),
        Failure::AfterStart => matches!(r, Err(MigrationError::AfterStart(_))),
    }
}

/// What the caller does once it learns that a destination it got no answer from is dead
/// (`OutcomeUnknown`, then the process is gone): what the loop does on a failure with the
/// VM stopped. Every state re-dirties what was in flight and takes back what it handed
/// over, then the guest resumes.
fn fail_back(sim: &Sim, states: &mut [&mut dyn MigrationState]) {
    for s in states.iter_mut() {
        s.channel_failed();
        s.resume_source();
    }
    for s in states.iter_mut() {
        s.reactivate().unwrap();
    }
    sim.clone().resume().unwrap();
}

// ---------------------------------------------------------------------------------------
// Shared storage.

struct SharedRig {
    _dir: tempfile::TempDir,
    img: PathBuf,
    sim: Sim,
    ram: RamState,
    store: SharedStore<FileStorage>,
    disk: SimMarked<SharedDiskState<FileStorage>>,
    dest: Arc<Mutex<SharedDiskDest<FileStorage>>>,
}

fn shared_rig(seed: u64) -> SharedRig {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("shared.qcow2");
    new_image(&img, true);
    let mut st = open_rw(&img).unwrap();
    st.activate().unwrap();
    let store = SharedStore::new(st);
    let (sim, ram) = sim();
    let tracker = store.lock().tracker().unwrap();
    let mut writer = SimDiskWriter::new(sim.clone(), tracker, DISK, 4.0, seed);
    // Marks before the migration starts, too: history the hand-over must keep.
    sim.clone().run_until(std::time::Duration::from_millis(200));
    writer.accrue();
    assert!(!writer.marks().is_empty());
    let disk = SimMarked {
        state: SharedDiskState::new(DISK_ID, "disk-bitmaps", store.clone()),
        writer,
    };
    let dest = Arc::new(Mutex::new(SharedDiskDest::file(
        "disk-bitmaps",
        img.clone(),
    )));
    sim.world()
        .dest
        .states
        .push(Arc::clone(&dest) as SharedDestState);
    SharedRig {
        _dir: dir,
        img,
        sim,
        ram,
        store,
        disk,
        dest,
    }
}

/// The destination took over: its store holds every mark; then it hands the image back
/// clean (its inactivate), and the image holds every mark.
fn destination_holds_every_mark(r: &mut SharedRig, what: &str) {
    let marks = r.disk.writer.marks().to_vec();
    let mut d = r
        .dest
        .lock()
        .unwrap()
        .take_store()
        .unwrap_or_else(|| panic!("{what}: the destination did not take over"));
    assert!(d.is_active(), "{what}");
    assert_covers(
        &d.bitmap("b").unwrap(),
        &marks,
        &format!("{what}, at the destination"),
    );
    // While the destination holds it, the disk says in_use: inconsistent, never clean.
    let q = qemu_bitmaps_shared(&r.img);
    assert!(q[0].2.iter().any(|f| f == "in-use"), "{what}: {q:?}");
    d.inactivate().unwrap();
    drop(d);
    assert_on_disk(
        &r.img,
        &marks,
        &format!("{what}, handed back by the destination"),
    );
}

fn shared_case(failure: Failure, seed: u64) {
    let what = format!("shared, {failure:?}, seed {seed}");
    println!("{what}");
    let mut r = shared_rig(seed);
    let res = attempt(&r.sim, &mut r.ram, &mut r.disk, Some(failure));
    assert!(expected(failure, &res), "{what}: {res:?}");
    let marks = r.disk.writer.marks().to_vec();
    assert!(marks.len() >= 100, "{what}: only {} marks", marks.len());
    // Every mark made before the failure is in the source's bitmap in memory.
    assert_covers(
        &source_bitmap(&r.store),
        &marks,
        &format!("{what}, source memory"),
    );
    match failure {
        Failure::Cancel | Failure::CutBeforeEnd | Failure::Refuse => {
            // The source kept the guest, or took it back: active, running, nothing handed
            // over.
            assert!(r.sim.guest_running(), "{what}");
            assert!(r.store.lock().is_active(), "{what}");
            assert!(!r.disk.state.handed_over(), "{what}");
            if failure == Failure::Cancel {
                // Never inactivated: the disk says in_use throughout.
                assert_eq!(r.disk.state.disk_stop().syncs, 0, "{what}");
            }
            // The destination never took over (a cut or a refusal undid its side).
            assert!(r.dest.lock().unwrap().take_store().is_none(), "{what}");
        }
        Failure::CutAfterEnd | Failure::AfterStart => {
            // The destination runs the guest: the source stays stopped and handed over,
            // and never activates.
            assert!(!r.sim.guest_running(), "{what}");
            assert!(!r.store.lock().is_active(), "{what}");
            assert!(r.disk.state.handed_over(), "{what}");
            destination_holds_every_mark(&mut r, &what);
            assert!(!r.store.lock().is_active(), "{what}");
            return;
        }
        Failure::DestCrash => {
            // No answer: the source stays stopped, its store handed over.
            assert!(!r.sim.guest_running(), "{what}");
            assert!(!r.store.lock().is_active(), "{what}");
            assert!(r.sim.world().dest.is_dead(), "{what}");
            // The destination had activated the image (in_use on disk); its process dies
            // without a word: the store goes, the flags stay.
            let held = r.dest.lock().unwrap().take_store();
            assert!(held.is_some(), "{what}: the destination never activated");
            drop(held);
            let q = qemu_bitmaps(&r.img);
            assert!(q[0].2.iter().any(|f| f == "in-use"), "{what}: {q:?}");
            // The caller learns the destination is gone and fails back: the only difference
            // on disk is the in_use flags, which the source's activate accepts.
            fail_back(&r.sim, &mut [&mut r.ram, &mut r.disk]);
            assert!(r.store.lock().is_active(), "{what}");
            assert!(r.sim.guest_running(), "{what}");
            assert_covers(
                &source_bitmap(&r.store),
                &marks,
                &format!("{what}, source memory after fail-back"),
            );
            r.sim.world().dest.restart();
        }
    }
    // Written out and opened anew, the image holds every mark; then the source takes it
    // back and the guest writes on.
    assert_written_out_and_take_back(&r.store, &r.img, &marks, &what);
    let t = r.sim.now() + std::time::Duration::from_millis(30);
    r.sim.clone().run_until(t);
    // A retry hands over, and the destination's bitmap covers every mark.
    let o = attempt(&r.sim, &mut r.ram, &mut r.disk, None)
        .unwrap_or_else(|e| panic!("{what}: the retry failed: {e}"));
    assert_eq!(o.kind, Kind::Completed, "{what}");
    assert!(r.disk.writer.marks().len() > marks.len(), "{what}");
    assert!(!r.store.lock().is_active(), "{what}");
    destination_holds_every_mark(&mut r, &format!("{what}, retry"));
}

#[test]
fn shared_storage_failure_matrix_under_the_virtual_clock_keeps_every_mark() {
    for (i, f) in ALL.into_iter().enumerate() {
        shared_case(f, 100 + i as u64);
    }
}

/// The destination activated, then changed more than the flags (it added a bitmap) before
/// it died: the source must refuse to take the image back and stay stopped, and the disk's
/// bitmap reads inconsistent (in_use), never clean; the source's memory keeps every mark.
#[test]
fn shared_storage_a_crashed_destination_that_changed_more_than_the_flags_is_refused() {
    let seed = 7;
    let what = format!("shared, crash after a change, seed {seed}");
    println!("{what}");
    let mut r = shared_rig(seed);
    let res = attempt(&r.sim, &mut r.ram, &mut r.disk, Some(Failure::DestCrash));
    assert!(
        matches!(res, Err(MigrationError::OutcomeUnknown(_))),
        "{what}: {res:?}"
    );
    let marks = r.disk.writer.marks().to_vec();
    let mut held = r.dest.lock().unwrap().take_store().unwrap();
    held.add("theirs", 65536, Recording::Enabled).unwrap();
    drop(held);
    for s in [&mut r.ram as &mut dyn MigrationState, &mut r.disk] {
        s.channel_failed();
        s.resume_source();
    }
    let e = r.disk.reactivate().unwrap_err();
    assert!(
        matches!(
            e,
            MigrationError::Bitmap(dirty_bitmap::Error::WrongState(
                dirty_bitmap::StateProblem::ChangedWhileInactive
            ))
        ),
        "{what}: {e}"
    );
    assert!(!r.store.lock().is_active(), "{what}");
    assert!(!r.sim.guest_running(), "{what}");
    assert_covers(
        &source_bitmap(&r.store),
        &marks,
        &format!("{what}, source memory"),
    );
    let q = qemu_bitmaps(&r.img);
    let b = q.iter().find(|(n, ..)| n == "b").unwrap();
    assert!(b.2.iter().any(|f| f == "in-use"), "{what}: {q:?}");
    assert_qemu_clean(&r.img);
}

// ---------------------------------------------------------------------------------------
// Stream mode: the source keeps its own image; the destination has one of its own.

struct StreamRig {
    _dir: tempfile::TempDir,
    src_img: PathBuf,
    dest_img: PathBuf,
    sim: Sim,
    ram: RamState,
    store: SharedStore<FileStorage>,
    disk: SimMarked<StreamDiskState>,
    dest: Arc<Mutex<StreamDiskDest<FileStorage>>>,
}

fn stream_rig(seed: u64) -> StreamRig {
    let dir = tempfile::tempdir().unwrap();
    let src_img = dir.path().join("source.qcow2");
    let dest_img = dir.path().join("dest.qcow2");
    new_image(&src_img, true);
    new_image(&dest_img, false);
    let mut st = open_rw(&src_img).unwrap();
    st.activate().unwrap();
    let store = SharedStore::new(st);
    let (sim, ram) = sim();
    let tracker = store.lock().tracker().unwrap();
    let mut writer = SimDiskWriter::new(sim.clone(), tracker, DISK, 4.0, seed);
    sim.clone().run_until(std::time::Duration::from_millis(200));
    writer.accrue();
    assert!(!writer.marks().is_empty());
    let state = StreamDiskState::from_store(DISK_ID, "disk-stream", &store.lock()).unwrap();
    let p = dest_img.clone();
    let dest = Arc::new(Mutex::new(StreamDiskDest::new("disk-stream", move || {
        open_rw(&p)
    })));
    sim.world()
        .dest
        .states
        .push(Arc::clone(&dest) as SharedDestState);
    StreamRig {
        _dir: dir,
        src_img,
        dest_img,
        sim,
        ram,
        store,
        disk: SimMarked { state, writer },
        dest,
    }
}

/// The destination's image holds every mark: in its active store, and on disk once it
/// hands the image back clean.
fn stream_destination_holds_every_mark(r: &mut StreamRig, what: &str) {
    let marks = r.disk.writer.marks().to_vec();
    let mut d = r
        .dest
        .lock()
        .unwrap()
        .take_store()
        .unwrap_or_else(|| panic!("{what}: the destination did not take over"));
    let b = d.bitmap("b").unwrap();
    assert_covers(&b, &marks, &format!("{what}, at the destination"));
    d.inactivate().unwrap();
    drop(d);
    assert_on_disk(&r.dest_img, &marks, &format!("{what}, destination image"));
}

fn stream_case(failure: Failure, seed: u64) {
    let what = format!("stream, {failure:?}, seed {seed}");
    println!("{what}");
    let mut r = stream_rig(seed);
    let res = attempt(&r.sim, &mut r.ram, &mut r.disk, Some(failure));
    assert!(expected(failure, &res), "{what}: {res:?}");
    let marks = r.disk.writer.marks().to_vec();
    assert!(marks.len() >= 100, "{what}: only {} marks", marks.len());
    // Sending never clears a source bit: every mark is in the source's bitmap.
    assert_covers(
        &source_bitmap(&r.store),
        &marks,
        &format!("{what}, source memory"),
    );
    assert!(r.store.lock().is_active(), "{what}");
    match failure {
        Failure::Cancel | Failure::CutBeforeEnd | Failure::Refuse => {
            assert!(r.sim.guest_running(), "{what}");
            assert!(r.dest.lock().unwrap().take_store().is_none(), "{what}");
        }
        Failure::CutAfterEnd | Failure::AfterStart => {
            // The destination runs the guest with every mark; the source stays stopped.
            assert!(!r.sim.guest_running(), "{what}");
            stream_destination_holds_every_mark(&mut r, &what);
            // The source's own image, written out and opened anew, holds every mark too.
            r.store.lock().inactivate().unwrap();
            assert_on_disk(&r.src_img, &marks, &format!("{what}, source image"));
            return;
        }
        Failure::DestCrash => {
            assert!(!r.sim.guest_running(), "{what}");
            // The destination stored the bitmaps into its image and activated it, then
            // died: its image keeps `b` in_use (inconsistent, never clean).
            let held = r.dest.lock().unwrap().take_store();
            assert!(held.is_some(), "{what}: the destination never activated");
            drop(held);
            let q = qemu_bitmaps(&r.dest_img);
            assert!(q[0].2.iter().any(|f| f == "in-use"), "{what}: {q:?}");
            fail_back(&r.sim, &mut [&mut r.ram, &mut r.disk]);
            assert!(r.sim.guest_running(), "{what}");
            r.sim.world().dest.restart();
        }
    }
    assert_written_out_and_take_back(&r.store, &r.src_img, &marks, &what);
    let t = r.sim.now() + std::time::Duration::from_millis(30);
    r.sim.clone().run_until(t);
    let o = attempt(&r.sim, &mut r.ram, &mut r.disk, None)
        .unwrap_or_else(|e| panic!("{what}: the retry failed: {e}"));
    assert_eq!(o.kind, Kind::Completed, "{what}");
    assert!(r.disk.writer.marks().len() > marks.len(), "{what}");
    // The destination's bitmap is the source's at the stop, exactly (nothing clears here),
    // and covers every mark.
    let src: Vec<_> = source_bitmap(&r.store).dirty_extents().collect();
    let held = r.dest.lock().unwrap().take_store();
    let mut d = held.unwrap_or_else(|| panic!("{what}: the retry did not take over"));
    let at_dest: Vec<_> = d.bitmap("b").unwrap().dirty_extents().collect();
    d.inactivate().unwrap();
    drop(d);
    assert_eq!(src, at_dest, "{what}: destination against source");
    let marks = r.disk.writer.marks().to_vec();
    assert_on_disk(
        &r.dest_img,
        &marks,
        &format!("{what}, retry, destination image"),
    );
    r.store.lock().inactivate().unwrap();
    assert_on_disk(&r.src_img, &marks, &format!("{what}, retry, source image"));
}

#[test]
fn stream_mode_failure_matrix_under_the_virtual_clock_keeps_every_mark() {
    for (i, f) in ALL.into_iter().enumerate() {
        stream_case(f, 200 + i as u64);
    }
}
