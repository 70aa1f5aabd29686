//! userfaultfd: missing, minor and write-protect faults on registered
//! memory, reported to this process and resolved by placing pages, as a
//! post-copy migration destination does.
//!
//! A [`Userfaultfd`] is opened once ([`Userfaultfd::new`]): from
//! `/dev/userfaultfd` when it exists (its access is a file permission),
//! else with the `userfaultfd(2)` system call (governed by
//! `vm.unprivileged_userfaultfd`). Both give a non-blocking, close-on-exec
//! descriptor that handles kernel-mode faults too, which KVM's vCPUs need.
//!
//! Memory is registered for a [`RegisterMode`]; a thread that then touches
//! a missing page (or, for `MINOR`, a page that is in the page cache but
//! not yet mapped here) sleeps, and [`Userfaultfd::read_event`] reports the
//! fault. Placing the page ([`Userfaultfd::copy`], [`Userfaultfd::zeropage`],
//! [`Userfaultfd::continue_minor`]) wakes it. For a whole block of
//! [`LinuxMemory`](crate::LinuxMemory), [`Userfaultfd::register_memory`]
//! checks the mode against the backing and gives a [`RegisteredBlock`]
//! whose safe [`RegisteredBlock::place`] takes block offsets.
//!
//! **What is safe.** Every call that hands the kernel a caller's address
//! and can change what memory holds or who may touch it is either checked
//! against something the compiler keeps alive or `unsafe`:
//! - a [`RegisteredBlock`] borrows the [`LinuxMemory`](crate::LinuxMemory)
//!   it covers, so it cannot be used once the memory is dropped or (through
//!   `&mut`, or a block list's write lock) resized, and it places only
//!   inside that memory's used length, which is guest RAM (reached only
//!   through copies, never Rust references);
//! - raw-address registration and placement ([`Userfaultfd::register`],
//!   [`Userfaultfd::copy`], [`Userfaultfd::zeropage`],
//!   [`Userfaultfd::continue_minor`]) are `unsafe fn`s;
//! - [`Userfaultfd::unregister`], [`Userfaultfd::wake`] and
//!   [`Userfaultfd::write_protect`] take raw addresses but stay safe: the
//!   kernel acts only on ranges registered on this descriptor (which safe
//!   code can only do for guest RAM), and none of them changes contents.
//!   Write-protecting guest RAM makes a writer wait until it is lifted,
//!   which is what it is for.
//! - [`Userfaultfd::register_memory`] on the memory a post-copy fault
//!   thread serves is long-lived; [`Userfaultfd::registered`] gives its
//!   [`RegisteredBlock`] again later, borrowing the memory only for as long
//!   as a placement takes.
//!
//! ```no_run
//! use ramblock_core::addr::ByteLen;
//! use ramblock_linux::uffd::{Event, RegisterMode, Userfaultfd};
//! use ramblock_linux::MemoryBuilder;
//!
//! let mem = MemoryBuilder::anonymous(ByteLen(2 << 20)).build()?;
//! let uffd = Userfaultfd::new()?;
//! let block = uffd.register_memory(&mem, RegisterMode::MISSING)?;
//! // ... a vCPU thread touches the memory; this thread serves its faults:
//! while let Some(Event::Pagefault { addr, .. }) = uffd.read_event(None)? {
//!     let offset = block.offset_of(addr).expect("fault inside the block");
//!     let page = vec![0xaa; block.page_size()]; // fetched from the source
//!     block.place(&uffd, offset, &page)?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![allow(unsafe_code)]

mod block;
mod error;
mod event;
mod flags;
mod sys;

pub use block::RegisteredBlock;
pub use error::UffdError;
pub use event::{Event, Placed};
pub use flags::{Features, Ioctls, RegisterMode};

use crate::mmap::host_page_size;
use ramblock_core::addr::PageSize;
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::Opcode;
use rustix::mm::UserfaultfdFlags;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One registration this descriptor made, to check later requests against.
#[derive(Copy, Clone, Debug)]
struct Registration {
    start: usize,
    end: usize,
    page_size: PageSize,
    /// What the kernel said the range supports, and the mode asked for,
    /// so that [`Userfaultfd::registered`] can hand the block back.
    ioctls: Ioctls,
    mode: RegisterMode,
}

