//! [`Vm`]: a KVM virtual machine whose guest RAM is ramblock blocks.
//!
//! The VM owns the slot table (ids, ranges, each slot's dirty-log buffers)
//! and its dirty-log mode's kernel side ([`crate::dirty`]), enabled once
//! when the VM is built. It is `Sync`: vCPU threads drain rings on
//! ring-full exits while the migration thread harvests.

use crate::caps::Capabilities;
use crate::dirty::{self, ModeKernel};
use crate::error::KvmError;
use crate::lock;
use crate::memslot::{BlockRange, Slot, SlotId, SlotLog, SlotTable};
use crate::mode::{DirtyLogMode, DirtyLogRequest};
use crate::vcpu::Vcpu;
use kvm_bindings::{kvm_userspace_memory_region, kvm_userspace_memory_region2};
use kvm_ioctls::{Kvm, VmFd};
use nix::errno::Errno;
use ramblock_core::addr::RamAddr;
use ramblock_core::bitmap::{MigrationBitmap, Storage};
use ramblock_core::block::RamBlock;
use ramblock_core::dirty_log::BlockInfo;
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::listener::RamListener;
use std::sync::Mutex;

/// Where x86 KVM puts the three pages it needs for real-mode emulation on
/// hosts without unrestricted guests: just under 4 GiB, outside any RAM the
/// test guests map (the address QEMU and Firecracker use).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Builds a [`Vm`].
#[derive(Copy, Clone, Debug, Default)]
pub struct VmBuilder {
    request: DirtyLogRequest,
    irqchip: bool,
}

impl VmBuilder {
    /// A builder with the dirty-log mode picked from the host.
    pub fn new() -> VmBuilder {
        VmBuilder::default()
    }

    /// Overrides the dirty-log mode.
    pub fn dirty_log(mut self, request: DirtyLogRequest) -> VmBuilder {
        self.request = request;
        self
    }

    /// Gives the VM KVM's in-kernel irqchip (`KVM_CREATE_IRQCHIP`: PIC,
    /// IOAPIC and a local APIC per vCPU), whose local APIC is then part
    /// of each vCPU's [`crate::vcpu_state::VcpuState`]. Off by default: the
    /// test guests take no interrupts.
    pub fn irqchip(mut self, on: bool) -> VmBuilder {
        self.irqchip = on;
        self
    }

    /// Opens `/dev/kvm`, creates the VM and switches on its dirty-log mode.
    pub fn build(self) -> Result<Vm, KvmError> {
        let kvm = Kvm::new().map_err(|e| KvmError::Open {
            what: "open /dev/kvm",
            errno: Errno::from_raw(e.errno()),
        })?;
        let fd = kvm.create_vm().map_err(|e| KvmError::Open {
            what: "create a VM (KVM_CREATE_VM)",
            errno: Errno::from_raw(e.errno()),
        })?;
        let caps = Capabilities::probe(&fd);
        let mode = self.request.resolve(&caps)?;
        let log = dirty::enable(&fd, &caps, mode)?;
        #[cfg(target_arch = "x86_64")]
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(|e| KvmError::from_kvm("KVM_SET_TSS_ADDR", e))?;
        if self.irqchip {
            fd.create_irq_chip()
                .map_err(|e| KvmError::from_kvm("KVM_CREATE_IRQCHIP", e))?;
        }
        Ok(Vm {
            _kvm: kvm,
            fd,
            caps,
            log,
            slots: Mutex::new(SlotTable::new(caps.memslots)),
            listener_error: Mutex::new(None),
        })
    }
}

/// A snapshot of one slot, for callers and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// The KVM slot id.
    pub id: SlotId,
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes mapped.
    pub len: u64,
    /// The block's RAM address.
    pub block: RamAddr,
    /// The block page the slot starts at.
    pub first_page: u64,
    /// Read-only slot.
    pub read_only: bool,
    /// Dirty logging on.
    pub logging: bool,
}

