//! [`AtomicBitmap`]: a dirty client's bitmap that any thread may update.
//!
//! Setting a range touches words, not bits: whole words are stored in one
//! operation, so marking 512 pages is a handful of atomic operations.
//!
//! Ordering: setters publish with `Release` after writing the page, and
//! harvesters take words with an `AcqRel` swap before reading the page, so a
//! harvester that sees a bit also sees the write that set it. A bit set while
//! a harvest is running is either taken by it or left for the next one; it is
//! never lost.

#[cfg(test)]
use super::last_word_mask;
use super::{
    check_range, for_each_word_mask, words_for, AtomicWord, BitRangeError, StorageTooSmall,
    WORD_BITS,
};
use core::fmt;
use core::ops::Range;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

/// A bitmap of `len` bits over atomic words.
pub struct AtomicBitmap<W> {
    words: W,
    len: usize,
}

impl<W: AsRef<[AtomicWord]>> fmt::Debug for AtomicBitmap<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AtomicBitmap {{ len: {}, set: {} }}",
            self.len,
            self.count_ones()
        )
    }
}

impl<W: AsRef<[AtomicWord]>> AtomicBitmap<W> {
    /// A bitmap of `len` bits over `words`; all bits start clear.
    pub fn new(words: W, len: usize) -> Result<Self, StorageTooSmall> {
        let needed = words_for(len);
        let given = words.as_ref().len();
        if given < needed {
            return Err(StorageTooSmall { needed, given });
        }
        let map = AtomicBitmap { words, len };
        map.words().iter().for_each(|w| w.store(0, Relaxed));
        Ok(map)
    }

    /// The bits covered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the bitmap covers no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The words covering the bitmap (extra caller words excluded).
    pub fn words(&self) -> &[AtomicWord] {
        &self.words.as_ref()[..words_for(self.len)]
    }

    /// Sets `count` bits from `start`.
    pub fn set_range(&self, start: usize, count: usize) -> Result<(), BitRangeError> {
        let end = check_range(start, count, self.len)?;
        let words = self.words();
        for_each_word_mask(start, end, |w, mask| {
            if mask == !0 {
                // A whole word: a plain store cannot lose a concurrent
                // setter's bits (they are all ones) nor a harvester's (it
                // either swapped before, or finds all ones after).
                words[w].store(!0, Release);
            } else {
                words[w].fetch_or(mask, Release);
            }
        });
        Ok(())
    }

    /// Clears `count` bits from `start`.
    pub fn clear_range(&self, start: usize, count: usize) -> Result<(), BitRangeError> {
        let end = check_range(start, count, self.len)?;
        let words = self.words();
        for_each_word_mask(start, end, |w, mask| {
            words[w].fetch_and(!mask, Relaxed);
        });
        Ok(())
    }

    /// Clears every bit.
    pub fn clear_all(&self) {
        self.words().iter().for_each(|w| w.store(0, Relaxed));
    }

    /// Whether bit `bit` is set.
    pub fn is_set(&self, bit: usize) -> Result<bool, BitRangeError> {
        check_range(bit, 1, self.len)?;
        Ok(self.words()[bit / WORD_BITS].load(Acquire) >> (bit % WORD_BITS) & 1 == 1)
    }

    /// Whether any of `count` bits from `start` is set.
    pub fn any_in_range(&self, start: usize, count: usize) -> Result<bool, BitRangeError> {
        let end = check_range(start, count, self.len)?;
        let words = self.words();
        let mut any = false;
        for_each_word_mask(start, end, |w, mask| {
            any |= words[w].load(Acquire) & mask != 0
        });
        Ok(any)
    }

    /// Clears `count` bits from `start` and returns how many of them were set.
    pub fn test_and_clear_range(&self, start: usize, count: usize) -> Result<u64, BitRangeError> {
        let end = check_range(start, count, self.len)?;
        let words = self.words();
        let mut taken = 0;
        for_each_word_mask(start, end, |w, mask| {
            let old = if mask == !0 {
                // Skip clean words without writing them: no cache-line bounce.
                match words[w].load(Relaxed) {
                    0 => 0,
                    _ => words[w].swap(0, AcqRel),
                }
            } else {
                words[w].fetch_and(!mask, AcqRel)
            };
            taken += u64::from((old & mask).count_ones());
        });
        Ok(taken)
    }

    /// Takes the whole word `index` (bits `64 * index ..`), leaving it zero.
    /// Used by merges; clean words are not written.
    pub(crate) fn take_word(&self, index: usize) -> u64 {
        let word = &self.words()[index];
        match word.load(Relaxed) {
            0 => 0,
            _ => word.swap(0, AcqRel),
        }
    }

    /// How many bits are set.
    pub fn count_ones(&self) -> u64 {
        self.words()
            .iter()
            .map(|w| u64::from(w.load(Relaxed).count_ones()))
            .sum()
    }

    /// The first set bit at or after `from`.
    pub fn find_next_set(&self, from: usize) -> Option<usize> {
        self.find(from, 0)
    }

    /// The first clear bit at or after `from` (below `len`).
    pub fn find_next_clear(&self, from: usize) -> Option<usize> {
        self.find(from, !0)
    }

    fn find(&self, from: usize, fill: u64) -> Option<usize> {
        if from >= self.len {
            return None;
        }
        let words = self.words();
        let mut w = from / WORD_BITS;
        let mut bits = (words[w].load(Acquire) ^ fill) & (!0u64 << (from % WORD_BITS));
        loop {
            if bits != 0 {
                let found = w * WORD_BITS + bits.trailing_zeros() as usize;
                return (found < self.len).then_some(found);
            }
            w += 1;
            bits = words.get(w)?.load(Acquire) ^ fill;
        }
    }

