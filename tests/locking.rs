//! QEMU image locking: `FileStorage` takes the bytes QEMU takes (compared against
//! `/proc/locks` with QEMU holding the image), our writer keeps QEMU out and a QEMU writer
//! keeps us out (the library, `dbm mark`, `dbm bitmap --add`) without touching the image,
//! readers coexist, `-U` force-shares, and the locks go with the handle.
//!
//! These tests need qemu-img, qemu-io and qemu-nbd; a missing tool fails the test. Every
//! QEMU child is killed by a guard, also when the test panics.

mod common;

use dirty_bitmap::{OpenMode, Recording};
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::qemu::{assert_qemu_clean, ok, p, run, tool};
use dirty_bitmap::storage::lock::Access;
use dirty_bitmap::storage::{FileStorage, Locking};
use dirty_bitmap::{BitmapState, BitmapStore, Error};

const MIB: u64 = 1 << 20;

/// Kills and reaps the child when dropped, also during a panic.
struct Held(Child);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An image with one enabled bitmap `b`, made by us and closed.
fn image(dir: &Path) -> PathBuf {
    let img = dir.join("l.qcow2");
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), 64 * MIB, 65536).unwrap();
    s.add("b", 65536, Recording::Enabled).unwrap();
    s.close().unwrap();
    img
}

/// The bytes locked on `path`'s inode by anyone, from `/proc/locks`
/// (`N: OFDLCK ADVISORY READ -1 MAJ:MIN:INO START END`, device numbers in hex).
fn lock_bytes(path: &Path) -> BTreeSet<u64> {
    let md = std::fs::metadata(path).unwrap();
    let dev = md.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let id = format!("{major:02x}:{minor:02x}:{}", md.ino());
    let text = std::fs::read_to_string("/proc/locks").unwrap();
    let mut bytes = BTreeSet::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = f.iter().position(|&w| w == id) else {
            continue;
        };
        assert_eq!(f[1], "OFDLCK", "only OFD locks expected: {line}");
        assert_eq!(f[3], "READ", "only shared locks expected: {line}");
        let start: u64 = f[i + 1].parse().unwrap();
        let end: u64 = f[i + 2].parse().unwrap();
        bytes.extend(start..=end);
    }
    bytes
}

