//! Test helpers: a small deterministic generator, so property tests are
//! reproducible from their seed.

/// SplitMix64.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A word that is zero, all ones, or random, so merges see every case.
    pub(crate) fn sparse_word(&mut self) -> u64 {
        match self.below(4) {
            0 => 0,
            1 => !0,
            2 => 1 << self.below(64),
            _ => self.next(),
        }
    }
}
