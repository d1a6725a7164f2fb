//! Summary levels over the leaf words, for fast search.
//!
//! The leaf words are grouped in *blocks* of [`BLOCK_WORDS`] words (512 bits, 64 bytes).
//! Two towers sit above the blocks:
//!
//! - the **any** tower: level 1 has one bit per block, set when the block may hold a set
//!   bit; level k + 1 has one bit per level-k word, set when that word may be non-zero.
//!   Bits may be spuriously set (a search then finds nothing below and moves on); a
//!   non-zero child with a clear summary bit is never left behind once the operations
//!   that touched it have returned.
//! - the **full** tower: level 1 has one bit per block, set only when every bit of the
//!   block is set; level k + 1 has one bit per level-k word that is full. Here the
//!   guarantee is the reverse: a set bit is never left on a child that is not full.
//!
//! The any tower makes dirty-bit search skip clean stretches; the full tower makes
//! clean-bit search skip long dirty runs (which QEMU's linear `next_zero` does not).
//!
//! QEMU's HBitmap puts its first summary level at one bit per leaf word. That is 1/64 =
//! 1.6 % of the leaf size per tower; with blocks of 8 words it is 0.2 %, and a block is 64
//! bytes, one cache line in a mapped (page-aligned) leaf array and at most two in a small
//! heap one, so scanning one costs about what reading one word does.
//!
//! # Lock-free maintenance
//! Every access to a tower word is `SeqCst`, so all of them fall in one total order. The
//! protocols:
//!
//! - *any, set*: after a child goes from zero to non-zero, set the parent bit (skipping the
//!   write if a load shows it set) and, if the parent word was zero, repeat one level up.
//! - *any, clear*: after a child went to zero, first re-read it: if it is non-zero, leave
//!   the parent bit alone. Otherwise open the tower's guard, clear the parent bit, then
//!   re-read the child. If it is non-zero again, set the parent bit back. If the parent
//!   word became zero, repeat one level up (again reading the child first). Close the
//!   guard. A setter that raced with us either wrote its child before our re-read (we see
//!   it and restore the bit) or sets the parent after our clear.
//! - *full, set*: after a child became full (the caller checked it first), open the guard,
//!   set the parent bit, then re-read the child; if it is no longer full, clear the bit
//!   again. If the parent word became full, repeat one level up. Close the guard.
//! - *full, clear*: after a child stops being full, clear the parent bit; if the parent
//!   word was full, repeat one level up. A setter that raced with us re-reads the child
//!   after its set, so it sees our change and clears its own bit.
//!
//! # Searches and the guard
//! The protocols above leave the towers right once the operations have returned, but in
//! between a tower bit can say the wrong thing in the direction searches trust: an any bit
//! clear over a non-zero child, a full bit set over a child that is not full. Checking the
//! child first removes the common case (a word emptied while its siblings stay dirty), but
//! not all: a clearer can read the block empty, a mark can then set a word, see the summary
//! bit still set and return, and the clearer's clear then hides that word until its re-read
//! restores the bit. A search in that window would miss a word that was dirty, and whose
//! mark had returned, before the search began.
//!
//! Each tower therefore has a *guard* word: open windows in its low 32 bits, a generation
//! in the high 32. An any-clear or full-set increments both (`fetch_add`) before its first
//! change to the tower and decrements the count after its last. A search reads the guard,
//! searches, and reads it again; it trusts its result only if no window was open at the
//! first read and the guard is unchanged at the second:
//! - a tower read that saw a bit changed inside a window read a value written by a
//!   read-modify-write sequenced after the window's `fetch_add` (all tower writes are
//!   read-modify-writes, so they continue each other's release sequences): the second
//!   guard read sees that `fetch_add` or later. If the first read came before it, the
//!   generation differs; if after, the window is still open in it (its close is ordered
//!   after the restoring write, which the tower read did not see).
//! - a window closed before the first read is visible with its restore, and its re-read
//!   leaves the bit right, as the protocols above argue.
//!
//! An untrusted search is retried a few times and then answers conservatively, "this block
//! may hold what you look for", which costs the caller one block scan; so searches never
//! wait for a clearer, and a clearer preempted inside its window slows searches down
//! without stopping them. Marks never touch the any tower's guard; a mark that fills a
//! block opens a window of the full tower's (a full-set).
use std::sync::atomic::Ordering::{Relaxed, SeqCst};

