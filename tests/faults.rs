//! Faults during the incremental flush and the incremental inactivate (first
//! version): `EIO` at each write (nothing landed, a torn prefix, or everything landed but
//! reported failed) and at each sync, and `ENOSPC` when an allocation grows the file. In
//! every case:
//! - the operation reports the error, and the store refuses every later write with
//!   `Error::Poisoned` until it is reopened;
//! - the in-memory bitmaps keep every bit, and the regions not known to be on disk are
//!   still in their change maps;
//! - the disk shows no refcount corruption, and every bitmap on it is inconsistent or holds
//!   every mark: never falsely clean.

use dirty_bitmap::storage::{FaultPlan, FaultStorage, Landed, MemStorage, Trigger};
use dirty_bitmap::units::{BytesPerMs, Millis};
use dirty_bitmap::{BitmapState, BitmapStore, Error};
use dirty_bitmap::{OpenMode, Recording};

const MIB: u64 = 1 << 20;
const CS: u64 = 4096;
const DISK: u64 = 64 * MIB;
/// Disk bytes per region at 512 B granularity.
const REGION_DISK: u64 = CS * 8 * 512;

type Counted = FaultStorage<MemStorage>;

/// A write of the guest after the operation failed, on a granule nothing else marks.
const LATE: (u64, u64) = (REGION_DISK + 8 * MIB, 1);

#[derive(Debug, Clone, Copy)]
enum Op {
    Flush,
    Inactivate,
    /// QEMU's stop (`inactivate_full_rewrite`): a new directory and header, then frees.
    FullRewrite,
    /// A flush on [`setup_whole`]'s store: bitmap `a` rewritten whole in place.
    FlushWhole,
    /// An incremental stop on [`setup_whole`]'s store, its flush rewriting `a` whole.
    InactivateWhole,
}

const OPS: [Op; 5] = [
    Op::Flush,
    Op::Inactivate,
    Op::FullRewrite,
    Op::FlushWhole,
    Op::InactivateWhole,
];

/// An active store of a `disk`-byte disk at 4 KiB clusters, with bitmaps `a` (512 B
/// granules) and `b` (1 KiB) enabled and `off` (512 B) disabled.
fn three_bitmaps(disk: u64) -> BitmapStore<Counted> {
    let mut s = BitmapStore::create(
        FaultStorage::new(MemStorage::new(), FaultPlan::new()),
        disk,
        CS,
    )
    .unwrap();
    s.add("a", 512, Recording::Enabled).unwrap();
    s.add("b", 1024, Recording::Enabled).unwrap();
    s.add("off", 512, Recording::Disabled).unwrap();
    s.activate().unwrap();
    s
}

/// The store `op` runs on.
fn setup_for(op: Op) -> (BitmapStore<Counted>, Vec<(u64, u64)>) {
    match op {
        Op::FlushWhole | Op::InactivateWhole => setup_whole(),
        _ => setup(),
    }
}

/// A disk of 2 GiB: bitmap `a` (512 B granules) has 128 regions, each with a data cluster
/// from a first flush, and a mark pending since in every other one. At a rewrite threshold
/// of 0 a flush that finds 64 changed rewrites it whole: the 64 unchanged regions too, with
/// the bytes they hold, in one run instead of 64 writes (`b`, 1 KiB granules, likewise).
fn setup_whole() -> (BitmapStore<Counted>, Vec<(u64, u64)>) {
    const DISK_WHOLE: u64 = 2 << 30;
    let mut s = three_bitmaps(DISK_WHOLE);
    let t = s.tracker().unwrap();
    let regions = DISK_WHOLE / REGION_DISK;
    let mut marks: Vec<(u64, u64)> = (0..regions).map(|r| (r * REGION_DISK + 4096, 1)).collect();
    for &(o, l) in &marks {
        t.mark(o, l);
    }
    s.flush().unwrap();
    for r in (0..regions).step_by(2) {
        let m = (r * REGION_DISK + 12 * MIB, 3000);
        t.mark(m.0, m.1);
        marks.push(m);
    }
    s.set_rewrite_threshold(0.0).unwrap();
    assert_eq!(
        s.bitmaps().unwrap()[0].changed_region_count(),
        regions / 2,
        "every other region of a is pending"
    );
    (s, marks)
}

