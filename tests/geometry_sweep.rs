//! The geometry sweep: `BitmapStore::create` at every cluster size from 512 B
//! to 2 MiB, at disk sizes on both sides of every refcount boundary the size can reach and
//! at the largest size each cluster size allows, judged by the real `qemu-img check` and
//! `qemu-img info` after create, after a bitmap was added, marked and closed, and after it
//! was removed again. The marks (the disk's first and last byte among them) are read back
//! by our reader and through a `qemu-nbd` export: by `nbdinfo --map` up to 128 TiB
//! (`NBD_MAP_LIMIT`), by QEMU's own NBD client (`qemu-img map` with `x-dirty-bitmap`) above.
//!
//! # Where the boundaries are
//!
//! With cluster size `cs` and 16-bit refcounts (what `create_bitmap_only` writes):
//! - one L1 entry maps one L2 table of `cs / 8` entries, each mapping `cs` bytes, so an L1
//!   entry covers `L = cs/8 · cs` bytes and a disk of `size` bytes needs
//!   `ceil(size / L)` entries, in `n = ceil(entries · 8 / cs)` clusters;
//! - one refcount block holds `R = cs · 8 / 16 = cs / 2` refcounts, so it covers `R`
//!   clusters; one reftable cluster holds `T = cs / 8` entries, so it indexes `T` blocks,
//!   which cover `T · R = cs² / 16` clusters;
//! - a fresh image holds cluster 0, the reftable (cluster 1), `b` refcount blocks (the first
//!   in cluster 2, the others allocated in front of the L1 table) and the `n` L1 clusters:
//!   `2 + b + n` clusters, and they must be covered by the `b` blocks:
//!   `2 + b + n ≤ b · R`. So `b` blocks suffice exactly up to `n_b = b · (R − 1) − 2` L1
//!   clusters: the *refblock boundaries*. Past `n_T = T · (R − 1) − 2` the blocks needed no
//!   longer fit in one reftable cluster and the reftable must grow (move to a bigger table
//!   at the end of the file): the *reftable growth boundary*.
//! - QEMU's L1 table is at most 32 MiB (`QCOW_MAX_L1_SIZE`): 4 Mi entries, so the largest
//!   disk is `4 Mi · L`, whose L1 table is `32 MiB / cs` clusters.
//!
//! | cs | L (bytes per L1 entry) | R | n_1 | n_T (reftable grows) | L1 clusters at the largest size |
//! |---|---|---|---|---|---|
//! | 512 B | 32 KiB | 256 | 253 | 16,318 | 65,536 (so the reftable grows at create) |
//! | 1 KiB | 128 KiB | 512 | 509 | 65,406 | 32,768 |
//! | 2 KiB | 512 KiB | 1,024 | 1,021 | 261,886 | 16,384 |
//! | 4 KiB | 2 MiB | 2,048 | 2,045 | 1,048,062 | 8,192 |
//! | 8 KiB | 8 MiB | 4,096 | 4,093 | | 4,096 |
//! | 16 KiB … 2 MiB | | ≥ 8,192 | ≥ 8,189 | | ≤ 2,048 |
//!
//! So only 512 B clusters reach the reftable growth at create (past 34,221,326,336 bytes,
//! 16,318 L1 clusters of 2 MiB each, just under 32 GiB: defect 1 of `tests/review_defects.rs`); from 1 KiB up one reftable cluster covers
//! every image create can make, and the boundaries in reach are the refblock ones (the
//! first three while they are below the largest size; from 16 KiB up none is). At 512 B the
//! grown reftable has 50 % slack, so its *size* steps again further up; those steps are
//! found by bisection on `MemStorage` (reading `refcount_table_clusters` back) and swept
//! too. Each boundary is swept one L1 cluster below it, at it, and one sector above it
//! (one more L1 cluster); the layout this table predicts (blocks in use, reftable size) is
//! asserted for every image, so the boundaries are where the test says they are.
//!
//! After create, an `add` allocates the bitmap table and directory right after the L1
//! table, so at a boundary the add itself needs the next refblock (or, at 512 B, grows the
//! reftable): those allocation paths are swept too.
//!
//! The granularity is chosen per disk so that the bitmap stays at most 8 KiB, up to the
//! 2 GiB granularity limit: disks above 128 TiB (the largest ones at 64 KiB clusters and
//! up) get bitmaps of 128 KiB to 128 MiB in memory, of which only the marked clusters are
//! written. Files are sparse; the whole sweep (74 images) takes about a minute in debug
//! mode, plus the build.

mod common;

use dirty_bitmap::{OpenMode, Recording};
use std::path::Path;
use std::time::Instant;

