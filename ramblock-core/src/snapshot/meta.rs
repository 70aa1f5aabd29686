//! [`Meta`]: a snapshot's metadata, checked field by field.

use super::layout::{bitmap_len, DataCursor, MetaCursor};
use super::{
    meta_checksum, section_checksum, BlockEntry, FormatError, Header, Kind, SectionEntry,
    BLOCK_ENTRY_LEN, HEADER_LEN, SECTION_ENTRY_LEN,
};

/// A snapshot's metadata (header, tables, bitmaps, sections) that passed
/// every check of [`Meta::parse`]; its accessors cannot fail.
#[derive(Copy, Clone, Debug)]
pub struct Meta<'a> {
    header: Header,
    bytes: &'a [u8],
}

impl<'a> Meta<'a> {
    /// Checks `meta`, the first `header.meta_len` bytes of a file of
    /// `file_len` bytes, and wraps it. Nothing is allocated; the checks run
    /// in this order, so a file with several faults reports the first:
    /// the header's fields, the length of `meta`, the checksum, then each
    /// block (name, page size, used length, duplicates, bitmap place, bits
    /// past the end, held-page count, completeness of a full snapshot),
    /// each section (header, duplicates, place, checksum), the metadata's
    /// length, each block's data place, the data's end and the file's
    /// length.
    pub fn parse(meta: &'a [u8], file_len: u64) -> Result<Meta<'a>, FormatError> {
        let header = Header::decode(meta)?;
        if (meta.len() as u64) < header.meta_len {
            return Err(FormatError::Truncated {
                what: "metadata",
                len: meta.len() as u64,
                need: header.meta_len,
            });
        }
        // In bounds: meta_len <= MAX_META_LEN, which fits a usize here.
        let meta = &meta[..header.meta_len as usize];
        if file_len < header.meta_len {
            return Err(FormatError::FileTooShort {
                len: file_len,
                need: header.meta_len,
            });
        }
        let computed = meta_checksum(meta);
        if computed != header.meta_checksum {
            return Err(FormatError::MetaChecksum {
                found: header.meta_checksum,
                computed,
            });
        }
        let tables = super::layout::tables_len(header.block_count, header.section_count);
        if tables > header.meta_len {
            return Err(FormatError::MetaLen {
                found: header.meta_len,
                expected: super::layout::align_up(tables, 4096)?,
            });
        }
        let view = Meta {
            header,
            bytes: meta,
        };
        let mut cursor = MetaCursor::new(header.block_count, header.section_count);
        for index in 0..header.block_count {
            let entry = view.decode_block(index)?;
            for earlier in 0..index {
                if view.decode_block(earlier)?.name == entry.name {
                    return Err(FormatError::DuplicateBlock { index });
                }
            }
            let expected = cursor.bitmap(entry.used_length)?;
            if entry.bitmap_offset != expected {
                return Err(FormatError::BitmapOffset {
                    index,
                    found: entry.bitmap_offset,
                    expected,
                });
            }
            let len = bitmap_len(entry.used_length);
            let Some(bitmap) = expected
                .checked_add(len)
                .filter(|&end| end <= header.meta_len)
                .map(|end| &meta[expected as usize..end as usize])
            else {
                return Err(FormatError::MetaLen {
                    found: header.meta_len,
                    expected: cursor.meta_len()?,
                });
            };
            check_bitmap(index, &entry, bitmap, header.kind)?;
        }
        for index in 0..header.section_count {
            let entry = view.decode_section(index)?;
            for earlier in 0..index {
                let e = view.decode_section(earlier)?;
                if e.header.name == entry.header.name
                    && e.header.instance_id == entry.header.instance_id
                {
                    return Err(FormatError::DuplicateSection { index });
                }
            }
            let expected = cursor.section(entry.header.len)?;
            if entry.offset != expected {
                return Err(FormatError::SectionOffset {
                    index,
                    found: entry.offset,
                    expected,
                });
            }
            let Some(bytes) = expected
                .checked_add(entry.header.len)
                .filter(|&end| end <= header.meta_len)
                .map(|end| &meta[expected as usize..end as usize])
            else {
                return Err(FormatError::MetaLen {
                    found: header.meta_len,
                    expected: cursor.meta_len()?,
                });
            };
            if section_checksum(bytes) != entry.checksum {
                return Err(FormatError::SectionChecksum { index });
            }
        }
        let expected = cursor.meta_len()?;
        if expected != header.meta_len {
            return Err(FormatError::MetaLen {
                found: header.meta_len,
                expected,
            });
        }
        let mut data = DataCursor::new(header.meta_len);
        for index in 0..header.block_count {
            let entry = view.decode_block(index)?;
            let expected = data.data(entry.used_length, entry.page_size)?;
            if entry.data_offset != expected {
                return Err(FormatError::DataOffset {
                    index,
                    found: entry.data_offset,
                    expected,
                });
            }
        }
        if header.data_end != data.end() {
            return Err(FormatError::DataEnd {
                found: header.data_end,
                expected: data.end(),
            });
        }
        if file_len < header.data_end {
            return Err(FormatError::FileTooShort {
                len: file_len,
                need: header.data_end,
            });
        }
        Ok(view)
    }

    fn decode_block(&self, index: u32) -> Result<BlockEntry, FormatError> {
        let at = HEADER_LEN + index as usize * BLOCK_ENTRY_LEN;
        BlockEntry::decode(index, &self.bytes[at..])
    }

    fn decode_section(&self, index: u32) -> Result<SectionEntry, FormatError> {
        let at = HEADER_LEN
            + self.header.block_count as usize * BLOCK_ENTRY_LEN
            + index as usize * SECTION_ENTRY_LEN;
        SectionEntry::decode(index, &self.bytes[at..])
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The metadata's bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Blocks in the file.
    pub fn block_count(&self) -> u32 {
        self.header.block_count
    }

    /// Block `index` (`None` past the last).
    pub fn block(&self, index: u32) -> Option<BlockEntry> {
        (index < self.header.block_count).then(|| self.decode_block(index).ok())?
    }

    /// The index of the block called `name`.
    pub fn find_block(&self, name: &str) -> Option<u32> {
        (0..self.header.block_count)
            .find(|&i| self.block(i).is_some_and(|b| b.name.as_str() == name))
    }

    /// Block `index`'s page bitmap: bit `i % 64` of little-endian word
    /// `i / 64` is page `i`.
    pub fn bitmap(&self, index: u32) -> Option<&'a [u8]> {
        let b = self.block(index)?;
        let start = b.bitmap_offset as usize;
        Some(&self.bytes[start..start + bitmap_len(b.used_length) as usize])
    }

    /// Whether the file holds page `page` of block `index`.
    pub fn holds(&self, index: u32, page: u64) -> bool {
        self.bitmap(index)
            .and_then(|bm| bm.get((page / 8) as usize))
            .is_some_and(|byte| byte & (1 << (page % 8)) != 0)
    }

    /// Sections in the file.
    pub fn section_count(&self) -> u32 {
        self.header.section_count
    }

    /// Section `index` and its bytes.
    pub fn section(&self, index: u32) -> Option<(SectionEntry, &'a [u8])> {
        if index >= self.header.section_count {
            return None;
        }
        let e = self.decode_section(index).ok()?;
        let start = e.offset as usize;
        let bytes = &self.bytes[start..start + e.header.len as usize];
        Some((e, bytes))
    }

    /// The bytes of the section called `name` with `instance_id`.
    pub fn find_section(&self, name: &str, instance_id: u32) -> Option<(SectionEntry, &'a [u8])> {
        (0..self.header.section_count)
            .filter_map(|i| self.section(i))
            .find(|(e, _)| e.header.name.as_str() == name && e.header.instance_id == instance_id)
    }
}

/// Checks one block's bitmap: nothing past its pages, the held count, and
/// a full snapshot's completeness.
fn check_bitmap(
    index: u32,
    entry: &BlockEntry,
    bitmap: &[u8],
    kind: Kind,
) -> Result<(), FormatError> {
    let pages = entry.pages();
    let mut counted = 0u64;
    for (w, chunk) in bitmap.chunks_exact(8).enumerate() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let first = w as u64 * 64;
        let valid = pages.saturating_sub(first).min(64);
        if valid < 64 && word >> valid != 0 {
            return Err(FormatError::BitmapTail { index });
        }
        if kind == Kind::Full && valid > 0 {
            let all = if valid == 64 {
                u64::MAX
            } else {
                (1u64 << valid) - 1
            };
            if word != all {
                return Err(FormatError::FullMissingPage {
                    index,
                    page: first + u64::from((!word & all).trailing_zeros()),
                });
            }
        }
        counted += u64::from(word.count_ones());
    }
    if counted != entry.held_pages {
        return Err(FormatError::HeldPages {
            index,
            found: entry.held_pages,
            counted,
        });
    }
    Ok(())
}
