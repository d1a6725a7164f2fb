//! QEMU interop for the image layer and `BitmapStore`: images and bitmaps we write must be
//! accepted by `qemu-img check`/`info`, exported by `qemu-nbd` exactly, and bitmaps QEMU
//! writes must load to exactly what `nbdinfo` shows.
//!
//! These tests need qemu-img, qemu-io, qemu-nbd and nbdinfo on the PATH. A missing tool
//! fails the test with a message naming it; nothing is skipped.

mod common;

use std::path::Path;

use common::qemu::{assert_qemu_clean, nbd_dirty, ok, p, qemu_bitmaps, qemu_bitmaps_shared};
use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::{BitmapState, BitmapStore, DirtyBitmap, OpenMode, Recording};

const MIB: u64 = 1 << 20;

fn extents(bm: &DirtyBitmap) -> Vec<(u64, u64)> {
    bm.dirty_extents().collect()
}

fn open(img: &Path, mode: OpenMode) -> BitmapStore<FileStorage> {
    BitmapStore::open(FileStorage::open(img, mode).unwrap(), mode).unwrap()
}

#[test]
fn created_images_pass_qemu_check_and_info() {
    for cs in [512u64, 4096, 65536, 2 * MIB] {
        for disk in [4 * MIB, 1 << 30, 10 * (1 << 30) + 512] {
            let dir = tempfile::tempdir().unwrap();
            let img = dir.path().join("a.qcow2");
            let s = BitmapStore::create(FileStorage::create(&img).unwrap(), disk, cs).unwrap();
            s.close().unwrap();
            assert_qemu_clean(&img);
            let json = ok(
                "qemu-img",
                &["info", "-f", "qcow2", "--output=json", p(&img)],
            );
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(v["virtual-size"].as_u64(), Some(disk));
            assert_eq!(v["cluster-size"].as_u64(), Some(cs));
            // Our own check agrees.
            let s = open(&img, OpenMode::ReadOnly);
            assert!(s.image().check().unwrap().is_clean());
        }
    }
}

#[test]
fn our_bitmaps_match_qemu_info_and_nbd() {
    for (cs, g) in [
        (512u64, 512u64),
        (4096, 65536),
        (65536, 65536),
        (2 * MIB, 1 << 31),
        (65536, 512),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.qcow2");
        let disk = 64 * MIB + 512;
        let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), disk, cs).unwrap();
        s.add("marks", g, Recording::Enabled).unwrap();
        s.add("empty", 65536, Recording::Disabled).unwrap();
        let bm = DirtyBitmap::new(disk, g).unwrap();
        bm.mark_dirty(0, 1);
        bm.mark_dirty(3 * MIB + 7, 5000);
        bm.mark_dirty(40 * MIB, 9 * MIB);
        bm.mark_dirty(disk - 1, 1);
        s.store("marks", &bm).unwrap();
        s.close().unwrap();
        assert_qemu_clean(&img);
        let info = qemu_bitmaps(&img);
        assert_eq!(
            info,
            vec![
                ("marks".to_string(), g, vec!["auto".to_string()]),
                ("empty".to_string(), 65536, vec![]),
            ],
            "cs {cs} g {g}"
        );
        assert_eq!(nbd_dirty(&img, "marks"), extents(&bm), "cs {cs} g {g}");
        assert_eq!(nbd_dirty(&img, "empty"), vec![]);
    }
}

#[test]
fn activated_marks_survive_close_and_a_crash_shows_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), 256 * MIB, 65536).unwrap();
    s.add("live", 65536, Recording::Enabled).unwrap();
    s.activate().unwrap();
    // -U: our writable handle holds the image's locks.
    assert_eq!(qemu_bitmaps_shared(&img)[0].2, vec!["in-use", "auto"]);
    let live = s.bitmap("live").unwrap();
    live.mark_dirty(100 * MIB, 3 * MIB);
    s.close().unwrap();
    assert_qemu_clean(&img);
    assert_eq!(qemu_bitmaps(&img)[0].2, vec!["auto"]);
    assert_eq!(nbd_dirty(&img, "live"), vec![(100 * MIB, 3 * MIB)]);
    // Crash while active: in_use stays; QEMU and we both see it as inconsistent.
    let mut s = open(&img, OpenMode::ReadWrite);
    s.activate().unwrap();
    drop(s);
    assert_eq!(qemu_bitmaps(&img)[0].2, vec!["in-use", "auto"]);
    assert_qemu_clean(&img);
    let mut s = open(&img, OpenMode::ReadWrite);
    assert_eq!(s.list()[0].state, BitmapState::Inconsistent);
    s.remove("live").unwrap();
    drop(s);
    assert_qemu_clean(&img);
    assert!(qemu_bitmaps(&img).is_empty());
}

#[test]
fn qemu_made_bitmaps_load_to_what_nbd_shows() {
    let writes = [
        "write 0 512",
        "write 1M 4k",
        "write 5000000 70000",
        "write 63M 1M",
    ];
    for cs in [512u64, 4096, 65536, 2 * MIB] {
        for g in [512u64, 65536, 1 << 31] {
            let dir = tempfile::tempdir().unwrap();
            let img = dir.path().join("q.qcow2");
            ok(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("cluster_size={cs}"),
                    p(&img),
                    "64M",
                ],
            );
            ok(
                "qemu-img",
                &["bitmap", "--add", "-g", &g.to_string(), p(&img), "b"],
            );
            // A second recording bitmap at QEMU's default granularity: QEMU's writes land in
            // both, and each must read as QEMU exports it.
            ok("qemu-img", &["bitmap", "--add", p(&img), "second"]);
            let mut args = Vec::new();
            for w in writes {
                args.push("-c");
                args.push(w);
            }
            args.extend(["-f", "qcow2", p(&img)]);
            ok("qemu-io", &args);
            let s = open(&img, OpenMode::ReadOnly);
            let ours = extents(&s.load("b").unwrap());
            assert_eq!(ours, nbd_dirty(&img, "b"), "cs {cs} g {g}");
            assert!(!ours.is_empty());
            let second = extents(&s.load("second").unwrap());
            assert_eq!(second, nbd_dirty(&img, "second"), "cs {cs} g {g}");
            assert!(!second.is_empty());
            assert!(s.image().check().unwrap().is_clean());
        }
    }
}

#[test]
fn qemu_bitmap_commands_on_our_images() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let disk = 32 * MIB;
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), disk, 65536).unwrap();
    for (name, g) in [("a", 65536u64), ("b", 512), ("c", 1 << 20), ("d", 65536)] {
        s.add(name, g, Recording::Enabled).unwrap();
        let bm = DirtyBitmap::new(disk, g).unwrap();
        bm.mark_dirty(g * 3, 1);
        s.store(name, &bm).unwrap();
    }
    s.close().unwrap();
    ok("qemu-img", &["bitmap", "--remove", p(&img), "d"]);
    ok("qemu-img", &["bitmap", "--clear", p(&img), "a"]);
    ok("qemu-img", &["bitmap", "--disable", p(&img), "b"]);
    ok("qemu-img", &["bitmap", "--merge", "b", p(&img), "c"]);
    assert_qemu_clean(&img);
    let s = open(&img, OpenMode::ReadOnly);
    let l = s.list();
    assert_eq!(
        l.iter()
            .map(|b| b.name.to_str().unwrap())
            .collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert!(!l[1].enabled && l[0].enabled);
    assert_eq!(s.load("a").unwrap().count(), 0);
    assert_eq!(extents(&s.load("b").unwrap()), vec![(1536, 512)]);
    assert_eq!(
        extents(&s.load("c").unwrap()),
        vec![(0, MIB), (3 * MIB, MIB)]
    );
    assert!(s.image().check().unwrap().is_clean());
    // Our remove, then QEMU's check.
    drop(s);
    let mut s = open(&img, OpenMode::ReadWrite);
    s.remove("b").unwrap();
    s.remove("a").unwrap();
    s.close().unwrap();
    assert_qemu_clean(&img);
    assert_eq!(qemu_bitmaps(&img).len(), 1);
}

#[test]
fn merge_across_images_like_qemu_img_merge_b() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    let dst = dir.path().join("dst.qcow2");
    let ours = dir.path().join("ours.qcow2");
    for (img, g) in [(&src, 512u64), (&dst, 65536), (&ours, 65536)] {
        ok("qemu-img", &["create", "-q", "-f", "qcow2", p(img), "16M"]);
        ok(
            "qemu-img",
            &["bitmap", "--add", "-g", &g.to_string(), p(img), "b"],
        );
    }
    ok(
        "qemu-io",
        &[
            "-c",
            "write 1M 512",
            "-c",
            "write 7M 100k",
            "-f",
            "qcow2",
            p(&src),
        ],
    );
    ok(
        "qemu-img",
        &[
            "bitmap",
            "--merge",
            "b",
            "-b",
            p(&src),
            "-F",
            "qcow2",
            p(&dst),
            "b",
        ],
    );
    let s = open(&src, OpenMode::ReadOnly);
    let mut o = open(&ours, OpenMode::ReadWrite);
    o.merge_from(&s, "b", "b").unwrap();
    o.close().unwrap();
    assert_qemu_clean(&ours);
    assert_eq!(nbd_dirty(&ours, "b"), nbd_dirty(&dst, "b"));
}

