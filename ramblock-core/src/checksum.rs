//! A fast 64-bit content checksum for verifying migrated memory.
//!
//! Four independent multiply-xor lanes over little-endian words keep the
//! CPU's multipliers busy, so hashing runs near memory speed; the lanes are
//! mixed at the end. It detects corruption, it is not cryptographic.
//!
//! A block's checksum is defined page by page: each 4 KiB page's content is
//! hashed and mixed with the page's index ([`page_digest`]), the digests are
//! added (wrapping), and the sum is mixed with the length ([`finish_sum`]).
//! A sum does not care about order, so:
//! - a host with threads hashes chunks of [`CHUNK`] bytes in parallel and
//!   [combines](Checksum::combine) them into [`Checksum::of_region`]'s value;
//! - a [`PageLedger`] keeps the sum up to date *as pages are sent or
//!   received*, replacing a page's old digest when it is sent again, so the
//!   end-of-migration checksum costs nothing while the guest is paused.

use crate::addr::ByteLen;
#[cfg(feature = "alloc")]
use crate::bitmap::AtomicWord;
use crate::region::{HostRegion, RegionError};
#[cfg(feature = "alloc")]
use core::sync::atomic::Ordering;

/// Bytes per independently hashed chunk.
#[cfg(not(miri))]
pub const CHUNK: u64 = 4 << 20;
/// Bytes per independently hashed chunk: two pages under Miri, which hashes
/// a page in about a second, so the tests that cross chunk edges stay small.
/// A checksum's value is defined page by page and does not depend on it.
#[cfg(miri)]
pub const CHUNK: u64 = 8 << 10;

/// How many chunks cover `len` bytes.
pub const fn chunk_count(len: u64) -> u64 {
    len.div_ceil(CHUNK)
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
            self.mix32(c);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut pad = [0u8; 32];
            pad[..rest.len()].copy_from_slice(rest);
            self.mix32(&pad);
        }
        self.len += data.len() as u64;
    }

    /// Adds `len` bytes of `region` at `offset`, read in place (no copy);
    /// the same as [`Checksum::update`] over a copy of them. `len` must be
    /// a multiple of 64 bytes (any tail is hashed zero-padded).
    pub fn update_region(
        &mut self,
        region: &HostRegion<'_>,
        offset: ByteLen,
        len: usize,
    ) -> Result<(), RegionError> {
        region.scan(offset, len, |block| {
            self.mix32(&block[..32]);
            self.mix32(&block[32..]);
            true
        })?;
        self.len += len as u64;
        Ok(())
    }

    /// Mixes one 32-byte piece into the four lanes.
    #[inline(always)]
    fn mix32(&mut self, piece: &[u8]) {
        for (lane, (w, k)) in self.lanes.iter_mut().zip(piece.chunks_exact(8).zip(K)) {
            let w = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            *lane = (*lane ^ w).wrapping_mul(k).rotate_left(31);
        }
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
    pub fn of_region(region: &HostRegion<'_>, len: u64) -> Result<u64, RegionError> {
        let mut sum = 0u64;
        for index in 0..chunk_count(len) {
            sum = sum.wrapping_add(Self::chunk_digest(region, index, len)?);
        }
        Ok(finish_sum(sum, len))
    }

    /// The digest of chunk `index` of the first `len` bytes of `region`: the
    /// sum of its pages' [digests](page_digest), read in place (a partial
    /// last page through a zero-padded copy).
    pub fn chunk_digest(region: &HostRegion<'_>, index: u64, len: u64) -> Result<u64, RegionError> {
        let start = index.saturating_mul(CHUNK);
        let end = start.saturating_add(CHUNK).min(len);
        let mut sum = 0u64;
        let mut page = [0u8; PAGE];
        let mut at = start;
        while at < end {
            let n = (end - at).min(PAGE as u64) as usize;
            if n == PAGE {
                sum = sum.wrapping_add(page_digest_region(at / PAGE as u64, region, ByteLen(at))?);
                at += n as u64;
                continue;
            }
            region.read(ByteLen(at), &mut page[..n])?;
            page[n..].fill(0);
            sum = sum.wrapping_add(page_digest(at / PAGE as u64, &page));
            at += n as u64;
        }
        Ok(sum)
    }

    /// Combines the digests of all chunks of a `len`-byte region (in any
    /// order) into the region's checksum.
    pub fn combine(digests: &[u64], len: u64) -> u64 {
        finish_sum(digests.iter().fold(0, |a, &d| a.wrapping_add(d)), len)
    }
}

