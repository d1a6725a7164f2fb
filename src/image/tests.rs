//! Unit tests for the image layer on `MemStorage`.

use super::*;
use crate::storage::MemStorage;

fn fresh(cs: u64, disk: u64) -> Image<MemStorage> {
    Image::create_bitmap_only(MemStorage::new(), disk, cs).unwrap()
}

#[test]
fn created_image_is_clean_for_every_cluster_size() {
    for cb in 9..=21 {
        let img = fresh(1 << cb, 1 << 30);
        let r = img.check().unwrap();
        assert!(r.is_clean(), "cluster bits {cb}: {r:?}");
        assert_eq!(img.header().refcount_table_offset, 1 << cb);
        let reopened = Image::open(img.into_storage(), OpenMode::ReadOnly).unwrap();
        assert!(reopened.check().unwrap().is_clean());
    }
}

#[test]
fn first_fit_never_hands_out_metadata_and_reuses_freed_clusters() {
    let mut img = fresh(512, 1 << 20);
    let l1 = img.header().l1_table_offset;
    let a = img.alloc_clusters(1).unwrap();
    assert!(a > l1, "first allocation after the L1 table");
    let b = img.alloc_clusters(3).unwrap();
    assert_eq!(b, a + 512);
    img.free_clusters(a, 1).unwrap();
    assert_eq!(
        img.alloc_clusters(1).unwrap(),
        a,
        "freed cluster reused first"
    );
    img.free_clusters(b + 512, 1).unwrap();
    // A 2-cluster run does not fit in the 1-cluster hole.
    let c = img.alloc_clusters(2).unwrap();
    assert!(c >= b + 3 * 512);
    img.flush_refcounts().unwrap();
    let r = img.check().unwrap();
    // Allocated but unreferenced clusters are leaks.
    assert_eq!(r.corruptions, 0);
    assert_eq!(r.leaks, 1 + 2 + 2);
    assert_eq!(r.exit_code(), 3);
}

#[test]
fn double_free_is_corruption_not_panic() {
    let mut img = fresh(4096, 1 << 20);
    let a = img.alloc_clusters(1).unwrap();
    img.free_clusters(a, 1).unwrap();
    assert!(matches!(img.free_clusters(a, 1), Err(Error::Corrupt(_))));
    assert!(matches!(img.alloc_clusters(1), Err(Error::Poisoned)));
}

#[test]
fn refcount_structures_cannot_be_freed() {
    let mut img = fresh(4096, 1 << 20);
    let rt = img.header().refcount_table_offset;
    assert!(matches!(img.free_clusters(rt, 1), Err(Error::Corrupt(_))));
}

#[test]
fn allocator_grows_refblocks_and_the_reftable() {
    // 512-byte clusters, 16-bit refcounts: 256 clusters per block, 64 blocks per
    // 1-cluster reftable, so 16384 clusters (8 MiB) force a new reftable.
    let mut img = fresh(512, 1 << 20);
    let old_rt = img.header().refcount_table_offset;
    let mut got = Vec::new();
    for i in 0..300u64 {
        got.push((img.alloc_clusters(1 + i % 150).unwrap(), 1 + i % 150));
    }
    img.flush_refcounts().unwrap();
    img.write_header().unwrap();
    assert_ne!(img.header().refcount_table_offset, old_rt, "reftable moved");
    assert!(img.header().refcount_table_clusters > 1);
    // Every run distinct and never overlapping metadata.
    let mut spans: Vec<(u64, u64)> = got.iter().map(|&(o, n)| (o, o + n * 512)).collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "overlap {w:?}");
    }
    for &(s, e) in &spans {
        assert!(s >= 3 * 512);
        let rt = img.header().refcount_table_offset;
        let rt_end = rt + u64::from(img.header().refcount_table_clusters) * 512;
        assert!(e <= rt || s >= rt_end);
    }
    let leaked: u64 = got.iter().map(|&(_, n)| n).sum();
    let r = img.check().unwrap();
    assert_eq!(
        r.corruptions,
        0,
        "{:?}",
        &r.messages[..r.messages.len().min(5)]
    );
    // The old reftable's decrement is in memory until the next refcount flush; until
    // then it is a leak.
    img.flush_refcounts().unwrap();
    let r = img.check().unwrap();
    assert_eq!(
        r.leaks,
        leaked,
        "{:?}",
        &r.messages[..r.messages.len().min(5)]
    );
    // Free everything: clean.
    for &(o, n) in &got {
        img.free_clusters(o, n).unwrap();
    }
    img.flush_refcounts().unwrap();
    let r = img.check().unwrap();
    assert!(r.is_clean(), "{:?}", &r.messages[..r.messages.len().min(5)]);
    let reopened = Image::open(img.into_storage(), OpenMode::ReadWrite).unwrap();
    assert!(reopened.check().unwrap().is_clean());
}