#[test]
fn every_image_qemu_img_create_makes_opens_and_takes_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&base), "16M"],
    );
    let data = dir.path().join("data.raw");
    let variants: Vec<Vec<String>> = vec![
        vec!["-o".into(), "refcount_bits=1".into()],
        vec!["-o".into(), "refcount_bits=2".into()],
        vec!["-o".into(), "refcount_bits=4".into()],
        vec!["-o".into(), "refcount_bits=8".into()],
        vec!["-o".into(), "refcount_bits=32".into()],
        vec!["-o".into(), "refcount_bits=64,cluster_size=512".into()],
        vec!["-o".into(), "cluster_size=2M".into()],
        vec!["-o".into(), "compression_type=zstd".into()],
        vec!["-o".into(), "extended_l2=on".into()],
        vec!["-o".into(), "lazy_refcounts=on".into()],
        vec!["-b".into(), p(&base).into(), "-F".into(), "qcow2".into()],
        vec!["-o".into(), format!("data_file={}", p(&data))],
    ];
    for (i, v) in variants.iter().enumerate() {
        let img = dir.path().join(format!("v{i}.qcow2"));
        let mut args: Vec<&str> = vec!["create", "-q", "-f", "qcow2"];
        args.extend(v.iter().map(String::as_str));
        args.extend([p(&img), "16M"]);
        ok("qemu-img", &args);
        ok(
            "qemu-io",
            &[
                "-c",
                "write 0 64k",
                "-c",
                "write 9M 1M",
                "-f",
                "qcow2",
                p(&img),
            ],
        );
        {
            let mut s = open(&img, OpenMode::ReadWrite);
            assert!(s.image().check().unwrap().is_clean(), "{v:?}");
            s.add("ours", 65536, Recording::Enabled).unwrap();
            let bm = DirtyBitmap::new(16 * MIB, 65536).unwrap();
            bm.mark_dirty(2 * MIB, 1);
            s.store("ours", &bm).unwrap();
            s.close().unwrap();
        }
        assert_qemu_clean(&img);
        assert_eq!(qemu_bitmaps(&img)[0].0, "ours", "{v:?}");
        assert_eq!(nbd_dirty(&img, "ours"), vec![(2 * MIB, 65536)], "{v:?}");
        // Guest data untouched: qemu-io wrote its default pattern 0xcd, and what lies
        // between reads as zeros (qemu-io exits 1 on a pattern mismatch).
        ok(
            "qemu-io",
            &[
                "-r",
                "-c",
                "read -P 0xcd 0 64k",
                "-c",
                "read -P 0 64k 9152k",
                "-c",
                "read -P 0xcd 9M 1M",
                "-c",
                "read -P 0 10M 6M",
                "-f",
                "qcow2",
                p(&img),
            ],
        );
        let s = open(&img, OpenMode::ReadOnly);
        assert!(s.image().check().unwrap().is_clean(), "{v:?}");
    }
}

#[test]
fn reftable_growth_is_accepted_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("g.qcow2");
    // 512-byte clusters and 64-bit refcounts: a block covers 64 clusters and the first
    // reftable (one cluster, 64 blocks) 4096 clusters (2 MiB). Eight fully dirty bitmaps
    // at 512 B granularity take 512 data clusters and 8 table clusters each, so the
    // reftable must grow (checked in the header below).
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=64",
            p(&img),
            "1G",
        ],
    );
    // The reftable's offset and its length in clusters (header bytes 48 to 60).
    let reftable = |img: &std::path::Path| {
        let h = std::fs::read(img).unwrap();
        (
            u64::from_be_bytes(h[48..56].try_into().unwrap()),
            u32::from_be_bytes(h[56..60].try_into().unwrap()),
        )
    };
    let before = reftable(&img);
    assert_eq!(before.1, 1, "qemu-img made a reftable of one cluster");
    let disk = 1u64 << 30;
    let mut s = open(&img, OpenMode::ReadWrite);
    let bm = DirtyBitmap::new(disk, 512).unwrap();
    bm.mark_dirty(0, disk);
    for i in 0..8 {
        s.add(&format!("full{i}"), 512, Recording::Enabled).unwrap();
        s.store(format!("full{i}"), &bm).unwrap();
    }
    s.close().unwrap();
    let after = reftable(&img);
    assert!(
        after.1 > before.1 && after.0 != before.0,
        "the reftable did not grow: {before:?} then {after:?}"
    );
    assert_qemu_clean(&img);
    assert_eq!(nbd_dirty(&img, "full3"), vec![(0, disk)]);
    assert_eq!(nbd_dirty(&img, "full7"), vec![(0, disk)]);
    let s = open(&img, OpenMode::ReadOnly);
    assert!(s.image().check().unwrap().is_clean());
}

#[test]
fn unknown_extension_and_header_fields_survive() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("u.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "16M"]);
    // Insert an unknown extension before the end marker at 0x70 + 8 + 384.
    let mut bytes = std::fs::read(&img).unwrap();
    let end = 0x70 + 8 + 384;
    assert_eq!(&bytes[end..end + 8], &[0; 8]);
    bytes[end..end + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    bytes[end + 4..end + 8].copy_from_slice(&5u32.to_be_bytes());
    bytes[end + 8..end + 13].copy_from_slice(b"hello");
    std::fs::write(&img, &bytes).unwrap();
    let mut s = open(&img, OpenMode::ReadWrite);
    s.add("b", 65536, Recording::Enabled).unwrap();
    s.close().unwrap();
    let after = std::fs::read(&img).unwrap();
    let pos = after
        .windows(4)
        .position(|w| w == 0x1234_5678u32.to_be_bytes())
        .expect("extension kept");
    assert_eq!(&after[pos + 8..pos + 13], b"hello");
    assert_qemu_clean(&img);
}

#[test]
fn sixteen_tib_image_with_four_bitmaps_round_trips_both_ways() {
    const TIB: u64 = 1 << 40;
    let disk = 16 * TIB;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.qcow2");
    let names = ["b64k", "b64k-2", "b1m", "b2g"];
    let grans = [64 << 10, 64 << 10, MIB, 2 << 30];

    // We write: four bitmaps with scattered extents, including the disk's last byte.
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), disk, 65536).unwrap();
    let mut ours = Vec::new();
    for (i, (&name, &g)) in names.iter().zip(grans.iter()).enumerate() {
        s.add(name, g, Recording::Enabled).unwrap();
        let bm = DirtyBitmap::new(disk, g).unwrap();
        for k in 0..64u64 {
            let off = k.wrapping_mul(0x9E37_79B9_7F4A_7C15u64.rotate_left(i as u32)) % disk;
            bm.mark_dirty(off, 4096 + k * 100_000);
        }
        bm.mark_dirty(disk - 1, 1);
        s.store(name, &bm).unwrap();
        ours.push(extents(&bm));
    }
    s.close().unwrap();
    assert_qemu_clean(&img);
    let listed = qemu_bitmaps(&img);
    assert_eq!(listed.len(), 4, "{listed:?}");
    for (i, &name) in names.iter().enumerate() {
        assert_eq!(
            nbd_dirty(&img, name),
            ours[i],
            "bitmap {name} as qemu-nbd exports it"
        );
    }

    // QEMU writes on top: its enabled bitmaps track the writes, and our reader sees them.
    let writes = [
        (0u64, 4096u64),
        (8 * TIB + 12_345, 70_000),
        (disk - 4096, 4096),
    ];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l)| format!("write {o} {l}"))
        .collect();
    let mut args = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(p(&img));
    ok("qemu-io", &args);
    assert_qemu_clean(&img);
    let s = open(&img, OpenMode::ReadOnly);
    for (i, (&name, &g)) in names.iter().zip(grans.iter()).enumerate() {
        let loaded = s.load(name).unwrap();
        let expect = DirtyBitmap::new(disk, g).unwrap();
        for &(o, l) in &ours[i] {
            expect.mark_dirty(o, l);
        }
        for &(o, l) in &writes {
            expect.mark_dirty(o, l);
        }
        assert_eq!(
            extents(&loaded),
            extents(&expect),
            "bitmap {name} after qemu-io"
        );
        assert_eq!(
            nbd_dirty(&img, name),
            extents(&loaded),
            "bitmap {name}: qemu-nbd vs us"
        );
    }
}

/// `(virtual size, l1_size)` of an image, and per bitmap `(name, table_size)`, read with our
/// reader (QEMU's own images included).
fn geometry_of(img: &Path) -> (u64, u32, Vec<(String, u32)>) {
    let s = open(img, OpenMode::ReadOnly);
    let h = s.image().header();
    (
        h.size,
        h.l1_size,
        s.list()
            .into_iter()
            .map(|b| (b.name.to_string(), b.table_size))
            .collect(),
    )
}

