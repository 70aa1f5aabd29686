//! Post-copy on the receiving side: where pages go once the guest runs
//! here, and how hugepages are put together before they are placed.
//!
//! Once post-copy starts, a vCPU may touch any page that has not arrived,
//! so pages cannot be written with plain stores: each must appear at once,
//! whole, and wake whatever waits on it (`UFFDIO_COPY` on Linux). A
//! [`PostcopyTarget`] does that. A hugepage can only be placed whole, so
//! the target pages of a hugepage block are collected in an assembly
//! buffer first; the source sends each hugepage's pages in order and
//! without interruption.

use super::error::ReceiveError;
use crate::addr::{ByteLen, TARGET_PAGE_SHIFT, TARGET_PAGE_SIZE};
use crate::name::BlockName;
use crate::stream::resume_token::ResumeToken;

/// What a post-copy destination does with the guest and its pages.
pub trait PostcopyTarget {
    /// What went wrong (the destination memory's error type).
    type Error;

    /// The source switched to post-copy: the discarded pages are dropped
    /// and marked missing, and the record's device-state sections went to
    /// the VMM's [`SectionSink`](super::SectionSink). Register every block
    /// for missing-page faults and start the guest from that state.
    /// `table` names the blocks in the stream's table order, which is what
    /// a [`PageRequest`](crate::stream::format::PageRequest)'s block index
    /// refers to.
    fn start(&mut self, table: &[&str]) -> Result<(), Self::Error>;

    /// Places `data` (whole host pages) at byte `offset` of `block`, all
    /// at once, waking any vCPU waiting on it. Pages already present stay
    /// as they are.
    fn place(&mut self, block: &str, offset: ByteLen, data: &[u8]) -> Result<(), Self::Error>;

    /// Places `len` bytes of zeros at byte `offset` of `block`, likewise.
    fn place_zero(&mut self, block: &str, offset: ByteLen, len: ByteLen)
        -> Result<(), Self::Error>;

    /// A resumed stream's block table matched: send the received map
    /// (`crate::stream::received_map::write_received_map`) on the new
    /// connection's return path, then ask again for pages still awaited.
    fn resumed(&mut self) -> Result<(), Self::Error>;

    /// The token this destination issued to the source when post-copy
    /// started ([`ResumeToken`]); a resume header must carry it. `None`
    /// (the default) checks no token: only for a target whose transport
    /// already authenticates the source, or a test.
    fn resume_token(&self) -> Option<ResumeToken> {
        None
    }
}

/// Places `pages` target pages from `first` (`data`, or zeros when `None`).
pub(crate) type PlaceFn<'f, E, H> =
    dyn FnMut(u64, Option<&[u8]>, u64) -> Result<(), ReceiveError<E, H>> + 'f;

/// A hugepage being put together: which, and how many of its target pages
/// arrived (in order, from its first).
#[derive(Clone, Debug, PartialEq, Eq)]
struct InProgress {
    block: u32,
    name: BlockName,
    first: u64,
    filled: u64,
}

/// The buffer hugepages are assembled in.
#[derive(Debug, Default)]
pub(crate) struct Assembly<'b> {
    buf: &'b mut [u8],
    at: Option<InProgress>,
}

impl<'b> Assembly<'b> {
    pub(crate) fn new(buf: &'b mut [u8]) -> Self {
        Assembly { buf, at: None }
    }

    /// Forgets a hugepage half put together (its pages were not placed, so
    /// they come again).
    pub(crate) fn abandon(&mut self) {
        self.at = None;
    }

    /// Checks that a block with `page_size`-byte pages can be assembled.
    pub(crate) fn check<E, H>(
        &self,
        name: &BlockName,
        page_size: u64,
    ) -> Result<(), ReceiveError<E, H>> {
        if page_size > TARGET_PAGE_SIZE && page_size > self.buf.len() as u64 {
            return Err(ReceiveError::HugepageBufferTooSmall {
                name: name.clone(),
                page_size,
                buffer: self.buf.len() as u64,
            });
        }
        Ok(())
    }

    /// Adds `count` target pages from `first` of table block `block`
    /// (`data`, or zeros), calling `place(first, data, pages)` for each
    /// hugepage completed. A run must continue the hugepage in progress or
    /// start a new one at its first page.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add<E, H>(
        &mut self,
        block: u32,
        name: &BlockName,
        page_size: u64,
        first: u64,
        count: u32,
        data: Option<&[u8]>,
        place: &mut PlaceFn<'_, E, H>,
    ) -> Result<(), ReceiveError<E, H>> {
        self.check(name, page_size)?;
        let per_page = page_size >> TARGET_PAGE_SHIFT;
        let page_bytes = TARGET_PAGE_SIZE as usize;
        let (mut page, mut done) = (first, 0u64);
        while done < u64::from(count) {
            let start = page - page % per_page;
            let mut at = match self.at.take() {
                Some(p) if p.block == block && p.first == start && start + p.filled == page => p,
                // Starting a hugepage drops none half assembled: its pages
                // were neither placed nor received, and the source sent
                // them as one run of runs, so it broke the format.
                Some(p) if page == start => {
                    return Err(ReceiveError::HugepageIncomplete {
                        name: p.name,
                        first: p.first,
                        arrived: p.filled,
                    })
                }
                None if page == start => InProgress {
                    block,
                    name: name.clone(),
                    first: start,
                    filled: 0,
                },
                p => {
                    self.at = p;
                    return Err(ReceiveError::NotWholeHostPages {
                        name: name.clone(),
                        first: page,
                        page_size,
                    });
                }
            };
            let n = (u64::from(count) - done).min(per_page - at.filled);
            let into =
                &mut self.buf[(at.filled as usize) * page_bytes..][..n as usize * page_bytes];
            match data {
                Some(d) => into.copy_from_slice(&d[done as usize * page_bytes..][..into.len()]),
                None => into.fill(0),
            }
            at.filled += n;
            done += n;
            page += n;
            if at.filled == per_page {
                self.at = None;
                place(start, Some(&self.buf[..page_size as usize]), per_page)?;
            } else {
                self.at = Some(at);
            }
        }
        Ok(())
    }
}
