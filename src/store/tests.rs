//! Unit tests for the bitmap store on `MemStorage`.

use super::commit::flags_only_change;
use super::*;
use crate::error::CheckFindings;
use crate::format::encode_directory;
use crate::format::header::AUTOCLEAR_BITMAPS;
use crate::storage::{MemStorage, StorageExt};

const MIB: u64 = 1 << 20;

fn new_store(disk: u64, cs: u64) -> BitmapStore<MemStorage> {
    BitmapStore::create(MemStorage::new(), disk, cs).unwrap()
}

fn reopen(s: BitmapStore<MemStorage>, mode: OpenMode) -> BitmapStore<MemStorage> {
    let bytes = s.image.into_storage().into_vec();
    BitmapStore::open(MemStorage::from_bytes(bytes), mode).unwrap()
}

fn assert_clean(s: &BitmapStore<MemStorage>) {
    let r = s.image().check().unwrap();
    assert!(r.is_clean(), "{:?}", &r.messages[..r.messages.len().min(8)]);
}

#[test]
fn add_store_load_roundtrip_and_clean() {
    for cs in [512, 4096, 65536, 2 * MIB] {
        let mut s = new_store(64 * MIB + 512, cs);
        s.add("a", 512, Recording::Enabled).unwrap();
        s.add("b", 65536, Recording::Disabled).unwrap();
        assert_clean(&s);
        let bm = DirtyBitmap::new(64 * MIB + 512, 512).unwrap();
        bm.mark_dirty(0, 1);
        bm.mark_dirty(5 * MIB, 3 * MIB);
        bm.mark_dirty(64 * MIB, 512);
        s.store("a", &bm).unwrap();
        assert_clean(&s);
        let s = reopen(s, OpenMode::ReadOnly);
        let got = s.load("a").unwrap();
        assert_eq!(
            got.dirty_extents().collect::<Vec<_>>(),
            bm.dirty_extents().collect::<Vec<_>>()
        );
        let l = s.list();
        assert_eq!(l.len(), 2);
        assert_eq!(
            (l[0].granularity, l[0].enabled, l[0].in_use),
            (512, true, false)
        );
        assert_eq!((l[1].granularity, l[1].enabled), (65536, false));
        assert_eq!(s.load("b").unwrap().count(), 0);
    }
}

#[test]
fn remove_frees_everything_and_drops_the_extension() {
    let mut s = new_store(16 * MIB, 4096);
    let fresh = s.image().storage().to_vec();
    s.add("x", 4096, Recording::Enabled).unwrap();
    let bm = DirtyBitmap::new(16 * MIB, 4096).unwrap();
    bm.mark_dirty(0, 16 * MIB);
    s.store("x", &bm).unwrap();
    s.remove("x").unwrap();
    assert_clean(&s);
    assert!(s.list().is_empty());
    assert!(s.image().area().bitmaps.is_none());
    assert_eq!(s.image().header().autoclear_features & AUTOCLEAR_BITMAPS, 0);
    // Freed clusters are reused: the same store again lands on the same clusters.
    let len = s.image().storage().len().unwrap();
    s.add("y", 4096, Recording::Enabled).unwrap();
    s.store("y", &bm).unwrap();
    assert_eq!(s.image().storage().len().unwrap(), len);
    assert!(fresh.len() as u64 <= len);
}

#[test]
fn activate_sets_in_use_and_a_crash_leaves_it_inconsistent() {
    let mut s = new_store(16 * MIB, 65536);
    s.add("a", 65536, Recording::Enabled).unwrap();
    s.activate().unwrap();
    assert!(s.list()[0].in_use);
    s.bitmap("a").unwrap().mark_dirty(MIB, 1);
    // Crash: drop without close.
    let s = reopen(s, OpenMode::ReadWrite);
    let l = s.list();
    assert_eq!(l[0].state, BitmapState::Inconsistent);
    assert!(matches!(s.load("a"), Err(Error::Inconsistent { .. })));
    let mut s = s;
    assert!(matches!(s.clear("a"), Err(Error::Inconsistent { .. })));
    assert!(matches!(
        s.set_enabled("a", false),
        Err(Error::Inconsistent { .. })
    ));
    assert!(matches!(s.merge("a", "a"), Err(Error::Inconsistent { .. })));
    let empty = DirtyBitmap::new(16 * MIB, 65536).unwrap();
    assert!(matches!(
        s.store("a", &empty),
        Err(Error::Inconsistent { .. })
    ));
    s.remove("a").unwrap();
    assert_clean(&s);
}

#[test]
fn activate_close_keeps_marks() {
    let mut s = new_store(16 * MIB, 65536);
    s.add("a", 65536, Recording::Enabled).unwrap();
    s.add("d", 4096, Recording::Disabled).unwrap();
    s.activate().unwrap();
    s.bitmap("a").unwrap().mark_dirty(3 * MIB, 100);
    s.bitmap("d").unwrap().mark_dirty(3 * MIB, 100); // disabled: ignored
    s.set_enabled("d", true).unwrap();
    s.bitmap("d").unwrap().mark_dirty(MIB, 1);
    let img = s.close().unwrap();
    let s = BitmapStore::open(
        MemStorage::from_bytes(img.into_storage().into_vec()),
        OpenMode::ReadOnly,
    )
    .unwrap();
    assert_clean(&s);
    let l = s.list();
    assert!(l
        .iter()
        .all(|b| !b.in_use && b.state == BitmapState::Consistent && b.enabled));
    assert_eq!(
        s.load("a").unwrap().dirty_extents().collect::<Vec<_>>(),
        vec![(3 * MIB, 65536)]
    );
    assert_eq!(
        s.load("d").unwrap().dirty_extents().collect::<Vec<_>>(),
        vec![(MIB, 4096)]
    );
}

#[test]
fn merge_across_granularities() {
    let mut s = new_store(16 * MIB, 65536);
    s.add("fine", 512, Recording::Enabled).unwrap();
    s.add("coarse", 1 << 20, Recording::Enabled).unwrap();
    let bm = DirtyBitmap::new(16 * MIB, 512).unwrap();
    bm.mark_dirty(MIB + 512, 512);
    s.store("fine", &bm).unwrap();
    s.merge("fine", "coarse").unwrap();
    assert_eq!(
        s.load("coarse")
            .unwrap()
            .dirty_extents()
            .collect::<Vec<_>>(),
        vec![(MIB, MIB)]
    );
    let mut other = new_store(16 * MIB, 4096);
    other.add("t", 65536, Recording::Enabled).unwrap();
    other.merge_from(&s, "fine", "t").unwrap();
    assert_eq!(
        other.load("t").unwrap().dirty_extents().collect::<Vec<_>>(),
        vec![(MIB, 65536)]
    );
    let mut small = new_store(8 * MIB, 4096);
    small.add("t", 65536, Recording::Enabled).unwrap();
    assert!(matches!(
        small.merge_from(&s, "fine", "t"),
        Err(Error::InvalidInput(_))
    ));
    assert_clean(&s);
    assert_clean(&other);
}