/// An active store with two enabled bitmaps and a disabled one, some data clusters
/// already written, and pending marks in both written (in place) and fresh regions.
fn setup() -> (BitmapStore<Counted>, Vec<(u64, u64)>) {
    let mut s = three_bitmaps(DISK);
    let t = s.tracker().unwrap();
    let mut marks = vec![(0, 1), (REGION_DISK + 4096, 9000)];
    for &(o, l) in &marks {
        t.mark(o, l);
    }
    s.flush().unwrap();
    for m in [
        (512 * 7, 1),
        (2 * REGION_DISK + 3, 1),
        (3 * REGION_DISK, 70_000),
    ] {
        t.mark(m.0, m.1);
        marks.push(m);
    }
    (s, marks)
}

/// (writes, syncs, grows) the operation issues on a fault-free run.
fn counts(op: Op) -> (u64, u64, u64) {
    let (mut s, _) = setup_for(op);
    let st = s.image().storage();
    let before = (st.writes(), st.syncs(), st.grows());
    run(&mut s, op).unwrap();
    let st = s.image().storage();
    (
        st.writes() - before.0,
        st.syncs() - before.1,
        st.grows() - before.2,
    )
}

fn run(s: &mut BitmapStore<Counted>, op: Op) -> dirty_bitmap::Result<()> {
    match op {
        Op::Flush | Op::FlushWhole => s.flush().map(drop),
        Op::Inactivate | Op::InactivateWhole => s.inactivate().map(drop),
        Op::FullRewrite => s.inactivate_full_rewrite().map(drop),
    }
}

fn check_after_fault(op: Op, plan_of: impl Fn(u64, u64, u64) -> FaultPlan, what: &str) {
    let (mut s, marks) = setup_for(op);
    let st = s.image().storage();
    let (w0, y0, g0) = (st.writes(), st.syncs(), st.grows());
    let bitmaps = s.bitmaps().unwrap();
    let pending_before: u64 = bitmaps.iter().map(|b| b.changed_region_count()).sum();
    let tracker = s.tracker().unwrap();
    st.set_plan(plan_of(w0, y0, g0));
    let err = run(&mut s, op).expect_err(what);
    assert!(!matches!(err, Error::Poisoned), "{what}: {err}");
    // The guest goes on writing after the failure (a failed migration resumes it): with
    // one fault the store could still say so on disk, so the mark returns, and the disk
    // below must not claim clean without it.
    assert!(!s.marks_held(), "{what}: one fault holds the marks");
    tracker.mark(LATE.0, LATE.1);
    // Refuses further writes until reopened.
    s.image().storage().set_plan(FaultPlan::new());
    for r in [
        s.flush().map(drop),
        s.add("new", 512, Recording::Enabled),
        s.inactivate().map(drop),
        s.prepare_stop(BytesPerMs::from_bytes_per_ms(1.0), Millis(1))
            .map(drop),
    ] {
        assert!(matches!(r, Err(Error::Poisoned)), "{what}: {r:?}");
    }
    // Memory keeps every bit, and nothing taken is forgotten.
    for (i, b) in bitmaps.iter().enumerate() {
        for &(o, l) in &marks {
            let want = i < 2;
            assert_eq!(b.is_dirty(o) && b.is_dirty(o + l - 1), want, "{what}: {i}");
        }
    }
    let pending_after: u64 = bitmaps.iter().map(|b| b.changed_region_count()).sum();
    if matches!(op, Op::Flush | Op::FlushWhole) {
        assert!(pending_after >= pending_before, "{what}: regions lost");
    }
    // The disk: no corruption, never falsely clean.
    let bytes = s.image().storage().inner().to_vec();
    drop(s);
    let d = BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadOnly)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let r = d.image().check().unwrap();
    assert_eq!(r.corruptions, 0, "{what}: {:?}", r.messages);
    // Every bitmap is still listed (an untrusted one as inconsistent): a directory that
    // lost one would skip the checks below.
    let names: Vec<String> = d.list().iter().map(|i| i.name.to_string()).collect();
    assert_eq!(names, ["a", "b", "off"], "{what}");
    for info in d.list() {
        if info.state == BitmapState::Inconsistent {
            continue;
        }
        assert!(
            !matches!(op, Op::Flush | Op::FlushWhole),
            "{what}: {} clean after a failed flush",
            info.name
        );
        let bm = d.load(&info.name).unwrap();
        if info.name == "off" {
            assert_eq!(bm.count(), 0);
            continue;
        }
        for &(o, l) in marks.iter().chain([&LATE]) {
            assert!(
                bm.is_dirty(o) && bm.is_dirty(o + l - 1),
                "{what}: {} falsely clean, misses ({o}, {l})",
                info.name
            );
        }
    }
}

