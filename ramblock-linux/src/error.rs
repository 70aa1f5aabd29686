//! Errors: what was asked, what the host said (the errno is kept), and what
//! to do about it.

use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::flags::FlagsError;
use rustix::io::Errno;
use std::path::PathBuf;

/// A combination of builder options that cannot work, found before any
/// system call is made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// A length of zero was asked for.
    #[error("the used length is zero: ask for at least one page")]
    ZeroLength,
    /// `used_length > max_length`.
    #[error(
        "used length {used} exceeds max length {max}: raise max_length or lower the used length"
    )]
    UsedExceedsMax {
        /// The used length.
        used: ByteLen,
        /// The max length.
        max: ByteLen,
    },
    /// A length or offset that is not a whole number of pages.
    #[error(
        "{what} {value:#x} is not a multiple of the {page_size} page size: round it to whole pages"
    )]
    Unaligned {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
        /// The page size it must be a multiple of.
        page_size: PageSize,
    },
    /// A huge page size the host does not offer.
    #[error("the host has no {page_size} hugepage pool (sizes offered: {offered:?} KiB): pick one of those")]
    UnsupportedHugePageSize {
        /// The size asked for.
        page_size: PageSize,
        /// The pools found under /sys/kernel/mm/hugepages, in KiB.
        offered: Vec<u64>,
    },
    /// Transparent hugepages asked for on hugetlb memory, which is huge already.
    #[error("transparent hugepages with hugetlb memory: hugetlb pages are huge already; drop one of them")]
    ThpWithHugetlb,
    /// Transparent hugepages asked for where they cannot apply.
    #[error(
        "transparent hugepages on {backing} memory: THP only applies to anonymous and memfd memory"
    )]
    ThpUnsupported {
        /// The backing.
        backing: &'static str,
    },
    /// Read-only anonymous memory would read zero forever.
    #[error(
        "read-only {backing} memory would always read as zero: only files can be mapped read-only"
    )]
    ReadOnlyWithoutFile {
        /// The backing.
        backing: &'static str,
    },
    /// The block flags these options imply contradict each other.
    #[error("{0}")]
    Flags(FlagsError),
    /// A hugepage size given for a backing that takes its page size from
    /// elsewhere (a file's filesystem, the caller).
    #[error("a hugepage size cannot be chosen for {backing} memory: {why}")]
    HugePageSizeNotApplicable {
        /// The backing.
        backing: &'static str,
        /// Where its page size comes from instead.
        why: &'static str,
    },
    /// Caller memory cannot be resized, reserved or mapped differently.
    #[error("caller memory cannot take option {option}: ramblock never maps or remaps it")]
    CallerOption {
        /// The option.
        option: &'static str,
    },
    /// A guest_memfd's size and mapping are fixed by KVM.
    #[error("guest_memfd memory cannot take option {option}: KVM fixed its size when it created it, and it is mapped shared, in base pages, from offset 0")]
    GuestMemfdOption {
        /// The option.
        option: &'static str,
    },
    /// Memory over another process's fd is mapped shared, in the fd's own
    /// page size, and only memfds and files can be shared.
    #[error("memory over a received fd cannot take {option}: it is another process's memfd or file, mapped shared in the fd's own page size")]
    SharedFdOption {
        /// The option.
        option: &'static str,
    },
    /// Caller memory whose pointer is not page aligned.
    #[error("caller memory at {addr:#x} is not aligned to its {page_size} page size")]
    CallerUnaligned {
        /// The address.
        addr: usize,
        /// Its page size.
        page_size: PageSize,
    },
    /// Zero preallocation threads.
    #[error("preallocation with zero threads: use at least one")]
    ZeroThreads,
    /// A NUMA binding with no nodes.
    #[error("NUMA binding with an empty node set: name at least one node")]
    NoNumaNodes,
    /// A length that does not fit this host's address space.
    #[error("{len} does not fit in this host's address space")]
    TooLarge {
        /// The length.
        len: ByteLen,
    },
}

