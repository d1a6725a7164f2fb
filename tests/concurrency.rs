//! Concurrency: writers mark (and clear) while a flusher or a harvester runs. Nothing a
//! writer did may be lost, and the summary levels must agree with the words afterwards.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use common::{extents_of_bytes, flush_changed, seeded_rng, serialize_all};
use dirty_bitmap::DirtyBitmap;
use rand::RngExt;

const WRITERS: usize = 3;
const OPS_PER_WRITER: usize = 30_000;

/// Random ranges over a disk of `disk` bytes: mostly small writes, some long runs.
fn random_ranges(rng: &mut impl RngExt, disk: u64, n: usize) -> Vec<(u64, u64)> {
    (0..n)
        .map(|_| {
            let off = rng.random_range(0..disk);
            let len = match rng.random_range(0..10) {
                0 => rng.random_range(0..disk / 8),
                1..=3 => rng.random_range(1..1 << 20),
                _ => rng.random_range(1..64 << 10),
            };
            (off, len)
        })
        .collect()
}

/// Runs `writers` threads over their ranges while `harvest` runs repeatedly on this
/// thread; returns after the writers finish. The writers start when this thread is about
/// to harvest, so the first harvest races them however the threads are scheduled (on a
/// loaded machine the writers once finished before this thread looked at them).
fn race(bm: &Arc<DirtyBitmap>, plans: Vec<Vec<(u64, u64, bool)>>, mut harvest: impl FnMut()) {
    let done = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = plans
        .into_iter()
        .map(|plan| {
            let bm = Arc::clone(bm);
            let go = Arc::clone(&go);
            thread::spawn(move || {
                while !go.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
                for (off, len, clear) in plan {
                    if clear {
                        bm.clear(off, len);
                    } else {
                        bm.mark_dirty(off, len);
                    }
                }
            })
        })
        .collect();
    let waiter = {
        let done = Arc::clone(&done);
        thread::spawn(move || {
            for h in handles {
                h.join().unwrap();
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut rounds = 0u64;
    go.store(true, Ordering::SeqCst);
    loop {
        harvest();
        rounds += 1;
        if done.load(Ordering::SeqCst) {
            break;
        }
    }
    waiter.join().unwrap();
    eprintln!("harvest rounds during the race: {rounds}");
}

fn expected_from_ranges(disk: u64, g: u64, ranges: &[(u64, u64)]) -> DirtyBitmap {
    let exp = DirtyBitmap::new(disk, g).unwrap();
    for &(o, l) in ranges {
        exp.mark_dirty(o, l);
    }
    exp
}

#[test]
fn flusher_shadow_plus_last_take_equals_bitmap_while_writers_mark() {
    let (mut rng, _) = seeded_rng("flusher_shadow");
    let disk = 64 << 30; // 1 Mi bits at 64 KiB: several summary levels, 32 regions of 4 KiB
    let g = 64 << 10;
    let bm = Arc::new(DirtyBitmap::new(disk, g).unwrap());
    let plans: Vec<Vec<(u64, u64)>> = (0..WRITERS)
        .map(|_| random_ranges(&mut rng, disk, OPS_PER_WRITER))
        .collect();
    let all: Vec<(u64, u64)> = plans.iter().flatten().copied().collect();

    let mut shadow = vec![0u8; bm.serialized_len() as usize];
    let marks = plans
        .into_iter()
        .map(|p| p.into_iter().map(|(o, l)| (o, l, false)).collect())
        .collect();
    race(&bm, marks, || flush_changed(&bm, &mut shadow));
    flush_changed(&bm, &mut shadow);

    assert_eq!(
        shadow,
        serialize_all(&bm),
        "shadow plus the last take differs from the bitmap"
    );
    for &(o, l) in &all {
        let end = (o + l).min(disk);
        assert!(
            bm.next_clean(o).is_none_or(|c| c >= end),
            "range {o}+{l} lost a bit"
        );
    }
    let exp = expected_from_ranges(disk, g, &all);
    assert_eq!(
        serialize_all(&bm),
        serialize_all(&exp),
        "extra or missing bits"
    );
    assert_eq!(bm.count(), exp.count());
}

#[test]
fn flusher_shadow_tracks_concurrent_marks_and_clears() {
    let (mut rng, _) = seeded_rng("flusher_shadow_with_clears");
    let disk = 8 << 30;
    let g = 64 << 10;
    let bm = Arc::new(DirtyBitmap::with_region_size(disk, g, 512).unwrap());
    let plans: Vec<Vec<(u64, u64, bool)>> = (0..WRITERS)
        .map(|i| {
            random_ranges(&mut rng, disk, OPS_PER_WRITER)
                .into_iter()
                .map(|(o, l)| (o, l, i == 0 && rng.random_range(0..3) == 0))
                .collect()
        })
        .collect();
    let mut shadow = vec![0u8; bm.serialized_len() as usize];
    race(&bm, plans, || flush_changed(&bm, &mut shadow));
    flush_changed(&bm, &mut shadow);
    let now = serialize_all(&bm);
    assert_eq!(
        shadow, now,
        "a change (mark or clear) escaped the change map"
    );
    // The summaries agree with the words once the race is over.
    assert_eq!(
        bm.dirty_extents().collect::<Vec<_>>(),
        extents_of_bytes(&now, g, disk)
    );
    let ones: u64 = now.iter().map(|b| u64::from(b.count_ones())).sum();
    assert_eq!(bm.count(), ones);
}

#[test]
fn take_dirty_harvester_loses_no_mark() {
    let (mut rng, _) = seeded_rng("take_dirty_harvester");
    let disk = 64 << 30;
    let g = 64 << 10;
    let bm = Arc::new(DirtyBitmap::new(disk, g).unwrap());
    let plans: Vec<Vec<(u64, u64)>> = (0..WRITERS)
        .map(|_| random_ranges(&mut rng, disk, OPS_PER_WRITER))
        .collect();
    let all: Vec<(u64, u64)> = plans.iter().flatten().copied().collect();
    let harvested = DirtyBitmap::new(disk, g).unwrap();
    let mut takes = 0u64;
    let marks = plans
        .into_iter()
        .map(|p| p.into_iter().map(|(o, l)| (o, l, false)).collect())
        .collect();
    race(&bm, marks, || {
        let t = bm.take_dirty();
        takes += t.count();
        harvested.merge_from(&t).unwrap();
    });
    let last = bm.take_dirty();
    harvested.merge_from(&last).unwrap();

    let exp = expected_from_ranges(disk, g, &all);
    assert_eq!(
        serialize_all(&harvested),
        serialize_all(&exp),
        "a mark was lost or invented"
    );
    assert_eq!(bm.count(), 0);
    assert_eq!(bm.dirty_extents().next(), None);
    assert_eq!(bm.next_dirty(0), None);
    assert_eq!(bm.next_clean(0), Some(0));
    assert!(takes + last.count() >= exp.count());
}

#[test]
fn summaries_stay_exact_under_contended_marks_and_clears() {
    // A small disk so that every thread hammers the same blocks and summary words, with
    // block-sized and word-sized ranges that flip both towers back and forth.
    let (mut rng, _) = seeded_rng("summaries_contended");
    let g = 512;
    let nbits = 40_000u64;
    let disk = nbits * g - 100;
    for round in 0..20 {
        let bm = Arc::new(DirtyBitmap::new(disk, g).unwrap());
        let plans: Vec<Vec<(u64, u64, bool)>> = (0..WRITERS)
            .map(|_| {
                (0..5_000)
                    .map(|_| {
                        let unit = [64u64, 512, 4096][rng.random_range(0..3)];
                        let first = rng.random_range(0..nbits / unit) * unit;
                        let n = rng.random_range(1..4) * unit;
                        (first * g, n * g, rng.random_range(0..2) == 0)
                    })
                    .collect()
            })
            .collect();
        race(&bm, plans, || {
            let _ = bm.next_clean(0);
        });
        let bytes = serialize_all(&bm);
        assert_eq!(
            bm.dirty_extents().collect::<Vec<_>>(),
            extents_of_bytes(&bytes, g, disk),
            "round {round}: summaries disagree with the words"
        );
        let ones: u64 = bytes.iter().map(|b| u64::from(b.count_ones())).sum();
        assert_eq!(bm.count(), ones, "round {round}: count");
    }
}

#[test]
fn full_tower_never_keeps_a_stale_full_bit() {
    // Each round, one thread fills a block (the last word it fills makes the block full and
    // sets the full bit) while the other clears a word of that block at a random moment.
    // After the round, clean-bit search (which trusts the full tower) must match the words.
    // Block 0 stays full and the race is in block 1: searches scan their starting block
    // directly, so a stale full bit only misleads them in a later block.
    let (mut rng, seed) = seeded_rng("full_tower_stale_bit");
    let g = 512u64;
    let nbits = 512 * 65;
    let bm = Arc::new(DirtyBitmap::new(nbits * g, g).unwrap());
    let rounds = 20_000;
    let barrier = Arc::new(std::sync::Barrier::new(3));
    let block = 512 * g;
    let spawn = |t: u64| {
        let bm = Arc::clone(&bm);
        let barrier = Arc::clone(&barrier);
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed ^ (t + 1));
        thread::spawn(move || {
            for _ in 0..rounds {
                barrier.wait();
                if t == 0 {
                    bm.mark_dirty(block, block);
                } else {
                    for _ in 0..rng.random_range(0..200) {
                        std::hint::spin_loop();
                    }
                    let word = rng.random_range(0..8u64);
                    bm.clear(block + word * 64 * g, 64 * g);
                }
                barrier.wait();
                barrier.wait();
            }
        })
    };
    bm.mark_dirty(0, block);
    let workers = [spawn(0), spawn(1)];
    let mut stale_windows = 0;
    for round in 0..rounds {
        barrier.wait();
        barrier.wait();
        let bytes = serialize_all(&bm);
        let first_clean = (0..nbits).find(|&b| bytes[(b / 8) as usize] & (1 << (b % 8)) == 0);
        if first_clean.is_some_and(|b| (512..1024).contains(&b)) {
            stale_windows += 1;
        }
        assert_eq!(
            bm.next_clean(0),
            first_clean.map(|b| b * g),
            "round {round}: stale full bit"
        );
        let probe = rng.random_range(0..nbits);
        let exp = (probe..nbits).find(|&b| bytes[(b / 8) as usize] & (1 << (b % 8)) == 0);
        assert_eq!(
            bm.next_clean(probe * g),
            exp.map(|b| b * g),
            "round {round}"
        );
        bm.clear(block, block);
        barrier.wait();
    }
    for w in workers {
        w.join().unwrap();
    }
    eprintln!("rounds that ended with the block partly full: {stale_windows}");
    // Both orders happened: a clear after the fill (the block ends partly full, the full
    // bit must be gone) and one the fill covered (the block ends full). Without the first,
    // no round tested a stale full bit at all.
    assert!(
        stale_windows > 0 && stale_windows < rounds,
        "{stale_windows} of {rounds} rounds ended with the block partly full"
    );
}

#[test]
fn count_stays_exact_with_more_threads_than_counter_slots_and_thread_churn() {
    // 48 threads alive at once (more than the 32 per-thread counter slots, so some share
    // the fallback slot), then 200 short-lived threads that take over freed slots.
    let (mut rng, _) = seeded_rng("count_thread_churn");
    let g = 4096u64;
    let disk = 1 << 30;
    let bm = Arc::new(DirtyBitmap::new(disk, g).unwrap());
    let barrier = Arc::new(std::sync::Barrier::new(48));
    let alive: Vec<_> = (0..48)
        .map(|_| {
            let bm = Arc::clone(&bm);
            let barrier = Arc::clone(&barrier);
            let picks: Vec<(u64, bool)> = (0..2000)
                .map(|_| {
                    (
                        rng.random_range(0..disk / g) * g,
                        rng.random_range(0..4) == 0,
                    )
                })
                .collect();
            thread::spawn(move || {
                barrier.wait();
                for (off, clear) in picks {
                    if clear {
                        bm.clear(off, g);
                    } else {
                        bm.mark_dirty(off, g);
                    }
                }
            })
        })
        .collect();
    for t in alive {
        t.join().unwrap();
    }
    for _ in 0..200 {
        let bm = Arc::clone(&bm);
        let off = rng.random_range(0..disk / g) * g;
        let len = rng.random_range(1..64) * g;
        let clear = rng.random_range(0..3) == 0;
        thread::spawn(move || {
            if clear {
                bm.clear(off, len);
            } else {
                bm.mark_dirty(off, len);
            }
        })
        .join()
        .unwrap();
    }
    let ones: u64 = serialize_all(&bm)
        .iter()
        .map(|b| u64::from(b.count_ones()))
        .sum();
    assert_eq!(bm.count(), ones);
    let taken = bm.take_dirty();
    assert_eq!(taken.count(), ones);
    assert_eq!(bm.count(), 0);
}

/// What one consumer of `consumers_and_the_flusher_each_see_every_change` saw.
struct ConsumerRun {
    /// The union of its takes.
    taken: dirty_bitmap::ChangedRegions,
    /// Its copy of the bitmap: for `AllRegions` built from its takes alone, for `Empty`
    /// from a whole read right after `add_consumer` plus its takes.
    copy: Vec<u8>,
    takes: u64,
}

/// Serializes the regions of `set` into their places in `copy`.
fn serialize_regions(bm: &DirtyBitmap, set: &dirty_bitmap::ChangedRegions, copy: &mut [u8]) {
    let rs = bm.region_size() as usize;
    for r in set {
        let s = r as usize * rs;
        let l = bm.region_len(r) as usize;
        bm.serialize_region(r, &mut copy[s..s + l]).unwrap();
    }
}

/// One consumer's thread: waits until writer 0 has made `start_after` operations, adds a
/// consumer with `start`, then takes at random moments until `done`, and once more after.
fn run_consumer(
    bm: &Arc<DirtyBitmap>,
    start: dirty_bitmap::ConsumerStart,
    start_after: u64,
    progress: &std::sync::atomic::AtomicU64,
    added: &AtomicBool,
    done: &AtomicBool,
    rng: &mut rand::rngs::SmallRng,
) -> ConsumerRun {
    while progress.load(Ordering::SeqCst) < start_after && !done.load(Ordering::SeqCst) {
        thread::yield_now();
    }
    let c = bm.add_consumer(start).unwrap();
    added.store(true, Ordering::SeqCst);
    let mut copy = match start {
        dirty_bitmap::ConsumerStart::Empty => serialize_all(bm),
        _ => vec![0u8; bm.serialized_len() as usize],
    };
    let mut taken = c.take_changed();
    let mut takes = 1;
    serialize_regions(bm, &taken, &mut copy);
    loop {
        let last = done.load(Ordering::SeqCst);
        for _ in 0..rng.random_range(0..20_000) {
            std::hint::spin_loop();
        }
        let set = c.take_changed();
        serialize_regions(bm, &set, &mut copy);
        taken.union_with(&set);
        takes += 1;
        if last {
            break;
        }
    }
    ConsumerRun { taken, copy, takes }
}

#[test]
fn consumers_and_the_flusher_each_see_every_change() {
    // Writers flip bits (each owns the bits of its residue, clearing a dirty one before
    // marking it, so every mark is a change) over 64 regions. One consumer is added with
    // every region and one empty, each at a random point of the run, and each takes at
    // random moments; the flusher takes throughout. At the end, each consumer's takes
    // cover every region a mark touched after it was added, each consumer's copy and the
    // flusher's equal the bitmap: no take stole another's regions.
    use dirty_bitmap::ConsumerStart;
    use rand::SeedableRng;
    use std::sync::atomic::AtomicU64;

    let (mut rng, seed) = seeded_rng("consumers_take_at_random");
    let g = 4096u64;
    let region_bits = 512 * 8;
    let nregions = 64u64;
    let nbits = nregions * region_bits;
    let ops = 60_000u64;
    let bm = Arc::new(DirtyBitmap::with_region_size(nbits * g, g, 512).unwrap());
    let progress = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let added = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
    let starts = [ConsumerStart::AllRegions, ConsumerStart::Empty];

    let writers: Vec<_> = (0..WRITERS as u64)
        .map(|t| {
            let bm = Arc::clone(&bm);
            let progress = Arc::clone(&progress);
            let added = Arc::clone(&added);
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ (t + 1));
            thread::spawn(move || {
                // Regions each consumer must see: touched by a mark begun after it was added.
                let mut owed = [
                    vec![false; nregions as usize],
                    vec![false; nregions as usize],
                ];
                for _ in 0..ops {
                    let bit = rng.random_range(0..nbits / WRITERS as u64) * WRITERS as u64 + t;
                    let after = [
                        added[0].load(Ordering::SeqCst),
                        added[1].load(Ordering::SeqCst),
                    ];
                    if bm.is_dirty(bit * g) {
                        bm.clear(bit * g, g);
                    }
                    bm.mark_dirty(bit * g, g);
                    for (owed, after) in owed.iter_mut().zip(after) {
                        if after {
                            owed[(bit / region_bits) as usize] = true;
                        }
                    }
                    if t == 0 {
                        progress.fetch_add(1, Ordering::SeqCst);
                    }
                }
                owed
            })
        })
        .collect();
    let consumers: Vec<_> = (0..2)
        .map(|k| {
            let bm = Arc::clone(&bm);
            let progress = Arc::clone(&progress);
            let added = Arc::clone(&added);
            let done = Arc::clone(&done);
            let start_after = rng.random_range(0..ops / 2);
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ (k + 100));
            thread::spawn(move || {
                run_consumer(
                    &bm,
                    starts[k as usize],
                    start_after,
                    &progress,
                    &added[k as usize],
                    &done,
                    &mut rng,
                )
            })
        })
        .collect();

    let mut shadow = vec![0u8; bm.serialized_len() as usize];
    let mut flushes = 0u64;
    while writers.iter().any(|w| !w.is_finished()) {
        flush_changed(&bm, &mut shadow);
        flushes += 1;
    }
    let owed: Vec<[Vec<bool>; 2]> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    done.store(true, Ordering::SeqCst);
    let runs: Vec<ConsumerRun> = consumers.into_iter().map(|c| c.join().unwrap()).collect();
    flush_changed(&bm, &mut shadow);

    let now = serialize_all(&bm);
    assert_eq!(shadow, now, "seed {seed}: the flusher missed a change");
    for (k, run) in runs.iter().enumerate() {
        let owed_regions: Vec<u64> = (0..nregions)
            .filter(|&r| owed.iter().any(|w| w[k][r as usize]))
            .collect();
        eprintln!(
            "consumer {k} ({:?}): {} takes, {} regions taken, {} owed; flusher: {flushes} takes",
            starts[k],
            run.takes,
            run.taken.len(),
            owed_regions.len()
        );
        for r in owed_regions {
            assert!(
                run.taken.contains(r),
                "seed {seed}: consumer {k} never took region {r}, marked after it was added"
            );
        }
        assert_eq!(
            run.copy, now,
            "seed {seed}: consumer {k}'s copy misses a change"
        );
    }
    assert_eq!(bm.consumer_count(), 0);
}

/// Draws from [`seeded_rng`]; [`a_malformed_seed_fails_the_test`] runs it under a bad seed.
#[test]
fn seeded_rng_probe() {
    let (mut rng, seed) = seeded_rng("seeded_rng_probe");
    let _: u64 = rng.random();
    eprintln!("seeded_rng_probe ran with seed {seed}");
}

/// A `DBM_TEST_SEED` that is not a seed fails the test, naming the variable and the value:
/// a replay that fell back to a random seed would pass without replaying anything.
#[test]
fn a_malformed_seed_fails_the_test() {
    for bad in ["12x", "-1", "18446744073709551616", ""] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seeded_rng_probe",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("DBM_TEST_SEED", bad)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "DBM_TEST_SEED={bad:?} ran: {text}");
        assert!(
            text.contains(&format!("DBM_TEST_SEED={bad:?} is not a seed")),
            "DBM_TEST_SEED={bad:?}: {text}"
        );
        assert!(!text.contains("seeded_rng_probe ran"), "{text}");
    }
    // A good one runs with exactly that seed.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "seeded_rng_probe", "--nocapture"])
        .env("DBM_TEST_SEED", "42")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("seeded_rng_probe ran with seed 42"), "{text}");
}

/// A sweep size (`DBM_KILL_DRILL`, `DBM_CRASH_SAMPLE`, `DBM_MIGRATION_SCENARIOS`, ...) that
/// is not a number fails the test, naming the variable and the value; unset, the default.
/// The probe variable is this test's alone.
#[test]
fn a_malformed_sweep_size_fails_the_test() {
    const VAR: &str = "DBM_ENV_NUMBER_PROBE";
    std::env::remove_var(VAR);
    assert_eq!(common::env_number(VAR, 7u32), 7);
    std::env::set_var(VAR, "12");
    assert_eq!(common::env_number(VAR, 7u32), 12);
    for bad in ["12x", "-1", ""] {
        std::env::set_var(VAR, bad);
        let r = std::panic::catch_unwind(|| common::env_number(VAR, 7u32));
        let msg = r
            .err()
            .and_then(|e| e.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| panic!("{VAR}={bad:?} ran with a default"));
        assert!(
            msg.contains(&format!("{VAR}={bad:?} is not a number")),
            "{msg}"
        );
    }
    std::env::remove_var(VAR);
}
