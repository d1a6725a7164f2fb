//! The format codecs against real QEMU images, and against arbitrary bytes.
//!
//! The `qemu_*` tests need `qemu-img` (QEMU 10) on the PATH or at /usr/bin/qemu-img; without
//! it they fail, never skip. The proptests feed every decoder arbitrary or mutated bytes and
//! require an `Ok` or an `Err`, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use dirty_bitmap::format::directory::FLAG_AUTO;
use dirty_bitmap::format::extension::{EXT_BITMAPS, EXT_FEATURE_TABLE};
use dirty_bitmap::format::header::AUTOCLEAR_BITMAPS;
use dirty_bitmap::format::refcount::decode_reftable_entry;
use dirty_bitmap::format::{
    decode_directory, decode_extensions, decode_reftable, decode_table, encode_directory,
    encode_table, get_refcount, qemu_feature_table, set_refcount, table_size, triage_directory,
    BitmapsExtension, DirEntry, Extension, Header, HeaderArea, ImageGeometry, RawDirEntry,
    TableEntry,
};
use proptest::prelude::*;

mod common;

// ---------------------------------------------------------------------------------------
// Real images
// ---------------------------------------------------------------------------------------

fn qemu_img() -> PathBuf {
    for candidate in ["/usr/bin/qemu-img", "qemu-img"] {
        if Command::new(candidate).arg("--version").output().is_ok() {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "qemu-img is required for the QEMU interop tests but was not found \
         (looked for /usr/bin/qemu-img and qemu-img on PATH); install qemu-utils"
    );
}

fn run(args: &[&str]) {
    let out = Command::new(qemu_img())
        .args(args)
        .output()
        .expect("failed to run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_at(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let bytes = std::fs::read(path).expect("read image");
    bytes[offset as usize..(offset + len) as usize].to_vec()
}

/// Creates an image with `create_args`, adds bitmap `b0`, and returns its path.
fn image_with_bitmap(dir: &Path, name: &str, create_args: &[&str]) -> PathBuf {
    let img = dir.join(name);
    let img_s = img.to_str().unwrap();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(create_args);
    args.push(img_s);
    args.push("1G");
    run(&args);
    run(&["bitmap", "--add", img_s, "b0"]);
    img
}

/// Decodes everything bitmap-related in `img` and checks the one bitmap `b0`.
fn check_b0(img: &Path, cluster_bits: u32, granularity_bits: u8) -> HeaderArea {
    let cluster_size = 1u64 << cluster_bits;
    let cluster0 = read_at(img, 0, cluster_size);
    let area = HeaderArea::decode(&cluster0).expect("decode cluster 0");
    let h = &area.header;
    assert_eq!(h.version, 3);
    assert_eq!(h.cluster_bits, cluster_bits);
    assert_eq!(h.size, 1 << 30);
    assert_eq!(h.refcount_order, 4);
    assert_eq!(h.header_length, 112);
    assert_eq!(h.autoclear_features, AUTOCLEAR_BITMAPS);
    assert_eq!(h.incompatible_features, 0);
    assert!(h.can_hold_bitmaps());

    let ext = area.bitmaps.expect("bitmaps extension");
    assert_eq!(ext.nb_bitmaps, 1);
    assert_eq!(ext.directory_size, 32);
    assert_eq!(ext.directory_offset % cluster_size, 0);

    // The same extensions through the lower-level walk.
    let exts = decode_extensions(&cluster0, h).unwrap();
    assert!(exts.contains(&Extension::Bitmaps(ext)));

    let geometry = h.geometry().unwrap();
    let dir = read_at(img, ext.directory_offset, ext.directory_size);
    let entries = decode_directory(&dir, ext.nb_bitmaps, &geometry).expect("decode directory");
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(e.name, "b0");
    assert_eq!(e.granularity_bits, granularity_bits);
    assert!(!e.in_use, "qemu-img closes the image, clearing in_use");
    assert!(e.auto);
    assert_eq!(e.flags(), FLAG_AUTO);
    assert_eq!(
        e.table_size,
        table_size(h.disk_length(), granularity_bits, cluster_size).unwrap()
    );
    e.check_table_size(&geometry).unwrap();
    assert_eq!(encode_directory(&entries, &geometry).unwrap(), dir);

    // An empty bitmap: every table entry is 0.
    let table = read_at(img, e.table_offset, u64::from(e.table_size) * 8);
    let decoded = decode_table(&table, e.table_size, cluster_bits).unwrap();
    assert!(decoded.iter().all(|t| *t == TableEntry::Zeroes));
    assert_eq!(encode_table(&decoded, cluster_bits).unwrap(), table);

    // Refcounts: cluster 0, the directory and the table each have refcount 1.
    let reftable = read_at(
        img,
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cluster_size,
    );
    let reftable = decode_reftable(&reftable, cluster_bits).unwrap();
    let block_offset = reftable[0].expect("first refcount block");
    let block = read_at(img, block_offset, cluster_size);
    for offset in [0, ext.directory_offset, e.table_offset, block_offset] {
        let cluster = offset >> cluster_bits;
        assert_eq!(get_refcount(&block, h.refcount_order, cluster).unwrap(), 1);
    }

    // Byte-exact re-encoding of cluster 0.
    let again = area.encode().expect("encode cluster 0");
    assert_eq!(again.len(), cluster0.len());
    if again != cluster0 {
        let first = again.iter().zip(&cluster0).position(|(a, b)| a != b);
        panic!("re-encoded cluster 0 differs from QEMU's at byte {first:?}");
    }
    area
}

#[test]
fn qemu_image_64k_clusters_round_trips_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmap(dir.path(), "a.qcow2", &["-o", "cluster_size=65536"]);
    let area = check_b0(&img, 16, 16);
    // Layout QEMU writes (`docs/FORMAT.md`, "Layout QEMU writes"): feature table at 0x70, bitmaps at 0x1F8, end at 0x218.
    let cluster0 = read_at(&img, 0, 0x220);
    assert_eq!(&cluster0[0x70..0x74], &EXT_FEATURE_TABLE.to_be_bytes());
    assert_eq!(&cluster0[0x74..0x78], &384u32.to_be_bytes());
    assert_eq!(&cluster0[0x1F8..0x1FC], &EXT_BITMAPS.to_be_bytes());
    assert_eq!(&cluster0[0x218..0x220], &[0; 8]);
    assert_eq!(area.feature_table, Some(qemu_feature_table()));
}

#[test]
fn qemu_image_4k_clusters_has_no_feature_table() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmap(dir.path(), "a.qcow2", &["-o", "cluster_size=4096"]);
    let area = check_b0(&img, 12, 12);
    assert_eq!(area.feature_table, None);
}

