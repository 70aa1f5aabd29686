//! The snapshot file format: a guest's RAM blocks laid out for random
//! access, with the named state sections migration carries.
//!
//! The whole format is described in `docs/snapshot-format.md`; in short,
//! all little-endian:
//!
//! - a [`Header`] ([`HEADER_LEN`] bytes): [`MAGIC`], [`VERSION`], the kind
//!   (full or diff), a random file id, for a diff the parent's id and
//!   metadata checksum, the block and section counts, the metadata's length,
//!   the data's end and the metadata's checksum;
//! - the block table ([`BlockEntry`], [`BLOCK_ENTRY_LEN`] bytes each) and
//!   the section table ([`SectionEntry`], [`SECTION_ENTRY_LEN`] bytes each);
//! - each block's page bitmap, each section's bytes, padding to 4 KiB;
//! - each block's data, one 4 KiB slot per page at a place [computed](layout)
//!   from the block's index, so a reader never searches; pages the file does
//!   not hold, and zero pages, are holes of a sparse file.
//!
//! [`Meta::parse`] checks every field of the metadata without allocating
//! and refuses anything off with its own [`FormatError`]; the writer
//! builds the same bytes with [`Header::encode`], [`BlockEntry::encode`],
//! [`SectionEntry::encode`], the [`layout`] cursors and [`seal`].

mod error;
pub mod layout;
mod meta;

pub use error::FormatError;
pub use meta::Meta;

use crate::addr::{ByteLen, PageSize, TARGET_PAGE_SIZE};
use crate::checksum::Checksum;
use crate::name::{BlockName, MAX_NAME_LEN};
use crate::section::SectionHeader;

/// The first eight bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"RBLKSNAP";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes of the header.
pub const HEADER_LEN: usize = 96;
/// Bytes of one block table entry.
pub const BLOCK_ENTRY_LEN: usize = 1 + MAX_NAME_LEN + 7 * 8;
/// Bytes of one section table entry.
pub const SECTION_ENTRY_LEN: usize = SectionHeader::ENCODED_LEN + 2 * 8;
/// The most blocks a file may hold (QEMU guests have a few dozen).
pub const MAX_BLOCKS: u32 = 256;
/// The most sections a file may hold.
pub const MAX_SECTIONS: u32 = 1024;
/// The largest block a file may hold: 1 TiB, whose bitmap is 32 MiB.
pub const MAX_BLOCK_LEN: u64 = 1 << 40;
/// The most metadata a reader loads (tables, bitmaps, sections).
pub const MAX_META_LEN: u64 = 256 << 20;

/// Offset of the metadata checksum in the header.
const CHECKSUM_AT: usize = 80;

/// Whether a file holds every page or only those dirtied since its parent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Every page of every block.
    Full,
    /// Only pages written since the parent; the rest are the parent's.
    Diff(Parent),
}

/// What a diff snapshot names as its parent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    /// The parent's file id.
    pub id: [u8; 16],
    /// The parent's metadata checksum (which covers its blocks' checksums).
    pub checksum: u64,
}

/// A snapshot file's header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Full or diff (with its parent).
    pub kind: Kind,
    /// A random id naming this file.
    pub file_id: [u8; 16],
    /// Blocks in the table.
    pub block_count: u32,
    /// Sections in the table.
    pub section_count: u32,
    /// Bytes of header, tables, bitmaps and sections, a multiple of 4 KiB.
    pub meta_len: u64,
    /// Where the last block's data ends: the file's length.
    pub data_end: u64,
    /// [`meta_checksum`] of the metadata.
    pub meta_checksum: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

