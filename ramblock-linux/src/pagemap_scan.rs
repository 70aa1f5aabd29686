//! The `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` (Linux 6.7): which
//! pages of a range are in a category, in one system call that returns
//! ranges rather than one 8-byte entry per page, and optionally
//! write-protects the pages it reports in the same call.
//!
//! Only what the uffd-wp dirty log needs is wrapped: [`Pagemap::scan_written`] with
//! the [`PAGE_IS_WRITTEN`] category ("not write-protected by userfaultfd
//! since it was protected"), with or without re-protection
//! (`PM_SCAN_WP_MATCHING`), and always with `PM_SCAN_CHECK_WPASYNC`, so the
//! kernel refuses (`EPERM`) a range that is not registered for asynchronous
//! write-protect instead of silently reporting every page of it as written.
//!
//! **Why the scan is safe.** The kernel writes to two places: the argument
//! struct (ours) and the output vector, whose address and length come from
//! a `&mut [PageRegion]` and nothing else. The scanned range is only read
//! (page tables), and with re-protection the kernel changes protection, not
//! contents, and only in ranges registered for asynchronous write-protect
//! (checked by the kernel: `PM_SCAN_CHECK_WPASYNC`), where a write to a
//! protected page is resolved by the kernel at once; no thread ever waits.
//! (Re-protecting a range another tracker watches consumes that tracker's
//! "written" state: a logic error for it, never a memory one.)
//!
//! The ABI (`linux/fs.h`, not in the headers installed on older systems):
//! ```c
//! struct page_region { __u64 start, end, categories; };
//! struct pm_scan_arg {
//!     __u64 size, flags, start, end, walk_end, vec, vec_len, max_pages,
//!           category_inverted, category_mask, category_anyof_mask, return_mask;
//! };
//! #define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
//! ```
#![allow(unsafe_code)]

use rustix::io::Errno;
use rustix::ioctl::{opcode, Opcode};
use std::fs::File;
use std::os::fd::AsRawFd;

/// `PAGE_IS_WPALLOWED`: the page is in a range registered for asynchronous
/// userfaultfd write-protect.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// `PAGE_IS_WRITTEN`: the page is not write-protected by userfaultfd, i.e.
/// it was written since it was last protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_FILE`: the page is file-backed (shmem and memfd included).
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// `PAGE_IS_PRESENT`: the page is in memory.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_SWAPPED`: the page is in swap.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `PAGE_IS_PFNZERO`: the page is the shared zero page.
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// `PAGE_IS_HUGE`: the page is part of a THP or a hugetlb page.
pub const PAGE_IS_HUGE: u64 = 1 << 6;

/// `PM_SCAN_WP_MATCHING`: write-protect the pages reported.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail (`EPERM`) on a range that is not
/// registered for asynchronous write-protect.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`: pages `start .. end` (bytes, exclusive end), all
/// in `categories` (masked by the scan's return mask).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    /// First byte of the first page.
    pub start: u64,
    /// One past the last byte of the last page.
    pub end: u64,
    /// `PAGE_IS_*` bits the pages share.
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    /// Written by the kernel: where the walk stopped (`end` when it
    /// covered the whole range).
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: Opcode = opcode::read_write::<PmScanArg>(b'f', 16);

/// What one scan found.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Scanned {
    /// How many entries of the output vector were filled.
    pub regions: usize,
    /// Where the walk stopped: the scanned range's end when it covered all
    /// of it, earlier when the output vector filled up (scan again from
    /// here; pages from here on were neither reported nor re-protected).
    pub walk_end: u64,
}

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// `/proc/self/pagemap` cannot be opened.
    #[error(
        "cannot open /proc/self/pagemap: {0}; mount /proc (PAGEMAP_SCAN is an ioctl on this file)"
    )]
    Open(std::io::Error),
    /// The kernel has no `PAGEMAP_SCAN` (before Linux 6.7).
    #[error(
        "this kernel has no PAGEMAP_SCAN ioctl on /proc/self/pagemap ({errno}): it arrived in \
         Linux 6.7; use a newer kernel, or a KVM dirty-log mode"
    )]
    Unsupported {
        /// What the ioctl returned (`ENOTTY`).
        errno: Errno,
    },
    /// Part of the range is not registered for asynchronous write-protect.
    #[error(
        "PAGEMAP_SCAN refused {start:#x}..{end:#x} ({errno}): part of it is not registered on a \
         userfaultfd opened with UFFD_FEATURE_WP_ASYNC in write-protect mode (or not mapped); \
         register the whole range first"
    )]
    NotWpAsync {
        /// The range asked for.
        start: u64,
        /// Its end.
        end: u64,
        /// `EPERM`.
        errno: Errno,
    },
    /// An address that is not page-aligned, or a range that ends before it
    /// starts.
    #[error(
        "PAGEMAP_SCAN over {start:#x}..{end:#x}: the range must be whole base pages, start <= end"
    )]
    BadRange {
        /// The start asked for.
        start: u64,
        /// Its end.
        end: u64,
    },
    /// The kernel reported more regions than the vector holds, or a
    /// walk end outside the range: a kernel this code does not understand.
    #[error("PAGEMAP_SCAN answered {regions} regions for a vector of {capacity}, walk end {walk_end:#x} for {start:#x}..{end:#x}: an ABI this code does not know")]
    BadAnswer {
        /// The region count returned.
        regions: i64,
        /// The vector's length.
        capacity: usize,
        /// The walk end returned.
        walk_end: u64,
        /// The range asked for.
        start: u64,
        /// Its end.
        end: u64,
    },
    /// Anything else the ioctl returned.
    #[error("PAGEMAP_SCAN over {start:#x}..{end:#x} failed: {errno}; {hint}")]
    Sys {
        /// The range asked for.
        start: u64,
        /// Its end.
        end: u64,
        /// The errno.
        errno: Errno,
        /// What to do.
        hint: &'static str,
    },
}

