//! [`FormatError`]: every way a snapshot file's metadata can be wrong.

use super::{MAGIC, MAX_BLOCKS, MAX_BLOCK_LEN, MAX_META_LEN, MAX_SECTIONS, VERSION};
use crate::name::NameError;
use crate::section::SectionError;
use core::fmt;

/// Why bytes are not a snapshot's metadata. Each malformed case is its own
/// variant, so a caller (and a test) can tell exactly what was refused.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FormatError {
    /// Fewer bytes than the part being read.
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes there are.
        len: u64,
        /// Bytes it needs.
        need: u64,
    },
    /// The file does not start with [`MAGIC`].
    Magic {
        /// Its first eight bytes.
        found: [u8; 8],
    },
    /// A format version this build does not read.
    Version {
        /// The version in the file.
        found: u32,
    },
    /// The kind is neither full (0) nor diff (1).
    Kind {
        /// The kind in the file.
        found: u32,
    },
    /// A full snapshot names a parent.
    FullWithParent,
    /// A diff snapshot names no parent (its parent id is all zero).
    DiffWithoutParent,
    /// More blocks than [`MAX_BLOCKS`].
    TooManyBlocks {
        /// Blocks claimed.
        count: u32,
    },
    /// More sections than [`MAX_SECTIONS`].
    TooManySections {
        /// Sections claimed.
        count: u32,
    },
    /// The metadata length is not a multiple of 4 KiB, larger than
    /// [`MAX_META_LEN`], or not the length its contents need.
    MetaLen {
        /// The length in the header.
        found: u64,
        /// The length the contents need (0 when the value is refused on its own).
        expected: u64,
    },
    /// The data's end in the header is not where the blocks' data ends.
    DataEnd {
        /// The end in the header.
        found: u64,
        /// Where the blocks' data ends.
        expected: u64,
    },
    /// The file is shorter than its header says.
    FileTooShort {
        /// The file's length.
        len: u64,
        /// The length the header needs.
        need: u64,
    },
    /// A reserved byte is not zero.
    Reserved {
        /// Its offset in the file.
        offset: u64,
    },
    /// The metadata's checksum does not match its bytes.
    MetaChecksum {
        /// The checksum in the header.
        found: u64,
        /// The checksum of the bytes.
        computed: u64,
    },
    /// A block's name field is invalid.
    BlockName {
        /// The block's index in the table.
        index: u32,
        /// What is wrong with it.
        error: NameError,
    },
    /// A block's name is not UTF-8.
    BlockNameUtf8 {
        /// The block's index.
        index: u32,
    },
    /// A non-zero byte after a block's name in its fixed-size field.
    BlockNamePadding {
        /// The block's index.
        index: u32,
    },
    /// Two blocks with one name.
    DuplicateBlock {
        /// The second block's index.
        index: u32,
    },
    /// A block's page size is not a power of two from 4 KiB to 1 GiB.
    PageSize {
        /// The block's index.
        index: u32,
        /// The page size in the file.
        found: u64,
    },
    /// A block's used length is zero, not a multiple of its page size, or
    /// larger than [`MAX_BLOCK_LEN`].
    UsedLength {
        /// The block's index.
        index: u32,
        /// The length in the file.
        found: u64,
    },
    /// A block's bitmap is not where the layout puts it.
    BitmapOffset {
        /// The block's index.
        index: u32,
        /// The offset in the file.
        found: u64,
        /// The layout's offset.
        expected: u64,
    },
    /// A block's data is not where the layout puts it.
    DataOffset {
        /// The block's index.
        index: u32,
        /// The offset in the file.
        found: u64,
        /// The layout's offset.
        expected: u64,
    },
    /// A bit past a block's last page is set in its bitmap.
    BitmapTail {
        /// The block's index.
        index: u32,
    },
    /// A block's count of held pages does not match its bitmap.
    HeldPages {
        /// The block's index.
        index: u32,
        /// The count in the file.
        found: u64,
        /// The bits set in the bitmap.
        counted: u64,
    },
    /// A full snapshot lacks a page (every page of a full snapshot is held).
    FullMissingPage {
        /// The block's index.
        index: u32,
        /// The first page missing.
        page: u64,
    },
    /// A section's header is invalid.
    Section {
        /// The section's index.
        index: u32,
        /// What is wrong with it.
        error: SectionError,
    },
    /// Two sections with one name and instance id.
    DuplicateSection {
        /// The second section's index.
        index: u32,
    },
    /// A section's bytes are not where the layout puts them.
    SectionOffset {
        /// The section's index.
        index: u32,
        /// The offset in the file.
        found: u64,
        /// The layout's offset.
        expected: u64,
    },
    /// A section's checksum does not match its bytes.
    SectionChecksum {
        /// The section's index.
        index: u32,
    },
    /// An offset or length overflows 64 bits.
    Overflow,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use FormatError::*;
        match *self {
            Truncated { what, len, need } => write!(f, "snapshot {what} is {len} bytes, needs {need}; the file was cut short"),
            Magic { found } => write!(f, "file starts with {found:02x?}, not the snapshot magic {MAGIC:02x?}; it is not a ramblock snapshot"),
            Version { found } => write!(f, "snapshot format version {found}; this build reads version {VERSION}"),
            Kind { found } => write!(f, "snapshot kind {found} is neither full (0) nor diff (1)"),
            FullWithParent => f.write_str("a full snapshot names a parent"),
            DiffWithoutParent => f.write_str("a diff snapshot names no parent"),
            TooManyBlocks { count } => write!(f, "snapshot claims {count} blocks; at most {MAX_BLOCKS} are allowed"),
            TooManySections { count } => write!(f, "snapshot claims {count} sections; at most {MAX_SECTIONS} are allowed"),
            MetaLen { found, expected } => write!(f, "snapshot metadata length {found:#x} is wrong (expected {expected:#x}, a multiple of 4 KiB up to {MAX_META_LEN:#x})"),
            DataEnd { found, expected } => write!(f, "snapshot data end {found:#x} is not where the blocks' data ends ({expected:#x})"),
            FileTooShort { len, need } => write!(f, "snapshot file is {len} bytes, its header needs {need}; the file was cut short"),
            Reserved { offset } => write!(f, "reserved byte at offset {offset:#x} is not zero"),
            MetaChecksum { found, computed } => write!(f, "snapshot metadata checksum {found:#018x} does not match its bytes ({computed:#018x}); the file is corrupt"),
            BlockName { index, error } => write!(f, "block {index}: {error}"),
            BlockNameUtf8 { index } => write!(f, "block {index}: name is not UTF-8"),
            BlockNamePadding { index } => write!(f, "block {index}: non-zero byte after the name"),
            DuplicateBlock { index } => write!(f, "block {index} repeats an earlier block's name"),
            PageSize { index, found } => write!(f, "block {index}: page size {found:#x} is not a power of two from 4 KiB to 1 GiB"),
            UsedLength { index, found } => write!(f, "block {index}: used length {found:#x} is zero, not a multiple of its page size, or above {MAX_BLOCK_LEN:#x}"),
            BitmapOffset { index, found, expected } => write!(f, "block {index}: bitmap at {found:#x}, the layout puts it at {expected:#x}"),
            DataOffset { index, found, expected } => write!(f, "block {index}: data at {found:#x}, the layout puts it at {expected:#x}"),
            BitmapTail { index } => write!(f, "block {index}: bitmap has bits set past the block's last page"),
            HeldPages { index, found, counted } => write!(f, "block {index}: claims {found} pages held, its bitmap holds {counted}"),
            FullMissingPage { index, page } => write!(f, "block {index}: full snapshot lacks page {page}"),
            Section { index, error } => write!(f, "section {index}: {error}"),
            DuplicateSection { index } => write!(f, "section {index} repeats an earlier section's name and instance"),
            SectionOffset { index, found, expected } => write!(f, "section {index}: bytes at {found:#x}, the layout puts them at {expected:#x}"),
            SectionChecksum { index } => write!(f, "section {index}: checksum does not match its bytes; the file is corrupt"),
            Overflow => f.write_str("snapshot offsets overflow 64 bits"),
        }
    }
}

impl core::error::Error for FormatError {}