/// The ranges a [`Userfaultfd`] registered, with their page sizes, so that
/// placements can be checked before the ioctl. A record can outlive its
/// registration (memory unmapped without unregistering); the kernel still
/// refuses placements there, and a new registration replaces it.
#[derive(Debug, Default)]
struct Registry(Mutex<Vec<Registration>>);

impl Registry {
    fn list(&self) -> MutexGuard<'_, Vec<Registration>> {
        // The list is replaced whole under the lock; a panic elsewhere
        // cannot leave it half-updated.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a registration, replacing whatever overlapped it.
    fn record(&self, registration: Registration) {
        let mut list = self.list();
        *list = without(&list, registration.start, registration.end);
        list.push(registration);
    }

    /// Drops `start .. end` from the records.
    fn forget(&self, start: usize, end: usize) {
        let mut list = self.list();
        *list = without(&list, start, end);
    }

    /// The registration holding all of `start .. start + len`.
    fn find(&self, start: usize, len: usize) -> Option<Registration> {
        let end = start.checked_add(len)?;
        self.list()
            .iter()
            .find(|r| r.start <= start && end <= r.end)
            .copied()
    }

    /// Whether any registration overlaps `start .. end`.
    fn overlaps(&self, start: usize, end: usize) -> bool {
        self.list().iter().any(|r| r.start < end && start < r.end)
    }
}

/// `list` with `start .. end` cut out of every registration.
fn without(list: &[Registration], start: usize, end: usize) -> Vec<Registration> {
    let mut kept = Vec::with_capacity(list.len() + 1);
    for &r in list {
        if r.end <= start || end <= r.start {
            kept.push(r);
            continue;
        }
        if r.start < start {
            kept.push(Registration { end: start, ..r });
        }
        if end < r.end {
            kept.push(Registration { start: end, ..r });
        }
    }
    kept
}

/// An open userfaultfd, with its negotiated features.
///
/// `Send + Sync`: one thread can wait in [`Userfaultfd::read_event`] while
/// others place pages; the kernel serialises the ioctls.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    features: Features,
    offered: Features,
    registry: Registry,
}

/// The errno `libc` left behind.
fn last_errno() -> Errno {
    Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO)
}