/// Waits until the locks on `path` are non-empty and unchanged over 200 ms.
fn settled_lock_bytes(path: &Path) -> BTreeSet<u64> {
    let start = Instant::now();
    let mut last = BTreeSet::new();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no stable locks on {}: {last:?}",
            path.display()
        );
        let now = lock_bytes(path);
        if !now.is_empty() && now == last {
            return now;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until nobody holds a lock on `path`.
fn wait_unlocked(path: &Path) {
    let start = Instant::now();
    while !lock_bytes(path).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "locks stayed on {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `qemu-io ARGS IMG` reading commands from a pipe that stays open: it holds the image
/// until killed.
fn qemu_io_holding(args: &[&str], img: &Path) -> Held {
    let child = Command::new(tool("qemu-io"))
        .args(args)
        .args(["-f", "qcow2", p(img)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("failed to start qemu-io");
    Held(child)
}

/// A writable `qemu-nbd` export of `img`, returned once it serves (its image is open).
fn qemu_nbd_writer(img: &Path, sock: &Path) -> Held {
    let child = Command::new(tool("qemu-nbd"))
        .args(["-t", "-f", "qcow2", "-k", p(sock), p(img)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("failed to start qemu-nbd");
    let held = Held(child);
    let start = Instant::now();
    common::qemu::wait_until_listening(sock, Duration::from_secs(20));
    // The socket can appear before qemu-nbd has finished writing the image at open (it
    // clears autoclear bit 0, sets `in_use` on every bitmap in place, then sets bit 0
    // again): wait for the end of that, so that callers comparing the image's bytes compare
    // against what QEMU left, not against a half-opened image.
    loop {
        let in_use = FileStorage::open_shared(img)
            .ok()
            .and_then(|st| BitmapStore::open(st, OpenMode::ReadOnly).ok())
            .is_some_and(|s| {
                s.image().header().autoclear_features & 1 != 0 && s.list().iter().all(|b| b.in_use)
            });
        if in_use {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "qemu-nbd did not mark the bitmaps in use"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    held
}

fn dbm<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dbm"))
        .args(args)
        .output()
        .expect("failed to run dbm")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `dbm ARGS` fails with status 1 and a message containing `needle`.
fn dbm_fails_with(args: &[&str], needle: &str) {
    let out = dbm(args);
    assert_eq!(out.status.code(), Some(1), "dbm {args:?}: {}", text(&out));
    assert!(
        text(&out).contains(needle),
        "dbm {args:?} should say {needle:?}: {}",
        text(&out)
    );
}

fn dbm_succeeds(args: &[&str]) -> String {
    let out = dbm(args);
    assert_eq!(out.status.code(), Some(0), "dbm {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `Error::Locked` an open failed with, as `(perm, shared)`.
fn locked<T: std::fmt::Debug>(r: dirty_bitmap::Result<T>) -> (&'static str, bool) {
    match r {
        Err(Error::Locked { perm, shared, .. }) => (perm, shared),
        other => panic!("expected Error::Locked, got {other:?}"),
    }
}

/// Each of our three kinds of open locks exactly the bytes the matching QEMU open locks,
/// and the bytes `Access` documents; dropping the handle releases them all.
#[test]
fn our_lock_bytes_are_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let cases: [(&[&str], OpenMode, Locking, Access); 3] = [
        (&[], OpenMode::ReadWrite, Locking::On, Access::Write),
        (&["-r"], OpenMode::ReadOnly, Locking::On, Access::Read),
        (
            &["-r", "-U"],
            OpenMode::ReadOnly,
            Locking::ForceShare,
            Access::ReadForceShare,
        ),
    ];
    for (qemu_args, mode, locking, access) in cases {
        wait_unlocked(&img);
        let held = qemu_io_holding(qemu_args, &img);
        let theirs = settled_lock_bytes(&img);
        drop(held);
        wait_unlocked(&img);
        let ours = FileStorage::open_with(&img, mode, locking).unwrap();
        let mine = lock_bytes(&img);
        drop(ours);
        assert!(lock_bytes(&img).is_empty(), "{access:?}: drop left locks");
        assert_eq!(mine, theirs, "{access:?} against qemu-io {qemu_args:?}");
        let documented: BTreeSet<u64> = access.held_bytes().into_iter().collect();
        assert_eq!(mine, documented, "{access:?}");
    }
    // Unlocked opens and wrapped files take nothing.
    let off = FileStorage::open_with(&img, OpenMode::ReadWrite, Locking::Off).unwrap();
    assert!(lock_bytes(&img).is_empty());
    drop(off);
    let file = std::fs::File::open(&img).unwrap();
    let wrapped = FileStorage::from_file(file, &img, OpenMode::ReadOnly);
    assert_eq!(wrapped.locking(), Locking::Off);
    assert!(lock_bytes(&img).is_empty());
}

/// While we hold the image writable, QEMU can neither open it writable nor read it
/// consistently (`qemu-img info` fails as it does against a running VM); `-U` reads it.
/// After we close, QEMU opens it writable.
#[test]
fn our_writer_keeps_qemu_out() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let mut s = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    )
    .unwrap();
    s.activate().unwrap();

    let info = run("qemu-img", &["info", "-f", "qcow2", p(&img)]);
    assert!(
        !info.status.success(),
        "qemu-img info opened beside our writer"
    );
    let err = String::from_utf8_lossy(&info.stderr);
    assert!(
        err.contains("Failed to get shared \"write\" lock"),
        "qemu-img info: {err}"
    );
    let shared = ok("qemu-img", &["info", "-U", "-f", "qcow2", p(&img)]);
    assert!(shared.contains("in-use"), "qemu-img info -U: {shared}");

    let before = std::fs::read(&img).unwrap();
    let write = run("qemu-io", &["-f", "qcow2", "-c", "write 0 4k", p(&img)]);
    assert!(!write.status.success(), "qemu-io wrote beside our writer");
    let err = String::from_utf8_lossy(&write.stderr);
    assert!(
        err.contains("Failed to get \"write\" lock"),
        "qemu-io: {err}"
    );
    assert!(
        std::fs::read(&img).unwrap() == before,
        "qemu-io changed the image"
    );

    s.close().unwrap();
    ok("qemu-io", &["-f", "qcow2", "-c", "write 0 4k", p(&img)]);
    assert_qemu_clean(&img);
    let s = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    assert_eq!(
        s.load("b").unwrap().dirty_extents().collect::<Vec<_>>(),
        vec![(0, 65536)],
        "QEMU's write after our close is recorded in the bitmap"
    );
}

/// A QEMU writer (qemu-nbd without -r) keeps out our writable and read-only opens with the
/// typed error, and `dbm mark`, `dbm bitmap --add` and `dbm info` with QEMU's message,
/// leaving the image byte for byte as QEMU left it. `-U` reads it and sees the bitmap QEMU
/// holds as in use, so inconsistent: never clean.
#[test]
fn a_qemu_writer_keeps_us_out() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("nbd.sock");
    let held = qemu_nbd_writer(&img, &sock);
    let before = std::fs::read(&img).unwrap();

    assert_eq!(
        locked(FileStorage::open(&img, OpenMode::ReadWrite)),
        ("write", false)
    );
    assert_eq!(
        locked(FileStorage::open(&img, OpenMode::ReadOnly)),
        ("write", true)
    );
    let err = FileStorage::open(&img, OpenMode::ReadWrite)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("failed to get \"write\" lock") && err.contains("another process"),
        "{err}"
    );

    let i = p(&img);
    dbm_fails_with(&["mark", i, "b", "0", "4k"], "failed to get \"write\" lock");
    dbm_fails_with(&["bitmap", i, "c", "--add"], "failed to get \"write\" lock");
    dbm_fails_with(&["info", i], "failed to get shared \"write\" lock");
    dbm_fails_with(&["dump", i, "b"], "failed to get shared \"write\" lock");
    dbm_fails_with(&["check", i], "failed to get shared \"write\" lock");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a refused open changed the image"
    );

    // Force-share reads beside the writer; the bitmap QEMU holds is in use.
    let shared = FileStorage::open_shared(&img).unwrap();
    assert_eq!(shared.locking(), Locking::ForceShare);
    let s = BitmapStore::open(shared, OpenMode::ReadOnly).unwrap();
    assert_eq!(s.list()[0].state, BitmapState::Inconsistent);
    drop(s);
    let json = dbm_succeeds(&["info", "-U", "--json", i]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["bitmaps"][0]["in-use"], true, "{json}");
    assert!(v["bitmaps"][0]["dirty-bytes"].is_null(), "{json}");
    dbm_succeeds(&["check", "--force-share", i]);
    // dump reads past the lock but refuses the in-use bitmap rather than print it clean,
    // and says it is the running writer's, which must not be removed.
    let shared = FileStorage::open_shared(&img).unwrap();
    assert!(shared.has_writer_elsewhere().unwrap());
    drop(shared);
    for args in [["dump", "-U", i, "b"], ["dump", "-U", i, "--since=b"]] {
        let out = dbm(&args);
        assert_eq!(out.status.code(), Some(1), "dbm {args:?}: {}", text(&out));
        let t = text(&out);
        // Whether the writer records it or a crash before left it in use, the disk cannot
        // tell: both, and how to tell them apart, on one line.
        let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            t.contains("another program holds the image's write lock")
                && t.contains(
                    "If that program records the bitmap, its bits on disk are not current"
                )
                && t.contains("`query-block` says \"inconsistent\": true")
                && !t.contains("not broken"),
            "dbm {args:?} beside the writer: {t}"
        );
    }
    assert!(
        std::fs::read(&img).unwrap() == before,
        "force-share reads changed the image"
    );

    // Once QEMU is gone (killed: a crash, so `in_use` stays) the same read gives the
    // advice for a crashed writer, and our writer opens it.
    drop(held);
    wait_unlocked(&img);
    let shared = FileStorage::open_shared(&img).unwrap();
    assert!(!shared.has_writer_elsewhere().unwrap());
    drop(shared);
    for args in [["dump", "-U", i, "b"], ["dump", "-U", i, "--since=b"]] {
        dbm_fails_with(&args, "remove the bitmaps and start a new chain");
    }
    let s = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    )
    .unwrap();
    assert_eq!(s.list()[0].state, BitmapState::Inconsistent);
}

/// Our own opens follow the same rules inside one process: writers exclude writers and
/// readers, readers coexist with each other and with `qemu-img info`, force-share
/// coexists with everything, `Locking::Off` takes and checks nothing.
#[test]
fn our_opens_conflict_and_coexist() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());

    let w = FileStorage::open(&img, OpenMode::ReadWrite).unwrap();
    assert_eq!(
        locked(FileStorage::open(&img, OpenMode::ReadWrite)),
        ("write", false)
    );
    assert_eq!(
        locked(FileStorage::open(&img, OpenMode::ReadOnly)),
        ("write", true)
    );
    let sh = FileStorage::open_shared(&img).unwrap();
    drop((w, sh));
    assert!(
        lock_bytes(&img).is_empty(),
        "refused opens left locks behind"
    );

    let r1 = FileStorage::open(&img, OpenMode::ReadOnly).unwrap();
    let r2 = FileStorage::open(&img, OpenMode::ReadOnly).unwrap();
    ok("qemu-img", &["info", "-f", "qcow2", p(&img)]);
    assert_eq!(
        locked(FileStorage::open(&img, OpenMode::ReadWrite)),
        ("write", false)
    );
    let write = run("qemu-io", &["-f", "qcow2", "-c", "write 0 4k", p(&img)]);
    assert!(!write.status.success(), "qemu-io wrote beside our readers");
    // The documented opt-out: no locks, no checks.
    let off = FileStorage::open_with(&img, OpenMode::ReadWrite, Locking::Off).unwrap();
    drop((r1, r2, off));
    assert!(lock_bytes(&img).is_empty());

    let e = FileStorage::open_with(&img, OpenMode::ReadWrite, Locking::ForceShare).unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");
    let e = FileStorage::create_with(dir.path().join("new"), Locking::ForceShare).unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");
    assert!(!dir.path().join("new").exists());
}

