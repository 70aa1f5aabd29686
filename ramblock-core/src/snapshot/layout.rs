//! Where everything in a snapshot file goes, computed from what it holds.
//!
//! Nothing in the file is placed by choice: the header, then the block
//! table, then the section table; each block's page bitmap (8-byte
//! aligned, in block order); each section's bytes (8-byte aligned, in
//! table order); padding to a 4 KiB boundary ends the metadata. Then each
//! block's data, aligned to the larger of 4 KiB and the block's page size
//! (so a hugepage block's data can be mapped from hugetlbfs), one 4 KiB
//! slot per target page: page `i` of a block is at `data_offset + i * 4096`.
//! The writer places with [`MetaCursor`] and [`DataCursor`]; the reader
//! runs the same cursors and refuses a file whose offsets differ.

use super::error::FormatError;
use super::{BLOCK_ENTRY_LEN, HEADER_LEN, SECTION_ENTRY_LEN};
use crate::addr::{ByteLen, PageSize, TARGET_PAGE_SIZE};

/// Bytes of header and tables for `blocks` blocks and `sections` sections.
pub const fn tables_len(blocks: u32, sections: u32) -> u64 {
    HEADER_LEN as u64
        + blocks as u64 * BLOCK_ENTRY_LEN as u64
        + sections as u64 * SECTION_ENTRY_LEN as u64
}

/// Bytes of the page bitmap of a block of `used` bytes: one bit per
/// target page, in whole 64-bit words (bit `i % 64` of little-endian word
/// `i / 64` is page `i`).
pub const fn bitmap_len(used: ByteLen) -> u64 {
    used.0.div_ceil(TARGET_PAGE_SIZE).div_ceil(64) * 8
}

/// `value` rounded up to `align` (a power of two), or an overflow error.
pub fn align_up(value: u64, align: u64) -> Result<u64, FormatError> {
    value
        .checked_add(align - 1)
        .map(|v| v & !(align - 1))
        .ok_or(FormatError::Overflow)
}

/// Places bitmaps and section bytes after the tables.
#[derive(Copy, Clone, Debug)]
pub struct MetaCursor {
    at: u64,
}

impl MetaCursor {
    /// A cursor just past the tables.
    pub fn new(blocks: u32, sections: u32) -> MetaCursor {
        MetaCursor {
            at: tables_len(blocks, sections),
        }
    }

    /// The place of the next block's bitmap (`used` bytes of block).
    pub fn bitmap(&mut self, used: ByteLen) -> Result<u64, FormatError> {
        self.take(bitmap_len(used))
    }

    /// The place of the next section's `len` bytes.
    pub fn section(&mut self, len: u64) -> Result<u64, FormatError> {
        self.take(len)
    }

    fn take(&mut self, len: u64) -> Result<u64, FormatError> {
        let at = align_up(self.at, 8)?;
        self.at = at.checked_add(len).ok_or(FormatError::Overflow)?;
        Ok(at)
    }

    /// The metadata's length: everything placed, rounded up to 4 KiB.
    pub fn meta_len(&self) -> Result<u64, FormatError> {
        align_up(self.at, TARGET_PAGE_SIZE)
    }
}

/// Places block data after the metadata.
#[derive(Copy, Clone, Debug)]
pub struct DataCursor {
    at: u64,
}

impl DataCursor {
    /// A cursor at the end of `meta_len` bytes of metadata.
    pub fn new(meta_len: u64) -> DataCursor {
        DataCursor { at: meta_len }
    }

    /// The place of the next block's data: `used` bytes with `page_size`
    /// pages, aligned to the page size (at least 4 KiB).
    pub fn data(&mut self, used: ByteLen, page_size: PageSize) -> Result<u64, FormatError> {
        let align = page_size.bytes().max(TARGET_PAGE_SIZE);
        let at = align_up(self.at, align)?;
        let len = align_up(used.0, align)?;
        self.at = at.checked_add(len).ok_or(FormatError::Overflow)?;
        Ok(at)
    }

    /// Where the data ends: the file's length.
    pub fn end(&self) -> u64 {
        self.at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_aligned_and_disjoint() {
        let mut m = MetaCursor::new(2, 1);
        let t = tables_len(2, 1);
        let b0 = m.bitmap(ByteLen(4096 * 65)).unwrap();
        assert_eq!(b0, (t + 7) & !7);
        let b1 = m.bitmap(ByteLen(4096)).unwrap();
        assert_eq!(b1, b0 + 16);
        let s = m.section(3).unwrap();
        assert_eq!(s, b1 + 8);
        assert_eq!(m.meta_len().unwrap(), 4096);
        let mut d = DataCursor::new(4096);
        assert_eq!(d.data(ByteLen(8192), PageSize::SIZE_4K).unwrap(), 4096);
        assert_eq!(
            d.data(ByteLen(2 << 20), PageSize::SIZE_2M).unwrap(),
            2 << 20
        );
        assert_eq!(d.end(), 4 << 20);
        let mut d = DataCursor::new(u64::MAX - 4095);
        assert_eq!(
            d.data(ByteLen(4096), PageSize::SIZE_2M),
            Err(FormatError::Overflow)
        );
    }
}
