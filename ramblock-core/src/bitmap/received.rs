//! [`ReceivedMap`]: which pages a post-copy destination has received.
//!
//! Fault-handling threads test it while the placing thread marks it, so it is
//! atomic. It is bounded by the block's post-copy length: a page at or past
//! that length can never be placed.

use super::{words_for, AtomicBitmap, AtomicWord, BitRangeError, StorageTooSmall};
use core::fmt;

/// The received pages of one block.
pub struct ReceivedMap<W> {
    bits: AtomicBitmap<W>,
    postcopy_pages: usize,
}

/// A page the received map cannot record.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ReceivedError {
    /// The page.
    pub page: u64,
    /// The block's post-copy length in pages.
    pub postcopy_pages: u64,
}

impl fmt::Display for ReceivedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "page {} is at or past the block's post-copy length of {} pages",
            self.page, self.postcopy_pages
        )
    }
}

impl core::error::Error for ReceivedError {}

impl<W: AsRef<[AtomicWord]>> fmt::Debug for ReceivedMap<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ReceivedMap {{ postcopy_pages: {}, received: {} }}",
            self.postcopy_pages,
            self.received_count()
        )
    }
}

impl<W: AsRef<[AtomicWord]>> ReceivedMap<W> {
    /// A received map over `words` for a block whose post-copy length is
    /// `postcopy_pages`; nothing received yet.
    pub fn new(words: W, postcopy_pages: usize) -> Result<Self, StorageTooSmall> {
        Ok(ReceivedMap {
            bits: AtomicBitmap::new(words, postcopy_pages)?,
            postcopy_pages,
        })
    }

    /// Words needed for `postcopy_pages` pages.
    pub const fn words_needed(postcopy_pages: usize) -> usize {
        words_for(postcopy_pages)
    }

    /// The post-copy length in pages.
    pub fn postcopy_pages(&self) -> usize {
        self.postcopy_pages
    }

    fn check(&self, page: usize, count: usize) -> Result<(), ReceivedError> {
        match page.checked_add(count) {
            Some(end) if end <= self.postcopy_pages => Ok(()),
            // Report the first page that does not fit.
            _ => Err(ReceivedError {
                page: page.max(self.postcopy_pages) as u64,
                postcopy_pages: self.postcopy_pages as u64,
            }),
        }
    }

    /// Records `count` pages from `page` as received.
    pub fn mark_received(&self, page: usize, count: usize) -> Result<(), ReceivedError> {
        self.check(page, count)?;
        Ok(self.bits.set_range(page, count)?)
    }

    /// Records `count` pages from `page` as not received (post-copy: the
    /// source changed them after sending, so they were dropped).
    pub fn mark_missing(&self, page: usize, count: usize) -> Result<(), ReceivedError> {
        self.check(page, count)?;
        Ok(self.bits.clear_range(page, count)?)
    }

    /// Whether `page` has been received.
    pub fn is_received(&self, page: usize) -> Result<bool, ReceivedError> {
        self.check(page, 1)?;
        Ok(self.bits.is_set(page)?)
    }

    /// Pages received so far.
    pub fn received_count(&self) -> u64 {
        self.bits.count_ones()
    }

    /// The first page at or after `from` not yet received.
    pub fn find_next_missing(&self, from: usize) -> Option<usize> {
        self.bits.find_next_clear(from)
    }

    /// The underlying bitmap (its words are what a resuming destination
    /// sends back to the source).
    pub fn bitmap(&self) -> &AtomicBitmap<W> {
        &self.bits
    }

    /// Forgets every received page (a fresh incoming migration).
    pub fn reset(&self) {
        self.bits.clear_all();
    }
}

impl From<BitRangeError> for ReceivedError {
    fn from(e: BitRangeError) -> Self {
        ReceivedError {
            page: e.start,
            postcopy_pages: e.len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::alloc_atomic;
    use super::*;

    #[test]
    fn pages_past_the_postcopy_length_are_errors() {
        let map = ReceivedMap::new(alloc_atomic(2), 100).unwrap();
        map.mark_received(0, 10).unwrap();
        map.mark_received(99, 1).unwrap();
        assert_eq!(
            map.mark_received(100, 1),
            Err(ReceivedError {
                page: 100,
                postcopy_pages: 100
            })
        );
        assert_eq!(
            map.mark_received(95, 6),
            Err(ReceivedError {
                page: 100,
                postcopy_pages: 100
            })
        );
        assert_eq!(
            map.is_received(100),
            Err(ReceivedError {
                page: 100,
                postcopy_pages: 100
            })
        );
        assert_eq!(map.received_count(), 11);
        assert_eq!(map.find_next_missing(0), Some(10));
        assert_eq!(map.find_next_missing(99), None);
        map.mark_missing(3, 2).unwrap();
        assert_eq!(map.received_count(), 9);
        assert_eq!(map.find_next_missing(0), Some(3));
        assert!(map.mark_missing(99, 2).is_err());
        assert_eq!(map.received_count(), 9);
        map.reset();
        assert_eq!(map.received_count(), 0);
    }
}
