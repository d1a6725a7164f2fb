//! Replays the committed corpus of the write-path fuzz targets `ops_crash` and
//! `ops_guest_data` through the harness they share (`fuzz/harness/ops.rs`, included here as
//! it is in the fuzz targets), so `cargo test` checks them without nightly Rust or
//! libFuzzer. The minimised findings in `fuzz/regressions/ops_*/` each have a named test
//! below; a test whose finding is still open on main is `#[ignore]`d, with the finding named. See `docs/FUZZING.md`.

#[path = "../fuzz/harness/durable.rs"]
mod durable;
#[path = "../fuzz/harness/ops.rs"]
mod ops;

use dirty_bitmap::{OpenMode, Recording};
use std::fs;
use std::path::{Path, PathBuf};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 3] = [
    ("ops_crash", ops::ops_crash),
    ("ops_guest_data", ops::ops_guest_data),
    ("ops_durable", durable::ops_durable),
];

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
}

#[test]
fn replay_ops_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, f) in TARGETS {
        let paths = files(&root.join(name));
        assert!(!paths.is_empty(), "fuzz/corpus/{name}/ is empty");
        for p in &paths {
            eprintln!("replaying {}", p.display());
            f(&fs::read(p).unwrap());
        }
        println!("{name}: replayed {} corpus files", paths.len());
    }
    // `ops_guest_data` returns quietly on an image the store refuses to open, and checks
    // little where every operation is refused: the corpus must still hold images on which
    // operations succeed, or its replay checks nothing.
    let paths = files(&root.join("ops_guest_data"));
    let ran: Vec<usize> = paths
        .iter()
        .map(|p| ops::guest_data_ops_run(&fs::read(p).unwrap()))
        .collect();
    let opened = ran.iter().filter(|&&n| n > 0).count();
    println!(
        "ops_guest_data: {opened} of {} inputs ran an operation that succeeded, {} in all",
        paths.len(),
        ran.iter().sum::<usize>()
    );
    assert!(
        opened * 2 >= paths.len(),
        "only {opened} of {} ops_guest_data inputs ran an operation",
        paths.len()
    );
}

/// Replays an `ops_guest_data` finding, then checks that the first write its tail asks for
/// (`activate`, or `remove` of bitmap "b1") is refused with a typed corruption error: the
/// image shares a cluster between the guest and a bitmap, and `qemu-img check` calls it
/// corrupt too.
fn guest_data_refused(name: &str, remove: bool) {
    use dirty_bitmap::storage::MemStorage;
    use dirty_bitmap::{BitmapStore, Corruption, Error};

    regression("ops_guest_data", name);
    let data = fs::read(format!(
        "{}/fuzz/regressions/ops_guest_data/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let tail = usize::from(*data.last().unwrap());
    let image = data[..data.len() - 1 - tail].to_vec();
    let storage = MemStorage::from_bytes(image.clone());
    let mut s = BitmapStore::open(&storage, OpenMode::ReadWrite).unwrap();
    let r = if remove {
        s.remove("b1").map(|_| ())
    } else {
        s.activate()
    };
    assert!(
        matches!(r, Err(Error::Corrupt(Corruption::CheckFailed { .. }))),
        "{r:?}"
    );
    drop(s);
    assert!(storage.to_vec() == image, "the refusal wrote");
}

/// Every committed finding of the write-path targets is replayed by a named test of this
/// file: a finding added to `fuzz/regressions/ops_*/` without one would never run.
#[test]
fn every_ops_regression_has_a_test() {
    let this = include_str!("fuzz_ops_corpus.rs");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut seen = 0;
    for (target, _) in TARGETS {
        let dir = root.join(target);
        if !dir.exists() {
            continue;
        }
        for p in files(&dir) {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            assert!(
                this.contains(&format!("\"{name}\"")),
                "fuzz/regressions/{target}/{name} is replayed by no test"
            );
            seen += 1;
        }
    }
    assert!(seen > 0, "no ops regression found");
}

/// Runs one minimised finding through its target.
fn regression(target: &str, name: &str) {
    let f = TARGETS.iter().find(|t| t.0 == target).expect("a target").1;
    let path = format!(
        "{}/fuzz/regressions/{target}/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    f(&fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")));
}

