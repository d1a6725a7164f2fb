//! Raw disks the way QEMU serves them (issue 13 §1): an image whose guest data is an
//! existing raw file, made without writing one byte of it, that QEMU's tools read, write
//! and export with its bitmaps; and such images made by `qemu-img`, opened by us.
//!
//! Needs qemu-img, qemu-io, qemu-nbd and nbdinfo; a missing tool fails the test.

mod common;

use std::path::Path;

use common::qemu::{assert_qemu_clean, nbd_dirty, ok, p, run};
use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::{BitmapStore, OpenMode, Recording};

const MIB: u64 = 1 << 20;

/// A raw file of `size` bytes with a pattern every 1 MiB (byte `0x40 + k` over the first
/// 4 KiB of MiB `k`), the rest sparse.
fn raw_disk(path: &Path, size: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for k in 0..size / MIB {
        f.write_all_at(&[0x40 + (k % 64) as u8; 4096], k * MIB)
            .unwrap();
    }
    std::fs::read(path).unwrap()
}

fn qemu_map(img: &Path) -> serde_json::Value {
    let out = ok("qemu-img", &["map", "-f", "qcow2", "--output=json", p(img)]);
    serde_json::from_str(&out).unwrap()
}

/// Our image and `qemu-img create … preallocation=metadata`'s, over raw files of the same
/// size: the same map, the same facts in `qemu-img info`, and ours left the raw file as it
/// was, byte for byte, where QEMU's truncated its own.
#[test]
fn a_data_file_image_maps_the_raw_file_as_qemu_img_does_and_never_writes_it() {
    for (cs, size) in [(65536u64, 64 * MIB), (512, 3 * MIB), (2 * MIB, 130 * MIB)] {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        let before = raw_disk(&raw, size);
        let mtime = std::fs::metadata(&raw).unwrap().modified().unwrap();
        let img = dir.path().join("ours.qcow2");
        let st = BitmapStore::create_with_data_file(
            FileStorage::create(&img).unwrap(),
            size,
            cs,
            p(&raw),
        )
        .unwrap();
        drop(st);
        assert_eq!(std::fs::read(&raw).unwrap(), before, "cluster size {cs}");
        assert_eq!(std::fs::metadata(&raw).unwrap().modified().unwrap(), mtime);
        assert_qemu_clean(&img);

        let theirs_raw = dir.path().join("theirs.raw");
        std::fs::write(&theirs_raw, b"").unwrap();
        let theirs = dir.path().join("theirs.qcow2");
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!(
                    "cluster_size={cs},data_file={},data_file_raw=on,preallocation=metadata",
                    p(&theirs_raw)
                ),
                p(&theirs),
                &size.to_string(),
            ],
        );
        let strip = |mut v: serde_json::Value| {
            for e in v.as_array_mut().unwrap() {
                e.as_object_mut().unwrap().remove("filename");
            }
            v
        };
        assert_eq!(
            strip(qemu_map(&img)),
            strip(qemu_map(&theirs)),
            "cluster size {cs}"
        );
        let info = |i: &Path| -> serde_json::Value {
            serde_json::from_str(&ok("qemu-img", &["info", "--output=json", p(i)])).unwrap()
        };
        let (a, b) = (info(&img), info(&theirs));
        let data = |v: &serde_json::Value| v["format-specific"]["data"].clone();
        assert_eq!(data(&a)["data-file"], p(&raw));
        assert_eq!(data(&a)["data-file-raw"], true);
        assert_eq!(data(&b)["data-file-raw"], true);
        assert_eq!(a["virtual-size"], b["virtual-size"]);
        assert_eq!(a["cluster-size"], b["cluster-size"]);
        // QEMU reads the raw file's bytes through our image.
        for k in [0, size / MIB / 2, size / MIB - 1] {
            ok(
                "qemu-io",
                &[
                    "-r",
                    "-f",
                    "qcow2",
                    "-c",
                    &format!("read -P {} {} 4096", 0x40 + (k % 64), k * MIB),
                    p(&img),
                ],
            );
        }
    }
}

