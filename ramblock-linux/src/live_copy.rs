//! [`LiveCopy`]: a point-in-time copy of memory that writers keep writing
//! (copy-before-write), the mechanism of a live snapshot.
//!
//! [`LiveCopy::start`] registers the memory on a userfaultfd in
//! write-protect mode (synchronous: no `WP_ASYNC`, so a write to a
//! protected page stops its writer and is reported) and protects all of it
//! (with `WP_UNPOPULATED`, unpopulated anonymous pages too): that is the
//! instant the copy shows. [`LiveCopy::run`] then hands every page, as it
//! was at that instant, to the caller's `save` exactly once, on the calling
//! thread:
//! - a writer's fault is served first: the page is read (still protected,
//!   so still as it was), saved, and only then un-protected, which wakes
//!   the writer;
//! - otherwise the next unsaved run of pages is read, saved and
//!   un-protected (waking anyone who faulted on it meanwhile; their event,
//!   read later, finds the page saved and only wakes again).
//!
//! When every page is saved, nothing is protected any more and no writer
//! waits. The caller decides what saving means (a file, a buffer, a
//! socket); the snapshot file format is not this module's business.
//!
//! What it cannot see is what the uffd-wp dirty log cannot see
//! ([`crate::dirty_log`]): writes through other mappings of the memory and
//! DMA into pinned pages would change a page before it is saved.
//!
//! ```no_run
//! use ramblock_core::addr::ByteLen;
//! use ramblock_core::host::HostMemory;
//! use ramblock_linux::live_copy::LiveCopy;
//! use ramblock_linux::MemoryBuilder;
//!
//! let mem = MemoryBuilder::memfd(ByteLen(2 << 20)).build()?;
//! let mut image = vec![0u8; 2 << 20];
//! let copy = LiveCopy::start(&mem)?; // the instant
//! // ... writers may run here and during `run` ...
//! let stats = copy.run(|offset, data| {
//!     image[offset as usize..offset as usize + data.len()].copy_from_slice(data);
//!     Ok(())
//! })?;
//! println!("{} pages, {} saved ahead of a writer", stats.pages, stats.faulted_pages);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// `poll(2)` for `fault_pending`, through libc as the uffd module does.
#![allow(unsafe_code)]

use crate::memory::LinuxMemory;
use crate::uffd::{Event, Features, RegisterMode, RegisteredBlock, UffdError, Userfaultfd};
use ramblock_core::host::HostMemory;
use ramblock_core::region::HostRegion;
use std::time::{Duration, Instant};

/// Bytes read and saved at a time by the background copy (at least one
/// page): large enough to amortise the system calls, small enough that a
/// faulting writer waits little for the copier to notice it.
const CHUNK: usize = 256 << 10;

/// Why a live copy failed.
#[derive(Debug, thiserror::Error)]
pub enum LiveCopyError {
    /// The kernel cannot write-protect unpopulated memory
    /// (`UFFD_FEATURE_WP_UNPOPULATED`, Linux 6.4), without which a first
    /// write to an untouched anonymous page would not stop its writer.
    #[error(
        "the kernel's userfaultfd lacks {missing} (it offers {offered}): write-protecting \
         unpopulated memory arrived in Linux 6.4; use a newer kernel or pause the guest instead"
    )]
    KernelLacks {
        /// The missing features.
        missing: Features,
        /// What the kernel offers.
        offered: Features,
    },
    /// userfaultfd failed (registration, protection, reading events).
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The caller's `save` failed; the copy stopped (memory is
    /// un-protected when the copy is dropped).
    #[error("saving {len:#x} bytes at offset {offset:#x} failed: {source}")]
    Save {
        /// The offset of the data.
        offset: u64,
        /// Its length.
        len: u64,
        /// What `save` returned.
        source: std::io::Error,
    },
    /// A fault outside the copied memory, or not a write-protect fault.
    #[error("unexpected userfaultfd event {event:?} during a live copy")]
    Unexpected {
        /// The event.
        event: Event,
    },
}

/// What a live copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveCopyStats {
    /// Pages saved (host pages: hugepages on hugetlb memory).
    pub pages: u64,
    /// Write-protect faults read (a page can fault more than once, from
    /// several writers).
    pub faults: u64,
    /// Pages saved because a writer faulted on them, ahead of the
    /// background copy.
    pub faulted_pages: u64,
    /// For each fault, nanoseconds from reading its event to waking its
    /// writer (the part of the writer's stall this side controls).
    pub fault_service_ns: Vec<u64>,
    /// From protection to the last page saved.
    pub elapsed: Duration,
}

/// A point-in-time copy in progress; see the module docs. It borrows the
/// memory, which therefore stays mapped and keeps its size until the copy
/// is done.
#[derive(Debug)]
pub struct LiveCopy<'m> {
    uffd: Userfaultfd,
    block: RegisteredBlock<'m>,
    region: HostRegion<'m>,
    page: usize,
    /// One bit per page: saved (and so un-protected).
    saved: Vec<u64>,
    started: Instant,
}

