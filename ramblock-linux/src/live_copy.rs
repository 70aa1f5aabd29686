//! [`LiveCopy`]: a point-in-time copy of memory that writers keep writing
//! (copy-before-write), the mechanism of a live snapshot.
//!
//! [`LiveCopy::start`] registers the memory on a userfaultfd in
//! write-protect mode (synchronous: no `WP_ASYNC`, so a write to a
//! protected page stops its writer and is reported) and protects all of it
//! (with `WP_UNPOPULATED`, unpopulated anonymous pages too): that is the
//! instant the copy shows. [`LiveCopy::run`] then hands every page, as it
//! was at that instant, to the caller's `save` exactly once, from two
//! threads:
//! - a fault thread blocks on the userfaultfd; when a writer faults, it
//!   reads the page (still protected, so still as it was), saves it, and
//!   only then un-protects it, which wakes the writer;
//! - the calling thread saves the other pages in runs, going next to the
//!   page after the latest fault (a writer walking up memory then finds
//!   its next pages saved, not protected), else onwards, and un-protects
//!   each run after saving it (waking anyone who faulted on it meanwhile;
//!   their event, read later, finds the page saved and only wakes again).
//!   Between runs it serves faults already reported too, in case the fault
//!   thread waits for a core.
//!
//! Each page is claimed by one thread with an atomic bit before it is
//! read, so it is saved exactly once; a writer faulting on a page the
//! other thread claimed waits until that thread has saved and un-protected
//! it.
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

// `poll(2)` and `eventfd(2)` for the fault thread and `fault_pending`,
// through libc as the uffd module does.
#![allow(unsafe_code)]

use crate::memory::LinuxMemory;
use crate::uffd::{Event, Features, RegisterMode, RegisteredBlock, UffdError, Userfaultfd};
use ramblock_core::host::HostMemory;
use ramblock_core::region::HostRegion;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Bytes read and saved at a time by the background copy (at least one
/// page): large enough to amortise the system calls, small enough that a
/// writer faulting on a page of the run in progress waits little.
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
    /// The fault thread could not be set up or wait for faults
    /// (`eventfd(2)`, `poll(2)`).
    #[error("waiting for write-protect faults failed ({call}): {source}")]
    Wait {
        /// The system call that failed.
        call: &'static str,
        /// Its error.
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
    started: Instant,
}

/// What `run_regions` calls to save pages, from both of its threads.
type SaveFn<'f> = dyn Fn(u64, &HostRegion<'_>) -> std::io::Result<()> + Sync + 'f;

/// No page: [`Shared::ahead`] holds no hint.
const NO_PAGE: usize = usize::MAX;

/// What the fault thread and the background copier share.
struct Shared {
    /// One bit per page: a saver took it. Set by one `fetch_or`, so
    /// exactly one of the two threads saves each page.
    claimed: Vec<AtomicU64>,
    /// One bit per page: saved and un-protected (set after both).
    released: Vec<AtomicU64>,
    /// With `changed`: the fault thread waits there for a page the copier
    /// claimed to be released. Guards no data; the bits are atomics.
    lock: Mutex<()>,
    changed: Condvar,
    /// The page after the last one the fault thread saved (or
    /// [`NO_PAGE`]): writers walk up, so the copier saves there next,
    /// ahead of the writer, instead of where it was.
    ahead: AtomicUsize,
    /// Set when the copier is done (every page claimed and its own
    /// released) or either thread failed; both threads then stop.
    finished: AtomicBool,
    /// Set by the fault thread when it failed (its error is the copy's).
    fault_failed: AtomicBool,
    /// Readable once `finished` is set: wakes the fault thread from its
    /// `poll(2)` on the userfaultfd.
    stop: OwnedFd,
}