use super::atomic::{sc_point, zeroed_words, AtomicU64, WordArray};

/// Search attempts before answering conservatively while windows keep opening.
const SEARCH_TRIES: u32 = 3;

/// Leaf words per block.
pub(crate) const BLOCK_WORDS: usize = 8;

/// One level of a tower: `bits` bits in atomic words.
#[derive(Debug)]
struct Level {
    words: WordArray,
    last_mask: u64,
}

impl Level {
    fn new(bits: u64) -> Self {
        let tail = bits % 64;
        Level {
            words: zeroed_words(bits.div_ceil(64) as usize),
            last_mask: if tail == 0 { !0 } else { (1 << tail) - 1 },
        }
    }

    #[inline]
    fn valid(&self, w: usize) -> u64 {
        if w + 1 == self.words.len() {
            self.last_mask
        } else {
            !0
        }
    }
}

/// Levels 1..=top, level 1 first. The top level is a single word.
#[derive(Debug)]
struct Levels(Vec<Level>);

/// A tower's guard: windows open in the low 32 bits, generation in the high 32 (see the
/// module docs), on its own cache line pair so that searches reading it never contend
/// with the bitmap's other fields. The generation wraps after 2^32 windows; a search
/// would have to overlap exactly a multiple of that many to be fooled.
#[derive(Debug)]
#[repr(align(128))]
struct Guard(AtomicU64);

impl Guard {
    const OPEN: u64 = (1 << 32) + 1;
    const COUNT: u64 = (1 << 32) - 1;

    fn new() -> Self {
        Guard(AtomicU64::new(0))
    }

    /// Opens a window; returns the guard as it was.
    #[inline]
    fn open(&self) -> u64 {
        self.0.fetch_add(Self::OPEN, SeqCst)
    }

    /// Closes a window; returns the guard as it was, this window still open in it.
    #[inline]
    fn close(&self) -> u64 {
        self.0.fetch_sub(1, SeqCst)
    }

    /// `search(guard)` if no window overlapped it (`guard` is the value read before it);
    /// after [`SEARCH_TRIES`] overlapped attempts, `conservative`.
    #[inline]
    fn search(
        &self,
        mut search: impl FnMut(u64) -> Option<u64>,
        conservative: Option<u64>,
    ) -> Option<u64> {
        for _ in 0..SEARCH_TRIES {
            let before = self.0.load(SeqCst);
            if before & Self::COUNT == 0 {
                let found = search(before);
                if self.0.load(SeqCst) == before {
                    return found;
                }
            }
            std::hint::spin_loop();
        }
        conservative
    }
}

impl Levels {
    /// Number of level-1 units (blocks).
    fn units(&self) -> u64 {
        let l1 = &self.0[0];
        let full_words = l1.words.len() as u64 - 1;
        full_words * 64 + u64::from(64 - l1.last_mask.leading_zeros())
    }

    fn new(nblocks: u64) -> Self {
        let mut levels = vec![Level::new(nblocks)];
        let mut bits = nblocks;
        while bits > 64 {
            bits = bits.div_ceil(64);
            levels.push(Level::new(bits));
        }
        levels.shrink_to_fit();
        Levels(levels)
    }

    /// Sets `unit`'s bit at level 1 of a tower no other thread can see yet, with plain
    /// loads and stores, and climbs while `goes_up(old word, new word, valid bits of it)`
    /// says the word's own bit one level up must be set too.
    fn set_unshared(&self, unit: u64, goes_up: impl Fn(u64, u64, u64) -> bool) {
        let mut unit = unit;
        for lv in &self.0 {
            let (w, b) = split(unit);
            let old = lv.words[w].load(Relaxed);
            if old & b != 0 {
                return;
            }
            lv.words[w].store(old | b, Relaxed);
            if !goes_up(old, old | b, lv.valid(w)) {
                return;
            }
            unit = w as u64;
        }
    }

    fn memory_usage(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<Level>()
            + self
                .0
                .iter()
                .map(|l| std::mem::size_of_val(&*l.words))
                .sum::<usize>()
    }

