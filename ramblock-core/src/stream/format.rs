//! The wire format, version 1 (documented in `docs/stream-format.md`).
//!
//! Everything is little-endian. A stream is a [`Header`], one [`TableEntry`]
//! per migrated block, then [`Record`]s until an `End` record. Pages travel in
//! `Pages` records of at most [`MAX_RUN_PAGES`] consecutive pages of one
//! block; pages that are all zero travel as a count in `Zero` records.

use super::io::{ByteRead, ByteWrite, ReadError};
use crate::addr::TARGET_PAGE_SHIFT;

/// First bytes of every stream.
pub const MAGIC: [u8; 8] = *b"RAMBLOCK";
/// The version this code writes and reads.
pub const VERSION: u16 = 1;
/// Most pages in one `Pages` or `Zero` record.
pub const MAX_RUN_PAGES: u32 = 64;
/// The receiver's acknowledgement after a good `End` record.
pub const ACK_OK: [u8; 4] = *b"RBOK";
/// The receiver's refusal, followed by a u32 error code.
pub const ACK_ERR: [u8; 4] = *b"RBER";

/// Record tags.
pub mod tag {
    /// A run of normal pages.
    pub const PAGES: u8 = 1;
    /// A run of zero pages, as a count.
    pub const ZERO: u8 = 2;
    /// End of a pass.
    pub const SYNC: u8 = 3;
    /// A block's used length changed.
    pub const RESIZE: u8 = 4;
    /// End of the stream, with checksums.
    pub const END: u8 = 5;
}

/// The stream header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: u16,
    /// log2 of the target page size.
    pub page_shift: u8,
    /// Blocks in the table that follows.
    pub block_count: u32,
}

/// One block-table entry. The name is passed separately (borrowed).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TableEntry {
    /// The block's used length in bytes.
    pub used_length: u64,
    /// The host page size of the block on the source.
    pub page_size: u64,
    /// The source block's flags (bits of `BlockFlags`).
    pub flags: u32,
}

/// A record header; `Pages` is followed by `count * 4096` bytes, `End` by
/// one u64 checksum per table entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// `count` normal pages of block `block` from page `first`.
    Pages {
        /// Index in the block table.
        block: u32,
        /// First target page.
        first: u64,
        /// Pages that follow.
        count: u32,
    },
    /// `count` zero pages of block `block` from page `first`.
    Zero {
        /// Index in the block table.
        block: u32,
        /// First target page.
        first: u64,
        /// Pages.
        count: u32,
    },
    /// Pass `pass` ended with `remaining` pages still dirty.
    Sync {
        /// Pass number.
        pass: u32,
        /// Dirty pages left on the source.
        remaining: u64,
    },
    /// Block `block` now uses `used_length` bytes.
    Resize {
        /// Index in the block table.
        block: u32,
        /// The new used length.
        used_length: u64,
    },
    /// The end: `count` checksums follow (one per table entry).
    End {
        /// Checksums that follow.
        count: u32,
    },
}

/// Reads exactly `N` bytes.
pub(crate) fn read_array<R: ByteRead, const N: usize>(
    r: &mut R,
) -> Result<[u8; N], ReadError<R::Error>> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

pub(crate) fn read_u32<R: ByteRead>(r: &mut R) -> Result<u32, ReadError<R::Error>> {
    read_array(r).map(u32::from_le_bytes)
}

pub(crate) fn read_u64<R: ByteRead>(r: &mut R) -> Result<u64, ReadError<R::Error>> {
    read_array(r).map(u64::from_le_bytes)
}

impl Header {
    /// The header for `block_count` blocks in this version.
    pub fn new(block_count: u32) -> Header {
        Header {
            version: VERSION,
            page_shift: TARGET_PAGE_SHIFT as u8,
            block_count,
        }
    }

    /// Writes the header.
    pub fn write<W: ByteWrite>(&self, w: &mut W) -> Result<(), W::Error> {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10] = self.page_shift;
        b[12..16].copy_from_slice(&self.block_count.to_le_bytes());
        w.write_all(&b)
    }

    /// Reads a header; `Ok(None)` if the magic is wrong.
    pub fn read<R: ByteRead>(r: &mut R) -> Result<Option<Header>, ReadError<R::Error>> {
        let b: [u8; 16] = read_array(r)?;
        if b[..8] != MAGIC {
            return Ok(None);
        }
        Ok(Some(Header {
            version: u16::from_le_bytes([b[8], b[9]]),
            page_shift: b[10],
            block_count: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }))
    }
}