/// Everything that can go wrong with Linux host memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The builder's options contradict each other or the host.
    #[error("invalid memory options: {0}")]
    Options(#[from] OptionsError),
    /// The guest_memfd could not be duplicated for the memory to own.
    #[error("cannot duplicate the guest_memfd: {errno}; raise the open-files limit")]
    GuestMemfdDup {
        /// What the kernel said.
        errno: Errno,
    },
    /// A received fd could not be duplicated for the memory to own.
    #[error("cannot duplicate the received fd: {errno}; raise the open-files limit")]
    SharedFdDup {
        /// What the kernel said.
        errno: Errno,
    },
    /// A received fd is not what its sender said it was.
    #[error("the received fd was announced as {claimed:?} but is {} with {page_size} pages: the sender's block table does not match its fds", if *hugetlbfs { "on hugetlbfs" } else { "not on hugetlbfs" })]
    SharedFdKind {
        /// What the sender said.
        claimed: crate::memory::BackingKind,
        /// The fd's page size.
        page_size: PageSize,
        /// Whether the fd is on hugetlbfs.
        hugetlbfs: bool,
    },
    /// userfaultfd failed (registering memory, placing pages).
    #[error("userfaultfd: {0}")]
    Userfault(#[from] crate::uffd::UffdError),
    /// Post-copy on the destination failed outside the memory itself
    /// (registering blocks, starting the guest, the return path). The
    /// core's receiver reports a post-copy target's errors as the memory's,
    /// so [`PostcopyDestination`](crate::postcopy::PostcopyDestination)'s
    /// arrive here.
    #[error("post-copy: {0}")]
    Postcopy(#[from] crate::postcopy::PostcopyError),
    /// A system call failed.
    #[error("{call} failed for {what}: {errno} (errno {raw}); {hint}", raw = errno.raw_os_error())]
    Sys {
        /// The system call.
        call: &'static str,
        /// What it was doing.
        what: String,
        /// The errno.
        errno: Errno,
        /// What to do about it.
        hint: &'static str,
    },
    /// A file operation failed.
    #[error("{call} on {path:?} failed: {errno} (errno {raw}); {hint}", raw = errno.raw_os_error())]
    File {
        /// The operation.
        call: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The errno.
        errno: Errno,
        /// What to do about it.
        hint: &'static str,
    },
    /// The hugetlb pool has too few free pages.
    #[error(
        "not enough free {page_size} hugepages: {needed} needed, {free} free{errno_text}; \
         raise the pool with `echo N > {pool}/nr_hugepages` (or /proc/sys/vm/nr_hugepages for the default size)",
        errno_text = errno.map(|e| format!(" (the kernel said {e}, errno {})", e.raw_os_error())).unwrap_or_default()
    )]
    HugetlbPoolExhausted {
        /// The pool's page size.
        page_size: PageSize,
        /// Hugepages the request needs.
        needed: u64,
        /// Hugepages free in the pool when it failed.
        free: u64,
        /// The pool's sysfs directory.
        pool: PathBuf,
        /// The errno, when a system call reported it.
        errno: Option<Errno>,
    },
    /// A range outside the used part of the memory.
    #[error(
        "range {offset:#x}+{len:#x} is outside the {used:#x} bytes in use: stay below used_len"
    )]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// The used length.
        used: u64,
    },
    /// A length past the reservation.
    #[error(
        "{asked} asked for, only {reserved} is reserved: build the memory with a larger max_length"
    )]
    TooLong {
        /// What was asked.
        asked: ByteLen,
        /// The reservation.
        reserved: ByteLen,
    },
    /// An offset or length that is not a whole number of pages.
    #[error("{what} {value:#x} is not a multiple of the {page_size} page size (hugetlb ranges must be whole hugepages)")]
    Unaligned {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
        /// The page size.
        page_size: PageSize,
    },
    /// The memory cannot change size.
    #[error("{backing} memory cannot be resized from {used} to {asked}: build ramblock-owned memory instead")]
    NotResizable {
        /// The backing.
        backing: &'static str,
        /// Current length.
        used: ByteLen,
        /// Asked length.
        asked: ByteLen,
    },
    /// A write-like operation on read-only memory.
    #[error("{op} on read-only memory: map the file writable to {op}")]
    ReadOnly {
        /// The operation.
        op: &'static str,
    },
    /// A NUMA node the host does not have.
    #[error("{}", numa_text(*node, online))]
    NoSuchNumaNode {
        /// The node asked for.
        node: u32,
        /// The host's online nodes.
        online: Vec<u32>,
    },
    /// A file is too small and cannot be extended.
    #[error("{path:?} holds {size} bytes but {needed} are needed and it is opened read-only: extend the file or lower the length")]
    FileTooSmall {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// What is needed (offset + max length).
        needed: u64,
    },
}

fn numa_text(node: u32, online: &[u32]) -> String {
    if online.len() <= 1 {
        format!(
            "NUMA node {node} does not exist: this is a single-node host (online nodes: {online:?}), \
             so there is nothing to bind to; drop the NUMA binding"
        )
    } else {
        format!("NUMA node {node} is not online (online nodes: {online:?}): bind to one of those")
    }
}

impl Error {
    /// The errno behind the error, if a system call failed.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Sys { errno, .. } | Error::File { errno, .. } => Some(*errno),
            Error::HugetlbPoolExhausted { errno, .. } => *errno,
            Error::Userfault(e) => e.errno(),
            Error::Postcopy(e) => e.errno(),
            _ => None,
        }
    }

    pub(crate) fn sys(
        call: &'static str,
        what: impl Into<String>,
        errno: Errno,
        hint: &'static str,
    ) -> Error {
        Error::Sys {
            call,
            what: what.into(),
            errno,
            hint,
        }
    }
}
