//! Memory: a 16 TiB bitmap at 64 KiB granularity (2^28 bits, 32 MiB of leaf words) must
//! cost at most 32 MiB + 1 %, and checking a huge sparse image must not allocate in
//! proportion to its logical size. Measured with a counting allocator and, for the arrays
//! mapped outside it, the growth of the process's anonymous mappings; not taken on trust.
//! It counts only the measuring thread's allocations: the test harness's main thread
//! allocates when it starts waiting for the test (its channel registers a waiter), at a
//! moment that races the measurement. One `#[test]` runs every measurement in turn.

mod common;

use dirty_bitmap::OpenMode;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering};

use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::{DirtyBitmap, Image};

struct Counting;

/// Bytes allocated minus bytes freed by the tracked thread (signed: it may free what it
/// allocated before tracking began).
static LIVE: AtomicIsize = AtomicIsize::new(0);
/// The most of `LIVE` since the last reset.
static PEAK: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    /// Whether this thread's allocations are counted. A `const` `Cell` without a
    /// destructor: reading it never allocates, so the allocator may use it.
    static TRACKED: Cell<bool> = const { Cell::new(false) };
}

fn tracked() -> bool {
    TRACKED.try_with(Cell::get).unwrap_or(false)
}

fn add_live(n: usize) {
    if tracked() {
        let n = n as isize;
        let now = LIVE.fetch_add(n, Ordering::SeqCst) + n;
        PEAK.fetch_max(now, Ordering::SeqCst);
    }
}

/// What `f` returns, and the most bytes it held allocated at once beyond what was live
/// before it.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let r = f();
    (r, beyond(PEAK.load(Ordering::SeqCst), before))
}

/// Bytes live now beyond `before` (a reading of `LIVE` or `PEAK`).
fn beyond(now: isize, before: isize) -> usize {
    usize::try_from(now - before)
        .unwrap_or_else(|_| panic!("freed {} more than allocated", before - now))
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; the counter is only bookkeeping.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add_live(layout.size());
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add_live(layout.size());
        // SAFETY: forwarded as is; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if tracked() {
            LIVE.fetch_sub(layout.size() as isize, Ordering::SeqCst);
        }
        // SAFETY: `ptr` came from this allocator with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn memory_figures() {
    TRACKED.with(|t| t.set(true));
    sixteen_tib_bitmap_costs_at_most_32_mib_plus_one_percent();
    checking_a_huge_sparse_image_allocates_little();
    the_copied_flag_pass_holds_one_refcount_block_at_a_time();
    checking_an_image_full_of_data_allocates_a_few_bytes_a_cluster();
    the_copied_flag_pass_refuses_entries_alternating_blocks_past_its_read_bound();
}

/// Bytes of the process's anonymous mappings (no path in `/proc/self/maps`): where arrays
/// of 2 MiB or more live (`src/bitmap/atomic.rs`), outside the allocator.
fn anonymous_mapped() -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines()
        .filter(|l| l.split_whitespace().nth(5).is_none())
        .map(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let a = usize::from_str_radix(a, 16).unwrap();
            let b = usize::from_str_radix(b, 16).unwrap();
            b - a
        })
        .sum()
}

fn sixteen_tib_bitmap_costs_at_most_32_mib_plus_one_percent() {
    let before = LIVE.load(Ordering::SeqCst);
    let mapped_before = anonymous_mapped();
    let bm = DirtyBitmap::new(16 << 40, 64 << 10).unwrap();
    let mapped = anonymous_mapped() - mapped_before;
    let heap = beyond(LIVE.load(Ordering::SeqCst), before);
    let leaf = 32usize << 20;
    // Arrays of 2 MiB or more (here the 32 MiB of leaf words, and nothing else) are an
    // anonymous mapping for huge pages (`src/bitmap/atomic.rs`), outside the allocator:
    // measured as the growth of the process's anonymous mappings.
    assert!(
        heap < 2 << 20,
        "the leaf words came from the heap: {heap} bytes"
    );
    assert_eq!(
        mapped, leaf,
        "the anonymous mappings grew by {mapped} bytes, not the 32 MiB of leaf words"
    );
    let measured = heap + mapped;
    let limit = leaf + leaf / 100;
    eprintln!(
        "16 TiB at 64 KiB: {measured} bytes allocated ({:.3} % over the 32 MiB of leaf words), memory_usage() = {}",
        (measured - leaf) as f64 * 100.0 / leaf as f64,
        bm.memory_usage()
    );
    assert!(measured <= limit, "{measured} > {limit}");
    // memory_usage() is exactly the heap measured plus the struct itself.
    assert_eq!(
        bm.memory_usage(),
        measured + std::mem::size_of::<DirtyBitmap>()
    );
    assert!(bm.memory_usage() <= limit);
    // Marking does not allocate, not even for a moment (the peak, not only what stays).
    let before_marks = LIVE.load(Ordering::SeqCst);
    PEAK.store(before_marks, Ordering::SeqCst);
    for i in 0..10_000u64 {
        bm.mark_dirty(i * 1_700_000_017 % (16 << 40), 4096);
    }
    assert_eq!(
        LIVE.load(Ordering::SeqCst),
        before_marks,
        "marking allocated"
    );
    assert_eq!(
        PEAK.load(Ordering::SeqCst),
        before_marks,
        "marking allocated and freed"
    );
}