/// `ioctl(fd, request, arg)`.
///
/// # Safety
/// `arg` must be the struct `request` takes; whatever the ioctl does to
/// memory (placing pages) is the caller's to justify.
unsafe fn ioctl<T>(fd: BorrowedFd<'_>, request: Opcode, arg: &mut T) -> Result<(), Errno> {
    // SAFETY: `arg` is a live, exclusively borrowed struct of the type the
    // request reads and writes (the caller's contract).
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if ret < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

/// A new userfaultfd descriptor, before `UFFDIO_API`.
fn open_descriptor() -> Result<OwnedFd, UffdError> {
    let dev_errno = match rustix::fs::open(
        "/dev/userfaultfd",
        OFlags::RDWR | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(dev) => {
            let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
            // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags by
            // value and touches no memory of ours.
            let fd = unsafe { libc::ioctl(dev.as_raw_fd(), sys::USERFAULTFD_IOC_NEW as _, flags) };
            if fd >= 0 {
                // SAFETY: the ioctl returned a new descriptor that nothing
                // else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            last_errno()
        }
        Err(errno) => errno,
    };
    // No usable /dev/userfaultfd: the system call, which
    // vm.unprivileged_userfaultfd governs. UFFD_USER_MODE_ONLY is never
    // tried: such a descriptor misses faults taken inside the kernel (KVM
    // touching guest memory), which post-copy cannot do without.
    // SAFETY: creating the descriptor touches no memory; what it can do to
    // memory later goes through this module's ioctls.
    match unsafe { rustix::mm::userfaultfd(UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK) }
    {
        Ok(fd) => Ok(fd),
        Err(errno @ (Errno::PERM | Errno::ACCESS)) => Err(UffdError::NotPermitted { errno }),
        // The device exists, so the kernel has userfaultfd: we may not use it.
        Err(Errno::NOSYS) if matches!(dev_errno, Errno::PERM | Errno::ACCESS) => {
            Err(UffdError::NotPermitted { errno: dev_errno })
        }
        Err(errno @ Errno::NOSYS) => Err(UffdError::NoKernelSupport { errno }),
        Err(errno) => Err(UffdError::sys(
            "userfaultfd(2)",
            "opening a userfaultfd",
            errno,
            "EMFILE/ENFILE mean too many open files; raise the limit",
        )),
    }
}

/// `UFFDIO_API` on a new descriptor, enabling `features`; returns what the
/// kernel offers.
fn negotiate(fd: BorrowedFd<'_>, features: Features) -> Result<Features, UffdError> {
    let mut api = sys::UffdioApi {
        api: sys::UFFD_API,
        features: features.bits(),
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a uffdio_api, which `api` is.
    unsafe { ioctl(fd, sys::UFFDIO_API, &mut api) }.map_err(|errno| {
        UffdError::sys(
            "UFFDIO_API",
            format!("enabling features {features}"),
            errno,
            "EINVAL means the kernel does not offer one of the features; EPERM that a feature needs a capability",
        )
    })?;
    Ok(Features::from_bits_truncate(api.features))
}

/// Checks that `start .. start + len` is a non-empty run of whole pages.
fn check_pages(
    op: &'static str,
    start: usize,
    len: usize,
    page_size: PageSize,
) -> Result<(), UffdError> {
    if len == 0 {
        return Err(UffdError::EmptyRange { op });
    }
    let ps = page_size.bytes();
    for (what, value) in [("address", start as u64), ("length", len as u64)] {
        if value % ps != 0 {
            return Err(UffdError::Unaligned {
                what,
                value,
                page_size,
            });
        }
    }
    if start.checked_add(len).is_none() {
        return Err(UffdError::NotRegistered {
            addr: start as u64,
            len: len as u64,
        });
    }
    Ok(())
}

/// The largest page size of the mappings overlapping `start .. start + len`,
/// from `/proc/self/smaps` (the only place the kernel tells a mapping's
/// page size); `None` if it cannot be read.
fn mapping_page_size(start: usize, len: usize) -> Option<PageSize> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let end = start.saturating_add(len);
    let mut overlapping = false;
    let mut largest: Option<PageSize> = None;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                overlapping = a < end && start < b;
                continue;
            }
        }
        if overlapping {
            if let Some(kb) = line.strip_prefix("KernelPageSize:") {
                let kb = kb
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()?;
                let size = PageSize::new(kb << 10).ok()?;
                largest = largest.max(Some(size));
            }
        }
    }
    largest
}

/// The hint for a failed `UFFDIO_REGISTER`.
fn register_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::INVAL => "the memory must be anonymous, shared (shmem/memfd) or hugetlb, aligned to its page size, and support the mode (MINOR needs shared or hugetlb memory)",
        Errno::BUSY => "the range is registered on another userfaultfd already",
        Errno::NOMEM => "part of the range is not mapped",
        Errno::PERM => "write-protect needs writable memory; a read-only file mapping cannot be registered for it",
        _ => "check that the range is mapped memory of this process",
    }
}

/// The hint for a failed placement or range ioctl.
fn fill_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::INVAL => "the range must be whole pages inside a range registered for a mode that supports this ioctl",
        Errno::NOENT => "the range is no longer registered on this userfaultfd (unmapped, or unregistered)",
        Errno::AGAIN => "the address space is changing (a remove/unmap/remap event is pending): read the pending events, then retry",
        Errno::NOMEM => "the kernel could not allocate the page; for hugetlb memory the pool is exhausted: raise nr_hugepages",
        Errno::FAULT => "the source buffer is not readable memory of this process",
        Errno::SRCH => "the process that owns the registered memory has exited",
        _ => "check that the range is registered on this userfaultfd",
    }
}

/// One of the three ioctls that place pages.
#[derive(Copy, Clone, Debug)]
enum Fill {
    /// `UFFDIO_COPY` from this source.
    Copy(*const u8),
    /// `UFFDIO_ZEROPAGE`.
    Zero,
    /// `UFFDIO_CONTINUE`.
    Continue,
}

