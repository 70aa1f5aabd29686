//! [`MemoryBuilder`]: every backing and option in one place, validated up
//! front so an impossible mix is a typed error before any system call.

use crate::advice::{Hint, LockMode};
use crate::error::{Error, OptionsError};
use crate::memory::{BackingKind, LinuxMemory};
use crate::mmap::{self, host_page_size, MapSpec, Source};
use crate::numa::{self, NumaBinding};
use crate::prealloc::Prealloc;
use crate::{file, hugetlb, memfd};
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::ptr::NonNull;

/// Where the memory comes from.
#[derive(Clone, Debug)]
enum Origin {
    Anonymous,
    Memfd,
    File {
        path: PathBuf,
    },
    Caller {
        ptr: NonNull<u8>,
        page_size: PageSize,
    },
    /// A KVM guest_memfd created with the mmap and init-shared flags; shared
    /// by every builder clone, duplicated for the memory that is built.
    GuestMemfd {
        fd: std::sync::Arc<OwnedFd>,
    },
    /// Another process's memfd or file, received over a UNIX socket
    /// ([`crate::local_update`]); duplicated for the memory that is built.
    SharedFd {
        fd: std::sync::Arc<OwnedFd>,
        kind: BackingKind,
    },
}

impl Origin {
    fn name(&self) -> &'static str {
        match self {
            Origin::Anonymous => "anonymous",
            Origin::Memfd => "memfd",
            Origin::File { .. } => "file",
            Origin::Caller { .. } => "caller",
            Origin::GuestMemfd { .. } => "guest_memfd",
            Origin::SharedFd { .. } => "shared fd",
        }
    }
}

/// Builds a [`LinuxMemory`].
///
/// ```
/// use ramblock_core::addr::ByteLen;
/// use ramblock_core::host::HostMemory;
/// use ramblock_linux::MemoryBuilder;
///
/// let mut mem = MemoryBuilder::anonymous(ByteLen(4 << 20))
///     .max_length(ByteLen(16 << 20))
///     .build()
///     .unwrap();
/// let base = mem.base();
/// mem.set_used_len(ByteLen(16 << 20)).unwrap(); // grows in place
/// assert_eq!(mem.base(), base);
/// ```
#[derive(Clone, Debug)]
pub struct MemoryBuilder {
    origin: Origin,
    used: ByteLen,
    max: Option<ByteLen>,
    shared: Option<bool>,
    no_reserve: bool,
    thp: bool,
    huge: Option<PageSize>,
    read_only: bool,
    read_only_fd: bool,
    offset: u64,
    name: String,
    prealloc: Option<Prealloc>,
    zero_threads: bool,
    hints: Vec<Hint>,
    lock: Option<LockMode>,
    numa: Option<NumaBinding>,
}

impl MemoryBuilder {
    fn new(origin: Origin, used: ByteLen) -> MemoryBuilder {
        MemoryBuilder {
            origin,
            used,
            max: None,
            shared: None,
            no_reserve: false,
            thp: false,
            huge: None,
            read_only: false,
            read_only_fd: false,
            offset: 0,
            name: String::from("ramblock"),
            prealloc: None,
            zero_threads: false,
            hints: Vec::new(),
            lock: None,
            numa: None,
        }
    }

    /// Anonymous memory (private unless [`MemoryBuilder::shared`]).
    pub fn anonymous(used_len: ByteLen) -> MemoryBuilder {
        Self::new(Origin::Anonymous, used_len)
    }

    /// Anonymous hugetlb memory (`MAP_HUGETLB`) with pages of `page_size`.
    pub fn hugetlb(used_len: ByteLen, page_size: PageSize) -> MemoryBuilder {
        Self::anonymous(used_len).huge_pages(page_size)
    }

    /// A memfd (shared unless `.shared(false)`), sized to `max_length` and
    /// sealed against growing and shrinking. Add
    /// [`MemoryBuilder::huge_pages`] for a hugetlb memfd.
    pub fn memfd(used_len: ByteLen) -> MemoryBuilder {
        Self::new(Origin::Memfd, used_len)
    }

