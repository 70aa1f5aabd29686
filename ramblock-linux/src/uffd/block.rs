//! [`RegisteredBlock`]: a block's [`LinuxMemory`] registered on a
//! [`Userfaultfd`], placed into by block offset with bounds checked, so
//! that placing is safe. It borrows the memory, so the compiler refuses a
//! placement after the memory is dropped or resized:
//!
//! ```compile_fail
//! use ramblock_core::addr::ByteLen;
//! use ramblock_linux::uffd::{RegisterMode, Userfaultfd};
//! use ramblock_linux::MemoryBuilder;
//!
//! let uffd = Userfaultfd::new().unwrap();
//! let mem = MemoryBuilder::anonymous(ByteLen(2 << 20)).build().unwrap();
//! let block = uffd.register_memory(&mem, RegisterMode::MISSING).unwrap();
//! drop(mem); // error: `mem` is still borrowed by `block`
//! block.place(&uffd, 0, &[0u8; 4096]).unwrap();
//! ```
//!
//! ```compile_fail
//! use ramblock_core::addr::ByteLen;
//! use ramblock_core::host::HostMemory;
//! use ramblock_linux::uffd::{RegisterMode, Userfaultfd};
//! use ramblock_linux::MemoryBuilder;
//!
//! let uffd = Userfaultfd::new().unwrap();
//! let mut mem = MemoryBuilder::anonymous(ByteLen(4 << 20)).build().unwrap();
//! let block = uffd.register_memory(&mem, RegisterMode::MISSING).unwrap();
//! mem.set_used_len(ByteLen(2 << 20)).unwrap(); // error: borrowed by `block`
//! block.place(&uffd, 3 << 20, &[0u8; 4096]).unwrap();
//! ```

use super::{Features, Fill, Ioctls, Placed, RegisterMode, UffdError, Userfaultfd};
use crate::memory::{BackingKind, LinuxMemory};
use crate::mmap::host_page_size;
use ramblock_core::addr::PageSize;
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use rustix::mm::{MapFlags, ProtFlags};
use std::marker::PhantomData;
use std::sync::Mutex;

/// How userfaultfd treats a backing.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Class {
    /// Private anonymous memory: missing and write-protect faults.
    PrivateAnonymous,
    /// shmem (shared anonymous memory, memfd): also minor faults.
    Shmem,
    /// hugetlb: whole hugepages, no zero page, also minor faults.
    Hugetlb,
    /// A file or caller memory: the kernel decides.
    Unknown,
    /// Memory userfaultfd cannot register at all.
    Refused(&'static str),
}

fn classify(mem: &LinuxMemory) -> (Class, &'static str) {
    match mem.kind() {
        BackingKind::Anonymous if mem.is_shared() => (Class::Shmem, "shared anonymous"),
        BackingKind::Anonymous => (Class::PrivateAnonymous, "private anonymous"),
        BackingKind::Hugetlb(_) => (Class::Hugetlb, "hugetlb"),
        BackingKind::Memfd(Some(_)) => (Class::Hugetlb, "hugetlb memfd"),
        BackingKind::Memfd(None) => (Class::Shmem, "memfd"),
        BackingKind::File { hugetlbfs: true } => (Class::Hugetlb, "hugetlbfs file"),
        BackingKind::File { hugetlbfs: false } => (Class::Unknown, "file"),
        BackingKind::Caller => (Class::Unknown, "caller"),
        BackingKind::GuestMemfd => (
            Class::Refused(
                "userfaultfd does not support guest_memfd memory (the kernel refuses to register its mappings): migrate it with pre-copy",
            ),
            "guest_memfd",
        ),
    }
}

