//! The received map on the wire, for post-copy recovery.
//!
//! When a post-copy connection breaks, the destination sends back which
//! pages it has received, and the source treats every page not received as
//! dirty (it must send it again). The format is documented in
//! `docs/stream-format.md`, section "Received map (post-copy recovery)".
//!
//! The map covers the migratable blocks ([`BlockFlags::MIGRATABLE`]), each by
//! name, with its post-copy length in pages and one bit per page.
//!
//! # A malformed map has no effect
//! [`read_received_map`] calls `on_missing` only once the whole map (up to
//! and including the end marker and its received-page count) has been read
//! and checked. A stream cannot be read twice, so the bits are kept in
//! between, in words the caller supplies: [`scratch_words`] of them, one
//! slot per migratable block. This needs no allocator and bounds the memory
//! up front (one bit per page, 32 KiB per GiB of RAM); a scratch that is too
//! small is refused before a byte is read.

use super::format::{read_array, read_u32, read_u64};
use super::io::{ByteRead, ByteWrite, ReadError};
use crate::bitmap::{words_for, Storage, WORD_BITS};
use crate::block::RamBlock;
use crate::flags::BlockFlags;
use crate::host::HostMemory;
use crate::list::RamListView;
use core::fmt;
use core::ops::Range;
use core::sync::atomic::Ordering::Acquire;

/// First bytes of a received map.
pub const MAGIC: [u8; 4] = *b"RBRM";
/// The version this code writes and reads.
pub const VERSION: u32 = 1;
/// The end marker, followed by the total count of received pages.
pub const END_MARKER: [u8; 4] = *b"RBRE";

/// Words moved per read or write call.
const CHUNK_WORDS: usize = 64;

/// Why a received map was refused. `entry` is a block's position in the map
/// (from 0). Nothing was reported to `on_missing`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ReceivedMapError<E> {
    /// The input ended early (`ReadError::Eof`: a truncated map) or the
    /// transport failed.
    Read(ReadError<E>),
    /// The map does not start with [`MAGIC`].
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A version this code does not read.
    UnsupportedVersion {
        /// The map's version.
        found: u32,
    },
    /// The map covers another number of blocks than the list's migratable
    /// blocks.
    BlockCountMismatch {
        /// Blocks in the map.
        map: u32,
        /// Migratable blocks in the list.
        list: u32,
    },
    /// No migratable block of the list has the entry's name.
    UnknownBlock {
        /// The entry.
        entry: u32,
    },
    /// The entry names a block an earlier entry named.
    DuplicateBlock {
        /// The entry.
        entry: u32,
    },
    /// The entry's page count differs from the block's post-copy length.
    PageCountMismatch {
        /// The entry.
        entry: u32,
        /// Pages in the map.
        map: u64,
        /// The block's post-copy length in pages.
        block: u64,
    },
    /// A bit is set at or past the entry's page count.
    BitPastEnd {
        /// The entry.
        entry: u32,
        /// The first such bit.
        page: u64,
    },
    /// The map does not end with [`END_MARKER`].
    BadEndMarker {
        /// The four bytes where the marker belongs.
        found: [u8; 4],
    },
    /// The end marker's count differs from the bits in the map.
    ReceivedCountMismatch {
        /// The count after the end marker.
        declared: u64,
        /// Bits set in the map.
        counted: u64,
    },
    /// The caller's scratch holds fewer words than [`scratch_words`].
    ScratchTooSmall {
        /// Words needed.
        needed: usize,
        /// Words given.
        given: usize,
    },
}

impl<E> From<ReadError<E>> for ReceivedMapError<E> {
    fn from(e: ReadError<E>) -> Self {
        ReceivedMapError::Read(e)
    }
}