    /// A file at `path`, or a new unlinked file if `path` is a directory
    /// (private unless [`MemoryBuilder::shared`]). The page size comes from
    /// the filesystem (hugetlbfs reports its hugepage size).
    pub fn file(path: impl Into<PathBuf>, used_len: ByteLen) -> MemoryBuilder {
        Self::new(Origin::File { path: path.into() }, used_len)
    }

    /// A KVM guest_memfd of `used_len` bytes (from `KVM_CREATE_GUEST_MEMFD`
    /// with `GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED`; ramblock-kvm's
    /// `Vm::create_guest_memfd` makes one), mapped shared from offset 0. Its
    /// size was fixed when KVM created it, so it cannot be resizable; the
    /// block flag [`BlockFlags::GUEST_MEMFD`] is set. Map it into the VM with
    /// `Vm::map_guest_memfd_block`, which hands KVM the fd as well.
    pub fn guest_memfd(fd: OwnedFd, used_len: ByteLen) -> MemoryBuilder {
        Self::new(
            Origin::GuestMemfd {
                fd: std::sync::Arc::new(fd),
            },
            used_len,
        )
    }

    /// The memory behind `fd`, a memfd (hugetlb or not) or a file that
    /// another process made (received over a UNIX socket, see
    /// [`crate::local_update`]), mapped shared from
    /// [`MemoryBuilder::offset`]: both processes then see the same pages.
    /// `kind` is what the other side says it is; the page size comes from
    /// the fd itself (hugetlbfs reports its hugepage size) and must agree
    /// with `kind`, and the file must hold `offset + max_length` bytes.
    /// Only [`BackingKind::Memfd`] and [`BackingKind::File`] are accepted.
    pub fn shared_fd(fd: OwnedFd, kind: BackingKind, used_len: ByteLen) -> MemoryBuilder {
        Self::new(
            Origin::SharedFd {
                fd: std::sync::Arc::new(fd),
                kind,
            },
            used_len,
        )
    }

    /// Memory the caller already mapped: `len` bytes at `ptr` with pages of
    /// `page_size`. ramblock never maps, remaps or unmaps it, and it cannot
    /// be resized. Discarding uses `MADV_DONTNEED` (`MADV_REMOVE` if
    /// declared [`MemoryBuilder::shared`]), so it must be anonymous memory
    /// for discarded pages to read as zero.
    ///
    /// # Safety
    /// `ptr .. ptr + len` must be mapped readable and writable for as long as
    /// the built [`LinuxMemory`] lives, and not be unmapped or remapped by
    /// anyone while it does. It becomes guest RAM: safe calls discard it,
    /// preallocate it, and let userfaultfd fill or write-protect it
    /// ([`Userfaultfd::register_memory`](crate::uffd::Userfaultfd::register_memory)),
    /// so nothing may access it through Rust references while the
    /// [`LinuxMemory`] lives.
    pub unsafe fn caller(ptr: NonNull<u8>, len: ByteLen, page_size: PageSize) -> MemoryBuilder {
        Self::new(Origin::Caller { ptr, page_size }, len)
    }

    /// Reserves `max` bytes so the memory can grow in place up to it.
    pub fn max_length(mut self, max: ByteLen) -> Self {
        self.max = Some(max);
        self
    }

    /// Maps the memory shared (`MAP_SHARED`) or private.
    pub fn shared(mut self, shared: bool) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Skips reserving swap space or hugetlb pages (`MAP_NORESERVE`): memory
    /// is committed only when touched, and may then fail.
    pub fn no_reserve(mut self, no_reserve: bool) -> Self {
        self.no_reserve = no_reserve;
        self
    }

    /// Asks for transparent hugepages (`MADV_HUGEPAGE`); anonymous and memfd only.
    pub fn transparent_hugepages(mut self, thp: bool) -> Self {
        self.thp = thp;
        self
    }

    /// Uses hugetlb pages of `page_size` (anonymous and memfd only; a file's
    /// page size comes from its filesystem).
    pub fn huge_pages(mut self, page_size: PageSize) -> Self {
        self.huge = Some(page_size);
        self
    }

    /// Maps the memory read-only (files only).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Opens the file `O_RDONLY`: with a shared mapping the memory must then
    /// be read-only too; a private mapping stays writable (copy-on-write).
    pub fn read_only_fd(mut self, read_only_fd: bool) -> Self {
        self.read_only_fd = read_only_fd;
        self
    }

