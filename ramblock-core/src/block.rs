//! [`RamBlock`]: one named piece of guest RAM.
//!
//! A block has a unique name, an offset in the RAM address space, a used
//! length (what the guest sees and what is migrated) within a maximum length
//! (what is reserved), a host page size, [`BlockFlags`], the host memory
//! behind it, a post-copy length, and its bitmaps: one dirty bitmap per
//! [`DirtyClient`], the migration bitmap with its clear map, and the
//! post-copy received map. Blocks are created by
//! [`crate::list::RamList::add`].

use crate::addr::{ByteLen, PageSize, RamAddr};
use crate::bitmap::{
    words_for, AtomicBitmap, ClearMap, ClearShiftError, MigrationBitmap, ReceivedMap, Storage,
    DEFAULT_CLEAR_SHIFT,
};
use crate::dirty_log::{BlockInfo, DirtyClient, DirtyClients, DirtyLogSource};
use crate::flags::BlockFlags;
use crate::host::HostMemory;
use crate::name::BlockName;
use crate::region::{HostRegion, RegionError};
use core::fmt;
use core::ops::Range;

/// What to create: everything about a block except where it goes and the
/// memory behind it.
#[derive(Clone, Debug)]
pub struct BlockSpec {
    /// The unique name.
    pub name: BlockName,
    /// Bytes the guest sees now.
    pub used_length: ByteLen,
    /// Bytes reserved; equal to `used_length` unless the block is resizable.
    pub max_length: ByteLen,
    /// Flags.
    pub flags: BlockFlags,
    /// Bytes a post-copy destination may receive; `used_length` by default.
    pub postcopy_length: Option<ByteLen>,
    /// Pages per clear-map chunk, as a power of two (6..=31).
    pub clear_shift: u8,
}

impl BlockSpec {
    /// A fixed-size, migratable block of `length` bytes.
    pub fn new(name: BlockName, length: ByteLen) -> BlockSpec {
        BlockSpec {
            name,
            used_length: length,
            max_length: length,
            flags: BlockFlags::MIGRATABLE,
            postcopy_length: None,
            clear_shift: DEFAULT_CLEAR_SHIFT,
        }
    }

    /// Makes the block resizable up to `max_length`.
    pub fn resizable(mut self, max_length: ByteLen) -> BlockSpec {
        self.max_length = max_length;
        self.flags |= BlockFlags::RESIZABLE;
        self
    }

    /// Replaces the flags.
    pub fn flags(mut self, flags: BlockFlags) -> BlockSpec {
        self.flags = flags;
        self
    }

    /// Sets the clear-map chunk shift.
    pub fn clear_shift(mut self, shift: u8) -> BlockSpec {
        self.clear_shift = shift;
        self
    }

    /// Sets the post-copy length.
    pub fn postcopy_length(mut self, length: ByteLen) -> BlockSpec {
        self.postcopy_length = Some(length);
        self
    }
}

/// Words each of a block's bitmaps needs, for callers that supply storage.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BitmapSizes {
    /// Each dirty-client bitmap and the migration bitmap (one bit per page
    /// of `max_length`).
    pub pages: usize,
    /// The clear map.
    pub clear: usize,
}

impl BitmapSizes {
    /// Sizes for a block of `max_length` bytes with clear-map `shift`.
    pub fn for_block(max_length: ByteLen, shift: u8) -> Result<BitmapSizes, ClearShiftError> {
        let pages = pages_usize(max_length);
        Ok(BitmapSizes {
            pages: words_for(pages),
            clear: ClearMap::<&mut [u64]>::words_needed(pages, shift)?,
        })
    }
}

/// The storage for a block's bitmaps, supplied at [`crate::list::RamList::add`].
pub struct BlockBitmaps<S: Storage> {
    /// One per [`DirtyClient`], in [`DirtyClient::ALL`] order.
    pub dirty: [S::Atomic; 3],
    /// The migration bitmap.
    pub migration: S::Plain,
    /// The clear map.
    pub clear: S::Plain,
    /// The post-copy received map.
    pub received: S::Atomic,
}

impl<S: Storage> fmt::Debug for BlockBitmaps<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlockBitmaps { .. }")
    }
}

#[cfg(feature = "alloc")]
impl BlockBitmaps<crate::bitmap::Owned> {
    /// Allocates zeroed bitmaps for a block of `max_length` bytes.
    pub fn allocate(max_length: ByteLen, clear_shift: u8) -> Result<Self, ClearShiftError> {
        use crate::bitmap::{alloc_atomic, alloc_plain};
        let sizes = BitmapSizes::for_block(max_length, clear_shift)?;
        Ok(BlockBitmaps {
            dirty: [
                alloc_atomic(sizes.pages),
                alloc_atomic(sizes.pages),
                alloc_atomic(sizes.pages),
            ],
            migration: alloc_plain(sizes.pages),
            clear: alloc_plain(sizes.clear),
            received: alloc_atomic(sizes.pages),
        })
    }

