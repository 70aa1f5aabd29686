//! [`BlockRegion`]: vm-memory's [`GuestMemoryRegion`] over a block, or a
//! page range of one, at a guest-physical address.
#![allow(unsafe_code)]

use super::bitmap::BlockBitmap;
use super::error::GuestMemoryError;
use crate::memory::LinuxMemory;
use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Storage;
use ramblock_core::block::RamBlock;
use ramblock_core::buffer::BufferMemory;
use ramblock_core::dirty_log::{DirtyClient, DirtyClients};
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::region::HostRegion;
use rustix::fd::BorrowedFd;
use std::fmt;
use std::fs::File;
use std::sync::Arc;
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryRegion, GuestMemoryRegionBytes, GuestUsize,
    MemoryRegionAddress, VolatileSlice,
};

/// Host memory that can name the file behind it, so a region can report
/// its [`file_offset`](GuestMemoryRegion::file_offset) and a vhost-user
/// backend can map the same memory.
pub trait BackingFile {
    /// The file and the offset in it of the memory's first byte, when the
    /// memory is a shared mapping of a file (memfd or file); `None` when
    /// another process could not see this process's writes through it.
    fn backing_file(&self) -> Option<(BorrowedFd<'_>, u64)>;
}

impl BackingFile for LinuxMemory {
    fn backing_file(&self) -> Option<(BorrowedFd<'_>, u64)> {
        // A private mapping's writes stay in this process: handing its file
        // out would show a backend stale bytes.
        if !self.is_shared() {
            return None;
        }
        self.fd().map(|fd| (fd, self.fd_offset()))
    }
}

impl<B: ramblock_core::buffer::StableBuffer> BackingFile for BufferMemory<B> {
    fn backing_file(&self) -> Option<(BorrowedFd<'_>, u64)> {
        None
    }
}

/// A block, or whole pages of one, at a guest-physical address, as a
/// vm-memory region: reads and writes go to the block's memory, and every
/// write marks the block's dirty bitmaps ([`BlockBitmap`]).
///
/// The region borrows the block, and a block is only reached through a
/// [`RamListView`](ramblock_core::list::RamListView) (which a removal or a
/// resize waits for) or owned after [`RamList::remove`](ramblock_core::RamList::remove),
/// so a region can outlive neither the view it came from:
///
/// ```compile_fail
/// use ramblock_core::{addr::ByteLen, bitmap::Owned, BlockBitmaps, BlockName, BlockSpec, RamList};
/// use ramblock_linux::guest_memory::BlockRegion;
/// use ramblock_linux::{LinuxMemory, MemoryBuilder};
/// use vm_memory::{Bytes, GuestAddress, MemoryRegionAddress};
/// let list: RamList<'static, LinuxMemory, Owned, 4> = RamList::new();
/// let spec = BlockSpec::new(BlockName::new("ram").unwrap(), ByteLen(2 << 20));
/// let mem = MemoryBuilder::memfd(ByteLen(2 << 20)).build().unwrap();
/// list.add(spec.clone(), mem, BlockBitmaps::for_spec(&spec).unwrap()).unwrap();
/// let region = {
///     let view = list.read();
///     BlockRegion::new(view.by_name("ram").unwrap(), GuestAddress(0)).unwrap()
/// };
/// region.write_obj(1u64, MemoryRegionAddress(0)).unwrap();
/// ```
///
/// nor a block that was removed and dropped:
///
/// ```compile_fail
/// use ramblock_core::{addr::ByteLen, bitmap::Owned, BlockBitmaps, BlockName, BlockSpec, RamList};
/// use ramblock_linux::guest_memory::BlockRegion;
/// use ramblock_linux::{LinuxMemory, MemoryBuilder};
/// use vm_memory::{Bytes, GuestAddress, MemoryRegionAddress};
/// let list: RamList<'static, LinuxMemory, Owned, 4> = RamList::new();
/// let spec = BlockSpec::new(BlockName::new("ram").unwrap(), ByteLen(2 << 20));
/// let mem = MemoryBuilder::memfd(ByteLen(2 << 20)).build().unwrap();
/// list.add(spec.clone(), mem, BlockBitmaps::for_spec(&spec).unwrap()).unwrap();
/// let block = list.remove("ram").unwrap();
/// let region = BlockRegion::new(&block, GuestAddress(0)).unwrap();
/// drop(block);
/// region.write_obj(1u64, MemoryRegionAddress(0)).unwrap();
/// ```
///
/// and a shrink ([`RamList::resize`](ramblock_core::RamList::resize)) waits
/// for every view, so no region sees the cut-off tail.
pub struct BlockRegion<'a, M, S: Storage> {
    block: &'a RamBlock<M, S>,
    gpa: GuestAddress,
    /// The region's bytes: `len` bytes from block offset `bitmap.base()`.
    host: HostRegion<'a>,
    bitmap: BlockBitmap<'a, S::Atomic>,
    file: Option<FileOffset>,
}

impl<M: HostMemory, S: Storage> fmt::Debug for BlockRegion<'_, M, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockRegion")
            .field("block", &self.block.name())
            .field("gpa", &self.gpa)
            .field("offset", &self.bitmap.base())
            .field("len", &self.host.len())
            .field("file_offset", &self.file.as_ref().map(FileOffset::start))
            .finish()
    }
}

