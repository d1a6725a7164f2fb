//! Repair (issue 13 §4): `dbm check -r all` on images whose bitmaps QEMU refuses, made from
//! QEMU-made images with guest data, removes only the broken bitmaps (or the whole
//! extension when the directory cannot be read) and frees only what nothing else
//! references; `-r leaks` frees nothing a bitmap entry may own. QEMU is the judge:
//! `qemu-img info` opens the result, `qemu-img check` finds it clean, `qemu-img compare`
//! finds every guest cluster as it was, `qemu-io` reads the data written before the damage,
//! and `qemu-nbd` exports every kept bitmap all dirty (a removed bitmap may have held writes
//! a kept one lacks).

mod common;

use std::path::Path;
use std::process::Command;

use common::qemu::{assert_qemu_clean, nbd_dirty, ok, p, run};
use dirty_bitmap::format::HeaderArea;

/// A QEMU-made image with guest data and bitmaps a, b, c (b and c with dirty bits), and
/// the byte offset of its bitmap directory. Entries are 32 bytes each (one-byte names).
fn base(dir: &Path) -> (std::path::PathBuf, usize) {
    let img = dir.join("q.qcow2");
    let i = p(&img);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", i, "64M"]);
    for (pat, off) in [("0x5a", "1M"), ("0xa5", "20M"), ("0x3c", "63M")] {
        ok(
            "qemu-io",
            &["-f", "qcow2", "-c", &format!("write -P {pat} {off} 64K"), i],
        );
    }
    for b in ["a", "b", "c"] {
        ok("qemu-img", &["bitmap", "--add", i, b]);
    }
    for (b, off) in [("b", "5M"), ("c", "40M"), ("c", "41M")] {
        let out = Command::new(env!("CARGO_BIN_EXE_dbm"))
            .args(["mark", i, b, off, "4096"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bytes = std::fs::read(&img).unwrap();
    let area = HeaderArea::decode(&bytes[..65536]).unwrap();
    let d = area.bitmaps.unwrap().directory_offset as usize;
    (img, d)
}

fn dbm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dbm"))
        .args(args)
        .output()
        .unwrap()
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn repair_all_removes_only_the_broken_bitmaps_and_keeps_guest_data() {
    type Edit = fn(&mut Vec<u8>, usize);
    // (case, the edit, the bitmaps that must remain)
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "granularity out of range",
            |b, d| b[d + 32 + 17] = 40,
            &["a", "c"],
        ),
        ("a reserved flag", |b, d| b[d + 15] |= 0x20, &["b", "c"]),
        (
            "reserved bits in a table entry",
            |b, d| {
                let t = be64(b, d + 32) as usize;
                b[t + 7] |= 0x02;
            },
            &["a", "c"],
        ),
        (
            "a bitmap type QEMU does not know",
            |b, d| b[d + 64 + 16] = 7,
            &["a", "b"],
        ),
        (
            "a table size that does not fit the disk",
            |b, d| b[d + 32 + 11] += 1,
            &["a", "c"],
        ),
        (
            "a duplicate name",
            |b, d| b[d + 64 + 24] = b'b',
            &["a", "b"],
        ),
        (
            "overlapping tables",
            |b, d| {
                let t = b[d + 32..d + 40].to_vec();
                b[d + 64..d + 72].copy_from_slice(&t);
            },
            &["a", "b"],
        ),
        (
            "a bad name length (the directory cannot be read)",
            |b, d| b[d + 32 + 18..d + 32 + 20].copy_from_slice(&2000u16.to_be_bytes()),
            &[],
        ),
        (
            "a directory above the size limit (the extension itself is refused)",
            |b, _| {
                let pos = (0..65536 - 12)
                    .find(|&k| b[k..k + 4] == [0x23, 0x85, 0x28, 0x75])
                    .unwrap();
                b[pos + 16..pos + 24].copy_from_slice(&(1024u64 * 65535 + 8).to_be_bytes());
            },
            &[],
        ),
        (
            "more bitmaps announced than stored",
            |b, _| {
                let pos = (0..65536 - 12)
                    .find(|&k| b[k..k + 4] == [0x23, 0x85, 0x28, 0x75])
                    .unwrap();
                b[pos + 8 + 3] = 4;
            },
            &[],
        ),
    ];
    for (case, edit, remain) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (img, d) = base(dir.path());
        let i = p(&img);
        let pristine = dir.path().join("pristine.qcow2");
        std::fs::copy(&img, &pristine).unwrap();
        let mut bytes = std::fs::read(&img).unwrap();
        edit(&mut bytes, d);
        std::fs::write(&img, &bytes).unwrap();
        // QEMU refuses to open it, or (overlapping tables, which it does not look for at
        // open) its check finds the clusters referenced twice.
        assert!(
            !run("qemu-img", &["info", i]).status.success()
                || run("qemu-img", &["check", i]).status.code() == Some(2),
            "{case}: QEMU finds nothing wrong with the damaged image"
        );
        // -r leaks first: it must not free anything a bitmap entry may own. Only the
        // overlap leaves true leaks (c's own table and data, which nothing names any
        // more); elsewhere every cluster that looks leaked is a bitmap's, and stays.
        let out = dbm(&["check", "-r", "leaks", i]);
        assert_ne!(out.status.code(), Some(101), "{case}: panicked");
        if case == "overlapping tables" {
            // c's own table and its one data cluster, and nothing of b's, which c's entry
            // names now (freeing those would leave both entries on refcount 0).
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(err.contains("Repaired 2 leaked clusters"), "{case}: {err}");
            assert!(!err.contains("Kept "), "{case}: {err}");
        } else {
            let after_leaks = std::fs::read(&img).unwrap();
            assert!(after_leaks == bytes, "{case}: -r leaks changed the image");
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                err.contains("Kept ") || err.contains("Nothing to repair"),
                "{case}: {err}"
            );
        }
        let out = dbm(&["check", "-r", "all", i]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{case}: {err}{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(err.starts_with("Removed "), "{case}: {err}");
        ok("qemu-img", &["info", i]);
        assert_qemu_clean(&img);
        ok(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                p(&pristine),
                i,
            ],
        );
        ok(
            "qemu-io",
            &["-r", "-f", "qcow2", "-c", "read -P 0x5a 1M 64K", i],
        );
        let listed: Vec<String> = {
            let v: serde_json::Value =
                serde_json::from_str(&ok("qemu-img", &["info", "--output=json", i])).unwrap();
            v["format-specific"]["data"]["bitmaps"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|b| b["name"].as_str().unwrap().to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(listed, remain, "{case}");
        // Each kept bitmap comes out of the removal's commit with every bit set: "since" it
        // is then a full backup, whatever the removed bitmaps held.
        for n in remain {
            assert!(
                err.contains(&format!("Made bitmap {n} all dirty")),
                "{case}: {err}"
            );
            assert_eq!(nbd_dirty(&img, n), [(0, 64 << 20)], "{case}: bitmap {n}");
        }
        // The removed bitmaps' clusters were freed: the file holds no leak, and a second
        // repair has nothing to do.
        let out = dbm(&["check", "-r", "all", i]);
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "Nothing to repair\n",
            "{case}"
        );
    }
}

/// A sound image: `-r all` writes nothing; a leak that no bitmap owns is freed by
/// `-r leaks`, as `qemu-img check -r leaks` would.
#[test]
fn repair_of_a_sound_image_frees_only_true_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = base(dir.path());
    let i = p(&img);
    let bytes = std::fs::read(&img).unwrap();
    let out = dbm(&["check", "-r", "all", i]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        std::fs::read(&img).unwrap() == bytes,
        "a sound image was rewritten"
    );
    // A leak: the refcount of a cluster past the end of everything, raised by hand.
    let area = HeaderArea::decode(&bytes[..65536]).unwrap();
    let rt = area.header.refcount_table_offset as usize;
    let block = be64(&bytes, rt) as usize;
    let clusters = bytes.len() / 65536;
    let mut b = bytes.clone();
    b.resize(bytes.len() + 65536, 0);
    b[block + 2 * clusters..block + 2 * clusters + 2].copy_from_slice(&1u16.to_be_bytes());
    std::fs::write(&img, &b).unwrap();
    assert_eq!(run("qemu-img", &["check", i]).status.code(), Some(3));
    let out = dbm(&["check", "-r", "leaks", i]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Repaired 1 leaked clusters"));
    assert_qemu_clean(&img);
}

/// `-r leaks` sets a leaked refcount once, not one decrement at a time: a cluster at
/// refcount 2^64 - 1 (64-bit refcounts, which QEMU makes and opens) would take about 2^64
/// steps and the repair would never end. Given 60 seconds (it takes milliseconds), a repair
/// still running fails the test.
#[test]
fn a_leak_at_the_largest_refcount_is_repaired_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r64.qcow2");
    let i = p(&img);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=64",
            i,
            "64M",
        ],
    );
    let bytes = std::fs::read(&img).unwrap();
    let area = HeaderArea::decode(&bytes[..65536]).unwrap();
    assert_eq!(area.header.refcount_order, 6);
    let rt = area.header.refcount_table_offset as usize;
    let block = be64(&bytes, rt) as usize;
    let clusters = bytes.len() / 65536;
    let mut b = bytes.clone();
    b.resize(bytes.len() + 65536, 0);
    b[block + 8 * clusters..block + 8 * clusters + 8].copy_from_slice(&u64::MAX.to_be_bytes());
    std::fs::write(&img, &b).unwrap();
    assert_eq!(run("qemu-img", &["check", i]).status.code(), Some(3));
    let mut child = Command::new(env!("CARGO_BIN_EXE_dbm"))
        .args(["check", "-r", "leaks", i])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("the repair of one leaked cluster did not end");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Repaired 1 leaked clusters"));
    assert_qemu_clean(&img);
}

