//! The leaf level: one bit per granule in `AtomicU64` words, and the dirty-bit counter.
//!
//! Bit n lives in word n / 64 at bit n % 64. Writing the words out as little-endian `u64`s
//! therefore gives qcow2's layout (bit n at byte n / 8, bit n % 8) with no shuffling.
//!
//! Invariant: no bit at index >= nbits is ever set. Every writer masks with [`Words::valid`].

use std::sync::atomic::Ordering::SeqCst;

use super::atomic::{zeroed_words, AtomicU64};

/// Leaf words of a bitmap.
#[derive(Debug)]
pub(crate) struct Words {
    words: Box<[AtomicU64]>,
    last_mask: u64,
}

impl Words {
    /// `nbits` clean bits, `nbits >= 1`.
    pub fn new(nbits: u64) -> Self {
        let n = nbits.div_ceil(64) as usize;
        let tail = nbits % 64;
        Words {
            words: zeroed_words(n),
            last_mask: if tail == 0 { !0 } else { (1 << tail) - 1 },
        }
    }

    /// Number of words.
    #[inline]
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// The word itself.
    #[inline]
    pub fn get(&self, w: usize) -> &AtomicU64 {
        &self.words[w]
    }

    /// Current value of word `w`.
    #[inline]
    pub fn load(&self, w: usize) -> u64 {
        self.words[w].load(SeqCst)
    }

    /// Mask of the bits of word `w` that lie inside the bitmap.
    #[inline]
    pub fn valid(&self, w: usize) -> u64 {
        if w + 1 == self.words.len() {
            self.last_mask
        } else {
            !0
        }
    }

    /// Heap bytes held.
    pub fn memory_usage(&self) -> usize {
        std::mem::size_of_val(&*self.words)
    }
}

/// Number of independent counter shards; spreads the counter's cache line over
/// threads that write different parts of the disk.
const SHARDS: usize = 16;
/// Words per shard stripe: 512 words (a 32 Kibit stretch of the bitmap) share a shard.
const STRIPE_SHIFT: u32 = 9;

/// A counter padded to its own cache line.
#[derive(Debug)]
#[repr(align(128))]
struct Padded(AtomicU64);

/// Dirty-bit counter, striped by word index so that concurrent writers to different parts
/// of the disk do not share a cache line. Each shard counts the set bits of its words, so
/// when no operation is in flight the sum is exact.
#[derive(Debug)]
pub(crate) struct BitCount {
    shards: [Padded; SHARDS],
}

impl BitCount {
    pub fn new() -> Self {
        BitCount {
            shards: std::array::from_fn(|_| Padded(AtomicU64::new(0))),
        }
    }

    /// Records that word `w` went from `old` to `new`.
    #[inline]
    pub fn adjust(&self, w: usize, old: u64, new: u64) {
        let delta = u64::from(new.count_ones()).wrapping_sub(u64::from(old.count_ones()));
        // Shards wrap: a shard's own words can only lose bits it counted, so the
        // wrapping sum of all shards is the true count.
        self.shards[(w >> STRIPE_SHIFT) % SHARDS]
            .0
            .fetch_add(delta, SeqCst);
    }

    /// Sum of the shards.
    pub fn get(&self) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |acc, s| acc.wrapping_add(s.0.load(SeqCst)))
    }
}