#[test]
fn add_rejects_bad_input() {
    let mut s = new_store(16 * MIB, 65536);
    let long = "x".repeat(1024);
    for (name, g) in [
        ("", 65536),
        (long.as_str(), 65536),
        ("n\0", 65536),
        ("g", 256),
        ("g", 1 << 32),
        ("g", 3000),
    ] {
        assert!(
            matches!(
                s.add(name, g, Recording::Enabled),
                Err(Error::InvalidInput(_))
            ),
            "{name:?} {g}"
        );
    }
    s.add(&"y".repeat(1023), 1 << 31, Recording::Enabled)
        .unwrap();
    s.add("dup", 512, Recording::Enabled).unwrap();
    assert!(matches!(
        s.add("dup", 512, Recording::Enabled),
        Err(Error::Exists { ref name }) if name == "dup"
    ));
    assert!(matches!(
        s.remove("nope"),
        Err(Error::NotFound { ref name }) if name == "nope"
    ));
    // 512 MiB cap: 2^42 bytes at 512 B granularity needs 1 GiB of bitmap.
    let mut big = new_store(1 << 42, 2 * MIB);
    assert!(matches!(
        big.add("b", 512, Recording::Enabled),
        Err(Error::InvalidInput(_))
    ));
    big.add("b", 1024, Recording::Enabled).unwrap();
    let bm = DirtyBitmap::new(8 * MIB, 512).unwrap();
    assert!(matches!(s.store("dup", &bm), Err(Error::InvalidInput(_))));
}

#[test]
fn read_only_store_never_writes() {
    let mut s = new_store(16 * MIB, 65536);
    s.add("a", 65536, Recording::Enabled).unwrap();
    let bytes = s.image.into_storage().into_vec();
    let mut ro =
        BitmapStore::open(MemStorage::from_bytes(bytes.clone()), OpenMode::ReadOnly).unwrap();
    assert!(matches!(
        ro.add("b", 65536, Recording::Enabled),
        Err(Error::ReadOnly)
    ));
    assert!(matches!(ro.remove("a"), Err(Error::ReadOnly)));
    assert!(matches!(ro.activate(), Err(Error::ReadOnly)));
    ro.load("a").unwrap();
    assert_eq!(ro.image.into_storage().into_vec(), bytes);
}

#[test]
fn stale_extension_makes_every_bitmap_inconsistent() {
    let mut s = new_store(16 * MIB, 65536);
    s.add("a", 65536, Recording::Enabled).unwrap();
    s.add("b", 65536, Recording::Enabled).unwrap();
    let st = s.image.into_storage();
    // A program without bitmap support clears autoclear bit 0.
    st.write_u64_be_at(88, 0).unwrap();
    let mut s = BitmapStore::open(st, OpenMode::ReadWrite).unwrap();
    assert!(s
        .list()
        .iter()
        .all(|b| b.state == BitmapState::Inconsistent));
    assert!(matches!(s.load("a"), Err(Error::Inconsistent { .. })));
    s.remove("a").unwrap();
    // Every stale entry went with the header rewrite; their clusters leak.
    assert!(s.list().is_empty());
    let r = s.image().check().unwrap();
    assert_eq!((r.corruptions, r.exit_code()), (0, 3));
}

#[test]
fn autoclear_bit_without_extension_means_no_bitmaps_and_is_cleared() {
    let s = new_store(16 * MIB, 65536);
    let st = s.image.into_storage();
    st.write_u64_be_at(88, AUTOCLEAR_BITMAPS | (1 << 40))
        .unwrap();
    let mut s = BitmapStore::open(st, OpenMode::ReadWrite).unwrap();
    assert!(s.list().is_empty());
    s.add("a", 65536, Recording::Enabled).unwrap();
    s.remove("a").unwrap();
    assert_eq!(s.image().header().autoclear_features, 0);
    assert_eq!(s.image().storage().read_u64_be_at(88).unwrap(), 0);
}

#[test]
fn unknown_autoclear_bits_are_cleared_before_the_first_write() {
    use crate::storage::CrashStorage;
    let mut s = new_store(16 * MIB, 65536);
    s.add("a", 65536, Recording::Enabled).unwrap();
    let st = s.image.into_storage();
    st.write_u64_be_at(88, AUTOCLEAR_BITMAPS | (1 << 7))
        .unwrap();
    let crash = CrashStorage::from_bytes(st.into_vec());
    let mut s = BitmapStore::open(&crash, OpenMode::ReadWrite).unwrap();
    s.add("b", 65536, Recording::Enabled).unwrap();
    let ops = crash.ops();
    match &ops[0] {
        crate::storage::Op::Write { offset: 0, data } => {
            assert_eq!(
                u64::from_be_bytes(data[88..96].try_into().unwrap()),
                AUTOCLEAR_BITMAPS
            );
        }
        op => panic!("first op {op:?}"),
    }
    assert!(matches!(ops[1], crate::storage::Op::Sync));
}

#[test]
fn all_ones_entry_loads_with_tail_masked() {
    let disk = MIB + 512;
    let mut s = new_store(disk, 65536);
    s.add("a", 65536, Recording::Enabled).unwrap();
    let e = s.slots[0].entry.clone();
    s.image
        .storage()
        .write_u64_be_at(e.table_offset, 1)
        .unwrap();
    let bm = s.load("a").unwrap();
    assert_eq!(bm.count(), 17);
    assert_eq!(bm.dirty_extents().collect::<Vec<_>>(), vec![(0, disk)]);
}

fn corrupt_entry(patch: impl Fn(&MemStorage, u64)) -> Result<BitmapStore<MemStorage>> {
    let mut s = new_store(16 * MIB, 65536);
    s.add("abc", 65536, Recording::Enabled).unwrap();
    let dir = s.dir.unwrap().0;
    let st = s.image.into_storage();
    patch(&st, dir);
    BitmapStore::open(st, OpenMode::ReadOnly)
}

#[test]
fn corrupt_directories_are_refused_without_panic() {
    // reserved flag bit 2
    assert!(corrupt_entry(|st, d| st.write_u32_be_at(d + 12, 2 | 4).unwrap()).is_err());
    // wrong table size for a consistent bitmap
    assert!(corrupt_entry(|st, d| st.write_u32_be_at(d + 8, 2).unwrap()).is_err());
    // granularity 8 and 32
    assert!(corrupt_entry(|st, d| st.write_all_at(&[8], d + 17).unwrap()).is_err());
    assert!(corrupt_entry(|st, d| st.write_all_at(&[32], d + 17).unwrap()).is_err());
    // type 2
    assert!(corrupt_entry(|st, d| st.write_all_at(&[2], d + 16).unwrap()).is_err());
    // table offset past the end of the file
    let s = corrupt_entry(|st, d| st.write_u64_be_at(d, 1 << 40).unwrap()).unwrap();
    assert!(matches!(s.load("abc"), Err(Error::Corrupt(_))));
    // a table entry with reserved bits
    let s = corrupt_entry(|st, d| {
        let t = st.read_u64_be_at(d).unwrap();
        st.write_u64_be_at(t, 0x2).unwrap();
    })
    .unwrap();
    assert!(matches!(s.load("abc"), Err(Error::Corrupt(_))));
    // directory size huge: past end of file, refused before allocating
    let r = corrupt_entry(|st, _| {
        let ext = 0x70 + 8 + 384 + 8;
        st.write_u64_be_at(ext + 8, 60 << 20).unwrap();
    });
    assert!(r.is_err());
    // nb_bitmaps 0 and 65536 in the extension
    for nb in [0u32, 65536] {
        let r = corrupt_entry(|st, _| st.write_u32_be_at(0x200, nb).unwrap());
        assert!(matches!(r, Err(Error::Corrupt(_))), "nb_bitmaps {nb}");
    }
    // nb_bitmaps 2 with one entry
    assert!(corrupt_entry(|st, _| st.write_u32_be_at(0x200, 2).unwrap()).is_err());
    // extension reserved field
    assert!(corrupt_entry(|st, _| st.write_u32_be_at(0x204, 1).unwrap()).is_err());
    // directory size above the 64 MiB limit
    assert!(corrupt_entry(|st, _| st.write_u64_be_at(0x208, 67_107_848).unwrap()).is_err());
    // extra data
    assert!(corrupt_entry(|st, d| st.write_u32_be_at(d + 20, 8).unwrap()).is_err());
    // name_size 0 and a duplicate name need a second entry: covered by the codec tests.
    // in-use entry with a wrong table size is tolerated (QEMU does not load it)
    let s = corrupt_entry(|st, d| {
        st.write_u32_be_at(d + 8, 7).unwrap();
        st.write_u32_be_at(d + 12, 3).unwrap();
    })
    .unwrap();
    assert_eq!(s.list()[0].state, BitmapState::Inconsistent);
}

