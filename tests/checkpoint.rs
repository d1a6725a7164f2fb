//! Checkpoints in one crash-safe commit (issue 13 §2): `BitmapStore::checkpoint`,
//! `changed_since`, `export_since`, with QEMU's tools as the judge where they can be.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::qemu::{assert_qemu_clean, nbd_dirty, p, qemu_bitmaps};
use common::{first_not_dirty, seeded_rng};
use dirty_bitmap::storage::{CrashStorage, FileStorage, MemStorage};
use dirty_bitmap::{BitmapStore, Error, OpenMode, Recording, StateProblem};
use parking_lot::Mutex;
use rand::RngExt;

const MIB: u64 = 1 << 20;
const G: u64 = 65536;

fn extents(bm: &dirty_bitmap::DirtyBitmap) -> Vec<(u64, u64)> {
    bm.dirty_extents().collect()
}

fn granules(ranges: &[(u64, u64)], g: u64) -> BTreeSet<u64> {
    ranges
        .iter()
        .flat_map(|&(o, l)| o / g..(o + l).div_ceil(g))
        .collect()
}

/// A chain of three checkpoints on an image file: each `checkpoint` disables the recording
/// bitmap and adds the next, `changed_since` is the union of a checkpoint and every later
/// one, `export_since` writes it into a bitmap `qemu-nbd` exports, and QEMU sees the flags
/// the chain promises. The first checkpoint of an image without a recording bitmap starts
/// the chain at 64 KiB.
#[test]
fn a_chain_of_checkpoints_and_what_changed_since_each() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    let disk = 256 * MIB;
    let mut st = BitmapStore::create(FileStorage::create(&img).unwrap(), disk, 65536).unwrap();
    assert_eq!(st.checkpoint("c1").unwrap(), None);
    st.activate().unwrap();
    let t = st.tracker().unwrap();
    let a = [(0, 4096), (10 * MIB, 2 * MIB)];
    let b = [(20 * MIB, 65536), (10 * MIB, 4096)];
    let c = [(disk - 512, 512)];
    for &(o, l) in &a {
        t.mark(o, l);
    }
    assert_eq!(st.checkpoint("c2").unwrap().unwrap().to_string(), "c1");
    for &(o, l) in &b {
        t.mark(o, l);
    }
    assert_eq!(st.checkpoint("c3").unwrap().unwrap().to_string(), "c2");
    for &(o, l) in &c {
        t.mark(o, l);
    }
    let since = |st: &BitmapStore<FileStorage>, n: &str| {
        granules(&extents(&st.changed_since(n).unwrap()), G)
    };
    let all = |sets: &[&[(u64, u64)]]| {
        let v: Vec<(u64, u64)> = sets.iter().flat_map(|s| s.iter().copied()).collect();
        granules(&v, G)
    };
    // The image cannot tell which bitmaps are later (see `what_changed_since_a_checkpoint_qemu_made`):
    // every union takes the whole chain, and holds every write since its checkpoint.
    for n in ["c1", "c2", "c3"] {
        assert_eq!(since(&st, n), all(&[&a, &b, &c]), "{n}");
    }
    assert_eq!(granules(&extents(&st.bitmap("c1").unwrap()), G), all(&[&a]));
    // An active store cannot export: the disk copy would be in_use.
    assert!(matches!(
        st.export_since("c2", "tmp"),
        Err(Error::WrongState(_))
    ));
    drop(t);
    st.inactivate().unwrap();
    st.export_since("c2", "tmp").unwrap();
    drop(st);
    assert_qemu_clean(&img);
    let flags: Vec<(String, Vec<String>)> = qemu_bitmaps(&img)
        .into_iter()
        .map(|(n, g, f)| {
            assert_eq!(g, G);
            (n, f)
        })
        .collect();
    let auto = |n: &str| {
        flags
            .iter()
            .any(|(m, f)| m == n && f.iter().any(|x| x == "auto"))
    };
    assert!(
        !auto("c1") && !auto("c2") && auto("c3") && !auto("tmp"),
        "{flags:?}"
    );
    let exported = granules(&nbd_dirty(&img, "tmp"), G);
    assert_eq!(exported, all(&[&a, &b, &c]));
    // After the backup: the exported bitmap and the oldest checkpoint go, one commit each,
    // and the union since c2 is c2's writes and c3's.
    let mut st = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    )
    .unwrap();
    st.remove("tmp").unwrap();
    st.remove("c1").unwrap();
    assert_eq!(since(&st, "c2"), all(&[&b, &c]));
    drop(st);
    assert_qemu_clean(&img);
}

/// Two recording bitmaps make the chain ambiguous: refused, and nothing is written.
#[test]
fn a_checkpoint_with_two_recording_bitmaps_is_refused_before_any_write() {
    let mut st = BitmapStore::create(MemStorage::new(), 64 * MIB, 65536).unwrap();
    st.add("a", G, Recording::Enabled).unwrap();
    st.add("b", G, Recording::Enabled).unwrap();
    let before = st.image().storage().to_vec();
    let e = st.checkpoint("c").unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e:?}");
    assert!(e.to_string().contains("a, b"), "{e}");
    assert_eq!(st.image().storage().to_vec(), before);
}

