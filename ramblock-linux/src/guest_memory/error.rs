//! [`GuestMemoryError`]: why a block (or a range of it) cannot become a
//! vm-memory region, or the regions a guest memory.

use ramblock_core::addr::ByteLen;
use rustix::io::Errno;
use vm_memory::GuestRegionCollectionError;

/// A block, range or layout that vm-memory cannot be given.
#[derive(Debug, thiserror::Error)]
pub enum GuestMemoryError {
    /// The block is read-only: vm-memory has no read-only regions, and a
    /// device's write into the mapping would fault.
    #[error("block {block} is read-only and vm-memory regions are writable: map it to the guest (KVM read-only slot) without a vm-memory region")]
    ReadOnly {
        /// The block's name.
        block: String,
    },
    /// The range is empty or not inside the block's used length.
    #[error("range of {len} at offset {offset} is empty or outside block {block}'s used length {used}: pick whole pages inside it")]
    OutOfRange {
        /// The block's name.
        block: String,
        /// First byte asked for.
        offset: ByteLen,
        /// Bytes asked for.
        len: ByteLen,
        /// The block's used length.
        used: ByteLen,
    },
    /// The range does not start or end on a 4 KiB page.
    #[error("range of {len} at offset {offset} in block {block} is not whole 4 KiB pages: round it to pages")]
    Unaligned {
        /// The block's name.
        block: String,
        /// First byte asked for.
        offset: ByteLen,
        /// Bytes asked for.
        len: ByteLen,
    },
    /// The guest-physical range wraps past the end of the address space.
    #[error("guest-physical range {gpa:#x} + {len} wraps the 64-bit address space: place the region lower")]
    GpaOverflow {
        /// Guest-physical start.
        gpa: u64,
        /// Bytes.
        len: ByteLen,
    },
    /// The backing file descriptor could not be duplicated for the region's
    /// `file_offset`.
    #[error("cannot duplicate the file descriptor of block {block} for its file_offset: {errno}; raise the open-files limit")]
    DupFd {
        /// The block's name.
        block: String,
        /// What the kernel said.
        errno: Errno,
    },
    /// vm-memory refused the set of regions (none, or two overlapping).
    #[error("vm-memory refused the regions: {0}; give at least one and keep guest-physical ranges apart")]
    Collection(#[from] GuestRegionCollectionError),
}