    /// First level-1 unit (block) at index >= `unit` for which
    /// `interesting(level, word_index, word_value)` has the bit set. `level` counts from 0
    /// for level 1. `interesting` must be monotone: an interesting bit at a level means its
    /// child word may hold interesting bits.
    ///
    /// Iterative: climb while the current word has nothing interesting past the position,
    /// then descend through the first interesting bit of each level. A spurious summary
    /// bit (its child holds nothing interesting) sends the search on from the next word of
    /// that child's level.
    #[inline]
    fn find(&self, unit: u64, interesting: impl Fn(usize, usize, u64) -> u64) -> Option<u64> {
        self.find_with(
            unit,
            |level, w| self.0[level].words.get(w).map(|x| x.load(SeqCst)),
            interesting,
        )
    }

    /// [`find`](Self::find), reading the tower's words through `load(level, word_index)`
    /// (`None` past the level's end).
    #[inline]
    fn find_with(
        &self,
        unit: u64,
        mut load: impl FnMut(usize, usize) -> Option<u64>,
        interesting: impl Fn(usize, usize, u64) -> u64,
    ) -> Option<u64> {
        let top = self.0.len() - 1;
        let mut level = 0;
        let mut pos = unit;
        'search: loop {
            // Climb.
            let mut at = loop {
                let w = (pos / 64) as usize;
                let word = load(level, w)?;
                let bits = interesting(level, w, word) & (!0u64 << (pos % 64));
                if bits != 0 {
                    break w as u64 * 64 + u64::from(bits.trailing_zeros());
                }
                if level == top {
                    // The top level is a single word, now fully examined.
                    return None;
                }
                level += 1;
                pos = w as u64 + 1;
            };
            // Descend.
            while level > 0 {
                level -= 1;
                let w = at as usize;
                let bits = interesting(level, w, load(level, w)?);
                if bits == 0 {
                    pos = (w as u64 + 1) * 64;
                    continue 'search;
                }
                at = w as u64 * 64 + u64::from(bits.trailing_zeros());
            }
            return Some(at);
        }
    }
}

#[inline]
fn split(unit: u64) -> (usize, u64) {
    ((unit / 64) as usize, 1u64 << (unit % 64))
}

/// The tower of "may be non-zero" bits.
#[derive(Debug)]
pub(crate) struct AnyTower {
    levels: Levels,
    guard: Guard,
}

impl AnyTower {
    pub fn new(nblocks: u64) -> Self {
        AnyTower {
            levels: Levels::new(nblocks),
            guard: Guard::new(),
        }
    }

    /// Whether block `block`'s level-0 bit is set now.
    #[inline(always)]
    pub fn block_is_set(&self, block: u64) -> bool {
        let (w, b) = split(block);
        self.levels.0[0].words[w].load(SeqCst) & b != 0
    }

    /// [`set`](Self::set) of block `block` (level 0), with the common case inline: one
    /// load when the bit is already set.
    #[inline(always)]
    pub fn set_block(&self, block: u64) {
        if !self.block_is_set(block) {
            self.set(0, block);
        }
    }

    /// Records that block (level-0 unit) or level word `unit` below `level` may be non-zero.
    #[inline(never)]
    pub fn set(&self, level: usize, unit: u64) {
        let lv = &self.levels.0[level];
        let (w, b) = split(unit);
        if lv.words[w].load(SeqCst) & b != 0 {
            return;
        }
        let old = lv.words[w].fetch_or(b, SeqCst);
        if old == 0 && level + 1 < self.levels.0.len() {
            sc_point();
            self.set(level + 1, w as u64);
        }
    }

    /// [`set`](Self::set) of block `block` for a tower no other thread can see yet (a
    /// bitmap being loaded or built): plain loads and stores, no read-modify-write.
    pub fn set_unshared(&self, block: u64) {
        // A word that goes from zero to non-zero sets its bit one level up.
        self.levels.set_unshared(block, |old, _, _| old == 0);
    }

    /// Records that block `block` may have become zero. `block_nonzero` reads the block; it
    /// is read before the clear (a block still holding a bit keeps its summary bit) and
    /// again after it, so that a concurrent setter is never lost.
    pub fn clear(&self, block: u64, block_nonzero: &dyn Fn() -> bool) {
        if block_nonzero() {
            return;
        }
        self.guard.open();
        self.clear_level(0, block, block_nonzero);
        self.guard.close();
    }

