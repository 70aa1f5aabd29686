//! [`MigrationBitmap`]: the pages migration still has to send.
//!
//! It belongs to the one migration thread, so it is plain words with no
//! atomics on the hot path. Merges OR fresh dirty words in and return how
//! many bits were newly set (`popcount(new & !old)`); the bitmap also keeps a
//! running count of set bits so the engine always knows what remains.

use super::{
    check_range, find_bit, find_word, for_each_word_mask, last_word_mask, words_for, AtomicBitmap,
    AtomicWord, BitRangeError, StorageTooSmall, WORD_BITS,
};
use core::fmt;

/// A bitmap of `len` bits over plain words, with a count of set bits.
pub struct MigrationBitmap<W> {
    words: W,
    len: usize,
    dirty: u64,
}

impl<W> fmt::Debug for MigrationBitmap<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MigrationBitmap {{ len: {}, dirty: {} }}",
            self.len, self.dirty
        )
    }
}

impl<W: AsRef<[u64]> + AsMut<[u64]>> MigrationBitmap<W> {
    /// A bitmap of `len` bits over `words`; all bits start clear.
    pub fn new(mut words: W, len: usize) -> Result<Self, StorageTooSmall> {
        let needed = words_for(len);
        let given = words.as_ref().len();
        if given < needed {
            return Err(StorageTooSmall { needed, given });
        }
        words.as_mut()[..needed].fill(0);
        Ok(MigrationBitmap {
            words,
            len,
            dirty: 0,
        })
    }

    /// The bits covered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the bitmap covers no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many bits are set: pages still to send.
    pub fn dirty_count(&self) -> u64 {
        self.dirty
    }

    /// How many runs of set bits there are (maximal stretches of
    /// consecutive dirty pages, each at least one page): what sending
    /// them costs beyond their bytes, a record and a write per run, grows
    /// with this count. One pass over the words, no allocation.
    pub fn dirty_runs(&self) -> u64 {
        if self.dirty == 0 {
            return 0;
        }
        let words = self.words();
        let last = words.len().saturating_sub(1);
        let mut runs = 0;
        // Whether the bit before the current word (its top bit) was set.
        let mut carry = 0u64;
        for (i, &w) in words.iter().enumerate() {
            let w = if i == last {
                w & last_word_mask(self.len)
            } else {
                w
            };
            // A run starts at each set bit whose lower neighbour is clear.
            runs += u64::from((w & !((w << 1) | carry)).count_ones());
            carry = w >> (WORD_BITS - 1);
        }
        runs
    }

    /// The words covering the bitmap, little-endian bit order within a word.
    pub fn words(&self) -> &[u64] {
        &self.words.as_ref()[..words_for(self.len)]
    }

    fn words_mut(&mut self) -> &mut [u64] {
        let n = words_for(self.len);
        &mut self.words.as_mut()[..n]
    }

    /// A view of this bitmap over borrowed words, for code (like a dirty-log
    /// source) that should not care how the storage is owned. The running
    /// count carries over both ways.
    pub fn with_view<R>(&mut self, f: impl FnOnce(&mut MigrationBitmap<&mut [u64]>) -> R) -> R {
        let (len, dirty) = (self.len, self.dirty);
        let mut view = MigrationBitmap {
            words: self.words_mut(),
            len,
            dirty,
        };
        let r = f(&mut view);
        self.dirty = view.dirty;
        r
    }

    /// Whether bit `bit` is set.
    pub fn is_set(&self, bit: usize) -> Result<bool, BitRangeError> {
        check_range(bit, 1, self.len)?;
        Ok(self.words()[bit / WORD_BITS] >> (bit % WORD_BITS) & 1 == 1)
    }

    /// Sets `count` bits from `start`; returns how many were newly set.
    pub fn set_range(&mut self, start: usize, count: usize) -> Result<u64, BitRangeError> {
        let end = check_range(start, count, self.len)?;
        let words = self.words_mut();
        let mut newly = 0;
        for_each_word_mask(start, end, |w, mask| {
            newly += u64::from((mask & !words[w]).count_ones());
            words[w] |= mask;
        });
        self.dirty += newly;
        Ok(newly)
    }

    /// Clears `count` bits from `start`; returns how many were set.
    pub fn clear_range(&mut self, start: usize, count: usize) -> Result<u64, BitRangeError> {
        let end = check_range(start, count, self.len)?;
        let words = self.words_mut();
        let mut cleared = 0;
        for_each_word_mask(start, end, |w, mask| {
            cleared += u64::from((mask & words[w]).count_ones());
            words[w] &= !mask;
        });
        self.dirty -= cleared;
        Ok(cleared)
    }

    /// Clears bit `bit` as sent; returns whether it was set.
    pub fn take(&mut self, bit: usize) -> Result<bool, BitRangeError> {
        Ok(self.clear_range(bit, 1)? == 1)
    }