#[test]
fn every_refcount_width_allocates_and_checks() {
    for order in 0..=6u32 {
        let mut img = fresh(512, 1 << 20);
        // Rewrite the fresh image with another refcount width: rebuild its one block.
        let cs = 512u64;
        let mut block = vec![0u8; 512];
        let l1_end =
            (img.header().l1_table_offset + 8 * u64::from(img.header().l1_size)).div_ceil(cs);
        for c in 0..l1_end {
            crate::format::set_refcount(&mut block, order, c, 1).unwrap();
        }
        img.storage().write_all_at(&block, 2 * cs).unwrap();
        img.area_mut().header.refcount_order = order;
        img.write_header().unwrap();
        let mut img = Image::open(img.into_storage(), OpenMode::ReadWrite).unwrap();
        assert!(img.check().unwrap().is_clean(), "order {order}");
        let mut runs = Vec::new();
        for _ in 0..40 {
            runs.push(img.alloc_clusters(7).unwrap());
        }
        for &o in runs.iter().step_by(2) {
            img.free_clusters(o, 7).unwrap();
        }
        img.flush_refcounts().unwrap();
        let r = img.check().unwrap();
        assert_eq!(r.corruptions, 0, "order {order}: {:?}", r.messages.first());
        assert_eq!(r.leaks, 20 * 7, "order {order}");
    }
}

#[test]
fn read_only_image_refuses_writes() {
    let img = fresh(65536, 1 << 30);
    let before = img.storage().to_vec();
    let mut ro = Image::open(img.into_storage(), OpenMode::ReadOnly).unwrap();
    assert!(matches!(ro.alloc_clusters(1), Err(Error::ReadOnly)));
    assert!(matches!(ro.write_header(), Err(Error::ReadOnly)));
    assert_eq!(ro.storage().to_vec(), before);
}

#[test]
fn dirty_or_corrupt_bit_refuses_writable_open() {
    for bit in [INCOMPAT_DIRTY, INCOMPAT_CORRUPT] {
        let mut img = fresh(65536, 1 << 30);
        img.area_mut().header.incompatible_features |= bit;
        img.write_header().unwrap();
        let bytes = img.into_storage().into_vec();
        assert!(matches!(
            Image::open(MemStorage::from_bytes(bytes.clone()), OpenMode::ReadWrite),
            Err(Error::Unsupported(_))
        ));
        assert!(Image::open(MemStorage::from_bytes(bytes), OpenMode::ReadOnly).is_ok());
    }
}

#[test]
fn unknown_incompatible_feature_is_refused() {
    let img = fresh(65536, 1 << 30);
    let s = img.into_storage();
    s.write_all_at(&(1u64 << 40).to_be_bytes(), 72).unwrap();
    assert!(matches!(
        Image::open(s, OpenMode::ReadOnly),
        Err(Error::Corrupt(_))
    ));
}

#[test]
fn create_refuses_bad_input() {
    assert!(Image::create_bitmap_only(MemStorage::new(), 1 << 20, 1000).is_err());
    assert!(Image::create_bitmap_only(MemStorage::new(), 1 << 20, 256).is_err());
    assert!(Image::create_bitmap_only(MemStorage::new(), 1 << 20, 4 << 20).is_err());
    assert!(matches!(
        Image::create_bitmap_only(MemStorage::from_bytes(vec![1]), 1 << 20, 65536),
        Err(Error::WrongState(
            crate::error::StateProblem::StorageNotEmpty
        ))
    ));
}