const PAGE: usize = 4096;

/// The digest of page `index` holding `content` (one 4 KiB page).
pub fn page_digest(index: u64, content: &[u8]) -> u64 {
    let mut c = Checksum::new();
    c.update(content);
    mix_index(c.finish(), index)
}

/// The digest of page `index` held in `region` at `offset`, read in place:
/// equal to [`page_digest`] of a copy of the page.
pub fn page_digest_region(
    index: u64,
    region: &HostRegion<'_>,
    offset: ByteLen,
) -> Result<u64, RegionError> {
    let mut c = Checksum::new();
    c.update_region(region, offset, PAGE)?;
    Ok(mix_index(c.finish(), index))
}

fn mix_index(hash: u64, index: u64) -> u64 {
    let h = (hash ^ index.wrapping_mul(K[3])).wrapping_mul(K[1]);
    h ^ (h >> 32)
}

/// A block's checksum from the wrapping sum of its pages' digests and its
/// length in bytes.
pub fn finish_sum(sum: u64, len: u64) -> u64 {
    let h = (sum ^ len.wrapping_mul(K[2])).wrapping_mul(K[0]);
    (h ^ (h >> 29)).wrapping_mul(K[1])
}

/// Keeps blocks' checksums current as pages are sent or received, so the
/// end record needs no pass over memory while the guest is paused. Blocks
/// are numbered as in the stream's block table, on both sides.
pub trait PageLedger {
    /// Pages `first..` of `block` now hold `data` (whole pages).
    fn record(&mut self, block: usize, first: u64, data: &[u8]);
    /// Pages `first..` of `block` now hold what `pages` holds (whole
    /// pages), read in place. The default copies each page out first.
    fn record_region(&mut self, block: usize, first: u64, pages: &HostRegion<'_>) {
        let mut page = [0u8; PAGE];
        for k in 0..(pages.len() / PAGE) as u64 {
            // In range: `at` is a whole page inside the region.
            let _ = pages.read(ByteLen::from_pages(k), &mut page);
            self.record(block, first + k, &page);
        }
    }
    /// Pages `first..first + count` of `block` are now zero.
    fn record_zero(&mut self, block: usize, first: u64, count: u64);
    /// `block` will hold up to `pages` pages: room for them can be made
    /// now. A migration calls this once it knows the block table, so the
    /// ledger does not grow (and fault in fresh memory) page by page while
    /// the passes run. The default does nothing.
    fn reserve(&mut self, block: usize, pages: u64) {
        let _ = (block, pages);
    }
    /// `block` now has `pages` pages: pages past the end no longer count.
    fn truncate(&mut self, block: usize, pages: u64);
    /// The checksum of `block`'s first `pages` pages, equal to
    /// [`Checksum::of_region`] over memory holding what was recorded.
    fn checksum(&self, block: usize, pages: u64) -> u64;
}

/// A [`PageLedger`] holding one digest per page (8 bytes per 4 KiB page).
///
/// Shared: every method takes `&self` (digests and sums are atomics, the
/// per-block vectors grow under a lock), so the threads of a multi-channel
/// migration record into one ledger through `&Ledger`, which is a
/// [`PageLedger`] too. A page recorded twice by two threads keeps whichever
/// digest came last, and the block's sum stays the sum of the digests kept:
/// each update adds the difference between the digest it swapped in and the
/// one it swapped out. Which update comes last is the caller's ordering
/// (a migration's channels meet at a barrier between two passes).
#[cfg(feature = "alloc")]
#[derive(Debug)]
pub struct Ledger {
    blocks: spin::RwLock<alloc::vec::Vec<BlockLedger>>,
    zero_hash: u64,
}