impl<E: fmt::Display> fmt::Display for ReceivedMapError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReceivedMapError::Read(ReadError::Eof) => {
                f.write_str("the received map ended early (truncated); ask for it again")
            }
            ReceivedMapError::Read(ReadError::Io(e)) => {
                write!(f, "reading the received map failed: {e}")
            }
            ReceivedMapError::BadMagic { found } => write!(
                f,
                "a received map starts with \"RBRM\", found {found:02x?}: the peer sent something else"
            ),
            ReceivedMapError::UnsupportedVersion { found } => write!(
                f,
                "received map version {found} is not supported (this side reads {VERSION})"
            ),
            ReceivedMapError::BlockCountMismatch { map, list } => write!(
                f,
                "the received map covers {map} blocks, this side has {list} migratable blocks"
            ),
            ReceivedMapError::UnknownBlock { entry } => write!(
                f,
                "received map entry {entry} names no migratable block on this side"
            ),
            ReceivedMapError::DuplicateBlock { entry } => write!(
                f,
                "received map entry {entry} names a block an earlier entry named"
            ),
            ReceivedMapError::PageCountMismatch { entry, map, block } => write!(
                f,
                "received map entry {entry} has {map} pages, the block's post-copy length is {block} pages"
            ),
            ReceivedMapError::BitPastEnd { entry, page } => write!(
                f,
                "received map entry {entry} marks page {page}, at or past its page count"
            ),
            ReceivedMapError::BadEndMarker { found } => write!(
                f,
                "the received map should end with \"RBRE\", found {found:02x?}: it is corrupt"
            ),
            ReceivedMapError::ReceivedCountMismatch { declared, counted } => write!(
                f,
                "the received map declares {declared} received pages but its bits count {counted}: it is corrupt"
            ),
            ReceivedMapError::ScratchTooSmall { needed, given } => write!(
                f,
                "reading the received map needs {needed} scratch words, {given} were given; \
                 size the scratch with scratch_words"
            ),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for ReceivedMapError<E> {}

/// What a good received map said.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceivedMapSummary {
    /// Blocks in the map.
    pub blocks: u32,
    /// Pages the destination has received.
    pub received: u64,
    /// Pages it has not (reported to `on_missing`).
    pub missing: u64,
    /// Runs of missing pages (calls to `on_missing`).
    pub missing_runs: u64,
}

fn is_migratable<M: HostMemory, S: Storage>(block: &RamBlock<M, S>) -> bool {
    block.flags().contains(BlockFlags::MIGRATABLE)
}

fn block_words<M: HostMemory, S: Storage>(block: &RamBlock<M, S>) -> usize {
    words_for(block.received().postcopy_pages())
}

/// Scratch words [`read_received_map`] needs for `list`: one bit per page of
/// every migratable block's post-copy length, each block word-aligned.
pub fn scratch_words<M: HostMemory, S: Storage, const N: usize>(
    list: &RamListView<'_, '_, M, S, N>,
) -> usize {
    list.iter()
        .filter(|b| is_migratable(b))
        .map(block_words)
        .sum()
}

