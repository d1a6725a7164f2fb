//! Exhaustive interleaving checks of the lock-free protocols, with loom.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom` (scripts/test.sh does).
//! Each model races two operations and then checks what the race must not break: that the
//! summary towers, the counter and the change map agree with the leaf words, that a search
//! finds what stayed dirty throughout, that a mark is recorded or seen in flight, that a
//! disabled bitmap stays as it was.
#![cfg(loom)]

use dirty_bitmap::{ChangedRegions, ConsumerStart, DirtyBitmap};
use loom::sync::atomic::AtomicBool;
use loom::sync::Arc;
use loom::thread;
use std::sync::atomic::Ordering::SeqCst;

const G: u64 = 512;
const WORD: u64 = 64 * G;
const BLOCK: u64 = 8 * WORD;

/// Explores every interleaving with at most 3 preemptions, prints how many executions that
/// took, and fails a model that explored only one: every model here races two threads, so
/// a single execution means loom never tried them in another order and checked nothing
/// about the race.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.max_branches = 100_000;
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&runs);
    b.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    let name = std::thread::current().name().unwrap_or("model").to_string();
    let runs = runs.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{name}: {runs} executions");
    assert!(
        runs > 1,
        "{name}: loom explored {runs} execution, a single interleaving of the race"
    );
}

/// An atomic read on the main thread right after the spawn. loom's scheduler only starts
/// trying the other thread first once the main thread has made such an access; without
/// it, some models ran a single execution with the spawned thread strictly last.
fn switch_point(bm: &DirtyBitmap) {
    let _ = bm.count();
}

/// Bit-by-bit truth from the serialized leaf words (one load per word).
fn truth(bm: &DirtyBitmap) -> Vec<bool> {
    let bytes = serialize_all(bm);
    (0..bm.bit_count())
        .map(|b| bytes[(b / 8) as usize] & (1 << (b % 8)) != 0)
        .collect()
}

/// Asserts that every search structure agrees with the leaf words.
fn assert_consistent(bm: &DirtyBitmap) {
    let bits = truth(bm);
    let first_dirty = bits.iter().position(|&d| d).map(|b| b as u64 * G);
    let first_clean = bits.iter().position(|&d| !d).map(|b| b as u64 * G);
    assert_eq!(bm.next_dirty(0), first_dirty, "any tower");
    assert_eq!(bm.next_clean(0), first_clean, "full tower");
    assert_eq!(
        bm.count(),
        bits.iter().filter(|&&d| d).count() as u64,
        "count"
    );
    let mut ext: Vec<(u64, u64)> = Vec::new();
    for (b, _) in bits.iter().enumerate().filter(|(_, &d)| d) {
        let s = b as u64 * G;
        match ext.last_mut() {
            Some((o, l)) if *o + *l == s => *l += G,
            _ => ext.push((s, G)),
        }
    }
    assert_eq!(bm.dirty_extents().collect::<Vec<_>>(), ext, "extents");
}

fn serialize_all(bm: &DirtyBitmap) -> Vec<u8> {
    let mut out = vec![0u8; bm.serialized_len() as usize];
    let rs = bm.region_size() as usize;
    for r in 0..bm.region_count() {
        let s = r as usize * rs;
        let l = bm.region_len(r) as usize;
        bm.serialize_region(r, &mut out[s..s + l]).unwrap();
    }
    out
}

// Searches scan the block they start in word by word and consult the towers only past
// it, so every race below happens in a block (or level-1 word) *after* the one a search
// starts from: that is where a stale summary bit would mislead it.

#[test]
fn filling_a_block_races_with_clearing_one_of_its_words() {
    // Block 0 is full; block 1's full check passes, then a word of block 1 is cleared
    // before the full bit is set: the setter's re-check must take the bit back.
    model(|| {
        let bm = Arc::new(DirtyBitmap::new(3 * BLOCK, G).unwrap());
        bm.mark_dirty(0, BLOCK + 7 * WORD);
        let a = Arc::clone(&bm);
        let t = thread::spawn(move || a.mark_dirty(BLOCK + 7 * WORD, WORD));
        switch_point(&bm);
        bm.clear(BLOCK + 3 * WORD, WORD);
        t.join().unwrap();
        assert_consistent(&bm);
        assert_eq!(bm.next_clean(0), Some(BLOCK + 3 * WORD));
    });
}

#[test]
fn filling_a_level_two_word_races_with_clearing_a_block_below_it() {
    // 129 blocks: level-1 word 1 summarizes blocks 64..128 and level 2 summarizes it.
    // Blocks 0..128 are full but for the last word, which one thread fills while the
    // other clears a word of block 70.
    model(|| {
        let bm = Arc::new(DirtyBitmap::new(129 * BLOCK, G).unwrap());
        bm.mark_dirty(0, 128 * BLOCK - WORD);
        let a = Arc::clone(&bm);
        let t = thread::spawn(move || a.mark_dirty(128 * BLOCK - WORD, WORD));
        switch_point(&bm);
        bm.clear(70 * BLOCK, WORD);
        t.join().unwrap();
        assert_consistent(&bm);
        assert_eq!(bm.next_clean(0), Some(70 * BLOCK));
    });
}