/// Marks racing a checkpoint on an active store: every mark is in the old bitmap or the
/// new one (never in neither); every mark that returned before the call started is in the
/// old one, and every mark that started after it returned is in the new one.
#[test]
fn marks_racing_a_checkpoint_are_never_in_neither() {
    let (mut rng, seed) = seeded_rng("marks_racing_a_checkpoint_are_never_in_neither");
    println!("seed {seed}");
    let disk = 1 << 30;
    let mut racing = 0usize;
    for round in 0..20 {
        let mut st = BitmapStore::create(MemStorage::new(), disk, 65536).unwrap();
        st.add("old", 4096, Recording::Enabled).unwrap();
        st.activate().unwrap();
        let t = st.tracker().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        // (offset, phase) with phase 0 = returned before the call, 1 = racing, 2 = started
        // after it returned.
        let phase = Arc::new(std::sync::atomic::AtomicU8::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let seeds: Vec<u64> = (0..2).map(|_| rng.random()).collect();
        let handles: Vec<_> = seeds
            .into_iter()
            .map(|s| {
                let (t, stop, phase, log) = (t.clone(), stop.clone(), phase.clone(), log.clone());
                std::thread::spawn(move || {
                    let mut x = s | 1;
                    while !stop.load(Ordering::SeqCst) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let off = (x % (disk / 4096)) * 4096;
                        let before = phase.load(Ordering::SeqCst);
                        t.mark(off, 4096);
                        let after = phase.load(Ordering::SeqCst);
                        let p = if after == 0 {
                            0
                        } else if before == 2 {
                            2
                        } else {
                            1
                        };
                        log.lock().push((off, p));
                    }
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_micros(200 + round * 50));
        phase.store(1, Ordering::SeqCst);
        st.checkpoint("new").unwrap();
        phase.store(2, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while log.lock().iter().filter(|&&(_, p)| p == 2).count() < 10
            && std::time::Instant::now() < deadline
        {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::SeqCst);
        for h in handles {
            h.join().unwrap();
        }
        let (old, new) = (st.bitmap("old").unwrap(), st.bitmap("new").unwrap());
        assert!(!old.is_enabled() && new.is_enabled());
        let log = log.lock();
        assert!(
            log.iter().any(|&(_, p)| p == 2),
            "round {round}: no mark after"
        );
        racing += log.iter().filter(|&&(_, p)| p == 1).count();
        for &(off, p) in log.iter() {
            let (o, n) = (old.is_dirty(off), new.is_dirty(off));
            assert!(
                o || n,
                "seed {seed} round {round}: mark at {off} in neither"
            );
            match p {
                0 => assert!(
                    o,
                    "seed {seed}: a mark before the call is not in the old one"
                ),
                2 => assert!(
                    n,
                    "seed {seed}: a mark after the call is not in the new one"
                ),
                _ => {}
            }
        }
        drop(t);
        st.inactivate().unwrap();
    }
    // The point of the test: some marks overlapped the call.
    assert!(
        racing > 0,
        "seed {seed}: no mark raced a checkpoint in 20 rounds"
    );
}

/// A crash at every point of a checkpoint (unsynced writes dropped, kept or torn) leaves
/// the chain as it was (the old bitmap recording, no new one) or as the commit made it
/// (the old one disabled, the new one recording, with the old one's bits intact), never
/// both or neither recording; and the image opens with no corruption.
#[test]
fn a_crash_anywhere_in_a_checkpoint_leaves_the_old_chain_or_the_new_one() {
    let crash = CrashStorage::new();
    let mut st = BitmapStore::create(&crash, 64 * MIB, 4096).unwrap();
    st.add("c1", G, Recording::Enabled).unwrap();
    st.activate().unwrap();
    let t = st.tracker().unwrap();
    t.mark(5 * MIB, 4096);
    st.inactivate().unwrap();
    drop(t);
    let start = crash.op_count();
    st.checkpoint("c2").unwrap();
    drop(st);
    let mut seen = BTreeSet::new();
    for mode in common::CRASH_MODES {
        for (point, image) in crash.crash_images(mode) {
            if point < start {
                continue;
            }
            let st = BitmapStore::open(MemStorage::from_bytes(image), OpenMode::ReadOnly)
                .unwrap_or_else(|e| panic!("point {point} {mode:?}: {e}"));
            let report = st.image().check().unwrap();
            assert_eq!(report.corruptions, 0, "point {point} {mode:?}: {report:?}");
            let list = st.list();
            let rec: Vec<String> = list
                .iter()
                .filter(|b| b.enabled)
                .map(|b| b.name.to_string())
                .collect();
            let names: Vec<String> = list.iter().map(|b| b.name.to_string()).collect();
            let outcome = match (names.as_slice(), rec.as_slice()) {
                ([a], [r]) if a == "c1" && r == "c1" => "old",
                ([a, b], [r]) if a == "c1" && b == "c2" && r == "c2" => "new",
                _ => panic!("point {point} {mode:?}: {names:?} recording {rec:?}"),
            };
            assert!(st.load("c1").unwrap().is_dirty(5 * MIB), "point {point}");
            seen.insert(outcome);
        }
    }
    assert_eq!(seen.len(), 2, "both outcomes must be reachable: {seen:?}");
}

/// A checkpoint on a store inactivated in this process, whose parked bitmaps a tracker
/// still marks, must not add the new bitmap on disk only and disable the parked old one, or
/// a mark would land in neither. The new bitmap is parked too: the tracker marks it, and
/// `activate` resumes it.
#[test]
fn a_checkpoint_while_inactive_keeps_the_trackers_marks() {
    let disk = 64 * MIB;
    let mut s = BitmapStore::create(MemStorage::new(), disk, 65536).unwrap();
    s.add("a", G, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let t = s.tracker().unwrap();
    t.mark(G, 1);
    s.inactivate().unwrap();
    let old = s.checkpoint("b").unwrap().unwrap();
    assert_eq!(old.as_bytes(), b"a");
    t.mark(5 * G, 1);
    s.activate().unwrap();
    let (a, b) = (s.bitmap("a").unwrap(), s.bitmap("b").unwrap());
    assert!(a.is_dirty(G) && !a.is_enabled() && b.is_enabled());
    assert!(
        b.is_dirty(5 * G),
        "a mark after the checkpoint is in neither bitmap"
    );
    t.mark(7 * G, 1);
    let bytes = s.close().unwrap().into_storage().to_vec();
    let d = BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadOnly).unwrap();
    let b = d.load("b").unwrap();
    assert_eq!(extents(&b), vec![(5 * G, G), (7 * G, G)]);
    assert_eq!(extents(&d.load("a").unwrap()), vec![(G, G)]);
}

/// An inactive add or checkpoint parks the new bitmap whenever the store's stop parked, not
/// only when another bitmap is parked: a store whose stop parked none (it held no bitmap,
/// or its parked ones were removed since) would otherwise add it on disk alone, and a
/// tracker's mark after the call returned would be in no bitmap.
#[test]
fn an_inactive_add_is_parked_when_the_stop_parked_no_bitmap() {
    let disk = 64 * MIB;
    // The stop parked nothing: the store held no bitmap.
    let mut s = BitmapStore::create(MemStorage::new(), disk, 65536).unwrap();
    s.activate().unwrap();
    let t = s.tracker().unwrap();
    s.inactivate().unwrap();
    assert_eq!(s.checkpoint("c1").unwrap(), None);
    t.mark(3 * G, 1);
    // The parked bitmaps were all removed before the add.
    let mut r = BitmapStore::create(MemStorage::new(), disk, 65536).unwrap();
    r.add("a", G, Recording::Disabled).unwrap();
    r.activate().unwrap();
    let u = r.tracker().unwrap();
    r.inactivate().unwrap();
    r.remove("a").unwrap();
    r.add("b", G, Recording::Enabled).unwrap();
    u.mark(3 * G, 1);
    for (st, name) in [(&mut s, "c1"), (&mut r, "b")] {
        st.activate().unwrap();
        assert!(
            st.load(name).unwrap().is_dirty(3 * G),
            "{name}: a mark after the add returned is in no bitmap"
        );
        st.inactivate().unwrap();
        let bytes = st.image().storage().to_vec();
        let d = BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadOnly).unwrap();
        assert_eq!(extents(&d.load(name).unwrap()), vec![(3 * G, G)]);
    }
    // With no tracker alive nothing can mark the new bitmap before the next activation:
    // it is not parked, so a durable activation is not refused for holding parked bitmaps.
    let mut q = BitmapStore::create(MemStorage::new(), disk, 65536).unwrap();
    q.activate().unwrap();
    q.inactivate().unwrap();
    q.add("c", G, Recording::Enabled).unwrap();
    q.activate_durable()
        .expect("no parked bitmap without a tracker");
}

/// QEMU keeps the bitmaps it loaded in place and appends those one run created newest
/// first, so two checkpoints made in one `qemu-storage-daemon` session lie in the directory
/// as c1, c3, c2. "Since c2" taken as c2 and the bitmaps after it (none) would call the
/// disk clean although c3 recorded a write: a backup would miss it. The union takes every
/// bitmap.
#[test]
fn what_changed_since_a_checkpoint_qemu_made() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.qcow2");
    let mut st = BitmapStore::create(FileStorage::create(&img).unwrap(), 256 * MIB, G).unwrap();
    st.checkpoint("c1").unwrap();
    drop(st);
    let qmp = [
        r#"{"execute":"qmp_capabilities"}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"d","name":"c2","persistent":true}}"#,
        r#"{"execute":"block-dirty-bitmap-disable","arguments":{"node":"d","name":"c1"}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"d","name":"c3","persistent":true}}"#,
        r#"{"execute":"block-dirty-bitmap-disable","arguments":{"node":"d","name":"c2"}}"#,
        r#"{"execute":"quit"}"#,
    ];
    let mut qsd = std::process::Command::new(common::qemu::tool("qemu-storage-daemon"))
        .args([
            "--blockdev",
            &format!("driver=file,node-name=f,filename={}", p(&img)),
            "--blockdev",
            "driver=qcow2,node-name=d,file=f",
            "--chardev",
            "stdio,id=m",
            "--monitor",
            "chardev=m",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = qsd.stdin.take().unwrap();
        for line in qmp {
            writeln!(stdin, "{line}").unwrap();
        }
    }
    let out = qsd.wait_with_output().unwrap();
    let replies = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{replies}");
    assert_eq!(
        replies.matches(r#"{"return": {}}"#).count(),
        qmp.len(),
        "{replies}"
    );
    // A write after the second checkpoint: only c3 records it.
    common::qemu::ok("qemu-io", &["-f", "qcow2", "-c", "write 5M 4k", p(&img)]);
    let st = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let order: Vec<String> = st.list().iter().map(|b| b.name.to_string()).collect();
    assert_eq!(order, ["c1", "c3", "c2"], "QEMU's directory order");
    assert!(st.load("c3").unwrap().is_dirty(5 * MIB));
    assert!(
        st.changed_since("c2").unwrap().is_dirty(5 * MIB),
        "a write after checkpoint c2 is missing from what changed since it"
    );
}

/// A checkpoint on an image whose bitmaps extension is untrusted (autoclear bit 0 clear: a
/// program without bitmap support wrote it, or a crash inside one of our brackets) must not
/// filter those bitmaps out, start a new chain and drop the old one with its commit,
/// without a word. It is refused as for an inconsistent recording bitmap, before anything
/// is written.
#[test]
fn a_checkpoint_over_an_untrusted_chain_is_refused_before_any_write() {
    let mut st = BitmapStore::create(MemStorage::new(), 64 * MIB, G).unwrap();
    st.checkpoint("c1").unwrap();
    st.checkpoint("c2").unwrap();
    let mut bytes = st.image().storage().to_vec();
    // Autoclear bit 0 is the last bit of the header's bytes 88..96.
    bytes[95] &= !1;
    let mut st =
        BitmapStore::open(MemStorage::from_bytes(bytes.clone()), OpenMode::ReadWrite).unwrap();
    assert!(st
        .list()
        .iter()
        .all(|b| b.in_use || b.state != dirty_bitmap::BitmapState::Consistent));
    let r = st.checkpoint("c3");
    assert!(matches!(r, Err(Error::Inconsistent { .. })), "{r:?}");
    assert!(st.image().storage().to_vec() == bytes, "the refusal wrote");

    // The same chain behind a directory that does not read: no bitmap can be listed, and
    // the checkpoint is refused all the same, before writing.
    let area = dirty_bitmap::format::HeaderArea::decode(&bytes[..G as usize]).unwrap();
    assert!(
        area.bitmaps.is_none(),
        "an untrusted extension is not the image's"
    );
    let mut garbled = bytes.clone();
    // The directory is the extension's second field; find it through a trusted copy.
    let mut trusted = bytes.clone();
    trusted[95] |= 1;
    let ext = dirty_bitmap::format::HeaderArea::decode(&trusted[..G as usize])
        .unwrap()
        .bitmaps
        .unwrap();
    let d = ext.directory_offset as usize;
    garbled[d..d + ext.directory_size as usize].fill(0xff);
    let mut st =
        BitmapStore::open(MemStorage::from_bytes(garbled.clone()), OpenMode::ReadWrite).unwrap();
    assert!(st.list().is_empty(), "{:?}", st.list());
    let r = st.checkpoint("c3");
    assert!(
        matches!(r, Err(Error::WrongState(StateProblem::UntrustedBitmaps))),
        "{r:?}"
    );
    assert!(
        st.image().storage().to_vec() == garbled,
        "the refusal wrote"
    );
    // Adding a bitmap starts a new chain, as the refusal says; a checkpoint then goes on.
    st.add("fresh", G, Recording::Enabled).unwrap();
    assert_eq!(st.checkpoint("c3").unwrap().unwrap().as_bytes(), b"fresh");
}

/// An image with the chain c1 (disabled), c2 (recording), each with bits of its own and c1
/// with some in common with c2, inactive, on `storage`; and what changed since c1.
fn exported_chain<S: dirty_bitmap::storage::Storage>(
    storage: S,
) -> (BitmapStore<S>, dirty_bitmap::DirtyBitmap) {
    let disk = 64 * MIB;
    let mut st = BitmapStore::create(storage, disk, 4096).unwrap();
    st.add("c1", G, Recording::Enabled).unwrap();
    let bm = dirty_bitmap::DirtyBitmap::new(disk, G).unwrap();
    bm.mark_dirty(5 * MIB, 4096);
    bm.mark_dirty(20 * MIB, 3 * G);
    st.store("c1", &bm).unwrap();
    st.checkpoint("c2").unwrap();
    let bm = dirty_bitmap::DirtyBitmap::new(disk, G).unwrap();
    bm.mark_dirty(20 * MIB, 4096);
    bm.mark_dirty(disk - 512, 512);
    st.store("c2", &bm).unwrap();
    let want = st.changed_since("c1").unwrap();
    assert!(want.count() >= 5);
    (st, want)
}

/// What image `bytes` holds under the name "x": `None` if no consistent bitmap of that
/// name, else whether it holds every granule of `want`.
fn export_in(bytes: Vec<u8>, want: &dirty_bitmap::DirtyBitmap, at: &str) -> Option<bool> {
    let st = BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadOnly)
        .unwrap_or_else(|e| panic!("{at}: {e}"));
    let info = st.list().into_iter().find(|b| b.name.as_bytes() == b"x")?;
    if info.in_use || info.state != dirty_bitmap::BitmapState::Consistent {
        return None;
    }
    let x = st.load("x").unwrap_or_else(|e| panic!("{at}: {e}"));
    // Every granule of `want`, not only the ends of its extents.
    Some(first_not_dirty(&x, want.dirty_extents()).is_none())
}

/// `export_since` names `into` in one directory commit, its content written before it: a
/// bitmap added empty and consistent, its content still to come, is one that `qemu-nbd -B`
/// exports as clean (a backup through it copies nothing). At every crash point (unsynced
/// writes dropped, kept or torn), `x` is absent, or present, consistent and holding every
/// bit of `changed_since`.
#[test]
fn a_crash_anywhere_in_an_export_never_leaves_it_without_its_bits() {
    let crash = CrashStorage::new();
    let (mut st, want) = exported_chain(&crash);
    let start = crash.op_count();
    st.export_since("c1", "x").unwrap();
    drop(st);
    let mut seen = BTreeSet::new();
    for mode in common::CRASH_MODES {
        for (point, image) in crash.crash_images(mode) {
            if point < start {
                continue;
            }
            let at = format!("crash point {point} (export from {start}) {mode:?}");
            let got = export_in(image, &want, &at);
            assert_ne!(got, Some(false), "{at}: x is consistent without every bit");
            seen.insert(got.is_some());
        }
    }
    assert_eq!(seen.len(), 2, "both outcomes must be reachable: {seen:?}");
}

/// A failure in `export_since` never leaves `into` empty and consistent: its one commit
/// names `into` with its content, so no clean-up is needed (a `remove` would be refused on
/// the poisoned store). For every write and barrier of the export failing (and every one
/// after it), the image as it is then and as a crash would leave it holds no `x`, or one
/// with every bit of `changed_since`.
#[test]
fn a_failed_export_never_leaves_it_without_its_bits() {
    use dirty_bitmap::storage::{FaultPlan, FaultStorage, Landed, Trigger};
    use std::sync::Arc;
    let build = || {
        let crash = Arc::new(CrashStorage::new());
        let fault = Arc::new(FaultStorage::new(Arc::clone(&crash), FaultPlan::new()));
        let (st, want) = exported_chain(Arc::clone(&fault));
        (crash, fault, st, want)
    };
    let (_, fault, mut st, _) = build();
    let (w0, s0) = (fault.writes(), fault.syncs());
    st.export_since("c1", "x").unwrap();
    let (writes, syncs) = (fault.writes() - w0, fault.syncs() - s0);
    drop(st);
    let plans = (0..writes)
        .flat_map(|k| {
            [Landed::Nothing, Landed::All]
                .map(|l| FaultPlan::new().fail_write(Trigger::From(w0 + k + 1), l))
        })
        .chain((0..syncs).map(|k| FaultPlan::new().fail_sync(Trigger::From(s0 + k + 1))));
    let mut cases = 0;
    for plan in plans {
        let (crash, fault, mut st, want) = build();
        assert_eq!((fault.writes(), fault.syncs()), (w0, s0));
        fault.set_plan(plan);
        assert!(
            st.export_since("c1", "x").is_err(),
            "{plan:?}: the export did not fail"
        );
        drop(st);
        for (what, bytes) in [
            ("live", crash.live_image()),
            ("durable", crash.durable_image()),
        ] {
            assert_ne!(
                export_in(bytes, &want, &format!("{plan:?}, {what}")),
                Some(false),
                "{plan:?}: the {what} image holds x consistent without every bit"
            );
        }
        cases += 1;
    }
    assert!(cases > 8, "{cases} failure points");
}

/// How the store holds its bitmaps when the inconsistent one is removed.
#[derive(Debug, Clone, Copy)]
enum Held {
    Inactive,
    Active,
    Durable,
    Parked,
}

/// Chain c1 (disabled, one write), c2 (recording, one write only it holds at `only_c2`),
/// then c2 made inconsistent on disk (`in_use` set, as a crash of its writer leaves it):
/// the image's bytes.
fn chain_with_c2_in_use(disk: u64, only_c2: u64) -> Vec<u8> {
    let mut st = BitmapStore::create(MemStorage::new(), disk, G).unwrap();
    st.checkpoint("c1").unwrap();
    let c1 = st.load("c1").unwrap();
    c1.mark_dirty(0, 4096);
    st.store("c1", &c1).unwrap();
    st.checkpoint("c2").unwrap();
    let c2 = st.load("c2").unwrap();
    c2.mark_dirty(only_c2, 4096);
    st.store("c2", &c2).unwrap();
    let mut b = st.close().unwrap().into_storage().into_vec();
    let area = dirty_bitmap::format::HeaderArea::decode(&b[..G as usize]).unwrap();
    let d = area.bitmaps.unwrap().directory_offset as usize;
    // c1's entry is 32 bytes (24 + its 2-byte name, padded to 8); c2's flags word is at
    // 12 of its entry, in_use its lowest bit.
    assert_eq!(&b[d + 32 + 24..d + 32 + 26], b"c2");
    b[d + 32 + 15] |= 1;
    b
}

/// Puts `st` in the state `held` says.
fn hold<S: dirty_bitmap::storage::Storage>(st: &mut BitmapStore<S>, held: Held) {
    match held {
        Held::Inactive => {}
        Held::Active => st.activate().unwrap(),
        Held::Durable => st.activate_durable().unwrap(),
        Held::Parked => {
            st.activate().unwrap();
            st.inactivate().unwrap();
        }
    }
}

/// Removing an inconsistent later checkpoint alone, as the refusal of "since c1" left
/// the user to do, keeps c1: the commit that drops c2 leaves c1 all dirty (on disk, and in
/// memory where the store holds it), so "since c1" still holds the write only c2 had, and
/// QEMU sees c1 consistent and all dirty. Whatever way the store holds its bitmaps.
#[test]
fn removing_an_inconsistent_checkpoint_leaves_the_kept_ones_all_dirty() {
    let disk = 64 * MIB;
    let only_c2 = 40 * MIB;
    for held in [Held::Inactive, Held::Active, Held::Durable, Held::Parked] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("c.qcow2");
        std::fs::write(&img, chain_with_c2_in_use(disk, only_c2)).unwrap();
        let mut st = BitmapStore::open(
            FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
            OpenMode::ReadWrite,
        )
        .unwrap();
        assert!(matches!(
            st.changed_since("c1"),
            Err(Error::Inconsistent { .. })
        ));
        hold(&mut st, held);
        let made = st.remove("c2").unwrap();
        assert_eq!(
            made.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            ["c1"],
            "{held:?}"
        );
        let since = st.changed_since("c1").unwrap();
        assert!(
            since.is_dirty(only_c2),
            "{held:?}: the write only c2 held reads clean since c1"
        );
        assert_eq!(since.dirty_bytes(), disk, "{held:?}");
        drop(st.close().unwrap());
        assert_qemu_clean(&img);
        let listed = qemu_bitmaps(&img);
        assert_eq!(listed.len(), 1, "{held:?}: {listed:?}");
        assert_eq!(listed[0].0, "c1");
        assert!(
            !listed[0].2.iter().any(|f| f == "in-use"),
            "{held:?}: {listed:?}"
        );
        assert_eq!(nbd_dirty(&img, "c1"), [(0, disk)], "{held:?}");
        let st = BitmapStore::open(
            FileStorage::open(&img, OpenMode::ReadOnly).unwrap(),
            OpenMode::ReadOnly,
        )
        .unwrap();
        assert!(
            st.changed_since("c1").unwrap().is_dirty(only_c2),
            "{held:?}: reopened"
        );
    }
}

/// A crash at every write of the removal of the inconsistent c2 (unsynced writes dropped,
/// kept or torn), however the store held its bitmaps, leaves c2 there and inconsistent,
/// or c2 gone and c1 all dirty (or `in_use`, when the store was active): "since c1", once
/// c2 is removed from the crash image, always holds the write only c2 had.
#[test]
fn a_crash_anywhere_in_removing_an_inconsistent_checkpoint_never_leaves_a_false_clean() {
    let disk = 64 * MIB;
    let only_c2 = 40 * MIB;
    let bytes = chain_with_c2_in_use(disk, only_c2);
    for held in [Held::Inactive, Held::Active, Held::Durable, Held::Parked] {
        let crash = CrashStorage::from_bytes(bytes.clone());
        let mut st = BitmapStore::open(&crash, OpenMode::ReadWrite).unwrap();
        hold(&mut st, held);
        let start = crash.op_count();
        st.remove("c2").unwrap();
        drop(st);
        let mut seen = BTreeSet::new();
        for mode in common::CRASH_MODES {
            for (point, image) in crash.crash_images(mode) {
                if point < start {
                    continue;
                }
                let ctx = format!("{held:?} point {point} {mode:?}");
                let mut st = BitmapStore::open(MemStorage::from_bytes(image), OpenMode::ReadWrite)
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                let report = st.image().check().unwrap();
                assert_eq!(report.corruptions, 0, "{ctx}: {report:?}");
                let list = st.list();
                let state = |n: &str| list.iter().find(|b| b.name == n).map(|b| b.state);
                let c1 = state("c1").unwrap_or_else(|| panic!("{ctx}: c1 is gone"));
                match state("c2") {
                    Some(s) => {
                        assert_eq!(s, dirty_bitmap::BitmapState::Inconsistent, "{ctx}");
                        seen.insert("old");
                        st.remove("c2").unwrap_or_else(|e| panic!("{ctx}: {e}"));
                    }
                    None => {
                        seen.insert("new");
                    }
                }
                match st.changed_since("c1") {
                    Ok(since) => assert!(
                        since.is_dirty(only_c2),
                        "{ctx}: the write only c2 held reads clean since c1"
                    ),
                    Err(Error::Inconsistent { .. }) => {
                        assert_eq!(c1, dirty_bitmap::BitmapState::Inconsistent, "{ctx}");
                    }
                    Err(e) => panic!("{ctx}: {e}"),
                }
            }
        }
        assert_eq!(
            seen.len(),
            2,
            "{held:?}: both outcomes must be reachable: {seen:?}"
        );
    }
}

/// The chain c1 (disabled), c2 (recording, consistent): removing c2, the latest checkpoint,
/// leaves nothing recording, so the write only c2 held, and every one made until a new
/// chain, are in no kept bitmap. The removal makes c1 all dirty in the same commit (as
/// QEMU then sees it), so "since c1" never reads them clean, even across a new checkpoint
/// c3. Removing c1 instead changes nothing else: c2 still records.
#[test]
fn removing_the_recording_checkpoint_leaves_the_kept_ones_all_dirty() {
    let disk = 64 * MIB;
    let only_c2 = 40 * MIB;
    for held in [Held::Inactive, Held::Active, Held::Durable, Held::Parked] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("c.qcow2");
        let mut b = chain_with_c2_in_use(disk, only_c2);
        let area = dirty_bitmap::format::HeaderArea::decode(&b[..G as usize]).unwrap();
        let d = area.bitmaps.unwrap().directory_offset as usize;
        b[d + 32 + 15] &= !1;
        std::fs::write(&img, &b).unwrap();
        let open = |mode| BitmapStore::open(FileStorage::open(&img, mode).unwrap(), mode).unwrap();
        let mut st = open(OpenMode::ReadWrite);
        assert!(st.changed_since("c1").unwrap().is_dirty(only_c2));
        hold(&mut st, held);
        let made = st.remove("c2").unwrap();
        assert_eq!(
            made.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            ["c1"],
            "{held:?}"
        );
        assert!(
            st.changed_since("c1").unwrap().is_dirty(only_c2),
            "{held:?}: the write only c2 held reads clean since c1"
        );
        assert_eq!(st.changed_since("c1").unwrap().dirty_bytes(), disk);
        drop(st.close().unwrap());
        assert_qemu_clean(&img);
        assert_eq!(nbd_dirty(&img, "c1"), [(0, disk)], "{held:?}");
        let mut st = open(OpenMode::ReadWrite);
        st.checkpoint("c3").unwrap();
        assert!(
            st.changed_since("c1").unwrap().is_dirty(only_c2),
            "{held:?}: a new chain joined c1 across the gap"
        );
        drop(st.close().unwrap());

        // Removing the oldest instead: c2 still records, nothing else changes.
        std::fs::write(&img, &b).unwrap();
        let mut st = open(OpenMode::ReadWrite);
        hold(&mut st, held);
        assert!(st.remove("c1").unwrap().is_empty(), "{held:?}");
        let since = st.changed_since("c2").unwrap();
        assert_eq!(since.dirty_bytes(), G, "{held:?}: c2 kept its bits alone");
    }
}

/// A checkpoint on an active store (the deferred add keeps its zero table, the old bitmap
/// stops recording in memory), flushes after it that write into the new bitmap's kept
/// table, and the stop: at every crash point from the checkpoint on (unsynced writes
/// dropped, kept or torn), the image opens without corruption, and each bitmap is
/// inconsistent or holds every mark made on it before the stop began: the old one the
/// marks before the checkpoint, the new one those after it. (The checkpoint sweep above
/// runs on an inactive store only; this one on an active store.)
#[test]
fn a_crash_anywhere_around_an_active_checkpoint_never_trusts_a_bitmap_without_its_marks() {
    let crash = CrashStorage::new();
    let mut st = BitmapStore::create(&crash, 64 * MIB, 4096).unwrap();
    st.add("c1", G, Recording::Enabled).unwrap();
    st.activate().unwrap();
    let t = st.tracker().unwrap();
    t.mark(5 * MIB, 4096);
    st.flush().unwrap();
    t.mark(9 * MIB, 4096);
    let start = crash.op_count();
    assert_eq!(st.checkpoint("c2").unwrap().unwrap().as_bytes(), b"c1");
    t.mark(13 * MIB, 4096);
    st.flush().unwrap();
    t.mark(17 * MIB, 4096);
    st.inactivate().unwrap();
    drop(t);
    drop(st);
    let wants: [(&str, [u64; 2]); 2] = [("c1", [5 * MIB, 9 * MIB]), ("c2", [13 * MIB, 17 * MIB])];
    let (mut trusted, mut points) = (BTreeSet::new(), 0);
    for mode in common::CRASH_MODES {
        for (point, image) in crash.crash_images(mode) {
            if point < start {
                continue;
            }
            points += 1;
            let at = format!("point {point} {mode:?}");
            let st = BitmapStore::open(MemStorage::from_bytes(image), OpenMode::ReadOnly)
                .unwrap_or_else(|e| panic!("{at}: {e}"));
            let report = st.image().check().unwrap();
            assert_eq!(report.corruptions, 0, "{at}: {report:?}");
            let list = st.list();
            assert!(list.iter().any(|b| b.name == "c1"), "{at}: c1 is gone");
            for b in list.iter().filter(|b| !b.in_use) {
                let (name, marks) = wants
                    .iter()
                    .find(|(n, _)| b.name == *n)
                    .unwrap_or_else(|| panic!("{at}: {:?} listed", b.name));
                let bm = st.load(&b.name).unwrap();
                for m in marks {
                    assert!(bm.is_dirty(*m), "{at}: {name} consistent without {m}");
                }
                trusted.insert(*name);
            }
        }
    }
    // Not vacuous: each bitmap is seen trusted at some point (the stop's end).
    assert_eq!(trusted.len(), 2, "{points} points, trusted {trusted:?}");
}

/// `checkpoint` asks whether the store can write at all before it runs its chain checks, so
/// a read-only store with two recording bitmaps says `ReadOnly`, not to fix the chain ("2
/// bitmaps record"); and `export_since` on a read-only store says `ReadOnly` before it
/// builds the union.
#[test]
fn a_read_only_store_refuses_a_checkpoint_and_an_export_as_read_only() {
    let mut st = BitmapStore::create(MemStorage::new(), 64 * MIB, G).unwrap();
    st.add("a", G, Recording::Enabled).unwrap();
    st.add("b", G, Recording::Enabled).unwrap();
    let bytes = st.image().storage().to_vec();
    let mut ro = BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadOnly).unwrap();
    let r = ro.checkpoint("c");
    assert!(matches!(r, Err(Error::ReadOnly)), "{r:?}");
    let r = ro.export_since("a", "x");
    assert!(matches!(r, Err(Error::ReadOnly)), "{r:?}");
    let r = ro.export_since("nosuch", "x");
    assert!(matches!(r, Err(Error::ReadOnly)), "{r:?}");
}