impl Header {
    /// Encodes the header.
    pub fn encode(&self, out: &mut [u8; HEADER_LEN]) {
        out.fill(0);
        out[..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let (kind, parent) = match self.kind {
            Kind::Full => (0u32, None),
            Kind::Diff(p) => (1, Some(p)),
        };
        out[12..16].copy_from_slice(&kind.to_le_bytes());
        out[16..32].copy_from_slice(&self.file_id);
        if let Some(p) = parent {
            out[32..48].copy_from_slice(&p.id);
            put_u64(out, 48, p.checksum);
        }
        out[56..60].copy_from_slice(&self.block_count.to_le_bytes());
        out[60..64].copy_from_slice(&self.section_count.to_le_bytes());
        put_u64(out, 64, self.meta_len);
        put_u64(out, 72, self.data_end);
        put_u64(out, CHECKSUM_AT, self.meta_checksum);
    }

    /// Decodes and checks the header at the start of `bytes`: everything
    /// that can be checked without the rest of the metadata.
    pub fn decode(bytes: &[u8]) -> Result<Header, FormatError> {
        let Some(b) = bytes.get(..HEADER_LEN) else {
            return Err(FormatError::Truncated {
                what: "header",
                len: bytes.len() as u64,
                need: HEADER_LEN as u64,
            });
        };
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[..8]);
        if magic != MAGIC {
            return Err(FormatError::Magic { found: magic });
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(FormatError::Version { found: version });
        }
        let mut file_id = [0u8; 16];
        file_id.copy_from_slice(&b[16..32]);
        let mut parent_id = [0u8; 16];
        parent_id.copy_from_slice(&b[32..48]);
        let parent_checksum = u64_at(b, 48);
        let kind = match u32_at(b, 12) {
            0 if parent_id == [0; 16] && parent_checksum == 0 => Kind::Full,
            0 => return Err(FormatError::FullWithParent),
            1 if parent_id == [0; 16] => return Err(FormatError::DiffWithoutParent),
            1 => Kind::Diff(Parent {
                id: parent_id,
                checksum: parent_checksum,
            }),
            found => return Err(FormatError::Kind { found }),
        };
        let block_count = u32_at(b, 56);
        if block_count > MAX_BLOCKS {
            return Err(FormatError::TooManyBlocks { count: block_count });
        }
        let section_count = u32_at(b, 60);
        if section_count > MAX_SECTIONS {
            return Err(FormatError::TooManySections {
                count: section_count,
            });
        }
        let meta_len = u64_at(b, 64);
        if meta_len % TARGET_PAGE_SIZE != 0 || meta_len == 0 || meta_len > MAX_META_LEN {
            return Err(FormatError::MetaLen {
                found: meta_len,
                expected: 0,
            });
        }
        let data_end = u64_at(b, 72);
        if let Some(at) = b[88..].iter().position(|&x| x != 0) {
            return Err(FormatError::Reserved {
                offset: (88 + at) as u64,
            });
        }
        Ok(Header {
            kind,
            file_id,
            block_count,
            section_count,
            meta_len,
            data_end,
            meta_checksum: u64_at(b, CHECKSUM_AT),
        })
    }
}

/// One block in the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockEntry {
    /// The block's name.
    pub name: BlockName,
    /// The block's used length when saved, a multiple of its page size.
    pub used_length: ByteLen,
    /// The block's host page size.
    pub page_size: PageSize,
    /// Where its page bitmap is.
    pub bitmap_offset: u64,
    /// Where its data is: page `i` at `data_offset + i * 4096`.
    pub data_offset: u64,
    /// Pages the file holds (bits set in the bitmap).
    pub held_pages: u64,
    /// The checksum ([`crate::checksum`], page by page) of the whole block
    /// as it was when saved: what a restore from this file and its parents
    /// must produce.
    pub content_checksum: u64,
    /// The checksum of the pages this file holds: the wrapping sum of their
    /// [page digests](crate::checksum::page_digest), finished with
    /// [`crate::checksum::finish_sum`] over `held_pages * 4096` bytes.
    pub data_checksum: u64,
}

impl BlockEntry {
    /// Encodes the entry.
    pub fn encode(&self, out: &mut [u8; BLOCK_ENTRY_LEN]) {
        out.fill(0);
        let name = self.name.as_str().as_bytes();
        // At most 255 bytes (BlockName's invariant).
        out[0] = name.len() as u8;
        out[1..1 + name.len()].copy_from_slice(name);
        let at = 1 + MAX_NAME_LEN;
        for (i, v) in [
            self.used_length.0,
            self.page_size.bytes(),
            self.bitmap_offset,
            self.data_offset,
            self.held_pages,
            self.content_checksum,
            self.data_checksum,
        ]
        .into_iter()
        .enumerate()
        {
            put_u64(out, at + 8 * i, v);
        }
    }