#[test]
fn emptying_a_block_races_with_marking_another_word_of_it() {
    model(|| {
        let bm = Arc::new(DirtyBitmap::new(3 * BLOCK, G).unwrap());
        bm.mark_dirty(BLOCK, G);
        let a = Arc::clone(&bm);
        let t = thread::spawn(move || a.clear(BLOCK, G));
        switch_point(&bm);
        bm.mark_dirty(BLOCK + WORD, G);
        t.join().unwrap();
        assert_consistent(&bm);
        assert_eq!(bm.next_dirty(0), Some(BLOCK + WORD));
    });
}

#[test]
fn emptying_a_level_one_word_races_with_marking_a_sibling_block() {
    // 129 blocks: the race is in level-1 word 1 (blocks 64..128).
    model(|| {
        let bm = Arc::new(DirtyBitmap::new(129 * BLOCK, G).unwrap());
        bm.mark_dirty(64 * BLOCK, G);
        let a = Arc::clone(&bm);
        let t = thread::spawn(move || a.clear(64 * BLOCK, G));
        switch_point(&bm);
        bm.mark_dirty(70 * BLOCK, G);
        t.join().unwrap();
        assert_consistent(&bm);
        assert_eq!(bm.next_dirty(0), Some(70 * BLOCK));
    });
}

#[test]
fn a_mark_racing_a_flush_is_in_the_bytes_or_in_the_next_take() {
    model(|| {
        let bm = Arc::new(DirtyBitmap::with_region_size(1024 * 8 * G, G, 512).unwrap());
        let a = Arc::clone(&bm);
        let t = thread::spawn(move || {
            a.mark_dirty(100 * G, G);
            a.mark_dirty(5000 * G, G);
        });
        let mut shadow = vec![0u8; bm.serialized_len() as usize];
        switch_point(&bm);
        for r in bm.take_changed().iter() {
            let s = r as usize * 512;
            let l = bm.region_len(r) as usize;
            bm.serialize_region(r, &mut shadow[s..s + l]).unwrap();
        }
        t.join().unwrap();
        for r in bm.take_changed().iter() {
            let s = r as usize * 512;
            let l = bm.region_len(r) as usize;
            bm.serialize_region(r, &mut shadow[s..s + l]).unwrap();
        }
        assert_eq!(shadow, serialize_all(&bm));
        assert_ne!(shadow[100 / 8] & (1 << (100 % 8)), 0);
        assert_ne!(shadow[5000 / 8] & (1 << (5000 % 8)), 0);
    });
}

#[test]
fn take_dirty_racing_marks_loses_nothing() {
    model(|| {
        let bm = Arc::new(DirtyBitmap::new(2 * BLOCK, G).unwrap());
        bm.mark_dirty(0, G);
        let a = Arc::clone(&bm);
        let t = thread::spawn(move || {
            a.mark_dirty(G, G);
            a.mark_dirty(BLOCK + 2 * G, G);
        });
        switch_point(&bm);
        let taken = bm.take_dirty();
        t.join().unwrap();
        assert_consistent(&bm);
        assert_consistent(&taken);
        for off in [0, G, BLOCK + 2 * G] {
            assert!(bm.is_dirty(off) || taken.is_dirty(off), "bit at {off} lost");
        }
        assert!(taken.is_dirty(0));
    });
}

/// Block 1 holds words 1 and 3; another thread clears word 1 while `search` runs from
/// offset 0. Word 3 is dirty the whole time, so the search must see it.
fn search_races_emptying_a_neighbour(search: fn(&DirtyBitmap) -> bool) {
    model(move || {
        let bm = Arc::new(DirtyBitmap::new(3 * BLOCK, G).unwrap());
        bm.mark_dirty(BLOCK + WORD, G);
        bm.mark_dirty(BLOCK + 3 * WORD, G);
        let a = Arc::clone(&bm);
        let t = thread::spawn(move || a.clear(BLOCK + WORD, G));
        switch_point(&bm);
        assert!(search(&bm), "the search missed a word dirty throughout");
        t.join().unwrap();
        assert_consistent(&bm);
    });
}

#[test]
fn next_dirty_finds_a_word_while_its_neighbour_is_emptied() {
    search_races_emptying_a_neighbour(|bm| {
        let found = bm.next_dirty(0);
        found == Some(BLOCK + WORD) || found == Some(BLOCK + 3 * WORD)
    });
}

#[test]
fn dirty_extents_find_a_word_while_its_neighbour_is_emptied() {
    search_races_emptying_a_neighbour(|bm| {
        bm.dirty_extents()
            .any(|(o, l)| o <= BLOCK + 3 * WORD && BLOCK + 3 * WORD < o + l)
    });
}