/// An image of one 64 MiB disk (64 KiB clusters) in memory with bitmap "a", one bit set:
/// its bytes, its directory's offset, its table's offset and the data cluster the table
/// names.
fn one_bitmap_in_memory() -> (Vec<u8>, usize, u64, u64) {
    use dirty_bitmap::storage::MemStorage;
    use dirty_bitmap::{BitmapStore, Recording};
    let mut store = BitmapStore::create(MemStorage::new(), 64 << 20, 65536).unwrap();
    store.add("a", 65536, Recording::Enabled).unwrap();
    let bm = store.load("a").unwrap();
    bm.mark_dirty(0, 4096);
    store.store("a", &bm).unwrap();
    let bytes = store.close().unwrap().into_storage().into_vec();
    let area = HeaderArea::decode(&bytes[..65536]).unwrap();
    let d = area.bitmaps.unwrap().directory_offset as usize;
    let table = be64(&bytes, d);
    let data = be64(&bytes, table as usize) & 0x00ff_ffff_ffff_fe00;
    assert!(data != 0 && data < bytes.len() as u64, "{data:#x}");
    (bytes, d, table, data)
}

/// Storage in memory whose `len()` reports `len` (zeros past the real bytes, as a sparse
/// file reads), recording the largest single read.
#[derive(Debug)]
struct Sparse {
    inner: dirty_bitmap::storage::MemStorage,
    len: u64,
    max_read: std::sync::atomic::AtomicU64,
}

use dirty_bitmap::storage::Storage;