/// Our `resize` against `qemu-img resize` on copies of the same image: same virtual size,
/// L1 size, bitmaps (name, granularity, flags), table sizes, and the same dirty extents as
/// `qemu-nbd` exports them below the old size; both pass `qemu-img check` without leaks.
/// Shrinking drops the bits past the new end but keeps the granule that straddles it.
/// Growing, QEMU leaves the new area clean and ours is dirty there (an older backup may
/// hold data the disk lost in an earlier shrink), from the granule straddling the old end
/// on: QEMU's bits and the grown area, nothing more.
#[test]
fn resize_matches_qemu_img_resize() {
    for cs in [512u64, 65536] {
        let old = 4 * MIB + 512;
        for new in [9 * MIB + 1536, 600 * MIB, 3 * MIB + 512, 4 * MIB, old] {
            let dir = tempfile::tempdir().unwrap();
            let base = dir.path().join("base.qcow2");
            let mut s = BitmapStore::create(FileStorage::create(&base).unwrap(), old, cs).unwrap();
            s.add("fine", 512, Recording::Enabled).unwrap();
            s.add("coarse", 65536, Recording::Disabled).unwrap();
            s.add("empty", 4096, Recording::Enabled).unwrap();
            for (name, g) in [("fine", 512u64), ("coarse", 65536)] {
                let bm = DirtyBitmap::new(old, g).unwrap();
                bm.mark_dirty(0, 1);
                bm.mark_dirty(MIB + 100, 3000);
                bm.mark_dirty(3 * MIB - 700, 1400); // straddles the 3 MiB + 512 shrink
                bm.mark_dirty(3 * MIB + 256, 300); // straddles 3 MiB + 512 itself
                bm.mark_dirty(old - 1, 1); // the last granule, partial at 64 KiB
                s.store(name, &bm).unwrap();
            }
            s.close().unwrap();
            let ours = dir.path().join("ours.qcow2");
            let theirs = dir.path().join("theirs.qcow2");
            std::fs::copy(&base, &ours).unwrap();
            std::fs::copy(&base, &theirs).unwrap();
            let size = new.to_string();
            if new < old {
                ok(
                    "qemu-img",
                    &["resize", "-f", "qcow2", "--shrink", p(&theirs), &size],
                );
            } else {
                ok("qemu-img", &["resize", "-f", "qcow2", p(&theirs), &size]);
            }
            let mut s = open(&ours, OpenMode::ReadWrite);
            s.resize(new).unwrap();
            drop(s);
            let ctx = format!("cs {cs}: {old} -> {new}");
            assert_qemu_clean(&ours);
            assert_qemu_clean(&theirs);
            assert_eq!(geometry_of(&ours), geometry_of(&theirs), "{ctx}");
            assert_eq!(geometry_of(&ours).0, new, "{ctx}");
            assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&theirs), "{ctx}");
            for (name, g) in [("fine", 512u64), ("coarse", 65536), ("empty", 4096)] {
                let mine = nbd_dirty(&ours, name);
                // QEMU's: the old bits clipped to the new size, nothing beyond.
                let clipped = DirtyBitmap::new(new, g).unwrap();
                for (off, len) in open(&base, OpenMode::ReadOnly)
                    .load(name)
                    .unwrap()
                    .dirty_extents()
                {
                    if off < new {
                        clipped.mark_dirty(off, len.min(new - off));
                    }
                }
                assert_eq!(nbd_dirty(&theirs, name), extents(&clipped), "{ctx} {name}");
                // Ours: those, and every granule of the grown area.
                if new > old {
                    clipped.mark_dirty(old, new - old);
                }
                assert_eq!(mine, extents(&clipped), "{ctx} {name}");
                assert_eq!(
                    extents(&open(&ours, OpenMode::ReadOnly).load(name).unwrap()),
                    mine
                );
            }
            // QEMU takes the resized image on: a write through qemu-io marks the enabled
            // bitmap, and the image stays clean.
            ok(
                "qemu-io",
                &["-f", "qcow2", "-c", "write 4096 512", p(&ours)],
            );
            assert_qemu_clean(&ours);
            assert!(nbd_dirty(&ours, "fine")
                .iter()
                .any(|&(o, l)| o <= 4096 && 4096 < o + l));
        }
    }
}

/// A v3 header longer than the 64 KiB the open reads first (unknown header fields, up to
/// the cluster size): QEMU opens it and keeps the fields, so must we, and a bitmap added
/// here keeps them too and is one QEMU lists.
#[test]
fn a_header_longer_than_64_kib_opens_and_keeps_its_unknown_fields() {
    const CS: usize = 2 << 20;
    const HL: usize = 70_000;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("long.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            p(&img),
            "64M",
        ],
    );
    let mut bytes = std::fs::read(&img).unwrap();
    let hl = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    assert_eq!(hl, 112);
    let tail = bytes[hl..CS].to_vec();
    assert!(
        tail[CS - HL..].iter().all(|&b| b == 0),
        "cluster 0 has room"
    );
    bytes[100..104].copy_from_slice(&(HL as u32).to_be_bytes());
    bytes[hl..HL].fill(0xab);
    bytes[HL..CS].copy_from_slice(&tail[..CS - HL]);
    std::fs::write(&img, &bytes).unwrap();
    assert_qemu_clean(&img);
    let mut s = open(&img, OpenMode::ReadWrite);
    s.add("b", 65536, Recording::Enabled).unwrap();
    drop(s);
    assert_qemu_clean(&img);
    let after = std::fs::read(&img).unwrap();
    assert_eq!(
        u32::from_be_bytes(after[100..104].try_into().unwrap()) as usize,
        HL,
        "the header length"
    );
    assert!(
        after[hl..HL].iter().all(|&b| b == 0xab),
        "the unknown header fields"
    );
    assert_eq!(qemu_bitmaps(&img).len(), 1, "QEMU lists the bitmap");
}

/// Growing an overlay whose backing file reaches past its end would show the backing
/// file's data in the grown area while every bitmap calls it clean; `qemu-img resize`
/// zero-fills it instead (shown here on a copy). We refuse it, writing nothing; shrinking
/// still works.
#[test]
fn growing_an_image_with_a_backing_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let img = dir.path().join("top.qcow2");
    ok("qemu-img", &["create", "-f", "raw", p(&base), "2M"]);
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xab 1M 1M", p(&base)],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "raw",
            p(&img),
            "1M",
        ],
    );
    let theirs = dir.path().join("theirs.qcow2");
    std::fs::copy(&img, &theirs).unwrap();
    ok("qemu-img", &["resize", "-f", "qcow2", p(&theirs), "2M"]);
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0 1M 1M", p(&theirs)],
    );
    let mut s = open(&img, OpenMode::ReadWrite);
    s.add("b", 65536, Recording::Enabled).unwrap();
    let before = std::fs::read(&img).unwrap();
    let e = s.resize(2 * MIB).unwrap_err();
    assert!(matches!(e, dirty_bitmap::Error::Unsupported(_)), "{e}");
    assert!(std::fs::read(&img).unwrap() == before, "the refusal wrote");
    s.resize(MIB / 2).expect("shrinking an overlay");
    drop(s);
    assert_qemu_clean(&img);
}

/// Resize refuses what QEMU refuses (an inconsistent bitmap, a size that is not a multiple
/// of 512), what it cannot do safely (an active store, bitmaps parked for activate), and
/// images with guest data; each refusal writes nothing.
#[test]
fn resize_refusals_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), 8 * MIB, 65536).unwrap();
    s.add("b", 65536, Recording::Enabled).unwrap();
    let before = std::fs::read(&img).unwrap();
    let unchanged = |why: &str| assert!(std::fs::read(&img).unwrap() == before, "{why} wrote");
    let e = s.resize(8 * MIB + 100).unwrap_err();
    assert!(matches!(e, dirty_bitmap::Error::InvalidInput(_)), "{e}");
    unchanged("an unaligned size");
    s.activate().unwrap();
    let active = std::fs::read(&img).unwrap();
    let e = s.resize(16 * MIB).unwrap_err();
    assert!(
        matches!(
            e,
            dirty_bitmap::Error::WrongState(dirty_bitmap::error::StateProblem::Active)
        ),
        "{e}"
    );
    assert!(
        std::fs::read(&img).unwrap() == active,
        "active resize wrote"
    );
    s.inactivate().unwrap();
    let parked = std::fs::read(&img).unwrap();
    let e = s.resize(16 * MIB).unwrap_err();
    assert!(
        matches!(
            e,
            dirty_bitmap::Error::WrongState(dirty_bitmap::error::StateProblem::ParkedBitmaps)
        ),
        "{e}"
    );
    assert!(
        std::fs::read(&img).unwrap() == parked,
        "parked resize wrote"
    );
    drop(s);

    // An inconsistent bitmap: QEMU refuses, and so do we.
    let mut s = open(&img, OpenMode::ReadWrite);
    s.activate().unwrap();
    drop(s); // a crash while active: `in_use` stays set
    let crashed = std::fs::read(&img).unwrap();
    let out = common::qemu::run("qemu-img", &["resize", "-f", "qcow2", p(&img), "16M"]);
    assert!(
        !out.status.success(),
        "qemu-img resized an inconsistent bitmap"
    );
    let mut s = open(&img, OpenMode::ReadWrite);
    let e = s.resize(16 * MIB).unwrap_err();
    assert!(
        matches!(e, dirty_bitmap::Error::Inconsistent { ref name } if name == "b"),
        "{e}"
    );
    assert!(
        std::fs::read(&img).unwrap() == crashed,
        "inconsistent resize wrote"
    );
    // Removing it makes the resize possible.
    s.remove("b").unwrap();
    s.resize(16 * MIB).unwrap();
    drop(s);
    assert_qemu_clean(&img);

    // Guest data: not a bitmap-only image.
    let data = dir.path().join("data.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", p(&data), "8M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write 0 64k", p(&data)]);
    let before = std::fs::read(&data).unwrap();
    let e = open(&data, OpenMode::ReadWrite)
        .resize(16 * MIB)
        .unwrap_err();
    assert!(matches!(e, dirty_bitmap::Error::Unsupported(_)), "{e}");
    assert!(
        std::fs::read(&data).unwrap() == before,
        "guest-data resize wrote"
    );
}