#[test]
fn dirty_extents_search_ahead_across_level_1_words_while_a_block_is_emptied() {
    // 65 blocks, so the any tower has two levels. Blocks 0, 1 and 64 hold a word each;
    // the other thread empties block 1, which opens a window of the tower's guard, while
    // this thread makes the iterator and walks it. The iterator searches a batch of blocks
    // ahead (block 1, then block 64 through the level-2 word its cursor keeps) and must not
    // trust what it found or kept across that window: blocks 0 and 64 are dirty the whole
    // time, so both are reported, in order, and block 1 is reported or not.
    const FAR: u64 = 64 * BLOCK;
    model(|| {
        let bm = Arc::new(DirtyBitmap::new(65 * BLOCK, G).unwrap());
        bm.mark_dirty(0, G);
        bm.mark_dirty(BLOCK, G);
        bm.mark_dirty(FAR + 3 * WORD, G);
        let a = Arc::clone(&bm);
        let t = thread::spawn(move || a.clear(BLOCK, G));
        switch_point(&bm);
        let all: Vec<_> = bm.dirty_extents().collect();
        assert!(
            all == [(0, G), (BLOCK, G), (FAR + 3 * WORD, G)]
                || all == [(0, G), (FAR + 3 * WORD, G)],
            "extents {all:?}"
        );
        t.join().unwrap();
        assert_consistent(&bm);
    });
}

#[test]
fn snapshot_holds_a_word_while_its_neighbour_is_emptied() {
    search_races_emptying_a_neighbour(|bm| bm.snapshot().is_dirty(BLOCK + 3 * WORD));
}

#[test]
fn a_search_finds_a_word_marked_before_it_while_a_clear_empties_its_block() {
    // The clearer (this thread) can read block 1 empty before the other thread marks word
    // 3, and clear the block's summary bit after that mark saw the bit still set and
    // returned: checking the block before clearing does not close that window, so the
    // search after the mark must not trust a tower read that overlapped it.
    model(|| {
        let bm = Arc::new(DirtyBitmap::new(3 * BLOCK, G).unwrap());
        bm.mark_dirty(BLOCK + WORD, G);
        let a = Arc::clone(&bm);
        let t = thread::spawn(move || {
            a.mark_dirty(BLOCK + 3 * WORD, G);
            let found = a.next_dirty(0);
            assert!(
                found == Some(BLOCK + WORD) || found == Some(BLOCK + 3 * WORD),
                "found {found:?}"
            );
        });
        bm.clear(BLOCK + WORD, G);
        t.join().unwrap();
        assert_consistent(&bm);
    });
}

#[test]
fn a_range_mark_into_a_word_whose_first_mark_is_in_flight_is_found_once_that_mark_returns() {
    // Word 7 of block 1 gets its first bit from the other thread's one-word mark. This
    // thread's two-granule range mark spans bit 63 of that word and bit 0 of block 2,
    // which is dirty already. When the other mark wrote first, both of this mark's words
    // were non-zero before its writes, and it returns without writing the tower: block
    // 1's summary bit is the other mark's to set. So this thread's search may pass its own
    // bit while the other mark is in flight (the window docs/DESIGN.md describes under
    // "Searches during a clear: the guard"), and must find it once that mark has returned.
    model(|| {
        let bm = Arc::new(DirtyBitmap::new(3 * BLOCK, G).unwrap());
        bm.mark_dirty(2 * BLOCK, G);
        let returned = Arc::new(AtomicBool::new(false));
        let (a, r) = (Arc::clone(&bm), Arc::clone(&returned));
        let t = thread::spawn(move || {
            a.mark_dirty(BLOCK + 7 * WORD, G);
            r.store(true, SeqCst);
        });
        bm.mark_dirty(BLOCK + 7 * WORD + 63 * G, 2 * G);
        let other_returned = returned.load(SeqCst);
        let found = bm.next_dirty(0);
        let in_block_1 =
            found == Some(BLOCK + 7 * WORD) || found == Some(BLOCK + 7 * WORD + 63 * G);
        assert!(
            in_block_1 || (found == Some(2 * BLOCK) && !other_returned),
            "found {found:?}, the other mark returned before the search: {other_returned}"
        );
        t.join().unwrap();
        assert_eq!(bm.next_dirty(0), Some(BLOCK + 7 * WORD));
        assert_consistent(&bm);
    });
}

#[test]
fn take_dirty_racing_a_clear_takes_the_word_that_stays_dirty() {
    model(|| {
        let bm = Arc::new(DirtyBitmap::new(3 * BLOCK, G).unwrap());
        bm.mark_dirty(BLOCK + WORD, G);
        bm.mark_dirty(BLOCK + 3 * WORD, G);
        let a = Arc::clone(&bm);
        let t = thread::spawn(move || a.clear(BLOCK + WORD, G));
        switch_point(&bm);
        let taken = bm.take_dirty();
        t.join().unwrap();
        assert!(
            taken.is_dirty(BLOCK + 3 * WORD),
            "take_dirty skipped a dirty word"
        );
        assert!(!bm.is_dirty(BLOCK + 3 * WORD));
        assert_consistent(&bm);
        assert_consistent(&taken);
    });
}

