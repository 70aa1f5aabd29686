//! Dirty bitmaps across a local update, for a VMM that keeps logging.
//!
//! Guest RAM does not move in a local update, but what the old process
//! knew about which pages were written since its last look would be lost
//! with it: a migration, a display or a code cache that keeps running
//! across the update needs those bits in the new process. The paused
//! source harvests its dirty-log source one last time
//! ([`RamBlock::sync_dirty_log`]) and sends, per block and per client it
//! keeps logging for, the bitmap's words ([`send_dirty`]); the destination
//! ORs them into the same-named block's bitmap of that client
//! ([`receive_dirty`]). For [`DirtyClient::Migration`] the source sends its
//! client bitmap ORed with the migration bitmap (the pages harvested and
//! not yet sent); the destination's next harvest moves them into its own
//! migration bitmap.
//!
//! # Wire format
//! One frame of type 6 (`dirty`), count = entries, no fds. An entry: name
//! length (`u8`, 1..=255), the name (UTF-8), the client's index (`u8`, as
//! in [`DirtyClient::ALL`]), the word count (`u32`), then the words
//! (`u64` each, little-endian, bit 0 = the block's first target page).
//! The word count must be the block's used pages / 64 rounded up, and no
//! bit at or past the used pages may be set. The receiver bounds the body
//! by its own block table before allocating, checks every entry before
//! merging any, and names each breach ([`DirtyBitmapError`]).

use super::{expect_no_fds, frame, read_frame, read_refusal, recv_exact, send_all};
use super::{LocalUpdateError, MAX_BLOCKS, REFUSED};
use ramblock_core::bitmap::{words_for, Storage};
use ramblock_core::block::RamBlock;
use ramblock_core::dirty_log::{DirtyClient, DirtyClients};
use ramblock_core::host::HostMemory;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering::{AcqRel, Acquire};

/// The frame type of a dirty-bitmap message.
pub(super) const DIRTY: u8 = 6;
/// Fixed bytes of an entry besides its name and words.
const ENTRY_FIXED: usize = 1 + 1 + 4;
/// Entries a message may hold: one per block and client.
pub const MAX_DIRTY_ENTRIES: u32 = (MAX_BLOCKS * DirtyClient::ALL.len()) as u32;

/// What is wrong with one entry of a dirty-bitmap message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DirtyBitmapError {
    /// The entry ends before its name, client, count or words do.
    #[error("the entry is cut short ({len} bytes left)")]
    Truncated {
        /// Bytes left in the body.
        len: usize,
    },
    /// An empty or non-UTF-8 block name.
    #[error("the block name is empty or not UTF-8")]
    BadName,
    /// No block of that name on this side.
    #[error("no block named {0:?} here")]
    UnknownBlock(String),
    /// A client index this side does not know.
    #[error("dirty client {0}; known are 0 (display), 1 (code), 2 (migration)")]
    UnknownClient(u8),
    /// The same block and client twice.
    #[error("block {block:?} client {client:?} is listed twice")]
    Repeated {
        /// The block.
        block: String,
        /// The client.
        client: DirtyClient,
    },
    /// A word count other than the block's used pages need.
    #[error("block {block:?}: {got} bitmap words, but its {pages} used pages need {expected}")]
    WordCount {
        /// The block.
        block: String,
        /// Its used target pages here.
        pages: usize,
        /// Words those pages need.
        expected: usize,
        /// Words the entry carries.
        got: u64,
    },
    /// A bit set at or past the block's used pages.
    #[error("block {block:?}: page {page} is marked dirty but the block has {pages} used pages")]
    BitsPastEnd {
        /// The block.
        block: String,
        /// The first such page.
        page: usize,
        /// Its used target pages here.
        pages: usize,
    },
}

/// What [`receive_dirty`] merged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyMerged {
    /// Entries (block and client) merged.
    pub entries: u32,
    /// Bits that were clear here and are now set, over all entries.
    pub newly_dirty: u64,
}