/// Bitmaps in a data-file image: our store keeps them (active, flushed, inactivated) beside
/// the L1/L2 tables; QEMU writes the raw disk through the image into the raw file, and
/// `qemu-nbd` exports the bitmap as we marked it.
#[test]
fn bitmaps_beside_the_guest_map_are_exported_by_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    let raw = dir.path().join("disk.raw");
    raw_disk(&raw, size);
    let img = dir.path().join("disk.qcow2");
    let mut st = BitmapStore::create_with_data_file(
        FileStorage::create(&img).unwrap(),
        size,
        65536,
        p(&raw),
    )
    .unwrap();
    st.add("b", 65536, Recording::Enabled).unwrap();
    st.activate().unwrap();
    let t = st.tracker().unwrap();
    for (off, len) in [(0, 4096), (10 * MIB, 3 * MIB), (size - 65536, 65536)] {
        t.mark(off, len);
    }
    st.flush().unwrap();
    t.mark(100 * MIB, 1);
    st.inactivate().unwrap();
    drop(t);
    drop(st);
    assert_qemu_clean(&img);
    assert_eq!(
        nbd_dirty(&img, "b"),
        vec![
            (0, 65536),
            (10 * MIB, 3 * MIB),
            (100 * MIB, 65536),
            (size - 65536, 65536)
        ]
    );
    // QEMU writes through the image: the bytes land at the same offset of the raw file.
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xcd 5M 64K", p(&img)],
    );
    let bytes = std::fs::read(&raw).unwrap();
    assert!(bytes[(5 * MIB) as usize..(5 * MIB + 65536) as usize]
        .iter()
        .all(|&b| b == 0xcd));
    assert_qemu_clean(&img);
    // And reopened by us, the bitmap and the map are still there.
    let mut st = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    )
    .unwrap();
    assert!(st.image().check().unwrap().is_clean());
    st.activate().unwrap();
    // Ours, and QEMU's write at 5 MiB: the bitmap is enabled, so QEMU marked it too.
    let b = st.bitmap("b").unwrap();
    assert_eq!(b.dirty_bytes(), (1 + 48 + 1 + 1 + 1) * 65536);
    assert!(b.is_dirty(5 * MIB));
    st.inactivate().unwrap();
}

/// An image `qemu-img` made over a raw file opens in our store, takes a bitmap, and stays
/// clean for QEMU; the raw file is not touched by us.
#[test]
fn a_data_file_image_made_by_qemu_img_takes_our_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("q.raw");
    let img = dir.path().join("q.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!(
                "data_file={},data_file_raw=on,preallocation=metadata",
                p(&raw)
            ),
            p(&img),
            "64M",
        ],
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 1M 64K", p(&img)],
    );
    let before = std::fs::read(&raw).unwrap();
    let mut st = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    )
    .unwrap();
    st.add("ours", 65536, Recording::Enabled).unwrap();
    st.activate().unwrap();
    st.tracker().unwrap().mark(2 * MIB, 4096);
    st.inactivate().unwrap();
    drop(st);
    assert_eq!(std::fs::read(&raw).unwrap(), before);
    assert_qemu_clean(&img);
    assert_eq!(nbd_dirty(&img, "ours"), vec![(2 * MIB, 65536)]);
    let out = run(
        "qemu-io",
        &["-r", "-f", "qcow2", "-c", "read -P 0x5a 1M 64K", p(&img)],
    );
    assert!(out.status.success());
}

/// `qemu-io -f raw RAW -c 'write …'` in a process of its own: whether QEMU let it write.
fn qemu_io_writes_raw(raw: &Path) -> std::process::Output {
    run(
        "qemu-io",
        &["-f", "raw", p(raw), "-c", "write -P 0x5a 1M 64k"],
    )
}