// Findings of `ops_guest_data` (docs/FUZZING.md, "Findings"): a cluster that an L2 entry names
// as guest data is also one of a bitmap's own clusters (refcount 1, two references: a corrupt
// image, which `qemu-img check` reports), and the library wrote that bitmap cluster in place,
// or freed it, without checking that nothing else references it. Built from a QEMU-made
// image by `fuzz/make-ops-regressions.py`. All four failed on the library of 2b4e2d0 and pass
// since main's ec7a3f8 (every write operation is preflighted: the image must check clean
// and every bitmap cluster be owned once before the first write).

/// Finding `flush-writes-bitmap-data-over-guest-cluster`: `flush` rewrote a changed region
/// in place in the bitmap's data cluster (`src/flush/mod.rs`, data step), which is also guest
/// data.
#[test]
fn ops_guest_data_flush_writes_bitmap_data_over_guest_cluster() {
    guest_data_refused("flush-writes-bitmap-data-over-guest-cluster", false);
}

/// Finding `flush-writes-table-entry-over-guest-cluster`: `flush` wrote a fresh table entry
/// in place in the bitmap table (`src/flush/mod.rs`, table step), which is also guest data.
#[test]
fn ops_guest_data_flush_writes_table_entry_over_guest_cluster() {
    guest_data_refused("flush-writes-table-entry-over-guest-cluster", false);
}

/// Finding `activate-writes-directory-over-guest-cluster`: `activate` set `in_use` in the
/// directory in place (`write_flags_in_place` in `src/store/commit.rs`), which is also
/// guest data.
#[test]
fn ops_guest_data_activate_writes_directory_over_guest_cluster() {
    guest_data_refused("activate-writes-directory-over-guest-cluster", false);
}

/// Finding `remove-last-leaks-at-header-write` (a gap in `docs/CRASH-CONSISTENCY.md`, not in
/// the library): removing the last bitmap allocates no directory, so the commit's header
/// write comes before any refcount write, and a crash right after it leaves the removed
/// bitmap's table and the old directory leaked. The "Leak windows" table opens the window for `remove` only at the
/// first refcount write; the harness opens it at the header write too (as `tests/crash.rs`
/// does for `inactivate` and `resize`). Input: 512 B clusters, 1 MiB, add "a", remove "a".
#[test]
fn ops_crash_remove_last_leaks_at_header_write() {
    use dirty_bitmap::storage::{CrashMode, CrashStorage, MemStorage, Op};
    use dirty_bitmap::BitmapStore;

    regression("ops_crash", "remove-last-leaks-at-header-write");
    let crash = CrashStorage::new();
    let mut s = BitmapStore::create(&crash, 1 << 20, 512).unwrap();
    s.add("a", 65536, Recording::Enabled).unwrap();
    let start = crash.op_count();
    s.remove("a").unwrap();
    let ops = crash.ops();
    let header = (start..ops.len())
        .find(|&i| matches!(&ops[i], Op::Write { offset: 0, data } if data.len() >= 104))
        .expect("a header write");
    // Nothing but the header write (and its barrier) precedes the frees.
    assert!(
        ops[start..header].is_empty(),
        "writes before the header: {:?}",
        &ops[start..header]
    );
    let image = crash
        .crash_image(header + 2, CrashMode::Dropped)
        .expect("a crash point after the header's barrier");
    let report = BitmapStore::open(MemStorage::from_bytes(image), OpenMode::ReadOnly)
        .unwrap()
        .image()
        .check()
        .unwrap();
    assert_eq!(report.corruptions, 0);
    // The removed bitmap's table and the old directory.
    assert_eq!(report.leaks, 2, "{:?}", report.messages);
}

/// Finding `remove-frees-guest-cluster-then-reuses-it`: `remove` freed the bitmap's data
/// cluster although an L2 entry still names it (`safe_frees` in `src/store/commit.rs` kept only
/// clusters that cluster 0, the L1 table, the refcount structures or a remaining bitmap
/// referenced), so its refcount dropped to 0 and the next allocation (the table of a bitmap
/// added next) wrote over the guest data.
#[test]
fn ops_guest_data_remove_frees_guest_cluster_then_reuses_it() {
    guest_data_refused("remove-frees-guest-cluster-then-reuses-it", true);
}
/// A harness finding of the 30-minute `ops_guest_data` run: `resize` grew the L1 table of a
/// bitmap-only image into fresh clusters and freed the old (all-zero) one, which a later
/// `add` reused. The harness protected the old L1 table's bytes as guest metadata; it now
/// treats them as free once the header names another L1 table, as QEMU's
/// `qcow2_grow_l1_table` does.
#[test]
fn ops_guest_data_resize_moves_the_l1_and_frees_the_old_one() {
    regression(
        "ops_guest_data",
        "resize-moves-the-l1-and-frees-the-old-one",
    );
}

