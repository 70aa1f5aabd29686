//! Dirty-ring mode (`KVM_CAP_DIRTY_LOG_RING`, or its acquire/release
//! variant): each vCPU pushes the pages it dirties into a ring shared with
//! userspace. Enabling sizes the rings, creating a vCPU maps its ring,
//! collecting drains every ring into the slots' pending bits and hands the
//! entries back with `KVM_RESET_DIRTY_RINGS`.
//!
//! Lock order: rings, then slots. vCPU threads collect on ring-full exits
//! while the migration thread harvests.

use super::{require, ModeKernel};
use crate::caps::Capabilities;
use crate::error::KvmError;
use crate::lock;
use crate::memslot::{Slot, SlotId, SlotTable};
use crate::mode::DirtyLogMode;
use crate::vm::Vm;
use kvm_bindings::{kvm_dirty_gfn, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL};
use kvm_ioctls::{VcpuFd, VmFd};
use nix::errno::Errno;
use ramblock_core::bitmap::WORD_BITS;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// The raw ioctl nix generates; see [`reset_dirty_rings`].
#[allow(missing_docs, clippy::missing_safety_doc)]
mod raw {
    // `#define KVM_RESET_DIRTY_RINGS _IO(KVMIO, 0xc7)`
    nix::ioctl_none!(kvm_reset_dirty_rings, crate::dirty::KVMIO, 0xc7);
}