#[test]
fn take_dirty_takes_a_word_marked_before_it_while_a_clear_empties_its_block() {
    // `a_search_finds_a_word_marked_before_it_while_a_clear_empties_its_block` with
    // `take_dirty` as the search. The clearer (this thread) can read block 1 empty before
    // the other thread marks word 3, and clear the block's summary bit after that mark
    // returned and while the take's own unguarded walk passes the block: only the second,
    // guarded walk, run because another window opened during the take's, takes word 3.
    model(|| {
        let bm = Arc::new(DirtyBitmap::new(3 * BLOCK, G).unwrap());
        bm.mark_dirty(BLOCK + WORD, G);
        let a = Arc::clone(&bm);
        let t = thread::spawn(move || {
            a.mark_dirty(BLOCK + 3 * WORD, G);
            let taken = a.take_dirty();
            assert!(
                taken.is_dirty(BLOCK + 3 * WORD),
                "take_dirty skipped a word marked before it"
            );
            assert_consistent(&taken);
        });
        bm.clear(BLOCK + WORD, G);
        t.join().unwrap();
        assert!(!bm.is_dirty(BLOCK + 3 * WORD));
        assert_consistent(&bm);
    });
}

#[test]
fn a_mark_that_finds_its_bit_set_by_a_running_mark_sees_it_in_flight_or_recorded() {
    // Thread A marks x. This thread marks x too, possibly returning on A's bit while A has
    // not yet recorded the region; then it checks what a store's inactivate would: a mark
    // in flight or a changed region, and after waiting for marks, x in the bytes taken.
    model(|| {
        let bm = Arc::new(DirtyBitmap::with_region_size(1024 * 8 * G, G, 512).unwrap());
        let a = Arc::clone(&bm);
        let t = thread::spawn(move || a.mark_dirty(100 * G, G));
        switch_point(&bm);
        bm.mark_dirty(100 * G, G);
        assert!(
            bm.marks_in_flight() || bm.changed_region_count() > 0,
            "x is dirty, no mark is in flight, and no region changed"
        );
        bm.wait_for_marks();
        let mut shadow = vec![0u8; bm.serialized_len() as usize];
        for r in bm.take_changed().iter() {
            let s = r as usize * 512;
            let l = bm.region_len(r) as usize;
            bm.serialize_region(r, &mut shadow[s..s + l]).unwrap();
        }
        assert_ne!(
            shadow[100 / 8] & (1 << (100 % 8)),
            0,
            "x not in the bytes taken"
        );
        t.join().unwrap();
    });
}

/// A mark that returns on a bit a running `merge_from` set, before the merge recorded its
/// region, must find it in flight or in the change map: a merge that set bits without
/// announcing itself would leave it in neither, and a stop could write "clean" without it.
#[test]
fn a_mark_that_finds_its_bit_set_by_a_running_merge_sees_it_in_flight_or_recorded() {
    model(|| {
        let bm = Arc::new(DirtyBitmap::with_region_size(1024 * 8 * G, G, 512).unwrap());
        let a = Arc::clone(&bm);
        let t = thread::spawn(move || {
            let src = DirtyBitmap::with_region_size(1024 * 8 * G, G, 512).unwrap();
            src.mark_dirty(100 * G, G);
            a.merge_from(&src).unwrap();
        });
        switch_point(&bm);
        bm.mark_dirty(100 * G, G);
        assert!(
            bm.marks_in_flight() || bm.changed_region_count() > 0,
            "x is dirty, no merge is in flight, and no region changed"
        );
        t.join().unwrap();
    });
}

/// Races `mark` on another thread with `set_enabled(false)` here: once the disable has
/// returned, no word changes, and the towers agree with the words.
fn disabling_during(mark: fn(&DirtyBitmap)) {
    model(move || {
        let bm = Arc::new(DirtyBitmap::new(2 * BLOCK, G).unwrap());
        let a = Arc::clone(&bm);
        let t = thread::spawn(move || mark(&a));
        switch_point(&bm);
        bm.set_enabled(false);
        let after = serialize_all(&bm);
        t.join().unwrap();
        assert_eq!(
            serialize_all(&bm),
            after,
            "a word changed after set_enabled(false)"
        );
        assert_consistent(&bm);
    });
}

#[test]
fn no_word_changes_after_disabling_returns_during_a_range_mark() {
    // Two words: the range path, which keeps setting words after reading the flag.
    disabling_during(|bm| bm.mark_dirty(WORD - G, 2 * G));
}

#[test]
fn no_word_changes_after_disabling_returns_during_a_one_word_mark() {
    // The one-word path: its short path reads the state before its announcement and again
    // after it, then writes.
    disabling_during(|bm| bm.mark_dirty(3 * WORD + G, G));
}

#[test]
fn no_word_changes_after_disabling_returns_during_a_mark_on_the_shared_slot() {
    // A thread beyond the owned slots announces with the shared slot's count (`fetch_add`,
    // `fetch_sub`), and the disable waits for that count to reach 0.
    disabling_during(|bm| {
        dirty_bitmap::loom_internals::on_the_shared_slot();
        bm.mark_dirty(3 * WORD + G, G);
    });
}

#[test]
fn a_mark_on_the_shared_slot_racing_a_seal_is_waited_for_or_waits_for_the_unseal() {
    sealing_during(|bm| {
        dirty_bitmap::loom_internals::on_the_shared_slot();
        bm.mark_dirty(WORD, G);
    });
}

