//! A fast 64-bit content checksum for verifying migrated memory.
//!
//! Four independent multiply-xor lanes over little-endian words keep the
//! CPU's multipliers busy, so hashing runs near memory speed; the lanes are
//! mixed at the end. It detects corruption, it is not cryptographic.
//!
//! A block's checksum ([`Checksum::of_region`]) is defined over chunks of
//! [`CHUNK`] bytes: each chunk is hashed on its own and the chunk digests are
//! [combined](Checksum::combine) in order, so a host with threads can hash
//! the chunks in parallel and get the same value.

use crate::region::{HostRegion, OutOfRegion};

/// Bytes per independently hashed chunk.
pub const CHUNK: u64 = 4 << 20;

/// How many chunks cover `len` bytes.
pub const fn chunk_count(len: u64) -> u64 {
    len.div_ceil(CHUNK)
}

/// Folds chunk digests, in order, into one value.
struct Combiner(u64);

impl Combiner {
    fn new(len: u64) -> Combiner {
        Combiner(len.wrapping_mul(K[2]) ^ K[3])
    }

    fn add(&mut self, digests: &[u64]) {
        for &d in digests {
            self.0 = (self.0 ^ d).wrapping_mul(K[0]).rotate_left(29);
        }
    }

    fn finish(&self) -> u64 {
        let h = self.0.wrapping_mul(K[1]);
        h ^ (h >> 31)
    }
}

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

    /// The checksum of `len` bytes at the start of `region`: the
    /// [combination](Checksum::combine) of its chunks' digests.
    pub fn of_region(region: &HostRegion, len: u64) -> Result<u64, OutOfRegion> {
        let mut digests = [0u64; 64];
        let mut combined = Combiner::new(len);
        let chunks = chunk_count(len);
        let mut i = 0;
        while i < chunks {
            let n = (chunks - i).min(digests.len() as u64) as usize;
            for (k, d) in digests[..n].iter_mut().enumerate() {
                *d = Self::chunk_digest(region, i + k as u64, len)?;
            }
            combined.add(&digests[..n]);
            i += n as u64;
        }
        Ok(combined.finish())
    }

    /// The digest of chunk `index` of the first `len` bytes of `region`,
    /// read a page at a time through a bounce buffer.
    pub fn chunk_digest(region: &HostRegion, index: u64, len: u64) -> Result<u64, OutOfRegion> {
        let start = index.saturating_mul(CHUNK);
        let end = start.saturating_add(CHUNK).min(len);
        let mut sum = Checksum::new();
        let mut page = [0u8; 4096];
        let mut at = start;
        while at < end {
            let n = (end - at).min(page.len() as u64) as usize;
            region.read(at, &mut page[..n])?;
            sum.update(&page[..n]);
            at += n as u64;
        }
        Ok(sum.finish())
    }

    /// Combines the digests of all chunks of a `len`-byte region, in order,
    /// into the region's checksum.
    pub fn combine(digests: &[u64], len: u64) -> u64 {
        let mut c = Combiner::new(len);
        c.add(digests);
        c.finish()
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

    #[test]
    #[allow(unsafe_code)] // wraps a test buffer in a HostRegion
    fn a_region_checksum_is_its_chunks_combined_and_sees_every_chunk() {
        extern crate std;
        let len = 2 * CHUNK + 8192;
        let mut buf = std::vec![0u8; len as usize];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        // SAFETY: `buf` outlives the region and is only used through it.
        let r = unsafe {
            HostRegion::new(
                core::ptr::NonNull::new(buf.as_mut_ptr()).unwrap(),
                buf.len(),
            )
        };
        let whole = Checksum::of_region(&r, len).unwrap();
        let digests: std::vec::Vec<u64> = (0..chunk_count(len))
            .map(|i| Checksum::chunk_digest(&r, i, len).unwrap())
            .collect();
        assert_eq!(digests.len(), 3);
        assert_eq!(Checksum::combine(&digests, len), whole);
        for at in [0, CHUNK + 5, len - 1] {
            r.fill(at, 1, 0xEE).unwrap();
            assert_ne!(
                Checksum::of_region(&r, len).unwrap(),
                whole,
                "a change at {at}"
            );
            r.write(at, &[(at % 251) as u8]).unwrap();
        }
        assert_eq!(Checksum::of_region(&r, len).unwrap(), whole);
        assert_ne!(
            Checksum::of_region(&r, len - 4096).unwrap(),
            whole,
            "length matters"
        );
    }
}
