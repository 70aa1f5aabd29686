//! Hugetlb pools: which sizes the host offers, how many pages are free, and
//! the size flags `mmap` and `memfd_create` take.
//!
//! Each pool lives under `/sys/kernel/mm/hugepages/hugepages-<N>kB/`; its
//! `free_hugepages` is what a new mapping can still get without faulting.

use crate::error::{Error, OptionsError};
use ramblock_core::addr::PageSize;
use rustix::fs::MemfdFlags;
use rustix::mm::MapFlags;
use std::path::PathBuf;

/// Where the kernel lists its hugepage pools.
pub const POOLS_DIR: &str = "/sys/kernel/mm/hugepages";

/// `f_type` that `fstatfs` reports for hugetlbfs.
pub const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Shift of the page-size field in `MAP_HUGE_*` and `MFD_HUGE_*`.
const HUGE_SHIFT: u32 = 26;

/// The sysfs directory of the pool of `page_size` pages.
pub fn pool_dir(page_size: PageSize) -> PathBuf {
    PathBuf::from(format!(
        "{POOLS_DIR}/hugepages-{}kB",
        page_size.bytes() >> 10
    ))
}

/// The hugepage sizes the host offers, in KiB, smallest first.
pub fn offered_sizes_kib() -> Vec<u64> {
    let mut sizes: Vec<u64> = std::fs::read_dir(POOLS_DIR)
        .map(|dir| {
            dir.filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_prefix("hugepages-")?
                    .strip_suffix("kB")?
                    .parse()
                    .ok()
            })
            .collect()
        })
        .unwrap_or_default();
    sizes.sort_unstable();
    sizes
}

/// Checks that the host has a pool of `page_size` pages.
pub fn check_offered(page_size: PageSize) -> Result<(), OptionsError> {
    let offered = offered_sizes_kib();
    if offered.contains(&(page_size.bytes() >> 10)) {
        Ok(())
    } else {
        Err(OptionsError::UnsupportedHugePageSize { page_size, offered })
    }
}

