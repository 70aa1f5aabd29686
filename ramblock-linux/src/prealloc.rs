//! Preallocation: back every page of a range now, from several threads, so
//! the guest never waits for (or dies on) a page fault later.
//!
//! `MADV_POPULATE_WRITE` (Linux 5.14) faults pages in and reports a failure
//! to back them as an error (`EFAULT`/`ENOMEM`) instead of the `SIGBUS` a
//! plain write into an exhausted hugetlb pool raises. Where the kernel lacks
//! it, each page is touched instead, after checking that the hugetlb pool
//! has the pages, since a touch cannot report failure.
#![allow(unsafe_code)]

use crate::advice::madvise;
use crate::error::Error;
use crate::hugetlb;
use ramblock_core::addr::PageSize;
use rustix::io::Errno;
use rustix::mm::Advice;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How pages are faulted in.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum PreallocMethod {
    /// `MADV_POPULATE_WRITE`, falling back to touching each page on kernels
    /// without it.
    #[default]
    Auto,
    /// Only `MADV_POPULATE_WRITE`.
    Populate,
    /// Only the touch fallback (exposed so it can be tested).
    Touch,
}

/// Preallocation settings.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Prealloc {
    /// Threads to fault pages in with; `None` for the default,
    /// `min(cores, 16, size / 64 MiB)` (at least one).
    pub threads: Option<NonZeroUsize>,
    /// How to fault pages in.
    pub method: PreallocMethod,
}

/// Bytes each default thread should at least have to do.
const BYTES_PER_THREAD: u64 = 64 << 20;
/// The most threads used by default.
const MAX_DEFAULT_THREADS: usize = 16;

/// The default thread count for `len` bytes: `min(cores, 16, len / 64 MiB)`,
/// at least one.
pub fn default_threads(len: u64) -> NonZeroUsize {
    let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let by_size = usize::try_from(len / BYTES_PER_THREAD).unwrap_or(usize::MAX);
    NonZeroUsize::new(cores.min(MAX_DEFAULT_THREADS).min(by_size)).unwrap_or(NonZeroUsize::MIN)
}

/// A range to preallocate.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Range {
    pub start: usize,
    pub len: usize,
    pub page_size: PageSize,
    /// The hugetlb pool behind the range, if any.
    pub huge: Option<PageSize>,
    /// Whether the mapping skipped the hugetlb reservation (MAP_NORESERVE),
    /// so free pages may already be promised to other mappings.
    pub no_reserve: bool,
    /// Read-only memory is populated for reading.
    pub writable: bool,
}