#[test]
fn nothing_is_written_without_a_change() {
    let mut s = new_store(16 * MIB, 65536);
    s.add("a", 65536, Recording::Enabled).unwrap();
    let before = s.image().storage().to_vec();
    let mut s = reopen(s, OpenMode::ReadWrite);
    s.set_enabled("a", true).unwrap();
    s.inactivate().unwrap();
    s.load("a").unwrap();
    let _ = s.list();
    assert_eq!(s.image.into_storage().into_vec(), before);
}

#[test]
fn many_bitmaps_and_directory_spanning_clusters() {
    let mut s = new_store(MIB, 512);
    for i in 0..100 {
        let recording = if i % 2 == 0 {
            Recording::Enabled
        } else {
            Recording::Disabled
        };
        s.add(&format!("bitmap-{i:04}"), 512, recording).unwrap();
    }
    assert_clean(&s);
    for i in (0..100).step_by(3) {
        s.remove(format!("bitmap-{i:04}")).unwrap();
    }
    assert_clean(&s);
    let s = reopen(s, OpenMode::ReadOnly);
    assert_eq!(s.list().len(), 66);
}

type Extents = Vec<(u64, u64)>;

/// Every crash point of a sequence of operations, in every crash mode, leaves an image
/// that opens, has no refcount corruption (leaks are allowed), and whose consistent
/// bitmaps each hold one of the versions that bitmap legitimately had. Never false-clean.
#[test]
fn every_crash_point_is_old_new_or_inconsistent() {
    for cs in [512, 4096, 65536] {
        crash_points_for(cs);
    }
}

fn crash_points_for(cs: u64) {
    use crate::storage::{CrashMode, CrashStorage};
    let disk = 8 * MIB;
    let mut s = new_store(disk, cs);
    s.add("a", 4096, Recording::Enabled).unwrap();
    s.add("b", 65536, Recording::Disabled).unwrap();
    let a0 = DirtyBitmap::new(disk, 4096).unwrap();
    a0.mark_dirty(MIB, 8192);
    s.store("a", &a0).unwrap();
    let b0 = DirtyBitmap::new(disk, 65536).unwrap();
    b0.mark_dirty(0, disk);
    s.store("b", &b0).unwrap();
    let base = s.image.into_storage().into_vec();

    let a1 = DirtyBitmap::new(disk, 4096).unwrap();
    a1.mark_dirty(5 * MIB, 3 * 4096);
    let a2 = a1.snapshot();
    a2.mark_dirty(7 * MIB, 1);

    let crash = CrashStorage::from_bytes(base);
    let mut s = BitmapStore::open(&crash, OpenMode::ReadWrite).unwrap();
    s.store("a", &a1).unwrap();
    s.add("c", 512, Recording::Enabled).unwrap();
    s.remove("b").unwrap();
    s.activate().unwrap();
    s.bitmap("a").unwrap().mark_dirty(7 * MIB, 1);
    s.bitmap("c").unwrap().mark_dirty(0, 512);
    s.close().unwrap();

    let ext = |b: &DirtyBitmap| -> Extents { b.dirty_extents().collect() };
    let legit_a = [ext(&a0), ext(&a1), ext(&a2)];
    let legit_b = [ext(&b0)];
    let legit_c = [vec![], vec![(0, 512)]];
    let mut points = 0;
    for mode in [
        CrashMode::Dropped,
        CrashMode::Kept,
        CrashMode::Torn { seed: 1 },
        CrashMode::Torn { seed: 2 },
    ] {
        for (point, image) in crash.crash_images(mode) {
            points += 1;
            let s = BitmapStore::open(MemStorage::from_bytes(image), OpenMode::ReadOnly)
                .unwrap_or_else(|e| panic!("{mode:?} point {point}: {e}"));
            let r = s.image().check().unwrap();
            assert_eq!(r.corruptions, 0, "{mode:?} point {point}: {:?}", r.messages);
            for info in s.list() {
                if info.state == BitmapState::Inconsistent {
                    continue;
                }
                let got = ext(&s.load(&info.name).unwrap());
                let legit: &[Extents] = match info.name.to_str().unwrap() {
                    "a" => &legit_a,
                    "b" => &legit_b,
                    "c" => &legit_c,
                    n => panic!("unexpected bitmap {n}"),
                };
                assert!(
                    legit.contains(&got),
                    "{mode:?} point {point}: {} = {got:?}",
                    info.name
                );
            }
        }
    }
    assert!(points > 40);
    // The final image is clean.
    let s = BitmapStore::open(
        MemStorage::from_bytes(crash.live_image()),
        OpenMode::ReadOnly,
    )
    .unwrap();
    assert_clean(&s);
    assert_eq!(s.list().len(), 2);
}

/// Table offset of bitmap `name`, from the slot (the directory as decoded).
fn table_offset(s: &BitmapStore<MemStorage>, name: &str) -> u64 {
    s.slots
        .iter()
        .find(|x| x.entry.name == name)
        .unwrap()
        .entry
        .table_offset
}

#[test]
fn a_shared_cluster_in_a_corrupt_image_is_never_freed_from_under_its_other_owner() {
    // Bitmap a's table entry 0 is patched to name bitmap b's table cluster (the image is
    // now corrupt: refcount 1, two references). Every write is refused before it starts,
    // so b's table is neither freed nor overwritten, and b keeps its bits.
    let mut s = new_store(16 * MIB, 4096);
    s.add("a", 4096, Recording::Enabled).unwrap();
    s.add("b", 4096, Recording::Enabled).unwrap();
    let bits = DirtyBitmap::new(16 * MIB, 4096).unwrap();
    bits.mark_dirty(MIB, 8192);
    s.store("b", &bits).unwrap();
    let b_table = table_offset(&s, "b");
    let a_table = table_offset(&s, "a");
    s.image()
        .storage()
        .write_u64_be_at(a_table, b_table)
        .unwrap();
    let mut s = reopen(s, OpenMode::ReadWrite);
    let before = s.image().storage().to_vec();

    let empty = DirtyBitmap::new(16 * MIB, 4096).unwrap();
    let refused = |e: Error| matches!(e, Error::Corrupt(Corruption::CheckFailed { .. }));
    assert!(refused(s.store("a", &empty).unwrap_err()));
    assert!(refused(s.remove("a").unwrap_err()));
    assert!(refused(s.clear("b").unwrap_err()));
    assert!(refused(s.add("c", 4096, Recording::Enabled).unwrap_err()));
    assert!(refused(s.activate().unwrap_err()));
    assert_eq!(s.image().storage().to_vec(), before, "a refusal wrote");
    let s = reopen(s, OpenMode::ReadOnly);
    assert_eq!(
        s.load("b").unwrap().dirty_extents().collect::<Vec<_>>(),
        bits.dirty_extents().collect::<Vec<_>>(),
        "b lost its bits"
    );
}