#[cfg(feature = "alloc")]
#[derive(Debug, Default)]
struct BlockLedger {
    digests: alloc::vec::Vec<AtomicWord>,
    sum: AtomicWord,
}

#[cfg(feature = "alloc")]
impl BlockLedger {
    /// Sets page `page`'s digest (inside the vector); returns what the
    /// block's sum must change by.
    fn set(&self, page: usize, digest: u64) -> u64 {
        let old = self.digests[page].swap(digest, Ordering::Relaxed);
        digest.wrapping_sub(old)
    }

    fn add(&self, delta: u64) {
        self.sum.fetch_add(delta, Ordering::Relaxed);
    }
}

#[cfg(feature = "alloc")]
impl Ledger {
    /// An empty ledger: nothing recorded.
    pub fn new() -> Ledger {
        let mut c = Checksum::new();
        c.update(&[0u8; PAGE]);
        Ledger {
            blocks: spin::RwLock::new(alloc::vec::Vec::new()),
            zero_hash: c.finish(),
        }
    }

    /// Runs `f` on `block`'s ledger, grown first to hold at least `pages`
    /// pages. Recording is under the shared lock; only growing takes the
    /// exclusive one, and a migration reserves every block's room up front.
    fn with_block<T>(&self, block: usize, pages: u64, f: impl FnOnce(&BlockLedger) -> T) -> T {
        {
            let blocks = self.blocks.read();
            if let Some(b) = blocks
                .get(block)
                .filter(|b| b.digests.len() as u64 >= pages)
            {
                return f(b);
            }
        }
        let mut blocks = self.blocks.write();
        if block >= blocks.len() {
            blocks.resize_with(block + 1, BlockLedger::default);
        }
        let b = &mut blocks[block];
        if (b.digests.len() as u64) < pages {
            // Zero is "not recorded": it adds nothing to the sum.
            b.digests.resize_with(pages as usize, || AtomicWord::new(0));
        }
        f(b)
    }

    /// [`PageLedger::record`] through a shared reference.
    pub fn record_shared(&self, block: usize, first: u64, data: &[u8]) {
        let pages = (data.len() / PAGE) as u64;
        self.with_block(block, first.saturating_add(pages), |b| {
            let mut delta = 0u64;
            for (k, page) in data.chunks_exact(PAGE).enumerate() {
                let index = first + k as u64;
                delta = delta.wrapping_add(b.set(index as usize, page_digest(index, page)));
            }
            b.add(delta);
        });
    }

    /// [`PageLedger::record_region`] through a shared reference.
    pub fn record_region_shared(&self, block: usize, first: u64, pages: &HostRegion<'_>) {
        let count = (pages.len() / PAGE) as u64;
        self.with_block(block, first.saturating_add(count), |b| {
            let mut delta = 0u64;
            for k in 0..count {
                // In range: page k lies inside the region.
                let digest =
                    page_digest_region(first + k, pages, ByteLen::from_pages(k)).unwrap_or(0);
                delta = delta.wrapping_add(b.set((first + k) as usize, digest));
            }
            b.add(delta);
        });
    }

    /// [`PageLedger::record_zero`] through a shared reference.
    pub fn record_zero_shared(&self, block: usize, first: u64, count: u64) {
        let end = first.saturating_add(count);
        if end == first {
            return;
        }
        let zero = self.zero_hash;
        // One sum update per run, not per page: a fresh 4 GiB guest is a
        // million zero pages.
        self.with_block(block, end, |b| {
            let mut delta = 0u64;
            for page in first..end {
                delta = delta.wrapping_add(b.set(page as usize, mix_index(zero, page)));
            }
            b.add(delta);
        });
    }