/// Checks `mode` against the memory's backing and the descriptor's features.
fn check_mode(uffd: &Userfaultfd, mem: &LinuxMemory, mode: RegisterMode) -> Result<(), UffdError> {
    let (class, backing) = classify(mem);
    let unsupported = |why| UffdError::ModeUnsupported { mode, backing, why };
    let need = |feature: Features, needed_for| {
        if uffd.features().contains(feature) {
            Ok(())
        } else {
            Err(UffdError::FeatureMissing {
                missing: feature,
                offered: uffd.offered_features(),
                needed_for,
            })
        }
    };
    if let Class::Refused(why) = class {
        return Err(unsupported(why));
    }
    if mode.is_empty() {
        return Err(unsupported(
            "no mode was given: ask for MISSING, MINOR and/or WRITE_PROTECT",
        ));
    }
    if mode.contains(RegisterMode::MISSING) {
        match class {
            Class::Shmem => need(Features::MISSING_SHMEM, "missing faults on shared memory")?,
            Class::Hugetlb => need(
                Features::MISSING_HUGETLBFS,
                "missing faults on hugetlb memory",
            )?,
            // Refused ones returned above.
            Class::PrivateAnonymous | Class::Unknown | Class::Refused(_) => {}
        }
    }
    if mode.contains(RegisterMode::MINOR) {
        match class {
            Class::PrivateAnonymous => {
                return Err(unsupported(
                    "minor faults happen only on memory with a page cache: back the block with a memfd, shared memory or hugetlb",
                ))
            }
            Class::Unknown | Class::Refused(_) => {}
            _ if !mem.is_shared() => {
                return Err(unsupported(
                    "minor faults need a shared mapping: the page cache is filled through another mapping, which a private one never sees",
                ))
            }
            Class::Shmem => need(Features::MINOR_SHMEM, "minor faults on shared memory")?,
            Class::Hugetlb => need(Features::MINOR_HUGETLBFS, "minor faults on hugetlb memory")?,
        }
    }
    if mode.contains(RegisterMode::WRITE_PROTECT) {
        if mem.is_read_only() {
            return Err(unsupported(
                "a read-only mapping never takes write faults: map it writable",
            ));
        }
        need(Features::PAGEFAULT_FLAG_WP, "write-protect faults")?;
        if matches!(class, Class::Shmem | Class::Hugetlb) {
            need(
                Features::WP_HUGETLBFS_SHMEM,
                "write-protect on shared or hugetlb memory",
            )?;
        }
    }
    Ok(())
}

/// Whether every byte is zero (OR-folds 64-byte chunks, which vectorizes).
fn is_zero(data: &[u8]) -> bool {
    let chunks = data.chunks_exact(64);
    let tail = chunks.remainder();
    chunks
        .chain(std::iter::once(tail))
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// Bytes of zeros copied per `UFFDIO_COPY` where there is no zero page:
/// one 2 MiB hugepage, many base pages.
const ZERO_CHUNK: usize = 2 << 20;

/// How many bytes of zeros to copy at a time into pages of `page_size`: a
/// whole number of pages, at least [`ZERO_CHUNK`] unless one page is more.
fn zero_chunk(page_size: PageSize) -> usize {
    // Page sizes are powers of two up to 1 GiB, so either divides the other.
    (page_size.bytes() as usize).max(ZERO_CHUNK)
}

/// `len` bytes of zeros to copy from, valid for the life of the process.
///
/// A private anonymous read-only mapping that is never written reads as
/// the kernel's shared zero page: it costs page tables (4 KiB per 2 MiB),
/// not memory. Mappings are made on first use, one per size asked for (in
/// practice 2 MiB, and 1 GiB if 1 GiB hugetlb blocks are zero-filled) and
/// kept, because another thread may be copying from them at any time.
fn zeros(len: usize) -> Result<&'static [u8], UffdError> {
    /// (address, length) of each mapping made.
    static MAPPINGS: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
    // The list only grows by whole entries; a panic cannot leave it torn.
    let mut mappings = MAPPINGS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let found = mappings.iter().copied().find(|&(_, n)| n >= len);
    let addr = match found {
        Some((addr, _)) => addr,
        None => {
            // SAFETY: a fresh mapping at an address the kernel picks
            // aliases nothing; it is read-only and never unmapped.
            let ptr = unsafe {
                rustix::mm::mmap_anonymous(
                    std::ptr::null_mut(),
                    len,
                    ProtFlags::READ,
                    MapFlags::PRIVATE | MapFlags::NORESERVE,
                )
            }
            .map_err(|errno| {
                UffdError::sys(
                    "mmap",
                    format!("mapping {len:#x} bytes of zeros to copy into hugetlb pages"),
                    errno,
                    "the address space is exhausted or limited (ulimit -v)",
                )
            })?;
            // Map the zero page everywhere now. UFFDIO_COPY reads its
            // source with page faults disabled; on a source page not yet
            // mapped it falls back to copying into a temporary page first,
            // which on hugetlb memory is a second hugepage from the pool
            // (ENOMEM when the pool holds only what the block needs).
            for at in (0..len).step_by(host_page_size().bytes() as usize) {
                // SAFETY: inside the readable mapping just made.
                let _ = unsafe { std::ptr::read_volatile((ptr as *const u8).add(at)) };
            }
            mappings.push((ptr as usize, len));
            ptr as usize
        }
    };
    // SAFETY: `addr .. addr + len` lies in a read-only mapping that is
    // never written or unmapped, so it reads as zeros for 'static.
    Ok(unsafe { std::slice::from_raw_parts(addr as *const u8, len) })
}