/// Dropping the handle releases the locks at once even while a forked child (not yet
/// exec'd, as any thread's `Command::spawn` makes for a moment) shares the open file
/// description: the release goes through the description, not the last close.
#[test]
fn locks_release_while_a_forked_child_shares_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let w = FileStorage::open(&img, OpenMode::ReadWrite).unwrap();
    // SAFETY: the child calls only async-signal-safe functions (sleep, _exit) and never
    // returns into Rust code, so forking a multi-threaded process is sound.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: async-signal-safe calls in the forked child, which holds a copy of `w`'s
        // descriptor until it exits.
        unsafe {
            libc::sleep(30);
            libc::_exit(0);
        }
    }
    struct Reap(libc::pid_t);
    impl Drop for Reap {
        fn drop(&mut self) {
            // SAFETY: plain syscalls on our own child's pid.
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
                libc::waitpid(self.0, std::ptr::null_mut(), 0);
            }
        }
    }
    let child = Reap(pid);
    drop(w);
    assert!(lock_bytes(&img).is_empty(), "the child kept our locks");
    let again = FileStorage::open(&img, OpenMode::ReadWrite).unwrap();
    drop(again);
    drop(child);
}

/// Panics unless `r` is the refusal of a handle whose image another writer changed while
/// it was inactive.
fn changed_while_inactive<T: std::fmt::Debug>(r: dirty_bitmap::Result<T>) {
    assert!(
        matches!(
            r,
            Err(Error::WrongState(
                dirty_bitmap::StateProblem::ChangedWhileInactive
            ))
        ),
        "{r:?}"
    );
}

