//! Threaded stress tests for the races `tests/loom.rs` models exhaustively on tiny
//! bitmaps: a mark returning on another mark's unfinished work, a search overlapping a
//! clear, disabling during a long range mark, the count while marks and clears race, and
//! handing marking over between two bitmaps of one tracker. Each prints its seed.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{seeded_rng, serialize_all};
use dirty_bitmap::{DirtyBitmap, Tracker};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

/// Spins for a random handful of iterations, so that two threads released by a barrier
/// meet at varying points of each other's operations.
fn jitter(rng: &mut SmallRng, max: u32) {
    for _ in 0..rng.random_range(0..max) {
        std::hint::spin_loop();
    }
}

#[test]
fn a_mark_returning_on_a_running_marks_bit_sees_it_in_flight_or_recorded() {
    // Two threads mark the same clean bit each round; whichever returns on the other's
    // bit checks what a store's inactivate checks: a mark in flight, or a changed region.
    let (_, seed) = seeded_rng("mark_returning_on_running_mark");
    let g = 4096u64;
    let bits = 200_000u64;
    let bm = Arc::new(DirtyBitmap::with_region_size(bits * g, g, 512).unwrap());
    let barrier = Arc::new(Barrier::new(3));
    let misses = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let spawn = |t: u64| {
        let bm = Arc::clone(&bm);
        let barrier = Arc::clone(&barrier);
        let misses = Arc::clone(&misses);
        let stop = Arc::clone(&stop);
        let mut rng = SmallRng::seed_from_u64(seed ^ (t + 1));
        thread::spawn(move || {
            for r in 0.. {
                barrier.wait();
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                jitter(&mut rng, 40);
                bm.mark_dirty(r * g, 1);
                if !bm.marks_in_flight() && bm.changed_region_count() == 0 {
                    misses.fetch_add(1, Ordering::Relaxed);
                }
                barrier.wait();
            }
        })
    };
    let workers = [spawn(0), spawn(1)];
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut done = 0;
    while done < bits && Instant::now() < deadline {
        // Between rounds no mark runs: empty the change map for the next one.
        let _ = bm.take_changed();
        barrier.wait();
        barrier.wait();
        done += 1;
    }
    stop.store(true, Ordering::SeqCst);
    barrier.wait();
    for w in workers {
        w.join().unwrap();
    }
    eprintln!("{done} rounds");
    assert_eq!(
        misses.load(Ordering::Relaxed),
        0,
        "a mark returned on a bit whose region was not recorded, with no mark in flight"
    );
}