    /// Marks every page dirty, as at the start of a migration.
    pub fn set_all(&mut self) {
        let len = self.len;
        let words = self.words_mut();
        words.fill(!0);
        if let Some(last) = words.last_mut() {
            *last = last_word_mask(len);
        }
        self.dirty = len as u64;
    }

    /// The first set bit at or after `from`.
    pub fn find_next_dirty(&self, from: usize) -> Option<usize> {
        find_bit(self.words(), self.len, from, 0)
    }

    /// Every dirty page at or after `from`, in order. Keeps its place in
    /// the current word and skips clean words in blocks, so walking a whole
    /// bitmap costs what a plain word loop does.
    #[inline]
    pub fn dirty_pages(&self, from: usize) -> DirtyPages<'_> {
        let words = self.words();
        let index = from / WORD_BITS;
        let current = match words.get(index) {
            Some(&w) if from < self.len => w & (!0u64 << (from % WORD_BITS)),
            _ => 0,
        };
        DirtyPages {
            words,
            len: self.len,
            index,
            current,
        }
    }

    /// The first clear bit at or after `from` (below `len`).
    pub fn find_next_clean(&self, from: usize) -> Option<usize> {
        find_bit(self.words(), self.len, from, !0)
    }

    /// ORs a dirty log into the bitmap and returns how many bits were newly
    /// set. The log is `log_bits` bits in little-endian `u64` words (KVM's
    /// `KVM_GET_DIRTY_LOG` layout), and its bit 0 lands on bit `first`.
    /// Bits past `log_bits` in the last log word are ignored.
    pub fn merge_log(
        &mut self,
        first: usize,
        log: &[u64],
        log_bits: usize,
    ) -> Result<u64, BitRangeError> {
        check_range(first, log_bits, self.len)?;
        if log_bits > log.len() * WORD_BITS {
            return Err(BitRangeError {
                start: 0,
                count: log_bits as u64,
                len: (log.len() * WORD_BITS) as u64,
            });
        }
        let n = words_for(log_bits);
        if n == 0 {
            return Ok(0);
        }
        let log = &log[..n];
        let tail = last_word_mask(log_bits);
        let shift = first % WORD_BITS;
        let dst = &mut self.words_mut()[first / WORD_BITS..];
        let mut newly = 0u64;
        if shift == 0 {
            // The hot path: word-aligned, branch-free so it vectorizes.
            let (body, last) = (&log[..n - 1], log.last());
            for (d, &s) in dst.iter_mut().zip(body) {
                let s = u64::from_le(s);
                newly += u64::from((s & !*d).count_ones());
                *d |= s;
            }
            if let Some(&s) = last {
                let s = u64::from_le(s) & tail;
                let d = &mut dst[n - 1];
                newly += u64::from((s & !*d).count_ones());
                *d |= s;
            }
        } else {
            for (i, &s) in log.iter().enumerate() {
                let mut s = u64::from_le(s);
                if i == n - 1 {
                    s &= tail;
                }
                for (j, part) in [(i, s << shift), (i + 1, s >> (WORD_BITS - shift))] {
                    if part != 0 {
                        newly += u64::from((part & !dst[j]).count_ones());
                        dst[j] |= part;
                    }
                }
            }
        }
        self.dirty += newly;
        Ok(newly)
    }

    /// Moves every set bit of `src` (bit `i` to bit `i`) into this bitmap,
    /// leaving `src` clear: each non-zero word is swapped with zero. Returns
    /// how many bits were newly set here. `src` may be shorter than `self`.
    pub fn merge_atomic<A: AsRef<[AtomicWord]>>(
        &mut self,
        src: &AtomicBitmap<A>,
    ) -> Result<u64, BitRangeError> {
        check_range(0, src.len(), self.len)?;
        let dst = self.words_mut();
        let mut newly = 0u64;
        for (i, d) in dst.iter_mut().enumerate().take(words_for(src.len())) {
            let s = src.take_word(i);
            newly += u64::from((s & !*d).count_ones());
            *d |= s;
        }
        self.dirty += newly;
        Ok(newly)
    }
}

/// Iterator over dirty pages, see [`MigrationBitmap::dirty_pages`].
#[derive(Debug)]
pub struct DirtyPages<'a> {
    words: &'a [u64],
    len: usize,
    index: usize,
    /// The bits of `words[index]` not yet returned.
    current: u64,
}

