//! The reservation: one aligned range of address space per block, mapped
//! once over its whole `max_length`, with a guard page after it.
//!
//! The sequence is QEMU's `qemu_ram_mmap`: reserve `max + align + 2 guards`
//! bytes `PROT_NONE`, trim the range to an aligned start with one guard page
//! before it and one after the end (QEMU keeps only the one after; the
//! one before also keeps the kernel from merging the block's mapping with
//! an unrelated neighbour), then map the real
//! memory (anonymous, hugetlb or a file) over it with `MAP_FIXED`, still
//! `PROT_NONE`. Only the used part is then made accessible with `mprotect`,
//! so growing never moves the block and shrinking makes the tail fault again.
#![allow(unsafe_code)]

use crate::error::Error;
use crate::hugetlb;
use ramblock_core::addr::PageSize;
use rustix::fd::BorrowedFd;
use rustix::io::Errno;
use rustix::mm::{MapFlags, MprotectFlags, ProtFlags};
use std::ffi::c_void;
use std::ptr::NonNull;

/// What to map over the reservation.
#[derive(Copy, Clone, Debug)]
pub(crate) enum Source<'a> {
    /// Anonymous memory.
    Anonymous,
    /// A file (memfd, hugetlbfs or regular) from `offset`.
    Fd(BorrowedFd<'a>, u64),
}

/// How to map it.
#[derive(Copy, Clone, Debug)]
pub(crate) struct MapSpec<'a> {
    pub source: Source<'a>,
    pub shared: bool,
    pub no_reserve: bool,
    /// Anonymous hugetlb pages of this size (`MAP_HUGETLB`).
    pub huge: Option<PageSize>,
    /// The hugetlb pool behind the mapping (anonymous, memfd or
    /// hugetlbfs), for naming it when the mapping fails.
    pub pool: Option<PageSize>,
}

/// The host's base page size.
pub fn host_page_size() -> PageSize {
    // The kernel's page size is always a valid PageSize on hosts Rust runs on.
    PageSize::new(rustix::param::page_size() as u64).unwrap_or(PageSize::SIZE_4K)
}

/// Reserves `len` bytes aligned to `align` with a `guard`-byte `PROT_NONE`
/// page before and after them, and maps `spec` over the `len` bytes,
/// `PROT_NONE`. Returns the aligned start; the caller owns
/// `start - guard .. start + len + guard`.
pub(crate) fn reserve_and_map(
    len: usize,
    align: usize,
    guard: usize,
    spec: MapSpec<'_>,
) -> Result<NonNull<u8>, Error> {
    let total = len
        .checked_add(align)
        .and_then(|t| t.checked_add(2 * guard))
        .ok_or(Errno::NOMEM)
        .map_err(|e| {
            Error::sys(
                "mmap",
                format!("a reservation of {len:#x} bytes"),
                e,
                "the length does not fit the address space; lower max_length",
            )
        })?;
    // SAFETY: a fresh PROT_NONE mapping at an address the kernel picks
    // cannot alias any existing Rust object.
    let raw = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            total,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }
    .map_err(|e| {
        Error::sys(
            "mmap",
            format!("reserving {total:#x} bytes of address space"),
            e,
            "raise the address-space limit (ulimit -v) or lower max_length",
        )
    })?;
    let raw_addr = raw as usize;
    let start = (raw_addr + guard).next_multiple_of(align);
    let head = start - guard - raw_addr;
    let tail_start = start + len + guard;
    let tail = raw_addr + total - tail_start;
    // SAFETY: both ranges lie inside the reservation made above, which
    // nothing else uses yet; trimming them leaves `start .. tail_start`.
    unsafe {
        if head > 0 {
            let _ = rustix::mm::munmap(raw, head);
        }
        if tail > 0 {
            let _ = rustix::mm::munmap(tail_start as *mut c_void, tail);
        }
    }
    let mut flags = MapFlags::FIXED;
    flags |= if spec.shared {
        MapFlags::SHARED
    } else {
        MapFlags::PRIVATE
    };
    if spec.no_reserve {
        flags |= MapFlags::NORESERVE;
    }
    if let Some(page) = spec.huge {
        flags |= hugetlb::map_flags(page);
    }
    let at = start as *mut c_void;
    let mapped = match spec.source {
        // SAFETY: MAP_FIXED over the first `len` bytes of our own
        // reservation, which holds no Rust objects.
        Source::Anonymous => unsafe {
            rustix::mm::mmap_anonymous(at, len, ProtFlags::empty(), flags)
        },
        // SAFETY: as above; the kernel keeps its own reference to the file.
        Source::Fd(fd, offset) => unsafe {
            rustix::mm::mmap(at, len, ProtFlags::empty(), flags, fd, offset)
        },
    };
    if let Err(e) = mapped {
        // SAFETY: the trimmed reservation is ours and unused.
        let _ = unsafe { rustix::mm::munmap((start - guard) as *mut c_void, len + 2 * guard) };
        return Err(match (spec.pool, e) {
            (Some(page), Errno::NOMEM) => hugetlb::exhausted(page, len as u64, Some(e)),
            _ => Error::sys(
                "mmap",
                format!("{len:#x} bytes of {spec:?}"),
                e,
                "check the memory limits (ulimit -v, overcommit) and, for files, that the file may be mapped this way",
            ),
        });
    }
    // A successful mmap never returns null.
    NonNull::new(at.cast()).ok_or(Error::sys(
        "mmap",
        "the reservation",
        Errno::FAULT,
        "the kernel returned a null mapping",
    ))
}

/// Sets the protection of `ptr .. ptr + len`.
///
/// # Safety
/// The range must be part of a mapping this crate owns, and no Rust
/// reference may point into a range that loses access.
pub(crate) unsafe fn protect(ptr: *mut u8, len: usize, prot: MprotectFlags) -> Result<(), Error> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: the caller guarantees the range is ours and unreferenced.
    unsafe { rustix::mm::mprotect(ptr.cast(), len, prot) }.map_err(|e| {
        Error::sys(
            "mprotect",
            format!("{len:#x} bytes at {ptr:p}"),
            e,
            "the memory may be locked beyond RLIMIT_MEMLOCK or the commit limit reached; check ulimit -l and vm.overcommit_memory",
        )
    })
}

/// Unmaps `ptr .. ptr + len`.
///
/// # Safety
/// The range must be a mapping this crate owns and nothing may use it after.
pub(crate) unsafe fn unmap(ptr: *mut u8, len: usize) {
    // SAFETY: guaranteed by the caller. A failure here (EINVAL) would mean a
    // broken invariant; there is nothing useful to do with it in Drop.
    let _ = unsafe { rustix::mm::munmap(ptr.cast(), len) };
}