// Findings of `ops_durable` (docs/FUZZING.md, "Durable-mode findings"), made by
// `fuzz/make-durable-corpus.py`: each is the sequence of a finding, ending with a write the
// model requires on disk or a refusal it requires. The first three are against the library
// of 6747899 (the first two showed on the seeds, the third in a fuzzer run; main fixed
// them in 37841b0 and 00f0d48), the last against 62abbf1 (fixed in f18f912).

/// Finding `tracker-acknowledges-after-inactive-clear`: after a durable inactivate and an
/// inactive clear, a mark through the same tracker returned `Ok` at once (the tracker's
/// durable bits still claimed the cleared granule); the model requires the refusal
/// (`NotActive`).
#[test]
fn ops_durable_tracker_acknowledges_after_inactive_clear() {
    regression("ops_durable", "tracker-acknowledges-after-inactive-clear");
}

/// Finding `mark-past-the-disk-succeeds-when-nothing-records`: with every bitmap disabled, a
/// mark past the disk returned `Ok` (the fast path answered first); the model requires
/// `InvalidInput`.
#[test]
fn ops_durable_mark_past_the_disk_succeeds_when_nothing_records() {
    regression(
        "ops_durable",
        "mark-past-the-disk-succeeds-when-nothing-records",
    );
}

/// Finding `tracker-of-an-earlier-activation-after-reactivation`: a tracker taken while the
/// store had no bitmap, after an inactivate, an add and a second durable activation (no
/// reopen needed: nothing parked), returned `Ok` for a mark without marking the new bitmap;
/// the model requires the granule on disk.
#[test]
fn ops_durable_tracker_of_an_earlier_activation_after_reactivation() {
    regression(
        "ops_durable",
        "tracker-of-an-earlier-activation-after-reactivation",
    );
}

/// Finding `intent-past-a-shrunk-disk-waits-forever`: an intent issued while the store was
/// inactive, near the end of a 1 MiB disk then shrunk to 512 KiB, never completed `wait`
/// after the next durable activation (group commits forever); the model requires
/// `InvalidInput`. Should the hang come back, the test fails at [`HANG`] instead of holding CI.
#[test]
fn ops_durable_intent_past_a_shrunk_disk_waits_forever() {
    regression_within(
        "ops_durable",
        "intent-past-a-shrunk-disk-waits-forever",
        HANG,
    );
}

/// Far longer than the replay of any finding takes (milliseconds): past it, the replay hangs.
const HANG: std::time::Duration = std::time::Duration::from_secs(60);

/// [`regression`] on a thread of its own: fails, naming the finding, if it has not returned
/// within `limit` (the thread is left behind; the test process ends it), and passes on a
/// panic of the replay as the test's own.
fn regression_within(target: &'static str, name: &'static str, limit: std::time::Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let replay = std::thread::spawn(move || {
        regression(target, name);
        let _ = tx.send(());
    });
    match rx.recv_timeout(limit) {
        Ok(()) => replay.join().expect("the replay returned"),
        // The sender dropped without a send: the replay panicked.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = replay.join() {
                std::panic::resume_unwind(panic);
            }
            unreachable!("the replay ended without sending");
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{target}/{name}: the replay still runs after {limit:?} (it hangs)")
        }
    }
}

/// Replays an input, or every file of a directory, through a target, named by `OPS_TARGET`
/// and `OPS_INPUT` (a debugging aid: `cargo test --test fuzz_ops_corpus replay_input --
/// --ignored`; both variables are required).
#[test]
#[ignore]
fn replay_input() {
    let t = std::env::var("OPS_TARGET").expect("OPS_TARGET names a target");
    let p = PathBuf::from(std::env::var("OPS_INPUT").expect("OPS_INPUT names a file"));
    let f = TARGETS.iter().find(|x| x.0 == t).expect("a target").1;
    let paths = if p.is_dir() { files(&p) } else { vec![p] };
    for p in &paths {
        eprintln!("replaying {}", p.display());
        f(&fs::read(p).unwrap());
    }
}