use common::qemu::{assert_qemu_clean, nbd_dirty, ok, p, qemu_bitmaps, qemu_map_dirty};
use dirty_bitmap::storage::{FileStorage, MemStorage};
use dirty_bitmap::{BitmapStore, Error, Image};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// QEMU's `QCOW_MAX_L1_SIZE` in entries.
const MAX_L1_ENTRIES: u64 = (32 * MIB) / 8;
/// Largest granularity a bitmap may have.
const MAX_GRANULARITY: u64 = 1 << 31;
/// The largest disk whose marks `qemu-nbd` + `nbdinfo --map` read back. nbdinfo (libnbd
/// 1.14, no 64-bit block status) walks the whole export in requests of at most 2 GiB, about
/// 30 µs each: 128 TiB takes about 2 s, and the largest disks at 32 KiB clusters and up
/// (512 TiB to 2 EiB) would take from 8 s to days. Those seven points (the `largest`
/// of 32 KiB to 2 MiB clusters) are read through the same export by QEMU's own NBD client
/// instead (`common::qemu::qemu_map_dirty`), whose 64-bit block status reads 2 EiB at
/// once; nbdinfo, a second implementation, still reads every other point.
const NBD_MAP_LIMIT: u64 = 128 << 40;

#[derive(Debug, Clone, Copy)]
struct Geo {
    cs: u64,
}

impl Geo {
    /// Disk bytes one L1 entry covers.
    fn per_l1_entry(self) -> u64 {
        self.cs / 8 * self.cs
    }
    /// L1 entries per cluster.
    fn l1_per_cluster(self) -> u64 {
        self.cs / 8
    }
    /// Clusters one refcount block covers (16-bit refcounts).
    fn r(self) -> u64 {
        self.cs * 8 / 16
    }
    /// Refcount blocks one reftable cluster indexes.
    fn t(self) -> u64 {
        self.cs / 8
    }
    /// L1 clusters of a disk of `size` bytes.
    fn l1_clusters(self, size: u64) -> u64 {
        (size.div_ceil(self.per_l1_entry()) * 8).div_ceil(self.cs)
    }
    /// The largest disk whose L1 table has `n` clusters.
    fn size_of_l1(self, n: u64) -> u64 {
        n * self.l1_per_cluster() * self.per_l1_entry()
    }
    /// The last L1 cluster count that `b` refcount blocks cover: `2 + b + n ≤ b · R`.
    fn refblock_boundary(self, b: u64) -> u64 {
        b * (self.r() - 1) - 2
    }
    /// Refcount blocks a fresh image with `n` L1 clusters needs, while the reftable is one
    /// cluster: the least `b` with `2 + b + n ≤ b · R`.
    fn blocks_needed(self, n: u64) -> u64 {
        (n + 2).div_ceil(self.r() - 1)
    }
    /// The largest disk create accepts.
    fn max_size(self) -> u64 {
        MAX_L1_ENTRIES * self.per_l1_entry()
    }
}

/// A granularity that keeps the bitmap at most 8 KiB (64 Ki bits), within the format's
/// 512 B ..= 2 GiB.
fn granularity_for(size: u64) -> u64 {
    size.div_ceil(64 * KIB)
        .next_power_of_two()
        .clamp(512, MAX_GRANULARITY)
}

/// The reftable's offset and clusters, and how many of its entries name a block.
fn refcount_layout<S: dirty_bitmap::storage::Storage>(img: &Image<S>) -> (u64, u32, u64) {
    let h = img.header();
    let len = u64::from(h.refcount_table_clusters) * img.cluster_size();
    let mut buf = vec![0u8; len as usize];
    img.storage()
        .read_exact_at(&mut buf, h.refcount_table_offset)
        .unwrap();
    let blocks = buf
        .chunks_exact(8)
        .filter(|e| u64::from_be_bytes((*e).try_into().unwrap()) != 0)
        .count() as u64;
    (h.refcount_table_offset, h.refcount_table_clusters, blocks)
}

/// The reftable clusters `create` gives a disk of `size` bytes, on a `MemStorage`.
fn reftable_clusters_at(geo: Geo, size: u64) -> u32 {
    let s = BitmapStore::create(MemStorage::new(), size, geo.cs).unwrap();
    s.image().header().refcount_table_clusters
}

/// The first L1 cluster counts in `(lo, hi]` at which the reftable created for them is
/// larger than at the count before, at most `max` of them; `lo` must be below the first.
fn reftable_steps(geo: Geo, mut lo: u64, hi: u64, max: usize) -> Vec<u64> {
    let mut steps = Vec::new();
    while steps.len() < max {
        let at_lo = reftable_clusters_at(geo, geo.size_of_l1(lo));
        if reftable_clusters_at(geo, geo.size_of_l1(hi)) == at_lo {
            break;
        }
        // Invariant: lo has at_lo clusters, hi has more.
        let (mut a, mut b) = (lo, hi);
        while b - a > 1 {
            let m = a + (b - a) / 2;
            if reftable_clusters_at(geo, geo.size_of_l1(m)) == at_lo {
                a = m;
            } else {
                b = m;
            }
        }
        steps.push(b);
        lo = b;
    }
    steps
}

