//! The `no_std` core of ramblock: a VM's guest RAM as named blocks in one RAM
//! address space, with the bitmaps live migration, post-copy and snapshots
//! run on.
//!
//! The core never makes a system call. Host memory arrives through the
//! [`HostMemory`] trait (implemented over mmap, memfd, hugetlb and files by
//! `ramblock-linux`, or over a plain buffer by [`BufferMemory`]), and the
//! hypervisor's dirty log through [`DirtyLogSource`] (implemented by
//! `ramblock-kvm`).
//!
//! Main types, all re-exported here from the module that defines them:
//! - [`RamList`]: up to `N` blocks, placed best-fit in the RAM address
//!   space, looked up by address, name or host pointer from any thread.
//! - [`RamBlock`]: a named block ([`BlockSpec`], [`BlockName`]) with its
//!   host memory and bitmaps ([`BlockBitmaps`]).
//! - [`bitmap`]: the atomic dirty bitmaps, the migration bitmap, the clear
//!   map and the post-copy received map.
//! - [`migrate`](mod@migrate): live migration, the sending engine ([`migrate()`],
//!   [`PrecopyConfig`], [`MigrationHost`]) and the [`Receiver`], over the
//!   wire format of [`stream`].
//! - [`CheckpointCache`]: a COLO secondary's staging copy of a block,
//!   committed to its RAM once a checkpoint is complete.
//!
//! ```
//! use ramblock_core::{
//!     AtomicWord, BlockBitmaps, BlockName, BlockSpec, Borrowed, BufferMemory, ByteLen,
//!     DirtyClient, DirtyClients, PageSize, RamAddr, RamList, SoftwareOnly,
//! };
//!
//! // A firmware VMM with no allocator: 256 KiB of RAM and its bitmaps, all
//! // in caller storage (one word covers 64 pages).
//! let mut ram = [0u8; 256 << 10];
//! let dirty = [[AtomicWord::new(0)], [AtomicWord::new(0)], [AtomicWord::new(0)]];
//! let received = [AtomicWord::new(0)];
//! let (mut migration, mut clear) = ([0u64; 1], [0u64; 1]);
//!
//! let memory = BufferMemory::new(&mut ram[..], ByteLen(256 << 10), PageSize::SIZE_4K).unwrap();
//! let bitmaps = BlockBitmaps::<Borrowed<'_>> {
//!     dirty: [&dirty[0][..], &dirty[1][..], &dirty[2][..]],
//!     migration: &mut migration[..],
//!     clear: &mut clear[..],
//!     received: &received[..],
//! };
//! let list: RamList<'_, _, Borrowed<'_>, 4> = RamList::new();
//! let spec = BlockSpec::new(BlockName::new("pc.ram").unwrap(), ByteLen(256 << 10));
//! let offset = list.add(spec, memory, bitmaps).unwrap();
//! assert_eq!(offset, RamAddr(0));
//!
//! // A device writes guest RAM: the pages become dirty for migration.
//! let view = list.read();
//! let (block, at) = view.block_at(RamAddr(0x1000)).unwrap();
//! block.write(at, b"hello").unwrap();
//! assert!(block.dirty(DirtyClient::Migration).is_set(1).unwrap());
//! assert_eq!(block.sync_dirty_log(&mut SoftwareOnly), Ok(1));
//! assert_eq!(block.migration().bitmap.find_next_dirty(0), Some(1));
//! # let _ = DirtyClients::all();
//! ```
//!
//! # Features
//! - `std`: adapters from `std::io` to the stream's byte traits
//!   (`IoStream`); implies `alloc`.
//! - `alloc`: heap-owned bitmap storage (`Owned`,
//!   `BlockBitmaps::allocate`). Without it nothing allocates.
#![no_std]
#![deny(missing_docs)]
#![deny(unsafe_code)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod addr;
mod atomic_copy;
pub mod bitmap;
pub mod block;
pub mod buffer;
pub mod checkpoint;
pub mod checksum;
pub mod dirty_log;
pub mod flags;
pub mod host;
pub mod list;
pub mod listener;
pub mod migrate;
pub mod name;
pub mod region;
pub mod section;
pub mod snapshot;
pub mod stream;
#[cfg(test)]
mod testing;

pub use addr::{ByteLen, PageCount, PageSize, RamAddr};
#[cfg(feature = "alloc")]
pub use bitmap::Owned;
pub use bitmap::{AtomicWord, Borrowed, Storage};
pub use block::{AccessError, BlockBitmaps, BlockSpec, RamBlock};
pub use buffer::{BufferError, BufferMemory};
pub use checkpoint::{CheckpointCache, CheckpointError};
#[cfg(feature = "alloc")]
pub use checksum::Ledger;
pub use checksum::{Checksum, PageLedger};
pub use dirty_log::{DirtyClient, DirtyClients, DirtyLogSource, SoftwareOnly};
pub use flags::{BlockFlags, FlagsError};
pub use host::HostMemory;
pub use list::{AddError, RamList, ResizeError};
pub use migrate::{
    migrate, MigrateError, MigrationHost, MigrationStats, PostcopyTarget, PrecopyConfig,
    ReceiveError, ReceiveSummary, Receiver,
};
pub use name::{BlockName, NameError};
pub use region::{HostRegion, RegionError};
#[cfg(feature = "std")]
pub use stream::io::IoStream;
pub use stream::io::{ByteRead, ByteWrite, ReadError, SliceReader};