/// A block's used memory registered on a [`Userfaultfd`], made by
/// [`Userfaultfd::register_memory`] (or found again by
/// [`Userfaultfd::registered`]).
///
/// It covers the used length at registration: after growing the block,
/// register the new tail (or the whole block) again. It borrows the
/// memory (`'m`), which therefore stays mapped and cannot shrink while the
/// block is used.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RegisteredBlock<'m> {
    base: usize,
    len: usize,
    page_size: PageSize,
    ioctls: Ioctls,
    mode: RegisterMode,
    memory: PhantomData<&'m LinuxMemory>,
}

impl Userfaultfd {
    /// Registers the used part of `mem` for `mode` and returns the block
    /// to place pages into.
    ///
    /// `MISSING` works on every backing userfaultfd supports (shared memory
    /// and hugetlb need [`Features::MISSING_SHMEM`] /
    /// [`Features::MISSING_HUGETLBFS`]); `MINOR` only on shared memfd,
    /// shared anonymous or shared hugetlb memory with
    /// [`Features::MINOR_SHMEM`] / [`Features::MINOR_HUGETLBFS`];
    /// `WRITE_PROTECT` needs [`Features::PAGEFAULT_FLAG_WP`] (and
    /// [`Features::WP_HUGETLBFS_SHMEM`] off private anonymous memory).
    /// Anything else is [`UffdError::ModeUnsupported`] or
    /// [`UffdError::FeatureMissing`], before any system call.
    pub fn register_memory<'m>(
        &self,
        mem: &'m LinuxMemory,
        mode: RegisterMode,
    ) -> Result<RegisteredBlock<'m>, UffdError> {
        check_mode(self, mem, mode)?;
        let base = mem.base().as_ptr() as usize;
        // The used length fits the address space: it is mapped.
        let len = usize::try_from(mem.used_len().0).unwrap_or(usize::MAX);
        let page_size = mem.page_size();
        // The range is `mem`'s used part: guest RAM, which Rust code reaches
        // only through copies (HostRegion), so the kernel filling its
        // missing pages breaks no borrow.
        let ioctls = self.register_range(base, len, mode, page_size)?;
        Ok(RegisteredBlock {
            base,
            len,
            page_size,
            ioctls,
            mode,
            memory: PhantomData,
        })
    }

    /// The registration [`Userfaultfd::register_memory`] made for `mem`, as
    /// long as this descriptor still holds one starting at or before its
    /// base (`None` otherwise), covering at most its current used length.
    ///
    /// This is for a registration that outlives any one borrow of the
    /// memory, such as a post-copy destination's whose blocks sit in a
    /// block list: register once, then borrow the block (under the list's
    /// read lock, which keeps it from being resized or removed) for each
    /// placement. The record is this descriptor's own; if the memory was
    /// unmapped since, the kernel refuses placements there.
    pub fn registered<'m>(&self, mem: &'m LinuxMemory) -> Option<RegisteredBlock<'m>> {
        let base = mem.base().as_ptr() as usize;
        let used = usize::try_from(mem.used_len().0).unwrap_or(usize::MAX);
        let record = self.registry.find(base, 1)?;
        if record.page_size != mem.page_size() {
            return None;
        }
        let len = (record.end - base).min(used);
        (len > 0).then_some(RegisteredBlock {
            base,
            len,
            page_size: record.page_size,
            ioctls: record.ioctls,
            mode: record.mode,
            memory: PhantomData,
        })
    }
}