/// A KVM VM; see the module docs.
#[derive(Debug)]
pub struct Vm {
    _kvm: Kvm,
    fd: VmFd,
    caps: Capabilities,
    /// The dirty-log mode's kernel side, chosen once by [`VmBuilder::build`].
    log: Box<dyn ModeKernel>,
    slots: Mutex<SlotTable>,
    listener_error: Mutex<Option<KvmError>>,
}

impl Vm {
    /// A VM with the dirty-log mode picked from the host.
    pub fn new() -> Result<Vm, KvmError> {
        VmBuilder::new().build()
    }

    /// What the host's KVM offers.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The dirty-log mode in use.
    pub fn mode(&self) -> DirtyLogMode {
        self.log.mode()
    }

    /// Whether the ring uses the acquire/release variant.
    pub fn ring_acq_rel(&self) -> bool {
        self.log.ring_acq_rel()
    }

    /// Whether harvested pages stay writable until cleared (manual protect).
    pub(crate) fn log_needs_clear(&self) -> bool {
        self.log.needs_clear()
    }

    /// Whether the dirty log must be reaped ([`Vm::collect_dirty_rings`])
    /// periodically while vCPUs run, not only at each harvest: true for the
    /// dirty ring, whose full ring stops its vCPU.
    pub fn needs_reaping(&self) -> bool {
        self.log.needs_reaping()
    }

    /// The kvm-ioctls VM fd, for calls ramblock does not wrap.
    ///
    /// # Safety
    /// Some of kvm-ioctls' safe calls trust a size the kernel does not
    /// check, and ramblock's own checks trust its slot table. The caller
    /// must not:
    /// - call [`VmFd::get_dirty_log`] with a `memory_size` below the slot's
    ///   length: it allocates its bitmap from that size, and the kernel
    ///   writes one bit per page of the slot past its end (use
    ///   [`Vm::get_dirty_log`], which checks);
    /// - create, resize or delete, through the fd, a slot whose id this
    ///   VM's table holds ([`Vm::slots`]): the table's lengths size every
    ///   buffer the kernel writes a slot's log into.
    pub unsafe fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// `KVM_GET_DIRTY_LOG` for slot `id` into `bitmap`, which must hold one
    /// bit per page of the slot (`words_for(pages)` words, see
    /// [`SlotInfo::len`]); a shorter one is refused with
    /// [`KvmError::LogBuffer`] before the kernel sees it. The call the
    /// harvest makes, without it: in bitmap mode it takes (and clears) what
    /// the next harvest would have reported; a ring VM has no bitmap (KVM
    /// refuses with `ENXIO`).
    pub fn get_dirty_log(&self, id: SlotId, bitmap: &mut [u64]) -> Result<(), KvmError> {
        let slots = lock(&self.slots);
        let slot = slots.get(id).ok_or(KvmError::UnknownSlot(id.0))?;
        dirty::bitmap::get_checked(&self.fd, slot, bitmap)
    }

    /// The slots, by id.
    pub fn slots(&self) -> Vec<SlotInfo> {
        lock(&self.slots)
            .iter()
            .map(|s| SlotInfo {
                id: s.id,
                gpa: s.gpa,
                len: s.len,
                block: s.block,
                first_page: s.first_page,
                read_only: s.read_only,
                logging: s.logging,
            })
            .collect()
    }