#[test]
fn eio_at_every_write_of_flush_and_inactivate() {
    for op in OPS {
        let (writes, _, _) = counts(op);
        eprintln!("{op:?}: {writes} writes");
        if matches!(op, Op::FlushWhole | Op::InactivateWhole) {
            // The 64 changed regions of `a`, apart, and `b`'s go out as few runs:
            // rewritten whole.
            assert!(
                (1..8).contains(&writes),
                "{op:?}: {writes} writes, not a whole rewrite"
            );
        } else {
            assert!(writes >= 3, "{op:?}: {writes}");
        }
        for k in 1..=writes {
            // A prefix of 16 bytes tears the small writes too (the flags commit rewrites a
            // 96-byte directory; 100 bytes would land it whole): the first entry's words.
            for landed in [
                Landed::Nothing,
                Landed::Prefix(16),
                Landed::Prefix(100),
                Landed::All,
            ] {
                check_after_fault(
                    op,
                    |w0, _, _| FaultPlan::new().fail_write(Trigger::Nth(w0 + k), landed),
                    &format!("{op:?}: write {k}/{writes} fails, {landed:?}"),
                );
            }
        }
    }
}

#[test]
fn eio_at_every_sync_of_flush_and_inactivate() {
    for op in OPS {
        let (_, syncs, _) = counts(op);
        eprintln!("{op:?}: {syncs} syncs");
        assert!(syncs >= 1, "{op:?}: {syncs}");
        for k in 1..=syncs {
            check_after_fault(
                op,
                |_, y0, _| FaultPlan::new().fail_sync(Trigger::Nth(y0 + k)),
                &format!("{op:?}: sync {k}/{syncs} fails"),
            );
        }
    }
}

#[test]
fn enospc_when_a_flush_allocates() {
    for op in OPS {
        let (_, _, grows) = counts(op);
        eprintln!("{op:?}: {grows} grows");
        // A whole rewrite allocates nothing (every region it writes has its cluster).
        let whole = matches!(op, Op::FlushWhole | Op::InactivateWhole);
        assert!(whole || grows >= 1, "{op:?}: the fixture must allocate");
        for k in 1..=grows {
            check_after_fault(
                op,
                |_, _, g0| FaultPlan::new().fail_grow(Trigger::Nth(g0 + k)),
                &format!("{op:?}: grow {k}/{grows} fails with ENOSPC"),
            );
        }
    }
}

/// The tables are kept in memory while the store is active: after a flush, a stop with
/// nothing changed reads nothing and writes only the directory's flags, with one barrier
/// (what `docs/BENCHMARKS.md` compares with the floor of one flags write and barrier).
/// Reactivating forgets them: the first flush after it reads the tables again.
/// Stops `s` (nothing changed since its last flush) and checks that the stop read nothing
/// and wrote the flags alone, with one barrier.
fn stop_reads_nothing_and_writes_the_flags(s: &mut BitmapStore<Counted>) {
    let (reads, writes, syncs) = {
        let st = s.image().storage();
        (st.reads(), st.writes(), st.syncs())
    };
    s.inactivate().unwrap();
    let st = s.image().storage();
    assert_eq!(st.reads() - reads, 0, "the stop read the disk");
    assert_eq!(
        st.writes() - writes,
        1,
        "the stop wrote more than the flags"
    );
    assert_eq!(st.syncs() - syncs, 1);
}

#[test]
fn a_stop_with_nothing_changed_reads_no_table() {
    let (mut s, marks) = setup();
    s.flush().unwrap();
    let t = s.tracker().unwrap();
    // Marks on bits already dirty change nothing.
    t.mark(marks[0].0, 1);
    stop_reads_nothing_and_writes_the_flags(&mut s);
    s.activate().unwrap();
    t.mark(7 * REGION_DISK, 1);
    let reads = s.image().storage().reads();
    s.flush().unwrap();
    assert!(
        s.image().storage().reads() > reads,
        "a kept table outlived the inactivate"
    );
    let img = s.close().unwrap();
    assert!(img.check().unwrap().is_clean());
}