/// A reftable past the end of the file: a writable open refuses it; a read-only one opens
/// (as QEMU's does: it reads the reftable without judging it) and answers every refcount
/// question with the corruption, never from refcounts it could not read.
#[test]
fn truncated_reftable_is_corrupt_not_panic() {
    let img = fresh(65536, 1 << 30);
    let mut bytes = img.into_storage().into_vec();
    bytes.truncate(65536 + 100);
    assert!(matches!(
        Image::open(MemStorage::from_bytes(bytes.clone()), OpenMode::ReadWrite),
        Err(Error::Corrupt(_))
    ));
    let mut ro = Image::open(MemStorage::from_bytes(bytes), OpenMode::ReadOnly).unwrap();
    assert!(matches!(ro.refcount(0), Err(Error::Corrupt(_))));
    assert!(matches!(ro.refcounts_match_disk(), Err(Error::Corrupt(_))));
    assert!(ro.check().unwrap().corruptions > 0);
}

/// Storage in memory whose `len()` reports `len`, zeros past the real bytes (a sparse file).
#[derive(Debug)]
struct Sparse {
    inner: MemStorage,
    len: u64,
}

impl Storage for Sparse {
    fn len(&self) -> Result<u64> {
        Ok(self.len)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        buf.fill(0);
        let real = self.inner.len()?;
        if offset < real {
            let n = usize::try_from(real - offset)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            self.inner.read_exact_at(&mut buf[..n], offset)?;
        }
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn set_len(&self, new_len: u64) -> Result<()> {
        self.inner.set_len(new_len)
    }
    fn sync_data(&self) -> Result<()> {
        Ok(())
    }
}

/// A fresh image of 64 KiB clusters, as bytes, with one more cluster at its end (where a
/// test writes a structure) and that cluster's offset.
fn with_spare_cluster() -> (MemStorage, HeaderArea, u64) {
    let img = fresh(65536, 1 << 30);
    let area = img.area().clone();
    let storage = img.into_storage();
    let at = storage.len().unwrap();
    storage.set_len(at + 65536).unwrap();
    (storage, area, at)
}

/// A snapshot table entry with extra_data_size 2^32 - 1 must not have the walk count a 4
/// GiB snapshot table, a page of counters per 4096 clusters, from a file that holds 40
/// bytes of it. QEMU refuses an entry with more than 1024 bytes of extra data
/// (`qemu-img check` fails, exit 1); so does the check, before counting anything of the
/// table.
#[test]
fn a_snapshot_with_too_much_extra_data_is_refused_as_qemu_refuses_it() {
    let (storage, mut area, at) = with_spare_cluster();
    let mut entry = [0u8; 48];
    entry[13] = 1; // id_str_size
    entry[15] = 1; // name_size
    entry[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
    storage.write_all_at(&entry, at).unwrap();
    area.header.nb_snapshots = 1;
    area.header.snapshots_offset = at;
    let sparse = Sparse {
        inner: storage,
        len: 1 << 40,
    };
    let r = check::check_references(&sparse, &area);
    assert!(
        matches!(
            r,
            Err(Error::Corrupt(Corruption::SnapshotExtraData {
                index: 0,
                size: u32::MAX
            }))
        ),
        "{:?}",
        r.map(|(report, refs)| (
            report.corruptions,
            report.messages.first().cloned(),
            refs.pages_allocated()
        ))
    );
    // A table longer than QEMU reads (64 MiB) is refused at the entry that passes it.
    entry[12..14].copy_from_slice(&u16::MAX.to_be_bytes());
    entry[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    entry[36..40].copy_from_slice(&1024u32.to_be_bytes());
    let each = (40 + 1024 + 2 * 65535u64).next_multiple_of(8);
    let n = (64 << 20) / each + 1;
    let mut table = vec![0u8; (n * each) as usize];
    for k in 0..n as usize {
        table[k * each as usize..][..40].copy_from_slice(&entry[..40]);
    }
    let storage = &sparse.inner;
    storage.set_len(at + table.len() as u64).unwrap();
    storage.write_all_at(&table, at).unwrap();
    area.header.nb_snapshots = n as u32;
    let r = check::check_references(&sparse, &area);
    assert!(
        matches!(
            r,
            Err(Error::Corrupt(Corruption::SnapshotTableTooBig { index, .. })) if u64::from(index) == n - 1
        ),
        "{:?}",
        r.map(|(report, _)| (report.corruptions, report.messages.first().cloned()))
    );
}

/// A LUKS header pointer of length 2^64 - 1 must not make the walk count every cluster from
/// the header to the end of the file, a page of counters per 4096 clusters of a sparse file
/// it never reads. A range passing the end of the file is one corruption and counts
/// nothing, as QEMU's `qcow2_inc_refcounts_imrt` counts it, and is not walked.
#[test]
fn a_luks_header_running_past_the_end_allocates_no_counters() {
    let (storage, mut area, at) = with_spare_cluster();
    area.header.crypt_method = crate::format::header::CRYPT_LUKS;
    let sparse = Sparse {
        inner: storage,
        len: 1 << 40,
    };
    for length in [u64::MAX, (1 << 40) - at + 65536] {
        area.crypto = Some(crate::format::CryptoHeaderPointer { offset: at, length });
        let (report, refs) = check::check_references(&sparse, &area).unwrap();
        let first = report.messages.first();
        assert_eq!(report.corruptions, 1, "{length:#x}: {first:?}");
        assert!(
            first.is_some_and(|m| m.contains("beyond the end of the image file")),
            "{first:?}"
        );
        assert!(
            refs.pages_allocated() <= 2,
            "{length:#x}: {} pages of counters",
            refs.pages_allocated()
        );
    }
}

/// QEMU reads the header's size as whole 512-byte sectors: an image created for a
/// 1000-byte disk would have bitmaps covering 512 bytes, and a write at 600 would be marked
/// nowhere. Creation refuses such a size.
#[test]
fn creation_refuses_a_disk_size_that_is_not_whole_sectors() {
    for disk in [1, 511, 1000, (1 << 30) + 1] {
        let err = Image::create_bitmap_only(MemStorage::new(), disk, 65536).map(|_| ());
        assert!(
            matches!(err, Err(Error::InvalidInput(_))),
            "{disk}: {err:?}"
        );
        let err = Image::create_with_data_file(MemStorage::new(), disk, 65536, "raw").map(|_| ());
        assert!(
            matches!(err, Err(Error::InvalidInput(_))),
            "{disk}: {err:?}"
        );
    }
    for disk in [0, 512, 1024, 1 << 30] {
        assert_eq!(fresh(65536, disk).header().disk_length(), disk);
    }
}

/// With autoclear bit 0 set QEMU validates every bitmaps extension of cluster 0, not only
/// the last, and refuses the image for one it rejects. A torn mix that walks an invalid
/// bitmaps extension before the new one must not read as trusting the new one, or the write
/// would go out unbracketed into an image nobody opens; with bit 0 clear (the bracket) both
/// would open it. Such a cluster 0 never reads as either side's.
#[test]
fn an_invalid_earlier_bitmaps_extension_is_never_read_as_the_last_one() {
    let img = fresh(65536, 1 << 30);
    let mut area = img.area().clone();
    area.header.autoclear_features |= AUTOCLEAR_BITMAPS;
    area.bitmaps = Some(BitmapsExtension {
        nb_bitmaps: 1,
        directory_size: 24,
        directory_offset: 3 * 65536,
    });
    let one = area.encode().unwrap();
    let valid = trusted_bitmaps(&one).expect("opens").expect("an extension");
    assert!(BitmapsExtension::decode(valid, 0, 65536).is_ok());
    // The same cluster 0 with a bitmaps frame of zeros (nb_bitmaps 0) before that one.
    let magic = EXT_BITMAPS.to_be_bytes();
    let at = one
        .windows(4)
        .position(|w| w == magic)
        .expect("the bitmaps frame");
    let mut two = one[..at].to_vec();
    two.extend_from_slice(&magic);
    two.extend_from_slice(&24u32.to_be_bytes());
    two.extend_from_slice(&[0; 24]);
    two.extend_from_slice(&one[at..one.len() - 32]);
    assert_eq!(two.len(), one.len());
    let seen = trusted_bitmaps(&two).expect("the frames walk");
    assert_ne!(seen, Some(valid), "read as trusting the last extension");
    // QEMU and this crate refuse it with bit 0 set.
    let h = Header::decode(&two).unwrap();
    assert!(decode_extensions(&two, &h).is_err());
}

/// A walk whose deadline passes while it reads stops asking the storage to read ahead the
/// batches of L2 tables left: on a device, that would hold the caller about as long as
/// reading them (a destination's preload, in the thread that reads the stream). Here the L1
/// table's read takes 50 ms against a budget of 10 ms, and 256 tables follow: nothing is
/// read ahead, and the walk is given up. A deadline that passes amid a batch would leave
/// its unread tables fresh on a device-reading handle until that reads something else; the
/// walk ends that with an empty prefetch.
#[test]
fn a_walk_past_its_deadline_reads_nothing_ahead() {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
    #[derive(Debug)]
    struct SlowL1 {
        inner: MemStorage,
        /// The offset whose read takes 50 ms.
        l1: AtomicU64,
        /// How many ranges the prefetches named.
        prefetches: AtomicUsize,
        /// How many ranges the last prefetch named.
        last: AtomicUsize,
    }
    impl Storage for SlowL1 {
        fn len(&self) -> Result<u64> {
            self.inner.len()
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            if offset == self.l1.load(SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            self.inner.read_exact_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.inner.write_all_at(buf, offset)
        }
        fn set_len(&self, new_len: u64) -> Result<()> {
            self.inner.set_len(new_len)
        }
        fn sync_data(&self) -> Result<()> {
            Ok(())
        }
        fn prefetch(&self, ranges: &[(u64, u64)]) {
            self.prefetches.fetch_add(ranges.len(), SeqCst);
            self.last.store(ranges.len(), SeqCst);
        }
    }
    // 512-byte clusters: 0 the header, 1 the reftable, 2 to 5 the L1 table (256 entries),
    // 6 to 261 the L2 tables it names (empty).
    let cs = 512usize;
    let mut f = vec![0u8; 262 * cs];
    let be32 = |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let be64 = |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_be_bytes());
    f[0..4].copy_from_slice(b"QFI\xfb");
    be32(&mut f, 4, 3);
    be32(&mut f, 20, 9);
    be64(&mut f, 24, 256 * 64 * cs as u64);
    be32(&mut f, 36, 256);
    be64(&mut f, 40, 2 * cs as u64);
    be64(&mut f, 48, cs as u64);
    be32(&mut f, 56, 1);
    be32(&mut f, 96, 4);
    be32(&mut f, 100, 104);
    for t in 0..256 {
        be64(&mut f, 2 * cs + 8 * t, ((6 + t) * cs) as u64 | 1 << 63);
    }
    let area = HeaderArea::decode(&f[..cs]).unwrap();
    let storage = SlowL1 {
        inner: MemStorage::from_bytes(f),
        l1: AtomicU64::new(2 * cs as u64),
        prefetches: AtomicUsize::new(0),
        last: AtomicUsize::new(0),
    };
    let r = check::check_references_within(&storage, &area, std::time::Duration::from_millis(10));
    assert!(
        matches!(r, Err(Error::Unsupported(_))),
        "{:?}",
        r.map(|(report, _)| report)
    );
    assert_eq!(
        storage.prefetches.load(SeqCst),
        0,
        "tables read ahead past the deadline"
    );
    // Within its budget the same walk reads every table ahead.
    let r = check::check_references_within(&storage, &area, std::time::Duration::from_secs(60));
    assert!(r.is_ok(), "{:?}", r.map(|(report, _)| report));
    assert_eq!(storage.prefetches.load(SeqCst), 256);
    // A deadline that passes amid a batch (the 11th table's read takes 50 ms) leaves the
    // batch's unread ranges fresh on a device-reading handle: an empty prefetch ends that.
    storage.l1.store(16 * cs as u64, SeqCst);
    storage.prefetches.store(0, SeqCst);
    let r = check::check_references_within(&storage, &area, std::time::Duration::from_millis(10));
    assert!(
        matches!(r, Err(Error::Unsupported(_))),
        "{:?}",
        r.map(|(report, _)| report)
    );
    assert_eq!(storage.prefetches.load(SeqCst), 128, "the first batch only");
    assert_eq!(storage.last.load(SeqCst), 0);
}