    /// Allocates bitmaps sized for `spec`.
    pub fn for_spec(spec: &BlockSpec) -> Result<Self, ClearShiftError> {
        Self::allocate(spec.max_length, spec.clear_shift)
    }
}

/// The target pages in `len`, as an index type. Lengths here are backed by
/// host memory, so they fit.
pub(crate) fn pages_usize(len: ByteLen) -> usize {
    usize::try_from(len.target_pages().0).unwrap_or(usize::MAX)
}

/// The migration thread's per-block state: what is left to send, and which
/// chunks still need clearing in the hypervisor.
pub struct MigrationState<S: Storage> {
    /// Pages still to send.
    pub bitmap: MigrationBitmap<S::Plain>,
    /// Chunks harvested but not yet cleared in the hypervisor.
    pub clear_map: ClearMap<S::Plain>,
}

impl<S: Storage> fmt::Debug for MigrationState<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MigrationState")
            .field("bitmap", &self.bitmap)
            .field("clear_map", &self.clear_map)
            .finish()
    }
}

impl<S: Storage> MigrationState<S> {
    /// Finds the next run of dirty pages at or after `from`: at most `max`
    /// consecutive pages, all inside the used length. Before returning it,
    /// clears in the hypervisor every harvested-but-uncleared chunk the run
    /// touches (so writes made after this point are logged again), then
    /// takes the run's bits. The caller sends the pages next.
    pub fn next_dirty_run<D: DirtyLogSource>(
        &mut self,
        from: usize,
        max: usize,
        block: &BlockInfo<'_>,
        source: &mut D,
    ) -> Result<Option<Range<usize>>, D::Error> {
        let used = block.used_pages();
        let Some(start) = self.bitmap.find_next_dirty(from).filter(|&p| p < used) else {
            return Ok(None);
        };
        let limit = start.saturating_add(max.max(1)).min(used);
        let end = self
            .bitmap
            .find_next_clean(start)
            .map_or(limit, |c| c.min(limit));
        // A run spans at most a few chunks (chunks are at least 64 pages).
        let mut page = start;
        while page < end {
            if let Ok(Some(chunk)) = self.clear_map.test_and_clear_chunk_of(page) {
                let chunk_end = chunk.end.min(used);
                if chunk.start < chunk_end {
                    source.clear(block, chunk.start, chunk_end - chunk.start)?;
                }
            }
            page = (page | ((1usize << self.clear_map.shift().min(63)) - 1)).saturating_add(1);
        }
        // In range: start..end lies inside the used pages.
        let _ = self.bitmap.clear_range(start, end - start);
        Ok(Some(start..end))
    }

    /// Forgets dirty pages at or past `used` pages (after a shrink).
    pub fn forget_past(&mut self, used: usize) {
        let len = self.bitmap.len();
        if used < len {
            let _ = self.bitmap.clear_range(used, len - used);
        }
    }
}

/// A bad access to a block's memory or bitmaps.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum AccessError {
    /// The range is not inside the block's used length.
    OutOfRange {
        /// Offset asked for, from the block's start.
        offset: ByteLen,
        /// Bytes asked for.
        len: ByteLen,
        /// The block's used length.
        used_length: ByteLen,
    },
    /// The block is read-only.
    ReadOnly,
}

impl fmt::Display for AccessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AccessError::OutOfRange { offset, len, used_length } => write!(
                f,
                "{len:#x} bytes at block offset {offset:#x} are outside the block's used length {used_length:#x}"
            ),
            AccessError::ReadOnly => f.write_str("the block is read-only"),
        }
    }
}

impl core::error::Error for AccessError {}

/// One named piece of guest RAM; see the module docs.
pub struct RamBlock<M, S: Storage> {
    pub(crate) name: BlockName,
    pub(crate) offset: RamAddr,
    pub(crate) used_length: ByteLen,
    pub(crate) max_length: ByteLen,
    pub(crate) postcopy_length: ByteLen,
    pub(crate) page_size: PageSize,
    pub(crate) flags: BlockFlags,
    pub(crate) memory: M,
    pub(crate) dirty: [AtomicBitmap<S::Atomic>; 3],
    pub(crate) migration: spin::Mutex<MigrationState<S>>,
    pub(crate) received: ReceivedMap<S::Atomic>,
}

impl<M, S: Storage> fmt::Debug for RamBlock<M, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamBlock")
            .field("name", &self.name)
            .field("offset", &self.offset)
            .field("used_length", &self.used_length)
            .field("max_length", &self.max_length)
            .field("page_size", &self.page_size)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

impl<M: HostMemory, S: Storage> RamBlock<M, S> {
    /// The unique name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// The block's start in the RAM address space.
    pub fn offset(&self) -> RamAddr {
        self.offset
    }

    /// Bytes the guest sees (and migration sends).
    pub fn used_length(&self) -> ByteLen {
        self.used_length
    }

    /// Bytes reserved.
    pub fn max_length(&self) -> ByteLen {
        self.max_length
    }

