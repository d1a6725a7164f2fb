//! Crash consistency of the incremental flush (issue 4, first version).
//!
//! One run of create, add ×3, activate, flushes with concurrent marks, inactivate, marks
//! while inactive, activate, flush, inactivate, activate, remove, inactivate on a
//! `CrashStorage`; then the image a crash after every op would leave, with the unsynced
//! tail dropped, kept, or torn at 512-byte sectors (two seeds). Every image must:
//! - open with the library (or not be an image yet: no magic before `create` finished);
//! - show no refcount corruption in our check, nor in `qemu-img check` (exit 0 or 3, leaks
//!   only; every image, or a seeded 1 in N with `DBM_CRASH_SAMPLE=N`);
//! - never be falsely clean: every bitmap is inconsistent, or holds every bit marked before
//!   the last `inactivate()` that started before the crash point (a crash part-way through
//!   an inactivate may leave a bitmap clean only with all of them).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::qemu::{p, run};
use common::seeded_rng;
use dirty_bitmap::storage::{CrashMode, CrashStorage, MemStorage};
use dirty_bitmap::{BitmapState, BitmapStore};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;

type Marks = Vec<(u64, u64)>;

/// The ops count when each inactivate started, with the marks each bitmap that reads as
/// consistent must hold from then on.
struct Checkpoint {
    ops: usize,
    required: BTreeMap<&'static str, Marks>,
}

fn mark_some(t: &dirty_bitmap::Tracker, rng: &mut SmallRng, n: usize, log: &mut Marks) {
    for _ in 0..n {
        let off = rng.random_range(0..DISK - 8192);
        let len = rng.random_range(1..8192);
        t.mark(off, len);
        log.push((off, len));
    }
}

fn run_workload(cs: u64, seed: u64) -> (CrashStorage, usize, Vec<Checkpoint>) {
    let crash = CrashStorage::new();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut marks: Marks = Vec::new();
    let mut checkpoints = Vec::new();
    let mut s = BitmapStore::create(&crash, DISK, cs).unwrap();
    let created = crash.op_count();
    s.add("a", 512, true).unwrap();
    s.add("b", 4096, true).unwrap();
    s.add("d", 65536, false).unwrap();
    s.activate().unwrap();
    let t = s.tracker().unwrap();

    // Flushes with concurrent marks.
    {
        let store = Mutex::new(s);
        let stop = Arc::new(AtomicBool::new(false));
        let marker = {
            let t = t.clone();
            let stop = Arc::clone(&stop);
            let mut r = SmallRng::seed_from_u64(seed ^ 0x5eed);
            std::thread::spawn(move || {
                let mut log = Vec::new();
                while !stop.load(Ordering::Relaxed) && log.len() < 400 {
                    mark_some(&t, &mut r, 1, &mut log);
                    std::thread::yield_now();
                }
                log
            })
        };
        for _ in 0..3 {
            store.lock().flush().unwrap();
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Relaxed);
        marks.extend(marker.join().unwrap());
        s = store.into_inner();
    }
    mark_some(&t, &mut rng, 20, &mut marks);
    // From the first op of an inactivate on, a bitmap that reads as consistent must hold
    // every mark made before it: a crash part-way may leave it inconsistent, never clean
    // without them.
    let started = crash.op_count();
    s.inactivate().unwrap();
    let req = |m: &Marks| BTreeMap::from([("a", m.clone()), ("b", m.clone()), ("d", vec![])]);
    checkpoints.push(Checkpoint {
        ops: started,
        required: req(&marks),
    });

    // Marks while inactive: kept in memory, written by the next inactivate.
    mark_some(&t, &mut rng, 10, &mut marks);
    s.activate().unwrap();
    mark_some(&t, &mut rng, 20, &mut marks);
    s.flush().unwrap();
    mark_some(&t, &mut rng, 20, &mut marks);
    let started = crash.op_count();
    s.inactivate().unwrap();
    checkpoints.push(Checkpoint {
        ops: started,
        required: req(&marks),
    });

    s.activate().unwrap();
    mark_some(&t, &mut rng, 5, &mut marks);
    s.remove("b").unwrap();
    mark_some(&t, &mut rng, 5, &mut marks);
    let started = crash.op_count();
    s.inactivate().unwrap();
    checkpoints.push(Checkpoint {
        ops: started,
        required: BTreeMap::from([("a", marks.clone()), ("d", vec![])]),
    });
    drop(s);
    (crash, created, checkpoints)
}