#[test]
fn qemu_image_with_backing_file_round_trips_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    run(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1G"]);
    let img = image_with_bitmap(
        dir.path(),
        "top.qcow2",
        &[
            "-o",
            "cluster_size=65536",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qcow2",
        ],
    );
    let area = check_b0(&img, 16, 16);
    assert_eq!(area.backing_format.as_deref(), Some(&b"qcow2"[..]));
    assert_eq!(
        area.backing_file.as_deref(),
        Some(base.to_str().unwrap().as_bytes())
    );
    assert_eq!(area.header.backing_file_offset, 0x230);
}

#[test]
fn qemu_v2_image_decodes_but_cannot_hold_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("v2.qcow2");
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        img.to_str().unwrap(),
        "1G",
    ]);
    let cluster0 = read_at(&img, 0, 65536);
    let area = HeaderArea::decode(&cluster0).unwrap();
    assert_eq!(area.header.version, 2);
    assert_eq!(area.header.header_length, 72);
    assert_eq!(area.header.refcount_order, 4);
    assert!(!area.header.can_hold_bitmaps());
    assert_eq!(area.encode().unwrap(), cluster0);
}

#[test]
fn qemu_accepts_cluster_0_written_by_us() {
    // Replace QEMU's cluster 0 with our encoding plus an unknown extension, then let
    // `qemu-img check` and `qemu-img info` judge the result.
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmap(dir.path(), "a.qcow2", &["-o", "cluster_size=65536"]);
    let mut bytes = std::fs::read(&img).unwrap();
    let mut area = HeaderArea::decode(&bytes[..65536]).unwrap();
    area.unknown.push(dirty_bitmap::format::UnknownExtension {
        kind: 0x1111_1111,
        data: b"kept".to_vec(),
    });
    bytes[..65536].copy_from_slice(&area.encode().unwrap());
    std::fs::write(&img, &bytes).unwrap();
    run(&["check", "-q", img.to_str().unwrap()]);
    let out = Command::new(qemu_img())
        .args(["info", "--output=json", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"b0\""));
}