#[test]
fn enabling_b_then_disabling_a_loses_no_mark_whatever_the_tracker_order() {
    // B comes first in the tracker: a fan-out can read B's flag before B is enabled and
    // A's after A is disabled, unless disabling waits for fan-outs in flight.
    model(|| {
        // The tracker holds std's Arc; sharing is not what this model checks.
        let a = std::sync::Arc::new(DirtyBitmap::new(BLOCK, G).unwrap());
        let b = std::sync::Arc::new(DirtyBitmap::new(BLOCK, G).unwrap());
        b.set_enabled(false);
        let tracker = dirty_bitmap::Tracker::new(vec![b.clone(), a.clone()]);
        let t = thread::spawn(move || tracker.mark(5 * G, G));
        switch_point(&a);
        b.set_enabled(true);
        a.set_enabled(false);
        t.join().unwrap();
        assert!(
            a.is_dirty(5 * G) || b.is_dirty(5 * G),
            "the mark is in neither"
        );
    });
}

#[test]
fn a_fan_out_that_meets_a_seal_waits_unannounced_and_loses_no_mark_across_a_hand_over() {
    // A is sealed, as a store holds its bitmaps while a stop writes (for good once a stop
    // could not take its "clean" back). A fan-out that finds B disabled and then A sealed
    // must not wait announced: disabling waits for every fan-out announced, and here A's
    // own disable comes before the unseal (it hung). After the unseal the fan-out must
    // read B's flag again: resuming at A, now disabled, would leave the mark in neither.
    model(|| {
        let a = std::sync::Arc::new(DirtyBitmap::new(BLOCK, G).unwrap());
        let b = std::sync::Arc::new(DirtyBitmap::new(BLOCK, G).unwrap());
        b.set_enabled(false);
        a.seal();
        let tracker = dirty_bitmap::Tracker::new(vec![b.clone(), a.clone()]);
        let t = thread::spawn(move || tracker.mark(5 * G, G));
        switch_point(&a);
        b.set_enabled(true);
        a.set_enabled(false);
        assert!(!a.is_dirty(5 * G), "a mark wrote a sealed bitmap");
        a.unseal();
        t.join().unwrap();
        assert!(
            a.is_dirty(5 * G) || b.is_dirty(5 * G),
            "the mark is in neither"
        );
    });
}

#[test]
fn next_clean_finds_a_bit_cleared_before_it_while_its_block_fills() {
    // The full tower's mirror image: the filler (this thread) reads block 1 full before the
    // other thread's clear, whose full-tower clear finds the bit not yet set and returns;
    // the filler's set then hides the clean bit until its re-read takes the bit back.
    model(|| {
        let bm = Arc::new(DirtyBitmap::new(3 * BLOCK, G).unwrap());
        bm.mark_dirty(0, 2 * BLOCK - G);
        let a = Arc::clone(&bm);
        let t = thread::spawn(move || {
            a.clear(BLOCK + 3 * WORD, G);
            let found = a.next_clean(0);
            assert!(
                found == Some(BLOCK + 3 * WORD),
                "found {found:?}, not the bit cleared before the search"
            );
        });
        bm.mark_dirty(2 * BLOCK - G, G);
        t.join().unwrap();
        assert_consistent(&bm);
    });
}

/// `seal` (what `BitmapStore::inactivate` runs under) against a mark of a clean bit: when
/// `seal` returns, the mark has either finished (its word and its change-map region are
/// visible) or not written at all, and it writes nothing until `unseal`; then it completes.
#[test]
fn a_mark_racing_a_seal_is_waited_for_or_waits_for_the_unseal() {
    sealing_during(|bm| bm.mark_dirty(WORD, G));
}

/// The seal model of [`a_mark_racing_a_seal_is_waited_for_or_waits_for_the_unseal`]
/// against `mark`, which marks bit `WORD` (one granule).
fn sealing_during(mark: fn(&DirtyBitmap)) {
    model(move || {
        let bm = Arc::new(DirtyBitmap::new(BLOCK, G).unwrap());
        let b2 = Arc::clone(&bm);
        let t = thread::spawn(move || mark(&b2));
        switch_point(&bm);
        bm.seal();
        let at_seal = bm.is_dirty(WORD);
        assert!(
            !at_seal || bm.changed_region_count() > 0,
            "a word written without its region when the seal returned"
        );
        let _ = bm.count();
        assert_eq!(bm.is_dirty(WORD), at_seal, "a mark wrote while sealed");
        bm.unseal();
        t.join().unwrap();
        assert!(bm.is_dirty(WORD));
        assert_consistent(&bm);
    });
}

/// Serializes the regions of `taken` into `shadow`, as a consumer does after its take.
fn serialize_taken(bm: &DirtyBitmap, taken: &ChangedRegions, shadow: &mut [u8]) {
    let rs = bm.region_size() as usize;
    for r in taken {
        let s = r as usize * rs;
        let l = bm.region_len(r) as usize;
        bm.serialize_region(r, &mut shadow[s..s + l]).unwrap();
    }
}

/// Two regions of 512 bytes; marks at bits 100 (region 0) and 5000 (region 1).
fn two_region_bitmap() -> std::sync::Arc<DirtyBitmap> {
    std::sync::Arc::new(DirtyBitmap::with_region_size(1024 * 8 * G, G, 512).unwrap())
}