/// `img` opened writable, locked.
fn open_writable(img: &Path) -> BitmapStore<FileStorage> {
    BitmapStore::open(
        FileStorage::open(img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    )
    .unwrap()
}

/// A migration's hand-over of `img` between two handles of this process: the source
/// activates and inactivates (releasing its writer locks), the destination opens and
/// activates it, and its guest writes at `at`. Returns (source, destination).
fn handed_over(img: &Path, at: u64) -> (BitmapStore<FileStorage>, BitmapStore<FileStorage>) {
    let mut a = open_writable(img);
    a.activate().unwrap();
    a.inactivate().unwrap();
    let mut b = open_writable(img);
    b.activate().unwrap();
    b.bitmap("b").unwrap().mark_dirty(at, 4096);
    (a, b)
}

/// An image of a 64 GiB disk with an enabled bitmap `b` and a disabled one `c`, made by us
/// and closed. `b`'s first table entry has a data cluster, so a mark in its first 2 GiB is
/// flushed in place: a writer of this crate that marks there leaves cluster 0, the
/// directory and the refcounts as they were.
fn flushed_in_place(dir: &Path) -> PathBuf {
    let img = dir.join("r.qcow2");
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), 64 << 30, 65536).unwrap();
    s.add("b", 65536, Recording::Enabled).unwrap();
    s.add("c", 65536, Recording::Disabled).unwrap();
    s.activate().unwrap();
    s.bitmap("b").unwrap().mark_dirty(0, 4096);
    s.close().unwrap();
    img
}

/// An inactivation releases the writer locks, so that a migration destination can open the
/// image writable; an inactive store committing edits without them would write a directory
/// from its cache over the one the destination has just marked `in_use`, and free a cluster
/// the destination names. An edit takes the locks back first and is refused while another
/// writer holds them, with nothing written.
#[test]
fn a_handed_over_store_writes_nothing_while_another_holds_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    // The destination takes the image over and its guest writes.
    let (mut a, b) = handed_over(&img, 0);
    let taken = std::fs::read(&img).unwrap();
    let edits: [(&str, dirty_bitmap::Result<()>); 4] = [
        ("add", a.add("c", 65536, Recording::Enabled)),
        ("set_enabled", a.set_enabled("b", false)),
        ("clear", a.clear("b")),
        ("checkpoint", a.checkpoint("c2").map(|_| ())),
    ];
    for (what, r) in edits {
        eprintln!("{what}");
        assert_eq!(locked(r).0, "write", "{what}");
    }
    assert!(
        std::fs::read(&img).unwrap() == taken,
        "the handed-over store wrote the image"
    );
    // Once the destination has let go, an edit of the old source finds the image changed.
    b.close().unwrap();
    changed_while_inactive(a.add("c", 65536, Recording::Enabled));
    drop(a);
    let s = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    assert!(
        s.load("b").unwrap().is_dirty(0),
        "the destination's mark is lost"
    );
    assert_qemu_clean(&img);
}

/// Found while fixing the review finding above: a store that handed the image over and
/// resumed it with the same handle after the writer that took it over (one of this crate,
/// which flushes in place) had marked, written and let go, resumed from its own parked
/// copy: cluster 0 and the directory were byte for byte as it left them, so it took the
/// image for unchanged, and its bitmap lacked the other writer's mark (a backup from it
/// missed that write; its next flush of that region would have dropped it on disk). Now
/// the resume ORs the disk into the parked copy, and a writer that allocated meanwhile
/// (its refcounts no longer what the handle caches) makes the resume refuse.
#[test]
fn a_resumed_store_keeps_what_the_writer_that_took_over_marked() {
    let dir = tempfile::tempdir().unwrap();
    let img = flushed_in_place(dir.path());
    let (mut a, b) = handed_over(&img, 5 * 65536);
    b.close().unwrap();
    a.activate().unwrap();
    assert!(
        a.bitmap("b").unwrap().is_dirty(5 * 65536),
        "the resumed bitmap lacks the other writer's mark"
    );
    a.inactivate().unwrap();

    // The other writer marks where the bitmap has no data cluster yet (its 128 KiB span
    // two clusters): it allocates one, and writes its table in place.
    let mut b = open_writable(&img);
    b.activate().unwrap();
    b.bitmap("b").unwrap().mark_dirty(40 << 30, 4096);
    b.close().unwrap();
    changed_while_inactive(a.activate());
    drop(a);
    assert_qemu_clean(&img);
}