impl<'a, M: HostMemory + BackingFile, S: Storage> BlockRegion<'a, M, S> {
    /// The block's whole used length at `gpa`; writes mark every dirty
    /// client, as [`RamBlock::write`] does.
    pub fn new(block: &'a RamBlock<M, S>, gpa: GuestAddress) -> Result<Self, GuestMemoryError> {
        Self::range(block, gpa, ByteLen(0), block.used_length())
    }

    /// `len` bytes from block offset `offset` (whole 4 KiB pages inside the
    /// used length) at `gpa`; writes mark every dirty client.
    pub fn range(
        block: &'a RamBlock<M, S>,
        gpa: GuestAddress,
        offset: ByteLen,
        len: ByteLen,
    ) -> Result<Self, GuestMemoryError> {
        Self::with_clients(block, gpa, offset, len, DirtyClients::all())
    }

    /// As [`BlockRegion::range`], marking only `clients` on writes (a VMM
    /// without display or TCG code caches may mark only
    /// [`DirtyClients::MIGRATION`]).
    pub fn with_clients(
        block: &'a RamBlock<M, S>,
        gpa: GuestAddress,
        offset: ByteLen,
        len: ByteLen,
        clients: DirtyClients,
    ) -> Result<Self, GuestMemoryError> {
        let name = || block.name().to_owned();
        if block.flags().contains(BlockFlags::READ_ONLY) || block.memory().read_only() {
            return Err(GuestMemoryError::ReadOnly { block: name() });
        }
        let page = ramblock_core::addr::PageSize::SIZE_4K;
        if !offset.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(GuestMemoryError::Unaligned {
                block: name(),
                offset,
                len,
            });
        }
        let out_of_range = || GuestMemoryError::OutOfRange {
            block: name(),
            offset,
            len,
            used: block.used_length(),
        };
        if len.0 == 0
            || offset
                .checked_add(len)
                .is_none_or(|end| end > block.used_length())
        {
            return Err(out_of_range());
        }
        if gpa.0.checked_add(len.0 - 1).is_none() {
            return Err(GuestMemoryError::GpaOverflow { gpa: gpa.0, len });
        }
        let start = offset.to_usize().ok_or_else(out_of_range)?;
        let bytes = len.to_usize().ok_or_else(out_of_range)?;
        let host = block
            .region()
            .subregion(offset, bytes)
            .map_err(|_| out_of_range())?;
        let file = match block.memory().backing_file() {
            Some((fd, at)) => {
                let owned = fd
                    .try_clone_to_owned()
                    .map_err(|e| GuestMemoryError::DupFd {
                        block: name(),
                        errno: rustix::io::Errno::from_io_error(&e)
                            .unwrap_or(rustix::io::Errno::BADF),
                    })?;
                Some(FileOffset::from_arc(
                    Arc::new(File::from(owned)),
                    at + offset.0,
                ))
            }
            None => None,
        };
        let dirty = DirtyClient::ALL.map(|c| block.dirty(c));
        Ok(BlockRegion {
            block,
            gpa,
            host,
            bitmap: BlockBitmap::new(dirty, clients, start),
            file,
        })
    }

    /// The block the region maps.
    pub fn block(&self) -> &'a RamBlock<M, S> {
        self.block
    }

    /// The region's first byte as an offset in the block.
    pub fn block_offset(&self) -> ByteLen {
        ByteLen::from_usize(self.bitmap.base())
    }
}

impl<'a, M: HostMemory, S: Storage> GuestMemoryRegion for BlockRegion<'a, M, S> {
    type B = BlockBitmap<'a, S::Atomic>;

    fn len(&self) -> GuestUsize {
        self.host.len() as GuestUsize
    }

    fn start_addr(&self) -> GuestAddress {
        self.gpa
    }

    fn bitmap(&self) -> BlockBitmap<'a, S::Atomic> {
        self.bitmap
    }

    fn get_host_address(
        &self,
        addr: MemoryRegionAddress,
    ) -> vm_memory::guest_memory::Result<*mut u8> {
        self.check_address(addr)
            .ok_or(vm_memory::GuestMemoryError::InvalidBackendAddress)
            // In range: checked just above.
            .map(|a| self.host.as_ptr().wrapping_add(a.0 as usize))
    }

    fn file_offset(&self) -> Option<&FileOffset> {
        self.file.as_ref()
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::guest_memory::Result<VolatileSlice<'_, BlockBitmap<'a, S::Atomic>>> {
        let start = usize::try_from(offset.0).ok();
        match start.and_then(|s| s.checked_add(count).map(|end| (s, end))) {
            Some((start, end)) if end <= self.host.len() => {
                // SAFETY: `start..end` lies inside the region, which borrows
                // the block for 'a (so the mapping stays and is not shrunk
                // under it, see the type's docs); the slice borrows `self`,
                // shorter still. Guest RAM is only reached by copies
                // (ramblock's atomic ones, vm-memory's volatile ones, the
                // guest's own), never through a Rust reference, which is
                // what VolatileSlice asks of other users.
                Ok(unsafe {
                    VolatileSlice::with_bitmap(
                        self.host.as_ptr().add(start),
                        count,
                        self.bitmap.slice_at(start),
                        None,
                    )
                })
            }
            _ => Err(vm_memory::GuestMemoryError::InvalidBackendAddress),
        }
    }

    fn is_hugetlbfs(&self) -> Option<bool> {
        Some(self.block.page_size() > ramblock_core::addr::PageSize::SIZE_4K)
    }
}

impl<M: HostMemory, S: Storage> GuestMemoryRegionBytes for BlockRegion<'_, M, S> {}