#[test]
fn a_search_never_misses_a_word_that_stays_dirty_while_its_neighbour_is_cleared() {
    // Block 1 holds words 1 and 3. One thread empties and refills word 1 over and over
    // while this one searches from offset 0 (which scans block 0 itself, so block 1 is
    // found through the towers); word 3 stays dirty throughout and must always be found.
    let (_, seed) = seeded_rng("search_vs_clear");
    let g = 512u64;
    let word = 64 * g;
    let block = 8 * word;
    let bm = Arc::new(DirtyBitmap::new(3 * block, g).unwrap());
    bm.mark_dirty(block + 3 * word, g);
    let stop = Arc::new(AtomicBool::new(false));
    let clearer = {
        let bm = Arc::clone(&bm);
        let stop = Arc::clone(&stop);
        let mut rng = SmallRng::seed_from_u64(seed);
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                bm.mark_dirty(block + word, g);
                jitter(&mut rng, 20);
                bm.clear(block + word, g);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut searches = 0u64;
    while Instant::now() < deadline {
        for _ in 0..100 {
            let found = bm.next_dirty(0);
            assert!(
                found == Some(block + word) || found == Some(block + 3 * word),
                "search {searches}: next_dirty found {found:?}"
            );
            assert!(
                bm.dirty_extents().any(|e| e == (block + 3 * word, g)),
                "search {searches}: the extents miss the word that stayed dirty"
            );
            assert!(
                bm.snapshot().is_dirty(block + 3 * word),
                "search {searches}: snapshot"
            );
            searches += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    clearer.join().unwrap();
    eprintln!("{searches} searches");
}

#[test]
fn no_word_changes_after_disabling_returns_during_long_range_marks() {
    // A writer marks the whole disk over and over, each call a range of 256 Ki words;
    // disabling must wait for the call in flight, after which the words stay as they are.
    let (mut rng, _) = seeded_rng("disable_vs_range_mark");
    let g = 4096u64;
    let disk = 64u64 << 30;
    let bm = Arc::new(DirtyBitmap::new(disk, g).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let bm = Arc::clone(&bm);
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                bm.mark_dirty(0, disk);
            }
        })
    };
    // Only a round whose disable began while the writer's pass was partway (the bitmap
    // not yet full) tests anything: a disable that did not wait for that pass would return
    // on a partial bitmap that then fills. Once every word is set, a late mark changes
    // nothing. Rounds go on until 20 of those were seen.
    let (mut partial, mut round) = (0, 0);
    while partial < 20 {
        assert!(
            round < 2000,
            "{partial} of {round} rounds began disabling partway through a pass"
        );
        bm.clear(0, disk);
        bm.set_enabled(true);
        // A spin, not a sleep: a sleep's least length outlasts a whole pass.
        let until = Instant::now() + Duration::from_micros(rng.random_range(0..400));
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        let before = bm.count();
        bm.set_enabled(false);
        let at_return = serialize_all(&bm);
        thread::sleep(Duration::from_millis(2));
        assert!(
            serialize_all(&bm) == at_return,
            "round {round}: words changed after set_enabled(false) returned"
        );
        partial += usize::from(before > 0 && before < bm.bit_count());
        round += 1;
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    eprintln!("{partial} of {round} rounds began disabling partway through a pass");
}

#[test]
fn count_and_dirty_bytes_stay_in_range_while_marks_and_clears_race() {
    // Two threads flip the same few bits of an almost empty, then an almost full, bitmap
    // whose last granule is partial; the reader's sums catch the slots mid-update.
    let (_, seed) = seeded_rng("count_in_range");
    let g = 4096u64;
    let bits = 256u64;
    let disk = bits * g - 100;
    for full in [false, true] {
        let bm = Arc::new(DirtyBitmap::new(disk, g).unwrap());
        if full {
            bm.mark_dirty(0, disk);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..2u64)
            .map(|t| {
                let bm = Arc::clone(&bm);
                let stop = Arc::clone(&stop);
                let mut rng = SmallRng::seed_from_u64(seed ^ (t + 1));
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let off = (bits - 1 - rng.random_range(0..4)) * g;
                        bm.mark_dirty(off, 1);
                        bm.clear(off, g);
                        if full {
                            bm.mark_dirty(off, 1);
                        }
                    }
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_millis(1500);
        let mut reads = 0u64;
        while Instant::now() < deadline {
            let c = bm.count();
            let b = bm.dirty_bytes();
            assert!(c <= bm.bit_count(), "count {c} > {} bits", bm.bit_count());
            assert!(b <= disk, "dirty_bytes {b} > disk size {disk}");
            reads += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        eprintln!("full={full}: {reads} reads");
    }
}

/// A writer marks granule after granule through a tracker over A and B while this thread
/// enables B and then disables A; every mark the writer completed must be in A or B.
fn hand_over(b_first: bool) {
    let (mut rng, _) = seeded_rng(if b_first {
        "hand_over_b_first"
    } else {
        "hand_over_a_first"
    });
    let g = 4096u64;
    let bits = 1u64 << 18;
    for round in 0..50 {
        let a = Arc::new(DirtyBitmap::new(bits * g, g).unwrap());
        let b = Arc::new(DirtyBitmap::new(bits * g, g).unwrap());
        b.set_enabled(false);
        let list = if b_first {
            vec![Arc::clone(&b), Arc::clone(&a)]
        } else {
            vec![Arc::clone(&a), Arc::clone(&b)]
        };
        let tracker = Tracker::new(list);
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let done = Arc::clone(&done);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut k = 0;
                while k < bits && !stop.load(Ordering::Relaxed) {
                    tracker.mark(k * g, 1);
                    k += 1;
                    done.store(k, Ordering::Release);
                }
            })
        };
        thread::sleep(Duration::from_micros(rng.random_range(0..500)));
        b.set_enabled(true);
        a.set_enabled(false);
        thread::sleep(Duration::from_micros(200));
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let n = done.load(Ordering::Acquire);
        for k in 0..n {
            assert!(
                a.is_dirty(k * g) || b.is_dirty(k * g),
                "round {round}: mark {k} of {n} is in neither bitmap"
            );
        }
    }
}

#[test]
fn enabling_b_then_disabling_a_loses_no_mark_with_a_first_in_the_tracker() {
    hand_over(false);
}

#[test]
fn enabling_b_then_disabling_a_loses_no_mark_with_b_first_in_the_tracker() {
    hand_over(true);
}