    /// Opens a window of the guard for a caller that clears many blocks
    /// ([`clear_blocks_in_window`](Self::clear_blocks_in_window)); returns the guard as it
    /// was. Close it
    /// with [`close_window`](Self::close_window).
    pub fn open_window(&self) -> u64 {
        self.guard.open()
    }

    /// Closes the window [`open_window`](Self::open_window) opened (its return value is
    /// `before`). True when no other window was open at the open or opened since, read
    /// after the close: then no tower bit read inside the window can have been hidden by
    /// another clearer (the argument of the module docs, with this window's own clears as
    /// the only ones), and an unguarded search made inside it
    /// ([`next_block_in_window`](Self::next_block_in_window)) can be trusted.
    pub fn close_window(&self, before: u64) -> bool {
        let after = self.guard.close();
        before & Guard::COUNT == 0 && after >> 32 == (before >> 32).wrapping_add(1) & Guard::COUNT
    }

    /// [`clear`](Self::clear) of several blocks of one level-1 word, for a caller that
    /// holds a window ([`open_window`](Self::open_window)): `mask` holds the blocks of level-1 word `w` (bit i: block 64·w + i) that may have
    /// gone to zero. Each block goes through the same steps as alone (read it, and keep
    /// its bit if it is non-zero; clear the bit; read it again and set the bit back if it
    /// is non-zero now; go up a level if the word became zero), but the clears are one
    /// `fetch_and` for all of them instead of one each.
    pub fn clear_blocks_in_window(&self, w: usize, mask: u64, block_nonzero: impl Fn(u64) -> bool) {
        let base = w as u64 * 64;
        let mut clear = 0u64;
        let mut m = mask;
        while m != 0 {
            let i = m.trailing_zeros();
            m &= m - 1;
            if !block_nonzero(base + u64::from(i)) {
                clear |= 1 << i;
            }
        }
        if clear == 0 {
            return;
        }
        let lv = &self.levels.0[0];
        let old = lv.words[w].fetch_and(!clear, SeqCst);
        // Bits already clear: whoever cleared them re-reads their blocks.
        let mut m = old & clear;
        if m == 0 {
            return;
        }
        sc_point();
        while m != 0 {
            let i = m.trailing_zeros();
            m &= m - 1;
            if block_nonzero(base + u64::from(i)) {
                self.set(0, base + u64::from(i));
            }
        }
        if old & !clear == 0 && self.levels.0.len() > 1 {
            let word = &lv.words[w];
            let nonzero = || word.load(SeqCst) != 0;
            if !nonzero() {
                self.clear_level(1, w as u64, &nonzero);
            }
        }
    }

    /// First block at index >= `block` whose tower bit is set, read without the guard:
    /// for a caller inside its own window, which checks
    /// [`close_window`](Self::close_window) afterwards.
    pub fn next_block_in_window(&self, block: u64) -> Option<u64> {
        self.levels.find(block, |_, _, v| v)
    }

    /// One level of [`clear`](Self::clear), inside the guard; the child read zero just now.
    fn clear_level(&self, level: usize, unit: u64, child_nonzero: &dyn Fn() -> bool) {
        let lv = &self.levels.0[level];
        let (w, b) = split(unit);
        let old = lv.words[w].fetch_and(!b, SeqCst);
        if old & b == 0 {
            // Already clear: whoever cleared it re-reads the child.
            return;
        }
        sc_point();
        if child_nonzero() {
            self.set(level, unit);
            return;
        }
        if old == b && level + 1 < self.levels.0.len() {
            let word = &lv.words[w];
            let nonzero = || word.load(SeqCst) != 0;
            if !nonzero() {
                self.clear_level(level + 1, w as u64, &nonzero);
            }
        }
    }

    /// First block at index >= `block` that may hold a set bit. A block whose words were
    /// non-zero before the call is not skipped while it stays non-zero, once the marks
    /// that touched its path up the tower had returned (see the module docs).
    #[inline]
    pub fn next_block(&self, block: u64) -> Option<u64> {
        let units = self.levels.units();
        self.guard.search(
            |_| self.levels.find(block, |_, _, v| v),
            (block < units).then_some(block),
        )
    }