    /// Starts the memory `offset` bytes into the file (files only; a
    /// multiple of the filesystem's page size).
    pub fn offset(mut self, offset: u64) -> Self {
        self.offset = offset;
        self
    }

    /// Names the memfd or temporary file (shows in `/proc/<pid>/maps`).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// Preallocates the memory at build (and what growing adds later).
    pub fn prealloc(mut self, settings: Prealloc) -> Self {
        self.prealloc = Some(settings);
        self
    }

    /// Preallocates with `threads` threads (zero is an error at build).
    pub fn prealloc_threads(mut self, threads: usize) -> Self {
        let mut settings = self.prealloc.unwrap_or_default();
        settings.threads = NonZeroUsize::new(threads);
        self.zero_threads = threads == 0;
        self.prealloc = Some(settings);
        self
    }

    /// Gives `hint` for the whole reservation at build.
    pub fn hint(mut self, hint: Hint) -> Self {
        self.hints.push(hint);
        self
    }

    /// Locks the memory into RAM at build.
    pub fn mlock(mut self, mode: LockMode) -> Self {
        self.lock = Some(mode);
        self
    }

    /// Binds the memory to NUMA nodes before any page is touched.
    pub fn numa(mut self, binding: NumaBinding) -> Self {
        self.numa = Some(binding);
        self
    }

    fn is_shared(&self) -> bool {
        self.shared.unwrap_or(matches!(
            self.origin,
            Origin::Memfd | Origin::GuestMemfd { .. } | Origin::SharedFd { .. }
        ))
    }

    /// The block flags the options imply.
    fn implied_flags(&self, max: ByteLen) -> BlockFlags {
        let mut flags = BlockFlags::empty();
        flags.set(BlockFlags::SHARED, self.is_shared());
        flags.set(BlockFlags::NO_RESERVE, self.no_reserve);
        flags.set(BlockFlags::READ_ONLY, self.read_only);
        flags.set(BlockFlags::READ_ONLY_FD, self.read_only_fd);
        flags.set(BlockFlags::RESIZABLE, max != self.used);
        match &self.origin {
            Origin::File { path } if !path.is_dir() => flags |= BlockFlags::NAMED_FILE,
            Origin::Caller { .. } => flags |= BlockFlags::CALLER_PREALLOCATED,
            Origin::GuestMemfd { .. } => flags |= BlockFlags::GUEST_MEMFD,
            _ => {}
        }
        flags
    }

