//! Why a receive failed: one error for the whole receiving side (the
//! record checks in [`super::Receiver`] and the hugepage assembly in
//! [`super::placement`]), each with a stable code for the refusal sent back.

use crate::addr::TARGET_PAGE_SHIFT;
use crate::name::BlockName;
use crate::section::{SectionError, SectionName};
use crate::stream::format::{MAX_RUN_PAGES, VERSION};
use crate::stream::io::ReadError;
use core::fmt;

/// Why a receive failed. Names are the block's name as the source sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReceiveError<E, H> {
    /// The stream does not start with the magic bytes.
    BadMagic,
    /// The stream's version is not one this code reads (a resume header
    /// must be version [`RESUME_VERSION`](crate::stream::format::RESUME_VERSION)).
    UnsupportedVersion(u16),
    /// The source's target page size differs (log2 given).
    TargetPageSizeMismatch(u8),
    /// The block table names more blocks than the destination list can hold.
    TooManyBlocks {
        /// Blocks in the table.
        count: u32,
    },
    /// A table entry's name is empty, not UTF-8, or contains NUL.
    BadBlockName,
    /// The table names a block the destination does not have.
    UnknownBlock(BlockName),
    /// The table names a block twice.
    DuplicateBlock(BlockName),
    /// A migratable destination block is missing from the table.
    MissingBlock(BlockName),
    /// The block's host page size differs between the two sides.
    PageSizeMismatch {
        /// The block.
        name: BlockName,
        /// Source page size.
        source: u64,
        /// Destination page size.
        destination: u64,
    },
    /// The block's used length cannot be matched on the destination.
    SizeMismatch {
        /// The block.
        name: BlockName,
        /// Source used length.
        source: u64,
        /// Destination used length (max length for resizable blocks).
        destination: u64,
    },
    /// The destination block is read-only and cannot be written.
    ReadOnlyBlock(BlockName),
    /// A record with an unknown tag.
    UnknownRecord(u8),
    /// A record names a table index past the table.
    BadBlockIndex(u32),
    /// A run of zero pages or more than the maximum.
    BadRunLength(u32),
    /// `first + count` overflows.
    LengthOverflow,
    /// A record runs past the block's used length.
    PastUsedLength {
        /// The block.
        name: BlockName,
        /// First page of the record.
        first: u64,
        /// Pages in the record.
        count: u32,
        /// The block's used length in pages.
        used_pages: u64,
    },
    /// The destination refused a resize the source sent.
    ResizeRefused {
        /// The block.
        name: BlockName,
        /// The length asked for.
        length: u64,
    },
    /// The end record's checksum count differs from the table's size.
    EndCountMismatch {
        /// Checksums announced.
        count: u32,
        /// Blocks in the table.
        blocks: u32,
    },
    /// A block's contents differ from the source's at switch-over.
    ChecksumMismatch {
        /// The block.
        name: BlockName,
        /// The source's checksum.
        expected: u64,
        /// The destination's.
        found: u64,
    },
    /// The stream ended in the middle of something.
    Truncated,
    /// The transport failed.
    Io(E),
    /// The destination's host memory (or, in post-copy, page placement)
    /// failed.
    Host(H),
    /// A record that cannot come at this point (say, a `Discard` after
    /// post-copy started, or a resume header with no post-copy to resume).
    OutOfPlace {
        /// The record.
        record: &'static str,
        /// Why it cannot come now.
        why: &'static str,
    },
    /// The source started post-copy, but this destination was not set up
    /// for it ([`Receiver::receive_postcopy`](super::Receiver::receive_postcopy)).
    PostcopyUnsupported,
    /// A post-copy record reaches past the block's post-copy length.
    PastPostcopyLength {
        /// The block.
        name: BlockName,
        /// First page of the record.
        first: u64,
        /// Pages in the record.
        count: u32,
        /// The block's post-copy length in pages.
        postcopy_pages: u64,
    },
    /// A discard, or a post-copy run of a hugepage block, that does not
    /// cover whole host pages.
    NotWholeHostPages {
        /// The block.
        name: BlockName,
        /// First page of the record.
        first: u64,
        /// The block's host page size.
        page_size: u64,
    },
    /// A hugepage block's page is larger than the assembly buffer
    /// ([`Receiver::with_hugepage_buffer`](super::Receiver::with_hugepage_buffer)).
    HugepageBufferTooSmall {
        /// The block.
        name: BlockName,
        /// Its host page size.
        page_size: u64,
        /// The buffer's size.
        buffer: u64,
    },
    /// The post-copy stream ended with pages never received: the guest
    /// would wait for them forever.
    MissingAtEnd {
        /// The block.
        name: BlockName,
        /// The first missing page.
        page: u64,
    },
    /// A resume header carries a token other than the one this
    /// destination issued when post-copy started: the peer is not the
    /// source this migration came from.
    BadResumeToken,
    /// A `Section` record's header is malformed (which field says the
    /// inner error).
    BadSection(SectionError),
    /// The `Section` records together (headers included) exceed the
    /// destination's device-state limit.
    DeviceStateOverLimit {
        /// Bytes the sections would reach with the one refused.
        total: u64,
        /// The limit.
        limit: u64,
    },
    /// The source sent device state, but this destination has nowhere to
    /// load it ([`Receiver::with_device_state`](super::Receiver::with_device_state)):
    /// the guest could not run here.
    SectionsUnsupported,
    /// The VMM refused a section (unknown device, bad version, bad bytes).
    SectionRefused {
        /// The section's position among the stream's sections, from 0
        /// (the source names the section by it).
        index: u32,
        /// The section.
        name: SectionName,
        /// Its instance id.
        instance_id: u32,
        /// The VMM's own error code.
        code: u32,
    },
    /// A resumed stream's block table differs from the one post-copy
    /// started with (blocks, order, used lengths, page sizes, flags).
    ResumeTableMismatch {
        /// The first entry that differs (the original's count when the
        /// counts differ).
        index: u32,
        /// What differs: "block count", "block", "used length", "page
        /// size" or "flags".
        what: &'static str,
    },
    /// After the switch, a record for a page already placed: memory keeps
    /// the first copy, so the second is refused rather than recorded.
    AlreadyPlaced {
        /// The block.
        name: BlockName,
        /// The first such page.
        page: u64,
    },
    /// A post-copy run started a new hugepage while another one was half
    /// assembled: the source must send each hugepage whole, in order.
    HugepageIncomplete {
        /// The block of the hugepage left half assembled.
        name: BlockName,
        /// Its first target page.
        first: u64,
        /// Target pages of it that had arrived.
        arrived: u64,
    },
    /// The stream's header announced, or a `Barrier` named, another number
    /// of page channels than this destination accepted (0: it was set up
    /// without any).
    ChannelCountMismatch {
        /// Channels the source sends on.
        source: u32,
        /// Channels this destination accepted.
        destination: u32,
    },
    /// A `Barrier` came out of order (generations count up from 0 on the
    /// main stream and on each channel).
    BarrierOutOfOrder {
        /// The barrier's generation.
        generation: u32,
        /// The one due.
        expected: u32,
    },
    /// Another page channel (or the main stream) failed or closed before
    /// a barrier everyone must reach.
    ChannelFailed,
}