/// The granule-aligned extents `marks` dirty on a disk of `size` at granularity `g`, merged.
fn expected_extents(marks: &[(u64, u64)], size: u64, g: u64) -> Vec<(u64, u64)> {
    let mut granules: Vec<(u64, u64)> = marks
        .iter()
        .map(|&(off, len)| (off / g, (off + len - 1) / g))
        .collect();
    granules.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (first, last) in granules {
        let (s, e) = (first * g, ((last + 1) * g).min(size));
        match out.last_mut() {
            Some((os, ol)) if *os + *ol >= s => *ol = (*ol).max(e - *os),
            _ => out.push((s, e - s)),
        }
    }
    out
}

/// What the sweep saw for one image, printed as a table row.
struct Row {
    cs: u64,
    size: u64,
    what: String,
    l1: u64,
    created: (u64, u32, u64),
    added: (u64, u32, u64),
    /// Whether QEMU read the marks back too (`NBD_MAP_LIMIT`).
    /// The QEMU-side reader of the marks: `nbdinfo` or `qemu-img map`.
    reader: &'static str,
}

/// One sweep point: create, check, add + activate + mark + close, check + info + reload,
/// remove, check. `what` names the point in failure messages.
fn sweep_point(dir: &Path, geo: Geo, size: u64, what: &str) -> Row {
    let cs = geo.cs;
    let ctx = format!("cs {cs}, size {size} ({what})");
    let img = dir.join(format!("sweep-{cs}-{size}.qcow2"));
    let s = BitmapStore::create(FileStorage::create(&img).unwrap(), size, cs)
        .unwrap_or_else(|e| panic!("{ctx}: create: {e}"));
    let l1 = geo.l1_clusters(size);
    assert_eq!(
        u64::from(s.image().header().l1_size),
        size.div_ceil(geo.per_l1_entry()),
        "{ctx}: L1 entries"
    );
    let created = refcount_layout(s.image());
    // The layout the module docs derive: one reftable cluster, in cluster 1, with exactly
    // the blocks the L1 table needs, up to the reftable growth boundary; a moved, larger
    // reftable past it.
    let blocks = geo.blocks_needed(l1);
    if blocks <= geo.t() {
        assert_eq!(created, (cs, 1, blocks), "{ctx}: refcount layout");
    } else {
        assert!(
            created.0 != cs && created.1 > 1 && created.2 >= blocks,
            "{ctx}: the reftable must have grown: {created:?}"
        );
    }
    drop(s);
    assert_qemu_clean(&img);

    let g = granularity_for(size);
    let marks = [
        (0, 1),
        (size / 2 - 100, 200),
        (size - 512, 512),
        (size - 1, 1),
    ];
    let mut s = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    )
    .unwrap();
    s.add("sweep", g, Recording::Enabled)
        .unwrap_or_else(|e| panic!("{ctx}: add at granularity {g}: {e}"));
    let added = refcount_layout(s.image());
    s.activate()
        .unwrap_or_else(|e| panic!("{ctx}: activate: {e}"));
    let bm = s.bitmap("sweep").unwrap();
    for &(off, len) in &marks {
        bm.mark_dirty(off, len);
    }
    drop(bm);
    s.close().unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
    assert_qemu_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![("sweep".to_string(), g, vec!["auto".to_string()])],
        "{ctx}: qemu-img info"
    );
    let json = ok(
        "qemu-img",
        &["info", "-f", "qcow2", "--output=json", p(&img)],
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v["virtual-size"].as_u64(),
        Some(size),
        "{ctx}: virtual size"
    );
    assert_eq!(v["cluster-size"].as_u64(), Some(cs), "{ctx}: cluster size");

    let s = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let loaded = s.load("sweep").unwrap();
    let expected = expected_extents(&marks, size, g);
    assert_eq!(
        loaded.dirty_extents().collect::<Vec<_>>(),
        expected,
        "{ctx}: the marks read back"
    );
    drop((loaded, s));
    // QEMU reads the same bits, the end-of-disk ones included (see NBD_MAP_LIMIT for the
    // reader of the largest disks).
    let (reader, by_qemu) = if size <= NBD_MAP_LIMIT {
        ("nbdinfo", nbd_dirty(&img, "sweep"))
    } else {
        ("qemu-img map", qemu_map_dirty(&img, "sweep"))
    };
    assert_eq!(
        by_qemu, expected,
        "{ctx}: the marks as qemu-nbd + {reader} read them"
    );

    let mut s = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    )
    .unwrap();
    s.remove("sweep")
        .unwrap_or_else(|e| panic!("{ctx}: remove: {e}"));
    drop(s);
    assert_qemu_clean(&img);
    assert!(qemu_bitmaps(&img).is_empty(), "{ctx}: bitmap still listed");
    std::fs::remove_file(&img).unwrap();
    Row {
        cs,
        size,
        what: what.to_string(),
        l1,
        created,
        added,
        reader,
    }
}