/// A directory commit while active (an add, a removal) keeps the tables of the bitmaps
/// whose entries still name the same table, and an added bitmap's zero table is known
/// without a read: neither the next flush nor a stop with nothing changed reads a table.
#[test]
fn directory_commits_keep_the_tables_a_stop_would_read() {
    let (mut s, marks) = setup();
    s.flush().unwrap();
    let t = s.tracker().unwrap();
    s.add("quiet", 512, Recording::Disabled).unwrap();
    s.remove("off").unwrap();
    s.add("new", 512, Recording::Enabled).unwrap();
    // Clean in `new` alone: its flush allocates a data cluster and writes its entry
    // through the zero table kept at the add.
    t.mark(marks[0].0, 1);
    // Clean in every recording bitmap, in regions of `a` and `b` that have data clusters:
    // written in place through the tables the commits carried (a wrong one would put it
    // in another cluster), and into a fresh cluster of `new`.
    const IN_PLACE: (u64, u64) = (REGION_DISK + 4 * MIB, 1);
    t.mark(IN_PLACE.0, IN_PLACE.1);
    let reads = s.image().storage().reads();
    s.flush().unwrap();
    assert_eq!(
        s.image().storage().reads() - reads,
        0,
        "the flush after the commits read the disk"
    );
    // Dirty in every recording bitmap now: the stop writes the flags alone.
    t.mark(marks[0].0, 1);
    stop_reads_nothing_and_writes_the_flags(&mut s);
    // What the kept tables led the flushes to write is what a fresh read finds.
    let img = s.close().unwrap();
    assert!(img.check().unwrap().is_clean());
    let d = BitmapStore::open(
        MemStorage::from_bytes(img.storage().inner().to_vec()),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let names: Vec<String> = d.list().iter().map(|b| b.name.to_string()).collect();
    assert_eq!(names, ["a", "b", "quiet", "new"]);
    assert!(d.list().iter().all(|b| b.state == BitmapState::Consistent));
    for name in ["a", "b"] {
        let bm = d.load(name).unwrap();
        for &(o, l) in marks.iter().chain([&IN_PLACE]) {
            assert!(
                bm.is_dirty(o) && bm.is_dirty(o + l - 1),
                "{name} lost the mark ({o}, {l})"
            );
        }
    }
    let new = d.load("new").unwrap();
    assert!(new.is_dirty(marks[0].0), "new lost its mark");
    assert!(new.is_dirty(IN_PLACE.0), "new lost its mark");
    assert_eq!(new.count(), 2);
    assert_eq!(d.load("quiet").unwrap().count(), 0);
}

/// A stop whose last barrier fails may have left "clean" on disk. If every write that
/// would say "doubt" again fails too, the store holds the marks: the bitmaps stay sealed,
/// so a mark that would set a bit waits (no guest write it guards goes ahead while the disk
/// may claim the bitmap clean without it), and one on a bit already dirty still returns.
#[test]
fn a_stop_that_cannot_take_back_its_clean_holds_the_marks() {
    let (_, syncs, _) = counts(Op::Inactivate);
    let (mut s, marks) = setup();
    let tracker = s.tracker().unwrap();
    let y0 = s.image().storage().syncs();
    // The stop's last barrier fails, and every barrier after it.
    s.image()
        .storage()
        .set_plan(FaultPlan::new().fail_sync(Trigger::From(y0 + syncs)));
    s.inactivate().expect_err("the last barrier fails");
    assert!(s.marks_held());
    // A bit already dirty: one load, no wait.
    tracker.mark(marks[0].0, 1);
    let (tx, rx) = std::sync::mpsc::channel();
    let late = {
        let tracker = tracker.clone();
        std::thread::spawn(move || {
            tracker.mark(LATE.0, LATE.1);
            tx.send(()).unwrap();
        })
    };
    assert!(
        rx.recv_timeout(std::time::Duration::from_millis(300))
            .is_err(),
        "a mark on a clean bit returned while the disk may say clean"
    );
    // Unsealing gives the guarantee up: the waiting mark then lands.
    for b in s.bitmaps().unwrap() {
        b.unseal();
    }
    rx.recv().unwrap();
    late.join().unwrap();
    assert!(s.bitmaps().unwrap()[0].is_dirty(LATE.0));
}

/// The held marks of one store do not stall another. Store A holds its marks sealed (its
/// stop could not take "clean" back) while a guest write on A's disk waits in a fan-out
/// over A's two recording bitmaps. Store B, on another disk of the same process, then
/// checkpoints and disables a bitmap: both stop a bitmap recording, which waits for the
/// fan-outs in flight process-wide, and neither may wait for A's unseal.
#[test]
fn a_store_holding_its_marks_does_not_stall_another_stores_checkpoint_or_disable() {
    let (_, syncs, _) = counts(Op::Inactivate);
    let (mut s, _) = setup();
    let tracker = s.tracker().unwrap();
    let y0 = s.image().storage().syncs();
    s.image()
        .storage()
        .set_plan(FaultPlan::new().fail_sync(Trigger::From(y0 + syncs)));
    s.inactivate().expect_err("the last barrier fails");
    assert!(s.marks_held());
    // `a` unsealed by hand: the fan-out over `a` and `b` marks `a`, then meets `b` sealed
    // and waits, so `a`'s bit is the evidence that the writer reached the fan-out before
    // the other store's edits (without it, a writer not yet started would let them return
    // whatever the fan-out does).
    let held_bitmaps = s.bitmaps().unwrap();
    held_bitmaps[0].unseal();
    let (tx, rx) = std::sync::mpsc::channel();
    let late = {
        let tracker = tracker.clone();
        std::thread::spawn(move || {
            tracker.mark(LATE.0, LATE.1);
            tx.send(()).unwrap();
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !held_bitmaps[0].is_dirty(LATE.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never reached the fan-out"
        );
        std::thread::yield_now();
    }
    assert!(
        rx.recv_timeout(std::time::Duration::from_millis(100))
            .is_err(),
        "a mark on a clean bit returned while the disk may say clean"
    );
    let mut other = BitmapStore::create(MemStorage::new(), DISK, CS).unwrap();
    other.add("x", 512, Recording::Enabled).unwrap();
    other.activate().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let edits = std::thread::spawn(move || {
        let stopped = other.checkpoint("y").unwrap();
        other.set_enabled("y", false).unwrap();
        done_tx.send(()).unwrap();
        (other, stopped)
    });
    let returned = done_rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .is_ok();
    let held = rx.try_recv().is_err();
    // Unseal before asserting, so that a failure does not leave threads waiting.
    for b in s.bitmaps().unwrap() {
        b.unseal();
    }
    let (other, stopped) = edits.join().unwrap();
    rx.recv().unwrap();
    late.join().unwrap();
    assert!(
        returned,
        "another store's checkpoint and disable waited for this store's held marks"
    );
    assert!(held, "the mark returned while the marks were held");
    assert_eq!(stopped.as_ref().map(|n| n.as_bytes()), Some(&b"x"[..]));
    assert!(other.bitmaps().unwrap().iter().all(|b| !b.is_enabled()));
    assert!(s.bitmaps().unwrap()[..2].iter().all(|b| b.is_dirty(LATE.0)));
}

/// With one failed barrier the stop takes its "clean" back in place: the directory says
/// `in_use` again for every bitmap it held (the disabled one too), and autoclear bit 0, the
/// last resort that would untrust every bitmap of the image, stays set.
#[test]
fn a_stop_whose_last_barrier_fails_puts_in_use_back_in_place() {
    let (_, syncs, _) = counts(Op::Inactivate);
    let (mut s, _) = setup();
    let y0 = s.image().storage().syncs();
    s.image()
        .storage()
        .set_plan(FaultPlan::new().fail_sync(Trigger::Nth(y0 + syncs)));
    s.inactivate().expect_err("the last barrier fails");
    assert!(!s.marks_held());
    let bytes = s.image().storage().inner().to_vec();
    drop(s);
    let d = BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadOnly).unwrap();
    assert!(
        d.image().header().bitmaps_consistent(),
        "the directory in place was enough: autoclear bit 0 stays set"
    );
    for info in d.list() {
        assert_eq!(info.state, BitmapState::Inconsistent, "{}", info.name);
    }
}

/// A store, clear, merge or resize of an inactive bitmap is refused before anything is
/// written when cluster 0, as this crate encodes it (header_length 112), cannot hold the
/// header of an image QEMU 5.0 or older laid out (header_length 104) and filled to within 8
/// bytes: refused after writing the new data and table clusters, it would leak them.
/// A 64 MiB image with 512-byte clusters and the disabled bitmaps `names`, whose cluster 0
/// is laid out as QEMU 5.0 did: the 104-byte header, the extensions as they were, then an
/// unknown extension that fills the cluster to its last byte. Its header cannot be
/// rewritten our way, so every directory commit is refused before any write.
fn qemu_5_0_cluster_0(names: &[&str]) -> Vec<u8> {
    use dirty_bitmap::format::HeaderArea;
    const CS: u64 = 512;
    let mut s = BitmapStore::create(MemStorage::new(), 64 * MIB, CS).unwrap();
    for n in names {
        s.add(n, 512, Recording::Disabled).unwrap();
    }
    let mut bytes = s.image().storage().to_vec();
    drop(s);
    let area = HeaderArea::decode(&bytes[..CS as usize]).unwrap();
    let hl = area.header.header_length as usize;
    assert_eq!(hl, 112);
    let mut c0 = bytes[..104].to_vec();
    c0[100..104].copy_from_slice(&104u32.to_be_bytes());
    let mut at = hl;
    loop {
        let t = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        if t == 0 {
            break;
        }
        let len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        let frame = 8 + len.div_ceil(8) * 8;
        c0.extend_from_slice(&bytes[at..at + frame]);
        at += frame;
    }
    let fill = CS as usize - c0.len() - 8 - 8;
    c0.extend_from_slice(&0x6462_6d78u32.to_be_bytes());
    c0.extend_from_slice(&(fill as u32).to_be_bytes());
    c0.extend(std::iter::repeat_n(0xa5u8, fill));
    c0.extend_from_slice(&[0u8; 8]);
    assert_eq!(c0.len(), CS as usize);
    bytes[..CS as usize].copy_from_slice(&c0);
    bytes
}

/// `repair -r all` that removes a broken bitmap writes each kept one's all-ones table
/// before its commit, so a header that cannot be rewritten is refused before any write, as
/// every other commit is: refused after those writes, the file would be grown and clusters
/// leaked.
#[test]
fn a_repair_whose_header_cannot_be_rewritten_is_refused_before_any_write() {
    use dirty_bitmap::format::HeaderArea;
    use dirty_bitmap::store::repair::{repair, Repair};
    let mut bytes = qemu_5_0_cluster_0(&["a", "b"]);
    // Bitmap a: a reserved flag bit, which QEMU refuses; b is kept.
    let area = HeaderArea::decode(&bytes[..512]).unwrap();
    let d = area.bitmaps.unwrap().directory_offset as usize;
    bytes[d + 15] |= 0x20;
    let mem = MemStorage::from_bytes(bytes.clone());
    let r = repair(&mem, Repair::All).map(|(_, report)| report);
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    assert!(mem.to_vec() == bytes, "the refusal wrote");
}

#[test]
fn a_header_that_cannot_be_rewritten_is_refused_before_any_write() {
    let bytes = qemu_5_0_cluster_0(&["b"]);
    let mut s = BitmapStore::open(MemStorage::from_bytes(bytes.clone()), OpenMode::ReadWrite)
        .expect("QEMU 5.0's layout opens");
    let bm = dirty_bitmap::DirtyBitmap::new(64 * MIB, 512).unwrap();
    bm.mark_dirty(0, 4096);
    for r in [
        s.store("b", &bm),
        s.clear("b"),
        s.merge("b", "b"),
        s.resize(128 * MIB),
    ] {
        assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
        assert!(s.image().storage().to_vec() == bytes, "the refusal wrote");
    }
    // A durable activation needs the mode extension, which cluster 0 has no room for:
    // refused before its allocation writes clusters and table entries, so the refusal
    // neither writes nor poisons the store.
    let r = s.activate_durable();
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    assert!(!s.is_active());
    assert!(s.image().storage().to_vec() == bytes, "the refusal wrote");
    // Refusals of input, not failed writes: the store is not poisoned.
    let r = s.remove("nosuch");
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    s.activate()
        .expect("a deferred activation writes flags in place");
}

/// Found by a write-before-refusal review: with an autoclear bit this crate does not know,
/// the first write of any kind rewrites cluster 0 to clear it, and on QEMU 5.0's full
/// cluster 0 that rewrite cannot be encoded: a deferred activation was refused there, and
/// the refusal poisoned the image (every later call answered `Poisoned`). Nothing had been
/// written; the refusal now comes before the write path, and the store stays usable.
#[test]
fn an_unencodable_cluster_0_with_an_unknown_autoclear_bit_is_refused_without_poison() {
    let mut bytes = qemu_5_0_cluster_0(&["b"]);
    bytes[95] |= 0x10;
    let mut s = BitmapStore::open(MemStorage::from_bytes(bytes.clone()), OpenMode::ReadWrite)
        .expect("QEMU 5.0's layout opens");
    let r = s.activate();
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    assert!(!s.is_active());
    assert!(s.image().storage().to_vec() == bytes, "the refusal wrote");
    assert!(
        !s.image().is_poisoned(),
        "a refusal of input poisoned the image"
    );
    let r = s.remove("nosuch");
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
}

/// The full-rewrite stop (QEMU's way, the benchmarks' baseline) writes every bitmap anew
/// before its commit; when cluster 0 has no room for the rewritten directory's extension,
/// that stop would fail after the writes, clear autoclear bit 0 (every bitmap untrusted),
/// leak the new clusters and poison the store. It is refused before the stop begins, and
/// the incremental stop, which writes flags in place, still works.
#[test]
fn a_full_rewrite_stop_that_cannot_commit_is_refused_before_any_write() {
    let bytes = qemu_5_0_cluster_0(&["b"]);
    let mut s = BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadWrite)
        .expect("QEMU 5.0's layout opens");
    s.activate().expect("activates: flags are written in place");
    s.set_enabled("b", true).unwrap();
    s.bitmap("b").unwrap().mark_dirty(4 * MIB, 4096);
    let before = s.image().storage().to_vec();
    let r = s.inactivate_full_rewrite();
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    assert!(s.image().storage().to_vec() == before, "the refusal wrote");
    assert!(s.is_active());
    s.inactivate()
        .expect("the incremental stop writes in place");
    let r = BitmapStore::open(
        MemStorage::from_bytes(s.image().storage().to_vec()),
        OpenMode::ReadOnly,
    )
    .unwrap();
    assert_eq!(r.list()[0].state, dirty_bitmap::BitmapState::Consistent);
    assert!(r.load("b").unwrap().is_dirty(4 * MIB));
}

/// The same refusals on a store that handed the image over (refused when it takes the
/// image back): the kept copy, which a resume takes up, keeps the marks made since and its
/// recording flag.
#[test]
fn a_refused_clear_or_disable_leaves_the_kept_copy_as_it_was() {
    let bytes = qemu_5_0_cluster_0(&["b"]);
    let mut s = BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadWrite)
        .expect("QEMU 5.0's layout opens");
    s.activate().expect("activates: flags are written in place");
    s.set_enabled("b", true).unwrap();
    let t = s.tracker().unwrap();
    s.inactivate()
        .expect("inactivates: flags are written in place");
    let before = s.image().storage().to_vec();
    let kept = t.bitmaps()[0].clone();
    t.mark(4 * MIB, 4096);
    assert!(kept.is_dirty(4 * MIB), "the kept copy records");
    let r = s.clear("b");
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    let enabled = kept.is_enabled();
    let r = s.set_enabled("b", !enabled);
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    assert!(s.image().storage().to_vec() == before, "the refusal wrote");
    assert_eq!(
        kept.is_enabled(),
        enabled,
        "the refused set_enabled changed the kept copy"
    );
    assert!(
        kept.is_dirty(4 * MIB),
        "the refused clear emptied the kept copy"
    );
}