#[test]
fn two_consumers_taking_during_marks_each_see_every_change_since_their_own_take() {
    // Consumer A takes on this thread, consumer B on another, while a third thread marks
    // one bit in each region. Each serializes what it took into its own shadow, then takes
    // once more after the marks: each shadow must equal the bitmap, whatever the other
    // took. The primary map, taken only at the end, must hold both regions too.
    model(|| {
        // `add_consumer` takes std's Arc; sharing is not what this model checks.
        let bm = two_region_bitmap();
        let a = bm.add_consumer(ConsumerStart::Empty).unwrap();
        let b = bm.add_consumer(ConsumerStart::Empty).unwrap();
        let marker = {
            let bm = std::sync::Arc::clone(&bm);
            thread::spawn(move || {
                bm.mark_dirty(100 * G, G);
                bm.mark_dirty(5000 * G, G);
            })
        };
        let taker = thread::spawn(move || {
            let mut shadow = vec![0u8; 1024];
            serialize_taken(b.bitmap(), &b.take_changed(), &mut shadow);
            (b, shadow)
        });
        let mut shadow_a = vec![0u8; 1024];
        serialize_taken(&bm, &a.take_changed(), &mut shadow_a);
        marker.join().unwrap();
        let (b, mut shadow_b) = taker.join().unwrap();
        serialize_taken(&bm, &a.take_changed(), &mut shadow_a);
        serialize_taken(&bm, &b.take_changed(), &mut shadow_b);
        let now = serialize_all(&bm);
        assert_ne!(now[100 / 8] & (1 << (100 % 8)), 0);
        assert_ne!(now[5000 / 8] & (1 << (5000 % 8)), 0);
        assert_eq!(shadow_a, now, "consumer A missed a change");
        assert_eq!(shadow_b, now, "consumer B missed a change");
        let primary: Vec<u64> = bm.take_changed().iter().collect();
        assert_eq!(primary, vec![0, 1], "the primary map lost a region");
    });
}

#[test]
fn a_consumer_added_empty_during_a_mark_has_it_in_its_map_or_in_the_bytes_read_after() {
    // The precise promise of `ConsumerStart::Empty`: a change racing the registration is in
    // the consumer's first take, or visible to every read made after `add_consumer`
    // returns. So reading the whole bitmap after the registration, then taking and
    // serializing once the mark is done, misses nothing.
    model(|| {
        let bm = two_region_bitmap();
        let marker = {
            let bm = std::sync::Arc::clone(&bm);
            thread::spawn(move || bm.mark_dirty(5000 * G, G))
        };
        switch_point(&bm);
        let c = bm.add_consumer(ConsumerStart::Empty).unwrap();
        let mut shadow = serialize_all(&bm);
        marker.join().unwrap();
        serialize_taken(&bm, &c.take_changed(), &mut shadow);
        assert_ne!(
            shadow[5000 / 8] & (1 << (5000 % 8)),
            0,
            "the mark is neither in the bytes read after add_consumer nor in its first take"
        );
    });
}

#[test]
fn a_consumer_added_with_all_regions_during_a_mark_copies_it_in_its_first_passes() {
    // A stream's start: every region in the first take, then the changes since.
    model(|| {
        let bm = two_region_bitmap();
        bm.mark_dirty(100 * G, G);
        let marker = {
            let bm = std::sync::Arc::clone(&bm);
            thread::spawn(move || bm.mark_dirty(5000 * G, G))
        };
        switch_point(&bm);
        let c = bm.add_consumer(ConsumerStart::AllRegions).unwrap();
        let mut shadow = vec![0u8; 1024];
        let first = c.take_changed();
        assert_eq!(first.len(), 2, "the first take lacks a region");
        serialize_taken(&bm, &first, &mut shadow);
        marker.join().unwrap();
        serialize_taken(&bm, &c.take_changed(), &mut shadow);
        assert_eq!(
            shadow,
            serialize_all(&bm),
            "the consumer's copy missed a change"
        );
    });
}