/// A store that handed the image over takes the locks back, and checks the image, before
/// `export_since` or `merge` reads what it commits. Built from its parked copy before the
/// take-back (only the take-back ORs the disk into that copy), with the writer that took
/// over gone (its mark flushed in place), `export_since` would commit `x`, and `merge` the
/// disabled `c`, consistent and clean where that writer marked: a backup through either
/// would skip the write.
#[test]
fn a_handed_over_store_exports_and_merges_what_the_writer_that_took_over_marked() {
    let at = 5 * 65536;
    let mut clean = Vec::new();
    // Each on a store of its own: the first edit's take-back ORs the disk into the parked
    // copy, which would hide the second's order.
    for what in ["export_since", "merge"] {
        let dir = tempfile::tempdir().unwrap();
        let img = flushed_in_place(dir.path());
        let (mut a, b) = handed_over(&img, at);
        b.close().unwrap();
        let built = match what {
            "export_since" => a.export_since("b", "x").map(|()| "x"),
            _ => a.merge("b", "c").map(|()| "c"),
        }
        .unwrap();
        drop(a);
        let s = BitmapStore::open(
            FileStorage::open(&img, OpenMode::ReadOnly).unwrap(),
            OpenMode::ReadOnly,
        )
        .unwrap();
        if !s.load(built).unwrap().is_dirty(at) {
            clean.push(format!("{what} into {built}"));
        }
        drop(s);
        assert_qemu_clean(&img);
    }
    assert!(
        clean.is_empty(),
        "committed clean where the writer that took over marked: {clean:?}"
    );
}

/// Found with the finding above: `load` and `changed_since` of a store that handed the
/// image over returned the parked copy, without the marks the writer that took over had
/// flushed in place. They now OR the disk in, without taking the locks (the image stays
/// open to the next writer), while the image is as the store left it; while another writer
/// holds it active, `changed_since` (what a backup copies by) refuses.
#[test]
fn a_handed_over_store_reads_what_the_writer_that_took_over_marked() {
    let dir = tempfile::tempdir().unwrap();
    let img = flushed_in_place(dir.path());
    let at = 5 * 65536;
    let (a, b) = handed_over(&img, at);
    b.close().unwrap();
    assert!(
        a.load("b").unwrap().is_dirty(at),
        "load: the parked copy without the other writer's mark"
    );
    assert!(
        a.changed_since("c").unwrap().is_dirty(at),
        "changed_since: the union without the other writer's mark"
    );
    // The reads took no lock: the next writer opens, and while it is active its marks may
    // be in its memory alone.
    let mut c = open_writable(&img);
    c.activate().unwrap();
    changed_while_inactive(a.changed_since("c"));
    assert!(a.load("b").unwrap().is_dirty(at));
    c.close().unwrap();
    assert!(a.changed_since("c").unwrap().is_dirty(at));
    drop(a);
    assert_qemu_clean(&img);
}

/// Every inactivation releases the locks, so a handed-over store's activation (deferred or
/// durable) always checks that nobody wrote the image while the store was inactive, whether
/// or not it parked bitmaps. A store that had no consistent bitmap to park would otherwise
/// activate over an image another writer changed, and commit from its stale caches: here
/// its next `add` would write a directory without the other writer's bitmap `c`. The
/// activation refuses with nothing written.
#[test]
fn a_handed_over_store_with_nothing_parked_refuses_an_image_changed_meanwhile() {
    let mut accepted = Vec::new();
    for durable in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("n.qcow2");
        let mut s =
            BitmapStore::create(FileStorage::create(&img).unwrap(), 64 * MIB, 65536).unwrap();
        s.add("t", 65536, Recording::Enabled).unwrap();
        s.remove("t").unwrap();
        s.activate().unwrap();
        s.inactivate().unwrap();
        let mut p = open_writable(&img);
        p.add("c", 65536, Recording::Enabled).unwrap();
        drop(p);
        let taken = std::fs::read(&img).unwrap();
        let r = if durable {
            s.activate_durable()
        } else {
            s.activate()
        };
        if !matches!(
            r,
            Err(Error::WrongState(
                dirty_bitmap::StateProblem::ChangedWhileInactive
            ))
        ) {
            accepted.push(format!("durable {durable}: {r:?}"));
            continue;
        }
        assert!(
            std::fs::read(&img).unwrap() == taken,
            "durable {durable}: the refused activation wrote the image"
        );
        // Refused, the store is an inactive node again: the image stays open to writers.
        drop(FileStorage::open(&img, OpenMode::ReadWrite).unwrap());
        drop(s);
        assert_qemu_clean(&img);
    }
    assert!(
        accepted.is_empty(),
        "activated over an image another writer changed: {accepted:?}"
    );
}

