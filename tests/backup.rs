//! An incremental backup end to end with real tools (issue 13 §3): a raw disk attached to
//! an image (`create_with_data_file`), written while a `Tracker` (or a `DurableTracker`)
//! marks; a checkpoint, then a full backup over NBD with `nbdcopy`; more writes; then only the
//! dirty extents read over NBD by a libnbd client (`scripts/nbd-apply-dirty.py`, Debian's
//! `python3-libnbd`) from `qemu-nbd -B` or `qemu-storage-daemon --export nbd,bitmaps=…`,
//! applied to a copy of the full backup. The result must equal the raw disk byte for byte:
//! after a deferred-mode session, after a crash and reopen in durable mode, and after a
//! checkpoint rotation.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::qemu::{assert_qemu_clean, ok, p, tool};
use common::seeded_rng;
use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::{BitmapStore, OpenMode};
use rand::rngs::SmallRng;
use rand::RngExt;

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(sock: &Path) {
    common::qemu::wait_until_listening(sock, Duration::from_secs(10));
}

/// `qemu-nbd -r` serving `img` (with `-B bitmap` when given) on a socket in `dir`.
fn qemu_nbd(dir: &Path, img: &Path, bitmap: Option<&str>) -> (Server, String) {
    let sock = dir.join("nbd.sock");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = Command::new(tool("qemu-nbd"));
    cmd.args(["-t", "-r", "-f", "qcow2", "-k", p(&sock)]);
    if let Some(b) = bitmap {
        cmd.args(["-B", b]);
    }
    let child = cmd
        .arg(p(img))
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    let server = Server(child);
    wait_for(&sock);
    (server, format!("nbd+unix:///?socket={}", p(&sock)))
}