/// The store's bitmaps are public handles, and their primary change map is the store's
/// flusher's: a caller's `take_changed` (watching what changed) emptied it, so the stop
/// wrote nothing, cleared `in_use`, and the disk called a written granule clean; a caller's
/// `load_region` set bits the flusher never saw. Either now makes the next flush or stop
/// write every region of the bitmap, and the estimates count them.
#[test]
fn a_callers_take_or_load_on_a_stores_bitmap_makes_the_next_flush_write_every_region() {
    const G: u64 = 4096;
    // 1 GiB at 4 KiB: 8 regions of 128 MiB of disk; the write lands in region 5.
    const AT: u64 = 5 * (128 * MIB) + 5 * G;
    type Step = fn(&DirtyBitmap);
    let steps: [(&str, Step); 3] = [
        ("take", |b| {
            b.mark_dirty(AT, 1);
            assert!(b.take_changed().contains(5));
        }),
        ("take of nothing", |b| {
            b.mark_dirty(AT, 1);
            let _ = b.take_changed();
            let _ = b.take_changed();
        }),
        ("load", |b| {
            let mut bytes = vec![0u8; b.region_len(5) as usize];
            bytes[0] = 1 << 5;
            b.load_region(5, &bytes).unwrap();
        }),
    ];
    for (what, step) in steps {
        for flush_first in [false, true] {
            let mut s = new_store(1 << 30, 4096);
            s.add("b", G, Recording::Enabled).unwrap();
            s.activate().unwrap();
            let b = s.bitmap("b").unwrap();
            assert_eq!(b.region_count(), 8);
            step(&b);
            assert_eq!(
                s.pending_estimate(),
                b.region_count() * b.region_size(),
                "{what}: the estimate counts every region"
            );
            if flush_first {
                s.flush().unwrap();
                assert!(
                    b.take_primary().is_empty(),
                    "{what}: the flush took them all"
                );
            }
            let image = s.close().unwrap();
            let s = BitmapStore::open(image.into_storage(), OpenMode::ReadOnly).unwrap();
            let got = s.load("b").unwrap();
            assert!(
                got.is_dirty(AT),
                "{what} (flush first: {flush_first}): lost"
            );
            assert_eq!(got.count(), 1, "{what}");
        }
    }
}

/// A write refused for corruption says where the findings lie, and so which repair applies:
/// `qemu-img check -r all` keeps a broken bitmap (it may then read as clean), so findings in
/// the bitmaps are `dbm check -r all`'s.
#[test]
fn a_refused_write_says_whether_the_findings_lie_in_the_bitmaps() {
    let found = |s: &mut BitmapStore<MemStorage>| match s.add("y", 4096, Recording::Disabled) {
        Err(Error::Corrupt(Corruption::CheckFailed { found, .. })) => found,
        r => panic!("{r:?}"),
    };
    let broken = |at: &dyn Fn(&BitmapStore<MemStorage>) -> u64| {
        let mut s = new_store(16 * MIB, 4096);
        s.add("x", 4096, Recording::Enabled).unwrap();
        let c = at(&s);
        s.image.free_clusters(c, 1).unwrap();
        s.image.flush_refcounts().unwrap();
        s
    };
    let mut s = broken(&|s| table_offset(s, "x"));
    assert_eq!(found(&mut s), CheckFindings::Bitmaps);
    // `dbm check -r all` refuses an image corrupt outside its bitmaps, and says the same.
    let repaired = |s: &BitmapStore<MemStorage>| {
        let bytes = s.image().storage().to_vec();
        match super::repair::repair(MemStorage::from_bytes(bytes), super::repair::Repair::All) {
            Err(Error::Corrupt(Corruption::CheckFailed { found, .. })) => found,
            r => panic!("{:?}", r.map(|(_, report)| report)),
        }
    };
    let mut s = broken(&|s| s.image().header().l1_table_offset);
    assert_eq!(found(&mut s), CheckFindings::Image);
    assert_eq!(repaired(&s), CheckFindings::Image);
    let t = table_offset(&s, "x");
    s.image.free_clusters(t, 1).unwrap();
    s.image.flush_refcounts().unwrap();
    assert_eq!(found(&mut s), CheckFindings::Both);
    assert_eq!(repaired(&s), CheckFindings::Both);
}

#[test]
fn removing_a_bitmap_whose_table_has_refcount_zero_is_refused_and_writes_nothing() {
    // An in_use bitmap whose table cluster's refcount was zeroed by hand: `qemu-img check`
    // calls the image corrupt, and the allocator could hand the referenced cluster out, so
    // the removal is refused until `qemu-img check -r all` repairs the refcounts.
    let mut s = new_store(16 * MIB, 4096);
    s.add("x", 4096, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let image = s.image.into_storage().into_vec();
    let mut s = BitmapStore::open(MemStorage::from_bytes(image), OpenMode::ReadWrite).unwrap();
    assert_eq!(s.list()[0].state, BitmapState::Inconsistent);
    let t = table_offset(&s, "x");
    s.image.free_clusters(t, 1).unwrap();
    s.image.flush_refcounts().unwrap();
    assert_eq!(s.image.refcount(t).unwrap(), 0);
    let before = s.image().storage().to_vec();
    let err = s.remove("x").unwrap_err();
    assert!(
        matches!(err, Error::Corrupt(Corruption::CheckFailed { .. })),
        "{err:?}"
    );
    assert_eq!(s.image().storage().to_vec(), before);
    assert_eq!(s.list().len(), 1);
}

#[test]
fn duplicate_refcount_table_entries_are_refused() {
    let s = new_store(16 * MIB, 4096);
    let rt = s.image().header().refcount_table_offset;
    let first = s.image().storage().read_u64_be_at(rt).unwrap();
    s.image().storage().write_u64_be_at(rt + 8, first).unwrap();
    let bytes = s.image.into_storage().into_vec();
    let err = BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadWrite).unwrap_err();
    assert!(
        matches!(err, Error::Corrupt(Corruption::Refcount { .. })),
        "{err:?}"
    );
}

#[test]
fn allocation_past_a_refblock_that_claims_every_cluster_is_bounded_by_the_file() {
    // A refblock full of 0xFF claims every cluster it covers is in use; the scan for a free
    // cluster must stop at the end of the file rather than walk the whole address space.
    let mut s = new_store(16 * MIB, 512);
    let rt = s.image().header().refcount_table_offset;
    let block = s.image().storage().read_u64_be_at(rt).unwrap();
    s.image()
        .storage()
        .write_all_at(&[0xFF; 512], block)
        .unwrap();
    let bytes = s.image.into_storage().into_vec();
    s = BitmapStore::open(MemStorage::from_bytes(bytes.clone()), OpenMode::ReadWrite).unwrap();
    let len = bytes.len() as u64;
    s.add("x", 512, Recording::Enabled).unwrap();
    // With 16-bit refcounts a 512-byte block covers 256 clusters. Without the bound the
    // scan would walk all of them and allocate at cluster 256 or later.
    let at = table_offset(&s, "x");
    assert!(
        at >= len && at < 256 * 512,
        "allocated at {at}, file was {len} bytes"
    );
}