/// An open `/proc/self/pagemap`, to scan this process's memory.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

/// The base page size the scan works in (`PAGE_SIZE`).
fn base_page() -> u64 {
    crate::mmap::host_page_size().bytes()
}

impl Pagemap {
    /// Opens `/proc/self/pagemap` and checks that the kernel has
    /// `PAGEMAP_SCAN` ([`ScanError::Unsupported`] if not), with an empty
    /// scan that touches nothing.
    pub fn open() -> Result<Pagemap, ScanError> {
        let file = File::open("/proc/self/pagemap").map_err(ScanError::Open)?;
        let pagemap = Pagemap { file };
        // An empty range at an aligned address: the kernel validates the
        // argument and returns at once.
        let at = base_page();
        pagemap.raw_scan(at, at, 0, 0, &mut [])?;
        Ok(pagemap)
    }

    /// Reports the pages of `start .. end` that were written since they
    /// were last write-protected ([`PAGE_IS_WRITTEN`]) into `out`, merged
    /// into ranges, and write-protects them again if `reprotect`. The walk
    /// stops early when `out` fills ([`Scanned::walk_end`] says where;
    /// pages beyond it are untouched).
    ///
    /// The whole range must be registered on a userfaultfd with
    /// asynchronous write-protect, else [`ScanError::NotWpAsync`] (the
    /// kernel checks: `PM_SCAN_CHECK_WPASYNC`). Holes (pages never
    /// populated, without a write-protect marker) are never in the written
    /// category, so the scan never write-protects one: a hugetlb hole
    /// write-protected by `PAGEMAP_SCAN` deadlocks the calling thread on
    /// kernels without the May 2026 fix ("fs/proc/task_mmu: fix hugetlb
    /// self-deadlock in pagemap_scan_pte_hole()").
    pub fn scan_written(
        &self,
        start: u64,
        end: u64,
        reprotect: bool,
        out: &mut [PageRegion],
    ) -> Result<Scanned, ScanError> {
        let page = base_page();
        if start % page != 0 || end % page != 0 || end < start {
            return Err(ScanError::BadRange { start, end });
        }
        let flags = PM_SCAN_CHECK_WPASYNC | if reprotect { PM_SCAN_WP_MATCHING } else { 0 };
        self.raw_scan(start, end, flags, PAGE_IS_WRITTEN, out)
    }

    /// One `PAGEMAP_SCAN` over `start .. end` for pages in all of `mask`,
    /// reporting `mask`, into `out`.
    fn raw_scan(
        &self,
        start: u64,
        end: u64,
        flags: u64,
        mask: u64,
        out: &mut [PageRegion],
    ) -> Result<Scanned, ScanError> {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags,
            start,
            end,
            walk_end: 0,
            // The kernel rejects a null vector with a non-zero length and
            // the reverse; an empty slice is passed as (null, 0).
            vec: if out.is_empty() {
                0
            } else {
                out.as_mut_ptr() as u64
            },
            vec_len: out.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: mask,
            category_anyof_mask: 0,
            return_mask: mask,
        };
        // SAFETY: PAGEMAP_SCAN takes a pm_scan_arg, which `arg` is, sized
        // in `size`; the kernel writes `arg.walk_end` and at most
        // `vec_len` page_regions at `vec`, which is `out` (a live,
        // exclusively borrowed slice of exactly that many repr(C)
        // page_regions). What it does to the scanned range is at most
        // write-protection inside asynchronous write-protect ranges (see
        // the module docs), which changes no contents and stalls no one.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                PAGEMAP_SCAN as _,
                &mut arg as *mut PmScanArg,
            )
        };
        if ret < 0 {
            let errno = Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO);
            return Err(match errno {
                Errno::NOTTY => ScanError::Unsupported { errno },
                Errno::PERM => ScanError::NotWpAsync { start, end, errno },
                _ => ScanError::Sys {
                    start,
                    end,
                    errno,
                    hint: match errno {
                        Errno::INVAL => "the kernel refused the arguments (unaligned range, unknown flag or category)",
                        Errno::FAULT => "the output vector is not writable memory",
                        Errno::NOMEM => "the kernel could not allocate its bounce buffer or a page table",
                        Errno::INTR => "interrupted by a signal: scan again",
                        _ => "check that the range is mapped memory of this process",
                    },
                },
            });
        }
        let regions = ret as i64;
        let walk_end = arg.walk_end;
        if regions as u64 > out.len() as u64 || walk_end < start || walk_end > end {
            return Err(ScanError::BadAnswer {
                regions,
                capacity: out.len(),
                walk_end,
                start,
                end,
            });
        }
        Ok(Scanned {
            regions: regions as usize,
            walk_end,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The opcode and struct sizes as the C header computes them.
    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn abi_matches_the_c_header() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        assert_eq!(PAGEMAP_SCAN as u64, 0xc060_6610);
    }

    #[test]
    fn unaligned_ranges_are_refused_before_the_kernel() {
        let Ok(pagemap) = Pagemap::open() else {
            println!("skipped: no PAGEMAP_SCAN");
            return;
        };
        for (start, end) in [(1, 4096), (0, 4095), (8192, 4096)] {
            assert!(matches!(
                pagemap.scan_written(start, end, false, &mut []),
                Err(ScanError::BadRange { .. })
            ));
        }
    }
}