/// A fan-out over X and Z meets X sealed (as a store holds its bitmaps sealed while a stop
/// writes, and for good once a stop could not take its "clean" back). Disabling an
/// unrelated bitmap Y waits for the fan-outs in flight, so it must not wait for this one
/// while X stays sealed; once X is unsealed the mark completes, in X and in Z.
#[test]
fn disabling_an_unrelated_bitmap_returns_while_a_fan_out_waits_for_an_unseal() {
    let g = 4096u64;
    let x = Arc::new(DirtyBitmap::new(1 << 30, g).unwrap());
    let z = Arc::new(DirtyBitmap::new(1 << 30, g).unwrap());
    let y = Arc::new(DirtyBitmap::new(1 << 30, g).unwrap());
    // Z first: the fan-out marks Z, then meets X sealed and waits, so Z's bit is the
    // evidence that the writer reached the fan-out before Y is disabled (without it, a
    // writer not yet started would let the disable return whatever the fan-out does).
    let tracker = Tracker::new(vec![Arc::clone(&z), Arc::clone(&x)]);
    x.seal();
    let marked = Arc::new(AtomicBool::new(false));
    let writer = {
        let marked = Arc::clone(&marked);
        thread::spawn(move || {
            tracker.mark(5 * g, 1);
            marked.store(true, Ordering::SeqCst);
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !z.is_dirty(5 * g) {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never reached the fan-out"
        );
        thread::yield_now();
    }
    assert!(
        !marked.load(Ordering::SeqCst) && !x.is_dirty(5 * g),
        "a mark wrote a sealed bitmap"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let disabler = {
        let y = Arc::clone(&y);
        thread::spawn(move || {
            y.set_enabled(false);
            tx.send(()).unwrap();
        })
    };
    let returned = rx.recv_timeout(Duration::from_secs(5)).is_ok();
    let still_sealed = x.is_sealed() && !marked.load(Ordering::SeqCst);
    // Unseal before asserting, so that a failure does not leave threads spinning.
    x.unseal();
    disabler.join().unwrap();
    writer.join().unwrap();
    assert!(
        returned,
        "set_enabled(false) on an unrelated bitmap waited for a fan-out blocked on a seal"
    );
    assert!(still_sealed, "the mark returned while X was sealed");
    assert!(
        x.is_dirty(5 * g) && z.is_dirty(5 * g),
        "the mark is not in both"
    );
    assert!(!y.is_enabled() && !y.is_dirty(5 * g));
}

/// A mark whose bits are all set returns at once on a sealed bitmap, as `seal` documents,
/// whether its range lies in one word or spans several, alone or fanned out over two
/// bitmaps; a range with one clear bit still waits for the unseal and then lands.
#[test]
fn a_mark_on_set_bits_spanning_words_returns_while_sealed() {
    let g = 4096u64;
    let x = Arc::new(DirtyBitmap::new(1 << 30, g).unwrap());
    let z = Arc::new(DirtyBitmap::new(1 << 30, g).unwrap());
    // 256 granules: four whole words, plus a range starting and ending inside words.
    x.mark_dirty(0, 1 << 20);
    z.mark_dirty(0, 1 << 20);
    x.seal();
    z.seal();
    let tracker = Tracker::new(vec![Arc::clone(&x), Arc::clone(&z)]);
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = {
        let x = Arc::clone(&x);
        thread::spawn(move || {
            x.mark_dirty(0, 1 << 20);
            tx.send("one bitmap, four words").unwrap();
            x.mark_dirty(10 * g, 100 * g);
            tx.send("one bitmap, a range inside words").unwrap();
            tracker.mark(3 * g, 200 * g);
            tx.send("a fan-out over two").unwrap();
            // Granule 256 is clean: this one waits for the unseal.
            tracker.mark(200 * g, 100 * g);
            tx.send("a range with a clean bit").unwrap();
        })
    };
    let mut done = Vec::new();
    while let Ok(what) = rx.recv_timeout(Duration::from_secs(5)) {
        done.push(what);
        if done.len() == 3 {
            break;
        }
    }
    let waited = rx.recv_timeout(Duration::from_millis(200)).is_err();
    let clean_while_sealed = !x.is_dirty(256 * g) && !z.is_dirty(256 * g);
    // Unseal before asserting, so that a failure does not leave the writer waiting.
    x.unseal();
    z.unseal();
    writer.join().unwrap();
    assert_eq!(
        done,
        [
            "one bitmap, four words",
            "one bitmap, a range inside words",
            "a fan-out over two"
        ],
        "a mark on set bits waited for the unseal"
    );
    assert!(
        waited && clean_while_sealed,
        "a mark with a clean bit returned or wrote while sealed"
    );
    assert!(x.is_dirty(299 * g) && z.is_dirty(299 * g));
}
