//! What the host's KVM offers for memslots and dirty logging, probed at
//! runtime with `KVM_CHECK_EXTENSION` on the VM fd (a VM may offer less
//! than the system fd says).

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_NR_MEMSLOTS, KVM_CAP_READONLY_MEM, KVM_CAP_USER_MEMORY2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use std::fmt;

/// The dirty-logging and memslot features of one VM.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: the flags it accepts
    /// (`MANUAL_PROTECT_ENABLE`, `INITIALLY_SET`); 0 when absent.
    pub manual_protect_flags: u32,
    /// `KVM_CAP_DIRTY_LOG_RING`: the largest ring in bytes; 0 when absent.
    pub dirty_ring_max_bytes: u32,
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`: the ring with acquire/release
    /// ordering (the only one on weakly ordered hosts); largest ring in bytes.
    pub dirty_ring_acq_rel_max_bytes: u32,
    /// `KVM_CAP_USER_MEMORY2`: `KVM_SET_USER_MEMORY_REGION2` exists.
    pub user_memory2: bool,
    /// `KVM_CAP_READONLY_MEM`: read-only memslots.
    pub readonly_mem: bool,
    /// `KVM_CAP_NR_MEMSLOTS`: memslots per address space.
    pub memslots: u32,
    /// `KVM_CAP_GUEST_MEMFD`: `KVM_CREATE_GUEST_MEMFD` exists (Linux 6.8).
    pub guest_memfd: bool,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS`: the `KVM_CREATE_GUEST_MEMFD` flags this
    /// VM accepts (Linux 6.18: [`GUEST_MEMFD_FLAG_MMAP`],
    /// [`GUEST_MEMFD_FLAG_INIT_SHARED`]); 0 when absent.
    pub guest_memfd_flags: u64,
}

/// `KVM_CAP_GUEST_MEMFD_FLAGS` (Linux 6.18; kvm-bindings 0.14 predates it).
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;
/// `GUEST_MEMFD_FLAG_MMAP`: the guest_memfd can be mmap'ed by the VMM.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED`: its memory starts shared with the host
/// (a non-confidential VM's RAM), so the mapping can be read and written.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
/// The guest_memfd flags a guest_memfd block needs: memory the VMM maps
/// like any other block.
pub const GUEST_MEMFD_WANTED: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

/// The manual-protect flags ramblock needs.
pub const MANUAL_PROTECT_WANTED: u32 =
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;

impl Capabilities {
    /// Asks the VM.
    pub fn probe(vm: &VmFd) -> Capabilities {
        let raw = |cap: u32| vm.check_extension_raw(libc::c_ulong::from(cap)).max(0);
        Capabilities {
            manual_protect_flags: raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) as u32,
            dirty_ring_max_bytes: raw(KVM_CAP_DIRTY_LOG_RING) as u32,
            dirty_ring_acq_rel_max_bytes: raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) as u32,
            user_memory2: raw(KVM_CAP_USER_MEMORY2) > 0,
            readonly_mem: raw(KVM_CAP_READONLY_MEM) > 0,
            // KVM reports at least 32 slots everywhere; a 0 would mean a
            // broken host, so fall back to the historic minimum.
            memslots: match raw(KVM_CAP_NR_MEMSLOTS) {
                0 => 32,
                n => n as u32,
            },
            guest_memfd: raw(kvm_bindings::KVM_CAP_GUEST_MEMFD) > 0,
            guest_memfd_flags: raw(KVM_CAP_GUEST_MEMFD_FLAGS) as u64,
        }
    }

    /// Whether manual protect with initially-set bitmaps is offered.
    pub fn manual_protect(&self) -> bool {
        self.manual_protect_flags & MANUAL_PROTECT_WANTED == MANUAL_PROTECT_WANTED
    }

    /// What a guest_memfd block needs and this VM lacks: the capability
    /// and the Linux release that brings it; `None` when it has it all.
    pub fn guest_memfd_missing(&self) -> Option<(&'static str, &'static str)> {
        if !self.user_memory2 {
            Some((
                "KVM_CAP_USER_MEMORY2 (KVM_SET_USER_MEMORY_REGION2)",
                "Linux 6.8",
            ))
        } else if !self.guest_memfd {
            // 6.8 offered it to confidential VM types only; ordinary VMs
            // (whose RAM the VMM maps) got it with the mmap flag.
            Some((
                "KVM_CAP_GUEST_MEMFD (KVM_CREATE_GUEST_MEMFD) on an ordinary VM",
                "Linux 6.18 built with CONFIG_KVM_GUEST_MEMFD",
            ))
        } else if self.guest_memfd_flags & GUEST_MEMFD_WANTED != GUEST_MEMFD_WANTED {
            Some((
                "KVM_CAP_GUEST_MEMFD_FLAGS with GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED (0x3)",
                "Linux 6.18",
            ))
        } else {
            None
        }
    }

    /// Whether a dirty ring of either flavour is offered.
    pub fn dirty_ring(&self) -> bool {
        self.dirty_ring_max_bytes > 0 || self.dirty_ring_acq_rel_max_bytes > 0
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "manual-protect2 flags {:#x}, dirty ring max {} B, dirty ring acq/rel max {} B, \
             user-memory2 {}, read-only memslots {}, {} memslots, guest_memfd {} (flags {:#x})",
            self.manual_protect_flags,
            self.dirty_ring_max_bytes,
            self.dirty_ring_acq_rel_max_bytes,
            self.user_memory2,
            self.readonly_mem,
            self.memslots,
            self.guest_memfd,
            self.guest_memfd_flags
        )
    }
}