fn used_words<M: HostMemory, S: Storage>(block: &RamBlock<M, S>) -> (usize, usize) {
    let pages = block.used_pages();
    (pages, words_for(pages))
}

/// The mask of the valid bits in word `w` of a bitmap of `pages` bits.
fn valid_mask(w: usize, pages: usize) -> u64 {
    let start = w * 64;
    match pages.saturating_sub(start) {
        0 => 0,
        n if n >= 64 => !0,
        n => (1u64 << n) - 1,
    }
}

/// Sends, for every block in `blocks` and every client in `clients`, the
/// block's dirty bitmap of that client over its used pages (for
/// [`DirtyClient::Migration`], ORed with the migration bitmap). Call it
/// with the vCPUs paused, after a last [`RamBlock::sync_dirty_log`], so
/// the hypervisor's log is in the bitmaps. Returns the bytes sent.
pub fn send_dirty<'b, M: HostMemory + 'b, S: Storage + 'b>(
    sock: &UnixStream,
    blocks: impl IntoIterator<Item = &'b RamBlock<M, S>>,
    clients: DirtyClients,
) -> Result<usize, LocalUpdateError> {
    let mut body = Vec::new();
    let mut count = 0u32;
    for block in blocks {
        for client in DirtyClient::ALL {
            if !clients.has(client) {
                continue;
            }
            count += 1;
            if count > MAX_DIRTY_ENTRIES {
                return Err(LocalUpdateError::TooManyBlocks {
                    count: u64::from(count) / DirtyClient::ALL.len() as u64 + 1,
                });
            }
            let (pages, words) = used_words(block);
            let name = block.name().as_bytes();
            // Block names are BlockNames: 1..=255 bytes of UTF-8.
            body.push(name.len() as u8);
            body.extend_from_slice(name);
            body.push(client as u8);
            body.extend_from_slice(&(words as u32).to_le_bytes());
            let dirty = block.dirty(client).words();
            let migration = (client == DirtyClient::Migration).then(|| block.migration());
            for (w, slot) in dirty.iter().take(words).enumerate() {
                let mut word = slot.load(Acquire);
                if let Some(m) = &migration {
                    word |= m.bitmap.words().get(w).copied().unwrap_or(0);
                }
                body.extend_from_slice(&(word & valid_mask(w, pages)).to_le_bytes());
            }
        }
    }
    let head = frame(DIRTY, count, body.len());
    send_all(sock, &head, &body, &[], "sending dirty bitmaps")?;
    Ok(super::FRAME_LEN + body.len())
}

/// One checked entry: block index, client, body range of its words.
struct Entry {
    block: usize,
    client: DirtyClient,
    words: core::ops::Range<usize>,
}