// ---------------------------------------------------------------------------------------
// Decoders never panic
// ---------------------------------------------------------------------------------------

/// A valid 512-byte-cluster image header area with one bitmap, as a mutation base.
fn small_cluster0() -> Vec<u8> {
    let header = Header {
        l1_size: 32,
        l1_table_offset: 0x600,
        refcount_table_offset: 0x200,
        refcount_table_clusters: 1,
        autoclear_features: AUTOCLEAR_BITMAPS,
        ..Header::v3(9, 1 << 20)
    };
    let mut area = HeaderArea::new(header);
    area.bitmaps = Some(BitmapsExtension {
        nb_bitmaps: 1,
        directory_size: 32,
        directory_offset: 0x1000,
    });
    area.backing_format = Some(b"raw".to_vec());
    area.backing_file = Some(b"base.img".to_vec());
    area.encode().unwrap()
}

fn mutate(mut base: Vec<u8>, edits: &[(usize, u8)]) -> Vec<u8> {
    let len = base.len();
    for &(i, b) in edits {
        base[i % len] = b;
    }
    base
}

proptest! {
    #![proptest_config(common::seeded_proptest(ProptestConfig::with_cases(512)))]

    #[test]
    fn header_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Header::decode(&bytes);
    }

    #[test]
    fn header_area_decode_never_panics_on_mutations(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..16),
        cut in 0usize..=512,
    ) {
        let bytes = mutate(small_cluster0(), &edits);
        let _ = HeaderArea::decode(&bytes);
        let _ = HeaderArea::decode(&bytes[..cut]);
        if let Ok(h) = Header::decode(&bytes) {
            let _ = decode_extensions(&bytes[..cut], &h);
        }
    }

    #[test]
    fn extensions_decode_never_panics(area in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut bytes = small_cluster0();
        bytes.truncate(112);
        bytes.extend_from_slice(&area);
        let h = Header::decode(&small_cluster0()).unwrap();
        let _ = decode_extensions(&bytes, &h);
    }

    #[test]
    fn bitmaps_extension_decode_never_panics(
        data in proptest::collection::vec(any::<u8>(), 0..32),
        cluster_size in any::<u64>(),
    ) {
        let _ = BitmapsExtension::decode(&data, 0, cluster_size);
    }

    #[test]
    fn dir_entry_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = RawDirEntry::decode(&bytes);
    }

    #[test]
    fn directory_decode_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        nb in any::<u32>(),
        cluster_bits in 9u32..=21,
        disk in any::<u64>(),
    ) {
        let g = ImageGeometry::new(cluster_bits, disk).unwrap();
        let _ = decode_directory(&bytes, nb, &g);
        if let Ok(entries) = decode_directory(&bytes, nb, &g) {
            for e in &entries {
                let _ = e.check_table_size(&g);
            }
        }
    }

    #[test]
    fn directory_decode_never_panics_on_mutated_entries(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        nb in 0u32..4,
    ) {
        let g = ImageGeometry::new(16, 1 << 30).unwrap();
        let e = DirEntry {
            name: "bitmap".into(),
            table_offset: 0x50000,
            table_size: 1,
            granularity_bits: 16,
            in_use: false,
            auto: true,
        };
        let mut f = e.clone();
        f.name = "other one".into();
        let bytes = mutate(encode_directory(&[e, f], &g).unwrap(), &edits);
        let _ = decode_directory(&bytes, nb, &g);
        // The repair's reading never panics either, and agrees with the strict one: the
        // directory decodes exactly when triage finds no problem at all.
        let t = triage_directory(&bytes, nb, &g);
        let sound = t.framing.is_none() && t.entries.iter().all(|x| x.verdict.is_ok());
        let strict = decode_directory(&bytes, nb, &g)
            .map(|es| es.iter().all(|x| x.check_table_size(&g).is_ok()));
        prop_assert_eq!(sound, strict.unwrap_or(false));
    }

    #[test]
    fn table_decode_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..128),
        size in any::<u32>(),
        cluster_bits in any::<u32>(),
    ) {
        let _ = decode_table(&bytes, size, cluster_bits);
        let _ = decode_table(&bytes, size % 20, cluster_bits % 24);
    }

    #[test]
    fn reftable_decode_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..128),
        cluster_bits in any::<u32>(),
        raw in any::<u64>(),
        cluster_size in any::<u64>(),
    ) {
        let _ = decode_reftable(&bytes, cluster_bits);
        let _ = decode_reftable(&bytes, cluster_bits % 24);
        let _ = decode_reftable_entry(raw, 0, cluster_size);
    }

    #[test]
    fn refcount_access_never_panics(
        mut block in proptest::collection::vec(any::<u8>(), 0..64),
        order in 0u32..10,
        index in any::<u64>(),
        small_index in 0u64..600,
        value in any::<u64>(),
    ) {
        let _ = get_refcount(&block, order, index);
        let _ = set_refcount(&mut block, order, index, value);
        let _ = get_refcount(&block, order, small_index);
        let _ = set_refcount(&mut block, order, small_index, value);
    }

    #[test]
    fn table_size_never_panics(disk in any::<u64>(), g in any::<u8>(), cs in any::<u64>()) {
        let _ = table_size(disk, g, cs);
        let _ = table_size(disk, g % 40, 1 << (cs % 30));
    }

    // Round trips over generated values.

    #[test]
    fn dir_entry_round_trips(
        name in "[a-zA-Z0-9 _.-]{1,64}",
        table_cluster in 1u64..1000,
        g in 9u8..=31,
        in_use in any::<bool>(),
        auto in any::<bool>(),
    ) {
        let geometry = ImageGeometry::new(16, 1 << 30).unwrap();
        let e = DirEntry {
            name: name.into(),
            table_offset: table_cluster << 16,
            table_size: table_size(1 << 30, g, 65536).unwrap(),
            granularity_bits: g,
            in_use,
            auto,
        };
        let bytes = encode_directory(std::slice::from_ref(&e), &geometry).unwrap();
        prop_assert_eq!(bytes.len() as u64, e.encoded_len());
        prop_assert_eq!(bytes.len() % 8, 0);
        prop_assert_eq!(decode_directory(&bytes, 1, &geometry).unwrap(), vec![e]);
    }

    #[test]
    fn table_round_trips(raw in proptest::collection::vec((0u8..3, 1u64..1 << 40), 0..64)) {
        let entries: Vec<TableEntry> = raw
            .iter()
            .map(|&(k, c)| match k {
                0 => TableEntry::Zeroes,
                1 => TableEntry::Ones,
                _ => TableEntry::Data(c << 16),
            })
            .collect();
        let bytes = encode_table(&entries, 16).unwrap();
        prop_assert_eq!(decode_table(&bytes, entries.len() as u32, 16).unwrap(), entries);
    }

    #[test]
    fn refcount_set_then_get(order in 0u32..=6, index in 0u64..64, value in any::<u64>()) {
        let mut block = vec![0xA5u8; 512];
        let before = block.clone();
        let max = dirty_bitmap::format::max_refcount(order).unwrap();
        set_refcount(&mut block, order, index, value & max).unwrap();
        prop_assert_eq!(get_refcount(&block, order, index).unwrap(), value & max);
        // No other refcount changed.
        let per_byte_bits = 1u64 << order;
        for other in 0..(512 * 8 / per_byte_bits) {
            if other != index {
                prop_assert_eq!(
                    get_refcount(&block, order, other).unwrap(),
                    get_refcount(&before, order, other).unwrap()
                );
            }
        }
    }

    #[test]
    fn header_round_trips(
        cluster_bits in 16u32..=21,
        size_mb in 1u64..1 << 20,
        unknown in proptest::collection::vec(any::<u8>(), 0..32),
        compat in any::<u64>(),
        autoclear in any::<u64>(),
        order in 0u32..=6,
    ) {
        let cs = 1u64 << cluster_bits;
        let size = size_mb << 20;
        let l2_cover = cs * (cs / 8);
        let h = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: size.div_ceil(l2_cover) as u32,
            l1_table_offset: 3 * cs,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: compat,
            // Bit 1 (data_file_raw) only with a data file, which this header has not.
            autoclear_features: autoclear & !2,
            refcount_order: order,
            header_length: 112 + unknown.len() as u32,
            compression_type: 0,
            unknown_fields: unknown,
        };
        let bytes = h.encode().unwrap();
        prop_assert_eq!(bytes.len(), 112 + h.unknown_fields.len());
        prop_assert_eq!(Header::decode(&bytes).unwrap(), h.clone());
        // With it, QEMU refuses the image ("data-file-raw requires a data file").
        let raw = Header { autoclear_features: h.autoclear_features | 2, ..h };
        prop_assert!(matches!(
            Header::decode(&raw.encode().unwrap()),
            Err(dirty_bitmap::Corruption::DataFileRawWithoutDataFile)
        ));
    }
}