/// The mode extension (`src/format/mode.rs`, "DBMD") as QEMU sees it: `qemu-img check` and
/// `info` accept an image that has it, and every command that makes QEMU rewrite cluster 0
/// (`qcow2_update_header`: bitmap add and remove, resize, amend, snapshot, a `qemu-io`
/// write that loads and stores the bitmaps) keeps its 16 bytes as they were, which is what
/// `qcow2_read_extensions` (an unknown type goes to `unknown_header_ext`) and
/// `qcow2_update_header` ("Keep unknown header extensions") promise. `qemu-img convert`
/// writes a new image and does not copy it. Our deferred activation then removes it, and
/// QEMU is still content.
#[test]
fn qemu_accepts_the_mode_extension_and_keeps_it_when_it_rewrites_the_header() {
    use dirty_bitmap::format::{HeaderArea, ModeExtension};
    use dirty_bitmap::{SharedStore, StoreMode};

    const FRAME: &[u8; 16] = b"DBMD\0\0\0\x08\0\0\0\0\0\0\0\x01";
    let cs = 65536usize;
    let find = |img: &Path| {
        let bytes = std::fs::read(img).unwrap();
        bytes[..cs].windows(16).position(|w| w == FRAME)
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("durable.qcow2");
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), 256 * MIB, 65536).unwrap();
    s.add("a", 65536, Recording::Enabled).unwrap();
    s.activate_durable().unwrap();
    let shared = SharedStore::new(s);
    let t = shared.durable_tracker().unwrap();
    t.mark(5 * MIB, 4096).unwrap();
    drop(t);
    drop(shared.try_into_inner().unwrap().close().unwrap());
    // Where docs/FORMAT.md says: after the bitmaps extension at 0x1F8, where the end
    // marker was.
    assert_eq!(find(&img), Some(0x218));
    assert_qemu_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![("a".to_string(), 65536, vec!["auto".to_string()])]
    );
    let original = std::fs::read(&img).unwrap()[..cs].to_vec();

    let copy = dir.path().join("copy.qcow2");
    let c = p(&copy);
    let rewrites: [(&str, Vec<&str>); 6] = [
        (
            "bitmap --add",
            vec!["qemu-img", "bitmap", "-f", "qcow2", "--add", c, "b"],
        ),
        (
            "bitmap --remove",
            vec!["qemu-img", "bitmap", "-f", "qcow2", "--remove", c, "a"],
        ),
        (
            "resize",
            vec!["qemu-img", "resize", "-f", "qcow2", c, "300M"],
        ),
        (
            "amend",
            vec![
                "qemu-img",
                "amend",
                "-f",
                "qcow2",
                "-o",
                "lazy_refcounts=on",
                c,
            ],
        ),
        ("snapshot -c", vec!["qemu-img", "snapshot", "-c", "s1", c]),
        (
            "qemu-io write",
            vec!["qemu-io", "-f", "qcow2", "-c", "write 1M 4k", c],
        ),
    ];
    for (what, args) in rewrites {
        std::fs::copy(&img, &copy).unwrap();
        ok(args[0], &args[1..]);
        let now = std::fs::read(&copy).unwrap();
        assert_ne!(
            now[..cs],
            original[..],
            "{what}: QEMU did not rewrite cluster 0"
        );
        assert!(find(&copy).is_some(), "{what}: QEMU dropped the extension");
        let area = HeaderArea::decode(&now[..cs]).unwrap();
        assert_eq!(area.mode, Some(ModeExtension::DURABLE), "{what}");
        assert_qemu_clean(&copy);
        assert_eq!(
            open(&copy, OpenMode::ReadOnly).mode(),
            StoreMode::Durable,
            "{what}"
        );
    }
    // The last copy, after QEMU's write: our deferred activation removes the extension.
    let mut s = open(&copy, OpenMode::ReadWrite);
    s.activate().unwrap();
    assert_eq!(s.mode(), StoreMode::Deferred);
    drop(s.close().unwrap());
    assert_eq!(find(&copy), None);
    assert_qemu_clean(&copy);
    assert_eq!(qemu_bitmaps(&copy)[0].2, vec!["auto"]);
    assert_eq!(nbd_dirty(&copy, "a"), vec![(MIB, 65536), (5 * MIB, 65536)]);
    // A new image is not a rewrite: convert does not copy an extension it does not know.
    let converted = dir.path().join("converted.qcow2");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            "--bitmaps",
            p(&img),
            p(&converted),
        ],
    );
    assert_eq!(find(&converted), None);
    assert_eq!(
        open(&converted, OpenMode::ReadOnly).mode(),
        StoreMode::Deferred
    );
}

/// A 1 MiB image QEMU made: 64 KiB of guest data at 0, a snapshot of it if `snapshot`,
/// and bitmap b0.
fn qemu_image_with_data(dir: &Path, snapshot: bool) -> std::path::PathBuf {
    let img = dir.join("d.qcow2");
    let i = p(&img);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", i, "1M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 0 64k", i]);
    if snapshot {
        ok("qemu-img", &["snapshot", "-c", "s1", i]);
    }
    ok("qemu-img", &["bitmap", "--add", i, "b0"]);
    img
}

/// Found while checking a review's finding: QEMU writes a snapshot table entry's fields and
/// not the padding to 8 after it, so a table at the end of the file ends with its last
/// entry's name, short of the padding. Our check called that "snapshot table past end of
/// file" (exit 2) where `qemu-img check` finds no error, and so every writing operation
/// refused an image whose last change was `qemu-img snapshot -c`. Both now agree it is
/// clean, and a bitmap is added.
#[test]
fn a_snapshot_table_at_the_end_of_the_file_is_clean_as_qemu_says() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    let i = p(&img);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", i, "1M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 0 64k", i]);
    ok("qemu-img", &["snapshot", "-c", "s1", i]);
    let area =
        dirty_bitmap::format::HeaderArea::decode(&std::fs::read(&img).unwrap()[..65536]).unwrap();
    let len = std::fs::metadata(&img).unwrap().len();
    assert!(
        area.header.snapshots_offset < len && !len.is_multiple_of(8),
        "the table ends the file short of its padding: {len}"
    );
    assert_qemu_clean(&img);
    let mut s = open(&img, OpenMode::ReadWrite);
    let report = s.image().check().unwrap();
    assert!(report.is_clean(), "{:?}", report.messages);
    s.add("b", 65536, Recording::Enabled).unwrap();
    drop(s.close().unwrap());
    assert_qemu_clean(&img);
    assert_eq!(qemu_bitmaps(&img)[0].0, "b");
}