/// The sweep points of one cluster size: a small disk, the refblock boundaries in reach
/// (the first three), the reftable growth boundary and the reftable's size steps after it
/// (512 B only), the largest disk.
fn points(geo: Geo) -> Vec<(u64, String)> {
    let max_l1 = geo.l1_clusters(geo.max_size());
    let mut out = vec![(MIB, "1 MiB".to_string())];
    let boundary = |n: u64, name: String, out: &mut Vec<(u64, String)>| {
        if n < max_l1 {
            out.push((
                geo.size_of_l1(n - 1),
                format!("{name}, one L1 cluster below"),
            ));
            out.push((geo.size_of_l1(n), format!("{name}, at")));
            out.push((geo.size_of_l1(n) + 512, format!("{name}, one sector above")));
        }
    };
    for b in 1..=3 {
        boundary(
            geo.refblock_boundary(b),
            format!("refblock boundary {b}"),
            &mut out,
        );
    }
    let growth = geo.refblock_boundary(geo.t());
    if growth < max_l1 {
        boundary(growth, "reftable growth".to_string(), &mut out);
        // The grown table's size steps: the first L1 cluster counts that get a larger one.
        for (k, step) in reftable_steps(geo, growth + 1, max_l1, 2)
            .into_iter()
            .enumerate()
        {
            boundary(step - 1, format!("reftable size step {}", k + 1), &mut out);
        }
    }
    out.push((geo.max_size(), "largest".to_string()));
    out
}

#[test]
fn every_cluster_size_and_refcount_boundary_passes_qemu_check() {
    let start = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for cluster_bits in 9..=21 {
        let geo = Geo {
            cs: 1u64 << cluster_bits,
        };
        for (size, what) in points(geo) {
            rows.push(sweep_point(dir.path(), geo, size, &what));
        }
        // One sector above the largest size needs one more L1 entry than 32 MiB hold:
        // refused before the file is touched.
        let img = dir.path().join("too-big.qcow2");
        let over = geo.max_size() + 512;
        match BitmapStore::create(FileStorage::create(&img).unwrap(), over, geo.cs) {
            Err(Error::InvalidInput(_)) => {}
            other => panic!("cs {}: size {over}: {other:?}", geo.cs),
        }
        assert_eq!(
            std::fs::metadata(&img).unwrap().len(),
            0,
            "refused, yet written"
        );
        std::fs::remove_file(&img).unwrap();
    }
    println!("| cs | disk size | point | L1 clusters | reftable (offset, clusters, blocks) after create | after add | marks read by QEMU |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:?} | {:?} | {} |",
            r.cs, r.size, r.what, r.l1, r.created, r.added, r.reader
        );
    }
    println!(
        "{} images in {:.1} s",
        rows.len(),
        start.elapsed().as_secs_f64()
    );
    // The sweep reached what it claims: the reftable grew at create (512 B), and an add
    // right at a refblock boundary needed a block more than create had.
    assert!(rows.iter().any(|r| r.created.1 > 1));
    assert!(rows.iter().any(|r| r.added.2 > r.created.2));
    // QEMU read back the marks of every point: through nbdinfo, but the largest disks of
    // 32 KiB clusters and up through QEMU's own client (NBD_MAP_LIMIT).
    let by_map: Vec<u64> = rows
        .iter()
        .filter(|r| r.reader == "qemu-img map")
        .map(|r| r.cs)
        .collect();
    assert_eq!(by_map, (15..=21).map(|b| 1u64 << b).collect::<Vec<_>>());
}

/// The boundaries of the module docs' table, so the table and the code agree.
#[test]
fn boundary_table() {
    let g = |cs| Geo { cs };
    assert_eq!(g(512).refblock_boundary(1), 253);
    assert_eq!(g(512).refblock_boundary(g(512).t()), 16_318);
    assert_eq!(g(512).size_of_l1(16_318), 34_221_326_336);
    assert_eq!(g(512).l1_clusters(g(512).max_size()), 65_536);
    assert_eq!(g(1024).refblock_boundary(g(1024).t()), 65_406);
    assert_eq!(g(2048).refblock_boundary(g(2048).t()), 261_886);
    assert_eq!(g(4096).refblock_boundary(1), 2_045);
    assert_eq!(g(8192).refblock_boundary(1), 4_093);
    assert_eq!(g(8192).l1_clusters(g(8192).max_size()), 4_096);
    assert_eq!(g(16384).l1_clusters(g(16384).max_size()), 2_048);
    assert_eq!(g(2 * MIB).max_size(), 1 << 61);
}
