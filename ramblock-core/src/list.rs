//! [`RamList`]: all blocks of a VM, laid out in one RAM address space.
//!
//! # Layout
//! A new block goes in the smallest gap that fits it ("best fit"), looking at
//! the gap that starts each space's free stretch: the start of the address
//! space and the end of every existing block, rounded up to 64 target pages so
//! each block's bitmaps begin on a 64-bit word. Ties go to the lowest
//! address. Space freed by a removed block is reused.
//!
//! # Concurrency contract
//! - Any number of threads may look blocks up, read and write their memory
//!   and mark pages dirty at the same time, through [`RamList::read`] or
//!   [`RamList::mark_dirty`]. Lookups take a shared spin lock and never
//!   allocate.
//! - Adding, removing and resizing take the lock exclusively and wait for
//!   readers to finish: keep read guards short (one page, one record). A
//!   waiting writer holds new readers back, so it is never starved; the
//!   flip side is that a thread holding a view must not take a second one
//!   (or call [`RamList::mark_dirty`]) while a writer may be waiting.
//! - [`RamList::version`] changes on every add, remove and resize, so a
//!   migration walking the blocks without holding the lock can tell that the
//!   layout changed under it.
//! - Listeners run under the exclusive lock and must not call the list.

use crate::addr::{ByteLen, RamAddr, BLOCK_ALIGN};
use crate::bitmap::{
    AtomicBitmap, AtomicWord, ClearMap, ClearMapNewError, MigrationBitmap, ReceivedMap, Storage,
    StorageTooSmall,
};
use crate::block::{pages_usize, AccessError, BlockBitmaps, BlockSpec, MigrationState, RamBlock};
use crate::dirty_log::DirtyClients;
use crate::flags::{BlockFlags, FlagsError};
use crate::host::HostMemory;
use crate::listener::RamListener;
use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The most listeners a list keeps.
pub const MAX_LISTENERS: usize = 8;

/// Why a block could not be added. The memory and bitmaps come back in
/// [`Rejected`], so nothing is lost.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum AddError {
    /// The flags contradict each other.
    Flags(FlagsError),
    /// A block with this name exists.
    DuplicateName,
    /// The used length is zero.
    ZeroLength,
    /// A length is not a multiple of the host page size.
    Unaligned {
        /// The length.
        length: u64,
        /// The page size.
        page_size: u64,
    },
    /// `used_length > max_length`.
    UsedExceedsMax {
        /// Used length.
        used: u64,
        /// Max length.
        max: u64,
    },
    /// A fixed-size block has `max_length != used_length`.
    MaxLengthNeedsResizable {
        /// Used length.
        used: u64,
        /// Max length.
        max: u64,
    },
    /// The post-copy length is past `max_length`.
    PostcopyTooLong {
        /// Post-copy length.
        postcopy: u64,
        /// Max length.
        max: u64,
    },
    /// The host memory reserves less than `max_length`.
    MemoryTooSmall {
        /// Bytes reserved by the memory.
        reserved: u64,
        /// The block's max length.
        max: u64,
    },
    /// The host memory's accessible length differs from `used_length`.
    MemoryUsedMismatch {
        /// The memory's used length.
        memory: u64,
        /// The block's used length.
        block: u64,
    },
    /// The clear-map shift is outside `6..=31`.
    ClearShift(u8),
    /// The host memory is mapped read-only but the block's flags lack
    /// `READ_ONLY`, so writes (a device's, an incoming migration's) would
    /// fault.
    MemoryReadOnly,
    /// Caller-supplied bitmap storage is too small.
    Storage(StorageTooSmall),
    /// No gap in the RAM address space is large enough.
    AddressSpaceFull,
    /// The list holds `capacity` blocks already.
    ListFull {
        /// The list's capacity.
        capacity: usize,
    },
}