/// A model of the durable mode's protocol (`src/store/durable.rs`), written out here: a
/// commit takes the change map, serializes the regions taken, writes them to "the disk"
/// (one word here) and only then sets the durable bits from the bytes it wrote; an intent
/// returns when the durable bits cover its granule, else it runs a commit itself (under the
/// commit lock) and looks again. Thread A marks granule x (clean → dirty) and waits; this
/// thread marks x too and may find the bit already set by A, possibly before A recorded its
/// region. Whenever either returns, x must be on the disk: a fast path on the live bit would
/// fail here.
///
/// Only the bitmap (mark, take, serialize) is the library's; the commit and the intent are
/// this test's copy of the protocol, not `src/store/durable.rs`, which does I/O loom cannot
/// run. So this shows the protocol sound under every interleaving, not that durable.rs
/// follows it: that is for `tests/durable.rs` and `store::durable::tests`.
#[test]
fn the_durable_protocol_as_modelled_acknowledges_a_found_bit_only_once_it_is_on_disk() {
    use loom::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use loom::sync::Mutex;
    struct Durable {
        bm: Arc<DirtyBitmap>,
        disk: AtomicU64,
        durable: AtomicU64,
        commit: Mutex<()>,
    }
    impl Durable {
        fn commit(&self) {
            let _g = self.commit.lock().unwrap();
            let taken = self.bm.take_changed();
            if taken.is_empty() {
                return;
            }
            let mut bytes = [0u8; 512];
            self.bm.serialize_region(0, &mut bytes).unwrap();
            let word = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            // Write, barrier: on disk. Then, and only then, durable.
            self.disk.fetch_or(word, SeqCst);
            self.durable.fetch_or(word, SeqCst);
        }
        /// The intent for granule `g` (< 64): mark, then wait until durable, committing.
        fn intent(&self, g: u64) {
            let bit = 1u64 << g;
            self.bm.mark_dirty(g * G, G);
            while self.durable.load(SeqCst) & bit == 0 {
                self.commit();
                thread::yield_now();
            }
            assert_ne!(
                self.disk.load(SeqCst) & bit,
                0,
                "acknowledged before the bit was on disk"
            );
        }
    }
    model(|| {
        let d = Arc::new(Durable {
            bm: Arc::new(DirtyBitmap::with_region_size(1024 * 8 * G, G, 512).unwrap()),
            disk: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            commit: Mutex::new(()),
        });
        let a = Arc::clone(&d);
        let t = thread::spawn(move || a.intent(5));
        switch_point(&d.bm);
        d.intent(5);
        t.join().unwrap();
        assert_ne!(d.disk.load(SeqCst) & (1 << 5), 0);
    });
}

/// A model of the durable fast path (`DurableTracker::is_durable`) racing a change of which
/// bitmap records, written out here as the protocol above is: the tracker's copy of the
/// list at epoch 0, the store's list and epoch, per bitmap the durable bits (one word, on
/// disk the moment they are set, as a commit sets them after its barrier). The fast path
/// reads the epoch, then per bitmap its durable bits and, when they do not cover the
/// granule, its flag (a disabled bitmap is skipped), then the epoch again, and answers
/// only if it did not move; otherwise the slow path sets the bits in the current list and
/// commits until the fast path answers. The change, on this thread, is:
/// - `checkpoint`: bitmap Y (enabled, not yet listed) is published (the list replaced,
///   then the epoch bumped), then X stops recording (the epoch bumped, then X disabled);
/// - otherwise a hand-over: Y, first in the tracker's list and disabled, is enabled, then
///   X stops recording as above.
///
/// The granule is clean and in no durable bits, so an intent may return only once a commit
/// put it in X or Y: a return with it in neither is a write acknowledged in no bitmap.
/// Without the second epoch read (or without the bump before the disable, for the
/// hand-over) loom finds one: the fast path reads X's flag after the disable, and Y
/// disabled or not listed.
fn the_durable_fast_path_racing(checkpoint: bool) {
    use loom::sync::atomic::AtomicU64;
    use loom::sync::Mutex;
    type Bm = std::sync::Arc<DirtyBitmap>;
    struct Model {
        x: Bm,
        y: Bm,
        dx: AtomicU64,
        dy: AtomicU64,
        /// The store's list holds Y (after `x`; before it in the tracker's copy when it
        /// was listed from the start).
        y_listed: AtomicBool,
        y_first: bool,
        epoch: AtomicU64,
        commit: Mutex<()>,
    }
    impl Model {
        /// The list current at `epoch`: the tracker's copy at 0, else the store's.
        fn list_at(&self, epoch: u64) -> Vec<(&DirtyBitmap, &AtomicU64)> {
            let with_y = if epoch == 0 {
                self.y_first
            } else {
                self.y_listed.load(SeqCst)
            };
            let (x, y) = ((&*self.x, &self.dx), (&*self.y, &self.dy));
            match (with_y, self.y_first) {
                (false, _) => vec![x],
                (true, true) => vec![y, x],
                (true, false) => vec![x, y],
            }
        }
        fn fast(&self, g: u64) -> bool {
            let e0 = self.epoch.load(SeqCst);
            let ok = self
                .list_at(e0)
                .iter()
                .all(|(bm, d)| d.load(SeqCst) & (1 << g) != 0 || !bm.is_enabled());
            ok && self.epoch.load(SeqCst) == e0
        }
        fn commit(&self) {
            let _g = self.commit.lock().unwrap();
            for (bm, d) in [(&self.x, &self.dx), (&self.y, &self.dy)] {
                if bm.take_changed().is_empty() {
                    continue;
                }
                let mut bytes = [0u8; 512];
                bm.serialize_region(0, &mut bytes).unwrap();
                d.fetch_or(u64::from_le_bytes(bytes[..8].try_into().unwrap()), SeqCst);
            }
        }
        fn intent(&self, g: u64) {
            if self.fast(g) {
                return;
            }
            loop {
                for (bm, _) in self.list_at(self.epoch.load(SeqCst)) {
                    bm.mark_dirty(g * G, G);
                }
                if self.fast(g) {
                    return;
                }
                self.commit();
                thread::yield_now();
            }
        }
        fn stop_recording_x(&self) {
            self.epoch.fetch_add(1, SeqCst);
            self.x.set_enabled(false);
        }
    }
    model(move || {
        let bitmap =
            || std::sync::Arc::new(DirtyBitmap::with_region_size(1024 * 8 * G, G, 512).unwrap());
        let d = Arc::new(Model {
            x: bitmap(),
            y: bitmap(),
            dx: AtomicU64::new(0),
            dy: AtomicU64::new(0),
            y_listed: AtomicBool::new(!checkpoint),
            y_first: !checkpoint,
            epoch: AtomicU64::new(0),
            commit: Mutex::new(()),
        });
        if !checkpoint {
            d.y.set_enabled(false);
        }
        let a = Arc::clone(&d);
        let t = thread::spawn(move || a.intent(5));
        switch_point(&d.x);
        if checkpoint {
            d.y_listed.store(true, SeqCst);
            d.epoch.fetch_add(1, SeqCst);
        } else {
            d.y.set_enabled(true);
        }
        d.stop_recording_x();
        t.join().unwrap();
        assert_ne!(
            (d.dx.load(SeqCst) | d.dy.load(SeqCst)) & (1 << 5),
            0,
            "acknowledged, and in neither bitmap"
        );
    });
}

