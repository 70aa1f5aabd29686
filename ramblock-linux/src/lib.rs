//! Linux host memory for ramblock blocks: the core's
//! [`HostMemory`](ramblock_core::host::HostMemory) trait over every backing
//! a Linux VMM uses.
//!
//! One [`MemoryBuilder`] makes a [`LinuxMemory`] from:
//! - **anonymous** memory, private or shared, optionally `MAP_NORESERVE`;
//! - **hugetlb** anonymous memory (`MAP_HUGETLB` with a 2 MiB or 1 GiB size);
//! - a **memfd**, sized once and sealed against growing and shrinking,
//!   optionally hugetlb-backed (`MFD_HUGETLB`);
//! - a **file** (or an unlinked temporary file in a directory), shared or
//!   private, optionally read-only, at an offset; on hugetlbfs the page
//!   size is the filesystem's;
//! - **caller** memory, which is never mapped, remapped or unmapped here.
//!
//! Every block reserves its whole `max_length` once, aligned to the larger
//! of 2 MiB and its page size, between two guard pages; only
//! `used_length` is accessible, so a resizable block grows in place and a
//! shrunk tail faults again. The same builder validates every option up
//! front ([`OptionsError`]) and then applies NUMA binding ([`numa`]), hints
//! and locking ([`advice`]) and preallocation ([`prealloc`]).
//! Everything that fails is an [`Error`] that keeps the errno and says what
//! to do; an exhausted hugetlb pool is [`Error::HugetlbPoolExhausted`],
//! never a SIGBUS.
//!
//! ```
//! use ramblock_core::addr::ByteLen;
//! use ramblock_core::host::HostMemory;
//! use ramblock_linux::MemoryBuilder;
//!
//! let mem = MemoryBuilder::anonymous(ByteLen(2 << 20)).shared(true).build().unwrap();
//! let ram = mem.region();
//! ram.write(ByteLen(0x1000), b"guest").unwrap();
//! mem.discard(ByteLen(0), ByteLen(2 << 20)).unwrap();
//! assert!(ram.is_zero(ByteLen(0), 2 << 20).unwrap());
//! ```
//!
//! Modules follow the OS areas they wrap: [`mmap`], [`memfd`], [`hugetlb`],
//! `file` (private), [`prealloc`], [`advice`], [`numa`],
//! [`error`], plus the [`builder`] and the [`memory`] itself.
//! [`uffd`] wraps userfaultfd on the memory, and [`postcopy`] builds the
//! post-copy destination on it (registration, the fault thread, page
//! requests on the return path);
//! [`fd_stream`] moves a migration stream between a socket and guest memory
//! without a user-space copy, and [`zero_copy`] without the kernel's copy
//! either (`MSG_ZEROCOPY`, opt-in); [`local_update`] hands guest RAM to a new
//! process on the same host by passing its fds over a UNIX socket; [`snapshot`] saves guest RAM to a file and
//! restores it eagerly, by mapping or lazily through userfaultfd. [`dirty_log`] tracks writes without a
//! hypervisor (userfaultfd asynchronous write-protect, harvested with
//! [`pagemap_scan`]); [`live_copy`] saves memory as it was at one instant
//! while writers run (synchronous write-protect, copy before write).
//!
//! # Features
//! - `vm-memory`: `guest_memory`, blocks as rust-vmm vm-memory regions
//!   and guest memory, with vm-memory's dirty `Bitmap` over the blocks' own
//!   dirty bitmaps, for virtio devices and vhost-user backends. (Here and
//!   not in `ramblock-kvm`: vm-memory is hypervisor-neutral, and the
//!   `file_offset` a vhost-user backend needs is this crate's memfd.)
#![deny(missing_docs)]

pub mod advice;
pub mod builder;
pub mod channels;
pub mod dirty_log;
pub mod error;
pub mod fd_stream;
mod file;
#[cfg(feature = "vm-memory")]
pub mod guest_memory;
pub mod hugetlb;
pub mod live_copy;
pub mod local_update;
pub mod memfd;
pub mod memory;
pub mod mmap;
pub mod numa;
mod pagemap;
pub mod pagemap_scan;
pub mod postcopy;
pub mod prealloc;
pub mod snapshot;
pub mod transport;
pub mod uffd;
pub mod zero_copy;

pub use advice::{Hint, LockMode};
pub use builder::MemoryBuilder;
pub use error::{Error, OptionsError};
pub use memory::{BackingKind, LinuxMemory};
pub use numa::{NumaBinding, NumaPolicy};
pub use prealloc::{Prealloc, PreallocMethod};