#[test]
fn activate_refuses_more_bitmap_memory_than_the_limit() {
    // Three bitmaps of a 1 PiB disk, their granularity then lowered to 512 B in the decoded
    // directory (as a crafted image could say): each would need 256 GiB. The limit must
    // refuse before anything is allocated.
    let disk = 1u64 << 50;
    let mut s = new_store(disk, 65536);
    for i in 0..3 {
        s.add(&format!("b{i}"), 1 << 24, Recording::Enabled)
            .unwrap();
    }
    for slot in &mut s.slots {
        slot.entry.granularity_bits = 9; // 2^41 bits each: 256 GiB
    }
    let err = s.activate().unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
}

#[test]
fn store_on_an_active_store_keeps_concurrent_marks() {
    // An I/O thread's mark through the shared bitmap must survive a store() of other bits.
    let mut s = new_store(16 * MIB, 4096);
    s.add("x", 4096, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let live = s.bitmap("x").unwrap();
    live.mark_dirty(MIB, 1);
    let other = DirtyBitmap::new(16 * MIB, 4096).unwrap();
    other.mark_dirty(2 * MIB, 1);
    s.store("x", &other).unwrap();
    assert!(live.is_dirty(MIB) && live.is_dirty(2 * MIB));
    let image = s.close().unwrap();
    let s = BitmapStore::open(
        MemStorage::from_bytes(image.into_storage().into_vec()),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let loaded = s.load("x").unwrap();
    assert!(loaded.is_dirty(MIB), "the concurrent mark was lost");
    assert!(loaded.is_dirty(2 * MIB));
}

/// The in-place flags write is taken only when nothing but flags changes; each entry's
/// flags word sits in one sector, so a torn write keeps entries whole. Anything else falls
/// back to the autoclear dance.
#[test]
fn flags_only_change_accepts_flags_and_nothing_else() {
    let s = new_store(64 * MIB, 65536);
    let geo = s.geometry().unwrap();
    let entry = |name: &str, in_use: bool, auto: bool| DirEntry {
        // Names long enough that the entries cross sector boundaries.
        name: name.repeat(300).into(),
        table_offset: 65536,
        table_size: 1,
        granularity_bits: 16,
        in_use,
        auto,
    };
    let old_e = vec![
        entry("a", true, true),
        entry("b", true, false),
        entry("c", false, true),
    ];
    let new_e = vec![
        entry("a", false, false),
        entry("b", false, false),
        entry("c", false, true),
    ];
    let old = encode_directory(&old_e, &geo).unwrap();
    let new = encode_directory(&new_e, &geo).unwrap();
    assert!(old.len() > 512);
    for dir_off in [0u64, 65536, 65536 * 3] {
        assert!(flags_only_change(dir_off, &old_e, &new_e, &old, &new));
    }
    let mut moved = new_e.clone();
    moved[1].table_offset = 131072;
    let moved_b = encode_directory(&moved, &geo).unwrap();
    assert!(!flags_only_change(0, &old_e, &moved, &old, &moved_b));
    assert!(!flags_only_change(0, &old_e, &new_e[..2], &old, &new));
    // Bytes that differ outside the flags in two sectors of one entry: refused.
    let mut torn = new.clone();
    torn[600] ^= 1;
    assert!(!flags_only_change(0, &old_e, &new_e, &old, &torn));
}

/// Marks made after an incremental inactivate live only in the kept in-memory copy until
/// the next activate: `load` (and so `merge`'s source) must see them, or a merge would give
/// its destination fewer bits than the source had when it ran (a false clean).
#[test]
fn merge_after_inactivate_carries_marks_made_since() {
    let mut s = new_store(64 * MIB, 65536);
    s.add("a", 65536, Recording::Enabled).unwrap();
    s.add("b", 65536, Recording::Disabled).unwrap();
    s.activate().unwrap();
    let t = s.tracker().unwrap();
    t.mark(0, 4096);
    s.inactivate().unwrap();
    // The guest kept running (a failed hand-over, say): marks go to the kept copy.
    t.mark(10 * MIB, 4096);
    assert!(s.load("a").unwrap().is_dirty(10 * MIB));
    s.merge("a", "b").unwrap();
    let b = s.load("b").unwrap();
    assert!(b.is_dirty(0) && b.is_dirty(10 * MIB));
    // And on disk once the store is stopped again.
    s.activate().unwrap();
    s.inactivate().unwrap();
    let s = reopen(s, OpenMode::ReadOnly);
    let b = s.load("b").unwrap();
    assert!(b.is_dirty(0) && b.is_dirty(10 * MIB));
    assert_clean(&s);
}

/// An activate from a preloaded copy gives exactly what a plain activate loads, whatever
/// the copy held: bits the disk lost since (a clear, a bitmap removed and added again
/// under its name, whose table is all zero entries), bits it gained, and copies that match
/// nothing (another granularity, another name).
#[test]
fn activate_preloaded_equals_activate_whatever_the_preload_held() {
    let disk = 256 * MIB;
    let mut a = new_store(disk, 4096);
    a.add("a", 4096, Recording::Enabled).unwrap();
    a.add("b", 4096, Recording::Enabled).unwrap();
    a.add("c", 65536, Recording::Enabled).unwrap();
    a.activate().unwrap();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let bm = a.bitmap(name).unwrap();
        for k in 0..200u64 {
            bm.mark_dirty((k * 7919 * 4096 + i as u64 * 12345) % disk, 4096);
        }
    }
    a.flush().unwrap();
    // The destination reads beside the running source.
    let early = BitmapStore::open(
        MemStorage::from_bytes(a.image().storage().to_vec()),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let pre = early.preload().unwrap();
    assert_eq!(pre.len(), 3);
    // The source goes on: new marks, a clear, a bitmap recreated under its name.
    a.bitmap("a").unwrap().mark_dirty(100 * MIB, 8 * MIB);
    a.clear("b").unwrap();
    a.bitmap("b").unwrap().mark_dirty(3 * MIB, 4096);
    a.remove("c").unwrap();
    a.add("c", 65536, Recording::Enabled).unwrap();
    a.inactivate().unwrap();
    let bytes = a.image().storage().to_vec();
    let mut plain =
        BitmapStore::open(MemStorage::from_bytes(bytes.clone()), OpenMode::ReadWrite).unwrap();
    plain.activate().unwrap();
    let mut from_pre =
        BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadWrite).unwrap();
    from_pre.activate_preloaded(pre).unwrap();
    for name in ["a", "b", "c"] {
        let want = plain.bitmap(name).unwrap();
        let got = from_pre.bitmap(name).unwrap();
        assert_eq!(
            got.dirty_extents().collect::<Vec<_>>(),
            want.dirty_extents().collect::<Vec<_>>(),
            "{name}"
        );
        assert_eq!(got.count(), want.count(), "{name}");
        // Nothing is pending: what was loaded is what is on disk.
        assert!(got.take_changed().is_empty(), "{name}");
    }
    assert_eq!(from_pre.bitmap("b").unwrap().count(), 1);
    assert_eq!(from_pre.bitmap("c").unwrap().count(), 0);
    // Both wrote the same flags: the images are byte for byte the same.
    assert_eq!(
        from_pre.image().storage().to_vec(),
        plain.image().storage().to_vec()
    );
    assert_clean(&from_pre);
}

/// `activate_with`: the given content replaces the disk's, in memory at once and on disk
/// at the next flush; until then the disk says `in_use` (a crash reads inconsistent, not
/// clean); a refusal writes nothing.
#[test]
fn activate_with_replaces_the_disk_content_at_the_next_flush() {
    let disk = 256 * MIB;
    let mut s = new_store(disk, 4096);
    s.add("a", 4096, Recording::Enabled).unwrap();
    s.add("b", 65536, Recording::Disabled).unwrap();
    // On disk: "a" holds bits the content does not (a replace must clear them).
    let old = DirtyBitmap::new(disk, 4096).unwrap();
    old.mark_dirty(0, 8 * MIB);
    old.mark_dirty(200 * MIB, 4096);
    s.store("a", &old).unwrap();
    let stored = s.image().storage().to_vec();
    // The content: another pattern; "b" with another change-map region size.
    let a = Arc::new(DirtyBitmap::new(disk, 4096).unwrap());
    a.mark_dirty(4 * MIB, 4096);
    a.mark_dirty(100 * MIB, 3 * MIB);
    let b = Arc::new(DirtyBitmap::with_region_size(disk, 65536, 512).unwrap());
    b.mark_dirty(7 * MIB, 65536);
    // Refusals, each before any write.
    let wrong_granularity = Arc::new(DirtyBitmap::new(disk, 65536).unwrap());
    for (content, what) in [
        (vec![("x".to_string(), Arc::clone(&a))], "unknown name"),
        (vec![("a".to_string(), wrong_granularity)], "granularity"),
        (
            vec![
                ("a".to_string(), Arc::clone(&a)),
                ("a".to_string(), Arc::clone(&a)),
            ],
            "twice",
        ),
    ] {
        assert!(s.activate_with(content).is_err(), "{what}");
        assert!(!s.is_active(), "{what}");
        assert_eq!(
            s.image().storage().to_vec(),
            stored,
            "{what}: wrote before refusing"
        );
    }
    s.activate_with(vec![
        ("a".to_string(), Arc::clone(&a)),
        ("b".to_string(), Arc::clone(&b)),
    ])
    .unwrap();
    // Held as given: "a" shared, "b" copied into the store's geometry; recording as the
    // directory says.
    assert!(Arc::ptr_eq(&s.bitmap("a").unwrap(), &a));
    let held_b = s.bitmap("b").unwrap();
    assert_eq!(
        held_b.dirty_extents().collect::<Vec<_>>(),
        b.dirty_extents().collect::<Vec<_>>()
    );
    assert!(!held_b.is_enabled());
    // A crash now: the disk still holds the old "a", marked in_use, so inconsistent.
    let crashed = BitmapStore::open(
        MemStorage::from_bytes(s.image().storage().to_vec()),
        OpenMode::ReadOnly,
    )
    .unwrap();
    assert!(crashed.list().iter().all(|i| i.in_use));
    assert!(crashed.load("a").is_err());
    // The stop writes the content whole: the disk then holds exactly it.
    s.inactivate().unwrap();
    assert_clean(&s);
    let s = reopen(s, OpenMode::ReadOnly);
    for (name, want) in [("a", &a), ("b", &b)] {
        assert_eq!(
            s.load(name).unwrap().dirty_extents().collect::<Vec<_>>(),
            want.dirty_extents().collect::<Vec<_>>(),
            "{name}"
        );
    }
    // An in_use bitmap is refused too.
    let mut c = BitmapStore::open(
        MemStorage::from_bytes(crashed.image().storage().to_vec()),
        OpenMode::ReadWrite,
    )
    .unwrap();
    let before = c.image().storage().to_vec();
    assert!(matches!(
        c.activate_with(vec![("a".to_string(), a)]),
        Err(Error::Inconsistent { .. })
    ));
    assert_eq!(c.image().storage().to_vec(), before);
}

/// `check_replace` applies every check of `remove` and `add` to the whole set, each add
/// beside the ones before it, and writes nothing; `add_holding` adds only to an active
/// store, `in_use` from its commit, holding the content it is given.
#[test]
fn check_replace_checks_the_whole_set_and_add_holding_commits_in_use() {
    let mut s = new_store(16 * MIB, 65536);
    s.add("a", 65536, Recording::Enabled).unwrap();
    let before = s.image().storage().to_vec();
    s.check_replace(&[b"a"], &[("a", 65536), ("b", 4096)])
        .unwrap();
    for (remove, add) in [
        (&[][..], &[("a", 65536)][..]),
        (&[&b"x"[..]][..], &[][..]),
        (&[][..], &[("b", 65536), ("b", 4096)][..]),
        (&[][..], &[("b", 65536), ("c\0", 4096)][..]),
        (&[][..], &[("b", 65536), ("c", 1000)][..]),
    ] {
        assert!(
            s.check_replace(remove, add).is_err(),
            "{remove:?} then {add:?}"
        );
    }
    assert!(s.image().storage().to_vec() == before, "a check wrote");
    let content = Arc::new(DirtyBitmap::new(16 * MIB, 4096).unwrap());
    content.mark_dirty(MIB, 1);
    assert!(matches!(
        s.add_holding("b", Recording::Disabled, Arc::clone(&content)),
        Err(Error::WrongState(StateProblem::NotActive))
    ));
    s.activate().unwrap();
    s.add_holding("b", Recording::Disabled, Arc::clone(&content))
        .unwrap();
    let info = s.list().into_iter().find(|i| i.name == "b").unwrap();
    assert!(info.in_use && !info.enabled, "{info:?}");
    let held = s.bitmap("b").unwrap();
    assert!(held.is_dirty(MIB));
    assert_eq!(held.changed_region_count(), held.region_count());
    s.inactivate().unwrap();
    let s = reopen(s, OpenMode::ReadOnly);
    assert_eq!(s.load("b").unwrap().count(), 1);
}

/// QEMU reads a bitmap's name up to its first NUL: beside a foreign entry "a\0x", a new
/// bitmap "a" would make an image QEMU refuses to open ("Bitmap already exists"). The add
/// is refused as a taken name, before writing.
#[test]
fn a_name_qemu_reads_as_taken_is_refused() {
    let mut s = new_store(64 * MIB, 65536);
    s.add("aQx", 65536, Recording::Enabled).unwrap();
    let mut bytes = s.image.into_storage().into_vec();
    let at = bytes
        .windows(3)
        .position(|w| w == b"aQx")
        .expect("the name in the directory");
    bytes[at + 1] = 0;
    let mut s =
        BitmapStore::open(MemStorage::from_bytes(bytes.clone()), OpenMode::ReadWrite).unwrap();
    assert_eq!(s.list()[0].name.as_bytes(), b"a\0x");
    assert_eq!(s.list()[0].name.qemu_name(), b"a");
    let r = s.add("a", 65536, Recording::Enabled);
    assert!(
        matches!(&r, Err(Error::Exists { name }) if name.as_bytes() == b"a"),
        "{r:?}"
    );
    assert!(s.image.storage().to_vec() == bytes, "the refusal wrote");
    s.add("ax", 65536, Recording::Enabled).unwrap();
}

/// One bitmap object held for two bitmaps shares one change map, so the stop's flush would
/// drain it for the first and write nothing of the second, then clear `in_use` on both: the
/// second left consistent on disk without its bits (a false clean). `activate_with` refuses
/// an object given twice, or held as another bitmap's parked copy, before any write.
#[test]
fn activate_with_refuses_one_bitmap_object_for_two_bitmaps() {
    let disk = 64 * MIB;
    let mut s = new_store(disk, 65536);
    s.add("a", 65536, Recording::Enabled).unwrap();
    s.add("b", 65536, Recording::Enabled).unwrap();
    let x = Arc::new(DirtyBitmap::new(disk, 65536).unwrap());
    x.mark_dirty(0, 4096);
    // The parked route: `a`'s parked copy given for `b`.
    s.activate().unwrap();
    let parked_a = s.bitmap("a").unwrap();
    parked_a.mark_dirty(MIB, 4096);
    s.inactivate().unwrap();
    for (content, what) in [
        (
            vec![
                ("a".to_string(), Arc::clone(&x)),
                ("b".to_string(), Arc::clone(&x)),
            ],
            "one object for both",
        ),
        (
            vec![("b".to_string(), Arc::clone(&parked_a))],
            "a's parked copy for b",
        ),
    ] {
        let before = s.image().storage().to_vec();
        match s.activate_with(content) {
            Err(Error::InvalidInput(m)) => {
                assert!(m.contains("same object"), "{what}: {m}");
                assert!(!s.is_active(), "{what}");
                assert_eq!(s.image().storage().to_vec(), before, "{what}: wrote");
            }
            other => {
                // Without the refusal the stop leaves `b` consistent without its bits.
                let activated = other.is_ok();
                if activated {
                    s.inactivate().unwrap();
                }
                let r = BitmapStore::open(
                    MemStorage::from_bytes(s.image().storage().to_vec()),
                    OpenMode::ReadOnly,
                )
                .unwrap();
                let b = r.load("b").unwrap();
                panic!(
                    "{what}: not refused ({activated}); b on disk holds {} of its bits",
                    b.count()
                );
            }
        }
    }
    // Its own parked copy for `a` is not an alias: it activates.
    s.activate_with(vec![("a".to_string(), Arc::clone(&parked_a))])
        .unwrap();
    s.inactivate().unwrap();
    let r = reopen(s, OpenMode::ReadOnly);
    assert!(r.load("a").unwrap().is_dirty(MIB));
}

/// Runs `first`, then `rest`, on `st` in another thread while the caller's mark holds a
/// published list, and checks that `first` has not returned 100 ms later (a grace period
/// waits for the hold); then `mark` finishes the mark and drops the hold, and the store
/// comes back once `rest` ran. `what` names the case in a failure.
fn waits_for_the_hold<T>(
    mut st: BitmapStore<MemStorage>,
    hold: T,
    first: impl FnOnce(&mut BitmapStore<MemStorage>) + Send + 'static,
    rest: impl FnOnce(&mut BitmapStore<MemStorage>) + Send + 'static,
    mark: impl FnOnce(T),
    what: &str,
) -> BitmapStore<MemStorage> {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&done);
    let calls = std::thread::spawn(move || {
        first(&mut st);
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        rest(&mut st);
        st
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        !done.load(std::sync::atomic::Ordering::SeqCst),
        "{what}: the call returned while a mark held a list published before it"
    );
    mark(hold);
    calls.join().unwrap()
}

/// The hand-over of `Tracker`'s docs done by hand: `add` a recording bitmap, then disable
/// (or remove) the old one. A mark that loaded the published list before the add published
/// the new bitmap, and has not reached the old one yet, has announced nothing: the add
/// returns only once it finished (so every mark completing after the add is in the new
/// bitmap), and the write is in one of the two.
#[test]
fn an_add_of_a_recording_bitmap_waits_for_a_mark_over_the_older_list() {
    for active in [true, false] {
        let mut st = new_store(1 << 30, 65536);
        st.add("a", 65536, Recording::Enabled).unwrap();
        st.activate().unwrap();
        // The mark below is a tracker's: one exists, as for any mark of a store.
        let _tracker = st.tracker().unwrap();
        if !active {
            // Inactive with parked copies, as after a hand-over: marks still reach them.
            st.inactivate().unwrap();
        }
        let off = 5 * MIB;
        // A mark in flight: `Tracker::mark`'s load, held across the calls below.
        let held = st.tracked.load();
        assert_eq!(held.len(), 1, "active {active}");
        let st = waits_for_the_hold(
            st,
            held,
            |st| st.add("b", 65536, Recording::Enabled).unwrap(),
            |st| st.set_enabled("a", false).unwrap(),
            // The mark goes on: its list holds only `a`.
            |held| {
                for b in held.iter() {
                    b.mark_dirty(off, 4096);
                }
            },
            &format!("active {active}: the add"),
        );
        let copy = |n: &str| {
            let s = &st.slots[st.find(n.as_bytes()).unwrap()];
            s.mem.clone().or(s.parked.clone()).unwrap()
        };
        let (a, b) = (copy("a"), copy("b"));
        assert!(
            a.is_dirty(off) || b.is_dirty(off),
            "active {active}: the mark is in neither bitmap"
        );
    }
}

/// Deleting the newest checkpoint by hand (enable the one before it, merge the newest into
/// it, remove the newest) with the older bitmap first in the list. A fan-out that passed
/// the older bitmap while it was still disabled, and has not reached the newest yet, runs
/// over the *current* list; were the enable not to wait for it, the merge would copy the
/// newest without the mark, the removal would drop it, and the mark would land in the
/// removed bitmap. The enable waits for every mark over any list published before it
/// returns.
#[test]
fn an_enable_waits_for_a_fan_out_that_passed_the_bitmap_disabled() {
    for active in [true, false] {
        let mut st = new_store(1 << 30, 65536);
        st.add("b", 65536, Recording::Enabled).unwrap();
        st.activate().unwrap();
        assert_eq!(
            st.checkpoint("a").unwrap().map(|n| n.to_string()),
            Some("b".to_string())
        );
        if !active {
            st.inactivate().unwrap();
        }
        let off = 5 * MIB;
        // A fan-out in flight over the current list [b, a]: b, disabled, takes nothing.
        let held = st.tracked.load();
        assert_eq!(held.len(), 2, "active {active}");
        assert!(
            !held[0].is_enabled() && held[1].is_enabled(),
            "active {active}"
        );
        held[0].mark_dirty(off, 4096);
        let st = waits_for_the_hold(
            st,
            held,
            |st| st.set_enabled("b", true).unwrap(),
            |st| {
                st.merge("a", "b").unwrap();
                st.remove("a").unwrap();
            },
            |held| held[1].mark_dirty(off, 4096),
            &format!("active {active}: the enable, a fan-out over the current list"),
        );
        let s = &st.slots[st.find(b"b").unwrap()];
        let b = s.mem.clone().or(s.parked.clone()).unwrap();
        assert!(
            b.is_dirty(off),
            "active {active}: the mark is in no bitmap left"
        );
    }
}

/// The same hand-over in three calls: `add` the new bitmap disabled (no grace period: it
/// records nothing yet), enable it, then remove the old one. A mark that loaded the list
/// published before the add, stalled across all three, has announced nothing to the new
/// bitmap: the enable returns only once it finished (a mark overlapping the enable, in
/// the old bitmap only, as a mark overlapping an add is), not after, when the removal
/// may have begun and the mark would complete in the removed bitmap, in none.
#[test]
fn an_enable_waits_for_a_mark_over_a_list_without_the_bitmap() {
    for active in [true, false] {
        let mut st = new_store(1 << 30, 65536);
        st.add("a", 65536, Recording::Enabled).unwrap();
        st.activate().unwrap();
        // The mark below is a tracker's: one exists, as for any mark of a store.
        let _tracker = st.tracker().unwrap();
        if !active {
            st.inactivate().unwrap();
        }
        let off = 5 * MIB;
        let held = st.tracked.load();
        assert_eq!(held.len(), 1, "active {active}");
        st.add("b", 65536, Recording::Disabled).unwrap();
        let st = waits_for_the_hold(
            st,
            held,
            |st| st.set_enabled("b", true).unwrap(),
            |st| {
                st.remove("a").unwrap();
            },
            |held| {
                for m in held.iter() {
                    m.mark_dirty(off, 4096);
                }
            },
            &format!("active {active}: the enable, a mark over a list without b"),
        );
        let s = &st.slots[st.find(b"b").unwrap()];
        let b = s.mem.clone().or(s.parked.clone()).unwrap();
        assert!(b.is_enabled(), "active {active}");
        assert_eq!(st.list().len(), 1, "active {active}");
    }
}

/// The whole-bitmap writer and the region walk take `cs / region size` regions per cluster,
/// so a region larger than a cluster must be refused: such a bitmap (4 KiB regions on 512 B
/// clusters) would be written with every table entry 0, a bitmap clean on disk whatever it
/// holds. No caller passes one (each bitmap has the store's region size); both refuse it.
#[test]
fn a_bitmap_of_regions_larger_than_a_cluster_is_never_written_or_walked() {
    let mut s = new_store(1 << 20, 512);
    s.add("a", 512, Recording::Enabled).unwrap();
    let bm = DirtyBitmap::with_region_size(1 << 20, 512, 4096).unwrap();
    bm.mark_dirty(0, 512);
    let before = s.image().storage().to_vec();
    let err = s
        .write_bitmap(&bm, &mut crate::flush::FlushStats::default())
        .unwrap_err();
    assert!(matches!(err, Error::Internal(_)), "{err:?}");
    assert!(
        s.image().storage().to_vec() == before,
        "a refused write wrote"
    );
    let entry = s.slots[0].entry.clone();
    let err = s
        .walk_regions(&entry, &bm, NotData::AsIs, |_, _| Ok(()))
        .unwrap_err();
    assert!(matches!(err, Error::Internal(_)), "{err:?}");
}

/// One `MemStorage` shared by handles, counting the bytes read through any of them.
#[derive(Debug, Default)]
struct CountedMem {
    inner: MemStorage,
    read: std::sync::atomic::AtomicU64,
}

impl Storage for CountedMem {
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::SeqCst);
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn set_len(&self, new_len: u64) -> Result<()> {
        self.inner.set_len(new_len)
    }
    fn sync_data(&self) -> Result<()> {
        self.inner.sync_data()
    }
}