/// `Image::check` on a bitmap-only image whose file was extended, sparse, to 512 GiB with
/// 512-byte clusters (2^30 clusters): the counters are paged and only pages with
/// references are allocated, so the peak stays far below the 8 GiB that one counter per
/// cluster would take, and the extension (no refcount, no reference) is neither a leak
/// nor a corruption.
fn checking_a_huge_sparse_image_allocates_little() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.qcow2");
    Image::create_bitmap_only(FileStorage::create(&path).unwrap(), 1 << 30, 512).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(512 << 30)
        .unwrap();
    let image = Image::open(
        FileStorage::open(&path, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let (report, peak) = peak_of(|| image.check().unwrap());
    eprintln!("check of a 512 GiB sparse file (2^30 clusters): peak {peak} bytes allocated");
    assert_eq!(report.total_clusters, 1 << 30);
    assert!(report.is_clean(), "{report:?}");
    assert!(peak < 64 << 20, "peak {peak} bytes");
}

/// The check's OFLAG_COPIED pass does not keep every refcount block it read (which would
/// spare entries alternating between blocks a read each): an image whose reftable names
/// many blocks (holes of a sparse file cost nothing on disk) and whose L2 entries name a
/// cluster under each would have it hold all of them at once. Here 256 blocks of 64 KiB: 16
/// MiB held. Its lookups are sorted by block and one block is held at a time.
fn the_copied_flag_pass_holds_one_refcount_block_at_a_time() {
    let cb = 16u32;
    let cs = 1usize << cb;
    let per_block = cs * 8 / 16;
    let blocks = 256usize;
    // Cluster 0 the header, 1 the reftable, 2 the L1 table, 3 one L2 table, 8.. the
    // refcount blocks (all zeros); L2 entry j names a cluster under block j, past the end.
    let mut f = vec![0u8; (8 + blocks) * cs];
    let be32 = |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let be64 = |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_be_bytes());
    f[0..4].copy_from_slice(b"QFI\xfb");
    be32(&mut f, 4, 3);
    be32(&mut f, 20, cb);
    be64(&mut f, 24, (cs / 8 * cs) as u64);
    be32(&mut f, 36, 1);
    be64(&mut f, 40, (2 * cs) as u64);
    be64(&mut f, 48, cs as u64);
    be32(&mut f, 56, 1);
    be32(&mut f, 96, 4);
    be32(&mut f, 100, 104);
    for j in 0..blocks {
        be64(&mut f, cs + 8 * j, ((8 + j) * cs) as u64);
        be64(
            &mut f,
            3 * cs + 8 * j,
            ((j * per_block + 5) * cs) as u64 | 1 << 63,
        );
    }
    be64(&mut f, 2 * cs, (3 * cs) as u64 | 1 << 63);
    let image = Image::open(
        dirty_bitmap::storage::MemStorage::from_bytes(f),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let (report, peak) = peak_of(|| image.check().unwrap());
    eprintln!("check of an image naming {blocks} refcount blocks: peak {peak} bytes allocated");
    let copied = report
        .messages
        .iter()
        .filter(|m| m.contains("OFLAG_COPIED data cluster"))
        .count();
    assert!(
        copied > 0,
        "{:?}",
        &report.messages[..5.min(report.messages.len())]
    );
    assert!(peak < 8 << 20, "peak {peak} bytes");
}

/// `Image::check` of a sound image with every guest cluster allocated (QEMU's metadata
/// preallocation, 64 MiB in 512-byte clusters: 131,072 data clusters, a sparse file):
/// the COPIED rule is judged from two bits a cluster gathered by the walk, beside the
/// walk's four-byte counters. The peak stays under six bytes a cluster of the file, beyond
/// a fixed 256 KiB; with one flag wrong, the second pass runs, in batches, within eight
/// bytes a cluster and one more MiB.
fn checking_an_image_full_of_data_allocates_a_few_bytes_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.qcow2");
    common::qemu::small_clusters_all_allocated(&path, "64M");
    let image = Image::open(
        FileStorage::open(&path, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let (report, peak) = peak_of(|| image.check().unwrap());
    drop(image);
    let clusters = report.total_clusters as usize;
    eprintln!(
        "check of {} allocated guest clusters in a file of {clusters} clusters: peak {peak} bytes allocated ({:.1} a cluster)",
        report.frag.allocated,
        peak as f64 / clusters as f64
    );
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.frag.allocated, 131_072);
    // Six bytes a cluster: under what the second pass alone holds here (a batch, 1.3 MB
    // at the peak with it).
    assert!(
        peak < 6 * clusters + (256 << 10),
        "peak {peak} bytes for {clusters} clusters"
    );

    // The same image with one data entry's COPIED flag cleared runs the second pass, which
    // looks every active entry up again: in batches (one of 8,192 lookups is about 600
    // KB), within the same bound and one more MiB, and it still finds the one entry.
    let mut bytes = std::fs::read(&path).unwrap();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be(&bytes, 40) as usize;
    let l2 = (be(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let e = be(&bytes, l2 + 8 * 5);
    assert_ne!(
        e & 1 << 63,
        0,
        "QEMU sets COPIED on the clusters it allocates"
    );
    bytes[l2 + 8 * 5..l2 + 8 * 6].copy_from_slice(&(e & !(1 << 63)).to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    drop(bytes);
    let image = Image::open(
        FileStorage::open(&path, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let (report, peak) = peak_of(|| image.check().unwrap());
    eprintln!("the same with one COPIED flag cleared: peak {peak} bytes allocated");
    assert_eq!(report.corruptions, 1, "{:?}", report.messages);
    assert!(
        report.messages[0].contains("OFLAG_COPIED data cluster"),
        "{:?}",
        report.messages
    );
    assert!(
        peak < 8 * clusters + (1280 << 10),
        "peak {peak} bytes for {clusters} clusters"
    );
}

/// From a review: the second COPIED pass listed every active entry with its refcount
/// before it read a block, 72 to 128 bytes an entry, so a corrupt 1 GiB file of 2 MiB
/// clusters (2^27 entries) took 17 GB. It resolves its lookups in batches with one block
/// held; entries that alternate between two blocks then cost a block read per batch, which
/// it bounds (twice the file and 64 MiB) and refuses past that with a typed error. Here a
/// 16 MiB file of 2 MiB clusters whose two L2 tables' 524,288 entries alternate between a
/// cluster under refcount block 0 and one under block 1 (past the end): listing them would
/// take 38 MB; one batch and a few clusters stay under 16 MiB, and the pass gives up at
/// the bound.
fn the_copied_flag_pass_refuses_entries_alternating_blocks_past_its_read_bound() {
    let cb = 21u32;
    let cs = 1usize << cb;
    let per_block = cs * 8 / 16;
    // Cluster 0 the header, 1 the reftable, 2 the L1 table, 3 and 4 the L2 tables, 5 a
    // data cluster, 6 and 7 refcount blocks 0 and 1 (all zeros).
    let mut f = vec![0u8; 8 * cs];
    let be32 = |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let be64 = |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_be_bytes());
    f[0..4].copy_from_slice(b"QFI\xfb");
    be32(&mut f, 4, 3);
    be32(&mut f, 20, cb);
    be64(&mut f, 24, 2 * (cs / 8 * cs) as u64);
    be32(&mut f, 36, 2); // l1_size
    be64(&mut f, 40, (2 * cs) as u64);
    be64(&mut f, 48, cs as u64);
    be32(&mut f, 56, 1);
    be32(&mut f, 96, 4);
    be32(&mut f, 100, 104);
    be64(&mut f, cs, (6 * cs) as u64);
    be64(&mut f, cs + 8, (7 * cs) as u64);
    for t in 0..2 {
        be64(&mut f, 2 * cs + 8 * t, ((3 + t) * cs) as u64 | 1 << 63);
        for j in 0..cs / 8 {
            let target = if j % 2 == 0 { 5 } else { per_block + 5 };
            be64(&mut f, (3 + t) * cs + 8 * j, (target * cs) as u64 | 1 << 63);
        }
    }
    let image = Image::open(
        dirty_bitmap::storage::MemStorage::from_bytes(f),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let (r, peak) = peak_of(|| image.check());
    eprintln!(
        "check of 524,288 entries alternating two refcount blocks: peak {peak} bytes allocated"
    );
    assert!(
        matches!(&r, Err(dirty_bitmap::Error::Unsupported(m)) if m.contains("twice the file")),
        "{:?}",
        r.map(|report| report.corruptions)
    );
    // The walk and the pass hold a few 2 MiB clusters at once (the reftable, a table, a
    // block): eight of them bound it.
    assert!(peak < 8 * cs, "peak {peak} bytes");
}