/// A clear of an inactive store whose bitmaps an incremental inactivate parked: the parked
/// copy holds a mark made since, which the disk lacks. A clear that fails at any read or
/// write must leave that mark in the copy (the next activation resumes it), or the write
/// is in no bitmap.
#[test]
fn a_failed_clear_keeps_the_marks_a_parked_copy_holds() {
    for fail_writes in [false, true] {
        for k in 1.. {
            let mut s = BitmapStore::create(
                FaultStorage::new(MemStorage::new(), FaultPlan::new()),
                DISK,
                CS,
            )
            .unwrap();
            s.add("b", 512, Recording::Enabled).unwrap();
            s.activate().unwrap();
            let t = s.tracker().unwrap();
            s.inactivate().unwrap();
            let kept = t.bitmaps()[0].clone();
            t.mark(4 * MIB, 4096);
            {
                let f = s.image().storage();
                f.set_plan(if fail_writes {
                    FaultPlan::new().fail_write(Trigger::Nth(f.writes() + k), Landed::Nothing)
                } else {
                    FaultPlan::new().fail_read(Trigger::Nth(f.reads() + k))
                });
            }
            if s.clear("b").is_ok() {
                assert!(k > 1, "the clear neither read nor wrote");
                assert!(
                    !kept.is_dirty(4 * MIB),
                    "the clear left the parked copy's mark"
                );
                break;
            }
            assert!(
                kept.is_dirty(4 * MIB),
                "a clear that failed at {} {k} emptied the parked copy",
                if fail_writes { "write" } else { "read" }
            );
        }
    }
}

