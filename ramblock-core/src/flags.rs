//! Block flags: what kind of memory a block is and how it may be used.
//!
//! The set mirrors QEMU's `RAM_*` flags on a `RAMBlock`. Combinations that
//! cannot work are rejected by [`BlockFlags::validate`] with a [`FlagsError`]
//! that names the conflict, never by an assertion.

use core::fmt;

bitflags::bitflags! {
    /// Properties of a RAM block.
    #[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
    pub struct BlockFlags: u32 {
        /// The host memory was mapped by the caller; ramblock never maps,
        /// remaps or unmaps it.
        const CALLER_PREALLOCATED = 1 << 0;
        /// The host mapping is shared (`MAP_SHARED`), not private.
        const SHARED = 1 << 1;
        /// `used_length` may change within `max_length`.
        const RESIZABLE = 1 << 2;
        /// userfaultfd can place zero pages in this block (`UFFDIO_ZEROPAGE`).
        const UFFD_ZEROPAGE = 1 << 3;
        /// The block's contents are migrated.
        const MIGRATABLE = 1 << 4;
        /// The block is persistent memory (needs a shared, synced mapping).
        const PMEM = 1 << 5;
        /// userfaultfd write-protect mode may be used on this block.
        const UFFD_WRITE_PROTECT = 1 << 6;
        /// Swap space is not reserved for the mapping (`MAP_NORESERVE`).
        const NO_RESERVE = 1 << 7;
        /// The contents are protected from the host (confidential guest).
        const PROTECTED = 1 << 8;
        /// Backed by a named file the VMM opened.
        const NAMED_FILE = 1 << 9;
        /// The mapping is read-only; the guest cannot write it.
        const READ_ONLY = 1 << 10;
        /// The backing file descriptor is opened read-only.
        const READ_ONLY_FD = 1 << 11;
        /// Private memory lives in a KVM guest_memfd beside the shared mapping.
        const GUEST_MEMFD = 1 << 12;
    }
}

/// A combination of [`BlockFlags`] that cannot work.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FlagsError {
    /// A read-only file descriptor cannot back a writable shared mapping:
    /// writes would have to reach the file.
    ReadOnlyFdWritableShared,
    /// A resizable block needs memory ramblock can grow; caller-preallocated
    /// memory is fixed.
    ResizableCallerMemory,
    /// Persistent memory must be mapped shared, or writes never reach it.
    PmemNotShared,
    /// Protected (confidential) memory cannot be read by the host, so it
    /// cannot be migrated.
    ProtectedMigratable,
    /// Caller-preallocated memory and a named file are two different sources
    /// of host memory.
    CallerMemoryNamedFile,
    /// Write-protect tracking of a read-only mapping would never fire.
    UffdWriteProtectReadOnly,
}

impl fmt::Display for FlagsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlagsError::ReadOnlyFdWritableShared => {
                "READ_ONLY_FD with a writable SHARED mapping: add READ_ONLY or map it private"
            }
            FlagsError::ResizableCallerMemory => {
                "RESIZABLE with CALLER_PREALLOCATED: caller memory cannot grow; drop one of them"
            }
            FlagsError::PmemNotShared => "PMEM without SHARED: persistent memory must be mapped shared",
            FlagsError::ProtectedMigratable => {
                "PROTECTED with MIGRATABLE: protected memory is unreadable by the host and cannot migrate"
            }
            FlagsError::CallerMemoryNamedFile => {
                "CALLER_PREALLOCATED with NAMED_FILE: the memory comes either from the caller or from a file"
            }
            FlagsError::UffdWriteProtectReadOnly => {
                "UFFD_WRITE_PROTECT with READ_ONLY: a read-only mapping never takes write faults"
            }
        })
    }
}

impl core::error::Error for FlagsError {}

impl BlockFlags {
    /// Checks that the flags describe memory that can exist.
    pub fn validate(self) -> Result<(), FlagsError> {
        let has = |f: BlockFlags| self.contains(f);
        if has(Self::READ_ONLY_FD) && has(Self::SHARED) && !has(Self::READ_ONLY) {
            return Err(FlagsError::ReadOnlyFdWritableShared);
        }
        if has(Self::RESIZABLE) && has(Self::CALLER_PREALLOCATED) {
            return Err(FlagsError::ResizableCallerMemory);
        }
        if has(Self::PMEM) && !has(Self::SHARED) {
            return Err(FlagsError::PmemNotShared);
        }
        if has(Self::PROTECTED) && has(Self::MIGRATABLE) {
            return Err(FlagsError::ProtectedMigratable);
        }
        if has(Self::CALLER_PREALLOCATED) && has(Self::NAMED_FILE) {
            return Err(FlagsError::CallerMemoryNamedFile);
        }
        if has(Self::UFFD_WRITE_PROTECT) && has(Self::READ_ONLY) {
            return Err(FlagsError::UffdWriteProtectReadOnly);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_contradiction_has_its_error() {
        use BlockFlags as F;
        let cases = [
            (
                F::READ_ONLY_FD | F::SHARED,
                FlagsError::ReadOnlyFdWritableShared,
            ),
            (
                F::RESIZABLE | F::CALLER_PREALLOCATED,
                FlagsError::ResizableCallerMemory,
            ),
            (F::PMEM, FlagsError::PmemNotShared),
            (
                F::PROTECTED | F::MIGRATABLE,
                FlagsError::ProtectedMigratable,
            ),
            (
                F::CALLER_PREALLOCATED | F::NAMED_FILE,
                FlagsError::CallerMemoryNamedFile,
            ),
            (
                F::UFFD_WRITE_PROTECT | F::READ_ONLY,
                FlagsError::UffdWriteProtectReadOnly,
            ),
        ];
        for (flags, err) in cases {
            assert_eq!(flags.validate(), Err(err), "{flags:?}");
        }
    }

    #[test]
    fn sensible_combinations_pass() {
        use BlockFlags as F;
        for flags in [
            F::empty(),
            F::MIGRATABLE | F::RESIZABLE,
            F::READ_ONLY_FD | F::READ_ONLY | F::SHARED | F::NAMED_FILE,
            F::READ_ONLY_FD | F::NAMED_FILE, // private copy-on-write of a read-only file
            F::PMEM | F::SHARED | F::NAMED_FILE | F::MIGRATABLE,
            F::CALLER_PREALLOCATED | F::MIGRATABLE,
        ] {
            assert_eq!(flags.validate(), Ok(()), "{flags:?}");
        }
    }
}
