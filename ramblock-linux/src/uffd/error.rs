//! [`UffdError`]: what was asked, what the kernel said (the errno is kept)
//! and what to do about it.

use super::{Features, RegisterMode};
use ramblock_core::addr::PageSize;
use rustix::io::Errno;

/// Everything that can go wrong with userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The kernel refused to hand out a userfaultfd (`EPERM`/`EACCES`).
    #[error(
        "userfaultfd is not permitted ({errno}, errno {raw}): run as root, or set \
         vm.unprivileged_userfaultfd=1 (sysctl), or grant access to /dev/userfaultfd",
        raw = errno.raw_os_error()
    )]
    NotPermitted {
        /// The errno of the last attempt.
        errno: Errno,
    },
    /// The kernel was built without userfaultfd (`ENOSYS`).
    #[error(
        "this kernel has no userfaultfd ({errno}, errno {raw}, and no /dev/userfaultfd): \
         use a kernel built with CONFIG_USERFAULTFD=y",
        raw = errno.raw_os_error()
    )]
    NoKernelSupport {
        /// The errno of the `userfaultfd(2)` call.
        errno: Errno,
    },
    /// A feature the kernel's userfaultfd does not offer.
    #[error(
        "the kernel's userfaultfd lacks {missing}, needed for {needed_for} (it offers {offered}): \
         use a newer kernel or do without it"
    )]
    FeatureMissing {
        /// The features asked for that are missing.
        missing: Features,
        /// Everything the kernel offers.
        offered: Features,
        /// What they were needed for.
        needed_for: &'static str,
    },
    /// A feature this module does not support asking for.
    #[error("userfaultfd feature {feature} cannot be asked for here: {why}")]
    FeatureRefused {
        /// The feature.
        feature: Features,
        /// Why not.
        why: &'static str,
    },
    /// A registration mode that cannot work on this memory.
    #[error("userfaultfd {mode} registration does not work on {backing} memory: {why}")]
    ModeUnsupported {
        /// The mode asked for.
        mode: RegisterMode,
        /// The backing of the memory.
        backing: &'static str,
        /// Why, and what to do instead.
        why: &'static str,
    },
    /// An address or length that is not a whole number of pages.
    #[error(
        "{what} {value:#x} is not a multiple of the range's {page_size} page size: \
         userfaultfd works on whole pages (hugetlb memory on whole hugepages)"
    )]
    Unaligned {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
        /// The page size it must be a multiple of.
        page_size: PageSize,
    },
    /// A zero-length range.
    #[error("{op} was given an empty range: pass at least one page")]
    EmptyRange {
        /// The operation.
        op: &'static str,
    },
    /// A placement outside a registered block.
    #[error(
        "offset {offset:#x} + {len:#x} is outside the registered block of {block_len:#x} bytes: \
         stay below the block's length"
    )]
    OutOfRange {
        /// The offset asked for.
        offset: u64,
        /// The length asked for.
        len: u64,
        /// The block's registered length.
        block_len: u64,
    },
    /// Data for one placement that is not exactly one page.
    #[error("{len:#x} bytes given for one placement, but the block's page size is {page_size}: pass exactly one page")]
    WrongLength {
        /// The data's length.
        len: u64,
        /// The block's page size.
        page_size: PageSize,
    },
    /// A range this userfaultfd has not registered.
    #[error(
        "{addr:#x} + {len:#x} is not inside one range registered on this userfaultfd: \
         register it first (or stay inside one registration)"
    )]
    NotRegistered {
        /// The start asked for.
        addr: u64,
        /// The length asked for.
        len: u64,
    },
    /// `UFFDIO_ZEROPAGE` on hugetlb memory, which the kernel does not offer.
    #[error(
        "UFFDIO_ZEROPAGE is not supported on hugetlb memory ({page_size} pages): \
         place a page of zeros with UFFDIO_COPY instead"
    )]
    ZeropageUnsupported {
        /// The range's hugepage size.
        page_size: PageSize,
    },
    /// Source data that lies in memory registered on this userfaultfd:
    /// copying it could fault on itself and never finish.
    #[error(
        "the source {src:#x} + {len:#x} lies in memory registered on this userfaultfd: \
         copy from a buffer outside registered memory"
    )]
    SourceRegistered {
        /// The source's address.
        src: u64,
        /// Its length.
        len: u64,
    },
    /// A system call or ioctl failed.
    #[error("{call} failed for {what}: {errno} (errno {raw}); {hint}", raw = errno.raw_os_error())]
    Sys {
        /// The call.
        call: &'static str,
        /// What it was doing.
        what: String,
        /// The errno.
        errno: Errno,
        /// What to do about it.
        hint: &'static str,
    },
    /// A `read` that returned less than one whole `uffd_msg`.
    #[error("read a {len}-byte userfaultfd message, expected {expected}: the kernel's uffd_msg layout is not the one this code knows")]
    ShortRead {
        /// Bytes read.
        len: usize,
        /// `sizeof(struct uffd_msg)`.
        expected: usize,
    },
}

impl UffdError {
    /// The errno behind the error, if a system call failed.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            UffdError::NotPermitted { errno }
            | UffdError::NoKernelSupport { errno }
            | UffdError::Sys { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Whether userfaultfd cannot be used on this host at all (not
    /// permitted, or not in the kernel), as opposed to a failed request.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            UffdError::NotPermitted { .. } | UffdError::NoKernelSupport { .. }
        )
    }

    pub(crate) fn sys(
        call: &'static str,
        what: impl Into<String>,
        errno: Errno,
        hint: &'static str,
    ) -> UffdError {
        UffdError::Sys {
            call,
            what: what.into(),
            errno,
            hint,
        }
    }
}