/// Takes a shared OFD lock on `byte` of `file`, as QEMU takes its lock bytes.
fn hold_byte(file: &std::fs::File, byte: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: `flock` is a plain C struct of integers, valid all zero (as F_OFD_* require
    // of `l_pid`); the descriptor is open for the life of `file`, and F_OFD_SETLK only
    // reads `fl`.
    let r = unsafe {
        let mut fl: libc::flock = std::mem::zeroed();
        fl.l_type = libc::F_RDLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = byte as libc::off_t;
        fl.l_len = 1;
        libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl)
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

/// A store that holds the writer locks (since its open) keeps them and activates, without
/// taking them again: a conflict in that take would drop them to a reader's. A QEMU opener
/// between taking its bytes and testing them (here: byte 201 held by another description,
/// as it holds it then) would make the activation fail and cost the store its writer's
/// bytes, while it stays writable: the opener's test would then pass, and both would write
/// the image.
#[test]
fn an_activation_keeps_the_locks_the_store_holds_beside_an_opener_midway() {
    for durable in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let mut s = open_writable(&img);
        let opener = std::fs::File::open(&img).unwrap();
        hold_byte(&opener, 201);
        let r = if durable {
            s.activate_durable()
        } else {
            s.activate()
        };
        drop(opener);
        let other = FileStorage::open(&img, OpenMode::ReadWrite);
        assert!(
            matches!(other, Err(Error::Locked { .. })),
            "durable {durable}: a writer opened beside our writable store: {other:?} (our \
             activate: {r:?})"
        );
        r.unwrap();
        s.close().unwrap();
        assert_qemu_clean(&img);
    }
}

/// An edit of a store that handed the image over takes the writer locks back before it
/// checks its input, and one that fails, a refusal included, releases what it took back:
/// kept, the destination could not open the image (`Error::Locked`) until the store was
/// inactivated again.
#[test]
fn a_refused_edit_of_a_handed_over_store_leaves_the_image_open_to_writers() {
    type Edit = fn(&mut BitmapStore<FileStorage>) -> dirty_bitmap::Result<()>;
    let edits: [(&str, Edit); 8] = [
        ("add of a taken name", |a| {
            a.add("b", 65536, Recording::Enabled)
        }),
        ("remove of no bitmap", |a| a.remove("none").map(|_| ())),
        ("store of another size", |a| {
            a.store("b", &dirty_bitmap::DirtyBitmap::new(MIB, 65536).unwrap())
        }),
        ("clear of no bitmap", |a| a.clear("none")),
        ("set_enabled of no bitmap", |a| a.set_enabled("none", false)),
        ("merge of no bitmap", |a| a.merge("none", "b")),
        ("export since no bitmap", |a| a.export_since("none", "x")),
        ("resize with parked bitmaps", |a| a.resize(128 * MIB)),
    ];
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let mut a = open_writable(&img);
    a.activate().unwrap();
    a.inactivate().unwrap();
    let before = std::fs::read(&img).unwrap();
    for (what, edit) in edits {
        let r = edit(&mut a);
        assert!(r.is_err(), "{what}: {r:?}");
        let other = FileStorage::open(&img, OpenMode::ReadWrite);
        assert!(
            other.is_ok(),
            "{what} ({r:?}): the destination cannot open the image: {other:?}"
        );
    }
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a refused edit wrote the image"
    );
    // A valid edit still takes the locks back.
    a.add("c", 65536, Recording::Enabled).unwrap();
    assert_eq!(
        locked(FileStorage::open(&img, OpenMode::ReadWrite)).0,
        "write"
    );
    drop(a);
    assert_qemu_clean(&img);
}

/// A durable store that handed the image over, resumed after a QEMU destination set
/// `in_use` on its bitmaps in place and died before it started the guest, loads the bitmaps
/// (the disk holds every acknowledged mark) and writes the flags back clear, after what it
/// loaded is durable: the destination's `in_use` left on disk for its whole durable session
/// would make a crash load every bitmap inconsistent instead of consistent with every
/// acknowledged mark.
#[test]
fn a_durable_resume_after_a_qemu_destination_died_clears_its_in_use() {
    use dirty_bitmap::SharedStore;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), 1 << 30, 65536).unwrap();
    s.add("b", 65536, Recording::Enabled).unwrap();
    s.activate_durable().unwrap();
    let shared = SharedStore::new(s);
    let t = shared.durable_tracker().unwrap();
    t.mark(0, 4096).unwrap();
    shared.lock().inactivate().unwrap();
    {
        // The destination: QEMU opens the image writable (`in_use` set in place) and is
        // killed before it starts the guest.
        let _qemu = qemu_nbd_writer(&img, &dir.path().join("nbd.sock"));
    }
    // Taken back only by a fail-back that knows the destination never started the guest.
    assert!(matches!(
        shared.lock().activate_durable().unwrap_err(),
        dirty_bitmap::Error::WrongState(dirty_bitmap::StateProblem::ChangedWhileInactive)
    ));
    shared.lock().accept_destination_in_use();
    shared.lock().activate_durable().unwrap();
    t.mark(7 << 20, 4096).unwrap();
    // What a crash now leaves, as we and QEMU read it: consistent, with both marks.
    let r = BitmapStore::open(FileStorage::open_shared(&img).unwrap(), OpenMode::ReadOnly).unwrap();
    assert!(
        !r.list()[0].in_use,
        "the destination's in_use is still on disk while the store is durable"
    );
    let b = r.load("b").unwrap();
    assert!(b.is_dirty(0) && b.is_dirty(7 << 20));
    drop(r);
    let info = String::from_utf8(run("qemu-img", &["info", "-U", "--output=json", p(&img)]).stdout)
        .unwrap();
    assert!(!info.contains("in-use"), "{info}");
    drop(t);
    shared.try_into_inner().unwrap().inactivate().unwrap();
    assert_qemu_clean(&img);
}