    /// Issues the region ioctl for `slot` with `len` bytes (0 deletes it).
    fn set_region(&self, slot: &Slot, len: u64) -> Result<(), KvmError> {
        let what = || {
            format!(
                "KVM_SET_USER_MEMORY_REGION{} (slot {}, gpa {:#x}, {:#x} bytes, flags {:#x})",
                if self.caps.user_memory2 { "2" } else { "" },
                slot.id.0,
                slot.gpa,
                len,
                slot.kvm_flags()
            )
        };
        let result = if self.caps.user_memory2 {
            let (guest_memfd, guest_memfd_offset) = slot.guest_memfd.unwrap_or((0, 0));
            let region = kvm_userspace_memory_region2 {
                slot: slot.id.0,
                flags: slot.kvm_flags(),
                guest_phys_addr: slot.gpa,
                memory_size: len,
                userspace_addr: slot.host,
                guest_memfd_offset,
                guest_memfd: guest_memfd as u32,
                ..Default::default()
            };
            // SAFETY: `slot.host .. + len` is host memory of a block that
            // `map_block`'s caller keeps mapped until the slot is removed.
            unsafe { self.fd.set_user_memory_region2(region) }
        } else {
            let region = kvm_userspace_memory_region {
                slot: slot.id.0,
                flags: slot.kvm_flags(),
                guest_phys_addr: slot.gpa,
                memory_size: len,
                userspace_addr: slot.host,
            };
            // SAFETY: as above.
            unsafe { self.fd.set_user_memory_region(region) }
        };
        result.map_err(|e| KvmError::from_kvm(what(), e))
    }

    /// Maps `range` of `block` at guest-physical `gpa` as a new memslot,
    /// read-only if the block is, with dirty logging off.
    ///
    /// # Safety
    /// KVM, and the guest through it, may write any byte the slot maps at
    /// any time while the slot exists, so the block's host memory (its
    /// reservation, from [`HostMemory::base`] for the block's
    /// `max_length`, which a [`BlockRange::Whole`] slot grows into when the
    /// block grows) must stay reserved for this block at the same address,
    /// neither unmapped nor reused for anything else, until the slot is
    /// gone from KVM, which is when:
    /// - [`Vm::unmap`] or [`Vm::unmap_block`] returned `Ok` for it; or
    /// - the VM, registered as a [`RamListener`] of the block's list, heard
    ///   the block's removal and [`Vm::take_listener_error`] then reports
    ///   nothing (a removal that failed leaves the slot in place); or
    /// - the `Vm` and every [`Vcpu`] created from it have been dropped (a
    ///   vCPU's fd keeps KVM's VM, and its slots, alive).
    ///
    /// Shrinking the block does not end the promise for the part cut off
    /// (the slot still maps it unless the VM is the list's listener).
    /// Nothing may hold a Rust reference into the memory meanwhile; the
    /// core's regions only copy, which is fine.
    pub unsafe fn map_block<M: HostMemory, S: Storage>(
        &self,
        block: &RamBlock<M, S>,
        gpa: u64,
        range: BlockRange,
    ) -> Result<SlotId, KvmError> {
        if block.flags().contains(BlockFlags::GUEST_MEMFD) {
            return Err(KvmError::NotGuestMemfd {
                block: block.name().into(),
                why: "a guest_memfd block is mapped with map_guest_memfd_block, which hands KVM its fd",
            });
        }
        // SAFETY: the caller's promise, passed on.
        unsafe { self.map_slot(block, gpa, range, None) }
    }

    /// What a guest_memfd block needs and this VM lacks, as the error to
    /// report; `Ok` when the host has it all.
    pub fn check_guest_memfd(&self) -> Result<(), KvmError> {
        match self.caps.guest_memfd_missing() {
            Some((capability, kernel)) => {
                Err(KvmError::GuestMemfdUnsupported { capability, kernel })
            }
            None => Ok(()),
        }
    }