/// `KVM_DIRTY_GFN_F_DIRTY`: the entry holds a dirty page for userspace.
const DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`: userspace has collected the entry.
const DIRTY_GFN_F_RESET: u32 = 1 << 1;

/// `KVM_RESET_DIRTY_RINGS`: re-protects every page userspace has marked
/// collected in any vCPU's ring. Returns how many entries were reset.
fn reset_dirty_rings(vm: &VmFd) -> nix::Result<u32> {
    // SAFETY: `vm` is a KVM VM fd, so the request means
    // KVM_RESET_DIRTY_RINGS; it takes no argument and touches no memory of
    // ours except through the rings' shared mappings.
    unsafe { raw::kvm_reset_dirty_rings(vm.as_raw_fd()) }.map(|n| n as u32)
}

/// Dirty-ring mode's kernel side: the ring size enabled on the VM and the
/// rings of its vCPUs.
#[derive(Debug)]
pub(crate) struct Ring {
    /// Entries per vCPU ring: exactly what `KVM_ENABLE_CAP` was given, so
    /// every ring mapped is as long as the kernel's.
    entries: u32,
    acq_rel: bool,
    rings: Mutex<Vec<DirtyRing>>,
}

impl Ring {
    /// Enables rings of `entries` (a power of two within what `caps`
    /// allows), preferring the acquire/release variant.
    pub(crate) fn enable(fd: &VmFd, caps: &Capabilities, entries: u32) -> Result<Ring, KvmError> {
        let acq_rel = caps.dirty_ring_acq_rel_max_bytes > 0;
        let (cap, max) = if acq_rel {
            (
                KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                caps.dirty_ring_acq_rel_max_bytes,
            )
        } else {
            (KVM_CAP_DIRTY_LOG_RING, caps.dirty_ring_max_bytes)
        };
        let entry = std::mem::size_of::<kvm_dirty_gfn>() as u64;
        let bytes = u64::from(entries) * entry;
        if !entries.is_power_of_two() || bytes > u64::from(max) {
            return Err(KvmError::RingSize {
                entries,
                why: format!(
                    "it must be a power of two of at most {} entries on this host",
                    u64::from(max) / entry
                ),
            });
        }
        super::enable_cap(fd, cap, bytes).map_err(|errno| match errno {
            Errno::EINVAL => KvmError::RingSize {
                entries,
                why: "KVM refused it (EINVAL): it is below the kernel's minimum (one \
                      page, and more than the entries KVM reserves per vCPU); use a \
                      larger power of two"
                    .into(),
            },
            errno => KvmError::ioctl(format!("KVM_ENABLE_CAP(dirty ring, {bytes} B)"), errno),
        })?;
        Ok(Ring {
            entries,
            acq_rel,
            rings: Mutex::new(Vec::new()),
        })
    }
}

impl ModeKernel for Ring {
    fn mode(&self) -> DirtyLogMode {
        DirtyLogMode::Ring {
            entries: self.entries,
        }
    }

    fn ring_acq_rel(&self) -> bool {
        self.acq_rel
    }

    fn needs_reaping(&self) -> bool {
        true
    }

    fn vcpu_created(&self, vcpu: &VcpuFd, id: u64) -> Result<(), KvmError> {
        let ring = DirtyRing::map(vcpu, self.entries)
            .map_err(|e| KvmError::ioctl(format!("mmap of vCPU {id}'s dirty ring"), e))?;
        lock(&self.rings).push(ring);
        Ok(())
    }

    /// Drains every vCPU's ring into the slots' pending bits and re-arms
    /// the collected pages with `KVM_RESET_DIRTY_RINGS`. Entries still in
    /// a running vCPU's hardware log (Intel PML) appear at its next exit,
    /// so the final harvest of a migration runs with the vCPUs stopped.
    fn collect(&self, vm: &VmFd, slots: &Mutex<SlotTable>) -> Result<u64, KvmError> {
        let mut rings = lock(&self.rings);
        let mut slots = lock(slots);
        let mut total = 0u64;
        for ring in rings.iter_mut() {
            total += u64::from(ring.collect(|e| {
                // Only address space 0 (no SMM) is mapped.
                if e.slot >> 16 != 0 {
                    return;
                }
                if let Some(slot) = slots.get_mut(SlotId(e.slot & 0xffff)) {
                    if slot.kernel_logs() && e.offset < slot.pages() {
                        let (w, b) = (e.offset as usize / WORD_BITS, e.offset % 64);
                        slot.log.pending[w] |= 1 << b;
                        slot.log.pending_any = true;
                    }
                }
            }));
        }
        if total > 0 {
            reset_dirty_rings(vm).map_err(|e| KvmError::ioctl("KVM_RESET_DIRTY_RINGS", e))?;
        }
        Ok(total)
    }

    /// Nothing per slot: the entries arrived in the pending bits.
    fn fetch(&self, _: &VmFd, _: &mut Slot) -> Result<bool, KvmError> {
        Ok(false)
    }
}

/// One vCPU's dirty ring, mapped from its fd at
/// `KVM_DIRTY_LOG_PAGE_OFFSET * page size`.
///
/// The kernel produces entries (sets `DIRTY`); we consume them in order with
/// acquire loads of `flags`, then hand each back with a release store of
/// `RESET`, as `Documentation/virt/kvm/api.rst` prescribes.
///
/// The mapping holds a reference to the vCPU's file, and KVM frees a ring
/// only when the whole VM goes, which that reference prevents: the ring
/// stays valid after the vCPU's fd is closed, until it is unmapped here.
#[derive(Debug)]
struct DirtyRing {
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
struct RingEntry {
    /// `(as_id << 16) | slot_id`.
    slot: u32,
    /// Page index inside the slot.
    offset: u64,
}

impl DirtyRing {
    /// Maps the ring of `count` entries of `vcpu`. `count` is the size
    /// enabled on the VM ([`Ring::entries`]): a longer mapping would reach
    /// pages the kernel does not back (`SIGBUS` on access), a shorter one
    /// would miss entries. A power of two, so indexes wrap with a mask.
    fn map(vcpu: &VcpuFd, count: u32) -> nix::Result<DirtyRing> {
        if !count.is_power_of_two() {
            return Err(Errno::EINVAL);
        }
        let len = count as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let offset = i64::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET) * host_page_size() as i64;
        let len_nz = std::num::NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
        // SAFETY: `vcpu` owns the descriptor and outlives the borrow (the
        // mapping takes its own reference to the file).
        let fd = unsafe { BorrowedFd::borrow_raw(vcpu.as_raw_fd()) };
        // SAFETY: a fresh shared mapping of the vCPU fd's dirty-ring pages,
        // at an address the kernel picks; nothing else in the process
        // refers to the range it returns.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                len_nz,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                fd,
                offset,
            )
        }?;
        Ok(DirtyRing {
            entries: ptr.cast(),
            count,
            fetch: 0,
        })
    }

    /// Collects every entry the kernel has published since the last call,
    /// in order, calling `f` for each, and marks each collected. Returns how
    /// many were collected. The caller then issues `KVM_RESET_DIRTY_RINGS`.
    fn collect(&mut self, mut f: impl FnMut(RingEntry)) -> u32 {
        let mut n = 0;
        while n < self.count {
            let index = (self.fetch & (self.count - 1)) as usize;
            // SAFETY: `index < count`, and the mapping holds `count` entries.
            let entry = unsafe { self.entries.as_ptr().add(index) };
            // SAFETY: `flags` is an aligned u32 in the shared mapping, which
            // lives as long as `self`; the kernel writes it concurrently
            // (READ_ONCE/WRITE_ONCE/smp_store_release), so it is accessed
            // atomically only. AtomicU32 has the same layout as u32.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
            // Acquire: the slot and offset written before DIRTY are visible.
            if flags.load(Ordering::Acquire) & DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            // SAFETY: the entry is published (DIRTY seen with acquire), and
            // the kernel does not touch it again until we set RESET and call
            // KVM_RESET_DIRTY_RINGS; volatile because the memory is shared.
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

/// The host's base page size, which scales the ring's mmap offset.
fn host_page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// Dirty-ring mode's [`DirtyLogSource`](ramblock_core::dirty_log::DirtyLogSource); see the module docs.
#[derive(Copy, Clone, Debug)]
pub struct RingLog<'vm> {
    pub(super) vm: &'vm Vm,
}

impl<'vm> RingLog<'vm> {
    /// The ring log of `vm`, which must be in [`DirtyLogMode::Ring`].
    pub fn new(vm: &'vm Vm) -> Result<Self, KvmError> {
        require(vm, "the dirty-ring log", DirtyLogMode::Ring { entries: 0 })?;
        Ok(RingLog { vm })
    }
}