/// A writable store locks the image's raw data file as well as the image, as a QEMU writer
/// of the image does: otherwise a QEMU writer of the raw disk (or a second image over it)
/// could write it beside an active tracker, and those writes would reach no bitmap (a
/// backup since a checkpoint would miss them). The hand-over releases it with the image,
/// and a QEMU writer already holding the raw file keeps the store from opening, with
/// nothing written.
#[test]
fn a_writable_store_keeps_qemu_writers_off_its_raw_disk() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    raw_disk(&raw, 64 * MIB);
    let img = dir.path().join("disk.qcow2");
    let mut st = BitmapStore::create_with_data_file(
        FileStorage::create(&img).unwrap(),
        64 * MIB,
        65536,
        p(&raw),
    )
    .unwrap();
    st.add("b", 65536, Recording::Enabled).unwrap();
    st.activate().unwrap();
    let out = qemu_io_writes_raw(&raw);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("lock"),
        "QEMU wrote the raw disk beside an active store: {err}"
    );
    assert!(matches!(
        FileStorage::open(&raw, OpenMode::ReadWrite),
        Err(dirty_bitmap::Error::Locked { .. })
    ));
    // Handed over: the raw disk goes with the image.
    st.inactivate().unwrap();
    let out = qemu_io_writes_raw(&raw);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(st);

    // A QEMU writer holds the raw disk: our writable open is refused and writes nothing.
    let mut child = std::process::Command::new(common::qemu::tool("qemu-io"))
        .args(["-f", "raw", p(&raw)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let before = std::fs::read(&img).unwrap();
    // qemu-io takes its locks as it opens. Wait until the kernel lists its lock on the raw
    // file's byte 101 (`/proc/locks`: QEMU's "write" permission, the last a writer takes)
    // before opening the store once: an open while qemu-io starts would hold the raw file
    // itself, and qemu-io, finding it locked, would give up.
    let id = {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&raw).unwrap();
        let dev = m.dev();
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        format!("{major:02x}:{minor:02x}:{}", m.ino())
    };
    // A lock record names the file, then its first and last byte (adjacent locks merge:
    // `100 101`).
    let holds_101 = |line: &str| {
        let mut f = line.split_whitespace().skip_while(|w| *w != id).skip(1);
        let first = f.next().and_then(|w| w.parse::<u64>().ok());
        let last = f.next().and_then(|w| w.parse::<u64>().ok());
        matches!((first, last), (Some(a), Some(b)) if a <= 101 && 101 <= b)
    };
    let start = std::time::Instant::now();
    while !std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(holds_101)
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "qemu-io exited before it locked the raw disk"
        );
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "qemu-io took no lock on the raw disk ({id})"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let r = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        matches!(r, Err(dirty_bitmap::Error::Locked { .. })),
        "{:?}",
        r.map(|_| ())
    );
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a refused open wrote"
    );
}

/// An image that names a data file in its extension while the incompatible `data_file` bit
/// is clear keeps its guest data in the image itself, as QEMU reads it (`qcow2_do_open`
/// opens the named file only with the bit set, and drops the extension at its next header
/// write). A writable open ignores the name without the bit, as QEMU ignores it: requiring
/// the named file and taking a writer's locks on it would refuse the open with an I/O error
/// when it is gone, and lock an unrelated file when it exists.
#[test]
fn a_data_file_name_without_its_feature_bit_is_ignored_as_qemu_ignores_it() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("gone.raw");
    let img = dir.path().join("own-data.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", p(&raw)),
            p(&img),
            "16M",
        ],
    );
    // Incompatible features (offset 72, big-endian): bit 2 cleared, the extension kept.
    let mut bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes[79] & 4, 4, "qemu-img set the data_file bit");
    bytes[79] &= !4;
    std::fs::write(&img, &bytes).unwrap();
    std::fs::remove_file(&raw).unwrap();
    // QEMU opens it and writes its guest data into the image itself.
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 1M 64K", p(&img)],
    );
    assert_qemu_clean(&img);
    let mut st = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    )
    .expect("a writable open of an image QEMU opens");
    st.add("b", 65536, Recording::Enabled).unwrap();
    st.activate().unwrap();
    st.tracker().unwrap().mark(2 * MIB, 4096);
    st.inactivate().unwrap();
    drop(st);
    assert!(!raw.exists(), "the named file was made");
    assert_qemu_clean(&img);
    assert_eq!(nbd_dirty(&img, "b"), vec![(2 * MIB, 65536)]);
    let out = run(
        "qemu-io",
        &["-r", "-f", "qcow2", "-c", "read -P 0x5a 1M 64K", p(&img)],
    );
    assert!(out.status.success(), "{out:?}");
}

/// QEMU reads the data file's name as a C string, up to its first NUL
/// (`qcow2_read_extensions`), so a name `disk.raw\0` opens `disk.raw`. A writable open here
/// opens `disk.raw` too, as QEMU does, rather than passing the NUL to the file system and
/// failing, and holds its writer's locks on it.
#[test]
fn a_data_file_name_is_read_up_to_its_first_nul_as_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let named = dir.path().join("disk.rawX");
    let img = dir.path().join("nul.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", p(&named)),
            p(&img),
            "16M",
        ],
    );
    std::fs::rename(&named, &raw).unwrap();
    // The name's last byte, `X`, becomes a NUL.
    let mut bytes = std::fs::read(&img).unwrap();
    let name = p(&named).as_bytes();
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("the data file's name in cluster 0");
    bytes[at + name.len() - 1] = 0;
    std::fs::write(&img, &bytes).unwrap();
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 1M 64K", p(&img)],
    );
    assert_qemu_clean(&img);
    let mut st = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    )
    .expect("a writable open of an image QEMU opens");
    // The raw disk is held: QEMU cannot write it beside this handle.
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 512", p(&raw)]);
    assert!(
        !out.status.success(),
        "QEMU wrote the held raw disk: {out:?}"
    );
    st.add("b", 65536, Recording::Enabled).unwrap();
    st.activate().unwrap();
    st.tracker().unwrap().mark(2 * MIB, 4096);
    st.inactivate().unwrap();
    drop(st);
    assert_qemu_clean(&img);
    assert_eq!(nbd_dirty(&img, "b"), vec![(2 * MIB, 65536)]);
    let out = run(
        "qemu-io",
        &["-r", "-f", "qcow2", "-c", "read -P 0x5a 1M 64K", p(&img)],
    );
    assert!(out.status.success(), "{out:?}");
}