/// `qemu-img check` counts as corruption a snapshot in an image with an external data file,
/// a compressed L2 entry with the copied flag, one in an image with a data file (then not
/// counted), and one in an extended L2 table with a non-zero subcluster bitmap (not
/// counted); our walk follows the same rules, as without them it would call such images
/// clean or leaky, and a preflight would let writes through. Each case is made from an
/// image QEMU wrote, with one field changed, and both checks must report the same error.
#[test]
fn the_data_file_and_compressed_entry_rules_agree_with_qemu_img_check() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("d.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&raw), "1M"]);
    let data_file_opts = |img: &Path| {
        format!(
            "driver=qcow2,file.filename={},data-file.driver=file,data-file.filename={}",
            p(img),
            p(&raw)
        )
    };
    // The byte offset of L2 entry 0 of guest cluster 0.
    let l2_entry_0 = |bytes: &[u8]| {
        let area = dirty_bitmap::format::HeaderArea::decode(&bytes[..65536]).unwrap();
        let l1 = area.header.l1_table_offset as usize;
        let l2 = u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
        assert_ne!(l2, 0, "guest cluster 0 has an L2 table");
        l2 as usize
    };
    let set_bits = |img: &Path, at: &dyn Fn(&[u8]) -> usize, bits: u64| {
        let mut b = std::fs::read(img).unwrap();
        let i = at(&b);
        let v = u64::from_be_bytes(b[i..i + 8].try_into().unwrap()) | bits;
        b[i..i + 8].copy_from_slice(&v.to_be_bytes());
        std::fs::write(img, &b).unwrap();
    };
    let cases: [(&str, &str, bool); 7] = [
        ("snapshot", "snapshots in image with data file", true),
        ("data file", "with data file, entry=", true),
        (
            "unaligned with data file",
            "Data cluster is not properly aligned",
            true,
        ),
        (
            "incomplete snapshot",
            "snapshot table entry 0 is incomplete",
            false,
        ),
        (
            "unaligned under a snapshot",
            "Data cluster is not properly aligned",
            false,
        ),
        (
            "copied",
            "copied flag must never be set for compressed clusters",
            false,
        ),
        (
            "extended",
            "with non-zero subcluster allocation bitmap",
            false,
        ),
    ];
    for (case, message, with_data_file) in cases {
        let img = dir.path().join(format!("{}.qcow2", case.replace(' ', "-")));
        let i = p(&img);
        match case {
            "snapshot" => {
                ok("qemu-img", &["create", "-q", "-f", "qcow2", i, "1M"]);
                ok("qemu-io", &["-f", "qcow2", "-c", "write 0 64k", i]);
                ok("qemu-img", &["snapshot", "-c", "s1", i]);
                // The external data file feature (incompatible bit 2).
                set_bits(&img, &|_| 72, 4);
            }
            "data file" => {
                let o = format!("data_file={}", p(&raw));
                ok(
                    "qemu-img",
                    &["create", "-q", "-f", "qcow2", "-o", &o, i, "1M"],
                );
                ok("qemu-io", &["-f", "qcow2", "-c", "write 0 64k", i]);
                set_bits(&img, &l2_entry_0, 1 << 62);
            }
            "unaligned with data file" => {
                let o = format!("data_file={}", p(&raw));
                ok(
                    "qemu-img",
                    &["create", "-q", "-f", "qcow2", "-o", &o, i, "1M"],
                );
                ok("qemu-io", &["-f", "qcow2", "-c", "write 0 64k", i]);
                set_bits(&img, &l2_entry_0, 0x200);
            }
            "unaligned under a snapshot" => {
                // The L2 table is named by the active L1 and the snapshot's: QEMU walks it,
                // and counts the entry, once for each.
                ok("qemu-img", &["create", "-q", "-f", "qcow2", i, "1M"]);
                ok("qemu-io", &["-f", "qcow2", "-c", "write 0 64k", i]);
                ok("qemu-img", &["snapshot", "-c", "s1", i]);
                set_bits(&img, &l2_entry_0, 0x200);
            }
            "incomplete snapshot" => {
                ok("qemu-img", &["create", "-q", "-f", "qcow2", i, "1M"]);
                ok("qemu-io", &["-f", "qcow2", "-c", "write 0 64k", i]);
                ok("qemu-img", &["snapshot", "-c", "s1", i]);
                // The entry's extra data size (bytes 36..40): 8 of its 24 bytes, the rest
                // of the entry (its id and name) moved up behind them.
                let mut b = std::fs::read(&img).unwrap();
                let at = u64::from_be_bytes(b[64..72].try_into().unwrap()) as usize;
                let be16 = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]) as usize;
                let extra = u32::from_be_bytes(b[at + 36..at + 40].try_into().unwrap()) as usize;
                let names = be16(&b, at + 12) + be16(&b, at + 14);
                let tail = b[at + 40 + extra..at + 40 + extra + names].to_vec();
                b[at + 36..at + 40].copy_from_slice(&8u32.to_be_bytes());
                b[at + 48..at + 48 + names].copy_from_slice(&tail);
                std::fs::write(&img, &b).unwrap();
            }
            "copied" => {
                ok("qemu-img", &["create", "-q", "-f", "qcow2", i, "1M"]);
                ok("qemu-io", &["-f", "qcow2", "-c", "write -c -P 7 0 64k", i]);
                set_bits(&img, &l2_entry_0, 1 << 63);
            }
            _ => {
                let o = "extended_l2=on";
                ok(
                    "qemu-img",
                    &["create", "-q", "-f", "qcow2", "-o", o, i, "1M"],
                );
                ok("qemu-io", &["-f", "qcow2", "-c", "write -c -P 7 0 64k", i]);
                set_bits(&img, &|b| l2_entry_0(b) + 8, 1);
            }
        }
        // `qemu-img check` of this image (with its data file named), as text or JSON.
        let opts = data_file_opts(&img);
        let target = if with_data_file {
            vec!["--image-opts", opts.as_str()]
        } else {
            vec![i]
        };
        let qemu_check = |json: bool| {
            let mut args = vec!["check"];
            if json {
                args.push("--output=json");
            }
            args.extend(&target);
            common::qemu::run("qemu-img", &args)
        };
        let qemu = qemu_check(false);
        let said = String::from_utf8_lossy(&qemu.stderr).to_string();
        assert_eq!(qemu.status.code(), Some(2), "{case}: {qemu:?}");
        assert!(said.contains(message), "{case}: QEMU says {said}");
        let report = open(&img, OpenMode::ReadOnly).image().check().unwrap();
        assert!(
            report.exit_code() == 2 && report.messages.iter().any(|m| m.contains(message)),
            "{case}: QEMU says {said}; ours: {:?}",
            report.messages
        );
        // The corruptions counted: QEMU prints a line per count, where a rule broken by a
        // table that several L1 tables name is one line here, counted once per name.
        let v: serde_json::Value = serde_json::from_slice(&qemu_check(true).stdout).unwrap();
        assert_eq!(
            v["corruptions"].as_u64(),
            Some(report.corruptions),
            "{case}: QEMU says {said}; ours: {:?}",
            report.messages
        );
        // The allocation figures leave out what the checks skip, as QEMU's do.
        assert_eq!(
            (
                v["allocated-clusters"].as_u64().unwrap_or(0),
                v["compressed-clusters"].as_u64().unwrap_or(0),
                v["fragmented-clusters"].as_u64().unwrap_or(0)
            ),
            (
                report.frag.allocated,
                report.frag.compressed,
                report.frag.fragmented
            ),
            "{case}: {v}"
        );
    }
}

/// QEMU's `next_contiguous_offset` is local to `check_refcounts_l2`, so the first allocated
/// cluster of each L2 table never counts as fragmented; ours restarts at each table too, as
/// running across the tables would count one more fragmented cluster at each jump between
/// them. Images whose data lies in several L2 tables, out of order in the file: our figures
/// must equal `qemu-img check --output=json`'s.
#[test]
fn the_fragmentation_figure_restarts_at_each_l2_table_as_qemus_does() {
    let dir = tempfile::tempdir().unwrap();
    // (options, size, writes in order): each write's cluster lands after the last one
    // written, so a table whose guest range comes first holds clusters placed later.
    let cases: [(&str, &str, &[&str]); 3] = [
        (
            "cluster_size=65536",
            "2G",
            &["write 1100M 64k", "write 600M 128k", "write 0 64k"],
        ),
        (
            "compat=0.10,cluster_size=4096",
            "64M",
            &["write 5M 8k", "write 3M 4k", "write 0 4k", "write 2M 12k"],
        ),
        (
            "cluster_size=4096",
            "64M",
            &["write -c 4M 8k", "write 0 8k", "write 2M 4k"],
        ),
    ];
    for (opts, size, writes) in cases {
        let img = dir.path().join("frag.qcow2");
        let i = p(&img);
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, i, size],
        );
        for w in writes {
            ok("qemu-io", &["-f", "qcow2", "-c", w, i]);
        }
        let out = common::qemu::run("qemu-img", &["check", "--output=json", i]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let report = open(&img, OpenMode::ReadOnly).image().check().unwrap();
        let theirs = (
            v["allocated-clusters"].as_u64().unwrap_or(0),
            v["fragmented-clusters"].as_u64().unwrap_or(0),
            v["compressed-clusters"].as_u64().unwrap_or(0),
        );
        assert_eq!(
            (
                report.frag.allocated,
                report.frag.fragmented,
                report.frag.compressed
            ),
            theirs,
            "{opts}: {v}"
        );
        assert!(theirs.0 >= 3, "{opts}: {v}");
    }
}

/// QEMU reads the reftable at open without judging it, so it opens an image whose reftable
/// entry has a reserved bit set, lists its bitmaps and reads them; only `qemu-img check`
/// reports it. A read-only open here goes ahead without the refcounts (refused in every
/// mode, `dbm info` would fail and `dbm check` exit 1 with no report), and the check
/// reports what QEMU reports (the entry, and its block as leaked); a writable open still
/// refuses before any write.
#[test]
fn a_reftable_entry_with_reserved_bits_reads_as_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.qcow2");
    let i = p(&img);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", i, "64M"]);
    ok("qemu-img", &["bitmap", "--add", i, "b0"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write 0 64k", i]);
    let mut bytes = std::fs::read(&img).unwrap();
    let area = dirty_bitmap::format::HeaderArea::decode(&bytes[..65536]).unwrap();
    let rt = area.header.refcount_table_offset as usize;
    let e = u64::from_be_bytes(bytes[rt..rt + 8].try_into().unwrap());
    bytes[rt..rt + 8].copy_from_slice(&(e | 1).to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    // QEMU opens it and lists the bitmap (with the write's granule dirty); so do we.
    ok("qemu-img", &["info", i]);
    assert_eq!(qemu_bitmaps(&img)[0].0, "b0");
    let s = open(&img, OpenMode::ReadOnly);
    assert_eq!(s.list()[0].name.to_string(), "b0");
    assert!(s.load("b0").unwrap().is_dirty(0));
    let report = s.image().check().unwrap();
    drop(s);
    let qemu = common::qemu::run("qemu-img", &["check", "--output=json", i]);
    assert_eq!(qemu.status.code(), Some(2), "{qemu:?}");
    let v: serde_json::Value = serde_json::from_slice(&qemu.stdout).unwrap();
    assert_eq!(
        (report.corruptions, report.leaks),
        (
            v["corruptions"].as_u64().unwrap_or(0),
            v["leaks"].as_u64().unwrap_or(0)
        ),
        "ours: {:?}; QEMU: {v}",
        report.messages
    );
    let dbm = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dbm"))
            .args(args)
            .output()
            .unwrap()
    };
    assert_eq!(dbm(&["info", i]).status.code(), Some(0));
    assert_eq!(dbm(&["check", i]).status.code(), Some(2));
    // Writable: refused, nothing written.
    let r = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    );
    assert!(
        matches!(r, Err(dirty_bitmap::Error::Corrupt(_))),
        "{:?}",
        r.map(|_| ())
    );
    assert!(std::fs::read(&img).unwrap() == bytes, "the refusal wrote");
}

/// `img` is corruption to `qemu-img check` (exit 2) and to ours, whose findings include
/// one containing `ours`; adding a bitmap is refused before anything is written.
fn assert_corrupt_to_both(img: &Path, ours: &str) {
    let bytes = std::fs::read(img).unwrap();
    let qemu = common::qemu::run("qemu-img", &["check", p(img)]);
    assert_eq!(qemu.status.code(), Some(2), "{qemu:?}");
    let mut s = open(img, OpenMode::ReadWrite);
    let report = s.image().check().unwrap();
    assert!(
        report.exit_code() == 2 && report.messages.iter().any(|m| m.contains(ours)),
        "qemu-img check calls it corrupt; ours: {:?}",
        report.messages
    );
    let r = s.add("c", 65536, Recording::Enabled);
    assert!(matches!(r, Err(dirty_bitmap::Error::Corrupt(_))), "{r:?}");
    assert!(std::fs::read(img).unwrap() == bytes, "the refusal wrote");
}