    /// Checks every option that does not need the host, returning the max
    /// length and the implied flags.
    fn validate(&self) -> Result<(ByteLen, BlockFlags), OptionsError> {
        let origin = self.origin.name();
        if self.used.0 == 0 {
            return Err(OptionsError::ZeroLength);
        }
        let max = self.max.unwrap_or(self.used);
        if self.used > max {
            return Err(OptionsError::UsedExceedsMax {
                used: self.used,
                max,
            });
        }
        if usize::try_from(max.0).is_err() {
            return Err(OptionsError::TooLarge { len: max });
        }
        if let Origin::Caller { ptr, page_size } = self.origin {
            let refused = [
                (max != self.used, "max_length"),
                (self.no_reserve, "no_reserve"),
                (self.thp, "transparent_hugepages"),
                (self.read_only || self.read_only_fd, "read_only"),
            ];
            if let Some((_, option)) = refused.iter().find(|(bad, _)| *bad) {
                return Err(OptionsError::CallerOption { option });
            }
            if self.huge.is_some() {
                return Err(OptionsError::HugePageSizeNotApplicable {
                    backing: origin,
                    why: "the caller states the page size of its memory",
                });
            }
            if ptr.as_ptr() as u64 % page_size.bytes() != 0 {
                return Err(OptionsError::CallerUnaligned {
                    addr: ptr.as_ptr() as usize,
                    page_size,
                });
            }
        }
        if let Origin::GuestMemfd { .. } = self.origin {
            let refused = [
                (max != self.used, "max_length"),
                (self.shared == Some(false), "shared(false)"),
                (self.no_reserve, "no_reserve"),
                (self.thp, "transparent_hugepages"),
                (self.huge.is_some(), "huge_pages"),
                (self.offset != 0, "offset"),
            ];
            if let Some((_, option)) = refused.iter().find(|(bad, _)| *bad) {
                return Err(OptionsError::GuestMemfdOption { option });
            }
        }
        if let Origin::SharedFd { kind, .. } = self.origin {
            let refused = [
                (
                    !matches!(kind, BackingKind::Memfd(_) | BackingKind::File { .. }),
                    "a backing other than memfd or file",
                ),
                (self.shared == Some(false), "shared(false)"),
                (self.thp, "transparent_hugepages"),
                (self.huge.is_some(), "huge_pages"),
            ];
            if let Some((_, option)) = refused.iter().find(|(bad, _)| *bad) {
                return Err(OptionsError::SharedFdOption { option });
            }
        }
        let is_file = matches!(self.origin, Origin::File { .. } | Origin::SharedFd { .. });
        if let Some(page) = self.huge {
            if is_file {
                return Err(OptionsError::HugePageSizeNotApplicable {
                    backing: origin,
                    why: "it comes from the file's filesystem (mount hugetlbfs with pagesize=)",
                });
            }
            if self.thp {
                return Err(OptionsError::ThpWithHugetlb);
            }
            hugetlb::check_offered(page)?;
        }
        if self.thp && is_file {
            return Err(OptionsError::ThpUnsupported { backing: origin });
        }
        if !is_file && (self.read_only || self.read_only_fd) {
            return Err(OptionsError::ReadOnlyWithoutFile { backing: origin });
        }
        if self.zero_threads {
            return Err(OptionsError::ZeroThreads);
        }
        if matches!(&self.numa, Some(b) if b.nodes.is_empty()) {
            return Err(OptionsError::NoNumaNodes);
        }
        let flags = self.implied_flags(max);
        flags.validate().map_err(OptionsError::Flags)?;
        // The page size is known here for all but files.
        let page = match self.origin {
            Origin::Caller { page_size, .. } => Some(page_size),
            Origin::File { .. } | Origin::SharedFd { .. } => None,
            _ => Some(self.huge.unwrap_or_else(host_page_size)),
        };
        if let Some(page) = page {
            check_multiples(page, self.used, max, None)?;
        }
        Ok((max, flags))
    }

    /// Where the mapped part of a file ends: `offset + max`, which must fit.
    fn file_end(&self, max: ByteLen) -> Result<u64, OptionsError> {
        self.offset
            .checked_add(max.0)
            .ok_or(OptionsError::TooLarge {
                len: ByteLen(u64::MAX),
            })
    }

    /// Validates the options, then maps the memory, applies NUMA binding,
    /// hints, protection, locking and preallocation, in that order.
    pub fn build(self) -> Result<LinuxMemory, Error> {
        let (max, flags) = self.validate()?;
        if let Some(binding) = &self.numa {
            numa::check(binding)?;
        }
        let shared = self.is_shared();
        let mut memory = match &self.origin {
            Origin::Caller { ptr, page_size } => LinuxMemory {
                base: *ptr,
                reserved: max,
                used: self.used,
                page_size: *page_size,
                kind: BackingKind::Caller,
                fd: None,
                fd_offset: 0,
                shared,
                read_only: false,
                no_reserve: false,
                mapped_len: 0,
                lead_guard: 0,
                lock: None,
                prealloc: None,
                flags,
            },
            Origin::Anonymous
            | Origin::Memfd
            | Origin::File { .. }
            | Origin::GuestMemfd { .. }
            | Origin::SharedFd { .. } => self.map(max, flags)?,
        };
        for hint in self.thp.then_some(Hint::Hugepage).iter().chain(&self.hints) {
            memory.advise(*hint)?;
        }
        if let Some(binding) = &self.numa {
            memory.bind_numa(binding)?;
        }
        if memory.kind != BackingKind::Caller {
            // Makes the used part accessible (and preallocates it, once
            // `memory.prealloc` is set below).
            let used = self.used;
            memory.used = ByteLen::ZERO;
            memory.set_used_len(used)?;
        }
        if let Some(mode) = self.lock {
            memory.lock(mode)?;
        }
        if let Some(settings) = self.prealloc {
            memory.preallocate(settings)?;
            memory.prealloc = Some(settings);
        }
        Ok(memory)
    }