/// A remove of an inconsistent (`in_use`) bitmap that fails at any of its reads fails as
/// a whole and leaves the file as it was: a failed read of the table after the preflight
/// was taken for a garbage table, the table alone freed and the remove reported done,
/// leaking the data clusters.
#[test]
fn a_remove_of_an_in_use_bitmap_that_fails_a_read_writes_nothing() {
    let image = {
        let mut s = BitmapStore::create(MemStorage::new(), DISK, CS).unwrap();
        s.add("a", 512, Recording::Enabled).unwrap();
        s.add("b", 512, Recording::Enabled).unwrap();
        s.activate().unwrap();
        s.tracker().unwrap().mark(4 * MIB, 8 * MIB);
        s.flush().unwrap();
        // Left active: both bitmaps are in use on disk, as after a crash.
        s.image().storage().to_vec()
    };
    for k in 1.. {
        let mut s = BitmapStore::open(
            FaultStorage::new(MemStorage::from_bytes(image.clone()), FaultPlan::new()),
            OpenMode::ReadWrite,
        )
        .unwrap();
        {
            let f = s.image().storage();
            f.set_plan(FaultPlan::new().fail_read(Trigger::Nth(f.reads() + k)));
        }
        let before = s.image().storage().inner().to_vec();
        match s.remove("a") {
            Ok(_) => {
                assert!(k > 1, "the remove read nothing");
                s.image().storage().set_plan(FaultPlan::new());
                let r = s.image().check().unwrap();
                assert!(r.is_clean(), "{:?}", r.messages);
                break;
            }
            Err(e) => assert!(
                s.image().storage().inner().to_vec() == before,
                "a remove that failed at read {k} ({e}) wrote"
            ),
        }
    }
}