impl RegisteredBlock<'_> {
    /// The block's first byte.
    pub fn base(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// The registered length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the registered length is zero (never: registration needs a page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The placement unit: the host page, or the hugepage size.
    pub fn page_size(&self) -> usize {
        self.page_size.bytes() as usize
    }

    /// The ioctls the kernel supports on the range.
    pub fn ioctls(&self) -> Ioctls {
        self.ioctls
    }

    /// The mode it was registered for.
    pub fn mode(&self) -> RegisterMode {
        self.mode
    }

    /// Whether zero pages can be placed without copying (`UFFDIO_ZEROPAGE`;
    /// never on hugetlb memory).
    pub fn supports_zeropage(&self) -> bool {
        self.ioctls.contains(Ioctls::ZEROPAGE)
    }

    /// The block flags the registration earns: `UFFD_ZEROPAGE` when zero
    /// pages can be placed, `UFFD_WRITE_PROTECT` when registered for
    /// write-protect.
    pub fn block_flags(&self) -> BlockFlags {
        let mut flags = BlockFlags::empty();
        if self.supports_zeropage() {
            flags |= BlockFlags::UFFD_ZEROPAGE;
        }
        if self.mode.contains(RegisterMode::WRITE_PROTECT)
            && self.ioctls.contains(Ioctls::WRITEPROTECT)
        {
            flags |= BlockFlags::UFFD_WRITE_PROTECT;
        }
        flags
    }

    /// Whether a fault address lies in the block.
    pub fn contains(&self, addr: u64) -> bool {
        let base = self.base as u64;
        addr >= base && addr - base < self.len as u64
    }

    /// The block offset of the page holding a fault address, rounded down
    /// to [`RegisteredBlock::page_size`]; `None` outside the block.
    pub fn offset_of(&self, addr: u64) -> Option<u64> {
        if !self.contains(addr) {
            return None;
        }
        let offset = addr - self.base as u64;
        Some(offset - offset % self.page_size.bytes())
    }

    /// Places one page of `data` at block `offset` and wakes the threads
    /// waiting on it. `offset` must be a multiple of
    /// [`RegisteredBlock::page_size`] inside the block and `data` exactly
    /// one page; anything else is a typed error and nothing is placed. A
    /// page of zeros is placed with `UFFDIO_ZEROPAGE` where the range
    /// supports it, else copied. A page already there is
    /// [`Placed::AlreadyPresent`] and keeps its contents.
    pub fn place(&self, uffd: &Userfaultfd, offset: u64, data: &[u8]) -> Result<Placed, UffdError> {
        let page = self.page_size.bytes();
        if data.len() as u64 != page {
            return Err(UffdError::WrongLength {
                len: data.len() as u64,
                page_size: self.page_size,
            });
        }
        if self.supports_zeropage() && is_zero(data) {
            self.zero_run(uffd, offset, page)
        } else {
            self.place_run(uffd, offset, data)
        }
    }

    /// Places `data`, a run of whole pages, at block `offset` with one
    /// `UFFDIO_COPY` and wakes the threads waiting anywhere in it.
    ///
    /// `offset` must be a multiple of [`RegisteredBlock::page_size`],
    /// `data` a non-empty whole number of pages, and the run inside the
    /// block; anything else is a typed error ([`UffdError::Unaligned`],
    /// [`UffdError::EmptyRange`], [`UffdError::OutOfRange`],
    /// [`UffdError::SourceRegistered`]) and nothing is placed.
    ///
    /// Pages of the run that are already present keep their contents: the
    /// kernel stops at the first one (`EEXIST`), which is stepped over
    /// (its waiters woken) and the copy resumed after it, so the call ends
    /// with every page of the run present and returns
    /// [`Placed::AlreadyPresent`]. That costs one more ioctl per present
    /// page; a run that is all missing takes exactly one.
    ///
    /// `data` should be memory this process has touched (a receive buffer
    /// is): the kernel reads it with page faults disabled, and a source
    /// page not mapped yet sends it down a slower path that copies through
    /// a temporary page, on hugetlb memory a spare hugepage from the pool.
    pub fn place_run(
        &self,
        uffd: &Userfaultfd,
        offset: u64,
        data: &[u8],
    ) -> Result<Placed, UffdError> {
        let dst = self.run_start("place_run", offset, data.len() as u64)?;
        let src = data.as_ptr() as usize;
        if uffd.registry.overlaps(src, src + data.len()) {
            return Err(UffdError::SourceRegistered {
                src: src as u64,
                len: data.len() as u64,
            });
        }
        // SAFETY: `dst .. dst + data.len()` is whole pages inside the block
        // (run_start), whose memory `self` borrows, so it is still mapped
        // and at least `len` long. The kernel places pages only into ranges
        // registered on `uffd` and only where no page is yet (EEXIST
        // otherwise), so a block that was unregistered or registered
        // elsewhere gets an error, not a write. The block is guest RAM,
        // reached only through raw pointers, so filling a missing page
        // breaks no Rust borrow. The source is `data`, outside registered
        // memory (checked above).
        unsafe {
            uffd.fill(
                Fill::Copy(data.as_ptr()),
                dst,
                data.len(),
                self.page_size,
                true,
            )
        }
    }

    /// Places `len` bytes of zero pages at block `offset` and wakes the
    /// threads waiting in them; offset and length are checked as for
    /// [`RegisteredBlock::place_run`], and present pages keep their
    /// contents in the same way.
    ///
    /// Where the range supports it ([`RegisteredBlock::supports_zeropage`])
    /// this is one `UFFDIO_ZEROPAGE`, which maps the shared zero page on
    /// anonymous memory (no memory used until written). Elsewhere
    /// (hugetlb) zeros are copied with `UFFDIO_COPY`, from a read-only
    /// mapping of zeros made once per process and never written, so it
    /// costs address space and page tables, not memory: one ioctl per
    /// 2 MiB, or per page where pages are larger.
    pub fn zero_run(&self, uffd: &Userfaultfd, offset: u64, len: u64) -> Result<Placed, UffdError> {
        let dst = self.run_start("zero_run", offset, len)?;
        // In bounds: the run is no longer than the block, a usize.
        let len = len as usize;
        if self.supports_zeropage() && self.page_size <= host_page_size() {
            // SAFETY: as in place_run: whole pages inside the block, which
            // the kernel fills only where missing and only if registered.
            return unsafe { uffd.fill(Fill::Zero, dst, len, self.page_size, true) };
        }
        let chunk = zero_chunk(self.page_size);
        let zeros = zeros(chunk)?;
        let mut placed = Placed::Placed;
        let mut done = 0;
        while done < len {
            let n = chunk.min(len - done);
            // SAFETY: as in place_run; `n` is whole pages (the chunk is a
            // multiple of the page size, and so is the run). The source is
            // `n` readable bytes of the zero mapping, which is never
            // registered (this module maps it for itself).
            let result = unsafe {
                uffd.fill(
                    Fill::Copy(zeros.as_ptr()),
                    dst + done,
                    n,
                    self.page_size,
                    true,
                )
            }?;
            if result == Placed::AlreadyPresent {
                placed = Placed::AlreadyPresent;
            }
            done += n;
        }
        Ok(placed)
    }

    /// The address of the run `offset .. offset + len` for `op`, after
    /// checking that it is a non-empty run of whole pages in the block.
    fn run_start(&self, op: &'static str, offset: u64, len: u64) -> Result<usize, UffdError> {
        let page = self.page_size.bytes();
        if len == 0 {
            return Err(UffdError::EmptyRange { op });
        }
        for (what, value) in [("block offset", offset), ("run length", len)] {
            if value % page != 0 {
                return Err(UffdError::Unaligned {
                    what,
                    value,
                    page_size: self.page_size,
                });
            }
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.len as u64)
        {
            return Err(UffdError::OutOfRange {
                offset,
                len,
                block_len: self.len as u64,
            });
        }
        // In bounds: the offset is below the block's length, a usize.
        Ok(self.base + offset as usize)
    }

    /// Unregisters the block from `uffd`.
    pub fn unregister(&self, uffd: &Userfaultfd) -> Result<(), UffdError> {
        uffd.unregister(self.base(), self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_sees_every_byte() {
        let mut page = vec![0u8; 4096 + 7];
        assert!(is_zero(&page));
        for i in [0, 63, 64, 4095, 4096, 4102] {
            page[i] = 1;
            assert!(!is_zero(&page), "byte {i}");
            page[i] = 0;
        }
        assert!(is_zero(&[]));
    }
}
