//! [`LinuxMemory`]: one block's host memory, implementing the core's
//! [`HostMemory`] trait.
#![allow(unsafe_code)]

use crate::advice::{self, Hint, LockMode};
use crate::error::Error;
use crate::mmap::{self, host_page_size};
use crate::numa::{self, NumaBinding};
use crate::prealloc::{self, Prealloc};
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::FallocateFlags;
use rustix::mm::{Advice, MprotectFlags};
use std::fmt;
use std::ptr::NonNull;

/// What backs a [`LinuxMemory`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum BackingKind {
    /// Anonymous memory (`MAP_ANONYMOUS`), with host pages.
    Anonymous,
    /// Anonymous hugetlb memory (`MAP_HUGETLB`) of this page size.
    Hugetlb(PageSize),
    /// A memfd, hugetlb-backed with this page size if `Some`.
    Memfd(Option<PageSize>),
    /// A file; `hugetlbfs` if it lives on one.
    File {
        /// Whether the file is on hugetlbfs.
        hugetlbfs: bool,
    },
    /// Memory the caller mapped.
    Caller,
    /// A KVM guest_memfd, mapped (`GUEST_MEMFD_FLAG_MMAP`).
    GuestMemfd,
}

impl BackingKind {
    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            BackingKind::Anonymous => "anonymous",
            BackingKind::Hugetlb(_) => "hugetlb",
            BackingKind::Memfd(_) => "memfd",
            BackingKind::File { .. } => "file",
            BackingKind::Caller => "caller",
            BackingKind::GuestMemfd => "guest_memfd",
        }
    }
}

/// Host memory for one block: a reservation of `max_length` bytes that
/// never moves, of which the first `used_len` bytes are accessible.
///
/// Built with [`crate::MemoryBuilder`]. Dropping it unmaps the reservation
/// (never caller memory) and closes the backing file descriptor.
///
/// A region of it borrows it, so it can neither outlive the mapping:
///
/// ```compile_fail
/// use ramblock_core::{addr::ByteLen, host::HostMemory};
/// let r = {
///     let m = ramblock_linux::MemoryBuilder::anonymous(ByteLen(2 << 20)).build().unwrap();
///     m.region()
/// };
/// r.write(0, b"x").unwrap();
/// ```
///
/// nor survive a shrink that makes its tail inaccessible:
///
/// ```compile_fail
/// use ramblock_core::{addr::ByteLen, host::HostMemory};
/// let mut m = ramblock_linux::MemoryBuilder::anonymous(ByteLen(2 << 20))
///     .max_length(ByteLen(4 << 20))
///     .build()
///     .unwrap();
/// let r = m.region();
/// m.set_used_len(ByteLen(0)).unwrap();
/// r.write(0x1000, b"x").unwrap();
/// ```
pub struct LinuxMemory {
    pub(crate) base: NonNull<u8>,
    pub(crate) reserved: ByteLen,
    pub(crate) used: ByteLen,
    pub(crate) page_size: PageSize,
    pub(crate) kind: BackingKind,
    pub(crate) fd: Option<OwnedFd>,
    pub(crate) fd_offset: u64,
    pub(crate) shared: bool,
    pub(crate) read_only: bool,
    pub(crate) no_reserve: bool,
    /// Bytes unmapped on drop (reservation plus both guards), starting one
    /// guard before `base`; zero for caller memory.
    pub(crate) mapped_len: usize,
    /// The guard page's size before `base`.
    pub(crate) lead_guard: usize,
    pub(crate) lock: Option<LockMode>,
    /// Preallocation to apply to memory made accessible by growing.
    pub(crate) prealloc: Option<Prealloc>,
    pub(crate) flags: BlockFlags,
}

// SAFETY: LinuxMemory owns its mapping and file descriptor; the raw pointer
// is an address, and moving the value to another thread moves ownership.
unsafe impl Send for LinuxMemory {}
// SAFETY: `&self` methods only read fields and make system calls on the
// mapping (madvise, fallocate, mlock), which the kernel serialises; guest
// RAM itself is accessed through HostRegion, built for concurrent use.
unsafe impl Sync for LinuxMemory {}

