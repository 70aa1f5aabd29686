//! The userfaultfd bit sets: [`Features`] of the kernel and of a
//! descriptor, the [`RegisterMode`] of a range and the [`Ioctls`] it
//! supports. Each prints as `NAME | NAME` (or `none`) in messages.

#[cfg(doc)]
use super::Userfaultfd;
use std::fmt;

bitflags::bitflags! {
    /// `UFFD_FEATURE_*`: what a kernel's userfaultfd can do, and what one
    /// descriptor was opened with.
    #[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
    pub struct Features: u64 {
        /// Write-protect faults are reported (`UFFDIO_REGISTER_MODE_WP`).
        const PAGEFAULT_FLAG_WP = 1 << 0;
        /// `fork` events (not supported here: the child's descriptor
        /// would arrive in a message).
        const EVENT_FORK = 1 << 1;
        /// `mremap` events.
        const EVENT_REMAP = 1 << 2;
        /// `madvise(MADV_REMOVE/DONTNEED)` events ([`Event::Remove`]);
        /// the `madvise` waits until the event is read.
        const EVENT_REMOVE = 1 << 3;
        /// Missing faults on hugetlb memory.
        const MISSING_HUGETLBFS = 1 << 4;
        /// Missing faults on shared memory (shmem, memfd).
        const MISSING_SHMEM = 1 << 5;
        /// `munmap` events ([`Event::Unmap`]); the `munmap` waits until the
        /// event is read.
        const EVENT_UNMAP = 1 << 6;
        /// Faults raise SIGBUS instead of being reported.
        const SIGBUS = 1 << 7;
        /// Fault messages carry the faulting thread's id.
        const THREAD_ID = 1 << 8;
        /// Minor faults on hugetlb memory.
        const MINOR_HUGETLBFS = 1 << 9;
        /// Minor faults on shared memory.
        const MINOR_SHMEM = 1 << 10;
        /// Fault addresses are not rounded down to the page.
        const EXACT_ADDRESS = 1 << 11;
        /// Write-protect mode on hugetlb and shared memory.
        const WP_HUGETLBFS_SHMEM = 1 << 12;
        /// Write-protecting unpopulated anonymous memory protects it too.
        const WP_UNPOPULATED = 1 << 13;
        /// `UFFDIO_POISON`.
        const POISON = 1 << 14;
        /// Write-protect faults are resolved by the kernel, not reported.
        const WP_ASYNC = 1 << 15;
        /// `UFFDIO_MOVE`.
        const MOVE = 1 << 16;
    }
}

impl Features {
    /// The features [`Userfaultfd::new`] asks for when the kernel offers
    /// them: those that only widen what registration can do. Features that
    /// change behaviour are left to [`Userfaultfd::with_features`]: event
    /// reporting makes `munmap`/`madvise` of registered memory wait for a
    /// reader, SIGBUS and WP_ASYNC stop faults from being reported.
    pub const CAPABILITIES: Features = Features::PAGEFAULT_FLAG_WP
        .union(Features::MISSING_HUGETLBFS)
        .union(Features::MISSING_SHMEM)
        .union(Features::MINOR_HUGETLBFS)
        .union(Features::MINOR_SHMEM)
        .union(Features::WP_HUGETLBFS_SHMEM);
}

bitflags::bitflags! {
    /// `UFFDIO_REGISTER_MODE_*`: which faults a registered range reports.
    #[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
    pub struct RegisterMode: u64 {
        /// Faults on pages that are not there at all.
        const MISSING = 1 << 0;
        /// Writes to pages write-protected with [`Userfaultfd::write_protect`].
        const WRITE_PROTECT = 1 << 1;
        /// Faults on shared or hugetlb pages that are in the page cache but
        /// not mapped here; resolved with [`Userfaultfd::continue_minor`].
        const MINOR = 1 << 2;
    }
}

bitflags::bitflags! {
    /// The ioctls a registered range supports (`uffdio_register.ioctls`,
    /// one bit per `_UFFDIO_*` number).
    #[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
    pub struct Ioctls: u64 {
        /// `UFFDIO_REGISTER`.
        const REGISTER = 1 << 0x00;
        /// `UFFDIO_UNREGISTER`.
        const UNREGISTER = 1 << 0x01;
        /// `UFFDIO_WAKE`.
        const WAKE = 1 << 0x02;
        /// `UFFDIO_COPY`.
        const COPY = 1 << 0x03;
        /// `UFFDIO_ZEROPAGE` (never on hugetlb memory).
        const ZEROPAGE = 1 << 0x04;
        /// `UFFDIO_MOVE`.
        const MOVE = 1 << 0x05;
        /// `UFFDIO_WRITEPROTECT` (ranges registered for write-protect).
        const WRITEPROTECT = 1 << 0x06;
        /// `UFFDIO_CONTINUE` (ranges registered for minor faults).
        const CONTINUE = 1 << 0x07;
        /// `UFFDIO_POISON`.
        const POISON = 1 << 0x08;
        /// `UFFDIO_API`.
        const API = 1 << 0x3F;
    }
}

/// Prints flags as `A | B`, or `none`.
fn write_flags<F: bitflags::Flags>(flags: &F, f: &mut fmt::Formatter<'_>) -> fmt::Result
where
    F::Bits: bitflags::parser::WriteHex,
{
    if flags.is_empty() {
        f.write_str("none")
    } else {
        bitflags::parser::to_writer(flags, f)
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_flags(self, f)
    }
}

impl fmt::Display for RegisterMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_flags(self, f)
    }
}

impl fmt::Display for Ioctls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_flags(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_print_by_name() {
        assert_eq!(
            (Features::MINOR_SHMEM | Features::MISSING_SHMEM).to_string(),
            "MISSING_SHMEM | MINOR_SHMEM"
        );
        assert_eq!(RegisterMode::empty().to_string(), "none");
        assert_eq!(
            (RegisterMode::MISSING | RegisterMode::WRITE_PROTECT).to_string(),
            "MISSING | WRITE_PROTECT"
        );
    }
}