impl fmt::Display for AddError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AddError::Flags(e) => write!(f, "invalid flags: {e}"),
            AddError::DuplicateName => f.write_str("a block with this name exists; names must be unique"),
            AddError::ZeroLength => f.write_str("used length is zero"),
            AddError::Unaligned { length, page_size } => {
                write!(f, "length {length:#x} is not a multiple of the host page size {page_size:#x}")
            }
            AddError::UsedExceedsMax { used, max } => {
                write!(f, "used length {used:#x} exceeds max length {max:#x}")
            }
            AddError::MaxLengthNeedsResizable { used, max } => write!(
                f,
                "max length {max:#x} differs from used length {used:#x} but the block is not RESIZABLE"
            ),
            AddError::PostcopyTooLong { postcopy, max } => {
                write!(f, "post-copy length {postcopy:#x} exceeds max length {max:#x}")
            }
            AddError::MemoryTooSmall { reserved, max } => {
                write!(f, "host memory reserves {reserved:#x} bytes, the block needs {max:#x}")
            }
            AddError::MemoryUsedMismatch { memory, block } => write!(
                f,
                "host memory has {memory:#x} bytes accessible, the block's used length is {block:#x}"
            ),
            AddError::ClearShift(s) => write!(f, "clear-map shift {s} is outside 6..=31"),
            AddError::MemoryReadOnly => f.write_str(
                "host memory is read-only but the block is not; add BlockFlags::READ_ONLY (or use the memory's flags)",
            ),
            AddError::Storage(e) => write!(f, "bitmap storage: {e}"),
            AddError::AddressSpaceFull => f.write_str("no gap in the RAM address space fits the block"),
            AddError::ListFull { capacity } => write!(f, "the block list is full ({capacity} blocks)"),
        }
    }
}

impl core::error::Error for AddError {}

/// A refused block: the error, and everything the caller handed over.
pub struct Rejected<M, S: Storage> {
    /// What was wrong.
    pub error: AddError,
    /// The host memory, untouched.
    pub memory: M,
    /// The bitmap storage.
    pub bitmaps: BlockBitmaps<S>,
}

impl<M, S: Storage> fmt::Debug for Rejected<M, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rejected({:?})", self.error)
    }
}

impl<M, S: Storage> fmt::Display for Rejected<M, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl<M, S: Storage> core::error::Error for Rejected<M, S> {}

/// No block has the name asked for.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct UnknownBlock;

impl fmt::Display for UnknownBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no block has this name")
    }
}

impl core::error::Error for UnknownBlock {}

/// Why a resize failed; the block is unchanged.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ResizeError<E> {
    /// No block has this name.
    UnknownBlock,
    /// The block is not resizable.
    NotResizable,
    /// The new length is zero.
    ZeroLength,
    /// The new length is not a multiple of the page size.
    Unaligned {
        /// The length asked for.
        length: u64,
        /// The page size.
        page_size: u64,
    },
    /// The new length is past `max_length`.
    ExceedsMax {
        /// The length asked for.
        length: u64,
        /// The block's max length.
        max: u64,
    },
    /// The host memory refused.
    Host(E),
}

impl<E: fmt::Display> fmt::Display for ResizeError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResizeError::UnknownBlock => f.write_str("no block has this name"),
            ResizeError::NotResizable => f.write_str("the block is not RESIZABLE"),
            ResizeError::ZeroLength => f.write_str("a block cannot shrink to zero bytes"),
            ResizeError::Unaligned { length, page_size } => {
                write!(
                    f,
                    "new length {length:#x} is not a multiple of the page size {page_size:#x}"
                )
            }
            ResizeError::ExceedsMax { length, max } => {
                write!(
                    f,
                    "new length {length:#x} exceeds the block's max length {max:#x}"
                )
            }
            ResizeError::Host(e) => write!(f, "host memory refused the resize: {e}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for ResizeError<E> {}

/// Why marking a RAM range dirty failed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DirtyError {
    /// No block contains the address.
    UnknownAddress(RamAddr),
    /// The range runs past the block's used length.
    Access(AccessError),
}

impl fmt::Display for DirtyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyError::UnknownAddress(a) => write!(f, "no block contains RAM address {a}"),
            DirtyError::Access(e) => e.fmt(f),
        }
    }
}

impl core::error::Error for DirtyError {}

/// The listener list is full.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ListenersFull;

impl fmt::Display for ListenersFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at most {MAX_LISTENERS} listeners can be registered")
    }
}

impl core::error::Error for ListenersFull {}

