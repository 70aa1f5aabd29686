//! A fixed-seed source of fuzz inputs, so plain `cargo test` runs the same
//! models the fuzzer does, over the same byte-to-input decoding.
//!
//! The bytes come from SplitMix64: the same seed gives the same inputs on
//! every machine, so a failure in CI names a case that reproduces.

/// SplitMix64: small, fast, and good enough to feed `arbitrary`.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// `count` inputs from `seed`, each of a random length up to `max_len`
/// (a quarter of them short, where the interesting edge cases hide).
pub fn inputs(seed: u64, count: usize, max_len: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut rng = Rng::new(seed);
    (0..count).map(move |_| {
        let cap = if rng.below(4) == 0 { 32 } else { max_len };
        let len = rng.below(cap + 1);
        rng.bytes(len)
    })
}

/// Runs `check` over `count` generated inputs; returns the first failure
/// with the case number and its bytes (hex), so it can be saved as a seed.
pub fn run<E: std::fmt::Display>(
    seed: u64,
    count: usize,
    max_len: usize,
    mut check: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), String> {
    for (case, data) in inputs(seed, count, max_len).enumerate() {
        if let Err(e) = check(&data) {
            let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
            return Err(format!(
                "generated case {case} (seed {seed:#x}) failed: {e}\nbytes: {hex}"
            ));
        }
    }
    Ok(())
}
