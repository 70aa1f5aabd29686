//! The KVM calls kvm-ioctls lacks: `KVM_CLEAR_DIRTY_LOG`, a raw
//! `KVM_GET_DIRTY_LOG` into a caller buffer, `KVM_RESET_DIRTY_RINGS`, and the
//! mapping of a vCPU's dirty ring.
//!
//! The ioctl numbers come from nix's macros over kvm-bindings' structs, so
//! their size is checked against the kernel's layout at compile time.

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_gfn, kvm_dirty_log};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

/// `KVMIO` from `<linux/kvm.h>`.
const KVMIO: u8 = 0xAE;

/// The raw ioctl functions nix generates. They are `unsafe` because the
/// caller vouches for the fd and for the buffer behind each pointer; the
/// safe wrappers below do that, so the module is private and its generated
/// functions carry no docs of their own.
#[allow(missing_docs, clippy::missing_safety_doc)]
mod raw {
    use super::*;
    // `#define KVM_GET_DIRTY_LOG _IOW(KVMIO, 0x42, struct kvm_dirty_log)`
    nix::ioctl_write_ptr!(kvm_get_dirty_log, KVMIO, 0x42, kvm_dirty_log);
    // `#define KVM_CLEAR_DIRTY_LOG _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`:
    // read-write in the kernel's numbering, so `ioctl_readwrite!` (the
    // write-only macro would produce a different request number).
    nix::ioctl_readwrite!(kvm_clear_dirty_log, KVMIO, 0xc0, kvm_clear_dirty_log);
    // `#define KVM_RESET_DIRTY_RINGS _IO(KVMIO, 0xc7)`
    nix::ioctl_none!(kvm_reset_dirty_rings, KVMIO, 0xc7);
}

/// `KVM_DIRTY_GFN_F_DIRTY`: the entry holds a dirty page for userspace.
pub const DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`: userspace has collected the entry.
pub const DIRTY_GFN_F_RESET: u32 = 1 << 1;

/// `KVM_GET_DIRTY_LOG` for `slot` into `bitmap`, which must hold one bit per
/// page of the slot.
pub fn get_dirty_log(vm: BorrowedFd<'_>, slot: u32, bitmap: &mut [u64]) -> nix::Result<()> {
    let log = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_bindings::kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `vm` is a VM fd; the kernel writes one bit per page of the
    // slot into `bitmap`, and callers size `bitmap` for the slot's pages
    // (the slot table allocates it from the same page count it registered).
    unsafe { raw::kvm_get_dirty_log(vm.as_raw_fd(), &log) }.map(drop)
}

/// `KVM_CLEAR_DIRTY_LOG`: re-protects the pages of `slot` whose bits are set
/// in `bitmap`, which covers `num_pages` pages from `first_page`.
/// `first_page` must be a multiple of 64 and `num_pages` a multiple of 64 or
/// reach the slot's end; the kernel checks both (`EINVAL`).
pub fn clear_dirty_log(
    vm: BorrowedFd<'_>,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &mut [u64],
) -> nix::Result<()> {
    if bitmap.len() * 64 < num_pages as usize {
        return Err(nix::errno::Errno::EINVAL);
    }
    let mut clear = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `vm` is a VM fd; the kernel reads `num_pages` bits from
    // `bitmap`, which was checked above to hold at least that many.
    unsafe { raw::kvm_clear_dirty_log(vm.as_raw_fd(), &mut clear) }.map(drop)
}

/// `KVM_RESET_DIRTY_RINGS`: re-protects every page userspace has marked
/// collected in any vCPU's ring. Returns how many entries were reset.
pub fn reset_dirty_rings(vm: BorrowedFd<'_>) -> nix::Result<u32> {
    // SAFETY: `vm` is a VM fd; the ioctl takes no argument.
    unsafe { raw::kvm_reset_dirty_rings(vm.as_raw_fd()) }.map(|n| n as u32)
}

/// One vCPU's dirty ring, mapped from its fd at
/// `KVM_DIRTY_LOG_PAGE_OFFSET * page size`.
///
/// The kernel produces entries (sets `DIRTY`); we consume them in order with
/// acquire loads of `flags`, then hand each back with a release store of
/// `RESET`, as `Documentation/virt/kvm/api.rst` prescribes.
#[derive(Debug)]
pub struct DirtyRing {
    entries: NonNull<kvm_dirty_gfn>,
    count: u32,
    /// Index of the next entry to look at (free-running, masked on use).
    fetch: u32,
}

// SAFETY: the mapping is owned by this value and only touched through
// `&mut self` (or dropped); the kernel is the only other party.
unsafe impl Send for DirtyRing {}

/// A collected ring entry: which slot (address space in the high 16 bits)
/// and which page of it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RingEntry {
    /// `(as_id << 16) | slot_id`.
    pub slot: u32,
    /// Page index inside the slot.
    pub offset: u64,
}

impl DirtyRing {
    /// Maps the ring of `count` entries (a power of two) of the vCPU `vcpu`.
    pub fn map(vcpu: BorrowedFd<'_>, count: u32) -> nix::Result<DirtyRing> {
        let page = host_page_size();
        let len = count as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let offset = i64::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET) * page as i64;
        let len_nz = std::num::NonZeroUsize::new(len).ok_or(nix::errno::Errno::EINVAL)?;
        // SAFETY: a fresh shared mapping of the vCPU fd's dirty-ring pages;
        // nothing else in the process refers to the address range it returns.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                len_nz,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                vcpu,
                offset,
            )
        }?;
        Ok(DirtyRing {
            entries: ptr.cast(),
            count,
            fetch: 0,
        })
    }

    /// Entries in the ring.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Collects every entry the kernel has published since the last call,
    /// in order, calling `f` for each, and marks each collected. Returns how
    /// many were collected. The caller then issues `KVM_RESET_DIRTY_RINGS`.
    pub fn collect(&mut self, mut f: impl FnMut(RingEntry)) -> u32 {
        let mut n = 0;
        while n < self.count {
            let index = (self.fetch & (self.count - 1)) as usize;
            // SAFETY: `index < count`, and the mapping holds `count` entries.
            let entry = unsafe { self.entries.as_ptr().add(index) };
            // SAFETY: `flags` is an aligned u32 in the shared mapping; the
            // kernel writes it concurrently, so it is accessed atomically
            // only. AtomicU32 has the same layout as u32.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
            // Acquire: the slot and offset written before DIRTY are visible.
            if flags.load(Ordering::Acquire) & DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            // SAFETY: the entry is published (DIRTY seen with acquire), and
            // the kernel does not touch it again until we set RESET.
            let (slot, offset) = unsafe {
                (
                    std::ptr::addr_of!((*entry).slot).read_volatile(),
                    std::ptr::addr_of!((*entry).offset).read_volatile(),
                )
            };
            f(RingEntry { slot, offset });
            // Release: our reads of the entry happen before the kernel may
            // reuse it.
            flags.store(DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let len = self.count as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps exactly the mapping made in `map`, which nothing
        // else refers to.
        let _ = unsafe { nix::sys::mman::munmap(self.entries.cast(), len) };
    }
}

/// The host's base page size.
pub fn host_page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}
