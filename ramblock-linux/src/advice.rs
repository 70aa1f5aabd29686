//! `madvise` hints and `mlock`: telling the kernel how guest RAM is used.
#![allow(unsafe_code)]

use crate::error::Error;
use rustix::mm::{Advice, MlockFlags};

/// A hint about how a block's memory is used, given to `madvise`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Hint {
    /// `MADV_MERGEABLE`: let KSM merge identical pages (many similar guests).
    Mergeable,
    /// `MADV_DONTDUMP`: keep guest RAM out of the VMM's core dumps.
    DontDump,
    /// `MADV_DONTFORK`: a forked child does not inherit guest RAM (and a
    /// fork does not break pinned DMA pages).
    DontFork,
    /// `MADV_HUGEPAGE`: back the memory with transparent hugepages.
    Hugepage,
}

impl Hint {
    pub(crate) fn advice(self) -> Advice {
        match self {
            Hint::Mergeable => Advice::LinuxMergeable,
            Hint::DontDump => Advice::LinuxDontDump,
            Hint::DontFork => Advice::LinuxDontFork,
            Hint::Hugepage => Advice::LinuxHugepage,
        }
    }

    fn fix(self) -> &'static str {
        match self {
            Hint::Mergeable => "the kernel needs CONFIG_KSM; hugetlb memory cannot be merged",
            Hint::Hugepage => {
                "transparent hugepages must be enabled (/sys/kernel/mm/transparent_hugepage/enabled = madvise or always)"
            }
            Hint::DontDump | Hint::DontFork => "the range must be mapped memory ramblock owns",
        }
    }
}

/// How `mlock` pins the memory.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum LockMode {
    /// Fault in and pin every page now (`mlock`).
    Now,
    /// Pin pages as they are first touched (`mlock2(MLOCK_ONFAULT)`).
    OnFault,
}

/// Applies `advice` to `ptr .. ptr + len`; `what` names it in the error.
///
/// # Safety
/// The range must be memory this crate owns; advice that drops contents
/// (`MADV_DONTNEED`, `MADV_REMOVE`) must only be given where nothing relies
/// on the contents.
pub(crate) unsafe fn madvise(
    ptr: *mut u8,
    len: usize,
    advice: Advice,
    what: &str,
    hint: &'static str,
) -> Result<(), Error> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: the caller guarantees the range and the effect are ours.
    unsafe { rustix::mm::madvise(ptr.cast(), len, advice) }.map_err(|e| {
        Error::sys(
            "madvise",
            format!("{what} ({advice:?}) on {len:#x} bytes at {ptr:p}"),
            e,
            hint,
        )
    })
}

/// Gives `hint` for `ptr .. ptr + len`.
///
/// # Safety
/// The range must be memory this crate owns.
pub(crate) unsafe fn apply_hint(ptr: *mut u8, len: usize, hint: Hint) -> Result<(), Error> {
    // SAFETY: none of the hints changes contents; the range is the caller's.
    unsafe { madvise(ptr, len, hint.advice(), "a hint", hint.fix()) }
}

/// Locks `ptr .. ptr + len` into RAM.
///
/// # Safety
/// The range must be accessible memory this crate owns.
pub(crate) unsafe fn lock(ptr: *mut u8, len: usize, mode: LockMode) -> Result<(), Error> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: locking does not change contents; the range is the caller's.
    let result = unsafe {
        match mode {
            LockMode::Now => rustix::mm::mlock(ptr.cast(), len),
            LockMode::OnFault => rustix::mm::mlock_with(ptr.cast(), len, MlockFlags::ONFAULT),
        }
    };
    result.map_err(|e| {
        Error::sys(
            "mlock",
            format!("{len:#x} bytes at {ptr:p} ({mode:?})"),
            e,
            "raise RLIMIT_MEMLOCK (ulimit -l) or give the process CAP_IPC_LOCK",
        )
    })
}