impl<E: fmt::Display, H: fmt::Display> fmt::Display for ReceiveError<E, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ReceiveError::*;
        match self {
            BadMagic => f.write_str("not a ramblock migration stream (bad magic)"),
            UnsupportedVersion(v) => write!(f, "stream version {v} is not supported (this build reads {VERSION})"),
            TargetPageSizeMismatch(s) => write!(f, "source target page is 2^{s} bytes, destination uses 2^{TARGET_PAGE_SHIFT}"),
            TooManyBlocks { count } => write!(f, "the stream names {count} blocks, more than the destination can hold"),
            BadBlockName => f.write_str("a block name in the stream is empty, not UTF-8, or contains NUL"),
            UnknownBlock(n) => write!(f, "block {n:?} does not exist on the destination"),
            DuplicateBlock(n) => write!(f, "block {n:?} appears twice in the block table"),
            MissingBlock(n) => write!(f, "destination block {n:?} is not in the stream"),
            PageSizeMismatch { name, source, destination } => {
                write!(f, "block {name:?}: page size {source:#x} on the source, {destination:#x} here")
            }
            SizeMismatch { name, source, destination } => {
                write!(f, "block {name:?}: {source:#x} bytes on the source, the destination has {destination:#x}")
            }
            ReadOnlyBlock(n) => write!(f, "destination block {n:?} is read-only"),
            UnknownRecord(t) => write!(f, "unknown record tag {t}"),
            BadBlockIndex(i) => write!(f, "record names block index {i}, past the block table"),
            BadRunLength(c) => write!(f, "record of {c} pages (1..={MAX_RUN_PAGES} allowed)"),
            LengthOverflow => f.write_str("record's first page plus count overflows"),
            PastUsedLength { name, first, count, used_pages } => write!(
                f,
                "record for pages {first}..+{count} of block {name:?} runs past its {used_pages} used pages"
            ),
            ResizeRefused { name, length } => write!(f, "block {name:?} cannot be resized to {length:#x}"),
            EndCountMismatch { count, blocks } => write!(f, "end record has {count} checksums for {blocks} blocks"),
            ChecksumMismatch { name, expected, found } => {
                write!(f, "block {name:?} differs from the source (checksum {found:#x}, expected {expected:#x})")
            }
            Truncated => f.write_str("the stream ended in the middle of a record"),
            Io(e) => write!(f, "transport failed: {e}"),
            Host(e) => write!(f, "destination memory failed: {e}"),
            OutOfPlace { record, why } => write!(f, "unexpected {record} record: {why}"),
            PostcopyUnsupported => f.write_str("the source started post-copy, which this destination was not set up for"),
            PastPostcopyLength { name, first, count, postcopy_pages } => write!(
                f,
                "post-copy record for pages {first}..+{count} of block {name:?} reaches past its post-copy length of {postcopy_pages} pages"
            ),
            NotWholeHostPages { name, first, page_size } => write!(
                f,
                "record at page {first} of block {name:?} does not cover whole {page_size:#x}-byte host pages"
            ),
            HugepageBufferTooSmall { name, page_size, buffer } => write!(
                f,
                "block {name:?} has {page_size:#x}-byte pages; the post-copy assembly buffer holds {buffer:#x}"
            ),
            MissingAtEnd { name, page } => write!(f, "post-copy ended but page {page} of block {name:?} never arrived"),
            BadResumeToken => f.write_str("the resume header's token is not the one this destination issued: refused as another peer than the source"),
            BadSection(e) => write!(f, "malformed device-state section: {e}"),
            DeviceStateOverLimit { total, limit } => write!(f, "device-state sections reach {total} bytes, over this destination's limit of {limit}"),
            SectionsUnsupported => f.write_str("the source sent device state, but this destination cannot load any"),
            SectionRefused { index, name, instance_id, code } => write!(f, "the VMM refused device-state section {index} ({name:?} instance {instance_id}, its code {code})"),
            ResumeTableMismatch { index, what } => write!(
                f,
                "the resumed stream's block table differs from the original at entry {index} ({what}); a resumed stream must repeat it exactly"
            ),
            AlreadyPlaced { name, page } => write!(f, "post-copy record for page {page} of block {name:?}, which was placed already"),
            HugepageIncomplete { name, first, arrived } => write!(
                f,
                "a new hugepage started while the one at page {first} of block {name:?} had only {arrived} target pages"
            ),
            ChannelCountMismatch { source, destination } => write!(
                f,
                "the source sends on {source} page channels, this destination accepted {destination}"
            ),
            BarrierOutOfOrder { generation, expected } => write!(f, "barrier {generation} came where barrier {expected} was due"),
            ChannelFailed => f.write_str("another page channel or the main stream failed or closed before a barrier"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display, H: fmt::Debug + fmt::Display> core::error::Error
    for ReceiveError<E, H>
{
}

/// [`ReceiveError::PostcopyUnsupported`]'s code. A destination sends it
/// only when it has no post-copy target, so it never started the guest:
/// the source, though it switched, may resume its own.
pub const POSTCOPY_UNSUPPORTED_CODE: u32 = 24;

impl<E, H> ReceiveError<E, H> {
    /// A stable number for this error, sent back to the source in a refusal.
    pub fn code(&self) -> u32 {
        use ReceiveError::*;
        match self {
            BadMagic => 1,
            UnsupportedVersion(_) => 2,
            TargetPageSizeMismatch(_) => 3,
            TooManyBlocks { .. } => 4,
            BadBlockName => 5,
            UnknownBlock(_) => 6,
            DuplicateBlock(_) => 7,
            MissingBlock(_) => 8,
            PageSizeMismatch { .. } => 9,
            SizeMismatch { .. } => 10,
            ReadOnlyBlock(_) => 11,
            UnknownRecord(_) => 12,
            BadBlockIndex(_) => 13,
            BadRunLength(_) => 14,
            LengthOverflow => 15,
            PastUsedLength { .. } => 16,
            ResizeRefused { .. } => 17,
            EndCountMismatch { .. } => 18,
            ChecksumMismatch { .. } => 19,
            Truncated => 20,
            Io(_) => 21,
            Host(_) => 22,
            OutOfPlace { .. } => 23,
            PostcopyUnsupported => POSTCOPY_UNSUPPORTED_CODE,
            // 25 was a Postcopy record's opaque device state over its
            // bound: the record carries sections now (31-34), and the code
            // is not reused.
            PastPostcopyLength { .. } => 26,
            NotWholeHostPages { .. } => 27,
            HugepageBufferTooSmall { .. } => 28,
            MissingAtEnd { .. } => 29,
            BadResumeToken => 30,
            BadSection(_) => 31,
            DeviceStateOverLimit { .. } => 32,
            SectionsUnsupported => 33,
            SectionRefused { .. } => 34,
            ResumeTableMismatch { .. } => 35,
            AlreadyPlaced { .. } => 36,
            HugepageIncomplete { .. } => 37,
            ChannelCountMismatch { .. } => 38,
            BarrierOutOfOrder { .. } => 39,
            ChannelFailed => 40,
        }
    }
}

impl<E, H> From<ReadError<E>> for ReceiveError<E, H> {
    fn from(e: ReadError<E>) -> Self {
        match e {
            ReadError::Eof => ReceiveError::Truncated,
            ReadError::Io(e) => ReceiveError::Io(e),
        }
    }
}