/// Identifies a registered listener, for [`RamList::remove_listener`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ListenerId(usize);

type Listener<'l, M, S> = &'l (dyn RamListener<M, S> + Sync);

struct Inner<'l, M, S: Storage, const N: usize> {
    /// Sorted by offset.
    blocks: heapless::Vec<RamBlock<M, S>, N>,
    listeners: heapless::Vec<(ListenerId, Listener<'l, M, S>), MAX_LISTENERS>,
    next_listener: usize,
}

/// Up to `N` blocks in one RAM address space; see the module docs.
pub struct RamList<'l, M, S: Storage, const N: usize> {
    inner: spin::RwLock<Inner<'l, M, S, N>>,
    /// Index + 1 of the block of the last address lookup; 0 for none. Only
    /// read or written under the lock (shared or exclusive), so an index is
    /// always about the current block vector.
    mru: AtomicUsize,
    version: AtomicWord,
    /// Writers waiting for the lock; new readers wait while it is non-zero
    /// (spin's lock prefers readers, which would starve writers).
    writers_waiting: AtomicUsize,
    /// One past the highest usable RAM address.
    limit: u64,
}

impl<M, S: Storage, const N: usize> fmt::Debug for RamList<'_, M, S, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.read();
        f.debug_struct("RamList")
            .field("blocks", &inner.blocks)
            .field("version", &self.version.load(Relaxed))
            .finish()
    }
}

impl<M: HostMemory, S: Storage, const N: usize> Default for RamList<'_, M, S, N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Picks the offset for a block of `size` bytes among `blocks` (sorted by
/// offset); see the module docs.
fn best_fit<M, S: Storage>(
    blocks: &[RamBlock<M, S>],
    size: ByteLen,
    limit: u64,
) -> Option<RamAddr> {
    let mut best: Option<(u64, u64)> = None; // (gap, offset)
    let starts = core::iter::once(Some(0)).chain(blocks.iter().map(|b| {
        let end = b.offset.0.checked_add(b.max_length.0)?;
        Some(ByteLen(end).checked_align_up(BLOCK_ALIGN)?.0)
    }));
    for start in starts.flatten() {
        // The next block at or after `start` bounds the gap. Offsets are
        // aligned, so no block starts between a block's end and its aligned
        // end, and `next >= start`.
        let next = blocks.get(blocks.partition_point(|b| b.offset.0 < start));
        let gap_end = next.map_or(limit, |b| b.offset.0);
        let Some(gap) = gap_end.checked_sub(start) else {
            continue; // the start is past the limit
        };
        let fits = match start.checked_add(size.0) {
            Some(end) => end <= gap_end,
            None => false,
        };
        if fits && best.is_none_or(|(g, o)| gap < g || (gap == g && start < o)) {
            best = Some((gap, start));
        }
    }
    best.map(|(_, o)| RamAddr(o))
}

impl<'l, M: HostMemory, S: Storage, const N: usize> RamList<'l, M, S, N> {
    /// An empty list over the whole 64-bit RAM address space.
    pub const fn new() -> Self {
        Self::with_address_limit(u64::MAX)
    }

    /// An empty list whose blocks must all end at or below `limit` (a
    /// firmware VMM with a 32-bit RAM space, say).
    pub const fn with_address_limit(limit: u64) -> Self {
        RamList {
            inner: spin::RwLock::new(Inner {
                blocks: heapless::Vec::new(),
                listeners: heapless::Vec::new(),
                next_listener: 0,
            }),
            mru: AtomicUsize::new(0),
            version: AtomicWord::new(0),
            writers_waiting: AtomicUsize::new(0),
            limit,
        }
    }

    /// Takes the lock exclusively, holding new readers back meanwhile.
    fn write(&self) -> spin::RwLockWriteGuard<'_, Inner<'l, M, S, N>> {
        self.writers_waiting
            .fetch_add(1, core::sync::atomic::Ordering::Acquire);
        let guard = self.inner.write();
        self.writers_waiting
            .fetch_sub(1, core::sync::atomic::Ordering::Release);
        guard
    }