/// A directory that differs only in `in_use` bits is not only the trace of a destination
/// that set them and died before it started the guest: any writer leaves it. QEMU opened
/// writable sets `in_use` in place, and a guest write into a cluster already allocated
/// changes no refcount. Taken back, the store would resume on its own bitmaps without that
/// write, and its next stop would write them consistent: the write in no bitmap. Only a
/// caller that knows the destination never started (`accept_destination_in_use`, the
/// migration's fail-back) takes such an image back; an activation or an edit without it is
/// refused, and the bitmap stays in use on disk (inconsistent, never clean).
#[test]
fn a_store_never_takes_back_an_image_another_writer_used_without_being_told() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("u.qcow2");
    let i = p(&img);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", i, "1G"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 7 0 64k", i]);
    let mut s = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    )
    .unwrap();
    s.add("b", 65536, Recording::Enabled).unwrap();
    s.activate().unwrap();
    s.bitmap("b").unwrap().mark_dirty(1 << 20, 4096);
    s.inactivate().unwrap();
    // Another writer: QEMU opens it writable (`in_use` set in place), writes guest data
    // into the allocated cluster 0, and dies.
    let out = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 4k", "-c", "abort", i],
    );
    assert!(!out.status.success(), "qemu-io did not abort: {out:?}");
    let info = ok("qemu-img", &["info", "-U", "--output=json", i]);
    assert!(info.contains("in-use"), "QEMU left no in_use: {info}");
    for what in ["activate", "add"] {
        let e = match what {
            "activate" => s.activate(),
            _ => s.add("c", 65536, Recording::Enabled),
        }
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::WrongState(dirty_bitmap::StateProblem::ChangedWhileInactive)
            ),
            "{what}: {e}"
        );
    }
    drop(s);
    // The disk still says in use: QEMU's write is in no bitmap anyone trusts.
    let r = BitmapStore::open(FileStorage::open_shared(&img).unwrap(), OpenMode::ReadOnly).unwrap();
    assert_eq!(r.list()[0].state, BitmapState::Inconsistent);
}

/// Found by reviews: the permission to take back `in_use` bits
/// (`accept_destination_in_use`) was taken only by the check an activation runs after it
/// took the writer locks, so an activation that failed before (the locks held by another
/// process; or `activate_with`, the stream destination's activation, refusing a bitmap it
/// was given) left it set, and a later, unrelated activation took back `in_use` bits another
/// writer set: a false clean. Every activation call now takes it first.
#[test]
fn a_failed_activation_does_not_leave_the_permission_for_a_later_one() {
    for how in ["locked", "activate_with"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("f.qcow2");
        let mut a =
            BitmapStore::create(FileStorage::create(&img).unwrap(), 1 << 30, 65536).unwrap();
        a.add("b", 65536, Recording::Enabled).unwrap();
        a.activate().unwrap();
        a.bitmap("b").unwrap().mark_dirty(0, 4096);
        a.inactivate().unwrap();
        let open_rw = || {
            BitmapStore::open(
                FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
                OpenMode::ReadWrite,
            )
            .unwrap()
        };
        a.accept_destination_in_use();
        if how == "locked" {
            // Another process holds the image: the fail-back's activation fails on the locks.
            let b = open_rw();
            assert!(matches!(a.activate().unwrap_err(), Error::Locked { .. }));
            drop(b);
        } else {
            let bm = std::sync::Arc::new(dirty_bitmap::DirtyBitmap::new(1 << 30, 65536).unwrap());
            assert!(matches!(
                a.activate_with(vec![("nosuch".into(), bm)]).unwrap_err(),
                Error::NotFound { .. }
            ));
        }
        // Later another writer activates the image (`in_use` set in place) and dies.
        let mut c = open_rw();
        c.activate().unwrap();
        drop(c);
        assert!(
            matches!(
                a.activate().unwrap_err(),
                Error::WrongState(dirty_bitmap::StateProblem::ChangedWhileInactive)
            ),
            "{how}"
        );
    }
}

