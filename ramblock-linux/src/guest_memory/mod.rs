//! rust-vmm interop (feature `vm-memory`): ramblock blocks as vm-memory
//! guest memory, so a virtio device (virtio-queue, a vhost-user backend)
//! reads and writes guest RAM through vm-memory and every write it makes
//! reaches the migration bitmap without an extra call.
//!
//! - [`BlockRegion`]: vm-memory's `GuestMemoryRegion` for a block, or whole
//!   pages of one, at a guest-physical address, with `file_offset` for a
//!   shared memfd or file mapping.
//! - [`GuestRam`]: the regions at their guest-physical addresses, as
//!   vm-memory's own `GuestRegionCollection` (so it is a
//!   `GuestMemoryBackend`, and a `GuestMemory`); [`guest_ram`] builds it from
//!   regions in any order.
//! - [`BlockBitmap`]: vm-memory's `Bitmap` over the block's word-atomic dirty
//!   bitmaps; a block's `sync_dirty_log` merges what it marked with the
//!   hypervisor's log, as it merges the block API's writes.
//!
//! Regions borrow the blocks they map (see [`BlockRegion`]): take a
//! [`RamList::read`](ramblock_core::RamList::read) view, build the guest
//! memory from it, hand that to the device, and drop the view when the
//! device is done (a hot-plug or resize waits for it; rebuild the guest
//! memory afterwards, as a VMM rebuilds a `GuestMemoryMmap`).
//!
//! ```
//! use ramblock_core::{addr::ByteLen, bitmap::Owned, dirty_log::SoftwareOnly};
//! use ramblock_core::{BlockBitmaps, BlockName, BlockSpec, RamList};
//! use ramblock_linux::guest_memory::{guest_ram, BlockRegion};
//! use ramblock_linux::{LinuxMemory, MemoryBuilder};
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
//!
//! let list: RamList<'static, LinuxMemory, Owned, 4> = RamList::new();
//! let spec = BlockSpec::new(BlockName::new("pc.ram").unwrap(), ByteLen(4 << 20));
//! let mem = MemoryBuilder::memfd(ByteLen(4 << 20)).shared(true).build().unwrap();
//! list.add(spec.clone(), mem, BlockBitmaps::for_spec(&spec).unwrap()).unwrap();
//!
//! let view = list.read();
//! let ram = view.by_name("pc.ram").unwrap();
//! // Low 1 MiB at 0, the rest at 4 GiB, as a PC lays out RAM around a hole.
//! let low = BlockRegion::range(ram, GuestAddress(0), ByteLen(0), ByteLen(1 << 20)).unwrap();
//! let high = BlockRegion::range(ram, GuestAddress(1 << 32), ByteLen(1 << 20), ByteLen(3 << 20)).unwrap();
//! assert!(high.file_offset().is_some(), "a vhost-user backend can map it");
//! let guest = guest_ram(vec![high, low]).unwrap();
//!
//! // A device writes through vm-memory: block page 256 + 2 becomes dirty.
//! guest.write_obj(0xdead_beef_u32, GuestAddress((1 << 32) + 0x2000)).unwrap();
//! assert_eq!(guest.num_regions(), 2);
//! assert_eq!(ram.sync_dirty_log(&mut SoftwareOnly), Ok(1));
//! assert_eq!(ram.migration().bitmap.find_next_dirty(0), Some(258));
//! ```

mod bitmap;
mod error;
mod region;

pub use bitmap::BlockBitmap;
pub use error::GuestMemoryError;
pub use region::{BackingFile, BlockRegion};

use vm_memory::{GuestMemoryRegion, GuestRegionCollection};

/// Blocks at guest-physical addresses: vm-memory's own region collection
/// over [`BlockRegion`]s.
pub type GuestRam<'a, M, S> = GuestRegionCollection<BlockRegion<'a, M, S>>;

/// The guest memory made of `regions`, in any order; overlapping regions
/// or none at all are [`GuestMemoryError::Collection`].
pub fn guest_ram<M, S>(
    mut regions: Vec<BlockRegion<'_, M, S>>,
) -> Result<GuestRam<'_, M, S>, GuestMemoryError>
where
    M: ramblock_core::host::HostMemory,
    S: ramblock_core::bitmap::Storage,
{
    regions.sort_by_key(|r| r.start_addr());
    Ok(GuestRegionCollection::from_regions(regions)?)
}