/// Found by reviews: a following destination's figure priced its activate's checks by
/// a count that missed the durable activation's second read of every table, priced a
/// refcount block (a cluster) as one region, and missed the open's second read of a
/// cluster 0 larger than its first read. What the writable open, the last log's apply
/// and the activate read, beyond the last log's regions, stays within
/// `activate_check_reads` regions' worth of bytes, as counted on the source while active,
/// and the last log's regions within what `write_log_pending` counts for them (a data
/// cluster of which a quarter of the regions are named is read whole): in both modes, at
/// 4 KiB clusters (each table one region, so every table read counts), 64 KiB (four
/// regions of one cluster named: read whole) and 2 MiB, with 16 bitmaps the last log
/// names and one in use.
#[test]
fn activate_check_reads_bounds_what_an_activate_from_a_following_preload_reads() {
    use std::sync::atomic::Ordering::SeqCst;
    const DISK: u64 = 1 << 40;
    const N: u64 = 16;
    for cs in [4096, 65536, 2 * MIB] {
        for durable in [false, true] {
            let disk: Arc<CountedMem> = Arc::default();
            let mut s = BitmapStore::create(Arc::clone(&disk), DISK, cs).unwrap();
            for i in 0..=N {
                let name = format!("b{i:02}");
                s.add(&name, 65536, Recording::Enabled).unwrap();
                let bm = DirtyBitmap::new(DISK, 65536).unwrap();
                for k in 0..40u64 {
                    bm.mark_dirty(((k * 7919 + i * 104_729) % (DISK >> 16)) << 16, 4096);
                }
                s.store(&name, &bm).unwrap();
            }
            // The last bitmap in use on disk (inconsistent): its table is read, its data
            // named, nothing of it loaded.
            let (dir, _) = s.dir.unwrap();
            let at = s.slots.iter().take(N as usize).fold(dir, |at, sl| {
                at + (24 + sl.entry.name.as_bytes().len() as u64).div_ceil(8) * 8
            });
            drop(s);
            let mut f = [0u8; 4];
            disk.inner.read_exact_at(&mut f, at + 12).unwrap();
            let flags = u32::from_be_bytes(f) | 1;
            disk.inner
                .write_all_at(&flags.to_be_bytes(), at + 12)
                .unwrap();
            let mut s = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadWrite).unwrap();
            assert!(s.slots.iter().last().unwrap().inconsistent);
            if durable {
                s.activate_durable().unwrap();
            } else {
                s.activate().unwrap();
            }
            let id = s.start_write_log();
            let reader = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadOnly).unwrap();
            let mut pre = reader.preload().unwrap();
            pre.follow(id, 0);
            if durable {
                pre.prepare_durable();
            }
            assert!(pre.follows_every_bitmap(), "cs {cs}, durable {durable}");
            let s = SharedStore::new(s);
            // Marks the last log names, in every bitmap held.
            // Four far apart, and four in the first data cluster's regions 0 to 3 (2 GiB
            // of disk per region).
            let at = (0..4u64)
                .map(|k| k * (DISK / 4) + 3 * 65536)
                .chain((0..4u64).map(|k| (k << 31) + 5 * 65536));
            if durable {
                let t = s.durable_tracker().unwrap();
                for a in at {
                    t.mark(a, 4096).unwrap();
                }
            } else {
                let t = s.lock().tracker().unwrap();
                for a in at {
                    t.mark(a, 4096);
                }
            }
            let mut s = s.try_into_inner().unwrap();
            let checks = s.activate_check_reads().unwrap();
            s.inactivate().unwrap();
            let logged = s.write_log_pending().unwrap().0;
            let last = s.take_write_log().unwrap();
            assert!(
                last.bitmaps
                    .iter()
                    .filter(|b| !b.regions.is_empty())
                    .count()
                    >= N as usize,
                "cs {cs}, durable {durable}: {last:?}"
            );
            drop(s);
            let before = disk.read.load(SeqCst);
            pre.apply(&reader, &last).unwrap();
            let mut d = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadWrite).unwrap();
            if durable {
                d.activate_durable_preloaded(pre).unwrap();
            } else {
                d.activate_preloaded(pre).unwrap();
            }
            let read = disk.read.load(SeqCst) - before;
            assert_eq!(
                d.taken_as_preloaded(),
                N as usize,
                "cs {cs}, durable {durable}"
            );
            let bound = (checks + logged) * d.region_size();
            assert!(
                read <= bound,
                "cs {cs}, durable {durable}: read {read} bytes, priced {bound} ({checks} \
                 checks, {logged} logged regions)"
            );
            if durable {
                d.inactivate().unwrap();
            }
            drop(d);
        }
    }
}

/// An edit that unwinds inside `reusing_walk` leaves the flag down: a later edit outside
/// the take-over's sequence walks the image afresh instead of trusting a walk the unwound
/// edit may have left half-updated.
#[test]
fn reusing_walk_ends_with_an_unwind_too() {
    let mut s = new_store(64 * MIB, 65536);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        s.reusing_walk(|st| {
            assert!(st.reuse_walk);
            panic!("an edit unwinds");
        })
    }));
    assert!(r.is_err());
    assert!(!s.reuse_walk, "the flag outlived the sequence");
}