/// Receives a dirty-bitmap message and ORs each entry into the bitmap of
/// its client in the same-named block of `blocks`. Every entry is checked
/// (name, client, length, bits past the used pages) before any is merged;
/// the body is bounded by `blocks` before it is read. A refusal is
/// [`LocalUpdateError::Refused`]. The caller sets the socket's read
/// timeout.
pub fn receive_dirty<M: HostMemory, S: Storage>(
    sock: &UnixStream,
    blocks: &[&RamBlock<M, S>],
) -> Result<DirtyMerged, LocalUpdateError> {
    let what = "receiving dirty bitmaps";
    let mut fds = Vec::new();
    let (kind, count, len) = read_frame(sock, &mut fds, what)?;
    expect_no_fds(&fds)?;
    if kind == REFUSED {
        return Err(read_refusal(sock, count, len)?);
    }
    if kind != DIRTY {
        return Err(LocalUpdateError::UnexpectedMessage {
            expected: "dirty bitmaps",
            got: kind,
        });
    }
    if count > MAX_DIRTY_ENTRIES {
        return Err(LocalUpdateError::TooLong {
            what: "dirty-bitmap entry count",
            len: u64::from(count),
            max: u64::from(MAX_DIRTY_ENTRIES),
        });
    }
    // The most a valid message for these blocks could be: every block
    // with every client.
    let max: u64 = blocks
        .iter()
        .map(|b| {
            let entry = ENTRY_FIXED + b.name().len() + 8 * used_words(b).1;
            (entry * DirtyClient::ALL.len()) as u64
        })
        .sum();
    if len > max {
        return Err(LocalUpdateError::TooLong {
            what: "dirty bitmaps",
            len,
            max,
        });
    }
    let mut body = vec![0u8; len as usize];
    recv_exact(sock, &mut body, &mut fds, what)?;
    expect_no_fds(&fds)?;

    let mut entries: Vec<Entry> = Vec::with_capacity(count as usize);
    let mut at = 0;
    for index in 0..count {
        let bad = |error| LocalUpdateError::BadDirty { index, error };
        let rest = &body[at..];
        let truncated = || bad(DirtyBitmapError::Truncated { len: rest.len() });
        let name_len = *rest.first().ok_or_else(truncated)? as usize;
        if name_len == 0 {
            return Err(bad(DirtyBitmapError::BadName));
        }
        let fixed = rest
            .get(1..1 + name_len + ENTRY_FIXED - 1)
            .ok_or_else(truncated)?;
        let name =
            std::str::from_utf8(&fixed[..name_len]).map_err(|_| bad(DirtyBitmapError::BadName))?;
        let client_index = fixed[name_len];
        let client = *DirtyClient::ALL
            .get(client_index as usize)
            .ok_or_else(|| bad(DirtyBitmapError::UnknownClient(client_index)))?;
        let got = u32::from_le_bytes(
            fixed[name_len + 1..name_len + 5]
                .try_into()
                .unwrap_or_default(),
        );
        let block = blocks
            .iter()
            .position(|b| b.name() == name)
            .ok_or_else(|| bad(DirtyBitmapError::UnknownBlock(name.to_owned())))?;
        if entries
            .iter()
            .any(|e| e.block == block && e.client == client)
        {
            return Err(bad(DirtyBitmapError::Repeated {
                block: name.to_owned(),
                client,
            }));
        }
        let (pages, expected) = used_words(blocks[block]);
        if u64::from(got) != expected as u64 {
            return Err(bad(DirtyBitmapError::WordCount {
                block: name.to_owned(),
                pages,
                expected,
                got: u64::from(got),
            }));
        }
        let start = at + ENTRY_FIXED + name_len;
        let end = start + 8 * expected;
        if end > body.len() {
            return Err(truncated());
        }
        for (w, bytes) in body[start..end].chunks_exact(8).enumerate() {
            let word = u64::from_le_bytes(bytes.try_into().unwrap_or_default());
            let past = word & !valid_mask(w, pages);
            if past != 0 {
                return Err(bad(DirtyBitmapError::BitsPastEnd {
                    block: name.to_owned(),
                    page: w * 64 + past.trailing_zeros() as usize,
                    pages,
                }));
            }
        }
        entries.push(Entry {
            block,
            client,
            words: start..end,
        });
        at = end;
    }
    if at != body.len() {
        return Err(LocalUpdateError::TrailingBytes {
            what: "dirty bitmaps",
            extra: body.len() - at,
        });
    }

    let mut merged = DirtyMerged::default();
    for e in &entries {
        let words = blocks[e.block].dirty(e.client).words();
        for (w, bytes) in body[e.words.clone()].chunks_exact(8).enumerate() {
            let word = u64::from_le_bytes(bytes.try_into().unwrap_or_default());
            // Every index is in range: the word count equals
            // words_for(used pages), and the client bitmap covers the max
            // length.
            if let Some(slot) = words.get(w).filter(|_| word != 0) {
                let before = slot.fetch_or(word, AcqRel);
                merged.newly_dirty += u64::from((word & !before).count_ones());
            }
        }
        merged.entries += 1;
    }
    Ok(merged)
}