    /// [`next_block`](Self::next_block) for a caller that searches forward again and
    /// again (an iterator): `cursor` keeps the tower words it loaded, and later calls reuse
    /// them while the guard shows no window opened or closed since they were loaded, so a
    /// search usually loads one level-1 word instead of climbing and descending the tower.
    ///
    /// Same guarantee as `next_block` for a block that was non-zero before the cursor was
    /// made, with the marks on its path returned (the cursor only holds words loaded after
    /// that, and only while the guard vouches for them); a block that becomes non-zero
    /// later may be found or not, as with any search racing a mark.
    #[inline]
    pub fn next_block_cached(&self, block: u64, cursor: &mut Cursor) -> Option<u64> {
        if let Some(found) = self.next_block_kept(block, cursor) {
            return Some(found);
        }
        let units = self.levels.units();
        let levels = &self.levels.0;
        self.guard.search(
            |before| {
                // Words kept under another guard value are not trusted. A failed attempt
                // leaves words kept under `before`, but the guard never reads `before`
                // again (its generation only grows), so the next attempt drops them.
                if cursor.guard != before {
                    cursor.reset(before);
                }
                self.levels.find_with(
                    block,
                    |level, w| cursor.load(level, w, || levels[level].words.get(w)),
                    |_, _, v| v,
                )
            },
            (block < units).then_some(block),
        )
    }

    /// The common step of [`next_block_cached`](Self::next_block_cached), through the
    /// cursor's words: the next block in block `block`'s level-1 word, or else in the next
    /// level-1 word that the words above name ([`next_word_kept`](Self::next_word_kept)).
    /// `None` sends the caller to the general search: the guard differs from the one the
    /// cursor's words were loaded under, or a window is open, or the tower has nothing
    /// further, or a bit on the way down was spurious, or the guard changed during the
    /// step.
    ///
    /// It is the general search with the same trust rule: the guard read before, with no
    /// window open, equals the one every kept word was loaded under, and it is unchanged
    /// after the last word is read.
    #[inline(always)]
    fn next_block_kept(&self, block: u64, cursor: &mut Cursor) -> Option<u64> {
        let before = self.guard.0.load(SeqCst);
        if before != cursor.guard || before & Guard::COUNT != 0 {
            return None;
        }
        let levels = &self.levels.0;
        let w = (block / 64) as usize;
        let v = cursor.load(0, w, || levels[0].words.get(w))?;
        let rest = v & (!0u64 << (block % 64));
        let found = if rest != 0 {
            w as u64 * 64 + u64::from(rest.trailing_zeros())
        } else {
            let (n, vn) = self.next_word_kept(w, cursor)?;
            if vn == 0 {
                return None;
            }
            n as u64 * 64 + u64::from(vn.trailing_zeros())
        };
        (self.guard.0.load(SeqCst) == before).then_some(found)
    }

    /// The blocks [`next_block_cached`](Self::next_block_cached) would find from `block`
    /// on, one after another, up to `out.len()` of them: the first by that search, the
    /// rest read on from the same level-1 word and the later level-1 words that the words
    /// above name (climbing and descending through `cursor`), under the same trust rule:
    /// if the guard moved during the batch, only the first is returned. Returns how many
    /// were written; 0 when nothing was found. The level-1 words of a batch load together,
    /// so a sparse walk waits for them once per batch rather than once per block.
    #[inline]
    pub fn next_blocks(&self, block: u64, cursor: &mut Cursor, out: &mut [u64]) -> usize {
        if out.is_empty() {
            return 0;
        }
        let Some(first) = self.next_block_cached(block, cursor) else {
            return 0;
        };
        out[0] = first;
        let before = self.guard.0.load(SeqCst);
        if before != cursor.guard || before & Guard::COUNT != 0 {
            return 1;
        }
        let level1 = &self.levels.0[0].words;
        let mut w = (first / 64) as usize;
        let Some(mut v) = cursor.load(0, w, || level1.get(w)) else {
            return 1;
        };
        let mut rest = v & (!1u64 << (first % 64));
        let mut later = self.later_words(w, cursor);
        let mut n = 1;
        loop {
            while rest != 0 && n < out.len() {
                out[n] = w as u64 * 64 + u64::from(rest.trailing_zeros());
                n += 1;
                rest &= rest - 1;
            }
            if n == out.len() {
                break;
            }
            if later != 0 {
                let next = (w & !63) + later.trailing_zeros() as usize;
                let Some(word) = level1.get(next) else { break };
                later &= later - 1;
                (w, v) = (next, word.load(SeqCst));
                rest = v;
            } else {
                match self.next_word_kept(w, cursor) {
                    Some((next, value)) => {
                        (w, v, rest) = (next, value, value);
                        later = self.later_words(w, cursor);
                    }
                    None => break,
                }
            }
        }
        cursor.keep(0, w, v);
        if self.guard.0.load(SeqCst) == before {
            n
        } else {
            1
        }
    }