    /// Bytes a post-copy destination may receive.
    pub fn postcopy_length(&self) -> ByteLen {
        self.postcopy_length
    }

    /// The host page size.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// The flags.
    pub fn flags(&self) -> BlockFlags {
        self.flags
    }

    /// The host memory behind the block.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// The used length in target pages.
    pub fn used_pages(&self) -> usize {
        pages_usize(self.used_length)
    }

    /// Whether `addr` falls in this block's reserved range.
    pub fn contains(&self, addr: RamAddr) -> bool {
        addr.checked_offset_from(self.offset)
            .is_some_and(|off| off < self.max_length)
    }

    /// What a dirty-log source needs to know about this block.
    pub fn info(&self) -> BlockInfo<'_> {
        BlockInfo {
            name: self.name.as_str(),
            offset: self.offset,
            used_length: self.used_length,
            page_size: self.page_size,
            flags: self.flags,
        }
    }

    /// The used part of the block's host memory.
    pub fn region(&self) -> HostRegion<'_> {
        self.memory.region()
    }

    /// The dirty bitmap of `client`.
    pub fn dirty(&self, client: DirtyClient) -> &AtomicBitmap<S::Atomic> {
        &self.dirty[client as usize]
    }

    /// The post-copy received map.
    pub fn received(&self) -> &ReceivedMap<S::Atomic> {
        &self.received
    }

    /// The migration state. Only the migration thread takes this lock.
    pub fn migration(&self) -> spin::MutexGuard<'_, MigrationState<S>> {
        self.migration.lock()
    }

    fn out_of_range(&self, offset: ByteLen, len: ByteLen) -> AccessError {
        AccessError::OutOfRange {
            offset,
            len,
            used_length: self.used_length,
        }
    }

    /// The target pages covering `len` bytes at `offset`, checked against
    /// the used length.
    fn pages_of(&self, offset: ByteLen, len: ByteLen) -> Result<(usize, usize), AccessError> {
        let err = self.out_of_range(offset, len);
        match offset.checked_add(len) {
            Some(end) if end <= self.used_length => {
                if len.0 == 0 {
                    return Ok((0, 0));
                }
                // Bitmap indexes are usize; a block fits the address
                // space, so its page numbers do too.
                let first = offset.page_index() as usize;
                let last = ByteLen(end.0 - 1).page_index() as usize;
                Ok((first, last - first + 1))
            }
            _ => Err(err),
        }
    }

    /// Marks every target page touched by `len` bytes at `offset` dirty for
    /// `clients`.
    pub fn mark_dirty(
        &self,
        offset: ByteLen,
        len: ByteLen,
        clients: DirtyClients,
    ) -> Result<(), AccessError> {
        let (first, count) = self.pages_of(offset, len)?;
        for client in DirtyClient::ALL {
            if clients.has(client) {
                // In range: pages_of checked against used_length <= max_length.
                let _ = self.dirty[client as usize].set_range(first, count);
            }
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes from block offset `offset`.
    pub fn read(&self, offset: ByteLen, buf: &mut [u8]) -> Result<(), AccessError> {
        let len = ByteLen::from_usize(buf.len());
        self.pages_of(offset, len)?;
        self.region()
            .read(offset, buf)
            .map_err(|_| self.out_of_range(offset, len))
    }

    /// Writes `data` at block offset `offset`, as a device would, and marks
    /// the pages dirty for every client, so migration sends them.
    pub fn write(&self, offset: ByteLen, data: &[u8]) -> Result<(), AccessError> {
        if self.flags.contains(BlockFlags::READ_ONLY) {
            return Err(AccessError::ReadOnly);
        }
        let len = ByteLen::from_usize(data.len());
        self.pages_of(offset, len)?;
        self.region().write(offset, data).map_err(|e| match e {
            RegionError::ReadOnly { .. } => AccessError::ReadOnly,
            RegionError::OutOfRange { .. } => self.out_of_range(offset, len),
        })?;
        self.mark_dirty(offset, len, DirtyClients::all())
    }

    /// Harvests the hypervisor's log for this block and the VMM's own
    /// migration-dirty marks into the migration bitmap; returns how many
    /// pages became newly dirty. With a source that [needs
    /// clearing](DirtyLogSource::needs_clear), every chunk of the used range
    /// is marked in the clear map.
    pub fn sync_dirty_log<D: DirtyLogSource>(&self, source: &mut D) -> Result<u64, D::Error> {
        let info = self.info();
        let mut state = self.migration.lock();
        let state = &mut *state;
        let mut newly = state.bitmap.with_view(|view| source.harvest(&info, view))?;
        // Same length by construction (both cover max_length).
        newly += state
            .bitmap
            .merge_atomic(&self.dirty[DirtyClient::Migration as usize])
            .unwrap_or(0);
        if source.needs_clear() {
            let _ = state.clear_map.mark_range(0, self.used_pages());
        }
        Ok(newly)
    }
}