/// A snapshot whose L1 table offset is not cluster-aligned is corruption to
/// `qemu-img check` (exit 2, "L1 table is not cluster aligned"), and here too: read at that
/// offset, the table would name other clusters and the walk report leaks only (exit 3), so
/// a leak repair would lower refcounts the snapshot still needs. A writing operation
/// refuses the image.
#[test]
fn a_snapshot_l1_table_out_of_alignment_is_corruption_as_qemu_says() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_image_with_data(dir.path(), true);
    let mut bytes = std::fs::read(&img).unwrap();
    let area = dirty_bitmap::format::HeaderArea::decode(&bytes[..65536]).unwrap();
    let at = area.header.snapshots_offset as usize;
    let l1 = u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    bytes[at..at + 8].copy_from_slice(&(l1 + 512).to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    assert_corrupt_to_both(&img, "L1 table is not cluster aligned");
}

/// A snapshot table entry with extra_data_size 2^32 - 1 is refused: accepted, the walk
/// would count a 4 GiB snapshot table (a page of counters per 4096 clusters of it, on a
/// sparse file). QEMU refuses the entry: `qemu-img check` fails ("Too much extra metadata
/// in snapshot table entry 0", exit 1) and `qemu-img info` cannot open the image. Ours
/// fails the check with a typed corruption (`dbm check` exits 1 too), and a writing
/// operation refuses the image before writing.
#[test]
fn a_snapshot_with_too_much_extra_data_fails_the_check_as_qemu_fails_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_image_with_data(dir.path(), true);
    let mut bytes = std::fs::read(&img).unwrap();
    let area = dirty_bitmap::format::HeaderArea::decode(&bytes[..65536]).unwrap();
    let at = area.header.snapshots_offset as usize;
    bytes[at + 36..at + 40].copy_from_slice(&u32::MAX.to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let qemu = common::qemu::run("qemu-img", &["check", p(&img)]);
    assert_eq!(qemu.status.code(), Some(1), "{qemu:?}");
    assert!(String::from_utf8_lossy(&qemu.stderr).contains("Too much extra metadata"));
    let info = common::qemu::run("qemu-img", &["info", p(&img)]);
    assert_eq!(info.status.code(), Some(1), "{info:?}");
    let mut s = open(&img, OpenMode::ReadWrite);
    let r = s.image().check();
    assert!(
        matches!(
            r,
            Err(dirty_bitmap::Error::Corrupt(
                dirty_bitmap::Corruption::SnapshotExtraData {
                    index: 0,
                    size: u32::MAX
                }
            ))
        ),
        "{:?}",
        r.map(|r| (r.corruptions, r.messages.first().cloned()))
    );
    let r = s.add("c", 65536, Recording::Enabled);
    assert!(matches!(r, Err(dirty_bitmap::Error::Corrupt(_))), "{r:?}");
    assert!(std::fs::read(&img).unwrap() == bytes, "the refusal wrote");
    drop(s);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dbm"))
        .args(["check", p(&img)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// A 64 MiB LUKS image made by `qemu-img create` at `img` (key secret "abc"), its bytes.
fn luks_image(img: &std::path::Path) -> Vec<u8> {
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=abc",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            p(img),
            "64M",
        ],
    );
    std::fs::read(img).unwrap()
}

/// Where the crypto header extension's frame (type 0x0537BE77) starts in cluster 0.
fn crypto_frame(bytes: &[u8]) -> usize {
    let mut at = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    loop {
        let kind = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        assert_ne!(kind, 0, "no crypto header extension");
        if kind == 0x0537_be77 {
            return at;
        }
        at += 8 + len.next_multiple_of(8);
    }
}

/// A LUKS header pointer running past the end of the file is found corrupt without walking
/// it cluster by cluster up to the end of the file. `qemu-img check` (with the key) reports
/// one corruption, "exceeding the end of the file", and counts none of the header's
/// clusters (they show as leaks); ours agrees on both counts.
#[test]
fn a_luks_header_past_the_end_is_one_corruption_as_qemu_says() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("l.qcow2");
    let i = p(&img);
    let mut bytes = luks_image(&img);
    let area = dirty_bitmap::format::HeaderArea::decode(&bytes[..65536]).unwrap();
    let crypto = area.crypto.expect("a LUKS header pointer");
    // The length field: the pointer extension's data follows its 8-byte type and length.
    let ext = crypto_frame(&bytes) + 8;
    let past = bytes.len() as u64 - crypto.offset + (1 << 20);
    bytes[ext + 8..ext + 16].copy_from_slice(&past.to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let qemu = common::qemu::run(
        "qemu-img",
        &[
            "check",
            "--object",
            "secret,id=sec0,data=abc",
            "--image-opts",
            &format!("driver=qcow2,file.filename={i},encrypt.key-secret=sec0"),
        ],
    );
    let qemu_out = String::from_utf8_lossy(&qemu.stdout).to_string();
    assert_eq!(qemu.status.code(), Some(2), "{qemu:?}");
    assert!(qemu_out.contains("1 errors were found"), "{qemu_out}");
    let leaks = crypto.length.div_ceil(65536);
    assert!(
        qemu_out.contains(&format!("{leaks} leaked clusters")),
        "{qemu_out}"
    );
    let report = open(&img, OpenMode::ReadOnly).image().check().unwrap();
    assert_eq!(
        (report.corruptions, report.leaks),
        (1, leaks),
        "{:?}",
        report.messages.first()
    );
}

/// A writable open of `img` (holding `bytes`), and a bitmap add on it, is refused as
/// `Unsupported`, the file byte for byte as it was.
fn refused_writable(img: &Path, bytes: &[u8], what: &str) {
    let r = BitmapStore::open(
        FileStorage::open(img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    );
    let r = r.map(|mut st| st.add("b", 65536, Recording::Enabled));
    assert!(
        matches!(r, Err(dirty_bitmap::Error::Unsupported(_))),
        "{what}: a writable open of it: {r:?}"
    );
    assert!(
        std::fs::read(img).unwrap() == bytes,
        "{what}: the refusal wrote"
    );
}

/// An image with crypt_method 2 (LUKS) and no crypto header extension (its magic renamed
/// here, so QEMU skips it as unknown) is refused by QEMU on every open that reads or writes
/// ("Missing CRYPTO header for crypt method 2", `qcow2_do_open`; `qemu-img info` alone
/// opens it); opened writable here, it would take a bitmap add's writes. A writable open is
/// refused (`Unsupported`), the file byte for byte as it was; a read-only one still lists
/// the bitmaps.
#[test]
fn a_luks_image_without_its_crypto_header_is_refused_writable() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("l.qcow2");
    let i = p(&img);
    let mut bytes = luks_image(&img);
    assert_eq!(u32::from_be_bytes(bytes[32..36].try_into().unwrap()), 2);
    let at = crypto_frame(&bytes);
    bytes[at..at + 4].copy_from_slice(&0x0537_be78u32.to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let qemu = common::qemu::run("qemu-io", &["-r", "-f", "qcow2", "-c", "read 0 512", i]);
    let qemu_err = String::from_utf8_lossy(&qemu.stderr).to_string();
    assert!(!qemu.status.success(), "qemu-io opened it: {qemu:?}");
    assert!(
        qemu_err.contains("Missing CRYPTO header for crypt method 2"),
        "{qemu_err}"
    );
    refused_writable(&img, &bytes, "no crypto header");
    let r = dirty_bitmap::Image::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    );
    assert!(
        matches!(r, Err(dirty_bitmap::Error::Unsupported(_))),
        "a writable image open of it: {:?}",
        r.map(|_| ())
    );
    assert!(open(&img, OpenMode::ReadOnly).list().is_empty());
    assert!(std::fs::read(&img).unwrap() == bytes, "the refusal wrote");
}

/// A LUKS image whose crypto header pointer names no LUKS1 header (its magic overwritten,
/// or a length of 0) is refused by QEMU on every open (`qcrypto_block_open`: "Volume is not
/// in LUKS format", or a read past the header's length); opened writable here, it would
/// take a bitmap add's writes. A writable open is refused (`Unsupported`), the file byte
/// for byte as it was; the image as QEMU made it still takes a bitmap, which QEMU then
/// checks clean.
#[test]
fn a_luks_image_whose_header_qemu_refuses_is_refused_writable() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("l.qcow2");
    let i = p(&img);
    let good = luks_image(&img);
    let area = dirty_bitmap::format::HeaderArea::decode(&good[..65536]).unwrap();
    let crypto = area.crypto.expect("a LUKS header pointer");
    let ext = crypto_frame(&good) + 8;
    let qemu_read = |what: &str| {
        let q = common::qemu::run(
            "qemu-io",
            &[
                "-r",
                "--object",
                "secret,id=sec0,data=abc",
                "--image-opts",
                &format!("driver=qcow2,file.filename={i},encrypt.key-secret=sec0"),
                "-c",
                "read 0 512",
            ],
        );
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&q.stdout),
            String::from_utf8_lossy(&q.stderr)
        );
        (
            q.status.success() && !out.contains("Error") && !out.contains("error"),
            format!("{what}: {out}"),
        )
    };
    let mut no_magic = good.clone();
    no_magic[crypto.offset as usize..crypto.offset as usize + 6].fill(0);
    let mut no_length = good.clone();
    no_length[ext + 8..ext + 16].copy_from_slice(&0u64.to_be_bytes());
    // A second crypto header extension first, naming the refcount table (no LUKS header):
    // QEMU opens the header of each one it meets; the area here keeps only the last.
    let mut twice = good.clone();
    let start = u32::from_be_bytes(good[100..104].try_into().unwrap()) as usize;
    let mut second = Vec::new();
    second.extend_from_slice(&0x0537_be77u32.to_be_bytes());
    second.extend_from_slice(&16u32.to_be_bytes());
    second.extend_from_slice(&area.header.refcount_table_offset.to_be_bytes());
    second.extend_from_slice(&592u64.to_be_bytes());
    // Inside cluster 0 only: its last 24 bytes are zeros, dropped by the shift.
    assert!(good[65536 - 24..65536].iter().all(|&b| b == 0));
    let mut c0 = good[..65536].to_vec();
    c0.splice(start..start, second);
    twice[..65536].copy_from_slice(&c0[..65536]);
    for (what, bytes) in [
        ("magic overwritten", &no_magic),
        ("length 0", &no_length),
        ("a second pointer to no LUKS header", &twice),
    ] {
        std::fs::write(&img, bytes).unwrap();
        let (opened, out) = qemu_read(what);
        assert!(!opened, "QEMU opened it: {out}");
        refused_writable(&img, bytes, what);
        // Read-only, it still lists (no bitmaps here).
        assert!(open(&img, OpenMode::ReadOnly).list().is_empty(), "{what}");
    }
    std::fs::write(&img, &good).unwrap();
    let (opened, out) = qemu_read("as QEMU made it");
    assert!(opened, "{out}");
    let mut st = open(&img, OpenMode::ReadWrite);
    st.add("b", 65536, Recording::Enabled).unwrap();
    drop(st);
    let q = common::qemu::run(
        "qemu-img",
        &[
            "check",
            "--object",
            "secret,id=sec0,data=abc",
            "--image-opts",
            &format!("driver=qcow2,file.filename={i},encrypt.key-secret=sec0"),
        ],
    );
    assert_eq!(q.status.code(), Some(0), "{q:?}");
}

