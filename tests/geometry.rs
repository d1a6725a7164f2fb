//! Geometry edges: the granularity and size limits, partial last granules, one bit,
//! exactly 2^32 bits, and the qcow2 byte layout.

mod common;

use common::serialize_all;
use dirty_bitmap::{DirtyBitmap, Error};

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;
const G: u64 = 1 << 30;
const T: u64 = 1 << 40;

fn invalid(r: Result<DirtyBitmap, Error>) -> String {
    match r {
        Err(Error::InvalidInput(msg)) => msg,
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn golden_layout_matches_what_qemu_writes() {
    // qemu-io writes at 0, 1 MiB and 4,128,768 with a 64 KiB bitmap give these bytes on disk.
    let bm = DirtyBitmap::new(G, 64 * K).unwrap();
    for off in [0, M, 4_128_768] {
        bm.mark_dirty(off, 512);
    }
    let bytes = serialize_all(&bm);
    assert_eq!(
        &bytes[..8],
        &[0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x80]
    );
    assert!(bytes[8..].iter().all(|&b| b == 0));
}

#[test]
fn granularity_limits_are_qcow2s() {
    for g in [512, 4 * K, 64 * K, 2 * G] {
        let bm = DirtyBitmap::new(T, g).unwrap();
        assert_eq!(bm.granularity(), g);
        assert_eq!(bm.bit_count(), T.div_ceil(g));
    }
    for g in [0, 1, 256, 3 * 512, 4 * G, 1 << 63] {
        let msg = invalid(DirtyBitmap::new(T, g));
        assert!(
            msg.contains(&g.to_string()),
            "message {msg:?} does not name {g}"
        );
    }
}

#[test]
fn bit_count_limit_is_two_to_the_32() {
    let bm = DirtyBitmap::new((1 << 32) * 512, 512).unwrap();
    assert_eq!(bm.bit_count(), 1 << 32);
    let last = (1u64 << 32) * 512 - 1;
    bm.mark_dirty(last, 1);
    assert_eq!(bm.next_dirty(0), Some(last - 511));
    assert_eq!(
        bm.dirty_extents().collect::<Vec<_>>(),
        vec![(last - 511, 512)]
    );
    assert_eq!(bm.count(), 1);
    let changed: Vec<u64> = bm.take_changed().iter().collect();
    assert_eq!(changed, vec![bm.region_count() - 1]);
    let r = bm.region_count() - 1;
    let mut buf = vec![0u8; bm.region_len(r) as usize];
    bm.serialize_region(r, &mut buf).unwrap();
    assert_eq!(buf.last(), Some(&0x80));

    let too_many = (1 << 32) * 512 + 1;
    let msg = invalid(DirtyBitmap::new(too_many, 512));
    assert!(msg.contains(&too_many.to_string()), "{msg}");
    invalid(DirtyBitmap::new(u64::MAX, 2 * G));
    invalid(DirtyBitmap::new(0, 512));
}

#[test]
fn one_bit_bitmaps() {
    for disk in [1, 511, 512] {
        let bm = DirtyBitmap::new(disk, 512).unwrap();
        assert_eq!(bm.bit_count(), 1);
        assert_eq!(bm.region_count(), 1);
        assert_eq!(bm.region_len(0), 1);
        assert_eq!(bm.next_clean(0), Some(0));
        bm.mark_dirty(disk - 1, 1);
        assert_eq!(bm.dirty_extents().collect::<Vec<_>>(), vec![(0, disk)]);
        assert_eq!(bm.dirty_bytes(), disk);
        assert_eq!(bm.next_clean(0), None);
        assert_eq!(serialize_all(&bm), vec![1]);
        bm.clear(0, disk);
        assert_eq!(bm.count(), 0);
    }
}

#[test]
fn last_partial_granule() {
    // 1 MiB + 512 bytes at 64 KiB: 17 bits, the last covering 512 bytes.
    let disk = M + 512;
    let bm = DirtyBitmap::new(disk, 64 * K).unwrap();
    assert_eq!(bm.bit_count(), 17);
    bm.mark_dirty(disk - 1, 1);
    assert_eq!(bm.dirty_extents().collect::<Vec<_>>(), vec![(M, 512)]);
    assert_eq!(bm.dirty_bytes(), 512);
    assert!(bm.is_dirty(M));
    assert!(!bm.is_dirty(disk), "past the end is never dirty");
    // A clear that stops short of the end leaves the partial granule dirty...
    bm.clear(M, 511);
    assert!(bm.is_dirty(M));
    // ...one that reaches the end clears it.
    bm.clear(M, 512);
    assert!(!bm.is_dirty(M));
    // Marking everything gives 17 bits, and the serialized tail bits stay zero.
    bm.mark_dirty(0, u64::MAX);
    assert_eq!(serialize_all(&bm), vec![0xff, 0xff, 0x01]);
    assert_eq!(bm.dirty_bytes(), disk);
    // Loading all-ones bytes (QEMU's quirk after an all-ones table entry) masks the tail.
    let fresh = DirtyBitmap::new(disk, 64 * K).unwrap();
    fresh.load_region(0, &[0xff, 0xff, 0xff]).unwrap();
    assert_eq!(fresh.count(), 17);
    assert_eq!(serialize_all(&fresh), vec![0xff, 0xff, 0x01]);
}

#[test]
fn sizes_not_a_multiple_of_the_granularity() {
    for (disk, g) in [
        (10 * 512 + 1, 512),
        (3 * G + 7, 2 * G),
        (16 * T - 1, 64 * K),
    ] {
        let bm = DirtyBitmap::new(disk, g).unwrap();
        assert_eq!(bm.bit_count(), disk.div_ceil(g));
        bm.mark_dirty(0, u64::MAX);
        assert_eq!(bm.dirty_bytes(), disk);
        assert_eq!(bm.dirty_extents().collect::<Vec<_>>(), vec![(0, disk)]);
        assert_eq!(bm.next_clean(0), None);
    }
}

/// The "full" tower, past its first levels: a whole disk of 2^24 granules marked dirty
/// fills its higher levels (a unit at level 2 covers 2^21 granules), and one granule
/// cleared anywhere must clear every level above it, so that `next_clean` finds exactly
/// that granule (a stale full bit would skip it, and a reader taking the range as fully
/// held would miss a clean granule). Marking it again fills the levels again. The model
/// (tests/model.rs) never marks more than 50,000 granules in a row, below level 2.
#[test]
fn one_clean_granule_under_a_full_tower_is_found_at_every_level() {
    let g = 512u64;
    let bits = 1u64 << 24;
    let disk = bits * g;
    for clean in [
        0,
        (1 << 21) - 7,
        1 << 21,
        (1 << 22) + 3,
        (1 << 23) + (1 << 21) + 63,
        bits - 1,
    ] {
        let bm = DirtyBitmap::new(disk, g).unwrap();
        bm.mark_dirty(0, disk);
        assert_eq!(bm.next_clean(0), None);
        bm.clear(clean * g, g);
        assert_eq!(bm.next_clean(0), Some(clean * g), "granule {clean}");
        assert_eq!(bm.next_clean(clean * g), Some(clean * g), "granule {clean}");
        assert_eq!(bm.next_clean((clean + 1) * g), None, "granule {clean}");
        assert_eq!(bm.count(), bits - 1);
        bm.mark_dirty(clean * g, 1);
        assert_eq!(bm.next_clean(0), None, "granule {clean} marked again");
        // A range of 2^21 + 5 granules dirty on a clean disk, one granule inside cleared.
        let bm = DirtyBitmap::new(disk, g).unwrap();
        let run = (1 << 21) + 5;
        bm.mark_dirty(0, run * g);
        if clean < run {
            bm.clear(clean * g, g);
            assert_eq!(
                bm.next_clean(0),
                Some(clean * g),
                "granule {clean} in the run"
            );
        } else {
            assert_eq!(bm.next_clean(0), Some(run * g));
        }
    }
}

#[test]
fn two_gib_granularity_on_sixteen_tib() {
    let bm = DirtyBitmap::new(16 * T, 2 * G).unwrap();
    assert_eq!(bm.bit_count(), 8192);
    bm.mark_dirty(5 * G, 1);
    assert_eq!(bm.dirty_extents().collect::<Vec<_>>(), vec![(4 * G, 2 * G)]);
}

#[test]
fn marks_never_panic_on_extreme_ranges() {
    let bm = DirtyBitmap::new(T, 64 * K).unwrap();
    bm.mark_dirty(u64::MAX, u64::MAX);
    bm.mark_dirty(T, 1);
    bm.mark_dirty(0, 0);
    bm.clear(u64::MAX, u64::MAX);
    assert_eq!(bm.count(), 0);
    assert_eq!(bm.next_dirty(u64::MAX), None);
    assert_eq!(bm.next_clean(u64::MAX), None);
    bm.mark_dirty(T - 1, u64::MAX);
    assert_eq!(bm.count(), 1);
    bm.mark_dirty(T - 64 * K - 1, 2);
    assert_eq!(bm.count(), 2);
}

#[test]
fn region_size_limits() {
    for rs in [512, 4 * K, 2 * M] {
        let bm = DirtyBitmap::with_region_size(16 * T, 64 * K, rs).unwrap();
        assert_eq!(bm.region_size(), rs);
        assert_eq!(bm.region_count(), (32 * M).div_ceil(rs));
    }
    // The default: 4 KiB regions, 8192 of them for 16 TiB at 64 KiB, each 2 GiB of disk.
    let bm = DirtyBitmap::new(16 * T, 64 * K).unwrap();
    assert_eq!(bm.region_count(), 8192);
    assert_eq!(bm.region_disk_range(1), (2 * G, 2 * G));
    for rs in [0, 256, 3000, 4 * M] {
        let msg = invalid(DirtyBitmap::with_region_size(T, 64 * K, rs));
        assert!(msg.contains(&rs.to_string()), "{msg}");
    }
}

#[test]
fn disabled_bitmaps_ignore_marks_but_not_merges_or_clears() {
    let bm = DirtyBitmap::new(G, 64 * K).unwrap();
    bm.mark_dirty(0, 1);
    bm.set_enabled(false);
    bm.mark_dirty(M, 1);
    assert!(!bm.is_dirty(M));
    let other = DirtyBitmap::new(G, 64 * K).unwrap();
    other.mark_dirty(2 * M, 1);
    bm.merge_from(&other).unwrap();
    assert!(bm.is_dirty(2 * M));
    bm.clear(0, 64 * K);
    assert!(!bm.is_dirty(0));
    bm.set_enabled(true);
    bm.mark_dirty(M, 1);
    assert!(bm.is_dirty(M));
}

#[test]
fn failed_flushes_requeue_their_regions() {
    let bm = DirtyBitmap::new(16 * T, 64 * K).unwrap();
    bm.mark_dirty(0, 1);
    bm.mark_dirty(10 * T, 1);
    let taken = bm.take_changed();
    assert_eq!(taken.len(), 2);
    assert_eq!(bm.changed_region_count(), 0);
    bm.requeue_changed(&taken);
    assert_eq!(bm.take_changed(), taken);
}

/// A set of regions from a larger bitmap (or taken before a shrink) requeues no region past
/// the change map's end: requeued as whole words, the change map would name regions past
/// its end, and a store's flush of them would fail for good (`plan_target` finds no table
/// entry; the failed flush requeues them again). Regions past the end are ignored.
#[test]
fn a_requeued_set_names_no_region_past_the_end() {
    let bm = DirtyBitmap::new(64 * K, 64 * K).unwrap();
    assert_eq!(bm.region_count(), 1);
    bm.requeue_changed(&dirty_bitmap::ChangedRegions::all(100));
    assert_eq!(bm.changed_region_count(), 1);
    let taken = bm.take_changed();
    assert_eq!(taken.iter().collect::<Vec<_>>(), vec![0]);
}

/// A region past the end has an empty range at the end: its start is not past the range's
/// end (the bit offset's shift would drop its high bits), and the length does not underflow
/// (a panic in debug builds, about 2^64 in release).
#[test]
fn a_region_past_the_end_has_an_empty_range_at_the_end() {
    let bm = DirtyBitmap::new(T, 64 * K).unwrap();
    for r in [bm.region_count(), (1 << 33) - 1, u64::MAX] {
        assert_eq!(bm.region_disk_range(r), (T, 0), "region {r}");
    }
}