impl Iterator for DirtyPages<'_> {
    type Item = usize;

    // Inlined into the caller's loop, as a plain word loop would be: a
    // call per page costs more than finding the page.
    #[inline]
    fn next(&mut self) -> Option<usize> {
        while self.current == 0 {
            // The next word first, as a plain loop would: in a bitmap with
            // dirty pages everywhere (1% of pages leaves half the words
            // non-zero) the strided search would start and stop at once.
            self.index += 1;
            self.current = *self.words.get(self.index)?;
            if self.current == 0 {
                self.index = find_word(self.words, self.index + 1, 0)?;
                self.current = self.words[self.index];
            }
        }
        let page = self.index * WORD_BITS + self.current.trailing_zeros() as usize;
        self.current &= self.current - 1;
        // Bits past `len` are never set; the check keeps that an invariant
        // of the bitmap, not of this iterator.
        (page < self.len).then_some(page)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{alloc_atomic, alloc_plain};
    use super::*;
    use crate::testing::Rng;
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    fn check(map: &MigrationBitmap<impl AsRef<[u64]> + AsMut<[u64]>>, model: &[bool]) {
        for (i, &m) in model.iter().enumerate() {
            assert_eq!(map.is_set(i).unwrap(), m, "bit {i}");
        }
        assert_eq!(
            map.dirty_count(),
            model.iter().filter(|&&b| b).count() as u64
        );
        let last = *map.words().last().unwrap();
        assert_eq!(last & !last_word_mask(map.len()), 0, "bits past len");
        let runs = (0..model.len())
            .filter(|&i| model[i] && (i == 0 || !model[i - 1]))
            .count() as u64;
        assert_eq!(map.dirty_runs(), runs, "runs");
    }

    #[test]
    fn merges_and_scans_match_a_vec_bool_model() {
        let mut rng = Rng::new(7);
        // Fewer rounds under Miri, which runs this thousands of times slower.
        let rounds = if cfg!(miri) { 20 } else { 2000 };
        for len in [1usize, 64, 65, 300, 1000] {
            let mut map = MigrationBitmap::new(alloc_plain(words_for(len)), len).unwrap();
            let mut model = vec![false; len];
            for _ in 0..rounds {
                match rng.below(6) {
                    0 => {
                        let (s, c) = (rng.below(len as u64) as usize, rng.below(100) as usize);
                        let c = c.min(len - s);
                        let want = model[s..s + c].iter().filter(|&&b| !b).count() as u64;
                        assert_eq!(map.set_range(s, c), Ok(want));
                        model[s..s + c].fill(true);
                    }
                    1 => {
                        let b = rng.below(len as u64 + 1) as usize;
                        let got = map.take(b);
                        if b < len {
                            assert_eq!(got, Ok(model[b]));
                            model[b] = false;
                        } else {
                            assert!(got.is_err());
                        }
                    }
                    2 => {
                        // A log of arbitrary length at an arbitrary offset, with junk past log_bits.
                        let first = rng.below(len as u64) as usize;
                        let bits = rng.below((len - first) as u64 + 1) as usize;
                        let log: Vec<u64> = (0..words_for(bits).max(1))
                            .map(|_| rng.sparse_word())
                            .collect();
                        let mut want = 0;
                        for i in 0..bits {
                            if log[i / 64] >> (i % 64) & 1 == 1 && !model[first + i] {
                                model[first + i] = true;
                                want += 1;
                            }
                        }
                        assert_eq!(map.merge_log(first, &log, bits), Ok(want));
                    }
                    3 => {
                        let src_len = rng.below(len as u64 + 1) as usize;
                        let src =
                            AtomicBitmap::new(alloc_atomic(words_for(src_len)), src_len).unwrap();
                        let mut want = 0;
                        for (i, m) in model.iter_mut().enumerate().take(src_len) {
                            if rng.below(4) == 0 {
                                src.set_range(i, 1).unwrap();
                                want += u64::from(!*m);
                                *m = true;
                            }
                        }
                        assert_eq!(map.merge_atomic(&src), Ok(want));
                        assert_eq!(src.count_ones(), 0, "merge leaves the source clear");
                    }
                    4 => {
                        let from = rng.below(len as u64 + 2) as usize;
                        assert_eq!(map.find_next_dirty(from), (from..len).find(|&i| model[i]));
                        let all: Vec<usize> = map.dirty_pages(from).collect();
                        assert_eq!(all, (from..len).filter(|&i| model[i]).collect::<Vec<_>>());
                        assert_eq!(map.find_next_clean(from), (from..len).find(|&i| !model[i]));
                    }
                    _ => {
                        if rng.below(20) == 0 {
                            map.set_all();
                            model.fill(true);
                        }
                    }
                }
            }
            check(&map, &model);
        }
    }

    #[test]
    fn bad_ranges_are_errors() {
        let mut map = MigrationBitmap::new(alloc_plain(2), 100).unwrap();
        assert_eq!(
            map.merge_log(90, &[1, 1], 11),
            Err(BitRangeError {
                start: 90,
                count: 11,
                len: 100
            })
        );
        assert!(
            map.merge_log(0, &[1], 65).is_err(),
            "log shorter than log_bits"
        );
        let big = AtomicBitmap::new(alloc_atomic(2), 101).unwrap_or_else(|_| unreachable!());
        assert!(map.merge_atomic(&big).is_err());
        assert_eq!(map.dirty_count(), 0);
    }
}
