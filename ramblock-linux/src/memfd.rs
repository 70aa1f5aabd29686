//! memfd: anonymous memory with a file descriptor, so another process
//! (vhost-user, a migration helper) can map the same pages.
//!
//! The file is sized once to `max_length` and then sealed against growing
//! and shrinking, so no process holding the descriptor can truncate guest
//! RAM out from under the mapping (which would SIGBUS the VMM).

use crate::error::Error;
use crate::hugetlb;
use ramblock_core::addr::PageSize;
use rustix::fd::OwnedFd;
use rustix::fs::{MemfdFlags, SealFlags};

/// Creates a memfd named `name` of `size` bytes, hugetlb-backed if `huge`,
/// sealed against size changes.
pub(crate) fn create(name: &str, size: u64, huge: Option<PageSize>) -> Result<OwnedFd, Error> {
    let mut flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    if let Some(page) = huge {
        flags |= hugetlb::memfd_flags(page);
    }
    let fd = rustix::fs::memfd_create(name, flags).map_err(|e| {
        Error::sys(
            "memfd_create",
            format!("memfd {name:?} ({flags:?})"),
            e,
            "memfd needs Linux 3.17 (hugetlb memfd 4.14, sealing hugetlb 4.16); EMFILE means raise ulimit -n",
        )
    })?;
    rustix::fs::ftruncate(&fd, size).map_err(|e| {
        Error::sys(
            "ftruncate",
            format!("sizing memfd {name:?} to {size:#x} bytes"),
            e,
            "the size must be a whole number of the memfd's pages and fit the tmpfs/hugetlbfs limits",
        )
    })?;
    seal_size(&fd, name)?;
    Ok(fd)
}

/// Seals `fd` against growing and shrinking.
pub(crate) fn seal_size(fd: &OwnedFd, name: &str) -> Result<(), Error> {
    rustix::fs::fcntl_add_seals(fd, SealFlags::GROW | SealFlags::SHRINK).map_err(|e| {
        Error::sys(
            "fcntl(F_ADD_SEALS)",
            format!("sealing memfd {name:?} against grow/shrink"),
            e,
            "the memfd must be created with MFD_ALLOW_SEALING (hugetlb memfds need Linux 4.16)",
        )
    })
}