fn has_magic(image: &[u8]) -> bool {
    image.len() >= 4 && image[..4] == [0x51, 0x46, 0x49, 0xfb]
}

#[test]
fn no_crash_point_is_corrupt_or_falsely_clean() {
    let (mut rng, seed) = seeded_rng("no_crash_point_is_corrupt_or_falsely_clean");
    let dir = tempfile::tempdir().unwrap();
    let mut qemu_checked = 0;
    let mut qemu_leaks = 0;
    // qemu-img check runs on every crash image (about 7 s in all); DBM_CRASH_SAMPLE=N checks
    // a seeded 1 in N instead.
    let every: u32 = std::env::var("DBM_CRASH_SAMPLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1);
    for cs in [512u64, 4096, 65536] {
        let (crash, created, checkpoints) = run_workload(cs, seed ^ cs);
        let mut points = 0;
        let mut inconsistent = 0;
        let mut clean_checked = 0;
        let mut torn_header = 0;
        for mode in [
            CrashMode::Dropped,
            CrashMode::Kept,
            CrashMode::Torn { seed },
            CrashMode::Torn { seed: seed ^ 1 },
        ] {
            for (point, image) in crash.crash_images(mode) {
                points += 1;
                let ctx = format!("cs {cs} {mode:?} point {point} (seed {seed})");
                if !has_magic(&image) {
                    assert!(point < created, "{ctx}: lost the magic");
                    continue;
                }
                let s = match BitmapStore::open(MemStorage::from_bytes(image.clone()), false) {
                    Ok(s) => s,
                    // The known limit of docs/CRASH-CONSISTENCY.md: cluster 0 torn while the
                    // first bitmap is added (a new extension frame over old zero data).
                    // Refused as corrupt: detected, never falsely clean; QEMU refuses it too.
                    Err(e)
                        if matches!(mode, CrashMode::Torn { .. })
                            && e.to_string().contains("nb_bitmaps 0") =>
                    {
                        torn_header += 1;
                        continue;
                    }
                    Err(e) => panic!("{ctx}: {e}"),
                };
                // qemu-img check: never corruption.
                if rng.random_range(0..every) == 0 {
                    let path = dir.path().join("c.qcow2");
                    std::fs::write(&path, &image).unwrap();
                    let out = run("qemu-img", &["check", "-f", "qcow2", p(&path)]);
                    let code = out.status.code();
                    assert!(
                        code == Some(0) || code == Some(3),
                        "{ctx}: qemu-img check {code:?}: {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    qemu_checked += 1;
                    qemu_leaks += usize::from(code == Some(3));
                }
                let r = s.image().check().unwrap();
                assert_eq!(r.corruptions, 0, "{ctx}: {:?}", r.messages);
                let required = checkpoints.iter().rev().find(|c| c.ops <= point);
                for info in s.list() {
                    if info.state == BitmapState::Inconsistent {
                        inconsistent += 1;
                        continue;
                    }
                    let Some(req) = required.and_then(|c| c.required.get(info.name.as_str()))
                    else {
                        continue;
                    };
                    let bm = s.load(&info.name).unwrap();
                    clean_checked += 1;
                    for &(off, len) in req {
                        assert!(
                            bm.is_dirty(off) && bm.is_dirty(off + len - 1),
                            "{ctx}: false clean: {} misses ({off}, {len})",
                            info.name
                        );
                    }
                }
            }
        }
        eprintln!(
            "cs {cs}: {points} crash images, {inconsistent} inconsistent bitmaps, \
             {clean_checked} consistent bitmaps checked against their marks, \
             {torn_header} refused for a torn first-extension header (known limit)"
        );
        assert!(points > 100 && inconsistent > 0 && clean_checked > 0);
        // The final image is clean and holds everything.
        let s = BitmapStore::open(MemStorage::from_bytes(crash.live_image()), false).unwrap();
        assert!(s.image().check().unwrap().is_clean());
    }
    eprintln!("qemu-img check ran on {qemu_checked} crash images: {qemu_leaks} with leaks only, the rest clean");
    assert!(qemu_checked > 0);
}
