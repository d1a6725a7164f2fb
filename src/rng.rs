//! [`SplitMix64`]: the crate's one seeded generator, for everything that must replay
//! identically from a seed (the crash image of `storage/crash.rs`, the simulated guests and
//! scenarios of `migration/sim.rs`, the workloads of `migration/guest.rs`).
//!
//! It imports nothing from the crate, so every floor may use it.

/// A tiny portable PRNG (SplitMix64): a seed means the same sequence in every version and on
/// every platform (unlike `rand`'s `SmallRng`).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// From a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            // A u64 times a u64 fits a u128; the high half is below `n`.
            (u128::from(self.next_u64()).wrapping_mul(u128::from(n)) >> 64) as u64
        }
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A fair coin: the top bit of the next draw.
    pub fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }
}

/// 64 bits that differ between calls and between processes, for identifiers that must not
/// repeat (a migration's id), not for anything that must replay. Taken from the standard
/// library's randomly keyed hasher (seeded from the operating system once per thread), so
/// the library needs no random-number crate.
pub fn unique_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_ids_differ() {
        let ids: std::collections::BTreeSet<u64> = (0..1000).map(|_| unique_u64()).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn known_sequence() {
        // The first outputs for seed 0 (the reference SplitMix64's).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(SplitMix64::new(7).below(0), 0);
    }
}