/// An L2 entry whose cluster has refcount 1 but lacks the COPIED flag (bit 63) is
/// corruption to `qemu-img check` (exit 2, "OFLAG_COPIED data cluster"), and to our check
/// too, never clean: a writing operation refuses the image; the image as QEMU wrote it is
/// clean to both.
#[test]
fn an_l2_entry_without_its_copied_flag_is_corruption_as_qemu_says() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_image_with_data(dir.path(), false);
    assert_eq!(
        open(&img, OpenMode::ReadOnly)
            .image()
            .check()
            .unwrap()
            .corruptions,
        0
    );
    let mut bytes = std::fs::read(&img).unwrap();
    let area = dirty_bitmap::format::HeaderArea::decode(&bytes[..65536]).unwrap();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l2 = (be(&bytes, area.header.l1_table_offset as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be(&bytes, l2);
    assert_ne!(
        entry & (1 << 63),
        0,
        "QEMU sets COPIED on a cluster of its own"
    );
    bytes[l2..l2 + 8].copy_from_slice(&(entry & !(1 << 63)).to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    assert_corrupt_to_both(&img, "OFLAG_COPIED data cluster");
}

/// A directory whose second entry of a name is `in_use`: QEMU skips that entry at load,
/// opens the image and `qemu-img check` finds nothing; this crate's check agrees (it walked
/// no table after refusing the name, and counted a corruption and every bitmap cluster
/// leaked). The store still refuses to open it (docs/FORMAT.md), and the same directory
/// with the entry not `in_use` is corrupt to both.
#[test]
fn a_repeated_name_in_use_is_judged_as_qemu_img_check_judges_it() {
    use dirty_bitmap::storage::MemStorage;
    use dirty_bitmap::Image;
    let mut s = BitmapStore::create(MemStorage::new(), 64 * MIB, 65536).unwrap();
    for name in ["a", "b"] {
        s.add(name, 65536, Recording::Enabled).unwrap();
        let bm = DirtyBitmap::new(64 * MIB, 65536).unwrap();
        bm.mark_dirty(5 * MIB, 1);
        s.store(name, &bm).unwrap();
    }
    let dir_at = s.image().area().bitmaps.unwrap().directory_offset as usize;
    let clean = s.image().storage().to_vec();
    drop(s);
    // Entry 0 ("a") takes 32 bytes; entry 1's flags are at 12, its name at 24.
    let e1 = dir_at + 32;
    assert_eq!(clean[e1 + 24], b'b');
    for in_use in [true, false] {
        let mut bytes = clean.clone();
        bytes[e1 + 24] = b'a';
        if in_use {
            bytes[e1 + 15] |= 1;
        }
        let (code, text) = common::qemu::check_bytes(&bytes);
        let ours = Image::open(MemStorage::from_bytes(bytes.clone()), OpenMode::ReadOnly)
            .unwrap()
            .check()
            .unwrap();
        if in_use {
            assert_eq!(code, Some(0), "qemu-img check: {text}");
            assert!(ours.is_clean(), "ours: {:?}", ours.messages);
        } else {
            assert_ne!(code, Some(0), "qemu-img check: {text}");
            assert!(ours.corruptions > 0, "ours: {:?}", ours.messages);
        }
        assert!(BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadOnly).is_err());
    }
}

/// `qemu-img check --output=json`'s corruption count for `bytes` as an image, and ours.
fn corruptions_to_both(bytes: &[u8]) -> (u64, u64) {
    use dirty_bitmap::storage::MemStorage;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    std::fs::write(&img, bytes).unwrap();
    let q = common::qemu::run("qemu-img", &["check", "--output=json", p(&img)]);
    let v: serde_json::Value =
        serde_json::from_slice(&q.stdout).unwrap_or_else(|e| panic!("{e}: {q:?}"));
    let ours =
        dirty_bitmap::Image::open(MemStorage::from_bytes(bytes.to_vec()), OpenMode::ReadOnly)
            .unwrap()
            .check()
            .unwrap();
    (v["corruptions"].as_u64().unwrap_or(0), ours.corruptions)
}

/// The check's COPIED rule (QEMU's `check_oflag_copied`: bit 63 of an active L1 or L2
/// entry set exactly where the cluster's refcount on disk is 1) judged from the walk's one
/// read of the tables (`src/image/check.rs`, `CopiedFlags`), both ways it can break, on
/// images QEMU made, with standard and with extended L2 entries: after a snapshot and
/// writes, the active L1 entry names a table of its own (refcount 1, flag set), the table
/// names the cluster written before the snapshot (shared, refcount 2, no flag), one
/// written after (refcount 1, flag set) and one written then zeroed in place (an offset
/// and the zero flag, or zero subclusters: refcount 1, flag set). Each of the four flags
/// turned is corruption to `qemu-img check` and to ours, with the same count; the image
/// as QEMU left it is clean to both.
#[test]
fn each_active_copied_flag_turned_is_corruption_as_qemu_says() {
    for extended in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.qcow2");
        let i = p(&img);
        let opts = format!("extended_l2={}", if extended { "on" } else { "off" });
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &opts, i, "1M"],
        );
        ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 0 64k", i]);
        ok("qemu-img", &["snapshot", "-c", "s1", i]);
        for cmd in [
            "write -P 0xa5 128k 64k",
            "write -P 0xa5 192k 64k",
            "write -z 192k 64k",
        ] {
            ok("qemu-io", &["-f", "qcow2", "-c", cmd, i]);
        }
        ok("qemu-img", &["bitmap", "--add", i, "b0"]);
        let bytes = std::fs::read(&img).unwrap();
        assert_eq!(corruptions_to_both(&bytes), (0, 0), "{opts}");
        let area = dirty_bitmap::format::HeaderArea::decode(&bytes[..65536]).unwrap();
        let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
        let l1_at = area.header.l1_table_offset as usize;
        let l2_at = (be(&bytes, l1_at) & 0x00ff_ffff_ffff_fe00) as usize;
        let stride = if extended { 16 } else { 8 };
        let copied = 1u64 << 63;
        let zeroed = be(&bytes, l2_at + 3 * stride);
        assert_ne!(
            zeroed & 0x00ff_ffff_ffff_fe00,
            0,
            "{opts}: the zeroed cluster kept its offset"
        );
        if extended {
            assert_ne!(
                be(&bytes, l2_at + 3 * stride + 8) >> 32,
                0,
                "{opts}: zero subclusters"
            );
        } else {
            assert_ne!(zeroed & 1, 0, "{opts}: the zero flag");
        }
        // (where the entry is, whether QEMU set the flag there)
        let entries = [
            (l1_at, true),
            (l2_at, false),
            (l2_at + 2 * stride, true),
            (l2_at + 3 * stride, true),
        ];
        for (at, set) in entries {
            assert_eq!(
                be(&bytes, at) & copied != 0,
                set,
                "{opts}: entry at {at:#x} as QEMU left it"
            );
            let mut turned = bytes.clone();
            turned[at..at + 8].copy_from_slice(&(be(&bytes, at) ^ copied).to_be_bytes());
            let (qemu, ours) = corruptions_to_both(&turned);
            assert!(qemu > 0, "{opts}: entry at {at:#x}: QEMU found nothing");
            assert_eq!(ours, qemu, "{opts}: entry at {at:#x} (flag {set} turned)");
        }
    }
}

