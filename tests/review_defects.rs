//! One test per defect of the adversarial review in issue 9 ("Nothing on disk is lost and no
//! bit reads clean, on any image"). Each test is named after its defect number and fails on
//! commit 0b31498, where the review found it.

mod common;

use common::qemu::assert_qemu_clean;
use dirty_bitmap::storage::{FileStorage, MemStorage};
use dirty_bitmap::{BitmapStore, Image};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Defect 1: with 512 B clusters, the L1 table of a disk of 32 GiB or more needs more
/// clusters than the first refcount table covers, so allocating it moves the reftable; the
/// header was then written from the stale value that named cluster 1.
#[test]
fn defect_01_create_with_512_byte_clusters_across_the_reftable_growth() {
    let dir = tempfile::tempdir().unwrap();
    for size in [31 * GIB, 32 * GIB, 33 * GIB, 40 * GIB] {
        let path = dir.path().join(format!("{size}.qcow2"));
        let store = BitmapStore::create(FileStorage::create(&path).unwrap(), size, 512).unwrap();
        let report = store.image().check().unwrap();
        assert!(report.is_clean(), "{size}: {report:?}");
        drop(store);
        assert_qemu_clean(&path);
        let reopened = Image::open(FileStorage::open(&path, false).unwrap(), false).unwrap();
        assert!(reopened.check().unwrap().is_clean(), "{size} after reopen");
        std::fs::remove_file(&path).unwrap();
    }
}

/// Defect 5: a refcount-table growth during a flush rewrote the header's reftable fields on
/// disk but not in memory, so `check()` on the live handle saw thousands of corruptions and
/// `activate` after `inactivate` refused with "the image changed while inactive".
#[test]
fn defect_05_reftable_growth_keeps_the_in_memory_header_true() {
    let mut store = BitmapStore::create(MemStorage::new(), 16 * GIB, 512).unwrap();
    store.add("b", 512, true).unwrap();
    let before = store.image().header().refcount_table_offset;
    store.activate().unwrap();
    let bm = store.bitmap("b").unwrap();
    // 32 Mi bits = 4 MiB of bitmap = 8192 fresh 512-byte clusters: more than one reftable
    // cluster's 64 refblocks of 256 clusters can describe on top of the 4 MiB L1 table.
    bm.mark_dirty(0, 16 * GIB);
    store.flush().unwrap();
    assert_ne!(
        store.image().header().refcount_table_offset,
        before,
        "the test must grow the reftable"
    );
    let live = store.image().check().unwrap();
    assert!(live.is_clean(), "live handle: {live:?}");
    let disk = store.image().storage().to_vec();
    let header_on_disk = dirty_bitmap::format::Header::decode(&disk).unwrap();
    assert_eq!(&header_on_disk, store.image().header());
    store.inactivate().unwrap();
    bm.mark_dirty(5 * MIB, 4096);
    store.activate().expect("activate after inactivate");
    store.inactivate().unwrap();
    let image = store.close().unwrap();
    let reopened = BitmapStore::open(image.into_storage(), false).unwrap();
    let loaded = reopened.load("b").unwrap();
    assert_eq!(loaded.count(), loaded.bit_count());
}