impl Fill {
    fn name(self) -> &'static str {
        match self {
            Fill::Copy(_) => "UFFDIO_COPY",
            Fill::Zero => "UFFDIO_ZEROPAGE",
            Fill::Continue => "UFFDIO_CONTINUE",
        }
    }
}

/// The bytes a placement ioctl reports done: its count when positive (a
/// negative one is an errno, already returned by the ioctl), never more
/// than was asked.
fn progress(reported: i64, asked: usize) -> usize {
    usize::try_from(reported).unwrap_or(0).min(asked)
}

impl Userfaultfd {
    /// Opens a userfaultfd (first `/dev/userfaultfd`, else the
    /// `userfaultfd(2)` system call; non-blocking and close-on-exec) and
    /// enables every feature in [`Features::CAPABILITIES`] the kernel offers.
    ///
    /// `EPERM`/`EACCES` give [`UffdError::NotPermitted`], which says how to
    /// allow it; a kernel without userfaultfd gives
    /// [`UffdError::NoKernelSupport`].
    pub fn new() -> Result<Self, UffdError> {
        Self::with_features(Features::empty())
    }

    /// [`Userfaultfd::new`], also enabling `extra` (event reporting,
    /// [`Features::THREAD_ID`], ...); a feature the kernel lacks is
    /// [`UffdError::FeatureMissing`]. [`Features::EVENT_FORK`] is refused.
    pub fn with_features(extra: Features) -> Result<Self, UffdError> {
        if extra.contains(Features::EVENT_FORK) {
            return Err(UffdError::FeatureRefused {
                feature: Features::EVENT_FORK,
                why: "fork events hand over a new descriptor, which this module does not take ownership of",
            });
        }
        // The kernel enables features once per descriptor, so what it
        // offers is learned on a first descriptor, thrown away.
        let probe = open_descriptor()?;
        let offered = negotiate(probe.as_fd(), Features::empty())?;
        drop(probe);
        let missing = extra.difference(offered);
        if !missing.is_empty() {
            return Err(UffdError::FeatureMissing {
                missing,
                offered,
                needed_for: "the features asked for",
            });
        }
        let features = offered.intersection(Features::CAPABILITIES).union(extra);
        let fd = open_descriptor()?;
        negotiate(fd.as_fd(), features)?;
        Ok(Userfaultfd {
            fd,
            features,
            offered,
            registry: Registry::default(),
        })
    }

    /// The features enabled on this descriptor.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Everything the kernel's userfaultfd offers.
    pub fn offered_features(&self) -> Features {
        self.offered
    }

    /// The descriptor, to poll it alongside others; it is readable when an
    /// event waits.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The page size of the registration holding `start .. start + len`.
    fn registered_page_size(&self, start: usize, len: usize) -> Result<PageSize, UffdError> {
        self.registry
            .find(start, len)
            .map(|r| r.page_size)
            .ok_or(UffdError::NotRegistered {
                addr: start as u64,
                len: len as u64,
            })
    }

    /// Registers `start .. start + len` for `mode` and returns the ioctls
    /// the range supports.
    ///
    /// The range must be whole pages of its mapping (whole hugepages for
    /// hugetlb memory); the mapping's page size is read from
    /// `/proc/self/smaps` (use [`Userfaultfd::register_memory`] for a
    /// block, which knows it). A thread that then faults on a missing page
    /// sleeps until it is placed: serve the events, or it waits forever.
    ///
    /// # Safety
    /// `start .. start + len` must be memory of this process that nothing
    /// reads or writes through Rust references for as long as it stays
    /// registered (guest RAM, reached through raw pointers or
    /// [`HostRegion`](ramblock_core::region::HostRegion)s): a missing page
    /// there can be filled by this descriptor's placements, and a
    /// write-protected one stalls its writers, behind the compiler's back.
    pub unsafe fn register(
        &self,
        start: *mut u8,
        len: usize,
        mode: RegisterMode,
    ) -> Result<Ioctls, UffdError> {
        let start = start as usize;
        check_pages("UFFDIO_REGISTER", start, len, host_page_size())?;
        let page_size = mapping_page_size(start, len).unwrap_or_else(host_page_size);
        self.register_range(start, len, mode, page_size)
    }