/// A disk shrunk and grown back reads zeros where it held data before the shrink, and a
/// backup taken before holds that data: "since" the checkpoint, the regrown area must be
/// dirty, or a restore of that backup plus the changes keeps data the disk no longer has.
/// The image cannot tell a regrown area from a new one, so every grown area is dirty, in
/// every bitmap, from the granule straddling the old end on, and the bits below the old
/// end are as they were.
#[test]
fn a_disk_shrunk_and_grown_back_is_dirty_where_it_grew() {
    let mut s = BitmapStore::create(MemStorage::new(), 8 * MIB, G).unwrap();
    s.add("c1", G, Recording::Enabled).unwrap();
    s.activate().unwrap();
    s.bitmap("c1").unwrap().mark_dirty(MIB, 4096);
    s.checkpoint("c2").unwrap();
    let mut s = BitmapStore::open(s.close().unwrap().into_storage(), OpenMode::ReadWrite).unwrap();
    s.resize(4 * MIB + 512).unwrap();
    assert_eq!(extents(&s.changed_since("c1").unwrap()), [(MIB, G)]);
    s.resize(8 * MIB).unwrap();
    for name in ["c1", "c2"] {
        let since = s.changed_since(name).unwrap();
        assert!(since.is_dirty(6 * MIB), "{name}: the regrown area is clean");
        // The union holds every other bitmap's bits, c1's for c2 too.
        assert_eq!(extents(&since), [(MIB, G), (4 * MIB, 4 * MIB)], "{name}");
    }
    // Each bitmap alone: its own bits, and the grown area.
    assert_eq!(
        extents(&s.load("c1").unwrap()),
        [(MIB, G), (4 * MIB, 4 * MIB)]
    );
    assert_eq!(extents(&s.load("c2").unwrap()), [(4 * MIB, 4 * MIB)]);
}