/// A permission granted while the store is active (a fail-back whose attempt failed before
/// the stop, written as "accept, then activate if inactive") does not carry through the
/// next hand-over: the activation after that would take back `in_use` bits a destination
/// set, whose guest's writes no bitmap holds, and the next stop would write the bitmap
/// clean without them. A stop of an active store drops the permission.
#[test]
fn a_permission_granted_before_a_hand_over_does_not_apply_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.qcow2");
    let mut a = BitmapStore::create(FileStorage::create(&img).unwrap(), 1 << 30, 65536).unwrap();
    a.add("b", 65536, Recording::Enabled).unwrap();
    a.activate().unwrap();
    a.bitmap("b").unwrap().mark_dirty(0, 4096);
    a.accept_destination_in_use();
    a.inactivate().unwrap();
    // The destination takes the image, its guest writes, and it dies before a flush.
    let mut c = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    )
    .unwrap();
    c.activate().unwrap();
    c.bitmap("b").unwrap().mark_dirty(7 << 20, 4096);
    drop(c);
    let r = a.activate();
    assert!(
        matches!(
            r,
            Err(Error::WrongState(
                dirty_bitmap::StateProblem::ChangedWhileInactive
            ))
        ),
        "{r:?}"
    );
}

/// A store takes back an image whose cluster 0 is the bytes it knows the disk holds when
/// that is not its own encoding (a crash residue of a name move, or another program's
/// layout). A reftable growth, which writes the reftable's fields of cluster 0 in place, is
/// noted in that copy: otherwise, after a flush that grew the reftable, the store would
/// refuse its own image as changed while inactive (a migration's source then stays
/// stopped). Here cluster 0 holds a byte past the end marker, and 512-byte clusters make
/// the reftable grow within a test's reach.
#[test]
fn a_store_takes_back_its_image_after_a_reftable_growth_under_a_foreign_cluster_0() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("g.qcow2");
    let disk = 100u64 << 30;
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), disk, 512).unwrap();
    s.add("b", 512, Recording::Enabled).unwrap();
    drop(s.close().unwrap());
    let mut bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes[500], 0);
    bytes[500] = 0x5a;
    std::fs::write(&img, &bytes).unwrap();
    let reftable = |b: &[u8]| b[48..60].to_vec();
    let mut s = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
        OpenMode::ReadWrite,
    )
    .unwrap();
    s.activate().unwrap();
    let b = s.bitmap("b").unwrap();
    // One bit per data cluster of the bitmap (4,096 bits, 2 MiB of disk): 25 MiB of them,
    // beside the L1 table's 25 MiB, past what the reftable covers at the create.
    for k in 0..(50 << 10) {
        b.mark_dirty(k * (2 << 20), 1);
    }
    drop(b);
    s.flush().unwrap();
    let now = std::fs::read(&img).unwrap();
    assert_ne!(
        reftable(&now),
        reftable(&bytes),
        "the reftable did not grow"
    );
    assert_eq!(now[500], 0x5a, "cluster 0 was rewritten");
    s.inactivate().unwrap();
    s.activate().unwrap();
    s.inactivate().unwrap();
}

/// QEMU writes unknown header extensions back in reverse order, so a QEMU destination that
/// activated the image (rewriting cluster 0) and died before it started the guest leaves
/// two foreign extensions swapped; compared in order, the source's fail-back would refuse
/// the image as changed (the guest staying stopped). They compare as a set.
#[test]
fn a_fail_back_takes_the_image_back_with_its_unknown_extensions_reordered() {
    use dirty_bitmap::format::{HeaderArea, UnknownExtension};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow2");
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), 1 << 30, 65536).unwrap();
    s.add("b", 65536, Recording::Enabled).unwrap();
    drop(s.close().unwrap());
    let rewrite = |f: &dyn Fn(&mut HeaderArea)| {
        let mut bytes = std::fs::read(&img).unwrap();
        let mut area = HeaderArea::decode(&bytes[..65536]).unwrap();
        f(&mut area);
        bytes[..65536].copy_from_slice(&area.encode().unwrap());
        std::fs::write(&img, &bytes).unwrap();
    };
    rewrite(&|a| {
        for kind in [0x1111_1111u32, 0x2222_2222] {
            a.unknown.push(UnknownExtension {
                kind,
                data: kind.to_be_bytes().to_vec(),
            });
        }
    });
    let open_rw = || {
        BitmapStore::open(
            FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
            OpenMode::ReadWrite,
        )
        .unwrap()
    };
    let mut a = open_rw();
    a.activate().unwrap();
    a.bitmap("b").unwrap().mark_dirty(0, 4096);
    a.inactivate().unwrap();
    // The destination: activates (`in_use` in place), rewrites cluster 0 as QEMU does
    // (the unknown extensions reversed), and dies before it starts the guest.
    let mut c = open_rw();
    c.activate().unwrap();
    drop(c);
    rewrite(&|a| a.unknown.reverse());
    a.accept_destination_in_use();
    a.activate().unwrap();
    assert!(a.bitmap("b").unwrap().is_dirty(0));
    a.inactivate().unwrap();
}