    /// The runs of set bits at or after `from`, in order, as ranges.
    pub fn runs(&self, from: usize) -> Runs<'_, W> {
        Runs {
            map: self,
            next: from,
        }
    }

    /// Checks that bits past `len` in the last word are clear (an invariant
    /// every operation keeps).
    #[cfg(test)]
    pub(crate) fn tail_is_clean(&self) -> bool {
        self.words()
            .last()
            .is_none_or(|w| w.load(Relaxed) & !last_word_mask(self.len) == 0)
    }
}

/// Iterator over runs of set bits, see [`AtomicBitmap::runs`].
pub struct Runs<'a, W> {
    map: &'a AtomicBitmap<W>,
    next: usize,
}

impl<W: AsRef<[AtomicWord]>> fmt::Debug for Runs<'_, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Runs {{ next: {} }}", self.next)
    }
}

impl<W: AsRef<[AtomicWord]>> Iterator for Runs<'_, W> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        let start = self.map.find_next_set(self.next)?;
        let end = self.map.find_next_clear(start).unwrap_or(self.map.len);
        self.next = end;
        Some(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::super::alloc_atomic;
    use super::*;
    extern crate std;
    use crate::testing::Rng;
    use std::vec::Vec;

    fn model_check(map: &AtomicBitmap<impl AsRef<[AtomicWord]>>, model: &[bool]) {
        for (i, &m) in model.iter().enumerate() {
            assert_eq!(map.is_set(i).unwrap(), m, "bit {i}");
        }
        assert_eq!(
            map.count_ones(),
            model.iter().filter(|&&b| b).count() as u64
        );
        assert!(map.tail_is_clean());
    }

    #[test]
    fn matches_a_vec_bool_model() {
        let mut rng = Rng::new(1);
        // Fewer rounds under Miri, which runs this thousands of times slower.
        let rounds = if cfg!(miri) { 20 } else { 2000 };
        for len in [1usize, 63, 64, 65, 200, 1000] {
            let map = AtomicBitmap::new(alloc_atomic(words_for(len)), len).unwrap();
            let mut model = std::vec![false; len];
            for _ in 0..rounds {
                let start = rng.below(len as u64 + 2) as usize;
                let count = rng.below(150) as usize;
                let in_range = start + count <= len;
                match rng.below(6) {
                    0 => {
                        assert_eq!(map.set_range(start, count).is_ok(), in_range);
                        if in_range {
                            model[start..start + count].fill(true);
                        }
                    }
                    1 => {
                        assert_eq!(map.clear_range(start, count).is_ok(), in_range);
                        if in_range {
                            model[start..start + count].fill(false);
                        }
                    }
                    2 => {
                        let got = map.test_and_clear_range(start, count);
                        if in_range {
                            let want =
                                model[start..start + count].iter().filter(|&&b| b).count() as u64;
                            assert_eq!(got, Ok(want));
                            model[start..start + count].fill(false);
                        } else {
                            assert!(got.is_err());
                        }
                    }
                    3 => {
                        let want = (start..len).find(|&i| model[i]);
                        assert_eq!(map.find_next_set(start), want);
                        let want = (start..len).find(|&i| !model[i]);
                        assert_eq!(map.find_next_clear(start), want);
                    }
                    4 => {
                        let got = map.any_in_range(start, count);
                        if in_range {
                            assert_eq!(got, Ok(model[start..start + count].iter().any(|&b| b)));
                        } else {
                            assert!(got.is_err());
                        }
                    }
                    _ => {
                        let runs: Vec<_> = map.runs(0).collect();
                        let mut want = Vec::new();
                        let mut i = 0;
                        while i < len {
                            if model[i] {
                                let s = i;
                                while i < len && model[i] {
                                    i += 1;
                                }
                                want.push(s..i);
                            }
                            i += 1;
                        }
                        assert_eq!(runs, want);
                    }
                }
            }
            model_check(&map, &model);
        }
    }

    #[test]
    fn borrowed_storage_is_checked_and_zeroed() {
        let words: [AtomicWord; 2] = [AtomicWord::new(!0), AtomicWord::new(!0)];
        assert_eq!(
            AtomicBitmap::new(&words[..], 129).unwrap_err(),
            StorageTooSmall {
                needed: 3,
                given: 2
            }
        );
        let map = AtomicBitmap::new(&words[..], 100).unwrap();
        assert_eq!(map.count_ones(), 0);
        assert_eq!(
            map.set_range(99, 2),
            Err(BitRangeError {
                start: 99,
                count: 2,
                len: 100
            })
        );
        assert_eq!(
            map.is_set(100),
            Err(BitRangeError {
                start: 100,
                count: 1,
                len: 100
            })
        );
    }

    #[test]
    fn a_512_page_range_is_eight_word_stores() {
        // Word-granular setting is what makes this fast; check the effect:
        // exactly 8 whole words, nothing around them.
        let map = AtomicBitmap::new(alloc_atomic(10), 640).unwrap();
        map.set_range(64, 512).unwrap();
        let words: Vec<u64> = map.words().iter().map(|w| w.load(Relaxed)).collect();
        assert_eq!(words, [0, !0, !0, !0, !0, !0, !0, !0, !0, 0]);
    }
}
