//! [`ClearMap`]: which chunks still need their dirty log cleared in the
//! hypervisor.
//!
//! With KVM's manual-protect mode, harvesting the dirty log leaves memory
//! writable; the chunks just harvested are marked here instead, and a chunk
//! is cleared in KVM (re-protected) just before the first of its pages is
//! sent. One bit covers `2^shift` target pages. Clearing early is always
//! safe; clearing after a page was sent could lose a write made in between.

use super::{check_range, words_for, BitRangeError, StorageTooSmall, WORD_BITS};
use core::fmt;
use core::ops::Range;

/// The default chunk shift: 2^18 pages of 4 KiB = 1 GiB per bit.
pub const DEFAULT_CLEAR_SHIFT: u8 = 18;
/// Smallest chunk shift: 64 pages, one bitmap word.
pub const MIN_CLEAR_SHIFT: u8 = 6;
/// Largest chunk shift: 2^31 pages (8 TiB).
pub const MAX_CLEAR_SHIFT: u8 = 31;

/// A chunk shift outside `6..=31`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ClearShiftError(pub u8);

impl fmt::Display for ClearShiftError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "clear-map shift {} is outside {MIN_CLEAR_SHIFT}..={MAX_CLEAR_SHIFT} (2^shift pages per chunk)",
            self.0
        )
    }
}

impl core::error::Error for ClearShiftError {}

/// One bit per chunk of `2^shift` pages of a `pages`-page block.
pub struct ClearMap<W> {
    words: W,
    pages: usize,
    shift: u8,
}

impl<W> fmt::Debug for ClearMap<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClearMap {{ pages: {}, shift: {} }}",
            self.pages, self.shift
        )
    }
}

impl<W: AsRef<[u64]> + AsMut<[u64]>> ClearMap<W> {
    /// Words needed for a `pages`-page block at `shift`.
    pub fn words_needed(pages: usize, shift: u8) -> Result<usize, ClearShiftError> {
        Self::check_shift(shift)?;
        Ok(words_for(Self::chunks_of(pages, shift)))
    }

    fn check_shift(shift: u8) -> Result<(), ClearShiftError> {
        if (MIN_CLEAR_SHIFT..=MAX_CLEAR_SHIFT).contains(&shift) {
            Ok(())
        } else {
            Err(ClearShiftError(shift))
        }
    }

    fn chunks_of(pages: usize, shift: u8) -> usize {
        // A shift past the pointer width means one chunk covers everything.
        match 1usize.checked_shl(u32::from(shift)) {
            Some(chunk) => pages.div_ceil(chunk),
            None => usize::from(pages > 0),
        }
    }

    /// A clear map for `pages` pages with chunks of `2^shift` pages; all clear.
    pub fn new(mut words: W, pages: usize, shift: u8) -> Result<Self, ClearMapNewError> {
        let needed = Self::words_needed(pages, shift).map_err(ClearMapNewError::Shift)?;
        let given = words.as_ref().len();
        if given < needed {
            return Err(ClearMapNewError::Storage(StorageTooSmall { needed, given }));
        }
        words.as_mut()[..needed].fill(0);
        Ok(ClearMap {
            words,
            pages,
            shift,
        })
    }

    /// The chunk shift.
    pub fn shift(&self) -> u8 {
        self.shift
    }

    /// Pages covered.
    pub fn pages(&self) -> usize {
        self.pages
    }

    fn chunk_of(&self, page: usize) -> usize {
        page.checked_shr(u32::from(self.shift)).unwrap_or(0)
    }

    /// The pages of chunk `chunk`, clamped to the block.
    fn chunk_pages(&self, chunk: usize) -> Range<usize> {
        let start = chunk.checked_shl(u32::from(self.shift)).unwrap_or(0);
        let end = match 1usize.checked_shl(u32::from(self.shift)) {
            Some(size) => start.saturating_add(size).min(self.pages),
            None => self.pages,
        };
        start..end
    }

    /// Marks every chunk that overlaps `count` pages from `start` as needing a
    /// clear (called after harvesting those pages).
    pub fn mark_range(&mut self, start: usize, count: usize) -> Result<(), BitRangeError> {
        let end = check_range(start, count, self.pages)?;
        if count == 0 {
            return Ok(());
        }
        let (first, last) = (self.chunk_of(start), self.chunk_of(end - 1));
        let words = self.words.as_mut();
        for chunk in first..=last {
            words[chunk / WORD_BITS] |= 1 << (chunk % WORD_BITS);
        }
        Ok(())
    }