    /// [`PageLedger::reserve`] through a shared reference.
    pub fn reserve_shared(&self, block: usize, pages: u64) {
        self.with_block(block, pages, |_| ());
    }

    /// [`PageLedger::truncate`] through a shared reference.
    pub fn truncate_shared(&self, block: usize, pages: u64) {
        let mut blocks = self.blocks.write();
        if block >= blocks.len() {
            blocks.resize_with(block + 1, BlockLedger::default);
        }
        let b = &mut blocks[block];
        let keep = (pages as usize).min(b.digests.len());
        let dropped = b.digests[keep..]
            .iter()
            .fold(0u64, |a, d| a.wrapping_add(d.load(Ordering::Relaxed)));
        b.add(dropped.wrapping_neg());
        b.digests.truncate(keep);
    }

    /// [`PageLedger::checksum`]: the checksum of `block`'s first `pages`
    /// pages as recorded.
    pub fn checksum_of(&self, block: usize, pages: u64) -> u64 {
        let blocks = self.blocks.read();
        let sum = blocks.get(block).map_or(0, |b| {
            let past: u64 = b.digests.get(pages as usize..).map_or(0, |d| {
                d.iter()
                    .fold(0u64, |a, x| a.wrapping_add(x.load(Ordering::Relaxed)))
            });
            b.sum.load(Ordering::Relaxed).wrapping_sub(past)
        });
        finish_sum(sum, pages * PAGE as u64)
    }
}

/// The same as [`Ledger::new`]: a derived default would leave the zero
/// page's hash at 0 and record zero pages wrongly.
#[cfg(feature = "alloc")]
impl Default for Ledger {
    fn default() -> Ledger {
        Ledger::new()
    }
}

