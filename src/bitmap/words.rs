//! The leaf level: one bit per granule in `AtomicU64` words.
//!
//! Bit n lives in word n / 64 at bit n % 64. Writing the words out as little-endian `u64`s
//! therefore gives qcow2's layout (bit n at byte n / 8, bit n % 8) with no shuffling.
//!
//! Invariant: no bit at index >= nbits is ever set. Every writer masks with [`Words::valid`].

use std::sync::atomic::Ordering::SeqCst;

use super::atomic::{zeroed_words, AtomicU64, WordArray};

/// Leaf words of a bitmap.
#[derive(Debug)]
pub(crate) struct Words {
    words: WordArray,
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

    /// Words `range` as one slice: a loop over it reads the array's address and length
    /// once, where [`load`](Self::load) reads them again after every atomic load.
    #[inline]
    pub fn slice(&self, range: std::ops::Range<usize>) -> &[AtomicU64] {
        &self.words[range]
    }

    /// The address of word 0, for [`prefetch`](super::atomic::prefetch) hints.
    #[inline]
    pub fn as_ptr(&self) -> *const AtomicU64 {
        self.words.as_ptr()
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

    /// Word `w` with any bit past the end cleared. Such bits are never set (see the module
    /// invariant); the mask keeps serialized tails zero regardless.
    #[inline]
    pub fn load_masked(&self, w: usize) -> u64 {
        let v = self.words[w].load(SeqCst);
        if w + 1 == self.words.len() {
            v & self.last_mask
        } else {
            v
        }
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