    /// Changes on every add, remove and resize.
    pub fn version(&self) -> u64 {
        self.version.load(core::sync::atomic::Ordering::Acquire)
    }

    fn bump_version(&self) {
        self.version
            .fetch_add(1, core::sync::atomic::Ordering::Release);
    }

    fn validate(spec: &BlockSpec, memory: &M) -> Result<(), AddError> {
        spec.flags.validate().map_err(AddError::Flags)?;
        let page = memory.page_size();
        let (used, max) = (spec.used_length, spec.max_length);
        if used.0 == 0 {
            return Err(AddError::ZeroLength);
        }
        for length in [used, max] {
            if !length.is_multiple_of(page) {
                return Err(AddError::Unaligned {
                    length: length.0,
                    page_size: page.bytes(),
                });
            }
        }
        if used > max {
            return Err(AddError::UsedExceedsMax {
                used: used.0,
                max: max.0,
            });
        }
        if used != max && !spec.flags.contains(BlockFlags::RESIZABLE) {
            return Err(AddError::MaxLengthNeedsResizable {
                used: used.0,
                max: max.0,
            });
        }
        if let Some(pc) = spec.postcopy_length {
            if pc > max {
                return Err(AddError::PostcopyTooLong {
                    postcopy: pc.0,
                    max: max.0,
                });
            }
        }
        if memory.read_only() && !spec.flags.contains(BlockFlags::READ_ONLY) {
            return Err(AddError::MemoryReadOnly);
        }
        if memory.reserved_len() < max {
            return Err(AddError::MemoryTooSmall {
                reserved: memory.reserved_len().0,
                max: max.0,
            });
        }
        if memory.used_len() != used {
            return Err(AddError::MemoryUsedMismatch {
                memory: memory.used_len().0,
                block: used.0,
            });
        }
        Ok(())
    }

    /// Builds the block's bitmaps over the caller's storage, checking sizes.
    fn build(
        spec: BlockSpec,
        memory: M,
        bitmaps: BlockBitmaps<S>,
        offset: RamAddr,
    ) -> Result<RamBlock<M, S>, (AddError, M, BlockBitmaps<S>)> {
        let pages = pages_usize(spec.max_length);
        let postcopy = spec.postcopy_length.unwrap_or(spec.used_length);
        let sizes_ok = (|| {
            let words = crate::bitmap::words_for(pages);
            for given in bitmaps.dirty.iter().map(|d| d.as_ref().len()).chain([
                bitmaps.migration.as_ref().len(),
                bitmaps.received.as_ref().len(),
            ]) {
                if given < words {
                    return Err(AddError::Storage(StorageTooSmall {
                        needed: words,
                        given,
                    }));
                }
            }
            let clear = ClearMap::<&mut [u64]>::words_needed(pages, spec.clear_shift)
                .map_err(|e| AddError::ClearShift(e.0))?;
            if bitmaps.clear.as_ref().len() < clear {
                return Err(AddError::Storage(StorageTooSmall {
                    needed: clear,
                    given: bitmaps.clear.as_ref().len(),
                }));
            }
            Ok(())
        })();
        if let Err(e) = sizes_ok {
            return Err((e, memory, bitmaps));
        }
        // Sizes were checked above, so none of these constructors can fail.
        let BlockBitmaps {
            dirty,
            migration,
            clear,
            received,
        } = bitmaps;
        let [d0, d1, d2] = dirty;
        let atomic = |w| AtomicBitmap::new(w, pages).unwrap_or_else(|_| unreachable!("checked"));
        let dirty = [atomic(d0), atomic(d1), atomic(d2)];
        let bitmap =
            MigrationBitmap::new(migration, pages).unwrap_or_else(|_| unreachable!("checked"));
        let clear_map = ClearMap::new(clear, pages, spec.clear_shift)
            .unwrap_or_else(|e: ClearMapNewError| unreachable!("checked: {e}"));
        let received = ReceivedMap::new(received, pages_usize(postcopy))
            .unwrap_or_else(|_| unreachable!("checked"));
        Ok(RamBlock {
            name: spec.name,
            offset,
            used_length: spec.used_length,
            max_length: spec.max_length,
            postcopy_length: postcopy,
            page_size: memory.page_size(),
            flags: spec.flags,
            memory,
            dirty,
            migration: spin::Mutex::new(MigrationState { bitmap, clear_map }),
            received,
        })
    }