fn read_counter(page_size: PageSize, name: &str) -> Option<u64> {
    std::fs::read_to_string(pool_dir(page_size).join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Free pages in the pool (0 if the pool cannot be read).
pub fn free_pages(page_size: PageSize) -> u64 {
    read_counter(page_size, "free_hugepages").unwrap_or(0)
}

/// Pages in the pool, free or not (0 if the pool cannot be read).
pub fn total_pages(page_size: PageSize) -> u64 {
    read_counter(page_size, "nr_hugepages").unwrap_or(0)
}

/// Free pages that are not promised to an existing mapping's reservation.
pub fn unreserved_free_pages(page_size: PageSize) -> u64 {
    let reserved = read_counter(page_size, "resv_hugepages").unwrap_or(0);
    free_pages(page_size).saturating_sub(reserved)
}

/// The error for a pool that cannot back `bytes` more bytes.
pub fn exhausted(page_size: PageSize, bytes: u64, errno: Option<rustix::io::Errno>) -> Error {
    Error::HugetlbPoolExhausted {
        page_size,
        needed: bytes.div_ceil(page_size.bytes()),
        free: free_pages(page_size),
        pool: pool_dir(page_size),
        errno,
    }
}

/// `MAP_HUGETLB` with the size field for `page_size`.
pub fn map_flags(page_size: PageSize) -> MapFlags {
    MapFlags::HUGETLB | MapFlags::from_bits_retain(page_size.bytes().trailing_zeros() << HUGE_SHIFT)
}

/// `MFD_HUGETLB` with the size field for `page_size`.
pub fn memfd_flags(page_size: PageSize) -> MemfdFlags {
    MemfdFlags::HUGETLB
        | MemfdFlags::from_bits_retain(page_size.bytes().trailing_zeros() << HUGE_SHIFT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_flags_match_the_kernel_constants() {
        assert_eq!(
            map_flags(PageSize::SIZE_2M),
            MapFlags::HUGETLB | MapFlags::HUGE_2MB
        );
        assert_eq!(
            map_flags(PageSize::SIZE_1G),
            MapFlags::HUGETLB | MapFlags::HUGE_1GB
        );
        assert_eq!(
            memfd_flags(PageSize::SIZE_2M),
            MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB
        );
        assert_eq!(
            memfd_flags(PageSize::SIZE_1G),
            MemfdFlags::HUGETLB | MemfdFlags::HUGE_1GB
        );
        assert!(pool_dir(PageSize::SIZE_2M).ends_with("hugepages-2048kB"));
    }
}

/// Serialises changes to host-wide state (hugepage pools, hugetlbfs mounts)
/// across threads and processes: an exclusive `flock` on
/// [`HOST_STATE_LOCK`], held while the guard lives. Test runners that run
/// each test in its own process (nextest) make a process-local mutex useless.
#[derive(Debug)]
pub struct HostStateLock(#[allow(dead_code)] std::fs::File);

/// The file [`HostStateLock`] locks.
pub const HOST_STATE_LOCK: &str = "/tmp/ramblock-host-state.lock";

impl HostStateLock {
    /// Waits for the lock.
    pub fn take() -> std::io::Result<HostStateLock> {
        let file = std::fs::File::create(HOST_STATE_LOCK)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
        Ok(HostStateLock(file))
    }
}

/// Why a pool could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The host has no pool of this size.
    #[error("the host has no {page_size} hugepage pool ({dir})")]
    NoPool {
        /// The page size.
        page_size: PageSize,
        /// The pool's directory.
        dir: String,
    },
    /// The pool size could not be changed (not root?) or the lock taken.
    #[error("cannot change {what} (need root): {source}")]
    Io {
        /// The file.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The kernel gave fewer pages than asked.
    #[error("asked the kernel for {want} {page_size} hugepages but only {free} are free: memory is too fragmented or too small")]
    TooFew {
        /// The page size.
        page_size: PageSize,
        /// The pool size asked for.
        want: u64,
        /// Free pages after asking.
        free: u64,
    },
}

/// A change to a hugepage pool, undone when dropped (also when a test
/// fails): the pool's size is restored. Holds the [`HostStateLock`].
#[derive(Debug)]
pub struct PoolReservation {
    page_size: PageSize,
    original: u64,
    _lock: HostStateLock,
}

impl PoolReservation {
    fn lock_pool(page_size: PageSize) -> Result<(HostStateLock, PathBuf), PoolError> {
        let lock = HostStateLock::take().map_err(|source| PoolError::Io {
            what: HOST_STATE_LOCK.into(),
            source,
        })?;
        let dir = pool_dir(page_size);
        if !dir.exists() {
            return Err(PoolError::NoPool {
                page_size,
                dir: dir.display().to_string(),
            });
        }
        Ok((lock, dir.join("nr_hugepages")))
    }

    fn set(file: &std::path::Path, pages: u64) -> Result<(), PoolError> {
        std::fs::write(file, pages.to_string()).map_err(|source| PoolError::Io {
            what: file.display().to_string(),
            source,
        })
    }

    /// Grows the pool until at least `pages` pages of `page_size` are free.
    pub fn reserve(page_size: PageSize, pages: u64) -> Result<PoolReservation, PoolError> {
        let (lock, file) = Self::lock_pool(page_size)?;
        let original = total_pages(page_size);
        let reservation = PoolReservation {
            page_size,
            original,
            _lock: lock,
        };
        let free = unreserved_free_pages(page_size);
        if free < pages {
            let want = original + (pages - free);
            Self::set(&file, want)?;
            let free = unreserved_free_pages(page_size);
            if free < pages {
                return Err(PoolError::TooFew {
                    page_size,
                    want,
                    free,
                });
            }
        }
        Ok(reservation)
    }

    /// Shrinks the pool so that no page is free (the exhausted case).
    pub fn empty(page_size: PageSize) -> Result<PoolReservation, PoolError> {
        let (lock, file) = Self::lock_pool(page_size)?;
        let original = total_pages(page_size);
        let reservation = PoolReservation {
            page_size,
            original,
            _lock: lock,
        };
        Self::set(&file, original - free_pages(page_size))?;
        Ok(reservation)
    }
}

impl Drop for PoolReservation {
    fn drop(&mut self) {
        let _ = Self::set(
            &pool_dir(self.page_size).join("nr_hugepages"),
            self.original,
        );
    }
}