    /// Registers `start .. start + len` (whole pages of `page_size`) for
    /// `mode`. Only this module calls it, for ranges an `unsafe` caller or
    /// a borrowed [`LinuxMemory`](crate::LinuxMemory) vouches for.
    fn register_range(
        &self,
        start: usize,
        len: usize,
        mode: RegisterMode,
        page_size: PageSize,
    ) -> Result<Ioctls, UffdError> {
        check_pages("UFFDIO_REGISTER", start, len, page_size)?;
        if mode.is_empty() {
            return Err(UffdError::ModeUnsupported {
                mode,
                backing: "any",
                why: "no mode was given: ask for MISSING, MINOR and/or WRITE_PROTECT",
            });
        }
        let mut arg = sys::UffdioRegister {
            range: sys::UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: mode.bits(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a uffdio_register; registering
        // changes no memory contents (faults will wait for placements).
        unsafe { ioctl(self.as_fd(), sys::UFFDIO_REGISTER, &mut arg) }.map_err(|errno| {
            UffdError::sys(
                "UFFDIO_REGISTER",
                format!("{len:#x} bytes at {start:#x} for {mode}"),
                errno,
                register_hint(errno),
            )
        })?;
        let ioctls = Ioctls::from_bits_retain(arg.ioctls);
        self.registry.record(Registration {
            start,
            end: start + len,
            page_size,
            ioctls,
            mode,
        });
        Ok(ioctls)
    }

    /// Unregisters `start .. start + len`; faults there are no longer
    /// reported, and threads waiting on them are woken.
    ///
    /// Safe with any address: the kernel unregisters only what this
    /// descriptor registered, and nothing's contents change.
    pub fn unregister(&self, start: *mut u8, len: usize) -> Result<(), UffdError> {
        let start = start as usize;
        let page_size = self
            .registry
            .find(start, len)
            .map_or_else(host_page_size, |r| r.page_size);
        check_pages("UFFDIO_UNREGISTER", start, len, page_size)?;
        let mut range = sys::UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER takes a uffdio_range; it changes no
        // memory contents.
        unsafe { ioctl(self.as_fd(), sys::UFFDIO_UNREGISTER, &mut range) }.map_err(|errno| {
            UffdError::sys(
                "UFFDIO_UNREGISTER",
                format!("{len:#x} bytes at {start:#x}"),
                errno,
                register_hint(errno),
            )
        })?;
        self.registry.forget(start, start + len);
        Ok(())
    }

    /// Waits up to `timeout` (`None`: for ever) for one event and returns
    /// it; `Ok(None)` when the time ran out. Safe to call from several
    /// threads: each event goes to one of them.
    pub fn read_event(&self, timeout: Option<Duration>) -> Result<Option<Event>, UffdError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let mut msg = [0u8; sys::MSG_SIZE];
            match rustix::io::read(&self.fd, &mut msg) {
                Ok(n) if n == sys::MSG_SIZE => return Ok(Some(Event::decode(&msg))),
                Ok(len) => {
                    return Err(UffdError::ShortRead {
                        len,
                        expected: sys::MSG_SIZE,
                    })
                }
                // Nothing yet (or another reader took it): wait below.
                Err(Errno::AGAIN) => {}
                Err(Errno::INTR) => continue,
                Err(errno) => {
                    return Err(UffdError::sys(
                        "read",
                        "reading a userfaultfd event",
                        errno,
                        "the descriptor must be an initialised userfaultfd",
                    ))
                }
            }
            let wait_ms = match deadline {
                None => -1,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    // Round up, so a sub-millisecond remainder still sleeps.
                    i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
                }
            };
            self.poll_readable(wait_ms)?;
        }
    }

    /// `poll` for readability for up to `wait_ms` (-1: for ever); returns
    /// early on a signal, leaving the caller to retry the read.
    fn poll_readable(&self, wait_ms: i32) -> Result<(), UffdError> {
        let mut pollfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, counted as one.
        let ret = unsafe { libc::poll(&mut pollfd, 1, wait_ms) };
        if ret < 0 {
            let errno = last_errno();
            if errno == Errno::INTR {
                return Ok(());
            }
            return Err(UffdError::sys(
                "poll",
                "waiting for a userfaultfd event",
                errno,
                "the descriptor must be open",
            ));
        }
        if pollfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(UffdError::sys(
                "poll",
                "waiting for a userfaultfd event",
                Errno::BADF,
                "the userfaultfd reported an error condition: it is not initialised or not open",
            ));
        }
        Ok(())
    }

    /// Places a copy of `src` at `dst` (`UFFDIO_COPY`), waking the threads
    /// waiting there if `wake`. `src.len()` and `dst` must be whole pages
    /// of the registered range (whole hugepages on hugetlb memory; checked
    /// first, from what [`Userfaultfd::register`] recorded). Partial copies
    /// and `EINTR` are retried; pages already present are left alone
    /// ([`Placed::AlreadyPresent`]) and the rest placed.
    ///
    /// # Safety
    /// `dst .. dst + src.len()` must lie inside a range registered on this
    /// descriptor, and nothing may rely on its missing pages staying
    /// missing: the kernel fills them without a Rust write.
    pub unsafe fn copy(&self, dst: *mut u8, src: &[u8], wake: bool) -> Result<Placed, UffdError> {
        let dst = dst as usize;
        let page_size = self.registered_page_size(dst, src.len())?;
        check_pages("UFFDIO_COPY", dst, src.len(), page_size)?;
        let (src_start, src_end) = (src.as_ptr() as usize, src.as_ptr() as usize + src.len());
        if self.registry.overlaps(src_start, src_end) {
            return Err(UffdError::SourceRegistered {
                src: src_start as u64,
                len: src.len() as u64,
            });
        }
        // SAFETY: the caller vouches for the destination; `src` is a live
        // slice of `src.len()` bytes outside registered memory.
        unsafe { self.fill(Fill::Copy(src.as_ptr()), dst, src.len(), page_size, wake) }
    }

    /// Places zero pages at `dst .. dst + len` (`UFFDIO_ZEROPAGE`), waking
    /// waiters if `wake`. Hugetlb memory has no zero page:
    /// [`UffdError::ZeropageUnsupported`] (copy zeros instead).
    ///
    /// # Safety
    /// As for [`Userfaultfd::copy`].
    pub unsafe fn zeropage(
        &self,
        dst: *mut u8,
        len: usize,
        wake: bool,
    ) -> Result<Placed, UffdError> {
        let dst = dst as usize;
        let page_size = self.registered_page_size(dst, len)?;
        if page_size > host_page_size() {
            return Err(UffdError::ZeropageUnsupported { page_size });
        }
        check_pages("UFFDIO_ZEROPAGE", dst, len, page_size)?;
        // SAFETY: the caller vouches for the destination.
        unsafe { self.fill(Fill::Zero, dst, len, page_size, wake) }
    }

    /// Maps the page-cache pages already at `dst .. dst + len` of a range
    /// registered for [`RegisterMode::MINOR`] (`UFFDIO_CONTINUE`), waking
    /// waiters if `wake`. Their contents are whatever was written to the
    /// page cache (through another mapping or the file).
    ///
    /// # Safety
    /// As for [`Userfaultfd::copy`].
    pub unsafe fn continue_minor(
        &self,
        dst: *mut u8,
        len: usize,
        wake: bool,
    ) -> Result<Placed, UffdError> {
        let dst = dst as usize;
        let page_size = self.registered_page_size(dst, len)?;
        check_pages("UFFDIO_CONTINUE", dst, len, page_size)?;
        // SAFETY: the caller vouches for the destination.
        unsafe { self.fill(Fill::Continue, dst, len, page_size, wake) }
    }

    /// Runs a placement ioctl until all of `dst .. dst + len` is in place:
    /// partial progress and `EINTR` are retried, a page already present is
    /// stepped over (and woken, if asked).
    ///
    /// # Safety
    /// `dst .. dst + len` is whole pages of `page_size` inside a range
    /// registered here that may be filled; a `Fill::Copy` source holds
    /// `len` readable bytes.
    unsafe fn fill(
        &self,
        op: Fill,
        dst: usize,
        len: usize,
        page_size: PageSize,
        wake: bool,
    ) -> Result<Placed, UffdError> {
        let page = page_size.bytes() as usize;
        let mut done = 0;
        let mut all_placed = true;
        while done < len {
            let (at, rest) = (dst + done, len - done);
            // SAFETY: `at .. at + rest` is the unplaced tail of the
            // caller's range; a copy's source advances with it.
            let (result, placed) = unsafe { self.fill_once(op, at, rest, done, wake) };
            match result {
                Ok(()) => break,
                // A partial placement (EAGAIN): carry on from where it stopped.
                Err(_) if placed > 0 => done += placed,
                Err(Errno::INTR) => {}
                Err(Errno::EXIST) => {
                    all_placed = false;
                    if wake {
                        self.wake_range(at, page)?;
                    }
                    done += page;
                }
                Err(errno) => {
                    return Err(UffdError::sys(
                        op.name(),
                        if done == 0 {
                            format!("{len:#x} bytes at {dst:#x}")
                        } else {
                            format!("{rest:#x} bytes at {at:#x}, the rest of {len:#x} at {dst:#x}")
                        },
                        errno,
                        fill_hint(errno),
                    ))
                }
            }
        }
        Ok(if all_placed {
            Placed::Placed
        } else {
            Placed::AlreadyPresent
        })
    }

    /// One placement ioctl over `dst .. dst + len`, `src_offset` bytes into
    /// a copy's source; returns its result and the bytes it placed.
    ///
    /// # Safety
    /// As for [`Userfaultfd::fill`], for this sub-range.
    unsafe fn fill_once(
        &self,
        op: Fill,
        dst: usize,
        len: usize,
        src_offset: usize,
        wake: bool,
    ) -> (Result<(), Errno>, usize) {
        let mode = if wake { 0 } else { sys::MODE_DONTWAKE };
        let range = sys::UffdioRange {
            start: dst as u64,
            len: len as u64,
        };
        let fd = self.as_fd();
        match op {
            Fill::Copy(src) => {
                let mut arg = sys::UffdioCopy {
                    dst: dst as u64,
                    src: src.wrapping_add(src_offset) as u64,
                    len: len as u64,
                    mode,
                    copy: 0,
                };
                // SAFETY: a uffdio_copy for UFFDIO_COPY; the destination and
                // source are the caller's contract.
                let result = unsafe { ioctl(fd, sys::UFFDIO_COPY, &mut arg) };
                (result, progress(arg.copy, len))
            }
            Fill::Zero => {
                let mut arg = sys::UffdioZeropage {
                    range,
                    mode,
                    zeropage: 0,
                };
                // SAFETY: a uffdio_zeropage for UFFDIO_ZEROPAGE; the
                // destination is the caller's contract.
                let result = unsafe { ioctl(fd, sys::UFFDIO_ZEROPAGE, &mut arg) };
                (result, progress(arg.zeropage, len))
            }
            Fill::Continue => {
                let mut arg = sys::UffdioContinue {
                    range,
                    mode,
                    mapped: 0,
                };
                // SAFETY: a uffdio_continue for UFFDIO_CONTINUE; it maps
                // pages already in the page cache, at the caller's say.
                let result = unsafe { ioctl(fd, sys::UFFDIO_CONTINUE, &mut arg) };
                (result, progress(arg.mapped, len))
            }
        }
    }

    /// Wakes the threads waiting on faults in `start .. start + len`
    /// without placing anything (after placing with `wake: false`).
    ///
    /// Safe with any address: it only wakes threads waiting on this
    /// descriptor's faults (a woken thread whose page is still missing
    /// faults again), and changes no memory.
    pub fn wake(&self, start: *mut u8, len: usize) -> Result<(), UffdError> {
        let start = start as usize;
        check_pages("UFFDIO_WAKE", start, len, host_page_size())?;
        self.wake_range(start, len)
    }

    fn wake_range(&self, start: usize, len: usize) -> Result<(), UffdError> {
        let mut range = sys::UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE takes a uffdio_range and only wakes threads.
        unsafe { ioctl(self.as_fd(), sys::UFFDIO_WAKE, &mut range) }.map_err(|errno| {
            UffdError::sys(
                "UFFDIO_WAKE",
                format!("{len:#x} bytes at {start:#x}"),
                errno,
                fill_hint(errno),
            )
        })
    }

    /// Write-protects `start .. start + len` (`protect`), or lifts the
    /// protection, waking the writers waiting there if `wake` (which only
    /// matters when lifting: protecting has no one to wake). The range
    /// must be registered for [`RegisterMode::WRITE_PROTECT`]; pages not
    /// present are not protected (unless [`Features::WP_UNPOPULATED`]).
    /// A range this descriptor has not registered is
    /// [`UffdError::NotRegistered`], before any ioctl.
    ///
    /// Safe: the kernel changes protection only inside ranges registered
    /// on this descriptor for write-protect, which safe code can register
    /// only over guest RAM ([`Userfaultfd::register_memory`]); contents
    /// never change, and a writer there waits until the protection is
    /// lifted.
    pub fn write_protect(
        &self,
        start: *mut u8,
        len: usize,
        protect: bool,
        wake: bool,
    ) -> Result<(), UffdError> {
        let start = start as usize;
        let page_size = self.registered_page_size(start, len)?;
        check_pages("UFFDIO_WRITEPROTECT", start, len, page_size)?;
        // Protecting wakes no one, and the kernel refuses DONTWAKE with it.
        let mode = match (protect, wake) {
            (true, _) => sys::WRITEPROTECT_MODE_WP,
            (false, true) => 0,
            (false, false) => sys::WRITEPROTECT_MODE_DONTWAKE,
        };
        loop {
            let mut arg = sys::UffdioWriteprotect {
                range: sys::UffdioRange {
                    start: start as u64,
                    len: len as u64,
                },
                mode,
            };
            // SAFETY: UFFDIO_WRITEPROTECT takes a uffdio_writeprotect; it
            // changes page protection, never contents.
            match unsafe { ioctl(self.as_fd(), sys::UFFDIO_WRITEPROTECT, &mut arg) } {
                Ok(()) => return Ok(()),
                Err(Errno::INTR) => continue,
                Err(errno) => {
                    return Err(UffdError::sys(
                        "UFFDIO_WRITEPROTECT",
                        format!(
                            "{} {len:#x} bytes at {start:#x}",
                            if protect { "protecting" } else { "unprotecting" }
                        ),
                        errno,
                        match errno {
                            Errno::INVAL => "the range must be registered for WRITE_PROTECT (see the ioctls register returned)",
                            _ => fill_hint(errno),
                        },
                    ))
                }
            }
        }
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_splits_and_replaces_records() {
        let registry = Registry::default();
        let record = |start, end| Registration {
            start,
            end,
            page_size: PageSize::SIZE_4K,
            ioctls: Ioctls::empty(),
            mode: RegisterMode::MISSING,
        };
        let spans = |registry: &Registry| -> Vec<(usize, usize)> {
            registry.list().iter().map(|r| (r.start, r.end)).collect()
        };
        registry.record(record(0x10000, 0x20000));
        registry.forget(0x14000, 0x18000);
        assert_eq!(spans(&registry), [(0x10000, 0x14000), (0x18000, 0x20000)]);
        assert!(registry.find(0x10000, 0x4000).is_some());
        assert!(
            registry.find(0x12000, 0x4000).is_none(),
            "straddles the hole"
        );
        assert!(registry.find(usize::MAX - 0xfff, 0x2000).is_none());
        assert!(registry.overlaps(0x13000, 0x15000));
        assert!(!registry.overlaps(0x14000, 0x18000));
        // A new registration replaces the part of an old record it covers.
        registry.record(record(0x0, 0x12000));
        assert_eq!(
            spans(&registry),
            [(0x12000, 0x14000), (0x18000, 0x20000), (0x0, 0x12000)]
        );
    }
}