    /// Decodes entry `index` from its bytes, checking the name, the page
    /// size and the used length (the layout is checked by [`Meta::parse`]).
    pub fn decode(index: u32, b: &[u8]) -> Result<BlockEntry, FormatError> {
        let Some(b) = b.get(..BLOCK_ENTRY_LEN) else {
            return Err(FormatError::Truncated {
                what: "block entry",
                len: b.len() as u64,
                need: BLOCK_ENTRY_LEN as u64,
            });
        };
        let len = usize::from(b[0]);
        if b[1 + len..1 + MAX_NAME_LEN].iter().any(|&x| x != 0) {
            return Err(FormatError::BlockNamePadding { index });
        }
        let name = core::str::from_utf8(&b[1..1 + len])
            .map_err(|_| FormatError::BlockNameUtf8 { index })?;
        let name = BlockName::new(name).map_err(|error| FormatError::BlockName { index, error })?;
        let at = 1 + MAX_NAME_LEN;
        let field = |i: usize| u64_at(b, at + 8 * i);
        let page_size = PageSize::new(field(1)).map_err(|_| FormatError::PageSize {
            index,
            found: field(1),
        })?;
        let used = field(0);
        if used == 0 || used % page_size.bytes() != 0 || used > MAX_BLOCK_LEN {
            return Err(FormatError::UsedLength { index, found: used });
        }
        Ok(BlockEntry {
            name,
            used_length: ByteLen(used),
            page_size,
            bitmap_offset: field(2),
            data_offset: field(3),
            held_pages: field(4),
            content_checksum: field(5),
            data_checksum: field(6),
        })
    }

    /// Target pages in the block.
    pub fn pages(&self) -> u64 {
        self.used_length.0 / TARGET_PAGE_SIZE
    }

    /// Where page `page` of the block lives in the file (whether or not the
    /// file holds it); `None` past the block's end.
    pub fn page_offset(&self, page: u64) -> Option<u64> {
        (page < self.pages()).then(|| self.data_offset + page * TARGET_PAGE_SIZE)
    }
}

/// One section in the table: its header, where its bytes are and their
/// checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionEntry {
    /// Name, instance, version and length.
    pub header: SectionHeader,
    /// Where the bytes are.
    pub offset: u64,
    /// [`Checksum`] of the bytes.
    pub checksum: u64,
}

impl SectionEntry {
    /// Encodes the entry.
    pub fn encode(&self, out: &mut [u8; SECTION_ENTRY_LEN]) {
        let mut h = [0u8; SectionHeader::ENCODED_LEN];
        self.header.encode(&mut h);
        out[..h.len()].copy_from_slice(&h);
        put_u64(out, h.len(), self.offset);
        put_u64(out, h.len() + 8, self.checksum);
    }

    /// Decodes entry `index` from its bytes.
    pub fn decode(index: u32, b: &[u8]) -> Result<SectionEntry, FormatError> {
        let Some(b) = b.get(..SECTION_ENTRY_LEN) else {
            return Err(FormatError::Truncated {
                what: "section entry",
                len: b.len() as u64,
                need: SECTION_ENTRY_LEN as u64,
            });
        };
        let header =
            SectionHeader::decode(b).map_err(|error| FormatError::Section { index, error })?;
        let at = SectionHeader::ENCODED_LEN;
        Ok(SectionEntry {
            header,
            offset: u64_at(b, at),
            checksum: u64_at(b, at + 8),
        })
    }
}

/// The checksum of a section's bytes.
pub fn section_checksum(bytes: &[u8]) -> u64 {
    let mut c = Checksum::new();
    c.update(bytes);
    c.finish()
}

/// The checksum of the metadata `meta` (at least a header long), with the
/// header's checksum field counted as zero.
pub fn meta_checksum(meta: &[u8]) -> u64 {
    let mut c = Checksum::new();
    c.update(&meta[..64]);
    let mut piece = [0u8; 32];
    piece.copy_from_slice(&meta[64..96]);
    piece[CHECKSUM_AT - 64..CHECKSUM_AT - 56].fill(0);
    c.update(&piece);
    c.update(&meta[96..]);
    c.finish()
}

/// Writes [`meta_checksum`] into the header at the start of `meta` and
/// returns it: the last step of building a file's metadata.
pub fn seal(meta: &mut [u8]) -> u64 {
    let sum = meta_checksum(meta);
    put_u64(meta, CHECKSUM_AT, sum);
    sum
}