/// A resize at QEMU's 64 KiB clusters (the bitmaps extension past the first sector, so
/// the header writes are bracketed by autoclear bit 0) that fails where ordinary errors
/// come, before its header writes (the file cannot grow, at any of its growths; any of its
/// reads fails), leaves the old image with every bitmap trusted and its bits: only leaked
/// clusters.
#[test]
fn a_resize_that_cannot_grow_the_file_leaves_every_bitmap_trusted() {
    const BIG: u64 = 64 * 1024;
    for fail_reads in [false, true] {
        for k in 1.. {
            let mut s = BitmapStore::create(
                FaultStorage::new(MemStorage::new(), FaultPlan::new()),
                DISK,
                BIG,
            )
            .unwrap();
            for name in ["a", "b"] {
                s.add(name, 65536, Recording::Enabled).unwrap();
                let bm = dirty_bitmap::DirtyBitmap::new(DISK, 65536).unwrap();
                bm.mark_dirty(5 * MIB, 1);
                s.store(name, &bm).unwrap();
            }
            let before = s.image().storage().inner().to_vec();
            {
                let f = s.image().storage();
                f.set_plan(if fail_reads {
                    FaultPlan::new().fail_read(Trigger::Nth(f.reads() + k))
                } else {
                    FaultPlan::new().fail_grow(Trigger::Nth(f.grows() + k))
                });
            }
            let what = if fail_reads { "read" } else { "growth" };
            // Growing the disk 64 times grows its L1 table, so that moves too.
            if s.resize(64 * DISK).is_ok() {
                assert!(k > 2, "the resize had {} {what}s", k - 1);
                break;
            }
            let after = s.image().storage().inner().to_vec();
            assert!(
                after[..BIG as usize] == before[..BIG as usize],
                "{what} {k}: cluster 0 changed"
            );
            let s = BitmapStore::open(MemStorage::from_bytes(after), OpenMode::ReadOnly).unwrap();
            assert_eq!(s.list().len(), 2, "{what} {k}: a bitmap is not listed");
            for info in s.list() {
                assert_eq!(
                    info.state,
                    BitmapState::Consistent,
                    "{what} {k}: {:?} is no longer trusted",
                    info.name
                );
                let bm = s.load(&info.name).unwrap();
                assert!(
                    bm.is_dirty(5 * MIB) && bm.count() == 1,
                    "{what} {k}: {:?}",
                    info.name
                );
            }
        }
    }
}