    /// Adds a block over `memory`, placing it in the RAM address space, and
    /// tells the listeners. Returns its offset; on any error the memory and
    /// bitmaps are handed back.
    pub fn add(
        &self,
        spec: BlockSpec,
        memory: M,
        bitmaps: BlockBitmaps<S>,
    ) -> Result<RamAddr, Rejected<M, S>> {
        let reject = |error, memory, bitmaps| Rejected {
            error,
            memory,
            bitmaps,
        };
        if let Err(e) = Self::validate(&spec, &memory) {
            return Err(reject(e, memory, bitmaps));
        }
        let mut inner = self.write();
        if inner.blocks.iter().any(|b| b.name == spec.name) {
            return Err(reject(AddError::DuplicateName, memory, bitmaps));
        }
        if inner.blocks.is_full() {
            return Err(reject(AddError::ListFull { capacity: N }, memory, bitmaps));
        }
        let Some(offset) = best_fit(&inner.blocks, spec.max_length, self.limit) else {
            return Err(reject(AddError::AddressSpaceFull, memory, bitmaps));
        };
        let block =
            Self::build(spec, memory, bitmaps, offset).map_err(|(e, m, b)| reject(e, m, b))?;
        let at = inner.blocks.partition_point(|b| b.offset < offset);
        if inner.blocks.insert(at, block).is_err() {
            unreachable!("capacity was checked under the same lock");
        }
        self.mru.store(0, Relaxed);
        self.bump_version();
        for (_, l) in &inner.listeners {
            l.block_added(&inner.blocks[at]);
        }
        Ok(offset)
    }

    /// Removes the block named `name`, telling the listeners first, and
    /// returns it (with its memory).
    pub fn remove(&self, name: &str) -> Result<RamBlock<M, S>, UnknownBlock> {
        let mut inner = self.write();
        let at = inner
            .blocks
            .iter()
            .position(|b| b.name() == name)
            .ok_or(UnknownBlock)?;
        for (_, l) in &inner.listeners {
            l.block_removed(&inner.blocks[at]);
        }
        self.mru.store(0, Relaxed);
        self.bump_version();
        Ok(inner.blocks.remove(at))
    }

    /// Changes the used length of a resizable block within its max length.
    /// The whole new used range is marked dirty for every client (and any
    /// dirty bits past it cleared), and listeners hear old and new length.
    pub fn resize(&self, name: &str, new_length: ByteLen) -> Result<(), ResizeError<M::Error>> {
        let mut inner = self.write();
        let inner = &mut *inner;
        let block = inner
            .blocks
            .iter_mut()
            .find(|b| b.name() == name)
            .ok_or(ResizeError::UnknownBlock)?;
        if !block.flags.contains(BlockFlags::RESIZABLE) {
            return Err(ResizeError::NotResizable);
        }
        if new_length.0 == 0 {
            return Err(ResizeError::ZeroLength);
        }
        if !new_length.is_multiple_of(block.page_size) {
            return Err(ResizeError::Unaligned {
                length: new_length.0,
                page_size: block.page_size.bytes(),
            });
        }
        if new_length > block.max_length {
            return Err(ResizeError::ExceedsMax {
                length: new_length.0,
                max: block.max_length.0,
            });
        }
        let old = block.used_length;
        if old == new_length {
            return Ok(());
        }
        block
            .memory
            .set_used_len(new_length)
            .map_err(ResizeError::Host)?;
        block.used_length = new_length;
        let (used, max) = (pages_usize(new_length), pages_usize(block.max_length));
        for map in &block.dirty {
            // Both ranges lie inside the bitmaps, which cover max_length.
            let _ = map.set_range(0, used);
            let _ = map.clear_range(used, max - used);
        }
        self.bump_version();
        let block = &*block;
        for (_, l) in &inner.listeners {
            l.block_resized(block, old, new_length);
        }
        Ok(())
    }