/// Faults in every page of `range` with `settings`.
///
/// # Safety
/// The range must be accessible memory this crate owns, which Rust code
/// reaches only through raw pointers (guest RAM). The touch fallback
/// rewrites each page's first byte atomically, so concurrent writers (a
/// vCPU, a device) lose nothing.
pub(crate) unsafe fn preallocate(range: Range, settings: Prealloc) -> Result<(), Error> {
    if range.len == 0 {
        return Ok(());
    }
    let page = range.page_size.bytes() as usize;
    let threads = settings
        .threads
        .unwrap_or_else(|| default_threads(range.len as u64))
        .get();
    let pages = range.len / page;
    let per_thread = pages.div_ceil(threads).max(1) * page;
    let method = settings.method;
    if method == PreallocMethod::Touch {
        check_pool_for_touch(range)?;
    }
    let results: Vec<Result<(), Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .filter_map(|i| {
                let off = i * per_thread;
                (off < range.len).then(|| {
                    let len = per_thread.min(range.len - off);
                    let chunk = Range {
                        start: range.start + off,
                        len,
                        ..range
                    };
                    // SAFETY: each chunk is a disjoint part of the caller's range.
                    s.spawn(move || unsafe { fault_in(chunk, method) })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        // A touch-fallback thread may have found populate unsupported only
        // after others failed; report the first failure.
        return Err(e);
    }
    Ok(())
}

/// Faults in one thread's chunk.
///
/// # Safety
/// As for [`preallocate`].
unsafe fn fault_in(chunk: Range, method: PreallocMethod) -> Result<(), Error> {
    if method != PreallocMethod::Touch {
        let advice = if chunk.writable {
            Advice::LinuxPopulateWrite
        } else {
            Advice::LinuxPopulateRead
        };
        // SAFETY: populating does not change contents; the chunk is ours.
        let populated = unsafe {
            madvise(
                chunk.start as *mut u8,
                chunk.len,
                advice,
                "preallocation",
                "the host is out of memory for this block: free memory, lower the size or raise the commit limit",
            )
        };
        match populated {
            Ok(()) => return Ok(()),
            // EINVAL: the kernel predates MADV_POPULATE_*; touch instead.
            Err(Error::Sys {
                errno: Errno::INVAL,
                ..
            }) if method == PreallocMethod::Auto => {
                check_pool_for_touch(chunk)?;
            }
            Err(Error::Sys {
                errno: errno @ (Errno::FAULT | Errno::NOMEM),
                ..
            }) if chunk.huge.is_some() => {
                let page = chunk.huge.unwrap_or(chunk.page_size);
                return Err(hugetlb::exhausted(page, chunk.len as u64, Some(errno)));
            }
            Err(e) => return Err(e),
        }
    }
    // SAFETY: the caller guarantees the chunk is accessible guest RAM.
    unsafe { touch(chunk) };
    Ok(())
}

/// Writes each page's first word back to itself (or reads it, for read-only
/// memory), which makes the kernel back the page.
///
/// The write is a compare-and-exchange of the word with itself: a plain
/// read and write back would undo a write another thread (a vCPU) made in
/// between, and an idempotent `fetch_or(0)` may be compiled to a load,
/// which would map the zero page instead of backing the page. A
/// compare-and-exchange that succeeds is a write; one that fails means
/// another writer changed the word, which backed the page (on x86 the
/// locked instruction writes either way).
///
/// # Safety
/// As for [`preallocate`].
unsafe fn touch(chunk: Range) {
    let page = chunk.page_size.bytes() as usize;
    let mut at = chunk.start;
    while at < chunk.start + chunk.len {
        let p = at as *mut u8;
        if chunk.writable {
            // SAFETY: `p` starts a page inside the accessible, writable
            // chunk (the caller's contract), so it is word-aligned and the
            // word is inside it; guest RAM is never behind a Rust reference,
            // and `HostRegion` accesses page-aligned memory in the same
            // whole words, so no access of another size races this one.
            let word = unsafe { AtomicUsize::from_ptr(p.cast::<usize>()) };
            let v = word.load(Ordering::Relaxed);
            let _ = word.compare_exchange(v, v, Ordering::Relaxed, Ordering::Relaxed);
        } else {
            // SAFETY: `p` is inside the accessible chunk; volatile keeps
            // the compiler from dropping a read whose only point is the
            // fault.
            let _ = unsafe { p.read_volatile() };
        }
        at += page;
    }
}

/// Before touching hugetlb memory, checks that its pool has a free page for
/// every page of the range not already backed: a touch that finds the pool
/// empty raises SIGBUS, which must never happen.
fn check_pool_for_touch(range: Range) -> Result<(), Error> {
    let Some(huge) = range.huge else {
        return Ok(());
    };
    let missing = missing_pages(range, huge);
    let free = if range.no_reserve {
        hugetlb::unreserved_free_pages(huge)
    } else {
        // The mapping's own reservation is counted among the free pages.
        hugetlb::free_pages(huge)
    };
    if (missing as u64) > free {
        return Err(hugetlb::exhausted(
            huge,
            missing as u64 * huge.bytes(),
            None,
        ));
    }
    Ok(())
}

/// Hugepages of `range` not yet backed, from `mincore`.
fn missing_pages(range: Range, huge: PageSize) -> usize {
    let small = crate::mmap::host_page_size().bytes() as usize;
    let mut vec = vec![0u8; range.len.div_ceil(small)];
    // SAFETY: mincore only reads the page tables of the range (which is
    // mapped) and writes one byte per small page into `vec`, sized for it.
    // rustix does not wrap mincore.
    let rc = unsafe {
        libc::mincore(
            range.start as *mut libc::c_void,
            range.len,
            vec.as_mut_ptr(),
        )
    };
    let step = (huge.bytes() as usize / small).max(1);
    if rc != 0 {
        // Cannot tell: assume nothing is backed (the safe side).
        return range.len / huge.bytes() as usize;
    }
    vec.iter().step_by(step).filter(|&&b| b & 1 == 0).count()
}