    /// Creates a guest_memfd of `len` bytes for this VM
    /// (`KVM_CREATE_GUEST_MEMFD` with `GUEST_MEMFD_FLAG_MMAP |
    /// GUEST_MEMFD_FLAG_INIT_SHARED`): memory the VMM maps and reads and
    /// writes like any block's (`MemoryBuilder::guest_memfd`), which KVM
    /// backs the guest with from the fd rather than from the mapping. A host
    /// without it gets [`KvmError::GuestMemfdUnsupported`], naming the
    /// capability and the Linux release that brings it.
    pub fn create_guest_memfd(&self, len: u64) -> Result<std::os::fd::OwnedFd, KvmError> {
        use std::os::fd::FromRawFd;
        self.check_guest_memfd()?;
        let gmem = kvm_bindings::kvm_create_guest_memfd {
            size: len,
            flags: crate::caps::GUEST_MEMFD_WANTED,
            ..Default::default()
        };
        let fd = self.fd.create_guest_memfd(gmem).map_err(|e| {
            KvmError::from_kvm(
                format!("KVM_CREATE_GUEST_MEMFD ({len:#x} bytes, flags MMAP | INIT_SHARED)"),
                e,
            )
        })?;
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    /// Maps `range` of a guest_memfd block at `gpa` as a memslot through
    /// `KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`, handing KVM
    /// the block's guest_memfd and the offset of the range in it, with dirty
    /// logging off. The block's memory must be a guest_memfd
    /// (`MemoryBuilder::guest_memfd`) this VM created.
    ///
    /// # Safety
    /// As for [`Vm::map_block`]: the block's memory (its mapping and its
    /// guest_memfd, which the memory keeps open) must stay alive for this
    /// block until the slot is gone from KVM.
    pub unsafe fn map_guest_memfd_block<S: Storage>(
        &self,
        block: &RamBlock<ramblock_linux::LinuxMemory, S>,
        gpa: u64,
        range: BlockRange,
    ) -> Result<SlotId, KvmError> {
        use std::os::fd::AsRawFd;
        self.check_guest_memfd()?;
        let memory = block.memory();
        let not = |why| KvmError::NotGuestMemfd {
            block: block.name().into(),
            why,
        };
        if memory.kind() != ramblock_linux::BackingKind::GuestMemfd {
            return Err(not(
                "its memory is not a guest_memfd (build it with MemoryBuilder::guest_memfd)",
            ));
        }
        let fd = memory.fd().ok_or_else(|| not("its memory has no fd"))?;
        let first = match range {
            BlockRange::Whole => 0,
            BlockRange::Pages { first, .. } => first,
        };
        let offset = memory.fd_offset() + (first << 12);
        // SAFETY: the caller's promise, passed on; the fd is the memory's
        // own, open while the memory lives.
        unsafe { self.map_slot(block, gpa, range, Some((fd.as_raw_fd(), offset))) }
    }

    /// The memslot behind [`Vm::map_block`] and
    /// [`Vm::map_guest_memfd_block`].
    ///
    /// # Safety
    /// As for [`Vm::map_block`].
    unsafe fn map_slot<M: HostMemory, S: Storage>(
        &self,
        block: &RamBlock<M, S>,
        gpa: u64,
        range: BlockRange,
        guest_memfd: Option<(i32, u64)>,
    ) -> Result<SlotId, KvmError> {
        let used = block.used_pages() as u64;
        let (first, count) = match range {
            BlockRange::Whole => (0, used),
            BlockRange::Pages { first, count } => (first, count),
        };
        if count == 0 || first.checked_add(count).is_none_or(|end| end > used) {
            return Err(KvmError::Range {
                block: block.name().into(),
                first,
                count,
                used,
            });
        }
        let read_only = block.flags().contains(BlockFlags::READ_ONLY);
        if read_only && !self.caps.readonly_mem {
            return Err(KvmError::ReadOnlyUnsupported(block.name().into()));
        }
        let mut slots = lock(&self.slots);
        let len = count << 12;
        slots.check_range(gpa, len, None)?;
        let slot = Slot {
            id: slots.next_id()?,
            gpa,
            len,
            // The base never moves while the memory lives (HostMemory's
            // contract); `first + count` is within the used length, so
            // inside the reservation.
            host: block.memory().base().as_ptr() as u64 + (first << 12),
            reserved: block.max_length().0 - (first << 12),
            block: block.offset(),
            block_name: block.name().into(),
            first_page: first,
            range,
            read_only,
            logging: false,
            guest_memfd,
            log: SlotLog::default(),
        };
        self.set_region(&slot, len)?;
        slots.insert(slot)
    }

    /// Switches dirty logging of slot `id` on or off, keeping the slot.
    /// Turning it on allocates the slot's log buffers, so harvests never
    /// allocate; turning it off drops pages logged and not yet harvested.
    /// A read-only slot has nothing to log and stays as it is.
    pub fn set_logging(&self, id: SlotId, on: bool) -> Result<(), KvmError> {
        let mut slots = lock(&self.slots);
        let slot = slots.get_mut(id).ok_or(KvmError::UnknownSlot(id.0))?;
        if slot.read_only || slot.logging == on {
            return Ok(());
        }
        slot.logging = on;
        // A guest_memfd slot keeps its flags: KVM cannot log it, and the
        // harvest reports all of it instead (`Slot::always_dirty`).
        if slot.guest_memfd.is_none() {
            if let Err(e) = self.set_region(slot, slot.len) {
                slot.logging = !on;
                return Err(e);
            }
        }
        slot.log = if on {
            SlotLog::sized(slot.pages())
        } else {
            SlotLog::default()
        };
        Ok(())
    }

    /// [`Vm::set_logging`] for every slot of the block at `block`.
    pub fn set_block_logging(&self, block: RamAddr, on: bool) -> Result<(), KvmError> {
        let ids: Vec<SlotId> = lock(&self.slots).ids_of_block(block).collect();
        ids.into_iter().try_for_each(|id| self.set_logging(id, on))
    }

    /// Removes slot `id`; the guest no longer sees that memory.
    pub fn unmap(&self, id: SlotId) -> Result<(), KvmError> {
        let mut slots = lock(&self.slots);
        let slot = slots.get(id).ok_or(KvmError::UnknownSlot(id.0))?;
        self.set_region(slot, 0)?;
        slots.remove(id).map(drop)
    }

    /// Removes every slot of the block at `block`.
    pub fn unmap_block(&self, block: RamAddr) -> Result<(), KvmError> {
        let ids: Vec<SlotId> = lock(&self.slots).ids_of_block(block).collect();
        ids.into_iter().try_for_each(|id| self.unmap(id))
    }

    /// Makes the slots that map all of `block` ([`BlockRange::Whole`])
    /// follow its new used length. KVM cannot resize a slot, so each is
    /// deleted and re-created under the same id; pages logged dirty in the
    /// old slot are saved first and reported by the next harvest.
    ///
    /// The slots are found by the block's RAM address, so `block` must be
    /// the block they map: its memory must start where the slot's does and
    /// its used length fit the reservation [`Vm::map_block`]'s caller
    /// vouched for, or nothing changes and the answer is
    /// [`KvmError::ForeignBlock`] (another list's block at the same RAM
    /// address would otherwise hand KVM memory nobody vouched for).
    pub fn block_resized<M: HostMemory, S: Storage>(
        &self,
        block: &RamBlock<M, S>,
    ) -> Result<(), KvmError> {
        self.log.collect(&self.fd, &self.slots)?;
        let mut slots = lock(&self.slots);
        let ids: Vec<SlotId> = slots.ids_of_block(block.offset()).collect();
        let base = block.memory().base().as_ptr() as u64;
        let len = block.used_length().0;
        // All checked before any slot changes.
        for slot in ids.iter().filter_map(|&id| slots.get(id)) {
            if slot.range == BlockRange::Whole && (slot.host != base || len > slot.reserved) {
                return Err(KvmError::ForeignBlock {
                    slot: slot.id.0,
                    block: slot.block_name.clone(),
                    host: slot.host,
                    reserved: slot.reserved,
                    found_host: base,
                    found_len: len,
                });
            }
        }
        for id in ids {
            let Some(slot) = slots.get(id) else { continue };
            if slot.range != BlockRange::Whole || slot.len == len {
                continue;
            }
            slots.check_range(slot.gpa, len, Some(id))?;
            let Some(slot) = slots.get_mut(id) else {
                continue;
            };
            dirty::save_before_recreate(&*self.log, &self.fd, slot)?;
            self.set_region(slot, 0)?;
            let old = slot.len;
            slot.len = len;
            if let Err(e) = self.set_region(slot, len) {
                slot.len = old;
                // The old slot is gone: forget it rather than keep a record
                // KVM no longer has.
                slots.remove(id)?;
                return Err(e);
            }
            let pages = slot.pages();
            slot.log.resize(pages);
            // The new slot's log starts afresh: nothing of it is harvested.
            slot.log.harvested.fill(0);
        }
        Ok(())
    }

    /// The first error a [`RamListener`] callback met, taken.
    pub fn take_listener_error(&self) -> Option<KvmError> {
        lock(&self.listener_error).take()
    }

    /// Creates vCPU `id`; in ring mode, maps its dirty ring.
    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu, KvmError> {
        let fd = self
            .fd
            .create_vcpu(id)
            .map_err(|e| KvmError::from_kvm(format!("KVM_CREATE_VCPU({id})"), e))?;
        // Everything the host supports, so a guest may enter long mode:
        // KVM refuses EFER.LME for a vCPU whose CPUID lacks it.
        let cpuid = self
            ._kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::from_kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        fd.set_cpuid2(&cpuid)
            .map_err(|e| KvmError::from_kvm(format!("KVM_SET_CPUID2 (vCPU {id})"), e))?;
        self.log.vcpu_created(&fd, id)?;
        let caps = crate::vcpu::StateCaps::probe(&self._kvm, &self.fd)?;
        Ok(Vcpu::new(fd, id, caps))
    }

    /// Ring mode: drains every vCPU's ring into the slots' pending bits and
    /// re-arms the collected pages with `KVM_RESET_DIRTY_RINGS`. Returns how
    /// many entries were collected (always 0 in the bitmap modes). Entries
    /// still in a running vCPU's hardware log (Intel PML) appear at its
    /// next exit, so the final harvest of a migration runs with the vCPUs
    /// stopped.
    pub fn collect_dirty_rings(&self) -> Result<u64, KvmError> {
        self.log.collect(&self.fd, &self.slots)
    }

    /// Merges the log of every logging slot of `block` into `into`; see the
    /// `dirty` module for the modes.
    pub(crate) fn harvest_slots(
        &self,
        block: &BlockInfo<'_>,
        into: &mut MigrationBitmap<&mut [u64]>,
    ) -> Result<u64, KvmError> {
        dirty::harvest(&*self.log, &self.fd, &self.slots, block, into)
    }

    /// Manual protect: re-protects the harvested pages among `count` pages
    /// of `block` from `first`; nothing in the other modes.
    pub(crate) fn clear_harvested(
        &self,
        block: &BlockInfo<'_>,
        first: usize,
        count: usize,
    ) -> Result<(), KvmError> {
        dirty::clear(&*self.log, &self.fd, &self.slots, block, first, count)
    }
}

impl<M: HostMemory, S: Storage> RamListener<M, S> for Vm {
    fn block_removed(&self, block: &RamBlock<M, S>) {
        if let Err(e) = self.unmap_block(block.offset()) {
            lock(&self.listener_error).get_or_insert(e);
        }
    }

    fn block_resized(
        &self,
        block: &RamBlock<M, S>,
        _old: ramblock_core::addr::ByteLen,
        _new: ramblock_core::addr::ByteLen,
    ) {
        if let Err(e) = Vm::block_resized(self, block) {
            lock(&self.listener_error).get_or_insert(e);
        }
    }
}
