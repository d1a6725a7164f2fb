//! Named regression tests for the inputs in `fuzz/regressions/<target>/`: each runs the
//! fuzz entry point on the input (which must not panic) and asserts the typed error, or the
//! report, the library gives for it. See `docs/FUZZING.md`, "Findings".
//!
//! The inputs below were made by hand from the `seed-bitmaps-512` image: each sets one length
//! or count field to the largest value that passes the header's own checks, to pin down
//! that a corrupt length is refused, or reported, before anything is allocated for it.

mod common;

use dirty_bitmap::format::{decode_directory, decode_table, EntryProblem, ImageGeometry};
use dirty_bitmap::storage::MemStorage;
use dirty_bitmap::OpenMode;
use dirty_bitmap::{fuzzing, BitmapState, BitmapStore, Corruption, Error, Image};

fn regression(target: &str, name: &str) -> Vec<u8> {
    let path = format!(
        "{}/fuzz/regressions/{target}/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn open(data: &[u8]) -> dirty_bitmap::Result<BitmapStore<MemStorage>> {
    BitmapStore::open(MemStorage::from_bytes(data.to_vec()), OpenMode::ReadOnly)
}

/// The bitmaps extension claims a 64 MiB directory (the most QEMU allows) in a 9 KiB file.
#[test]
fn open_image_directory_size_past_eof() {
    let data = regression("open_image", "directory-size-past-eof");
    fuzzing::open_image(&data);
    let err = open(&data).expect_err("directory past the end of the file");
    assert!(
        matches!(
            err,
            Error::Corrupt(Corruption::PastEnd {
                what: "bitmap directory",
                len: 67_107_840,
                ..
            })
        ),
        "{err:?}"
    );
}

/// A consistent bitmap with a 2^27-entry table: 64 GiB of bitmap at 512-byte clusters.
#[test]
fn open_image_consistent_table_size_2_27() {
    let data = regression("open_image", "consistent-table-size-2-27");
    fuzzing::open_image(&data);
    let err = open(&data).expect_err("table far too large for QEMU");
    assert!(
        matches!(
            err,
            Error::Corrupt(Corruption::DirectoryEntry {
                index: 0,
                reason: EntryProblem::PhysicalSizeTooLarge { .. },
                ..
            })
        ),
        "{err:?}"
    );
}

/// An in_use bitmap with a 2^20-entry table (512 MiB of bitmap, the most QEMU allows) that
/// runs past the end of the file: it opens (in-use tables are not loaded), refuses to load,
/// and the check reports the table without reading it.
#[test]
fn open_image_in_use_table_past_eof() {
    let data = regression("open_image", "in-use-table-past-eof");
    fuzzing::open_image(&data);
    let store = open(&data).expect("an in-use bitmap's table is not checked on open");
    let list = store.list();
    assert_eq!(list[0].state, BitmapState::Inconsistent);
    assert!(matches!(store.load("on"), Err(Error::Inconsistent { .. })));
    let report = store
        .image()
        .check()
        .expect("check reports, it does not fail");
    // The table itself is what it reports, once (as QEMU's count of its clusters): past
    // the end, found from its offset and size, and not read.
    let text = report.messages.join("\n");
    assert!(
        text.contains(
            "ERROR bitmap table at 0x1a00 (0x800000 bytes): cluster 0x2600 is beyond the end \
             of the image file"
        ),
        "{text}"
    );
    assert_eq!(report.corruptions, 1, "{text}");
}

/// The header claims 10000 refcount table clusters (5 MiB, under QEMU's 8 MiB limit). QEMU
/// opens such an image (it reads the reftable without judging it), and so does a read-only
/// open here, whose check reports the table; a writable open refuses it.
#[test]
fn open_image_refcount_table_past_eof() {
    let data = regression("open_image", "refcount-table-past-eof");
    fuzzing::open_image(&data);
    let store = open(&data).expect("a read-only open goes ahead without the refcounts");
    let report = store
        .image()
        .check()
        .expect("check reports, it does not fail");
    assert!(report.corruptions > 0, "{:?}", report.messages);
    let err = BitmapStore::open(MemStorage::from_bytes(data), OpenMode::ReadWrite)
        .expect_err("refcount table past the end of the file");
    assert!(
        matches!(
            err,
            Error::Corrupt(Corruption::PastEnd {
                what: "refcount table",
                ..
            })
        ),
        "{err:?}"
    );
}

/// A 32 MiB L1 table (QEMU's limit) in a 9 KiB file: the image opens (the L1 table is not
/// read on open) and the check reports it instead of allocating for it.
#[test]
fn open_image_l1_table_32mib_past_eof() {
    let data = regression("open_image", "l1-table-32mib-past-eof");
    fuzzing::open_image(&data);
    let image =
        Image::open(MemStorage::from_bytes(data.clone()), OpenMode::ReadOnly).expect("opens");
    let report = image.check().expect("check reports, it does not fail");
    let text = report.messages.join("\n");
    assert!(
        text.contains(
            "ERROR L1 table at 0x600 (0x2000000 bytes): cluster 0x2600 is beyond the end of \
             the image file"
        ),
        "{text}"
    );
    assert_eq!(report.corruptions, 1, "{text}");
}

/// 65536 snapshots (QEMU's limit) whose table runs off the end of the file. Its first
/// entry has 7680 bytes of extra data: `qemu-img check` fails ("Too much extra metadata in
/// snapshot table entry 0", exit 1), and so does ours, with a typed corruption.
#[test]
fn open_image_snapshots_65536_past_eof() {
    let data = regression("open_image", "snapshots-65536-past-eof");
    fuzzing::open_image(&data);
    let (code, text) = common::qemu::check_bytes(&data);
    assert_eq!(code, Some(1), "qemu-img check: {text}");
    assert!(
        text.contains("Too much extra metadata in snapshot table entry 0"),
        "qemu-img check: {text}"
    );
    let image =
        Image::open(MemStorage::from_bytes(data.clone()), OpenMode::ReadOnly).expect("opens");
    let r = image.check();
    assert!(
        matches!(
            r,
            Err(Error::Corrupt(Corruption::SnapshotExtraData {
                index: 0,
                size: 7680
            }))
        ),
        "{r:?}"
    );
}

/// A bitmap table of 2^32 − 1 entries over 8 bytes: `Truncated`, decided before the
/// 32 GiB entry vector would be allocated.
#[test]
fn bitmap_table_table_size_u32_max() {
    let data = regression("bitmap_table", "table-size-u32-max");
    fuzzing::bitmap_table(&data);
    let err = decode_table(&data[5..], u32::MAX, 9).expect_err("too short");
    assert!(
        matches!(
            err,
            Corruption::Truncated {
                needed: 34_359_738_360,
                available: 8,
                ..
            }
        ),
        "{err:?}"
    );
}

/// A directory entry whose name_size and extra_data_size are both at their maximum.
#[test]
fn directory_entry_lengths_max() {
    let data = regression("directory", "entry-lengths-max");
    fuzzing::directory(&data);
    let geo = ImageGeometry::new(9, 1 << 20).expect("geometry");
    let err = decode_directory(&data[11..], 1, &geo).expect_err("entry past the end");
    assert!(
        matches!(
            err,
            Corruption::DirectoryEntryPastEnd {
                index: 0,
                offset: 0,
                end: 32
            }
        ),
        "{err:?}"
    );
}