#[test]
fn the_durable_fast_path_racing_a_checkpoint_acknowledges_only_what_a_bitmap_holds() {
    the_durable_fast_path_racing(true);
}

#[test]
fn the_durable_fast_path_racing_a_hand_over_acknowledges_only_what_a_bitmap_holds() {
    the_durable_fast_path_racing(false);
}

/// The durable store's registry of writes in flight (`InFlight` in
/// `src/store/durable_bits.rs`: the real one, on loom's locks under `--cfg loom`) racing an
/// enable, as `BitmapStore::commit_in_flight` follows one (`src/store/durable.rs`): the
/// bitmap starts recording (published), then the registry is snapshot and every registered
/// write set again with `or_range`. The writer registers first, then marks
/// (`DurableTracker::begin_write`), which a disabled bitmap ignores; its write lands after
/// both, so it must be in the bitmap afterwards, whichever of registration, mark, enable
/// and snapshot came first. A registration the snapshot misses took its shard's lock after
/// the snapshot released it, so the writer's mark sees the bitmap enabled. (An `add` or a
/// checkpoint's new bitmap is the same for the writer: a bitmap that records from the
/// change on.) Taking the snapshot before the enable fails this model; a clear racing a
/// registered write is not modelled here (loom did not reach its losing order, a
/// registration between the snapshot and the clear, with that order reversed), and has
/// deterministic tests in `src/store/durable.rs` and the `ops_durable` fuzz model.
#[test]
fn a_registered_write_racing_an_enable_is_in_the_bitmap() {
    use dirty_bitmap::loom_internals::{or_range, InFlight};
    model(|| {
        let registry = Arc::new(InFlight::default());
        let bm = Arc::new(DirtyBitmap::new(BLOCK, G).unwrap());
        bm.set_enabled(false);
        let (r, b) = (Arc::clone(&registry), Arc::clone(&bm));
        let t = thread::spawn(move || {
            let guard = r.insert(5 * G, G);
            b.mark_dirty(5 * G, G);
            guard
        });
        switch_point(&bm);
        bm.set_enabled(true);
        for (offset, len) in registry.snapshot() {
            or_range(&bm, offset, len);
        }
        bm.wait_for_marks();
        let (shard, id) = t.join().unwrap();
        // The write lands now, then its guard drops.
        assert!(
            bm.is_dirty(5 * G),
            "a write in flight across the enable is not in the bitmap"
        );
        registry.remove(shard, id);
        assert!(
            registry.snapshot().is_empty(),
            "the guard's removal left it registered"
        );
        assert_consistent(&bm);
    });
}

/// A caller's public take of a store's bitmap races the store's take (a flush) and a guest
/// mark: the mark's region is in what the store serialized after its take, or in its next
/// take. With the flag set only before the caller's take, a store take in between used it
/// up, the mark landed, the caller's take removed its region, and the store's next take
/// found nothing: at the stop, a granule written and on disk as clean.
#[test]
fn a_callers_take_never_hides_a_change_from_the_stores_next_take() {
    use dirty_bitmap::loom_internals::take_primary;
    model(|| {
        let bm = Arc::new(DirtyBitmap::new(BLOCK, G).unwrap());
        assert_eq!(bm.region_count(), 1);
        let caller = {
            let bm = Arc::clone(&bm);
            thread::spawn(move || {
                let _ = bm.take_changed();
            })
        };
        let guest = {
            let bm = Arc::clone(&bm);
            thread::spawn(move || bm.mark_dirty(0, 1))
        };
        // The store's flush: take, then serialize what it took.
        let first = take_primary(&bm);
        let written = first.contains(0) && bm.is_dirty(0);
        caller.join().unwrap();
        guest.join().unwrap();
        let next = take_primary(&bm);
        assert!(
            written || next.contains(0),
            "the mark's region is in neither the store's write nor its next take"
        );
    });
}