/// Writes the received maps of `list`'s migratable blocks, in list order,
/// and flushes. Each word is read once, and the end count is the count of
/// the bits written, so pages marked meanwhile cannot make the map
/// inconsistent.
pub fn write_received_map<W: ByteWrite, M: HostMemory, S: Storage, const N: usize>(
    out: &mut W,
    list: &RamListView<'_, '_, M, S, N>,
) -> Result<(), W::Error> {
    let count = list.iter().filter(|b| is_migratable(b)).count();
    let mut header = [0u8; 12];
    header[..4].copy_from_slice(&MAGIC);
    header[4..8].copy_from_slice(&VERSION.to_le_bytes());
    // A list holds far fewer than 2^32 blocks.
    header[8..].copy_from_slice(&(count as u32).to_le_bytes());
    out.write_all(&header)?;
    let mut total = 0u64;
    for block in list.iter().filter(|b| is_migratable(b)) {
        let name = block.name().as_bytes();
        // Block names are at most 255 bytes.
        out.write_all(&[name.len() as u8])?;
        out.write_all(name)?;
        let map = block.received();
        let pages = map.postcopy_pages();
        out.write_all(&(pages as u64).to_le_bytes())?;
        let words = map.bitmap().words();
        let mut buf = [0u8; CHUNK_WORDS * 8];
        for (c, chunk) in words.chunks(CHUNK_WORDS).enumerate() {
            for (k, word) in chunk.iter().enumerate() {
                let index = c * CHUNK_WORDS + k;
                // The map keeps bits past its length clear; mask anyway, so
                // the format's rule holds whatever the storage holds.
                let bits = word.load(Acquire) & valid_mask(pages, index);
                total += u64::from(bits.count_ones());
                buf[k * 8..k * 8 + 8].copy_from_slice(&bits.to_le_bytes());
            }
            out.write_all(&buf[..chunk.len() * 8])?;
        }
    }
    let mut end = [0u8; 12];
    end[..4].copy_from_slice(&END_MARKER);
    end[4..].copy_from_slice(&total.to_le_bytes());
    out.write_all(&end)?;
    out.flush()
}

/// The bits of word `index` that lie below `pages`.
fn valid_mask(pages: usize, index: usize) -> u64 {
    let first = index * WORD_BITS;
    match pages.saturating_sub(first) {
        0 => 0,
        n if n >= WORD_BITS => !0,
        n => !0u64 >> (WORD_BITS - n),
    }
}

/// Reads a received map sent by the destination and, once all of it has
/// been checked, calls `on_missing(block, pages)` for every run of pages of
/// every migratable block that the destination has not received, in list
/// order (the source marks them dirty). `scratch` holds the bits in between
/// and needs [`scratch_words`] words; see the module docs.
///
/// On an error `on_missing` has been called for nothing, and the input is
/// left part way through the map: drop the connection.
pub fn read_received_map<R: ByteRead, M: HostMemory, S: Storage, const N: usize>(
    input: &mut R,
    list: &RamListView<'_, '_, M, S, N>,
    scratch: &mut [u64],
    mut on_missing: impl FnMut(&RamBlock<M, S>, Range<u64>),
) -> Result<ReceivedMapSummary, ReceivedMapError<R::Error>> {
    let needed = scratch_words(list);
    if scratch.len() < needed {
        return Err(ReceivedMapError::ScratchTooSmall {
            needed,
            given: scratch.len(),
        });
    }
    let found: [u8; 4] = read_array(input)?;
    if found != MAGIC {
        return Err(ReceivedMapError::BadMagic { found });
    }
    let version = read_u32(input)?;
    if version != VERSION {
        return Err(ReceivedMapError::UnsupportedVersion { found: version });
    }
    let count = read_u32(input)?;
    let migratable = list.iter().filter(|b| is_migratable(b)).count() as u32;
    if count != migratable {
        return Err(ReceivedMapError::BlockCountMismatch {
            map: count,
            list: migratable,
        });
    }
    // Indexed by position in the list; every migratable block is named once
    // (the counts match and no entry repeats), so every slot gets filled.
    let mut seen = [false; N];
    let mut counted = 0u64;
    for entry in 0..count {
        let [len] = read_array(input)?;
        let mut name = [0u8; 255];
        let name = &mut name[..usize::from(len)];
        input.read_exact(name)?;
        // Scratch slots follow the list's order of migratable blocks.
        let mut slot = 0;
        let mut hit = None;
        for (i, block) in list.iter().enumerate().filter(|(_, b)| is_migratable(b)) {
            if block.name().as_bytes() == name {
                hit = Some((i, block));
                break;
            }
            slot += block_words(block);
        }
        let Some((index, block)) = hit else {
            return Err(ReceivedMapError::UnknownBlock { entry });
        };
        if core::mem::replace(&mut seen[index], true) {
            return Err(ReceivedMapError::DuplicateBlock { entry });
        }
        let pages = read_u64(input)?;
        let block_pages = block.received().postcopy_pages();
        if pages != block_pages as u64 {
            return Err(ReceivedMapError::PageCountMismatch {
                entry,
                map: pages,
                block: block_pages as u64,
            });
        }
        let words = &mut scratch[slot..slot + block_words(block)];
        let mut buf = [0u8; CHUNK_WORDS * 8];
        let mut at = 0;
        for chunk in words.chunks_mut(CHUNK_WORDS) {
            let bytes = &mut buf[..chunk.len() * 8];
            input.read_exact(bytes)?;
            for (k, (word, b)) in chunk.iter_mut().zip(bytes.chunks_exact(8)).enumerate() {
                let mut le = [0u8; 8];
                le.copy_from_slice(b);
                *word = u64::from_le_bytes(le);
                let stray = *word & !valid_mask(block_pages, at + k);
                if stray != 0 {
                    let page = ((at + k) * WORD_BITS) as u64 + u64::from(stray.trailing_zeros());
                    return Err(ReceivedMapError::BitPastEnd { entry, page });
                }
                counted += u64::from(word.count_ones());
            }
            at += chunk.len();
        }
    }
    let found: [u8; 4] = read_array(input)?;
    if found != END_MARKER {
        return Err(ReceivedMapError::BadEndMarker { found });
    }
    let declared = read_u64(input)?;
    if declared != counted {
        return Err(ReceivedMapError::ReceivedCountMismatch { declared, counted });
    }
    // All checked: report.
    let mut summary = ReceivedMapSummary {
        blocks: count,
        received: counted,
        ..ReceivedMapSummary::default()
    };
    let mut slot = 0;
    for block in list.iter().filter(|b| is_migratable(b)) {
        let n = block_words(block);
        let pages = block.received().postcopy_pages();
        let words = &scratch[slot..slot + n];
        slot += n;
        let mut from = 0;
        while let Some(start) = next_bit(words, pages, from, false) {
            let end = next_bit(words, pages, start, true).unwrap_or(pages);
            on_missing(block, start as u64..end as u64);
            summary.missing += (end - start) as u64;
            summary.missing_runs += 1;
            from = end;
        }
    }
    Ok(summary)
}

