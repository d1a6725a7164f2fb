//! Exhaustive interleaving checks of the lock-free protocols, with loom.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom` (scripts/test.sh does).
//! Each model races two operations and then checks, single-threaded, that the summary
//! towers, the counter and the change map agree with the leaf words.
#![cfg(loom)]

use dirty_bitmap::DirtyBitmap;
use loom::sync::Arc;
use loom::thread;

const G: u64 = 512;
const WORD: u64 = 64 * G;
const BLOCK: u64 = 8 * WORD;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.max_branches = 100_000;
    b.check(f);
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