    /// The bits of the level-2 word over level-1 word `w` that name the level-1 words after
    /// it (0 if the tower has one level), through `cursor`.
    #[inline]
    fn later_words(&self, w: usize, cursor: &mut Cursor) -> u64 {
        let Some(up) = self.levels.0.get(1) else {
            return 0;
        };
        cursor
            .load(1, w / 64, || up.words.get(w / 64))
            .map_or(0, |v| v & (!1u64 << (w % 64)))
    }

    /// The next level-1 word after word `w` that the tower above names, with its value,
    /// climbing and descending through `cursor`; `None` at the end of the tower or when a
    /// word on the way down reads zero. The caller checks the guard.
    #[inline]
    fn next_word_kept(&self, w: usize, cursor: &mut Cursor) -> Option<(usize, u64)> {
        let levels = &self.levels.0;
        let mut level = 1;
        let mut unit = w;
        loop {
            let up = levels.get(level)?;
            let wi = unit / 64;
            let v = cursor.load(level, wi, || up.words.get(wi))?;
            let later = v & (!1u64 << (unit % 64));
            if later != 0 {
                unit = wi * 64 + later.trailing_zeros() as usize;
                break;
            }
            unit = wi;
            level += 1;
        }
        loop {
            level -= 1;
            let v = cursor.load(level, unit, || levels[level].words.get(unit))?;
            if level == 0 {
                return Some((unit, v));
            }
            if v == 0 {
                return None;
            }
            unit = unit * 64 + v.trailing_zeros() as usize;
        }
    }

    /// Whether no window opened or closed since `cursor`'s words were loaded: what a
    /// search through it found then still stands for every block that was non-zero before
    /// the cursor was made (with the marks on its path returned, as for
    /// [`next_block`](Self::next_block)).
    #[inline]
    pub fn cursor_is_current(&self, cursor: &Cursor) -> bool {
        self.guard.0.load(SeqCst) == cursor.guard
    }

    pub fn memory_usage(&self) -> usize {
        self.levels.memory_usage()
    }
}

/// Tower levels a [`Cursor`] keeps a word of: 2^32 bits in blocks of 512 need 4.
const CURSOR_LEVELS: usize = 6;

/// The last word loaded at each level of an [`AnyTower`], for
/// [`AnyTower::next_block_cached`], with the guard value they were loaded under.
#[derive(Debug, Clone)]
pub(crate) struct Cursor {
    /// Per level: (word index + 1, value); index 0 means nothing kept.
    words: [(usize, u64); CURSOR_LEVELS],
    guard: u64,
}

impl Cursor {
    pub fn new() -> Self {
        Cursor {
            words: [(0, 0); CURSOR_LEVELS],
            // No guard value is odd in its window count and all ones at once.
            guard: u64::MAX,
        }
    }

    fn reset(&mut self, guard: u64) {
        self.words = [(0, 0); CURSOR_LEVELS];
        self.guard = guard;
    }

    /// Keeps `v`, loaded from word `w` of `level` after the guard was read as the cursor's
    /// `guard`. If the guard moved since, the word is kept under a value the guard never
    /// shows again (its generation only grows), so no search trusts it.
    #[inline]
    fn keep(&mut self, level: usize, w: usize, v: u64) {
        if let Some(slot) = self.words.get_mut(level) {
            *slot = (w + 1, v);
        }
    }

    /// Word `w` of `level`: the kept value, or loaded now (and kept).
    #[inline]
    fn load<'a>(
        &mut self,
        level: usize,
        w: usize,
        word: impl FnOnce() -> Option<&'a AtomicU64>,
    ) -> Option<u64> {
        match self.words.get_mut(level) {
            Some(slot) if slot.0 == w + 1 => Some(slot.1),
            Some(slot) => {
                let v = word()?.load(SeqCst);
                *slot = (w + 1, v);
                Some(v)
            }
            None => word().map(|x| x.load(SeqCst)),
        }
    }
}