    /// Creates the backing and the reservation, all `PROT_NONE`.
    fn map(&self, max: ByteLen, flags: BlockFlags) -> Result<LinuxMemory, Error> {
        let shared = self.is_shared();
        let (fd, kind, page_size) = match &self.origin {
            Origin::Memfd => (
                Some(memfd::create(&self.name, max.0, self.huge)?),
                BackingKind::Memfd(self.huge),
                self.huge.unwrap_or_else(host_page_size),
            ),
            Origin::File { path } => {
                let backing = file::open(path, self.read_only_fd, &self.name)?;
                check_multiples(backing.page_size, self.used, max, Some(self.offset))?;
                let needed = self.file_end(max)?;
                file::ensure_size(&backing, needed, self.read_only_fd)?;
                (
                    Some(backing.fd),
                    BackingKind::File {
                        hugetlbfs: backing.hugetlbfs,
                    },
                    backing.page_size,
                )
            }
            Origin::SharedFd { fd, kind } => {
                let fd = fd.try_clone().map_err(|e| Error::SharedFdDup {
                    errno: rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::BADF),
                })?;
                let backing = file::inspect(fd, std::path::Path::new("(received fd)"))?;
                let expected = match *kind {
                    BackingKind::Memfd(huge) => huge.unwrap_or_else(host_page_size),
                    _ => backing.page_size,
                };
                let hugetlbfs_expected = match *kind {
                    BackingKind::Memfd(huge) => huge.is_some(),
                    BackingKind::File { hugetlbfs } => hugetlbfs,
                    _ => backing.hugetlbfs,
                };
                if backing.page_size != expected || backing.hugetlbfs != hugetlbfs_expected {
                    return Err(Error::SharedFdKind {
                        claimed: *kind,
                        page_size: backing.page_size,
                        hugetlbfs: backing.hugetlbfs,
                    });
                }
                check_multiples(backing.page_size, self.used, max, Some(self.offset))?;
                let needed = self.file_end(max)?;
                // Never grown: the other process's memory stays its size.
                file::ensure_size(&backing, needed, true)?;
                (Some(backing.fd), *kind, backing.page_size)
            }
            Origin::GuestMemfd { fd } => (
                Some(fd.try_clone().map_err(|e| Error::GuestMemfdDup {
                    errno: rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::BADF),
                })?),
                BackingKind::GuestMemfd,
                host_page_size(),
            ),
            _ => match self.huge {
                Some(page) => (None, BackingKind::Hugetlb(page), page),
                None => (None, BackingKind::Anonymous, host_page_size()),
            },
        };
        let len = usize::try_from(max.0).map_err(|_| OptionsError::TooLarge { len: max })?;
        let align = (2usize << 20).max(page_size.bytes() as usize);
        let guard = host_page_size().bytes() as usize;
        let source = match &fd {
            Some(fd) => Source::Fd(rustix::fd::AsFd::as_fd(fd), self.offset),
            None => Source::Anonymous,
        };
        let spec = MapSpec {
            source,
            shared,
            no_reserve: self.no_reserve,
            huge: match kind {
                BackingKind::Hugetlb(page) => Some(page),
                _ => None,
            },
            pool: (page_size > host_page_size()).then_some(page_size),
        };
        let base = mmap::reserve_and_map(len, align, guard, spec)?;
        Ok(LinuxMemory {
            base,
            reserved: max,
            used: ByteLen::ZERO,
            page_size,
            kind,
            fd,
            fd_offset: self.offset,
            shared,
            read_only: self.read_only,
            no_reserve: self.no_reserve,
            mapped_len: len + 2 * guard,
            lead_guard: guard,
            lock: None,
            prealloc: None,
            flags,
        })
    }
}

/// Checks that the lengths (and file offset) are whole pages.
fn check_multiples(
    page: PageSize,
    used: ByteLen,
    max: ByteLen,
    offset: Option<u64>,
) -> Result<(), OptionsError> {
    let values = [
        ("used length", used.0),
        ("max length", max.0),
        ("file offset", offset.unwrap_or(0)),
    ];
    for (what, value) in values {
        if !ByteLen(value).is_multiple_of(page) {
            return Err(OptionsError::Unaligned {
                what,
                value,
                page_size: page,
            });
        }
    }
    Ok(())
}