/// A hostile directory naming one table thousands of times, each time with another size
/// (`in_use` entries are exempt from the exact-size rule), must not have the walk read and
/// decode it once per name, as keying tables by offset and size would: time in names times
/// sizes, before every write (the preflight runs the walk). A table is read once, at its
/// largest size, however many names and sizes it has.
#[test]
fn the_walk_reads_a_table_once_however_many_sizes_name_it() {
    use dirty_bitmap::storage::{FaultPlan, FaultStorage, MemStorage};
    use dirty_bitmap::{BitmapStore, OpenMode, Recording};
    let reads_of_check = |names: u32| {
        let mut s = BitmapStore::create(MemStorage::new(), 64 << 30, 65536).unwrap();
        s.add("a", 65536, Recording::Disabled).unwrap();
        let mut bytes = s.image().storage().to_vec();
        drop(s);
        let cs = 65536usize;
        let area = HeaderArea::decode(&bytes[..cs]).unwrap();
        let geo = area.header.geometry().unwrap();
        let ext = area.bitmaps.unwrap();
        let dir = &bytes[ext.directory_offset as usize..][..ext.directory_size as usize];
        let a = decode_directory(dir, ext.nb_bitmaps, &geo)
            .unwrap()
            .remove(0);
        // `names` entries, every one in_use, naming a's table with sizes 2, 3, 4, ...
        let entries: Vec<DirEntry> = (0..names)
            .map(|k| DirEntry {
                name: format!("n{k}").as_str().into(),
                table_size: 2 + k,
                in_use: true,
                ..a.clone()
            })
            .collect();
        let dir = encode_directory(&entries, &geo).unwrap();
        let at = bytes.len().div_ceil(cs) * cs;
        bytes.resize(at + dir.len().div_ceil(cs) * cs, 0);
        bytes[at..at + dir.len()].copy_from_slice(&dir);
        let mut area = area;
        area.bitmaps = Some(BitmapsExtension {
            nb_bitmaps: names,
            directory_size: dir.len() as u64,
            directory_offset: at as u64,
        });
        let c0 = area.encode().unwrap();
        bytes[..c0.len()].copy_from_slice(&c0);
        let st = FaultStorage::new(MemStorage::from_bytes(bytes), FaultPlan::new());
        let s = BitmapStore::open(st, OpenMode::ReadOnly).unwrap();
        let before = s.image().storage().reads();
        let report = s.image().check().unwrap();
        (s.image().storage().reads() - before, report.corruptions)
    };
    let (few, c_few) = reads_of_check(8);
    let (many, c_many) = reads_of_check(200);
    assert_eq!(
        few, many,
        "reads grow with the names of one table ({c_few} and {c_many} corruptions)"
    );
}