impl Shared {
    fn new(pages: usize) -> std::io::Result<Shared> {
        // SAFETY: eventfd(2) takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(fd) };
        let bits = || (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Ok(Shared {
            claimed: bits(),
            released: bits(),
            lock: Mutex::new(()),
            changed: Condvar::new(),
            ahead: AtomicUsize::new(NO_PAGE),
            finished: AtomicBool::new(false),
            fault_failed: AtomicBool::new(false),
            stop,
        })
    }

    /// Takes `page` to save; false if the other thread took it first.
    fn claim(&self, page: usize) -> bool {
        let bit = 1 << (page % 64);
        self.claimed[page / 64].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// The first page at or after `from` that no one claimed.
    fn next_unclaimed(&self, from: usize, pages: usize) -> Option<usize> {
        let mut word = from / 64;
        // Bits below `from` in its word count as claimed.
        let mut below = (1u64 << (from % 64)) - 1;
        while word < self.claimed.len() {
            let free = !(self.claimed[word].load(Ordering::Acquire) | below);
            if free != 0 {
                let page = word * 64 + free.trailing_zeros() as usize;
                return (page < pages).then_some(page);
            }
            below = 0;
            word += 1;
        }
        None
    }

    fn is_released(&self, page: usize) -> bool {
        self.released[page / 64].load(Ordering::Acquire) >> (page % 64) & 1 == 1
    }

    /// Marks `first .. first + count` saved and un-protected, and wakes
    /// the fault thread if it waits for one of them.
    fn release(&self, first: usize, count: usize) {
        for p in first..first + count {
            self.released[p / 64].fetch_or(1 << (p % 64), Ordering::Release);
        }
        // Taken between setting the bits and notifying, so a waiter that
        // checked before they were set is already waiting: no lost wake.
        drop(self.lock.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_all();
    }

    /// Waits until `page` is released or the copy stopped (done, or the
    /// fault thread failed); whether it was released.
    fn wait_released(&self, page: usize) -> bool {
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.is_released(page) {
                return true;
            }
            if self.finished.load(Ordering::Acquire) || self.fault_failed.load(Ordering::Acquire) {
                return self.is_released(page);
            }
            guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Stops both threads: the fault thread leaves its `poll(2)` and any
    /// wait for a page.
    fn finish(&self) {
        self.finished.store(true, Ordering::Release);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live 8-byte buffer to our eventfd.
        // It cannot fail short of the counter overflowing, which one write
        // per copy cannot do; if it did, the fault thread would still see
        // `finished` on its next event.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        drop(self.lock.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_all();
    }
}

/// Calls [`Shared::finish`] when dropped: the copier stops the fault thread
/// however it leaves (done, failed, or unwinding from a panic in `save`),
/// so the scope joining it never hangs.
struct FinishOnDrop<'s>(&'s Shared);

impl Drop for FinishOnDrop<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
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
        Ok(LiveCopy {
            uffd,
            block,
            region: mem.region(),
            page,
            started,
        })
    }

    /// Whether a writer has faulted and waits for [`LiveCopy::run`] (the
    /// userfaultfd has an event to read; nothing is consumed).
    pub fn fault_pending(&self) -> bool {
        let mut pollfd = libc::pollfd {
            fd: self.uffd.as_fd().as_raw_fd(),
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

    /// Hands pages `first .. first + count` (claimed by the caller, still
    /// protected, so as they were at the instant) to `save`, un-protects
    /// them (waking writers waiting there), and marks them released.
    fn save_run(
        &self,
        shared: &Shared,
        first: usize,
        count: usize,
        save: &SaveFn<'_>,
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
        // Saved first, un-protected second: a writer woken here writes
        // into a page whose old content is already out.
        self.uffd
            .write_protect(self.block.base().wrapping_add(offset), len, false, true)?;
        shared.release(first, count);
        Ok(())
    }

    /// Serves one event: saves the faulting page if no one has claimed
    /// it, else waits until whoever did has saved and un-protected it;
    /// then the writer is awake (woken by the un-protect; a wake after it
    /// covers an event read late, and is harmless otherwise).
    fn serve(
        &self,
        shared: &Shared,
        event: Event,
        save: &SaveFn<'_>,
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
        if shared.claim(page) {
            self.save_run(shared, page, 1, save)?;
            stats.faulted_pages += 1;
            stats.pages += 1;
            shared.ahead.store(page + 1, Ordering::Release);
        } else {
            // The copier has it (or this thread saved it for an earlier
            // fault): once released, the un-protect woke the writer.
            if !shared.wait_released(page) {
                // A thread failed; its error is the copy's, and the
                // writer is freed when the userfaultfd closes.
                return Ok(());
            }
            let start = self.block.base().wrapping_add(page * self.page);
            self.uffd.wake(start, self.page)?;
        }
        stats.fault_service_ns.push(t.elapsed().as_nanos() as u64);
        Ok(())
    }

    /// The fault thread: blocks on the userfaultfd and serves each event
    /// as it comes, until the copier is done.
    fn serve_faults(
        &self,
        shared: &Shared,
        save: &SaveFn<'_>,
    ) -> Result<LiveCopyStats, LiveCopyError> {
        let mut stats = LiveCopyStats::default();
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: shared.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            while let Some(event) = self.uffd.read_event(Some(Duration::ZERO))? {
                self.serve(shared, event, save, &mut stats)?;
            }
            if shared.finished.load(Ordering::Acquire) {
                // Every page is released (with a wake); events still
                // queued are for writers already woken.
                return Ok(stats);
            }
            // SAFETY: two valid pollfds, counted as two; waits until one
            // is readable (a signal returns early and loops).
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if ret < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(LiveCopyError::Wait {
                        call: "poll",
                        source: err,
                    });
                }
            }
            for fd in &mut fds {
                fd.revents = 0;
            }
        }
    }