/// `data_file_raw` (autoclear bit 1) without the incompatible `data_file` bit makes an
/// image QEMU refuses to open for I/O ("data-file-raw requires a data file"), and a
/// writable open here must not write to it. It is refused as corrupt, read-only and
/// writable, with nothing written.
#[test]
fn data_file_raw_without_a_data_file_is_refused_as_qemu_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.raw");
    let img = dir.path().join("raw-bit.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={},data_file_raw=on", p(&raw)),
            p(&img),
            "16M",
        ],
    );
    let mut bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes[95] & 2, 2, "qemu-img set data_file_raw");
    bytes[79] &= !4;
    std::fs::write(&img, &bytes).unwrap();
    // `qemu-img info` opens it without I/O; every tool that reads or writes it refuses.
    for (tool, args) in [
        ("qemu-img", vec!["check", "-f", "qcow2", p(&img)]),
        (
            "qemu-io",
            vec!["-r", "-f", "qcow2", "-c", "read 0 4k", p(&img)],
        ),
    ] {
        let out = run(tool, &args);
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr)
                    .contains("data-file-raw requires a data file"),
            "{tool} opened it: {out:?}"
        );
    }
    for mode in [OpenMode::ReadOnly, OpenMode::ReadWrite] {
        let e = BitmapStore::open(FileStorage::open(&img, mode).unwrap(), mode).unwrap_err();
        assert!(
            matches!(
                e,
                dirty_bitmap::Error::Corrupt(dirty_bitmap::Corruption::DataFileRawWithoutDataFile)
            ),
            "{mode:?}: {e:?}"
        );
    }
    assert_eq!(
        std::fs::read(&img).unwrap(),
        bytes,
        "written before the refusal"
    );
}

/// An image with the `data_file` bit that names no data file (QEMU opens it only when its
/// user names the raw disk, with the `data-file` option), opened writable here, would hold
/// no lock on that disk, so a QEMU writer of the raw disk would write unseen by the
/// bitmaps. A writable open is refused, writing nothing; a read-only one still lists the
/// bitmaps.
#[test]
fn a_data_file_image_that_names_no_data_file_is_refused_writable() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let img = dir.path().join("unnamed.qcow2");
    raw_disk(&raw, 16 * MIB);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", p(&raw)),
            p(&img),
            "16M",
        ],
    );
    ok("qemu-img", &["bitmap", "--add", p(&img), "b"]);
    // The data file name extension (magic 0x44415441, "DATA") becomes an unknown extension,
    // which QEMU keeps and ignores: the bit stays, the name is gone.
    let mut bytes = std::fs::read(&img).unwrap();
    let at = bytes[..4096]
        .windows(4)
        .position(|w| w == b"DATA")
        .expect("the data file name extension in cluster 0");
    bytes[at..at + 4].copy_from_slice(b"ZZZZ");
    assert_eq!(bytes[79] & 4, 4, "the data_file bit");
    std::fs::write(&img, &bytes).unwrap();
    // `qemu-img info` opens it without I/O; a tool that reads or writes it refuses.
    let out = run(
        "qemu-io",
        &["-r", "-f", "qcow2", "-c", "read 0 4k", p(&img)],
    );
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("'data-file' is required"),
        "QEMU opened it without a data-file option: {out:?}"
    );
    // With the raw disk named, QEMU opens it and writes the raw disk.
    let opts = format!(
        "driver=qcow2,file.filename={},data-file.filename={}",
        p(&img),
        p(&raw)
    );
    ok(
        "qemu-io",
        &["--image-opts", "-c", "write -P 0x5a 1M 64K", &opts],
    );
    let bytes = std::fs::read(&img).unwrap();
    let Err(e) = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    ) else {
        panic!("a writable open of an image whose raw disk it cannot lock");
    };
    assert!(
        matches!(&e, dirty_bitmap::Error::Unsupported(m) if m.contains("names none")),
        "{e:?}"
    );
    assert_eq!(
        std::fs::read(&img).unwrap(),
        bytes,
        "written before the refusal"
    );
    let st = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .expect("a read-only open");
    assert_eq!(st.list().len(), 1);
}