/// The trait's calls, for a ledger owned and for one shared between
/// threads (`&Ledger`).
macro_rules! ledger_forwards {
    ($($ledger:ty),*) => {$(
        #[cfg(feature = "alloc")]
        impl PageLedger for $ledger {
            fn record(&mut self, block: usize, first: u64, data: &[u8]) {
                self.record_shared(block, first, data);
            }

            fn record_region(&mut self, block: usize, first: u64, pages: &HostRegion<'_>) {
                self.record_region_shared(block, first, pages);
            }

            fn record_zero(&mut self, block: usize, first: u64, count: u64) {
                self.record_zero_shared(block, first, count);
            }

            fn reserve(&mut self, block: usize, pages: u64) {
                self.reserve_shared(block, pages);
            }

            fn truncate(&mut self, block: usize, pages: u64) {
                self.truncate_shared(block, pages);
            }

            fn checksum(&self, block: usize, pages: u64) -> u64 {
                self.checksum_of(block, pages)
            }
        }
    )*};
}
ledger_forwards!(Ledger, &Ledger);

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
        // Under Miri, which hashes a page in about a second, every 16th of
        // the flips still reaches every word lane and every 32-byte block.
        let step = if cfg!(miri) { 97 * 16 } else { 97 };
        for bit in (0..4096 * 8).step_by(step) {
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
    #[cfg(feature = "alloc")]
    #[allow(unsafe_code)] // wraps a test buffer in a HostRegion
    fn a_region_checksum_is_its_chunks_combined_and_sees_every_chunk() {
        extern crate std;
        // Two whole chunks and a partial one (of one page under Miri).
        let len = 2 * CHUNK + if cfg!(miri) { 4096 } else { 8192 };
        let mut buf = std::vec![0u8; len as usize];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let r = HostRegion::from_mut_slice(&mut buf);
        let whole = Checksum::of_region(&r, len).unwrap();
        let digests: std::vec::Vec<u64> = (0..chunk_count(len))
            .map(|i| Checksum::chunk_digest(&r, i, len).unwrap())
            .collect();
        assert_eq!(digests.len(), 3);
        assert_eq!(Checksum::combine(&digests, len), whole);
        for at in [0, CHUNK + 5, len - 1] {
            r.fill(ByteLen(at), 1, 0xEE).unwrap();
            assert_ne!(
                Checksum::of_region(&r, len).unwrap(),
                whole,
                "a change at {at}"
            );
            r.write(ByteLen(at), &[(at % 251) as u8]).unwrap();
        }
        assert_eq!(Checksum::of_region(&r, len).unwrap(), whole);
        // A ledger fed the pages in any order, some sent twice, agrees.
        let mut ledger = Ledger::new();
        ledger.record(0, 3, &std::vec![0xAB; 2 * PAGE]);
        let pages = len / PAGE as u64;
        let firsts: std::vec::Vec<u64> = (0..pages).step_by(5).collect();
        for &first in firsts.iter().rev() {
            let n = (pages - first).min(5);
            let mut data = std::vec![0u8; n as usize * PAGE];
            r.read(ByteLen::from_pages(first), &mut data).unwrap();
            ledger.record(0, first, &data);
        }
        assert_eq!(ledger.checksum(0, pages), whole);
        // Pages recorded in place agree with recorded copies, through
        // Ledger's own record_region and through the trait's default.
        struct CopyingLedger(Ledger);
        impl PageLedger for CopyingLedger {
            fn record(&mut self, block: usize, first: u64, data: &[u8]) {
                self.0.record(block, first, data)
            }
            fn record_zero(&mut self, block: usize, first: u64, count: u64) {
                self.0.record_zero(block, first, count)
            }
            fn truncate(&mut self, block: usize, pages: u64) {
                self.0.truncate(block, pages)
            }
            fn checksum(&self, block: usize, pages: u64) -> u64 {
                self.0.checksum(block, pages)
            }
        }
        let mut in_place = Ledger::new();
        let mut copying = CopyingLedger(Ledger::new());
        in_place.record(0, 1, &std::vec![0xCD; PAGE]);
        copying.record(0, 1, &std::vec![0xCD; PAGE]);
        for &first in &firsts {
            let n = (pages - first).min(5) as usize;
            let run = r.subregion(ByteLen::from_pages(first), n * PAGE).unwrap();
            in_place.record_region(0, first, &run);
            copying.record_region(0, first, &run);
        }
        assert_eq!(in_place.checksum(0, pages), whole);
        assert_eq!(copying.checksum(0, pages), whole);
        ledger.record_zero(0, pages, 3);
        assert_eq!(
            ledger.checksum(0, pages),
            whole,
            "pages past the end do not count"
        );
        r.fill(ByteLen::ZERO, 2 * PAGE, 0).unwrap();
        ledger.record_zero(0, 0, 2);
        assert_eq!(
            ledger.checksum(0, pages),
            Checksum::of_region(&r, len).unwrap()
        );
        // A long zero run over recorded pages, in a ledger that reserved
        // its room first, agrees with the memory too.
        let mut reserved = Ledger::new();
        reserved.reserve(0, pages);
        assert_eq!(
            reserved.checksum(0, pages),
            Ledger::new().checksum(0, pages)
        );
        reserved.record_region(0, 0, &r.subregion(ByteLen::ZERO, len as usize).unwrap());
        let zeros = if cfg!(miri) { pages - 2 } else { 300 };
        r.fill(ByteLen::from_pages(1), zeros as usize * PAGE, 0)
            .unwrap();
        reserved.record_zero(0, 1, zeros);
        assert_eq!(
            reserved.checksum(0, pages),
            Checksum::of_region(&r, len).unwrap()
        );
        ledger.record_region(0, 0, &r.subregion(ByteLen::ZERO, len as usize).unwrap());
        ledger.truncate(0, 4);
        assert_eq!(
            ledger.checksum(0, 4),
            Checksum::of_region(&r, 4 * PAGE as u64).unwrap()
        );
        assert_ne!(
            Checksum::of_region(&r, len - 4096).unwrap(),
            whole,
            "length matters"
        );
    }
}
