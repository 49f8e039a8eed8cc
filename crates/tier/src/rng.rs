//! A tiny seeded generator for fault injection and retry jitter.
//!
//! Ours rather than `rand`'s `StdRng` because a printed seed must replay the same faults
//! forever: `StdRng` documents that its algorithm may change between releases, SplitMix64
//! is fixed here in ten lines.

use std::hash::{BuildHasher, Hasher};

/// SplitMix64 (Steele, Lea, Flood 2014): full 2^64 period, passes BigCrush, one add and
/// three multiply-xorshifts per draw.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// A generator seeded from the process's random hasher keys, for jitter that needs to
    /// differ between processes but not to be replayed.
    pub fn from_entropy() -> SplitMix64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x5eed);
        SplitMix64(h.finish())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, from the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// True with probability `p` (clamped to `[0, 1]`).
    pub fn chance(&mut self, p: f64) -> bool {
        self.next_f64() < p
    }

    /// Uniform in `[0, n]` inclusive (Lemire's multiply-shift; the bias is below 2^-64·n).
    pub fn up_to(&mut self, n: u64) -> u64 {
        if n == u64::MAX {
            return self.next_u64();
        }
        ((self.next_u64() as u128 * (n as u128 + 1)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_spread() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        // Reference value of SplitMix64 seeded with 0 (first output).
        assert_eq!(SplitMix64::new(0).next_u64(), 0xe220_a839_7b1d_cdaf);

        let mut r = SplitMix64::new(1);
        let mut hits = 0;
        for _ in 0..10_000 {
            let f = r.next_f64();
            assert!((0.0..1.0).contains(&f));
            hits += r.chance(0.25) as u32;
            assert!(r.up_to(9) <= 9);
        }
        assert!((2_000..3_000).contains(&hits), "{hits}");
        assert!(!SplitMix64::new(3).chance(0.0));
        assert!(SplitMix64::new(3).chance(1.0));
    }
}