impl Storage for Sparse {
    fn len(&self) -> dirty_bitmap::Result<u64> {
        Ok(self.len)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> dirty_bitmap::Result<()> {
        self.max_read
            .fetch_max(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        buf.fill(0);
        let real = self.inner.len()?;
        if offset < real {
            let n = ((real - offset) as usize).min(buf.len());
            self.inner.read_exact_at(&mut buf[..n], offset)?;
        }
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> dirty_bitmap::Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn set_len(&self, new_len: u64) -> dirty_bitmap::Result<()> {
        self.inner.set_len(new_len)
    }
    fn sync_data(&self) -> dirty_bitmap::Result<()> {
        Ok(())
    }
}

/// `-r leaks` reads a broken entry's table only as far as any QEMU table can reach
/// (`BME_MAX_TABLE_SIZE` entries), in chunks. Read whole, however large its `table_size`
/// (u32::MAX: 32 GiB, in a file whose size allows it), with its clusters claimed one hash
/// entry each, a failed allocation, ignored, would have the data the table names freed as
/// leaked. The repair ends, no read is above 8 MiB, and the data cluster the table names is
/// kept.
#[test]
fn a_broken_table_of_u32_max_entries_is_read_in_bounded_chunks() {
    let (mut bytes, d, table, data) = one_bitmap_in_memory();
    bytes[d + 8..d + 12].copy_from_slice(&u32::MAX.to_be_bytes());
    let storage = Sparse {
        inner: dirty_bitmap::storage::MemStorage::from_bytes(bytes),
        len: 40 << 30,
        max_read: Default::default(),
    };
    let (image, report) =
        dirty_bitmap::store::repair::repair(storage, dirty_bitmap::store::repair::Repair::Leaks)
            .unwrap();
    let max = image
        .storage()
        .max_read
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(max <= 8 << 20, "a read of {max} bytes");
    // The table's cluster and the data cluster it names: leaked for the check (QEMU
    // refuses the entry), owned for all that.
    assert_eq!(
        (report.leaks_freed, report.leaks_kept),
        (0, 2),
        "table {table:#x}, data {data:#x}: {report:?}"
    );
}

/// A broken table running past the end of the file fails a whole read, which must not make
/// `-r leaks` free the data clusters its in-file part names. The in-file part is read and
/// what it names kept; QEMU's check agrees nothing was freed that the entry names.
#[test]
fn a_broken_table_partly_past_the_end_still_protects_its_data() {
    let (mut bytes, d, table, data) = one_bitmap_in_memory();
    // Eight bytes past the end of the file.
    let entries = (bytes.len() as u64 - table) / 8 + 1;
    bytes[d + 8..d + 12].copy_from_slice(&u32::try_from(entries).unwrap().to_be_bytes());
    let (image, report) = dirty_bitmap::store::repair::repair(
        dirty_bitmap::storage::MemStorage::from_bytes(bytes),
        dirty_bitmap::store::repair::Repair::Leaks,
    )
    .unwrap();
    // The table's first cluster and the data cluster: leaked for the check (QEMU refuses
    // the entry), owned for all that.
    assert_eq!(
        (report.leaks_freed, report.leaks_kept),
        (0, 2),
        "table {table:#x}, data {data:#x}: {report:?}"
    );
    // The data cluster keeps its refcount: the check still finds it leaked.
    let check = image.check().unwrap();
    let leaked = format!("Leaked cluster {} refcount=1", data / 65536);
    assert!(
        check.messages.iter().any(|m| m.starts_with(&leaked)),
        "{:?}",
        check.messages
    );
}

/// A leak repair lowers the refcount of a live refcount block (on disk 2, one reference) to
/// its one reference (never to 0), as `qemu-img check -r leaks` repairs it: refusing would
/// make `-r all` fail after it had already removed a broken bitmap, saying nothing of the
/// removal.
#[test]
fn a_leaked_reference_to_a_refcount_block_is_repaired_beside_a_removal() {
    let dir = tempfile::tempdir().unwrap();
    let (img, d) = base(dir.path());
    let mut b = std::fs::read(&img).unwrap();
    let area = HeaderArea::decode(&b[..65536]).unwrap();
    let block = be64(&b, area.header.refcount_table_offset as usize) as usize;
    let at = block + 2 * (block / 65536);
    assert_eq!(u16::from_be_bytes([b[at], b[at + 1]]), 1);
    b[at + 1] = 2;
    // Bitmap a: a reserved flag bit, which QEMU refuses.
    b[d + 15] |= 0x20;
    std::fs::write(&img, &b).unwrap();
    let out = dbm(&["check", "-r", "all", p(&img)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("Removed bitmap a"), "{err}");
    // The block's leaked reference among them.
    assert!(err.contains("Repaired 2 leaked clusters"), "{err}");
    assert_qemu_clean(&img);
}

/// Bits 9-55 of a bitmap table entry: its data cluster's offset.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// The byte offset of the refcount of cluster `c` in an image of one refcount block with
/// 16-bit refcounts (QEMU's default and `BitmapStore::create`'s).
fn rc_at(b: &[u8], c: u64) -> usize {
    let area = HeaderArea::decode(&b[..65536]).unwrap();
    assert_eq!(area.header.refcount_order, 4);
    let block = be64(b, area.header.refcount_table_offset as usize) as usize;
    assert!(c < 32768, "cluster {c} past the first refcount block");
    block + 2 * c as usize
}

fn set_rc(b: &mut [u8], c: u64, v: u16) {
    let at = rc_at(b, c);
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn rc(b: &[u8], c: u64) -> u16 {
    let at = rc_at(b, c);
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Raises to 1 (a leak) the refcount of every cluster below `c` that has none, so that
/// `c`, once its refcount is 0, is the first cluster a first-fit allocator hands out.
fn leak_free_clusters_below(b: &mut [u8], c: u64) {
    for k in 1..c {
        if rc(b, k) == 0 {
            set_rc(b, k, 1);
        }
    }
}

/// Storage in memory that records where each write lands.
#[derive(Debug)]
struct Recording {
    inner: dirty_bitmap::storage::MemStorage,
    writes: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl Storage for Recording {
    fn len(&self) -> dirty_bitmap::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> dirty_bitmap::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> dirty_bitmap::Result<()> {
        self.writes.lock().unwrap().push((offset, buf.len() as u64));
        self.inner.write_all_at(buf, offset)
    }
    fn set_len(&self, new_len: u64) -> dirty_bitmap::Result<()> {
        self.inner.set_len(new_len)
    }
    fn sync_data(&self) -> dirty_bitmap::Result<()> {
        Ok(())
    }
}

/// An image of one 64 MiB disk (64 KiB clusters) in memory with bitmaps "a" (empty) and
/// "b" (one bit set): its bytes, its directory's offset (entries of 32 bytes) and b's data
/// cluster.
fn two_bitmaps_in_memory() -> (Vec<u8>, usize, u64) {
    use dirty_bitmap::storage::MemStorage;
    use dirty_bitmap::{BitmapStore, Recording as Rec};
    let mut store = BitmapStore::create(MemStorage::new(), 64 << 20, 65536).unwrap();
    store.add("a", 65536, Rec::Enabled).unwrap();
    store.add("b", 65536, Rec::Enabled).unwrap();
    let bm = store.load("b").unwrap();
    bm.mark_dirty(3 << 20, 4096);
    store.store("b", &bm).unwrap();
    let bytes = store.close().unwrap().into_storage().into_vec();
    let area = HeaderArea::decode(&bytes[..65536]).unwrap();
    let d = area.bitmaps.unwrap().directory_offset as usize;
    let table = be64(&bytes, d + 32) as usize;
    let data = be64(&bytes, table) & TABLE_OFFSET_MASK;
    assert!(data != 0 && data < bytes.len() as u64, "{data:#x}");
    (bytes, d, data)
}

/// `-r all` allocates its new directory first fit among the clusters of refcount 0, so it
/// first raises to its one reference the refcount of every cluster a kept bitmap owns, as
/// `qemu-img check -r all` repairs a refcount below its references: otherwise a kept bitmap
/// whose data cluster had refcount 0 would have the new directory written over its bits (it
/// stays in the directory, consistent, and loads the directory's bytes). Nothing (new
/// directory, the kept bitmaps' all-ones tables) is written into that cluster, which the
/// old directory's bitmap owns until the commit point, and QEMU's check finds the image
/// clean.
#[test]
fn repair_all_never_allocates_over_a_kept_bitmaps_cluster_at_refcount_0() {
    let dir = tempfile::tempdir().unwrap();
    let (img, d) = base(dir.path());
    let i = p(&img);
    let mut b = std::fs::read(&img).unwrap();
    let table = be64(&b, d + 32) as usize;
    let data = be64(&b, table) & TABLE_OFFSET_MASK;
    assert!(data != 0, "b has no data cluster");
    let c = data / 65536;
    leak_free_clusters_below(&mut b, c);
    assert_eq!(rc(&b, c), 1);
    set_rc(&mut b, c, 0);
    // Bitmap a: a reserved flag bit, which QEMU refuses.
    b[d + 15] |= 0x20;
    std::fs::write(&img, &b).unwrap();
    let storage = Recording {
        inner: dirty_bitmap::storage::MemStorage::from_bytes(b),
        writes: Default::default(),
    };
    let (image, report) =
        dirty_bitmap::store::repair::repair(storage, dirty_bitmap::store::repair::Repair::All)
            .unwrap();
    assert_eq!(report.removed.len(), 1, "{report:?}");
    let writes = image.storage().writes.lock().unwrap().clone();
    let (lo, hi) = (c * 65536, (c + 1) * 65536);
    assert!(
        !writes.iter().any(|&(o, n)| o < hi && o + n > lo),
        "a write into b's data cluster at {lo:#x}: {writes:x?}"
    );
    let out = dbm(&["check", "-r", "all", i]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{err}{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains("Removed bitmap a"), "{err}");
    assert_qemu_clean(&img);
    let listed: Vec<String> = common::qemu::qemu_bitmaps(&img)
        .into_iter()
        .map(|t| t.0)
        .collect();
    assert_eq!(listed, ["b", "c"]);
    for n in ["b", "c"] {
        assert_eq!(nbd_dirty(&img, n), [(0, 64 << 20)], "bitmap {n}");
    }
}

/// The same for the old directory: at refcount 0 it was the first free cluster, and the
/// new directory was written over it before the header named the new one, so a crash
/// before the commit point left the header naming a directory of other entries. Nothing is
/// written into the old directory's clusters now.
#[test]
fn repair_all_never_writes_the_new_directory_over_the_old_one() {
    let (mut b, d, _) = two_bitmaps_in_memory();
    let c = d as u64 / 65536;
    leak_free_clusters_below(&mut b, c);
    set_rc(&mut b, c, 0);
    b[d + 15] |= 0x20;
    let storage = Recording {
        inner: dirty_bitmap::storage::MemStorage::from_bytes(b),
        writes: Default::default(),
    };
    let (image, report) =
        dirty_bitmap::store::repair::repair(storage, dirty_bitmap::store::repair::Repair::All)
            .unwrap();
    assert_eq!(report.removed.len(), 1, "{report:?}");
    let writes = image.storage().writes.lock().unwrap().clone();
    let (lo, hi) = (c * 65536, (c + 1) * 65536);
    assert!(
        !writes.iter().any(|&(o, n)| o < hi && o + n > lo),
        "a write into the old directory at {lo:#x}: {writes:x?}"
    );
    let check = image.check().unwrap();
    assert!(check.is_clean(), "{:?}", check.messages);
}

/// A kept bitmap whose data cluster lies past the end of the file: QEMU reads zeros there
/// (its bits lost, a false clean), and the allocator, to which clusters past the end are
/// free, put the new directory on it. `-r all` now removes it as broken.
#[test]
fn repair_all_removes_a_bitmap_whose_data_lies_past_the_end() {
    let (mut b, d, _) = two_bitmaps_in_memory();
    let end = b.len() as u64;
    assert_eq!(end % 65536, 0);
    leak_free_clusters_below(&mut b, end / 65536);
    let table = be64(&b, d + 32) as usize;
    let flags = be64(&b, table) & !TABLE_OFFSET_MASK;
    b[table..table + 8].copy_from_slice(&(end | flags).to_be_bytes());
    b[d + 15] |= 0x20;
    let (image, report) = dirty_bitmap::store::repair::repair(
        dirty_bitmap::storage::MemStorage::from_bytes(b),
        dirty_bitmap::store::repair::Repair::All,
    )
    .unwrap();
    let removed: Vec<String> = report.removed.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(removed, ["a", "b"], "{report:?}");
    let check = image.check().unwrap();
    assert!(check.is_clean(), "{:?}", check.messages);
}

/// A leaked refcount (2 for one reference) on a valid bitmap's data cluster is lowered:
/// protecting every cluster a bitmap owns, broken or not, `-r leaks` would exit 3 ("Kept 1
/// leaked clusters a bitmap entry may own") though nothing is broken, and every later write
/// would refuse the shared-looking cluster. A cluster only a kept bitmap owns is lowered to
/// its one reference, as `qemu-img check -r leaks` does.
#[test]
fn repair_leaks_lowers_a_leaked_refcount_of_a_valid_bitmaps_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (img, d) = base(dir.path());
    let i = p(&img);
    let before_c = nbd_dirty(&img, "c");
    let mut b = std::fs::read(&img).unwrap();
    let table = be64(&b, d + 32) as usize;
    let data = be64(&b, table) & TABLE_OFFSET_MASK;
    assert!(data != 0, "b has no data cluster");
    assert_eq!(rc(&b, data / 65536), 1);
    set_rc(&mut b, data / 65536, 2);
    std::fs::write(&img, &b).unwrap();
    assert_eq!(run("qemu-img", &["check", i]).status.code(), Some(3));
    let out = dbm(&["check", "-r", "leaks", i]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("Repaired 1 leaked clusters"), "{err}");
    assert_qemu_clean(&img);
    let out = dbm(&["bitmap", i, "--remove", "b"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_qemu_clean(&img);
    assert_eq!(nbd_dirty(&img, "c"), before_c);
}

/// A bitmap in use whose table QEMU cannot load (QEMU never reads it, and opens the image;
/// its check counts the table as corrupt) does not survive `-r all`, or every later write's
/// check would refuse the image for good; and a table lying past the end of the file does
/// not make `-r leaks` or `-r all` fail outright. `-r all` removes it, and leaves the kept
/// bitmaps all dirty (in use, it may have held writes they lack); `-r leaks` keeps what it
/// may own.
#[test]
fn repair_all_removes_a_bitmap_in_use_whose_table_cannot_be_loaded() {
    type Edit = fn(&mut Vec<u8>, usize);
    let cases: Vec<(&str, Edit)> = vec![
        ("reserved bits in a table entry", |b, d| {
            let t = be64(b, d + 64) as usize;
            b[t + 7] |= 0x02;
        }),
        ("a table past the end of the file", |b, d| {
            let end = (b.len() as u64).div_ceil(65536) * 65536;
            b[d + 64..d + 72].copy_from_slice(&end.to_be_bytes());
        }),
    ];
    for (case, edit) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (img, d) = base(dir.path());
        let i = p(&img);
        let mut b = std::fs::read(&img).unwrap();
        // Bitmap c in use, as a QEMU that died leaves it.
        b[d + 64 + 15] |= 0x01;
        edit(&mut b, d);
        std::fs::write(&img, &b).unwrap();
        let out = dbm(&["check", "-r", "leaks", i]);
        let err = String::from_utf8_lossy(&out.stderr);
        // The check after it still finds c's table corrupt (exit 2); it does not fail.
        assert_eq!(out.status.code(), Some(2), "{case}: {err}");
        let out = dbm(&["check", "-r", "all", i]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{case}: {err}{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(err.contains("Removed bitmap c"), "{case}: {err}");
        assert_qemu_clean(&img);
        let listed: Vec<String> = common::qemu::qemu_bitmaps(&img)
            .into_iter()
            .map(|t| t.0)
            .collect();
        assert_eq!(listed, ["a", "b"], "{case}");
        // In use, c may have held writes b lacks: b comes out all dirty.
        assert_eq!(nbd_dirty(&img, "b"), [(0, 64 << 20)], "{case}");
        let out = dbm(&["bitmap", i, "--remove", "a"]);
        assert!(
            out.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// [`two_bitmaps_in_memory`] with both bitmaps broken: "a" names its table cluster as its
/// data (refcount 2), "b" has a reserved flag set. Its bytes and a's table offset.
fn both_bitmaps_broken() -> (Vec<u8>, u64) {
    let (mut b, d, _) = two_bitmaps_in_memory();
    let table = be64(&b, d + 32);
    let t = table as usize;
    let flags = be64(&b, t) & !TABLE_OFFSET_MASK;
    b[t..t + 8].copy_from_slice(&(table | flags).to_be_bytes());
    set_rc(&mut b, table / 65536, 2);
    b[d + 15] |= 0x20;
    (b, table)
}

/// `b` in memory, its `n`-th read failing with `EIO`.
fn failing_read(
    b: &[u8],
    n: u64,
) -> dirty_bitmap::storage::FaultStorage<dirty_bitmap::storage::MemStorage> {
    use dirty_bitmap::storage::{FaultPlan, FaultStorage, MemStorage, Trigger};
    FaultStorage::new(
        MemStorage::from_bytes(b.to_vec()),
        FaultPlan::new().fail_read(Trigger::Nth(n)),
    )
}

/// A cluster a bitmap names twice (here its table's own cluster as its data, which QEMU
/// loads) has two references. A leak repair lowers a kept bitmap's cluster to one
/// reference when a broken entry hides the directory from the walk, which would leave
/// this one below its references; such a bitmap is not kept: `-r leaks` leaves its
/// refcount alone and `-r all` removes it.
#[test]
fn a_bitmap_naming_one_cluster_twice_is_not_kept() {
    use dirty_bitmap::store::repair::{repair, Repair};
    let (b, table) = both_bitmaps_broken();
    let mem = dirty_bitmap::storage::MemStorage::from_bytes;
    let (image, _) = repair(mem(b.clone()), Repair::Leaks).unwrap();
    let after = image.into_storage().into_vec();
    assert_eq!(rc(&after, table / 65536), 2, "-r leaks lowered it");
    let (image, report) = repair(mem(b), Repair::All).unwrap();
    let removed: Vec<String> = report.removed.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(removed, ["a", "b"], "{report:?}");
    let check = image.check().unwrap();
    assert!(check.is_clean(), "{:?}", check.messages);
}

/// `-r all` raises to 1 more than the refcount-0 clusters of the bitmaps it keeps and of
/// the old directory. A bitmap it removes though QEMU loads it (here "b", which names its
/// table cluster as data: QEMU does not check that) is in force until the header commit,
/// and its table cluster at refcount 0 must not take the new directory: a crash before the
/// header would leave "b" loading the directory's bytes. Nothing may be written into that
/// cluster.
#[test]
fn repair_all_never_writes_over_a_removed_bitmap_before_its_commit() {
    let (mut b, d, _) = two_bitmaps_in_memory();
    let table = be64(&b, d + 32);
    let t = table as usize;
    let flags = be64(&b, t) & !TABLE_OFFSET_MASK;
    b[t..t + 8].copy_from_slice(&(table | flags).to_be_bytes());
    let c = table / 65536;
    leak_free_clusters_below(&mut b, c);
    set_rc(&mut b, c, 0);
    let storage = Recording {
        inner: dirty_bitmap::storage::MemStorage::from_bytes(b),
        writes: Default::default(),
    };
    let (image, report) =
        dirty_bitmap::store::repair::repair(storage, dirty_bitmap::store::repair::Repair::All)
            .unwrap();
    let removed: Vec<String> = report.removed.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(removed, ["b"], "{report:?}");
    let writes = image.storage().writes.lock().unwrap().clone();
    let (lo, hi) = (c * 65536, (c + 1) * 65536);
    assert!(
        !writes.iter().any(|&(o, n)| o < hi && o + n > lo),
        "a write into the removed bitmap's cluster at {lo:#x}: {writes:x?}"
    );
    let check = image.check().unwrap();
    assert!(check.is_clean(), "{:?}", check.messages);
}

/// The byte offset of the bitmaps extension's frame in cluster 0 of `b`.
fn bitmaps_extension(b: &[u8]) -> usize {
    (0..65536 - 12)
        .find(|&k| b[k..k + 4] == [0x23, 0x85, 0x28, 0x75])
        .expect("the bitmaps extension")
}

/// An image whose bitmaps extension's own fields QEMU refuses (`qemu-img info` and `check`
/// fail: "found bitmaps extension with zero bitmaps", "Reserved field is not zero") is not
/// judged with the extension merely untrusted in memory: `dbm check` would fail to open it
/// (status 1, not the documented 2), `-r leaks`, which leaves the extension on disk, would
/// call it "no harm to data" (status 3), and with an extension naming no clusters say "No
/// errors were found" (status 0). Each counts the extension as a corruption (status 2, the
/// problem named) until `-r all` drops it.
#[test]
fn an_extension_qemu_refuses_is_a_corruption_with_and_without_repair() {
    // (case, the edit of the bitmaps extension's data at `x`, words of the finding)
    type Edit = fn(&mut [u8], usize);
    let cases: [(&str, Edit, &str); 2] = [
        ("nb_bitmaps 0", |b, x| b[x..x + 4].fill(0), "nb_bitmaps 0"),
        (
            "a reserved field",
            |b, x| b[x + 7] = 1,
            "reserved field is 0x1",
        ),
    ];
    for (case, edit, words) in cases {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("i.qcow2");
        let i = p(&img);
        assert!(dbm(&["create", i, "--size", "1G"]).status.success());
        assert!(dbm(&["bitmap", i, "b", "--add"]).status.success());
        let mut bytes = std::fs::read(&img).unwrap();
        let x = bitmaps_extension(&bytes) + 8;
        edit(&mut bytes, x);
        std::fs::write(&img, &bytes).unwrap();
        assert_refused_until_repair_all(case, &img, &bytes, words);
    }
    // An extension naming no clusters at all (count, size and offset 0) added to an image
    // without bitmaps: nothing leaks, and the only finding is the extension.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("i.qcow2");
    let i = p(&img);
    assert!(dbm(&["create", i, "--size", "1G"]).status.success());
    let mut bytes = std::fs::read(&img).unwrap();
    let header_len = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    let mut end = header_len;
    while bytes[end..end + 4] != [0; 4] {
        let len = u32::from_be_bytes(bytes[end + 4..end + 8].try_into().unwrap()) as usize;
        end += 8 + len.div_ceil(8) * 8;
    }
    bytes[end..end + 8].copy_from_slice(&[0x23, 0x85, 0x28, 0x75, 0, 0, 0, 24]);
    bytes[end + 8..end + 40].fill(0);
    bytes[95] |= 1;
    std::fs::write(&img, &bytes).unwrap();
    assert_eq!(run("qemu-img", &["check", i]).status.code(), Some(1));
    assert_refused_until_repair_all("no clusters", &img, &bytes, "nb_bitmaps 0");
}

/// QEMU refuses `img` (whose bytes are `bytes`); `dbm check`, plain, in JSON and after
/// `-r leaks`, exits 2 naming `words` and writes nothing; `-r all` drops the extension, and
/// QEMU opens the image and finds it clean.
fn assert_refused_until_repair_all(case: &str, img: &Path, bytes: &[u8], words: &str) {
    let i = p(img);
    let q = run("qemu-img", &["info", i]);
    assert!(!q.status.success(), "{case}: qemu-img info opened it");
    for args in [
        &["check", i][..],
        &["check", "--output", "json", i],
        &["check", "-r", "leaks", i],
    ] {
        let out = dbm(args);
        let (so, se) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(2), "{case}: {args:?}:\n{so}{se}");
        assert!(se.contains(words), "{case}: {args:?}: {se}");
        assert!(
            !so.contains("No errors were found"),
            "{case}: {args:?}: {so}"
        );
        assert!(
            std::fs::read(img).unwrap() == bytes,
            "{case}: {args:?} changed the image"
        );
    }
    let out = dbm(&["check", "-r", "all", i]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{case}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok("qemu-img", &["info", i]);
    assert_qemu_clean(img);
}

/// `-r all` that removes a broken later checkpoint does not keep the older one with its
/// bits as they are: "since X" (X and every other bitmap still in the image) would lose the
/// removed bitmap's writes, a false clean. Checkpoint X, then C (X disabled, C recording);
/// a write only in C; a reserved bit in C's table, which QEMU refuses. `-r all` removes C
/// and leaves X all dirty in the same commit: "since X" is a full backup, QEMU finds the
/// image clean and exports X with every bit set.
#[test]
fn repair_all_leaves_the_kept_bitmaps_all_dirty_when_it_removes_one() {
    use dirty_bitmap::storage::FileStorage;
    use dirty_bitmap::{BitmapStore, OpenMode};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("k.qcow2");
    let i = p(&img);
    let disk = 64u64 << 20;
    let g = 40u64 << 20;
    let mut st = BitmapStore::create(FileStorage::create(&img).unwrap(), disk, 65536).unwrap();
    assert_eq!(st.checkpoint("X").unwrap(), None);
    let x = st.load("X").unwrap();
    x.mark_dirty(1 << 20, 4096);
    st.store("X", &x).unwrap();
    assert_eq!(st.checkpoint("C").unwrap().unwrap().to_string(), "X");
    let c = st.load("C").unwrap();
    c.mark_dirty(g, 4096);
    st.store("C", &c).unwrap();
    st.close().unwrap();
    let mut b = std::fs::read(&img).unwrap();
    let area = HeaderArea::decode(&b[..65536]).unwrap();
    let d = area.bitmaps.unwrap().directory_offset as usize;
    // Entries of 32 bytes (one-byte names): X, then C.
    assert_eq!(b[d + 24], b'X');
    assert_eq!(b[d + 32 + 24], b'C');
    let t = be64(&b, d + 32) as usize;
    assert_ne!(be64(&b, t) & TABLE_OFFSET_MASK, 0, "C has no data cluster");
    b[t + 7] |= 0x02;
    std::fs::write(&img, &b).unwrap();
    assert!(!run("qemu-img", &["info", i]).status.success());
    let out = dbm(&["check", "-r", "all", i]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{err}{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains("Removed bitmap C"), "{err}");
    assert!(
        err.contains("Made bitmap X all dirty: a removed bitmap may have held writes it lacks"),
        "{err}"
    );
    assert_qemu_clean(&img);
    let listed: Vec<String> = common::qemu::qemu_bitmaps(&img)
        .into_iter()
        .map(|t| t.0)
        .collect();
    assert_eq!(listed, ["X"]);
    assert_eq!(nbd_dirty(&img, "X"), [(0, disk)]);
    let st = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let since = st.changed_since("X").unwrap();
    assert!(
        since.is_dirty(g),
        "the write only C held reads clean since X"
    );
    assert_eq!(since.dirty_extents().collect::<Vec<_>>(), [(0, disk)]);
    drop(st);
    // Nothing left to repair: the old table and data were freed by the commit.
    let out = dbm(&["check", "-r", "all", i]);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "Nothing to repair\n");
}

/// A crash at every point of the repair that removes checkpoint C (unsynced writes
/// dropped, kept or torn) leaves the damaged directory (C still there, X with its bits) or
/// the repaired one (X alone, all dirty), never X with its bits and C gone: a repair of the
/// crash image, then "since X", holds the write only C had, and the image checks clean.
#[test]
fn a_crash_anywhere_in_the_repair_never_leaves_a_false_clean() {
    use dirty_bitmap::storage::{CrashStorage, MemStorage};
    use dirty_bitmap::store::repair::{repair, Repair};
    use dirty_bitmap::{BitmapStore, OpenMode};
    let g = 40u64 << 20;
    let mut st = BitmapStore::create(MemStorage::new(), 64 << 20, 65536).unwrap();
    st.checkpoint("X").unwrap();
    st.checkpoint("C").unwrap();
    let c = st.load("C").unwrap();
    c.mark_dirty(g, 4096);
    st.store("C", &c).unwrap();
    let mut b = st.close().unwrap().into_storage().into_vec();
    let area = HeaderArea::decode(&b[..65536]).unwrap();
    let d = area.bitmaps.unwrap().directory_offset as usize;
    assert_eq!(b[d + 32 + 24], b'C');
    let t = be64(&b, d + 32) as usize;
    b[t + 7] |= 0x02;
    let crash = CrashStorage::from_bytes(b);
    let (_, report) = repair(&crash, Repair::All).unwrap();
    assert_eq!(report.made_all_dirty.len(), 1, "{report:?}");
    let mut seen = std::collections::BTreeSet::new();
    for mode in common::CRASH_MODES {
        for (point, image) in crash.crash_images(mode) {
            let (image, report) = repair(MemStorage::from_bytes(image), Repair::All)
                .unwrap_or_else(|e| panic!("point {point} {mode:?}: {e}"));
            seen.insert(report.removed.len());
            let check = image.check().unwrap();
            assert!(
                check.is_clean(),
                "point {point} {mode:?}: {:?}",
                check.messages
            );
            let st = BitmapStore::open(image.into_storage(), OpenMode::ReadOnly).unwrap();
            let names: Vec<String> = st.list().iter().map(|b| b.name.to_string()).collect();
            assert_eq!(names, ["X"], "point {point} {mode:?}");
            assert!(
                st.changed_since("X").unwrap().is_dirty(g),
                "point {point} {mode:?}: the write only C held reads clean since X"
            );
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "both the old and the repaired directory must be reachable: {seen:?}"
    );
}

/// The header area of the image `bytes` (whose cluster 0 is `cs` bytes), the byte offset
/// of its bitmap directory, that directory's bytes, its entries and the image's geometry.
fn directory_of(
    bytes: &[u8],
    cs: usize,
) -> (
    HeaderArea,
    usize,
    Vec<u8>,
    Vec<dirty_bitmap::format::DirEntry>,
    dirty_bitmap::format::ImageGeometry,
) {
    let area = HeaderArea::decode(&bytes[..cs]).unwrap();
    let ext = area.bitmaps.unwrap();
    let geo = area.header.geometry().unwrap();
    let d = ext.directory_offset as usize;
    let dir = bytes[d..d + ext.directory_size as usize].to_vec();
    let entries = dirty_bitmap::format::decode_directory(&dir, ext.nb_bitmaps, &geo).unwrap();
    (area, d, dir, entries, geo)
}

/// Triage (which `dbm info` and `repair` run on an image QEMU refuses) reads each table
/// once: read and decoded per entry, 65,534 entries naming one 2 MiB table would cost 128
/// GiB of reads from a file of a few MiB. Fifty entries naming one table cost at least 49
/// reads fewer than fifty entries with a table each.
#[test]
fn triage_reads_a_table_many_entries_name_once() {
    use dirty_bitmap::format::encode_directory;
    use dirty_bitmap::storage::{FaultPlan, FaultStorage, MemStorage, OpenMode};
    use dirty_bitmap::store::triage::triage_bitmaps;
    use dirty_bitmap::{BitmapStore, Image, Recording};
    let mut st = BitmapStore::create(MemStorage::new(), 64 << 20, 65536).unwrap();
    for i in 0..50 {
        st.add(&format!("b{i:02}"), 65536, Recording::Disabled)
            .unwrap();
    }
    let own_tables = st.image().storage().to_vec();
    drop(st);
    let (_, d, dir, mut entries, geo) = directory_of(&own_tables, 65536);
    let shared = entries[0].table_offset;
    for e in &mut entries {
        e.table_offset = shared;
    }
    let new = encode_directory(&entries, &geo).unwrap();
    assert_eq!(new.len(), dir.len());
    let mut one_table = own_tables.clone();
    one_table[d..d + new.len()].copy_from_slice(&new);
    let reads = |bytes: Vec<u8>| {
        let (image, _) = Image::open_untrusting_bitmaps(
            FaultStorage::new(MemStorage::from_bytes(bytes), FaultPlan::new()),
            OpenMode::ReadOnly,
        )
        .unwrap();
        let before = image.storage().reads();
        let t = triage_bitmaps(&image).unwrap().expect("a directory");
        assert_eq!(t.bitmaps.len(), 50);
        image.storage().reads() - before
    };
    let (one, own) = (reads(one_table), reads(own_tables));
    assert!(
        own >= 50 && one + 49 <= own,
        "reads: {one} for one shared table, {own} for fifty"
    );
}

/// Repair remembers the table of an entry it rejected, not only those of the entries it
/// keeps: otherwise every entry naming that table would read and decode the whole table
/// again (65,535 in-use entries naming one 8 MiB table with a reserved bit: 512 GiB of
/// reads from a file of about 10 MiB). Fifty entries naming one broken table cost no more
/// reads than two, and each is rejected for the same reason.
#[test]
fn repair_reads_a_rejected_table_many_entries_name_once() {
    use dirty_bitmap::format::encode_directory;
    use dirty_bitmap::storage::{FaultPlan, FaultStorage, MemStorage};
    use dirty_bitmap::store::repair::{repair, Repair};
    use dirty_bitmap::{BitmapStore, Recording};
    let build = |n: usize| -> Vec<u8> {
        let mut st = BitmapStore::create(MemStorage::new(), 64 << 20, 65536).unwrap();
        for i in 0..n {
            st.add(&format!("b{i:02}"), 65536, Recording::Disabled)
                .unwrap();
        }
        let bytes = st.image().storage().to_vec();
        drop(st);
        let (_, d, dir, mut entries, geo) = directory_of(&bytes, 65536);
        let shared = entries[0].table_offset;
        for e in &mut entries {
            e.table_offset = shared;
            e.in_use = true;
        }
        let new = encode_directory(&entries, &geo).unwrap();
        assert_eq!(new.len(), dir.len());
        let mut out = bytes;
        out[d..d + new.len()].copy_from_slice(&new);
        // A reserved bit in the shared table's first entry: it does not decode.
        out[shared as usize + 7] |= 0x02;
        out
    };
    let reads = |bytes: Vec<u8>| {
        let storage = FaultStorage::new(MemStorage::from_bytes(bytes), FaultPlan::new());
        let (image, report) = repair(storage, Repair::All).unwrap();
        let reasons: Vec<String> = report.removed.iter().map(|(_, why)| why.clone()).collect();
        (image.storage().reads(), reasons)
    };
    let (two, two_why) = reads(build(2));
    let (fifty, fifty_why) = reads(build(50));
    assert_eq!(fifty_why.len(), 50, "{fifty_why:?}");
    assert_eq!(two_why.len(), 2, "{two_why:?}");
    assert!(
        fifty_why.iter().all(|w| w == &fifty_why[0]),
        "{fifty_why:?}"
    );
    assert!(
        fifty < two + 10,
        "reads: {fifty} for fifty entries naming the table, {two} for two"
    );
}

/// Found by the same review: an in-use entry's table size is not checked at open (QEMU
/// reads no in-use table), and a preload read such a table whole before it compared its
/// size with the disk's (up to 8 MiB an entry, for each of up to 65,535 entries). The size
/// is compared first: a wrong one is never read, and that bitmap is left out.
#[test]
fn a_preload_reads_no_table_of_the_wrong_size() {
    use dirty_bitmap::format::encode_directory;
    use dirty_bitmap::storage::{FaultPlan, FaultStorage, MemStorage, OpenMode};
    use dirty_bitmap::{BitmapStore, Recording};
    let mut st = BitmapStore::create(MemStorage::new(), 64 << 20, 512).unwrap();
    st.add("a", 512, Recording::Enabled).unwrap();
    st.add("b", 512, Recording::Enabled).unwrap();
    st.activate().unwrap();
    // Both in use on disk, their tables all zeros (no data cluster to read).
    let right = st.image().storage().to_vec();
    drop(st);
    let (_, d, _, mut entries, geo) = directory_of(&right, 512);
    assert!(entries.iter().all(|e| e.in_use));
    // "b"'s table said to be 16 times its size, with room in the file for a read of it.
    let size = entries[1].table_size;
    entries[1].table_size = size * 16;
    let new = encode_directory(&entries, &geo).unwrap();
    let mut wrong = right.clone();
    wrong[d..d + new.len()].copy_from_slice(&new);
    wrong.resize(wrong.len() + size as usize * 16 * 8, 0);
    let preload = |bytes: Vec<u8>| {
        let s = BitmapStore::open(
            FaultStorage::new(MemStorage::from_bytes(bytes), FaultPlan::new()),
            OpenMode::ReadOnly,
        )
        .unwrap();
        let before = s.image().storage().reads();
        let held = s.preload().unwrap().len();
        (s.image().storage().reads() - before, held)
    };
    let (right_reads, right_held) = preload(right);
    let (wrong_reads, wrong_held) = preload(wrong);
    assert_eq!((right_held, wrong_held), (2, 1));
    assert!(
        wrong_reads < right_reads,
        "{wrong_reads} reads with b's table of the wrong size, {right_reads} with it right: \
         the wrong-size table was read"
    );
}

/// The check's walk (every writing operation's preflight, `dbm check`, repair) and triage
/// read each distinct table offset once, but tables named at offsets a cluster apart
/// overlap, and each would be read whole: 65,535 entries with 8 MiB tables a cluster apart
/// would read 512 GiB from an 11 MiB file. Tables whose lengths inside the file add up to
/// more than the file are refused with a typed error before any is read: here 64 entries
/// whose 128 KiB tables (each the exact size QEMU requires) start 4 KiB apart, 8 MiB named
/// in a file of about 1.2 MiB.
#[test]
fn tables_overlapping_beyond_the_file_are_refused_before_any_is_read() {
    use dirty_bitmap::format::{encode_directory, Corruption};
    use dirty_bitmap::storage::{MemStorage, OpenMode};
    use dirty_bitmap::store::repair::Repair;
    use dirty_bitmap::store::triage::triage_bitmaps;
    use dirty_bitmap::{BitmapStore, Error, Image, Recording};
    let mut st = BitmapStore::create(MemStorage::new(), 256 << 30, 4096).unwrap();
    st.add("a", 512, Recording::Disabled).unwrap();
    let bytes = st.image().storage().to_vec();
    drop(st);
    let (mut area, d, _, mut found, geo) = directory_of(&bytes, 4096);
    let mut ext = area.bitmaps.unwrap();
    let one = found.remove(0);
    assert_eq!(one.table_size, 1 << 14, "a 128 KiB table");
    let entries: Vec<_> = (0..64u64)
        .map(|k| {
            let mut e = one.clone();
            e.name = format!("b{k:02}").into();
            e.table_offset = one.table_offset + k * 4096;
            e
        })
        .collect();
    let new = encode_directory(&entries, &geo).unwrap();
    assert!(new.len() <= 4096, "the directory's cluster holds it");
    let mut hostile = bytes.clone();
    hostile[d..d + new.len()].copy_from_slice(&new);
    ext.nb_bitmaps = 64;
    ext.directory_size = new.len() as u64;
    area.bitmaps = Some(ext);
    let head = area.encode().unwrap();
    hostile[..head.len()].copy_from_slice(&head);
    let file = hostile.len() as u64;
    assert!(file < 3 << 20, "{file}");
    let overlap = |e: &Error| {
        matches!(
            e,
            Error::Corrupt(Corruption::OverlappingTables { bytes, file: f, .. })
                if bytes > f && *f == file
        )
    };
    let image = Image::open(MemStorage::from_bytes(hostile.clone()), OpenMode::ReadOnly).unwrap();
    let r = image.check();
    assert!(r.as_ref().is_err_and(overlap), "check: {r:?}");
    let r = triage_bitmaps(&image);
    assert!(r.as_ref().is_err_and(overlap), "triage: {r:?}");
    drop(image);
    let mut s = BitmapStore::open(MemStorage::from_bytes(hostile.clone()), OpenMode::ReadWrite)
        .expect("the directory is valid");
    let r = s.add("x", 65536, Recording::Disabled);
    assert!(r.as_ref().is_err_and(overlap), "add: {r:?}");
    assert!(s.image().storage().to_vec() == hostile, "the refusal wrote");
    drop(s);
    // The same entries in use: triage reads none of their tables, but a repair reads every
    // entry's (found by the round-2 review: it read each whole).
    let in_use: Vec<_> = entries
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.in_use = true;
            e
        })
        .collect();
    let new = encode_directory(&in_use, &geo).unwrap();
    hostile[d..d + new.len()].copy_from_slice(&new);
    for what in [Repair::Leaks, Repair::All] {
        let storage = MemStorage::from_bytes(hostile.clone());
        let r = dirty_bitmap::store::repair::repair(&storage, what).map(drop);
        assert!(r.as_ref().is_err_and(overlap), "repair {what:?}: {r:?}");
        assert!(storage.to_vec() == hostile, "the refused repair wrote");
    }
}

/// A QEMU that crashed deleting a snapshot (the table written without it, the refcounts not
/// lowered yet) leaves every cluster the snapshot shared at refcount 2, with one reference
/// from the active tables, whose COPIED flags are clear. `-r leaks` and `-r all` must not
/// lower them to 1 and leave the flags clear, which `qemu-img check` calls corrupt ("ERROR
/// OFLAG_COPIED"): a leaks-only image made corrupt, every later write of ours refused by
/// the preflight. They stay at 2 (leaks kept: QEMU's repair sets the flag, which writes
/// guest metadata ours leaves alone); the image is no worse than leaky, for QEMU and for
/// us, and writable.
#[test]
fn repairing_a_lost_snapshots_leaks_never_leaves_a_copied_flag_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sn.qcow2");
    let i = p(&img);
    ok("qemu-img", &["create", "-f", "qcow2", i, "64M"]);
    ok("qemu-io", &["-c", "write -P 7 0 1M", i]);
    ok("qemu-img", &["bitmap", "--add", i, "q1"]);
    ok("qemu-img", &["snapshot", "-c", "s1", i]);
    let mut b = std::fs::read(&img).unwrap();
    // The snapshot table forgotten: nb_snapshots and snapshots_offset zeroed.
    b[60..72].fill(0);
    std::fs::write(&img, &b).unwrap();
    assert_eq!(run("qemu-img", &["check", i]).status.code(), Some(3));
    for mode in ["leaks", "all"] {
        let copy = dir.path().join(format!("{mode}.qcow2"));
        std::fs::write(&copy, &b).unwrap();
        let c = p(&copy);
        let out = dbm(&["check", "-r", mode, c]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(2), "-r {mode}: {err}");
        assert!(
            err.contains("Kept 17 leaked clusters at refcount 2"),
            "-r {mode}: {err}"
        );
        let q = run("qemu-img", &["check", c]);
        assert_eq!(
            q.status.code(),
            Some(3),
            "-r {mode}: {}",
            String::from_utf8_lossy(&q.stdout)
        );
        // Still writable by us, and the guest data is as it was.
        let out = dbm(&["bitmap", "--add", c, "x"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "-r {mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ok("qemu-io", &["-c", "read -P 7 0 1M", c]);
    }
}

/// A 64 MiB image with 1 MiB of guest data and a snapshot "s1" that shares it (made by
/// QEMU's tools), in a directory of its own: the directory, the image, its bytes.
fn snapshotted_image() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sn.qcow2");
    let i = p(&img);
    ok("qemu-img", &["create", "-f", "qcow2", i, "64M"]);
    ok("qemu-io", &["-c", "write -P 7 0 1M", i]);
    ok("qemu-img", &["snapshot", "-c", "s1", i]);
    let b = std::fs::read(&img).unwrap();
    (dir, img, b)
}

/// The image of [`repairing_a_lost_snapshots_leaks_never_leaves_a_copied_flag_wrong`] (17
/// leaks at refcount 2, each with one reference whose COPIED flag is clear) repaired while
/// one read fails: the repair stops with the I/O error, or does what it does with every
/// read (the 17 kept at refcount 2); it never lowers them to 1 and leaves the image
/// corrupt. The leak repair reads the active tables again to find the references without
/// COPIED, and a table whose read fails may name any of them.
#[test]
fn a_failed_read_never_makes_the_leak_repair_leave_a_copied_flag_wrong() {
    use dirty_bitmap::storage::{FaultPlan, FaultStorage, MemStorage};
    use dirty_bitmap::store::repair::{repair, Repair};
    let (_dir, _, mut b) = snapshotted_image();
    b[60..72].fill(0);
    for what in [Repair::Leaks, Repair::All] {
        let clean = FaultStorage::new(MemStorage::from_bytes(b.clone()), FaultPlan::new());
        let (_, sound) = repair(&clean, what).unwrap();
        assert_eq!(sound.leaks_uncopied, 17, "{sound:?}");
        let reads = clean.reads();
        let mut failed = 0;
        for n in 1..=reads {
            let f = failing_read(&b, n);
            match repair(&f, what) {
                Err(dirty_bitmap::Error::Io(_)) => failed += 1,
                Err(e) => panic!("{what:?}, read {n}: {e}"),
                Ok((_, report)) => assert_eq!(report, sound, "{what:?}, read {n}"),
            }
            let after = dirty_bitmap::Image::open(
                MemStorage::from_bytes(f.inner().to_vec()),
                dirty_bitmap::OpenMode::ReadOnly,
            )
            .unwrap();
            let check = after.check().unwrap();
            assert_eq!(
                check.corruptions, 0,
                "{what:?}, read {n}: {:?}",
                check.messages
            );
        }
        assert_eq!(
            failed, reads,
            "{what:?}: every read the repair makes fails it"
        );
    }
}

/// `-r all` commits the removal of broken bitmaps with one header write, then frees the old
/// clusters and repairs leaks. Whatever fails after that header write (a read, a write, a
/// barrier), the error carries the report of the committed removal
/// (`Error::RepairedThenFailed`: which bitmaps went, which were left all dirty); a read or
/// a write that fails before it leaves the image as it was, with a plain I/O error.
#[test]
fn a_failure_after_repair_alls_commit_still_reports_what_was_committed() {
    use dirty_bitmap::storage::{FaultPlan, FaultStorage, Landed, MemStorage, Trigger};
    use dirty_bitmap::store::repair::{repair, Repair};
    use dirty_bitmap::Error;
    let (mut b, _) = both_bitmaps_broken();
    // The directory's cluster at refcount 0: the repair raises it before its commit.
    let d = HeaderArea::decode(&b[..65536])
        .unwrap()
        .bitmaps
        .unwrap()
        .directory_offset;
    set_rc(&mut b, d / 65536, 0);
    // The extension gone (a torn step may leave it untrusted, autoclear bit 0 clear: not
    // the commit, and the bitmaps then read inconsistent).
    let committed = |bytes: &[u8]| {
        let area = HeaderArea::decode(&bytes[..65536]).unwrap();
        area.bitmaps.is_none() && !area.stale_bitmaps
    };
    let clean = FaultStorage::new(MemStorage::from_bytes(b.clone()), FaultPlan::new());
    let (_, sound) = repair(&clean, Repair::All).unwrap();
    assert_eq!(sound.removed.len(), 2, "{sound:?}");
    assert!(sound.refcounts_raised > 0, "{sound:?}");
    let plans = (1..=clean.reads())
        .map(|n| ("read", n, FaultPlan::new().fail_read(Trigger::Nth(n))))
        .chain((1..=clean.writes()).map(|n| {
            let plan = FaultPlan::new().fail_write(Trigger::Nth(n), Landed::Nothing);
            ("write", n, plan)
        }))
        .chain(
            (1..=clean.syncs()).map(|n| ("sync", n, FaultPlan::new().fail_sync(Trigger::Nth(n)))),
        );
    let mut after_commit = std::collections::BTreeMap::new();
    for (op, n, plan) in plans {
        let f = FaultStorage::new(MemStorage::from_bytes(b.clone()), plan);
        let r = repair(&f, Repair::All);
        let done = committed(&f.inner().to_vec());
        match r {
            Err(Error::RepairedThenFailed { committed, error }) => {
                assert!(done, "{op} {n}: not committed");
                assert!(matches!(*error, Error::Io(_)), "{op} {n}: {error}");
                let want = dirty_bitmap::error::RepairCommitted {
                    removed: sound.removed.clone(),
                    extension_dropped: sound.extension_dropped.clone(),
                    made_all_dirty: sound.made_all_dirty.clone(),
                    refcounts_raised: sound.refcounts_raised,
                };
                assert_eq!(*committed, want, "{op} {n}");
                *after_commit.entry(op).or_insert(0) += 1;
            }
            // A barrier that fails right after the header write may or may not have made
            // it durable: the header write's own failure, reported as it is.
            Err(Error::Io(_)) => assert!(!done || op == "sync", "{op} {n}: committed, untold"),
            Err(e) => panic!("{op} {n}: {e}"),
            Ok(_) => panic!("{op} {n} failed and the repair succeeded"),
        }
    }
    for op in ["read", "write", "sync"] {
        assert!(
            after_commit.contains_key(op),
            "no {op} failed after the commit: {after_commit:?}"
        );
    }
}

/// A COPIED flag set on a data cluster a snapshot shares (refcount 2) is a corruption that
/// only the check's second read of the active tables finds: a read that fails there ends
/// the check with the I/O error; it never passes the image as sound, which a writing
/// command would take as leave to write.
#[test]
fn a_failed_read_never_passes_a_wrong_copied_flag() {
    use dirty_bitmap::storage::{FaultPlan, FaultStorage, MemStorage};
    let (_dir, img, mut b) = snapshotted_image();
    let i = p(&img);
    let l1 = be64(&b, 40) as usize;
    let l2 = (be64(&b, l1) & TABLE_OFFSET_MASK) as usize;
    b[l2] |= 0x80;
    std::fs::write(&img, &b).unwrap();
    assert_eq!(run("qemu-img", &["check", i]).status.code(), Some(2));
    let check = |f: &FaultStorage<MemStorage>| {
        dirty_bitmap::Image::open(f, dirty_bitmap::OpenMode::ReadOnly).and_then(|i| i.check())
    };
    let clean = FaultStorage::new(MemStorage::from_bytes(b.clone()), FaultPlan::new());
    let sound = check(&clean).unwrap();
    assert_eq!(sound.corruptions, 1, "{:?}", sound.messages);
    let mut failed = 0;
    for n in 1..=clean.reads() {
        match check(&failing_read(&b, n)) {
            Err(dirty_bitmap::Error::Io(_)) => failed += 1,
            Err(e) => panic!("read {n}: {e}"),
            Ok(r) => assert_eq!(r.corruptions, 1, "read {n}: {:?}", r.messages),
        }
    }
    assert_eq!(failed, clean.reads(), "every read the check makes fails it");
}

/// An image whose bitmaps extension is untrusted (autoclear bit 0 clear: a writer that did
/// not know it) still lists its bitmaps, all inconsistent. A read of that directory that
/// fails fails the open: a store that listed no bitmap would have a commit drop them
/// without naming one.
#[test]
fn a_failed_read_never_hides_the_bitmaps_of_an_untrusted_extension() {
    use dirty_bitmap::storage::{FaultPlan, FaultStorage, MemStorage};
    use dirty_bitmap::{BitmapStore, OpenMode};
    let (mut b, _, _) = two_bitmaps_in_memory();
    b[95] &= !1;
    let clean = FaultStorage::new(MemStorage::from_bytes(b.clone()), FaultPlan::new());
    let listed = |f: &FaultStorage<MemStorage>| {
        BitmapStore::open(f, OpenMode::ReadOnly).map(|st| st.list().len())
    };
    assert_eq!(listed(&clean).unwrap(), 2);
    let mut failed = 0;
    for n in 1..=clean.reads() {
        match listed(&failing_read(&b, n)) {
            Err(dirty_bitmap::Error::Io(_)) => failed += 1,
            Err(e) => panic!("read {n}: {e}"),
            Ok(l) => assert_eq!(l, 2, "read {n}"),
        }
    }
    assert_eq!(failed, clean.reads(), "every read the open makes fails it");
}

/// A read that fails is the storage's problem, not the image's: `-r all` on a sound image
/// any one of whose reads fails (a storage hiccup) stops with the I/O error, or completes
/// having removed nothing, and the image is left as it was. A failed read is no verdict:
/// as one it would remove the bitmap whose table read failed, drop the whole bitmaps
/// extension when the directory read failed, or (in the reference walk) refuse the sound
/// image as corrupt.
#[test]
fn a_failed_read_never_makes_repair_all_remove_a_bitmap() {
    use dirty_bitmap::storage::{FaultPlan, FaultStorage, MemStorage};
    use dirty_bitmap::store::repair::{repair, Repair};
    let (b, _, _) = two_bitmaps_in_memory();
    let clean = FaultStorage::new(MemStorage::from_bytes(b.clone()), FaultPlan::new());
    let (_, report) = repair(&clean, Repair::All).unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    let reads = clean.reads();
    assert!(reads > 3, "{reads}");
    let mut failed = 0;
    for n in 1..=reads {
        let f = failing_read(&b, n);
        match repair(&f, Repair::All) {
            Err(dirty_bitmap::Error::Io(_)) => failed += 1,
            Err(e) => panic!("read {n}: {e}"),
            Ok((_, report)) => {
                assert!(report.removed.is_empty(), "read {n}: {report:?}");
                assert!(report.extension_dropped.is_none(), "read {n}: {report:?}");
                assert!(report.made_all_dirty.is_empty(), "read {n}: {report:?}");
            }
        }
        assert!(
            f.inner().to_vec() == b,
            "read {n} failing changed the image"
        );
    }
    assert_eq!(failed, reads, "every read the repair makes fails it");
}