    /// Registers a listener; it is first told about every existing block, in
    /// offset order.
    pub fn add_listener(&self, listener: Listener<'l, M, S>) -> Result<ListenerId, ListenersFull> {
        let mut inner = self.write();
        let id = ListenerId(inner.next_listener);
        inner
            .listeners
            .push((id, listener))
            .map_err(|_| ListenersFull)?;
        inner.next_listener += 1;
        for b in &inner.blocks {
            listener.block_added(b);
        }
        Ok(id)
    }

    /// Unregisters a listener; returns whether it was registered.
    pub fn remove_listener(&self, id: ListenerId) -> bool {
        let mut inner = self.write();
        match inner.listeners.iter().position(|(i, _)| *i == id) {
            Some(at) => {
                inner.listeners.remove(at);
                true
            }
            None => false,
        }
    }

    /// Shared access for lookups; see the concurrency contract.
    pub fn read(&self) -> RamListView<'_, 'l, M, S, N> {
        while self
            .writers_waiting
            .load(core::sync::atomic::Ordering::Acquire)
            != 0
        {
            core::hint::spin_loop();
        }
        RamListView {
            inner: self.inner.read(),
            mru: &self.mru,
        }
    }

    /// Marks `len` bytes at RAM address `addr` dirty for `clients`, as the
    /// VMM does after writing guest RAM behind KVM's back.
    pub fn mark_dirty(
        &self,
        addr: RamAddr,
        len: ByteLen,
        clients: DirtyClients,
    ) -> Result<(), DirtyError> {
        let view = self.read();
        let (block, offset) = view
            .block_at(addr)
            .ok_or(DirtyError::UnknownAddress(addr))?;
        block
            .mark_dirty(offset, len, clients)
            .map_err(DirtyError::Access)
    }
}

/// A shared view of the list, for lookups; see [`RamList::read`].
pub struct RamListView<'a, 'l, M, S: Storage, const N: usize> {
    inner: spin::RwLockReadGuard<'a, Inner<'l, M, S, N>>,
    mru: &'a AtomicUsize,
}

impl<M, S: Storage, const N: usize> fmt::Debug for RamListView<'_, '_, M, S, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.inner.blocks.iter()).finish()
    }
}

impl<M: HostMemory, S: Storage, const N: usize> RamListView<'_, '_, M, S, N> {
    /// The block whose reserved range holds `addr`, and `addr`'s offset in
    /// it. The most recently found block is tried first, in constant time.
    pub fn block_at(&self, addr: RamAddr) -> Option<(&RamBlock<M, S>, ByteLen)> {
        let blocks = &self.inner.blocks;
        let hit = |b: &RamBlock<M, S>| {
            addr.checked_offset_from(b.offset)
                .filter(|off| *off < b.max_length)
        };
        let mru = self.mru.load(Relaxed);
        if let Some(b) = mru.checked_sub(1).and_then(|i| blocks.get(i)) {
            if let Some(off) = hit(b) {
                return Some((b, off));
            }
        }
        let i = blocks
            .partition_point(|b| b.offset <= addr)
            .checked_sub(1)?;
        let off = hit(&blocks[i])?;
        self.mru.store(i + 1, Relaxed);
        Some((&blocks[i], off))
    }

    /// The block named `name`.
    pub fn by_name(&self, name: &str) -> Option<&RamBlock<M, S>> {
        self.inner.blocks.iter().find(|b| b.name() == name)
    }

    /// The block whose host reservation holds `host`, and the offset in it.
    pub fn by_host_addr(&self, host: NonNull<u8>) -> Option<(&RamBlock<M, S>, ByteLen)> {
        let p = host.as_ptr() as usize;
        self.inner.blocks.iter().find_map(|b| {
            let base = b.memory.base().as_ptr() as usize;
            let off = p.checked_sub(base)? as u64;
            (off < b.max_length.0).then_some((b, ByteLen(off)))
        })
    }

    /// The blocks in offset order.
    pub fn iter(&self) -> core::slice::Iter<'_, RamBlock<M, S>> {
        self.inner.blocks.iter()
    }

    /// How many blocks there are.
    pub fn len(&self) -> usize {
        self.inner.blocks.len()
    }

    /// Whether there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.inner.blocks.is_empty()
    }
}