/// A check reads each table and refcount block of a sound image once: the COPIED rule is
/// judged from the walk's read of the active tables and the comparison's of the refcount
/// blocks (`src/image/check.rs`), where a pass of its own read all of them again (QEMU's
/// `check_oflag_copied` does). Here 128 L2 tables and 33 refcount blocks of 512-byte
/// clusters, every guest cluster allocated (QEMU's metadata preallocation): 163 reads,
/// two more than the structures (the L1 table and the reftable), where the second pass
/// alone makes 162 more. The image is clean to both checks.
#[test]
fn a_sound_images_check_reads_each_table_and_refcount_block_once() {
    use dirty_bitmap::storage::{FaultPlan, FaultStorage, MemStorage};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("m.qcow2");
    common::qemu::small_clusters_all_allocated(&img, "4M");
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(corruptions_to_both(&bytes), (0, 0));
    let area = dirty_bitmap::format::HeaderArea::decode(&bytes[..512]).unwrap();
    let h = &area.header;
    let be = |at: u64| u64::from_be_bytes(bytes[at as usize..at as usize + 8].try_into().unwrap());
    let named = |at: u64, n: u64| (0..n).filter(|k| be(at + 8 * k) != 0).count() as u64;
    let tables = named(h.l1_table_offset, u64::from(h.l1_size));
    let blocks = named(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * 512 / 8,
    );
    assert_eq!(
        tables, 128,
        "4 MiB in 512-byte clusters: 64 entries a table"
    );
    assert!(blocks > 16, "{blocks} refcount blocks");
    let storage = FaultStorage::new(MemStorage::from_bytes(bytes.clone()), FaultPlan::new());
    let image = dirty_bitmap::Image::open(storage, OpenMode::ReadOnly).unwrap();
    let before = image.storage().reads();
    let report = image.check().unwrap();
    let reads = image.storage().reads() - before;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.frag.allocated, 8192, "every guest cluster allocated");
    // The L1 table, the reftable, each L2 table and each refcount block once, and the
    // header's cluster and snapshot-free extras: a few reads beyond the structures.
    eprintln!("check: {reads} reads for {tables} L2 tables and {blocks} refcount blocks");
    assert!(
        reads <= tables + blocks + 4,
        "{reads} reads for {tables} L2 tables and {blocks} refcount blocks"
    );
}

/// The check's walk asks the storage to read the L2 tables ahead, a batch at a time
/// (`Storage::prefetch`), before it reads them: on a device, cold reads one after another
/// each wait for the last. Every L2 table the walk reads was named by one prefetch, made
/// before its read.
#[test]
fn the_walk_prefetches_each_l2_table_before_it_reads_it() {
    use dirty_bitmap::storage::{MemStorage, Storage};
    use std::sync::Mutex;
    #[derive(Debug)]
    enum Event {
        Prefetch(Vec<(u64, u64)>),
        Read(u64, u64),
    }
    #[derive(Debug)]
    struct Recorded {
        inner: MemStorage,
        events: Mutex<Vec<Event>>,
        /// A read at this offset fails (`EIO`).
        fail_at: Mutex<Option<u64>>,
    }
    impl Storage for Recorded {
        fn len(&self) -> dirty_bitmap::Result<u64> {
            self.inner.len()
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> dirty_bitmap::Result<()> {
            self.events
                .lock()
                .unwrap()
                .push(Event::Read(offset, buf.len() as u64));
            if *self.fail_at.lock().unwrap() == Some(offset) {
                return Err(std::io::Error::from_raw_os_error(5).into());
            }
            self.inner.read_exact_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> dirty_bitmap::Result<()> {
            self.inner.write_all_at(buf, offset)
        }
        fn set_len(&self, new_len: u64) -> dirty_bitmap::Result<()> {
            self.inner.set_len(new_len)
        }
        fn sync_data(&self) -> dirty_bitmap::Result<()> {
            self.inner.sync_data()
        }
        fn prefetch(&self, ranges: &[(u64, u64)]) {
            self.events
                .lock()
                .unwrap()
                .push(Event::Prefetch(ranges.to_vec()));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("m.qcow2");
    common::qemu::small_clusters_all_allocated(&img, "8M");
    let bytes = std::fs::read(&img).unwrap();
    let area = dirty_bitmap::format::HeaderArea::decode(&bytes[..512]).unwrap();
    let h = &area.header;
    let tables: Vec<u64> = (0..u64::from(h.l1_size))
        .map(|k| {
            let at = (h.l1_table_offset + 8 * k) as usize;
            u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00
        })
        .filter(|&t| t != 0)
        .collect();
    assert_eq!(tables.len(), 256);
    let storage = Recorded {
        inner: MemStorage::from_bytes(bytes),
        events: Mutex::new(Vec::new()),
        fail_at: Mutex::new(None),
    };
    let image = dirty_bitmap::Image::open(storage, OpenMode::ReadOnly).unwrap();
    image.storage().events.lock().unwrap().clear();
    assert!(image.check().unwrap().is_clean());
    let events = image.storage().events.lock().unwrap();
    // The index of the prefetch naming each range, and of each offset's first read; and
    // between a prefetch and the last read of its ranges, the walk reads nothing else
    // (another read would end what the prefetch made fresh), each range once.
    let mut prefetched = std::collections::HashMap::new();
    let mut first_read = std::collections::HashMap::new();
    let mut pending = std::collections::HashSet::new();
    let mut batches = 0;
    for (k, e) in events.iter().enumerate() {
        match e {
            Event::Prefetch(ranges) => {
                batches += 1;
                assert!(pending.is_empty(), "{} ranges left unread", pending.len());
                for r in ranges {
                    assert_eq!(r.1, 512, "a whole table");
                    assert!(prefetched.insert(r.0, k).is_none(), "{r:?} twice");
                    pending.insert(*r);
                }
            }
            Event::Read(off, len) => {
                first_read.entry(*off).or_insert(k);
                if !pending.is_empty() {
                    assert!(
                        pending.remove(&(*off, *len)),
                        "read ({off:#x}, {len}) amid a prefetch's ranges"
                    );
                }
            }
        }
    }
    assert!(batches >= 2, "256 tables in {batches} prefetches");
    for t in &tables {
        let at = prefetched
            .get(t)
            .unwrap_or_else(|| panic!("table {t:#x} not prefetched"));
        let read = first_read
            .get(t)
            .unwrap_or_else(|| panic!("table {t:#x} never read"));
        assert!(at < read, "table {t:#x} read before its prefetch");
    }
    drop(events);
    // A read that fails ends the walk: the error, and nothing more read ahead from the
    // failing device (one empty prefetch ends what the last one made fresh).
    *image.storage().fail_at.lock().unwrap() = Some(tables[0]);
    image.storage().events.lock().unwrap().clear();
    let e = image.check().unwrap_err();
    assert!(matches!(e, dirty_bitmap::Error::Io(_)), "{e}");
    let events = image.storage().events.lock().unwrap();
    let failed = events
        .iter()
        .position(|e| matches!(e, Event::Read(off, _) if *off == tables[0]))
        .expect("the table's read");
    let after: Vec<&Event> = events[failed + 1..].iter().collect();
    assert!(
        after
            .iter()
            .all(|e| matches!(e, Event::Prefetch(r) if r.is_empty())),
        "after the failed read: {after:?}"
    );
}

/// The second COPIED pass resolves its lookups in batches of 8,192, one refcount block held
/// across them (`src/image/check.rs`, `CopiedBatch`): its findings are QEMU's, counted and
/// in order, across batches. A 64 MiB image of 512-byte clusters with every guest cluster
/// allocated (131,072 data entries, 16 batches) with the flag cleared on every 37th data
/// entry and set on the L1 entry of a table whose refcount is raised to 2: the corruption
/// count and the first 1,000 OFLAG_COPIED messages (all this crate keeps) are
/// `qemu-img check`'s.
#[test]
fn the_second_copied_pass_reports_as_qemu_across_its_batches() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("m.qcow2");
    let i = p(&img);
    common::qemu::small_clusters_all_allocated(&img, "64M");
    let mut bytes = std::fs::read(&img).unwrap();
    let area = dirty_bitmap::format::HeaderArea::decode(&bytes[..512]).unwrap();
    let h = area.header.clone();
    let be =
        |b: &[u8], at: u64| u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap());
    let put = |b: &mut Vec<u8>, at: u64, v: u64| {
        b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes())
    };
    let mask = 0x00ff_ffff_ffff_fe00u64;
    let tables: Vec<u64> = (0..u64::from(h.l1_size))
        .map(|k| be(&bytes, h.l1_table_offset + 8 * k) & mask)
        .filter(|&t| t != 0)
        .collect();
    let mut k = 0u64;
    for &t in &tables {
        for j in 0..64 {
            if k.is_multiple_of(37) {
                let e = be(&bytes, t + 8 * j);
                put(&mut bytes, t + 8 * j, e & !(1 << 63));
            }
            k += 1;
        }
    }
    assert_eq!(k, 131_072);
    // Table 100's refcount raised to 2 (a 16-bit refcount in its block).
    let cl = tables[100] >> 9;
    let per_block = 512 * 8 / 16;
    let block = be(&bytes, h.refcount_table_offset + 8 * (cl / per_block)) & mask;
    let at = (block + 2 * (cl % per_block)) as usize;
    bytes[at..at + 2].copy_from_slice(&2u16.to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let q = common::qemu::run("qemu-img", &["check", "--output=json", i]);
    let v: serde_json::Value = serde_json::from_slice(&q.stdout).unwrap();
    let q_text = common::qemu::run("qemu-img", &["check", i]);
    let said = String::from_utf8_lossy(&q_text.stderr).to_string();
    let qemu_lines: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("OFLAG_COPIED"))
        .collect();
    let ours = open(&img, OpenMode::ReadOnly).image().check().unwrap();
    let our_lines: Vec<&String> = ours
        .messages
        .iter()
        .filter(|m| m.contains("OFLAG_COPIED"))
        .collect();
    assert_eq!(
        Some(ours.corruptions),
        v["corruptions"].as_u64(),
        "QEMU: {v}"
    );
    assert!(qemu_lines.len() > 3_000, "{} lines", qemu_lines.len());
    assert!(our_lines.len() >= 900, "{} messages", our_lines.len());
    for (n, (ours, qemu)) in our_lines.iter().zip(&qemu_lines).enumerate() {
        assert_eq!(ours.as_str(), *qemu, "message {n}");
    }
}