impl<'m> LiveCopy<'m> {
    /// Write-protects all of `mem`'s used memory: the instant the copy
    /// shows. Writers continue; each write to a page not yet saved stops
    /// until [`LiveCopy::run`] saves the page.
    ///
    /// Anonymous, memfd and hugetlb memory work (the last two need
    /// [`Features::WP_HUGETLBFS_SHMEM`]); a kernel without
    /// `WP_UNPOPULATED` is [`LiveCopyError::KernelLacks`].
    pub fn start(mem: &'m LinuxMemory) -> Result<LiveCopy<'m>, LiveCopyError> {
        let uffd = match Userfaultfd::with_features(Features::WP_UNPOPULATED) {
            Ok(uffd) => uffd,
            Err(UffdError::FeatureMissing {
                missing, offered, ..
            }) => return Err(LiveCopyError::KernelLacks { missing, offered }),
            Err(e) => return Err(e.into()),
        };
        let block = uffd.register_memory(mem, RegisterMode::WRITE_PROTECT)?;
        uffd.write_protect(block.base(), block.len(), true, false)?;
        let started = Instant::now();
        let page = block.page_size();
        let pages = block.len() / page;
        Ok(LiveCopy {
            uffd,
            block,
            region: mem.region(),
            page,
            saved: vec![0; pages.div_ceil(64)],
            started,
        })
    }

    /// Whether a writer has faulted and waits for [`LiveCopy::run`] (the
    /// userfaultfd has an event to read; nothing is consumed).
    pub fn fault_pending(&self) -> bool {
        let mut pollfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.uffd.as_fd()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, counted as one, no waiting.
        let ret = unsafe { libc::poll(&mut pollfd, 1, 0) };
        ret > 0 && pollfd.revents & libc::POLLIN != 0
    }

    /// The number of pages to save.
    pub fn pages(&self) -> usize {
        self.block.len() / self.page
    }

    fn is_saved(&self, page: usize) -> bool {
        self.saved[page / 64] >> (page % 64) & 1 == 1
    }

    /// Hands pages `first .. first + count` (unsaved, still protected, so
    /// as they were at the instant) to `save`, marks them saved and
    /// un-protects them, waking writers waiting there.
    fn save_run(
        &mut self,
        first: usize,
        count: usize,
        save: &mut dyn FnMut(u64, &HostRegion<'_>) -> std::io::Result<()>,
    ) -> Result<(), LiveCopyError> {
        let (offset, len) = (first * self.page, count * self.page);
        let save_error = |source| LiveCopyError::Save {
            offset: offset as u64,
            len: len as u64,
            source,
        };
        // Read-only: a protected page is readable, and `save` must not
        // write it (a write would stop this thread in its own fault).
        let pages = self
            .region
            .subregion(ramblock_core::addr::ByteLen(offset as u64), len)
            .map_err(|e| save_error(std::io::Error::other(e.to_string())))?
            .read_only();
        save(offset as u64, &pages).map_err(save_error)?;
        for p in first..first + count {
            self.saved[p / 64] |= 1 << (p % 64);
        }
        // Saved first, un-protected second: a writer woken here writes
        // into a page whose old content is already out.
        self.uffd
            .write_protect(self.block.base().wrapping_add(offset), len, false, true)?;
        Ok(())
    }

    /// Serves one event: saves the faulting page unless it is saved
    /// already, and wakes its writer.
    fn serve(
        &mut self,
        event: Event,
        save: &mut dyn FnMut(u64, &HostRegion<'_>) -> std::io::Result<()>,
        stats: &mut LiveCopyStats,
    ) -> Result<(), LiveCopyError> {
        let t = Instant::now();
        let Event::Pagefault {
            addr,
            write_protect: true,
            ..
        } = event
        else {
            return Err(LiveCopyError::Unexpected { event });
        };
        let offset = self
            .block
            .offset_of(addr)
            .ok_or(LiveCopyError::Unexpected { event })?;
        let page = offset as usize / self.page;
        stats.faults += 1;
        if self.is_saved(page) {
            // Saved and un-protected meanwhile (which woke the writer);
            // waking again is harmless.
            self.uffd
                .wake(self.block.base().wrapping_add(offset as usize), self.page)?;
        } else {
            self.save_run(page, 1, save)?;
            stats.faulted_pages += 1;
            stats.pages += 1;
        }
        stats.fault_service_ns.push(t.elapsed().as_nanos() as u64);
        Ok(())
    }

    /// Saves every page as it was at [`LiveCopy::start`], through
    /// `save(offset, data)` (`offset` from the memory's start, `data` one
    /// or more whole pages), each page exactly once, serving writers'
    /// faults first; see the module docs. Returns once all are saved and
    /// nothing is protected any more.
    ///
    /// The pages are copied into a buffer for `save`; [`LiveCopy::run_regions`]
    /// hands them without the copy.
    pub fn run(
        self,
        mut save: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> Result<LiveCopyStats, LiveCopyError> {
        let mut buf = vec![0u8; CHUNK.max(self.page)];
        self.run_regions(|offset, pages| {
            let data = &mut buf[..pages.len()];
            pages
                .read(ramblock_core::addr::ByteLen(0), data)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            save(offset, data)
        })
    }

    /// As [`LiveCopy::run`], but `save` gets the memory itself (read-only,
    /// its pages still protected while `save` runs, so as they were at the
    /// instant): a file writer can `pwritev(2)` straight from it, with no
    /// copy in user space.
    pub fn run_regions(
        mut self,
        mut save: impl FnMut(u64, &HostRegion<'_>) -> std::io::Result<()>,
    ) -> Result<LiveCopyStats, LiveCopyError> {
        let chunk_pages = (CHUNK / self.page).max(1);
        let mut stats = LiveCopyStats::default();
        let pages = self.pages();
        let mut next = 0;
        loop {
            // Writers first: each waits until its page is saved.
            while let Some(event) = self.uffd.read_event(Some(Duration::ZERO))? {
                self.serve(event, &mut save, &mut stats)?;
            }
            while next < pages && self.is_saved(next) {
                next += 1;
            }
            if next == pages {
                break;
            }
            let mut count = 1;
            while count < chunk_pages && next + count < pages && !self.is_saved(next + count) {
                count += 1;
            }
            self.save_run(next, count, &mut save)?;
            stats.pages += count as u64;
            next += count;
        }
        stats.elapsed = self.started.elapsed();
        // Every page is un-protected (with a wake); events still queued
        // are for writers already woken.
        Ok(stats)
    }
}