/// `qemu-storage-daemon` exporting `img` read-only as `disk` with `bitmap`.
fn storage_daemon(dir: &Path, img: &Path, bitmap: &str) -> (Server, String) {
    let sock = dir.join("qsd.sock");
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(tool("qemu-storage-daemon"))
        .args([
            "--blockdev",
            &format!("driver=file,node-name=f,filename={},read-only=on", p(img)),
            "--blockdev",
            "driver=qcow2,node-name=q,file=f,read-only=on",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", p(&sock)),
            "--export",
            &format!("type=nbd,id=e,node-name=q,name=disk,bitmaps.0={bitmap}"),
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon");
    let server = Server(child);
    wait_for(&sock);
    (server, format!("nbd+unix:///disk?socket={}", p(&sock)))
}

/// Random writes into the raw file, each marked just before it (the writes run one at a
/// time, with nothing between the mark and the write; a stack whose writes overlap a
/// checkpoint marks after the write lands, or drains around the checkpoint: see
/// `BitmapStore::checkpoint`).
fn write_some(raw: &Path, rng: &mut SmallRng, n: usize, mut mark: impl FnMut(u64, u64)) {
    let f = std::fs::OpenOptions::new().write(true).open(raw).unwrap();
    for _ in 0..n {
        let len = rng.random_range(1..=64 * 1024u64);
        let off = rng.random_range(0..DISK - len);
        let byte: u8 = rng.random();
        mark(off, len);
        f.write_all_at(&vec![byte; len as usize], off).unwrap();
    }
}

/// Runs `scripts/nbd-apply-dirty.py` against `uri`: the dirty extents of `bitmap` read
/// over NBD into `target`. Returns the bytes copied.
fn apply_dirty(uri: &str, bitmap: &str, target: &Path) -> u64 {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nbd-apply-dirty.py");
    let out = Command::new("/usr/bin/python3")
        .arg(&script)
        .args([uri, bitmap, p(target)])
        .output()
        .expect("/usr/bin/python3 with python3-libnbd (scripts/test.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = text.lines().last().unwrap_or_default();
    last.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Whether two files hold the same bytes; on a difference, where the first one is.
fn same_bytes(a: &Path, b: &Path, what: &str) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "{what}: lengths differ");
    if let Some(i) = x.iter().zip(&y).position(|(u, v)| u != v) {
        panic!("{what}: the copy differs from the disk from byte {i} on");
    }
}

fn copy_of(src: &Path, dst: PathBuf) -> PathBuf {
    std::fs::copy(src, &dst).unwrap();
    dst
}

fn open(img: &Path) -> BitmapStore<FileStorage> {
    BitmapStore::open(
        FileStorage::open(img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    )
    .unwrap()
}

#[test]
fn an_incremental_backup_over_nbd_equals_the_raw_disk() {
    let (mut rng, seed) = seeded_rng("an_incremental_backup_over_nbd_equals_the_raw_disk");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("disk.raw");
    let mut bytes = vec![0u8; DISK as usize];
    rng.fill(&mut bytes[..]);
    std::fs::write(&raw, &bytes).unwrap();
    drop(bytes);
    let img = d.join("disk.qcow2");
    let mut st = BitmapStore::create_with_data_file(
        FileStorage::create(&img).unwrap(),
        DISK,
        65536,
        p(&raw),
    )
    .unwrap();
    st.checkpoint("c1").unwrap();
    st.activate().unwrap();
    let t = st.tracker().unwrap();
    write_some(&raw, &mut rng, 200, |o, l| t.mark(o, l));
    drop(t);
    st.inactivate().unwrap();

    // The full backup's checkpoint, then writes before the copy (in c2 and in the copy),
    // then the copy through QEMU's NBD server (README's order: a checkpoint after the copy
    // would leave a write between the two in c1 alone, which the restore from c2 misses).
    st.checkpoint("c2").unwrap();
    st.activate().unwrap();
    let t = st.tracker().unwrap();
    write_some(&raw, &mut rng, 50, |o, l| t.mark(o, l));
    drop(t);
    st.inactivate().unwrap();
    let full = d.join("full.raw");
    {
        let (_nbd, uri) = qemu_nbd(d, &img, None);
        ok("nbdcopy", &[&uri, p(&full)]);
    }
    same_bytes(&full, &raw, "the full backup");

    // Deferred mode: more writes, then the incremental from qemu-nbd -B c2.
    st.activate().unwrap();
    let t = st.tracker().unwrap();
    write_some(&raw, &mut rng, 150, |o, l| t.mark(o, l));
    drop(t);
    st.inactivate().unwrap();
    drop(st);
    assert_qemu_clean(&img);
    let inc = copy_of(&full, d.join("inc1.raw"));
    let copied = {
        let (_nbd, uri) = qemu_nbd(d, &img, Some("c2"));
        apply_dirty(&uri, "c2", &inc)
    };
    same_bytes(&inc, &raw, &format!("seed {seed}: the incremental from c2"));
    assert!(
        copied > 0 && copied < DISK / 2,
        "seed {seed}: copied {copied}"
    );

    // Durable mode, then a crash: the store is dropped while active (nothing closes it),
    // reopened, and the incremental since c2 still restores the disk.
    let mut st = open(&img);
    st.activate_durable().unwrap();
    let shared = dirty_bitmap::SharedStore::new(st);
    let dt = shared.durable_tracker().unwrap();
    write_some(&raw, &mut rng, 100, |o, l| dt.mark(o, l).unwrap());
    drop(dt);
    drop(shared);
    let mut st = open(&img);
    assert!(st.list().iter().all(|b| !b.in_use));
    // The incremental's checkpoint before its copy (c2 stops, c3 records from here), and
    // the oldest checkpoint removed.
    st.checkpoint("c3").unwrap();
    st.remove("c1").unwrap();
    drop(st);
    assert_qemu_clean(&img);
    let inc = copy_of(&full, d.join("inc2.raw"));
    {
        let (_qsd, uri) = storage_daemon(d, &img, "c2");
        apply_dirty(&uri, "c2", &inc);
    }
    same_bytes(
        &inc,
        &raw,
        &format!("seed {seed}: after the crash in durable mode"),
    );

    // Rotation: the incremental just made is the backup at checkpoint c3; more writes;
    // since c3, and since c2 through the chain (exported with export_since), both restore
    // the disk.
    let mut st = open(&img);
    let at_c3 = copy_of(&inc, d.join("at_c3.raw"));
    st.activate().unwrap();
    let t = st.tracker().unwrap();
    write_some(&raw, &mut rng, 80, |o, l| t.mark(o, l));
    drop(t);
    st.inactivate().unwrap();
    st.export_since("c2", "since-c2").unwrap();
    drop(st);
    assert_qemu_clean(&img);
    for (base, bitmap) in [(&at_c3, "c3"), (&full, "since-c2")] {
        let out = copy_of(base, d.join(format!("from-{bitmap}.raw")));
        let (_nbd, uri) = qemu_nbd(d, &img, Some(bitmap));
        apply_dirty(&uri, bitmap, &out);
        same_bytes(&out, &raw, &format!("seed {seed}: from {bitmap}"));
    }
}
