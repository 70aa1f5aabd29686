//! A fast 64-bit content checksum for verifying migrated memory.
//!
//! Four independent multiply-xor lanes over little-endian words keep the
//! CPU's multipliers busy, so hashing runs near memory speed; the lanes are
//! mixed at the end. It detects corruption, it is not cryptographic.

use crate::region::{HostRegion, OutOfRegion};

const K: [u64; 4] = [
    0x9E37_79B9_7F4A_7C15,
    0xC2B2_AE3D_27D4_EB4F,
    0x1656_67B1_9E37_79F9,
    0x85EB_CA77_C2B2_AE63,
];

/// Incremental checksum over a byte sequence whose pieces are multiples of
/// 32 bytes (pages are).
#[derive(Clone, Debug)]
pub struct Checksum {
    lanes: [u64; 4],
    len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum { lanes: K, len: 0 }
    }
}

impl Checksum {
    /// A fresh checksum.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `data`; its length must be a multiple of 32 bytes (any tail is
    /// hashed zero-padded).
    pub fn update(&mut self, data: &[u8]) {
        let mut chunks = data.chunks_exact(32);
        for c in &mut chunks {
            for (lane, (w, k)) in self.lanes.iter_mut().zip(c.chunks_exact(8).zip(K)) {
                let w = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
                *lane = (*lane ^ w).wrapping_mul(k).rotate_left(31);
            }
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut pad = [0u8; 32];
            pad[..rest.len()].copy_from_slice(rest);
            let len = self.len;
            self.update(&pad);
            self.len = len;
        }
        self.len += data.len() as u64;
    }

    /// The checksum of everything added.
    pub fn finish(&self) -> u64 {
        let mut h = self.len.wrapping_mul(K[0]);
        for (i, lane) in self.lanes.iter().enumerate() {
            h = (h ^ lane.rotate_left(i as u32 * 16)).wrapping_mul(K[1]);
            h ^= h >> 29;
        }
        h
    }

    /// The checksum of `len` bytes at the start of `region`, read a page at
    /// a time through a bounce buffer.
    pub fn of_region(region: &HostRegion, len: u64) -> Result<u64, OutOfRegion> {
        let mut sum = Checksum::new();
        let mut page = [0u8; 4096];
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(page.len() as u64) as usize;
            region.read(at, &mut page[..n])?;
            sum.update(&page[..n]);
            at += n as u64;
        }
        Ok(sum.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_single_bit_flip_changes_the_sum() {
        let mut data = [0u8; 4096];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let base = {
            let mut c = Checksum::new();
            c.update(&data);
            c.finish()
        };
        for bit in (0..4096 * 8).step_by(97) {
            data[bit / 8] ^= 1 << (bit % 8);
            let mut c = Checksum::new();
            c.update(&data);
            assert_ne!(c.finish(), base, "bit {bit}");
            data[bit / 8] ^= 1 << (bit % 8);
        }
        // Pieces hash like the whole, and length matters.
        let mut c = Checksum::new();
        c.update(&data[..2048]);
        c.update(&data[2048..]);
        assert_eq!(c.finish(), base);
        let mut c = Checksum::new();
        c.update(&data);
        c.update(&[0u8; 32]);
        assert_ne!(c.finish(), base);
    }
}