    /// Whether the chunk holding `page` still needs a clear.
    pub fn is_marked(&self, page: usize) -> Result<bool, BitRangeError> {
        check_range(page, 1, self.pages)?;
        let chunk = self.chunk_of(page);
        Ok(self.words.as_ref()[chunk / WORD_BITS] >> (chunk % WORD_BITS) & 1 == 1)
    }

    /// If the chunk holding `page` needs a clear, unmarks it and returns the
    /// chunk's page range (clamped to the block) for the caller to clear in
    /// the hypervisor; otherwise `None`.
    pub fn test_and_clear_chunk_of(
        &mut self,
        page: usize,
    ) -> Result<Option<Range<usize>>, BitRangeError> {
        check_range(page, 1, self.pages)?;
        let chunk = self.chunk_of(page);
        let word = &mut self.words.as_mut()[chunk / WORD_BITS];
        let bit = 1u64 << (chunk % WORD_BITS);
        if *word & bit == 0 {
            return Ok(None);
        }
        *word &= !bit;
        Ok(Some(self.chunk_pages(chunk)))
    }
}

/// Why a [`ClearMap`] could not be made.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ClearMapNewError {
    /// The shift is out of range.
    Shift(ClearShiftError),
    /// The storage is too small.
    Storage(StorageTooSmall),
}

impl fmt::Display for ClearMapNewError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClearMapNewError::Shift(e) => e.fmt(f),
            ClearMapNewError::Storage(e) => e.fmt(f),
        }
    }
}

impl core::error::Error for ClearMapNewError {}

#[cfg(test)]
mod tests {
    use super::super::alloc_plain;
    use super::*;
    use crate::testing::Rng;
    extern crate std;
    use std::vec;

    #[test]
    fn shift_bounds_are_errors() {
        for bad in [0u8, 5, 32, 255] {
            assert_eq!(
                ClearMap::<&mut [u64]>::words_needed(100, bad),
                Err(ClearShiftError(bad))
            );
            assert_eq!(
                ClearMap::new(alloc_plain(4), 100, bad).unwrap_err(),
                ClearMapNewError::Shift(ClearShiftError(bad))
            );
        }
        assert_eq!(ClearMap::<&mut [u64]>::words_needed(64 * 65, 6), Ok(2));
        assert_eq!(ClearMap::<&mut [u64]>::words_needed(1 << 40, 31), Ok(8));
        assert_eq!(ClearMap::<&mut [u64]>::words_needed(1 << 31, 31), Ok(1));
    }

    #[test]
    fn chunks_match_a_model() {
        let mut rng = Rng::new(3);
        // Fewer rounds under Miri, which runs this thousands of times slower.
        let rounds = if cfg!(miri) { 40 } else { 500 };
        for (pages, shift) in [
            (1000usize, 6u8),
            (64 * 70 + 5, 6),
            (5000, 8),
            (100, 18),
            (1 << 20, 31),
        ] {
            let chunk = 1usize << shift;
            let chunks = pages.div_ceil(chunk);
            let mut map = ClearMap::new(alloc_plain(words_for(chunks)), pages, shift).unwrap();
            let mut model = vec![false; chunks];
            for _ in 0..rounds {
                let page = rng.below(pages as u64) as usize;
                if rng.below(2) == 0 {
                    let count = (rng.below(300) as usize).min(pages - page);
                    map.mark_range(page, count).unwrap();
                    if count > 0 {
                        model[page / chunk..=(page + count - 1) / chunk].fill(true);
                    }
                } else {
                    let want = model[page / chunk]
                        .then(|| page / chunk * chunk..((page / chunk + 1) * chunk).min(pages));
                    model[page / chunk] = false;
                    assert_eq!(map.test_and_clear_chunk_of(page), Ok(want));
                }
                assert_eq!(map.is_marked(page), Ok(model[page / chunk]));
            }
            assert!(map.mark_range(pages, 1).is_err());
            assert!(map.test_and_clear_chunk_of(pages).is_err());
        }
    }
}
