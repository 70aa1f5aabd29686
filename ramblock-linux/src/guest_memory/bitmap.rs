//! [`BlockBitmap`]: vm-memory's [`Bitmap`] over a block's word-atomic dirty
//! bitmaps.
//!
//! vm-memory calls [`Bitmap::mark_dirty`] after every write it makes into
//! guest memory (`write_obj`, `write_slice`, a `VolatileSlice` copy or
//! store). Here that call sets the written target pages in the block's own
//! dirty bitmaps, with [`AtomicBitmap::set_range`]: whole words are stored
//! at once, so a 2 MiB write is eight stores per client, where vm-memory's
//! own `AtomicBitmap` does one atomic read-modify-write per page. The
//! block's next [`RamBlock::sync_dirty_log`](ramblock_core::RamBlock::sync_dirty_log)
//! merges the migration client's marks with the hypervisor's log exactly as
//! it merges the block API's writes ([`RamBlock::write`](ramblock_core::RamBlock::write)
//! marks the same bitmaps the same way).

use ramblock_core::addr::PageSize;
use ramblock_core::bitmap::{AtomicBitmap, AtomicWord};
use ramblock_core::dirty_log::{DirtyClient, DirtyClients};
use std::fmt;
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};

/// Target page size of every ramblock bitmap: one bit per 4 KiB.
const TARGET_PAGE: usize = PageSize::SIZE_4K.bytes() as usize;

/// The dirty bitmaps of one block, seen from byte `base` of the block on:
/// vm-memory's bitmap for a [`BlockRegion`](super::BlockRegion) and every
/// slice of it.
///
/// Offsets given to [`Bitmap::mark_dirty`] and [`Bitmap::dirty_at`] are
/// relative to `base`; pages past the block's bitmaps are ignored (vm-memory
/// only marks what it has just written, which the region bounds-checked).
pub struct BlockBitmap<'a, W> {
    /// One per [`DirtyClient`] in [`DirtyClient::ALL`] order; `None` for a
    /// client the region does not mark.
    maps: [Option<&'a AtomicBitmap<W>>; 3],
    /// The client [`Bitmap::dirty_at`] reports.
    query: Option<&'a AtomicBitmap<W>>,
    /// Byte offset in the block that offset 0 of this bitmap stands for.
    base: usize,
}

impl<W> Clone for BlockBitmap<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<W> Copy for BlockBitmap<'_, W> {}

impl<W> fmt::Debug for BlockBitmap<'_, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let clients: Vec<DirtyClient> = DirtyClient::ALL
            .into_iter()
            .filter(|&c| self.maps[c as usize].is_some())
            .collect();
        f.debug_struct("BlockBitmap")
            .field("clients", &clients)
            .field("base", &self.base)
            .finish()
    }
}

impl<'a, W: AsRef<[AtomicWord]>> BlockBitmap<'a, W> {
    /// The bitmaps of `clients` among `dirty` (a block's, in
    /// [`DirtyClient::ALL`] order), from block byte `base` on. `dirty_at`
    /// reports the migration client when it is marked, else the first one.
    pub(crate) fn new(
        dirty: [&'a AtomicBitmap<W>; 3],
        clients: DirtyClients,
        base: usize,
    ) -> BlockBitmap<'a, W> {
        let mut maps = [None; 3];
        for c in DirtyClient::ALL {
            if clients.has(c) {
                maps[c as usize] = Some(dirty[c as usize]);
            }
        }
        let query = maps[DirtyClient::Migration as usize].or(maps.into_iter().flatten().next());
        BlockBitmap { maps, query, base }
    }

    /// The byte offset in the block this bitmap starts at.
    pub fn base(&self) -> usize {
        self.base
    }
}

impl<W: AsRef<[AtomicWord]>> WithBitmapSlice<'_> for BlockBitmap<'_, W> {
    type S = Self;
}

impl<W: AsRef<[AtomicWord]>> BitmapSlice for BlockBitmap<'_, W> {}

impl<W: AsRef<[AtomicWord]>> Bitmap for BlockBitmap<'_, W> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        // As vm-memory's own slices do: an offset that would overflow marks
        // the wrong pages (a harmless false positive), never panics.
        let start = self.base.wrapping_add(offset);
        let first = start / TARGET_PAGE;
        let last = start.saturating_add(len - 1) / TARGET_PAGE;
        for map in self.maps.iter().flatten() {
            let end = (last + 1).min(map.len());
            if first < end {
                // In range by the clamp above.
                let _ = map.set_range(first, end - first);
            }
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = self.base.wrapping_add(offset) / TARGET_PAGE;
        self.query
            .is_some_and(|map| map.is_set(page).unwrap_or(false))
    }

    fn slice_at(&self, offset: usize) -> Self {
        BlockBitmap {
            base: self.base.wrapping_add(offset),
            ..*self
        }
    }
}
