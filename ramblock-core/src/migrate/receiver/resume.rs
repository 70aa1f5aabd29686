//! The block table a post-copy started with, kept so that a resumed
//! stream's table can be held against it.
//!
//! A resumed stream may change nothing about the blocks: the ledger and
//! the received maps are indexed by table position, userfaultfd registered
//! exactly the blocks of the original table, and a resize is refused once
//! the guest runs here. So its table must name the same blocks (the same
//! RAM addresses here), in the same order, with the same used lengths,
//! page sizes and flags. The table is kept in a fixed array: the receiver
//! needs no allocator.

use super::error::ReceiveError;
use crate::stream::format::TableEntry;

/// Most blocks a post-copy migration can have and still be resumed
/// ([`ReceiveError::TooManyBlocks`] at the switch otherwise).
pub const MAX_RESUME_BLOCKS: usize = 256;

/// One original table entry: the block's RAM address on this side and the
/// entry as the source sent it.
type Kept = (u64, TableEntry);

/// The original table (empty until a new stream's table was read).
#[derive(Debug, Default)]
pub(super) struct ResumeTable {
    entries: heapless::Vec<Kept, MAX_RESUME_BLOCKS>,
    /// The table had more entries than fit: post-copy is refused.
    overflow: bool,
}

impl ResumeTable {
    /// Remembers a new stream's table.
    pub(super) fn remember(&mut self, entries: impl Iterator<Item = Kept>) {
        self.entries.clear();
        self.overflow = false;
        for e in entries {
            if self.entries.push(e).is_err() {
                self.overflow = true;
            }
        }
    }

    /// Whether a table of `count` entries was remembered whole.
    pub(super) fn holds(&self, count: usize) -> bool {
        !self.overflow && self.entries.len() == count
    }

    /// A resumed table has as many entries as the original.
    pub(super) fn check_count<E, H>(&self, count: u32) -> Result<(), ReceiveError<E, H>> {
        if count as usize != self.entries.len() {
            return Err(ReceiveError::ResumeTableMismatch {
                index: count.min(self.entries.len() as u32),
                what: "block count",
            });
        }
        Ok(())
    }

    /// Entry `index` of a resumed table names the block at `addr` here with
    /// `entry`: the same as the original's entry `index`.
    pub(super) fn check_entry<E, H>(
        &self,
        index: u32,
        addr: u64,
        entry: &TableEntry,
    ) -> Result<(), ReceiveError<E, H>> {
        let mismatch = |what| ReceiveError::ResumeTableMismatch { index, what };
        let Some((kept_addr, kept)) = self.entries.get(index as usize) else {
            return Err(mismatch("block count"));
        };
        if *kept_addr != addr {
            return Err(mismatch("block"));
        }
        if kept.used_length != entry.used_length {
            return Err(mismatch("used length"));
        }
        if kept.page_size != entry.page_size {
            return Err(mismatch("page size"));
        }
        if kept.flags != entry.flags {
            return Err(mismatch("flags"));
        }
        Ok(())
    }
}