impl TableEntry {
    /// Writes `name` (1..=255 bytes) and the entry.
    pub fn write<W: ByteWrite>(&self, name: &str, w: &mut W) -> Result<(), W::Error> {
        w.write_all(&[name.len() as u8])?;
        w.write_all(name.as_bytes())?;
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&self.used_length.to_le_bytes());
        b[8..16].copy_from_slice(&self.page_size.to_le_bytes());
        b[16..20].copy_from_slice(&self.flags.to_le_bytes());
        w.write_all(&b)
    }

    /// Reads the name into `name` (returning its length) and the entry.
    pub fn read<R: ByteRead>(
        r: &mut R,
        name: &mut [u8; 255],
    ) -> Result<(usize, TableEntry), ReadError<R::Error>> {
        let [len] = read_array(r)?;
        let len = usize::from(len);
        r.read_exact(&mut name[..len])?;
        let used_length = read_u64(r)?;
        let page_size = read_u64(r)?;
        let flags = read_u32(r)?;
        Ok((
            len,
            TableEntry {
                used_length,
                page_size,
                flags,
            },
        ))
    }
}

impl Record {
    /// Writes the record header.
    pub fn write<W: ByteWrite>(&self, w: &mut W) -> Result<(), W::Error> {
        let mut b = [0u8; 17];
        let n = match *self {
            Record::Pages {
                block,
                first,
                count,
            }
            | Record::Zero {
                block,
                first,
                count,
            } => {
                b[0] = if matches!(self, Record::Pages { .. }) {
                    tag::PAGES
                } else {
                    tag::ZERO
                };
                b[1..5].copy_from_slice(&block.to_le_bytes());
                b[5..13].copy_from_slice(&first.to_le_bytes());
                b[13..17].copy_from_slice(&count.to_le_bytes());
                17
            }
            Record::Sync { pass, remaining } => {
                b[0] = tag::SYNC;
                b[1..5].copy_from_slice(&pass.to_le_bytes());
                b[5..13].copy_from_slice(&remaining.to_le_bytes());
                13
            }
            Record::Resize { block, used_length } => {
                b[0] = tag::RESIZE;
                b[1..5].copy_from_slice(&block.to_le_bytes());
                b[5..13].copy_from_slice(&used_length.to_le_bytes());
                13
            }
            Record::End { count } => {
                b[0] = tag::END;
                b[1..5].copy_from_slice(&count.to_le_bytes());
                5
            }
        };
        w.write_all(&b[..n])
    }

    /// Reads a record header; `Ok(Err(tag))` for an unknown tag.
    pub fn read<R: ByteRead>(r: &mut R) -> Result<Result<Record, u8>, ReadError<R::Error>> {
        let [t] = read_array(r)?;
        Ok(Ok(match t {
            tag::PAGES | tag::ZERO => {
                let (block, first, count) = (read_u32(r)?, read_u64(r)?, read_u32(r)?);
                if t == tag::PAGES {
                    Record::Pages {
                        block,
                        first,
                        count,
                    }
                } else {
                    Record::Zero {
                        block,
                        first,
                        count,
                    }
                }
            }
            tag::SYNC => Record::Sync {
                pass: read_u32(r)?,
                remaining: read_u64(r)?,
            },
            tag::RESIZE => Record::Resize {
                block: read_u32(r)?,
                used_length: read_u64(r)?,
            },
            tag::END => Record::End {
                count: read_u32(r)?,
            },
            other => return Ok(Err(other)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::io::SliceReader;
    use super::*;
    extern crate std;
    use std::vec::Vec;

    #[test]
    fn records_round_trip() {
        let records = [
            Record::Pages {
                block: 1,
                first: u64::MAX,
                count: 64,
            },
            Record::Zero {
                block: 0,
                first: 5,
                count: 1,
            },
            Record::Sync {
                pass: 7,
                remaining: 99,
            },
            Record::Resize {
                block: 3,
                used_length: 1 << 30,
            },
            Record::End { count: 2 },
        ];
        let mut out = Vec::new();
        Header::new(3).write(&mut out).unwrap();
        TableEntry {
            used_length: 4096,
            page_size: 4096,
            flags: 5,
        }
        .write("pc.ram", &mut out)
        .unwrap();
        for r in &records {
            r.write(&mut out).unwrap();
        }
        let mut r = SliceReader::new(&out);
        assert_eq!(Header::read(&mut r).unwrap(), Some(Header::new(3)));
        let mut name = [0u8; 255];
        let (len, e) = TableEntry::read(&mut r, &mut name).unwrap();
        assert_eq!(
            (&name[..len], e),
            (
                &b"pc.ram"[..],
                TableEntry {
                    used_length: 4096,
                    page_size: 4096,
                    flags: 5
                }
            )
        );
        for want in records {
            assert_eq!(Record::read(&mut r).unwrap(), Ok(want));
        }
        assert_eq!(Record::read(&mut SliceReader::new(&[9])).unwrap(), Err(9));
        assert_eq!(
            Record::read(&mut SliceReader::new(&[1, 0])),
            Err(ReadError::Eof)
        );
    }
}