    /// The background copier: claims and saves runs of pages until every
    /// page is claimed, going next to the page after the latest fault
    /// (see [`Shared::ahead`]), else onwards from where it was, else from
    /// the lowest page no one claimed.
    ///
    /// Between runs it also serves the faults already reported, as the
    /// fault thread does: on a busy host the fault thread may wait for a
    /// core while this one runs, and a writer's event that is not read
    /// before the copier un-protects its page vanishes (the woken writer
    /// withdraws it), so the copier takes its share.
    fn copy_all(
        &self,
        shared: &Shared,
        save: &SaveFn<'_>,
        stats: &mut LiveCopyStats,
    ) -> Result<(), LiveCopyError> {
        let pages = self.pages();
        let chunk_pages = (CHUNK / self.page).max(1);
        let (mut cursor, mut low) = (0, 0);
        while !shared.fault_failed.load(Ordering::Acquire) {
            while let Some(event) = self.uffd.read_event(Some(Duration::ZERO))? {
                self.serve(shared, event, save, stats)?;
            }
            let hint = shared.ahead.swap(NO_PAGE, Ordering::AcqRel);
            if hint < pages {
                cursor = hint;
            }
            let first = match shared.next_unclaimed(cursor, pages) {
                Some(p) => p,
                None => match shared.next_unclaimed(low, pages) {
                    Some(p) => {
                        low = p;
                        p
                    }
                    None => break,
                },
            };
            let mut count = 0;
            while count < chunk_pages && first + count < pages && shared.claim(first + count) {
                count += 1;
            }
            cursor = first + count.max(1);
            if count > 0 {
                self.save_run(shared, first, count, save)?;
                stats.pages += count as u64;
            }
        }
        Ok(())
    }

    /// Saves every page as it was at [`LiveCopy::start`], through
    /// `save(offset, data)` (`offset` from the memory's start, `data` one
    /// or more whole pages), each page exactly once; see the module docs.
    /// Returns once all are saved and nothing is protected any more.
    ///
    /// The pages are copied into a buffer for `save`, which is called
    /// under a lock (the fault thread's one page may wait for a
    /// background run in `save`); [`LiveCopy::run_regions`] hands the
    /// pages without the copy, to a `save` that both threads may call at
    /// once.
    pub fn run(
        self,
        save: impl FnMut(u64, &[u8]) -> std::io::Result<()> + Send,
    ) -> Result<LiveCopyStats, LiveCopyError> {
        let save = Mutex::new(save);
        // One buffer per caller at a time: there are at most two, the
        // copier and the fault thread, so one of two is always free.
        let bufs = [Mutex::new(Vec::new()), Mutex::new(Vec::new())];
        self.run_regions(|offset, pages| {
            let mut buf = match bufs.iter().find_map(|b| b.try_lock().ok()) {
                Some(buf) => buf,
                None => bufs[0].lock().unwrap_or_else(|p| p.into_inner()),
            };
            buf.resize(pages.len(), 0);
            pages
                .read(ramblock_core::addr::ByteLen(0), &mut buf)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let mut save = save.lock().unwrap_or_else(|p| p.into_inner());
            (*save)(offset, &buf)
        })
    }

    /// As [`LiveCopy::run`], but `save` gets the memory itself (read-only,
    /// its pages still protected while `save` runs, so as they were at the
    /// instant): a file writer can `pwritev(2)` straight from it, with no
    /// copy in user space.
    ///
    /// Two threads call `save`, possibly at once (for different pages): a
    /// fault thread, blocked on the userfaultfd, saves a page a writer
    /// faulted on as soon as the fault is reported; the calling thread
    /// saves the rest in runs, going ahead of the latest fault. Each page
    /// is claimed by one of them with an atomic bit, so saved exactly
    /// once, and un-protected only after `save` returned for it.
    pub fn run_regions(
        self,
        save: impl Fn(u64, &HostRegion<'_>) -> std::io::Result<()> + Sync,
    ) -> Result<LiveCopyStats, LiveCopyError> {
        let shared = Shared::new(self.pages()).map_err(|source| LiveCopyError::Wait {
            call: "eventfd",
            source,
        })?;
        let save: &SaveFn<'_> = &save;
        let this = &self;
        let (copied, faults) = std::thread::scope(|s| {
            let faults = s.spawn(|| {
                let result = this.serve_faults(&shared, save);
                if result.is_err() {
                    // Stops the copier, also if it waits for a page this
                    // thread claimed and will not release.
                    shared.fault_failed.store(true, Ordering::Release);
                    drop(shared.lock.lock().unwrap_or_else(|p| p.into_inner()));
                    shared.changed.notify_all();
                }
                result
            });
            let mut copied = LiveCopyStats::default();
            let copied = {
                let _finish = FinishOnDrop(&shared);
                this.copy_all(&shared, save, &mut copied).map(|()| copied)
            };
            let faults = faults
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (copied, faults)
        });
        // The fault thread's error first: it made the copier stop.
        let mut stats = faults?;
        let copied = copied?;
        stats.pages += copied.pages;
        stats.faults += copied.faults;
        stats.faulted_pages += copied.faulted_pages;
        stats.fault_service_ns.extend(copied.fault_service_ns);
        stats.elapsed = self.started.elapsed();
        Ok(stats)
    }
}