/// The tower of "certainly full" bits.
#[derive(Debug)]
pub(crate) struct FullTower {
    levels: Levels,
    guard: Guard,
}

impl FullTower {
    pub fn new(nblocks: u64) -> Self {
        FullTower {
            levels: Levels::new(nblocks),
            guard: Guard::new(),
        }
    }

    /// Records that block `block` became full; the caller read it full first.
    /// `block_full` re-reads it after the set; if it is no longer full the bit is cleared
    /// again.
    pub fn set(&self, block: u64, block_full: &dyn Fn() -> bool) {
        let (w, b) = split(block);
        if self.levels.0[0].words[w].load(SeqCst) & b != 0 {
            return;
        }
        self.guard.open();
        self.set_level(0, block, block_full);
        self.guard.close();
    }

    /// [`set`](Self::set) for a tower no other thread can see yet (a bitmap being loaded,
    /// or the one `take_dirty` is building): no search can overlap it, so no guard, and
    /// plain loads and stores. The caller read block `block` full.
    pub fn set_unshared(&self, block: u64) {
        // A word that becomes full sets its bit one level up.
        self.levels
            .set_unshared(block, |_, new, valid| new == valid);
    }

    /// One level of [`set`](Self::set), inside the guard.
    fn set_level(&self, level: usize, unit: u64, child_full: &dyn Fn() -> bool) {
        let lv = &self.levels.0[level];
        let (w, b) = split(unit);
        let old = lv.words[w].fetch_or(b, SeqCst);
        if old & b != 0 {
            return;
        }
        sc_point();
        if !child_full() {
            self.clear(level, unit);
            return;
        }
        let valid = lv.valid(w);
        if old | b == valid && level + 1 < self.levels.0.len() {
            let word = &lv.words[w];
            let up = &self.levels.0[level + 1];
            let (uw, ub) = split(w as u64);
            if up.words[uw].load(SeqCst) & ub == 0 {
                self.set_level(level + 1, w as u64, &|| word.load(SeqCst) == valid);
            }
        }
    }

    /// Records that child `unit` of `level` is no longer full.
    #[inline]
    pub fn clear(&self, level: usize, unit: u64) {
        let lv = &self.levels.0[level];
        let (w, b) = split(unit);
        if lv.words[w].load(SeqCst) & b == 0 {
            return;
        }
        let old = lv.words[w].fetch_and(!b, SeqCst);
        if old == lv.valid(w) && level + 1 < self.levels.0.len() {
            sc_point();
            self.clear(level + 1, w as u64);
        }
    }

    /// First block at index >= `block` that may hold a clear bit. A block with a bit that
    /// was clear, and whose clear had returned, before the call is not skipped while the
    /// bit stays clear.
    #[inline]
    pub fn next_block(&self, block: u64) -> Option<u64> {
        let levels = &self.levels.0;
        let units = self.levels.units();
        self.guard.search(
            |_| self.levels.find(block, |l, w, v| !v & levels[l].valid(w)),
            (block < units).then_some(block),
        )
    }

    pub fn memory_usage(&self) -> usize {
        self.levels.memory_usage()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A batch search made while a clearer holds a window of the guard (inside which a
    /// block's bit can be hidden, as the module docs describe) keeps only its first block,
    /// which the guarded search answered. Read on through the tower as it is, the batch
    /// would pass the hidden block and name a later one.
    #[test]
    fn a_batch_searched_inside_a_window_keeps_only_its_first_block() {
        let tower = AnyTower::new(129);
        for b in [1, 64, 128] {
            tower.set_block(b);
        }
        let mut cursor = Cursor::new();
        let mut out = [0u64; 8];
        let n = tower.next_blocks(1, &mut cursor, &mut out);
        assert_eq!(out[..n], [1, 64, 128]);
        // A clearer opens its window and clears block 64's bit, which a mark then needs
        // back; until its re-read restores the bit, the tower hides block 64.
        tower.guard.open();
        tower.levels.0[0].words[1].fetch_and(!1, SeqCst);
        let n = tower.next_blocks(1, &mut cursor, &mut out);
        assert_eq!(out[..n], [1], "a batch read across the window");
        tower.levels.0[0].words[1].fetch_or(1, SeqCst);
        tower.guard.close();
        let n = tower.next_blocks(1, &mut cursor, &mut out);
        assert_eq!(out[..n], [1, 64, 128]);
    }
}