/// The first bit at or after `from` and below `len` that is set (`set`) or
/// clear (`!set`) in `words`.
fn next_bit(words: &[u64], len: usize, from: usize, set: bool) -> Option<usize> {
    let flip = if set { 0 } else { !0 };
    let mut index = from / WORD_BITS;
    let mut bits = (*words.get(index)? ^ flip) & (!0u64 << (from % WORD_BITS));
    loop {
        if bits != 0 {
            let found = index * WORD_BITS + bits.trailing_zeros() as usize;
            return (found < len).then_some(found);
        }
        index += 1;
        bits = *words.get(index)? ^ flip;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_bit_finds_set_and_clear_bits_below_len() {
        let words = [0b1011u64 << 62, 0b1];
        assert_eq!(next_bit(&words, 70, 0, true), Some(62));
        assert_eq!(next_bit(&words, 70, 0, false), Some(0));
        assert_eq!(next_bit(&words, 70, 62, false), Some(64 + 1));
        assert_eq!(next_bit(&words, 65, 62, false), None);
        assert_eq!(next_bit(&words, 70, 65, true), None);
        assert_eq!(next_bit(&words, 70, 70, false), None);
        assert_eq!(next_bit(&[], 0, 0, false), None);
    }

    #[test]
    fn valid_masks_stop_at_the_page_count() {
        assert_eq!(valid_mask(64, 0), !0);
        assert_eq!(valid_mask(65, 1), 1);
        assert_eq!(valid_mask(3, 0), 0b111);
        assert_eq!(valid_mask(64, 1), 0);
    }
}