impl fmt::Debug for LinuxMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinuxMemory")
            .field("kind", &self.kind)
            .field("base", &self.base)
            .field("reserved", &self.reserved)
            .field("used", &self.used)
            .field("page_size", &self.page_size)
            .field("shared", &self.shared)
            .field("read_only", &self.read_only)
            .field("fd", &self.fd)
            .field("fd_offset", &self.fd_offset)
            .finish()
    }
}

impl Drop for LinuxMemory {
    fn drop(&mut self) {
        if self.mapped_len > 0 {
            // SAFETY: the reservation is ours; dropping `self` ends every
            // borrow of it (regions must not outlive the memory).
            unsafe {
                mmap::unmap(
                    self.base.as_ptr().wrapping_sub(self.lead_guard),
                    self.mapped_len,
                )
            };
        }
    }
}

fn usize_of(len: ByteLen) -> usize {
    // Every length here was checked to fit usize when the memory was built.
    usize::try_from(len.0).unwrap_or(usize::MAX)
}

impl LinuxMemory {
    /// What backs the memory.
    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    /// The backing file descriptor (memfd or file), to share the memory with
    /// another process (vhost-user) together with [`LinuxMemory::fd_offset`].
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(AsFd::as_fd)
    }

    /// Where the memory starts in the backing file.
    pub fn fd_offset(&self) -> u64 {
        self.fd_offset
    }

    /// Whether the mapping is shared.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Whether the mapping is read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The block flags this memory implies (shared, no-reserve, read-only,
    /// named file, caller-preallocated, resizable); add the block's own
    /// (migratable, ...) when building its `BlockSpec`.
    pub fn flags(&self) -> BlockFlags {
        self.flags
    }

    /// The hugetlb pool behind the memory, if it is hugetlb-backed.
    pub fn hugetlb_page_size(&self) -> Option<PageSize> {
        (self.page_size > host_page_size()).then_some(self.page_size)
    }

    fn prot(&self) -> MprotectFlags {
        if self.read_only {
            MprotectFlags::READ
        } else {
            MprotectFlags::READ | MprotectFlags::WRITE
        }
    }

    fn at(&self, offset: ByteLen) -> *mut u8 {
        // Offsets passed here were checked to lie inside the reservation.
        self.base.as_ptr().wrapping_add(usize_of(offset))
    }

    /// Checks that `offset .. offset + len` is whole pages inside the used part.
    fn check_used_range(&self, offset: ByteLen, len: ByteLen) -> Result<(), Error> {
        for (what, value) in [("offset", offset), ("length", len)] {
            if !value.is_multiple_of(self.page_size) {
                return Err(Error::Unaligned {
                    what,
                    value: value.0,
                    page_size: self.page_size,
                });
            }
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.used => Ok(()),
            _ => Err(Error::OutOfRange {
                offset: offset.0,
                len: len.0,
                used: self.used.0,
            }),
        }
    }

    /// Faults in every page of the used part now, from `settings.threads`
    /// threads (default `min(cores, 16, size / 64 MiB)`).
    ///
    /// A hugetlb pool that runs dry gives [`Error::HugetlbPoolExhausted`],
    /// never a SIGBUS. Guest vCPUs may keep running: the touch fallback
    /// rewrites each page's first byte atomically, so no write is lost.
    pub fn preallocate(&self, settings: Prealloc) -> Result<(), Error> {
        self.preallocate_range(ByteLen::ZERO, self.used, settings)
    }

    /// [`LinuxMemory::preallocate`] for `offset .. offset + len` only.
    pub fn preallocate_range(
        &self,
        offset: ByteLen,
        len: ByteLen,
        settings: Prealloc,
    ) -> Result<(), Error> {
        self.check_used_range(offset, len)?;
        let range = prealloc::Range {
            start: self.at(offset) as usize,
            len: usize_of(len),
            page_size: self.page_size,
            huge: self.hugetlb_page_size(),
            no_reserve: self.no_reserve,
            writable: !self.read_only,
        };
        // SAFETY: the range is accessible guest RAM we own (checked above),
        // reached by Rust code only through raw pointers.
        unsafe { prealloc::preallocate(range, settings) }
    }

    /// Gives `hint` for the whole reservation (the used part, for caller
    /// memory, which has nothing beyond it).
    pub fn advise(&self, hint: Hint) -> Result<(), Error> {
        // SAFETY: hints do not change contents; the range is the block's.
        unsafe { advice::apply_hint(self.base.as_ptr(), usize_of(self.owned_len()), hint) }
    }

    /// The bytes this value may advise and bind: the reservation, or the
    /// used part of caller memory.
    fn owned_len(&self) -> ByteLen {
        if self.kind == BackingKind::Caller {
            self.used
        } else {
            self.reserved
        }
    }

    /// Locks the used part into RAM, and whatever growing adds later.
    pub fn lock(&mut self, mode: LockMode) -> Result<(), Error> {
        // SAFETY: the used part is accessible memory this value owns.
        unsafe { advice::lock(self.base.as_ptr(), usize_of(self.used), mode)? };
        self.lock = Some(mode);
        Ok(())
    }

    /// Undoes [`LinuxMemory::lock`].
    pub fn unlock(&mut self) -> Result<(), Error> {
        self.unlock_range(ByteLen::ZERO, self.used)?;
        self.lock = None;
        Ok(())
    }

    fn unlock_range(&self, offset: ByteLen, len: ByteLen) -> Result<(), Error> {
        if len.0 == 0 {
            return Ok(());
        }
        // SAFETY: unlocking does not change contents; the range is ours.
        unsafe { rustix::mm::munlock(self.at(offset).cast(), usize_of(len)) }.map_err(|e| {
            Error::sys(
                "munlock",
                format!("{len} at offset {offset}"),
                e,
                "the range must be mapped",
            )
        })
    }

    /// Binds the whole reservation to NUMA nodes (`mbind`); pages already
    /// faulted in are moved where the kernel can. On a single-node host any
    /// node but 0 gives [`Error::NoSuchNumaNode`].
    pub fn bind_numa(&self, binding: &NumaBinding) -> Result<(), Error> {
        // SAFETY: a memory policy does not change contents; the range is ours.
        unsafe { numa::bind(self.base.as_ptr(), usize_of(self.owned_len()), binding) }
    }

    /// Drops the contents of `offset .. offset + len` (inside the
    /// reservation). `zero` asks for the pages to read as zero afterwards,
    /// which for a private file mapping means punching the file too.
    fn release(&self, offset: ByteLen, len: ByteLen, zero: bool) -> Result<(), Error> {
        if len.0 == 0 {
            return Ok(());
        }
        let (ptr, n) = (self.at(offset), usize_of(len));
        let what = format!(
            "discarding {len} at offset {offset} of {} memory",
            self.kind.name()
        );
        if let Some(fd) = &self.fd {
            if zero || self.shared {
                rustix::fs::fallocate(
                    fd,
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                    self.fd_offset + offset.0,
                    len.0,
                )
                .map_err(|e| {
                    Error::sys(
                        "fallocate(PUNCH_HOLE)",
                        what.clone(),
                        e,
                        "the filesystem must support hole punching (tmpfs, hugetlbfs, ext4, xfs); EPERM means the file is sealed or append-only",
                    )
                })?;
            }
            if !self.shared {
                // Private copies of the pages still shadow the file.
                // SAFETY: the caller asked for these contents to go.
                unsafe {
                    advice::madvise(
                        ptr,
                        n,
                        Advice::LinuxDontNeed,
                        &what,
                        "the range must be mapped and unlocked",
                    )?
                };
            }
            return Ok(());
        }
        let advice = if self.shared {
            Advice::LinuxRemove
        } else {
            Advice::LinuxDontNeed
        };
        // SAFETY: the caller asked for these contents to go; the range is ours.
        unsafe {
            advice::madvise(
                ptr,
                n,
                advice,
                &what,
                "the range must be mapped, unlocked and (for MADV_REMOVE) shared memory that supports hole punching",
            )
        }
    }
}

// SAFETY: `base` is the start of a reservation (or the caller's mapping)
// that lives until drop and never moves; `set_used_len` keeps exactly
// `base .. base + used` accessible (writable unless read-only), and
// `reserved`/`page_size` never change after build.
unsafe impl HostMemory for LinuxMemory {
    type Error = Error;

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn base(&self) -> NonNull<u8> {
        self.base
    }

    fn reserved_len(&self) -> ByteLen {
        self.reserved
    }

    fn used_len(&self) -> ByteLen {
        self.used
    }

    fn page_size(&self) -> PageSize {
        self.page_size
    }

    fn set_used_len(&mut self, len: ByteLen) -> Result<(), Error> {
        if !len.is_multiple_of(self.page_size) {
            return Err(Error::Unaligned {
                what: "used length",
                value: len.0,
                page_size: self.page_size,
            });
        }
        if len > self.reserved {
            return Err(Error::TooLong {
                asked: len,
                reserved: self.reserved,
            });
        }
        if len == self.used {
            return Ok(());
        }
        if self.kind == BackingKind::Caller {
            return Err(Error::NotResizable {
                backing: self.kind.name(),
                used: self.used,
                asked: len,
            });
        }
        let old = self.used;
        if len > old {
            let grown = ByteLen(len.0 - old.0);
            // SAFETY: the tail is our reservation; nothing references it.
            unsafe { mmap::protect(self.at(old), usize_of(grown), self.prot())? };
            self.used = len;
            if let Some(mode) = self.lock {
                // SAFETY: the grown part is now accessible memory we own.
                unsafe { advice::lock(self.at(old), usize_of(grown), mode)? };
            }
            if let Some(settings) = self.prealloc {
                self.preallocate_range(old, grown, settings)?;
            }
        } else {
            let cut = ByteLen(old.0 - len.0);
            if self.lock.is_some() {
                self.unlock_range(len, cut)?;
            }
            // A file's contents are data that outlives the block; anonymous
            // and memfd memory beyond the used length is given back.
            let keep_file = matches!(self.kind, BackingKind::File { .. });
            let keep_contents = self.read_only || (keep_file && self.shared);
            if !keep_contents {
                self.release(len, cut, !keep_file)?;
            }
            // SAFETY: the block shrank, so no region may reference the tail.
            unsafe { mmap::protect(self.at(len), usize_of(cut), MprotectFlags::empty())? };
            self.used = len;
        }
        Ok(())
    }

    /// Private anonymous memory: its page tables say which pages were ever
    /// written. A memfd of base pages mapped shared: its file's holes do,
    /// for every mapping of it. Other memory cannot tell cheaply (shared
    /// anonymous memory can be written through other mappings, which this
    /// process's page tables do not show).
    fn untouched_runs(&self, first: u64, pages: u64, report: &mut dyn FnMut(u64, u64)) -> bool {
        let pages = pages.min((self.used.0 >> 12).saturating_sub(first));
        match (self.kind, &self.fd) {
            (BackingKind::Anonymous, _) if !self.shared => {
                let start = self.base.as_ptr() as usize + (first << 12) as usize;
                crate::pagemap::untouched_runs(start, pages, &mut |f, c| report(first + f, c))
                    .is_ok()
            }
            (BackingKind::Memfd(None), Some(fd)) if self.shared => crate::pagemap::hole_runs(
                fd.as_fd(),
                self.fd_offset + (first << 12),
                pages,
                &mut |f, c| report(first + f, c),
            )
            .is_ok(),
            _ => false,
        }
    }

    fn discard(&self, offset: ByteLen, len: ByteLen) -> Result<(), Error> {
        self.check_used_range(offset, len)?;
        if self.read_only {
            return Err(Error::ReadOnly { op: "discard" });
        }
        // Locked pages cannot be dropped (EINVAL): unlock, drop, relock.
        if self.lock.is_some() {
            self.unlock_range(offset, len)?;
        }
        self.release(offset, len, true)?;
        if let Some(mode) = self.lock {
            // SAFETY: the range is accessible memory we own.
            unsafe { advice::lock(self.at(offset), usize_of(len), mode)? };
        }
        Ok(())
    }

    fn sync(&self, offset: ByteLen, len: ByteLen) -> Result<(), Error> {
        if self.fd.is_none() || !self.shared || len.0 == 0 {
            return Ok(());
        }
        self.check_used_range(offset, len)?;
        // SAFETY: msync only writes back; the range is accessible and ours.
        unsafe {
            rustix::mm::msync(
                self.at(offset).cast(),
                usize_of(len),
                rustix::mm::MsyncFlags::SYNC,
            )
        }
        .map_err(|e| {
            Error::sys(
                "msync",
                format!("{len} at offset {offset}"),
                e,
                "the backing file's filesystem failed to write back; check its space and health",
            )
        })
    }
}
